//! Sending: one mail with per-transaction classification of failures
//! ([`Outbound::send`], the notifier), and one mail with a result per
//! recipient ([`Outbound::send_each`], the router).

use super::*;

impl Outbound {
    /// Sends one finished message. `Ok` means the relay accepted it (250
    /// after DATA), with the envelope recipients it refused at RCPT while
    /// taking others (as Python's `smtplib.sendmail`, which the old tool
    /// used, it goes to the accepted ones). The error says whose failure it
    /// was and whether the mail may have been handed over (see the module
    /// documentation).
    pub async fn send(
        &self,
        from: &str,
        to: &[String],
        message: &[u8],
    ) -> Result<Vec<RefusedRecipient>, SmtpError> {
        use lettre::transport::smtp::commands::{Data, Mail, Rcpt, Rset};
        use lettre::transport::smtp::extension::{Extension, MailBodyParameter, MailParameter};

        let from = parse_address(from)?;
        let to = to
            .iter()
            .map(|a| parse_address(a))
            .collect::<Result<Vec<_>, _>>()?;
        let envelope = Envelope::new(Some(from), to).map_err(|e| SmtpError::Address {
            address: String::new(),
            reason: e.to_string(),
        })?;
        // lettre always appends CRLF.CRLF; without this the recipient would
        // get one more empty line than the message has (Python's smtplib,
        // which the old tool used, sends the bytes unchanged).
        let message = message.strip_suffix(b"\r\n").unwrap_or(message);
        // The session, not this mail, failed here.
        let mut conn = self.checkout().await.map_err(|e| match e {
            SmtpError::Permanent(why) => SmtpError::RelayRefused(why),
            other => other,
        })?;

        // What the relay announced rules some mails out before they are
        // offered (lettre's own `send` checks the first two the same way).
        let info = conn.smtp.server_info();
        let utf8 = envelope
            .from()
            .into_iter()
            .chain(envelope.to())
            .any(|a| !AsRef::<str>::as_ref(a).is_ascii());
        let eight_bit = !message.is_ascii();
        // SIZE counts the message with its final CRLF.
        let octets = message.len() + 2;
        let unsendable = if utf8 && !info.supports_feature(Extension::SmtpUtfEight) {
            Some(format!(
                "an envelope address is not ASCII ({}) and {} does not offer SMTPUTF8",
                envelope_text(&envelope),
                self.inner.relay
            ))
        } else if eight_bit && !info.supports_feature(Extension::EightBitMime) {
            Some(format!(
                "the message has 8-bit data and {} does not offer 8BITMIME",
                self.inner.relay
            ))
        } else if let Some(Some(limit)) = conn.size.filter(|l| l.is_some_and(|l| octets > l)) {
            Some(format!(
                "the message is {octets} bytes, over the SIZE limit of {limit} that {} announced",
                self.inner.relay
            ))
        } else {
            self.inner
                .max_message_size
                .filter(|m| octets > *m)
                .map(|max| {
                    format!("the message is {octets} bytes, over smtp.max_message_size ({max})")
                })
        };
        if let Some(why) = unsendable {
            self.put_back(conn);
            return Err(SmtpError::Unsendable(why));
        }

        let mut step = Step::Mail;
        let work = async {
            let mut params = Vec::new();
            if utf8 {
                params.push(MailParameter::SmtpUtfEight);
            }
            if eight_bit {
                params.push(MailParameter::Body(MailBodyParameter::EightBitMime));
            }
            if conn.size.is_some() {
                params.push(MailParameter::Size(octets));
            }
            conn.smtp
                .command(Mail::new(envelope.from().cloned(), params))
                .await
                .map_err(|e| classify_step(&e, Step::Mail, false))?;
            step = Step::Rcpt;
            let mut refused: Vec<RefusedRecipient> = Vec::new();
            for address in envelope.to() {
                if let Err(e) = conn.smtp.command(Rcpt::new(address.clone(), vec![])).await {
                    match classify_step(&e, Step::Rcpt, false) {
                        e @ (SmtpError::Permanent(_) | SmtpError::Temporary(_)) => {
                            refused.push(RefusedRecipient {
                                address: address.to_string(),
                                error: e,
                            })
                        }
                        other => return Err(other),
                    }
                }
            }
            if refused.len() == envelope.to().len() {
                // Nobody takes it: a 4xx among the refusals makes the whole
                // mail worth another try.
                let pick = refused
                    .iter()
                    .position(|r| matches!(r.error, SmtpError::Temporary(_)))
                    .unwrap_or(0);
                return Err(refused.swap_remove(pick).error);
            }
            step = Step::Data;
            conn.smtp
                .command(Data)
                .await
                .map_err(|e| classify_step(&e, Step::Data, false))?;
            step = Step::Dot;
            conn.smtp
                .message(message)
                .await
                .map_err(|e| classify_step(&e, Step::Dot, conn.io.write_unfinished()))?;
            Ok(refused)
        };
        let result = tokio::time::timeout(self.inner.timeout, work).await;
        let err = match result {
            Ok(Ok(refused)) => {
                self.put_back(conn);
                return Ok(refused);
            }
            Ok(Err(e)) => e,
            Err(_) => {
                let why = format!(
                    "{}: no answer within {:?}",
                    self.inner.relay, self.inner.timeout
                );
                if step == Step::Dot && !conn.io.write_unfinished() {
                    SmtpError::Connection(why)
                } else {
                    SmtpError::RelayUnavailable(why)
                }
            }
        };
        // After a refusal of this mail the session is fine: a refusal at
        // the end of the data ends the transaction, an earlier one is
        // undone by RSET. Keeping the connection keeps the next mail from
        // paying for a new one.
        let reusable = match (&err, step) {
            (SmtpError::Permanent(_) | SmtpError::Temporary(_), Step::Dot) => true,
            (SmtpError::Permanent(_) | SmtpError::Temporary(_), _) => matches!(
                tokio::time::timeout(self.inner.timeout, conn.smtp.command(Rset)).await,
                Ok(Ok(_))
            ),
            _ => false,
        };
        if reusable {
            self.put_back(conn);
        } else {
            self.discard(conn).await;
        }
        Err(err)
    }
}

/// The smaller of two optional limits.
pub(super) fn min_limit(a: Option<usize>, b: Option<usize>) -> Option<usize> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// An envelope recipient the relay refused at RCPT while it took the mail
/// for others.
#[derive(Debug)]
pub struct RefusedRecipient {
    pub address: String,
    /// [`SmtpError::Permanent`] or [`SmtpError::Temporary`].
    pub error: SmtpError,
}

/// The envelope's addresses, for messages.
pub(super) fn envelope_text(envelope: &Envelope) -> String {
    envelope
        .from()
        .into_iter()
        .chain(envelope.to())
        .filter(|a| !AsRef::<str>::as_ref(*a).is_ascii())
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// One recipient's answer within a [`Outbound::send_each`] transaction.
pub type RecipientResult = Result<(), SmtpError>;

impl Outbound {
    /// Sends one message in one transaction and reports per recipient
    /// (the alert router records which recipients have the message, so a
    /// retry never sends it twice to one that accepted it). `from == None`
    /// is the null sender `<>`, for bounces.
    ///
    /// `Err`: nobody got the message (MAIL or DATA refused, the relay
    /// unreachable, the connection lost). `Ok(results)`: one entry per
    /// recipient, in order; the message was accepted for every `Ok` entry
    /// (or for none, when every RCPT was refused).
    pub async fn send_each(
        &self,
        from: Option<&str>,
        to: &[String],
        message: &[u8],
    ) -> Result<Vec<RecipientResult>, SmtpError> {
        use lettre::transport::smtp::commands::{Data, Mail, Rcpt, Rset};
        use lettre::transport::smtp::extension::{Extension, MailBodyParameter, MailParameter};

        let from = from.map(parse_address).transpose()?;
        let to = to
            .iter()
            .map(|a| RcptAddress::parse(a))
            .collect::<Result<Vec<_>, _>>()?;
        // lettre appends CRLF.CRLF itself (see `send`).
        let message = message.strip_suffix(b"\r\n").unwrap_or(message);
        let mut pooled = self.checkout().await?;
        let conn = &mut pooled.smtp;
        let work = async {
            let mut params = Vec::new();
            if !message.is_ascii() && conn.server_info().supports_feature(Extension::EightBitMime) {
                params.push(MailParameter::Body(MailBodyParameter::EightBitMime));
            }
            conn.command(Mail::new(from, params))
                .await
                .map_err(|e| classify(&e))?;
            let mut results = Vec::with_capacity(to.len());
            for address in to {
                let sent = match address {
                    RcptAddress::Full(a) => conn.command(Rcpt::new(a, vec![])).await,
                    RcptAddress::Bare(local) => {
                        conn.command(format!("RCPT TO:<{local}>\r\n")).await
                    }
                };
                match sent {
                    Ok(_) => results.push(Ok(())),
                    Err(e) => {
                        let e = classify(&e);
                        if let SmtpError::Connection(_) = e {
                            return Err(e);
                        }
                        results.push(Err(e));
                    }
                }
            }
            if results.iter().all(Result::is_err) {
                conn.command(Rset).await.map_err(|e| classify(&e))?;
                return Ok(results);
            }
            conn.command(Data).await.map_err(|e| classify(&e))?;
            conn.message(message).await.map_err(|e| classify(&e))?;
            Ok(results)
        };
        match tokio::time::timeout(self.inner.timeout, work).await {
            Ok(Ok(results)) => {
                self.put_back(pooled);
                Ok(results)
            }
            Ok(Err(e)) => {
                self.discard(pooled).await;
                Err(e)
            }
            Err(_) => {
                self.discard(pooled).await;
                Err(SmtpError::Connection(format!(
                    "{}: no answer within {:?}",
                    self.inner.relay, self.inner.timeout
                )))
            }
        }
    }
}

/// A recipient for `send_each`: an address, or a bare local part
/// (the router's `mailto:ops`, which mail2alert handed to the relay as it
/// was, for the relay to qualify).
pub(super) enum RcptAddress {
    Full(Address),
    Bare(String),
}

impl RcptAddress {
    pub(super) fn parse(a: &str) -> Result<RcptAddress, SmtpError> {
        let atom = |c: char| c.is_ascii_alphanumeric() || "!#$&'*+-/=^_`{|}~.".contains(c);
        if !a.contains('@') && !a.is_empty() && a.len() <= 64 && a.chars().all(atom) {
            return Ok(RcptAddress::Bare(a.to_string()));
        }
        parse_address(a).map(RcptAddress::Full)
    }
}

pub(super) fn parse_address(a: &str) -> Result<Address, SmtpError> {
    a.parse::<Address>().map_err(|e| SmtpError::Address {
        address: a.to_string(),
        reason: e.to_string(),
    })
}
