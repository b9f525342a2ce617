//! The Debian package, installed the way an operator installs it: built
//! with cargo-deb from the test build of the binary and checked by
//! lintian, installed with `dpkg -i` + `apt-get -f install` into a clean
//! Debian 12 root made by `debootstrap --variant=minbase`, then checked
//! from inside that root (version, system user, permissions of the
//! secrets, `check-config` as the service user, `systemd-analyze verify`
//! of the installed unit by the root's own systemd, installed after the
//! package), upgraded, purged and installed over an existing
//! configuration.
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

/// A fresh root for one run: unpacked from the cache, /proc mounted,
/// everything unmounted and removed on drop (also when the test fails).
struct Root {
    dir: Option<tempfile::TempDir>,
    mounts: Vec<PathBuf>,
}

impl Root {
    fn new(tar: &Path) -> Root {
        let dir = tempfile::Builder::new()
            .prefix("root-")
            .tempdir_in(work_dir())
            .unwrap();
        let mut root = Root {
            dir: Some(dir),
            mounts: Vec::new(),
        };
        ok(Command::new("tar")
            .arg("-C")
            .arg(root.path())
            .args(["--numeric-owner", "-xpf"])
            .arg(tar));
        std::fs::copy("/etc/resolv.conf", root.path().join("etc/resolv.conf")).ok();
        let proc_dir = root.path().join("proc");
        ok(Command::new("mount")
            .args(["-t", "proc", "proc"])
            .arg(&proc_dir));
        root.mounts.push(proc_dir);
        root
    }

    fn path(&self) -> &Path {
        self.dir.as_ref().unwrap().path()
    }

    fn file(&self, abs: &str) -> PathBuf {
        self.path().join(abs.trim_start_matches('/'))
    }

    /// A command run inside the root, with a plain environment.
    fn chroot(&self, args: &[&str]) -> Command {
        let mut c = Command::new("chroot");
        c.arg(self.path())
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
        for m in self.mounts.drain(..).rev() {
            let _ = Command::new("umount").arg("-l").arg(&m).status();
        }
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

/// `cargo deb` on the test build of the binary (no release build: that
/// costs minutes on CI's two cores).
fn build_deb(out_dir: &Path) -> PathBuf {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_mailgend"));
    assert!(bin.is_file(), "{} was not built", bin.display());
    let deb = out_dir.join("mailgend.deb");
    ok(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(repo())
            .args([
                "deb",
                "--no-build",
                "--profile",
                "dev",
                "--fast",
                "--output",
            ])
            .arg(&deb),
    );
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
        "cargo deb --no-build --profile dev (in parallel)".into(),
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
    let conf_path = root.file("/etc/intelmq/intelmq-mailgen.conf");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&conf_path).unwrap()).unwrap();
    json["openpgp"] = serde_json::json!({"always_sign": true, "key_file": key});
    std::fs::write(&conf_path, serde_json::to_string_pretty(&json).unwrap()).unwrap();
    let checked = ok(&mut as_service(&root));
    assert!(
        checked.contains("configuration OK (/etc/intelmq/intelmq-mailgen.conf)"),
        "{checked}"
    );
    t.add("mailgend --version, user, permissions, check-config", start);

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

    // Purge: the program and the conffiles go; what intelmq-mailgen may
    // share (configuration, templates) and the user stay.
    ok(&mut root.chroot(&["dpkg", "--purge", "mailgend"]));
    assert!(!root.file("/usr/bin/mailgend").exists());
    assert!(!root
        .file("/etc/intelmq/mailgen/formats/10shadowserver.toml")
        .exists());
    assert_eq!(std::fs::read_to_string(&conf_path).unwrap(), edited);
    assert!(custom_template.is_file());
    ok(&mut root.chroot(&["getent", "passwd", "mailgend"]));

    // Installing over an intelmq-mailgen installation's configuration
    // (its own owner and mode): the file is left exactly as it is, and
    // the package says that the service user cannot read it.
    let theirs = "{\"sender\": \"intelmq-mailgen's own file\"}\n";
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
    t.add(
        "upgrade, purge, install over an existing configuration",
        start,
    );

    t.add("whole test", total);
    let report = t.report();
    println!("{report}");
    std::fs::write(work_dir().join("timings.txt"), &report).unwrap();
    drop(root);
}
