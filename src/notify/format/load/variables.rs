//! Variables (inline and `variables_file`) and template texts of format files.

use super::*;

pub(super) fn read_variables_file(
    base: &Path,
    key: &str,
    node: &Node,
    into: &mut BTreeMap<String, String>,
    p: &mut FileProblems,
) {
    let (rel, section) = match &node.value {
        Value::Str(s) => (s.clone(), None),
        Value::Table(_) => {
            let Some(mut t) = p.table(key, node) else {
                return;
            };
            let rel = match t.get("path") {
                Some(n) => p.expect_str(&t.path("path"), n).map(str::to_string),
                None => {
                    p.at(key, node, "needs `path`");
                    None
                }
            };
            let section = t.get("section").and_then(|n| {
                p.expect_str(&join_path(key, "section"), n)
                    .map(str::to_string)
            });
            t.finish(p, &["path", "section"]);
            match rel {
                Some(r) => (r, section),
                None => return,
            }
        }
        other => {
            p.at(
                key,
                node,
                format!(
                    "must be a file name or a table {{ path, section }}, found {}",
                    other.kind()
                ),
            );
            return;
        }
    };
    let path = base.join(&rel);
    let shown = path.display().to_string();
    let json_problem = |p: &mut FileProblems, jkey: &str, reason: String| {
        p.found.refuse(FormatProblem {
            file: shown.clone(),
            key: jkey.to_string(),
            line: None,
            reason,
        })
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => {
            p.at(
                key,
                node,
                format!("cannot read variables file {shown}: {e}"),
            );
            return;
        }
    };
    let json: serde_json::Value = match serde_json::from_str(&text) {
        Ok(j) => j,
        Err(e) => {
            json_problem(p, "", format!("not valid JSON: {e}"));
            return;
        }
    };
    let (object, prefix) = match &section {
        Some(s) => match json.get(s) {
            Some(v) => (v, s.clone()),
            None => {
                json_problem(
                    p,
                    s,
                    format!("no section {s:?} (named by {key} in {})", p.file),
                );
                return;
            }
        },
        None => (&json, String::new()),
    };
    let Some(map) = object.as_object() else {
        json_problem(p, &prefix, "must be a JSON object of strings".into());
        return;
    };
    for (k, v) in map {
        let jkey = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            serde_json::Value::String(s) => {
                into.insert(k.clone(), s.clone());
            }
            other => json_problem(
                p,
                &jkey,
                format!("variables must be strings, found {}", json_kind(other)),
            ),
        }
    }
}

pub(super) fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

pub(super) fn read_variables(
    key: &str,
    node: &Node,
    into: &mut BTreeMap<String, String>,
    p: &mut FileProblems,
) {
    let Some(mut t) = p.table(key, node) else {
        return;
    };
    for (k, v) in t.all() {
        if let Some(s) = p.expect_str(&join_path(key, k), v) {
            into.insert(k.clone(), s.to_string());
        }
    }
}

pub(super) fn template_text(key: &str, node: &Node, p: &mut FileProblems) -> Option<TemplateText> {
    let s = p.expect_str(key, node)?;
    match TemplateText::parse(s, Part::Text) {
        Ok(t) => Some(t),
        Err(e) => {
            p.at(key, node, e.to_string());
            None
        }
    }
}
