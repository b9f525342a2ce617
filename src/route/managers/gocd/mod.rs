//! The `gocd` manager: GoCD's stage notification mail. It reads the
//! pipeline and event from the subject, corrects the event by the
//! pipeline's history (FIXED/BREAKS), and gives its rules GoCD's pipeline
//! groups, refreshed in the background ([`fetch::GocdSource`]).
//!
//! Until GoCD's first answer (cctray.xml and the groups, either way),
//! the mail this manager wants is held in the spool, at most
//! `startup-wait` after start ([`Manager::holds`]); afterwards nothing
//! waits, and `pipelines.any` rules work while GoCD is down.
//!
//! A reload builds new managers; one whose GoCD (url, user, passwd) is the
//! same as a replaced manager's takes over that source's
//! [`fetch::Knowledge`] (pipeline states, last good groups) rather than
//! re-seeding from cctray.xml, which may be older than the mail seen since.

pub mod fetch;
pub mod state;
pub mod subject;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::task::JoinHandle;

use super::{BuildContext, Manager, ManagerSpec};
use crate::route::config::{ManagerConfig, ManagerSettings, MapView, Reader, RuleConfig};
use crate::route::limit::{clip, LOG_CLIP};
use crate::route::rules::{Facts, Verdict};
use crate::shared::shutdown::Shutdown;

pub use fetch::GocdSource;

/// The events a rule's `events:` filter can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Event {
    Breaks,
    Cancelled,
    Fails,
    Fixed,
    Passes,
}

impl Event {
    pub const ALL: [Event; 5] = [
        Event::Breaks,
        Event::Cancelled,
        Event::Fails,
        Event::Fixed,
        Event::Passes,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Event::Breaks => "BREAKS",
            Event::Cancelled => "CANCELLED",
            Event::Fails => "FAILS",
            Event::Fixed => "FIXED",
            Event::Passes => "PASSES",
        }
    }

    /// Exact upper-case names, as mail2alert compared them.
    pub fn parse(s: &str) -> Option<Event> {
        Event::ALL.into_iter().find(|e| e.name() == s)
    }
}

/// GoCD's pipeline groups: names as GoCD gives them (for `--test`), and a
/// case-insensitive index (GoCD treats names case-insensitively).
#[derive(Debug, Clone, Default)]
pub struct PipelineGroups {
    pub groups: Vec<(String, Vec<String>)>,
    index: HashMap<String, HashSet<String>>,
}

impl PipelineGroups {
    pub fn new(groups: Vec<(String, Vec<String>)>) -> PipelineGroups {
        let mut index: HashMap<String, HashSet<String>> = HashMap::new();
        for (g, ps) in &groups {
            index
                .entry(g.to_lowercase())
                .or_default()
                .extend(ps.iter().map(|p| p.to_lowercase()));
        }
        PipelineGroups { groups, index }
    }

    pub fn contains(&self, group: &str, pipeline: &str) -> bool {
        self.index
            .get(&group.to_lowercase())
            .is_some_and(|ps| ps.contains(&pipeline.to_lowercase()))
    }

    pub fn len(&self) -> usize {
        self.groups.len()
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }
}

/// The gocd manager's own keys.
#[derive(Clone, PartialEq, Eq)]
pub struct GocdSettings {
    /// `url`: GoCD's base URL, e.g. `https://gocd.example.org/go`; empty
    /// when not given (only `pipelines.any` rules: nothing is fetched).
    pub url: String,
    pub user: Option<String>,
    pub passwd: Option<String>,
    /// `refresh-interval`: how often the pipeline groups are re-read.
    pub refresh_interval: Duration,
    /// `timeout`: per HTTP request to GoCD.
    pub timeout: Duration,
    /// `startup-wait`: how long after start the manager's mail is held
    /// for GoCD's first answer.
    pub startup_wait: Duration,
    /// `max-states`: how many stages' last results are kept at most.
    pub max_states: usize,
}

impl std::fmt::Debug for GocdSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GocdSettings")
            .field("url", &self.url)
            .field("user", &self.user)
            .field("refresh_interval", &self.refresh_interval)
            .field("timeout", &self.timeout)
            .field("startup_wait", &self.startup_wait)
            .field("max_states", &self.max_states)
            .finish_non_exhaustive()
    }
}

pub const SPEC: ManagerSpec = ManagerSpec {
    name: "gocd",
    extra_keys: &[
        "url",
        "user",
        "passwd",
        "refresh-interval",
        "timeout",
        "startup-wait",
        "max-states",
    ],
    has_events: true,
    parse,
    build,
};

fn parse(r: &mut Reader, m: &MapView<'_>, k: &str, rules: &[RuleConfig]) -> ManagerSettings {
    let key = |s: &str| format!("{k}.{s}");
    let url = match m.get("url") {
        Some(n) if !n.is_null() => r.string(n, &key("url")).unwrap_or_default(),
        _ => String::new(),
    };
    let url_line = m.get("url").map_or(m.line(), |n| n.line);
    if url.trim().is_empty() {
        match rules.iter().find(|r| r.function.needs_groups()) {
            // mail2alert failed on every message such a rule looked at
            // (plugin/gocd.py:98-102, 326-330).
            Some(rule) => r.problem(
                url_line,
                &key("url"),
                format!(
                    "missing, but the rule at line {} ({}) needs GoCD's pipeline groups",
                    rule.line, rule.function_name
                ),
            ),
            // plugin/gocd.py:122-126: without url no cctray.xml, so no
            // stage history: FIXED/BREAKS come only from the mail seen.
            None => r.oddity(
                url_line,
                &key("url"),
                "missing: no GoCD to ask; FIXED/BREAKS are judged from the mail seen since start (as by mail2alert)",
            ),
        }
    } else if !(url.starts_with("http://") || url.starts_with("https://")) {
        r.problem(
            url_line,
            &key("url"),
            format!("{url:?} is not an http(s) URL"),
        );
    }
    let user = m
        .get("user")
        .filter(|n| !n.is_null())
        .and_then(|n| r.string(n, &key("user")));
    let mut passwd = m
        .get("passwd")
        .filter(|n| !n.is_null())
        .and_then(|n| r.secret(n, &key("passwd")));
    if passwd.is_some() && user.is_none() {
        // plugin/gocd.py:84-91: without user, GoCD is asked anonymously.
        r.oddity(
            m.line(),
            &key("passwd"),
            "given without user: ignored, GoCD is asked anonymously (as by mail2alert)",
        );
        passwd = None;
    }
    if user.is_some() && passwd.is_none() {
        r.oddity(
            m.line(),
            &key("user"),
            "given without passwd: GoCD is asked with an empty password (mail2alert could not ask at all)",
        );
    }
    let secs = |r: &mut Reader, name: &str, min: f64, max: f64, default: f64| {
        m.get(name)
            .and_then(|n| r.seconds(n, &key(name), min, max))
            .unwrap_or(Duration::from_secs_f64(default))
    };
    // mail2alert re-read the groups when older than 30 s.
    let refresh_interval = secs(r, "refresh-interval", 0.1, 86400.0, 30.0);
    let timeout = secs(r, "timeout", 0.1, 300.0, 10.0);
    // Long enough for a slow GoCD's first answer (its own `timeout` is
    // 10 s): held mail waits at most this long after start.
    let startup_wait = secs(r, "startup-wait", 0.0, 3600.0, 60.0);
    let max_states = m
        .get("max-states")
        .and_then(|n| r.int(n, &key("max-states"), 1, 10_000_000))
        .map_or(state::DEFAULT_MAX_STATES, |v| v as usize);
    ManagerSettings::Gocd(GocdSettings {
        url,
        user,
        passwd,
        refresh_interval,
        timeout,
        startup_wait,
        max_states,
    })
}

fn build(cfg: &ManagerConfig, ctx: &BuildContext<'_>) -> Result<Arc<dyn Manager>, String> {
    let ManagerSettings::Gocd(settings) = &cfg.settings else {
        return Err("the gocd manager needs url/user/passwd settings".into());
    };
    let needs_groups = cfg.rules.iter().any(|r| r.function.needs_groups());
    let counters = ctx
        .metrics
        .map(|m| m.fetch_counters(&crate::route::metrics::manager_labels(cfg)))
        .unwrap_or_default();
    let knowledge = match inherit(cfg, settings, ctx.previous) {
        Some(old) => {
            tracing::info!(
                url = %settings.url,
                pipelines = old.pipelines_known(),
                groups = old.groups().map_or(0, |g| g.len()),
                "GoCD unchanged: keeping the pipeline states and pipeline groups learnt before the reload"
            );
            old.knowledge().clone()
        }
        None => Default::default(),
    };
    Ok(Arc::new(GocdManager {
        cfg: cfg.clone(),
        source: Arc::new(GocdSource::with(settings.clone(), knowledge, counters)?),
        needs_groups,
    }))
}

/// The source of the replaced configuration whose knowledge holds for
/// `settings`: same GoCD and credentials; among several, the one of the
/// manager that wanted the same mail.
fn inherit(
    cfg: &ManagerConfig,
    settings: &GocdSettings,
    previous: &[Arc<dyn Manager>],
) -> Option<Arc<GocdSource>> {
    let same: Vec<(&Arc<dyn Manager>, &Arc<GocdSource>)> = previous
        .iter()
        .filter_map(|m| m.gocd().map(|s| (m, s)))
        .filter(|(_, s)| s.same_gocd(settings))
        .collect();
    same.iter()
        .find(|(m, _)| m.config().wanted == cfg.wanted)
        .or(same.first())
        .map(|(_, s)| (*s).clone())
}

pub struct GocdManager {
    cfg: ManagerConfig,
    source: Arc<GocdSource>,
    needs_groups: bool,
}

impl GocdManager {
    pub fn source(&self) -> &Arc<GocdSource> {
        &self.source
    }
}

impl Manager for GocdManager {
    fn config(&self) -> &ManagerConfig {
        &self.cfg
    }

    fn start(&self, shutdown: Shutdown) -> Vec<JoinHandle<()>> {
        vec![tokio::spawn(self.source.clone().run(shutdown))]
    }

    fn gocd(&self) -> Option<&Arc<GocdSource>> {
        Some(&self.source)
    }

    fn holds(&self) -> Option<String> {
        // mail2alert read cctray.xml before it answered SMTP
        // (server.py:139-145): no GoCD mail was judged without the
        // stages' last results. We listen at once and hold the mail this
        // manager wants instead, until GoCD's first answer (either way)
        // or the end of startup-wait.
        if self.source.first_attempt_done() {
            return None;
        }
        let left = self.source.startup_wait_left();
        (!left.is_zero()).then(|| {
            format!(
                "GoCD at {} has not answered yet (held for at most {:?} more)",
                self.source.settings().url,
                left
            )
        })
    }

    fn facts<'a>(&'a self, subject: String, trace: &'a mut Vec<String>) -> BoxFuture<'a, Facts> {
        Box::pin(async move {
            if !self.source.first_attempt_done() {
                tracing::warn!(
                    url = %self.source.settings().url,
                    subject = %clip(&subject, LOG_CLIP),
                    "GoCD mail routed before GoCD's first answer (startup-wait is over): \
                     FIXED/BREAKS and group rules judged without it"
                );
                trace.push(format!(
                    "GoCD has not answered within startup-wait ({:?}): routed without its \
                     pipeline groups and stage results",
                    self.source.settings().startup_wait
                ));
            }
            let groups = self.source.groups();
            if groups.is_none() && self.needs_groups {
                trace.push("no GoCD pipeline groups yet: group rules cannot match".into());
            }
            let (pipeline, event) = match subject::parse(&subject) {
                None => {
                    trace.push("subject is not a GoCD stage notification".into());
                    (None, None)
                }
                Some(run @ subject::StageRun { event: None, .. }) => {
                    trace.push(format!(
                        "pipeline {}, stage {}, no known event in the subject",
                        clip(&run.pipeline, LOG_CLIP),
                        clip(&run.stage, LOG_CLIP)
                    ));
                    (Some(run.pipeline), None)
                }
                Some(
                    run @ subject::StageRun {
                        event: Some(ev), ..
                    },
                ) => {
                    let (p, s) = (clip(&run.pipeline, LOG_CLIP), clip(&run.stage, LOG_CLIP));
                    if run.pipeline.chars().count() > state::MAX_NAME
                        || run.stage.chars().count() > state::MAX_NAME
                    {
                        // No GoCD pipeline: routed on the subject's word,
                        // never stored (the sender chooses its length).
                        self.source
                            .untracked(fetch::Untracked::NameTooLong, &run.key());
                        trace.push(format!(
                            "pipeline {p}, stage {s}, event {} (name longer than GoCD allows: \
                             not corrected, not remembered)",
                            ev.name()
                        ));
                        return Facts {
                            subject,
                            pipeline: Some(run.pipeline),
                            event: Some(ev),
                            groups,
                        };
                    }
                    let advanced = self.source.advance(&run.key(), ev);
                    let corrected = advanced.event;
                    let kept = if advanced.table_full {
                        " (max-states reached: not remembered)"
                    } else {
                        ""
                    };
                    if corrected == ev {
                        trace.push(format!(
                            "pipeline {p}, stage {s}, event {}{kept}",
                            ev.name()
                        ));
                    } else {
                        trace.push(format!(
                            "pipeline {p}, stage {s}, event {} (GoCD said {}; corrected by the stage's last result)",
                            corrected.name(),
                            ev.name()
                        ));
                    }
                    (Some(run.pipeline), Some(corrected))
                }
            };
            Facts {
                subject,
                pipeline,
                event,
                groups,
            }
        })
    }

    fn selftest(&self) -> BoxFuture<'_, Option<String>> {
        Box::pin(async move { Some(selftest(self).await) })
    }
}

/// For every pipeline group, pipeline and event: which actions the rules
/// would take (mail2alert's `Manager.test()`).
async fn selftest(m: &GocdManager) -> String {
    use std::fmt::Write;
    let src = &m.source;
    src.wait_first_attempt(src.settings().timeout * 2 + Duration::from_secs(1))
        .await;
    let mut out = String::new();
    let Some(groups) = src.groups() else {
        let err = src
            .status()
            .last_error
            .unwrap_or_else(|| "no answer".into());
        let _ = writeln!(
            out,
            "  GoCD at {}: no pipeline groups ({err})",
            src.settings().url
        );
        return out;
    };
    let _ = writeln!(
        out,
        "  GoCD at {}: {} pipeline group(s)",
        src.settings().url,
        groups.len()
    );
    for (g, pipelines) in &groups.groups {
        let _ = writeln!(out, "  pipeline group {g}:");
        for p in pipelines {
            let _ = writeln!(out, "    pipeline {p}:");
            // actions → events, in rule order.
            let mut alerts: Vec<(String, Vec<&str>)> = Vec::new();
            for ev in Event::ALL {
                let facts = Facts {
                    subject: format!("Stage [{p}/1/stage/1]"),
                    pipeline: Some(p.clone()),
                    event: Some(ev),
                    groups: Some(groups.clone()),
                };
                for rule in &m.cfg.rules {
                    if crate::route::router::rule_matches(rule, &facts) != Verdict::Match {
                        continue;
                    }
                    let actions: Vec<String> = rule.actions.iter().map(|a| a.to_string()).collect();
                    let actions = actions.join(", ");
                    match alerts.iter_mut().find(|(a, _)| *a == actions) {
                        Some((_, evs)) => {
                            if !evs.contains(&ev.name()) {
                                evs.push(ev.name())
                            }
                        }
                        None => alerts.push((actions, vec![ev.name()])),
                    }
                }
            }
            if alerts.is_empty() {
                let _ = writeln!(out, "      nobody is alerted");
            }
            for (actions, evs) in alerts {
                let _ = writeln!(out, "      {} -> {actions}", evs.join(" "));
            }
        }
    }
    out
}
