//! Fail-over helpers: a streaming replica, promotion, a crash-like stop.

use super::*;

impl PgCluster {
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
}
