//! Reading and checking the format files (the language is described in
//! `docs/formats.md`). Every problem of every file is collected, each with
//! its file, key path and line, before the set is refused.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::Duration;

use super::tree::{join_path, parse_document, Node, Problems, TableReader, Value};
use super::xarf::{self, EventField, FieldFormat, Scalar, XarfSpec};
use super::{
    Action, Computed, CopySpec, DataLocation, FormatLoadError, FormatProblem, LocationSpec,
    Matcher, Oversize, Postpone, Rule, Scope, StrMatch, TemplateChoice,
};
use crate::notify::render::table::{Column, TableFormat};
use crate::notify::render::template::{Part, Template, TemplateText};

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
    let mut problems = Vec::new();
    for entry in entries {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                problems.push(FormatProblem {
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
        problems.push(FormatProblem {
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
                    problems.push(FormatProblem {
                        file,
                        key: String::new(),
                        line: None,
                        reason: "not valid UTF-8".into(),
                    });
                    continue;
                }
            },
            Err(e) => {
                problems.push(FormatProblem {
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
        let mut p = Problems::new(file, &text);
        let (file_rules, next_scope) = load_file(path, &short, &text, &scope, &mut p);
        problems.append(&mut p.list);
        rules.extend(file_rules);
        scope = next_scope;
    }
    if problems.is_empty() {
        Ok(Loaded {
            files: toml_files,
            python,
            rules,
        })
    } else {
        Err(FormatLoadError(problems))
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
    p: &mut Problems,
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

fn read_variables_file(
    base: &Path,
    key: &str,
    node: &Node,
    into: &mut BTreeMap<String, String>,
    p: &mut Problems,
) {
    let (rel, section) = match &node.value {
        Value::Str(s) => (s.clone(), None),
        Value::Table(_) => {
            let Some(mut t) = p.table(key, node) else {
                return;
            };
            let rel = match t.get("path") {
                Some(n) => p.expect_str(&t.path("path"), n).map(str::to_string),
                None => {
                    p.at(key, node, "needs `path`");
                    None
                }
            };
            let section = t.get("section").and_then(|n| {
                p.expect_str(&join_path(key, "section"), n)
                    .map(str::to_string)
            });
            t.finish(p, &["path", "section"]);
            match rel {
                Some(r) => (r, section),
                None => return,
            }
        }
        other => {
            p.at(
                key,
                node,
                format!(
                    "must be a file name or a table {{ path, section }}, found {}",
                    other.kind()
                ),
            );
            return;
        }
    };
    let path = base.join(&rel);
    let shown = path.display().to_string();
    let json_problem = |p: &mut Problems, jkey: &str, reason: String| {
        p.list.push(FormatProblem {
            file: shown.clone(),
            key: jkey.to_string(),
            line: None,
            reason,
        })
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => {
            p.at(
                key,
                node,
                format!("cannot read variables file {shown}: {e}"),
            );
            return;
        }
    };
    let json: serde_json::Value = match serde_json::from_str(&text) {
        Ok(j) => j,
        Err(e) => {
            json_problem(p, "", format!("not valid JSON: {e}"));
            return;
        }
    };
    let (object, prefix) = match &section {
        Some(s) => match json.get(s) {
            Some(v) => (v, s.clone()),
            None => {
                json_problem(
                    p,
                    s,
                    format!("no section {s:?} (named by {key} in {})", p.file),
                );
                return;
            }
        },
        None => (&json, String::new()),
    };
    let Some(map) = object.as_object() else {
        json_problem(p, &prefix, "must be a JSON object of strings".into());
        return;
    };
    for (k, v) in map {
        let jkey = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            serde_json::Value::String(s) => {
                into.insert(k.clone(), s.clone());
            }
            other => json_problem(
                p,
                &jkey,
                format!("variables must be strings, found {}", json_kind(other)),
            ),
        }
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

fn read_variables(key: &str, node: &Node, into: &mut BTreeMap<String, String>, p: &mut Problems) {
    let Some(mut t) = p.table(key, node) else {
        return;
    };
    for (k, v) in t.all() {
        if let Some(s) = p.expect_str(&join_path(key, k), v) {
            into.insert(k.clone(), s.to_string());
        }
    }
}

fn template_text(key: &str, node: &Node, p: &mut Problems) -> Option<TemplateText> {
    let s = p.expect_str(key, node)?;
    match TemplateText::parse(s, Part::Text) {
        Ok(t) => Some(t),
        Err(e) => {
            p.at(key, node, e.to_string());
            None
        }
    }
}

fn read_computed(key: &str, node: &Node, into: &mut Vec<(String, Computed)>, p: &mut Problems) {
    let Some(mut t) = p.table(key, node) else {
        return;
    };
    for (name, v) in t.all() {
        let vkey = join_path(key, name);
        let computed = match &v.value {
            Value::Str(_) => template_text(&vkey, v, p).map(Computed::Text),
            Value::Table(_) => read_computed_table(&vkey, v, p),
            other => {
                p.at(
                    &vkey,
                    v,
                    format!("must be a string or a table, found {}", other.kind()),
                );
                None
            }
        };
        if let Some(c) = computed {
            into.retain(|(n, _)| n != name);
            into.push((name.clone(), c));
        }
    }
}

fn read_computed_table(key: &str, node: &Node, p: &mut Problems) -> Option<Computed> {
    let mut t = p.table(key, node)?;
    let text = t.get("text");
    let first_of = t.get("first_of");
    let otherwise = t.get("otherwise");
    let inline = t.get("inline");
    let attachment = t.get("attachment");
    t.finish(
        p,
        &["text", "first_of", "otherwise", "inline", "attachment"],
    );
    let shapes = [
        text.is_some(),
        first_of.is_some(),
        inline.is_some() || attachment.is_some(),
    ];
    if shapes.iter().filter(|s| **s).count() != 1 {
        p.at(
            key,
            node,
            "give exactly one of `text`, `first_of` (+ `otherwise`), or `inline` + `attachment`",
        );
        return None;
    }
    if let Some(n) = text {
        return template_text(&join_path(key, "text"), n, p).map(Computed::Text);
    }
    if let Some(n) = first_of {
        let fkey = join_path(key, "first_of");
        let items = p.expect_array(&fkey, n)?;
        let mut cases = Vec::new();
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            let ckey = format!("{fkey}[{i}]");
            let Some(mut c) = p.table(&ckey, item) else {
                ok = false;
                continue;
            };
            let agg = c.get("aggregate_key");
            let txt = c.get("text");
            c.finish(p, &["aggregate_key", "text"]);
            match (agg, txt) {
                (Some(a), Some(tx)) => {
                    let a = p.expect_str(&join_path(&ckey, "aggregate_key"), a);
                    let tx = template_text(&join_path(&ckey, "text"), tx, p);
                    match (a, tx) {
                        (Some(a), Some(tx)) => cases.push((a.to_string(), tx)),
                        _ => ok = false,
                    }
                }
                _ => {
                    p.at(&ckey, item, "each case needs `aggregate_key` and `text`");
                    ok = false;
                }
            }
        }
        let otherwise = match otherwise {
            Some(n) => template_text(&join_path(key, "otherwise"), n, p)?,
            None => TemplateText::parse("", Part::Text).expect("empty text parses"),
        };
        return ok.then_some(Computed::FirstOf { cases, otherwise });
    }
    if otherwise.is_some() {
        p.at(key, node, "`otherwise` belongs to `first_of`");
        return None;
    }
    match (inline, attachment) {
        (Some(i), Some(a)) => {
            let i = template_text(&join_path(key, "inline"), i, p);
            let a = template_text(&join_path(key, "attachment"), a, p);
            Some(Computed::ByLocation {
                inline: i?,
                attachment: a?,
            })
        }
        _ => {
            p.at(key, node, "give both `inline` and `attachment`");
            None
        }
    }
}

fn read_location(key: &str, node: &Node, p: &mut Problems) -> Option<DataLocation> {
    match p.expect_str(key, node)? {
        "inline" => Some(DataLocation::Inline),
        "attachment" => Some(DataLocation::Attachment),
        other => {
            p.at(
                key,
                node,
                format!("unknown data location {other:?}; use \"inline\" or \"attachment\""),
            );
            None
        }
    }
}

fn read_copies(key: &str, node: &Node, into: &mut Vec<CopySpec>, p: &mut Problems) {
    let Some(items) = p.expect_array(key, node) else {
        return;
    };
    for (i, item) in items.iter().enumerate() {
        let ckey = format!("{key}[{i}]");
        let Some(mut t) = p.table(&ckey, item) else {
            continue;
        };
        let group = t.get("recipient_group").and_then(|n| {
            p.expect_str(&join_path(&ckey, "recipient_group"), n)
                .map(str::to_string)
        });
        let recipients = t
            .get("recipients")
            .and_then(|n| p.expect_strings(&join_path(&ckey, "recipients"), n));
        let location = match t.get("data_location") {
            Some(n) => read_location(&join_path(&ckey, "data_location"), n, p),
            None => Some(DataLocation::Inline),
        };
        t.finish(p, &["recipient_group", "recipients", "data_location"]);
        let (Some(group), Some(recipients), Some(location)) = (group, recipients, location) else {
            if !table_has(item, "recipient_group") || !table_has(item, "recipients") {
                p.at(
                    &ckey,
                    item,
                    "a copy needs `recipient_group` and `recipients`",
                );
            }
            continue;
        };
        if recipients.is_empty() {
            p.at(&ckey, item, "`recipients` is empty");
            continue;
        }
        let mut ok = true;
        for r in &recipients {
            let plausible = r.contains('@')
                && !r.chars().any(|c| {
                    c.is_whitespace() || c.is_control() || matches!(c, '<' | '>' | ',' | ';')
                });
            if !plausible {
                p.at(&ckey, item, format!("{r:?} is not a plain mail address"));
                ok = false;
            }
        }
        if ok {
            into.push(CopySpec {
                recipient_group: group,
                recipients,
                location,
            });
        }
    }
}

fn table_has(node: &Node, key: &str) -> bool {
    matches!(&node.value, Value::Table(e) if e.iter().any(|(k, _)| k == key))
}

fn read_str_match(key: &str, node: &Node, p: &mut Problems) -> Option<StrMatch> {
    match &node.value {
        Value::Str(_) | Value::Array(_) => Some(StrMatch {
            equals: p.expect_strings(key, node)?,
            ..StrMatch::default()
        }),
        Value::Table(_) => {
            let mut t = p.table(key, node)?;
            let mut m = StrMatch::default();
            let mut ok = true;
            for (name, slot) in [
                ("equals", &mut m.equals),
                ("prefix", &mut m.prefix),
                ("suffix", &mut m.suffix),
            ] {
                if let Some(n) = t.get(name) {
                    match p.expect_strings(&join_path(key, name), n) {
                        Some(v) => *slot = v,
                        None => ok = false,
                    }
                }
            }
            t.finish(p, &["equals", "prefix", "suffix"]);
            if ok && m.equals.is_empty() && m.prefix.is_empty() && m.suffix.is_empty() {
                p.at(
                    key,
                    node,
                    "matches nothing: give `equals`, `prefix` or `suffix`",
                );
                return None;
            }
            ok.then_some(m)
        }
        other => {
            p.at(
                key,
                node,
                format!(
                    "must be a string, an array of strings or a table {{ equals, prefix, suffix }}, found {}",
                    other.kind()
                ),
            );
            None
        }
    }
}

fn read_match(key: &str, node: &Node, p: &mut Problems) -> MatchParts {
    let mut m = MatchParts::default();
    let Some(mut t) = p.table(key, node) else {
        return m;
    };
    for (name, slot) in [
        ("notification_format", &mut m.notification_format),
        ("event_data_format", &mut m.event_data_format),
        ("template_name", &mut m.template_name),
        ("recipient_address", &mut m.recipient_address),
    ] {
        if let Some(n) = t.get(name) {
            *slot = read_str_match(&join_path(key, name), n, p);
        }
    }
    if let Some(n) = t.get("aggregate") {
        let akey = join_path(key, "aggregate");
        if let Some(mut a) = p.table(&akey, n) {
            for (k, v) in a.all() {
                if let Some(sm) = read_str_match(&join_path(&akey, k), v, p) {
                    m.aggregate.push((k.clone(), sm));
                }
            }
        }
    }
    t.finish(p, MATCH_KEYS);
    m
}

/// `"15m"`, `"2h"`, `"1h30m"`, `"90s"`, `"1d"` or an integer of seconds.
pub(crate) fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    let mut total: i64 = 0;
    let mut num = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let unit = match c {
            'd' => 86400,
            'h' => 3600,
            'm' => 60,
            's' => 1,
            _ => return None,
        };
        let n: i64 = num.parse().ok()?;
        total = total.checked_add(n.checked_mul(unit)?)?;
        num.clear();
    }
    if !num.is_empty() {
        return None;
    }
    Duration::try_seconds(total)
}

fn read_duration(key: &str, node: &Node, p: &mut Problems) -> Option<Option<Duration>> {
    let d = match &node.value {
        Value::Int(n) if *n >= 0 => Duration::try_seconds(*n),
        Value::Str(s) => parse_duration(s),
        _ => None,
    };
    match d {
        Some(d) if d.is_zero() => Some(None),
        Some(d) => Some(Some(d)),
        None => {
            p.at(
                key,
                node,
                "must be a duration such as \"15m\", \"2h\", \"1h30m\", \"90s\", \"1d\" or a number of seconds",
            );
            None
        }
    }
}

fn read_postpone(key: &str, node: &Node, p: &mut Problems) -> PostponeParts {
    let mut out = PostponeParts::default();
    let Some(mut t) = p.table(key, node) else {
        return out;
    };
    if let Some(n) = t.get("notification_interval") {
        out.interval = p.expect_bool(&join_path(key, "notification_interval"), n);
    }
    if let Some(n) = t.get("min_directive_age") {
        out.min_directive_age = read_duration(&join_path(key, "min_directive_age"), n, p);
    }
    if let Some(n) = t.get("min_observation_age") {
        out.min_observation_age = read_duration(&join_path(key, "min_observation_age"), n, p);
    }
    t.finish(p, POSTPONE_KEYS);
    out
}

fn read_template_choice(key: &str, node: &Node, p: &mut Problems) -> Option<TemplateChoice> {
    match &node.value {
        Value::Str(s) if s.is_empty() => {
            p.at(key, node, "empty template name");
            None
        }
        Value::Str(s) => Some(TemplateChoice::Named(s.clone())),
        Value::Table(_) => {
            let mut t = p.table(key, node)?;
            let subject = t.get("subject").and_then(|n| {
                p.expect_str(&join_path(key, "subject"), n)
                    .map(str::to_string)
            });
            let body = t
                .get("body")
                .and_then(|n| p.expect_str(&join_path(key, "body"), n).map(str::to_string));
            t.finish(p, &["subject", "body"]);
            let (Some(subject), Some(body)) = (subject, body) else {
                p.at(key, node, "an inline template needs `subject` and `body`");
                return None;
            };
            match Template::from_strings(&subject, &body) {
                Ok(t) => Some(TemplateChoice::Inline(Arc::new(t))),
                Err(e) => {
                    p.at(key, node, e.to_string());
                    None
                }
            }
        }
        other => {
            p.at(
                key,
                node,
                format!(
                    "must be a template name or a table {{ subject, body }}, found {}",
                    other.kind()
                ),
            );
            None
        }
    }
}

/// The settings shared by `[defaults]` and `[[format]]`; other keys are
/// left for the caller (a rule) or reported (defaults).
fn read_settings_into(t: &mut TableReader, s: &mut Settings, p: &mut Problems) {
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

fn read_settings(key: &str, node: &Node, known: &[&str], p: &mut Problems) -> Option<Settings> {
    let mut t = p.table(key, node)?;
    let mut s = Settings::default();
    read_settings_into(&mut t, &mut s, p);
    t.finish(p, known);
    Some(s)
}

fn read_columns(
    key: &str,
    node: &Node,
    titles: &BTreeMap<String, String>,
    p: &mut Problems,
) -> Option<Vec<Column>> {
    let items = p.expect_array(key, node)?;
    if items.is_empty() {
        p.at(key, node, "a table needs at least one column");
        return None;
    }
    let mut cols = Vec::new();
    let mut ok = true;
    for (i, item) in items.iter().enumerate() {
        let ckey = format!("{key}[{i}]");
        let col = match &item.value {
            Value::Str(field) => match titles.get(field) {
                Some(title) => Some(Column::from_field(field, title)),
                None => {
                    p.at(
                        &ckey,
                        item,
                        format!(
                            "no title for {field:?}: add it to `column_titles` or write \
                             {{ field = {field:?}, title = \"...\" }}"
                        ),
                    );
                    None
                }
            },
            Value::Table(_) => {
                let mut t = p.table(&ckey, item)?;
                let field = t.get("field").and_then(|n| {
                    p.expect_str(&join_path(&ckey, "field"), n)
                        .map(str::to_string)
                });
                let extra = t.get("extra").and_then(|n| {
                    p.expect_str(&join_path(&ckey, "extra"), n)
                        .map(str::to_string)
                });
                let title = t.get("title").and_then(|n| {
                    p.expect_str(&join_path(&ckey, "title"), n)
                        .map(str::to_string)
                });
                t.finish(p, &["field", "extra", "title"]);
                match (field, extra, title) {
                    (Some(f), None, Some(t)) => Some(Column::from_field(&f, &t)),
                    (None, Some(k), Some(t)) => Some(Column::Extra { key: k, title: t }),
                    _ => {
                        p.at(
                            &ckey,
                            item,
                            "a column needs `title` and one of `field` or `extra`",
                        );
                        None
                    }
                }
            }
            other => {
                p.at(
                    &ckey,
                    item,
                    format!(
                        "must be a field name or a table {{ field, title }}, found {}",
                        other.kind()
                    ),
                );
                None
            }
        };
        match col {
            Some(c) => {
                let bad = match &c {
                    Column::Event { field, .. } => !valid_field_name(field),
                    Column::Extra { key, .. } => key.is_empty(),
                };
                if bad {
                    p.at(
                        &ckey,
                        item,
                        format!("{:?} is not an event column name", c.source_name()),
                    );
                    ok = false;
                } else if cols
                    .iter()
                    .any(|o: &Column| o.source_name() == c.source_name())
                {
                    p.at(
                        &ckey,
                        item,
                        format!("{:?} is already a column of this table", c.source_name()),
                    );
                    ok = false;
                } else {
                    cols.push(c);
                }
            }
            None => ok = false,
        }
    }
    ok.then_some(cols)
}

/// IntelMQ field names: lower-case words, digits, `_`, `-` and dots. The
/// event loader checks names against the real table as well.
fn valid_field_name(f: &str) -> bool {
    !f.is_empty()
        && !f.starts_with('.')
        && !f.ends_with('.')
        && f.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '.' | '-'))
}

fn read_xarf(key: &str, node: &Node, p: &mut Problems) -> Option<XarfSpec> {
    let mut t = p.table(key, node)?;
    let mut ok = true;
    let mut spec = XarfSpec {
        static_fields: Vec::new(),
        fields: Vec::new(),
    };
    let mut seen: Vec<String> = Vec::new();
    let mut check_key = |raw: &str, path: &str, node: &Node, p: &mut Problems| -> Option<String> {
        let Some(k) = xarf::normalise_key(raw) else {
            p.at(
                path,
                node,
                format!("{raw:?} is not an X-ARF field name (letters, digits, `-`, `_`)"),
            );
            return None;
        };
        if xarf::RESERVED.contains(&k.as_str()) {
            p.at(path, node, format!("`{k}` is filled in by mailgend"));
            return None;
        }
        if seen.contains(&k) {
            p.at(path, node, format!("`{k}` is given twice"));
            return None;
        }
        seen.push(k.clone());
        Some(k)
    };
    if let Some(n) = t.get("static") {
        let skey = join_path(key, "static");
        if let Some(mut st) = p.table(&skey, n) {
            for (raw, v) in st.all() {
                let path = join_path(&skey, raw);
                let Some(k) = check_key(raw, &path, v, p) else {
                    ok = false;
                    continue;
                };
                let scalar = match &v.value {
                    Value::Str(s) => Scalar::Str(s.clone()),
                    Value::Int(i) => Scalar::Int(*i),
                    Value::Float(f) => Scalar::Float(*f),
                    Value::Bool(b) => Scalar::Bool(*b),
                    other => {
                        p.at(
                            &path,
                            v,
                            format!(
                                "must be a string, number or boolean, found {}",
                                other.kind()
                            ),
                        );
                        ok = false;
                        continue;
                    }
                };
                spec.static_fields.push((k, scalar));
            }
        }
    }
    if let Some(n) = t.get("fields") {
        let fkey = join_path(key, "fields");
        if let Some(mut ft) = p.table(&fkey, n) {
            for (raw, v) in ft.all() {
                let path = join_path(&fkey, raw);
                let Some(k) = check_key(raw, &path, v, p) else {
                    ok = false;
                    continue;
                };
                let (field, format) = match &v.value {
                    Value::Str(s) => (Some(s.clone()), Some(FieldFormat::Auto)),
                    Value::Table(_) => {
                        let Some(mut ff) = p.table(&path, v) else {
                            continue;
                        };
                        let field = ff.get("field").and_then(|n| {
                            p.expect_str(&join_path(&path, "field"), n)
                                .map(str::to_string)
                        });
                        let format = match ff.get("format") {
                            Some(n) => match p.expect_str(&join_path(&path, "format"), n) {
                                Some(f) => match FieldFormat::parse(f) {
                                    Some(f) => Some(f),
                                    None => {
                                        p.at(
                                            &join_path(&path, "format"),
                                            n,
                                            format!(
                                                "unknown format {f:?}; use one of {}",
                                                FieldFormat::NAMES.join(", ")
                                            ),
                                        );
                                        None
                                    }
                                },
                                None => None,
                            },
                            None => Some(FieldFormat::Auto),
                        };
                        ff.finish(p, &["field", "format"]);
                        if field.is_none() {
                            p.at(&path, v, "needs `field`");
                        }
                        (field, format)
                    }
                    other => {
                        p.at(&path, v, format!("must be an event field name or a table {{ field, format }}, found {}", other.kind()));
                        (None, None)
                    }
                };
                match (field, format) {
                    (Some(field), Some(format)) => {
                        let valid = match field.split_once('.') {
                            Some(("extra", rest)) => !rest.is_empty(),
                            _ => valid_field_name(&field),
                        };
                        if !valid {
                            p.at(&path, v, format!("{field:?} is not an event column name"));
                            ok = false;
                        } else {
                            spec.fields.push(EventField {
                                key: k,
                                field,
                                format,
                            });
                        }
                    }
                    _ => ok = false,
                }
            }
        }
    }
    t.finish(p, &["static", "fields"]);
    for m in xarf::MANDATORY {
        if !xarf::RESERVED.contains(m) && !seen.iter().any(|s| s == m) {
            p.at(
                key,
                node,
                format!("the mandatory X-ARF field `{m}` is neither in `static` nor in `fields`"),
            );
            ok = false;
        }
    }
    ok.then_some(spec)
}

#[allow(clippy::too_many_arguments)]
fn read_rule(
    key: &str,
    node: &Node,
    file: &str,
    defaults: &Settings,
    titles: &BTreeMap<String, String>,
    file_scope: &Arc<Scope>,
    p: &mut Problems,
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
