//! What loading a configuration can go wrong with: one problem (file, key,
//! reason) and the refusal that carries all of them.

use std::fmt;

/// One problem with the configuration: the file the offending key came
/// from (or the files searched), the dotted key path (`smtp.port`, empty
/// for whole-file problems) and the reason. The JSON reader has no lines,
/// so `line` is always `None` and it prints as `file: key `k`: reason`.
pub type ConfigProblem = crate::shared::problem::LocatedProblem;

/// Every problem found while loading; the config is refused as a whole.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigError(pub Vec<ConfigProblem>);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration")?;
        for p in &self.0 {
            write!(f, "\n  {p}")?;
        }
        Ok(())
    }
}
