//! Reading and checking the format files (the language is described in
//! `docs/formats.md`). Every problem of every file is collected, each with
//! its file, key path and line, before the set is refused.
//!
//! This file walks the directory and the files and reads a rule; the
//! parts of a rule are read in [`rule_parts`], columns and computed values
//! in [`columns`], variables and template texts in [`variables`], the X-ARF
//! table in [`xarf_table`].

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::Duration;

use super::tree::{join_path, parse_document, FileProblems, Node, TableReader, Value};
use super::xarf::{self, EventField, FieldFormat, Scalar, XarfSpec};
use super::{
    Action, Computed, CopySpec, DataLocation, FormatLoadError, FormatProblem, LocationSpec,
    Matcher, Oversize, Postpone, Rule, Scope, StrMatch, TemplateChoice,
};
use crate::notify::render::table::{Column, TableFormat};
use crate::notify::render::template::{Part, Template, TemplateText};
use crate::shared::problem::Problems;

mod columns;
mod rule_parts;
mod variables;
mod xarf_table;

use columns::*;
use rule_parts::*;
use variables::*;
use xarf_table::*;

pub(super) struct Loaded {
    pub files: Vec<PathBuf>,
    pub python: Vec<PathBuf>,
    pub rules: Vec<Rule>,
}

/// Whether `name` is a format file: two ASCII digits first, `.toml` last
/// (the old tool's `[0-9][0-9]*.py` with our extension).
pub(crate) fn is_format_file_name(name: &str) -> bool {
    has_number_prefix(name) && name.ends_with(".toml")
}

fn has_number_prefix(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() >= 2 && b[0].is_ascii_digit() && b[1].is_ascii_digit()
}

pub(super) fn load_dir(dir: &Path) -> Result<Loaded, FormatLoadError> {
    let dir_name = dir.display().to_string();
    let entries = std::fs::read_dir(dir).map_err(|e| {
        FormatLoadError(vec![FormatProblem {
            file: dir_name.clone(),
            key: String::new(),
            line: None,
            reason: format!("cannot read the format directory: {e}"),
        }])
    })?;
    let mut toml_files = Vec::new();
    let mut python = Vec::new();
    let mut problems = Problems::new();
    for entry in entries {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                problems.refuse(FormatProblem {
                    file: dir_name.clone(),
                    key: String::new(),
                    line: None,
                    reason: format!("cannot list the format directory: {e}"),
                });
                continue;
            }
        };
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if is_format_file_name(name) {
            toml_files.push(entry.path());
        } else if has_number_prefix(name) && name.ends_with(".py") {
            python.push(entry.path());
        }
    }
    // Name order as the old tool's `sorted(glob(...))`: the names are
    // UTF-8, and code point order equals byte order for UTF-8.
    toml_files.sort();
    python.sort();
    if toml_files.is_empty() {
        let mut reason =
            "no format files (names starting with two digits and ending in .toml)".to_string();
        if !python.is_empty() {
            reason.push_str(&format!(
                "; the {} intelmq-mailgen Python script(s) here are not run by mailgend, \
                 see docs/formats.md for their TOML equivalents",
                python.len()
            ));
        }
        problems.refuse(FormatProblem {
            file: dir_name,
            key: String::new(),
            line: None,
            reason,
        });
    }

    let mut scope = Arc::new(Scope::default());
    let mut rules = Vec::new();
    for path in &toml_files {
        let file = path.display().to_string();
        let text = match std::fs::read(path) {
            Ok(bytes) => match String::from_utf8(bytes) {
                Ok(t) => t,
                Err(_) => {
                    problems.refuse(FormatProblem {
                        file,
                        key: String::new(),
                        line: None,
                        reason: "not valid UTF-8".into(),
                    });
                    continue;
                }
            },
            Err(e) => {
                problems.refuse(FormatProblem {
                    file,
                    key: String::new(),
                    line: None,
                    reason: format!("cannot read: {e}"),
                });
                continue;
            }
        };
        let short = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| file.clone());
        let mut p = FileProblems::new(file, &text);
        let (file_rules, next_scope) = load_file(path, &short, &text, &scope, &mut p);
        problems.append(p.found);
        rules.extend(file_rules);
        scope = next_scope;
    }
    match problems.finish() {
        Ok(_) => Ok(Loaded {
            files: toml_files,
            python,
            rules,
        }),
        Err(refusal) => Err(FormatLoadError(refusal.problems)),
    }
}

const FILE_KEYS: &[&str] = &[
    "inherit",
    "variables",
    "variables_file",
    "computed",
    "copies",
    "column_titles",
    "defaults",
    "format",
];
const DEFAULT_KEYS: &[&str] = &[
    "match",
    "postpone",
    "data_location",
    "oversize",
    "template",
    "copies",
    "variables",
    "computed",
];
const RULE_KEYS: &[&str] = &[
    "name",
    "match",
    "postpone",
    "columns",
    "data_location",
    "oversize",
    "template",
    "copies",
    "variables",
    "computed",
    "xarf",
    "reject",
    "continue",
];
const MATCH_KEYS: &[&str] = &[
    "notification_format",
    "event_data_format",
    "template_name",
    "recipient_address",
    "aggregate",
];
const POSTPONE_KEYS: &[&str] = &[
    "notification_interval",
    "min_directive_age",
    "min_observation_age",
];

/// Settings a rule can take from `[defaults]`; `None` where unset.
#[derive(Default, Clone)]
struct Settings {
    matcher: MatchParts,
    postpone: PostponeParts,
    location: Option<LocationSpec>,
    oversize: Option<Oversize>,
    template: Option<TemplateChoice>,
    copies: Option<bool>,
    variables: BTreeMap<String, String>,
    computed: Vec<(String, Computed)>,
}

#[derive(Default, Clone)]
struct MatchParts {
    notification_format: Option<StrMatch>,
    event_data_format: Option<StrMatch>,
    template_name: Option<StrMatch>,
    recipient_address: Option<StrMatch>,
    aggregate: Vec<(String, StrMatch)>,
}

impl MatchParts {
    /// `other` over `self`, key by key.
    fn overlay(&self, other: &MatchParts) -> MatchParts {
        let mut aggregate = self.aggregate.clone();
        for (k, m) in &other.aggregate {
            aggregate.retain(|(a, _)| a != k);
            aggregate.push((k.clone(), m.clone()));
        }
        MatchParts {
            notification_format: other
                .notification_format
                .clone()
                .or_else(|| self.notification_format.clone()),
            event_data_format: other
                .event_data_format
                .clone()
                .or_else(|| self.event_data_format.clone()),
            template_name: other
                .template_name
                .clone()
                .or_else(|| self.template_name.clone()),
            recipient_address: other
                .recipient_address
                .clone()
                .or_else(|| self.recipient_address.clone()),
            aggregate,
        }
    }
}

#[derive(Default, Clone, Copy)]
struct PostponeParts {
    interval: Option<bool>,
    min_directive_age: Option<Option<Duration>>,
    min_observation_age: Option<Option<Duration>>,
}

impl PostponeParts {
    fn overlay(&self, other: &PostponeParts) -> PostponeParts {
        PostponeParts {
            interval: other.interval.or(self.interval),
            min_directive_age: other.min_directive_age.or(self.min_directive_age),
            min_observation_age: other.min_observation_age.or(self.min_observation_age),
        }
    }

    fn resolve(&self) -> Postpone {
        Postpone {
            interval: self.interval.unwrap_or(false),
            min_directive_age: self.min_directive_age.flatten(),
            min_observation_age: self.min_observation_age.flatten(),
        }
    }
}

/// Reads one file: its rules, and the scope later files inherit.
fn load_file(
    path: &Path,
    short: &str,
    text: &str,
    inherited: &Arc<Scope>,
    p: &mut FileProblems,
) -> (Vec<Rule>, Arc<Scope>) {
    let doc = match parse_document(text) {
        Ok(d) => d,
        Err((reason, span)) => {
            p.add("", span.as_ref(), format!("not valid TOML: {reason}"));
            return (Vec::new(), inherited.clone());
        }
    };
    let mut top = TableReader::new("", &doc);

    // The context: shared with later files.
    let mut scope = match top.get("inherit") {
        Some(n) => match p.expect_bool("inherit", n) {
            Some(false) => Scope::default(),
            _ => (**inherited).clone(),
        },
        None => (**inherited).clone(),
    };
    if let Some(n) = top.get("variables_file") {
        let base = path.parent().unwrap_or(Path::new("."));
        match &n.value {
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    read_variables_file(
                        base,
                        &format!("variables_file[{i}]"),
                        item,
                        &mut scope.variables,
                        p,
                    );
                }
            }
            _ => read_variables_file(base, "variables_file", n, &mut scope.variables, p),
        }
    }
    if let Some(n) = top.get("variables") {
        read_variables("variables", n, &mut scope.variables, p);
    }
    if let Some(n) = top.get("computed") {
        read_computed("computed", n, &mut scope.computed, p);
    }
    if let Some(n) = top.get("copies") {
        read_copies("copies", n, &mut scope.copies, p);
    }
    let scope = Arc::new(scope);

    // This file only.
    let mut titles: BTreeMap<String, String> = BTreeMap::new();
    if let Some(n) = top.get("column_titles") {
        if let Some(mut t) = p.table("column_titles", n) {
            for (k, v) in t.all() {
                if let Some(s) = p.expect_str(&join_path("column_titles", k), v) {
                    titles.insert(k.clone(), s.to_string());
                }
            }
        }
    }
    let defaults = match top.get("defaults") {
        Some(n) => read_settings("defaults", n, DEFAULT_KEYS, p).unwrap_or_default(),
        None => Settings::default(),
    };

    let mut rules = Vec::new();
    if let Some(n) = top.get("format") {
        if let Some(items) = p.expect_array("format", n) {
            let mut names = HashSet::new();
            for (i, item) in items.iter().enumerate() {
                let key = format!("format[{i}]");
                if let Some(rule) = read_rule(&key, item, short, &defaults, &titles, &scope, p) {
                    if !names.insert(rule.id.clone()) {
                        p.at(
                            &key,
                            item,
                            format!("a second rule named {:?} in this file", rule.id),
                        );
                    }
                    rules.push(rule);
                }
            }
        }
    }
    top.finish(p, FILE_KEYS);
    (rules, scope)
}

/// The settings shared by `[defaults]` and `[[format]]`; other keys are
/// left for the caller (a rule) or reported (defaults).
fn read_settings_into(t: &mut TableReader, s: &mut Settings, p: &mut FileProblems) {
    if let Some(n) = t.get("match") {
        s.matcher = read_match(&t.path("match"), n, p);
    }
    if let Some(n) = t.get("postpone") {
        s.postpone = read_postpone(&t.path("postpone"), n, p);
    }
    if let Some(n) = t.get("data_location") {
        let key = t.path("data_location");
        s.location = match p.expect_str(&key, n) {
            Some("inline") => Some(LocationSpec::Fixed(DataLocation::Inline)),
            Some("attachment") => Some(LocationSpec::Fixed(DataLocation::Attachment)),
            Some("from_event_data_format") => Some(LocationSpec::FromEventDataFormat),
            Some(other) => {
                p.at(
                    &key,
                    n,
                    format!(
                        "unknown data location {other:?}; use \"inline\", \"attachment\" \
                         or \"from_event_data_format\""
                    ),
                );
                None
            }
            None => None,
        };
    }
    if let Some(n) = t.get("oversize") {
        let key = t.path("oversize");
        s.oversize = match p.expect_str(&key, n) {
            Some("compress") => Some(Oversize::Compress),
            Some("split") => Some(Oversize::Split),
            Some("error") => Some(Oversize::Error),
            Some(other) => {
                p.at(
                    &key,
                    n,
                    format!(
                        "unknown oversize choice {other:?}; use \"compress\", \"split\" \
                         or \"error\""
                    ),
                );
                None
            }
            None => None,
        };
    }
    if let Some(n) = t.get("template") {
        s.template = read_template_choice(&t.path("template"), n, p);
    }
    if let Some(n) = t.get("copies") {
        s.copies = p.expect_bool(&t.path("copies"), n);
    }
    if let Some(n) = t.get("variables") {
        read_variables(&t.path("variables"), n, &mut s.variables, p);
    }
    if let Some(n) = t.get("computed") {
        read_computed(&t.path("computed"), n, &mut s.computed, p);
    }
}

fn read_settings(key: &str, node: &Node, known: &[&str], p: &mut FileProblems) -> Option<Settings> {
    let mut t = p.table(key, node)?;
    let mut s = Settings::default();
    read_settings_into(&mut t, &mut s, p);
    t.finish(p, known);
    Some(s)
}

#[allow(clippy::too_many_arguments)]
fn read_rule(
    key: &str,
    node: &Node,
    file: &str,
    defaults: &Settings,
    titles: &BTreeMap<String, String>,
    file_scope: &Arc<Scope>,
    p: &mut FileProblems,
) -> Option<Rule> {
    let mut t = p.table(key, node)?;
    let name = match t.get("name") {
        Some(n) => p.expect_str(&t.path("name"), n).map(str::to_string),
        None => {
            p.at(key, node, "a rule needs a `name`");
            None
        }
    };
    if let Some(n) = &name {
        if n.is_empty() || n.chars().any(|c| c.is_control()) {
            p.at(
                &t.path("name"),
                node,
                "must be non-empty text without control characters",
            );
        }
    }
    let mut own = Settings::default();
    read_settings_into(&mut t, &mut own, p);
    let columns_node = t.get("columns");
    let xarf_node = t.get("xarf");
    let reject_node = t.get("reject");
    let columns = columns_node.and_then(|n| read_columns(&t.path("columns"), n, titles, p));
    let xarf_spec = xarf_node.and_then(|n| read_xarf(&t.path("xarf"), n, p));
    let reject = reject_node.and_then(|n| p.expect_str(&t.path("reject"), n).map(str::to_string));
    let only_waits = t
        .get("continue")
        .and_then(|n| p.expect_bool(&t.path("continue"), n))
        .unwrap_or(false);
    let raw_keys: Vec<String> = match &node.value {
        Value::Table(e) => e.iter().map(|(k, _)| k.clone()).collect(),
        _ => Vec::new(),
    };
    t.finish(p, RULE_KEYS);

    let has = |k: &str| raw_keys.iter().any(|r| r == k);
    if has("xarf") && has("reject") {
        p.at(key, node, "a rule is either `xarf` or `reject`, not both");
        return None;
    }
    if has("xarf") || has("reject") {
        for k in ["columns", "data_location", "oversize", "copies"] {
            if has(k) {
                p.at(
                    &join_path(key, k),
                    node,
                    "only table rules (without `xarf`/`reject`) take this key",
                );
            }
        }
    }
    if only_waits {
        for k in [
            "columns",
            "data_location",
            "oversize",
            "copies",
            "template",
            "xarf",
            "reject",
            "variables",
            "computed",
        ] {
            if has(k) {
                p.at(
                    &join_path(key, k),
                    node,
                    "a `continue` rule only waits and sends nothing, so it takes no such key",
                );
            }
        }
    }
    if has("reject") && has("template") {
        p.at(
            &join_path(key, "template"),
            node,
            "a `reject` rule sends nothing, so it has no template",
        );
    }

    let matcher = defaults.matcher.overlay(&own.matcher);
    let postpone = defaults.postpone.overlay(&own.postpone).resolve();
    let template = own
        .template
        .clone()
        .or_else(|| defaults.template.clone())
        .unwrap_or(TemplateChoice::Directive);
    let name = name?;
    let id = format!("{file}#{name}");

    // The rule's scope: the context, then [defaults], then its own.
    let scope = if defaults.variables.is_empty()
        && defaults.computed.is_empty()
        && own.variables.is_empty()
        && own.computed.is_empty()
    {
        file_scope.clone()
    } else {
        let mut s = (**file_scope).clone();
        for layer in [defaults, &own] {
            s.variables.extend(layer.variables.clone());
            for (n, c) in &layer.computed {
                s.computed.retain(|(o, _)| o != n);
                s.computed.push((n.clone(), c.clone()));
            }
        }
        Arc::new(s)
    };

    let action = if only_waits {
        if postpone == Postpone::default() {
            p.at(
                key,
                node,
                "a `continue` rule only waits: give it a `postpone` (here or in [defaults])",
            );
            return None;
        }
        Action::Continue
    } else if has("reject") {
        let reason = reject?;
        if reason.trim().is_empty() {
            p.at(&join_path(key, "reject"), node, "give the reason as text");
            return None;
        }
        Action::Reject { reason }
    } else if has("xarf") {
        Action::Xarf {
            spec: xarf_spec?,
            template,
        }
    } else {
        let table = if has("columns") {
            TableFormat {
                name: name.clone(),
                columns: columns?,
            }
        } else {
            TableFormat::default_columns(&name)
        };
        Action::Table {
            table,
            location: own
                .location
                .or(defaults.location)
                .unwrap_or(LocationSpec::Fixed(DataLocation::Inline)),
            template,
            copies: own.copies.or(defaults.copies).unwrap_or(true),
            oversize: own.oversize.or(defaults.oversize).unwrap_or_default(),
        }
    };
    Some(Rule {
        id,
        matcher: Matcher {
            notification_format: matcher.notification_format,
            event_data_format: matcher.event_data_format,
            template_name: matcher.template_name,
            recipient_address: matcher.recipient_address,
            aggregate: matcher.aggregate,
        },
        postpone,
        action,
        scope,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("15m"), Some(Duration::minutes(15)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::minutes(90)));
        assert_eq!(parse_duration("2d"), Some(Duration::days(2)));
        assert_eq!(parse_duration("90"), None);
        assert_eq!(parse_duration("m"), None);
        assert_eq!(parse_duration("5x"), None);
    }

    #[test]
    fn file_names() {
        assert!(is_format_file_name("10shadowserver.toml"));
        assert!(is_format_file_name("00.toml"));
        assert!(!is_format_file_name("1x.toml"));
        assert!(!is_format_file_name("10a.toml~"));
        assert!(!is_format_file_name("10a.py"));
    }
}
