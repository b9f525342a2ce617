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
//! RSA keys sign through our own OpenSSL signer (`RsaCrtKey`), built once
//! with the prime factors and CRT exponents, so an RSA-3072 signature costs
//! what `openssl speed rsa3072` says and the key object is not rebuilt per
//! mail; sequoia's own backends either rebuild the key from `n`, `e` and
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
    /// RSA keys: OpenSSL with the full CRT private key, built once.
    OpensslRsaCrt,
    /// Every other algorithm: sequoia's `KeyPair`.
    SequoiaKeyPair,
}

impl SignBackend {
    /// Short name for logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
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
    /// Shared, immutable: OpenSSL's RSA signing takes a shared key.
    Rsa(Arc<RsaCrtKey>),
    Generic(Arc<KeyPair>),
}

impl SigningKey {
    fn backend(&self) -> SignBackend {
        match self {
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

/// An RSA signing key as OpenSSL wants it for fast signing: with the prime
/// factors and CRT exponents, so a signature is two half-size
/// exponentiations instead of one full-size one.
struct RsaCrtKey {
    public: Key<PublicParts, UnspecifiedRole>,
    /// Immutable after construction; OpenSSL allows concurrent signing
    /// with one key (it locks its blinding state internally).
    pkey: PKey<Private>,
    /// Modulus length in bytes = signature length.
    size: usize,
}

/// Why an RSA key could not be turned into an [`RsaCrtKey`].
#[derive(Debug, thiserror::Error)]
enum RsaKeyError {
    #[error("OpenSSL: {0}")]
    OpenSsl(#[from] openssl::error::ErrorStack),
    #[error("inconsistent RSA secret key: u is not p^-1 mod q")]
    InconsistentU,
    #[error("inconsistent RSA secret key: OpenSSL's key check failed")]
    CheckFailed,
}

impl RsaCrtKey {
    /// The CRT key for an RSA key pair; `None` for other algorithms.
    fn from_keypair(keypair: &KeyPair) -> Result<Option<RsaCrtKey>, RsaKeyError> {
        let public = keypair.public();
        #[allow(deprecated)] // RSASign is deprecated for new keys, but valid.
        let is_rsa = matches!(
            public.pk_algo(),
            PublicKeyAlgorithm::RSAEncryptSign | PublicKeyAlgorithm::RSASign
        );
        let (true, mpi::PublicKey::RSA { e, n }) = (is_rsa, public.mpis()) else {
            return Ok(None);
        };
        let rsa = keypair.secret().map(|secret| match secret {
            mpi::SecretKeyMaterial::RSA { d, p, q, u } => rsa_with_crt(
                n.value(),
                e.value(),
                d.value(),
                p.value(),
                q.value(),
                u.value(),
            )
            .map(Some),
            _ => Ok(None),
        })?;
        let Some(rsa) = rsa else { return Ok(None) };
        let size = rsa.size() as usize;
        Ok(Some(RsaCrtKey {
            public: public.clone(),
            pkey: PKey::from_rsa(rsa)?,
            size,
        }))
    }

    /// PKCS#1 v1.5 signature over `digest` made with `hash_algo`, as
    /// OpenPGP defines it for RSA (RFC 9580 §5.2.3.1): the digest behind
    /// its DER DigestInfo prefix, padded with EMSA-PKCS1-v1_5.
    fn sign_digest(
        &self,
        hash_algo: HashAlgorithm,
        digest: &[u8],
    ) -> openpgp::Result<mpi::Signature> {
        if digest.len() != hash_algo.digest_size()? {
            return Err(openpgp::Error::InvalidArgument(format!(
                "a {hash_algo} digest has {} bytes, got {}",
                hash_algo.digest_size()?,
                digest.len()
            ))
            .into());
        }
        // sequoia's prefix table covers every hash OpenPGP allows, so no
        // mapping to OpenSSL digest objects is needed: OpenSSL only pads.
        let prefix = hash_algo.oid()?;
        let mut digest_info = Vec::with_capacity(prefix.len() + digest.len());
        digest_info.extend_from_slice(prefix);
        digest_info.extend_from_slice(digest);
        // A context per signature: creating one is microseconds against
        // milliseconds for the exponentiation, and it keeps signing `&self`.
        let mut ctx = PkeyCtx::new(&self.pkey)?;
        ctx.sign_init()?;
        ctx.set_rsa_padding(Padding::PKCS1)?;
        let mut sig = vec![0u8; self.size];
        let len = ctx.sign(&digest_info, Some(&mut sig))?;
        Ok(mpi::Signature::RSA {
            s: mpi::MPI::new(&sig[..len]),
        })
    }
}

/// `crypto::Signer` over a shared [`RsaCrtKey`]: the trait wants `&mut`,
/// the key needs none, so this borrow is all a signature costs to set up.
struct RsaCrtSigner<'a>(&'a RsaCrtKey);

impl openpgp::crypto::Signer for RsaCrtSigner<'_> {
    fn public(&self) -> &Key<PublicParts, UnspecifiedRole> {
        &self.0.public
    }

    fn sign(&mut self, hash_algo: HashAlgorithm, digest: &[u8]) -> openpgp::Result<mpi::Signature> {
        self.0.sign_digest(hash_algo, digest)
    }
}

/// A secret big number: OpenSSL wipes "secure" BIGNUMs when they are freed.
fn secret_bn(bytes: &[u8]) -> Result<BigNum, openssl::error::ErrorStack> {
    let mut bn = BigNum::new_secure()?;
    bn.copy_from_slice(bytes)?;
    bn.set_const_time();
    Ok(bn)
}

/// `d mod (f - 1)`: a CRT exponent.
fn crt_exponent(
    d: &BigNumRef,
    factor: &BigNumRef,
    ctx: &mut BigNumContext,
) -> Result<BigNum, openssl::error::ErrorStack> {
    let mut f1 = factor.to_owned()?;
    f1.sub_word(1)?;
    let mut r = BigNum::new_secure()?;
    r.nnmod(d, &f1, ctx)?;
    f1.clear();
    Ok(r)
}

/// An OpenSSL RSA key with all CRT components from OpenPGP's `n, e, d, p,
/// q, u`.
///
/// OpenPGP stores `u = p^-1 mod q` (RFC 9580 §5.5.5.1); OpenSSL wants
/// `iqmp = q^-1 mod p` for *its* `p` and `q`. So OpenSSL gets the factors
/// swapped (its `p` is OpenPGP's `q`), which makes OpenPGP's `u` exactly
/// OpenSSL's `iqmp`. We recompute it rather than trust it, and refuse a
/// key whose `u` disagrees: gpg uses `u` too and would make bad signatures
/// with such a key.
fn rsa_with_crt(
    n: &[u8],
    e: &[u8],
    d: &[u8],
    p: &[u8],
    q: &[u8],
    u: &[u8],
) -> Result<Rsa<Private>, RsaKeyError> {
    let mut ctx = BigNumContext::new_secure()?;
    let n = BigNum::from_slice(n)?;
    let e = BigNum::from_slice(e)?;
    let d = secret_bn(d)?;
    // OpenSSL's names from here on.
    let ossl_p = secret_bn(q)?;
    let ossl_q = secret_bn(p)?;
    let u = secret_bn(u)?;
    let dmp1 = crt_exponent(&d, &ossl_p, &mut ctx)?;
    let dmq1 = crt_exponent(&d, &ossl_q, &mut ctx)?;
    let mut iqmp = BigNum::new_secure()?;
    iqmp.mod_inverse(&ossl_q, &ossl_p, &mut ctx)?;
    if iqmp.ucmp(&u) != std::cmp::Ordering::Equal {
        return Err(RsaKeyError::InconsistentU);
    }
    let rsa = Rsa::from_private_components(n, e, d, ossl_p, ossl_q, dmp1, dmq1, iqmp)?;
    // Checks n = pq, the primes, d against e and the CRT values: with a
    // wrong CRT part OpenSSL would quietly fall back to the slow path.
    if !rsa.check_key()? {
        return Err(RsaKeyError::CheckFailed);
    }
    Ok(rsa)
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
    let key = match RsaCrtKey::from_keypair(&keypair) {
        Ok(Some(rsa)) => SigningKey::Rsa(Arc::new(rsa)),
        Ok(None) => SigningKey::Generic(Arc::new(keypair)),
        Err(e) => {
            return Err(SignError::Invalid {
                origin: origin_s,
                fingerprint: key_fpr,
                reason: e.to_string(),
            })
        }
    };
    // Without a gpg.conf (a key file, or a home without one), gpg's own
    // choice for the key.
    let digest = GpgConf::default().digest_for(key.public())?;
    // Prove the key (and the backend that will use it) works now rather
    // than on the first mail.
    let probe = key
        .sign(b"mailgend key check", digest.algorithm())
        .map_err(|e| SignError::Sign(format!("test signature with {key_fpr} failed: {e:#}")))?;
    probe
        .verify_message(key.public(), b"mailgend key check")
        .map_err(|e| {
            SignError::Sign(format!(
                "test signature with {key_fpr} does not verify: {e:#}"
            ))
        })?;
    Ok(Signer {
        key,
        key_fingerprint: key_fpr,
        cert_fingerprint: cert_fpr,
        digest,
        armor_headers: Vec::new(),
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
        let mut kp = fixture_keypair();
        let rsa = RsaCrtKey::from_keypair(&kp).unwrap().expect("RSA");
        for algo in [
            HashAlgorithm::SHA256,
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
