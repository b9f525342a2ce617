//! Interactive review: `mailgend send` without `--all`, the way
//! intelmqcbmail's interactive mode works (spec §9): pages of `-N` groups,
//! then `[c]ontinue (skip)`, `[s]end this batch`, `send [a]ll`, `[q]uit`,
//! plus `[v]iew N` to read the mail a group would get before deciding.
//!
//! The module has two halves. The pure half ([`Review`], [`parse_choice`],
//! [`refresh_all`], the page text) holds the paging and choice logic and is
//! unit-tested. The driver ([`run`]) talks to the database, the pipeline
//! and a line-based terminal given as reader and writer; `main` hands it
//! stdin/stdout after checking that stdin is a terminal.
//!
//! The page is a snapshot. Before sending, the chosen groups are read
//! again: a group that another mailgend (a running `mailgend run`) sent
//! meanwhile is skipped with a message, and only the directives the
//! operator saw are sent. The pipeline then claims each group's rows
//! (`SKIP LOCKED`, still pending) in the group's transaction, so a group
//! is never sent twice even if the other instance takes it in between.
//! Viewing uses [`crate::cli::preview`]: read-only, no ticket drawn.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use tokio::io::{AsyncBufRead, AsyncBufReadExt};
use tokio_postgres::IsolationLevel;

use crate::cli::preview;
use crate::notify::db;
use crate::notify::directive::{self, DirectiveId, Group, GroupKey};
use crate::notify::format::{Decision, FormatSet};
use crate::notify::pipeline::{self, GroupError, GroupOutcome, Pipeline, RunOptions};

/// The prompt; the first four choices are intelmqcbmail's.
pub const PROMPT: &str =
    "Options: [c]ontinue (skip), [s]end this batch, send [a]ll, [v]iew N, [q]uit? ";

/// What a group on the page would do if sent now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    Due {
        format: String,
    },
    Postponed {
        format: String,
        reason: String,
        until: Option<DateTime<Utc>>,
    },
    /// No format fits, or the format rejects it: sending logs an ERROR.
    Error {
        reason: String,
    },
}

/// The status of `group` at `now` by the loaded formats.
pub fn classify(formats: &FormatSet, group: &Group, now: DateTime<Utc>) -> Status {
    match formats.decide(group, now) {
        Decision::Send(plan) => Status::Due {
            format: plan.format_name().to_string(),
        },
        Decision::Postpone {
            format,
            reason,
            until,
        } => Status::Postponed {
            format,
            reason,
            until,
        },
        Decision::NoMatch => Status::Error {
            reason: "no format handles this group".into(),
        },
        Decision::Error { format, reason } => Status::Error {
            reason: format!("format {format}: {reason}"),
        },
    }
}

/// A group on a page.
#[derive(Debug, Clone)]
pub struct Entry {
    pub group: Group,
    pub status: Status,
}

/// What the operator typed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// Skip this page.
    Continue,
    /// Send the groups of this page, then show the next.
    SendBatch,
    /// Send this page and every later one (skipped pages stay skipped, as
    /// in intelmqcbmail).
    SendAll,
    /// Show the mail of the page's group number N (1-based).
    View(usize),
    Quit,
}

/// Parses an answer. `page_len` is the number of groups on the page (for
/// `v N`). The error is the message to show.
pub fn parse_choice(input: &str, page_len: usize) -> Result<Choice, String> {
    let s = input.trim().to_ascii_lowercase();
    let help = || {
        format!(
            "Please enter one of c, s, a, v N, q (N is a group number on this page, 1-{page_len})"
        )
    };
    let (word, rest) = match s.find(|c: char| c.is_ascii_digit() || c.is_whitespace()) {
        Some(i) => (s[..i].trim(), s[i..].trim()),
        None => (s.as_str(), ""),
    };
    match (word, rest) {
        ("c" | "continue", "") => Ok(Choice::Continue),
        ("s" | "send", "") => Ok(Choice::SendBatch),
        ("a" | "all", "") => Ok(Choice::SendAll),
        ("q" | "quit", "") => Ok(Choice::Quit),
        ("v" | "view", "") if page_len == 1 => Ok(Choice::View(1)),
        ("v" | "view", "") => Err(format!(
            "Which group? Type v and its number, e.g. v 2 (1-{page_len})"
        )),
        ("v" | "view", n) => match n.parse::<usize>() {
            Ok(n) if (1..=page_len).contains(&n) => Ok(Choice::View(n)),
            _ => Err(format!(
                "There is no group {n} on this page; type v and a number from 1 to {page_len}"
            )),
        },
        _ => Err(help()),
    }
}

/// What the driver does after a choice.
#[derive(Debug, Clone)]
pub enum Step {
    /// Show the next page (or finish if there is none).
    Next,
    /// Send these groups; then go on (`all`: then finish).
    Send {
        groups: Vec<Group>,
        all: bool,
    },
    /// Show the mail of entry number `index` (into all entries); the page
    /// stays.
    View {
        index: usize,
    },
    Quit,
}

/// The pages of one review session over a snapshot of pending groups.
#[derive(Debug)]
pub struct Review {
    entries: Vec<Entry>,
    page_size: usize,
    /// Index of the first entry of the current page.
    start: usize,
}

impl Review {
    pub fn new(entries: Vec<Entry>, page_size: usize) -> Review {
        Review {
            entries,
            page_size: page_size.max(1),
            start: 0,
        }
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Recomputes the statuses of the current page (time passes while an
    /// operator reads: a postponed group may have become due).
    pub fn reclassify_page(&mut self, status: impl Fn(&Group) -> Status) {
        let end = (self.start + self.page_size).min(self.entries.len());
        for e in &mut self.entries[self.start.min(end)..end] {
            e.status = status(&e.group);
        }
    }

    /// The groups of the current page; empty when the review is over.
    pub fn page(&self) -> &[Entry] {
        let end = (self.start + self.page_size).min(self.entries.len());
        &self.entries[self.start.min(end)..end]
    }

    pub fn is_done(&self) -> bool {
        self.start >= self.entries.len()
    }

    /// Groups on this page and after it.
    pub fn remaining(&self) -> usize {
        self.entries.len().saturating_sub(self.start)
    }

    pub fn apply(&mut self, choice: Choice) -> Step {
        let page: Vec<Group> = self.page().iter().map(|e| e.group.clone()).collect();
        match choice {
            Choice::Continue => {
                self.start += self.page_size;
                Step::Next
            }
            Choice::SendBatch => {
                self.start += self.page_size;
                Step::Send {
                    groups: page,
                    all: false,
                }
            }
            Choice::SendAll => {
                let groups = self.entries[self.start.min(self.entries.len())..]
                    .iter()
                    .map(|e| e.group.clone())
                    .collect();
                self.start = self.entries.len();
                Step::Send { groups, all: true }
            }
            Choice::View(n) => Step::View {
                index: self.start + n.clamp(1, page.len().max(1)) - 1,
            },
            Choice::Quit => {
                self.start = self.entries.len();
                Step::Quit
            }
        }
    }

    /// The current page as text: intelmqcbmail's lines, numbered, with
    /// whether each group is due and, if postponed, why and until when.
    pub fn page_text(&self, now: DateTime<Utc>) -> String {
        let page = self.page();
        let mut out = format!(
            "Current batch ({} of {} total):\n",
            page.len(),
            self.remaining()
        );
        for (i, e) in page.iter().enumerate() {
            let _ = writeln!(out, "{:>5}. {}", i + 1, entry_line(e, now));
        }
        out
    }
}

/// `recipient template (nf/edf): N events — status`.
pub fn entry_line(e: &Entry, now: DateTime<Utc>) -> String {
    let g = &e.group;
    let events = g.distinct_event_ids().len();
    let status = match &e.status {
        Status::Due { format } => format!("due ({format})"),
        Status::Postponed {
            format,
            reason,
            until: Some(until),
        } => format!(
            "postponed until {} ({}) by {format}: {reason}",
            until.format("%Y-%m-%d %H:%M:%S UTC"),
            in_words(*until - now)
        ),
        Status::Postponed {
            format,
            reason,
            until: None,
        } => format!("postponed (due time unknown) by {format}: {reason}"),
        Status::Error { reason } => format!("ERROR if sent: {reason}"),
    };
    preview::terminal_safe(&format!(
        "{} {} ({}/{}): {events} events; {status}",
        g.key.recipient_address,
        g.key.template_name,
        g.key.notification_format,
        g.key.event_data_format
    ))
}

fn in_words(d: chrono::Duration) -> String {
    let s = d.num_seconds();
    match s {
        s if s <= 0 => "now".into(),
        s if s < 120 => format!("in {s} s"),
        s if s < 7200 => format!("in {} min", s / 60),
        s if s < 172_800 => format!("in {} h", s / 3600),
        s => format!("in {} days", s / 86_400),
    }
}

/// A page group read again before it is viewed or sent.
#[derive(Debug, Clone)]
pub enum Fresh {
    /// None of its directives is pending any more.
    Gone,
    /// Its directives that are still pending (only ones the operator saw),
    /// with the current `last_sent`; `dropped` were sent meanwhile.
    Current {
        // Boxed: a Group is large next to `Gone`.
        group: Box<Group>,
        dropped: Vec<DirectiveId>,
    },
}

/// Matches page groups against the pending groups read now.
pub fn refresh_all(snapshot: &[Group], current: &[Group]) -> Vec<Fresh> {
    let by_key: HashMap<&GroupKey, &Group> = current.iter().map(|g| (&g.key, g)).collect();
    snapshot
        .iter()
        .map(|old| {
            let Some(now) = by_key.get(&old.key) else {
                return Fresh::Gone;
            };
            let mut group = old.clone();
            group.last_sent = now.last_sent;
            let mut keep_d = Vec::new();
            let mut keep_e = Vec::new();
            let mut dropped = Vec::new();
            for (d, e) in old.directive_ids.iter().zip(&old.event_ids) {
                if now.directive_ids.binary_search(d).is_ok() {
                    keep_d.push(*d);
                    keep_e.push(*e);
                } else {
                    dropped.push(*d);
                }
            }
            if keep_d.is_empty() {
                return Fresh::Gone;
            }
            group.directive_ids = keep_d;
            group.event_ids = keep_e;
            Fresh::Current {
                group: Box::new(group),
                dropped,
            }
        })
        .collect()
}

/// Totals of a review session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReviewSummary {
    pub sent: usize,
    pub postponed: usize,
    pub errors: usize,
    /// Groups not sent because someone else sent or is sending them.
    pub skipped: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error(transparent)]
    Connect(#[from] db::DbError),
    #[error("database: {}", db::describe(.0))]
    Db(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Select(#[from] directive::SelectError),
    #[error(transparent)]
    Run(#[from] pipeline::RunError),
    #[error(transparent)]
    Preview(#[from] preview::PreviewError),
    #[error("terminal: {0}")]
    Io(#[from] std::io::Error),
}

/// The pending groups and the database's `now()`, from one read-only
/// snapshot.
async fn pending_now(p: &Pipeline) -> Result<(Vec<Group>, DateTime<Utc>), ReviewError> {
    // A connection per look: an operator may leave the prompt for hours.
    let mut client = db::connect(&p.config.database).await?;
    let tx = client
        .build_transaction()
        .read_only(true)
        .isolation_level(IsolationLevel::RepeatableRead)
        .start()
        .await?;
    let now: DateTime<Utc> = tx.query_one("SELECT now()", &[]).await?.get(0);
    let groups =
        directive::pending_groups(&tx, p.config.database.additional_directive_where.as_deref())
            .await?;
    tx.rollback().await?;
    Ok((groups, now))
}

fn describe(g: &Group) -> String {
    preview::terminal_safe(&format!(
        "{} {} (directives {})",
        g.key.recipient_address,
        g.key.template_name,
        g.directive_ids_display()
    ))
}

/// Runs a review session: pages from `input`'s answers, text to `out`.
/// End of input counts as quit.
pub async fn run<R, W>(
    p: Arc<Pipeline>,
    opts: RunOptions,
    page_size: usize,
    input: &mut R,
    out: &mut W,
) -> Result<ReviewSummary, ReviewError>
where
    R: AsyncBufRead + Unpin,
    W: std::io::Write,
{
    let mut total = ReviewSummary::default();
    let (groups, snapshot_now) = pending_now(&p).await?;
    // The database's clock at the snapshot, advanced by our own since: the
    // formats decide by the database's clock, as `send` does.
    let started = std::time::Instant::now();
    let clock = || snapshot_now + chrono::Duration::from_std(started.elapsed()).unwrap_or_default();
    if groups.is_empty() {
        writeln!(out, "No pending notifications to be sent.")?;
        return Ok(total);
    }
    if opts.dry_run {
        writeln!(
            out,
            "Dry run: sending only simulates; nothing is sent or written, no ticket is drawn."
        )?;
    }
    let entries = groups
        .into_iter()
        .map(|group| Entry {
            status: classify(&p.formats, &group, snapshot_now),
            group,
        })
        .collect();
    let mut review = Review::new(entries, page_size);
    while !review.is_done() {
        let now = clock();
        review.reclassify_page(|g| classify(&p.formats, g, now));
        write!(out, "{}", review.page_text(now))?;
        let choice = loop {
            write!(out, "{PROMPT}")?;
            out.flush()?;
            let mut line = String::new();
            if input.read_line(&mut line).await? == 0 {
                writeln!(out)?;
                break Choice::Quit;
            }
            match parse_choice(&line, review.page().len()) {
                Ok(c) => break c,
                Err(msg) => writeln!(out, "{msg}")?,
            }
        };
        match review.apply(choice) {
            Step::Next => writeln!(out, "Skipping this batch.")?,
            Step::Quit => {
                writeln!(out, "Exiting without sending any further mails.")?;
            }
            Step::View { index } => {
                let page_no = index % review.page_size + 1;
                let snap = review.entries()[index].group.clone();
                view(&p, &snap, page_no, out).await?;
            }
            Step::Send { groups, .. } => {
                let s = send(&p, opts, &groups, out).await?;
                total.sent += s.sent;
                total.postponed += s.postponed;
                total.errors += s.errors;
                total.skipped += s.skipped;
            }
        }
        out.flush()?;
    }
    Ok(total)
}

async fn view<W: std::io::Write>(
    p: &Pipeline,
    snap: &Group,
    page_no: usize,
    out: &mut W,
) -> Result<(), ReviewError> {
    let (current, _) = pending_now(p).await?;
    match refresh_all(std::slice::from_ref(snap), &current).remove(0) {
        Fresh::Gone => writeln!(
            out,
            "Group {page_no} is no longer pending: another mailgend sent it meanwhile."
        )?,
        Fresh::Current { group, dropped } => {
            let mut client = db::connect(&p.config.database).await?;
            let previews = preview::preview_groups(p, &mut client, &[*group]).await?;
            let mut text = format!(
                "\n===== group {page_no}: preview only (nothing sent, no ticket drawn; \
                 the ticket is the one the next draw would give)\n"
            );
            if !dropped.is_empty() {
                let _ = writeln!(
                    text,
                    "note           directives {} were sent meanwhile by another mailgend",
                    id_list(&dropped)
                );
            }
            for g in &previews {
                preview::write_group_text(&mut text, g, preview::TextOptions::default());
            }
            text.push_str("===== end of preview\n");
            write!(out, "{text}")?;
        }
    }
    Ok(())
}

fn id_list(ids: &[DirectiveId]) -> String {
    let v: Vec<String> = ids.iter().map(|d| d.to_string()).collect();
    format!("[{}]", v.join(", "))
}

async fn send<W: std::io::Write>(
    p: &Arc<Pipeline>,
    opts: RunOptions,
    groups: &[Group],
    out: &mut W,
) -> Result<ReviewSummary, ReviewError> {
    let mut s = ReviewSummary::default();
    writeln!(out, "Sending mails for {} entries... ", groups.len())?;
    out.flush()?;
    let (current, _) = pending_now(p).await?;
    let mut to_send = Vec::new();
    for (snap, fresh) in groups.iter().zip(refresh_all(groups, &current)) {
        match fresh {
            Fresh::Gone => {
                s.skipped += 1;
                writeln!(
                    out,
                    "  skipped {}: no longer pending, another mailgend sent it meanwhile",
                    describe(snap)
                )?;
            }
            Fresh::Current { group, dropped } => {
                if !dropped.is_empty() {
                    writeln!(
                        out,
                        "  {}: directives {} were sent meanwhile by another mailgend; \
                         sending the rest",
                        describe(snap),
                        id_list(&dropped)
                    )?;
                }
                to_send.push(*group);
            }
        }
    }
    let results = pipeline::run_groups(p.clone(), to_send.clone(), opts).await?;
    for (g, r) in to_send.iter().zip(results) {
        match r {
            Ok(GroupOutcome::Sent { mails }) => s.sent += mails,
            Ok(GroupOutcome::Postponed { reason, .. }) => {
                s.postponed += 1;
                writeln!(
                    out,
                    "  postponed {}: {}",
                    describe(g),
                    preview::terminal_safe(&reason)
                )?;
            }
            Ok(GroupOutcome::Busy) => {
                s.skipped += 1;
                writeln!(
                    out,
                    "  skipped {}: another mailgend is sending it or has just sent it \
                     (it is never sent twice)",
                    describe(g)
                )?;
            }
            Ok(GroupOutcome::Held) => {
                s.skipped += 1;
                writeln!(
                    out,
                    "  skipped {}: an in-doubt mail of this group waits for you \
                     (see `mailgend in-doubt list`)",
                    describe(g)
                )?;
            }
            Err(e) => {
                s.errors += 1;
                if let GroupError::Partial { sent, .. } = &e {
                    s.sent += sent;
                }
                writeln!(
                    out,
                    "  ERROR {} events {}: {}; it stays pending",
                    describe(g),
                    g.event_ids_display(),
                    preview::terminal_safe(&e.to_string())
                )?;
            }
        }
    }
    writeln!(
        out,
        "{}{} mails sent, {} postponed, {} errors.",
        if opts.dry_run { "Simulation: " } else { "" },
        s.sent,
        s.postponed,
        s.errors
    )?;
    if s.skipped > 0 {
        writeln!(
            out,
            "{} groups skipped: sent or being sent by another mailgend.",
            s.skipped
        )?;
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notify::directive::{AggregateIdentifier, EventId};
    use chrono::TimeZone;

    fn group(i: i64) -> Group {
        Group {
            key: GroupKey {
                recipient_address: format!("abuse@as{i}.example.net"),
                template_name: "t".into(),
                notification_format: "nf".into(),
                event_data_format: "edf".into(),
                aggregate_identifier: AggregateIdentifier(vec![("k".into(), i.to_string())]),
            },
            directive_ids: vec![DirectiveId(i * 10), DirectiveId(i * 10 + 1)],
            event_ids: vec![EventId(i * 10), EventId(i * 10 + 1)],
            inserted_at: Utc.with_ymd_and_hms(2024, 5, 1, 6, 0, 0).unwrap(),
            notification_interval: chrono::Duration::zero(),
            last_sent: None,
        }
    }

    fn ids(groups: &[Group]) -> Vec<Vec<DirectiveId>> {
        groups.iter().map(|g| g.directive_ids.clone()).collect()
    }

    fn review(n: i64, page: usize) -> Review {
        Review::new(
            (1..=n)
                .map(|i| Entry {
                    group: group(i),
                    status: Status::Due { format: "f".into() },
                })
                .collect(),
            page,
        )
    }

    #[test]
    fn choices_parse_like_the_old_tool_plus_view() {
        assert_eq!(parse_choice("c\n", 3), Ok(Choice::Continue));
        assert_eq!(parse_choice(" S ", 3), Ok(Choice::SendBatch));
        assert_eq!(parse_choice("a", 3), Ok(Choice::SendAll));
        assert_eq!(parse_choice("quit", 3), Ok(Choice::Quit));
        assert_eq!(parse_choice("v 2", 3), Ok(Choice::View(2)));
        assert_eq!(parse_choice("v3", 3), Ok(Choice::View(3)));
        assert_eq!(parse_choice("view 1", 3), Ok(Choice::View(1)));
        assert_eq!(parse_choice("v", 1), Ok(Choice::View(1)));
        assert!(parse_choice("v", 3).unwrap_err().contains("Which group"));
        assert!(parse_choice("v 4", 3).unwrap_err().contains("no group 4"));
        assert!(parse_choice("v 0", 3).is_err());
        assert!(parse_choice("", 3).unwrap_err().contains("c, s, a, v N, q"));
        assert!(parse_choice("x", 3).is_err());
        assert!(parse_choice("s 2", 3).is_err());
    }

    #[test]
    fn pages_advance_and_send_exactly_the_chosen_groups() {
        let mut r = review(7, 3);
        assert_eq!(r.page().len(), 3);
        assert!(r
            .page_text(Utc::now())
            .starts_with("Current batch (3 of 7 total):\n"));
        assert!(matches!(r.apply(Choice::View(2)), Step::View { index: 1 }));
        assert_eq!(
            ids(&[r.page()[0].group.clone()]),
            ids(&[group(1)]),
            "view keeps the page"
        );
        assert!(matches!(r.apply(Choice::Continue), Step::Next));
        assert_eq!(ids(&[r.page()[0].group.clone()]), ids(&[group(4)]));
        assert!(matches!(r.apply(Choice::View(3)), Step::View { index: 5 }));
        let Step::Send { groups, all: false } = r.apply(Choice::SendBatch) else {
            panic!("not a batch send")
        };
        assert_eq!(ids(&groups), ids(&[group(4), group(5), group(6)]));
        assert_eq!(r.page().len(), 1);
        assert!(r
            .page_text(Utc::now())
            .starts_with("Current batch (1 of 1 total):\n"));
        assert!(matches!(r.apply(Choice::Continue), Step::Next));
        assert!(r.is_done());
        assert!(r.page().is_empty());
    }

    #[test]
    fn send_all_takes_this_page_and_the_rest_but_not_skipped_pages() {
        let mut r = review(5, 2);
        r.apply(Choice::Continue);
        let Step::Send { groups, all: true } = r.apply(Choice::SendAll) else {
            panic!("not send all")
        };
        assert_eq!(ids(&groups), ids(&[group(3), group(4), group(5)]));
        assert!(r.is_done());
        let mut r = review(5, 2);
        assert!(matches!(r.apply(Choice::Quit), Step::Quit));
        assert!(r.is_done());
    }

    #[test]
    fn only_the_current_page_is_reclassified() {
        let mut r = review(3, 2);
        r.reclassify_page(|_| Status::Error { reason: "x".into() });
        let errors = r
            .entries()
            .iter()
            .filter(|e| matches!(e.status, Status::Error { .. }))
            .count();
        assert_eq!(errors, 2);
    }

    #[test]
    fn postponed_lines_say_why_and_until_when() {
        let now = Utc.with_ymd_and_hms(2024, 5, 1, 6, 0, 0).unwrap();
        let e = Entry {
            group: group(1),
            status: Status::Postponed {
                format: "10x.toml#a".into(),
                reason: "newest directive is younger than 15m".into(),
                until: Some(now + chrono::Duration::minutes(12)),
            },
        };
        assert_eq!(
            entry_line(&e, now),
            "abuse@as1.example.net t (nf/edf): 2 events; postponed until 2024-05-01 06:12:00 UTC \
             (in 12 min) by 10x.toml#a: newest directive is younger than 15m"
        );
    }

    #[test]
    fn refresh_skips_sent_groups_and_never_adds_unseen_directives() {
        let a = group(1);
        let b = group(2);
        let c = group(3);
        // Now: a is gone; b lost directive 20 and gained 29; c unchanged
        // but last sent meanwhile.
        let mut b_now = b.clone();
        b_now.directive_ids = vec![DirectiveId(21), DirectiveId(29)];
        b_now.event_ids = vec![EventId(21), EventId(29)];
        let mut c_now = c.clone();
        let t = Utc.with_ymd_and_hms(2024, 5, 2, 0, 0, 0).unwrap();
        c_now.last_sent = Some(t);
        let fresh = refresh_all(&[a, b, c.clone()], &[b_now, c_now]);
        assert!(matches!(fresh[0], Fresh::Gone));
        let Fresh::Current { group, dropped } = &fresh[1] else {
            panic!("{fresh:?}")
        };
        assert_eq!(group.directive_ids, vec![DirectiveId(21)]);
        assert_eq!(group.event_ids, vec![EventId(21)]);
        assert_eq!(dropped, &vec![DirectiveId(20)]);
        let Fresh::Current { group, dropped } = &fresh[2] else {
            panic!("{fresh:?}")
        };
        assert_eq!(group.last_sent, Some(t));
        assert_eq!(group.directive_ids, c.directive_ids);
        assert!(dropped.is_empty());
    }
}
