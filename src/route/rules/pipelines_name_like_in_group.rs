//! `pipelines.name_like_in_group PATTERN GROUP`: PATTERN is searched in
//! the message's pipeline name and its first capture group must name a
//! pipeline of GROUP; e.g. `(.+)-release.*` maps `ppp-release-1.2.3` to
//! `ppp`.

use std::sync::Arc;

use regex::Regex;

use super::{Facts, FunctionSpec, RuleFunction, Verdict};

pub const SPEC: FunctionSpec = FunctionSpec {
    name: "pipelines.name_like_in_group",
    manager: "gocd",
    min_args: 2,
    max_args: 2,
    usage: "PATTERN GROUP",
    build,
};

#[derive(Debug)]
struct NameLikeInGroup {
    pattern: Regex,
    group: String,
}

fn build(args: &[String]) -> Result<Arc<dyn RuleFunction>, String> {
    let pattern =
        Regex::new(&args[0]).map_err(|e| format!("bad regular expression {:?}: {e}", args[0]))?;
    if pattern.captures_len() < 2 {
        return Err(format!(
            "the regular expression {:?} needs a capture group `( … )` for the pipeline name",
            args[0]
        ));
    }
    Ok(Arc::new(NameLikeInGroup {
        pattern,
        group: args[1].clone(),
    }))
}

impl RuleFunction for NameLikeInGroup {
    fn needs_groups(&self) -> bool {
        true
    }

    fn check(&self, facts: &Facts) -> Verdict {
        let Some(pipeline) = facts.pipeline.as_deref() else {
            return Verdict::NoMatch;
        };
        let Some(base) = self
            .pattern
            .captures(pipeline)
            .and_then(|c| c.get(1))
            .map(|m| m.as_str())
        else {
            return Verdict::NoMatch;
        };
        match &facts.groups {
            None => Verdict::NoGocdData,
            Some(g) if g.contains(&self.group, base) => Verdict::Match,
            Some(_) => Verdict::NoMatch,
        }
    }
}
