//! What every command shares: its error type, and loading the notifier's
//! configuration with logging set up from it.

use std::path::PathBuf;
use std::sync::Arc;

use tracing::warn;

use crate::config::{Config, ConfigError, ConfigSource};

/// Why a command failed. `main` prints it with its causes and exits 2.
/// The larger errors are boxed: this travels through every command's
/// `Result`.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("loading formats, templates and key")]
    Setup(#[source] crate::notify::pipeline::SetupError),
    #[error(transparent)]
    Run(Box<crate::notify::pipeline::RunError>),
    #[error(transparent)]
    Review(Box<super::review::ReviewError>),
    #[error(transparent)]
    Preview(Box<super::preview::PreviewError>),
    #[error(transparent)]
    Status(#[from] super::status::StatusError),
    #[error(transparent)]
    Db(Box<crate::notify::db::DbError>),
    #[error(transparent)]
    Migrate(#[from] crate::notify::db::migrate::MigrateError),
    #[error(transparent)]
    Service(Box<crate::notify::service::ServiceError>),
    #[error(transparent)]
    Route(#[from] crate::route::service::RouteServiceError),
    #[error("reading {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Bounces(#[from] super::bounces::BouncesError),
}

/// The configuration `-c FILE` names (else the system file), merged with
/// the user's file as intelmqcbmail does.
pub fn source(config: Option<PathBuf>) -> ConfigSource {
    ConfigSource {
        system_file: config,
        user_file: None,
        skip_user_file: false,
    }
}

/// Loads the configuration, sets up logging from it, and logs unknown
/// keys. A refused configuration is logged at the default level.
pub fn load_config(source: &ConfigSource, verbose: u8) -> Result<Arc<Config>, CommandError> {
    let config = match Config::load(source) {
        Ok(c) => c,
        Err(e) => {
            crate::shared::logging::init("INFO", verbose);
            return Err(e.into());
        }
    };
    crate::shared::logging::init(&config.logging_level, verbose);
    for p in &config.unknown_keys {
        warn!("{p}");
    }
    Ok(Arc::new(config))
}

impl From<crate::notify::pipeline::RunError> for CommandError {
    fn from(e: crate::notify::pipeline::RunError) -> Self {
        CommandError::Run(Box::new(e))
    }
}

impl From<super::review::ReviewError> for CommandError {
    fn from(e: super::review::ReviewError) -> Self {
        CommandError::Review(Box::new(e))
    }
}

impl From<super::preview::PreviewError> for CommandError {
    fn from(e: super::preview::PreviewError) -> Self {
        CommandError::Preview(Box::new(e))
    }
}

impl From<crate::notify::db::DbError> for CommandError {
    fn from(e: crate::notify::db::DbError) -> Self {
        CommandError::Db(Box::new(e))
    }
}

impl From<crate::notify::service::ServiceError> for CommandError {
    fn from(e: crate::notify::service::ServiceError) -> Self {
        CommandError::Service(Box::new(e))
    }
}
