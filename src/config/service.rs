//! Section `mailgend`: the daemon's own runtime settings.

use std::fmt;
use std::time::Duration;

use super::reader::Reader;

/// outbox's `sending` rows a crash left behind, see `notify::outbox`).
/// Defined here, not in the outbox, so that config imports nothing of the
/// notifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InDoubtPolicy {
    /// Send the stored message again: same bytes, same Message-Id, same
    /// ticket, so recipients' ticket systems can deduplicate. Logged at WARN.
    Resend,
    /// Keep the group pending and untouched until an operator runs
    /// `mailgend in-doubt release|mark-sent|discard`.
    Hold,
}

impl fmt::Display for InDoubtPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            InDoubtPolicy::Resend => "resend",
            InDoubtPolicy::Hold => "hold",
        })
    }
}

/// mailgend's own runtime settings (section `mailgend`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceConfig {
    /// Groups rendered, signed and sent concurrently.
    pub workers: usize,
    /// What to do with a mail whose delivery is in doubt after a crash.
    pub in_doubt: InDoubtPolicy,
    /// How long SIGTERM waits for groups in flight before abandoning them
    /// (they stay pending).
    pub shutdown_deadline: Duration,
    /// Full rescan interval, in case a notification was missed.
    pub sweep_interval: Duration,
    /// `host:port` for the Prometheus `/metrics` endpoint; off when unset.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// Reads `mailgend` (its `signing_key_file` belongs to `openpgp.rs`).
pub(super) fn read(r: &mut Reader) -> ServiceConfig {
    r.section(
        "mailgend",
        &[
            "workers",
            "in_doubt",
            "shutdown_deadline",
            "sweep_interval",
            "metrics_listen",
            "signing_key_file",
            "verp",
            "bounces",
        ],
    );
    let in_doubt = match r.string("mailgend.in_doubt").as_deref() {
        None | Some("resend") => InDoubtPolicy::Resend,
        Some("hold") => InDoubtPolicy::Hold,
        Some(other) => {
            r.problem(
                "mailgend.in_doubt",
                format!("unknown value {other:?}; use \"resend\" or \"hold\""),
            );
            InDoubtPolicy::Resend
        }
    };
    let metrics_listen = match r.string("mailgend.metrics_listen") {
        None => None,
        Some(s) if s.is_empty() => None,
        Some(s) => match s.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                r.problem(
                    "mailgend.metrics_listen",
                    format!("{s:?} is not an address:port such as 127.0.0.1:9469"),
                );
                None
            }
        },
    };
    ServiceConfig {
        workers: r.integer("mailgend.workers", 1, 1024).unwrap_or(4) as usize,
        in_doubt,
        shutdown_deadline: Duration::from_secs(
            r.integer("mailgend.shutdown_deadline", 0, 3600)
                .unwrap_or(30) as u64,
        ),
        sweep_interval: Duration::from_secs(
            r.integer("mailgend.sweep_interval", 1, 86400)
                .unwrap_or(300) as u64,
        ),
        metrics_listen,
    }
}
