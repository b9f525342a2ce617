//! One inbound SMTP connection: the RFC 5321 state machine with
//! PIPELINING, 8BITMIME, SIZE, STARTTLS (RFC 3207) and AUTH PLAIN/LOGIN
//! (RFC 4954).
//!
//! Every read is bounded: command lines by [`MAX_COMMAND_LINE`], message
//! lines by [`MAX_DATA_LINE`], the message by the configured size (the rest
//! is read and dropped to stay in sync, then refused), and every wait by
//! the command timeout. Whatever a client sends, it gets a proper SMTP
//! reply or the connection closes; nothing it sends can panic the task.
//!
//! Line ends: command lines may end in a bare LF (harmless, and some
//! scripts do it). In message data a bare LF or a bare CR ends the session
//! with a 554 at once, as Postfix's `smtpd_forbid_bare_newline` does:
//! where the data ends would be ambiguous, and that ambiguity is what SMTP
//! smuggling uses (one server sees `<LF>.<LF>` or `<CR>.<CR>` as the end,
//! the next does not), so no later byte of that connection can be trusted
//! as a command, and relaying such bytes would hand the ambiguity on. Only
//! `<CR><LF>.<CR><LF>` ends the data.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use base64::Engine;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::clients::OpenConnections;
use super::command::{self, printable, Command};
use super::SessionConfig;
use crate::route::limit::WarnLimiter;
use crate::route::{Envelope, Inbound};

/// Longest command line (RFC 5321 allows 512 octets; AUTH responses and
/// long addresses with parameters need a bit more).
pub const MAX_COMMAND_LINE: usize = 4096;
/// Longest line of message data. RFC 5322 says 998 octets, but real
/// generators (HTML mails) write longer lines; beyond this the message is
/// refused rather than buffered.
pub const MAX_DATA_LINE: usize = 1024 * 1024;
/// Bad commands before we hang up (a client talking another protocol).
const MAX_ERRORS: u32 = 20;
/// Failed AUTH attempts before we hang up.
const MAX_AUTH_FAILURES: u32 = 3;

/// A socket before or after STARTTLS.
enum Conn {
    Plain(TcpStream),
    Tls(Box<tokio_native_tls::TlsStream<TcpStream>>),
    /// Only while switching to TLS.
    Gone,
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Gone => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, b),
            Conn::Tls(s) => Pin::new(s).poll_write(cx, b),
            Conn::Gone => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s).poll_flush(cx),
            Conn::Gone => Poll::Ready(Ok(())),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Gone => Poll::Ready(Ok(())),
        }
    }
}

/// The outcome of reading one line.
#[derive(Debug, PartialEq, Eq)]
enum LineRead {
    /// A complete line (with its LF) is in the buffer.
    Line,
    /// Longer than the limit; it was read to its end and dropped.
    TooLong,
    /// The client closed the connection (possibly mid-line).
    Eof,
}

/// Reads one line of at most `limit` octets into `buf` without ever
/// holding more than that.
async fn read_line<R: AsyncBufRead + Unpin>(
    rd: &mut R,
    buf: &mut Vec<u8>,
    limit: usize,
) -> io::Result<LineRead> {
    let mut overflow = false;
    loop {
        let avail = rd.fill_buf().await?;
        if avail.is_empty() {
            return Ok(LineRead::Eof);
        }
        let (take, complete) = match avail.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (avail.len(), false),
        };
        if !overflow {
            if buf.len() + take <= limit {
                buf.extend_from_slice(&avail[..take]);
            } else {
                overflow = true;
                buf.clear();
            }
        }
        rd.consume(take);
        if complete {
            return Ok(if overflow {
                LineRead::TooLong
            } else {
                LineRead::Line
            });
        }
    }
}

/// What became of a DATA phase.
#[derive(Debug, PartialEq, Eq)]
pub enum DataRead {
    Message(Vec<u8>),
    TooBig,
    LineTooLong,
    /// A LF without CR, or a CR without LF.
    BareLineEnd,
    Eof,
    Timeout,
    /// `data-timeout` passed (the session's own deadline, not a read's).
    Deadline,
}

/// Reads message data up to the `.` line, undoing dot-stuffing, keeping at
/// most `max` octets.
pub async fn read_data<R: AsyncBufRead + Unpin>(
    rd: &mut R,
    max: usize,
    timeout: std::time::Duration,
) -> io::Result<DataRead> {
    let mut data = Vec::new();
    let mut line = Vec::new();
    let (mut too_big, mut too_long) = (false, false);
    loop {
        line.clear();
        let read =
            match tokio::time::timeout(timeout, read_line(rd, &mut line, MAX_DATA_LINE)).await {
                Ok(r) => r?,
                Err(_) => return Ok(DataRead::Timeout),
            };
        match read {
            LineRead::Eof => return Ok(DataRead::Eof),
            LineRead::TooLong => {
                too_long = true;
                continue;
            }
            LineRead::Line => {}
        }
        // The line ends at its first LF, so a bare LF shows as a missing
        // CR before it; a bare CR is one anywhere before the final CRLF.
        if !line.ends_with(b"\r\n") || line[..line.len() - 2].contains(&b'\r') {
            return Ok(DataRead::BareLineEnd);
        }
        if line == b".\r\n" {
            break;
        }
        let part = line.strip_prefix(b".").unwrap_or(&line);
        if too_big || data.len() + part.len() > max {
            // Keep reading to the end to stay in sync, but keep nothing.
            too_big = true;
            data = Vec::new();
        } else {
            data.extend_from_slice(part);
        }
    }
    Ok(if too_long {
        DataRead::LineTooLong
    } else if too_big {
        DataRead::TooBig
    } else {
        DataRead::Message(data)
    })
}

/// Says `line` and hangs up (connection limit).
pub(super) async fn refuse(mut socket: TcpStream, line: String) {
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        socket.write_all(format!("{line}\r\n").as_bytes()).await?;
        socket.shutdown().await
    })
    .await;
}

/// Serves one connection to its end.
pub(super) async fn run(
    socket: TcpStream,
    peer: SocketAddr,
    cfg: Arc<SessionConfig>,
    clients: Arc<OpenConnections>,
    stop: watch::Receiver<bool>,
) {
    debug!(%peer, "SMTP connection");
    let mut s = Session {
        rd: BufReader::new(Conn::Plain(socket)),
        out: Vec::new(),
        peer,
        cfg,
        clients,
        stop,
        helo: None,
        tls_active: false,
        authed: false,
        auth_failures: 0,
        errors: 0,
        txn: None,
        messages: 0,
    };
    match s.serve().await {
        Ok(()) => debug!(%peer, "SMTP connection closed"),
        Err(e) => debug!(%peer, "SMTP connection ended: {e}"),
    }
    let _ =
        tokio::time::timeout(std::time::Duration::from_secs(2), s.rd.get_mut().shutdown()).await;
}

struct Transaction {
    mail_from: Option<String>,
    rcpt_to: Vec<String>,
}

struct Session {
    rd: BufReader<Conn>,
    /// Replies not yet flushed (PIPELINING answers a batch at once).
    out: Vec<u8>,
    peer: SocketAddr,
    cfg: Arc<SessionConfig>,
    clients: Arc<OpenConnections>,
    stop: watch::Receiver<bool>,
    helo: Option<String>,
    tls_active: bool,
    authed: bool,
    auth_failures: u32,
    errors: u32,
    txn: Option<Transaction>,
    messages: usize,
}

/// What to do after a command.
enum Next {
    Continue,
    Close,
}

/// What waiting for the next line brought.
enum Incoming {
    Line(Vec<u8>),
    TooLong,
    Eof,
    Timeout,
    Stop,
}

impl Session {
    fn reply(&mut self, line: &str) {
        self.out.extend_from_slice(line.as_bytes());
        self.out.extend_from_slice(b"\r\n");
    }

    async fn flush(&mut self) -> io::Result<()> {
        if !self.out.is_empty() {
            let out = std::mem::take(&mut self.out);
            let w = self.rd.get_mut();
            tokio::time::timeout(self.cfg.settings.command_timeout, async {
                w.write_all(&out).await?;
                w.flush().await
            })
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "client does not read"))??;
        }
        Ok(())
    }

    /// The next line, flushing pending replies first unless more
    /// pipelined commands are already buffered. Between transactions a
    /// stop request ends the wait.
    async fn next_line(&mut self, limit: usize) -> io::Result<Incoming> {
        if !self.rd.buffer().contains(&b'\n') {
            self.flush().await?;
        }
        let idle = self.txn.is_none();
        let timeout = self.cfg.settings.command_timeout;
        let mut buf = Vec::new();
        let Session { rd, stop, .. } = self;
        tokio::select! {
            r = tokio::time::timeout(timeout, read_line(rd, &mut buf, limit)) => match r {
                Err(_) => Ok(Incoming::Timeout),
                Ok(r) => Ok(match r? {
                    LineRead::Line => Incoming::Line(buf),
                    LineRead::TooLong => Incoming::TooLong,
                    LineRead::Eof => Incoming::Eof,
                }),
            },
            _ = stop.wait_for(|s| *s), if idle => Ok(Incoming::Stop),
        }
    }

    async fn serve(&mut self) -> io::Result<()> {
        let host = self.cfg.hostname.clone();
        self.reply(&format!("220 {host} ESMTP mailgend route"));
        loop {
            if *self.stop.borrow() && self.txn.is_none() {
                self.reply(&format!("421 4.3.2 {host} Service shutting down"));
                return self.flush().await;
            }
            let line = match self.next_line(MAX_COMMAND_LINE).await? {
                Incoming::Line(l) => l,
                Incoming::TooLong => {
                    self.reply("500 5.5.2 Line too long");
                    if self.count_error() {
                        return self.flush().await;
                    }
                    continue;
                }
                Incoming::Eof => return Ok(()),
                Incoming::Timeout => {
                    self.reply(&format!("421 4.4.2 {host} Timeout, closing connection"));
                    return self.flush().await;
                }
                Incoming::Stop => continue,
            };
            match command::parse(&line) {
                Err(e) => {
                    self.reply(&e.reply());
                    if self.count_error() {
                        return self.flush().await;
                    }
                }
                Ok(cmd) => {
                    if let Next::Close = self.command(cmd).await? {
                        return self.flush().await;
                    }
                }
            }
        }
    }

    /// Counts a bad command; true when it is time to hang up.
    fn count_error(&mut self) -> bool {
        self.errors += 1;
        if self.errors >= MAX_ERRORS {
            self.reply("421 4.7.0 Too many errors, closing connection");
            return true;
        }
        false
    }

    fn auth_offered(&self) -> bool {
        self.cfg.settings.auth.is_some() && (self.tls_active || self.peer.ip().is_loopback())
    }

    async fn command(&mut self, cmd: Command) -> io::Result<Next> {
        let host = self.cfg.hostname.clone();
        match cmd {
            Command::Ehlo(name) => {
                let mut lines = vec![
                    format!("{host} greets {}", printable(&name, 64)),
                    "PIPELINING".to_string(),
                    "8BITMIME".to_string(),
                    format!("SIZE {}", self.cfg.settings.max_message_size),
                    "ENHANCEDSTATUSCODES".to_string(),
                ];
                if self.cfg.tls.is_some() && !self.tls_active {
                    lines.push("STARTTLS".into());
                }
                if self.auth_offered() {
                    lines.push("AUTH PLAIN LOGIN".into());
                }
                lines.push("HELP".into());
                let last = lines.len() - 1;
                for (i, l) in lines.iter().enumerate() {
                    let sep = if i == last { ' ' } else { '-' };
                    self.reply(&format!("250{sep}{l}"));
                }
                self.helo = Some(name);
                self.txn = None;
            }
            Command::Helo(name) => {
                self.reply(&format!("250 {host}"));
                self.helo = Some(name);
                self.txn = None;
            }
            Command::Mail { from, size } => {
                let max = self.cfg.settings.max_message_size;
                if self.helo.is_none() {
                    self.reply("503 5.5.1 Send EHLO/HELO first");
                } else if self.txn.is_some() {
                    self.reply("503 5.5.1 Nested MAIL command");
                } else if self.cfg.settings.auth.is_some() && !self.authed {
                    self.reply("530 5.7.0 Authentication required");
                } else if self.cfg.settings.max_messages_per_connection > 0
                    && self.messages >= self.cfg.settings.max_messages_per_connection
                {
                    self.reply("421 4.7.0 Too many messages on this connection, reconnect");
                    return Ok(Next::Close);
                } else if size.is_some_and(|n| n > max) {
                    self.reply(&format!(
                        "552 5.3.4 Message size exceeds fixed maximum message size ({max})"
                    ));
                } else {
                    self.txn = Some(Transaction {
                        mail_from: from,
                        rcpt_to: Vec::new(),
                    });
                    self.reply("250 2.1.0 Ok");
                }
            }
            Command::Rcpt(to) => {
                let max = self.cfg.settings.max_recipients;
                match self.txn.as_mut() {
                    None => self.reply("503 5.5.1 Need MAIL command first"),
                    Some(t) if t.rcpt_to.len() >= max => {
                        self.reply("452 4.5.3 Too many recipients")
                    }
                    Some(t) => {
                        t.rcpt_to.push(to);
                        self.reply("250 2.1.5 Ok");
                    }
                }
            }
            Command::Data => return self.data().await,
            Command::Rset => {
                self.txn = None;
                self.reply("250 2.0.0 Ok");
            }
            Command::Noop => self.reply("250 2.0.0 Ok"),
            Command::Quit => {
                self.reply(&format!("221 2.0.0 {host} closing connection"));
                return Ok(Next::Close);
            }
            Command::Vrfy => self
                .reply("252 2.5.2 Cannot VRFY user, but will accept message and attempt delivery"),
            Command::Help => {
                self.reply("214 2.0.0 mailgend route: RFC 5321 with PIPELINING, SIZE, 8BITMIME")
            }
            Command::NotImplemented(_) => self.reply("502 5.5.1 Command not implemented"),
            Command::StartTls => return self.starttls().await,
            Command::Auth { mechanism, initial } => return self.auth(&mechanism, initial).await,
        }
        Ok(Next::Continue)
    }

    async fn data(&mut self) -> io::Result<Next> {
        let Some(txn) = &self.txn else {
            self.reply("503 5.5.1 Need MAIL command first");
            return Ok(Next::Continue);
        };
        if txn.rcpt_to.is_empty() {
            // 554, not 503: with PIPELINING the client sent DATA before
            // learning that every RCPT failed (RFC 2920 §3.1).
            self.reply("554 5.5.1 No valid recipients");
            return Ok(Next::Continue);
        }
        self.reply("354 End data with <CR><LF>.<CR><LF>");
        self.flush().await?;
        let max = self.cfg.settings.max_message_size;
        let timeout = self.cfg.settings.command_timeout;
        let deadline = self.cfg.settings.data_timeout;
        // However the client paces its lines, DATA ends by the deadline:
        // a line every few seconds must not hold a slot for hours.
        let read = match tokio::time::timeout(deadline, read_data(&mut self.rd, max, timeout)).await
        {
            Ok(r) => r?,
            Err(_) => DataRead::Deadline,
        };
        let txn = self.txn.take().expect("checked above");
        let data = match read {
            DataRead::Message(d) => d,
            DataRead::Deadline => {
                info!(peer = %self.peer, ?deadline, "DATA not finished within data-timeout; nothing accepted");
                self.reply(&format!(
                    "421 4.4.2 {} DATA not finished within {}s, closing connection",
                    self.cfg.hostname,
                    deadline.as_secs()
                ));
                return Ok(Next::Close);
            }
            DataRead::Eof => {
                info!(peer = %self.peer, "client left during DATA; nothing accepted");
                return Ok(Next::Close);
            }
            DataRead::Timeout => {
                self.reply(&format!(
                    "421 4.4.2 {} Timeout during DATA, closing connection",
                    self.cfg.hostname
                ));
                return Ok(Next::Close);
            }
            DataRead::TooBig => {
                self.cfg.metrics.message_replied(552);
                self.reply(&format!(
                    "552 5.3.4 Message size exceeds fixed maximum message size ({max})"
                ));
                return Ok(Next::Continue);
            }
            DataRead::LineTooLong => {
                self.cfg.metrics.message_replied(554);
                self.reply(&format!(
                    "554 5.6.0 Message has a line longer than {MAX_DATA_LINE} octets"
                ));
                return Ok(Next::Continue);
            }
            DataRead::BareLineEnd => {
                // Where this data ends is ambiguous: hang up (see above).
                self.cfg.metrics.message_replied(554);
                self.reply(
                    "554 5.5.2 Bare CR or LF in message data; lines must end with CRLF. Closing connection",
                );
                return Ok(Next::Close);
            }
        };
        let hops = received_count(&data);
        if hops >= self.cfg.settings.max_received {
            // A mail loop (or a very long path): as Postfix's
            // hopcount_limit, refused before anything else looks at it.
            self.cfg.metrics.message_replied(554);
            warn!(peer = %self.peer, hops, "refused a message with too many Received: lines (mail loop?)");
            self.reply(&format!(
                "554 5.4.6 Too many hops ({hops} Received: lines; limit {})",
                self.cfg.settings.max_received
            ));
            return Ok(Next::Continue);
        }
        let id = self.cfg.accept.new_id();
        let mut stamped = self.received_line(&id, &txn.rcpt_to).into_bytes();
        stamped.extend_from_slice(&data);
        let inbound = Inbound {
            envelope: Envelope {
                peer: self.peer,
                mail_from: txn.mail_from,
                rcpt_to: txn.rcpt_to,
            },
            data: Arc::new(stamped),
            id: Some(id),
        };
        let reply = self.cfg.accept.accept(inbound).await;
        self.cfg.metrics.message_replied(reply.code);
        self.messages += 1;
        self.reply(&reply.line());
        Ok(Next::Continue)
    }

    /// Our trace field (RFC 5321 §4.4): who gave us the message, by
    /// which protocol, under which id (the spool id, also in our log),
    /// for whom when there is one recipient, and when.
    fn received_line(&self, id: &str, rcpt_to: &[String]) -> String {
        let helo = self
            .helo
            .as_deref()
            .filter(|h| h.chars().all(|c| c.is_ascii_graphic()))
            .unwrap_or("unknown");
        let ip = match self.peer.ip() {
            std::net::IpAddr::V4(a) => a.to_string(),
            std::net::IpAddr::V6(a) => format!("IPv6:{a}"),
        };
        // RFC 3848 protocol names.
        let with = match (self.tls_active, self.authed) {
            (false, false) => "ESMTP",
            (true, false) => "ESMTPS",
            (false, true) => "ESMTPA",
            (true, true) => "ESMTPSA",
        };
        let for_clause = match rcpt_to {
            [one] => format!("\r\n\tfor <{one}>"),
            _ => String::new(),
        };
        format!(
            "Received: from {helo} ([{ip}])\r\n\tby {} (mailgend route) with {with} id {id}{for_clause};\r\n\t{}\r\n",
            self.cfg.hostname,
            chrono::Utc::now().to_rfc2822()
        )
    }

    async fn starttls(&mut self) -> io::Result<Next> {
        let Some(acceptor) = self.cfg.tls.clone() else {
            self.reply("502 5.5.1 STARTTLS not offered");
            return Ok(Next::Continue);
        };
        if self.tls_active {
            self.reply("503 5.5.1 TLS already active");
            return Ok(Next::Continue);
        }
        self.reply("220 2.0.0 Ready to start TLS");
        self.flush().await?;
        // Anything the client pipelined after STARTTLS came in clear text
        // and must not be taken as said under TLS (RFC 3207 §4.2,
        // CVE-2011-0411).
        let rd = std::mem::replace(&mut self.rd, BufReader::new(Conn::Gone));
        let Conn::Plain(tcp) = rd.into_inner() else {
            return Err(io::Error::other("STARTTLS on a non-plain connection"));
        };
        let tls =
            tokio::time::timeout(self.cfg.settings.command_timeout, acceptor.accept(tcp)).await;
        match tls {
            Ok(Ok(s)) => {
                self.rd = BufReader::new(Conn::Tls(Box::new(s)));
                self.tls_active = true;
                self.helo = None;
                self.txn = None;
                self.authed = false;
                Ok(Next::Continue)
            }
            Ok(Err(e)) => {
                info!(peer = %self.peer, "TLS handshake failed: {e}");
                Ok(Next::Close)
            }
            Err(_) => {
                info!(peer = %self.peer, "TLS handshake timed out");
                Ok(Next::Close)
            }
        }
    }

    async fn auth(&mut self, mechanism: &str, initial: Option<String>) -> io::Result<Next> {
        let Some(creds) = self.cfg.settings.auth.clone() else {
            self.reply("502 5.5.1 AUTH not offered");
            return Ok(Next::Continue);
        };
        if !self.auth_offered() {
            self.reply("538 5.7.11 Encryption required for requested authentication mechanism");
            return Ok(Next::Continue);
        }
        if self.authed {
            self.reply("503 5.5.1 Already authenticated");
            return Ok(Next::Continue);
        }
        if self.txn.is_some() || self.helo.is_none() {
            self.reply("503 5.5.1 AUTH only after EHLO and outside a mail transaction");
            return Ok(Next::Continue);
        }
        let settings = &self.cfg.settings;
        // Counted before the exchange: sessions in parallel share one
        // budget per address (see clients.rs).
        let attempt = match self.clients.auth_attempt(
            self.peer.ip(),
            settings.auth_failure_limit,
            settings.auth_failure_window,
        ) {
            Ok(a) => a,
            Err(left) => {
                static WARN: WarnLimiter = WarnLimiter::new(std::time::Duration::from_secs(60));
                if let Some(held_back) = WARN.allow() {
                    warn!(
                        peer = %self.peer,
                        held_back,
                        "AUTH refused: auth-failure-limit failed attempts from this address \
                         (at most one such WARN a minute; held_back counts the others)"
                    );
                }
                self.cfg.metrics.auth_refused();
                self.reply(&format!(
                    "421 4.7.0 {} Too many failed authentications from your address, try again in {}s",
                    self.cfg.hostname,
                    left.as_secs().max(1)
                ));
                return Ok(Next::Close);
            }
        };
        let (user, pass) = match mechanism {
            "PLAIN" => {
                let response = match initial {
                    Some(r) => r,
                    None => match self.challenge("").await? {
                        Challenge::Answer(r) => r,
                        c => return Ok(self.abandon(c)),
                    },
                };
                let Some(raw) = decode(&response) else {
                    self.reply("501 5.5.2 Cannot decode AUTH response");
                    return Ok(Next::Continue);
                };
                // authzid NUL authcid NUL passwd
                let mut parts = raw.split(|&b| b == 0);
                match (parts.next(), parts.next(), parts.next(), parts.next()) {
                    (Some(_), Some(u), Some(p), None) => (u.to_vec(), p.to_vec()),
                    _ => {
                        self.reply("501 5.5.2 Malformed AUTH PLAIN response");
                        return Ok(Next::Continue);
                    }
                }
            }
            "LOGIN" => {
                let user = match initial {
                    Some(r) => r,
                    // "Username:"
                    None => match self.challenge("VXNlcm5hbWU6").await? {
                        Challenge::Answer(r) => r,
                        c => return Ok(self.abandon(c)),
                    },
                };
                // "Password:"
                let pass = match self.challenge("UGFzc3dvcmQ6").await? {
                    Challenge::Answer(r) => r,
                    c => return Ok(self.abandon(c)),
                };
                match (decode(&user), decode(&pass)) {
                    (Some(u), Some(p)) => (u, p),
                    _ => {
                        self.reply("501 5.5.2 Cannot decode AUTH response");
                        return Ok(Next::Continue);
                    }
                }
            }
            _ => {
                self.reply("504 5.5.4 Unrecognized authentication type");
                return Ok(Next::Continue);
            }
        };
        if user == creds.username.as_bytes() && same(&pass, creds.password.as_bytes()) {
            attempt.succeeded();
            self.authed = true;
            self.reply("235 2.7.0 Authentication successful");
            return Ok(Next::Continue);
        }
        drop(attempt);
        self.auth_failures += 1;
        self.cfg.metrics.auth_failed();
        warn!(
            peer = %self.peer,
            user = %printable(&String::from_utf8_lossy(&user), 64),
            "SMTP authentication failed"
        );
        // Each failure costs more time (Postfix's smtpd_error_sleep_time):
        // guessing is slow even within the budget.
        let delay = self.cfg.settings.auth_failure_delay * self.auth_failures;
        self.flush().await?;
        tokio::time::sleep(delay).await;
        self.reply("535 5.7.8 Authentication credentials invalid");
        if self.auth_failures >= MAX_AUTH_FAILURES {
            self.reply("421 4.7.0 Too many authentication failures");
            return Ok(Next::Close);
        }
        Ok(Next::Continue)
    }

    /// Sends a `334` challenge and reads the client's answer. A `*`
    /// cancels (RFC 4954 §4).
    async fn challenge(&mut self, text: &str) -> io::Result<Challenge> {
        self.reply(&format!("334 {text}"));
        self.flush().await?;
        match self.next_line(MAX_COMMAND_LINE).await? {
            Incoming::Line(l) => {
                let l = String::from_utf8_lossy(&l).trim_end().to_string();
                if l == "*" {
                    // Cancelling is not a protocol error: go on serving.
                    return Ok(Challenge::Cancelled);
                }
                Ok(Challenge::Answer(l))
            }
            Incoming::TooLong => {
                self.reply("500 5.5.6 Authentication exchange line is too long");
                Ok(Challenge::Refused)
            }
            Incoming::Timeout => {
                self.reply("421 4.4.2 Timeout, closing connection");
                Ok(Challenge::End)
            }
            Incoming::Eof | Incoming::Stop => Ok(Challenge::End),
        }
    }
}

/// The client's answer to a `334` challenge.
enum Challenge {
    Answer(String),
    /// `*`: the exchange ends, the session not.
    Cancelled,
    /// An answer too long to read (already replied to); the session goes on.
    Refused,
    /// The session ends (timeout, EOF, shutdown).
    End,
}

impl Session {
    fn abandon(&mut self, c: Challenge) -> Next {
        match c {
            Challenge::Cancelled => {
                self.reply("501 5.7.0 Authentication cancelled");
                Next::Continue
            }
            Challenge::Refused => Next::Continue,
            _ => Next::Close,
        }
    }
}

/// Base64 of an AUTH response (`=` is the empty initial response).
/// `Received:` fields in the header block (up to the first empty line).
fn received_count(data: &[u8]) -> usize {
    let mut n = 0;
    for line in data.split(|&b| b == b'\n') {
        if line == b"\r" || line.is_empty() {
            break;
        }
        if line.len() >= 9 && line[..9].eq_ignore_ascii_case(b"received:") {
            n += 1;
        }
    }
    n
}

fn decode(s: &str) -> Option<Vec<u8>> {
    if s == "=" {
        return Some(Vec::new());
    }
    base64::engine::general_purpose::STANDARD.decode(s).ok()
}

/// Compares without an early exit, so timing does not tell how much of a
/// guessed password was right.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn lines_are_bounded() {
        let input: &[u8] = b"short\r\n0123456789abcdef\r\nnext\n";
        let mut rd = BufReader::with_capacity(4, input);
        let mut buf = Vec::new();
        assert_eq!(
            read_line(&mut rd, &mut buf, 10).await.unwrap(),
            LineRead::Line
        );
        assert_eq!(buf, b"short\r\n");
        buf.clear();
        assert_eq!(
            read_line(&mut rd, &mut buf, 10).await.unwrap(),
            LineRead::TooLong
        );
        assert!(buf.is_empty());
        assert_eq!(
            read_line(&mut rd, &mut buf, 10).await.unwrap(),
            LineRead::Line
        );
        assert_eq!(buf, b"next\n");
        buf.clear();
        assert_eq!(
            read_line(&mut rd, &mut buf, 10).await.unwrap(),
            LineRead::Eof
        );
    }

    async fn data(input: &[u8], max: usize) -> DataRead {
        let mut rd = BufReader::new(input);
        read_data(&mut rd, max, Duration::from_secs(1))
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn data_is_unstuffed_and_8bit_kept() {
        assert_eq!(
            data(b"Subject: x\r\n\r\n..dot\r\n\xff\xfe\r\n.\r\nQUIT\r\n", 100).await,
            DataRead::Message(b"Subject: x\r\n\r\n.dot\r\n\xff\xfe\r\n".to_vec())
        );
    }

    #[tokio::test]
    async fn data_refusals() {
        assert_eq!(data(b"0123456789\r\n.\r\n", 5).await, DataRead::TooBig);
        assert_eq!(data(b"a\nb\r\n.\r\n", 100).await, DataRead::BareLineEnd);
        // Refused at the first bare LF, before any "end" it may suggest.
        assert_eq!(data(b"a\r\n.\nRSET\r\n", 100).await, DataRead::BareLineEnd);
        // Bare CR: inside a line, and the <CR>.<CR> "end" some relays see.
        assert_eq!(data(b"a\rb\r\n.\r\n", 100).await, DataRead::BareLineEnd);
        assert_eq!(
            data(b"x\r\n\r.\rMAIL FROM:<e@x>\r\n.\r\n", 100).await,
            DataRead::BareLineEnd
        );
        assert_eq!(data(b"a\r\r\n.\r\n", 100).await, DataRead::BareLineEnd);
        assert_eq!(data(b"a\r\nno end", 100).await, DataRead::Eof);
        let mut long = vec![b'x'; MAX_DATA_LINE + 1];
        long.extend_from_slice(b"\r\n.\r\n");
        assert_eq!(data(&long, usize::MAX).await, DataRead::LineTooLong);
    }

    #[test]
    fn password_comparison() {
        assert!(same(b"secret", b"secret"));
        assert!(!same(b"secret", b"secreT"));
        assert!(!same(b"secret", b"secret2"));
        assert_eq!(decode("="), Some(vec![]));
        assert_eq!(decode("AGEAYg==").unwrap(), b"\0a\0b");
        assert_eq!(decode("!!"), None);
    }
}
