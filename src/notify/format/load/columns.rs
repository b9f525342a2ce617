//! Table columns and computed values of format files.

use super::*;

pub(super) fn read_computed(
    key: &str,
    node: &Node,
    into: &mut Vec<(String, Computed)>,
    p: &mut FileProblems,
) {
    let Some(mut t) = p.table(key, node) else {
        return;
    };
    for (name, v) in t.all() {
        let vkey = join_path(key, name);
        let computed = match &v.value {
            Value::Str(_) => template_text(&vkey, v, p).map(Computed::Text),
            Value::Table(_) => read_computed_table(&vkey, v, p),
            other => {
                p.at(
                    &vkey,
                    v,
                    format!("must be a string or a table, found {}", other.kind()),
                );
                None
            }
        };
        if let Some(c) = computed {
            into.retain(|(n, _)| n != name);
            into.push((name.clone(), c));
        }
    }
}

pub(super) fn read_computed_table(
    key: &str,
    node: &Node,
    p: &mut FileProblems,
) -> Option<Computed> {
    let mut t = p.table(key, node)?;
    let text = t.get("text");
    let first_of = t.get("first_of");
    let otherwise = t.get("otherwise");
    let inline = t.get("inline");
    let attachment = t.get("attachment");
    t.finish(
        p,
        &["text", "first_of", "otherwise", "inline", "attachment"],
    );
    let shapes = [
        text.is_some(),
        first_of.is_some(),
        inline.is_some() || attachment.is_some(),
    ];
    if shapes.iter().filter(|s| **s).count() != 1 {
        p.at(
            key,
            node,
            "give exactly one of `text`, `first_of` (+ `otherwise`), or `inline` + `attachment`",
        );
        return None;
    }
    if let Some(n) = text {
        return template_text(&join_path(key, "text"), n, p).map(Computed::Text);
    }
    if let Some(n) = first_of {
        let fkey = join_path(key, "first_of");
        let items = p.expect_array(&fkey, n)?;
        let mut cases = Vec::new();
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            let ckey = format!("{fkey}[{i}]");
            let Some(mut c) = p.table(&ckey, item) else {
                ok = false;
                continue;
            };
            let agg = c.get("aggregate_key");
            let txt = c.get("text");
            c.finish(p, &["aggregate_key", "text"]);
            match (agg, txt) {
                (Some(a), Some(tx)) => {
                    let a = p.expect_str(&join_path(&ckey, "aggregate_key"), a);
                    let tx = template_text(&join_path(&ckey, "text"), tx, p);
                    match (a, tx) {
                        (Some(a), Some(tx)) => cases.push((a.to_string(), tx)),
                        _ => ok = false,
                    }
                }
                _ => {
                    p.at(&ckey, item, "each case needs `aggregate_key` and `text`");
                    ok = false;
                }
            }
        }
        let otherwise = match otherwise {
            Some(n) => template_text(&join_path(key, "otherwise"), n, p)?,
            None => TemplateText::parse("", Part::Text).expect("empty text parses"),
        };
        return ok.then_some(Computed::FirstOf { cases, otherwise });
    }
    if otherwise.is_some() {
        p.at(key, node, "`otherwise` belongs to `first_of`");
        return None;
    }
    match (inline, attachment) {
        (Some(i), Some(a)) => {
            let i = template_text(&join_path(key, "inline"), i, p);
            let a = template_text(&join_path(key, "attachment"), a, p);
            Some(Computed::ByLocation {
                inline: i?,
                attachment: a?,
            })
        }
        _ => {
            p.at(key, node, "give both `inline` and `attachment`");
            None
        }
    }
}

pub(super) fn read_columns(
    key: &str,
    node: &Node,
    titles: &BTreeMap<String, String>,
    p: &mut FileProblems,
) -> Option<Vec<Column>> {
    let items = p.expect_array(key, node)?;
    if items.is_empty() {
        p.at(key, node, "a table needs at least one column");
        return None;
    }
    let mut cols = Vec::new();
    let mut ok = true;
    for (i, item) in items.iter().enumerate() {
        let ckey = format!("{key}[{i}]");
        let col = match &item.value {
            Value::Str(field) => match titles.get(field) {
                Some(title) => Some(Column::from_field(field, title)),
                None => {
                    p.at(
                        &ckey,
                        item,
                        format!(
                            "no title for {field:?}: add it to `column_titles` or write \
                             {{ field = {field:?}, title = \"...\" }}"
                        ),
                    );
                    None
                }
            },
            Value::Table(_) => {
                let mut t = p.table(&ckey, item)?;
                let field = t.get("field").and_then(|n| {
                    p.expect_str(&join_path(&ckey, "field"), n)
                        .map(str::to_string)
                });
                let extra = t.get("extra").and_then(|n| {
                    p.expect_str(&join_path(&ckey, "extra"), n)
                        .map(str::to_string)
                });
                let title = t.get("title").and_then(|n| {
                    p.expect_str(&join_path(&ckey, "title"), n)
                        .map(str::to_string)
                });
                t.finish(p, &["field", "extra", "title"]);
                match (field, extra, title) {
                    (Some(f), None, Some(t)) => Some(Column::from_field(&f, &t)),
                    (None, Some(k), Some(t)) => Some(Column::Extra { key: k, title: t }),
                    _ => {
                        p.at(
                            &ckey,
                            item,
                            "a column needs `title` and one of `field` or `extra`",
                        );
                        None
                    }
                }
            }
            other => {
                p.at(
                    &ckey,
                    item,
                    format!(
                        "must be a field name or a table {{ field, title }}, found {}",
                        other.kind()
                    ),
                );
                None
            }
        };
        match col {
            Some(c) => {
                let bad = match &c {
                    Column::Event { field, .. } => !valid_field_name(field),
                    Column::Extra { key, .. } => key.is_empty(),
                };
                if bad {
                    p.at(
                        &ckey,
                        item,
                        format!("{:?} is not an event column name", c.source_name()),
                    );
                    ok = false;
                } else if cols
                    .iter()
                    .any(|o: &Column| o.source_name() == c.source_name())
                {
                    p.at(
                        &ckey,
                        item,
                        format!("{:?} is already a column of this table", c.source_name()),
                    );
                    ok = false;
                } else {
                    cols.push(c);
                }
            }
            None => ok = false,
        }
    }
    ok.then_some(cols)
}

/// IntelMQ field names: lower-case words, digits, `_`, `-` and dots. The
/// event loader checks names against the real table as well.
pub(super) fn valid_field_name(f: &str) -> bool {
    !f.is_empty()
        && !f.starts_with('.')
        && !f.ends_with('.')
        && f.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '.' | '-'))
}
