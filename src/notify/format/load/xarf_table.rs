//! The `xarf` table of a format file (X-ARF reports).

use super::*;

pub(super) fn read_xarf(key: &str, node: &Node, p: &mut FileProblems) -> Option<XarfSpec> {
    let mut t = p.table(key, node)?;
    let mut ok = true;
    let mut spec = XarfSpec {
        static_fields: Vec::new(),
        fields: Vec::new(),
    };
    let mut seen: Vec<String> = Vec::new();
    let mut check_key =
        |raw: &str, path: &str, node: &Node, p: &mut FileProblems| -> Option<String> {
            let Some(k) = xarf::normalise_key(raw) else {
                p.at(
                    path,
                    node,
                    format!("{raw:?} is not an X-ARF field name (letters, digits, `-`, `_`)"),
                );
                return None;
            };
            if xarf::RESERVED.contains(&k.as_str()) {
                p.at(path, node, format!("`{k}` is filled in by mailgend"));
                return None;
            }
            if seen.contains(&k) {
                p.at(path, node, format!("`{k}` is given twice"));
                return None;
            }
            seen.push(k.clone());
            Some(k)
        };
    if let Some(n) = t.get("static") {
        let skey = join_path(key, "static");
        if let Some(mut st) = p.table(&skey, n) {
            for (raw, v) in st.all() {
                let path = join_path(&skey, raw);
                let Some(k) = check_key(raw, &path, v, p) else {
                    ok = false;
                    continue;
                };
                let scalar = match &v.value {
                    Value::Str(s) => Scalar::Str(s.clone()),
                    Value::Int(i) => Scalar::Int(*i),
                    Value::Float(f) => Scalar::Float(*f),
                    Value::Bool(b) => Scalar::Bool(*b),
                    other => {
                        p.at(
                            &path,
                            v,
                            format!(
                                "must be a string, number or boolean, found {}",
                                other.kind()
                            ),
                        );
                        ok = false;
                        continue;
                    }
                };
                spec.static_fields.push((k, scalar));
            }
        }
    }
    if let Some(n) = t.get("fields") {
        let fkey = join_path(key, "fields");
        if let Some(mut ft) = p.table(&fkey, n) {
            for (raw, v) in ft.all() {
                let path = join_path(&fkey, raw);
                let Some(k) = check_key(raw, &path, v, p) else {
                    ok = false;
                    continue;
                };
                let (field, format) = match &v.value {
                    Value::Str(s) => (Some(s.clone()), Some(FieldFormat::Auto)),
                    Value::Table(_) => {
                        let Some(mut ff) = p.table(&path, v) else {
                            continue;
                        };
                        let field = ff.get("field").and_then(|n| {
                            p.expect_str(&join_path(&path, "field"), n)
                                .map(str::to_string)
                        });
                        let format = match ff.get("format") {
                            Some(n) => match p.expect_str(&join_path(&path, "format"), n) {
                                Some(f) => match FieldFormat::parse(f) {
                                    Some(f) => Some(f),
                                    None => {
                                        p.at(
                                            &join_path(&path, "format"),
                                            n,
                                            format!(
                                                "unknown format {f:?}; use one of {}",
                                                FieldFormat::NAMES.join(", ")
                                            ),
                                        );
                                        None
                                    }
                                },
                                None => None,
                            },
                            None => Some(FieldFormat::Auto),
                        };
                        ff.finish(p, &["field", "format"]);
                        if field.is_none() {
                            p.at(&path, v, "needs `field`");
                        }
                        (field, format)
                    }
                    other => {
                        p.at(&path, v, format!("must be an event field name or a table {{ field, format }}, found {}", other.kind()));
                        (None, None)
                    }
                };
                match (field, format) {
                    (Some(field), Some(format)) => {
                        let valid = match field.split_once('.') {
                            Some(("extra", rest)) => !rest.is_empty(),
                            _ => valid_field_name(&field),
                        };
                        if !valid {
                            p.at(&path, v, format!("{field:?} is not an event column name"));
                            ok = false;
                        } else {
                            spec.fields.push(EventField {
                                key: k,
                                field,
                                format,
                            });
                        }
                    }
                    _ => ok = false,
                }
            }
        }
    }
    t.finish(p, &["static", "fields"]);
    for m in xarf::MANDATORY {
        if !xarf::RESERVED.contains(m) && !seen.iter().any(|s| s == m) {
            p.at(
                key,
                node,
                format!("the mandatory X-ARF field `{m}` is neither in `static` nor in `fields`"),
            );
            ok = false;
        }
    }
    ok.then_some(spec)
}
