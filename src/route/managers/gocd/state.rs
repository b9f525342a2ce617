//! Each stage's last known result, so that a pass after a failure is
//! reported as FIXED and a failure after a pass as BREAKS even when GoCD's
//! own mail said only "passed"/"failed". Kept per `pipeline/stage`, as
//! GoCD judges and as mail2alert kept it (plugin/gocd.py:382-405): a
//! pipeline whose `build` passes while its `test` keeps failing is neither
//! FIXED nor BROKEN on every run. Seeded from the `P :: S` entries of
//! cctray.xml, then advanced by every message.
//!
//! The table is bounded: anyone who can send mail to the router chooses
//! the names in the subjects, so at most `max-states` entries are kept
//! (a stage not yet known once the table is full is routed on GoCD's own
//! word and not remembered), and names longer than GoCD allows
//! ([`MAX_NAME`]) are never stored.

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

/// GoCD refuses pipeline and stage names longer than this (255
/// characters of `[A-Za-z0-9_.-]`): a longer one is no GoCD pipeline.
pub const MAX_NAME: usize = 255;

/// Default of the gocd manager's `max-states`: room for 2,000 pipelines of
/// five stages; at most about 5 MB with names of GoCD's maximum length.
pub const DEFAULT_MAX_STATES: usize = 10_000;

/// `pipeline/stage` (lower-cased: GoCD names are case-insensitive) → state.
#[derive(Debug)]
pub struct StateTable {
    states: HashMap<String, BuildState>,
    max: usize,
}

impl Default for StateTable {
    fn default() -> Self {
        StateTable {
            states: HashMap::new(),
            max: DEFAULT_MAX_STATES,
        }
    }
}

/// What [`StateTable::advance`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Advanced {
    /// The event to act on.
    pub event: Event,
    /// The stage was new and the table full: its result is not kept.
    pub table_full: bool,
}

impl StateTable {
    /// At most `max` entries from now on (a reload may lower it: entries
    /// already there stay, new ones wait for room).
    pub fn set_max(&mut self, max: usize) {
        self.max = max;
    }

    fn has_room_for(&self, key: &str) -> bool {
        self.states.len() < self.max || self.states.contains_key(key)
    }

    /// The state of `key` (`pipeline/stage`).
    pub fn get(&self, key: &str) -> Option<BuildState> {
        self.states.get(&key.to_lowercase()).copied()
    }

    /// Seeds a stage's state unless a message already set it (a message
    /// is newer than any cctray fetch that raced with it).
    pub fn seed(&mut self, key: &str, state: BuildState) {
        let key = key.to_lowercase();
        if self.has_room_for(&key) {
            self.states.entry(key).or_insert(state);
        }
    }

    /// Corrects `event` by the stage's history (`key` is `pipeline/stage`)
    /// and records the result. Returns the event to act on.
    pub fn advance(&mut self, key: &str, event: Event) -> Advanced {
        let key = key.to_lowercase();
        let prev = self.states.get(&key).copied();
        let corrected = correct(prev, event);
        let state = match corrected {
            Event::Passes | Event::Fixed => Some(BuildState::Passing),
            Event::Fails | Event::Breaks => Some(BuildState::Failing),
            // A cancelled run says nothing about pass or fail: keep the
            // previous state (mail2alert forgot it, plugin/gocd.py:291,405,
            // so the next pass after a failure was not FIXED).
            Event::Cancelled => None,
        };
        let mut table_full = false;
        if let Some(state) = state {
            if self.has_room_for(&key) {
                self.states.insert(key, state);
            } else {
                table_full = true;
            }
        }
        Advanced {
            event: corrected,
            table_full,
        }
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
    fn bounded() {
        let mut t = StateTable::default();
        t.set_max(2);
        assert!(!t.advance("a/s", Event::Fails).table_full);
        assert!(!t.advance("b/s", Event::Fails).table_full);
        let c = t.advance("c/s", Event::Fails);
        assert!(c.table_full);
        assert_eq!(c.event, Event::Fails, "GoCD's word stands");
        assert_eq!(t.advance("c/s", Event::Passes).event, Event::Passes);
        // Known stages keep being tracked.
        assert_eq!(t.advance("A/s", Event::Passes).event, Event::Fixed);
        t.seed("d/s", BuildState::Failing);
        assert_eq!(t.len(), 2);
        assert_eq!(t.get("d/s"), None);
    }

    #[test]
    fn fixed_and_breaks() {
        let mut t = StateTable::default();
        let mut t = move |k: &str, e| t.advance(k, e).event;
        assert_eq!(t("p/s", Event::Passes), Event::Passes);
        assert_eq!(t("p/s", Event::Fails), Event::Breaks);
        assert_eq!(t("P/S", Event::Fails), Event::Fails);
        assert_eq!(t("p/s", Event::Cancelled), Event::Cancelled);
        assert_eq!(t("p/s", Event::Passes), Event::Fixed);
        assert_eq!(t("p/s", Event::Fixed), Event::Fixed);
        // Another stage of the same pipeline has its own history.
        assert_eq!(t("p/t", Event::Fails), Event::Fails);
        assert_eq!(t("p/s", Event::Passes), Event::Passes);
        let mut t = StateTable::default();
        t.advance("p/s", Event::Passes);
        t.seed("p/s", BuildState::Failing);
        assert_eq!(
            t.get("p/s"),
            Some(BuildState::Passing),
            "seed never overrides"
        );
    }
}
