//! `mailgend run`: the always-on service.
//!
//! Owns the main loop and its shutdown. The loop waits for whichever comes
//! first: a database notification that directives were inserted
//! ([`crate::notify::db::wakeup`]), the moment the earliest postponed group becomes due
//! (computed from the formats' answers, not polled), a retry whose backoff
//! ran out, the slow safety sweep, a signal, or the systemd watchdog tick.
//! Then it rescans the pending groups and hands those not already in flight
//! to the worker pool ([`pipeline::pool`]) through its bounded channel: at
//! most `workers` groups are in flight, the rest wait in the scan's queue
//! (back-pressure, no unbounded growth). Each worker has its own database
//! connections (opened anew when they broke) and drives groups through
//! [`pipeline::process_group`] or, small ones together,
//! [`pipeline::batch`].
//!
//! SIGHUP loads the configuration, formats, templates and key anew; if any
//! of it is broken the ERROR says why and the old configuration keeps
//! running. Groups in flight finish with the configuration they started
//! with. SIGTERM/SIGINT stop dispatching, wait up to
//! `mailgend.shutdown_deadline` for groups in flight, abandon the rest (their
//! transactions roll back; the directives stay pending) and return.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;
use signal_hook::consts::signal::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_tokio::Signals;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use super::metrics::{FailReason, Metrics};
use crate::config::{Config, ConfigSource};
use crate::notify::db;
use crate::notify::db::wakeup::{self, Wakeup};
use crate::notify::directive::{self, Group, GroupKey};
use crate::notify::pipeline::pool::{Done, Pool, PoolOptions, Source, Work};
use crate::notify::pipeline::{self, GroupError, GroupOutcome, Pipeline, RunOptions};
use crate::shared::shutdown::ShutdownSignal;
use crate::shared::systemd;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("{0}")]
    Setup(#[from] pipeline::SetupError),
    #[error("cannot listen for metrics on {addr}: {source}")]
    MetricsBind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("signal handling: {0}")]
    Signals(std::io::Error),
    #[error(
        "the database lacks mailgend's tables (mailgend.outbox); run `mailgend db migrate` \
         as the database owner first"
    )]
    NotMigrated,
    #[error("database: {0}")]
    Db(#[from] db::DbError),
    #[error("database: {0}")]
    Query(#[from] tokio_postgres::Error),
}

/// The configuration in force; replaced as a whole by a reload.
type Current = Arc<RwLock<Arc<Pipeline>>>;

fn snapshot(c: &Current) -> Arc<Pipeline> {
    c.read().unwrap_or_else(|p| p.into_inner()).clone()
}

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

/// Runs the service until SIGTERM/SIGINT.
pub async fn run(source: ConfigSource, config: Arc<Config>) -> Result<(), ServiceError> {
    let metrics = Arc::new(Metrics::new());
    let signals = Signals::new([SIGHUP, SIGTERM, SIGINT]).map_err(ServiceError::Signals)?;
    let signals_handle = signals.handle();
    let mut signals = signals.fuse();

    // Configuration, formats, templates and the signing key first: a broken
    // setup must fail before we claim to be ready.
    let pipeline = load_pipeline(config.clone(), metrics.clone()).await?;
    let current: Current = Arc::new(RwLock::new(pipeline));

    // The endpoint before the database: while PostgreSQL is away at start,
    // scrapes show mailgend_up 0 and mailgend_database_up 0 rather than no
    // target at all.
    let stop = ShutdownSignal::new();
    if let Some(addr) = config.service.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| ServiceError::MetricsBind { addr, source })?;
        info!("metrics on http://{addr}/metrics");
        let shutdown = stop.subscribe().wait();
        let m = metrics.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::shared::metrics::serve(listener, m, shutdown).await {
                error!("metrics endpoint stopped: {e}");
            }
        });
    }

    // The database, with backoff: PostgreSQL may start after us.
    let mut sched = connect_with_backoff(&config, &metrics, &mut signals).await?;
    let Some(sched_client) = sched.take() else {
        info!("stopped before the database was reachable");
        return Ok(());
    };
    let mut sched_client = sched_client;
    let migrated: bool = sched_client
        .query_one("SELECT to_regclass('mailgend.outbox') IS NOT NULL", &[])
        .await?
        .get(0);
    if !migrated {
        return Err(ServiceError::NotMigrated);
    }

    let (wake_tx, mut wake_rx) = mpsc::channel(4);
    let listener = tokio::spawn(wakeup::listen(config.database.clone(), wake_tx));

    let workers = config.service.workers;
    let (feeder, mut results) = Pool::start(
        Source::Current(current.clone()),
        PoolOptions {
            workers,
            // Room for a burst's small groups to be gathered into batches.
            queue: workers * pipeline::batch::BATCH_GROUPS / 4,
            batches: true,
            run: RunOptions::default(),
            reconnect: true,
        },
    );

    metrics.set_up(true);
    metrics.config_reloaded();
    systemd::ready(&format!("sending; {workers} workers"));
    info!(workers, instance = %snapshot(&current).instance, "mailgend running");

    let mut queue: VecDeque<Group> = VecDeque::new();
    let mut in_flight: HashSet<GroupKey> = HashSet::new();
    // Groups a scan found pending while they were in flight: new directives
    // may have joined them, so their completion calls for a rescan.
    let mut seen_in_flight: HashSet<GroupKey> = HashSet::new();
    let mut hold: HashMap<GroupKey, HoldOff> = HashMap::new();
    // When each group was first dispatched since it last became due (for a
    // new group: when it was found; for a postponed one: when its wait
    // ended). Sending, postponing or handing it to another instance or the
    // operator ends the entry; failing keeps it, so its age says how late
    // the mail is (`mailgend_oldest_due_group_age_seconds`).
    let mut due_since: HashMap<GroupKey, Instant> = HashMap::new();
    let mut scan_wanted = true;
    let mut db_backoff = Duration::from_secs(1);
    let sweep = config.service.sweep_interval;
    let mut next_sweep = Instant::now() + sweep;
    let watchdog_every = systemd::watchdog_interval().unwrap_or(Duration::from_secs(3600));
    let mut watchdog = tokio::time::interval(watchdog_every);
    let mut retry_db_at: Option<Instant> = None;
    let mut next_purge = Instant::now();

    loop {
        // Rescan when something may have changed and the last scan's queue
        // is used up (a long queue is worked off first).
        if scan_wanted && queue.is_empty() && retry_db_at.is_none_or(|t| t <= Instant::now()) {
            let p = snapshot(&current);
            if sched_client.is_closed() {
                match db::connect(&p.config.database).await {
                    Ok(c) => sched_client = c,
                    Err(e) => {
                        metrics.db_error();
                        metrics.set_database_up(false);
                        warn!("database unreachable: {e}; retrying in {db_backoff:?}");
                        retry_db_at = Some(Instant::now() + db_backoff);
                        db_backoff = (db_backoff * 2).min(Duration::from_secs(30));
                    }
                }
            }
            if !sched_client.is_closed() {
                match scan(&sched_client, &p, &in_flight, &mut hold, &metrics).await {
                    Ok((groups, busy)) => {
                        metrics.set_database_up(true);
                        // Forget groups that are no longer pending (sent,
                        // possibly by another instance).
                        let pending: HashSet<&GroupKey> = groups
                            .iter()
                            .map(|g| &g.key)
                            .chain(&busy)
                            .chain(hold.keys())
                            .collect();
                        due_since.retain(|k, _| pending.contains(k));
                        if Instant::now() >= next_purge {
                            // Records of mails sent more than 30 days ago.
                            match crate::notify::outbox::purge(&sched_client, 30).await {
                                Ok(n) if n > 0 => debug!(rows = n, "purged old outbox records"),
                                Ok(_) => {}
                                Err(e) => warn!("purging old outbox records: {e}"),
                            }
                            next_purge = Instant::now() + Duration::from_secs(3600);
                        }
                        queue = groups;
                        seen_in_flight.extend(busy);
                        scan_wanted = false;
                        retry_db_at = None;
                        db_backoff = Duration::from_secs(1);
                        next_sweep = Instant::now() + p.config.service.sweep_interval;
                    }
                    Err(e) => {
                        metrics.db_error();
                        metrics.set_database_up(false);
                        warn!(
                            "scanning pending directives failed: {e}; retrying in {db_backoff:?}"
                        );
                        retry_db_at = Some(Instant::now() + db_backoff);
                        db_backoff = (db_backoff * 2).min(Duration::from_secs(30));
                    }
                }
            }
        }
        // Hand out work while workers are free.
        while in_flight.len() < workers {
            let Some(group) = queue.pop_front() else {
                break;
            };
            if in_flight.contains(&group.key) {
                continue;
            }
            in_flight.insert(group.key.clone());
            due_since
                .entry(group.key.clone())
                .or_insert_with(Instant::now);
            if !feeder.send(Work { slot: 0, group }).await {
                break;
            }
        }
        metrics.set_due_groups((queue.len() + in_flight.len()) as i64);
        metrics.set_oldest_due_group_age(
            due_since
                .values()
                .min()
                .map_or(Duration::ZERO, |t| t.elapsed()),
        );

        // The next moment something becomes due: computed, not polled.
        let now = Instant::now();
        let mut wake_at = next_sweep;
        for t in retry_db_at
            .into_iter()
            .chain(hold.values().map(|h| h.until).filter(|t| *t > now))
        {
            wake_at = wake_at.min(t);
        }

        tokio::select! {
            Some(w) = wake_rx.recv() => {
                match w {
                    Wakeup::Inserted => debug!("directives inserted"),
                    Wakeup::Connected => debug!("notification connection ready; rescanning"),
                    Wakeup::Lost => metrics.db_error(),
                }
                scan_wanted = true;
            }
            Some(done) = results.recv() => {
                in_flight.remove(&done.group.key);
                if done.result.is_ok() {
                    due_since.remove(&done.group.key);
                }
                if seen_in_flight.remove(&done.group.key) {
                    scan_wanted = true;
                }
                if handle_done(done, &mut hold, &metrics, sweep) {
                    scan_wanted = true;
                }
            }
            _ = tokio::time::sleep_until(wake_at) => {
                scan_wanted = true;
            }
            _ = watchdog.tick() => {
                systemd::watchdog();
            }
            Some(sig) = signals.next() => {
                match sig {
                    SIGHUP => {
                        reload(&source, &current, &metrics).await;
                        // New formats or templates may change every answer.
                        hold.clear();
                        scan_wanted = true;
                    }
                    _ => {
                        info!("stopping (signal {sig})");
                        break;
                    }
                }
            }
        }
    }

    // Shutdown: no new groups; let those in flight finish within the
    // deadline, then abandon them (their transactions roll back).
    systemd::stopping();
    metrics.set_up(false);
    drop(feeder);
    listener.abort();
    let deadline = snapshot(&current).config.service.shutdown_deadline;
    let waited = tokio::time::timeout(deadline, async {
        while let Some(done) = results.recv().await {
            in_flight.remove(&done.group.key);
            handle_done(done, &mut hold, &metrics, sweep);
        }
    })
    .await;
    if waited.is_err() {
        warn!(
            groups = in_flight.len(),
            "shutdown deadline of {deadline:?} reached; abandoning groups in flight \
             (they stay pending; a mail already handed to SMTP is in doubt and \
             handled on the next start)"
        );
        results.abort();
    }
    results.join().await;
    stop.trigger();
    signals_handle.close();
    info!("stopped");
    Ok(())
}

/// Loads formats, templates and the key for `config` (gpg may run: off the
/// async threads).
async fn load_pipeline(
    config: Arc<Config>,
    metrics: Arc<Metrics>,
) -> Result<Arc<Pipeline>, pipeline::SetupError> {
    tokio::task::spawn_blocking(move || Pipeline::load_with_metrics(config, metrics))
        .await
        .expect("pipeline loading panicked")
        .map(Arc::new)
}

/// Connects, retrying with backoff; `None` when a stop signal came first.
///
/// The configuration is good and the service is trying, so the first
/// failure already says READY=1 (with STATUS= saying why it waits): a
/// database that is down at boot must not make systemd time the start out
/// and loop through restarts. The watchdog is pinged meanwhile, also
/// during a connection attempt (several hosts may each take the connect
/// timeout).
async fn connect_with_backoff(
    config: &Config,
    metrics: &Metrics,
    signals: &mut futures::stream::Fuse<Signals>,
) -> Result<Option<tokio_postgres::Client>, ServiceError> {
    let mut delay = Duration::from_secs(1);
    let mut watchdog =
        tokio::time::interval(systemd::watchdog_interval().unwrap_or(Duration::from_secs(3600)));
    let mut said_ready = false;
    loop {
        let attempt = db::connect(&config.database);
        tokio::pin!(attempt);
        let result = loop {
            tokio::select! {
                r = &mut attempt => break r,
                _ = watchdog.tick() => systemd::watchdog(),
                Some(sig) = signals.next() => {
                    if sig != SIGHUP {
                        return Ok(None);
                    }
                }
            }
        };
        match result {
            Ok(c) => {
                metrics.set_database_up(true);
                return Ok(Some(c));
            }
            Err(e) => {
                metrics.db_error();
                metrics.set_database_up(false);
                warn!("database unreachable: {e}; retrying in {delay:?}");
                let text = format!("waiting for the database: {e}");
                if said_ready {
                    systemd::status(&text);
                } else {
                    systemd::ready(&text);
                    said_ready = true;
                }
            }
        }
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => break,
                _ = watchdog.tick() => systemd::watchdog(),
                Some(sig) = signals.next() => {
                    if sig != SIGHUP {
                        return Ok(None);
                    }
                }
            }
        }
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

/// Reads the pending groups and returns those to dispatch now.
async fn scan(
    client: &tokio_postgres::Client,
    p: &Pipeline,
    in_flight: &HashSet<GroupKey>,
    hold: &mut HashMap<GroupKey, HoldOff>,
    metrics: &Metrics,
) -> Result<(VecDeque<Group>, Vec<GroupKey>), directive::SelectError> {
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
    hold.retain(|k, _| present.contains(k));
    let (busy, free): (Vec<Group>, Vec<Group>) =
        groups.into_iter().partition(|g| in_flight.contains(&g.key));
    let queue: VecDeque<Group> = free
        .into_iter()
        .filter(|g| hold.get(&g.key).is_none_or(|h| h.until <= now))
        .collect();
    let busy = busy.into_iter().map(|g| g.key).collect();
    debug!(
        groups = queue.len(),
        pending_directives = pending,
        "scanned pending directives"
    );
    Ok((queue, busy))
}

/// Records what became of a group; returns true when groups were released
/// from a hold so that a rescan should pick them up now.
fn handle_done(
    done: Done,
    hold: &mut HashMap<GroupKey, HoldOff>,
    metrics: &Metrics,
    sweep: Duration,
) -> bool {
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
            // A mail went through: whatever made others fail temporarily
            // (an SMTP or database outage) is probably over; retry them now
            // instead of when their backoff ends.
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
        // Waits for `mailgend in-doubt`; the command's change is seen at the
        // next sweep or reload.
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
            // another mail gets through). A broken group (template, 5xx):
            // again every 15 min (or after a reload), so its ERROR stays
            // visible without flooding the log.
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

/// SIGHUP: everything is loaded anew; only a complete, valid set replaces
/// the running one.
async fn reload(source: &ConfigSource, current: &Current, metrics: &Arc<Metrics>) {
    systemd::reloading();
    info!("reloading configuration (SIGHUP)");
    let old = snapshot(current);
    let result = match Config::load(source) {
        Err(e) => Err(e.to_string()),
        Ok(config) => {
            for p in &config.unknown_keys {
                warn!("{p}");
            }
            if config.service.workers != old.config.service.workers
                || config.database != old.config.database
                || config.service.metrics_listen != old.config.service.metrics_listen
            {
                warn!(
                    "changes to mailgend.workers, mailgend.metrics_listen and the database \
                     connection take effect at the next restart"
                );
            }
            load_pipeline(Arc::new(config), metrics.clone())
                .await
                .map_err(|e| e.to_string())
        }
    };
    match result {
        Ok(p) => {
            crate::shared::logging::set_level(&p.config.logging_level, 0);
            *current.write().unwrap_or_else(|e| e.into_inner()) = p;
            metrics.config_reload(true);
            info!("configuration reloaded");
            systemd::ready("sending; configuration reloaded");
        }
        Err(e) => {
            metrics.config_reload(false);
            error!("configuration reload refused, the previous configuration stays in force: {e}");
            systemd::ready("sending; last reload refused (see log)");
        }
    }
}
