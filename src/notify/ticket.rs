//! Ticket numbers (`YYYYMMDD-NNNNNNNN`), drawn exactly as intelmq-mailgen
//! draws them (spec §4) so that Fody and recipients' ticket systems see one
//! continuous numbering across the switch.
//!
//! Owns `intelmq_ticket_seq` and `ticket_day`. The day rollover restarts the
//! sequence; a `ticket_day` in the future is refused because continuing would
//! hand out numbers that were already used.

use std::fmt;

use chrono::NaiveDate;
use tokio_postgres::GenericClient;

/// A ticket number as stored in `sent.intelmq_ticket`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ticket(String);

impl Ticket {
    /// The number for sequence value `seq` on `day`: the value zero-padded to
    /// eight digits and cut to the last eight.
    pub fn new(day: NaiveDate, seq: i64) -> Ticket {
        let digits = format!("{seq:08}");
        let tail = &digits[digits.len() - 8..];
        Ticket(format!("{}-{}", day.format("%Y%m%d"), tail))
    }

    /// Wraps a ticket read back from the database or a log.
    pub fn from_stored(s: impl Into<String>) -> Ticket {
        Ticket(s.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TicketError {
    #[error(
        "ticket_day.initialized_for_day is {initialized} which is after today ({today}); \
         refusing to draw tickets because numbers would be reused"
    )]
    DayInFuture {
        initialized: NaiveDate,
        today: NaiveDate,
    },
    #[error("table ticket_day must hold exactly one row")]
    NoTicketDay,
    #[error("database error while drawing a ticket: {}", crate::notify::db::describe(.0))]
    Db(#[from] tokio_postgres::Error),
}

/// Draws `n` ticket numbers in a short transaction of their own, committed
/// at once. Numbers are never given back (a sequence value is not, in the
/// old tool either), and the day rollover must be durable the moment a
/// number of the new day exists: if it were rolled back with a failed
/// group, the next draw would restart the day again and hand out the same
/// numbers twice. Keeping the `ticket_day` row lock this short also lets
/// many workers and instances draw concurrently.
pub async fn draw_committed(
    client: &mut tokio_postgres::Client,
    cache: Option<&crate::notify::db::StatementCache>,
    n: usize,
) -> Result<Vec<Ticket>, TicketError> {
    // Fast path, one autocommitted statement and no lock: when ticket_day
    // already is today, only nextval is needed. A concurrent rollover holds
    // ticket_day's row lock until it commits, so this statement then still
    // reads the old day and takes the slow path below, which waits for it.
    if let Some(cache) = cache {
        let session = crate::notify::db::Cached {
            client: &*client,
            cache,
        };
        let st = crate::notify::db::prepare(
            &session,
            "SELECT (now() AT TIME ZONE 'UTC')::date, \
                    array(SELECT nextval('intelmq_ticket_seq') FROM generate_series(1, $1)) \
               FROM ticket_day \
              WHERE initialized_for_day = (now() AT TIME ZONE 'UTC')::date",
        )
        .await?;
        if let Some(row) = client.query_opt(&st, &[&(n as i32)]).await? {
            let today: NaiveDate = row.get(0);
            let seqs: Vec<i64> = row.get(1);
            return Ok(seqs.into_iter().map(|s| Ticket::new(today, s)).collect());
        }
    }
    let tx = client.transaction().await?;
    let mut tickets = Vec::with_capacity(n);
    for _ in 0..n {
        tickets.push(match cache {
            Some(cache) => draw(&crate::notify::db::Cached { client: &tx, cache }).await?,
            None => draw(&tx).await?,
        });
    }
    tx.commit().await?;
    Ok(tickets)
}

/// Draws the next ticket number inside the caller's transaction. Prefer
/// [`draw_committed`]: see there why.
pub async fn draw<S: crate::notify::db::Session>(session: &S) -> Result<Ticket, TicketError> {
    let client = session.client();
    // Lock ticket_day so two instances crossing midnight do not both
    // restart the sequence (the second restart would reuse numbers).
    let st = crate::notify::db::prepare(
        session,
        "SELECT (now() AT TIME ZONE 'UTC')::date, initialized_for_day \
         FROM ticket_day FOR UPDATE",
    )
    .await?;
    let row = client
        .query_opt(&st, &[])
        .await?
        .ok_or(TicketError::NoTicketDay)?;
    let today: NaiveDate = row.get(0);
    let initialized: Option<NaiveDate> = row.get(1);
    match initialized {
        Some(day) if day > today => {
            return Err(TicketError::DayInFuture {
                initialized: day,
                today,
            })
        }
        Some(day) if day == today => {}
        _ => {
            client
                .batch_execute("ALTER SEQUENCE intelmq_ticket_seq RESTART")
                .await?;
            client
                .execute("UPDATE ticket_day SET initialized_for_day = $1", &[&today])
                .await?;
        }
    }
    let st = crate::notify::db::prepare(session, "SELECT nextval('intelmq_ticket_seq')").await?;
    let seq: i64 = client.query_one(&st, &[]).await?.get(0);
    Ok(Ticket::new(today, seq))
}

/// The ticket the next [`draw`] would most likely return, without consuming
/// anything: for dry runs and previews (intelmq-mailgen #46).
pub async fn peek<C: GenericClient>(client: &C) -> Result<Ticket, TicketError> {
    let row = client
        .query_one(
            "SELECT (now() AT TIME ZONE 'UTC')::date, \
                    (SELECT initialized_for_day FROM ticket_day LIMIT 1), \
                    s.last_value, s.is_called, \
                    (SELECT seqmin FROM pg_sequence WHERE seqrelid = 'intelmq_ticket_seq'::regclass) \
             FROM intelmq_ticket_seq s",
            &[],
        )
        .await?;
    let today: NaiveDate = row.get(0);
    let initialized: Option<NaiveDate> = row.get(1);
    let last_value: i64 = row.get(2);
    let is_called: bool = row.get(3);
    let min: i64 = row.get(4);
    let next = if initialized != Some(today) {
        min
    } else if is_called {
        last_value + 1
    } else {
        last_value
    };
    Ok(Ticket::new(today, next))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_the_old_tool() {
        let d = NaiveDate::from_ymd_opt(2024, 5, 1).unwrap();
        assert_eq!(Ticket::new(d, 10000001).as_str(), "20240501-10000001");
        assert_eq!(Ticket::new(d, 42).as_str(), "20240501-00000042");
        // Cut to the last eight digits, as `"{:08d}".format(n)[-8:]` does.
        assert_eq!(Ticket::new(d, 123456789).as_str(), "20240501-23456789");
    }
}
