//! The real `mailgend route` binary as the router tests run it: started on
//! `DIR/configuration.yml`, its stderr appended to `DIR/route.log`, ready
//! once the log says `mailgend route running` (one more time than before,
//! so a restart waits for the new process), signalled with `kill`, killed
//! and reaped on drop. Included with `#[path]` by the tests that start the
//! router; each uses part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The line the router logs once it accepts connections.
pub const READY: &str = "mailgend route running";

/// A running `mailgend route`.
pub struct RouteProcess {
    pub child: Child,
    pub log: PathBuf,
    /// How long [`RouteProcess::wait_log`] waits.
    wait: Duration,
}

impl RouteProcess {
    /// Spawns `mailgend route -c CONFIG` at `LOGLEVEL=level`, its stderr
    /// appended to `log`; does not wait.
    pub fn spawn(config: &Path, log: &Path, level: &str, wait: Duration) -> RouteProcess {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_mailgend"))
            .arg("route")
            .arg("-c")
            .arg(config)
            .env("LOGLEVEL", level)
            .env_remove("MAILGEND_LOG")
            .env_remove("NOTIFY_SOCKET")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn mailgend route");
        RouteProcess {
            child,
            log: log.to_path_buf(),
            wait,
        }
    }

    /// Starts on `dir/configuration.yml` at DEBUG and waits until it runs.
    pub fn start(dir: &Path, wait: Duration) -> RouteProcess {
        Self::start_at(dir, "DEBUG", wait)
    }

    /// [`RouteProcess::start`] at another `LOGLEVEL`.
    pub fn start_at(dir: &Path, level: &str, wait: Duration) -> RouteProcess {
        let log = dir.join("route.log");
        // Appended: a restarted router's lines follow the killed one's.
        let before = read_lossy(&log).matches(READY).count();
        let r = Self::spawn(&dir.join("configuration.yml"), &log, level, wait);
        r.wait_log(READY, before + 1);
        r
    }

    pub fn log(&self) -> String {
        read_lossy(&self.log)
    }

    /// Waits until `needle` occurs `n` times in the log (panics with the
    /// log after the wait).
    pub fn wait_log(&self, needle: &str, n: usize) {
        let start = Instant::now();
        while self.log().matches(needle).count() < n {
            assert!(
                start.elapsed() < self.wait,
                "no {n}× {needle:?} in the log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }

    /// SIGTERM, then the exit code.
    pub fn stop(mut self) -> Option<i32> {
        self.signal("TERM");
        self.child.wait().unwrap().code()
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RouteProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The log so far; a line cut mid-character does not hide the rest.
fn read_lossy(path: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned()
}
