//! Sameness with the real engine: intelmq-mailgen's `intelmqcbmail --all`
//! (intelmqmail 1.4.0 from PyPI, made by `.ci/reference-venv`) and
//! `mailgend send --all` on two clones of one database (`CREATE DATABASE
//! ... TEMPLATE`), both signing with one key of one GnuPG home (no
//! gpg.conf), each sending to its own SMTP receiver.
//!
//! intelmqcbmail runs the Python format scripts of
//! `tests/fixtures/sameness/scripts/`, mailgend the TOML files of
//! `tests/fixtures/sameness/formats/` that mean the same; both use the
//! templates of `tests/fixtures/sameness/templates/`. The data covers
//! grouping, aggregate variables, the interval and both ages, CSV inline and
//! attached, constituency copies, every placeholder kind, non-ASCII data
//! and several groups per recipient.
//!
//! Every mail is compared after normalising only ticket numbers, Date,
//! Message-Id, MIME boundaries and signature bytes: envelope, headers
//! (decoded, in order), the MIME tree, decoded text, CSV cell by cell,
//! attachments, and for mails without an allowed difference the encoded
//! bytes of every part; every signature of both tools must pass `gpg
//! --verify`; then the end state of `sent` and `directives`. The only differences
//! allowed are spec §11's deliberate fixes, each by name ([`Allowance`]),
//! and each listed in docs/migration.md. The counts go to stdout.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{repo_path, TestEnv};
use mailgend::sandbox::{ReceivedMail, SmtpSink};
use serde_json::{json, Value};

fn fixtures() -> PathBuf {
    repo_path("tests/fixtures/sameness")
}

/// `.ci/reference-venv` (idempotent): the path of `intelmqcbmail`.
fn reference_intelmqcbmail() -> PathBuf {
    let out = Command::new(repo_path(".ci/reference-venv"))
        .output()
        .expect("run .ci/reference-venv");
    assert!(
        out.status.success(),
        ".ci/reference-venv failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or("")
        .trim()
        .to_string();
    assert!(Path::new(&path).is_file(), "no intelmqcbmail at {path:?}");
    PathBuf::from(path)
}

/// An unprotected RSA-3072 key in a fresh GnuPG home without gpg.conf (as
/// a CERT prepares `gnupg_home`); returns its fingerprint.
fn make_key(home: &Path) -> String {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(home).unwrap();
    std::fs::set_permissions(home, std::fs::Permissions::from_mode(0o700)).unwrap();
    let status = Command::new("gpg")
        .arg("--homedir")
        .arg(home)
        .args(["--batch", "--quiet", "--passphrase", ""])
        .args([
            "--quick-gen-key",
            "Test CERT <cert@example.org>",
            "rsa3072",
            "sign",
            "1d",
        ])
        .status()
        .expect("gpg");
    assert!(status.success());
    let out = Command::new("gpg")
        .arg("--homedir")
        .arg(home)
        .args(["--batch", "--with-colons", "--list-secret-keys"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| {
            l.strip_prefix("fpr:")
                .map(|r| r.trim_matches(':').to_string())
        })
        .expect("fingerprint")
}

/// `gpg --verify` of a multipart/signed mail: the first part's exact
/// bytes against the detached signature of the second.
fn gpg_verify(home: &Path, raw: &[u8]) -> Result<(), String> {
    let text = String::from_utf8_lossy(raw);
    let boundary = text
        .split("boundary=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .ok_or("no boundary")?;
    let delim = format!("\r\n--{boundary}\r\n");
    let first = text
        .find(&format!("--{boundary}\r\n"))
        .ok_or("no first part")?
        + boundary.len()
        + 4;
    let rest = &text[first..];
    let end = rest.find(&delim).ok_or("no second part")?;
    let signed = &rest[..end];
    let sig_part = &rest[end + delim.len()..];
    let sig = sig_part
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .ok_or("no signature body")?
        .split(&format!("\r\n--{boundary}--"))
        .next()
        .unwrap_or("");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("data"), signed.as_bytes()).unwrap();
    std::fs::write(dir.path().join("sig.asc"), sig.as_bytes()).unwrap();
    let out = Command::new("gpg")
        .arg("--homedir")
        .arg(home)
        .args(["--batch", "--verify"])
        .arg(dir.path().join("sig.asc"))
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

// ---------------------------------------------------------------------------
// The data.

struct Setup {
    /// Groups pending before the runs (the unit the tools decide on).
    groups: usize,
}

fn ev(ip: &str, asn: i64, extra: Value) -> Value {
    json!({
        "source.ip": ip,
        "source.asn": asn,
        "source.port": 6379,
        "time.source": "2024-05-01T05:00:00+00:00",
        "destination.ip": "203.0.113.9",
        "destination.port": 80,
        "destination.fqdn": "c2.example",
        "protocol.transport": "tcp",
        "classification.identifier": "redis",
        "classification.type": "vulnerable-service",
        "source.reverse_dns": "host.example",
        "feed.name": "test",
        "extra": extra,
    })
}

#[allow(clippy::too_many_arguments)]
fn dir(rcpt: &str, template: &str, nf: &str, edf: &str, interval: i64, agg: Value) -> Value {
    json!({
        "medium": "email", "recipient_address": rcpt, "template_name": template,
        "notification_format": nf, "event_data_format": edf,
        "notification_interval": interval, "aggregate_identifier": agg,
    })
}

/// Inserts the events; directives are back-dated by `age_secs`.
async fn insert(env: &TestEnv, fields: Value, d: Value, age_secs: f64) -> i64 {
    env.insert_event_aged(fields, json!([d]), age_secs).await
}

/// Marks the directives of `event` sent `ago_secs` ago with `ticket` (a
/// mail of the past, for the interval rules).
async fn mark_sent_before(env: &TestEnv, event: i64, ticket: &str, ago_secs: f64) {
    let c = env.client().await;
    c.execute(
        "WITH s AS (INSERT INTO sent (intelmq_ticket, sent_at) \
                    VALUES ($1, now() - make_interval(secs => $3::float8)) RETURNING id) \
         UPDATE directives SET sent_id = (SELECT id FROM s), \
                inserted_at = now() - make_interval(secs => $3::float8 + 60) \
          WHERE events_id = $2",
        &[&ticket, &event, &ago_secs],
    )
    .await
    .unwrap();
}

async fn populate(env: &TestEnv) -> Setup {
    let now = chrono::Utc::now();
    let obs = |ago_min: i64| {
        (now - chrono::Duration::minutes(ago_min))
            .format("%Y-%m-%dT%H:%M:%S+00:00")
            .to_string()
    };
    let hour = 3600.0;
    let old_obs = obs(180);
    // Scans (10_scans.py / 10scans.toml): both ages.
    let redis = |rcpt: &str, asn: i64, o: &str, group: Option<&str>| {
        let mut agg = json!({"source.asn": asn, "time.observation": o});
        if let Some(g) = group {
            agg["recipient_group"] = json!(g);
        }
        dir(rcpt, "scan-redis", "scan", "csv_redis", 86400, agg)
    };
    // 1: three events, one recipient, a Water copy; 2: same recipient,
    // another ASN (several groups per recipient).
    for (i, ip) in ["192.0.2.1", "192.0.2.2", "192.0.2.3"].iter().enumerate() {
        let extra = json!({"redis_version": format!("7.{i}.1"), "note": "x"});
        insert(
            env,
            ev(ip, 64496, extra),
            redis("abuse@a.example", 64496, &old_obs, Some("Water")),
            hour,
        )
        .await;
    }
    for ip in ["192.0.2.9", "192.0.2.10"] {
        let extra = json!({"redis_version": 6.20});
        insert(
            env,
            ev(ip, 64497, extra),
            redis("abuse@a.example", 64497, &old_obs, None),
            hour,
        )
        .await;
    }
    // 3: newest directive 10 min old: waits (directive age).
    insert(
        env,
        ev("198.51.100.1", 64498, json!({})),
        redis("abuse@b.example", 64498, &old_obs, None),
        hour,
    )
    .await;
    insert(
        env,
        ev("198.51.100.2", 64498, json!({})),
        redis("abuse@b.example", 64498, &old_obs, None),
        600.0,
    )
    .await;
    // 4: observed 90 min ago: waits (observation age).
    insert(
        env,
        ev("198.51.100.3", 64499, json!({})),
        redis("abuse@b.example", 64499, &obs(90), None),
        hour,
    )
    .await;
    // 5: the service table: non-ASCII data, JSON scalars of every kind.
    let svc = dir(
        "kontakt@c.example",
        "scan-service",
        "scan",
        "csv_service",
        86400,
        json!({"source.asn": 64500, "time.observation": old_obs}),
    );
    let mut e = ev(
        "192.0.2.50",
        64500,
        json!({"name": "Zählwerk \"Süd\", Halle 3", "open": true, "score": 1.5e3}),
    );
    e["source.reverse_dns"] = json!("münchen.example");
    insert(env, e, svc.clone(), hour).await;
    let mut e = ev(
        "192.0.2.51",
        64500,
        json!({"name": "line1\nline2 🙂", "open": false, "score": 42}),
    );
    e["source.port"] = Value::Null;
    e["time.source"] = json!("2024-05-01T05:30:00.250000+00:00");
    insert(env, e, svc, hour).await;

    // Infections (11_infections.py / 11infections.toml): the interval.
    let inf = |rcpt: &str, edf: &str, asn: i64, group: &str| {
        dir(
            rcpt,
            "infection",
            "infection",
            edf,
            86400,
            json!({"source.asn": asn, "recipient_group": group}),
        )
    };
    // 6: attached, with Energy copies (two envelope recipients).
    for ip in ["192.0.2.60", "192.0.2.61"] {
        insert(
            env,
            ev(ip, 64501, json!({})),
            inf("abuse@a.example", "inf_csv_attachment", 64501, "Energy"),
            hour,
        )
        .await;
    }
    // 7: mailed an hour ago, interval one day: waits.
    let past = insert(
        env,
        ev("192.0.2.70", 64502, json!({})),
        inf("abuse@d.example", "inf_csv_inline", 64502, "Health"),
        hour,
    )
    .await;
    mark_sent_before(env, past, "20240101-10000001", hour).await;
    insert(
        env,
        ev("192.0.2.71", 64502, json!({})),
        inf("abuse@d.example", "inf_csv_inline", 64502, "Health"),
        hour,
    )
    .await;
    // 8: mailed two days ago: goes, inline.
    let past = insert(
        env,
        ev("192.0.2.80", 64503, json!({})),
        inf("abuse@d.example", "inf_csv_inline", 64503, "Health"),
        hour,
    )
    .await;
    mark_sent_before(env, past, "20240101-10000002", 48.0 * hour).await;
    insert(
        env,
        ev("192.0.2.81", 64503, json!({})),
        inf("abuse@d.example", "inf_csv_inline", 64503, "Health"),
        hour,
    )
    .await;
    // 9: a data format 11 does not take: interval over, so the fallback.
    insert(
        env,
        ev("192.0.2.90", 64504, json!({})),
        inf("abuse@d.example", "infection", 64504, "Health"),
        hour,
    )
    .await;

    // Fallback (99_fallback.py / 99fallback.toml).
    // 10: never mailed: goes.
    for ip in ["192.0.2.100", "192.0.2.101"] {
        insert(
            env,
            ev(ip, 64505, json!({})),
            dir(
                "abuse@e.example",
                "none",
                "other",
                "other",
                3600,
                json!({"source.asn": 64505}),
            ),
            hour,
        )
        .await;
    }
    // 11: mailed 30 min ago, interval 1 h: waits; 12: the same group of
    // Water (copies) mailed 2 h ago: goes, with its copy.
    let d11 = dir(
        "abuse@e.example",
        "none",
        "other",
        "other",
        3600,
        json!({"source.asn": 64506}),
    );
    let past = insert(env, ev("192.0.2.110", 64506, json!({})), d11.clone(), hour).await;
    mark_sent_before(env, past, "20240101-10000003", 1800.0).await;
    insert(env, ev("192.0.2.111", 64506, json!({})), d11, hour).await;
    let d12 = dir(
        "abuse@e.example",
        "none",
        "other",
        "other",
        3600,
        json!({"cidr": "192.0.2.0/24", "recipient_group": "Water"}),
    );
    let past = insert(env, ev("192.0.2.120", 64507, json!({})), d12.clone(), hour).await;
    mark_sent_before(env, past, "20240101-10000004", 2.0 * hour).await;
    insert(env, ev("192.0.2.121", 64507, json!({})), d12, hour).await;

    // Copies whose data location differs from the main mail's: 13, a scan
    // (inline) of Energy, whose copies are attached; 14, an attached
    // infection of Water, whose copy is inline.
    insert(
        env,
        ev("192.0.2.130", 64508, json!({"redis_version": "5"})),
        redis("abuse@f.example", 64508, &old_obs, Some("Energy")),
        hour,
    )
    .await;
    insert(
        env,
        ev("192.0.2.140", 64509, json!({})),
        inf("abuse@f.example", "inf_csv_attachment", 64509, "Water"),
        hour,
    )
    .await;

    // 15: X-ARF, two events (21_xarf.py / 21xarf.toml).
    let xarf = dir(
        "abuse@g.example",
        "xarf-description-template",
        "xarf",
        "bot-infection_0.2.0_unstable",
        0,
        json!({"source.asn": 64510}),
    );
    for ip in ["192.0.2.150", "192.0.2.151"] {
        let mut e = ev(ip, 64510, json!({}));
        e["malware.name"] = json!("mirai");
        insert(env, e, xarf.clone(), hour).await;
    }

    let groups: i64 = env
        .client()
        .await
        .query_one(
            "SELECT count(*) FROM (SELECT 1 FROM directives WHERE sent_id IS NULL \
             GROUP BY recipient_address, template_name, notification_format, \
                      event_data_format, aggregate_identifier) g",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    Setup {
        groups: groups as usize,
    }
}

// ---------------------------------------------------------------------------
// Clones and runs.

async fn admin(env: &TestEnv) -> tokio_postgres::Client {
    let mut cfg = env.db.pg_config();
    cfg.dbname("postgres");
    let (client, conn) = cfg.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client
}

/// `CREATE DATABASE clone TEMPLATE source` (retried while the source's last
/// connections close).
async fn clone_db(env: &TestEnv, clone: &str) {
    let a = admin(env).await;
    let sql = format!("CREATE DATABASE \"{clone}\" TEMPLATE \"{}\"", env.db.name);
    for attempt in 0.. {
        match a.batch_execute(&sql).await {
            Ok(()) => return,
            Err(e) if attempt < 50 => {
                let _ = e;
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{sql}: {e}"),
        }
    }
}

async fn drop_db(env: &TestEnv, name: &str) {
    let _ = admin(env)
        .await
        .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .await;
}

async fn connect_to(env: &TestEnv, name: &str) -> tokio_postgres::Client {
    let mut cfg = env.db.pg_config();
    cfg.dbname(name);
    let (client, conn) = cfg.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client
}

fn write_config(
    env: &TestEnv,
    file: &str,
    db: &str,
    port: u16,
    gnupg: &Path,
    key: &str,
    scripts: &Path,
) -> PathBuf {
    let config = json!({
        "database": {"event": {"name": db, "username": env.db.superuser, "password": null,
                               "host": env.db.host, "port": env.db.port}},
        "template_dir": fixtures().join("templates"),
        "script_directory": scripts,
        "sender": "Test CERT <cert@example.org>",
        "smtp": {"host": "127.0.0.1", "port": port},
        "openpgp": {"always_sign": true, "gnupg_home": gnupg, "signing_key": key},
        "logging_level": "INFO",
    });
    let path = env.dir.path().join(file);
    std::fs::write(&path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
    path
}

fn run(mut cmd: Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{text}",
        out.status
    );
    text
}

// ---------------------------------------------------------------------------
// Normalisation.

/// The deliberate fixes of spec §11 this test can meet; every difference
/// it allows is one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Allowance {
    /// §11 "Examples 10 and 13 pass `ExtraColumn`'s arguments swapped":
    /// the old CSV has the key's name as title and an empty column; ours
    /// the documented title and the value of that key.
    ExtraColumnSwapped,
    /// §11 "The constituency-copy example attaches the data to a copy whose
    /// text says below and inlines it where the text says attached": a
    /// copy's location-dependent texts follow its own data location in
    /// mailgend, the main mail's in the old tool. Compared with both texts
    /// reduced to one location ([`COPY_TEXTS`]).
    CopyTextFollowsDataLocation,
    /// §11 "X-ARF (example 21) never produces a mail in 1.4": the old tool
    /// sends the group the fallback mail under one ticket; mailgend one
    /// X-ARF report mail per event, each under its own ticket. Checked by
    /// [`xarf_pairs`]: the same events, one report per event.
    XarfReportsInsteadOfFallback,
}

/// The X-ARF mails of mailgend and the fallback mails of intelmqcbmail
/// for the same groups, taken out of `olds` and `news`. Returns, per group,
/// (old ticket, new tickets).
fn xarf_pairs(olds: &mut Vec<Norm>, news: &mut Vec<Norm>) -> Vec<(String, Vec<String>)> {
    let (xarf, rest): (Vec<Norm>, Vec<Norm>) = std::mem::take(news)
        .into_iter()
        .partition(|n| n.lines.iter().any(|l| l == "header x-arf: PLAIN"));
    *news = rest;
    // By To header: the events each X-ARF mail reports.
    let mut by_to: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for n in &xarf {
        let to = n
            .lines
            .iter()
            .find_map(|l| l.strip_prefix("header to: "))
            .unwrap()
            .to_string();
        let source = n
            .lines
            .iter()
            .find_map(|l| {
                l.split_once("body| Source: ")
                    .map(|(_, v)| v.trim_matches('"').to_string())
            })
            .unwrap_or_else(|| panic!("no Source in {:#?}", n.lines));
        by_to
            .entry(to)
            .or_default()
            .push((source, n.tickets.iter().next().unwrap().clone()));
    }
    let mut out = Vec::new();
    for (to, reports) in by_to {
        let sources: BTreeSet<&str> = reports.iter().map(|(s, _)| s.as_str()).collect();
        assert_eq!(
            sources.len(),
            reports.len(),
            "one report per event: {reports:?}"
        );
        let i = olds
            .iter()
            .position(|o| {
                o.lines.iter().any(|l| l == &format!("header to: {to}"))
                    && o.key.contains("Subject=Report <ticket>")
                    && sources.iter().all(|s| o.key.contains(&format!("\"{s}\"")))
            })
            .unwrap_or_else(|| {
                panic!("no fallback mail of intelmqcbmail for the X-ARF group to {to}")
            });
        let old = olds.remove(i);
        let rows = old.tables.iter().map(|(_, t)| t.len() - 1).sum::<usize>();
        assert_eq!(
            rows,
            reports.len(),
            "the fallback mail lists the same events"
        );
        let mut tickets: Vec<String> = reports.into_iter().map(|(_, t)| t).collect();
        tickets.sort();
        tickets.dedup();
        out.push((old.tickets.into_iter().next().unwrap(), tickets));
    }
    out
}

/// The location-dependent values of tests/fixtures/sameness/variables.json:
/// (text for inline data, text for attached data); the separators are
/// blanked for attached data.
const COPY_TEXTS: &[(&str, &str)] = &[
    ("below", "in the attached file events.csv"),
    ("unten", "in der angehängten Datei events.csv"),
    ("-----\nAffected systems\n", ""),
    ("-----\nBetroffene Systeme\n", ""),
];

/// `lines` with every run of body text lines rewritten as if the mail's
/// data were attached (see [`Allowance::CopyTextFollowsDataLocation`]).
fn texts_as_attached(lines: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let mut run: Option<(String, Vec<String>)> = None;
    let flush = |run: &mut Option<(String, Vec<String>)>, out: &mut Vec<String>| {
        if let Some((prefix, texts)) = run.take() {
            // Each run ended with a line break (before the CSV block or at
            // the end), which a separator value includes.
            let mut text = texts.join("\n") + "\n";
            for (inline, attached) in COPY_TEXTS {
                text = text.replace(inline, attached);
            }
            let text = text.strip_suffix('\n').unwrap_or(&text);
            out.extend(text.split('\n').map(|l| format!("{prefix}{l}")));
        }
    };
    for l in lines {
        match l.find("body| ") {
            Some(i) => {
                let (prefix, text) = l.split_at(i + 6);
                match &mut run {
                    Some((p, texts)) if p == prefix => texts.push(text.to_string()),
                    _ => {
                        flush(&mut run, &mut out);
                        run = Some((prefix.to_string(), vec![text.to_string()]));
                    }
                }
            }
            None => {
                flush(&mut run, &mut out);
                out.push(l.clone());
            }
        }
    }
    flush(&mut run, &mut out);
    out
}

/// The swapped ExtraColumn calls of scripts/10_scans.py: (the title the old
/// tool writes = the extra key we read, our title).
const SWAPPED_EXTRA_COLUMNS: &[(&str, &str)] = &[("redis_version", "version")];

/// `YYYYMMDD-NNNNNNNN` → `<ticket>`.
fn norm_tickets(s: &str) -> String {
    let re = regex::Regex::new(r"\b\d{8}-\d{8}\b").unwrap();
    re.replace_all(s, "<ticket>").into_owned()
}

fn tickets_in(s: &str) -> Vec<String> {
    let re = regex::Regex::new(r"\b\d{8}-\d{8}\b").unwrap();
    re.find_iter(s).map(|m| m.as_str().to_string()).collect()
}

/// One mail as lines of "path: what", normalised.
#[derive(Debug, Clone)]
struct Norm {
    /// (sorted RCPT TO, To, Subject): pairs the two sides' mails.
    key: String,
    lines: Vec<String>,
    /// CSV tables found (inline blocks and attachments), for the cell by
    /// cell comparison: (where, rows of cells).
    tables: Vec<(String, Vec<Vec<String>>)>,
    tickets: BTreeSet<String>,
    /// A constituency copy: envelope recipients other than the To header.
    is_copy: bool,
    /// The encoded body of every leaf part but the signature.
    raw: Vec<String>,
}

fn header_lines(prefix: &str, headers: &[mailparse::MailHeader], out: &mut Vec<String>) {
    for h in headers {
        let name = h.get_key().to_ascii_lowercase();
        let value = h.get_value();
        let value = match name.as_str() {
            "date" => {
                assert!(mailparse::dateparse(&value).is_ok(), "Date {value:?}");
                "<date>".to_string()
            }
            "message-id" => {
                let domain = value
                    .trim_end_matches('>')
                    .rsplit('@')
                    .next()
                    .unwrap_or("")
                    .to_string();
                format!("<id@{domain}>")
            }
            "content-type" => {
                let ct = mailparse::parse_content_type(&value);
                let params: BTreeMap<_, _> = ct
                    .params
                    .into_iter()
                    .filter(|(k, _)| k != "boundary")
                    .collect();
                format!("{} {params:?}", ct.mimetype)
            }
            _ => norm_tickets(&value),
        };
        out.push(format!("{prefix}header {name}: {value}"));
    }
}

/// Splits a body into text lines and CSV blocks (lines that start with `"`
/// as the quoted-everything CSV does).
fn csv_cells(text: &str) -> Vec<Vec<String>> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(text.as_bytes());
    reader
        .records()
        .map(|r| r.unwrap().iter().map(str::to_string).collect())
        .collect()
}

fn walk(prefix: &str, part: &mailparse::ParsedMail, n: &mut Norm) {
    header_lines(prefix, &part.headers, &mut n.lines);
    let mime = part.ctype.mimetype.as_str();
    if !part.subparts.is_empty() {
        for (i, sub) in part.subparts.iter().enumerate() {
            walk(&format!("{prefix}{i}."), sub, n);
        }
        return;
    }
    if mime == "application/pgp-signature" {
        let body = part.get_body().unwrap();
        assert!(body.contains("-----BEGIN PGP SIGNATURE-----"), "{body}");
        n.lines.push(format!("{prefix}body <signature>"));
        return;
    }
    let body = part.get_body().unwrap();
    n.tickets.extend(tickets_in(&body));
    // The encoded bytes too (quoted-printable line breaks, `From=20`):
    // compared where no allowance applies.
    let raw = match part.get_body_encoded() {
        mailparse::body::Body::Base64(b) | mailparse::body::Body::QuotedPrintable(b) => b.get_raw(),
        mailparse::body::Body::SevenBit(b) | mailparse::body::Body::EightBit(b) => b.get_raw(),
        mailparse::body::Body::Binary(b) => b.get_raw(),
    };
    let raw = String::from_utf8_lossy(raw).into_owned();
    n.raw.push(format!("{prefix}{}", norm_tickets(&raw)));
    if mime == "text/csv" {
        n.tables.push((format!("{prefix}csv"), csv_cells(&body)));
        n.lines
            .push(format!("{prefix}body <csv {}>", n.tables.len() - 1));
        return;
    }
    // The inline CSV: a block of lines starting with `"` (CRLF-ended in
    // the CSV, decoded as the mail gives them).
    let mut block = String::new();
    let flush = |block: &mut String, n: &mut Norm| {
        if !block.is_empty() {
            n.tables
                .push((format!("{prefix}inline-csv"), csv_cells(block)));
            n.lines
                .push(format!("{prefix}body <csv {}>", n.tables.len() - 1));
            block.clear();
        }
    };
    for line in body.split('\n') {
        if line.starts_with('"')
            || (!block.is_empty() && !block.ends_with("\r\n") && !block.is_empty() && {
                // a quoted field with a line break continues the record
                block.matches('"').count() % 2 == 1
            })
        {
            block.push_str(line);
            block.push('\n');
        } else {
            flush(&mut block, n);
            n.lines.push(format!(
                "{prefix}body| {}",
                norm_tickets(line.trim_end_matches('\r'))
            ));
        }
    }
    flush(&mut block, n);
}

fn normalise(m: &ReceivedMail) -> Norm {
    let parsed = mailparse::parse_mail(&m.data).expect("parse mail");
    let mut rcpt = m.rcpt_to.clone();
    rcpt.sort();
    let to = parsed
        .headers
        .iter()
        .find(|h| h.get_key().eq_ignore_ascii_case("To"))
        .map(|h| h.get_value())
        .unwrap_or_default();
    let subject = parsed
        .headers
        .iter()
        .find(|h| h.get_key().eq_ignore_ascii_case("Subject"))
        .map(|h| h.get_value())
        .unwrap_or_default();
    let mut n = Norm {
        key: format!("{rcpt:?} To={to} Subject={}", norm_tickets(&subject)),
        lines: vec![format!("envelope from {} to {rcpt:?}", m.mail_from)],
        tables: Vec::new(),
        tickets: tickets_in(&subject).into_iter().collect(),
        is_copy: rcpt != [to.clone()],
        raw: Vec::new(),
    };
    walk("", &parsed, &mut n);
    // Mails of one recipient with the same subject (the fallback's) are
    // told apart by their events.
    let ips: BTreeSet<&str> = n
        .tables
        .iter()
        .flat_map(|(_, rows)| rows.iter().flatten())
        .filter(|c| c.parse::<std::net::Ipv4Addr>().is_ok())
        .map(String::as_str)
        .collect();
    n.key = format!("{} events={ips:?}", n.key);
    n
}

/// Compares a pair; returns the allowances used, or the differences.
fn compare(old: &Norm, new: &Norm) -> Result<Vec<Allowance>, String> {
    let mut used = Vec::new();
    let mut diffs = Vec::new();
    if old.lines != new.lines
        && old.is_copy
        && texts_as_attached(&old.lines) == texts_as_attached(&new.lines)
    {
        used.push(Allowance::CopyTextFollowsDataLocation);
    } else if old.lines != new.lines {
        let width = old.lines.len().max(new.lines.len());
        for i in 0..width {
            let (a, b) = (old.lines.get(i), new.lines.get(i));
            if a != b {
                diffs.push(format!(
                    "  line {i}:\n    intelmqcbmail: {a:?}\n    mailgend:      {b:?}"
                ));
            }
        }
    }
    if old.tables.len() != new.tables.len() {
        diffs.push(format!(
            "  {} CSV tables vs {}",
            old.tables.len(),
            new.tables.len()
        ));
    }
    for ((wa, ta), (wb, tb)) in old.tables.iter().zip(&new.tables) {
        let mut ta = ta.clone();
        // §11 ExtraColumnSwapped: old title = the key, empty cells.
        if let (Some(ha), Some(hb)) = (ta.first().cloned(), tb.first()) {
            for (k, (x, y)) in ha.iter().zip(hb).enumerate() {
                let swapped = SWAPPED_EXTRA_COLUMNS.iter().any(|(o, n)| o == x && n == y);
                if swapped
                    && ta
                        .iter()
                        .skip(1)
                        .all(|r| r.get(k).is_some_and(|c| c.is_empty()))
                {
                    for (r, row) in ta.iter_mut().enumerate() {
                        row[k] = tb[r][k].clone();
                    }
                    used.push(Allowance::ExtraColumnSwapped);
                }
            }
        }
        if ta.len() != tb.len() {
            diffs.push(format!(
                "  {wa}: {} rows vs {wb}: {} rows",
                ta.len(),
                tb.len()
            ));
        }
        for (r, (ra, rb)) in ta.iter().zip(tb).enumerate() {
            if ra.len() != rb.len() {
                diffs.push(format!("  {wa} row {r}: {ra:?} vs {rb:?}"));
                continue;
            }
            for (c, (ca, cb)) in ra.iter().zip(rb).enumerate() {
                if ca != cb {
                    diffs.push(format!("  {wa} row {r} cell {c}: {ca:?} vs {cb:?}"));
                }
            }
        }
    }
    if diffs.is_empty() && used.is_empty() && old.raw != new.raw {
        for (a, b) in old.raw.iter().zip(&new.raw) {
            if a != b {
                diffs.push(format!(
                    "  encoded body:\n    intelmqcbmail: {a:?}\n    mailgend:      {b:?}"
                ));
            }
        }
        if old.raw.len() != new.raw.len() {
            diffs.push("  number of parts".to_string());
        }
    }
    if diffs.is_empty() {
        used.sort();
        used.dedup();
        Ok(used)
    } else {
        Err(diffs.join("\n"))
    }
}

// ---------------------------------------------------------------------------
// End state.

/// directive id → (sent?, ticket), and the number of `sent` rows.
async fn end_state(c: &tokio_postgres::Client) -> (BTreeMap<i64, Option<String>>, i64) {
    let rows = c
        .query(
            "SELECT d.id, s.intelmq_ticket FROM directives d LEFT JOIN sent s ON s.id = d.sent_id ORDER BY d.id",
            &[],
        )
        .await
        .unwrap();
    let map = rows
        .iter()
        .map(|r| (r.get::<_, i64>(0), r.get::<_, Option<String>>(1)))
        .collect();
    let sent: i64 = c
        .query_one("SELECT count(*) FROM sent", &[])
        .await
        .unwrap()
        .get(0);
    (map, sent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mailgend_mails_what_intelmqcbmail_mails() {
    let intelmqcbmail = reference_intelmqcbmail();
    let env = TestEnv::new().await;
    let setup = populate(&env).await;

    let gnupg = env.dir.path().join("gnupg");
    let key = make_key(&gnupg);
    let (ref_db, our_db) = (
        format!("{}_ref", env.db.name),
        format!("{}_ours", env.db.name),
    );
    clone_db(&env, &ref_db).await;
    clone_db(&env, &our_db).await;
    let ref_sink = SmtpSink::start();
    let our_sink = &env.sink;
    let ref_conf = write_config(
        &env,
        "ref.conf",
        &ref_db,
        ref_sink.port(),
        &gnupg,
        &key,
        &fixtures().join("scripts"),
    );
    let our_conf = write_config(
        &env,
        "ours.conf",
        &our_db,
        our_sink.port(),
        &gnupg,
        &key,
        &fixtures().join("formats"),
    );

    let home = env.dir.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let mut cmd = Command::new(&intelmqcbmail);
    cmd.arg("--all")
        .arg("-c")
        .arg(&ref_conf)
        .env("HOME", &home)
        .env("LANG", "C.UTF-8")
        .env("LC_ALL", "C.UTF-8")
        .env("TZ", "UTC");
    let ref_log = run(cmd, "intelmqcbmail --all");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mailgend"));
    cmd.arg("-c")
        .arg(&our_conf)
        .args(["send", "--all"])
        .env("HOME", &home)
        .env("LANG", "C.UTF-8")
        .env("TZ", "UTC");
    let our_log = run(cmd, "mailgend send --all");

    let summary = |log: &str| {
        let re = regex::Regex::new(r"\d+ mails sent, \d+ postponed, \d+ errors\.").unwrap();
        re.find(log)
            .map(|m| m.as_str().to_string())
            .unwrap_or_default()
    };
    // Both sides' signatures are good signatures of the one key.
    for (who, sink) in [("intelmqcbmail", &ref_sink), ("mailgend", our_sink)] {
        for m in sink.messages() {
            if let Err(e) = gpg_verify(&gnupg, &m.data) {
                panic!(
                    "{who}: gpg --verify failed: {e}\n{}",
                    String::from_utf8_lossy(&m.data)
                );
            }
        }
    }
    let mut olds: Vec<Norm> = ref_sink.messages().iter().map(normalise).collect();
    let mut news: Vec<Norm> = our_sink.messages().iter().map(normalise).collect();
    let logs = format!("--- intelmqcbmail:\n{ref_log}\n--- mailgend:\n{our_log}");
    assert!(!olds.is_empty(), "{logs}");
    let (all_old, all_new) = (olds.len(), news.len());
    let xarf = xarf_pairs(&mut olds, &mut news);
    assert_eq!(xarf.len(), 1, "{logs}");
    let xarf_reports: usize = xarf.iter().map(|(_, t)| t.len()).sum();
    // The summaries differ by the extra X-ARF mails only.
    let expect_summary = summary(&ref_log).replacen(
        &format!("{all_old} mails"),
        &format!("{} mails", all_old - xarf.len() + xarf_reports),
        1,
    );
    assert_eq!(expect_summary, summary(&our_log), "{logs}");
    assert_eq!(all_new, all_old - xarf.len() + xarf_reports);

    // Pair the mails and compare.
    let index = |v: &[Norm]| -> HashMap<String, usize> {
        v.iter()
            .enumerate()
            .map(|(i, n)| (n.key.clone(), i))
            .collect()
    };
    let (io, inew) = (index(&olds), index(&news));
    assert_eq!(
        io.len(),
        olds.len(),
        "mail keys must be unique: {:?}",
        olds.iter().map(|n| &n.key).collect::<Vec<_>>()
    );
    let ko: BTreeSet<_> = io.keys().collect();
    let kn: BTreeSet<_> = inew.keys().collect();
    assert_eq!(ko, kn, "different mails\n{logs}");
    let mut identical = 0;
    let mut with_allowed = xarf.len();
    let mut allowed: BTreeMap<Allowance, usize> = BTreeMap::new();
    allowed.insert(Allowance::XarfReportsInsteadOfFallback, xarf.len());
    let mut failures = Vec::new();
    let mut ticket_map: BTreeMap<String, String> = BTreeMap::new();
    for (key, &i) in &io {
        let (a, b) = (&olds[i], &news[inew[key]]);
        match compare(a, b) {
            Ok(used) if used.is_empty() => identical += 1,
            Ok(used) => {
                with_allowed += 1;
                for u in used {
                    *allowed.entry(u).or_default() += 1;
                }
            }
            Err(d) => failures.push(format!("{key}:\n{d}")),
        }
        assert_eq!(a.tickets.len(), 1, "{key}: {:?}", a.tickets);
        assert_eq!(b.tickets.len(), 1, "{key}: {:?}", b.tickets);
        let (ta, tb) = (
            a.tickets.iter().next().unwrap(),
            b.tickets.iter().next().unwrap(),
        );
        if let Some(prev) = ticket_map.insert(ta.clone(), tb.clone()) {
            assert_eq!(&prev, tb, "{key}: ticket {ta} maps to two tickets");
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} mails differ:\n{}\n{logs}",
        failures.len(),
        olds.len(),
        failures.join("\n")
    );

    // The end state: the same directives sent, under corresponding tickets.
    let (so, co) = end_state(&connect_to(&env, &ref_db).await).await;
    let (sn, cn) = end_state(&connect_to(&env, &our_db).await).await;
    assert_eq!(
        co - xarf.len() as i64 + xarf_reports as i64,
        cn,
        "rows in sent"
    );
    assert_eq!(so.len(), sn.len());
    let mut xarf_seen: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (id, old) in &so {
        let new = &sn[id];
        if let Some((t, ts)) = xarf.iter().find(|(t, _)| Some(t) == old.as_ref()) {
            // Each event's directive points at its own report's ticket.
            let n = new
                .as_deref()
                .unwrap_or_else(|| panic!("directive {id} not sent"));
            assert!(
                ts.iter().any(|x| x == n),
                "directive {id}: {n} not an X-ARF ticket"
            );
            assert!(
                xarf_seen.entry(t).or_default().insert(n),
                "directive {id}: ticket {n} twice"
            );
            continue;
        }
        let mapped = old
            .as_ref()
            .map(|t| ticket_map.get(t).cloned().unwrap_or_else(|| t.clone()));
        assert_eq!(&mapped, new, "directive {id}");
    }
    let sent_groups = ticket_map.len();
    drop_db(&env, &ref_db).await;
    drop_db(&env, &our_db).await;

    println!(
        "sameness: intelmqcbmail {} / mailgend {}",
        summary(&ref_log),
        summary(&our_log)
    );
    println!(
        "sameness: {} groups compared ({} mailed, {} left pending by both); {} mails of intelmqcbmail compared: {} identical, {} with allowed differences",
        setup.groups,
        sent_groups + xarf.len(),
        setup.groups - sent_groups - xarf.len(),
        all_old,
        identical,
        with_allowed
    );
    for (a, n) in &allowed {
        let unit = if *a == Allowance::XarfReportsInsteadOfFallback {
            "groups"
        } else {
            "mails"
        };
        println!("sameness: allowed by spec §11 {a:?}: {n} {unit}");
    }
}
