//! Talking to GoCD: its pipeline-group configuration
//! (`GET {url}/api/config/pipeline_groups`, as mail2alert reads it; the
//! newer `/api/admin/pipeline_groups` shape is understood too) and
//! `GET {url}/cctray.xml` for each pipeline's last result.
//!
//! [`GocdSource`] keeps the last good copy: a failed fetch (GoCD down,
//! 401, 5xx, garbage) is logged at WARN and counted, and routing goes on
//! with what it had.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;

use super::state::{Advanced, BuildState, StateTable};
use super::{GocdSettings, PipelineGroups};
use crate::route::limit::{clip, WarnLimiter, LOG_CLIP};
use crate::route::metrics::FetchCounters;
use crate::shared::shutdown::Shutdown;

/// Largest answer read from GoCD (a big installation's pipeline groups
/// are a few MB).
const MAX_RESPONSE: usize = 64 * 1024 * 1024;

/// What a source has learnt, from GoCD and from the mail it has seen:
/// the last good copy of the pipeline groups and each pipeline's last
/// state. Kept apart from [`GocdSource`] so that a reload that leaves a
/// manager's GoCD (url, user, passwd) unchanged hands it to the new source
/// instead of starting from nothing: shared, so a session still finishing
/// with the old router advances the same states the new one reads.
pub struct Knowledge {
    groups: RwLock<Option<Arc<PipelineGroups>>>,
    states: Mutex<StateTable>,
    cctray_seeded: std::sync::atomic::AtomicBool,
    /// Becomes true once the first fetch attempt has finished (either way).
    first_attempt: watch::Sender<bool>,
    status: Mutex<Status>,
    /// When the first source with this knowledge was created: startup-wait
    /// counts from here, so a reload does not make mail wait again.
    created: Instant,
    created_at: SystemTime,
}

impl Default for Knowledge {
    fn default() -> Self {
        Knowledge {
            groups: RwLock::new(None),
            states: Mutex::new(StateTable::default()),
            cctray_seeded: false.into(),
            first_attempt: watch::channel(false).0,
            status: Mutex::new(Status::default()),
            created: Instant::now(),
            created_at: SystemTime::now(),
        }
    }
}

/// The GoCD data one manager routes with, shared with its refresh task.
pub struct GocdSource {
    settings: GocdSettings,
    http: reqwest::Client,
    knowledge: Arc<Knowledge>,
    counters: FetchCounters,
    pub fetches_ok: AtomicU64,
    pub fetches_failed: AtomicU64,
}

/// Why a stage's result is not kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Untracked {
    NameTooLong,
    TableFull,
}

/// For logs, `--test` and metrics.
#[derive(Debug, Clone, Default)]
pub struct Status {
    pub last_success: Option<SystemTime>,
    pub last_error: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cannot reach GoCD at {url}: {reason}")]
    Network { url: String, reason: String },
    #[error("GoCD answered HTTP {status} for {url}")]
    Status { url: String, status: u16 },
    #[error("GoCD's answer from {url} was not understood: {reason}")]
    Parse { url: String, reason: String },
}

impl GocdSource {
    /// Fails only when no HTTP client can be built (TLS backend).
    pub fn new(settings: GocdSettings) -> Result<GocdSource, String> {
        GocdSource::with(settings, Arc::default(), FetchCounters::default())
    }

    /// A source that starts from `knowledge` (a fresh one, or the one of
    /// the source it replaces) and counts its fetches in `counters`.
    pub fn with(
        settings: GocdSettings,
        knowledge: Arc<Knowledge>,
        counters: FetchCounters,
    ) -> Result<GocdSource, String> {
        let http = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout)
            .user_agent(concat!("mailgend/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot set up an HTTP client for GoCD: {}", error_chain(&e)))?;
        knowledge
            .states
            .lock()
            .expect("not poisoned")
            .set_max(settings.max_states);
        if settings.url.is_empty() {
            // Nothing to ask: the "first answer" is there at once.
            knowledge.first_attempt.send_replace(true);
        }
        Ok(GocdSource {
            settings,
            http,
            knowledge,
            counters,
            fetches_ok: AtomicU64::new(0),
            fetches_failed: AtomicU64::new(0),
        })
    }

    /// Whether `settings` name the same GoCD with the same credentials, so
    /// what this source learnt holds for them too. Polling settings
    /// (`refresh-interval`, `timeout`, `startup-wait`) do not matter.
    pub fn same_gocd(&self, settings: &GocdSettings) -> bool {
        let url = |s: &GocdSettings| s.url.trim_end_matches('/').to_string();
        url(&self.settings) == url(settings)
            && self.settings.user == settings.user
            && self.settings.passwd == settings.passwd
    }

    pub fn knowledge(&self) -> &Arc<Knowledge> {
        &self.knowledge
    }

    /// Corrects `event` by the stage's last state and records it (when
    /// there is room: see [`Self::untracked`]).
    pub fn advance(&self, stage: &str, event: super::Event) -> Advanced {
        let a = self
            .knowledge
            .states
            .lock()
            .expect("not poisoned")
            .advance(stage, event);
        if a.table_full {
            self.untracked(Untracked::TableFull, stage);
        }
        a
    }

    /// Counts a stage whose result is not kept, with a WARN at most once
    /// a minute (the subjects are the sender's choice).
    pub fn untracked(&self, why: Untracked, stage: &str) {
        static WARN: WarnLimiter = WarnLimiter::new(Duration::from_secs(60));
        let reason = match why {
            Untracked::NameTooLong => {
                self.counters.untracked_long_name.inc();
                format!(
                    "its pipeline or stage name is longer than GoCD allows ({} characters)",
                    super::state::MAX_NAME
                )
            }
            Untracked::TableFull => {
                self.counters.untracked_table_full.inc();
                format!(
                    "max-states ({}) stages are known already",
                    self.settings.max_states
                )
            }
        };
        if let Some(held_back) = WARN.allow() {
            tracing::warn!(
                url = %self.settings.url,
                stage = %clip(stage, LOG_CLIP),
                held_back,
                "GoCD stage result not kept: {reason}; routed on GoCD's own word \
                 (at most one such WARN a minute; held_back counts the others)"
            );
        }
    }

    /// How many pipelines have a known last state.
    pub fn pipelines_known(&self) -> usize {
        self.knowledge.states.lock().expect("not poisoned").len()
    }

    /// Time since the pipeline groups were last read successfully; when
    /// never, since this knowledge was first asked for.
    pub fn since_last_success(&self) -> Duration {
        let since = self
            .status()
            .last_success
            .unwrap_or(self.knowledge.created_at);
        SystemTime::now().duration_since(since).unwrap_or_default()
    }

    pub fn settings(&self) -> &GocdSettings {
        &self.settings
    }

    /// The last good copy of the pipeline groups.
    pub fn groups(&self) -> Option<Arc<PipelineGroups>> {
        self.knowledge.groups.read().expect("not poisoned").clone()
    }

    pub fn status(&self) -> Status {
        self.knowledge.status.lock().expect("not poisoned").clone()
    }

    /// How much of `startup-wait` is left: the wait is bounded from the
    /// start of the router, not per message, so a hanging GoCD delays
    /// only the first few seconds of mail.
    pub fn startup_wait_left(&self) -> Duration {
        self.settings
            .startup_wait
            .saturating_sub(self.knowledge.created.elapsed())
    }

    /// Whether the first fetch attempt (groups and cctray.xml) is over.
    pub fn first_attempt_done(&self) -> bool {
        *self.knowledge.first_attempt.borrow()
    }

    /// Waits until the first fetch attempt is over, at most `limit`.
    /// Returns whether it is over.
    pub async fn wait_first_attempt(&self, limit: Duration) -> bool {
        let mut rx = self.knowledge.first_attempt.subscribe();
        let done = tokio::time::timeout(limit, rx.wait_for(|done| *done)).await;
        done.is_ok()
    }

    /// One refresh: pipeline groups always, cctray.xml until it has been
    /// read once (afterwards messages keep the states current).
    pub async fn refresh(&self) {
        let k = &self.knowledge;
        let seed = !k.cctray_seeded.load(Ordering::Relaxed);
        let (groups, cctray) = tokio::join!(self.fetch_groups(), async {
            if seed {
                Some(self.fetch_cctray().await)
            } else {
                None
            }
        });
        match groups {
            Ok(g) => {
                tracing::debug!(groups = g.len(), "GoCD pipeline groups fetched");
                *k.groups.write().expect("not poisoned") = Some(Arc::new(g));
                self.fetches_ok.fetch_add(1, Ordering::Relaxed);
                self.counters.ok.inc();
                let mut st = k.status.lock().expect("not poisoned");
                if let Some(e) = st.last_error.take() {
                    if st.last_success.is_some() {
                        tracing::info!(url = %self.settings.url, "GoCD answers again (last error: {e})");
                    }
                }
                st.last_success = Some(SystemTime::now());
            }
            Err(e) => {
                self.fetches_failed.fetch_add(1, Ordering::Relaxed);
                self.counters.failed.inc();
                let kept = if self.groups().is_some() {
                    "keeping the last good copy"
                } else {
                    "no copy yet: group rules cannot match"
                };
                let mut st = k.status.lock().expect("not poisoned");
                // WARN when GoCD starts failing or the reason changes; the
                // same failure every refresh-interval only at DEBUG (the
                // counters keep the tally).
                if st.last_error.as_deref() != Some(e.to_string().as_str()) {
                    tracing::warn!(error = %e, "GoCD pipeline groups not refreshed; {kept}");
                } else {
                    tracing::debug!(error = %e, "GoCD pipeline groups still not refreshed; {kept}");
                }
                st.last_error = Some(e.to_string());
            }
        }
        match cctray {
            Some(Ok(states)) => {
                let mut t = k.states.lock().expect("not poisoned");
                for (p, s) in &states {
                    t.seed(p, *s);
                }
                k.cctray_seeded.store(true, Ordering::Relaxed);
                tracing::debug!(
                    pipelines = states.len(),
                    "pipeline states seeded from cctray.xml"
                );
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "GoCD cctray.xml not read; FIXED/BREAKS rely on messages seen");
            }
            None => {}
        }
        k.first_attempt.send_replace(true);
    }

    /// Refreshes every `refresh_interval` until `shutdown` turns true.
    pub async fn run(self: Arc<Self>, mut shutdown: Shutdown) {
        if self.settings.url.is_empty() {
            return;
        }
        loop {
            let started = Instant::now();
            tokio::select! {
                _ = self.refresh() => {}
                _ = shutdown.recv() => return,
            }
            let next = self
                .settings
                .refresh_interval
                .saturating_sub(started.elapsed());
            tokio::select! {
                _ = tokio::time::sleep(next) => {}
                _ = shutdown.recv() => return,
            }
        }
    }

    async fn get(&self, path: &str) -> Result<String, FetchError> {
        let url = format!("{}{path}", self.settings.url.trim_end_matches('/'));
        let mut req = self.http.get(&url);
        if let Some(user) = &self.settings.user {
            req = req.basic_auth(user, self.settings.passwd.as_deref());
        }
        let resp = req.send().await.map_err(|e| FetchError::Network {
            url: url.clone(),
            reason: error_chain(&e),
        })?;
        let status = resp.status().as_u16();
        if status != 200 {
            return Err(FetchError::Status { url, status });
        }
        // Bounded: a misconfigured URL (or proxy) must not fill memory.
        let mut body = Vec::new();
        let mut resp = resp;
        while let Some(chunk) = resp.chunk().await.map_err(|e| FetchError::Network {
            url: url.clone(),
            reason: error_chain(&e),
        })? {
            if body.len() + chunk.len() > MAX_RESPONSE {
                return Err(FetchError::Parse {
                    url,
                    reason: format!("answer larger than {MAX_RESPONSE} bytes"),
                });
            }
            body.extend_from_slice(&chunk);
        }
        String::from_utf8(body).map_err(|e| FetchError::Parse {
            url,
            reason: format!("not UTF-8: {e}"),
        })
    }

    async fn fetch_groups(&self) -> Result<PipelineGroups, FetchError> {
        let text = self.get("/api/config/pipeline_groups").await?;
        parse_groups(&text).map_err(|reason| FetchError::Parse {
            url: format!("{}/api/config/pipeline_groups", self.settings.url),
            reason,
        })
    }

    async fn fetch_cctray(&self) -> Result<HashMap<String, BuildState>, FetchError> {
        let text = self.get("/cctray.xml").await?;
        parse_cctray(&text).map_err(|reason| FetchError::Parse {
            url: format!("{}/cctray.xml", self.settings.url),
            reason,
        })
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// `[{"name": G, "pipelines": [{"name": P, …}, …]}, …]` (the config API
/// mail2alert used) or `{"_embedded": {"groups": [same]}}` (the admin API).
pub fn parse_groups(text: &str) -> Result<PipelineGroups, String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let list = match &v {
        serde_json::Value::Array(a) => a,
        other => other
            .pointer("/_embedded/groups")
            .and_then(|g| g.as_array())
            .ok_or("expected a list of pipeline groups")?,
    };
    let mut groups = Vec::new();
    for g in list {
        let name = g
            .get("name")
            .and_then(|n| n.as_str())
            .ok_or("a pipeline group without a name")?;
        let pipelines = g
            .get("pipelines")
            .and_then(|p| p.as_array())
            .map(|ps| {
                ps.iter()
                    .filter_map(|p| p.get("name").and_then(|n| n.as_str()))
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        groups.push((name.to_string(), pipelines));
    }
    Ok(PipelineGroups::new(groups))
}

/// Each stage's state, keyed `pipeline/stage`, from the `<Project
/// name="pipeline :: stage">` entries (`lastBuildStatus`,
/// `lastBuildTime`); job entries (`pipeline :: stage :: job`) are skipped,
/// as mail2alert skipped them (plugin/gocd.py:139-143).
pub fn parse_cctray(text: &str) -> Result<HashMap<String, BuildState>, String> {
    use quick_xml::events::Event as X;
    let mut reader = quick_xml::Reader::from_str(text);
    let mut latest: HashMap<String, (String, Option<BuildState>)> = HashMap::new();
    let mut saw_root = false;
    loop {
        match reader.read_event().map_err(|e| e.to_string())? {
            X::Eof => break,
            X::Start(e) | X::Empty(e) => {
                match e.name().as_ref() {
                    "Projects" => {
                        saw_root = true;
                        continue;
                    }
                    "Project" => {}
                    _ => continue,
                }
                let (mut name, mut status, mut time) = (None, None, String::new());
                for a in e.attributes() {
                    let a = a.map_err(|e| e.to_string())?;
                    let value = a
                        .normalized_value(quick_xml::XmlVersion::Implicit1_0)
                        .map_err(|e| e.to_string())?
                        .into_owned();
                    match a.key.as_ref() {
                        "name" => name = Some(value),
                        "lastBuildStatus" => status = Some(value),
                        "lastBuildTime" => time = value,
                        _ => {}
                    }
                }
                let (Some(name), Some(status)) = (name, status) else {
                    continue;
                };
                let parts: Vec<&str> = name.split("::").map(str::trim).collect();
                // mail2alert failed on an entry without a stage (IndexError,
                // ending the seeding); such an entry is skipped here.
                let [pipeline, stage] = parts.as_slice() else {
                    continue;
                };
                if pipeline.is_empty() || stage.is_empty() {
                    continue;
                }
                let key = format!("{pipeline}/{stage}");
                // ISO 8601 times in one format compare as strings.
                let newer = latest.get(&key).is_none_or(|(t, _)| time > *t);
                if newer {
                    latest.insert(key, (time, BuildState::from_cctray(&status)));
                }
            }
            _ => {}
        }
    }
    if !saw_root {
        return Err("no <Projects> element".into());
    }
    Ok(latest
        .into_iter()
        .filter_map(|(p, (_, s))| s.map(|s| (p, s)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_both_shapes() {
        let a =
            parse_groups(r#"[{"name":"g1","pipelines":[{"name":"p1"},{"name":"p2"}]}]"#).unwrap();
        assert!(a.contains("g1", "p2"));
        let b =
            parse_groups(r#"{"_embedded":{"groups":[{"name":"g1","pipelines":[{"name":"p1"}]}]}}"#)
                .unwrap();
        assert!(b.contains("G1", "P1"));
        assert!(parse_groups("<html>").is_err());
        assert!(parse_groups(r#"{"message":"x"}"#).is_err());
    }

    #[test]
    fn cctray_per_stage_jobs_skipped() {
        let xml = r#"<?xml version="1.0"?><Projects>
<Project name="p :: build" lastBuildStatus="Success" lastBuildTime="2024-01-02T10:00:00Z" activity="Sleeping"/>
<Project name="p :: test" lastBuildStatus="Failure" lastBuildTime="2024-01-02T11:00:00Z" activity="Sleeping"/>
<Project name="p :: test :: job" lastBuildStatus="Failure" lastBuildTime="2024-01-02T09:00:00Z"/>
<Project name="q :: build" lastBuildStatus="Unknown" lastBuildTime="2024-01-02T10:00:00Z"/>
</Projects>"#;
        let s = parse_cctray(xml).unwrap();
        assert_eq!(s.get("p/build"), Some(&BuildState::Passing));
        assert_eq!(s.get("p/test"), Some(&BuildState::Failing));
        assert_eq!(s.get("p"), None);
        assert_eq!(s.get("q/build"), None);
        assert_eq!(s.len(), 2);
        assert!(parse_cctray("<html/>").is_err());
    }
}
