//! mailgend: an always-on replacement for IntelMQ Mailgen's `intelmqcbmail`
//! (the notifier) and for mail2alert (the router, `mailgend route`).
//!
//! Two data paths, each with one durable hand-off (docs/architecture.md
//! draws them in full):
//!
//! ```text
//! notifier (notify/)
//!   directives ─→ decide (format) ─→ events ─→ render ─→ ticket ─→ mail
//!     ─→ sign ─→ OUTBOX row `sending`, committed on its own (durable intent)
//!     ─→ send (SMTP) ─→ mark sent + outbox row `accepted`: one COMMIT
//!
//! router (route/)
//!   SMTP in ─→ managers ─→ rules ─→ actions ─→ forward (SMTP out, Slack)
//!     at once; what failed for now ─→ SPOOL file (fsync, rename, fsync
//!     dir) ─→ only then "250" to the client ─→ retry worker ─→ removed
//! ```
//!
//! The folders:
//! - [`notify`]: the notifier, one module per stage in path order, the
//!   pipeline that drives a group (or a batch of small groups) through
//!   them, the service (`mailgend run`) and the database access.
//! - [`route`]: the router; its `mod.rs` draws its path.
//! - [`cli`]: the operator commands that are more than a call into a
//!   daemon (`send` review, `preview`, `status`/`in-doubt`,
//!   `check-config`, `demo`, `bench`); argument parsing and the rest of
//!   dispatch are in `main.rs`.
//! - [`shared`]: what both daemons use: the outbound SMTP client and its
//!   settings, recipient addresses, the metrics exposition and `/metrics`
//!   endpoint, logging, and systemd notification.
//! - [`fuzzing`]: the fuzz targets' bodies (`fuzz/` wraps them), so the
//!   normal build compiles and tests them.
//! - [`sandbox`]: throw-away PostgreSQL, SMTP receiver and event feed for
//!   the tests, `demo` and `bench`; never used by the daemons.
//!
//! Still at the top level: [`config`], the notifier's configuration
//! (intelmqcbmail's JSON files).

pub mod cli;
pub mod config;
pub mod fuzzing;
pub mod notify;
pub mod route;
pub mod sandbox;
pub mod shared;
