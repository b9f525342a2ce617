//! A raw SMTP client for the router tests: exact bytes on the wire, one
//! (possibly multi-line) reply at a time, nothing done behind the test's
//! back. Included with `#[path]` by the tests that talk to `mailgend route`;
//! each uses part of it.
#![allow(dead_code)]

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};

/// One SMTP session.
pub struct Raw {
    pub rd: BufReader<OwnedReadHalf>,
    pub wr: OwnedWriteHalf,
    /// How long one reply may take.
    wait: Duration,
}

impl Raw {
    /// Connects to the router on loopback; returns the session and the
    /// greeting.
    pub async fn connect(port: u16) -> (Raw, String) {
        Raw::from_stream(TcpStream::connect(("127.0.0.1", port)).await.unwrap()).await
    }

    /// [`Raw::connect`] from a chosen loopback address (per-client limits).
    pub async fn connect_from(port: u16, ip: &str) -> (Raw, String) {
        let sock = TcpSocket::new_v4().unwrap();
        sock.bind(format!("{ip}:0").parse().unwrap()).unwrap();
        let s = sock
            .connect(format!("127.0.0.1:{port}").parse().unwrap())
            .await
            .unwrap();
        Raw::from_stream(s).await
    }

    async fn from_stream(s: TcpStream) -> (Raw, String) {
        let mut raw = Raw::new(s);
        let greeting = raw.reply().await;
        (raw, greeting)
    }

    /// A session on a connected stream whose greeting is still unread.
    pub fn new(s: TcpStream) -> Raw {
        let (r, w) = s.into_split();
        Raw {
            rd: BufReader::new(r),
            wr: w,
            wait: Duration::from_secs(20),
        }
    }

    /// One (possibly multi-line) reply; empty at EOF.
    pub async fn reply(&mut self) -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(self.wait, self.rd.read_line(&mut line))
                .await
                .expect("a reply in time")
                .unwrap_or(0);
            if n == 0 {
                return all;
            }
            all.push_str(&line);
            if line.len() < 4 || line.as_bytes()[3] != b'-' {
                return all;
            }
        }
    }

    /// Writes the bytes; a server that hung up shows in the next reply.
    pub async fn send(&mut self, bytes: &[u8]) {
        let _ = self.wr.write_all(bytes).await;
    }

    pub async fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes()).await;
        self.reply().await
    }

    /// EHLO, then [`Raw::transaction`].
    pub async fn mail(&mut self, from: &str, to: &[&str], data: &[u8]) -> String {
        assert_eq!(code(&self.cmd("EHLO raw.test").await), "250");
        self.transaction(from, to, data).await
    }

    /// MAIL, RCPT…, DATA, the bytes, `.`: the final reply (after EHLO).
    pub async fn transaction(&mut self, from: &str, to: &[&str], data: &[u8]) -> String {
        assert_eq!(code(&self.cmd(&format!("MAIL FROM:<{from}>")).await), "250");
        for t in to {
            assert_eq!(code(&self.cmd(&format!("RCPT TO:<{t}>")).await), "250");
        }
        assert_eq!(code(&self.cmd("DATA").await), "354");
        self.send(data).await;
        self.send(b".\r\n").await;
        self.reply().await
    }
}

/// The reply code (first three characters).
pub fn code(reply: &str) -> &str {
    &reply[..3.min(reply.len())]
}

/// A loopback port free at the time of asking.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
