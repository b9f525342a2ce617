//! The notifier (`mailgend send`, `mailgend run`): intelmqcbmail's job.
//!
//! A pending directive becomes a mail along this path; the modules are
//! listed in the same order:
//!
//! ```text
//! directive   pending rows → groups (aggregation), claimed FOR UPDATE
//!   → format      decide: which mails the group gets, or postpone it
//!   → event       the group's event rows
//!   → render      template (+ table): subject and body text
//!   → ticket      the next ticket number
//!   → mail        the MIME message (headers, encoding)
//!   → signature   PGP/MIME signing
//!   → outbox      row `sending`, committed on its own   ← durable intent
//!   → send        shared::smtp hands it to the relay
//!   → sent        directives marked sent, outbox row `accepted`: one COMMIT
//! ```
//!
//! The outbox is the durable hand-off: a crash after it leaves a mail
//! *in doubt* (resent as is, or held for an operator), never lost and
//! never sent twice unnoticed; [`outbox`] tells the whole story.
//!
//! [`pipeline`] drives one group through the stages and a run over all
//! groups ([`pipeline::batch`]: small groups together, one statement per
//! step); [`service`] is `mailgend run`, the always-on loop that schedules
//! those runs; [`db`] opens connections, owns the migrations and the
//! `LISTEN` wake-ups; [`metrics`] holds the notifier's Prometheus series.

// The stages, in path order (blank lines keep rustfmt from sorting them).
pub mod directive;

pub mod format;

pub mod event;

pub mod render;

pub mod ticket;

pub mod mail;

/// Fitting mails to the relay's size limit (compress, split, error).
pub mod fit;

/// Bounces to VERP addresses: settings, parsing, their table.
pub mod bounce;
pub mod signature;

pub mod outbox;

pub mod sent;

// What drives the stages, and the database under them.
pub mod db;
pub mod metrics;
pub mod pipeline;
pub mod service;
