//! Connections to the events database.
//!
//! Owns turning `database.event` into a tokio-postgres configuration and
//! opening connections with the session settings every query relies on
//! (UTC time zone: ticket days and `sent_at` are UTC, as in the old tool).

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
    let (client, connection) =
        pg_config(db)
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
