//! The alert router's Prometheus metrics (`mailgend_route_*`), served on
//! `mailgend.metrics-listen` by the same HTTP code as the notifier's
//! ([`crate::shared::metrics::serve`]).
//!
//! [`RouteMetrics`] owns every series; the names are an interface
//! (dashboards, alerts) and are spelled out only here and in
//! `docs/router.md`. Counters live for the whole process, across reloads:
//! a reload that builds new managers finds its series by their labels, so
//! no counter ever goes backwards. Gauges that describe the present (spool,
//! GoCD freshness, open connections) are set at scrape time by the service
//! ([`RouteMetrics::set_spool`] and friends), so they are never stale.
//!
//! A manager is labelled by `manager` (its `name`) and `wants` (its
//! `messages-we-want`, e.g. `from:gocd@example.org`): the configuration
//! refuses two managers wanting the same mail, so the pair is unique and,
//! unlike a list position, survives reordering the managers.

use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

use crate::route::config::{ManagerConfig, Wanted};

/// `manager` and `wants` of one manager.
pub type ManagerLabels = Vec<(&'static str, String)>;

/// The labels of a configured manager.
pub fn manager_labels(cfg: &ManagerConfig) -> ManagerLabels {
    let wants = match &cfg.wanted {
        Wanted::To(a) => format!("to:{}", a.to_lowercase()),
        Wanted::From(a) => format!("from:{}", a.to_lowercase()),
    };
    vec![("manager", cfg.name.clone()), ("wants", wants)]
}

/// A temporary or permanent failure (the `kind` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    Temporary,
    Permanent,
}

/// The GoCD fetch counters of one manager, handed to its source.
#[derive(Debug, Clone, Default)]
pub struct FetchCounters {
    pub ok: Counter,
    pub failed: Counter,
    /// Stages routed without keeping their result: name over GoCD's limit.
    pub untracked_long_name: Counter,
    /// Likewise: the state table was full (`max-states`).
    pub untracked_table_full: Counter,
}

type Gaugef = Gauge<f64, AtomicU64>;

/// Every `mailgend_route_*` series. Share as `Arc<RouteMetrics>`; all
/// methods take `&self` and are cheap (atomics; the label families take a
/// lock only when a series is first created or at scrape time).
#[derive(Debug)]
pub struct RouteMetrics {
    registry: Registry,
    received: Counter,
    accepted: Counter,
    /// `class` 4xx, 5xx.
    refused: [Counter; 2],
    routed: Family<ManagerLabels, Counter>,
    forwarded_unchanged: Counter,
    dropped: Counter,
    relay_delivered: Counter,
    /// `kind` temporary, permanent.
    relay_failures: [Counter; 2],
    bounces_sent: Counter,
    /// `result` ok, failed.
    slack_posts: [Counter; 2],
    gocd_fetches: Family<Vec<(&'static str, String)>, Counter>,
    gocd_untracked: Family<Vec<(&'static str, String)>, Counter>,
    /// `result` ok, failed.
    reloads: [Counter; 2],
    last_reload_ok: Gauge,
    spool_messages: Gauge,
    spool_oldest_age: Gaugef,
    gocd_last_success_age: Family<ManagerLabels, Gaugef>,
    gocd_pipelines_known: Family<ManagerLabels, Gauge>,
    connections_open: Gauge,
    auth_failures: Counter,
    auth_refused: Counter,
    /// `reason` total, client.
    connections_refused: [Counter; 2],
    /// `class` permanent, temporary: bounces to VERP addresses recorded.
    bounces_received: [Counter; 2],
}

impl Default for RouteMetrics {
    fn default() -> Self {
        Self::new()
    }
}

fn labelled(
    family: &Family<Vec<(&'static str, String)>, Counter>,
    key: &'static str,
    values: [&str; 2],
) -> [Counter; 2] {
    values.map(|v| family.get_or_create_owned(&vec![(key, v.to_string())]))
}

impl RouteMetrics {
    /// Registers every series; those without a manager label exist at 0
    /// from the first scrape, so `increase()` sees the first event.
    pub fn new() -> RouteMetrics {
        let mut r = Registry::default();
        // prometheus-client appends `_total` to counters and the unit to
        // names registered with one.
        let counter = |r: &mut Registry, name: &str, help: &str| {
            let c = Counter::default();
            r.register(name, help, c.clone());
            c
        };
        let received = counter(
            &mut r,
            "mailgend_route_messages_received",
            "Messages whose data a client sent to the end (accepted + refused)",
        );
        let accepted = counter(
            &mut r,
            "mailgend_route_messages_accepted",
            "Messages answered 250 after DATA (forwarded, queued or deliberately dropped)",
        );
        let refused_family = Family::<Vec<(&'static str, String)>, Counter>::default();
        let refused = labelled(&refused_family, "class", ["4xx", "5xx"]);
        r.register(
            "mailgend_route_messages_refused",
            "Messages answered 4xx (client retries) or 5xx (client bounces) after DATA, by class",
            refused_family,
        );
        let routed = Family::<ManagerLabels, Counter>::default();
        r.register(
            "mailgend_route_messages_routed",
            "Messages a manager took, by manager (name) and wants (messages-we-want)",
            routed.clone(),
        );
        let forwarded_unchanged = counter(
            &mut r,
            "mailgend_route_messages_forwarded_unchanged",
            "Messages no manager wanted, passed on unchanged to remote-smtp",
        );
        let dropped = counter(
            &mut r,
            "mailgend_route_messages_dropped",
            "Messages dropped because no recipient was left (no rule matched)",
        );
        let relay_delivered = counter(
            &mut r,
            "mailgend_route_relay_recipients_delivered",
            "Recipients accepted by remote-smtp (at once or from the spool)",
        );
        let failures_family = Family::<Vec<(&'static str, String)>, Counter>::default();
        let relay_failures = labelled(&failures_family, "kind", ["temporary", "permanent"]);
        r.register(
            "mailgend_route_relay_recipient_failures",
            "Recipients remote-smtp did not accept in one attempt, by kind (temporary: retried; permanent: bounced)",
            failures_family,
        );
        let bounces_sent = counter(
            &mut r,
            "mailgend_route_bounces_sent",
            "Bounces (delivery status notifications) accepted by remote-smtp",
        );
        let slack_family = Family::<Vec<(&'static str, String)>, Counter>::default();
        let slack_posts = labelled(&slack_family, "result", ["ok", "failed"]);
        r.register(
            "mailgend_route_slack_posts",
            "Slack posts attempted, by result",
            slack_family,
        );
        let gocd_fetches = Family::<Vec<(&'static str, String)>, Counter>::default();
        r.register(
            "mailgend_route_gocd_fetches",
            "Reads of GoCD's pipeline groups, by manager, wants and result",
            gocd_fetches.clone(),
        );
        let gocd_untracked = Family::<Vec<(&'static str, String)>, Counter>::default();
        r.register(
            "mailgend_route_gocd_stages_untracked",
            "GoCD mails whose stage result was not kept (name too long, or max-states reached), by manager, wants and reason",
            gocd_untracked.clone(),
        );
        let auth_failures = counter(
            &mut r,
            "mailgend_route_auth_failures",
            "SMTP AUTH attempts answered 535 (wrong credentials)",
        );
        let auth_refused = counter(
            &mut r,
            "mailgend_route_auth_refused",
            "SMTP AUTH attempts answered 421 because the address spent its auth-failure-limit",
        );
        let bounce_family = Family::<Vec<(&'static str, String)>, Counter>::default();
        let bounces_received = labelled(&bounce_family, "class", ["permanent", "temporary"]);
        // Named as issue 19 asks (no `route_`): it counts notifications'
        // bounces, whichever process received them.
        r.register(
            "mailgend_bounces",
            "Bounces to VERP addresses recorded in mailgend.bounce (one per failed recipient), by class",
            bounce_family,
        );
        let conn_family = Family::<Vec<(&'static str, String)>, Counter>::default();
        let connections_refused = labelled(&conn_family, "reason", ["total", "client"]);
        r.register(
            "mailgend_route_connections_refused",
            "Connections answered 421 at once: max-connections (total) or max-connections-per-client (client) reached",
            conn_family,
        );
        let reloads_family = Family::<Vec<(&'static str, String)>, Counter>::default();
        let reloads = labelled(&reloads_family, "result", ["ok", "failed"]);
        r.register(
            "mailgend_route_config_reloads",
            "SIGHUP reloads, by result (failed: the previous configuration stays)",
            reloads_family,
        );
        let last_reload_ok = Gauge::default();
        last_reload_ok.set(1);
        r.register(
            "mailgend_route_config_last_reload_successful",
            "1 when the last (re)load of the configuration succeeded, 0 when the last reload was refused",
            last_reload_ok.clone(),
        );
        let spool_messages = Gauge::default();
        r.register(
            "mailgend_route_spool_messages",
            "Messages in the spool (accepted, not yet fully delivered)",
            spool_messages.clone(),
        );
        let spool_oldest_age = Gaugef::default();
        r.register_with_unit(
            "mailgend_route_spool_oldest_age",
            "Age of the oldest message in the spool (0 when empty)",
            Unit::Seconds,
            spool_oldest_age.clone(),
        );
        let gocd_last_success_age = Family::<ManagerLabels, Gaugef>::default();
        r.register_with_unit(
            "mailgend_route_gocd_last_success_age",
            "Time since GoCD's pipeline groups were last read successfully, by manager (since the first attempt when never)",
            Unit::Seconds,
            gocd_last_success_age.clone(),
        );
        let gocd_pipelines_known = Family::<ManagerLabels, Gauge>::default();
        r.register(
            "mailgend_route_gocd_pipelines_known",
            "Pipelines whose last result (passing/failing) the manager knows",
            gocd_pipelines_known.clone(),
        );
        let connections_open = Gauge::default();
        r.register(
            "mailgend_route_connections_open",
            "Inbound SMTP connections open now (max-connections is the limit)",
            connections_open.clone(),
        );
        crate::shared::metrics::register_build_info_and_process(&mut r, "router");
        RouteMetrics {
            registry: r,
            received,
            accepted,
            refused,
            routed,
            forwarded_unchanged,
            dropped,
            relay_delivered,
            relay_failures,
            bounces_sent,
            slack_posts,
            gocd_fetches,
            gocd_untracked,
            reloads,
            last_reload_ok,
            spool_messages,
            spool_oldest_age,
            gocd_last_success_age,
            gocd_pipelines_known,
            connections_open,
            auth_failures,
            auth_refused,
            connections_refused,
            bounces_received,
        }
    }

    pub fn auth_failed(&self) {
        self.auth_failures.inc();
    }

    pub fn auth_refused(&self) {
        self.auth_refused.inc();
    }

    /// A connection refused at once; `per_client`: by
    /// `max-connections-per-client` rather than `max-connections`.
    pub fn connection_refused(&self, per_client: bool) {
        self.connections_refused[usize::from(per_client)].inc();
    }

    /// A message's final reply after DATA, by its code.
    pub fn message_replied(&self, code: u16) {
        self.received.inc();
        match code {
            200..=299 => self.accepted.inc(),
            400..=499 => self.refused[0].inc(),
            _ => self.refused[1].inc(),
        };
    }

    /// The counter of messages a manager took (kept by the router).
    pub fn routed_counter(&self, labels: &ManagerLabels) -> Counter {
        self.routed.get_or_create_owned(labels)
    }

    pub fn forwarded_unchanged(&self) {
        self.forwarded_unchanged.inc();
    }

    pub fn dropped(&self) {
        self.dropped.inc();
    }

    pub fn relay_delivered(&self) {
        self.relay_delivered.inc();
    }

    pub fn relay_failed(&self, kind: FailureKind) {
        match kind {
            FailureKind::Temporary => self.relay_failures[0].inc(),
            FailureKind::Permanent => self.relay_failures[1].inc(),
        };
    }

    /// A bounce recorded; `permanent` or temporary.
    pub fn bounce_received(&self, permanent: bool) {
        self.bounces_received[usize::from(!permanent)].inc();
    }

    pub fn bounce_sent(&self) {
        self.bounces_sent.inc();
    }

    pub fn slack_post(&self, ok: bool) {
        self.slack_posts[usize::from(!ok)].inc();
    }

    pub fn reload(&self, ok: bool) {
        self.reloads[usize::from(!ok)].inc();
        self.last_reload_ok.set(i64::from(ok));
    }

    /// The fetch counters of a gocd manager (created at 0 so the first
    /// failure shows as an increase).
    pub fn fetch_counters(&self, labels: &ManagerLabels) -> FetchCounters {
        let with = |result: &str| {
            let mut l = labels.clone();
            l.push(("result", result.to_string()));
            self.gocd_fetches.get_or_create_owned(&l)
        };
        let untracked = |reason: &str| {
            let mut l = labels.clone();
            l.push(("reason", reason.to_string()));
            self.gocd_untracked.get_or_create_owned(&l)
        };
        FetchCounters {
            ok: with("ok"),
            failed: with("failed"),
            untracked_long_name: untracked("name_too_long"),
            untracked_table_full: untracked("table_full"),
        }
    }

    /// Spool depth and the age of its oldest entry (scrape time).
    pub fn set_spool(&self, messages: usize, oldest_age_seconds: f64) {
        self.spool_messages
            .set(i64::try_from(messages).unwrap_or(i64::MAX));
        self.spool_oldest_age.set(oldest_age_seconds.max(0.0));
    }

    pub fn set_connections_open(&self, n: usize) {
        self.connections_open
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Replaces the per-manager GoCD gauges with the running managers'
    /// (scrape time): a manager removed by a reload disappears instead of
    /// showing a frozen value.
    pub fn set_gocd(&self, managers: &[(ManagerLabels, f64, usize)]) {
        self.gocd_last_success_age.clear();
        self.gocd_pipelines_known.clear();
        for (labels, age, known) in managers {
            self.gocd_last_success_age
                .get_or_create(labels)
                .set(age.max(0.0));
            self.gocd_pipelines_known
                .get_or_create(labels)
                .set(i64::try_from(*known).unwrap_or(i64::MAX));
        }
    }

    /// The page in the OpenMetrics text format
    /// ([`crate::shared::metrics::CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!("encoding metrics failed: {e}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared::metrics::parse_exposition;

    #[test]
    fn series_exist_at_zero_and_move() {
        let m = RouteMetrics::new();
        let v = parse_exposition(&m.render());
        for s in [
            "mailgend_route_messages_received_total",
            "mailgend_route_messages_refused_total{class=\"4xx\"}",
            "mailgend_route_relay_recipient_failures_total{kind=\"permanent\"}",
            "mailgend_route_slack_posts_total{result=\"failed\"}",
            "mailgend_route_spool_oldest_age_seconds",
            "mailgend_route_connections_open",
            "mailgend_route_relay_recipients_delivered_total",
        ] {
            assert_eq!(v.get(s), Some(&0.0), "{s}");
        }
        assert_eq!(v["mailgend_route_config_last_reload_successful"], 1.0);
        assert!(v
            .keys()
            .any(|k| k.starts_with("mailgend_build_info{") && k.contains("daemon=\"router\"")));
        assert!(v.contains_key("process_resident_memory_bytes"));
        m.reload(false);
        let v = parse_exposition(&m.render());
        assert_eq!(v["mailgend_route_config_last_reload_successful"], 0.0);
        assert_eq!(
            v["mailgend_route_config_reloads_total{result=\"failed\"}"],
            1.0
        );
        m.reload(true);
        let v = parse_exposition(&m.render());
        assert_eq!(v["mailgend_route_config_last_reload_successful"], 1.0);
        m.message_replied(250);
        m.message_replied(451);
        m.message_replied(554);
        m.message_replied(554);
        let labels = vec![
            ("manager", "gocd".to_string()),
            ("wants", "from:g@x".into()),
        ];
        m.routed_counter(&labels).inc();
        m.fetch_counters(&labels).failed.inc();
        m.set_gocd(&[(labels.clone(), 12.5, 3)]);
        let v = parse_exposition(&m.render());
        assert_eq!(v["mailgend_route_messages_received_total"], 4.0);
        assert_eq!(v["mailgend_route_messages_accepted_total"], 1.0);
        assert_eq!(
            v["mailgend_route_messages_refused_total{class=\"4xx\"}"],
            1.0
        );
        assert_eq!(
            v["mailgend_route_messages_refused_total{class=\"5xx\"}"],
            2.0
        );
        assert_eq!(
            v["mailgend_route_messages_routed_total{manager=\"gocd\",wants=\"from:g@x\"}"],
            1.0
        );
        assert_eq!(
            v["mailgend_route_gocd_fetches_total{manager=\"gocd\",wants=\"from:g@x\",result=\"failed\"}"],
            1.0
        );
        assert_eq!(
            v["mailgend_route_gocd_fetches_total{manager=\"gocd\",wants=\"from:g@x\",result=\"ok\"}"],
            0.0
        );
        assert_eq!(
            v["mailgend_route_gocd_pipelines_known{manager=\"gocd\",wants=\"from:g@x\"}"],
            3.0
        );
        m.set_gocd(&[]);
        let page = m.render();
        assert!(
            !page.contains("mailgend_route_gocd_pipelines_known{"),
            "{page}"
        );
    }
}
