//! The Debian package, installed the way an operator installs it: built
//! with cargo-deb (dev profile, the package's feature settings) and
//! checked by lintian, installed with `dpkg -i` + `apt-get -f install`
//! into a clean Debian 12 root made by `debootstrap --variant=minbase`,
//! then checked from inside that root (version, system user, permissions
//! of the secrets, no `demo`/`bench`, `check-config` as the service user,
//! the alert router started from the installed sample configuration the
//! way its unit starts it, with a secret from its environment file, and
//! routing a mail from a real SMTP client to a real receiver,
//! `systemd-analyze verify` of the installed units by the root's own
//! systemd, installed after the package), upgraded, purged (after edits,
//! right after an installation) and installed over and purged around an
//! existing configuration.
//!
//! The bootstrapped root is cached as a tar under `target/pkgtest/` so
//! that repeated runs skip the download; every run unpacks a fresh copy.
//! Missing prerequisites (root, debootstrap, lintian, cargo-deb) fail the
//! test with what to install: `.ci/run` installs them.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn work_dir() -> PathBuf {
    // Under target/ so that a run leaves nothing elsewhere and the cache
    // survives between runs (never under /tmp: it may be small or noexec).
    let d = repo().join("target/pkgtest");
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs `cmd` and panics with its output unless it succeeded.
fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{text}",
        out.status
    );
    text
}

fn require_prerequisites() {
    let mut missing = Vec::new();
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root (debootstrap, chroot and mount need it; CI runs as root)".to_string());
    }
    if Command::new("debootstrap")
        .arg("--version")
        .output()
        .is_err()
    {
        missing.push("debootstrap (apt-get install debootstrap)".into());
    }
    if Command::new("python3").arg("--version").output().is_err() {
        missing.push("python3 (the SMTP client sending to the router)".into());
    }
    if Command::new("lintian").arg("--version").output().is_err() {
        missing.push("lintian (apt-get install lintian)".into());
    }
    if !Command::new("cargo")
        .args(["deb", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
    {
        missing.push(
            "cargo-deb (cargo install cargo-deb --locked --version 3.8.0, as .ci/run does)".into(),
        );
    }
    assert!(
        missing.is_empty(),
        "tests/package.rs cannot run; missing: {}",
        missing.join("; ")
    );
}

/// The Debian mirror this machine's apt uses (deb822 `URIs:` or a
/// one-line `deb URI bookworm ...`), so the test uses what CI's machine
/// is set up with.
fn apt_mirror() -> String {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(rd) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<_> = rd.flatten().map(|e| e.path()).collect();
        more.sort();
        files.extend(more);
    }
    for f in files {
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        // deb822: a stanza with `URIs:` and a `Suites:` naming bookworm.
        for stanza in text.split("\n\n") {
            let field = |name: &str| {
                stanza.lines().find_map(|l| {
                    l.strip_prefix(name)
                        .map(|v| v.trim().to_string())
                        .filter(|_| !l.trim_start().starts_with('#'))
                })
            };
            if let (Some(uris), Some(suites)) = (field("URIs:"), field("Suites:")) {
                if suites.split_whitespace().any(|s| s == "bookworm") {
                    if let Some(u) = uris.split_whitespace().next() {
                        return u.to_string();
                    }
                }
            }
        }
        for line in text.lines() {
            let w: Vec<&str> = line.split_whitespace().collect();
            if w.first() == Some(&"deb") {
                // deb [options] URI suite components
                let rest: Vec<&str> = w[1..]
                    .iter()
                    .copied()
                    .skip_while(|x| x.starts_with('['))
                    .collect();
                if rest.len() >= 2 && rest[1] == "bookworm" {
                    return rest[0].to_string();
                }
            }
        }
    }
    "http://deb.debian.org/debian".into()
}

/// The cached tar of a freshly bootstrapped minbase root; made when absent.
///
/// `.ci/run` may be making the same tar in the background while the tests
/// build (under `flock` on the same lock file): wait for it rather than
/// bootstrapping twice.
fn base_root_tar(timings: &mut Timings) -> PathBuf {
    let tar = work_dir().join("bookworm-minbase.tar");
    let start = Instant::now();
    let lock = std::fs::File::create(work_dir().join("bootstrap.lock")).unwrap();
    // Released when `lock` is dropped at the end of this function.
    let rc = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) };
    assert_eq!(rc, 0, "flock: {}", std::io::Error::last_os_error());
    if start.elapsed() > Duration::from_secs(1) {
        timings.add("waiting for .ci/run's bootstrap", start);
    }
    if tar.exists() {
        return tar;
    }
    let start = Instant::now();
    let staging = tempfile::Builder::new()
        .prefix("debootstrap-")
        .tempdir_in(work_dir())
        .unwrap();
    let root = staging.path().join("root");
    ok(Command::new("debootstrap")
        .args(["--variant=minbase", "bookworm"])
        .arg(&root)
        .arg(apt_mirror()));
    let partial = work_dir().join("bookworm-minbase.tar.partial");
    ok(Command::new("tar")
        .arg("-C")
        .arg(&root)
        .args(["--numeric-owner", "-cf"])
        .arg(&partial)
        .arg("."));
    std::fs::rename(&partial, &tar).unwrap();
    timings.add(
        "debootstrap --variant=minbase bookworm (cached afterwards)",
        start,
    );
    tar
}

/// Unmounts and removes roots a killed earlier run left behind (a timeout
/// kills the test without running destructors).
fn clean_stale_roots() {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let Ok(entries) = std::fs::read_dir(work_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if !(name.starts_with("root-")
            || name.starts_with("debootstrap-")
            || name.starts_with("deb-"))
        {
            continue;
        }
        let dir = e.path();
        let prefix = format!("{}/", dir.display());
        let mut mounted: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter(|m| m.starts_with(&prefix))
            .collect();
        mounted.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in &mounted {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
        let still = std::fs::read_to_string("/proc/self/mounts")
            .unwrap_or_default()
            .contains(&prefix);
        if !still {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

/// A fresh root for one run: unpacked from the cache, removed on drop
/// (also when the test fails). Nothing is mounted in it from the host's
/// view: each command mounts its /proc in a mount namespace of its own
/// (see [`Root::chroot`]).
struct Root {
    dir: Option<tempfile::TempDir>,
}

impl Root {
    fn new(tar: &Path) -> Root {
        let dir = tempfile::Builder::new()
            .prefix("root-")
            .tempdir_in(work_dir())
            .unwrap();
        let root = Root { dir: Some(dir) };
        ok(Command::new("tar")
            .arg("-C")
            .arg(root.path())
            .args(["--numeric-owner", "-xpf"])
            .arg(tar));
        std::fs::copy("/etc/resolv.conf", root.path().join("etc/resolv.conf")).ok();
        root
    }

    fn path(&self) -> &Path {
        self.dir.as_ref().unwrap().path()
    }

    fn file(&self, abs: &str) -> PathBuf {
        self.path().join(abs.trim_start_matches('/'))
    }

    /// A command run inside the root, with a plain environment and a
    /// /proc that lives in a private mount namespace: it goes away with the
    /// command, also when nextest's timeout kills the test (a /proc
    /// mounted from the host's namespace stayed behind then and made the
    /// root undeletable until `umount -l`).
    fn chroot(&self, args: &[&str]) -> Command {
        let mut c = Command::new("unshare");
        c.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(r#"mount -t proc proc "$0/proc" && exec chroot "$0" "$@""#)
            .arg(self.path())
            .args(args)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .env("LANG", "C.UTF-8")
            .env("HOME", "/root");
        c
    }

    /// `apt-get ARGS` in the root. The package lists of a cached root may
    /// be older than the mirror (a point release removes old versions):
    /// on failure, `apt-get update` and try once more. (No update up front:
    /// it costs seconds on every run and is rarely needed.)
    fn apt(&self, args: &[&str]) {
        let mut cmd: Vec<&str> = vec!["apt-get"];
        cmd.extend(args);
        if run(&mut self.chroot(&cmd)).status.success() {
            return;
        }
        ok(&mut self.chroot(&["apt-get", "update", "-qq"]));
        ok(&mut self.chroot(&cmd));
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        // Remove only when nothing is mounted below any more: never let a
        // recursive delete walk into a host file system.
        let still_mounted = std::fs::read_to_string("/proc/self/mounts")
            .map(|m| m.contains(&self.path().display().to_string()))
            .unwrap_or(true);
        let dir = self.dir.take().unwrap();
        if still_mounted {
            eprintln!("leaving {} behind: still mounted", dir.path().display());
            let _ = dir.keep();
        }
    }
}

struct Timings(Vec<(String, Duration)>);

impl Timings {
    fn add(&mut self, what: &str, since: Instant) {
        self.0.push((what.to_string(), since.elapsed()));
    }

    fn report(&self) -> String {
        let mut s = String::from("package test timings:\n");
        for (what, d) in &self.0 {
            s.push_str(&format!("  {:>6.1} s  {what}\n", d.as_secs_f64()));
        }
        s
    }
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(repo());
    c
}

/// `cargo deb` with the dev profile (no release build: that costs minutes
/// on CI's two cores), letting cargo-deb build the binary with the
/// package's feature settings (`[package.metadata.deb]`: no `demo`, no
/// `bench`), so that the binary tested is the one the package ships. Only
/// the mailgend crate is compiled again; the dependencies are shared with
/// the test build.
fn build_deb(out_dir: &Path) -> PathBuf {
    let deb = out_dir.join("mailgend.deb");
    ok(cargo()
        .args(["deb", "--profile", "dev", "--fast", "--output"])
        .arg(&deb));
    // That build replaced target/debug/mailgend; put the test build (with
    // the default features) back for the other tests and for developers.
    ok(cargo().args(["build", "--quiet", "--bin", "mailgend"]));
    deb
}

/// The unit files in the repository's `systemd/` (the package takes them
/// all through a glob).
fn repo_units() -> Vec<String> {
    let mut units: Vec<String> = std::fs::read_dir(repo().join("systemd"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("mailgend") && n.ends_with(".service"))
        .collect();
    units.sort();
    assert!(units.contains(&"mailgend.service".to_string()));
    units
}

/// The `[Service]` settings of a unit file, in order (`Key`, `value`);
/// enough of systemd.syntax(7) for our units: comments, sections,
/// `Key=value` lines (no continuation lines in our units: asserted).
fn unit_service_settings(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut in_service = false;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        assert!(!line.ends_with('\\'), "continuation line: {line}");
        if line.starts_with('[') {
            in_service = line == "[Service]";
            continue;
        }
        if in_service {
            let (k, v) = line.split_once('=').expect("Key=value");
            out.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    out
}

/// The assignments of an `EnvironmentFile=` as systemd.exec(5) reads
/// them: `#`/`;` comment lines and empty lines skipped, `KEY=VALUE` with
/// white space around the key and at the value's ends dropped, one level
/// of matching quotes removed. (No continuation lines: asserted.)
fn environment_file(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        assert!(!line.ends_with('\\'), "continuation line: {line}");
        let (k, v) = line.split_once('=').expect("KEY=VALUE");
        let v = v.trim();
        let v = ['"', '\'']
            .iter()
            .find_map(|q| v.strip_prefix(*q).and_then(|x| x.strip_suffix(*q)))
            .unwrap_or(v);
        out.push((k.trim().to_string(), v.to_string()));
    }
    out
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A real SMTP client (Python's smtplib, on the host: the root shares its
/// network) logs in to 127.0.0.1:`port` and sends one mail; prints `sent`
/// or the exception.
fn smtp_send(port: u16, user: &str, password: &str, to: &str, subject: &str) -> String {
    let script = r#"
import smtplib, sys
from email.message import EmailMessage
port, user, password, to, subject = sys.argv[1:]
m = EmailMessage()
m["From"] = "backup@db1.example.org"
m["To"] = to
m["Subject"] = subject
m.set_content("The nightly backup of db1 failed.\n")
try:
    with smtplib.SMTP("127.0.0.1", int(port), timeout=30) as s:
        s.login(user, password)
        s.send_message(m)
    print("sent")
except Exception as e:
    print(type(e).__name__, e)
"#;
    let out = run(Command::new("python3").args([
        "-c",
        script,
        &port.to_string(),
        user,
        password,
        to,
        subject,
    ]));
    String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
}

/// The installed `mailgend-route.service` run as systemd would run it
/// (there is no systemd in the root): its `ExecStartPre=` as root, then
/// its `ExecStart=` as its `User=`/`Group=`, with exactly the environment
/// of its `Environment=` and `EnvironmentFile=` lines. Killed on drop.
struct UnitProcess {
    child: std::process::Child,
    log: PathBuf,
}

impl UnitProcess {
    fn start(root: &Root, unit: &str) -> UnitProcess {
        let text =
            std::fs::read_to_string(root.file(&format!("/usr/lib/systemd/system/{unit}"))).unwrap();
        let settings = unit_service_settings(&text);
        let one = |key: &str| -> String {
            let v: Vec<&String> = settings
                .iter()
                .filter(|(k, _)| k == key)
                .map(|(_, v)| v)
                .collect();
            assert_eq!(v.len(), 1, "{unit}: {key}= {v:?}");
            v[0].clone()
        };
        let mut env: Vec<(String, String)> = Vec::new();
        for (k, v) in &settings {
            match k.as_str() {
                "Environment" => {
                    let (name, value) = v.split_once('=').unwrap();
                    env.push((name.to_string(), value.to_string()));
                }
                "EnvironmentFile" => {
                    let (optional, path) = match v.strip_prefix('-') {
                        Some(p) => (true, p),
                        None => (false, v.as_str()),
                    };
                    match std::fs::read_to_string(root.file(path)) {
                        Ok(t) => env.extend(environment_file(&t)),
                        Err(e) => assert!(optional, "{unit}: {path}: {e}"),
                    }
                }
                "ExecStartPre" => {
                    // `+`: run with full privileges (as root, here).
                    let cmd = v.trim_start_matches(['+', '-', '@', '!']);
                    let args: Vec<&str> = cmd.split_whitespace().collect();
                    ok(&mut root.chroot(&args));
                }
                _ => {}
            }
        }
        let (user, group) = (one("User"), one("Group"));
        let exec = one("ExecStart");
        let log = root.file("/tmp/mailgend-route.log");
        let file = std::fs::File::create(&log).unwrap();
        let mut args = vec!["runuser", "-u", &user, "-g", &group, "--", "env", "-i"];
        let assignments: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        args.extend(assignments.iter().map(String::as_str));
        args.extend(exec.split_whitespace());
        let child = root
            .chroot(&args)
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("start the unit's ExecStart");
        UnitProcess { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `port` accepts connections (panics with the log if the
    /// process ends or 30 s pass).
    fn wait_listening(&mut self, port: u16) {
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("the router ended ({status}):\n{}", self.log());
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "not listening after 30 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for UnitProcess {
    fn drop(&mut self) {
        // runuser forwards SIGTERM to the router, which then drains.
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(40) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Replaces the one line of `path` (inside the root) that equals `from`.
fn edit_line(root: &Root, path: &str, from: &str, to: &str) {
    let file = root.file(path);
    let text = std::fs::read_to_string(&file).unwrap();
    assert_eq!(
        text.lines().filter(|l| *l == from).count(),
        1,
        "{path}: no single line {from:?}:\n{text}"
    );
    let new: Vec<&str> = text
        .lines()
        .map(|l| if l == from { to } else { l })
        .collect();
    std::fs::write(&file, new.join("\n") + "\n").unwrap();
}

fn gid_of(root: &Root, group: &str) -> u32 {
    let line = ok(&mut root.chroot(&["getent", "group", group]));
    line.split(':').nth(2).unwrap().trim().parse().unwrap()
}

#[test]
fn the_package_installs_and_checks_out_in_a_clean_debian_12() {
    require_prerequisites();
    clean_stale_roots();
    let total = Instant::now();
    let mut t = Timings(Vec::new());

    // The package is built (CPU) while the root is bootstrapped or
    // unpacked (network, disk).
    let out = tempfile::Builder::new()
        .prefix("deb-")
        .tempdir_in(work_dir())
        .unwrap();
    let out_path = out.path().to_path_buf();
    let building = std::thread::spawn(move || {
        let start = Instant::now();
        let deb = build_deb(&out_path);
        let built = start.elapsed();
        // Debian's own checks of the package; only the tag for uploads
        // into the Debian archive (a bug closed by the first upload) does
        // not apply.
        let start = Instant::now();
        ok(Command::new("lintian")
            .args([
                "--fail-on",
                "error,warning",
                "--suppress-tags",
                // embedded-library: lintian matches libyaml's strings in the
                // router's YAML parser, yaml-rust2, a pure-Rust port (no C
                // libyaml is linked or bundled).
                "initial-upload-closes-no-bugs,embedded-library",
            ])
            .arg(&deb));
        (deb, built, start.elapsed())
    });
    let start = Instant::now();
    let tar = base_root_tar(&mut t);
    let root = Root::new(&tar);
    t.add("bootstrap or unpack the Debian 12 minbase root", start);
    let (deb, built, linted) = building.join().expect("cargo deb, lintian");
    t.0.push((
        "cargo deb --profile dev, the package's features (in parallel)".into(),
        built,
    ));
    t.0.push(("lintian (in parallel)".into(), linted));

    // What is in the package, before installing it.
    let contents = ok(Command::new("dpkg-deb").arg("--contents").arg(&deb));
    for path in [
        "./usr/bin/mailgend",
        "./usr/lib/systemd/system/mailgend.service",
        "./usr/share/man/man8/mailgend.8.gz",
        "./usr/share/man/man5/mailgend.conf.5.gz",
        "./usr/share/mailgend/intelmq-mailgen.conf.example",
        "./usr/share/mailgend/templates/shadowserver_csv_Open-Redis",
        "./etc/intelmq/mailgen/formats/10shadowserver.toml",
        "./usr/share/doc/mailgend/install.md",
        "./etc/mailgend/route.yml",
        "./usr/share/mailgend/mailgend-route.default",
    ] {
        assert!(
            contents.contains(path),
            "{path} not in the package:\n{contents}"
        );
    }
    for unit in repo_units() {
        let path = format!("./usr/lib/systemd/system/{unit}");
        assert!(contents.contains(&path), "{path} not in the package");
    }
    // Never shipped as a file dpkg would own: an intelmq-mailgen
    // installation's own configuration and templates must survive.
    assert!(
        !contents.contains("./etc/intelmq/intelmq-mailgen.conf"),
        "{contents}"
    );
    assert!(
        !contents.contains("./etc/intelmq/mailgen/templates/"),
        "{contents}"
    );

    // An intelmq-mailgen installation's template that the package also
    // ships: it must be left alone.
    let custom_template = root.file("/etc/intelmq/mailgen/templates/openredis_provider");
    std::fs::create_dir_all(custom_template.parent().unwrap()).unwrap();
    std::fs::write(&custom_template, "Our own subject\n\nOur own text.\n").unwrap();

    // --- the operator's steps, timed from dpkg -i to a verified unit ---
    let install = Instant::now();
    std::fs::copy(&deb, root.file("/tmp/mailgend.deb")).unwrap();
    let start = Instant::now();
    // Fails on missing dependencies (left unconfigured); apt-get -f fixes that.
    let dpkg = run(&mut root.chroot(&["dpkg", "-i", "/tmp/mailgend.deb"]));
    let dpkg_text =
        String::from_utf8_lossy(&dpkg.stdout).to_string() + &String::from_utf8_lossy(&dpkg.stderr);
    t.add("dpkg -i", start);
    let start = Instant::now();
    // A cached root's package lists may be older than the mirror.
    root.apt(&["-f", "install", "-y", "-qq"]);
    t.add("apt-get -f install", start);
    let status = ok(&mut root.chroot(&["dpkg-query", "-W", "-f=${Status}", "mailgend"]));
    assert_eq!(status, "install ok installed", "dpkg -i said:\n{dpkg_text}");

    let start = Instant::now();
    let version = ok(&mut root.chroot(&["mailgend", "--version"]));
    assert_eq!(
        version.trim(),
        format!("mailgend {}", env!("CARGO_PKG_VERSION"))
    );

    // The system user: no login, no home; its group owns the secrets.
    let passwd = ok(&mut root.chroot(&["getent", "passwd", "mailgend"]));
    let fields: Vec<&str> = passwd.trim().split(':').collect();
    assert_eq!(fields[5], "/nonexistent", "{passwd}");
    assert!(fields[6].ends_with("nologin"), "{passwd}");
    let uid: u32 = fields[2].parse().unwrap();
    assert!(uid < 1000, "not a system uid: {passwd}");
    let gid = gid_of(&root, "mailgend");

    let conf = std::fs::metadata(root.file("/etc/intelmq/intelmq-mailgen.conf"))
        .expect("the configuration is created on first install");
    assert_eq!(conf.mode() & 0o7777, 0o640, "config mode");
    assert_eq!((conf.uid(), conf.gid()), (0, gid), "config owner");
    let state = std::fs::metadata(root.file("/var/lib/mailgend")).unwrap();
    assert_eq!(state.mode() & 0o7777, 0o700);
    assert_eq!((state.uid(), state.gid()), (uid, gid));
    let bin = std::fs::metadata(root.file("/usr/bin/mailgend")).unwrap();
    assert_eq!((bin.mode() & 0o7777, bin.uid()), (0o755, 0));
    assert_eq!(
        std::fs::read_to_string(&custom_template).unwrap(),
        "Our own subject\n\nOur own text.\n",
        "an existing template was overwritten"
    );
    assert!(root
        .file("/etc/intelmq/mailgen/templates/shadowserver_csv_Open-Redis")
        .is_file());
    assert!(root
        .file("/etc/intelmq/mailgen/formats/variables.json")
        .is_file());
    let conffiles = ok(&mut root.chroot(&["dpkg-query", "-W", "-f=${Conffiles}", "mailgend"]));
    assert!(
        conffiles.contains("/etc/intelmq/mailgen/formats/10shadowserver.toml"),
        "{conffiles}"
    );
    assert!(conffiles.contains("/etc/mailgend/route.yml"), "{conffiles}");
    // The router's secrets: created from the commented template, for
    // systemd (root) only.
    let env_file = std::fs::metadata(root.file("/etc/default/mailgend-route")).unwrap();
    assert_eq!(env_file.mode() & 0o7777, 0o600);
    assert_eq!((env_file.uid(), env_file.gid()), (0, 0));
    // The package's binary has no `demo` or `bench` (they start their own
    // PostgreSQL and read the source tree); asked for, it says where they are.
    let help = ok(&mut root.chroot(&["mailgend", "--help"]));
    assert!(help.contains("check-config"), "{help}");
    assert!(!help.contains("demo") && !help.contains("bench"), "{help}");
    for sub in ["demo", "bench"] {
        let out = run(&mut root.chroot(&["mailgend", sub]));
        let text = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text}");
        assert!(text.contains("not in this build"), "{text}");
        assert!(text.contains("cargo run --release -- demo"), "{text}");
    }
    // Installed, not enabled and not started: there is no systemd here and
    // the operator configures first.
    let wants = root.file("/etc/systemd/system/multi-user.target.wants/mailgend.service");
    assert!(
        std::fs::symlink_metadata(&wants).is_err(),
        "enabled by the package"
    );

    // check-config on the shipped example, as the service user: it reads
    // the file and reports the missing GnuPG home (a real check, not a
    // rubber stamp) ...
    let as_service = |root: &Root| {
        root.chroot(&[
            "runuser",
            "-u",
            "mailgend",
            "--",
            "env",
            "HOME=/nonexistent",
            "mailgend",
            "check-config",
        ])
    };
    let shipped = run(&mut as_service(&root));
    let shipped_text = String::from_utf8_lossy(&shipped.stdout);
    assert_eq!(shipped.status.code(), Some(1), "{shipped_text}");
    assert!(
        shipped_text.contains("openpgp.gnupg_home"),
        "{shipped_text}"
    );
    // ... a user outside the group cannot read the secrets ...
    let nobody = run(&mut root.chroot(&[
        "runuser",
        "-u",
        "nobody",
        "--",
        "env",
        "HOME=/nonexistent",
        "mailgend",
        "check-config",
    ]));
    let nobody_text = String::from_utf8_lossy(&nobody.stdout);
    assert_eq!(nobody.status.code(), Some(1), "{nobody_text}");
    assert!(nobody_text.contains("Permission denied"), "{nobody_text}");
    // ... and after the operator's edit (a signing key file, as
    // docs/install.md says) everything loads: formats, templates, key.
    let key = "/etc/intelmq/mailgend-signing-key.asc";
    std::fs::copy(
        repo().join("tests/fixtures/keys/test-signing.sec.asc"),
        root.file(key),
    )
    .unwrap();
    ok(&mut root.chroot(&["chown", "root:mailgend", key]));
    ok(&mut root.chroot(&["chmod", "0640", key]));
    // The key file goes into the mailgend section; `openpgp` keeps its
    // three keys, so intelmqcbmail 1.4 could still use the file.
    let conf_path = root.file("/etc/intelmq/intelmq-mailgen.conf");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&conf_path).unwrap()).unwrap();
    json["mailgend"]["signing_key_file"] = serde_json::json!(key);
    // The fingerprint of the exported key (tests/fixtures/keys/README.md),
    // which mailgend also uses to pick the key from the file.
    json["openpgp"]["signing_key"] = serde_json::json!("B9417861749CD740F3E9B2E0C771416A383195BB");
    std::fs::write(&conf_path, serde_json::to_string_pretty(&json).unwrap()).unwrap();
    let checked = ok(&mut as_service(&root));
    assert!(
        checked.contains("configuration OK (/etc/intelmq/intelmq-mailgen.conf)"),
        "{checked}"
    );
    assert!(!checked.contains("WARNING"), "{checked}");
    t.add("mailgend --version, user, permissions, check-config", start);

    // --- the alert router, from the installed sample configuration ---
    let start = Instant::now();
    // The sample as installed passes `route --check`, as the service user
    // with the unit's MAIL2ALERT_CONFIGURATION, and so do its commented
    // blocks once uncommented with their variables set.
    let route_check = |root: &Root, env: &[&str]| {
        let mut args = vec![
            "runuser",
            "-u",
            "mailgend",
            "--",
            "env",
            "MAIL2ALERT_CONFIGURATION=/etc/mailgend/route.yml",
        ];
        args.extend(env);
        args.extend(["mailgend", "route", "--check"]);
        run(&mut root.chroot(&args))
    };
    let checked = route_check(&root, &[]);
    let text = String::from_utf8_lossy(&checked.stdout);
    assert!(checked.status.success(), "{text}");
    assert!(text.contains("/etc/mailgend/route.yml: OK"), "{text}");
    let sample_path = root.file("/etc/mailgend/route.yml");
    let sample = std::fs::read_to_string(&sample_path).unwrap();
    let mut in_gocd = false;
    let uncommented: String = sample
        .lines()
        .map(|l| {
            in_gocd = (in_gocd && !l.is_empty()) || l == "  # - name: gocd";
            match l {
                _ if in_gocd => l.replacen("  # ", "  ", 1),
                "# slack-token: $SLACK_TOKEN" => "slack-token: $SLACK_TOKEN".into(),
                _ => l.to_string(),
            }
        })
        .map(|l| l + "\n")
        .collect();
    std::fs::write(&sample_path, &uncommented).unwrap();
    let checked = route_check(&root, &["GOUSER=u", "GOPASS=p", "SLACK_TOKEN=xoxb-1"]);
    let text = String::from_utf8_lossy(&checked.stdout);
    assert!(checked.status.success(), "{text}");
    assert!(text.contains("gocd"), "{text}");
    assert!(text.contains("Slack via"), "{text}");
    std::fs::write(&sample_path, &sample).unwrap();

    // The operator's edits: own ports, clients must log in with a password
    // kept in /etc/default/mailgend-route.
    let (listen, sink) = (free_port(), mailgend::sandbox::SmtpSink::start());
    let conf = "/etc/mailgend/route.yml";
    edit_line(
        &root,
        conf,
        "local-smtp: 127.0.0.1:1025",
        &format!("local-smtp: 127.0.0.1:{listen}"),
    );
    edit_line(
        &root,
        conf,
        "remote-smtp: 127.0.0.1:25",
        &format!("remote-smtp: 127.0.0.1:{}", sink.port()),
    );
    edit_line(&root, conf, "# mailgend:", "mailgend:");
    edit_line(&root, conf, "#   auth-user: alerts", "  auth-user: alerts");
    edit_line(
        &root,
        conf,
        "#   auth-password: $ROUTE_AUTH_PASSWORD",
        "  auth-password: $ROUTE_AUTH_PASSWORD",
    );
    let secret = "s3cret from the environment file";
    edit_line(
        &root,
        "/etc/default/mailgend-route",
        "#ROUTE_AUTH_PASSWORD=the password SMTP clients log in with",
        &format!("ROUTE_AUTH_PASSWORD='{secret}'"),
    );
    // docs/install.md's check with the unit's variables.
    let checked = ok(&mut root.chroot(&[
        "sh",
        "-c",
        "set -a; . /etc/default/mailgend-route; set +a; \
         runuser -u mailgend -- mailgend route --check -c /etc/mailgend/route.yml",
    ]));
    assert!(checked.contains("AUTH required"), "{checked}");
    let mut router = UnitProcess::start(&root, "mailgend-route.service");
    router.wait_listening(listen);
    // A wrong password is refused: the password is the environment file's.
    let said = smtp_send(
        listen,
        "alerts",
        "wrong",
        "alerts@example.org",
        "backup failed",
    );
    assert!(said.contains("SMTPAuthenticationError"), "{said}");
    let said = smtp_send(
        listen,
        "alerts",
        secret,
        "alerts@example.org",
        "db1: backup failed",
    );
    assert_eq!(said.trim(), "sent", "{said}\n{}", router.log());
    let mails = sink.wait_for(1, Duration::from_secs(30));
    assert_eq!(mails.len(), 1, "{}", router.log());
    assert_eq!(mails[0].rcpt_to, ["ops@example.org"], "{}", router.log());
    assert!(String::from_utf8_lossy(&mails[0].data).contains("db1: backup failed"));
    drop(router);
    assert!(
        root.file("/var/spool/mailgend-route").is_dir(),
        "ExecStartPre made the spool"
    );
    t.add(
        "mailgend-route from the sample configuration: check, start, route a mail",
        start,
    );

    // The installed unit, verified by the root's own systemd (Debian 12's
    // 252, what the operator has); systemd comes after the package, so the
    // package was installed into a root without systemd, as in a container.
    let start = Instant::now();
    root.apt(&["install", "-y", "-qq", "--no-install-recommends", "systemd"]);
    let systemd_install = start.elapsed();
    t.add(
        "apt-get install systemd (for systemd-analyze; not counted below)",
        start,
    );
    let start = Instant::now();
    // Every unit of systemd/ (the alert router's comes with its branch).
    let units: Vec<String> = repo_units()
        .iter()
        .map(|u| format!("/usr/lib/systemd/system/{u}"))
        .collect();
    let mut args = vec!["systemd-analyze", "verify"];
    args.extend(units.iter().map(String::as_str));
    let verify = run(&mut root.chroot(&args));
    let verify_text = String::from_utf8_lossy(&verify.stdout).to_string()
        + &String::from_utf8_lossy(&verify.stderr);
    assert!(
        verify.status.success(),
        "systemd-analyze verify:\n{verify_text}"
    );
    assert!(
        !verify_text.contains("mailgend"),
        "systemd-analyze verify has remarks on the units:\n{verify_text}"
    );
    // `systemctl enable` (the documented `enable --now` without a running
    // systemd to start it) wires it into multi-user.target.
    ok(&mut root.chroot(&["systemctl", "enable", "mailgend"]));
    // (A link to an absolute path inside the root: read, not followed.
    // Debian 12's merged /usr makes /lib/systemd/system the same place.)
    let link = std::fs::read_link(&wants).expect("enabled");
    assert!(
        link.ends_with("lib/systemd/system/mailgend.service"),
        "{}",
        link.display()
    );
    t.add("systemd-analyze verify", start);
    t.0.push((
        "install: dpkg -i to a verified unit (operator's steps)".into(),
        install.elapsed() - systemd_install,
    ));

    // An upgrade (the same version again runs the same maintainer-script
    // paths: prerm upgrade, postinst configure OLD) keeps the operator's
    // edits and the enabled unit.
    let start = Instant::now();
    let edited = std::fs::read_to_string(&conf_path).unwrap();
    ok(&mut root.chroot(&["dpkg", "-i", "/tmp/mailgend.deb"]));
    assert_eq!(std::fs::read_to_string(&conf_path).unwrap(), edited);
    assert!(
        std::fs::read_link(&wants).is_ok(),
        "upgrade disabled the unit"
    );
    ok(&mut as_service(&root));

    // Purge (Debian Policy 10.7.3): the program and the conffiles go, and
    // so does what postinst created while it is unchanged (the templates,
    // variables.json); what the operator changed since (the configuration
    // with the key file, the router's secret) and what was there before
    // the package (the intelmq-mailgen template) stay, as does the user.
    let env_path = root.file("/etc/default/mailgend-route");
    let env_edited = std::fs::read_to_string(&env_path).unwrap();
    let created_template = root.file("/etc/intelmq/mailgen/templates/shadowserver_csv_Open-Redis");
    let variables = root.file("/etc/intelmq/mailgen/formats/variables.json");
    let said = ok(&mut root.chroot(&["dpkg", "--purge", "mailgend"]));
    assert!(!root.file("/usr/bin/mailgend").exists());
    assert!(!root
        .file("/etc/intelmq/mailgen/formats/10shadowserver.toml")
        .exists());
    assert!(!root.file("/etc/mailgend").exists(), "conffile dir left");
    assert!(!created_template.exists(), "unchanged template kept");
    assert!(!variables.exists(), "unchanged variables.json kept");
    assert_eq!(std::fs::read_to_string(&conf_path).unwrap(), edited);
    assert_eq!(std::fs::read_to_string(&env_path).unwrap(), env_edited);
    assert!(
        said.contains("keeping /etc/intelmq/intelmq-mailgen.conf: changed"),
        "{said}"
    );
    assert!(custom_template.is_file());
    assert!(!root.file("/var/lib/mailgend-package").exists());
    ok(&mut root.chroot(&["getent", "passwd", "mailgend"]));

    // Purge right after an unchanged installation: nothing of it is left.
    // (First the operator's own files go: the key file, and what the
    // purge kept.)
    for f in [&conf_path, &env_path, &custom_template, &root.file(key)] {
        std::fs::remove_file(f).unwrap();
    }
    ok(&mut root.chroot(&["dpkg", "-i", "/tmp/mailgend.deb"]));
    assert!(conf_path.is_file() && env_path.is_file() && created_template.is_file());
    ok(&mut root.chroot(&["dpkg", "--purge", "mailgend"]));
    for gone in [
        "/etc/intelmq",
        "/etc/mailgend",
        "/etc/default/mailgend-route",
        "/var/lib/mailgend",
        "/var/lib/mailgend-package",
        "/usr/share/mailgend",
    ] {
        let left = run(Command::new("find").arg(root.file(gone)));
        assert!(
            std::fs::symlink_metadata(root.file(gone)).is_err(),
            "{gone} left after purging an unchanged installation:\n{}",
            String::from_utf8_lossy(&left.stdout)
        );
    }

    // Installing over an intelmq-mailgen installation's configuration
    // (its own owner and mode): the file is left exactly as it is, the
    // package says that the service user cannot read it, and a purge
    // keeps it.
    let theirs = "{\"sender\": \"intelmq-mailgen's own file\"}\n";
    std::fs::create_dir_all(conf_path.parent().unwrap()).unwrap();
    std::fs::write(&conf_path, theirs).unwrap();
    ok(&mut root.chroot(&["chown", "root:root", "/etc/intelmq/intelmq-mailgen.conf"]));
    ok(&mut root.chroot(&["chmod", "0600", "/etc/intelmq/intelmq-mailgen.conf"]));
    let said = ok(&mut root.chroot(&["dpkg", "-i", "/tmp/mailgend.deb"]));
    assert_eq!(std::fs::read_to_string(&conf_path).unwrap(), theirs);
    let meta = std::fs::metadata(&conf_path).unwrap();
    assert_eq!((meta.mode() & 0o7777, meta.gid()), (0o600, 0));
    assert!(
        said.contains("the user mailgend cannot read /etc/intelmq/intelmq-mailgen.conf"),
        "{said}"
    );
    ok(&mut root.chroot(&["dpkg", "--purge", "mailgend"]));
    assert_eq!(std::fs::read_to_string(&conf_path).unwrap(), theirs);
    assert!(!created_template.exists());
    t.add(
        "upgrade, purges (edited, unchanged), install over and purge around an existing configuration",
        start,
    );

    t.add("whole test", total);
    let report = t.report();
    println!("{report}");
    std::fs::write(work_dir().join("timings.txt"), &report).unwrap();
    drop(root);
}
