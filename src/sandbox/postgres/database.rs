//! One fresh database per test ([`TestDb`]), and IntelMQ's events table.

use super::*;

/// The events table as `intelmq_psql_initdb` creates it (see the file's
/// header), with `extra` as `jsonb`.
const EVENTS_TABLE_SQL: &str = include_str!("../../../tests/fixtures/intelmq-events.sql");

/// Which type the `extra` column of `events` has: `json` is what
/// `intelmq_psql_initdb` generates and older deployments run; `jsonb` is
/// what current CERT-bund style deployments use. Mailgen must handle both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtraType {
    Json,
    Jsonb,
}

/// The SQL creating IntelMQ's `events` table and its indexes, with `extra`
/// of the given type.
pub fn events_table_sql(extra: ExtraType) -> String {
    match extra {
        ExtraType::Jsonb => EVENTS_TABLE_SQL.to_string(),
        ExtraType::Json => EVENTS_TABLE_SQL.replace("\"extra\" jsonb", "\"extra\" json"),
    }
}

pub(super) fn superuser_config(host: &str, port: u16, dbname: &str) -> tokio_postgres::Config {
    let mut config = tokio_postgres::Config::new();
    config
        .host_path(host)
        .port(port)
        .user(SUPERUSER)
        .dbname(dbname)
        .application_name("mailgend-sandbox")
        .connect_timeout(Duration::from_secs(10));
    config
}

pub(super) async fn connect_config(config: &tokio_postgres::Config) -> Result<Client> {
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        // Errors surface on the client; a dropped database ends it too.
        let _ = connection.await;
    });
    Ok(client)
}

/// Runs `fut` to completion on a throw-away runtime in a thread of its own,
/// so sync callers work both inside and outside a tokio runtime.
pub(super) fn block_on_own_thread<T: Send + 'static>(
    fut: impl std::future::Future<Output = T> + Send + 'static,
) -> std::result::Result<T, SandboxError> {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map(|rt| rt.block_on(fut))
    })
    .join()
    .map_err(|_| SandboxError::Invalid("sandbox helper thread panicked".into()))?
    .map_err(|e| SandboxError::io("build a tokio runtime", e))
}

pub(super) fn create_database_blocking(endpoint: &Endpoint) -> Result<TestDb> {
    let endpoint = endpoint.clone();
    block_on_own_thread(async move { create_database(&endpoint).await })?
}

pub(super) async fn create_database(endpoint: &Endpoint) -> Result<TestDb> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = format!(
        "t_{}_{}_{:06x}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        rand::random::<u32>() & 0xff_ffff
    );
    let client =
        connect_config(&superuser_config(&endpoint.host, endpoint.port, "postgres")).await?;
    // `name` is ours: [a-z0-9_] only.
    client
        .batch_execute(&format!("CREATE DATABASE \"{name}\""))
        .await?;
    Ok(TestDb {
        name,
        host: endpoint.host.clone(),
        port: endpoint.port,
        superuser: SUPERUSER.to_string(),
        roles: Mutex::new(Vec::new()),
    })
}

/// One fresh database, owned by the superuser; dropped (with the roles
/// created through it) when this value is dropped.
#[derive(Debug)]
pub struct TestDb {
    pub name: String,
    /// The Unix socket directory (libpq `host`).
    pub host: String,
    /// The TCP port on 127.0.0.1, also the socket's port number.
    pub port: u16,
    pub superuser: String,
    pub(super) roles: Mutex<Vec<String>>,
}

impl TestDb {
    /// A libpq connection string for the superuser over the socket.
    pub fn conninfo(&self) -> String {
        format!(
            "host={} port={} user={} dbname={}",
            self.host, self.port, self.superuser, self.name
        )
    }

    /// A libpq connection string for `user` over TCP to 127.0.0.1, where
    /// passwords are checked (scram-sha-256).
    pub fn tcp_conninfo(&self, user: &str, password: &str) -> String {
        let quote = |s: &str| format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"));
        format!(
            "host=127.0.0.1 port={} user={} password={} dbname={}",
            self.port,
            quote(user),
            quote(password),
            self.name
        )
    }

    /// The tokio-postgres configuration for the superuser over the socket.
    pub fn pg_config(&self) -> tokio_postgres::Config {
        superuser_config(&self.host, self.port, &self.name)
    }

    /// Connects as the superuser over the socket; the connection task is
    /// spawned on the current tokio runtime.
    pub async fn connect(&self) -> Result<Client> {
        connect_config(&self.pg_config()).await
    }

    /// Connects as `user` with `password` over TCP (password checked).
    pub async fn connect_as(&self, user: &str, password: &str) -> Result<Client> {
        let mut config = tokio_postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(self.port)
            .user(user)
            .password(password)
            .dbname(&self.name)
            .connect_timeout(Duration::from_secs(10));
        connect_config(&config).await
    }

    /// Creates a login role `<base>_<unique suffix>` with `password` and
    /// returns its name. Roles are cluster-wide and tests run in parallel,
    /// hence the suffix. `base` must be `[a-z0-9_]+`.
    pub async fn create_login_role(&self, base: &str, password: &str) -> Result<String> {
        if base.is_empty()
            || !base
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err(SandboxError::Invalid(format!(
                "role name base {base:?} must be [a-z0-9_]+"
            )));
        }
        if password.contains('\0') {
            return Err(SandboxError::Invalid("password contains NUL".into()));
        }
        let role = format!("{base}_{}", self.name.trim_start_matches("t_"));
        if role.len() > 63 {
            return Err(SandboxError::Invalid(format!(
                "role name {role:?} would exceed PostgreSQL's 63 bytes; use a shorter base"
            )));
        }
        // Utility statements take no parameters: the password goes in as a
        // standard-conforming string literal ('' doubles a quote).
        let client = self.connect().await?;
        client
            .batch_execute(&format!(
                "CREATE ROLE \"{role}\" LOGIN PASSWORD '{}'",
                password.replace('\'', "''")
            ))
            .await?;
        self.roles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(role.clone());
        Ok(role)
    }

    /// Creates IntelMQ's `events` table (with its indexes) in this database.
    pub async fn create_events_table(&self, extra: ExtraType) -> Result<()> {
        let client = self.connect().await?;
        client.batch_execute(&events_table_sql(extra)).await?;
        Ok(())
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let admin = superuser_config(&self.host, self.port, "postgres");
        let name = self.name.clone();
        let roles = std::mem::take(&mut *self.roles.lock().unwrap_or_else(|p| p.into_inner()));
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        // Own thread and runtime: drop may run inside or outside a runtime.
        // We wait a little, not forever: a stopped cluster must not hang a
        // test's teardown, and the cluster is thrown away anyway.
        std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(async {
                    let Ok(client) = connect_config(&admin).await else {
                        return;
                    };
                    let _ = client
                        .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                        .await;
                    for role in roles {
                        let _ = client
                            .batch_execute(&format!("DROP ROLE IF EXISTS \"{role}\""))
                            .await;
                    }
                });
            }
            let _ = done_tx.send(());
        });
        let _ = done_rx.recv_timeout(Duration::from_secs(5));
    }
}
