//! Is a file that holds a secret (a signing key, a password, a
//! configuration with a password in it) readable by more than its owner?
//!
//! Only a WARN, never a refusal: intelmqcbmail and mail2alert read such
//! files without a word, and refusing would stop a working installation
//! at its upgrade. Both config loaders call [`exposure`] for each such file.
//!
//! Not exposed: no permission for others, and for the group only when it
//! is the daemon's own group — the group `mailgend` (the Debian package's
//! design: `root:mailgend 0640`, docs/install.md) or the group the process
//! runs with.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// The group the Debian package creates for the daemons.
pub const DAEMON_GROUP: &str = "mailgend";

/// Why `path` is readable by others than its owner and the daemon's own
/// group, and what to do (`None`: it is not, or it cannot be examined —
/// reading it will report that).
pub fn exposure(path: &Path) -> Option<String> {
    let meta = std::fs::metadata(path).ok()?;
    exposure_of(meta.mode() & 0o7777, meta.gid(), &own_groups(), path)
}

fn exposure_of(mode: u32, gid: u32, own: &[u32], path: &Path) -> Option<String> {
    let who = if mode & 0o007 != 0 {
        "every user of the host"
    } else if mode & 0o070 != 0 && !own.contains(&gid) {
        "the members of its group"
    } else {
        return None;
    };
    Some(format!(
        "{} holds a secret and is readable by {who} (mode {:04o}, group {gid}); \
         chmod 0600, or chgrp {DAEMON_GROUP} and chmod 0640",
        path.display(),
        mode
    ))
}

/// The gids that may read a secret besides the owner: the group named
/// [`DAEMON_GROUP`] (from /etc/group, where `adduser --system` puts it)
/// and the process's effective group.
fn own_groups() -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(text) = std::fs::read_to_string("/etc/group") {
        out.extend(text.lines().find_map(|l| {
            let mut f = l.split(':');
            (f.next() == Some(DAEMON_GROUP))
                .then(|| f.nth(1)?.parse::<u32>().ok())
                .flatten()
        }));
    }
    if let Ok(text) = std::fs::read_to_string("/proc/self/status") {
        // Gid: real effective saved fs
        out.extend(
            text.lines()
                .find_map(|l| l.strip_prefix("Gid:"))
                .and_then(|v| v.split_whitespace().nth(1)?.parse::<u32>().ok()),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn modes() {
        let p = Path::new("/etc/k");
        let own = [110];
        assert_eq!(exposure_of(0o600, 0, &own, p), None);
        assert_eq!(exposure_of(0o400, 0, &own, p), None);
        // root:mailgend 0640, the package's design.
        assert_eq!(exposure_of(0o640, 110, &own, p), None);
        let w = exposure_of(0o640, 0, &own, p).unwrap();
        assert!(
            w.contains("members of its group (mode 0640, group 0)"),
            "{w}"
        );
        let w = exposure_of(0o644, 110, &own, p).unwrap();
        assert!(
            w.starts_with("/etc/k holds a secret and is readable by every user"),
            "{w}"
        );
        assert!(exposure_of(0o604, 110, &own, p).is_some());
    }

    #[test]
    fn real_files() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("key");
        std::fs::write(&f, "secret").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(exposure(&f), None);
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(exposure(&f).unwrap().contains("mode 0644"));
        // Group-readable by our own group: fine.
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(exposure(&f), None);
        assert_eq!(exposure(&dir.path().join("missing")), None);
    }
}
