//! Managers: each receives the messages it wants (`messages-we-want`) and
//! tells the router what it knows about them ([`Facts`]) so the rules can
//! decide. `mail` looks only at the message; `gocd` also knows GoCD's
//! pipeline groups and each pipeline's last state.
//!
//! [`MANAGERS`] is the registry: a new manager is one module with a
//! [`ManagerSpec`] (its extra config keys and how to build it) plus one line
//! there.

pub mod gocd;
pub mod mail;

use std::sync::Arc;

use futures::future::BoxFuture;
use tokio::task::JoinHandle;

use crate::route::config::{ManagerConfig, ManagerSettings, MapView, Reader, RuleConfig};
use crate::route::metrics::RouteMetrics;
use crate::route::rules::Facts;
use crate::shared::shutdown::Shutdown;

/// A running manager.
pub trait Manager: Send + Sync {
    fn config(&self) -> &ManagerConfig;

    /// Starts background work (GoCD polling); stopped when `shutdown`
    /// becomes true.
    fn start(&self, _shutdown: Shutdown) -> Vec<JoinHandle<()>> {
        Vec::new()
    }

    /// The GoCD data source, for managers that have one (status, metrics).
    fn gocd(&self) -> Option<&Arc<gocd::GocdSource>> {
        None
    }

    /// Why the mail this manager wants must not be decided on yet (GoCD
    /// has not answered since start); `None` when it may. Held mail waits
    /// in the spool and is routed once this says `None`; a manager bounds
    /// how long it says so.
    fn holds(&self) -> Option<String> {
        None
    }

    /// What the manager knows about a message with this decoded subject.
    /// May advance per-message state (GoCD's last event per pipeline);
    /// may wait a short, bounded time for data at startup. Appends its
    /// findings to `trace`.
    fn facts<'a>(&'a self, subject: String, trace: &'a mut Vec<String>) -> BoxFuture<'a, Facts>;

    /// For `--test`: what the rules would do for every case the manager
    /// can enumerate (GoCD: every pipeline and event); `None` when there is
    /// nothing to enumerate.
    fn selftest(&self) -> BoxFuture<'_, Option<String>> {
        Box::pin(async { None })
    }
}

/// A manager's entry in the registry.
pub struct ManagerSpec {
    /// The `name:` in the configuration.
    pub name: &'static str,
    /// Keys besides `name`, `messages-we-want` and `rules`.
    pub extra_keys: &'static [&'static str],
    /// Whether rule filters may have `events:`.
    pub has_events: bool,
    /// Reads the manager's own keys (knowing its rules); problems go to
    /// the reader.
    pub parse: fn(&mut Reader, &MapView<'_>, &str, &[RuleConfig]) -> ManagerSettings,
    /// Builds the running manager; the error (e.g. no TLS backend) is the
    /// reason it cannot run.
    pub build: BuildFn,
}

/// Builds a running manager from its configuration.
pub type BuildFn = fn(&ManagerConfig, &BuildContext<'_>) -> Result<Arc<dyn Manager>, String>;

/// What a manager is built with besides its configuration.
#[derive(Default)]
pub struct BuildContext<'a> {
    /// Where its counters go (`None`: `--check`, `--explain`, tests).
    pub metrics: Option<&'a RouteMetrics>,
    /// The managers of the configuration a reload replaces, so a manager
    /// can carry over what they learnt (GoCD's pipeline states).
    pub previous: &'a [Arc<dyn Manager>],
}

pub const MANAGERS: &[&ManagerSpec] = &[&mail::SPEC, &gocd::SPEC];

pub fn lookup(name: &str) -> Option<&'static ManagerSpec> {
    MANAGERS.iter().copied().find(|m| m.name == name)
}
