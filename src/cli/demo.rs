//! `mailgend demo`: the whole data path on a throw-away installation.
//!
//! Brings up a private PostgreSQL cluster and a recording SMTP receiver
//! (see [`crate::sandbox`]), creates IntelMQ's `events` table, runs
//! `db migrate`, makes a fresh signing key in a throw-away GnuPG home (as a
//! CERT would configure `gnupg_home`), inserts realistic events through the
//! real trigger, runs one `send --all` with signing on, checks one mail's
//! signature with `gpg --verify`, prints a summary and tears down everything
//! but the Maildir holding the mails.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use chrono::{Duration, Utc};
use serde_json::json;

use crate::config::Config;
use crate::notify::pipeline::{self, Pipeline, RunOptions};
use crate::sandbox::{self, ExtraType, FeedParams, PgCluster, SinkOptions, SmtpSink};

/// Where the shipped formats and templates are (the demo runs from the
/// source tree: `cargo run --release -- demo`).
fn shipped(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

pub async fn run(events: usize, maildir: Option<PathBuf>) -> anyhow::Result<()> {
    let started = Instant::now();
    let work = tempfile::Builder::new()
        .prefix("mailgend-demo-")
        .tempdir()
        .context("creating a work directory")?;
    let maildir = maildir.unwrap_or_else(|| {
        std::env::temp_dir().join(format!(
            "mailgend-demo-mail-{}",
            Utc::now().format("%Y%m%d-%H%M%S")
        ))
    });

    println!("==> starting a private PostgreSQL 15 cluster");
    let cluster = tokio::task::spawn_blocking(PgCluster::start_temp)
        .await?
        .context("starting PostgreSQL (are the PostgreSQL 15 server binaries installed?)")?;
    let db = cluster.create_database_async().await?;
    db.create_events_table(ExtraType::Jsonb).await?;
    let mut client = db.connect().await?;
    let report = crate::notify::db::migrate::migrate(&mut client).await?;
    println!(
        "    database {:?} on port {}; applied {} migrations",
        db.name,
        db.port,
        report.applied.len()
    );

    println!("==> starting an SMTP receiver that writes a Maildir");
    let sink = SmtpSink::start_with(SinkOptions {
        maildir: Some(maildir.clone()),
        ..SinkOptions::default()
    });
    println!("    listening on {}", sink.addr());

    println!("==> creating a throw-away RSA-3072 signing key in a GnuPG home");
    let gnupg_home = work.path().join("gnupghome");
    let fingerprint = make_gpg_key(&gnupg_home)?;
    println!("    key {fingerprint}");

    println!("==> inserting {events} IntelMQ events through the directive trigger");
    let params = FeedParams {
        events,
        recipients: 40,
        asns: 120,
        seed: 2026,
        time_observation: Utc::now() - Duration::hours(6),
        ..FeedParams::default()
    };
    let feed = sandbox::Feed::new(params)?;
    let inserted = sandbox::feed::insert(&client, feed.events(), 500).await?;
    // The shipped formats wait until the newest directive of a group is
    // 15 minutes old (IntelMQ may still be adding to it); pretend the feed
    // arrived an hour ago so that the demo has mail to send now.
    client
        .execute(
            "UPDATE directives SET inserted_at = inserted_at - interval '1 hour'",
            &[],
        )
        .await?;
    let directives: i64 = client
        .query_one("SELECT count(*) FROM directives", &[])
        .await?
        .get(0);
    println!("    {inserted} events, {directives} directives");

    let config_json = json!({
        "database": {"event": {"name": db.name, "username": db.superuser,
                               "host": db.host, "port": db.port}},
        "template_dir": shipped("config/templates"),
        "script_directory": shipped("config/formats"),
        "sender": "CERT Demo <cert@example.org>",
        "smtp": {"host": "127.0.0.1", "port": sink.port()},
        "openpgp": {"always_sign": true, "gnupg_home": gnupg_home,
                    "signing_key": fingerprint},
        "mailgend": {"workers": 4}
    });
    let config = Config::from_json_str(&config_json.to_string(), "demo.conf")
        .map_err(|e| anyhow::anyhow!("{e}"))?;

    println!("==> mailgend send --all (signing on)");
    let pipeline = Arc::new(Pipeline::load(Arc::new(config))?);
    let run_started = Instant::now();
    let summary = pipeline::run_once(pipeline, RunOptions::default()).await?;
    let secs = run_started.elapsed().as_secs_f64();
    println!("    {summary}");
    println!(
        "    {:.2} s, {:.0} mails/s",
        secs,
        summary.sent as f64 / secs.max(1e-9)
    );

    let mails = sink.wait_for(summary.sent, std::time::Duration::from_secs(5));
    let tickets: i64 = client
        .query_one("SELECT count(*) FROM sent", &[])
        .await?
        .get(0);
    let pending: i64 = client
        .query_one("SELECT count(*) FROM directives WHERE sent_id IS NULL", &[])
        .await?
        .get(0);
    println!(
        "    SMTP receiver got {} mails; {tickets} tickets recorded; {pending} directives pending",
        mails.len()
    );

    if let Some(first) = mails.first() {
        println!("==> one of them:");
        let text = first.text();
        for line in text.lines().take(12) {
            println!("    | {line}");
        }
        println!("    | …");
        match verify_with_gpg(&gnupg_home, &first.data) {
            Ok(line) => println!("    gpg --verify: {line}"),
            Err(e) => println!("    gpg --verify FAILED: {e:#}"),
        }
    }

    println!("==> tearing down PostgreSQL and the SMTP receiver");
    drop(client);
    drop(sink);
    drop(db);
    tokio::task::spawn_blocking(move || drop(cluster)).await?;
    println!(
        "done in {:.1} s. The mails are in the Maildir {} (read them with: mutt -f {})",
        started.elapsed().as_secs_f64(),
        maildir.display(),
        maildir.display()
    );
    Ok(())
}

/// Creates an unprotected RSA-3072 signing key, the way a CERT prepares
/// `gnupg_home` for intelmq-mailgen; returns its fingerprint.
fn make_gpg_key(home: &Path) -> anyhow::Result<String> {
    std::fs::create_dir_all(home)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(home, std::fs::Permissions::from_mode(0o700))?;
    }
    let status = Command::new("gpg")
        .arg("--homedir")
        .arg(home)
        .args([
            "--batch",
            "--quiet",
            "--passphrase",
            "",
            "--quick-gen-key",
            "CERT Demo <cert@example.org>",
            "rsa3072",
            "sign",
            "1d",
        ])
        .status()
        .context("running gpg (is gnupg installed?)")?;
    if !status.success() {
        bail!("gpg --quick-gen-key failed: {status}");
    }
    let out = Command::new("gpg")
        .arg("--homedir")
        .arg(home)
        .args(["--batch", "--with-colons", "--list-secret-keys"])
        .output()?;
    let listing = String::from_utf8_lossy(&out.stdout);
    listing
        .lines()
        .find_map(|l| {
            l.strip_prefix("fpr:")
                .map(|r| r.trim_matches(':').to_string())
        })
        .context("no fingerprint in gpg's listing")
}

/// Splits a multipart/signed mail into the signed bytes and the signature
/// and asks gpg to verify them.
fn verify_with_gpg(home: &Path, raw: &[u8]) -> anyhow::Result<String> {
    let text = String::from_utf8_lossy(raw);
    let boundary = text
        .split("boundary=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .context("no multipart boundary (mail not signed?)")?;
    let delim = format!("--{boundary}\r\n");
    let mut parts = text.split(delim.as_str()).skip(1);
    let signed = parts.next().context("no signed part")?;
    let signed = signed.strip_suffix("\r\n").unwrap_or(signed);
    let sig_part = parts.next().context("no signature part")?;
    let sig = sig_part
        .split_once("\r\n\r\n")
        .map(|(_, body)| body)
        .context("no signature body")?
        .split(&format!("\r\n--{boundary}--"))
        .next()
        .unwrap_or("");
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("data"), signed.as_bytes())?;
    std::fs::write(dir.path().join("sig.asc"), sig.as_bytes())?;
    let out = Command::new("gpg")
        .arg("--homedir")
        .arg(home)
        .args(["--batch", "--verify"])
        .arg(dir.path().join("sig.asc"))
        .arg(dir.path().join("data"))
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("{stderr}");
    }
    Ok(stderr
        .lines()
        .find(|l| l.contains("Good signature"))
        .unwrap_or("ok")
        .trim()
        .to_string())
}
