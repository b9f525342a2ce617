//! The `remote-smtp` and `mailgend:` sections: where mail goes out, and
//! the inbound server's limits, TLS, AUTH and metrics endpoint.

use super::*;

pub(super) const REMOTE_KEYS: &[&str] = &[
    "host", "port", "tls", "ca-file", "username", "password", "timeout",
];
pub(super) const SERVER_KEYS: &[&str] = &[
    "spool",
    "max-message-size",
    "max-connections",
    "max-connections-per-client",
    "max-recipients",
    "max-messages-per-connection",
    "command-timeout",
    "data-timeout",
    "auth-failure-delay",
    "auth-failure-limit",
    "auth-failure-window",
    "tls-cert",
    "tls-key",
    "auth-user",
    "auth-password",
    "outbound-connections",
    "metrics-listen",
    "case-insensitive",
    "max-received",
    "bounces-config",
];

/// `host:port`, `host` (port 25) or `[v6]:port`.
/// `metrics-listen`: like `local-smtp`, but the port must be given (there
/// is no default port for a metrics endpoint).
pub(super) fn metrics_address(s: &str) -> Result<String, String> {
    let t = s.trim();
    let explicit_port = match t.strip_prefix('[') {
        Some(rest) => rest
            .split_once(']')
            .is_some_and(|(_, p)| p.starts_with(':')),
        None => t.rsplit_once(':').is_some_and(|(h, _)| !h.contains(':')),
    };
    if !explicit_port {
        return Err(format!(
            "{s:?} is not host:port (the port is required, e.g. 127.0.0.1:9470)"
        ));
    }
    host_port(t).map(|(h, p)| format!("{h}:{p}"))
}

pub(super) fn host_port(s: &str) -> Result<(String, u16), String> {
    let s = s.trim();
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("{s:?}: unclosed `[`"))?;
        (h, after.strip_prefix(':'))
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err(format!("{s:?} is not host:port"));
    }
    let port = match port {
        None => 25,
        Some(p) => match p.parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => return Err(format!("{p:?} is not a port number (1-65535)")),
        },
    };
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    Ok((host, port))
}

pub(super) fn read_remote(r: &mut Reader, n: &Node) -> Option<SmtpConfig> {
    let base = |host: String, port: u16| SmtpConfig {
        host,
        port,
        tls: SmtpTls::None,
        ca_file: None,
        username: None,
        password: None,
        timeout: Duration::from_secs(60),
    };
    if let Kind::Map(_) = n.kind {
        let m = r.map(n, "remote-smtp")?;
        r.known_keys_strict(&m, "remote-smtp", REMOTE_KEYS);
        let host = r.required_string(&m, "remote-smtp", "host");
        let port = m
            .get("port")
            .and_then(|p| r.int(p, "remote-smtp.port", 1, 65535))
            .unwrap_or(25) as u16;
        let mut cfg = base(host.clone().unwrap_or_default(), port);
        if let Some(t) = m.get("tls") {
            cfg.tls = match r.string(t, "remote-smtp.tls") {
                None => SmtpTls::None,
                Some(other) => SmtpTls::parse(&other).unwrap_or_else(|| {
                    r.problem(
                        t.line,
                        "remote-smtp.tls",
                        format!(
                            "unknown value {other:?}; use none, starttls, opportunistic or tls"
                        ),
                    );
                    SmtpTls::None
                }),
            };
        }
        if let Some(c) = m.get("ca-file") {
            cfg.ca_file = r.string(c, "remote-smtp.ca-file").map(PathBuf::from);
            if let Some(p) = &cfg.ca_file {
                if !p.is_file() {
                    r.problem(
                        c.line,
                        "remote-smtp.ca-file",
                        format!("{} is not a readable file", p.display()),
                    );
                }
            }
        }
        cfg.username = m
            .get("username")
            .and_then(|u| r.string(u, "remote-smtp.username"));
        cfg.password = m
            .get("password")
            .and_then(|u| r.secret(u, "remote-smtp.password"));
        if cfg.username.is_some() != cfg.password.is_some() {
            r.problem(
                n.line,
                "remote-smtp.username",
                "SMTP AUTH needs both username and password",
            );
        }
        if let Some(t) = m.get("timeout") {
            if let Some(s) = r.int(t, "remote-smtp.timeout", 1, 3600) {
                cfg.timeout = Duration::from_secs(s);
            }
        }
        return host.map(|_| cfg);
    }
    let s = r.string(n, "remote-smtp")?;
    match host_port(&s) {
        Ok((h, p)) => Some(base(h.trim_matches(['[', ']']).to_string(), p)),
        Err(e) => {
            r.problem(n.line, "remote-smtp", e);
            None
        }
    }
}

pub(super) fn read_server(r: &mut Reader, n: &Node) -> ServerSettings {
    let mut s = ServerSettings::default();
    let Some(m) = r.map(n, "mailgend") else {
        return s;
    };
    r.known_keys_strict(&m, "mailgend", SERVER_KEYS);
    let key = |k: &str| format!("mailgend.{k}");
    if let Some(v) = m.get("spool") {
        if let Some(p) = r.string(v, &key("spool")) {
            s.spool_dir = PathBuf::from(p);
        }
    }
    if let Some(v) = m.get("bounces-config") {
        if let Some(p) = r.string(v, &key("bounces-config")) {
            s.bounces_config = Some(PathBuf::from(p));
        }
    }
    let int = |r: &mut Reader, k: &str, min: u64, max: u64| {
        m.get(k).and_then(|v| r.int(v, &key(k), min, max))
    };
    if let Some(v) = int(r, "max-message-size", 1024, 1 << 30) {
        s.max_message_size = v as usize;
    }
    if let Some(v) = int(r, "max-connections", 1, 100_000) {
        s.max_connections = v as usize;
    }
    if let Some(v) = int(r, "max-connections-per-client", 0, 100_000) {
        s.max_connections_per_client = v as usize;
    }
    if let Some(v) = int(r, "max-recipients", 1, 100_000) {
        s.max_recipients = v as usize;
    }
    if let Some(v) = int(r, "max-messages-per-connection", 0, 100_000_000) {
        s.max_messages_per_connection = v as usize;
    }
    if let Some(v) = int(r, "max-received", 1, 1000) {
        s.max_received = v as usize;
    }
    if let Some(v) = m.get("case-insensitive") {
        match r.string(v, &key("case-insensitive")).as_deref() {
            Some("true" | "yes" | "on") => s.case_insensitive = true,
            Some("false" | "no" | "off") => s.case_insensitive = false,
            Some(other) => r.problem(
                v.line,
                &key("case-insensitive"),
                format!("{other:?} is not true or false"),
            ),
            None => {}
        }
    }
    if let Some(v) = int(r, "command-timeout", 1, 3600) {
        s.command_timeout = Duration::from_secs(v);
    }
    if let Some(v) = int(r, "data-timeout", 1, 86400) {
        s.data_timeout = Duration::from_secs(v);
    }
    let secs = |r: &mut Reader, k: &str, min: f64, max: f64| {
        m.get(k).and_then(|v| r.seconds(v, &key(k), min, max))
    };
    if let Some(v) = secs(r, "auth-failure-delay", 0.0, 60.0) {
        s.auth_failure_delay = v;
    }
    if let Some(v) = int(r, "auth-failure-limit", 1, 1_000_000) {
        s.auth_failure_limit = v as u32;
    }
    if let Some(v) = secs(r, "auth-failure-window", 1.0, 86400.0) {
        s.auth_failure_window = v;
    }
    if let Some(v) = int(r, "outbound-connections", 1, 1000) {
        s.outbound_connections = v as u32;
    }
    if let Some(v) = m.get("metrics-listen") {
        if let Some(text) = r.string(v, &key("metrics-listen")) {
            match metrics_address(&text) {
                Ok(a) => s.metrics_listen = Some(a),
                Err(e) => r.problem(v.line, &key("metrics-listen"), e),
            }
        }
    }
    let file = |r: &mut Reader, k: &str| {
        let v = m.get(k)?;
        let p = PathBuf::from(r.string(v, &key(k))?);
        if !p.is_file() {
            r.problem(
                v.line,
                &key(k),
                format!("{} is not a readable file", p.display()),
            );
        }
        Some(p)
    };
    let cert = file(r, "tls-cert");
    let tls_key = file(r, "tls-key");
    match (cert, tls_key) {
        (Some(cert_file), Some(key_file)) => {
            s.tls = Some(TlsFiles {
                cert_file,
                key_file,
            })
        }
        (None, None) => {}
        _ => r.problem(
            m.line(),
            "mailgend.tls-cert",
            "STARTTLS needs both tls-cert and tls-key",
        ),
    }
    let user = m
        .get("auth-user")
        .and_then(|v| r.string(v, &key("auth-user")));
    let password = m
        .get("auth-password")
        .and_then(|v| r.secret(v, &key("auth-password")));
    match (user, password) {
        (Some(username), Some(password)) => {
            if username.is_empty() || password.is_empty() {
                r.problem(
                    m.line(),
                    "mailgend.auth-user",
                    "auth-user and auth-password must not be empty",
                );
            }
            s.auth = Some(Credentials { username, password })
        }
        (None, None) => {}
        _ => r.problem(
            m.line(),
            "mailgend.auth-user",
            "AUTH needs both auth-user and auth-password",
        ),
    }
    s
}
