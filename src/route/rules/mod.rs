//! Rule functions: the `filter.function` of a rule (`mail.in_subject`,
//! `pipelines.in_group`, …). Each function is one small module exposing a
//! [`FunctionSpec`]; [`FUNCTIONS`] is the registry the config loader checks
//! names and argument counts against, so a new function is one module plus
//! one line here.

use std::fmt::Debug;
use std::sync::Arc;

use crate::route::managers::gocd::{Event, PipelineGroups};

mod mail_in_subject;
mod pipelines_any;
mod pipelines_in_group;
mod pipelines_name_like_in_group;

/// What a manager found out about one message, for its rules to look at.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    /// The decoded Subject (empty when there is none).
    pub subject: String,
    /// GoCD pipeline named in the subject.
    pub pipeline: Option<String>,
    /// GoCD event, after the FIXED/BREAKS correction.
    pub event: Option<Event>,
    /// The last good copy of GoCD's pipeline groups; `None` while GoCD has
    /// never answered.
    pub groups: Option<Arc<PipelineGroups>>,
}

/// The outcome of one rule function on one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Match,
    NoMatch,
    /// The function needs GoCD's pipeline groups and there is no copy yet.
    NoGocdData,
}

/// A compiled rule function with its arguments.
pub trait RuleFunction: Debug + Send + Sync {
    fn check(&self, facts: &Facts) -> Verdict;

    /// Whether it needs GoCD's pipeline groups (messages wait a bounded
    /// time for them at startup).
    fn needs_groups(&self) -> bool {
        false
    }
}

/// Compiles a function's arguments; the error is the reason they are refused.
pub type Build = fn(&[String]) -> Result<Arc<dyn RuleFunction>, String>;

/// A rule function's entry in the registry.
pub struct FunctionSpec {
    /// As written in `filter.function`.
    pub name: &'static str,
    /// The manager whose rules may use it.
    pub manager: &'static str,
    /// Allowed number of `args` (inclusive); `usize::MAX` for "or more".
    pub min_args: usize,
    pub max_args: usize,
    /// Shown by `--check` and in errors, e.g. `PATTERN GROUP`.
    pub usage: &'static str,
    /// Validates and compiles the arguments; the error is the reason.
    pub build: Build,
}

pub const FUNCTIONS: &[&FunctionSpec] = &[
    &mail_in_subject::SPEC,
    &pipelines_any::SPEC,
    &pipelines_any::SPEC_ALL,
    &pipelines_in_group::SPEC,
    &pipelines_name_like_in_group::SPEC,
];

pub fn lookup(name: &str) -> Option<&'static FunctionSpec> {
    FUNCTIONS.iter().copied().find(|f| f.name == name)
}

/// The functions one manager's rules may use (for error messages).
pub fn names_for(manager: &str) -> Vec<&'static str> {
    FUNCTIONS
        .iter()
        .filter(|f| f.manager == manager)
        .map(|f| f.name)
        .collect()
}
