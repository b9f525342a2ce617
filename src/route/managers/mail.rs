//! The `mail` manager: rules that need nothing beyond the message itself
//! (`mail.in_subject`).

use std::sync::Arc;

use futures::future::BoxFuture;

use super::{Manager, ManagerSpec};
use crate::route::config::{ManagerConfig, ManagerSettings, MapView, Reader, RuleConfig};
use crate::route::rules::Facts;

pub const SPEC: ManagerSpec = ManagerSpec {
    name: "mail",
    extra_keys: &[],
    has_events: false,
    parse,
    build,
};

fn parse(_r: &mut Reader, _m: &MapView<'_>, _k: &str, _rules: &[RuleConfig]) -> ManagerSettings {
    ManagerSettings::Mail
}

fn build(cfg: &ManagerConfig, _: &super::BuildContext<'_>) -> Result<Arc<dyn Manager>, String> {
    Ok(Arc::new(MailManager { cfg: cfg.clone() }))
}

pub struct MailManager {
    cfg: ManagerConfig,
}

impl Manager for MailManager {
    fn config(&self) -> &ManagerConfig {
        &self.cfg
    }

    fn facts<'a>(&'a self, subject: String, _trace: &'a mut Vec<String>) -> BoxFuture<'a, Facts> {
        Box::pin(async move {
            Facts {
                subject,
                ..Facts::default()
            }
        })
    }
}
