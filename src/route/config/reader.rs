//! Reading typed values out of the YAML tree: [`Reader`] collects every
//! problem and oddity with its line and key; [`expand_env`] is
//! mail2alert's `$VAR` expansion.

use super::*;
use crate::shared::problem::Problems;

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
    pub(super) file: String,
    /// Problems refuse the file; oddities (what mail2alert ran with) are
    /// its warnings.
    pub(super) problems: Problems,
    /// Secrets written into the file itself (not `$VAR`): line and key.
    pub(super) literal_secrets: Vec<(usize, String)>,
    pub(super) env: &'e dyn Fn(&str) -> Option<String>,
}

impl Reader<'_> {
    pub fn problem(&mut self, line: usize, key: &str, reason: impl Into<String>) {
        self.problems.refuse(RouteConfigProblem {
            file: self.file.clone(),
            line: Some(line),
            key: key.to_string(),
            reason: reason.into(),
        });
    }

    /// Something mail2alert ran with: accepted, and one WARN.
    pub fn oddity(&mut self, line: usize, key: &str, reason: impl Into<String>) {
        self.problems.warn(RouteConfigProblem {
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
                let hint = hint(name, known);
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
                let hint = hint(name, known);
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

pub(super) fn join(key: &str, name: &str) -> String {
    if key.is_empty() {
        name.to_string()
    } else {
        format!("{key}.{name}")
    }
}

/// `; did you mean `k`?` for a likely typo, else the keys known here.
fn hint(name: &str, known: &[&str]) -> String {
    match crate::shared::did_you_mean::did_you_mean(name, known) {
        Some(k) => format!("; did you mean `{k}`?"),
        None => format!("; known here: {}", known.join(", ")),
    }
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
