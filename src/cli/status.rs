//! What `mailgend status` and `mailgend in-doubt` show and do: the state of
//! the notification queue for a person, read from the database (so it works
//! on any host, whether or not a service runs there).

use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use tokio_postgres::{Client, GenericClient};

use crate::config::Config;
use crate::notify::directive::{self, DirectiveId};
use crate::notify::format::{Decision, FormatSet};
use crate::notify::outbox::{self, State};
use crate::notify::sent;

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("database: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Select(#[from] directive::SelectError),
    #[error(transparent)]
    Ticket(#[from] crate::notify::ticket::TicketError),
    #[error("no open outbox row with id {0}")]
    NoSuchRow(i64),
    #[error("outbox row {id}: {reason}")]
    Refused { id: i64, reason: String },
}

fn age(now: DateTime<Utc>, t: DateTime<Utc>) -> String {
    let secs = (now - t).num_seconds().max(0);
    match secs {
        s if s < 120 => format!("{s} s"),
        s if s < 7200 => format!("{} min", s / 60),
        s if s < 172_800 => format!("{} h", s / 3600),
        s => format!("{} days", s / 86_400),
    }
}

/// `mailgend status`: the report, or — when the database cannot be
/// reached — what is wrong, with the local service's own view from its
/// `/metrics`. The flag is false when the database was unreachable.
pub async fn status_command(config: &Config) -> (String, bool) {
    match crate::notify::db::connect(&config.database).await {
        Ok(client) => match report(&client, config).await {
            Ok(out) => (out, true),
            Err(e) => (format!("status: {e}\n"), false),
        },
        Err(e) => {
            let mut out = String::new();
            let _ = writeln!(
                out,
                "database            {} on {}: UNREACHABLE",
                config.database.name,
                config.database.endpoints()
            );
            let _ = writeln!(out, "reason              {e}");
            if let Some(line) = local_service(config).await {
                let _ = writeln!(out, "{line}");
            }
            (out, false)
        }
    }
}

/// What the `mailgend run` of this host (its `mailgend.metrics_listen`)
/// says about itself: running, and whether it has the database.
async fn local_service(config: &Config) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = config.service.metrics_listen?;
    let scrape = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await?;
        let mut body = String::new();
        s.read_to_string(&mut body).await?;
        Ok::<_, std::io::Error>(body)
    };
    let text = match tokio::time::timeout(std::time::Duration::from_secs(3), scrape).await {
        Ok(Ok(body)) => body,
        Ok(Err(e)) => {
            return Some(format!(
                "service here        no answer on http://{addr}/metrics ({e})"
            ))
        }
        Err(_) => {
            return Some(format!(
                "service here        no answer on http://{addr}/metrics (3 s)"
            ))
        }
    };
    let gauge = |name: &str| {
        text.lines().find_map(|l| {
            l.strip_prefix(name)?
                .strip_prefix(' ')?
                .trim()
                .parse::<f64>()
                .ok()
        })
    };
    let state = match (gauge("mailgend_up"), gauge("mailgend_database_up")) {
        (_, Some(d)) if d < 1.0 => "running, waiting for the database",
        (Some(u), _) if u >= 1.0 => "running, sending",
        (Some(_), _) => "starting or stopping",
        _ => "answering, but without mailgend's gauges",
    };
    Some(format!(
        "service here        {state} (http://{addr}/metrics)"
    ))
}

/// The status report: pending, due and postponed groups, open outbox rows,
/// recent sending, the next ticket, the instances connected.
pub async fn report(client: &Client, config: &Config) -> Result<String, StatusError> {
    let mut out = String::new();
    let now: DateTime<Utc> = client.query_one("SELECT now()", &[]).await?.get(0);
    let groups = directive::pending_groups(
        client,
        config.database.additional_directive_where.as_deref(),
    )
    .await?;
    let pending: usize = groups.iter().map(|g| g.directive_ids.len()).sum();
    let _ = writeln!(
        out,
        "database            {} on {}",
        config.database.name,
        config.database.endpoints()
    );
    let _ = writeln!(
        out,
        "pending directives  {pending} in {} groups",
        groups.len()
    );
    if let Some(oldest) = groups.iter().map(|g| g.inserted_at).min() {
        let _ = writeln!(out, "oldest pending      {} ago", age(now, oldest));
    }
    match FormatSet::load(&config.script_directory, config) {
        Ok(formats) => {
            let (mut due, mut postponed, mut unhandled) = (0, 0, 0);
            let mut next: Option<DateTime<Utc>> = None;
            for g in &groups {
                match formats.decide(g, now) {
                    Decision::Send(_) => due += 1,
                    Decision::Postpone { until, .. } => {
                        postponed += 1;
                        if let Some(u) = until {
                            next = Some(next.map_or(u, |n| n.min(u)));
                        }
                    }
                    Decision::NoMatch | Decision::Error { .. } => unhandled += 1,
                }
            }
            let _ = writeln!(out, "due now             {due} groups");
            let _ = write!(out, "postponed           {postponed} groups");
            if let Some(n) = next {
                let _ = write!(out, " (next due {})", n.format("%Y-%m-%d %H:%M:%S UTC"));
            }
            let _ = writeln!(out);
            if unhandled > 0 {
                let _ = writeln!(
                    out,
                    "no usable format    {unhandled} groups (errors; see the log)"
                );
            }
        }
        Err(e) => {
            let _ = writeln!(out, "formats             cannot load: {e}");
        }
    }
    let open = outbox::list_open(client).await.unwrap_or_default();
    let count = |s: State| open.iter().filter(|o| o.state == s).count();
    let _ = writeln!(
        out,
        "outbox              {} in flight or in doubt, {} held, {} waiting for a retry",
        count(State::Sending),
        count(State::Held),
        count(State::Retry)
    );
    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE sent_at > now() - interval '1 hour'), \
                    count(*) FILTER (WHERE sent_at > now() - interval '1 day'), \
                    max(sent_at) \
               FROM sent WHERE sent_at > now() - interval '1 day'",
            &[],
        )
        .await?;
    let (hour, day, last): (i64, i64, Option<DateTime<Utc>>) = (row.get(0), row.get(1), row.get(2));
    let _ = write!(
        out,
        "sent                {hour} in the last hour, {day} in 24 h"
    );
    if let Some(last) = last {
        let _ = write!(out, "; last {} ago", age(now, last));
    }
    let _ = writeln!(out);
    let next_ticket = crate::notify::ticket::peek(client).await?;
    let _ = writeln!(out, "next ticket         {next_ticket}");
    // Every mailgend connection names its instance (application_name,
    // crate::notify::db::pg_config); a role sees its own sessions' names.
    let instances = client
        .query(
            "SELECT substr(application_name, 10), count(*), \
                    host(min(client_addr)) \
               FROM pg_stat_activity \
              WHERE application_name LIKE 'mailgend/%' AND pid <> pg_backend_pid() \
              GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await?;
    if instances.is_empty() {
        let _ = writeln!(out, "instances           none connected");
    }
    for (i, r) in instances.iter().enumerate() {
        // The address is NULL over a Unix socket, and for other roles'
        // sessions unless this role may read all statistics.
        let (name, n, from): (String, i64, Option<String>) = (r.get(0), r.get(1), r.get(2));
        let label = if i == 0 { "instances" } else { "" };
        let from = from.map(|a| format!(" from {a}")).unwrap_or_default();
        let _ = writeln!(out, "{label:<20}{name} ({n} connections{from})");
    }
    if let Some(line) = local_service(config).await {
        let _ = writeln!(out, "{line}");
    }
    Ok(out)
}

/// `mailgend in-doubt list`.
pub async fn in_doubt_list(client: &Client) -> Result<String, StatusError> {
    let rows = outbox::list_open(client).await?;
    let mut out = String::new();
    if rows.is_empty() {
        out.push_str("no open mails: nothing is in doubt\n");
        return Ok(out);
    }
    let _ = writeln!(
        out,
        "{:>8}  {:<8}  {:<17}  {:>8}  {:<20}  {:<24}  message-id",
        "id", "state", "ticket", "attempts", "since", "to"
    );
    for o in rows {
        let _ = writeln!(
            out,
            "{:>8}  {:<8}  {:<17}  {:>8}  {:<20}  {:<24}  {}",
            o.id,
            o.state.as_str(),
            o.ticket,
            o.attempts,
            o.created_at.format("%Y-%m-%d %H:%M:%S"),
            o.envelope_to.join(","),
            o.message_id
        );
        if let Some(e) = &o.last_error {
            let _ = writeln!(out, "{:>8}  last error: {e}", "");
        }
    }
    out.push_str(
        "\nsending = in doubt if no mailgend is working on it; held = waits for you.\n\
         release: send again (same Message-Id and ticket); mark-sent: record as delivered; \
         discard: forget (the directives get a new mail and ticket)\n",
    );
    Ok(out)
}

/// What to do with open outbox rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InDoubtAction {
    Release,
    MarkSent,
    Discard,
}

/// `mailgend in-doubt release|mark-sent|discard IDS`.
pub async fn in_doubt_act(
    client: &mut Client,
    ids: &[i64],
    action: InDoubtAction,
) -> Result<String, StatusError> {
    let tx = client.transaction().await?;
    let open = outbox::list_open(&tx).await?;
    let mut out = String::new();
    for &id in ids {
        let row = open
            .iter()
            .find(|o| o.id == id)
            .ok_or(StatusError::NoSuchRow(id))?;
        match action {
            InDoubtAction::Release => {
                outbox::set_state(&tx, &[id], State::Retry).await?;
                let _ = writeln!(out, "{id}: released; the service sends it again shortly");
            }
            InDoubtAction::Discard => {
                outbox::set_state(&tx, &[id], State::Discarded).await?;
                let _ = writeln!(
                    out,
                    "{id}: discarded; its directives will get a new mail and ticket"
                );
            }
            InDoubtAction::MarkSent => {
                if row.marks_sent {
                    lock_pending(&tx, id, &row.marks).await?;
                    sent::mark_sent(&tx, &row.ticket, row.sent_at, &row.marks).await?;
                }
                outbox::accepted(&tx, &[id]).await?;
                let _ = writeln!(out, "{id}: recorded as sent with ticket {}", row.ticket);
            }
        }
    }
    tx.commit().await?;
    Ok(out)
}

/// Marking sent needs the directives still pending and not being worked
/// on by a running service.
async fn lock_pending<C: GenericClient>(
    tx: &C,
    id: i64,
    marks: &[DirectiveId],
) -> Result<(), StatusError> {
    let ids: Vec<i64> = marks.iter().map(|d| d.0).collect();
    let rows = tx
        .query(
            // `+ 0`: keep the planner off the sent_id index (see directive::claim_at).
            "SELECT id FROM directives WHERE id = ANY($1) AND sent_id + 0 IS NULL \
             FOR UPDATE SKIP LOCKED",
            &[&ids],
        )
        .await?;
    if rows.len() != ids.len() {
        return Err(StatusError::Refused {
            id,
            reason: "its directives are already sent or being sent right now".into(),
        });
    }
    Ok(())
}

/// `mailgend status`.
pub async fn run(
    source: &crate::config::ConfigSource,
    verbose: u8,
    bounces: bool,
) -> Result<std::process::ExitCode, super::command::CommandError> {
    let config = super::command::load_config(source, verbose)?;
    let (mut out, ok) = status_command(&config).await;
    if bounces && ok {
        // `--bounces`: the section of `mailgend bounces` (cli::bounces).
        let client = crate::notify::db::connect(&config.database).await?;
        out.push_str(&super::bounces::status_section(&client).await?);
    }
    print!("{out}");
    Ok(if ok {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    })
}

/// What `mailgend in-doubt` was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InDoubtCommand {
    List,
    Act(Vec<i64>, InDoubtAction),
}

/// `mailgend in-doubt list|release|mark-sent|discard`.
pub async fn run_in_doubt(
    source: &crate::config::ConfigSource,
    verbose: u8,
    command: InDoubtCommand,
) -> Result<std::process::ExitCode, super::command::CommandError> {
    let config = super::command::load_config(source, verbose)?;
    let mut client = crate::notify::db::connect(&config.database).await?;
    let out = match command {
        InDoubtCommand::List => in_doubt_list(&client).await?,
        InDoubtCommand::Act(ids, action) => in_doubt_act(&mut client, &ids, action).await?,
    };
    print!("{out}");
    Ok(std::process::ExitCode::SUCCESS)
}
