//! A TOML document as a tree whose every node remembers where it was
//! written, and a reader over it that collects *all* problems of a file
//! (unknown keys with a suggestion, wrong types) with key path and line.
//!
//! serde's derive stops at the first problem and loses the position of
//! nested keys; an operator fixing a format file wants every mistake in one
//! go, so the file is first read into this tree and then checked by hand.

use std::fmt;
use std::ops::Range;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

use super::FormatProblem;
use crate::shared::problem::Problems;

/// A TOML value with the byte range it was written at. toml knows no
/// position for tables made implicitly by dotted keys or headers
/// (`a.b = 1` makes `a`); those have `None`.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub span: Option<Range<usize>>,
    pub value: Value,
}

#[derive(Debug, Clone)]
pub(crate) enum Value {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    Datetime,
    Array(Vec<Node>),
    /// Entries in file order.
    Table(Vec<(String, Node)>),
}

impl Value {
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Str(_) => "a string",
            Value::Int(_) => "an integer",
            Value::Float(_) => "a float",
            Value::Bool(_) => "a boolean",
            Value::Datetime => "a date-time",
            Value::Array(_) => "an array",
            Value::Table(_) => "a table",
        }
    }
}

// How toml hands over spans and date-times through serde (the protocol of
// serde_spanned and toml_datetime, which toml's own `Spanned` uses).
const SPANNED_NAME: &str = "$__serde_spanned_private_Spanned";
const SPANNED_START: &str = "$__serde_spanned_private_start";
const SPANNED_END: &str = "$__serde_spanned_private_end";
const SPANNED_VALUE: &str = "$__serde_spanned_private_value";
const SPANNED_FIELDS: &[&str] = &[SPANNED_START, SPANNED_END, SPANNED_VALUE];
const DATETIME_FIELD: &str = "$__toml_private_datetime";

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Value, D::Error> {
        d.deserialize_any(ValueVisitor)
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Node, D::Error> {
        // Asking for a "spanned struct" makes toml wrap the value in its
        // span when it knows one; otherwise the value arrives as is.
        d.deserialize_struct(SPANNED_NAME, SPANNED_FIELDS, NodeVisitor)
    }
}

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a TOML value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Int(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        i64::try_from(v)
            .map(Value::Int)
            .map_err(|_| E::custom("integer out of range"))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::Float(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::Str(v.to_string()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::Str(v))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Node>()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        match map.next_key::<String>()? {
            None => Ok(Value::Table(Vec::new())),
            Some(first) => table_or_datetime(first, map),
        }
    }
}

/// The rest of a map whose first key was `first`: a date-time, or a table.
fn table_or_datetime<'de, A: MapAccess<'de>>(first: String, mut map: A) -> Result<Value, A::Error> {
    if first == DATETIME_FIELD {
        let _text: String = map.next_value()?;
        return Ok(Value::Datetime);
    }
    let mut entries = vec![(first, map.next_value::<Node>()?)];
    while let Some(key) = map.next_key::<String>()? {
        let value = map.next_value::<Node>()?;
        entries.push((key, value));
    }
    Ok(Value::Table(entries))
}

struct NodeVisitor;

fn bare(value: Value) -> Node {
    Node { span: None, value }
}

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a TOML value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Node, E> {
        Ok(bare(Value::Bool(v)))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Node, E> {
        Ok(bare(Value::Int(v)))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Node, E> {
        ValueVisitor.visit_u64(v).map(bare)
    }

    fn visit_f64<E>(self, v: f64) -> Result<Node, E> {
        Ok(bare(Value::Float(v)))
    }

    fn visit_str<E>(self, v: &str) -> Result<Node, E> {
        Ok(bare(Value::Str(v.to_string())))
    }

    fn visit_string<E>(self, v: String) -> Result<Node, E> {
        Ok(bare(Value::Str(v)))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Node, A::Error> {
        ValueVisitor.visit_seq(seq).map(bare)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let Some(first) = map.next_key::<String>()? else {
            return Ok(bare(Value::Table(Vec::new())));
        };
        if first != SPANNED_START {
            return table_or_datetime(first, map).map(bare);
        }
        let start: usize = map.next_value()?;
        let mut end = start;
        let mut value = None;
        while let Some(key) = map.next_key::<String>()? {
            if key == SPANNED_END {
                end = map.next_value()?;
            } else if key == SPANNED_VALUE {
                value = Some(map.next_value::<Value>()?);
            } else {
                return Err(de::Error::custom(format!("unexpected key {key} in a span")));
            }
        }
        let value = value.ok_or_else(|| de::Error::custom("span without a value"))?;
        Ok(Node {
            span: Some(start..end),
            value,
        })
    }
}

/// A syntax error: message and where.
pub(crate) type SyntaxError = (String, Option<Range<usize>>);

/// Parses a whole document; a syntax error becomes one problem.
pub(crate) fn parse_document(text: &str) -> Result<Vec<(String, Node)>, SyntaxError> {
    match toml::from_str::<Value>(text) {
        Ok(Value::Table(entries)) => Ok(entries),
        Ok(_) => Err(("the document is not a table".into(), None)),
        Err(e) => Err((e.message().to_string(), e.span())),
    }
}

/// Collects the problems of one file.
pub(crate) struct FileProblems<'a> {
    pub file: String,
    pub text: &'a str,
    /// Every problem in a format file refuses the set.
    pub found: Problems,
}

impl<'a> FileProblems<'a> {
    pub fn new(file: String, text: &'a str) -> FileProblems<'a> {
        FileProblems {
            file,
            text,
            found: Problems::new(),
        }
    }

    pub fn line_of(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    pub fn add(&mut self, key: &str, span: Option<&Range<usize>>, reason: impl Into<String>) {
        let line = span.map(|s| self.line_of(s.start));
        self.found.refuse(FormatProblem {
            file: self.file.clone(),
            key: key.to_string(),
            line,
            reason: reason.into(),
        });
    }

    pub fn at(&mut self, key: &str, node: &Node, reason: impl Into<String>) {
        let span = node.span.clone();
        self.add(key, span.as_ref(), reason);
    }

    pub fn expect_str<'n>(&mut self, key: &str, node: &'n Node) -> Option<&'n str> {
        match &node.value {
            Value::Str(s) => Some(s),
            other => {
                self.at(
                    key,
                    node,
                    format!("must be a string, found {}", other.kind()),
                );
                None
            }
        }
    }

    pub fn expect_bool(&mut self, key: &str, node: &Node) -> Option<bool> {
        match &node.value {
            Value::Bool(b) => Some(*b),
            other => {
                self.at(
                    key,
                    node,
                    format!("must be true or false, found {}", other.kind()),
                );
                None
            }
        }
    }

    pub fn expect_array<'n>(&mut self, key: &str, node: &'n Node) -> Option<&'n [Node]> {
        match &node.value {
            Value::Array(items) => Some(items),
            other => {
                self.at(
                    key,
                    node,
                    format!("must be an array, found {}", other.kind()),
                );
                None
            }
        }
    }

    /// A string or an array of strings, as a list.
    pub fn expect_strings(&mut self, key: &str, node: &Node) -> Option<Vec<String>> {
        match &node.value {
            Value::Str(s) => Some(vec![s.clone()]),
            Value::Array(items) => {
                let mut out = Vec::new();
                let mut ok = true;
                for (i, item) in items.iter().enumerate() {
                    match self.expect_str(&format!("{key}[{i}]"), item) {
                        Some(s) => out.push(s.to_string()),
                        None => ok = false,
                    }
                }
                ok.then_some(out)
            }
            other => {
                self.at(
                    key,
                    node,
                    format!(
                        "must be a string or an array of strings, found {}",
                        other.kind()
                    ),
                );
                None
            }
        }
    }

    /// A reader over a table node; `None` (with a problem) if `node` is
    /// not a table.
    pub fn table<'n>(&mut self, key: &str, node: &'n Node) -> Option<TableReader<'n>> {
        match &node.value {
            Value::Table(entries) => Some(TableReader::new(key, entries)),
            other => {
                self.at(
                    key,
                    node,
                    format!("must be a table, found {}", other.kind()),
                );
                None
            }
        }
    }
}

/// Hands out the entries of a TOML table by key and, at the end, reports
/// every key nobody asked for.
pub(crate) struct TableReader<'n> {
    path: String,
    entries: &'n [(String, Node)],
    used: Vec<bool>,
}

impl<'n> TableReader<'n> {
    pub fn new(path: &str, entries: &'n [(String, Node)]) -> TableReader<'n> {
        TableReader {
            path: path.to_string(),
            entries,
            used: vec![false; entries.len()],
        }
    }

    /// The dotted path of `key` inside this table.
    pub fn path(&self, key: &str) -> String {
        join_path(&self.path, key)
    }

    pub fn get(&mut self, key: &str) -> Option<&'n Node> {
        let i = self.entries.iter().position(|(k, _)| k == key)?;
        self.used[i] = true;
        Some(&self.entries[i].1)
    }

    /// All entries, marking them used (for free-form tables such as
    /// variables).
    pub fn all(&mut self) -> &'n [(String, Node)] {
        self.used.iter_mut().for_each(|u| *u = true);
        self.entries
    }

    /// Reports the keys not asked for, suggesting the nearest known one.
    pub fn finish(self, problems: &mut FileProblems, known: &[&str]) {
        for (i, (key, node)) in self.entries.iter().enumerate() {
            if self.used[i] {
                continue;
            }
            let reason = match crate::shared::did_you_mean::did_you_mean(key, known) {
                Some(s) => format!("unknown key `{key}` (did you mean `{s}`?)"),
                None => format!("unknown key `{key}`; known keys here: {}", known.join(", ")),
            };
            problems.add(&join_path(&self.path, key), node.span.as_ref(), reason);
        }
    }
}

pub(crate) fn join_path(base: &str, key: &str) -> String {
    let needs_quotes = key.is_empty()
        || !key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    let key = if needs_quotes {
        format!("{key:?}")
    } else {
        key.to_string()
    };
    if base.is_empty() {
        key
    } else {
        format!("{base}.{key}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_reach_nested_values() {
        let text = "a = 1\n[t]\nb = [\"x\",\n  { c = true }]\nd = 1979-05-27\n";
        let doc = parse_document(text).unwrap();
        let p = FileProblems::new("f".into(), text);
        let (_, t) = doc.iter().find(|(k, _)| k == "t").unwrap();
        let Value::Table(entries) = &t.value else {
            panic!()
        };
        let (_, b) = &entries[0];
        let Value::Array(items) = &b.value else {
            panic!()
        };
        assert_eq!(p.line_of(items[1].span.clone().unwrap().start), 4);
        assert!(matches!(entries[1].1.value, Value::Datetime));
    }
}
