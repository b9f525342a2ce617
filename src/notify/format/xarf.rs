//! X-ARF v0.2 reports (intelmq-mailgen's example 20, which never worked in
//! 1.4): one report per event, written as the YAML second part of the mail.
//!
//! Event data is untrusted, so the YAML is written by this small emitter
//! rather than assembled from text: keys come only from format files and
//! are checked at load time; every string value is double-quoted with
//! every character that could end the scalar or the line escaped, so no
//! value can add keys, documents or anything else to the report.

use chrono::{DateTime, Utc};
use serde_json::Value as Json;

use crate::notify::event::{Event, FieldValue};
use crate::notify::render::table::{field_text, json_text, python_float_repr};

/// The keys pyxarf requires of every report, in the order we write them.
pub(crate) const MANDATORY: &[&str] = &[
    "Reported-From",
    "Category",
    "Report-Type",
    "Report-ID",
    "Date",
    "Source",
    "Source-Type",
    "Attachment",
    "Schema-URL",
];

/// Keys mailgend fills in itself; a format may not set them.
pub(crate) const RESERVED: &[&str] = &["Reported-From", "Report-ID", "Attachment", "User-Agent"];

/// The report format version written unless the format sets `Version`.
pub(crate) const DEFAULT_VERSION: f64 = 0.2;

/// A YAML scalar.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Scalar {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
}

/// How an event value becomes a report value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FieldFormat {
    /// Numbers stay numbers, booleans booleans, timestamps RFC 3339,
    /// everything else a string.
    Auto,
    /// Always a string (as the value would appear in a CSV cell).
    String,
    /// A timestamp as RFC 3339 in UTC (`2024-05-01T06:00:00+00:00`).
    Rfc3339,
    /// A timestamp as RFC 2822 in UTC (`Wed, 01 May 2024 06:00:00 +0000`).
    Rfc2822,
}

impl FieldFormat {
    pub(crate) const NAMES: &'static [&'static str] = &["auto", "string", "rfc3339", "rfc2822"];

    pub(crate) fn parse(s: &str) -> Option<FieldFormat> {
        Some(match s {
            "auto" => FieldFormat::Auto,
            "string" => FieldFormat::String,
            "rfc3339" => FieldFormat::Rfc3339,
            "rfc2822" => FieldFormat::Rfc2822,
            _ => return None,
        })
    }
}

/// One report field filled from the event.
#[derive(Debug, Clone)]
pub(crate) struct EventField {
    pub key: String,
    /// An `events` column or `extra.<key>`.
    pub field: String,
    pub format: FieldFormat,
}

/// What a format declares about its reports.
#[derive(Debug, Clone)]
pub(crate) struct XarfSpec {
    pub static_fields: Vec<(String, Scalar)>,
    pub fields: Vec<EventField>,
}

/// Report keys as pyxarf names them: its parameter names with `_` turned
/// into `-`. Returns `None` for keys that are not plain words and dashes.
pub(crate) fn normalise_key(key: &str) -> Option<String> {
    let k = key.replace('_', "-");
    let mut chars = k.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    ok.then_some(k)
}

impl XarfSpec {
    /// The `events` columns the reports read.
    pub fn event_columns(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for f in &self.fields {
            // `extra.KEY` stays whole: the loader fetches only the keys used.
            let col = f.field.clone();
            if !out.contains(&col) {
                out.push(col);
            }
        }
        out
    }

    /// The YAML report for one event. `Err` names a mandatory key the
    /// event left empty.
    pub fn report(
        &self,
        event: &Event,
        reported_from: &str,
        report_id: &str,
        user_agent: &str,
    ) -> Result<String, String> {
        let mut entries: Vec<(String, Scalar)> = vec![
            ("Reported-From".into(), Scalar::Str(reported_from.into())),
            ("Report-ID".into(), Scalar::Str(report_id.into())),
            ("Attachment".into(), Scalar::Str("none".into())),
            ("User-Agent".into(), Scalar::Str(user_agent.into())),
        ];
        if !self.static_fields.iter().any(|(k, _)| k == "Version") {
            entries.push(("Version".into(), Scalar::Float(DEFAULT_VERSION)));
        }
        entries.extend(self.static_fields.iter().cloned());
        for f in &self.fields {
            // Like the example's schema mapping, an empty value leaves the
            // key out (and may replace a static value of the same key only
            // when present).
            if let Some(v) = event_value(event, &f.field, f.format) {
                entries.retain(|(k, _)| k != &f.key);
                entries.push((f.key.clone(), v));
            }
        }
        for m in MANDATORY {
            if !entries.iter().any(|(k, _)| k == m) {
                return Err(format!("the mandatory field `{m}` has no value"));
            }
        }
        // Mandatory keys first in a fixed order, then the rest sorted, so
        // reports are stable and easy to read.
        entries.sort_by(|(a, _), (b, _)| {
            let rank = |k: &str| {
                MANDATORY
                    .iter()
                    .position(|m| *m == k)
                    .unwrap_or(MANDATORY.len())
            };
            rank(a).cmp(&rank(b)).then_with(|| a.cmp(b))
        });
        let mut out = String::new();
        for (k, v) in &entries {
            out.push_str(k);
            out.push_str(": ");
            out.push_str(&yaml_scalar(v));
            out.push('\n');
        }
        Ok(out)
    }
}

fn rfc3339(t: &DateTime<Utc>) -> String {
    let micros = t.timestamp_subsec_micros();
    if micros == 0 {
        t.format("%Y-%m-%dT%H:%M:%S+00:00").to_string()
    } else {
        format!("{}.{:06}+00:00", t.format("%Y-%m-%dT%H:%M:%S"), micros)
    }
}

fn json_scalar(v: &Json) -> Option<Scalar> {
    match v {
        Json::Null => None,
        Json::Bool(b) => Some(Scalar::Bool(*b)),
        Json::Number(n) => Some(match n.as_i64() {
            Some(i) => Scalar::Int(i),
            None => Scalar::Str(json_text(v)),
        }),
        Json::String(s) => Some(Scalar::Str(s.clone())),
        Json::Array(_) | Json::Object(_) => Some(Scalar::Str(json_text(v))),
    }
}

fn event_value(event: &Event, field: &str, format: FieldFormat) -> Option<Scalar> {
    let value: Option<FieldValue> = match field.split_once('.') {
        Some(("extra", key)) => event.extra(key).cloned().map(FieldValue::Json),
        _ => Some(event.get(field).clone()),
    };
    let value = value?;
    if matches!(value, FieldValue::Null | FieldValue::Json(Json::Null)) {
        return None;
    }
    match (format, &value) {
        (FieldFormat::Rfc3339 | FieldFormat::Auto, FieldValue::Timestamp(t)) => {
            Some(Scalar::Str(rfc3339(t)))
        }
        (FieldFormat::Rfc2822, FieldValue::Timestamp(t)) => Some(Scalar::Str(
            t.format("%a, %d %b %Y %H:%M:%S +0000").to_string(),
        )),
        (FieldFormat::Auto, FieldValue::Int(i)) => Some(Scalar::Int(*i)),
        (FieldFormat::Auto, FieldValue::Float(f)) => Some(Scalar::Float(*f)),
        (FieldFormat::Auto, FieldValue::Bool(b)) => Some(Scalar::Bool(*b)),
        (FieldFormat::Auto, FieldValue::Json(j)) => json_scalar(j),
        (FieldFormat::String, FieldValue::Timestamp(t)) => Some(Scalar::Str(rfc3339(t))),
        (_, v) => Some(Scalar::Str(field_text(v))),
    }
}

/// One YAML scalar. Strings are always double-quoted; numbers and booleans
/// are written plain because they come from typed columns or the format
/// file, never from free text.
pub(crate) fn yaml_scalar(v: &Scalar) -> String {
    match v {
        Scalar::Str(s) => yaml_quote(s),
        Scalar::Int(i) => i.to_string(),
        Scalar::Bool(b) => b.to_string(),
        Scalar::Float(f) => {
            if f.is_nan() {
                ".nan".into()
            } else if f.is_infinite() {
                if *f > 0.0 { ".inf" } else { "-.inf" }.into()
            } else {
                // YAML 1.1 resolvers want a dot in a float (`1.0e+16`).
                let r = python_float_repr(*f);
                match r.split_once('e') {
                    Some((m, e)) if !m.contains('.') => format!("{m}.0e{e}"),
                    _ => r,
                }
            }
        }
    }
}

/// A double-quoted YAML string. Everything outside YAML's printable set,
/// and every line break YAML 1.1 or 1.2 knows (so a value stays on its
/// line), is escaped.
pub(crate) fn yaml_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\0' => out.push_str("\\0"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\u{85}' => out.push_str("\\N"),
            '\u{2028}' => out.push_str("\\L"),
            '\u{2029}' => out.push_str("\\P"),
            c if (c as u32) < 0x20 || (0x7f..=0x9f).contains(&(c as u32)) => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            '\u{feff}' | '\u{fffe}' | '\u{ffff}' => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_keeps_values_on_their_line() {
        assert_eq!(yaml_quote("a\"b\\c"), r#""a\"b\\c""#);
        assert_eq!(
            yaml_quote("x\nEvil: 1\r\u{2028}\u{85}\u{1b}"),
            r#""x\nEvil: 1\r\L\N\x1b""#
        );
        assert_eq!(yaml_quote("Grüße ✓"), "\"Grüße ✓\"");
    }

    #[test]
    fn floats_resolve_as_floats() {
        assert_eq!(yaml_scalar(&Scalar::Float(0.2)), "0.2");
        assert_eq!(yaml_scalar(&Scalar::Float(1e16)), "1.0e+16");
        assert_eq!(yaml_scalar(&Scalar::Float(1.5e-7)), "1.5e-07");
    }

    #[test]
    fn key_normalisation() {
        assert_eq!(normalise_key("source_port").as_deref(), Some("source-port"));
        assert_eq!(normalise_key("Source-ASN").as_deref(), Some("Source-ASN"));
        assert_eq!(normalise_key("a: b"), None);
        assert_eq!(normalise_key("-x"), None);
    }
}
