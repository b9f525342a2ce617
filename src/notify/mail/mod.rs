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

use chrono::{DateTime, Local, SubsecRound, Utc};
use rand::Rng;

use crate::notify::signature::{DetachedSignature, DetachedSigner, SignError, Signer};
use crate::notify::ticket::Ticket;
use crate::shared::address::{is_header_breaking, parse_recipient, AddressError, Recipient};
use header::{fold_params, fold_unstructured, tokenize_unstructured};

mod header;
mod qp;

pub use header::{sanitize_subject, subject_header};
pub use qp::{encode_text_qp, qp_body_encode};

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
    /// `mailgend.verp`: when set, the envelope sender is the mail's VERP
    /// address (its ticket, signed) instead of `sender_address`; the
    /// `From` header stays.
    pub verp: Option<crate::shared::verp::Verp>,
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
            verp: None,
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
/// Longest subject kept (in characters); longer ones end with `…`.
pub const MAX_SUBJECT_CHARS: usize = 900;

/// Python's `policy.max_line_length` for the SMTP policy.
pub(crate) const MAXLEN: usize = 78;
pub(crate) const CRLF: &str = "\r\n";

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
    build_inner(n, ctx, signer, now, message_id, &[])
}

/// A binary attachment, written base64 after the text attachments: the
/// zipped CSV of a mail over the relay's size limit (`notify::fit`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BinaryAttachment {
    /// `application/zip`.
    pub content_type: String,
    /// `events.zip`; the same rules as [`Attachment::filename`].
    pub filename: String,
    pub data: Vec<u8>,
}

/// [`build`] with binary attachments after `n`'s own ones. Without any,
/// the bytes are exactly [`build`]'s.
pub fn build_with_binaries(
    n: &Notification,
    ctx: &MailContext,
    signer: Option<&Signer>,
    now: DateTime<Utc>,
    binaries: &[BinaryAttachment],
) -> Result<BuiltMail, MailError> {
    build_inner(
        n,
        ctx,
        signer.map(|s| s as &dyn DetachedSigner),
        now,
        None,
        binaries,
    )
}

fn build_inner(
    n: &Notification,
    ctx: &MailContext,
    signer: Option<&dyn DetachedSigner>,
    now: DateTime<Utc>,
    message_id: Option<&str>,
    binaries: &[BinaryAttachment],
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
    for b in binaries {
        check_binary(b)?;
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
    let mut content = if n.attachments.is_empty() && binaries.is_empty() {
        text
    } else {
        let boundary = boundaries.next();
        let mut parts = vec![text];
        parts.extend(n.attachments.iter().map(attachment_part));
        parts.extend(binaries.iter().map(binary_part));
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
        envelope_from: match &ctx.verp {
            Some(v) => v.address(n.ticket.as_str()),
            None => ctx.sender_address.clone(),
        },
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

/// What Python's `add_attachment` writes for bytes: base64 in lines of 76.
fn binary_part(b: &BinaryAttachment) -> Part {
    use base64::Engine;
    let encoded = base64::engine::general_purpose::STANDARD.encode(&b.data);
    let mut body = String::with_capacity(encoded.len() + encoded.len() / 76 + 1);
    for line in encoded.as_bytes().chunks(76) {
        body.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        body.push('\n');
    }
    Part {
        headers: vec![
            format!("Content-Type: {}", b.content_type),
            "Content-Transfer-Encoding: base64".to_string(),
            fold_params(
                "Content-Disposition",
                "attachment",
                &[("filename", b.filename.clone())],
            ),
            "MIME-Version: 1.0".into(),
        ],
        body: Body::Text(body),
    }
}

fn check_binary(b: &BinaryAttachment) -> Result<(), MailError> {
    check_attachment(&Attachment {
        subtype: b
            .content_type
            .split_once('/')
            .map_or(String::new(), |(_, sub)| sub.to_string()),
        filename: b.filename.clone(),
        disposition_attachment: true,
        content: String::new(),
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_id_normalising() {
        assert_eq!(normalise_message_id("a.b@c").unwrap(), "<a.b@c>");
        assert_eq!(normalise_message_id("<a.b@c>").unwrap(), "<a.b@c>");
        assert!(normalise_message_id("<a b@c>").is_err());
        assert!(normalise_message_id("a@c>\r\nBcc: x").is_err());
    }
}
