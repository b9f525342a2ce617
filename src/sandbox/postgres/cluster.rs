//! A private cluster's life cycle: `initdb`, start on a free port with a
//! watchdog, stop, start again, drop.

use super::*;

/// Where a cluster the sandbox started can be reached.
#[derive(Debug, Clone)]
pub(super) struct Endpoint {
    /// The Unix socket directory (libpq's `host` for sockets).
    pub(super) host: String,
    pub(super) port: u16,
    pub(super) log_path: PathBuf,
}

/// A PostgreSQL cluster of our own, in a directory of our own.
///
/// Stopped and its directory removed on drop.
#[derive(Debug)]
pub struct PgCluster {
    pub(super) dir: PathBuf,
    pub(super) data_dir: PathBuf,
    pub(super) endpoint: Endpoint,
    pub(super) bin: PgBin,
    pub(super) run_as: RunAs,
    pub(super) running: bool,
    /// False for the shared cluster, whose lifetime the keeper owns.
    pub(super) owned: bool,
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

    pub(super) fn init_and_start(dir: &Path) -> Result<PgCluster> {
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

    pub(super) fn start_on_free_port(&mut self) -> Result<()> {
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

    pub(super) fn pg_ctl(&self) -> Command {
        let mut cmd = self.run_as.command(&self.bin.tool("pg_ctl"));
        cmd.current_dir(&self.dir).arg("-D").arg(&self.data_dir);
        cmd
    }

    pub(super) fn pg_ctl_start(&mut self) -> Result<()> {
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
    pub(super) fn spawn_watchdog(&self) -> Result<()> {
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
            self.kill()?;
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
