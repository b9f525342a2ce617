//! TLS to PostgreSQL, the libpq way (issue 17 item 1), against a real
//! cluster with `ssl = on` that accepts TCP connections only over TLS
//! (`hostssl`), with a CA, server and client certificates made here by the
//! `openssl` command.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use mailgend::config::{DatabaseConfig, RootCert, SslMode};
use mailgend::notify::db;
use mailgend::sandbox::{ExtraType, PgCluster, TestDb};

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, and a key plus certificate signed by it for `cn` with `san`
/// (EC keys: quick to make).
fn make_ca(dir: &Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.crt"),
            "-subj",
            &format!("/CN={name}"),
            "-days",
            "2",
        ],
    );
}

fn make_cert(dir: &Path, ca: &str, name: &str, cn: &str, san: Option<&str>) {
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={cn}"),
        ],
    );
    let ext = dir.join(format!("{name}.ext"));
    std::fs::write(
        &ext,
        san.map(|s| format!("subjectAltName={s}\n"))
            .unwrap_or_default(),
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.crt"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-out",
            &format!("{name}.crt"),
            "-days",
            "2",
            "-extfile",
            ext.to_str().unwrap(),
        ],
    );
}

struct TlsCluster {
    cluster: PgCluster,
    db: TestDb,
    certs: tempfile::TempDir,
}

/// The role that logs in with a client certificate (`cert` method: the
/// certificate's CN is the role name).
const CERT_USER: &str = "certuser";

impl TlsCluster {
    async fn start() -> TlsCluster {
        let certs = tempfile::tempdir().unwrap();
        let d = certs.path();
        make_ca(d, "ca");
        make_ca(d, "otherca");
        // The server's certificate names `localhost` only, so connecting
        // to 127.0.0.1 with verify-full is a host-name mismatch.
        make_cert(d, "ca", "server", "localhost", Some("DNS:localhost"));
        make_cert(d, "ca", "client", CERT_USER, None);
        // Signed by the CA the server does not trust.
        make_cert(d, "otherca", "stranger", CERT_USER, None);
        let mut cluster = PgCluster::start_temp().expect("start a cluster");
        for (name, mode) in [
            ("server.crt", 0o644),
            ("server.key", 0o600),
            ("ca.crt", 0o644),
        ] {
            let bytes = std::fs::read(d.join(name)).unwrap();
            cluster.install_file(name, &bytes, mode).unwrap();
        }
        cluster
            .set_hba(&format!(
                "local all all trust\n\
                 local replication all trust\n\
                 hostssl all {CERT_USER} 127.0.0.1/32 cert\n\
                 hostssl all all 127.0.0.1/32 trust\n"
            ))
            .unwrap();
        cluster
            .apply_settings(
                "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n\
                 ssl_ca_file = 'ca.crt'\n",
            )
            .expect("restart with ssl = on");
        let db = cluster.create_database_async().await.unwrap();
        db.create_events_table(ExtraType::Jsonb).await.unwrap();
        db.connect()
            .await
            .unwrap()
            .batch_execute(&format!("CREATE ROLE {CERT_USER} LOGIN SUPERUSER"))
            .await
            .unwrap();
        TlsCluster { cluster, db, certs }
    }

    fn cert(&self, name: &str) -> PathBuf {
        self.certs.path().join(name)
    }

    fn config(&self, host: &str, mode: SslMode, root: &str) -> DatabaseConfig {
        DatabaseConfig {
            name: self.db.name.clone(),
            username: "postgres".into(),
            password: None,
            hosts: vec![host.into()],
            ports: vec![self.cluster.port()],
            sslmode: Some(mode),
            sslrootcert: Some(RootCert::File(self.cert(root))),
            sslcert: None,
            sslkey: None,
            target_session_attrs: None,
            additional_directive_where: None,
        }
    }
}

async fn ssl_in_use(c: &tokio_postgres::Client) -> bool {
    c.query_one(
        "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test]
async fn verify_full_works_and_wrong_ca_host_or_plain_are_refused_clearly() {
    let t = TlsCluster::start().await;

    // verify-full: the CA and the host name the certificate carries.
    let c = db::connect(&t.config("localhost", SslMode::VerifyFull, "ca.crt"))
        .await
        .expect("verify-full with the right CA and host name");
    assert!(ssl_in_use(&c).await);

    // The default mode, prefer, goes over TLS where the server has it.
    let mut cfg = t.config("127.0.0.1", SslMode::Prefer, "ca.crt");
    cfg.sslmode = None;
    cfg.sslrootcert = None;
    let c = db::connect(&cfg).await.expect("prefer");
    assert!(ssl_in_use(&c).await);
    // require does not check the certificate without a root certificate.
    cfg.sslmode = Some(SslMode::Require);
    assert!(ssl_in_use(&db::connect(&cfg).await.expect("require")).await);
    // allow: plain first; the server says no; then TLS.
    cfg.sslmode = Some(SslMode::Allow);
    assert!(ssl_in_use(&db::connect(&cfg).await.expect("allow")).await);

    // A CA that did not sign the server's certificate.
    let e = db::connect(&t.config("localhost", SslMode::VerifyCa, "otherca.crt"))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("certificate verify failed")
            && e.contains("is not signed by a CA in sslrootcert")
            && e.contains("otherca.crt"),
        "{e}"
    );

    // A host name the certificate does not carry: verify-full refuses,
    // verify-ca (chain only) accepts.
    let e = db::connect(&t.config("127.0.0.1", SslMode::VerifyFull, "ca.crt"))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("does not name the host connected to") && e.contains("verify-ca"),
        "{e}"
    );
    db::connect(&t.config("127.0.0.1", SslMode::VerifyCa, "ca.crt"))
        .await
        .expect("verify-ca does not check the host name");

    // disable: the server (hostssl only) refuses, and we say what to set.
    let e = db::connect(&t.config("127.0.0.1", SslMode::Disable, "ca.crt"))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no pg_hba.conf entry")
            && e.contains("no encryption")
            && e.contains("sslmode disable")
            && e.contains("only over TLS: set database.event.sslmode"),
        "{e}"
    );
}

#[tokio::test]
async fn client_certificate_logs_in_with_the_cert_method() {
    let t = TlsCluster::start().await;
    let mut cfg = t.config("localhost", SslMode::VerifyFull, "ca.crt");
    cfg.username = CERT_USER.into();

    // Without a certificate the `cert` method refuses, saying what to set.
    let e = db::connect(&cfg).await.unwrap_err().to_string();
    assert!(e.contains("set database.event.sslcert and sslkey"), "{e}");

    // One from a CA the server does not trust: refused.
    cfg.sslcert = Some(t.cert("stranger.crt"));
    cfg.sslkey = Some(t.cert("stranger.key"));
    assert!(db::connect(&cfg).await.is_err());

    cfg.sslcert = Some(t.cert("client.crt"));
    cfg.sslkey = Some(t.cert("client.key"));
    let c = db::connect(&cfg).await.expect("client certificate");
    let user: String = c
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(user, CERT_USER);
    let dn: Option<String> = c
        .query_one(
            "SELECT client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(dn.as_deref(), Some(format!("/CN={CERT_USER}").as_str()));
}

/// The commands connect through the same code, and take libpq's
/// environment (PGSSLMODE, PGSSLROOTCERT, PGSSLCERT, PGSSLKEY) when the
/// config names nothing: intelmqcbmail's setups keep working.
#[tokio::test]
async fn commands_honour_libpq_environment() {
    let t = TlsCluster::start().await;
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("mailgen.conf");
    std::fs::write(
        &conf,
        serde_json::json!({
            "database": {"event": {"name": t.db.name, "username": CERT_USER,
                "password": null, "host": "localhost", "port": t.cluster.port()}},
            "template_dir": common::repo_path("config/templates"),
            "script_directory": common::repo_path("config/formats"),
            "sender": common::SENDER,
            "smtp": {"host": "127.0.0.1", "port": 25},
            "openpgp": {"always_sign": false},
            "logging_level": "INFO"
        })
        .to_string(),
    )
    .unwrap();
    let mailgend = |args: &[&str], env: &[(&str, PathBuf)]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_mailgend"));
        cmd.arg("-c").arg(&conf).args(args);
        // An empty HOME: no ~/.postgresql defaults from the machine.
        cmd.env("HOME", dir.path());
        for v in ["PGSSLMODE", "PGSSLROOTCERT", "PGSSLCERT", "PGSSLKEY"] {
            cmd.env_remove(v);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let client_env = [
        ("PGSSLCERT", t.cert("client.crt")),
        ("PGSSLKEY", t.cert("client.key")),
    ];
    fn with(
        client_env: &[(&'static str, PathBuf)],
        extra: &[(&'static str, PathBuf)],
    ) -> Vec<(&'static str, PathBuf)> {
        client_env.iter().chain(extra).cloned().collect()
    }

    // PGSSLMODE=verify-full with the wrong CA: refused, naming the fix.
    let (ok, out) = mailgend(
        &["db", "migrate"],
        &with(
            &client_env,
            &[
                ("PGSSLMODE", "verify-full".into()),
                ("PGSSLROOTCERT", t.cert("otherca.crt")),
            ],
        ),
    );
    assert!(
        !ok && out.contains("sslmode verify-full") && out.contains("otherca.crt"),
        "{out}"
    );
    // PGSSLMODE=verify-full without any root certificate: libpq's refusal.
    let (ok, out) = mailgend(
        &["status"],
        &with(&client_env, &[("PGSSLMODE", "verify-full".into())]),
    );
    assert!(
        !ok && out.contains(".postgresql/root.crt does not exist"),
        "{out}"
    );
    // The right CA: migrate and status work over verified TLS.
    let good = with(
        &client_env,
        &[
            ("PGSSLMODE", "verify-full".into()),
            ("PGSSLROOTCERT", t.cert("ca.crt")),
        ],
    );
    let (ok, out) = mailgend(&["db", "migrate"], &good);
    assert!(ok, "{out}");
    let (ok, out) = mailgend(&["status"], &good);
    assert!(ok && out.contains("pending directives"), "{out}");
    // ~/.postgresql/root.crt, postgresql.crt and .key, libpq's defaults.
    let pg = dir.path().join(".postgresql");
    std::fs::create_dir(&pg).unwrap();
    std::fs::copy(t.cert("ca.crt"), pg.join("root.crt")).unwrap();
    std::fs::copy(t.cert("client.crt"), pg.join("postgresql.crt")).unwrap();
    std::fs::copy(t.cert("client.key"), pg.join("postgresql.key")).unwrap();
    let (ok, out) = mailgend(&["status"], &[("PGSSLMODE", "verify-full".into())]);
    assert!(ok, "{out}");
    // PGSSLMODE=disable: the server refuses plain connections.
    let (ok, out) = mailgend(&["status"], &[("PGSSLMODE", "disable".into())]);
    assert!(!ok && out.contains("only over TLS"), "{out}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn scrape_gauge(port: u16, name: &str) -> Option<f64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Two `mailgend run` instances against a TLS-only database (verify-full,
/// client certificates), the first started while the database is down:
/// it waits (READY, metrics answering), then both share the work, every
/// directive sent once.
#[tokio::test]
async fn two_instances_over_tls_one_started_before_the_database() {
    use common::{directive, event_fields, event_insert};
    let mut t = TlsCluster::start().await;
    mailgend::notify::db::migrate::migrate(&mut t.db.connect().await.unwrap())
        .await
        .unwrap();
    let mut env = common::TestEnv::new().await;
    env.config_json["database"]["event"] = serde_json::json!({
        "name": t.db.name, "username": CERT_USER, "password": null,
        "host": "localhost", "port": t.cluster.port(),
        "sslmode": "verify-full", "sslrootcert": t.cert("ca.crt"),
        "sslcert": t.cert("client.crt"), "sslkey": t.cert("client.key")});
    env.config_json["logging_level"] = serde_json::json!("INFO");
    let ports = [free_port(), free_port()];
    let spawn = |name: &str, port: u16| {
        let mut j = env.config_json.clone();
        j["mailgend"] = serde_json::json!({"workers": 2,
            "metrics_listen": format!("127.0.0.1:{port}")});
        let conf = env.dir.path().join(format!("mailgend-{name}.conf"));
        std::fs::write(&conf, j.to_string()).unwrap();
        let log = env.dir.path().join(format!("{name}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_mailgend"))
            .arg("-c")
            .arg(&conf)
            .arg("run")
            .env("HOME", env.dir.path())
            .env_remove("NOTIFY_SOCKET")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        // Killed on drop: a failing assertion must not leave two
        // instances running (they once outlived a failed run for hours,
        // retrying a database that was gone).
        (
            common::ServiceProcess {
                child,
                log: log.clone(),
            },
            log,
        )
    };
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();

    t.cluster.stop().unwrap();
    let (a, a_log) = spawn("a", ports[0]);
    let start = std::time::Instant::now();
    while !read(&a_log).contains("database unreachable") {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{}",
            read(&a_log)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(scrape_gauge(ports[0], "mailgend_database_up"), Some(0.0));
    t.cluster.start_again().unwrap();
    let (b, b_log) = spawn("b", ports[1]);

    let admin = t.db.connect().await.unwrap();
    const N: i64 = 40;
    for asn in 64496..64496 + N {
        let (sql, row) = event_insert(
            event_fields("192.0.2.1", asn),
            serde_json::json!([directive(
                &format!("abuse@as{asn}.example.net"),
                "Open-Redis",
                asn
            )]),
        );
        admin.query_one(sql.as_str(), &[&row]).await.unwrap();
    }
    let got = env
        .sink
        .wait_for_async(N as usize, Duration::from_secs(120))
        .await;
    assert_eq!(
        got.len(),
        N as usize,
        "A:\n{}\nB:\n{}",
        read(&a_log),
        read(&b_log)
    );
    // Both over verified TLS with their client certificate. A reconnects
    // on its own backoff (1 s, 2 s, 4 s …), so B may have sent everything
    // before A is back: wait for A's sessions rather than assume them.
    let start = std::time::Instant::now();
    let sessions = loop {
        let sessions = admin
            .query(
                "SELECT a.application_name, s.ssl, s.client_dn FROM pg_stat_activity a \
                   JOIN pg_stat_ssl s USING (pid) WHERE a.application_name LIKE 'mailgend/%'",
                &[],
            )
            .await
            .unwrap();
        let names: std::collections::BTreeSet<String> = sessions.iter().map(|r| r.get(0)).collect();
        if names.len() == 2 {
            break sessions;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{names:?}\nA:\n{}",
            read(&a_log)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for r in &sessions {
        let (ssl, dn): (bool, Option<String>) = (r.get(1), r.get(2));
        assert!(ssl && dn.as_deref() == Some("/CN=certuser"));
    }
    // The sink has every mail once the relay said 250; the instance marks
    // the directives sent in the COMMIT right after, so allow it a moment.
    let start = std::time::Instant::now();
    loop {
        let pending: i64 = admin
            .query_one("SELECT count(*) FROM directives WHERE sent_id IS NULL", &[])
            .await
            .unwrap()
            .get(0);
        if pending == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{pending} directives still pending after every mail arrived"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let per_instance = admin
        .query(
            "SELECT instance, count(*) FROM mailgend.sent_mail GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await
        .unwrap();
    let mut ids: Vec<String> = got
        .iter()
        .map(|m| common::header(&m.data, "Message-Id").unwrap())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), N as usize, "a mail received twice");
    for r in &per_instance {
        let (i, n): (String, i64) = (r.get(0), r.get(1));
        eprintln!("instance {i}: {n} mails");
    }
    assert_eq!(scrape_gauge(ports[0], "mailgend_database_up"), Some(1.0));
    drop((a, b));
    eprintln!("--- A (started before the database) ---\n{}", read(&a_log));
    eprintln!("--- B ---\n{}", read(&b_log));
}
