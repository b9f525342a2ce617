//! `pipelines.in_group GROUP`: the message's pipeline is in GoCD pipeline
//! group GROUP (per the last good copy of GoCD's configuration).

use std::sync::Arc;

use super::{Facts, FunctionSpec, RuleFunction, Verdict};

pub const SPEC: FunctionSpec = FunctionSpec {
    name: "pipelines.in_group",
    manager: "gocd",
    min_args: 1,
    max_args: 1,
    usage: "GROUP",
    build,
};

#[derive(Debug)]
struct InGroup {
    group: String,
}

fn build(args: &[String]) -> Result<Arc<dyn RuleFunction>, String> {
    Ok(Arc::new(InGroup {
        group: args[0].clone(),
    }))
}

impl RuleFunction for InGroup {
    fn needs_groups(&self) -> bool {
        true
    }

    fn check(&self, facts: &Facts) -> Verdict {
        let Some(pipeline) = facts.pipeline.as_deref() else {
            return Verdict::NoMatch;
        };
        match &facts.groups {
            None => Verdict::NoGocdData,
            Some(g) if g.contains(&self.group, pipeline) => Verdict::Match,
            Some(_) => Verdict::NoMatch,
        }
    }
}
