//! Finding the JSON files and merging them one level deep, the user file
//! winning, as intelmqcbmail does (spec §8); every key remembers the file
//! it came from so that a problem names the right file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::shared::problem::Problems;

use super::{ConfigError, ConfigProblem, SYSTEM_CONFIG, USER_CONFIG};

/// Which files to read.
#[derive(Debug, Clone, Default)]
pub struct ConfigSource {
    /// `-c FILE`: replaces the system file.
    pub system_file: Option<PathBuf>,
    /// Override of `$HOME/.intelmq/intelmq-mailgen.conf` (tests); `None`
    /// means the default location, `Some(None)`-like behaviour is
    /// `skip_user_file`.
    pub user_file: Option<PathBuf>,
    pub skip_user_file: bool,
}

impl ConfigSource {
    pub fn file(path: impl Into<PathBuf>) -> ConfigSource {
        ConfigSource {
            system_file: Some(path.into()),
            user_file: None,
            skip_user_file: true,
        }
    }

    pub(super) fn system_path(&self) -> PathBuf {
        self.system_file
            .clone()
            .unwrap_or_else(|| PathBuf::from(SYSTEM_CONFIG))
    }

    pub(super) fn user_path(&self) -> Option<PathBuf> {
        if self.skip_user_file {
            return None;
        }
        if let Some(p) = &self.user_file {
            return Some(p.clone());
        }
        std::env::var_os("HOME").map(|h| Path::new(&h).join(USER_CONFIG))
    }
}

/// The merged JSON plus, for every `section.key` / `key`, the file it came
/// from, so that problems can name the right file.
pub(super) struct Merged {
    pub(super) root: Map<String, Value>,
    pub(super) origin: BTreeMap<String, String>,
    pub(super) files: Vec<PathBuf>,
}

impl Merged {
    pub(super) fn origin_of(&self, key: &str) -> String {
        let mut k = key;
        loop {
            if let Some(f) = self.origin.get(k) {
                return f.clone();
            }
            match k.rfind('.') {
                Some(i) => k = &k[..i],
                None => break,
            }
        }
        self.files
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(" + ")
    }
}

fn read_json_file(
    path: &Path,
    optional: bool,
) -> Result<Option<Map<String, Value>>, ConfigProblem> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        // Under systemd's ProtectHome= the user file's directory is
        // inaccessible: for the optional user file that means "no file".
        Err(e) if optional && e.kind() == std::io::ErrorKind::PermissionDenied => return Ok(None),
        Err(e) => {
            return Err(ConfigProblem::whole_file(
                path.display().to_string(),
                format!("cannot read: {e}"),
            ))
        }
    };
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(map)) => Ok(Some(map)),
        Ok(_) => Err(ConfigProblem::whole_file(
            path.display().to_string(),
            "the top level must be a JSON object",
        )),
        Err(e) => Err(ConfigProblem::whole_file(
            path.display().to_string(),
            format!("not valid JSON: {e}"),
        )),
    }
}

pub(super) fn merge(source: &ConfigSource) -> Result<Merged, ConfigError> {
    let mut problems = Problems::new();
    let mut merged = Merged {
        root: Map::new(),
        origin: BTreeMap::new(),
        files: Vec::new(),
    };
    let system = source.system_path();
    if source.system_file.is_some() && !system.exists() {
        problems.refuse(ConfigProblem::whole_file(
            system.display().to_string(),
            "file does not exist",
        ));
    }
    let mut paths = vec![(system, false)];
    paths.extend(source.user_path().map(|p| (p, true)));
    for (path, optional) in paths {
        let map = match read_json_file(&path, optional) {
            Ok(Some(m)) => m,
            Ok(None) => continue,
            Err(p) => {
                problems.refuse(p);
                continue;
            }
        };
        let file = path.display().to_string();
        merged.files.push(path);
        // One level deep, as intelmqcbmail does: a dict in the later file
        // updates the dict of the earlier one; anything else replaces it.
        for (key, value) in map {
            match (merged.root.get_mut(&key), value) {
                (Some(Value::Object(existing)), Value::Object(update)) => {
                    for (k, v) in update {
                        merged.origin.insert(format!("{key}.{k}"), file.clone());
                        existing.insert(k, v);
                    }
                }
                (_, value) => {
                    merged
                        .origin
                        .retain(|k, _| !(k == &key || k.starts_with(&format!("{key}."))));
                    merged.origin.insert(key.clone(), file.clone());
                    merged.root.insert(key, value);
                }
            }
        }
    }
    if let Err(refusal) = problems.finish() {
        return Err(ConfigError(refusal.problems));
    }
    if merged.files.is_empty() {
        let searched = std::iter::once(source.system_path())
            .chain(source.user_path())
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        return Err(ConfigError(vec![ConfigProblem::whole_file(
            searched,
            "no configuration found",
        )]));
    }
    Ok(merged)
}
