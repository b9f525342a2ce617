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
//! started with. `local-smtp`, `spool-dir` and `max-connections` need a
//! restart (a WARN says so). SIGTERM/SIGINT stop accepting, let sessions in
//! flight finish (an idle session hears 421) for up to
//! [`SHUTDOWN_DEADLINE`], let the spool worker finish its attempt, and
//! return; nothing acknowledged is lost, it is in the spool.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::StreamExt;
use signal_hook::consts::signal::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_tokio::Signals;
use tokio::sync::watch;
use tracing::{error, info, warn};

use super::config::{self, RouteConfig, RouteConfigError};
use super::forward::{Decide, Dispatcher, Failure, Forwarder, PostSlack, Queue};
use super::router::Router;
use super::server::{self, Server, ServerError, SessionConfig};
use super::spool::{Spool, SpoolError};
use super::{retry, Inbound, Routing, SlackPost};
use crate::smtp::{Outbound, SmtpError};
use crate::systemd;

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
}

impl Decide for Router {
    fn route<'a>(&'a self, message: &'a Inbound) -> BoxFuture<'a, Routing> {
        Box::pin(Router::route(self, message))
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
    crate::smtp::host_name().unwrap_or_else(|| "localhost".to_string())
}

/// Builds a generation from a loaded configuration (no sockets bound).
async fn generation(cfg: RouteConfig, queue: &Arc<Queue>) -> Result<Generation, RouteServiceError> {
    let tls = match &cfg.server.tls {
        Some(files) => Some(server::tls_acceptor(files)?),
        None => None,
    };
    let outbound = Outbound::new(&cfg.remote_smtp, cfg.server.outbound_connections)?;
    let router = Arc::new(Router::start(&cfg).await?);
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
    ));
    let session = Arc::new(SessionConfig {
        settings: Arc::new(cfg.server.clone()),
        accept: Arc::new(Dispatcher {
            router: router.clone(),
            forward: forward.clone(),
            queue: queue.clone(),
        }),
        tls,
        hostname: host,
    });
    Ok(Generation {
        cfg,
        router,
        forward,
        session,
    })
}

/// Runs the router until SIGTERM/SIGINT.
pub async fn run(path: &Path) -> Result<(), RouteServiceError> {
    let signals = Signals::new([SIGHUP, SIGTERM, SIGINT]).map_err(RouteServiceError::Signals)?;
    let signals_handle = signals.handle();
    let mut signals = signals.fuse();

    let cfg = config::load(path)?;
    let spool = Spool::open(&cfg.server.spool_dir)?;
    let waiting = spool.list()?.len();
    let queue = Arc::new(Queue::new(spool, waiting));
    let server = Server::bind(&cfg.local_smtp, cfg.server.max_connections).await?;
    let addr = server.local_addr();
    let mut current = generation(cfg, &queue).await?;

    let (session_tx, session_rx) = watch::channel(current.session.clone());
    let (forward_tx, forward_rx) = watch::channel(current.forward.clone());
    let (stop_tx, stop_rx) = watch::channel(false);
    let serving = tokio::spawn(server.serve(session_rx, stop_rx.clone()));
    let worker = tokio::spawn(retry::run(queue.clone(), forward_rx, stop_rx.clone()));

    let status = format!(
        "routing on {addr} to {}; {waiting} spooled",
        current.forward.relay()
    );
    systemd::ready(&status);
    info!(
        %addr,
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
            Some(sig) = signals.next() => {
                if sig != SIGHUP {
                    info!("stopping (signal {sig})");
                    break;
                }
                systemd::reloading();
                match reload(path, &current, &queue).await {
                    Ok(next) => {
                        let old = std::mem::replace(&mut current, next);
                        session_tx.send_replace(current.session.clone());
                        forward_tx.send_replace(current.forward.clone());
                        // Its GoCD polling stops; sessions that still hold
                        // it finish with what it knows.
                        old.router.shutdown();
                        info!(config = %path.display(), "configuration reloaded");
                    }
                    Err(e) => error!(
                        config = %path.display(),
                        "reload refused, the previous configuration stays in force: {e}"
                    ),
                }
                systemd::ready(&status);
            }
        }
    }

    // Shutdown: stop accepting; idle sessions hear 421, transactions in
    // flight get the deadline to finish.
    systemd::stopping();
    let _ = stop_tx.send(true);
    let mut sessions = match serving.await {
        Ok(s) => s,
        Err(e) => {
            error!("the SMTP server task failed: {e}");
            tokio::task::JoinSet::new()
        }
    };
    let drained = tokio::time::timeout(SHUTDOWN_DEADLINE, async {
        while sessions.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!(
            sessions = sessions.len(),
            "shutdown deadline of {SHUTDOWN_DEADLINE:?} reached; closing sessions in flight \
             (their clients did not get a 250 and will send again)"
        );
        sessions.abort_all();
        while sessions.join_next().await.is_some() {}
    }
    // The worker ends after its current attempt (progress is recorded).
    if tokio::time::timeout(SHUTDOWN_DEADLINE, worker)
        .await
        .is_err()
    {
        warn!("the spool worker did not finish its attempt in time; the spool keeps the entry");
    }
    current.router.shutdown();
    signals_handle.close();
    info!("stopped");
    Ok(())
}

/// Loads and starts a new generation; the caller swaps it in.
async fn reload(
    path: &Path,
    current: &Generation,
    queue: &Arc<Queue>,
) -> Result<Generation, RouteServiceError> {
    let cfg = config::load(path)?;
    let restart_needed = [
        ("local-smtp", cfg.local_smtp != current.cfg.local_smtp),
        (
            "spool-dir",
            cfg.server.spool_dir != current.cfg.server.spool_dir,
        ),
        (
            "max-connections",
            cfg.server.max_connections != current.cfg.server.max_connections,
        ),
    ];
    for (key, changed) in restart_needed {
        if changed {
            warn!("{key} changed; it takes effect only after a restart");
        }
    }
    generation(cfg, queue).await
}

/// `mailgend route`'s config file: `-c FILE`, else
/// `$MAIL2ALERT_CONFIGURATION`, else `./configuration.yml`.
pub fn config_path(cli: Option<&Path>) -> PathBuf {
    config::locate(cli)
}
