//! Tests of the sandbox itself: the PostgreSQL clusters and databases, the
//! SMTP sink (with real clients: lettre, Python's smtplib and a raw socket)
//! and the event feed. Every later test stands on these parts.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{IpAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};
use lettre::address::Envelope;
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
use mailgend::sandbox::feed::{self, FEEDS, INSERT_COLUMNS};
use mailgend::sandbox::{
    ExtraType, Failure, Fault, Feed, FeedParams, PgCluster, Scope, SharedCluster, SinkOptions,
    SmtpSink, Stage,
};

const WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// PostgreSQL

/// A scratch path under the system temp dir (world-traversable, so the
/// `postgres` user can reach clusters inside it when we are root).
fn scratch_path(what: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "mailgend-{what}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ))
}

/// Whether `pid` is a live process (zombies count as dead).
fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "pid (comm) S ...": the state follows the last ')'.
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}

/// `pg_ctl stop -w` returns once the pid file is gone; the process itself
/// may take a moment longer to exit.
fn wait_until_dead(pid: u32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while pid_alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    !pid_alive(pid)
}

fn postmaster_pid(data_dir: &Path) -> u32 {
    let text = std::fs::read_to_string(data_dir.join("postmaster.pid")).expect("postmaster.pid");
    text.lines().next().unwrap().trim().parse().unwrap()
}

async fn table_exists(client: &tokio_postgres::Client, table: &str) -> bool {
    let row = client
        .query_one("SELECT to_regclass($1)::text", &[&table])
        .await
        .unwrap();
    row.get::<_, Option<String>>(0).is_some()
}

/// Each database of the shared cluster is its own world.
async fn check_isolated_databases(tag: &str) {
    let shared = PgCluster::shared().expect("shared cluster");
    let a = shared.create_database_async().await.unwrap();
    let b = shared.create_database().unwrap();
    assert_ne!(a.name, b.name);
    let ca = a.connect().await.unwrap();
    let cb = b.connect().await.unwrap();
    let name: String = ca
        .query_one("SELECT current_database()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(name, a.name);
    ca.batch_execute(&format!("CREATE TABLE marker_{tag} (v text)"))
        .await
        .unwrap();
    assert!(table_exists(&ca, &format!("marker_{tag}")).await);
    assert!(!table_exists(&cb, &format!("marker_{tag}")).await);
    assert_eq!(a.port, shared.port());
    assert_eq!(a.host, shared.host());
}

// Three tests on the shared cluster: under nextest they are three processes
// attaching to the same cluster at the same time.
#[tokio::test]
async fn shared_cluster_databases_are_isolated_1() {
    check_isolated_databases("one").await;
}

#[tokio::test]
async fn shared_cluster_databases_are_isolated_2() {
    check_isolated_databases("two").await;
}

#[tokio::test]
async fn shared_cluster_databases_are_isolated_3() {
    check_isolated_databases("three").await;
}

#[test]
fn shared_cluster_is_one_per_process_and_recorded_on_disk() {
    let first = PgCluster::shared().unwrap();
    let second = PgCluster::shared().unwrap();
    assert!(std::ptr::eq(first, second));
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(first.dir().join("state.json")).unwrap()).unwrap();
    assert_eq!(state["port"], first.port());
    assert_eq!(state["host"], first.host());
    assert!(first.log_path().exists());
    assert_eq!(first.superuser(), "postgres");
}

#[test]
fn dropping_a_test_db_drops_the_database() {
    let shared = PgCluster::shared().unwrap();
    let db = shared.create_database().unwrap();
    let name = db.name.clone();
    let probe = shared.create_database().unwrap();
    drop(db);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = probe.connect().await.unwrap();
        let n: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_database WHERE datname = $1",
                &[&name],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0, "database {name} still exists");
    });
}

#[tokio::test]
async fn private_cluster_stops_and_starts_again() {
    let mut cluster = PgCluster::start_temp().expect("private cluster");
    let dir = cluster.dir().to_path_buf();
    let port = cluster.port();
    let db = cluster.create_database_async().await.unwrap();
    {
        let client = db.connect().await.unwrap();
        client
            .batch_execute("CREATE TABLE kept (v int); INSERT INTO kept VALUES (42)")
            .await
            .unwrap();
    }
    cluster.stop().unwrap();
    assert!(!cluster.is_running());
    assert!(db.connect().await.is_err(), "connected to a stopped server");

    cluster.start_again().unwrap();
    assert!(cluster.is_running());
    assert_eq!(cluster.port(), port, "same port after a restart");
    let client = db.connect().await.unwrap();
    let v: i32 = client
        .query_one("SELECT v FROM kept", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, 42);
    let log = std::fs::read_to_string(cluster.log_path()).unwrap();
    assert_eq!(
        log.matches("database system is ready to accept connections")
            .count(),
        2,
        "one start, one restart, one log:\n{log}"
    );
    let pid = postmaster_pid(&dir.join("data"));
    drop(client);
    drop(db);
    drop(cluster);
    assert!(!dir.exists(), "cluster directory left behind");
    assert!(wait_until_dead(pid), "postmaster {pid} still running");
}

#[tokio::test]
async fn shared_cluster_recovers_from_stale_state_and_keeper_removes_it_when_idle() {
    let dir = scratch_path("keeper-test");
    // What a crashed run might leave: state naming a server that is gone
    // and a half-written cluster directory.
    std::fs::create_dir_all(dir.join("cluster/data")).unwrap();
    std::fs::write(
        dir.join("state.json"),
        r#"{"host":"/nonexistent","port":9,"log_path":"/nonexistent/log"}"#,
    )
    .unwrap();

    let idle = Duration::from_secs(1);
    let first = SharedCluster::attach(&dir, idle).expect("attach (recreate)");
    let second = SharedCluster::attach(&dir, idle).expect("attach (reuse)");
    assert_eq!(
        first.port(),
        second.port(),
        "second attach reuses the server"
    );
    let pid = postmaster_pid(&dir.join("cluster/data"));
    {
        let db = second.create_database_async().await.unwrap();
        let client = db.connect().await.unwrap();
        let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
        assert_eq!(one, 1);
    }

    // While anyone is attached the keeper leaves the cluster alone.
    drop(first);
    tokio::time::sleep(idle + Duration::from_secs(2)).await;
    assert!(dir.exists() && pid_alive(pid), "removed while still in use");

    drop(second);
    let deadline = Instant::now() + Duration::from_secs(30);
    while (dir.exists() || pid_alive(pid)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!dir.exists(), "keeper did not remove {}", dir.display());
    assert!(!pid_alive(pid), "keeper did not stop postmaster {pid}");
}

#[tokio::test]
async fn login_role_needs_its_password_over_tcp() {
    let db = PgCluster::shared().unwrap().create_database().unwrap();
    let role = db
        .create_login_role("reader", "s3cr'et \\ pw")
        .await
        .unwrap();
    assert!(role.starts_with("reader_"));
    let client = db
        .connect_as(&role, "s3cr'et \\ pw")
        .await
        .expect("right password");
    let user: String = client
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(user, role);
    let not_super: bool = client
        .query_one(
            "SELECT NOT rolsuper FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(not_super);
    assert!(
        db.connect_as(&role, "wrong").await.is_err(),
        "wrong password accepted"
    );
    // The libpq form works with tokio-postgres as well.
    let config: tokio_postgres::Config = db.tcp_conninfo(&role, "s3cr'et \\ pw").parse().unwrap();
    let (c, conn) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    c.query_one("SELECT 1", &[]).await.unwrap();
    assert!(db.create_login_role("Bad-Name", "x").await.is_err());
}

async fn check_events_fixture(extra: ExtraType, expected_type: &str) {
    let db = PgCluster::shared().unwrap().create_database().unwrap();
    db.create_events_table(extra).await.unwrap();
    let client = db.connect().await.unwrap();
    let types: HashMap<String, String> = client
        .query(
            "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute \
             WHERE attrelid = 'events'::regclass AND attnum > 0 AND NOT attisdropped",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(types["extra"], expected_type);
    assert_eq!(types["id"], "bigint");
    assert_eq!(types["source.asn"], "integer");
    assert_eq!(types["source.ip"], "inet");
    assert_eq!(types["time.source"], "timestamp with time zone");
    assert_eq!(types["classification.taxonomy"], "character varying(100)");
    assert_eq!(types["protocol.transport"], "character varying(11)");
    assert_eq!(types["source.geolocation.cc"], "character varying(2)");
    assert_eq!(types["feed.accuracy"], "real");
    assert_eq!(types["source.tor_node"], "boolean");
    assert!(types.len() > 80, "only {} columns", types.len());
    let indexes: Vec<String> = client
        .query(
            "SELECT indexname::text FROM pg_indexes WHERE tablename = 'events'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        indexes.iter().any(|i| i == "idx_events_time.source"),
        "{indexes:?}"
    );
    assert_eq!(
        indexes.len(),
        12,
        "primary key + 11 field indexes: {indexes:?}"
    );

    let extra_value = serde_json::json!({"certbund": {"source_directives": [
        {"medium": "email", "recipient_address": "abuse@as64496.example.net"}]}});
    let ip: IpAddr = "192.0.2.7".parse().unwrap();
    let t = Utc.with_ymd_and_hms(2024, 5, 1, 5, 0, 0).unwrap();
    let id: i64 = client
        .query_one(
            "INSERT INTO events (\"source.ip\", \"source.asn\", \"time.source\", extra) \
             VALUES ($1, $2, $3, $4) RETURNING id",
            &[&ip, &64496i32, &t, &extra_value],
        )
        .await
        .unwrap()
        .get(0);
    let row = client
        .query_one(
            "SELECT \"source.ip\", extra::jsonb -> 'certbund' -> 'source_directives' -> 0 \
             ->> 'recipient_address' FROM events WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, IpAddr>(0), ip);
    assert_eq!(row.get::<_, String>(1), "abuse@as64496.example.net");
}

#[tokio::test]
async fn events_fixture_with_jsonb_extra() {
    check_events_fixture(ExtraType::Jsonb, "jsonb").await;
}

#[tokio::test]
async fn events_fixture_with_json_extra() {
    check_events_fixture(ExtraType::Json, "json").await;
}

// ---------------------------------------------------------------------------
// SMTP sink: a raw client, to see exact replies and to pipeline

struct Raw {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Raw {
    fn connect(port: u16) -> Raw {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to sink");
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let mut raw = Raw {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        };
        assert_eq!(raw.reply().0, 220);
        raw
    }

    fn ehlo(port: u16) -> Raw {
        let mut raw = Raw::connect(port);
        raw.send("EHLO client.example.net\r\n");
        let (code, text) = raw.reply();
        assert_eq!(code, 250);
        for ext in ["PIPELINING", "8BITMIME", "SMTPUTF8", "SIZE "] {
            assert!(text.contains(ext), "EHLO reply lacks {ext}: {text}");
        }
        raw
    }

    fn send(&mut self, text: &str) {
        self.writer.write_all(text.as_bytes()).unwrap();
    }

    /// One (possibly multi-line) reply: code and all text.
    fn reply(&mut self) -> (u16, String) {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).expect("read reply");
            assert!(n > 0, "connection closed while waiting for a reply");
            all.push_str(&line);
            if line.as_bytes().get(3) != Some(&b'-') {
                return (line[..3].parse().expect("reply code"), all);
            }
        }
    }

    fn command(&mut self, text: &str) -> u16 {
        self.send(&format!("{text}\r\n"));
        self.reply().0
    }

    /// One transaction; returns the code of the last reply it got.
    fn transaction(&mut self, from: &str, to: &[&str], data: &str) -> u16 {
        let code = self.command(&format!("MAIL FROM:<{from}>"));
        if code != 250 {
            return code;
        }
        for rcpt in to {
            self.command(&format!("RCPT TO:<{rcpt}>"));
        }
        let code = self.command("DATA");
        if code != 354 {
            return code;
        }
        self.send(data);
        self.send(".\r\n");
        self.reply().0
    }

    /// True once the server has closed the connection.
    fn closed(&mut self) -> bool {
        let mut buf = [0u8; 64];
        match self.reader.read(&mut buf) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe),
        }
    }
}

#[test]
fn sink_answers_a_pipelined_session_and_counts_connections() {
    let sink = SmtpSink::start();
    let mut raw = Raw::ehlo(sink.port());
    // One batch: four commands, four replies in order.
    raw.send(
        "MAIL FROM:<sender@example.org> SIZE=100 BODY=8BITMIME\r\n\
         RCPT TO:<a@example.net>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n",
    );
    assert_eq!(raw.reply().0, 250);
    assert_eq!(raw.reply().0, 250);
    assert_eq!(raw.reply().0, 250);
    assert_eq!(raw.reply().0, 354);
    // The data, its end and the next transaction in one write.
    raw.send(
        "Subject: first\r\n\r\n..leading dot\r\n..\r\nlast\r\n.\r\n\
         MAIL FROM:<>\r\nRCPT TO:<c@example.net>\r\nDATA\r\n",
    );
    assert_eq!(raw.reply().0, 250);
    assert_eq!(raw.reply().0, 250);
    assert_eq!(raw.reply().0, 250);
    assert_eq!(raw.reply().0, 354);
    raw.send("Subject: second\r\n\r\nbody\r\n.\r\nRSET\r\nNOOP\r\nQUIT\r\n");
    assert_eq!(raw.reply().0, 250);
    assert_eq!(raw.reply().0, 250);
    assert_eq!(raw.reply().0, 250);
    assert_eq!(raw.reply().0, 221);
    assert!(raw.closed());

    let mails = sink.wait_for(2, WAIT);
    assert_eq!(mails.len(), 2);
    assert_eq!(mails[0].mail_from, "sender@example.org");
    assert_eq!(mails[0].rcpt_to, ["a@example.net", "b@example.net"]);
    assert_eq!(
        mails[0].data,
        b"Subject: first\r\n\r\n.leading dot\r\n.\r\nlast\r\n"
    );
    assert!(mails[0].body_8bitmime);
    assert!(!mails[0].smtputf8);
    assert_eq!(mails[0].helo, "client.example.net");
    assert_eq!(mails[0].header("subject").as_deref(), Some("first"));
    assert_eq!(mails[1].mail_from, "");
    assert_eq!(mails[1].connection_id, mails[0].connection_id);
    assert_eq!(sink.connections(), 1);

    let mut again = Raw::ehlo(sink.port());
    assert_eq!(
        again.transaction("s@example.org", &["d@example.net"], "x\r\n"),
        250
    );
    let mails = sink.wait_for(3, WAIT);
    assert_eq!(mails[2].connection_id, 2);
    assert_eq!(sink.connections(), 2);
    sink.clear();
    assert!(sink.messages().is_empty());
}

#[test]
fn sink_enforces_protocol_order_size_and_smtputf8() {
    let sink = SmtpSink::start_with(SinkOptions {
        max_size: 100,
        ..SinkOptions::default()
    });
    let mut raw = Raw::connect(sink.port());
    assert_eq!(
        raw.command("MAIL FROM:<a@example.org>"),
        503,
        "MAIL before EHLO"
    );
    assert_eq!(raw.command("EHLO x"), 250);
    assert_eq!(
        raw.command("RCPT TO:<b@example.net>"),
        503,
        "RCPT before MAIL"
    );
    assert_eq!(raw.command("DATA"), 503);
    assert_eq!(raw.command("MAIL FROM:<a@example.org> SIZE=1000"), 552);
    assert_eq!(raw.command("MAIL FROM:<jörg@example.org>"), 553);
    assert_eq!(raw.command("MAIL FROM:<a@example.org> FOO=bar"), 555);
    assert_eq!(raw.command("BOGUS"), 500);
    assert_eq!(raw.command("MAIL FROM:<jörg@example.org> SMTPUTF8"), 250);
    assert_eq!(raw.command("RCPT TO:<zoë@example.net>"), 250);
    assert_eq!(raw.command("RSET"), 250);
    assert_eq!(raw.command("MAIL FROM:<a@example.org>"), 250);
    assert_eq!(
        raw.command("RCPT TO:<zoë@example.net>"),
        553,
        "UTF-8 without SMTPUTF8"
    );
    assert_eq!(raw.command("DATA"), 554, "no valid recipients");
    assert_eq!(raw.command("RSET"), 250);
    let big = "x".repeat(200) + "\r\n";
    assert_eq!(
        raw.transaction("a@example.org", &["b@example.net"], &big),
        552
    );
    assert_eq!(
        raw.transaction("a@example.org", &["b@example.net"], "ok\r\n"),
        250
    );
    let mails = sink.wait_for(1, WAIT);
    assert_eq!(mails.len(), 1);
    assert_eq!(mails[0].data, b"ok\r\n");
}

#[tokio::test]
async fn sink_receives_mail_from_lettre() {
    let sink = SmtpSink::start();
    let transport = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
        .port(sink.port())
        .build();
    let envelope = Envelope::new(
        Some("mailgen@example.org".parse().unwrap()),
        vec!["abuse@as64496.example.net".parse().unwrap()],
    )
    .unwrap();
    let message = b"From: mailgen@example.org\r\nTo: abuse@as64496.example.net\r\n\
Subject: lettre\r\n\r\n.a line starting with a dot\r\n.\r\nend\r\n";
    for _ in 0..3 {
        transport.send_raw(&envelope, message).await.expect("send");
    }
    let mails = sink.wait_for_async(3, WAIT).await;
    assert_eq!(mails.len(), 3);
    for mail in &mails {
        assert_eq!(mail.mail_from, "mailgen@example.org");
        assert_eq!(mail.rcpt_to, ["abuse@as64496.example.net"]);
        // lettre always writes CRLF.CRLF after the message, so a message
        // ending in CRLF arrives with one empty line more; the dots it
        // stuffed are gone again.
        let mut expected = message.to_vec();
        expected.extend_from_slice(b"\r\n");
        assert_eq!(mail.data, expected);
    }
    // lettre pools connections, but whether a send finds the previous one
    // back in the pool yet is its business: count, do not predict.
    let mut ids: Vec<u64> = mails.iter().map(|m| m.connection_id).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len() as u64, sink.connections());
    assert!(sink.connections() < 3, "no connection was reused");
}

fn python_send(port: u16, script_body: &str) -> std::process::Output {
    let script = format!("import smtplib, sys\nport = int(sys.argv[1])\n{script_body}\n");
    Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(port.to_string())
        .output()
        .expect("run python3")
}

#[test]
fn sink_receives_mail_from_python_smtplib() {
    let sink = SmtpSink::start();
    let out = python_send(
        sink.port(),
        r#"
msg = "Subject: python\n\n.hidden\n..two\n.\nend\n"
with smtplib.SMTP("127.0.0.1", port) as s:
    s.sendmail("mailgen@example.org", ["a@example.net", "b@example.com"], msg,
               mail_options=["BODY=8BITMIME"])
    s.sendmail("mailgen@example.org", ["j\u00f6rg@example.net"],
               "Subject: utf8\r\n\r\nGr\u00fc\u00dfe\r\n".encode("utf-8"),
               mail_options=["SMTPUTF8", "BODY=8BITMIME"])
"#,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mails = sink.wait_for(2, WAIT);
    assert_eq!(mails.len(), 2);
    // smtplib turned LF into CRLF (for a str message) and stuffed the dots;
    // the sink undid the dots.
    assert_eq!(
        mails[0].data,
        b"Subject: python\r\n\r\n.hidden\r\n..two\r\n.\r\nend\r\n"
    );
    assert_eq!(mails[0].rcpt_to, ["a@example.net", "b@example.com"]);
    assert!(mails[0].body_8bitmime);
    assert!(!mails[0].smtputf8);
    assert!(mails[1].smtputf8);
    assert_eq!(mails[1].rcpt_to, ["jörg@example.net"]);
    assert_eq!(mails[1].text(), "Subject: utf8\r\n\r\nGrüße\r\n");
    assert_eq!(sink.connections(), 1);
}

#[test]
fn sink_writes_a_maildir() {
    let dir = tempfile::tempdir().unwrap();
    let maildir = dir.path().join("Maildir");
    let sink = SmtpSink::start_with(SinkOptions {
        maildir: Some(maildir.clone()),
        ..SinkOptions::default()
    });
    let mut raw = Raw::ehlo(sink.port());
    assert_eq!(
        raw.transaction(
            "a@example.org",
            &["b@example.net"],
            "Subject: md\r\n\r\nhi\r\n"
        ),
        250
    );
    sink.wait_for(1, WAIT);
    for sub in ["cur", "tmp"] {
        assert!(maildir.join(sub).is_dir());
    }
    let files: Vec<_> = std::fs::read_dir(maildir.join("new"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(files.len(), 1);
    assert_eq!(
        std::fs::read(files[0].path()).unwrap(),
        b"Subject: md\r\n\r\nhi\r\n"
    );
}

// ---------------------------------------------------------------------------
// SMTP sink: faults

#[test]
fn fault_at_mail_for_the_next_transactions_then_heals() {
    let sink = SmtpSink::start();
    sink.set_fault(Fault::Fail {
        stage: Stage::Mail,
        failure: Failure::Temporary,
        scope: Scope::Next(2),
    });
    let mut raw = Raw::ehlo(sink.port());
    assert_eq!(raw.command("MAIL FROM:<a@example.org>"), 451);
    assert_eq!(raw.command("MAIL FROM:<a@example.org>"), 451);
    assert_eq!(sink.fault(), Fault::None, "healed after two uses");
    assert_eq!(
        raw.transaction("a@example.org", &["b@example.net"], "x\r\n"),
        250
    );

    sink.set_fault(Fault::Fail {
        stage: Stage::Mail,
        failure: Failure::Permanent,
        scope: Scope::All,
    });
    for _ in 0..3 {
        assert_eq!(raw.command("MAIL FROM:<a@example.org>"), 550);
    }
    sink.set_fault(Fault::None);
    assert_eq!(raw.command("MAIL FROM:<a@example.org>"), 250);
    assert_eq!(sink.messages().len(), 1);
}

#[test]
fn fault_at_rcpt_for_a_recipient_or_a_transaction() {
    let sink = SmtpSink::start();
    let mut raw = Raw::ehlo(sink.port());

    sink.set_fault(Fault::Fail {
        stage: Stage::Rcpt,
        failure: Failure::Permanent,
        scope: Scope::Recipient("Bad@Example.net".into()),
    });
    assert_eq!(raw.command("MAIL FROM:<a@example.org>"), 250);
    assert_eq!(raw.command("RCPT TO:<good@example.net>"), 250);
    assert_eq!(raw.command("RCPT TO:<bad@example.net>"), 550);
    assert_eq!(raw.command("DATA"), 354);
    raw.send("x\r\n.\r\n");
    assert_eq!(raw.reply().0, 250);
    assert_eq!(sink.wait_for(1, WAIT)[0].rcpt_to, ["good@example.net"]);

    // A count scope refuses every recipient of the transaction it hits.
    sink.set_fault(Fault::Fail {
        stage: Stage::Rcpt,
        failure: Failure::Temporary,
        scope: Scope::Next(1),
    });
    assert_eq!(raw.command("MAIL FROM:<a@example.org>"), 250);
    assert_eq!(raw.command("RCPT TO:<one@example.net>"), 450);
    assert_eq!(raw.command("RCPT TO:<two@example.net>"), 450);
    assert_eq!(raw.command("DATA"), 554);
    assert_eq!(raw.command("RSET"), 250);
    assert_eq!(
        raw.transaction("a@example.org", &["three@example.net"], "y\r\n"),
        250
    );
    assert_eq!(sink.wait_for(2, WAIT).len(), 2);
}

#[test]
fn fault_at_end_of_data() {
    let sink = SmtpSink::start();
    let mut raw = Raw::ehlo(sink.port());
    sink.set_fault(Fault::Fail {
        stage: Stage::DataEnd,
        failure: Failure::Temporary,
        scope: Scope::Next(1),
    });
    assert_eq!(
        raw.transaction("a@example.org", &["b@example.net"], "1\r\n"),
        451
    );
    assert_eq!(
        raw.transaction("a@example.org", &["b@example.net"], "2\r\n"),
        250
    );

    sink.set_fault(Fault::Fail {
        stage: Stage::DataEnd,
        failure: Failure::Permanent,
        scope: Scope::Recipient("b@example.net".into()),
    });
    assert_eq!(
        raw.transaction("a@example.org", &["b@example.net"], "3\r\n"),
        554
    );
    assert_eq!(
        raw.transaction("a@example.org", &["c@example.net"], "4\r\n"),
        250
    );
    let data: Vec<Vec<u8>> = sink.wait_for(2, WAIT).into_iter().map(|m| m.data).collect();
    assert_eq!(data, [b"2\r\n".to_vec(), b"4\r\n".to_vec()]);
    assert_eq!(Failure::Temporary.code(Stage::DataEnd), 451);
    assert_eq!(Failure::Permanent.code(Stage::DataEnd), 554);
}

#[test]
fn fault_drop_after_data_leaves_the_client_in_doubt() {
    let sink = SmtpSink::start();
    sink.set_fault(Fault::DropAfterData {
        scope: Scope::Next(1),
        deliver: false,
    });
    let mut raw = Raw::ehlo(sink.port());
    raw.command("MAIL FROM:<a@example.org>");
    raw.command("RCPT TO:<b@example.net>");
    assert_eq!(raw.command("DATA"), 354);
    raw.send("lost\r\n.\r\n");
    assert!(raw.closed(), "expected the connection to be dropped");
    assert!(sink.messages().is_empty());

    // Delivered, but the reply never came.
    sink.set_fault(Fault::DropAfterData {
        scope: Scope::All,
        deliver: true,
    });
    let mut raw = Raw::ehlo(sink.port());
    raw.command("MAIL FROM:<a@example.org>");
    raw.command("RCPT TO:<b@example.net>");
    raw.command("DATA");
    raw.send("kept\r\n.\r\n");
    assert!(raw.closed());
    assert_eq!(sink.wait_for(1, WAIT)[0].data, b"kept\r\n");

    sink.set_fault(Fault::None);
    let mut raw = Raw::ehlo(sink.port());
    assert_eq!(
        raw.transaction("a@example.org", &["b@example.net"], "fine\r\n"),
        250
    );
}

#[test]
fn fault_refuse_connections_then_resume_on_the_same_port() {
    let sink = SmtpSink::start();
    let port = sink.port();
    let mut open = Raw::ehlo(port);
    sink.set_fault(Fault::RefuseConnections);
    let err = TcpStream::connect(("127.0.0.1", port)).expect_err("connect must be refused");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused);
    assert!(open.closed(), "open connections are closed too");
    assert_eq!(sink.fault(), Fault::RefuseConnections);

    sink.resume().expect("listen again");
    assert_eq!(sink.port(), port);
    let mut raw = Raw::ehlo(port);
    assert_eq!(
        raw.transaction("a@example.org", &["b@example.net"], "back\r\n"),
        250
    );
    assert_eq!(sink.wait_for(1, WAIT).len(), 1);
    assert_eq!(sink.connections(), 2);
}

#[tokio::test]
async fn faults_as_lettre_sees_them() {
    let sink = SmtpSink::start();
    let envelope = Envelope::new(
        Some("mailgen@example.org".parse().unwrap()),
        vec!["abuse@example.net".parse().unwrap()],
    )
    .unwrap();
    let message = b"Subject: t\r\n\r\nx\r\n";
    // A fresh transport each time, so a broken pooled connection from the
    // previous case does not mix in.
    let transport = || {
        AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
            .port(sink.port())
            .build()
    };

    sink.set_fault(Fault::Fail {
        stage: Stage::Rcpt,
        failure: Failure::Permanent,
        scope: Scope::All,
    });
    let err = transport().send_raw(&envelope, message).await.unwrap_err();
    assert!(err.is_permanent(), "{err}");
    assert_eq!(err.status().map(u16::from), Some(550));

    sink.set_fault(Fault::Fail {
        stage: Stage::DataEnd,
        failure: Failure::Temporary,
        scope: Scope::All,
    });
    let err = transport().send_raw(&envelope, message).await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert_eq!(err.status().map(u16::from), Some(451));

    sink.set_fault(Fault::DropAfterData {
        scope: Scope::All,
        deliver: false,
    });
    let err = transport().send_raw(&envelope, message).await.unwrap_err();
    assert!(!err.is_transient() && !err.is_permanent(), "{err}");

    sink.set_fault(Fault::RefuseConnections);
    assert!(transport().send_raw(&envelope, message).await.is_err());
    sink.resume().unwrap();
    transport()
        .send_raw(&envelope, message)
        .await
        .expect("after resume");
    assert_eq!(sink.wait_for_async(1, WAIT).await.len(), 1);
}

// ---------------------------------------------------------------------------
// Feed

fn feed_params(events: usize, seed: u64) -> FeedParams {
    FeedParams {
        events,
        seed,
        ..FeedParams::default()
    }
}

fn allowed_ip(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            matches!(
                o,
                [192, 0, 2, _] | [198, 51, 100, _] | [203, 0, 113, _] | [198, 18..=19, _, _]
            )
        }
        IpAddr::V6(v6) => v6.segments()[..2] == [0x2001, 0xdb8],
    }
}

fn allowed_asn(asn: i32) -> bool {
    (64496..=131071).contains(&asn)
}

#[test]
fn feed_is_deterministic_and_has_the_requested_shape() {
    let params = feed_params(3000, 7);
    let events: Vec<_> = Feed::new(params.clone()).unwrap().events().collect();
    let again: Vec<_> = Feed::new(params.clone()).unwrap().events().collect();
    assert_eq!(events, again, "same seed, same events");
    let other: Vec<_> = Feed::new(feed_params(3000, 8)).unwrap().events().collect();
    assert_ne!(events, other, "another seed, other events");
    assert_eq!(events.len(), 3000);

    let two = events.iter().filter(|e| e.directives().len() == 2).count();
    let share = two as f64 / events.len() as f64;
    assert!(
        (0.08..=0.12).contains(&share),
        "two-directive share {share}"
    );
    assert!(events.iter().all(|e| matches!(e.directives().len(), 1 | 2)));

    let observation = params
        .time_observation
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, false);
    assert!(observation.ends_with("+00:00"));
    let mut recipients = std::collections::HashSet::new();
    let mut groups = 0;
    for e in &events {
        assert!(allowed_ip(&e.source_ip), "{}", e.source_ip);
        assert!(allowed_asn(e.source_asn), "{}", e.source_asn);
        assert!(e.time_source < e.time_observation);
        assert!(FEEDS.iter().any(|f| f.feed_name == e.feed_name));
        let kind = FEEDS.iter().find(|f| f.feed_name == e.feed_name).unwrap();
        for d in e.directives() {
            assert_eq!(d["medium"], "email");
            assert_eq!(d["template_name"], kind.template_name);
            assert_eq!(d["notification_format"], kind.notification_format);
            assert_eq!(d["event_data_format"], kind.event_data_format);
            assert_eq!(d["notification_interval"], 0);
            let address = d["recipient_address"].as_str().unwrap();
            assert!(
                [".example.net", ".example.org", ".example.com"]
                    .iter()
                    .any(|t| address.ends_with(t)),
                "{address}"
            );
            recipients.insert(address.to_string());
            let agg = &d["aggregate_identifier"];
            assert_eq!(agg["source.asn"], e.source_asn, "numbers stay numbers");
            assert_eq!(agg["time.observation"], observation.as_str());
            groups += usize::from(agg.get("recipient_group").is_some());
        }
        if e.feed_name == "Open-SNMP" {
            assert!(e.extra["system_desc"].is_string());
        }
        if e.feed_name == "Ssl-Freak-Scan" {
            assert!(e.extra["subject_common_name"].is_string());
        }
        if e.feed_name == "Drone" {
            assert!(e.malware_name.is_some() && e.destination_ip.is_some());
        }
    }
    assert!(
        recipients.len() > 100 && recipients.len() <= 500,
        "{} recipients",
        recipients.len()
    );
    assert!(groups > 0, "no recipient_group at all");
    for kind in FEEDS {
        assert!(
            events.iter().any(|e| e.feed_name == kind.feed_name),
            "{}",
            kind.feed_name
        );
    }

    // Zipf: the busiest ASN has far more than its fair share; with s = 0
    // the distribution is flat.
    let busiest = |events: &[mailgend::sandbox::NewEvent]| {
        let mut counts: HashMap<i32, usize> = HashMap::new();
        for e in events {
            *counts.entry(e.source_asn).or_default() += 1;
        }
        counts.values().copied().max().unwrap()
    };
    let mean = 3000.0 / 2000.0;
    assert!(
        busiest(&events) as f64 > 20.0 * mean,
        "busiest {}",
        busiest(&events)
    );
    let flat: Vec<_> = Feed::new(FeedParams {
        zipf_s: 0.0,
        ..params
    })
    .unwrap()
    .events()
    .collect();
    assert!(
        (busiest(&flat) as f64) < 10.0 * mean,
        "flat busiest {}",
        busiest(&flat)
    );
    assert!(feed::describe(&events).starts_with("3000 events"));
}

#[test]
fn feed_rejects_bad_parameters() {
    for params in [
        FeedParams {
            asns: 0,
            ..FeedParams::default()
        },
        FeedParams {
            recipients: 1,
            ..FeedParams::default()
        },
        FeedParams {
            two_directive_share: 1.5,
            ..FeedParams::default()
        },
        FeedParams {
            zipf_s: f64::NAN,
            ..FeedParams::default()
        },
    ] {
        assert!(Feed::new(params.clone()).is_err(), "{params:?}");
    }
}

#[tokio::test]
async fn feed_inserts_through_row_triggers_into_the_events_table() {
    let db = PgCluster::shared().unwrap().create_database().unwrap();
    // The real IntelMQ table, old-style json extra, plus a row trigger that
    // records each inserted event's directive count (COPY must fire it).
    db.create_events_table(ExtraType::Json).await.unwrap();
    let client = db.connect().await.unwrap();
    client
        .batch_execute(
            "CREATE TABLE seen (events_id bigint, n int);
             CREATE FUNCTION note() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               INSERT INTO seen VALUES (NEW.id,
                 json_array_length(NEW.extra -> 'certbund' -> 'source_directives'));
               RETURN NEW;
             END $$;
             CREATE TRIGGER note AFTER INSERT ON events FOR EACH ROW EXECUTE FUNCTION note();",
        )
        .await
        .unwrap();
    let feed = Feed::new(feed_params(500, 3)).unwrap();
    let events: Vec<_> = feed.events().collect();
    let directives: usize = events.iter().map(|e| e.directives().len()).sum();
    let inserted = feed::insert(&client, events.clone(), 128).await.unwrap();
    assert_eq!(inserted, 500);
    let row = client
        .query_one("SELECT count(*), sum(n)::bigint FROM seen", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 500, "trigger fired once per row");
    assert_eq!(row.get::<_, i64>(1) as usize, directives);

    // Values arrive typed and intact.
    let rows = client
        .query(
            "SELECT \"source.ip\", \"source.asn\", masklen(\"source.network\"), \"time.source\", \
             \"feed.name\", \"raw\", extra::text FROM events ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 500);
    for (row, e) in rows.iter().zip(&events) {
        assert_eq!(row.get::<_, IpAddr>(0), e.source_ip);
        assert_eq!(row.get::<_, i32>(1), e.source_asn);
        assert!(row.get::<_, i32>(2) < 128);
        assert_eq!(row.get::<_, chrono::DateTime<Utc>>(3), e.time_source);
        assert_eq!(row.get::<_, String>(4), e.feed_name);
        assert_eq!(row.get::<_, String>(5), e.raw);
        let extra: serde_json::Value = serde_json::from_str(row.get::<_, &str>(6)).unwrap();
        assert_eq!(extra, e.extra);
    }
}

#[tokio::test]
async fn feed_inserts_into_a_minimal_jsonb_table() {
    let db = PgCluster::shared().unwrap().create_database().unwrap();
    let client = db.connect().await.unwrap();
    let types = [
        "timestamptz",
        "timestamptz",
        "text",
        "text",
        "real",
        "varchar(100)",
        "text",
        "text",
        "varchar(11)",
        "varchar(100)",
        "inet",
        "integer",
        "integer",
        "inet",
        "varchar(2)",
        "text",
        "inet",
        "integer",
        "text",
        "text",
        "text",
        "jsonb",
    ];
    let columns: Vec<String> = INSERT_COLUMNS
        .iter()
        .zip(types)
        .map(|(c, t)| format!("\"{c}\" {t}"))
        .collect();
    client
        .batch_execute(&format!(
            "CREATE TABLE ev_min (id bigserial PRIMARY KEY, {})",
            columns.join(", ")
        ))
        .await
        .unwrap();
    let feed = Feed::new(FeedParams {
        two_directive_share: 0.5,
        ..feed_params(300, 11)
    })
    .unwrap();
    let n = feed::insert_into(&client, "ev_min", feed.events(), 1000)
        .await
        .unwrap();
    assert_eq!(n, 300);
    let two: i64 = client
        .query_one(
            "SELECT count(*) FROM ev_min \
             WHERE jsonb_array_length(extra -> 'certbund' -> 'source_directives') = 2",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let expected = feed.events().filter(|e| e.directives().len() == 2).count();
    assert_eq!(two as usize, expected);
    assert!((100..=200).contains(&expected), "{expected}");
}
