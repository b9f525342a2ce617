//! `mailgend route` end to end: the real binary with a YAML configuration
//! in a temp dir, `remote-smtp` pointing at a real SMTP receiver
//! ([`SmtpSink`], with fault injection), and real SMTP clients talking to
//! it: lettre, Python's smtplib and raw TCP for sessions no polite client
//! would hold.
//!
//! Long (over 800 lines) because each test is one whole scenario against
//! the real binary with its own configuration and traffic; what they share
//! (starting the router, the raw SMTP client) is in `tests/common/`.

use std::io::Write as _;
use std::net::TcpListener as StdListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lettre::address::Envelope;
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
use mailgend::sandbox::smtp_sink::{Failure, Fault, Scope, Stage};
use mailgend::sandbox::SmtpSink;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[path = "common/raw_smtp.rs"]
mod raw_smtp;
use raw_smtp::{code, free_port, Raw};

#[path = "common/route_process.rs"]
mod route_process;
use route_process::RouteProcess;

const WAIT: Duration = Duration::from_secs(15);

/// A configuration: one `mail` manager taking mail from
/// alerts@example.org (subject words server+backup → backup-team), one
/// taking mail to gocd-alerts@example.org (subject word "failed" → dev).
fn config_text(port: u16, sink: u16, spool: &Path, extra: &str) -> String {
    format!(
        "local-smtp: 127.0.0.1:{port}
remote-smtp: 127.0.0.1:{sink}
managers:
- name: mail
  messages-we-want:
    from: alerts@example.org
  rules:
  - actions:
    - mailto:backup-team@example.net
    filter:
      function: mail.in_subject
      args: [server, backup]
- name: mail
  messages-we-want:
    to: gocd-alerts@example.org
  rules:
  - actions:
    - mailto:dev@example.net
    filter:
      function: mail.in_subject
      args: [failed]
mailgend:
  spool: {spool}
  command-timeout: 5
{extra}",
        spool = spool.display()
    )
}

/// A running `mailgend route` and the port it listens on.
struct Route {
    process: RouteProcess,
    port: u16,
}

impl Route {
    /// Starts on the configuration in `dir/configuration.yml` and waits
    /// until it says it runs.
    fn start(dir: &Path, port: u16) -> Route {
        Route {
            process: RouteProcess::start(dir, WAIT),
            port,
        }
    }

    fn stop(self) -> Option<i32> {
        self.process.stop()
    }

    fn kill9(self) {
        self.process.kill9()
    }
}

impl std::ops::Deref for Route {
    type Target = RouteProcess;
    fn deref(&self) -> &RouteProcess {
        &self.process
    }
}

impl std::ops::DerefMut for Route {
    fn deref_mut(&mut self) -> &mut RouteProcess {
        &mut self.process
    }
}

struct Setup {
    dir: tempfile::TempDir,
    sink: SmtpSink,
    route: Route,
}

fn setup(extra: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let sink = SmtpSink::start();
    let port = free_port();
    std::fs::write(
        dir.path().join("configuration.yml"),
        config_text(port, sink.port(), &dir.path().join("spool"), extra),
    )
    .unwrap();
    let route = Route::start(dir.path(), port);
    Setup { dir, sink, route }
}

fn lettre_client(port: u16) -> AsyncSmtpTransport<Tokio1Executor> {
    AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
        .port(port)
        .timeout(Some(Duration::from_secs(10)))
        .build()
}

/// Sends `data` (ending in CRLF) as the message: lettre writes its own
/// CRLF before the final `.`, so the message on the wire is `data` exactly.
async fn lettre_send(port: u16, from: &str, to: &[&str], data: &[u8]) {
    let data = data.strip_suffix(b"\r\n").unwrap_or(data);
    let env = Envelope::new(
        Some(from.parse().unwrap()),
        to.iter().map(|t| t.parse().unwrap()).collect(),
    )
    .unwrap();
    lettre_client(port)
        .send_raw(&env, data)
        .await
        .expect("accepted by the router");
}

/// Sends with Python's smtplib; returns what it printed (the refused
/// recipients dict, or the exception).
fn python_send(port: u16, from: &str, to: &[&str], data: &[u8]) -> String {
    let script = format!(
        "import smtplib,sys\n\
         data=sys.stdin.buffer.read()\n\
         s=smtplib.SMTP('127.0.0.1',{port},timeout=10)\n\
         try:\n    print(s.sendmail({from:?},{to:?},data))\n\
         except Exception as e:\n    print('ERR',type(e).__name__,e)\n\
         s.quit()\n"
    );
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The message as the client sent it: checks that `data` starts with one
/// `Received:` field of ours (RFC 5321 §4.4: from, by, with, id, date)
/// and returns what follows it.
fn after_our_received(data: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(data);
    assert!(text.starts_with("Received: from "), "{text}");
    // The field ends at the first line that is not a continuation.
    let mut end = 0;
    for (i, line) in text.split_inclusive("\r\n").enumerate() {
        if i > 0 && !line.starts_with('\t') {
            break;
        }
        end += line.len();
    }
    let field = &text[..end];
    assert!(field.contains("(mailgend route) with ESMTP"), "{field}");
    assert!(
        regex::Regex::new(r" id [0-9]{20}-[0-9]{8}-[0-9]+[;\r]")
            .unwrap()
            .is_match(field),
        "spool id in {field}"
    );
    assert!(
        regex::Regex::new(r";\r\n\t\w{3}, \d{1,2} \w{3} \d{4} \d\d:\d\d:\d\d [+-]\d{4}\r\n$")
            .unwrap()
            .is_match(field),
        "date in {field}"
    );
    let rest = data[end..].to_vec();
    assert!(
        !String::from_utf8_lossy(&rest).contains("(mailgend route)"),
        "one Received: of ours only"
    );
    rest
}

fn header<'a>(data: &'a [u8], name: &str) -> Vec<&'a str> {
    let text = std::str::from_utf8(data).unwrap_or("");
    let head = text.split("\r\n\r\n").next().unwrap_or("");
    head.split("\r\n")
        .filter_map(|l| l.split_once(':'))
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unwanted_mail_is_forwarded_byte_identical_with_its_envelope() {
    let s = setup("");
    let port = s.route.port;
    let a = b"From: Build <build@example.org>\r\nTo: ops@example.net\r\nSubject: nightly\r\n\r\nline one\r\n.leading dot\r\n\r\n";
    lettre_send(
        port,
        "build@example.org",
        &["ops@example.net", "cc@example.net"],
        a,
    )
    .await;
    let b = b"From: someone@example.org\r\nSubject: python\r\n\r\nbody\r\n";
    let out = tokio::task::spawn_blocking(move || {
        python_send(port, "someone@example.org", &["x@example.net"], b)
    })
    .await
    .unwrap();
    assert_eq!(out, "{}");
    let got = s.sink.wait_for_async(2, WAIT).await;
    assert_eq!(got.len(), 2, "{}", s.route.log());
    assert_eq!(got[0].mail_from, "build@example.org");
    assert_eq!(got[0].rcpt_to, vec!["ops@example.net", "cc@example.net"]);
    assert_eq!(
        after_our_received(&got[0].data),
        a.to_vec(),
        "byte-identical after our Received:"
    );
    assert_eq!(got[1].mail_from, "someone@example.org");
    assert_eq!(got[1].rcpt_to, vec!["x@example.net"]);
    assert_eq!(after_our_received(&got[1].data), b.to_vec());
    assert_eq!(s.route.stop(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn taken_mail_is_rewritten_and_other_recipients_get_it_unchanged() {
    let s = setup("");
    let port = s.route.port;
    // By sender: mail manager, mail.in_subject(server, backup).
    let backup = b"From: Alerts <alerts@example.org>\r\nTo: whoever@example.net\r\nSubject: Server BACKUP failed\r\n\r\ndetails\r\n";
    lettre_send(port, "alerts@example.org", &["whoever@example.net"], backup).await;
    // By recipient, with another envelope recipient the manager does not
    // own: that one still gets the message as sent.
    let gocd = b"From: go@example.org\r\nTo: gocd-alerts@example.org\r\nSubject: Stage [x/1/build/1] failed\r\n\r\nbody\r\n";
    let out = tokio::task::spawn_blocking(move || {
        python_send(
            port,
            "go@example.org",
            &["gocd-alerts@example.org", "archive@example.net"],
            gocd,
        )
    })
    .await
    .unwrap();
    assert_eq!(out, "{}");
    let got = s.sink.wait_for_async(3, WAIT).await;
    assert_eq!(got.len(), 3, "{}", s.route.log());
    let to = |addr: &str| {
        got.iter()
            .find(|m| m.rcpt_to == vec![addr.to_string()])
            .unwrap_or_else(|| panic!("nothing for {addr}: {got:?}"))
    };
    let team = to("backup-team@example.net");
    assert_eq!(team.mail_from, "alerts@example.org");
    assert_eq!(header(&team.data, "To"), vec!["backup-team@example.net"]);
    assert_eq!(header(&team.data, "From"), vec!["alerts@example.org"]);
    assert_eq!(header(&team.data, "X-Peer"), vec!["127.0.0.1"]);
    assert_eq!(header(&team.data, "Subject"), vec!["Server BACKUP failed"]);
    assert!(team.data.ends_with(b"\r\n\r\ndetails\r\n"));
    let dev = to("dev@example.net");
    assert_eq!(header(&dev.data, "To"), vec!["dev@example.net"]);
    let archive = to("archive@example.net");
    assert_eq!(
        after_our_received(&archive.data),
        gocd.to_vec(),
        "not taken: unchanged"
    );
    // The rewritten copy carries our Received: too.
    after_our_received(&dev.data);
    assert_eq!(archive.mail_from, "go@example.org");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_null_sender_is_not_written_as_an_empty_from() {
    let s = setup("");
    let (mut raw, _) = Raw::connect(s.route.port).await;
    assert_eq!(raw.cmd("EHLO raw.test").await[..3], *"250");
    assert_eq!(code(&raw.cmd("MAIL FROM:<>").await), "250");
    assert_eq!(
        code(&raw.cmd("RCPT TO:<gocd-alerts@example.org>").await),
        "250"
    );
    assert_eq!(code(&raw.cmd("DATA").await), "354");
    raw.send(b"Subject: job failed\r\n\r\nx\r\n.\r\n").await;
    assert_eq!(code(&raw.reply().await), "250");
    let got = s.sink.wait_for_async(1, WAIT).await;
    assert_eq!(got.len(), 1, "{}", s.route.log());
    assert_eq!(got[0].mail_from, "");
    assert_eq!(got[0].rcpt_to, vec!["dev@example.net"]);
    let text = got[0].text().to_string();
    assert!(!text.contains("From: <>"), "{text}");
    assert!(!header(&got[0].data, "From").contains(&""), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_sessions_get_clear_replies_and_the_server_keeps_serving() {
    let s = setup("  max-message-size: 1048576\n");
    let port = s.route.port;

    // Commands out of order.
    let (mut raw, greeting) = Raw::connect(port).await;
    assert_eq!(code(&greeting), "220");
    assert_eq!(code(&raw.cmd("MAIL FROM:<a@example.org>").await), "503");
    assert_eq!(code(&raw.cmd("EHLO raw.test").await), "250");
    assert_eq!(code(&raw.cmd("RCPT TO:<b@example.net>").await), "503");
    assert_eq!(code(&raw.cmd("DATA").await), "503");
    assert_eq!(code(&raw.cmd("MAIL FROM:<a@example.org>").await), "250");
    assert_eq!(code(&raw.cmd("MAIL FROM:<a@example.org>").await), "503");
    assert_eq!(code(&raw.cmd("DATA").await), "554");
    assert_eq!(code(&raw.cmd("RCPT TO:<not an address>").await), "553");
    assert_eq!(code(&raw.cmd("FROB").await), "500");
    assert_eq!(code(&raw.cmd("VRFY root").await), "252");
    assert_eq!(code(&raw.cmd("RSET").await), "250");
    assert_eq!(code(&raw.cmd("NOOP").await), "250");
    // A 100 kB command line.
    let long = format!("NOOP {}", "x".repeat(100_000));
    assert_eq!(code(&raw.cmd(&long).await), "500");
    // The declared size over the limit.
    assert_eq!(
        code(&raw.cmd("MAIL FROM:<a@example.org> SIZE=20000000").await),
        "552"
    );
    assert_eq!(code(&raw.cmd("QUIT").await), "221");

    // 20 MB of data without a declared size: read, dropped, refused.
    let (mut raw, _) = Raw::connect(port).await;
    assert_eq!(code(&raw.cmd("EHLO raw.test").await), "250");
    assert_eq!(code(&raw.cmd("MAIL FROM:<a@example.org>").await), "250");
    assert_eq!(code(&raw.cmd("RCPT TO:<b@example.net>").await), "250");
    assert_eq!(code(&raw.cmd("DATA").await), "354");
    let line = format!("{}\r\n", "y".repeat(998));
    let chunk = line.repeat(1000);
    for _ in 0..20 {
        raw.send(chunk.as_bytes()).await;
    }
    raw.send(b".\r\n").await;
    assert_eq!(code(&raw.reply().await), "552");
    // Bare LF in the data (an SMTP smuggling attempt): 554 and the
    // connection closes; nothing after it is taken as a command.
    assert_eq!(code(&raw.cmd("MAIL FROM:<a@example.org>").await), "250");
    assert_eq!(code(&raw.cmd("RCPT TO:<b@example.net>").await), "250");
    assert_eq!(code(&raw.cmd("DATA").await), "354");
    raw.send(b"Subject: x\r\n\r\nsmuggle\n.\nMAIL FROM:<evil@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n\r\nspoofed\r\n.\r\n")
        .await;
    let r = raw.reply().await;
    assert_eq!(code(&r), "554", "{r}");
    assert_eq!(raw.reply().await, "", "closed after the refusal");
    // Bare CR likewise: a receiver that ends data at <CR>.<CR> would see
    // a second, attacker-chosen transaction if we relayed these bytes.
    let (mut raw, _) = Raw::connect(port).await;
    assert_eq!(code(&raw.cmd("EHLO cr.test").await), "250");
    assert_eq!(code(&raw.cmd("MAIL FROM:<a@example.org>").await), "250");
    assert_eq!(code(&raw.cmd("RCPT TO:<b@example.net>").await), "250");
    assert_eq!(code(&raw.cmd("DATA").await), "354");
    raw.send(b"Subject: x\r\n\r\nsmuggle\r.\rMAIL FROM:<evil@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n\r\nspoofed\r\n.\r\n")
        .await;
    let r = raw.reply().await;
    assert_eq!(code(&r), "554", "{r}");
    assert!(r.contains("Bare CR or LF"), "{r}");
    assert_eq!(raw.reply().await, "", "closed after the refusal");

    // Missing headers, no Subject, 8-bit non-UTF-8 body: accepted and
    // forwarded as they are.
    let odd: [&[u8]; 3] = [
        b"just a body line\r\n",
        b"From: a@example.org\r\n\r\nno subject\r\n",
        b"Subject: latin-1\r\nContent-Type: text/plain; charset=iso-8859-1\r\n\r\nGr\xfc\xdfe \xff\r\n",
    ];
    for data in odd {
        let (mut raw, _) = Raw::connect(port).await;
        assert_eq!(
            code(&raw.mail("a@example.org", &["b@example.net"], data).await),
            "250"
        );
    }
    let got = s.sink.wait_for_async(3, WAIT).await;
    assert_eq!(got.len(), 3, "{}", s.route.log());
    for (m, data) in got.iter().zip(odd) {
        assert_eq!(after_our_received(&m.data), data.to_vec());
    }

    // A client that leaves in the middle of DATA: nothing is delivered.
    let (mut raw, _) = Raw::connect(port).await;
    assert_eq!(code(&raw.cmd("EHLO raw.test").await), "250");
    assert_eq!(code(&raw.cmd("MAIL FROM:<a@example.org>").await), "250");
    assert_eq!(code(&raw.cmd("RCPT TO:<b@example.net>").await), "250");
    assert_eq!(code(&raw.cmd("DATA").await), "354");
    raw.send(b"Subject: half\r\n\r\nhalf a mess").await;
    drop(raw);
    s.route.wait_log("client left during DATA", 1);

    // And the server still serves.
    lettre_send(
        port,
        "after@example.org",
        &["b@example.net"],
        b"Subject: after\r\n\r\nok\r\n",
    )
    .await;
    let got = s.sink.wait_for_async(4, WAIT).await;
    assert_eq!(got.len(), 4);
    assert_eq!(got[3].mail_from, "after@example.org");
    assert!(!s.route.log().contains("panicked"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_on_connections_and_recipients() {
    let s = setup("  max-connections: 2\n  max-recipients: 3\n  max-messages-per-connection: 1\n");
    let port = s.route.port;
    let (mut a, ga) = Raw::connect(port).await;
    let (_b, gb) = Raw::connect(port).await;
    assert_eq!(code(&ga), "220");
    assert_eq!(code(&gb), "220");
    let (_c, gc) = Raw::connect(port).await;
    assert_eq!(code(&gc), "421", "{gc}");
    assert_eq!(code(&a.cmd("EHLO raw.test").await), "250");
    assert_eq!(code(&a.cmd("MAIL FROM:<a@example.org>").await), "250");
    for i in 0..3 {
        assert_eq!(
            code(&a.cmd(&format!("RCPT TO:<r{i}@example.net>")).await),
            "250"
        );
    }
    assert_eq!(code(&a.cmd("RCPT TO:<r4@example.net>").await), "452");
    assert_eq!(code(&a.cmd("DATA").await), "354");
    a.send(b"Subject: x\r\n\r\n.\r\n").await;
    assert_eq!(code(&a.reply().await), "250");
    // One message per connection here.
    assert_eq!(code(&a.cmd("MAIL FROM:<a@example.org>").await), "421");
    let got = s.sink.wait_for_async(1, WAIT).await;
    assert_eq!(got[0].rcpt_to.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_down_spools_survives_kill9_and_delivers_once_in_order() {
    let Setup { dir, sink, route } = setup("");
    let port = route.port;
    sink.set_fault(Fault::RefuseConnections);
    for i in 0..3 {
        let data = format!("Subject: queued {i}\r\n\r\nbody {i}\r\n");
        lettre_send(port, "q@example.org", &["ops@example.net"], data.as_bytes()).await;
    }
    route.wait_log("queued", 3);
    let spool = dir.path().join("spool");
    let files = std::fs::read_dir(&spool)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "msg")
        })
        .count();
    assert_eq!(files, 3);
    // No chance to clean up: the spool must carry it across.
    route.kill9();
    sink.resume().unwrap();
    let route = Route::start(dir.path(), port);
    let got = sink.wait_for_async(3, WAIT).await;
    assert_eq!(got.len(), 3, "{}", route.log());
    for (i, m) in got.iter().enumerate() {
        assert_eq!(
            String::from_utf8(after_our_received(&m.data)).unwrap(),
            format!("Subject: queued {i}\r\n\r\nbody {i}\r\n")
        );
        assert_eq!(m.rcpt_to, vec!["ops@example.net"]);
    }
    route.wait_log("spooled message done", 3);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sink.messages().len(), 3, "nothing twice");
    let left = std::fs::read_dir(&spool)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "msg")
        })
        .count();
    assert_eq!(left, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recipient_that_accepted_never_gets_a_retry() {
    let s = setup("");
    let port = s.route.port;
    s.sink.set_fault(Fault::Fail {
        stage: Stage::Rcpt,
        failure: Failure::Temporary,
        scope: Scope::Recipient("later@example.net".into()),
    });
    lettre_send(
        port,
        "p@example.org",
        &["now@example.net", "later@example.net"],
        b"Subject: partial\r\n\r\nx\r\n",
    )
    .await;
    let got = s.sink.wait_for_async(1, WAIT).await;
    assert_eq!(got[0].rcpt_to, vec!["now@example.net"]);
    s.route.wait_log("will retry", 1);
    s.sink.set_fault(Fault::None);
    let got = s.sink.wait_for_async(2, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 2, "{}", s.route.log());
    assert_eq!(got[1].rcpt_to, vec!["later@example.net"]);
    s.route.wait_log("spooled message done", 1);
    assert_eq!(s.sink.messages().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_refusals_are_554_at_once_or_a_bounce_later() {
    let s = setup("");
    let port = s.route.port;
    // Refused for good while the client waits: it hears the reason.
    s.sink.set_fault(Fault::Fail {
        stage: Stage::Rcpt,
        failure: Failure::Permanent,
        scope: Scope::All,
    });
    let (mut raw, _) = Raw::connect(port).await;
    let r = raw
        .mail(
            "sender@example.org",
            &["x@example.net"],
            b"Subject: no\r\n\r\nx\r\n",
        )
        .await;
    assert_eq!(code(&r), "554", "{r}");
    assert!(r.contains("Mailbox unavailable"), "the remote reason: {r}");

    // One recipient refused for good, one accepted: 250, and a bounce to
    // the sender (null sender, names the recipient and the reason).
    s.sink.set_fault(Fault::Fail {
        stage: Stage::Rcpt,
        failure: Failure::Permanent,
        scope: Scope::Recipient("gone@example.net".into()),
    });
    let r = raw
        .mail(
            "sender@example.org",
            &["ok@example.net", "gone@example.net"],
            b"Subject: half\r\n\r\nx\r\n",
        )
        .await;
    assert_eq!(code(&r), "250", "{r}");
    let got = s.sink.wait_for_async(2, WAIT).await;
    assert_eq!(got.len(), 2, "{}", s.route.log());
    assert_eq!(got[0].rcpt_to, vec!["ok@example.net"]);
    let bounce = &got[1];
    assert_eq!(bounce.mail_from, "");
    assert_eq!(bounce.rcpt_to, vec!["sender@example.org"]);
    let text = bounce.text();
    assert!(
        text.contains("Final-Recipient: rfc822; gone@example.net"),
        "{text}"
    );
    assert!(text.contains("Mailbox unavailable"), "{text}");
    assert!(text.contains("Subject: half"), "{text}");
    assert!(s.route.log().contains("ERROR"), "{}", s.route.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_with_a_broken_file_keeps_the_old_rules() {
    let s = setup("");
    let port = s.route.port;
    let config = s.dir.path().join("configuration.yml");
    let good = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        // A rule function that does not exist cannot work at all (an
        // unknown key would only be a warning, as mail2alert ignored it).
        good.replace("function: mail.in_subject", "function: mail.in_body"),
    )
    .unwrap();
    s.route.signal("HUP");
    s.route.wait_log("reload refused", 1);
    assert!(s.route.log().contains("ERROR"));
    lettre_send(
        port,
        "alerts@example.org",
        &["x@example.net"],
        b"Subject: server backup failed\r\n\r\nx\r\n",
    )
    .await;
    let got = s.sink.wait_for_async(1, WAIT).await;
    assert_eq!(got[0].rcpt_to, vec!["backup-team@example.net"], "old rules");
    // A good change is taken.
    std::fs::write(
        &config,
        good.replace("mailto:backup-team@", "mailto:new-team@"),
    )
    .unwrap();
    s.route.signal("HUP");
    s.route.wait_log("configuration reloaded", 1);
    lettre_send(
        port,
        "alerts@example.org",
        &["x@example.net"],
        b"Subject: server backup failed\r\n\r\nx\r\n",
    )
    .await;
    let got = s.sink.wait_for_async(2, WAIT).await;
    assert_eq!(got[1].rcpt_to, vec!["new-team@example.net"]);
    assert_eq!(s.route.stop(), Some(0));
}

#[test]
fn a_taken_port_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let taken = StdListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let cfg = dir.path().join("configuration.yml");
    std::fs::write(&cfg, config_text(port, 9, &dir.path().join("spool"), "")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mailgend"))
        .args(["route", "-c"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("127.0.0.1:{port}")) && err.contains("cannot listen"),
        "{err}"
    );
    // An unresolvable name, likewise.
    std::fs::write(
        &cfg,
        config_text(port, 9, &dir.path().join("spool"), "")
            .replace("local-smtp: 127.0.0.1", "local-smtp: no-such-host.invalid"),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mailgend"))
        .args(["route", "-c"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no-such-host.invalid"), "{err}");
}

#[test]
fn the_route_unit_passes_systemd_analyze_verify() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/mailgend-route.service");
    let text = std::fs::read_to_string(path).unwrap();
    let exec = "ExecStart=/usr/bin/mailgend route";
    assert!(text.contains(exec));
    assert!(text.contains("Type=notify"));
    assert!(text.contains("ReadWritePaths=/var/spool/mailgend-route"));
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("mailgend-route.service");
    let local = text.replace(
        exec,
        &format!("ExecStart={} route", env!("CARGO_BIN_EXE_mailgend")),
    );
    std::fs::write(&unit, &local).unwrap();
    let verify = |unit: &Path| {
        Command::new("systemd-analyze")
            .arg("verify")
            .arg(unit)
            .env("SYSTEMD_LOG_LEVEL", "notice")
            .output()
    };
    let out = match verify(&unit) {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("SKIPPED: systemd-analyze not installed");
            return;
        }
        Err(e) => panic!("systemd-analyze: {e}"),
    };
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && report.trim().is_empty(), "{report}");
    // The check does notice a broken unit.
    std::fs::write(
        &unit,
        local.replace("ProtectSystem=strict", "ProtectSytem=strict"),
    )
    .unwrap();
    let out = verify(&unit).unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("ProtectSytem"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_transaction_in_flight_finish() {
    let s = setup("");
    let port = s.route.port;
    let (mut raw, _) = Raw::connect(port).await;
    assert_eq!(code(&raw.cmd("EHLO raw.test").await), "250");
    assert_eq!(code(&raw.cmd("MAIL FROM:<a@example.org>").await), "250");
    assert_eq!(code(&raw.cmd("RCPT TO:<b@example.net>").await), "250");
    // An idle session is told to go.
    let (mut idle, _) = Raw::connect(port).await;
    s.route.signal("TERM");
    s.route.wait_log("no longer accepting", 1);
    assert_eq!(code(&idle.reply().await), "421");
    assert_eq!(code(&raw.cmd("DATA").await), "354");
    raw.send(b"Subject: last\r\n\r\nx\r\n.\r\n").await;
    assert_eq!(code(&raw.reply().await), "250");
    assert_eq!(code(&raw.cmd("NOOP").await), "421");
    let mut route = s.route;
    let status = route.child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert_eq!(s.sink.messages().len(), 1);
    let _ = raw.rd.read(&mut [0u8; 16]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_and_auth_with_python_smtplib() {
    let dir = tempfile::tempdir().unwrap();
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
        .arg(dir.path().join("key.pem"))
        .arg("-out")
        .arg(dir.path().join("cert.pem"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl");
    assert!(status.success());
    let sink = SmtpSink::start();
    let port = free_port();
    let extra = format!(
        "  tls-cert: {}\n  tls-key: {}\n  auth-user: router\n  auth-password: s3cret\n",
        dir.path().join("cert.pem").display(),
        dir.path().join("key.pem").display()
    );
    std::fs::write(
        dir.path().join("configuration.yml"),
        config_text(port, sink.port(), &dir.path().join("spool"), &extra),
    )
    .unwrap();
    let route = Route::start(dir.path(), port);
    let cert = dir.path().join("cert.pem");
    let script = format!(
        "import smtplib, ssl\n\
         s = smtplib.SMTP('127.0.0.1', {port}, timeout=10)\n\
         s.ehlo()\n\
         print('starttls', s.has_extn('starttls'))\n\
         print('mail', s.mail('a@example.org')[0])\n\
         s.rset()\n\
         s.starttls(context=ssl.create_default_context(cafile={cert:?}))\n\
         s.ehlo()\n\
         print('auth', s.has_extn('auth'), s.has_extn('starttls'))\n\
         s.user, s.password = 'router', 'wrong'\n\
         try:\n    s.auth('PLAIN', s.auth_plain)\n\
         except smtplib.SMTPAuthenticationError as e:\n    print('bad', e.smtp_code)\n\
         s.user, s.password = 'router', 's3cret'\n\
         print('login', s.auth('LOGIN', s.auth_login, initial_response_ok=False)[0])\n\
         print('sent', s.sendmail('a@example.org', ['b@example.net'], b'Subject: tls\\r\\n\\r\\nx\\r\\n'))\n\
         s.quit()\n",
        cert = cert.display().to_string()
    );
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg("-c")
            .arg(script)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(
        text,
        "starttls True\nmail 530\nauth True False\nbad 535\nlogin 235\nsent {}\n",
        "{err}\n{}",
        route.log()
    );
    let got = sink.wait_for_async(1, WAIT).await;
    assert_eq!(
        after_our_received(&got[0].data),
        b"Subject: tls\r\n\r\nx\r\n".to_vec()
    );
    assert!(
        String::from_utf8_lossy(&got[0].data).contains("with ESMTPSA id"),
        "TLS and AUTH named (RFC 3848)"
    );
    assert!(route.log().contains("SMTP authentication failed"));
    assert!(!route.log().contains("wrong"), "no password in the log");
}

/// A Slack Web API stand-in on loopback: answers every request with the
/// current status and records the bodies.
struct FakeSlack {
    port: u16,
    status: std::sync::Arc<std::sync::atomic::AtomicU16>,
    bodies: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl FakeSlack {
    async fn start() -> FakeSlack {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let status = std::sync::Arc::new(std::sync::atomic::AtomicU16::new(200));
        let bodies = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (st, bo) = (status.clone(), bodies.clone());
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let (st, bo) = (st.clone(), bo.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let n = sock.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        let text = String::from_utf8_lossy(&buf).to_string();
                        let Some((head, body)) = text.split_once("\r\n\r\n") else {
                            continue;
                        };
                        let len: usize = head
                            .lines()
                            .filter_map(|l| l.split_once(':'))
                            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                            .and_then(|(_, v)| v.trim().parse().ok())
                            .unwrap_or(0);
                        if body.len() < len {
                            continue;
                        }
                        let status = st.load(Ordering::SeqCst);
                        let answer = if status == 200 {
                            r#"{"ok":true}"#
                        } else {
                            r#"{"ok":false,"error":"internal_error"}"#
                        };
                        if status == 200 {
                            bo.lock().unwrap().push(body.to_string());
                        }
                        let reply = format!(
                            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n\
                             Content-Length: {}\r\nConnection: close\r\n\r\n{answer}",
                            answer.len()
                        );
                        let _ = sock.write_all(reply.as_bytes()).await;
                        let _ = sock.shutdown().await;
                        return;
                    }
                });
            }
        });
        FakeSlack {
            port,
            status,
            bodies,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slack_post_that_failed_is_retried_from_the_spool_once() {
    use std::sync::atomic::Ordering;
    let slack = FakeSlack::start().await;
    slack.status.store(503, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let sink = SmtpSink::start();
    let port = free_port();
    let text = config_text(port, sink.port(), &dir.path().join("spool"), "")
        .replace(
            "    - mailto:backup-team@example.net\n",
            "    - mailto:backup-team@example.net\n    - slack:#ops\n",
        )
        .replace(
            "managers:\n",
            &format!(
                "slack-token: xoxb-test\nslack-url: http://127.0.0.1:{}/api\nmanagers:\n",
                slack.port
            ),
        );
    std::fs::write(dir.path().join("configuration.yml"), text).unwrap();
    let route = Route::start(dir.path(), port);
    lettre_send(
        port,
        "alerts@example.org",
        &["x@example.net"],
        b"Subject: server backup failed\r\n\r\nx\r\n",
    )
    .await;
    let got = sink.wait_for_async(1, WAIT).await;
    assert_eq!(got[0].rcpt_to, vec!["backup-team@example.net"]);
    route.wait_log("will retry", 1);
    slack.status.store(200, Ordering::SeqCst);
    route.wait_log("spooled message done", 1);
    let bodies = slack.bodies.lock().unwrap().clone();
    assert_eq!(bodies.len(), 1, "{bodies:?}");
    assert!(bodies[0].contains("#ops") && bodies[0].contains("server backup failed"));
    assert_eq!(sink.messages().len(), 1, "the mail is not sent again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_spool_file_is_set_aside_not_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let sink = SmtpSink::start();
    let port = free_port();
    let spool = dir.path().join("spool");
    std::fs::create_dir_all(&spool).unwrap();
    std::fs::write(
        spool.join("00000000000000000001-00000000-1.msg"),
        b"not a spool file",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("configuration.yml"),
        config_text(port, sink.port(), &spool, ""),
    )
    .unwrap();
    let route = Route::start(dir.path(), port);
    route.wait_log("unreadable spool file", 1);
    assert!(route.log().contains("ERROR"));
    let kept = spool.join("bad/00000000000000000001-00000000-1.msg");
    assert_eq!(std::fs::read(kept).unwrap(), b"not a spool file");
    // And it goes on serving.
    lettre_send(
        port,
        "a@example.org",
        &["b@example.net"],
        b"Subject: ok\r\n\r\nx\r\n",
    )
    .await;
    assert_eq!(sink.wait_for_async(1, WAIT).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_arriving_after_an_outage_is_delivered_behind_the_queued_mail() {
    let s = setup("");
    let port = s.route.port;
    s.sink.set_fault(Fault::RefuseConnections);
    for i in 1..=2 {
        let data = format!("Subject: m{i}\r\n\r\nx\r\n");
        lettre_send(port, "q@example.org", &["ops@example.net"], data.as_bytes()).await;
    }
    // The worker tried and found the relay down (the entries now wait).
    s.route.wait_log("will retry in", 1);
    s.sink.resume().unwrap();
    lettre_send(
        port,
        "q@example.org",
        &["ops@example.net"],
        b"Subject: m3\r\n\r\nx\r\n",
    )
    .await;
    let got = s.sink.wait_for_async(3, WAIT).await;
    let subjects: Vec<String> = got.iter().map(|m| m.header("Subject").unwrap()).collect();
    assert_eq!(subjects, vec!["m1", "m2", "m3"], "{}", s.route.log());
}

/// A GoCD that answers every request only after `delay`: `/go/cctray.xml`
/// and `/go/api/config/pipeline_groups` with the given bodies.
fn slow_gocd(delay: Duration, cctray: &'static str, groups: &'static str) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for sock in listener.incoming() {
            let Ok(mut sock) = sock else { return };
            std::thread::spawn(move || {
                use std::io::Read;
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&buf).to_string();
                let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
                std::thread::sleep(delay);
                let (status, body) = match path.as_str() {
                    "/go/cctray.xml" => ("200 OK", cctray),
                    "/go/api/config/pipeline_groups" => ("200 OK", groups),
                    _ => ("404 Not Found", ""),
                };
                let _ = write!(
                    sock,
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    port
}

/// mail2alert read cctray.xml before it answered SMTP (server.py:139-145),
/// so its first GoCD mail was already judged by the stage's last result.
/// With a GoCD answering only after 10 s, the router accepts GoCD's mail
/// at once (250 after fsync), holds it in the spool, and routes it once
/// GoCD has answered: "failed" after a passing stage is BREAKS (pages
/// oncall), and a group rule matches. Nothing is decided before, nothing
/// is lost.
#[tokio::test]
async fn a_slow_cctray_loses_no_alert_mail_is_held_until_gocd_answers() {
    const CCTRAY: &str = r#"<?xml version="1.0"?><Projects>
<Project name="ppp :: build" lastBuildStatus="Success" lastBuildTime="2026-12-01T10:00:00Z" activity="Sleeping" lastBuildLabel="12" webUrl="http://ci/go"/>
<Project name="ppp :: test" lastBuildStatus="Failure" lastBuildTime="2026-12-01T11:00:00Z" activity="Sleeping" lastBuildLabel="12" webUrl="http://ci/go"/>
</Projects>"#;
    const GROUPS: &str = r#"[{"name":"my-group","pipelines":[{"name":"ppp"}]}]"#;
    let gocd = slow_gocd(Duration::from_secs(10), CCTRAY, GROUPS);
    let dir = tempfile::tempdir().unwrap();
    let sink = SmtpSink::start();
    let port = free_port();
    let text = config_text(port, sink.port(), &dir.path().join("spool"), "").replace(
        "mailgend:\n",
        &format!(
            "- name: gocd
  url: http://127.0.0.1:{gocd}/go
  timeout: 30
  messages-we-want:
    to: mail2alert@example.org
  rules:
  - actions: [mailto:oncall@example.net]
    filter: {{function: pipelines.any, events: [BREAKS]}}
  - actions: [mailto:team@example.net]
    filter: {{function: pipelines.in_group, args: [my-group], events: [BREAKS, FAILS]}}
mailgend:\n"
        ),
    );
    std::fs::write(dir.path().join("configuration.yml"), text).unwrap();
    let started = Instant::now();
    let route = Route::start(dir.path(), port);
    let reply = python_send(
        port,
        "go@example.org",
        &["mail2alert@example.org"],
        b"Subject: Stage [ppp/13/build/1] failed\r\n\r\nx\r\n",
    );
    assert_eq!(reply, "{}", "accepted at once: {}", route.log());
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "not waiting in the session"
    );
    route.wait_log("held: manager gocd", 1);
    // Mail for another manager is not held (it goes through the spool
    // meanwhile and is delivered).
    lettre_send(
        port,
        "alerts@example.org",
        &["x@example.net"],
        b"Subject: server backup failed\r\n\r\nx\r\n",
    )
    .await;
    let got = sink.wait_for_async(2, Duration::from_secs(40)).await;
    assert!(
        started.elapsed() >= Duration::from_secs(10),
        "routed only after GoCD's answer"
    );
    let gocd_copy = got
        .iter()
        .find(|m| m.rcpt_to.contains(&"oncall@example.net".to_string()))
        .unwrap_or_else(|| panic!("BREAKS to oncall: {got:?}\n{}", route.log()));
    // BREAKS (stage ppp/build was passing) for both rules, one copy.
    assert_eq!(
        gocd_copy.rcpt_to,
        vec!["oncall@example.net", "team@example.net"]
    );
    after_our_received(&gocd_copy.data);
    assert!(got
        .iter()
        .any(|m| m.rcpt_to == vec!["backup-team@example.net"]));
    assert!(
        route.log().contains("held message routed"),
        "{}",
        route.log()
    );
    assert!(
        route.log().contains("event BREAKS (GoCD said FAILS"),
        "{}",
        route.log()
    );
    assert_eq!(route.stop(), Some(0));
}

/// RFC 5321 §6.3 / Postfix's hopcount_limit: a message that already has
/// `max-received` Received: lines is refused as a loop (554 5.4.6); one
/// line fewer passes, with exactly one more (ours).
#[tokio::test]
async fn too_many_received_lines_are_refused_as_a_loop() {
    let s = setup("");
    let hops = |n: usize| {
        let mut m = String::new();
        for i in 0..n {
            m.push_str(&format!(
                "Received: from h{i} by h{} ; Thu, 3 Dec 2026 08:00:00 +0000\r\n",
                i + 1
            ));
        }
        m.push_str("Subject: loop\r\n\r\nx\r\n");
        m
    };
    let reply = python_send(
        s.route.port,
        "a@example.org",
        &["x@example.net"],
        hops(50).as_bytes(),
    );
    assert!(reply.contains("554") && reply.contains("5.4.6"), "{reply}");
    let ok = hops(49);
    let reply = python_send(
        s.route.port,
        "a@example.org",
        &["x@example.net"],
        ok.as_bytes(),
    );
    assert_eq!(reply, "{}");
    let got = s.sink.wait_for_async(1, WAIT).await;
    assert_eq!(got.len(), 1);
    assert_eq!(after_our_received(&got[0].data), ok.as_bytes().to_vec());
    assert_eq!(
        String::from_utf8_lossy(&got[0].data)
            .matches("Received:")
            .count(),
        50
    );
    assert!(s.route.log().contains("too many Received: lines"));
    assert_eq!(s.route.stop(), Some(0));
}

/// One sender, one connection, more than the old limit of 1,000 messages:
/// nobody is cut off (max-messages-per-connection is unlimited by default).
#[tokio::test]
async fn one_long_lived_sender_is_never_cut_off() {
    let s = setup("");
    let script = format!(
        "import smtplib\n\
         s=smtplib.SMTP('127.0.0.1',{port},timeout=30)\n\
         bad=0\n\
         for i in range(1200):\n\
         \x20   r=s.sendmail('a@example.org',['x@example.net'],b'Subject: m %d\\r\\n\\r\\nx\\r\\n' % i)\n\
         \x20   bad+=len(r)\n\
         s.quit()\n\
         print('sent', bad)\n",
        port = s.route.port
    );
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(text.trim(), "sent 0", "{text}");
    let got = s.sink.wait_for_async(1200, Duration::from_secs(60)).await;
    assert_eq!(got.len(), 1200);
    assert_eq!(s.route.stop(), Some(0));
}

/// After a SIGHUP that points the gocd manager at another GoCD, nothing
/// learnt from the old one holds: its mail is held again until the new
/// GoCD has answered, then judged by the new GoCD's stage history.
#[tokio::test]
async fn after_sighup_to_another_gocd_mail_is_held_until_it_answers() {
    const GROUPS: &str = r#"[{"name":"my-group","pipelines":[{"name":"ppp"}]}]"#;
    const FAILING: &str = r#"<?xml version="1.0"?><Projects>
<Project name="ppp :: build" lastBuildStatus="Failure" lastBuildTime="2026-12-01T10:00:00Z" activity="Sleeping" lastBuildLabel="12" webUrl="http://ci/go"/>
</Projects>"#;
    const PASSING: &str = r#"<?xml version="1.0"?><Projects>
<Project name="ppp :: build" lastBuildStatus="Success" lastBuildTime="2026-12-01T10:00:00Z" activity="Sleeping" lastBuildLabel="12" webUrl="http://ci/go"/>
</Projects>"#;
    let fast = slow_gocd(Duration::ZERO, PASSING, GROUPS);
    let slow = slow_gocd(Duration::from_secs(5), FAILING, GROUPS);
    let dir = tempfile::tempdir().unwrap();
    let sink = SmtpSink::start();
    let port = free_port();
    let with_gocd = |gocd: u16| {
        config_text(port, sink.port(), &dir.path().join("spool"), "").replace(
            "mailgend:\n",
            &format!(
                "- name: gocd
  url: http://127.0.0.1:{gocd}/go
  timeout: 30
  messages-we-want:
    to: mail2alert@example.org
  rules:
  - actions: [mailto:fixed@example.net]
    filter: {{function: pipelines.any, events: [FIXED]}}
  - actions: [mailto:passes@example.net]
    filter: {{function: pipelines.any, events: [PASSES]}}
mailgend:\n"
            ),
        )
    };
    let config = dir.path().join("configuration.yml");
    std::fs::write(&config, with_gocd(fast)).unwrap();
    let route = Route::start(dir.path(), port);
    let passed = b"Subject: Stage [ppp/13/build/1] passed\r\n\r\nx\r\n";
    // The first GoCD says build was passing: PASSES.
    assert_eq!(
        python_send(port, "go@example.org", &["mail2alert@example.org"], passed),
        "{}"
    );
    let got = sink.wait_for_async(1, WAIT).await;
    assert_eq!(
        got[0].rcpt_to,
        vec!["passes@example.net"],
        "{}",
        route.log()
    );
    std::fs::write(&config, with_gocd(slow)).unwrap();
    let reloaded = Instant::now();
    route.signal("HUP");
    route.wait_log("configuration reloaded", 1);
    assert_eq!(
        python_send(port, "go@example.org", &["mail2alert@example.org"], passed),
        "{}"
    );
    route.wait_log("held: manager gocd", 1);
    // The new GoCD says build was failing: FIXED, once it has answered.
    let got = sink.wait_for_async(2, Duration::from_secs(40)).await;
    assert!(reloaded.elapsed() >= Duration::from_secs(5));
    assert_eq!(got[1].rcpt_to, vec!["fixed@example.net"], "{}", route.log());
    assert_eq!(route.stop(), Some(0));
}
