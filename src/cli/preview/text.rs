//! The preview as text for a terminal: every value from event data or the
//! database passes [`terminal_safe`].

use std::fmt::Write as _;

use super::{GroupPreview, Header, MailPreview, Outcome};

/// The headers before the first empty line, unfolded.
pub fn top_headers(raw: &str) -> Vec<Header> {
    let head = raw.split("\r\n\r\n").next().unwrap_or("");
    let mut out: Vec<Header> = Vec::new();
    for line in head.split("\r\n") {
        if line.starts_with([' ', '\t']) {
            if let Some(h) = out.last_mut() {
                h.value.push_str(line);
            }
        } else if let Some((name, value)) = line.split_once(':') {
            out.push(Header {
                name: name.to_string(),
                value: value.trim_start().to_string(),
            });
        }
    }
    out
}

/// Event data is untrusted: control characters could drive the
/// operator's terminal, so they are shown escaped (`\x1b`), keeping line
/// feeds and tabs.
pub fn terminal_safe(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\n' | '\t' => out.push(c),
            '\r' => {}
            c if c.is_control() => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            // Bidirectional overrides could make text display as
            // something else.
            '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

/// Options of the text rendering.
#[derive(Debug, Clone, Copy, Default)]
pub struct TextOptions {
    /// Print the content of text attachments, not only their names.
    pub attachment_content: bool,
}

/// The note that opens every text preview.
pub const TEXT_NOTE: &str = "\
Preview only: nothing was sent, no ticket number was drawn, nothing was written.
Tickets shown are the ones the next draws would give if these groups were sent in
this order and nobody else drew numbers meanwhile; Date and Message-Id are made
anew when a mail is really sent.
";

/// One group as readable text. Everything is passed through
/// [`terminal_safe`]: recipients, formats, aggregate values and the mails
/// all carry untrusted data.
pub fn write_group_text(out: &mut String, g: &GroupPreview, opts: TextOptions) {
    let mut text = String::new();
    group_text(&mut text, g, opts);
    out.push_str(&terminal_safe(&text));
}

fn group_text(out: &mut String, g: &GroupPreview, opts: TextOptions) {
    let _ = writeln!(
        out,
        "recipient      {}\ntemplate       {}\nformats        {} / {}",
        g.recipient, g.template, g.notification_format, g.event_data_format
    );
    if !g.aggregate_identifier.is_empty() {
        let agg: Vec<String> = g
            .aggregate_identifier
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let _ = writeln!(out, "aggregate      {}", agg.join(", "));
    }
    let _ = writeln!(out, "directive ids  {}", id_list(&g.directive_ids));
    let _ = writeln!(out, "event ids      {}", id_list(&g.event_ids));
    let _ = writeln!(
        out,
        "last sent      {}",
        g.last_sent
            .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
            .unwrap_or_else(|| "never".into())
    );
    match &g.outcome {
        Outcome::Postponed {
            format,
            reason,
            until,
        } => {
            let _ = writeln!(out, "status         POSTPONED by {format}: {reason}");
            let _ = writeln!(
                out,
                "due            {}",
                until
                    .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
                    .unwrap_or_else(|| "unknown".into())
            );
        }
        Outcome::NoMatch { error } => {
            let _ = writeln!(out, "status         ERROR: {error}");
        }
        Outcome::Open { note, mails } => {
            let _ = writeln!(
                out,
                "status         OPEN: {} mail(s) of an earlier attempt: {note}",
                mails.len()
            );
            write_mails(out, mails, opts, "stored, not drawn anew");
        }
        Outcome::Error { error, .. } => {
            let _ = writeln!(out, "status         ERROR: {error}");
        }
        Outcome::Due { format, why, mails } => {
            let _ = writeln!(
                out,
                "status         DUE: {} mail(s) by {format}",
                mails.len()
            );
            let _ = writeln!(out, "why            {why}");
            write_mails(out, mails, opts, "would be drawn next");
        }
    }
}

fn write_mails(out: &mut String, mails: &[MailPreview], opts: TextOptions, ticket_note: &str) {
    for (i, m) in mails.iter().enumerate() {
        let _ = writeln!(
            out,
            "\n--- mail {} of {}: ticket {} ({ticket_note}), {}{} octets{}",
            i + 1,
            mails.len(),
            m.ticket,
            if m.signed { "signed, " } else { "" },
            m.size,
            if m.marks_sent {
                ", marks the group sent"
            } else {
                ", a copy (marks nothing sent)"
            }
        );
        let _ = writeln!(
            out,
            "envelope       {} -> {}",
            m.envelope_from,
            m.envelope_to.join(", ")
        );
        for h in &m.headers {
            let _ = writeln!(out, "{}: {}", h.name, h.value);
        }
        let _ = writeln!(out, "\n{}", m.text.trim_end());
        for a in &m.attachments {
            let _ = writeln!(
                out,
                "[attachment {} ({}, {} octets)]",
                a.name, a.content_type, a.size
            );
            if opts.attachment_content {
                if let Some(c) = &a.content {
                    let _ = writeln!(out, "{}", c.trim_end());
                    let _ = writeln!(out, "[end of {}]", a.name);
                }
            }
        }
    }
}

/// The whole preview as readable text.
pub fn to_text(groups: &[GroupPreview], opts: TextOptions) -> String {
    let mut out = String::from(TEXT_NOTE);
    if groups.is_empty() {
        out.push_str("\nNo pending group matches.\n");
        return out;
    }
    for (i, g) in groups.iter().enumerate() {
        let _ = writeln!(out, "\n=== group {} of {}", i + 1, groups.len());
        write_group_text(&mut out, g, opts);
    }
    let due = groups
        .iter()
        .filter(|g| matches!(g.outcome, Outcome::Due { .. }))
        .count();
    let postponed = groups
        .iter()
        .filter(|g| matches!(g.outcome, Outcome::Postponed { .. }))
        .count();
    let errors = groups.iter().filter(|g| g.outcome.is_error()).count();
    let _ = writeln!(
        out,
        "\n{} groups: {due} due, {postponed} postponed, {errors} errors.",
        groups.len()
    );
    out
}

fn id_list(ids: &[i64]) -> String {
    let parts: Vec<String> = ids.iter().map(i64::to_string).collect();
    format!("[{}]", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_shown_escaped() {
        assert_eq!(
            terminal_safe("a\x1b[2Jb\r\nc\td\u{9b}e\u{202e}f"),
            "a\\x1b[2Jb\nc\td\\x9be\\u{202e}f"
        );
    }

    #[test]
    fn headers_unfold() {
        let h = top_headers("A: 1\r\nB: x\r\n y\r\nC:z\r\n\r\nD: body\r\n");
        assert_eq!(
            h,
            vec![
                Header {
                    name: "A".into(),
                    value: "1".into()
                },
                Header {
                    name: "B".into(),
                    value: "x y".into()
                },
                Header {
                    name: "C".into(),
                    value: "z".into()
                },
            ]
        );
    }
}
