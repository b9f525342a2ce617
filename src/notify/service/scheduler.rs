//! The service's scheduling state and its decisions: which pending groups
//! are due, which are in flight or held off (postponed, failed, busy in
//! another instance, waiting for the operator), and when to look again.
//!
//! [`super::run`] owns the loop: it asks the scheduler to [`scan`] and
//! [`dispatch`], sleeps until [`next_wake`] or an event, and hands each
//! worker's result to [`on_done`]. The scheduler never waits for a worker:
//! at most `workers` groups are in flight and the pool's channel is at
//! least as wide, so a dispatch never waits for room.
//!
//! [`scan`]: Scheduler::scan
//! [`dispatch`]: Scheduler::dispatch
//! [`next_wake`]: Scheduler::next_wake
//! [`on_done`]: Scheduler::on_done

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::{snapshot, Current};
use crate::notify::db;
use crate::notify::directive::{self, Group, GroupKey};
use crate::notify::metrics::{FailReason, Metrics};
use crate::notify::pipeline::pool::{Done, Feeder, Work};
use crate::notify::pipeline::{self, GroupError, GroupOutcome, Pipeline};
use crate::shared::systemd;

/// The module the loop's lines were always logged under (operators filter
/// on it).
const TARGET: &str = "mailgend::notify::service";

/// Why and until when a pending group is not dispatched again: it was
/// postponed by its format, failed (backoff), is being sent by another
/// instance, or waits for the operator (in doubt).
struct HoldOff {
    /// Consecutive failures (for the backoff); 0 for the other reasons.
    failures: u32,
    /// The last failure may heal by itself (SMTP or database trouble).
    temporary: bool,
    until: Instant,
}

/// What the service knows about the pending groups between wake-ups.
pub(super) struct Scheduler {
    /// The connection that scans (the workers have their own).
    client: tokio_postgres::Client,
    current: Current,
    metrics: Arc<Metrics>,
    /// `None` once the service stops: no new groups.
    feeder: Option<Feeder>,
    workers: usize,
    /// The sweep interval the service started with: how long a group
    /// postponed without a date, or held, waits.
    sweep: Duration,
    /// Due groups of the last scan not yet handed to a worker.
    queue: VecDeque<Group>,
    in_flight: HashSet<GroupKey>,
    /// Groups a scan found pending while they were in flight: new
    /// directives may have joined them, so their completion calls for a
    /// rescan.
    seen_in_flight: HashSet<GroupKey>,
    hold: HashMap<GroupKey, HoldOff>,
    /// When each group was first dispatched since it last became due (for
    /// a new group: when it was found; for a postponed one: when its wait
    /// ended). Sending, postponing or handing it to another instance or the
    /// operator ends the entry; failing keeps it, so its age says how late
    /// the mail is (`mailgend_oldest_due_group_age_seconds`).
    due_since: HashMap<GroupKey, Instant>,
    scan_wanted: bool,
    db_backoff: Duration,
    next_sweep: Instant,
    retry_db_at: Option<Instant>,
    next_purge: Instant,
}

impl Scheduler {
    pub(super) fn new(
        client: tokio_postgres::Client,
        current: Current,
        metrics: Arc<Metrics>,
        feeder: Feeder,
        workers: usize,
        sweep: Duration,
    ) -> Scheduler {
        let now = Instant::now();
        Scheduler {
            client,
            current,
            metrics,
            feeder: Some(feeder),
            workers,
            sweep,
            queue: VecDeque::new(),
            in_flight: HashSet::new(),
            seen_in_flight: HashSet::new(),
            hold: HashMap::new(),
            due_since: HashMap::new(),
            scan_wanted: true,
            db_backoff: Duration::from_secs(1),
            next_sweep: now + sweep,
            retry_db_at: None,
            next_purge: now,
        }
    }

    /// Something may have changed: rescan once the queue is worked off.
    pub(super) fn want_scan(&mut self) {
        self.scan_wanted = true;
    }

    /// A reload: new formats or templates may change every answer, so
    /// nothing stays held off.
    pub(super) fn on_reload(&mut self) {
        self.hold.clear();
        self.scan_wanted = true;
    }

    /// Shutting down: no more groups for the workers, who end once they
    /// have finished theirs.
    pub(super) fn stop_dispatching(&mut self) {
        self.feeder = None;
    }

    /// Groups handed to workers and not yet reported back.
    pub(super) fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Rescans when something may have changed, the last scan's queue is
    /// used up (a long queue is worked off first) and no database retry
    /// is pending; reconnects the scanning connection when it broke.
    pub(super) async fn scan(&mut self) {
        // The safety sweep is due even when no timer fired for it (the
        // loop does not wake for past instants, see `next_wake`).
        if Instant::now() >= self.next_sweep {
            self.scan_wanted = true;
        }
        if !(self.scan_wanted
            && self.queue.is_empty()
            && self.retry_db_at.is_none_or(|t| t <= Instant::now()))
        {
            return;
        }
        let p = snapshot(&self.current);
        if self.client.is_closed() {
            match db::connect(&p.config.database).await {
                Ok(c) => self.client = c,
                Err(e) => {
                    let wait = self.on_db_error(&e);
                    warn!(target: TARGET, "database unreachable: {e}; retrying in {wait:?}");
                }
            }
        }
        if self.client.is_closed() {
            return;
        }
        match self.read_due(&p).await {
            Ok((groups, busy)) => {
                self.metrics.set_database_up(true);
                // Forget groups that are no longer pending (sent, possibly
                // by another instance).
                let pending: HashSet<&GroupKey> = groups
                    .iter()
                    .map(|g| &g.key)
                    .chain(&busy)
                    .chain(self.hold.keys())
                    .collect();
                self.due_since.retain(|k, _| pending.contains(k));
                if Instant::now() >= self.next_purge {
                    self.purge().await;
                }
                self.queue = groups;
                self.seen_in_flight.extend(busy);
                self.scan_wanted = false;
                self.retry_db_at = None;
                self.db_backoff = Duration::from_secs(1);
                self.next_sweep = Instant::now() + p.config.service.sweep_interval;
            }
            Err(e) => {
                let wait = self.on_db_error(&e);
                warn!(
                    target: TARGET,
                    "scanning pending directives failed: {e}; retrying in {wait:?}"
                );
            }
        }
    }

    /// The database failed: count it, say so to systemd (`systemctl
    /// status` would otherwise show the last scan's count for as long as
    /// the outage lasts; the next good scan replaces it), and retry with
    /// backoff (1 s doubling to 30 s). Returns the wait.
    fn on_db_error(&mut self, error: &dyn std::fmt::Display) -> Duration {
        self.metrics.db_error();
        self.metrics.set_database_up(false);
        systemd::status(&format!("waiting for the database: {error}"));
        let wait = self.db_backoff;
        self.retry_db_at = Some(Instant::now() + wait);
        self.db_backoff = (wait * 2).min(Duration::from_secs(30));
        wait
    }

    /// Records of mails sent more than 30 days ago, once an hour.
    async fn purge(&mut self) {
        match crate::notify::outbox::purge(&self.client, 30).await {
            Ok(n) if n > 0 => debug!(target: TARGET, rows = n, "purged old outbox records"),
            Ok(_) => {}
            Err(e) => warn!(target: TARGET, "purging old outbox records: {e}"),
        }
        self.next_purge = Instant::now() + Duration::from_secs(3600);
    }

    /// Reads the pending groups; returns those to dispatch now and those
    /// found pending while in flight.
    async fn read_due(
        &mut self,
        p: &Pipeline,
    ) -> Result<(VecDeque<Group>, Vec<GroupKey>), directive::SelectError> {
        let client = &self.client;
        let metrics = &self.metrics;
        let groups = directive::pending_groups(
            client,
            p.config.database.additional_directive_where.as_deref(),
        )
        .await?;
        let pending: usize = groups.iter().map(|g| g.directive_ids.len()).sum();
        metrics.set_pending_directives(pending as i64);
        // Open outbox rows: mails in flight, in doubt, held or waiting for a
        // retry. A failure here only costs the gauge.
        if let Ok(row) = client
            .query_one(
                "SELECT count(*) FROM mailgend.outbox WHERE state IN ('sending', 'retry', 'held')",
                &[],
            )
            .await
        {
            metrics.set_in_doubt(row.get(0));
        }
        systemd::status(&format!(
            "{pending} directives pending in {} groups",
            groups.len()
        ));
        let now = Instant::now();
        let present: HashSet<&GroupKey> = groups.iter().map(|g| &g.key).collect();
        // Forget groups that are gone (sent, possibly by another instance).
        self.hold.retain(|k, _| present.contains(k));
        let (busy, free): (Vec<Group>, Vec<Group>) = groups
            .into_iter()
            .partition(|g| self.in_flight.contains(&g.key));
        let queue: VecDeque<Group> = free
            .into_iter()
            .filter(|g| self.hold.get(&g.key).is_none_or(|h| h.until <= now))
            .collect();
        let busy = busy.into_iter().map(|g| g.key).collect();
        debug!(
            target: TARGET,
            groups = queue.len(),
            pending_directives = pending,
            "scanned pending directives"
        );
        Ok((queue, busy))
    }

    /// Hands queued groups to the pool while workers are free; updates the
    /// due-groups gauges.
    pub(super) async fn dispatch(&mut self) {
        while self.in_flight.len() < self.workers {
            let Some(group) = self.queue.pop_front() else {
                break;
            };
            if self.in_flight.contains(&group.key) {
                continue;
            }
            self.in_flight.insert(group.key.clone());
            self.due_since
                .entry(group.key.clone())
                .or_insert_with(Instant::now);
            let Some(feeder) = &self.feeder else { break };
            if !feeder.send(Work { slot: 0, group }).await {
                break;
            }
        }
        self.metrics
            .set_due_groups((self.queue.len() + self.in_flight.len()) as i64);
        self.metrics.set_oldest_due_group_age(
            self.due_since
                .values()
                .min()
                .map_or(Duration::ZERO, |t| t.elapsed()),
        );
    }

    /// The next moment something becomes due: the sweep, the end of the
    /// earliest hold, the database retry. Computed, not polled.
    pub(super) fn next_wake(&self) -> Instant {
        let now = Instant::now();
        // Only instants still ahead: one already past is due, and only a
        // queue not yet worked off (every worker busy) keeps its scan
        // from happening; a worker's result wakes the loop then. A past
        // instant here made `sleep_until` ready at once and the loop spin
        // a core for as long as the backlog lasted.
        self.retry_db_at
            .into_iter()
            .chain([self.next_sweep])
            .chain(self.hold.values().map(|h| h.until))
            .filter(|t| *t > now)
            .min()
            .unwrap_or(now + self.sweep)
    }

    /// A worker reported a group.
    pub(super) fn on_done(&mut self, done: Done) {
        let key = &done.group.key;
        self.in_flight.remove(key);
        if done.result.is_ok() {
            self.due_since.remove(key);
        }
        if self.seen_in_flight.remove(key) {
            self.scan_wanted = true;
        }
        if self.record(done) {
            self.scan_wanted = true;
        }
    }

    /// Records what became of a group (its hold and the metrics); returns
    /// true when groups were released from a hold so that a rescan should
    /// pick them up now.
    fn record(&mut self, done: Done) -> bool {
        let sweep = self.sweep;
        let hold = &mut self.hold;
        let metrics = &self.metrics;
        let mut released = false;
        let now = Instant::now();
        let key = done.group.key.clone();
        let prior_failures = hold.get(&key).map_or(0, |h| h.failures);
        let mut hold_for = |key: GroupKey, wait: Duration, failed: Option<bool>| {
            let entry = hold.entry(key).or_insert(HoldOff {
                failures: 0,
                temporary: false,
                until: now,
            });
            match failed {
                Some(temporary) => {
                    entry.failures += 1;
                    entry.temporary = temporary;
                }
                None => {
                    entry.failures = 0;
                    entry.temporary = false;
                }
            }
            entry.until = now + wait;
        };
        match done.result {
            Ok(GroupOutcome::Sent { .. }) => {
                hold.remove(&key);
                // A mail went through: whatever made others fail
                // temporarily (an SMTP or database outage) is probably
                // over; retry them now instead of when their backoff ends.
                for h in hold.values_mut().filter(|h| h.temporary) {
                    h.temporary = false;
                    h.until = h.until.min(now);
                    released = true;
                }
            }
            Ok(GroupOutcome::Postponed { until, .. }) => {
                metrics.group_postponed();
                // Until the format's rule stops holding (a little slack: the
                // database clock decides, and waking a hair early would only
                // postpone again); unknown: the next sweep.
                let wait = match until {
                    Some(until) => {
                        (until - Utc::now()).to_std().unwrap_or(Duration::ZERO)
                            + Duration::from_millis(20)
                    }
                    None => sweep,
                };
                hold_for(key, wait, None);
            }
            // Another instance is sending it: look again shortly (if that
            // instance dies, its claim is gone and we recover the group).
            Ok(GroupOutcome::Busy) => hold_for(key, Duration::from_secs(2), None),
            // Waits for `mailgend in-doubt`; the command's change is seen at
            // the next sweep or reload.
            Ok(GroupOutcome::Held) => hold_for(key, sweep.min(Duration::from_secs(60)), None),
            Err(e) => {
                pipeline::log_group_error(&done.group, &e);
                let reason = if e.is_temporary() {
                    FailReason::Temporary
                } else if matches!(
                    e,
                    GroupError::Render { .. }
                        | GroupError::NoFormat(..)
                        | GroupError::Rejected { .. }
                        | GroupError::Mail(_)
                ) {
                    FailReason::Render
                } else {
                    FailReason::Permanent
                };
                metrics.mail_failed(reason);
                let failures = prior_failures + 1;
                // Temporary trouble: 2 s doubling to 1 min (and at once when
                // another mail gets through). A broken group (template,
                // 5xx): again every 15 min (or after a reload), so its ERROR
                // stays visible without flooding the log.
                let temporary = e.is_temporary();
                let wait = if temporary {
                    Duration::from_secs(2u64.saturating_pow(failures).min(60))
                } else {
                    Duration::from_secs(900)
                };
                hold_for(key, wait, Some(temporary));
            }
        }
        released
    }
}
