//! One stop signal for both daemons (the model is mini-redis's
//! `shutdown.rs`): the service owns a [`ShutdownSignal`]; every task that
//! must stop holds a [`Shutdown`] listener, asks [`Shutdown::is_shutdown`]
//! between units of work and awaits [`Shutdown::recv`] in its `select!`.
//! A stop is never missed: a listener made or asked after the signal still
//! sees it, and dropping the signal counts as a stop.

use tokio::sync::watch;

/// The sending side, owned by the service.
#[derive(Debug)]
pub struct ShutdownSignal {
    tx: watch::Sender<bool>,
}

impl Default for ShutdownSignal {
    fn default() -> Self {
        ShutdownSignal::new()
    }
}

impl ShutdownSignal {
    pub fn new() -> Self {
        ShutdownSignal {
            tx: watch::channel(false).0,
        }
    }

    /// A listener for one task.
    pub fn subscribe(&self) -> Shutdown {
        Shutdown {
            rx: self.tx.subscribe(),
        }
    }

    /// Tells every listener to stop; idempotent.
    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }

    pub fn is_triggered(&self) -> bool {
        *self.tx.borrow()
    }
}

/// The listening side, one per task (clone freely).
#[derive(Debug, Clone)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
}

impl Shutdown {
    /// Whether the stop has been given.
    pub fn is_shutdown(&self) -> bool {
        *self.rx.borrow()
    }

    /// Completes once the stop is given (at once if it was already), or
    /// the signal is dropped.
    pub async fn recv(&mut self) {
        let _ = self.rx.wait_for(|stop| *stop).await;
    }

    /// [`recv`](Self::recv) as an owned future, for APIs that take one
    /// (e.g. the metrics endpoint's `serve`).
    pub async fn wait(mut self) {
        self.recv().await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn every_listener_hears_the_stop_even_late_ones() {
        let signal = ShutdownSignal::new();
        let mut early = signal.subscribe();
        let waiter = tokio::spawn(async move {
            early.recv().await;
            early.is_shutdown()
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        signal.trigger();
        signal.trigger();
        assert!(waiter.await.unwrap());
        let mut late = signal.subscribe();
        assert!(late.is_shutdown());
        tokio::time::timeout(Duration::from_secs(1), late.recv())
            .await
            .expect("a late listener returns at once");
        assert!(signal.is_triggered());
    }

    #[tokio::test]
    async fn a_dropped_signal_counts_as_a_stop() {
        let signal = ShutdownSignal::new();
        let listener = signal.subscribe();
        drop(signal);
        tokio::time::timeout(Duration::from_secs(1), listener.wait())
            .await
            .expect("dropping the signal ends the wait");
    }
}
