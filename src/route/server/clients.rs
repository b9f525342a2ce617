//! What the server knows about its clients across sessions: how many
//! connections are open (in all, and per IP address) and how many AUTH
//! attempts each address has failed lately. One [`OpenConnections`] lives
//! for the whole process, so a reload neither frees slots nor forgives
//! failures.
//!
//! The AUTH budget follows Postfix's idea (`smtpd_error_sleep_time`, the
//! `anvil` rate limits) in a simpler form: an attempt is counted as failed
//! when it starts and forgiven when it succeeds, so parallel sessions from
//! one address cannot get more guesses in than the budget; once the budget
//! is spent, AUTH from that address gets 421 until its window has passed.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Addresses remembered at most; beyond, expired ones are forgotten
/// first, then (a flood from very many addresses) the table is cleared
/// rather than grown.
const MAX_TRACKED: usize = 100_000;

/// Inbound connections open now, over every listener (a reload that
/// moves `local-smtp` leaves the old listener's sessions running while
/// the new one accepts; both count against `max-connections`), and what
/// is counted per client address.
#[derive(Debug, Default)]
pub struct OpenConnections {
    total: AtomicUsize,
    per_client: Mutex<HashMap<IpAddr, usize>>,
    auth: Mutex<HashMap<IpAddr, AuthRecord>>,
}

#[derive(Debug, Clone, Copy)]
struct AuthRecord {
    /// Attempts counted (failed or in progress) since `since`.
    failures: u32,
    since: Instant,
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// `max-connections` are open.
    Total,
    /// `max-connections-per-client` are open from this address.
    Client,
}

/// An AUTH attempt counted against its address's budget: forgiven by
/// [`AuthAttempt::succeeded`], a failure otherwise.
#[must_use]
pub struct AuthAttempt {
    clients: Arc<OpenConnections>,
    ip: IpAddr,
}

impl AuthAttempt {
    pub fn succeeded(self) {
        let mut t = self.clients.auth.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = t.get_mut(&self.ip) {
            r.failures = r.failures.saturating_sub(1);
        }
    }
}

impl OpenConnections {
    pub fn get(&self) -> usize {
        self.total.load(Ordering::SeqCst)
    }

    /// Open connections from `ip` now.
    pub fn from_client(&self, ip: IpAddr) -> usize {
        let t = self.per_client.lock().unwrap_or_else(|e| e.into_inner());
        t.get(&ip).copied().unwrap_or(0)
    }

    /// Takes a slot unless `max` are open, or `per_client` (0: no limit)
    /// from `ip`.
    pub(super) fn try_open(
        self: &Arc<Self>,
        ip: IpAddr,
        max: usize,
        per_client: usize,
    ) -> Result<ConnectionSlot, Full> {
        let mut n = self.total.load(Ordering::SeqCst);
        loop {
            if n >= max {
                return Err(Full::Total);
            }
            match self
                .total
                .compare_exchange(n, n + 1, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => break,
                Err(now) => n = now,
            }
        }
        let mut t = self.per_client.lock().unwrap_or_else(|e| e.into_inner());
        let mine = t.entry(ip).or_insert(0);
        if per_client > 0 && *mine >= per_client {
            drop(t);
            self.total.fetch_sub(1, Ordering::SeqCst);
            return Err(Full::Client);
        }
        *mine += 1;
        Ok(ConnectionSlot {
            clients: self.clone(),
            ip,
        })
    }

    /// Starts an AUTH attempt from `ip`, or `Err(until)` when its budget
    /// (`limit` within `window`) is spent; `until` is when it is renewed.
    pub fn auth_attempt(
        self: &Arc<Self>,
        ip: IpAddr,
        limit: u32,
        window: Duration,
    ) -> Result<AuthAttempt, Duration> {
        let now = Instant::now();
        let mut t = self.auth.lock().unwrap_or_else(|e| e.into_inner());
        if t.len() >= MAX_TRACKED && !t.contains_key(&ip) {
            t.retain(|_, r| now.duration_since(r.since) < window);
            if t.len() >= MAX_TRACKED {
                t.clear();
            }
        }
        let r = t.entry(ip).or_insert(AuthRecord {
            failures: 0,
            since: now,
        });
        if now.duration_since(r.since) >= window {
            *r = AuthRecord {
                failures: 0,
                since: now,
            };
        }
        if r.failures >= limit {
            return Err(window.saturating_sub(now.duration_since(r.since)));
        }
        r.failures += 1;
        Ok(AuthAttempt {
            clients: self.clone(),
            ip,
        })
    }
}

/// One open connection; freed when dropped.
pub(super) struct ConnectionSlot {
    clients: Arc<OpenConnections>,
    ip: IpAddr,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        {
            let mut t = self
                .clients
                .per_client
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(n) = t.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    t.remove(&self.ip);
                }
            }
        }
        self.clients.total.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_client_and_total_limits() {
        let c = Arc::new(OpenConnections::default());
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let s1 = c.try_open(a, 3, 2).unwrap();
        let _s2 = c.try_open(a, 3, 2).unwrap();
        assert_eq!(c.try_open(a, 3, 2).err(), Some(Full::Client));
        let _s3 = c.try_open(b, 3, 2).unwrap();
        assert_eq!(c.try_open(b, 3, 2).err(), Some(Full::Total));
        assert_eq!(c.get(), 3);
        drop(s1);
        assert_eq!(c.from_client(a), 1);
        assert!(c.try_open(a, 3, 0).is_ok());
    }

    #[test]
    fn auth_budget_counts_attempts_and_forgives_successes() {
        let c = Arc::new(OpenConnections::default());
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let w = Duration::from_millis(300);
        let first = c.auth_attempt(a, 2, w).unwrap();
        // In flight counts: a parallel session gets only what is left.
        let _second = c.auth_attempt(a, 2, w).unwrap();
        assert!(c.auth_attempt(a, 2, w).is_err());
        first.succeeded();
        assert!(c.auth_attempt(a, 2, w).is_ok());
        assert!(c.auth_attempt(a, 2, w).is_err());
        // Another address has its own budget; the window renews it.
        assert!(c.auth_attempt("192.0.2.9".parse().unwrap(), 2, w).is_ok());
        std::thread::sleep(Duration::from_millis(350));
        assert!(c.auth_attempt(a, 2, w).is_ok());
    }
}
