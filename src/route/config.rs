//! The router's configuration: mail2alert's `configuration.yml`, plus an
//! optional `mailgend:` section for what mail2alert never had (limits,
//! TLS, AUTH, the spool). Owns locating, parsing and validating the file;
//! every problem names the file, line, key and reason.

use std::path::PathBuf;
use std::time::Duration;

use crate::config::SmtpConfig;

/// Everything `mailgend route` needs, validated.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// The file it came from (for logs and reload).
    pub path: PathBuf,
    /// `local-smtp`: where the inbound server listens (`host:port`).
    pub local_smtp: String,
    /// `remote-smtp`: where mail goes out (shared outbound code).
    pub remote_smtp: SmtpConfig,
    /// Inbound server limits and security (`mailgend:` section).
    pub server: ServerSettings,
}

/// The inbound server's settings (`mailgend:` section of the YAML file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSettings {
    /// Durable queue for mail accepted but not yet delivered.
    pub spool_dir: PathBuf,
    /// Largest message accepted (advertised as SIZE).
    pub max_message_size: usize,
    /// Concurrent inbound connections; more get a 421.
    pub max_connections: usize,
    /// Recipients per message; more get a 452.
    pub max_recipients: usize,
    /// Messages per connection before 421.
    pub max_messages_per_connection: usize,
    /// Idle time allowed between commands.
    pub command_timeout: Duration,
    /// PEM certificate chain and key: STARTTLS is offered when set.
    pub tls: Option<TlsFiles>,
    /// When set, AUTH PLAIN/LOGIN is required before MAIL.
    pub auth: Option<Credentials>,
    /// Concurrent outbound SMTP connections to `remote-smtp`.
    pub outbound_connections: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            spool_dir: PathBuf::from("/var/spool/mailgend-route"),
            max_message_size: 10 * 1024 * 1024,
            max_connections: 100,
            max_recipients: 100,
            max_messages_per_connection: 1000,
            command_timeout: Duration::from_secs(300),
            tls: None,
            auth: None,
            outbound_connections: 8,
        }
    }
}
