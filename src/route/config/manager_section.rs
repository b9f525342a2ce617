//! `managers:`: each manager, what it wants (`messages-we-want`) and its
//! rules (filters, events, actions).

use super::*;

pub(super) const MANAGER_KEYS: &[&str] = &["name", "messages-we-want", "rules"];

pub(super) fn read_managers(r: &mut Reader, n: &Node, have_slack: bool) -> Vec<ManagerConfig> {
    let Some(items) = r.list(n, "managers") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let k = format!("managers[{i}]");
        if let Some(m) = read_manager(r, item, &k, have_slack) {
            // The first match wins: a later manager wanting exactly the
            // same mail never sees any (mail2alert ran so too, server.py:100-109).
            if let Some(first) = out
                .iter()
                .position(|o: &ManagerConfig| o.wanted == m.wanted)
            {
                r.oddity(
                    m.line,
                    &format!("{k}.messages-we-want"),
                    format!(
                        "managers[{first}] (line {}) already wants the same mail; this manager never gets any",
                        out[first].line
                    ),
                );
            }
            out.push(m);
        }
    }
    out
}

pub(super) fn read_manager(
    r: &mut Reader,
    n: &Node,
    k: &str,
    have_slack: bool,
) -> Option<ManagerConfig> {
    let m = r.map(n, k)?;
    let name = r.required_string(&m, k, "name")?;
    let Some(spec) = managers::lookup(&name) else {
        let known: Vec<_> = managers::MANAGERS.iter().map(|m| m.name).collect();
        r.problem(
            m.get("name").map_or(n.line, |v| v.line),
            &format!("{k}.name"),
            format!("unknown manager {name:?}; known: {}", known.join(", ")),
        );
        return None;
    };
    let mut known = MANAGER_KEYS.to_vec();
    known.extend_from_slice(spec.extra_keys);
    r.known_keys(&m, k, &known);

    let wanted = match m.get("messages-we-want") {
        None => {
            // mail2alert failed on every message (KeyError, plugin/mail.py:37).
            r.problem(
                n.line,
                &format!("{k}.messages-we-want"),
                "missing (`to:` or `from:` an address)",
            );
            None
        }
        Some(w) => read_wanted(r, w, &format!("{k}.messages-we-want")),
    };
    let rules = match m.get("rules") {
        None => {
            // mail2alert failed on every wanted message (KeyError,
            // plugin/mail.py:53).
            r.problem(
                n.line,
                &format!("{k}.rules"),
                "missing (a list of rules; `[]` for none)",
            );
            Vec::new()
        }
        Some(rn) => {
            let mut rules = Vec::new();
            if let Some(items) = r.list(rn, &format!("{k}.rules")) {
                for (j, item) in items.iter().enumerate() {
                    let rk = format!("{k}.rules[{j}]");
                    if let Some(rule) = read_rule(r, item, &rk, spec, have_slack) {
                        rules.push(rule);
                    }
                }
            }
            rules
        }
    };
    let settings = (spec.parse)(r, &m, k, &rules);
    let wanted = wanted?;
    Some(ManagerConfig {
        name,
        line: n.line,
        wanted: wanted?,
        rules,
        settings,
    })
}

/// `Some(None)`: readable, but the manager never wants anything (mail2alert
/// ran such a manager; it never took a message, plugin/mail.py:42-45).
pub(super) fn read_wanted(r: &mut Reader, n: &Node, k: &str) -> Option<Option<Wanted>> {
    let m = r.map(n, k)?;
    r.known_keys(&m, k, &["to", "from"]);
    let address = |r: &mut Reader, key: &str| -> Option<String> {
        let v = m.get(key)?;
        let s = r.string(v, &format!("{k}.{key}"))?;
        match crate::shared::address::parse_recipient(&s) {
            Ok(a) if a.display_name().is_none() && !s.contains('<') => Some(s.trim().to_string()),
            _ => {
                // mail2alert compared the text with the envelope as it was.
                r.oddity(
                    v.line,
                    &format!("{k}.{key}"),
                    format!(
                        "{s:?} is not a bare address; compared as it is with the envelope, it never matches"
                    ),
                );
                Some(s)
            }
        }
    };
    let to = m.get("to").is_some_and(|v| !v.is_null());
    let from = m.get("from").is_some_and(|v| !v.is_null());
    match (to, from) {
        (true, false) => address(r, "to").map(|a| Some(Wanted::To(a))),
        (false, true) => address(r, "from").map(|a| Some(Wanted::From(a))),
        (true, true) => {
            r.oddity(
                n.line,
                k,
                "both `to` and `from`: `from` is ignored, as mail2alert ignored it (plugin/mail.py:42-45)",
            );
            address(r, "to").map(|a| Some(Wanted::To(a)))
        }
        (false, false) => {
            r.oddity(
                n.line,
                k,
                "neither `to:` nor `from:`: this manager never gets any mail (as in mail2alert)",
            );
            Some(None)
        }
    }
}

pub(super) fn read_rule(
    r: &mut Reader,
    n: &Node,
    k: &str,
    spec: &managers::ManagerSpec,
    have_slack: bool,
) -> Option<RuleConfig> {
    let m = r.map(n, k)?;
    r.known_keys(&m, k, &["actions", "filter", "name", "owner"]);
    let text = |r: &mut Reader, key: &str| {
        m.get(key)
            .filter(|v| !v.is_null())
            .and_then(|v| r.string(v, &format!("{k}.{key}")))
    };
    let name = text(r, "name");
    let owner = text(r, "owner");
    let ak = format!("{k}.actions");
    let actions = match m.get("actions") {
        None => {
            // rules.py:9: no actions, the rule does nothing.
            r.oddity(
                n.line,
                &ak,
                "missing: the rule does nothing (as in mail2alert)",
            );
            Some(Vec::new())
        }
        Some(a) => r.list(a, &ak).map(|items| {
            if items.is_empty() {
                r.oddity(
                    a.line,
                    &ak,
                    "empty: the rule does nothing (as in mail2alert)",
                );
            }
            let mut out = Vec::new();
            for (i, item) in items.iter().enumerate() {
                let ik = format!("{ak}[{i}]");
                let Some(uri) = r.string(item, &ik) else {
                    continue;
                };
                match actions::parse(&uri) {
                    Ok(actions::Parsed::Action(act)) => {
                        if matches!(act, Action::Slack { .. }) && !have_slack {
                            r.problem(item.line, &ik, "Slack action but no top-level slack-token");
                        }
                        out.push(act)
                    }
                    Ok(actions::Parsed::Odd(act, why)) => {
                        r.oddity(item.line, &ik, why);
                        out.extend(act);
                    }
                    Err(e) => r.problem(item.line, &ik, e),
                }
            }
            out
        }),
    };
    let fk = format!("{k}.filter");
    let Some(f) = m.get("filter") else {
        // mail2alert failed on every message the rule saw (rules.py:21).
        r.problem(n.line, &fk, "missing (`function:` and its `args:`)");
        return None;
    };
    let fm = r.map(f, &fk)?;
    let mut fkeys = vec!["function", "args"];
    if spec.has_events {
        fkeys.push("events");
    }
    r.known_keys(&fm, &fk, &fkeys);
    let fname = r.required_string(&fm, &fk, "function")?;
    let fnode = fm.get("function").expect("required_string checked it");
    let args: Vec<String> = match fm.get("args") {
        None => Vec::new(),
        Some(a) => {
            let ak = format!("{fk}.args");
            match r.list(a, &ak) {
                None => return None,
                // Expanded like every other string (config.py:24-41): a
                // rule `args: [$GROUP]` means the variable's value.
                Some(items) => items
                    .iter()
                    .enumerate()
                    .filter_map(|(i, it)| r.string(it, &format!("{ak}[{i}]")))
                    .collect(),
            }
        }
    };
    let function = match rules::lookup(&fname) {
        Some(fs) if fs.manager == spec.name => {
            let n_args = args.len();
            if n_args < fs.min_args || n_args > fs.max_args {
                let want = match (fs.min_args, fs.max_args) {
                    (a, b) if a == b => format!("{a}"),
                    (a, usize::MAX) => format!("at least {a}"),
                    (a, b) => format!("{a} to {b}"),
                };
                r.problem(
                    fm.get("args").map_or(fnode.line, |a| a.line),
                    &format!("{fk}.args"),
                    format!(
                        "{fname} takes {want} argument(s) ({}), {n_args} given",
                        if fs.usage.is_empty() {
                            "none"
                        } else {
                            fs.usage
                        }
                    ),
                );
                None
            } else {
                match (fs.build)(&args) {
                    Ok(f) => Some(f),
                    Err(e) => {
                        r.problem(
                            fm.get("args").map_or(fnode.line, |a| a.line),
                            &format!("{fk}.args"),
                            e,
                        );
                        None
                    }
                }
            }
        }
        other => {
            let reason = match other {
                Some(fs) => format!(
                    "{fname} is a rule function of the {} manager, not of {}",
                    fs.manager, spec.name
                ),
                None => format!(
                    "unknown rule function {fname:?}; the {} manager has: {}",
                    spec.name,
                    rules::names_for(spec.name).join(", ")
                ),
            };
            r.problem(fnode.line, &format!("{fk}.function"), reason);
            None
        }
    };
    let events = match fm.get("events") {
        None => None,
        Some(e) => read_events(r, e, &format!("{fk}.events")),
    };
    Some(RuleConfig {
        line: n.line,
        name,
        owner,
        actions: actions?,
        function_name: fname,
        args,
        function: function?,
        events,
    })
}

/// `filter.events`. mail2alert tested `event.name in events`
/// (plugin/gocd.py:223): with a list, membership of the exact upper-case
/// name; with a string, Python's substring test, so `events: BREAKS`
/// means BREAKS and `events: "BREAKS, FIXED"` both (no event name is part
/// of another).
pub(super) fn read_events(r: &mut Reader, e: &Node, ek: &str) -> Option<Vec<Event>> {
    let names = |events: &[Event]| {
        let n: Vec<_> = events.iter().map(|e| e.name()).collect();
        format!("[{}]", n.join(", "))
    };
    match &e.kind {
        Kind::Scalar { .. } if !e.is_null() => {
            let s = r.string(e, ek)?;
            let found: Vec<Event> = Event::ALL
                .into_iter()
                .filter(|ev| s.contains(ev.name()))
                .collect();
            r.oddity(
                e.line,
                ek,
                format!(
                    "a string, not a list: matched as mail2alert matched it (by substring), i.e. {}",
                    names(&found)
                ),
            );
            Some(found)
        }
        _ => {
            let items = r.list(e, ek)?;
            let mut out = Vec::new();
            for (i, it) in items.iter().enumerate() {
                let ik = format!("{ek}[{i}]");
                let Some(s) = r.string(it, &ik) else { continue };
                match Event::parse(&s) {
                    Some(ev) => out.push(ev),
                    None => r.oddity(
                        it.line,
                        &ik,
                        format!(
                            "unknown event {s:?}: never matches (as in mail2alert); the events are {}",
                            Event::ALL.map(|e| e.name()).join(", ")
                        ),
                    ),
                }
            }
            if out.is_empty() {
                r.oddity(
                    e.line,
                    ek,
                    "no known event: the rule never matches (as in mail2alert)",
                );
            }
            Some(out)
        }
    }
}
