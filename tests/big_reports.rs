//! Issue 19, item 1: a group whose mail is over the relay's size limit
//! arrives compressed or split (as its format says), or fails with a clear
//! reason; never is a mail over the limit offered to SMTP.
//!
//! The relay is the sandbox SMTP sink announcing `SIZE` and refusing
//! bigger mails with 552, so a mail over the limit would show up as a
//! refusal, not as a received mail.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use common::{directive, TestEnv};
use mailgend::sandbox::{SinkOptions, SmtpSink};
use serde_json::json;

/// Postfix's default `message_size_limit`.
const POSTFIX_LIMIT: usize = 10_240_000;

/// Points `env` at a new sink that announces `SIZE max_size`.
fn sink_with_limit(env: &mut TestEnv, max_size: usize) {
    env.sink = SmtpSink::start_with(SinkOptions {
        max_size,
        ..SinkOptions::default()
    });
    env.config_json["smtp"]["port"] = json!(env.sink.port());
}

/// Inserts `n` Open-Redis events of AS64496 (one group) in one statement;
/// the row trigger makes their directives. Sources from 2001:db8::/32.
async fn insert_group(env: &TestEnv, n: i32, asn: i64) {
    let d = directive(&format!("abuse@as{asn}.example.net"), "Open-Redis", asn);
    env.client()
        .await
        .execute(
            "INSERT INTO events (\"source.ip\", \"source.asn\", \"time.source\", \
                 \"time.observation\", \"feed.name\", \"classification.type\", \
                 \"classification.taxonomy\", \"classification.identifier\", \
                 \"protocol.transport\", \"source.port\", extra) \
             SELECT '2001:db8::'::inet + g, $3, \
                    '2024-05-01T05:12:13+00:00'::timestamptz - make_interval(secs => g % 3600), \
                    '2024-05-01T06:00:00+00:00', 'Open-Redis', 'vulnerable-system', \
                    'vulnerable', 'open-redis', 'tcp', 6379, \
                    jsonb_build_object('redis_version', '6.2.' || (g % 20), \
                        'certbund', jsonb_build_object('source_directives', $1::text::jsonb)) \
               FROM generate_series(1, $2) g",
            &[&json!([d]).to_string(), &n, &(asn as i32)],
        )
        .await
        .expect("insert events");
}

/// The (filename, decoded body) of every leaf part of a mail.
fn leaves(raw: &[u8]) -> Vec<(Option<String>, Vec<u8>)> {
    fn walk(p: &mailparse::ParsedMail, out: &mut Vec<(Option<String>, Vec<u8>)>) {
        if p.subparts.is_empty() {
            let name = p.get_content_disposition().params.get("filename").cloned();
            out.push((name, p.get_body_raw().unwrap()));
        } else {
            for s in &p.subparts {
                walk(s, out);
            }
        }
    }
    let parsed = mailparse::parse_mail(raw).unwrap();
    let mut out = Vec::new();
    walk(&parsed, &mut out);
    out
}

/// Opens a zip with Python's zipfile and returns its member names and the
/// text of `events.csv`.
fn unzip_with_python(zip: &[u8]) -> (Vec<String>, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("events.zip");
    std::fs::write(&path, zip).unwrap();
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import sys, zipfile\n\
             z = zipfile.ZipFile(sys.argv[1])\n\
             assert z.testzip() is None\n\
             sys.stdout.write('\\t'.join(z.namelist()) + '\\n')\n\
             sys.stdout.write(z.read('events.csv').decode('utf-8'))\n",
        ])
        .arg(&path)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "python3 zipfile: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let (names, csv) = text.split_once('\n').unwrap();
    (
        names.split('\t').map(str::to_string).collect(),
        csv.to_string(),
    )
}

/// The source IPs the CSV lists (column `ip`), and its number of rows.
fn csv_ips(csv: &str) -> (BTreeSet<String>, usize) {
    let mut lines = csv.lines();
    let titles: Vec<&str> = lines.next().unwrap().split(',').collect();
    let ip = titles
        .iter()
        .position(|t| *t == "\"ip\"")
        .expect("ip column");
    let mut ips = BTreeSet::new();
    let mut rows = 0;
    for l in lines {
        rows += 1;
        ips.insert(l.split(',').nth(ip).unwrap().trim_matches('"').to_string());
    }
    (ips, rows)
}

/// The distinct tickets the directives of the events with these sources
/// are marked with.
async fn tickets_of(env: &TestEnv, ips: &BTreeSet<String>) -> BTreeSet<String> {
    let ips: Vec<&String> = ips.iter().collect();
    env.client()
        .await
        .query(
            "SELECT DISTINCT s.intelmq_ticket FROM events e \
               JOIN directives d ON d.events_id = e.id JOIN sent s ON s.id = d.sent_id \
              WHERE host(e.\"source.ip\") = ANY($1)",
            &[&ips],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn event_ips(env: &TestEnv) -> BTreeSet<String> {
    env.client()
        .await
        .query("SELECT host(\"source.ip\") FROM events", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// directive id → ticket, for every directive.
async fn marks(env: &TestEnv) -> HashMap<i64, Option<String>> {
    env.client()
        .await
        .query(
            "SELECT d.id, s.intelmq_ticket FROM directives d LEFT JOIN sent s ON s.id = d.sent_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

const EVENTS: i32 = 200_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200k_event_group_arrives_zipped_and_signed_under_a_10mb_limit() {
    let mut env = TestEnv::new().await;
    env.enable_signing();
    sink_with_limit(&mut env, POSTFIX_LIMIT);
    let t0 = Instant::now();
    insert_group(&env, EVENTS, 64496).await;
    eprintln!("inserted {EVENTS} events in {:.1?}", t0.elapsed());

    let started = Instant::now();
    let summary = env.run().await;
    let took = started.elapsed();
    assert_eq!(summary.to_string(), "1 mails sent, 0 postponed, 0 errors.");
    let mails = env.sink.wait_for(1, Duration::from_secs(30));
    assert_eq!(mails.len(), 1);
    let mail = &mails[0];
    // The check is on the signed bytes, as the relay counts them.
    assert!(
        mail.data.len() <= POSTFIX_LIMIT,
        "{} bytes",
        mail.data.len()
    );
    let text = mail.text();
    assert!(text.contains("Content-Type: multipart/signed"));

    let parts = leaves(&mail.data);
    let zip = parts
        .iter()
        .find(|(name, _)| name.as_deref() == Some("events.zip"))
        .map(|(_, body)| body.clone())
        .expect("events.zip attachment");
    assert!(
        !parts
            .iter()
            .any(|(name, _)| name.as_deref() == Some("events.csv")),
        "the CSV goes only zipped"
    );
    let (names, csv) = unzip_with_python(&zip);
    assert_eq!(names, ["events.csv"]);
    let (ips, rows) = csv_ips(&csv);
    assert_eq!(rows, EVENTS as usize);
    assert_eq!(ips, event_ips(&env).await);

    // Every directive marked, with the one ticket the subject names.
    let marks = marks(&env).await;
    assert_eq!(marks.len(), EVENTS as usize);
    let tickets: BTreeSet<&Option<String>> = marks.values().collect();
    assert_eq!(tickets.len(), 1);
    let ticket = marks.values().next().unwrap().clone().expect("marked sent");
    assert!(common::header(&mail.data, "Subject")
        .unwrap()
        .contains(&ticket));
    eprintln!(
        "200k events, compress: signed mail {} bytes (zip {} bytes, CSV {} bytes), run {:.1?}",
        mail.data.len(),
        zip.len(),
        csv.len(),
        took
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200k_event_group_arrives_split_under_a_10mb_limit() {
    let mut env = TestEnv::new().await;
    common::set_oversize(&env, "split");
    sink_with_limit(&mut env, POSTFIX_LIMIT);
    let t0 = Instant::now();
    insert_group(&env, EVENTS, 64496).await;
    eprintln!("inserted {EVENTS} events in {:.1?}", t0.elapsed());

    let started = Instant::now();
    let summary = env.run().await;
    let took = started.elapsed();
    let n = summary.sent;
    assert!(n >= 2, "{summary}");
    assert_eq!(summary.errors, 0, "{summary}");
    let mails = env.sink.wait_for(n, Duration::from_secs(30));
    assert_eq!(mails.len(), n);

    let marks = marks(&env).await;
    assert_eq!(marks.len(), EVENTS as usize);
    assert!(
        marks.values().all(Option::is_some),
        "every directive marked"
    );
    let mut all_ips = BTreeSet::new();
    let mut all_rows = 0;
    let mut seen_parts = BTreeSet::new();
    let mut tickets = BTreeSet::new();
    for mail in &mails {
        assert!(
            mail.data.len() <= POSTFIX_LIMIT,
            "{} bytes",
            mail.data.len()
        );
        let subject = common::header(&mail.data, "Subject").unwrap();
        let k = (1..=n)
            .find(|k| subject.ends_with(&format!("(part {k} of {n})")))
            .unwrap_or_else(|| panic!("{subject:?} says which part it is"));
        assert!(seen_parts.insert(k), "part {k} twice");
        let csv = leaves(&mail.data)
            .into_iter()
            .find(|(name, _)| name.as_deref() == Some("events.csv"))
            .map(|(_, body)| String::from_utf8(body).unwrap())
            .expect("an inline CSV over the limit becomes an attachment");
        let body = String::from_utf8(leaves(&mail.data)[0].1.clone()).unwrap();
        assert!(
            body.starts_with(&format!("Part {k} of {n} of this report")),
            "{}",
            &body[..200.min(body.len())]
        );
        let (ips, rows) = csv_ips(&csv);
        all_rows += rows;
        // Each part's events' directives carry that part's ticket.
        let part_tickets = tickets_of(&env, &ips).await;
        assert_eq!(
            part_tickets.len(),
            1,
            "one ticket per part: {part_tickets:?}"
        );
        let ticket = part_tickets.into_iter().next().unwrap();
        assert!(subject.contains(&ticket), "{subject} names {ticket}");
        assert!(tickets.insert(ticket), "a ticket per part");
        all_ips.extend(ips);
    }
    assert_eq!(all_rows, EVENTS as usize, "no event twice");
    assert_eq!(all_ips, event_ips(&env).await, "no event lost");
    eprintln!(
        "200k events, split: {n} parts of {:?} bytes, run {:.1?}",
        mails.iter().map(|m| m.data.len()).collect::<Vec<_>>(),
        took
    );
}

/// The attachment names of a mail.
fn attachment_names(raw: &[u8]) -> Vec<String> {
    leaves(raw)
        .into_iter()
        .filter_map(|(name, _)| name)
        .collect()
}

#[tokio::test]
async fn small_groups_over_the_limit_leave_their_batch_and_arrive_zipped() {
    let mut env = TestEnv::new().await;
    sink_with_limit(&mut env, 3_000);
    // Two groups of 50 events (small enough to be batched, too big for the
    // limit as plain text) and one of a single event.
    insert_group(&env, 50, 64496).await;
    insert_group(&env, 50, 64497).await;
    insert_group(&env, 1, 64498).await;

    let summary = env.run().await;
    assert_eq!(summary.to_string(), "3 mails sent, 0 postponed, 0 errors.");
    let mails = env.sink.wait_for(3, Duration::from_secs(30));
    assert_eq!(mails.len(), 3);
    for m in &mails {
        eprintln!("{:?}: {} bytes", m.rcpt_to, m.data.len());
        assert!(m.data.len() <= 3_000, "{} bytes", m.data.len());
        let names = attachment_names(&m.data);
        if m.rcpt_to == ["abuse@as64498.example.net"] {
            assert!(names.is_empty(), "a mail that fits is unchanged");
        } else {
            assert_eq!(names, ["events.zip"]);
        }
    }
    assert_eq!(env.pending_count().await, 0);
}

#[tokio::test]
async fn oversize_error_keeps_the_group_pending_and_offers_nothing() {
    let mut env = TestEnv::new().await;
    common::set_oversize(&env, "error");
    sink_with_limit(&mut env, 5_000);
    insert_group(&env, 200, 64496).await;

    let summary = env.run().await;
    assert_eq!(summary.to_string(), "0 mails sent, 0 postponed, 1 errors.");
    assert_eq!(env.pending_count().await, 200);
    assert!(env.sink.messages().is_empty());
    let open: i64 = env
        .client()
        .await
        .query_one("SELECT count(*) FROM mailgend.outbox", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(open, 0, "nothing over the limit reaches the outbox");
}

#[tokio::test]
async fn smtp_max_message_size_applies_when_the_relay_announces_no_smaller_size() {
    let mut env = TestEnv::new().await;
    common::set_oversize(&env, "split");
    // The sink announces 50 MB; the configured limit is the smaller one.
    env.config_json["smtp"]["max_message_size"] = json!(20_000);
    insert_group(&env, 600, 64496).await;

    let summary = env.run().await;
    assert_eq!(summary.errors, 0, "{summary}");
    assert!(summary.sent >= 2, "{summary}");
    let mails = env.sink.wait_for(summary.sent, Duration::from_secs(30));
    assert!(mails.iter().all(|m| m.data.len() <= 20_000));
    assert_eq!(env.pending_count().await, 0);
}

#[tokio::test]
async fn split_parts_refused_for_now_are_resent_with_their_tickets() {
    use mailgend::sandbox::{Failure, Fault, Scope, Stage};
    let mut env = TestEnv::new().await;
    common::set_oversize(&env, "split");
    sink_with_limit(&mut env, 20_000);
    insert_group(&env, 600, 64496).await;
    // The first part gets a 4xx at the end of its data: it and the parts
    // after it wait as `retry`.
    env.sink.set_fault(Fault::Fail {
        stage: Stage::DataEnd,
        failure: Failure::Temporary,
        scope: Scope::Next(1),
    });
    let first = env.run().await;
    assert_eq!(first.to_string(), "0 mails sent, 0 postponed, 1 errors.");
    assert_eq!(env.pending_count().await, 600);
    let waiting: Vec<String> = env
        .client()
        .await
        .query(
            "SELECT ticket FROM mailgend.outbox WHERE state = 'retry' ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(waiting.len() >= 2, "{waiting:?}");

    let second = env.run().await;
    assert_eq!(second.sent, waiting.len(), "{second}");
    assert_eq!(env.pending_count().await, 0);
    let mut sent = env.sent_tickets().await;
    sent.sort();
    let mut expected = waiting.clone();
    expected.sort();
    assert_eq!(sent, expected, "each part keeps its ticket");
    // Each event's directive carries exactly one part's ticket; the parts'
    // rows add up to the group.
    let mails = env.sink.wait_for(waiting.len(), Duration::from_secs(30));
    let rows: usize = mails
        .iter()
        .map(|m| {
            let csv = leaves(&m.data)
                .into_iter()
                .find(|(n, _)| n.as_deref() == Some("events.csv"))
                .unwrap()
                .1;
            csv_ips(&String::from_utf8(csv).unwrap()).1
        })
        .sum();
    assert_eq!(rows, 600);
}
