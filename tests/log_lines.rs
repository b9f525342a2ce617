//! One line per log event, whatever the data says (issue: log forgery from
//! data). Event data is hostile: a recipient, template name, aggregate
//! value or format name with a line break must not write a line of its own
//! into the plain-text log that operators grep for ERROR, and CR or ESC
//! must not rewrite a line on a terminal. The real binary runs
//! `send --all` on a real database; every line it prints must be a log
//! line it started (timestamp, level) or its summary line.

mod common;

use std::process::Command;

use common::*;
use serde_json::json;

/// Short: the directive columns are varchar(100).
const FORGED: &str = "2026-12-03T00:00:00.000Z  INFO mailgend: 11 mails sent";

#[tokio::test]
async fn hostile_values_never_start_a_log_line() {
    let env = TestEnv::new().await;
    let cases = [
        // recipient_address: refused by the parser, logged with the group.
        json!({"recipient_address": format!("evil@example.org\n{FORGED}")}),
        // template_name: no such file; the error names it.
        json!({"template_name": format!("shadowserver_csv_Open-Redis\r\n{FORGED}\x1b[2K")}),
        // An aggregate value and a format name.
        json!({"aggregate_identifier": {"source.asn": format!("64496\u{2028}{FORGED}"),
                                        "time.observation": "2024-05-01T06:00:00+00:00"}}),
        json!({"notification_format": format!("shadowserver\u{85}{FORGED}")}),
    ];
    for (i, change) in cases.iter().enumerate() {
        let mut d = directive("abuse@as64496.example.net", "Open-Redis", 64496);
        for (k, v) in change.as_object().unwrap() {
            d[k] = v.clone();
        }
        env.insert_event(
            event_fields(&format!("192.0.2.{}", i + 1), 64496),
            json!([d]),
        )
        .await;
    }
    // A good group too, so the run has a real INFO line and summary.
    env.insert_event(
        event_fields("192.0.2.99", 64497),
        json!([directive("abuse@as64497.example.net", "Open-Redis", 64497)]),
    )
    .await;
    env.age_directives(6 * 3600).await;

    let out = Command::new(env!("CARGO_BIN_EXE_mailgend"))
        .arg("-c")
        .arg(env.config_file())
        .args(["-v", "send", "--all"])
        .env("HOME", env.dir.path())
        .env_remove("MAILGEND_LOG")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let log_line = regex::Regex::new(
        r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z +(ERROR|WARN|INFO|DEBUG|TRACE) mailgend",
    )
    .unwrap();
    let summary = regex::Regex::new(r"^\d+ mails? sent, \d+ postponed, \d+ errors?\.$").unwrap();
    for line in stderr.lines() {
        assert!(
            log_line.is_match(line),
            "a line the program did not start:\n{line:?}\n--- all:\n{stderr}"
        );
    }
    for line in stdout.lines() {
        assert!(summary.is_match(line), "stdout: {line:?}");
    }
    let all = stdout.clone() + &stderr;
    assert!(
        !all.contains('\r')
            && !all.contains('\x1b')
            && !all.contains('\u{2028}')
            && !all.contains('\u{85}'),
        "raw control characters in:\n{all:?}"
    );
    // The errors are there, with the hostile text visibly escaped.
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("ERROR") && l.contains("evil@example.org\\n2026-12-03")),
        "{stderr}"
    );
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("ERROR") && l.contains("Open-Redis\\r\\n2026-12-03")),
        "{stderr}"
    );
    assert!(stdout.contains("errors."), "{stdout}");
}
