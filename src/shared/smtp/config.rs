//! The outbound SMTP relay's settings, shared by the notifier (`smtp` in
//! the JSON config) and the router (`remote_smtp` in its YAML); each
//! daemon's config reader fills them in.

use std::path::PathBuf;
use std::time::Duration;

/// How to protect the SMTP connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpTls {
    /// Plain SMTP, as intelmq-mailgen always did.
    None,
    /// STARTTLS required.
    StartTls,
    /// STARTTLS when the server offers it.
    Opportunistic,
    /// TLS from the first byte (SMTPS, usually port 465).
    Implicit,
}

impl SmtpTls {
    /// The value of `tls` in either daemon's config (`implicit` is an alias
    /// of `tls`); `None` for an unknown one.
    pub fn parse(s: &str) -> Option<SmtpTls> {
        Some(match s {
            "none" => SmtpTls::None,
            "starttls" => SmtpTls::StartTls,
            "opportunistic" => SmtpTls::Opportunistic,
            "tls" | "implicit" => SmtpTls::Implicit,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmtpConfig {
    pub host: String,
    pub port: u16,
    pub tls: SmtpTls,
    /// PEM file with the CA certificates to trust instead of the system's.
    pub ca_file: Option<PathBuf>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub timeout: Duration,
}
