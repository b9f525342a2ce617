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
use std::fmt::Write as _;

use chrono::{DateTime, NaiveDate, Utc};
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
    let mut leaves = Vec::new();
    mime_leaves(&raw, 0, &mut leaves);
    let mut text = None;
    let mut attachments = Vec::new();
    for leaf in leaves {
        let ct = header_value(&leaf.headers, "Content-Type").unwrap_or_default();
        let cd = header_value(&leaf.headers, "Content-Disposition").unwrap_or_default();
        let name = param(&cd, "filename").or_else(|| param(&ct, "name"));
        let mime_type = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if mime_type == "application/pgp-signature" {
            continue;
        }
        let content = decode_body(&leaf.headers, &leaf.body);
        match (&text, name, mime_type.as_str()) {
            (None, None, "text/plain") => text = Some(content),
            (_, name, _) => attachments.push(AttachmentPreview {
                name: name.unwrap_or_default(),
                content_type: ct.clone(),
                size: content.len(),
                content: mime_type.starts_with("text/").then_some(content),
            }),
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

/// A leaf of a MIME tree.
struct Leaf {
    headers: Vec<Header>,
    body: String,
}

/// The leaves of the MIME entity `raw` (CRLF line ends), depth first.
fn mime_leaves(raw: &str, depth: usize, out: &mut Vec<Leaf>) {
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((raw, ""));
    let headers = top_headers(&format!("{head}\r\n\r\n"));
    let ct = header_value(&headers, "Content-Type").unwrap_or_default();
    let boundary = param(&ct, "boundary");
    match boundary {
        Some(b) if depth < 8 && ct.to_ascii_lowercase().starts_with("multipart/") => {
            let delimiter = format!("\r\n--{b}");
            // The preamble is empty in mailgend's mails; a body that starts
            // with the delimiter has no CRLF before it.
            let body = format!("\r\n{body}");
            for part in body.split(delimiter.as_str()).skip(1) {
                if part.starts_with("--") {
                    break;
                }
                let part = part.strip_prefix("\r\n").unwrap_or(part);
                mime_leaves(part, depth + 1, out);
            }
        }
        _ => out.push(Leaf {
            headers,
            body: body.to_string(),
        }),
    }
}

fn header_value(headers: &[Header], name: &str) -> Option<String> {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value.clone())
}

/// A parameter of a structured header value (`boundary="x"`, `name=y`).
fn param(value: &str, name: &str) -> Option<String> {
    value.split(';').skip(1).find_map(|p| {
        let (k, v) = p.split_once('=')?;
        if !k.trim().eq_ignore_ascii_case(name) {
            return None;
        }
        let v = v.trim();
        Some(
            match v.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
                Some(q) => q.replace("\\\"", "\"").replace("\\\\", "\\"),
                None => v.to_string(),
            },
        )
    })
}

/// The body decoded by its Content-Transfer-Encoding (mailgend writes
/// quoted-printable text), with `\n` line ends.
fn decode_body(headers: &[Header], body: &str) -> String {
    let cte = header_value(headers, "Content-Transfer-Encoding").unwrap_or_default();
    let bytes = if cte.eq_ignore_ascii_case("quoted-printable") {
        qp_decode(body)
    } else {
        body.as_bytes().to_vec()
    };
    String::from_utf8_lossy(&bytes).replace("\r\n", "\n")
}

fn qp_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'=' {
            if b[i + 1..].starts_with(b"\r\n") {
                i += 3;
                continue;
            }
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok());
            if let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
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

/// The headers before the first empty line, unfolded.
pub fn top_headers(raw: &str) -> Vec<Header> {
    let head = raw.split("\r\n\r\n").next().unwrap_or("");
    let mut out: Vec<Header> = Vec::new();
    for line in head.split("\r\n") {
        if line.starts_with([' ', '\t']) {
            if let Some(h) = out.last_mut() {
                h.value.push_str(line);
            }
        } else if let Some((name, value)) = line.split_once(':') {
            out.push(Header {
                name: name.to_string(),
                value: value.trim_start().to_string(),
            });
        }
    }
    out
}

/// Event data is untrusted: control characters could drive the
/// operator's terminal, so they are shown escaped (`\x1b`), keeping line
/// feeds and tabs.
pub fn terminal_safe(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\n' | '\t' => out.push(c),
            '\r' => {}
            c if c.is_control() => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            // Bidirectional overrides could make text display as
            // something else.
            '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

/// Options of the text rendering.
#[derive(Debug, Clone, Copy, Default)]
pub struct TextOptions {
    /// Print the content of text attachments, not only their names.
    pub attachment_content: bool,
}

/// The note that opens every text preview.
pub const TEXT_NOTE: &str = "\
Preview only: nothing was sent, no ticket number was drawn, nothing was written.
Tickets shown are the ones the next draws would give if these groups were sent in
this order and nobody else drew numbers meanwhile; Date and Message-Id are made
anew when a mail is really sent.
";

/// One group as readable text. Everything is passed through
/// [`terminal_safe`]: recipients, formats, aggregate values and the mails
/// all carry untrusted data.
pub fn write_group_text(out: &mut String, g: &GroupPreview, opts: TextOptions) {
    let mut text = String::new();
    group_text(&mut text, g, opts);
    out.push_str(&terminal_safe(&text));
}

fn group_text(out: &mut String, g: &GroupPreview, opts: TextOptions) {
    let _ = writeln!(
        out,
        "recipient      {}\ntemplate       {}\nformats        {} / {}",
        g.recipient, g.template, g.notification_format, g.event_data_format
    );
    if !g.aggregate_identifier.is_empty() {
        let agg: Vec<String> = g
            .aggregate_identifier
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let _ = writeln!(out, "aggregate      {}", agg.join(", "));
    }
    let _ = writeln!(out, "directive ids  {}", id_list(&g.directive_ids));
    let _ = writeln!(out, "event ids      {}", id_list(&g.event_ids));
    let _ = writeln!(
        out,
        "last sent      {}",
        g.last_sent
            .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
            .unwrap_or_else(|| "never".into())
    );
    match &g.outcome {
        Outcome::Postponed {
            format,
            reason,
            until,
        } => {
            let _ = writeln!(out, "status         POSTPONED by {format}: {reason}");
            let _ = writeln!(
                out,
                "due            {}",
                until
                    .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
                    .unwrap_or_else(|| "unknown".into())
            );
        }
        Outcome::NoMatch { error } => {
            let _ = writeln!(out, "status         ERROR: {error}");
        }
        Outcome::Open { note, mails } => {
            let _ = writeln!(
                out,
                "status         OPEN: {} mail(s) of an earlier attempt: {note}",
                mails.len()
            );
            write_mails(out, mails, opts, "stored, not drawn anew");
        }
        Outcome::Error { error, .. } => {
            let _ = writeln!(out, "status         ERROR: {error}");
        }
        Outcome::Due { format, why, mails } => {
            let _ = writeln!(
                out,
                "status         DUE: {} mail(s) by {format}",
                mails.len()
            );
            let _ = writeln!(out, "why            {why}");
            write_mails(out, mails, opts, "would be drawn next");
        }
    }
}

fn write_mails(out: &mut String, mails: &[MailPreview], opts: TextOptions, ticket_note: &str) {
    for (i, m) in mails.iter().enumerate() {
        let _ = writeln!(
            out,
            "\n--- mail {} of {}: ticket {} ({ticket_note}), {}{} octets{}",
            i + 1,
            mails.len(),
            m.ticket,
            if m.signed { "signed, " } else { "" },
            m.size,
            if m.marks_sent {
                ", marks the group sent"
            } else {
                ", a copy (marks nothing sent)"
            }
        );
        let _ = writeln!(
            out,
            "envelope       {} -> {}",
            m.envelope_from,
            m.envelope_to.join(", ")
        );
        for h in &m.headers {
            let _ = writeln!(out, "{}: {}", h.name, h.value);
        }
        let _ = writeln!(out, "\n{}", m.text.trim_end());
        for a in &m.attachments {
            let _ = writeln!(
                out,
                "[attachment {} ({}, {} octets)]",
                a.name, a.content_type, a.size
            );
            if opts.attachment_content {
                if let Some(c) = &a.content {
                    let _ = writeln!(out, "{}", c.trim_end());
                    let _ = writeln!(out, "[end of {}]", a.name);
                }
            }
        }
    }
}

/// The whole preview as readable text.
pub fn to_text(groups: &[GroupPreview], opts: TextOptions) -> String {
    let mut out = String::from(TEXT_NOTE);
    if groups.is_empty() {
        out.push_str("\nNo pending group matches.\n");
        return out;
    }
    for (i, g) in groups.iter().enumerate() {
        let _ = writeln!(out, "\n=== group {} of {}", i + 1, groups.len());
        write_group_text(&mut out, g, opts);
    }
    let due = groups
        .iter()
        .filter(|g| matches!(g.outcome, Outcome::Due { .. }))
        .count();
    let postponed = groups
        .iter()
        .filter(|g| matches!(g.outcome, Outcome::Postponed { .. }))
        .count();
    let errors = groups.iter().filter(|g| g.outcome.is_error()).count();
    let _ = writeln!(
        out,
        "\n{} groups: {due} due, {postponed} postponed, {errors} errors.",
        groups.len()
    );
    out
}

fn id_list(ids: &[i64]) -> String {
    let parts: Vec<String> = ids.iter().map(i64::to_string).collect();
    format!("[{}]", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_shown_escaped() {
        assert_eq!(
            terminal_safe("a\x1b[2Jb\r\nc\td\u{9b}e\u{202e}f"),
            "a\\x1b[2Jb\nc\td\\x9be\\u{202e}f"
        );
    }

    #[test]
    fn headers_unfold() {
        let h = top_headers("A: 1\r\nB: x\r\n y\r\nC:z\r\n\r\nD: body\r\n");
        assert_eq!(
            h,
            vec![
                Header {
                    name: "A".into(),
                    value: "1".into()
                },
                Header {
                    name: "B".into(),
                    value: "x y".into()
                },
                Header {
                    name: "C".into(),
                    value: "z".into()
                },
            ]
        );
    }

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
