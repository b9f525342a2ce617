//! `mailgend route` for the operator, end to end with the real binary:
//! the Prometheus `/metrics` endpoint (scraped over HTTP after real SMTP
//! traffic, a fake GoCD that fails and a fake Slack API), SIGHUP keeping
//! what the gocd manager learnt when GoCD's settings are unchanged, and
//! SIGHUP moving `local-smtp` and changing `max-connections` without a
//! restart.
//!
//! Long (over 800 lines) because each test is one whole scenario against
//! the real binary with its own configuration and traffic; what they share
//! (starting the router, the raw SMTP client) is in `tests/common/`.

use std::collections::{BTreeMap, HashMap};
use std::net::TcpListener as StdListener;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lettre::address::Envelope;
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
use mailgend::sandbox::smtp_sink::{Failure, Fault, Scope, Stage};
use mailgend::sandbox::SmtpSink;
use mailgend::shared::metrics::parse_exposition;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[path = "common/raw_smtp.rs"]
mod raw_smtp;
use raw_smtp::{code, free_port, Raw};

#[path = "common/route_process.rs"]
mod route_process;
use route_process::RouteProcess as Route;

const WAIT: Duration = Duration::from_secs(15);

/// `N` distinct free ports (held together while picked, so no two are the
/// same).
fn free_ports<const N: usize>() -> [u16; N] {
    let held: Vec<StdListener> = (0..N)
        .map(|_| StdListener::bind("127.0.0.1:0").unwrap())
        .collect();
    std::array::from_fn(|i| held[i].local_addr().unwrap().port())
}

// ---------------------------------------------------------------------------
// A fake HTTP service (GoCD, Slack): fixed answers per path, changeable
// ---------------------------------------------------------------------------

struct FakeHttp {
    port: u16,
    routes: Arc<Mutex<HashMap<String, (u16, String)>>>,
    hits: Arc<Mutex<Vec<String>>>,
}

impl FakeHttp {
    async fn start() -> FakeHttp {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let routes: Arc<Mutex<HashMap<String, (u16, String)>>> = Arc::default();
        let hits: Arc<Mutex<Vec<String>>> = Arc::default();
        let (r2, h2) = (routes.clone(), hits.clone());
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let (routes, hits) = (r2.clone(), h2.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    // The head, then the body by Content-Length.
                    let path = loop {
                        let n = sock.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        let text = String::from_utf8_lossy(&buf).to_string();
                        let Some((head, body)) = text.split_once("\r\n\r\n") else {
                            continue;
                        };
                        let len: usize = head
                            .lines()
                            .filter_map(|l| l.split_once(':'))
                            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                            .and_then(|(_, v)| v.trim().parse().ok())
                            .unwrap_or(0);
                        if body.len() < len {
                            continue;
                        }
                        break head
                            .split(' ')
                            .nth(1)
                            .unwrap_or("")
                            .split('?')
                            .next()
                            .unwrap_or("")
                            .to_string();
                    };
                    let (status, body) = routes
                        .lock()
                        .unwrap()
                        .get(&path)
                        .cloned()
                        .unwrap_or((404, "not found".into()));
                    hits.lock().unwrap().push(path);
                    let head = format!(
                        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n\
                         Content-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = sock.write_all(head.as_bytes()).await;
                    let _ = sock.write_all(body.as_bytes()).await;
                    let _ = sock.shutdown().await;
                });
            }
        });
        FakeHttp { port, routes, hits }
    }

    fn set(&self, path: &str, status: u16, body: &str) {
        self.routes
            .lock()
            .unwrap()
            .insert(path.to_string(), (status, body.to_string()));
    }

    fn hits(&self, path: &str) -> usize {
        self.hits
            .lock()
            .unwrap()
            .iter()
            .filter(|p| *p == path)
            .count()
    }
}

const GROUPS_JSON: &str =
    r#"[{"name": "my-group", "pipelines": [{"name": "ppp"}, {"name": "qqq"}]}]"#;

fn cctray(ppp: &str) -> String {
    format!(
        r#"<?xml version="1.0" encoding="utf-8"?>
<Projects>
  <Project name="ppp :: build" activity="Sleeping" lastBuildStatus="{ppp}" lastBuildLabel="1" lastBuildTime="2026-11-21T10:00:00Z" webUrl="http://ci/go/ppp"/>
  <Project name="qqq :: build" activity="Sleeping" lastBuildStatus="Success" lastBuildLabel="1" lastBuildTime="2026-11-21T10:00:00Z" webUrl="http://ci/go/qqq"/>
</Projects>"#
    )
}

// ---------------------------------------------------------------------------
// SMTP clients, the scraper (the binary: common/route_process.rs)
// ---------------------------------------------------------------------------

async fn lettre_send(port: u16, from: &str, to: &[&str], data: &[u8]) {
    let data = data.strip_suffix(b"\r\n").unwrap_or(data);
    let env = Envelope::new(
        Some(from.parse().unwrap()),
        to.iter().map(|t| t.parse().unwrap()).collect(),
    )
    .unwrap();
    AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
        .port(port)
        .timeout(Some(Duration::from_secs(10)))
        .build()
        .send_raw(&env, data)
        .await
        .expect("accepted by the router");
}

/// One scrape of `/metrics` over HTTP.
async fn scrape(port: u16) -> BTreeMap<String, f64> {
    let resp = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .expect("the metrics endpoint answers");
    assert_eq!(resp.status().as_u16(), 200);
    let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
    // reqwest sends `Accept: */*`: the classic text format.
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    parse_exposition(&resp.text().await.unwrap())
}

/// Scrapes until `ok` holds for the page (counters move asynchronously:
/// GoCD polling, the spool worker).
async fn scrape_until(
    port: u16,
    what: &str,
    ok: impl Fn(&BTreeMap<String, f64>) -> bool,
) -> BTreeMap<String, f64> {
    let start = Instant::now();
    loop {
        let v = scrape(port).await;
        if ok(&v) {
            return v;
        }
        assert!(start.elapsed() < WAIT, "never {what}:\n{v:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn get(v: &BTreeMap<String, f64>, series: &str) -> f64 {
    *v.get(series)
        .unwrap_or_else(|| panic!("no {series} on the page:\n{v:#?}"))
}

// ---------------------------------------------------------------------------
// 1. /metrics
// ---------------------------------------------------------------------------

const MAIL_L: &str = "manager=\"mail\",wants=\"from:alerts@example.org\"";
const GOCD_L: &str = "manager=\"gocd\",wants=\"from:go@ci.example.org\"";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_the_router_did() {
    let gocd = FakeHttp::start().await;
    gocd.set(
        "/go/api/config/pipeline_groups",
        500,
        "down for maintenance",
    );
    gocd.set("/go/cctray.xml", 200, &cctray("Failure"));
    let slack = FakeHttp::start().await;
    slack.set("/api/chat.postMessage", 200, r#"{"ok":true}"#);
    let dir = tempfile::tempdir().unwrap();
    let sink = SmtpSink::start();
    let [port, mport, mport2] = free_ports();
    let text = format!(
        "local-smtp: 127.0.0.1:{port}
remote-smtp: 127.0.0.1:{sink}
slack-token: xoxb-test
slack-url: http://127.0.0.1:{slack}/api
managers:
- name: mail
  messages-we-want:
    from: alerts@example.org
  rules:
  - actions: [mailto:backup-team@example.net, slack:#ops]
    filter:
      function: mail.in_subject
      args: [server, backup]
- name: gocd
  messages-we-want:
    from: go@ci.example.org
  url: http://127.0.0.1:{gocd}/go
  refresh-interval: 0.2
  startup-wait: 0
  rules:
  - actions: [mailto:dev@example.net]
    filter:
      function: pipelines.any
mailgend:
  spool: {spool}
  # Long: the idle `raw` session must outlive the slow steps of a loaded
  # machine, or it is timed out before connections_open is read.
  command-timeout: 60
  metrics-listen: 127.0.0.1:{mport}
",
        sink = sink.port(),
        slack = slack.port,
        gocd = gocd.port,
        spool = dir.path().join("spool").display(),
    );
    std::fs::write(dir.path().join("configuration.yml"), &text).unwrap();
    let route = Route::start(dir.path(), WAIT);
    route.wait_log(&format!("metrics on http://127.0.0.1:{mport}/metrics"), 1);

    // GoCD fails: counted per manager; cctray still seeded both pipelines;
    // never a success, so the age is the time since the first attempt.
    let v = scrape_until(mport, "a failed GoCD fetch", |v| {
        v.get(&format!(
            "mailgend_route_gocd_fetches_total{{{GOCD_L},result=\"failed\"}}"
        ))
        .is_some_and(|n| *n >= 1.0)
    })
    .await;
    assert_eq!(
        get(
            &v,
            &format!("mailgend_route_gocd_fetches_total{{{GOCD_L},result=\"ok\"}}")
        ),
        0.0
    );
    assert_eq!(
        get(
            &v,
            &format!("mailgend_route_gocd_pipelines_known{{{GOCD_L}}}")
        ),
        2.0
    );
    let age = get(
        &v,
        &format!("mailgend_route_gocd_last_success_age_seconds{{{GOCD_L}}}"),
    );
    assert!((0.0..10.0).contains(&age), "{age}");
    assert_eq!(get(&v, "mailgend_route_messages_received_total"), 0.0);
    assert_eq!(get(&v, "mailgend_route_spool_messages"), 0.0);

    // Traffic, each kind once:
    // a) nobody wants it: forwarded unchanged to 2 recipients;
    lettre_send(
        port,
        "build@example.org",
        &["a@example.net", "b@example.net"],
        b"Subject: nightly\r\n\r\nx\r\n",
    )
    .await;
    // b) the mail manager takes it, a rule matches: 1 recipient + Slack;
    lettre_send(
        port,
        "alerts@example.org",
        &["x@example.net"],
        b"Subject: server backup failed\r\n\r\nx\r\n",
    )
    .await;
    // c) the mail manager takes it, no rule matches: dropped;
    lettre_send(
        port,
        "alerts@example.org",
        &["x@example.net"],
        b"Subject: disk full\r\n\r\nx\r\n",
    )
    .await;
    // d) the gocd manager takes it (pipelines.any works while GoCD fails);
    lettre_send(
        port,
        "go@ci.example.org",
        &["mail2alert@example.org"],
        b"Subject: Stage [ppp/1/build/1] passed\r\n\r\nx\r\n",
    )
    .await;
    let got = sink.wait_for_async(3, WAIT).await;
    assert_eq!(got.len(), 3, "{}", route.log());
    // e) refused for good while the client waits: 554;
    sink.set_fault(Fault::Fail {
        stage: Stage::Rcpt,
        failure: Failure::Permanent,
        scope: Scope::All,
    });
    let (mut raw, _) = Raw::connect(port).await;
    let r = raw
        .mail(
            "s@example.org",
            &["no@example.net"],
            b"Subject: no\r\n\r\nx\r\n",
        )
        .await;
    assert_eq!(code(&r), "554", "{r}");
    // f) one recipient refused for good, one accepted: 250 and a bounce;
    sink.set_fault(Fault::Fail {
        stage: Stage::Rcpt,
        failure: Failure::Permanent,
        scope: Scope::Recipient("gone@example.net".into()),
    });
    let r = raw
        .mail(
            "s@example.org",
            &["ok@example.net", "gone@example.net"],
            b"Subject: half\r\n\r\nx\r\n",
        )
        .await;
    assert_eq!(code(&r), "250", "{r}");
    let got = sink.wait_for_async(5, WAIT).await;
    assert_eq!(got.len(), 5, "{}", route.log());
    assert_eq!(got[4].mail_from, "", "the bounce");
    // g) a bare LF in the data: 554 from the session itself.
    let (mut bad, _) = Raw::connect(port).await;
    let r = bad
        .mail("s@example.org", &["x@example.net"], b"Subject: lf\nx\r\n")
        .await;
    assert_eq!(code(&r), "554", "{r}");

    let v = scrape_until(mport, "the bounce delivered", |v| {
        v.get("mailgend_route_bounces_sent_total") == Some(&1.0)
    })
    .await;
    let expect = [
        ("mailgend_route_messages_received_total", 7.0),
        ("mailgend_route_messages_accepted_total", 5.0),
        ("mailgend_route_messages_refused_total{class=\"4xx\"}", 0.0),
        ("mailgend_route_messages_refused_total{class=\"5xx\"}", 2.0),
        // a), e) and f): no manager wants mail from these senders.
        ("mailgend_route_messages_forwarded_unchanged_total", 3.0),
        ("mailgend_route_messages_dropped_total", 1.0),
        // a) 2 + b) 1 + d) 1 + f) 1 + the bounce 1
        ("mailgend_route_relay_recipients_delivered_total", 6.0),
        (
            "mailgend_route_relay_recipient_failures_total{kind=\"permanent\"}",
            2.0,
        ),
        (
            "mailgend_route_relay_recipient_failures_total{kind=\"temporary\"}",
            0.0,
        ),
        ("mailgend_route_slack_posts_total{result=\"ok\"}", 1.0),
        ("mailgend_route_slack_posts_total{result=\"failed\"}", 0.0),
        ("mailgend_route_spool_messages", 0.0),
        ("mailgend_route_spool_oldest_age_seconds", 0.0),
    ];
    for (series, want) in expect {
        assert_eq!(get(&v, series), want, "{series}\n{}", route.log());
    }
    assert_eq!(
        get(
            &v,
            &format!("mailgend_route_messages_routed_total{{{MAIL_L}}}")
        ),
        2.0
    );
    assert_eq!(
        get(
            &v,
            &format!("mailgend_route_messages_routed_total{{{GOCD_L}}}")
        ),
        1.0
    );
    assert_eq!(slack.hits("/api/chat.postMessage"), 1);

    // Temporary trouble: the message waits in the spool, visible as
    // depth and age; delivered once the relay is back.
    sink.set_fault(Fault::Fail {
        stage: Stage::Rcpt,
        failure: Failure::Temporary,
        scope: Scope::All,
    });
    lettre_send(
        port,
        "q@example.org",
        &["later@example.net"],
        b"Subject: later\r\n\r\nx\r\n",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let v = scrape(mport).await;
    assert_eq!(get(&v, "mailgend_route_spool_messages"), 1.0);
    let age = get(&v, "mailgend_route_spool_oldest_age_seconds");
    assert!((1.0..30.0).contains(&age), "{age}");
    assert!(
        get(
            &v,
            "mailgend_route_relay_recipient_failures_total{kind=\"temporary\"}"
        ) >= 1.0
    );
    // A Slack post that fails for good is counted too.
    slack.set(
        "/api/chat.postMessage",
        200,
        r#"{"ok":false,"error":"channel_not_found"}"#,
    );
    sink.set_fault(Fault::None);
    lettre_send(
        port,
        "alerts@example.org",
        &["x@example.net"],
        b"Subject: server backup again\r\n\r\nx\r\n",
    )
    .await;
    route.wait_log("spooled message done", 2);

    // GoCD answers again: a success, fresh age.
    gocd.set("/go/api/config/pipeline_groups", 200, GROUPS_JSON);
    let v = scrape_until(mport, "a good GoCD fetch and an empty spool", |v| {
        v.get(&format!(
            "mailgend_route_gocd_fetches_total{{{GOCD_L},result=\"ok\"}}"
        ))
        .is_some_and(|n| *n >= 1.0)
            && v.get("mailgend_route_spool_messages") == Some(&0.0)
    })
    .await;
    assert!(
        get(
            &v,
            &format!("mailgend_route_gocd_last_success_age_seconds{{{GOCD_L}}}")
        ) < 5.0
    );
    assert_eq!(get(&v, "mailgend_route_spool_oldest_age_seconds"), 0.0);
    assert_eq!(
        get(&v, "mailgend_route_slack_posts_total{result=\"failed\"}"),
        1.0
    );
    assert_eq!(get(&v, "mailgend_route_messages_received_total"), 9.0);
    assert_eq!(get(&v, "mailgend_route_messages_accepted_total"), 7.0);
    // `raw` at least (`bad` was closed after the bare LF).
    assert!(get(&v, "mailgend_route_connections_open") >= 1.0);
    drop((raw, bad));

    // A reload keeps the counters (same manager, same labels), and may
    // move the endpoint: the old port closes, the new one serves.
    std::fs::write(
        dir.path().join("configuration.yml"),
        text.replace(&format!(":{mport}\n"), &format!(":{mport2}\n")),
    )
    .unwrap();
    route.signal("HUP");
    route.wait_log("configuration reloaded", 1);
    assert!(
        TcpStream::connect(("127.0.0.1", mport)).await.is_err(),
        "the old metrics port still accepts"
    );
    let v = scrape(mport2).await;
    assert_eq!(get(&v, "mailgend_route_messages_received_total"), 9.0);
    assert_eq!(
        get(
            &v,
            &format!("mailgend_route_messages_routed_total{{{MAIL_L}}}")
        ),
        3.0
    );
    assert_eq!(
        get(&v, "mailgend_route_config_reloads_total{result=\"ok\"}"),
        1.0
    );
    assert_eq!(route.stop(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_listen_is_validated_and_a_taken_port_is_a_start_error() {
    let dir = tempfile::tempdir().unwrap();
    let base = |metrics: &str| {
        format!(
            "local-smtp: 127.0.0.1:{}\nremote-smtp: 127.0.0.1:25\nmanagers: []\n\
             mailgend:\n  spool: {}\n  metrics-listen: {metrics}\n",
            free_port(),
            dir.path().join("spool").display()
        )
    };
    let config = dir.path().join("configuration.yml");
    std::fs::write(&config, base("127.0.0.1")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mailgend"))
        .args(["route", "--check", "-c"])
        .arg(&config)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("configuration.yml:6: key `mailgend.metrics-listen`:")
            && text.contains("the port is required"),
        "{text}"
    );

    std::fs::write(&config, base("127.0.0.1:9470")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mailgend"))
        .args(["route", "--check", "-c"])
        .arg(&config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("metrics on http://127.0.0.1:9470/metrics"),
        "{text}"
    );

    let taken = StdListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    std::fs::write(&config, base(&addr.to_string())).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mailgend"))
        .args(["route", "-c"])
        .arg(&config)
        .env_remove("NOTIFY_SOCKET")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr).to_string();
    assert_ne!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains(&format!("metrics-listen \"{addr}\": cannot listen")),
        "{text}"
    );
}

// ---------------------------------------------------------------------------
// 2. SIGHUP keeps GoCD knowledge
// ---------------------------------------------------------------------------

fn gocd_config(
    port: u16,
    sink: u16,
    spool: &Path,
    gocd: u16,
    extra_gocd: &str,
    extra_rule: &str,
) -> String {
    format!(
        "local-smtp: 127.0.0.1:{port}
remote-smtp: 127.0.0.1:{sink}
managers:
- name: gocd
  messages-we-want:
    from: go@ci.example.org
  url: http://127.0.0.1:{gocd}/go
  refresh-interval: 3600
{extra_gocd}  rules:
  - actions: [mailto:broken@example.net]
    filter:
      function: pipelines.any
      events: [BREAKS, FAILS]
  - actions: [mailto:fixed@example.net]
    filter:
      function: pipelines.any
      events: [FIXED]
  - actions: [mailto:passes@example.net]
    filter:
      function: pipelines.any
      events: [PASSES]
{extra_rule}mailgend:
  spool: {spool}
",
        spool = spool.display()
    )
}

const GROUP_RULE: &str = "  - actions: [mailto:group-fixed@example.net]
    filter:
      function: pipelines.in_group
      args: [my-group]
      events: [FIXED]
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_keeps_gocd_knowledge_when_gocd_is_unchanged() {
    let gocd = FakeHttp::start().await;
    gocd.set("/go/api/config/pipeline_groups", 200, GROUPS_JSON);
    // cctray says ppp passes, and keeps saying so: a router that re-read
    // it after the reload would forget the failure below.
    gocd.set("/go/cctray.xml", 200, &cctray("Success"));
    let dir = tempfile::tempdir().unwrap();
    let sink = SmtpSink::start();
    let port = free_port();
    let spool = dir.path().join("spool");
    let config = dir.path().join("configuration.yml");
    let write = |extra_gocd: &str, extra_rule: &str| {
        std::fs::write(
            &config,
            gocd_config(port, sink.port(), &spool, gocd.port, extra_gocd, extra_rule),
        )
        .unwrap()
    };
    write("", "");
    let route = Route::start(dir.path(), WAIT);
    route.wait_log("pipeline states seeded from cctray.xml", 1);
    route.wait_log("GoCD pipeline groups fetched", 1);

    let gocd_mail = |n: u32, what: &str| {
        format!("Subject: Stage [ppp/{n}/build/1] {what}\r\n\r\nx\r\n").into_bytes()
    };
    lettre_send(
        port,
        "go@ci.example.org",
        &["go@example.org"],
        &gocd_mail(1, "failed"),
    )
    .await;
    let got = sink.wait_for_async(1, WAIT).await;
    assert_eq!(
        got[0].rcpt_to,
        vec!["broken@example.net"],
        "FAILS after a pass is BREAKS"
    );

    // Same GoCD, one more rule, and GoCD's groups API now fails: the new
    // router must still know ppp failed and which group it is in.
    gocd.set("/go/api/config/pipeline_groups", 500, "oops");
    write("", GROUP_RULE);
    route.signal("HUP");
    route.wait_log("configuration reloaded", 1);
    route.wait_log("GoCD unchanged: keeping the pipeline states", 1);
    route.wait_log("GoCD pipeline groups not refreshed", 1);
    lettre_send(
        port,
        "go@ci.example.org",
        &["go@example.org"],
        &gocd_mail(2, "passed"),
    )
    .await;
    let got = sink.wait_for_async(2, WAIT).await;
    assert_eq!(
        got[1].rcpt_to,
        vec!["fixed@example.net", "group-fixed@example.net"],
        "PASSES after the remembered failure is FIXED, and the group copy is kept\n{}",
        route.log()
    );
    assert_eq!(gocd.hits("/go/cctray.xml"), 1, "not re-seeded");

    // Different credentials are a different source: it starts afresh,
    // seeded from cctray (which now says ppp failed) and without groups.
    gocd.set("/go/cctray.xml", 200, &cctray("Failure"));
    write("  user: robot\n  passwd: secret\n", GROUP_RULE);
    route.signal("HUP");
    route.wait_log("configuration reloaded", 2);
    route.wait_log("pipeline states seeded from cctray.xml", 2);
    assert_eq!(
        route
            .log()
            .matches("GoCD unchanged: keeping the pipeline states")
            .count(),
        1
    );
    lettre_send(
        port,
        "go@ci.example.org",
        &["go@example.org"],
        &gocd_mail(3, "passed"),
    )
    .await;
    let got = sink.wait_for_async(3, WAIT).await;
    assert_eq!(
        got[2].rcpt_to,
        vec!["fixed@example.net"],
        "fresh state from cctray (Failure → FIXED), no groups yet\n{}",
        route.log()
    );
    assert_eq!(route.stop(), Some(0));
}

// ---------------------------------------------------------------------------
// 3. SIGHUP applies local-smtp and max-connections
// ---------------------------------------------------------------------------

fn plain_config(port: u16, sink: u16, spool: &Path, max_connections: usize, to: &str) -> String {
    format!(
        "local-smtp: 127.0.0.1:{port}
remote-smtp: 127.0.0.1:{sink}
managers:
- name: mail
  messages-we-want:
    from: alerts@example.org
  rules:
  - actions: [mailto:{to}]
    filter:
      function: mail.in_subject
      args: [backup]
mailgend:
  spool: {spool}
  command-timeout: 5
  max-connections: {max_connections}
",
        spool = spool.display()
    )
}

/// One message from alerts@example.org over a raw session, then QUIT (no
/// client-side connection pool to hold a connection slot).
async fn raw_send(port: u16, data: &[u8]) {
    let (mut raw, _) = Raw::connect(port).await;
    let r = raw
        .mail("alerts@example.org", &["x@example.net"], data)
        .await;
    assert_eq!(code(&r), "250", "{r}");
    assert_eq!(code(&raw.cmd("QUIT").await), "221");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_moves_local_smtp_and_applies_max_connections() {
    let dir = tempfile::tempdir().unwrap();
    let sink = SmtpSink::start();
    let spool = dir.path().join("spool");
    let config = dir.path().join("configuration.yml");
    let [old, new] = free_ports();
    std::fs::write(
        &config,
        plain_config(old, sink.port(), &spool, 100, "team@example.net"),
    )
    .unwrap();
    let route = Route::start(dir.path(), WAIT);

    // A session in the middle of a transaction on the old port.
    let (mut open, _) = Raw::connect(old).await;
    assert_eq!(code(&open.cmd("EHLO raw.test").await), "250");
    assert_eq!(
        code(&open.cmd("MAIL FROM:<alerts@example.org>").await),
        "250"
    );
    assert_eq!(code(&open.cmd("RCPT TO:<x@example.net>").await), "250");

    std::fs::write(
        &config,
        plain_config(new, sink.port(), &spool, 2, "team@example.net"),
    )
    .unwrap();
    route.signal("HUP");
    route.wait_log("configuration reloaded", 1);
    route.wait_log("no longer accepting connections", 1);
    assert!(
        !route.log().contains("takes effect only after a restart"),
        "{}",
        route.log()
    );
    // The old port is closed…
    let refused = TcpStream::connect(("127.0.0.1", old)).await;
    assert!(refused.is_err(), "the old port still accepts");
    // …but the session open on it finishes its message, then is told to go.
    assert_eq!(code(&open.cmd("DATA").await), "354");
    open.send(b"Subject: backup done\r\n\r\nx\r\n.\r\n").await;
    assert_eq!(code(&open.reply().await), "250");
    assert_eq!(code(&open.cmd("NOOP").await), "421");
    drop(open);
    let got = sink.wait_for_async(1, WAIT).await;
    assert_eq!(got[0].rcpt_to, vec!["team@example.net"]);

    // Mail through the new port works.
    raw_send(new, b"Subject: backup 2\r\n\r\nx\r\n").await;
    let got = sink.wait_for_async(2, WAIT).await;
    assert_eq!(got[1].rcpt_to, vec!["team@example.net"]);

    // max-connections 2 holds for new connections (once the sessions
    // above have ended on the server's side too).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (mut a, ga) = Raw::connect(new).await;
    let (mut b, gb) = Raw::connect(new).await;
    let (_c, gc) = Raw::connect(new).await;
    assert_eq!((code(&ga), code(&gb)), ("220", "220"));
    assert!(gc.starts_with("421 4.7.0"), "{gc}");
    assert_eq!(code(&a.cmd("QUIT").await), "221");
    assert_eq!(code(&b.cmd("QUIT").await), "221");

    // A taken port refuses the whole reload; the old port and rules stay.
    let taken = StdListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    std::fs::write(
        &config,
        plain_config(taken_port, sink.port(), &spool, 2, "other@example.net"),
    )
    .unwrap();
    route.signal("HUP");
    route.wait_log("reload refused", 1);
    assert!(
        route
            .log()
            .contains(&format!("local-smtp 127.0.0.1:{taken_port}: cannot listen")),
        "{}",
        route.log()
    );
    raw_send(new, b"Subject: backup 3\r\n\r\nx\r\n").await;
    let got = sink.wait_for_async(3, WAIT).await;
    assert_eq!(got[2].rcpt_to, vec!["team@example.net"], "the old rules");
    drop(taken);
    assert_eq!(route.stop(), Some(0));
}
