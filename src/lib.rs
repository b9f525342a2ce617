//! mailgend: an always-on replacement for IntelMQ Mailgen's `intelmqcbmail`.
//!
//! The notification data path, module by module:
//!
//! ```text
//! config ─┐
//! directive (pending rows → groups) → format (which mails, or postpone)
//!   → event (load the group's event rows) → template + table (render)
//!   → ticket (number) → mail (MIME) → signature (PGP/MIME) → smtp (send)
//!   → sent (mark the group's directives sent)
//! ```
//!
//! `pipeline` drives one group through that path and one run over all
//! groups (`pipeline::batch`: small groups together, one statement per
//! step); `migrate` owns the database objects; `sandbox` brings up the
//! throw-away PostgreSQL and SMTP receiver used by `demo`, the tests and
//! the benchmarks.

pub mod bench;
pub mod config;
pub mod db;
pub mod demo;
pub mod directive;
pub mod event;
pub mod format;
pub mod logging;
pub mod mail;
pub mod metrics;
pub mod migrate;
pub mod outbox;
pub mod pipeline;
pub mod preview;
pub mod review;
pub mod route;
pub mod sandbox;
pub mod sent;
pub mod service;
pub mod signature;
pub mod smtp;
pub mod status;
pub mod systemd;
pub mod table;
pub mod template;
pub mod ticket;
pub mod wakeup;
