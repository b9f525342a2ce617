//! The worker pool behind every run: `send --all` ([`super::run_once`]),
//! review ([`super::run_groups`]) and the service (`mailgend run`).
//!
//! N workers, each owning its database [`Connections`] and the events
//! table's columns read on them, take [`Work`] from one bounded channel
//! (back-pressure: a producer waits while every worker is busy and the
//! channel is full) and report each group's result as a [`Done`] on an
//! unbounded channel (at most one per group handed in). Small groups that
//! wait together go through the data path as one batch ([`super::batch`]).
//!
//! The callers keep their policy: the one-shot run streams its selection
//! in and closes the channel; the service's scheduler feeds due groups and
//! reads the results as they come; review hands in the chosen groups and
//! puts the results back in their order by [`Work::slot`].

use std::sync::{Arc, RwLock};

use tokio::sync::{mpsc, Mutex};
use tokio::task::JoinSet;
use tracing::{debug, error};

use super::{batch, Connections, GroupError, GroupOutcome, Pipeline, RunError, RunOptions};
use crate::config::Config;
use crate::notify::directive::Group;
use crate::notify::event::EventColumns;

/// Where a worker takes the configuration for its next piece of work.
#[derive(Clone)]
pub enum Source {
    /// One configuration for the whole run.
    Fixed(Arc<Pipeline>),
    /// The service's configuration in force, replaced as a whole by a
    /// reload: each batch runs with the one current when it starts.
    Current(Arc<RwLock<Arc<Pipeline>>>),
}

impl Source {
    pub fn current(&self) -> Arc<Pipeline> {
        match self {
            Source::Fixed(p) => p.clone(),
            Source::Current(c) => c.read().unwrap_or_else(|p| p.into_inner()).clone(),
        }
    }
}

/// How a pool works.
#[derive(Debug, Clone, Copy)]
pub struct PoolOptions {
    pub workers: usize,
    /// Groups the work channel holds before a producer waits.
    pub queue: usize,
    /// Gather small waiting groups into batches (else one group at a time).
    pub batches: bool,
    pub run: RunOptions,
    /// Open new connections when a worker's broke (the service, which
    /// lives through database outages); a run by hand keeps the ones it
    /// opened at the start.
    pub reconnect: bool,
}

/// A group to process; `slot` is the caller's (review: its position).
pub struct Work {
    pub slot: usize,
    pub group: Group,
}

impl AsRef<Group> for Work {
    fn as_ref(&self) -> &Group {
        &self.group
    }
}

/// What became of a [`Work`].
pub struct Done {
    pub slot: usize,
    pub group: Group,
    pub result: Result<GroupOutcome, GroupError>,
}

/// The sending side of the work channel; dropping it lets the workers end
/// once the channel is empty.
pub struct Feeder {
    tx: mpsc::Sender<Work>,
}

impl Feeder {
    /// Waits for room; false once every worker is gone.
    pub async fn send(&self, work: Work) -> bool {
        self.tx.send(work).await.is_ok()
    }
}

/// The workers and their results.
pub struct Results {
    rx: mpsc::UnboundedReceiver<Done>,
    tasks: JoinSet<()>,
}

impl Results {
    /// The next result; `None` once every worker has ended.
    pub async fn recv(&mut self) -> Option<Done> {
        self.rx.recv().await
    }

    /// Abandons the groups in flight (their transactions roll back).
    pub fn abort(&mut self) {
        self.tasks.abort_all();
    }

    /// Waits for the workers to end; logs one that panicked.
    pub async fn join(mut self) {
        while let Some(r) = self.tasks.join_next().await {
            if let Err(e) = r {
                if !e.is_cancelled() {
                    error!(target: "mailgend::notify::pipeline", "worker task failed: {e}");
                }
            }
        }
    }
}

/// Starting a pool.
pub struct Pool;

impl Pool {
    /// Opens every worker's connections first (a run by hand fails as a
    /// whole when it cannot have them, before any worker sends), then
    /// starts the workers.
    pub async fn open(source: Source, opts: PoolOptions) -> Result<(Feeder, Results), RunError> {
        let config = source.current().config.clone();
        let mut conns = Vec::with_capacity(opts.workers);
        for _ in 0..opts.workers {
            let c = Connections::open(&config).await?;
            let columns = EventColumns::read(&c.main).await?;
            conns.push(Some((c, columns)));
        }
        Ok(Self::spawn(source, opts, conns))
    }

    /// Starts the workers at once; each opens its connections with its
    /// first work (and reports `NoConnection` for it when it cannot).
    pub fn start(source: Source, opts: PoolOptions) -> (Feeder, Results) {
        let conns = (0..opts.workers).map(|_| None).collect();
        Self::spawn(source, opts, conns)
    }

    fn spawn(
        source: Source,
        opts: PoolOptions,
        conns: Vec<Option<(Connections, EventColumns)>>,
    ) -> (Feeder, Results) {
        let (tx, rx) = mpsc::channel(opts.queue.max(1));
        let jobs = Arc::new(Mutex::new(rx));
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let mut tasks = JoinSet::new();
        for (n, conns) in conns.into_iter().enumerate() {
            let worker = Worker {
                n,
                source: source.clone(),
                opts,
                conns,
                jobs: jobs.clone(),
                done: done_tx.clone(),
                carried: None,
            };
            tasks.spawn(worker.run());
        }
        (Feeder { tx }, Results { rx: done_rx, tasks })
    }
}

/// One worker: takes work, processes it with the configuration current at
/// that moment, reports back.
struct Worker {
    n: usize,
    source: Source,
    opts: PoolOptions,
    conns: Option<(Connections, EventColumns)>,
    jobs: Arc<Mutex<mpsc::Receiver<Work>>>,
    done: mpsc::UnboundedSender<Done>,
    /// A large group met while gathering a batch: next in line.
    carried: Option<Work>,
}

impl Worker {
    async fn run(mut self) {
        while let Some(works) = self.next_batch().await {
            if !self.process(works).await {
                return;
            }
        }
    }

    /// The carried group, else the next group and (with batches) the small
    /// groups waiting behind it; `None` once the channel is closed and
    /// empty.
    async fn next_batch(&mut self) -> Option<Vec<Work>> {
        if let Some(w) = self.carried.take() {
            return Some(vec![w]);
        }
        let mut rx = self.jobs.lock().await;
        let first = rx.recv().await?;
        if !self.opts.batches {
            return Some(vec![first]);
        }
        let (works, next) = batch::gather(first, &mut rx);
        self.carried = next;
        Some(works)
    }

    /// Processes one batch and reports every group; false when nobody
    /// listens any more.
    async fn process(&mut self, works: Vec<Work>) -> bool {
        let p = self.source.current();
        let _busy = p.metrics.worker_busy();
        if let Err(e) = self.connect(&p.config).await {
            p.metrics.db_error();
            let why = e.to_string();
            for Work { slot, group } in works {
                let _ = self.done.send(Done {
                    slot,
                    group,
                    result: Err(GroupError::NoConnection(why.clone())),
                });
            }
            return true;
        }
        let (c, columns) = self.conns.as_mut().expect("connections just opened");
        let (slots, groups): (Vec<usize>, Vec<Group>) =
            works.into_iter().map(|w| (w.slot, w.group)).unzip();
        let started = std::time::Instant::now();
        let results = batch::process_batch(&p, c, columns, &groups, self.opts.run).await;
        p.metrics.observe_send(started.elapsed());
        debug!(
            target: "mailgend::notify::service",
            worker = self.n,
            groups = groups.len(),
            "batch done"
        );
        for ((slot, group), result) in slots.into_iter().zip(groups).zip(results) {
            if let Err(GroupError::Db(_)) = &result {
                p.metrics.db_error();
            }
            if self
                .done
                .send(Done {
                    slot,
                    group,
                    result,
                })
                .is_err()
            {
                return false;
            }
        }
        true
    }

    /// Opens the connections when there are none, or (with `reconnect`)
    /// when they broke.
    async fn connect(&mut self, config: &Config) -> Result<(), GroupError> {
        let broken = match &self.conns {
            None => true,
            Some((c, _)) => self.opts.reconnect && c.is_closed(),
        };
        if broken {
            self.conns = None;
            let conns = Connections::open(config)
                .await
                .map_err(GroupError::Connect)?;
            let columns = EventColumns::read(&conns.main).await?;
            self.conns = Some((conns, columns));
        }
        Ok(())
    }
}
