//! Bounces traced back to their tickets (issue 19, item 2): the reading
//! of delivery reports ([`parse`](crate::notify::bounce::parse)) and their record in `mailgend.bounce`
//! ([`store`](crate::notify::bounce::store)). The settings (`mailgend.verp`, `mailgend.bounces`) are
//! read by `config::bounces`; the address format is `shared::verp`.
//!
//! The notifier only needs the VERP address (its envelope sender);
//! `mailgend route` receives the reports and records them
//! (`route::verp`); `mailgend bounces` lists them (`cli::bounces`).

pub mod parse;
pub mod store;

pub use crate::config::bounces::Policy;
