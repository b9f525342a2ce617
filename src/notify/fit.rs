//! Fitting a group's mails to the relay's size limit: the stage between
//! building the mails and recording them in the outbox.
//!
//! The limit is the smaller of the relay's EHLO `SIZE` and
//! `smtp.max_message_size`, and it is checked on the finished bytes
//! (signed mails: the signed bytes). A table mail over it gets its
//! format's `oversize` treatment (docs/formats.md):
//!
//! - `compress` (the default): the CSV, inline or attached, becomes the
//!   attachment `events.zip` holding `events.csv`; if even that is too
//!   big, the events are split into parts, each zipped;
//! - `split`: the CSV becomes an attachment and the events are split into
//!   parts;
//! - `error`: the group fails ([`TooBig`](crate::notify::fit::TooBig)) and stays pending.
//!
//! A split group sends one mail per part, each with its own ticket and
//! "(part k of n)" in its subject and first line; each part's mail marks
//! exactly its events' directives (`Notification::covers`), so the outbox
//! keeps "nothing lost, nothing twice" per part: parts SMTP accepted are
//! marked sent with their tickets, a part that failed stays pending with
//! its directives and is resumed or rendered anew like any mail.
//!
//! X-ARF reports (one event per mail) cannot be made smaller: over the
//! limit they are an error. Nothing over the limit is ever returned.

use std::io::Write;

use chrono::{DateTime, Utc};
use tracing::{debug, info};

use crate::notify::db;
use crate::notify::directive::{DirectiveId, Group};
use crate::notify::event::Event;
use crate::notify::format::{Oversize, Plan, RenderContext};
use crate::notify::mail::{self, BinaryAttachment, BuiltMail, Notification};
use crate::notify::pipeline::{marked_directives, GroupError, Pipeline};
use crate::notify::ticket::{self, Ticket};

/// The name of the CSV attachment the formats write.
const CSV_NAME: &str = "events.csv";
/// The zip that replaces it.
const ZIP_NAME: &str = "events.zip";
/// Parts are planned to fill this share of the limit: event rows differ in
/// length, so equal numbers of events make parts of unequal size.
const FILL: f64 = 0.85;
/// Attempts at finding a number of parts that fits, each doubling it.
const MAX_ATTEMPTS: usize = 6;

/// A mail ready for the outbox, with its ticket and the directives it
/// marks sent.
#[derive(Debug)]
pub struct Fitted {
    pub mail: BuiltMail,
    pub ticket: Ticket,
    pub marks: Vec<DirectiveId>,
}

/// A mail that cannot be brought under the limit by its format's choice.
#[derive(Debug, thiserror::Error)]
#[error(
    "the mail is {size} bytes, over the relay's limit of {limit} bytes \
     (the smaller of its EHLO SIZE and smtp.max_message_size); {reason}"
)]
pub struct TooBig {
    pub size: usize,
    pub limit: usize,
    pub reason: String,
}

/// The octets SMTP `SIZE` counts for `bytes` (with the final CRLF).
pub fn octets(bytes: &[u8]) -> usize {
    if bytes.ends_with(b"\r\n") {
        bytes.len()
    } else {
        bytes.len() + 2
    }
}

/// The relay's limit as far as it can be learnt now. If the relay cannot be
/// asked, only the configured limit is applied here: the send then fails
/// for the relay's own reasons, as it would have anyway.
pub async fn limit(p: &Pipeline) -> Option<usize> {
    match p.outbound.message_limit().await {
        Ok(limit) => limit,
        Err(e) => {
            debug!("could not learn the relay's SIZE now ({e}); using smtp.max_message_size");
            p.config.max_message_size
        }
    }
}

/// Whether every mail is within `limit`.
pub fn all_fit<'a>(mails: impl IntoIterator<Item = &'a BuiltMail>, limit: Option<usize>) -> bool {
    match limit {
        None => true,
        Some(limit) => mails.into_iter().all(|m| octets(&m.bytes) <= limit),
    }
}

fn fit(mails: &[Fitted], limit: usize) -> bool {
    all_fit(mails.iter().map(|m| &m.mail), Some(limit))
}

/// Builds the group's mails and brings them under the relay's limit
/// (module documentation). `notifications` are the group's rendered mails
/// with their drawn tickets; `events` the events they were rendered from.
#[allow(clippy::too_many_arguments)]
pub async fn fit_group(
    p: &Pipeline,
    plan: &Plan,
    group: &Group,
    events: &[Event],
    notifications: Vec<Notification>,
    now: DateTime<Utc>,
    side: &mut tokio_postgres::Client,
    side_cache: &db::StatementCache,
) -> Result<Vec<Fitted>, GroupError> {
    let limit = limit(p).await;
    let first_ticket = notifications.first().map(|n| n.ticket.clone());
    let plain = build(p, group, notifications, false, now).await?;
    let Some(limit) = limit.filter(|l| !fit(&plain, *l)) else {
        return Ok(plain);
    };
    let biggest = self::biggest(&plain);
    drop(plain);
    let too_big = |reason: String| TooBig {
        size: biggest,
        limit,
        reason,
    };
    let choice = match plan.oversize() {
        None => {
            return Err(too_big(
                "an X-ARF report holds one event and cannot be made smaller".into(),
            )
            .into())
        }
        Some(Oversize::Error) => {
            return Err(too_big("the format says oversize = \"error\"".into()).into())
        }
        Some(c) => c,
    };
    let ticket = first_ticket.expect("a table plan renders at least one mail");
    let attached = plan.attached();
    let zip = choice == Oversize::Compress;
    let render = |events: &[Event], tickets: &[Ticket]| {
        attached
            .render(&RenderContext {
                group,
                events,
                tickets,
                templates: &p.templates,
                config: &p.config,
            })
            .map_err(|source| GroupError::Render {
                format: plan.format_name().to_string(),
                source,
            })
    };
    if zip {
        let whole = render(events, std::slice::from_ref(&ticket))?;
        let mails = build(p, group, whole, true, now).await?;
        if fit(&mails, limit) {
            info!(
                ticket = %ticket,
                directive_ids = %group.directive_ids_display(),
                bytes_before = biggest,
                bytes = self::biggest(&mails),
                limit,
                "mail over the relay's size limit: CSV sent zipped"
            );
            return Ok(mails);
        }
        // The zipped size tells how many zipped parts are needed.
        let zipped = self::biggest(&mails);
        drop(mails);
        let part = Parts {
            ticket,
            size: zipped,
            limit,
            zip,
            now,
        };
        return split(p, group, events, &render, part, side, side_cache).await;
    }
    let part = Parts {
        ticket,
        size: biggest,
        limit,
        zip,
        now,
    };
    split(p, group, events, &render, part, side, side_cache).await
}

/// Renders the mails of some events with the given tickets.
type RenderPart<'a> =
    dyn Fn(&[Event], &[Ticket]) -> Result<Vec<Notification>, GroupError> + Sync + 'a;

/// How to split: the group's ticket (kept by the first part), the size
/// to bring under `limit`, whether parts are zipped, the Date.
struct Parts {
    ticket: Ticket,
    size: usize,
    limit: usize,
    zip: bool,
    now: DateTime<Utc>,
}

/// Splits the events into parts whose mails fit, drawing a ticket for each
/// part after the first (which keeps the group's ticket).
async fn split(
    p: &Pipeline,
    group: &Group,
    events: &[Event],
    render: &RenderPart<'_>,
    how: Parts,
    side: &mut tokio_postgres::Client,
    side_cache: &db::StatementCache,
) -> Result<Vec<Fitted>, GroupError> {
    let Parts {
        ticket: first,
        size,
        limit,
        zip,
        now,
    } = how;
    let target = (limit as f64 * FILL).max(1.0);
    let mut parts = ((size as f64 / target).ceil() as usize).max(2);
    for _ in 0..MAX_ATTEMPTS {
        parts = parts.min(events.len().max(1));
        let per_part = events.len().div_ceil(parts);
        let chunks: Vec<&[Event]> = events.chunks(per_part.max(1)).collect();
        let n = chunks.len();
        let mut tickets = vec![first.clone()];
        if n > 1 {
            tickets.extend(ticket::draw_committed(side, Some(side_cache), n - 1).await?);
        }
        let mut notifications = Vec::new();
        for (k, (chunk, t)) in chunks.iter().zip(&tickets).enumerate() {
            for mut note in render(chunk, std::slice::from_ref(t))? {
                mark_part(&mut note, k + 1, n);
                if note.mark_sent {
                    note.covers = Some(chunk.iter().map(|e| e.id).collect());
                }
                notifications.push(note);
            }
        }
        let mails = build(p, group, notifications, zip, now).await?;
        if fit(&mails, limit) {
            info!(
                directive_ids = %group.directive_ids_display(),
                tickets = %tickets.iter().map(Ticket::as_str).collect::<Vec<_>>().join(", "),
                parts = n,
                zipped = zip,
                bytes_before = size,
                bytes = biggest(&mails),
                limit,
                "mail over the relay's size limit: split into parts"
            );
            return Ok(mails);
        }
        if per_part <= 1 {
            return Err(TooBig {
                size: biggest(&mails),
                limit,
                reason: "even a mail with a single event is too big".into(),
            }
            .into());
        }
        debug!(
            parts = n,
            "parts still over the size limit; trying twice as many (their tickets stay unused)"
        );
        parts = n * 2;
    }
    Err(TooBig {
        size,
        limit,
        reason: format!("no split into up to {parts} parts fits"),
    }
    .into())
}

/// "(part k of n)" in the subject and a first line saying so.
fn mark_part(n: &mut Notification, k: usize, of: usize) {
    n.subject = format!("{} (part {k} of {of})", n.subject);
    n.body = format!(
        "Part {k} of {of} of this report (ticket {}); the other parts come in \
         separate mails with their own tickets.\n\n{}",
        n.ticket, n.body
    );
}

/// The zip of one CSV, the file name kept inside.
pub fn zip_csv(name: &str, csv: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut out = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .large_file(csv.len() as u64 >= u32::MAX as u64);
    out.start_file(name, options)
        .map_err(std::io::Error::other)?;
    out.write_all(csv)?;
    Ok(out.finish().map_err(std::io::Error::other)?.into_inner())
}

/// MIME + signature on the blocking pool; with `zip`, each `events.csv`
/// attachment goes as `events.zip`. Each mail comes with its ticket and
/// the directives it marks.
async fn build(
    p: &Pipeline,
    group: &Group,
    notifications: Vec<Notification>,
    zip: bool,
    now: DateTime<Utc>,
) -> Result<Vec<Fitted>, GroupError> {
    let marks: Vec<Vec<DirectiveId>> = notifications
        .iter()
        .map(|n| marked_directives(group, n))
        .collect();
    let ctx = p.mail_ctx().clone();
    let signer = p.signer.clone();
    let mails = tokio::task::spawn_blocking(move || {
        notifications
            .into_iter()
            .map(|mut n| {
                let mut binaries = Vec::new();
                if zip {
                    if let Some(i) = n.attachments.iter().position(|a| a.filename == CSV_NAME) {
                        let csv = n.attachments.remove(i);
                        let data = zip_csv(CSV_NAME, csv.content.as_bytes())
                            .map_err(|e| GroupError::Join(format!("zipping the CSV: {e}")))?;
                        binaries.push(BinaryAttachment {
                            content_type: "application/zip".into(),
                            filename: ZIP_NAME.into(),
                            data,
                        });
                    }
                }
                let mail = mail::build_with_binaries(&n, &ctx, signer.as_deref(), now, &binaries)?;
                Ok((mail, n.ticket))
            })
            .collect::<Result<Vec<_>, GroupError>>()
    })
    .await
    .map_err(|e| GroupError::Join(e.to_string()))??;
    Ok(mails
        .into_iter()
        .zip(marks)
        .map(|((mail, ticket), marks)| Fitted {
            mail,
            ticket,
            marks,
        })
        .collect())
}

/// The largest mail's size.
fn biggest(mails: &[Fitted]) -> usize {
    mails
        .iter()
        .map(|m| octets(&m.mail.bytes))
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn octets_count_the_final_crlf() {
        assert_eq!(octets(b"a\r\n"), 3);
        assert_eq!(octets(b"a"), 3);
    }

    #[test]
    fn zip_holds_the_csv_under_its_name() {
        let csv = "a,b\n1,2\n".repeat(1000);
        let z = zip_csv(CSV_NAME, csv.as_bytes()).unwrap();
        assert!(z.len() < csv.len() / 10, "compressed: {} bytes", z.len());
        let mut archive = zip::ZipArchive::new(std::io::Cursor::new(z)).unwrap();
        assert_eq!(archive.len(), 1);
        let mut f = archive.by_name(CSV_NAME).unwrap();
        let mut back = String::new();
        std::io::Read::read_to_string(&mut f, &mut back).unwrap();
        assert_eq!(back, csv);
    }
}
