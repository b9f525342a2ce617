//! `mailgend.bounce` (migrations/0005_bounces.sql): recording a bounce
//! linked to its notification, and listing them.

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_postgres::{Client, GenericClient};

use super::parse::Report;
use crate::notify::ticket::Ticket;

/// The notification a ticket names, as far as the database knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    /// intelmq-mailgen's `sent.id` (none for constituency copies).
    pub sent_id: Option<i64>,
    /// The mail's envelope recipients (from mailgend's own record; empty
    /// for mails sent before mailgend kept one).
    pub recipients: Vec<String>,
}

/// The notification `ticket` names; `None` when no mail with it was sent.
pub async fn sent(client: &Client, ticket: &Ticket) -> Result<Option<Sent>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT (SELECT id FROM sent WHERE intelmq_ticket = $1), \
                    coalesce((SELECT envelope_to FROM mailgend.sent_mail WHERE ticket = $1 \
                               ORDER BY id DESC LIMIT 1), \
                             (SELECT envelope_to FROM mailgend.outbox WHERE ticket = $1 \
                               ORDER BY id DESC LIMIT 1)), \
                    EXISTS (SELECT 1 FROM mailgend.sent_mail WHERE ticket = $1) \
                    OR EXISTS (SELECT 1 FROM mailgend.outbox WHERE ticket = $1)",
            &[&ticket.as_str()],
        )
        .await?
        .expect("a SELECT without FROM returns one row");
    let sent_id: Option<i64> = row.get(0);
    let recipients: Option<Vec<String>> = row.get(1);
    let ours: bool = row.get(2);
    Ok((sent_id.is_some() || ours).then(|| Sent {
        sent_id,
        recipients: recipients.unwrap_or_default(),
    }))
}

/// Records one failed recipient of a report; returns the row's id, or
/// `None` when the same report (ticket, Message-Id, recipient, status) was
/// recorded before: the MTA sent it again because our reply got lost.
pub async fn record(
    client: &impl GenericClient,
    ticket: &Ticket,
    sent: &Sent,
    report: &Report,
    message_id: Option<&str>,
) -> Result<Option<i64>, tokio_postgres::Error> {
    // A report without Final-Recipient is about the notification's
    // recipient when it had exactly one.
    let recipient = report
        .recipient
        .clone()
        .or_else(|| (sent.recipients.len() == 1).then(|| sent.recipients[0].clone()));
    let row = client
        .query_opt(
            "INSERT INTO mailgend.bounce \
               (ticket, sent_id, recipient, status, class, diagnostic, reporting_mta, message_id) \
             SELECT $1::text, $2::bigint, $3::text, $4::text, $5::text, $6::text, $7::text, \
                    $8::text \
              WHERE $8::text IS NULL OR NOT EXISTS ( \
                    SELECT 1 FROM mailgend.bounce \
                     WHERE ticket = $1 AND message_id = $8 AND status = $4 \
                       AND recipient IS NOT DISTINCT FROM $3) \
             RETURNING id",
            &[
                &ticket.as_str(),
                &sent.sent_id,
                &recipient,
                &report.status,
                &report.class.as_str(),
                &report.diagnostic,
                &report.reporting_mta,
                &message_id,
            ],
        )
        .await?;
    Ok(row.map(|r| r.get(0)))
}

/// Permanent bounces of `recipient` received since `since`.
pub async fn permanent_count(
    client: &Client,
    recipient: &str,
    since: DateTime<Utc>,
) -> Result<i64, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT count(*) FROM mailgend.bounce \
              WHERE lower(recipient) = lower($1) AND received_at >= $2 AND class = 'permanent'",
            &[&recipient, &since],
        )
        .await?;
    Ok(row.get(0))
}

/// One recorded bounce.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Bounce {
    pub id: i64,
    pub received_at: DateTime<Utc>,
    pub ticket: String,
    pub sent_id: Option<i64>,
    pub recipient: Option<String>,
    pub status: String,
    pub class: String,
    pub diagnostic: Option<String>,
    pub reporting_mta: Option<String>,
    pub message_id: Option<String>,
}

/// Bounces received since `since` (all when `None`), of `recipient`
/// (case-insensitive) when given, newest first, at most `limit`.
pub async fn list(
    client: &Client,
    since: Option<DateTime<Utc>>,
    recipient: Option<&str>,
    limit: i64,
) -> Result<Vec<Bounce>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT id, received_at, ticket, sent_id, recipient, status, class, diagnostic, \
                    reporting_mta, message_id \
               FROM mailgend.bounce \
              WHERE ($1::timestamptz IS NULL OR received_at >= $1) \
                AND ($2::text IS NULL OR lower(recipient) = lower($2)) \
              ORDER BY received_at DESC, id DESC LIMIT $3",
            &[&since, &recipient, &limit],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Bounce {
            id: r.get(0),
            received_at: r.get(1),
            ticket: r.get(2),
            sent_id: r.get(3),
            recipient: r.get(4),
            status: r.get(5),
            class: r.get(6),
            diagnostic: r.get(7),
            reporting_mta: r.get(8),
            message_id: r.get(9),
        })
        .collect())
}

/// Counts by class since `since`: (permanent, temporary).
pub async fn counts(
    client: &Client,
    since: DateTime<Utc>,
) -> Result<(i64, i64), tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE class = 'permanent'), \
                    count(*) FILTER (WHERE class = 'temporary') \
               FROM mailgend.bounce WHERE received_at >= $1",
            &[&since],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}
