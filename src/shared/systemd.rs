//! Talking to systemd: readiness, reload and stop notifications, the
//! watchdog, and whether stderr goes to the journal.
//!
//! This module owns every use of the service manager's protocols so the rest
//! of the service says *what* happened (`ready`, `reloading`, …) and never
//! how systemd wants to hear it.
//!
//! The `sd_notify(3)` wire format is a few `KEY=VALUE` lines in one datagram
//! on the `AF_UNIX` socket named by `NOTIFY_SOCKET`. We use the `sd-notify`
//! crate for it rather than linking libsystemd (a C dependency for one
//! `sendto`) or writing the socket code ourselves: the crate is small, pure
//! Rust on top of `libc`, handles abstract socket names (`@…`), and is a
//! no-op when `NOTIFY_SOCKET` is unset, which is exactly what a program that
//! is also run by hand from a shell or by the tests needs.
//!
//! Every function here is best effort: a failed notification is logged at
//! DEBUG and otherwise ignored, because a mailer must not stop sending mails
//! because systemd went away (systemd's own timeouts catch a service that
//! really never says READY or stops petting the watchdog).

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use sd_notify::NotifyState;

/// Sends `states` if started by systemd; logs and swallows errors.
fn send(states: &[NotifyState<'_>]) {
    // The env lookup is the "cheap no-op" check; `sd_notify::notify` repeats
    // it, but we avoid building the message at all without a socket.
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!("sd_notify failed: {e}");
    }
}

/// Tells systemd the service is up (`READY=1`) with a one-line status.
///
/// Called once after configuration, database and signing key are usable,
/// and again after every reload: with `Type=notify-reload` (and harmlessly
/// with `Type=notify`) that second READY=1 is how systemd learns the reload
/// has finished.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Tells systemd a configuration reload has started.
///
/// systemd ≥ 253 requires `MONOTONIC_USEC=` next to `RELOADING=1` for
/// `Type=notify-reload` (it uses it to tell this reload from an older one);
/// older versions ignore the extra field. Finish the reload with [`ready`].
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        // CLOCK_MONOTONIC cannot really fail on Linux; still say RELOADING.
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// Tells systemd the service is shutting down (`STOPPING=1`), so a drain
/// that takes a while is shown as "deactivating" rather than "active".
pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// Sets the free-form status line `systemctl status` shows.
pub fn status(text: &str) {
    send(&[NotifyState::Status(text)]);
}

/// Pets the watchdog (`WATCHDOG=1`). The main loop calls this every
/// [`watchdog_interval`]; when it stops (a stuck loop), systemd kills and
/// restarts the service after `WatchdogSec`.
pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// How often to call [`watchdog`]: half of `WATCHDOG_USEC`, as
/// `sd_watchdog_enabled(3)` recommends, or `None` when no watchdog is set
/// for this process (no `WATCHDOG_USEC`, or `WATCHDOG_PID` names another
/// process, e.g. we are a child of the service's main process).
pub fn watchdog_interval() -> Option<Duration> {
    interval_from(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

/// [`watchdog_interval`] on explicit values, so the rule is testable without
/// touching the process environment.
fn interval_from(usec: Option<&str>, pid: Option<&str>, our_pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok()?;
    if usec == 0 {
        return None;
    }
    if let Some(pid) = pid {
        // An unparsable WATCHDOG_PID is not ours.
        if pid.trim().parse::<u32>().ok()? != our_pid {
            return None;
        }
    }
    Some(Duration::from_micros(usec / 2))
}

/// True when stderr is connected to the journal, i.e. `JOURNAL_STREAM`
/// names stderr's device and inode (`systemd.exec(5)`: checking the variable
/// alone is wrong, since it is inherited by children whose stderr was
/// redirected elsewhere).
pub fn under_journald() -> bool {
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.to_str().and_then(parse_journal_stream) else {
        return false;
    };
    match stderr_dev_ino() {
        Some((d, i)) => d == dev && i == ino,
        None => false,
    }
}

/// Parses `JOURNAL_STREAM`'s `DEVICE:INODE` (both decimal).
fn parse_journal_stream(s: &str) -> Option<(u64, u64)> {
    let (dev, ino) = s.split_once(':')?;
    Some((dev.parse().ok()?, ino.parse().ok()?))
}

/// `fstat(2)` of file descriptor 2: device and inode.
fn stderr_dev_ino() -> Option<(u64, u64)> {
    use std::os::fd::AsFd;
    // A duplicate of fd 2 so `File` can own (and close) it; `File::metadata`
    // is `fstat`, which works on sockets and pipes as well as files.
    let fd = std::io::stderr().as_fd().try_clone_to_owned().ok()?;
    let meta = File::from(fd).metadata().ok()?;
    Some((meta.dev(), meta.ino()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;

    #[test]
    fn watchdog_interval_rule() {
        assert_eq!(
            interval_from(Some("30000000"), None, 42),
            Some(Duration::from_secs(15))
        );
        assert_eq!(
            interval_from(Some("30000000"), Some("42"), 42),
            Some(Duration::from_secs(15))
        );
        assert_eq!(interval_from(Some("30000000"), Some("43"), 42), None);
        assert_eq!(interval_from(Some("30000000"), Some("x"), 42), None);
        assert_eq!(interval_from(None, Some("42"), 42), None);
        assert_eq!(interval_from(Some("0"), None, 42), None);
        assert_eq!(interval_from(Some("soon"), None, 42), None);
    }

    #[test]
    fn journal_stream_parsing() {
        assert_eq!(parse_journal_stream("8:123456"), Some((8, 123456)));
        assert_eq!(parse_journal_stream("8-123456"), None);
        assert_eq!(parse_journal_stream(":1"), None);
        assert_eq!(parse_journal_stream("1:"), None);
    }

    fn recv(sock: &UnixDatagram) -> String {
        let mut buf = [0u8; 4096];
        let n = sock.recv(&mut buf).expect("a notification datagram");
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    /// Every test that touches NOTIFY_SOCKET, WATCHDOG_* or JOURNAL_STREAM is
    /// in this one function: the environment is process-global and tests in
    /// one binary run on parallel threads.
    #[test]
    fn notifications_reach_a_real_socket_and_env_rules_hold() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // Rust 2021: set_var is safe; see the function comment for why this
        // does not race with the other tests of this module.
        std::env::set_var("NOTIFY_SOCKET", &path);

        ready("ready: 3 pending");
        assert_eq!(recv(&sock), "READY=1\nSTATUS=ready: 3 pending\n");

        watchdog();
        assert_eq!(recv(&sock), "WATCHDOG=1\n");

        status("sending 2 groups");
        assert_eq!(recv(&sock), "STATUS=sending 2 groups\n");

        reloading();
        let msg = recv(&sock);
        let mut lines = msg.lines();
        assert_eq!(lines.next(), Some("RELOADING=1"));
        let usec = lines
            .next()
            .and_then(|l| l.strip_prefix("MONOTONIC_USEC="))
            .expect("MONOTONIC_USEC= after RELOADING=1");
        let usec: u64 = usec.parse().expect("decimal microseconds");
        assert!(usec > 0);
        assert_eq!(lines.next(), None);

        stopping();
        assert_eq!(recv(&sock), "STOPPING=1\n");

        // Without NOTIFY_SOCKET nothing is sent (and nothing fails).
        std::env::remove_var("NOTIFY_SOCKET");
        ready("nobody listens");
        sock.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(
            sock.recv(&mut buf).unwrap_err().kind(),
            std::io::ErrorKind::WouldBlock
        );

        // The watchdog, read from the real environment.
        std::env::set_var("WATCHDOG_USEC", "20000000");
        std::env::set_var("WATCHDOG_PID", std::process::id().to_string());
        assert_eq!(watchdog_interval(), Some(Duration::from_secs(10)));
        std::env::set_var("WATCHDOG_PID", "1");
        assert_eq!(watchdog_interval(), None);
        std::env::remove_var("WATCHDOG_PID");
        assert_eq!(watchdog_interval(), Some(Duration::from_secs(10)));
        std::env::remove_var("WATCHDOG_USEC");
        assert_eq!(watchdog_interval(), None);

        // JOURNAL_STREAM must name stderr itself, not just be set.
        let (dev, ino) = stderr_dev_ino().expect("fstat of stderr");
        std::env::set_var("JOURNAL_STREAM", format!("{dev}:{ino}"));
        assert!(under_journald());
        std::env::set_var("JOURNAL_STREAM", format!("{dev}:{}", ino.wrapping_add(1)));
        assert!(!under_journald());
        std::env::remove_var("JOURNAL_STREAM");
        assert!(!under_journald());
    }
}
