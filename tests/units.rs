//! Every systemd unit the package ships, template units included
//! (issue 17 item 4): `systemd-analyze verify` is clean, `systemd-analyze
//! security --offline=true` rates the exposure at most 2.0, every unit has
//! `Documentation=` and its own `SyslogIdentifier=`, and the templates give
//! each instance its own configuration, state and identifier.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn units() -> Vec<PathBuf> {
    let mut units: Vec<PathBuf> =
        std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "service"))
            .collect();
    units.sort();
    units
}

/// `None` when systemd-analyze is not installed.
fn analyze(args: &[&str], unit: &Path) -> Option<Output> {
    match Command::new("systemd-analyze")
        .args(args)
        .arg(unit)
        // There is no running systemd to ask.
        .env("SYSTEMD_LOG_LEVEL", "notice")
        .output()
    {
        Ok(out) => Some(out),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => panic!("running systemd-analyze: {e}"),
    }
}

/// The unit as it would be loaded: `verify` checks that ExecStart= is
/// executable, so it points at the binary this run built; a template is
/// checked as an instance (`mailgend@a.service`).
fn local_copy(unit: &Path, dir: &Path) -> PathBuf {
    let name = unit
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .replace("@.", "@a.");
    let text = std::fs::read_to_string(unit).unwrap().replace(
        "/usr/bin/mailgend ",
        &format!("{} ", env!("CARGO_BIN_EXE_mailgend")),
    );
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
}

#[test]
fn every_unit_verifies_and_is_exposed_at_most_2_0() {
    let units = units();
    let names: Vec<String> = units
        .iter()
        .map(|u| u.file_name().unwrap().to_string_lossy().to_string())
        .collect();
    for n in [
        "mailgend.service",
        "mailgend@.service",
        "mailgend-route.service",
        "mailgend-route@.service",
    ] {
        assert!(
            names.iter().any(|x| x == n),
            "{n} missing from systemd/: {names:?}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    for unit in &units {
        let local = local_copy(unit, dir.path());
        let Some(out) = analyze(&["verify"], &local) else {
            eprintln!("SKIPPED: systemd-analyze is not installed (Debian: package systemd)");
            return;
        };
        let report = text(&out);
        assert!(
            out.status.success() && report.trim().is_empty(),
            "systemd-analyze verify {}: {}\n{report}",
            unit.display(),
            out.status
        );
        let out = analyze(&["security", "--offline=true"], &local).unwrap();
        let report = text(&out);
        assert!(out.status.success(), "{report}");
        let level: f64 = report
            .lines()
            .find_map(|l| l.split("Overall exposure level for ").nth(1))
            .and_then(|r| r.split(": ").nth(1))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no exposure level in:\n{report}"));
        eprintln!("{}: exposure {level}", unit.display());
        assert!(
            level <= 2.0,
            "{}: exposure {level} > 2.0\n{report}",
            unit.display()
        );
    }
    // The check can fail: an unknown key is reported.
    let broken = dir.path().join("broken.service");
    let good = std::fs::read_to_string(local_copy(&units[0], dir.path())).unwrap();
    std::fs::write(
        &broken,
        good.replace("ProtectSystem=strict", "ProtectSytem=strict"),
    )
    .unwrap();
    assert!(text(&analyze(&["verify"], &broken).unwrap()).contains("ProtectSytem"));
}

#[test]
fn every_unit_documents_itself_and_names_its_identifier() {
    for unit in units() {
        let text = std::fs::read_to_string(&unit).unwrap();
        let name = unit.file_name().unwrap().to_string_lossy().to_string();
        let setting = |key: &str| {
            text.lines()
                .filter_map(|l| l.strip_prefix(&format!("{key}=")))
                .next_back()
                .map(str::to_string)
        };
        let doc = setting("Documentation").unwrap_or_else(|| panic!("{name}: no Documentation="));
        assert!(
            doc.starts_with("file:///usr/share/doc/mailgend/"),
            "{name}: {doc}"
        );
        let base = name.trim_end_matches(".service").trim_end_matches('@');
        if name.contains('@') {
            // Each instance: its own identifier (systemd's and ours), state
            // and configuration.
            let id = format!("{base}-%i");
            assert_eq!(
                setting("SyslogIdentifier").as_deref(),
                Some(id.as_str()),
                "{name}"
            );
            assert!(
                text.contains(&format!("Environment=MAILGEND_SYSLOG_IDENTIFIER={id}")),
                "{name}"
            );
            let exec = setting("ExecStart").unwrap();
            let env = setting("Environment").unwrap_or_default();
            assert!(
                exec.contains("-c /etc/intelmq/mailgend-%i.conf")
                    || text.contains("MAIL2ALERT_CONFIGURATION=/etc/mailgend/route-%i.yml"),
                "{name}: {exec} {env}"
            );
            let state = setting("StateDirectory")
                .or_else(|| setting("ReadWritePaths"))
                .unwrap();
            assert!(state.contains("%i"), "{name}: {state}");
        } else {
            assert_eq!(setting("SyslogIdentifier").as_deref(), Some(base), "{name}");
        }
    }
}
