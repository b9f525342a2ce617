//! Failure isolation (issue 12, part 4): a mail that cannot be sent for a
//! reason of its own fails alone, with an ERROR naming its directive and
//! event ids, and the rest of the batch and of the run goes on; only a
//! failure of the relay itself stops a batch. A mail that certainly was
//! not handed over never becomes "in doubt". Real PostgreSQL, real SMTP
//! over TCP (the sandbox sink, set up to lack SMTPUTF8, announce a small
//! SIZE, or refuse one recipient), the real binary where the log matters.
//!
//! The old tool (intelmq-mailgen `intelmqmail/cb.py:219` one SAVEPOINT per
//! group; `cb.py:248-258` any `Exception` → ROLLBACK TO SAVEPOINT, log
//! "Could not create or send mails for …", next group) also let every
//! failure of a group pass and went on; it had no outbox, so nothing could
//! be in doubt there. It sent with `smtplib`'s `send_message(…, to_addrs=…)`
//! (`intelmqmail/notification.py:535`), which delivers to the recipients the
//! relay takes and raises only when it takes none. See docs/migration.md
//! "SMTP failures".

mod common;

use std::process::Command;

use common::{directive, event_fields, TestEnv};
use mailgend::notify::directive::{self as dir, Group};
use mailgend::notify::event::EventColumns;
use mailgend::notify::outbox::{self, State};
use mailgend::notify::pipeline::{self, batch, Connections, GroupError, GroupOutcome, RunOptions};
use mailgend::sandbox::smtp_sink::{Failure, Fault, Scope, SinkOptions, Stage};
use mailgend::sandbox::SmtpSink;
use mailgend::shared::smtp::SmtpError;
use serde_json::json;

/// The internationalised recipient: its local part cannot be converted to
/// ASCII, so only SMTPUTF8 can carry it.
const UTF8_RCPT: &str = "jörg@as64990.example.net";

fn rcpt(asn: i64) -> String {
    format!("abuse@as{asn}.example.net")
}

/// A test environment whose SMTP receiver is set up with `options`.
async fn env_with(options: SinkOptions) -> TestEnv {
    let mut env = TestEnv::new().await;
    env.sink = SmtpSink::start_with(options);
    env.config_json["smtp"]["port"] = json!(env.sink.port());
    env
}

/// One group (one event, one directive) per ASN, plus whatever the test
/// adds; aged so that no format's minimum age postpones them.
async fn insert_groups(env: &TestEnv, asns: std::ops::Range<i64>) {
    for asn in asns {
        insert_one(env, &rcpt(asn), asn, 1).await;
    }
}

/// A group of `events` events for `recipient`.
async fn insert_one(env: &TestEnv, recipient: &str, asn: i64, events: usize) {
    for n in 0..events {
        env.insert_event(
            event_fields(&format!("192.0.2.{}", n % 250 + 1), asn),
            json!([directive(recipient, "Open-Redis", asn)]),
        )
        .await;
    }
    env.age_directives(3 * 3600).await;
}

async fn pending(env: &TestEnv) -> Vec<Group> {
    dir::pending_groups(&env.client().await, None)
        .await
        .unwrap()
}

/// All pending groups as one batch (so which groups share it does not
/// depend on timing).
async fn run_batch(env: &TestEnv) -> Vec<(Group, Result<GroupOutcome, GroupError>)> {
    let p = env.pipeline().await;
    let mut conns = Connections::open(&p.config).await.unwrap();
    let columns = EventColumns::read(&conns.main).await.unwrap();
    let groups = pending(env).await;
    assert!(groups.len() <= batch::BATCH_GROUPS);
    let results =
        batch::process_batch(&p, &mut conns, &columns, &groups, RunOptions::default()).await;
    groups.into_iter().zip(results).collect()
}

/// The SMTP error of a failed group.
fn smtp_error(r: &Result<GroupOutcome, GroupError>) -> &SmtpError {
    match r {
        Err(GroupError::Smtp { source, .. }) => source,
        other => panic!("expected an SMTP failure, got {other:?}"),
    }
}

/// Every outbox row (open or not): (recipient, state, last_error).
async fn outbox_rows(env: &TestEnv) -> Vec<(String, String, Option<String>)> {
    env.client()
        .await
        .query(
            "SELECT envelope_to[1], state, last_error FROM mailgend.outbox ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

async fn pending_recipients(env: &TestEnv) -> Vec<String> {
    env.client()
        .await
        .query(
            "SELECT DISTINCT recipient_address FROM directives WHERE sent_id IS NULL ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn ids_of(env: &TestEnv, recipient: &str) -> (Vec<i64>, Vec<i64>) {
    let rows = env
        .client()
        .await
        .query(
            "SELECT id, events_id FROM directives WHERE recipient_address = $1 ORDER BY id",
            &[&recipient],
        )
        .await
        .unwrap();
    (
        rows.iter().map(|r| r.get(0)).collect(),
        rows.iter().map(|r| r.get(1)).collect(),
    )
}

fn send_all(env: &TestEnv) -> (String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mailgend"))
        .arg("-c")
        .arg(env.config_file())
        .args(["send", "--all"])
        .env("HOME", env.dir.path())
        .output()
        .unwrap();
    (
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn list(ids: &[i64]) -> String {
    format!(
        "[{}]",
        ids.iter()
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// The issue's done-when: one SMTPUTF8 recipient among 20 other groups, a
/// relay without SMTPUTF8. Every other mail goes out; the one fails alone
/// with an ERROR naming its ids, stays pending, is not in doubt; a second
/// run behaves the same (no in-doubt WARN, no resend loop).
#[tokio::test]
async fn a_batch_with_one_smtputf8_recipient_and_a_relay_without_it_sends_every_other_mail() {
    let env = env_with(SinkOptions {
        smtputf8: false,
        ..SinkOptions::default()
    })
    .await;
    insert_groups(&env, 64496..64506).await;
    insert_one(&env, UTF8_RCPT, 64990, 2).await;
    insert_groups(&env, 64506..64516).await;
    let (directive_ids, event_ids) = ids_of(&env, UTF8_RCPT).await;

    for round in 1..=2 {
        let (stdout, stderr) = send_all(&env);
        let sent = if round == 1 { 20 } else { 0 };
        assert_eq!(
            stdout,
            format!("{sent} mails sent, 0 postponed, 1 errors."),
            "round {round}: {stderr}"
        );
        let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("ERROR")).collect();
        assert_eq!(errors.len(), 1, "round {round}: {stderr}");
        let e = errors[0];
        for needle in [
            format!("directive_ids={}", list(&directive_ids)),
            format!("event_ids={}", list(&event_ids)),
            "this mail cannot go through this relay".to_string(),
            "does not offer SMTPUTF8".to_string(),
            UTF8_RCPT.to_string(),
        ] {
            assert!(e.contains(&needle), "round {round}: {needle}: {e}");
        }
        assert!(!stderr.contains("in doubt"), "round {round}: {stderr}");

        let mails = env.sink.messages();
        assert_eq!(mails.len(), 20, "round {round}: nothing twice");
        assert!(mails.iter().all(|m| m.rcpt_to[0] != UTF8_RCPT));
        assert_eq!(pending_recipients(&env).await, vec![UTF8_RCPT.to_string()]);
        // Released, not open: nothing is resent as "in doubt" next time.
        let open = outbox::list_open(&env.client().await).await.unwrap();
        assert!(open.is_empty(), "round {round}: {open:?}");
        let rows = outbox_rows(&env).await;
        assert_eq!(rows.len(), round, "one failed row per attempt: {rows:?}");
        assert!(rows
            .iter()
            .all(|(to, state, _)| to == UTF8_RCPT && state == "failed"));
    }
    assert_eq!(env.sent_tickets().await.len(), 20);
}

/// The same through `mailgend run`: the service sends the others at once
/// and does not retry the refused group in a loop (it waits 15 minutes, as
/// for any group whose mail was refused for good).
#[tokio::test]
async fn the_service_sends_the_others_and_does_not_loop_on_the_smtputf8_mail() {
    let env = env_with(SinkOptions {
        smtputf8: false,
        ..SinkOptions::default()
    })
    .await;
    insert_groups(&env, 64496..64501).await;
    insert_one(&env, UTF8_RCPT, 64990, 1).await;
    insert_groups(&env, 64501..64506).await;
    let (directive_ids, _) = ids_of(&env, UTF8_RCPT).await;
    let service = common::ServiceProcess::start(&env, "service");
    env.sink
        .wait_for_async(10, std::time::Duration::from_secs(60))
        .await;
    service.wait_for_log(
        "does not offer SMTPUTF8",
        std::time::Duration::from_secs(30),
    );
    // More time for a loop to show, and a new group to prove the service
    // is still sending.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    insert_groups(&env, 64506..64507).await;
    env.sink
        .wait_for_async(11, std::time::Duration::from_secs(60))
        .await;
    let log = service.log_text();
    let (code, _) = service.stop();
    assert_eq!(code, Some(0), "{log}");
    assert_eq!(env.sink.messages().len(), 11, "{log}");
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Could not create or send mails"))
        .collect();
    assert_eq!(errors.len(), 1, "one attempt, no loop: {log}");
    assert!(
        errors[0].contains(&format!("directive_ids={}", list(&directive_ids))),
        "{}",
        errors[0]
    );
    assert!(!log.contains("in doubt"), "{log}");
    assert_eq!(pending_recipients(&env).await, vec![UTF8_RCPT.to_string()]);
    let rows = outbox_rows(&env).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].1, "failed");
}

/// Interactive review sends through the same code (`pipeline::run_groups`,
/// one group at a time): the same isolation.
#[tokio::test]
async fn review_sends_the_others_and_releases_the_smtputf8_mail() {
    let env = env_with(SinkOptions {
        smtputf8: false,
        ..SinkOptions::default()
    })
    .await;
    insert_groups(&env, 64496..64498).await;
    insert_one(&env, UTF8_RCPT, 64990, 1).await;
    insert_groups(&env, 64498..64500).await;
    let groups = pending(&env).await;
    let results = pipeline::run_groups(env.pipeline().await, groups.clone(), RunOptions::default())
        .await
        .unwrap();
    for (g, r) in groups.iter().zip(&results) {
        if g.key.recipient_address == UTF8_RCPT {
            let e = smtp_error(r);
            assert!(matches!(e, SmtpError::Unsendable(_)), "{e}");
        } else {
            assert!(matches!(r, Ok(GroupOutcome::Sent { mails: 1 })), "{r:?}");
        }
    }
    assert_eq!(env.sink.messages().len(), 4);
    assert!(outbox::list_open(&env.client().await)
        .await
        .unwrap()
        .is_empty());
}

/// (b) 550 at RCPT for one recipient: that group fails for good, the rest
/// of the batch goes on over the same connection (RSET, not a new one).
/// A 452 (too many recipients) or 450 (mailbox busy) at RCPT: that mail is
/// retried later as it is (same ticket, Message-Id), the others go on.
#[tokio::test]
async fn a_recipient_refused_at_rcpt_fails_alone() {
    let env = TestEnv::new().await;
    insert_groups(&env, 64496..64506).await;
    env.sink.set_fault(Fault::Fail {
        stage: Stage::Rcpt,
        failure: Failure::Permanent,
        scope: Scope::Recipient(rcpt(64499)),
    });
    let results = run_batch(&env).await;
    for (g, r) in &results {
        if g.key.recipient_address == rcpt(64499) {
            let e = smtp_error(r);
            assert!(matches!(e, SmtpError::Permanent(_)), "{e}");
            assert!(e.to_string().contains("550"), "{e}");
            assert!(!r.as_ref().unwrap_err().is_temporary());
        } else {
            assert!(matches!(r, Ok(GroupOutcome::Sent { mails: 1 })), "{r:?}");
        }
    }
    assert_eq!(env.sink.messages().len(), 9);
    assert_eq!(env.sink.connections(), 1, "the refusal did not retire it");
    assert_eq!(pending_recipients(&env).await, vec![rcpt(64499)]);
    let rows = outbox_rows(&env).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(
        (rows[0].0.as_str(), rows[0].1.as_str()),
        (&*rcpt(64499), "failed")
    );

    // A 4xx for one recipient (the 550 one is accepted now).
    env.sink.clear();
    insert_groups(&env, 64510..64514).await;
    env.sink.set_fault(Fault::Reply {
        stage: Stage::Rcpt,
        reply: "452 4.5.3 Too many recipients".into(),
        scope: Scope::Recipient(rcpt(64511)),
        close: false,
    });
    let results = run_batch(&env).await;
    assert_eq!(results.len(), 5);
    for (g, r) in &results {
        if g.key.recipient_address == rcpt(64511) {
            let e = smtp_error(r);
            assert!(matches!(e, SmtpError::Temporary(_)), "{e}");
        } else {
            assert!(matches!(r, Ok(GroupOutcome::Sent { mails: 1 })), "{r:?}");
        }
    }
    assert_eq!(env.sink.messages().len(), 4);
    let open = outbox::list_open(&env.client().await).await.unwrap();
    assert_eq!(open.len(), 1, "{open:?}");
    assert_eq!(open[0].state, State::Retry);
    assert_eq!(open[0].envelope_to, [rcpt(64511)]);
    let kept = (open[0].ticket.to_string(), open[0].message_id.clone());
    // The recipient's server has room again: the kept mail goes out as it
    // was.
    env.sink.set_fault(Fault::None);
    let s = env.run().await;
    assert_eq!((s.sent, s.errors), (1, 0), "{s}");
    let mails = env.sink.messages();
    assert_eq!(mails.len(), 5);
    assert_eq!(mails[4].rcpt_to, [rcpt(64511)]);
    assert_eq!(
        common::header(&mails[4].data, "Message-Id").unwrap(),
        kept.1,
        "resent as it was"
    );
    assert!(env.sent_tickets().await.contains(&kept.0));
    assert!(pending_recipients(&env).await.is_empty());
}

/// (c) The relay announces SIZE and one mail is larger: it fails alone
/// before it is offered; the others go out.
#[tokio::test]
async fn a_mail_over_the_relays_size_fails_alone() {
    let env = env_with(SinkOptions {
        max_size: 1_600,
        ..SinkOptions::default()
    })
    .await;
    // Since issue 19 a mail over the limit is zipped or split by default;
    // `oversize = "error"` keeps it a failure of its own group.
    let formats = env.format_dir().join("10shadowserver.toml");
    let text = std::fs::read_to_string(&formats).unwrap();
    std::fs::write(
        &formats,
        text.replacen(
            "data_location = \"inline\"",
            "data_location = \"inline\"\noversize = \"error\"",
            1,
        ),
    )
    .unwrap();
    insert_groups(&env, 64496..64500).await;
    // One event makes a mail of about 1 kB; 40 events about 2.8 kB.
    insert_one(&env, "abuse@big.example.net", 64980, 40).await;
    insert_groups(&env, 64500..64504).await;
    let results = run_batch(&env).await;
    assert_eq!(results.len(), 9);
    for (g, r) in &results {
        if g.key.recipient_address == "abuse@big.example.net" {
            // Never offered to the relay (notify::fit).
            let e = r.as_ref().expect_err("the big group fails");
            assert!(matches!(e, GroupError::TooBig(_)), "{e}");
            assert!(
                e.to_string().contains("over the relay's limit of 1600"),
                "{e}"
            );
        } else {
            assert!(matches!(r, Ok(GroupOutcome::Sent { mails: 1 })), "{r:?}");
        }
    }
    let mails = env.sink.messages();
    assert_eq!(mails.len(), 8);
    assert!(mails.iter().all(|m| m.data.len() < 1_600));
    assert_eq!(env.sink.connections(), 1);
    let rows = outbox_rows(&env).await;
    assert!(
        rows.is_empty(),
        "nothing over the limit is recorded: {rows:?}"
    );
    assert_eq!(
        pending_recipients(&env).await,
        vec!["abuse@big.example.net".to_string()]
    );
}

/// (d) 554 to the DATA command, 554 and 552 after the data, each for one
/// mail: each fails alone (a definite answer: not in doubt), the rest goes
/// on.
#[tokio::test]
async fn a_refusal_of_the_data_fails_that_mail_alone() {
    let env = TestEnv::new().await;
    insert_groups(&env, 64496..64508).await;
    let refused = rcpt(64498);
    // Before the data: the DATA command itself is refused.
    env.sink.set_fault(Fault::Fail {
        stage: Stage::Data,
        failure: Failure::Permanent,
        scope: Scope::Recipient(refused.clone()),
    });
    let results = run_batch(&env).await;
    assert_eq!(results.len(), 12);
    for (g, r) in &results {
        if g.key.recipient_address == refused {
            let e = smtp_error(r);
            assert!(matches!(e, SmtpError::Permanent(_)), "{e}");
            assert!(e.to_string().contains("554"), "{e}");
        } else {
            assert!(matches!(r, Ok(GroupOutcome::Sent { mails: 1 })), "{r:?}");
        }
    }
    assert_eq!(env.sink.messages().len(), 11);
    assert_eq!(env.sink.connections(), 1);

    // After the data.
    insert_groups(&env, 64520..64522).await;
    env.sink.set_fault(Fault::Fail {
        stage: Stage::DataEnd,
        failure: Failure::Permanent,
        scope: Scope::Recipient(refused.clone()),
    });
    let results = run_batch(&env).await;
    assert_eq!(results.len(), 3);
    for (g, r) in &results {
        if g.key.recipient_address == refused {
            let e = smtp_error(r);
            assert!(matches!(e, SmtpError::Permanent(_)), "{e}");
            assert!(e.to_string().contains("554"), "{e}");
        } else {
            assert!(matches!(r, Ok(GroupOutcome::Sent { mails: 1 })), "{r:?}");
        }
    }
    assert_eq!(env.sink.messages().len(), 13);

    // Next time the group is rendered anew and offered again; now the
    // relay finds it too big after the data.
    insert_groups(&env, 64510..64513).await;
    env.sink.set_fault(Fault::Reply {
        stage: Stage::DataEnd,
        reply: "552 5.3.4 Message too big for system".into(),
        scope: Scope::Recipient(refused.clone()),
        close: false,
    });
    let results = run_batch(&env).await;
    assert_eq!(results.len(), 4);
    for (g, r) in &results {
        if g.key.recipient_address == refused {
            let e = smtp_error(r);
            assert!(matches!(e, SmtpError::Permanent(_)), "{e}");
            assert!(e.to_string().contains("552"), "{e}");
        } else {
            assert!(matches!(r, Ok(GroupOutcome::Sent { mails: 1 })), "{r:?}");
        }
    }
    assert_eq!(env.sink.messages().len(), 16);
    assert_eq!(pending_recipients(&env).await, vec![refused.clone()]);
    // A definite answer: released each time, never in doubt.
    let rows = outbox_rows(&env).await;
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert!(rows
        .iter()
        .all(|(to, state, _)| *to == refused && state == "failed"));
    assert!(outbox::list_open(&env.client().await)
        .await
        .unwrap()
        .is_empty());
}

/// (e) The relay itself failing mid-batch still stops the batch, and
/// nothing is lost or sent twice: 421 (the relay closes the connection),
/// a 4xx about the mail system (enhanced code 4.3.x, or at MAIL), and a
/// connection that breaks before the data (certainly not handed over:
/// `retry`, never in doubt).
#[tokio::test]
async fn the_relay_failing_mid_batch_stops_the_batch_and_loses_nothing() {
    for (what, fault) in [
        (
            "421",
            Fault::Reply {
                stage: Stage::Rcpt,
                reply: "421 4.3.2 Service shutting down".into(),
                scope: Scope::Recipient(rcpt(64500)),
                close: true,
            },
        ),
        (
            "452 4.3.1 at RCPT (the mail system, not the recipient)",
            Fault::Reply {
                stage: Stage::Rcpt,
                reply: "452 4.3.1 Insufficient system storage".into(),
                scope: Scope::Recipient(rcpt(64500)),
                close: false,
            },
        ),
        (
            "451 at DATA",
            Fault::Fail {
                stage: Stage::Data,
                failure: Failure::Temporary,
                scope: Scope::Recipient(rcpt(64500)),
            },
        ),
        (
            "451 at MAIL",
            Fault::Reply {
                stage: Stage::Mail,
                reply: "451 4.3.0 Local error in processing".into(),
                scope: Scope::Next(1),
                close: false,
            },
        ),
        (
            "connection lost before DATA",
            Fault::Reply {
                stage: Stage::Rcpt,
                reply: "250 2.1.5 Ok".into(),
                scope: Scope::Recipient(rcpt(64500)),
                close: true,
            },
        ),
    ] {
        let env = TestEnv::new().await;
        insert_groups(&env, 64496..64506).await;
        env.sink.set_fault(fault);
        let results = run_batch(&env).await;
        let mut sent = 0;
        let mut stopped = false;
        for (g, r) in &results {
            match r {
                Ok(GroupOutcome::Sent { mails: 1 }) => {
                    assert!(!stopped, "{what}: nothing after the failure");
                    sent += 1;
                }
                Err(e) => {
                    stopped = true;
                    assert!(e.is_temporary(), "{what}: {e}");
                    let s = smtp_error(r);
                    assert!(
                        matches!(s, SmtpError::RelayUnavailable(_)),
                        "{what}: {}: {s}",
                        g.key.recipient_address
                    );
                }
                other => panic!("{what}: {other:?}"),
            }
        }
        assert!(stopped, "{what}");
        assert_eq!(env.sink.messages().len(), sent, "{what}");
        let open = outbox::list_open(&env.client().await).await.unwrap();
        assert_eq!(open.len(), 10 - sent, "{what}: {open:?}");
        assert!(
            open.iter().all(|o| o.state == State::Retry),
            "{what}: never in doubt: {open:?}"
        );
        // The relay is back: the rest goes out once, with its tickets.
        env.sink.set_fault(Fault::None);
        let s = env.run().await;
        assert_eq!((s.sent, s.errors), (10 - sent, 0), "{what}: {s}");
        let mails = env.sink.messages();
        assert_eq!(mails.len(), 10, "{what}");
        let mut rcpts: Vec<String> = mails.iter().map(|m| m.rcpt_to[0].clone()).collect();
        rcpts.sort();
        rcpts.dedup();
        assert_eq!(rcpts.len(), 10, "{what}: each once");
        assert_eq!(env.pending_count().await, 0, "{what}");
        assert_eq!(env.sent_tickets().await.len(), 10, "{what}");
    }
}

/// A mail with several envelope recipients (a constituency copy) of which
/// the relay refuses one at RCPT goes to the others, as the old tool's
/// `smtplib` `send_message` did (intelmqmail/notification.py:535; it raises
/// only when every recipient is refused); mailgend says so at WARN, the
/// old tool said nothing.
#[tokio::test]
async fn a_copy_goes_to_the_recipients_the_relay_takes() {
    let env = TestEnv::new().await;
    let path = env.format_dir().join("01constituency-copies.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let changed = text.replace(
        r#"recipients = ["energy-copies@cert.example"]"#,
        r#"recipients = ["energy-copies@cert.example", "energy-second@cert.example"]"#,
    );
    assert_ne!(text, changed, "the shipped copies format changed");
    std::fs::write(&path, changed).unwrap();
    let mut d = directive(&rcpt(64496), "Open-Redis", 64496);
    d["aggregate_identifier"]["recipient_group"] = json!("Energy");
    env.insert_event(event_fields("192.0.2.10", 64496), json!([d]))
        .await;
    env.age_directives(3 * 3600).await;
    env.sink.set_fault(Fault::Fail {
        stage: Stage::Rcpt,
        failure: Failure::Permanent,
        scope: Scope::Recipient("energy-second@cert.example".into()),
    });
    let (stdout, stderr) = send_all(&env);
    assert_eq!(stdout, "2 mails sent, 0 postponed, 0 errors.", "{stderr}");
    let mails = env.sink.messages();
    assert_eq!(mails.len(), 2);
    assert!(mails
        .iter()
        .any(|m| m.rcpt_to == ["energy-copies@cert.example"]));
    let warn = stderr
        .lines()
        .find(|l| l.contains("WARN") && l.contains("refused one envelope recipient"))
        .unwrap_or_else(|| panic!("{stderr}"));
    assert!(warn.contains("energy-second@cert.example"), "{warn}");
    assert!(warn.contains("550"), "{warn}");
    assert_eq!(env.pending_count().await, 0);
}

/// How the scripted relay below behaves once it said 354 to DATA.
#[derive(Clone, Copy, Debug)]
enum AfterData {
    /// Reads a little of the message, then closes (unread data: a reset).
    CloseMidData,
    /// Stops reading: the client's writes block until its timeout.
    StopReading,
    /// Reads the whole message with its final dot, then closes silently.
    CloseAfterDot,
    /// Reads the whole message with its final dot, then never answers.
    SilentAfterDot,
}

/// A one-connection ESMTP relay that misbehaves after DATA as told, with
/// a small receive buffer so that a large message cannot all sit in the
/// kernel's buffers. Raw TCP: the sandbox sink always reads to the end.
async fn scripted_relay(after: AfterData) -> u16 {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(4).unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let (rd, mut wr) = stream.into_split();
        let mut rd = BufReader::new(rd);
        wr.write_all(b"220 scripted ESMTP\r\n").await.unwrap();
        let mut line = String::new();
        loop {
            line.clear();
            if rd.read_line(&mut line).await.unwrap_or(0) == 0 {
                return;
            }
            let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
            let answer: &[u8] = match verb.as_str() {
                "EHLO" => b"250-scripted\r\n250 8BITMIME\r\n",
                "DATA" => b"354 go on\r\n",
                "QUIT" => b"221 bye\r\n",
                _ => b"250 ok\r\n",
            };
            wr.write_all(answer).await.unwrap();
            if verb == "DATA" {
                break;
            }
        }
        match after {
            AfterData::CloseMidData => {
                let mut some = vec![0u8; 4096];
                let _ = rd.read(&mut some).await;
            }
            AfterData::StopReading => {
                tokio::time::sleep(std::time::Duration::from_secs(30)).await;
            }
            AfterData::CloseAfterDot | AfterData::SilentAfterDot => {
                let mut tail: Vec<u8> = Vec::new();
                let mut buf = vec![0u8; 64 * 1024];
                while !tail.ends_with(b"\r\n.\r\n") {
                    let n = rd.read(&mut buf).await.unwrap();
                    if n == 0 {
                        return;
                    }
                    tail.extend_from_slice(&buf[..n]);
                    let keep = tail.len().saturating_sub(5);
                    tail.drain(..keep);
                }
                if let AfterData::SilentAfterDot = after {
                    tokio::time::sleep(std::time::Duration::from_secs(30)).await;
                }
            }
        }
    });
    port
}

/// Whether a mail may have been handed over is decided by what the socket
/// saw: a connection that breaks, or a relay that stops reading, before
/// the final dot was written cannot have taken the mail (the relay's
/// failure, `retry`); once the whole mail was written and no answer came,
/// it may have (in doubt).
#[tokio::test]
async fn a_mail_is_in_doubt_only_once_its_end_was_written() {
    use mailgend::shared::smtp::Outbound;
    use mailgend::shared::smtp::{SmtpConfig, SmtpTls};
    // Large enough to outlast the kernel's buffers (4 kB receive buffer
    // on the relay, at most 4 MB send buffer here).
    let mut message =
        b"From: cert@example.org\r\nTo: abuse@example.net\r\nSubject: t\r\n\r\n".to_vec();
    while message.len() < 8 * 1024 * 1024 {
        message.extend_from_slice(
            b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcd\r\n",
        );
    }
    for (after, in_doubt) in [
        (AfterData::CloseMidData, false),
        (AfterData::StopReading, false),
        (AfterData::CloseAfterDot, true),
        (AfterData::SilentAfterDot, true),
    ] {
        let port = scripted_relay(after).await;
        let cfg = SmtpConfig {
            host: "127.0.0.1".into(),
            port,
            tls: SmtpTls::None,
            ca_file: None,
            username: None,
            password: None,
            timeout: std::time::Duration::from_secs(3),
        };
        let e = Outbound::new(&cfg, 1)
            .unwrap()
            .send("cert@example.org", &["abuse@example.net".into()], &message)
            .await
            .expect_err("the relay never says 250");
        assert_eq!(e.delivery_unknown(), in_doubt, "{after:?}: {e}");
        if !in_doubt {
            assert!(
                matches!(e, SmtpError::RelayUnavailable(_)),
                "{after:?}: {e}"
            );
            assert!(e.is_relay_failure() && e.is_temporary(), "{after:?}: {e}");
        }
    }
}

/// A relay that refuses every session at its greeting (554).
async fn refusing_relay() -> u16 {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let _ = stream
                .write_all(b"554 5.3.2 No SMTP service here\r\n")
                .await;
        }
    });
    port
}

/// A relay refusing the session is the relay's failure, not the mail's:
/// the batch stops at the first mail and every mail waits as `retry` with
/// its ticket (not released, not in doubt), to go out as it is once a
/// relay takes it.
#[tokio::test]
async fn a_relay_refusing_the_session_stops_the_batch_and_keeps_the_mails() {
    let mut env = TestEnv::new().await;
    let sink_port = env.sink.port();
    env.config_json["smtp"]["port"] = json!(refusing_relay().await);
    insert_groups(&env, 64496..64501).await;
    let results = run_batch(&env).await;
    let errors: Vec<&SmtpError> = results.iter().map(|(_, r)| smtp_error(r)).collect();
    assert!(
        matches!(errors[0], SmtpError::RelayRefused(_)),
        "{}",
        errors[0]
    );
    assert!(errors[0].to_string().contains("554"), "{}", errors[0]);
    for e in &errors[1..] {
        assert!(e.to_string().contains("not attempted"), "{e}");
        // Retried when the cause is: a refused session is not temporary.
        assert!(!e.is_temporary(), "{e}");
    }
    let open = outbox::list_open(&env.client().await).await.unwrap();
    assert_eq!(open.len(), 5, "{open:?}");
    assert!(open.iter().all(|o| o.state == State::Retry), "{open:?}");
    let mut kept: Vec<String> = open.iter().map(|o| o.ticket.to_string()).collect();

    env.config_json["smtp"]["port"] = json!(sink_port);
    let s = env.run().await;
    assert_eq!((s.sent, s.errors), (5, 0), "{s}");
    assert_eq!(env.sink.messages().len(), 5);
    let mut sent = env.sent_tickets().await;
    sent.sort();
    kept.sort();
    assert_eq!(sent, kept, "the tickets drawn the first time");
}
