//! The mail bytes against Python's `email` package, the reference for the
//! layout (spec §7), and the header-safety rules for untrusted data
//! (spec §10, §11).
//!
//! - `tests/fixtures/mime/*.eml` were written by `generate.py` (Python's
//!   stdlib driven the way intelmq-mailgen 1.4 drives it); ours must be
//!   identical except for Date, Message-Id and the random boundaries.
//! - Quoted-printable, text payloads and subject folding are cross-checked
//!   with the local `python3` on seeded random inputs.
//! - Untrusted values (subject, recipient, envelope, body, attachment)
//!   full of CR/LF, NUL, U+2028, encoded-word look-alikes and over-long
//!   text must not add or change a header; the results are parsed back by
//!   our own checks and by Python's parser.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use chrono::{DateTime, TimeZone, Utc};
use mailgend::notify::mail::{
    build, build_with_id, build_with_signer, encode_text_qp, qp_body_encode, subject_header,
    Attachment, BuiltMail, MailContext, MailError, Notification,
};
use mailgend::notify::signature::{DetachedSignature, DetachedSigner, SignError};
use mailgend::notify::ticket::Ticket;
use mailgend::shared::address::{parse_recipient, AddressError};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

const PLACEHOLDER_SIGNATURE: &str = "-----BEGIN PGP SIGNATURE-----\n\
\n\
iQGzBAABCAAdFiEEPLACEHOLDERPLACEHOLDERPLACEHOLDERPLACEHOLDERPLACEH\n\
b2xkZXIgc2lnbmF0dXJl\n\
=AbCd\n\
-----END PGP SIGNATURE-----\n";

/// Signs with the fixed text `generate.py` uses, and remembers what it was
/// asked to sign.
#[derive(Default)]
struct Placeholder {
    signed: std::sync::Mutex<Vec<Vec<u8>>>,
}

impl DetachedSigner for Placeholder {
    fn sign_detached(&self, data: &[u8]) -> Result<DetachedSignature, SignError> {
        self.signed.lock().unwrap().push(data.to_vec());
        Ok(DetachedSignature {
            armored: PLACEHOLDER_SIGNATURE.to_string(),
            micalg: "pgp-sha256",
        })
    }
}

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mime")
}

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2024, 5, 2, 8, 11, 12).unwrap()
}

fn ctx() -> MailContext {
    MailContext::from_sender("cert@cert.example.org").unwrap()
}

fn notification(subject: &str, body: &str) -> Notification {
    Notification {
        ticket: Ticket::from_stored("20240502-10000001"),
        recipient: "abuse@isp.example.net".into(),
        envelope_to: None,
        subject: subject.into(),
        body: body.into(),
        attachments: vec![],
        extra_headers: vec![],
        mark_sent: true,
        covers: None,
    }
}

fn csv(content: &str) -> Attachment {
    Attachment {
        subtype: "csv".into(),
        filename: "events.csv".into(),
        disposition_attachment: true,
        content: content.into(),
    }
}

/// Date and Message-Id values blanked in the top header block; boundaries
/// renamed by order of first appearance.
fn normalise(bytes: &[u8]) -> String {
    let text = String::from_utf8(bytes.to_vec()).expect("UTF-8 mail");
    let (head, body) = text.split_once("\r\n\r\n").expect("header/body separator");
    let mut out = String::new();
    for line in head.split("\r\n") {
        if line.starts_with("Date: ") {
            out.push_str("Date: <DATE>");
        } else if line.starts_with("Message-Id: ") {
            out.push_str("Message-Id: <MSGID>");
        } else {
            out.push_str(line);
        }
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    out.push_str(body);
    let mut seen: Vec<String> = Vec::new();
    let mut result = String::new();
    let mut rest = out.as_str();
    const EQ15: &str = "===============";
    while let Some(i) = rest.find(EQ15) {
        let cand = &rest[i..];
        let digits = &cand[EQ15.len()..];
        let is_boundary = digits.len() >= 21
            && digits.as_bytes()[..19].iter().all(u8::is_ascii_digit)
            && &digits[19..21] == "==";
        if is_boundary {
            let b = cand[..EQ15.len() + 21].to_string();
            let n = match seen.iter().position(|s| *s == b) {
                Some(n) => n,
                None => {
                    seen.push(b.clone());
                    seen.len() - 1
                }
            };
            result.push_str(&rest[..i]);
            result.push_str(&format!("<BOUNDARY-{n}>"));
            rest = &rest[i + b.len()..];
        } else {
            result.push_str(&rest[..i + EQ15.len()]);
            rest = &rest[i + EQ15.len()..];
        }
    }
    result.push_str(rest);
    result
}

fn first_difference(a: &str, b: &str) -> String {
    for (i, (la, lb)) in a.split("\r\n").zip(b.split("\r\n")).enumerate() {
        if la != lb {
            return format!("line {}:\n  ours:   {la:?}\n  python: {lb:?}", i + 1);
        }
    }
    format!(
        "line counts differ: ours {}, python {}",
        a.split("\r\n").count(),
        b.split("\r\n").count()
    )
}

fn notification_from_case(case: &Value) -> Notification {
    let s = |k: &str| case[k].as_str().unwrap().to_string();
    Notification {
        ticket: Ticket::from_stored("20240502-10000001"),
        recipient: s("recipient"),
        envelope_to: None,
        subject: s("subject"),
        body: s("body"),
        attachments: case["attachments"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| Attachment {
                subtype: a["subtype"].as_str().unwrap().into(),
                filename: a["filename"].as_str().unwrap().into(),
                disposition_attachment: a["disposition_attachment"].as_bool().unwrap(),
                content: a["content"].as_str().unwrap().into(),
            })
            .collect(),
        extra_headers: case["extra_headers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| {
                (
                    h[0].as_str().unwrap().to_string(),
                    h[1].as_str().unwrap().to_string(),
                )
            })
            .collect(),
        mark_sent: true,
        covers: None,
    }
}

#[test]
fn mails_match_python_fixtures() {
    let cases: Value =
        serde_json::from_slice(&std::fs::read(fixture_dir().join("cases.json")).unwrap()).unwrap();
    let cases = cases.as_array().unwrap();
    assert!(cases.len() >= 15, "fixtures missing");
    let mut failures = Vec::new();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let n = notification_from_case(case);
        let ctx = MailContext::from_sender(case["sender"].as_str().unwrap()).unwrap();
        let signer = Placeholder::default();
        let signed = case["signed"].as_bool().unwrap();
        let mail = build_with_signer(
            &n,
            &ctx,
            signed.then_some(&signer as &dyn DetachedSigner),
            now(),
            None,
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        let python = std::fs::read(fixture_dir().join(format!("{name}.eml"))).unwrap();
        let (ours, theirs) = (normalise(&mail.bytes), normalise(&python));
        if ours != theirs {
            failures.push(format!("{name}: {}", first_difference(&ours, &theirs)));
        }
        if signed {
            // The signed bytes are the first part exactly as it appears.
            let signed_bytes = signer.signed.lock().unwrap()[0].clone();
            let (first, _) = split_signed(&mail.bytes);
            assert_eq!(
                first, signed_bytes,
                "{name}: signed bytes differ from the part"
            );
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn subjects_match_python_fixtures() {
    let cases: Value =
        serde_json::from_slice(&std::fs::read(fixture_dir().join("subjects.json")).unwrap())
            .unwrap();
    let mut failures = Vec::new();
    for c in cases.as_array().unwrap() {
        let s = c["subject"].as_str().unwrap();
        let want = c["folded"].as_str().unwrap();
        let got = subject_header(s);
        if got != want {
            failures.push(format!("{s:?}\n  ours:   {got:?}\n  python: {want:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Splits a multipart/signed mail into the first part's exact bytes and
/// the signature part's payload (RFC 3156: the CRLF before a delimiter
/// belongs to the delimiter).
fn split_signed(mail: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let text = String::from_utf8(mail.to_vec()).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let unfolded = head.replace("\r\n ", " ");
    let ct = unfolded
        .split("\r\n")
        .find(|l| l.starts_with("Content-Type: multipart/signed"))
        .expect("multipart/signed");
    let boundary = ct
        .split("boundary=\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap();
    let open = format!("--{boundary}\r\n");
    let mid = format!("\r\n--{boundary}\r\n");
    let close = format!("\r\n--{boundary}--\r\n");
    assert!(body.starts_with(&open));
    let rest = &body[open.len()..];
    let i = rest.find(&mid).expect("second part");
    let first = rest.as_bytes()[..i].to_vec();
    let sig_part = &rest[i + mid.len()..];
    let j = sig_part.find(&close).expect("close delimiter");
    let sig_part = &sig_part[..j];
    let (_, payload) = sig_part.split_once("\r\n\r\n").unwrap();
    assert!(body.ends_with(&close));
    (first, payload.as_bytes().to_vec())
}

// ---------------------------------------------------------------------------
// Cross-checks with python3 on random inputs
// ---------------------------------------------------------------------------

const PYTHON_CHECK: &str = r#"
import json, sys
from email import quoprimime
from email.contentmanager import raw_data_manager
from email.message import EmailMessage
from email.policy import SMTP
req = json.load(sys.stdin)
pol = SMTP.clone(cte_type="7bit")
def text(t):
    m = EmailMessage(policy=pol)
    raw_data_manager.set_content(m, t, cte="quoted-printable")
    return m.get_payload(decode=False).replace("From ", "From=20")
def subject(s):
    m = EmailMessage(policy=pol)
    m["Subject"] = s
    return pol.fold("Subject", m["Subject"])
json.dump({
    "qp": [quoprimime.body_encode(bytes(b).decode("latin-1"), n) for b, n in req["qp"]],
    "text": [text(t) for t in req["text"]],
    "subject": [subject(s) for s in req["subject"]],
}, sys.stdout)
"#;

fn python(script: &str, input: &[u8]) -> Vec<u8> {
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 must be installed");
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "python3 failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn random_bytes(rng: &mut StdRng) -> Vec<u8> {
    let len = match rng.gen_range(0..10) {
        0 => rng.gen_range(0..4),
        1..=6 => rng.gen_range(0..200),
        _ => rng.gen_range(70..400),
    };
    const SPECIAL: &[u8] = b"= \t\r\n.Fromx";
    (0..len)
        .map(|_| match rng.gen_range(0..10) {
            0..=4 => rng.gen_range(b'a'..=b'z'),
            5..=7 => SPECIAL[rng.gen_range(0..SPECIAL.len())],
            _ => rng.gen(),
        })
        .collect()
}

fn random_text(rng: &mut StdRng) -> String {
    const PIECES: &[&str] = &[
        "From ",
        "From",
        " ",
        "  ",
        "\t",
        "=",
        "==",
        "\n",
        "\r\n",
        "\r",
        "ä",
        "€",
        "🙂",
        "Ω",
        ".",
        "x",
        "word",
        "CSV,\"quoted\"",
        " \n",
        "\t\n",
        "=\n",
        "\u{2028}",
        "\u{85}",
        "\u{0b}",
        "\u{0c}",
        "\0",
    ];
    let mut s = String::new();
    let n = rng.gen_range(0..60);
    for _ in 0..n {
        if rng.gen_bool(0.5) {
            let run = rng.gen_range(1..90);
            let c = rng.gen_range(b'a'..=b'z') as char;
            s.extend(std::iter::repeat_n(c, run));
        } else {
            s.push_str(PIECES[rng.gen_range(0..PIECES.len())]);
        }
    }
    s
}

fn random_subject(rng: &mut StdRng) -> String {
    const WORDS: &[&str] = &[
        "Grüße",
        "Köln",
        "Привет",
        "мир",
        "日本語",
        "🙂",
        "naïve",
        "–",
        "Ümläüte",
        "é",
    ];
    let mut s = String::new();
    if rng.gen_bool(0.1) {
        s.push(' ');
    }
    let n = rng.gen_range(0..25);
    for i in 0..n {
        if i > 0 {
            s.push_str(match rng.gen_range(0..12) {
                0 => "  ",
                1 => "\t",
                2 => " \t ",
                _ => " ",
            });
        }
        match rng.gen_range(0..10) {
            0..=4 => {
                let len = rng.gen_range(1..12);
                s.extend((0..len).map(|_| rng.gen_range(b'a'..=b'z') as char));
            }
            5 => {
                let len = rng.gen_range(40..140);
                s.extend((0..len).map(|_| rng.gen_range(b'a'..=b'z') as char));
            }
            6 => s.push_str(
                ["[CERT", "#20240502-1]", "(AS64496,", "3)", "x/y:"][rng.gen_range(0..5)],
            ),
            _ => s.push_str(WORDS[rng.gen_range(0..WORDS.len())]),
        }
    }
    if rng.gen_bool(0.1) {
        s.push(' ');
    }
    s
}

#[test]
fn quoted_printable_and_subjects_agree_with_python_on_random_input() {
    let mut rng = StdRng::seed_from_u64(0x6d61_696c_6765_6e64);
    let qp: Vec<(Vec<u8>, usize)> = (0..400)
        .map(|i| {
            (
                random_bytes(&mut rng),
                if i % 4 == 0 { rng.gen_range(4..80) } else { 78 },
            )
        })
        .collect();
    let text: Vec<String> = (0..300).map(|_| random_text(&mut rng)).collect();
    let subject: Vec<String> = (0..400).map(|_| random_subject(&mut rng)).collect();
    let req = serde_json::json!({"qp": qp, "text": text, "subject": subject});
    let out: Value =
        serde_json::from_slice(&python(PYTHON_CHECK, req.to_string().as_bytes())).unwrap();

    let mut failures = Vec::new();
    for ((input, n), want) in qp.iter().zip(out["qp"].as_array().unwrap()) {
        let got = qp_body_encode(input, *n);
        if got != want.as_str().unwrap() {
            failures.push(format!("qp {input:?} @{n}\n ours {got:?}\n py   {want}"));
        }
    }
    for (input, want) in text.iter().zip(out["text"].as_array().unwrap()) {
        let got = encode_text_qp(input);
        if got != want.as_str().unwrap() {
            failures.push(format!("text {input:?}\n ours {got:?}\n py   {want}"));
        }
    }
    for (input, want) in subject.iter().zip(out["subject"].as_array().unwrap()) {
        let got = subject_header(input);
        if got != want.as_str().unwrap() {
            failures.push(format!("subject {input:?}\n ours {got:?}\n py   {want}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches, first ones:\n{}",
        failures.len(),
        failures
            .iter()
            .take(5)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

// ---------------------------------------------------------------------------
// Untrusted data must not reach the header structure
// ---------------------------------------------------------------------------

/// Checks the wire form and returns the top-level header fields
/// (unfolded, in order).
fn wire_headers(mail: &BuiltMail) -> Vec<(String, String)> {
    let b = &mail.bytes;
    for (i, &c) in b.iter().enumerate() {
        match c {
            b'\r' => assert_eq!(b.get(i + 1), Some(&b'\n'), "bare CR at {i}"),
            b'\n' => assert!(i > 0 && b[i - 1] == b'\r', "bare LF at {i}"),
            0 => panic!("NUL at {i}"),
            _ => {}
        }
    }
    for line in b.split(|&c| c == b'\n') {
        assert!(line.len() <= 999, "line over 998 octets");
    }
    if !mail.smtputf8 {
        assert!(b.is_ascii(), "8-bit data without SMTPUTF8");
    }
    let text = String::from_utf8(b.clone()).unwrap();
    let (head, _) = text.split_once("\r\n\r\n").unwrap();
    let mut fields: Vec<(String, String)> = Vec::new();
    for line in head.split("\r\n") {
        if line.starts_with([' ', '\t']) {
            let last = fields.last_mut().expect("continuation without header");
            last.1.push_str(line);
        } else {
            let (name, value) = line.split_once(':').expect("header line without colon");
            assert!(
                !name.is_empty() && name.bytes().all(|c| (33..=126).contains(&c)),
                "bad header name {name:?}"
            );
            fields.push((name.to_string(), value.to_string()));
        }
    }
    fields
}

fn names(fields: &[(String, String)]) -> Vec<&str> {
    fields.iter().map(|(n, _)| n.as_str()).collect()
}

const PYTHON_PARSE: &str = r#"
import json, sys, email
from email import policy
msg = email.message_from_bytes(sys.stdin.buffer.read(), policy=policy.default)
def fix(s):
    # 8-bit header bytes arrive surrogate-escaped; show them as UTF-8.
    return s.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
parts = []
for p in msg.walk():
    if p.get_content_maintype() == "multipart":
        continue
    parts.append({"type": p.get_content_type(), "content": p.get_content() if p.get_content_maintype() == "text" else None})
json.dump({
    "headers": [[k, fix(str(v))] for k, v in msg.items()],
    "subject": fix(str(msg["subject"])),
    "subject_defects": [str(d) for d in msg["subject"].defects],
    "to": [fix(str(a.addr_spec)) for a in msg["to"].addresses],
    "parts": parts,
}, sys.stdout)
"#;

fn python_parse(mail: &BuiltMail) -> Value {
    serde_json::from_slice(&python(PYTHON_PARSE, &mail.bytes)).unwrap()
}

const EXPECTED_SINGLE: &[&str] = &[
    "Content-Type",
    "Content-Transfer-Encoding",
    "MIME-Version",
    "From",
    "To",
    "Subject",
    "Date",
    "Message-Id",
];

#[test]
fn hostile_subjects_stay_one_subject() {
    let long_word = "A".repeat(5000);
    let long_text = "Grüße ".repeat(1000);
    let hostile = [
        "Hello\r\nBcc: victim@example.org",
        "Hello\nBcc: victim@example.org",
        "Hello\rBcc: victim@example.org",
        "Hello\r\n\r\nbody injection",
        "NUL\0byte and\x01controls\x7f\u{9b}",
        "line\u{2028}separator\u{2029}para\u{85}nel\x0bvt\x0cff",
        "=?utf-8?b?QmNjOiB2aWN0aW1AZXhhbXBsZS5vcmc=?=",
        "Re: =?utf-8?q?=0D=0ABcc:_victim@example.org?= and more",
        "Grüße\r\nX-Injected: ü",
        long_word.as_str(),
        long_text.as_str(),
        "\r\n",
        " \t ",
    ];
    for subject in hostile {
        let n = notification(subject, "body\n");
        let mail = build(&n, &ctx(), None, Utc::now()).unwrap();
        let fields = wire_headers(&mail);
        assert_eq!(names(&fields), EXPECTED_SINGLE, "subject {subject:?}");
        let parsed = python_parse(&mail);
        let got = parsed["subject"].as_str().unwrap();
        assert!(
            !got.contains(['\r', '\n', '\0', '\u{2028}', '\u{2029}', '\u{85}']),
            "{subject:?} -> {got:?}"
        );
        assert_eq!(
            parsed["headers"].as_array().unwrap().len(),
            EXPECTED_SINGLE.len(),
            "python sees other headers for {subject:?}"
        );
        assert!(
            parsed["subject_defects"].as_array().unwrap().is_empty(),
            "python finds defects in the subject for {subject:?}: {}",
            parsed["subject_defects"]
        );
        if subject.starts_with("=?") || subject.starts_with("Re: =?") {
            // Shown literally, not decoded.
            assert_eq!(got, subject, "encoded-word look-alike was decoded");
        }
    }
}

#[test]
fn subject_cleaning_is_what_python_reads_back() {
    let n = notification("a\r\nb\rc\nd\u{2028}e\0f\tg  h", "x\n");
    let mail = build(&n, &ctx(), None, now()).unwrap();
    assert_eq!(python_parse(&mail)["subject"], "a b c d e f\tg  h");
    let long = "ä".repeat(3000);
    let mail = build(&notification(&long, "x\n"), &ctx(), None, now()).unwrap();
    let got = python_parse(&mail)["subject"].as_str().unwrap().to_string();
    assert_eq!(got.chars().count(), 901);
    assert!(got.ends_with('…'));
}

#[test]
fn hostile_recipients_are_refused() {
    let cases: &[(&str, AddressError)] = &[
        (
            "a@example.org\r\nBcc: b@example.org",
            AddressError::LineBreak,
        ),
        ("a@example.org\nBcc: b@example.org", AddressError::LineBreak),
        ("a@example.org\u{2028}", AddressError::LineBreak),
        ("a@exa\0mple.org", AddressError::ControlCharacter),
        ("a@example.org\u{202e}", AddressError::ControlCharacter),
        ("a@example.org, b@example.org", AddressError::List),
        ("a@example.org; b@example.org", AddressError::List),
        ("<a@example.org>, <b@example.org>", AddressError::List),
        ("undisclosed: a@example.org;", AddressError::Group),
        ("a@example.org (comment)", AddressError::Comment),
        ("a@example.org NOTIFY=NEVER", AddressError::TrailingText),
        ("<a@example.org> NOTIFY=NEVER", AddressError::TrailingText),
        ("john doe@example.org", AddressError::Whitespace),
        ("\"john doe\"@example.org", AddressError::QuotedLocalPart),
        ("", AddressError::Empty),
        ("<>", AddressError::Empty),
        ("   ", AddressError::Empty),
        ("root", AddressError::NoDomain),
        ("root@", AddressError::NoDomain),
        (
            "user@localhost",
            AddressError::Localhost("localhost".into()),
        ),
        (
            "user@mail.LOCALHOST",
            AddressError::Localhost("mail.LOCALHOST".into()),
        ),
        ("user@mailhost", AddressError::BareHost("mailhost".into())),
        ("user@[192.0.2.1]", AddressError::AddressLiteral),
        (
            "a@b@example.org",
            AddressError::Malformed("more than one `@`"),
        ),
        (
            "<@relay.example:a@example.org>",
            AddressError::Malformed("source routes are not accepted"),
        ),
        ("<a@example.org", AddressError::Malformed("missing `>`")),
        ("a@example.org>", AddressError::Malformed("unbalanced `>`")),
        ("@example.org", AddressError::InvalidLocalPart),
        (".a@example.org", AddressError::InvalidLocalPart),
        ("a..b@example.org", AddressError::InvalidLocalPart),
        ("a\\b@example.org", AddressError::InvalidLocalPart),
    ];
    for (input, want) in cases {
        assert_eq!(
            parse_recipient(input).as_ref().err(),
            Some(want),
            "{input:?}"
        );
    }
    // The display-name trick of the old tool: `evil@x <a@y>`.
    assert!(matches!(
        parse_recipient("evil@example.com <a@example.org>"),
        Err(AddressError::Malformed(_))
    ));
    // Length limits.
    let local = "l".repeat(65);
    assert_eq!(
        parse_recipient(&format!("{local}@example.org")),
        Err(AddressError::LocalPartTooLong)
    );
    let long_domain = format!("{}.example.org", vec!["d".repeat(60); 5].join("."));
    assert!(matches!(
        parse_recipient(&format!("a@{long_domain}")),
        Err(AddressError::TooLong(_))
    ));
    for bad in [
        "a@example.123",
        "a@192.0.2.1",
        "a@-example.org",
        "a@example-.org",
        "a@exa_mple.org",
        "a@example..org",
        "a@example.org.",
        "a@.example.org",
        "a@例え。jp",
        &format!("a@{}.org", "x".repeat(64)),
    ] {
        assert!(
            matches!(parse_recipient(bad), Err(AddressError::InvalidDomain(..))),
            "{bad:?}: {:?}",
            parse_recipient(bad)
        );
    }
}

#[test]
fn good_recipients_are_accepted() {
    let r = parse_recipient("abuse@isp.example.net").unwrap();
    assert_eq!(r.address(), "abuse@isp.example.net");
    assert_eq!((r.local_part(), r.domain()), ("abuse", "isp.example.net"));
    assert!(!r.needs_smtputf8());
    let r = parse_recipient("  CERT Team <cert+notify@sub.example.org>  ").unwrap();
    assert_eq!(r.address(), "cert+notify@sub.example.org");
    assert_eq!(r.display_name(), Some("CERT Team"));
    let r = parse_recipient("\"Doe, John (NOC)\" <noc@example.org>").unwrap();
    assert_eq!(r.address(), "noc@example.org");
    let r = parse_recipient("John Q. Public <j.q.public@example.org>").unwrap();
    assert_eq!(r.address(), "j.q.public@example.org");
    let r = parse_recipient("o'brien!#$%&*+/=?^_`{|}~-@xn--mller-kva.example").unwrap();
    assert!(!r.needs_smtputf8());
    let r = parse_recipient("jürgen@müller.example").unwrap();
    assert!(r.needs_smtputf8());
    assert_eq!(r.domain(), "müller.example");
}

#[test]
fn recipient_errors_reach_the_builder() {
    let mut n = notification("s", "b\n");
    n.recipient = "a@example.org\r\nBcc: b@example.org".into();
    assert!(matches!(
        build(&n, &ctx(), None, now()),
        Err(MailError::Recipient {
            source: AddressError::LineBreak,
            ..
        })
    ));
    let mut n = notification("s", "b\n");
    n.envelope_to = Some(vec![
        "copy@example.org".into(),
        "x@example.org\nRCPT TO:<evil@example.com>".into(),
    ]);
    assert!(matches!(
        build(&n, &ctx(), None, now()),
        Err(MailError::EnvelopeRecipient {
            source: AddressError::LineBreak,
            ..
        })
    ));
    n.envelope_to = Some(vec![]);
    assert!(matches!(
        build(&n, &ctx(), None, now()),
        Err(MailError::NoEnvelopeRecipients)
    ));
}

#[test]
fn envelope_and_to_header_come_from_the_parsed_addresses() {
    let mut n = notification("s", "b\n");
    n.recipient = "Some Name <abuse@isp.example.net>".into();
    n.envelope_to = Some(vec![
        "copy1@example.org".into(),
        " <copy2@example.org> ".into(),
    ]);
    let mail = build(&n, &ctx(), None, now()).unwrap();
    let fields = wire_headers(&mail);
    assert_eq!(
        fields.iter().find(|(n, _)| n == "To").unwrap().1,
        " abuse@isp.example.net"
    );
    assert_eq!(mail.envelope_to, ["copy1@example.org", "copy2@example.org"]);
    assert_eq!(mail.envelope_from, "cert@cert.example.org");
    assert!(!mail.smtputf8);

    let mut n = notification("s", "b\n");
    n.recipient = "jürgen@müller.example".into();
    let mail = build(&n, &ctx(), None, now()).unwrap();
    assert!(mail.smtputf8);
    let fields = wire_headers(&mail);
    assert_eq!(names(&fields), EXPECTED_SINGLE);
    assert_eq!(python_parse(&mail)["to"][0], "jürgen@müller.example");
}

#[test]
fn body_and_attachment_content_cannot_add_headers() {
    let evil = "first\r\nBcc: victim@example.org\r\n\r\n--===============0000000000000000000==\r\n\
                Content-Type: text/html\r\n\r\n<b>x</b>\nFrom evil\n.\n\0\u{2028}end";
    let mut n = notification("Report", evil);
    n.attachments = vec![csv(evil)];
    for signed in [false, true] {
        let signer = Placeholder::default();
        let mail = build_with_signer(
            &n,
            &ctx(),
            signed.then_some(&signer as &dyn DetachedSigner),
            now(),
            None,
        )
        .unwrap();
        let fields = wire_headers(&mail);
        assert_eq!(
            names(&fields),
            [
                "MIME-Version",
                "Content-Type",
                "From",
                "To",
                "Subject",
                "Date",
                "Message-Id"
            ]
        );
        let parsed = python_parse(&mail);
        let parts = parsed["parts"].as_array().unwrap();
        let types: Vec<&str> = parts.iter().map(|p| p["type"].as_str().unwrap()).collect();
        let want: &[&str] = if signed {
            &["text/plain", "text/csv", "application/pgp-signature"]
        } else {
            &["text/plain", "text/csv"]
        };
        assert_eq!(types, want);
        // The text decodes to the input with normalised line ends (CRLF on
        // the wire).
        let normalised = evil.replace("\r\n", "\n").replace('\r', "\n") + "\n";
        for part in &parts[..2] {
            let content = part["content"].as_str().unwrap().replace("\r\n", "\n");
            assert_eq!(content, normalised);
        }
    }
}

#[test]
fn extra_headers_are_checked_and_placed_after_message_id() {
    let mut n = notification("s", "b\n");
    n.extra_headers = vec![
        ("Auto-Submitted".into(), "auto-generated".into()),
        ("X-ARF".into(), "PLAIN".into()),
    ];
    let mail = build(&n, &ctx(), None, now()).unwrap();
    let fields = wire_headers(&mail);
    assert_eq!(
        &names(&fields)[EXPECTED_SINGLE.len()..],
        ["Auto-Submitted", "X-ARF"]
    );
    for (name, value) in [
        ("Bcc", "x@example.org"),
        ("To", "x@example.org"),
        ("content-type", "text/html"),
        ("Message-ID", "<x@y>"),
        ("MIME-Version", "1.0"),
        ("X-Bad Name", "v"),
        ("X-Bad:Name", "v"),
        ("", "v"),
        ("X-Ok", "line\r\nBcc: x@example.org"),
        ("X-Ok", "nul\0"),
        ("X-Ok", "ls\u{2028}"),
    ] {
        let mut n = notification("s", "b\n");
        n.extra_headers = vec![(name.into(), value.into())];
        assert!(
            matches!(
                build(&n, &ctx(), None, now()),
                Err(MailError::ExtraHeader { .. })
            ),
            "{name:?}: {value:?} accepted"
        );
    }
}

#[test]
fn attachment_names_are_checked() {
    for (subtype, filename) in [
        ("csv", "a\"b.csv"),
        ("csv", "a\r\nb.csv"),
        ("csv", ""),
        ("csv", "../etc/passwd"),
        ("csv;x=y", "events.csv"),
        ("csv", "ü.csv"),
    ] {
        let mut n = notification("s", "b\n");
        n.attachments = vec![Attachment {
            subtype: subtype.into(),
            filename: filename.into(),
            disposition_attachment: true,
            content: "x".into(),
        }];
        assert!(
            matches!(
                build(&n, &ctx(), None, now()),
                Err(MailError::Attachment { .. })
            ),
            "{subtype:?} {filename:?}"
        );
    }
}

#[test]
fn date_and_message_id() {
    let t =
        Utc.with_ymd_and_hms(2024, 5, 2, 8, 11, 12).unwrap() + chrono::Duration::milliseconds(730);
    let n = notification("s", "b\n");
    let mail = build(&n, &ctx(), None, t).unwrap();
    // The recorded time is the Date header's (whole seconds).
    assert_eq!(
        mail.date,
        Utc.with_ymd_and_hms(2024, 5, 2, 8, 11, 12).unwrap()
    );
    let fields = wire_headers(&mail);
    let date = fields.iter().find(|(n, _)| n == "Date").unwrap().1.trim();
    assert_eq!(DateTime::parse_from_rfc2822(date).unwrap(), mail.date);
    let id = fields
        .iter()
        .find(|(n, _)| n == "Message-Id")
        .unwrap()
        .1
        .trim();
    assert_eq!(id, mail.message_id);
    assert!(
        id.starts_with("<171463747273.") && id.ends_with("@cert.example.org>"),
        "{id}"
    );
    // Two mails, two ids; a re-send keeps the id.
    let other = build(&n, &ctx(), None, t).unwrap();
    assert_ne!(other.message_id, mail.message_id);
    let again = build_with_id(&n, &ctx(), None, Utc::now(), Some(&mail.message_id)).unwrap();
    assert_eq!(again.message_id, mail.message_id);
    let bare = mail.message_id.trim_matches(['<', '>']);
    let again = build_with_id(&n, &ctx(), None, Utc::now(), Some(bare)).unwrap();
    assert_eq!(again.message_id, mail.message_id);
    assert!(matches!(
        build_with_id(&n, &ctx(), None, t, Some("<x@y>\r\nBcc: z@example.org")),
        Err(MailError::MessageId(_))
    ));
}

#[test]
fn sender_with_display_name() {
    let n = notification("s", "b\n");
    let c = MailContext::from_sender("CERT Example <cert@cert.example.org>").unwrap();
    assert_eq!(c.sender_address, "cert@cert.example.org");
    assert_eq!(c.sender_domain, "cert.example.org");
    let mail = build(&n, &c, None, now()).unwrap();
    let fields = wire_headers(&mail);
    assert_eq!(
        fields[3],
        (
            "From".into(),
            " CERT Example <cert@cert.example.org>".into()
        )
    );
    assert_eq!(mail.envelope_from, "cert@cert.example.org");

    let c = MailContext::from_sender("CERT Bürger <cert@cert.example.org>").unwrap();
    let mail = build(&n, &c, None, now()).unwrap();
    assert!(!mail.smtputf8 && mail.bytes.is_ascii());
    let parsed = python_parse(&mail);
    let from = parsed["headers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h[0] == "From")
        .unwrap()[1]
        .clone();
    assert_eq!(from, "CERT Bürger <cert@cert.example.org>");

    assert!(MailContext::from_sender("cert@example.org\r\nBcc: x@example.org").is_err());
    let bad = MailContext {
        sender: "a@example.org".into(),
        sender_address: "a@example.org".into(),
        sender_domain: "example.org>\r\nX: y".into(),
        verp: None,
    };
    assert!(matches!(
        build(&n, &bad, None, now()),
        Err(MailError::Sender { .. })
    ));
}
