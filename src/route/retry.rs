//! The spool worker: delivers what [`super::forward`] could not deliver at
//! once, in arrival order, until it is done or refused for good.
//!
//! It reads the spool directory at start (so a restart, or a crash, loses
//! nothing), then sleeps until an entry is due or a new one is added. Each
//! entry has its own exponential backoff (1 s doubling, capped at
//! [`MAX_BACKOFF`]); when the relay does not answer at all, the rest of the
//! pass is skipped, since it would fail the same way. Progress is written
//! back before the next attempt, so a recipient that accepted never gets
//! the message again. Permanent refusals become a bounce to the envelope
//! sender (itself a job of the same entry) and an ERROR; an entry that
//! cannot be read is moved to `bad/` with an ERROR.
//!
//! A *held* entry (a message whose manager did not know enough to decide
//! yet, see `Manager::holds`) is routed here by the current router as
//! soon as the manager no longer holds it, and then delivered like any
//! other; until then it is looked at again every [`HELD_POLL`].

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use super::forward::{add_bounce, decide_held, Decide, Forwarder, Queue};
use super::spool::{Entry, Job, SpoolError, State};
use super::{Envelope, Inbound};
use crate::shared::shutdown::Shutdown;

/// How often a held entry is looked at while its manager still holds it.
pub const HELD_POLL: Duration = Duration::from_millis(250);

/// Longest wait between two attempts of one entry.
pub const MAX_BACKOFF: Duration = Duration::from_secs(600);

fn backoff(attempts: u32) -> Duration {
    Duration::from_secs(1u64 << attempts.min(10)).min(MAX_BACKOFF)
}

async fn blocking<T: Send + 'static>(
    q: &Arc<Queue>,
    f: impl FnOnce(&Queue) -> T + Send + 'static,
) -> T {
    let q = q.clone();
    tokio::task::spawn_blocking(move || f(&q))
        .await
        .expect("spool I/O panicked")
}

/// Runs until `stop`; an attempt in progress is finished first.
/// `forward` is the current outbound side (a reload replaces it).
pub async fn run(
    queue: Arc<Queue>,
    forward: watch::Receiver<Arc<Forwarder>>,
    router: watch::Receiver<Arc<dyn Decide>>,
    mut stop: Shutdown,
) {
    // id → when it is due.
    let mut due: BTreeMap<String, Instant> = BTreeMap::new();
    // Entries held back because the relay did not answer: tried again, in
    // order, as soon as there is a sign it is back (a delivery succeeded,
    // or new mail arrived and will be tried behind them) rather than
    // after their own backoff.
    let mut relay_waiting: HashSet<String> = HashSet::new();
    let mut rescan = true;
    loop {
        if stop.is_shutdown() {
            return;
        }
        if rescan {
            match blocking(&queue, |q| q.spool.list()).await {
                Ok(ids) => {
                    let now = Instant::now();
                    due.retain(|id, _| ids.contains(id));
                    for id in ids {
                        due.entry(id).or_insert(now);
                    }
                    queue.backlog.store(due.len(), Ordering::SeqCst);
                    rescan = false;
                }
                Err(e) => error!("cannot read the spool: {e}"),
            }
        }
        let now = Instant::now();
        let ready: Vec<String> = due
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(id, _)| id.clone())
            .collect();
        let fw = forward.borrow().clone();
        let decide = router.borrow().clone();
        for id in ready {
            if stop.is_shutdown() {
                return;
            }
            let (pass, delivered) = deliver(&queue, &fw, &*decide, &id).await;
            if delivered {
                let now = Instant::now();
                for id in relay_waiting.drain() {
                    if let Some(t) = due.get_mut(&id) {
                        *t = now;
                    }
                }
            }
            match pass {
                Pass::Finished => {
                    due.remove(&id);
                }
                Pass::Later(wait, relay_down) => {
                    let at = Instant::now() + wait;
                    due.insert(id.clone(), at);
                    if relay_down {
                        // The others wait with it, in their order.
                        relay_waiting.insert(id);
                        for (other, t) in due.iter_mut() {
                            if *t < at {
                                *t = at;
                                relay_waiting.insert(other.clone());
                            }
                        }
                        break;
                    }
                }
                Pass::SpoolTrouble => {
                    due.insert(id, Instant::now() + Duration::from_secs(30));
                }
            }
            queue.backlog.store(due.len(), Ordering::SeqCst);
        }
        let next = due
            .values()
            .min()
            .copied()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = queue.added.notified() => {
                rescan = true;
                let now = Instant::now();
                for id in relay_waiting.drain() {
                    if let Some(t) = due.get_mut(&id) {
                        *t = now;
                    }
                }
            }
            _ = stop.recv() => return,
        }
    }
}

enum Pass {
    Finished,
    /// Try again after this long; the relay looked down.
    Later(Duration, bool),
    /// The spool itself failed (disk full, permissions): an ERROR was
    /// logged, try again later.
    SpoolTrouble,
}

/// One attempt at one entry; also whether anything was delivered.
async fn deliver(
    queue: &Arc<Queue>,
    forward: &Forwarder,
    router: &dyn Decide,
    id: &str,
) -> (Pass, bool) {
    let mut delivered = false;
    let pass = attempt_entry(queue, forward, router, id, &mut delivered).await;
    (pass, delivered)
}

/// The message of a held entry, as it was received; `None` when the
/// entry is not held (its routing is decided).
fn held_message(entry: &Entry, id: &str) -> Option<Inbound> {
    let body = entry.jobs.iter().find_map(|j| match j {
        Job::Route {
            body,
            state: State::Pending,
        } => Some(*body),
        _ => None,
    })?;
    Some(Inbound {
        envelope: Envelope {
            peer: entry
                .peer
                .parse()
                .unwrap_or_else(|_| std::net::SocketAddr::from(([0, 0, 0, 0], 0))),
            mail_from: entry.envelope_from.clone(),
            rcpt_to: entry.envelope_to.clone(),
        },
        data: entry.bodies[body].clone(),
        id: Some(id.to_string()),
    })
}

async fn attempt_entry(
    queue: &Arc<Queue>,
    forward: &Forwarder,
    router: &dyn Decide,
    id: &str,
    delivered: &mut bool,
) -> Pass {
    let id_owned = id.to_string();
    let mut entry: Entry = match blocking(queue, move |q| q.spool.load(&id_owned)).await {
        Ok(e) => e,
        Err(SpoolError::Bad { path, reason }) => {
            let id_owned = id.to_string();
            match blocking(queue, move |q| q.spool.set_aside(&id_owned)).await {
                Ok(to) => error!(
                    file = %path.display(),
                    "unreadable spool file ({reason}); moved to {} for the operator",
                    to.display()
                ),
                Err(e) => error!(
                    file = %path.display(),
                    "unreadable spool file ({reason}) and cannot move it aside: {e}"
                ),
            }
            return Pass::Finished;
        }
        Err(e) => {
            error!(spool_id = %id, "{e}");
            return Pass::SpoolTrouble;
        }
    };
    if let Some(msg) = held_message(&entry, id) {
        if let Some(why) = router.holds(&msg) {
            debug!(spool_id = %id, "still held: {why}");
            return Pass::Later(HELD_POLL, false);
        }
        let routing = router.route(&msg).await;
        info!(
            spool_id = %id,
            from = entry.envelope_from.as_deref().unwrap_or("<>"),
            rcpt = ?entry.envelope_to,
            "held message routed: {}",
            routing.trace.join("; ")
        );
        decide_held(&mut entry, &msg, &routing);
    }
    entry.attempts += 1;
    let attempt = forward.attempt(&mut entry).await;
    *delivered = attempt.done > 0;
    for (what, why) in &attempt.permanent {
        error!(
            spool_id = %id,
            from = entry.envelope_from.as_deref().unwrap_or("<>"),
            recipient = %what,
            "refused for good: {why}"
        );
    }
    if add_bounce(&mut entry, &forward.hostname) {
        info!(
            spool_id = %id,
            to = entry.envelope_from.as_deref().unwrap_or(""),
            "bouncing to the sender"
        );
    }
    let finished = entry.is_finished();
    let id_owned = id.to_string();
    let written = if finished {
        blocking(queue, move |q| q.spool.remove(&id_owned)).await
    } else {
        let e = entry.clone();
        blocking(queue, move |q| q.spool.update(&id_owned, &e)).await
    };
    if let Err(e) = written {
        // The relay may have the message now but the spool does not know:
        // a retry may send it again to those recipients.
        error!(spool_id = %id, "cannot record delivery progress: {e}");
        return Pass::SpoolTrouble;
    }
    if finished {
        info!(spool_id = %id, attempts = entry.attempts, delivered = attempt.done, "spooled message done");
        return Pass::Finished;
    }
    let wait = backoff(entry.attempts - 1);
    for (what, why) in &attempt.temporary {
        warn!(spool_id = %id, recipient = %what, attempts = entry.attempts, "will retry in {wait:?}: {why}");
    }
    debug!(spool_id = %id, "next attempt in {wait:?}");
    Pass::Later(wait, attempt.relay_down)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(backoff(0), Duration::from_secs(1));
        assert_eq!(backoff(3), Duration::from_secs(8));
        assert_eq!(backoff(9), Duration::from_secs(512));
        assert_eq!(backoff(10), MAX_BACKOFF);
        assert_eq!(backoff(1000), MAX_BACKOFF);
    }
}
