//! `mailgend run` started while its database is down (issue 17 item 3):
//! systemd hears READY=1 with a STATUS= saying why it waits and keeps
//! getting watchdog pings, `/metrics` answers with the database gauge at
//! 0, `mailgend status` says what is wrong; once PostgreSQL is up the gauge
//! goes to 1 and the mail goes out.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{directive, event_fields, event_insert, TestEnv};
use mailgend::sandbox::{ExtraType, PgCluster};
use serde_json::json;

fn scrape(port: u16) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

fn gauge(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The notifications received so far, one string per datagram.
fn drain(sock: &UnixDatagram, into: &mut Vec<String>) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = sock.recv(&mut buf) {
        into.push(String::from_utf8_lossy(&buf[..n]).to_string());
    }
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn starts_ready_and_observable_without_the_database_then_sends() {
    let mut env = TestEnv::new().await;
    let mut cluster = PgCluster::start_temp().expect("cluster");
    let db = cluster.create_database_async().await.unwrap();
    db.create_events_table(ExtraType::Jsonb).await.unwrap();
    mailgend::notify::db::migrate::migrate(&mut db.connect().await.unwrap())
        .await
        .unwrap();
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    env.config_json["database"]["event"] = json!({"name": db.name, "username": db.superuser,
        "password": null, "host": db.host, "port": db.port});
    env.config_json["mailgend"]["metrics_listen"] = json!(format!("127.0.0.1:{metrics_port}"));
    let conf = env.config_file();
    cluster.stop().unwrap();

    let sock_path = env.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let log = env.dir.path().join("run.log");
    // Killed on drop: a failed assertion must not leave it running.
    let child = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_mailgend"))
            .arg("-c")
            .arg(&conf)
            .arg("run")
            .env("HOME", env.dir.path())
            .env("NOTIFY_SOCKET", &sock_path)
            // Ping every second.
            .env("WATCHDOG_USEC", "2000000")
            .env_remove("WATCHDOG_PID")
            .env("MAILGEND_LOG", "mailgend=debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();

    // READY=1 with the reason, and watchdog pings while it waits.
    let mut notes = Vec::new();
    let start = Instant::now();
    loop {
        drain(&sock, &mut notes);
        let ready = notes
            .iter()
            .any(|n| n.contains("READY=1") && n.contains("STATUS=waiting for the database: "));
        let pings = notes.iter().filter(|n| n.contains("WATCHDOG=1")).count();
        if ready && pings >= 3 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "notifications so far: {notes:?}\n{}",
            log_text()
        );
    }
    // The reason names what failed (the socket of the stopped server).
    let ready = notes.iter().find(|n| n.contains("READY=1")).unwrap();
    assert!(ready.contains("cannot connect to database"), "{ready}");

    // /metrics answers: not up, no database.
    let text = scrape(metrics_port).expect("metrics while the database is down");
    assert_eq!(gauge(&text, "mailgend_database_up"), Some(0.0), "{text}");
    assert_eq!(gauge(&text, "mailgend_up"), Some(0.0), "{text}");

    // `mailgend status` says what is wrong, and what the service says.
    let out = Command::new(env!("CARGO_BIN_EXE_mailgend"))
        .arg("-c")
        .arg(&conf)
        .arg("status")
        .env("HOME", env.dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains(": UNREACHABLE")
            && text.contains("reason              cannot connect to database")
            && text.contains("service here        running, waiting for the database"),
        "{text}"
    );

    // The database comes up; an event arrives; its mail goes out.
    cluster.start_again().unwrap();
    let (sql, row) = event_insert(
        event_fields("192.0.2.1", 64496),
        json!([directive("abuse@as64496.example.net", "Open-Redis", 64496)]),
    );
    db.connect()
        .await
        .unwrap()
        .query_one(sql.as_str(), &[&row])
        .await
        .unwrap();
    let got = env.sink.wait_for_async(1, Duration::from_secs(90)).await;
    assert_eq!(got.len(), 1, "{}", log_text());
    let text = scrape(metrics_port).unwrap();
    assert_eq!(gauge(&text, "mailgend_database_up"), Some(1.0), "{text}");
    assert_eq!(gauge(&text, "mailgend_up"), Some(1.0), "{text}");
    drain(&sock, &mut notes);
    assert!(
        notes
            .iter()
            .any(|n| n.contains("READY=1") && n.contains("STATUS=sending")),
        "{notes:?}"
    );

    // status now reports the queue and the service's connections.
    let out = Command::new(env!("CARGO_BIN_EXE_mailgend"))
        .arg("-c")
        .arg(&conf)
        .arg("status")
        .env("HOME", env.dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let pid = child.0.id();
    assert!(
        text.contains(&format!(":{pid} (")) && text.contains("running, sending"),
        "{text}"
    );

    // The database goes away while the service runs: STATUS= says so
    // (it showed the last scan's count before), and says the count again
    // once the database is back.
    cluster.stop().unwrap();
    let wait_for = |notes: &mut Vec<String>, what: &str| {
        let start = Instant::now();
        loop {
            drain(&sock, notes);
            if let Some(n) = notes.iter().find(|n| n.contains(what)) {
                return n.clone();
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "no {what:?} in {notes:?}\n{}",
                log_text()
            );
        }
    };
    notes.clear();
    let lost = wait_for(&mut notes, "STATUS=waiting for the database: ");
    assert!(!lost.contains("READY=1"), "{lost}");
    cluster.start_again().unwrap();
    notes.clear();
    wait_for(&mut notes, "directives pending in");
    drop(child);
}
