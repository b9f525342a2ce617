//! Server settings and files in the data directory (`postgresql.conf`
//! lines, `pg_hba.conf`, certificates).

use super::*;

impl PgCluster {
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

    pub(super) fn write_settings(&self) -> Result<()> {
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
}
