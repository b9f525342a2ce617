//! PGP/MIME signatures checked by the real gpg (spec §7).
//!
//! The test key `tests/fixtures/keys/test-signing.sec.asc` (RSA-3072, no
//! passphrase, fingerprint B9417861749CD740F3E9B2E0C771416A383195BB) signs
//! mails built by `mail::build`; the first MIME part and the signature are
//! cut out of the mail bytes and handed to `gpg --verify` in a fresh
//! GNUPGHOME that only knows the public key. Key loading is tested through
//! a GnuPG home (one `gpg --export-secret-keys`) and through key files,
//! including the refusals (passphrase, expired, revoked, no secret, ...).
//! RSA keys sign through OpenSSL with the CRT key, other algorithms through
//! sequoia's `KeyPair`; both are checked by gpg and by sequoia.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use chrono::Utc;
use mailgend::notify::mail::{build, Attachment, BuiltMail, MailContext, Notification};
use mailgend::notify::signature::{SignBackend, SignError, Signer};
use mailgend::notify::ticket::Ticket;
use sequoia_openpgp as openpgp;

use openpgp::cert::prelude::*;
use openpgp::packet::signature::SignatureBuilder;
use openpgp::parse::Parse;
use openpgp::serialize::SerializeInto;
use openpgp::types::{HashAlgorithm, KeyFlags, PublicKeyAlgorithm, SignatureType};

const FPR: &str = "B9417861749CD740F3E9B2E0C771416A383195BB";
const KEYID: &str = "C771416A383195BB";
const UID_EMAIL: &str = "mailgend-test@example.org";

fn keys_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/keys")
}

fn secret_key_file() -> PathBuf {
    keys_dir().join("test-signing.sec.asc")
}

fn public_key_file() -> PathBuf {
    keys_dir().join("test-signing.pub.asc")
}

/// A throw-away GNUPGHOME; its gpg-agent (if one was started) is stopped
/// when it goes away.
struct GpgHome {
    dir: tempfile::TempDir,
}

impl GpgHome {
    fn new() -> GpgHome {
        let dir = tempfile::Builder::new()
            .prefix("mgd-gpg")
            .tempdir()
            .unwrap();
        // gpg insists on private permissions for its home.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        }
        GpgHome { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn gpg(&self, args: &[&str]) -> Output {
        Command::new("gpg")
            .arg("--homedir")
            .arg(self.path())
            .arg("--batch")
            .args(args)
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .output()
            .expect("gpg must be installed")
    }

    fn import(&self, file: &Path) {
        let out = self.gpg(&["--import", file.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A home that only knows the public test key.
    fn verifier() -> GpgHome {
        let h = GpgHome::new();
        h.import(&public_key_file());
        h
    }

    /// `gpg --verify`: (success, status lines).
    fn verify(&self, signature: &[u8], data: &[u8]) -> (bool, String) {
        let sig = self.path().join("sig.asc");
        let dat = self.path().join("data");
        std::fs::write(&sig, signature).unwrap();
        std::fs::write(&dat, data).unwrap();
        let out = self.gpg(&[
            "--status-fd",
            "1",
            "--verify",
            sig.to_str().unwrap(),
            dat.to_str().unwrap(),
        ]);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }
}

impl Drop for GpgHome {
    fn drop(&mut self) {
        let _ = Command::new("gpgconf")
            .arg("--homedir")
            .arg(self.path())
            .args(["--kill", "gpg-agent"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The fields of the `VALIDSIG` status line after the keyword.
fn validsig(status: &str) -> Vec<String> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("[GNUPG:] VALIDSIG "))
        .unwrap_or_else(|| panic!("no VALIDSIG in:\n{status}"))
        .split(' ')
        .map(str::to_string)
        .collect()
}

fn assert_good(status: &str) {
    assert!(
        status.contains(&format!("[GNUPG:] GOODSIG {KEYID}")),
        "{status}"
    );
    let v = validsig(status);
    assert_eq!(v[0], FPR, "signing key");
    // The fixture is RSA-3072 and no gpg.conf is involved: gpg 2.2 signs
    // with SHA-512 (10), so ours must too.
    assert_eq!(v[7], "10", "hash algorithm must be 10 (SHA-512)");
    assert_eq!(v[8], "00", "signature class must be binary");
    assert_eq!(v[9], FPR, "primary key");
}

fn notification(attachments: Vec<Attachment>) -> Notification {
    Notification {
        ticket: Ticket::from_stored("20240502-10000001"),
        recipient: "abuse@isp.example.net".into(),
        envelope_to: None,
        subject: "Signed notification – Grüße".into(),
        body: "Dear Sir or Madam,\n\nFrom our data: systems in your network.\n\
               A long line: "
            .to_string()
            + &"x".repeat(200)
            + "\ntrailing space \n",
        attachments,
        extra_headers: vec![],
        mark_sent: true,
        covers: None,
    }
}

fn csv() -> Attachment {
    Attachment {
        subtype: "csv".into(),
        filename: "events.csv".into(),
        disposition_attachment: true,
        content: "\"ip\",\"comment\"\n\"192.0.2.1\",\"a\r\nb\"\n".into(),
    }
}

fn ctx() -> MailContext {
    MailContext::from_sender("CERT Example <cert@cert.example.org>").unwrap()
}

fn file_signer() -> Signer {
    Signer::from_key_file(&secret_key_file(), None).unwrap()
}

/// The first part's exact bytes and the signature part's payload of a
/// multipart/signed mail, cut out by the RFC 3156 rules.
fn split_signed(mail: &BuiltMail) -> (Vec<u8>, Vec<u8>, String) {
    let text = String::from_utf8(mail.bytes.clone()).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let unfolded = head.replace("\r\n ", " ");
    let ct = unfolded
        .split("\r\n")
        .find(|l| l.starts_with("Content-Type:"))
        .unwrap()
        .to_string();
    assert!(ct.starts_with("Content-Type: multipart/signed;"), "{ct}");
    let boundary = ct
        .split("boundary=\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap();
    let open = format!("--{boundary}\r\n");
    let mid = format!("\r\n--{boundary}\r\n");
    let close = format!("\r\n--{boundary}--\r\n");
    let rest = body.strip_prefix(&open).expect("opening delimiter");
    let (first, second) = rest.split_once(&mid).expect("second part");
    let second = second.strip_suffix(&close).expect("closing delimiter");
    let (sig_headers, sig) = second.split_once("\r\n\r\n").unwrap();
    assert_eq!(
        sig_headers,
        "Content-Type: application/pgp-signature\r\nContent-Transfer-Encoding: 8bit\r\nMIME-Version: 1.0"
    );
    (first.as_bytes().to_vec(), sig.as_bytes().to_vec(), ct)
}

#[test]
fn fixture_key_loads_from_file() {
    let s = file_signer();
    assert_eq!(s.fingerprint(), FPR);
    assert_eq!(s.cert_fingerprint(), FPR);
    // Selection by spec within a file works too.
    let s = Signer::from_key_file(&secret_key_file(), Some(&format!("<{UID_EMAIL}>"))).unwrap();
    assert_eq!(s.fingerprint(), FPR);
    assert!(format!("{s:?}").contains(FPR));
}

#[test]
fn signed_mails_verify_with_gpg() {
    let signer = file_signer();
    let verifier = GpgHome::verifier();
    for attachments in [vec![], vec![csv()], vec![csv(), csv()]] {
        let with_attachment = !attachments.is_empty();
        let mail = build(
            &notification(attachments),
            &ctx(),
            Some(&signer),
            Utc::now(),
        )
        .unwrap();
        let (first, sig, ct) = split_signed(&mail);
        assert!(
            ct.contains("protocol=\"application/pgp-signature\"")
                && ct.contains("micalg=\"pgp-sha512\""),
            "{ct}"
        );
        // Without attachment the text part itself is signed (Python 3.11's
        // layout), with one a multipart/mixed.
        let first_text = String::from_utf8(first.clone()).unwrap();
        if with_attachment {
            assert!(first_text.starts_with("Content-Type: multipart/mixed; boundary="));
        } else {
            assert!(first_text.starts_with("Content-Type: text/plain; charset=\"utf-8\"\r\n"));
        }
        let (ok, status) = verifier.verify(&sig, &first);
        assert!(ok, "gpg --verify failed:\n{status}");
        assert_good(&status);

        // One changed content byte must break it.
        let mut tampered = first.clone();
        let i = tampered.iter().position(|&b| b == b'D').unwrap();
        tampered[i] = b'd';
        let (ok, status) = verifier.verify(&sig, &tampered);
        assert!(!ok, "tampered content verified:\n{status}");
        assert!(status.contains("[GNUPG:] BADSIG"), "{status}");
        // And so must a lost CR (a relay rewriting line ends).
        let lf_only: Vec<u8> = first.iter().copied().filter(|&b| b != b'\r').collect();
        assert!(!verifier.verify(&sig, &lf_only).0);
    }
}

#[test]
fn armour_looks_like_gpgs() {
    let sig = file_signer().sign_detached(b"hello").unwrap();
    // An RSA key without gpg.conf: gpg 2.2 signs with SHA-512.
    assert_eq!(sig.micalg, "pgp-sha512");
    let a = &sig.armored;
    assert!(a.starts_with("-----BEGIN PGP SIGNATURE-----\n\n"), "{a}");
    assert!(a.ends_with("\n-----END PGP SIGNATURE-----\n"), "{a}");
    assert!(!a.contains('\r'));
    let lines: Vec<&str> = a.lines().collect();
    assert!(lines.iter().all(|l| l.len() <= 64));
    let crc = lines[lines.len() - 2];
    assert!(crc.starts_with('=') && crc.len() == 5, "CRC line {crc:?}");
    // Detached over exactly the data.
    let verifier = GpgHome::verifier();
    let (ok, status) = verifier.verify(a.as_bytes(), b"hello");
    assert!(ok, "{status}");
    assert_good(&status);
    assert!(!verifier.verify(a.as_bytes(), b"hello\n").0);
}

#[test]
fn loads_from_a_gnupg_home() {
    let home = GpgHome::new();
    home.import(&secret_key_file());
    let verifier = GpgHome::verifier();
    for spec in [
        // Empty: the home's only secret key.
        String::new(),
        FPR.to_string(),
        format!("0x{KEYID}"),
        KEYID[8..].to_string(),
        format!("{FPR}!"),
        format!("<{UID_EMAIL}>"),
        "mailgend test signing".to_string(),
    ] {
        let s =
            Signer::from_gnupg_home(home.path(), &spec).unwrap_or_else(|e| panic!("{spec}: {e}"));
        assert_eq!(s.fingerprint(), FPR, "{spec}");
        let sig = s.sign_detached(b"data").unwrap();
        let (ok, status) = verifier.verify(sig.armored.as_bytes(), b"data");
        assert!(ok, "{spec}: {status}");
        assert_good(&status);
    }
    match Signer::from_gnupg_home(home.path(), "no-such-key@example.org") {
        Err(SignError::KeyNotFound { .. }) => {}
        other => panic!("expected KeyNotFound, got {other:?}"),
    }
    let missing = home.path().join("does-not-exist");
    assert!(Signer::from_gnupg_home(&missing, FPR).is_err());
}

#[test]
fn gnupg_home_with_a_protected_key_is_refused() {
    let home = GpgHome::new();
    let out = home.gpg(&[
        "--pinentry-mode",
        "loopback",
        "--passphrase",
        "secret",
        "--quick-gen-key",
        "Protected <protected@example.org>",
        "ed25519",
        "sign",
        "never",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    match Signer::from_gnupg_home(home.path(), "protected@example.org") {
        Err(e @ SignError::ExportNeedsPassphrase { .. })
        | Err(e @ SignError::PassphraseProtected { .. }) => {
            assert!(e.to_string().contains("passphrase"), "{e}");
        }
        other => panic!("expected a passphrase error, got {other:?}"),
    }
}

fn tsk(cert: &Cert) -> Vec<u8> {
    cert.as_tsk().armored().to_vec().unwrap()
}

fn load(bytes: &[u8], spec: Option<&str>) -> Result<Signer, SignError> {
    Signer::from_tsk_bytes(bytes, spec, "test key")
}

#[test]
fn key_files_that_cannot_sign_are_refused() {
    let (protected, _) = CertBuilder::general_purpose(Some("p@example.org"))
        .set_password(Some("pw".into()))
        .generate()
        .unwrap();
    assert!(matches!(
        load(&tsk(&protected), None),
        Err(SignError::PassphraseProtected { .. })
    ));

    let two_days_ago = SystemTime::now() - Duration::from_secs(2 * 86400);
    let (expired, _) = CertBuilder::general_purpose(Some("e@example.org"))
        .set_creation_time(two_days_ago)
        .set_validity_period(Duration::from_secs(86400))
        .generate()
        .unwrap();
    assert!(matches!(
        load(&tsk(&expired), None),
        Err(SignError::Expired { .. })
    ));

    let (revoked, rev) = CertBuilder::general_purpose(Some("r@example.org"))
        .generate()
        .unwrap();
    let (revoked, _) = revoked.insert_packets(rev).unwrap();
    assert!(matches!(
        load(&tsk(&revoked), None),
        Err(SignError::Revoked { .. })
    ));

    let (public_only, _) = CertBuilder::general_purpose(Some("pub@example.org"))
        .generate()
        .unwrap();
    let public_bytes = public_only.armored().to_vec().unwrap();
    assert!(matches!(
        load(&public_bytes, None),
        Err(SignError::NoSecret { .. })
    ));

    let (cert_only, _) = CertBuilder::new()
        .add_userid("c@example.org")
        .set_primary_key_flags(KeyFlags::empty().set_certification())
        .generate()
        .unwrap();
    assert!(matches!(
        load(&tsk(&cert_only), None),
        Err(SignError::NoSigningKey { .. })
    ));

    assert!(matches!(
        load(b"not a key", None),
        Err(SignError::Parse { .. })
    ));
    assert!(matches!(
        Signer::from_key_file(Path::new("/nonexistent/key.asc"), None),
        Err(SignError::ReadKeyFile { .. })
    ));
}

#[test]
fn key_spec_selects_among_several_certificates() {
    let (a, _) = CertBuilder::general_purpose(Some("Alice <alice@example.org>"))
        .generate()
        .unwrap();
    let (b, _) = CertBuilder::general_purpose(Some("Bob <bob@example.org>"))
        .generate()
        .unwrap();
    let mut both = tsk(&a);
    both.extend(tsk(&b));
    assert!(matches!(
        load(&both, None),
        Err(SignError::Ambiguous { .. })
    ));
    assert!(matches!(
        load(&both, Some("example.org")),
        Err(SignError::Ambiguous { .. })
    ));
    assert!(matches!(
        load(&both, Some("carol")),
        Err(SignError::KeyNotFound { .. })
    ));
    let s = load(&both, Some("<bob@example.org>")).unwrap();
    assert_eq!(s.cert_fingerprint(), b.fingerprint().to_hex());
    // general_purpose has a signing subkey: it signs, not the primary.
    let signing = b
        .keys()
        .subkeys()
        .find(|k| k.key().fingerprint().to_hex() == s.fingerprint());
    assert!(signing.is_some(), "the signing subkey was not chosen");
    let s = load(&both, Some(&a.fingerprint().to_hex())).unwrap();
    assert_eq!(s.cert_fingerprint(), a.fingerprint().to_hex());
    // `KEYID!` names exactly the primary, which general_purpose gives no
    // signing capability.
    assert!(matches!(
        load(&both, Some(&format!("{}!", a.fingerprint().to_hex()))),
        Err(SignError::NoSigningKey { .. })
    ));
}

#[test]
fn one_signer_serves_many_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Signer>();
    let signer = Arc::new(file_signer());
    let cert = Cert::from_file(public_key_file()).unwrap();
    let key = cert.primary_key().key().clone();
    let handles: Vec<_> = (0..4)
        .map(|t| {
            let signer = Arc::clone(&signer);
            std::thread::spawn(move || {
                (0..5)
                    .map(|i| {
                        let data = format!("thread {t} mail {i}").into_bytes();
                        let sig = signer.sign_detached(&data).unwrap();
                        (data, sig.armored)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut n = 0;
    for h in handles {
        for (data, armored) in h.join().unwrap() {
            let pile = openpgp::PacketPile::from_bytes(armored.as_bytes()).unwrap();
            let Some(openpgp::Packet::Signature(sig)) = pile.children().next() else {
                panic!("no signature packet");
            };
            sig.clone().verify_message(&key, &data).unwrap();
            assert!(sig.clone().verify_message(&key, b"other").is_err());
            n += 1;
        }
    }
    assert_eq!(n, 20);
}

#[test]
#[ignore = "timing only: cargo test --release --test signature -- --ignored --nocapture"]
fn signing_rate() {
    let signer = file_signer();
    let data = vec![b'x'; 4000];
    let start = std::time::Instant::now();
    let n = 200;
    for _ in 0..n {
        signer.sign_detached(&data).unwrap();
    }
    let per_sec = f64::from(n) / start.elapsed().as_secs_f64();
    println!("{per_sec:.0} signatures/s on one thread");
}

/// The one signature packet of an armoured detached signature.
fn parse_signature(armored: &str) -> openpgp::packet::Signature {
    let pile = openpgp::PacketPile::from_bytes(armored.as_bytes()).unwrap();
    let packets: Vec<_> = pile.children().collect();
    assert_eq!(packets.len(), 1, "exactly one packet");
    let openpgp::Packet::Signature(sig) = packets[0] else {
        panic!("not a signature packet: {:?}", packets[0]);
    };
    sig.clone()
}

/// A ~6 KB mail-like message.
fn big_message() -> Vec<u8> {
    let mut m = Vec::new();
    for i in 0..100 {
        m.extend_from_slice(
            format!("\"192.0.2.{i}\",\"2024-05-02T10:00:00+00:00\",\"open resolver\"\r\n")
                .as_bytes(),
        );
    }
    assert!(m.len() > 5000);
    m
}

/// Sorted tags of a signature's hashed subpackets.
fn hashed_tags(sig: &openpgp::packet::Signature) -> Vec<String> {
    let mut tags: Vec<String> = sig
        .hashed_area()
        .iter()
        .map(|sp| format!("{:?}", sp.tag()))
        .collect();
    tags.sort();
    tags
}

#[test]
fn rsa_keys_sign_through_the_aws_lc_crt_backend() {
    let signer = file_signer();
    assert_eq!(signer.backend(), SignBackend::AwsLcRsaCrt);
    assert_eq!(signer.backend().name(), "aws-lc-rsa-crt");
    assert!(format!("{signer:?}").contains("AwsLcRsaCrt"));
    let data = big_message();
    let sig = signer.sign_detached(&data).unwrap();
    assert_eq!(sig.micalg, "pgp-sha512");

    // gpg: good signature, RSA (1), SHA-512 (10), v4, binary.
    let verifier = GpgHome::verifier();
    let (ok, status) = verifier.verify(sig.armored.as_bytes(), &data);
    assert!(ok, "gpg --verify failed:\n{status}");
    assert_good(&status);
    let v = validsig(&status);
    assert_eq!(v[4], "4", "signature version");
    assert_eq!(v[6], "1", "public key algorithm RSA");
    assert_eq!(v[7], "10", "SHA-512");
    let mut tampered = data.clone();
    tampered[1000] ^= 0x01;
    let (ok, status) = verifier.verify(sig.armored.as_bytes(), &tampered);
    assert!(!ok, "tampered message verified:\n{status}");
    assert!(status.contains("[GNUPG:] BADSIG"), "{status}");

    // sequoia: verifies over the data, not over anything else.
    let packet = parse_signature(&sig.armored);
    let cert = Cert::from_file(public_key_file()).unwrap();
    let key = cert.primary_key().key().clone();
    packet.clone().verify_message(&key, &data).unwrap();
    assert!(packet.clone().verify_message(&key, &tampered).is_err());
    assert_eq!(packet.version(), 4);
    assert_eq!(packet.hash_algo(), HashAlgorithm::SHA512);
    assert_eq!(packet.pk_algo(), PublicKeyAlgorithm::RSAEncryptSign);
    assert_eq!(packet.typ(), SignatureType::Binary);
    // A signature is unpredictable (salt notation): two differ.
    let again = signer.sign_detached(&data).unwrap();
    assert_ne!(again.armored, sig.armored);

    // The same packet layout as stock sequoia signing with a KeyPair.
    let tsk = Cert::from_file(secret_key_file()).unwrap();
    let mut keypair = tsk
        .primary_key()
        .key()
        .clone()
        .parts_into_secret()
        .unwrap()
        .into_keypair()
        .unwrap();
    let stock = SignatureBuilder::new(SignatureType::Binary)
        .set_hash_algo(HashAlgorithm::SHA512)
        .sign_message(&mut keypair, &data)
        .unwrap();
    assert_eq!(hashed_tags(&packet), hashed_tags(&stock));
    assert!(hashed_tags(&packet).contains(&"IssuerFingerprint".to_string()));
    assert!(hashed_tags(&packet).contains(&"NotationData".to_string()));
    assert_eq!(
        packet.unhashed_area().iter().count(),
        stock.unhashed_area().iter().count()
    );
}

#[test]
fn rsa_keys_made_by_sequoia_use_the_crt_backend_too() {
    // Another RSA key, another implementation's p, q, u: checks that the
    // CRT conversion is not tuned to gpg's keys.
    let (cert, _) = CertBuilder::new()
        .add_userid("rsa@example.org")
        .set_cipher_suite(CipherSuite::RSA2k)
        .set_primary_key_flags(KeyFlags::empty().set_certification().set_signing())
        .generate()
        .unwrap();
    let signer = load(&tsk(&cert), None).unwrap();
    assert_eq!(signer.backend(), SignBackend::AwsLcRsaCrt);
    let data = big_message();
    let sig = parse_signature(&signer.sign_detached(&data).unwrap().armored);
    let key = cert.primary_key().key().clone();
    sig.clone().verify_message(&key, &data).unwrap();
    assert!(sig.verify_message(&key, b"other").is_err());
}

#[test]
fn non_rsa_keys_sign_through_sequoia() {
    for (suite, gpg_algo) in [(CipherSuite::Cv25519, "22"), (CipherSuite::P256, "19")] {
        let (cert, _) = CertBuilder::new()
            .add_userid("Non RSA <nonrsa@example.org>")
            .set_cipher_suite(suite)
            .set_primary_key_flags(KeyFlags::empty().set_certification().set_signing())
            .generate()
            .unwrap();
        let signer = load(&tsk(&cert), None).unwrap();
        assert_eq!(signer.backend(), SignBackend::SequoiaKeyPair, "{suite:?}");
        let data = big_message();
        let sig = signer.sign_detached(&data).unwrap();
        assert_eq!(sig.micalg, "pgp-sha256");

        let verifier = GpgHome::new();
        let public = verifier.path().join("pub.asc");
        std::fs::write(&public, cert.armored().to_vec().unwrap()).unwrap();
        verifier.import(&public);
        let (ok, status) = verifier.verify(sig.armored.as_bytes(), &data);
        assert!(ok, "{suite:?}: gpg --verify failed:\n{status}");
        let fpr = cert.fingerprint().to_hex();
        assert!(
            status.contains(&format!("[GNUPG:] GOODSIG {}", cert.keyid().to_hex())),
            "{status}"
        );
        let v = validsig(&status);
        assert_eq!(v[0], fpr);
        assert_eq!(v[6], gpg_algo, "{suite:?}: public key algorithm");
        assert_eq!(v[7], "8", "{suite:?}: SHA-256");
        let mut tampered = data.clone();
        tampered[0] ^= 0x20;
        let (ok, status) = verifier.verify(sig.armored.as_bytes(), &tampered);
        assert!(!ok && status.contains("[GNUPG:] BADSIG"), "{status}");

        let packet = parse_signature(&sig.armored);
        let key = cert.primary_key().key().clone();
        packet.clone().verify_message(&key, &data).unwrap();
        assert!(packet.verify_message(&key, &tampered).is_err());
    }
}

/// One GnuPG home holding a key of each kind gpg 2.2 makes, without
/// passphrase; the e-mail addresses name the kind.
fn home_with_key_kinds(kinds: &[&str]) -> GpgHome {
    let home = GpgHome::new();
    for kind in kinds {
        let out = home.gpg(&[
            "--pinentry-mode",
            "loopback",
            "--passphrase",
            "",
            "--quick-gen-key",
            &format!("Kind {kind} <{kind}@example.org>"),
            kind,
            "sign",
            "never",
        ]);
        assert!(
            out.status.success(),
            "gpg --quick-gen-key {kind}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    home
}

/// The armour header lines (`Key: value`) of an armoured block.
fn armour_headers(armored: &str) -> Vec<String> {
    armored
        .lines()
        .skip(1)
        .take_while(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// The digest and the armour lines are what the installed gpg makes with
/// the same key and the same gpg.conf (gpg is asked each time; nothing is
/// written down from a reading of its source). intelmq-mailgen signs
/// through gpgme with that gpg (intelmqmail/mail.py `detached_signature`),
/// so this is what its mails carried.
#[test]
fn digest_and_armour_headers_as_gpg_makes_them() {
    let kinds = ["rsa3072", "ed25519", "nistp256", "nistp521", "dsa2048"];
    let home = home_with_key_kinds(&kinds);
    let confs = [
        "",
        "personal-digest-preferences SHA256\n",
        "personal-digest-preferences SHA384 SHA512 SHA256\n",
        "personal-digest-preferences sha1,sha256\n",
        "# the recommendation of intelmq-mailgen's README\npersonal-digest-preferences SHA256\ndigest-algo SHA512\n",
        "comment first line\n  comment \"two  words\"  \nemit-version\n",
        "comment gone\nno-comments\ncomment kept\nemit-version\nemit-version\nemit-version\n",
    ];
    let data = b"--boundary\r\nContent-Type: text/plain\r\n\r\nDaten\r\n";
    let file = home.path().join("data");
    std::fs::write(&file, data).unwrap();
    let mut compared = 0;
    for conf in confs {
        std::fs::write(home.path().join("gpg.conf"), conf).unwrap();
        for kind in kinds {
            let spec = format!("<{kind}@example.org>");
            let out = home.gpg(&[
                "--armor",
                "--local-user",
                &spec,
                "--detach-sign",
                "--output",
                "-",
                file.to_str().unwrap(),
            ]);
            assert!(
                out.status.success(),
                "gpg {kind} with {conf:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let theirs = String::from_utf8(out.stdout).unwrap();
            let signer = Signer::from_gnupg_home(home.path(), &spec)
                .unwrap_or_else(|e| panic!("{kind} with {conf:?}: {e}"));
            let ours = signer.sign_detached(data).unwrap();
            let (their_hash, our_hash) = (
                parse_signature(&theirs).hash_algo(),
                parse_signature(&ours.armored).hash_algo(),
            );
            assert_eq!(our_hash, their_hash, "digest for {kind} with {conf:?}");
            assert_eq!(
                ours.micalg,
                format!(
                    "pgp-{}",
                    their_hash.to_string().to_lowercase().replace('-', "")
                ),
                "micalg for {kind} with {conf:?}"
            );
            assert_eq!(
                armour_headers(&ours.armored),
                armour_headers(&theirs),
                "armour lines for {kind} with {conf:?}"
            );
            // And gpg accepts ours.
            let (ok, status) = home.verify(ours.armored.as_bytes(), data);
            assert!(ok, "{kind} with {conf:?}: {status}");
            compared += 1;
        }
    }
    assert_eq!(compared, confs.len() * kinds.len());
}

/// A gpg.conf with which gpg cannot sign, or signs with a digest that
/// intelmq-mailgen could not name in `micalg` (its mail.py knows SHA-1,
/// SHA-256, SHA-384 and SHA-512 only, and raised for the rest, so no mail
/// went out), is refused at start with file, line and reason.
#[test]
fn gpg_confs_that_sent_nothing_are_refused_at_start() {
    let home = home_with_key_kinds(&["rsa3072", "nistp256"]);
    let conf_path = home.path().join("gpg.conf");
    for (conf, kind, line, what) in [
        (
            "personal-digest-preferences SHA-256\n",
            "rsa3072",
            1,
            "SHA-256",
        ),
        (
            "\npersonal-digest-preferences SHA224 SHA256\n",
            "rsa3072",
            2,
            "micalg",
        ),
        ("digest-algo RIPEMD160\n", "rsa3072", 1, "micalg"),
        ("digest-algo SHA1\n", "nistp256", 1, "shorter"),
    ] {
        std::fs::write(&conf_path, conf).unwrap();
        let err =
            Signer::from_gnupg_home(home.path(), &format!("<{kind}@example.org>")).expect_err(conf);
        let msg = err.to_string();
        assert!(
            matches!(err, SignError::GpgConf(_))
                && msg.contains(&format!("{}:{line}:", conf_path.display()))
                && msg.contains(what),
            "{conf:?}: {msg}"
        );
    }
}

/// gpg reads `gpg.conf-2.2` (its versioned option file) before `gpg.conf`.
#[test]
fn versioned_gpg_conf_wins() {
    let home = home_with_key_kinds(&["rsa3072"]);
    std::fs::write(home.path().join("gpg.conf"), "comment plain\n").unwrap();
    std::fs::write(home.path().join("gpg.conf-2.2"), "comment versioned\n").unwrap();
    let s = Signer::from_gnupg_home(home.path(), "<rsa3072@example.org>").unwrap();
    let sig = s.sign_detached(b"x").unwrap();
    assert_eq!(armour_headers(&sig.armored), ["Comment: versioned"]);
}
