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
#[derive(Debug, thiserror::Error)]
pub enum SmtpError {
    #[error("SMTP configuration: {0}")]
    Config(String),
    #[error("invalid envelope address {address:?}: {reason}")]
    Address { address: String, reason: String },
    /// A 4xx reply: the server did not take the mail; try again later.
    /// From [`Outbound::send`]: a 4xx to RCPT, about this mail's recipient.
    #[error("temporary SMTP failure: {0}")]
    Temporary(String),
    /// A 5xx reply: the server refuses this mail; retrying as is will not help.
    #[error("permanent SMTP failure: {0}")]
    Permanent(String),
    /// This mail cannot go through this relay at all (found before it was
    /// offered): nothing was handed over.
    #[error("this mail cannot go through this relay: {0}")]
    Unsendable(String),
    /// The relay could not be reached at all: nothing was handed over.
    #[error("SMTP relay unreachable: {0}")]
    Unreachable(String),
    /// The relay answered 421, another 4xx outside RCPT, or the connection
    /// broke before the end of the data was written (from
    /// [`Outbound::send`]): nothing was handed over.
    #[error("SMTP relay not taking mail now (nothing was handed over): {0}")]
    RelayUnavailable(String),
    /// The relay refused the session itself (5xx to the greeting, EHLO or
    /// AUTH; from [`Outbound::send`]): nothing was handed over.
    #[error("SMTP relay refused the session: {0}")]
    RelayRefused(String),
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
            SmtpError::Temporary(_)
                | SmtpError::Unreachable(_)
                | SmtpError::RelayUnavailable(_)
                | SmtpError::Connection(_)
        )
    }

    /// The server may have accepted the mail although we saw no success.
    pub fn delivery_unknown(&self) -> bool {
        matches!(self, SmtpError::Connection(_))
    }

    /// A failure of the relay (or of our settings for it), not of one mail:
    /// the mails after it would fail the same way, so a batch stops.
    pub fn is_relay_failure(&self) -> bool {
        matches!(
            self,
            SmtpError::Config(_)
                | SmtpError::Unreachable(_)
                | SmtpError::RelayUnavailable(_)
                | SmtpError::RelayRefused(_)
                | SmtpError::Connection(_)
        )
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
    idle: Mutex<Vec<(Conn, Instant)>>,
    relay: String,
    /// The notifier's `smtp.max_message_size` (`None`: no own limit).
    max_message_size: Option<usize>,
}

/// An open session with what [`Outbound::send`] needs to know about it.
struct Conn {
    smtp: AsyncSmtpConnection,
    /// The relay announced `SIZE` (RFC 1870), with this limit (`None`: no
    /// limit, `SIZE 0` or no number).
    size: Option<Option<usize>>,
    io: Arc<IoState>,
}

/// What the socket saw, read after a failure to tell "the end of the data
/// was never written" from "written, but no reply came".
#[derive(Debug, Default)]
struct IoState {
    /// The last write or flush failed or had not completed: bytes handed
    /// to it may not have reached the kernel.
    write_unfinished: AtomicBool,
}

impl IoState {
    fn note<T>(&self, r: &std::task::Poll<std::io::Result<T>>) {
        let unfinished = !matches!(r, std::task::Poll::Ready(Ok(_)));
        self.write_unfinished.store(unfinished, Ordering::Relaxed);
    }

    fn write_unfinished(&self) -> bool {
        self.write_unfinished.load(Ordering::Relaxed)
    }
}

/// A socket lettre can drive (`AsyncTokioStream` is lettre's trait for
/// caller-provided streams).
#[derive(Debug)]
struct Plain(TcpStream, Arc<IoState>);

#[derive(Debug)]
struct Wrapped(tokio_native_tls::TlsStream<TcpStream>, Arc<IoState>);

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
                let r = std::pin::Pin::new(&mut self.0).poll_write(cx, buf);
                self.1.note(&r);
                r
            }
            fn poll_flush(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                let r = std::pin::Pin::new(&mut self.0).poll_flush(cx);
                self.1.note(&r);
                r
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

    /// Opens, greets, secures and authenticates a new connection. Nothing
    /// can have been delivered when this fails.
    async fn connect(&self) -> Result<Conn, SmtpError> {
        use lettre::transport::smtp::commands::Ehlo;
        let i = &self.inner;
        let unreachable = |e: String| SmtpError::Unreachable(format!("{}: {e}", i.relay));
        let io = Arc::new(IoState::default());
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
                    io.clone(),
                )),
                None => Box::new(Plain(tcp, io.clone())),
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
            // lettre keeps only the EHLO keywords it uses itself; SIZE's
            // limit needs the reply. Asked once more (allowed any time,
            // RFC 5321 4.1.4), before AUTH.
            let ehlo = conn
                .command(Ehlo::new(i.hello.clone()))
                .await
                .map_err(|e| classify_setup(&e))?;
            let size = ehlo.message().skip(1).find_map(|line| {
                let mut words = line.split_whitespace();
                let keyword = words.next()?;
                keyword.eq_ignore_ascii_case("SIZE").then(|| {
                    words
                        .next()
                        .and_then(|n| n.parse::<usize>().ok())
                        .filter(|n| *n > 0)
                })
            });
            if let Some(creds) = &i.credentials {
                conn.auth(&[Mechanism::Plain, Mechanism::Login], creds)
                    .await
                    .map_err(|e| classify_setup(&e))?;
            }
            Ok(Conn {
                smtp: conn,
                size,
                io: io.clone(),
            })
        };
        tokio::time::timeout(i.timeout, work)
            .await
            .map_err(|_| unreachable("timed out while connecting".into()))?
    }

    /// A pooled connection that still answers, or a new one.
    async fn checkout(&self) -> Result<Conn, SmtpError> {
        loop {
            let pooled = self.inner.idle.lock().expect("smtp pool").pop();
            let Some((mut conn, since)) = pooled else {
                return self.connect().await;
            };
            if since.elapsed() < CHECK_AFTER_IDLE {
                return Ok(conn);
            }
            let alive = tokio::time::timeout(self.inner.timeout, conn.smtp.test_connected()).await;
            if matches!(alive, Ok(true)) {
                return Ok(conn);
            }
            self.discard(conn).await;
        }
    }

    /// Returns a healthy connection to the pool.
    fn put_back(&self, conn: Conn) {
        let mut idle = self.inner.idle.lock().expect("smtp pool");
        if idle.len() < self.inner.max_idle {
            idle.push((conn, Instant::now()));
        }
    }

    /// Closes a connection that is not reused. lettre's `abort` says QUIT
    /// and waits for the reply: bounded, since the relay may not answer.
    async fn discard(&self, mut conn: Conn) {
        let wait = self.inner.timeout.min(Duration::from_secs(5));
        let _ = tokio::time::timeout(wait, conn.smtp.abort()).await;
    }

    /// Sends one finished message. `Ok` means the relay accepted it (250
    /// after DATA), with the envelope recipients it refused at RCPT while
    /// taking others (as Python's `smtplib.sendmail`, which the old tool
    /// used, it goes to the accepted ones). The error says whose failure it
    /// was and whether the mail may have been handed over (see the module
    /// documentation).
    pub async fn send(
        &self,
        from: &str,
        to: &[String],
        message: &[u8],
    ) -> Result<Vec<RefusedRecipient>, SmtpError> {
        use lettre::transport::smtp::commands::{Data, Mail, Rcpt, Rset};
        use lettre::transport::smtp::extension::{Extension, MailBodyParameter, MailParameter};

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
        // The session, not this mail, failed here.
        let mut conn = self.checkout().await.map_err(|e| match e {
            SmtpError::Permanent(why) => SmtpError::RelayRefused(why),
            other => other,
        })?;

        // What the relay announced rules some mails out before they are
        // offered (lettre's own `send` checks the first two the same way).
        let info = conn.smtp.server_info();
        let utf8 = envelope
            .from()
            .into_iter()
            .chain(envelope.to())
            .any(|a| !AsRef::<str>::as_ref(a).is_ascii());
        let eight_bit = !message.is_ascii();
        // SIZE counts the message with its final CRLF.
        let octets = message.len() + 2;
        let unsendable = if utf8 && !info.supports_feature(Extension::SmtpUtfEight) {
            Some(format!(
                "an envelope address is not ASCII ({}) and {} does not offer SMTPUTF8",
                envelope_text(&envelope),
                self.inner.relay
            ))
        } else if eight_bit && !info.supports_feature(Extension::EightBitMime) {
            Some(format!(
                "the message has 8-bit data and {} does not offer 8BITMIME",
                self.inner.relay
            ))
        } else if let Some(Some(limit)) = conn.size.filter(|l| l.is_some_and(|l| octets > l)) {
            Some(format!(
                "the message is {octets} bytes, over the SIZE limit of {limit} that {} announced",
                self.inner.relay
            ))
        } else {
            self.inner
                .max_message_size
                .filter(|m| octets > *m)
                .map(|max| {
                    format!("the message is {octets} bytes, over smtp.max_message_size ({max})")
                })
        };
        if let Some(why) = unsendable {
            self.put_back(conn);
            return Err(SmtpError::Unsendable(why));
        }

        let mut step = Step::Mail;
        let work = async {
            let mut params = Vec::new();
            if utf8 {
                params.push(MailParameter::SmtpUtfEight);
            }
            if eight_bit {
                params.push(MailParameter::Body(MailBodyParameter::EightBitMime));
            }
            if conn.size.is_some() {
                params.push(MailParameter::Size(octets));
            }
            conn.smtp
                .command(Mail::new(envelope.from().cloned(), params))
                .await
                .map_err(|e| classify_step(&e, Step::Mail, false))?;
            step = Step::Rcpt;
            let mut refused: Vec<RefusedRecipient> = Vec::new();
            for address in envelope.to() {
                if let Err(e) = conn.smtp.command(Rcpt::new(address.clone(), vec![])).await {
                    match classify_step(&e, Step::Rcpt, false) {
                        e @ (SmtpError::Permanent(_) | SmtpError::Temporary(_)) => {
                            refused.push(RefusedRecipient {
                                address: address.to_string(),
                                error: e,
                            })
                        }
                        other => return Err(other),
                    }
                }
            }
            if refused.len() == envelope.to().len() {
                // Nobody takes it: a 4xx among the refusals makes the whole
                // mail worth another try.
                let pick = refused
                    .iter()
                    .position(|r| matches!(r.error, SmtpError::Temporary(_)))
                    .unwrap_or(0);
                return Err(refused.swap_remove(pick).error);
            }
            step = Step::Data;
            conn.smtp
                .command(Data)
                .await
                .map_err(|e| classify_step(&e, Step::Data, false))?;
            step = Step::Dot;
            conn.smtp
                .message(message)
                .await
                .map_err(|e| classify_step(&e, Step::Dot, conn.io.write_unfinished()))?;
            Ok(refused)
        };
        let result = tokio::time::timeout(self.inner.timeout, work).await;
        let err = match result {
            Ok(Ok(refused)) => {
                self.put_back(conn);
                return Ok(refused);
            }
            Ok(Err(e)) => e,
            Err(_) => {
                let why = format!(
                    "{}: no answer within {:?}",
                    self.inner.relay, self.inner.timeout
                );
                if step == Step::Dot && !conn.io.write_unfinished() {
                    SmtpError::Connection(why)
                } else {
                    SmtpError::RelayUnavailable(why)
                }
            }
        };
        // After a refusal of this mail the session is fine: a refusal at
        // the end of the data ends the transaction, an earlier one is
        // undone by RSET. Keeping the connection keeps the next mail from
        // paying for a new one.
        let reusable = match (&err, step) {
            (SmtpError::Permanent(_) | SmtpError::Temporary(_), Step::Dot) => true,
            (SmtpError::Permanent(_) | SmtpError::Temporary(_), _) => matches!(
                tokio::time::timeout(self.inner.timeout, conn.smtp.command(Rset)).await,
                Ok(Ok(_))
            ),
            _ => false,
        };
        if reusable {
            self.put_back(conn);
        } else {
            self.discard(conn).await;
        }
        Err(err)
    }
}

/// The smaller of two optional limits.
fn min_limit(a: Option<usize>, b: Option<usize>) -> Option<usize> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// An envelope recipient the relay refused at RCPT while it took the mail
/// for others.
#[derive(Debug)]
pub struct RefusedRecipient {
    pub address: String,
    /// [`SmtpError::Permanent`] or [`SmtpError::Temporary`].
    pub error: SmtpError,
}

/// The step of a transaction a failure happened in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Mail,
    Rcpt,
    Data,
    /// Writing the message and its final dot, then awaiting the reply.
    Dot,
}

/// A failure of [`Outbound::send`] at `step`; `write_unfinished`: the
/// socket's last write had not completed, so the final dot cannot have
/// reached the relay.
fn classify_step(
    e: &lettre::transport::smtp::Error,
    step: Step,
    write_unfinished: bool,
) -> SmtpError {
    let text = error_chain(e);
    match e.status().map(u16::from) {
        // "Service not available, closing transmission channel".
        Some(421) => SmtpError::RelayUnavailable(text),
        Some(code) if code >= 500 => SmtpError::Permanent(text),
        // 450 mailbox busy, 451 greylisting, 452 too many recipients: about
        // this recipient. Not so when the enhanced code says the mail
        // system itself is in trouble (4.3.x, e.g. 452 4.3.1 storage).
        Some(_) if step == Step::Rcpt && !enhanced_class(e, "4.3.") => SmtpError::Temporary(text),
        // At MAIL, DATA or after the data, a 4xx is about the server
        // (RFC 5321 4.3.2: local error, insufficient storage).
        Some(_) => SmtpError::RelayUnavailable(text),
        // No reply: a lost connection or garbage. Only once the final dot
        // was written may the relay have taken the mail.
        None if step == Step::Dot && !write_unfinished => SmtpError::Connection(text),
        None => SmtpError::RelayUnavailable(text),
    }
}

/// The reply's enhanced status code (RFC 3463) starts with `prefix`.
fn enhanced_class(e: &lettre::transport::smtp::Error, prefix: &str) -> bool {
    use std::error::Error as _;
    e.source()
        .is_some_and(|text| text.to_string().trim_start().starts_with(prefix))
}

/// The envelope's addresses, for messages.
fn envelope_text(envelope: &Envelope) -> String {
    envelope
        .from()
        .into_iter()
        .chain(envelope.to())
        .filter(|a| !AsRef::<str>::as_ref(*a).is_ascii())
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(", ")
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
        let mut pooled = self.checkout().await?;
        let conn = &mut pooled.smtp;
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
                self.put_back(pooled);
                Ok(results)
            }
            Ok(Err(e)) => {
                self.discard(pooled).await;
                Err(e)
            }
            Err(_) => {
                self.discard(pooled).await;
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
