//! Wake-ups from the database: `LISTEN mailgend_directives`.
//!
//! Owns one dedicated connection that only listens. Migration 0003's
//! statement trigger on `directives` sends a notification whenever
//! directives are inserted, so the service learns of new work at once
//! instead of polling. A lost connection is reported (the service then
//! rescans everything, since notifications sent meanwhile are gone) and
//! re-established with backoff.

use std::time::Duration;

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::AsyncMessage;
use tracing::{debug, warn};

use crate::config::DatabaseConfig;
use crate::notify::db;

/// The channel our trigger notifies.
pub const CHANNEL: &str = "mailgend_directives";

/// What the listener tells the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wakeup {
    /// Directives were inserted.
    Inserted,
    /// The listening connection is (again) established: notifications may
    /// have been missed while it was down, so rescan.
    Connected,
    /// The listening connection broke; reconnecting.
    Lost,
}

/// Listens until `tx` is closed, reconnecting with backoff (1 s doubling
/// to 30 s).
pub async fn listen(database: DatabaseConfig, tx: mpsc::Sender<Wakeup>) {
    let mut backoff = Duration::from_secs(1);
    loop {
        match listen_once(&database, &tx).await {
            Ok(()) => return, // the service is gone
            Err(e) => {
                warn!("database notification connection lost: {e}; reconnecting in {backoff:?}");
                if tx.send(Wakeup::Lost).await.is_err() {
                    return;
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

#[derive(Debug, thiserror::Error)]
enum ListenError {
    #[error("{0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("{0}")]
    Connect(#[from] db::DbError),
    #[error("the server closed the connection")]
    Closed,
}

/// Returns `Ok` only when the service is gone (`tx` closed).
async fn listen_once(
    database: &DatabaseConfig,
    tx: &mpsc::Sender<Wakeup>,
) -> Result<(), ListenError> {
    let (client, mut connection) = db::connect_raw(database, db::pg_config(database)).await?;
    let (msg_tx, mut msg_rx) = mpsc::unbounded_channel();
    // The connection must be polled for notifications to arrive; this task
    // is the only one polling it.
    let driver = tokio::spawn(async move {
        let mut stream = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(msg) = stream.next().await {
            match msg {
                Ok(AsyncMessage::Notification(_)) => {
                    if msg_tx.send(Ok(())).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    let _ = msg_tx.send(Err(e));
                    return;
                }
            }
        }
    });
    let result = async {
        client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
        debug!("listening for directive inserts");
        if tx.send(Wakeup::Connected).await.is_err() {
            return Ok(());
        }
        loop {
            match msg_rx.recv().await {
                Some(Ok(())) => {
                    // Coalesce a burst into one wake-up: the service rescans
                    // anyway, and a full channel means one is pending.
                    while let Ok(Ok(())) = msg_rx.try_recv() {}
                    match tx.try_send(Wakeup::Inserted) {
                        Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => {}
                        Err(mpsc::error::TrySendError::Closed(_)) => return Ok(()),
                    }
                }
                Some(Err(e)) => return Err(ListenError::Db(e)),
                None => return Err(ListenError::Closed),
            }
        }
    }
    .await;
    driver.abort();
    result
}
