//! The notifier's format files (`NN*.toml`, docs/formats.md): any file
//! content is loaded or refused with problems, never a panic.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use mailgend::config::Config;
use mailgend::notify::format::FormatSet;

struct Setup {
    dir: tempfile::TempDir,
    config: Config,
}

fn setup() -> &'static Setup {
    static S: OnceLock<Setup> = OnceLock::new();
    S.get_or_init(|| {
        // /dev/shm when there is one: a write per execution.
        let dir = tempfile::Builder::new()
            .tempdir_in("/dev/shm")
            .or_else(|_| tempfile::tempdir())
            .unwrap();
        let config = Config::from_json_str(
            &serde_json::json!({
                "database": {"event": {"name": "e", "username": "u", "password": "p",
                                        "host": "localhost", "port": 5432}},
                "template_dir": dir.path(), "script_directory": dir.path(),
                "sender": "CERT <cert@example.org>",
                "smtp": {"host": "localhost", "port": 25},
                "openpgp": {"always_sign": false, "gnupg_home": "/nonexistent", "signing_key": ""}
            })
            .to_string(),
            "fuzz.conf",
        )
        .unwrap();
        Setup { dir, config }
    })
}

fuzz_target!(|text: &[u8]| {
    let s = setup();
    std::fs::write(s.dir.path().join("10fuzz.toml"), text).unwrap();
    if let Ok(set) = FormatSet::load(s.dir.path(), &s.config) {
        let _ = set.rule_names();
        let _ = set.event_columns_used();
    }
});
