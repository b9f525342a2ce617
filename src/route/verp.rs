//! Bounces to the notifier's VERP addresses (issue 19): `mailgend route`
//! takes mail to `bounces+<ticket>-<mac>@domain` (`shared::verp`), reads
//! the delivery report (`notify::bounce::parse`) and records each failed
//! recipient in `mailgend.bounce`, linked to the notification's `sent` row.
//!
//! # Why not a manager
//!
//! Managers answer "what do the rules do with this message?" and their
//! result is routed: forwarded, posted to Slack, spooled, retried. A
//! bounce must never be any of that, and it needs what no manager has: a
//! check at RCPT time (a forged MAC or an unknown ticket is refused with
//! 550 before the client sends the data, so a forgery costs its sender a
//! bounce of its own and us nothing), and a final reply that depends on
//! the database (451 when it is down, so the MTA keeps the report and
//! retries: nothing lost). So the intake sits in the SMTP session in
//! front of the router: a bounce transaction never reaches the
//! [`Accept`](crate::route::server::Accept) of the router and the spool.
//!
//! # Rules
//!
//! - Off unless the YAML's `mailgend.bounces-config` names the notifier's
//!   JSON configuration and that has `mailgend.verp`; the intake then
//!   uses its `database` settings, VERP key and `mailgend.bounces` policy.
//! - An address of the bounce form (`local+…@domain`) whose MAC is wrong,
//!   that is malformed, or whose ticket was never sent: `550 5.1.1` at
//!   RCPT, WARN. Nothing is recorded or forwarded.
//! - One bounce address per transaction, never mixed with ordinary
//!   recipients: the others get `452 4.5.3` and the client sends them in
//!   a transaction of their own (RFC 5321 §4.5.3.1.10).
//! - After DATA: each failed or delayed recipient of a DSN (RFC 3464), or
//!   the first SMTP code of a classic bounce, becomes a row; the same
//!   report received again (same ticket, Message-Id and recipient) is not
//!   recorded twice. A message that is no bounce (an auto-reply) is
//!   accepted and dropped with a WARN. The database down: `451 4.3.0`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::{info, warn};

use crate::config::{Config, ConfigError, ConfigSource, DatabaseConfig};
use crate::notify::bounce::parse::{self, Class};
use crate::notify::bounce::{store, Policy};
use crate::notify::ticket::Ticket;
use crate::route::metrics::RouteMetrics;
use crate::route::server::Reply;
use crate::route::Inbound;
use crate::shared::verp::{Verp, VerpError};

/// How long a database step of the intake may take before the client
/// hears 451.
const DB_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    #[error("mailgend.bounces-config {}: {source}", path.display())]
    Config {
        path: PathBuf,
        #[source]
        source: ConfigError,
    },
    #[error(
        "mailgend.bounces-config {}: the file sets no mailgend.verp (address and key_file), \
         so no mail can carry a bounce address",
        path.display()
    )]
    NoVerp { path: PathBuf },
}

/// The answer to `RCPT TO` for one address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rcpt {
    /// Not of the bounce form: an ordinary recipient for the router.
    NotOurs,
    /// A bounce for this ticket's notification.
    Bounce(Ticket),
    /// Refused; the whole reply line.
    Refused(String),
}

/// The running intake.
pub struct BounceIntake {
    verp: Verp,
    db: DatabaseConfig,
    policy: Option<Policy>,
    metrics: Option<Arc<RouteMetrics>>,
}

impl std::fmt::Debug for BounceIntake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BounceIntake({:?})", self.verp)
    }
}

impl BounceIntake {
    /// Reads the notifier's configuration `path` (that file only, not the
    /// user's file: the router runs as a service).
    pub fn load(
        path: &Path,
        metrics: Option<Arc<RouteMetrics>>,
    ) -> Result<BounceIntake, IntakeError> {
        let config = Config::load(&ConfigSource {
            system_file: Some(path.to_path_buf()),
            user_file: None,
            skip_user_file: true,
        })
        .map_err(|source| IntakeError::Config {
            path: path.to_path_buf(),
            source,
        })?;
        let verp = config.verp.clone().ok_or_else(|| IntakeError::NoVerp {
            path: path.to_path_buf(),
        })?;
        Ok(BounceIntake {
            verp,
            db: config.database.clone(),
            policy: config.bounce_policy.clone(),
            metrics,
        })
    }

    /// The bounce address without a ticket, for the log.
    pub fn base(&self) -> String {
        self.verp.base()
    }

    /// Checks one `RCPT TO`.
    pub async fn rcpt(&self, address: &str) -> Rcpt {
        let ticket = match self.verp.ticket(address).map(Ticket::from_stored) {
            Err(VerpError::NotOurs(_)) => return Rcpt::NotOurs,
            Err(e) => {
                warn!(rcpt = %address, reason = %e, "refused a bounce address: forged or malformed");
                return Rcpt::Refused(format!(
                    "550 5.1.1 <{}>: no such bounce address",
                    one_line(address)
                ));
            }
            Ok(t) => t,
        };
        let known = tokio::time::timeout(DB_TIMEOUT, async {
            let client = crate::notify::db::connect(&self.db)
                .await
                .map_err(|e| e.to_string())?;
            store::sent(&client, &ticket)
                .await
                .map_err(|e| crate::notify::db::describe(&e))
        })
        .await
        .unwrap_or_else(|_| Err("timed out".into()));
        match known {
            Ok(Some(_)) => Rcpt::Bounce(ticket),
            Ok(None) => {
                warn!(rcpt = %address, %ticket, "refused a bounce for a ticket that was never sent");
                Rcpt::Refused(format!(
                    "550 5.1.1 <{}>: no such bounce address",
                    one_line(address)
                ))
            }
            Err(e) => {
                warn!(%ticket, error = %e, "bounce database unavailable; the bounce is refused for now (451) and the MTA retries");
                Rcpt::Refused("451 4.3.0 Bounce database unavailable, try again later".into())
            }
        }
    }

    /// Reads and records a bounce for `ticket`; the reply after DATA.
    pub async fn receive(&self, message: &Inbound, ticket: &Ticket) -> Reply {
        match tokio::time::timeout(DB_TIMEOUT, self.record(message, ticket)).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(e)) => {
                warn!(%ticket, error = %e, "bounce database unavailable; the bounce is refused for now (451) and the MTA retries");
                Reply::new(451, "4.3.0 Bounce database unavailable, try again later")
            }
            Err(_) => {
                warn!(%ticket, error = "timed out", "bounce database unavailable; the bounce is refused for now (451) and the MTA retries");
                Reply::new(451, "4.3.0 Bounce database unavailable, try again later")
            }
        }
    }

    async fn record(&self, message: &Inbound, ticket: &Ticket) -> Result<Reply, String> {
        let mut client = crate::notify::db::connect(&self.db)
            .await
            .map_err(|e| e.to_string())?;
        let dberr = |e: tokio_postgres::Error| crate::notify::db::describe(&e);
        // Known at RCPT; gone since only if an operator deleted it.
        let sent = store::sent(&client, ticket)
            .await
            .map_err(dberr)?
            .unwrap_or(store::Sent {
                sent_id: None,
                recipients: Vec::new(),
            });
        let parsed = match parse::parse(&message.data, &sent.recipients) {
            Ok(p) => p,
            Err(e) => {
                warn!(
                    %ticket,
                    id = message.id.as_deref().unwrap_or(""),
                    reason = %e,
                    "mail to a bounce address is no bounce; accepted and dropped"
                );
                return Ok(Reply::new(250, "2.0.0 Ok, not a bounce; dropped"));
            }
        };
        let tx = client.transaction().await.map_err(dberr)?;
        let mut recorded = Vec::new();
        for report in &parsed.reports {
            let id = store::record(&tx, ticket, &sent, report, parsed.message_id.as_deref())
                .await
                .map_err(dberr)?;
            if let Some(id) = id {
                recorded.push((id, report));
            }
        }
        tx.commit().await.map_err(dberr)?;
        for (id, report) in &recorded {
            info!(
                bounce = id,
                %ticket,
                recipient = report.recipient.as_deref().unwrap_or(""),
                status = %report.status,
                class = report.class.as_str(),
                kind = ?parsed.kind,
                "bounce recorded"
            );
            if let Some(m) = &self.metrics {
                m.bounce_received(report.class == Class::Permanent);
            }
            if report.class == Class::Permanent {
                if let (Some(p), Some(r)) = (&self.policy, &report.recipient) {
                    self.apply_policy(&client, p, r, ticket).await;
                }
            }
        }
        Ok(Reply::new(
            250,
            format!(
                "2.0.0 Ok, {} bounce(s) recorded for {ticket}",
                recorded.len()
            ),
        ))
    }

    /// The per-recipient policy: a WARN naming the contact once it has
    /// bounced permanently `warn_after` times within the window.
    async fn apply_policy(
        &self,
        client: &tokio_postgres::Client,
        policy: &Policy,
        recipient: &str,
        ticket: &Ticket,
    ) {
        let since = chrono::Utc::now() - policy.window;
        match store::permanent_count(client, recipient, since).await {
            Ok(n) if n >= i64::from(policy.warn_after) => warn!(
                recipient,
                %ticket,
                permanent_bounces = n,
                window = %format_window(policy.window),
                "contact bounces permanently; check it in the contact database"
            ),
            Ok(_) => {}
            Err(e) => warn!(
                recipient,
                error = %crate::notify::db::describe(&e),
                "bounce policy not checked: database error"
            ),
        }
    }
}

fn format_window(d: chrono::Duration) -> String {
    let s = d.num_seconds();
    if s % 86400 == 0 {
        format!("{}d", s / 86400)
    } else if s % 3600 == 0 {
        format!("{}h", s / 3600)
    } else {
        format!("{s}s")
    }
}

fn one_line(s: &str) -> String {
    parse::one_line(s, 200)
}
