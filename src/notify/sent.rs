//! Marking a group sent: one `sent` row (ticket, `sent_at` = the mail's Date
//! header time) and every directive of the group pointing at it (spec §4),
//! exactly as Fody expects to find them.

use chrono::{DateTime, Utc};
use tokio_postgres::GenericClient;

use crate::notify::db::{self, Session};

use crate::notify::directive::DirectiveId;
use crate::notify::ticket::Ticket;

/// Records that the mail with `ticket` went out at `sent_at` for the given
/// directives. Runs in the caller's transaction, after SMTP accepted the
/// mail and before COMMIT.
pub async fn mark_sent<S: Session>(
    tx: &S,
    ticket: &Ticket,
    sent_at: DateTime<Utc>,
    directive_ids: &[DirectiveId],
) -> Result<i64, tokio_postgres::Error> {
    let ids: Vec<i64> = directive_ids.iter().map(|d| d.0).collect();
    let st = db::prepare(
        tx,
        "WITH sent_row AS (INSERT INTO sent (intelmq_ticket, sent_at) \
                               VALUES ($1, $2) RETURNING id), \
                  upd AS (UPDATE directives SET sent_id = (SELECT id FROM sent_row) \
                           WHERE id = ANY($3)) \
             SELECT id FROM sent_row",
    )
    .await?;
    let row = tx
        .client()
        .query_one(&st, &[&ticket.as_str(), &sent_at, &ids])
        .await?;
    Ok(row.get(0))
}

/// One accepted mail's marks, for [`mark_sent_many`].
pub struct Mark<'a> {
    pub ticket: &'a Ticket,
    pub sent_at: DateTime<Utc>,
    pub directive_ids: &'a [DirectiveId],
}

/// [`mark_sent`] for the accepted mails of a batch of groups in one
/// statement: PostgreSQL's cost for many one-row statements is mostly
/// executor start-up, not the rows. Mails that mark nothing are skipped.
pub async fn mark_sent_many<S: Session>(
    tx: &S,
    marks: &[Mark<'_>],
) -> Result<(), tokio_postgres::Error> {
    let marks: Vec<&Mark> = marks
        .iter()
        .filter(|m| !m.directive_ids.is_empty())
        .collect();
    if marks.is_empty() {
        return Ok(());
    }
    let tickets: Vec<&str> = marks.iter().map(|m| m.ticket.as_str()).collect();
    let sent_at: Vec<DateTime<Utc>> = marks.iter().map(|m| m.sent_at).collect();
    let (mut by_ticket, mut directive) = (Vec::new(), Vec::new());
    for m in &marks {
        for d in m.directive_ids {
            by_ticket.push(m.ticket.as_str());
            directive.push(d.0);
        }
    }
    let st = db::prepare(
        tx,
        // Tickets are unique in `sent`, so they join each directive to its
        // new row.
        "WITH sent_rows AS (INSERT INTO sent (intelmq_ticket, sent_at) \
                                SELECT * FROM unnest($1::text[], $2::timestamptz[]) \
                                RETURNING id, intelmq_ticket), \
              marks AS (SELECT * FROM unnest($3::text[], $4::int8[]) AS m(ticket, directive_id)) \
         UPDATE directives SET sent_id = sent_rows.id \
           FROM marks JOIN sent_rows ON sent_rows.intelmq_ticket = marks.ticket \
          WHERE directives.id = marks.directive_id",
    )
    .await?;
    tx.client()
        .execute(&st, &[&tickets, &sent_at, &by_ticket, &directive])
        .await?;
    Ok(())
}
