//! The `mailto:` action: validating its address, merging the recipients of
//! every matching rule, and rewriting the message's From/To headers and
//! adding `X-Peer` the way mail2alert did before it is sent on.
//!
//! The rewrite works on bytes and touches only the header block: the body
//! (8-bit, any charset, bare LF or CRLF) is passed through byte for byte.

use std::collections::HashSet;
use std::net::IpAddr;

/// Validates the part after `mailto:`: exactly one plain address.
pub fn parse_address(s: &str) -> Result<String, String> {
    if s.contains('?') || s.contains('%') {
        return Err(format!(
            "{s:?}: query parts and %-escapes are not supported in mailto: actions"
        ));
    }
    let r = crate::shared::address::parse_recipient(s).map_err(|e| format!("mailto:{s}: {e}"))?;
    if r.display_name().is_some() || s.contains('<') {
        return Err(format!(
            "mailto:{s}: give the bare address, without a name or <>"
        ));
    }
    Ok(r.address().to_string())
}

/// A local part without a domain (`mailto:ops`): letters, digits and the
/// atom characters of RFC 5322 only, so it is safe in `RCPT TO:<…>`.
pub fn bare_local_part(s: &str) -> Option<&str> {
    let ok = |c: char| c.is_ascii_alphanumeric() || "!#$&'*+-/=^_`{|}~.".contains(c);
    (!s.is_empty()
        && s.len() <= 64
        && s.chars().all(ok)
        && !s.starts_with('.')
        && !s.ends_with('.'))
    .then_some(s)
}

/// Merges recipient lists: each address once, compared case-insensitively,
/// first spelling and order kept.
pub fn union<'a>(addresses: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for a in addresses {
        if seen.insert(a.to_lowercase()) {
            out.push(a.to_string());
        }
    }
    out
}

/// Fields we replace: mail2alert rewrote From and To; X-Peer is ours, so
/// a copy the client sent (possibly forged) is removed.
fn is_replaced(name: &[u8], replace_from: bool) -> bool {
    name.eq_ignore_ascii_case(b"to")
        || name.eq_ignore_ascii_case(b"x-peer")
        || (replace_from && name.eq_ignore_ascii_case(b"from"))
}

/// A sender we can write into a From header: no whitespace, control or
/// address-syntax characters (the envelope comes from an SMTP client).
fn header_safe_address(a: &str) -> bool {
    !a.is_empty()
        && a.len() <= 254
        && !a
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || "<>,;:\"()[]\\".contains(c))
}

/// Rewrites the header block of `data` for delivery to `rcpt_to`:
/// `To:` lists the new recipients, `From:` becomes the envelope sender
/// (kept as it was for the null sender or an unwritable sender), and
/// `X-Peer:` names the client's address. Everything after the header block
/// is copied unchanged.
pub fn rewrite(data: &[u8], mail_from: Option<&str>, rcpt_to: &[String], peer: IpAddr) -> Vec<u8> {
    let eol: &[u8] = match data.iter().position(|&b| b == b'\n') {
        Some(i) if i > 0 && data[i - 1] == b'\r' => b"\r\n",
        Some(_) => b"\n",
        None => b"\r\n",
    };
    let from = mail_from.filter(|a| header_safe_address(a));

    let mut out = Vec::with_capacity(data.len() + 200);
    let mut pos = 0;
    let mut skipping = false;
    // Where the header block ends: at the blank line, at the first line
    // that is not a header field (lenient parsers start the body there), or
    // at the end of the data.
    let body_start = loop {
        if pos >= data.len() {
            break data.len();
        }
        let end = data[pos..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(data.len(), |i| pos + i + 1);
        let line = &data[pos..end];
        if line == b"\n" || line == b"\r\n" {
            break pos;
        }
        if line[0] == b' ' || line[0] == b'\t' {
            // Continuation of the previous field.
            if pos == 0 {
                break pos;
            }
        } else {
            let name_end = line.iter().position(|&b| b == b':');
            let name = match name_end {
                Some(i) if i > 0 && line[..i].iter().all(|&b| b > b' ' && b < 127) => &line[..i],
                _ => break pos,
            };
            skipping = is_replaced(name, from.is_some());
        }
        if !skipping {
            out.extend_from_slice(line);
        }
        pos = end;
    };
    if !out.is_empty() && !out.ends_with(b"\n") {
        out.extend_from_slice(eol);
    }
    out.extend_from_slice(b"X-Peer: ");
    out.extend_from_slice(peer.to_string().as_bytes());
    out.extend_from_slice(eol);
    write_folded(&mut out, "To", rcpt_to, eol);
    if let Some(f) = from {
        out.extend_from_slice(b"From: ");
        out.extend_from_slice(f.as_bytes());
        out.extend_from_slice(eol);
    }
    let rest = &data[body_start..];
    if !(rest.starts_with(b"\r\n") || rest.starts_with(b"\n")) {
        // No blank line separated the body (or there is none): add one.
        out.extend_from_slice(eol);
    }
    out.extend_from_slice(rest);
    out
}

/// `Name: a, b, c` folded before 78 columns where possible.
fn write_folded(out: &mut Vec<u8>, name: &str, items: &[String], eol: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b":");
    let mut col = name.len() + 1;
    for (i, item) in items.iter().enumerate() {
        let sep = usize::from(i + 1 < items.len());
        if i > 0 && col + 1 + item.len() + sep > 78 {
            out.extend_from_slice(eol);
            col = 0;
        }
        out.push(b' ');
        out.extend_from_slice(item.as_bytes());
        col += 1 + item.len();
        if i + 1 < items.len() {
            out.push(b',');
            col += 1;
        }
    }
    out.extend_from_slice(eol);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip() -> IpAddr {
        "192.0.2.7".parse().unwrap()
    }

    #[test]
    fn rewrites_only_headers() {
        let data = b"From: go@x.example\r\nTo: mail2alert@x.example\r\nSubject: a\r\n b\r\nX-Peer: 1.2.3.4\r\n\r\nbody \xff\xfe\r\n";
        let out = rewrite(data, Some("go@x.example"), &["a@y.example".into()], ip());
        assert_eq!(
            out,
            b"Subject: a\r\n b\r\nX-Peer: 192.0.2.7\r\nTo: a@y.example\r\nFrom: go@x.example\r\n\r\nbody \xff\xfe\r\n"
        );
    }

    #[test]
    fn null_sender_keeps_from_and_bare_lf() {
        let data = b"From: MAILER-DAEMON@x.example\nTo: a@x.example\n\nbody\n";
        let out = rewrite(data, None, &["b@y.example".into()], ip());
        assert_eq!(
            out,
            b"From: MAILER-DAEMON@x.example\nX-Peer: 192.0.2.7\nTo: b@y.example\n\nbody\n"
        );
    }

    #[test]
    fn no_body_and_header_injection() {
        let out = rewrite(
            b"Subject: x",
            Some("a@b.example\r\nBcc: x@y"),
            &["c@d.example".into()],
            ip(),
        );
        assert_eq!(
            out,
            b"Subject: x\r\nX-Peer: 192.0.2.7\r\nTo: c@d.example\r\n\r\n"
        );
    }

    #[test]
    fn folds_long_to() {
        let rcpts: Vec<String> = (0..8)
            .map(|i| format!("recipient{i}@example.org"))
            .collect();
        let out = rewrite(b"\r\nbody", None, &rcpts, ip());
        let text = String::from_utf8(out).unwrap();
        assert!(text.lines().all(|l| l.len() <= 78), "{text}");
        assert!(text.contains("recipient7@example.org\r\n\r\nbody"));
    }

    #[test]
    fn union_is_case_insensitive() {
        assert_eq!(
            union(["A@x.example", "b@x.example", "a@X.example"]),
            vec!["A@x.example", "b@x.example"]
        );
    }
}
