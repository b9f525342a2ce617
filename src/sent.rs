//! Marking a group sent: one `sent` row (ticket, `sent_at` = the mail's Date
//! header time) and every directive of the group pointing at it (spec §4),
//! exactly as Fody expects to find them.

use chrono::{DateTime, Utc};
use tokio_postgres::GenericClient;

use crate::db::{self, Session};

use crate::directive::DirectiveId;
use crate::ticket::Ticket;

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
