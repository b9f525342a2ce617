//! One group through the data path, stage by stage in path order: claim
//! → decide → load events → render (provisional tickets, so a broken
//! template consumes no number) → draw tickets → build and sign (brought
//! under the relay's size limit) → outbox intent, durable before SMTP →
//! send → mark sent and COMMIT after the relay's 250. Each stage is a
//! method of [`GroupRun`], the group in progress; [`process_group`] reads
//! as the path. [`super::batch`] takes the same stages for many small
//! groups at once and shares the SMTP steps ([`Send`],
//! [`record_refusal`], [`note_accepted`]).

use std::ops::ControlFlow;

use chrono::{DateTime, Utc};
use tokio_postgres::{Client, Transaction};
use tracing::{debug, info, warn};

use super::{signing, Connections, GroupError, GroupOutcome, Pipeline, RunOptions, Side, Tx};
use crate::config::InDoubtPolicy;
use crate::notify::directive::{self, Claim, DirectiveId, Group};
use crate::notify::event::{Event, EventColumns};
use crate::notify::format::{Decision, Plan, RenderContext};
use crate::notify::mail::{BuiltMail, Notification};
use crate::notify::metrics::FailReason;
use crate::notify::outbox;
use crate::notify::sent;
use crate::notify::ticket::{self, Ticket, TicketError};
use crate::shared::smtp::{RefusedRecipient, SmtpError};

/// The lines of the data path keep the target they always had (operators
/// and tests filter on it).
const TARGET: &str = "mailgend::notify::pipeline";

/// One mail ready for SMTP with the directives it marks sent.
struct Outgoing {
    mail: BuiltMail,
    ticket: Ticket,
    marks: Vec<DirectiveId>,
}

/// The directives a notification marks sent: none for copies, the covered
/// events' directives for per-event mails (X-ARF), else the whole group.
pub(crate) fn marked_directives(group: &Group, n: &Notification) -> Vec<DirectiveId> {
    if !n.mark_sent {
        return Vec::new();
    }
    match &n.covers {
        None => group.directive_ids.clone(),
        Some(events) => {
            // A set: a split part covers up to the whole group's events.
            let events: std::collections::HashSet<_> = events.iter().collect();
            group
                .directive_ids
                .iter()
                .zip(&group.event_ids)
                .filter(|(_, e)| events.contains(e))
                .map(|(d, _)| *d)
                .collect()
        }
    }
}

/// Directives (≈ event rows) that all groups in flight may hold in memory
/// together. A group's rows, its CSV and its MIME body are in memory while
/// it is rendered, ~1 KB per event; with Zipf-skewed feeds one network's
/// group can hold a tenth of a burst, and eight such groups at once took a
/// 1,000,000-event run to 589 MB. Groups take permits for their size (a
/// group larger than the budget takes all of it and runs alone), so small
/// groups flow freely and peak memory stays bounded.
pub const DIRECTIVE_BUDGET: usize = 40_000;
pub(super) static IN_FLIGHT: tokio::sync::Semaphore =
    tokio::sync::Semaphore::const_new(DIRECTIVE_BUDGET);

/// Drives one group through the data path in its own transaction, stage
/// by stage in path order (each a method of `GroupRun`).
pub async fn process_group(
    p: &Pipeline,
    conns: &mut Connections,
    columns: &EventColumns,
    group: &Group,
    opts: RunOptions,
) -> Result<GroupOutcome, GroupError> {
    let permits = group.directive_ids.len().clamp(1, DIRECTIVE_BUDGET) as u32;
    let _in_flight = IN_FLIGHT
        .acquire_many(permits)
        .await
        .expect("the budget semaphore is never closed");
    let Some(mut run) = GroupRun::claim(p, conns, group, opts).await? else {
        return Ok(GroupOutcome::Busy);
    };
    // Mails of this group that an earlier attempt left open come first:
    // they already have tickets and Message-Ids.
    if !opts.dry_run {
        let open = outbox::open_for_group(&run.tx.cached(), &group.directive_ids).await?;
        if !open.is_empty() {
            return run.resume_open(open).await;
        }
    }
    let plan = match run.decide() {
        ControlFlow::Continue(plan) => plan,
        ControlFlow::Break(end) => return end,
    };
    let events = run.load_events(columns, &plan).await?;
    let needed = plan.tickets_needed(events.len());

    // Render once with provisional numbers: a template error or an unknown
    // placeholder must not consume ticket numbers (old tool defect).
    let provisional = run.provisional_tickets(needed).await?;
    let preview = run.render(&plan, &events, &provisional)?;
    if opts.dry_run {
        return run.dry_run(&plan, preview).await;
    }

    // A large group's rendering and events are tens of megabytes: hold
    // each only as long as it is needed.
    drop(preview);
    let tickets = ticket::draw_committed(run.side.client, Some(run.side.cache), needed).await?;
    let notifications = run.render(&plan, &events, &tickets)?;
    let outgoing = run.build(&plan, &events, notifications).await?;
    drop(events);
    let ids = run.record_intents(&outgoing).await?;
    let sends = outgoing
        .iter()
        .zip(&ids)
        .map(|(o, id)| Send::built(*id, &o.mail, &o.ticket, &o.marks))
        .collect::<Vec<_>>();
    run.deliver(&sends).await
}

/// A group on its way through the stages: claimed in its transaction on
/// the worker's main connection, with the side connection for what must
/// commit on its own (tickets, outbox intents).
struct GroupRun<'a> {
    p: &'a Pipeline,
    group: &'a Group,
    opts: RunOptions,
    tx: Tx<'a>,
    side: Side<'a>,
    /// The database's clock at the claim, not ours: instances on several
    /// hosts then agree on what is due.
    now: DateTime<Utc>,
}

impl<'a> GroupRun<'a> {
    /// Claims the group's rows (`SKIP LOCKED`); `None` when another
    /// instance holds some of them or they are no longer pending.
    async fn claim(
        p: &'a Pipeline,
        conns: &'a mut Connections,
        group: &'a Group,
        opts: RunOptions,
    ) -> Result<Option<GroupRun<'a>>, GroupError> {
        let (tx, side) = conns.begin().await?;
        let (claim, now) = directive::claim_at(&tx.cached(), group).await?;
        let Some(now) = now.filter(|_| claim == Claim::Claimed) else {
            return Ok(None);
        };
        Ok(Some(GroupRun {
            p,
            group,
            opts,
            tx,
            side,
            now,
        }))
    }

    /// Asks the formats: the plan to send, or the group's outcome now
    /// (postponed, no format, rejected).
    fn decide(&self) -> ControlFlow<Result<GroupOutcome, GroupError>, Plan> {
        let group = self.group;
        ControlFlow::Break(match self.p.formats.decide(group, self.now) {
            Decision::Send(plan) => return ControlFlow::Continue(plan),
            Decision::Postpone {
                format,
                reason,
                until,
            } => {
                debug!(
                    target: TARGET,
                    directive_ids = %group.directive_ids_display(),
                    format = %format,
                    "postponed: {reason}"
                );
                Ok(GroupOutcome::Postponed { reason, until })
            }
            Decision::NoMatch => Err(GroupError::NoFormat(
                group.key.notification_format.clone(),
                group.key.event_data_format.clone(),
            )),
            Decision::Error { format, reason } => Err(GroupError::Rejected { format, reason }),
        })
    }

    /// The group's events, with the columns the plan needs.
    async fn load_events(
        &self,
        columns: &EventColumns,
        plan: &Plan,
    ) -> Result<Vec<Event>, GroupError> {
        let event_ids = self.group.distinct_event_ids();
        Ok(columns
            .load(&self.tx.cached(), &event_ids, &plan.event_columns())
            .await?)
    }

    /// Numbers to render with before any is drawn. A dry run shows the
    /// numbers the next draws would most likely give; otherwise only the
    /// shape matters for the check (save the query).
    async fn provisional_tickets(&self, needed: usize) -> Result<Vec<Ticket>, GroupError> {
        Ok(if self.opts.dry_run {
            provisional_tickets(&self.tx, needed).await?
        } else {
            (0..needed as i64)
                .map(|i| Ticket::new(self.now.date_naive(), 10_000_001 + i))
                .collect()
        })
    }

    fn render(
        &self,
        plan: &Plan,
        events: &[Event],
        tickets: &[Ticket],
    ) -> Result<Vec<Notification>, GroupError> {
        plan.render(&RenderContext {
            group: self.group,
            events,
            tickets,
            templates: &self.p.templates,
            config: &self.p.config,
        })
        .map_err(|source| GroupError::Render {
            format: plan.format_name().to_string(),
            source,
        })
    }

    /// A dry run ends after building (and signing): nothing is sent,
    /// written or drawn.
    async fn dry_run(
        self,
        plan: &Plan,
        preview: Vec<Notification>,
    ) -> Result<GroupOutcome, GroupError> {
        let mails = build_all(self.p, preview, self.now).await?;
        for m in &mails {
            info!(
                target: TARGET,
                to = %m.envelope_to.join(", "),
                bytes = m.bytes.len(),
                format = %plan.format_name(),
                "dry run: would send"
            );
        }
        self.tx.rollback().await?;
        Ok(GroupOutcome::Sent { mails: mails.len() })
    }

    /// MIME and signature, brought under the relay's size limit
    /// ([`crate::notify::fit`], which may render parts of the events anew
    /// and draw tickets for them).
    async fn build(
        &mut self,
        plan: &Plan,
        events: &[Event],
        notifications: Vec<Notification>,
    ) -> Result<Vec<Outgoing>, GroupError> {
        Ok(crate::notify::fit::fit_group(
            self.p,
            plan,
            self.group,
            events,
            notifications,
            self.now,
            self.side.client,
            self.side.cache,
        )
        .await?
        .into_iter()
        .map(|f| Outgoing {
            mail: f.mail,
            ticket: f.ticket,
            marks: f.marks,
        })
        .collect())
    }

    /// The intent, durable before SMTP sees anything: one outbox row
    /// `sending` per mail, committed on the side connection. Returns the
    /// rows' ids.
    async fn record_intents(&self, outgoing: &[Outgoing]) -> Result<Vec<i64>, GroupError> {
        let intents: Vec<outbox::Intent> = outgoing
            .iter()
            .map(|o| outbox::Intent {
                ticket: &o.ticket,
                message_id: &o.mail.message_id,
                marks: &o.marks,
                group: &self.group.directive_ids,
                envelope_from: &o.mail.envelope_from,
                envelope_to: &o.mail.envelope_to,
                message: &o.mail.bytes,
                sent_at: o.mail.date,
            })
            .collect();
        Ok(outbox::record(&self.side.cached(), &self.p.instance, &intents).await?)
    }

    /// Sends the mails in order; each accepted one is marked sent in the
    /// group's transaction. On a failure the outbox says what became of
    /// the rest: `failed` when the mail was refused for good, `retry` when
    /// it was not handed over for a passing reason, left `sending` (in
    /// doubt) only when the connection broke after the end of the data.
    async fn deliver(self, sends: &[Send<'_>]) -> Result<GroupOutcome, GroupError> {
        let p = self.p;
        let mut accepted = 0usize;
        let txc = self.tx.cached();
        for (i, s) in sends.iter().enumerate() {
            let refused = match p.outbound.send(s.from, s.to, s.bytes).await {
                Ok(refused) => refused,
                Err(source) => {
                    let rest: Vec<i64> = sends[i..].iter().map(|s| s.outbox_id).collect();
                    record_refusal(p, self.side.client, &rest, &source).await;
                    let err = GroupError::Smtp {
                        relay: p.outbound.relay().to_string(),
                        source,
                    };
                    return if accepted > 0 {
                        // What SMTP accepted is recorded; never roll that back.
                        self.tx.commit().await?;
                        Err(GroupError::Partial {
                            sent: accepted,
                            source: Box::new(err),
                        })
                    } else {
                        self.tx.rollback().await?;
                        Err(err)
                    };
                }
            };
            accepted += 1;
            note_accepted(p, self.group, s, &refused, self.opts);
            if !s.marks.is_empty() {
                sent::mark_sent(&txc, s.ticket, s.sent_at, s.marks).await?;
            }
            outbox::accepted(&txc, &[s.outbox_id]).await?;
        }
        self.tx.commit().await?;
        Ok(GroupOutcome::Sent { mails: accepted })
    }

    /// Finishes mails an earlier attempt left open: resend the stored bytes
    /// (same ticket, same Message-Id), or hold them, per `mailgend.in_doubt`.
    async fn resume_open(self, open: Vec<outbox::OpenMail>) -> Result<GroupOutcome, GroupError> {
        let (p, group) = (self.p, self.group);
        if open.iter().any(|o| o.state == outbox::State::Held) {
            self.tx.rollback().await?;
            return Ok(GroupOutcome::Held);
        }
        let in_doubt: Vec<&outbox::OpenMail> = open
            .iter()
            .filter(|o| o.state == outbox::State::Sending)
            .collect();
        if !in_doubt.is_empty() && p.config.service.in_doubt == InDoubtPolicy::Hold {
            let ids: Vec<i64> = open.iter().map(|o| o.id).collect();
            outbox::set_state(self.side.client, &ids, outbox::State::Held).await?;
            for o in &in_doubt {
                warn!(
                    target: TARGET,
                    ticket = %o.ticket,
                    mail_message_id = %o.message_id,
                    recipient = %o.envelope_to.join(", "),
                    directive_ids = %group.directive_ids_display(),
                    "mail in doubt (the process sending it stopped before SMTP's answer was recorded); \
                     held for the operator: see `mailgend in-doubt list`"
                );
            }
            self.tx.rollback().await?;
            return Ok(GroupOutcome::Held);
        }
        for o in &open {
            if o.state == outbox::State::Sending {
                warn!(
                    target: TARGET,
                    ticket = %o.ticket,
                    mail_message_id = %o.message_id,
                    recipient = %o.envelope_to.join(", "),
                    directive_ids = %group.directive_ids_display(),
                    attempts = o.attempts,
                    "mail in doubt (the process sending it stopped before SMTP's answer was recorded); \
                     resending it with the same Message-Id and ticket, so the recipient may get it twice"
                );
                p.metrics.in_doubt_resent();
            } else {
                info!(
                    target: TARGET,
                    ticket = %o.ticket,
                    mail_message_id = %o.message_id,
                    "retrying a mail SMTP refused temporarily (same Message-Id and ticket)"
                );
            }
            outbox::attempt(self.side.client, o.id, &p.instance).await?;
        }
        let sends: Vec<Send> = open
            .iter()
            .map(|o| Send {
                outbox_id: o.id,
                from: &o.envelope_from,
                to: &o.envelope_to,
                bytes: &o.message,
                ticket: &o.ticket,
                message_id: &o.message_id,
                sent_at: o.sent_at,
                marks: if o.marks_sent { &o.marks } else { &[] },
            })
            .collect();
        self.deliver(&sends).await
    }
}

/// One mail handed to SMTP and what to record when it is accepted.
pub(super) struct Send<'a> {
    pub(super) outbox_id: i64,
    pub(super) from: &'a str,
    pub(super) to: &'a [String],
    pub(super) bytes: &'a [u8],
    pub(super) ticket: &'a Ticket,
    pub(super) message_id: &'a str,
    pub(super) sent_at: DateTime<Utc>,
    pub(super) marks: &'a [DirectiveId],
}

impl<'a> Send<'a> {
    /// A mail built in this run, recorded in the outbox as `outbox_id`.
    pub(super) fn built(
        outbox_id: i64,
        mail: &'a BuiltMail,
        ticket: &'a Ticket,
        marks: &'a [DirectiveId],
    ) -> Send<'a> {
        Send {
            outbox_id,
            from: &mail.envelope_from,
            to: &mail.envelope_to,
            bytes: &mail.bytes,
            ticket,
            message_id: &mail.message_id,
            sent_at: mail.date,
            marks,
        }
    }
}

/// Counts an SMTP failure and records in the outbox what became of `rest`
/// (the failed mail, then the group's later ones): `failed` when the mail
/// was refused for good (5xx, SMTPUTF8 or SIZE the relay lacks), `retry`
/// when it was not handed over for a passing reason (4xx, the relay
/// down), the first left `sending` (in doubt) only when the connection
/// broke after the end of its data was written.
pub(super) async fn record_refusal(p: &Pipeline, side: &Client, rest: &[i64], source: &SmtpError) {
    p.metrics.smtp_error();
    // A 5xx is about this mail (recipient, policy): the relay works.
    if !matches!(
        source,
        SmtpError::Permanent(_) | SmtpError::Address { .. } | SmtpError::Config(_)
    ) {
        p.metrics.set_smtp_relay_ok(false);
    }
    if source.delivery_unknown() {
        p.metrics.mail_failed(FailReason::InDoubt);
    }
    let state = match source {
        // Refused for good, certainly not handed over: released, so the
        // group is rendered anew next time (never "in doubt").
        SmtpError::Permanent(_)
        | SmtpError::Unsendable(_)
        | SmtpError::Address { .. }
        | SmtpError::Config(_) => Some(outbox::State::Failed),
        // Not handed over; the same bytes may well go through later.
        SmtpError::Temporary(_)
        | SmtpError::Unreachable(_)
        | SmtpError::RelayUnavailable(_)
        | SmtpError::RelayRefused(_) => Some(outbox::State::Retry),
        SmtpError::Connection(_) => None,
    };
    if let Some(state) = state {
        // Best effort: if this fails the rows stay `sending` and the next
        // attempt treats them as in doubt, which is safe.
        if let Err(e) = outbox::refused(side, rest, state, &source.to_string()).await {
            warn!(target: TARGET, "could not record the SMTP refusal in the outbox: {e}");
        }
    } else if rest.len() > 1 {
        // Only the first mail's fate is unknown; the others were never
        // handed over.
        let _ = outbox::refused(side, &rest[1..], outbox::State::Retry, "not attempted").await;
    }
}

/// Metrics and the INFO line operators grep for, once SMTP accepted `s`;
/// a WARN for each envelope recipient the relay refused meanwhile (the
/// mail went to the others; the old tool dropped such recipients silently).
pub(super) fn note_accepted(
    p: &Pipeline,
    group: &Group,
    s: &Send<'_>,
    refused: &[RefusedRecipient],
    opts: RunOptions,
) {
    for r in refused {
        warn!(
            target: TARGET,
            ticket = %s.ticket,
            refused = %r.address,
            recipient = %s.to.join(", "),
            directive_ids = %group.directive_ids_display(),
            mail_message_id = %s.message_id,
            "the relay refused one envelope recipient of a mail and took it for the others; \
             that recipient does not get it: {}",
            r.error
        );
    }
    p.metrics.mail_sent();
    p.metrics.set_smtp_relay_ok(true);
    if let Ok(latency) = (Utc::now() - group.inserted_at).to_std() {
        p.metrics.observe_insert_to_smtp(latency);
    }
    info!(
        target: TARGET,
        ticket = %s.ticket,
        recipient = %s.to.join(", "),
        directive_ids = %group.directive_ids_display(),
        event_ids = %if opts.list_event_ids { group.event_ids_display() } else { "-".into() },
        mail_message_id = %s.message_id,
        "mail sent"
    );
}

/// `n` numbers the next draws would most likely return (never consumed).
async fn provisional_tickets(tx: &Transaction<'_>, n: usize) -> Result<Vec<Ticket>, TicketError> {
    let first = ticket::peek(tx).await?;
    let (day, seq) = first
        .as_str()
        .split_once('-')
        .map(|(d, s)| (d.to_string(), s.parse::<i64>().unwrap_or(10000001)))
        .unwrap_or_default();
    let day = chrono::NaiveDate::parse_from_str(&day, "%Y%m%d")
        .unwrap_or_else(|_| Utc::now().date_naive());
    Ok((0..n as i64).map(|i| Ticket::new(day, seq + i)).collect())
}

/// MIME + signature for every notification, on the signing pool.
async fn build_all(
    p: &Pipeline,
    notifications: Vec<Notification>,
    now: DateTime<Utc>,
) -> Result<Vec<BuiltMail>, GroupError> {
    signing::build_all(&p.mail_ctx, p.signer.as_ref(), now, notifications)
        .await
        .map_err(|e| GroupError::Join(e.to_string()))?
        .into_iter()
        .collect::<Result<Vec<_>, _>>()
        .map_err(GroupError::from)
}
