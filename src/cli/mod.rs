//! The operator commands that do more than start a daemon. `main.rs`
//! parses the arguments and calls in here (or into `notify`/`route` for
//! `run`, `route` and `db migrate`).
//!
//! - [`check_config`]: `mailgend check-config`.
//! - [`review`]: `mailgend send` without `--all`, the interactive review.
//! - [`preview`]: `mailgend preview`, what `send` would send.
//! - [`status`]: `mailgend status` and `mailgend in-doubt`.
//! - [`demo`], [`bench`]: the whole path on a throw-away installation
//!   (the binary offers them only with the cargo feature `dev-tools`).

pub mod bench;
pub mod check_config;
pub mod demo;
pub mod preview;
pub mod review;
pub mod status;
