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
//! [`pipeline::batch`]. What the loop knows between wake-ups (the queue,
//! the groups in flight and held off, the database backoff) and what it
//! decides from it live in `scheduler`; this module keeps start-up,
//! signals, reload and shutdown.
//!
//! SIGHUP loads the configuration, formats, templates and key anew; if any
//! of it is broken the ERROR says why and the old configuration keeps
//! running. Groups in flight finish with the configuration they started
//! with. SIGTERM/SIGINT stop dispatching, wait up to
//! `mailgend.shutdown_deadline` for groups in flight, abandon the rest (their
//! transactions roll back; the directives stay pending) and return.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use signal_hook::consts::signal::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_tokio::Signals;
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use super::metrics::Metrics;
use crate::config::{Config, ConfigSource};
use crate::notify::db;
use crate::notify::db::wakeup::{self, Wakeup};
use crate::notify::pipeline::pool::{Pool, PoolOptions, Source};
use crate::notify::pipeline::{self, Pipeline, RunOptions};
use scheduler::Scheduler;

mod scheduler;
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

    let watchdog_every = systemd::watchdog_interval().unwrap_or(Duration::from_secs(3600));
    let mut watchdog = tokio::time::interval(watchdog_every);
    let mut scheduler = Scheduler::new(
        sched_client,
        current.clone(),
        metrics.clone(),
        feeder,
        workers,
        config.service.sweep_interval,
    );

    loop {
        scheduler.scan().await;
        scheduler.dispatch().await;
        let wake_at = scheduler.next_wake();
        tokio::select! {
            Some(w) = wake_rx.recv() => {
                match w {
                    Wakeup::Inserted => debug!("directives inserted"),
                    Wakeup::Connected => debug!("notification connection ready; rescanning"),
                    Wakeup::Lost => metrics.db_error(),
                }
                scheduler.want_scan();
            }
            Some(done) = results.recv() => scheduler.on_done(done),
            _ = tokio::time::sleep_until(wake_at) => scheduler.want_scan(),
            _ = watchdog.tick() => systemd::watchdog(),
            Some(sig) = signals.next() => {
                match sig {
                    SIGHUP => {
                        reload(&source, &current, &metrics).await;
                        scheduler.on_reload();
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
    scheduler.stop_dispatching();
    listener.abort();
    let deadline = snapshot(&current).config.service.shutdown_deadline;
    let waited = tokio::time::timeout(deadline, async {
        while let Some(done) = results.recv().await {
            scheduler.on_done(done);
        }
    })
    .await;
    if waited.is_err() {
        warn!(
            groups = scheduler.in_flight(),
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
