//! `mailgend bounces` and `mailgend status --bounces`: the bounces
//! `mailgend route` recorded for VERP addresses (`mailgend.bounce`), with
//! their tickets, newest first.

use std::fmt::Write as _;

use chrono::{DateTime, NaiveDate, Utc};
use tokio_postgres::Client;

use crate::notify::bounce::store;
use crate::shared::duration::parse_duration;

/// What `mailgend bounces` was asked for.
#[derive(Debug, Clone, Default)]
pub struct BouncesOptions {
    /// `--since`: a duration back from now (`7d`, `12h`) or a date
    /// (`2026-12-01`, or RFC 3339).
    pub since: Option<String>,
    /// `--recipient`: only this address (case-insensitive).
    pub recipient: Option<String>,
    pub json: bool,
    /// At most this many rows.
    pub limit: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum BouncesError {
    #[error("--since {0:?}: neither a duration (7d, 12h, 90m) nor a date (2026-12-01, RFC 3339)")]
    Since(String),
    #[error("database: {}", crate::notify::db::describe(.0))]
    Db(#[from] tokio_postgres::Error),
}

/// `--since`'s value as a point in time.
pub fn since(value: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, BouncesError> {
    let v = value.trim();
    if let Some(d) = parse_duration(v) {
        return Ok(now - d);
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(v) {
        return Ok(t.with_timezone(&Utc));
    }
    if let Ok(d) = NaiveDate::parse_from_str(v, "%Y-%m-%d") {
        return Ok(d.and_hms_opt(0, 0, 0).expect("midnight").and_utc());
    }
    Err(BouncesError::Since(value.to_string()))
}

/// The listing, as text or JSON.
pub async fn list(client: &Client, o: &BouncesOptions) -> Result<String, BouncesError> {
    let now = Utc::now();
    let since = o.since.as_deref().map(|s| since(s, now)).transpose()?;
    let rows = store::list(client, since, o.recipient.as_deref(), o.limit).await?;
    if o.json {
        let doc = serde_json::json!({ "bounces": rows });
        return Ok(format!(
            "{}\n",
            serde_json::to_string_pretty(&doc).expect("plain values")
        ));
    }
    Ok(table(&rows))
}

fn table(rows: &[store::Bounce]) -> String {
    let mut out = String::new();
    if rows.is_empty() {
        out.push_str("no bounces\n");
        return out;
    }
    let _ = writeln!(
        out,
        "{:<20} {:<9} {:<6} {:<17} {:<32} diagnostic",
        "received (UTC)", "class", "status", "ticket", "recipient"
    );
    for b in rows {
        let diag: String = b
            .diagnostic
            .as_deref()
            .unwrap_or("")
            .chars()
            .take(80)
            .collect();
        let _ = writeln!(
            out,
            "{:<20} {:<9} {:<6} {:<17} {:<32} {}",
            b.received_at.format("%Y-%m-%d %H:%M:%S"),
            b.class,
            b.status,
            b.ticket,
            b.recipient.as_deref().unwrap_or("-"),
            diag
        );
    }
    out
}

/// The `status --bounces` section: counts by class over a day, a week and
/// 30 days, and the ten newest.
pub async fn status_section(client: &Client) -> Result<String, BouncesError> {
    let now = Utc::now();
    let mut out = String::new();
    // Aligned with the rest of `mailgend status` (20 columns).
    for (label, days) in [("24 h", 1), ("7 days", 7), ("30 days", 30)] {
        let (p, t) = store::counts(client, now - chrono::Duration::days(days)).await?;
        let label = format!("bounces {label}");
        let _ = writeln!(out, "{label:<20}{p} permanent, {t} temporary");
    }
    let rows = store::list(client, None, None, 10).await?;
    if !rows.is_empty() {
        out.push_str("latest bounces:\n");
        for line in table(&rows).lines() {
            let _ = writeln!(out, "  {line}");
        }
    }
    Ok(out)
}

/// `mailgend bounces`.
pub async fn run(
    source: &crate::config::ConfigSource,
    verbose: u8,
    o: &BouncesOptions,
) -> Result<std::process::ExitCode, super::command::CommandError> {
    let config = super::command::load_config(source, verbose)?;
    let client = crate::notify::db::connect(&config.database).await?;
    print!("{}", list(&client, o).await?);
    Ok(std::process::ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_durations_and_dates() {
        let now = DateTime::parse_from_rfc3339("2026-12-03T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(since("7d", now).unwrap(), now - chrono::Duration::days(7));
        assert_eq!(
            since("2026-12-01", now).unwrap().to_rfc3339(),
            "2026-12-01T00:00:00+00:00"
        );
        assert_eq!(
            since("2026-12-01T10:00:00+01:00", now)
                .unwrap()
                .to_rfc3339(),
            "2026-12-01T09:00:00+00:00"
        );
        assert!(since("last week", now).is_err());
    }
}
