//! The notifier's Prometheus series (`mailgend_*`).
//!
//! [`Metrics`] owns every series the service exports; the names are an
//! interface (dashboards and alerts use them), so they are spelled out once,
//! here, and nowhere else. The rest of the code calls small methods
//! (`mail_sent`, `observe_send`, …) and never sees a metrics library type.
//! The exposition format, the `/metrics` HTTP endpoint and the process
//! metrics both daemons export are in [`crate::shared::metrics`].

use std::sync::atomic::AtomicU64;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::shared::metrics::{register_build_info_and_process, Exposition};

/// Why a mail (a group's notification) was not sent; the `reason` label of
/// `mailgend_mails_failed_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FailReason {
    /// SMTP 4xx, connection trouble: the group is retried later.
    Temporary,
    /// SMTP 5xx for the recipient: retrying will not help.
    Permanent,
    /// Template, table or format error: fix the configuration.
    Render,
    /// The SMTP server may or may not have taken the mail (connection lost
    /// after DATA); see docs/operations.md.
    InDoubt,
}

impl FailReason {
    /// Every reason, so each series exists (at 0) from the first scrape and
    /// `rate()`/`increase()` see the first failure.
    pub const ALL: [FailReason; 4] = [
        FailReason::Temporary,
        FailReason::Permanent,
        FailReason::Render,
        FailReason::InDoubt,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            FailReason::Temporary => "temporary",
            FailReason::Permanent => "permanent",
            FailReason::Render => "render",
            FailReason::InDoubt => "in_doubt",
        }
    }
}

type ReasonLabels = [(&'static str, &'static str); 1];

/// Buckets for the per-group send time (render + sign + SMTP): 5 ms for a
/// small signed mail to a local relay, up to a minute for a slow or
/// greylisting relay.
const SEND_BUCKETS: [f64; 13] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Buckets for directive insertion → SMTP accepted: the same range for
/// immediate notifications, plus a few longer ones because aggregated
/// formats wait for their notification interval on purpose (minutes to
/// hours) and would otherwise all land in `+Inf`.
const INSERT_TO_SMTP_BUCKETS: [f64; 17] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
    3600.0, 86400.0,
];

/// The service's metrics. Create one per process ([`Metrics::new`]) and
/// share it as `Arc<Metrics>`; every method takes `&self` and is lock-free
/// (atomics), so calling them on the hot path is fine.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    mails_sent: Counter,
    /// One counter per [`FailReason`], in `FailReason::ALL` order, cached so
    /// the hot path does not take the family's lock.
    mails_failed: [Counter; 4],
    groups_postponed: Counter,
    smtp_errors: Counter,
    db_errors: Counter,
    in_doubt_resent: Counter,
    pending_directives: Gauge,
    due_groups: Gauge,
    in_doubt_mails: Gauge,
    workers_busy: Gauge,
    config_reload_timestamp: Gauge<f64, AtomicU64>,
    /// `result` ok, failed.
    config_reloads: [Counter; 2],
    config_last_reload_ok: Gauge,
    database_up: Gauge,
    smtp_relay_ok: Gauge,
    overdue: Gauge<f64, AtomicU64>,
    up: Gauge,
    send_duration: Histogram,
    insert_to_smtp: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every series at its zero value. `mailgend_up` starts at 0:
    /// call [`Metrics::set_up`]`(true)` when the service is ready (the same
    /// moment it tells systemd READY=1).
    pub fn new() -> Self {
        let mut registry = Registry::default();

        // prometheus-client appends `_total` to counters and the unit to
        // names registered with one, so the names below lack those suffixes.
        let mails_sent = Counter::default();
        registry.register(
            "mailgend_mails_sent",
            "Mails accepted by the SMTP server",
            mails_sent.clone(),
        );
        let failed = Family::<ReasonLabels, Counter>::default();
        let mails_failed =
            FailReason::ALL.map(|r| failed.get_or_create_owned(&[("reason", r.as_str())]));
        registry.register(
            "mailgend_mails_failed",
            "Mails not sent, by reason (temporary, permanent, render, in_doubt)",
            failed,
        );
        let groups_postponed = Counter::default();
        registry.register(
            "mailgend_groups_postponed",
            "Groups whose format decided to wait (not yet due, or postponed)",
            groups_postponed.clone(),
        );
        let smtp_errors = Counter::default();
        registry.register(
            "mailgend_smtp_errors",
            "SMTP connection or protocol errors",
            smtp_errors.clone(),
        );
        let db_errors = Counter::default();
        registry.register(
            "mailgend_db_errors",
            "Database errors (connection lost, query failed)",
            db_errors.clone(),
        );
        let in_doubt_resent = Counter::default();
        registry.register(
            "mailgend_in_doubt_resent",
            "In-doubt mails that were sent again",
            in_doubt_resent.clone(),
        );

        let pending_directives = Gauge::default();
        registry.register(
            "mailgend_pending_directives",
            "Directives not yet sent",
            pending_directives.clone(),
        );
        let due_groups = Gauge::default();
        registry.register(
            "mailgend_due_groups",
            "Groups due for sending now",
            due_groups.clone(),
        );
        let in_doubt_mails = Gauge::default();
        registry.register(
            "mailgend_in_doubt_mails",
            "Mails whose delivery is in doubt and awaits a decision",
            in_doubt_mails.clone(),
        );
        let workers_busy = Gauge::default();
        registry.register(
            "mailgend_workers_busy",
            "Send workers working on a group right now",
            workers_busy.clone(),
        );
        let config_reload_timestamp = Gauge::<f64, AtomicU64>::default();
        registry.register_with_unit(
            "mailgend_config_reload_timestamp",
            "Unix time the configuration was last (re)loaded successfully",
            Unit::Seconds,
            config_reload_timestamp.clone(),
        );
        let reloads = Family::<ReasonLabels, Counter>::default();
        let config_reloads =
            ["ok", "failed"].map(|r| reloads.get_or_create_owned(&[("result", r)]));
        registry.register(
            "mailgend_config_reloads",
            "SIGHUP reloads, by result (failed: the previous configuration stays in force)",
            reloads,
        );
        let config_last_reload_ok = Gauge::default();
        config_last_reload_ok.set(1);
        registry.register(
            "mailgend_config_last_reload_successful",
            "1 when the last (re)load of the configuration succeeded, 0 when the last reload was refused",
            config_last_reload_ok.clone(),
        );
        let database_up = Gauge::default();
        registry.register(
            "mailgend_database_up",
            "1 while the last attempt to reach the database succeeded, 0 while it is unreachable or queries fail",
            database_up.clone(),
        );
        let smtp_relay_ok = Gauge::default();
        smtp_relay_ok.set(1);
        registry.register(
            "mailgend_smtp_relay_ok",
            "0 after the SMTP relay could not be reached, answered 4xx or broke the connection; 1 again once it accepts a mail (1 before the first attempt)",
            smtp_relay_ok.clone(),
        );
        let overdue = Gauge::<f64, AtomicU64>::default();
        registry.register_with_unit(
            "mailgend_oldest_due_group_age",
            "How long the group that has been due longest has waited without being sent (0 when none waits)",
            Unit::Seconds,
            overdue.clone(),
        );
        let up = Gauge::default();
        registry.register(
            "mailgend_up",
            "1 while the service is ready (config, database and signing key usable)",
            up.clone(),
        );

        let send_duration = Histogram::new(SEND_BUCKETS);
        registry.register_with_unit(
            "mailgend_send_duration",
            "Time to render, sign and hand one group's mail to SMTP",
            Unit::Seconds,
            send_duration.clone(),
        );
        let insert_to_smtp = Histogram::new(INSERT_TO_SMTP_BUCKETS);
        registry.register_with_unit(
            "mailgend_insert_to_smtp",
            "Time from a directive's inserted_at to the SMTP server accepting its mail",
            Unit::Seconds,
            insert_to_smtp.clone(),
        );

        register_build_info_and_process(&mut registry, "notifier");

        Metrics {
            registry,
            mails_sent,
            mails_failed,
            groups_postponed,
            smtp_errors,
            db_errors,
            in_doubt_resent,
            pending_directives,
            due_groups,
            in_doubt_mails,
            workers_busy,
            config_reload_timestamp,
            config_reloads,
            config_last_reload_ok,
            database_up,
            smtp_relay_ok,
            overdue,
            up,
            send_duration,
            insert_to_smtp,
        }
    }

    /// One mail accepted by the SMTP server.
    pub fn mail_sent(&self) {
        self.mails_sent.inc();
    }

    /// One mail not sent, for `reason`.
    pub fn mail_failed(&self, reason: FailReason) {
        let i = FailReason::ALL
            .iter()
            .position(|r| *r == reason)
            .expect("ALL lists every reason");
        self.mails_failed[i].inc();
    }

    /// One group postponed by its format.
    pub fn group_postponed(&self) {
        self.groups_postponed.inc();
    }

    /// One SMTP error (connect, TLS, protocol, rejected command).
    pub fn smtp_error(&self) {
        self.smtp_errors.inc();
    }

    /// One database error.
    pub fn db_error(&self) {
        self.db_errors.inc();
    }

    /// One in-doubt mail sent again.
    pub fn in_doubt_resent(&self) {
        self.in_doubt_resent.inc();
    }

    /// Time for one group: render + sign + SMTP.
    pub fn observe_send(&self, d: Duration) {
        self.send_duration.observe(d.as_secs_f64());
    }

    /// Time from a directive's `inserted_at` to SMTP acceptance (observe
    /// once per directive, or once per group with its oldest directive).
    pub fn observe_insert_to_smtp(&self, d: Duration) {
        self.insert_to_smtp.observe(d.as_secs_f64());
    }

    /// Directives not yet sent (from the database).
    pub fn set_pending_directives(&self, n: i64) {
        self.pending_directives.set(n);
    }

    /// Groups due now.
    pub fn set_due_groups(&self, n: i64) {
        self.due_groups.set(n);
    }

    /// Mails in doubt.
    pub fn set_in_doubt(&self, n: i64) {
        self.in_doubt_mails.set(n);
    }

    /// Marks a worker busy until the returned guard is dropped (also on an
    /// early return or a panic unwinding through the worker).
    #[must_use = "the worker counts as busy only while the guard lives"]
    pub fn worker_busy(&self) -> WorkerBusy {
        self.workers_busy.inc();
        WorkerBusy {
            gauge: self.workers_busy.clone(),
        }
    }

    /// Records that the configuration was (re)loaded just now.
    pub fn config_reloaded(&self) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        self.config_reload_timestamp.set(now);
    }

    /// Records a SIGHUP reload: `ok` (the new configuration is in force) or
    /// refused (the previous one stays).
    pub fn config_reload(&self, ok: bool) {
        self.config_reloads[usize::from(!ok)].inc();
        self.config_last_reload_ok.set(i64::from(ok));
        if ok {
            self.config_reloaded();
        }
    }

    /// Whether the database answered the last connection attempt or query.
    pub fn set_database_up(&self, up: bool) {
        self.database_up.set(i64::from(up));
    }

    /// Whether the relay took the last mail (`false`: unreachable, 4xx,
    /// connection broken; a 5xx for one recipient says nothing about it).
    pub fn set_smtp_relay_ok(&self, ok: bool) {
        self.smtp_relay_ok.set(i64::from(ok));
    }

    /// How long the group due longest has waited unsent.
    pub fn set_oldest_due_group_age(&self, d: Duration) {
        self.overdue.set(d.as_secs_f64());
    }

    /// Sets `mailgend_up` (1 = ready, 0 = starting, stopping or unable to
    /// work, e.g. the database is gone).
    pub fn set_up(&self, up: bool) {
        self.up.set(i64::from(up));
    }

    /// The current values in the OpenMetrics text format (which Prometheus
    /// reads; serve it as [`CONTENT_TYPE`](crate::shared::metrics::CONTENT_TYPE)).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        // Writing into a String cannot fail; an Err here would be a bug in
        // the encoder, and a partial page is still the best we can offer.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!("encoding metrics failed: {e}");
        }
        out
    }
}

/// Keeps `mailgend_workers_busy` incremented while alive.
#[derive(Debug)]
pub struct WorkerBusy {
    gauge: Gauge,
}

impl Drop for WorkerBusy {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

impl Exposition for Metrics {
    fn render(&self) -> BoxFuture<'_, String> {
        Box::pin(std::future::ready(Metrics::render(self)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared::metrics::{parse_exposition, to_classic_text, ProcessStats, VERSION};

    #[test]
    fn metrics_is_send_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Metrics>();
        assert_send_sync::<WorkerBusy>();
    }

    #[test]
    fn every_series_is_on_the_page_with_help_and_type() {
        let m = Metrics::new();
        let page = m.render();
        for name in [
            "mailgend_mails_sent",
            "mailgend_mails_failed",
            "mailgend_groups_postponed",
            "mailgend_smtp_errors",
            "mailgend_db_errors",
            "mailgend_in_doubt_resent",
            "mailgend_pending_directives",
            "mailgend_due_groups",
            "mailgend_in_doubt_mails",
            "mailgend_workers_busy",
            "mailgend_config_reload_timestamp_seconds",
            "mailgend_config_reloads",
            "mailgend_config_last_reload_successful",
            "mailgend_database_up",
            "mailgend_smtp_relay_ok",
            "mailgend_oldest_due_group_age_seconds",
            "mailgend_up",
            "mailgend_send_duration_seconds",
            "mailgend_insert_to_smtp_seconds",
            "mailgend_build_info",
            "process_cpu_seconds",
            "process_resident_memory_bytes",
            "process_virtual_memory_bytes",
            "process_start_time_seconds",
            "process_open_fds",
            "process_max_fds",
        ] {
            assert!(page.contains(&format!("# HELP {name} ")), "HELP {name}");
            assert!(page.contains(&format!("# TYPE {name} ")), "TYPE {name}");
        }
        let v = parse_exposition(&page);
        for series in [
            "mailgend_mails_sent_total",
            "mailgend_mails_failed_total{reason=\"temporary\"}",
            "mailgend_mails_failed_total{reason=\"permanent\"}",
            "mailgend_mails_failed_total{reason=\"render\"}",
            "mailgend_mails_failed_total{reason=\"in_doubt\"}",
            "mailgend_groups_postponed_total",
            "mailgend_smtp_errors_total",
            "mailgend_db_errors_total",
            "mailgend_in_doubt_resent_total",
            "mailgend_pending_directives",
            "mailgend_due_groups",
            "mailgend_in_doubt_mails",
            "mailgend_workers_busy",
            "mailgend_config_reload_timestamp_seconds",
            "mailgend_up",
            "mailgend_send_duration_seconds_count",
            "mailgend_send_duration_seconds_sum",
            "mailgend_send_duration_seconds_bucket{le=\"0.005\"}",
            "mailgend_send_duration_seconds_bucket{le=\"60.0\"}",
            "mailgend_send_duration_seconds_bucket{le=\"+Inf\"}",
            "mailgend_insert_to_smtp_seconds_count",
            "mailgend_config_reloads_total{result=\"ok\"}",
            "mailgend_config_reloads_total{result=\"failed\"}",
            "mailgend_database_up",
            "mailgend_oldest_due_group_age_seconds",
        ] {
            assert_eq!(v.get(series), Some(&0.0), "{series} at 0 in\n{page}");
        }
        assert_eq!(v["mailgend_config_last_reload_successful"], 1.0);
        assert_eq!(v["mailgend_smtp_relay_ok"], 1.0);
        assert_eq!(
            v[&format!("mailgend_build_info{{version=\"{VERSION}\",daemon=\"notifier\"}}")],
            1.0
        );
        // This very process: it holds files open and started after 2020
        // and not in the future. CPU time counts in clock ticks (10 ms):
        // burn until one is on the clock, then it must show.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let mut x = 0u64;
        while ProcessStats::read().unwrap().cpu_seconds == 0.0 {
            assert!(std::time::Instant::now() < deadline, "no CPU time counted");
            for i in 0..100_000u64 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
            }
        }
        let v = parse_exposition(&m.render());
        assert!(v["process_cpu_seconds_total"] > 0.0, "{page}");
        assert!(v["process_resident_memory_bytes"] > 1e6);
        assert!(v["process_virtual_memory_bytes"] >= v["process_resident_memory_bytes"]);
        assert!(v["process_open_fds"] >= 3.0);
        assert!(v["process_max_fds"] >= v["process_open_fds"]);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let start = v["process_start_time_seconds"];
        assert!(start > 1.6e9 && start <= now + 1.0, "{start} vs {now}");
        assert!(page.ends_with("# EOF\n"));
    }

    #[test]
    fn methods_move_the_right_series() {
        let m = Metrics::new();
        m.mail_sent();
        m.mail_sent();
        m.mail_failed(FailReason::InDoubt);
        m.mail_failed(FailReason::Render);
        m.mail_failed(FailReason::Render);
        m.group_postponed();
        m.smtp_error();
        m.db_error();
        m.in_doubt_resent();
        m.set_pending_directives(17);
        m.set_due_groups(3);
        m.set_in_doubt(1);
        m.set_up(true);
        m.config_reloaded();
        m.observe_send(Duration::from_millis(7));
        m.observe_insert_to_smtp(Duration::from_secs(120));
        m.set_database_up(true);
        m.set_oldest_due_group_age(Duration::from_millis(2500));
        m.config_reload(false);
        m.set_smtp_relay_ok(false);
        let busy = (m.worker_busy(), m.worker_busy());
        let v = parse_exposition(&m.render());
        assert_eq!(v["mailgend_mails_sent_total"], 2.0);
        assert_eq!(v["mailgend_mails_failed_total{reason=\"in_doubt\"}"], 1.0);
        assert_eq!(v["mailgend_mails_failed_total{reason=\"render\"}"], 2.0);
        assert_eq!(v["mailgend_mails_failed_total{reason=\"temporary\"}"], 0.0);
        assert_eq!(v["mailgend_groups_postponed_total"], 1.0);
        assert_eq!(v["mailgend_smtp_errors_total"], 1.0);
        assert_eq!(v["mailgend_db_errors_total"], 1.0);
        assert_eq!(v["mailgend_in_doubt_resent_total"], 1.0);
        assert_eq!(v["mailgend_pending_directives"], 17.0);
        assert_eq!(v["mailgend_due_groups"], 3.0);
        assert_eq!(v["mailgend_in_doubt_mails"], 1.0);
        assert_eq!(v["mailgend_up"], 1.0);
        assert_eq!(v["mailgend_database_up"], 1.0);
        assert_eq!(v["mailgend_smtp_relay_ok"], 0.0);
        assert_eq!(v["mailgend_oldest_due_group_age_seconds"], 2.5);
        assert_eq!(v["mailgend_config_reloads_total{result=\"failed\"}"], 1.0);
        assert_eq!(v["mailgend_config_reloads_total{result=\"ok\"}"], 0.0);
        assert_eq!(v["mailgend_config_last_reload_successful"], 0.0);
        assert_eq!(v["mailgend_workers_busy"], 2.0);
        assert!(v["mailgend_config_reload_timestamp_seconds"] > 1.7e9);
        assert_eq!(
            v["mailgend_send_duration_seconds_bucket{le=\"0.005\"}"],
            0.0
        );
        assert_eq!(v["mailgend_send_duration_seconds_bucket{le=\"0.01\"}"], 1.0);
        assert_eq!(v["mailgend_send_duration_seconds_count"], 1.0);
        assert!((v["mailgend_send_duration_seconds_sum"] - 0.007).abs() < 1e-9);
        assert_eq!(
            v["mailgend_insert_to_smtp_seconds_bucket{le=\"60.0\"}"],
            0.0
        );
        assert_eq!(
            v["mailgend_insert_to_smtp_seconds_bucket{le=\"300.0\"}"],
            1.0
        );
        drop(busy);
        let before = v["mailgend_config_reload_timestamp_seconds"];
        m.config_reload(true);
        let v = parse_exposition(&m.render());
        assert_eq!(v["mailgend_workers_busy"], 0.0);
        assert_eq!(v["mailgend_config_reloads_total{result=\"ok\"}"], 1.0);
        assert_eq!(v["mailgend_config_last_reload_successful"], 1.0);
        assert!(v["mailgend_config_reload_timestamp_seconds"] >= before);
    }

    #[test]
    fn classic_text_names_counter_families_like_their_samples() {
        let m = Metrics::new();
        m.mail_sent();
        let om = m.render();
        assert!(om.contains("# TYPE mailgend_mails_sent counter\n"), "{om}");
        assert!(om.contains("# UNIT mailgend_send_duration_seconds seconds\n"));
        let text = to_classic_text(&om);
        assert!(
            text.contains("# HELP mailgend_mails_sent_total Mails accepted"),
            "{text}"
        );
        assert!(text.contains("# TYPE mailgend_mails_sent_total counter\n"));
        assert!(text.contains("# TYPE process_cpu_seconds_total counter\n"));
        assert!(text.contains("# TYPE mailgend_send_duration_seconds histogram\n"));
        assert!(text.contains("# TYPE mailgend_up gauge\n"));
        assert!(
            !text.contains("# UNIT") && !text.contains("# EOF"),
            "{text}"
        );
        assert!(text.ends_with('\n'));
        // The samples are the same.
        assert_eq!(parse_exposition(&text), parse_exposition(&om));
        assert_eq!(
            to_classic_text("# TYPE x unknown\nx 1\n# EOF\n"),
            "# TYPE x untyped\nx 1\n"
        );
    }
}
