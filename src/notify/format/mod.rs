//! Formats: the declarative replacement for intelmq-mailgen's Python
//! "format scripts" (spec §6). The reference for the language is
//! `docs/formats.md`.
//!
//! The files `NN*.toml` of `script_directory` are read in file-name order,
//! like the old scripts were run. Each holds rules (`[[format]]`); for a
//! group of directives the first rule whose `match` fits decides: postpone
//! the group, send table mails (CSV inline or attached, plus constituency
//! copies) or X-ARF reports, or reject the group as an error. No rule
//! fitting is an error too.
//!
//! This module owns that decision (the loaded model, below) and, in
//! `plan.rs`, the rendering of the mails of a decided group; it reads no
//! database and sends nothing. Everything a format file can get wrong is
//! found when the files are loaded (and all of it reported at once), so
//! that a typo stops a reload rather than a night's worth of mail.

mod load;
mod plan;
mod tree;
mod xarf;

pub use plan::Plan;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};

use crate::config::Config;
use crate::notify::directive::{EventId, Group, GroupKey};
use crate::notify::event::Event;
use crate::notify::mail::{Attachment, Notification};
use crate::notify::render::table::TableFormat;
use crate::notify::render::template::{
    Part, Substitutions, Template, TemplateError, TemplateStore, TemplateText,
};
use crate::notify::ticket::Ticket;

/// The aggregate key the observation-age rule reads.
pub const OBSERVATION_KEY: &str = "time.observation";

/// One problem in the format files.
pub type FormatProblem = crate::shared::problem::LocatedProblem;

/// Every problem found while loading the formats; the set is refused.
#[derive(Debug, Clone, thiserror::Error)]
pub struct FormatLoadError(pub Vec<FormatProblem>);

impl fmt::Display for FormatLoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid format files")?;
        for p in &self.0 {
            write!(f, "\n  {p}")?;
        }
        Ok(())
    }
}

/// Where a table mail puts its CSV.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataLocation {
    /// In the body, through `${events_as_csv}`.
    Inline,
    /// As the attachment `events.csv` (`${events_as_csv}` is empty).
    Attachment,
}

/// What to do with a table mail over the relay's size limit (the format
/// key `oversize`; docs/formats.md). Applied by `notify::fit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Oversize {
    /// The CSV goes as a zip attachment (`events.zip` holding
    /// `events.csv`); still too big: split into zipped parts.
    #[default]
    Compress,
    /// Several mails, each with a part of the events and its own ticket.
    Split,
    /// The group fails with an ERROR and stays pending.
    Error,
}

impl Oversize {
    pub fn as_str(self) -> &'static str {
        match self {
            Oversize::Compress => "compress",
            Oversize::Split => "split",
            Oversize::Error => "error",
        }
    }
}

/// The decision for one group.
#[derive(Debug, Clone)]
pub enum Decision {
    /// Leave the group pending. `until` is the earliest moment at which the
    /// postpone rules that hold could stop holding (`None`: unknown/never).
    Postpone {
        format: String,
        reason: String,
        until: Option<DateTime<Utc>>,
    },
    Send(Plan),
    /// No rule fits: an error for the group.
    NoMatch,
    /// A rule fits but declares the group an error (`reject`), or a
    /// postpone rule cannot be evaluated (an unparsable `time.observation`).
    /// Like `NoMatch`, an error for the group; no ticket is drawn.
    Error {
        format: String,
        reason: String,
    },
}

/// What the pipeline hands to [`Plan::render`].
pub struct RenderContext<'a> {
    pub group: &'a Group,
    /// The group's distinct events, sorted by id, with at least the
    /// columns of [`Plan::event_columns`].
    pub events: &'a [Event],
    /// [`Plan::tickets_needed`] fresh ticket numbers.
    pub tickets: &'a [Ticket],
    pub templates: &'a TemplateStore,
    pub config: &'a Config,
}

/// Names the template once: errors from the store already carry the name.
fn template_error_text(template: &str, e: &TemplateError) -> String {
    match e {
        TemplateError::Read { .. }
        | TemplateError::InTemplate { .. }
        | TemplateError::UnsafeName { .. } => e.to_string(),
        _ => format!("template {template:?}: {e}"),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("format {format}: {}", template_error_text(template, source))]
    Template {
        format: String,
        template: String,
        // Boxed to keep `Result<_, RenderError>` small.
        source: Box<TemplateError>,
    },
    #[error("format {format}: computed variable `{variable}`: {source}")]
    Variable {
        format: String,
        variable: String,
        source: Box<TemplateError>,
    },
    #[error("format {format}: needs {needed} ticket(s) but {given} were given")]
    Tickets {
        format: String,
        needed: usize,
        given: usize,
    },
    #[error("format {format}: X-ARF report for event {event}: {reason}")]
    Xarf {
        format: String,
        event: EventId,
        reason: String,
    },
}

// ---------------------------------------------------------------------------
// The loaded model.

/// A string test: the value equals one of `equals`, or starts with one of
/// `prefix`, or ends with one of `suffix`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct StrMatch {
    pub equals: Vec<String>,
    pub prefix: Vec<String>,
    pub suffix: Vec<String>,
}

impl StrMatch {
    fn matches(&self, s: &str) -> bool {
        self.equals.iter().any(|e| e == s)
            || self.prefix.iter().any(|p| s.starts_with(p.as_str()))
            || self.suffix.iter().any(|x| s.ends_with(x.as_str()))
    }
}

/// Which groups a rule is for; absent tests always hold.
#[derive(Debug, Clone, Default)]
pub(crate) struct Matcher {
    pub notification_format: Option<StrMatch>,
    pub event_data_format: Option<StrMatch>,
    pub template_name: Option<StrMatch>,
    pub recipient_address: Option<StrMatch>,
    /// Aggregate keys that must be present with a matching value.
    pub aggregate: Vec<(String, StrMatch)>,
}

impl Matcher {
    fn matches(&self, key: &GroupKey) -> bool {
        let test = |m: &Option<StrMatch>, v: &str| m.as_ref().is_none_or(|m| m.matches(v));
        test(&self.notification_format, &key.notification_format)
            && test(&self.event_data_format, &key.event_data_format)
            && test(&self.template_name, &key.template_name)
            && test(&self.recipient_address, &key.recipient_address)
            && self.aggregate.iter().all(|(k, m)| {
                key.aggregate_identifier
                    .get(k)
                    .is_some_and(|v| m.matches(v))
            })
    }
}

/// The postpone rules of a format (spec §6).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Postpone {
    /// Hold until `last_sent + notification_interval < now`.
    pub interval: bool,
    /// Hold while the newest directive is younger than this.
    pub min_directive_age: Option<Duration>,
    /// Hold while the `time.observation` aggregate key is younger than this.
    pub min_observation_age: Option<Duration>,
}

/// A variable computed per mail.
#[derive(Debug, Clone)]
pub(crate) enum Computed {
    Text(TemplateText),
    /// The text of the first case whose aggregate key the group has.
    FirstOf {
        cases: Vec<(String, TemplateText)>,
        otherwise: TemplateText,
    },
    /// Depends on where the mail puts its data.
    ByLocation {
        inline: TemplateText,
        attachment: TemplateText,
    },
}

/// A constituency copy (intelmq-mailgen's example 01).
#[derive(Debug, Clone)]
pub(crate) struct CopySpec {
    pub recipient_group: String,
    pub recipients: Vec<String>,
    pub location: DataLocation,
}

/// What a rule sees besides its own settings: variables, computed
/// variables and copies declared by its file and earlier files.
#[derive(Debug, Clone, Default)]
pub(crate) struct Scope {
    pub variables: BTreeMap<String, String>,
    pub computed: Vec<(String, Computed)>,
    pub copies: Vec<CopySpec>,
}

#[derive(Debug, Clone)]
pub(crate) enum TemplateChoice {
    /// The directive's `template_name`.
    Directive,
    Named(String),
    Inline(Arc<Template>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LocationSpec {
    Fixed(DataLocation),
    /// Attachment when `event_data_format` ends in `_attachment`, else
    /// inline.
    FromEventDataFormat,
}

#[derive(Debug, Clone)]
pub(crate) enum Action {
    Table {
        table: TableFormat,
        location: LocationSpec,
        template: TemplateChoice,
        copies: bool,
        oversize: Oversize,
    },
    Xarf {
        spec: xarf::XarfSpec,
        template: TemplateChoice,
    },
    Reject {
        reason: String,
    },
    /// Only waits (`continue = true`): the group waits while the rule's
    /// postpone rules hold; otherwise the following rules are tried as if
    /// this one did not fit. This is how a script that decides postponement
    /// before it looks at the rest of the directive is written (examples 11,
    /// 13 and 21 postpone first, then fall through on an unknown suffix).
    Continue,
}

#[derive(Debug)]
pub(crate) struct Rule {
    /// `10shadowserver.toml#csv_Open-Redis`.
    pub id: String,
    pub matcher: Matcher,
    pub postpone: Postpone,
    pub action: Action,
    pub scope: Arc<Scope>,
}

/// State shared by a set and its plans.
#[derive(Debug, Default)]
struct Shared {
    clash_warned: AtomicBool,
}

/// The loaded formats of one configuration.
#[derive(Debug)]
pub struct FormatSet {
    files: Vec<PathBuf>,
    python: Vec<PathBuf>,
    rules: Vec<Arc<Rule>>,
    shared: Arc<Shared>,
}

impl FormatSet {
    /// Reads every `NN*.toml` file of `script_directory` (see
    /// `docs/formats.md` for which names count), checks everything, and
    /// reports all problems at once.
    pub fn load(script_directory: &Path, config: &Config) -> Result<FormatSet, FormatLoadError> {
        let _ = config;
        let loaded = load::load_dir(script_directory)?;
        Ok(FormatSet {
            files: loaded.files,
            python: loaded.python,
            rules: loaded.rules.into_iter().map(Arc::new).collect(),
            shared: Arc::new(Shared::default()),
        })
    }

    /// intelmq-mailgen scripts (`NN*.py`) found next to the formats; they
    /// are not run (the caller logs one WARN naming them).
    pub fn python_scripts(&self) -> &[PathBuf] {
        &self.python
    }

    /// The format files read, in evaluation order.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// `file#name` of every rule, in evaluation order.
    pub fn rule_names(&self) -> Vec<String> {
        self.rules.iter().map(|r| r.id.clone()).collect()
    }

    /// Every `events` column some rule may ask for (for `check-config`,
    /// which can compare them with the real table).
    pub fn event_columns_used(&self) -> BTreeSet<String> {
        self.rules
            .iter()
            .flat_map(|r| action_event_columns(&r.action))
            .map(|c| match c.split_once('.') {
                Some(("extra", _)) => "extra".to_string(),
                _ => c,
            })
            .collect()
    }

    /// The decision for `group` at time `now`: the first rule that fits
    /// decides.
    pub fn decide(&self, group: &Group, now: DateTime<Utc>) -> Decision {
        for rule in &self.rules {
            if !rule.matcher.matches(&group.key) {
                continue;
            }
            let only_waits = matches!(rule.action, Action::Continue);
            if let Action::Reject { reason } = &rule.action {
                return Decision::Error {
                    format: rule.id.clone(),
                    reason: reason.clone(),
                };
            }
            match evaluate_postpone(&rule.postpone, group, now) {
                Err(reason) => {
                    return Decision::Error {
                        format: rule.id.clone(),
                        reason,
                    }
                }
                Ok(Some((reason, until))) => {
                    return Decision::Postpone {
                        format: rule.id.clone(),
                        reason,
                        until,
                    }
                }
                Ok(None) if only_waits => continue,
                Ok(None) => {}
            }
            let location = match &rule.action {
                Action::Table { location, .. } => Some(match location {
                    LocationSpec::Fixed(l) => *l,
                    LocationSpec::FromEventDataFormat => {
                        if group.key.event_data_format.ends_with("_attachment") {
                            DataLocation::Attachment
                        } else {
                            DataLocation::Inline
                        }
                    }
                }),
                _ => None,
            };
            return Decision::Send(Plan {
                rule: rule.clone(),
                location,
                attach_all: false,
                shared: self.shared.clone(),
            });
        }
        Decision::NoMatch
    }

    /// For `check-config`: one message for every template a rule names
    /// explicitly that cannot be read or parsed.
    pub fn check_templates(&self, store: &TemplateStore) -> Vec<String> {
        let mut out = Vec::new();
        for rule in &self.rules {
            let choice = match &rule.action {
                Action::Table { template, .. } | Action::Xarf { template, .. } => template,
                Action::Reject { .. } | Action::Continue => continue,
            };
            if let TemplateChoice::Named(name) = choice {
                if let Err(e) = store.get(name) {
                    out.push(format!("format {}: {e}", rule.id));
                }
            }
        }
        out
    }
}

fn action_event_columns(action: &Action) -> Vec<String> {
    match action {
        Action::Table { table, .. } => table.event_columns(),
        Action::Xarf { spec, .. } => spec.event_columns(),
        Action::Reject { .. } | Action::Continue => Vec::new(),
    }
}

/// Why a group waits, and until when (see [`Decision::Postpone`]).
type Hold = (String, Option<DateTime<Utc>>);

/// Postpone rule evaluation: `Ok(None)` to go ahead, `Ok(Some(hold))` to
/// wait, `Err` when a rule cannot be evaluated.
fn evaluate_postpone(
    p: &Postpone,
    group: &Group,
    now: DateTime<Utc>,
) -> Result<Option<Hold>, String> {
    let mut reasons = Vec::new();
    // The group may go once every holding rule has stopped holding, and
    // none of these rules starts holding again as time passes, so the
    // answer is the latest of their end times.
    let mut until = Some(DateTime::<Utc>::MIN_UTC);
    let mut hold = |reason: String, end: Option<DateTime<Utc>>| {
        reasons.push(reason);
        until = match (until, end) {
            (Some(a), Some(b)) => Some(a.max(b)),
            _ => None,
        };
    };
    if p.interval {
        if let Some(last) = group.last_sent {
            let end = last.checked_add_signed(group.notification_interval);
            // The old tool's test is `last_sent + interval < now`, so the
            // group is still held at exactly `last_sent + interval`.
            let exceeded = end.is_some_and(|e| e < now);
            if !exceeded {
                hold(
                    format!(
                        "notification interval of {} not over since the last mail at {}",
                        human_duration(group.notification_interval),
                        last.format("%Y-%m-%d %H:%M:%S%.6f UTC")
                    ),
                    end.and_then(|e| e.checked_add_signed(Duration::microseconds(1))),
                );
            }
        }
    }
    if let Some(min) = p.min_directive_age {
        let ready = group.inserted_at.checked_add_signed(min);
        if ready.is_none_or(|r| now < r) {
            hold(
                format!(
                    "newest directive (inserted {}) is younger than {}",
                    group.inserted_at.format("%Y-%m-%d %H:%M:%S%.6f UTC"),
                    human_duration(min)
                ),
                ready,
            );
        }
    }
    if let Some(min) = p.min_observation_age {
        if let Some(raw) = group.key.aggregate_identifier.get(OBSERVATION_KEY) {
            let observed = parse_observation(raw).ok_or_else(|| {
                format!(
                    "aggregate key `{OBSERVATION_KEY}` is {raw:?}, not a timestamp \
                     like 2024-05-01T06:00:00+00:00"
                )
            })?;
            let ready = observed.checked_add_signed(min);
            if ready.is_none_or(|r| now < r) {
                hold(
                    format!(
                        "observation time {raw} is younger than {}",
                        human_duration(min)
                    ),
                    ready,
                );
            }
        }
    }
    if reasons.is_empty() {
        Ok(None)
    } else {
        Ok(Some((reasons.join("; "), until)))
    }
}

/// `time.observation` as IntelMQ writes it (`isoformat()` with `+00:00`,
/// fraction optional). Other RFC 3339 offsets and `Z` are accepted too and
/// converted to UTC (the old tool crashed on them).
pub fn parse_observation(raw: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(raw.trim())
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

fn human_duration(d: Duration) -> String {
    let s = d.num_seconds();
    if s != 0 && s % 86400 == 0 {
        format!("{}d", s / 86400)
    } else if s != 0 && s % 3600 == 0 {
        format!("{}h", s / 3600)
    } else if s != 0 && s % 60 == 0 {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}
