//! Outbound SMTP: hands finished mails to the configured relay.
//!
//! Owns the lettre transport built from the `smtp` section (plain,
//! STARTTLS or implicit TLS, an own CA file, AUTH) and the classification of
//! failures: a 4xx reply or a lost connection is temporary, a 5xx permanent.
//! The transport pools connections, so a run reuses one connection across
//! mails instead of the old tool's one connection per group. Shared with the
//! alert router.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lettre::address::{Address, Envelope};
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{
    AsyncSmtpConnection, AsyncTokioStream, Certificate, TlsParameters,
};
use lettre::transport::smtp::extension::ClientId;
use tokio::net::TcpStream;

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
    idle: Mutex<Vec<(AsyncSmtpConnection, Instant)>>,
    relay: String,
}

/// A socket lettre can drive (`AsyncTokioStream` is lettre's trait for
/// caller-provided streams).
#[derive(Debug)]
struct Plain(TcpStream);

#[derive(Debug)]
struct Wrapped(tokio_native_tls::TlsStream<TcpStream>);

macro_rules! delegate_io {
    ($t:ty, $inner:ident => $get:expr) => {
        impl tokio::io::AsyncRead for $t {
            fn poll_read(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &mut tokio::io::ReadBuf<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
            }
        }
        impl tokio::io::AsyncWrite for $t {
            fn poll_write(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
            }
            fn poll_flush(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.0).poll_flush(cx)
            }
            fn poll_shutdown(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
            }
        }
        impl AsyncTokioStream for $t {
            fn peer_addr(&self) -> std::io::Result<std::net::SocketAddr> {
                let $inner = &self.0;
                $get
            }
        }
    };
}

delegate_io!(Plain, s => s.peer_addr());
delegate_io!(Wrapped, s => s.get_ref().get_ref().get_ref().peer_addr());

/// A pooled connection idle for longer than this is checked with NOOP
/// before use: a relay that dropped it meanwhile must not turn the next
/// mail into one whose delivery is in doubt.
const CHECK_AFTER_IDLE: Duration = Duration::from_secs(2);

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
            }),
        })
    }

    /// `host:port`, for logs.
    pub fn relay(&self) -> &str {
        &self.inner.relay
    }

    /// Opens, greets, secures and authenticates a new connection. Nothing
    /// can have been delivered when this fails.
    async fn connect(&self) -> Result<AsyncSmtpConnection, SmtpError> {
        let i = &self.inner;
        let unreachable = |e: String| SmtpError::Unreachable(format!("{}: {e}", i.relay));
        let work = async {
            let tcp = TcpStream::connect((i.host.as_str(), i.port))
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            tcp.set_nodelay(true)
                .map_err(|e| unreachable(e.to_string()))?;
            let stream: Box<dyn AsyncTokioStream> = match &i.implicit {
                Some(connector) => Box::new(Wrapped(
                    connector
                        .connect(&i.host, tcp)
                        .await
                        .map_err(|e| unreachable(format!("TLS: {e}")))?,
                )),
                None => Box::new(Plain(tcp)),
            };
            let mut conn = AsyncSmtpConnection::connect_with_transport(stream, &i.hello)
                .await
                .map_err(|e| classify_setup(&e))?;
            if let Some(params) = &i.tls_parameters {
                if i.tls == SmtpTls::StartTls || conn.can_starttls() {
                    conn.starttls(params.clone(), &i.hello)
                        .await
                        .map_err(|e| classify_setup(&e))?;
                }
            }
            if let Some(creds) = &i.credentials {
                conn.auth(&[Mechanism::Plain, Mechanism::Login], creds)
                    .await
                    .map_err(|e| classify_setup(&e))?;
            }
            Ok(conn)
        };
        tokio::time::timeout(i.timeout, work)
            .await
            .map_err(|_| unreachable("timed out while connecting".into()))?
    }

    /// A pooled connection that still answers, or a new one.
    async fn checkout(&self) -> Result<AsyncSmtpConnection, SmtpError> {
        loop {
            let pooled = self.inner.idle.lock().expect("smtp pool").pop();
            let Some((mut conn, since)) = pooled else {
                return self.connect().await;
            };
            if since.elapsed() < CHECK_AFTER_IDLE {
                return Ok(conn);
            }
            let alive = tokio::time::timeout(self.inner.timeout, conn.test_connected()).await;
            if matches!(alive, Ok(true)) {
                return Ok(conn);
            }
            conn.abort().await;
        }
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
        let mut conn = self.checkout().await?;
        let result = tokio::time::timeout(self.inner.timeout, conn.send(&envelope, message)).await;
        match result {
            Ok(Ok(_)) => {
                let mut idle = self.inner.idle.lock().expect("smtp pool");
                if idle.len() < self.inner.max_idle {
                    idle.push((conn, Instant::now()));
                }
                Ok(())
            }
            // lettre closes the connection after any failed command, even
            // a refusal; it is not reused.
            Ok(Err(e)) => Err(classify(&e)),
            Err(_) => {
                conn.abort().await;
                Err(SmtpError::Connection(format!(
                    "{}: no answer within {:?}",
                    self.inner.relay, self.inner.timeout
                )))
            }
        }
    }
}

/// One recipient's answer within a [`Outbound::send_each`] transaction.
pub type RecipientResult = Result<(), SmtpError>;

impl Outbound {
    /// Sends one message in one transaction and reports per recipient
    /// (the alert router records which recipients have the message, so a
    /// retry never sends it twice to one that accepted it). `from == None`
    /// is the null sender `<>`, for bounces.
    ///
    /// `Err`: nobody got the message (MAIL or DATA refused, the relay
    /// unreachable, the connection lost). `Ok(results)`: one entry per
    /// recipient, in order; the message was accepted for every `Ok` entry
    /// (or for none, when every RCPT was refused).
    pub async fn send_each(
        &self,
        from: Option<&str>,
        to: &[String],
        message: &[u8],
    ) -> Result<Vec<RecipientResult>, SmtpError> {
        use lettre::transport::smtp::commands::{Data, Mail, Rcpt, Rset};
        use lettre::transport::smtp::extension::{Extension, MailBodyParameter, MailParameter};

        let from = from.map(parse_address).transpose()?;
        let to = to
            .iter()
            .map(|a| RcptAddress::parse(a))
            .collect::<Result<Vec<_>, _>>()?;
        // lettre appends CRLF.CRLF itself (see `send`).
        let message = message.strip_suffix(b"\r\n").unwrap_or(message);
        let mut conn = self.checkout().await?;
        let work = async {
            let mut params = Vec::new();
            if !message.is_ascii() && conn.server_info().supports_feature(Extension::EightBitMime) {
                params.push(MailParameter::Body(MailBodyParameter::EightBitMime));
            }
            conn.command(Mail::new(from, params))
                .await
                .map_err(|e| classify(&e))?;
            let mut results = Vec::with_capacity(to.len());
            for address in to {
                let sent = match address {
                    RcptAddress::Full(a) => conn.command(Rcpt::new(a, vec![])).await,
                    RcptAddress::Bare(local) => {
                        conn.command(format!("RCPT TO:<{local}>\r\n")).await
                    }
                };
                match sent {
                    Ok(_) => results.push(Ok(())),
                    Err(e) => {
                        let e = classify(&e);
                        if let SmtpError::Connection(_) = e {
                            return Err(e);
                        }
                        results.push(Err(e));
                    }
                }
            }
            if results.iter().all(Result::is_err) {
                conn.command(Rset).await.map_err(|e| classify(&e))?;
                return Ok(results);
            }
            conn.command(Data).await.map_err(|e| classify(&e))?;
            conn.message(message).await.map_err(|e| classify(&e))?;
            Ok(results)
        };
        match tokio::time::timeout(self.inner.timeout, work).await {
            Ok(Ok(results)) => {
                let mut idle = self.inner.idle.lock().expect("smtp pool");
                if idle.len() < self.inner.max_idle {
                    idle.push((conn, Instant::now()));
                }
                Ok(results)
            }
            Ok(Err(e)) => {
                conn.abort().await;
                Err(e)
            }
            Err(_) => {
                conn.abort().await;
                Err(SmtpError::Connection(format!(
                    "{}: no answer within {:?}",
                    self.inner.relay, self.inner.timeout
                )))
            }
        }
    }
}

/// A failure while sending a mail.
fn classify(e: &lettre::transport::smtp::Error) -> SmtpError {
    if e.is_permanent() {
        SmtpError::Permanent(error_chain(e))
    } else if e.is_transient() {
        SmtpError::Temporary(error_chain(e))
    } else {
        SmtpError::Connection(error_chain(e))
    }
}

/// A failure while setting up a connection: nothing was handed over yet.
fn classify_setup(e: &lettre::transport::smtp::Error) -> SmtpError {
    if e.is_permanent() {
        SmtpError::Permanent(error_chain(e))
    } else {
        SmtpError::Unreachable(error_chain(e))
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

/// A recipient for `send_each`: an address, or a bare local part
/// (the router's `mailto:ops`, which mail2alert handed to the relay as it
/// was, for the relay to qualify).
enum RcptAddress {
    Full(Address),
    Bare(String),
}

impl RcptAddress {
    fn parse(a: &str) -> Result<RcptAddress, SmtpError> {
        let atom = |c: char| c.is_ascii_alphanumeric() || "!#$&'*+-/=^_`{|}~.".contains(c);
        if !a.contains('@') && !a.is_empty() && a.len() <= 64 && a.chars().all(atom) {
            return Ok(RcptAddress::Bare(a.to_string()));
        }
        parse_address(a).map(RcptAddress::Full)
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
