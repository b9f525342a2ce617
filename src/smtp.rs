//! Outbound SMTP: hands finished mails to the configured relay.
//!
//! Owns the lettre transport built from the `smtp` section (plain,
//! STARTTLS or implicit TLS, an own CA file, AUTH) and the classification of
//! failures: a 4xx reply or a lost connection is temporary, a 5xx permanent.
//! The transport pools connections, so a run reuses one connection across
//! mails instead of the old tool's one connection per group. Shared with the
//! alert router.

use lettre::address::{Address, Envelope};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::transport::smtp::PoolConfig;
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};

use crate::config::{SmtpConfig, SmtpTls};

#[derive(Debug, thiserror::Error)]
pub enum SmtpError {
    #[error("SMTP configuration: {0}")]
    Config(String),
    #[error("invalid envelope address {address:?}: {reason}")]
    Address { address: String, reason: String },
    /// A 4xx reply: the server did not take the mail; try again later.
    #[error("temporary SMTP failure: {0}")]
    Temporary(String),
    /// A 5xx reply: the server refuses this mail; retrying as is will not help.
    #[error("permanent SMTP failure: {0}")]
    Permanent(String),
    /// The relay could not be reached at all: nothing was handed over.
    #[error("SMTP relay unreachable: {0}")]
    Unreachable(String),
    /// No reply we can trust (connection lost, timeout, TLS error): the mail
    /// may or may not have been accepted. Also try again later.
    #[error("SMTP connection failure: {0}")]
    Connection(String),
}

impl SmtpError {
    /// Worth trying again later (4xx or a connection problem).
    pub fn is_temporary(&self) -> bool {
        matches!(
            self,
            SmtpError::Temporary(_) | SmtpError::Unreachable(_) | SmtpError::Connection(_)
        )
    }

    /// The server may have accepted the mail although we saw no success.
    pub fn delivery_unknown(&self) -> bool {
        matches!(self, SmtpError::Connection(_))
    }
}

/// A configured, pooled SMTP client. Cheap to clone.
#[derive(Clone)]
pub struct Outbound {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    relay: String,
}

impl Outbound {
    /// Builds the transport; does not connect yet.
    pub fn new(cfg: &SmtpConfig, max_connections: u32) -> Result<Outbound, SmtpError> {
        let mut builder =
            AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(cfg.host.as_str())
                .port(cfg.port)
                .timeout(Some(cfg.timeout))
                .pool_config(PoolConfig::new().max_size(max_connections.max(1)));
        if cfg.tls != SmtpTls::None {
            let mut params = TlsParameters::builder(cfg.host.clone());
            if let Some(ca) = &cfg.ca_file {
                let pem = std::fs::read(ca).map_err(|e| {
                    SmtpError::Config(format!("cannot read smtp.ca_file {}: {e}", ca.display()))
                })?;
                let cert = Certificate::from_pem(&pem).map_err(|e| {
                    SmtpError::Config(format!("smtp.ca_file {}: {e}", ca.display()))
                })?;
                params = params.add_root_certificate(cert);
            }
            let params = params
                .build()
                .map_err(|e| SmtpError::Config(format!("TLS setup: {e}")))?;
            builder = builder.tls(match cfg.tls {
                SmtpTls::StartTls => Tls::Required(params),
                SmtpTls::Opportunistic => Tls::Opportunistic(params),
                SmtpTls::Implicit => Tls::Wrapper(params),
                SmtpTls::None => unreachable!(),
            });
        }
        if let (Some(u), Some(p)) = (&cfg.username, &cfg.password) {
            builder = builder.credentials(Credentials::new(u.clone(), p.clone()));
        }
        Ok(Outbound {
            transport: builder.build(),
            relay: format!("{}:{}", cfg.host, cfg.port),
        })
    }

    /// `host:port`, for logs.
    pub fn relay(&self) -> &str {
        &self.relay
    }

    /// Sends one finished message. `Ok` means the relay accepted it (250
    /// after DATA).
    pub async fn send(&self, from: &str, to: &[String], message: &[u8]) -> Result<(), SmtpError> {
        let from = parse_address(from)?;
        let to = to
            .iter()
            .map(|a| parse_address(a))
            .collect::<Result<Vec<_>, _>>()?;
        let envelope = Envelope::new(Some(from), to).map_err(|e| SmtpError::Address {
            address: String::new(),
            reason: e.to_string(),
        })?;
        // lettre always appends CRLF.CRLF; without this the recipient would
        // get one more empty line than the message has (Python's smtplib,
        // which the old tool used, sends the bytes unchanged).
        let message = message.strip_suffix(b"\r\n").unwrap_or(message);
        match self.transport.send_raw(&envelope, message).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_permanent() => Err(SmtpError::Permanent(error_chain(&e))),
            Err(e) if e.is_transient() => Err(SmtpError::Temporary(error_chain(&e))),
            // lettre has no accessor for its "could not connect" kind; its
            // Display names it. Before a connection exists nothing can have
            // been delivered, so this is no doubt.
            Err(e) if e.to_string().starts_with("Connection error") => {
                Err(SmtpError::Unreachable(error_chain(&e)))
            }
            Err(e) => Err(SmtpError::Connection(error_chain(&e))),
        }
    }
}

fn parse_address(a: &str) -> Result<Address, SmtpError> {
    a.parse::<Address>().map_err(|e| SmtpError::Address {
        address: a.to_string(),
        reason: e.to_string(),
    })
}

/// lettre's Display hides the server's text behind `source()`; operators
/// need the reply to act on it.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        let t = inner.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = inner.source();
    }
    s
}
