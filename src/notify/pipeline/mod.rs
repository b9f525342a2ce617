//! One pass of the notification data path over every pending group.
//!
//! Owns the order of the steps for a group and their transaction:
//! claim the group's rows (`SKIP LOCKED`) → ask the formats → load events →
//! render with a provisional ticket (so a broken template consumes no
//! number) → draw tickets → render → MIME + signature → SMTP → mark sent →
//! COMMIT ([`process_group`], its stages in `group.rs`). A failing group is
//! rolled back and logged at ERROR with its directive and event ids; the
//! other groups go on. A bounded number of workers (`mailgend.workers`),
//! each with its own database connections, process groups concurrently
//! ([`pool`], the one pool behind [`run_once`], [`run_groups`] and the
//! service); MIME and signatures go to the signing pool ([`signing`]),
//! which spreads them over the cores without stalling the async workers.
//! Small groups that are waiting together take these steps as one batch
//! ([`batch`]) with the same guarantees.
//!
//! This file holds what a run needs ([`Pipeline`], the options, outcomes
//! and errors, a worker's [`Connections`]) and the two runs by hand.

use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use tokio_postgres::{Client, Transaction};
use tracing::{error, info, warn};

use crate::config::Config;
use crate::notify::db;
use crate::notify::directive::{self, Group};
use crate::notify::event::EventError;
use crate::notify::format::FormatSet;
use crate::notify::mail::MailContext;
use crate::notify::metrics::Metrics;
use crate::notify::render::template::TemplateStore;
use crate::notify::signature::Signer;
use crate::notify::ticket::TicketError;
use crate::shared::smtp::{Outbound, SmtpError};

pub mod batch;
mod group;
pub mod pool;
pub mod signing;

use pool::{Pool, PoolOptions, Source, Work};

pub(crate) use group::marked_directives;
use group::{note_accepted, record_refusal, Send, IN_FLIGHT};
pub use group::{process_group, DIRECTIVE_BUDGET};

/// Everything a run needs that does not change during it: one loaded
/// configuration with its formats, templates and signing key. A reload
/// builds a new one; work in flight keeps the one it started with.
pub struct Pipeline {
    pub config: Arc<Config>,
    pub formats: Arc<FormatSet>,
    pub templates: Arc<TemplateStore>,
    pub signer: Option<Arc<Signer>>,
    pub outbound: Outbound,
    mail_ctx: MailContext,
    /// Names this process in the outbox (`host:pid`).
    pub instance: String,
    /// Shared by every configuration the process loads.
    pub metrics: Arc<Metrics>,
}

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Formats(#[from] crate::notify::format::FormatLoadError),
    #[error(transparent)]
    Template(#[from] crate::notify::render::template::TemplateError),
    #[error("signing key: {0}")]
    Signer(#[from] crate::notify::signature::SignError),
    #[error(transparent)]
    Smtp(#[from] SmtpError),
}

impl Pipeline {
    /// Loads formats, templates and the signing key for `config`. Logs one
    /// WARN naming any Python format scripts found (they cannot run here).
    pub fn load(config: Arc<Config>) -> Result<Pipeline, SetupError> {
        Self::load_with_metrics(config, Arc::new(Metrics::new()))
    }

    /// [`Pipeline::load`] reporting to the process's metrics.
    pub fn load_with_metrics(
        config: Arc<Config>,
        metrics: Arc<Metrics>,
    ) -> Result<Pipeline, SetupError> {
        let formats = FormatSet::load(&config.script_directory, &config)?;
        if !formats.python_scripts().is_empty() {
            let names: Vec<String> = formats
                .python_scripts()
                .iter()
                .map(|p| p.display().to_string())
                .collect();
            warn!(
                scripts = %names.join(", "),
                "Python format scripts in script_directory are ignored; \
                 mailgend reads NN*.toml format files (see docs/formats.md)"
            );
        }
        let templates = TemplateStore::new(&config.template_dir)?;
        let signer = if config.openpgp.always_sign {
            let signer = load_signer(&config)?;
            // Says which library signs: the RSA speed differs 2.5-fold
            // between them (docs/performance.md).
            info!(
                key = %signer.fingerprint(),
                digest = signer.digest().micalg(),
                backend = %signer.backend(),
                "signing key loaded"
            );
            Some(Arc::new(signer))
        } else {
            None
        };
        let outbound = Outbound::new(&config.smtp, config.service.workers as u32)?
            .with_max_message_size(config.max_message_size);
        let mail_ctx = MailContext {
            sender: config.sender.clone(),
            sender_address: config.sender_address.clone(),
            sender_domain: config.sender_domain.clone(),
            verp: config.verp.clone(),
        };
        Ok(Pipeline {
            config,
            formats: Arc::new(formats),
            templates: Arc::new(templates),
            signer,
            outbound,
            mail_ctx,
            instance: instance_name(),
            metrics,
        })
    }
}

impl Pipeline {
    /// The sender settings every mail is built with.
    pub fn mail_ctx(&self) -> &MailContext {
        &self.mail_ctx
    }
}

/// `hostname:pid`, recorded with each outbox row so an operator can tell
/// which instance wrote it.
pub fn instance_name() -> String {
    let host = crate::shared::smtp::host_name().unwrap_or_else(|| "localhost".into());
    format!("{host}:{}", std::process::id())
}

/// Loads the signing key the way the configuration names it.
pub fn load_signer(config: &Config) -> Result<Signer, crate::notify::signature::SignError> {
    let pgp = &config.openpgp;
    match (&pgp.key_file, &pgp.gnupg_home) {
        // A key file signs as gpg would with the home's gpg.conf, if a
        // home is configured too.
        (Some(file), home) => {
            let signer = Signer::from_key_file(file, pgp.signing_key.as_deref())?;
            match home {
                Some(home) => signer.with_gnupg_conf(home),
                None => Ok(signer),
            }
        }
        (None, Some(home)) => {
            Signer::from_gnupg_home(home, pgp.signing_key.as_deref().unwrap_or(""))
        }
        (None, None) => unreachable!("config validation requires a key source"),
    }
}

/// Options of one run.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Render and sign everything; send nothing, write nothing, draw no
    /// ticket.
    pub dry_run: bool,
    /// Include event ids in the INFO line of each sent mail (`-vv`; ERROR
    /// lines always carry them).
    pub list_event_ids: bool,
}

/// The counts the old tool prints at the end of a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    pub sent: usize,
    pub postponed: usize,
    pub errors: usize,
    /// Groups left alone because another instance holds them.
    pub busy: usize,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} mails sent, {} postponed, {} errors.",
            self.sent, self.postponed, self.errors
        )
    }
}

/// What happened to one group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupOutcome {
    /// Mails accepted by SMTP (in a dry run: mails rendered).
    Sent { mails: usize },
    Postponed {
        reason: String,
        until: Option<DateTime<Utc>>,
    },
    /// Another instance holds the group.
    Busy,
    /// An in-doubt mail of the group waits for the operator.
    Held,
}

/// Why a group failed. The group stays pending.
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    #[error("no format handles this group (notification_format {0:?}, event_data_format {1:?})")]
    NoFormat(String, String),
    #[error("format {format}: {reason}")]
    Rejected { format: String, reason: String },
    /// The render error already names the format.
    #[error("{source}")]
    Render {
        format: String,
        #[source]
        source: crate::notify::format::RenderError,
    },
    #[error("loading events: {0}")]
    Events(#[from] EventError),
    #[error(transparent)]
    Ticket(#[from] TicketError),
    #[error("building the mail: {0}")]
    Mail(#[from] crate::notify::mail::MailError),
    #[error(transparent)]
    TooBig(#[from] crate::notify::fit::TooBig),
    #[error("sending to {relay}: {source}")]
    Smtp {
        relay: String,
        #[source]
        source: SmtpError,
    },
    #[error("database: {}", db::describe(.0))]
    Db(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Connect(db::DbError),
    /// The worker could not open its database connections.
    #[error("{0}")]
    NoConnection(String),
    #[error("signing task failed: {0}")]
    Join(String),
    /// SMTP accepted mails of a batch, but recording them failed: they are
    /// in doubt, and the next attempt resends or holds them
    /// (`mailgend.in_doubt`).
    #[error("recording the sent mails failed, they are in doubt: {0}")]
    Recording(String),
    /// Some mails of the group went out and were recorded, a later one
    /// failed.
    #[error("{sent} of the group's mails were sent and recorded, then: {source}")]
    Partial {
        sent: usize,
        #[source]
        source: Box<GroupError>,
    },
}

impl GroupError {
    /// A failure that may go away by itself (SMTP 4xx or connection,
    /// database trouble): the service retries such groups with backoff.
    pub fn is_temporary(&self) -> bool {
        match self {
            GroupError::Smtp { source, .. } => source.is_temporary(),
            GroupError::Db(_) | GroupError::Connect(_) | GroupError::Recording(_) => true,
            GroupError::NoConnection(_) => true,
            GroupError::Events(EventError::Db(_)) => true,
            GroupError::Ticket(TicketError::Db(_)) => true,
            GroupError::Partial { source, .. } => source.is_temporary(),
            _ => false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Db(#[from] db::DbError),
    #[error(transparent)]
    Select(#[from] directive::SelectError),
    #[error(transparent)]
    Events(#[from] EventError),
    #[error("database: {0}")]
    Query(#[from] tokio_postgres::Error),
}

/// A worker's two connections: `main` carries the group's transaction (and
/// its row locks), `side` autocommits the outbox intents that must be
/// durable before SMTP sees a mail.
pub struct Connections {
    pub main: Client,
    pub side: Client,
    main_cache: db::StatementCache,
    side_cache: db::StatementCache,
}

impl Connections {
    pub async fn open(config: &Config) -> Result<Connections, db::DbError> {
        Ok(Connections {
            main: db::connect_worker(&config.database).await?,
            // Ticket draws and outbox intents: not key look-ups the planner
            // gets wrong, and the ticket draw's plan suffers without
            // sequential scans (ticket_day is one row without an index).
            side: db::connect(&config.database).await?,
            main_cache: db::StatementCache::default(),
            side_cache: db::StatementCache::default(),
        })
    }

    pub fn is_closed(&self) -> bool {
        self.main.is_closed() || self.side.is_closed()
    }

    /// Begins a group's (or batch's) transaction on `main`; `side` stays
    /// free for what must commit on its own.
    pub(crate) async fn begin(&mut self) -> Result<(Tx<'_>, Side<'_>), tokio_postgres::Error> {
        let inner = self.main.transaction().await?;
        Ok((
            Tx {
                inner,
                cache: &self.main_cache,
            },
            Side {
                client: &mut self.side,
                cache: &self.side_cache,
            },
        ))
    }
}

/// The transaction on a worker's `main` connection, with that
/// connection's statement cache.
pub(crate) struct Tx<'c> {
    inner: Transaction<'c>,
    cache: &'c db::StatementCache,
}

impl<'c> Tx<'c> {
    /// The transaction as a session that prepares through the cache.
    pub(crate) fn cached(&self) -> db::Cached<'_, Transaction<'c>> {
        db::Cached {
            client: &self.inner,
            cache: self.cache,
        }
    }

    pub(crate) async fn commit(self) -> Result<(), tokio_postgres::Error> {
        self.inner.commit().await
    }

    pub(crate) async fn rollback(self) -> Result<(), tokio_postgres::Error> {
        self.inner.rollback().await
    }
}

impl<'c> std::ops::Deref for Tx<'c> {
    type Target = Transaction<'c>;
    fn deref(&self) -> &Transaction<'c> {
        &self.inner
    }
}

/// A worker's `side` connection (autocommit) and its statement cache.
pub(crate) struct Side<'c> {
    pub(crate) client: &'c mut Client,
    pub(crate) cache: &'c db::StatementCache,
}

impl Side<'_> {
    /// The connection as a session that prepares through the cache.
    pub(crate) fn cached(&self) -> db::Cached<'_, Client> {
        db::Cached {
            client: &*self.client,
            cache: self.cache,
        }
    }
}

/// Logs a failed group the way operators grep for it (spec §3.4).
pub fn log_group_error(group: &Group, e: &GroupError) {
    error!(
        directive_ids = %group.directive_ids_display(),
        event_ids = %group.event_ids_display(),
        recipient = %group.key.recipient_address,
        template = %group.key.template_name,
        "Could not create or send mails for group: {e}. \
         Its directives stay pending; continuing with other groups."
    );
}

/// One pass over every pending group (`mailgend send --all`).
///
/// Groups stream from the selection query through the pool's bounded
/// channel to the workers: memory stays bounded however many directives
/// are pending.
pub async fn run_once(pipeline: Arc<Pipeline>, opts: RunOptions) -> Result<Summary, RunError> {
    use futures::StreamExt;
    let client = db::connect(&pipeline.config.database).await?;
    let workers = pipeline.config.service.workers.max(1);
    let (feeder, mut results) = Pool::open(
        Source::Fixed(pipeline.clone()),
        PoolOptions {
            workers,
            // Room for every worker to gather a batch.
            queue: workers * batch::BATCH_GROUPS,
            batches: true,
            run: opts,
            reconnect: false,
        },
    )
    .await?;

    let produce = async move {
        let mut selected = 0usize;
        let stream = directive::pending_groups_materialized(
            &client,
            pipeline
                .config
                .database
                .additional_directive_where
                .as_deref(),
        )
        .await?;
        futures::pin_mut!(stream);
        while let Some(group) = stream.next().await {
            let work = Work {
                slot: selected,
                group: group?,
            };
            selected += 1;
            if !feeder.send(work).await {
                break;
            }
        }
        // `feeder` drops here: the workers end once the channel is empty.
        Ok::<usize, RunError>(selected)
    };
    let mut s = Summary::default();
    // Tallied as the results come, so that they do not pile up.
    let tally_all = async {
        while let Some(done) = results.recv().await {
            tally(&mut s, &done.group, done.result);
        }
    };
    let (produced, ()) = tokio::join!(produce, tally_all);
    results.join().await;
    let selected = produced?;
    info!(groups = selected, "pending directive groups processed");
    if s.busy > 0 {
        info!(
            groups = s.busy,
            "groups skipped: another instance is sending them, or an in-doubt mail is held"
        );
    }
    Ok(s)
}

/// Adds a group's outcome to the run's counts; logs a failure.
fn tally(s: &mut Summary, group: &Group, result: Result<GroupOutcome, GroupError>) {
    match result {
        Ok(GroupOutcome::Sent { mails }) => s.sent += mails,
        Ok(GroupOutcome::Postponed { .. }) => s.postponed += 1,
        Ok(GroupOutcome::Busy) | Ok(GroupOutcome::Held) => s.busy += 1,
        Err(e) => {
            s.errors += 1;
            if let GroupError::Partial { sent, .. } = &e {
                s.sent += sent;
            }
            log_group_error(group, &e);
        }
    }
}

/// Drives exactly `groups` through the data path, each with the same
/// guarantees as in [`run_once`]: claimed with `SKIP LOCKED` and re-checked
/// to be pending (a group another instance sent or is sending comes back
/// [`GroupOutcome::Busy`]), outbox, tickets, marked sent. For interactive
/// review, which sends the groups an operator chose. Failed groups are
/// logged like in [`run_once`]; results come in the order of `groups`.
pub async fn run_groups(
    pipeline: Arc<Pipeline>,
    groups: Vec<Group>,
    opts: RunOptions,
) -> Result<Vec<Result<GroupOutcome, GroupError>>, RunError> {
    if groups.is_empty() {
        return Ok(Vec::new());
    }
    let n = groups.len();
    // All connections first: a failure here must not abort workers that
    // are already sending.
    let (feeder, mut results) = Pool::open(
        Source::Fixed(pipeline.clone()),
        PoolOptions {
            workers: pipeline.config.service.workers.clamp(1, n),
            // Every chosen group at once: handing them in never waits.
            queue: n,
            // One group at a time, each in its own transaction.
            batches: false,
            run: opts,
            reconnect: false,
        },
    )
    .await?;
    for (slot, group) in groups.into_iter().enumerate() {
        if !feeder.send(Work { slot, group }).await {
            break;
        }
    }
    drop(feeder);
    let mut slots: Vec<Option<Result<GroupOutcome, GroupError>>> = (0..n).map(|_| None).collect();
    while let Some(done) = results.recv().await {
        if let Err(e) = &done.result {
            log_group_error(&done.group, e);
        }
        slots[done.slot] = Some(done.result);
    }
    results.join().await;
    Ok(slots
        .into_iter()
        .map(|s| s.unwrap_or_else(|| Err(GroupError::Join("worker task failed".into()))))
        .collect())
}
