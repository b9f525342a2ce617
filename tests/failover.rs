//! Fail-over (issue 17 item 2): `mailgend run` against a primary and its
//! streaming replica (`pg_basebackup -R`), host list with
//! `target_session_attrs=read-write`. The primary is killed (`pg_ctl stop
//! -m immediate`) while mail is going out, the replica promoted, more
//! events inserted: every directive is sent, each mail received once or
//! reported in doubt, none lost.
//!
//! The primary replicates synchronously (`synchronous_standby_names`), as
//! docs/operations.md asks for: with asynchronous replication the last
//! commits before a crash may be missing on the standby, and a directive
//! marked sent there would be sent again without a report.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::{directive, event_fields, event_insert, header, ServiceProcess, TestEnv};
use mailgend::sandbox::{ExtraType, PgCluster, TestDb};
use serde_json::json;

async fn insert(client: &tokio_postgres::Client, from: i64, n: i64) {
    for asn in from..from + n {
        let (sql, row) = event_insert(
            event_fields("192.0.2.1", asn),
            json!([directive(
                &format!("abuse@as{asn}.example.net"),
                "Open-Redis",
                asn
            )]),
        );
        client.query_one(sql.as_str(), &[&row]).await.unwrap();
    }
}

async fn socket_client(cluster: &PgCluster, db: &TestDb) -> tokio_postgres::Client {
    let (c, conn) = tokio_postgres::Config::new()
        .host(cluster.host())
        .port(cluster.port())
        .user(cluster.superuser())
        .dbname(&db.name)
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    c
}

/// The same test as `tests/service.rs`'s in-doubt report parsing: the
/// Message-Ids the service said it resent.
fn reported_in_doubt(logs: &str) -> HashSet<String> {
    logs.lines()
        .filter(|l| l.contains("mail in doubt"))
        .filter_map(|l| l.split("mail_message_id=").nth(1))
        .map(|r| r.split_whitespace().next().unwrap_or("").to_string())
        .collect()
}

#[tokio::test]
async fn killing_the_primary_mid_run_loses_nothing_and_duplicates_only_what_it_reports() {
    let mut env = TestEnv::new().await;
    let mut primary = PgCluster::start_temp().expect("primary");
    let db = primary.create_database_async().await.unwrap();
    db.create_events_table(ExtraType::Jsonb).await.unwrap();
    mailgend::notify::db::migrate::migrate(&mut db.connect().await.unwrap())
        .await
        .unwrap();
    let replica = primary.start_replica().expect("streaming replica");
    let admin = socket_client(&primary, &db).await;
    for sql in [
        "ALTER SYSTEM SET synchronous_standby_names = '*'",
        "ALTER SYSTEM SET synchronous_commit = 'on'",
        "SELECT pg_reload_conf()",
    ] {
        admin.batch_execute(sql).await.unwrap();
    }
    // The replica streams and is synchronous before mail flows.
    let start = Instant::now();
    loop {
        let row = admin
            .query_opt(
                "SELECT 1 FROM pg_stat_replication WHERE sync_state = 'sync' AND state = 'streaming'",
                &[],
            )
            .await
            .unwrap();
        if row.is_some() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "replica not in sync"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    env.config_json["database"]["event"] = json!({
        "name": db.name, "username": db.superuser, "password": null,
        "host": format!("{},{}", primary.host(), replica.host()),
        "port": format!("{},{}", primary.port(), replica.port()),
        "target_session_attrs": "read-write"});
    env.config_json["mailgend"] =
        json!({"workers": 4, "sweep_interval": 3600, "shutdown_deadline": 10});
    env.config_json["logging_level"] = json!("INFO");
    let conf = env.config_file();
    let svc = ServiceProcess::start_with_config(&env, "svc", &conf);

    // A first batch; the primary dies while it goes out.
    const FIRST: i64 = 60;
    insert(&admin, 64496, FIRST).await;
    env.sink.wait_for_async(10, Duration::from_secs(60)).await;
    primary.kill().expect("kill the primary");
    let at_kill = env.sink.messages().len();
    replica.promote().expect("promote the replica");

    // The second batch goes to the new primary.
    let new_primary = socket_client(&replica, &db).await;
    const SECOND: i64 = 40;
    insert(&new_primary, 70000, SECOND).await;

    // Everything goes out.
    let start = Instant::now();
    loop {
        let pending: i64 = new_primary
            .query_one("SELECT count(*) FROM directives WHERE sent_id IS NULL", &[])
            .await
            .unwrap()
            .get(0);
        let open: i64 = new_primary
            .query_one(
                "SELECT count(*) FROM mailgend.outbox WHERE state <> 'accepted'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if pending == 0 && open == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "{pending} directives pending, {open} outbox rows open:\n{}",
            svc.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The primary died mid-run, and the same process (no restart) went on
    // with the promoted replica.
    assert!(
        at_kill < FIRST as usize,
        "all mail had gone before the kill"
    );
    assert!(
        svc.log_text()
            .contains("database notification connection lost"),
        "{}",
        svc.log_text()
    );
    let logs = svc.kill9();

    // Every directive of both batches is sent on the new primary.
    let directives: i64 = new_primary
        .query_one(
            "SELECT count(*) FROM directives WHERE sent_id IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(directives, FIRST + SECOND);
    // Each recorded mail was received; each received mail is recorded; a
    // mail received twice was reported in doubt.
    let recorded: HashSet<String> = new_primary
        .query("SELECT message_id FROM mailgend.sent_mail", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mails = env.sink.messages();
    let mut by_id: HashMap<String, usize> = HashMap::new();
    for m in &mails {
        *by_id
            .entry(header(&m.data, "Message-Id").unwrap())
            .or_default() += 1;
    }
    let received: HashSet<String> = by_id.keys().cloned().collect();
    assert_eq!(received, recorded, "received and recorded mails differ");
    let reported = reported_in_doubt(&logs);
    let dups: Vec<_> = by_id.iter().filter(|(_, n)| **n > 1).collect();
    for (id, n) in &dups {
        assert!(
            reported.contains(*id),
            "{id} received {n} times, never reported in doubt"
        );
    }
    // One mail per recipient (each group is one directive here).
    assert_eq!(received.len() as i64, FIRST + SECOND);
    eprintln!(
        "{} mails received, {at_kill} before the kill, {} duplicates (reported in doubt)",
        mails.len(),
        dups.len()
    );
    drop(new_primary);
    drop(admin);
    drop(db);
}
