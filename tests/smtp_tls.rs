//! Outbound SMTP with STARTTLS, implicit TLS and AUTH, against a real SMTP
//! server (Python's aiosmtpd, installed by .ci/run) over TCP, with a
//! certificate made for the test and trusted through `smtp.ca_file`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use mailgend::shared::smtp::{Outbound, SmtpError};
use mailgend::shared::smtp::{SmtpConfig, SmtpTls};

struct Server {
    child: Child,
    port: u16,
    out: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn cert(dir: &Path) {
    let status = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args([
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ])
        .arg("-keyout")
        .arg(dir.join("key.pem"))
        .arg("-out")
        .arg(dir.join("cert.pem"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl");
    assert!(status.success());
}

fn server(mode: &str, dir: &Path) -> Server {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = tempfile::tempdir().unwrap();
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smtp/tls_auth_server.py");
    // Debian's Python: python3-aiosmtpd is a Debian package, and another
    // python3 first on PATH (pyenv) would not see it.
    let mut child = Command::new("/usr/bin/python3")
        .arg(script)
        .arg(mode)
        .arg(dir.join("cert.pem"))
        .arg(dir.join("key.pem"))
        .args(["mailer", "s3cret"])
        .arg(out.path())
        .arg(port.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("/usr/bin/python3 with aiosmtpd (apt install python3-aiosmtpd)");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "READY", "aiosmtpd did not start");
    Server { child, port, out }
}

fn config(port: u16, tls: SmtpTls, dir: &Path, password: &str) -> SmtpConfig {
    SmtpConfig {
        host: "127.0.0.1".into(),
        port,
        tls,
        ca_file: Some(dir.join("cert.pem")),
        username: Some("mailer".into()),
        password: Some(password.into()),
        timeout: Duration::from_secs(10),
    }
}

const MESSAGE: &[u8] =
    b"From: cert@example.org\r\nTo: abuse@example.net\r\nSubject: t\r\n\r\nhello\r\n";

fn received(s: &Server) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(s.out.path())
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect();
    v.sort();
    v
}

async fn send(cfg: &SmtpConfig) -> Result<(), SmtpError> {
    Outbound::new(cfg, 1)
        .unwrap()
        .send(
            "cert@example.org",
            &["abuse@example.net".to_string()],
            MESSAGE,
        )
        .await
        .map(|refused| assert!(refused.is_empty(), "{refused:?}"))
}

#[tokio::test]
async fn starttls_with_auth_and_an_own_ca() {
    let dir = tempfile::tempdir().unwrap();
    cert(dir.path());
    let s = server("starttls", dir.path());
    send(&config(s.port, SmtpTls::StartTls, dir.path(), "s3cret"))
        .await
        .expect("sent over STARTTLS with AUTH");
    let got = received(&s);
    assert_eq!(got.len(), 1);
    assert!(
        got[0].starts_with("X-Auth: True\r\nX-TLS: True\r\n"),
        "{}",
        got[0]
    );
    assert!(got[0].ends_with("hello\r\n"));

    // A wrong password is no delivery (aiosmtpd answers a failed AUTH
    // only after its client timeout, so this takes our 10 s timeout).
    let e = send(&config(s.port, SmtpTls::StartTls, dir.path(), "wrong"))
        .await
        .unwrap_err();
    assert!(!matches!(e, SmtpError::Connection(_)), "{e}");
    // Without TLS the server refuses AUTH/MAIL.
    let e = send(&config(s.port, SmtpTls::None, dir.path(), "s3cret"))
        .await
        .unwrap_err();
    assert!(!matches!(e, SmtpError::Connection(_)), "{e}");
    // A CA that did not sign the server's certificate: refused.
    let other = tempfile::tempdir().unwrap();
    cert(other.path());
    let e = send(&config(s.port, SmtpTls::StartTls, other.path(), "s3cret"))
        .await
        .unwrap_err();
    assert!(matches!(e, SmtpError::Unreachable(_)), "{e}");
    assert_eq!(received(&s).len(), 1);
}

#[tokio::test]
async fn implicit_tls_with_auth() {
    let dir = tempfile::tempdir().unwrap();
    cert(dir.path());
    let s = server("implicit", dir.path());
    send(&config(s.port, SmtpTls::Implicit, dir.path(), "s3cret"))
        .await
        .expect("sent over implicit TLS with AUTH");
    let got = received(&s);
    assert_eq!(got.len(), 1);
    assert!(
        got[0].starts_with("X-Auth: True\r\nX-TLS: True\r\n"),
        "{}",
        got[0]
    );
}
