//! What both daemons use, so that neither imports the other's modules.
//!
//! - [`smtp`]: the outbound SMTP client (TLS, AUTH, failure classes) and
//!   its settings.
//! - [`address`]: recipient addresses from untrusted data.
//! - [`problem`], [`did_you_mean`]: a configuration problem located in
//!   its file, and the hint for a mistyped key.
//! - [`metrics`]: the exposition formats, build-info and process series,
//!   and the `/metrics` HTTP endpoint.
//! - [`logging`]: plain-text or journald logging, one line per event.
//! - [`systemd`]: readiness, status, watchdog.
//! - [`shutdown`]: the one stop signal of a daemon and its listeners.
//! - [`secret_file`]: WARN when a file with a secret is readable by others.

pub mod address;
pub mod did_you_mean;
pub mod duration;
pub mod logging;
pub mod metrics;
pub mod problem;
pub mod secret_file;
pub mod shutdown;
pub mod smtp;
pub mod systemd;
pub mod verp;
