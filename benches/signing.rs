//! Signing throughput: what one signed mail costs against one raw RSA-3072
//! signature (`cargo bench --bench signing`).
//!
//! The issue's budget is CPU per signed mail within 1.5x of one raw
//! RSA-3072 PKCS#1 signature. Cases, each on 1 and 2 threads:
//!
//! - `raw-openssl`: an OpenSSL RSA-3072 key (with CRT, as OpenSSL generates
//!   it) signing a SHA-256 digest through one reused `EVP_PKEY_CTX` per
//!   thread, like `openssl speed rsa3072`: the floor.
//! - `raw-openssl-ctx-per-call`: the same with a fresh context per
//!   signature, which is what the fast path does.
//! - `raw-aws-lc`: an AWS-LC RSA-3072 key signing the same digest, what
//!   mailgend's RSA signer uses for SHA-2 (AVX-512 IFMA where the CPU has
//!   it).
//! - `sequoia-keypair-stream`: stock sequoia, the committed test key as a
//!   `KeyPair`, sequoia's streaming `Signer` (detached, armoured).
//! - `mailgend-sign-detached`: `mailgend::notify::signature::Signer::sign_detached`
//!   with the committed key: SHA-256 over the message, packet, armour.
//!
//! The message is a ~6 KB mail body. `BENCH_RUNS` rounds (default 5) run
//! every case once for `BENCH_SECS` seconds (default 1.5), back to back, so
//! that other load on the machine disturbs all cases alike. A line shows
//! the median (min..max) signatures per second of wall time and the median
//! thread CPU time per signature (`CLOCK_THREAD_CPUTIME_ID`: a busy machine
//! lowers the rate but hardly the CPU per signature); the ratios are
//! medians of the per-round ratios. `BENCH_ONLY=<part of a case name>` runs
//! only the matching cases, e.g. under `perf record`.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use mailgend::notify::signature::{SignBackend, Signer};
use openssl::hash::{hash, MessageDigest};
use openssl::pkey::{PKey, Private};
use openssl::pkey_ctx::PkeyCtx;
use openssl::rsa::{Padding, Rsa};
use sequoia_openpgp as openpgp;

use openpgp::crypto::KeyPair;
use openpgp::parse::Parse;
use openpgp::serialize::stream::{Armorer, Message, Signer as StreamSigner};
use openpgp::types::HashAlgorithm;

/// CPU time the calling thread has used.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec we pass.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// One timed run: signatures done, wall time, summed thread CPU time.
struct Run {
    ops: u64,
    wall: Duration,
    cpu: Duration,
}

/// Runs `op` on `threads` threads for `secs` seconds. `make` builds each
/// thread's state (outside the timing), `op` makes one signature.
fn run<S, M, O>(threads: usize, secs: f64, make: &M, op: &O) -> Run
where
    M: Fn() -> S + Sync,
    O: Fn(&mut S) + Sync,
{
    let barrier = std::sync::Barrier::new(threads + 1);
    let limit = Duration::from_secs_f64(secs);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let barrier = &barrier;
                scope.spawn(move || {
                    let mut state = make();
                    // One untimed signature: lazy set-up (blinding, caches).
                    op(&mut state);
                    barrier.wait();
                    let cpu0 = thread_cpu();
                    let t0 = Instant::now();
                    let mut ops = 0u64;
                    while t0.elapsed() < limit {
                        op(&mut state);
                        ops += 1;
                    }
                    (ops, thread_cpu() - cpu0)
                })
            })
            .collect();
        barrier.wait();
        let t0 = Instant::now();
        let mut total = Run {
            ops: 0,
            wall: Duration::ZERO,
            cpu: Duration::ZERO,
        };
        for h in handles {
            let (ops, cpu) = h.join().expect("bench thread");
            total.ops += ops;
            total.cpu += cpu;
        }
        total.wall = t0.elapsed();
        total
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// A benchmark case: name and a closure doing one timed run on the given
/// number of threads for the given seconds.
type Case<'a> = (&'static str, Box<dyn Fn(usize, f64) -> Run + 'a>);

/// Wraps per-thread set-up `make` and one signature `op` into a [`Case`].
fn case<'a, S, M, O>(name: &'static str, make: M, op: O) -> Case<'a>
where
    M: Fn() -> S + Sync + 'a,
    O: Fn(&mut S) + Sync + 'a,
{
    (
        name,
        Box::new(move |threads, secs| run(threads, secs, &make, &op)),
    )
}

/// Runs `cases` interleaved (`runs` rounds, each case once per round, so a
/// change in background load hits all cases alike), prints one line per
/// case and returns the per-round CPU ms per signature of each case.
fn measure(cases: &[Case<'_>], threads: usize, runs: usize, secs: f64) -> Vec<Vec<f64>> {
    let mut rates = vec![Vec::with_capacity(runs); cases.len()];
    let mut cpus = vec![Vec::with_capacity(runs); cases.len()];
    for _ in 0..runs {
        for (i, (_, f)) in cases.iter().enumerate() {
            let r = f(threads, secs);
            rates[i].push(r.ops as f64 / r.wall.as_secs_f64());
            cpus[i].push(r.cpu.as_secs_f64() * 1e3 / r.ops as f64);
        }
    }
    for (i, (name, _)) in cases.iter().enumerate() {
        let lo = rates[i].iter().copied().fold(f64::INFINITY, f64::min);
        let hi = rates[i].iter().copied().fold(0.0, f64::max);
        println!(
            "{name:<26} threads={threads}  {:>7.1} sig/s  ({lo:.1}..{hi:.1})  cpu/sig {:.3} ms",
            median(rates[i].clone()),
            median(cpus[i].clone())
        );
    }
    cpus
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A mail-sized message: ~6 KB of CRLF text like a notification with a
/// CSV attachment.
fn message() -> Vec<u8> {
    let mut m = b"Content-Type: multipart/mixed; boundary=\"===b===\"\r\n\r\n".to_vec();
    let mut i = 0;
    while m.len() < 6 * 1024 {
        writeln!(
            m,
            "\"192.0.2.{}\",\"2024-05-02T10:{:02}:00+00:00\",\"open-resolver\",\"AS64496\"\r",
            i % 256,
            i % 60
        )
        .unwrap();
        i += 1;
    }
    m
}

/// Stock sequoia: the streaming signer, detached and armoured.
fn stream_sign(keypair: &KeyPair, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1024);
    let m = Message::new(&mut out);
    let m = Armorer::new(m)
        .kind(openpgp::armor::Kind::Signature)
        .build()
        .unwrap();
    let mut s = StreamSigner::new(m, keypair.clone())
        .unwrap()
        .hash_algo(HashAlgorithm::SHA256)
        .unwrap()
        .detached()
        .build()
        .unwrap();
    s.write_all(data).unwrap();
    s.finalize().unwrap();
    out
}

/// A reused RSA signing context, as `openssl speed` uses.
fn raw_ctx(pkey: &PKey<Private>) -> PkeyCtx<Private> {
    let mut ctx = PkeyCtx::new(pkey).unwrap();
    ctx.sign_init().unwrap();
    ctx.set_rsa_padding(Padding::PKCS1).unwrap();
    ctx.set_signature_md(openssl::md::Md::sha256()).unwrap();
    ctx
}

fn main() {
    let runs: usize = env_or("BENCH_RUNS", 5);
    let secs: f64 = env_or("BENCH_SECS", 1.5);
    let keyfile =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/keys/test-signing.sec.asc");

    let signer = Signer::from_key_file(&keyfile, None).expect("test key");
    assert_eq!(signer.backend(), SignBackend::AwsLcRsaCrt);
    let cert = openpgp::Cert::from_file(&keyfile).unwrap();
    let keypair = cert
        .primary_key()
        .key()
        .clone()
        .parts_into_secret()
        .unwrap()
        .into_keypair()
        .unwrap();
    let pkey = PKey::from_rsa(Rsa::generate(3072).unwrap()).unwrap();
    let msg = message();
    let digest = hash(MessageDigest::sha256(), &msg).unwrap();
    let sig_buf = vec![0u8; pkey.size()];
    let lc_key = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa3072).unwrap();
    let lc_digest =
        aws_lc_rs::digest::Digest::import_less_safe(&digest, &aws_lc_rs::digest::SHA256).unwrap();

    println!(
        "signing bench: {} byte message, RSA-3072, SHA-256, {runs} rounds x {secs} s, medians",
        msg.len()
    );
    let mut cases = vec![
        case(
            "raw-openssl",
            || (raw_ctx(&pkey), sig_buf.clone()),
            |(ctx, buf)| {
                ctx.sign(&digest, Some(buf)).unwrap();
            },
        ),
        case(
            "raw-openssl-ctx-per-call",
            || sig_buf.clone(),
            |buf| {
                raw_ctx(&pkey).sign(&digest, Some(buf)).unwrap();
            },
        ),
        case(
            "raw-aws-lc",
            || sig_buf.clone(),
            |buf| {
                lc_key
                    .sign_digest(&aws_lc_rs::signature::RSA_PKCS1_SHA256, &lc_digest, buf)
                    .unwrap();
            },
        ),
        case(
            "sequoia-keypair-stream",
            || (),
            |_| {
                std::hint::black_box(stream_sign(&keypair, &msg));
            },
        ),
        case(
            "mailgend-sign-detached",
            || (),
            |_| {
                std::hint::black_box(signer.sign_detached(&msg).unwrap());
            },
        ),
    ];
    // BENCH_ONLY=<part of a name> keeps just the matching cases.
    if let Ok(only) = std::env::var("BENCH_ONLY") {
        cases.retain(|(name, _)| name.contains(&only));
    }
    let index = |name: &str| cases.iter().position(|(n, _)| *n == name);
    // Median of the per-round ratios a/b of two cases' CPU per signature.
    let paired = |cpus: &[Vec<f64>], a: usize, b: usize| {
        median(cpus[a].iter().zip(&cpus[b]).map(|(x, y)| x / y).collect())
    };
    for threads in [1, 2] {
        let cpus = measure(&cases, threads, runs, secs);
        let fast = index("mailgend-sign-detached");
        if let (Some(raw), Some(fast)) = (index("raw-openssl"), fast) {
            println!(
                "ratio threads={threads}: cpu per signed mail / one raw RSA-3072 signature = \
                 {:.3} (budget 1.5)",
                paired(&cpus, fast, raw)
            );
        }
        if let (Some(raw), Some(fast)) = (index("raw-aws-lc"), fast) {
            println!(
                "ratio threads={threads}: cpu per signed mail / one raw AWS-LC RSA-3072 \
                 signature = {:.3}",
                paired(&cpus, fast, raw)
            );
        }
        if let (Some(stock), Some(fast)) = (index("sequoia-keypair-stream"), fast) {
            println!(
                "ratio threads={threads}: cpu per signature, stock sequoia / mailgend = {:.2}",
                paired(&cpus, stock, fast)
            );
        }
    }
    println!("(ratios: median of per-round ratios, the cases of a round ran back to back)");
}
