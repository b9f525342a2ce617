//! Configuration problems located in their file, and the one collector the
//! three config readers (the JSON config, the format files, the router's
//! YAML) gather them in: each reports every problem at once, sorted into
//! what refuses the file and what is only a WARN (what the old programs
//! accepted).

use std::fmt;

/// A problem in a configuration file: file, line (where the language has
/// them), key path and reason, shown as `file:line: key `k`: reason`
/// (`file: key `k`: reason` without a line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocatedProblem {
    pub file: String,
    /// 1-based; `None` for whole-file problems (cannot read) and for the
    /// JSON config, whose reader has no lines.
    pub line: Option<usize>,
    /// Key path such as `format[2].columns[4]`; empty for whole-file
    /// problems.
    pub key: String,
    pub reason: String,
}

impl LocatedProblem {
    /// A problem with the file as a whole (cannot read, not JSON, ...).
    pub fn whole_file(file: impl Into<String>, reason: impl Into<String>) -> LocatedProblem {
        LocatedProblem {
            file: file.into(),
            line: None,
            key: String::new(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for LocatedProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
        }
        if !self.key.is_empty() {
            write!(f, ": key `{}`", self.key)?;
        }
        write!(f, ": {}", self.reason)
    }
}

/// What a reading found: refusals (the file cannot work) and warnings
/// (accepted, one WARN each), in the order found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Problems {
    refusals: Vec<LocatedProblem>,
    warnings: Vec<LocatedProblem>,
}

/// The warnings of an accepted reading, in the order found.
pub type Warnings = Vec<LocatedProblem>;

/// A refused reading: what refuses it, and the warnings found on the way
/// (a reader may show them too, since they can explain a refusal).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub problems: Vec<LocatedProblem>,
    pub warnings: Warnings,
}

impl Problems {
    pub fn new() -> Problems {
        Problems::default()
    }

    /// A problem that refuses the file.
    pub fn refuse(&mut self, p: LocatedProblem) {
        self.refusals.push(p);
    }

    /// A problem that is only a WARN.
    pub fn warn(&mut self, p: LocatedProblem) {
        self.warnings.push(p);
    }

    /// Whether anything so far refuses the file.
    pub fn is_refused(&self) -> bool {
        !self.refusals.is_empty()
    }

    /// Takes over what `other` found, after what is here.
    pub fn append(&mut self, other: Problems) {
        self.refusals.extend(other.refusals);
        self.warnings.extend(other.warnings);
    }

    /// The warnings when nothing refuses the file, else the refusal.
    pub fn finish(self) -> Result<Warnings, Refusal> {
        if self.refusals.is_empty() {
            Ok(self.warnings)
        } else {
            Err(Refusal {
                problems: self.refusals,
                warnings: self.warnings,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(reason: &str) -> LocatedProblem {
        LocatedProblem {
            file: "f".into(),
            line: Some(3),
            key: "k".into(),
            reason: reason.into(),
        }
    }

    #[test]
    fn warnings_alone_are_accepted_refusals_carry_them() {
        let mut ok = Problems::new();
        ok.warn(p("w"));
        assert!(!ok.is_refused());
        assert_eq!(ok.finish(), Ok(vec![p("w")]));

        let mut bad = Problems::new();
        bad.warn(p("w"));
        bad.refuse(p("r1"));
        let mut more = Problems::new();
        more.refuse(p("r2"));
        bad.append(more);
        assert!(bad.is_refused());
        assert_eq!(
            bad.finish(),
            Err(Refusal {
                problems: vec![p("r1"), p("r2")],
                warnings: vec![p("w")],
            })
        );
    }

    #[test]
    fn display_with_and_without_line_and_key() {
        assert_eq!(p("bad").to_string(), "f:3: key `k`: bad");
        let mut no_line = p("bad");
        no_line.line = None;
        assert_eq!(no_line.to_string(), "f: key `k`: bad");
        assert_eq!(
            LocatedProblem::whole_file("f", "cannot read").to_string(),
            "f: cannot read"
        );
    }
}
