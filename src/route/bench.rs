//! `mailgend bench --mode route`: how fast the alert router passes mail on,
//! compared with talking to the receiver directly.
//!
//! A Python aiosmtpd receiver on loopback that delivers each message to a
//! Maildir, fsynced before its 250 as a real MTA's delivery is, stands for
//! the relay. The real binary runs as
//! `mailgend route` with a fresh spool and one `mail` manager that does not
//! want the benchmark's mail, so every message takes the common path:
//! received, routed, forwarded unchanged, then acknowledged. For 1 and 10
//! concurrent senders, each holding one connection and sending messages
//! back to back, it measures msgs/s and the per-message latency (MAIL to
//! the 250 after DATA) directly against the receiver and through the
//! router, in alternating slices, three runs per case and the median run
//! (by share), and reports the router's share of the direct rate and the
//! latency it adds (p50/p99 through the router minus the same percentile
//! direct). Every message is counted at the receiver.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Why the benchmark could not finish.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("{0}")]
    Failed(String),
}

type Result<T> = std::result::Result<T, BenchError>;

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> BenchError {
    move |source| BenchError::Io { what, source }
}

macro_rules! fail {
    ($($t:tt)*) => {
        return Err(BenchError::Failed(format!($($t)*)))
    };
}

/// A GoCD-like alert of ~1.5 kB.
fn message(i: usize) -> Vec<u8> {
    let mut m = format!(
        "From: GoCD <gocd@build.example.org>\r\nTo: alerts@example.org\r\n\
         Subject: Stage [pipeline-{i}/42/build/1] failed\r\n\
         Date: Mon, 23 Nov 2026 08:00:00 +0000\r\nMessage-ID: <{i}.bench@build.example.org>\r\n\
         MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
    );
    for l in 0..20 {
        m.push_str(&format!(
            "Line {l:02}: the stage failed; see https://gocd.example.org/go/pipelines/{i}/42\r\n"
        ));
    }
    m.into_bytes()
}

fn free_port() -> Result<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(io("finding a free port"))
}

/// A child process killed when dropped.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// aiosmtpd accepting everything and delivering each message to a Maildir
/// the way a real MTA's local delivery does before it says 250: written to
/// `tmp/`, fsynced, renamed into `new/` (Postfix's local(8) and Dovecot's
/// LDA fsync too). The write and fsync run on a thread pool, so concurrent
/// sessions deliver concurrently, as in an MTA. Counts messages (printed
/// on stdin EOF).
const SINK: &str = r#"
import asyncio, os, sys, threading
from aiosmtpd.controller import Controller
maildir = sys.argv[2]
for d in ('tmp', 'new', 'cur'):
    os.makedirs(os.path.join(maildir, d), exist_ok=True)
count = 0
lock = threading.Lock()
def deliver(data):
    global count
    with lock:
        count += 1
        n = count
    name = '%d.%d_%d.bench' % (os.getpid(), threading.get_ident(), n)
    tmp = os.path.join(maildir, 'tmp', name)
    with open(tmp, 'wb') as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, os.path.join(maildir, 'new', name))
class H:
    async def handle_DATA(self, server, session, envelope):
        await asyncio.get_running_loop().run_in_executor(None, deliver, envelope.original_content)
        return '250 OK'
c = Controller(H(), hostname='127.0.0.1', port=int(sys.argv[1]))
c.start()
print('ready', flush=True)
sys.stdin.read()
c.stop()
print(count, flush=True)
"#;

async fn wait_port(port: u16) -> Result<()> {
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        if start.elapsed() > Duration::from_secs(20) {
            fail!("nothing listens on 127.0.0.1:{port}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// A minimal SMTP client on one connection (no pipelining, as smtplib).
struct Client {
    rd: BufReader<tokio::net::tcp::OwnedReadHalf>,
    wr: tokio::net::tcp::OwnedWriteHalf,
    line: String,
}

impl Client {
    async fn connect(port: u16) -> Result<Client> {
        let s = TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(io("connecting"))?;
        s.set_nodelay(true).map_err(io("connecting"))?;
        let (r, w) = s.into_split();
        let mut c = Client {
            rd: BufReader::new(r),
            wr: w,
            line: String::new(),
        };
        c.expect("220").await?;
        c.cmd(b"EHLO bench.example\r\n", "250").await?;
        Ok(c)
    }

    async fn expect(&mut self, code: &str) -> Result<()> {
        loop {
            self.line.clear();
            if self
                .rd
                .read_line(&mut self.line)
                .await
                .map_err(io("reading a reply"))?
                == 0
            {
                fail!("connection closed");
            }
            if !self.line.starts_with(code) {
                fail!("expected {code}, got {:?}", self.line.trim_end());
            }
            if self.line.as_bytes().get(3) != Some(&b'-') {
                return Ok(());
            }
        }
    }

    async fn cmd(&mut self, line: &[u8], code: &str) -> Result<()> {
        self.wr.write_all(line).await.map_err(io("sending"))?;
        self.expect(code).await
    }

    /// One message; returns its latency.
    async fn send(&mut self, data: &[u8]) -> Result<Duration> {
        let t = Instant::now();
        self.cmd(b"MAIL FROM:<gocd@build.example.org>\r\n", "250")
            .await?;
        self.cmd(b"RCPT TO:<alerts@example.org>\r\n", "250").await?;
        self.cmd(b"DATA\r\n", "354").await?;
        let mut body = data.to_vec();
        body.extend_from_slice(b".\r\n");
        self.cmd(&body, "250").await?;
        Ok(t.elapsed())
    }
}

/// Result of one case.
#[derive(Default)]
struct Case {
    wall: f64,
    latencies: Vec<Duration>,
}

impl Case {
    fn rate(&self) -> f64 {
        self.latencies.len() as f64 / self.wall
    }

    fn add(&mut self, other: Case) {
        self.wall += other.wall;
        self.latencies.extend(other.latencies);
        self.latencies.sort();
    }
}

/// `clients` senders, `per_client` messages each, against `port`.
async fn drive(port: u16, clients: usize, per_client: usize) -> Result<Case> {
    let mut conns = Vec::new();
    for _ in 0..clients {
        conns.push(Client::connect(port).await?);
    }
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (n, mut c) in conns.into_iter().enumerate() {
        tasks.spawn(async move {
            let mut lat = Vec::with_capacity(per_client);
            for i in 0..per_client {
                lat.push(c.send(&message(n * per_client + i)).await?);
            }
            let _ = c.cmd(b"QUIT\r\n", "221").await;
            Ok::<_, BenchError>(lat)
        });
    }
    let mut latencies = Vec::new();
    while let Some(r) = tasks.join_next().await {
        let lat = r.map_err(|e| BenchError::Failed(format!("a sender task failed: {e}")))??;
        latencies.extend(lat);
    }
    let wall = start.elapsed().as_secs_f64();
    latencies.sort();
    Ok(Case { wall, latencies })
}

fn pct(v: &[Duration], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i].as_secs_f64() * 1000.0
}

/// Direct and routed slices per run.
const ROUNDS: usize = 4;

/// Runs per case; the median run is reported as the case's figure.
const RUNS: usize = 3;

/// Runs the benchmark and prints the table; `messages` per case.
pub async fn run(messages: usize) -> Result<()> {
    let exe = std::env::current_exe().map_err(io("locating the mailgend binary"))?;
    let dir = tempfile::tempdir().map_err(io("creating a temporary directory"))?;
    let sink_port = free_port()?;
    let mut sink = Child(
        // Debian's Python, which sees Debian's python3-aiosmtpd.
        Command::new("/usr/bin/python3")
            .arg("-c")
            .arg(SINK)
            .arg(sink_port.to_string())
            .arg(dir.path().join("Maildir"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(io(
                "starting /usr/bin/python3 (apt install python3-aiosmtpd)",
            ))?,
    );
    if wait_port(sink_port).await.is_err() {
        fail!("the aiosmtpd receiver did not start (is Python's aiosmtpd installed?)");
    }

    let route_port = free_port()?;
    let cfg = dir.path().join("configuration.yml");
    std::fs::write(
        &cfg,
        format!(
            "local-smtp: 127.0.0.1:{route_port}\nremote-smtp: 127.0.0.1:{sink_port}\n\
             managers:\n- name: mail\n  messages-we-want:\n    from: someone-else@example.org\n  \
             rules:\n  - actions: [mailto:x@example.org]\n    filter:\n      function: mail.in_subject\n      args: [x]\n\
             mailgend:\n  spool: {}\n  outbound-connections: 16\n  max-messages-per-connection: 1000000\n",
            dir.path().join("spool").display()
        ),
    )
    .map_err(io("writing the router's configuration"))?;
    let log = std::fs::File::create(dir.path().join("route.log"))
        .map_err(io("creating the router's log"))?;
    let _router = Child(
        Command::new(&exe)
            .arg("route")
            .arg("-c")
            .arg(&cfg)
            .env("LOGLEVEL", "INFO")
            .env_remove("NOTIFY_SOCKET")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(io("starting mailgend route"))?,
    );
    if wait_port(route_port).await.is_err() {
        fail!(
            "mailgend route did not start; its log: {}",
            std::fs::read_to_string(dir.path().join("route.log")).unwrap_or_default()
        );
    }

    println!(
        "alert router benchmark: {messages} messages per case (~{} bytes each), aiosmtpd on loopback",
        message(0).len()
    );
    println!(
        "{:>8} {:>12} {:>12} {:>7} {:>10} {:>10} {:>10} {:>10}",
        "senders",
        "direct/s",
        "router/s",
        "share",
        "p50 direct",
        "p99 direct",
        "p50 added",
        "p99 added"
    );
    let mut total = 0;
    let row = |label: String, direct: &Case, routed: &Case| {
        println!(
            "{:>8} {:>12.0} {:>12.0} {:>6.0}% {:>8.2}ms {:>8.2}ms {:>8.2}ms {:>8.2}ms",
            label,
            direct.rate(),
            routed.rate(),
            100.0 * routed.rate() / direct.rate(),
            pct(&direct.latencies, 0.5),
            pct(&direct.latencies, 0.99),
            pct(&routed.latencies, 0.5) - pct(&direct.latencies, 0.5),
            pct(&routed.latencies, 0.99) - pct(&direct.latencies, 0.99),
        );
    };
    for clients in [1usize, 10] {
        // Alternating slices, so that a change in the machine's load hits
        // both sides alike.
        let per = (messages / clients / ROUNDS).max(1);
        // Warm-up: connections, pools, page cache.
        drive(sink_port, clients, 20).await?;
        drive(route_port, clients, 20).await?;
        total += 2 * 20 * clients;
        let mut runs = Vec::new();
        for run in 1..=RUNS {
            let (mut direct, mut routed) = (Case::default(), Case::default());
            for _ in 0..ROUNDS {
                direct.add(drive(sink_port, clients, per).await?);
                routed.add(drive(route_port, clients, per).await?);
            }
            total += 2 * ROUNDS * per * clients;
            row(format!("{clients} #{run}"), &direct, &routed);
            runs.push((direct, routed));
        }
        // The median run by the router's share of the direct rate.
        runs.sort_by(|a, b| {
            let share = |(d, r): &(Case, Case)| r.rate() / d.rate();
            share(a).total_cmp(&share(b))
        });
        let (direct, routed) = &runs[RUNS / 2];
        row(format!("{clients} med"), direct, routed);
    }
    // Every message reached the receiver (the router acknowledged each
    // only after the receiver did, or it spooled it: check the spool too).
    drop(sink.0.stdin.take());
    let out = tokio::task::spawn_blocking(move || {
        let mut s = String::new();
        use std::io::Read;
        if let Some(mut o) = sink.0.stdout.take() {
            let _ = o.read_to_string(&mut s);
        }
        s
    })
    .await
    .map_err(|e| BenchError::Failed(format!("reading the receiver's count: {e}")))?;
    let received: usize = out
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(0);
    let spooled = std::fs::read_dir(dir.path().join("spool"))
        .map(|d| {
            d.filter_map(std::result::Result::ok)
                .filter(|e| e.path().extension().is_some_and(|x| x == "msg"))
                .count()
        })
        .unwrap_or(0);
    println!("receiver counted {received} of {total} messages sent; {spooled} left in the spool");
    if received != total {
        fail!("the receiver got {received} messages, {total} were sent");
    }
    Ok(())
}
