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
//!
//! The sections are read in `server` (`remote-smtp`, `mailgend:`) and
//! `manager_section` (`managers:`), the typed values by `reader`; the
//! YAML itself by `yaml`.

mod manager_section;
mod reader;
mod server;
mod yaml;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use reader::{expand_env, MapView, Reader};
pub use yaml::{Kind, Node};

use manager_section::read_managers;
use server::{host_port, read_remote, read_server};

use crate::route::actions::{self, Action};
use crate::route::managers::{self, gocd::Event};
use crate::route::rules::{self, RuleFunction};
use crate::shared::problem::Problems;
use crate::shared::smtp::{SmtpConfig, SmtpTls};

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
    /// `bounces-config`: the notifier's JSON configuration; with
    /// `mailgend.verp` set there, mail to its VERP addresses is taken as
    /// bounces and recorded in its database (`route::verp`).
    pub bounces_config: Option<PathBuf>,
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
            bounces_config: None,
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
pub type RouteConfigProblem = crate::shared::problem::LocatedProblem;

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
        problems: Problems::new(),
        literal_secrets: Vec::new(),
        env: &|name| std::env::var(name).ok(),
    };
    let root = match yaml::parse(text) {
        Ok(n) => n,
        Err(e) => {
            return Err(RouteConfigError(vec![RouteConfigProblem {
                file: r.file,
                line: Some(e.line),
                key: String::new(),
                reason: e.reason,
            }]));
        }
    };
    let cfg = read_root(&mut r, &root, path);
    let literal_secrets = std::mem::take(&mut r.literal_secrets);
    let (mut problems, oddities) = match (r.problems.finish(), cfg) {
        (Ok(mut oddities), Some(mut cfg)) => {
            oddities.sort_by_key(|p| p.line);
            cfg.warnings = oddities;
            cfg.exposed_secrets = exposed_secrets(&cfg, &literal_secrets);
            return Ok(cfg);
        }
        (Ok(oddities), None) => (Vec::new(), oddities),
        (Err(refusal), _) => (refusal.problems, refusal.warnings),
    };
    // The oddities too, marked, so that a refused file shows what led to
    // the problem (`filtre:` ignored, so `filter` is missing).
    for mut o in oddities {
        o.reason = format!("warning: {}", o.reason);
        problems.push(o);
    }
    problems.sort_by_key(|p| p.line);
    Err(RouteConfigError(problems))
}

const TOP_KEYS: &[&str] = &[
    "local-smtp",
    "remote-smtp",
    "managers",
    "slack-token",
    "slack-url",
    "mailgend",
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

#[cfg(test)]
mod tests {
    use super::server::metrics_address;
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
    fn typos_get_a_hint() {
        use crate::shared::did_you_mean::did_you_mean;
        assert_eq!(did_you_mean("event", &["events"]), Some("events"));
        assert_eq!(did_you_mean("fuction", &["function"]), Some("function"));
        assert_eq!(
            did_you_mean("remote-smpt", &["remote-smtp"]),
            Some("remote-smtp")
        );
        assert_eq!(
            did_you_mean("messages_we_want", &["messages-we-want"]),
            Some("messages-we-want")
        );
        assert_eq!(did_you_mean("colour", &["rules"]), None);
    }
}
