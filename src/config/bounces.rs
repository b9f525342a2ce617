//! `mailgend.verp` and `mailgend.bounces`: VERP envelope senders
//! (`shared::verp`) and the per-recipient bounce policy (`notify::bounce`,
//! `route::verp`).

use std::path::Path;

use serde_json::Value;

use crate::shared::duration::parse_duration;
use crate::shared::verp::Verp;

/// The per-recipient policy (`mailgend.bounces`): a WARN naming the
/// contact once it has bounced permanently `warn_after` times within
/// `window`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub warn_after: u32,
    pub window: chrono::Duration,
}

/// What the JSON configuration says about VERP and bounces; problems and
/// warnings as (dotted key, reason) for the caller's reader.
#[derive(Debug, Default)]
pub struct Settings {
    pub verp: Option<Verp>,
    pub policy: Option<Policy>,
    pub problems: Vec<(String, String)>,
    pub warnings: Vec<(String, String)>,
}

/// Reads `mailgend.verp` (`address`, `key_file`) and `mailgend.bounces`
/// (`warn_after`, `window`). Both sections are optional; VERP is on only
/// with both of its keys.
pub fn settings(verp: Option<&Value>, bounces: Option<&Value>) -> Settings {
    let mut s = Settings::default();
    let text = |s: &mut Settings, v: Option<&Value>, key: &str| -> Option<String> {
        match v {
            None | Some(Value::Null) => None,
            Some(Value::String(t)) if !t.trim().is_empty() => Some(t.trim().to_string()),
            Some(_) => {
                s.problems
                    .push((key.into(), "must be a non-empty string".into()));
                None
            }
        }
    };
    let address = text(&mut s, get(verp, "address"), "mailgend.verp.address");
    let key_file = text(&mut s, get(verp, "key_file"), "mailgend.verp.key_file");
    match (address, key_file) {
        (None, None) => {}
        (Some(_), None) => s.problems.push((
            "mailgend.verp.key_file".into(),
            "required with mailgend.verp.address (the file with the VERP key)".into(),
        )),
        (None, Some(_)) => s.problems.push((
            "mailgend.verp.address".into(),
            "required with mailgend.verp.key_file (e.g. bounces@cert.example)".into(),
        )),
        (Some(address), Some(file)) => match read_key(Path::new(&file)) {
            Err(reason) => s.problems.push(("mailgend.verp.key_file".into(), reason)),
            Ok(key) => {
                if let Some(w) = crate::shared::secret_file::exposure(Path::new(&file)) {
                    s.warnings.push(("mailgend.verp.key_file".into(), w));
                }
                match Verp::new(&address, &key) {
                    Ok(v) => s.verp = Some(v),
                    Err(e) => {
                        let key = match e {
                            crate::shared::verp::VerpError::ShortKey => "mailgend.verp.key_file",
                            _ => "mailgend.verp.address",
                        };
                        s.problems.push((key.into(), e.to_string()));
                    }
                }
            }
        },
    }
    let warn_after = match get(bounces, "warn_after") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(n) if (1..=1000).contains(&n) => Some(n as u32),
            _ => {
                s.problems.push((
                    "mailgend.bounces.warn_after".into(),
                    "must be an integer from 1 to 1000".into(),
                ));
                None
            }
        },
    };
    let window = match get(bounces, "window") {
        None | Some(Value::Null) => chrono::Duration::days(30),
        Some(Value::String(t)) => match parse_duration(t) {
            Some(d) if d > chrono::Duration::zero() => d,
            _ => {
                s.problems.push((
                    "mailgend.bounces.window".into(),
                    format!("{t:?} is not a duration such as \"30d\" or \"12h\""),
                ));
                chrono::Duration::days(30)
            }
        },
        Some(_) => {
            s.problems.push((
                "mailgend.bounces.window".into(),
                "must be a duration string such as \"30d\"".into(),
            ));
            chrono::Duration::days(30)
        }
    };
    s.policy = warn_after.map(|warn_after| Policy { warn_after, window });
    s
}

/// The key: the file's bytes without a final line end (so both
/// `openssl rand -hex 32 > FILE` and 32 raw bytes work).
fn read_key(path: &Path) -> Result<Vec<u8>, String> {
    let mut key =
        std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    while key.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        key.pop();
    }
    Ok(key)
}

fn get<'a>(v: Option<&'a Value>, k: &str) -> Option<&'a Value> {
    v.and_then(|v| v.as_object()).and_then(|m| m.get(k))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn verp_needs_both_keys_and_a_readable_long_key() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("verp.key");
        std::fs::write(&key, "0123456789abcdef0123\n").unwrap();
        let v = json!({"address": "bounces@cert.example", "key_file": key});
        let s = settings(Some(&v), None);
        assert!(s.problems.is_empty(), "{:?}", s.problems);
        assert!(s.verp.is_some() && s.policy.is_none());

        let s = settings(Some(&json!({"address": "bounces@cert.example"})), None);
        assert_eq!(s.problems[0].0, "mailgend.verp.key_file");
        std::fs::write(&key, "short\n").unwrap();
        let s = settings(Some(&v), None);
        assert_eq!(s.problems[0].0, "mailgend.verp.key_file");
        let missing = json!({"address": "b@x.example", "key_file": dir.path().join("nope")});
        assert!(settings(Some(&missing), None).problems[0]
            .1
            .starts_with("cannot read"));
        assert!(settings(None, None).verp.is_none());
    }

    #[test]
    fn the_policy_is_read_with_a_default_window() {
        let s = settings(None, Some(&json!({"warn_after": 3})));
        assert_eq!(
            s.policy,
            Some(Policy {
                warn_after: 3,
                window: chrono::Duration::days(30)
            })
        );
        let s = settings(None, Some(&json!({"warn_after": 2, "window": "12h"})));
        assert_eq!(s.policy.unwrap().window, chrono::Duration::hours(12));
        let s = settings(None, Some(&json!({"warn_after": 0, "window": "soon"})));
        assert_eq!(s.problems.len(), 2, "{:?}", s.problems);
    }
}
