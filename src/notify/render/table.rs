//! Table formats: which event values go into the CSV of a notification, in
//! which order and under which titles, and the CSV text itself (spec §6,
//! §11).
//!
//! Recipients parse these files, and some compare them with what
//! intelmq-mailgen sent before, so every value is written the way the old
//! tool's Python wrote it: `True`/`False`, floats as Python's `repr`, other
//! timestamps as `str(datetime)`, `time.source` without zone or fraction,
//! nested JSON as Python's `str()` of a list or dict. The CSV dialect is
//! Python's `csv.QUOTE_ALL`: `,`, every field in `"`, inner quotes doubled,
//! `\r\n` after each row.

use chrono::{DateTime, Utc};
use serde_json::Value as Json;

use crate::notify::event::{Event, FieldValue};

/// One column of a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Column {
    /// An `events` column, such as `source.ip`.
    Event { field: String, title: String },
    /// The value of `key` inside the `extra` JSON object.
    Extra { key: String, title: String },
}

impl Column {
    pub fn title(&self) -> &str {
        match self {
            Column::Event { title, .. } | Column::Extra { title, .. } => title,
        }
    }

    /// A name for the column that is unique within a sane table:
    /// `source.ip` or `extra.system_desc`.
    pub fn source_name(&self) -> String {
        match self {
            Column::Event { field, .. } => field.clone(),
            Column::Extra { key, .. } => format!("extra.{key}"),
        }
    }

    /// A column for `field`: names starting with `extra.` read the rest of
    /// the name as a key of `extra`, as intelmq-mailgen's column tuples do.
    pub fn from_field(field: &str, title: &str) -> Column {
        match field.split_once('.') {
            Some(("extra", key)) => Column::Extra {
                key: key.to_string(),
                title: title.to_string(),
            },
            _ => Column::Event {
                field: field.to_string(),
                title: title.to_string(),
            },
        }
    }

    /// The cell text of this column for `event`.
    pub fn cell(&self, event: &Event) -> String {
        match self {
            Column::Event { field, .. } => match (field.as_str(), event.get(field)) {
                // The old tool drops zone and fraction of this one column.
                ("time.source", FieldValue::Timestamp(t)) => {
                    t.format("%Y-%m-%d %H:%M:%S").to_string()
                }
                (_, v) => field_text(v),
            },
            Column::Extra { key, .. } => event.extra(key).map(json_text).unwrap_or_default(),
        }
    }
}

/// A named, ordered list of columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableFormat {
    pub name: String,
    pub columns: Vec<Column>,
}

/// The columns used when a format names none (spec §6, the fallback).
pub const DEFAULT_COLUMNS: &[(&str, &str)] = &[
    ("source.asn", "asn"),
    ("source.ip", "ip"),
    ("time.source", "timestamp"),
    ("source.port", "src_port"),
    ("destination.ip", "dst_ip"),
    ("destination.port", "dst_port"),
    ("destination.fqdn", "dst_host"),
    ("protocol.transport", "proto"),
];

impl TableFormat {
    /// The default column set under `name`.
    pub fn default_columns(name: &str) -> TableFormat {
        TableFormat {
            name: name.to_string(),
            columns: DEFAULT_COLUMNS
                .iter()
                .map(|(f, t)| Column::from_field(f, t))
                .collect(),
        }
    }

    /// The `events` columns to load, each once, in first-use order.
    pub fn event_columns(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for c in &self.columns {
            // `extra.KEY`: the loader then fetches only the keys used.
            let name = c.source_name();
            if !out.contains(&name) {
                out.push(name);
            }
        }
        out
    }

    /// The CSV text: a header row of titles, then one row per event in the
    /// order given.
    pub fn to_csv(&self, events: &[Event]) -> String {
        // The csv crate with QuoteStyle::Always and CRLF writes the same
        // bytes as Python's csv.writer(quoting=QUOTE_ALL) (checked against
        // python3 in tests/formats.rs), so it is used rather than our own.
        let mut w = csv::WriterBuilder::new()
            .delimiter(b',')
            .quote(b'"')
            .double_quote(true)
            .quote_style(csv::QuoteStyle::Always)
            .terminator(csv::Terminator::CRLF)
            .from_writer(Vec::new());
        let titles: Vec<&str> = self.columns.iter().map(Column::title).collect();
        // Writing to a Vec cannot fail.
        w.write_record(&titles).expect("write to memory");
        for e in events {
            let row: Vec<String> = self.columns.iter().map(|c| c.cell(e)).collect();
            w.write_record(&row).expect("write to memory");
        }
        let bytes = w.into_inner().expect("flush to memory");
        String::from_utf8(bytes).expect("all cells are UTF-8")
    }
}

/// A column value as Python's `str()` shows what psycopg2 returned for it;
/// NULL is empty.
pub fn field_text(v: &FieldValue) -> String {
    match v {
        FieldValue::Null => String::new(),
        FieldValue::Text(s) => s.clone(),
        FieldValue::Int(i) => i.to_string(),
        FieldValue::Float(f) => python_float_repr(*f),
        FieldValue::Bool(b) => python_bool(*b).to_string(),
        FieldValue::Timestamp(t) => python_datetime_str(t),
        FieldValue::Json(j) => json_text(j),
    }
}

fn python_bool(b: bool) -> &'static str {
    if b {
        "True"
    } else {
        "False"
    }
}

/// `str()` of a UTC-aware Python datetime: `2024-05-01 06:00:00+00:00`,
/// with `.ffffff` only when there are microseconds.
pub fn python_datetime_str(t: &DateTime<Utc>) -> String {
    let micros = t.timestamp_subsec_micros();
    if micros == 0 {
        t.format("%Y-%m-%d %H:%M:%S+00:00").to_string()
    } else {
        format!("{}.{:06}+00:00", t.format("%Y-%m-%d %H:%M:%S"), micros)
    }
}

/// A JSON value as the old tool wrote it after `json.loads`: strings as
/// they are, `null` empty, booleans `True`/`False`, numbers as Python
/// prints an int or float, arrays and objects as Python's `str()`.
pub fn json_text(v: &Json) -> String {
    match v {
        Json::Null => String::new(),
        Json::String(s) => s.clone(),
        Json::Bool(b) => python_bool(*b).to_string(),
        Json::Number(n) => python_number(n),
        Json::Array(_) | Json::Object(_) => {
            let mut out = String::new();
            python_repr_json(v, &mut out);
            out
        }
    }
}

/// A JSON number as Python prints the int or float `json.loads` makes of
/// it. Integers beyond 64 bits stay exact only when serde_json keeps the
/// literal (its `arbitrary_precision` feature); otherwise serde_json has
/// already turned them into floats.
fn python_number(n: &serde_json::Number) -> String {
    if let Some(i) = n.as_i64() {
        return i.to_string();
    }
    if let Some(u) = n.as_u64() {
        return u.to_string();
    }
    let literal = n.to_string();
    let digits = literal.strip_prefix('-').unwrap_or(&literal);
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        // An integer literal kept verbatim: Python's int prints it
        // without sign for zero and without leading zeros.
        let trimmed = digits.trim_start_matches('0');
        if trimmed.is_empty() {
            return "0".into();
        }
        return if literal.starts_with('-') {
            format!("-{trimmed}")
        } else {
            trimmed.to_string()
        };
    }
    match n.as_f64() {
        Some(f) => python_float_repr(f),
        None => literal,
    }
}

/// Python's `repr(float)`: the shortest digits that round-trip, fixed
/// notation for decimal exponents -4..16 (always with a fractional part),
/// scientific otherwise (`1e+16`, `1.5e-07`).
pub fn python_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "nan".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf" } else { "-inf" }.into();
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    // Rust's `{:e}` yields the shortest round-trip digits too.
    let s = format!("{x:e}");
    let (mantissa, exp) = s.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("integer exponent");
    let negative = mantissa.starts_with('-');
    let digits: String = mantissa.chars().filter(|c| c.is_ascii_digit()).collect();
    let ndigits = digits.len() as i32;
    let decpt = exp + 1;
    let mut out = String::new();
    if negative {
        out.push('-');
    }
    if decpt <= -4 || decpt > 16 {
        out.push_str(&digits[..1]);
        if ndigits > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        out.push('e');
        out.push(if exp < 0 { '-' } else { '+' });
        out.push_str(&format!("{:02}", exp.abs()));
    } else if decpt <= 0 {
        out.push_str("0.");
        out.push_str(&"0".repeat((-decpt) as usize));
        out.push_str(&digits);
    } else if decpt < ndigits {
        out.push_str(&digits[..decpt as usize]);
        out.push('.');
        out.push_str(&digits[decpt as usize..]);
    } else {
        out.push_str(&digits);
        out.push_str(&"0".repeat((decpt - ndigits) as usize));
        out.push_str(".0");
    }
    out
}

/// Python's `repr()` of what `json.loads` returns, for values nested in a
/// list or dict.
fn python_repr_json(v: &Json, out: &mut String) {
    match v {
        Json::Null => out.push_str("None"),
        Json::Bool(b) => out.push_str(python_bool(*b)),
        Json::Number(n) => out.push_str(&python_number(n)),
        Json::String(s) => python_repr_str(s, out),
        Json::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                python_repr_json(item, out);
            }
            out.push(']');
        }
        Json::Object(map) => {
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                python_repr_str(k, out);
                out.push_str(": ");
                python_repr_json(item, out);
            }
            out.push('}');
        }
    }
}

/// Python's `repr(str)`: single quotes unless the text holds a `'` and no
/// `"`; backslash escapes for the quote, `\\`, `\t`, `\n`, `\r`, and `\x`,
/// `\u`, `\U` for characters Python does not consider printable.
fn python_repr_str(s: &str, out: &mut String) {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if !python_printable(c) => {
                let n = c as u32;
                if n < 0x100 {
                    out.push_str(&format!("\\x{n:02x}"));
                } else if n < 0x10000 {
                    out.push_str(&format!("\\u{n:04x}"));
                } else {
                    out.push_str(&format!("\\U{n:08x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

/// Python's `str.isprintable` for one character, without the tables for
/// unassigned code points (category Cn): those are kept as they are. The
/// other non-printable categories (Cc, Cf, Co, Zl, Zp and Zs except the
/// space) are listed here.
fn python_printable(c: char) -> bool {
    let n = c as u32;
    !matches!(n,
        // Cc
        0x00..=0x1f | 0x7f..=0x9f
        // Zs without U+0020
        | 0xa0 | 0x1680 | 0x2000..=0x200a | 0x202f | 0x205f | 0x3000
        // Zl, Zp
        | 0x2028 | 0x2029
        // Cf
        | 0xad | 0x600..=0x605 | 0x61c | 0x6dd | 0x70f | 0x890..=0x891 | 0x8e2 | 0x180e
        | 0x200b..=0x200f | 0x202a..=0x202e | 0x2060..=0x2064 | 0x2066..=0x206f
        | 0xfeff | 0xfff9..=0xfffb | 0x110bd | 0x110cd | 0x13430..=0x1343f
        | 0x1bca0..=0x1bca3 | 0x1d173..=0x1d17a | 0xe0001 | 0xe0020..=0xe007f
        // Co
        | 0xe000..=0xf8ff | 0xf0000..=0xffffd | 0x100000..=0x10fffd
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notify::directive::EventId;
    use chrono::TimeZone;
    use serde_json::json;

    #[test]
    fn float_repr_like_python() {
        for (x, want) in [
            (1500.0, "1500.0"),
            (6.2, "6.2"),
            (1e16, "1e+16"),
            (1e-5, "1e-05"),
            (0.0001, "0.0001"),
            (1.5e-7, "1.5e-07"),
            (9999999999999998.0, "9999999999999998.0"),
            (123456789012345680.0, "1.2345678901234568e+17"),
            (-0.0, "-0.0"),
            (0.1 + 0.2, "0.30000000000000004"),
            (f64::INFINITY, "inf"),
            (-2.5, "-2.5"),
            (1e300, "1e+300"),
        ] {
            assert_eq!(python_float_repr(x), want, "{x:e}");
        }
    }

    #[test]
    fn cells_like_python() {
        let t = Utc.with_ymd_and_hms(2024, 5, 1, 6, 0, 0).unwrap();
        let e = Event::new(
            EventId(1),
            [
                (
                    "time.source".to_string(),
                    FieldValue::Timestamp(t + chrono::Duration::microseconds(5)),
                ),
                (
                    "time.observation".to_string(),
                    FieldValue::Timestamp(t + chrono::Duration::microseconds(5)),
                ),
                (
                    "extra".to_string(),
                    FieldValue::Json(
                        json!({"v": 6.20, "b": true, "n": null, "o": {"a": [1, "it's"]}}),
                    ),
                ),
            ],
        );
        let col = |f: &str| Column::from_field(f, "t").cell(&e);
        assert_eq!(col("time.source"), "2024-05-01 06:00:00");
        assert_eq!(col("time.observation"), "2024-05-01 06:00:00.000005+00:00");
        assert_eq!(col("extra.v"), "6.2");
        assert_eq!(col("extra.b"), "True");
        assert_eq!(col("extra.n"), "");
        assert_eq!(col("extra.missing"), "");
        assert_eq!(col("extra.o"), "{'a': [1, \"it's\"]}");
        assert_eq!(col("source.ip"), "");
    }
}
