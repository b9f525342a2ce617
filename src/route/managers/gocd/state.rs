//! Each pipeline's last known result, so that a pass after a failure is
//! reported as FIXED and a failure after a pass as BREAKS even when GoCD's
//! own mail said only "passed"/"failed" (it judges per stage, we per
//! pipeline, as mail2alert did). Seeded from cctray.xml, then advanced by
//! every message.

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

/// Pipeline name (lower-cased: GoCD names are case-insensitive) → state.
#[derive(Debug, Default)]
pub struct StateTable {
    states: HashMap<String, BuildState>,
}

impl StateTable {
    pub fn get(&self, pipeline: &str) -> Option<BuildState> {
        self.states.get(&pipeline.to_lowercase()).copied()
    }

    /// Seeds a pipeline's state unless a message already set it (a message
    /// is newer than any cctray fetch that raced with it).
    pub fn seed(&mut self, pipeline: &str, state: BuildState) {
        self.states.entry(pipeline.to_lowercase()).or_insert(state);
    }

    /// Corrects `event` by the pipeline's history and records the result.
    /// Returns the event to act on.
    pub fn advance(&mut self, pipeline: &str, event: Event) -> Event {
        let key = pipeline.to_lowercase();
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
            // previous state (mail2alert forgot it, losing the next FIXED).
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
        assert_eq!(t.advance("p", Event::Passes), Event::Passes);
        assert_eq!(t.advance("p", Event::Fails), Event::Breaks);
        assert_eq!(t.advance("P", Event::Fails), Event::Fails);
        assert_eq!(t.advance("p", Event::Cancelled), Event::Cancelled);
        assert_eq!(t.advance("p", Event::Passes), Event::Fixed);
        assert_eq!(t.advance("p", Event::Fixed), Event::Fixed);
        t.seed("p", BuildState::Failing);
        assert_eq!(
            t.get("p"),
            Some(BuildState::Passing),
            "seed never overrides"
        );
    }
}
