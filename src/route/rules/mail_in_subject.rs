//! `mail.in_subject WORD…`: every word occurs in the (decoded) subject,
//! ignoring case, as substrings (mail2alert's semantics).

use std::sync::Arc;

use super::{Facts, FunctionSpec, RuleFunction, Verdict};

pub const SPEC: FunctionSpec = FunctionSpec {
    name: "mail.in_subject",
    manager: "mail",
    min_args: 1,
    max_args: usize::MAX,
    usage: "WORD...",
    build,
};

#[derive(Debug)]
struct InSubject {
    words: Vec<String>,
}

fn build(args: &[String]) -> Result<Arc<dyn RuleFunction>, String> {
    if args.iter().any(|w| w.is_empty()) {
        return Err("an empty word matches every subject; remove it".into());
    }
    Ok(Arc::new(InSubject {
        words: args.iter().map(|w| w.to_lowercase()).collect(),
    }))
}

impl RuleFunction for InSubject {
    fn check(&self, facts: &Facts) -> Verdict {
        let subject = facts.subject.to_lowercase();
        if self.words.iter().all(|w| subject.contains(w.as_str())) {
            Verdict::Match
        } else {
            Verdict::NoMatch
        }
    }
}
