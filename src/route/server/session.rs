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
//!
//! Bounded reading (lines, DATA) is in [`read`], the AUTH exchange in
//! [`auth`]; this file is the state machine.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use base64::Engine;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use super::clients::OpenConnections;
use super::command::{self, printable, Command};
use super::SessionConfig;
use crate::route::limit::WarnLimiter;
use crate::route::{Envelope, Inbound};
use crate::shared::shutdown::Shutdown;

mod auth;
mod read;

pub use read::{read_data, DataRead};
use read::{read_line, LineRead};

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
    stop: Shutdown,
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
    /// The ticket when the recipient is a VERP bounce address
    /// (`route::verp`): then it is the only recipient.
    bounce: Option<crate::notify::ticket::Ticket>,
}

struct Session {
    rd: BufReader<Conn>,
    /// Replies not yet flushed (PIPELINING answers a batch at once).
    out: Vec<u8>,
    peer: SocketAddr,
    cfg: Arc<SessionConfig>,
    clients: Arc<OpenConnections>,
    stop: Shutdown,
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
            _ = stop.recv(), if idle => Ok(Incoming::Stop),
        }
    }

    async fn serve(&mut self) -> io::Result<()> {
        let host = self.cfg.hostname.clone();
        self.reply(&format!("220 {host} ESMTP mailgend route"));
        loop {
            if self.stop.is_shutdown() && self.txn.is_none() {
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
                        bounce: None,
                    });
                    self.reply("250 2.1.0 Ok");
                }
            }
            Command::Rcpt(to) => {
                let max = self.cfg.settings.max_recipients;
                let bounce = match (&self.cfg.bounces, &self.txn) {
                    (Some(b), Some(_)) => b.rcpt(&to).await,
                    _ => crate::route::verp::Rcpt::NotOurs,
                };
                match (self.txn.as_mut(), bounce) {
                    (None, _) => self.reply("503 5.5.1 Need MAIL command first"),
                    (Some(t), _) if t.rcpt_to.len() >= max => {
                        self.reply("452 4.5.3 Too many recipients")
                    }
                    (Some(_), crate::route::verp::Rcpt::Refused(line)) => self.reply(&line),
                    // A bounce goes alone (route::verp): the client sends
                    // the rest in another transaction.
                    (Some(t), crate::route::verp::Rcpt::Bounce(_)) if !t.rcpt_to.is_empty() => {
                        self.reply("452 4.5.3 A bounce address takes a transaction of its own")
                    }
                    (Some(t), crate::route::verp::Rcpt::NotOurs) if t.bounce.is_some() => {
                        self.reply("452 4.5.3 A bounce address takes a transaction of its own")
                    }
                    (Some(t), crate::route::verp::Rcpt::Bounce(ticket)) => {
                        t.rcpt_to.push(to);
                        t.bounce = Some(ticket);
                        self.reply("250 2.1.5 Ok");
                    }
                    (Some(t), crate::route::verp::Rcpt::NotOurs) => {
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
        let bounce = txn.bounce.clone();
        let inbound = Inbound {
            envelope: Envelope {
                peer: self.peer,
                mail_from: txn.mail_from,
                rcpt_to: txn.rcpt_to,
            },
            data: Arc::new(stamped),
            id: Some(id),
        };
        let reply = match (bounce, &self.cfg.bounces) {
            (Some(ticket), Some(b)) => b.receive(&inbound, &ticket).await,
            _ => self.cfg.accept.accept(inbound).await,
        };
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
}

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
