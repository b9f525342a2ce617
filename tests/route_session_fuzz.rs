//! A seeded session fuzzer against the real `mailgend route` over TCP:
//! random SMTP sessions (valid commands, garbage, long lines, NUL, 8-bit,
//! pipelined bursts, bare CR/LF in DATA, clients that vanish mid-way),
//! then: the router never panicked and still serves, every reply was a
//! well-formed SMTP reply, every message answered 250 reached the relay,
//! and none that was refused did.
//!
//! The seed is printed; `ROUTE_FUZZ_SEED=N` repeats a run,
//! `ROUTE_FUZZ_SESSIONS=N` makes it longer (default 1000, a few seconds).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use mailgend::sandbox::SmtpSink;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

#[path = "common/raw_smtp.rs"]
mod raw_smtp;
use raw_smtp::free_port;

#[path = "common/route_process.rs"]
mod route_process;
use route_process::RouteProcess;

const WAIT: Duration = Duration::from_secs(20);

/// What one session's replies said.
#[derive(Default)]
struct Outcome {
    /// Tokens of messages answered 250 after DATA.
    acked: BTreeSet<String>,
    /// Tokens of messages refused (or whose session ended before a reply).
    not_acked: BTreeSet<String>,
}

/// A client session with a model of where the server is.
struct Client {
    rd: BufReader<tokio::net::tcp::OwnedReadHalf>,
    wr: tokio::net::tcp::OwnedWriteHalf,
}

enum Reply {
    Code(u16),
    Closed,
}

impl Client {
    /// One reply (multi-line aware), checked for form: `DDD-text` lines
    /// then one `DDD text` line, each ending in CRLF, same code.
    async fn reply(&mut self) -> Reply {
        let mut first: Option<u16> = None;
        loop {
            let mut line = Vec::new();
            let n = tokio::time::timeout(WAIT, self.rd.read_until(b'\n', &mut line))
                .await
                .expect("the router answers in time")
                .unwrap_or(0);
            if n == 0 {
                assert!(first.is_none(), "closed in the middle of a reply");
                return Reply::Closed;
            }
            assert!(line.ends_with(b"\r\n"), "reply line without CRLF: {line:?}");
            assert!(line.len() <= 512, "reply line of {} octets", line.len());
            let text = std::str::from_utf8(&line).expect("replies are ASCII/UTF-8");
            assert!(
                text[..text.len() - 2].chars().all(|c| !c.is_control()),
                "control character in a reply: {text:?}"
            );
            let b = text.as_bytes();
            assert!(
                b.len() >= 5
                    && b[..3].iter().all(u8::is_ascii_digit)
                    && (b[3] == b' ' || b[3] == b'-'),
                "malformed reply line {text:?}"
            );
            let code: u16 = text[..3].parse().unwrap();
            assert!((200..600).contains(&code), "{text:?}");
            if let Some(c) = first {
                assert_eq!(c, code, "one code per reply: {text:?}");
            }
            first = Some(code);
            if b[3] == b' ' {
                return Reply::Code(code);
            }
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> bool {
        self.wr.write_all(bytes).await.is_ok()
    }
}

fn garbage(rng: &mut StdRng, max: usize) -> Vec<u8> {
    let n = rng.gen_range(0..max);
    (0..n)
        .map(|_| loop {
            let b: u8 = rng.gen();
            if b != b'\n' {
                break b;
            }
        })
        .collect()
}

fn address(rng: &mut StdRng) -> String {
    match rng.gen_range(0..8) {
        0 => String::new(),
        1 => "alerts@example.org".into(),
        2 => format!("\"q {}\"@example.net", rng.gen_range(0..100)),
        3 => "not an address".into(),
        4 => format!(
            "u{}@{}",
            rng.gen_range(0..1000),
            "x".repeat(rng.gen_range(1..300))
        ),
        _ => format!("r{}@example.net", rng.gen_range(0..1000)),
    }
}

/// A message body: a token header, random lines (dot-stuffed on the
/// wire by the caller), sometimes 8-bit.
fn body(rng: &mut StdRng, token: &str) -> Vec<Vec<u8>> {
    let mut lines = vec![
        format!("X-Fuzz-Token: {token}").into_bytes(),
        format!("Subject: fuzz {}", rng.gen_range(0..1000)).into_bytes(),
        Vec::new(),
    ];
    for _ in 0..rng.gen_range(0..20) {
        let mut l: Vec<u8> = match rng.gen_range(0..6) {
            0 => b".".to_vec(),
            1 => b"..double".to_vec(),
            2 => "Grüße \u{2028} ünïcode".as_bytes().to_vec(),
            3 => vec![0xff, 0xfe, 0x00, 0x80],
            _ => (0..rng.gen_range(0..200))
                .map(|_| rng.gen_range(0x20u8..0x7f))
                .collect(),
        };
        l.retain(|&b| b != b'\r' && b != b'\n');
        lines.push(l);
    }
    lines
}

/// Runs one random session; returns what the router acknowledged.
async fn session(port: u16, rng: &mut StdRng, id: usize) -> Outcome {
    let mut out = Outcome::default();
    let s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (r, w) = s.into_split();
    let mut c = Client {
        rd: BufReader::new(r),
        wr: w,
    };
    match c.reply().await {
        Reply::Code(220) => {}
        Reply::Code(421) | Reply::Closed => return out,
        Reply::Code(other) => panic!("greeting {other}"),
    }
    let mut msg = 0;
    for _ in 0..rng.gen_range(1..25) {
        let line: Vec<u8> = match rng.gen_range(0..20) {
            0 => b"EHLO fuzz.test".to_vec(),
            1 => b"HELO fuzz.test".to_vec(),
            2 | 3 => format!("MAIL FROM:<{}>", address(rng)).into_bytes(),
            4 | 5 => format!("RCPT TO:<{}>", address(rng)).into_bytes(),
            6 | 7 => b"DATA".to_vec(),
            8 => b"RSET".to_vec(),
            9 => b"NOOP".to_vec(),
            10 => b"STARTTLS".to_vec(),
            11 => b"AUTH PLAIN AGEAYg==".to_vec(),
            12 => b"VRFY root".to_vec(),
            13 => garbage(rng, 100),
            14 => {
                let mut l = b"NOOP ".to_vec();
                l.extend(std::iter::repeat_n(b'x', rng.gen_range(4000..6000)));
                l
            }
            15 => b"MAIL FROM:<a@example.org> SIZE=999999999999".to_vec(),
            16 => b"mail from:<a@example.org> BODY=8BITMIME".to_vec(),
            17 => {
                // A pipelined burst: EHLO MAIL RCPT RCPT DATA at once.
                let burst = b"EHLO p.test\r\nMAIL FROM:<p@example.org>\r\nRCPT TO:<p1@example.net>\r\nRCPT TO:<bad address>\r\nDATA\r\n";
                if !c.send(burst).await {
                    return out;
                }
                let mut codes = Vec::new();
                for _ in 0..5 {
                    match c.reply().await {
                        Reply::Code(code) => codes.push(code),
                        Reply::Closed => return out,
                    }
                }
                if codes.last() == Some(&354) {
                    msg += 1;
                    if !data(&mut c, rng, &format!("{id}.{msg}"), &mut out).await {
                        return out;
                    }
                }
                continue;
            }
            18 => {
                // Vanish.
                if rng.gen_bool(0.5) {
                    let _ = c.send(b"MAIL FROM:<half").await;
                }
                return out;
            }
            _ => b"QUIT".to_vec(),
        };
        let mut wire = line.clone();
        wire.extend_from_slice(if rng.gen_bool(0.9) { b"\r\n" } else { b"\n" });
        if !c.send(&wire).await {
            return out;
        }
        match c.reply().await {
            Reply::Closed => return out,
            Reply::Code(354) => {
                msg += 1;
                if !data(&mut c, rng, &format!("{id}.{msg}"), &mut out).await {
                    return out;
                }
            }
            Reply::Code(221) => return out,
            Reply::Code(_) => {}
        }
    }
    let _ = c.send(b"QUIT\r\n").await;
    out
}

/// Sends a message after 354; false when the session is over.
async fn data(c: &mut Client, rng: &mut StdRng, token: &str, out: &mut Outcome) -> bool {
    let mut wire = Vec::new();
    for l in body(rng, token) {
        if l.starts_with(b".") {
            wire.push(b'.');
        }
        wire.extend_from_slice(&l);
        wire.extend_from_slice(b"\r\n");
    }
    let fault = rng.gen_range(0..10);
    match fault {
        // A bare LF or bare CR somewhere in the data.
        0 => wire.extend_from_slice(b"smuggle\n.\nMAIL FROM:<e@x>\r\n"),
        1 => wire.extend_from_slice(b"smuggle\r.\rMAIL FROM:<e@x>\r\n"),
        // Vanish before the end.
        2 => {
            let _ = c.send(&wire).await;
            out.not_acked.insert(token.to_string());
            return false;
        }
        _ => {}
    }
    wire.extend_from_slice(b".\r\n");
    if !c.send(&wire).await {
        out.not_acked.insert(token.to_string());
        return false;
    }
    match c.reply().await {
        Reply::Code(250) => {
            assert!(fault > 1, "bare CR/LF in data was accepted ({token})");
            out.acked.insert(token.to_string());
            true
        }
        Reply::Code(code) => {
            assert!(code >= 400, "final reply {code}");
            out.not_acked.insert(token.to_string());
            code != 554 || fault > 1
        }
        Reply::Closed => {
            out.not_acked.insert(token.to_string());
            false
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_sessions_lose_no_acknowledged_mail() {
    let seed: u64 = std::env::var("ROUTE_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    let sessions: usize = std::env::var("ROUTE_FUZZ_SESSIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    println!("ROUTE_FUZZ_SEED={seed} ROUTE_FUZZ_SESSIONS={sessions}");
    eprintln!("ROUTE_FUZZ_SEED={seed} ROUTE_FUZZ_SESSIONS={sessions}");

    let dir = tempfile::tempdir().unwrap();
    let sink = SmtpSink::start();
    let port = free_port();
    std::fs::write(
        dir.path().join("configuration.yml"),
        format!(
            "local-smtp: 127.0.0.1:{port}
remote-smtp: 127.0.0.1:{sink}
managers:
- name: mail
  messages-we-want:
    from: alerts@example.org
  rules:
  - actions: [mailto:ops@example.net]
    filter:
      function: mail.in_subject
      args: [fuzz]
mailgend:
  spool: {spool}
  command-timeout: 5
  max-message-size: 100000
  max-connections-per-client: 0
",
            sink = sink.port(),
            spool = dir.path().join("spool").display()
        ),
    )
    .unwrap();
    let mut route = RouteProcess::start_at(dir.path(), "INFO", WAIT);

    // Four clients at a time, each with its own stream of the seed.
    let mut all = Outcome::default();
    let mut next = 0;
    while next < sessions {
        let mut batch = Vec::new();
        for k in 0..4.min(sessions - next) {
            let id = next + k;
            batch.push(tokio::spawn(async move {
                let mut rng =
                    StdRng::seed_from_u64(seed ^ (id as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
                session(port, &mut rng, id).await
            }));
        }
        next += batch.len();
        for b in batch {
            let o = b
                .await
                .unwrap_or_else(|e| panic!("a session failed (ROUTE_FUZZ_SEED={seed}): {e}"));
            all.acked.extend(o.acked);
            all.not_acked.extend(o.not_acked);
        }
    }
    assert!(
        route.child.try_wait().unwrap().is_none(),
        "the router exited (ROUTE_FUZZ_SEED={seed}):\n{}",
        route.log()
    );

    // Every acknowledged message reached the relay (routed: the ops copy
    // or the original), nothing refused did.
    let deadline = Instant::now() + WAIT;
    let delivered = loop {
        let got: BTreeSet<String> = sink
            .messages()
            .iter()
            .filter_map(|m| {
                m.text()
                    .lines()
                    .find_map(|l| l.strip_prefix("X-Fuzz-Token: ").map(str::to_string))
            })
            .collect();
        if all.acked.is_subset(&got) || Instant::now() > deadline {
            break got;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let lost: Vec<_> = all.acked.difference(&delivered).collect();
    assert!(
        lost.is_empty(),
        "acknowledged but not delivered (ROUTE_FUZZ_SEED={seed}): {lost:?}\n{}",
        route.log()
    );
    let unexpected: Vec<_> = delivered.difference(&all.acked).collect();
    assert!(
        unexpected.is_empty(),
        "delivered but never acknowledged (ROUTE_FUZZ_SEED={seed}): {unexpected:?}"
    );
    let log_text = route.log();
    assert!(!log_text.contains("panicked"), "{log_text}");
    println!(
        "{sessions} sessions: {} messages acknowledged and delivered, {} refused or abandoned",
        all.acked.len(),
        all.not_acked.len()
    );
    assert!(
        all.acked.len() > sessions / 20,
        "the fuzzer hardly ever got a message through"
    );

    // And it still serves a plain client.
    let s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (r, w) = s.into_split();
    let mut c = Client {
        rd: BufReader::new(r),
        wr: w,
    };
    assert!(matches!(c.reply().await, Reply::Code(220)));
    c.send(b"NOOP\r\n").await;
    assert!(matches!(c.reply().await, Reply::Code(250)));
}
