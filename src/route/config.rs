//! The router's configuration: mail2alert's `configuration.yml`, plus an
//! optional `mailgend:` section for what mail2alert never had (limits,
//! TLS, AUTH, the spool). Owns locating, parsing and validating the file;
//! every problem names the file, line, key and reason, and all problems
//! are reported at once.
//!
//! Two kinds of findings. A *problem* is what cannot work at all (no
//! `local-smtp`, a rule function that does not exist, a regex that does
//! not compile): the file is refused. An *oddity* is what mail2alert ran
//! with and we run with too, the way it did (an unknown key ignored, an
//! unset `$VAR` left as text, an unknown action scheme skipped): one WARN
//! each ([`RouteConfig::warnings`]), and `--check --strict` refuses them.
//! mail2alert's loader (config.py:24-41) expanded `$VAR` in every string
//! value with Python's `os.path.expandvars`; [`expand_env`] does the same.

mod yaml;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use yaml::{Kind, Node};

use crate::config::{SmtpConfig, SmtpTls};
use crate::route::actions::{self, Action};
use crate::route::managers::{self, gocd::Event};
use crate::route::rules::{self, RuleFunction};

/// The environment variable naming the file when `-c` is not given
/// (mail2alert's).
pub const CONFIG_ENV: &str = "MAIL2ALERT_CONFIGURATION";
/// The file used when neither `-c` nor the variable is given.
pub const DEFAULT_FILE: &str = "configuration.yml";

/// Everything `mailgend route` needs, validated.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// The file it came from (for logs and reload).
    pub path: PathBuf,
    /// `local-smtp`: where the inbound server listens (`host:port`).
    pub local_smtp: String,
    /// `remote-smtp`: where mail goes out (shared outbound code).
    pub remote_smtp: SmtpConfig,
    /// Inbound server limits and security (`mailgend:` section).
    pub server: ServerSettings,
    /// `managers`, in order: the first that wants a message gets it.
    pub managers: Vec<ManagerConfig>,
    /// `slack-token` / `slack-url`; required when a rule posts to Slack.
    pub slack: Option<SlackSettings>,
    /// Oddities: accepted as mail2alert accepted them, logged at WARN at
    /// start and listed by `--check` (`--check --strict` refuses them).
    pub warnings: Vec<RouteConfigProblem>,
    /// Files with a secret that others can read (this file when it holds
    /// a password itself, `tls-key`): WARN at start, reload and `--check`;
    /// not refused, not even by `--strict` (mail2alert read them).
    pub exposed_secrets: Vec<RouteConfigProblem>,
}

/// [`RouteConfig::exposed_secrets`] (`shared::secret_file`).
fn exposed_secrets(cfg: &RouteConfig, literal: &[(usize, String)]) -> Vec<RouteConfigProblem> {
    use crate::shared::secret_file::exposure;
    let mut out = Vec::new();
    let file = cfg.path.display().to_string();
    if let Some((line, key)) = literal.first() {
        if let Some(why) = exposure(&cfg.path) {
            out.push(RouteConfigProblem {
                file: file.clone(),
                line: Some(*line),
                key: key.clone(),
                reason: format!("{why}; or take the secret from the environment (`$VARIABLE`)"),
            });
        }
    }
    if let Some(tls) = &cfg.server.tls {
        if let Some(why) = exposure(&tls.key_file) {
            out.push(RouteConfigProblem {
                file,
                line: None,
                key: "mailgend.tls-key".into(),
                reason: why,
            });
        }
    }
    out
}

impl RouteConfig {
    /// `--check --strict`: the oddities as problems.
    pub fn strict(&self) -> Result<(), RouteConfigError> {
        if self.warnings.is_empty() {
            Ok(())
        } else {
            Err(RouteConfigError(self.warnings.clone()))
        }
    }
}

/// The inbound server's settings (`mailgend:` section of the YAML file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSettings {
    /// Durable queue for mail accepted but not yet delivered.
    pub spool_dir: PathBuf,
    /// Largest message accepted (advertised as SIZE).
    pub max_message_size: usize,
    /// Concurrent inbound connections; more get a 421.
    pub max_connections: usize,
    /// `max-connections-per-client`: concurrent connections from one IP
    /// address; more get a 421. 0: no limit but `max-connections`.
    pub max_connections_per_client: usize,
    /// Recipients per message; more get a 452.
    pub max_recipients: usize,
    /// Messages per connection before 421; 0 is unlimited (the default:
    /// one long-lived sender must never be cut off).
    pub max_messages_per_connection: usize,
    /// Idle time allowed between commands.
    pub command_timeout: Duration,
    /// `data-timeout`: the whole DATA phase (354 to the final `.`) must
    /// end within this, however the client paces its lines.
    pub data_timeout: Duration,
    /// `auth-failure-delay`: each failed AUTH of a session waits this
    /// times the session's failures so far before its 535.
    pub auth_failure_delay: Duration,
    /// `auth-failure-limit` failed AUTHs from one IP address within
    /// `auth-failure-window`: then AUTH from it gets 421 until the window
    /// has passed.
    pub auth_failure_limit: u32,
    pub auth_failure_window: Duration,
    /// PEM certificate chain and key: STARTTLS is offered when set.
    pub tls: Option<TlsFiles>,
    /// When set, AUTH PLAIN/LOGIN is required before MAIL.
    pub auth: Option<Credentials>,
    /// Concurrent outbound SMTP connections to `remote-smtp`.
    pub outbound_connections: u32,
    /// `metrics-listen`: `host:port` of the Prometheus `/metrics`
    /// endpoint; off when unset.
    pub metrics_listen: Option<String>,
    /// `case-insensitive`: compare `messages-we-want` addresses ignoring
    /// case. Off by default: mail2alert compared them exactly
    /// (plugin/mail.py:42-45).
    pub case_insensitive: bool,
    /// `max-received`: mail that already passed more `Received:` lines is
    /// refused (554 5.4.6), as a mail loop. Postfix's `hopcount_limit`.
    pub max_received: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            spool_dir: PathBuf::from("/var/spool/mailgend-route"),
            max_message_size: 10 * 1024 * 1024,
            max_connections: 100,
            max_connections_per_client: 20,
            max_recipients: 100,
            max_messages_per_connection: 0,
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(600),
            auth_failure_delay: Duration::from_secs(1),
            auth_failure_limit: 10,
            auth_failure_window: Duration::from_secs(600),
            tls: None,
            auth: None,
            outbound_connections: 8,
            metrics_listen: None,
            case_insensitive: false,
            max_received: 50,
        }
    }
}

/// Slack Web API access.
#[derive(Clone, PartialEq, Eq)]
pub struct SlackSettings {
    pub token: String,
    /// Base URL of the Web API (`slack-url`), default `https://slack.com/api`.
    pub url: String,
}

impl fmt::Debug for SlackSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlackSettings")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// Which messages a manager takes (`messages-we-want`). Compared exactly,
/// as mail2alert compared them, unless `mailgend.case-insensitive`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wanted {
    /// Any envelope recipient is this address.
    To(String),
    /// The envelope sender is this address.
    From(String),
}

/// One entry of `managers`.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// `name`: which manager (registry name).
    pub name: String,
    /// Line of the entry, for messages.
    pub line: usize,
    pub wanted: Wanted,
    pub rules: Vec<RuleConfig>,
    pub settings: ManagerSettings,
}

/// Manager-specific settings.
#[derive(Debug, Clone)]
pub enum ManagerSettings {
    Mail,
    Gocd(managers::gocd::GocdSettings),
}

/// One rule: when `function` (and `events`, if given) match, do `actions`.
#[derive(Debug, Clone)]
pub struct RuleConfig {
    pub line: usize,
    /// `name:` and `owner:`, which mail2alert's `Rule` read (rules.py:6-7)
    /// and only showed in logs; shown in traces.
    pub name: Option<String>,
    pub owner: Option<String>,
    pub actions: Vec<Action>,
    /// `filter.function` as written.
    pub function_name: String,
    pub args: Vec<String>,
    pub function: Arc<dyn RuleFunction>,
    /// `filter.events`; `None` means any event (or none at all).
    pub events: Option<Vec<Event>>,
}

impl RuleConfig {
    /// `pipelines.in_group(my-group) events=[BREAKS]` for traces.
    pub fn describe(&self) -> String {
        let mut s = String::new();
        if let Some(n) = &self.name {
            s.push_str(&format!("{n:?} "));
        }
        s.push_str(&format!("{}({})", self.function_name, self.args.join(", ")));
        if let Some(ev) = &self.events {
            let names: Vec<_> = ev.iter().map(|e| e.name()).collect();
            s.push_str(&format!(" events=[{}]", names.join(", ")));
        }
        s
    }
}

/// One problem with the configuration file.
pub type RouteConfigProblem = crate::config::LocatedProblem;

/// Every problem found; the configuration is refused as a whole.
#[derive(Debug, Clone, thiserror::Error)]
pub struct RouteConfigError(pub Vec<RouteConfigProblem>);

impl fmt::Display for RouteConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.as_slice() {
            [one] => write!(f, "invalid router configuration: {one}"),
            many => {
                write!(f, "invalid router configuration ({} problems)", many.len())?;
                for p in many {
                    write!(f, "\n  {p}")?;
                }
                Ok(())
            }
        }
    }
}

impl RouteConfigError {
    pub fn single(file: &Path, key: &str, reason: impl Into<String>) -> RouteConfigError {
        RouteConfigError(vec![RouteConfigProblem {
            file: file.display().to_string(),
            line: None,
            key: key.to_string(),
            reason: reason.into(),
        }])
    }
}

/// `-c FILE`, else `$MAIL2ALERT_CONFIGURATION`, else `./configuration.yml`.
pub fn locate(cli: Option<&Path>) -> PathBuf {
    if let Some(p) = cli {
        return p.to_path_buf();
    }
    match std::env::var_os(CONFIG_ENV) {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => PathBuf::from(DEFAULT_FILE),
    }
}

/// Reads and validates the file. Safe to repeat (no network, no state).
pub fn load(path: &Path) -> Result<RouteConfig, RouteConfigError> {
    let text = std::fs::read(path)
        .map_err(|e| RouteConfigError::single(path, "", format!("cannot read: {e}")))?;
    let text = String::from_utf8(text)
        .map_err(|e| RouteConfigError::single(path, "", format!("not UTF-8: {e}")))?;
    parse_str(&text, path)
}

/// Parses configuration text as if read from `path` (tests, `--check`).
pub fn parse_str(text: &str, path: &Path) -> Result<RouteConfig, RouteConfigError> {
    let mut r = Reader {
        file: path.display().to_string(),
        problems: Vec::new(),
        oddities: Vec::new(),
        literal_secrets: Vec::new(),
        env: &|name| std::env::var(name).ok(),
    };
    let root = match yaml::parse(text) {
        Ok(n) => n,
        Err(e) => {
            r.problem(e.line, "", e.reason);
            return Err(RouteConfigError(r.problems));
        }
    };
    let cfg = read_root(&mut r, &root, path);
    if r.problems.is_empty() {
        if let Some(mut cfg) = cfg {
            r.oddities.sort_by_key(|p| p.line);
            cfg.warnings = r.oddities;
            cfg.exposed_secrets = exposed_secrets(&cfg, &r.literal_secrets);
            return Ok(cfg);
        }
    }
    // The oddities too, marked, so that a refused file shows what led to
    // the problem (`filtre:` ignored, so `filter` is missing).
    for mut o in r.oddities {
        o.reason = format!("warning: {}", o.reason);
        r.problems.push(o);
    }
    r.problems.sort_by_key(|p| p.line);
    Err(RouteConfigError(r.problems))
}

const TOP_KEYS: &[&str] = &[
    "local-smtp",
    "remote-smtp",
    "managers",
    "slack-token",
    "slack-url",
    "mailgend",
];
const MANAGER_KEYS: &[&str] = &["name", "messages-we-want", "rules"];
const REMOTE_KEYS: &[&str] = &[
    "host", "port", "tls", "ca-file", "username", "password", "timeout",
];
const SERVER_KEYS: &[&str] = &[
    "spool",
    "max-message-size",
    "max-connections",
    "max-connections-per-client",
    "max-recipients",
    "max-messages-per-connection",
    "command-timeout",
    "data-timeout",
    "auth-failure-delay",
    "auth-failure-limit",
    "auth-failure-window",
    "tls-cert",
    "tls-key",
    "auth-user",
    "auth-password",
    "outbound-connections",
    "metrics-listen",
    "case-insensitive",
    "max-received",
];

fn read_root(r: &mut Reader, root: &Node, path: &Path) -> Option<RouteConfig> {
    let top = r.map(root, "")?;
    r.known_keys(&top, "", TOP_KEYS);
    if top.get("slack-token").is_some() && !slack_used(&top) {
        // mail2alert read slack-token only when posting (slackbot.py:46).
        r.oddity(
            top.get("slack-token").map_or(top.line(), |n| n.line),
            "slack-token",
            "given, but no rule has a slack: action; not used",
        );
    }

    let local_smtp = match top.get("local-smtp") {
        Some(n) => r.string(n, "local-smtp").and_then(|s| match host_port(&s) {
            Ok((h, p)) => Some(format!("{h}:{p}")),
            Err(e) => {
                r.problem(n.line, "local-smtp", e);
                None
            }
        }),
        None => {
            r.problem(top.line(), "local-smtp", "missing (host:port to listen on)");
            None
        }
    };
    let remote_smtp = match top.get("remote-smtp") {
        Some(n) => read_remote(r, n),
        None => {
            r.problem(top.line(), "remote-smtp", "missing (host:port to send to)");
            None
        }
    };
    let slack = match top.get("slack-token") {
        Some(n) => r.secret(n, "slack-token").map(|token| SlackSettings {
            token,
            url: actions::slack::DEFAULT_URL.to_string(),
        }),
        None => None,
    };
    let slack = match (slack, top.get("slack-url")) {
        (s, None) => s,
        (s, Some(n)) => {
            let url = r.string(n, "slack-url");
            if let Some(u) = &url {
                if !(u.starts_with("https://") || u.starts_with("http://")) {
                    r.problem(n.line, "slack-url", format!("{u:?} is not an http(s) URL"));
                }
            }
            match (s, url) {
                (Some(mut s), Some(u)) => {
                    s.url = u;
                    Some(s)
                }
                (s, _) => {
                    if s.is_none() {
                        r.problem(n.line, "slack-url", "given without slack-token");
                    }
                    s
                }
            }
        }
    };
    let server = match top.get("mailgend") {
        Some(n) => read_server(r, n),
        None => ServerSettings::default(),
    };
    let managers = match top.get("managers") {
        Some(n) => read_managers(r, n, slack.is_some()),
        None => {
            r.problem(top.line(), "managers", "missing (a list of managers)");
            Vec::new()
        }
    };
    Some(RouteConfig {
        path: path.to_path_buf(),
        local_smtp: local_smtp?,
        remote_smtp: remote_smtp?,
        server,
        managers,
        slack,
        warnings: Vec::new(),
        exposed_secrets: Vec::new(),
    })
}

/// Whether any rule names a `slack:` action (looked at before the rules are
/// read, to say that an unused token is not needed).
fn slack_used(top: &MapView<'_>) -> bool {
    fn any_slack(n: &Node) -> bool {
        match &n.kind {
            Kind::Scalar { value, .. } => value.trim_start().starts_with("slack:"),
            Kind::Seq(items) => items.iter().any(any_slack),
            Kind::Map(entries) => entries.iter().any(|(_, v)| any_slack(v)),
        }
    }
    top.get("managers").is_some_and(any_slack)
}

/// `host:port`, `host` (port 25) or `[v6]:port`.
/// `metrics-listen`: like `local-smtp`, but the port must be given (there
/// is no default port for a metrics endpoint).
fn metrics_address(s: &str) -> Result<String, String> {
    let t = s.trim();
    let explicit_port = match t.strip_prefix('[') {
        Some(rest) => rest
            .split_once(']')
            .is_some_and(|(_, p)| p.starts_with(':')),
        None => t.rsplit_once(':').is_some_and(|(h, _)| !h.contains(':')),
    };
    if !explicit_port {
        return Err(format!(
            "{s:?} is not host:port (the port is required, e.g. 127.0.0.1:9470)"
        ));
    }
    host_port(t).map(|(h, p)| format!("{h}:{p}"))
}

fn host_port(s: &str) -> Result<(String, u16), String> {
    let s = s.trim();
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("{s:?}: unclosed `[`"))?;
        (h, after.strip_prefix(':'))
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err(format!("{s:?} is not host:port"));
    }
    let port = match port {
        None => 25,
        Some(p) => match p.parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => return Err(format!("{p:?} is not a port number (1-65535)")),
        },
    };
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    Ok((host, port))
}

fn read_remote(r: &mut Reader, n: &Node) -> Option<SmtpConfig> {
    let base = |host: String, port: u16| SmtpConfig {
        host,
        port,
        tls: SmtpTls::None,
        ca_file: None,
        username: None,
        password: None,
        timeout: Duration::from_secs(60),
    };
    if let Kind::Map(_) = n.kind {
        let m = r.map(n, "remote-smtp")?;
        r.known_keys_strict(&m, "remote-smtp", REMOTE_KEYS);
        let host = r.required_string(&m, "remote-smtp", "host");
        let port = m
            .get("port")
            .and_then(|p| r.int(p, "remote-smtp.port", 1, 65535))
            .unwrap_or(25) as u16;
        let mut cfg = base(host.clone().unwrap_or_default(), port);
        if let Some(t) = m.get("tls") {
            cfg.tls = match r.string(t, "remote-smtp.tls").as_deref() {
                None | Some("none") => SmtpTls::None,
                Some("starttls") => SmtpTls::StartTls,
                Some("opportunistic") => SmtpTls::Opportunistic,
                Some("tls") | Some("implicit") => SmtpTls::Implicit,
                Some(other) => {
                    r.problem(
                        t.line,
                        "remote-smtp.tls",
                        format!(
                            "unknown value {other:?}; use none, starttls, opportunistic or tls"
                        ),
                    );
                    SmtpTls::None
                }
            };
        }
        if let Some(c) = m.get("ca-file") {
            cfg.ca_file = r.string(c, "remote-smtp.ca-file").map(PathBuf::from);
            if let Some(p) = &cfg.ca_file {
                if !p.is_file() {
                    r.problem(
                        c.line,
                        "remote-smtp.ca-file",
                        format!("{} is not a readable file", p.display()),
                    );
                }
            }
        }
        cfg.username = m
            .get("username")
            .and_then(|u| r.string(u, "remote-smtp.username"));
        cfg.password = m
            .get("password")
            .and_then(|u| r.secret(u, "remote-smtp.password"));
        if cfg.username.is_some() != cfg.password.is_some() {
            r.problem(
                n.line,
                "remote-smtp.username",
                "SMTP AUTH needs both username and password",
            );
        }
        if let Some(t) = m.get("timeout") {
            if let Some(s) = r.int(t, "remote-smtp.timeout", 1, 3600) {
                cfg.timeout = Duration::from_secs(s);
            }
        }
        return host.map(|_| cfg);
    }
    let s = r.string(n, "remote-smtp")?;
    match host_port(&s) {
        Ok((h, p)) => Some(base(h.trim_matches(['[', ']']).to_string(), p)),
        Err(e) => {
            r.problem(n.line, "remote-smtp", e);
            None
        }
    }
}

fn read_server(r: &mut Reader, n: &Node) -> ServerSettings {
    let mut s = ServerSettings::default();
    let Some(m) = r.map(n, "mailgend") else {
        return s;
    };
    r.known_keys_strict(&m, "mailgend", SERVER_KEYS);
    let key = |k: &str| format!("mailgend.{k}");
    if let Some(v) = m.get("spool") {
        if let Some(p) = r.string(v, &key("spool")) {
            s.spool_dir = PathBuf::from(p);
        }
    }
    let int = |r: &mut Reader, k: &str, min: u64, max: u64| {
        m.get(k).and_then(|v| r.int(v, &key(k), min, max))
    };
    if let Some(v) = int(r, "max-message-size", 1024, 1 << 30) {
        s.max_message_size = v as usize;
    }
    if let Some(v) = int(r, "max-connections", 1, 100_000) {
        s.max_connections = v as usize;
    }
    if let Some(v) = int(r, "max-connections-per-client", 0, 100_000) {
        s.max_connections_per_client = v as usize;
    }
    if let Some(v) = int(r, "max-recipients", 1, 100_000) {
        s.max_recipients = v as usize;
    }
    if let Some(v) = int(r, "max-messages-per-connection", 0, 100_000_000) {
        s.max_messages_per_connection = v as usize;
    }
    if let Some(v) = int(r, "max-received", 1, 1000) {
        s.max_received = v as usize;
    }
    if let Some(v) = m.get("case-insensitive") {
        match r.string(v, &key("case-insensitive")).as_deref() {
            Some("true" | "yes" | "on") => s.case_insensitive = true,
            Some("false" | "no" | "off") => s.case_insensitive = false,
            Some(other) => r.problem(
                v.line,
                &key("case-insensitive"),
                format!("{other:?} is not true or false"),
            ),
            None => {}
        }
    }
    if let Some(v) = int(r, "command-timeout", 1, 3600) {
        s.command_timeout = Duration::from_secs(v);
    }
    if let Some(v) = int(r, "data-timeout", 1, 86400) {
        s.data_timeout = Duration::from_secs(v);
    }
    let secs = |r: &mut Reader, k: &str, min: f64, max: f64| {
        m.get(k).and_then(|v| r.seconds(v, &key(k), min, max))
    };
    if let Some(v) = secs(r, "auth-failure-delay", 0.0, 60.0) {
        s.auth_failure_delay = v;
    }
    if let Some(v) = int(r, "auth-failure-limit", 1, 1_000_000) {
        s.auth_failure_limit = v as u32;
    }
    if let Some(v) = secs(r, "auth-failure-window", 1.0, 86400.0) {
        s.auth_failure_window = v;
    }
    if let Some(v) = int(r, "outbound-connections", 1, 1000) {
        s.outbound_connections = v as u32;
    }
    if let Some(v) = m.get("metrics-listen") {
        if let Some(text) = r.string(v, &key("metrics-listen")) {
            match metrics_address(&text) {
                Ok(a) => s.metrics_listen = Some(a),
                Err(e) => r.problem(v.line, &key("metrics-listen"), e),
            }
        }
    }
    let file = |r: &mut Reader, k: &str| {
        let v = m.get(k)?;
        let p = PathBuf::from(r.string(v, &key(k))?);
        if !p.is_file() {
            r.problem(
                v.line,
                &key(k),
                format!("{} is not a readable file", p.display()),
            );
        }
        Some(p)
    };
    let cert = file(r, "tls-cert");
    let tls_key = file(r, "tls-key");
    match (cert, tls_key) {
        (Some(cert_file), Some(key_file)) => {
            s.tls = Some(TlsFiles {
                cert_file,
                key_file,
            })
        }
        (None, None) => {}
        _ => r.problem(
            m.line(),
            "mailgend.tls-cert",
            "STARTTLS needs both tls-cert and tls-key",
        ),
    }
    let user = m
        .get("auth-user")
        .and_then(|v| r.string(v, &key("auth-user")));
    let password = m
        .get("auth-password")
        .and_then(|v| r.secret(v, &key("auth-password")));
    match (user, password) {
        (Some(username), Some(password)) => {
            if username.is_empty() || password.is_empty() {
                r.problem(
                    m.line(),
                    "mailgend.auth-user",
                    "auth-user and auth-password must not be empty",
                );
            }
            s.auth = Some(Credentials { username, password })
        }
        (None, None) => {}
        _ => r.problem(
            m.line(),
            "mailgend.auth-user",
            "AUTH needs both auth-user and auth-password",
        ),
    }
    s
}

fn read_managers(r: &mut Reader, n: &Node, have_slack: bool) -> Vec<ManagerConfig> {
    let Some(items) = r.list(n, "managers") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let k = format!("managers[{i}]");
        if let Some(m) = read_manager(r, item, &k, have_slack) {
            // The first match wins: a later manager wanting exactly the
            // same mail never sees any (mail2alert ran so too, server.py:100-109).
            if let Some(first) = out
                .iter()
                .position(|o: &ManagerConfig| o.wanted == m.wanted)
            {
                r.oddity(
                    m.line,
                    &format!("{k}.messages-we-want"),
                    format!(
                        "managers[{first}] (line {}) already wants the same mail; this manager never gets any",
                        out[first].line
                    ),
                );
            }
            out.push(m);
        }
    }
    out
}

fn read_manager(r: &mut Reader, n: &Node, k: &str, have_slack: bool) -> Option<ManagerConfig> {
    let m = r.map(n, k)?;
    let name = r.required_string(&m, k, "name")?;
    let Some(spec) = managers::lookup(&name) else {
        let known: Vec<_> = managers::MANAGERS.iter().map(|m| m.name).collect();
        r.problem(
            m.get("name").map_or(n.line, |v| v.line),
            &format!("{k}.name"),
            format!("unknown manager {name:?}; known: {}", known.join(", ")),
        );
        return None;
    };
    let mut known = MANAGER_KEYS.to_vec();
    known.extend_from_slice(spec.extra_keys);
    r.known_keys(&m, k, &known);

    let wanted = match m.get("messages-we-want") {
        None => {
            // mail2alert failed on every message (KeyError, plugin/mail.py:37).
            r.problem(
                n.line,
                &format!("{k}.messages-we-want"),
                "missing (`to:` or `from:` an address)",
            );
            None
        }
        Some(w) => read_wanted(r, w, &format!("{k}.messages-we-want")),
    };
    let rules = match m.get("rules") {
        None => {
            // mail2alert failed on every wanted message (KeyError,
            // plugin/mail.py:53).
            r.problem(
                n.line,
                &format!("{k}.rules"),
                "missing (a list of rules; `[]` for none)",
            );
            Vec::new()
        }
        Some(rn) => {
            let mut rules = Vec::new();
            if let Some(items) = r.list(rn, &format!("{k}.rules")) {
                for (j, item) in items.iter().enumerate() {
                    let rk = format!("{k}.rules[{j}]");
                    if let Some(rule) = read_rule(r, item, &rk, spec, have_slack) {
                        rules.push(rule);
                    }
                }
            }
            rules
        }
    };
    let settings = (spec.parse)(r, &m, k, &rules);
    let wanted = wanted?;
    Some(ManagerConfig {
        name,
        line: n.line,
        wanted: wanted?,
        rules,
        settings,
    })
}

/// `Some(None)`: readable, but the manager never wants anything (mail2alert
/// ran such a manager; it never took a message, plugin/mail.py:42-45).
fn read_wanted(r: &mut Reader, n: &Node, k: &str) -> Option<Option<Wanted>> {
    let m = r.map(n, k)?;
    r.known_keys(&m, k, &["to", "from"]);
    let address = |r: &mut Reader, key: &str| -> Option<String> {
        let v = m.get(key)?;
        let s = r.string(v, &format!("{k}.{key}"))?;
        match crate::notify::mail::parse_recipient(&s) {
            Ok(a) if a.display_name().is_none() && !s.contains('<') => Some(s.trim().to_string()),
            _ => {
                // mail2alert compared the text with the envelope as it was.
                r.oddity(
                    v.line,
                    &format!("{k}.{key}"),
                    format!(
                        "{s:?} is not a bare address; compared as it is with the envelope, it never matches"
                    ),
                );
                Some(s)
            }
        }
    };
    let to = m.get("to").is_some_and(|v| !v.is_null());
    let from = m.get("from").is_some_and(|v| !v.is_null());
    match (to, from) {
        (true, false) => address(r, "to").map(|a| Some(Wanted::To(a))),
        (false, true) => address(r, "from").map(|a| Some(Wanted::From(a))),
        (true, true) => {
            r.oddity(
                n.line,
                k,
                "both `to` and `from`: `from` is ignored, as mail2alert ignored it (plugin/mail.py:42-45)",
            );
            address(r, "to").map(|a| Some(Wanted::To(a)))
        }
        (false, false) => {
            r.oddity(
                n.line,
                k,
                "neither `to:` nor `from:`: this manager never gets any mail (as in mail2alert)",
            );
            Some(None)
        }
    }
}

fn read_rule(
    r: &mut Reader,
    n: &Node,
    k: &str,
    spec: &managers::ManagerSpec,
    have_slack: bool,
) -> Option<RuleConfig> {
    let m = r.map(n, k)?;
    r.known_keys(&m, k, &["actions", "filter", "name", "owner"]);
    let text = |r: &mut Reader, key: &str| {
        m.get(key)
            .filter(|v| !v.is_null())
            .and_then(|v| r.string(v, &format!("{k}.{key}")))
    };
    let name = text(r, "name");
    let owner = text(r, "owner");
    let ak = format!("{k}.actions");
    let actions = match m.get("actions") {
        None => {
            // rules.py:9: no actions, the rule does nothing.
            r.oddity(
                n.line,
                &ak,
                "missing: the rule does nothing (as in mail2alert)",
            );
            Some(Vec::new())
        }
        Some(a) => r.list(a, &ak).map(|items| {
            if items.is_empty() {
                r.oddity(
                    a.line,
                    &ak,
                    "empty: the rule does nothing (as in mail2alert)",
                );
            }
            let mut out = Vec::new();
            for (i, item) in items.iter().enumerate() {
                let ik = format!("{ak}[{i}]");
                let Some(uri) = r.string(item, &ik) else {
                    continue;
                };
                match actions::parse(&uri) {
                    Ok(actions::Parsed::Action(act)) => {
                        if matches!(act, Action::Slack { .. }) && !have_slack {
                            r.problem(item.line, &ik, "Slack action but no top-level slack-token");
                        }
                        out.push(act)
                    }
                    Ok(actions::Parsed::Odd(act, why)) => {
                        r.oddity(item.line, &ik, why);
                        out.extend(act);
                    }
                    Err(e) => r.problem(item.line, &ik, e),
                }
            }
            out
        }),
    };
    let fk = format!("{k}.filter");
    let Some(f) = m.get("filter") else {
        // mail2alert failed on every message the rule saw (rules.py:21).
        r.problem(n.line, &fk, "missing (`function:` and its `args:`)");
        return None;
    };
    let fm = r.map(f, &fk)?;
    let mut fkeys = vec!["function", "args"];
    if spec.has_events {
        fkeys.push("events");
    }
    r.known_keys(&fm, &fk, &fkeys);
    let fname = r.required_string(&fm, &fk, "function")?;
    let fnode = fm.get("function").expect("required_string checked it");
    let args: Vec<String> = match fm.get("args") {
        None => Vec::new(),
        Some(a) => {
            let ak = format!("{fk}.args");
            match r.list(a, &ak) {
                None => return None,
                // Expanded like every other string (config.py:24-41): a
                // rule `args: [$GROUP]` means the variable's value.
                Some(items) => items
                    .iter()
                    .enumerate()
                    .filter_map(|(i, it)| r.string(it, &format!("{ak}[{i}]")))
                    .collect(),
            }
        }
    };
    let function = match rules::lookup(&fname) {
        Some(fs) if fs.manager == spec.name => {
            let n_args = args.len();
            if n_args < fs.min_args || n_args > fs.max_args {
                let want = match (fs.min_args, fs.max_args) {
                    (a, b) if a == b => format!("{a}"),
                    (a, usize::MAX) => format!("at least {a}"),
                    (a, b) => format!("{a} to {b}"),
                };
                r.problem(
                    fm.get("args").map_or(fnode.line, |a| a.line),
                    &format!("{fk}.args"),
                    format!(
                        "{fname} takes {want} argument(s) ({}), {n_args} given",
                        if fs.usage.is_empty() {
                            "none"
                        } else {
                            fs.usage
                        }
                    ),
                );
                None
            } else {
                match (fs.build)(&args) {
                    Ok(f) => Some(f),
                    Err(e) => {
                        r.problem(
                            fm.get("args").map_or(fnode.line, |a| a.line),
                            &format!("{fk}.args"),
                            e,
                        );
                        None
                    }
                }
            }
        }
        other => {
            let reason = match other {
                Some(fs) => format!(
                    "{fname} is a rule function of the {} manager, not of {}",
                    fs.manager, spec.name
                ),
                None => format!(
                    "unknown rule function {fname:?}; the {} manager has: {}",
                    spec.name,
                    rules::names_for(spec.name).join(", ")
                ),
            };
            r.problem(fnode.line, &format!("{fk}.function"), reason);
            None
        }
    };
    let events = match fm.get("events") {
        None => None,
        Some(e) => read_events(r, e, &format!("{fk}.events")),
    };
    Some(RuleConfig {
        line: n.line,
        name,
        owner,
        actions: actions?,
        function_name: fname,
        args,
        function: function?,
        events,
    })
}

/// `filter.events`. mail2alert tested `event.name in events`
/// (plugin/gocd.py:223): with a list, membership of the exact upper-case
/// name; with a string, Python's substring test, so `events: BREAKS`
/// means BREAKS and `events: "BREAKS, FIXED"` both (no event name is part
/// of another).
fn read_events(r: &mut Reader, e: &Node, ek: &str) -> Option<Vec<Event>> {
    let names = |events: &[Event]| {
        let n: Vec<_> = events.iter().map(|e| e.name()).collect();
        format!("[{}]", n.join(", "))
    };
    match &e.kind {
        Kind::Scalar { .. } if !e.is_null() => {
            let s = r.string(e, ek)?;
            let found: Vec<Event> = Event::ALL
                .into_iter()
                .filter(|ev| s.contains(ev.name()))
                .collect();
            r.oddity(
                e.line,
                ek,
                format!(
                    "a string, not a list: matched as mail2alert matched it (by substring), i.e. {}",
                    names(&found)
                ),
            );
            Some(found)
        }
        _ => {
            let items = r.list(e, ek)?;
            let mut out = Vec::new();
            for (i, it) in items.iter().enumerate() {
                let ik = format!("{ek}[{i}]");
                let Some(s) = r.string(it, &ik) else { continue };
                match Event::parse(&s) {
                    Some(ev) => out.push(ev),
                    None => r.oddity(
                        it.line,
                        &ik,
                        format!(
                            "unknown event {s:?}: never matches (as in mail2alert); the events are {}",
                            Event::ALL.map(|e| e.name()).join(", ")
                        ),
                    ),
                }
            }
            if out.is_empty() {
                r.oddity(
                    e.line,
                    ek,
                    "no known event: the rule never matches (as in mail2alert)",
                );
            }
            Some(out)
        }
    }
}

/// A mapping with its keys as strings (duplicates reported).
pub struct MapView<'n> {
    node: &'n Node,
    entries: Vec<(&'n str, &'n Node, &'n Node)>,
}

impl<'n> MapView<'n> {
    pub fn get(&self, key: &str) -> Option<&'n Node> {
        self.entries.iter().find(|e| e.0 == key).map(|e| e.2)
    }
    pub fn line(&self) -> usize {
        self.node.line
    }
}

/// Reads typed values out of the YAML tree, collecting every problem.
pub struct Reader<'e> {
    file: String,
    problems: Vec<RouteConfigProblem>,
    oddities: Vec<RouteConfigProblem>,
    /// Secrets written into the file itself (not `$VAR`): line and key.
    literal_secrets: Vec<(usize, String)>,
    env: &'e dyn Fn(&str) -> Option<String>,
}

impl Reader<'_> {
    pub fn problem(&mut self, line: usize, key: &str, reason: impl Into<String>) {
        self.problems.push(RouteConfigProblem {
            file: self.file.clone(),
            line: Some(line),
            key: key.to_string(),
            reason: reason.into(),
        });
    }

    /// Something mail2alert ran with: accepted, and one WARN.
    pub fn oddity(&mut self, line: usize, key: &str, reason: impl Into<String>) {
        self.oddities.push(RouteConfigProblem {
            file: self.file.clone(),
            line: Some(line),
            key: key.to_string(),
            reason: reason.into(),
        });
    }

    pub fn map<'n>(&mut self, n: &'n Node, key: &str) -> Option<MapView<'n>> {
        let Kind::Map(entries) = &n.kind else {
            self.problem(
                n.line,
                key,
                format!("must be a mapping (key: value), found {}", n.kind_name()),
            );
            return None;
        };
        let mut view = MapView {
            node: n,
            entries: Vec::new(),
        };
        for (k, v) in entries {
            let Some(name) = k.scalar() else {
                self.problem(k.line, key, "keys must be plain strings");
                continue;
            };
            if let Some(i) = view.entries.iter().position(|e| e.0 == name) {
                // PyYAML keeps the last one.
                self.oddity(
                    k.line,
                    &join(key, name),
                    format!(
                        "given twice; the last one counts (as in mail2alert), line {} is ignored",
                        view.entries[i].1.line
                    ),
                );
                view.entries.remove(i);
            }
            view.entries.push((name, k, v));
        }
        Some(view)
    }

    /// Unknown keys in mail2alert's part of the file are ignored, as
    /// mail2alert ignored them, with a WARN and a hint when one is close
    /// to a known key (`event` → `events`: that rule then matches every
    /// event, as it did in mail2alert).
    pub fn known_keys(&mut self, m: &MapView<'_>, key: &str, known: &[&str]) {
        for (name, k, _) in &m.entries {
            if !known.contains(name) {
                let hint = known
                    .iter()
                    .find(|c| close(name, c))
                    .map(|c| format!("; did you mean `{c}`?"))
                    .unwrap_or_else(|| format!("; known here: {}", known.join(", ")));
                self.oddity(
                    k.line,
                    &join(key, name),
                    format!("unknown key, ignored (as by mail2alert){hint}"),
                );
            }
        }
    }

    /// Unknown keys in our own sections (`mailgend:`, the `remote-smtp`
    /// mapping) are errors: mail2alert never read these, so nothing runs
    /// with them yet.
    pub fn known_keys_strict(&mut self, m: &MapView<'_>, key: &str, known: &[&str]) {
        for (name, k, _) in &m.entries {
            if !known.contains(name) {
                let hint = known
                    .iter()
                    .find(|c| close(name, c))
                    .map(|c| format!("; did you mean `{c}`?"))
                    .unwrap_or_else(|| format!("; known here: {}", known.join(", ")));
                self.problem(k.line, &join(key, name), format!("unknown key{hint}"));
            }
        }
    }

    pub fn list<'n>(&mut self, n: &'n Node, key: &str) -> Option<&'n [Node]> {
        match &n.kind {
            Kind::Seq(items) => Some(items),
            _ => {
                self.problem(
                    n.line,
                    key,
                    format!("must be a list, found {}", n.kind_name()),
                );
                None
            }
        }
    }

    /// A scalar with `$NAME` / `${NAME}` replaced from the environment (as
    /// mail2alert did); an unset variable stays as it is written, with a
    /// WARN naming it (never its neighbourhood: it may be in a password).
    pub fn string(&mut self, n: &Node, key: &str) -> Option<String> {
        let s = self.literal_string(n, key)?;
        let (v, unset) = expand_env(&s, self.env);
        for var in unset {
            self.oddity(
                n.line,
                key,
                format!("environment variable ${var} is not set; kept as the text `${var}` (as by mail2alert)"),
            );
        }
        Some(v)
    }

    /// A string that is a secret (password, token): as [`Self::string`],
    /// noting when it is written in the file rather than taken from the
    /// environment, so that the file's mode is checked.
    pub fn secret(&mut self, n: &Node, key: &str) -> Option<String> {
        if matches!(&n.kind, Kind::Scalar { value, .. } if !value.contains('$')) {
            self.literal_secrets.push((n.line, key.to_string()));
        }
        self.string(n, key)
    }

    pub fn literal_string(&mut self, n: &Node, key: &str) -> Option<String> {
        match &n.kind {
            Kind::Scalar { value, .. } if !n.is_null() => Some(value.clone()),
            _ => {
                self.problem(
                    n.line,
                    key,
                    format!("must be a string, found {}", n.kind_name()),
                );
                None
            }
        }
    }

    pub fn required_string(&mut self, m: &MapView<'_>, key: &str, name: &str) -> Option<String> {
        let full = join(key, name);
        match m.get(name) {
            None => {
                self.problem(m.line(), &full, "missing");
                None
            }
            Some(v) => {
                let s = self.string(v, &full)?;
                if s.trim().is_empty() {
                    self.problem(v.line, &full, "must not be empty");
                    return None;
                }
                Some(s)
            }
        }
    }

    pub fn int(&mut self, n: &Node, key: &str, min: u64, max: u64) -> Option<u64> {
        let s = self.string(n, key)?;
        match s.trim().parse::<u64>() {
            Ok(v) if (min..=max).contains(&v) => Some(v),
            Ok(v) => {
                self.problem(n.line, key, format!("{v} is out of range {min}..={max}"));
                None
            }
            Err(_) => {
                self.problem(n.line, key, format!("{s:?} is not a whole number"));
                None
            }
        }
    }

    /// A duration in seconds (whole or fractional).
    pub fn seconds(&mut self, n: &Node, key: &str, min: f64, max: f64) -> Option<Duration> {
        let s = self.string(n, key)?;
        match s.trim().parse::<f64>() {
            Ok(v) if (min..=max).contains(&v) => Some(Duration::from_secs_f64(v)),
            _ => {
                self.problem(
                    n.line,
                    key,
                    format!("{s:?} is not a number of seconds in {min}..={max}"),
                );
                None
            }
        }
    }
}

fn join(key: &str, name: &str) -> String {
    if key.is_empty() {
        name.to_string()
    } else {
        format!("{key}.{name}")
    }
}

/// Close enough to suggest: differs by case, `-`/`_`, a trailing `s`, or
/// one edit.
fn close(a: &str, b: &str) -> bool {
    let norm = |s: &str| s.to_ascii_lowercase().replace('_', "-");
    let (a, b) = (norm(a), norm(b));
    if a == b || a.trim_end_matches('s') == b.trim_end_matches('s') {
        return true;
    }
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    if a.len().abs_diff(b.len()) > 1 {
        return false;
    }
    // Optimal string alignment distance ≤ 1 (one insertion, deletion,
    // substitution or swap of neighbours: `remote-smpt`).
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            d[i][j] = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d[i][j] = d[i][j].min(d[i - 2][j - 2] + 1);
            }
        }
    }
    d[a.len()][b.len()] <= 1
}

/// Python's `os.path.expandvars` (posixpath), which mail2alert applied
/// to every string (config.py:4,27,37): `$NAME` (NAME of ASCII letters,
/// digits, `_`) and `${ANYTHING}` are replaced when set and left as
/// written when not; any other `$` stays. A replacement is not expanded
/// again. Returns the text and the names that were not set.
pub fn expand_env(s: &str, env: &dyn Fn(&str) -> Option<String>) -> (String, Vec<String>) {
    let mut out = String::with_capacity(s.len());
    let mut unset = Vec::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let (name, consumed) = if let Some(b) = after.strip_prefix('{') {
            match b.find('}') {
                Some(j) => (&b[..j], j + 2),
                None => ("", 0),
            }
        } else {
            let len = after
                .find(|c: char| !(c == '_' || c.is_ascii_alphanumeric()))
                .unwrap_or(after.len());
            (&after[..len], len)
        };
        if consumed == 0 || (name.is_empty() && !after.starts_with('{')) {
            out.push('$');
            rest = after;
            continue;
        }
        match env(name) {
            Some(v) => out.push_str(&v),
            None => {
                out.push('$');
                out.push_str(&after[..consumed]);
                if !name.is_empty() && !unset.iter().any(|u| u == name) {
                    unset.push(name.to_string());
                }
            }
        }
        rest = &after[consumed..];
    }
    out.push_str(rest);
    (out, unset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_expansion() {
        let env = |n: &str| match n {
            "GOUSER" => Some("olle".to_string()),
            _ => None,
        };
        let ok = |s: &str| expand_env(s, &env).0;
        // As Python's os.path.expandvars (config.py:4).
        assert_eq!(ok("$GOUSER"), "olle");
        assert_eq!(ok("a${GOUSER}b"), "aolleb");
        assert_eq!(ok("x$ y$"), "x$ y$");
        assert_eq!(ok("(.+)-release.*$"), "(.+)-release.*$");
        assert_eq!(ok("pa$$word"), "pa$$word");
        assert_eq!(ok("$GOUSER$GOUSER"), "olleolle");
        assert_eq!(ok("${}"), "${}");
        assert_eq!(ok("${GOUSER"), "${GOUSER");
        assert_eq!(
            expand_env("$GOPASS:${NOPE}x", &env),
            (
                "$GOPASS:${NOPE}x".to_string(),
                vec!["GOPASS".into(), "NOPE".into()]
            )
        );
    }

    #[test]
    fn metrics_addresses() {
        assert_eq!(metrics_address("127.0.0.1:9470").unwrap(), "127.0.0.1:9470");
        assert_eq!(metrics_address("[::1]:9470").unwrap(), "[::1]:9470");
        assert_eq!(metrics_address("localhost:9").unwrap(), "localhost:9");
        assert!(metrics_address("127.0.0.1").is_err());
        assert!(metrics_address("::1").is_err());
        assert!(metrics_address("[::1]").is_err());
        assert!(metrics_address("x:0").is_err());
    }

    #[test]
    fn host_ports() {
        assert_eq!(
            host_port("localhost:1025").unwrap(),
            ("localhost".into(), 1025)
        );
        assert_eq!(host_port("mx").unwrap(), ("mx".into(), 25));
        assert_eq!(host_port("[::1]:2525").unwrap(), ("[::1]".into(), 2525));
        assert!(host_port("x:99999").is_err());
        assert!(host_port(":25").is_err());
    }

    #[test]
    fn close_keys() {
        assert!(close("event", "events"));
        assert!(close("fuction", "function"));
        assert!(close("remote-smpt", "remote-smtp"));
        assert!(close("messages_we_want", "messages-we-want"));
        assert!(!close("colour", "rules"));
    }
}
