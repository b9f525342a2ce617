//! What a GnuPG home's `gpg.conf` changes about a detached signature, and
//! the digest GnuPG 2.2 would choose for a key.
//!
//! intelmq-mailgen signs through gpgme, i.e. with the `gpg` of the
//! configured `gnupg_home`, so that home's `gpg.conf` decides the digest
//! (and with it `micalg`) and adds armour header lines. mailgend signs in
//! process and so reads the same file itself. Only the options that change
//! a detached, armoured signature are taken; everything else in the file is
//! gpg's business and ignored.
//!
//! The rules below were measured with GnuPG 2.2.40 (Debian 12) and are
//! checked against the installed gpg by `tests/signature.rs`
//! (`digest_and_armour_headers_as_gpg_makes_them`):
//! - the file read is the first of `gpg.conf-2.2.N`, `gpg.conf-2.2`,
//!   `gpg.conf-2`, `gpg.conf` that exists (gpg's versioned option files);
//! - a line is `option [argument]`, leading blanks and `#` comment lines
//!   skipped, trailing blanks cut, one pair of double quotes around the
//!   argument removed;
//! - `digest-algo X` wins for every key type; for (EC)DSA a digest shorter
//!   than the key's group order makes every signature fail;
//! - ECDSA keys: the digest matching the curve (P-256 → SHA-256, P-384 →
//!   SHA-384, P-521 → SHA-512), whatever the preferences say;
//! - DSA keys: the first `personal-digest-preferences` entry at least as
//!   long as q, else the one matching q;
//! - every other key (RSA, EdDSA): the first `personal-digest-preferences`
//!   entry; without one SHA-512 for RSA and SHA-256 for EdDSA;
//! - `comment X` adds a `Comment: X` armour line (in order), `no-comments`
//!   drops those before it, a bare `comment` is ignored with a warning;
//!   `emit-version` (repeatable) adds `Version: GnuPG v2`, `v2.2`,
//!   `v2.2.40`, `v2.2.40 (GNU/Linux)` by level, `no-emit-version` resets;
//! - an unknown name in `personal-digest-preferences` makes gpg refuse to
//!   sign at all.
//!
//! intelmq-mailgen can only name SHA-1, SHA-256, SHA-384 and SHA-512 in
//! `micalg` (its `mail.py` raises for any other digest gpgme reports), so
//! with a configuration choosing another digest it sent nothing; mailgend
//! refuses such a configuration at start instead of failing every mail.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

use sequoia_openpgp::crypto::mpi;
use sequoia_openpgp::packet::key::{PublicParts, UnspecifiedRole};
use sequoia_openpgp::packet::Key;
use sequoia_openpgp::types::{HashAlgorithm, PublicKeyAlgorithm};

/// A digest a signature can use and `micalg` can name (RFC 3156 §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Digest {
    Sha1,
    Sha256,
    Sha384,
    Sha512,
}

impl Digest {
    pub fn algorithm(self) -> HashAlgorithm {
        match self {
            Digest::Sha1 => HashAlgorithm::SHA1,
            Digest::Sha256 => HashAlgorithm::SHA256,
            Digest::Sha384 => HashAlgorithm::SHA384,
            Digest::Sha512 => HashAlgorithm::SHA512,
        }
    }

    /// The `micalg` parameter of `multipart/signed`.
    pub fn micalg(self) -> &'static str {
        match self {
            Digest::Sha1 => "pgp-sha1",
            Digest::Sha256 => "pgp-sha256",
            Digest::Sha384 => "pgp-sha384",
            Digest::Sha512 => "pgp-sha512",
        }
    }

    fn from_algorithm(a: HashAlgorithm) -> Option<Digest> {
        match a {
            HashAlgorithm::SHA1 => Some(Digest::Sha1),
            HashAlgorithm::SHA256 => Some(Digest::Sha256),
            HashAlgorithm::SHA384 => Some(Digest::Sha384),
            HashAlgorithm::SHA512 => Some(Digest::Sha512),
            _ => None,
        }
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.algorithm(), f)
    }
}

/// A problem with `gpg.conf`, located.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}:{line}: {reason}")]
pub struct GpgConfError {
    pub path: String,
    pub line: usize,
    pub reason: String,
}

/// A digest choice and the line of `gpg.conf` it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Located<T> {
    value: T,
    line: usize,
}

/// The signing-related options of one `gpg.conf` (empty: no file).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GpgConf {
    /// The file read, for messages; `None` when there was none.
    path: Option<PathBuf>,
    digest_algo: Option<Located<HashAlgorithm>>,
    personal_digest_prefs: Option<Located<Vec<HashAlgorithm>>>,
    comments: Vec<String>,
    emit_version: u32,
    /// Lines gpg itself warns about and ignores.
    pub warnings: Vec<String>,
}

/// gpg's versioned option files, most specific first, then `gpg.conf`.
fn candidates(home: &Path, gpg_version: Option<&str>) -> Vec<PathBuf> {
    let mut names = Vec::new();
    if let Some(v) = gpg_version {
        let parts: Vec<&str> = v.split('.').collect();
        for n in (1..=parts.len()).rev() {
            names.push(format!("gpg.conf-{}", parts[..n].join(".")));
        }
    } else {
        names.push("gpg.conf-2.2".into());
        names.push("gpg.conf-2".into());
    }
    names.push("gpg.conf".into());
    names.into_iter().map(|n| home.join(n)).collect()
}

impl GpgConf {
    /// Reads the option file gpg would read in `home`; no file is an empty
    /// configuration.
    pub fn read(home: &Path) -> Result<GpgConf, GpgConfError> {
        let version = gpg_version();
        for path in candidates(home, version.as_deref()) {
            match std::fs::read(&path) {
                Ok(bytes) => {
                    let text = String::from_utf8_lossy(&bytes);
                    return GpgConf::parse(&text, &path);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(GpgConfError {
                        path: path.display().to_string(),
                        line: 0,
                        reason: format!("cannot read: {e}"),
                    })
                }
            }
        }
        Ok(GpgConf::default())
    }

    /// Parses the text of an option file named `path`.
    pub fn parse(text: &str, path: &Path) -> Result<GpgConf, GpgConfError> {
        let mut conf = GpgConf {
            path: Some(path.to_path_buf()),
            ..GpgConf::default()
        };
        let err = |line: usize, reason: String| GpgConfError {
            path: path.display().to_string(),
            line,
            reason,
        };
        for (i, raw) in text.lines().enumerate() {
            let line_no = i + 1;
            let line = raw.trim_start();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (name, arg) = match line.find(|c: char| c.is_ascii_whitespace()) {
                Some(at) => (&line[..at], line[at..].trim()),
                None => (line.trim_end(), ""),
            };
            let arg = arg
                .strip_prefix('"')
                .and_then(|a| a.strip_suffix('"'))
                .unwrap_or(arg);
            match name {
                "digest-algo" => {
                    let a = parse_digest_name(arg).ok_or_else(|| {
                        err(line_no, format!("digest-algo: unknown digest {arg:?}"))
                    })?;
                    conf.digest_algo = Some(Located {
                        value: a,
                        line: line_no,
                    });
                }
                "personal-digest-preferences" => {
                    let mut prefs = Vec::new();
                    for item in arg.split([' ', '\t', ',']).filter(|s| !s.is_empty()) {
                        prefs.push(parse_digest_name(item).ok_or_else(|| {
                            err(
                                line_no,
                                format!(
                                    "personal-digest-preferences: unknown digest {item:?} \
                                     (gpg refuses to sign with this file)"
                                ),
                            )
                        })?);
                    }
                    conf.personal_digest_prefs = Some(Located {
                        value: prefs,
                        line: line_no,
                    });
                }
                "comment" if arg.is_empty() => conf.warnings.push(format!(
                    "{}:{line_no}: comment without text; ignored, as gpg does",
                    path.display()
                )),
                "comment" => conf.comments.push(arg.to_string()),
                "no-comments" => conf.comments.clear(),
                "emit-version" => conf.emit_version += 1,
                "no-emit-version" => conf.emit_version = 0,
                "sig-notation" | "set-notation" | "sig-policy-url" | "set-policy-url"
                | "sig-keyserver-url" | "default-sig-expire" | "force-v3-sigs"
                | "force-sign-key" => conf.warnings.push(format!(
                    "{}:{line_no}: {name} is not applied to mailgend's signatures",
                    path.display()
                )),
                _ => {}
            }
        }
        Ok(conf)
    }

    /// The digest GnuPG 2.2 signs with for `key` under these options.
    pub fn digest_for(
        &self,
        key: &Key<PublicParts, UnspecifiedRole>,
    ) -> Result<Digest, GpgConfError> {
        let kind = KeyKind::of(key);
        let prefs = self.personal_digest_prefs.as_ref();
        let (algo, line) = if let Some(d) = self.digest_algo {
            if let Some(q) = kind.group_order_bytes() {
                // P-521's order is longer than any digest: SHA-512 does.
                if digest_len(d.value) < q.min(64) {
                    return Err(self.error(
                        d.line,
                        format!(
                            "digest-algo {} is shorter than the key's {}-bit group order; \
                             gpg cannot sign with it",
                            d.value,
                            q * 8
                        ),
                    ));
                }
            }
            (d.value, Some(d.line))
        } else {
            match kind {
                KeyKind::Ecdsa { q_bytes } => (match_dsa_hash(q_bytes), None),
                KeyKind::Dsa { q_bytes } => {
                    let pick = prefs.and_then(|p| {
                        p.value
                            .iter()
                            .find(|a| {
                                if q_bytes == 20 {
                                    digest_len(**a) == 20
                                } else {
                                    digest_len(**a) >= q_bytes
                                }
                            })
                            .map(|a| (*a, Some(p.line)))
                    });
                    pick.unwrap_or((match_dsa_hash(q_bytes), None))
                }
                KeyKind::EdDsa | KeyKind::Other => {
                    match prefs.and_then(|p| p.value.first().map(|a| (*a, p.line))) {
                        Some((a, line)) => (a, Some(line)),
                        None if kind == KeyKind::EdDsa => (HashAlgorithm::SHA256, None),
                        None => (HashAlgorithm::SHA512, None),
                    }
                }
            }
        };
        Digest::from_algorithm(algo).ok_or_else(|| {
            self.error(
                line.unwrap_or(0),
                format!(
                    "gpg would sign with {algo}, which intelmq-mailgen could not name in \
                     micalg (it sent no mail); choose SHA256, SHA384 or SHA512"
                ),
            )
        })
    }

    /// The armour header lines gpg writes with these options, in order.
    pub fn armor_headers(&self) -> Vec<(String, String)> {
        let mut headers = Vec::new();
        if self.emit_version > 0 {
            let full = if self.emit_version >= 2 {
                gpg_version()
            } else {
                None
            };
            headers.push((
                "Version".to_string(),
                version_line(self.emit_version, full.as_deref()),
            ));
        }
        for c in &self.comments {
            headers.push(("Comment".to_string(), c.clone()));
        }
        headers
    }

    fn error(&self, line: usize, reason: String) -> GpgConfError {
        GpgConfError {
            path: self
                .path
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "gpg.conf".into()),
            line,
            reason,
        }
    }
}

/// `Version:` text for emit-version level `level` (≥ 1).
fn version_line(level: u32, full: Option<&str>) -> String {
    let full = full.unwrap_or("2.2");
    let parts: Vec<&str> = full.split('.').collect();
    match level {
        1 => format!("GnuPG v{}", parts[0]),
        2 => format!("GnuPG v{}", parts[..parts.len().min(2)].join(".")),
        3 => format!("GnuPG v{full}"),
        _ => format!("GnuPG v{full} (GNU/Linux)"),
    }
}

/// The installed gpg's version (`2.2.40`), if gpg runs.
fn gpg_version() -> Option<String> {
    let out = Command::new("gpg")
        .args(["--version"])
        .env("LC_ALL", "C")
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text.lines().next()?;
    let v = first.rsplit(' ').next()?;
    v.chars()
        .all(|c| c.is_ascii_digit() || c == '.')
        .then(|| v.to_string())
}

/// A digest name as gpg reads it: `SHA256` (any case) or `H8`.
fn parse_digest_name(s: &str) -> Option<HashAlgorithm> {
    if let Some(n) = s.strip_prefix(['H', 'h']) {
        if let Ok(n) = n.parse::<u8>() {
            return Some(HashAlgorithm::from(n));
        }
    }
    Some(match s.to_ascii_uppercase().as_str() {
        "MD5" => HashAlgorithm::MD5,
        "SHA1" => HashAlgorithm::SHA1,
        "RIPEMD160" => HashAlgorithm::RipeMD,
        "SHA256" => HashAlgorithm::SHA256,
        "SHA384" => HashAlgorithm::SHA384,
        "SHA512" => HashAlgorithm::SHA512,
        "SHA224" => HashAlgorithm::SHA224,
        _ => return None,
    })
}

fn digest_len(a: HashAlgorithm) -> usize {
    a.digest_size().unwrap_or(0)
}

/// gpg's choice for a DSA/ECDSA group order of `q_bytes`.
fn match_dsa_hash(q_bytes: usize) -> HashAlgorithm {
    match q_bytes {
        0..=20 => HashAlgorithm::SHA1,
        21..=28 => HashAlgorithm::SHA224,
        29..=32 => HashAlgorithm::SHA256,
        33..=48 => HashAlgorithm::SHA384,
        _ => HashAlgorithm::SHA512,
    }
}

/// The key properties the digest choice depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    Dsa { q_bytes: usize },
    Ecdsa { q_bytes: usize },
    EdDsa,
    Other,
}

impl KeyKind {
    fn of(key: &Key<PublicParts, UnspecifiedRole>) -> KeyKind {
        #[allow(deprecated)] // DSA is deprecated for new keys, but gpg signs with it.
        match (key.pk_algo(), key.mpis()) {
            (PublicKeyAlgorithm::DSA, mpi::PublicKey::DSA { q, .. }) => KeyKind::Dsa {
                q_bytes: q.bits().div_ceil(8),
            },
            (PublicKeyAlgorithm::ECDSA, mpi::PublicKey::ECDSA { curve, .. }) => KeyKind::Ecdsa {
                q_bytes: curve.bits().unwrap_or(256).div_ceil(8),
            },
            (
                PublicKeyAlgorithm::EdDSA | PublicKeyAlgorithm::Ed25519 | PublicKeyAlgorithm::Ed448,
                _,
            ) => KeyKind::EdDsa,
            _ => KeyKind::Other,
        }
    }

    fn group_order_bytes(self) -> Option<usize> {
        match self {
            KeyKind::Dsa { q_bytes } | KeyKind::Ecdsa { q_bytes } => Some(q_bytes),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> GpgConf {
        GpgConf::parse(text, Path::new("/h/gpg.conf")).unwrap()
    }

    #[test]
    fn options_are_read_as_gpg_reads_them() {
        let c = parse(
            "# a comment\n  comment   indented  text  \ncomment \"quoted\"\ncomment\n\
             emit-version\nemit-version\npersonal-digest-preferences sha384,H10 SHA256\n",
        );
        assert_eq!(
            c.comments,
            vec!["indented  text".to_string(), "quoted".to_string()]
        );
        assert_eq!(c.emit_version, 2);
        assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
        assert_eq!(
            c.personal_digest_prefs.unwrap().value,
            vec![
                HashAlgorithm::SHA384,
                HashAlgorithm::SHA512,
                HashAlgorithm::SHA256
            ]
        );
        let c = parse("comment a\nno-comments\ncomment b\nemit-version\nno-emit-version\n");
        assert_eq!(c.comments, vec!["b".to_string()]);
        assert_eq!(c.emit_version, 0);
    }

    #[test]
    fn unknown_digest_names_are_located_errors() {
        let e = GpgConf::parse(
            "\npersonal-digest-preferences SHA-256\n",
            Path::new("/h/gpg.conf"),
        )
        .unwrap_err();
        assert_eq!((e.path.as_str(), e.line), ("/h/gpg.conf", 2));
        assert!(e.reason.contains("SHA-256"), "{e}");
    }

    #[test]
    fn version_lines_by_level() {
        assert_eq!(version_line(1, Some("2.2.40")), "GnuPG v2");
        assert_eq!(version_line(2, Some("2.2.40")), "GnuPG v2.2");
        assert_eq!(version_line(3, Some("2.2.40")), "GnuPG v2.2.40");
        assert_eq!(version_line(4, Some("2.2.40")), "GnuPG v2.2.40 (GNU/Linux)");
    }

    #[test]
    fn versioned_files_come_first() {
        let c = candidates(Path::new("/h"), Some("2.2.40"));
        let names: Vec<_> = c
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap())
            .collect();
        assert_eq!(
            names,
            ["gpg.conf-2.2.40", "gpg.conf-2.2", "gpg.conf-2", "gpg.conf"]
        );
    }

    #[test]
    fn dsa_hash_by_group_order() {
        assert_eq!(match_dsa_hash(20), HashAlgorithm::SHA1);
        assert_eq!(match_dsa_hash(28), HashAlgorithm::SHA224);
        assert_eq!(match_dsa_hash(32), HashAlgorithm::SHA256);
        assert_eq!(match_dsa_hash(48), HashAlgorithm::SHA384);
        assert_eq!(match_dsa_hash(66), HashAlgorithm::SHA512);
    }
}
