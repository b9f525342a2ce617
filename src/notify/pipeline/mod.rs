//! One pass of the notification data path over every pending group.
//!
//! Owns the order of the steps for a group and their transaction:
//! claim the group's rows (`SKIP LOCKED`) → ask the formats → load events →
//! render with a provisional ticket (so a broken template consumes no
//! number) → draw tickets → render → MIME + signature → SMTP → mark sent →
//! COMMIT. A failing group is rolled back and logged at ERROR with its
//! directive and event ids; the other groups go on. A bounded number of
//! workers (`mailgend.workers`), each with its own database connection,
//! process groups concurrently; MIME and signatures go to the signing pool
//! ([`signing`]), which spreads them over the cores without stalling the
//! async workers. Small groups that are waiting together
//! take these steps as one batch ([`batch`]) with the same guarantees.

use std::fmt;
use std::ops::ControlFlow;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use tokio_postgres::{Client, Transaction};
use tracing::{debug, error, info, warn};

use crate::config::Config;
use crate::config::InDoubtPolicy;
use crate::notify::db;
use crate::notify::directive::{self, Claim, DirectiveId, Group};
use crate::notify::event::{Event, EventColumns, EventError};
use crate::notify::format::{Decision, FormatSet, Plan, RenderContext};
use crate::notify::mail::{BuiltMail, MailContext, Notification};
use crate::notify::metrics::{FailReason, Metrics};
use crate::notify::outbox;
use crate::notify::render::template::TemplateStore;
use crate::notify::sent;
use crate::notify::signature::Signer;
use crate::notify::ticket::{self, Ticket, TicketError};
use crate::shared::smtp::{Outbound, RefusedRecipient, SmtpError};

pub mod batch;
pub mod pool;
pub mod signing;

use pool::{Pool, PoolOptions, Source, Work};

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
            Some(Arc::new(load_signer(&config)?))
        } else {
            None
        };
        let outbound = Outbound::new(&config.smtp, config.service.workers as u32)?
            .with_max_message_size(config.max_message_size);
        let mail_ctx = MailContext {
            sender: config.sender.clone(),
            sender_address: config.sender_address.clone(),
            sender_domain: config.sender_domain.clone(),
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

/// One mail ready for SMTP with the directives it marks sent.
struct Outgoing {
    mail: BuiltMail,
    ticket: Ticket,
    marks: Vec<DirectiveId>,
}

/// The directives a notification marks sent: none for copies, the covered
/// events' directives for per-event mails (X-ARF), else the whole group.
pub(crate) fn marked_directives(group: &Group, n: &Notification) -> Vec<DirectiveId> {
    if !n.mark_sent {
        return Vec::new();
    }
    match &n.covers {
        None => group.directive_ids.clone(),
        Some(events) => {
            // A set: a split part covers up to the whole group's events.
            let events: std::collections::HashSet<_> = events.iter().collect();
            group
                .directive_ids
                .iter()
                .zip(&group.event_ids)
                .filter(|(_, e)| events.contains(e))
                .map(|(d, _)| *d)
                .collect()
        }
    }
}

/// Directives (≈ event rows) that all groups in flight may hold in memory
/// together. A group's rows, its CSV and its MIME body are in memory while
/// it is rendered, ~1 KB per event; with Zipf-skewed feeds one network's
/// group can hold a tenth of a burst, and eight such groups at once took a
/// 1,000,000-event run to 589 MB. Groups take permits for their size (a
/// group larger than the budget takes all of it and runs alone), so small
/// groups flow freely and peak memory stays bounded.
pub const DIRECTIVE_BUDGET: usize = 40_000;
static IN_FLIGHT: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(DIRECTIVE_BUDGET);

/// Drives one group through the data path in its own transaction, stage
/// by stage in path order (each a method of [`GroupRun`]).
pub async fn process_group(
    p: &Pipeline,
    conns: &mut Connections,
    columns: &EventColumns,
    group: &Group,
    opts: RunOptions,
) -> Result<GroupOutcome, GroupError> {
    let permits = group.directive_ids.len().clamp(1, DIRECTIVE_BUDGET) as u32;
    let _in_flight = IN_FLIGHT
        .acquire_many(permits)
        .await
        .expect("the budget semaphore is never closed");
    let Some(mut run) = GroupRun::claim(p, conns, group, opts).await? else {
        return Ok(GroupOutcome::Busy);
    };
    // Mails of this group that an earlier attempt left open come first:
    // they already have tickets and Message-Ids.
    if !opts.dry_run {
        let open = outbox::open_for_group(&run.tx.cached(), &group.directive_ids).await?;
        if !open.is_empty() {
            return run.resume_open(open).await;
        }
    }
    let plan = match run.decide() {
        ControlFlow::Continue(plan) => plan,
        ControlFlow::Break(end) => return end,
    };
    let events = run.load_events(columns, &plan).await?;
    let needed = plan.tickets_needed(events.len());

    // Render once with provisional numbers: a template error or an unknown
    // placeholder must not consume ticket numbers (old tool defect).
    let provisional = run.provisional_tickets(needed).await?;
    let preview = run.render(&plan, &events, &provisional)?;
    if opts.dry_run {
        return run.dry_run(&plan, preview).await;
    }

    // A large group's rendering and events are tens of megabytes: hold
    // each only as long as it is needed.
    drop(preview);
    let tickets = ticket::draw_committed(run.side.client, Some(run.side.cache), needed).await?;
    let notifications = run.render(&plan, &events, &tickets)?;
    let outgoing = run.build(&plan, &events, notifications).await?;
    drop(events);
    let ids = run.record_intents(&outgoing).await?;
    let sends = outgoing
        .iter()
        .zip(&ids)
        .map(|(o, id)| Send {
            outbox_id: *id,
            from: &o.mail.envelope_from,
            to: &o.mail.envelope_to,
            bytes: &o.mail.bytes,
            ticket: &o.ticket,
            message_id: &o.mail.message_id,
            sent_at: o.mail.date,
            marks: &o.marks,
        })
        .collect::<Vec<_>>();
    run.deliver(&sends).await
}

/// A group on its way through the stages: claimed in its transaction on
/// the worker's main connection, with the side connection for what must
/// commit on its own (tickets, outbox intents).
struct GroupRun<'a> {
    p: &'a Pipeline,
    group: &'a Group,
    opts: RunOptions,
    tx: Tx<'a>,
    side: Side<'a>,
    /// The database's clock at the claim, not ours: instances on several
    /// hosts then agree on what is due.
    now: DateTime<Utc>,
}

impl<'a> GroupRun<'a> {
    /// Claims the group's rows (`SKIP LOCKED`); `None` when another
    /// instance holds some of them or they are no longer pending.
    async fn claim(
        p: &'a Pipeline,
        conns: &'a mut Connections,
        group: &'a Group,
        opts: RunOptions,
    ) -> Result<Option<GroupRun<'a>>, GroupError> {
        let (tx, side) = conns.begin().await?;
        let (claim, now) = directive::claim_at(&tx.cached(), group).await?;
        let Some(now) = now.filter(|_| claim == Claim::Claimed) else {
            return Ok(None);
        };
        Ok(Some(GroupRun {
            p,
            group,
            opts,
            tx,
            side,
            now,
        }))
    }

    /// Asks the formats: the plan to send, or the group's outcome now
    /// (postponed, no format, rejected).
    fn decide(&self) -> ControlFlow<Result<GroupOutcome, GroupError>, Plan> {
        let group = self.group;
        ControlFlow::Break(match self.p.formats.decide(group, self.now) {
            Decision::Send(plan) => return ControlFlow::Continue(plan),
            Decision::Postpone {
                format,
                reason,
                until,
            } => {
                debug!(
                    directive_ids = %group.directive_ids_display(),
                    format = %format,
                    "postponed: {reason}"
                );
                Ok(GroupOutcome::Postponed { reason, until })
            }
            Decision::NoMatch => Err(GroupError::NoFormat(
                group.key.notification_format.clone(),
                group.key.event_data_format.clone(),
            )),
            Decision::Error { format, reason } => Err(GroupError::Rejected { format, reason }),
        })
    }

    /// The group's events, with the columns the plan needs.
    async fn load_events(
        &self,
        columns: &EventColumns,
        plan: &Plan,
    ) -> Result<Vec<Event>, GroupError> {
        let event_ids = self.group.distinct_event_ids();
        Ok(columns
            .load(&self.tx.cached(), &event_ids, &plan.event_columns())
            .await?)
    }

    /// Numbers to render with before any is drawn. A dry run shows the
    /// numbers the next draws would most likely give; otherwise only the
    /// shape matters for the check (save the query).
    async fn provisional_tickets(&self, needed: usize) -> Result<Vec<Ticket>, GroupError> {
        Ok(if self.opts.dry_run {
            provisional_tickets(&self.tx, needed).await?
        } else {
            (0..needed as i64)
                .map(|i| Ticket::new(self.now.date_naive(), 10_000_001 + i))
                .collect()
        })
    }

    fn render(
        &self,
        plan: &Plan,
        events: &[Event],
        tickets: &[Ticket],
    ) -> Result<Vec<Notification>, GroupError> {
        plan.render(&RenderContext {
            group: self.group,
            events,
            tickets,
            templates: &self.p.templates,
            config: &self.p.config,
        })
        .map_err(|source| GroupError::Render {
            format: plan.format_name().to_string(),
            source,
        })
    }

    /// A dry run ends after building (and signing): nothing is sent,
    /// written or drawn.
    async fn dry_run(
        self,
        plan: &Plan,
        preview: Vec<Notification>,
    ) -> Result<GroupOutcome, GroupError> {
        let mails = build_all(self.p, preview, self.now).await?;
        for m in &mails {
            info!(
                to = %m.envelope_to.join(", "),
                bytes = m.bytes.len(),
                format = %plan.format_name(),
                "dry run: would send"
            );
        }
        self.tx.rollback().await?;
        Ok(GroupOutcome::Sent { mails: mails.len() })
    }

    /// MIME and signature, brought under the relay's size limit
    /// ([`crate::notify::fit`], which may render parts of the events anew
    /// and draw tickets for them).
    async fn build(
        &mut self,
        plan: &Plan,
        events: &[Event],
        notifications: Vec<Notification>,
    ) -> Result<Vec<Outgoing>, GroupError> {
        Ok(crate::notify::fit::fit_group(
            self.p,
            plan,
            self.group,
            events,
            notifications,
            self.now,
            self.side.client,
            self.side.cache,
        )
        .await?
        .into_iter()
        .map(|f| Outgoing {
            mail: f.mail,
            ticket: f.ticket,
            marks: f.marks,
        })
        .collect())
    }

    /// The intent, durable before SMTP sees anything: one outbox row
    /// `sending` per mail, committed on the side connection. Returns the
    /// rows' ids.
    async fn record_intents(&self, outgoing: &[Outgoing]) -> Result<Vec<i64>, GroupError> {
        let intents: Vec<outbox::Intent> = outgoing
            .iter()
            .map(|o| outbox::Intent {
                ticket: &o.ticket,
                message_id: &o.mail.message_id,
                marks: &o.marks,
                group: &self.group.directive_ids,
                envelope_from: &o.mail.envelope_from,
                envelope_to: &o.mail.envelope_to,
                message: &o.mail.bytes,
                sent_at: o.mail.date,
            })
            .collect();
        Ok(outbox::record(&self.side.cached(), &self.p.instance, &intents).await?)
    }

    /// Sends the mails in order; each accepted one is marked sent in the
    /// group's transaction. On a failure the outbox says what became of
    /// the rest: `failed` when the mail was refused for good, `retry` when
    /// it was not handed over for a passing reason, left `sending` (in
    /// doubt) only when the connection broke after the end of the data.
    async fn deliver(self, sends: &[Send<'_>]) -> Result<GroupOutcome, GroupError> {
        let p = self.p;
        let mut accepted = 0usize;
        let txc = self.tx.cached();
        for (i, s) in sends.iter().enumerate() {
            let refused = match p.outbound.send(s.from, s.to, s.bytes).await {
                Ok(refused) => refused,
                Err(source) => {
                    let rest: Vec<i64> = sends[i..].iter().map(|s| s.outbox_id).collect();
                    record_refusal(p, self.side.client, &rest, &source).await;
                    let err = GroupError::Smtp {
                        relay: p.outbound.relay().to_string(),
                        source,
                    };
                    return if accepted > 0 {
                        // What SMTP accepted is recorded; never roll that back.
                        self.tx.commit().await?;
                        Err(GroupError::Partial {
                            sent: accepted,
                            source: Box::new(err),
                        })
                    } else {
                        self.tx.rollback().await?;
                        Err(err)
                    };
                }
            };
            accepted += 1;
            note_accepted(p, self.group, s, &refused, self.opts);
            if !s.marks.is_empty() {
                sent::mark_sent(&txc, s.ticket, s.sent_at, s.marks).await?;
            }
            outbox::accepted(&txc, &[s.outbox_id]).await?;
        }
        self.tx.commit().await?;
        Ok(GroupOutcome::Sent { mails: accepted })
    }

    /// Finishes mails an earlier attempt left open: resend the stored bytes
    /// (same ticket, same Message-Id), or hold them, per `mailgend.in_doubt`.
    async fn resume_open(self, open: Vec<outbox::OpenMail>) -> Result<GroupOutcome, GroupError> {
        let (p, group) = (self.p, self.group);
        if open.iter().any(|o| o.state == outbox::State::Held) {
            self.tx.rollback().await?;
            return Ok(GroupOutcome::Held);
        }
        let in_doubt: Vec<&outbox::OpenMail> = open
            .iter()
            .filter(|o| o.state == outbox::State::Sending)
            .collect();
        if !in_doubt.is_empty() && p.config.service.in_doubt == InDoubtPolicy::Hold {
            let ids: Vec<i64> = open.iter().map(|o| o.id).collect();
            outbox::set_state(self.side.client, &ids, outbox::State::Held).await?;
            for o in &in_doubt {
                warn!(
                    ticket = %o.ticket,
                    mail_message_id = %o.message_id,
                    recipient = %o.envelope_to.join(", "),
                    directive_ids = %group.directive_ids_display(),
                    "mail in doubt (the process sending it stopped before SMTP's answer was recorded); \
                     held for the operator: see `mailgend in-doubt list`"
                );
            }
            self.tx.rollback().await?;
            return Ok(GroupOutcome::Held);
        }
        for o in &open {
            if o.state == outbox::State::Sending {
                warn!(
                    ticket = %o.ticket,
                    mail_message_id = %o.message_id,
                    recipient = %o.envelope_to.join(", "),
                    directive_ids = %group.directive_ids_display(),
                    attempts = o.attempts,
                    "mail in doubt (the process sending it stopped before SMTP's answer was recorded); \
                     resending it with the same Message-Id and ticket, so the recipient may get it twice"
                );
                p.metrics.in_doubt_resent();
            } else {
                info!(
                    ticket = %o.ticket,
                    mail_message_id = %o.message_id,
                    "retrying a mail SMTP refused temporarily (same Message-Id and ticket)"
                );
            }
            outbox::attempt(self.side.client, o.id, &p.instance).await?;
        }
        let sends: Vec<Send> = open
            .iter()
            .map(|o| Send {
                outbox_id: o.id,
                from: &o.envelope_from,
                to: &o.envelope_to,
                bytes: &o.message,
                ticket: &o.ticket,
                message_id: &o.message_id,
                sent_at: o.sent_at,
                marks: if o.marks_sent { &o.marks } else { &[] },
            })
            .collect();
        self.deliver(&sends).await
    }
}

/// One mail handed to SMTP and what to record when it is accepted.
struct Send<'a> {
    outbox_id: i64,
    from: &'a str,
    to: &'a [String],
    bytes: &'a [u8],
    ticket: &'a Ticket,
    message_id: &'a str,
    sent_at: DateTime<Utc>,
    marks: &'a [DirectiveId],
}

/// Counts an SMTP failure and records in the outbox what became of `rest`
/// (the failed mail, then the group's later ones): `failed` when the mail
/// was refused for good (5xx, SMTPUTF8 or SIZE the relay lacks), `retry`
/// when it was not handed over for a passing reason (4xx, the relay
/// down), the first left `sending` (in doubt) only when the connection
/// broke after the end of its data was written.
async fn record_refusal(p: &Pipeline, side: &Client, rest: &[i64], source: &SmtpError) {
    p.metrics.smtp_error();
    // A 5xx is about this mail (recipient, policy): the relay works.
    if !matches!(
        source,
        SmtpError::Permanent(_) | SmtpError::Address { .. } | SmtpError::Config(_)
    ) {
        p.metrics.set_smtp_relay_ok(false);
    }
    if source.delivery_unknown() {
        p.metrics.mail_failed(FailReason::InDoubt);
    }
    let state = match source {
        // Refused for good, certainly not handed over: released, so the
        // group is rendered anew next time (never "in doubt").
        SmtpError::Permanent(_)
        | SmtpError::Unsendable(_)
        | SmtpError::Address { .. }
        | SmtpError::Config(_) => Some(outbox::State::Failed),
        // Not handed over; the same bytes may well go through later.
        SmtpError::Temporary(_)
        | SmtpError::Unreachable(_)
        | SmtpError::RelayUnavailable(_)
        | SmtpError::RelayRefused(_) => Some(outbox::State::Retry),
        SmtpError::Connection(_) => None,
    };
    if let Some(state) = state {
        // Best effort: if this fails the rows stay `sending` and the next
        // attempt treats them as in doubt, which is safe.
        if let Err(e) = outbox::refused(side, rest, state, &source.to_string()).await {
            warn!("could not record the SMTP refusal in the outbox: {e}");
        }
    } else if rest.len() > 1 {
        // Only the first mail's fate is unknown; the others were never
        // handed over.
        let _ = outbox::refused(side, &rest[1..], outbox::State::Retry, "not attempted").await;
    }
}

/// Metrics and the INFO line operators grep for, once SMTP accepted `s`;
/// a WARN for each envelope recipient the relay refused meanwhile (the
/// mail went to the others; the old tool dropped such recipients silently).
fn note_accepted(
    p: &Pipeline,
    group: &Group,
    s: &Send<'_>,
    refused: &[RefusedRecipient],
    opts: RunOptions,
) {
    for r in refused {
        warn!(
            ticket = %s.ticket,
            refused = %r.address,
            recipient = %s.to.join(", "),
            directive_ids = %group.directive_ids_display(),
            mail_message_id = %s.message_id,
            "the relay refused one envelope recipient of a mail and took it for the others; \
             that recipient does not get it: {}",
            r.error
        );
    }
    p.metrics.mail_sent();
    p.metrics.set_smtp_relay_ok(true);
    if let Ok(latency) = (Utc::now() - group.inserted_at).to_std() {
        p.metrics.observe_insert_to_smtp(latency);
    }
    info!(
        ticket = %s.ticket,
        recipient = %s.to.join(", "),
        directive_ids = %group.directive_ids_display(),
        event_ids = %if opts.list_event_ids { group.event_ids_display() } else { "-".into() },
        mail_message_id = %s.message_id,
        "mail sent"
    );
}

/// `n` numbers the next draws would most likely return (never consumed).
async fn provisional_tickets(tx: &Transaction<'_>, n: usize) -> Result<Vec<Ticket>, TicketError> {
    let first = ticket::peek(tx).await?;
    let (day, seq) = first
        .as_str()
        .split_once('-')
        .map(|(d, s)| (d.to_string(), s.parse::<i64>().unwrap_or(10000001)))
        .unwrap_or_default();
    let day = chrono::NaiveDate::parse_from_str(&day, "%Y%m%d")
        .unwrap_or_else(|_| Utc::now().date_naive());
    Ok((0..n as i64).map(|i| Ticket::new(day, seq + i)).collect())
}

/// MIME + signature for every notification, on the signing pool.
async fn build_all(
    p: &Pipeline,
    notifications: Vec<Notification>,
    now: DateTime<Utc>,
) -> Result<Vec<BuiltMail>, GroupError> {
    signing::build_all(&p.mail_ctx, p.signer.as_ref(), now, notifications)
        .await
        .map_err(|e| GroupError::Join(e.to_string()))?
        .into_iter()
        .collect::<Result<Vec<_>, _>>()
        .map_err(GroupError::from)
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
