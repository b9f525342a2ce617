//! IntelMQ event rows as the formats see them.
//!
//! Owns reading the `events` table: only the columns a format asks for,
//! only for the ids of one group, with column names checked against the
//! real table (event data and format files never reach SQL as text).

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};

use crate::notify::directive::EventId;

/// One value of an event column, typed as PostgreSQL stored it.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldValue {
    Null,
    Text(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    Timestamp(DateTime<Utc>),
    /// `extra` (json or jsonb).
    Json(serde_json::Value),
}

/// One row of `events`, restricted to the columns that were loaded.
///
/// The column names are shared by every event of a load: a group of tens
/// of thousands of events then holds each name once, not once per event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub id: EventId,
    /// Sorted, no duplicates; parallel to `values`.
    columns: Arc<[String]>,
    values: Vec<FieldValue>,
}

impl Event {
    /// An event with these column values (for tests and tools; loads build
    /// theirs with shared column names).
    pub fn new(id: EventId, fields: impl IntoIterator<Item = (String, FieldValue)>) -> Event {
        let map: BTreeMap<String, FieldValue> = fields.into_iter().collect();
        let (columns, values): (Vec<String>, Vec<FieldValue>) = map.into_iter().unzip();
        Event {
            id,
            columns: columns.into(),
            values,
        }
    }

    /// The value of an event column (`source.ip`); `Null` when the column
    /// was not loaded or is NULL.
    pub fn get(&self, column: &str) -> &FieldValue {
        match self.columns.binary_search_by(|c| c.as_str().cmp(column)) {
            Ok(i) => &self.values[i],
            Err(_) => &FieldValue::Null,
        }
    }

    /// The value of `key` inside the `extra` JSON object, if present.
    pub fn extra(&self, key: &str) -> Option<&serde_json::Value> {
        match self.get("extra") {
            FieldValue::Json(serde_json::Value::Object(map)) => map.get(key),
            _ => None,
        }
    }
}

/// How a column of `events` is read back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ColumnKind {
    Int,
    /// `real`: read as f32 and widened through its shortest text, so that
    /// 6.2 stays 6.2 (psycopg2 hands Python the text form) instead of
    /// becoming 6.199999809265137.
    Float4,
    Float,
    Bool,
    Timestamp,
    Json,
    /// inet/cidr: printed by the type's output function (`192.0.2.1`, as
    /// psycopg2 returns it); a `::text` cast would add `/32`.
    Inet,
    /// Everything else (text, varchar, numeric, …) as PostgreSQL prints it.
    Text,
    /// `extra` with only some of its keys (see [`EventColumns::load`]).
    ExtraKeys,
}

/// The text of a json or jsonb value, unparsed.
struct RawJson<'a>(&'a [u8]);

impl<'a> tokio_postgres::types::FromSql<'a> for RawJson<'a> {
    fn from_sql(
        ty: &tokio_postgres::types::Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        if *ty == tokio_postgres::types::Type::JSONB {
            // jsonb's binary form: a version byte, then the text.
            match raw.split_first() {
                Some((1, text)) => Ok(RawJson(text)),
                _ => Err("unsupported jsonb format version".into()),
            }
        } else {
            Ok(RawJson(raw))
        }
    }

    fn accepts(ty: &tokio_postgres::types::Type) -> bool {
        *ty == tokio_postgres::types::Type::JSON || *ty == tokio_postgres::types::Type::JSONB
    }
}

/// Parses a JSON object keeping only `keys` (the rest is skipped without
/// being built); anything but an object gives `Null`, which has no keys
/// either.
fn json_subset(text: &[u8], keys: &[String]) -> Result<serde_json::Value, serde_json::Error> {
    use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
    if text.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Ok(serde_json::Value::Null);
    }
    struct Subset<'k>(&'k [String]);
    impl<'de> Visitor<'de> for Subset<'_> {
        type Value = serde_json::Value;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = serde_json::Map::new();
            while let Some(key) = map.next_key::<String>()? {
                if self.0.contains(&key) {
                    out.insert(key, map.next_value()?);
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Ok(serde_json::Value::Object(out))
        }
    }
    impl<'de> DeserializeSeed<'de> for Subset<'_> {
        type Value = serde_json::Value;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_map(self)
        }
    }
    let mut de = serde_json::Deserializer::from_slice(text);
    let v = Subset(keys).deserialize(&mut de)?;
    de.end()?;
    Ok(v)
}

#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("the events table has no column {0:?}")]
    UnknownColumn(String),
    #[error("loading events failed: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("an event's extra is not valid JSON: {0}")]
    Extra(serde_json::Error),
}

/// The columns of `events` and their types, read once per run (or reload)
/// so that column names from format files are checked against the real
/// table and never reach SQL unchecked.
#[derive(Debug, Clone, Default)]
pub struct EventColumns {
    kinds: BTreeMap<String, ColumnKind>,
}

impl EventColumns {
    pub async fn read<C: tokio_postgres::GenericClient>(client: &C) -> Result<Self, EventError> {
        let rows = client
            .query(
                "SELECT a.attname, format_type(a.atttypid, a.atttypmod) \
                   FROM pg_attribute a \
                  WHERE a.attrelid = 'events'::regclass AND a.attnum > 0 AND NOT a.attisdropped",
                &[],
            )
            .await?;
        let kinds = rows
            .iter()
            .map(|r| {
                let name: String = r.get(0);
                let ty: String = r.get(1);
                (name, kind_of(&ty))
            })
            .collect();
        Ok(EventColumns { kinds })
    }

    pub fn contains(&self, column: &str) -> bool {
        self.kinds.contains_key(column)
    }

    /// Loads the events with the given ids (ascending by id), with only
    /// `columns` (plus `id`). `extra.KEY` loads only that key of `extra`
    /// (unless `extra` itself is among the columns).
    pub async fn load<S: crate::notify::db::Session>(
        &self,
        session: &S,
        ids: &[EventId],
        columns: &[String],
    ) -> Result<Vec<Event>, EventError> {
        let mut select = String::from("SELECT id");
        let mut wanted = Vec::new();
        // `extra.KEY` asks for one key of `extra`. Unless the whole object
        // is wanted too, only those keys are kept: a Shadowserver event's
        // `extra` holds dozens of keys, and parsed whole they were most of
        // a large group's memory. The JSON text is still read whole (it is
        // what the old path parsed, so values come out the same); the
        // other keys are skipped while parsing.
        let whole_extra = columns.iter().any(|c| c == "extra");
        let mut extra_keys: Vec<String> = Vec::new();
        for col in columns {
            if let Some(key) = col.strip_prefix("extra.") {
                if self.kinds.get("extra") != Some(&ColumnKind::Json) {
                    return Err(EventError::UnknownColumn(col.clone()));
                }
                if !whole_extra && !extra_keys.iter().any(|k| k == key) {
                    extra_keys.push(key.to_string());
                }
            }
        }
        if !extra_keys.is_empty() {
            select.push_str(", \"extra\"::jsonb");
            wanted.push(("extra".to_string(), ColumnKind::ExtraKeys));
        }
        for col in columns {
            if col == "id" || col.starts_with("extra.") || wanted.iter().any(|(c, _)| c == col) {
                continue;
            }
            let kind = *self
                .kinds
                .get(col)
                .ok_or_else(|| EventError::UnknownColumn(col.clone()))?;
            let ident = quote_ident(col);
            let expr = match kind {
                ColumnKind::Int => format!(", {ident}::int8"),
                ColumnKind::Float4 => format!(", {ident}::float4"),
                ColumnKind::Float => format!(", {ident}::float8"),
                ColumnKind::Bool => format!(", {ident}"),
                ColumnKind::Timestamp => format!(", {ident}::timestamptz"),
                ColumnKind::Json | ColumnKind::ExtraKeys => format!(", {ident}::jsonb"),
                ColumnKind::Inet => {
                    format!(", CASE WHEN {ident} IS NULL THEN NULL ELSE format('%s', {ident}) END")
                }
                ColumnKind::Text => format!(", {ident}::text"),
            };
            select.push_str(&expr);
            wanted.push((col.clone(), kind));
        }
        select.push_str(" FROM events WHERE id = ANY($1) ORDER BY id");
        let ids: Vec<i64> = ids.iter().map(|e| e.0).collect();
        let st = crate::notify::db::prepare(session, &select).await?;
        let rows = tokio_postgres::GenericClient::query(session.client(), &st, &[&ids]).await?;
        // Values are stored in column-name order; `slot[i]` is where the
        // i-th selected column goes.
        let mut sorted: Vec<String> = wanted.iter().map(|(c, _)| c.clone()).collect();
        sorted.sort();
        let slot: Vec<usize> = wanted
            .iter()
            .map(|(c, _)| sorted.binary_search(c).expect("a selected column"))
            .collect();
        let names: Arc<[String]> = sorted.into();
        let mut events = Vec::with_capacity(rows.len());
        for row in rows {
            let mut values = vec![FieldValue::Null; wanted.len()];
            for (i, (_, kind)) in wanted.iter().enumerate() {
                let idx = i + 1;
                let v = match kind {
                    ColumnKind::Int => row.get::<_, Option<i64>>(idx).map(FieldValue::Int),
                    ColumnKind::Float4 => row
                        .get::<_, Option<f32>>(idx)
                        .map(|f| FieldValue::Float(f.to_string().parse().unwrap_or(f as f64))),
                    ColumnKind::Float => row.get::<_, Option<f64>>(idx).map(FieldValue::Float),
                    ColumnKind::Bool => row.get::<_, Option<bool>>(idx).map(FieldValue::Bool),
                    ColumnKind::Timestamp => row
                        .get::<_, Option<DateTime<Utc>>>(idx)
                        .map(FieldValue::Timestamp),
                    ColumnKind::Json => row
                        .get::<_, Option<serde_json::Value>>(idx)
                        .map(FieldValue::Json),
                    ColumnKind::ExtraKeys => match row.try_get::<_, Option<RawJson>>(idx)? {
                        Some(raw) => Some(FieldValue::Json(
                            json_subset(raw.0, &extra_keys).map_err(EventError::Extra)?,
                        )),
                        None => None,
                    },
                    ColumnKind::Text | ColumnKind::Inet => {
                        row.get::<_, Option<String>>(idx).map(FieldValue::Text)
                    }
                };
                values[slot[i]] = v.unwrap_or(FieldValue::Null);
            }
            events.push(Event {
                id: EventId(row.get(0)),
                columns: names.clone(),
                values,
            });
        }
        Ok(events)
    }
}

fn kind_of(ty: &str) -> ColumnKind {
    match ty {
        "integer" | "bigint" | "smallint" => ColumnKind::Int,
        "real" => ColumnKind::Float4,
        "double precision" => ColumnKind::Float,
        "boolean" => ColumnKind::Bool,
        "json" | "jsonb" => ColumnKind::Json,
        "inet" | "cidr" => ColumnKind::Inet,
        t if t.starts_with("timestamp") => ColumnKind::Timestamp,
        _ => ColumnKind::Text,
    }
}

/// Double-quotes an identifier (IntelMQ's column names contain dots). The
/// name was already checked to be a real column; quoting is the second line.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
