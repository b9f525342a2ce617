//! `mailgend db migrate`: creates or updates the database objects.
//!
//! Owns the SQL files in `migrations/` (compiled in) and the record of which
//! ran (`mailgend.schema_migrations`). Every migration is idempotent on its
//! own, so a database prepared by intelmq-mailgen's `notifications.sql` is
//! accepted as it is. Runs in one transaction under an advisory lock, so two
//! hosts migrating at once do not interleave.

use tokio_postgres::Client;

/// The migrations, in order: (version, name, SQL).
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "intelmq_mailgen",
        include_str!("../../../migrations/0001_intelmq_mailgen.sql"),
    ),
    (
        2,
        "mailgend_schema",
        include_str!("../../../migrations/0002_mailgend_schema.sql"),
    ),
    (
        3,
        "outbox",
        include_str!("../../../migrations/0003_outbox.sql"),
    ),
    (
        4,
        "outbox_group_index",
        include_str!("../../../migrations/0004_outbox_group_index.sql"),
    ),
    (
        5,
        "bounces",
        include_str!("../../../migrations/0005_bounces.sql"),
    ),
];

/// Owners and SECURITY DEFINER search paths, re-applied after every run
/// (see the file's header for why it is not a numbered migration).
const OWNERS: &str = include_str!("../../../migrations/owners.sql");

/// An arbitrary constant naming our advisory lock ("mailgend" in ASCII).
const MIGRATE_LOCK: i64 = 0x6d61696c67656e64;

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(
        "IntelMQ's table \"events\" does not exist in this database; \
         create it first (intelmq_psql_initdb, or IntelMQ's PostgreSQL output bot setup)"
    )]
    NoEventsTable,
    #[error("migration {version} ({name}) failed: {source}")]
    Failed {
        version: i32,
        name: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("setting the owners of the mailgen objects failed: {0}")]
    Owners(#[source] tokio_postgres::Error),
    #[error("database error: {0}")]
    Db(#[from] tokio_postgres::Error),
}

/// What a run did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MigrateReport {
    pub applied: Vec<(i32, &'static str)>,
    pub already: Vec<(i32, &'static str)>,
}

/// Applies every migration not yet recorded. Must run as a role that may
/// create roles, types and tables (the database owner or a superuser).
pub async fn migrate(client: &mut Client) -> Result<MigrateReport, MigrateError> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATE_LOCK])
        .await?;
    let has_events: bool = tx
        .query_one("SELECT to_regclass('events') IS NOT NULL", &[])
        .await?
        .get(0);
    if !has_events {
        return Err(MigrateError::NoEventsTable);
    }
    tx.batch_execute(
        "CREATE SCHEMA IF NOT EXISTS mailgend;
         CREATE TABLE IF NOT EXISTS mailgend.schema_migrations (
             version INTEGER PRIMARY KEY,
             name TEXT NOT NULL,
             applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
    )
    .await?;
    let done: Vec<i32> = tx
        .query("SELECT version FROM mailgend.schema_migrations", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut report = MigrateReport::default();
    for &(version, name, sql) in MIGRATIONS {
        if done.contains(&version) {
            report.already.push((version, name));
            continue;
        }
        tx.batch_execute(sql)
            .await
            .map_err(|source| MigrateError::Failed {
                version,
                name,
                source,
            })?;
        tx.execute(
            "INSERT INTO mailgend.schema_migrations (version, name) VALUES ($1, $2)",
            &[&version, &name],
        )
        .await?;
        report.applied.push((version, name));
    }
    tx.batch_execute(OWNERS)
        .await
        .map_err(MigrateError::Owners)?;
    tx.commit().await?;
    Ok(report)
}
