//! Prometheus metrics of the always-on service and the `/metrics` endpoint.
//!
//! [`Metrics`] owns every series the service exports; the names are an
//! interface (dashboards and alerts use them), so they are spelled out once,
//! here, and nowhere else. The rest of the code calls small methods
//! (`mail_sent`, `observe_send`, …) and never sees a metrics library type.
//!
//! Why `prometheus-client`: it is the Prometheus project's own Rust client,
//! kept up to date with the OpenMetrics text format (escaping, `_total`
//! suffixes, histogram `le` buckets, `# EOF`), and it has no process-global
//! registry, so tests and several services in one process cannot see each
//! other's numbers. Writing the exposition format by hand is easy to get
//! subtly wrong (label escaping, float formatting) for no gain.
//!
//! Why a hand-written HTTP reader instead of `hyper`: the endpoint answers
//! one GET on a fixed path and nothing else. A bounded read of one request
//! head (request line + headers, at most [`ServeLimits::max_head`] bytes,
//! within [`ServeLimits::head_timeout`]), a fixed response and
//! `Connection: close` is about a hundred lines that are easy to audit,
//! whereas hyper + hyper-util + http-body would add several crates and an
//! API to keep up with for that surface. Keep-alive is deliberately not
//! offered: Prometheus scrapes every 15–60 s and reconnecting costs nothing.
//!
//! [`serve`] serves any [`Exposition`], so the alert router's metrics
//! (`route::metrics`) use the same endpoint code with their own registry.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

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
    /// reads; serve it as [`CONTENT_TYPE`]).
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

/// The content type of [`Metrics::render`]'s output (OpenMetrics 1.0).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The content type of the classic Prometheus text format (0.0.4), served
/// to clients that do not ask for OpenMetrics ([`to_classic_text`]).
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The exposition formats `/metrics` offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0 text ([`CONTENT_TYPE`]): what Prometheus asks for.
    OpenMetrics,
    /// The classic Prometheus text format 0.0.4 ([`TEXT_CONTENT_TYPE`]):
    /// what `curl`, `promtool check metrics` and older scrapers read.
    Classic,
}

impl Format {
    /// Chooses by the request's `Accept` header, as Prometheus' own client
    /// libraries do: OpenMetrics only when the client names it (with a
    /// q-value above 0 and not below the one it gives `text/plain`);
    /// everything else, a missing header and `*/*` included, gets the
    /// classic format, which every Prometheus tool reads.
    pub fn negotiate(accept: Option<&str>) -> Format {
        let Some(accept) = accept else {
            return Format::Classic;
        };
        let (mut om, mut text) = (None::<f64>, None::<f64>);
        for range in accept.split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or("").to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.split_once('='))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
                .and_then(|(_, v)| v.trim().parse::<f64>().ok())
                .unwrap_or(1.0);
            let slot = match media.as_str() {
                "application/openmetrics-text" => &mut om,
                "text/plain" => &mut text,
                _ => continue,
            };
            *slot = Some(slot.map_or(q, |old: f64| old.max(q)));
        }
        match om {
            Some(q) if q > 0.0 && q >= text.unwrap_or(0.0) => Format::OpenMetrics,
            _ => Format::Classic,
        }
    }

    /// The `Content-Type` of a page in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => CONTENT_TYPE,
            Format::Classic => TEXT_CONTENT_TYPE,
        }
    }
}

/// Rewrites an OpenMetrics page as written by `prometheus-client` into the
/// classic text format: a counter family's `# HELP`/`# TYPE` name gets the
/// `_total` its samples carry (OpenMetrics names the family without it,
/// the classic format names it like its samples, and `promtool check
/// metrics` reports "no help text" otherwise), `unknown` becomes
/// `untyped`, and `# UNIT` and `# EOF` (unknown to the classic format) go.
/// Samples are the same in both formats for the types used here (counter,
/// gauge, histogram; no exemplars, no `_created`).
pub fn to_classic_text(openmetrics: &str) -> String {
    let mut counters = std::collections::HashSet::new();
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let Some((name, kind)) = rest.split_once(' ') {
                if kind == "counter" {
                    counters.insert(name.to_string());
                }
            }
        }
    }
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let comment = ["# HELP ", "# TYPE "]
            .into_iter()
            .find(|p| line.starts_with(p));
        match comment {
            Some(prefix) => {
                let rest = &line[prefix.len()..];
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                out.push_str(prefix);
                out.push_str(name);
                if counters.contains(name) && !name.ends_with("_total") {
                    out.push_str("_total");
                }
                out.push(' ');
                out.push_str(if prefix == "# TYPE " && tail == "unknown" {
                    "untyped"
                } else {
                    tail
                });
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// The version of this build, from Cargo.toml.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Registers what both daemons export besides their own series:
/// `mailgend_build_info{version,daemon} 1` (joins in queries show which
/// version runs where; a restart shows as a change of
/// `process_start_time_seconds`) and Prometheus' standard `process_*`
/// families, read from `/proc/self` at scrape time.
pub fn register_build_info_and_process(registry: &mut Registry, daemon: &'static str) {
    let info = Family::<[(&'static str, &'static str); 2], Gauge>::default();
    info.get_or_create(&[("version", VERSION), ("daemon", daemon)])
        .set(1);
    registry.register(
        "mailgend_build_info",
        "Always 1; the labels say which version of mailgend runs and which daemon this is",
        info,
    );
    registry.register_collector(Box::new(ProcessCollector));
}

/// Prometheus' standard process metrics (the names client_golang and
/// client_python use, so existing dashboards and alerts work): CPU time,
/// resident and virtual memory, open and maximum file descriptors, start
/// time. `prometheus-client` has no such collector, hence this small
/// reader of `/proc/self` (Linux only; elsewhere the families are absent).
#[derive(Debug)]
struct ProcessCollector;

/// One reading of `/proc/self`.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessStats {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    pub start_time_seconds: f64,
    pub open_fds: u64,
    pub max_fds: u64,
}

impl ProcessStats {
    /// Reads the current process's figures; `None` where `/proc` is not
    /// Linux's.
    pub fn read() -> Option<ProcessStats> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let boot = std::fs::read_to_string("/proc/stat").ok()?;
        // SAFETY: sysconf and getrlimit only read process-wide settings.
        let (ticks, page, max_fds) = unsafe {
            let mut lim = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            let max = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
                lim.rlim_cur
            } else {
                0
            };
            (
                libc::sysconf(libc::_SC_CLK_TCK),
                libc::sysconf(libc::_SC_PAGESIZE),
                max,
            )
        };
        if ticks <= 0 || page <= 0 {
            return None;
        }
        let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
        Self::parse(&stat, &boot, ticks as f64, page as u64, open_fds, max_fds)
    }

    /// The parsing part of [`ProcessStats::read`]: `stat` is
    /// `/proc/self/stat`, `boot` `/proc/stat` (for `btime`).
    fn parse(
        stat: &str,
        boot: &str,
        ticks: f64,
        page: u64,
        open_fds: u64,
        max_fds: u64,
    ) -> Option<ProcessStats> {
        // The command name (field 2) is in parentheses and may hold spaces
        // and parentheses itself: the fields proper start after the last ')'.
        let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
        // proc(5) numbers fields from 1; fields[0] is field 3 (state).
        let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
        let btime: u64 = boot
            .lines()
            .find_map(|l| l.strip_prefix("btime "))?
            .trim()
            .parse()
            .ok()?;
        Some(ProcessStats {
            cpu_seconds: (field(14)? + field(15)?) as f64 / ticks,
            start_time_seconds: btime as f64 + field(22)? as f64 / ticks,
            virtual_bytes: field(23)?,
            resident_bytes: field(24)? * page,
            open_fds,
            max_fds,
        })
    }
}

impl prometheus_client::collector::Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;
        let Some(s) = ProcessStats::read() else {
            return Ok(());
        };
        let cpu = ConstCounter::new(s.cpu_seconds);
        cpu.encode(encoder.encode_descriptor(
            // `_total` is added by the encoder.
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            None,
            cpu.metric_type(),
        )?)?;
        let gauges: [(&str, &str, f64); 5] = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                s.resident_bytes as f64,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                s.virtual_bytes as f64,
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds",
                s.start_time_seconds,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors",
                s.open_fds as f64,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors",
                s.max_fds as f64,
            ),
        ];
        for (name, help, value) in gauges {
            let g = ConstGauge::new(value);
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        Ok(())
    }
}

/// Reads an exposition page (OpenMetrics or Prometheus text) into
/// `series → value`, where a series is the metric name with its labels as
/// written on the page, e.g. `mailgend_mails_failed_total{reason="render"}`.
/// Comment lines (`# HELP`, `# TYPE`, `# EOF`, …) and unparsable lines are
/// skipped; a timestamp after the value is ignored.
pub fn parse_exposition(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some((series, value)) = split_sample(line) {
            out.insert(series.to_string(), value);
        }
    }
    out
}

/// Splits `name{labels} value [timestamp]` at the end of the series, which
/// for a labelled series is the `}` outside quotes (label values may hold
/// spaces, braces and escaped quotes).
fn split_sample(line: &str) -> Option<(&str, f64)> {
    let series_end = match line.find(['{', ' ', '\t']) {
        Some(i) if line.as_bytes()[i] == b'{' => {
            let mut in_quotes = false;
            let mut escaped = false;
            let mut end = None;
            for (j, c) in line[i..].char_indices() {
                match c {
                    _ if escaped => escaped = false,
                    '\\' if in_quotes => escaped = true,
                    '"' => in_quotes = !in_quotes,
                    '}' if !in_quotes => {
                        end = Some(i + j + 1);
                        break;
                    }
                    _ => {}
                }
            }
            end?
        }
        Some(i) => i,
        None => return None,
    };
    let series = &line[..series_end];
    let value = line[series_end..].split_whitespace().next()?;
    Some((series, value.parse().ok()?))
}

/// Limits of the `/metrics` server against clients that are slow, huge or
/// many. [`serve`] uses [`ServeLimits::default`].
#[derive(Clone, Debug)]
pub struct ServeLimits {
    /// The whole request head must arrive within this time (slowloris).
    pub head_timeout: Duration,
    /// Largest request head accepted, in bytes.
    pub max_head: usize,
    /// Connections handled at once; more are closed right away.
    pub max_connections: usize,
}

impl Default for ServeLimits {
    fn default() -> Self {
        ServeLimits {
            head_timeout: Duration::from_secs(5),
            max_head: 8 * 1024,
            max_connections: 32,
        }
    }
}

/// What the `/metrics` endpoint serves: anything that can render its
/// current values as an exposition page. The notifier's [`Metrics`] and the
/// alert router's `route::metrics::RouteMetrics` share one HTTP server.
/// Rendering may do a little I/O first (the router counts its spool
/// directory at scrape time), hence a future.
pub trait Exposition: Send + Sync + 'static {
    /// The page in the OpenMetrics format ([`CONTENT_TYPE`]); the server
    /// converts it for clients that want the classic one.
    fn render(&self) -> BoxFuture<'_, String>;
}

impl Exposition for Metrics {
    fn render(&self) -> BoxFuture<'_, String> {
        Box::pin(std::future::ready(Metrics::render(self)))
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown` completes, then
/// returns. Binding is the caller's job, so a taken port is a clear startup
/// error there. Errors accepting one connection are logged and do not end
/// the server (a flood of clients must not stop the mailer's metrics).
pub async fn serve<M: Exposition + ?Sized>(
    listener: TcpListener,
    metrics: Arc<M>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, metrics, shutdown, ServeLimits::default()).await
}

/// [`serve`] with explicit limits (the tests use short timeouts).
pub async fn serve_with<M: Exposition + ?Sized>(
    listener: TcpListener,
    metrics: Arc<M>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    limits: ServeLimits,
) -> std::io::Result<()> {
    let limits = Arc::new(limits);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            // Reap finished connection tasks so the set does not grow.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and friends: back off briefly instead of
                        // spinning on the same error.
                        tracing::warn!("metrics endpoint: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    tracing::debug!("metrics endpoint: too many connections, closing {peer}");
                    drop(stream);
                    continue;
                };
                let metrics = metrics.clone();
                let limits = limits.clone();
                conns.spawn(async move {
                    let _permit = permit;
                    if let Err(e) = handle(stream, &*metrics, &limits).await {
                        tracing::debug!("metrics endpoint: {peer}: {e}");
                    }
                });
            }
        }
    }
    // Scrapes in flight are cut off: a scraper retries, and shutdown must not
    // wait for a slow client.
    conns.shutdown().await;
    Ok(())
}

/// Why a connection was closed without a normal response.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("request head not complete within {0:?}")]
    Timeout(Duration),
    #[error("request head larger than {0} bytes")]
    TooLarge(usize),
    #[error("connection closed before a complete request head")]
    Incomplete,
    #[error("malformed request line")]
    Malformed,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// One connection: read one request head, answer, close.
async fn handle<M: Exposition + ?Sized>(
    mut stream: TcpStream,
    metrics: &M,
    limits: &ServeLimits,
) -> Result<(), ConnError> {
    let head =
        match tokio::time::timeout(limits.head_timeout, read_head(&mut stream, limits.max_head))
            .await
        {
            Ok(r) => r,
            Err(_) => Err(ConnError::Timeout(limits.head_timeout)),
        };
    let head = match head {
        Ok(h) => h,
        Err(e @ ConnError::TooLarge(_)) => {
            respond(
                &mut stream,
                431,
                "Request Header Fields Too Large",
                "text/plain; charset=utf-8",
                b"request head too large\n",
                true,
            )
            .await?;
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    let Some((method, target)) = parse_request_line(&head) else {
        respond(
            &mut stream,
            400,
            "Bad Request",
            "text/plain; charset=utf-8",
            b"bad request\n",
            true,
        )
        .await?;
        return Err(ConnError::Malformed);
    };
    let with_body = method == "GET";
    if method != "GET" && method != "HEAD" {
        return respond(
            &mut stream,
            405,
            "Method Not Allowed",
            "text/plain; charset=utf-8",
            b"only GET and HEAD\n",
            true,
        )
        .await;
    }
    // The query string is ignored (Prometheus may add ?name[]=… parameters).
    let path = target.split('?').next().unwrap_or(target);
    match path {
        "/metrics" => {
            let format = Format::negotiate(header(&head, "accept"));
            let page = metrics.render().await;
            let body = match format {
                Format::OpenMetrics => page,
                Format::Classic => to_classic_text(&page),
            };
            respond(
                &mut stream,
                200,
                "OK",
                format.content_type(),
                body.as_bytes(),
                with_body,
            )
            .await
        }
        "/" => {
            respond(
                &mut stream,
                200,
                "OK",
                "text/plain; charset=utf-8",
                b"mailgend: metrics are at /metrics\n",
                with_body,
            )
            .await
        }
        _ => {
            respond(
                &mut stream,
                404,
                "Not Found",
                "text/plain; charset=utf-8",
                b"not found; metrics are at /metrics\n",
                with_body,
            )
            .await
        }
    }
}

/// Reads until the blank line that ends the request head. Returns the head
/// (without the blank line); what follows (a body) is never read, since the
/// connection is closed after the response.
async fn read_head(stream: &mut TcpStream, max: usize) -> Result<String, ConnError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(ConnError::Incomplete);
        }
        buf.extend_from_slice(&chunk[..n]);
        // Bare LF line ends are tolerated (RFC 9112 §2.2), hence both forms.
        let end = match (find(&buf, b"\r\n\r\n"), find(&buf, b"\n\n")) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if let Some(end) = end {
            if end > max {
                return Err(ConnError::TooLarge(max));
            }
            return String::from_utf8(buf[..end].to_vec()).map_err(|_| ConnError::Malformed);
        }
        if buf.len() > max {
            return Err(ConnError::TooLarge(max));
        }
    }
}

/// The value of header `name` (lower case) in a request head; the first
/// one when repeated.
fn header<'h>(head: &'h str, name: &str) -> Option<&'h str> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// `METHOD SP request-target SP HTTP/1.x` → (method, target).
fn parse_request_line(head: &str) -> Option<(&str, &str)> {
    let line = head.lines().next()?.trim_end_matches('\r');
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some()
        || method.is_empty()
        || !method.bytes().all(|b| b.is_ascii_uppercase())
        || !target.starts_with('/')
        || !(version == "HTTP/1.1" || version == "HTTP/1.0")
    {
        return None;
    }
    Some((method, target))
}

async fn respond(
    stream: &mut TcpStream,
    code: u16,
    reason: &str,
    content_type: &str,
    body: &[u8],
    with_body: bool,
) -> Result<(), ConnError> {
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let mut out = Vec::with_capacity(head.len() + body.len());
    out.extend_from_slice(head.as_bytes());
    if with_body {
        out.extend_from_slice(body);
    }
    // A client that stops reading must not hold the task forever either.
    match tokio::time::timeout(Duration::from_secs(10), async {
        stream.write_all(&out).await?;
        stream.shutdown().await
    })
    .await
    {
        Ok(r) => r.map_err(ConnError::Io),
        Err(_) => Err(ConnError::Timeout(Duration::from_secs(10))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn accept_header_negotiation() {
        use Format::*;
        // What Prometheus 2.x sends.
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
                          version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::negotiate(Some(prometheus)), OpenMetrics);
        assert_eq!(
            Format::negotiate(Some("Application/OpenMetrics-Text; version=1.0.0")),
            OpenMetrics
        );
        // curl, reqwest, browsers, no header, a classic-only scraper.
        for accept in [
            Some("*/*"),
            None,
            Some("text/html,application/xhtml+xml,*/*;q=0.8"),
            Some("text/plain;version=0.0.4;q=1,*/*;q=0.1"),
            Some("text/plain, application/openmetrics-text;q=0.5"),
            Some("application/openmetrics-text;q=0"),
            Some("application/openmetrics-text;q=bogus;;,"),
        ] {
            let want = if accept == Some("application/openmetrics-text;q=bogus;;,") {
                // An unparsable q counts as 1, as if none were given.
                OpenMetrics
            } else {
                Classic
            };
            assert_eq!(Format::negotiate(accept), want, "{accept:?}");
        }
        assert_eq!(OpenMetrics.content_type(), CONTENT_TYPE);
        assert!(Classic
            .content_type()
            .starts_with("text/plain; version=0.0.4"));
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

    #[test]
    fn proc_stat_parsing() {
        // A command name with spaces and parentheses; values from a real
        // /proc/self/stat, fields 14/15 (utime/stime) 250/50 ticks, 22
        // (starttime) 1000 ticks after boot, 23 vsize, 24 rss pages.
        let stat = "4242 (my (odd) name) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 50 0 0 \
                    20 0 7 0 1000 123456789 2048 18446744073709551615 1 1 0 0 0 0 0 4096 \
                    0 0 0 0 17 1 0 0 0 0 0";
        let boot = "cpu  1 2 3\nbtime 1700000000\nprocesses 5\n";
        let s = ProcessStats::parse(stat, boot, 100.0, 4096, 9, 1024).unwrap();
        assert_eq!(s.cpu_seconds, 3.0);
        assert_eq!(s.start_time_seconds, 1_700_000_010.0);
        assert_eq!(s.virtual_bytes, 123_456_789);
        assert_eq!(s.resident_bytes, 2048 * 4096);
        assert_eq!((s.open_fds, s.max_fds), (9, 1024));
        assert_eq!(
            ProcessStats::parse("garbage", boot, 100.0, 4096, 0, 0),
            None
        );
        assert_eq!(
            ProcessStats::parse(stat, "cpu 1\n", 100.0, 4096, 0, 0),
            None
        );
        assert!(ProcessStats::read().is_some(), "this is Linux");
    }

    #[test]
    fn header_lookup() {
        let head = "GET /metrics HTTP/1.1\r\nHost: x\r\nACCEPT:  text/plain \r\nAccept: b";
        assert_eq!(header(head, "accept"), Some("text/plain"));
        assert_eq!(header(head, "user-agent"), None);
        assert_eq!(header("GET /accept: x HTTP/1.1", "get /accept"), None);
    }

    #[test]
    fn exposition_parser_handles_quotes_timestamps_and_junk() {
        let v = parse_exposition(
            "# HELP x y\n\
             a 1\n\
             b{l=\"sp ace } \\\" q\"} 2.5 1700000000\n\
             c{le=\"+Inf\"} +Inf\n\
             d NaN\n\
             garbage\n\
             e{unterminated=\"x} 3\n\
             f notanumber\n",
        );
        assert_eq!(v["a"], 1.0);
        assert_eq!(v["b{l=\"sp ace } \\\" q\"}"], 2.5);
        assert_eq!(v["c{le=\"+Inf\"}"], f64::INFINITY);
        assert!(v["d"].is_nan());
        assert_eq!(v.len(), 4, "{v:?}");
    }

    #[test]
    fn request_line_parsing() {
        assert_eq!(
            parse_request_line("GET /metrics HTTP/1.1\r\nHost: x"),
            Some(("GET", "/metrics"))
        );
        assert_eq!(
            parse_request_line("HEAD /?a=b HTTP/1.0"),
            Some(("HEAD", "/?a=b"))
        );
        assert_eq!(parse_request_line("GET /metrics"), None);
        assert_eq!(parse_request_line("GET metrics HTTP/1.1"), None);
        assert_eq!(parse_request_line("GET /metrics HTTP/2 x"), None);
        assert_eq!(parse_request_line("\u{16}\u{3}\u{1} /x HTTP/1.1"), None);
        assert_eq!(parse_request_line(""), None);
    }
}
