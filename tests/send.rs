//! `mailgend send --all` end to end: real PostgreSQL, the real trigger, the
//! shipped formats and templates, a real SMTP receiver over TCP, and (for
//! signatures) the real `gpg --verify`.

mod common;

use std::process::Command;

use common::{directive, event_fields, header, qp_decode, repo_path, TestEnv};
use mailgend::notify::signature::Signer;
use mailgend::sandbox::smtp_sink::Scope;
use mailgend::sandbox::{Failure, Fault, Stage};
use serde_json::json;

/// The decoded text of the first `text/plain` part after the headers.
fn body_text(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    let start = text
        .find("Content-Transfer-Encoding: quoted-printable\r\n")
        .expect("a quoted-printable part");
    let rest = &text[start..];
    let body = rest.split_once("\r\n\r\n").unwrap().1;
    // Python-style boundaries start with 15 '='; a line of dashes in the
    // text is not one.
    let end = body.find("\r\n--===============").unwrap_or(body.len());
    qp_decode(&body[..end])
}

fn headers_block(raw: &[u8]) -> String {
    String::from_utf8_lossy(raw)
        .split("\r\n\r\n")
        .next()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn a_group_becomes_one_mail_with_csv_and_is_marked_sent() {
    let env = TestEnv::new().await;
    let mut f1 = event_fields("192.0.2.10", 64496);
    f1["extra"] = json!({"redis_version": "6.2.1"});
    let mut f2 = event_fields("192.0.2.11", 64496);
    f2["extra"] = json!({"redis_version": 7.0, "note": "a\r\nBcc: evil@example.com"});
    f2["time.source"] = json!("2024-05-01T04:00:00+00:00");
    let d = directive("abuse@as64496.example.net", "Open-Redis", 64496);
    let e1 = env.insert_event(f1, json!([d.clone()])).await;
    let e2 = env.insert_event(f2, json!([d])).await;
    env.insert_event(
        event_fields("198.51.100.7", 64511),
        json!([directive("abuse@as64511.example.org", "Open-Redis", 64511)]),
    )
    .await;

    let summary = env.run().await;
    assert_eq!(summary.to_string(), "2 mails sent, 0 postponed, 0 errors.");
    let mails = env.sink.wait_for(2, std::time::Duration::from_secs(30));
    assert_eq!(mails.len(), 2);
    let mail = mails
        .iter()
        .find(|m| m.rcpt_to == ["abuse@as64496.example.net"])
        .expect("mail for AS64496");
    assert_eq!(mail.mail_from, "cert@example.org");
    assert_eq!(header(&mail.data, "From").unwrap(), common::SENDER);
    assert_eq!(
        header(&mail.data, "To").unwrap(),
        "abuse@as64496.example.net"
    );
    let subject = header(&mail.data, "Subject").unwrap();
    let message_id = header(&mail.data, "Message-Id").unwrap();
    assert!(message_id.ends_with("@example.org>"), "{message_id}");

    // One ticket for the group, in the subject and in `sent`; every
    // directive of the group points at it; sent_at is the Date header.
    let client = env.client().await;
    let rows = client
        .query(
            "SELECT s.intelmq_ticket, s.sent_at, d.events_id FROM directives d \
             JOIN sent s ON s.id = d.sent_id WHERE d.events_id = ANY($1) ORDER BY d.events_id",
            &[&vec![e1, e2]],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 2);
    let ticket: String = rows[0].get(0);
    assert_eq!(ticket, rows[1].get::<_, String>(0));
    assert!(subject.contains(&ticket), "{subject} has {ticket}");
    let sent_at: chrono::DateTime<chrono::Utc> = rows[0].get(1);
    let date = chrono::DateTime::parse_from_rfc2822(&header(&mail.data, "Date").unwrap()).unwrap();
    assert_eq!(sent_at, date);
    assert_eq!(env.pending_count().await, 0);
    assert_eq!(env.sent_tickets().await.len(), 2);

    // The CSV: all fields quoted, titles, time.source without zone or
    // fraction, extra values as the old tool printed them; event data with
    // a line break stays inside its field (and never became a header).
    let body = body_text(&mail.data);
    assert!(
        body.contains(
            "\"asn\",\"ip\",\"timestamp\",\"version\"\n\
             \"64496\",\"192.0.2.10\",\"2024-05-01 05:12:13\",\"6.2.1\"\n\
             \"64496\",\"192.0.2.11\",\"2024-05-01 04:00:00\",\"7.0\"\n"
        ),
        "{body}"
    );
    assert!(header(&mail.data, "Bcc").is_none());
}

#[tokio::test]
async fn a_group_is_postponed_until_its_interval_has_passed() {
    let env = TestEnv::new().await;
    // Example 11's malware-infection waits for the interval (the
    // Shadowserver tables wait for ages instead).
    let d = json!({
        "medium": "email", "recipient_address": "abuse@as64496.example.net",
        "template_name": "malware-infection", "notification_format": "malware-infection",
        "event_data_format": "malware-infection_csv_inline", "notification_interval": 86400,
        "aggregate_identifier": {"source.asn": 64496}
    });
    env.insert_event(event_fields("192.0.2.10", 64496), json!([d.clone()]))
        .await;
    assert_eq!(env.run().await.sent, 1);

    // Same five keys again within notification_interval (1 day): waits.
    env.insert_event(event_fields("192.0.2.11", 64496), json!([d]))
        .await;
    let s = env.run().await;
    assert_eq!((s.sent, s.postponed, s.errors), (0, 1, 0));
    assert_eq!(env.pending_count().await, 1);

    // Once the last mail is older than the interval, it goes.
    env.client()
        .await
        .execute(
            "UPDATE sent SET sent_at = sent_at - interval '1 day 1 second'",
            &[],
        )
        .await
        .unwrap();
    let s = env.run().await;
    assert_eq!((s.sent, s.postponed, s.errors), (1, 0, 0));
    assert_eq!(env.sink.messages().len(), 2);
}

#[tokio::test]
async fn minimum_ages_postpone_young_groups() {
    let env = TestEnv::new().await;
    // Example 13's rules: the newest directive at least 15 min old and
    // time.observation at least 2 h old.
    let observation = (chrono::Utc::now() - chrono::Duration::minutes(30)).to_rfc3339();
    let d = json!({
        "medium": "email", "recipient_address": "abuse@as64496.example.net",
        "template_name": "openredis_provider", "notification_format": "vulnerable-service",
        "event_data_format": "openredis_csv_inline", "notification_interval": 0,
        "aggregate_identifier": {"source.asn": 64496, "time.observation": observation}
    });
    env.insert_event(event_fields("192.0.2.10", 64496), json!([d]))
        .await;
    assert_eq!(env.run().await.postponed, 1, "directive too young");
    env.age_directives(20 * 60).await;
    assert_eq!(env.run().await.postponed, 1, "observation too young");
    env.client()
        .await
        .execute(
            "UPDATE directives SET aggregate_identifier = \
             json_object_as_text_array(jsonb_build_object('source.asn', 64496, \
               'time.observation', to_char(now() AT TIME ZONE 'UTC' - interval '3 hours', \
               'YYYY-MM-DD\"T\"HH24:MI:SS\"+00:00\"')))",
            &[],
        )
        .await
        .unwrap();
    let s = env.run().await;
    assert_eq!((s.sent, s.postponed, s.errors), (1, 0, 0), "{s:?}");
}

#[tokio::test]
async fn a_broken_template_fails_its_group_only_and_consumes_no_ticket() {
    let env = TestEnv::new().await;
    env.write_template(
        "unknown_placeholder",
        "Subject $ticket_number\n\nHello ${no_such_thing}\n",
    );
    let good = directive("abuse@as64496.example.net", "Open-Redis", 64496);
    let mut missing = directive("abuse@as64497.example.net", "Open-Redis", 64497);
    missing["template_name"] = json!("no_such_template");
    let mut unknown = directive("abuse@as64498.example.net", "Open-Redis", 64498);
    unknown["template_name"] = json!("unknown_placeholder");
    let mut traversal = directive("abuse@as64499.example.net", "Open-Redis", 64499);
    traversal["template_name"] = json!("../../../../etc/passwd");
    for (ip, d) in [
        ("192.0.2.1", good),
        ("192.0.2.2", missing),
        ("192.0.2.3", unknown),
        ("192.0.2.4", traversal),
    ] {
        env.insert_event(event_fields(ip, 64496), json!([d])).await;
    }
    let s = env.run().await;
    assert_eq!(s.to_string(), "1 mails sent, 0 postponed, 3 errors.");
    assert_eq!(env.pending_count().await, 3, "failed groups stay pending");
    // Exactly one ticket number was drawn: for the mail that went out.
    let (last, called) = env.ticket_seq_last_value().await;
    assert_eq!((last, called), (10000001, true));
    assert_eq!(env.sent_tickets().await.len(), 1);
}

#[tokio::test]
async fn hostile_values_cannot_add_headers() {
    let env = TestEnv::new().await;
    // A recipient that tries to smuggle a header: refused, group pending.
    let evil_rcpt = directive(
        "abuse@example.net\r\nBcc: evil@example.com",
        "Open-Redis",
        1,
    );
    // A list of recipients: refused as well (the old tool mailed both).
    let list_rcpt = directive("a@example.net, b@example.net", "Open-Redis", 2);
    // Aggregate data (used in the subject) with line breaks and an
    // encoded-word: sent, but without new headers.
    let mut evil_agg = directive("abuse@as64496.example.net", "Open-Redis", 3);
    evil_agg["aggregate_identifier"]["source.asn"] =
        json!("3\r\nBcc: evil@example.com\u{2028}X: =?utf-8?q?=41?=");
    for (ip, d) in [
        ("192.0.2.1", evil_rcpt),
        ("192.0.2.2", list_rcpt),
        ("192.0.2.3", evil_agg),
    ] {
        env.insert_event(event_fields(ip, 64496), json!([d])).await;
    }
    let s = env.run().await;
    assert_eq!((s.sent, s.errors), (1, 2), "{s:?}");
    let mails = env.sink.messages();
    assert_eq!(mails.len(), 1);
    let m = &mails[0];
    assert_eq!(m.rcpt_to, ["abuse@as64496.example.net"]);
    let head = headers_block(&m.data);
    for line in head.split("\r\n") {
        assert!(
            line.starts_with([' ', '\t'])
                || [
                    "MIME-Version:",
                    "Content-Type:",
                    "Content-Transfer-Encoding:",
                    "From:",
                    "To:",
                    "Subject:",
                    "Date:",
                    "Message-Id:"
                ]
                .iter()
                .any(|h| line.starts_with(h)),
            "unexpected header line {line:?}"
        );
        assert!(line.len() <= 998);
    }
    assert!(!head.split("\r\n").any(|l| l.starts_with("Bcc")));
    let subject = header(&m.data, "Subject").unwrap();
    assert!(
        !subject.contains("=?utf-8?q?=41?="),
        "data encoded-word must be neutralised: {subject}"
    );
}

#[tokio::test]
async fn constituency_copies_share_the_ticket_and_are_not_marked() {
    let env = TestEnv::new().await;
    let mut d = directive("abuse@as64496.example.net", "Open-Redis", 64496);
    d["aggregate_identifier"]["recipient_group"] = json!("Energy");
    env.insert_event(event_fields("192.0.2.10", 64496), json!([d]))
        .await;
    let s = env.run().await;
    assert_eq!(s.to_string(), "2 mails sent, 0 postponed, 0 errors.");
    let mails = env.sink.messages();
    let main = mails
        .iter()
        .find(|m| m.rcpt_to == ["abuse@as64496.example.net"])
        .unwrap();
    let copy = mails
        .iter()
        .find(|m| m.rcpt_to == ["energy-copies@cert.example"])
        .unwrap();
    // Header To unchanged on the copy; same ticket in both subjects.
    assert_eq!(
        header(&copy.data, "To").unwrap(),
        "abuse@as64496.example.net"
    );
    let tickets = env.sent_tickets().await;
    assert_eq!(tickets.len(), 1, "copies are not recorded in sent");
    for m in [main, copy] {
        assert!(header(&m.data, "Subject").unwrap().contains(&tickets[0]));
    }
    // The main mail has the data inline; the Energy copy as events.csv,
    // and its text says so.
    assert!(!main.text().contains("events.csv\""));
    assert!(copy
        .text()
        .contains("Content-Disposition: attachment; filename=\"events.csv\""));
    assert!(body_text(&copy.data).contains("attached"));
    assert!(body_text(&main.data).contains("\"192.0.2.10\""));
}

#[tokio::test]
async fn xarf_sends_one_mail_and_ticket_per_event() {
    let env = TestEnv::new().await;
    let d = json!({
        "medium": "email", "recipient_address": "abuse@as64496.example.net",
        // As the IntelMQ rules bot writes X-ARF directives (intelmq-mailgen
        // example_scripts/20xarf.py:7-10).
        "template_name": "xarf-description-template", "notification_format": "xarf",
        "event_data_format": "bot-infection_0.2.0_unstable", "notification_interval": 0,
        "aggregate_identifier": {"source.asn": 64496}
    });
    let mut ids = Vec::new();
    for ip in ["192.0.2.1", "192.0.2.2", "192.0.2.3"] {
        let mut f = event_fields(ip, 64496);
        f["malware.name"] = json!("mirai");
        ids.push(env.insert_event(f, json!([d.clone()])).await);
    }
    let s = env.run().await;
    assert_eq!(s.to_string(), "3 mails sent, 0 postponed, 0 errors.");
    let mails = env.sink.messages();
    assert_eq!(mails.len(), 3);
    let tickets = env.sent_tickets().await;
    assert_eq!(tickets.len(), 3);
    for m in &mails {
        assert_eq!(header(&m.data, "X-ARF").as_deref(), Some("PLAIN"));
        assert_eq!(
            header(&m.data, "Auto-Submitted").as_deref(),
            Some("auto-generated")
        );
        let text = m.text();
        assert!(text.contains("name=\"report.txt\""), "{text}");
        let report = qp_decode(&text);
        assert!(report.contains("Report-ID:"), "{report}");
        assert!(report.contains("@example.org"));
    }
    // Each event's directive records the ticket of its own mail.
    let per_event: Vec<String> = env
        .client()
        .await
        .query(
            "SELECT s.intelmq_ticket FROM directives d JOIN sent s ON s.id = d.sent_id \
             WHERE d.events_id = ANY($1) ORDER BY d.events_id",
            &[&ids],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut distinct = per_event.clone();
    distinct.dedup();
    assert_eq!(distinct.len(), 3, "{per_event:?}");
}

#[tokio::test]
async fn dry_run_sends_nothing_writes_nothing_and_draws_no_ticket() {
    let env = TestEnv::new().await;
    env.insert_event(
        event_fields("192.0.2.10", 64496),
        json!([directive("abuse@as64496.example.net", "Open-Redis", 64496)]),
    )
    .await;
    let before = env.ticket_seq_last_value().await;
    let s = env.dry_run().await;
    assert_eq!(s.sent, 1, "one mail rendered");
    assert!(env.sink.messages().is_empty());
    assert_eq!(env.pending_count().await, 1);
    assert_eq!(env.ticket_seq_last_value().await, before);
    let day: chrono::NaiveDate = env
        .client()
        .await
        .query_one("SELECT initialized_for_day FROM ticket_day", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(day.to_string(), "2016-01-01", "no day rollover written");
}

/// Splits a multipart/signed message into (signed bytes, signature).
fn split_signed(raw: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let text = String::from_utf8_lossy(raw).to_string();
    let ct = header(raw, "Content-Type").unwrap();
    assert!(ct.starts_with("multipart/signed;"), "{ct}");
    assert!(ct.contains("protocol=\"application/pgp-signature\""));
    // RSA test key, no gpg.conf: SHA-512, as gpg 2.2 chooses.
    assert!(ct.contains("micalg=\"pgp-sha512\""));
    let boundary = ct
        .split("boundary=\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap();
    let delim = format!("\r\n--{boundary}\r\n");
    let first = text.find(&format!("--{boundary}\r\n")).unwrap() + boundary.len() + 4;
    let second = text[first..].find(&delim).unwrap() + first;
    let signed = text.as_bytes()[first..second].to_vec();
    let sig_part = &text[second + delim.len()..];
    let sig_body = sig_part.split_once("\r\n\r\n").unwrap().1;
    let sig_end = sig_body.find(&format!("\r\n--{boundary}--")).unwrap();
    (signed, sig_body.as_bytes()[..sig_end].to_vec())
}

fn gpg_verify(signed: &[u8], sig: &[u8]) -> String {
    let home = tempfile::tempdir().unwrap();
    let import = Command::new("gpg")
        .arg("--homedir")
        .arg(home.path())
        .args(["--batch", "--quiet", "--import"])
        .arg(common::repo_path(
            "tests/fixtures/keys/test-signing.pub.asc",
        ))
        .output()
        .unwrap();
    assert!(import.status.success(), "{import:?}");
    std::fs::write(home.path().join("data"), signed).unwrap();
    std::fs::write(home.path().join("sig.asc"), sig).unwrap();
    let out = Command::new("gpg")
        .arg("--homedir")
        .arg(home.path())
        .args(["--batch", "--status-fd", "1", "--verify"])
        .arg(home.path().join("sig.asc"))
        .arg(home.path().join("data"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[tokio::test]
async fn signed_mails_pass_gpg_verify() {
    let mut env = TestEnv::new().await;
    env.enable_signing();
    let plain = directive("abuse@as64496.example.net", "Open-Redis", 64496);
    let mut attached = directive("abuse@as64497.example.net", "Open-Redis", 64497);
    attached["aggregate_identifier"]["recipient_group"] = json!("Energy");
    env.insert_event(event_fields("192.0.2.1", 64496), json!([plain]))
        .await;
    env.insert_event(event_fields("192.0.2.2", 64497), json!([attached]))
        .await;
    let s = env.run().await;
    assert_eq!(s.to_string(), "3 mails sent, 0 postponed, 0 errors.");
    let mails = env.sink.messages();
    assert_eq!(mails.len(), 3);
    for m in &mails {
        let (signed, sig) = split_signed(&m.data);
        let status = gpg_verify(&signed, &sig);
        assert!(status.contains("[GNUPG:] GOODSIG"), "{status}");
        // VALIDSIG … <pubkey algo> <hash algo 10 = SHA512> …
        let validsig = status.lines().find(|l| l.contains("VALIDSIG")).unwrap();
        assert_eq!(validsig.split(' ').nth(9), Some("10"), "{validsig}");
        // A changed byte must fail (the check can fail).
        let mut tampered = signed.clone();
        let i = tampered.len() / 2;
        tampered[i] ^= 1;
        assert!(!gpg_verify(&tampered, &sig).contains("GOODSIG"));
    }
    let copy = mails
        .iter()
        .find(|m| m.rcpt_to == ["energy-copies@cert.example"])
        .unwrap();
    let (signed, _) = split_signed(&copy.data);
    let signed = String::from_utf8(signed).unwrap();
    assert!(
        signed.starts_with("Content-Type: multipart/mixed;"),
        "{signed}"
    );
    assert!(signed.contains("filename=\"events.csv\""));
}

#[tokio::test]
async fn an_smtp_refusal_fails_that_group_only_over_one_connection() {
    let mut env = TestEnv::new().await;
    env.config_json["mailgend"]["workers"] = json!(1);
    for asn in 64496..64501 {
        env.insert_event(
            event_fields("192.0.2.1", asn),
            json!([directive(
                &format!("abuse@as{asn}.example.net"),
                "Open-Redis",
                asn
            )]),
        )
        .await;
    }
    env.sink.set_fault(Fault::Fail {
        stage: Stage::Rcpt,
        failure: Failure::Permanent,
        scope: Scope::Recipient("abuse@as64498.example.net".into()),
    });
    let s = env.run().await;
    assert_eq!(s.to_string(), "4 mails sent, 0 postponed, 1 errors.");
    // The four good groups before and after the refusal were accepted over
    // at most two connections (a refused transaction may retire one).
    assert!(env.sink.connections() <= 2, "{}", env.sink.connections());
    assert_eq!(env.pending_count().await, 1);
    let pending_rcpt: String = env
        .client()
        .await
        .query_one(
            "SELECT recipient_address FROM directives WHERE sent_id IS NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(pending_rcpt, "abuse@as64498.example.net");
    // A temporary failure: also an error, also pending, then sent.
    env.sink.set_fault(Fault::Fail {
        stage: Stage::DataEnd,
        failure: Failure::Temporary,
        scope: Scope::Next(1),
    });
    assert_eq!(env.run().await.errors, 1);
    assert_eq!(env.pending_count().await, 1);
    assert_eq!(env.run().await.sent, 1);
    assert_eq!(env.pending_count().await, 0);
}

#[tokio::test]
async fn one_connection_carries_a_whole_run() {
    let mut env = TestEnv::new().await;
    env.config_json["mailgend"]["workers"] = json!(1);
    for asn in 64496..64506 {
        env.insert_event(
            event_fields("192.0.2.1", asn),
            json!([directive(
                &format!("abuse@as{asn}.example.net"),
                "Open-Redis",
                asn
            )]),
        )
        .await;
    }
    assert_eq!(env.run().await.sent, 10);
    assert_eq!(
        env.sink.connections(),
        1,
        "the old tool opened one per group"
    );
}

#[tokio::test]
async fn the_binary_prints_the_summary_and_exits_non_zero_on_errors() {
    let env = TestEnv::new().await;
    env.insert_event(
        event_fields("192.0.2.1", 64496),
        json!([directive("abuse@as64496.example.net", "Open-Redis", 64496)]),
    )
    .await;
    env.insert_event(
        event_fields("192.0.2.2", 64497),
        json!([directive("not an address", "Open-Redis", 64497)]),
    )
    .await;
    let conf = env.config_file();
    let out = Command::new(env!("CARGO_BIN_EXE_mailgend"))
        .arg("-c")
        .arg(&conf)
        .args(["send", "--all"])
        .env("HOME", env.dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stdout.trim(),
        "1 mails sent, 0 postponed, 1 errors.",
        "{stderr}"
    );
    assert_eq!(out.status.code(), Some(1));
    // The ERROR line names the group's directive and event ids.
    let error_line = stderr.lines().find(|l| l.contains("ERROR")).expect(&stderr);
    assert!(error_line.contains("directive_ids=[2]"), "{error_line}");
    assert!(error_line.contains("event_ids=[2]"), "{error_line}");

    // check-config reports every problem with file and key.
    let bad = env.dir.path().join("bad.conf");
    std::fs::write(&bad, r#"{"smtp": {"port": "x"}, "sender": "nobody"}"#).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mailgend"))
        .arg("-c")
        .arg(&bad)
        .arg("check-config")
        .env("HOME", env.dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1));
    for key in ["smtp.port", "sender", "database", "template_dir"] {
        assert!(stdout.contains(&format!("key `{key}`")), "{key}: {stdout}");
    }
    assert!(stdout.contains(bad.to_str().unwrap()));
}

#[tokio::test]
async fn the_log_names_the_signing_key_its_digest_and_library() {
    // Operators tell from this line which library signs (the RSA cost
    // differs 2.5-fold, docs/install.md).
    let mut env = TestEnv::new().await;
    env.enable_signing();
    let out = Command::new(env!("CARGO_BIN_EXE_mailgend"))
        .arg("-c")
        .arg(env.config_file())
        .args(["send", "--all"])
        .env("HOME", env.dir.path())
        .env_remove("MAILGEND_LOG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.contains("signing key loaded"))
        .expect(&stderr);
    assert!(line.contains(" INFO "), "{line}");
    assert!(line.contains("backend=aws-lc-rsa-crt"), "{line}");
    assert!(
        line.contains("digest=\"pgp-sha") || line.contains("digest=pgp-sha"),
        "{line}"
    );
    let fpr = Signer::from_key_file(&repo_path("tests/fixtures/keys/test-signing.sec.asc"), None)
        .unwrap()
        .fingerprint();
    assert!(line.contains(&format!("key={fpr}")), "{line}");
}

#[tokio::test]
async fn a_retry_after_a_temporary_refusal_reuses_ticket_and_message_id() {
    let env = TestEnv::new().await;
    env.insert_event(
        event_fields("192.0.2.1", 64496),
        json!([directive("abuse@as64496.example.net", "Open-Redis", 64496)]),
    )
    .await;
    env.sink.set_fault(Fault::Fail {
        stage: Stage::DataEnd,
        failure: Failure::Temporary,
        scope: Scope::Next(1),
    });
    assert_eq!(env.run().await.errors, 1);
    assert!(
        env.sink.messages().is_empty(),
        "451 after DATA: not delivered"
    );
    let (seq_after_first, _) = env.ticket_seq_last_value().await;
    assert_eq!(env.run().await.sent, 1);
    let mails = env.sink.messages();
    assert_eq!(mails.len(), 1);
    // No second ticket was drawn; the mail kept its Message-Id.
    assert_eq!(env.ticket_seq_last_value().await.0, seq_after_first);
    let row = env
        .client()
        .await
        .query_one(
            "SELECT ticket, message_id, (SELECT count(*) FROM mailgend.outbox), attempts \
             FROM mailgend.sent_mail",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(2), 0, "the outbox holds only open mails");
    assert_eq!(row.get::<_, i32>(3), 2);
    assert_eq!(
        header(&mails[0].data, "Message-Id").unwrap(),
        row.get::<_, String>(1)
    );
    assert_eq!(env.sent_tickets().await, vec![row.get::<_, String>(0)]);
}

/// The SMTP server takes the mail but the connection breaks before its
/// answer arrives: delivery is in doubt.
async fn in_doubt_env() -> TestEnv {
    let env = TestEnv::new().await;
    env.insert_event(
        event_fields("192.0.2.1", 64496),
        json!([directive("abuse@as64496.example.net", "Open-Redis", 64496)]),
    )
    .await;
    env.sink.set_fault(Fault::DropAfterData {
        scope: Scope::Next(1),
        deliver: true,
    });
    let s = env.run().await;
    assert_eq!(s.errors, 1);
    assert_eq!(env.sink.messages().len(), 1, "the server did deliver it");
    assert_eq!(env.pending_count().await, 1, "but nothing was marked sent");
    env
}

#[tokio::test]
async fn an_in_doubt_mail_is_resent_with_the_same_message_id_by_default() {
    let env = in_doubt_env().await;
    let s = env.run().await;
    assert_eq!((s.sent, s.errors), (1, 0));
    let mails = env.sink.messages();
    assert_eq!(mails.len(), 2, "resent: the recipient may see it twice");
    assert_eq!(
        mails[0].data, mails[1].data,
        "byte-identical, same Message-Id and ticket"
    );
    assert_eq!(env.pending_count().await, 0);
    assert_eq!(env.sent_tickets().await.len(), 1);
}

#[tokio::test]
async fn an_in_doubt_mail_can_be_held_for_the_operator() {
    let mut env = in_doubt_env().await;
    env.config_json["mailgend"]["in_doubt"] = json!("hold");
    let s = env.run().await;
    assert_eq!((s.sent, s.errors, s.busy), (0, 0, 1));
    assert_eq!(env.sink.messages().len(), 1, "not resent");
    let state: String = env
        .client()
        .await
        .query_one("SELECT state FROM mailgend.outbox", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(state, "held");
    // Held groups stay untouched on later runs.
    assert_eq!(env.run().await.busy, 1);
    assert_eq!(env.pending_count().await, 1);
}

fn mailgend(env: &TestEnv, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mailgend"))
        .arg("-c")
        .arg(env.config_file())
        .args(args)
        .env("HOME", env.dir.path())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[tokio::test]
async fn the_operator_lists_releases_and_marks_in_doubt_mails() {
    let mut env = in_doubt_env().await;
    env.config_json["mailgend"]["in_doubt"] = json!("hold");
    assert_eq!(env.run().await.busy, 1);
    let (ok, list) = mailgend(&env, &["in-doubt", "list"]);
    assert!(ok, "{list}");
    assert!(list.contains("held"), "{list}");
    let id: i64 = env
        .client()
        .await
        .query_one("SELECT id FROM mailgend.outbox", &[])
        .await
        .unwrap()
        .get(0);
    // Release: sent again with the same bytes.
    let (ok, out) = mailgend(&env, &["in-doubt", "release", &id.to_string()]);
    assert!(ok, "{out}");
    let s = env.run().await;
    assert_eq!((s.sent, s.errors), (1, 0));
    let mails = env.sink.messages();
    assert_eq!(mails.len(), 2);
    assert_eq!(mails[0].data, mails[1].data);
    assert_eq!(env.pending_count().await, 0);
    let (_, list) = mailgend(&env, &["in-doubt", "list"]);
    assert!(list.contains("nothing is in doubt"), "{list}");
}

#[tokio::test]
async fn mark_sent_records_an_in_doubt_mail_without_sending_it() {
    let mut env = in_doubt_env().await;
    env.config_json["mailgend"]["in_doubt"] = json!("hold");
    assert_eq!(env.run().await.busy, 1);
    let id: i64 = env
        .client()
        .await
        .query_one("SELECT id FROM mailgend.outbox", &[])
        .await
        .unwrap()
        .get(0);
    let (ok, out) = mailgend(&env, &["in-doubt", "mark-sent", &id.to_string()]);
    assert!(ok, "{out}");
    assert_eq!(env.pending_count().await, 0);
    assert_eq!(env.sent_tickets().await.len(), 1);
    assert_eq!(env.run().await.sent, 0);
    assert_eq!(env.sink.messages().len(), 1, "not sent again");
    // Unknown ids are an error, not silence.
    let (ok, out) = mailgend(&env, &["in-doubt", "discard", "999999"]);
    assert!(!ok, "{out}");
}

#[tokio::test]
async fn dash_vv_lists_event_ids_of_sent_mails() {
    let env = TestEnv::new().await;
    for (ip, asn) in [("192.0.2.1", 64496), ("192.0.2.2", 64497)] {
        env.insert_event(
            event_fields(ip, asn),
            json!([directive(
                &format!("abuse@as{asn}.example.net"),
                "Open-Redis",
                asn
            )]),
        )
        .await;
    }
    env.client()
        .await
        .batch_execute("UPDATE directives SET medium = 'later' WHERE events_id = 2")
        .await
        .unwrap();
    let (ok, out) = mailgend(&env, &["send", "--all"]);
    assert!(ok, "{out}");
    let line = out.lines().find(|l| l.contains("mail sent")).expect(&out);
    assert!(line.contains("event_ids=-"), "{line}");
    env.client()
        .await
        .batch_execute("UPDATE directives SET medium = 'email' WHERE events_id = 2")
        .await
        .unwrap();
    let (ok, out) = mailgend(&env, &["-vv", "send", "--all"]);
    assert!(ok, "{out}");
    let line = out.lines().find(|l| l.contains("mail sent")).expect(&out);
    assert!(line.contains("event_ids=[2]"), "{line}");
}
