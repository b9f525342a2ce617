//! Observability of the always-on service, with real parts: log lines of a
//! real child process (plain stderr, and the journal's native protocol on a
//! real datagram socket), the `/metrics` endpoint over real TCP (raw
//! requests and `curl`), and the shipped systemd unit checked by
//! `systemd-analyze verify`.
//!
//! Logging can be set up once per process, so the log tests re-run this
//! test executable as a child, filtered to one `helper_*` test that only
//! acts when `MAILGEND_OBS_HELPER` names it (and passes trivially otherwise).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mailgend::notify::metrics::{FailReason, Metrics};
use mailgend::shared::metrics::{self, ServeLimits};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

const HELPER_VAR: &str = "MAILGEND_OBS_HELPER";

fn helper_is(name: &str) -> bool {
    std::env::var(HELPER_VAR).as_deref() == Ok(name)
}

/// Runs this test executable as a child that runs only the helper test
/// `name`, with `env` set and the logging-related variables of our own
/// environment removed.
fn run_helper(name: &str, env: &[(&str, &str)], wrap: Option<&[&str]>) -> Command {
    let exe = std::env::current_exe().expect("the test executable");
    let mut cmd = match wrap {
        Some(prefix) => {
            let mut c = Command::new(prefix[0]);
            c.args(&prefix[1..]).arg(&exe);
            c
        }
        None => Command::new(&exe),
    };
    cmd.args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env_remove("JOURNAL_STREAM")
        .env_remove("MAILGEND_LOG")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("RUST_LOG")
        .env(HELPER_VAR, name)
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

fn output_of(mut cmd: Command) -> (Output, String) {
    let out = cmd.output().expect("run the helper");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "helper failed: {}\nstdout:\n{}\nstderr:\n{stderr}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
    (out, stderr)
}

// ---------------------------------------------------------------- logging

/// Child side of the plain-log tests.
#[test]
fn helper_plain_log() {
    if !helper_is("helper_plain_log") {
        return;
    }
    mailgend::shared::logging::init("INFO", 0);
    // A second init must not replace the first (or panic).
    mailgend::shared::logging::init("DEBUG", 0);
    tracing::error!(
        target: "mailgend::notify::pipeline",
        directive_ids = %"1,2",
        ticket = %"20261123-10000001",
        recipient = %"abuse@example.net",
        "sending failed"
    );
    tracing::info!(target: "mailgend::notify::service", "an info line");
    tracing::debug!(target: "mailgend::notify::service", "a debug line");
    tracing::info!(target: "tokio_postgres::connection", "another crate's info");
    tracing::warn!(target: "tokio_postgres::connection", "another crate's warning");
    // A config reload that lowers the level (ignored under MAILGEND_LOG).
    mailgend::shared::logging::set_level("DEBUG", 0);
    tracing::debug!(target: "mailgend::notify::service", "debug after reload");
}

fn plain_log(env: &[(&str, &str)]) -> String {
    output_of(run_helper("helper_plain_log", env, None)).1
}

#[test]
fn plain_log_lines_are_greppable() {
    let stderr = plain_log(&[]);
    let lines: Vec<&str> = stderr.lines().collect();
    let error = lines
        .iter()
        .find(|l| l.contains("sending failed"))
        .unwrap_or_else(|| panic!("no error line in:\n{stderr}"));
    // 2026-11-23T05:59:23.417Z ERROR mailgend::notify::pipeline: sending failed directive_ids=…
    let (ts, rest) = error.split_once(' ').unwrap();
    assert!(
        chrono::DateTime::parse_from_rfc3339(ts).is_ok() && ts.ends_with('Z'),
        "timestamp {ts:?} in {error:?}"
    );
    assert_eq!(ts.len(), "2026-11-23T05:59:23.417Z".len(), "{error:?}");
    assert_eq!(
        rest,
        "ERROR mailgend::notify::pipeline: sending failed directive_ids=1,2 \
         ticket=20261123-10000001 recipient=abuse@example.net"
    );
    assert!(
        !stderr.contains('\x1b'),
        "no colours into a pipe:\n{stderr}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.ends_with(" INFO mailgend::notify::service: an info line")),
        "{stderr}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.ends_with(" WARN tokio_postgres::connection: another crate's warning")),
        "{stderr}"
    );
    // INFO from the config: no DEBUG, no other crates' INFO; the second init
    // changed nothing, set_level did.
    assert!(!stderr.contains("a debug line"), "{stderr}");
    assert!(!stderr.contains("another crate's info"), "{stderr}");
    assert!(
        lines
            .iter()
            .any(|l| l.ends_with(" DEBUG mailgend::notify::service: debug after reload")),
        "{stderr}"
    );
    assert_eq!(lines.len(), 4, "{stderr}");
}

#[test]
fn mailgend_log_overrides_config_and_reload() {
    let stderr = plain_log(&[("MAILGEND_LOG", "mailgend=warn,tokio_postgres=info")]);
    assert!(
        stderr.contains("ERROR mailgend::notify::pipeline: sending failed"),
        "{stderr}"
    );
    assert!(!stderr.contains("an info line"), "{stderr}");
    assert!(stderr.contains("another crate's info"), "{stderr}");
    assert!(!stderr.contains("debug after reload"), "{stderr}");

    // An unusable override is reported and the config level applies.
    let stderr = plain_log(&[("MAILGEND_LOG", "mailgend=loud")]);
    assert!(
        stderr.contains("WARN") && stderr.contains("ignoring MAILGEND_LOG"),
        "{stderr}"
    );
    assert!(stderr.contains("an info line"), "{stderr}");
}

/// Child side of the journald test: runs in a private mount namespace
/// where a tmpfs replaces /run, so it can be "journald" at
/// /run/systemd/journal/socket (the path tracing-journald writes to).
#[test]
fn helper_journald_log() {
    if !helper_is("helper_journald_log") {
        return;
    }
    use std::os::unix::net::UnixDatagram;
    let journal = UnixDatagram::bind("/run/systemd/journal/socket").expect("bind the journal");
    assert!(
        mailgend::shared::systemd::under_journald(),
        "JOURNAL_STREAM names our stderr"
    );
    match std::env::var("MAILGEND_OBS_IDENT") {
        Ok(ident) => mailgend::shared::logging::init_as(&ident, "INFO", 0),
        Err(_) => mailgend::shared::logging::init("INFO", 0),
    }
    tracing::error!(
        target: "mailgend::notify::pipeline",
        directive_ids = %"1,2",
        event_ids = %"7,8,9",
        ticket = %"20261123-10000001",
        recipient = %"abuse@example.net",
        format = %"avalanche_csv",
        "sending failed"
    );
    tracing::warn!(target: "mailgend::notify::service", "a warning");
    tracing::info!(target: "mailgend::notify::service", "an info line");
    tracing::debug!(target: "mailgend::notify::service", "a debug line");
    // Each event was one send() on a datagram socket: all are queued by now.
    journal.set_nonblocking(true).unwrap();
    // Datagrams are written as (u32 LE length, bytes): the native protocol
    // is binary for values that may hold newlines (MESSAGE).
    let mut records = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n) = journal.recv(&mut buf) {
        // tracing-journald probes the socket with an empty datagram.
        if n > 0 {
            records.extend_from_slice(&(n as u32).to_le_bytes());
            records.extend_from_slice(&buf[..n]);
        }
    }
    let out = std::env::var("MAILGEND_OBS_OUT").unwrap();
    std::fs::write(out, records).unwrap();
}

/// Fields of one datagram of the journal's native protocol
/// (systemd.io/JOURNAL_NATIVE_PROTOCOL): `NAME=value\n`, or for values
/// that may contain newlines `NAME\n`, a 64-bit little-endian length, the
/// value and `\n`.
fn journal_fields(mut d: &[u8]) -> BTreeMap<String, String> {
    let mut fields = BTreeMap::new();
    while !d.is_empty() {
        let end = d
            .iter()
            .position(|&b| b == b'=' || b == b'\n')
            .expect("a field name ends with = or a newline");
        let name = String::from_utf8(d[..end].to_vec()).unwrap();
        let (value, rest) = if d[end] == b'=' {
            let rest = &d[end + 1..];
            let nl = rest
                .iter()
                .position(|&b| b == b'\n')
                .expect("value line end");
            (&rest[..nl], &rest[nl + 1..])
        } else {
            let rest = &d[end + 1..];
            let len = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
            let value = &rest[8..8 + len];
            assert_eq!(
                rest[8 + len],
                b'\n',
                "binary field {name} ends with a newline"
            );
            (value, &rest[8 + len + 1..])
        };
        let previous = fields.insert(name.clone(), String::from_utf8_lossy(value).into_owned());
        assert!(previous.is_none(), "field {name} sent twice");
        d = rest;
    }
    fields
}

fn journal_records(mut d: &[u8]) -> Vec<BTreeMap<String, String>> {
    let mut records = Vec::new();
    while !d.is_empty() {
        let n = u32::from_le_bytes(d[..4].try_into().unwrap()) as usize;
        records.push(journal_fields(&d[4..4 + n]));
        d = &d[4 + n..];
    }
    records
}

/// Can this process make a private mount namespace with a tmpfs on /run?
/// (root on Linux: yes; an unprivileged developer machine: no.)
fn private_run_possible() -> bool {
    Command::new("unshare")
        .args(["-m", "sh", "-c", "mount -t tmpfs tmpfs /run"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Runs `helper_journald_log` with a stand-in journald (private mount
/// namespace, tmpfs on /run) and `extra` in its environment; the records
/// it received. `None` where this machine cannot do that (not root).
fn journal_of_helper(extra: &[(&str, &str)]) -> Option<Vec<BTreeMap<String, String>>> {
    if !private_run_possible() {
        eprintln!("SKIPPED: needs `unshare -m` and mount (root) to stand in for journald");
        return None;
    }
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let stderr_path = dir.path().join("stderr");
    let out_path = dir.path().join("records");
    let stderr_file = std::fs::File::create(&stderr_path).unwrap();
    let meta = stderr_file.metadata().unwrap();
    // What systemd sets for a service whose stderr is the journal stream.
    let stream = format!("{}:{}", meta.dev(), meta.ino());
    let mut env = vec![
        ("JOURNAL_STREAM", stream.as_str()),
        ("MAILGEND_OBS_OUT", out_path.to_str().unwrap()),
    ];
    env.extend_from_slice(extra);
    let mut cmd = run_helper(
        "helper_journald_log",
        &env,
        Some(&[
            "unshare",
            "-m",
            "sh",
            "-c",
            "mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/journal && exec \"$@\"",
            "sh",
        ]),
    );
    cmd.stderr(stderr_file);
    let out = cmd.output().unwrap();
    let child_stderr = std::fs::read_to_string(&stderr_path).unwrap();
    assert!(
        out.status.success(),
        "helper failed: {}\n{}\n{child_stderr}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
    // Under the journal nothing goes to stderr as plain lines.
    assert!(
        !child_stderr.contains("sending failed"),
        "plain lines under journald:\n{child_stderr}"
    );
    Some(journal_records(&std::fs::read(&out_path).unwrap()))
}

/// The router logs as `mailgend-route` (`logging::init_as`, called by
/// `mailgend route`), so `journalctl -t mailgend-route` finds it.
#[test]
fn the_router_has_its_own_journal_identifier() {
    let Some(records) = journal_of_helper(&[("MAILGEND_OBS_IDENT", "mailgend-route")]) else {
        return;
    };
    assert_eq!(records.len(), 3, "{records:#?}");
    for r in &records {
        assert_eq!(r["SYSLOG_IDENTIFIER"], "mailgend-route", "{r:?}");
    }
}

/// A template unit's instance (`mailgend@NAME`, `mailgend-route@NAME`)
/// sets `MAILGEND_SYSLOG_IDENTIFIER`; it wins over the daemon's name.
#[test]
fn an_instance_has_its_own_journal_identifier() {
    let Some(records) = journal_of_helper(&[
        ("MAILGEND_OBS_IDENT", "mailgend-route"),
        ("MAILGEND_SYSLOG_IDENTIFIER", "mailgend-route-b"),
    ]) else {
        return;
    };
    assert_eq!(records.len(), 3, "{records:#?}");
    for r in &records {
        assert_eq!(r["SYSLOG_IDENTIFIER"], "mailgend-route-b", "{r:?}");
    }
}

#[test]
fn journald_gets_structured_fields_and_priorities() {
    let Some(records) = journal_of_helper(&[]) else {
        return;
    };
    assert_eq!(
        records.len(),
        3,
        "error, warning, info; no debug: {records:#?}"
    );

    let e = &records[0];
    assert_eq!(e["MESSAGE"], "sending failed");
    assert_eq!(e["PRIORITY"], "3");
    assert_eq!(e["DIRECTIVE_IDS"], "1,2");
    assert_eq!(e["EVENT_IDS"], "7,8,9");
    assert_eq!(e["TICKET"], "20261123-10000001");
    assert_eq!(e["RECIPIENT"], "abuse@example.net");
    assert_eq!(e["FORMAT"], "avalanche_csv");
    assert_eq!(e["TARGET"], "mailgend::notify::pipeline");
    assert_eq!(e["SYSLOG_IDENTIFIER"], "mailgend");
    assert!(
        !e.keys().any(|k| k.starts_with("F_")),
        "no field prefix: {e:?}"
    );

    // What `journalctl -p err` selects (PRIORITY 0..=3), the replacement
    // for intelmq-mailgen's `grep ERROR` (docs/migration.md, "Log
    // monitors"): exactly the ERROR event; `-p warning` adds the WARN one.
    let selected = |max: u8| -> Vec<&str> {
        records
            .iter()
            .filter(|r| r["PRIORITY"].parse::<u8>().unwrap() <= max)
            .map(|r| r["MESSAGE"].as_str())
            .collect()
    };
    assert_eq!(selected(3), ["sending failed"]);
    assert_eq!(selected(4), ["sending failed", "a warning"]);

    assert_eq!(records[1]["MESSAGE"], "a warning");
    assert_eq!(records[1]["PRIORITY"], "4");
    assert_eq!(records[2]["MESSAGE"], "an info line");
    assert_eq!(records[2]["PRIORITY"], "6");
}

// ---------------------------------------------------------------- metrics

struct Response {
    status: u16,
    headers: BTreeMap<String, String>,
    body: String,
}

/// Sends `raw` and reads until the server closes the connection.
async fn exchange(addr: SocketAddr, raw: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(raw).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .expect("the server closes the connection")?;
    Ok(buf)
}

fn parse_response(raw: &[u8]) -> Response {
    let text = String::from_utf8(raw.to_vec()).expect("utf-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("a complete head");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let mut parts = status_line.splitn(3, ' ');
    assert_eq!(parts.next(), Some("HTTP/1.1"), "{status_line}");
    let status = parts.next().unwrap().parse().unwrap();
    let headers = lines
        .map(|l| {
            let (k, v) = l.split_once(':').expect("header line");
            (k.trim().to_ascii_lowercase(), v.trim().to_string())
        })
        .collect();
    Response {
        status,
        headers,
        body: body.to_string(),
    }
}

async fn get_accept(addr: SocketAddr, path: &str, accept: &str) -> Response {
    let raw = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: {accept}\r\n\r\n");
    parse_response(&exchange(addr, raw.as_bytes()).await.unwrap())
}

async fn get(addr: SocketAddr, method: &str, path: &str) -> Response {
    let raw = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: test\r\n\r\n");
    parse_response(&exchange(addr, raw.as_bytes()).await.unwrap())
}

struct Server {
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

async fn start(limits: Option<ServeLimits>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let metrics = Arc::new(Metrics::new());
    let (stop, stopped) = oneshot::channel::<()>();
    let shutdown = async move {
        let _ = stopped.await;
    };
    let m = metrics.clone();
    let task = match limits {
        Some(l) => tokio::spawn(metrics::serve_with(listener, m, shutdown, l)),
        None => tokio::spawn(metrics::serve(listener, m, shutdown)),
    };
    Server {
        addr,
        metrics,
        stop: Some(stop),
        task,
    }
}

impl Server {
    async fn stop(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(3), self.task)
            .await
            .expect("serve ends soon after shutdown")
            .unwrap()
            .unwrap();
    }
}

/// Short enough for a quick test, long enough that a loaded 2-core
/// machine serves a normal request well within it.
const HEAD_TIMEOUT: Duration = Duration::from_millis(1000);

fn quick_limits() -> ServeLimits {
    ServeLimits {
        head_timeout: HEAD_TIMEOUT,
        max_head: 8 * 1024,
        max_connections: 4,
    }
}

#[tokio::test]
async fn metrics_endpoint_serves_current_values() {
    let server = start(Some(quick_limits())).await;
    let m = &server.metrics;
    for _ in 0..3 {
        m.mail_sent();
    }
    m.mail_failed(FailReason::Temporary);
    m.group_postponed();
    m.set_pending_directives(42);
    m.set_due_groups(5);
    m.set_up(true);
    m.observe_send(Duration::from_millis(30));
    let busy = m.worker_busy();

    // No Accept header: the classic text format.
    let r = get(server.addr, "GET", "/metrics").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["content-type"], metrics::TEXT_CONTENT_TYPE);
    assert_eq!(r.headers["content-length"], r.body.len().to_string());
    assert_eq!(r.headers["connection"], "close");
    assert!(
        r.body.contains("# HELP mailgend_mails_sent_total "),
        "{}",
        r.body
    );
    assert!(!r.body.contains("# EOF"), "{}", r.body);
    // What Prometheus asks for: OpenMetrics.
    let r = get_accept(
        server.addr,
        "/metrics",
        "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;\
         q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["content-type"], metrics::CONTENT_TYPE);
    assert!(r.body.contains("# HELP mailgend_mails_sent "), "{}", r.body);
    assert!(r.body.ends_with("# EOF\n"));
    assert!(r
        .body
        .contains("# TYPE mailgend_send_duration_seconds histogram"));
    let v = metrics::parse_exposition(&r.body);
    assert_eq!(v["mailgend_mails_sent_total"], 3.0);
    assert_eq!(v["mailgend_mails_failed_total{reason=\"temporary\"}"], 1.0);
    assert_eq!(v["mailgend_mails_failed_total{reason=\"permanent\"}"], 0.0);
    assert_eq!(v["mailgend_groups_postponed_total"], 1.0);
    assert_eq!(v["mailgend_pending_directives"], 42.0);
    assert_eq!(v["mailgend_due_groups"], 5.0);
    assert_eq!(v["mailgend_workers_busy"], 1.0);
    assert_eq!(v["mailgend_up"], 1.0);
    assert_eq!(
        v["mailgend_send_duration_seconds_bucket{le=\"0.025\"}"],
        0.0
    );
    assert_eq!(v["mailgend_send_duration_seconds_bucket{le=\"0.05\"}"], 1.0);
    drop(busy);

    // Values are read at scrape time.
    m.mail_sent();
    let r = get(server.addr, "GET", "/metrics?x=1").await;
    let v = metrics::parse_exposition(&r.body);
    assert_eq!(v["mailgend_mails_sent_total"], 4.0);
    assert_eq!(v["mailgend_workers_busy"], 0.0);

    // A real client: curl, as an operator would check it.
    let url = format!("http://{}/metrics", server.addr);
    let out = tokio::process::Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "-w",
            "\n%{http_code} %{content_type}",
            &url,
        ])
        .output()
        .await
        .expect("curl is installed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, trailer) = text.rsplit_once('\n').unwrap();
    assert_eq!(trailer, format!("200 {}", metrics::TEXT_CONTENT_TYPE));
    let v = metrics::parse_exposition(body);
    assert_eq!(v["mailgend_mails_sent_total"], 4.0);

    let r = get(server.addr, "GET", "/").await;
    assert_eq!(r.status, 200);
    assert!(r.body.contains("/metrics"));
    let r = get(server.addr, "GET", "/metricsx").await;
    assert_eq!(r.status, 404);
    let r = get(server.addr, "POST", "/metrics").await;
    assert_eq!(r.status, 405);
    let r = get(server.addr, "HEAD", "/metrics").await;
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty());
    assert!(r.headers["content-length"].parse::<usize>().unwrap() > 100);

    server.stop().await;
}

#[tokio::test]
async fn bad_and_slow_clients_are_closed_without_hurting_others() {
    let server = start(Some(quick_limits())).await;
    let addr = server.addr;

    // Not HTTP (a TLS ClientHello-like start): 400, closed.
    let raw = exchange(addr, b"\x16\x03\x01\x02\x00 / HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    assert!(raw.starts_with(b"HTTP/1.1 400 "), "{raw:?}");
    let raw = exchange(addr, b"GET /metrics\r\n\r\n").await.unwrap();
    assert!(raw.starts_with(b"HTTP/1.1 400 "), "{raw:?}");
    assert_eq!(get(addr, "GET", "/metrics").await.status, 200);

    // A head that never ends: 431 once past the limit, closed.
    let mut huge = b"GET /metrics HTTP/1.1\r\nX-Fill: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 16 * 1024));
    let raw = exchange(addr, &huge).await.unwrap_or_default();
    // The server may close while we still write; then there is no response
    // to read, but it must not have answered 200.
    assert!(
        raw.is_empty() || raw.starts_with(b"HTTP/1.1 431 "),
        "{:?}",
        String::from_utf8_lossy(&raw)
    );

    // Slowloris: half a request line, then silence.
    let started = Instant::now();
    let mut slow = TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /metr").await.unwrap();
    // Others are served meanwhile.
    let r = get(addr, "GET", "/metrics").await;
    assert_eq!(r.status, 200);
    assert!(started.elapsed() < HEAD_TIMEOUT);
    let mut buf = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut buf))
        .await
        .expect("the slow client is cut off")
        .unwrap_or(0);
    assert_eq!(n, 0, "no response for an incomplete request");
    let waited = started.elapsed();
    assert!(
        waited >= HEAD_TIMEOUT - Duration::from_millis(100)
            && waited < HEAD_TIMEOUT + Duration::from_secs(3),
        "closed after the head timeout, not before: {waited:?}"
    );

    // A client that connects and closes at once.
    drop(TcpStream::connect(addr).await.unwrap());

    // Too many slow clients: the ones past the limit are closed at once,
    // and once the slow ones time out the endpoint works again.
    let mut slow = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET").await.unwrap();
        slow.push(s);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let refused = exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n")
        .await
        .unwrap_or_default();
    assert!(refused.is_empty(), "over the limit: closed without answer");
    tokio::time::sleep(HEAD_TIMEOUT + Duration::from_millis(300)).await;
    assert_eq!(get(addr, "GET", "/metrics").await.status, 200);
    drop(slow);

    server.stop().await;
}

#[tokio::test]
async fn shutdown_ends_serve_even_with_a_client_hanging() {
    // Default limits (5 s head timeout): shutdown must not wait for it.
    let server = start(None).await;
    let addr = server.addr;
    assert_eq!(get(addr, "GET", "/metrics").await.status, 200);
    let mut hanging = TcpStream::connect(addr).await.unwrap();
    hanging.write_all(b"GET /").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    server.stop().await;
    assert!(started.elapsed() < Duration::from_secs(2));
    // The hanging connection is closed and the port no longer answers.
    let mut buf = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(2), hanging.read_to_end(&mut buf))
        .await
        .expect("closed by shutdown")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(TcpStream::connect(addr).await.is_err());
}

/// The endpoint listens before the database is reachable: a service that
/// waits for PostgreSQL says so on /metrics instead of vanishing.
#[tokio::test]
async fn metrics_answer_while_the_database_is_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let (db_port, metrics_port) = {
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        (
            a.local_addr().unwrap().port(),
            b.local_addr().unwrap().port(),
        )
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = serde_json::json!({
        "database": {"event": {"name": "intelmq-events", "username": "nobody",
            "password": "x", "host": "127.0.0.1", "port": db_port}},
        "template_dir": root.join("config/templates"),
        "script_directory": root.join("config/formats"),
        "sender": "CERT <cert@example.org>",
        "smtp": {"host": "127.0.0.1", "port": 1},
        "openpgp": {"always_sign": false},
        "mailgend": {"metrics_listen": format!("127.0.0.1:{metrics_port}")}
    });
    let path = dir.path().join("intelmq-mailgen.conf");
    std::fs::write(&path, config.to_string()).unwrap();
    let log = dir.path().join("log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_mailgend"))
        .arg("-c")
        .arg(&path)
        .arg("run")
        .env("HOME", dir.path())
        .env_remove("NOTIFY_SOCKET")
        .env_remove("MAILGEND_LOG")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{metrics_port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let v = loop {
        if let Ok(raw) = exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n").await {
            let v = metrics::parse_exposition(&parse_response(&raw).body);
            if v.get("mailgend_db_errors_total").is_some_and(|n| *n >= 1.0) {
                break v;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no scrape showing the database error:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(v["mailgend_up"], 0.0);
    assert_eq!(v["mailgend_database_up"], 0.0);
    assert!(std::fs::read_to_string(&log)
        .unwrap()
        .contains("database unreachable"),);
}

// ---------------------------------------------------------------- systemd

fn unit_text() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/mailgend.service");
    std::fs::read_to_string(path).unwrap()
}

/// `key=value` settings of the unit (the last one wins, as for systemd;
/// `SystemCallFilter` and the like are listed several times, so they are
/// checked on the text).
fn settings(text: &str) -> BTreeMap<&str, &str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .collect()
}

fn systemd_analyze_verify(unit: &Path) -> Option<Output> {
    match Command::new("systemd-analyze")
        .arg("verify")
        .arg(unit)
        // It may try to talk to a running systemd; there is none to ask.
        .env("SYSTEMD_LOG_LEVEL", "notice")
        .output()
    {
        Ok(out) => Some(out),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => panic!("running systemd-analyze: {e}"),
    }
}

#[test]
fn the_unit_passes_systemd_analyze_verify() {
    let text = unit_text();
    let exec = "ExecStart=/usr/bin/mailgend run";
    assert!(text.contains(exec), "the shipped unit starts {exec:?}");
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("mailgend.service");
    // verify checks that ExecStart= is executable: point it at the binary
    // this test run built.
    let local = text.replace(
        exec,
        &format!("ExecStart={} run", env!("CARGO_BIN_EXE_mailgend")),
    );
    std::fs::write(&unit, &local).unwrap();
    let Some(out) = systemd_analyze_verify(&unit) else {
        eprintln!("SKIPPED the_unit_passes_systemd_analyze_verify: systemd-analyze not installed");
        return;
    };
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && report.trim().is_empty(),
        "systemd-analyze verify: {}\n{report}",
        out.status
    );

    // The same check does notice a broken unit here (an unknown key is only
    // a warning, a missing binary an error), so the clean result above
    // means something.
    let broken = local.replace("ProtectSystem=strict", "ProtectSytem=strict");
    std::fs::write(&unit, broken).unwrap();
    let out = systemd_analyze_verify(&unit).unwrap();
    let report = String::from_utf8_lossy(&out.stderr);
    assert!(report.contains("ProtectSytem"), "{report}");
    std::fs::write(&unit, &text).unwrap();
    if !Path::new("/usr/bin/mailgend").exists() {
        let out = systemd_analyze_verify(&unit).unwrap();
        assert!(
            !out.status.success(),
            "a missing ExecStart binary is an error"
        );
    }
}

#[test]
fn the_unit_keeps_its_contract() {
    let text = unit_text();
    let s = settings(&text);
    assert_eq!(s["Type"], "notify");
    assert_eq!(s["ExecReload"], "/bin/kill -HUP $MAINPID");
    assert_eq!(s["Restart"], "on-failure");
    assert_eq!(s["WatchdogSec"], "30s");
    assert_eq!(s["User"], "mailgend");
    assert_eq!(s["Group"], "mailgend");
    assert!(!s.contains_key("DynamicUser"));
    assert_eq!(s["ProtectSystem"], "strict");
    assert_eq!(s["ProtectHome"], "yes");
    assert_eq!(s["NoNewPrivileges"], "yes");
    assert_eq!(s["PrivateTmp"], "yes");
    assert_eq!(s["CapabilityBoundingSet"], "");
    assert_eq!(s["UMask"], "0077");
    assert_eq!(s["RestrictAddressFamilies"], "AF_UNIX AF_INET AF_INET6");
    // Stop must outlast the drain deadline (mailgend.shutdown_deadline,
    // 30 s by default) or systemd kills mails in flight.
    let stop: u64 = s["TimeoutStopSec"].trim_end_matches('s').parse().unwrap();
    assert!(stop > 30, "TimeoutStopSec={stop}s");
    // gpg needs setrlimit (core dumps off): @resources must stay allowed.
    assert!(text.contains("SystemCallFilter=@system-service"));
    assert!(!text.contains("~@privileged @resources"));
}
