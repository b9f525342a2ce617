//! `mailgend send`: one run by hand, every due group (`--all`, what
//! `intelmqcbmail --all` does) or page by page in a terminal (review).

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;

use tracing::info;

use super::command::{load_config, CommandError};
use crate::config::ConfigSource;
use crate::notify::pipeline::{self, Pipeline, RunOptions};

/// The options of `mailgend send`.
#[derive(Debug, Clone, Copy)]
pub struct SendOptions {
    pub all: bool,
    pub dry_run: bool,
    /// Groups per page in review.
    pub batch_size: usize,
    pub verbose: u8,
}

/// Exit 1 when a group erred, 2 when review has no terminal.
pub async fn run(source: &ConfigSource, o: SendOptions) -> Result<ExitCode, CommandError> {
    if !o.all && !std::io::stdin().is_terminal() {
        eprintln!(
            "mailgend send: interactive review needs a terminal, and standard input \
             is not one. Use `mailgend send --all` to send every due notification \
             without asking, or `mailgend preview` to see what would be sent."
        );
        return Ok(ExitCode::from(2));
    }
    let config = load_config(source, o.verbose)?;
    let pipeline = Arc::new(Pipeline::load(config).map_err(CommandError::Setup)?);
    let opts = RunOptions {
        dry_run: o.dry_run,
        list_event_ids: o.verbose >= 2,
    };
    // The target stays `mailgend`, as when these lines came from the
    // binary: operators filter on it (docs/operations.md).
    if opts.dry_run {
        info!(
            target: "mailgend",
            "Running dry-run mode. Not sending mails and not writing changes to the database."
        );
    }
    if !o.all {
        let mut input = tokio::io::BufReader::new(tokio::io::stdin());
        let mut out = std::io::stdout();
        let total =
            super::review::run(pipeline, opts, o.batch_size.max(1), &mut input, &mut out).await?;
        return Ok(exit(total.errors));
    }
    let summary = pipeline::run_once(pipeline, opts).await?;
    let line = if opts.dry_run {
        format!("Simulation: {summary}")
    } else {
        summary.to_string()
    };
    info!(target: "mailgend", "{line}");
    println!("{line}");
    Ok(exit(summary.errors))
}

fn exit(errors: usize) -> ExitCode {
    if errors > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
