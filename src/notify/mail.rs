//! The notification mail as bytes: MIME layout, headers, quoted-printable,
//! PGP/MIME signing (spec §7, §10, §11).
//!
//! Owns turning a rendered [`Notification`] into the exact CRLF bytes handed
//! to SMTP `DATA`, plus the envelope. The layout is byte for byte what
//! intelmq-mailgen 1.4 produces with Python's `email` package (policy
//! `SMTP` with `cte_type="7bit"`, text always quoted-printable at 78
//! columns, every `From ` of the encoded text written `From=20`), because
//! recipients' parsers and ticket systems have been fed that for years:
//!
//! - unsigned: one `text/plain; charset="utf-8"` part, or `multipart/mixed`
//!   with the body followed by the attachments;
//! - signed: `multipart/signed; protocol="application/pgp-signature";
//!   micalg=...` whose first part is the text part itself (no attachment)
//!   or a `multipart/mixed` (with attachments), and whose second part is
//!   the armoured detached signature over that first part's exact bytes;
//! - `MIME-Version: 1.0` on the top and on every part Python creates as an
//!   attachment (CSV, report, signature), not on the moved body part;
//! - headers `From`, `To`, `Subject`, `Date` (local time, like
//!   `formatdate(localtime=True)`), `Message-Id` (`<centiseconds.pid.random@
//!   sender domain>`), then the format's extra headers;
//! - boundaries `===============<19 digits>==`.
//!
//! `tests/fixtures/mime/generate.py` reproduces the Python calls; the
//! fixtures it wrote are the reference for `tests/mail_mime.rs`.
//!
//! # Deliberate differences from intelmq-mailgen (security, spec §10/§11)
//!
//! Event data is untrusted and reaches the subject (templates) and the
//! recipient (directives), so:
//!
//! 1. **Subject**: every line break (CR, LF, CRLF, VT, FF, NEL U+0085,
//!    U+2028, U+2029) and every other control character (C0 except TAB,
//!    DEL, C1) is replaced by a space. Python refuses such a header value
//!    with an exception (the old tool then fell through to another
//!    format); mailgend sends the mail with the cleaned subject.
//! 2. **Encoded-word look-alikes**: a subject word containing `=?` is
//!    itself written as an RFC 2047 encoded word, so `=?utf-8?q?...?=`
//!    coming from data is displayed literally. Python decodes such text
//!    and writes the decoded characters (letting data smuggle arbitrary
//!    text, e.g. bidi controls, into the displayed subject).
//! 3. **Over-long subjects** are cut at [`MAX_SUBJECT_CHARS`] characters
//!    and end with `…`; every header line stays far below 998 octets.
//! 4. **Recipient**: [`parse_recipient`] accepts exactly one mailbox with a
//!    real domain (see there); everything else is an error for the group.
//!    `To:` is written from the parsed address: for a plain address these
//!    are the old tool's bytes; a display name (`Name <a@b>`) is dropped
//!    (the old tool wrote the raw string). Envelope recipients of copies
//!    go through the same parser.
//! 5. **Non-ASCII addresses** are written raw (UTF-8, RFC 6532) and the
//!    mail is flagged [`BuiltMail::smtputf8`]; the SMTP layer must use
//!    SMTPUTF8 or refuse.
//! 6. **Extra headers** (from format files) must have RFC 5322 names and
//!    single-line values, and cannot replace structural headers. They come
//!    after `Message-Id` (the old X-ARF code put `Auto-Submitted` after
//!    `Subject`; header order carries no meaning for mail software).
//! 7. **Attachment file names and subtypes** must be plain ASCII tokens,
//!    so Content-Type/Content-Disposition never need RFC 2231 and stay
//!    below 78 columns. This also guarantees the signed first part is
//!    written identically in the signed bytes and in the mail (Python
//!    writes sub-part headers of multipart/signed unfolded and could break
//!    its own signature for long headers).
//! 8. A `From` header whose display name is non-ASCII is written with an
//!    encoded display name followed by ` <address>`; an ASCII sender is
//!    written exactly as configured.

use std::collections::VecDeque;

use chrono::{DateTime, Local, SubsecRound, Utc};
use rand::Rng;

use crate::notify::signature::{DetachedSignature, DetachedSigner, SignError, Signer};
use crate::notify::ticket::Ticket;

/// One mail a format decided to send, fully rendered but not yet MIME.
#[derive(Debug, Clone, PartialEq)]
pub struct Notification {
    pub ticket: Ticket,
    /// The header `To:`: the directive's `recipient_address` (untrusted).
    pub recipient: String,
    /// Envelope recipients when they differ from the header (constituency
    /// copies); `None` means "the recipient".
    pub envelope_to: Option<Vec<String>>,
    /// Rendered subject (untrusted data may be inside).
    pub subject: String,
    /// Rendered body text, `\n` line ends.
    pub body: String,
    pub attachments: Vec<Attachment>,
    /// Extra headers set by the format, e.g. `Auto-Submitted`, `X-ARF`.
    /// Names and values here come from format files, never from event data.
    pub extra_headers: Vec<(String, String)>,
    /// Whether sending this mail marks directives sent (constituency copies
    /// do not).
    pub mark_sent: bool,
    /// The events this mail reports on when it is not the whole group
    /// (X-ARF: one mail per event); it then marks only their directives,
    /// so each event keeps the ticket of its own mail. `None`: the group.
    pub covers: Option<Vec<crate::notify::directive::EventId>>,
}

/// A text part after the body.
#[derive(Debug, Clone, PartialEq)]
pub struct Attachment {
    /// `text/<subtype>`: "csv" for `events.csv`, "plain" for an X-ARF report.
    pub subtype: String,
    /// The file name (`events.csv`, `report.txt`).
    pub filename: String,
    /// `Content-Disposition: attachment` when true; otherwise the name is
    /// only given as the `name` parameter of Content-Type (X-ARF's report).
    pub disposition_attachment: bool,
    pub content: String,
}

/// Sender settings from the configuration, shared by all mails.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailContext {
    /// Config `sender`: the `From` header, may be `Name <addr>`.
    pub sender: String,
    /// The address part of `sender` (envelope sender).
    pub sender_address: String,
    /// Its domain (Message-Id domain).
    pub sender_domain: String,
}

impl MailContext {
    /// Builds the context from a `sender` value (`addr` or `Name <addr>`).
    pub fn from_sender(sender: &str) -> Result<MailContext, MailError> {
        let bad = |reason: &str| MailError::Sender {
            sender: sender.to_string(),
            reason: reason.to_string(),
        };
        let s = sender.trim();
        let addr = match (s.rfind('<'), s.ends_with('>')) {
            (Some(l), true) => s[l + 1..s.len() - 1].trim(),
            (None, false) => s,
            _ => return Err(bad("not `address` or `Name <address>`")),
        };
        let (_, domain) = addr.rsplit_once('@').ok_or_else(|| bad("no @domain"))?;
        let ctx = MailContext {
            sender: s.to_string(),
            sender_address: addr.to_string(),
            sender_domain: domain.to_string(),
        };
        ctx.check()?;
        Ok(ctx)
    }

    /// The sender parts must not be able to break the header or envelope.
    fn check(&self) -> Result<(), MailError> {
        let bad = |reason: &str| MailError::Sender {
            sender: self.sender.clone(),
            reason: reason.to_string(),
        };
        if self.sender.chars().any(is_header_breaking) {
            return Err(bad("contains a line break or control character"));
        }
        if self.sender.len() > 900 {
            return Err(bad("longer than 900 octets"));
        }
        let a = &self.sender_address;
        if a.is_empty()
            || a.chars()
                .any(|c| c.is_whitespace() || is_header_breaking(c) || matches!(c, '<' | '>'))
            || !a.contains('@')
        {
            return Err(bad("sender_address is not a plain address"));
        }
        if !self.sender.contains(a.as_str()) {
            return Err(bad("sender_address is not part of sender"));
        }
        let d = &self.sender_domain;
        if d.is_empty()
            || d.chars()
                .any(|c| c.is_whitespace() || is_header_breaking(c) || matches!(c, '<' | '>' | '@'))
            || !a.ends_with(&format!("@{d}"))
        {
            return Err(bad("sender_domain is not the domain of sender_address"));
        }
        Ok(())
    }
}

/// A mail ready for SMTP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltMail {
    /// The complete message, CRLF line ends, ready for `DATA` (before dot
    /// stuffing, which is the SMTP layer's job).
    pub bytes: Vec<u8>,
    /// The `Message-Id` header value including the angle brackets.
    pub message_id: String,
    /// The time in the `Date` header (whole seconds): the `sent_at` to
    /// record, as the old tool recorded the parsed Date header.
    pub date: DateTime<Utc>,
    /// `MAIL FROM` (the sender address).
    pub envelope_from: String,
    /// `RCPT TO`, parsed and checked.
    pub envelope_to: Vec<String>,
    /// An address or header needs SMTPUTF8 (RFC 6531).
    pub smtputf8: bool,
}

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

/// Why a mail could not be built.
#[derive(Debug, thiserror::Error)]
pub enum MailError {
    #[error("recipient {value:?}: {source}")]
    Recipient {
        value: String,
        #[source]
        source: AddressError,
    },
    #[error("envelope recipient {value:?}: {source}")]
    EnvelopeRecipient {
        value: String,
        #[source]
        source: AddressError,
    },
    #[error("the list of envelope recipients is empty")]
    NoEnvelopeRecipients,
    #[error("sender {sender:?}: {reason}")]
    Sender { sender: String, reason: String },
    #[error("extra header {name:?}: {reason}")]
    ExtraHeader { name: String, reason: String },
    #[error("attachment {filename:?}: {reason}")]
    Attachment { filename: String, reason: String },
    #[error("Message-Id {0:?} is not of the form <left@right>")]
    MessageId(String),
    #[error(transparent)]
    Sign(#[from] SignError),
    #[error("the signer returned an unusable signature: {0}")]
    BadSignature(String),
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

/// Longest subject kept (in characters); longer ones end with `…`.
pub const MAX_SUBJECT_CHARS: usize = 900;

/// Python's `policy.max_line_length` for the SMTP policy.
const MAXLEN: usize = 78;
const CRLF: &str = "\r\n";

/// Headers a format may not set: the builder owns them.
const STRUCTURAL_HEADERS: &[&str] = &[
    "from",
    "to",
    "cc",
    "bcc",
    "subject",
    "date",
    "message-id",
    "mime-version",
    "return-path",
];

// ---------------------------------------------------------------------------
// Building
// ---------------------------------------------------------------------------

/// Builds the mail for `n` with a new Message-Id; signs when `signer` is
/// given. `now` becomes the Date header (and [`BuiltMail::date`]).
pub fn build(
    n: &Notification,
    ctx: &MailContext,
    signer: Option<&Signer>,
    now: DateTime<Utc>,
) -> Result<BuiltMail, MailError> {
    build_with_id(n, ctx, signer, now, None)
}

/// Like [`build`], but reuses `message_id` when given (re-sending a mail
/// whose delivery is in doubt must keep its Message-Id). Accepted with or
/// without angle brackets.
pub fn build_with_id(
    n: &Notification,
    ctx: &MailContext,
    signer: Option<&Signer>,
    now: DateTime<Utc>,
    message_id: Option<&str>,
) -> Result<BuiltMail, MailError> {
    build_with_signer(
        n,
        ctx,
        signer.map(|s| s as &dyn DetachedSigner),
        now,
        message_id,
    )
}

/// The general form: any [`DetachedSigner`] (tests use a fixed placeholder).
pub fn build_with_signer(
    n: &Notification,
    ctx: &MailContext,
    signer: Option<&dyn DetachedSigner>,
    now: DateTime<Utc>,
    message_id: Option<&str>,
) -> Result<BuiltMail, MailError> {
    ctx.check()?;
    let recipient = parse_recipient(&n.recipient).map_err(|source| MailError::Recipient {
        value: n.recipient.clone(),
        source,
    })?;
    let envelope = match &n.envelope_to {
        None => vec![recipient.clone()],
        Some(list) if list.is_empty() => return Err(MailError::NoEnvelopeRecipients),
        Some(list) => list
            .iter()
            .map(|v| {
                parse_recipient(v).map_err(|source| MailError::EnvelopeRecipient {
                    value: v.clone(),
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?,
    };
    for a in &n.attachments {
        check_attachment(a)?;
    }
    let mut extra = Vec::with_capacity(n.extra_headers.len());
    for (name, value) in &n.extra_headers {
        extra.push(extra_header(name, value)?);
    }
    let message_id = match message_id {
        Some(id) => normalise_message_id(id)?,
        None => new_message_id(&ctx.sender_domain, now),
    };
    let date = now.trunc_subsecs(0);

    // The content: the text part, or multipart/mixed with the attachments
    // (what Python's add_attachment makes of it).
    let mut boundaries = Boundaries::default();
    let text = text_part(&n.body);
    let mut content = if n.attachments.is_empty() {
        text
    } else {
        let boundary = boundaries.next();
        let mut parts = vec![text];
        parts.extend(n.attachments.iter().map(attachment_part));
        Part {
            headers: vec![fold_params(
                "Content-Type",
                "multipart/mixed",
                &[("boundary", boundary.clone())],
            )],
            body: Body::Multipart { boundary, parts },
        }
    };

    let (mut top, mut headers) = match signer {
        // A single part keeps its Content-* headers first, then
        // set_content's MIME-Version.
        None if matches!(content.body, Body::Text(_)) => {
            let mut headers = std::mem::take(&mut content.headers);
            headers.push("MIME-Version: 1.0".to_string());
            (content, headers)
        }
        // make_mixed leaves MIME-Version in front of the new Content-Type.
        None => {
            let mut headers = vec!["MIME-Version: 1.0".to_string()];
            headers.append(&mut content.headers);
            (content, headers)
        }
        Some(signer) => {
            let sig = signer.sign_detached(&content.to_bytes())?;
            check_signature(&sig)?;
            let sig_part = Part {
                headers: vec![
                    "Content-Type: application/pgp-signature".into(),
                    "Content-Transfer-Encoding: 8bit".into(),
                    "MIME-Version: 1.0".into(),
                ],
                body: Body::Text(sig.armored),
            };
            let boundary = boundaries.next();
            let headers = vec![
                "MIME-Version: 1.0".to_string(),
                fold_params(
                    "Content-Type",
                    "multipart/signed",
                    &[
                        ("protocol", "application/pgp-signature".into()),
                        ("micalg", sig.micalg.to_string()),
                        ("boundary", boundary.clone()),
                    ],
                ),
            ];
            let top = Part {
                headers: vec![],
                body: Body::Multipart {
                    boundary,
                    parts: vec![content, sig_part],
                },
            };
            (top, headers)
        }
    };

    let (from, from_utf8) = from_header(ctx);
    headers.push(from);
    headers.push(format!("To: {}", recipient.address()));
    headers.push(fold_unstructured(
        "Subject",
        &tokenize_unstructured(&sanitize_subject(&n.subject)),
    ));
    headers.push(format!("Date: {}", format_date(date)));
    headers.push(format!("Message-Id: {message_id}"));
    headers.extend(extra);
    top.headers = headers;

    let bytes = top.to_bytes();
    debug_assert!(bytes.split(|b| *b == b'\n').all(|l| l.len() <= 1000));
    let smtputf8 = from_utf8
        || !ctx.sender_address.is_ascii()
        || recipient.needs_smtputf8()
        || envelope.iter().any(Recipient::needs_smtputf8);
    Ok(BuiltMail {
        bytes,
        message_id,
        date,
        envelope_from: ctx.sender_address.clone(),
        envelope_to: envelope.iter().map(|r| r.address().to_string()).collect(),
        smtputf8,
    })
}

/// A MIME entity: its header lines (folded, without the final CRLF) and
/// its body.
#[derive(Debug, Clone)]
struct Part {
    headers: Vec<String>,
    body: Body,
}

#[derive(Debug, Clone)]
enum Body {
    /// A payload with `\n` line ends, written with CRLF.
    Text(String),
    Multipart {
        boundary: String,
        parts: Vec<Part>,
    },
}

impl Part {
    fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4096);
        self.write(&mut out);
        out
    }

    /// Writes the entity the way Python's generator does.
    fn write(&self, out: &mut Vec<u8>) {
        for h in &self.headers {
            out.extend_from_slice(h.as_bytes());
            out.extend_from_slice(CRLF.as_bytes());
        }
        out.extend_from_slice(CRLF.as_bytes());
        match &self.body {
            Body::Text(payload) => write_lines(out, payload),
            Body::Multipart { boundary, parts } => {
                for (i, p) in parts.iter().enumerate() {
                    if i > 0 {
                        out.extend_from_slice(CRLF.as_bytes());
                    }
                    out.extend_from_slice(format!("--{boundary}{CRLF}").as_bytes());
                    p.write(out);
                }
                out.extend_from_slice(format!("{CRLF}--{boundary}--{CRLF}").as_bytes());
            }
        }
    }
}

/// Python's `_write_lines`: every line end becomes CRLF; a last line
/// without line end is written as is.
fn write_lines(out: &mut Vec<u8>, payload: &str) {
    let mut rest = payload;
    while !rest.is_empty() {
        match rest.find(['\r', '\n']) {
            Some(i) => {
                out.extend_from_slice(&rest.as_bytes()[..i]);
                out.extend_from_slice(CRLF.as_bytes());
                let skip = if rest[i..].starts_with("\r\n") { 2 } else { 1 };
                rest = &rest[i + skip..];
            }
            None => {
                out.extend_from_slice(rest.as_bytes());
                break;
            }
        }
    }
}

/// Random boundaries like Python's (`=` × 15, 19 digits, `==`), distinct
/// within one mail.
#[derive(Default)]
struct Boundaries(Vec<String>);

impl Boundaries {
    fn next(&mut self) -> String {
        let mut rng = rand::thread_rng();
        loop {
            let token: u64 = rng.gen_range(0..i64::MAX as u64);
            let b = format!("==============={token:019}==");
            if !self.0.contains(&b) {
                self.0.push(b.clone());
                return b;
            }
        }
    }
}

/// The body part; it never carries MIME-Version (Python moves it there
/// with make_mixed, or the top-level adds it).
fn text_part(body: &str) -> Part {
    Part {
        headers: vec![
            "Content-Type: text/plain; charset=\"utf-8\"".to_string(),
            "Content-Transfer-Encoding: quoted-printable".to_string(),
        ],
        body: Body::Text(encode_text_qp(body)),
    }
}

fn attachment_part(a: &Attachment) -> Part {
    let mut params = vec![("charset", "utf-8".to_string())];
    if !a.disposition_attachment {
        params.push(("name", a.filename.clone()));
    }
    let mut headers = vec![
        fold_params("Content-Type", &format!("text/{}", a.subtype), &params),
        "Content-Transfer-Encoding: quoted-printable".to_string(),
    ];
    if a.disposition_attachment {
        headers.push(fold_params(
            "Content-Disposition",
            "attachment",
            &[("filename", a.filename.clone())],
        ));
    }
    headers.push("MIME-Version: 1.0".into());
    Part {
        headers,
        body: Body::Text(encode_text_qp(&a.content)),
    }
}

fn check_attachment(a: &Attachment) -> Result<(), MailError> {
    let bad = |reason: &str| MailError::Attachment {
        filename: a.filename.clone(),
        reason: reason.to_string(),
    };
    if a.subtype.is_empty()
        || a.subtype.len() > 40
        || !a
            .subtype
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'+'))
    {
        return Err(bad(
            "subtype must be an ASCII token (letters, digits, - . +)",
        ));
    }
    if a.filename.is_empty()
        || a.filename.len() > 60
        || !a
            .filename
            .bytes()
            .all(|b| (b' '..=b'~').contains(&b) && !matches!(b, b'"' | b'\\' | b'/'))
    {
        return Err(bad(
            "file name must be 1 to 60 printable ASCII characters without quotes, \\ or /",
        ));
    }
    Ok(())
}

fn check_signature(sig: &DetachedSignature) -> Result<(), MailError> {
    let a = &sig.armored;
    if !a.starts_with("-----BEGIN PGP SIGNATURE-----")
        || !a.trim_end().ends_with("-----END PGP SIGNATURE-----")
        || !a
            .bytes()
            .all(|b| b == b'\n' || b == b'\r' || (b' '..=b'~').contains(&b))
    {
        return Err(MailError::BadSignature(
            "not an ASCII-armoured signature".into(),
        ));
    }
    let m = sig.micalg;
    if !m.starts_with("pgp-")
        || m.len() > 20
        || !m[4..]
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(MailError::BadSignature(format!("bad micalg {m:?}")));
    }
    Ok(())
}

/// `From:` from the configured sender. Returns whether raw UTF-8 went in.
fn from_header(ctx: &MailContext) -> (String, bool) {
    let s = ctx.sender.trim();
    if s.is_ascii() {
        return (format!("From: {s}"), false);
    }
    // A non-ASCII display name is encoded; the address is kept as is.
    let suffix = format!("<{}>", ctx.sender_address);
    match s.strip_suffix(&suffix) {
        Some(display) if ctx.sender_address.is_ascii() => {
            let display = display.trim();
            let display = display
                .strip_prefix('"')
                .and_then(|d| d.strip_suffix('"'))
                .map(|d| d.replace("\\\"", "\"").replace("\\\\", "\\"))
                .unwrap_or_else(|| display.to_string());
            let mut folded = fold_unstructured("From", &tokenize_unstructured(&display));
            let last_len = folded.rsplit(CRLF).next().map_or(0, |l| l.chars().count());
            if last_len + 1 + suffix.len() <= MAXLEN {
                folded.push(' ');
            } else {
                folded.push_str(CRLF);
                folded.push(' ');
            }
            folded.push_str(&suffix);
            (folded, false)
        }
        _ => (format!("From: {s}"), true),
    }
}

/// Checks and folds one extra header from a format.
fn extra_header(name: &str, value: &str) -> Result<String, MailError> {
    let bad = |reason: &str| MailError::ExtraHeader {
        name: name.to_string(),
        reason: reason.to_string(),
    };
    if name.is_empty()
        || name.len() > 76
        || !name.bytes().all(|b| (33..=126).contains(&b) && b != b':')
    {
        return Err(bad("not a valid header name (RFC 5322 ftext)"));
    }
    let lower = name.to_ascii_lowercase();
    if STRUCTURAL_HEADERS.contains(&lower.as_str()) || lower.starts_with("content-") {
        return Err(bad("set by mailgend itself; a format may not set it"));
    }
    if value.chars().any(is_header_breaking) {
        return Err(bad("value contains a line break or control character"));
    }
    if value.chars().count() > MAX_SUBJECT_CHARS {
        return Err(bad("value too long"));
    }
    Ok(fold_unstructured(name, &tokenize_unstructured(value)))
}

fn new_message_id(domain: &str, now: DateTime<Utc>) -> String {
    let centis = now.timestamp_millis() / 10;
    let random: u64 = rand::thread_rng().gen();
    format!("<{centis}.{}.{random}@{domain}>", std::process::id())
}

fn normalise_message_id(id: &str) -> Result<String, MailError> {
    let inner = id
        .strip_prefix('<')
        .and_then(|i| i.strip_suffix('>'))
        .unwrap_or(id);
    let ok = inner.len() <= 250
        && inner
            .split_once('@')
            .is_some_and(|(l, r)| !l.is_empty() && !r.is_empty() && !r.contains('@'))
        && inner
            .bytes()
            .all(|b| (b'!'..=b'~').contains(&b) && !matches!(b, b'<' | b'>' | b'"' | b'\\'));
    if ok {
        Ok(format!("<{inner}>"))
    } else {
        Err(MailError::MessageId(id.to_string()))
    }
}

/// `Thu, 02 May 2024 10:11:12 +0200` in the host's time zone, like
/// Python's `email.utils.formatdate(localtime=True)`.
pub fn format_date(t: DateTime<Utc>) -> String {
    t.with_timezone(&Local)
        .format("%a, %d %b %Y %H:%M:%S %z")
        .to_string()
}

// ---------------------------------------------------------------------------
// Recipient addresses
// ---------------------------------------------------------------------------

/// Line breaks in any of the forms mail or Unicode software may honour.
fn is_line_break(c: char) -> bool {
    matches!(
        c,
        '\r' | '\n' | '\u{0b}' | '\u{0c}' | '\u{85}' | '\u{2028}' | '\u{2029}'
    )
}

/// Invisible characters that change how text is displayed (bidi
/// overrides and isolates, zero-width characters, BOM).
fn is_invisible_format(c: char) -> bool {
    matches!(
        c,
        '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{2069}' | '\u{feff}'
    )
}

/// Characters that must never reach a header line: line breaks and
/// control characters other than TAB.
fn is_header_breaking(c: char) -> bool {
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
    let mut in_quote = false;
    let mut escaped = false;
    let mut angle = None;
    for (i, c) in t.char_indices() {
        if in_quote {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_quote = false;
            }
            continue;
        }
        match c {
            '"' => in_quote = true,
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
    if in_quote {
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

/// A display name: words (atoms, quoted strings) and dots; an `@` outside
/// quotes means the "name" is really an address (`evil@x <a@y>`).
fn check_display_name(phrase: &str) -> Result<(), AddressError> {
    let mut in_quote = false;
    let mut escaped = false;
    for c in phrase.chars() {
        if in_quote {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_quote = false;
            }
            continue;
        }
        match c {
            '"' => in_quote = true,
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

// ---------------------------------------------------------------------------
// Headers: subject cleaning, RFC 2047, folding like Python's SMTP policy
// ---------------------------------------------------------------------------

/// The subject as it goes into the header: line breaks and control
/// characters replaced by a space (CRLF counts as one break), cut at
/// [`MAX_SUBJECT_CHARS`] with `…`.
pub fn sanitize_subject(subject: &str) -> String {
    let mut out = String::with_capacity(subject.len());
    let mut chars = subject.chars().peekable();
    let mut count = 0;
    while let Some(c) = chars.next() {
        if count == MAX_SUBJECT_CHARS {
            out.push('…');
            break;
        }
        if c == '\r' && chars.peek() == Some(&'\n') {
            chars.next();
        }
        out.push(if is_header_breaking(c) { ' ' } else { c });
        count += 1;
    }
    out
}

/// The complete `Subject` header mailgend writes for `subject` (cleaned
/// with [`sanitize_subject`], folded like Python, final CRLF included).
/// For subjects without control characters and without `=?` this is
/// exactly Python's `policy.fold("Subject", subject)`.
pub fn subject_header(subject: &str) -> String {
    let mut h = fold_unstructured(
        "Subject",
        &tokenize_unstructured(&sanitize_subject(subject)),
    );
    h.push_str(CRLF);
    h
}

/// One token of an unstructured header value, as Python's
/// `get_unstructured` splits it.
#[derive(Debug, Clone)]
struct Token {
    text: String,
    /// Folding white space (starts with SP or TAB).
    fws: bool,
    /// Must be written as an encoded word although ASCII: looks like one.
    force_ew: bool,
}

impl Token {
    fn needs_ew(&self) -> bool {
        self.force_ew || !self.text.is_ascii()
    }
}

/// Python's `str.isspace`, which ends a run of folding white space.
fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

fn tokenize_unstructured(value: &str) -> Vec<Token> {
    let mut tokens = Vec::new();
    let mut rest = value;
    while let Some(first) = rest.chars().next() {
        let (end, fws) = if first == ' ' || first == '\t' {
            (rest.find(|c| !is_py_space(c)).unwrap_or(rest.len()), true)
        } else {
            (rest.find([' ', '\t']).unwrap_or(rest.len()), false)
        };
        let text = &rest[..end];
        tokens.push(Token {
            text: text.to_string(),
            fws,
            force_ew: !fws && text.contains("=?"),
        });
        rest = &rest[end..];
    }
    tokens
}

fn clen(s: &str) -> usize {
    s.chars().count()
}

/// Python's `_steal_trailing_WSP_if_exists`.
fn steal_trailing_wsp(lines: &mut [String]) -> String {
    let last = lines.last_mut().expect("at least one line");
    match last.chars().last() {
        Some(c @ (' ' | '\t')) => {
            last.pop();
            c.to_string()
        }
        _ => String::new(),
    }
}

enum FoldPart {
    Literal(String),
    List(Vec<Token>),
    Tok(Token),
}

/// Folds `name: value` (an unstructured header) exactly like Python's
/// `email.policy.SMTP` (`_refold_parse_tree` and `_fold_as_ew`, 3.11):
/// at 78 columns, non-ASCII words as `=?utf-8?q?...?=` or `?b?` words
/// (whichever Python picks), neighbouring encoded words merged. Returns
/// the header lines joined by CRLF (no final CRLF).
fn fold_unstructured(name: &str, tokens: &[Token]) -> String {
    let mut lines = vec![String::new()];
    let mut last_ew: Option<usize> = None;
    let mut want_encoding = false;
    let mut parts: VecDeque<FoldPart> = VecDeque::new();
    parts.push_back(FoldPart::Literal(format!("{name}:")));
    if !tokens.is_empty() {
        parts.push_back(FoldPart::Literal(" ".into()));
    }
    parts.push_back(FoldPart::List(tokens.to_vec()));
    while let Some(part) = parts.pop_front() {
        match part {
            FoldPart::Literal(s) => {
                let last = lines.last_mut().expect("line");
                last.push_str(&s);
            }
            FoldPart::List(toks) => {
                if toks.iter().any(Token::needs_ew) {
                    for t in toks.into_iter().rev() {
                        parts.push_front(FoldPart::Tok(t));
                    }
                    continue;
                }
                let tstr: String = toks.iter().map(|t| t.text.as_str()).collect();
                let last_len = clen(lines.last().expect("line"));
                if clen(&tstr) + last_len <= MAXLEN {
                    lines.last_mut().expect("line").push_str(&tstr);
                    continue;
                }
                if clen(&tstr) < MAXLEN {
                    let newline = steal_trailing_wsp(&mut lines);
                    if !newline.is_empty() || toks.first().is_some_and(|t| t.fws) {
                        lines.push(newline + &tstr);
                        last_ew = None;
                        continue;
                    }
                }
                for t in toks.into_iter().rev() {
                    parts.push_front(FoldPart::Tok(t));
                }
            }
            FoldPart::Tok(t) => {
                if want_encoding || t.needs_ew() {
                    last_ew = fold_as_ew(&t.text, &mut lines, last_ew);
                    want_encoding = false;
                    continue;
                }
                let last_len = clen(lines.last().expect("line"));
                if clen(&t.text) + last_len <= MAXLEN {
                    lines.last_mut().expect("line").push_str(&t.text);
                    continue;
                }
                if clen(&t.text) < MAXLEN {
                    let newline = steal_trailing_wsp(&mut lines);
                    if !newline.is_empty() || t.fws {
                        lines.push(newline + &t.text);
                        last_ew = None;
                        continue;
                    }
                }
                // Too long for any line: encode it so it can be split.
                want_encoding = true;
                parts.push_front(FoldPart::Tok(t));
            }
        }
    }
    lines.join(CRLF)
}

/// Python's `_fold_as_ew`: writes `text` as encoded words, merged with
/// the encoded word that starts at `last_ew` on the current line.
fn fold_as_ew(text: &str, lines: &mut Vec<String>, last_ew: Option<usize>) -> Option<usize> {
    let mut to_encode = text.to_string();
    if let Some(le) = last_ew {
        let last = lines.last_mut().expect("line");
        if le <= last.len() {
            let previous = decode_unstructured(&last[le..]);
            last.truncate(le);
            to_encode = previous + &to_encode;
        }
    }
    let mut chars: Vec<char> = to_encode.chars().collect();
    if let Some(&lead @ (' ' | '\t')) = chars.first() {
        chars.remove(0);
        if clen(lines.last().expect("line")) == MAXLEN {
            let stolen = steal_trailing_wsp(lines);
            lines.push(stolen);
        }
        lines.last_mut().expect("line").push(lead);
    }
    let trailing = match chars.last() {
        Some(&c @ (' ' | '\t')) => {
            chars.pop();
            Some(c)
        }
        _ => None,
    };
    let mut new_last_ew = last_ew.unwrap_or_else(|| lines.last().expect("line").len());
    const CHROME: isize = 12; // "=?utf-8?q?" + "?="
    let mut rest: &[char] = &chars;
    while !rest.is_empty() {
        let remaining = MAXLEN as isize - clen(lines.last().expect("line")) as isize;
        let text_space = remaining - CHROME;
        if text_space <= 0 {
            lines.push(" ".into());
            continue;
        }
        let mut n = (text_space as usize).min(rest.len());
        let mut word = encode_word(&rest[..n]);
        while word.len() as isize > remaining {
            n -= 1;
            word = encode_word(&rest[..n]);
        }
        lines.last_mut().expect("line").push_str(&word);
        rest = &rest[n..];
        if !rest.is_empty() {
            lines.push(" ".into());
            new_last_ew = 1;
        }
    }
    if let Some(c) = trailing {
        lines.last_mut().expect("line").push(c);
    }
    Some(new_last_ew)
}

/// Bytes Python's header `q` encoding writes as themselves.
fn q_safe(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'!' | b'*' | b'+' | b'/')
}

/// One RFC 2047 word, `q` unless `b` is at least 5 characters shorter
/// (Python's choice).
fn encode_word(chars: &[char]) -> String {
    let text: String = chars.iter().collect();
    let bytes = text.as_bytes();
    let qlen: usize = bytes
        .iter()
        .map(|&b| if q_safe(b) || b == b' ' { 1 } else { 3 })
        .sum();
    let blen = bytes.len().div_ceil(3) * 4;
    if (qlen as isize) - (blen as isize) < 5 {
        let mut s = String::with_capacity(qlen + 12);
        s.push_str("=?utf-8?q?");
        for &b in bytes {
            if q_safe(b) {
                s.push(b as char);
            } else if b == b' ' {
                s.push('_');
            } else {
                s.push_str(&format!("={b:02X}"));
            }
        }
        s.push_str("?=");
        s
    } else {
        format!("=?utf-8?b?{}?=", base64(bytes))
    }
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk.len();
        let v = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= n {
                out.push(ALPHABET[((v >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn unbase64(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    let mut acc = 0u32;
    let mut bits = 0;
    for b in s.bytes() {
        let v = match b {
            b'A'..=b'Z' => b - b'A',
            b'a'..=b'z' => b - b'a' + 26,
            b'0'..=b'9' => b - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

/// Decodes one of our own encoded words at the start of `s`; returns the
/// text and the rest.
fn decode_word(s: &str) -> Option<(String, &str)> {
    let lower = s.get(..10)?.to_ascii_lowercase();
    let b = match lower.as_str() {
        "=?utf-8?q?" => false,
        "=?utf-8?b?" => true,
        _ => return None,
    };
    let end = s[10..].find("?=")? + 10;
    let enc = &s[10..end];
    let bytes = if b {
        unbase64(enc)?
    } else {
        let mut out = Vec::with_capacity(enc.len());
        let raw = enc.as_bytes();
        let mut i = 0;
        while i < raw.len() {
            match raw[i] {
                b'_' => out.push(b' '),
                b'=' => {
                    let hex = std::str::from_utf8(raw.get(i + 1..i + 3)?).ok()?;
                    out.push(u8::from_str_radix(hex, 16).ok()?);
                    i += 2;
                }
                c => out.push(c),
            }
            i += 1;
        }
        out
    };
    Some((String::from_utf8(bytes).ok()?, &s[end + 2..]))
}

/// `str(get_unstructured(s))` for the text of a header line that starts
/// at one of our encoded words: encoded words decoded, white space between
/// two encoded words dropped, everything else literal.
fn decode_unstructured(s: &str) -> String {
    #[derive(PartialEq)]
    enum K {
        Fws,
        Ew,
        Text,
    }
    let mut toks: Vec<(K, String)> = Vec::new();
    let mut rest = s;
    while let Some(first) = rest.chars().next() {
        if first == ' ' || first == '\t' {
            let end = rest.find(|c| !is_py_space(c)).unwrap_or(rest.len());
            toks.push((K::Fws, rest[..end].to_string()));
            rest = &rest[end..];
            continue;
        }
        if rest.starts_with("=?") {
            if let Some((text, after)) = decode_word(rest) {
                let n = toks.len();
                if n >= 2 && toks[n - 1].0 == K::Fws && toks[n - 2].0 == K::Ew {
                    toks[n - 1].1.clear();
                }
                toks.push((K::Ew, text));
                rest = after;
                continue;
            }
        }
        let end = rest.find([' ', '\t']).unwrap_or(rest.len());
        toks.push((K::Text, rest[..end].to_string()));
        rest = &rest[end..];
    }
    toks.into_iter().map(|(_, t)| t).collect()
}

/// A structured header with MIME parameters (`Content-Type`,
/// `Content-Disposition`), folded like Python: on one line when it fits,
/// else the whole value on the next line when that fits, else parameter
/// by parameter.
fn fold_params(name: &str, value: &str, params: &[(&str, String)]) -> String {
    let quoted: Vec<String> = params
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")))
        .collect();
    let mut whole = value.to_string();
    for q in &quoted {
        whole.push_str("; ");
        whole.push_str(q);
    }
    let head = format!("{name}: ");
    if head.len() + whole.len() <= MAXLEN {
        return head + &whole;
    }
    if whole.len() < MAXLEN {
        return format!("{name}:{CRLF} {whole}");
    }
    let mut lines = vec![format!("{head}{value}")];
    for q in &quoted {
        let last = lines.last_mut().expect("line");
        if !last.trim_end().ends_with(';') {
            last.push(';');
        }
        if last.len() + q.len() + 1 < MAXLEN {
            last.push(' ');
            last.push_str(q);
        } else {
            lines.push(format!(" {q}"));
        }
    }
    lines.join(CRLF)
}

// ---------------------------------------------------------------------------
// Quoted-printable exactly as Python's email package writes it
// ---------------------------------------------------------------------------

/// Bytes `quoprimime.body_encode` leaves alone (besides CR and LF).
fn qp_body_safe(b: u8) -> bool {
    b == b'\t' || ((b' '..=b'~').contains(&b) && b != b'=')
}

/// Python's `email.quoprimime.body_encode(body, maxlinelen)` with `eol`
/// `"\n"`, where `body` holds one character per byte (Python gets the
/// UTF-8 bytes as a latin-1 string).
pub fn qp_body_encode(body: &[u8], maxlinelen: usize) -> String {
    assert!(maxlinelen >= 4, "maxlinelen must be at least 4");
    if body.is_empty() {
        return String::new();
    }
    let mut translated = String::with_capacity(body.len() * 2);
    for &b in body {
        if qp_body_safe(b) || b == b'\r' || b == b'\n' {
            translated.push(b as char);
        } else {
            translated.push_str(&format!("={b:02X}"));
        }
    }
    let maxlinelen = maxlinelen as isize;
    let maxlinelen1 = maxlinelen - 1;
    let mut encoded: Vec<String> = Vec::new();
    for line in splitlines(&translated) {
        let line = line.as_bytes();
        let len = line.len() as isize;
        let piece = |a: isize, b: isize| -> &str {
            let a = a.clamp(0, len) as usize;
            let b = b.clamp(0, len) as usize;
            std::str::from_utf8(&line[a..b.max(a)]).expect("ASCII")
        };
        let mut start: isize = 0;
        let laststart = len - 1 - maxlinelen;
        while start <= laststart {
            let stop = start + maxlinelen1;
            if line[(stop - 2) as usize] == b'=' {
                encoded.push(piece(start, stop - 1).to_string());
                start = stop - 2;
            } else if line[(stop - 1) as usize] == b'=' {
                encoded.push(piece(start, stop).to_string());
                start = stop - 1;
            } else {
                encoded.push(format!("{}=", piece(start, stop)));
                start = stop;
            }
        }
        match line.last() {
            Some(&ws @ (b' ' | b'\t')) => {
                let room = start - laststart;
                let quoted = format!("={ws:02X}");
                let q = if room >= 3 {
                    quoted
                } else if room == 2 {
                    format!("{}=\n", ws as char)
                } else {
                    format!("=\n{quoted}")
                };
                encoded.push(format!("{}{q}", piece(start, len - 1)));
            }
            _ => encoded.push(piece(start, len).to_string()),
        }
    }
    if translated.ends_with(['\r', '\n']) {
        encoded.push(String::new());
    }
    encoded.join("\n")
}

/// Python's `str.splitlines` for text holding only ASCII: splits at CRLF,
/// CR and LF; no empty last element for a final line end.
fn splitlines(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = s;
    while !rest.is_empty() {
        match rest.find(['\r', '\n']) {
            Some(i) => {
                out.push(&rest[..i]);
                let skip = if rest[i..].starts_with("\r\n") { 2 } else { 1 };
                rest = &rest[i + skip..];
            }
            None => {
                out.push(rest);
                break;
            }
        }
    }
    out
}

/// The quoted-printable payload of a text part as intelmq-mailgen writes
/// it: line ends (CRLF, CR, LF) normalised to one LF, a final line end
/// added, `body_encode` at 78 columns, then every `From ` replaced by
/// `From=20` (anywhere, as the old content manager does).
pub fn encode_text_qp(text: &str) -> String {
    let mut normal = Vec::with_capacity(text.len() + 1);
    for (i, line) in splitlines_bytes(text.as_bytes()).into_iter().enumerate() {
        if i > 0 {
            normal.push(b'\n');
        }
        normal.extend_from_slice(line);
    }
    normal.push(b'\n');
    qp_body_encode(&normal, MAXLEN).replace("From ", "From=20")
}

/// `bytes.splitlines()`: CRLF, CR and LF only.
fn splitlines_bytes(s: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = s;
    while !rest.is_empty() {
        match rest.iter().position(|&b| b == b'\r' || b == b'\n') {
            Some(i) => {
                out.push(&rest[..i]);
                let skip = if rest[i] == b'\r' && rest.get(i + 1) == Some(&b'\n') {
                    2
                } else {
                    1
                };
                rest = &rest[i + skip..];
            }
            None => {
                out.push(rest);
                break;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fold(s: &str) -> String {
        fold_unstructured("Subject", &tokenize_unstructured(s))
    }

    #[test]
    fn folds_like_python_basics() {
        assert_eq!(fold(""), "Subject:");
        assert_eq!(fold("a"), "Subject: a");
        assert_eq!(fold("Grüße"), "Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=");
        assert_eq!(
            fold("Grüße aus Köln"),
            "Subject: =?utf-8?b?R3LDvMOfZSBhdXMgS8O2bG4=?="
        );
        assert_eq!(
            fold(&"x".repeat(70)),
            format!("Subject:\r\n {}", "x".repeat(70))
        );
    }

    #[test]
    fn encoded_word_lookalikes_are_encoded() {
        let f = fold("hello =?utf-8?q?evil?= world");
        assert!(!f.contains("=?utf-8?q?evil?="), "{f}");
        assert_eq!(
            decode_unstructured(&f["Subject: ".len()..]),
            "hello =?utf-8?q?evil?= world"
        );
    }

    #[test]
    fn subject_sanitising() {
        assert_eq!(
            sanitize_subject("a\r\nb\rc\nd\u{2028}e\0f\u{85}g\th"),
            "a b c d e f g\th"
        );
        let long = "y".repeat(2000);
        let s = sanitize_subject(&long);
        assert_eq!(s.chars().count(), MAX_SUBJECT_CHARS + 1);
        assert!(s.ends_with('…'));
    }

    #[test]
    fn qp_examples() {
        assert_eq!(qp_body_encode(b"", 78), "");
        assert_eq!(qp_body_encode(b"\n", 78), "\n");
        assert_eq!(qp_body_encode(b"a=b \n", 78), "a=3Db=20\n");
        assert_eq!(encode_text_qp("From x\r\ny"), "From=20x\ny\n");
        assert_eq!(encode_text_qp(""), "\n");
    }

    #[test]
    fn base64_roundtrip() {
        for n in 0..10 {
            let data: Vec<u8> = (0..n).map(|i| (i * 37 + 5) as u8).collect();
            assert_eq!(unbase64(&base64(&data)).unwrap(), data);
        }
        assert_eq!(base64(b"Ma"), "TWE=");
    }

    #[test]
    fn message_id_normalising() {
        assert_eq!(normalise_message_id("a.b@c").unwrap(), "<a.b@c>");
        assert_eq!(normalise_message_id("<a.b@c>").unwrap(), "<a.b@c>");
        assert!(normalise_message_id("<a b@c>").is_err());
        assert!(normalise_message_id("a@c>\r\nBcc: x").is_err());
    }
}
