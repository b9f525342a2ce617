//! `mailgend send` without `--all` (interactive review) driven through a
//! real pseudo-terminal: the real binary, real PostgreSQL, a real SMTP
//! receiver. Every choice is exercised and what the receiver got and the
//! database say are checked after each one.

mod common;

use std::process::{Command, Stdio};

use common::{directive, event_fields, TestEnv};
use mailgend::notify::pipeline::{self, RunOptions};
use rexpect::process::WaitStatus;
use rexpect::session::{spawn_command, PtySession};
use serde_json::json;

fn recipient(n: i64) -> String {
    format!("abuse@as{n}.example.net")
}

async fn pending_for(env: &TestEnv, rcpt: &str) -> i64 {
    env.client()
        .await
        .query_one(
            "SELECT count(*) FROM directives WHERE sent_id IS NULL AND recipient_address = $1",
            &[&rcpt],
        )
        .await
        .unwrap()
        .get(0)
}

fn received_by(env: &TestEnv) -> Vec<String> {
    let mut r: Vec<String> = env
        .sink
        .messages()
        .iter()
        .flat_map(|m| m.rcpt_to.clone())
        .collect();
    r.sort();
    r
}

fn review(env: &TestEnv, batch: usize) -> PtySession {
    review_with(env, batch, &[])
}

fn review_with(env: &TestEnv, batch: usize, extra: &[&str]) -> PtySession {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mailgend"));
    cmd.arg("-c")
        .arg(env.config_file())
        .args(["send", "-N", &batch.to_string()])
        .args(extra)
        .env("HOME", env.dir.path())
        .env_remove("MAILGEND_LOG");
    spawn_command(cmd, Some(30_000)).expect("spawn mailgend in a pty")
}

fn exit_code(p: &PtySession) -> i32 {
    match p.process().wait().expect("wait") {
        WaitStatus::Exited(_, code) => code,
        other => panic!("mailgend did not exit normally: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_choice_in_a_real_terminal() {
    let mut env = TestEnv::new().await;
    env.config_json["logging_level"] = json!("WARNING");
    // Five due groups (one recipient each), then one the formats postpone
    // (newest directive younger than 15 minutes).
    for n in 1..=5 {
        env.insert_event(
            event_fields(&format!("192.0.2.{n}"), 64500 + n),
            json!([directive(&recipient(n), "Open-Redis", 64500 + n)]),
        )
        .await;
    }
    let young = json!({
        "medium": "email", "recipient_address": recipient(6),
        "template_name": "openredis_provider", "notification_format": "vulnerable-service",
        "event_data_format": "openredis_csv_inline", "notification_interval": 0,
        "aggregate_identifier": {"source.asn": 64506}
    });
    env.insert_event(event_fields("192.0.2.6", 64506), json!([young]))
        .await;
    let seq_before = env.ticket_seq_last_value().await;

    let mut p = review(&env, 2);

    // Page 1: groups 1 and 2, each with its status.
    p.exp_string("Current batch (2 of 6 total):").unwrap();
    p.exp_string(&format!("1. {} shadowserver_csv_Open-Redis (shadowserver/csv_Open-Redis): 1 events; due (10shadowserver.toml#", recipient(1)))
        .unwrap();
    p.exp_string(&format!("2. {}", recipient(2))).unwrap();
    p.exp_string("[v]iew N, [q]uit? ").unwrap();

    // [v]iew: the rendered mail, nothing sent, no ticket drawn.
    p.send_line("v 2").unwrap();
    p.exp_string("===== group 2: preview only").unwrap();
    let shown = p.exp_string("===== end of preview").unwrap();
    assert!(shown.contains(&format!("To: {}", recipient(2))), "{shown}");
    assert!(shown.contains("Subject: "), "{shown}");
    assert!(shown.contains("Message-Id: <"), "{shown}");
    assert!(
        shown.contains("\"192.0.2.2\""),
        "the CSV is in the text: {shown}"
    );
    assert!(shown.contains("(would be drawn next)"), "{shown}");
    p.exp_string("[q]uit? ").unwrap();
    assert!(env.sink.messages().is_empty());
    assert_eq!(env.ticket_seq_last_value().await, seq_before);

    // A wrong answer asks again.
    p.send_line("x").unwrap();
    p.exp_string("Please enter one of c, s, a, v N, q").unwrap();

    // [c]ontinue: page 1 is skipped.
    p.send_line("c").unwrap();
    p.exp_string("Skipping this batch.").unwrap();
    p.exp_string("Current batch (2 of 4 total):").unwrap();
    p.exp_string(&format!("1. {}", recipient(3))).unwrap();
    p.exp_string("[q]uit? ").unwrap();
    assert!(env.sink.messages().is_empty());

    // [s]end this batch: exactly groups 3 and 4, through the pipeline.
    p.send_line("s").unwrap();
    p.exp_string("Sending mails for 2 entries...").unwrap();
    p.exp_string("2 mails sent, 0 postponed, 0 errors.")
        .unwrap();
    p.exp_string("Current batch (2 of 2 total):").unwrap();
    p.exp_string(&format!("1. {}", recipient(5))).unwrap();
    p.exp_string(&format!("2. {} openredis_provider", recipient(6)))
        .unwrap();
    p.exp_string("postponed until ").unwrap();
    p.exp_string("is younger than 15m").unwrap();
    p.exp_string("[q]uit? ").unwrap();
    assert_eq!(received_by(&env), vec![recipient(3), recipient(4)]);
    for n in [1, 2, 5, 6] {
        assert_eq!(pending_for(&env, &recipient(n)).await, 1, "group {n}");
    }
    for n in [3, 4] {
        assert_eq!(pending_for(&env, &recipient(n)).await, 0, "group {n}");
    }
    assert_eq!(env.sent_tickets().await.len(), 2);

    // Meanwhile another mailgend sends group 5 (the page still shows it).
    let pl = env.pipeline().await;
    let client = env.client().await;
    let g5: Vec<_> = mailgend::notify::directive::pending_groups(&client, None)
        .await
        .unwrap()
        .into_iter()
        .filter(|g| g.key.recipient_address == recipient(5))
        .collect();
    let r = pipeline::run_groups(pl, g5, RunOptions::default())
        .await
        .unwrap();
    assert!(matches!(
        r[0],
        Ok(pipeline::GroupOutcome::Sent { mails: 1 })
    ));
    assert_eq!(env.sink.messages().len(), 3);

    // send [a]ll: group 5 is skipped (never sent twice), group 6 stays
    // postponed; skipped page 1 is not sent; the session ends.
    p.send_line("a").unwrap();
    p.exp_string("Sending mails for 2 entries...").unwrap();
    p.exp_string("skipped ").unwrap();
    p.exp_string("another mailgend sent it meanwhile").unwrap();
    p.exp_string("0 mails sent, 1 postponed, 0 errors.")
        .unwrap();
    p.exp_string("1 groups skipped").unwrap();
    p.exp_eof().unwrap();
    assert_eq!(exit_code(&p), 0);
    assert_eq!(
        received_by(&env),
        vec![recipient(3), recipient(4), recipient(5)],
        "group 5 once, groups 1, 2 (skipped) and 6 (postponed) not"
    );
    for n in [1, 2, 6] {
        assert_eq!(pending_for(&env, &recipient(n)).await, 1, "group {n}");
    }
    assert_eq!(env.sent_tickets().await.len(), 3);

    // [q]uit in a new session: the skipped groups are offered again and
    // nothing is sent.
    let mut p = review(&env, 10);
    p.exp_string("Current batch (3 of 3 total):").unwrap();
    p.exp_string(&format!("1. {}", recipient(1))).unwrap();
    p.exp_string("[q]uit? ").unwrap();
    p.send_line("q").unwrap();
    p.exp_string("Exiting without sending any further mails.")
        .unwrap();
    p.exp_eof().unwrap();
    assert_eq!(exit_code(&p), 0);
    assert_eq!(env.sink.messages().len(), 3);
    assert_eq!(env.pending_count().await, 3);

    // A dry run: send [a]ll only simulates; nothing sent, drawn or written.
    let seq = env.ticket_seq_last_value().await;
    let mut p = review_with(&env, 10, &["-n"]);
    p.exp_string("Dry run: sending only simulates").unwrap();
    p.exp_string("[q]uit? ").unwrap();
    p.send_line("a").unwrap();
    p.exp_string("Simulation: 2 mails sent, 1 postponed, 0 errors.")
        .unwrap();
    p.exp_eof().unwrap();
    assert_eq!(exit_code(&p), 0);
    assert_eq!(env.sink.messages().len(), 3);
    assert_eq!(env.pending_count().await, 3);
    assert_eq!(env.ticket_seq_last_value().await, seq);

    // End of input (Ctrl-D) quits too.
    let mut p = review(&env, 10);
    p.exp_string("[q]uit? ").unwrap();
    p.send_control('d').unwrap();
    p.exp_string("Exiting without sending any further mails.")
        .unwrap();
    p.exp_eof().unwrap();
    assert_eq!(exit_code(&p), 0);
    assert_eq!(env.sink.messages().len(), 3);
}

#[tokio::test]
async fn without_a_terminal_it_refuses_and_points_at_all() {
    let env = TestEnv::new().await;
    env.insert_event(
        event_fields("192.0.2.1", 64501),
        json!([directive(&recipient(1), "Open-Redis", 64501)]),
    )
    .await;
    for stdin in [Stdio::null(), Stdio::piped()] {
        let out = Command::new(env!("CARGO_BIN_EXE_mailgend"))
            .arg("-c")
            .arg(env.config_file())
            .arg("send")
            .env("HOME", env.dir.path())
            .stdin(stdin)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains("needs a terminal"), "{err}");
        assert!(err.contains("mailgend send --all"), "{err}");
    }
    assert!(env.sink.messages().is_empty());
    assert_eq!(env.pending_count().await, 1);
}
