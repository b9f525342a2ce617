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
//!
//! Layout: this file holds the options, the recorded mail and the
//! [`SmtpSink`] handle with the server loop; `fault.rs` the injectable
//! faults; `session.rs` one client's SMTP session.

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

mod fault;
mod session;

use fault::{scope_hits, Answer};
pub use fault::{Failure, Fault, Scope, Stage};
use session::Session;

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
