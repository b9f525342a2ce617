//! What both daemons use, so that neither imports the other's modules.
//!
//! - [`smtp`]: the outbound SMTP client (TLS, AUTH, failure classes).
//! - [`secret_file`]: WARN when a file with a secret is readable by others.
//!
//! To come here in later steps: the SMTP section of the configuration and
//! recipient parsing (now in `config` and `notify::mail`), located config
//! problems with one "did you mean", the metrics HTTP endpoint, logging,
//! systemd and one shutdown signal.

pub mod secret_file;
pub mod smtp;
