//! OpenPGP signing of outgoing mail, in process (spec §7, §10).
//!
//! Owns loading the signing key once at start and making ASCII-armoured
//! detached signatures for PGP/MIME (RFC 3156). intelmq-mailgen asks gpgme
//! (and so a gpg process) for every mail; mailgend exports the key from the
//! same GnuPG home once (`gpg --export-secret-keys`), keeps the parsed key in
//! memory and signs with sequoia, so signing costs one RSA operation and no
//! process. Like intelmq-mailgen we need a key without passphrase: a
//! protected key is refused at start with a clear error instead of hanging
//! on a pinentry later.
//!
//! Signatures always use SHA-256, the digest intelmq-mailgen users get with
//! the recommended `personal-digest-preferences SHA256`; `micalg` reports
//! the digest really used. Each signature is a v4 (for v4 keys) binary
//! signature carrying issuer, issuer fingerprint and creation time like
//! gpg's, plus sequoia's random salt notation, which makes signatures
//! unpredictable: that blunts chosen-prefix attacks for a host that signs
//! text partly chosen by outsiders (event data).
//!
//! Key selection (`key_spec`, as for gpg's `--local-user`):
//! - hex key id (8 or 16 digits) or fingerprint (40 or 64), optional `0x`;
//!   with a trailing `!` exactly that (sub)key is used, otherwise the best
//!   signing key of the certificate it belongs to (as gpg does);
//! - `=uid` exact user id, `<addr>` exact e-mail, `@part` e-mail part,
//!   anything else a case-insensitive user-id substring.
//!
//! The best signing key of a certificate is the newest signing-capable key
//! that is valid now under sequoia's standard policy (not expired, not
//! revoked) and whose secret material is present.

use std::fmt;
use std::io::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::SystemTime;

use sequoia_openpgp as openpgp;

use openpgp::cert::prelude::*;
use openpgp::crypto::mem::Protected;
use openpgp::crypto::KeyPair;
use openpgp::crypto::S2K;
use openpgp::packet::key::SecretKeyMaterial;
use openpgp::packet::signature::SignatureBuilder;
use openpgp::packet::Signature;
use openpgp::parse::Parse;
use openpgp::policy::StandardPolicy;
use openpgp::serialize::Serialize as _;
use openpgp::types::{HashAlgorithm, RevocationStatus, SignatureType};
use openpgp::Packet;

/// The digest every signature uses, and its RFC 3156 `micalg` name.
const HASH: HashAlgorithm = HashAlgorithm::SHA256;
const MICALG: &str = "pgp-sha256";

/// An ASCII-armoured detached signature and the digest it used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DetachedSignature {
    /// `-----BEGIN PGP SIGNATURE-----` … `-----END PGP SIGNATURE-----`,
    /// LF line ends, ending with a line end (as gpg writes it).
    pub armored: String,
    /// The `micalg` parameter naming the digest really used, e.g.
    /// `pgp-sha256`.
    pub micalg: &'static str,
}

/// Anything that makes detached signatures for the MIME builder.
///
/// [`Signer`] is the real one; the trait lets tests plug in a fixed
/// placeholder and lets a later, faster signer slot in without touching
/// `mail`.
pub trait DetachedSigner: Send + Sync {
    /// Signs exactly `data`.
    fn sign_detached(&self, data: &[u8]) -> Result<DetachedSignature, SignError>;
}

/// Why a key could not be loaded or a signature not be made.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("could not run gpg: {0}")]
    GpgSpawn(#[source] std::io::Error),
    #[error("gpg --export-secret-keys {spec:?} failed ({status}): {stderr}")]
    GpgFailed {
        spec: String,
        status: String,
        stderr: String,
    },
    #[error("cannot read key file {path}: {source}")]
    ReadKeyFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{origin}: not a valid OpenPGP key: {reason}")]
    Parse { origin: String, reason: String },
    #[error("{origin}: no key matches {spec:?}")]
    KeyNotFound { origin: String, spec: String },
    #[error(
        "{origin}: {spec:?} matches several certificates ({fingerprints}); give a fingerprint"
    )]
    Ambiguous {
        origin: String,
        spec: String,
        fingerprints: String,
    },
    #[error("{origin}: certificate {fingerprint} is revoked")]
    Revoked { origin: String, fingerprint: String },
    #[error("{origin}: certificate {fingerprint} is expired")]
    Expired { origin: String, fingerprint: String },
    #[error("{origin}: certificate {fingerprint} is not valid: {reason}")]
    Invalid {
        origin: String,
        fingerprint: String,
        reason: String,
    },
    #[error("{origin}: key {fingerprint} cannot sign now: {reason}")]
    NoSigningKey {
        origin: String,
        fingerprint: String,
        reason: String,
    },
    #[error(
        "{origin}: the secret part of signing key {fingerprint} is missing \
         (public key only, or a stub for an offline or smartcard key)"
    )]
    NoSecret { origin: String, fingerprint: String },
    #[error(
        "{origin}: signing key {fingerprint} is protected by a passphrase; \
         mailgend (like intelmq-mailgen) needs a key without passphrase"
    )]
    PassphraseProtected { origin: String, fingerprint: String },
    #[error(
        "{origin}: gpg could not export {spec:?} without a passphrase; mailgend \
         (like intelmq-mailgen) needs a key without passphrase (gpg: {stderr})"
    )]
    ExportNeedsPassphrase {
        origin: String,
        spec: String,
        stderr: String,
    },
    #[error("signing failed: {0}")]
    Sign(String),
}

/// Where a key came from, for error messages.
fn origin_gnupg(home: &Path) -> String {
    format!("GnuPG home {}", home.display())
}

/// The loaded signing key. Parsed once; cheap to share (`Arc<Signer>`)
/// across workers: signing takes `&self`.
#[derive(Clone)]
pub struct Signer {
    keypair: KeyPair,
    /// Fingerprint of the (sub)key that signs.
    key_fingerprint: String,
    /// Fingerprint of its certificate (the primary key).
    cert_fingerprint: String,
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print key material.
        f.debug_struct("Signer")
            .field("key", &self.key_fingerprint)
            .field("cert", &self.cert_fingerprint)
            .finish()
    }
}

impl Signer {
    /// Loads `key_spec` from the GnuPG home `home` with one
    /// `gpg --export-secret-keys` call. An empty `key_spec` takes the only
    /// secret key of the home (several are [`SignError::Ambiguous`]).
    ///
    /// gpg runs with `--batch --pinentry-mode error`, so a protected key
    /// makes the export fail (or arrive protected) instead of waiting for a
    /// pinentry: that is [`SignError::ExportNeedsPassphrase`] (gpg 2.2
    /// refuses the export) or [`SignError::PassphraseProtected`] (the key
    /// arrives protected). gpg's message is kept in the error.
    pub fn from_gnupg_home(home: &Path, key_spec: &str) -> Result<Signer, SignError> {
        let origin = origin_gnupg(home);
        let spec = Some(key_spec.trim()).filter(|s| !s.is_empty());
        let output = Command::new("gpg")
            .arg("--homedir")
            .arg(home)
            .args([
                "--batch",
                "--no-tty",
                "--pinentry-mode",
                "error",
                "--armor",
                "--export-secret-keys",
                "--",
            ])
            // No spec: every secret key; selection then needs exactly one.
            .args(spec.map(|s| s.to_string()))
            .env("LC_ALL", "C")
            .output()
            .map_err(SignError::GpgSpawn)?;
        // The export started a gpg-agent; we never need it again, and a
        // service should not leave it running in its cgroup.
        let _ = Command::new("gpgconf")
            .arg("--homedir")
            .arg(home)
            .args(["--kill", "gpg-agent"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        // The secret key travels through this buffer: wipe it on drop.
        let stdout = Protected::from(output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
        if !output.status.success() {
            if stderr.contains("No pinentry")
                || stderr.contains("Operation cancelled")
                || stderr.contains("No passphrase")
                || stderr.contains("Bad passphrase")
            {
                return Err(SignError::ExportNeedsPassphrase {
                    origin,
                    spec: key_spec.to_string(),
                    stderr,
                });
            }
            return Err(SignError::GpgFailed {
                spec: key_spec.to_string(),
                status: output.status.to_string(),
                stderr,
            });
        }
        if stdout.iter().all(u8::is_ascii_whitespace) {
            return Err(SignError::KeyNotFound {
                origin,
                spec: key_spec.to_string(),
            });
        }
        Signer::from_tsk_bytes(&stdout, spec, &origin)
    }

    /// Loads the signing key from a file holding one or more secret keys
    /// (transferable secret keys, armoured or binary).
    ///
    /// `key_spec` selects among several certificates (same forms as
    /// [`Signer::from_gnupg_home`]); `None` requires the file to hold
    /// exactly one certificate.
    pub fn from_key_file(path: &Path, key_spec: Option<&str>) -> Result<Signer, SignError> {
        let bytes =
            Protected::from(
                std::fs::read(path).map_err(|source| SignError::ReadKeyFile {
                    path: path.display().to_string(),
                    source,
                })?,
            );
        Signer::from_tsk_bytes(&bytes, key_spec, &format!("key file {}", path.display()))
    }

    /// Loads the signing key from secret key bytes (armoured or binary);
    /// `origin` names the source in errors.
    pub fn from_tsk_bytes(
        bytes: &[u8],
        key_spec: Option<&str>,
        origin: &str,
    ) -> Result<Signer, SignError> {
        let parse_err = |e: anyhow::Error| SignError::Parse {
            origin: origin.to_string(),
            reason: e.to_string(),
        };
        let certs = CertParser::from_bytes(bytes)
            .map_err(parse_err)?
            .collect::<Result<Vec<Cert>, _>>()
            .map_err(parse_err)?;
        if certs.is_empty() {
            return Err(SignError::Parse {
                origin: origin.to_string(),
                reason: "no certificate found".into(),
            });
        }
        select_key(&certs, key_spec, origin, SystemTime::now())
    }

    /// Fingerprint (hex, upper case) of the key that signs, for logs.
    pub fn fingerprint(&self) -> String {
        self.key_fingerprint.clone()
    }

    /// Fingerprint of the certificate the signing key belongs to.
    pub fn cert_fingerprint(&self) -> String {
        self.cert_fingerprint.clone()
    }

    /// An ASCII-armoured detached signature over exactly `data` (SHA-256).
    pub fn sign_detached(&self, data: &[u8]) -> Result<DetachedSignature, SignError> {
        // `crypto::Signer::sign` wants `&mut`; a clone of the key pair is a
        // copy of a few hundred bytes, far cheaper than the RSA operation,
        // and keeps `Signer` lock-free across workers.
        let mut keypair = self.keypair.clone();
        let sig = sign_binary(&mut keypair, data).map_err(|e| SignError::Sign(e.to_string()))?;
        armor_signature(sig)
    }
}

impl DetachedSigner for Signer {
    fn sign_detached(&self, data: &[u8]) -> Result<DetachedSignature, SignError> {
        Signer::sign_detached(self, data)
    }
}

/// The signing step proper: one binary (type 0x00) signature over `data`
/// with SHA-256. Kept apart so a faster `crypto::Signer` can be plugged in.
fn sign_binary(
    signer: &mut dyn openpgp::crypto::Signer,
    data: &[u8],
) -> openpgp::Result<Signature> {
    SignatureBuilder::new(SignatureType::Binary)
        .set_hash_algo(HASH)
        .sign_message(signer, data)
}

/// Armours one signature packet the way gpg does (with CRC line, LF).
fn armor_signature(sig: Signature) -> Result<DetachedSignature, SignError> {
    let fail = |e: &dyn fmt::Display| SignError::Sign(format!("armouring: {e}"));
    let mut w =
        openpgp::armor::Writer::new(Vec::with_capacity(1024), openpgp::armor::Kind::Signature)
            .map_err(|e| fail(&e))?;
    Packet::from(sig).serialize(&mut w).map_err(|e| fail(&e))?;
    w.flush().map_err(|e| fail(&e))?;
    let bytes = w.finalize().map_err(|e| fail(&e))?;
    let armored = String::from_utf8(bytes).map_err(|e| fail(&e))?;
    Ok(DetachedSignature {
        armored,
        micalg: MICALG,
    })
}

/// A parsed `key_spec`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum KeySpec {
    /// Key id or fingerprint (upper-case hex, without `0x`); `exact` for
    /// a trailing `!`.
    Hex {
        hex: String,
        exact: bool,
    },
    ExactUid(String),
    ExactEmail(String),
    EmailPart(String),
    Substring(String),
}

impl KeySpec {
    fn parse(spec: &str) -> KeySpec {
        let s = spec.trim();
        let (body, exact) = match s.strip_suffix('!') {
            Some(b) => (b, true),
            None => (s, false),
        };
        let hex = body
            .strip_prefix("0x")
            .or_else(|| body.strip_prefix("0X"))
            .unwrap_or(body);
        let hex_nospace: String = hex.chars().filter(|c| *c != ' ').collect();
        if matches!(hex_nospace.len(), 8 | 16 | 40 | 64)
            && hex_nospace.chars().all(|c| c.is_ascii_hexdigit())
        {
            return KeySpec::Hex {
                hex: hex_nospace.to_ascii_uppercase(),
                exact,
            };
        }
        if let Some(u) = s.strip_prefix('=') {
            KeySpec::ExactUid(u.to_string())
        } else if let Some(e) = s.strip_prefix('<') {
            KeySpec::ExactEmail(e.trim_end_matches('>').to_lowercase())
        } else if let Some(e) = s.strip_prefix('@') {
            KeySpec::EmailPart(e.to_lowercase())
        } else {
            KeySpec::Substring(s.to_lowercase())
        }
    }

    /// Whether a key with this fingerprint / key id matches a `Hex` spec.
    fn matches_key(hex: &str, fingerprint: &str, keyid: &str) -> bool {
        match hex.len() {
            8 => keyid.ends_with(hex),
            16 => keyid == hex,
            _ => fingerprint == hex,
        }
    }

    fn matches_cert(&self, cert: &Cert) -> bool {
        match self {
            KeySpec::Hex { hex, .. } => cert.keys().any(|ka| {
                KeySpec::matches_key(
                    hex,
                    &ka.key().fingerprint().to_hex(),
                    &ka.key().keyid().to_hex(),
                )
            }),
            _ => cert.userids().any(|ua| {
                let uid = ua.userid();
                let value = String::from_utf8_lossy(uid.value());
                let email = uid.email().ok().flatten().map(|e| e.to_lowercase());
                match self {
                    KeySpec::ExactUid(u) => value == u.as_str(),
                    KeySpec::ExactEmail(e) => email.as_deref() == Some(e.as_str()),
                    KeySpec::EmailPart(e) => email.is_some_and(|m| m.contains(e.as_str())),
                    KeySpec::Substring(s) => value.to_lowercase().contains(s.as_str()),
                    KeySpec::Hex { .. } => unreachable!(),
                }
            }),
        }
    }
}

/// What is wrong with a key's secret material, if anything.
enum SecretState {
    Usable,
    Missing,
    Protected,
}

fn secret_state<P: openpgp::packet::key::KeyParts, R: openpgp::packet::key::KeyRole>(
    key: &openpgp::packet::Key<P, R>,
) -> SecretState {
    match key.optional_secret() {
        None => SecretState::Missing,
        Some(SecretKeyMaterial::Unencrypted(_)) => SecretState::Usable,
        Some(SecretKeyMaterial::Encrypted(e)) => match e.s2k() {
            // GnuPG's "gnu-dummy" / divert-to-card stubs use private S2K
            // 101: there is no secret here at all.
            S2K::Private { .. } | S2K::Unknown { .. } => SecretState::Missing,
            _ => SecretState::Protected,
        },
    }
}

/// Picks the certificate and signing key `key_spec` names (see module doc).
fn select_key(
    certs: &[Cert],
    key_spec: Option<&str>,
    origin: &str,
    now: SystemTime,
) -> Result<Signer, SignError> {
    let origin_s = origin.to_string();
    let spec = key_spec.map(KeySpec::parse);
    let matching: Vec<&Cert> = certs
        .iter()
        .filter(|c| spec.as_ref().is_none_or(|s| s.matches_cert(c)))
        .collect();
    let cert = match matching.as_slice() {
        [] => {
            return Err(SignError::KeyNotFound {
                origin: origin_s,
                spec: key_spec.unwrap_or("").to_string(),
            })
        }
        [one] => *one,
        many => {
            return Err(SignError::Ambiguous {
                origin: origin_s,
                spec: key_spec.unwrap_or("(none given)").to_string(),
                fingerprints: many
                    .iter()
                    .map(|c| c.fingerprint().to_hex())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
        }
    };
    let cert_fpr = cert.fingerprint().to_hex();
    let policy = StandardPolicy::new();
    let vc = cert
        .with_policy(&policy, now)
        .map_err(|e| SignError::Invalid {
            origin: origin_s.clone(),
            fingerprint: cert_fpr.clone(),
            reason: e.to_string(),
        })?;
    if let RevocationStatus::Revoked(_) = vc.revocation_status() {
        return Err(SignError::Revoked {
            origin: origin_s,
            fingerprint: cert_fpr,
        });
    }
    if vc.alive().is_err() {
        return Err(SignError::Expired {
            origin: origin_s,
            fingerprint: cert_fpr,
        });
    }

    // With `KEYID!` exactly that key must be able to sign.
    let exact: Option<String> = match &spec {
        Some(KeySpec::Hex { hex, exact: true }) => Some(hex.clone()),
        _ => None,
    };
    let mut candidates: Vec<_> = vc
        .keys()
        .filter(|ka| match &exact {
            Some(hex) => KeySpec::matches_key(
                hex,
                &ka.key().fingerprint().to_hex(),
                &ka.key().keyid().to_hex(),
            ),
            None => true,
        })
        .collect();
    let named = match &exact {
        Some(hex) => hex.clone(),
        None => cert_fpr.clone(),
    };
    let no_signing = |reason: &str| SignError::NoSigningKey {
        origin: origin_s.clone(),
        fingerprint: named.clone(),
        reason: reason.to_string(),
    };
    if candidates.is_empty() {
        return Err(no_signing("the key is not valid under the standard policy"));
    }
    candidates.retain(|ka| ka.for_signing());
    if candidates.is_empty() {
        return Err(no_signing("no signing-capable key"));
    }
    candidates.retain(|ka| !matches!(ka.revocation_status(), RevocationStatus::Revoked(_)));
    if candidates.is_empty() {
        return Err(no_signing("its signing key is revoked"));
    }
    candidates.retain(|ka| ka.alive().is_ok());
    if candidates.is_empty() {
        return Err(no_signing("its signing key is expired"));
    }
    // gpg prefers the newest usable signing key.
    candidates.sort_by_key(|ka| std::cmp::Reverse(ka.key().creation_time()));
    let with_secret: Vec<_> = candidates
        .iter()
        .filter(|ka| !matches!(secret_state(ka.key()), SecretState::Missing))
        .collect();
    let Some(chosen) = with_secret.first() else {
        return Err(SignError::NoSecret {
            origin: origin_s,
            fingerprint: candidates[0].key().fingerprint().to_hex(),
        });
    };
    let key_fpr = chosen.key().fingerprint().to_hex();
    if let SecretState::Protected = secret_state(chosen.key()) {
        return Err(SignError::PassphraseProtected {
            origin: origin_s,
            fingerprint: key_fpr,
        });
    }
    let keypair = chosen
        .key()
        .clone()
        .parts_into_secret()
        .and_then(|k| k.into_keypair())
        .map_err(|e| SignError::Invalid {
            origin: origin_s.clone(),
            fingerprint: key_fpr.clone(),
            reason: e.to_string(),
        })?;
    // Prove the key works now rather than on the first mail.
    let probe = sign_binary(&mut keypair.clone(), b"mailgend key check")
        .map_err(|e| SignError::Sign(format!("test signature with {key_fpr} failed: {e}")))?;
    probe
        .clone()
        .verify_message(keypair.public(), b"mailgend key check")
        .map_err(|e| {
            SignError::Sign(format!(
                "test signature with {key_fpr} does not verify: {e}"
            ))
        })?;
    Ok(Signer {
        keypair,
        key_fingerprint: key_fpr,
        cert_fingerprint: cert_fpr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_spec_forms() {
        assert_eq!(
            KeySpec::parse("0xc771416a383195bb"),
            KeySpec::Hex {
                hex: "C771416A383195BB".into(),
                exact: false
            }
        );
        assert_eq!(
            KeySpec::parse("B9417861749CD740F3E9B2E0C771416A383195BB!"),
            KeySpec::Hex {
                hex: "B9417861749CD740F3E9B2E0C771416A383195BB".into(),
                exact: true
            }
        );
        assert_eq!(
            KeySpec::parse("<Cert@Example.org>"),
            KeySpec::ExactEmail("cert@example.org".into())
        );
        assert_eq!(KeySpec::parse("=A B"), KeySpec::ExactUid("A B".into()));
        assert_eq!(
            KeySpec::parse("@example"),
            KeySpec::EmailPart("example".into())
        );
        assert_eq!(KeySpec::parse("CERT"), KeySpec::Substring("cert".into()));
        assert!(KeySpec::matches_key("383195BB", "X", "C771416A383195BB"));
        assert!(!KeySpec::matches_key("383195BC", "X", "C771416A383195BB"));
    }
}
