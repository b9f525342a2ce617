//! `mailgend route` against a hostile network (issue 16): the real binary,
//! a real relay ([`SmtpSink`]) and raw SMTP clients that do what no polite
//! client would. Each test names the finding it guards.

use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mailgend::sandbox::SmtpSink;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(20);

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running `mailgend route` on `dir/configuration.yml`, logging to
/// `dir/route.log` (plain text, as under a terminal or a log file).
struct Route {
    child: Child,
    log: PathBuf,
    port: u16,
    metrics: u16,
}

impl Route {
    fn start(dir: &Path, port: u16, metrics: u16) -> Route {
        let log = dir.join("route.log");
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_mailgend"))
            .arg("route")
            .arg("-c")
            .arg(dir.join("configuration.yml"))
            .env("LOGLEVEL", "DEBUG")
            .env_remove("MAILGEND_LOG")
            .env_remove("NOTIFY_SOCKET")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn mailgend route");
        let r = Route {
            child,
            log,
            port,
            metrics,
        };
        r.wait_log("mailgend route running", 1);
        r
    }

    fn log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    fn wait_log(&self, needle: &str, n: usize) {
        let start = Instant::now();
        while self.log().matches(needle).count() < n {
            assert!(
                start.elapsed() < WAIT,
                "no {n}× {needle:?} in the log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Resident set size in kB.
    fn rss_kb(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    /// One sample of `/metrics` (`name{labels}` exactly as exposed).
    async fn metric(&self, series: &str) -> f64 {
        let mut s = TcpStream::connect(("127.0.0.1", self.metrics))
            .await
            .unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).await.unwrap();
        body.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no {series} in\n{body}"))
            .trim()
            .parse()
            .unwrap()
    }
}

impl Drop for Route {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    sink: SmtpSink,
    route: Route,
}

/// A router whose one manager (`gocd`, no GoCD to ask) takes mail to
/// gocd@example.org and sends every stage event to dev@example.net;
/// `manager_extra` is added to the manager, `extra` to `mailgend:`.
fn setup(manager_extra: &str, extra: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let sink = SmtpSink::start();
    let (port, metrics) = (free_port(), free_port());
    let config = format!(
        "local-smtp: 127.0.0.1:{port}
remote-smtp: 127.0.0.1:{sink}
managers:
- name: gocd
  messages-we-want:
    to: gocd@example.org
{manager_extra}  rules:
  - actions: [mailto:dev@example.net]
    filter:
      function: pipelines.any
mailgend:
  spool: {spool}
  command-timeout: 10
  metrics-listen: 127.0.0.1:{metrics}
{extra}",
        sink = sink.port(),
        spool = dir.path().join("spool").display()
    );
    std::fs::write(dir.path().join("configuration.yml"), config).unwrap();
    let route = Route::start(dir.path(), port, metrics);
    Setup {
        _dir: dir,
        sink,
        route,
    }
}

/// A raw SMTP session.
struct Raw {
    rd: BufReader<tokio::net::tcp::OwnedReadHalf>,
    wr: tokio::net::tcp::OwnedWriteHalf,
}

impl Raw {
    async fn connect(port: u16) -> (Raw, String) {
        Self::connect_from(port, "127.0.0.1").await
    }

    /// From a chosen loopback address (127.0.0.0/8 are all ours): another
    /// "client IP" for the per-client limits.
    async fn connect_from(port: u16, ip: &str) -> (Raw, String) {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(format!("{ip}:0").parse().unwrap()).unwrap();
        let s = sock
            .connect(format!("127.0.0.1:{port}").parse().unwrap())
            .await
            .unwrap();
        let (r, w) = s.into_split();
        let mut raw = Raw {
            rd: BufReader::new(r),
            wr: w,
        };
        let greeting = raw.reply().await;
        (raw, greeting)
    }

    /// One (possibly multi-line) reply; empty at EOF.
    async fn reply(&mut self) -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(WAIT, self.rd.read_line(&mut line))
                .await
                .expect("a reply in time")
                .unwrap_or(0);
            if n == 0 {
                return all;
            }
            all.push_str(&line);
            if line.len() < 4 || line.as_bytes()[3] != b'-' {
                return all;
            }
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        // The server may have hung up: the reply says so.
        let _ = self.wr.write_all(bytes).await;
    }

    async fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes()).await;
        self.reply().await
    }

    /// MAIL, RCPT…, DATA, the bytes, `.`: the final reply (after EHLO).
    async fn mail(&mut self, from: &str, to: &[&str], data: &[u8]) -> String {
        assert_eq!(code(&self.cmd(&format!("MAIL FROM:<{from}>")).await), "250");
        for t in to {
            assert_eq!(code(&self.cmd(&format!("RCPT TO:<{t}>")).await), "250");
        }
        assert_eq!(code(&self.cmd("DATA").await), "354");
        self.send(data).await;
        self.send(b".\r\n").await;
        self.reply().await
    }
}

fn code(reply: &str) -> &str {
    &reply[..3.min(reply.len())]
}

/// Finding 2: GoCD state grew with every pipeline name a sender made up
/// (200 mails with 400 kB names: 18 → 97 MB, and 200 MB of log).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gocd_state_stays_bounded_whatever_the_subjects() {
    let s = setup("  max-states: 40\n", "");
    let port = s.route.port;
    let labels = "{manager=\"gocd\",wants=\"to:gocd@example.org\"";
    let (mut raw, _) = Raw::connect(port).await;
    assert_eq!(code(&raw.cmd("EHLO many.test").await), "250");
    // 100 made-up pipelines: 40 are remembered, 60 routed on GoCD's word.
    for i in 0..100 {
        let data = format!("Subject: Stage [made-up-{i}/1/build/1] failed\r\n\r\nx\r\n");
        let r = raw
            .mail("gocd@example.com", &["gocd@example.org"], data.as_bytes())
            .await;
        assert_eq!(code(&r), "250", "{r}");
    }
    // Known stages are still tracked: FAILS then PASSES is FIXED.
    let data = b"Subject: Stage [made-up-0/2/build/1] passed\r\n\r\nx\r\n";
    assert_eq!(
        code(
            &raw.mail("gocd@example.com", &["gocd@example.org"], data)
                .await
        ),
        "250"
    );
    s.route.wait_log("event FIXED (GoCD said PASSES", 1);
    let rss_before = s.route.rss_kb();
    // 60 mails with 400 kB pipeline names: never stored, never logged whole.
    let huge = "p".repeat(400_000);
    for i in 0..60 {
        let data = format!("Subject: Stage [{huge}{i}/1/build/1] passed\r\n\r\nx\r\n");
        let r = raw
            .mail("gocd@example.com", &["gocd@example.org"], data.as_bytes())
            .await;
        assert_eq!(code(&r), "250", "{r}");
    }
    assert_eq!(code(&raw.cmd("QUIT").await), "221");
    // Nothing lost: every mail reached dev@example.net.
    let got = s.sink.wait_for_async(161, WAIT).await;
    assert_eq!(got.len(), 161, "{}", s.route.log());

    assert_eq!(
        s.route
            .metric(&format!("mailgend_route_gocd_pipelines_known{labels}}}"))
            .await,
        40.0
    );
    assert_eq!(
        s.route
            .metric(&format!(
                "mailgend_route_gocd_stages_untracked_total{labels},reason=\"table_full\"}}"
            ))
            .await,
        60.0
    );
    assert_eq!(
        s.route
            .metric(&format!(
                "mailgend_route_gocd_stages_untracked_total{labels},reason=\"name_too_long\"}}"
            ))
            .await,
        60.0
    );
    let log = s.route.log();
    // 24 MB of names went in; the log shows each at most clipped.
    assert!(log.len() < 1_000_000, "log is {} bytes", log.len());
    assert!(!log.contains(&"p".repeat(201)), "a name logged unclipped");
    // The WARN is rate-limited: one a minute, whatever the flood.
    assert_eq!(
        log.matches("GoCD stage result not kept").count(),
        1,
        "{log}"
    );
    // And memory stays flat (before the fix it grew by the names' size,
    // 24 MB here, plus their lower-case copies).
    let rss_after = s.route.rss_kb();
    assert!(
        rss_after < rss_before + 16_000,
        "RSS {rss_before} kB → {rss_after} kB"
    );
}
