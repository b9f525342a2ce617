//! What a rollback to intelmqcbmail 1.4 would trip over in the same
//! files (`check-config` prints it); not problems for mailgend.

use serde_json::Value;

use super::files::Merged;
use super::ConfigProblem;

/// (it merges them the same way), so that `check-config` can say whether
/// a rollback to it still works. Not problems for mailgend.
pub(super) fn rollback_problems(merged: &Merged) -> Vec<ConfigProblem> {
    const OLD: &str = "intelmqcbmail 1.4";
    let mut out = Vec::new();
    let mut note = |key: &str, reason: String| {
        out.push(ConfigProblem {
            file: merged.origin_of(key),
            line: None,
            key: key.to_string(),
            reason: format!("rollback: {reason}"),
        })
    };
    // intelmqmail/cb.py:441-446: the key set must be exactly these three.
    const PGP: [&str; 3] = ["always_sign", "gnupg_home", "signing_key"];
    match merged.root.get("openpgp") {
        Some(Value::Object(pgp)) => {
            let missing: Vec<&str> = PGP
                .iter()
                .copied()
                .filter(|k| !pgp.contains_key(*k))
                .collect();
            let extra: Vec<&str> = pgp
                .keys()
                .map(String::as_str)
                .filter(|k| !PGP.contains(k))
                .collect();
            if !missing.is_empty() || !extra.is_empty() {
                let mut what = Vec::new();
                if !missing.is_empty() {
                    what.push(format!("lacks {}", missing.join(", ")));
                }
                if !extra.is_empty() {
                    what.push(format!("has {}", extra.join(", ")));
                }
                note(
                    "openpgp",
                    format!(
                        "{OLD} exits CRITICAL unless this section has exactly always_sign, \
                         gnupg_home and signing_key; it {}",
                        what.join(" and ")
                    ),
                );
            }
        }
        _ => note(
            "openpgp",
            format!("{OLD} exits CRITICAL without this section"),
        ),
    }
    // intelmqmail/db.py:22-27 and cb.py:234-235 index these directly.
    for key in [
        "database.event.name",
        "database.event.username",
        "database.event.password",
        "database.event.host",
        "database.event.port",
        "smtp.host",
        "smtp.port",
    ] {
        let (section, rest) = key.rsplit_once('.').unwrap();
        let mut cur = Some(&merged.root);
        for part in section.split('.') {
            cur = cur.and_then(|m| m.get(part)).and_then(Value::as_object);
        }
        if !cur.is_some_and(|m| m.contains_key(rest)) {
            note(
                key,
                format!(
                    "{OLD} fails with a KeyError without it; give it explicitly \
                     (mailgend has a default; for the password, null will do)"
                ),
            );
        }
    }
    // intelmqmail/cb.py:424: Python's logging knows upper-case names only.
    if let Some(Value::String(level)) = merged.root.get("logging_level") {
        if !["DEBUG", "INFO", "WARNING", "WARN", "ERROR", "CRITICAL"].contains(&level.as_str()) {
            note(
                "logging_level",
                format!("{OLD} refuses {level:?} (Python's level names are upper case)"),
            );
        }
    }
    out
}
