//! Typed reads out of the merged JSON that collect every problem instead
//! of stopping at the first.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::files::Merged;
use crate::shared::problem::Problems;

use super::{ConfigProblem, OpenPgpConfig};

/// Reads typed values out of the merged JSON, collecting every problem.
pub(super) struct Reader<'a> {
    pub(super) merged: &'a Merged,
    pub(super) problems: Problems,
}

impl<'a> Reader<'a> {
    /// `key` with the file it came from.
    fn at(&self, key: &str, reason: impl Into<String>) -> ConfigProblem {
        ConfigProblem {
            file: self.merged.origin_of(key),
            line: None,
            key: key.to_string(),
            reason: reason.into(),
        }
    }

    pub(super) fn problem(&mut self, key: &str, reason: impl Into<String>) {
        let p = self.at(key, reason);
        self.problems.refuse(p);
    }

    pub(super) fn lookup(&self, key: &str) -> Option<&'a Value> {
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
    pub(super) fn warn_exposed_secrets(&mut self, openpgp: &OpenPgpConfig, key_file_key: &str) {
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
    pub(super) fn warn(&mut self, key: &str, reason: impl Into<String>) {
        let p = self.at(key, reason);
        self.problems.warn(p);
    }

    pub(super) fn section(&mut self, key: &str, known: &[&str]) -> bool {
        match self.lookup(key) {
            None => false,
            Some(Value::Object(map)) => {
                for k in map.keys() {
                    if !known.contains(&k.as_str()) {
                        let full = format!("{key}.{k}");
                        self.warn(&full, unknown_key(k, known));
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

    pub(super) fn string(&mut self, key: &str) -> Option<String> {
        match self.lookup(key) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => {
                self.problem(key, format!("must be a string, found {}", kind(other)));
                None
            }
        }
    }

    pub(super) fn required_string(&mut self, key: &str) -> String {
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

    pub(super) fn bool(&mut self, key: &str, default: bool) -> bool {
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
    pub(super) fn ports(&mut self, key: &str, hosts: usize) -> Vec<u16> {
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
    pub(super) fn choice<T>(
        &mut self,
        key: &str,
        names: &[&str],
        parse: fn(&str) -> Option<T>,
    ) -> Option<T> {
        let s = self.string(key)?;
        let v = parse(&s);
        if v.is_none() {
            self.problem(key, format!("{s:?} is not one of {}", names.join(", ")));
        }
        v
    }

    pub(super) fn existing_file(&mut self, key: &str, p: &Path) {
        if !p.is_file() {
            self.problem(key, format!("{} is not a readable file", p.display()));
        }
    }

    pub(super) fn integer(&mut self, key: &str, min: i64, max: i64) -> Option<i64> {
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

/// Unknown keys are ignored, as intelmqcbmail ignored them, with a WARN
/// that names the likely intended key.
pub(super) fn unknown_key(k: &str, known: &[&str]) -> String {
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
