//! The faults a test can make the sink inject.

/// Where in a transaction a fault strikes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The reply to MAIL FROM.
    Mail,
    /// The reply to RCPT TO.
    Rcpt,
    /// The reply to the DATA command (before any data).
    Data,
    /// The reply after the message data (`.`).
    DataEnd,
}

/// The kind of refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// 4xx: try again later.
    Temporary,
    /// 5xx: do not try again.
    Permanent,
}

impl Failure {
    /// The reply code the sink uses for this failure at `stage`:
    /// temporary 451 (MAIL, DATA, end of DATA) or 450 (RCPT); permanent
    /// 550 (MAIL, RCPT) or 554 (DATA, end of DATA).
    pub fn code(self, stage: Stage) -> u16 {
        match (self, stage) {
            (Failure::Temporary, Stage::Rcpt) => 450,
            (Failure::Temporary, _) => 451,
            (Failure::Permanent, Stage::Data | Stage::DataEnd) => 554,
            (Failure::Permanent, _) => 550,
        }
    }

    pub(super) fn reply(self, stage: Stage) -> String {
        let code = self.code(stage);
        let text = match (self, stage) {
            (Failure::Temporary, Stage::Rcpt) => "4.2.0 Mailbox temporarily unavailable",
            (Failure::Temporary, _) => "4.3.0 Temporary local problem",
            (Failure::Permanent, Stage::Rcpt) => "5.1.1 Mailbox unavailable",
            (Failure::Permanent, Stage::Mail) => "5.7.1 Sender refused",
            (Failure::Permanent, Stage::Data | Stage::DataEnd) => "5.6.0 Transaction failed",
        };
        format!("{code} {text} (injected fault)")
    }
}

/// Which transactions a fault applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// The next `n` transactions that reach the fault's stage; then the
    /// sink heals by itself (the fault becomes [`Fault::None`]).
    Next(u32),
    /// Every transaction, until the fault is changed.
    All,
    /// Transactions to this recipient (ASCII case-insensitive): at RCPT only
    /// that recipient is refused; at the end of DATA the whole transaction
    /// fails if it has that recipient. Not valid at [`Stage::Mail`].
    Recipient(String),
}

/// The fault the sink injects (one at a time).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Accept everything.
    None,
    /// Refuse at `stage` with a 4xx/5xx reply (codes: [`Failure::code`]).
    Fail {
        stage: Stage,
        failure: Failure,
        scope: Scope,
    },
    /// Read the whole message, then close the connection without replying:
    /// the client cannot know whether it was delivered. With `deliver` the
    /// sink records it (the server did deliver, the reply got lost), without
    /// it does not.
    DropAfterData { scope: Scope, deliver: bool },
    /// Close the listener and all open connections: connecting is refused
    /// until [`SmtpSink::resume`](super::SmtpSink::resume) (or any other fault) listens again on the
    /// same port.
    RefuseConnections,
    /// Answer `reply` (a whole reply line, e.g. `452 4.5.3 Too many
    /// recipients` or `421 4.3.2 Shutting down`) at `stage`, like
    /// [`Fault::Fail`]; with `close`, close the connection right after it,
    /// as a server does after 421.
    Reply {
        stage: Stage,
        reply: String,
        scope: Scope,
        close: bool,
    },
}

/// A fault's answer at one stage: the reply line, whether it hits the
/// whole transaction (a count or `All` scope) rather than one recipient,
/// and whether the connection closes after it.
pub(super) struct Answer {
    pub(super) reply: String,
    pub(super) whole: bool,
    pub(super) close: bool,
}

/// Whether a fault with `scope` hits a transaction with `recipients`:
/// `Some(whole transaction)`; consumes one use of a `Scope::Next` (`true`
/// in the second place once it is used up).
pub(super) fn scope_hits(scope: &mut Scope, recipients: &[String]) -> Option<(bool, bool)> {
    match scope {
        Scope::All => Some((true, false)),
        Scope::Recipient(r) => recipients
            .iter()
            .any(|x| x.eq_ignore_ascii_case(r))
            .then_some((false, false)),
        Scope::Next(n) => {
            *n = n.saturating_sub(1);
            Some((true, *n == 0))
        }
    }
}
