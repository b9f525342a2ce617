//! The one place that sets up logging (`tracing`) for every subcommand.
//!
//! Two outputs, chosen once at start:
//!
//! - **journald**, when stderr is connected to the journal
//!   ([`crate::shared::systemd::under_journald`], i.e. started by systemd). Events go
//!   through `tracing-journald` in the journal's native protocol with no
//!   field prefix, so the fields the code logs (`directive_ids`, `event_ids`,
//!   `ticket`, `recipient`, `format`, …) become journal fields
//!   `DIRECTIVE_IDS`, `EVENT_IDS`, `TICKET`, `RECIPIENT`, `FORMAT` that
//!   `journalctl -u mailgend TICKET=20261123-10000001` can select on, and the
//!   level becomes the journal `PRIORITY` (ERROR 3, WARN 4, INFO 6, DEBUG and
//!   TRACE 7, the syslog meanings). Writing plain lines to a journal stream
//!   would lose both. Without a prefix, a field name can collide with a
//!   journal field of fixed meaning: do not log fields named `priority`,
//!   `message_id` (journald's catalog id, a 128-bit hex value), `code_file`,
//!   `code_line`, `code_func`, `syslog_identifier`, `errno` or `target`.
//! - **plain lines on stderr** otherwise (a shell, cron, the tests):
//!   `2026-11-23T05:59:23.417Z ERROR mailgend::notify::pipeline: message
//!   directive_ids=1,2 ticket=…`, UTC, the level word always present so
//!   `grep ERROR` works, colours only when stderr is a terminal.
//!
//! **One line per event, always.** Messages and fields carry values from
//! event data and from the network (recipients, template names, Subjects,
//! SMTP commands). In the plain-text output every field, the message
//! included, goes through [`one_line`], so no value can end a line, start a
//! forged one, move the cursor (CR, ESC) or reorder text (bidi controls),
//! whatever field a future change adds. The journal keeps raw values: its
//! fields are fields, not lines.
//!
//! Levels: the config's `logging_level` (`DEBUG`, `INFO`, `WARNING`/`WARN`,
//! `ERROR`, `CRITICAL`) applies to mailgend's own targets; other crates log
//! at WARN (or ERROR when the level is ERROR). `-v` raises mailgend to DEBUG,
//! `-vvv` to TRACE. `MAILGEND_LOG`, an `EnvFilter` directive string such as
//! `mailgend=debug,tokio_postgres=info`, overrides both.

use std::borrow::Cow;
use std::fmt;
use std::io::IsTerminal;
use std::sync::OnceLock;

use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::{DefaultFields, Writer};
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

/// The environment variable that overrides the configured level.
pub const ENV_FILTER_VAR: &str = "MAILGEND_LOG";

/// What [`init`] installed, kept for [`set_level`].
struct Installed {
    filter: reload::Handle<EnvFilter, Registry>,
    /// `MAILGEND_LOG` was given and valid: it wins over config reloads too.
    env_override: bool,
}

static INSTALLED: OnceLock<Option<Installed>> = OnceLock::new();

/// Sets up logging for the process. `level` is the config's
/// `logging_level`, `verbose` the number of `-v` flags. Idempotent: only the
/// first call in a process has an effect (later ones, e.g. after a config
/// error was already logged, do nothing); use [`set_level`] to change the
/// level later. If another global subscriber was installed first (a test
/// harness), that one stays.
pub fn init(level: &str, verbose: u8) {
    init_as("mailgend", level, verbose);
}

/// [`init`] with the journal's `SYSLOG_IDENTIFIER` for this daemon
/// (`mailgend-route` for the router), so `journalctl -t NAME` finds each
/// daemon's lines whatever the unit is called.
///
/// `MAILGEND_SYSLOG_IDENTIFIER` (set by the template units, e.g.
/// `mailgend-NAME`) overrides it, so each instance has its own.
pub fn init_as(identifier: &str, level: &str, verbose: u8) {
    let own = std::env::var("MAILGEND_SYSLOG_IDENTIFIER")
        .ok()
        .filter(|s| !s.is_empty());
    let identifier = own.as_deref().unwrap_or(identifier);
    INSTALLED.get_or_init(|| install(identifier, level, verbose));
}

/// Applies a new configured level (after a reload), unless `MAILGEND_LOG`
/// fixed the filter at start. Does nothing before [`init`].
pub fn set_level(level: &str, verbose: u8) {
    let Some(Some(installed)) = INSTALLED.get() else {
        return;
    };
    if installed.env_override {
        return;
    }
    if let Err(e) = installed.filter.reload(default_filter(level, verbose)) {
        tracing::warn!("cannot change the log level: {e}");
    }
}

fn install(identifier: &str, level: &str, verbose: u8) -> Option<Installed> {
    let (filter, env_problem, env_override) = match std::env::var(ENV_FILTER_VAR) {
        Ok(directives) => match EnvFilter::try_new(&directives) {
            Ok(f) => (f, None, true),
            Err(e) => (
                default_filter(level, verbose),
                Some(format!("ignoring {ENV_FILTER_VAR}={directives:?}: {e}")),
                false,
            ),
        },
        Err(_) => (default_filter(level, verbose), None, false),
    };
    let (filter, handle) = reload::Layer::new(filter);

    // Only try the journal when stderr really goes there: a program run from
    // a shell inside a unit's session must still print to its terminal.
    let mut journald_problem = None;
    let journald = if crate::shared::systemd::under_journald() {
        match tracing_journald::layer() {
            Ok(layer) => Some(
                layer
                    .with_field_prefix(None)
                    .with_syslog_identifier(identifier.to_string())
                    .with_priority_mappings(priorities()),
            ),
            Err(e) => {
                journald_problem = Some(format!(
                    "stderr is the journal but its socket is unusable ({e}); logging plain lines"
                ));
                None
            }
        }
    } else {
        None
    };
    let plain = journald.is_none().then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .with_timer(UtcMillis)
            .with_target(true)
            .fmt_fields(OneLineFields)
    });

    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(journald)
        .with(plain)
        .try_init()
        .is_ok();
    for problem in env_problem.iter().chain(journald_problem.iter()) {
        tracing::warn!("{problem}");
    }
    installed.then_some(Installed {
        filter: handle,
        env_override,
    })
}

/// The filter for a configured level and `-v` count.
fn default_filter(level: &str, verbose: u8) -> EnvFilter {
    let ours = match verbose {
        0 => match level.to_ascii_uppercase().as_str() {
            "DEBUG" => "debug",
            "WARNING" | "WARN" => "warn",
            "ERROR" | "CRITICAL" => "error",
            _ => "info",
        },
        1 | 2 => "debug",
        _ => "trace",
    };
    // Other crates' INFO is noise for an operator; their warnings are not,
    // unless the operator asked for errors only.
    let others = if ours == "error" { "error" } else { "warn" };
    EnvFilter::new(format!("mailgend={ours},{others}"))
}

/// syslog meanings (journald's `PRIORITY`): INFO is "informational" (6),
/// not tracing-journald's default "notice" (5), so `journalctl -p notice`
/// shows only what needs attention.
fn priorities() -> tracing_journald::PriorityMappings {
    use tracing_journald::Priority;
    tracing_journald::PriorityMappings {
        error: Priority::Error,
        warn: Priority::Warning,
        info: Priority::Informational,
        debug: Priority::Debug,
        trace: Priority::Debug,
    }
}

/// The plain-text layer's field formatter: tracing's default layout, then
/// [`one_line`] over the result (field names are ours and static, so
/// escaping the whole text escapes exactly the values).
struct OneLineFields;

impl<'w> FormatFields<'w> for OneLineFields {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut raw = String::new();
        DefaultFields::new().format_fields(Writer::new(&mut raw), fields)?;
        fmt::Write::write_str(&mut writer, &one_line(&raw))
    }
}

/// `text` with every character that could break or disguise a log line
/// escaped: C0 and C1 controls (CR, LF, TAB, ESC, NEL, …) and DEL as `\n`,
/// `\r`, `\t`, `\x1b`, `\u{85}`; the Unicode line and paragraph
/// separators and the bidirectional controls as `\u{2028}` etc.
pub fn one_line(text: &str) -> Cow<'_, str> {
    fn needs_escape(c: char) -> bool {
        c.is_control()
            || matches!(
                c,
                '\u{2028}' | '\u{2029}' | '\u{200e}' | '\u{200f}' | '\u{061c}'
            )
            || ('\u{202a}'..='\u{202e}').contains(&c)
            || ('\u{2066}'..='\u{2069}').contains(&c)
    }
    if !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if needs_escape(c) && (c as u32) < 0x80 => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c if needs_escape(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// `2026-11-23T05:59:23.417Z`: UTC so lines from several hosts sort
/// together, milliseconds because SMTP round trips are shorter than a
/// second.
struct UtcMillis;

impl FormatTime for UtcMillis {
    fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
        write!(w, "{}", chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.3fZ"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_map_like_the_config_says() {
        let f = |l: &str, v: u8| default_filter(l, v).to_string();
        assert_eq!(f("INFO", 0), "mailgend=info,warn");
        assert_eq!(f("DEBUG", 0), "mailgend=debug,warn");
        assert_eq!(f("WARNING", 0), "mailgend=warn,warn");
        assert_eq!(f("WARN", 0), "mailgend=warn,warn");
        assert_eq!(f("ERROR", 0), "mailgend=error,error");
        assert_eq!(f("CRITICAL", 0), "mailgend=error,error");
        assert_eq!(f("ERROR", 1), "mailgend=debug,warn");
        assert_eq!(f("INFO", 2), "mailgend=debug,warn");
        assert_eq!(f("INFO", 3), "mailgend=trace,warn");
    }

    #[test]
    fn one_line_escapes_what_breaks_or_disguises_a_line() {
        assert!(matches!(one_line("plain ümlaut text"), Cow::Borrowed(_)));
        assert_eq!(
            one_line("a\nINFO forged\rb\tc\x1b[2Kd\u{85}e\u{2028}f\u{202e}g\x7f"),
            "a\\nINFO forged\\rb\\tc\\x1b[2Kd\\u{85}e\\u{2028}f\\u{202e}g\\x7f"
        );
    }

    /// Through the real formatter: a value with line breaks in the message
    /// and in fields stays on the event's one line.
    #[test]
    fn plain_layer_writes_one_line_per_event() {
        use std::sync::{Arc, Mutex};
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let sink = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || sink.clone())
            .with_ansi(false)
            .fmt_fields(OneLineFields)
            .finish();
        let evil = "x@example.org\n2026-01-01T00:00:00.000Z  INFO mailgend: 11 mails sent\r";
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("group", template = %evil);
            let _e = span.enter();
            tracing::info!(recipient = %evil, debug = ?evil, "rendered for {evil}");
        });
        let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert_eq!(out.matches('\n').count(), 1, "{out}");
        assert!(!out.contains('\r'), "{out}");
        assert!(out.ends_with('\n'));
        assert!(out.contains("INFO"), "{out}");
        assert_eq!(out.matches("11 mails sent").count(), 4, "{out}");
    }

    #[test]
    fn timestamps_are_utc_with_milliseconds() {
        let mut s = String::new();
        UtcMillis.format_time(&mut Writer::new(&mut s)).unwrap();
        assert_eq!(s.len(), "2026-11-23T05:59:23.417Z".len(), "{s}");
        assert!(chrono::DateTime::parse_from_rfc3339(&s).is_ok(), "{s}");
        assert!(s.ends_with('Z'));
    }
}
