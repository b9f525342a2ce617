//! `pipelines.any`: every message matches (usually combined with an
//! `events` filter). Needs no GoCD data, so it keeps working while GoCD is
//! down. `pipelines.all` is mail2alert's deprecated alias.

use std::sync::Arc;

use super::{Facts, FunctionSpec, RuleFunction, Verdict};

pub const SPEC: FunctionSpec = FunctionSpec {
    name: "pipelines.any",
    manager: "gocd",
    min_args: 0,
    max_args: 0,
    usage: "",
    build,
};

pub const SPEC_ALL: FunctionSpec = FunctionSpec {
    name: "pipelines.all",
    ..SPEC
};

#[derive(Debug)]
struct Any;

fn build(_args: &[String]) -> Result<Arc<dyn RuleFunction>, String> {
    Ok(Arc::new(Any))
}

impl RuleFunction for Any {
    fn check(&self, _facts: &Facts) -> Verdict {
        Verdict::Match
    }
}
