//! Private PostgreSQL clusters for tests, the demo and the benchmarks.
//!
//! # Private clusters
//!
//! [`PgCluster::start`] runs `initdb` into a directory, starts the server with
//! `pg_ctl -w` on its own TCP port on 127.0.0.1 and its own Unix socket
//! directory, and on drop stops it (`-m fast`, falling back to `immediate`)
//! and removes the directory. The settings favour speed over durability
//! (`fsync=off`, `synchronous_commit=off`, `full_page_writes=off`): every
//! cluster here is thrown away. Local (socket) connections are trusted;
//! TCP connections need a password (`scram-sha-256`), as in a deployment.
//! The server log stays in the directory ([`PgCluster::log_path`]) so a test
//! can look for errors in it.
//!
//! PostgreSQL refuses to run as root. When we are root (CI containers), every
//! PostgreSQL program runs as the system user `postgres` through
//! `runuser -u postgres --`, and the directories it writes are chowned to it;
//! otherwise the programs run as the current user.
//!
//! A private cluster also gets a small detached watchdog (`sh` loop) that
//! stops it and removes its directory once the owning process has died, so a
//! test killed by a timeout does not leave a server behind.
//!
//! # The shared cluster
//!
//! Most tests only need *a* database, and starting a cluster per test would
//! cost a second each. [`PgCluster::shared`] gives every test process of a
//! run the same cluster, each test then creating its own database with
//! [`SharedCluster::create_database`]. The cluster lives in a fixed per-user
//! directory derived from the workspace path,
//! `$TMPDIR/mailgend-test-pg-<uid>-<hash>`, holding:
//!
//! - `setup.lock`: taken exclusively (`flock`) by whoever inspects, creates
//!   or removes the cluster. The first process creates it; the others find
//!   `state.json`, check with `pg_isready` that the server answers, and reuse
//!   it. A state left by a crashed run (server gone) is cleaned up and the
//!   cluster recreated. Because the keeper deletes the whole directory, a
//!   process that waited for the lock re-checks that the path still names
//!   the file it locked, and starts over if not.
//! - `users.lock`: every process using the cluster holds a *shared* lock on
//!   it for its whole life (taken while holding `setup.lock`, released by
//!   the kernel when the process exits, however it exits).
//! - `keeper.lock`: held by the keeper, a detached `setsid sh` loop started
//!   by whichever process finds no keeper alive. Once a second it tries
//!   `flock -n -x users.lock`; after [`SHARED_IDLE`] of consecutive successes
//!   (no process has used the cluster for that long) it takes `setup.lock`,
//!   checks `users.lock` once more, stops the server and removes the
//!   directory. So a finished test run, and a crashed one, leave nothing
//!   running and nothing on disk; a new run simply starts a new cluster.
//!
//! The lock order is always `setup.lock` then `users.lock`, so the keeper and
//! the test processes cannot deadlock. Under `cargo test` (one process per
//! test binary, tests as threads) the cluster is attached once per process;
//! under `cargo nextest` (one process per test) every process attaches.
//!
//! # Databases
//!
//! [`TestDb`] is one fresh, uniquely named database (name from pid, a
//! counter and a random part), created by the superuser over the socket.
//! It is dropped (`DROP DATABASE … WITH (FORCE)`) when the `TestDb` is
//! dropped, together with the login roles created through it, so a long
//! test run does not fill the disk. Roles are cluster-wide, so
//! [`TestDb::create_login_role`] makes the name unique per database.
//!
//! # Files
//!
//! `binaries.rs` finds the programs and the run-as user; `cluster.rs` is a
//! private cluster's life cycle, `settings.rs` its configuration files,
//! `replica.rs` the fail-over helpers; `shared.rs` the shared cluster;
//! `database.rs` [`TestDb`] and the events table.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::net::TcpListener;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tokio_postgres::{Client, NoTls};

use super::SandboxError;

/// The superuser every cluster here is initialised with.
pub const SUPERUSER: &str = "postgres";

/// How long the shared cluster survives without any process using it.
pub const SHARED_IDLE: Duration = Duration::from_secs(10);

type Result<T> = std::result::Result<T, SandboxError>;

mod binaries;
mod cluster;
mod database;
mod replica;
mod settings;
mod shared;
#[cfg(test)]
mod tests;

use binaries::*;
use cluster::*;
use database::*;
use shared::*;

pub use cluster::PgCluster;
pub use database::{events_table_sql, ExtraType, TestDb};
pub use shared::SharedCluster;
