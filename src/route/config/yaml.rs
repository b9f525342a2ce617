//! A YAML document as a tree whose every node knows its line, so that a
//! problem found while validating (not only a syntax error) can name
//! `file:line`. Built from yaml-rust2's marked parser events.
//!
//! YAML 1.1 merge keys (`<<: *defaults`, `<<: [*a, *b]`), which PyYAML and
//! so mail2alert's loader resolve and yaml-rust2 does not, are resolved
//! here when a mapping ends: merged entries keep the lines where they were
//! written, keys given in the mapping itself win, and among several merged
//! mappings the earlier wins.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// 1-based line of the node's first character.
    pub line: usize,
    pub kind: Kind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    /// `plain` is false for quoted and block scalars (`"null"` is a string).
    Scalar {
        value: String,
        plain: bool,
    },
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

impl Node {
    pub fn is_null(&self) -> bool {
        matches!(&self.kind, Kind::Scalar { value, plain: true }
            if value.is_empty() || value == "~" || value == "null" || value == "Null" || value == "NULL")
    }

    /// The scalar's text (any scalar: numbers and booleans too).
    pub fn scalar(&self) -> Option<&str> {
        match &self.kind {
            Kind::Scalar { value, .. } if !self.is_null() => Some(value),
            _ => None,
        }
    }

    pub fn kind_name(&self) -> &'static str {
        match &self.kind {
            _ if self.is_null() => "nothing (null)",
            Kind::Scalar { .. } => "a scalar",
            Kind::Seq(_) => "a list",
            Kind::Map(_) => "a mapping",
        }
    }
}

/// A syntax error: line and reason.
#[derive(Debug, Clone)]
pub struct SyntaxError {
    pub line: usize,
    pub reason: String,
}

enum Open {
    Seq(usize, Vec<Node>, usize),
    Map(usize, Vec<(Node, Node)>, Option<Node>, usize),
}

#[derive(Default)]
struct Builder {
    stack: Vec<Open>,
    docs: Vec<Node>,
    anchors: HashMap<usize, Node>,
    error: Option<SyntaxError>,
}

impl Builder {
    fn push(&mut self, node: Node, anchor: usize) {
        if anchor > 0 {
            self.anchors.insert(anchor, node.clone());
        }
        match self.stack.last_mut() {
            None => self.docs.push(node),
            Some(Open::Seq(_, items, _)) => items.push(node),
            Some(Open::Map(_, entries, key, _)) => match key.take() {
                None => *key = Some(node),
                Some(k) => entries.push((k, node)),
            },
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let line = mark.line();
        match ev {
            Event::Scalar(value, style, anchor, _tag) => {
                let plain = style == TScalarStyle::Plain;
                self.push(
                    Node {
                        line,
                        kind: Kind::Scalar { value, plain },
                    },
                    anchor,
                );
            }
            Event::SequenceStart(anchor, _) => self.stack.push(Open::Seq(line, Vec::new(), anchor)),
            Event::MappingStart(anchor, _) => {
                self.stack.push(Open::Map(line, Vec::new(), None, anchor))
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let (node, anchor) = match self.stack.pop() {
                    Some(Open::Seq(line, items, anchor)) => (
                        Node {
                            line,
                            kind: Kind::Seq(items),
                        },
                        anchor,
                    ),
                    Some(Open::Map(line, entries, _, anchor)) => (
                        Node {
                            line,
                            kind: Kind::Map(merge_keys(entries)),
                        },
                        anchor,
                    ),
                    None => return,
                };
                self.push(node, anchor);
            }
            Event::Alias(id) => match self.anchors.get(&id).cloned() {
                Some(mut node) => {
                    node.line = line;
                    self.push(node, 0);
                }
                None => {
                    self.error.get_or_insert(SyntaxError {
                        line,
                        reason: "alias to an unknown anchor".into(),
                    });
                }
            },
            _ => {}
        }
    }
}

fn is_merge_key(k: &Node) -> bool {
    matches!(&k.kind, Kind::Scalar { value, plain: true } if value == "<<")
}

/// Resolves `<<` entries of one mapping (see the module comment). A `<<`
/// whose value is not a mapping or a list of mappings stays as a key, and
/// the reader reports it as unknown.
fn merge_keys(entries: Vec<(Node, Node)>) -> Vec<(Node, Node)> {
    if !entries.iter().any(|(k, _)| is_merge_key(k)) {
        return entries;
    }
    let mut own = Vec::new();
    let mut merged: Vec<(Node, Node)> = Vec::new();
    let add = |merged: &mut Vec<(Node, Node)>, from: &[(Node, Node)]| {
        for (k, v) in from {
            if !merged.iter().any(|(m, _)| m.kind == k.kind) {
                merged.push((k.clone(), v.clone()));
            }
        }
    };
    for (k, v) in entries {
        if !is_merge_key(&k) {
            own.push((k, v));
            continue;
        }
        match &v.kind {
            Kind::Map(from) => add(&mut merged, from),
            Kind::Seq(items) if items.iter().all(|i| matches!(i.kind, Kind::Map(_))) => {
                for i in items {
                    if let Kind::Map(from) = &i.kind {
                        add(&mut merged, from);
                    }
                }
            }
            _ => own.push((k, v)),
        }
    }
    merged.retain(|(k, _)| !own.iter().any(|(o, _)| o.kind == k.kind));
    merged.extend(own);
    merged
}

/// Parses one YAML document. An empty file is a null node.
pub fn parse(text: &str) -> Result<Node, SyntaxError> {
    let mut b = Builder::default();
    let mut parser = Parser::new_from_str(text);
    if let Err(e) = parser.load(&mut b, true) {
        return Err(SyntaxError {
            line: e.marker().line(),
            reason: format!("YAML syntax error: {}", e.info()),
        });
    }
    if let Some(e) = b.error {
        return Err(e);
    }
    if b.docs.len() > 1 {
        return Err(SyntaxError {
            line: b.docs[1].line,
            reason: "more than one YAML document in the file".into(),
        });
    }
    Ok(b.docs.pop().unwrap_or(Node {
        line: 1,
        kind: Kind::Scalar {
            value: String::new(),
            plain: true,
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_one_based_and_per_node() {
        let n = parse("---\na: 1\nb:\n  - x\n  - y: z\n").unwrap();
        let Kind::Map(entries) = &n.kind else {
            panic!()
        };
        assert_eq!(entries[0].0.line, 2);
        assert_eq!(entries[1].0.line, 3);
        let Kind::Seq(items) = &entries[1].1.kind else {
            panic!()
        };
        assert_eq!(items[0].line, 4);
        assert_eq!(items[1].line, 5);
    }

    #[test]
    fn syntax_error_has_line() {
        let e = parse("a: 1\nb: [1, 2\nc: 3\n").unwrap_err();
        assert!(e.line >= 2, "{e:?}");
    }

    #[test]
    fn merge_keys_as_pyyaml() {
        let n = parse("d: &d {a: 1, b: 2}\ne: &e\n  b: 3\n  c: 4\nx:\n  <<: [*d, *e]\n  a: 9\n")
            .unwrap();
        let Kind::Map(entries) = &n.kind else {
            panic!()
        };
        let Kind::Map(x) = &entries[2].1.kind else {
            panic!()
        };
        let got: Vec<(&str, &str, usize)> = x
            .iter()
            .map(|(k, v)| (k.scalar().unwrap(), v.scalar().unwrap(), v.line))
            .collect();
        // Own keys win, the earlier merged mapping wins, lines kept.
        assert_eq!(got, [("b", "2", 1), ("c", "4", 4), ("a", "9", 7)]);
    }

    #[test]
    fn anchors_and_aliases() {
        let n = parse("a: &x [1, 2]\nb: *x\n").unwrap();
        let Kind::Map(entries) = &n.kind else {
            panic!()
        };
        assert!(matches!(&entries[1].1.kind, Kind::Seq(v) if v.len() == 2));
    }
}
