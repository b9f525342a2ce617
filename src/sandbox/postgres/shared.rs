//! The cluster every test process of a run shares (see the module doc of
//! `postgres`): its directory, locks, keeper and re-creation.

use super::*;

/// `$TMPDIR/mailgend-test-pg-<uid>-<hash of the workspace path>`: one per
/// user and checkout, so two checkouts' test runs do not share a server.
pub(super) fn shared_dir() -> PathBuf {
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
pub(super) struct SharedState {
    pub(super) host: String,
    pub(super) port: u16,
    pub(super) log_path: PathBuf,
}

/// The cluster shared by all test processes of a run (see the module
/// documentation for its lifetime). This process uses it for as long as
/// the value lives; [`PgCluster::shared`] keeps it for the process's life.
#[derive(Debug)]
pub struct SharedCluster {
    pub(super) endpoint: Endpoint,
    pub(super) dir: PathBuf,
    /// Our shared lock on `users.lock`: while held, the keeper leaves the
    /// cluster alone.
    pub(super) _users: File,
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

pub(super) fn open_lock_file(path: &Path) -> Result<File> {
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
pub(super) fn lock_setup(dir: &Path) -> Result<File> {
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
pub(super) fn answers(host: &str, port: u16) -> bool {
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
pub(super) fn recreate_shared(dir: &Path, state_path: &Path) -> Result<Endpoint> {
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
pub(super) fn ensure_keeper(dir: &Path, idle: Duration) -> Result<()> {
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
