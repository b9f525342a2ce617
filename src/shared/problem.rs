//! A configuration problem located in its file, the one shape the format
//! files and the router's YAML report in (the JSON config's own
//! `ConfigProblem` prints the same way, without a line).

use std::fmt;

/// A problem in a file with line numbers (format files, the router's
/// YAML): file, line, key path and reason, shown as
/// `file:line: key `k`: reason`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocatedProblem {
    pub file: String,
    /// 1-based; `None` for whole-file problems (cannot read).
    pub line: Option<usize>,
    /// Key path such as `format[2].columns[4]`; empty for whole-file
    /// problems.
    pub key: String,
    pub reason: String,
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
