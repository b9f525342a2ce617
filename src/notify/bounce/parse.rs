//! Reading a delivery report: an RFC 3464 DSN (`multipart/report;
//! report-type=delivery-status`) field by field, or — best effort — a
//! classic bounce in prose, from its first SMTP reply code and the
//! address it names.
//!
//! Everything here is untrusted text from a remote MTA: every value is
//! reduced to one printable line and bounded in length before it is
//! stored or logged.

use mailparse::{MailHeaderMap, ParsedMail};
use regex::Regex;
use std::sync::LazyLock;

/// Longest diagnostic kept (characters).
pub const MAX_DIAGNOSTIC: usize = 1000;
/// Longest other field kept (characters).
const MAX_FIELD: usize = 255;

/// Permanent (5.x.x) or temporary (4.x.x).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Permanent,
    Temporary,
}

impl Class {
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Permanent => "permanent",
            Class::Temporary => "temporary",
        }
    }

    pub fn from_status(status: &str) -> Option<Class> {
        match status.trim().as_bytes().first() {
            Some(b'5') => Some(Class::Permanent),
            Some(b'4') => Some(Class::Temporary),
            _ => None,
        }
    }
}

/// How the report was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dsn,
    Classic,
}

/// One recipient's failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub recipient: Option<String>,
    /// Enhanced status code, e.g. `5.1.1`.
    pub status: String,
    pub class: Class,
    pub diagnostic: Option<String>,
    pub reporting_mta: Option<String>,
}

/// What a message to a bounce address held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub kind: Kind,
    /// The failures (a DSN may name several recipients; `delivered`,
    /// `relayed` and `expanded` recipients are not failures).
    pub reports: Vec<Report>,
    /// The report's own `Message-Id`.
    pub message_id: Option<String>,
}

/// Why a message to a bounce address is not read as a bounce.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("not a MIME message: {0}")]
    Mime(String),
    #[error("neither a delivery status notification nor a bounce with an SMTP status code")]
    NotABounce,
}

/// One printable line, at most `max` characters.
pub fn one_line(s: &str, max: usize) -> String {
    let s: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    s.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .take(max)
        .collect()
}

/// Reads `data` (the whole message). `known` are the recipients of the
/// notification the bounce address names: a classic bounce is pinned to
/// the first of them it mentions.
pub fn parse(data: &[u8], known: &[String]) -> Result<Parsed, ParseError> {
    let mail = mailparse::parse_mail(data).map_err(|e| ParseError::Mime(e.to_string()))?;
    let message_id = mail
        .headers
        .get_first_value("Message-Id")
        .map(|v| one_line(&v, MAX_FIELD))
        .filter(|v| !v.is_empty());
    if let Some(reports) = dsn(&mail) {
        return Ok(Parsed {
            kind: Kind::Dsn,
            reports,
            message_id,
        });
    }
    let report = classic(&mail, known).ok_or(ParseError::NotABounce)?;
    Ok(Parsed {
        kind: Kind::Classic,
        reports: vec![report],
        message_id,
    })
}

/// The `message/delivery-status` part anywhere in the message.
fn find_status_part<'a>(mail: &'a ParsedMail<'a>) -> Option<&'a ParsedMail<'a>> {
    if mail
        .ctype
        .mimetype
        .eq_ignore_ascii_case("message/delivery-status")
        || mail
            .ctype
            .mimetype
            .eq_ignore_ascii_case("message/global-delivery-status")
    {
        return Some(mail);
    }
    mail.subparts.iter().find_map(find_status_part)
}

/// The recipients of a DSN that failed or were delayed; `None` when the
/// message has no delivery-status part.
fn dsn(mail: &ParsedMail<'_>) -> Option<Vec<Report>> {
    let part = find_status_part(mail)?;
    let body = part.get_body_raw().ok()?;
    let text = String::from_utf8_lossy(&body).replace("\r\n", "\n");
    let mut blocks = text
        .split("\n\n")
        .filter(|b| !b.trim().is_empty())
        .map(|b| fields(b.as_bytes()));
    // RFC 3464 §2.2: the per-message fields come first.
    let per_message = blocks.next().unwrap_or_default();
    let reporting_mta = field(&per_message, "Reporting-MTA").map(|v| strip_type(&v));
    let mut out = Vec::new();
    for block in blocks {
        let action = field(&block, "Action")
            .unwrap_or_default()
            .to_ascii_lowercase();
        if !matches!(action.as_str(), "failed" | "delayed") {
            continue;
        }
        let status = field(&block, "Status")
            .map(|s| s.split_whitespace().next().unwrap_or_default().to_string())
            .filter(|s| ENHANCED.is_match(s))
            .unwrap_or_else(|| {
                if action == "delayed" {
                    "4.0.0"
                } else {
                    "5.0.0"
                }
                .to_string()
            });
        let class = if action == "delayed" {
            Class::Temporary
        } else {
            Class::from_status(&status).unwrap_or(Class::Permanent)
        };
        let recipient = field(&block, "Final-Recipient")
            .or_else(|| field(&block, "Original-Recipient"))
            .map(|v| strip_type(&v))
            .filter(|v| !v.is_empty());
        out.push(Report {
            recipient,
            status: one_line(&status, 16),
            class,
            diagnostic: field(&block, "Diagnostic-Code")
                .map(|v| one_line(&strip_type(&v), MAX_DIAGNOSTIC)),
            reporting_mta: reporting_mta.clone(),
        });
    }
    Some(out)
}

/// The header fields of one block (lower-case names, unfolded values).
fn fields(block: &[u8]) -> Vec<(String, String)> {
    // mailparse unfolds continuation lines only after CRLF.
    let mut block = String::from_utf8_lossy(block)
        .replace('\n', "\r\n")
        .into_bytes();
    block.extend_from_slice(b"\r\n\r\n");
    match mailparse::parse_headers(&block) {
        Ok((headers, _)) => headers
            .iter()
            .map(|h| (h.get_key().to_ascii_lowercase(), h.get_value()))
            .collect(),
        Err(_) => Vec::new(),
    }
}

fn field(fields: &[(String, String)], name: &str) -> Option<String> {
    let name = name.to_ascii_lowercase();
    fields
        .iter()
        .find(|(k, _)| *k == name)
        .map(|(_, v)| one_line(v, MAX_DIAGNOSTIC))
}

/// `rfc822; a@b` → `a@b`, `dns; mx.example` → `mx.example`,
/// `smtp; 550 5.1.1 …` → `550 5.1.1 …`.
fn strip_type(v: &str) -> String {
    let v = match v.split_once(';') {
        Some((t, rest)) if !t.contains(' ') && !t.contains('@') => rest,
        _ => v,
    };
    one_line(
        v.trim().trim_start_matches('<').trim_end_matches('>'),
        MAX_FIELD.max(MAX_DIAGNOSTIC),
    )
}

static ENHANCED: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[245]\.[0-9]{1,3}\.[0-9]{1,3}$").unwrap());
/// An SMTP reply as bounces quote it: `550 5.1.1 …`, `550-5.1.1 …`,
/// `550 …` at a line start or after `said:`.
static REPLY: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?m)(?:^|said:|:)\s*([45][0-9][0-9])[ -](?:\s*#?([45]\.[0-9]{1,3}\.[0-9]{1,3})\b)?",
    )
    .unwrap()
});
static BARE_ENHANCED: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\b([45]\.[0-9]{1,3}\.[0-9]{1,3})\b").unwrap());
static ADDRESS: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r#"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}"#).unwrap()
});

/// The readable text of the message: its text parts, else its body.
fn text_of(mail: &ParsedMail<'_>) -> String {
    let mut out = String::new();
    collect_text(mail, &mut out);
    if out.trim().is_empty() {
        out = mail.get_body().unwrap_or_default();
    }
    out
}

fn collect_text(mail: &ParsedMail<'_>, out: &mut String) {
    if mail.subparts.is_empty() {
        if mail.ctype.mimetype.starts_with("text/") {
            out.push_str(&mail.get_body().unwrap_or_default());
            out.push('\n');
        }
    } else {
        for p in &mail.subparts {
            // The returned original is not the report.
            if !p.ctype.mimetype.starts_with("message/") {
                collect_text(p, out);
            }
        }
    }
}

/// A prose bounce: the first SMTP reply code in it (with its enhanced
/// code, when given), and the notification's recipient it names (else the
/// first address that is not the reporting system's).
fn classic(mail: &ParsedMail<'_>, known: &[String]) -> Option<Report> {
    let text = text_of(mail);
    let (line, status) = if let Some(c) = REPLY.captures(&text) {
        let code = c.get(1)?.as_str();
        let status = match c.get(2) {
            Some(e) => e.as_str().to_string(),
            None => format!("{}.0.0", &code[..1]),
        };
        (line_at(&text, c.get(1)?.start()), status)
    } else {
        let c = BARE_ENHANCED.captures(&text)?;
        let m = c.get(1)?;
        (line_at(&text, m.start()), m.as_str().to_string())
    };
    let class = Class::from_status(&status)?;
    let lower = text.to_ascii_lowercase();
    let recipient = known
        .iter()
        .find(|k| lower.contains(&k.to_ascii_lowercase()))
        .cloned()
        .or_else(|| {
            ADDRESS
                .find_iter(&text)
                .map(|m| m.as_str().to_string())
                .find(|a| {
                    let l = a.to_ascii_lowercase();
                    !l.starts_with("mailer-daemon@") && !l.starts_with("postmaster@")
                })
        });
    Some(Report {
        recipient: recipient.map(|r| one_line(&r, MAX_FIELD)),
        status,
        class,
        diagnostic: Some(one_line(&line, MAX_DIAGNOSTIC)).filter(|d| !d.is_empty()),
        reporting_mta: None,
    })
}

fn line_at(text: &str, pos: usize) -> String {
    let start = text[..pos].rfind('\n').map_or(0, |i| i + 1);
    let end = text[pos..].find('\n').map_or(text.len(), |i| pos + i);
    text[start..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DSN: &str = "From: MAILER-DAEMON@mx.example (Mail Delivery System)\r\n\
To: bounces+20261203-10000042-00112233445566778899@cert.example\r\n\
Subject: Undelivered Mail Returned to Sender\r\n\
Message-Id: <20261203.ABC@mx.example>\r\n\
MIME-Version: 1.0\r\n\
Content-Type: multipart/report; report-type=delivery-status;\r\n\
\tboundary=\"B1\"\r\n\
\r\n\
--B1\r\n\
Content-Type: text/plain\r\n\
\r\n\
I'm sorry to have to inform you...\r\n\
--B1\r\n\
Content-Type: message/delivery-status\r\n\
\r\n\
Reporting-MTA: dns; mx.example\r\n\
Arrival-Date: Thu,  3 Dec 2026 14:00:00 +0000 (UTC)\r\n\
\r\n\
Final-Recipient: rfc822; gone@net.example\r\n\
Original-Recipient: rfc822;gone@net.example\r\n\
Action: failed\r\n\
Status: 5.1.1\r\n\
Remote-MTA: dns; in.net.example\r\n\
Diagnostic-Code: smtp; 550 5.1.1 <gone@net.example>: Recipient address\r\n\
\x20   rejected: User unknown\r\n\
\r\n\
Final-Recipient: rfc822; slow@net.example\r\n\
Action: delayed\r\n\
Status: 4.4.1\r\n\
\r\n\
Final-Recipient: rfc822; fine@net.example\r\n\
Action: delivered\r\n\
Status: 2.0.0\r\n\
\r\n\
--B1\r\n\
Content-Type: text/rfc822-headers\r\n\
\r\n\
Subject: [CERT] events\r\n\
--B1--\r\n";

    // RFC 3464 §2.2-2.3 and its appendix example.
    #[test]
    fn a_dsn_gives_each_failed_or_delayed_recipient() {
        let p = parse(DSN.as_bytes(), &[]).unwrap();
        assert_eq!(p.kind, Kind::Dsn);
        assert_eq!(p.message_id.as_deref(), Some("<20261203.ABC@mx.example>"));
        assert_eq!(p.reports.len(), 2, "{:?}", p.reports);
        let r = &p.reports[0];
        assert_eq!(r.recipient.as_deref(), Some("gone@net.example"));
        assert_eq!(r.status, "5.1.1");
        assert_eq!(r.class, Class::Permanent);
        assert_eq!(r.reporting_mta.as_deref(), Some("mx.example"));
        assert_eq!(
            r.diagnostic.as_deref(),
            Some("550 5.1.1 <gone@net.example>: Recipient address rejected: User unknown")
        );
        assert_eq!(p.reports[1].class, Class::Temporary);
        assert_eq!(p.reports[1].status, "4.4.1");
    }

    #[test]
    fn a_classic_bounce_is_read_best_effort() {
        let m = "From: MAILER-DAEMON@old.example\r\nSubject: failure notice\r\n\
Message-Id: <x1@old.example>\r\n\r\n\
Hi. This is the qmail-send program at old.example.\r\n\
I'm afraid I wasn't able to deliver your message to the following addresses.\r\n\
\r\n\
<abuse@net.example>:\r\n\
192.0.2.1 does not like recipient.\r\n\
Remote host said: 550 5.7.1 Mailbox disabled\r\n";
        let p = parse(m.as_bytes(), &["Abuse@net.example".into()]).unwrap();
        assert_eq!(p.kind, Kind::Classic);
        let r = &p.reports[0];
        assert_eq!(r.recipient.as_deref(), Some("Abuse@net.example"));
        assert_eq!((r.status.as_str(), r.class), ("5.7.1", Class::Permanent));
        assert_eq!(
            r.diagnostic.as_deref(),
            Some("Remote host said: 550 5.7.1 Mailbox disabled")
        );
        // Without a known recipient: the first address named.
        let p = parse(m.as_bytes(), &[]).unwrap();
        assert_eq!(p.reports[0].recipient.as_deref(), Some("abuse@net.example"));
        // A code without an enhanced one.
        let m2 = "Subject: x\r\n\r\nx@net.example\r\n452 mailbox full\r\n";
        let p = parse(m2.as_bytes(), &[]).unwrap();
        assert_eq!(
            (p.reports[0].status.as_str(), p.reports[0].class),
            ("4.0.0", Class::Temporary)
        );
    }

    #[test]
    fn an_autoreply_is_not_a_bounce() {
        let m = "From: someone@net.example\r\nSubject: Out of office\r\n\r\n\
I am away until the 10th, 500 miles from here.\r\n";
        assert_eq!(parse(m.as_bytes(), &[]), Err(ParseError::NotABounce));
    }

    #[test]
    fn remote_text_is_one_bounded_line() {
        let long = format!("a\r\nb\u{7}{}", "x".repeat(5000));
        let l = one_line(&long, MAX_DIAGNOSTIC);
        assert!(!l.chars().any(char::is_control));
        assert_eq!(l.chars().count(), MAX_DIAGNOSTIC);
    }
}
