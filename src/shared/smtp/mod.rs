//! Outbound SMTP: hands finished mails to the configured relay.
//!
//! Owns the lettre transport built from the `smtp` section (plain,
//! STARTTLS or implicit TLS, an own CA file, AUTH) and the classification of
//! failures. The transport pools connections, so a run reuses one
//! connection across mails instead of the old tool's one connection per
//! group. Shared with the alert router.
//!
//! [`Outbound::send`] (the notifier) classifies a failure by what it says
//! about the mail and about the relay:
//!
//! * the mail's own: it cannot go through this relay (SMTPUTF8 or 8BITMIME
//!   needed but not offered, over the relay's `SIZE`), a 5xx reply at any
//!   step, a 4xx reply to RCPT (mailbox busy, too many recipients,
//!   greylisting) — the other mails go on;
//! * the relay's: it cannot be reached, refuses the session (5xx to the
//!   greeting, EHLO or AUTH), answers 421 or another 4xx outside RCPT, or
//!   the connection breaks before the end of the data was written — the
//!   mail certainly was not handed over, and the next ones would fare no
//!   better;
//! * in doubt: the end of the data was written and no reply came.
//!
//! The client and its set-up are here; the connections and their pool in
//! `pool.rs`, the two ways of sending in `send.rs`, the errors and their
//! classification in `error.rs`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lettre::address::{Address, Envelope};
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{
    AsyncSmtpConnection, AsyncTokioStream, Certificate, TlsParameters,
};
use lettre::transport::smtp::extension::ClientId;
use tokio::net::TcpStream;

mod config;

pub use config::{SmtpConfig, SmtpTls};
mod error;
mod pool;
mod send;

pub use error::SmtpError;
pub use send::{RecipientResult, RefusedRecipient};

use error::*;
use pool::*;
use send::*;

/// A configured, pooled SMTP client. Cheap to clone.
///
/// lettre speaks the protocol; the connections are ours. lettre's own
/// transport connects without `TCP_NODELAY` and writes a message and its
/// final `CRLF.CRLF` separately, so Nagle's algorithm holds the terminator
/// until the relay's delayed ACK (up to 40 ms per mail per connection — it
/// capped a whole run at ~90 mails/s here). We open the sockets ourselves
/// with `TCP_NODELAY` and hand them to lettre's `AsyncSmtpConnection`.
#[derive(Clone)]
pub struct Outbound {
    inner: Arc<Inner>,
}

struct Inner {
    host: String,
    port: u16,
    tls: SmtpTls,
    /// For STARTTLS (lettre upgrades the stream itself).
    tls_parameters: Option<TlsParameters>,
    /// For implicit TLS (we wrap the socket before the greeting).
    implicit: Option<tokio_native_tls::TlsConnector>,
    credentials: Option<Credentials>,
    hello: ClientId,
    timeout: Duration,
    max_idle: usize,
    idle: Mutex<Vec<(Conn, Instant)>>,
    relay: String,
    /// The notifier's `smtp.max_message_size` (`None`: no own limit).
    max_message_size: Option<usize>,
}

impl Outbound {
    /// Prepares the client; does not connect yet.
    pub fn new(cfg: &SmtpConfig, max_connections: u32) -> Result<Outbound, SmtpError> {
        let ca = match &cfg.ca_file {
            Some(ca) => Some(std::fs::read(ca).map_err(|e| {
                SmtpError::Config(format!("cannot read smtp.ca_file {}: {e}", ca.display()))
            })?),
            None => None,
        };
        let mut tls_parameters = None;
        let mut implicit = None;
        match cfg.tls {
            SmtpTls::None => {}
            SmtpTls::StartTls | SmtpTls::Opportunistic => {
                let mut params = TlsParameters::builder(cfg.host.clone());
                if let Some(pem) = &ca {
                    let cert = Certificate::from_pem(pem)
                        .map_err(|e| SmtpError::Config(format!("smtp.ca_file: {e}")))?;
                    params = params.add_root_certificate(cert);
                }
                tls_parameters = Some(
                    params
                        .build()
                        .map_err(|e| SmtpError::Config(format!("TLS setup: {e}")))?,
                );
            }
            SmtpTls::Implicit => {
                let mut builder = native_tls::TlsConnector::builder();
                if let Some(pem) = &ca {
                    let cert = native_tls::Certificate::from_pem(pem)
                        .map_err(|e| SmtpError::Config(format!("smtp.ca_file: {e}")))?;
                    builder.add_root_certificate(cert);
                }
                let connector = builder
                    .build()
                    .map_err(|e| SmtpError::Config(format!("TLS setup: {e}")))?;
                implicit = Some(tokio_native_tls::TlsConnector::from(connector));
            }
        }
        let credentials = match (&cfg.username, &cfg.password) {
            (Some(u), Some(p)) => Some(Credentials::new(u.clone(), p.clone())),
            _ => None,
        };
        let hello = host_name().map(ClientId::Domain).unwrap_or_default();
        Ok(Outbound {
            inner: Arc::new(Inner {
                host: cfg.host.clone(),
                port: cfg.port,
                tls: cfg.tls,
                tls_parameters,
                implicit,
                credentials,
                hello,
                timeout: cfg.timeout,
                max_idle: max_connections.max(1) as usize,
                idle: Mutex::new(Vec::new()),
                relay: format!("{}:{}", cfg.host, cfg.port),
                max_message_size: None,
            }),
        })
    }

    /// Adds a limit of our own to the relay's `SIZE`: no mail larger than
    /// `max` (octets, as SIZE counts them) is offered. Call before the
    /// client is cloned.
    pub fn with_max_message_size(mut self, max: Option<usize>) -> Outbound {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.max_message_size = max.filter(|m| *m > 0);
        }
        self
    }

    /// The largest message (octets, counted as SIZE counts them) this
    /// client will offer: the smaller of the relay's announced `SIZE` and
    /// the configured maximum; `None` when neither limits it. Learning the
    /// relay's `SIZE` takes a connection (pooled for the next mail).
    pub async fn message_limit(&self) -> Result<Option<usize>, SmtpError> {
        let conn = self.checkout().await.map_err(|e| match e {
            SmtpError::Permanent(why) => SmtpError::RelayRefused(why),
            other => other,
        })?;
        let announced = conn.size.flatten();
        self.put_back(conn);
        Ok(min_limit(announced, self.inner.max_message_size))
    }

    /// `host:port`, for logs.
    pub fn relay(&self) -> &str {
        &self.inner.relay
    }
}

/// This host's name (our EHLO name; also names the instance in the
/// outbox).
pub fn host_name() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
}
