//! What both daemons' metrics share: the exposition formats (OpenMetrics
//! and the classic text, chosen by `Accept`), the build-info and process
//! series, a reader of exposition pages (status and tests), and the
//! `/metrics` HTTP endpoint (`http.rs`).
//!
//! Why `prometheus-client`: it is the Prometheus project's own Rust client,
//! kept up to date with the OpenMetrics text format (escaping, `_total`
//! suffixes, histogram `le` buckets, `# EOF`), and it has no process-global
//! registry, so tests and several services in one process cannot see each
//! other's numbers. Writing the exposition format by hand is easy to get
//! subtly wrong (label escaping, float formatting) for no gain.
//!
//! The series themselves are each daemon's own: `notify::metrics` and
//! `route::metrics`.

use std::collections::BTreeMap;

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

mod http;
mod process;

pub use http::{serve, serve_with, Exposition, ServeLimits};
use process::ProcessCollector;
pub use process::ProcessStats;

/// The content type of an [`Exposition`]'s page (OpenMetrics 1.0).
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
