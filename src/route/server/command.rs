//! Parsing one SMTP command line (RFC 5321 §4.1) into a [`Command`].
//!
//! Pure functions over bytes, so every malformed input is a unit test and
//! never touches a socket. Addresses are checked with lettre's parser, the
//! same one the outbound side uses: what we accept here can be relayed
//! later, and nothing with CR, LF or angle brackets inside can reach a
//! header the router writes.

use std::str::FromStr;

/// One parsed command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Ehlo(String),
    Helo(String),
    /// `MAIL FROM:<path>`; `from == None` is the null sender `<>`.
    Mail {
        from: Option<String>,
        /// `SIZE=` as declared by the client.
        size: Option<usize>,
    },
    Rcpt(String),
    Data,
    Rset,
    Noop,
    Quit,
    Vrfy,
    Help,
    StartTls,
    /// `AUTH mechanism [initial-response]`.
    Auth {
        mechanism: String,
        initial: Option<String>,
    },
    /// A verb we know but do not offer (EXPN, BDAT, ETRN, TURN, …).
    NotImplemented(String),
}

/// Why a line is not a command we can act on; each maps to one reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandError {
    /// 500: not a command at all.
    Unrecognized,
    /// 501: a known verb with bad arguments.
    Syntax(&'static str),
    /// 555: a MAIL/RCPT parameter we do not support.
    Parameter(String),
    /// 553: the address is not one we can relay.
    Address(String),
}

impl CommandError {
    pub fn reply(&self) -> String {
        match self {
            CommandError::Unrecognized => "500 5.5.2 Command unrecognized".into(),
            CommandError::Syntax(what) => format!("501 5.5.4 Syntax: {what}"),
            CommandError::Parameter(p) => {
                format!("555 5.5.4 Unsupported parameter {}", printable(p, 40))
            }
            CommandError::Address(why) => format!("553 5.1.3 Bad address: {why}"),
        }
    }
}

/// Parses one line (with or without its line end).
pub fn parse(raw: &[u8]) -> Result<Command, CommandError> {
    let raw = raw.strip_suffix(b"\n").unwrap_or(raw);
    let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
    // Commands are ASCII (we do not offer SMTPUTF8).
    let Ok(line) = std::str::from_utf8(raw) else {
        return Err(CommandError::Syntax("commands must be ASCII"));
    };
    if !line.is_ascii() || line.bytes().any(|b| b.is_ascii_control() && b != b'\t') {
        return Err(CommandError::Syntax("commands must be printable ASCII"));
    }
    let (verb, args) = match line.split_once(' ') {
        Some((v, a)) => (v, a.trim()),
        None => (line.trim_end(), ""),
    };
    let verb = verb.to_ascii_uppercase();
    let no_args = |c: Command| {
        if args.is_empty() {
            Ok(c)
        } else {
            Err(CommandError::Syntax("no arguments allowed"))
        }
    };
    match verb.as_str() {
        "EHLO" | "HELO" => {
            if args.is_empty() || args.contains(char::is_whitespace) {
                return Err(CommandError::Syntax(
                    "EHLO/HELO needs one domain or address literal",
                ));
            }
            let name = args.to_string();
            Ok(if verb == "EHLO" {
                Command::Ehlo(name)
            } else {
                Command::Helo(name)
            })
        }
        "MAIL" => parse_mail(args),
        "RCPT" => parse_rcpt(args),
        "DATA" => no_args(Command::Data),
        "RSET" => no_args(Command::Rset),
        // NOOP and HELP may carry a string, which is ignored.
        "NOOP" => Ok(Command::Noop),
        "HELP" => Ok(Command::Help),
        "QUIT" => no_args(Command::Quit),
        "VRFY" => Ok(Command::Vrfy),
        "STARTTLS" => no_args(Command::StartTls),
        "AUTH" => {
            let mut parts = args.split_whitespace();
            let Some(mechanism) = parts.next() else {
                return Err(CommandError::Syntax("AUTH mechanism [initial-response]"));
            };
            let initial = parts.next().map(str::to_string);
            if parts.next().is_some() {
                return Err(CommandError::Syntax("AUTH mechanism [initial-response]"));
            }
            Ok(Command::Auth {
                mechanism: mechanism.to_ascii_uppercase(),
                initial,
            })
        }
        "EXPN" | "BDAT" | "ETRN" | "TURN" | "ATRN" | "SEND" | "SOML" | "SAML" => {
            Ok(Command::NotImplemented(verb))
        }
        _ => Err(CommandError::Unrecognized),
    }
}

fn parse_mail(args: &str) -> Result<Command, CommandError> {
    const USAGE: &str = "MAIL FROM:<address> [SIZE=n] [BODY=7BIT|8BITMIME]";
    let rest = strip_prefix_ci(args, "FROM:").ok_or(CommandError::Syntax(USAGE))?;
    let (path, params) = split_path(rest).ok_or(CommandError::Syntax(USAGE))?;
    let from = if path.is_empty() {
        None
    } else {
        Some(check_address(path)?)
    };
    let mut size = None;
    for param in params.split_whitespace() {
        let (key, value) = param.split_once('=').unwrap_or((param, ""));
        match key.to_ascii_uppercase().as_str() {
            "SIZE" => {
                size = Some(
                    value
                        .parse::<usize>()
                        .map_err(|_| CommandError::Syntax("SIZE=<decimal number>"))?,
                )
            }
            // 8-bit data is stored and relayed as is; the outbound side
            // declares BODY=8BITMIME itself when the data needs it.
            "BODY" if ["7BIT", "8BITMIME"].contains(&value.to_ascii_uppercase().as_str()) => {}
            _ => return Err(CommandError::Parameter(param.to_string())),
        }
    }
    Ok(Command::Mail { from, size })
}

fn parse_rcpt(args: &str) -> Result<Command, CommandError> {
    const USAGE: &str = "RCPT TO:<address>";
    let rest = strip_prefix_ci(args, "TO:").ok_or(CommandError::Syntax(USAGE))?;
    let (path, params) = split_path(rest).ok_or(CommandError::Syntax(USAGE))?;
    if let Some(p) = params.split_whitespace().next() {
        return Err(CommandError::Parameter(p.to_string()));
    }
    if path.is_empty() {
        return Err(CommandError::Address("empty recipient".into()));
    }
    Ok(Command::Rcpt(check_address(path)?))
}

/// An address we can relay: lettre's `local@domain` syntax, at most 254
/// octets (RFC 5321 §4.5.3.1.3).
fn check_address(path: &str) -> Result<String, CommandError> {
    // A source route (`@a,@b:user@c`) is obsolete; RFC 5321 says to ignore it.
    let path = match path.strip_prefix('@') {
        Some(_) => path.rsplit_once(':').map(|(_, a)| a).unwrap_or(path),
        None => path,
    };
    if path.len() > 254 {
        return Err(CommandError::Address("longer than 254 characters".into()));
    }
    lettre::Address::from_str(path)
        .map(|_| path.to_string())
        .map_err(|e| CommandError::Address(format!("{} ({e})", printable(path, 80))))
}

/// `<path> params` → (path, params). Tolerates a missing `<>` around a
/// bare address, as common clients' mistakes go.
fn split_path(s: &str) -> Option<(&str, &str)> {
    if let Some(rest) = s.strip_prefix('<') {
        let end = rest.find('>')?;
        Some((&rest[..end], &rest[end + 1..]))
    } else {
        let (path, params) = s.split_once(' ').unwrap_or((s, ""));
        (!path.is_empty()).then_some((path, params))
    }
}

fn strip_prefix_ci<'s>(s: &'s str, prefix: &str) -> Option<&'s str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| s[prefix.len()..].trim_start())
}

/// Client text safe to echo in a reply or a log line: printable ASCII,
/// cut at `max` characters.
pub fn printable(s: &str, max: usize) -> String {
    let mut out: String = s
        .chars()
        .take(max)
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect();
    if s.chars().count() > max {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn well_formed_commands() {
        assert_eq!(
            parse(b"EHLO client.example\r\n"),
            Ok(Command::Ehlo("client.example".into()))
        );
        assert_eq!(parse(b"helo x\n"), Ok(Command::Helo("x".into())));
        assert_eq!(
            parse(b"MAIL FROM:<gocd@example.org> SIZE=1200 BODY=8BITMIME\r\n"),
            Ok(Command::Mail {
                from: Some("gocd@example.org".into()),
                size: Some(1200)
            })
        );
        assert_eq!(
            parse(b"mail from: <>\r\n"),
            Ok(Command::Mail {
                from: None,
                size: None
            })
        );
        assert_eq!(
            parse(b"RCPT TO:<a@example.net>\r\n"),
            Ok(Command::Rcpt("a@example.net".into()))
        );
        assert_eq!(
            parse(b"RCPT TO:<@relay.example:a@example.net>\r\n"),
            Ok(Command::Rcpt("a@example.net".into()))
        );
        assert_eq!(parse(b"DATA\r\n"), Ok(Command::Data));
        assert_eq!(parse(b"NOOP whatever\r\n"), Ok(Command::Noop));
        assert_eq!(
            parse(b"AUTH plain AGEAYg==\r\n"),
            Ok(Command::Auth {
                mechanism: "PLAIN".into(),
                initial: Some("AGEAYg==".into())
            })
        );
        assert_eq!(
            parse(b"EXPN list\r\n"),
            Ok(Command::NotImplemented("EXPN".into()))
        );
    }

    #[test]
    fn malformed_commands_get_the_right_reply() {
        let code = |l: &[u8]| parse(l).unwrap_err().reply()[..3].to_string();
        assert_eq!(code(b"FOO\r\n"), "500");
        assert_eq!(code(b"EHLO\r\n"), "501");
        assert_eq!(code(b"MAIL TO:<a@b.example>\r\n"), "501");
        assert_eq!(code(b"MAIL FROM:<a@b.example> SIZE=big\r\n"), "501");
        assert_eq!(code(b"MAIL FROM:<a@b.example> SMTPUTF8\r\n"), "555");
        assert_eq!(code(b"RCPT TO:<a@b.example> NOTIFY=NEVER\r\n"), "555");
        assert_eq!(code(b"RCPT TO:<>\r\n"), "553");
        assert_eq!(code(b"RCPT TO:<a b@c.example>\r\n"), "553");
        assert_eq!(code(b"RCPT TO:<no-at-sign>\r\n"), "553");
        assert_eq!(code(b"DATA now\r\n"), "501");
        assert_eq!(code(b"MAIL FROM:<\xff@b.example>\r\n"), "501");
        assert_eq!(code(b"MAIL FROM:<a@b.example>\x00\r\n"), "501");
        let long = format!("RCPT TO:<{}@example.net>\r\n", "a".repeat(300));
        assert_eq!(code(long.as_bytes()), "553");
    }

    #[test]
    fn echoed_text_is_printable_and_bounded() {
        assert_eq!(printable("a\r\nb", 10), "a??b");
        assert_eq!(printable("abcdef", 3), "abc…");
    }
}
