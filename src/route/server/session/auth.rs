//! AUTH PLAIN and LOGIN (RFC 4954) within a session: the exchange, the
//! per-address budget and the growing delay after failures.

use super::*;

impl Session {
    pub(super) async fn auth(
        &mut self,
        mechanism: &str,
        initial: Option<String>,
    ) -> io::Result<Next> {
        let Some(creds) = self.cfg.settings.auth.clone() else {
            self.reply("502 5.5.1 AUTH not offered");
            return Ok(Next::Continue);
        };
        if !self.auth_offered() {
            self.reply("538 5.7.11 Encryption required for requested authentication mechanism");
            return Ok(Next::Continue);
        }
        if self.authed {
            self.reply("503 5.5.1 Already authenticated");
            return Ok(Next::Continue);
        }
        if self.txn.is_some() || self.helo.is_none() {
            self.reply("503 5.5.1 AUTH only after EHLO and outside a mail transaction");
            return Ok(Next::Continue);
        }
        let settings = &self.cfg.settings;
        // Counted before the exchange: sessions in parallel share one
        // budget per address (see clients.rs).
        let attempt = match self.clients.auth_attempt(
            self.peer.ip(),
            settings.auth_failure_limit,
            settings.auth_failure_window,
        ) {
            Ok(a) => a,
            Err(left) => {
                static WARN: WarnLimiter = WarnLimiter::new(std::time::Duration::from_secs(60));
                if let Some(held_back) = WARN.allow() {
                    warn!(
                        peer = %self.peer,
                        held_back,
                        "AUTH refused: auth-failure-limit failed attempts from this address \
                         (at most one such WARN a minute; held_back counts the others)"
                    );
                }
                self.cfg.metrics.auth_refused();
                self.reply(&format!(
                    "421 4.7.0 {} Too many failed authentications from your address, try again in {}s",
                    self.cfg.hostname,
                    left.as_secs().max(1)
                ));
                return Ok(Next::Close);
            }
        };
        let (user, pass) = match mechanism {
            "PLAIN" => {
                let response = match initial {
                    Some(r) => r,
                    None => match self.challenge("").await? {
                        Challenge::Answer(r) => r,
                        c => return Ok(self.abandon(c)),
                    },
                };
                let Some(raw) = decode(&response) else {
                    self.reply("501 5.5.2 Cannot decode AUTH response");
                    return Ok(Next::Continue);
                };
                // authzid NUL authcid NUL passwd
                let mut parts = raw.split(|&b| b == 0);
                match (parts.next(), parts.next(), parts.next(), parts.next()) {
                    (Some(_), Some(u), Some(p), None) => (u.to_vec(), p.to_vec()),
                    _ => {
                        self.reply("501 5.5.2 Malformed AUTH PLAIN response");
                        return Ok(Next::Continue);
                    }
                }
            }
            "LOGIN" => {
                let user = match initial {
                    Some(r) => r,
                    // "Username:"
                    None => match self.challenge("VXNlcm5hbWU6").await? {
                        Challenge::Answer(r) => r,
                        c => return Ok(self.abandon(c)),
                    },
                };
                // "Password:"
                let pass = match self.challenge("UGFzc3dvcmQ6").await? {
                    Challenge::Answer(r) => r,
                    c => return Ok(self.abandon(c)),
                };
                match (decode(&user), decode(&pass)) {
                    (Some(u), Some(p)) => (u, p),
                    _ => {
                        self.reply("501 5.5.2 Cannot decode AUTH response");
                        return Ok(Next::Continue);
                    }
                }
            }
            _ => {
                self.reply("504 5.5.4 Unrecognized authentication type");
                return Ok(Next::Continue);
            }
        };
        if user == creds.username.as_bytes() && same(&pass, creds.password.as_bytes()) {
            attempt.succeeded();
            self.authed = true;
            self.reply("235 2.7.0 Authentication successful");
            return Ok(Next::Continue);
        }
        drop(attempt);
        self.auth_failures += 1;
        self.cfg.metrics.auth_failed();
        warn!(
            peer = %self.peer,
            user = %printable(&String::from_utf8_lossy(&user), 64),
            "SMTP authentication failed"
        );
        // Each failure costs more time (Postfix's smtpd_error_sleep_time):
        // guessing is slow even within the budget.
        let delay = self.cfg.settings.auth_failure_delay * self.auth_failures;
        self.flush().await?;
        tokio::time::sleep(delay).await;
        self.reply("535 5.7.8 Authentication credentials invalid");
        if self.auth_failures >= MAX_AUTH_FAILURES {
            self.reply("421 4.7.0 Too many authentication failures");
            return Ok(Next::Close);
        }
        Ok(Next::Continue)
    }

    /// Sends a `334` challenge and reads the client's answer. A `*`
    /// cancels (RFC 4954 §4).
    async fn challenge(&mut self, text: &str) -> io::Result<Challenge> {
        self.reply(&format!("334 {text}"));
        self.flush().await?;
        match self.next_line(MAX_COMMAND_LINE).await? {
            Incoming::Line(l) => {
                let l = String::from_utf8_lossy(&l).trim_end().to_string();
                if l == "*" {
                    // Cancelling is not a protocol error: go on serving.
                    return Ok(Challenge::Cancelled);
                }
                Ok(Challenge::Answer(l))
            }
            Incoming::TooLong => {
                self.reply("500 5.5.6 Authentication exchange line is too long");
                Ok(Challenge::Refused)
            }
            Incoming::Timeout => {
                self.reply("421 4.4.2 Timeout, closing connection");
                Ok(Challenge::End)
            }
            Incoming::Eof | Incoming::Stop => Ok(Challenge::End),
        }
    }
}

/// The client's answer to a `334` challenge.
enum Challenge {
    Answer(String),
    /// `*`: the exchange ends, the session not.
    Cancelled,
    /// An answer too long to read (already replied to); the session goes on.
    Refused,
    /// The session ends (timeout, EOF, shutdown).
    End,
}

impl Session {
    fn abandon(&mut self, c: Challenge) -> Next {
        match c {
            Challenge::Cancelled => {
                self.reply("501 5.7.0 Authentication cancelled");
                Next::Continue
            }
            Challenge::Refused => Next::Continue,
            _ => Next::Close,
        }
    }
}

/// Base64 of an AUTH response (`=` is the empty initial response).
fn decode(s: &str) -> Option<Vec<u8>> {
    if s == "=" {
        return Some(Vec::new());
    }
    base64::engine::general_purpose::STANDARD.decode(s).ok()
}

/// Compares without an early exit, so timing does not tell how much of a
/// guessed password was right.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_comparison() {
        assert!(same(b"secret", b"secret"));
        assert!(!same(b"secret", b"secreT"));
        assert!(!same(b"secret", b"secret2"));
        assert_eq!(decode("="), Some(vec![]));
        assert_eq!(decode("AGEAYg==").unwrap(), b"\0a\0b");
        assert_eq!(decode("!!"), None);
    }
}
