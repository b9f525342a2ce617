//! Configuration: intelmq-mailgen's JSON files, read the way it reads them
//! (spec §8), plus mailgend's own keys (see `docs/config.md`).
//!
//! Owns finding the files, merging them one level deep (the user file
//! wins), checking every key, and turning problems into errors that name the
//! file, the key and the reason. Nothing here touches the network or the
//! database: loading a config is safe to repeat on SIGHUP.

pub mod bounces;
mod database;
mod error;
mod files;
mod openpgp;
mod reader;
mod rollback;
mod service;
mod smtp;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::Value;

use crate::shared::problem::Problems;
use crate::shared::smtp::SmtpConfig;

pub use database::{DatabaseConfig, RootCert, SessionAttrs, SslMode};
pub use error::{ConfigError, ConfigProblem};
pub use files::ConfigSource;
pub use openpgp::OpenPgpConfig;
pub use service::{InDoubtPolicy, ServiceConfig};

use files::{merge, Merged};
use reader::{unknown_key, Reader};
use rollback::rollback_problems;

/// Where the system-wide file lives unless `-c` names another.
pub const SYSTEM_CONFIG: &str = "/etc/intelmq/intelmq-mailgen.conf";
/// The per-user file, relative to `$HOME`; always read when present.
pub const USER_CONFIG: &str = ".intelmq/intelmq-mailgen.conf";

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
    pub verp: Option<crate::shared::verp::Verp>,
    pub bounce_policy: Option<bounces::Policy>,
    /// The files that were read, in merge order.
    pub files: Vec<PathBuf>,
    /// Keys to WARN about, with their file: keys not known, old spellings
    /// of relocated keys (each is logged at WARN by the caller).
    pub unknown_keys: Vec<ConfigProblem>,
    /// What would make intelmqcbmail 1.4 refuse or misread this
    /// configuration (a rollback to it); `check-config` prints them.
    pub rollback_problems: Vec<ConfigProblem>,
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
                return Err(ConfigError(vec![ConfigProblem::whole_file(
                    name,
                    "the top level must be a JSON object",
                )]))
            }
            Err(e) => {
                return Err(ConfigError(vec![ConfigProblem::whole_file(
                    name,
                    format!("not valid JSON: {e}"),
                )]))
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
            problems: Problems::new(),
        };
        for k in merged.root.keys() {
            if !TOP_KEYS.contains(&k.as_str()) {
                r.warn(k, unknown_key(k, TOP_KEYS));
            }
        }

        let database = database::read(&mut r);
        let (smtp, max_message_size) = smtp::read(&mut r);
        let (openpgp, key_file_key) = openpgp::read(&mut r);

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

        let service = service::read(&mut r);
        r.section("mailgend.verp", &["address", "key_file"]);
        r.section("mailgend.bounces", &["warn_after", "window"]);
        let bounces = bounces::settings(r.lookup("mailgend.verp"), r.lookup("mailgend.bounces"));
        bounces
            .problems
            .iter()
            .for_each(|(k, why)| r.problem(k, why));
        bounces.warnings.iter().for_each(|(k, why)| r.warn(k, why));

        r.warn_exposed_secrets(&openpgp, key_file_key);
        let unknown_keys = match r.problems.finish() {
            Ok(warnings) => warnings,
            Err(refusal) => return Err(ConfigError(refusal.problems)),
        };
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
            unknown_keys,
            rollback_problems: rollback_problems(merged),
        })
    }
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
