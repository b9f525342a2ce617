//! Pending notification directives and the groups they aggregate into.
//!
//! This module owns the *reading* side of the `directives` table: which
//! rows are pending (spec §3.2), how they are grouped (§3.3) and what a
//! group carries (`event_ids`, `directive_ids`, newest `inserted_at`,
//! largest `notification_interval`, `last_sent`). It never writes: marking
//! sent is `sent`'s job.

use std::fmt;

use chrono::{DateTime, Duration, Utc};

/// Primary key of a row in `directives`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DirectiveId(pub i64);

/// Primary key of a row in IntelMQ's `events`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventId(pub i64);

impl fmt::Display for DirectiveId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The `aggregate_identifier` of a directive: `[key, value]` pairs sorted by
/// key, values already text (the trigger converts with `jsonb_each_text`, so
/// `123` and `"123"` are the same value).
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AggregateIdentifier(pub Vec<(String, String)>);

impl AggregateIdentifier {
    /// The value for `key`, if the directives aggregate by it.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// What two directives must share to go out in one mail (spec §3.3).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GroupKey {
    pub recipient_address: String,
    pub template_name: String,
    pub notification_format: String,
    pub event_data_format: String,
    pub aggregate_identifier: AggregateIdentifier,
}

/// Pending directives that aggregate into one notification.
#[derive(Debug, Clone)]
pub struct Group {
    pub key: GroupKey,
    /// Sorted ascending; parallel to nothing (a directive's event may repeat).
    pub directive_ids: Vec<DirectiveId>,
    /// One per directive, in the order of `directive_ids`.
    pub event_ids: Vec<EventId>,
    /// The newest `inserted_at` of the group's directives.
    pub inserted_at: DateTime<Utc>,
    /// The largest `notification_interval` of the group's directives.
    pub notification_interval: Duration,
    /// `sent_at` of the most recently inserted already-sent directive with
    /// the same five keys, if any.
    pub last_sent: Option<DateTime<Utc>>,
}

impl Group {
    /// Distinct event ids, ascending: the events a mail reports on.
    pub fn distinct_event_ids(&self) -> Vec<EventId> {
        let mut ids = self.event_ids.clone();
        ids.sort();
        ids.dedup();
        ids
    }

    /// `"[1, 2, 3]"`-style lists for log lines (the old tool's shape, which
    /// operators grep for).
    pub fn directive_ids_display(&self) -> String {
        id_list(&self.directive_ids)
    }

    pub fn event_ids_display(&self) -> String {
        id_list(&self.event_ids)
    }
}

fn id_list<T: fmt::Display>(ids: &[T]) -> String {
    let mut s = String::from("[");
    for (i, id) in ids.iter().enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        s.push_str(&id.to_string());
    }
    s.push(']');
    s
}

/// Selecting pending groups needs the pending rows only; locking happens per
/// group when it is claimed ([`claim`]), so a long run never holds every
/// pending row locked (the old tool's `FOR UPDATE NOWAIT` did, and made a
/// second instance log lock errors in PostgreSQL's log).
const PENDING_GROUPS_SQL: &str = "
SELECT d.recipient_address, d.template_name, d.notification_format,
       d.event_data_format,
       array_to_json(d.aggregate_identifier)::text AS aggregate_identifier,
       array_agg(d.events_id ORDER BY d.id) AS event_ids,
       array_agg(d.id ORDER BY d.id) AS directive_ids,
       max(d.inserted_at) AS inserted_at,
       EXTRACT(EPOCH FROM max(d.notification_interval))::float8 AS notification_interval,
       (SELECT s.sent_at
          FROM directives AS d2
          JOIN sent AS s ON d2.sent_id = s.id
         WHERE d2.recipient_address = d.recipient_address
           AND d2.template_name = d.template_name
           AND d2.notification_format = d.notification_format
           AND d2.event_data_format = d.event_data_format
           AND d2.aggregate_identifier IS NOT DISTINCT FROM d.aggregate_identifier
         ORDER BY d2.inserted_at DESC
         LIMIT 1) AS last_sent
  FROM (SELECT d3.id, d3.events_id, d3.recipient_address, d3.template_name,
               d3.notification_format, d3.event_data_format,
               d3.notification_interval, d3.aggregate_identifier, d3.inserted_at
          FROM directives AS d3
          {join}
         WHERE d3.sent_id IS NULL
           AND d3.medium = 'email'
           AND d3.endpoint = 'source'
           {where}) AS d
 GROUP BY d.recipient_address, d.template_name, d.notification_format,
          d.event_data_format, d.aggregate_identifier
 ORDER BY min(d.id)";

#[derive(Debug, thiserror::Error)]
pub enum SelectError {
    #[error("selecting pending directives failed: {}", crate::notify::db::describe(.0))]
    Db(#[from] tokio_postgres::Error),
    #[error("directive row with malformed aggregate_identifier {0:?}")]
    BadAggregate(String),
}

/// The pending-directive selection SQL with the operator's
/// `database.additional_directive_where` applied the way intelmq-mailgen
/// applies it: appended with `AND`; `events` is joined when the string
/// mentions `events.`; directive columns are reachable as `d3.`.
pub fn pending_groups_sql(additional_where: Option<&str>) -> String {
    let (join, filter) = match additional_where.map(str::trim).filter(|w| !w.is_empty()) {
        Some(w) => {
            let join = if w.contains("events.") {
                "JOIN events ON d3.events_id = events.id"
            } else {
                ""
            };
            (join, format!("AND ({w})"))
        }
        None => ("", String::new()),
    };
    PENDING_GROUPS_SQL
        .replace("{join}", join)
        .replace("{where}", &filter)
}

/// Reads every pending group, oldest first.
pub async fn pending_groups<C: tokio_postgres::GenericClient>(
    client: &C,
    additional_where: Option<&str>,
) -> Result<Vec<Group>, SelectError> {
    let sql = pending_groups_sql(additional_where);
    let rows = client.query(sql.as_str(), &[]).await?;
    rows.iter().map(group_from_row).collect()
}

/// The pending groups as a stream within the caller's snapshot (one
/// statement, rows turned into groups as they arrive): for readers that
/// want one consistent view, such as `preview`, and hold no locks.
pub async fn pending_groups_stream<C: tokio_postgres::GenericClient>(
    client: &C,
    additional_where: Option<&str>,
) -> Result<impl futures::Stream<Item = Result<Group, SelectError>>, SelectError> {
    use futures::StreamExt;
    let sql = pending_groups_sql(additional_where);
    let none: [&(dyn tokio_postgres::types::ToSql + Sync); 0] = [];
    let rows = client.query_raw(sql.as_str(), none).await?;
    Ok(rows.map(|r| group_from_row(&r?)))
}

/// The pending groups as a stream, oldest first, for a one-shot run over
/// a backlog of any size.
///
/// The selection runs once into a holdable cursor (`WITH HOLD`): PostgreSQL
/// materialises the result at COMMIT, spilling to its own temp files, and
/// the stream fetches it in batches. Memory stays bounded on our side, and —
/// unlike one long-running statement — no snapshot is held for the whole
/// run: a snapshot that old keeps autovacuum from removing the dead rows
/// every sent group leaves in `directives` and `mailgend.outbox`, and the
/// claims and outbox look-ups then slow down with every group sent (it
/// made a 100,000-event run spend 150 s in claims).
///
/// `client` must be a connection of its own: the cursor lives in its
/// session until the stream is dropped with the connection or exhausted.
pub async fn pending_groups_materialized<'c>(
    client: &'c tokio_postgres::Client,
    additional_where: Option<&str>,
) -> Result<impl futures::Stream<Item = Result<Group, SelectError>> + 'c, SelectError> {
    use futures::StreamExt;
    const BATCH: &str = "FETCH 1000 FROM mailgend_pending";
    let sql = pending_groups_sql(additional_where);
    client.batch_execute("BEGIN").await?;
    let declared = client
        .execute(
            format!("DECLARE mailgend_pending NO SCROLL CURSOR WITH HOLD FOR {sql}").as_str(),
            &[],
        )
        .await;
    if let Err(e) = declared {
        let _ = client.batch_execute("ROLLBACK").await;
        return Err(e.into());
    }
    client.batch_execute("COMMIT").await?;
    let fetch = client.prepare(BATCH).await?;
    let batches =
        futures::stream::try_unfold((client, fetch, false), |(client, fetch, done)| async move {
            if done {
                return Ok(None);
            }
            let rows = client.query(&fetch, &[]).await?;
            if rows.is_empty() {
                let _ = client.batch_execute("CLOSE mailgend_pending").await;
                return Ok(None);
            }
            let done = rows.len() < 1000;
            if done {
                let _ = client.batch_execute("CLOSE mailgend_pending").await;
            }
            Ok::<_, SelectError>(Some((rows, (client, fetch, done))))
        });
    Ok(batches
        .map(|batch| match batch {
            Ok(rows) => futures::stream::iter(rows.iter().map(group_from_row).collect::<Vec<_>>())
                .left_stream(),
            Err(e) => futures::stream::iter(vec![Err(e)]).right_stream(),
        })
        .flatten())
}

fn group_from_row(row: &tokio_postgres::Row) -> Result<Group, SelectError> {
    let agg_text: Option<String> = row.get("aggregate_identifier");
    let aggregate_identifier = parse_aggregate(agg_text.as_deref())?;
    let event_ids: Vec<i64> = row.get("event_ids");
    let directive_ids: Vec<i64> = row.get("directive_ids");
    let interval_secs: f64 = row.get("notification_interval");
    Ok(Group {
        key: GroupKey {
            recipient_address: row.get("recipient_address"),
            template_name: row.get("template_name"),
            notification_format: row.get("notification_format"),
            event_data_format: row.get("event_data_format"),
            aggregate_identifier,
        },
        directive_ids: directive_ids.into_iter().map(DirectiveId).collect(),
        event_ids: event_ids.into_iter().map(EventId).collect(),
        inserted_at: row.get("inserted_at"),
        notification_interval: Duration::milliseconds((interval_secs * 1000.0).round() as i64),
        last_sent: row.get("last_sent"),
    })
}

/// `[["k","v"], …]` (from `array_to_json`) into pairs. NULL and `{}` are the
/// empty identifier.
fn parse_aggregate(text: Option<&str>) -> Result<AggregateIdentifier, SelectError> {
    let Some(text) = text else {
        return Ok(AggregateIdentifier::default());
    };
    let bad = || SelectError::BadAggregate(text.to_string());
    let value: serde_json::Value = serde_json::from_str(text).map_err(|_| bad())?;
    let mut pairs = Vec::new();
    for pair in value.as_array().ok_or_else(bad)? {
        match pair.as_array().map(|p| p.as_slice()) {
            Some([serde_json::Value::String(k), v]) => {
                let v = match v {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Null => String::new(),
                    other => other.to_string(),
                };
                pairs.push((k.clone(), v));
            }
            _ => return Err(bad()),
        }
    }
    Ok(AggregateIdentifier(pairs))
}

/// How claiming a group went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Every directive of the group is locked by this transaction and still
    /// pending.
    Claimed,
    /// Some directive is locked by another instance or was sent meanwhile:
    /// leave the group to whoever has it.
    Busy,
}

/// Locks the group's directives for the caller's transaction without
/// waiting (`SKIP LOCKED`: another instance's lock is no error and leaves
/// nothing in PostgreSQL's log).
pub async fn claim<S: crate::notify::db::Session>(
    tx: &S,
    group: &Group,
) -> Result<Claim, tokio_postgres::Error> {
    Ok(claim_at(tx, group).await?.0)
}

/// [`claim`], also returning the database's `now()` (the transaction's
/// start), which the formats decide by: one round trip for both.
pub async fn claim_at<S: crate::notify::db::Session>(
    tx: &S,
    group: &Group,
) -> Result<(Claim, Option<DateTime<Utc>>), tokio_postgres::Error> {
    use tokio_postgres::GenericClient;
    let ids: Vec<i64> = group.directive_ids.iter().map(|d| d.0).collect();
    let st = crate::notify::db::prepare(
        tx,
        // `sent_id + 0`: not indexable on purpose. With statistics that
        // say few directives are pending (normal, until a feed's burst
        // arrives) the planner otherwise ANDs in the sent_id index and
        // reads every pending entry for each claim: 9 ms per group in a
        // 100,000-event run.
        "SELECT id, now() FROM directives WHERE id = ANY($1) AND sent_id + 0 IS NULL \
         FOR UPDATE SKIP LOCKED",
    )
    .await?;
    let rows = tx.client().query(&st, &[&ids]).await?;
    let now = rows.first().map(|r| r.get::<_, DateTime<Utc>>(1));
    Ok(if rows.len() == ids.len() {
        (Claim::Claimed, now)
    } else {
        (Claim::Busy, now)
    })
}

/// Claims the directives of several groups at once (see [`claim_at`]):
/// returns the ids this transaction now holds and the database's `now()`
/// (`None` when it holds none). A group is claimed when all of its ids are
/// among them.
pub async fn claim_many<S: crate::notify::db::Session>(
    tx: &S,
    ids: &[DirectiveId],
) -> Result<
    (
        std::collections::HashSet<DirectiveId>,
        Option<DateTime<Utc>>,
    ),
    tokio_postgres::Error,
> {
    use tokio_postgres::GenericClient;
    let raw: Vec<i64> = ids.iter().map(|d| d.0).collect();
    // The same statement as claim_at's, so it shares the prepared plan.
    let st = crate::notify::db::prepare(
        tx,
        "SELECT id, now() FROM directives WHERE id = ANY($1) AND sent_id + 0 IS NULL \
         FOR UPDATE SKIP LOCKED",
    )
    .await?;
    let rows = tx.client().query(&st, &[&raw]).await?;
    let now = rows.first().map(|r| r.get::<_, DateTime<Utc>>(1));
    Ok((rows.iter().map(|r| DirectiveId(r.get(0))).collect(), now))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aggregate_pairs_parse() {
        let a = parse_aggregate(Some(r#"[["source.asn","64496"],["x",""]]"#)).unwrap();
        assert_eq!(a.get("source.asn"), Some("64496"));
        assert_eq!(a.get("x"), Some(""));
        assert!(parse_aggregate(Some("[]")).unwrap().is_empty());
        assert!(parse_aggregate(None).unwrap().is_empty());
        assert!(parse_aggregate(Some(r#"{"a":1}"#)).is_err());
    }

    #[test]
    fn additional_where_joins_events_only_when_needed() {
        let plain = pending_groups_sql(Some("d3.template_name <> 'x'"));
        assert!(plain.contains("AND (d3.template_name <> 'x')"));
        assert!(!plain.contains("JOIN events"));
        let joined = pending_groups_sql(Some("events.\"feed.name\" = 'x'"));
        assert!(joined.contains("JOIN events ON d3.events_id = events.id"));
        let none = pending_groups_sql(Some("  "));
        assert!(!none.contains("AND ("));
    }
}
