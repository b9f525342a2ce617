//! The `mailgend` command line: the binary edge, where errors become exit
//! codes and log lines.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing::{error, info, warn};

use mailgend::config::{Config, ConfigSource};
use mailgend::notify::pipeline::{self, Pipeline, RunOptions};

#[derive(Parser)]
#[command(
    name = "mailgend",
    version,
    about = "IntelMQ notification mailer (drop-in for intelmqcbmail)",
    after_help = "Configuration: /etc/intelmq/intelmq-mailgen.conf (or -c FILE) merged with \
                  ~/.intelmq/intelmq-mailgen.conf, the user file winning. See docs/config.md."
)]
struct Cli {
    /// Configuration file. For `route`: the router's configuration.yml
    /// (mail2alert's; default $MAIL2ALERT_CONFIGURATION, else
    /// ./configuration.yml). Otherwise: replaces
    /// /etc/intelmq/intelmq-mailgen.conf (the user file is still read).
    #[arg(short, long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// More logging; -vv also lists event ids per group.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Send pending notifications once: with --all every one (what
    /// `intelmqcbmail --all` does); without it, page through them and choose
    /// in a terminal (see docs/review.md).
    Send {
        /// Process all pending directives non-interactively.
        #[arg(short, long)]
        all: bool,
        /// Render and sign everything, send nothing, write nothing, draw no
        /// ticket numbers.
        #[arg(short = 'n', long)]
        dry_run: bool,
        /// Groups per page in interactive review.
        #[arg(short = 'N', long, default_value_t = 10)]
        batch_size: usize,
    },
    /// Show what would be sent for pending groups, rendered as `send` renders
    /// it, without drawing ticket numbers, writing or sending anything.
    Preview {
        /// Only groups for this recipient_address (case-insensitive).
        #[arg(long, value_name = "ADDRESS")]
        recipient: Option<String>,
        /// Only groups with this template_name.
        #[arg(long, value_name = "NAME")]
        template: Option<String>,
        /// Only the group containing this directive (repeatable).
        #[arg(long = "directive", value_name = "ID")]
        directives: Vec<i64>,
        /// Only groups containing this event (repeatable).
        #[arg(long = "event", value_name = "ID")]
        events: Vec<i64>,
        /// At most N groups, oldest first.
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
        /// One JSON document instead of text.
        #[arg(long)]
        json: bool,
        /// Text output: also print the content of attachments.
        #[arg(long)]
        attachments: bool,
        /// Exit 1 when a shown group would fail (no format, template or
        /// recipient error); otherwise such groups only show the error.
        #[arg(long)]
        fail_on_error: bool,
    },
    /// Run as a service: send each notification as soon as it is due, until
    /// SIGTERM (SIGHUP reloads the configuration).
    Run,
    /// Show what is pending, due, held or in doubt, and what was sent lately.
    Status,
    /// Mails whose delivery is in doubt after a crash (see docs/operations.md).
    InDoubt {
        #[command(subcommand)]
        command: InDoubtCommand,
    },
    /// Measure the pipeline on a throw-away installation and print figures
    /// (see docs/performance.md).
    #[cfg(feature = "dev-tools")]
    Bench {
        /// Event counts, comma-separated.
        #[arg(long, value_delimiter = ',', default_values_t = [1000usize, 10000])]
        events: Vec<usize>,
        /// Runs per case (the table shows medians and the spread).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Cases: signed, unsigned or both.
        #[arg(long, default_value = "both")]
        signing: String,
        /// mailgend.workers for the runs (the work waits mostly on
        /// PostgreSQL and SMTP round trips, so more than the core count).
        #[arg(long, default_value_t = 8)]
        workers: usize,
        /// Which mode: oneshot (send --all), service (run under load) or all;
        /// `route` measures the alert router instead (docs/router.md).
        #[arg(long, default_value = "all")]
        mode: String,
        /// Route mode: messages per case.
        #[arg(long, default_value_t = 2000)]
        messages: usize,
        /// Service mode: events inserted per second.
        #[arg(long, default_value_t = 200)]
        rate: usize,
        /// Service mode: seconds of insert load.
        #[arg(long, default_value_t = 20)]
        duration: u64,
        /// Measure on the sandbox's fsync=off cluster instead of a durable
        /// one (fsync and synchronous_commit on, as users run PostgreSQL).
        #[arg(long)]
        fast_db: bool,
    },
    /// Database objects.
    Db {
        #[command(subcommand)]
        command: DbCommand,
    },
    /// Load configuration, formats, templates and the signing key and report
    /// every problem at once.
    CheckConfig,
    /// The alert router (mail2alert's job): an SMTP server that routes alert
    /// mail by rules and forwards the rest unchanged. Configuration: -c FILE,
    /// else $MAIL2ALERT_CONFIGURATION, else ./configuration.yml; LOGLEVEL=
    /// DEBUG|INFO|WARNING|ERROR. SIGHUP reloads. See docs/router.md.
    Route {
        /// Check the configuration, print a summary and a WARN line per
        /// oddity mail2alert would have run with; exit 1 on problems.
        #[arg(long, conflicts_with_all = ["explain", "test"])]
        check: bool,
        /// Refuse the oddities too (exit 1); needs --check.
        #[arg(long, requires = "check")]
        strict: bool,
        /// Say what would happen to this message (an .eml file); sends
        /// nothing.
        #[arg(long, value_name = "FILE.eml", conflicts_with = "test")]
        explain: Option<PathBuf>,
        /// Envelope sender for --explain (default: the From header).
        #[arg(long, value_name = "ADDR", requires = "explain")]
        from: Option<String>,
        /// Envelope recipient for --explain, repeatable (default: the To
        /// header).
        #[arg(long, value_name = "ADDR", requires = "explain")]
        to: Vec<String>,
        /// Self-test: ask the configured GoCD servers and show what each
        /// rule would match.
        #[arg(long)]
        test: bool,
    },
    /// Bring up a throw-away PostgreSQL and SMTP receiver, feed realistic
    /// events, send signed mails, show them, tear everything down.
    #[cfg(feature = "dev-tools")]
    Demo {
        /// Number of IntelMQ events to insert.
        #[arg(long, default_value_t = 300)]
        events: usize,
        /// Where to keep the received mails (a Maildir).
        #[arg(long)]
        maildir: Option<PathBuf>,
    },
    /// `demo` and `bench` in a build without them (the Debian package's):
    /// say where they are instead of "unrecognized subcommand".
    #[cfg(not(feature = "dev-tools"))]
    #[command(hide = true, name = "demo", alias = "bench")]
    NotInThisBuild {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Subcommand)]
enum InDoubtCommand {
    /// List open mails: in doubt, held, or waiting for a retry.
    List,
    /// Send these held mails again (same bytes, Message-Id and ticket).
    Release { ids: Vec<i64> },
    /// Record these mails as delivered without sending them again.
    MarkSent { ids: Vec<i64> },
    /// Forget these mails; their directives are rendered anew (new ticket).
    Discard { ids: Vec<i64> },
}

#[derive(Subcommand)]
enum DbCommand {
    /// Create or update the mailgen tables, trigger and grants (idempotent).
    Migrate,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // glibc gives every thread that ever allocated its own arena and keeps
    // freed memory in each: after a large group (tens of MB of CSV and MIME)
    // passed through several threads, the process kept it all. Two arenas
    // bound that; the allocation rate here is far too low for contention.
    // SAFETY: called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mailgend: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            error!("{e:#}");
            eprintln!("mailgend: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn source(cli: &Cli) -> ConfigSource {
    ConfigSource {
        system_file: cli.config.clone(),
        user_file: None,
        skip_user_file: false,
    }
}

/// Loads the config, sets up logging from it, and logs unknown keys.
fn load_config(cli: &Cli) -> anyhow::Result<Arc<Config>> {
    let config = match Config::load(&source(cli)) {
        Ok(c) => c,
        Err(e) => {
            init_logging("INFO", cli.verbose);
            return Err(anyhow::anyhow!("{e}"));
        }
    };
    init_logging(&config.logging_level, cli.verbose);
    for p in &config.unknown_keys {
        warn!("{p}");
    }
    Ok(Arc::new(config))
}

fn init_logging(level: &str, verbose: u8) {
    mailgend::shared::logging::init(level, verbose);
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match &cli.command {
        Command::Send {
            all,
            dry_run,
            batch_size,
        } => {
            if !all && !std::io::stdin().is_terminal() {
                eprintln!(
                    "mailgend send: interactive review needs a terminal, and standard input \
                     is not one. Use `mailgend send --all` to send every due notification \
                     without asking, or `mailgend preview` to see what would be sent."
                );
                return Ok(ExitCode::from(2));
            }
            let config = load_config(&cli)?;
            let pipeline =
                Arc::new(Pipeline::load(config).context("loading formats, templates and key")?);
            let opts = RunOptions {
                dry_run: *dry_run,
                list_event_ids: cli.verbose >= 2,
            };
            if opts.dry_run {
                info!("Running dry-run mode. Not sending mails and not writing changes to the database.");
            }
            if !all {
                let mut input = tokio::io::BufReader::new(tokio::io::stdin());
                let mut out = std::io::stdout();
                let total = mailgend::cli::review::run(
                    pipeline,
                    opts,
                    (*batch_size).max(1),
                    &mut input,
                    &mut out,
                )
                .await?;
                return Ok(if total.errors > 0 {
                    ExitCode::from(1)
                } else {
                    ExitCode::SUCCESS
                });
            }
            let summary = pipeline::run_once(pipeline, opts).await?;
            let line = if opts.dry_run {
                format!("Simulation: {summary}")
            } else {
                summary.to_string()
            };
            info!("{line}");
            println!("{line}");
            Ok(if summary.errors > 0 {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Preview {
            recipient,
            template,
            directives,
            events,
            limit,
            json,
            attachments,
            fail_on_error,
        } => {
            use mailgend::cli::preview;
            use mailgend::notify::directive::{DirectiveId, EventId};
            let config = load_config(&cli)?;
            let pipeline = Pipeline::load(config).context("loading formats, templates and key")?;
            let filter = preview::PreviewFilter {
                recipient: recipient.clone(),
                template: template.clone(),
                directive_ids: directives.iter().copied().map(DirectiveId).collect(),
                event_ids: events.iter().copied().map(EventId).collect(),
                limit: *limit,
            };
            let groups = preview::preview(&pipeline, &filter).await?;
            if *json {
                let doc = serde_json::json!({
                    "note": "Preview only: nothing was sent, no ticket number was drawn, \
                             nothing was written. Tickets are the ones the next draws would \
                             give if these groups were sent in this order and nobody else \
                             drew numbers meanwhile; Date and Message-Id are made anew when \
                             a mail is really sent.",
                    "groups": groups,
                });
                println!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                print!(
                    "{}",
                    preview::to_text(
                        &groups,
                        preview::TextOptions {
                            attachment_content: *attachments
                        }
                    )
                );
            }
            let failed = groups.iter().any(|g| g.outcome.is_error());
            Ok(if *fail_on_error && failed {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Db {
            command: DbCommand::Migrate,
        } => {
            let config = load_config(&cli)?;
            let mut client = mailgend::notify::db::connect(&config.database).await?;
            let report = mailgend::notify::db::migrate::migrate(&mut client).await?;
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
        Command::CheckConfig => {
            init_logging("WARNING", cli.verbose);
            Ok(mailgend::cli::check_config::run(&source(&cli)))
        }
        #[cfg(not(feature = "dev-tools"))]
        Command::NotInThisBuild { .. } => {
            eprintln!(
                "mailgend: `demo` and `bench` are not in this build (the Debian package \
                 leaves them out); they run from a source build: `cargo run --release -- demo` \
                 (see /usr/share/doc/mailgend/install.md)"
            );
            Ok(ExitCode::from(2))
        }
        #[cfg(feature = "dev-tools")]
        Command::Bench {
            events,
            runs,
            signing,
            workers,
            mode,
            rate,
            duration,
            fast_db,
            messages,
        } => {
            init_logging("WARNING", cli.verbose);
            if mode == "route" {
                mailgend::route::bench::run(*messages).await?;
                return Ok(ExitCode::SUCCESS);
            }
            let signed = match signing.as_str() {
                "signed" => vec![true],
                "unsigned" => vec![false],
                _ => vec![false, true],
            };
            mailgend::cli::bench::run(mailgend::cli::bench::BenchOptions {
                events: events.clone(),
                runs: (*runs).max(1),
                signed,
                workers: *workers,
                oneshot: mode != "service",
                service: mode != "oneshot",
                rate: *rate,
                duration: std::time::Duration::from_secs(*duration),
                fast_db: *fast_db,
            })
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Run => {
            let config = load_config(&cli)?;
            mailgend::notify::service::run(source(&cli), config).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status => {
            let config = load_config(&cli)?;
            let client = mailgend::notify::db::connect(&config.database).await?;
            print!("{}", mailgend::cli::status::report(&client, &config).await?);
            Ok(ExitCode::SUCCESS)
        }
        Command::InDoubt { command } => {
            let config = load_config(&cli)?;
            let mut client = mailgend::notify::db::connect(&config.database).await?;
            use mailgend::cli::status::InDoubtAction as A;
            let out = match command {
                InDoubtCommand::List => mailgend::cli::status::in_doubt_list(&client).await?,
                InDoubtCommand::Release { ids } => {
                    mailgend::cli::status::in_doubt_act(&mut client, ids, A::Release).await?
                }
                InDoubtCommand::MarkSent { ids } => {
                    mailgend::cli::status::in_doubt_act(&mut client, ids, A::MarkSent).await?
                }
                InDoubtCommand::Discard { ids } => {
                    mailgend::cli::status::in_doubt_act(&mut client, ids, A::Discard).await?
                }
            };
            print!("{out}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Route {
            check,
            strict,
            explain,
            from,
            to,
            test,
        } => {
            use mailgend::route;
            // mail2alert's LOGLEVEL (Python level names) sets the level.
            let level = std::env::var("LOGLEVEL").unwrap_or_else(|_| "INFO".to_string());
            // Its own journal identifier: `journalctl -t mailgend-route`.
            mailgend::shared::logging::init_as("mailgend-route", &level, cli.verbose);
            let path = route::config::locate(cli.config.as_deref());
            if *check {
                return Ok(match route::check::check(&path, *strict) {
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
            if explain.is_some() || *test {
                let cfg = match route::config::load(&path) {
                    Ok(c) => c,
                    Err(e) => {
                        println!("{e}");
                        return Ok(ExitCode::from(1));
                    }
                };
                let out = match explain {
                    Some(eml) => {
                        let data = std::fs::read(eml)
                            .with_context(|| format!("reading {}", eml.display()))?;
                        route::check::explain(&cfg, &data, from.as_deref(), to).await
                    }
                    None => route::check::selftest(&cfg).await,
                };
                print!("{out}");
                return Ok(ExitCode::SUCCESS);
            }
            route::service::run(&path).await?;
            Ok(ExitCode::SUCCESS)
        }
        #[cfg(feature = "dev-tools")]
        Command::Demo { events, maildir } => {
            // The demo prints its own story; per-mail log lines only with -v.
            init_logging("WARNING", cli.verbose);
            mailgend::cli::demo::run(*events, maildir.clone()).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
