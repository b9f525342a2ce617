//! Mail templates: the files in `template_dir` and the text substitution
//! inside them (spec §5).
//!
//! Operators keep the template files they wrote for intelmq-mailgen, so the
//! placeholder language must be Python's `string.Template` as intelmq-mailgen
//! configured it, to the letter: identifiers `[_a-z][_a-z0-9.]*` matched
//! case-insensitively (which, because Python matches in Unicode mode, also
//! admits U+0130, U+0131, U+017F and U+212A), `$$` for a literal dollar,
//! `$name` taking the longest possible name, `${name}` ending exactly at the
//! brace, and every other `$` an error. An unknown name is an error too,
//! never silently left in the text.
//!
//! The module also owns reading template files safely: the template name
//! comes from the database (event data is untrusted), so a name is resolved
//! to its real path, symlinks included, and refused unless that path lies
//! inside the real `template_dir`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, RwLock};

/// Values for the placeholders of a template, by name.
pub type Substitutions = BTreeMap<String, String>;

/// Which half of a template a problem is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Subject,
    Body,
    /// A one-string template outside a mail template (a format variable).
    Text,
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Part::Subject => "subject",
            Part::Body => "body",
            Part::Text => "text",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// A `$` not followed by `$`, a name or `{name}`. Line and column are
    /// counted the way Python reports them, so operators can compare.
    #[error("{part}: invalid placeholder at line {line}, col {col}")]
    InvalidPlaceholder { part: Part, line: usize, col: usize },
    #[error("{part}: unknown placeholder `${{{name}}}`")]
    UnknownPlaceholder { part: Part, name: String },
    /// intelmq-mailgen loops forever on such a file; we refuse it.
    #[error("the template has no non-empty line, so there is no subject")]
    NoSubject,
    #[error("template name {name:?} refused: {reason}")]
    UnsafeName { name: String, reason: String },
    #[error("template {name:?}: cannot read {}: {source}", path.display())]
    Read {
        name: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("template {name:?}: {source}")]
    InTemplate {
        name: String,
        source: Box<TemplateError>,
    },
    #[error("template directory {}: {source}", path.display())]
    Directory {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One piece of a parsed template text.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    /// Text copied as is (`$$` already folded to `$`).
    Literal(String),
    Placeholder(String),
}

/// One template string (`string.Template`), parsed once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateText {
    source: String,
    segments: Vec<Segment>,
}

/// Whether `c` may start a name. Python's `[_a-z]` under `re.IGNORECASE`
/// in Unicode mode also matches the four non-ASCII letters whose simple
/// case mapping lands in a-z (checked against python3 in the tests).
fn is_name_start(c: char) -> bool {
    c == '_'
        || c.is_ascii_alphabetic()
        || matches!(c, '\u{130}' | '\u{131}' | '\u{17f}' | '\u{212a}')
}

fn is_name_continue(c: char) -> bool {
    is_name_start(c) || c.is_ascii_digit() || c == '.'
}

/// Python's `str.splitlines` line boundaries (for error positions).
fn is_python_line_break(c: char) -> bool {
    matches!(
        c,
        '\n' | '\r'
            | '\x0b'
            | '\x0c'
            | '\x1c'
            | '\x1d'
            | '\x1e'
            | '\u{85}'
            | '\u{2028}'
            | '\u{2029}'
    )
}

/// Python's `str.isspace` (what `str.strip()` removes). Rust's
/// `char::is_whitespace` lacks U+001C..U+001F, which Python counts.
pub(crate) fn is_python_space(c: char) -> bool {
    c.is_whitespace() || ('\x1c'..='\x1f').contains(&c)
}

/// `(line, col)` as Python's `Template._invalid` computes them for a `$`
/// whose following character is at char index `i`: the line number is the
/// number of `splitlines` lines of `text[:i]`, the column is `i` minus the
/// length of all lines before the last one.
fn python_position(chars: &[char], i: usize) -> (usize, usize) {
    let mut line = 1;
    let mut line_start = 0;
    let mut k = 0;
    while k < i {
        let c = chars[k];
        if is_python_line_break(c) {
            // "\r\n" is one boundary.
            if c == '\r' && k + 1 < i && chars[k + 1] == '\n' {
                k += 1;
            }
            if k + 1 < i {
                line += 1;
                line_start = k + 1;
            }
        }
        k += 1;
    }
    (line, i - line_start)
}

impl TemplateText {
    /// Parses `source`; a `$` that starts no valid placeholder is an error
    /// naming its position (Python raises the same error when substituting).
    pub fn parse(source: &str, part: Part) -> Result<TemplateText, TemplateError> {
        let chars: Vec<char> = source.chars().collect();
        let mut segments = Vec::new();
        let mut literal = String::new();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            if c != '$' {
                literal.push(c);
                i += 1;
                continue;
            }
            let next = chars.get(i + 1).copied();
            match next {
                Some('$') => {
                    literal.push('$');
                    i += 2;
                }
                Some(n) if is_name_start(n) => {
                    let mut j = i + 2;
                    while j < chars.len() && is_name_continue(chars[j]) {
                        j += 1;
                    }
                    if !literal.is_empty() {
                        segments.push(Segment::Literal(std::mem::take(&mut literal)));
                    }
                    segments.push(Segment::Placeholder(chars[i + 1..j].iter().collect()));
                    i = j;
                }
                Some('{') => {
                    let start = i + 2;
                    let mut j = start;
                    let ok_start = chars.get(start).is_some_and(|&c| is_name_start(c));
                    if ok_start {
                        j += 1;
                        while j < chars.len() && is_name_continue(chars[j]) {
                            j += 1;
                        }
                    }
                    if ok_start && chars.get(j) == Some(&'}') {
                        if !literal.is_empty() {
                            segments.push(Segment::Literal(std::mem::take(&mut literal)));
                        }
                        segments.push(Segment::Placeholder(chars[start..j].iter().collect()));
                        i = j + 1;
                    } else {
                        let (line, col) = python_position(&chars, i + 1);
                        return Err(TemplateError::InvalidPlaceholder { part, line, col });
                    }
                }
                _ => {
                    let (line, col) = python_position(&chars, i + 1);
                    return Err(TemplateError::InvalidPlaceholder { part, line, col });
                }
            }
        }
        if !literal.is_empty() {
            segments.push(Segment::Literal(literal));
        }
        Ok(TemplateText {
            source: source.to_string(),
            segments,
        })
    }

    /// Fills in the placeholders; the first unknown name is an error.
    pub fn substitute(&self, vars: &Substitutions, part: Part) -> Result<String, TemplateError> {
        let mut out = String::with_capacity(self.source.len());
        for seg in &self.segments {
            match seg {
                Segment::Literal(s) => out.push_str(s),
                Segment::Placeholder(name) => match vars.get(name) {
                    Some(v) => out.push_str(v),
                    None => {
                        return Err(TemplateError::UnknownPlaceholder {
                            part,
                            name: name.clone(),
                        })
                    }
                },
            }
        }
        Ok(out)
    }

    /// The names this text refers to.
    pub fn placeholders(&self) -> BTreeSet<String> {
        self.segments
            .iter()
            .filter_map(|s| match s {
                Segment::Placeholder(n) => Some(n.clone()),
                Segment::Literal(_) => None,
            })
            .collect()
    }

    /// The text as written.
    pub fn source(&self) -> &str {
        &self.source
    }
}

/// A mail template: a subject and a body template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    subject: TemplateText,
    body: TemplateText,
}

impl Template {
    /// Reads a template file's text the way intelmq-mailgen does: the first
    /// line that is not blank after stripping whitespace is the subject
    /// (stripped); everything after that line, stripped, plus one `\n` is
    /// the body. Line ends are normalised first (`\r\n` and `\r` become
    /// `\n`), as Python's text mode does when reading the file.
    pub fn from_file_text(text: &str) -> Result<Template, TemplateError> {
        let text = text.replace("\r\n", "\n").replace('\r', "\n");
        let mut rest = text.as_str();
        loop {
            if rest.is_empty() {
                return Err(TemplateError::NoSubject);
            }
            let (line, after) = match rest.find('\n') {
                Some(i) => (&rest[..i], &rest[i + 1..]),
                None => (rest, ""),
            };
            rest = after;
            let subject = line.trim_matches(is_python_space);
            if !subject.is_empty() {
                let body = format!("{}\n", rest.trim_matches(is_python_space));
                return Template::from_strings(subject, &body);
            }
        }
    }

    /// A template from its two strings, used exactly as given.
    pub fn from_strings(subject: &str, body: &str) -> Result<Template, TemplateError> {
        Ok(Template {
            subject: TemplateText::parse(subject, Part::Subject)?,
            body: TemplateText::parse(body, Part::Body)?,
        })
    }

    /// `(subject, body)` with every placeholder filled in.
    pub fn substitute(&self, vars: &Substitutions) -> Result<(String, String), TemplateError> {
        Ok((
            self.subject.substitute(vars, Part::Subject)?,
            self.body.substitute(vars, Part::Body)?,
        ))
    }

    /// Every name used in subject or body.
    pub fn placeholders(&self) -> BTreeSet<String> {
        let mut names = self.subject.placeholders();
        names.extend(self.body.placeholders());
        names
    }

    pub fn subject_source(&self) -> &str {
        self.subject.source()
    }

    pub fn body_source(&self) -> &str {
        self.body.source()
    }
}

/// The templates of one loaded configuration: resolves names safely and
/// keeps each parsed template, so a file is read once per configuration
/// (a reload builds a new store and so sees edited files).
#[derive(Debug)]
pub struct TemplateStore {
    dir: PathBuf,
    cache: RwLock<HashMap<String, Arc<Template>>>,
}

impl TemplateStore {
    /// `template_dir` must exist; it is resolved to its real path once so
    /// that every later containment check compares real paths.
    pub fn new(template_dir: &Path) -> Result<TemplateStore, TemplateError> {
        let dir =
            std::fs::canonicalize(template_dir).map_err(|source| TemplateError::Directory {
                path: template_dir.to_path_buf(),
                source,
            })?;
        if !dir.is_dir() {
            return Err(TemplateError::Directory {
                path: template_dir.to_path_buf(),
                source: std::io::Error::other("not a directory"),
            });
        }
        Ok(TemplateStore {
            dir,
            cache: RwLock::new(HashMap::new()),
        })
    }

    /// The real path of the template directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The real path of template `name`, refused unless it is a file inside
    /// the template directory (after resolving `..` and symlinks).
    pub fn resolve(&self, name: &str) -> Result<PathBuf, TemplateError> {
        let refuse = |reason: &str| TemplateError::UnsafeName {
            name: name.to_string(),
            reason: reason.to_string(),
        };
        if name.is_empty() {
            return Err(refuse("empty name"));
        }
        if name.contains('\0') {
            return Err(refuse("contains a NUL character"));
        }
        let rel = Path::new(name);
        if rel.is_absolute() || rel.components().any(|c| matches!(c, Component::Prefix(_))) {
            return Err(refuse("absolute path"));
        }
        // Refuse a name whose text already leaves the directory (as the old
        // tool did), whether or not the target exists; the real-path check
        // below catches symlinks.
        let mut depth: i64 = 0;
        for c in rel.components() {
            match c {
                Component::ParentDir => depth -= 1,
                Component::Normal(_) => depth += 1,
                _ => {}
            }
            if depth < 0 {
                return Err(refuse("leaves the template directory"));
            }
        }
        let joined = self.dir.join(rel);
        let real = std::fs::canonicalize(&joined).map_err(|source| TemplateError::Read {
            name: name.to_string(),
            path: joined.clone(),
            source,
        })?;
        if !real.starts_with(&self.dir) || real == self.dir {
            return Err(refuse(&format!(
                "resolves to {}, outside the template directory {}",
                real.display(),
                self.dir.display()
            )));
        }
        if !real.is_file() {
            return Err(TemplateError::Read {
                name: name.to_string(),
                path: real,
                source: std::io::Error::other("not a regular file"),
            });
        }
        Ok(real)
    }

    /// The parsed template `name` (read on first use).
    pub fn get(&self, name: &str) -> Result<Arc<Template>, TemplateError> {
        if let Some(t) = self
            .cache
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
        {
            return Ok(t.clone());
        }
        let path = self.resolve(name)?;
        let bytes = std::fs::read(&path).map_err(|source| TemplateError::Read {
            name: name.to_string(),
            path: path.clone(),
            source,
        })?;
        let text = String::from_utf8(bytes).map_err(|_| TemplateError::Read {
            name: name.to_string(),
            path: path.clone(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, "not valid UTF-8"),
        })?;
        let template =
            Arc::new(
                Template::from_file_text(&text).map_err(|e| TemplateError::InTemplate {
                    name: name.to_string(),
                    source: Box::new(e),
                })?,
            );
        self.cache
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), template.clone());
        Ok(template)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Substitutions {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn sub(text: &str, v: &Substitutions) -> Result<String, TemplateError> {
        TemplateText::parse(text, Part::Body)?.substitute(v, Part::Body)
    }

    #[test]
    fn python_template_semantics() {
        let v = vars(&[
            ("a", "A"),
            ("source.asn", "64496"),
            ("x_1", "X"),
            ("ticket_number", "T"),
        ]);
        assert_eq!(sub("$a ${a} $$a $$", &v).unwrap(), "A A $a $");
        assert_eq!(sub("AS${source.asn}.", &v).unwrap(), "AS64496.");
        assert_eq!(sub("AS$source.asn", &v).unwrap(), "AS64496");
        // The unbraced name runs as long as it can, dot included.
        match sub("AS $source.asn.", &v) {
            Err(TemplateError::UnknownPlaceholder { name, .. }) => assert_eq!(name, "source.asn."),
            other => panic!("{other:?}"),
        }
        assert_eq!(sub("$x_1-", &v).unwrap(), "X-");
        // Names are matched case-insensitively but looked up as written.
        assert!(matches!(
            sub("$A", &v),
            Err(TemplateError::UnknownPlaceholder { name, .. }) if name == "A"
        ));
    }

    #[test]
    fn invalid_placeholders_report_python_positions() {
        let v = vars(&[]);
        let pos = |t: &str| match sub(t, &v) {
            Err(TemplateError::InvalidPlaceholder { line, col, .. }) => (line, col),
            other => panic!("{t:?}: {other:?}"),
        };
        assert_eq!(pos("$"), (1, 1));
        assert_eq!(pos("ab $1"), (1, 4));
        assert_eq!(pos("ab\ncd ${ x}"), (2, 4));
        assert_eq!(pos("ab\r\n\r\n${}"), (3, 1));
        assert_eq!(pos("${a"), (1, 1));
        assert_eq!(pos("x\u{2028}$ "), (2, 1));
    }

    #[test]
    fn file_text_reading() {
        let t = Template::from_file_text("\n  \r\n  Subject ${a} \nline\n\n body\n\n").unwrap();
        assert_eq!(t.subject_source(), "Subject ${a}");
        assert_eq!(t.body_source(), "line\n\n body\n");
        let t = Template::from_file_text("only subject").unwrap();
        assert_eq!(t.body_source(), "\n");
        assert!(matches!(
            Template::from_file_text(" \n\t\n\x1c"),
            Err(TemplateError::NoSubject)
        ));
        assert!(matches!(
            Template::from_file_text(""),
            Err(TemplateError::NoSubject)
        ));
        assert_eq!(
            Template::from_file_text("s $a\nb ${b}")
                .unwrap()
                .placeholders()
                .into_iter()
                .collect::<Vec<_>>(),
            vec!["a", "b"]
        );
    }
}
