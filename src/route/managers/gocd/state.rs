//! Each stage's last known result, so that a pass after a failure is
//! reported as FIXED and a failure after a pass as BREAKS even when GoCD's
//! own mail said only "passed"/"failed". Kept per `pipeline/stage`, as
//! GoCD judges and as mail2alert kept it (plugin/gocd.py:382-405): a
//! pipeline whose `build` passes while its `test` keeps failing is neither
//! FIXED nor BROKEN on every run. Seeded from the `P :: S` entries of
//! cctray.xml, then advanced by every message.

use std::collections::HashMap;

use super::Event;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildState {
    Passing,
    Failing,
}

impl BuildState {
    /// From cctray's `lastBuildStatus`; `Unknown` and the like give `None`.
    pub fn from_cctray(status: &str) -> Option<BuildState> {
        match status {
            "Success" => Some(BuildState::Passing),
            "Failure" | "Exception" => Some(BuildState::Failing),
            _ => None,
        }
    }
}

/// `pipeline/stage` (lower-cased: GoCD names are case-insensitive) → state.
#[derive(Debug, Default)]
pub struct StateTable {
    states: HashMap<String, BuildState>,
}

impl StateTable {
    /// The state of `key` (`pipeline/stage`).
    pub fn get(&self, key: &str) -> Option<BuildState> {
        self.states.get(&key.to_lowercase()).copied()
    }

    /// Seeds a stage's state unless a message already set it (a message
    /// is newer than any cctray fetch that raced with it).
    pub fn seed(&mut self, key: &str, state: BuildState) {
        self.states.entry(key.to_lowercase()).or_insert(state);
    }

    /// Corrects `event` by the stage's history (`key` is `pipeline/stage`)
    /// and records the result. Returns the event to act on.
    pub fn advance(&mut self, key: &str, event: Event) -> Event {
        let key = key.to_lowercase();
        let prev = self.states.get(&key).copied();
        let corrected = correct(prev, event);
        match corrected {
            Event::Passes | Event::Fixed => {
                self.states.insert(key, BuildState::Passing);
            }
            Event::Fails | Event::Breaks => {
                self.states.insert(key, BuildState::Failing);
            }
            // A cancelled run says nothing about pass or fail: keep the
            // previous state (mail2alert forgot it, plugin/gocd.py:291,405,
            // so the next pass after a failure was not FIXED).
            Event::Cancelled => {}
        }
        corrected
    }

    pub fn len(&self) -> usize {
        self.states.len()
    }

    pub fn is_empty(&self) -> bool {
        self.states.is_empty()
    }
}

/// PASSES after a failure is FIXED; FAILS after a pass is BREAKS. Without
/// history, or for CANCELLED, GoCD's word stands; GoCD saying FIXED or
/// BREAKS is never downgraded.
pub fn correct(prev: Option<BuildState>, event: Event) -> Event {
    match (prev, event) {
        (Some(BuildState::Failing), Event::Passes) => Event::Fixed,
        (Some(BuildState::Passing), Event::Fails) => Event::Breaks,
        _ => event,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_and_breaks() {
        let mut t = StateTable::default();
        assert_eq!(t.advance("p/s", Event::Passes), Event::Passes);
        assert_eq!(t.advance("p/s", Event::Fails), Event::Breaks);
        assert_eq!(t.advance("P/S", Event::Fails), Event::Fails);
        assert_eq!(t.advance("p/s", Event::Cancelled), Event::Cancelled);
        assert_eq!(t.advance("p/s", Event::Passes), Event::Fixed);
        assert_eq!(t.advance("p/s", Event::Fixed), Event::Fixed);
        // Another stage of the same pipeline has its own history.
        assert_eq!(t.advance("p/t", Event::Fails), Event::Fails);
        assert_eq!(t.advance("p/s", Event::Passes), Event::Passes);
        t.seed("p/s", BuildState::Failing);
        assert_eq!(
            t.get("p/s"),
            Some(BuildState::Passing),
            "seed never overrides"
        );
    }
}
