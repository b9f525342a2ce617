//! The bodies of the fuzz targets in `fuzz/` (cargo-fuzz, its own
//! workspace): one function per target, taking the fuzzer's bytes.
//!
//! They live here, not in `fuzz/fuzz_targets/`, so that the normal build
//! compiles them and the tests below run them on seeds: a target whose
//! parser moved or changed its signature breaks `cargo build`, not the
//! next fuzzing campaign months later (which is how the `recipient`
//! target rotted once). Each function panics only on a finding: a panic
//! in the parser, or a property below that does not hold.

use std::sync::OnceLock;
use std::time::Duration;

use crate::config::Config;
use crate::notify::format::FormatSet;
use crate::notify::render::template::{Part, TemplateText};
use crate::route::managers::gocd::subject as gocd_subject;
use crate::route::router::decode_subject;
use crate::route::server::{parse_command, read_data, DataRead};
use crate::shared::address::parse_recipient;

/// The router's SMTP command parser: an error's reply is one well-formed
/// reply line.
pub fn smtp_command(line: &[u8]) {
    if line.len() > 4096 {
        return;
    }
    if let Err(e) = parse_command(line) {
        let reply = e.reply();
        assert!(
            !reply.contains(['\r', '\n']),
            "a reply that ends a line: {reply:?}"
        );
        assert!(reply.len() >= 4 && reply.as_bytes()[..3].iter().all(u8::is_ascii_digit));
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a current-thread runtime")
    })
}

/// The router's DATA reader through read buffers of any size: a message
/// it keeps is within the limit, has no bare CR or LF, and was ended by
/// the end marker. First byte: the read buffer's size; second: the limit
/// in units of 64 octets.
pub fn data_reader(input: &[u8]) {
    let [cap, max, data @ ..] = input else {
        return;
    };
    let cap = usize::from(*cap).max(1);
    let max = usize::from(*max) * 64;
    let mut rd = tokio::io::BufReader::with_capacity(cap, data);
    let read = runtime()
        .block_on(read_data(&mut rd, max, Duration::from_secs(10)))
        .expect("reading a slice cannot fail");
    if let DataRead::Message(m) = read {
        assert!(m.len() <= max, "{} octets kept, limit {max}", m.len());
        for (i, &b) in m.iter().enumerate() {
            match b {
                b'\n' => assert!(i > 0 && m[i - 1] == b'\r', "bare LF kept"),
                b'\r' => assert!(m.get(i + 1) == Some(&b'\n'), "bare CR kept"),
                _ => {}
            }
        }
        assert!(data.windows(5).any(|w| w == b"\r\n.\r\n") || data.starts_with(b".\r\n"));
    }
}

struct FormatSetup {
    dir: tempfile::TempDir,
    config: Config,
}

fn format_setup() -> &'static FormatSetup {
    static S: OnceLock<FormatSetup> = OnceLock::new();
    S.get_or_init(|| {
        // /dev/shm when there is one: a write per execution.
        let dir = tempfile::Builder::new()
            .tempdir_in("/dev/shm")
            .or_else(|_| tempfile::tempdir())
            .expect("a temp dir");
        let config = Config::from_json_str(
            &serde_json::json!({
                "database": {"event": {"name": "e", "username": "u", "password": "p",
                                        "host": "localhost", "port": 5432}},
                "template_dir": dir.path(), "script_directory": dir.path(),
                "sender": "CERT <cert@example.org>",
                "smtp": {"host": "localhost", "port": 25},
                "openpgp": {"always_sign": false, "gnupg_home": "/nonexistent", "signing_key": ""}
            })
            .to_string(),
            "fuzz.conf",
        )
        .expect("the fuzz configuration is valid");
        FormatSetup { dir, config }
    })
}

/// The notifier's format files: one `10fuzz.toml` with these bytes is
/// loaded (or refused); a loaded set answers its queries.
pub fn format_file(text: &[u8]) {
    let s = format_setup();
    std::fs::write(s.dir.path().join("10fuzz.toml"), text).expect("write the format file");
    if let Ok(set) = FormatSet::load(s.dir.path(), &s.config) {
        let _ = set.rule_names();
        let _ = set.event_columns_used();
    }
}

/// The notifier's template parser, all three parts.
pub fn template(text: &str) {
    for part in [Part::Subject, Part::Body, Part::Text] {
        let _ = TemplateText::parse(text, part);
    }
}

/// The recipient-address parser (directives' `recipient_address` comes
/// from event data).
pub fn recipient(text: &str) {
    let _ = parse_recipient(text);
}

/// The router's Subject decoder and GoCD's subject parser: a parsed run
/// names a pipeline and a stage.
pub fn subject(data: &[u8]) {
    let s = decode_subject(data);
    if let Some(run) = gocd_subject::parse(&s) {
        assert!(!run.pipeline.is_empty() && !run.stage.is_empty());
        let _ = run.key();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A handful of seeds per target, valid and hostile: the fuzzer starts
    // from nothing, these keep the bodies compiling and running.

    #[test]
    fn smtp_command_seeds() {
        for s in [
            &b"MAIL FROM:<a@b.example> SIZE=10"[..],
            b"RCPT TO:<x@y>",
            b"EHLO \r\n",
            b"\xff\xfe",
            b"",
            b"DATA",
        ] {
            smtp_command(s);
        }
    }

    #[test]
    fn data_reader_seeds() {
        data_reader(b"\x04\x10Subject: x\r\n\r\nbody\r\n..dot\r\n.\r\n");
        data_reader(b"\x01\x01bare\rCR\r\n.\r\n");
        data_reader(b"\x07\x00no end marker");
        data_reader(b"");
    }

    #[test]
    fn format_file_seeds() {
        format_file(b"[format]\nname = \"x\"\n");
        format_file(b"\x00not toml [[[");
        format_file(b"");
    }

    #[test]
    fn template_seeds() {
        template("Subject: ${ticket_number}\n\nHello ${events_as_csv}");
        template("${");
        template("");
    }

    #[test]
    fn recipient_seeds() {
        recipient("abuse@example.net");
        recipient("\"x\r\nBcc: evil@example\" <a@b>");
        recipient("");
    }

    #[test]
    fn subject_seeds() {
        subject(b"Stage [pipe/12/build/1] failed");
        subject(b"=?utf-8?q?=E2=9C=93?= Stage [p/1/s/1] passed");
        subject(b"\xff");
    }
}
