//! Connections to the events database.
//!
//! Owns turning `database.event` into a tokio-postgres configuration and
//! opening connections with the session settings every query relies on
//! (UTC time zone: ticket days and `sent_at` are UTC, as in the old tool).

pub mod migrate;
pub mod wakeup;

use std::time::Duration;

use tokio_postgres::{Client, NoTls};

use crate::config::DatabaseConfig;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error(
        "cannot connect to database {name:?} on {host}:{port} as {user:?}: {}",
        describe(source)
    )]
    Connect {
        name: String,
        host: String,
        port: u16,
        user: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("database error: {}", describe(.0))]
    Query(#[from] tokio_postgres::Error),
}

/// The tokio-postgres configuration for `db`. A `host` starting with `/`
/// is a Unix socket directory, as with libpq.
pub fn pg_config(db: &DatabaseConfig) -> tokio_postgres::Config {
    let mut c = tokio_postgres::Config::new();
    c.host(&db.host)
        .port(db.port)
        .user(&db.username)
        .dbname(&db.name)
        .application_name("mailgend")
        .options("-c TimeZone=UTC")
        .connect_timeout(Duration::from_secs(10))
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(60));
    if let Some(pw) = &db.password {
        c.password(pw);
    }
    c
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
    let (client, connection) = config
        .connect(NoTls)
        .await
        .map_err(|source| DbError::Connect {
            name: db.name.clone(),
            host: db.host.clone(),
            port: db.port,
            user: db.username.clone(),
            source,
        })?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "database connection closed with an error");
        }
    });
    Ok(client)
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
