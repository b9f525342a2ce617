//! Connections to the events database.
//!
//! Owns turning `database.event` into a tokio-postgres configuration and
//! opening connections with the session settings every query relies on
//! (UTC time zone: ticket days and `sent_at` are UTC, as in the old tool).

pub mod migrate;
pub mod tls;
pub mod wakeup;

use std::time::Duration;

use tokio_postgres::{Client, Connection, Socket};

use crate::config::{DatabaseConfig, SessionAttrs, SslMode};

/// The connection type of every database connection (TLS or not).
pub type Conn = Connection<Socket, postgres_native_tls::TlsStream<Socket>>;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error(
        "cannot connect to database {name:?} on {endpoints} as {user:?} (sslmode {mode}): {}{hint}",
        describe(source)
    )]
    Connect {
        name: String,
        endpoints: String,
        user: String,
        mode: SslMode,
        /// What to fix, when the error says (starts with "; ").
        hint: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("database {name:?} on {endpoints}: {source}")]
    Tls {
        name: String,
        endpoints: String,
        #[source]
        source: tls::TlsError,
    },
    #[error("PGTARGETSESSIONATTRS={0:?} is not one of any, read-write, read-only")]
    BadSessionAttrs(String),
    #[error("database error: {}", describe(.0))]
    Query(#[from] tokio_postgres::Error),
}

/// The tokio-postgres configuration for `db`. A `host` starting with `/`
/// is a Unix socket directory, as with libpq; several hosts are tried in
/// order, each with its port (or the one port).
pub fn pg_config(db: &DatabaseConfig) -> tokio_postgres::Config {
    let mut c = tokio_postgres::Config::new();
    for h in &db.hosts {
        c.host(h);
    }
    for p in &db.ports {
        c.port(*p);
    }
    c.user(&db.username)
        .dbname(&db.name)
        // `mailgend/host:pid`: `mailgend status` lists the instances by it
        // (PostgreSQL keeps 63 bytes).
        .application_name(format!(
            "mailgend/{}",
            crate::notify::pipeline::instance_name()
        ))
        .options("-c TimeZone=UTC")
        .connect_timeout(Duration::from_secs(10))
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(60));
    if let Some(pw) = &db.password {
        c.password(pw);
    }
    c
}

/// `target_session_attrs` from the config, else `PGTARGETSESSIONATTRS`
/// (libpq's order), else `any`.
fn session_attrs(db: &DatabaseConfig) -> Result<SessionAttrs, DbError> {
    if let Some(a) = db.target_session_attrs {
        return Ok(a);
    }
    match std::env::var("PGTARGETSESSIONATTRS") {
        Ok(v) if !v.is_empty() => SessionAttrs::parse(&v).ok_or(DbError::BadSessionAttrs(v)),
        _ => Ok(SessionAttrs::Any),
    }
}

/// Opens one connection; its driver task runs until the client is dropped.
pub async fn connect(db: &DatabaseConfig) -> Result<Client, DbError> {
    connect_with(db, pg_config(db)).await
}

/// Opens a connection for a worker, whose statements all reach a handful
/// of rows by key (claim, events, outbox, marking sent).
///
/// Sequential scans are switched off for these sessions: the planner's
/// statistics are routinely stale exactly when it matters — right after a
/// feed inserted a burst of directives, and for the outbox, whose few live
/// rows hide thousands of dead ones between autovacuum visits. With stale
/// statistics it chose to scan the outbox for every group (35 ms each in
/// a 100,000-event run) instead of its index.
pub async fn connect_worker(db: &DatabaseConfig) -> Result<Client, DbError> {
    let mut config = pg_config(db);
    config.options("-c TimeZone=UTC -c enable_seqscan=off");
    connect_with(db, config).await
}

async fn connect_with(
    db: &DatabaseConfig,
    config: tokio_postgres::Config,
) -> Result<Client, DbError> {
    let (client, connection) = connect_raw(db, config).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "database connection closed with an error");
        }
    });
    Ok(client)
}

/// Opens a connection with `db`'s TLS and session settings; the caller
/// drives the connection. The one place every command connects through.
pub async fn connect_raw(
    db: &DatabaseConfig,
    mut config: tokio_postgres::Config,
) -> Result<(Client, Conn), DbError> {
    use tokio_postgres::config::{SslMode as T, TargetSessionAttrs};
    let settings = tls::Settings::from_env(db).map_err(|source| DbError::Tls {
        name: db.name.clone(),
        endpoints: db.endpoints(),
        source,
    })?;
    let connector = settings.connector().map_err(|source| DbError::Tls {
        name: db.name.clone(),
        endpoints: db.endpoints(),
        source,
    })?;
    config.target_session_attrs(match session_attrs(db)? {
        SessionAttrs::Any => TargetSessionAttrs::Any,
        SessionAttrs::ReadWrite => TargetSessionAttrs::ReadWrite,
        SessionAttrs::ReadOnly => TargetSessionAttrs::ReadOnly,
    });
    config.ssl_mode(settings.first_mode());
    let mut result = config.connect(connector.clone()).await;
    // libpq's `allow`: without TLS first, with TLS when the server said no.
    if settings.mode == SslMode::Allow {
        if let Err(e) = &result {
            if e.as_db_error().is_some() {
                config.ssl_mode(T::Require);
                result = config.connect(connector).await;
            }
        }
    }
    result.map_err(|source| DbError::Connect {
        name: db.name.clone(),
        endpoints: db.endpoints(),
        user: db.username.clone(),
        mode: settings.mode,
        hint: hint(&source, &settings),
        source,
    })
}

/// What to fix, for the connection errors whose text does not say it.
fn hint(e: &tokio_postgres::Error, s: &tls::Settings) -> String {
    let mut text = describe(e);
    let mut src = std::error::Error::source(e);
    while let Some(x) = src {
        text.push_str(&x.to_string());
        src = x.source();
    }
    let roots = match &s.roots {
        Some(crate::config::RootCert::File(p)) => format!("sslrootcert {}", p.display()),
        Some(crate::config::RootCert::System) => "the system's trusted roots".into(),
        None => "sslrootcert".into(),
    };
    let h = if text.contains("no pg_hba.conf entry") && text.contains("no encryption") {
        "the server accepts this connection only over TLS: set database.event.sslmode \
         (or PGSSLMODE) to prefer, require, verify-ca or verify-full"
            .to_string()
    } else if text.contains("hostname mismatch") || text.contains("IP address mismatch") {
        "the server's certificate does not name the host connected to: connect by a name \
         its certificate carries (subjectAltName), or use sslmode verify-ca"
            .to_string()
    } else if text.contains("certificate verify failed") {
        format!(
            "the server's certificate is not signed by a CA in {roots}: point \
             database.event.sslrootcert at the CA that signed it"
        )
    } else if text.contains("server does not support TLS") {
        "the server has TLS switched off (ssl = off): switch it on, or use sslmode prefer"
            .to_string()
    } else if text.contains("certificate authentication failed")
        || text.contains("connection requires a valid client certificate")
    {
        "the server wants a client certificate whose common name is the user name, signed \
         by a CA in its ssl_ca_file: set database.event.sslcert and sslkey"
            .to_string()
    } else {
        return String::new();
    };
    format!("; {h}")
}

/// tokio-postgres prints a server error as just "db error"; operators need
/// the server's message, detail and constraint to act.
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!("{} {}: {}", db.severity(), db.code().code(), db.message());
            if let Some(d) = db.detail() {
                s.push_str(" (");
                s.push_str(d);
                s.push(')');
            }
            s
        }
        None => {
            let mut s = e.to_string();
            if let Some(src) = std::error::Error::source(e) {
                s.push_str(": ");
                s.push_str(&src.to_string());
            }
            s
        }
    }
}

/// Prepared statements of one connection, by SQL text. tokio-postgres
/// prepares a statement for every `query(&str)`: a round trip more, and
/// PostgreSQL parses and plans it again each time, which profiles showed to
/// be most of the server's work per group. Hot paths prepare once per
/// connection instead.
#[derive(Debug, Default)]
pub struct StatementCache(
    std::sync::Mutex<std::collections::HashMap<String, tokio_postgres::Statement>>,
);

/// Something SQL can run on: a client or transaction, optionally with the
/// statement cache of its connection.
pub trait Session: Sync {
    type Client: tokio_postgres::GenericClient + Sync;
    fn client(&self) -> &Self::Client;
    fn cache(&self) -> Option<&StatementCache> {
        None
    }
}

impl Session for tokio_postgres::Client {
    type Client = tokio_postgres::Client;
    fn client(&self) -> &Self::Client {
        self
    }
}

impl Session for tokio_postgres::Transaction<'_> {
    type Client = Self;
    fn client(&self) -> &Self::Client {
        self
    }
}

/// A client or transaction together with its connection's cache.
pub struct Cached<'a, C> {
    pub client: &'a C,
    pub cache: &'a StatementCache,
}

impl<C: tokio_postgres::GenericClient + Sync> Session for Cached<'_, C> {
    type Client = C;
    fn client(&self) -> &C {
        self.client
    }
    fn cache(&self) -> Option<&StatementCache> {
        Some(self.cache)
    }
}

/// The prepared statement for `sql`, from the cache when there is one.
pub async fn prepare<S: Session + ?Sized>(
    s: &S,
    sql: &str,
) -> Result<tokio_postgres::Statement, tokio_postgres::Error> {
    use tokio_postgres::GenericClient;
    let Some(cache) = s.cache() else {
        return s.client().prepare(sql).await;
    };
    if let Some(st) = cache.0.lock().expect("statement cache").get(sql) {
        return Ok(st.clone());
    }
    let st = s.client().prepare(sql).await?;
    cache
        .0
        .lock()
        .expect("statement cache")
        .insert(sql.to_string(), st.clone());
    Ok(st)
}
