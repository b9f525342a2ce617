//! `mailgend route` against a hostile network (issue 16): the real binary,
//! a real relay ([`SmtpSink`]) and raw SMTP clients that do what no polite
//! client would. Each test names the finding it guards.
//!
//! Long (over 800 lines) because each test is one whole scenario against
//! the real binary with its own configuration and traffic; what they share
//! (starting the router, the raw SMTP client) is in `tests/common/`.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use mailgend::sandbox::SmtpSink;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[path = "common/raw_smtp.rs"]
mod raw_smtp;
use raw_smtp::{code, free_port, Raw};

#[path = "common/route_process.rs"]
mod route_process;
use route_process::RouteProcess;

const WAIT: Duration = Duration::from_secs(20);

/// A running `mailgend route` on `dir/configuration.yml`, logging to
/// `dir/route.log` (plain text, as under a terminal or a log file).
struct Route {
    process: RouteProcess,
    port: u16,
    metrics: u16,
}

impl std::ops::Deref for Route {
    type Target = RouteProcess;
    fn deref(&self) -> &RouteProcess {
        &self.process
    }
}

impl Route {
    fn start(dir: &Path, port: u16, metrics: u16) -> Route {
        Route {
            process: RouteProcess::start(dir, WAIT),
            port,
            metrics,
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
            .transaction("gocd@example.com", &["gocd@example.org"], data.as_bytes())
            .await;
        assert_eq!(code(&r), "250", "{r}");
    }
    // Known stages are still tracked: FAILS then PASSES is FIXED.
    let data = b"Subject: Stage [made-up-0/2/build/1] passed\r\n\r\nx\r\n";
    assert_eq!(
        code(
            &raw.transaction("gocd@example.com", &["gocd@example.org"], data)
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
            .transaction("gocd@example.com", &["gocd@example.org"], data.as_bytes())
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

fn auth_plain(user: &str, pass: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{pass}"))
}

/// Finding 4: about 3,900 password guesses a second from one client. Now
/// each failure costs a growing delay and an address has a budget
/// (`auth-failure-limit` per `auth-failure-window`), then 421.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_guessing_is_slow_and_bounded_per_address() {
    let s = setup(
        "",
        "  auth-user: router\n  auth-password: s3cret\n  auth-failure-delay: 0.3\n  auth-failure-limit: 5\n",
    );
    let port = s.route.port;

    // The delay grows with each failure of a session.
    let (mut raw, _) = Raw::connect_from(port, "127.0.0.3").await;
    assert_eq!(code(&raw.cmd("EHLO slow.test").await), "250");
    let mut took = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let r = raw
            .cmd(&format!("AUTH PLAIN {}", auth_plain("router", "guess")))
            .await;
        took.push(t.elapsed());
        assert_eq!(code(&r), "535", "{r}");
    }
    assert!(took[0] >= Duration::from_millis(300), "{took:?}");
    assert!(took[1] >= Duration::from_millis(600), "{took:?}");
    assert!(took[2] >= Duration::from_millis(900), "{took:?}");
    // Three in a session, then 421 (the 421 follows the third 535).
    assert_eq!(code(&raw.reply().await), "421");

    // Four parallel guessers from one address for 3 s: 5 guesses in all.
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        tasks.push(tokio::spawn(async move {
            let (mut wrong, mut refused) = (0, 0);
            while start.elapsed() < Duration::from_secs(3) {
                let (mut raw, g) = Raw::connect_from(port, "127.0.0.1").await;
                assert_eq!(code(&g), "220", "{g}");
                assert_eq!(code(&raw.cmd("EHLO guess.test").await), "250");
                loop {
                    let r = raw
                        .cmd(&format!("AUTH PLAIN {}", auth_plain("router", "guess")))
                        .await;
                    match code(&r) {
                        "535" => wrong += 1,
                        "421" => {
                            refused += 1;
                            break;
                        }
                        "" => break,
                        other => panic!("unexpected {other}: {r}"),
                    }
                }
            }
            (wrong, refused)
        }));
    }
    let (mut wrong, mut refused) = (0, 0);
    for t in tasks {
        let (w, r) = t.await.unwrap();
        wrong += w;
        refused += r;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{wrong} guesses answered in {secs:.1} s ({:.1}/s), {refused} sessions refused",
        wrong as f64 / secs
    );
    assert_eq!(wrong, 5, "the address's budget");
    assert!(refused >= 4, "every guesser ends with 421");
    // Over budget, even the right password gets 421 from that address...
    let (mut raw, _) = Raw::connect_from(port, "127.0.0.1").await;
    assert_eq!(code(&raw.cmd("EHLO guess.test").await), "250");
    let r = raw
        .cmd(&format!("AUTH PLAIN {}", auth_plain("router", "s3cret")))
        .await;
    assert!(r.starts_with("421 4.7.0"), "{r}");
    // ...while another address authenticates and sends.
    let (mut raw, _) = Raw::connect_from(port, "127.0.0.2").await;
    assert_eq!(code(&raw.cmd("EHLO good.test").await), "250");
    let r = raw
        .cmd(&format!("AUTH PLAIN {}", auth_plain("router", "s3cret")))
        .await;
    assert_eq!(code(&r), "235", "{r}");
    let r = raw
        .transaction(
            "gocd@example.com",
            &["gocd@example.org"],
            b"Subject: Stage [p/1/s/1] passed\r\n\r\nx\r\n",
        )
        .await;
    assert_eq!(code(&r), "250", "{r}");
    assert_eq!(s.sink.wait_for_async(1, WAIT).await.len(), 1);
    assert_eq!(
        s.route.metric("mailgend_route_auth_failures_total").await,
        8.0
    );
    assert!(s.route.metric("mailgend_route_auth_refused_total").await >= 5.0);
    let log = s.route.log();
    assert_eq!(
        log.matches("AUTH refused: auth-failure-limit").count(),
        1,
        "rate-limited WARN"
    );
}

/// Finding 5: one client could hold every slot (`max-connections` was
/// global) and keep a session in DATA for as long as it sent a line now
/// and then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_cannot_hold_every_slot_nor_dribble_data_forever() {
    let s = setup("", "  max-connections-per-client: 2\n  data-timeout: 3\n");
    let port = s.route.port;
    let (a, ga) = Raw::connect(port).await;
    let (_b, gb) = Raw::connect(port).await;
    assert_eq!((code(&ga), code(&gb)), ("220", "220"));
    let (_c, gc) = Raw::connect(port).await;
    assert!(
        gc.starts_with("421 4.7.0") && gc.contains("from your address"),
        "{gc}"
    );
    // Another address still gets in.
    let (mut other, go) = Raw::connect_from(port, "127.0.0.2").await;
    assert_eq!(code(&go), "220", "{go}");
    // A slot given back is free again.
    drop(a);
    let start = Instant::now();
    let mut refused = 1;
    let mut d = loop {
        let (raw, g) = Raw::connect(port).await;
        if code(&g) == "220" {
            break raw;
        }
        // The server frees the slot when it sees the close.
        refused += 1;
        assert!(start.elapsed() < WAIT, "the slot never came back: {g}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        s.route
            .metric("mailgend_route_connections_refused_total{reason=\"client\"}")
            .await,
        f64::from(refused)
    );

    // A line every second (well within command-timeout: 10), DATA cut
    // off at data-timeout (3 s).
    assert_eq!(code(&d.cmd("EHLO dribble.test").await), "250");
    assert_eq!(code(&d.cmd("MAIL FROM:<gocd@example.com>").await), "250");
    assert_eq!(code(&d.cmd("RCPT TO:<gocd@example.org>").await), "250");
    assert_eq!(code(&d.cmd("DATA").await), "354");
    let started = Instant::now();
    let Raw { mut rd, mut wr, .. } = d;
    let writer = tokio::spawn(async move {
        for i in 0..20 {
            if wr
                .write_all(format!("line {i}\r\n").as_bytes())
                .await
                .is_err()
            {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    let mut line = String::new();
    tokio::time::timeout(WAIT, rd.read_line(&mut line))
        .await
        .expect("cut off in time")
        .unwrap();
    let after = started.elapsed();
    assert!(line.starts_with("421 4.4.2"), "{line}");
    assert!(
        after >= Duration::from_secs(3) && after < Duration::from_secs(10),
        "cut off after {after:?}"
    );
    line.clear();
    assert_eq!(
        rd.read_line(&mut line).await.unwrap_or(0),
        0,
        "closed: {line}"
    );
    writer.abort();
    // Nothing of it was accepted; the other client still sends.
    other.cmd("EHLO other.test").await;
    let r = other
        .transaction(
            "gocd@example.com",
            &["gocd@example.org"],
            b"Subject: Stage [p/1/s/1] passed\r\n\r\nx\r\n",
        )
        .await;
    assert_eq!(code(&r), "250", "{r}");
    let got = s.sink.wait_for_async(1, WAIT).await;
    assert_eq!(got.len(), 1);
    assert!(!got[0].text().contains("line 0"));
}

fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn chgrp(path: &Path, gid: u32) {
    std::os::unix::fs::chown(path, None, Some(gid)).unwrap();
}

/// `mailgend route --check`: its stdout (WARN lines, then the summary).
fn route_check(config: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_mailgend"))
        .args(["route", "--check", "-c"])
        .arg(config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Finding 6: a world-readable key or password file was accepted without
/// a word. Now a WARN naming file, key and mode — but not for the
/// package's own `root:mailgend 0640` (group-readable by the daemon's own
/// group), and never a refusal.
#[test]
fn secret_files_readable_by_others_are_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    // The process's own group stands in for `mailgend`; another gid for
    // a foreign group.
    let own_gid = std::fs::metadata("/proc/self").map(|m| {
        use std::os::unix::fs::MetadataExt;
        m.gid()
    });
    let own_gid = own_gid.unwrap();
    let foreign_gid = own_gid + 4242;

    // The router: auth-password written in the file, and a TLS key.
    let key = dir.path().join("tls.key");
    let cert = dir.path().join("tls.crt");
    std::fs::write(&key, "key").unwrap();
    std::fs::write(&cert, "cert").unwrap();
    let cfg = dir.path().join("configuration.yml");
    let text = |password: &str| {
        format!(
            "local-smtp: 127.0.0.1:{}\nremote-smtp: 127.0.0.1:25\nmanagers: []\n\
             mailgend:\n  spool: {}\n  tls-cert: {}\n  tls-key: {}\n  auth-user: router\n  auth-password: {password}\n",
            free_port(),
            dir.path().join("spool").display(),
            cert.display(),
            key.display()
        )
    };
    std::fs::write(&cfg, text("s3cret")).unwrap();
    chmod(&cfg, 0o644);
    chmod(&key, 0o604);
    let out = route_check(&cfg);
    let warn = |out: &str, what: &str| {
        out.lines()
            .filter(|l| l.starts_with("WARN ") && l.contains(what))
            .count()
    };
    assert_eq!(
        warn(
            &out,
            &format!(
                "{}:9: key `mailgend.auth-password`: {} holds a secret and is readable by every user of the host (mode 0644",
                cfg.display(),
                cfg.display()
            )
        ),
        1,
        "{out}"
    );
    assert_eq!(
        warn(
            &out,
            &format!(
                "key `mailgend.tls-key`: {} holds a secret and is readable by every user of the host (mode 0604",
                key.display()
            )
        ),
        1,
        "{out}"
    );
    // A foreign group may not read them either.
    chmod(&cfg, 0o640);
    chgrp(&cfg, foreign_gid);
    chmod(&key, 0o640);
    chgrp(&key, foreign_gid);
    let out = route_check(&cfg);
    assert_eq!(
        warn(&out, "readable by the members of its group (mode 0640"),
        2,
        "{out}"
    );
    // The daemon's own group may (root:mailgend 0640), the owner may.
    chgrp(&cfg, own_gid);
    chmod(&key, 0o600);
    let out = route_check(&cfg);
    assert_eq!(warn(&out, "holds a secret"), 0, "{out}");
    // A password from the environment leaves the file without a secret.
    std::fs::write(&cfg, text("$ROUTE_AUTH_PASSWORD")).unwrap();
    chmod(&cfg, 0o644);
    let out = Command::new(env!("CARGO_BIN_EXE_mailgend"))
        .args(["route", "--check", "-c"])
        .arg(&cfg)
        .env("ROUTE_AUTH_PASSWORD", "s3cret")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    assert_eq!(warn(&out, "holds a secret"), 0, "{out}");

    // The notifier: the config file with the database password, the SMTP
    // password file and the signing key file.
    let conf = dir.path().join("intelmq-mailgen.conf");
    let pw = dir.path().join("smtp-password");
    let sk = dir.path().join("signing-key.asc");
    std::fs::write(&pw, "pw\n").unwrap();
    std::fs::write(&sk, "not checked unless always_sign").unwrap();
    std::fs::write(
        &conf,
        serde_json::json!({
            "database": {"event": {"name": "intelmq-events", "username": "mailgen",
                                    "password": "pw", "host": "localhost", "port": 5432}},
            "template_dir": dir.path(), "script_directory": dir.path(),
            "sender": "CERT <cert@example.org>",
            "smtp": {"host": "localhost", "port": 25, "username": "u", "password_file": pw},
            "openpgp": {"always_sign": false, "gnupg_home": "/nonexistent", "signing_key": ""},
            "mailgend": {"signing_key_file": sk}
        })
        .to_string(),
    )
    .unwrap();
    chmod(&conf, 0o644);
    chmod(&pw, 0o644);
    chmod(&sk, 0o640);
    chgrp(&sk, foreign_gid);
    let load = || {
        mailgend::config::Config::load(&mailgend::config::ConfigSource::file(&conf))
            .expect("not refused")
            .unknown_keys
            .iter()
            .map(|p| p.to_string())
            .filter(|p| p.contains("holds a secret"))
            .collect::<Vec<_>>()
    };
    let w = load();
    assert_eq!(w.len(), 3, "{w:#?}");
    assert!(
        w.iter().any(|p| p.contains("key `database.event.password`")
            && p.contains(&format!(
                "{} holds a secret and is readable by every user of the host (mode 0644",
                conf.display()
            ))),
        "{w:#?}"
    );
    assert!(
        w.iter().any(
            |p| p.contains("key `smtp.password_file`") && p.contains(&pw.display().to_string())
        ),
        "{w:#?}"
    );
    assert!(
        w.iter()
            .any(|p| p.contains("key `mailgend.signing_key_file`")
                && p.contains("members of its group (mode 0640")),
        "{w:#?}"
    );
    // As the package installs them: root:mailgend 0640 (here: our group).
    for f in [&conf, &pw, &sk] {
        chmod(f, 0o640);
        chgrp(f, own_gid);
    }
    assert_eq!(load(), Vec::<String>::new());
}

/// Finding 1, the router's side: a decoded Subject, a GoCD pipeline name,
/// MAIL FROM, RCPT TO, an AUTH user name wrote their line breaks, CRs and
/// ESC sequences into the log as they were, so a sender could forge or
/// hide log lines. Every line of the plain-text log must be one the
/// program started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_values_never_forge_a_log_line() {
    let dir = tempfile::tempdir().unwrap();
    let sink = SmtpSink::start();
    let (port, metrics) = (free_port(), free_port());
    std::fs::write(
        dir.path().join("configuration.yml"),
        format!(
            "local-smtp: 127.0.0.1:{port}
remote-smtp: 127.0.0.1:{sink}
managers:
- name: gocd
  messages-we-want:
    to: gocd@example.org
  rules:
  - actions: [mailto:dev@example.net]
    filter:
      function: pipelines.any
- name: mail
  messages-we-want:
    from: alerts@example.org
  rules:
  - actions: [mailto:ops@example.net]
    filter:
      function: mail.in_subject
      args: [never-in-a-subject]
mailgend:
  spool: {spool}
  command-timeout: 10
  metrics-listen: 127.0.0.1:{metrics}
  auth-user: router
  auth-password: $ROUTER_PASSWORD
  auth-failure-delay: 0
",
            sink = sink.port(),
            spool = dir.path().join("spool").display()
        ),
    )
    .unwrap();
    // The password from the environment, as the package does it.
    std::env::set_var("ROUTER_PASSWORD", "s3cret");
    let route = Route::start(dir.path(), port, metrics);
    let forged = "INFO mailgend: 11 mails sent, 0 postponed, 0 errors.";
    let b64 = |s: &str| {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(s)
    };
    // Subjects: raw 8-bit controls (bare CR and LF cannot pass DATA), and
    // RFC 2047 encoded-words that decode to CR, LF, NEL, U+2028, ESC.
    let subjects: Vec<Vec<u8>> = vec![
        format!("x\x1b[2K\x1b[1A{forged}").into_bytes(),
        format!("x\u{85}{forged}\u{2028}{forged}\u{2029}").into_bytes(),
        format!("=?utf-8?b?{}?=", b64(&format!("x\r\n{forged}\r{forged}"))).into_bytes(),
        format!("=?utf-8?q?x=0A{}?=", forged.replace(' ', "_")).into_bytes(),
        format!(
            "=?utf-8?b?{}?=",
            b64(&format!("\u{85}{forged}\u{2028}\x1b]0;title\x07"))
        )
        .into_bytes(),
    ];
    // GoCD pipeline and stage names with the same.
    let pipelines: Vec<Vec<u8>> = vec![
        format!("Stage [p\x1b[2K{forged}/1/build/1] failed").into_bytes(),
        format!(
            "=?utf-8?b?{}?=",
            b64(&format!("Stage [p\n{forged}/1/s\r{forged}/1] passed"))
        )
        .into_bytes(),
        format!("Stage [p\u{2028}{forged}/1/b\u{85}{forged}/1] failed").into_bytes(),
    ];
    let (mut raw, _) = Raw::connect(port).await;
    assert_eq!(code(&raw.cmd("EHLO hostile.test").await), "250");
    // An AUTH user name with line breaks (logged at WARN).
    let r = raw
        .cmd(&format!(
            "AUTH PLAIN {}",
            b64(&format!("\0u\n{forged}\r\x1b[2K\0wrong"))
        ))
        .await;
    assert_eq!(code(&r), "535", "{r}");
    let r = raw
        .cmd(&format!("AUTH PLAIN {}", b64("\0router\0s3cret")))
        .await;
    assert_eq!(code(&r), "235", "{r}");
    let mut sent = 0;
    for s in &subjects {
        let mut data = b"Subject: ".to_vec();
        data.extend_from_slice(s);
        data.extend_from_slice(b"\r\n\r\nbody\r\n");
        let r = raw
            .transaction("alerts@example.org", &["x@example.net"], &data)
            .await;
        assert_eq!(code(&r), "250", "{r}");
        sent += 1;
    }
    for s in &pipelines {
        let mut data = b"Subject: ".to_vec();
        data.extend_from_slice(s);
        data.extend_from_slice(b"\r\n\r\nbody\r\n");
        let r = raw
            .transaction("gocd@example.com", &["gocd@example.org"], &data)
            .await;
        assert_eq!(code(&r), "250", "{r}");
        sent += 1;
    }
    // Envelope addresses with controls and 8-bit in quoted local parts,
    // and a CR inside a command line (lines end at LF).
    let addresses: [&[u8]; 5] = [
        b"\"a\x1b[2Kb\"@example.org",
        "\"a\u{2028}INFO mailgend: forged\"@example.org".as_bytes(),
        "a\u{85}b@example.org".as_bytes(),
        b"a@example.org>\rINFO mailgend: forged <b@example.org",
        b"\"a\rINFO mailgend: forged\"@example.org",
    ];
    for a in addresses {
        let mut line = b"MAIL FROM:<".to_vec();
        line.extend_from_slice(a);
        line.extend_from_slice(b">\r\n");
        raw.send(&line).await;
        let r = raw.reply().await;
        let mut rcpt = b"RCPT TO:<".to_vec();
        rcpt.extend_from_slice(a);
        rcpt.extend_from_slice(b">\r\n");
        raw.send(&rcpt).await;
        let r2 = raw.reply().await;
        // Commands are printable ASCII (no SMTPUTF8): refused before any
        // part of them reaches a log line.
        for reply in [&r, &r2] {
            assert!(
                reply.starts_with("501 5.5.4 Syntax: commands must be printable ASCII"),
                "{:?}: {reply}",
                String::from_utf8_lossy(a)
            );
        }
    }
    assert_eq!(code(&raw.cmd("QUIT").await), "221");
    // Wait until every message has been logged as handled.
    let start = Instant::now();
    while route.log().matches("spool_id").count() + route.log().matches("dropped").count() < sent
        && start.elapsed() < WAIT
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    route.wait_log("message dropped: no rule matched", subjects.len());

    let log = route.log();
    let line_start = regex::Regex::new(
        r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z +(ERROR|WARN|INFO|DEBUG|TRACE) mailgend",
    )
    .unwrap();
    for line in log.lines() {
        assert!(
            line_start.is_match(line),
            "a line the router did not start:\n{line:?}\n--- all:\n{log}"
        );
    }
    for c in ['\r', '\x1b', '\x07', '\u{85}', '\u{2028}', '\u{2029}'] {
        assert!(!log.contains(c), "{c:?} in the log:\n{log}");
    }
    // The values are there, escaped: the test would see them unescaped.
    for escaped in [
        format!("\\x1b[2K\\x1b[1A{forged}"),
        format!("x\\r\\n{forged}\\r{forged}"),
        format!("x\\n{forged}"),
        format!("\\u{{85}}{forged}\\u{{2028}}"),
        format!("p\\n{forged}"),
        format!("s\\r{forged}"),
        // (The AUTH user name goes through the session's printable().)
        format!("user=u?{forged}??[2K"),
    ] {
        assert!(log.contains(&escaped), "no {escaped:?} in:\n{log}");
    }
    assert!(!log.contains("panicked"), "{log}");
    std::env::remove_var("ROUTER_PASSWORD");
}

/// One message over a fresh connection; `true` when answered 250.
async fn send_once(port: u16, token: &str) -> bool {
    let Ok(Ok(s)) = tokio::time::timeout(
        Duration::from_secs(5),
        TcpStream::connect(("127.0.0.1", port)),
    )
    .await
    else {
        return false;
    };
    let mut raw = Raw::new(s);
    let step = async {
        if code(&raw.reply().await) != "220" {
            return false;
        }
        for cmd in [
            "EHLO k.test",
            "MAIL FROM:<k@example.org>",
            "RCPT TO:<ops@example.net>",
        ] {
            if code(&raw.cmd(cmd).await) != "250" {
                return false;
            }
        }
        if code(&raw.cmd("DATA").await) != "354" {
            return false;
        }
        raw.send(
            format!("X-Token: {token}\r\nSubject: kill loop\r\n\r\n{token}\r\n.\r\n").as_bytes(),
        )
        .await;
        code(&raw.reply().await) == "250"
    };
    // A killed router never answers: the read times out (not a panic).
    tokio::time::timeout(Duration::from_secs(10), step)
        .await
        .unwrap_or(false)
}

/// The issue's kill -9 loop: 200 messages while the router is killed with
/// SIGKILL 10 times and the relay fails now and then (4xx, connections
/// refused, the reply after DATA lost). Every message acknowledged with
/// 250 is delivered at least once; duplicates come only from what SMTP
/// cannot tell (a reply lost after the relay took the data, a crash
/// between the relay's 250 and the spool's record of it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_loop_with_a_flaky_relay_loses_no_acknowledged_mail() {
    use mailgend::sandbox::smtp_sink::{Failure, Fault, Scope, Stage};
    let Setup {
        _dir: dir,
        sink,
        route,
    } = setup("", "");
    let port = route.port;
    let metrics = route.metrics;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, bool)>();
    let sender = tokio::spawn(async move {
        let mut resends = 0;
        for i in 0..200 {
            let token = format!("k{i:03}");
            // As an MTA does: send again until it is acknowledged.
            let mut tries = 0;
            loop {
                let ok = send_once(port, &token).await;
                let _ = tx.send((token.clone(), ok));
                if ok {
                    break;
                }
                tries += 1;
                resends += 1;
                assert!(tries < 200, "{token} never acknowledged");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        resends
    });
    let faults = [
        Fault::Fail {
            stage: Stage::DataEnd,
            failure: Failure::Temporary,
            scope: Scope::Next(3),
        },
        Fault::DropAfterData {
            scope: Scope::Next(2),
            deliver: true,
        },
        Fault::RefuseConnections,
        Fault::Fail {
            stage: Stage::Rcpt,
            failure: Failure::Temporary,
            scope: Scope::Next(2),
        },
        Fault::None,
    ];
    let mut route = Some(route);
    let mut kills = 0;
    let mut dropped_after_data = 0;
    for k in 0..10 {
        tokio::time::sleep(Duration::from_millis(150 + 97 * (k % 4))).await;
        let fault = faults[k as usize % faults.len()].clone();
        if matches!(fault, Fault::DropAfterData { .. }) {
            dropped_after_data += 2;
        }
        if fault == Fault::None {
            sink.resume().unwrap();
        }
        sink.set_fault(fault);
        drop(route.take()); // SIGKILL (Drop kills and reaps)
        kills += 1;
        let d = dir.path().to_path_buf();
        route = Some(
            tokio::task::spawn_blocking(move || Route::start(&d, port, metrics))
                .await
                .unwrap(),
        );
    }
    sink.resume().unwrap();
    sink.set_fault(Fault::None);
    let resends = sender.await.unwrap();
    let route = route.unwrap();
    let mut acked = BTreeSet::new();
    while let Ok((token, ok)) = rx.try_recv() {
        if ok {
            acked.insert(token);
        }
    }
    assert_eq!(acked.len(), 200);
    // A last message wakes the spool worker (a sign the relay is back).
    assert!(send_once(port, "nudge").await);
    let start = Instant::now();
    let count = |tok: &str| {
        sink.messages()
            .iter()
            .filter(|m| m.text().contains(&format!("X-Token: {tok}\r\n")))
            .count()
    };
    let missing = loop {
        let missing: Vec<&String> = acked.iter().filter(|t| count(t) == 0).collect();
        if missing.is_empty() || start.elapsed() > Duration::from_secs(90) {
            break missing.into_iter().cloned().collect::<Vec<_>>();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        missing.is_empty(),
        "acknowledged, never delivered: {missing:?}\n{}",
        route.log()
    );
    let duplicates: usize = acked.iter().map(|t| count(t).saturating_sub(1)).sum();
    println!(
        "200 acknowledged, {kills} kill -9, {resends} client resends, \
         {dropped_after_data} replies lost after DATA: {duplicates} delivered twice"
    );
    // Each duplicate needs a cause: a resend of a message the killed
    // router had taken, a lost reply after DATA, or a kill between the
    // relay's 250 and the spool's record.
    assert!(
        duplicates <= resends + dropped_after_data + kills,
        "{duplicates} duplicates"
    );
    assert!(!route.log().contains("panicked"));
}
