//! GoCD's stage notification subjects:
//! `Stage [PIPELINE/COUNTER/STAGE/COUNTER] passed|failed|is broken|is fixed|is cancelled`.

use super::Event;

/// Pipeline name and event from a GoCD subject; `None` for other mail.
pub fn parse(subject: &str) -> Option<(String, Option<Event>)> {
    let start = subject.find("Stage [")? + "Stage [".len();
    let rest = &subject[start..];
    let close = rest.find(']')?;
    let locator = &rest[..close];
    let parts: Vec<&str> = locator.split('/').collect();
    if parts.len() != 4 || parts.iter().any(|p| p.is_empty()) {
        return None;
    }
    let verb = rest[close + 1..].trim();
    let event = match verb.to_ascii_lowercase().as_str() {
        "passed" => Some(Event::Passes),
        "failed" => Some(Event::Fails),
        "is broken" => Some(Event::Breaks),
        "is fixed" => Some(Event::Fixed),
        "is cancelled" => Some(Event::Cancelled),
        _ => None,
    };
    Some((parts[0].to_string(), event))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects() {
        assert_eq!(
            parse("Stage [my-pipe/12/build/1] passed"),
            Some(("my-pipe".into(), Some(Event::Passes)))
        );
        assert_eq!(
            parse("Stage [p/1/s/2] is broken"),
            Some(("p".into(), Some(Event::Breaks)))
        );
        assert_eq!(
            parse("Stage [p/1/s/2] is fixed"),
            Some(("p".into(), Some(Event::Fixed)))
        );
        assert_eq!(
            parse("Stage [p/1/s/2] is cancelled"),
            Some(("p".into(), Some(Event::Cancelled)))
        );
        assert_eq!(
            parse("Stage [p/1/s/2] failed"),
            Some(("p".into(), Some(Event::Fails)))
        );
        assert_eq!(parse("Stage [p/1/s/2] exploded"), Some(("p".into(), None)));
        assert_eq!(parse("Stage [p/1/s] passed"), None);
        assert_eq!(parse("backup done"), None);
    }
}
