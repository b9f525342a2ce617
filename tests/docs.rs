//! The documentation cannot drift from the program:
//!
//! - every subcommand and long option that `mailgend --help` (and each
//!   subcommand's `--help`) prints is in `man/mailgend.8`;
//! - every key `src/config/` accepts is in `man/mailgend.conf.5` and in
//!   `docs/config.md`;
//! - both man pages render with groff without a warning;
//! - every `mailgend …` command shown in a fenced code block of README.md
//!   or docs/*.md is listed in [`TESTED_COMMANDS`] with the test that runs
//!   it for real, and that test exists.
//!
//! The commands of the operator's first run (`db migrate`, `check-config`,
//! `send --all --dry-run`, `status`, `in-doubt list`, `send --all`) and
//! `in-doubt discard` are run for real here, against a sandbox database and
//! SMTP receiver.
//!
//! Long (over 800 lines) because it is the one place where docs and source
//! meet: the documented commands with their tests, and a reader for each
//! form it compares (`--help`, roff, Markdown, the source's messages).

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use common::{directive, event_fields, repo_path, TestEnv};
use mailgend::sandbox::smtp_sink::Scope;
use mailgend::sandbox::Fault;
use serde_json::json;

/// Each command the docs show (normalised by [`normalise`]: subcommand
/// words and option names, no values, no `-c FILE`/`-v`) and the test,
/// `file::function`, that runs it with the real binary.
const TESTED_COMMANDS: &[(&str, &str, &str)] = &[
    (
        "bounces --since",
        "tests/bounces.rs",
        "a_dsn_through_mailgend_route_is_listed_with_its_ticket",
    ),
    (
        "bounces --recipient --json",
        "tests/bounces.rs",
        "a_dsn_through_mailgend_route_is_listed_with_its_ticket",
    ),
    (
        "status --bounces",
        "tests/bounces.rs",
        "a_dsn_through_mailgend_route_is_listed_with_its_ticket",
    ),
    (
        "route",
        "tests/route_server.rs",
        "unwanted_mail_is_forwarded_byte_identical_with_its_envelope",
    ),
    (
        "route --check",
        "tests/route_rules.rs",
        "binary_check_and_explain",
    ),
    (
        "route --explain",
        "tests/route_rules.rs",
        "binary_check_and_explain",
    ),
    ("route --test", "tests/route_rules.rs", "binary_selftest"),
    (
        "check-config",
        "tests/docs.rs",
        "the_operators_first_run_works_as_documented",
    ),
    (
        "db migrate",
        "tests/docs.rs",
        "the_operators_first_run_works_as_documented",
    ),
    (
        "send --all --dry-run",
        "tests/docs.rs",
        "the_operators_first_run_works_as_documented",
    ),
    (
        "send --all -n",
        "tests/docs.rs",
        "the_operators_first_run_works_as_documented",
    ),
    (
        "send --all",
        "tests/docs.rs",
        "the_operators_first_run_works_as_documented",
    ),
    (
        "status",
        "tests/docs.rs",
        "the_operators_first_run_works_as_documented",
    ),
    (
        "in-doubt list",
        "tests/docs.rs",
        "the_operators_first_run_works_as_documented",
    ),
    (
        "in-doubt release",
        "tests/send.rs",
        "the_operator_lists_releases_and_marks_in_doubt_mails",
    ),
    (
        "in-doubt mark-sent",
        "tests/send.rs",
        "mark_sent_records_an_in_doubt_mail_without_sending_it",
    ),
    (
        "in-doubt discard",
        "tests/docs.rs",
        "in_doubt_discard_renders_the_group_anew",
    ),
    (
        "run",
        "tests/service.rs",
        "an_inserted_event_is_mailed_within_two_seconds",
    ),
    // Interactive review and preview (docs/review.md).
    ("send", "tests/review.rs", "every_choice_in_a_real_terminal"),
    (
        "send -N",
        "tests/review.rs",
        "every_choice_in_a_real_terminal",
    ),
    (
        "send -n",
        "tests/review.rs",
        "every_choice_in_a_real_terminal",
    ),
    (
        "preview",
        "tests/preview.rs",
        "preview_predicts_exactly_what_send_then_sends",
    ),
    (
        "preview --attachments",
        "tests/preview.rs",
        "preview_predicts_exactly_what_send_then_sends",
    ),
    (
        "preview --json",
        "tests/preview.rs",
        "preview_predicts_exactly_what_send_then_sends",
    ),
    (
        "preview --recipient",
        "tests/preview.rs",
        "filters_select_groups",
    ),
    (
        "preview --template --limit",
        "tests/preview.rs",
        "filters_select_groups",
    ),
    (
        "preview --directive --directive",
        "tests/preview.rs",
        "filters_select_groups",
    ),
    (
        "preview --event",
        "tests/preview.rs",
        "filters_select_groups",
    ),
    (
        "preview --fail-on-error",
        "tests/preview.rs",
        "a_broken_template_shows_the_error_and_fails_only_when_asked",
    ),
];

// ---------------------------------------------------------------- helpers

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo_path(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// roff source as plain text: `\-` is a hyphen, font changes vanish.
fn man_text(rel: &str) -> String {
    let mut s = read(rel).replace("\\-", "-").replace("\\(dq", "\"");
    for f in ["\\fB", "\\fI", "\\fR", "\\fP"] {
        s = s.replace(f, "");
    }
    s
}

fn help(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_mailgend"))
        .args(args)
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success(), "mailgend {args:?} --help failed");
    String::from_utf8(out.stdout).unwrap()
}

/// The subcommand names and long options of one `--help` text.
fn parse_help(text: &str) -> (Vec<String>, Vec<String>) {
    let (mut commands, mut options) = (Vec::new(), Vec::new());
    let mut section = "";
    for line in text.lines() {
        if !line.starts_with(' ') {
            section = line.trim_end_matches(':');
            continue;
        }
        let first = line.split_whitespace().next().unwrap_or("");
        match section {
            "Commands" if first != "help" && !first.is_empty() => commands.push(first.to_string()),
            "Options" => {
                for word in line.split_whitespace().take(3) {
                    let word = word.trim_end_matches(',').trim_end_matches("...");
                    if let Some(name) = word.strip_prefix("--") {
                        if !name.is_empty() {
                            options.push(format!("--{name}"));
                        }
                    }
                }
            }
            _ => {}
        }
    }
    (commands, options)
}

/// Every key `src/config/` accepts, dotted (`smtp.tls`): the top-level
/// keys and the known keys of each `r.section(...)`.
fn config_keys() -> BTreeSet<String> {
    // The top-level keys are in `mod.rs`, each section's in its own file.
    let mut names: Vec<_> = std::fs::read_dir(repo_path("src/config"))
        .expect("src/config/")
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".rs"))
        .collect();
    names.sort();
    let src: String = names
        .iter()
        .map(|n| read(&format!("src/config/{n}")))
        .collect();
    let quoted = |s: &str| -> Vec<String> {
        s.split('"')
            .enumerate()
            .filter(|(i, _)| i % 2 == 1)
            .map(|(_, q)| q.to_string())
            .collect()
    };
    let mut keys = BTreeSet::new();
    let top = src
        .split("const TOP_KEYS: &[&str] = &[")
        .nth(1)
        .expect("TOP_KEYS in src/config/mod.rs");
    keys.extend(quoted(&top[..top.find("];").unwrap()]));
    let mut sections = 0;
    for call in src.split("r.section(").skip(1) {
        let end = call.find("],").or_else(|| call.find("])")).unwrap();
        let q = quoted(&call[..end]);
        let (section, known) = q.split_first().unwrap();
        sections += 1;
        for k in known {
            keys.insert(format!("{section}.{k}"));
        }
    }
    assert!(sections >= 5 && keys.len() > 30, "parsed {keys:?}");
    keys
}

/// `mailgend` commands in the fenced code blocks of `text`: the
/// arguments after a `mailgend` in command position (line start, after a
/// pipe/`;`/`&&`, after `runuser … --`, `sudo -u USER`, `env VAR=…`).
fn commands_in(text: &str) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    let mut in_block = false;
    let mut pending = String::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_block = !in_block;
            continue;
        }
        if !in_block {
            continue;
        }
        if let Some(head) = line.trim_end().strip_suffix('\\') {
            pending.push_str(head);
            pending.push(' ');
            continue;
        }
        let full = std::mem::take(&mut pending) + line;
        let code = full.split(" #").next().unwrap();
        let code = code.trim_start().trim_start_matches("$ ");
        if code.starts_with('#') {
            continue;
        }
        let tokens: Vec<&str> = code.split_whitespace().collect();
        let mut i = 0;
        let mut command_position = true;
        while i < tokens.len() {
            let t = tokens[i];
            if ["|", "||", ";", "&&"].contains(&t) {
                command_position = true;
                i += 1;
                continue;
            }
            if command_position {
                match t {
                    "sudo" => {
                        i += 1;
                        while i < tokens.len() && tokens[i].starts_with('-') {
                            i += if tokens[i] == "-u" { 2 } else { 1 };
                        }
                        continue;
                    }
                    "runuser" => {
                        while i < tokens.len() && tokens[i] != "--" {
                            i += 1;
                        }
                        i += 1;
                        continue;
                    }
                    "env" => {
                        i += 1;
                        while i < tokens.len() && tokens[i].contains('=') {
                            i += 1;
                        }
                        continue;
                    }
                    _ => {}
                }
                // `mailgend: …` / `mailgend send: …` is output, not a command.
                let output = tokens.get(i + 1).is_some_and(|n| n.ends_with(':'));
                if (t == "mailgend" || t.ends_with("/mailgend")) && !t.ends_with(':') && !output {
                    let args: Vec<String> = tokens[i + 1..]
                        .iter()
                        .take_while(|a| !["|", "||", ";", "&&", ">", "<", "2>&1"].contains(a))
                        .map(|a| a.to_string())
                        .collect();
                    found.push(args);
                }
            }
            command_position = false;
            i += 1;
        }
    }
    found
}

/// Subcommand words and option names, without `-c FILE`, `-v`, values and
/// positional arguments.
fn normalise(args: &[String]) -> String {
    let mut out: Vec<&str> = Vec::new();
    let mut subcommand = true;
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        i += 1;
        if a == "-c" || a == "--config" {
            i += 1;
            continue;
        }
        if a.starts_with("--config=") || a.trim_start_matches('-').chars().all(|c| c == 'v') {
            continue;
        }
        if a.starts_with('-') {
            subcommand = false;
            out.push(a.split('=').next().unwrap());
        } else if subcommand && a.chars().all(|c| c.is_ascii_lowercase() || c == '-') {
            out.push(a);
        } else {
            subcommand = false;
        }
    }
    out.join(" ")
}

fn documented_commands() -> Vec<(String, String)> {
    let mut files = vec!["README.md".to_string()];
    let mut docs: Vec<String> = std::fs::read_dir(repo_path("docs"))
        .unwrap()
        .flatten()
        .map(|e| format!("docs/{}", e.file_name().to_string_lossy()))
        .filter(|f| f.ends_with(".md"))
        .collect();
    docs.sort();
    files.extend(docs);
    let mut out = Vec::new();
    for f in files {
        for args in commands_in(&read(&f)) {
            out.push((f.clone(), normalise(&args)));
        }
    }
    out
}

fn is_test_fn(file: &str, function: &str) -> bool {
    let Ok(text) = std::fs::read_to_string(repo_path(file)) else {
        return false;
    };
    let lines: Vec<&str> = text.lines().collect();
    lines.iter().enumerate().any(|(n, l)| {
        let l = l.trim_start();
        (l.starts_with(&format!("fn {function}("))
            || l.starts_with(&format!("async fn {function}(")))
            && lines[n.saturating_sub(3)..n]
                .iter()
                .any(|a| a.contains("#[test]") || a.contains("#[tokio::test"))
    })
}

// ------------------------------------------------------------ the checks

#[test]
fn the_man_page_names_every_subcommand_and_option() {
    let man = man_text("man/mailgend.8");
    let mut missing = Vec::new();
    let mut seen = 0;
    // Breadth-first over the command tree as `--help` shows it.
    let mut queue: Vec<Vec<String>> = vec![vec![]];
    while let Some(path) = queue.pop() {
        let args: Vec<&str> = path.iter().map(String::as_str).collect();
        let (commands, options) = parse_help(&help(&args));
        for c in commands {
            seen += 1;
            let words = path
                .iter()
                .chain([&c])
                .cloned()
                .collect::<Vec<_>>()
                .join(" ");
            if !man.contains(&c) {
                missing.push(format!("command `{words}`"));
            }
            let mut sub = path.clone();
            sub.push(c);
            queue.push(sub);
        }
        for o in options {
            seen += 1;
            if !man.contains(&o) {
                missing.push(format!("option `{o}` of `mailgend {}`", path.join(" ")));
            }
        }
    }
    assert!(seen > 20, "parsed too little of --help ({seen})");
    assert!(
        missing.is_empty(),
        "man/mailgend.8 lacks: {}",
        missing.join(", ")
    );
}

#[test]
fn the_config_man_page_and_config_md_name_every_key() {
    let man = man_text("man/mailgend.conf.5");
    let md = read("docs/config.md");
    let keys = config_keys();
    let missing_man: Vec<_> = keys.iter().filter(|k| !man.contains(k.as_str())).collect();
    let missing_md: Vec<_> = keys.iter().filter(|k| !md.contains(k.as_str())).collect();
    assert!(
        missing_man.is_empty(),
        "man/mailgend.conf.5 lacks {missing_man:?}"
    );
    assert!(missing_md.is_empty(), "docs/config.md lacks {missing_md:?}");
}

#[test]
fn the_man_pages_render_without_warnings() {
    for page in ["man/mailgend.8", "man/mailgend.conf.5"] {
        let out = Command::new("groff")
            .args(["-man", "-Tutf8", "-ww", "-z"])
            .arg(repo_path(page))
            .output()
            .expect("groff (Debian package groff-base, installed by .ci/run)");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.is_empty(),
            "{page}: {stderr}"
        );
        // man -l is what an operator runs on an unpacked page.
        let out = Command::new("man")
            .arg("-l")
            .arg(repo_path(page))
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "80")
            .output()
            .expect("man (Debian package man-db, installed by .ci/run)");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && text.contains("NAME"), "{page}");
    }
}

#[test]
fn every_documented_command_is_run_by_a_test() {
    let documented = documented_commands();
    assert!(
        documented.len() > 10,
        "found too few commands: {documented:?}"
    );
    let table: BTreeSet<&str> = TESTED_COMMANDS.iter().map(|(c, _, _)| *c).collect();
    let untested: Vec<String> = documented
        .iter()
        .filter(|(_, c)| !table.contains(c.as_str()))
        .map(|(f, c)| format!("{f}: `mailgend {c}`"))
        .collect();
    assert!(
        untested.is_empty(),
        "documented commands without a test in TESTED_COMMANDS:\n{}",
        untested.join("\n")
    );
    for (command, file, function) in TESTED_COMMANDS {
        assert!(
            is_test_fn(file, function),
            "TESTED_COMMANDS: `{command}`: no test fn {function} in {file}"
        );
    }
    let shown: BTreeSet<&str> = documented.iter().map(|(_, c)| c.as_str()).collect();
    let stale: Vec<_> = table.difference(&shown).collect();
    assert!(
        stale.is_empty(),
        "TESTED_COMMANDS lists commands no document shows: {stale:?}"
    );
}

#[test]
fn the_command_extraction_sees_what_an_operator_would_type() {
    let text = "```sh\n\
        mailgend -c /etc/x.conf send --all --dry-run   # comment mailgend status\n\
        runuser -u mailgend -- mailgend check-config\n\
        sudo -u postgres mailgend db migrate | tee log\n\
        systemctl enable --now mailgend\n\
        journalctl -u mailgend -f\n\
        mailgend in-doubt release 17 18\n\
        mailgend send: interactive review needs a terminal. Use `mailgend send --all`\n\
        mailgend: invalid configuration\n\
        /usr/bin/mailgend -vv \\\n    preview --recipient a@example.net --json\n\
        ```\n\
        mailgend status outside a block\n";
    let got: Vec<String> = commands_in(text).iter().map(|a| normalise(a)).collect();
    assert_eq!(
        got,
        [
            "send --all --dry-run",
            "check-config",
            "db migrate",
            "in-doubt release",
            "preview --recipient --json"
        ]
    );
}

/// The message texts of the `error!`/`warn!` calls under `src/` (without
/// the throw-away sandbox, `bench` and `demo`): the literal text before
/// the first `{`, at most 40 characters; purely formatted messages
/// (`"{e:#}"`) have none. Rust's `\`-newline continuations are joined.
fn log_messages() -> Vec<(String, String)> {
    fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(&repo_path("src"), &mut files);
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let rel = f
            .strip_prefix(repo_path(""))
            .unwrap()
            .to_string_lossy()
            .to_string();
        if rel.starts_with("src/sandbox/") || rel == "src/cli/bench.rs" || rel == "src/cli/demo.rs"
        {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap();
        for (pos, _) in text
            .match_indices("error!(")
            .chain(text.match_indices("warn!("))
        {
            let Some(literal) = last_string_literal(&text[pos..]) else {
                continue;
            };
            let head: String = literal
                .split('{')
                .next()
                .unwrap()
                .chars()
                .take(40)
                .collect();
            if head.trim().len() >= 8 {
                out.push((rel.clone(), squash(&head)));
            }
        }
    }
    out
}

/// The last string literal among the arguments of the macro call that
/// starts `call` (`name!(…)`), with escapes and `\`-newline
/// continuations resolved.
fn last_string_literal(call: &str) -> Option<String> {
    let mut chars = call[call.find('(')?..].chars().peekable();
    let (mut depth, mut last) = (0, None);
    while let Some(c) = chars.next() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return last;
                }
            }
            '"' => {
                let mut lit = String::new();
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => match chars.next() {
                            Some('\n') => {
                                while chars.peek().is_some_and(|c| c.is_whitespace()) {
                                    chars.next();
                                }
                            }
                            Some('n') => lit.push('\n'),
                            Some(other) => lit.push(other),
                            None => break,
                        },
                        c => lit.push(c),
                    }
                }
                last = Some(lit);
            }
            _ => {}
        }
    }
    None
}

/// Collapses runs of white space (Markdown wraps lines anywhere).
fn squash(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[test]
fn troubleshooting_covers_every_error_and_warning_message() {
    let doc = squash(&read("docs/troubleshooting.md"));
    let router = squash(&std::fs::read_to_string(repo_path("docs/router.md")).unwrap_or_default());
    let messages = log_messages();
    assert!(messages.len() > 15, "found too few: {messages:?}");
    let missing: Vec<String> = messages
        .iter()
        .filter(|(file, head)| {
            // The alert router's messages may be explained in its own page.
            !(doc.contains(head.as_str())
                || (file.starts_with("src/route/") && router.contains(head.as_str())))
        })
        .map(|(file, head)| format!("{file}: {head:?}"))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/troubleshooting.md does not explain:\n{}",
        missing.join("\n")
    );
}

/// Documents that other branches add (the alert router's); links to them
/// are expected before they land.
const PENDING_DOCS: &[&str] = &["docs/router.md"];

/// GitHub's anchor of a heading: lower case, spaces to `-`, punctuation
/// other than `-` and `_` dropped.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

fn anchors_of(text: &str) -> BTreeSet<String> {
    let mut in_block = false;
    let mut out = BTreeSet::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_block = !in_block;
        } else if !in_block && line.starts_with('#') {
            out.insert(anchor(line.trim_start_matches('#')));
        }
    }
    out
}

#[test]
fn links_between_the_documents_resolve() {
    let mut files = vec!["README.md".to_string()];
    for e in std::fs::read_dir(repo_path("docs")).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.ends_with(".md") {
            files.push(format!("docs/{name}"));
        }
    }
    let mut broken = Vec::new();
    let mut checked = 0;
    for f in &files {
        let text = read(f);
        let base = Path::new(f).parent().unwrap();
        for part in text.split("](").skip(1) {
            let target = &part[..part.find(')').unwrap_or(0)];
            if target.is_empty() || target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (path, frag) = target.split_once('#').unwrap_or((target, ""));
            let resolved = if path.is_empty() {
                Path::new(f).to_path_buf()
            } else {
                base.join(path)
            };
            // Normalise `docs/../config/x` to `config/x`.
            let mut norm = std::path::PathBuf::new();
            for c in resolved.components() {
                match c {
                    std::path::Component::ParentDir => {
                        norm.pop();
                    }
                    c => norm.push(c),
                }
            }
            let rel = norm.to_string_lossy().to_string();
            checked += 1;
            if PENDING_DOCS.contains(&rel.as_str()) && !repo_path(&rel).exists() {
                continue;
            }
            if !repo_path(&rel).exists() {
                broken.push(format!("{f}: {target} (no {rel})"));
            } else if !frag.is_empty()
                && rel.ends_with(".md")
                && !anchors_of(&read(&rel)).contains(frag)
            {
                broken.push(format!("{f}: {target} (no heading #{frag} in {rel})"));
            }
        }
    }
    assert!(checked > 20, "found too few links ({checked})");
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

// ------------------------------------------- the documented commands, run

fn mailgend(config: &Path, home: &Path, args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mailgend"))
        .arg("-c")
        .arg(config)
        .args(args)
        .env("HOME", home)
        .env_remove("MAILGEND_LOG")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// docs/install.md and the migration checklist, in order, on a database
/// that has IntelMQ's events table and nothing of mailgen yet.
#[tokio::test]
async fn the_operators_first_run_works_as_documented() {
    let env = TestEnv::with(common::EnvOptions {
        migrate: false,
        ..Default::default()
    })
    .await;
    let conf = env.config_file();
    let home = env.dir.path();

    let (code, out) = mailgend(&conf, home, &["db", "migrate"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("applied migration 0001"), "{out}");
    let (code, out) = mailgend(&conf, home, &["db", "migrate"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("database is up to date"), "{out}");

    let (code, out) = mailgend(&conf, home, &["check-config"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(&format!("configuration OK ({})", conf.display())),
        "{out}"
    );

    env.insert_event(
        event_fields("192.0.2.1", 64496),
        json!([directive("abuse@as64496.example.net", "Open-Redis", 64496)]),
    )
    .await;
    let seq = env.ticket_seq_last_value().await;
    for dry in [["send", "--all", "--dry-run"], ["send", "--all", "-n"]] {
        let (code, out) = mailgend(&conf, home, &dry);
        assert_eq!(code, Some(0), "{out}");
        assert!(
            out.contains("Simulation: 1 mails sent, 0 postponed, 0 errors."),
            "{out}"
        );
        assert!(env.sink.messages().is_empty(), "a dry run sent mail");
        assert_eq!(env.pending_count().await, 1);
        assert_eq!(env.ticket_seq_last_value().await, seq, "a ticket was drawn");
    }

    let (code, out) = mailgend(&conf, home, &["status"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("pending directives  1 in 1 groups"), "{out}");
    assert!(out.contains("due now             1 groups"), "{out}");
    let (code, out) = mailgend(&conf, home, &["in-doubt", "list"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("nothing is in doubt"), "{out}");

    let (code, out) = mailgend(&conf, home, &["send", "--all"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("1 mails sent, 0 postponed, 0 errors."),
        "{out}"
    );
    let mails = env.sink.wait_for(1, std::time::Duration::from_secs(30));
    assert_eq!(mails.len(), 1);
    assert_eq!(mails[0].rcpt_to, ["abuse@as64496.example.net"]);
    assert_eq!(env.pending_count().await, 0);
    let (code, out) = mailgend(&conf, home, &["status"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("pending directives  0 in 0 groups"), "{out}");
}

/// `mailgend in-doubt discard ID`: the held mail is forgotten and its
/// directives get a new mail with a new ticket.
#[tokio::test]
async fn in_doubt_discard_renders_the_group_anew() {
    let mut env = TestEnv::new().await;
    env.config_json["mailgend"]["in_doubt"] = json!("hold");
    env.insert_event(
        event_fields("192.0.2.1", 64496),
        json!([directive("abuse@as64496.example.net", "Open-Redis", 64496)]),
    )
    .await;
    // The relay takes the mail but the connection breaks before its
    // answer: delivery is in doubt, and held.
    env.sink.set_fault(Fault::DropAfterData {
        scope: Scope::Next(1),
        deliver: true,
    });
    assert_eq!(env.run().await.errors, 1);
    assert_eq!(env.run().await.busy, 1, "held for the operator");
    let row = env
        .client()
        .await
        .query_one("SELECT id, ticket FROM mailgend.outbox", &[])
        .await
        .unwrap();
    let (id, old_ticket): (i64, String) = (row.get(0), row.get(1));

    let conf = env.config_file();
    let (code, out) = mailgend(
        &conf,
        env.dir.path(),
        &["in-doubt", "discard", &id.to_string()],
    );
    assert_eq!(code, Some(0), "{out}");
    let open: i64 = env
        .client()
        .await
        .query_one(
            "SELECT count(*) FROM mailgend.outbox WHERE state = 'discarded'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(open, 1, "kept as a record, state discarded");
    let (code, out) = mailgend(&conf, env.dir.path(), &["in-doubt", "list"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("nothing is in doubt"), "{out}");
    assert_eq!(
        env.pending_count().await,
        1,
        "the directives are pending again"
    );

    let s = env.run().await;
    assert_eq!((s.sent, s.errors), (1, 0));
    let tickets = env.sent_tickets().await;
    assert_eq!(tickets.len(), 1);
    assert_ne!(tickets[0], old_ticket, "a new mail gets a new ticket");
    assert_eq!(env.sink.messages().len(), 2);
}
