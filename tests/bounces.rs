//! Bounces traced back to their tickets (issue 19, items 2 and 3), over
//! real SMTP throughout: the notifier's VERP envelope senders as the sink
//! records them, DSNs and classic bounces sent to a running `mailgend
//! route`, and `mailgend bounces` listing what it recorded.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{directive, event_fields, TestEnv};
use mailgend::notify::verp::Verp;
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

/// Sets `oversize` for the shipped Shadowserver formats (inline CSV).
fn set_oversize(env: &TestEnv, choice: &str) {
    let path = env.format_dir().join("10shadowserver.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let inline = "data_location = \"inline\"";
    assert!(text.contains(inline));
    std::fs::write(
        &path,
        text.replacen(inline, &format!("{inline}\noversize = \"{choice}\""), 1),
    )
    .unwrap();
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
    set_oversize(&env, "split");
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
