//! Finding PostgreSQL's programs and the user they run as (PostgreSQL
//! refuses root), and the process helpers the rest uses.

use super::*;

/// Where the PostgreSQL server programs are.
#[derive(Debug, Clone)]
pub(super) struct PgBin {
    pub(super) dir: PathBuf,
}

impl PgBin {
    /// `$MAILGEND_PG_BIN`, else the directory of `initdb`/`pg_ctl` on PATH,
    /// else the newest `/usr/lib/postgresql/<version>/bin` (Debian keeps the
    /// server programs off PATH).
    pub(super) fn find() -> Result<PgBin> {
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

    pub(super) fn tool(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// Who runs the PostgreSQL programs.
#[derive(Debug, Clone)]
pub(super) enum RunAs {
    CurrentUser,
    /// We are root: run as this system user via `runuser`.
    User {
        name: String,
        uid: u32,
        gid: u32,
    },
}

impl RunAs {
    pub(super) fn detect() -> Result<RunAs> {
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

    pub(super) fn command(&self, program: &Path) -> Command {
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
    pub(super) fn shell_prefix(&self) -> String {
        match self {
            RunAs::CurrentUser => String::new(),
            RunAs::User { name, .. } => format!("runuser -u {} -- ", sh_quote(name)),
        }
    }

    pub(super) fn give(&self, path: &Path) -> Result<()> {
        if let RunAs::User { uid, gid, .. } = self {
            std::os::unix::fs::chown(path, Some(*uid), Some(*gid))
                .map_err(|e| SandboxError::io(format!("chown {}", path.display()), e))?;
        }
        Ok(())
    }
}

/// The effective uid: the owner of `/proc/self` (no libc needed).
pub(super) fn effective_uid() -> u32 {
    fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(u32::MAX)
}

pub(super) fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

pub(super) fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .ok_or_else(|| SandboxError::Invalid(format!("path {path:?} is not UTF-8")))
}

/// Runs `cmd` to completion; a non-zero exit is an error carrying its output.
pub(super) fn run(cmd: &mut Command, what: &str) -> Result<String> {
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

pub(super) fn free_port() -> Result<u16> {
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
pub(super) fn spawn_detached_sh(script: &str) -> Result<()> {
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

pub(super) fn last_lines(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
