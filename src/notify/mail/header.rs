//! Headers: subject cleaning, RFC 2047 encoded words, and folding exactly
//! like Python's `email` SMTP policy (spec §7, §11).

use std::collections::VecDeque;

use base64::alphabet::STANDARD;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD as BASE64};
use base64::engine::DecodePaddingMode;
use base64::Engine;

use super::{CRLF, MAXLEN, MAX_SUBJECT_CHARS};
use crate::shared::address::is_header_breaking;

const BASE64_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

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
pub(super) struct Token {
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

pub(super) fn tokenize_unstructured(value: &str) -> Vec<Token> {
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
pub(super) fn fold_unstructured(name: &str, tokens: &[Token]) -> String {
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
    BASE64.encode(bytes)
}

/// Lenient like the reader it replaces: padding optional, trailing bits
/// ignored (only our own encoded words are decoded here).
fn unbase64(s: &str) -> Option<Vec<u8>> {
    BASE64_LENIENT.decode(s).ok()
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
pub(super) fn fold_params(name: &str, value: &str, params: &[(&str, String)]) -> String {
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
    fn base64_roundtrip() {
        for n in 0..10 {
            let data: Vec<u8> = (0..n).map(|i| (i * 37 + 5) as u8).collect();
            assert_eq!(unbase64(&base64(&data)).unwrap(), data);
        }
        assert_eq!(base64(b"Ma"), "TWE=");
    }
}
