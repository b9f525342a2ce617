//! RSA signing with the key's CRT parameters, through AWS-LC for the SHA-2
//! digests and the system OpenSSL otherwise (the pure-Rust backend's RSA is
//! several times slower; see the module doc of `signature`).
//!
//! Why two libraries: AWS-LC has the AVX-512 IFMA code for 3072- and
//! 4096-bit RSA that OpenSSL gained only in 3.2+ (Debian 12 ships 3.0), so
//! on CPUs that have it (Ice Lake and later, Zen 4 and later) an RSA-3072
//! signature costs 0.83 ms instead of 2.1 ms; without it both take the
//! same time. AWS-LC's API signs only SHA-256/384/512 digests and refuses
//! keys under 2048 bits: those (SHA-1 from a `gpg.conf`, old small keys)
//! sign through OpenSSL as before. TLS stays on the system OpenSSL.

use aws_lc_rs::digest as lc_digest;
use aws_lc_rs::rsa::{KeyPair as LcKeyPair, KeyPairComponents, PublicKeyComponents};
use aws_lc_rs::signature as lc_signature;

use super::*;

/// An RSA signing key as AWS-LC and OpenSSL want it for fast signing:
/// with the prime factors and CRT exponents, so a signature is two
/// half-size exponentiations instead of one full-size one.
pub(super) struct RsaCrtKey {
    pub(super) public: Key<PublicParts, UnspecifiedRole>,
    /// Immutable after construction; both libraries allow concurrent
    /// signing with one key (they lock their blinding state internally).
    pkey: PKey<Private>,
    /// The same key in AWS-LC, for the SHA-2 digests; `None` when AWS-LC
    /// refuses it (under 2048 bits).
    lc: Option<LcKeyPair>,
    /// Modulus length in bytes = signature length.
    size: usize,
}

/// Why an RSA key could not be turned into an [`RsaCrtKey`].
#[derive(Debug, thiserror::Error)]
pub(super) enum RsaKeyError {
    #[error("OpenSSL: {0}")]
    OpenSsl(#[from] openssl::error::ErrorStack),
    #[error("inconsistent RSA secret key: u is not p^-1 mod q")]
    InconsistentU,
    #[error("inconsistent RSA secret key: OpenSSL's key check failed")]
    CheckFailed,
}

impl RsaCrtKey {
    /// The CRT key for an RSA key pair; `None` for other algorithms.
    pub(super) fn from_keypair(keypair: &KeyPair) -> Result<Option<RsaCrtKey>, RsaKeyError> {
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
        let lc = lc_key_pair(&rsa)?;
        Ok(Some(RsaCrtKey {
            public: public.clone(),
            pkey: PKey::from_rsa(rsa)?,
            lc,
            size,
        }))
    }

    /// Whether SHA-2 signatures go through AWS-LC (the key was accepted).
    pub(super) fn uses_aws_lc(&self) -> bool {
        self.lc.is_some()
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
        if let (Some(lc), Some((algorithm, encoding))) = (&self.lc, lc_algorithm(hash_algo)) {
            let digest = lc_digest::Digest::import_less_safe(digest, algorithm)
                .map_err(|_| openpgp::Error::InvalidArgument("digest length".into()))?;
            let mut sig = vec![0u8; self.size];
            lc.sign_digest(encoding, &digest, &mut sig).map_err(|_| {
                openpgp::Error::InvalidOperation("AWS-LC could not make the RSA signature".into())
            })?;
            return Ok(mpi::Signature::RSA {
                s: mpi::MPI::new(&sig),
            });
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

/// AWS-LC's digest and PKCS#1 v1.5 encoding for an OpenPGP hash, if it has
/// them.
fn lc_algorithm(
    hash_algo: HashAlgorithm,
) -> Option<(
    &'static lc_digest::Algorithm,
    &'static lc_signature::RsaSignatureEncoding,
)> {
    match hash_algo {
        HashAlgorithm::SHA256 => Some((&lc_digest::SHA256, &lc_signature::RSA_PKCS1_SHA256)),
        HashAlgorithm::SHA384 => Some((&lc_digest::SHA384, &lc_signature::RSA_PKCS1_SHA384)),
        HashAlgorithm::SHA512 => Some((&lc_digest::SHA512, &lc_signature::RSA_PKCS1_SHA512)),
        _ => None,
    }
}

/// The checked OpenSSL key in AWS-LC, component for component (both use
/// `qInv = q^-1 mod p`). The byte copies are wiped when dropped.
fn lc_key_pair(rsa: &Rsa<Private>) -> Result<Option<LcKeyPair>, RsaKeyError> {
    let secret = |bn: Option<&BigNumRef>| -> Result<Protected, RsaKeyError> {
        bn.map(|bn| Protected::from(bn.to_vec()))
            .ok_or(RsaKeyError::CheckFailed)
    };
    let components = KeyPairComponents {
        public_key: PublicKeyComponents {
            n: rsa.n().to_vec(),
            e: rsa.e().to_vec(),
        },
        d: Protected::from(rsa.d().to_vec()),
        p: secret(rsa.p())?,
        q: secret(rsa.q())?,
        dP: secret(rsa.dmp1())?,
        dQ: secret(rsa.dmq1())?,
        qInv: secret(rsa.iqmp())?,
    };
    // Refused keys (AWS-LC takes 2048 to 8192 bits) sign through OpenSSL.
    Ok(LcKeyPair::from_components(&components).ok())
}

/// `crypto::Signer` over a shared [`RsaCrtKey`]: the trait wants `&mut`,
/// the key needs none, so this borrow is all a signature costs to set up.
pub(super) struct RsaCrtSigner<'a>(pub(super) &'a RsaCrtKey);

impl openpgp::crypto::Signer for RsaCrtSigner<'_> {
    fn public(&self) -> &Key<PublicParts, UnspecifiedRole> {
        &self.0.public
    }

    fn sign(&mut self, hash_algo: HashAlgorithm, digest: &[u8]) -> openpgp::Result<mpi::Signature> {
        self.0.sign_digest(hash_algo, digest)
    }
}

/// A secret big number: OpenSSL wipes "secure" BIGNUMs when they are freed.
pub(super) fn secret_bn(bytes: &[u8]) -> Result<BigNum, openssl::error::ErrorStack> {
    let mut bn = BigNum::new_secure()?;
    bn.copy_from_slice(bytes)?;
    bn.set_const_time();
    Ok(bn)
}

/// `d mod (f - 1)`: a CRT exponent.
pub(super) fn crt_exponent(
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
pub(super) fn rsa_with_crt(
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
