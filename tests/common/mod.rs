//! Test support shared by the integration tests: one fresh database on the
//! run's shared PostgreSQL cluster, IntelMQ's events table, `db migrate`
//! applied, a recording SMTP receiver, and a configuration pointing at
//! both, with copies of the shipped formats and templates that a test may
//! change.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use mailgend::config::Config;
use mailgend::notify::pipeline::{self, Pipeline, RunOptions, Summary};
use mailgend::sandbox::{ExtraType, PgCluster, SmtpSink, TestDb};
use serde_json::{json, Value};
use tokio_postgres::Client;

pub const SENDER: &str = "CERT Example <cert@example.org>";

pub struct TestEnv {
    pub db: TestDb,
    pub sink: SmtpSink,
    pub dir: tempfile::TempDir,
    /// The configuration as JSON; tests tweak it and call `config()`.
    pub config_json: Value,
}

pub struct EnvOptions {
    pub extra: ExtraType,
    pub migrate: bool,
    /// Keep the shipped formats' minimum directive age (15 minutes for
    /// Shadowserver groups, as intelmq-mailgen's example 10 waits). Off by
    /// default: most tests insert an event and expect its mail at once, so
    /// their copy of `10shadowserver.toml` waits only for the observation
    /// age (which the test data's `time.observation` has long passed).
    pub shipped_directive_age: bool,
}

impl Default for EnvOptions {
    fn default() -> Self {
        EnvOptions {
            extra: ExtraType::Jsonb,
            migrate: true,
            shipped_directive_age: false,
        }
    }
}

pub fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

impl TestEnv {
    pub async fn new() -> TestEnv {
        Self::with(EnvOptions::default()).await
    }

    pub async fn with(opts: EnvOptions) -> TestEnv {
        let cluster = PgCluster::shared().expect("shared PostgreSQL cluster");
        let db = cluster
            .create_database_async()
            .await
            .expect("fresh database");
        db.create_events_table(opts.extra)
            .await
            .expect("events table");
        if opts.migrate {
            let mut client = db.connect().await.unwrap();
            mailgend::notify::db::migrate::migrate(&mut client)
                .await
                .expect("db migrate");
        }
        let sink = SmtpSink::start();
        let dir = tempfile::tempdir().unwrap();
        let templates = dir.path().join("templates");
        let formats = dir.path().join("formats");
        copy_dir(&repo_path("config/templates"), &templates);
        copy_dir(&repo_path("config/formats"), &formats);
        if !opts.shipped_directive_age {
            let path = formats.join("10shadowserver.toml");
            let text = std::fs::read_to_string(&path).unwrap();
            let wait = "postpone.min_directive_age = \"15m\"";
            assert!(text.contains(wait), "10shadowserver.toml: {wait} not found");
            std::fs::write(
                &path,
                text.replace(wait, "postpone.min_directive_age = \"0s\""),
            )
            .unwrap();
        }
        let config_json = json!({
            "database": {"event": {
                "name": db.name, "username": db.superuser, "password": null,
                "host": db.host, "port": db.port}},
            "template_dir": templates,
            "script_directory": formats,
            "sender": SENDER,
            "smtp": {"host": "127.0.0.1", "port": sink.port()},
            "openpgp": {"always_sign": false},
            "logging_level": "DEBUG",
            "mailgend": {"workers": 2}
        });
        TestEnv {
            db,
            sink,
            dir,
            config_json,
        }
    }

    pub fn template_dir(&self) -> PathBuf {
        self.dir.path().join("templates")
    }

    pub fn format_dir(&self) -> PathBuf {
        self.dir.path().join("formats")
    }

    pub fn write_template(&self, name: &str, text: &str) {
        std::fs::write(self.template_dir().join(name), text).unwrap();
    }

    pub fn write_format(&self, name: &str, text: &str) {
        std::fs::write(self.format_dir().join(name), text).unwrap();
    }

    /// Replaces the shipped formats by the given files.
    pub fn only_formats(&self, files: &[(&str, &str)]) {
        for entry in std::fs::read_dir(self.format_dir()).unwrap() {
            std::fs::remove_file(entry.unwrap().path()).unwrap();
        }
        for (name, text) in files {
            self.write_format(name, text);
        }
    }

    /// Turns signing on with the committed test key (as a key file).
    pub fn enable_signing(&mut self) {
        self.config_json["openpgp"] = json!({"always_sign": true});
        self.config_json["mailgend"]["signing_key_file"] =
            json!(repo_path("tests/fixtures/keys/test-signing.sec.asc"));
    }

    pub fn config(&self) -> Arc<Config> {
        Arc::new(Config::from_json_str(&self.config_json.to_string(), "test.conf").expect("config"))
    }

    /// Writes the configuration to a file (for tests running the binary).
    pub fn config_file(&self) -> PathBuf {
        let p = self.dir.path().join("intelmq-mailgen.conf");
        std::fs::write(&p, serde_json::to_string_pretty(&self.config_json).unwrap()).unwrap();
        p
    }

    pub async fn client(&self) -> Client {
        self.db.connect().await.expect("connect")
    }

    /// Inserts one event through the real trigger. `fields` maps IntelMQ
    /// column names to JSON values (cast by PostgreSQL to the column types);
    /// `directives` becomes `extra.certbund.source_directives`, merged into
    /// `fields["extra"]` if that is given.
    pub async fn insert_event(&self, fields: Value, directives: Value) -> i64 {
        let (sql, row) = event_insert(fields, directives);
        let client = self.client().await;
        client
            .query_one(sql.as_str(), &[&row])
            .await
            .expect("insert event")
            .get(0)
    }

    /// Like [`insert_event`](Self::insert_event), but in one transaction
    /// with setting the new directives' `inserted_at` to `secs_ago` seconds
    /// before the database's now: a running service (woken at commit) sees
    /// them only with that age, as if IntelMQ had inserted them then.
    pub async fn insert_event_aged(&self, fields: Value, directives: Value, secs_ago: f64) -> i64 {
        let (sql, row) = event_insert(fields, directives);
        let mut client = self.client().await;
        let tx = client.transaction().await.unwrap();
        let id: i64 = tx
            .query_one(sql.as_str(), &[&row])
            .await
            .expect("insert event")
            .get(0);
        tx.execute(
            "UPDATE directives SET inserted_at = now() - make_interval(secs => $2::float8) WHERE events_id = $1",
            &[&id, &secs_ago],
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
        id
    }

    /// Makes every pending directive look `secs` older (the shipped formats
    /// wait for a minimum age before sending).
    pub async fn age_directives(&self, secs: i64) {
        self.client()
            .await
            .execute(
                "UPDATE directives SET inserted_at = inserted_at - make_interval(secs => $1::float8)",
                &[&(secs as f64)],
            )
            .await
            .unwrap();
    }

    pub async fn pipeline(&self) -> Arc<Pipeline> {
        Arc::new(Pipeline::load(self.config()).expect("pipeline"))
    }

    pub async fn run(&self) -> Summary {
        pipeline::run_once(self.pipeline().await, RunOptions::default())
            .await
            .expect("run")
    }

    pub async fn dry_run(&self) -> Summary {
        pipeline::run_once(
            self.pipeline().await,
            RunOptions {
                dry_run: true,
                list_event_ids: false,
            },
        )
        .await
        .expect("dry run")
    }

    pub async fn pending_count(&self) -> i64 {
        self.client()
            .await
            .query_one("SELECT count(*) FROM directives WHERE sent_id IS NULL", &[])
            .await
            .unwrap()
            .get(0)
    }

    pub async fn sent_tickets(&self) -> Vec<String> {
        self.client()
            .await
            .query("SELECT intelmq_ticket FROM sent ORDER BY id", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    pub async fn ticket_seq_last_value(&self) -> (i64, bool) {
        let r = self
            .client()
            .await
            .query_one("SELECT last_value, is_called FROM intelmq_ticket_seq", &[])
            .await
            .unwrap();
        (r.get(0), r.get(1))
    }
}

/// A typical directive for the shipped shadowserver formats.
/// The INSERT for one IntelMQ event row and its JSON parameter: `fields`
/// maps column names to values (cast by PostgreSQL to the column types);
/// `directives` becomes `extra.certbund.source_directives`.
pub fn event_insert(fields: Value, directives: Value) -> (String, String) {
    let mut fields = fields.as_object().cloned().unwrap_or_default();
    let mut extra = fields
        .remove("extra")
        .and_then(|e| e.as_object().cloned())
        .unwrap_or_default();
    extra.insert("certbund".into(), json!({"source_directives": directives}));
    fields.insert("extra".into(), Value::Object(extra));
    let cols: Vec<String> = fields
        .keys()
        .map(|k| format!("\"{}\"", k.replace('"', "\"\"")))
        .collect();
    let sql = format!(
        "INSERT INTO events ({cols}) SELECT {cols} FROM jsonb_populate_record(NULL::events, $1::text::jsonb) RETURNING id",
        cols = cols.join(", ")
    );
    (sql, Value::Object(fields).to_string())
}

pub fn directive(recipient: &str, feed: &str, asn: i64) -> Value {
    json!({
        "medium": "email",
        "recipient_address": recipient,
        "template_name": format!("shadowserver_csv_{feed}"),
        "notification_format": "shadowserver",
        "event_data_format": format!("csv_{feed}"),
        "notification_interval": 86400,
        "aggregate_identifier": {"source.asn": asn, "time.observation": "2024-05-01T06:00:00+00:00"}
    })
}

/// Typical event columns of a Shadowserver scan event.
pub fn event_fields(ip: &str, asn: i64) -> Value {
    json!({
        "source.ip": ip,
        "source.asn": asn,
        "time.source": "2024-05-01T05:12:13.456+00:00",
        "time.observation": "2024-05-01T06:00:00+00:00",
        "feed.name": "Open-Redis",
        "classification.type": "vulnerable-system",
        "classification.taxonomy": "vulnerable",
        "classification.identifier": "open-redis",
        "protocol.transport": "tcp",
        "source.port": 6379
    })
}

/// The unfolded value of header `name` in a raw message.
pub fn header(raw: &[u8], name: &str) -> Option<String> {
    let text = String::from_utf8_lossy(raw);
    let head = text.split("\r\n\r\n").next().unwrap_or("");
    let mut value: Option<String> = None;
    for line in head.split("\r\n") {
        if line.starts_with([' ', '\t']) {
            if let Some(v) = value.as_mut() {
                v.push_str(line);
            }
            continue;
        }
        if value.is_some() {
            break;
        }
        if let Some((n, v)) = line.split_once(':') {
            if n.eq_ignore_ascii_case(name) {
                value = Some(v.trim_start().to_string());
            }
        }
    }
    value
}

/// Decodes a quoted-printable text (for reading bodies in assertions).
pub fn qp_decode(s: &str) -> String {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'=' {
            if i + 2 < b.len() + 1 && b.get(i + 1) == Some(&b'\r') && b.get(i + 2) == Some(&b'\n') {
                i += 3;
                continue;
            }
            if let (Some(h), Some(l)) = (b.get(i + 1), b.get(i + 2)) {
                if let Ok(v) = u8::from_str_radix(&format!("{}{}", *h as char, *l as char), 16) {
                    out.push(v);
                    i += 3;
                    continue;
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).replace("\r\n", "\n")
}

/// A `mailgend run` process of the real binary, its log in a file.
pub struct ServiceProcess {
    pub child: std::process::Child,
    pub log: PathBuf,
}

impl ServiceProcess {
    /// Starts `mailgend -c CONFIG run` and waits until it says it runs.
    pub fn start(env: &TestEnv, name: &str) -> ServiceProcess {
        Self::start_with_config(env, name, &env.config_file())
    }

    pub fn start_with_config(env: &TestEnv, name: &str, config: &Path) -> ServiceProcess {
        let log = env.dir.path().join(format!("{name}.log"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_mailgend"))
            .arg("-c")
            .arg(config)
            .arg("run")
            .env("HOME", env.dir.path())
            .env("MAILGEND_LOG", "mailgend=debug")
            .env_remove("NOTIFY_SOCKET")
            .stdout(std::process::Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn mailgend run");
        let p = ServiceProcess { child, log };
        p.wait_for_log("mailgend running", std::time::Duration::from_secs(20));
        p
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle` (panics with the log after
    /// `timeout`, or if the process died).
    pub fn wait_for_log(&self, needle: &str, timeout: std::time::Duration) {
        let start = std::time::Instant::now();
        loop {
            if self.log_text().contains(needle) {
                return;
            }
            if start.elapsed() > timeout {
                panic!(
                    "no {needle:?} in the log after {timeout:?}:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    pub fn signal(&self, sig: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// SIGTERM and wait; returns the exit code and how long it took.
    pub fn stop(mut self) -> (Option<i32>, std::time::Duration) {
        let start = std::time::Instant::now();
        self.signal("TERM");
        let status = self.child.wait().unwrap();
        (status.code(), start.elapsed())
    }

    /// `kill -9`: no chance to clean up.
    pub fn kill9(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.log_text()
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `f` until it returns true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: std::time::Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = std::time::Instant::now();
    while start.elapsed() < timeout {
        if f().await {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    false
}

/// Sets `oversize` for the shipped Shadowserver formats (inline CSV).
pub fn set_oversize(env: &TestEnv, choice: &str) {
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
