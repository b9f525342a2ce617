//! Section `database`: the events database's connection, libpq's
//! keywords with libpq's meaning.

use std::fmt;
use std::path::PathBuf;

use super::reader::Reader;

/// Connection parameters of the events database (`database.event`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseConfig {
    pub name: String,
    pub username: String,
    pub password: Option<String>,
    /// Host names, IP addresses, or directories holding the Unix socket,
    /// tried in order (libpq's comma-separated `host` list).
    pub hosts: Vec<String>,
    /// One port for all hosts, or one per host (libpq's `port` list).
    pub ports: Vec<u16>,
    /// libpq's `sslmode`; `None`: `PGSSLMODE`, else `prefer`.
    pub sslmode: Option<SslMode>,
    /// libpq's `sslrootcert`; `None`: `PGSSLROOTCERT`, else
    /// `~/.postgresql/root.crt` when it exists.
    pub sslrootcert: Option<RootCert>,
    /// libpq's `sslcert`/`sslkey` (client certificate and its key); `None`:
    /// `PGSSLCERT`/`PGSSLKEY`, else `~/.postgresql/postgresql.{crt,key}`.
    pub sslcert: Option<PathBuf>,
    pub sslkey: Option<PathBuf>,
    /// libpq's `target_session_attrs`; `None`: `PGTARGETSESSIONATTRS`,
    /// else `any`.
    pub target_session_attrs: Option<SessionAttrs>,
    /// Appended to the pending-directive selection with `AND` (spec §3.2).
    pub additional_directive_where: Option<String>,
}

impl DatabaseConfig {
    /// `host:port` of every host, comma-separated, for messages.
    pub fn endpoints(&self) -> String {
        self.hosts
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let port = self.ports.get(i).or(self.ports.first()).unwrap_or(&5432);
                format!("{h}:{port}")
            })
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// libpq's `sslmode` values, with libpq's meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub const NAMES: &'static [&'static str] = &[
        "disable",
        "allow",
        "prefer",
        "require",
        "verify-ca",
        "verify-full",
    ];

    pub fn parse(s: &str) -> Option<SslMode> {
        Some(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        })
    }
}

/// libpq's `sslrootcert`: a PEM file of trusted CAs, or `system` (the
/// system's trust store).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCert {
    File(PathBuf),
    System,
}

impl RootCert {
    pub fn parse(s: &str) -> RootCert {
        if s == "system" {
            RootCert::System
        } else {
            RootCert::File(PathBuf::from(s))
        }
    }
}

/// The `target_session_attrs` values tokio-postgres can check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionAttrs {
    Any,
    ReadWrite,
    ReadOnly,
}

impl SessionAttrs {
    pub const NAMES: &'static [&'static str] = &["any", "read-write", "read-only"];

    pub fn parse(s: &str) -> Option<SessionAttrs> {
        Some(match s {
            "any" => SessionAttrs::Any,
            "read-write" => SessionAttrs::ReadWrite,
            "read-only" => SessionAttrs::ReadOnly,
            _ => return None,
        })
    }
}

/// Reads `database` and `database.event`.
pub(super) fn read(r: &mut Reader) -> DatabaseConfig {
    if !r.section("database", &["event", "additional_directive_where"])
        && r.lookup("database").is_none()
    {
        r.problem("database", "missing");
    }
    r.section(
        "database.event",
        &[
            "name",
            "username",
            "password",
            "host",
            "port",
            "sslmode",
            "sslrootcert",
            "sslcert",
            "sslkey",
            "target_session_attrs",
        ],
    );
    let hosts: Vec<String> = r
        .string("database.event.host")
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
        .split(',')
        .map(|h| h.trim().to_string())
        .collect();
    if hosts.iter().any(String::is_empty) {
        r.problem("database.event.host", "an empty name in the host list");
    }
    let ports = r.ports("database.event.port", hosts.len());
    let sslmode = r.choice("database.event.sslmode", SslMode::NAMES, SslMode::parse);
    let target_session_attrs = r.choice(
        "database.event.target_session_attrs",
        SessionAttrs::NAMES,
        SessionAttrs::parse,
    );
    let sslrootcert = r
        .string("database.event.sslrootcert")
        .map(|s| RootCert::parse(&s));
    if let Some(RootCert::File(p)) = &sslrootcert {
        r.existing_file("database.event.sslrootcert", p);
    }
    let sslcert = r.string("database.event.sslcert").map(PathBuf::from);
    let sslkey = r.string("database.event.sslkey").map(PathBuf::from);
    for (key, p) in [
        ("database.event.sslcert", &sslcert),
        ("database.event.sslkey", &sslkey),
    ] {
        if let Some(p) = p {
            r.existing_file(key, p);
        }
    }
    DatabaseConfig {
        name: r.required_string("database.event.name"),
        username: r.required_string("database.event.username"),
        password: r.string("database.event.password"),
        hosts,
        ports,
        sslmode,
        sslrootcert,
        sslcert,
        sslkey,
        target_session_attrs,
        additional_directive_where: r
            .string("database.additional_directive_where")
            .filter(|s| !s.trim().is_empty()),
    }
}
