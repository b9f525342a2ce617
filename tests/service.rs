//! `mailgend run`, the real binary, against the real PostgreSQL and SMTP
//! receiver: wake-ups, postponement timers, several instances, kill -9,
//! outages, signals, least privilege.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::{directive, event_fields, eventually, header, ServiceProcess, TestEnv};
use mailgend::sandbox::{self, Fault, FeedParams};
use serde_json::json;

/// A service config: no safety sweep to speak of (an hour), so anything
/// that happens quickly happened because of a notification or a timer.
fn service_env(env: &mut TestEnv, workers: usize) {
    env.config_json["mailgend"] = json!({
        "workers": workers,
        "sweep_interval": 3600,
        "shutdown_deadline": 10,
    });
    env.config_json["logging_level"] = json!("INFO");
}

async fn feed(env: &TestEnv, events: usize, seed: u64) -> i64 {
    let client = env.client().await;
    let feed = sandbox::Feed::new(FeedParams {
        events,
        recipients: 150,
        asns: 600,
        seed,
        time_observation: chrono::Utc::now() - chrono::Duration::hours(6),
        ..FeedParams::default()
    })
    .unwrap();
    sandbox::feed::insert(&client, feed.events(), 500)
        .await
        .unwrap();
    client
        .query_one("SELECT count(*) FROM directives", &[])
        .await
        .unwrap()
        .get(0)
}

/// Message-Ids the logs reported as resent in doubt.
fn reported_in_doubt(logs: &str) -> HashSet<String> {
    logs.lines()
        .filter(|l| l.contains("mail in doubt"))
        .filter_map(|l| l.split("mail_message_id=").nth(1))
        .map(|r| r.split_whitespace().next().unwrap_or("").to_string())
        .collect()
}

/// Every directive sent; every accepted mail received; a mail received
/// twice only if it was reported as in doubt. Returns (mails, duplicates).
async fn verify_exactly_once(env: &TestEnv, logs: &str) -> (usize, usize) {
    assert_eq!(env.pending_count().await, 0, "directives left pending");
    let client = env.client().await;
    let open: i64 = client
        .query_one("SELECT count(*) FROM mailgend.outbox", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(open, 0, "outbox rows left open");
    let accepted: HashSet<String> = client
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
    assert_eq!(
        received, accepted,
        "received mails and recorded mails differ"
    );
    let reported = reported_in_doubt(logs);
    let mut dups = 0;
    for (id, n) in &by_id {
        if *n > 1 {
            dups += n - 1;
            assert!(
                reported.contains(id),
                "{id} received {n} times but never reported in doubt"
            );
        }
    }
    // Each ticket in `sent` is in the subject of a received mail.
    let subjects: String = mails
        .iter()
        .map(|m| header(&m.data, "Subject").unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n");
    for t in env.sent_tickets().await {
        assert!(
            subjects.contains(&t),
            "ticket {t} was recorded but never mailed"
        );
    }
    (mails.len(), dups)
}

#[tokio::test]
async fn an_inserted_event_is_mailed_within_two_seconds() {
    let mut env = TestEnv::new().await;
    service_env(&mut env, 2);
    let svc = ServiceProcess::start(&env, "svc");
    let mut latencies = Vec::new();
    for i in 0..5 {
        let asn = 64496 + i;
        let t0 = Instant::now();
        env.insert_event(
            event_fields("192.0.2.1", asn),
            json!([directive(
                &format!("abuse@as{asn}.example.net"),
                "Open-Redis",
                asn
            )]),
        )
        .await;
        let got = env
            .sink
            .wait_for_async(i as usize + 1, Duration::from_secs(30))
            .await;
        assert_eq!(got.len(), i as usize + 1, "{}", svc.log_text());
        latencies.push(t0.elapsed());
    }
    let worst = latencies.iter().max().unwrap();
    assert!(*worst < Duration::from_secs(2), "{latencies:?}");
    let (code, _) = svc.stop();
    assert_eq!(code, Some(0));
}

#[tokio::test]
async fn a_postponed_group_goes_when_its_interval_expires() {
    let mut env = TestEnv::new().await;
    service_env(&mut env, 1);
    // Example 11's malware-infection waits for the interval (the
    // Shadowserver tables wait for ages instead).
    let d = json!({
        "medium": "email", "recipient_address": "abuse@as64496.example.net",
        "template_name": "malware-infection", "notification_format": "malware-infection",
        "event_data_format": "malware-infection_csv_inline", "notification_interval": 3,
        "aggregate_identifier": {"source.asn": 64496}
    });
    let svc = ServiceProcess::start(&env, "svc");
    env.insert_event(event_fields("192.0.2.1", 64496), json!([d.clone()]))
        .await;
    assert_eq!(
        env.sink
            .wait_for_async(1, Duration::from_secs(30))
            .await
            .len(),
        1
    );
    let first = Instant::now();
    // Same group within 3 s of the last mail: postponed, then sent by the
    // timer (no further insert, no sweep).
    env.insert_event(event_fields("192.0.2.2", 64496), json!([d]))
        .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(env.sink.messages().len(), 1, "must wait for the interval");
    let got = env.sink.wait_for_async(2, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 2, "{}", svc.log_text());
    let waited = first.elapsed();
    assert!(
        // sent_at is the Date header, whole seconds: the interval may end up
        // to 1 s before 3 s after the first mail arrived.
        waited >= Duration::from_millis(1900) && waited < Duration::from_secs(10),
        "{waited:?}"
    );
    svc.stop();
}

async fn instances_send_every_group_once(n: usize) {
    let mut env = TestEnv::new().await;
    service_env(&mut env, 2);
    let directives = feed(&env, 1500, 7).await;
    assert!(directives > 1500);
    let procs: Vec<ServiceProcess> = (0..n)
        .map(|i| ServiceProcess::start(&env, &format!("svc{i}")))
        .collect();
    let done = eventually(Duration::from_secs(120), || async {
        env.pending_count().await == 0
    })
    .await;
    let mut logs = String::new();
    for p in procs {
        logs.push_str(&p.log_text());
        let (code, _) = p.stop();
        assert_eq!(code, Some(0));
    }
    assert!(done, "not all sent:\n{logs}");
    let (mails, dups) = verify_exactly_once(&env, &logs).await;
    assert_eq!(dups, 0, "no crash, so no duplicate");
    assert!(mails > 500);
    // Work was shared, and nobody hit the old tool's lock error.
    let senders: HashSet<&str> = logs
        .lines()
        .filter(|l| l.contains("mail sent"))
        .filter_map(|l| l.split("mailgend running").next())
        .collect();
    assert!(!senders.is_empty());
    let pg_log =
        std::fs::read_to_string(mailgend::sandbox::PgCluster::shared().unwrap().log_path())
            .unwrap_or_default();
    let ours: Vec<&str> = pg_log
        .lines()
        .filter(|l| l.contains(&env.db.name) && l.contains("could not obtain lock"))
        .collect();
    assert!(ours.is_empty(), "{ours:?}");
}

#[tokio::test]
async fn two_instances_send_every_group_exactly_once() {
    instances_send_every_group_once(2).await;
}

#[tokio::test]
async fn four_instances_send_every_group_exactly_once() {
    instances_send_every_group_once(4).await;
}

#[tokio::test]
async fn kill_9_at_random_moments_loses_nothing_and_duplicates_only_what_it_reports() {
    let mut env = TestEnv::new().await;
    service_env(&mut env, 3);
    feed(&env, 1200, 11).await;
    let mut logs = String::new();
    // A cheap deterministic "random": different moments, repeatable.
    let delays = [90u64, 370, 150, 520, 60, 240, 410, 130];
    for (i, ms) in delays.iter().enumerate() {
        let p = ServiceProcess::start(&env, &format!("k{i}"));
        tokio::time::sleep(Duration::from_millis(*ms)).await;
        logs.push_str(&p.kill9());
    }
    let p = ServiceProcess::start(&env, "final");
    let done = eventually(Duration::from_secs(120), || async {
        env.pending_count().await == 0
    })
    .await;
    logs.push_str(&p.log_text());
    let (code, _) = p.stop();
    assert_eq!(code, Some(0));
    assert!(done, "not all sent:\n{logs}");
    let (mails, dups) = verify_exactly_once(&env, &logs).await;
    eprintln!(
        "{mails} mails, {dups} reported duplicates after {} kills",
        delays.len()
    );
}

#[tokio::test]
async fn an_smtp_outage_delays_mail_and_loses_none() {
    let mut env = TestEnv::new().await;
    service_env(&mut env, 2);
    env.sink.set_fault(Fault::RefuseConnections);
    let svc = ServiceProcess::start(&env, "svc");
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
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(env.sink.messages().is_empty());
    assert_eq!(env.pending_count().await, 10);
    env.sink.resume().unwrap();
    let got = env.sink.wait_for_async(10, Duration::from_secs(40)).await;
    assert_eq!(got.len(), 10, "{}", svc.log_text());
    assert!(
        eventually(Duration::from_secs(10), || async {
            env.pending_count().await == 0
        })
        .await
    );
    let logs = svc.log_text();
    svc.stop();
    verify_exactly_once(&env, &logs).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_postgresql_restart_mid_run_loses_nothing() {
    // A private cluster: restarting the shared one would hit other tests.
    let mut cluster = tokio::task::spawn_blocking(mailgend::sandbox::PgCluster::start_temp)
        .await
        .unwrap()
        .unwrap();
    let db = cluster.create_database_async().await.unwrap();
    db.create_events_table(mailgend::sandbox::ExtraType::Jsonb)
        .await
        .unwrap();
    let mut env = TestEnv::new().await;
    {
        let mut c = db.connect().await.unwrap();
        mailgend::notify::db::migrate::migrate(&mut c)
            .await
            .unwrap();
    }
    env.config_json["database"]["event"] = json!({
        "name": db.name, "username": db.superuser, "host": db.host, "port": db.port});
    service_env(&mut env, 2);
    let svc = ServiceProcess::start(&env, "svc");
    let insert = |from: i64| {
        let db = &db;
        async move {
            let c = db.connect().await.unwrap();
            for asn in from..from + 10 {
                let d = directive(&format!("abuse@as{asn}.example.net"), "Open-Redis", asn);
                let mut f = event_fields("192.0.2.1", asn);
                f["extra"] = json!({"certbund": {"source_directives": [d]}});
                c.execute(
                    "INSERT INTO events (\"source.ip\", \"source.asn\", \"time.source\", extra) \
                     SELECT \"source.ip\", \"source.asn\", \"time.source\", extra \
                     FROM jsonb_populate_record(NULL::events, $1::text::jsonb)",
                    &[&f.to_string()],
                )
                .await
                .unwrap();
            }
        }
    };
    insert(64496).await;
    assert_eq!(
        env.sink
            .wait_for_async(10, Duration::from_secs(10))
            .await
            .len(),
        10
    );
    tokio::task::block_in_place(|| cluster.stop()).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    tokio::task::block_in_place(|| cluster.start_again()).unwrap();
    // New work after the restart is found (the LISTEN connection came back
    // or the rescan after reconnecting found it).
    insert(64600).await;
    let c = db.connect().await.unwrap();
    let all_sent = eventually(Duration::from_secs(60), || async {
        let pending: i64 = c
            .query_one("SELECT count(*) FROM directives WHERE sent_id IS NULL", &[])
            .await
            .unwrap()
            .get(0);
        pending == 0
    })
    .await;
    let logs = svc.log_text();
    assert!(all_sent, "{logs}");
    // Every mail arrived; one whose commit the restart cut off may have
    // been resent, and then the log says so.
    let mails = env.sink.messages();
    let mut ids: HashMap<String, usize> = HashMap::new();
    for m in &mails {
        *ids.entry(header(&m.data, "Message-Id").unwrap())
            .or_default() += 1;
    }
    assert_eq!(ids.len(), 20, "{logs}");
    let reported = reported_in_doubt(&logs);
    for (id, n) in ids {
        assert!(n == 1 || reported.contains(&id), "{id} x{n}: {logs}");
    }
    let (code, _) = svc.stop();
    assert_eq!(code, Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_applies_a_good_config_and_refuses_a_broken_one() {
    let mut env = TestEnv::new().await;
    service_env(&mut env, 1);
    let svc = ServiceProcess::start(&env, "svc");
    // Broken: a format file with a typo'd key.
    env.write_format("50broken.toml", "[[format]]\nnmae = \"x\"\n");
    svc.signal("HUP");
    svc.wait_for_log("configuration reload refused", Duration::from_secs(10));
    assert!(
        svc.log_text().contains("50broken.toml"),
        "the ERROR names the file"
    );
    // The old configuration still sends.
    env.insert_event(
        event_fields("192.0.2.1", 64496),
        json!([directive("abuse@as64496.example.net", "Open-Redis", 64496)]),
    )
    .await;
    let got = env.sink.wait_for_async(1, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 1, "{}", svc.log_text());
    // Good: the template changes, and the next mail shows it.
    std::fs::remove_file(env.format_dir().join("50broken.toml")).unwrap();
    env.write_template(
        "shadowserver_csv_Open-Redis",
        "Reloaded subject ${ticket_number}\n\nBody\n${events_as_csv}\n",
    );
    svc.signal("HUP");
    svc.wait_for_log("configuration reloaded", Duration::from_secs(10));
    env.insert_event(
        event_fields("192.0.2.2", 64497),
        json!([directive("abuse@as64497.example.net", "Open-Redis", 64497)]),
    )
    .await;
    let got = env.sink.wait_for_async(2, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 2);
    let subject = header(&got[1].data, "Subject").unwrap();
    assert!(subject.starts_with("Reloaded subject"), "{subject}");
    let (code, _) = svc.stop();
    assert_eq!(code, Some(0));
}

#[tokio::test]
async fn sigterm_drains_within_the_deadline() {
    let mut env = TestEnv::new().await;
    service_env(&mut env, 2);
    feed(&env, 600, 3).await;
    let svc = ServiceProcess::start(&env, "svc");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (code, took) = svc.stop();
    assert_eq!(code, Some(0));
    assert!(took < Duration::from_secs(12), "{took:?}");
    // Whatever was not finished is still pending, and nothing is open.
    let logs = String::new();
    let client = env.client().await;
    let open: i64 = client
        .query_one("SELECT count(*) FROM mailgend.outbox", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(open, 0, "a clean stop leaves nothing in doubt");
    let _ = logs;
}

#[tokio::test]
async fn the_service_runs_as_a_least_privileged_role() {
    let mut env = TestEnv::new().await;
    let role = env
        .db
        .create_login_role("mailgen", "s3cret'pw")
        .await
        .unwrap();
    env.client()
        .await
        .batch_execute(&format!("GRANT eventdb_send_notifications TO \"{role}\""))
        .await
        .unwrap();
    env.config_json["database"]["event"] = json!({
        "name": env.db.name, "username": role, "password": "s3cret'pw",
        "host": "127.0.0.1", "port": env.db.port});
    service_env(&mut env, 1);
    let svc = ServiceProcess::start(&env, "svc");
    // Yesterday's ticket day forces the sequence restart, which needs the
    // sequence's ownership that eventdb_send_notifications has.
    env.client()
        .await
        .batch_execute("UPDATE ticket_day SET initialized_for_day = current_date - 1")
        .await
        .unwrap();
    env.insert_event(
        event_fields("192.0.2.1", 64496),
        json!([directive("abuse@as64496.example.net", "Open-Redis", 64496)]),
    )
    .await;
    let got = env.sink.wait_for_async(1, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 1, "{}", svc.log_text());
    assert!(
        eventually(Duration::from_secs(30), || async {
            env.pending_count().await == 0
        })
        .await,
        "{}",
        svc.log_text()
    );
    let (code, _) = svc.stop();
    assert_eq!(code, Some(0));
}

#[tokio::test]
async fn metrics_and_status_show_what_the_service_did() {
    let mut env = TestEnv::new().await;
    service_env(&mut env, 1);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    env.config_json["mailgend"]["metrics_listen"] = json!(format!("127.0.0.1:{port}"));
    let svc = ServiceProcess::start(&env, "svc");
    env.insert_event(
        event_fields("192.0.2.1", 64496),
        json!([directive("abuse@as64496.example.net", "Open-Redis", 64496)]),
    )
    .await;
    assert_eq!(
        env.sink
            .wait_for_async(1, Duration::from_secs(30))
            .await
            .len(),
        1
    );
    let scrape = || {
        let out = std::process::Command::new("curl")
            .args(["-s", &format!("http://127.0.0.1:{port}/metrics")])
            .output()
            .unwrap();
        mailgend::shared::metrics::parse_exposition(&String::from_utf8_lossy(&out.stdout))
    };
    let ok = eventually(Duration::from_secs(30), || async {
        scrape().get("mailgend_mails_sent_total").copied() == Some(1.0)
    })
    .await;
    let m = scrape();
    assert!(ok, "{m:?}");
    assert_eq!(m.get("mailgend_up"), Some(&1.0));
    assert!(m
        .keys()
        .any(|k| k.starts_with("mailgend_insert_to_smtp_seconds")));
    // `mailgend status` reads the same state from the database.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mailgend"))
        .arg("-c")
        .arg(env.config_file())
        .arg("status")
        .env("HOME", env.dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("pending directives  0 in 0 groups"), "{text}");
    assert!(
        text.contains("sent                1 in the last hour"),
        "{text}"
    );
    let (code, _) = svc.stop();
    assert_eq!(code, Some(0));
}

/// `send --all` killed with SIGKILL while it sends batches of small
/// groups: the next runs send everything, each mail once, except mails
/// the log reports as resent in doubt.
#[tokio::test]
async fn kill_9_during_send_all_loses_nothing_and_duplicates_only_what_it_reports() {
    kill_9_during_send_all(false).await;
}

/// The same with signing: the batches' mails are signed in pieces on the
/// signing pool (`pipeline::signing`) while other workers record and send,
/// so the kills land with mails being signed, recorded and sent at once.
#[tokio::test]
async fn kill_9_during_signed_send_all_loses_nothing_and_duplicates_only_what_it_reports() {
    kill_9_during_send_all(true).await;
}

async fn kill_9_during_send_all(signed: bool) {
    let mut env = TestEnv::new().await;
    service_env(&mut env, 3);
    if signed {
        env.enable_signing();
    }
    feed(&env, 1200, 12).await;
    let config = env.config_file();
    let mut logs = String::new();
    let send_all = |name: &str| {
        let log = env.dir.path().join(format!("{name}.log"));
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_mailgend"))
            .arg("-c")
            .arg(&config)
            .args(["send", "--all"])
            .env("HOME", env.dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn mailgend send --all");
        (child, log)
    };
    for (i, ms) in [12u64, 30, 8, 45].iter().enumerate() {
        let (mut child, log) = send_all(&format!("k{i}"));
        // Kill while it sends: once the receiver has new mail (start-up
        // takes longer on a loaded machine than any fixed delay), plus a
        // little, so the kill lands at different points of a batch.
        let before = env.sink.messages().len();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while env.sink.messages().len() == before && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tokio::time::sleep(Duration::from_millis(*ms)).await;
        child.kill().unwrap();
        child.wait().unwrap();
        logs.push_str(&std::fs::read_to_string(log).unwrap());
    }
    let sent_before = env.sent_tickets().await.len();
    let (mut child, log) = send_all("final");
    let status = child.wait().unwrap();
    logs.push_str(&std::fs::read_to_string(log).unwrap());
    assert!(status.success(), "{logs}");
    assert!(
        sent_before > 0,
        "nothing was sent before the kills: they interrupted nothing mid-send"
    );
    let (mails, dups) = verify_exactly_once(&env, &logs).await;
    if signed {
        let unsigned = env
            .sink
            .messages()
            .iter()
            .filter(|m| {
                !header(&m.data, "Content-Type")
                    .unwrap_or_default()
                    .starts_with("multipart/signed")
            })
            .count();
        assert_eq!(unsigned, 0, "every mail signed");
    }
    eprintln!(
        "{mails} mails, {dups} reported duplicates after 4 kills of send --all (signed: {signed})"
    );
}

/// Issue 12's done-when: with the shipped formats as shipped, a fresh
/// Shadowserver report is held until its newest directive is 15 minutes
/// old and its time.observation 2 hours old (intelmq-mailgen
/// example_scripts/10shadowservercsv.py:231-232), however many inserts wake
/// the service meanwhile, and then goes out as ONE mail. The ages are the
/// shipped 15 min / 2 h; time is moved by the timestamps inserted (each
/// event's directives are back-dated in the inserting transaction).
#[tokio::test]
async fn shipped_shadowserver_group_waits_for_both_ages_then_goes_as_one_mail() {
    let mut env = TestEnv::with(common::EnvOptions {
        shipped_directive_age: true,
        ..Default::default()
    })
    .await;
    service_env(&mut env, 2);
    let svc = ServiceProcess::start(&env, "svc");
    let iso = |t: chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%dT%H:%M:%S+00:00").to_string();
    let now = chrono::Utc::now();

    // Group A, held by the directive age: observed 3 h ago; its directives
    // "arrive" 15 min minus 3 s ago, then 15 min minus 5 s ago (the newest
    // decides: about 5 s from now). Group B, held by the observation age:
    // directives an hour old, observed 2 h minus 9 s ago.
    let obs_a = iso(now - chrono::Duration::hours(3));
    let obs_b = iso(now - chrono::Duration::hours(2) + chrono::Duration::seconds(9));
    let dir = |asn: i64, obs: &str| {
        let mut d = directive(&format!("abuse@as{asn}.example.net"), "Open-Redis", asn);
        d["aggregate_identifier"]["time.observation"] = json!(obs);
        d
    };
    let t0_sys = std::time::SystemTime::now() - Duration::from_millis(100);
    env.insert_event_aged(
        event_fields("192.0.2.1", 64496),
        json!([dir(64496, &obs_a)]),
        897.0,
    )
    .await;
    env.insert_event_aged(
        event_fields("198.51.100.1", 64511),
        json!([dir(64511, &obs_b)]),
        3600.0,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    env.insert_event_aged(
        event_fields("192.0.2.2", 64496),
        json!([dir(64496, &obs_a)]),
        895.0,
    )
    .await;
    env.insert_event_aged(
        event_fields("198.51.100.2", 64511),
        json!([dir(64511, &obs_b)]),
        3600.0,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        env.sink.messages().is_empty(),
        "mailed before the ages passed:\n{}",
        svc.log_text()
    );
    let got = env.sink.wait_for_async(2, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 2, "{}", svc.log_text());
    let arrived = |rcpt: &str| {
        let m = got
            .iter()
            .find(|m| m.rcpt_to.iter().any(|r| r == rcpt))
            .unwrap_or_else(|| panic!("no mail to {rcpt}:\n{}", svc.log_text()));
        m.received_at.duration_since(t0_sys).unwrap()
    };
    // A: the newest directive was inserted ~1 s after t0 with 5 s to go.
    let a = arrived("abuse@as64496.example.net");
    assert!(a >= Duration::from_millis(5500), "{a:?}");
    // B: due 2 h after its observation time, which is written in whole
    // seconds (so up to 1 s before `now - 2 h + 9 s`): not a moment before.
    let due_b: std::time::SystemTime = (chrono::DateTime::parse_from_rfc3339(&obs_b).unwrap()
        + chrono::Duration::hours(2))
    .with_timezone(&chrono::Utc)
    .into();
    let b = arrived("abuse@as64511.example.net");
    assert!(
        t0_sys + b >= due_b,
        "B arrived {b:?} after t0, before it was due ({:?} after t0)",
        due_b.duration_since(t0_sys).unwrap_or_default()
    );
    assert!(b >= Duration::from_millis(7900), "{b:?}");
    // ONE mail per group, with all its events, and nothing more later.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mails = env.sink.messages();
    assert_eq!(mails.len(), 2, "{}", svc.log_text());
    for (m, ips) in mails
        .iter()
        .zip([["192.0.2.1", "192.0.2.2"], ["198.51.100.1", "198.51.100.2"]])
    {
        let text = m.text();
        for ip in ips {
            assert!(text.contains(&format!("\"{ip}\"")), "{ip} in {text}");
        }
    }
    assert_eq!(env.sent_tickets().await.len(), 2);
    assert_eq!(env.pending_count().await, 0);
    let log = svc.log_text();
    assert!(log.contains("younger than 15m"), "{log}");
    assert!(log.contains("younger than 2h"), "{log}");
    svc.stop();
}

/// mailgend's CPU seconds so far (user + system, from /proc).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    let hz: f64 = String::from_utf8(
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .parse()
    .unwrap();
    ticks / hz
}

/// A backlog longer than the sweep interval, every worker stuck on a relay
/// that accepts connections and never answers: the loop waits for the
/// workers instead of spinning. (The sweep instant, once past, made the
/// loop's `sleep_until` ready at once while the queue was not empty, so
/// it turned without rest: a core busy for as long as the backlog lasted,
/// and for hours in an instance whose database had gone.)
#[tokio::test]
async fn a_backlog_behind_a_stalled_relay_does_not_spin() {
    let mut env = TestEnv::new().await;
    service_env(&mut env, 2);
    env.config_json["mailgend"]["sweep_interval"] = json!(1);
    let stalled = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    env.config_json["smtp"]["port"] = json!(stalled.local_addr().unwrap().port());
    env.config_json["smtp"]["timeout"] = json!(120);
    feed(&env, 300, 11).await;
    let svc = ServiceProcess::start(&env, "run");
    // Past the first sweep instant, both workers waiting on the relay.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pid = svc.child.id();
    let before = cpu_seconds(pid);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let used = cpu_seconds(pid) - before;
    assert!(
        used < 1.0,
        "{used:.2} CPU seconds in 5 s while waiting on a stalled relay:\n{}",
        svc.log_text()
    );
    drop(stalled);
}
