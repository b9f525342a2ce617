//! The `slack:` action: turning a message into a [`SlackPost`] (on the hot
//! path, no I/O) and posting it with Slack's Web API `chat.postMessage`
//! (called by the protocol side, which owns retries).
//!
//! Errors are classified so the caller can retry what may succeed later
//! (network, 5xx, 429, Slack's own transient errors) and give up on what
//! will not (bad token, unknown channel).

use std::time::Duration;

use crate::route::{SlackPost, SlackStyle};

/// Default Web API base URL (`slack-url` overrides it, e.g. for a proxy or
/// a test server).
pub const DEFAULT_URL: &str = "https://slack.com/api";

/// Longest body text carried by a `full` post, in characters.
const MAX_BODY_CHARS: usize = 3000;

/// A Slack Web API client: token, base URL and a pooled HTTP client.
#[derive(Clone)]
pub struct SlackClient {
    http: reqwest::Client,
    token: String,
    base_url: String,
}

impl std::fmt::Debug for SlackClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token.
        f.debug_struct("SlackClient")
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SlackError {
    #[error("cannot reach Slack: {0}")]
    Network(String),
    #[error("Slack answered HTTP {status}{}", retry_after.map(|s| format!(" (retry after {s} s)")).unwrap_or_default())]
    Http {
        status: u16,
        retry_after: Option<u64>,
    },
    #[error("Slack refused the post: {0}")]
    Api(String),
    #[error("Slack's answer was not understood: {0}")]
    BadResponse(String),
}

/// Slack `error` codes that may go away by themselves.
const TEMPORARY_API_ERRORS: &[&str] = &[
    "ratelimited",
    "rate_limited",
    "internal_error",
    "fatal_error",
    "service_unavailable",
    "request_timeout",
    "team_added_to_org",
];

impl SlackError {
    /// Worth retrying later (network trouble, 5xx, 429, transient API
    /// errors); `false` for invalid_auth, channel_not_found and the like.
    pub fn is_temporary(&self) -> bool {
        match self {
            SlackError::Network(_) | SlackError::BadResponse(_) => true,
            SlackError::Http { status, .. } => *status == 429 || *status >= 500,
            SlackError::Api(code) => TEMPORARY_API_ERRORS.contains(&code.as_str()),
        }
    }

    /// Seconds Slack asked us to wait (HTTP 429 `Retry-After`).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            SlackError::Http {
                retry_after: Some(s),
                ..
            } => Some(Duration::from_secs(*s)),
            _ => None,
        }
    }
}

impl SlackClient {
    /// `token` is the bot token (`xoxb-…`); `base_url` without the method
    /// name, e.g. [`DEFAULT_URL`].
    pub fn new(token: &str, base_url: &str, timeout: Duration) -> Result<SlackClient, SlackError> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .user_agent(concat!("mailgend/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| SlackError::Network(e.to_string()))?;
        Ok(SlackClient {
            http,
            token: token.to_string(),
            base_url: base_url.trim_end_matches('/').to_string(),
        })
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }
}

/// Posts one message with `chat.postMessage`.
pub async fn post(client: &SlackClient, post: &SlackPost) -> Result<(), SlackError> {
    let url = format!("{}/chat.postMessage", client.base_url);
    let body = serde_json::json!({
        "channel": post.channel,
        "text": post.text,
        // Alert text is data, not markup: no link unfurling or mentions.
        "unfurl_links": false,
        "unfurl_media": false,
    });
    let resp = client
        .http
        .post(&url)
        .bearer_auth(&client.token)
        .json(&body)
        .send()
        .await
        .map_err(|e| SlackError::Network(without_url(&e)))?;
    let status = resp.status().as_u16();
    if !(200..300).contains(&status) {
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok());
        return Err(SlackError::Http {
            status,
            retry_after,
        });
    }
    let answer: serde_json::Value = resp
        .json()
        .await
        .map_err(|e| SlackError::BadResponse(without_url(&e)))?;
    match answer.get("ok").and_then(|v| v.as_bool()) {
        Some(true) => Ok(()),
        Some(false) => Err(SlackError::Api(
            answer
                .get("error")
                .and_then(|v| v.as_str())
                .unwrap_or("unknown_error")
                .to_string(),
        )),
        None => Err(SlackError::BadResponse(format!(
            "no `ok` field in {}",
            truncate(&answer.to_string(), 200)
        ))),
    }
}

fn without_url(e: &reqwest::Error) -> String {
    // reqwest's Display includes the URL; ours has no secrets, but keep
    // messages short and stable.
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// Slack's mrkdwn control characters; escaping them keeps mail text from
/// turning into links or `<!channel>` mentions.
pub fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn truncate(s: &str, max_chars: usize) -> String {
    match s.char_indices().nth(max_chars) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// Builds the post for `slack:CHANNEL:STYLE` from the decoded subject and
/// the raw message (the text body is only extracted for `full`).
pub fn make_post(channel: &str, style: SlackStyle, subject: &str, data: &[u8]) -> SlackPost {
    let subject = if subject.trim().is_empty() {
        "(no subject)"
    } else {
        subject.trim()
    };
    let mut text = format!("*{}*", escape(subject));
    if style == SlackStyle::Full {
        let body = text_body(data);
        let body = body.trim();
        if !body.is_empty() {
            text.push_str("\n\n");
            text.push_str(&escape(&truncate(body, MAX_BODY_CHARS)));
        }
    }
    SlackPost {
        channel: channel.to_string(),
        style,
        text,
    }
}

/// The first text/plain part, decoded (transfer encoding and charset).
fn text_body(data: &[u8]) -> String {
    let Ok(mail) = mailparse::parse_mail(data) else {
        return String::new();
    };
    fn find(p: &mailparse::ParsedMail) -> Option<String> {
        if p.subparts.is_empty() {
            let ct = p.ctype.mimetype.to_ascii_lowercase();
            if ct == "text/plain" || ct.is_empty() {
                return p.get_body().ok();
            }
            return None;
        }
        p.subparts.iter().find_map(find)
    }
    find(&mail).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn brief_and_full_posts() {
        let data = b"Subject: x\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nline <!channel> & more\r\n";
        let p = make_post("#a", SlackStyle::Brief, "Stage [p/1/s/1] failed", data);
        assert_eq!(p.text, "*Stage [p/1/s/1] failed*");
        let p = make_post("#a", SlackStyle::Full, "S <x>", data);
        assert_eq!(p.text, "*S &lt;x&gt;*\n\nline &lt;!channel&gt; &amp; more");
        let p = make_post("#a", SlackStyle::Brief, "", data);
        assert_eq!(p.text, "*(no subject)*");
    }

    #[test]
    fn temporary_errors() {
        assert!(SlackError::Http {
            status: 503,
            retry_after: None
        }
        .is_temporary());
        assert!(SlackError::Http {
            status: 429,
            retry_after: Some(3)
        }
        .is_temporary());
        assert!(!SlackError::Http {
            status: 404,
            retry_after: None
        }
        .is_temporary());
        assert!(!SlackError::Api("invalid_auth".into()).is_temporary());
        assert!(!SlackError::Api("channel_not_found".into()).is_temporary());
        assert!(SlackError::Api("ratelimited".into()).is_temporary());
        assert!(SlackError::Network("x".into()).is_temporary());
    }
}
