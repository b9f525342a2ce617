//! Finding the signing key: in a GnuPG home or a key file, by the
//! configured fingerprint or id, usable for signing.

use super::*;

/// A parsed `key_spec`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum KeySpec {
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
    pub(super) fn parse(spec: &str) -> KeySpec {
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
    pub(super) fn matches_key(hex: &str, fingerprint: &str, keyid: &str) -> bool {
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
pub(super) enum SecretState {
    Usable,
    Missing,
    Protected,
}

pub(super) fn secret_state<P: openpgp::packet::key::KeyParts, R: openpgp::packet::key::KeyRole>(
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
pub(super) fn select_key(
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
