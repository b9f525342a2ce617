//! Recipient addresses from untrusted data: one mailbox, checked.
//!
//! The notifier parses `recipient_address` and the envelope copies with
//! [`parse_recipient`]; the router parses `mailto:` actions and the
//! addresses of its configuration with it. What is refused and why is on
//! [`parse_recipient`] (spec §11; docs/migration.md).

/// Why a recipient address was refused (spec §11).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("the address is empty")]
    Empty,
    #[error("the address is too long ({0} octets; at most 254)")]
    TooLong(usize),
    #[error("the address contains a line break")]
    LineBreak,
    #[error("the address contains a control or invisible formatting character")]
    ControlCharacter,
    #[error("more than one address (`,` or `;`)")]
    List,
    #[error("group syntax (`name: ...;`) is not accepted")]
    Group,
    #[error("comments (`(...)`) are not accepted")]
    Comment,
    #[error("text after the address (RCPT parameters?)")]
    TrailingText,
    #[error("whitespace inside the address")]
    Whitespace,
    #[error("malformed address: {0}")]
    Malformed(&'static str),
    #[error("no @domain: a bare name is not accepted")]
    NoDomain,
    #[error("quoted local parts are not accepted")]
    QuotedLocalPart,
    #[error("invalid local part")]
    InvalidLocalPart,
    #[error("the local part is longer than 64 octets")]
    LocalPartTooLong,
    #[error("address literals (`[...]`) are not accepted")]
    AddressLiteral,
    #[error("domain {0:?} is local (localhost)")]
    Localhost(String),
    #[error("domain {0:?} has no dot: a bare host name is not accepted")]
    BareHost(String),
    #[error("domain {0:?} is invalid: {1}")]
    InvalidDomain(String, &'static str),
}

/// A recipient address that passed [`parse_recipient`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipient {
    address: String,
    at: usize,
    display_name: Option<String>,
    needs_smtputf8: bool,
}

impl Recipient {
    /// The addr-spec (`local@domain`) as given.
    pub fn address(&self) -> &str {
        &self.address
    }
    pub fn local_part(&self) -> &str {
        &self.address[..self.at]
    }
    pub fn domain(&self) -> &str {
        &self.address[self.at + 1..]
    }
    /// The display name that was given (and is not written).
    pub fn display_name(&self) -> Option<&str> {
        self.display_name.as_deref()
    }
    /// Non-ASCII local part or domain: needs SMTPUTF8.
    pub fn needs_smtputf8(&self) -> bool {
        self.needs_smtputf8
    }
}

/// Line breaks in any of the forms mail or Unicode software may honour.
pub fn is_line_break(c: char) -> bool {
    matches!(
        c,
        '\r' | '\n' | '\u{0b}' | '\u{0c}' | '\u{85}' | '\u{2028}' | '\u{2029}'
    )
}

/// Invisible characters that change how text is displayed (bidi
/// overrides and isolates, zero-width characters, BOM).
pub fn is_invisible_format(c: char) -> bool {
    matches!(
        c,
        '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{2069}' | '\u{feff}'
    )
}

/// Characters that must never reach a header line: line breaks and
/// control characters other than TAB.
pub fn is_header_breaking(c: char) -> bool {
    is_line_break(c) || (c.is_control() && c != '\t')
}

fn is_atext(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || !c.is_ascii()
}

/// Parses an untrusted recipient (`recipient_address`, envelope copies):
/// exactly one mailbox, RFC 5322 `addr-spec` or `display-name <addr-spec>`
/// (the display name is dropped).
///
/// Refused: lists (`,` `;`), groups, comments, route syntax, anything
/// after the address (RCPT parameters), whitespace in the address, quoted
/// local parts, CR/LF/NUL and other control or bidi characters, local
/// parts over 64 and addresses over 254 octets, address literals
/// (`[192.0.2.1]`), domains without a dot (bare host names), `localhost`
/// and `*.localhost`, numeric top-level labels, invalid labels. Non-ASCII
/// local parts and domains are accepted and flagged `needs_smtputf8`.
pub fn parse_recipient(s: &str) -> Result<Recipient, AddressError> {
    if s.len() > 1000 {
        return Err(AddressError::TooLong(s.len()));
    }
    for c in s.chars() {
        if is_line_break(c) {
            return Err(AddressError::LineBreak);
        }
        if (c.is_control() && c != '\t') || is_invisible_format(c) {
            return Err(AddressError::ControlCharacter);
        }
    }
    let t = s.trim_matches([' ', '\t']);
    if t.is_empty() {
        return Err(AddressError::Empty);
    }
    // Find an angle bracket outside quoted strings; refuse list and group
    // syntax on the way.
    let mut angle = None;
    let mut scan = Unquoted::new(t);
    for (i, c) in scan.by_ref() {
        match c {
            '<' => {
                angle = Some(i);
                break;
            }
            ',' | ';' => return Err(AddressError::List),
            ':' => return Err(AddressError::Group),
            '(' | ')' => return Err(AddressError::Comment),
            '>' => return Err(AddressError::Malformed("unbalanced `>`")),
            _ => {}
        }
    }
    if scan.in_quote {
        return Err(AddressError::Malformed("unterminated quoted string"));
    }
    let (addr, display) = match angle {
        None => {
            if t.starts_with('"') {
                return Err(AddressError::QuotedLocalPart);
            }
            if let Some(i) = t.find([' ', '\t']) {
                // `a@x NOTIFY=NEVER` versus `a b@x`.
                return Err(if t[..i].contains('@') {
                    AddressError::TrailingText
                } else {
                    AddressError::Whitespace
                });
            }
            (t, None)
        }
        Some(i) => {
            let phrase = t[..i].trim_matches([' ', '\t']);
            check_display_name(phrase)?;
            let rest = &t[i + 1..];
            let j = rest
                .find('>')
                .ok_or(AddressError::Malformed("missing `>`"))?;
            let inner = rest[..j].trim_matches([' ', '\t']);
            let after = rest[j + 1..].trim_matches([' ', '\t']);
            if !after.is_empty() {
                return Err(if after.contains([',', ';', '<']) {
                    AddressError::List
                } else {
                    AddressError::TrailingText
                });
            }
            if inner.contains('<') {
                return Err(AddressError::Malformed("nested `<`"));
            }
            if inner.starts_with('@') {
                return Err(AddressError::Malformed("source routes are not accepted"));
            }
            if inner.contains([' ', '\t']) {
                return Err(AddressError::Whitespace);
            }
            let display = (!phrase.is_empty()).then(|| phrase.to_string());
            (inner, display)
        }
    };
    let (at, needs_smtputf8) = check_addr_spec(addr)?;
    Ok(Recipient {
        address: addr.to_string(),
        at,
        display_name: display,
        needs_smtputf8,
    })
}

/// The characters of a phrase outside RFC 5322 quoted strings: the quotes
/// and what they enclose are skipped (`\` escapes honoured).
struct Unquoted<'a> {
    chars: std::str::CharIndices<'a>,
    /// Inside a quoted string: after the end, an unterminated one.
    in_quote: bool,
    escaped: bool,
}

impl<'a> Unquoted<'a> {
    fn new(s: &'a str) -> Self {
        Unquoted {
            chars: s.char_indices(),
            in_quote: false,
            escaped: false,
        }
    }
}

impl Iterator for Unquoted<'_> {
    type Item = (usize, char);

    fn next(&mut self) -> Option<(usize, char)> {
        for (i, c) in self.chars.by_ref() {
            if self.in_quote {
                if self.escaped {
                    self.escaped = false;
                } else if c == '\\' {
                    self.escaped = true;
                } else if c == '"' {
                    self.in_quote = false;
                }
            } else if c == '"' {
                self.in_quote = true;
            } else {
                return Some((i, c));
            }
        }
        None
    }
}

/// A display name: words (atoms, quoted strings) and dots; an `@` outside
/// quotes means the "name" is really an address (`evil@x <a@y>`).
fn check_display_name(phrase: &str) -> Result<(), AddressError> {
    for (_, c) in Unquoted::new(phrase) {
        match c {
            '@' => {
                return Err(AddressError::Malformed(
                    "the display name contains an unquoted `@`",
                ))
            }
            ' ' | '\t' | '.' => {}
            c if is_atext(c) => {}
            _ => {
                return Err(AddressError::Malformed(
                    "invalid character in the display name",
                ))
            }
        }
    }
    Ok(())
}

/// Checks `local@domain`; returns the `@` position and whether SMTPUTF8
/// is needed.
fn check_addr_spec(addr: &str) -> Result<(usize, bool), AddressError> {
    if addr.is_empty() {
        return Err(AddressError::Empty);
    }
    if addr.len() > 254 {
        return Err(AddressError::TooLong(addr.len()));
    }
    if addr.starts_with('"') {
        return Err(AddressError::QuotedLocalPart);
    }
    let at = addr.rfind('@').ok_or(AddressError::NoDomain)?;
    let (local, domain) = (&addr[..at], &addr[at + 1..]);
    if local.contains('@') {
        return Err(AddressError::Malformed("more than one `@`"));
    }
    if local.is_empty() {
        return Err(AddressError::InvalidLocalPart);
    }
    if local.len() > 64 {
        return Err(AddressError::LocalPartTooLong);
    }
    if !local
        .split('.')
        .all(|w| !w.is_empty() && w.chars().all(is_atext))
    {
        return Err(AddressError::InvalidLocalPart);
    }
    check_domain(domain)?;
    Ok((at, !addr.is_ascii()))
}

fn check_domain(domain: &str) -> Result<(), AddressError> {
    let invalid = |why| AddressError::InvalidDomain(domain.to_string(), why);
    if domain.is_empty() {
        return Err(AddressError::NoDomain);
    }
    if domain.starts_with('[') {
        return Err(AddressError::AddressLiteral);
    }
    let lower = domain.to_lowercase();
    let trimmed = lower.trim_end_matches('.');
    if trimmed == "localhost" || trimmed.ends_with(".localhost") {
        return Err(AddressError::Localhost(domain.to_string()));
    }
    // IDNA maps these to '.', so they would hide a label boundary.
    if domain.contains(['\u{3002}', '\u{ff0e}', '\u{ff61}']) {
        return Err(invalid("contains an ideographic or full-width dot"));
    }
    if !domain.contains('.') {
        return Err(AddressError::BareHost(domain.to_string()));
    }
    if domain.len() > 253 {
        return Err(invalid("longer than 253 octets"));
    }
    for label in domain.split('.') {
        if label.is_empty() {
            return Err(invalid("empty label"));
        }
        if label.len() > 63 {
            return Err(invalid("label longer than 63 octets"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(invalid("label starts or ends with `-`"));
        }
        if !label
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || (!c.is_ascii() && !c.is_whitespace()))
        {
            return Err(invalid(
                "a label holds characters other than letters, digits and `-`",
            ));
        }
    }
    let tld = domain.rsplit('.').next().unwrap_or("");
    if tld.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid("numeric top-level label (an IP address?)"));
    }
    Ok(())
}
