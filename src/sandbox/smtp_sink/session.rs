//! One client's SMTP session: commands, replies, the message data.

use super::*;

/// The transaction in progress (after MAIL FROM).
struct Transaction {
    mail_from: String,
    rcpt_to: Vec<String>,
    smtputf8: bool,
    body_8bitmime: bool,
    size: Option<usize>,
    /// This transaction was refused at RCPT by a `Scope::Next`/`All` fault:
    /// its later RCPTs are refused the same way (this reply), without using
    /// up a count.
    rcpt_fault: Option<String>,
}

pub(super) struct Session<'a> {
    id: u64,
    shared: &'a Shared,
    helo: Option<String>,
    txn: Option<Transaction>,
    /// A fault's reply asked to close the connection after it.
    close: bool,
}

/// What the server does after a command.
enum Next {
    Continue,
    ReadData,
    Quit,
}

impl<'a> Session<'a> {
    pub(super) fn new(id: u64, shared: &'a Shared) -> Session<'a> {
        Session {
            id,
            shared,
            helo: None,
            txn: None,
            close: false,
        }
    }

    pub(super) async fn run(mut self, stream: TcpStream) -> io::Result<()> {
        let (rd, wr) = stream.into_split();
        let mut rd = BufReader::new(rd);
        let mut wr = BufWriter::new(wr);
        let host = self.shared.options.hostname.clone();
        reply(&mut wr, &format!("220 {host} ESMTP mailgend sink ready")).await?;
        wr.flush().await?;
        let mut line = Vec::new();
        loop {
            line.clear();
            (&mut rd)
                .take(MAX_COMMAND_LINE)
                .read_until(b'\n', &mut line)
                .await?;
            if line.is_empty() {
                return Ok(()); // EOF
            }
            if !line.ends_with(b"\n") {
                if (line.len() as u64) < MAX_COMMAND_LINE {
                    return Ok(()); // EOF in the middle of a line
                }
                // Skip the rest of the over-long line.
                let mut rest = Vec::new();
                rd.read_until(b'\n', &mut rest).await?;
                reply(&mut wr, "500 5.5.2 Line too long").await?;
            } else {
                match self.command(&line, &mut wr).await? {
                    Next::Continue if self.close => {
                        wr.flush().await?;
                        return Ok(());
                    }
                    Next::Continue => {}
                    Next::Quit => {
                        wr.flush().await?;
                        return Ok(());
                    }
                    Next::ReadData => {
                        wr.flush().await?;
                        let data = read_data(&mut rd, self.shared.options.max_size).await?;
                        if !self.finish_data(data, &mut wr).await? {
                            // Fault: drop the connection without a reply.
                            return Ok(());
                        }
                        if self.close {
                            wr.flush().await?;
                            return Ok(());
                        }
                    }
                }
            }
            // Pipelining: answer a whole batch at once, but never wait for
            // input while replies are still buffered.
            if !rd.buffer().contains(&b'\n') {
                wr.flush().await?;
            }
        }
    }

    async fn command<W: AsyncWrite + Unpin>(&mut self, raw: &[u8], wr: &mut W) -> io::Result<Next> {
        let Ok(line) = std::str::from_utf8(raw) else {
            reply(wr, "500 5.5.2 Syntax error (invalid UTF-8)").await?;
            return Ok(Next::Continue);
        };
        let line = line.trim_end_matches(['\r', '\n']);
        let (verb, args) = match line.split_once(' ') {
            Some((v, a)) => (v, a.trim()),
            None => (line, ""),
        };
        let verb = verb.to_ascii_uppercase();
        let host = &self.shared.options.hostname;
        match verb.as_str() {
            "EHLO" | "HELO" if args.is_empty() => {
                reply(wr, "501 5.5.4 Domain name required").await?;
            }
            "EHLO" => {
                self.helo = Some(args.to_string());
                self.txn = None;
                let max = self.shared.options.max_size;
                let utf8 = if self.shared.options.smtputf8 {
                    "250-SMTPUTF8\r\n"
                } else {
                    ""
                };
                reply(
                    wr,
                    &format!(
                        "250-{host} greets {args}\r\n250-PIPELINING\r\n250-8BITMIME\r\n\
                         {utf8}250-SIZE {max}\r\n250 ENHANCEDSTATUSCODES"
                    ),
                )
                .await?;
            }
            "HELO" => {
                self.helo = Some(args.to_string());
                self.txn = None;
                reply(wr, &format!("250 {host}")).await?;
            }
            "MAIL" => {
                let text = self.mail(args);
                reply(wr, &text).await?;
            }
            "RCPT" => {
                let text = self.rcpt(args);
                reply(wr, &text).await?;
            }
            "DATA" => match &self.txn {
                None => reply(wr, "503 5.5.1 Need MAIL command").await?,
                Some(t) if t.rcpt_to.is_empty() => {
                    reply(wr, "554 5.5.1 No valid recipients").await?
                }
                Some(t) => {
                    if let Some(answer) = self.shared.fire_fail(Stage::Data, &t.rcpt_to) {
                        self.close = answer.close;
                        self.txn = None;
                        reply(wr, &answer.reply).await?;
                        return Ok(Next::Continue);
                    }
                    reply(wr, "354 End data with <CR><LF>.<CR><LF>").await?;
                    return Ok(Next::ReadData);
                }
            },
            "RSET" => {
                self.txn = None;
                reply(wr, "250 2.0.0 Ok").await?;
            }
            "NOOP" => reply(wr, "250 2.0.0 Ok").await?,
            "QUIT" => {
                reply(wr, &format!("221 2.0.0 {host} closing connection")).await?;
                return Ok(Next::Quit);
            }
            "VRFY" => reply(wr, "252 2.5.2 Cannot VRFY user").await?,
            "HELP" => reply(wr, "214 2.0.0 See RFC 5321").await?,
            "STARTTLS" | "AUTH" | "EXPN" | "BDAT" | "ETRN" => {
                reply(wr, "502 5.5.1 Command not implemented").await?
            }
            _ => reply(wr, "500 5.5.2 Command unrecognized").await?,
        }
        Ok(Next::Continue)
    }

    fn mail(&mut self, args: &str) -> String {
        if self.helo.is_none() {
            return "503 5.5.1 Send EHLO/HELO first".into();
        }
        if self.txn.is_some() {
            return "503 5.5.1 Nested MAIL command".into();
        }
        let Some((path, params)) = strip_prefix_ci(args, "FROM:").and_then(parse_path) else {
            return "501 5.5.4 Syntax: MAIL FROM:<address>".into();
        };
        let mut txn = Transaction {
            mail_from: path,
            rcpt_to: Vec::new(),
            smtputf8: false,
            body_8bitmime: false,
            size: None,
            rcpt_fault: None,
        };
        for param in params.split_whitespace() {
            let (key, value) = param.split_once('=').unwrap_or((param, ""));
            match key.to_ascii_uppercase().as_str() {
                "SIZE" => match value.parse::<usize>() {
                    Ok(n) => txn.size = Some(n),
                    Err(_) => return "501 5.5.4 Bad SIZE value".into(),
                },
                "BODY" => match value.to_ascii_uppercase().as_str() {
                    "7BIT" => {}
                    "8BITMIME" => txn.body_8bitmime = true,
                    _ => return "501 5.5.4 Unsupported BODY value".into(),
                },
                "SMTPUTF8" if value.is_empty() && self.shared.options.smtputf8 => {
                    txn.smtputf8 = true
                }
                _ => return format!("555 5.5.4 Unsupported parameter {key}"),
            }
        }
        if !txn.smtputf8 && !txn.mail_from.is_ascii() {
            return "553 5.6.7 Non-ASCII address requires SMTPUTF8".into();
        }
        if txn.size.is_some_and(|n| n > self.shared.options.max_size) {
            return "552 5.3.4 Message size exceeds fixed maximum".into();
        }
        if let Some(answer) = self.shared.fire_fail(Stage::Mail, &[]) {
            self.close = answer.close;
            return answer.reply;
        }
        self.txn = Some(txn);
        "250 2.1.0 Ok".into()
    }

    fn rcpt(&mut self, args: &str) -> String {
        let Some(txn) = self.txn.as_mut() else {
            return "503 5.5.1 Need MAIL command".into();
        };
        let Some((path, params)) = strip_prefix_ci(args, "TO:").and_then(parse_path) else {
            return "501 5.5.4 Syntax: RCPT TO:<address>".into();
        };
        if path.is_empty() {
            return "501 5.1.3 Empty recipient".into();
        }
        if !params.trim().is_empty() {
            return "555 5.5.4 Unsupported RCPT parameter".into();
        }
        if !txn.smtputf8 && !path.is_ascii() {
            return "553 5.6.7 Non-ASCII address requires SMTPUTF8".into();
        }
        if txn.rcpt_to.len() >= MAX_RECIPIENTS {
            return "452 4.5.3 Too many recipients".into();
        }
        if let Some(reply) = &txn.rcpt_fault {
            return reply.clone();
        }
        let fired = self
            .shared
            .fire_fail(Stage::Rcpt, std::slice::from_ref(&path));
        if let Some(answer) = fired {
            if answer.whole {
                txn.rcpt_fault = Some(answer.reply.clone());
            }
            self.close = answer.close;
            return answer.reply;
        }
        txn.rcpt_to.push(path);
        "250 2.1.5 Ok".into()
    }

    /// Replies to the end of DATA; `false`: drop the connection instead.
    async fn finish_data<W: AsyncWrite + Unpin>(
        &mut self,
        data: Option<Vec<u8>>,
        wr: &mut W,
    ) -> io::Result<bool> {
        let txn = self.txn.take().expect("DATA only with a transaction");
        let Some(data) = data else {
            reply(wr, "552 5.3.4 Message size exceeds fixed maximum").await?;
            return Ok(true);
        };
        let mail = ReceivedMail {
            mail_from: txn.mail_from,
            rcpt_to: txn.rcpt_to,
            data,
            smtputf8: txn.smtputf8,
            body_8bitmime: txn.body_8bitmime,
            helo: self.helo.clone().unwrap_or_default(),
            connection_id: self.id,
            received_at: std::time::SystemTime::now(),
        };
        if let Some(deliver) = self.shared.fire_drop(&mail.rcpt_to) {
            if deliver {
                self.shared.record(mail);
            }
            return Ok(false);
        }
        if let Some(answer) = self.shared.fire_fail(Stage::DataEnd, &mail.rcpt_to) {
            self.close = answer.close;
            reply(wr, &answer.reply).await?;
            return Ok(true);
        }
        self.shared.record(mail);
        reply(wr, "250 2.0.0 Ok: queued").await?;
        Ok(true)
    }
}

async fn reply<W: AsyncWrite + Unpin>(wr: &mut W, text: &str) -> io::Result<()> {
    wr.write_all(text.as_bytes()).await?;
    wr.write_all(b"\r\n").await
}

/// Reads message data up to the `.` line, undoing dot-stuffing. `None`:
/// larger than `max` (read to the end anyway, to stay in sync).
async fn read_data<R: tokio::io::AsyncBufRead + Unpin>(
    rd: &mut R,
    max: usize,
) -> io::Result<Option<Vec<u8>>> {
    let mut data = Vec::new();
    let mut too_big = false;
    let mut chunk = Vec::new();
    let mut at_line_start = true;
    loop {
        chunk.clear();
        (&mut *rd)
            .take(DATA_CHUNK)
            .read_until(b'\n', &mut chunk)
            .await?;
        if chunk.is_empty() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let complete = chunk.ends_with(b"\n");
        if at_line_start && (chunk == b".\r\n" || chunk == b".\n") {
            break;
        }
        let mut part = &chunk[..];
        if at_line_start && part.starts_with(b".") {
            part = &part[1..];
        }
        if data.len() + part.len() <= max {
            data.extend_from_slice(part);
        } else {
            too_big = true;
        }
        at_line_start = complete;
    }
    Ok((!too_big).then_some(data))
}

fn strip_prefix_ci<'s>(s: &'s str, prefix: &str) -> Option<&'s str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| s[prefix.len()..].trim_start())
}

/// `<path> params` → (path, params). Lenient about a missing `<>`.
fn parse_path(s: &str) -> Option<(String, &str)> {
    if let Some(rest) = s.strip_prefix('<') {
        let end = rest.find('>')?;
        Some((rest[..end].to_string(), &rest[end + 1..]))
    } else {
        let (path, params) = s.split_once(' ').unwrap_or((s, ""));
        (!path.is_empty()).then(|| (path.to_string(), params))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_parsing() {
        assert_eq!(
            parse_path("<a@example.net> SIZE=10"),
            Some(("a@example.net".to_string(), " SIZE=10"))
        );
        assert_eq!(parse_path("<>"), Some((String::new(), "")));
        assert_eq!(parse_path("a@b"), Some(("a@b".to_string(), "")));
        assert_eq!(strip_prefix_ci("from: <x>", "FROM:"), Some("<x>"));
        assert_eq!(strip_prefix_ci("TO:<x>", "FROM:"), None);
    }

    #[tokio::test]
    async fn data_unstuffing_and_end() {
        let input: &[u8] = b"Subject: x\r\n\r\n..leading dot\r\n.\r\nNOOP\r\n";
        let mut rd = BufReader::new(input);
        let data = read_data(&mut rd, 1000).await.unwrap().unwrap();
        assert_eq!(data, b"Subject: x\r\n\r\n.leading dot\r\n");
        let mut rest = String::new();
        rd.read_to_string(&mut rest).await.unwrap();
        assert_eq!(rest, "NOOP\r\n");
    }

    #[tokio::test]
    async fn data_too_big_is_read_to_the_end() {
        let input: &[u8] = b"0123456789\r\n.\r\n";
        let mut rd = BufReader::new(input);
        assert_eq!(read_data(&mut rd, 5).await.unwrap(), None);
    }

    #[test]
    fn header_lookup_unfolds() {
        let mail = ReceivedMail {
            mail_from: String::new(),
            rcpt_to: vec![],
            data: b"Subject: a\r\n b\r\nTo: x@example.net\r\n\r\nSubject: body\r\n".to_vec(),
            smtputf8: false,
            body_8bitmime: false,
            helo: String::new(),
            connection_id: 1,
            received_at: std::time::SystemTime::UNIX_EPOCH,
        };
        assert_eq!(mail.header("subject").as_deref(), Some("a b"));
        assert_eq!(mail.header("To").as_deref(), Some("x@example.net"));
        assert_eq!(mail.header("From"), None);
    }
}
