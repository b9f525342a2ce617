//! Small tools that keep what an attacker sends from growing the log:
//! [`clip`] shortens a value for a log line, [`WarnLimiter`] lets a WARN
//! that anyone on the network can provoke through at most once per
//! period, with the count of those it held back.

use std::borrow::Cow;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How many characters of a subject or name a log line shows.
pub const LOG_CLIP: usize = 200;

/// `s` cut to `max` characters, with `…` when cut.
pub fn clip(s: &str, max: usize) -> Cow<'_, str> {
    match s.char_indices().nth(max) {
        None => Cow::Borrowed(s),
        Some((i, _)) => Cow::Owned(format!("{}…", &s[..i])),
    }
}

/// Lets one WARN through per `period`; the others are counted and the
/// count is reported with the next one let through.
#[derive(Debug)]
pub struct WarnLimiter {
    period: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl WarnLimiter {
    pub const fn new(period: Duration) -> WarnLimiter {
        WarnLimiter {
            period,
            state: Mutex::new((None, 0)),
        }
    }

    /// `Some(n)` when this WARN may be written now, `n` being how many
    /// were held back since the last one; `None` when it must be held
    /// back (it is counted).
    pub fn allow(&self) -> Option<u64> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        match st.0 {
            Some(last) if now.duration_since(last) < self.period => {
                st.1 += 1;
                None
            }
            _ => {
                st.0 = Some(now);
                Some(std::mem::take(&mut st.1))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_counts_characters() {
        assert_eq!(clip("abc", 3), "abc");
        assert_eq!(clip("abcd", 3), "abc…");
        assert_eq!(clip("ääää", 2), "ää…");
        assert!(matches!(clip("x", 200), Cow::Borrowed(_)));
    }

    #[test]
    fn one_warn_per_period_with_the_count_held_back() {
        let l = WarnLimiter::new(Duration::from_millis(200));
        assert_eq!(l.allow(), Some(0));
        assert_eq!(l.allow(), None);
        assert_eq!(l.allow(), None);
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(l.allow(), Some(2));
        assert_eq!(l.allow(), None);
    }
}
