//! The signing pool: MIME encoding and OpenPGP signatures for the mails of
//! every worker, spread over the machine's cores.
//!
//! An RSA-3072 signature costs ~2 ms of one core; everything else a worker
//! does is waiting on PostgreSQL or SMTP. Each build used to run as one
//! blocking task per group or batch, so a batch of 32 small groups was
//! signed one mail after another on one core while the other idled, and
//! a batch's latency was the sum of its signatures. Here a worker's mails
//! are cut into as many pieces as there are cores, each piece signed on
//! the blocking pool, and a semaphore as wide as the core count bounds the
//! signing threads of all workers together: no more threads compete for
//! the cores than there are cores, and a worker whose mails wait for a
//! slot is not holding one while it talks to the database or the relay, so
//! the other workers' database and SMTP work overlaps the signing.
//!
//! Building happens before a mail's outbox row is written, so how it is
//! spread changes nothing about exactly-once (see [`crate::notify::outbox`]).

use std::sync::{Arc, LazyLock};

use chrono::{DateTime, Utc};
use tokio::sync::Semaphore;

use crate::notify::mail::{self, BuiltMail, MailContext, MailError, Notification};
use crate::notify::signature::Signer;

/// Cores to sign on: what the process may run on (cgroup and affinity
/// limits included).
pub fn width() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Signing threads of all workers together.
static SLOTS: LazyLock<Arc<Semaphore>> = LazyLock::new(|| Arc::new(Semaphore::new(width())));

/// Unsigned mails below this many go as one piece: building one costs
/// microseconds, less than handing it to another thread.
const UNSIGNED_PIECE: usize = 64;

/// Builds every notification (MIME, and the signature when `signer` is
/// set), results in the order given; a mail that cannot be built fails
/// alone. `Err` only when a blocking task panicked.
pub async fn build_all(
    ctx: &MailContext,
    signer: Option<&Arc<Signer>>,
    now: DateTime<Utc>,
    notifications: Vec<Notification>,
) -> Result<Vec<Result<BuiltMail, MailError>>, tokio::task::JoinError> {
    let n = notifications.len();
    if n == 0 {
        return Ok(Vec::new());
    }
    let pieces = match signer {
        Some(_) => width().min(n),
        None => n.div_ceil(UNSIGNED_PIECE).min(width()),
    };
    let per_piece = n.div_ceil(pieces);
    let mut rest = notifications.into_iter();
    let mut tasks = Vec::with_capacity(pieces);
    loop {
        let piece: Vec<Notification> = rest.by_ref().take(per_piece).collect();
        if piece.is_empty() {
            break;
        }
        let ctx = ctx.clone();
        let signer = signer.cloned();
        let slots = SLOTS.clone();
        tasks.push(async move {
            // Taken before the thread starts, released when it ends: a
            // waiting piece holds no thread.
            let _slot = slots
                .acquire_owned()
                .await
                .expect("the signing semaphore is never closed");
            tokio::task::spawn_blocking(move || {
                piece
                    .iter()
                    .map(|n| mail::build(n, &ctx, signer.as_deref(), now))
                    .collect::<Vec<_>>()
            })
            .await
        });
    }
    let mut out = Vec::with_capacity(n);
    for piece in futures::future::join_all(tasks).await {
        out.extend(piece?);
    }
    Ok(out)
}
