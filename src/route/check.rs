//! Checking rules before they go live (`mailgend route --check`,
//! `--explain`, `--test`): mail2alert's missing "way to check rules before
//! loading them" and its `selftest`.

use std::fmt::Write;
use std::path::Path;
use std::sync::Arc;

use crate::route::config::{self, ManagerSettings, RouteConfig, RouteConfigError, Wanted};
use crate::route::router::Router;
use crate::route::{Envelope, Inbound};

/// Loads and validates `path`; a summary of what was loaded, after a
/// `WARN` line per oddity. `strict` refuses the oddities.
pub fn check(path: &Path, strict: bool) -> Result<String, RouteConfigError> {
    let cfg = config::load(path)?;
    if strict {
        cfg.strict()?;
    }
    let mut out = String::new();
    for w in cfg.warnings.iter().chain(&cfg.exposed_secrets) {
        let _ = writeln!(out, "WARN {w}");
    }
    out.push_str(&summary(&cfg));
    // `bounces-config` is read as `route` would read it (route::verp).
    if let Some(p) = &cfg.server.bounces_config {
        match crate::route::verp::BounceIntake::load(p, None) {
            Ok(intake) => {
                let (local, domain) = intake.base().rsplit_once('@').map_or_else(
                    || (intake.base(), String::new()),
                    |(l, d)| (l.to_string(), d.to_string()),
                );
                let _ = writeln!(
                    out,
                    "bounces: mail to {local}+<ticket>-<mac>@{domain} is recorded in the \
                     database of {}",
                    p.display()
                );
            }
            Err(e) => {
                return Err(RouteConfigError(vec![config::RouteConfigProblem {
                    file: cfg.path.display().to_string(),
                    line: None,
                    key: "mailgend.bounces-config".into(),
                    reason: e.to_string(),
                }]))
            }
        }
    }
    Ok(out)
}

/// What a loaded configuration does, in words.
pub fn summary(cfg: &RouteConfig) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{}: OK", cfg.path.display());
    let _ = writeln!(out, "listen on {} (local-smtp)", cfg.local_smtp);
    let r = &cfg.remote_smtp;
    let _ = writeln!(
        out,
        "send to {}:{} (remote-smtp, tls {:?}{})",
        r.host,
        r.port,
        r.tls,
        if r.username.is_some() { ", AUTH" } else { "" }
    );
    match &cfg.slack {
        Some(s) => {
            let _ = writeln!(out, "Slack via {}", s.url);
        }
        None => {
            let _ = writeln!(out, "Slack not configured");
        }
    }
    let s = &cfg.server;
    let _ = writeln!(
        out,
        "spool {}; max {} bytes, {} connections, {} recipients; STARTTLS {}; AUTH {}",
        s.spool_dir.display(),
        s.max_message_size,
        s.max_connections,
        s.max_recipients,
        if s.tls.is_some() { "on" } else { "off" },
        if s.auth.is_some() { "required" } else { "off" },
    );
    let _ = writeln!(
        out,
        "metrics {}",
        match &s.metrics_listen {
            Some(a) => format!("on http://{a}/metrics"),
            None => "off".into(),
        }
    );
    let _ = writeln!(out, "{} manager(s), first match wins:", cfg.managers.len());
    for (i, m) in cfg.managers.iter().enumerate() {
        let wanted = match &m.wanted {
            Wanted::To(a) => format!("mail to {a}"),
            Wanted::From(a) => format!("mail from {a}"),
        };
        let _ = writeln!(out, "  [{i}] {} (line {}): {wanted}", m.name, m.line);
        if let ManagerSettings::Gocd(g) = &m.settings {
            let _ = writeln!(
                out,
                "      GoCD {} as {}, refresh every {:?}",
                g.url,
                g.user.as_deref().unwrap_or("(anonymous)"),
                g.refresh_interval
            );
        }
        if m.rules.is_empty() {
            let _ = writeln!(out, "      no rules: its mail is dropped");
        }
        for (j, rule) in m.rules.iter().enumerate() {
            let actions: Vec<String> = rule.actions.iter().map(|a| a.to_string()).collect();
            let _ = writeln!(
                out,
                "      rule {j} (line {}): {} -> {}",
                rule.line,
                rule.describe(),
                actions.join(", ")
            );
        }
    }
    out
}

/// Routes `eml` as if received (GoCD is asked once, within its timeout)
/// and says what would happen. Without an envelope, the From/To headers
/// stand in for it. Changes nothing: no mail is sent, no state kept.
pub async fn explain(
    cfg: &RouteConfig,
    eml: &[u8],
    mail_from: Option<&str>,
    rcpt_to: &[String],
) -> String {
    let mut out = String::new();
    let (from, to) = if rcpt_to.is_empty() {
        let (f, t) = header_envelope(eml);
        let _ = writeln!(out, "envelope taken from the From/To headers");
        (mail_from.map(str::to_string).or(f), t)
    } else {
        (mail_from.map(str::to_string), rcpt_to.to_vec())
    };
    let _ = writeln!(
        out,
        "MAIL FROM:<{}> RCPT TO:{}",
        from.as_deref().unwrap_or(""),
        to.iter()
            .map(|t| format!("<{t}>"))
            .collect::<Vec<_>>()
            .join(",")
    );
    let router = match Router::start(cfg).await {
        Ok(r) => r,
        Err(e) => return format!("{out}{e}\n"),
    };
    // Give GoCD its full timeout once, so the answer reflects its data.
    for src in router.gocd_sources() {
        src.wait_first_attempt(src.settings().timeout * 2 + std::time::Duration::from_secs(1))
            .await;
    }
    let msg = Inbound {
        envelope: Envelope {
            peer: "127.0.0.1:0".parse().expect("valid"),
            mail_from: from,
            rcpt_to: to,
        },
        data: Arc::new(eml.to_vec()),
        id: None,
    };
    let routing = router.route(&msg).await;
    router.shutdown();
    for t in &routing.trace {
        let _ = writeln!(out, "  {t}");
    }
    if routing.deliveries.is_empty() && routing.slack.is_empty() {
        let _ = writeln!(out, "result: dropped");
    }
    for d in &routing.deliveries {
        let changed = *d.data != *msg.data;
        let _ = writeln!(
            out,
            "result: mail to {} ({})",
            d.rcpt_to.join(", "),
            if changed {
                "From/To rewritten, X-Peer added"
            } else {
                "unchanged"
            }
        );
        if changed {
            for line in rewritten_fields(&d.data) {
                let _ = writeln!(out, "    {line}");
            }
        }
    }
    for p in &routing.slack {
        let _ = writeln!(
            out,
            "result: Slack post to {}: {}",
            p.channel,
            p.text.lines().next().unwrap_or("")
        );
    }
    out
}

/// The From, To and X-Peer fields of a rewritten message, as written.
fn rewritten_fields(data: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut keep = false;
    for line in data.split(|&b| b == b'\n') {
        let line = String::from_utf8_lossy(line);
        let line = line.trim_end_matches('\r');
        if line.is_empty() {
            break;
        }
        if !line.starts_with([' ', '\t']) {
            let name = line.split(':').next().unwrap_or("").to_ascii_lowercase();
            keep = matches!(name.as_str(), "from" | "to" | "x-peer");
        }
        if keep {
            out.push(line.to_string());
        }
    }
    out
}

/// The addresses in the From and To/Cc headers.
fn header_envelope(eml: &[u8]) -> (Option<String>, Vec<String>) {
    use mailparse::MailHeaderMap;
    let Ok((headers, _)) = mailparse::parse_headers(eml) else {
        return (None, Vec::new());
    };
    let addrs = |name: &str| -> Vec<String> {
        headers
            .get_all_values(name)
            .iter()
            .filter_map(|v| mailparse::addrparse(v).ok())
            .flat_map(|list| {
                list.iter()
                    .flat_map(|a| match a {
                        mailparse::MailAddr::Single(s) => vec![s.addr.clone()],
                        mailparse::MailAddr::Group(g) => {
                            g.addrs.iter().map(|s| s.addr.clone()).collect()
                        }
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let from = addrs("From").into_iter().next();
    let mut to = addrs("To");
    to.extend(addrs("Cc"));
    (from, to)
}

/// mail2alert's selftest: for every manager that can enumerate its cases
/// (GoCD: each pipeline group, pipeline and event), who would be alerted.
pub async fn selftest(cfg: &RouteConfig) -> String {
    let mut out = String::new();
    let router = match Router::start(cfg).await {
        Ok(r) => r,
        Err(e) => return format!("{e}\n"),
    };
    for (i, m) in router.managers().iter().enumerate() {
        let c = m.config();
        let _ = writeln!(out, "[{i}] {} (line {}):", c.name, c.line);
        match m.selftest().await {
            Some(report) => out.push_str(&report),
            None => {
                let _ = writeln!(out, "  nothing to enumerate; rules:");
                for (j, rule) in c.rules.iter().enumerate() {
                    let actions: Vec<String> = rule.actions.iter().map(|a| a.to_string()).collect();
                    let _ = writeln!(
                        out,
                        "    rule {j}: {} -> {}",
                        rule.describe(),
                        actions.join(", ")
                    );
                }
            }
        }
    }
    router.shutdown();
    out
}
