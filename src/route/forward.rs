//! Carrying out a routing decision: outbound SMTP through the shared
//! [`Outbound`] and Slack posts, at once while the client waits, and the
//! hand-over of whatever could not be done yet to the spool.
//!
//! [`Dispatcher`] is what the SMTP server calls for each message. Its rule:
//! the client hears 250 only when every job is done or durably spooled.
//!
//! - all jobs done → `250`;
//! - some failed temporarily (4xx, relay unreachable, Slack 5xx) → the rest
//!   is spooled (fsynced) → `250`, the retry worker ([`super::retry`])
//!   takes over;
//! - nothing done and everything refused for good (5xx) → a `554` with the
//!   remote reason, so the client's MTA bounces and nothing is lost;
//! - some done, some refused for good → `250` (a 5xx would make the client
//!   send it again to those that have it) and a bounce to the envelope
//!   sender is spooled;
//! - the spool cannot be written → `451`, the client tries again.
//!
//! While the spool holds work, new messages go to the spool first so the
//! worker delivers in arrival order.

use std::sync::Arc;

use futures::future::{join_all, BoxFuture};
use tokio::sync::{Notify, Semaphore};
use tracing::{error, info, warn};

use super::metrics::{FailureKind, RouteMetrics};
use super::server::{Accept, Reply};
use super::spool::{Entry, Job, Recipient, Spool, State};
use super::{Inbound, Routing, SlackPost, SlackStyle};
use crate::shared::smtp::{Outbound, SmtpError};

/// Why a job did not get done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Try again later.
    Temporary(String),
    /// Retrying will not help.
    Permanent(String),
}

impl Failure {
    fn from_smtp(e: &SmtpError) -> Failure {
        if e.is_temporary() {
            Failure::Temporary(e.to_string())
        } else {
            Failure::Permanent(e.to_string())
        }
    }

    pub fn text(&self) -> &str {
        match self {
            Failure::Temporary(t) | Failure::Permanent(t) => t,
        }
    }
}

/// Posts to Slack (implemented by the service for the configured client;
/// a trait so this module does not depend on how the client is built).
pub trait PostSlack: Send + Sync + 'static {
    fn post<'a>(&'a self, post: &'a SlackPost) -> BoxFuture<'a, Result<(), Failure>>;
}

/// Decides what to do with a message (the router; a trait so the protocol
/// side is tested and benchmarked on its own).
pub trait Decide: Send + Sync + 'static {
    fn route<'a>(&'a self, message: &'a Inbound) -> BoxFuture<'a, Routing>;

    /// Why the decision must wait (a manager does not know enough yet, see
    /// `Manager::holds`); the message is then held in the spool and
    /// routed by the worker later.
    fn holds(&self, _message: &Inbound) -> Option<String> {
        None
    }
}

/// The outbound side: relay, Slack, concurrency bound.
pub struct Forwarder {
    outbound: Outbound,
    slack: Option<Arc<dyn PostSlack>>,
    /// Bounds concurrent outbound transactions (`outbound_connections`).
    permits: Semaphore,
    /// Our name, for bounces.
    pub hostname: String,
    metrics: Arc<RouteMetrics>,
}

impl Forwarder {
    pub fn new(
        outbound: Outbound,
        slack: Option<Arc<dyn PostSlack>>,
        connections: u32,
        hostname: String,
        metrics: Arc<RouteMetrics>,
    ) -> Forwarder {
        Forwarder {
            outbound,
            slack,
            permits: Semaphore::new(connections.max(1) as usize),
            hostname,
            metrics,
        }
    }

    pub fn relay(&self) -> &str {
        self.outbound.relay()
    }

    /// Sends to the still pending recipients of a mail job; per recipient.
    async fn mail(
        &self,
        from: Option<&str>,
        to: &[String],
        body: &[u8],
    ) -> Result<Vec<Result<(), Failure>>, (Failure, bool)> {
        let _permit = self.permits.acquire().await.expect("never closed");
        match self.outbound.send_each(from, to, body).await {
            Ok(results) => Ok(results
                .iter()
                .map(|r| r.as_ref().map_err(Failure::from_smtp).copied())
                .collect()),
            // The relay did not answer at all: not worth trying more now.
            Err(e) => Err((
                Failure::from_smtp(&e),
                matches!(e, SmtpError::Unreachable(_) | SmtpError::Connection(_)),
            )),
        }
    }

    async fn slack(&self, channel: &str, style: &str, text: &str) -> Result<(), Failure> {
        let Some(poster) = &self.slack else {
            return Err(Failure::Permanent(
                "no Slack client configured (slack-token)".into(),
            ));
        };
        let post = SlackPost {
            channel: channel.to_string(),
            style: if style == "full" {
                SlackStyle::Full
            } else {
                SlackStyle::Brief
            },
            text: text.to_string(),
        };
        poster.post(&post).await
    }

    /// Tries every pending job of `entry` once, concurrently, and records
    /// the results in it. Returns the failures seen (for logs) and whether
    /// the relay looked down (nothing else is worth trying now).
    pub async fn attempt(&self, entry: &mut Entry) -> Attempt {
        let bodies = entry.bodies.clone();
        let work = entry.jobs.iter().map(|job| {
            let bodies = &bodies;
            async move {
                match job {
                    Job::Mail {
                        mail_from,
                        body,
                        recipients,
                        ..
                    } => {
                        let to: Vec<String> = recipients
                            .iter()
                            .filter(|r| r.state == State::Pending)
                            .map(|r| r.address.clone())
                            .collect();
                        if to.is_empty() {
                            return Outcome::Nothing;
                        }
                        Outcome::Mail(
                            to.clone(),
                            self.mail(mail_from.as_deref(), &to, &bodies[*body]).await,
                        )
                    }
                    Job::Slack {
                        channel,
                        style,
                        text,
                        state: State::Pending,
                        ..
                    } => Outcome::Slack(self.slack(channel, style, text).await),
                    Job::Slack { .. } | Job::Route { .. } => Outcome::Nothing,
                }
            }
        });
        let outcomes = join_all(work).await;
        let mut attempt = Attempt::default();
        for (job, outcome) in entry.jobs.iter_mut().zip(outcomes) {
            match (job, outcome) {
                (
                    Job::Mail {
                        recipients, bounce, ..
                    },
                    Outcome::Mail(to, result),
                ) => {
                    for (i, address) in to.iter().enumerate() {
                        let r = match &result {
                            Ok(each) => each[i].clone(),
                            Err((f, _)) => Err(f.clone()),
                        };
                        let rec = recipients
                            .iter_mut()
                            .find(|x| &x.address == address && x.state == State::Pending)
                            .expect("attempted recipients come from the job");
                        attempt.record(&r, address);
                        match &r {
                            Ok(()) => {
                                self.metrics.relay_delivered();
                                if *bounce {
                                    self.metrics.bounce_sent();
                                }
                            }
                            Err(Failure::Temporary(_)) => {
                                self.metrics.relay_failed(FailureKind::Temporary)
                            }
                            Err(Failure::Permanent(_)) => {
                                self.metrics.relay_failed(FailureKind::Permanent)
                            }
                        }
                        apply(&mut rec.state, &mut rec.error, r);
                    }
                    if let Err((_, true)) = &result {
                        attempt.relay_down = true;
                    }
                }
                (
                    Job::Slack {
                        state,
                        error,
                        channel,
                        ..
                    },
                    Outcome::Slack(r),
                ) => {
                    attempt.record(&r, &format!("Slack {channel}"));
                    self.metrics.slack_post(r.is_ok());
                    apply(state, error, r);
                }
                _ => {}
            }
        }
        attempt
    }
}

/// Records one result in a job's state.
fn apply(state: &mut State, error: &mut Option<String>, r: Result<(), Failure>) {
    match r {
        Ok(()) => {
            *state = State::Done;
            *error = None;
        }
        Err(Failure::Temporary(t)) => *error = Some(t),
        Err(Failure::Permanent(t)) => {
            *state = State::Failed;
            *error = Some(t);
        }
    }
}

enum Outcome {
    Nothing,
    /// Recipients tried; per-recipient results, or why none got it (and
    /// whether the relay looked down).
    Mail(
        Vec<String>,
        Result<Vec<Result<(), Failure>>, (Failure, bool)>,
    ),
    Slack(Result<(), Failure>),
}

/// What one round of attempts did.
#[derive(Debug, Default)]
pub struct Attempt {
    pub done: usize,
    pub temporary: Vec<(String, String)>,
    pub permanent: Vec<(String, String)>,
    pub relay_down: bool,
}

impl Attempt {
    fn record(&mut self, r: &Result<(), Failure>, what: &str) {
        match r {
            Ok(()) => self.done += 1,
            Err(Failure::Temporary(t)) => self.temporary.push((what.to_string(), t.clone())),
            Err(Failure::Permanent(t)) => self.permanent.push((what.to_string(), t.clone())),
        }
    }
}

/// Turns a routing decision into a spool entry with everything pending.
pub fn entry_for(message: &Inbound, routing: &Routing) -> Entry {
    let mut bodies: Vec<Arc<Vec<u8>>> = Vec::new();
    let mut jobs = Vec::new();
    for d in &routing.deliveries {
        // Deliveries usually share one body (Arc): store it once.
        let body = match bodies
            .iter()
            .position(|b| Arc::ptr_eq(b, &d.data) || **b == *d.data)
        {
            Some(i) => i,
            None => {
                bodies.push(d.data.clone());
                bodies.len() - 1
            }
        };
        jobs.push(Job::Mail {
            mail_from: d.mail_from.clone(),
            body,
            recipients: d
                .rcpt_to
                .iter()
                .map(|a| Recipient {
                    address: a.clone(),
                    state: State::Pending,
                    error: None,
                    reported: false,
                })
                .collect(),
            bounce: false,
        });
    }
    for p in &routing.slack {
        jobs.push(Job::Slack {
            channel: p.channel.clone(),
            style: match p.style {
                SlackStyle::Brief => "brief".into(),
                SlackStyle::Full => "full".into(),
            },
            text: p.text.clone(),
            state: State::Pending,
            error: None,
        });
    }
    Entry {
        received: chrono::Utc::now(),
        peer: message.envelope.peer.to_string(),
        envelope_from: message.envelope.mail_from.clone(),
        envelope_to: message.envelope.rcpt_to.clone(),
        jobs,
        attempts: 0,
        bodies,
    }
}

/// A spool entry for a message whose routing must wait: the message
/// itself and one pending [`Job::Route`].
pub fn held_entry(message: &Inbound) -> Entry {
    Entry {
        received: chrono::Utc::now(),
        peer: message.envelope.peer.to_string(),
        envelope_from: message.envelope.mail_from.clone(),
        envelope_to: message.envelope.rcpt_to.clone(),
        jobs: vec![Job::Route {
            body: 0,
            state: State::Pending,
        }],
        attempts: 0,
        bodies: vec![message.data.clone()],
    }
}

/// Replaces the pending [`Job::Route`] of a held entry by the jobs of the
/// decision (marking it done), sharing bodies where they are the same.
pub fn decide_held(entry: &mut Entry, message: &Inbound, routing: &Routing) {
    let decided = entry_for(message, routing);
    let offset = entry.bodies.len();
    entry.bodies.extend(decided.bodies);
    for job in decided.jobs {
        entry.jobs.push(match job {
            Job::Mail {
                mail_from,
                body,
                recipients,
                bounce,
            } => Job::Mail {
                mail_from,
                body: body + offset,
                recipients,
                bounce,
            },
            other => other,
        });
    }
    for job in &mut entry.jobs {
        if let Job::Route { state, .. } = job {
            *state = State::Done;
        }
    }
}

/// Adds a bounce job for the recipients that failed for good and have not
/// been reported yet (marking them reported). No bounce for the null
/// sender or for a failed bounce; those are only logged.
pub fn add_bounce(entry: &mut Entry, hostname: &str) -> bool {
    let mut refused = Vec::new();
    let mut original: Option<usize> = None;
    for job in &mut entry.jobs {
        if let Job::Mail {
            recipients,
            bounce: false,
            body,
            ..
        } = job
        {
            for r in recipients.iter_mut() {
                if r.state == State::Failed && !r.reported {
                    refused.push(super::bounce::Refused {
                        recipient: r.address.clone(),
                        reason: r.error.clone().unwrap_or_default(),
                    });
                    r.reported = true;
                    original.get_or_insert(*body);
                }
            }
        }
    }
    let Some(sender) = entry.envelope_from.clone() else {
        return false;
    };
    let Some(original) = original else {
        return false;
    };
    let report = super::bounce::build(
        hostname,
        &sender,
        &entry.bodies[original],
        &refused,
        entry.received,
    );
    entry.bodies.push(Arc::new(report));
    entry.jobs.push(Job::Mail {
        mail_from: None,
        body: entry.bodies.len() - 1,
        recipients: vec![Recipient {
            address: sender,
            state: State::Pending,
            error: None,
            reported: false,
        }],
        bounce: true,
    });
    true
}

/// The spool and the worker's doorbell.
pub struct Queue {
    pub spool: Spool,
    /// Rung when an entry is added.
    pub added: Notify,
    /// Entries in the spool (to keep arrival order while it has work).
    pub backlog: std::sync::atomic::AtomicUsize,
}

impl Queue {
    pub fn new(spool: Spool, existing: usize) -> Queue {
        Queue {
            spool,
            added: Notify::new(),
            backlog: std::sync::atomic::AtomicUsize::new(existing),
        }
    }

    fn has_backlog(&self) -> bool {
        self.backlog.load(std::sync::atomic::Ordering::SeqCst) > 0
    }

    /// Stores an entry durably under `id` and wakes the worker.
    pub async fn store(
        self: &Arc<Self>,
        id: &str,
        entry: Entry,
    ) -> Result<String, super::spool::SpoolError> {
        let q = self.clone();
        let id = id.to_string();
        let id = tokio::task::spawn_blocking(move || q.spool.store_as(&id, &entry).map(|()| id))
            .await
            .expect("spool write panicked")?;
        self.backlog
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.added.notify_one();
        Ok(id)
    }
}

/// The server's [`Accept`]: decide, forward, spool, reply.
pub struct Dispatcher {
    pub router: Arc<dyn Decide>,
    pub forward: Arc<Forwarder>,
    pub queue: Arc<Queue>,
}

impl Accept for Dispatcher {
    fn accept(&self, message: Inbound) -> BoxFuture<'static, Reply> {
        let router = self.router.clone();
        let forward = self.forward.clone();
        let queue = self.queue.clone();
        Box::pin(async move { dispatch(&*router, &forward, &queue, message).await })
    }
}

async fn dispatch(
    router: &dyn Decide,
    forward: &Forwarder,
    queue: &Arc<Queue>,
    message: Inbound,
) -> Reply {
    let env = &message.envelope;
    let from = env.mail_from.as_deref().unwrap_or("<>");
    let size = message.data.len();
    let id = message.id.clone().unwrap_or_else(super::spool::new_id);
    if let Some(why) = router.holds(&message) {
        return match queue.store(&id, held_entry(&message)).await {
            Ok(id) => {
                info!(peer = %env.peer, from, rcpt = ?env.rcpt_to, size, spool_id = %id, "held: {why}");
                Reply::new(250, format!("2.0.0 Ok: queued as {id}"))
            }
            Err(e) => {
                error!("cannot spool a message: {e}");
                Reply::new(451, "4.3.0 Cannot queue the message now, try again later")
            }
        };
    }
    let routing = router.route(&message).await;
    let trace = routing.trace.join("; ");
    if routing.deliveries.is_empty() && routing.slack.is_empty() {
        info!(peer = %env.peer, from, rcpt = ?env.rcpt_to, size, "dropped: {trace}");
        return Reply::new(250, "2.0.0 Ok: no action for this message");
    }
    let mut entry = entry_for(&message, &routing);
    if queue.has_backlog() {
        // Keep arrival order behind what is waiting.
        return match queue.store(&id, entry).await {
            Ok(id) => {
                info!(peer = %env.peer, from, rcpt = ?env.rcpt_to, size, spool_id = %id, "queued behind earlier mail: {trace}");
                Reply::new(250, format!("2.0.0 Ok: queued as {id}"))
            }
            Err(e) => {
                error!("cannot spool a message: {e}");
                Reply::new(451, "4.3.0 Cannot queue the message now, try again later")
            }
        };
    }
    let attempt = forward.attempt(&mut entry).await;
    if entry.is_finished() && attempt.permanent.is_empty() {
        info!(peer = %env.peer, from, rcpt = ?env.rcpt_to, size, "forwarded: {trace}");
        return Reply::new(250, "2.0.0 Ok: forwarded");
    }
    if attempt.done == 0 && attempt.temporary.is_empty() && !attempt.permanent.is_empty() {
        // Nobody has it and nobody will: the client's MTA bounces.
        let reasons: Vec<String> = attempt
            .permanent
            .iter()
            .map(|(what, why)| format!("{what}: {why}"))
            .collect();
        warn!(peer = %env.peer, from, rcpt = ?env.rcpt_to, "refused by the relay: {}", reasons.join("; "));
        return Reply::new(554, format!("5.0.0 Not delivered: {}", reasons.join("; ")));
    }
    for (what, why) in &attempt.permanent {
        error!(peer = %env.peer, from, recipient = %what, "refused for good: {why}");
    }
    add_bounce(&mut entry, &forward.hostname);
    if entry.is_finished() {
        // Only possible without a bounce (null sender): nothing to keep.
        info!(peer = %env.peer, from, rcpt = ?env.rcpt_to, size, "forwarded in part: {trace}");
        return Reply::new(250, "2.0.0 Ok: forwarded in part (see the router's log)");
    }
    match queue.store(&id, entry).await {
        Ok(id) => {
            for (what, why) in &attempt.temporary {
                warn!(spool_id = %id, recipient = %what, "will retry: {why}");
            }
            info!(peer = %env.peer, from, rcpt = ?env.rcpt_to, size, spool_id = %id, "queued for retry: {trace}");
            Reply::new(250, format!("2.0.0 Ok: queued as {id}"))
        }
        Err(e) => {
            error!(
                "cannot spool a message after a failed delivery: {e}; asking the client to \
                 retry (recipients that already have it may get it twice)"
            );
            Reply::new(451, "4.3.0 Cannot queue the message now, try again later")
        }
    }
}
