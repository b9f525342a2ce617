//! GoCD's stage notification subjects:
//! `Stage [PIPELINE/COUNTER/STAGE/COUNTER] passed|failed|is broken|is fixed|is cancelled`.

use super::Event;

/// What a GoCD subject names: the pipeline, the stage and the event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageRun {
    pub pipeline: String,
    pub stage: String,
    /// `None` when the words after the brackets are no known event.
    pub event: Option<Event>,
}

impl StageRun {
    /// The key GoCD (and mail2alert, plugin/gocd.py:382) keeps a result
    /// under: `pipeline/stage`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.pipeline, self.stage)
    }
}

/// Pipeline, stage and event from a GoCD subject; `None` for other mail.
pub fn parse(subject: &str) -> Option<StageRun> {
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
    Some(StageRun {
        pipeline: parts[0].to_string(),
        stage: parts[2].to_string(),
        event,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(p: &str, s: &str, e: Option<Event>) -> Option<StageRun> {
        Some(StageRun {
            pipeline: p.into(),
            stage: s.into(),
            event: e,
        })
    }

    #[test]
    fn subjects() {
        assert_eq!(
            parse("Stage [my-pipe/12/build/1] passed"),
            run("my-pipe", "build", Some(Event::Passes))
        );
        assert_eq!(
            parse("Stage [p/1/s/2] is broken"),
            run("p", "s", Some(Event::Breaks))
        );
        assert_eq!(
            parse("Stage [p/1/s/2] is fixed"),
            run("p", "s", Some(Event::Fixed))
        );
        assert_eq!(
            parse("Stage [p/1/s/2] is cancelled"),
            run("p", "s", Some(Event::Cancelled))
        );
        assert_eq!(
            parse("Stage [p/1/s/2] failed"),
            run("p", "s", Some(Event::Fails))
        );
        assert_eq!(parse("Stage [p/1/s/2] exploded"), run("p", "s", None));
        assert_eq!(parse("Stage [p/1/s] passed"), None);
        assert_eq!(parse("backup done"), None);
        assert_eq!(parse("Stage [p/1/test/1] passed").unwrap().key(), "p/test");
    }
}
