//! Small groups sent as one batch (`pipeline::batch`): the same guarantees
//! per group as a group alone, against real PostgreSQL and a real SMTP
//! receiver. The batch is driven directly, so that which groups share it
//! does not depend on timing.

mod common;

use std::collections::HashMap;

use common::{directive, event_fields, TestEnv};
use mailgend::notify::directive::{self, DirectiveId, Group};
use mailgend::notify::event::EventColumns;
use mailgend::notify::outbox;
use mailgend::notify::pipeline::{batch, Connections, GroupError, GroupOutcome, RunOptions};
use mailgend::notify::ticket::Ticket;
use mailgend::sandbox::smtp_sink::Scope;
use mailgend::sandbox::{Failure, Fault, Stage};
use serde_json::json;

async fn insert_groups(env: &TestEnv, asns: std::ops::Range<i64>) {
    for asn in asns {
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
}

async fn pending(env: &TestEnv) -> Vec<Group> {
    directive::pending_groups(&env.client().await, None)
        .await
        .unwrap()
}

/// One batch of all pending groups.
async fn run_batch(env: &TestEnv) -> Vec<(Group, Result<GroupOutcome, GroupError>)> {
    let p = env.pipeline().await;
    let mut conns = Connections::open(&p.config).await.unwrap();
    let columns = EventColumns::read(&conns.main).await.unwrap();
    let groups = pending(env).await;
    let results =
        batch::process_batch(&p, &mut conns, &columns, &groups, RunOptions::default()).await;
    groups.into_iter().zip(results).collect()
}

/// The first `YYYYMMDD-NNNNNNNN` in a subject.
fn subject_ticket(subject: &str) -> String {
    let b = subject.as_bytes();
    (0..b.len().saturating_sub(16))
        .find(|&i| {
            b[i..i + 17].iter().enumerate().all(|(j, c)| {
                if j == 8 {
                    *c == b'-'
                } else {
                    c.is_ascii_digit()
                }
            })
        })
        .map(|i| subject[i..i + 17].to_string())
        .unwrap_or_else(|| panic!("no ticket in {subject:?}"))
}

#[tokio::test]
async fn a_batch_sends_every_group_once_and_marks_each_with_its_ticket() {
    let env = TestEnv::new().await;
    insert_groups(&env, 64496..64506).await;
    let results = run_batch(&env).await;
    assert_eq!(results.len(), 10);
    for (g, r) in &results {
        assert!(
            matches!(r, Ok(GroupOutcome::Sent { mails: 1 })),
            "{}: {r:?}",
            g.key.recipient_address
        );
    }
    assert_eq!(env.pending_count().await, 0);
    // Each mail's ticket (in its subject) is the one its directive points
    // at, and every mail went to its own group's recipient.
    let mails = env.sink.messages();
    assert_eq!(mails.len(), 10);
    let by_rcpt: HashMap<String, String> = mails
        .iter()
        .map(|m| {
            (
                m.rcpt_to[0].clone(),
                subject_ticket(&m.header("Subject").unwrap()),
            )
        })
        .collect();
    assert_eq!(by_rcpt.len(), 10);
    let rows = env
        .client()
        .await
        .query(
            "SELECT d.recipient_address, s.intelmq_ticket FROM directives d \
             JOIN sent s ON s.id = d.sent_id",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 10);
    for r in rows {
        let rcpt: String = r.get(0);
        let ticket: String = r.get(1);
        assert_eq!(by_rcpt[&rcpt], ticket, "{rcpt}");
    }
    // The outbox holds nothing open; the audit trail has every mail.
    let open = outbox::list_open(&env.client().await).await.unwrap();
    assert!(open.is_empty(), "{open:?}");
    let audited: i64 = env
        .client()
        .await
        .query_one("SELECT count(*) FROM mailgend.sent_mail", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(audited, 10);
}

#[tokio::test]
async fn a_temporary_refusal_keeps_the_rest_of_the_batch_for_later_with_its_tickets() {
    let env = TestEnv::new().await;
    insert_groups(&env, 64496..64506).await;
    env.sink.set_fault(Fault::Fail {
        stage: Stage::DataEnd,
        failure: Failure::Temporary,
        scope: Scope::Next(1),
    });
    let results = run_batch(&env).await;
    // The relay said "later" to the first mail: the batch stops there and
    // nothing else is handed over.
    for (_, r) in &results {
        let e = r.as_ref().expect_err("not sent");
        assert!(e.is_temporary(), "{e}");
    }
    assert!(env.sink.messages().is_empty());
    assert_eq!(env.pending_count().await, 10);
    let open = outbox::list_open(&env.client().await).await.unwrap();
    assert_eq!(open.len(), 10);
    assert!(open.iter().all(|o| o.state == outbox::State::Retry));
    let not_attempted = open
        .iter()
        .filter(|o| o.last_error.as_deref() == Some("not attempted"))
        .count();
    assert_eq!(not_attempted, 9, "{open:?}");
    let kept: HashMap<String, Ticket> = open
        .iter()
        .map(|o| (o.envelope_to[0].clone(), o.ticket.clone()))
        .collect();

    // The next run sends each once, with the ticket drawn the first time.
    let s = env.run().await;
    assert_eq!(s.to_string(), "10 mails sent, 0 postponed, 0 errors.");
    let mails = env.sink.messages();
    assert_eq!(mails.len(), 10);
    for m in &mails {
        let ticket = subject_ticket(&m.header("Subject").unwrap());
        assert_eq!(kept[&m.rcpt_to[0]].as_str(), ticket);
    }
    assert_eq!(env.pending_count().await, 0);
    assert_eq!(env.sent_tickets().await.len(), 10);
}

#[tokio::test]
async fn a_broken_group_fails_alone_in_its_batch_and_draws_no_ticket() {
    let env = TestEnv::new().await;
    insert_groups(&env, 64496..64500).await;
    let mut broken = directive("abuse@broken.example.net", "Open-Redis", 64510);
    broken["template_name"] = json!("no_such_template");
    env.insert_event(event_fields("192.0.2.9", 64510), json!([broken]))
        .await;
    let before = env.ticket_seq_last_value().await;
    let results = run_batch(&env).await;
    let mut sent = 0;
    for (g, r) in &results {
        if g.key.recipient_address == "abuse@broken.example.net" {
            let e = r.as_ref().expect_err("broken template");
            assert!(e.to_string().contains("no_such_template"), "{e}");
        } else {
            assert!(matches!(r, Ok(GroupOutcome::Sent { mails: 1 })), "{r:?}");
            sent += 1;
        }
    }
    assert_eq!(sent, 4);
    assert_eq!(env.pending_count().await, 1, "the broken one stays pending");
    let after = env.ticket_seq_last_value().await;
    let drawn = if before.1 {
        after.0 - before.0
    } else {
        after.0 - before.0 + 1
    };
    assert_eq!(drawn, 4, "tickets only for the mails that went out");
}

#[tokio::test]
async fn a_group_with_an_in_doubt_mail_is_resumed_alone_and_the_rest_batched() {
    let env = TestEnv::new().await;
    insert_groups(&env, 64496..64497).await;
    // The relay takes the mail, then the connection drops before the
    // reply: the mail is in doubt.
    env.sink.set_fault(Fault::DropAfterData {
        scope: Scope::Next(1),
        deliver: true,
    });
    assert_eq!(env.run().await.errors, 1);
    assert_eq!(env.sink.messages().len(), 1);
    insert_groups(&env, 64497..64501).await;

    let results = run_batch(&env).await;
    assert_eq!(results.len(), 5);
    assert!(results
        .iter()
        .all(|(_, r)| matches!(r, Ok(GroupOutcome::Sent { mails: 1 }))));
    let mails = env.sink.messages();
    assert_eq!(mails.len(), 6, "four new mails and one resent");
    let first: Vec<_> = mails
        .iter()
        .filter(|m| m.rcpt_to == ["abuse@as64496.example.net"])
        .collect();
    assert_eq!(first.len(), 2);
    assert_eq!(first[0].data, first[1].data, "resent byte for byte");
    assert_eq!(env.pending_count().await, 0);
    assert_eq!(env.sent_tickets().await.len(), 5);
}

#[tokio::test]
async fn a_group_another_worker_holds_comes_back_busy_and_the_rest_is_sent() {
    let env = TestEnv::new().await;
    insert_groups(&env, 64496..64500).await;
    let groups = pending(&env).await;
    let held = &groups[1];
    // Another instance's transaction holds that group's rows.
    let mut other = env.client().await;
    let tx = other.transaction().await.unwrap();
    directive::claim(&tx, held).await.unwrap();

    let results = run_batch(&env).await;
    for (g, r) in &results {
        if g.key == held.key {
            assert!(matches!(r, Ok(GroupOutcome::Busy)), "{r:?}");
        } else {
            assert!(matches!(r, Ok(GroupOutcome::Sent { mails: 1 })), "{r:?}");
        }
    }
    tx.rollback().await.unwrap();
    assert_eq!(env.pending_count().await, 1);
    assert_eq!(env.run().await.sent, 1);
    assert_eq!(env.sink.messages().len(), 4);
}

#[tokio::test]
async fn outbox_rows_recorded_together_keep_odd_addresses_and_order() {
    let env = TestEnv::new().await;
    let client = env.client().await;
    let t1 = Ticket::from_stored("20240501-10000001");
    let t2 = Ticket::from_stored("20240501-10000002");
    let odd = vec![
        r#""a,b\"c {d}"@example.net"#.to_string(),
        "NULL".to_string(),
        "x y@example.net".to_string(),
    ];
    let plain = vec!["abuse@example.net".to_string()];
    let (m1, m2) = ([1, 2, 3].map(DirectiveId), [4].map(DirectiveId));
    let now = chrono::Utc::now();
    let intents = [
        outbox::Intent {
            ticket: &t1,
            message_id: "<1@example.org>",
            marks: &m1,
            group: &m1,
            envelope_from: "cert@example.org",
            envelope_to: &odd,
            message: b"first",
            sent_at: now,
        },
        outbox::Intent {
            ticket: &t2,
            message_id: "<2@example.org>",
            marks: &[],
            group: &m2,
            envelope_from: "cert@example.org",
            envelope_to: &plain,
            message: b"second",
            sent_at: now,
        },
    ];
    let ids = outbox::record(&client, "test:1", &intents).await.unwrap();
    assert_eq!(ids.len(), 2);
    let open = outbox::list_open(&client).await.unwrap();
    let by_id: HashMap<i64, &outbox::OpenMail> = open.iter().map(|o| (o.id, o)).collect();
    let first = by_id[&ids[0]];
    assert_eq!(first.envelope_to, odd);
    assert_eq!(first.message, b"first");
    assert_eq!(first.marks, m1);
    assert!(first.marks_sent);
    let second = by_id[&ids[1]];
    assert_eq!(second.envelope_to, plain);
    assert_eq!(second.message, b"second");
    assert!(!second.marks_sent && second.marks.is_empty());
}

/// Splits a multipart/signed message into (signed bytes, signature), as
/// RFC 3156 lays it out.
fn split_signed(raw: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let text = String::from_utf8_lossy(raw).to_string();
    let ct = common::header(raw, "Content-Type").unwrap();
    assert!(ct.starts_with("multipart/signed;"), "{ct}");
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

/// The real `gpg --verify` against the test key: its status lines.
fn gpg_verify(home: &std::path::Path, signed: &[u8], sig: &[u8]) -> String {
    std::fs::write(home.join("data"), signed).unwrap();
    std::fs::write(home.join("sig.asc"), sig).unwrap();
    let out = std::process::Command::new("gpg")
        .arg("--homedir")
        .arg(home)
        .args(["--batch", "--status-fd", "1", "--verify"])
        .arg(home.join("sig.asc"))
        .arg(home.join("data"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// A signed batch larger than the core count is signed in pieces on the
/// signing pool (`pipeline::signing`): every mail still goes to its own
/// group's recipient with its own group's ticket, and every signature
/// passes `gpg --verify` over exactly the bytes sent.
#[tokio::test]
async fn a_signed_batch_signed_across_the_cores_keeps_each_mail_with_its_group() {
    let mut env = TestEnv::new().await;
    env.enable_signing();
    insert_groups(&env, 64496..64516).await;
    let results = run_batch(&env).await;
    assert_eq!(results.len(), 20);
    for (g, r) in &results {
        assert!(
            matches!(r, Ok(GroupOutcome::Sent { mails: 1 })),
            "{}: {r:?}",
            g.key.recipient_address
        );
    }
    let mails = env.sink.messages();
    assert_eq!(mails.len(), 20);
    let rows = env
        .client()
        .await
        .query(
            "SELECT d.recipient_address, s.intelmq_ticket FROM directives d \
             JOIN sent s ON s.id = d.sent_id",
            &[],
        )
        .await
        .unwrap();
    let tickets: HashMap<String, String> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(tickets.len(), 20);
    let home = tempfile::tempdir().unwrap();
    let import = std::process::Command::new("gpg")
        .arg("--homedir")
        .arg(home.path())
        .args(["--batch", "--quiet", "--import"])
        .arg(common::repo_path(
            "tests/fixtures/keys/test-signing.pub.asc",
        ))
        .output()
        .unwrap();
    assert!(import.status.success(), "{import:?}");
    for m in &mails {
        let rcpt = &m.rcpt_to[0];
        assert_eq!(&m.header("To").unwrap(), rcpt, "header and envelope agree");
        assert_eq!(
            subject_ticket(&m.header("Subject").unwrap()),
            tickets[rcpt],
            "{rcpt}: the ticket its directive points at"
        );
        // The group's ASN is in its own mail's signed part.
        let (signed, sig) = split_signed(&m.data);
        let asn = rcpt
            .trim_start_matches("abuse@as")
            .trim_end_matches(".example.net");
        assert!(
            String::from_utf8_lossy(&signed).contains(asn),
            "{rcpt}: its own events"
        );
        let status = gpg_verify(home.path(), &signed, &sig);
        assert!(status.contains("[GNUPG:] GOODSIG"), "{rcpt}: {status}");
    }
}
