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
//! The digest is the one GnuPG 2.2 would choose for the key under the
//! `gpg.conf` of the GnuPG home (SHA-512 for an RSA key when the file sets
//! nothing), and `gpg.conf`'s `comment`/`emit-version` lines appear in the
//! armour as gpg writes them: see [`gpgconf`]. `micalg` reports the digest
//! really used. Each signature is a v4 (for v4 keys) binary
//! signature carrying issuer, issuer fingerprint and creation time like
//! gpg's, plus sequoia's random salt notation, which makes signatures
//! unpredictable: that blunts chosen-prefix attacks for a host that signs
//! text partly chosen by outsiders (event data).
//!
//! RSA keys sign through our own signer (`RsaCrtKey`), built once with the
//! prime factors and CRT exponents, so the key object is not rebuilt per
//! mail: AWS-LC for the SHA-2 digests (its AVX-512 IFMA code makes an
//! RSA-3072 signature 2.5 times cheaper than Debian 12's OpenSSL where the
//! CPU has it), the system OpenSSL for SHA-1 and keys under 2048 bits;
//! sequoia's own backends either rebuild the key from `n`, `e` and
//! `d` for every signature (OpenSSL) or are far slower and not constant-time
//! (the pure-Rust one this build uses, chosen because it needs no libclang
//! to build). The packet around it (subpackets, salt notation,
//! hashing) is still made by sequoia's `SignatureBuilder`, so the signature
//! bytes have exactly the layout they had before. Other algorithms (EdDSA,
//! ECDSA, ...) keep using sequoia's `KeyPair`; [`Signer::backend`] tells which.
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
use std::sync::Arc;
use std::time::SystemTime;

use openssl::bn::{BigNum, BigNumContext, BigNumRef};
use openssl::pkey::{PKey, Private};
use openssl::pkey_ctx::PkeyCtx;
use openssl::rsa::{Padding, Rsa};

use sequoia_openpgp as openpgp;

use openpgp::cert::prelude::*;
use openpgp::crypto::mem::Protected;
use openpgp::crypto::mpi;
use openpgp::crypto::KeyPair;
use openpgp::crypto::S2K;
use openpgp::packet::key::{PublicParts, SecretKeyMaterial, UnspecifiedRole};
use openpgp::packet::signature::SignatureBuilder;
use openpgp::packet::Key;
use openpgp::packet::Signature;
use openpgp::parse::Parse;
use openpgp::policy::StandardPolicy;
use openpgp::serialize::Serialize as _;
use openpgp::types::{HashAlgorithm, PublicKeyAlgorithm, RevocationStatus, SignatureType};
use openpgp::Packet;

pub mod gpgconf;
mod key;
mod rsa_crt;

use key::*;
use rsa_crt::*;

pub use gpgconf::{Digest, GpgConf, GpgConfError};

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
    #[error("{0}")]
    GpgConf(#[from] GpgConfError),
}

/// Where a key came from, for error messages.
fn origin_gnupg(home: &Path) -> String {
    format!("GnuPG home {}", home.display())
}

/// Which implementation makes the signatures of a [`Signer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignBackend {
    /// RSA keys of 2048 bits and more: AWS-LC with the full CRT private
    /// key, built once (SHA-1 digests still through OpenSSL).
    AwsLcRsaCrt,
    /// Smaller RSA keys, which AWS-LC refuses: OpenSSL with the full CRT
    /// private key, built once.
    OpensslRsaCrt,
    /// Every other algorithm: sequoia's `KeyPair`.
    SequoiaKeyPair,
}

impl SignBackend {
    /// Short name for logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            SignBackend::AwsLcRsaCrt => "aws-lc-rsa-crt",
            SignBackend::OpensslRsaCrt => "openssl-rsa-crt",
            SignBackend::SequoiaKeyPair => "sequoia-keypair",
        }
    }
}

impl fmt::Display for SignBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The secret half of a [`Signer`], in the form that signs fastest.
#[derive(Clone)]
enum SigningKey {
    /// Shared, immutable: AWS-LC and OpenSSL sign with a shared key.
    Rsa(Arc<RsaCrtKey>),
    Generic(Arc<KeyPair>),
}

impl SigningKey {
    fn backend(&self) -> SignBackend {
        match self {
            SigningKey::Rsa(k) if k.uses_aws_lc() => SignBackend::AwsLcRsaCrt,
            SigningKey::Rsa(_) => SignBackend::OpensslRsaCrt,
            SigningKey::Generic(_) => SignBackend::SequoiaKeyPair,
        }
    }

    fn public(&self) -> &Key<PublicParts, UnspecifiedRole> {
        match self {
            SigningKey::Rsa(k) => &k.public,
            SigningKey::Generic(kp) => kp.public(),
        }
    }

    /// One binary signature packet over `data` with `hash`.
    fn sign(&self, data: &[u8], hash: HashAlgorithm) -> openpgp::Result<Signature> {
        match self {
            SigningKey::Rsa(key) => sign_binary(&mut RsaCrtSigner(key), data, hash),
            // `crypto::Signer::sign` wants `&mut`; a clone of the key pair
            // is a copy of a few hundred bytes, far cheaper than the
            // signature, and keeps `Signer` lock-free across workers.
            SigningKey::Generic(keypair) => sign_binary(&mut KeyPair::clone(keypair), data, hash),
        }
    }
}

/// The loaded signing key. Parsed once; cheap to share (`Arc<Signer>`)
/// across workers: signing takes `&self`.
#[derive(Clone)]
pub struct Signer {
    key: SigningKey,
    /// Fingerprint of the (sub)key that signs.
    key_fingerprint: String,
    /// Fingerprint of its certificate (the primary key).
    cert_fingerprint: String,
    /// The digest gpg would use for this key (see [`gpgconf`]).
    digest: Digest,
    /// Armour header lines (`Version:`, `Comment:`), as gpg would write.
    armor_headers: Vec<(String, String)>,
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print key material.
        f.debug_struct("Signer")
            .field("key", &self.key_fingerprint)
            .field("cert", &self.cert_fingerprint)
            .field("backend", &self.key.backend())
            .field("digest", &self.digest)
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
        // Read first: gpg refuses to run at all with some bad gpg.conf
        // lines, and our message names file and line.
        let conf = GpgConf::read(home)?;
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
        Signer::from_tsk_bytes(&stdout, spec, &origin)?.with_gpg_conf(&conf)
    }

    /// Applies the `gpg.conf` that gpg would read in `home` (digest and
    /// armour lines).
    pub fn with_gnupg_conf(self, home: &Path) -> Result<Signer, SignError> {
        self.with_gpg_conf(&GpgConf::read(home)?)
    }

    /// Applies already-read `gpg.conf` options; the lines gpg ignores are
    /// logged at WARN.
    pub fn with_gpg_conf(mut self, conf: &GpgConf) -> Result<Signer, SignError> {
        for w in &conf.warnings {
            tracing::warn!("gpg.conf: {w}");
        }
        self.digest = conf.digest_for(self.key.public())?;
        if self.digest == Digest::Sha1 {
            tracing::warn!(
                "gpg.conf makes signatures use SHA-1, as gpg would; SHA-1 is weak, \
                 prefer personal-digest-preferences SHA512"
            );
        }
        self.armor_headers = conf.armor_headers();
        Ok(self)
    }

    /// The digest signatures use.
    pub fn digest(&self) -> Digest {
        self.digest
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

    /// Which implementation signs: OpenSSL with the CRT key for RSA keys,
    /// sequoia's `KeyPair` for the rest.
    pub fn backend(&self) -> SignBackend {
        self.key.backend()
    }

    /// An ASCII-armoured detached signature over exactly `data`.
    pub fn sign_detached(&self, data: &[u8]) -> Result<DetachedSignature, SignError> {
        let sig = self
            .key
            .sign(data, self.digest.algorithm())
            .map_err(|e| SignError::Sign(format!("{e:#}")))?;
        armor_signature(sig, self.digest, &self.armor_headers)
    }
}

impl DetachedSigner for Signer {
    fn sign_detached(&self, data: &[u8]) -> Result<DetachedSignature, SignError> {
        Signer::sign_detached(self, data)
    }
}

/// The signing step proper: one binary (type 0x00) signature over `data`
/// with `hash`. Kept apart so a faster `crypto::Signer` can be plugged in.
fn sign_binary(
    signer: &mut dyn openpgp::crypto::Signer,
    data: &[u8],
    hash: HashAlgorithm,
) -> openpgp::Result<Signature> {
    SignatureBuilder::new(SignatureType::Binary)
        .set_hash_algo(hash)
        .sign_message(signer, data)
}

/// Armours one signature packet the way gpg does (header lines, CRC line,
/// LF).
fn armor_signature(
    sig: Signature,
    digest: Digest,
    headers: &[(String, String)],
) -> Result<DetachedSignature, SignError> {
    let fail = |e: &dyn fmt::Display| SignError::Sign(format!("armouring: {e}"));
    let mut w = openpgp::armor::Writer::with_headers(
        Vec::with_capacity(1024),
        openpgp::armor::Kind::Signature,
        headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
    )
    .map_err(|e| fail(&e))?;
    Packet::from(sig).serialize(&mut w).map_err(|e| fail(&e))?;
    w.flush().map_err(|e| fail(&e))?;
    let bytes = w.finalize().map_err(|e| fail(&e))?;
    let armored = String::from_utf8(bytes).map_err(|e| fail(&e))?;
    Ok(DetachedSignature {
        armored,
        micalg: digest.micalg(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use openpgp::crypto::Signer as _;

    fn fixture_keypair() -> KeyPair {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/keys/test-signing.sec.asc");
        let cert = Cert::from_file(path).unwrap();
        cert.primary_key()
            .key()
            .clone()
            .parts_into_secret()
            .unwrap()
            .into_keypair()
            .unwrap()
    }

    /// The OpenPGP RSA components of the fixture: (n, e, d, p, q, u).
    fn fixture_components(kp: &KeyPair) -> [Vec<u8>; 6] {
        let mpi::PublicKey::RSA { e, n } = kp.public().mpis() else {
            panic!("fixture is RSA")
        };
        kp.secret().map(|s| match s {
            mpi::SecretKeyMaterial::RSA { d, p, q, u } => [
                n.value().to_vec(),
                e.value().to_vec(),
                d.value().to_vec(),
                p.value().to_vec(),
                q.value().to_vec(),
                u.value().to_vec(),
            ],
            _ => panic!("fixture is RSA"),
        })
    }

    #[test]
    fn crt_components_agree_with_openpgp() {
        let kp = fixture_keypair();
        let [n, e, d, p, q, u] = fixture_components(&kp);
        let rsa = rsa_with_crt(&n, &e, &d, &p, &q, &u).unwrap();
        let mut ctx = BigNumContext::new().unwrap();
        let bn = |b: &[u8]| BigNum::from_slice(b).unwrap();
        let one = BigNum::from_u32(1).unwrap();
        let (op, oq) = (rsa.p().unwrap(), rsa.q().unwrap());
        // OpenSSL's p is OpenPGP's q and the other way round.
        assert_eq!(op.to_vec(), q);
        assert_eq!(oq.to_vec(), p);
        let mut prod = BigNum::new().unwrap();
        prod.checked_mul(op, oq, &mut ctx).unwrap();
        assert_eq!(prod.to_vec(), n);
        // iqmp * q ≡ 1 (mod p), and it is OpenPGP's u.
        let iqmp = rsa.iqmp().unwrap();
        let mut t = BigNum::new().unwrap();
        t.mod_mul(iqmp, oq, op, &mut ctx).unwrap();
        assert_eq!(t, one);
        assert_eq!(iqmp.to_vec(), u);
        // dmp1 = d mod (p-1), dmq1 = d mod (q-1).
        for (exp, f) in [(rsa.dmp1().unwrap(), op), (rsa.dmq1().unwrap(), oq)] {
            let mut f1 = f.to_owned().unwrap();
            f1.sub_word(1).unwrap();
            let mut r = BigNum::new().unwrap();
            r.nnmod(&bn(&d), &f1, &mut ctx).unwrap();
            assert_eq!(exp.to_vec(), r.to_vec());
            assert!(exp.ucmp(&f1) == std::cmp::Ordering::Less);
        }

        // A u that is not p^-1 mod q is refused.
        let mut bad_u = bn(&u);
        bad_u.add_word(1).unwrap();
        assert!(matches!(
            rsa_with_crt(&n, &e, &d, &p, &q, &bad_u.to_vec()),
            Err(RsaKeyError::InconsistentU)
        ));
        // So is a d that does not belong to e.
        let mut bad_d = bn(&d);
        bad_d.add_word(2).unwrap();
        assert!(rsa_with_crt(&n, &e, &bad_d.to_vec(), &p, &q, &u).is_err());
    }

    #[test]
    fn crt_signature_equals_sequoias() {
        // PKCS#1 v1.5 is deterministic: the CRT key must produce the very
        // integer sequoia's own backend produces, for every hash.
        // SHA-2 goes through AWS-LC, SHA-1 through OpenSSL.
        let mut kp = fixture_keypair();
        let rsa = RsaCrtKey::from_keypair(&kp).unwrap().expect("RSA");
        assert!(rsa.uses_aws_lc());
        for algo in [
            HashAlgorithm::SHA256,
            HashAlgorithm::SHA384,
            HashAlgorithm::SHA512,
            HashAlgorithm::SHA1,
        ] {
            let mut h = algo.context().unwrap().for_digest();
            h.update(b"the same digest");
            let digest = h.into_digest().unwrap();
            let ours = RsaCrtSigner(&rsa).sign(algo, &digest).unwrap();
            let theirs = kp.sign(algo, &digest).unwrap();
            assert_eq!(ours, theirs, "{algo}");
        }
        // A digest of the wrong length is an error, not a bad signature.
        assert!(RsaCrtSigner(&rsa)
            .sign(HashAlgorithm::SHA256, &[0u8; 20])
            .is_err());
    }

    #[test]
    fn keys_aws_lc_refuses_sign_through_openssl() {
        // AWS-LC takes 2048 bits and more; an old 1024-bit key must still
        // sign, through OpenSSL, and correctly.
        let rsa = Rsa::generate(1024).unwrap();
        let (p, q, d) = (rsa.p().unwrap(), rsa.q().unwrap(), rsa.d());
        let key: Key<openpgp::packet::key::SecretParts, UnspecifiedRole> =
            openpgp::packet::key::Key4::import_secret_rsa(
                &d.to_vec(),
                &p.to_vec(),
                &q.to_vec(),
                None,
            )
            .unwrap()
            .into();
        let mut kp = key.into_keypair().unwrap();
        let small = RsaCrtKey::from_keypair(&kp).unwrap().expect("RSA");
        assert!(!small.uses_aws_lc());
        for algo in [HashAlgorithm::SHA256, HashAlgorithm::SHA512] {
            let mut h = algo.context().unwrap().for_digest();
            h.update(b"a small key");
            let digest = h.into_digest().unwrap();
            let ours = RsaCrtSigner(&small).sign(algo, &digest).unwrap();
            assert_eq!(ours, kp.sign(algo, &digest).unwrap(), "{algo}");
        }
    }

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
