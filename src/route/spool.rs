//! The router's durable queue: work accepted from a client (250 sent) but
//! not yet done, because the relay or Slack failed temporarily.
//!
//! One file per accepted message, `<id>.msg` in the spool directory, where
//! the id sorts by arrival (nanoseconds since the epoch, a counter, the
//! process id), so reading the directory gives delivery order. A file holds
//! a magic line, one JSON line with the envelope and every job (outbound
//! transactions with a state per recipient, Slack posts, bounces) and then
//! the message bodies byte for byte, so 8-bit data needs no encoding.
//!
//! Durability: a file is written under `tmp/`, fsynced, renamed into place
//! and the directory fsynced before anyone hears "250"; progress (a
//! recipient that accepted) is recorded the same way before the next
//! attempt, and a finished entry's removal is fsynced too, so a crash can
//! neither lose an entry nor resurrect a delivered one. A file that cannot
//! be read is moved to `bad/` with an ERROR, never deleted.
//!
//! All functions here block (file I/O and fsync); async callers run them
//! with `spawn_blocking`.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

const MAGIC: &[u8] = b"mailgend-route-spool 1\n";
const SUFFIX: &str = ".msg";

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("spool file {}: {reason}", path.display())]
    Bad { path: PathBuf, reason: String },
}

/// Where a recipient or a post stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Pending,
    /// Accepted by the relay / posted: never sent again.
    Done,
    /// Refused for good; reported (bounce or ERROR log).
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipient {
    pub address: String,
    pub state: State,
    /// The last failure, for logs and the bounce.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A `Failed` recipient already reported in a bounce.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reported: bool,
}

/// One piece of work of an entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Job {
    /// An outbound SMTP transaction; `mail_from: None` is `<>`.
    Mail {
        mail_from: Option<String>,
        /// Index into the entry's bodies.
        body: usize,
        recipients: Vec<Recipient>,
        /// A bounce we generated (its failure is not bounced again).
        #[serde(default)]
        bounce: bool,
    },
    Slack {
        channel: String,
        /// `brief` or `full`.
        style: String,
        text: String,
        state: State,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// The message (body `body`) still has to be routed: it was held
    /// because a manager did not know enough yet (GoCD's first answer).
    Route { body: usize, state: State },
}

impl Job {
    pub fn is_pending(&self) -> bool {
        match self {
            Job::Mail { recipients, .. } => recipients.iter().any(|r| r.state == State::Pending),
            Job::Slack { state, .. } | Job::Route { state, .. } => *state == State::Pending,
        }
    }
}

/// One spooled message and what is left to do with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub received: DateTime<Utc>,
    /// The client that gave it to us.
    pub peer: String,
    /// The client's envelope: a bounce goes to `envelope_from`.
    pub envelope_from: Option<String>,
    pub envelope_to: Vec<String>,
    pub jobs: Vec<Job>,
    /// Delivery attempts from the spool so far.
    #[serde(default)]
    pub attempts: u32,
    /// The message bodies (stored after the JSON line, not in it).
    #[serde(skip)]
    pub bodies: Vec<Arc<Vec<u8>>>,
}

/// The JSON line: the entry plus the length of each body.
#[derive(Serialize, Deserialize)]
struct Head {
    #[serde(flatten)]
    entry: Entry,
    body_lengths: Vec<usize>,
}

impl Entry {
    pub fn is_finished(&self) -> bool {
        !self.jobs.iter().any(Job::is_pending)
    }

    fn encode(&self) -> io::Result<Vec<u8>> {
        let head = Head {
            entry: self.clone(),
            body_lengths: self.bodies.iter().map(|b| b.len()).collect(),
        };
        let json = serde_json::to_vec(&head).map_err(io::Error::other)?;
        let total: usize = self.bodies.iter().map(|b| b.len()).sum();
        let mut out = Vec::with_capacity(MAGIC.len() + json.len() + 1 + total);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&json);
        out.push(b'\n');
        for b in &self.bodies {
            out.extend_from_slice(b);
        }
        Ok(out)
    }

    fn decode(raw: &[u8]) -> Result<Entry, String> {
        let rest = raw
            .strip_prefix(MAGIC)
            .ok_or("not a mailgend route spool file (bad first line)")?;
        let nl = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("truncated: no end of the JSON line")?;
        let head: Head =
            serde_json::from_slice(&rest[..nl]).map_err(|e| format!("JSON line: {e}"))?;
        let mut data = &rest[nl + 1..];
        let mut entry = head.entry;
        for len in head.body_lengths {
            if data.len() < len {
                return Err("truncated: a message body is shorter than recorded".into());
            }
            entry.bodies.push(Arc::new(data[..len].to_vec()));
            data = &data[len..];
        }
        if !data.is_empty() {
            return Err(format!("{} bytes after the last message body", data.len()));
        }
        for job in &entry.jobs {
            if let Job::Mail { body, .. } | Job::Route { body, .. } = job {
                if *body >= entry.bodies.len() {
                    return Err(format!("a job names message body {body}, which is missing"));
                }
            }
        }
        Ok(entry)
    }
}

/// The spool directory.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
}

/// A new entry id: arrival time in nanoseconds since the epoch, a counter
/// and the process id, so ids sort by arrival and never collide.
pub fn new_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    format!(
        "{:020}-{:08}-{}",
        Utc::now().timestamp_nanos_opt().unwrap_or_default(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        std::process::id()
    )
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn fsync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

impl Spool {
    /// Opens (creating) the spool; files a crash left half-written in
    /// `tmp/` were never acknowledged and are moved to `bad/`.
    pub fn open(dir: &Path) -> Result<Spool, SpoolError> {
        for sub in ["", "tmp", "bad"] {
            let d = dir.join(sub);
            fs::create_dir_all(&d).map_err(io_err(&d))?;
        }
        let spool = Spool {
            dir: dir.to_path_buf(),
        };
        let tmp = dir.join("tmp");
        for e in fs::read_dir(&tmp).map_err(io_err(&tmp))? {
            let e = e.map_err(io_err(&tmp))?;
            let to = dir.join("bad").join(e.file_name());
            tracing::warn!(
                file = %e.path().display(),
                "half-written spool file from an earlier crash (never acknowledged); moved to {}",
                to.display()
            );
            fs::rename(e.path(), &to).map_err(io_err(&to))?;
        }
        Ok(spool)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}{SUFFIX}"))
    }

    /// The ids of all entries, oldest first.
    pub fn list(&self) -> Result<Vec<String>, SpoolError> {
        let mut ids = Vec::new();
        for e in fs::read_dir(&self.dir).map_err(io_err(&self.dir))? {
            let e = e.map_err(io_err(&self.dir))?;
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(id) = name.strip_suffix(SUFFIX) {
                ids.push(id.to_string());
            }
        }
        ids.sort();
        Ok(ids)
    }

    /// When the entry `id` arrived: ids start with the arrival time in
    /// nanoseconds since the epoch (see [`Spool::store`]).
    pub fn arrival(id: &str) -> Option<DateTime<Utc>> {
        let nanos: i64 = id.split('-').next()?.parse().ok()?;
        Some(DateTime::from_timestamp_nanos(nanos))
    }

    /// Stores a new entry durably; returns its id.
    pub fn store(&self, entry: &Entry) -> Result<String, SpoolError> {
        let id = new_id();
        self.write(&id, entry)?;
        Ok(id)
    }

    /// Stores a new entry durably under `id` (from [`new_id`]).
    pub fn store_as(&self, id: &str, entry: &Entry) -> Result<(), SpoolError> {
        self.write(id, entry)
    }

    /// Replaces an entry (recorded progress) durably.
    pub fn update(&self, id: &str, entry: &Entry) -> Result<(), SpoolError> {
        self.write(id, entry)
    }

    fn write(&self, id: &str, entry: &Entry) -> Result<(), SpoolError> {
        let tmp = self.dir.join("tmp").join(format!("{id}{SUFFIX}"));
        let bytes = entry.encode().map_err(io_err(&tmp))?;
        let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
        f.write_all(&bytes).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        drop(f);
        let path = self.path(id);
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        fsync_dir(&self.dir)
    }

    /// Reads an entry; [`SpoolError::Bad`] when the file is unusable.
    pub fn load(&self, id: &str) -> Result<Entry, SpoolError> {
        let path = self.path(id);
        let raw = fs::read(&path).map_err(io_err(&path))?;
        Entry::decode(&raw).map_err(|reason| SpoolError::Bad { path, reason })
    }

    /// Removes a finished entry, durably (a resurrected entry would be
    /// delivered twice).
    pub fn remove(&self, id: &str) -> Result<(), SpoolError> {
        let path = self.path(id);
        fs::remove_file(&path).map_err(io_err(&path))?;
        fsync_dir(&self.dir)
    }

    /// Moves an unusable entry to `bad/` for the operator; returns where.
    pub fn set_aside(&self, id: &str) -> Result<PathBuf, SpoolError> {
        let from = self.path(id);
        let to = self.dir.join("bad").join(format!("{id}{SUFFIX}"));
        fs::rename(&from, &to).map_err(io_err(&to))?;
        fsync_dir(&self.dir)?;
        Ok(to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        Entry {
            received: Utc::now(),
            peer: "127.0.0.1:4000".into(),
            envelope_from: Some("gocd@example.org".into()),
            envelope_to: vec!["a@example.net".into()],
            jobs: vec![
                Job::Mail {
                    mail_from: None,
                    body: 1,
                    recipients: vec![Recipient {
                        address: "a@example.net".into(),
                        state: State::Done,
                        error: None,
                        reported: false,
                    }],
                    bounce: false,
                },
                Job::Slack {
                    channel: "#ops".into(),
                    style: "brief".into(),
                    text: "x".into(),
                    state: State::Pending,
                    error: None,
                },
            ],
            attempts: 2,
            bodies: vec![
                Arc::new(b"first\r\n".to_vec()),
                Arc::new(b"Subject: \xff\r\n\r\nbody\r\n".to_vec()),
            ],
        }
    }

    #[test]
    fn entries_round_trip_in_order_and_bad_files_are_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let e = entry();
        let a = spool.store(&e).unwrap();
        let b = spool.store(&e).unwrap();
        let age = Utc::now() - Spool::arrival(&a).unwrap();
        assert!(age.num_seconds().abs() < 60, "{age}");
        assert_eq!(Spool::arrival("garbage"), None);
        assert_eq!(spool.list().unwrap(), vec![a.clone(), b.clone()]);
        assert_eq!(spool.load(&a).unwrap(), e);
        assert!(!e.is_finished());

        std::fs::write(spool.path(&b), b"garbage").unwrap();
        assert!(matches!(spool.load(&b), Err(SpoolError::Bad { .. })));
        let moved = spool.set_aside(&b).unwrap();
        assert!(moved.exists());
        assert_eq!(spool.list().unwrap(), vec![a.clone()]);

        // A truncated body is detected, not delivered short.
        let raw = std::fs::read(spool.path(&a)).unwrap();
        std::fs::write(spool.path(&a), &raw[..raw.len() - 3]).unwrap();
        assert!(matches!(spool.load(&a), Err(SpoolError::Bad { .. })));
        spool.remove(&a).unwrap();
        assert!(spool.list().unwrap().is_empty());

        // Leftovers of a crash in tmp/ are kept, in bad/.
        std::fs::write(dir.path().join("tmp/x.msg"), b"half").unwrap();
        Spool::open(dir.path()).unwrap();
        assert!(dir.path().join("bad/x.msg").exists());
    }
}
