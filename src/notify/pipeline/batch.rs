//! Small groups driven through the data path together, one transaction and
//! one statement per step for the whole batch.
//!
//! Most groups of a burst are one or two directives. For them PostgreSQL's
//! cost is almost all per statement (executor start-up, a commit each), not
//! per row: a group alone takes about ten statements and three commits.
//! A batch of up to [`BATCH_GROUPS`] such groups takes the same ten
//! statements and three commits in all, with the same guarantees per
//! group as [`process_group`]:
//!
//! * claimed with `SKIP LOCKED` (a group another instance holds comes back
//!   `Busy`), decided by its format at the database's `now()`;
//! * a group with open outbox mails is left out and resumed on its own
//!   after the batch, exactly as `process_group` resumes it;
//! * a broken group (format, template, mail) fails alone and draws no
//!   ticket; the others go on;
//! * every mail's intent is durable in the outbox before SMTP sees any of
//!   them; mails SMTP accepted are marked sent in the batch's transaction;
//! * a mail that fails for a reason of its own (a 5xx, a 4xx to RCPT,
//!   SMTPUTF8 or SIZE the relay lacks) fails its group alone (`failed` or
//!   `retry` in the outbox as for a group alone) and the batch goes on; a
//!   failure of the relay itself (unreachable, 421, another 4xx, the
//!   connection lost) ends the batch: the mails not yet handed over wait
//!   as `retry` with their tickets.
//!
//! If the database fails before any mail is handed to SMTP, nothing of the
//! batch is kept and each group is processed on its own instead, so one
//! bad group cannot take others with it. The price of batching: a process
//! killed while sending a batch leaves the batch's accepted mails in doubt
//! (at most [`BATCH_GROUPS`] groups per worker instead of one).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use tokio_postgres::Client;
use tracing::debug;

use super::{
    marked_directives, note_accepted, process_group, record_refusal, Connections, GroupError,
    GroupOutcome, Pipeline, RunOptions, Send, DIRECTIVE_BUDGET, IN_FLIGHT,
};
use crate::notify::db;
use crate::notify::directive::{self, DirectiveId, EventId, Group};
use crate::notify::event::{Event, EventColumns, EventError};
use crate::notify::format::{Decision, Plan, RenderContext};
use crate::notify::mail::{BuiltMail, MailError, Notification};
use crate::notify::outbox;
use crate::notify::sent;
use crate::notify::ticket::{self, Ticket};
use crate::shared::smtp::SmtpError;

/// Groups per batch: long enough to spread the per-statement cost, short
/// enough that a `kill -9` leaves few mails in doubt.
pub const BATCH_GROUPS: usize = 32;
/// Directives per batch.
pub const BATCH_DIRECTIVES: usize = 400;
/// Larger groups go alone: their cost is per directive anyway.
pub const SMALL_GROUP: usize = 50;

/// Whether `group` may join a batch.
pub fn fits(group: &Group) -> bool {
    group.directive_ids.len() <= SMALL_GROUP
}

/// `first` and the small groups already waiting in `rx`, as one batch
/// (never waits for more: latency). A large group met on the way comes
/// back separately, to go next.
pub fn gather<T: AsRef<Group>>(
    first: T,
    rx: &mut tokio::sync::mpsc::Receiver<T>,
) -> (Vec<T>, Option<T>) {
    if !fits(first.as_ref()) {
        return (vec![first], None);
    }
    let mut size = first.as_ref().directive_ids.len();
    let mut groups = vec![first];
    while groups.len() < BATCH_GROUPS && size < BATCH_DIRECTIVES {
        match rx.try_recv() {
            Ok(g) if fits(g.as_ref()) => {
                size += g.as_ref().directive_ids.len();
                groups.push(g);
            }
            Ok(g) => return (groups, Some(g)),
            Err(_) => break,
        }
    }
    (groups, None)
}

/// What became of a group of the batch so far.
enum Fate {
    /// Still in the batch.
    Open,
    /// To be processed on its own after the batch (open outbox mails).
    Alone,
    Done(Result<GroupOutcome, GroupError>),
}

/// A group that will send, with what it needs.
struct Work<'g> {
    slot: usize,
    group: &'g Group,
    plan: Plan,
    events: Vec<Event>,
    needed: usize,
}

/// Processes `groups` (each [`fits`]) and returns one result per group, in
/// order. Errors are returned, not logged: the caller logs them like
/// `process_group`'s.
pub async fn process_batch(
    p: &Pipeline,
    conns: &mut Connections,
    columns: &EventColumns,
    groups: &[Group],
    opts: RunOptions,
) -> Vec<Result<GroupOutcome, GroupError>> {
    if groups.len() == 1 || opts.dry_run {
        let mut out = Vec::with_capacity(groups.len());
        for g in groups {
            out.push(process_group(p, conns, columns, g, opts).await);
        }
        return out;
    }
    let size: usize = groups.iter().map(|g| g.directive_ids.len()).sum();
    let fates = {
        let _in_flight = IN_FLIGHT
            .acquire_many(size.clamp(1, DIRECTIVE_BUDGET) as u32)
            .await
            .expect("the budget semaphore is never closed");
        match run(p, conns, columns, groups, opts).await {
            Ok(fates) => fates,
            Err(e) => {
                debug!(
                    "batch of {} groups failed before SMTP ({e}); one at a time instead",
                    groups.len()
                );
                groups.iter().map(|_| Fate::Alone).collect()
            }
        }
    };
    let mut out = Vec::with_capacity(groups.len());
    for (g, fate) in groups.iter().zip(fates) {
        out.push(match fate {
            Fate::Done(r) => r,
            Fate::Alone | Fate::Open => process_group(p, conns, columns, g, opts).await,
        });
    }
    out
}

/// The batch itself. `Err` only before any mail reached SMTP (nothing of
/// the batch is kept then).
async fn run(
    p: &Pipeline,
    conns: &mut Connections,
    columns: &EventColumns,
    groups: &[Group],
    opts: RunOptions,
) -> Result<Vec<Fate>, GroupError> {
    let mut fates: Vec<Fate> = groups.iter().map(|_| Fate::Open).collect();
    let (tx, side) = conns.begin().await?;
    let txc = tx.cached();

    let all: Vec<DirectiveId> = groups
        .iter()
        .flat_map(|g| g.directive_ids.iter().copied())
        .collect();
    let (held, now) = directive::claim_many(&txc, &all).await?;
    let Some(now) = now else {
        tx.rollback().await?;
        return Ok(groups
            .iter()
            .map(|_| Fate::Done(Ok(GroupOutcome::Busy)))
            .collect());
    };
    for (fate, g) in fates.iter_mut().zip(groups) {
        if !g.directive_ids.iter().all(|d| held.contains(d)) {
            *fate = Fate::Done(Ok(GroupOutcome::Busy));
        }
    }
    let claimed: Vec<DirectiveId> = groups
        .iter()
        .zip(&fates)
        .filter(|(_, f)| matches!(f, Fate::Open))
        .flat_map(|(g, _)| g.directive_ids.iter().copied())
        .collect();
    let open = outbox::open_group_members(&txc, &claimed).await?;
    for (fate, g) in fates.iter_mut().zip(groups) {
        if matches!(fate, Fate::Open) && g.directive_ids.iter().any(|d| open.contains(d)) {
            *fate = Fate::Alone;
        }
    }

    // Formats decide; broken and postponed groups leave the batch here.
    let mut works = Vec::new();
    for (slot, g) in groups.iter().enumerate() {
        if !matches!(fates[slot], Fate::Open) {
            continue;
        }
        match p.formats.decide(g, now) {
            Decision::Send(plan) => works.push(Work {
                slot,
                group: g,
                plan,
                events: Vec::new(),
                needed: 0,
            }),
            Decision::Postpone {
                format,
                reason,
                until,
            } => {
                // The same line a group on its own gets (pipeline::process_group).
                tracing::debug!(
                    target: "mailgend::notify::pipeline",
                    directive_ids = %g.directive_ids_display(),
                    format = %format,
                    "postponed: {reason}"
                );
                fates[slot] = Fate::Done(Ok(GroupOutcome::Postponed { reason, until }))
            }
            Decision::NoMatch => {
                fates[slot] = Fate::Done(Err(GroupError::NoFormat(
                    g.key.notification_format.clone(),
                    g.key.event_data_format.clone(),
                )))
            }
            Decision::Error { format, reason } => {
                fates[slot] = Fate::Done(Err(GroupError::Rejected { format, reason }))
            }
        }
    }

    load_events(&txc, columns, &mut works, &mut fates).await?;

    // Render with provisional numbers first: a broken template must not
    // consume tickets.
    works.retain_mut(|w| {
        w.needed = w.plan.tickets_needed(w.events.len());
        let provisional: Vec<Ticket> = (0..w.needed as i64)
            .map(|i| Ticket::new(now.date_naive(), 10_000_001 + i))
            .collect();
        match render(p, w, &provisional) {
            Ok(_) => true,
            Err(e) => {
                fates[w.slot] = Fate::Done(Err(e));
                false
            }
        }
    });
    if works.is_empty() {
        tx.rollback().await?;
        return Ok(fates);
    }

    let total: usize = works.iter().map(|w| w.needed).sum();
    let mut tickets = ticket::draw_committed(side.client, Some(side.cache), total)
        .await?
        .into_iter();
    let mut rendered: Vec<(usize, Vec<Notification>)> = Vec::new();
    for (i, w) in works.iter().enumerate() {
        let mine: Vec<Ticket> = tickets.by_ref().take(w.needed).collect();
        match render(p, w, &mine) {
            Ok(n) => rendered.push((i, n)),
            Err(e) => fates[w.slot] = Fate::Done(Err(e)),
        }
    }

    for w in &mut works {
        w.events = Vec::new();
    }
    // MIME and signatures for the whole batch on the blocking pool.
    let marks: Vec<Vec<Vec<DirectiveId>>> = rendered
        .iter()
        .map(|(i, ns)| {
            ns.iter()
                .map(|n| marked_directives(works[*i].group, n))
                .collect()
        })
        .collect();
    let built = build(p, rendered, now).await?;

    let mut ready: Vec<Ready> = Vec::new();
    // A group with a mail over the relay's size limit goes alone, where
    // notify::fit handles it (its ticket drawn here stays unused).
    let limit = crate::notify::fit::limit(p).await;
    for ((i, mails), marks) in built.into_iter().zip(marks) {
        let w = &works[i];
        match mails {
            Ok(mails) if !crate::notify::fit::all_fit(mails.iter().map(|m| &m.mail), limit) => {
                fates[w.slot] = Fate::Alone
            }
            Ok(mails) => ready.push(Ready {
                slot: w.slot,
                group: w.group,
                mails,
                marks,
                ids: Vec::new(),
            }),
            Err(e) => fates[w.slot] = Fate::Done(Err(GroupError::Mail(e))),
        }
    }

    // The intents, durable before SMTP sees anything.
    let intents: Vec<outbox::Intent> = ready
        .iter()
        .flat_map(|r| {
            r.mails
                .iter()
                .zip(&r.marks)
                .map(|(m, marks)| outbox::Intent {
                    ticket: &m.ticket,
                    message_id: &m.mail.message_id,
                    marks,
                    group: &r.group.directive_ids,
                    envelope_from: &m.mail.envelope_from,
                    envelope_to: &m.mail.envelope_to,
                    message: &m.mail.bytes,
                    sent_at: m.mail.date,
                })
        })
        .collect();
    let mut ids = outbox::record(&side.cached(), &p.instance, &intents)
        .await?
        .into_iter();
    drop(intents);
    for r in &mut ready {
        r.ids = ids.by_ref().take(r.mails.len()).collect();
    }

    // From here on mails reach SMTP: no more falling back.
    let (accepted_ids, recorded) = send(p, side.client, &ready, &mut fates, opts).await;
    let marks: Vec<sent::Mark> = ready
        .iter()
        .flat_map(|r| r.mails.iter().zip(&r.marks).zip(&r.ids))
        .filter(|(_, id)| accepted_ids.contains(id))
        .map(|((m, marks), _)| sent::Mark {
            ticket: &m.ticket,
            sent_at: m.mail.date,
            directive_ids: marks,
        })
        .collect();
    let accepted: Vec<i64> = accepted_ids.iter().copied().collect();
    let recording = async {
        sent::mark_sent_many(&txc, &marks).await?;
        outbox::accepted(&txc, &accepted).await
    }
    .await;
    let recording = match recording {
        Ok(()) => tx.commit().await,
        Err(e) => Err(e),
    };
    if let Err(e) = recording {
        // The mails went out; their outbox rows stay `sending`, so the
        // next attempt finds them in doubt and follows `in_doubt`.
        let why = db::describe(&e);
        for slot in recorded {
            fates[slot] = Fate::Done(Err(GroupError::Recording(why.clone())));
        }
    }
    Ok(fates)
}

/// A built mail and its ticket.
struct Mail {
    mail: BuiltMail,
    ticket: Ticket,
}

/// A group whose mails are built and recorded in the outbox.
struct Ready<'g> {
    slot: usize,
    group: &'g Group,
    mails: Vec<Mail>,
    /// Per mail, the directives it marks sent.
    marks: Vec<Vec<DirectiveId>>,
    /// Per mail, its outbox row.
    ids: Vec<i64>,
}

/// Loads the events of every work, one query per distinct column set.
async fn load_events<S: db::Session>(
    tx: &S,
    columns: &EventColumns,
    works: &mut Vec<Work<'_>>,
    fates: &mut [Fate],
) -> Result<(), GroupError> {
    let mut wanted: BTreeMap<Vec<String>, BTreeSet<EventId>> = BTreeMap::new();
    for w in works.iter() {
        wanted
            .entry(w.plan.event_columns())
            .or_default()
            .extend(w.group.distinct_event_ids());
    }
    let mut loaded: HashMap<Vec<String>, Result<HashMap<EventId, Event>, String>> = HashMap::new();
    for (cols, ids) in wanted {
        let ids: Vec<EventId> = ids.into_iter().collect();
        let result = match columns.load(tx, &ids, &cols).await {
            Ok(events) => Ok(events.into_iter().map(|e| (e.id, e)).collect()),
            // Found before any SQL ran: only the groups of this format fail.
            Err(EventError::UnknownColumn(c)) => Err(c),
            Err(e) => return Err(e.into()),
        };
        loaded.insert(cols, result);
    }
    works.retain_mut(|w| match &loaded[&w.plan.event_columns()] {
        Ok(by_id) => {
            // Ascending by id, as a group alone loads them.
            w.events = w
                .group
                .distinct_event_ids()
                .iter()
                .filter_map(|id| by_id.get(id).cloned())
                .collect();
            true
        }
        Err(c) => {
            fates[w.slot] = Fate::Done(Err(EventError::UnknownColumn(c.clone()).into()));
            false
        }
    });
    Ok(())
}

fn render(p: &Pipeline, w: &Work<'_>, tickets: &[Ticket]) -> Result<Vec<Notification>, GroupError> {
    w.plan
        .render(&RenderContext {
            group: w.group,
            events: &w.events,
            tickets,
            templates: &p.templates,
            config: &p.config,
        })
        .map_err(|source| GroupError::Render {
            format: w.plan.format_name().to_string(),
            source,
        })
}

type Built = Vec<(usize, Result<Vec<Mail>, MailError>)>;

/// MIME + signature for every group's notifications, all of the batch's
/// mails spread over the signing pool together; a group whose mail cannot
/// be built fails alone.
async fn build(
    p: &Pipeline,
    rendered: Vec<(usize, Vec<Notification>)>,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Built, GroupError> {
    let mut shape = Vec::with_capacity(rendered.len());
    let mut all = Vec::new();
    let mut tickets = Vec::new();
    for (i, ns) in rendered {
        shape.push((i, ns.len()));
        tickets.extend(ns.iter().map(|n| n.ticket.clone()));
        all.extend(ns);
    }
    let built = super::signing::build_all(&p.mail_ctx, p.signer.as_ref(), now, all)
        .await
        .map_err(|e| GroupError::Join(e.to_string()))?;
    let mut built = built.into_iter().zip(tickets);
    Ok(shape
        .into_iter()
        .map(|(i, n)| {
            let mails = built
                .by_ref()
                .take(n)
                .map(|(mail, ticket)| mail.map(|mail| Mail { mail, ticket }))
                .collect::<Vec<_>>()
                .into_iter()
                .collect::<Result<Vec<_>, _>>();
            (i, mails)
        })
        .collect())
}

/// Hands the mails to SMTP group by group. Returns the outbox ids SMTP
/// accepted and the slots of the groups that have accepted mails (whose
/// fate depends on recording them). Sets every sending group's fate.
async fn send(
    p: &Pipeline,
    side: &Client,
    ready: &[Ready<'_>],
    fates: &mut [Fate],
    opts: RunOptions,
) -> (std::collections::HashSet<i64>, Vec<usize>) {
    let mut accepted_ids = std::collections::HashSet::new();
    let mut recorded = Vec::new();
    // After a failure of the relay itself the next mails would fail too:
    // the rest of the batch waits (as `retry`) rather than failing one by
    // one. A mail's own failure (see `SmtpError::is_relay_failure`) does
    // not hold back the others.
    // The cause, and whether it is temporary (the service's backoff for
    // these groups follows the cause's).
    let mut stopped: Option<(String, bool)> = None;
    for r in ready {
        if let Some((why, temporary)) = &stopped {
            let _ = outbox::refused(side, &r.ids, outbox::State::Retry, "not attempted").await;
            let why = format!("not attempted after an earlier mail's failure: {why}");
            fates[r.slot] = Fate::Done(Err(GroupError::Smtp {
                relay: p.outbound.relay().to_string(),
                source: if *temporary {
                    SmtpError::RelayUnavailable(why)
                } else {
                    SmtpError::RelayRefused(why)
                },
            }));
            continue;
        }
        let mut accepted = 0usize;
        let mut failure = None;
        for (i, (m, id)) in r.mails.iter().zip(&r.ids).enumerate() {
            match p
                .outbound
                .send(&m.mail.envelope_from, &m.mail.envelope_to, &m.mail.bytes)
                .await
            {
                Ok(refused) => {
                    accepted += 1;
                    accepted_ids.insert(*id);
                    let s = Send::built(*id, &m.mail, &m.ticket, &r.marks[i]);
                    note_accepted(p, r.group, &s, &refused, opts);
                }
                Err(source) => {
                    record_refusal(p, side, &r.ids[i..], &source).await;
                    if source.is_relay_failure() {
                        stopped = Some((source.to_string(), source.is_temporary()));
                    }
                    failure = Some(source);
                    break;
                }
            }
        }
        if accepted > 0 {
            recorded.push(r.slot);
        }
        fates[r.slot] = Fate::Done(match failure {
            None => Ok(GroupOutcome::Sent { mails: accepted }),
            Some(source) => {
                let err = GroupError::Smtp {
                    relay: p.outbound.relay().to_string(),
                    source,
                };
                if accepted > 0 {
                    Err(GroupError::Partial {
                        sent: accepted,
                        source: Box::new(err),
                    })
                } else {
                    Err(err)
                }
            }
        });
    }
    (accepted_ids, recorded)
}
