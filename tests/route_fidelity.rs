//! mail2alert's routing, replayed decision by decision. Each case states
//! what mail2alert 0.2.9 does, read from its source
//! (`src/mail2alert/…` in magnus-lycka/mail2alert, cited as file:line),
//! and checks that `mailgend route` decides the same, or differs only
//! where docs/migration.md says so on purpose.
//!
//! The router runs in-process against a fake GoCD on loopback (cctray.xml
//! and the pipeline groups); the decision is read from the `Routing`
//! (who gets mail) and its trace (which event was judged).

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use mailgend::route::config;
use mailgend::route::router::Router;
use mailgend::route::{Envelope, Inbound, Routing};

/// A GoCD on loopback answering at once with these bodies.
fn fake_gocd(cctray: String, groups: &'static str) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for sock in listener.incoming() {
            let Ok(mut sock) = sock else { return };
            let cctray = cctray.clone();
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&buf).to_string();
                let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
                let (status, body) = match path.as_str() {
                    "/go/cctray.xml" => ("200 OK", cctray.as_str()),
                    "/go/api/config/pipeline_groups" => ("200 OK", groups),
                    _ => ("404 Not Found", ""),
                };
                let _ = write!(
                    sock,
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    port
}

const GROUPS: &str = r#"[{"name":"my-group","pipelines":[{"name":"ppp"},{"name":"qqq"}]},
 {"name":"other-group","pipelines":[{"name":"zzz"}]}]"#;

/// cctray.xml with `(name, lastBuildStatus)` entries.
fn cctray(entries: &[(&str, &str)]) -> String {
    let mut x = String::from("<?xml version=\"1.0\"?>\n<Projects>\n");
    for (name, status) in entries {
        x.push_str(&format!(
            "<Project name=\"{name}\" activity=\"Sleeping\" lastBuildStatus=\"{status}\" \
             lastBuildLabel=\"1\" lastBuildTime=\"2026-12-01T10:00:00Z\" webUrl=\"http://ci/go\"/>\n"
        ));
    }
    x.push_str("</Projects>\n");
    x
}

/// A gocd manager with one `pipelines.any` rule per event, each mailing
/// `<event>@example.net`, so the recipient names the judged event.
fn per_event_rules() -> String {
    ["BREAKS", "CANCELLED", "FAILS", "FIXED", "PASSES"]
        .iter()
        .map(|e| {
            format!(
                "  - actions: [mailto:{}@example.net]\n    filter: {{function: pipelines.any, events: [{e}]}}\n",
                e.to_lowercase()
            )
        })
        .collect()
}

fn gocd_yaml(port: u16, rules: &str) -> String {
    format!(
        "local-smtp: localhost:1025
remote-smtp: localhost:8025
managers:
- name: gocd
  url: http://127.0.0.1:{port}/go
  messages-we-want:
    to: mail2alert@example.com
  rules:
{rules}"
    )
}

async fn router(yaml: &str) -> Router {
    let cfg =
        config::parse_str(yaml, Path::new("configuration.yml")).unwrap_or_else(|e| panic!("{e}"));
    let r = Router::start(&cfg).await.unwrap();
    for src in r.gocd_sources() {
        assert!(src.wait_first_attempt(Duration::from_secs(20)).await);
    }
    r
}

fn message(from: &str, to: &[&str], subject: &str) -> Inbound {
    Inbound {
        envelope: Envelope {
            peer: "127.0.0.1:40000".parse().unwrap(),
            mail_from: Some(from.to_string()),
            rcpt_to: to.iter().map(|s| s.to_string()).collect(),
        },
        data: Arc::new(format!("From: {from}\r\nSubject: {subject}\r\n\r\nbody\r\n").into_bytes()),
        id: None,
    }
}

/// The recipients of the rewritten copy (the rules' decision).
fn alerted(r: &Routing) -> BTreeSet<String> {
    r.deliveries
        .first()
        .map(|d| d.rcpt_to.iter().cloned().collect())
        .unwrap_or_default()
}

async fn gocd_mail(r: &Router, subject: &str) -> Routing {
    r.route(&message(
        "go@example.com",
        &["mail2alert@example.com"],
        subject,
    ))
    .await
}

/// The event the router acted on, read from which per-event rule fired.
async fn judged(r: &Router, subject: &str) -> String {
    let routing = gocd_mail(r, subject).await;
    let got = alerted(&routing);
    assert!(got.len() <= 1, "{got:?} {:?}", routing.trace);
    got.into_iter()
        .next()
        .map(|a| a.split('@').next().unwrap().to_uppercase())
        .unwrap_or_else(|| format!("none: {:?}", routing.trace))
}

const VERBS: [(&str, &str); 5] = [
    ("BREAKS", "is broken"),
    ("CANCELLED", "is cancelled"),
    ("FAILS", "failed"),
    ("FIXED", "is fixed"),
    ("PASSES", "passed"),
];

/// plugin/gocd.py:383-402 with the seeded state of plugin/gocd.py:284-301
/// and 137-152: with no history GoCD's word stands (384); PASSES after a
/// failure becomes FIXED and FAILS after a success BREAKS (388-394); every
/// other disagreement keeps GoCD's word (395-400).
#[tokio::test]
async fn event_correction_by_the_stages_last_result() {
    // prev state -> (GoCD's event -> judged event)
    let table: &[(&str, [&str; 5])] = &[
        ("none", ["BREAKS", "CANCELLED", "FAILS", "FIXED", "PASSES"]),
        (
            "Success",
            ["BREAKS", "CANCELLED", "BREAKS", "FIXED", "PASSES"],
        ),
        (
            "Failure",
            ["BREAKS", "CANCELLED", "FAILS", "FIXED", "FIXED"],
        ),
    ];
    for (prev, want) in table {
        for ((event, verb), want) in VERBS.iter().zip(want) {
            let entries: Vec<(&str, &str)> = match *prev {
                "none" => vec![],
                s => vec![("ppp :: build", s)],
            };
            let port = fake_gocd(cctray(&entries), GROUPS);
            let r = router(&gocd_yaml(port, &per_event_rules())).await;
            let got = judged(&r, &format!("Stage [ppp/2/build/1] {verb}")).await;
            assert_eq!(&got, want, "after {prev}, GoCD said {event}");
            r.shutdown();
        }
    }
}

/// State is kept per `pipeline/stage` (plugin/gocd.py:382-383, 405), so a
/// pipeline whose `build` keeps passing while its `test` keeps failing is
/// neither FIXED nor BROKEN on every run; seeded per stage from cctray
/// (plugin/gocd.py:146-151), job entries skipped (140-143).
#[tokio::test]
async fn multi_stage_history_is_judged_per_stage() {
    let port = fake_gocd(
        cctray(&[
            ("ppp :: build", "Success"),
            ("ppp :: build :: compile", "Failure"),
            ("ppp :: test", "Success"),
            ("ppp :: test :: unit", "Failure"),
        ]),
        GROUPS,
    );
    let r = router(&gocd_yaml(port, &per_event_rules())).await;
    let runs: &[(&str, &str)] = &[
        ("Stage [ppp/5/build/1] passed", "PASSES"),
        // test was passing (seeded; its job entry does not count): BREAKS.
        ("Stage [ppp/5/test/1] failed", "BREAKS"),
        // The next run: build is still passing, test still failing.
        ("Stage [ppp/6/build/1] passed", "PASSES"),
        ("Stage [ppp/6/test/1] failed", "FAILS"),
        ("Stage [ppp/7/build/1] passed", "PASSES"),
        ("Stage [ppp/7/test/1] failed", "FAILS"),
        ("Stage [ppp/8/build/1] passed", "PASSES"),
        ("Stage [ppp/8/test/1] passed", "FIXED"),
        // A stage cctray never named: no history, GoCD's word.
        ("Stage [ppp/8/deploy/1] failed", "FAILS"),
        ("Stage [ppp/9/deploy/1] passed", "FIXED"),
        // Another pipeline's stage of the same name is its own.
        ("Stage [qqq/1/test/1] failed", "FAILS"),
        ("Stage [ppp/9/test/1] failed", "BREAKS"),
    ];
    for (subject, want) in runs {
        assert_eq!(&judged(&r, subject).await, want, "{subject}");
    }
    r.shutdown();
}

/// mail2alert set the state to Unknown after CANCELLED (plugin/gocd.py:291,
/// 405): the next pass after a failure stayed PASSES. We keep the previous
/// state instead (docs/migration.md: "CANCELLED keeps it"), so that pass is
/// FIXED.
#[tokio::test]
async fn cancelled_keeps_the_state_on_purpose() {
    let port = fake_gocd(cctray(&[("ppp :: build", "Failure")]), GROUPS);
    let r = router(&gocd_yaml(port, &per_event_rules())).await;
    assert_eq!(
        judged(&r, "Stage [ppp/2/build/1] is cancelled").await,
        "CANCELLED"
    );
    assert_eq!(judged(&r, "Stage [ppp/3/build/1] passed").await, "FIXED");
    r.shutdown();
}

/// The subject pattern of plugin/gocd.py:357 and the verbs of 350-356; a
/// subject that does not parse has no event (365-369), an unknown verb
/// neither (375-378). A rule with `events` never matches a message without
/// an event (219-222); a rule without `events` is checked anyway (228-229),
/// and `pipelines.any` matches it (321-322).
#[tokio::test]
async fn subjects_events_and_rules_without_events() {
    let port = fake_gocd(cctray(&[]), GROUPS);
    let rules = format!(
        "{}  - actions: [mailto:any@example.net]\n    filter: {{function: pipelines.any}}\n",
        per_event_rules()
    );
    let r = router(&gocd_yaml(port, &rules)).await;
    for (event, verb) in VERBS {
        let got = alerted(&gocd_mail(&r, &format!("Stage [zzz/1/s/1] {verb}")).await);
        let want: BTreeSet<String> = [
            format!("{}@example.net", event.to_lowercase()),
            "any@example.net".into(),
        ]
        .into();
        assert_eq!(got, want, "{verb}");
    }
    for subject in [
        "Stage [zzz/1/s/1] exploded",
        "GoCD server is low on disk",
        "Stage [zzz/1/s] passed",
    ] {
        let got = alerted(&gocd_mail(&r, subject).await);
        assert_eq!(
            got,
            BTreeSet::from(["any@example.net".to_string()]),
            "{subject}"
        );
    }
    r.shutdown();
}

/// The rule functions of plugin/gocd.py:320-346 and plugin/mail.py:74-83.
#[tokio::test]
async fn rule_functions() {
    let port = fake_gocd(cctray(&[]), GROUPS);
    let rules = "  - actions: [mailto:any@example.net]
    filter: {function: pipelines.any, events: [FAILS]}
  - actions: [mailto:all@example.net]
    filter: {function: pipelines.all, events: [FAILS]}
  - actions: [mailto:group@example.net]
    filter: {function: pipelines.in_group, args: [my-group], events: [FAILS]}
  - actions: [mailto:like@example.net]
    filter: {function: pipelines.name_like_in_group, args: ['(.+)-release.*', my-group], events: [FAILS]}
  - actions: [mailto:nogroup@example.net]
    filter: {function: pipelines.in_group, args: [no-such-group], events: [FAILS]}
";
    let yaml = format!(
        "{}- name: mail
  messages-we-want:
    from: backup@example.com
  rules:
  - actions: [mailto:sys@example.net]
    filter: {{function: mail.in_subject, args: [server, BACKUP]}}
",
        gocd_yaml(port, rules)
    );
    let r = router(&yaml).await;
    let set =
        |v: &[&str]| -> BTreeSet<String> { v.iter().map(|a| format!("{a}@example.net")).collect() };
    // any/all: every pipeline (321-324); in_group: pipelines of the group
    // (326-333); an unknown group has none (313-318).
    assert_eq!(
        alerted(&gocd_mail(&r, "Stage [ppp/1/s/1] failed").await),
        set(&["any", "all", "group"])
    );
    assert_eq!(
        alerted(&gocd_mail(&r, "Stage [zzz/1/s/1] failed").await),
        set(&["any", "all"])
    );
    // name_like_in_group: re.search anywhere, group(1) in the group
    // (335-346); the release pipeline itself is in no group.
    assert_eq!(
        alerted(&gocd_mail(&r, "Stage [ppp-release-1.2/1/s/1] failed").await),
        set(&["any", "all", "like"])
    );
    assert_eq!(
        alerted(&gocd_mail(&r, "Stage [x-ppp-release-1.2/1/s/1] failed").await),
        set(&["any", "all"]),
        "group(1) is x-ppp"
    );
    // mail.in_subject: every word, ignoring case (plugin/mail.py:77-81).
    let mail = |s: &str| message("backup@example.com", &["ops@example.org"], s);
    assert_eq!(
        alerted(&r.route(&mail("Server Backup done")).await),
        set(&["sys"])
    );
    let r2 = r.route(&mail("server restarted")).await;
    assert!(r2.deliveries.is_empty(), "{:?}", r2.trace);
    r.shutdown();
}

/// `filter.events` as mail2alert tested it: `event.name in events`
/// (plugin/gocd.py:223): a list by membership, a string by substring;
/// unknown names never match; no `events` means every event (228-229).
#[tokio::test]
async fn events_filter_forms() {
    let port = fake_gocd(cctray(&[]), GROUPS);
    let rules = "  - actions: [mailto:string@example.net]
    filter: {function: pipelines.any, events: BREAKS}
  - actions: [mailto:twostring@example.net]
    filter: {function: pipelines.any, events: 'FIXED, PASSES'}
  - actions: [mailto:lower@example.net]
    filter: {function: pipelines.any, events: [breaks]}
  - actions: [mailto:none@example.net]
    filter: {function: pipelines.any}
";
    let r = router(&gocd_yaml(port, rules)).await;
    let set =
        |v: &[&str]| -> BTreeSet<String> { v.iter().map(|a| format!("{a}@example.net")).collect() };
    assert_eq!(
        alerted(&gocd_mail(&r, "Stage [zzz/1/s/1] is broken").await),
        set(&["string", "none"])
    );
    assert_eq!(
        alerted(&gocd_mail(&r, "Stage [zzz/1/s/1] is fixed").await),
        set(&["twostring", "none"])
    );
    assert_eq!(
        alerted(&gocd_mail(&r, "Stage [zzz/2/s/1] passed").await),
        set(&["twostring", "none"])
    );
    assert_eq!(
        alerted(&gocd_mail(&r, "Stage [zzz/3/t/1] failed").await),
        set(&["none"])
    );
    r.shutdown();
}

/// Which manager takes a message: the first that wants it (server.py:100-109);
/// `to:` is one of the envelope recipients and `from:` the sender, both
/// compared exactly (plugin/mail.py:42-45); `to:` wins when both are given
/// (42-44). Mail nobody wants passes unchanged (server.py:110-112).
#[tokio::test]
async fn which_manager_takes_a_message() {
    let yaml = "local-smtp: localhost:1025
remote-smtp: localhost:8025
managers:
- name: mail
  messages-we-want: {to: first@example.com, from: ignored@example.com}
  rules:
  - actions: [mailto:first-rule@example.net]
    filter: {function: mail.in_subject, args: [x]}
- name: mail
  messages-we-want: {to: first@example.com}
  rules:
  - actions: [mailto:never@example.net]
    filter: {function: mail.in_subject, args: [x]}
- name: mail
  messages-we-want: {from: go@example.com}
  rules:
  - actions: [mailto:second-rule@example.net]
    filter: {function: mail.in_subject, args: [x]}
";
    let r = router(yaml).await;
    let one = |v: &str| BTreeSet::from([v.to_string()]);
    let m = r
        .route(&message("go@example.com", &["first@example.com"], "x"))
        .await;
    assert_eq!(
        alerted(&m),
        one("first-rule@example.net"),
        "first match wins"
    );
    let m = r
        .route(&message("ignored@example.com", &["a@example.org"], "x"))
        .await;
    assert_eq!(
        alerted(&m),
        one("a@example.org"),
        "`from` beside `to` is ignored"
    );
    let m = r
        .route(&message("go@example.com", &["a@example.org"], "x"))
        .await;
    assert_eq!(alerted(&m), one("second-rule@example.net"));
    // Exact: another case is not the manager's; the mail reaches its own
    // recipient unchanged, as mail2alert forwarded it.
    let msg = message("GO@example.com", &["a@example.org"], "x");
    let m = r.route(&msg).await;
    assert_eq!(m.deliveries.len(), 1);
    assert_eq!(m.deliveries[0].rcpt_to, vec!["a@example.org"]);
    assert!(Arc::ptr_eq(&m.deliveries[0].data, &msg.data), "unchanged");
    let m = r
        .route(&message("go@example.com", &["FIRST@example.com"], "x"))
        .await;
    assert_eq!(
        alerted(&m),
        one("second-rule@example.net"),
        "to: is exact too"
    );
    r.shutdown();
}

/// Actions as actions.py:13-19 parsed them: an unknown scheme is logged and
/// skipped while the `mailto:` beside it fires; `actions: []` and a rule
/// without `actions` do nothing (rules.py:9); when no address results the
/// mail is dropped (server.py:113-115).
#[tokio::test]
async fn actions_as_mail2alert_parsed_them() {
    let yaml = "local-smtp: localhost:1025
remote-smtp: localhost:8025
managers:
- name: mail
  messages-we-want: {to: alerts@example.com}
  rules:
  - actions: ['jira:OPS', mailto:ops@example.net, 'sms:+4612345']
    filter: {function: mail.in_subject, args: [disk]}
  - actions: []
    filter: {function: mail.in_subject, args: [disk]}
  - filter: {function: mail.in_subject, args: [disk]}
  - actions: [mailto:oncall]
    filter: {function: mail.in_subject, args: [full]}
";
    let cfg = config::parse_str(yaml, Path::new("configuration.yml")).unwrap();
    assert_eq!(cfg.warnings.len(), 5, "{:?}", cfg.warnings);
    let r = router(yaml).await;
    let m = r
        .route(&message(
            "x@example.org",
            &["alerts@example.com"],
            "disk low",
        ))
        .await;
    assert_eq!(alerted(&m), BTreeSet::from(["ops@example.net".to_string()]));
    // A bare name goes to the relay as it is, as mail2alert sent it.
    let m = r
        .route(&message(
            "x@example.org",
            &["alerts@example.com"],
            "disk full",
        ))
        .await;
    assert_eq!(
        alerted(&m),
        BTreeSet::from(["ops@example.net".to_string(), "oncall".to_string()])
    );
    let m = r
        .route(&message(
            "x@example.org",
            &["alerts@example.com"],
            "all well",
        ))
        .await;
    assert!(m.deliveries.is_empty(), "dropped: {:?}", m.trace);
    r.shutdown();
}

/// config.py:24-41 expanded `$VAR` in every string, rule args included, with
/// Python's expandvars: an unset variable stays as written.
#[tokio::test]
async fn variables_are_expanded_everywhere() {
    std::env::set_var("FIDELITY_GROUP", "my-group");
    std::env::set_var("FIDELITY_TEAM", "team");
    std::env::remove_var("FIDELITY_UNSET");
    let port = fake_gocd(cctray(&[]), GROUPS);
    let rules =
        "  - actions: [mailto:$FIDELITY_TEAM@example.net, mailto:x$FIDELITY_UNSET@example.net]
    filter: {function: pipelines.in_group, args: [$FIDELITY_GROUP], events: [FAILS]}
";
    let yaml = gocd_yaml(port, rules);
    let cfg = config::parse_str(&yaml, Path::new("configuration.yml")).unwrap();
    assert_eq!(cfg.managers[0].rules[0].args, vec!["my-group"]);
    assert!(cfg.managers[0].rules[0]
        .describe()
        .contains("pipelines.in_group(my-group)"));
    assert!(
        cfg.warnings
            .iter()
            .any(|w| w.to_string().contains("$FIDELITY_UNSET is not set")),
        "{:?}",
        cfg.warnings
    );
    let r = router(&yaml).await;
    assert_eq!(
        alerted(&gocd_mail(&r, "Stage [ppp/1/s/1] failed").await),
        BTreeSet::from([
            "team@example.net".to_string(),
            "x$FIDELITY_UNSET@example.net".to_string()
        ])
    );
    r.shutdown();
}

/// A gocd manager without `url` and only `pipelines.any` rules runs in
/// mail2alert (no cctray, plugin/gocd.py:122-126; `any` needs no groups,
/// 321-322); FIXED/BREAKS then come from the mail seen.
#[tokio::test]
async fn gocd_without_url_routes_by_the_mail_seen() {
    let yaml = format!(
        "local-smtp: localhost:1025
remote-smtp: localhost:8025
managers:
- name: gocd
  messages-we-want:
    to: mail2alert@example.com
  rules:
{}",
        per_event_rules()
    );
    let r = router(&yaml).await;
    assert_eq!(judged(&r, "Stage [ppp/1/build/1] failed").await, "FAILS");
    assert_eq!(judged(&r, "Stage [ppp/2/build/1] passed").await, "FIXED");
    assert_eq!(judged(&r, "Stage [ppp/3/build/1] failed").await, "BREAKS");
    r.shutdown();
}

/// A configuration of the kind mail2alert's users write, with every form
/// mail2alert ran with: `name:`/`owner:` on rules (rules.py:6-7), an
/// unknown action scheme beside a `mailto:` (actions.py:18-19), `events`
/// as a string (plugin/gocd.py:223), `actions: []`, a `mailto:` without a
/// domain, an unset `$VAR` and a `$` in a password (config.py:4, Python's
/// expandvars leaves them), YAML merge keys (PyYAML, config.py:16), a
/// gocd manager without `url` using only `pipelines.any`
/// (plugin/gocd.py:98-102,122-126), an unused `slack-token: $UNSET`
/// (slackbot.py:46), an unknown key (`event:`). It starts; `--check` lists
/// each oddity as a WARN and exits 0; `--check --strict` refuses it.
#[test]
fn a_mail2alert_configuration_with_every_form_starts() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let yaml = format!(
        r#"---
local-smtp: 127.0.0.1:{port}
remote-smtp: 127.0.0.1:25
slack-token: $FIDELITY_UNSET_TOKEN
defaults: &oncall
  actions: [mailto:oncall@example.com, "jira:OPS"]
managers:
- name: gocd
  user: olle
  passwd: pa$$w0rd
  messages-we-want:
    to: mail2alert@example.com
  rules:
  - name: page oncall
    owner: ops
    <<: *oncall
    filter:
      function: pipelines.any
      events: BREAKS
  - name: quiet
    actions: []
    filter:
      function: pipelines.any
      events: [FIXED]
  - actions: [mailto:ops, mailto:$FIDELITY_UNSET_TEAM@example.com]
    filter:
      function: pipelines.any
      event: [FAILS]
mailgend:
  spool: {spool}
"#,
        spool = dir.path().join("spool").display()
    );
    let path = dir.path().join("configuration.yml");
    std::fs::write(&path, yaml).unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_mailgend"))
            .args(args)
            .env_remove("FIDELITY_UNSET_TOKEN")
            .env_remove("FIDELITY_UNSET_TEAM")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let p = path.to_str().unwrap();
    let (code, out) = run(&["route", "-c", p, "--check"]);
    assert_eq!(code, Some(0), "{out}");
    for (line, what) in [
        (4, "$FIDELITY_UNSET_TOKEN is not set"),
        (4, "no rule has a slack: action"),
        (5, "key `defaults`: unknown key, ignored"),
        // A merged entry keeps the line it was written on.
        (6, "unknown action \"jira\""),
        (8, "key `managers[0].url`: missing"),
        (10, "$w0rd is not set"),
        (19, "events`: a string, not a list"),
        (21, "actions`: empty"),
        (25, "mailto:ops has no @domain"),
        (25, "$FIDELITY_UNSET_TEAM is not set"),
        (28, "filter.event`: unknown key, ignored"),
    ] {
        assert!(
            out.lines().any(|l| l.starts_with("WARN ")
                && l.contains(&format!("configuration.yml:{line}:"))
                && l.contains(what)),
            "no WARN at line {line} with {what:?}:\n{out}"
        );
    }
    assert!(!out.contains("ERROR"), "{out}");
    let (code, out) = run(&["route", "-c", p, "--check", "--strict"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("invalid router configuration"), "{out}");

    // It starts (and says what it accepted) and stops cleanly.
    let log = dir.path().join("route.log");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_mailgend"))
        .args(["route", "-c", p])
        .env_remove("FIDELITY_UNSET_TOKEN")
        .env_remove("FIDELITY_UNSET_TEAM")
        .env_remove("NOTIFY_SOCKET")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("mailgend route running") {
            break text;
        }
        assert!(child.try_wait().unwrap().is_none(), "exited:\n{text}");
        assert!(t.elapsed() < Duration::from_secs(20), "{text}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        text.contains("WARN") && text.contains("configuration accepted as mail2alert accepted it"),
        "{text}"
    );
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(0));
}
