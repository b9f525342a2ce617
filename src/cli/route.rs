//! `mailgend route`: the alert router, or one of its offline modes
//! (`--check`, `--explain FILE.eml`, `--test`).

use std::path::PathBuf;
use std::process::ExitCode;

use super::command::CommandError;
use crate::route;

/// The options of `mailgend route`.
#[derive(Debug, Clone, Default)]
pub struct RouteOptions {
    /// `-c FILE`: the router's configuration.yml.
    pub config: Option<PathBuf>,
    pub verbose: u8,
    pub check: bool,
    pub strict: bool,
    pub explain: Option<PathBuf>,
    pub from: Option<String>,
    pub to: Vec<String>,
    pub test: bool,
}

/// Runs the router until SIGTERM, or one offline mode (exit 1 when the
/// configuration is refused).
pub async fn run(o: RouteOptions) -> Result<ExitCode, CommandError> {
    // mail2alert's LOGLEVEL (Python level names) sets the level.
    let level = std::env::var("LOGLEVEL").unwrap_or_else(|_| "INFO".to_string());
    // Its own journal identifier: `journalctl -t mailgend-route`.
    crate::shared::logging::init_as("mailgend-route", &level, o.verbose);
    let path = route::config::locate(o.config.as_deref());
    if o.check {
        return Ok(match route::check::check(&path, o.strict) {
            Ok(summary) => {
                print!("{summary}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                println!("{e}");
                ExitCode::from(1)
            }
        });
    }
    if o.explain.is_some() || o.test {
        let cfg = match route::config::load(&path) {
            Ok(c) => c,
            Err(e) => {
                println!("{e}");
                return Ok(ExitCode::from(1));
            }
        };
        let out = match &o.explain {
            Some(eml) => {
                let data = std::fs::read(eml).map_err(|source| CommandError::Read {
                    path: eml.clone(),
                    source,
                })?;
                route::check::explain(&cfg, &data, o.from.as_deref(), &o.to).await
            }
            None => route::check::selftest(&cfg).await,
        };
        print!("{out}");
        return Ok(ExitCode::SUCCESS);
    }
    route::service::run(&path).await?;
    Ok(ExitCode::SUCCESS)
}
