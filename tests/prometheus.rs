//! What operators look at, checked with Prometheus' own tools and a real
//! Prometheus server (Debian's `prometheus` 2.42, with `promtool`;
//! installed by `.ci/run`):
//!
//! - `promtool check rules` and `promtool test rules` on the shipped alert
//!   rules (`monitoring/`), and the rules' form: severity, annotations, a
//!   runbook section in docs/troubleshooting.md, a unit test that fires it;
//! - `promtool check metrics` on both endpoints' pages, served over HTTP;
//! - a `prometheus` process scraping a running `mailgend run` and
//!   `mailgend route` every second, with the shipped rules loaded: every
//!   dashboard query and every rule expression evaluates through the HTTP
//!   API without error and returns series, every rule is healthy, and
//!   MailgendRelayFailing really fires while the SMTP receiver refuses
//!   connections.

mod common;

use std::collections::BTreeSet;
use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{directive, event_fields, repo_path, ServiceProcess, TestEnv};
use mailgend::notify::metrics::Metrics;
use mailgend::route::metrics::RouteMetrics;
use mailgend::sandbox::smtp_sink::Fault;
use mailgend::shared::metrics;
use serde_json::{json, Value};
use yaml_rust2::YamlLoader;

const RULES: &str = "monitoring/mailgend-alerts.yml";
const RULE_TESTS: &str = "monitoring/mailgend-alerts.test.yml";
const DASHBOARD: &str = "monitoring/mailgend-dashboard.json";

fn promtool(args: &[&str], dir: &Path, stdin: Option<&str>) -> (bool, String) {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus, installed by .ci/run)");
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).unwrap();
    }
    drop(input);
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// One alerting rule of the shipped file.
struct Rule {
    alert: String,
    expr: String,
    severity: String,
    annotations: Vec<(String, String)>,
}

fn rules() -> Vec<Rule> {
    let text = std::fs::read_to_string(repo_path(RULES)).unwrap();
    let doc = &YamlLoader::load_from_str(&text).unwrap()[0];
    let mut out = Vec::new();
    for group in doc["groups"].as_vec().unwrap() {
        for r in group["rules"].as_vec().unwrap() {
            let annotations = r["annotations"]
                .as_hash()
                .map(|h| {
                    h.iter()
                        .map(|(k, v)| {
                            (
                                k.as_str().unwrap().to_string(),
                                v.as_str().unwrap_or("").to_string(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            out.push(Rule {
                alert: r["alert"].as_str().expect("alerting rules only").into(),
                expr: r["expr"].as_str().unwrap().trim().into(),
                severity: r["labels"]["severity"].as_str().unwrap_or("").into(),
                annotations,
            });
        }
    }
    out
}

/// The vector selectors of a PromQL expression that name our series or
/// `up`, with their label matchers: `mailgend_up`,
/// `mailgend_mails_failed_total{reason=~"permanent|render"}`, ….
fn selectors(expr: &str) -> Vec<String> {
    let re = regex::Regex::new(r#"\b((?:mailgend|process)_[a-z0-9_]+|up)\b(\{[^}]*\})?"#).unwrap();
    re.captures_iter(expr)
        .map(|c| c[0].to_string())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

fn dashboard_queries() -> Vec<(String, String)> {
    let d: Value =
        serde_json::from_str(&std::fs::read_to_string(repo_path(DASHBOARD)).unwrap()).unwrap();
    let mut out = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push((
                p["title"].as_str().unwrap().to_string(),
                t["expr"].as_str().unwrap().to_string(),
            ));
        }
    }
    out
}

// ------------------------------------------------------------ promtool

#[test]
fn promtool_checks_and_unit_tests_the_shipped_rules() {
    let dir = repo_path("monitoring");
    let (ok, out) = promtool(&["check", "rules", "mailgend-alerts.yml"], &dir, None);
    assert!(ok && out.contains("SUCCESS"), "{out}");
    let (ok, out) = promtool(&["test", "rules", "mailgend-alerts.test.yml"], &dir, None);
    assert!(ok && out.contains("SUCCESS"), "{out}");

    // The unit tests mean something: a rule that never fires fails them.
    let tmp = tempfile::tempdir().unwrap();
    let rules = std::fs::read_to_string(repo_path(RULES)).unwrap();
    std::fs::write(
        tmp.path().join("mailgend-alerts.yml"),
        rules.replace("mailgend_smtp_relay_ok == 0", "mailgend_smtp_relay_ok == 2"),
    )
    .unwrap();
    std::fs::copy(
        repo_path(RULE_TESTS),
        tmp.path().join("mailgend-alerts.test.yml"),
    )
    .unwrap();
    let (ok, out) = promtool(
        &["test", "rules", "mailgend-alerts.test.yml"],
        tmp.path(),
        None,
    );
    assert!(
        !ok && out.contains("MailgendRelayFailing"),
        "a broken rule passed:\n{out}"
    );
}

#[test]
fn every_alert_has_severity_annotations_a_runbook_and_a_firing_test() {
    let troubleshooting = std::fs::read_to_string(repo_path("docs/troubleshooting.md")).unwrap();
    let headings: BTreeSet<String> = troubleshooting
        .lines()
        .filter_map(|l| l.strip_prefix("### "))
        .map(|h| h.trim().to_lowercase())
        .collect();
    let tests = std::fs::read_to_string(repo_path(RULE_TESTS)).unwrap();
    let tests = &YamlLoader::load_from_str(&tests).unwrap()[0];
    let mut fired = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    for t in tests["tests"].as_vec().unwrap() {
        for a in t["alert_rule_test"].as_vec().unwrap() {
            let name = a["alertname"].as_str().unwrap().to_string();
            match a["exp_alerts"].as_vec() {
                Some(v) if !v.is_empty() => fired.insert(name),
                _ => quiet.insert(name),
            };
        }
    }
    let all = rules();
    // What the issue asks for, at least.
    for wanted in [
        "MailgendDown",
        "MailgendNotScraped",
        "MailgendNoDatabase",
        "MailgendRelayFailing",
        "MailgendMailsInDoubt",
        "MailgendGroupErrors",
        "MailgendPendingBacklogGrowing",
        "MailgendGroupOverdue",
        "MailgendReloadFailed",
        "MailgendRouteDown",
        "MailgendRouteSpoolOld",
        "MailgendRouteSpoolGrowing",
        "MailgendRouteGocdUnreachable",
        "MailgendRouteReloadFailed",
    ] {
        assert!(all.iter().any(|r| r.alert == wanted), "no alert {wanted}");
    }
    for r in &all {
        assert!(
            ["critical", "warning"].contains(&r.severity.as_str()),
            "{}: severity {:?}",
            r.alert,
            r.severity
        );
        let get = |k: &str| {
            r.annotations
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.as_str())
                .unwrap_or_else(|| panic!("{}: no annotation {k}", r.alert))
        };
        assert!(!get("summary").is_empty() && !get("description").is_empty());
        let runbook = get("runbook_url");
        let anchor = runbook
            .strip_prefix("/usr/share/doc/mailgend/troubleshooting.md#")
            .unwrap_or_else(|| panic!("{}: runbook_url {runbook}", r.alert));
        assert_eq!(anchor, r.alert.to_lowercase(), "{}", r.alert);
        assert!(
            headings.contains(anchor),
            "{}: docs/troubleshooting.md has no section `### {}`",
            r.alert,
            r.alert
        );
        assert!(fired.contains(&r.alert), "{}: no test fires it", r.alert);
        assert!(
            quiet.contains(&r.alert),
            "{}: no test shows it quiet",
            r.alert
        );
    }
}

#[test]
fn the_package_installs_the_monitoring_files() {
    let cargo: toml::Value =
        toml::from_str(&std::fs::read_to_string(repo_path("Cargo.toml")).unwrap()).unwrap();
    let assets = cargo["package"]["metadata"]["deb"]["assets"]
        .as_array()
        .unwrap();
    let to_share: Vec<&str> = assets
        .iter()
        .filter(|a| a[1].as_str() == Some("usr/share/mailgend/monitoring/"))
        .map(|a| a[0].as_str().unwrap())
        .collect();
    assert_eq!(to_share, ["monitoring/*"], "{assets:?}");
    // The glob takes exactly the shipped files.
    let mut files: Vec<String> = std::fs::read_dir(repo_path("monitoring"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "mailgend-alerts.test.yml",
            "mailgend-alerts.yml",
            "mailgend-dashboard.json"
        ]
    );
}

/// The router's metrics as the router serves them (its service adds
/// scrape-time gauges first; the page is the same otherwise).
struct Router(Arc<RouteMetrics>);

impl metrics::Exposition for Router {
    fn render(&self) -> futures::future::BoxFuture<'_, String> {
        Box::pin(std::future::ready(self.0.render()))
    }
}

/// Serves `page` (a render function) on a loopback port in this process.
async fn serve<M: metrics::Exposition>(m: Arc<M>) -> (u16, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(metrics::serve(listener, m, async move {
        let _ = stopped.await;
    }));
    (port, stop)
}

/// `curl` as an operator would pipe it into promtool: no Accept header
/// beyond curl's `*/*`.
async fn curl(port: u16, accept: Option<&str>) -> (String, String) {
    let url = format!("http://127.0.0.1:{port}/metrics");
    let mut args = vec!["-sS", "--max-time", "10", "-w", "\n%{content_type}"];
    let header;
    if let Some(a) = accept {
        header = format!("Accept: {a}");
        args.extend(["-H", &header]);
    }
    args.push(&url);
    let out = tokio::process::Command::new("curl")
        .args(&args)
        .output()
        .await
        .expect("curl");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, ct) = text.rsplit_once('\n').unwrap();
    (format!("{body}\n").replace("\n\n", "\n"), ct.to_string())
}

fn check_metrics(page: &str, what: &str) {
    let (ok, out) = promtool(&["check", "metrics"], Path::new("."), Some(page));
    assert!(
        ok && out.trim().is_empty(),
        "promtool check metrics, {what}:\n{out}\n{page}"
    );
}

#[tokio::test]
async fn promtool_check_metrics_passes_on_both_endpoints() {
    let notifier = Arc::new(Metrics::new());
    notifier.mail_sent();
    notifier.observe_send(Duration::from_millis(40));
    notifier.config_reload(false);
    let router = Arc::new(RouteMetrics::new());
    router.message_replied(250);
    router.relay_delivered();
    router.set_spool(2, 30.5);
    let (np, nstop) = serve(notifier).await;
    let (rp, rstop) = serve(Arc::new(Router(router))).await;
    for (port, what) in [(np, "notifier"), (rp, "router")] {
        let (page, ct) = curl(port, None).await;
        assert_eq!(ct, metrics::TEXT_CONTENT_TYPE);
        check_metrics(&page, what);
        for family in [
            "mailgend_build_info",
            "process_cpu_seconds_total",
            "process_open_fds",
        ] {
            assert!(
                page.contains(&format!("# HELP {family} ")),
                "{what}: {family}\n{page}"
            );
        }
        // Every family has HELP and TYPE, named as its samples are.
        let mut helped = BTreeSet::new();
        let mut typed = BTreeSet::new();
        for line in page.lines() {
            let words: Vec<&str> = line.splitn(4, ' ').collect();
            match words.as_slice() {
                ["#", "HELP", name, help] if !help.is_empty() => {
                    helped.insert(name.to_string());
                }
                ["#", "TYPE", name, _] => {
                    typed.insert(name.to_string());
                }
                _ => {}
            }
        }
        assert_eq!(helped, typed, "{what}");
        for series in metrics::parse_exposition(&page).keys() {
            let name = series.split('{').next().unwrap();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|f| typed.contains(*f)))
                .unwrap_or(name);
            assert!(typed.contains(family), "{what}: {name} has no TYPE/HELP");
        }
        // What Prometheus asks for is OpenMetrics, also well-formed per
        // the same checks once converted (the real server reads it in
        // a_real_prometheus_scrapes_both_daemons_and_alerts_fire).
        let (om, ct) = curl(port, Some("application/openmetrics-text;version=1.0.0")).await;
        assert_eq!(ct, metrics::CONTENT_TYPE);
        assert!(om.ends_with("# EOF\n"), "{om}");
        // The same series in both; the values too, except the process's
        // own, which move between the two scrapes.
        let (a, b) = (
            metrics::parse_exposition(&om),
            metrics::parse_exposition(&page),
        );
        assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
        for (k, v) in &a {
            if !k.starts_with("process_") {
                assert_eq!(b[k], *v, "{what}: {k}");
            }
        }
    }
    // promtool does notice a bad page, so the clean results above mean
    // something: the OpenMetrics form names counters without `_total`.
    let (om, _) = curl(np, Some("application/openmetrics-text")).await;
    let (ok, out) = promtool(&["check", "metrics"], Path::new("."), Some(&om));
    assert!(
        !ok || !out.trim().is_empty(),
        "promtool accepted OpenMetrics:\n{out}"
    );
    let _ = (nstop.send(()), rstop.send(()));
}

// ------------------------------------------------------------ a real Prometheus

fn free_ports<const N: usize>() -> [u16; N] {
    let held: Vec<StdListener> = (0..N)
        .map(|_| StdListener::bind("127.0.0.1:0").unwrap())
        .collect();
    std::array::from_fn(|i| held[i].local_addr().unwrap().port())
}

/// A child process killed (and reaped) when dropped.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_logged(mut cmd: Command, log: &Path) -> Proc {
    let file = std::fs::File::create(log).unwrap();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    Proc {
        child,
        log: log.to_path_buf(),
    }
}

async fn wait_for<F, Fut, T>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

struct PromApi {
    base: String,
    http: reqwest::Client,
}

impl PromApi {
    async fn get(&self, path: &str, query: &[(&str, &str)]) -> Option<Value> {
        let url = reqwest::Url::parse_with_params(&format!("{}{path}", self.base), query).ok()?;
        let resp = self.http.get(url).send().await.ok()?;
        resp.json().await.ok()
    }

    /// An instant query: `Err` with Prometheus' error, else the result
    /// vector.
    async fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let v = self
            .get("/api/v1/query", &[("query", expr)])
            .await
            .ok_or("no answer")?;
        if v["status"] != "success" {
            return Err(format!("{}: {}", v["errorType"], v["error"]));
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// Polls `expr` until it returns at least one series.
    async fn series(&self, expr: &str, timeout: Duration) -> Vec<Value> {
        let start = Instant::now();
        loop {
            match self.query(expr).await {
                Ok(r) if !r.is_empty() => return r,
                Err(e) if e != "no answer" => panic!("{expr}: {e}"),
                _ => {}
            }
            assert!(
                start.elapsed() < timeout,
                "{expr}: no series after {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_both_daemons_and_alerts_fire() {
    let started = Instant::now();
    let [notifier_port, router_smtp, router_metrics, prom_port, no_gocd] = free_ports();

    // The notifier, against a throw-away database and SMTP receiver.
    let mut env = TestEnv::new().await;
    env.config_json["mailgend"] = json!({
        "workers": 1,
        "sweep_interval": 3600,
        "shutdown_deadline": 5,
        "metrics_listen": format!("127.0.0.1:{notifier_port}"),
    });
    env.config_json["logging_level"] = json!("INFO");
    let svc = ServiceProcess::start(&env, "svc");

    // The router, relaying to the same receiver; one gocd manager whose
    // GoCD never answers (so its per-manager series exist).
    let dir = env.dir.path().to_path_buf();
    let route_config = dir.join("configuration.yml");
    std::fs::write(
        &route_config,
        format!(
            "local-smtp: 127.0.0.1:{router_smtp}
remote-smtp: 127.0.0.1:{sink}
managers:
- name: gocd
  messages-we-want:
    from: go@ci.example.org
  url: http://127.0.0.1:{no_gocd}/go
  refresh-interval: 1
  startup-wait: 0
  rules:
  - actions: [mailto:dev@example.net]
    filter:
      function: pipelines.any
mailgend:
  spool: {spool}
  metrics-listen: 127.0.0.1:{router_metrics}
",
            sink = env.sink.port(),
            spool = dir.join("spool").display(),
        ),
    )
    .unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mailgend"));
    cmd.arg("route")
        .arg("-c")
        .arg(&route_config)
        .env("LOGLEVEL", "INFO")
        .env_remove("MAILGEND_LOG")
        .env_remove("NOTIFY_SOCKET");
    let route = spawn_logged(cmd, &dir.join("route.log"));
    wait_for("the router", Duration::from_secs(20), || async {
        route.log().contains("mailgend route running").then_some(())
    })
    .await;

    // Both live endpoints pass promtool.
    for (port, what) in [
        (notifier_port, "mailgend run"),
        (router_metrics, "mailgend route"),
    ] {
        let (page, _) = curl(port, None).await;
        check_metrics(&page, what);
    }

    // Prometheus: 1 s scrapes and rule evaluation, the shipped rules with
    // every `for:` shortened to 3 s (rewritten here, so the test need not
    // wait the realistic minutes; the expressions are the shipped ones).
    let prom_dir = dir.join("prometheus");
    std::fs::create_dir_all(prom_dir.join("data")).unwrap();
    let shipped = std::fs::read_to_string(repo_path(RULES)).unwrap();
    let for_re = regex::Regex::new(r"(?m)^(\s+for:) \d+[smh]$").unwrap();
    assert!(for_re.is_match(&shipped));
    std::fs::write(
        prom_dir.join("rules.yml"),
        for_re.replace_all(&shipped, "$1 3s").as_ref(),
    )
    .unwrap();
    std::fs::write(
        prom_dir.join("prometheus.yml"),
        format!(
            "global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files: [rules.yml]
scrape_configs:
  - job_name: mailgend
    static_configs: [{{targets: ['127.0.0.1:{notifier_port}']}}]
  - job_name: mailgend-route
    static_configs: [{{targets: ['127.0.0.1:{router_metrics}']}}]
"
        ),
    )
    .unwrap();
    let mut cmd = Command::new("prometheus");
    cmd.arg(format!(
        "--config.file={}",
        prom_dir.join("prometheus.yml").display()
    ))
    .arg(format!(
        "--storage.tsdb.path={}",
        prom_dir.join("data").display()
    ))
    .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
    .current_dir(&prom_dir);
    let prom = spawn_logged(cmd, &prom_dir.join("prometheus.log"));
    let api = PromApi {
        base: format!("http://127.0.0.1:{prom_port}"),
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap(),
    };
    wait_for("Prometheus ready", Duration::from_secs(30), || async {
        let r = api.http.get(format!("{}/-/ready", api.base)).send().await;
        r.ok().filter(|r| r.status().is_success()).map(|_| ())
    })
    .await;

    // Both targets up, scraped a few times (rates need two samples).
    for job in ["mailgend", "mailgend-route"] {
        api.series(
            &format!("count_over_time(up{{job=\"{job}\"}}[1m]) >= 3 and up{{job=\"{job}\"}} == 1"),
            Duration::from_secs(30),
        )
        .await;
    }

    // Traffic for the dashboard, while Prometheus watches (counters that
    // move between scrapes): one notification, one forwarded message.
    env.insert_event(
        event_fields("192.0.2.1", 64496),
        json!([directive("abuse@as64496.example.net", "Open-Redis", 64496)]),
    )
    .await;
    let env_ = lettre::address::Envelope::new(
        Some("nagios@example.org".parse().unwrap()),
        vec!["ops@example.net".parse().unwrap()],
    )
    .unwrap();
    use lettre::AsyncTransport;
    lettre::AsyncSmtpTransport::<lettre::Tokio1Executor>::builder_dangerous("127.0.0.1")
        .port(router_smtp)
        .timeout(Some(Duration::from_secs(10)))
        .build()
        .send_raw(
            &env_,
            b"From: nagios@example.org\r\nTo: ops@example.net\r\nSubject: disk full\r\n\r\nhost x\r\n",
        )
        .await
        .expect("the router accepts");
    let got = env.sink.wait_for_async(2, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 2, "{}\n{}", svc.log_text(), route.log());

    for expr in [
        "sum(increase(mailgend_mails_sent_total[5m])) > 0",
        "sum(increase(mailgend_route_messages_forwarded_unchanged_total[5m])) > 0",
        "sum(increase(mailgend_route_relay_recipients_delivered_total[5m])) > 0",
        "histogram_quantile(0.95, sum by (le) (rate(mailgend_send_duration_seconds_bucket[5m]))) > 0",
    ] {
        api.series(expr, Duration::from_secs(20)).await;
    }

    // Every dashboard query: no error, series with data.
    let queries = dashboard_queries();
    assert!(queries.len() >= 30, "{queries:?}");
    for (panel, expr) in &queries {
        let r = api.series(expr, Duration::from_secs(20)).await;
        let first = &r[0];
        println!(
            "dashboard {panel:?}: {expr} -> {} series, e.g. {} = {}",
            r.len(),
            first["metric"],
            first["value"][1]
        );
    }
    // Every rule expression evaluates, and every selector in it has
    // series (a misspelt metric would make a rule that never fires).
    let all = rules();
    for r in &all {
        api.query(&r.expr)
            .await
            .unwrap_or_else(|e| panic!("{}: {}: {e}", r.alert, r.expr));
        for sel in selectors(&r.expr) {
            let got = api.series(&sel, Duration::from_secs(10)).await;
            println!("rule {}: {sel} -> {} series", r.alert, got.len());
        }
    }
    // Prometheus evaluated each rule itself without error.
    let health = wait_for("rule health", Duration::from_secs(20), || async {
        let v = api.get("/api/v1/rules", &[]).await?;
        let rules: Vec<Value> = v["data"]["groups"]
            .as_array()?
            .iter()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        (rules.len() == all.len() && rules.iter().all(|r| r["health"] != "unknown"))
            .then_some(rules)
    })
    .await;
    for r in &health {
        assert_eq!(r["health"], "ok", "{r:#}");
    }

    // Nothing about the relay fires while it works.
    let firing = |alerts: &Value, name: &str| {
        alerts["data"]["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["labels"]["alertname"] == name && a["state"] == "firing")
            .cloned()
    };
    let alerts = api.get("/api/v1/alerts", &[]).await.unwrap();
    assert!(
        firing(&alerts, "MailgendRelayFailing").is_none(),
        "{alerts:#}"
    );

    // The SMTP receiver goes away; the next notification cannot be sent.
    env.sink.set_fault(Fault::RefuseConnections);
    env.insert_event(
        event_fields("192.0.2.2", 64497),
        json!([directive("abuse@as64497.example.net", "Open-Redis", 64497)]),
    )
    .await;
    let alert = wait_for(
        "MailgendRelayFailing firing",
        Duration::from_secs(40),
        || async {
            firing(
                &api.get("/api/v1/alerts", &[]).await?,
                "MailgendRelayFailing",
            )
        },
    )
    .await;
    println!("firing: {alert:#}");
    assert_eq!(alert["labels"]["severity"], "critical");
    assert_eq!(alert["labels"]["job"], "mailgend");
    assert!(
        alert["annotations"]["summary"]
            .as_str()
            .unwrap()
            .contains(&format!("127.0.0.1:{notifier_port}")),
        "{alert:#}"
    );

    // The waiting group shows as overdue, growing.
    api.series(
        "mailgend_oldest_due_group_age_seconds > 1",
        Duration::from_secs(20),
    )
    .await;

    // A refused reload: counted, and MailgendReloadFailed fires.
    env.write_format("50broken.toml", "[[format]]\nnmae = \"x\"\n");
    svc.signal("HUP");
    svc.wait_for_log("configuration reload refused", Duration::from_secs(10));
    let alert = wait_for(
        "MailgendReloadFailed firing",
        Duration::from_secs(30),
        || async {
            firing(
                &api.get("/api/v1/alerts", &[]).await?,
                "MailgendReloadFailed",
            )
        },
    )
    .await;
    println!("firing: {alert:#}");
    api.series(
        "mailgend_config_reloads_total{result=\"failed\"} == 1",
        Duration::from_secs(10),
    )
    .await;

    // The receiver is back: the waiting mail goes out, nothing was lost.
    env.sink.resume().unwrap();
    let got = env.sink.wait_for_async(3, Duration::from_secs(90)).await;
    assert_eq!(got.len(), 3, "{}", svc.log_text());

    drop(prom);
    drop(route);
    svc.stop();
    println!("wall time {:?}", started.elapsed());
}
