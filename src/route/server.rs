//! The inbound SMTP server of `mailgend route`.
//!
//! Owns the listening socket, the connection limit and the sessions'
//! lifetimes; the protocol of one connection is in `session`, the
//! parsing of one command line in `command`. The server knows nothing of
//! managers or rules: a complete message goes to an [`Accept`]
//! implementation, whose [`Reply`] is what the client hears after DATA.
//! That reply must only be positive once the message is safe (forwarded or
//! durably queued) — the server just passes it on.
//!
//! Why a hand-written state machine rather than a crate: `mailin-embedded`
//! runs its own thread-per-connection server (no tokio, no async
//! hand-off to the router), `samotop` is built on async-std and
//! unmaintained, and `smtp-proto` is a parser without a session, so we
//! would still write the whole session (limits, DATA, STARTTLS, AUTH) and
//! only save the few lines of `command.rs`. The state machine is small and
//! every limit is ours to enforce without buffering unboundedly.

mod clients;
mod command;
mod session;

use std::net::SocketAddr;
use std::sync::Arc;

use futures::future::BoxFuture;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::config::{ServerSettings, TlsFiles};
use super::metrics::RouteMetrics;
use super::Inbound;
use crate::shared::shutdown::Shutdown;

pub use clients::{Full, OpenConnections};
pub use command::{parse as parse_command, Command, CommandError};
/// The DATA reader, public for the fuzz targets (`fuzz/`).
pub use session::{read_data, DataRead, MAX_DATA_LINE};

/// The final SMTP reply to one message (after DATA).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// 250, or a 4xx/5xx.
    pub code: u16,
    /// Text after the code, usually starting with an enhanced status code
    /// (`2.0.0 queued as …`). Must be one line; it is sanitised anyway.
    pub text: String,
}

impl Reply {
    pub fn new(code: u16, text: impl Into<String>) -> Reply {
        Reply {
            code,
            text: text.into(),
        }
    }

    /// The wire form, one line, without CR/LF from remote reasons.
    pub fn line(&self) -> String {
        let text: String = self
            .text
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .take(400)
            .collect();
        format!("{} {}", self.code, text)
    }
}

/// Takes responsibility for a received message. Called once per message
/// after the client's final `.`; the client waits for the reply.
pub trait Accept: Send + Sync + 'static {
    fn accept(&self, message: Inbound) -> BoxFuture<'static, Reply>;

    /// The id a received message is known by (in its `Received:` line, the
    /// log, and the spool if it is stored there).
    fn new_id(&self) -> String {
        crate::route::spool::new_id()
    }
}

/// What a session runs with; replaced as a whole by a reload. A session
/// keeps the one it started with to its end.
#[derive(Clone)]
pub struct SessionConfig {
    pub settings: Arc<ServerSettings>,
    pub accept: Arc<dyn Accept>,
    /// Present when `settings.tls` is: STARTTLS is offered.
    pub tls: Option<tokio_native_tls::TlsAcceptor>,
    /// Our name in the greeting and EHLO reply.
    pub hostname: String,
    /// Counts each message's final reply.
    pub metrics: Arc<RouteMetrics>,
    /// Takes mail to the notifier's VERP addresses (`mailgend.bounces-config`);
    /// such mail never reaches `accept`.
    pub bounces: Option<Arc<crate::route::verp::BounceIntake>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("local-smtp {addr:?}: cannot resolve: {source}")]
    Resolve {
        addr: String,
        source: std::io::Error,
    },
    #[error("local-smtp {addr:?}: resolves to no address")]
    NoAddress { addr: String },
    #[error("local-smtp {addr}: cannot listen: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS certificate {}: {reason}", files.cert_file.display())]
    Tls { files: TlsFiles, reason: String },
}

/// Builds the STARTTLS acceptor from PEM files (the key as PKCS#8, which
/// is what `openssl genpkey` and certbot write).
pub fn tls_acceptor(files: &TlsFiles) -> Result<tokio_native_tls::TlsAcceptor, ServerError> {
    let err = |reason: String| ServerError::Tls {
        files: files.clone(),
        reason,
    };
    let cert = std::fs::read(&files.cert_file).map_err(|e| err(format!("cannot read: {e}")))?;
    let key = std::fs::read(&files.key_file).map_err(|e| {
        err(format!(
            "key {}: cannot read: {e}",
            files.key_file.display()
        ))
    })?;
    let identity = native_tls::Identity::from_pkcs8(&cert, &key)
        .map_err(|e| err(format!("with key {}: {e}", files.key_file.display())))?;
    let acceptor = native_tls::TlsAcceptor::new(identity).map_err(|e| err(e.to_string()))?;
    Ok(tokio_native_tls::TlsAcceptor::from(acceptor))
}

/// Resolves `local-smtp` (`host:port`) to the address to bind.
pub async fn resolve(local_smtp: &str) -> Result<SocketAddr, ServerError> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(local_smtp)
        .await
        .map_err(|source| ServerError::Resolve {
            addr: local_smtp.to_string(),
            source,
        })?
        .collect();
    addrs
        .first()
        .copied()
        .ok_or_else(|| ServerError::NoAddress {
            addr: local_smtp.to_string(),
        })
}

/// A bound listener, not yet serving.
pub struct Server {
    listener: TcpListener,
    addr: SocketAddr,
    requested: SocketAddr,
}

impl Server {
    /// Resolves `local-smtp` (`host:port`) and binds it. A name that does
    /// not resolve or a port that is taken is an error here, before the
    /// service says it is ready (or, on a reload, before the old listener
    /// is given up).
    pub async fn bind(local_smtp: &str) -> Result<Server, ServerError> {
        let addr = resolve(local_smtp).await?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Bind { addr, source })?;
        Ok(Server {
            addr: listener.local_addr().unwrap_or(addr),
            listener,
            requested: addr,
        })
    }

    /// The address `local-smtp` resolved to (a reload compares it).
    pub fn requested_addr(&self) -> SocketAddr {
        self.requested
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Accepts connections until `stop` turns true, then closes the
    /// listener and returns the sessions still running (they see `stop`
    /// too and end after their current transaction). Each new session
    /// takes the [`SessionConfig`] current at its start, and is admitted
    /// only while fewer than its `max-connections` are `open`.
    pub async fn serve(
        self,
        config: watch::Receiver<Arc<SessionConfig>>,
        open: Arc<OpenConnections>,
        mut stop: Shutdown,
    ) -> JoinSet<()> {
        let mut sessions = JoinSet::new();
        info!(addr = %self.addr, "listening for SMTP");
        loop {
            let accepted = tokio::select! {
                a = self.listener.accept() => a,
                _ = stop.recv() => break,
                // Reap finished sessions so the set does not grow.
                Some(_) = sessions.join_next(), if !sessions.is_empty() => continue,
            };
            let (socket, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: do not spin.
                    warn!("accepting a connection failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = socket.set_nodelay(true);
            let cfg = config.borrow().clone();
            let limits = (
                cfg.settings.max_connections.max(1),
                cfg.settings.max_connections_per_client,
            );
            match open.try_open(peer.ip(), limits.0, limits.1) {
                Ok(permit) => {
                    let stop = stop.clone();
                    let clients = open.clone();
                    sessions.spawn(async move {
                        session::run(socket, peer, cfg, clients, stop).await;
                        drop(permit);
                    });
                }
                Err(full) => {
                    let why = match full {
                        Full::Total => "Too many connections",
                        Full::Client => "Too many connections from your address",
                    };
                    debug!(%peer, ?full, "connection limit reached; 421");
                    cfg.metrics.connection_refused(full == Full::Client);
                    sessions.spawn(session::refuse(
                        socket,
                        format!("421 4.7.0 {} {why}, try again later", cfg.hostname),
                    ));
                }
            }
        }
        drop(self.listener);
        info!(addr = %self.addr, "no longer accepting connections");
        sessions
    }
}
