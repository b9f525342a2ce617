//! `mailgend preview`: what `send` would send for pending groups, rendered
//! the way `send` renders it, without drawing a ticket number, writing to
//! the database or sending anything.
//!
//! This is the library-level replacement for how intelmq-webinput-csv
//! previews with the old tool (`mailgen(..., get_preview=True)`, which ran
//! the real send path and rolled back, consuming ticket numbers): call
//! [`preview`] and serialise the [`GroupPreview`]s.
//!
//! Everything runs in one `READ ONLY`, `REPEATABLE READ` transaction, so
//! the database itself refuses any write, and every group is judged
//! against one snapshot and one `now()`. No row is locked: a preview never
//! delays a running `mailgend run`. Ticket numbers shown are the ones the
//! next draws would give ([`crate::notify::ticket::peek`]) if the groups were sent
//! in the order shown and nobody else drew numbers meanwhile; Message-Id
//! and Date are made anew when a mail is really sent.

use std::collections::BTreeMap;

use chrono::{DateTime, NaiveDate, Utc};
use mailparse::MailHeaderMap;
use serde::Serialize;
use tokio_postgres::{Client, IsolationLevel, Transaction};

use crate::config::InDoubtPolicy;
use crate::notify::db;
use crate::notify::directive::{self, DirectiveId, EventId, Group};
use crate::notify::event::{EventColumns, EventError};
use crate::notify::format::{DataLocation, Decision, Plan, RenderContext};
use crate::notify::mail::{self, BuiltMail, MailContext, Notification};
use crate::notify::outbox::{self, OpenMail, State};
use crate::notify::pipeline::Pipeline;
use crate::notify::ticket::{self, Ticket};

mod text;

pub use text::{terminal_safe, to_text, top_headers, write_group_text, TextOptions};

/// Which pending groups to preview. Empty fields do not filter. A group is
/// shown whole when it contains any of the given directives or events,
/// because a group is what goes out as one notification.
#[derive(Debug, Clone, Default)]
pub struct PreviewFilter {
    /// `recipient_address`, compared case-insensitively.
    pub recipient: Option<String>,
    /// `template_name`, exactly.
    pub template: Option<String>,
    pub directive_ids: Vec<DirectiveId>,
    pub event_ids: Vec<EventId>,
    /// At most this many groups (the oldest first).
    pub limit: Option<usize>,
}

impl PreviewFilter {
    pub fn matches(&self, g: &Group) -> bool {
        let recipient = self.recipient.as_deref().is_none_or(|r| {
            g.key
                .recipient_address
                .trim()
                .eq_ignore_ascii_case(r.trim())
        });
        let template = self
            .template
            .as_deref()
            .is_none_or(|t| g.key.template_name == t);
        let directive = self.directive_ids.is_empty()
            || g.directive_ids
                .iter()
                .any(|d| self.directive_ids.contains(d));
        let event =
            self.event_ids.is_empty() || g.event_ids.iter().any(|e| self.event_ids.contains(e));
        recipient && template && directive && event
    }
}

/// One pending group and what `send` would do with it now.
#[derive(Debug, Clone, Serialize)]
pub struct GroupPreview {
    pub recipient: String,
    pub template: String,
    pub notification_format: String,
    pub event_data_format: String,
    pub aggregate_identifier: BTreeMap<String, String>,
    pub directive_ids: Vec<i64>,
    /// Distinct, ascending.
    pub event_ids: Vec<i64>,
    /// The newest directive's `inserted_at`.
    pub inserted_at: DateTime<Utc>,
    /// When a mail with the same five keys was last sent.
    pub last_sent: Option<DateTime<Utc>>,
    pub notification_interval_seconds: i64,
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// What `send` would do with a group.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    /// These mails would go out now.
    Due {
        /// The rule that decided (`file#name`).
        format: String,
        /// Why that rule: what it matched and what it makes.
        why: String,
        mails: Vec<MailPreview>,
    },
    /// The group stays pending for now.
    Postponed {
        format: String,
        reason: String,
        /// When it becomes due, if that is known.
        until: Option<DateTime<Utc>>,
    },
    /// An earlier attempt left mails of this group open in the outbox
    /// (after a crash or a temporary SMTP refusal): `send` finishes those,
    /// byte for byte with their ticket and Message-Id, or leaves them held
    /// for the operator; it renders nothing anew.
    Open {
        note: String,
        mails: Vec<MailPreview>,
    },
    /// No format rule fits: `send` logs an ERROR and leaves it pending.
    NoMatch { error: String },
    /// A rule fits but the group cannot be sent (rejected, template or
    /// render error, bad recipient): `send` logs an ERROR with the ids and
    /// leaves it pending.
    Error {
        format: Option<String>,
        error: String,
    },
}

impl Outcome {
    /// Whether `send` would count this group as an error.
    pub fn is_error(&self) -> bool {
        matches!(self, Outcome::NoMatch { .. } | Outcome::Error { .. })
    }
}

/// One mail as it would go out.
#[derive(Debug, Clone, Serialize)]
pub struct MailPreview {
    /// The ticket the next draw would give (not drawn).
    pub ticket: String,
    /// An example: a real send makes a new Message-Id.
    pub message_id: String,
    pub envelope_from: String,
    pub envelope_to: Vec<String>,
    /// Whether sending it marks directives sent (constituency copies do
    /// not).
    pub marks_sent: bool,
    pub signed: bool,
    /// The message's top-level headers in order, unfolded.
    pub headers: Vec<Header>,
    /// The subject as it goes into the header, before encoding.
    pub subject: String,
    /// The text part, decoded.
    pub text: String,
    pub attachments: Vec<AttachmentPreview>,
    /// Size of the whole message in octets.
    pub size: usize,
    /// The whole message (CRLF line ends) as SMTP would get it, but for
    /// Date, Message-Id, the ticket if others draw meanwhile, MIME
    /// boundaries and the signature.
    pub raw: String,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Header {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct AttachmentPreview {
    pub name: String,
    pub content_type: String,
    /// Octets of the decoded content.
    pub size: usize,
    /// The content (every attachment mailgend makes is text).
    pub content: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum PreviewError {
    #[error(transparent)]
    Connect(#[from] db::DbError),
    #[error("database: {}", db::describe(.0))]
    Db(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Select(#[from] directive::SelectError),
    #[error("loading events: {0}")]
    Events(EventError),
    #[error(transparent)]
    Ticket(#[from] ticket::TicketError),
    #[error("building mails failed: {0}")]
    Join(String),
}

/// Previews the pending groups `filter` selects, oldest first, on a
/// connection of its own.
pub async fn preview(
    pipeline: &Pipeline,
    filter: &PreviewFilter,
) -> Result<Vec<GroupPreview>, PreviewError> {
    let mut client = db::connect(&pipeline.config.database).await?;
    preview_with_client(pipeline, &mut client, filter).await
}

/// [`preview`] on the caller's connection.
pub async fn preview_with_client(
    pipeline: &Pipeline,
    client: &mut Client,
    filter: &PreviewFilter,
) -> Result<Vec<GroupPreview>, PreviewError> {
    use futures::StreamExt;
    let tx = read_only(client).await?;
    let mut groups = Vec::new();
    if filter.limit != Some(0) {
        let stream = directive::pending_groups_stream(
            &tx,
            pipeline
                .config
                .database
                .additional_directive_where
                .as_deref(),
        )
        .await?;
        futures::pin_mut!(stream);
        while let Some(g) = stream.next().await {
            let g = g?;
            if filter.matches(&g) {
                groups.push(g);
                if filter.limit.is_some_and(|l| groups.len() >= l) {
                    break;
                }
            }
        }
    }
    let out = render_groups(pipeline, &tx, &groups).await?;
    tx.rollback().await?;
    Ok(out)
}

/// Previews exactly `groups` (interactive review's view), whether or not
/// they are still pending.
pub async fn preview_groups(
    pipeline: &Pipeline,
    client: &mut Client,
    groups: &[Group],
) -> Result<Vec<GroupPreview>, PreviewError> {
    let tx = read_only(client).await?;
    let out = render_groups(pipeline, &tx, groups).await?;
    tx.rollback().await?;
    Ok(out)
}

/// The transaction every preview runs in: the database enforces that
/// nothing in it writes (and `REPEATABLE READ` gives one snapshot).
pub async fn read_only(client: &mut Client) -> Result<Transaction<'_>, tokio_postgres::Error> {
    client
        .build_transaction()
        .read_only(true)
        .isolation_level(IsolationLevel::RepeatableRead)
        .start()
        .await
}

async fn render_groups(
    p: &Pipeline,
    tx: &Transaction<'_>,
    groups: &[Group],
) -> Result<Vec<GroupPreview>, PreviewError> {
    let mut out = Vec::with_capacity(groups.len());
    if groups.is_empty() {
        return Ok(out);
    }
    let now: DateTime<Utc> = tx.query_one("SELECT now()", &[]).await?.get(0);
    let columns = EventColumns::read(tx).await.map_err(PreviewError::Events)?;
    let (day, mut next_seq) = split_ticket(&ticket::peek(tx).await?, now.date_naive());
    let ctx = MailContext {
        sender: p.config.sender.clone(),
        sender_address: p.config.sender_address.clone(),
        sender_domain: p.config.sender_domain.clone(),
        verp: p.config.verp.clone(),
    };
    for group in groups {
        // As in `send`: mails an earlier attempt left open come first.
        let open = outbox::open_for_group(tx, &group.directive_ids).await?;
        if !open.is_empty() {
            out.push(group_preview(group, open_outcome(p, &open)));
            continue;
        }
        let outcome = match p.formats.decide(group, now) {
            Decision::Postpone {
                format,
                reason,
                until,
            } => Outcome::Postponed {
                format,
                reason,
                until,
            },
            Decision::NoMatch => Outcome::NoMatch {
                error: format!(
                    "no format handles this group (notification_format {:?}, \
                     event_data_format {:?})",
                    group.key.notification_format, group.key.event_data_format
                ),
            },
            Decision::Error { format, reason } => Outcome::Error {
                format: Some(format.clone()),
                error: format!("format {format}: {reason}"),
            },
            Decision::Send(plan) => {
                let events = match columns
                    .load(tx, &group.distinct_event_ids(), &plan.event_columns())
                    .await
                {
                    Ok(e) => e,
                    Err(EventError::Db(e)) => return Err(PreviewError::Db(e)),
                    Err(e) => {
                        out.push(group_preview(
                            group,
                            Outcome::Error {
                                format: Some(plan.format_name().to_string()),
                                error: format!("loading events: {e}"),
                            },
                        ));
                        continue;
                    }
                };
                let needed = plan.tickets_needed(events.len());
                let tickets: Vec<Ticket> = (0..needed as i64)
                    .map(|i| Ticket::new(day, next_seq + i))
                    .collect();
                let rendered = plan.render(&RenderContext {
                    group,
                    events: &events,
                    tickets: &tickets,
                    templates: &p.templates,
                    config: &p.config,
                });
                match rendered {
                    Err(e) => Outcome::Error {
                        format: Some(plan.format_name().to_string()),
                        error: e.to_string(),
                    },
                    Ok(notifications) => {
                        match build(p, &ctx, notifications.clone(), now).await? {
                            Err(e) => Outcome::Error {
                                format: Some(plan.format_name().to_string()),
                                error: format!("building the mail: {e}"),
                            },
                            Ok(mails) => {
                                // Only a group that would really go out
                                // draws numbers.
                                next_seq += needed as i64;
                                Outcome::Due {
                                    format: plan.format_name().to_string(),
                                    why: why(&plan, group),
                                    mails: notifications
                                        .iter()
                                        .zip(mails)
                                        .map(|(n, m)| mail_preview(n, m, p.signer.is_some()))
                                        .collect(),
                                }
                            }
                        }
                    }
                }
            }
        };
        out.push(group_preview(group, outcome));
    }
    Ok(out)
}

/// `YYYYMMDD-NNNNNNNN` into its day and sequence value.
fn split_ticket(t: &Ticket, today: NaiveDate) -> (NaiveDate, i64) {
    t.as_str()
        .split_once('-')
        .and_then(|(d, s)| {
            Some((
                NaiveDate::parse_from_str(d, "%Y%m%d").ok()?,
                s.parse::<i64>().ok()?,
            ))
        })
        .unwrap_or((today, 10_000_001))
}

/// MIME and signature on the blocking pool, as `send` does.
async fn build(
    p: &Pipeline,
    ctx: &MailContext,
    notifications: Vec<Notification>,
    now: DateTime<Utc>,
) -> Result<Result<Vec<BuiltMail>, mail::MailError>, PreviewError> {
    let ctx = ctx.clone();
    let signer = p.signer.clone();
    tokio::task::spawn_blocking(move || {
        notifications
            .iter()
            .map(|n| mail::build(n, &ctx, signer.as_deref(), now))
            .collect::<Result<Vec<_>, _>>()
    })
    .await
    .map_err(|e| PreviewError::Join(e.to_string()))
}

fn open_outcome(p: &Pipeline, open: &[OpenMail]) -> Outcome {
    let has = |s: State| open.iter().any(|o| o.state == s);
    let note = if has(State::Held) {
        "held for the operator after a crash: `send` leaves this group alone until \
         `mailgend in-doubt release`, `mark-sent` or `discard` (see `mailgend in-doubt list`)"
            .to_string()
    } else if has(State::Sending) && p.config.service.in_doubt == InDoubtPolicy::Hold {
        "in doubt after a crash (mailgend.in_doubt = hold): `send` holds these mails for \
         the operator (see `mailgend in-doubt list`)"
            .to_string()
    } else if has(State::Sending) {
        "in doubt after a crash (mailgend.in_doubt = resend): `send` sends these stored \
         mails again, same bytes, ticket and Message-Id; the recipient may get them twice"
            .to_string()
    } else {
        "SMTP refused these mails temporarily: `send` retries them, same bytes, ticket \
         and Message-Id"
            .to_string()
    };
    Outcome::Open {
        note,
        mails: open.iter().map(stored_mail_preview).collect(),
    }
}

/// A stored outbox message, read back for display.
fn stored_mail_preview(o: &OpenMail) -> MailPreview {
    let raw = String::from_utf8_lossy(&o.message).into_owned();
    let headers = top_headers(&raw);
    let get = |name: &str| {
        headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value.clone())
    };
    let mut text = None;
    let mut attachments = Vec::new();
    // The stored bytes are our own MIME; should they ever fail to parse,
    // the preview still shows the headers and the raw message.
    if let Ok(parsed) = mailparse::parse_mail(&o.message) {
        for leaf in parsed.parts().filter(|p| p.subparts.is_empty()) {
            let ct = leaf
                .headers
                .get_first_value("Content-Type")
                .unwrap_or_default();
            let mime_type = leaf.ctype.mimetype.to_ascii_lowercase();
            if mime_type == "application/pgp-signature" {
                continue;
            }
            let name = leaf
                .get_content_disposition()
                .params
                .get("filename")
                .or_else(|| leaf.ctype.params.get("name"))
                .cloned();
            let content = leaf
                .get_body_raw()
                .map(|b| String::from_utf8_lossy(&b).replace("\r\n", "\n"))
                .unwrap_or_default();
            match (&text, name, mime_type.as_str()) {
                (None, None, "text/plain") => text = Some(content),
                (_, name, _) => attachments.push(AttachmentPreview {
                    name: name.unwrap_or_default(),
                    content_type: ct,
                    size: content.len(),
                    content: mime_type.starts_with("text/").then_some(content),
                }),
            }
        }
    }
    MailPreview {
        ticket: o.ticket.to_string(),
        message_id: o.message_id.clone(),
        envelope_from: o.envelope_from.clone(),
        envelope_to: o.envelope_to.clone(),
        marks_sent: o.marks_sent,
        signed: get("Content-Type").is_some_and(|c| c.starts_with("multipart/signed")),
        subject: get("Subject").unwrap_or_default(),
        text: text.unwrap_or_default(),
        headers,
        attachments,
        size: o.message.len(),
        raw,
    }
}

fn why(plan: &Plan, group: &Group) -> String {
    let makes = match plan.data_location() {
        Some(DataLocation::Inline) => "a table mail with the events inline in the text",
        Some(DataLocation::Attachment) => "a table mail with the events attached as events.csv",
        None if plan.is_xarf() => "one X-ARF report per event",
        None => "mails",
    };
    let template = plan
        .template_name(group)
        .map(|t| format!("template {t:?}"))
        .unwrap_or_else(|| "the template inline in the format file".into());
    format!(
        "first rule, in file order, whose match fits notification_format {:?} / \
         event_data_format {:?}; none of its postpone rules holds; it makes {makes} \
         with {template}",
        group.key.notification_format, group.key.event_data_format
    )
}

fn group_preview(g: &Group, outcome: Outcome) -> GroupPreview {
    GroupPreview {
        recipient: g.key.recipient_address.clone(),
        template: g.key.template_name.clone(),
        notification_format: g.key.notification_format.clone(),
        event_data_format: g.key.event_data_format.clone(),
        aggregate_identifier: g
            .key
            .aggregate_identifier
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        directive_ids: g.directive_ids.iter().map(|d| d.0).collect(),
        event_ids: g.distinct_event_ids().iter().map(|e| e.0).collect(),
        inserted_at: g.inserted_at,
        last_sent: g.last_sent,
        notification_interval_seconds: g.notification_interval.num_seconds(),
        outcome,
    }
}

fn mail_preview(n: &Notification, m: BuiltMail, signed: bool) -> MailPreview {
    let raw = String::from_utf8_lossy(&m.bytes).into_owned();
    MailPreview {
        ticket: n.ticket.to_string(),
        message_id: m.message_id,
        envelope_from: m.envelope_from,
        envelope_to: m.envelope_to,
        marks_sent: n.mark_sent,
        signed,
        headers: top_headers(&raw),
        subject: mail::sanitize_subject(&n.subject),
        text: n.body.clone(),
        attachments: n
            .attachments
            .iter()
            .map(|a| AttachmentPreview {
                name: a.filename.clone(),
                content_type: format!("text/{}; charset=utf-8", a.subtype),
                size: a.content.len(),
                content: Some(a.content.clone()),
            })
            .collect(),
        size: m.bytes.len(),
        raw,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_message_reads_back_as_it_was_built() {
        let day = NaiveDate::from_ymd_opt(2024, 5, 1).unwrap();
        let n = Notification {
            ticket: Ticket::new(day, 10000007),
            recipient: "abuse@example.net".into(),
            envelope_to: None,
            subject: "Subject".into(),
            body: "From here\nli=ne \u{e4} ".repeat(20) + "end\n",
            attachments: vec![mail::Attachment {
                subtype: "csv".into(),
                filename: "events.csv".into(),
                disposition_attachment: true,
                content: "\"a\",\"b\"\n\"1\",\"=2\"\n".into(),
            }],
            extra_headers: Vec::new(),
            mark_sent: true,
            covers: None,
        };
        let ctx = MailContext::from_sender("CERT <cert@example.org>").unwrap();
        let built = mail::build(&n, &ctx, None, chrono::Utc::now()).unwrap();
        let stored = OpenMail {
            id: 1,
            state: State::Retry,
            ticket: n.ticket.clone(),
            message_id: built.message_id.clone(),
            marks: Vec::new(),
            marks_sent: true,
            envelope_from: built.envelope_from.clone(),
            envelope_to: built.envelope_to.clone(),
            message: built.bytes.clone(),
            sent_at: built.date,
            attempts: 1,
            instance: "h:1".into(),
            created_at: built.date,
            last_error: None,
        };
        let m = stored_mail_preview(&stored);
        assert_eq!(m.text, n.body);
        assert!(!m.signed);
        assert_eq!(m.subject, "Subject");
        assert_eq!(m.attachments.len(), 1);
        assert_eq!(m.attachments[0].name, "events.csv");
        assert_eq!(
            m.attachments[0].content.as_deref(),
            Some(n.attachments[0].content.as_str())
        );
    }

    #[test]
    fn ticket_splits() {
        let d = NaiveDate::from_ymd_opt(2024, 5, 1).unwrap();
        let t = Ticket::new(d, 10000042);
        assert_eq!(split_ticket(&t, d), (d, 10000042));
    }
}

/// How `mailgend preview` prints.
#[derive(Debug, Clone, Copy, Default)]
pub struct PrintOptions {
    /// One JSON document instead of text.
    pub json: bool,
    /// Text: also the content of attachments.
    pub attachments: bool,
    /// Exit 1 when a shown group would fail.
    pub fail_on_error: bool,
}

/// `mailgend preview`.
pub async fn run(
    source: &crate::config::ConfigSource,
    verbose: u8,
    filter: &PreviewFilter,
    print: PrintOptions,
) -> Result<std::process::ExitCode, super::command::CommandError> {
    use super::command::CommandError;
    let config = super::command::load_config(source, verbose)?;
    let pipeline = Pipeline::load(config).map_err(CommandError::Setup)?;
    let groups = preview(&pipeline, filter).await?;
    if print.json {
        let doc = serde_json::json!({
            "note": "Preview only: nothing was sent, no ticket number was drawn, \
                     nothing was written. Tickets are the ones the next draws would \
                     give if these groups were sent in this order and nobody else \
                     drew numbers meanwhile; Date and Message-Id are made anew when \
                     a mail is really sent.",
            "groups": groups,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        print!(
            "{}",
            to_text(
                &groups,
                TextOptions {
                    attachment_content: print.attachments
                }
            )
        );
    }
    let failed = groups.iter().any(|g| g.outcome.is_error());
    Ok(if print.fail_on_error && failed {
        std::process::ExitCode::from(1)
    } else {
        std::process::ExitCode::SUCCESS
    })
}
