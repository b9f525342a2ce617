//! Bounces traced back to their tickets (issue 19, items 2 and 3), over
//! real SMTP throughout: the notifier's VERP envelope senders as the sink
//! records them, DSNs and classic bounces sent to a running `mailgend
//! route`, and `mailgend bounces` listing what it recorded.

mod common;
#[path = "common/route_process.rs"]
mod route_process;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{directive, event_fields, TestEnv};
use mailgend::shared::verp::Verp;
use serde_json::json;

const VERP_KEY: &str = "bounces-test-key-0123456789abcdef";

/// Turns VERP on (`mailgend.verp`) with a key file in the test's dir.
fn enable_verp(env: &mut TestEnv) -> Verp {
    let key = env.dir.path().join("verp.key");
    std::fs::write(&key, format!("{VERP_KEY}\n")).unwrap();
    env.config_json["mailgend"]["verp"] = json!({
        "address": "bounces@cert.example",
        "key_file": key,
    });
    Verp::new("bounces@cert.example", VERP_KEY.as_bytes()).unwrap()
}

/// `n` Open-Redis events of one AS (one group).
async fn insert_group(env: &TestEnv, n: i32, asn: i64) {
    let d = directive(&format!("abuse@as{asn}.example.net"), "Open-Redis", asn);
    env.client()
        .await
        .execute(
            "INSERT INTO events (\"source.ip\", \"source.asn\", \"time.source\", \
                 \"time.observation\", \"feed.name\", \"classification.type\", \
                 \"classification.taxonomy\", \"classification.identifier\", \
                 \"protocol.transport\", \"source.port\", extra) \
             SELECT '2001:db8::'::inet + g, $3, '2024-05-01T05:12:13+00:00', \
                    '2024-05-01T06:00:00+00:00', 'Open-Redis', 'vulnerable-system', \
                    'vulnerable', 'open-redis', 'tcp', 6379, \
                    jsonb_build_object('redis_version', '6.2.1', \
                        'certbund', jsonb_build_object('source_directives', $1::text::jsonb)) \
               FROM generate_series(1, $2) g",
            &[&json!([d]).to_string(), &n, &(asn as i32)],
        )
        .await
        .expect("insert events");
}

#[tokio::test]
async fn each_mail_and_each_split_part_carries_its_own_ticket_in_mail_from() {
    let mut env = TestEnv::new().await;
    let verp = enable_verp(&mut env);
    common::set_oversize(&env, "split");
    env.config_json["smtp"]["max_message_size"] = json!(20_000);
    // One group that must be split, one small one.
    insert_group(&env, 600, 64496).await;
    env.insert_event(
        event_fields("198.51.100.7", 64511),
        json!([directive("abuse@as64511.example.org", "Open-Redis", 64511)]),
    )
    .await;

    let summary = env.run().await;
    assert_eq!(summary.errors, 0, "{summary}");
    assert!(summary.sent >= 3, "the big group is split: {summary}");
    let mails = env.sink.wait_for(summary.sent, Duration::from_secs(30));
    let mut from_tickets = BTreeSet::new();
    for m in &mails {
        let ticket = verp
            .ticket(&m.mail_from)
            .unwrap_or_else(|e| panic!("MAIL FROM {:?}: {e}", m.mail_from));
        assert!(m.mail_from.starts_with(&format!("bounces+{ticket}-")));
        // The From header is unchanged.
        assert_eq!(
            m.header("From").as_deref(),
            Some(common::SENDER),
            "{}",
            m.mail_from
        );
        assert!(from_tickets.insert(ticket.to_string()), "a ticket twice");
    }
    let sent: BTreeSet<String> = env.sent_tickets().await.into_iter().collect();
    assert_eq!(
        from_tickets, sent,
        "MAIL FROM tickets are the tickets in `sent`"
    );
}

#[tokio::test]
async fn without_verp_the_envelope_sender_is_the_sender_address() {
    let env = TestEnv::new().await;
    env.insert_event(
        event_fields("198.51.100.7", 64511),
        json!([directive("abuse@as64511.example.org", "Open-Redis", 64511)]),
    )
    .await;
    assert_eq!(env.run().await.sent, 1);
    let mails = env.sink.wait_for(1, Duration::from_secs(30));
    assert_eq!(mails[0].mail_from, "cert@example.org");
}

// ------------------------------------------------------------------ route

#[path = "common/raw_smtp.rs"]
mod raw_smtp;

use std::path::Path;
use std::process::Command;

use mailgend::notify::ticket::Ticket;
use mailgend::sandbox::{ExtraType, PgCluster, SmtpSink};
use raw_smtp::{code, free_port, Raw};
use route_process::RouteProcess;

/// A running `mailgend route` whose `bounces-config` is the notifier's file.
struct Route {
    p: RouteProcess,
    port: u16,
}

impl Route {
    fn start(dir: &Path, remote: u16, notifier_config: &Path) -> Route {
        let port = free_port();
        let yml = dir.join("configuration.yml");
        std::fs::write(
            &yml,
            format!(
                "local-smtp: 127.0.0.1:{port}
remote-smtp: 127.0.0.1:{remote}
managers:
- name: mail
  messages-we-want:
    from: alerts@example.org
  rules:
  - actions:
    - mailto:backup-team@example.net
    filter:
      function: mail.in_subject
      args: [backup]
mailgend:
  spool: {spool}
  command-timeout: 5
  metrics-listen: 127.0.0.1:{metrics}
  bounces-config: {conf}
",
                spool = dir.join("spool").display(),
                metrics = free_port(),
                conf = notifier_config.display()
            ),
        )
        .unwrap();
        Route {
            p: RouteProcess::start(dir, Duration::from_secs(30)),
            port,
        }
    }

    fn log(&self) -> String {
        self.p.log()
    }

    fn wait_log(&self, needle: &str) {
        self.p.wait_log(needle, 1);
    }

    /// The `metrics-listen` address from the YAML.
    fn metrics(&self) -> String {
        let yml = std::fs::read_to_string(self.p.log.with_file_name("configuration.yml")).unwrap();
        let addr = yml
            .lines()
            .find_map(|l| l.trim().strip_prefix("metrics-listen: "))
            .unwrap()
            .to_string();
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }
}

/// A DSN as Postfix writes one (RFC 3464): from `<>` to the envelope
/// sender of the failed mail, `multipart/report` with the human part, the
/// `message/delivery-status` part and the returned headers.
fn postfix_dsn(verp_address: &str, recipient: &str, message_id: &str) -> Vec<u8> {
    format!(
        "Received: by relay.net.example (Postfix) id 4ABC; Thu,  3 Dec 2026 14:00:01 +0000 (UTC)\r\n\
Date: Thu,  3 Dec 2026 14:00:01 +0000 (UTC)\r\n\
From: MAILER-DAEMON@relay.net.example (Mail Delivery System)\r\n\
Subject: Undelivered Mail Returned to Sender\r\n\
To: {verp_address}\r\n\
Auto-Submitted: auto-replied\r\n\
MIME-Version: 1.0\r\n\
Content-Type: multipart/report; report-type=delivery-status;\r\n\
\tboundary=\"4ABC.1764770401/relay.net.example\"\r\n\
Message-Id: {message_id}\r\n\
\r\n\
This is a MIME-encapsulated message.\r\n\
\r\n\
--4ABC.1764770401/relay.net.example\r\n\
Content-Description: Notification\r\n\
Content-Type: text/plain; charset=us-ascii\r\n\
\r\n\
This is the mail system at host relay.net.example.\r\n\
\r\n\
I'm sorry to have to inform you that your message could not\r\n\
be delivered to one or more recipients.\r\n\
\r\n\
<{recipient}>: host in.net.example[192.0.2.25] said: 550 5.1.1\r\n\
\x20   <{recipient}>: Recipient address rejected: User unknown\r\n\
\r\n\
--4ABC.1764770401/relay.net.example\r\n\
Content-Description: Delivery report\r\n\
Content-Type: message/delivery-status\r\n\
\r\n\
Reporting-MTA: dns; relay.net.example\r\n\
X-Postfix-Queue-ID: 4ABC\r\n\
X-Postfix-Sender: rfc822; {verp_address}\r\n\
Arrival-Date: Thu,  3 Dec 2026 14:00:00 +0000 (UTC)\r\n\
\r\n\
Final-Recipient: rfc822; {recipient}\r\n\
Original-Recipient: rfc822;{recipient}\r\n\
Action: failed\r\n\
Status: 5.1.1\r\n\
Remote-MTA: dns; in.net.example\r\n\
Diagnostic-Code: smtp; 550 5.1.1 <{recipient}>: Recipient address rejected:\r\n\
\x20   User unknown\r\n\
\r\n\
--4ABC.1764770401/relay.net.example\r\n\
Content-Description: Undelivered Message Headers\r\n\
Content-Type: text/rfc822-headers\r\n\
\r\n\
From: CERT Example <cert@example.org>\r\n\
To: {recipient}\r\n\
Subject: events\r\n\
\r\n\
--4ABC.1764770401/relay.net.example--\r\n"
    )
    .into_bytes()
}

/// `mailgend -c CONF bounces ARGS… --json`, parsed.
fn bounces_json(conf: &Path, args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_mailgend"))
        .arg("-c")
        .arg(conf)
        .arg("bounces")
        .args(args)
        .arg("--json")
        .env("HOME", conf.parent().unwrap())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

/// One transaction; the replies to RCPT and (when RCPT took it) the end
/// of DATA.
async fn offer(port: u16, from: &str, to: &str, data: &[u8]) -> (String, Option<String>) {
    let (mut s, _) = Raw::connect(port).await;
    assert_eq!(code(&s.cmd("EHLO relay.net.example").await), "250");
    assert_eq!(code(&s.cmd(&format!("MAIL FROM:<{from}>")).await), "250");
    let rcpt = s.cmd(&format!("RCPT TO:<{to}>")).await;
    if code(&rcpt) != "250" {
        let _ = s.cmd("QUIT").await;
        return (rcpt, None);
    }
    assert_eq!(code(&s.cmd("DATA").await), "354");
    s.send(data).await;
    s.send(b".\r\n").await;
    let end = s.reply().await;
    let _ = s.cmd("QUIT").await;
    (rcpt, Some(end))
}

// The "done when": a notification the relay refuses after
// accepting it comes back as a DSN to its VERP address through `mailgend
// route` and shows up in `mailgend bounces` with its ticket.
#[tokio::test]
async fn a_dsn_through_mailgend_route_is_listed_with_its_ticket() {
    // Our own cluster, so the test can stop and start PostgreSQL.
    let mut cluster = PgCluster::start_temp().expect("cluster");
    let db = cluster.create_database_async().await.unwrap();
    db.create_events_table(ExtraType::Jsonb).await.unwrap();
    mailgend::notify::db::migrate::migrate(&mut db.connect().await.unwrap())
        .await
        .unwrap();
    let mut env = TestEnv::new().await;
    env.config_json["database"]["event"] = json!({"name": db.name, "username": db.superuser,
        "password": null, "host": db.host, "port": db.port});
    env.db = db;
    let verp = enable_verp(&mut env);
    env.config_json["mailgend"]["bounces"] = json!({"warn_after": 2, "window": "30d"});
    let conf = env.config_file();
    for (ip, asn) in [("198.51.100.7", 64511), ("198.51.100.8", 64512)] {
        env.insert_event(
            event_fields(ip, asn),
            json!([directive(
                &format!("abuse@as{asn}.example.org"),
                "Open-Redis",
                asn
            )]),
        )
        .await;
    }
    assert_eq!(env.run().await.sent, 2);
    let mails = env.sink.wait_for(2, Duration::from_secs(30));
    let mail = mails
        .iter()
        .find(|m| m.rcpt_to == ["abuse@as64511.example.org"])
        .unwrap();
    let other = mails
        .iter()
        .find(|m| m.rcpt_to == ["abuse@as64512.example.org"])
        .unwrap();
    let ticket = Ticket::from_stored(verp.ticket(&mail.mail_from).unwrap());
    let sent_id: i64 = env
        .client()
        .await
        .query_one(
            "SELECT id FROM sent WHERE intelmq_ticket = $1",
            &[&ticket.as_str()],
        )
        .await
        .unwrap()
        .get(0);

    // The router forwards to its own relay, which must never see a bounce.
    let remote = SmtpSink::start();
    let route = Route::start(env.dir.path(), remote.port(), &conf);
    route.wait_log("taking bounces to VERP addresses");

    let dsn = postfix_dsn(
        &mail.mail_from,
        "abuse@as64511.example.org",
        "<4ABC@relay.net.example>",
    );
    let (rcpt, end) = offer(route.port, "", &mail.mail_from, &dsn).await;
    assert_eq!(code(&rcpt), "250", "{rcpt}");
    let end = end.unwrap();
    assert_eq!(code(&end), "250", "{end}\n{}", route.log());

    let listed = bounces_json(&conf, &[]);
    println!(
        "MAIL FROM of the notification: {}\n$ mailgend bounces --json\n{listed:#}",
        mail.mail_from
    );
    let rows = listed["bounces"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{listed}");
    let b = &rows[0];
    assert_eq!(b["ticket"], json!(ticket.as_str()));
    assert_eq!(b["sent_id"], json!(sent_id));
    assert_eq!(b["recipient"], json!("abuse@as64511.example.org"));
    assert_eq!(b["status"], json!("5.1.1"));
    assert_eq!(b["class"], json!("permanent"));
    assert_eq!(b["reporting_mta"], json!("relay.net.example"));
    assert_eq!(b["message_id"], json!("<4ABC@relay.net.example>"));
    assert_eq!(
        b["diagnostic"],
        json!("550 5.1.1 <abuse@as64511.example.org>: Recipient address rejected: User unknown")
    );
    // The same DSN again (our 250 got lost): not recorded twice.
    let (_, end) = offer(route.port, "", &mail.mail_from, &dsn).await;
    assert_eq!(code(&end.unwrap()), "250");
    assert_eq!(
        bounces_json(&conf, &[])["bounces"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // A bounce address takes a transaction of its own: mixed with another
    // recipient, whichever comes second is deferred (452).
    let (mut s, _) = Raw::connect(route.port).await;
    assert_eq!(code(&s.cmd("EHLO relay.net.example").await), "250");
    assert_eq!(code(&s.cmd("MAIL FROM:<>").await), "250");
    assert_eq!(
        code(&s.cmd(&format!("RCPT TO:<{}>", mail.mail_from)).await),
        "250"
    );
    assert_eq!(code(&s.cmd("RCPT TO:<ops@example.net>").await), "452");
    assert_eq!(code(&s.cmd("RSET").await), "250");
    assert_eq!(code(&s.cmd("MAIL FROM:<>").await), "250");
    assert_eq!(code(&s.cmd("RCPT TO:<ops@example.net>").await), "250");
    assert_eq!(
        code(&s.cmd(&format!("RCPT TO:<{}>", mail.mail_from)).await),
        "452"
    );
    let _ = s.cmd("QUIT").await;

    // A forged MAC and an unknown ticket: refused at RCPT, recorded nowhere.
    let forged =
        mail.mail_from
            .replacen(&ticket.to_string(), &other_ticket(&ticket).to_string(), 1);
    let (rcpt, _) = offer(route.port, "", &forged, &dsn).await;
    assert_eq!(code(&rcpt), "550", "{rcpt}");
    let unknown = verp.address("20261203-99999999");
    let (rcpt, _) = offer(route.port, "", &unknown, &dsn).await;
    assert_eq!(code(&rcpt), "550", "{rcpt}");
    assert!(route
        .log()
        .contains("refused a bounce for a ticket that was never sent"));
    assert!(route
        .log()
        .contains("refused a bounce address: forged or malformed"));
    assert_eq!(
        bounces_json(&conf, &[])["bounces"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // A classic bounce (qmail style, no DSN) for the other notification.
    let other_ticket_sent = Ticket::from_stored(verp.ticket(&other.mail_from).unwrap());
    let classic = format!(
        "From: MAILER-DAEMON@old.net.example\r\nTo: {}\r\nSubject: failure notice\r\n\
         Message-Id: <q1@old.net.example>\r\n\r\n\
         Hi. This is the qmail-send program at old.net.example.\r\n\
         I'm afraid I wasn't able to deliver your message to the following addresses.\r\n\
         This is a permanent error; I've given up. Sorry it didn't work out.\r\n\r\n\
         <abuse@as64512.example.org>:\r\n\
         192.0.2.26 does not like recipient.\r\n\
         Remote host said: 550 5.7.1 Mailbox disabled for this recipient\r\n",
        other.mail_from
    );
    let (_, end) = offer(route.port, "", &other.mail_from, classic.as_bytes()).await;
    assert_eq!(code(&end.unwrap()), "250");
    let listed = bounces_json(&conf, &["--recipient", "ABUSE@as64512.example.org"]);
    let rows = listed["bounces"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{listed}");
    assert_eq!(rows[0]["ticket"], json!(other_ticket_sent.as_str()));
    assert_eq!(rows[0]["status"], json!("5.7.1"));
    assert_eq!(rows[0]["class"], json!("permanent"));
    assert_eq!(
        bounces_json(&conf, &["--since", "1h"])["bounces"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(
        bounces_json(&conf, &["--since", "2099-01-01"])["bounces"]
            .as_array()
            .unwrap()
            .len(),
        0
    );

    // The database down: 451 at RCPT, so the relay keeps the DSN and
    // retries; once it is back the retry is recorded.
    cluster.stop().unwrap();
    let dsn2 = postfix_dsn(
        &mail.mail_from,
        "abuse@as64511.example.org",
        "<4ABD@relay.net.example>",
    );
    let (rcpt, _) = offer(route.port, "", &mail.mail_from, &dsn2).await;
    assert_eq!(code(&rcpt), "451", "{rcpt}");
    assert!(route.log().contains("bounce database unavailable"));
    cluster.start_again().unwrap();
    let (rcpt, end) = offer(route.port, "", &mail.mail_from, &dsn2).await;
    assert_eq!(code(&rcpt), "250", "{rcpt}");
    assert_eq!(code(&end.unwrap()), "250");
    assert_eq!(
        bounces_json(&conf, &["--recipient", "abuse@as64511.example.org"])["bounces"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    // The policy (warn_after 2): a WARN naming the contact and the ticket.
    route.wait_log("contact bounces permanently");
    let warn = route
        .log()
        .lines()
        .find(|l| l.contains("contact bounces permanently"))
        .unwrap()
        .to_string();
    assert!(
        warn.contains("abuse@as64511.example.org") && warn.contains(ticket.as_str()),
        "{warn}"
    );

    // Metrics by class; nothing reached the router's relay.
    let m = route.metrics();
    assert!(
        m.contains("mailgend_bounces_total{class=\"permanent\"} 3"),
        "{m}"
    );
    assert!(
        m.contains("mailgend_bounces_total{class=\"temporary\"} 0"),
        "{m}"
    );
    assert!(remote.messages().is_empty(), "a bounce was forwarded");

    // The text listing, as docs/operations.md shows it.
    let out = Command::new(env!("CARGO_BIN_EXE_mailgend"))
        .arg("-c")
        .arg(&conf)
        .args(["bounces", "--since", "7d"])
        .env("HOME", env.dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    // Shown with `--no-capture` (the demo in the closing note).
    println!("$ mailgend bounces --since 7d\n{text}");
    assert_eq!(
        text.lines().count(),
        4,
        "a title and three bounces:\n{text}"
    );
    let line = text
        .lines()
        .find(|l| l.contains("abuse@as64512.example.org"))
        .unwrap();
    for part in [
        "permanent",
        "5.7.1",
        other_ticket_sent.as_str(),
        "Remote host said: 550 5.7.1",
    ] {
        assert!(line.contains(part), "{part}: {line}");
    }

    // `mailgend status --bounces` shows them.
    let out = Command::new(env!("CARGO_BIN_EXE_mailgend"))
        .arg("-c")
        .arg(&conf)
        .args(["status", "--bounces"])
        .env("HOME", env.dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    println!("$ mailgend status --bounces\n{text}");
    assert!(
        text.contains("\nbounces 24 h        3 permanent, 0 temporary\n"),
        "{text}"
    );
    assert!(text.contains(ticket.as_str()), "{text}");
    drop(route);
}

/// Another well-formed ticket of the same day.
fn other_ticket(t: &Ticket) -> Ticket {
    let (day, seq) = t.as_str().split_once('-').unwrap();
    let seq: u64 = seq.parse().unwrap();
    Ticket::from_stored(format!("{day}-{:08}", seq + 1))
}

#[tokio::test]
async fn unknown_and_malformed_bounce_addresses_are_refused_at_rcpt() {
    let mut env = TestEnv::new().await;
    let verp = enable_verp(&mut env);
    let conf = env.config_file();
    mailgend::notify::db::migrate::migrate(&mut env.client().await)
        .await
        .unwrap();
    let remote = SmtpSink::start();
    let route = Route::start(env.dir.path(), remote.port(), &conf);
    // `route --check` reads bounces-config as the router does.
    let check = |yml: &Path| {
        Command::new(env!("CARGO_BIN_EXE_mailgend"))
            .args(["route", "--check", "-c"])
            .arg(yml)
            .output()
            .unwrap()
    };
    let yml = env.dir.path().join("configuration.yml");
    let out = check(&yml);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("bounces: mail to bounces+<ticket>-<mac>@cert.example is recorded"),
        "{text}"
    );
    let mut no_verp = env.config_json.clone();
    no_verp["mailgend"].as_object_mut().unwrap().remove("verp");
    let no_verp_file = env.dir.path().join("no-verp.conf");
    std::fs::write(&no_verp_file, no_verp.to_string()).unwrap();
    let bad = env.dir.path().join("bad.yml");
    std::fs::write(
        &bad,
        std::fs::read_to_string(&yml).unwrap().replace(
            &conf.display().to_string(),
            &no_verp_file.display().to_string(),
        ),
    )
    .unwrap();
    let out = check(&bad);
    // `--check` prints its findings on stdout.
    let err = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("mailgend.bounces-config") && err.contains("sets no mailgend.verp"),
        "{err}"
    );

    let (mut s, _) = Raw::connect(route.port).await;
    assert_eq!(code(&s.cmd("EHLO relay.net.example").await), "250");
    assert_eq!(code(&s.cmd("MAIL FROM:<>").await), "250");
    assert_eq!(code(&s.cmd("RCPT TO:<ops@example.net>").await), "250");
    // A bounce address of a ticket never sent (the database is empty).
    let unknown = verp.address("20261203-10000001");
    assert_eq!(code(&s.cmd(&format!("RCPT TO:<{unknown}>")).await), "550");
    // Malformed: refused too.
    let r = s.cmd("RCPT TO:<bounces+nonsense@cert.example>").await;
    assert_eq!(code(&r), "550", "{r}");
}
