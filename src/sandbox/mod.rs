//! Throw-away infrastructure: a private PostgreSQL cluster, a recording SMTP
//! receiver and a generator of realistic IntelMQ events.
//!
//! The test suite, `mailgend demo` and `mailgend bench` all need the same
//! three things, and none of them may touch a real deployment: a database
//! server they own, a mail server that accepts (or, on request, refuses)
//! everything and shows what arrived, and events that look like those the
//! IntelMQ rules bot writes. This module owns them; it lives in the library
//! rather than in `tests/` because the demo and bench binaries use it too.
//!
//! - [`postgres`]: [`PgCluster`] (a private PostgreSQL 15 cluster in a
//!   directory, started and stopped with `pg_ctl`), the per-run
//!   [`SharedCluster`] that all test processes share, and [`TestDb`], one
//!   fresh database per test.
//! - [`smtp_sink`]: [`SmtpSink`], a real ESMTP receiver on loopback that
//!   records every message, with fault injection for reliability tests.
//! - [`feed`]: [`Feed`], a seeded generator of Shadowserver-like events with
//!   `extra.certbund.source_directives`, and a COPY-based bulk insert.
//!
//! Nothing here is meant for production use: clusters run with `fsync=off`
//! and the SMTP sink accepts mail from anyone on loopback.

pub mod feed;
pub mod postgres;
pub mod smtp_sink;

pub use feed::{Feed, FeedKind, FeedParams, NewEvent};
pub use postgres::{ExtraType, PgCluster, SharedCluster, TestDb};
pub use smtp_sink::{Failure, Fault, ReceivedMail, Scope, SinkOptions, SmtpSink, Stage};

use std::path::PathBuf;

/// Why a piece of the sandbox could not be brought up or used.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} failed ({status}): {output}")]
    Command {
        program: String,
        status: String,
        /// The command's stderr and stdout, trimmed.
        output: String,
    },
    #[error("PostgreSQL binaries not found: {0}")]
    PgBinariesNotFound(String),
    #[error("system user {0:?} not found in /etc/passwd (needed to run PostgreSQL as root)")]
    NoSuchUser(String),
    #[error("unix socket path {0:?} is too long (at most 107 bytes); use a shorter directory")]
    SocketPathTooLong(PathBuf),
    #[error("PostgreSQL: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("{0}")]
    Invalid(String),
}

impl SandboxError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> SandboxError {
        SandboxError::Io {
            context: context.into(),
            source,
        }
    }
}
