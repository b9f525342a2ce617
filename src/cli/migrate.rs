//! `mailgend db migrate`: create or update the mailgen tables, trigger and
//! grants (idempotent), and say what was applied.

use std::process::ExitCode;

use super::command::{load_config, CommandError};
use crate::config::ConfigSource;
use crate::notify::db;

pub async fn run(source: &ConfigSource, verbose: u8) -> Result<ExitCode, CommandError> {
    let config = load_config(source, verbose)?;
    let mut client = db::connect(&config.database).await?;
    let report = db::migrate::migrate(&mut client).await?;
    for (v, name) in &report.applied {
        println!("applied migration {v:04} {name}");
    }
    if report.applied.is_empty() {
        println!(
            "database is up to date ({} migrations)",
            report.already.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}
