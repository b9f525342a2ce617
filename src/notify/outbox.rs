//! The outbox: the durable record of each mail before and after SMTP.
//!
//! Owns `mailgend.outbox`. The exactly-once story is:
//!
//! 1. the group's directives are locked by the worker's transaction;
//! 2. every mail of the group is written here as `sending` on a separate,
//!    autocommitting connection, so the intent survives a crash;
//! 3. the mail goes to SMTP;
//! 4. in the group's transaction the directives are marked sent and the row
//!    becomes `accepted` — one COMMIT makes both true.
//!
//! If the process dies between 2 and 4, its transaction is rolled back and
//! the row locks are gone: a later claim of the same directives finds an
//! open row — a mail whose delivery is *in doubt*. A mail that certainly
//! was not handed over is never in doubt: after a definite refusal of the
//! mail (5xx, or SMTPUTF8/SIZE the relay lacks) the row becomes `failed`
//! (released: the group stays pending and is rendered anew next time, with
//! a new ticket); after a passing failure (a 4xx, the relay unreachable or
//! gone before the end of the data) it becomes `retry` (resent as is, same
//! ticket and Message-Id). Only a connection lost after the end of the
//! data leaves it `sending`.

use chrono::{DateTime, Utc};
use tokio_postgres::GenericClient;

use crate::notify::db::{self, Session};

use crate::notify::directive::DirectiveId;
use crate::notify::ticket::Ticket;

/// The state of an outbox row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Sending,
    Retry,
    Accepted,
    Failed,
    Held,
    Discarded,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Sending => "sending",
            State::Retry => "retry",
            State::Accepted => "accepted",
            State::Failed => "failed",
            State::Held => "held",
            State::Discarded => "discarded",
        }
    }

    fn parse(s: &str) -> State {
        match s {
            "sending" => State::Sending,
            "retry" => State::Retry,
            "accepted" => State::Accepted,
            "failed" => State::Failed,
            "held" => State::Held,
            _ => State::Discarded,
        }
    }
}

/// A mail about to be handed to SMTP.
#[derive(Debug, Clone)]
pub struct Intent<'a> {
    pub ticket: &'a Ticket,
    pub message_id: &'a str,
    pub marks: &'a [DirectiveId],
    pub group: &'a [DirectiveId],
    pub envelope_from: &'a str,
    pub envelope_to: &'a [String],
    pub message: &'a [u8],
    pub sent_at: DateTime<Utc>,
}

/// An open (not yet accepted) row found for a group.
#[derive(Debug, Clone)]
pub struct OpenMail {
    pub id: i64,
    pub state: State,
    pub ticket: Ticket,
    pub message_id: String,
    pub marks: Vec<DirectiveId>,
    pub marks_sent: bool,
    pub envelope_from: String,
    pub envelope_to: Vec<String>,
    pub message: Vec<u8>,
    pub sent_at: DateTime<Utc>,
    pub attempts: i32,
    pub instance: String,
    pub created_at: DateTime<Utc>,
    pub last_error: Option<String>,
}

fn ids(d: &[DirectiveId]) -> Vec<i64> {
    d.iter().map(|d| d.0).collect()
}

/// Records the intents of mails (of one group or of a batch) in one
/// statement; returns their row ids in order. Call on an autocommitting
/// connection (not the group's transaction): the record must be durable
/// before SMTP sees the mail.
pub async fn record<S: Session>(
    session: &S,
    instance: &str,
    intents: &[Intent<'_>],
) -> Result<Vec<i64>, tokio_postgres::Error> {
    if intents.is_empty() {
        return Ok(Vec::new());
    }
    // Arrays of arrays must be rectangular in PostgreSQL, so the per-row
    // arrays travel as array literals and are cast on the server.
    let tickets: Vec<&str> = intents.iter().map(|i| i.ticket.as_str()).collect();
    let message_ids: Vec<&str> = intents.iter().map(|i| i.message_id).collect();
    let marks: Vec<String> = intents.iter().map(|i| id_array_literal(i.marks)).collect();
    let groups: Vec<String> = intents.iter().map(|i| id_array_literal(i.group)).collect();
    let marks_sent: Vec<bool> = intents.iter().map(|i| !i.marks.is_empty()).collect();
    let from: Vec<&str> = intents.iter().map(|i| i.envelope_from).collect();
    let to: Vec<String> = intents
        .iter()
        .map(|i| text_array_literal(i.envelope_to))
        .collect();
    let messages: Vec<&[u8]> = intents.iter().map(|i| i.message).collect();
    let sent_at: Vec<DateTime<Utc>> = intents.iter().map(|i| i.sent_at).collect();
    let st = db::prepare(
        session,
        "INSERT INTO mailgend.outbox (ticket, message_id, directive_ids, group_directive_ids, \
             marks_sent, envelope_from, envelope_to, message, sent_at, state, attempts, instance) \
         SELECT t, m, d::int8[], g::int8[], ms, ef, et::text[], msg, sa, 'sending', 1, $10 \
           FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bool[], $6::text[], \
                       $7::text[], $8::bytea[], $9::timestamptz[]) \
                AS u(t, m, d, g, ms, ef, et, msg, sa) \
         RETURNING id, message_id",
    )
    .await?;
    let rows = session
        .client()
        .query(
            &st,
            &[
                &tickets,
                &message_ids,
                &marks,
                &groups,
                &marks_sent,
                &from,
                &to,
                &messages,
                &sent_at,
                &instance,
            ],
        )
        .await?;
    // RETURNING's order is not promised. Message-Ids are unique per mail
    // (tickets are not: a constituency copy shares its mail's).
    let by_id: std::collections::HashMap<String, i64> = rows
        .iter()
        .map(|r| (r.get::<_, String>(1), r.get::<_, i64>(0)))
        .collect();
    Ok(message_ids
        .iter()
        .map(|m| *by_id.get(*m).expect("every inserted row is returned"))
        .collect())
}

/// `{1,2,3}`: a bigint array literal.
fn id_array_literal(ids: &[DirectiveId]) -> String {
    let mut s = String::from("{");
    for (n, d) in ids.iter().enumerate() {
        if n > 0 {
            s.push(',');
        }
        s.push_str(&d.0.to_string());
    }
    s.push('}');
    s
}

/// A text array literal with every element quoted, so commas, braces,
/// quotes, backslashes and spaces in an address stay data.
fn text_array_literal(items: &[String]) -> String {
    let mut s = String::from("{");
    for (n, item) in items.iter().enumerate() {
        if n > 0 {
            s.push(',');
        }
        s.push('"');
        for c in item.chars() {
            if c == '"' || c == '\\' {
                s.push('\\');
            }
            s.push(c);
        }
        s.push('"');
    }
    s.push('}');
    s
}

/// Records rows as accepted (in the sending transaction, together with
/// marking the directives sent): they move to `mailgend.sent_mail`, without
/// the message, which is no longer needed. The outbox thus only ever holds
/// open mails, and looking them up stays cheap however many were sent.
pub async fn accepted<S: Session>(tx: &S, ids: &[i64]) -> Result<(), tokio_postgres::Error> {
    if ids.is_empty() {
        return Ok(());
    }
    let st = db::prepare(
        tx,
        "WITH moved AS (DELETE FROM mailgend.outbox WHERE id = ANY($1) \
                          RETURNING id, ticket, message_id, directive_ids, group_directive_ids, \
                                    envelope_to, sent_at, attempts, instance) \
         INSERT INTO mailgend.sent_mail (id, ticket, message_id, directive_ids, \
                     group_directive_ids, envelope_to, sent_at, attempts, instance) \
         SELECT id, ticket, message_id, directive_ids, group_directive_ids, envelope_to, \
                sent_at, attempts, instance FROM moved",
    )
    .await?;
    tx.client().execute(&st, &[&ids]).await?;
    Ok(())
}

/// The directive ids of every open row's group that shares a directive
/// with `ids`: a group of a batch that meets one of them has open mails
/// and must be resumed, not rendered anew. Call while holding the locks.
pub async fn open_group_members<S: Session>(
    tx: &S,
    ids: &[DirectiveId],
) -> Result<std::collections::HashSet<DirectiveId>, tokio_postgres::Error> {
    let st = db::prepare(
        tx,
        "SELECT DISTINCT unnest(group_directive_ids) FROM mailgend.outbox \
         WHERE group_directive_ids && $1 AND state IN ('sending', 'retry', 'held')",
    )
    .await?;
    let rows = tx.client().query(&st, &[&self::ids(ids)]).await?;
    Ok(rows.iter().map(|r| DirectiveId(r.get(0))).collect())
}

/// Records a definite refusal: `retry` keeps the message for a resend with
/// the same ticket and Message-Id, `failed` lets the group be rendered anew.
pub async fn refused<C: GenericClient>(
    client: &C,
    ids: &[i64],
    state: State,
    error: &str,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "UPDATE mailgend.outbox SET state = $2, last_error = $3, updated_at = now() \
             WHERE id = ANY($1) AND state IN ('sending', 'retry')",
            &[&ids, &state.as_str(), &error],
        )
        .await?;
    Ok(())
}

/// Counts another attempt at resending a row.
pub async fn attempt<C: GenericClient>(
    client: &C,
    id: i64,
    instance: &str,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "UPDATE mailgend.outbox SET attempts = attempts + 1, instance = $2, \
                 state = 'sending', updated_at = now() WHERE id = $1",
            &[&id, &instance],
        )
        .await?;
    Ok(())
}

/// Sets the state of rows (hold, discard, release to `sending`).
pub async fn set_state<C: GenericClient>(
    client: &C,
    ids: &[i64],
    state: State,
) -> Result<u64, tokio_postgres::Error> {
    client
        .execute(
            "UPDATE mailgend.outbox SET state = $2, updated_at = now() WHERE id = ANY($1)",
            &[&ids, &state.as_str()],
        )
        .await
}

const OPEN_COLUMNS: &str = "id, state, ticket, message_id, directive_ids, marks_sent, envelope_from, \
     envelope_to, coalesce(message, ''::bytea), sent_at, attempts, instance, created_at, last_error";

fn open_from_row(r: &tokio_postgres::Row) -> OpenMail {
    let state: String = r.get(1);
    let marks: Vec<i64> = r.get(4);
    OpenMail {
        id: r.get(0),
        state: State::parse(&state),
        ticket: Ticket::from_stored(r.get::<_, String>(2)),
        message_id: r.get(3),
        marks: marks.into_iter().map(DirectiveId).collect(),
        marks_sent: r.get(5),
        envelope_from: r.get(6),
        envelope_to: r.get(7),
        message: r.get(8),
        sent_at: r.get(9),
        attempts: r.get(10),
        instance: r.get(11),
        created_at: r.get(12),
        last_error: r.get(13),
    }
}

/// The open rows (`sending`, `retry`, `held`) of a group, oldest first.
/// Call while holding the group's row locks: then any `sending` row's
/// writer is gone, and the row is in doubt.
pub async fn open_for_group<S: Session>(
    tx: &S,
    group: &[DirectiveId],
) -> Result<Vec<OpenMail>, tokio_postgres::Error> {
    let sql = format!(
        "SELECT {OPEN_COLUMNS} FROM mailgend.outbox \
         WHERE group_directive_ids && $1 AND state IN ('sending', 'retry', 'held') \
         ORDER BY id"
    );
    let st = db::prepare(tx, &sql).await?;
    let rows = tx.client().query(&st, &[&ids(group)]).await?;
    Ok(rows.iter().map(open_from_row).collect())
}

/// Every open row, for `mailgend in-doubt list` and `status`.
pub async fn list_open<C: GenericClient>(
    client: &C,
) -> Result<Vec<OpenMail>, tokio_postgres::Error> {
    let rows = client
        .query(
            &format!(
                "SELECT {OPEN_COLUMNS} FROM mailgend.outbox \
                 WHERE state IN ('sending', 'retry', 'held') ORDER BY id"
            ),
            &[],
        )
        .await?;
    Ok(rows.iter().map(open_from_row).collect())
}

/// Removes records of accepted mails (`mailgend.sent_mail`, an audit trail
/// of Message-Ids) and of failed or discarded ones older than `days`.
pub async fn purge<C: GenericClient>(client: &C, days: i32) -> Result<u64, tokio_postgres::Error> {
    let a = client
        .execute(
            "DELETE FROM mailgend.sent_mail WHERE accepted_at < now() - make_interval(days => $1)",
            &[&days],
        )
        .await?;
    let b = client
        .execute(
            "DELETE FROM mailgend.outbox WHERE state IN ('failed', 'discarded') \
               AND updated_at < now() - make_interval(days => $1)",
            &[&days],
        )
        .await?;
    Ok(a + b)
}
