//! Rule actions: what to do with a message a rule matched. `mailto:`
//! sends the (rewritten) message to an address, `slack:` posts it to a
//! channel. Parsing and validating the URIs lives here so that a bad action
//! is refused when the configuration is loaded, not when mail arrives.

pub mod mailto;
pub mod slack;

use crate::route::SlackStyle;

/// One validated action URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `mailto:ADDRESS`.
    Mailto(String),
    /// `slack:CHANNEL[:brief|full]`; brief when not given.
    Slack { channel: String, style: SlackStyle },
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Action::Mailto(a) => write!(f, "mailto:{a}"),
            Action::Slack { channel, style } => write!(
                f,
                "slack:{channel}:{}",
                match style {
                    SlackStyle::Brief => "brief",
                    SlackStyle::Full => "full",
                }
            ),
        }
    }
}

/// A parsed action URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    Action(Action),
    /// What mail2alert did with an odd action (skip it: `None`; or use it
    /// as it was), and the WARN that says so.
    Odd(Option<Action>, String),
}

/// Parses one action URI; the error is the reason it is refused (it could
/// not work at all). mail2alert split the URI at `:` and logged and
/// skipped a scheme it did not know (actions.py:13-19), so an unknown
/// scheme is an oddity, as is a `mailto:` without a domain, which it
/// handed to the relay as it was.
pub fn parse(uri: &str) -> Result<Parsed, String> {
    let Some((scheme, rest)) = uri.split_once(':') else {
        return Ok(Parsed::Odd(
            None,
            format!("{uri:?} is not an action URI (`mailto:ADDRESS` or `slack:CHANNEL`); skipped, as by mail2alert"),
        ));
    };
    match scheme.to_ascii_lowercase().as_str() {
        "mailto" => match mailto::parse_address(rest) {
            Ok(a) => Ok(Parsed::Action(Action::Mailto(a))),
            Err(e) => match mailto::bare_local_part(rest) {
                Some(local) => Ok(Parsed::Odd(
                    Some(Action::Mailto(local.to_string())),
                    format!(
                        "mailto:{local} has no @domain; sent as RCPT TO:<{local}> for the relay to qualify (as by mail2alert)"
                    ),
                )),
                None => Err(e),
            },
        },
        "slack" => {
            let (channel, style) = match rest.rsplit_once(':') {
                Some((c, "brief")) => (c, SlackStyle::Brief),
                Some((c, "full")) => (c, SlackStyle::Full),
                Some((_, other)) => {
                    return Err(format!(
                        "unknown Slack style {other:?} in {uri:?}; use `brief` or `full`"
                    ))
                }
                None => (rest, SlackStyle::Brief),
            };
            let ok = |c: char| c.is_alphanumeric() || "#-_.".contains(c);
            if channel.is_empty() || channel.len() > 80 || !channel.chars().all(ok) {
                return Err(format!(
                    "{channel:?} is not a Slack channel name or id (letters, digits, `#-_.`)"
                ));
            }
            Ok(Parsed::Action(Action::Slack {
                channel: channel.to_string(),
                style,
            }))
        }
        _ => Ok(Parsed::Odd(
            None,
            format!(
                "unknown action {scheme:?} in {uri:?}; skipped, as by mail2alert (known: `mailto:ADDRESS`, `slack:CHANNEL[:brief|full]`)"
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_actions() {
        let ok = |s: &str| match parse(s) {
            Ok(Parsed::Action(a)) => a,
            other => panic!("{s}: {other:?}"),
        };
        assert_eq!(
            ok("mailto:cat@example.com"),
            Action::Mailto("cat@example.com".into())
        );
        assert_eq!(
            ok("slack:#alerts:full"),
            Action::Slack {
                channel: "#alerts".into(),
                style: SlackStyle::Full
            }
        );
        assert_eq!(
            ok("slack:C024BE91L"),
            Action::Slack {
                channel: "C024BE91L".into(),
                style: SlackStyle::Brief
            }
        );
        // actions.py:13-19: unknown schemes skipped; a bare name passed on.
        assert!(matches!(parse("sms:123"), Ok(Parsed::Odd(None, _))));
        assert!(matches!(parse("cat@example.com"), Ok(Parsed::Odd(None, _))));
        assert_eq!(
            parse("mailto:cat").unwrap(),
            Parsed::Odd(
                Some(Action::Mailto("cat".into())),
                "mailto:cat has no @domain; sent as RCPT TO:<cat> for the relay to qualify (as by mail2alert)".into()
            )
        );
        for bad in [
            "mailto:",
            "mailto:a@b.com,c@d.com",
            "mailto:a@b.com?subject=x",
            "slack:",
            "slack:#a:loud",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
