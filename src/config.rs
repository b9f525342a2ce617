//! Configuration: intelmq-mailgen's JSON files, read the way it reads them
//! (spec §8), plus mailgend's own keys (see `docs/config.md`).
//!
//! Owns finding the files, merging them one level deep (the user file
//! wins), checking every key, and turning problems into errors that name the
//! file, the key and the reason. Nothing here touches the network or the
//! database: loading a config is safe to repeat on SIGHUP.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Map, Value};

use crate::shared::smtp::{SmtpConfig, SmtpTls};

/// Where the system-wide file lives unless `-c` names another.
pub const SYSTEM_CONFIG: &str = "/etc/intelmq/intelmq-mailgen.conf";
/// The per-user file, relative to `$HOME`; always read when present.
pub const USER_CONFIG: &str = ".intelmq/intelmq-mailgen.conf";

/// One problem with the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// The file the offending key came from (or the files searched).
    pub file: String,
    /// Dotted key path, e.g. `smtp.port`; empty for whole-file problems.
    pub key: String,
    pub reason: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.file, self.reason)
        } else {
            write!(f, "{}: key `{}`: {}", self.file, self.key, self.reason)
        }
    }
}

/// Every problem found while loading; the config is refused as a whole.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigError(pub Vec<ConfigProblem>);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration")?;
        for p in &self.0 {
            write!(f, "\n  {p}")?;
        }
        Ok(())
    }
}

/// Connection parameters of the events database (`database.event`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseConfig {
    pub name: String,
    pub username: String,
    pub password: Option<String>,
    /// Host names, IP addresses, or directories holding the Unix socket,
    /// tried in order (libpq's comma-separated `host` list).
    pub hosts: Vec<String>,
    /// One port for all hosts, or one per host (libpq's `port` list).
    pub ports: Vec<u16>,
    /// libpq's `sslmode`; `None`: `PGSSLMODE`, else `prefer`.
    pub sslmode: Option<SslMode>,
    /// libpq's `sslrootcert`; `None`: `PGSSLROOTCERT`, else
    /// `~/.postgresql/root.crt` when it exists.
    pub sslrootcert: Option<RootCert>,
    /// libpq's `sslcert`/`sslkey` (client certificate and its key); `None`:
    /// `PGSSLCERT`/`PGSSLKEY`, else `~/.postgresql/postgresql.{crt,key}`.
    pub sslcert: Option<PathBuf>,
    pub sslkey: Option<PathBuf>,
    /// libpq's `target_session_attrs`; `None`: `PGTARGETSESSIONATTRS`,
    /// else `any`.
    pub target_session_attrs: Option<SessionAttrs>,
    /// Appended to the pending-directive selection with `AND` (spec §3.2).
    pub additional_directive_where: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenPgpConfig {
    pub always_sign: bool,
    pub gnupg_home: Option<PathBuf>,
    /// Fingerprint, key id or user id, as given to gpg's `--local-user`.
    pub signing_key: Option<String>,
    /// A file with the armoured or binary secret key (alternative to
    /// `gnupg_home`): `mailgend.signing_key_file`, or the old spelling
    /// `openpgp.key_file`.
    pub key_file: Option<PathBuf>,
}

/// What the service does with a mail whose delivery is in doubt (the
/// outbox's `sending` rows a crash left behind, see `notify::outbox`).
/// Defined here, not in the outbox, so that config imports nothing of the
/// notifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InDoubtPolicy {
    /// Send the stored message again: same bytes, same Message-Id, same
    /// ticket, so recipients' ticket systems can deduplicate. Logged at WARN.
    Resend,
    /// Keep the group pending and untouched until an operator runs
    /// `mailgend in-doubt release|mark-sent|discard`.
    Hold,
}

impl fmt::Display for InDoubtPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            InDoubtPolicy::Resend => "resend",
            InDoubtPolicy::Hold => "hold",
        })
    }
}

/// mailgend's own runtime settings (section `mailgend`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceConfig {
    /// Groups rendered, signed and sent concurrently.
    pub workers: usize,
    /// What to do with a mail whose delivery is in doubt after a crash.
    pub in_doubt: InDoubtPolicy,
    /// How long SIGTERM waits for groups in flight before abandoning them
    /// (they stay pending).
    pub shutdown_deadline: Duration,
    /// Full rescan interval, in case a notification was missed.
    pub sweep_interval: Duration,
    /// `host:port` for the Prometheus `/metrics` endpoint; off when unset.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub database: DatabaseConfig,
    pub smtp: SmtpConfig,
    /// `smtp.max_message_size`: the largest mail (octets) handed to the
    /// relay, besides the relay's own `SIZE` (docs/operations.md).
    pub max_message_size: Option<usize>,
    pub openpgp: OpenPgpConfig,
    pub template_dir: PathBuf,
    pub script_directory: PathBuf,
    /// The From header: an address, optionally with a display name.
    pub sender: String,
    /// `sender`'s address part (envelope sender, Message-Id domain).
    pub sender_address: String,
    pub sender_domain: String,
    pub logging_level: String,
    pub xarf_reportdomain: Option<String>,
    pub xarf_schemacache: Option<PathBuf>,
    pub service: ServiceConfig,
    /// `mailgend.verp` / `mailgend.bounces` (`notify::bounce`): VERP
    /// envelope senders, and the per-recipient bounce policy.
    pub verp: Option<crate::notify::verp::Verp>,
    pub bounce_policy: Option<crate::notify::bounce::Policy>,
    /// The files that were read, in merge order.
    pub files: Vec<PathBuf>,
    /// Keys to WARN about, with their file: keys not known, old spellings
    /// of relocated keys (each is logged at WARN by the caller).
    pub unknown_keys: Vec<ConfigProblem>,
    /// What would make intelmqcbmail 1.4 refuse or misread this
    /// configuration (a rollback to it); `check-config` prints them.
    pub rollback_problems: Vec<ConfigProblem>,
}

/// Which files to read.
#[derive(Debug, Clone, Default)]
pub struct ConfigSource {
    /// `-c FILE`: replaces the system file.
    pub system_file: Option<PathBuf>,
    /// Override of `$HOME/.intelmq/intelmq-mailgen.conf` (tests); `None`
    /// means the default location, `Some(None)`-like behaviour is
    /// [`ConfigSource::no_user_file`].
    pub user_file: Option<PathBuf>,
    pub skip_user_file: bool,
}

impl ConfigSource {
    pub fn file(path: impl Into<PathBuf>) -> ConfigSource {
        ConfigSource {
            system_file: Some(path.into()),
            user_file: None,
            skip_user_file: true,
        }
    }

    fn system_path(&self) -> PathBuf {
        self.system_file
            .clone()
            .unwrap_or_else(|| PathBuf::from(SYSTEM_CONFIG))
    }

    fn user_path(&self) -> Option<PathBuf> {
        if self.skip_user_file {
            return None;
        }
        if let Some(p) = &self.user_file {
            return Some(p.clone());
        }
        std::env::var_os("HOME").map(|h| Path::new(&h).join(USER_CONFIG))
    }
}

/// The merged JSON plus, for every `section.key` / `key`, the file it came
/// from, so that problems can name the right file.
struct Merged {
    root: Map<String, Value>,
    origin: BTreeMap<String, String>,
    files: Vec<PathBuf>,
}

impl Merged {
    fn origin_of(&self, key: &str) -> String {
        let mut k = key;
        loop {
            if let Some(f) = self.origin.get(k) {
                return f.clone();
            }
            match k.rfind('.') {
                Some(i) => k = &k[..i],
                None => break,
            }
        }
        self.files
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(" + ")
    }
}

fn read_json_file(
    path: &Path,
    optional: bool,
) -> Result<Option<Map<String, Value>>, ConfigProblem> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        // Under systemd's ProtectHome= the user file's directory is
        // inaccessible: for the optional user file that means "no file".
        Err(e) if optional && e.kind() == std::io::ErrorKind::PermissionDenied => return Ok(None),
        Err(e) => {
            return Err(ConfigProblem {
                file: path.display().to_string(),
                key: String::new(),
                reason: format!("cannot read: {e}"),
            })
        }
    };
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(map)) => Ok(Some(map)),
        Ok(_) => Err(ConfigProblem {
            file: path.display().to_string(),
            key: String::new(),
            reason: "the top level must be a JSON object".into(),
        }),
        Err(e) => Err(ConfigProblem {
            file: path.display().to_string(),
            key: String::new(),
            reason: format!("not valid JSON: {e}"),
        }),
    }
}

fn merge(source: &ConfigSource) -> Result<Merged, ConfigError> {
    let mut problems = Vec::new();
    let mut merged = Merged {
        root: Map::new(),
        origin: BTreeMap::new(),
        files: Vec::new(),
    };
    let system = source.system_path();
    if source.system_file.is_some() && !system.exists() {
        problems.push(ConfigProblem {
            file: system.display().to_string(),
            key: String::new(),
            reason: "file does not exist".into(),
        });
    }
    let mut paths = vec![(system, false)];
    paths.extend(source.user_path().map(|p| (p, true)));
    for (path, optional) in paths {
        let map = match read_json_file(&path, optional) {
            Ok(Some(m)) => m,
            Ok(None) => continue,
            Err(p) => {
                problems.push(p);
                continue;
            }
        };
        let file = path.display().to_string();
        merged.files.push(path);
        // One level deep, as intelmqcbmail does: a dict in the later file
        // updates the dict of the earlier one; anything else replaces it.
        for (key, value) in map {
            match (merged.root.get_mut(&key), value) {
                (Some(Value::Object(existing)), Value::Object(update)) => {
                    for (k, v) in update {
                        merged.origin.insert(format!("{key}.{k}"), file.clone());
                        existing.insert(k, v);
                    }
                }
                (_, value) => {
                    merged
                        .origin
                        .retain(|k, _| !(k == &key || k.starts_with(&format!("{key}."))));
                    merged.origin.insert(key.clone(), file.clone());
                    merged.root.insert(key, value);
                }
            }
        }
    }
    if !problems.is_empty() {
        return Err(ConfigError(problems));
    }
    if merged.files.is_empty() {
        let searched = std::iter::once(source.system_path())
            .chain(source.user_path())
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        return Err(ConfigError(vec![ConfigProblem {
            file: searched,
            key: String::new(),
            reason: "no configuration found".into(),
        }]));
    }
    Ok(merged)
}

/// Reads typed values out of the merged JSON, collecting every problem.
struct Reader<'a> {
    merged: &'a Merged,
    problems: Vec<ConfigProblem>,
    unknown: Vec<ConfigProblem>,
}

impl<'a> Reader<'a> {
    fn problem(&mut self, key: &str, reason: impl Into<String>) {
        self.problems.push(ConfigProblem {
            file: self.merged.origin_of(key),
            key: key.to_string(),
            reason: reason.into(),
        });
    }

    fn lookup(&self, key: &str) -> Option<&'a Value> {
        let mut parts = key.split('.');
        let mut cur = self.merged.root.get(parts.next()?)?;
        for p in parts {
            cur = cur.as_object()?.get(p)?;
        }
        Some(cur)
    }

    /// A WARN for each file with a secret that others can read
    /// (`shared::secret_file`): the files with a password in them, the
    /// password file, the signing key file.
    fn warn_exposed_secrets(&mut self, openpgp: &OpenPgpConfig, key_file_key: &str) {
        let mut files: Vec<(&str, PathBuf)> = Vec::new();
        for key in ["database.event.password", "smtp.password"] {
            if self.lookup(key).is_some_and(|v| !v.is_null()) {
                files.push((key, self.merged.origin_of(key).into()));
            }
        }
        if let Some(Value::String(p)) = self.lookup("smtp.password_file") {
            files.push(("smtp.password_file", p.into()));
        }
        if let Some(p) = &openpgp.key_file {
            files.push((key_file_key, p.clone()));
        }
        for (key, path) in files {
            if let Some(w) = crate::shared::secret_file::exposure(&path) {
                self.warn(key, w);
            }
        }
    }

    /// A WARN about `key` that does not refuse the configuration.
    fn warn(&mut self, key: &str, reason: impl Into<String>) {
        self.unknown.push(ConfigProblem {
            file: self.merged.origin_of(key),
            key: key.to_string(),
            reason: reason.into(),
        });
    }

    fn section(&mut self, key: &str, known: &[&str]) -> bool {
        match self.lookup(key) {
            None => false,
            Some(Value::Object(map)) => {
                for k in map.keys() {
                    if !known.contains(&k.as_str()) {
                        let full = format!("{key}.{k}");
                        self.unknown.push(ConfigProblem {
                            file: self.merged.origin_of(&full),
                            key: full,
                            reason: unknown_key(k, known),
                        });
                    }
                }
                true
            }
            Some(_) => {
                self.problem(key, "must be a JSON object");
                false
            }
        }
    }

    fn string(&mut self, key: &str) -> Option<String> {
        match self.lookup(key) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => {
                self.problem(key, format!("must be a string, found {}", kind(other)));
                None
            }
        }
    }

    fn required_string(&mut self, key: &str) -> String {
        match self.string(key) {
            Some(s) if !s.trim().is_empty() => s,
            Some(_) => {
                self.problem(key, "must not be empty");
                String::new()
            }
            None => {
                if self.lookup(key).is_none() {
                    self.problem(key, "missing");
                }
                String::new()
            }
        }
    }

    fn bool(&mut self, key: &str, default: bool) -> bool {
        match self.lookup(key) {
            None | Some(Value::Null) => default,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                self.problem(key, format!("must be true or false, found {}", kind(other)));
                default
            }
        }
    }

    /// libpq's `port`: one port (number or string) or a comma-separated
    /// list with one port per host; 5432 when absent.
    fn ports(&mut self, key: &str, hosts: usize) -> Vec<u16> {
        let list = match self.lookup(key) {
            Some(Value::String(s)) if s.contains(',') => s.clone(),
            _ => return vec![self.integer(key, 1, 65535).unwrap_or(5432) as u16],
        };
        let mut ports = Vec::new();
        for p in list.split(',') {
            match p.trim().parse::<u16>() {
                Ok(n) if n > 0 => ports.push(n),
                _ => {
                    self.problem(
                        key,
                        format!("{:?} in the port list is not a port", p.trim()),
                    );
                    return vec![5432];
                }
            }
        }
        if ports.len() != hosts {
            self.problem(
                key,
                format!(
                    "{} ports for {hosts} hosts: give one port, or one per host",
                    ports.len()
                ),
            );
        }
        ports
    }

    /// A string that must be one of `names`.
    fn choice<T>(&mut self, key: &str, names: &[&str], parse: fn(&str) -> Option<T>) -> Option<T> {
        let s = self.string(key)?;
        let v = parse(&s);
        if v.is_none() {
            self.problem(key, format!("{s:?} is not one of {}", names.join(", ")));
        }
        v
    }

    fn existing_file(&mut self, key: &str, p: &Path) {
        if !p.is_file() {
            self.problem(key, format!("{} is not a readable file", p.display()));
        }
    }

    fn integer(&mut self, key: &str, min: i64, max: i64) -> Option<i64> {
        let v = match self.lookup(key) {
            None | Some(Value::Null) => return None,
            Some(v) => v,
        };
        // intelmq-mailgen passes the port straight to psycopg2/smtplib,
        // which accept "5432" as well as 5432; so do we.
        let n = match v {
            Value::Number(n) => n.as_i64(),
            Value::String(s) => s.trim().parse::<i64>().ok(),
            _ => None,
        };
        match n {
            Some(n) if (min..=max).contains(&n) => Some(n),
            Some(n) => {
                self.problem(key, format!("{n} is out of range {min}..={max}"));
                None
            }
            None => {
                self.problem(key, format!("must be an integer, found {}", kind(v)));
                None
            }
        }
    }
}

impl DatabaseConfig {
    /// `host:port` of every host, comma-separated, for messages.
    pub fn endpoints(&self) -> String {
        self.hosts
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let port = self.ports.get(i).or(self.ports.first()).unwrap_or(&5432);
                format!("{h}:{port}")
            })
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// libpq's `sslmode` values, with libpq's meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub const NAMES: &'static [&'static str] = &[
        "disable",
        "allow",
        "prefer",
        "require",
        "verify-ca",
        "verify-full",
    ];

    pub fn parse(s: &str) -> Option<SslMode> {
        Some(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        })
    }
}

/// libpq's `sslrootcert`: a PEM file of trusted CAs, or `system` (the
/// system's trust store).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCert {
    File(PathBuf),
    System,
}

impl RootCert {
    pub fn parse(s: &str) -> RootCert {
        if s == "system" {
            RootCert::System
        } else {
            RootCert::File(PathBuf::from(s))
        }
    }
}

/// The `target_session_attrs` values tokio-postgres can check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionAttrs {
    Any,
    ReadWrite,
    ReadOnly,
}

impl SessionAttrs {
    pub const NAMES: &'static [&'static str] = &["any", "read-write", "read-only"];

    pub fn parse(s: &str) -> Option<SessionAttrs> {
        Some(match s {
            "any" => SessionAttrs::Any,
            "read-write" => SessionAttrs::ReadWrite,
            "read-only" => SessionAttrs::ReadOnly,
            _ => return None,
        })
    }
}

/// Unknown keys are ignored, as intelmqcbmail ignored them, with a WARN
/// that names the likely intended key.
fn unknown_key(k: &str, known: &[&str]) -> String {
    match crate::shared::did_you_mean::did_you_mean(k, known) {
        Some(m) => format!("unknown key, ignored; did you mean `{m}`?"),
        None => "unknown key, ignored".into(),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

const TOP_KEYS: &[&str] = &[
    "openpgp",
    "database",
    "template_dir",
    "script_directory",
    "sender",
    "smtp",
    "logging_level",
    "xarf_reportdomain",
    "xarf_schemacache",
    "mailgend",
];

impl Config {
    /// Loads and checks the configuration; every problem is reported at
    /// once. Paths (template and script directories, key files) are checked
    /// for existence here so that a typo is caught at start or reload.
    pub fn load(source: &ConfigSource) -> Result<Config, ConfigError> {
        let merged = merge(source)?;
        Self::from_merged(&merged)
    }

    /// Parses one JSON text as if it were the only file (tests, `demo`).
    pub fn from_json_str(text: &str, name: &str) -> Result<Config, ConfigError> {
        let root = match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(m)) => m,
            Ok(_) => {
                return Err(ConfigError(vec![ConfigProblem {
                    file: name.into(),
                    key: String::new(),
                    reason: "the top level must be a JSON object".into(),
                }]))
            }
            Err(e) => {
                return Err(ConfigError(vec![ConfigProblem {
                    file: name.into(),
                    key: String::new(),
                    reason: format!("not valid JSON: {e}"),
                }]))
            }
        };
        let merged = Merged {
            root,
            origin: BTreeMap::new(),
            files: vec![PathBuf::from(name)],
        };
        Self::from_merged(&merged)
    }

    fn from_merged(merged: &Merged) -> Result<Config, ConfigError> {
        let mut r = Reader {
            merged,
            problems: Vec::new(),
            unknown: Vec::new(),
        };
        for k in merged.root.keys() {
            if !TOP_KEYS.contains(&k.as_str()) {
                r.unknown.push(ConfigProblem {
                    file: merged.origin_of(k),
                    key: k.clone(),
                    reason: unknown_key(k, TOP_KEYS),
                });
            }
        }

        // database
        if !r.section("database", &["event", "additional_directive_where"])
            && r.lookup("database").is_none()
        {
            r.problem("database", "missing");
        }
        r.section(
            "database.event",
            &[
                "name",
                "username",
                "password",
                "host",
                "port",
                "sslmode",
                "sslrootcert",
                "sslcert",
                "sslkey",
                "target_session_attrs",
            ],
        );
        let hosts: Vec<String> = r
            .string("database.event.host")
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".into())
            .split(',')
            .map(|h| h.trim().to_string())
            .collect();
        if hosts.iter().any(String::is_empty) {
            r.problem("database.event.host", "an empty name in the host list");
        }
        let ports = r.ports("database.event.port", hosts.len());
        let sslmode = r.choice("database.event.sslmode", SslMode::NAMES, SslMode::parse);
        let target_session_attrs = r.choice(
            "database.event.target_session_attrs",
            SessionAttrs::NAMES,
            SessionAttrs::parse,
        );
        let sslrootcert = r
            .string("database.event.sslrootcert")
            .map(|s| RootCert::parse(&s));
        if let Some(RootCert::File(p)) = &sslrootcert {
            r.existing_file("database.event.sslrootcert", p);
        }
        let sslcert = r.string("database.event.sslcert").map(PathBuf::from);
        let sslkey = r.string("database.event.sslkey").map(PathBuf::from);
        for (key, p) in [
            ("database.event.sslcert", &sslcert),
            ("database.event.sslkey", &sslkey),
        ] {
            if let Some(p) = p {
                r.existing_file(key, p);
            }
        }
        let database = DatabaseConfig {
            name: r.required_string("database.event.name"),
            username: r.required_string("database.event.username"),
            password: r.string("database.event.password"),
            hosts,
            ports,
            sslmode,
            sslrootcert,
            sslcert,
            sslkey,
            target_session_attrs,
            additional_directive_where: r
                .string("database.additional_directive_where")
                .filter(|s| !s.trim().is_empty()),
        };

        // smtp
        r.section(
            "smtp",
            &[
                "host",
                "port",
                "tls",
                "ca_file",
                "username",
                "password",
                "password_file",
                "timeout",
                "max_message_size",
            ],
        );
        let tls = match r.string("smtp.tls").as_deref() {
            None | Some("none") => SmtpTls::None,
            Some("starttls") => SmtpTls::StartTls,
            Some("opportunistic") => SmtpTls::Opportunistic,
            Some("tls") | Some("implicit") => SmtpTls::Implicit,
            Some(other) => {
                r.problem(
                    "smtp.tls",
                    format!(
                        "unknown value {other:?}; use \"none\", \"starttls\", \
                         \"opportunistic\" or \"tls\""
                    ),
                );
                SmtpTls::None
            }
        };
        let ca_file = r.string("smtp.ca_file").map(PathBuf::from);
        if let Some(p) = &ca_file {
            if !p.is_file() {
                r.problem(
                    "smtp.ca_file",
                    format!("{} is not a readable file", p.display()),
                );
            }
        }
        let username = r.string("smtp.username").filter(|s| !s.is_empty());
        let mut password = r.string("smtp.password");
        if let Some(pf) = r.string("smtp.password_file") {
            match std::fs::read_to_string(&pf) {
                Ok(s) => password = Some(s.trim_end_matches(['\r', '\n']).to_string()),
                Err(e) => r.problem("smtp.password_file", format!("cannot read {pf}: {e}")),
            }
        }
        if username.is_some() != password.is_some() {
            r.problem(
                "smtp.username",
                "SMTP AUTH needs both smtp.username and smtp.password (or smtp.password_file)",
            );
        }
        let smtp = SmtpConfig {
            host: r
                .string("smtp.host")
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "localhost".into()),
            port: r.integer("smtp.port", 1, 65535).unwrap_or(25) as u16,
            tls,
            ca_file,
            username,
            password,
            timeout: Duration::from_secs(r.integer("smtp.timeout", 1, 3600).unwrap_or(60) as u64),
        };
        // Below ~10 KB not even a small notification fits.
        let max_message_size = r
            .integer("smtp.max_message_size", 10_000, i64::MAX)
            .map(|n| n as usize);

        // openpgp
        r.section(
            "openpgp",
            &["gnupg_home", "always_sign", "signing_key", "key_file"],
        );
        // The key file lives in mailgend's own section: intelmqcbmail 1.4
        // exits CRITICAL when `openpgp` holds any key but its three
        // (intelmqmail/cb.py:441-446 in 1.4.0), which would break a
        // rollback. The old spelling keeps working, with a WARN.
        let (key_file_key, key_file) = match (
            r.string("mailgend.signing_key_file"),
            r.string("openpgp.key_file"),
        ) {
            (Some(new), old) => {
                if old.is_some() {
                    r.warn(
                        "openpgp.key_file",
                        "ignored, mailgend.signing_key_file is set; remove it: \
                         intelmqcbmail 1.4 exits CRITICAL on any openpgp key but \
                         always_sign, gnupg_home and signing_key",
                    );
                }
                ("mailgend.signing_key_file", Some(new))
            }
            (None, Some(old)) => {
                r.warn(
                    "openpgp.key_file",
                    "old spelling, read as mailgend.signing_key_file; move it there: \
                     intelmqcbmail 1.4 exits CRITICAL on any openpgp key but \
                     always_sign, gnupg_home and signing_key",
                );
                ("openpgp.key_file", Some(old))
            }
            (None, None) => ("mailgend.signing_key_file", None),
        };
        let openpgp = OpenPgpConfig {
            always_sign: r.bool("openpgp.always_sign", false),
            gnupg_home: r.string("openpgp.gnupg_home").map(PathBuf::from),
            signing_key: r.string("openpgp.signing_key").filter(|s| !s.is_empty()),
            key_file: key_file.map(PathBuf::from),
        };
        if openpgp.always_sign {
            match (&openpgp.key_file, &openpgp.gnupg_home) {
                (Some(k), _) => {
                    if !k.is_file() {
                        r.problem(
                            key_file_key,
                            format!("{} is not a readable file", k.display()),
                        );
                    }
                }
                (None, Some(h)) => {
                    if !h.is_dir() {
                        r.problem(
                            "openpgp.gnupg_home",
                            format!("{} is not a directory", h.display()),
                        );
                    }
                    if openpgp.signing_key.is_none() {
                        r.problem(
                            "openpgp.signing_key",
                            "required with always_sign and gnupg_home",
                        );
                    }
                }
                (None, None) => r.problem(
                    "openpgp.always_sign",
                    "signing is on but neither mailgend.signing_key_file nor \
                     openpgp.gnupg_home is set",
                ),
            }
        }

        // paths
        let template_dir = PathBuf::from(r.required_string("template_dir"));
        if !template_dir.as_os_str().is_empty() && !template_dir.is_dir() {
            r.problem(
                "template_dir",
                format!("{} is not a directory", template_dir.display()),
            );
        }
        let script_directory = PathBuf::from(r.required_string("script_directory"));
        if !script_directory.as_os_str().is_empty() && !script_directory.is_dir() {
            r.problem(
                "script_directory",
                format!("{} is not a directory", script_directory.display()),
            );
        }

        // sender
        let sender = r.required_string("sender");
        let (sender_address, sender_domain) = match split_sender(&sender) {
            Ok(x) => x,
            Err(reason) => {
                if !sender.is_empty() {
                    r.problem("sender", reason);
                }
                (String::new(), String::new())
            }
        };

        let logging_level = r
            .string("logging_level")
            .unwrap_or_else(|| "INFO".into())
            .to_ascii_uppercase();
        if !["DEBUG", "INFO", "WARNING", "WARN", "ERROR", "CRITICAL"]
            .contains(&logging_level.as_str())
        {
            r.problem(
                "logging_level",
                format!(
                    "unknown level {logging_level:?}; use DEBUG, INFO, WARNING, ERROR or CRITICAL"
                ),
            );
        }

        let xarf_reportdomain = r.string("xarf_reportdomain").filter(|s| !s.is_empty());
        let xarf_schemacache = r.string("xarf_schemacache").map(PathBuf::from);

        r.section(
            "mailgend",
            &[
                "workers",
                "in_doubt",
                "shutdown_deadline",
                "sweep_interval",
                "metrics_listen",
                "signing_key_file",
                "verp",
                "bounces",
            ],
        );
        r.section("mailgend.verp", &["address", "key_file"]);
        r.section("mailgend.bounces", &["warn_after", "window"]);
        let bounces = crate::notify::bounce::settings(
            r.lookup("mailgend.verp"),
            r.lookup("mailgend.bounces"),
        );
        bounces
            .problems
            .iter()
            .for_each(|(k, why)| r.problem(k, why));
        bounces.warnings.iter().for_each(|(k, why)| r.warn(k, why));
        let in_doubt = match r.string("mailgend.in_doubt").as_deref() {
            None | Some("resend") => InDoubtPolicy::Resend,
            Some("hold") => InDoubtPolicy::Hold,
            Some(other) => {
                r.problem(
                    "mailgend.in_doubt",
                    format!("unknown value {other:?}; use \"resend\" or \"hold\""),
                );
                InDoubtPolicy::Resend
            }
        };
        let metrics_listen = match r.string("mailgend.metrics_listen") {
            None => None,
            Some(s) if s.is_empty() => None,
            Some(s) => match s.parse() {
                Ok(a) => Some(a),
                Err(_) => {
                    r.problem(
                        "mailgend.metrics_listen",
                        format!("{s:?} is not an address:port such as 127.0.0.1:9469"),
                    );
                    None
                }
            },
        };
        let service = ServiceConfig {
            workers: r.integer("mailgend.workers", 1, 1024).unwrap_or(4) as usize,
            in_doubt,
            shutdown_deadline: Duration::from_secs(
                r.integer("mailgend.shutdown_deadline", 0, 3600)
                    .unwrap_or(30) as u64,
            ),
            sweep_interval: Duration::from_secs(
                r.integer("mailgend.sweep_interval", 1, 86400)
                    .unwrap_or(300) as u64,
            ),
            metrics_listen,
        };

        r.warn_exposed_secrets(&openpgp, key_file_key);
        if !r.problems.is_empty() {
            return Err(ConfigError(r.problems));
        }
        Ok(Config {
            database,
            smtp,
            max_message_size,
            openpgp,
            template_dir,
            script_directory,
            sender,
            sender_address,
            sender_domain,
            logging_level,
            xarf_reportdomain,
            xarf_schemacache,
            service,
            verp: bounces.verp,
            bounce_policy: bounces.policy,
            files: merged.files.clone(),
            unknown_keys: r.unknown,
            rollback_problems: rollback_problems(merged),
        })
    }
}

/// What intelmqcbmail 1.4 would refuse or misread in the merged files
/// (it merges them the same way), so that `check-config` can say whether
/// a rollback to it still works. Not problems for mailgend.
fn rollback_problems(merged: &Merged) -> Vec<ConfigProblem> {
    const OLD: &str = "intelmqcbmail 1.4";
    let mut out = Vec::new();
    let mut note = |key: &str, reason: String| {
        out.push(ConfigProblem {
            file: merged.origin_of(key),
            key: key.to_string(),
            reason: format!("rollback: {reason}"),
        })
    };
    // intelmqmail/cb.py:441-446: the key set must be exactly these three.
    const PGP: [&str; 3] = ["always_sign", "gnupg_home", "signing_key"];
    match merged.root.get("openpgp") {
        Some(Value::Object(pgp)) => {
            let missing: Vec<&str> = PGP
                .iter()
                .copied()
                .filter(|k| !pgp.contains_key(*k))
                .collect();
            let extra: Vec<&str> = pgp
                .keys()
                .map(String::as_str)
                .filter(|k| !PGP.contains(k))
                .collect();
            if !missing.is_empty() || !extra.is_empty() {
                let mut what = Vec::new();
                if !missing.is_empty() {
                    what.push(format!("lacks {}", missing.join(", ")));
                }
                if !extra.is_empty() {
                    what.push(format!("has {}", extra.join(", ")));
                }
                note(
                    "openpgp",
                    format!(
                        "{OLD} exits CRITICAL unless this section has exactly always_sign, \
                         gnupg_home and signing_key; it {}",
                        what.join(" and ")
                    ),
                );
            }
        }
        _ => note(
            "openpgp",
            format!("{OLD} exits CRITICAL without this section"),
        ),
    }
    // intelmqmail/db.py:22-27 and cb.py:234-235 index these directly.
    for key in [
        "database.event.name",
        "database.event.username",
        "database.event.password",
        "database.event.host",
        "database.event.port",
        "smtp.host",
        "smtp.port",
    ] {
        let (section, rest) = key.rsplit_once('.').unwrap();
        let mut cur = Some(&merged.root);
        for part in section.split('.') {
            cur = cur.and_then(|m| m.get(part)).and_then(Value::as_object);
        }
        if !cur.is_some_and(|m| m.contains_key(rest)) {
            note(
                key,
                format!(
                    "{OLD} fails with a KeyError without it; give it explicitly \
                     (mailgend has a default; for the password, null will do)"
                ),
            );
        }
    }
    // intelmqmail/cb.py:424: Python's logging knows upper-case names only.
    if let Some(Value::String(level)) = merged.root.get("logging_level") {
        if !["DEBUG", "INFO", "WARNING", "WARN", "ERROR", "CRITICAL"].contains(&level.as_str()) {
            note(
                "logging_level",
                format!("{OLD} refuses {level:?} (Python's level names are upper case)"),
            );
        }
    }
    out
}

/// Splits `"CERT <cert@example.org>"` or `cert@example.org` into the address
/// and its domain; the sender must be exactly one plain mailbox.
pub fn split_sender(sender: &str) -> Result<(String, String), String> {
    let s = sender.trim();
    if s.chars().any(|c| c.is_control()) {
        return Err("must not contain control characters".into());
    }
    let addr = match (s.rfind('<'), s.rfind('>')) {
        (Some(l), Some(r)) if l < r && r == s.len() - 1 => s[l + 1..r].trim(),
        (None, None) => s,
        _ => return Err(format!("{sender:?} is not an address or `Name <address>`")),
    };
    let (local, domain) = addr
        .rsplit_once('@')
        .ok_or_else(|| format!("{addr:?} has no domain"))?;
    if local.is_empty() || domain.is_empty() || addr.contains(char::is_whitespace) {
        return Err(format!("{addr:?} is not a valid address"));
    }
    Ok((addr.to_string(), domain.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Mode 0600: files with secrets that are not (a WARN otherwise).
    fn private(p: &Path) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    fn minimal(dir: &Path) -> String {
        serde_json::json!({
            "database": {"event": {"name": "intelmq-events", "username": "mailgen",
                                    "password": "pw", "host": "localhost", "port": 5432}},
            "template_dir": dir, "script_directory": dir,
            "sender": "CERT <cert@example.org>",
            "smtp": {"host": "localhost", "port": "25"},
            "openpgp": {"always_sign": false, "gnupg_home": "/nonexistent", "signing_key": ""}
        })
        .to_string()
    }

    #[test]
    fn minimal_config_loads() {
        let d = tempfile::tempdir().unwrap();
        let c = Config::from_json_str(&minimal(d.path()), "t.conf").unwrap();
        assert_eq!(c.smtp.port, 25);
        assert_eq!(c.sender_address, "cert@example.org");
        assert_eq!(c.sender_domain, "example.org");
        assert!(c.unknown_keys.is_empty());
    }

    #[test]
    fn libpq_host_lists_and_tls_keys() {
        let d = tempfile::tempdir().unwrap();
        let with = |event: Value| {
            let mut j: Value = serde_json::from_str(&minimal(d.path())).unwrap();
            for (k, v) in event.as_object().unwrap() {
                j["database"]["event"][k] = v.clone();
            }
            Config::from_json_str(&j.to_string(), "t.conf")
        };
        let c = with(serde_json::json!({"host": "db1, db2", "port": "5432,5433",
            "sslmode": "verify-full", "target_session_attrs": "read-write",
            "sslrootcert": "system"}))
        .unwrap();
        assert_eq!(c.database.hosts, ["db1", "db2"]);
        assert_eq!(c.database.ports, [5432, 5433]);
        assert_eq!(c.database.endpoints(), "db1:5432,db2:5433");
        assert_eq!(c.database.sslmode, Some(SslMode::VerifyFull));
        assert_eq!(c.database.sslrootcert, Some(RootCert::System));
        assert_eq!(
            c.database.target_session_attrs,
            Some(SessionAttrs::ReadWrite)
        );
        // One port for every host; nothing set: libpq's environment decides.
        let c = with(serde_json::json!({"host": "db1,db2", "port": 6432})).unwrap();
        assert_eq!(c.database.endpoints(), "db1:6432,db2:6432");
        assert_eq!((c.database.sslmode, c.database.sslrootcert), (None, None));
        let err = with(serde_json::json!({"host": "a,b,c", "port": "1,2",
            "sslmode": "on", "target_session_attrs": "primary",
            "sslrootcert": "/nonexistent/ca.crt"}))
        .unwrap_err()
        .0
        .iter()
        .map(|p| format!("{}: {}\n", p.key, p.reason))
        .collect::<String>();
        for needle in [
            "database.event.port: 2 ports for 3 hosts",
            "database.event.sslmode: \"on\" is not one of disable, allow, prefer",
            "database.event.target_session_attrs: \"primary\" is not one of",
            "database.event.sslrootcert: /nonexistent/ca.crt is not a readable file",
        ] {
            assert!(err.contains(needle), "{needle:?} not in {err}");
        }
    }

    #[test]
    fn every_problem_is_reported_with_key() {
        let text = r#"{"database": {"event": {"name": "x", "port": 99999}},
                       "smtp": {"port": "abc", "tls": "sometimes"},
                       "sender": "nodomain", "templat_dir": "/x"}"#;
        let err = Config::from_json_str(text, "bad.conf").unwrap_err();
        let keys: Vec<_> = err.0.iter().map(|p| p.key.as_str()).collect();
        for k in [
            "database.event.username",
            "database.event.port",
            "smtp.port",
            "smtp.tls",
            "template_dir",
            "script_directory",
            "sender",
        ] {
            assert!(keys.contains(&k), "{k} missing from {keys:?}");
        }
        assert!(err.0.iter().all(|p| p.file == "bad.conf"));
    }

    #[test]
    fn user_file_wins_one_level_deep() {
        let d = tempfile::tempdir().unwrap();
        let sys = d.path().join("sys.conf");
        let user = d.path().join("user.conf");
        std::fs::write(&sys, minimal(d.path())).unwrap();
        private(&sys);
        std::fs::write(
            &user,
            r#"{"smtp": {"port": 2525}, "sender": "other@example.net", "bogus": 1}"#,
        )
        .unwrap();
        let src = ConfigSource {
            system_file: Some(sys.clone()),
            user_file: Some(user.clone()),
            skip_user_file: false,
        };
        let c = Config::load(&src).unwrap();
        assert_eq!(c.smtp.port, 2525);
        assert_eq!(c.smtp.host, "localhost", "kept from the system file");
        assert_eq!(c.sender_domain, "example.net");
        assert_eq!(c.unknown_keys.len(), 1);
        assert_eq!(c.unknown_keys[0].file, user.display().to_string());
        assert_eq!(c.unknown_keys[0].reason, "unknown key, ignored");
        assert_eq!(
            unknown_key("smpt", TOP_KEYS),
            "unknown key, ignored; did you mean `smtp`?"
        );

        std::fs::write(&user, r#"{"smtp": {"port": 0}}"#).unwrap();
        let err = Config::load(&src).unwrap_err();
        assert_eq!(err.0[0].key, "smtp.port");
        assert_eq!(err.0[0].file, user.display().to_string());
    }

    #[test]
    fn missing_files_are_an_error() {
        let src = ConfigSource {
            system_file: None,
            user_file: Some("/nonexistent/u.conf".into()),
            skip_user_file: false,
        };
        // The system file may exist on a real host; only check the -c case.
        let err = Config::load(&ConfigSource::file("/nonexistent/x.conf")).unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
        let _ = src;
    }

    /// `openpgp.key_file` (the old spelling) still signs, with a WARN that
    /// names the new place; `mailgend.signing_key_file` wins over it.
    #[test]
    fn key_file_moved_to_the_mailgend_section() {
        let d = tempfile::tempdir().unwrap();
        let key = d.path().join("key.asc");
        std::fs::write(&key, "not checked here").unwrap();
        let other = d.path().join("other.asc");
        std::fs::write(&other, "not checked here").unwrap();
        private(&key);
        private(&other);
        let with = |openpgp: Value, mailgend: Value| {
            let mut j: Value = serde_json::from_str(&minimal(d.path())).unwrap();
            j["openpgp"] = openpgp;
            j["mailgend"] = mailgend;
            Config::from_json_str(&j.to_string(), "t.conf")
        };

        let c = with(
            serde_json::json!({"always_sign": true, "key_file": key}),
            serde_json::json!({}),
        )
        .unwrap();
        assert_eq!(c.openpgp.key_file.as_deref(), Some(key.as_path()));
        assert_eq!(c.unknown_keys.len(), 1, "{:?}", c.unknown_keys);
        assert_eq!(c.unknown_keys[0].key, "openpgp.key_file");
        assert!(c.unknown_keys[0]
            .reason
            .contains("move it there: intelmqcbmail 1.4 exits CRITICAL"));
        assert!(c.unknown_keys[0]
            .reason
            .contains("mailgend.signing_key_file"));
        assert!(c.rollback_problems.iter().any(|p| p.key == "openpgp"
            && p.reason.contains("has key_file")
            && p.reason.contains("lacks gnupg_home, signing_key")));

        let c = with(
            serde_json::json!({"always_sign": true, "gnupg_home": "/nonexistent",
                               "signing_key": "ABCD"}),
            serde_json::json!({"signing_key_file": key}),
        )
        .unwrap();
        assert_eq!(c.openpgp.key_file.as_deref(), Some(key.as_path()));
        assert!(c.unknown_keys.is_empty(), "{:?}", c.unknown_keys);
        assert!(c.rollback_problems.is_empty(), "{:?}", c.rollback_problems);

        let c = with(
            serde_json::json!({"always_sign": true, "key_file": other}),
            serde_json::json!({"signing_key_file": key}),
        )
        .unwrap();
        assert_eq!(c.openpgp.key_file.as_deref(), Some(key.as_path()));
        assert!(c.unknown_keys[0].reason.starts_with("ignored"));

        // A missing file is reported under the key it came from.
        for (openpgp, mailgend, key) in [
            (
                serde_json::json!({"always_sign": true, "key_file": "/nonexistent/k"}),
                serde_json::json!({}),
                "openpgp.key_file",
            ),
            (
                serde_json::json!({"always_sign": true}),
                serde_json::json!({"signing_key_file": "/nonexistent/k"}),
                "mailgend.signing_key_file",
            ),
        ] {
            let err = with(openpgp, mailgend).unwrap_err();
            assert_eq!(err.0.len(), 1, "{err}");
            assert_eq!(err.0[0].key, key, "{err}");
        }
    }

    /// What intelmqcbmail 1.4 would trip over is named, and only that.
    #[test]
    fn rollback_problems_name_what_the_old_tool_refuses() {
        let d = tempfile::tempdir().unwrap();
        let c = Config::from_json_str(&minimal(d.path()), "t.conf").unwrap();
        assert!(c.rollback_problems.is_empty(), "{:?}", c.rollback_problems);

        let mut j: Value = serde_json::from_str(&minimal(d.path())).unwrap();
        j["openpgp"] = serde_json::json!({"always_sign": false});
        j["database"]["event"]
            .as_object_mut()
            .unwrap()
            .remove("password");
        j["smtp"].as_object_mut().unwrap().remove("port");
        j["logging_level"] = serde_json::json!("info");
        let c = Config::from_json_str(&j.to_string(), "t.conf").unwrap();
        let keys: Vec<&str> = c.rollback_problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "openpgp",
                "database.event.password",
                "smtp.port",
                "logging_level"
            ]
        );
        assert!(c
            .rollback_problems
            .iter()
            .all(|p| p.reason.starts_with("rollback: ")));
    }
}
