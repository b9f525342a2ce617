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

/// The events table as `intelmq_psql_initdb` creates it (see the file's
/// header), with `extra` as `jsonb`.
const EVENTS_TABLE_SQL: &str = include_str!("../../tests/fixtures/intelmq-events.sql");

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

type Result<T> = std::result::Result<T, SandboxError>;

// ---------------------------------------------------------------------------
// Programs and users

/// Where the PostgreSQL server programs are.
#[derive(Debug, Clone)]
struct PgBin {
    dir: PathBuf,
}

impl PgBin {
    /// `$MAILGEND_PG_BIN`, else the directory of `initdb`/`pg_ctl` on PATH,
    /// else the newest `/usr/lib/postgresql/<version>/bin` (Debian keeps the
    /// server programs off PATH).
    fn find() -> Result<PgBin> {
        static FOUND: OnceLock<std::result::Result<PgBin, String>> = OnceLock::new();
        FOUND
            .get_or_init(|| {
                let has_tools =
                    |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
                if let Some(dir) = std::env::var_os("MAILGEND_PG_BIN") {
                    let dir = PathBuf::from(dir);
                    return if has_tools(&dir) {
                        Ok(PgBin { dir })
                    } else {
                        Err(format!(
                            "MAILGEND_PG_BIN={} has no initdb/pg_ctl",
                            dir.display()
                        ))
                    };
                }
                if let Some(path) = std::env::var_os("PATH") {
                    if let Some(dir) = std::env::split_paths(&path).find(|d| has_tools(d)) {
                        // PATH often holds symlinks (/usr/local/bin/pg_ctl ->
                        // /usr/lib/postgresql/15/bin/pg_ctl); the real
                        // directory also has pg_isready and friends.
                        let dir = fs::canonicalize(dir.join("pg_ctl"))
                            .ok()
                            .and_then(|p| p.parent().map(Path::to_path_buf))
                            .filter(|d| has_tools(d))
                            .unwrap_or(dir);
                        return Ok(PgBin { dir });
                    }
                }
                let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
                    .into_iter()
                    .flatten()
                    .flatten()
                    .filter_map(|e| {
                        let v = e.file_name().to_str()?.parse::<u32>().ok()?;
                        let bin = e.path().join("bin");
                        has_tools(&bin).then_some((v, bin))
                    })
                    .collect();
                versions.sort();
                versions.pop().map(|(_, dir)| PgBin { dir }).ok_or_else(|| {
                    "no initdb/pg_ctl on PATH or in /usr/lib/postgresql/*/bin; \
                     set MAILGEND_PG_BIN"
                        .to_string()
                })
            })
            .clone()
            .map_err(SandboxError::PgBinariesNotFound)
    }

    fn tool(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// Who runs the PostgreSQL programs.
#[derive(Debug, Clone)]
enum RunAs {
    CurrentUser,
    /// We are root: run as this system user via `runuser`.
    User {
        name: String,
        uid: u32,
        gid: u32,
    },
}

impl RunAs {
    fn detect() -> Result<RunAs> {
        if effective_uid() != 0 {
            return Ok(RunAs::CurrentUser);
        }
        let passwd = fs::read_to_string("/etc/passwd")
            .map_err(|e| SandboxError::io("read /etc/passwd", e))?;
        passwd
            .lines()
            .find_map(|line| {
                let fields: Vec<&str> = line.split(':').collect();
                match fields[..] {
                    [name, _, uid, gid, ..] if name == SUPERUSER => Some(RunAs::User {
                        name: name.to_string(),
                        uid: uid.parse().ok()?,
                        gid: gid.parse().ok()?,
                    }),
                    _ => None,
                }
            })
            .ok_or_else(|| SandboxError::NoSuchUser(SUPERUSER.to_string()))
    }

    fn command(&self, program: &Path) -> Command {
        match self {
            RunAs::CurrentUser => Command::new(program),
            RunAs::User { name, .. } => {
                let mut cmd = Command::new("runuser");
                cmd.args(["-u", name, "--"]).arg(program);
                cmd
            }
        }
    }

    /// The same as [`RunAs::command`], as a shell word prefix.
    fn shell_prefix(&self) -> String {
        match self {
            RunAs::CurrentUser => String::new(),
            RunAs::User { name, .. } => format!("runuser -u {} -- ", sh_quote(name)),
        }
    }

    fn give(&self, path: &Path) -> Result<()> {
        if let RunAs::User { uid, gid, .. } = self {
            std::os::unix::fs::chown(path, Some(*uid), Some(*gid))
                .map_err(|e| SandboxError::io(format!("chown {}", path.display()), e))?;
        }
        Ok(())
    }
}

/// The effective uid: the owner of `/proc/self` (no libc needed).
fn effective_uid() -> u32 {
    fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(u32::MAX)
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .ok_or_else(|| SandboxError::Invalid(format!("path {path:?} is not UTF-8")))
}

/// Runs `cmd` to completion; a non-zero exit is an error carrying its output.
fn run(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| SandboxError::io(format!("run {what}"), e))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(SandboxError::Command {
            program: what.to_string(),
            status: out.status.to_string(),
            output: text.trim().to_string(),
        })
    }
}

fn free_port() -> Result<u16> {
    let listener =
        TcpListener::bind("127.0.0.1:0").map_err(|e| SandboxError::io("find a free port", e))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| SandboxError::io("find a free port", e))
}

/// Starts `script` in its own session, detached from us: no stdio, not in
/// our process group, so neither our exit nor a test runner killing our
/// group stops it.
fn spawn_detached_sh(script: &str) -> Result<()> {
    let status = Command::new("setsid")
        .arg("-f")
        .args(["sh", "-c", script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| SandboxError::io("start a detached helper (setsid)", e))?;
    if status.success() {
        Ok(())
    } else {
        Err(SandboxError::Command {
            program: "setsid -f sh".into(),
            status: status.to_string(),
            output: String::new(),
        })
    }
}

fn last_lines(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

// ---------------------------------------------------------------------------
// Private clusters

/// Where a cluster the sandbox started can be reached.
#[derive(Debug, Clone)]
struct Endpoint {
    /// The Unix socket directory (libpq's `host` for sockets).
    host: String,
    port: u16,
    log_path: PathBuf,
}

/// A PostgreSQL cluster of our own, in a directory of our own.
///
/// Stopped and its directory removed on drop.
#[derive(Debug)]
pub struct PgCluster {
    dir: PathBuf,
    data_dir: PathBuf,
    endpoint: Endpoint,
    bin: PgBin,
    run_as: RunAs,
    running: bool,
    /// False for the shared cluster, whose lifetime the keeper owns.
    owned: bool,
}

impl PgCluster {
    /// Initialises and starts a new cluster in `dir` (created if missing;
    /// it should be empty and its parents must be traversable by the user
    /// `postgres` when running as root, as under `/tmp`).
    pub fn start(dir: &Path) -> Result<PgCluster> {
        let cluster = PgCluster::init_and_start(dir)?;
        cluster.spawn_watchdog()?;
        Ok(cluster)
    }

    /// [`PgCluster::start`] in a new directory under the system temp dir.
    pub fn start_temp() -> Result<PgCluster> {
        let dir = tempfile::Builder::new()
            .prefix("mailgend-pg-")
            .tempdir()
            .map_err(|e| SandboxError::io("create a temp dir", e))?;
        // The cluster removes the directory itself when dropped.
        PgCluster::start(&dir.keep())
    }

    fn init_and_start(dir: &Path) -> Result<PgCluster> {
        let bin = PgBin::find()?;
        let run_as = RunAs::detect()?;
        let dir = std::path::absolute(dir)
            .map_err(|e| SandboxError::io(format!("resolve {}", dir.display()), e))?;
        let data_dir = dir.join("data");
        let socket_dir = dir.join("sock");
        let log_path = dir.join("postgresql.log");
        // 107 bytes is the sun_path limit; the socket file is
        // `.s.PGSQL.<port>` inside the socket directory.
        if path_str(&socket_dir)?.len() + "/.s.PGSQL.65535".len() > 107 {
            return Err(SandboxError::SocketPathTooLong(socket_dir));
        }
        for d in [&dir, &socket_dir] {
            fs::create_dir_all(d)
                .map_err(|e| SandboxError::io(format!("create {}", d.display()), e))?;
            fs::set_permissions(d, fs::Permissions::from_mode(0o755))
                .map_err(|e| SandboxError::io(format!("chmod {}", d.display()), e))?;
            run_as.give(d)?;
        }

        let mut initdb = run_as.command(&bin.tool("initdb"));
        initdb
            .current_dir(&dir)
            .arg("-D")
            .arg(&data_dir)
            .args(["-U", SUPERUSER, "-E", "UTF8", "--locale=C.UTF-8"])
            .args(["--auth-local=trust", "--auth-host=scram-sha-256"])
            // No fsync of the fresh files: the cluster is thrown away.
            .arg("--no-sync");
        run(&mut initdb, "initdb").map_err(|e| match e {
            SandboxError::Command {
                program,
                status,
                output,
            } => SandboxError::Command {
                program,
                status,
                output: format!(
                    "{output}\n(hint: when running as root, {} and its parents must be \
                     accessible to the user {SUPERUSER})",
                    dir.display()
                ),
            },
            e => e,
        })?;

        // Our settings live in their own file so a port change on retry
        // rewrites one small file.
        let conf = data_dir.join("postgresql.conf");
        OpenOptions::new()
            .append(true)
            .open(&conf)
            .and_then(|mut f| writeln!(f, "\ninclude 'mailgend-sandbox.conf'"))
            .map_err(|e| SandboxError::io(format!("append to {}", conf.display()), e))?;

        let mut cluster = PgCluster {
            endpoint: Endpoint {
                host: path_str(&socket_dir)?.to_string(),
                port: 0,
                log_path,
            },
            dir,
            data_dir,
            bin,
            run_as,
            running: false,
            owned: true,
        };
        cluster.start_on_free_port()?;
        Ok(cluster)
    }

    fn start_on_free_port(&mut self) -> Result<()> {
        // Another process may take the port between our probe and the
        // server's bind; then try another one.
        let mut last_err = None;
        for _ in 0..4 {
            self.endpoint.port = free_port()?;
            self.write_settings()?;
            match self.pg_ctl_start() {
                Ok(()) => return Ok(()),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.expect("at least one attempt"))
    }

    /// Starts a streaming replica of this cluster (`pg_basebackup -R`) in
    /// a new temp directory, on its own port and socket; it follows this
    /// cluster until [`PgCluster::promote`]d (fail-over tests).
    pub fn start_replica(&self) -> Result<PgCluster> {
        let dir = tempfile::Builder::new()
            .prefix("mailgend-pg-replica-")
            .tempdir()
            .map_err(|e| SandboxError::io("create a temp dir", e))?
            .keep();
        let data_dir = dir.join("data");
        let socket_dir = dir.join("sock");
        for d in [&dir, &socket_dir] {
            fs::create_dir_all(d)
                .map_err(|e| SandboxError::io(format!("create {}", d.display()), e))?;
            fs::set_permissions(d, fs::Permissions::from_mode(0o755))
                .map_err(|e| SandboxError::io(format!("chmod {}", d.display()), e))?;
            self.run_as.give(d)?;
        }
        let mut backup = self.run_as.command(&self.bin.tool("pg_basebackup"));
        backup
            .current_dir(&dir)
            .args(["-h", &self.endpoint.host])
            .args(["-p", &self.endpoint.port.to_string()])
            .args(["-U", SUPERUSER, "-D"])
            .arg(&data_dir)
            // -R: standby.signal and primary_conninfo, so it streams.
            .args(["-R", "-X", "stream", "-c", "fast", "--no-sync"]);
        run(&mut backup, "pg_basebackup")?;
        let mut replica = PgCluster {
            endpoint: Endpoint {
                host: path_str(&socket_dir)?.to_string(),
                port: 0,
                log_path: dir.join("postgresql.log"),
            },
            dir,
            data_dir,
            bin: self.bin.clone(),
            run_as: self.run_as.clone(),
            running: false,
            owned: true,
        };
        replica.spawn_watchdog()?;
        replica.start_on_free_port()?;
        Ok(replica)
    }

    /// Promotes a replica to primary (`pg_ctl promote -w`).
    pub fn promote(&self) -> Result<()> {
        run(
            self.pg_ctl().args(["promote", "-w", "-t", "60"]),
            "pg_ctl promote",
        )?;
        Ok(())
    }

    /// Stops the server as a crash would (`-m immediate`: no checkpoint,
    /// connections cut).
    pub fn kill(&mut self) -> Result<()> {
        run(
            self.pg_ctl()
                .args(["stop", "-m", "immediate", "-w", "-t", "30"]),
            "pg_ctl stop -m immediate",
        )?;
        self.running = false;
        Ok(())
    }

    /// Writes `name` into the data directory, owned by the server's user
    /// with `mode` (certificates and keys for `ssl = on`), and returns its
    /// path.
    pub fn install_file(&self, name: &str, contents: &[u8], mode: u32) -> Result<PathBuf> {
        let path = self.data_dir.join(name);
        fs::write(&path, contents)
            .map_err(|e| SandboxError::io(format!("write {}", path.display()), e))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))
            .map_err(|e| SandboxError::io(format!("chmod {}", path.display()), e))?;
        self.run_as.give(&path)?;
        Ok(path)
    }

    /// Replaces `pg_hba.conf` (applied by the next start or
    /// [`PgCluster::apply_settings`]).
    pub fn set_hba(&self, text: &str) -> Result<()> {
        self.install_file("pg_hba.conf", text.as_bytes(), 0o600)
            .map(|_| ())
    }

    fn write_settings(&self) -> Result<()> {
        let path = self.data_dir.join("mailgend-sandbox.conf");
        let text = format!(
            "# Written by mailgend's sandbox: a throw-away cluster, tuned for speed.\n\
             listen_addresses = '127.0.0.1'\n\
             port = {port}\n\
             unix_socket_directories = '{sock}'\n\
             max_connections = 300\n\
             shared_buffers = 32MB\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n\
             timezone = 'UTC'\n\
             log_timezone = 'UTC'\n\
             log_line_prefix = '%m [%p] %q%u@%d '\n\
             include_if_exists 'mailgend-extra.conf'\n",
            port = self.endpoint.port,
            sock = self.endpoint.host.replace('\'', "''"),
        );
        fs::write(&path, text)
            .map_err(|e| SandboxError::io(format!("write {}", path.display()), e))?;
        self.run_as.give(&path)
    }

    fn pg_ctl(&self) -> Command {
        let mut cmd = self.run_as.command(&self.bin.tool("pg_ctl"));
        cmd.current_dir(&self.dir).arg("-D").arg(&self.data_dir);
        cmd
    }

    fn pg_ctl_start(&mut self) -> Result<()> {
        let mut cmd = self.pg_ctl();
        cmd.arg("-l")
            .arg(&self.endpoint.log_path)
            .args(["-w", "-t", "60", "start"])
            // Keep the server out of our process group: a test runner
            // killing the group must not take the shared server with it.
            .process_group(0);
        match run(&mut cmd, "pg_ctl start") {
            Ok(_) => {
                self.running = true;
                Ok(())
            }
            Err(SandboxError::Command {
                program,
                status,
                output,
            }) => Err(SandboxError::Command {
                program,
                status,
                output: format!(
                    "{output}\n--- {} ---\n{}",
                    self.endpoint.log_path.display(),
                    last_lines(&self.endpoint.log_path, 20)
                ),
            }),
            Err(e) => Err(e),
        }
    }

    /// The watchdog: once our process is gone, stop the server and remove
    /// the directory (unless the directory is already gone).
    fn spawn_watchdog(&self) -> Result<()> {
        let data = sh_quote(path_str(&self.data_dir)?);
        let script = format!(
            "while kill -0 {pid} 2>/dev/null && [ -d {data} ]; do sleep 1; done; \
             kill -0 {pid} 2>/dev/null && exit 0; \
             if [ -f {data}/postmaster.pid ]; then \
               {prefix}{pg_ctl} -D {data} stop -m immediate -w -t 30 >/dev/null 2>&1; \
             fi; \
             rm -rf {dir}",
            pid = std::process::id(),
            prefix = self.run_as.shell_prefix(),
            pg_ctl = sh_quote(path_str(&self.bin.tool("pg_ctl"))?),
            dir = sh_quote(path_str(&self.dir)?),
        );
        spawn_detached_sh(&script)
    }

    /// Stops the server (`-m fast`, falling back to `immediate`); the data
    /// stays and [`PgCluster::start_again`] brings it back on the same port.
    pub fn stop(&mut self) -> Result<()> {
        if !self.running {
            return Ok(());
        }
        let fast = run(
            self.pg_ctl().args(["stop", "-m", "fast", "-w", "-t", "30"]),
            "pg_ctl stop -m fast",
        );
        if fast.is_err() {
            run(
                self.pg_ctl()
                    .args(["stop", "-m", "immediate", "-w", "-t", "30"]),
                "pg_ctl stop -m immediate",
            )?;
        }
        self.running = false;
        Ok(())
    }

    /// Starts a stopped cluster again, on the same port and socket.
    pub fn start_again(&mut self) -> Result<()> {
        if self.running {
            return Ok(());
        }
        self.pg_ctl_start()
    }

    pub fn is_running(&self) -> bool {
        self.running
    }

    /// Adds server settings (postgresql.conf lines) and restarts the
    /// server so that settings needing a restart (`shared_buffers`,
    /// `shared_preload_libraries`) apply. The benchmark uses this to run
    /// with a production-sized buffer cache instead of the tests' 32 MB.
    pub fn apply_settings(&mut self, lines: &str) -> Result<()> {
        let path = self.data_dir.join("mailgend-extra.conf");
        fs::write(&path, lines)
            .map_err(|e| SandboxError::io(format!("write {}", path.display()), e))?;
        self.run_as.give(&path)?;
        self.stop()?;
        self.start_again()
    }

    /// The Unix socket directory, usable as libpq's `host`.
    pub fn host(&self) -> &str {
        &self.endpoint.host
    }

    /// The TCP port on 127.0.0.1 (also the socket's port number).
    pub fn port(&self) -> u16 {
        self.endpoint.port
    }

    pub fn superuser(&self) -> &'static str {
        SUPERUSER
    }

    /// The server log (kept across [`PgCluster::stop`]/[`PgCluster::start_again`]).
    pub fn log_path(&self) -> &Path {
        &self.endpoint.log_path
    }

    /// The cluster's directory (data, socket and log inside).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A fresh, uniquely named database (see [`TestDb`]).
    pub fn create_database(&self) -> Result<TestDb> {
        create_database_blocking(&self.endpoint)
    }

    /// The same as [`PgCluster::create_database`], for async code.
    pub async fn create_database_async(&self) -> Result<TestDb> {
        create_database(&self.endpoint).await
    }

    /// The process-wide shared cluster (see the module documentation).
    pub fn shared() -> Result<&'static SharedCluster> {
        static SHARED: OnceLock<SharedCluster> = OnceLock::new();
        static INIT: Mutex<()> = Mutex::new(());
        if let Some(shared) = SHARED.get() {
            return Ok(shared);
        }
        let _guard = INIT.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(shared) = SHARED.get() {
            return Ok(shared);
        }
        let shared = SharedCluster::attach(&shared_dir(), SHARED_IDLE)?;
        Ok(SHARED.get_or_init(|| shared))
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        let _ = self.stop();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------
// The shared cluster

/// `$TMPDIR/mailgend-test-pg-<uid>-<hash of the workspace path>`: one per
/// user and checkout, so two checkouts' test runs do not share a server.
fn shared_dir() -> PathBuf {
    // FNV-1a: tiny, stable across Rust versions (unlike DefaultHasher).
    let hash = env!("CARGO_MANIFEST_DIR")
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
    std::env::temp_dir().join(format!(
        "mailgend-test-pg-{}-{:016x}",
        effective_uid(),
        hash
    ))
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct SharedState {
    host: String,
    port: u16,
    log_path: PathBuf,
}

/// The cluster shared by all test processes of a run (see the module
/// documentation for its lifetime). This process uses it for as long as
/// the value lives; [`PgCluster::shared`] keeps it for the process's life.
#[derive(Debug)]
pub struct SharedCluster {
    endpoint: Endpoint,
    dir: PathBuf,
    /// Our shared lock on `users.lock`: while held, the keeper leaves the
    /// cluster alone.
    _users: File,
}

impl SharedCluster {
    /// Attaches to the shared cluster in `dir`, creating it (and its
    /// keeper) if needed; the keeper removes it once no process has been
    /// attached for `idle`. [`PgCluster::shared`] uses this with the
    /// per-workspace directory; tests of the lifetime logic use their own.
    // std's file locks are stable since Rust 1.89; the crate's declared
    // rust-version (1.85) needs raising (reported to the lead).
    #[allow(clippy::incompatible_msrv)]
    pub fn attach(dir: &Path, idle: Duration) -> Result<SharedCluster> {
        let setup = lock_setup(dir)?;
        let state_path = dir.join("state.json");
        let state = fs::read(&state_path)
            .ok()
            .and_then(|b| serde_json::from_slice::<SharedState>(&b).ok());
        let endpoint = match state {
            Some(s) if answers(&s.host, s.port) => Endpoint {
                host: s.host,
                port: s.port,
                log_path: s.log_path,
            },
            _ => recreate_shared(dir, &state_path)?,
        };
        ensure_keeper(dir, idle)?;
        let users = open_lock_file(&dir.join("users.lock"))?;
        users
            .lock_shared()
            .map_err(|e| SandboxError::io("lock users.lock", e))?;
        drop(setup);
        Ok(SharedCluster {
            endpoint,
            dir: dir.to_path_buf(),
            _users: users,
        })
    }

    /// The Unix socket directory, usable as libpq's `host`.
    pub fn host(&self) -> &str {
        &self.endpoint.host
    }

    pub fn port(&self) -> u16 {
        self.endpoint.port
    }

    pub fn superuser(&self) -> &'static str {
        SUPERUSER
    }

    /// The server log, shared by all tests: its lines carry `user@database`
    /// (`log_line_prefix`), so look for your own database's name.
    pub fn log_path(&self) -> &Path {
        &self.endpoint.log_path
    }

    /// The shared cluster's directory (locks, state and the cluster).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A fresh, uniquely named database (see [`TestDb`]).
    pub fn create_database(&self) -> Result<TestDb> {
        create_database_blocking(&self.endpoint)
    }

    /// The same as [`SharedCluster::create_database`], for async code.
    pub async fn create_database_async(&self) -> Result<TestDb> {
        create_database(&self.endpoint).await
    }
}

fn open_lock_file(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| SandboxError::io(format!("open {}", path.display()), e))
}

/// Takes `dir/setup.lock` exclusively. The keeper removes the whole
/// directory while holding this lock, so after waiting we check that the
/// path still names the file we locked; if not, we locked a deleted file
/// and start over.
// std's file locks are stable since Rust 1.89; the crate's declared
// rust-version (1.85) needs raising (reported to the lead).
#[allow(clippy::incompatible_msrv)]
fn lock_setup(dir: &Path) -> Result<File> {
    let path = dir.join("setup.lock");
    for _ in 0..100 {
        fs::create_dir_all(dir)
            .map_err(|e| SandboxError::io(format!("create {}", dir.display()), e))?;
        let file = match open_lock_file(&path) {
            Ok(f) => f,
            // The keeper removed the directory between our two calls.
            Err(SandboxError::Io { source, .. }) if source.kind() == ErrorKind::NotFound => {
                continue
            }
            Err(e) => return Err(e),
        };
        file.lock()
            .map_err(|e| SandboxError::io("lock setup.lock", e))?;
        let locked = file
            .metadata()
            .map_err(|e| SandboxError::io("stat setup.lock", e))?;
        match fs::metadata(&path) {
            Ok(now) if now.dev() == locked.dev() && now.ino() == locked.ino() => {
                // World-traversable so `postgres` can reach the cluster dir.
                let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o755));
                return Ok(file);
            }
            _ => continue,
        }
    }
    Err(SandboxError::Invalid(format!(
        "could not lock {} (directory keeps disappearing)",
        path.display()
    )))
}

/// Does a server accept connections at this socket directory and port?
fn answers(host: &str, port: u16) -> bool {
    let Ok(bin) = PgBin::find() else {
        return false;
    };
    let isready = bin.tool("pg_isready");
    if isready.is_file() {
        Command::new(isready)
            .args(["-q", "-t", "5", "-h", host, "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    } else {
        std::os::unix::net::UnixStream::connect(Path::new(host).join(format!(".s.PGSQL.{port}")))
            .is_ok()
    }
}

/// Under `setup.lock`: removes whatever a previous (crashed) run left in
/// `dir/cluster` and starts a new cluster there.
fn recreate_shared(dir: &Path, state_path: &Path) -> Result<Endpoint> {
    let cluster_dir = dir.join("cluster");
    let data = cluster_dir.join("data");
    if data.join("postmaster.pid").exists() {
        // A server that does not answer (or answers elsewhere): make sure
        // it is gone before its directory is.
        if let (Ok(bin), Ok(run_as)) = (PgBin::find(), RunAs::detect()) {
            let _ = run(
                run_as
                    .command(&bin.tool("pg_ctl"))
                    .current_dir(dir)
                    .arg("-D")
                    .arg(&data)
                    .args(["stop", "-m", "immediate", "-w", "-t", "30"]),
                "pg_ctl stop (stale shared cluster)",
            );
        }
    }
    let _ = fs::remove_file(state_path);
    match fs::remove_dir_all(&cluster_dir) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => {
            return Err(SandboxError::io(
                format!("remove {}", cluster_dir.display()),
                e,
            ))
        }
    }
    let mut cluster = PgCluster::init_and_start(&cluster_dir)?;
    // From here on the keeper owns the server's lifetime.
    cluster.owned = false;
    let endpoint = cluster.endpoint.clone();
    let state = SharedState {
        host: endpoint.host.clone(),
        port: endpoint.port,
        log_path: endpoint.log_path.clone(),
    };
    let tmp = dir.join("state.json.tmp");
    fs::write(&tmp, serde_json::to_vec(&state).expect("state serialises"))
        .and_then(|()| fs::rename(&tmp, state_path))
        .map_err(|e| SandboxError::io(format!("write {}", state_path.display()), e))?;
    Ok(endpoint)
}

/// Under `setup.lock`: starts a keeper unless one holds `keeper.lock`.
// std's file locks are stable since Rust 1.89; the crate's declared
// rust-version (1.85) needs raising (reported to the lead).
#[allow(clippy::incompatible_msrv)]
fn ensure_keeper(dir: &Path, idle: Duration) -> Result<()> {
    let keeper_lock = open_lock_file(&dir.join("keeper.lock"))?;
    match keeper_lock.try_lock() {
        Err(std::fs::TryLockError::WouldBlock) => return Ok(()),
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(SandboxError::io("probe keeper.lock", e))
        }
        Ok(()) => {}
    }
    drop(keeper_lock);
    let bin = PgBin::find()?;
    let run_as = RunAs::detect()?;
    let pg_ctl = format!(
        "{}{}",
        run_as.shell_prefix(),
        sh_quote(path_str(&bin.tool("pg_ctl"))?)
    );
    // Two keepers may be started in a race; the second one finds
    // keeper.lock taken and exits at once.
    let script = format!(
        r#"B={dir}
exec 9>>"$B/keeper.lock" || exit 0
flock -n 9 || exit 0
idle=0
while [ -d "$B" ]; do
  sleep 1
  if flock -n -x "$B/users.lock" true 2>/dev/null; then idle=$((idle+1)); else idle=0; fi
  if [ "$idle" -ge {idle} ]; then
    if flock -x "$B/setup.lock" sh -c '
        flock -n -x "$1/users.lock" true || exit 1
        if [ -f "$1/cluster/data/postmaster.pid" ]; then
          {pg_ctl} -D "$1/cluster/data" stop -m fast -w -t 30 >/dev/null 2>&1 ||
          {pg_ctl} -D "$1/cluster/data" stop -m immediate -w -t 30 >/dev/null 2>&1
        fi
        rm -rf "$1"' sh "$B"; then exit 0; fi
    idle=0
  fi
done
"#,
        dir = sh_quote(path_str(dir)?),
        idle = idle.as_secs().max(1),
        // Inside the single-quoted `sh -c` program: no single quotes allowed.
        pg_ctl = pg_ctl.replace('\'', "'\\''"),
    );
    spawn_detached_sh(&script)
}

// ---------------------------------------------------------------------------
// Databases

fn superuser_config(host: &str, port: u16, dbname: &str) -> tokio_postgres::Config {
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

async fn connect_config(config: &tokio_postgres::Config) -> Result<Client> {
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        // Errors surface on the client; a dropped database ends it too.
        let _ = connection.await;
    });
    Ok(client)
}

/// Runs `fut` to completion on a throw-away runtime in a thread of its own,
/// so sync callers work both inside and outside a tokio runtime.
fn block_on_own_thread<T: Send + 'static>(
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

fn create_database_blocking(endpoint: &Endpoint) -> Result<TestDb> {
    let endpoint = endpoint.clone();
    block_on_own_thread(async move { create_database(&endpoint).await })?
}

async fn create_database(endpoint: &Endpoint) -> Result<TestDb> {
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
    roles: Mutex<Vec<String>>,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_variant_replaces_only_extra() {
        let jsonb = events_table_sql(ExtraType::Jsonb);
        let json = events_table_sql(ExtraType::Json);
        assert_eq!(jsonb.matches("\"extra\" jsonb,").count(), 1);
        assert!(json.contains("\"extra\" json,"));
        assert!(!json.contains("\"extra\" jsonb"));
        assert_eq!(jsonb.len(), json.len() + 1);
    }

    #[test]
    fn shell_quoting() {
        assert_eq!(sh_quote("/tmp/a b"), "'/tmp/a b'");
        assert_eq!(sh_quote("it's"), "'it'\\''s'");
    }
}
