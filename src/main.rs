//! The `mailgend` command line: parses the arguments and dispatches to
//! `mailgend::cli` (or the notifier's service); the binary edge, where
//! errors become exit codes and log lines.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing::error;

use mailgend::cli;
use mailgend::config::ConfigSource;

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
    Status {
        /// Also the bounces to VERP addresses: counts by class, the newest.
        #[arg(long)]
        bounces: bool,
    },
    /// List the bounces `mailgend route` recorded for VERP addresses, newest
    /// first, with their tickets (see docs/operations.md).
    Bounces {
        /// Only those received since: a duration back from now (7d, 12h)
        /// or a date (2026-12-01, RFC 3339).
        #[arg(long, value_name = "DURATION|DATE")]
        since: Option<String>,
        /// Only those for this recipient (case-insensitive).
        #[arg(long, value_name = "ADDRESS")]
        recipient: Option<String>,
        /// At most N bounces.
        #[arg(long, value_name = "N", default_value_t = 1000)]
        limit: i64,
        /// One JSON document instead of text.
        #[arg(long)]
        json: bool,
    },
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
    cli::command::source(cli.config.clone())
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let v = cli.verbose;
    let code = match &cli.command {
        Command::Send {
            all,
            dry_run,
            batch_size,
        } => {
            let o = cli::send::SendOptions {
                all: *all,
                dry_run: *dry_run,
                batch_size: *batch_size,
                verbose: v,
            };
            cli::send::run(&source(&cli), o).await?
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
            use mailgend::notify::directive::{DirectiveId, EventId};
            let filter = cli::preview::PreviewFilter {
                recipient: recipient.clone(),
                template: template.clone(),
                directive_ids: directives.iter().copied().map(DirectiveId).collect(),
                event_ids: events.iter().copied().map(EventId).collect(),
                limit: *limit,
            };
            let print = cli::preview::PrintOptions {
                json: *json,
                attachments: *attachments,
                fail_on_error: *fail_on_error,
            };
            cli::preview::run(&source(&cli), v, &filter, print).await?
        }
        Command::Db {
            command: DbCommand::Migrate,
        } => cli::migrate::run(&source(&cli), v).await?,
        Command::CheckConfig => {
            mailgend::shared::logging::init("WARNING", v);
            cli::check_config::run(&source(&cli))
        }
        #[cfg(not(feature = "dev-tools"))]
        Command::NotInThisBuild { .. } => {
            eprintln!(
                "mailgend: `demo` and `bench` are not in this build (the Debian package \
                 leaves them out); they run from a source build: `cargo run --release -- demo` \
                 (see /usr/share/doc/mailgend/install.md)"
            );
            ExitCode::from(2)
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
            mailgend::shared::logging::init("WARNING", v);
            if mode == "route" {
                mailgend::route::bench::run(*messages).await?;
                return Ok(ExitCode::SUCCESS);
            }
            let signed = match signing.as_str() {
                "signed" => vec![true],
                "unsigned" => vec![false],
                _ => vec![false, true],
            };
            cli::bench::run(cli::bench::BenchOptions {
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
            ExitCode::SUCCESS
        }
        Command::Run => {
            let config = cli::command::load_config(&source(&cli), v)?;
            mailgend::notify::service::run(source(&cli), config).await?;
            ExitCode::SUCCESS
        }
        Command::Status { bounces } => cli::status::run(&source(&cli), v, *bounces).await?,
        Command::Bounces {
            since,
            recipient,
            limit,
            json,
        } => {
            let o = cli::bounces::BouncesOptions {
                since: since.clone(),
                recipient: recipient.clone(),
                json: *json,
                limit: *limit,
            };
            cli::bounces::run(&source(&cli), v, &o).await?
        }
        Command::InDoubt { command } => {
            use cli::status::{InDoubtAction as A, InDoubtCommand as C};
            let c = match command {
                InDoubtCommand::List => C::List,
                InDoubtCommand::Release { ids } => C::Act(ids.clone(), A::Release),
                InDoubtCommand::MarkSent { ids } => C::Act(ids.clone(), A::MarkSent),
                InDoubtCommand::Discard { ids } => C::Act(ids.clone(), A::Discard),
            };
            cli::status::run_in_doubt(&source(&cli), v, c).await?
        }
        Command::Route {
            check,
            strict,
            explain,
            from,
            to,
            test,
        } => {
            cli::route::run(cli::route::RouteOptions {
                config: cli.config.clone(),
                verbose: v,
                check: *check,
                strict: *strict,
                explain: explain.clone(),
                from: from.clone(),
                to: to.clone(),
                test: *test,
            })
            .await?
        }
        #[cfg(feature = "dev-tools")]
        Command::Demo { events, maildir } => {
            // The demo prints its own story; per-mail log lines only with -v.
            mailgend::shared::logging::init("WARNING", v);
            cli::demo::run(*events, maildir.clone()).await?;
            ExitCode::SUCCESS
        }
    };
    Ok(code)
}
