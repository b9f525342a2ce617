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

/// Parses one action URI; the error is the reason it is refused.
pub fn parse(uri: &str) -> Result<Action, String> {
    let (scheme, rest) = uri.split_once(':').ok_or_else(|| {
        format!("{uri:?} is not an action URI (`mailto:ADDRESS` or `slack:CHANNEL`)")
    })?;
    match scheme.to_ascii_lowercase().as_str() {
        "mailto" => mailto::parse_address(rest).map(Action::Mailto),
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
            Ok(Action::Slack {
                channel: channel.to_string(),
                style,
            })
        }
        _ => Err(format!(
            "unknown action {scheme:?} in {uri:?}; use `mailto:ADDRESS` or `slack:CHANNEL[:brief|full]`"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_actions() {
        assert_eq!(
            parse("mailto:cat@example.com").unwrap(),
            Action::Mailto("cat@example.com".into())
        );
        assert_eq!(
            parse("slack:#alerts:full").unwrap(),
            Action::Slack {
                channel: "#alerts".into(),
                style: SlackStyle::Full
            }
        );
        assert_eq!(
            parse("slack:C024BE91L").unwrap(),
            Action::Slack {
                channel: "C024BE91L".into(),
                style: SlackStyle::Brief
            }
        );
        for bad in [
            "cat@example.com",
            "mailto:",
            "mailto:cat",
            "mailto:a@b.com,c@d.com",
            "mailto:a@b.com?subject=x",
            "slack:",
            "slack:#a:loud",
            "sms:123",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
