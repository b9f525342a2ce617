//! The operator commands. `main.rs` parses the arguments and calls in
//! here (or into `notify::service` for `run`).
//!
//! - [`command`]: what every command shares (its error, loading the
//!   configuration).
//! - [`send`]: `mailgend send`; [`review`] is its interactive review.
//! - [`preview`]: `mailgend preview`, what `send` would send.
//! - [`status`]: `mailgend status` and `mailgend in-doubt`.
//! - [`bounces`]: `mailgend bounces`, the bounces to VERP addresses.
//! - [`migrate`]: `mailgend db migrate`.
//! - [`check_config`]: `mailgend check-config`.
//! - [`route`]: `mailgend route` and its offline modes.
//! - [`demo`], [`bench`](mod@bench): the whole path on a throw-away installation
//!   (the binary offers them only with the cargo feature `dev-tools`).

pub mod bench;
pub mod bounces;
pub mod check_config;
pub mod command;
pub mod demo;
pub mod migrate;
pub mod preview;
pub mod review;
pub mod route;
pub mod send;
pub mod status;
