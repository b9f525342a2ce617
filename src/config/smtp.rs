//! Section `smtp`: the relay the notifier sends through (the settings
//! type is shared with the router, `shared::smtp`).

use std::path::PathBuf;
use std::time::Duration;

use super::reader::Reader;
use crate::shared::smtp::{SmtpConfig, SmtpTls};

/// Reads `smtp`: the relay's settings and `smtp.max_message_size`.
pub(super) fn read(r: &mut Reader) -> (SmtpConfig, Option<usize>) {
    r.section(
        "smtp",
        &[
            "host",
            "port",
            "tls",
            "ca_file",
            "username",
            "password",
            "password_file",
            "timeout",
            "max_message_size",
        ],
    );
    let tls = match r.string("smtp.tls") {
        None => SmtpTls::None,
        Some(other) => SmtpTls::parse(&other).unwrap_or_else(|| {
            r.problem(
                "smtp.tls",
                format!(
                    "unknown value {other:?}; use \"none\", \"starttls\", \
                     \"opportunistic\" or \"tls\""
                ),
            );
            SmtpTls::None
        }),
    };
    let ca_file = r.string("smtp.ca_file").map(PathBuf::from);
    if let Some(p) = &ca_file {
        if !p.is_file() {
            r.problem(
                "smtp.ca_file",
                format!("{} is not a readable file", p.display()),
            );
        }
    }
    let username = r.string("smtp.username").filter(|s| !s.is_empty());
    let mut password = r.string("smtp.password");
    if let Some(pf) = r.string("smtp.password_file") {
        match std::fs::read_to_string(&pf) {
            Ok(s) => password = Some(s.trim_end_matches(['\r', '\n']).to_string()),
            Err(e) => r.problem("smtp.password_file", format!("cannot read {pf}: {e}")),
        }
    }
    if username.is_some() != password.is_some() {
        r.problem(
            "smtp.username",
            "SMTP AUTH needs both smtp.username and smtp.password (or smtp.password_file)",
        );
    }
    let smtp = SmtpConfig {
        host: r
            .string("smtp.host")
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".into()),
        port: r.integer("smtp.port", 1, 65535).unwrap_or(25) as u16,
        tls,
        ca_file,
        username,
        password,
        timeout: Duration::from_secs(r.integer("smtp.timeout", 1, 3600).unwrap_or(60) as u64),
    };
    // Below ~10 KB not even a small notification fits.
    let max_message_size = r
        .integer("smtp.max_message_size", 10_000, i64::MAX)
        .map(|n| n as usize);
    (smtp, max_message_size)
}
