//! What can go wrong in a send and whose failure it is: the relay's, the
//! mail's, or in doubt (see the module doc of `smtp`).

#[derive(Debug, thiserror::Error)]
pub enum SmtpError {
    #[error("SMTP configuration: {0}")]
    Config(String),
    #[error("invalid envelope address {address:?}: {reason}")]
    Address { address: String, reason: String },
    /// A 4xx reply: the server did not take the mail; try again later.
    /// From [`Outbound::send`](super::Outbound::send): a 4xx to RCPT, about this mail's recipient.
    #[error("temporary SMTP failure: {0}")]
    Temporary(String),
    /// A 5xx reply: the server refuses this mail; retrying as is will not help.
    #[error("permanent SMTP failure: {0}")]
    Permanent(String),
    /// This mail cannot go through this relay at all (found before it was
    /// offered): nothing was handed over.
    #[error("this mail cannot go through this relay: {0}")]
    Unsendable(String),
    /// The relay could not be reached at all: nothing was handed over.
    #[error("SMTP relay unreachable: {0}")]
    Unreachable(String),
    /// The relay answered 421, another 4xx outside RCPT, or the connection
    /// broke before the end of the data was written (from
    /// [`Outbound::send`](super::Outbound::send)): nothing was handed over.
    #[error("SMTP relay not taking mail now (nothing was handed over): {0}")]
    RelayUnavailable(String),
    /// The relay refused the session itself (5xx to the greeting, EHLO or
    /// AUTH; from [`Outbound::send`](super::Outbound::send)): nothing was handed over.
    #[error("SMTP relay refused the session: {0}")]
    RelayRefused(String),
    /// No reply we can trust (connection lost, timeout, TLS error): the mail
    /// may or may not have been accepted. Also try again later.
    #[error("SMTP connection failure: {0}")]
    Connection(String),
}

impl SmtpError {
    /// Worth trying again later (4xx or a connection problem).
    pub fn is_temporary(&self) -> bool {
        matches!(
            self,
            SmtpError::Temporary(_)
                | SmtpError::Unreachable(_)
                | SmtpError::RelayUnavailable(_)
                | SmtpError::Connection(_)
        )
    }

    /// The server may have accepted the mail although we saw no success.
    pub fn delivery_unknown(&self) -> bool {
        matches!(self, SmtpError::Connection(_))
    }

    /// A failure of the relay (or of our settings for it), not of one mail:
    /// the mails after it would fail the same way, so a batch stops.
    pub fn is_relay_failure(&self) -> bool {
        matches!(
            self,
            SmtpError::Config(_)
                | SmtpError::Unreachable(_)
                | SmtpError::RelayUnavailable(_)
                | SmtpError::RelayRefused(_)
                | SmtpError::Connection(_)
        )
    }
}

/// The step of a transaction a failure happened in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    Mail,
    Rcpt,
    Data,
    /// Writing the message and its final dot, then awaiting the reply.
    Dot,
}

/// A failure of [`Outbound::send`](super::Outbound::send) at `step`; `write_unfinished`: the
/// socket's last write had not completed, so the final dot cannot have
/// reached the relay.
pub(super) fn classify_step(
    e: &lettre::transport::smtp::Error,
    step: Step,
    write_unfinished: bool,
) -> SmtpError {
    let text = error_chain(e);
    match e.status().map(u16::from) {
        // "Service not available, closing transmission channel".
        Some(421) => SmtpError::RelayUnavailable(text),
        Some(code) if code >= 500 => SmtpError::Permanent(text),
        // 450 mailbox busy, 451 greylisting, 452 too many recipients: about
        // this recipient. Not so when the enhanced code says the mail
        // system itself is in trouble (4.3.x, e.g. 452 4.3.1 storage).
        Some(_) if step == Step::Rcpt && !enhanced_class(e, "4.3.") => SmtpError::Temporary(text),
        // At MAIL, DATA or after the data, a 4xx is about the server
        // (RFC 5321 4.3.2: local error, insufficient storage).
        Some(_) => SmtpError::RelayUnavailable(text),
        // No reply: a lost connection or garbage. Only once the final dot
        // was written may the relay have taken the mail.
        None if step == Step::Dot && !write_unfinished => SmtpError::Connection(text),
        None => SmtpError::RelayUnavailable(text),
    }
}

/// The reply's enhanced status code (RFC 3463) starts with `prefix`.
pub(super) fn enhanced_class(e: &lettre::transport::smtp::Error, prefix: &str) -> bool {
    use std::error::Error as _;
    e.source()
        .is_some_and(|text| text.to_string().trim_start().starts_with(prefix))
}

/// A failure while sending a mail.
pub(super) fn classify(e: &lettre::transport::smtp::Error) -> SmtpError {
    if e.is_permanent() {
        SmtpError::Permanent(error_chain(e))
    } else if e.is_transient() {
        SmtpError::Temporary(error_chain(e))
    } else {
        SmtpError::Connection(error_chain(e))
    }
}

/// A failure while setting up a connection: nothing was handed over yet.
pub(super) fn classify_setup(e: &lettre::transport::smtp::Error) -> SmtpError {
    if e.is_permanent() {
        SmtpError::Permanent(error_chain(e))
    } else {
        SmtpError::Unreachable(error_chain(e))
    }
}

/// lettre's Display hides the server's text behind `source()`; operators
/// need the reply to act on it.
pub(super) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        let t = inner.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = inner.source();
    }
    s
}
