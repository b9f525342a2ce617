//! Bounces: telling the envelope sender that a message it handed us (and
//! heard "250" for) was refused for good later, by the relay.
//!
//! The report is a `multipart/report` delivery status notification in the
//! shape of RFC 3464 (a human part, a `message/delivery-status` part, the
//! original header block), sent with the null sender `<>` so it can never
//! cause a bounce itself. Every value from outside (addresses, remote
//! reasons) is reduced to one printable line before it goes into a header
//! or a status field.

use chrono::Utc;

/// One recipient the relay refused.
#[derive(Debug, Clone)]
pub struct Refused {
    pub recipient: String,
    pub reason: String,
}

/// The bounce's bytes (CRLF line ends).
pub fn build(
    hostname: &str,
    sender: &str,
    original: &[u8],
    refused: &[Refused],
    arrival: chrono::DateTime<Utc>,
) -> Vec<u8> {
    let now = Utc::now();
    let boundary = format!(
        "=_mailgend-route-{}",
        now.timestamp_nanos_opt().unwrap_or(0)
    );
    let host = one_line(hostname);
    let mut m = String::new();
    let mut h = |s: String| {
        m.push_str(&s);
        m.push_str("\r\n");
    };
    h(format!("From: Mail Delivery System <MAILER-DAEMON@{host}>"));
    h(format!("To: <{}>", one_line(sender)));
    h("Subject: Undelivered Mail Returned to Sender".into());
    h(format!("Date: {}", now.to_rfc2822()));
    h(format!(
        "Message-ID: <{}.bounce@{host}>",
        now.timestamp_nanos_opt().unwrap_or(0)
    ));
    h("Auto-Submitted: auto-replied".into());
    h("MIME-Version: 1.0".into());
    h(format!(
        "Content-Type: multipart/report; report-type=delivery-status;\r\n boundary=\"{boundary}\""
    ));
    h(String::new());
    h(format!("--{boundary}"));
    h("Content-Type: text/plain; charset=utf-8".into());
    h(String::new());
    h(format!(
        "This is the alert router (mailgend route) at {host}. It accepted your message"
    ));
    h(format!(
        "on {}, but the mail relay refused it for good for these",
        arrival.to_rfc2822()
    ));
    h("recipients:".into());
    h(String::new());
    for r in refused {
        h(format!(
            "  <{}>: {}",
            one_line(&r.recipient),
            one_line(&r.reason)
        ));
    }
    h(String::new());
    h("Its header is attached.".into());
    h(String::new());
    h(format!("--{boundary}"));
    h("Content-Type: message/delivery-status".into());
    h(String::new());
    h(format!("Reporting-MTA: dns; {host}"));
    h(format!("Arrival-Date: {}", arrival.to_rfc2822()));
    for r in refused {
        h(String::new());
        h(format!(
            "Final-Recipient: rfc822; {}",
            one_line(&r.recipient)
        ));
        h("Action: failed".into());
        h(format!("Status: {}", status_code(&r.reason)));
        h(format!("Diagnostic-Code: smtp; {}", one_line(&r.reason)));
    }
    h(String::new());
    h(format!("--{boundary}"));
    h("Content-Type: text/rfc822-headers".into());
    h(String::new());
    let mut out = m.into_bytes();
    out.extend_from_slice(header_block(original));
    if !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    out
}

/// The header block of a message (up to the first empty line).
fn header_block(msg: &[u8]) -> &[u8] {
    for (i, w) in msg.windows(4).enumerate() {
        if w == b"\r\n\r\n" {
            return &msg[..i + 2];
        }
    }
    // No body separator: all of it is header, or there is no header.
    msg
}

/// The enhanced status code in a reason (`5.1.1`), else `5.0.0`.
fn status_code(reason: &str) -> String {
    reason
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .find(|w| {
            let p: Vec<&str> = w.split('.').collect();
            p.len() == 3 && p[0] == "5" && p.iter().all(|x| !x.is_empty() && x.len() <= 3)
        })
        .unwrap_or("5.0.0")
        .to_string()
}

/// One printable line, at most 500 characters.
pub fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(500)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounce_names_recipients_and_reasons_and_keeps_the_header() {
        let original = b"From: gocd@example.org\r\nSubject: Stage [x] failed\r\n\r\nbody\r\n";
        let b = build(
            "router.example",
            "gocd@example.org",
            original,
            &[Refused {
                recipient: "a@example.net".into(),
                reason: "permanent error (550): 5.1.1 Mailbox unavailable\r\nInjected: x".into(),
            }],
            Utc::now(),
        );
        let t = String::from_utf8(b).unwrap();
        assert!(t.contains("To: <gocd@example.org>\r\n"));
        assert!(t.contains("Final-Recipient: rfc822; a@example.net\r\n"));
        assert!(t.contains("Status: 5.1.1\r\n"));
        assert!(t.contains("Subject: Stage [x] failed\r\n"));
        assert!(!t.contains("body\r\n"));
        // A remote reason cannot start a header line of its own.
        assert!(!t.contains("\r\nInjected: x"));
        assert_eq!(status_code("no code here"), "5.0.0");
    }
}
