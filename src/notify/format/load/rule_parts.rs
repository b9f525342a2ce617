//! The parts of a rule: `match`, `postpone`, data location, copies,
//! template choice.

use super::*;
pub(crate) use crate::shared::duration::parse_duration;

pub(super) fn read_location(key: &str, node: &Node, p: &mut FileProblems) -> Option<DataLocation> {
    match p.expect_str(key, node)? {
        "inline" => Some(DataLocation::Inline),
        "attachment" => Some(DataLocation::Attachment),
        other => {
            p.at(
                key,
                node,
                format!("unknown data location {other:?}; use \"inline\" or \"attachment\""),
            );
            None
        }
    }
}

pub(super) fn read_copies(key: &str, node: &Node, into: &mut Vec<CopySpec>, p: &mut FileProblems) {
    let Some(items) = p.expect_array(key, node) else {
        return;
    };
    for (i, item) in items.iter().enumerate() {
        let ckey = format!("{key}[{i}]");
        let Some(mut t) = p.table(&ckey, item) else {
            continue;
        };
        let group = t.get("recipient_group").and_then(|n| {
            p.expect_str(&join_path(&ckey, "recipient_group"), n)
                .map(str::to_string)
        });
        let recipients = t
            .get("recipients")
            .and_then(|n| p.expect_strings(&join_path(&ckey, "recipients"), n));
        let location = match t.get("data_location") {
            Some(n) => read_location(&join_path(&ckey, "data_location"), n, p),
            None => Some(DataLocation::Inline),
        };
        t.finish(p, &["recipient_group", "recipients", "data_location"]);
        let (Some(group), Some(recipients), Some(location)) = (group, recipients, location) else {
            if !table_has(item, "recipient_group") || !table_has(item, "recipients") {
                p.at(
                    &ckey,
                    item,
                    "a copy needs `recipient_group` and `recipients`",
                );
            }
            continue;
        };
        if recipients.is_empty() {
            p.at(&ckey, item, "`recipients` is empty");
            continue;
        }
        let mut ok = true;
        for r in &recipients {
            let plausible = r.contains('@')
                && !r.chars().any(|c| {
                    c.is_whitespace() || c.is_control() || matches!(c, '<' | '>' | ',' | ';')
                });
            if !plausible {
                p.at(&ckey, item, format!("{r:?} is not a plain mail address"));
                ok = false;
            }
        }
        if ok {
            into.push(CopySpec {
                recipient_group: group,
                recipients,
                location,
            });
        }
    }
}

pub(super) fn table_has(node: &Node, key: &str) -> bool {
    matches!(&node.value, Value::Table(e) if e.iter().any(|(k, _)| k == key))
}

pub(super) fn read_str_match(key: &str, node: &Node, p: &mut FileProblems) -> Option<StrMatch> {
    match &node.value {
        Value::Str(_) | Value::Array(_) => Some(StrMatch {
            equals: p.expect_strings(key, node)?,
            ..StrMatch::default()
        }),
        Value::Table(_) => {
            let mut t = p.table(key, node)?;
            let mut m = StrMatch::default();
            let mut ok = true;
            for (name, slot) in [
                ("equals", &mut m.equals),
                ("prefix", &mut m.prefix),
                ("suffix", &mut m.suffix),
            ] {
                if let Some(n) = t.get(name) {
                    match p.expect_strings(&join_path(key, name), n) {
                        Some(v) => *slot = v,
                        None => ok = false,
                    }
                }
            }
            t.finish(p, &["equals", "prefix", "suffix"]);
            if ok && m.equals.is_empty() && m.prefix.is_empty() && m.suffix.is_empty() {
                p.at(
                    key,
                    node,
                    "matches nothing: give `equals`, `prefix` or `suffix`",
                );
                return None;
            }
            ok.then_some(m)
        }
        other => {
            p.at(
                key,
                node,
                format!(
                    "must be a string, an array of strings or a table {{ equals, prefix, suffix }}, found {}",
                    other.kind()
                ),
            );
            None
        }
    }
}

pub(super) fn read_match(key: &str, node: &Node, p: &mut FileProblems) -> MatchParts {
    let mut m = MatchParts::default();
    let Some(mut t) = p.table(key, node) else {
        return m;
    };
    for (name, slot) in [
        ("notification_format", &mut m.notification_format),
        ("event_data_format", &mut m.event_data_format),
        ("template_name", &mut m.template_name),
        ("recipient_address", &mut m.recipient_address),
    ] {
        if let Some(n) = t.get(name) {
            *slot = read_str_match(&join_path(key, name), n, p);
        }
    }
    if let Some(n) = t.get("aggregate") {
        let akey = join_path(key, "aggregate");
        if let Some(mut a) = p.table(&akey, n) {
            for (k, v) in a.all() {
                if let Some(sm) = read_str_match(&join_path(&akey, k), v, p) {
                    m.aggregate.push((k.clone(), sm));
                }
            }
        }
    }
    t.finish(p, MATCH_KEYS);
    m
}

pub(super) fn read_duration(
    key: &str,
    node: &Node,
    p: &mut FileProblems,
) -> Option<Option<Duration>> {
    let d = match &node.value {
        Value::Int(n) if *n >= 0 => Duration::try_seconds(*n),
        Value::Str(s) => parse_duration(s),
        _ => None,
    };
    match d {
        Some(d) if d.is_zero() => Some(None),
        Some(d) => Some(Some(d)),
        None => {
            p.at(
                key,
                node,
                "must be a duration such as \"15m\", \"2h\", \"1h30m\", \"90s\", \"1d\" or a number of seconds",
            );
            None
        }
    }
}

pub(super) fn read_postpone(key: &str, node: &Node, p: &mut FileProblems) -> PostponeParts {
    let mut out = PostponeParts::default();
    let Some(mut t) = p.table(key, node) else {
        return out;
    };
    if let Some(n) = t.get("notification_interval") {
        out.interval = p.expect_bool(&join_path(key, "notification_interval"), n);
    }
    if let Some(n) = t.get("min_directive_age") {
        out.min_directive_age = read_duration(&join_path(key, "min_directive_age"), n, p);
    }
    if let Some(n) = t.get("min_observation_age") {
        out.min_observation_age = read_duration(&join_path(key, "min_observation_age"), n, p);
    }
    t.finish(p, POSTPONE_KEYS);
    out
}

pub(super) fn read_template_choice(
    key: &str,
    node: &Node,
    p: &mut FileProblems,
) -> Option<TemplateChoice> {
    match &node.value {
        Value::Str(s) if s.is_empty() => {
            p.at(key, node, "empty template name");
            None
        }
        Value::Str(s) => Some(TemplateChoice::Named(s.clone())),
        Value::Table(_) => {
            let mut t = p.table(key, node)?;
            let subject = t.get("subject").and_then(|n| {
                p.expect_str(&join_path(key, "subject"), n)
                    .map(str::to_string)
            });
            let body = t
                .get("body")
                .and_then(|n| p.expect_str(&join_path(key, "body"), n).map(str::to_string));
            t.finish(p, &["subject", "body"]);
            let (Some(subject), Some(body)) = (subject, body) else {
                p.at(key, node, "an inline template needs `subject` and `body`");
                return None;
            };
            match Template::from_strings(&subject, &body) {
                Ok(t) => Some(TemplateChoice::Inline(Arc::new(t))),
                Err(e) => {
                    p.at(key, node, e.to_string());
                    None
                }
            }
        }
        other => {
            p.at(
                key,
                node,
                format!(
                    "must be a template name or a table {{ subject, body }}, found {}",
                    other.kind()
                ),
            );
            None
        }
    }
}
