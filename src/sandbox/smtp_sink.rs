//! A real SMTP receiver on loopback that records every message.
//!
//! [`SmtpSink::start`] binds `127.0.0.1:0` and serves ESMTP on a thread of
//! its own with its own tokio runtime, so sync tests, `#[tokio::test]`s and
//! the demo can all use it without sharing a runtime with it. It speaks
//! enough of RFC 5321 for real clients (lettre, Python's `smtplib`, the
//! daemon): EHLO/HELO, MAIL FROM (with `SIZE=`, `BODY=7BIT|8BITMIME`,
//! `SMTPUTF8`), RCPT TO, DATA with dot-unstuffing, RSET, NOOP, QUIT; it
//! advertises PIPELINING, 8BITMIME, SMTPUTF8 (unless
//! [`SinkOptions::smtputf8`] is off) and SIZE and answers pipelined
//! command batches in order, flushing its replies once no complete command
//! is left in its input buffer (RFC 2920). Like a strict server, it refuses
//! non-ASCII addresses unless the transaction declared `SMTPUTF8`.
//!
//! Every accepted message becomes a [`ReceivedMail`]; with
//! [`SinkOptions::maildir`] it is also written to `<maildir>/new/` so a human
//! can read the demo's mails (`mutt -f DIR`).
//!
//! For reliability tests, [`SmtpSink::set_fault`] injects one [`Fault`] at a
//! time: a temporary (4xx) or permanent (5xx) reply at MAIL, RCPT or the end
//! of DATA, for the next N transactions, for all, or for one recipient (or
//! any reply line of the test's choosing, e.g. 421 closing the connection); a
//! dropped connection after the data arrived but before the reply (the
//! in-doubt case); or a closed listener (connection refused) until
//! [`SmtpSink::resume`] listens again on the same port.
//!
//! In async tests prefer [`SmtpSink::wait_for_async`]: the blocking
//! [`SmtpSink::wait_for`] would stall a current-thread runtime that is also
//! the one sending the mail.

use std::borrow::Cow;
use std::fs;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

/// The longest command line accepted (RFC 5321 allows 512 octets; be
/// lenient, addresses with SMTPUTF8 can be long).
const MAX_COMMAND_LINE: u64 = 4096;
/// Message data is read in chunks of at most this many bytes.
const DATA_CHUNK: u64 = 64 * 1024;
const MAX_RECIPIENTS: usize = 1000;

/// How the sink is set up.
#[derive(Debug, Clone)]
pub struct SinkOptions {
    /// Also write every message to `<maildir>/new/<unique>` (the directory
    /// and its `cur`, `new`, `tmp` are created).
    pub maildir: Option<PathBuf>,
    /// Advertised as `SIZE`; larger messages get `552`.
    pub max_size: usize,
    /// Our name in the greeting and the EHLO reply.
    pub hostname: String,
    /// Keep only each message's header block (benchmarks with hundreds of
    /// thousands of mails).
    pub headers_only: bool,
    /// Offer SMTPUTF8 (the default). Without it, like a relay that lacks
    /// the extension, `MAIL FROM … SMTPUTF8` is refused with 555.
    pub smtputf8: bool,
}

impl Default for SinkOptions {
    fn default() -> Self {
        SinkOptions {
            maildir: None,
            max_size: 50 * 1024 * 1024,
            hostname: "sink.mailgend.test".to_string(),
            headers_only: false,
            smtputf8: true,
        }
    }
}

/// One message the sink accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedMail {
    /// The reverse path without angle brackets (empty for `<>`).
    pub mail_from: String,
    /// The accepted recipients, in order, without angle brackets.
    pub rcpt_to: Vec<String>,
    /// The message exactly as received, after dot-unstuffing, with the
    /// client's line endings (CRLF from a conforming client), including
    /// the final line's CRLF but not the terminating `.` line.
    pub data: Vec<u8>,
    /// MAIL FROM carried the `SMTPUTF8` parameter.
    pub smtputf8: bool,
    /// MAIL FROM carried `BODY=8BITMIME`.
    pub body_8bitmime: bool,
    /// The name the client gave in EHLO/HELO.
    pub helo: String,
    /// Which connection (1, 2, … in accept order) carried it.
    pub connection_id: u64,
    /// When the sink accepted it (for latency measurements).
    pub received_at: std::time::SystemTime,
}

impl ReceivedMail {
    /// The data as text (lossy for invalid UTF-8).
    pub fn text(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(&self.data)
    }

    /// The first header field called `name` (case-insensitive) of the
    /// message's top-level header, unfolded, without the name and the
    /// whitespace after the colon.
    pub fn header(&self, name: &str) -> Option<String> {
        let text = self.text();
        let head = text
            .split("\r\n\r\n")
            .next()
            .unwrap_or_default()
            .split("\n\n")
            .next()
            .unwrap_or_default();
        let mut found: Option<String> = None;
        for line in head.lines() {
            let line = line.trim_end_matches('\r');
            if line.starts_with([' ', '\t']) {
                if let Some(value) = found.as_mut() {
                    value.push_str(line);
                }
                continue;
            }
            if found.is_some() {
                break;
            }
            if let Some((field, value)) = line.split_once(':') {
                if field.eq_ignore_ascii_case(name) {
                    found = Some(value.trim_start().to_string());
                }
            }
        }
        found
    }
}

/// Where in a transaction a fault strikes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The reply to MAIL FROM.
    Mail,
    /// The reply to RCPT TO.
    Rcpt,
    /// The reply to the DATA command (before any data).
    Data,
    /// The reply after the message data (`.`).
    DataEnd,
}

/// The kind of refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// 4xx: try again later.
    Temporary,
    /// 5xx: do not try again.
    Permanent,
}

impl Failure {
    /// The reply code the sink uses for this failure at `stage`:
    /// temporary 451 (MAIL, DATA, end of DATA) or 450 (RCPT); permanent
    /// 550 (MAIL, RCPT) or 554 (DATA, end of DATA).
    pub fn code(self, stage: Stage) -> u16 {
        match (self, stage) {
            (Failure::Temporary, Stage::Rcpt) => 450,
            (Failure::Temporary, _) => 451,
            (Failure::Permanent, Stage::Data | Stage::DataEnd) => 554,
            (Failure::Permanent, _) => 550,
        }
    }

    fn reply(self, stage: Stage) -> String {
        let code = self.code(stage);
        let text = match (self, stage) {
            (Failure::Temporary, Stage::Rcpt) => "4.2.0 Mailbox temporarily unavailable",
            (Failure::Temporary, _) => "4.3.0 Temporary local problem",
            (Failure::Permanent, Stage::Rcpt) => "5.1.1 Mailbox unavailable",
            (Failure::Permanent, Stage::Mail) => "5.7.1 Sender refused",
            (Failure::Permanent, Stage::Data | Stage::DataEnd) => "5.6.0 Transaction failed",
        };
        format!("{code} {text} (injected fault)")
    }
}

/// Which transactions a fault applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// The next `n` transactions that reach the fault's stage; then the
    /// sink heals by itself (the fault becomes [`Fault::None`]).
    Next(u32),
    /// Every transaction, until the fault is changed.
    All,
    /// Transactions to this recipient (ASCII case-insensitive): at RCPT only
    /// that recipient is refused; at the end of DATA the whole transaction
    /// fails if it has that recipient. Not valid at [`Stage::Mail`].
    Recipient(String),
}

/// The fault the sink injects (one at a time).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Accept everything.
    None,
    /// Refuse at `stage` with a 4xx/5xx reply (codes: [`Failure::code`]).
    Fail {
        stage: Stage,
        failure: Failure,
        scope: Scope,
    },
    /// Read the whole message, then close the connection without replying:
    /// the client cannot know whether it was delivered. With `deliver` the
    /// sink records it (the server did deliver, the reply got lost), without
    /// it does not.
    DropAfterData { scope: Scope, deliver: bool },
    /// Close the listener and all open connections: connecting is refused
    /// until [`SmtpSink::resume`] (or any other fault) listens again on the
    /// same port.
    RefuseConnections,
    /// Answer `reply` (a whole reply line, e.g. `452 4.5.3 Too many
    /// recipients` or `421 4.3.2 Shutting down`) at `stage`, like
    /// [`Fault::Fail`]; with `close`, close the connection right after it,
    /// as a server does after 421.
    Reply {
        stage: Stage,
        reply: String,
        scope: Scope,
        close: bool,
    },
}

/// A fault's answer at one stage: the reply line, whether it hits the
/// whole transaction (a count or `All` scope) rather than one recipient,
/// and whether the connection closes after it.
struct Answer {
    reply: String,
    whole: bool,
    close: bool,
}

/// Whether a fault with `scope` hits a transaction with `recipients`:
/// `Some(whole transaction)`; consumes one use of a `Scope::Next` (`true`
/// in the second place once it is used up).
fn scope_hits(scope: &mut Scope, recipients: &[String]) -> Option<(bool, bool)> {
    match scope {
        Scope::All => Some((true, false)),
        Scope::Recipient(r) => recipients
            .iter()
            .any(|x| x.eq_ignore_ascii_case(r))
            .then_some((false, false)),
        Scope::Next(n) => {
            *n = n.saturating_sub(1);
            Some((true, *n == 0))
        }
    }
}

enum Control {
    Close(std::sync::mpsc::Sender<()>),
    Open(std::sync::mpsc::Sender<io::Result<()>>),
}

struct State {
    messages: Vec<ReceivedMail>,
    fault: Fault,
    listening: bool,
}

struct Shared {
    state: Mutex<State>,
    /// Wakes blocking `wait_for` callers.
    cond: Condvar,
    /// Wakes `wait_for_async` callers (runtime-agnostic).
    notify: tokio::sync::Notify,
    connections: AtomicU64,
    delivered: AtomicU64,
    options: SinkOptions,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record(&self, mut mail: ReceivedMail) {
        if let Some(dir) = &self.options.maildir {
            // A demo convenience: a write error must not fail the SMTP side.
            let _ = write_maildir(dir, &mail, self.delivered.fetch_add(1, Ordering::Relaxed));
        }
        if self.options.headers_only {
            if let Some(end) = mail.data.windows(4).position(|w| w == b"\r\n\r\n") {
                mail.data.truncate(end + 4);
                mail.data.shrink_to_fit();
            }
        }
        self.state().messages.push(mail);
        self.cond.notify_all();
        self.notify.notify_waiters();
    }

    /// Decides whether the fault fires for a transaction at `stage` and
    /// consumes one use of a `Scope::Next` fault when it does.
    fn fire_fail(&self, stage: Stage, recipients: &[String]) -> Option<Answer> {
        let mut state = self.state();
        let (fault_stage, scope, reply, close) = match &mut state.fault {
            Fault::Fail {
                stage,
                failure,
                scope,
            } => (*stage, scope, failure.reply(*stage), false),
            Fault::Reply {
                stage,
                reply,
                scope,
                close,
            } => (*stage, scope, reply.clone(), *close),
            _ => return None,
        };
        if fault_stage != stage {
            return None;
        }
        let (whole, used_up) = scope_hits(scope, recipients)?;
        if used_up {
            state.fault = Fault::None;
        }
        Some(Answer {
            reply,
            whole,
            close,
        })
    }

    /// Whether to drop the connection after this transaction's data; and
    /// whether to record the message first.
    fn fire_drop(&self, recipients: &[String]) -> Option<bool> {
        let mut state = self.state();
        let Fault::DropAfterData { scope, deliver } = &mut state.fault else {
            return None;
        };
        let deliver = *deliver;
        match scope {
            Scope::All => Some(deliver),
            Scope::Recipient(r) => recipients
                .iter()
                .any(|x| x.eq_ignore_ascii_case(r))
                .then_some(deliver),
            Scope::Next(n) => {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    state.fault = Fault::None;
                }
                Some(deliver)
            }
        }
    }
}

fn write_maildir(dir: &std::path::Path, mail: &ReceivedMail, seq: u64) -> io::Result<()> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let name = format!(
        "{}.M{}P{}Q{}.mailgend-sink",
        now.as_secs(),
        now.subsec_micros(),
        std::process::id(),
        seq
    );
    // Maildir delivery: write in tmp/, then rename into new/.
    let tmp = dir.join("tmp").join(&name);
    fs::write(&tmp, &mail.data)?;
    fs::rename(&tmp, dir.join("new").join(&name))
}

/// A running SMTP receiver; stopped when dropped.
pub struct SmtpSink {
    addr: SocketAddr,
    shared: Arc<Shared>,
    control: mpsc::UnboundedSender<Control>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for SmtpSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpSink")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl SmtpSink {
    /// Starts a sink with default options. Panics if it cannot (a test
    /// helper: there is nothing sensible to do about it).
    pub fn start() -> SmtpSink {
        SmtpSink::start_with(SinkOptions::default())
    }

    /// Starts a sink with `options`; panics if it cannot.
    pub fn start_with(options: SinkOptions) -> SmtpSink {
        SmtpSink::try_start_with(options).expect("start the SMTP sink")
    }

    /// Starts a sink with `options`.
    pub fn try_start_with(options: SinkOptions) -> io::Result<SmtpSink> {
        if let Some(dir) = &options.maildir {
            for sub in ["cur", "new", "tmp"] {
                fs::create_dir_all(dir.join(sub))?;
            }
        }
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                messages: Vec::new(),
                fault: Fault::None,
                listening: true,
            }),
            cond: Condvar::new(),
            notify: tokio::sync::Notify::new(),
            connections: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            options,
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (control, control_rx) = mpsc::unbounded_channel();
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("smtp-sink-{}", addr.port()))
            .spawn(move || {
                runtime.block_on(async move {
                    match TcpListener::from_std(listener) {
                        Ok(listener) => serve(listener, addr, thread_shared, control_rx).await,
                        Err(e) => eprintln!("smtp sink: cannot use listener: {e}"),
                    }
                })
            })?;
        Ok(SmtpSink {
            addr,
            shared,
            control,
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Every message accepted so far, in order.
    pub fn messages(&self) -> Vec<ReceivedMail> {
        self.shared.state().messages.clone()
    }

    /// Waits until at least `n` messages were accepted or `timeout` passed;
    /// returns all messages accepted by then (check the length). Blocks the
    /// calling thread: in async tests use [`SmtpSink::wait_for_async`].
    pub fn wait_for(&self, n: usize, timeout: Duration) -> Vec<ReceivedMail> {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.state();
        while state.messages.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            state = self
                .shared
                .cond
                .wait_timeout(state, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        state.messages.clone()
    }

    /// [`SmtpSink::wait_for`] without blocking the caller's runtime.
    pub async fn wait_for_async(&self, n: usize, timeout: Duration) -> Vec<ReceivedMail> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.shared.notify.notified();
            tokio::pin!(notified);
            // Register before looking, so a message arriving in between
            // still wakes us.
            notified.as_mut().enable();
            {
                let state = self.shared.state();
                if state.messages.len() >= n {
                    return state.messages.clone();
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.messages();
            }
        }
    }

    /// How many connections were accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Forgets the recorded messages (the connection count stays).
    pub fn clear(&self) {
        self.shared.state().messages.clear();
    }

    /// The fault in force now (a `Scope::Next` fault shows its remaining
    /// count, and becomes `Fault::None` when used up).
    pub fn fault(&self) -> Fault {
        self.shared.state().fault.clone()
    }

    /// Injects `fault` (replacing the previous one). Switching to
    /// [`Fault::RefuseConnections`] returns once the listener and all open
    /// connections are closed; switching away from it returns once the
    /// sink listens again. Panics on an invalid fault (a recipient scope at
    /// MAIL) or if the port cannot be bound again (see
    /// [`SmtpSink::resume`] for a fallible version).
    pub fn set_fault(&self, fault: Fault) {
        if let Fault::Fail {
            stage: Stage::Mail,
            scope: Scope::Recipient(_),
            ..
        } = fault
        {
            panic!("invalid fault: recipients are not known at MAIL; use Stage::Rcpt");
        }
        self.apply(fault)
            .expect("SMTP sink: listen again on its port");
    }

    /// Clears any fault and, if the listener was closed, listens again on
    /// the same port (retrying for about two seconds if the port is busy).
    pub fn resume(&self) -> io::Result<()> {
        self.apply(Fault::None)
    }

    fn apply(&self, fault: Fault) -> io::Result<()> {
        let refuse = fault == Fault::RefuseConnections;
        let listening = {
            let mut state = self.shared.state();
            state.fault = fault;
            state.listening
        };
        if refuse && listening {
            let (tx, rx) = std::sync::mpsc::channel();
            if self.control.send(Control::Close(tx)).is_ok() {
                let _ = rx.recv();
            }
            self.shared.state().listening = false;
        } else if !refuse && !listening {
            let (tx, rx) = std::sync::mpsc::channel();
            self.control
                .send(Control::Open(tx))
                .map_err(|_| io::Error::other("SMTP sink thread is gone"))?;
            rx.recv()
                .map_err(|_| io::Error::other("SMTP sink thread is gone"))??;
            self.shared.state().listening = true;
        }
        Ok(())
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        // Closing the control channel ends the server loop.
        let (tx, _) = mpsc::unbounded_channel();
        drop(std::mem::replace(&mut self.control, tx));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn accept(listener: &Option<TcpListener>) -> io::Result<TcpStream> {
    match listener {
        Some(l) => l.accept().await.map(|(s, _)| {
            // Replies are small writes; do not let Nagle delay them.
            let _ = s.set_nodelay(true);
            s
        }),
        None => std::future::pending().await,
    }
}

async fn bind_again(addr: SocketAddr) -> io::Result<TcpListener> {
    // tokio sets SO_REUSEADDR, so TIME_WAIT connections do not block the
    // port; a busy port (someone else took it) might free up, so retry.
    let mut tries = 0;
    loop {
        match TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(e) if tries >= 20 => return Err(e),
            Err(_) => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve(
    listener: TcpListener,
    addr: SocketAddr,
    shared: Arc<Shared>,
    mut control: mpsc::UnboundedReceiver<Control>,
) {
    let mut listener = Some(listener);
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = accept(&listener) => match accepted {
                Ok(stream) => {
                    let id = shared.connections.fetch_add(1, Ordering::SeqCst) + 1;
                    let shared = shared.clone();
                    connections.spawn(async move {
                        // A client going away mid-session is normal here.
                        let _ = Session::new(id, &shared).run(stream).await;
                    });
                }
                // E.g. too many open files: back off instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            },
            command = control.recv() => match command {
                Some(Control::Close(done)) => {
                    listener = None;
                    connections.abort_all();
                    while connections.join_next().await.is_some() {}
                    let _ = done.send(());
                }
                Some(Control::Open(done)) => {
                    let result = match listener {
                        Some(_) => Ok(()),
                        None => bind_again(addr).await.map(|l| listener = Some(l)),
                    };
                    let _ = done.send(result);
                }
                None => break,
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    connections.shutdown().await;
}

/// The transaction in progress (after MAIL FROM).
struct Transaction {
    mail_from: String,
    rcpt_to: Vec<String>,
    smtputf8: bool,
    body_8bitmime: bool,
    size: Option<usize>,
    /// This transaction was refused at RCPT by a `Scope::Next`/`All` fault:
    /// its later RCPTs are refused the same way (this reply), without using
    /// up a count.
    rcpt_fault: Option<String>,
}

struct Session<'a> {
    id: u64,
    shared: &'a Shared,
    helo: Option<String>,
    txn: Option<Transaction>,
    /// A fault's reply asked to close the connection after it.
    close: bool,
}

/// What the server does after a command.
enum Next {
    Continue,
    ReadData,
    Quit,
}

impl<'a> Session<'a> {
    fn new(id: u64, shared: &'a Shared) -> Session<'a> {
        Session {
            id,
            shared,
            helo: None,
            txn: None,
            close: false,
        }
    }

    async fn run(mut self, stream: TcpStream) -> io::Result<()> {
        let (rd, wr) = stream.into_split();
        let mut rd = BufReader::new(rd);
        let mut wr = BufWriter::new(wr);
        let host = self.shared.options.hostname.clone();
        reply(&mut wr, &format!("220 {host} ESMTP mailgend sink ready")).await?;
        wr.flush().await?;
        let mut line = Vec::new();
        loop {
            line.clear();
            (&mut rd)
                .take(MAX_COMMAND_LINE)
                .read_until(b'\n', &mut line)
                .await?;
            if line.is_empty() {
                return Ok(()); // EOF
            }
            if !line.ends_with(b"\n") {
                if (line.len() as u64) < MAX_COMMAND_LINE {
                    return Ok(()); // EOF in the middle of a line
                }
                // Skip the rest of the over-long line.
                let mut rest = Vec::new();
                rd.read_until(b'\n', &mut rest).await?;
                reply(&mut wr, "500 5.5.2 Line too long").await?;
            } else {
                match self.command(&line, &mut wr).await? {
                    Next::Continue if self.close => {
                        wr.flush().await?;
                        return Ok(());
                    }
                    Next::Continue => {}
                    Next::Quit => {
                        wr.flush().await?;
                        return Ok(());
                    }
                    Next::ReadData => {
                        wr.flush().await?;
                        let data = read_data(&mut rd, self.shared.options.max_size).await?;
                        if !self.finish_data(data, &mut wr).await? {
                            // Fault: drop the connection without a reply.
                            return Ok(());
                        }
                        if self.close {
                            wr.flush().await?;
                            return Ok(());
                        }
                    }
                }
            }
            // Pipelining: answer a whole batch at once, but never wait for
            // input while replies are still buffered.
            if !rd.buffer().contains(&b'\n') {
                wr.flush().await?;
            }
        }
    }

    async fn command<W: AsyncWrite + Unpin>(&mut self, raw: &[u8], wr: &mut W) -> io::Result<Next> {
        let Ok(line) = std::str::from_utf8(raw) else {
            reply(wr, "500 5.5.2 Syntax error (invalid UTF-8)").await?;
            return Ok(Next::Continue);
        };
        let line = line.trim_end_matches(['\r', '\n']);
        let (verb, args) = match line.split_once(' ') {
            Some((v, a)) => (v, a.trim()),
            None => (line, ""),
        };
        let verb = verb.to_ascii_uppercase();
        let host = &self.shared.options.hostname;
        match verb.as_str() {
            "EHLO" | "HELO" if args.is_empty() => {
                reply(wr, "501 5.5.4 Domain name required").await?;
            }
            "EHLO" => {
                self.helo = Some(args.to_string());
                self.txn = None;
                let max = self.shared.options.max_size;
                let utf8 = if self.shared.options.smtputf8 {
                    "250-SMTPUTF8\r\n"
                } else {
                    ""
                };
                reply(
                    wr,
                    &format!(
                        "250-{host} greets {args}\r\n250-PIPELINING\r\n250-8BITMIME\r\n\
                         {utf8}250-SIZE {max}\r\n250 ENHANCEDSTATUSCODES"
                    ),
                )
                .await?;
            }
            "HELO" => {
                self.helo = Some(args.to_string());
                self.txn = None;
                reply(wr, &format!("250 {host}")).await?;
            }
            "MAIL" => {
                let text = self.mail(args);
                reply(wr, &text).await?;
            }
            "RCPT" => {
                let text = self.rcpt(args);
                reply(wr, &text).await?;
            }
            "DATA" => match &self.txn {
                None => reply(wr, "503 5.5.1 Need MAIL command").await?,
                Some(t) if t.rcpt_to.is_empty() => {
                    reply(wr, "554 5.5.1 No valid recipients").await?
                }
                Some(t) => {
                    if let Some(answer) = self.shared.fire_fail(Stage::Data, &t.rcpt_to) {
                        self.close = answer.close;
                        self.txn = None;
                        reply(wr, &answer.reply).await?;
                        return Ok(Next::Continue);
                    }
                    reply(wr, "354 End data with <CR><LF>.<CR><LF>").await?;
                    return Ok(Next::ReadData);
                }
            },
            "RSET" => {
                self.txn = None;
                reply(wr, "250 2.0.0 Ok").await?;
            }
            "NOOP" => reply(wr, "250 2.0.0 Ok").await?,
            "QUIT" => {
                reply(wr, &format!("221 2.0.0 {host} closing connection")).await?;
                return Ok(Next::Quit);
            }
            "VRFY" => reply(wr, "252 2.5.2 Cannot VRFY user").await?,
            "HELP" => reply(wr, "214 2.0.0 See RFC 5321").await?,
            "STARTTLS" | "AUTH" | "EXPN" | "BDAT" | "ETRN" => {
                reply(wr, "502 5.5.1 Command not implemented").await?
            }
            _ => reply(wr, "500 5.5.2 Command unrecognized").await?,
        }
        Ok(Next::Continue)
    }

    fn mail(&mut self, args: &str) -> String {
        if self.helo.is_none() {
            return "503 5.5.1 Send EHLO/HELO first".into();
        }
        if self.txn.is_some() {
            return "503 5.5.1 Nested MAIL command".into();
        }
        let Some((path, params)) = strip_prefix_ci(args, "FROM:").and_then(parse_path) else {
            return "501 5.5.4 Syntax: MAIL FROM:<address>".into();
        };
        let mut txn = Transaction {
            mail_from: path,
            rcpt_to: Vec::new(),
            smtputf8: false,
            body_8bitmime: false,
            size: None,
            rcpt_fault: None,
        };
        for param in params.split_whitespace() {
            let (key, value) = param.split_once('=').unwrap_or((param, ""));
            match key.to_ascii_uppercase().as_str() {
                "SIZE" => match value.parse::<usize>() {
                    Ok(n) => txn.size = Some(n),
                    Err(_) => return "501 5.5.4 Bad SIZE value".into(),
                },
                "BODY" => match value.to_ascii_uppercase().as_str() {
                    "7BIT" => {}
                    "8BITMIME" => txn.body_8bitmime = true,
                    _ => return "501 5.5.4 Unsupported BODY value".into(),
                },
                "SMTPUTF8" if value.is_empty() && self.shared.options.smtputf8 => {
                    txn.smtputf8 = true
                }
                _ => return format!("555 5.5.4 Unsupported parameter {key}"),
            }
        }
        if !txn.smtputf8 && !txn.mail_from.is_ascii() {
            return "553 5.6.7 Non-ASCII address requires SMTPUTF8".into();
        }
        if txn.size.is_some_and(|n| n > self.shared.options.max_size) {
            return "552 5.3.4 Message size exceeds fixed maximum".into();
        }
        if let Some(answer) = self.shared.fire_fail(Stage::Mail, &[]) {
            self.close = answer.close;
            return answer.reply;
        }
        self.txn = Some(txn);
        "250 2.1.0 Ok".into()
    }

    fn rcpt(&mut self, args: &str) -> String {
        let Some(txn) = self.txn.as_mut() else {
            return "503 5.5.1 Need MAIL command".into();
        };
        let Some((path, params)) = strip_prefix_ci(args, "TO:").and_then(parse_path) else {
            return "501 5.5.4 Syntax: RCPT TO:<address>".into();
        };
        if path.is_empty() {
            return "501 5.1.3 Empty recipient".into();
        }
        if !params.trim().is_empty() {
            return "555 5.5.4 Unsupported RCPT parameter".into();
        }
        if !txn.smtputf8 && !path.is_ascii() {
            return "553 5.6.7 Non-ASCII address requires SMTPUTF8".into();
        }
        if txn.rcpt_to.len() >= MAX_RECIPIENTS {
            return "452 4.5.3 Too many recipients".into();
        }
        if let Some(reply) = &txn.rcpt_fault {
            return reply.clone();
        }
        let fired = self
            .shared
            .fire_fail(Stage::Rcpt, std::slice::from_ref(&path));
        if let Some(answer) = fired {
            if answer.whole {
                txn.rcpt_fault = Some(answer.reply.clone());
            }
            self.close = answer.close;
            return answer.reply;
        }
        txn.rcpt_to.push(path);
        "250 2.1.5 Ok".into()
    }

    /// Replies to the end of DATA; `false`: drop the connection instead.
    async fn finish_data<W: AsyncWrite + Unpin>(
        &mut self,
        data: Option<Vec<u8>>,
        wr: &mut W,
    ) -> io::Result<bool> {
        let txn = self.txn.take().expect("DATA only with a transaction");
        let Some(data) = data else {
            reply(wr, "552 5.3.4 Message size exceeds fixed maximum").await?;
            return Ok(true);
        };
        let mail = ReceivedMail {
            mail_from: txn.mail_from,
            rcpt_to: txn.rcpt_to,
            data,
            smtputf8: txn.smtputf8,
            body_8bitmime: txn.body_8bitmime,
            helo: self.helo.clone().unwrap_or_default(),
            connection_id: self.id,
            received_at: std::time::SystemTime::now(),
        };
        if let Some(deliver) = self.shared.fire_drop(&mail.rcpt_to) {
            if deliver {
                self.shared.record(mail);
            }
            return Ok(false);
        }
        if let Some(answer) = self.shared.fire_fail(Stage::DataEnd, &mail.rcpt_to) {
            self.close = answer.close;
            reply(wr, &answer.reply).await?;
            return Ok(true);
        }
        self.shared.record(mail);
        reply(wr, "250 2.0.0 Ok: queued").await?;
        Ok(true)
    }
}

async fn reply<W: AsyncWrite + Unpin>(wr: &mut W, text: &str) -> io::Result<()> {
    wr.write_all(text.as_bytes()).await?;
    wr.write_all(b"\r\n").await
}

/// Reads message data up to the `.` line, undoing dot-stuffing. `None`:
/// larger than `max` (read to the end anyway, to stay in sync).
async fn read_data<R: tokio::io::AsyncBufRead + Unpin>(
    rd: &mut R,
    max: usize,
) -> io::Result<Option<Vec<u8>>> {
    let mut data = Vec::new();
    let mut too_big = false;
    let mut chunk = Vec::new();
    let mut at_line_start = true;
    loop {
        chunk.clear();
        (&mut *rd)
            .take(DATA_CHUNK)
            .read_until(b'\n', &mut chunk)
            .await?;
        if chunk.is_empty() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let complete = chunk.ends_with(b"\n");
        if at_line_start && (chunk == b".\r\n" || chunk == b".\n") {
            break;
        }
        let mut part = &chunk[..];
        if at_line_start && part.starts_with(b".") {
            part = &part[1..];
        }
        if data.len() + part.len() <= max {
            data.extend_from_slice(part);
        } else {
            too_big = true;
        }
        at_line_start = complete;
    }
    Ok((!too_big).then_some(data))
}

fn strip_prefix_ci<'s>(s: &'s str, prefix: &str) -> Option<&'s str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| s[prefix.len()..].trim_start())
}

/// `<path> params` → (path, params). Lenient about a missing `<>`.
fn parse_path(s: &str) -> Option<(String, &str)> {
    if let Some(rest) = s.strip_prefix('<') {
        let end = rest.find('>')?;
        Some((rest[..end].to_string(), &rest[end + 1..]))
    } else {
        let (path, params) = s.split_once(' ').unwrap_or((s, ""));
        (!path.is_empty()).then(|| (path.to_string(), params))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_parsing() {
        assert_eq!(
            parse_path("<a@example.net> SIZE=10"),
            Some(("a@example.net".to_string(), " SIZE=10"))
        );
        assert_eq!(parse_path("<>"), Some((String::new(), "")));
        assert_eq!(parse_path("a@b"), Some(("a@b".to_string(), "")));
        assert_eq!(strip_prefix_ci("from: <x>", "FROM:"), Some("<x>"));
        assert_eq!(strip_prefix_ci("TO:<x>", "FROM:"), None);
    }

    #[tokio::test]
    async fn data_unstuffing_and_end() {
        let input: &[u8] = b"Subject: x\r\n\r\n..leading dot\r\n.\r\nNOOP\r\n";
        let mut rd = BufReader::new(input);
        let data = read_data(&mut rd, 1000).await.unwrap().unwrap();
        assert_eq!(data, b"Subject: x\r\n\r\n.leading dot\r\n");
        let mut rest = String::new();
        rd.read_to_string(&mut rest).await.unwrap();
        assert_eq!(rest, "NOOP\r\n");
    }

    #[tokio::test]
    async fn data_too_big_is_read_to_the_end() {
        let input: &[u8] = b"0123456789\r\n.\r\n";
        let mut rd = BufReader::new(input);
        assert_eq!(read_data(&mut rd, 5).await.unwrap(), None);
    }

    #[test]
    fn header_lookup_unfolds() {
        let mail = ReceivedMail {
            mail_from: String::new(),
            rcpt_to: vec![],
            data: b"Subject: a\r\n b\r\nTo: x@example.net\r\n\r\nSubject: body\r\n".to_vec(),
            smtputf8: false,
            body_8bitmime: false,
            helo: String::new(),
            connection_id: 1,
            received_at: std::time::SystemTime::UNIX_EPOCH,
        };
        assert_eq!(mail.header("subject").as_deref(), Some("a b"));
        assert_eq!(mail.header("To").as_deref(), Some("x@example.net"));
        assert_eq!(mail.header("From"), None);
    }
}
