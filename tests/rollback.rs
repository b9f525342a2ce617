//! A rollback to intelmq-mailgen stays possible: the real `intelmqcbmail`
//! of intelmqmail 1.4.0 (PyPI, made by `.ci/reference-venv`, which this
//! test calls itself) starts and completes a run, signed and sent, on
//!
//! - every example configuration mailgend ships
//!   (`config/intelmq-mailgen.conf.example`, the EXAMPLE of
//!   `man/mailgend.conf.5`), and
//! - a file that sets every key docs/config.md lists under "Keys mailgend
//!   adds",
//!
//! with only the values that name this machine's places replaced (the
//! database, directories, SMTP port, GnuPG home and key): no key is added
//! or removed. Each run goes against a throw-away PostgreSQL database with
//! IntelMQ's events table and `db migrate`'s schema, a login role that has
//! only `eventdb_send_notifications` (as docs/operations.md sets it up),
//! and a real SMTP receiver.
//!
//! A negative control shows the test can fail: with `openpgp.key_file`
//! (the spelling mailgend's docs used to recommend) intelmqcbmail 1.4
//! exits CRITICAL (intelmqmail 1.4.0 `intelmqmail/cb.py:441-446`).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{event_fields, repo_path, TestEnv};
use mailgend::config::Config;
use serde_json::{json, Value};

/// The reference `intelmqcbmail`; `.ci/reference-venv` is idempotent and
/// makes the venv when it is missing.
fn intelmqcbmail() -> PathBuf {
    let out = Command::new(repo_path(".ci/reference-venv"))
        .stderr(Stdio::inherit())
        .output()
        .expect("run .ci/reference-venv");
    assert!(
        out.status.success(),
        ".ci/reference-venv failed ({}); it needs python3-venv and python3-gpg",
        out.status
    );
    let path = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    assert!(path.is_file(), "{} missing", path.display());
    path
}

/// A notification script of our own for intelmqcbmail (it needs at least
/// one `NN*.py` in `script_directory`, intelmqmail/script.py:33-60): the
/// events as CSV, in a template of its own, through the documented
/// `ScriptContext.mail_format_as_csv` (intelmqmail/notification.py:268).
const SCRIPT: &str = r#"
from intelmqmail.tableformat import build_table_format
from intelmqmail.templates import Template

FORMAT = build_table_format("rollback", [("source.ip", "address"), ("source.port", "port")])
TEMPLATE = Template.from_strings("[${ticket_number}] rollback check",
                                 "The events:\n\n${events_as_csv}\n")


def create_notifications(context):
    return context.mail_format_as_csv(FORMAT, template=TEMPLATE)
"#;

/// This machine's places for one run: database, role, directories, SMTP
/// receiver, GnuPG home with the test key.
struct Site {
    env: TestEnv,
    role: String,
    password: String,
    gnupg_home: PathBuf,
    fingerprint: String,
    scripts: PathBuf,
}

impl Site {
    async fn new() -> Site {
        let env = TestEnv::new().await;
        let password = "rollback pw".to_string();
        let role = env
            .db
            .create_login_role("rollback", &password)
            .await
            .expect("login role");
        env.client()
            .await
            .batch_execute(&format!("GRANT eventdb_send_notifications TO \"{role}\""))
            .await
            .expect("grant");

        let gnupg_home = env.dir.path().join("gnupghome");
        std::fs::create_dir(&gnupg_home).unwrap();
        std::fs::set_permissions(
            &gnupg_home,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .unwrap();
        let gpg = |args: &[&str]| {
            let out = Command::new("gpg")
                .arg("--homedir")
                .arg(&gnupg_home)
                .args(["--batch", "--no-tty"])
                .args(args)
                .output()
                .expect("run gpg");
            assert!(
                out.status.success(),
                "gpg {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).unwrap()
        };
        let key = repo_path("tests/fixtures/keys/test-signing.sec.asc");
        gpg(&["--import", key.to_str().unwrap()]);
        let listing = gpg(&["--with-colons", "--list-secret-keys"]);
        let fingerprint = listing
            .lines()
            .find_map(|l| l.strip_prefix("fpr:"))
            .and_then(|l| l.split(':').find(|f| f.len() == 40))
            .expect("fingerprint")
            .to_string();

        let scripts = env.dir.path().join("scripts");
        std::fs::create_dir(&scripts).unwrap();
        std::fs::write(scripts.join("10rollback.py"), SCRIPT).unwrap();

        Site {
            env,
            role,
            password,
            gnupg_home,
            fingerprint,
            scripts,
        }
    }

    /// `config` with the values that name places replaced by this site's;
    /// every replaced key must already be there (a key the example lacks
    /// is a finding, not something to paper over).
    fn localise(&self, mut config: Value) -> Value {
        let before = key_paths(&config);
        let db = &self.env.db;
        for (path, value) in [
            ("database.event.name", json!(db.name)),
            ("database.event.username", json!(self.role)),
            ("database.event.password", json!(self.password)),
            ("database.event.host", json!("127.0.0.1")),
            ("database.event.port", json!(db.port)),
            ("template_dir", json!(self.env.template_dir())),
            ("script_directory", json!(self.scripts)),
            ("smtp.host", json!("127.0.0.1")),
            ("smtp.port", json!(self.env.sink.port())),
            ("openpgp.gnupg_home", json!(self.gnupg_home)),
            ("openpgp.signing_key", json!(self.fingerprint)),
        ] {
            let mut cur = &mut config;
            for part in path.split('.') {
                cur = cur
                    .get_mut(part)
                    .unwrap_or_else(|| panic!("the example has no `{path}`"));
            }
            *cur = value;
        }
        assert_eq!(key_paths(&config), before, "only values are replaced");
        config
    }

    /// Runs `intelmqcbmail -c FILE --all` on `config` with one pending
    /// directive and returns its exit code and output.
    async fn run_intelmqcbmail(&self, name: &str, config: &Value) -> (Option<i32>, String) {
        self.env
            .insert_event(
                event_fields("192.0.2.7", 64496),
                json!([{
                    "medium": "email",
                    "recipient_address": "abuse@as64496.example.net",
                    "template_name": "unused",
                    "notification_format": "rollback",
                    "event_data_format": "csv",
                    "notification_interval": 0,
                    "aggregate_identifier": {"source.asn": 64496}
                }]),
            )
            .await;
        let file = self.env.dir.path().join(format!("{name}.conf"));
        std::fs::write(&file, serde_json::to_string_pretty(config).unwrap()).unwrap();
        let home = self.env.dir.path().join(format!("{name}-home"));
        std::fs::create_dir_all(&home).unwrap();
        let mut child = Command::new(intelmqcbmail())
            .arg("-c")
            .arg(&file)
            .arg("--all")
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            // Its user file would be read from here; there is none.
            .env("HOME", &home)
            // intelmqcbmail refuses a non-UTF-8 locale (cb.py:61-65).
            .env("LANG", "C.UTF-8")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn intelmqcbmail");
        let start = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if start.elapsed() > Duration::from_secs(120) {
                let _ = child.kill();
                break child.wait().unwrap();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        let _ = Command::new("gpgconf")
            .arg("--homedir")
            .arg(&self.gnupg_home)
            .args(["--kill", "gpg-agent"])
            .status();
        (status.code(), text)
    }

    /// The run completed: exit 0, no CRITICAL, one signed mail sent and
    /// recorded.
    async fn assert_completed(&self, what: &str, code: Option<i32>, out: &str) {
        assert_eq!(code, Some(0), "{what}: intelmqcbmail said:\n{out}");
        assert!(!out.contains("CRITICAL"), "{what}:\n{out}");
        assert!(!out.contains("Traceback"), "{what}:\n{out}");
        assert!(
            out.contains("1 mails sent, 0 postponed, 0 errors."),
            "{what}:\n{out}"
        );
        let mails = self.env.sink.wait_for(1, Duration::from_secs(10));
        assert_eq!(mails.len(), 1, "{what}");
        assert_eq!(mails[0].rcpt_to, ["abuse@as64496.example.net"]);
        let ctype = common::header(&mails[0].data, "Content-Type").unwrap_or_default();
        assert!(ctype.starts_with("multipart/signed"), "{what}: {ctype}");
        assert_eq!(self.env.pending_count().await, 0, "{what}");
    }
}

/// Every key path of a JSON object, dotted (`smtp.port`).
fn key_paths(v: &Value) -> Vec<String> {
    fn walk(prefix: &str, v: &Value, out: &mut Vec<String>) {
        if let Value::Object(map) = v {
            for (k, v) in map {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                out.push(path.clone());
                walk(&path, v, out);
            }
        }
    }
    let mut out = Vec::new();
    walk("", v, &mut out);
    out.sort();
    out
}

fn shipped_example() -> Value {
    let text = std::fs::read_to_string(repo_path("config/intelmq-mailgen.conf.example")).unwrap();
    serde_json::from_str(&text).expect("the example is JSON")
}

/// The JSON between `.SH EXAMPLE`'s `.EX` and `.EE` in mailgend.conf(5),
/// with groff's escapes undone.
fn man_page_example() -> Value {
    let man = std::fs::read_to_string(repo_path("man/mailgend.conf.5")).unwrap();
    let example = man
        .split(".SH EXAMPLE\n")
        .nth(1)
        .expect(".SH EXAMPLE in man/mailgend.conf.5");
    let body = example
        .split(".EX\n")
        .nth(1)
        .and_then(|b| b.split("\n.EE").next())
        .expect(".EX … .EE");
    let json = body
        .replace("\\-", "-")
        .replace("\\(dq", "\"")
        .replace("\\e", "\\");
    serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}:\n{json}"))
}

/// The keys of docs/config.md's table "Keys mailgend adds".
fn documented_mailgend_keys() -> Vec<String> {
    let md = std::fs::read_to_string(repo_path("docs/config.md")).unwrap();
    let section = md
        .split("## Keys mailgend adds\n")
        .nth(1)
        .expect("docs/config.md: ## Keys mailgend adds");
    let section = section.split("\n## ").next().unwrap();
    let keys: Vec<String> = section
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .map(str::to_string)
        .collect();
    assert!(keys.len() >= 10, "{keys:?}");
    keys
}

#[tokio::test]
async fn intelmqcbmail_1_4_runs_on_the_shipped_example() {
    let site = Site::new().await;
    let config = site.localise(shipped_example());
    let (code, out) = site.run_intelmqcbmail("example", &config).await;
    site.assert_completed("config/intelmq-mailgen.conf.example", code, &out)
        .await;
}

#[tokio::test]
async fn intelmqcbmail_1_4_runs_on_the_man_page_example() {
    let site = Site::new().await;
    let mut config = man_page_example();
    // Its key file is for mailgend; intelmqcbmail does not read it.
    assert!(config["mailgend"]["signing_key_file"].is_string());
    config = site.localise(config);
    let (code, out) = site.run_intelmqcbmail("man", &config).await;
    site.assert_completed("man/mailgend.conf.5 EXAMPLE", code, &out)
        .await;
}

#[tokio::test]
async fn intelmqcbmail_1_4_runs_on_a_file_with_every_mailgend_key() {
    let site = Site::new().await;
    let dir = site.env.dir.path();
    let password_file = dir.join("smtp-password");
    std::fs::write(&password_file, "relay secret\n").unwrap();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, "not read by either tool in this test\n").unwrap();
    let verp_key = dir.join("verp.key");
    std::fs::write(&verp_key, "0123456789abcdef0123456789abcdef\n").unwrap();

    let mut config = site.localise(shipped_example());
    let smtp = config["smtp"].as_object_mut().unwrap();
    // "none": the receiver here speaks plain SMTP, as the old tool does.
    smtp.insert("tls".into(), json!("none"));
    smtp.insert("ca_file".into(), json!(ca_file));
    smtp.insert("username".into(), json!("mailer"));
    smtp.insert("password".into(), json!("relay secret"));
    smtp.insert("password_file".into(), json!(password_file));
    smtp.insert("timeout".into(), json!(30));
    smtp.insert("max_message_size".into(), json!(10_240_000));
    // libpq's names in database.event: psycopg2 gets name, user, password,
    // host and port only (intelmqmail/db.py), so 1.4 ignores them.
    let client_cert = dir.join("client.crt");
    std::fs::write(&client_cert, "not read by either tool in this test\n").unwrap();
    let event = config["database"]["event"].as_object_mut().unwrap();
    event.insert("sslmode".into(), json!("prefer"));
    event.insert("sslrootcert".into(), json!(ca_file));
    event.insert("sslcert".into(), json!(client_cert));
    event.insert("sslkey".into(), json!(client_cert));
    event.insert("target_session_attrs".into(), json!("any"));
    config["mailgend"] = json!({
        "workers": 2,
        "in_doubt": "hold",
        "shutdown_deadline": 20,
        "sweep_interval": 60,
        "metrics_listen": "127.0.0.1:9469",
        "signing_key_file": repo_path("tests/fixtures/keys/test-signing.sec.asc"),
        "verp": {"address": "bounces@cert.example", "key_file": verp_key},
        "bounces": {"warn_after": 3, "window": "30d"},
    });

    // Every key the docs list as mailgend's is in the file ...
    let paths = key_paths(&config);
    let missing: Vec<_> = documented_mailgend_keys()
        .into_iter()
        .filter(|k| !paths.contains(k))
        .collect();
    assert!(missing.is_empty(), "not in the test's file: {missing:?}");
    // ... mailgend reads all of them, warns about none and sees nothing
    // the old tool would refuse ...
    let text = config.to_string();
    let parsed = Config::from_json_str(&text, "every-key.conf").expect("mailgend accepts it");
    // (The fixture key is 0644 in a git checkout: that WARN is not ours.)
    let warned: Vec<_> = parsed
        .unknown_keys
        .iter()
        .filter(|p| !p.reason.contains("holds a secret"))
        .collect();
    assert!(warned.is_empty(), "{warned:?}");
    assert!(
        parsed.rollback_problems.is_empty(),
        "{:?}",
        parsed.rollback_problems
    );
    assert_eq!(
        parsed.openpgp.key_file.as_deref(),
        Some(repo_path("tests/fixtures/keys/test-signing.sec.asc").as_path())
    );
    // ... and intelmqcbmail 1.4 completes its run with it.
    let (code, out) = site.run_intelmqcbmail("every-key", &config).await;
    site.assert_completed("every mailgend key", code, &out)
        .await;
}

/// The negative control: the old spelling in `openpgp` stops intelmqcbmail
/// 1.4 before it does anything (so the tests above can fail), while
/// mailgend reads it with a WARN and `check-config` names the rollback
/// problem.
#[tokio::test]
async fn openpgp_key_file_stops_intelmqcbmail_1_4() {
    let site = Site::new().await;
    let mut config = site.localise(shipped_example());
    let key = repo_path("tests/fixtures/keys/test-signing.sec.asc");
    config["openpgp"]["key_file"] = json!(key);
    let (code, out) = site.run_intelmqcbmail("old-spelling", &config).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("CRITICAL - Config section openpgp missing or incomplete"),
        "{out}"
    );
    assert!(site.env.sink.messages().is_empty());
    assert_eq!(site.env.pending_count().await, 1, "nothing was lost");

    // mailgend reads format files, not intelmqcbmail's scripts.
    config["script_directory"] = json!(site.env.format_dir());
    let file = site.env.dir.path().join("old-spelling-mailgend.conf");
    std::fs::write(&file, config.to_string()).unwrap();
    let (code, out) = check_config(&file, site.env.dir.path());
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("configuration OK"), "{out}");
    assert!(
        out.contains("key `openpgp.key_file`: old spelling, read as mailgend.signing_key_file"),
        "{out}"
    );
    assert!(
        out.contains("key `openpgp`: rollback: intelmqcbmail 1.4 exits CRITICAL"),
        "{out}"
    );
}

fn check_config(file: &Path, home: &Path) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mailgend"))
        .arg("-c")
        .arg(file)
        .arg("check-config")
        .env("HOME", home)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}
