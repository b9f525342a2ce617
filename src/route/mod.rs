//! The alert router (`mailgend route`): mail2alert's job, done safely.
//!
//! ```text
//! server (inbound SMTP) → router (managers → rules → actions)
//!   → spool (durable queue) → forward (outbound SMTP, Slack)
//! ```
//!
//! This module owns the types that cross those boundaries, so the
//! protocol side (server, spool, forward, service) and the decision side
//! (config, router, managers, rules, actions) can change independently.
//! Outbound SMTP and logging/signals/systemd are shared with the notifier
//! (`crate::shared::smtp`, `crate::shared::logging`, `crate::shared::systemd`).

use std::net::SocketAddr;
use std::sync::Arc;

/// The SMTP envelope of a received message, as the client gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The connecting client (becomes the `X-Peer` header).
    pub peer: SocketAddr,
    /// `MAIL FROM`; `None` is the null sender `<>` (bounces).
    pub mail_from: Option<String>,
    /// Every `RCPT TO`, in order.
    pub rcpt_to: Vec<String>,
}

/// A received message: envelope plus the DATA bytes as received
/// (dot-unstuffed, CRLF line ends as on the wire, 8-bit untouched) after
/// our `Received:` line.
#[derive(Debug, Clone)]
pub struct Inbound {
    pub envelope: Envelope,
    pub data: Arc<Vec<u8>>,
    /// The id it was received under (named in our `Received:` line; the
    /// spool stores it under this id). `None` for `--explain`.
    pub id: Option<String>,
}

/// One outbound SMTP transaction the router decided on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Envelope sender; `None` is `<>`.
    pub mail_from: Option<String>,
    pub rcpt_to: Vec<String>,
    pub data: Arc<Vec<u8>>,
}

/// How much of the message a Slack post carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlackStyle {
    /// Subject line only.
    Brief,
    /// Subject and text body.
    Full,
}

/// One Slack post (`slack:<channel>[:brief|full]` action).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlackPost {
    pub channel: String,
    pub style: SlackStyle,
    pub text: String,
}

/// What to do with one received message. `deliveries` and `slack` are
/// executed by the protocol side; an empty `Routing` (no deliveries, no
/// posts) means the message is dropped, and `trace` says why.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routing {
    pub deliveries: Vec<Delivery>,
    pub slack: Vec<SlackPost>,
    /// Human-readable decision trail: which manager wanted the message,
    /// which rules matched, which recipients resulted (logged at INFO and
    /// printed by `--explain`).
    pub trace: Vec<String>,
}

pub mod actions;
pub mod bench;
pub mod bounce;
pub mod check;
pub mod config;
pub mod forward;
pub mod limit;
pub mod managers;
pub mod metrics;
pub mod retry;
pub mod router;
pub mod rules;
pub mod server;
pub mod service;
pub mod spool;
pub mod verp;
