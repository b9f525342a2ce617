use super::*;
use std::path::Path;

/// Mode 0600: files with secrets that are not (a WARN otherwise).
fn private(p: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).unwrap();
}

fn minimal(dir: &Path) -> String {
    serde_json::json!({
        "database": {"event": {"name": "intelmq-events", "username": "mailgen",
                                "password": "pw", "host": "localhost", "port": 5432}},
        "template_dir": dir, "script_directory": dir,
        "sender": "CERT <cert@example.org>",
        "smtp": {"host": "localhost", "port": "25"},
        "openpgp": {"always_sign": false, "gnupg_home": "/nonexistent", "signing_key": ""}
    })
    .to_string()
}

#[test]
fn minimal_config_loads() {
    let d = tempfile::tempdir().unwrap();
    let c = Config::from_json_str(&minimal(d.path()), "t.conf").unwrap();
    assert_eq!(c.smtp.port, 25);
    assert_eq!(c.sender_address, "cert@example.org");
    assert_eq!(c.sender_domain, "example.org");
    assert!(c.unknown_keys.is_empty());
}

#[test]
fn libpq_host_lists_and_tls_keys() {
    let d = tempfile::tempdir().unwrap();
    let with = |event: Value| {
        let mut j: Value = serde_json::from_str(&minimal(d.path())).unwrap();
        for (k, v) in event.as_object().unwrap() {
            j["database"]["event"][k] = v.clone();
        }
        Config::from_json_str(&j.to_string(), "t.conf")
    };
    let c = with(serde_json::json!({"host": "db1, db2", "port": "5432,5433",
        "sslmode": "verify-full", "target_session_attrs": "read-write",
        "sslrootcert": "system"}))
    .unwrap();
    assert_eq!(c.database.hosts, ["db1", "db2"]);
    assert_eq!(c.database.ports, [5432, 5433]);
    assert_eq!(c.database.endpoints(), "db1:5432,db2:5433");
    assert_eq!(c.database.sslmode, Some(SslMode::VerifyFull));
    assert_eq!(c.database.sslrootcert, Some(RootCert::System));
    assert_eq!(
        c.database.target_session_attrs,
        Some(SessionAttrs::ReadWrite)
    );
    // One port for every host; nothing set: libpq's environment decides.
    let c = with(serde_json::json!({"host": "db1,db2", "port": 6432})).unwrap();
    assert_eq!(c.database.endpoints(), "db1:6432,db2:6432");
    assert_eq!((c.database.sslmode, c.database.sslrootcert), (None, None));
    let err = with(serde_json::json!({"host": "a,b,c", "port": "1,2",
        "sslmode": "on", "target_session_attrs": "primary",
        "sslrootcert": "/nonexistent/ca.crt"}))
    .unwrap_err()
    .0
    .iter()
    .map(|p| format!("{}: {}\n", p.key, p.reason))
    .collect::<String>();
    for needle in [
        "database.event.port: 2 ports for 3 hosts",
        "database.event.sslmode: \"on\" is not one of disable, allow, prefer",
        "database.event.target_session_attrs: \"primary\" is not one of",
        "database.event.sslrootcert: /nonexistent/ca.crt is not a readable file",
    ] {
        assert!(err.contains(needle), "{needle:?} not in {err}");
    }
}

#[test]
fn every_problem_is_reported_with_key() {
    let text = r#"{"database": {"event": {"name": "x", "port": 99999}},
                   "smtp": {"port": "abc", "tls": "sometimes"},
                   "sender": "nodomain", "templat_dir": "/x"}"#;
    let err = Config::from_json_str(text, "bad.conf").unwrap_err();
    let keys: Vec<_> = err.0.iter().map(|p| p.key.as_str()).collect();
    for k in [
        "database.event.username",
        "database.event.port",
        "smtp.port",
        "smtp.tls",
        "template_dir",
        "script_directory",
        "sender",
    ] {
        assert!(keys.contains(&k), "{k} missing from {keys:?}");
    }
    assert!(err.0.iter().all(|p| p.file == "bad.conf"));
}

#[test]
fn user_file_wins_one_level_deep() {
    let d = tempfile::tempdir().unwrap();
    let sys = d.path().join("sys.conf");
    let user = d.path().join("user.conf");
    std::fs::write(&sys, minimal(d.path())).unwrap();
    private(&sys);
    std::fs::write(
        &user,
        r#"{"smtp": {"port": 2525}, "sender": "other@example.net", "bogus": 1}"#,
    )
    .unwrap();
    let src = ConfigSource {
        system_file: Some(sys.clone()),
        user_file: Some(user.clone()),
        skip_user_file: false,
    };
    let c = Config::load(&src).unwrap();
    assert_eq!(c.smtp.port, 2525);
    assert_eq!(c.smtp.host, "localhost", "kept from the system file");
    assert_eq!(c.sender_domain, "example.net");
    assert_eq!(c.unknown_keys.len(), 1);
    assert_eq!(c.unknown_keys[0].file, user.display().to_string());
    assert_eq!(c.unknown_keys[0].reason, "unknown key, ignored");
    assert_eq!(
        unknown_key("smpt", TOP_KEYS),
        "unknown key, ignored; did you mean `smtp`?"
    );

    std::fs::write(&user, r#"{"smtp": {"port": 0}}"#).unwrap();
    let err = Config::load(&src).unwrap_err();
    assert_eq!(err.0[0].key, "smtp.port");
    assert_eq!(err.0[0].file, user.display().to_string());
}

#[test]
fn missing_files_are_an_error() {
    let src = ConfigSource {
        system_file: None,
        user_file: Some("/nonexistent/u.conf".into()),
        skip_user_file: false,
    };
    // The system file may exist on a real host; only check the -c case.
    let err = Config::load(&ConfigSource::file("/nonexistent/x.conf")).unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
    let _ = src;
}

/// `openpgp.key_file` (the old spelling) still signs, with a WARN that
/// names the new place; `mailgend.signing_key_file` wins over it.
#[test]
fn key_file_moved_to_the_mailgend_section() {
    let d = tempfile::tempdir().unwrap();
    let key = d.path().join("key.asc");
    std::fs::write(&key, "not checked here").unwrap();
    let other = d.path().join("other.asc");
    std::fs::write(&other, "not checked here").unwrap();
    private(&key);
    private(&other);
    let with = |openpgp: Value, mailgend: Value| {
        let mut j: Value = serde_json::from_str(&minimal(d.path())).unwrap();
        j["openpgp"] = openpgp;
        j["mailgend"] = mailgend;
        Config::from_json_str(&j.to_string(), "t.conf")
    };

    let c = with(
        serde_json::json!({"always_sign": true, "key_file": key}),
        serde_json::json!({}),
    )
    .unwrap();
    assert_eq!(c.openpgp.key_file.as_deref(), Some(key.as_path()));
    assert_eq!(c.unknown_keys.len(), 1, "{:?}", c.unknown_keys);
    assert_eq!(c.unknown_keys[0].key, "openpgp.key_file");
    assert!(c.unknown_keys[0]
        .reason
        .contains("move it there: intelmqcbmail 1.4 exits CRITICAL"));
    assert!(c.unknown_keys[0]
        .reason
        .contains("mailgend.signing_key_file"));
    assert!(c.rollback_problems.iter().any(|p| p.key == "openpgp"
        && p.reason.contains("has key_file")
        && p.reason.contains("lacks gnupg_home, signing_key")));

    let c = with(
        serde_json::json!({"always_sign": true, "gnupg_home": "/nonexistent",
                           "signing_key": "ABCD"}),
        serde_json::json!({"signing_key_file": key}),
    )
    .unwrap();
    assert_eq!(c.openpgp.key_file.as_deref(), Some(key.as_path()));
    assert!(c.unknown_keys.is_empty(), "{:?}", c.unknown_keys);
    assert!(c.rollback_problems.is_empty(), "{:?}", c.rollback_problems);

    let c = with(
        serde_json::json!({"always_sign": true, "key_file": other}),
        serde_json::json!({"signing_key_file": key}),
    )
    .unwrap();
    assert_eq!(c.openpgp.key_file.as_deref(), Some(key.as_path()));
    assert!(c.unknown_keys[0].reason.starts_with("ignored"));

    // A missing file is reported under the key it came from.
    for (openpgp, mailgend, key) in [
        (
            serde_json::json!({"always_sign": true, "key_file": "/nonexistent/k"}),
            serde_json::json!({}),
            "openpgp.key_file",
        ),
        (
            serde_json::json!({"always_sign": true}),
            serde_json::json!({"signing_key_file": "/nonexistent/k"}),
            "mailgend.signing_key_file",
        ),
    ] {
        let err = with(openpgp, mailgend).unwrap_err();
        assert_eq!(err.0.len(), 1, "{err}");
        assert_eq!(err.0[0].key, key, "{err}");
    }
}

/// What intelmqcbmail 1.4 would trip over is named, and only that.
#[test]
fn rollback_problems_name_what_the_old_tool_refuses() {
    let d = tempfile::tempdir().unwrap();
    let c = Config::from_json_str(&minimal(d.path()), "t.conf").unwrap();
    assert!(c.rollback_problems.is_empty(), "{:?}", c.rollback_problems);

    let mut j: Value = serde_json::from_str(&minimal(d.path())).unwrap();
    j["openpgp"] = serde_json::json!({"always_sign": false});
    j["database"]["event"]
        .as_object_mut()
        .unwrap()
        .remove("password");
    j["smtp"].as_object_mut().unwrap().remove("port");
    j["logging_level"] = serde_json::json!("info");
    let c = Config::from_json_str(&j.to_string(), "t.conf").unwrap();
    let keys: Vec<&str> = c.rollback_problems.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "openpgp",
            "database.event.password",
            "smtp.port",
            "logging_level"
        ]
    );
    assert!(c
        .rollback_problems
        .iter()
        .all(|p| p.reason.starts_with("rollback: ")));
}
