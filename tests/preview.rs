//! `mailgend preview` and `preview::preview`: real PostgreSQL, the shipped
//! formats and templates, a real SMTP receiver. What preview predicts is
//! compared with what `send --all` then really sends; that preview draws no
//! ticket and writes nothing is checked on the database.

mod common;

use std::process::Command;

use common::{directive, event_fields, qp_decode, TestEnv};
use mailgend::cli::preview::{self, Outcome, PreviewFilter};
use mailgend::notify::directive::{DirectiveId, EventId};
use serde_json::{json, Value};

/// Everything preview must leave alone.
async fn db_state(env: &TestEnv) -> (i64, bool, i64, i64, String) {
    let c = env.client().await;
    let (last, called) = env.ticket_seq_last_value().await;
    let pending = env.pending_count().await;
    let sent: i64 = c
        .query_one("SELECT count(*) FROM sent", &[])
        .await
        .unwrap()
        .get(0);
    let day: String = c
        .query_one("SELECT initialized_for_day::text FROM ticket_day", &[])
        .await
        .unwrap()
        .get(0);
    (last, called, pending, sent, day)
}

fn mailgend(env: &TestEnv, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mailgend"))
        .arg("-c")
        .arg(env.config_file())
        .args(args)
        .env("HOME", env.dir.path())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Header lines of a raw message, unfolded, without those that are made
/// anew for every mail.
fn stable_headers(raw: &str) -> Vec<String> {
    preview::top_headers(raw)
        .into_iter()
        .filter(|h| !matches!(h.name.to_ascii_lowercase().as_str(), "date" | "message-id"))
        .map(|h| format!("{}: {}", h.name, h.value))
        .collect()
}

/// The part whose headers contain `marker`, decoded, with `\n` line ends
/// (a single-part message: the whole body).
fn decoded_part(raw: &str, marker: &str) -> String {
    let start = raw.find(marker).expect(marker);
    let body = raw[start..].split_once("\r\n\r\n").unwrap().1;
    // Python-style boundaries start with 15 '='; a line of dashes in the
    // text is not one.
    let end = body.find("\r\n--===============").unwrap_or(body.len());
    qp_decode(&body[..end])
}

fn lf(s: &str) -> String {
    s.replace("\r\n", "\n")
}

#[tokio::test]
async fn preview_predicts_exactly_what_send_then_sends() {
    let env = TestEnv::new().await;
    // A group with a constituency copy: the main mail (CSV inline, marks
    // the group sent) and a copy with events.csv attached (marks nothing).
    let mut d = directive("abuse@as64496.example.net", "Open-Redis", 64496);
    d["aggregate_identifier"]["recipient_group"] = json!("Energy");
    let mut f1 = event_fields("192.0.2.10", 64496);
    f1["extra"] = json!({"redis_version": "6.2.1"});
    let e1 = env.insert_event(f1, json!([d.clone()])).await;
    let e2 = env
        .insert_event(event_fields("192.0.2.11", 64496), json!([d]))
        .await;
    let before = db_state(&env).await;

    let pipeline = env.pipeline().await;
    let groups = preview::preview(&pipeline, &PreviewFilter::default())
        .await
        .unwrap();
    assert_eq!(groups.len(), 1);
    let g = &groups[0];
    assert_eq!(g.recipient, "abuse@as64496.example.net");
    assert_eq!(g.template, "shadowserver_csv_Open-Redis");
    assert_eq!(g.event_ids, vec![e1, e2]);
    assert_eq!(g.directive_ids.len(), 2);
    assert_eq!(g.aggregate_identifier["recipient_group"], "Energy");
    let Outcome::Due { format, why, mails } = &g.outcome else {
        panic!("{g:?}")
    };
    assert!(format.starts_with("10shadowserver.toml#"), "{format}");
    assert!(why.contains("\"shadowserver\""), "{why}");
    assert!(why.contains("inline"), "{why}");
    assert_eq!(mails.len(), 2);
    let (main, copy) = (&mails[0], &mails[1]);
    assert!(main.marks_sent && !copy.marks_sent);
    assert_eq!(main.envelope_to, ["abuse@as64496.example.net"]);
    assert_eq!(copy.envelope_to, ["energy-copies@cert.example"]);
    assert_eq!(main.ticket, copy.ticket, "a copy keeps the ticket");
    assert!(main.subject.contains(&main.ticket), "{}", main.subject);
    assert!(main.text.contains("\"192.0.2.10\""), "{}", main.text);
    assert!(main.attachments.is_empty());
    assert_eq!(copy.attachments.len(), 1);
    let att = &copy.attachments[0];
    assert_eq!(att.name, "events.csv");
    assert_eq!(att.content_type, "text/csv; charset=utf-8");
    let csv = att.content.as_deref().unwrap();
    assert!(csv.contains("\"192.0.2.11\""), "{csv}");
    assert_eq!(att.size, csv.len());

    // The binary says the same, as text and as JSON.
    let (code, text, err) = mailgend(&env, &["preview", "--attachments"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(text.contains("no ticket number was drawn"), "{text}");
    assert!(
        text.contains(&format!("ticket {} (would be drawn next)", main.ticket)),
        "{text}"
    );
    assert!(text.contains("[attachment events.csv (text/csv; charset=utf-8"));
    assert!(
        text.contains("\"192.0.2.11\""),
        "attachment content: {text}"
    );
    let (code, out, err) = mailgend(&env, &["preview", "--json"]);
    assert_eq!(code, Some(0), "{err}");
    let doc: Value = serde_json::from_str(&out).unwrap();
    let jg = &doc["groups"][0];
    assert_eq!(jg["status"], "due");
    assert_eq!(jg["directive_ids"], json!(g.directive_ids));
    assert_eq!(jg["mails"][0]["ticket"], json!(main.ticket));
    assert_eq!(jg["mails"][0]["text"], json!(main.text));
    assert_eq!(jg["mails"][1]["attachments"][0]["name"], "events.csv");
    assert_eq!(jg["mails"][1]["attachments"][0]["content"], json!(csv));
    assert!(jg["mails"][0]["headers"]
        .as_array()
        .unwrap()
        .iter()
        .any(|h| h["name"] == "Subject"));

    // Nothing was drawn, written or sent by any of that.
    assert_eq!(db_state(&env).await, before);
    assert!(env.sink.messages().is_empty());

    // Now really send: the same mails, the predicted ticket.
    let s = env.run().await;
    assert_eq!((s.sent, s.errors), (2, 0));
    let received = env.sink.wait_for(2, std::time::Duration::from_secs(30));
    let real_main = received
        .iter()
        .find(|m| m.rcpt_to == ["abuse@as64496.example.net"])
        .unwrap();
    let real_copy = received
        .iter()
        .find(|m| m.rcpt_to == ["energy-copies@cert.example"])
        .unwrap();
    assert_eq!(env.sent_tickets().await, vec![main.ticket.clone()]);
    // Single part: byte for byte the same but for Date and Message-Id.
    let real_main_text = real_main.text().into_owned();
    assert_eq!(stable_headers(&real_main_text), stable_headers(&main.raw));
    assert_eq!(
        real_main_text.split_once("\r\n\r\n").unwrap().1,
        main.raw.split_once("\r\n\r\n").unwrap().1
    );
    assert_eq!(
        decoded_part(&real_main_text, "Content-Transfer-Encoding"),
        lf(&main.text)
    );
    // Multipart: boundaries are random, so compare headers but for the
    // boundary, and the decoded parts.
    let real_copy_text = real_copy.text().into_owned();
    let no_boundary = |v: Vec<String>| -> Vec<String> {
        v.into_iter()
            .map(|h| h.split("boundary=").next().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        no_boundary(stable_headers(&real_copy_text)),
        no_boundary(stable_headers(&copy.raw))
    );
    assert_eq!(
        decoded_part(&real_copy_text, "Content-Type: text/plain"),
        lf(&copy.text)
    );
    assert_eq!(
        decoded_part(&real_copy_text, "Content-Disposition: attachment"),
        lf(csv)
    );
}

#[tokio::test]
async fn filters_select_groups() {
    let env = TestEnv::new().await;
    let mut ids = Vec::new();
    for (n, template) in [(1, "Open-Redis"), (2, "Open-Redis"), (3, "Open-SNMP")] {
        let mut f = event_fields(&format!("192.0.2.{n}"), 64500 + n);
        f["feed.name"] = json!(template);
        ids.push(
            env.insert_event(
                f,
                json!([directive(
                    &format!("abuse@as{n}.example.net"),
                    template,
                    64500 + n
                )]),
            )
            .await,
        );
    }
    let d3: i64 = env
        .client()
        .await
        .query_one("SELECT id FROM directives WHERE events_id = $1", &[&ids[2]])
        .await
        .unwrap()
        .get(0);
    let d3 = DirectiveId(d3);
    let pipeline = env.pipeline().await;
    let recipients = |f: PreviewFilter| {
        let pipeline = pipeline.clone();
        async move {
            preview::preview(&pipeline, &f)
                .await
                .unwrap()
                .into_iter()
                .map(|g| g.recipient)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(recipients(PreviewFilter::default()).await.len(), 3);
    assert_eq!(
        recipients(PreviewFilter {
            recipient: Some("ABUSE@as2.example.net".into()),
            ..Default::default()
        })
        .await,
        ["abuse@as2.example.net"]
    );
    assert_eq!(
        recipients(PreviewFilter {
            template: Some("shadowserver_csv_Open-SNMP".into()),
            ..Default::default()
        })
        .await,
        ["abuse@as3.example.net"]
    );
    assert_eq!(
        recipients(PreviewFilter {
            directive_ids: vec![d3],
            ..Default::default()
        })
        .await,
        ["abuse@as3.example.net"]
    );
    assert_eq!(
        recipients(PreviewFilter {
            event_ids: vec![EventId(ids[0]), EventId(ids[2])],
            ..Default::default()
        })
        .await,
        ["abuse@as1.example.net", "abuse@as3.example.net"]
    );
    assert_eq!(
        recipients(PreviewFilter {
            limit: Some(2),
            ..Default::default()
        })
        .await,
        ["abuse@as1.example.net", "abuse@as2.example.net"]
    );
    assert!(recipients(PreviewFilter {
        recipient: Some("abuse@as1.example.net".into()),
        template: Some("shadowserver_csv_Open-SNMP".into()),
        ..Default::default()
    })
    .await
    .is_empty());
    // The same through the command line, as docs/review.md shows it.
    let d1: i64 = env
        .client()
        .await
        .query_one("SELECT id FROM directives WHERE events_id = $1", &[&ids[0]])
        .await
        .unwrap()
        .get(0);
    let shown = |args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, text, err) = mailgend(&env, &args);
        assert_eq!(code, Some(0), "{args:?}: {err}");
        text.lines()
            .filter_map(|l| l.strip_prefix("recipient      "))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let s = |v: &[&str]| v.iter().map(|a| a.to_string()).collect::<Vec<_>>();
    assert_eq!(
        shown(s(&["preview", "--recipient", "abuse@as2.example.net"])),
        ["abuse@as2.example.net"]
    );
    assert_eq!(
        shown(s(&[
            "preview",
            "--template",
            "shadowserver_csv_Open-Redis",
            "--limit",
            "1"
        ])),
        ["abuse@as1.example.net"]
    );
    assert_eq!(
        shown(s(&[
            "preview",
            "--directive",
            &d1.to_string(),
            "--directive",
            &d3.0.to_string()
        ])),
        ["abuse@as1.example.net", "abuse@as3.example.net"]
    );
    assert_eq!(
        shown(s(&["preview", "--event", &ids[1].to_string()])),
        ["abuse@as2.example.net"]
    );
    // JSON, with a repeated --event and a limit.
    let (code, out, err) = mailgend(
        &env,
        &[
            "preview",
            "--json",
            "--event",
            &ids[0].to_string(),
            "--event",
            &ids[1].to_string(),
            "--limit",
            "1",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    let doc: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["groups"].as_array().unwrap().len(), 1);
    assert_eq!(doc["groups"][0]["recipient"], "abuse@as1.example.net");
}

#[tokio::test]
async fn a_postponed_group_shows_why_and_until_when() {
    let env = TestEnv::new().await;
    let d = json!({
        "medium": "email", "recipient_address": "abuse@as64496.example.net",
        "template_name": "openredis_provider", "notification_format": "vulnerable-service",
        "event_data_format": "openredis_csv_inline", "notification_interval": 0,
        "aggregate_identifier": {"source.asn": 64496}
    });
    env.insert_event(event_fields("192.0.2.10", 64496), json!([d]))
        .await;
    let before = db_state(&env).await;
    let groups = preview::preview(&*env.pipeline().await, &PreviewFilter::default())
        .await
        .unwrap();
    let Outcome::Postponed {
        format,
        reason,
        until,
    } = &groups[0].outcome
    else {
        panic!("{:?}", groups[0])
    };
    assert!(format.starts_with("13vulnerable-service.toml#"), "{format}");
    assert!(reason.contains("younger than 15m"), "{reason}");
    assert_eq!(
        until.unwrap(),
        groups[0].inserted_at + chrono::Duration::minutes(15)
    );
    let (code, text, _) = mailgend(&env, &["preview"]);
    assert_eq!(code, Some(0));
    assert!(
        text.contains("POSTPONED by 13vulnerable-service.toml#"),
        "{text}"
    );
    assert!(text.contains("younger than 15m"), "{text}");
    assert!(
        text.contains("1 groups: 0 due, 1 postponed, 0 errors."),
        "{text}"
    );
    assert_eq!(db_state(&env).await, before);
}

#[tokio::test]
async fn a_broken_template_shows_the_error_and_fails_only_when_asked() {
    let env = TestEnv::new().await;
    env.write_template(
        "unknown_placeholder",
        "Subject $ticket_number\n\nHello ${no_such_thing}\n",
    );
    let mut d = directive("abuse@as64498.example.net", "Open-Redis", 64498);
    d["template_name"] = json!("unknown_placeholder");
    let e = env
        .insert_event(event_fields("192.0.2.3", 64498), json!([d]))
        .await;
    env.insert_event(
        event_fields("192.0.2.4", 64499),
        json!([directive("abuse@as64499.example.net", "Open-Redis", 64499)]),
    )
    .await;
    let before = db_state(&env).await;

    let (code, text, err) = mailgend(&env, &["preview"]);
    assert_eq!(code, Some(0), "errors shown, exit 0 by default: {err}");
    assert!(
        text.contains("ERROR: format 10shadowserver.toml#"),
        "{text}"
    );
    assert!(text.contains("no_such_thing"), "{text}");
    assert!(text.contains(&format!("event ids      [{e}]")), "{text}");
    assert!(
        text.contains("2 groups: 1 due, 0 postponed, 1 errors."),
        "{text}"
    );

    let (code, out, _) = mailgend(&env, &["preview", "--json", "--fail-on-error"]);
    assert_eq!(code, Some(1));
    let doc: Value = serde_json::from_str(&out).unwrap();
    let bad = &doc["groups"][0];
    assert_eq!(bad["status"], "error");
    assert_eq!(bad["event_ids"], json!([e]));
    assert_eq!(bad["directive_ids"].as_array().unwrap().len(), 1);
    assert!(bad["error"].as_str().unwrap().contains("no_such_thing"));
    // The good group after it gets the first ticket: the failed one would
    // draw none.
    assert_eq!(doc["groups"][1]["status"], "due");
    let ticket = doc["groups"][1]["mails"][0]["ticket"].as_str().unwrap();
    assert!(ticket.ends_with("-10000001"), "{ticket}");

    // Only the good group selected: --fail-on-error has nothing to fail on.
    let (code, _, _) = mailgend(
        &env,
        &[
            "preview",
            "--fail-on-error",
            "--recipient",
            "abuse@as64499.example.net",
        ],
    );
    assert_eq!(code, Some(0));
    assert_eq!(db_state(&env).await, before);
    assert!(env.sink.messages().is_empty());
}

#[tokio::test]
async fn preview_runs_read_only_and_takes_no_locks() {
    let env = TestEnv::new().await;
    env.insert_event(
        event_fields("192.0.2.4", 64499),
        json!([directive("abuse@as64499.example.net", "Open-Redis", 64499)]),
    )
    .await;
    // The database refuses writes in preview's transaction.
    let mut client = env.client().await;
    let tx = preview::read_only(&mut client).await.unwrap();
    let err = tx
        .execute("UPDATE directives SET sent_id = NULL", &[])
        .await
        .unwrap_err();
    assert!(
        format!("{err:?}").contains("read-only transaction"),
        "{err:?}"
    );
    drop(tx);
    // A send holding the group's rows does not block a preview.
    let mut other = env.client().await;
    let tx = other.transaction().await.unwrap();
    tx.execute("SELECT id FROM directives FOR UPDATE", &[])
        .await
        .unwrap();
    let groups = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        preview::preview(&*env.pipeline().await, &PreviewFilter::default()),
    )
    .await
    .expect("preview waited for a lock")
    .unwrap();
    assert!(matches!(groups[0].outcome, Outcome::Due { .. }));
    tx.rollback().await.unwrap();
}

#[tokio::test]
async fn a_mail_left_open_by_an_earlier_attempt_is_shown_as_stored() {
    use mailgend::sandbox::smtp_sink::{Failure, Fault, Scope, Stage};
    let env = TestEnv::new().await;
    env.insert_event(
        event_fields("192.0.2.4", 64499),
        json!([directive("abuse@as64499.example.net", "Open-Redis", 64499)]),
    )
    .await;
    // SMTP refuses temporarily: the mail stays in the outbox for a retry,
    // with its ticket already drawn.
    env.sink.set_fault(Fault::Fail {
        stage: Stage::DataEnd,
        failure: Failure::Temporary,
        scope: Scope::All,
    });
    let s = env.run().await;
    assert_eq!((s.sent, s.errors), (0, 1));
    let before = db_state(&env).await;

    let groups = preview::preview(&*env.pipeline().await, &PreviewFilter::default())
        .await
        .unwrap();
    let Outcome::Open { note, mails } = &groups[0].outcome else {
        panic!("{:?}", groups[0])
    };
    assert!(note.contains("retries them"), "{note}");
    assert_eq!(mails.len(), 1);
    let stored = &mails[0];
    assert!(stored.text.contains("\"192.0.2.4\""), "{}", stored.text);
    let (code, text, _) = mailgend(&env, &["preview"]);
    assert_eq!(code, Some(0));
    assert!(text.contains("status         OPEN: 1 mail(s)"), "{text}");
    assert!(
        text.contains(&format!(
            "ticket {} (stored, not drawn anew)",
            stored.ticket
        )),
        "{text}"
    );
    assert_eq!(db_state(&env).await, before);

    // The retry sends exactly the stored message.
    env.sink.set_fault(Fault::None);
    assert_eq!(env.run().await.sent, 1);
    let got = env.sink.wait_for(1, std::time::Duration::from_secs(30));
    assert_eq!(got[0].data, stored.raw.as_bytes());
    assert_eq!(env.sent_tickets().await, vec![stored.ticket.clone()]);
}

#[tokio::test]
async fn a_signed_mail_previews_signed_as_it_is_sent() {
    let mut env = TestEnv::new().await;
    env.enable_signing();
    env.insert_event(
        event_fields("192.0.2.4", 64499),
        json!([directive("abuse@as64499.example.net", "Open-Redis", 64499)]),
    )
    .await;
    let groups = preview::preview(&*env.pipeline().await, &PreviewFilter::default())
        .await
        .unwrap();
    let Outcome::Due { mails, .. } = &groups[0].outcome else {
        panic!("{:?}", groups[0])
    };
    let m = &mails[0];
    assert!(m.signed);
    assert!(m.raw.contains("-----BEGIN PGP SIGNATURE-----"));
    assert_eq!(env.run().await.sent, 1);
    let got = env.sink.wait_for(1, std::time::Duration::from_secs(30));
    let real = got[0].text().into_owned();
    let no_boundary = |v: Vec<String>| -> Vec<String> {
        v.into_iter()
            .map(|h| h.split("boundary=").next().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        no_boundary(stable_headers(&real)),
        no_boundary(stable_headers(&m.raw))
    );
    assert!(stable_headers(&real)
        .iter()
        .any(|h| h.starts_with("Content-Type: multipart/signed")));
    assert_eq!(decoded_part(&real, "Content-Type: text/plain"), lf(&m.text));
}
