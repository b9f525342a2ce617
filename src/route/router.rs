//! The decision: which manager wants a message, which of its rules match,
//! and what that means — the deliveries and Slack posts in a [`Routing`].
//!
//! `route` does no I/O: managers answer from memory (GoCD data is
//! refreshed by background tasks, which `start` spawns and `shutdown`
//! stops). The only wait is a manager's bounded startup wait for GoCD's
//! first answer.
//!
//! Differences from mail2alert, on purpose: recipients the manager did
//! not want (a message to the GoCD address *and* a person) still get the
//! original message; a null sender never becomes `From: <>`; each address
//! gets one copy however many rules name it. `messages-we-want` is
//! compared exactly, as mail2alert compared it (plugin/mail.py:42-45);
//! with `case-insensitive`, a message taken only thanks to that option
//! still reaches its own recipients, as mail2alert would have passed it
//! on (server.py:110-112), so the option never loses mail.

use std::sync::{Arc, Mutex};

use tokio::task::JoinHandle;

use crate::route::actions::mailto;
use crate::route::actions::slack::{self, SlackClient};
use crate::route::actions::Action;
use crate::route::config::{RouteConfig, RouteConfigError, RuleConfig, Wanted};
use crate::route::managers::{self, gocd::GocdSource, BuildContext, Manager};
use crate::route::metrics::{manager_labels, RouteMetrics};
use crate::route::rules::{Facts, Verdict};
use crate::route::{Delivery, Envelope, Inbound, Routing, SlackPost};
use crate::shared::shutdown::ShutdownSignal;

/// The running decision side. Send + Sync; share it behind an `Arc`.
pub struct Router {
    managers: Vec<Arc<dyn Manager>>,
    /// `mailgend.case-insensitive`.
    case_insensitive: bool,
    /// Per manager (same order): messages it took; `None` without metrics.
    routed: Vec<Option<prometheus_client::metrics::counter::Counter>>,
    metrics: Option<Arc<RouteMetrics>>,
    slack: Option<SlackClient>,
    shutdown: ShutdownSignal,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Router {
    /// Builds the managers and starts their background work (GoCD
    /// polling). Returns at once: GoCD is not waited for here. Needs a
    /// Tokio runtime.
    pub async fn start(cfg: &RouteConfig) -> Result<Router, RouteConfigError> {
        Router::start_with(cfg, None, None).await
    }

    /// [`Router::start`] for the service: counting in `metrics`, and, on a
    /// reload, carrying over what `previous` (the router it replaces)
    /// learnt where the configuration allows (GoCD pipeline states).
    pub async fn start_with(
        cfg: &RouteConfig,
        metrics: Option<Arc<RouteMetrics>>,
        previous: Option<&Router>,
    ) -> Result<Router, RouteConfigError> {
        let router = Router::build(cfg, metrics, previous)?;
        let mut tasks = Vec::new();
        for m in &router.managers {
            tasks.extend(m.start(router.shutdown.subscribe()));
        }
        *router.tasks.lock().expect("not poisoned") = tasks;
        Ok(router)
    }

    fn build(
        cfg: &RouteConfig,
        metrics: Option<Arc<RouteMetrics>>,
        previous: Option<&Router>,
    ) -> Result<Router, RouteConfigError> {
        let ctx = BuildContext {
            metrics: metrics.as_deref(),
            previous: previous.map_or(&[], |p| p.managers.as_slice()),
        };
        let mut managers = Vec::new();
        let mut routed = Vec::new();
        for (i, m) in cfg.managers.iter().enumerate() {
            routed.push(
                metrics
                    .as_ref()
                    .map(|x| x.routed_counter(&manager_labels(m))),
            );
            let built = managers::lookup(&m.name)
                .ok_or_else(|| format!("unknown manager {:?}", m.name))
                .and_then(|spec| (spec.build)(m, &ctx))
                .map_err(|reason| {
                    let mut e =
                        RouteConfigError::single(&cfg.path, &format!("managers[{i}]"), reason);
                    e.0[0].line = Some(m.line);
                    e
                })?;
            managers.push(built);
        }
        let slack = match &cfg.slack {
            None => None,
            Some(s) => Some(
                SlackClient::new(&s.token, &s.url, std::time::Duration::from_secs(15)).map_err(
                    |e| RouteConfigError::single(&cfg.path, "slack-token", e.to_string()),
                )?,
            ),
        };
        Ok(Router {
            managers,
            case_insensitive: cfg.server.case_insensitive,
            routed,
            metrics,
            slack,
            shutdown: ShutdownSignal::new(),
            tasks: Mutex::new(Vec::new()),
        })
    }

    /// The Slack client, when `slack-token` is configured.
    pub fn slack(&self) -> Option<&SlackClient> {
        self.slack.as_ref()
    }

    /// The GoCD sources of all gocd managers (status, metrics).
    pub fn gocd_sources(&self) -> Vec<Arc<GocdSource>> {
        self.managers
            .iter()
            .filter_map(|m| m.gocd().cloned())
            .collect()
    }

    /// The managers, in configuration order (`--test`).
    pub fn managers(&self) -> &[Arc<dyn Manager>] {
        &self.managers
    }

    /// Stops the background tasks; `route` keeps working on the data it has.
    pub fn shutdown(&self) {
        self.shutdown.trigger();
        for t in self.tasks.lock().expect("not poisoned").drain(..) {
            t.abort();
        }
    }

    /// The manager that wants a message: index, manager, and whether it
    /// wants it only thanks to `case-insensitive`.
    fn wanting(&self, env: &Envelope) -> Option<(usize, &Arc<dyn Manager>, bool)> {
        self.managers.iter().enumerate().find_map(|(i, m)| {
            match wants(&m.config().wanted, env, self.case_insensitive)? {
                Match::Exact => Some((i, m, false)),
                Match::IgnoringCase => Some((i, m, true)),
            }
        })
    }

    /// Why this message must not be routed yet (see `Manager::holds`).
    pub fn holds(&self, msg: &Inbound) -> Option<String> {
        if msg.envelope.rcpt_to.is_empty() {
            return None;
        }
        let (i, m, _) = self.wanting(&msg.envelope)?;
        m.holds()
            .map(|why| format!("manager {} (managers[{i}]): {why}", m.config().name))
    }

    /// Decides what happens to one received message.
    pub async fn route(&self, msg: &Inbound) -> Routing {
        let env = &msg.envelope;
        let mut trace = Vec::new();
        if env.rcpt_to.is_empty() {
            self.count(RouteMetrics::dropped);
            trace.push("dropped: the envelope has no recipients".into());
            return Routing {
                trace,
                ..Routing::default()
            };
        }
        let found = self.wanting(env);
        let Some((index, manager, by_case)) = found else {
            self.count(RouteMetrics::forwarded_unchanged);
            trace.push("no manager wants it: passed on unchanged".into());
            return Routing {
                deliveries: vec![Delivery {
                    mail_from: env.mail_from.clone(),
                    rcpt_to: env.rcpt_to.clone(),
                    data: msg.data.clone(),
                }],
                slack: Vec::new(),
                trace,
            };
        };
        if let Some(Some(c)) = self.routed.get(index) {
            c.inc();
        }
        let cfg = manager.config();
        trace.push(format!(
            "manager {} (managers[{index}], line {}) wants it: {}{}",
            cfg.name,
            cfg.line,
            match &cfg.wanted {
                Wanted::To(a) => format!("sent to {a}"),
                Wanted::From(a) => format!("sent from {a}"),
            },
            if by_case {
                " (ignoring case: case-insensitive)"
            } else {
                ""
            }
        ));
        let subject = decode_subject(&msg.data);
        let facts = manager.facts(subject, &mut trace).await;

        let mut mail_to: Vec<&str> = Vec::new();
        let mut posts: Vec<SlackPost> = Vec::new();
        for (j, rule) in cfg.rules.iter().enumerate() {
            let verdict = rule_matches(rule, &facts);
            let what = format!("rule {j} (line {}) {}", rule.line, rule.describe());
            match verdict {
                Verdict::Match => {
                    let acts: Vec<String> = rule.actions.iter().map(|a| a.to_string()).collect();
                    trace.push(format!("{what} matched: {}", acts.join(", ")));
                    for a in &rule.actions {
                        match a {
                            Action::Mailto(addr) => mail_to.push(addr),
                            Action::Slack { channel, style } => {
                                let dup = posts.iter().any(|p| {
                                    p.style == *style && p.channel.eq_ignore_ascii_case(channel)
                                });
                                if !dup {
                                    posts.push(slack::make_post(
                                        channel,
                                        *style,
                                        &facts.subject,
                                        &msg.data,
                                    ));
                                }
                            }
                        }
                    }
                }
                Verdict::NoMatch => trace.push(format!("{what} did not match")),
                Verdict::NoGocdData => {
                    trace.push(format!("{what} not matched: no GoCD pipeline groups yet"))
                }
            }
        }

        let recipients = mailto::union(mail_to);
        let mut deliveries = Vec::new();
        if !recipients.is_empty() {
            let data = mailto::rewrite(
                &msg.data,
                env.mail_from.as_deref(),
                &recipients,
                env.peer.ip(),
            );
            trace.push(format!("rewritten copy to {}", recipients.join(", ")));
            deliveries.push(Delivery {
                mail_from: env.mail_from.clone(),
                rcpt_to: recipients.clone(),
                data: Arc::new(data),
            });
        }
        // Recipients the manager did not ask for keep the original, unless
        // a rule already sends them the rewritten copy. A message taken
        // only by ignoring case keeps all its recipients: mail2alert would
        // have passed it on to them unchanged.
        let not_taken = |r: &String| match &cfg.wanted {
            Wanted::To(wanted) if !by_case => !same_address(r, wanted, self.case_insensitive),
            Wanted::From(_) if !by_case => false,
            _ => true,
        };
        {
            let others: Vec<String> = mailto::union(
                env.rcpt_to
                    .iter()
                    .filter(|r| not_taken(r))
                    .filter(|r| !recipients.iter().any(|x| same_address(x, r, true)))
                    .map(String::as_str),
            );
            if !others.is_empty() {
                trace.push(format!(
                    "original passed on unchanged to the other recipients: {}",
                    others.join(", ")
                ));
                deliveries.push(Delivery {
                    mail_from: env.mail_from.clone(),
                    rcpt_to: others,
                    data: msg.data.clone(),
                });
            }
        }
        for p in &posts {
            trace.push(format!("Slack post to {}", p.channel));
        }
        if deliveries.is_empty() && posts.is_empty() {
            self.count(RouteMetrics::dropped);
            trace.push("dropped: no rule matched".into());
            tracing::info!(
                manager = %cfg.name,
                subject = %crate::route::limit::clip(&facts.subject, crate::route::limit::LOG_CLIP),
                from = env.mail_from.as_deref().unwrap_or("<>"),
                "message dropped: no rule matched"
            );
        }
        Routing {
            deliveries,
            slack: posts,
            trace,
        }
    }
}

impl Router {
    fn count(&self, f: fn(&RouteMetrics)) {
        if let Some(m) = &self.metrics {
            f(m);
        }
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A rule's verdict: the `events` filter first (a message without a
/// recognised event never passes one), then the function.
pub fn rule_matches(rule: &RuleConfig, facts: &Facts) -> Verdict {
    if let Some(events) = &rule.events {
        match facts.event {
            Some(e) if events.contains(&e) => {}
            _ => return Verdict::NoMatch,
        }
    }
    rule.function.check(facts)
}

enum Match {
    Exact,
    IgnoringCase,
}

/// Whether a manager wants a message: `to:` is one of the envelope
/// recipients, `from:` is the envelope sender, exactly as mail2alert
/// compared them (plugin/mail.py:42-45), or ignoring case when
/// `case_insensitive`.
fn wants(w: &Wanted, env: &Envelope, case_insensitive: bool) -> Option<Match> {
    let candidates: Vec<&str> = match w {
        Wanted::To(_) => env.rcpt_to.iter().map(String::as_str).collect(),
        Wanted::From(_) => env.mail_from.as_deref().into_iter().collect(),
    };
    let (Wanted::To(a) | Wanted::From(a)) = w;
    if candidates.iter().any(|c| same_address(c, a, false)) {
        Some(Match::Exact)
    } else if case_insensitive && candidates.iter().any(|c| same_address(c, a, true)) {
        Some(Match::IgnoringCase)
    } else {
        None
    }
}

/// Address comparison; `<…>` around either is ignored.
fn same_address(a: &str, b: &str, ignore_case: bool) -> bool {
    let strip = |s: &str| {
        s.trim()
            .trim_start_matches('<')
            .trim_end_matches('>')
            .to_string()
    };
    if ignore_case {
        strip(a).to_lowercase() == strip(b).to_lowercase()
    } else {
        strip(a) == strip(b)
    }
}

/// The Subject header, unfolded and RFC 2047-decoded; empty when missing
/// or unreadable.
pub fn decode_subject(data: &[u8]) -> String {
    match mailparse::parse_headers(data) {
        Ok((headers, _)) => {
            use mailparse::MailHeaderMap;
            headers.get_first_value("Subject").unwrap_or_default()
        }
        Err(_) => String::new(),
    }
}
