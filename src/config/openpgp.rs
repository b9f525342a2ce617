//! Section `openpgp` (intelmqcbmail's three keys) and where the signing
//! key file comes from.

use std::path::PathBuf;

use super::reader::Reader;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenPgpConfig {
    pub always_sign: bool,
    pub gnupg_home: Option<PathBuf>,
    /// Fingerprint, key id or user id, as given to gpg's `--local-user`.
    pub signing_key: Option<String>,
    /// A file with the armoured or binary secret key (alternative to
    /// `gnupg_home`): `mailgend.signing_key_file`, or the old spelling
    /// `openpgp.key_file`.
    pub key_file: Option<PathBuf>,
}

/// Reads `openpgp` and `mailgend.signing_key_file`; also returns the key
/// the key file was named under, for messages about it.
pub(super) fn read(r: &mut Reader) -> (OpenPgpConfig, &'static str) {
    r.section(
        "openpgp",
        &["gnupg_home", "always_sign", "signing_key", "key_file"],
    );
    // The key file lives in mailgend's own section: intelmqcbmail 1.4
    // exits CRITICAL when `openpgp` holds any key but its three
    // (intelmqmail/cb.py:441-446 in 1.4.0), which would break a
    // rollback. The old spelling keeps working, with a WARN.
    let (key_file_key, key_file) = match (
        r.string("mailgend.signing_key_file"),
        r.string("openpgp.key_file"),
    ) {
        (Some(new), old) => {
            if old.is_some() {
                r.warn(
                    "openpgp.key_file",
                    "ignored, mailgend.signing_key_file is set; remove it: \
                     intelmqcbmail 1.4 exits CRITICAL on any openpgp key but \
                     always_sign, gnupg_home and signing_key",
                );
            }
            ("mailgend.signing_key_file", Some(new))
        }
        (None, Some(old)) => {
            r.warn(
                "openpgp.key_file",
                "old spelling, read as mailgend.signing_key_file; move it there: \
                 intelmqcbmail 1.4 exits CRITICAL on any openpgp key but \
                 always_sign, gnupg_home and signing_key",
            );
            ("openpgp.key_file", Some(old))
        }
        (None, None) => ("mailgend.signing_key_file", None),
    };
    let openpgp = OpenPgpConfig {
        always_sign: r.bool("openpgp.always_sign", false),
        gnupg_home: r.string("openpgp.gnupg_home").map(PathBuf::from),
        signing_key: r.string("openpgp.signing_key").filter(|s| !s.is_empty()),
        key_file: key_file.map(PathBuf::from),
    };
    if openpgp.always_sign {
        match (&openpgp.key_file, &openpgp.gnupg_home) {
            (Some(k), _) => {
                if !k.is_file() {
                    r.problem(
                        key_file_key,
                        format!("{} is not a readable file", k.display()),
                    );
                }
            }
            (None, Some(h)) => {
                if !h.is_dir() {
                    r.problem(
                        "openpgp.gnupg_home",
                        format!("{} is not a directory", h.display()),
                    );
                }
                if openpgp.signing_key.is_none() {
                    r.problem(
                        "openpgp.signing_key",
                        "required with always_sign and gnupg_home",
                    );
                }
            }
            (None, None) => r.problem(
                "openpgp.always_sign",
                "signing is on but neither mailgend.signing_key_file nor \
                 openpgp.gnupg_home is set",
            ),
        }
    }
    (openpgp, key_file_key)
}
