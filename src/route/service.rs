//! `mailgend route`: the alert router's main loop and its shutdown.
//!
//! Start-up does everything that can fail before systemd hears READY: the
//! configuration, the router (managers, rules, GoCD polling), the TLS
//! certificate, the outbound client, the spool and the listening socket (a
//! taken port or a `local-smtp` that does not resolve is an error here).
//! Then the server accepts connections, the spool worker retries what is
//! queued, and the loop waits for signals and the watchdog tick.
//!
//! SIGHUP loads the file again and starts a new router; if anything is
//! wrong the ERROR says why and the old configuration keeps running.
//! Sessions already connected finish with the router and limits they
//! started with. A gocd manager whose GoCD is unchanged keeps what the old
//! one learnt (see `managers::gocd`). A new `local-smtp` (or
//! `metrics-listen`) is bound before anything is swapped, so a taken port
//! refuses the reload and leaves everything as it was; the old listener
//! then stops accepting and drains like at shutdown, while the new one
//! serves. `max-connections` is read per new connection, over all
//! listeners. Only `spool` needs a restart (a WARN says so): it holds
//! acknowledged mail. SIGTERM/SIGINT stop accepting, let sessions in
//! flight finish (an idle session hears 421) for up to
//! [`SHUTDOWN_DEADLINE`], let the spool worker finish its attempt, and
//! return; nothing acknowledged is lost, it is in the spool.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::StreamExt;
use signal_hook::consts::signal::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_tokio::Signals;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, error, info, warn};

use super::config::{self, RouteConfig, RouteConfigError};
use super::forward::{Decide, Dispatcher, Failure, Forwarder, PostSlack, Queue};
use super::metrics::{manager_labels, RouteMetrics};
use super::router::Router;
use super::server::{self, OpenConnections, Server, ServerError, SessionConfig};
use super::spool::{Spool, SpoolError};
use super::{retry, Inbound, Routing, SlackPost};
use crate::shared::metrics::Exposition;
use crate::shared::shutdown::ShutdownSignal;
use crate::shared::smtp::{Outbound, SmtpError};
use crate::shared::systemd;

/// How long SIGTERM waits for sessions in flight (systemd's
/// `TimeoutStopSec` in the shipped unit is longer).
pub const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum RouteServiceError {
    #[error("{0}")]
    Config(#[from] RouteConfigError),
    #[error("{0}")]
    Server(#[from] ServerError),
    #[error("{0}")]
    Spool(#[from] SpoolError),
    #[error("remote-smtp: {0}")]
    Outbound(#[from] SmtpError),
    #[error("signal handling: {0}")]
    Signals(std::io::Error),
    #[error("metrics-listen {addr:?}: {reason}")]
    Metrics { addr: String, reason: String },
    #[error("{0}")]
    Bounces(#[from] crate::route::verp::IntakeError),
}

impl Decide for Router {
    fn route<'a>(&'a self, message: &'a Inbound) -> BoxFuture<'a, Routing> {
        Box::pin(Router::route(self, message))
    }

    fn holds(&self, message: &Inbound) -> Option<String> {
        Router::holds(self, message)
    }
}

/// The configured Slack client as the forwarder's poster.
struct Slack(super::actions::slack::SlackClient);

impl PostSlack for Slack {
    fn post<'a>(&'a self, post: &'a SlackPost) -> BoxFuture<'a, Result<(), Failure>> {
        Box::pin(async move {
            super::actions::slack::post(&self.0, post)
                .await
                .map_err(|e| {
                    if e.is_temporary() {
                        Failure::Temporary(e.to_string())
                    } else {
                        Failure::Permanent(e.to_string())
                    }
                })
        })
    }
}

/// Everything a configuration version runs with.
struct Generation {
    cfg: RouteConfig,
    router: Arc<Router>,
    forward: Arc<Forwarder>,
    session: Arc<SessionConfig>,
}

fn hostname() -> String {
    crate::shared::smtp::host_name().unwrap_or_else(|| "localhost".to_string())
}

/// Builds a generation from a loaded configuration (no sockets bound).
/// `previous` is the router a reload replaces: its managers hand over
/// what still holds (GoCD pipeline states for an unchanged GoCD).
async fn generation(
    cfg: RouteConfig,
    queue: &Arc<Queue>,
    metrics: &Arc<RouteMetrics>,
    previous: Option<&Router>,
) -> Result<Generation, RouteServiceError> {
    let tls = match &cfg.server.tls {
        Some(files) => Some(server::tls_acceptor(files)?),
        None => None,
    };
    let outbound = Outbound::new(&cfg.remote_smtp, cfg.server.outbound_connections)?;
    let router = Arc::new(Router::start_with(&cfg, Some(metrics.clone()), previous).await?);
    let slack: Option<Arc<dyn PostSlack>> = router
        .slack()
        .cloned()
        .map(|c| Arc::new(Slack(c)) as Arc<dyn PostSlack>);
    let host = hostname();
    let forward = Arc::new(Forwarder::new(
        outbound,
        slack,
        cfg.server.outbound_connections,
        host.clone(),
        metrics.clone(),
    ));
    let bounces = match &cfg.server.bounces_config {
        Some(path) => {
            let intake = crate::route::verp::BounceIntake::load(path, Some(metrics.clone()))?;
            info!(address = %intake.base(), config = %path.display(), "taking bounces to VERP addresses");
            Some(Arc::new(intake))
        }
        None => None,
    };
    let session = Arc::new(SessionConfig {
        settings: Arc::new(cfg.server.clone()),
        accept: Arc::new(Dispatcher {
            router: router.clone(),
            forward: forward.clone(),
            queue: queue.clone(),
        }),
        tls,
        hostname: host,
        metrics: metrics.clone(),
        bounces,
    });
    Ok(Generation {
        cfg,
        router,
        forward,
        session,
    })
}

/// The SMTP listener in use: its accept loop and how to stop it.
struct Listening {
    /// What `local-smtp` resolved to (a reload compares with it).
    requested: SocketAddr,
    addr: SocketAddr,
    stop: ShutdownSignal,
    task: JoinHandle<JoinSet<()>>,
}

impl Listening {
    fn start(
        server: Server,
        config: watch::Receiver<Arc<SessionConfig>>,
        open: Arc<OpenConnections>,
    ) -> Listening {
        let stop = ShutdownSignal::new();
        let (requested, addr) = (server.requested_addr(), server.local_addr());
        let task = tokio::spawn(server.serve(config, open, stop.subscribe()));
        Listening {
            requested,
            addr,
            stop,
            task,
        }
    }

    /// Stops accepting; idle sessions hear 421 at once, a transaction in
    /// flight may finish within [`SHUTDOWN_DEADLINE`], then the rest is
    /// cut off.
    async fn drain(self) {
        self.stop.trigger();
        let mut sessions = match self.task.await {
            Ok(s) => s,
            Err(e) => {
                error!("the SMTP server task failed: {e}");
                JoinSet::new()
            }
        };
        let drained = tokio::time::timeout(SHUTDOWN_DEADLINE, async {
            while sessions.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            warn!(
                addr = %self.addr,
                sessions = sessions.len(),
                "drain deadline of {SHUTDOWN_DEADLINE:?} reached; closing sessions in flight \
                 (their clients did not get a 250 and will send again)"
            );
            sessions.abort_all();
            while sessions.join_next().await.is_some() {}
        }
    }
}

/// The `/metrics` endpoint in use.
struct MetricsEndpoint {
    /// What `metrics-listen` resolved to (a reload compares with it).
    requested: SocketAddr,
    stop: ShutdownSignal,
    task: JoinHandle<()>,
}

impl MetricsEndpoint {
    fn error(configured: &str, reason: String) -> RouteServiceError {
        RouteServiceError::Metrics {
            addr: configured.to_string(),
            reason,
        }
    }

    async fn resolve(configured: &str) -> Result<SocketAddr, RouteServiceError> {
        tokio::net::lookup_host(configured)
            .await
            .map_err(|e| Self::error(configured, format!("cannot resolve: {e}")))?
            .next()
            .ok_or_else(|| Self::error(configured, "resolves to no address".into()))
    }

    /// Resolves and binds `metrics-listen`; a taken port is an error.
    async fn bind(configured: &str) -> Result<(SocketAddr, TcpListener), RouteServiceError> {
        let addr = Self::resolve(configured).await?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| Self::error(configured, format!("cannot listen on {addr}: {e}")))?;
        Ok((addr, listener))
    }

    fn start(
        (requested, listener): (SocketAddr, TcpListener),
        page: Arc<Scrape>,
    ) -> MetricsEndpoint {
        let stop = ShutdownSignal::new();
        let addr = listener.local_addr().unwrap_or(requested);
        info!("metrics on http://{addr}/metrics");
        let shutdown = stop.subscribe().wait();
        let task = tokio::spawn(async move {
            if let Err(e) = crate::shared::metrics::serve(listener, page, shutdown).await {
                error!("the metrics endpoint stopped: {e}");
            }
        });
        MetricsEndpoint {
            requested,
            stop,
            task,
        }
    }

    async fn stop(self) {
        self.stop.trigger();
        let _ = self.task.await;
    }
}

/// What `/metrics` shows: the counters, plus the gauges read at scrape
/// time from the spool directory, the open connections and the running
/// router's GoCD sources.
struct Scrape {
    metrics: Arc<RouteMetrics>,
    queue: Arc<Queue>,
    open: Arc<OpenConnections>,
    router: std::sync::Mutex<Arc<Router>>,
}

impl Exposition for Scrape {
    fn render(&self) -> BoxFuture<'_, String> {
        Box::pin(async move {
            let q = self.queue.clone();
            // The directory is the truth (the worker's count lags a pass).
            let listed = tokio::task::spawn_blocking(move || q.spool.list()).await;
            match listed {
                Ok(Ok(ids)) => {
                    let age = ids
                        .first()
                        .and_then(|id| Spool::arrival(id))
                        .map_or(0.0, |t| {
                            (chrono::Utc::now() - t).num_milliseconds() as f64 / 1000.0
                        });
                    self.metrics.set_spool(ids.len(), age);
                }
                // The gauges keep their last values; the worker logs why.
                Ok(Err(e)) => debug!("metrics: cannot list the spool: {e}"),
                Err(e) => debug!("metrics: spool listing failed: {e}"),
            }
            self.metrics.set_connections_open(self.open.get());
            let router = self.router.lock().expect("not poisoned").clone();
            let gocd: Vec<_> = router
                .managers()
                .iter()
                .filter_map(|m| {
                    m.gocd().map(|src| {
                        (
                            manager_labels(m.config()),
                            src.since_last_success().as_secs_f64(),
                            src.pipelines_known(),
                        )
                    })
                })
                .collect();
            self.metrics.set_gocd(&gocd);
            self.metrics.render()
        })
    }
}

/// One WARN per oddity of the file (what mail2alert ran with and we run
/// with the same way; `--check --strict` refuses them).
fn warn_oddities(cfg: &RouteConfig) {
    for w in &cfg.warnings {
        warn!("configuration accepted as mail2alert accepted it: {w}");
    }
    for w in &cfg.exposed_secrets {
        warn!("a file with a secret is readable by others: {w}");
    }
}

/// Runs the router until SIGTERM/SIGINT.
pub async fn run(path: &Path) -> Result<(), RouteServiceError> {
    let signals = Signals::new([SIGHUP, SIGTERM, SIGINT]).map_err(RouteServiceError::Signals)?;
    let signals_handle = signals.handle();
    let mut signals = signals.fuse();

    let cfg = config::load(path)?;
    warn_oddities(&cfg);
    let spool = Spool::open(&cfg.server.spool_dir)?;
    let waiting = spool.list()?.len();
    let queue = Arc::new(Queue::new(spool, waiting));
    let server = Server::bind(&cfg.local_smtp).await?;
    let metrics_listener = match &cfg.server.metrics_listen {
        Some(a) => Some(MetricsEndpoint::bind(a).await?),
        None => None,
    };
    let metrics = Arc::new(RouteMetrics::new());
    let mut current = generation(cfg, &queue, &metrics, None).await?;
    let open = Arc::new(OpenConnections::default());
    let scrape = Arc::new(Scrape {
        metrics: metrics.clone(),
        queue: queue.clone(),
        open: open.clone(),
        router: std::sync::Mutex::new(current.router.clone()),
    });
    let mut metrics_endpoint =
        metrics_listener.map(|bound| MetricsEndpoint::start(bound, scrape.clone()));

    let (session_tx, session_rx) = watch::channel(current.session.clone());
    let (forward_tx, forward_rx) = watch::channel(current.forward.clone());
    let stop = ShutdownSignal::new();
    let mut listening = Listening::start(server, session_rx.clone(), open.clone());
    // Listeners given up by a reload, finishing their sessions.
    let mut draining: JoinSet<()> = JoinSet::new();
    let (router_tx, router_rx) = watch::channel(current.router.clone() as Arc<dyn Decide>);
    let worker = tokio::spawn(retry::run(
        queue.clone(),
        forward_rx,
        router_rx,
        stop.subscribe(),
    ));

    let status = |addr: SocketAddr, g: &Generation| {
        format!(
            "routing on {addr} to {}; {waiting} spooled at start",
            g.forward.relay()
        )
    };
    systemd::ready(&status(listening.addr, &current));
    info!(
        addr = %listening.addr,
        relay = current.forward.relay(),
        config = %path.display(),
        spooled = waiting,
        "mailgend route running"
    );

    let watchdog_every = systemd::watchdog_interval().unwrap_or(Duration::from_secs(3600));
    let mut watchdog = tokio::time::interval(watchdog_every);
    loop {
        tokio::select! {
            _ = watchdog.tick() => systemd::watchdog(),
            Some(_) = draining.join_next(), if !draining.is_empty() => {}
            Some(sig) = signals.next() => {
                if sig != SIGHUP {
                    info!("stopping (signal {sig})");
                    break;
                }
                systemd::reloading();
                let metrics_at = metrics_endpoint.as_ref().map(|m| m.requested);
                match reload(path, &current, listening.requested, metrics_at, &queue, &metrics).await {
                    Ok(next) => {
                        let old = std::mem::replace(&mut current, next.generation);
                        session_tx.send_replace(current.session.clone());
                        forward_tx.send_replace(current.forward.clone());
                        router_tx.send_replace(current.router.clone() as Arc<dyn Decide>);
                        *scrape.router.lock().expect("not poisoned") = current.router.clone();
                        if let Some(server) = next.server {
                            let moved = std::mem::replace(
                                &mut listening,
                                Listening::start(server, session_rx.clone(), open.clone()),
                            );
                            info!(from = %moved.addr, to = %listening.addr, "local-smtp moved; the old listener finishes its sessions");
                            draining.spawn(moved.drain());
                        }
                        if let Some(change) = next.metrics {
                            if let Some(old) = metrics_endpoint.take() {
                                old.stop().await;
                            }
                            metrics_endpoint = change
                                .map(|bound| MetricsEndpoint::start(bound, scrape.clone()));
                        }
                        // Its GoCD polling stops; sessions that still hold
                        // it finish with what it knows.
                        old.router.shutdown();
                        metrics.reload(true);
                        info!(config = %path.display(), "configuration reloaded");
                    }
                    Err(e) => {
                        metrics.reload(false);
                        error!(
                            config = %path.display(),
                            "reload refused, the previous configuration stays in force: {e}"
                        );
                    }
                }
                systemd::ready(&status(listening.addr, &current));
            }
        }
    }

    // Shutdown: stop accepting; idle sessions hear 421, transactions in
    // flight get the deadline to finish (on every listener).
    systemd::stopping();
    stop.trigger();
    draining.spawn(listening.drain());
    while draining.join_next().await.is_some() {}
    // The worker ends after its current attempt (progress is recorded).
    if tokio::time::timeout(SHUTDOWN_DEADLINE, worker)
        .await
        .is_err()
    {
        warn!("the spool worker did not finish its attempt in time; the spool keeps the entry");
    }
    if let Some(m) = metrics_endpoint {
        m.stop().await;
    }
    current.router.shutdown();
    signals_handle.close();
    info!("stopped");
    Ok(())
}

/// A reload's result: the new generation, and the sockets it needs that
/// differ from those in use (already bound).
struct Reloaded {
    generation: Generation,
    /// A new SMTP listener when `local-smtp` changed.
    server: Option<Server>,
    /// `Some` when `metrics-listen` changed: the new endpoint, or `None`
    /// for off.
    #[allow(clippy::option_option)]
    metrics: Option<Option<(SocketAddr, TcpListener)>>,
}

/// Loads the file, binds what moved and starts a new generation; the
/// caller swaps it in. Anything that fails refuses the whole reload, and
/// what was bound for it is closed again.
async fn reload(
    path: &Path,
    current: &Generation,
    listening: SocketAddr,
    metrics_at: Option<SocketAddr>,
    queue: &Arc<Queue>,
    metrics: &Arc<RouteMetrics>,
) -> Result<Reloaded, RouteServiceError> {
    let cfg = config::load(path)?;
    warn_oddities(&cfg);
    if cfg.server.spool_dir != current.cfg.server.spool_dir {
        warn!(
            "the spool directory changed; it takes effect only after a restart \
             (the router keeps using {})",
            current.cfg.server.spool_dir.display()
        );
    }
    // Bind first: a taken port refuses the reload while the old listener
    // still serves. The same address (however spelled) keeps its socket.
    let server = if server::resolve(&cfg.local_smtp).await? == listening {
        None
    } else {
        Some(Server::bind(&cfg.local_smtp).await?)
    };
    let metrics_change = match &cfg.server.metrics_listen {
        None if metrics_at.is_none() => None,
        None => Some(None),
        Some(a) => {
            if Some(MetricsEndpoint::resolve(a).await?) == metrics_at {
                None
            } else {
                Some(Some(MetricsEndpoint::bind(a).await?))
            }
        }
    };
    let generation = generation(cfg, queue, metrics, Some(&current.router)).await?;
    Ok(Reloaded {
        generation,
        server,
        metrics: metrics_change,
    })
}

/// `mailgend route`'s config file: `-c FILE`, else
/// `$MAIL2ALERT_CONFIGURATION`, else `./configuration.yml`.
pub fn config_path(cli: Option<&Path>) -> PathBuf {
    config::locate(cli)
}
