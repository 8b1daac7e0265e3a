//! The pipeline: opens the dedup store, the sink and the dead-letter
//! producer, joins the consumer group, and drives batches through the
//! write path until it is told to stop.
//!
//! - [`batch`]: one batch through the seven steps of the write path.
//! - [`ahead`]: the next batch decoded while the current one is written.
//! - [`consumer`]: the Kafka consumer loop and rebalance handling.
//! - [`retry`]: shutdown signalling and backoff.

pub mod ahead;
pub mod batch;
pub mod consumer;
pub mod retry;
pub mod start;

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use rdkafka::error::KafkaError;
use tracing::info;

use crate::clock::{Clock, SystemClock};
use crate::config::{Config, SinkConfig};
use crate::dead_letter::DeadLetterProducer;
use crate::dedup::{Changelog, ChangelogError, DedupStore, StoreError};
use crate::failpoint::CrashPlan;
use crate::sink::files::FilesSink;
use crate::sink::http::HttpSink;
use crate::sink::kafka::KafkaSink;
use crate::sink::postgres::PostgresSink;
use crate::sink::sqlite::SqliteSink;
use crate::sink::{Sink, SinkError};
use crate::telemetry::{Metrics, Readiness};
use batch::BatchProcessor;
use retry::{Backoff, Shutdown};

/// Why the pipeline could not run.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("no starting offset: {0}")]
    NoStartingOffset(String),
    #[error(transparent)]
    Changelog(#[from] ChangelogError),
    #[error("cannot start the decoding thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// How a run ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunEnd {
    /// Shutdown was requested; the batch in flight was committed.
    Stopped,
    /// A [`CrashPlan`] stopped the run at this point, as a kill would.
    Crashed(&'static str),
}

pub struct Pipeline {
    config: Config,
    metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
    crash: Arc<CrashPlan>,
    shutdown: Shutdown,
    rebuild: bool,
    readiness: Arc<Readiness>,
}

impl Pipeline {
    pub fn new(config: Config) -> Self {
        Pipeline {
            config,
            metrics: Arc::new(Metrics::new()),
            clock: Arc::new(SystemClock),
            crash: Arc::new(CrashPlan::none()),
            shutdown: Shutdown::new(),
            rebuild: false,
            readiness: Arc::new(Readiness::default()),
        }
    }

    /// What `/readyz` reports.
    pub fn readiness(&self) -> Arc<Readiness> {
        Arc::clone(&self.readiness)
    }

    /// Rebuild mode: dedup entries from before this run read as absent, so
    /// every record read is applied to the sink again (the version guard
    /// and the insert key keep that from regressing anything), while
    /// duplicates and conflicts within the replayed stream are judged as
    /// in the first run. For rebuilding a lost or new sink after
    /// `idem replay --to-earliest`.
    pub fn with_rebuild(mut self, rebuild: bool) -> Self {
        self.rebuild = rebuild;
        self
    }

    /// Uses this clock for the dedup window instead of the system clock.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Stops the run at a crash point, as a kill would.
    pub fn with_crash_plan(mut self, plan: CrashPlan) -> Self {
        self.crash = Arc::new(plan);
        self
    }

    /// Counts into these metrics, e.g. to add up several runs.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.metrics)
    }

    /// A handle that stops the run: the batch in flight finishes and
    /// commits, then [`Pipeline::run`] returns.
    pub fn shutdown_handle(&self) -> Shutdown {
        self.shutdown.clone()
    }

    /// Runs until shutdown. Blocking: call it from a thread of its own.
    ///
    /// # Errors
    /// A [`PipelineError`] when a part cannot be opened, or the dedup store
    /// fails in a way that retrying will not fix.
    pub fn run(self) -> Result<RunEnd, PipelineError> {
        for topic in self.config.topic_names() {
            self.metrics.register_topic(topic);
        }
        let mut store = DedupStore::open(
            &self.config.dedup.path,
            self.config.dedup.window,
            Arc::clone(&self.clock),
        )?;
        if self.rebuild {
            // A restarted rebuild keeps the first start's cut-off, so that
            // the keys its earlier runs wrote still count.
            let since = match store.rebuild_since()? {
                Some(since) => since,
                None => {
                    let now = self.clock.now_ms();
                    store.set_rebuild_since(Some(now))?;
                    now
                }
            };
            store.ignore_entries_before(since);
            tracing::warn!(
                since_ms = since,
                "rebuild mode: dedup entries from before the rebuild started are ignored, \
                 every record read is applied again; restart without --rebuild once caught up"
            );
        } else if store.rebuild_since()?.is_some() {
            store.set_rebuild_since(None)?;
            tracing::info!("rebuild ended: every dedup entry counts again");
        }
        let store = Arc::new(store);
        let Some(sink) = self.open_sink()? else {
            return Ok(RunEnd::Stopped);
        };
        if store.journal()?.is_some() && !self.settle_journal(&store)? {
            return Ok(RunEnd::Stopped);
        }
        self.readiness.set_sink_ok(true);
        self.metrics.register_sink(sink.name());
        let dead_letters = DeadLetterProducer::new(&self.config)?;
        let changelog = if self.config.dedup.changelog {
            match self.open_changelog()? {
                Some(c) => Some(c),
                None => return Ok(RunEnd::Stopped),
            }
        } else {
            None
        };
        let processor = BatchProcessor::new(
            &self.config,
            Arc::clone(&store),
            sink,
            dead_letters,
            changelog,
            Arc::clone(&self.metrics),
            Arc::clone(&self.readiness),
            Arc::clone(&self.crash),
            self.shutdown.clone(),
        );
        info!(
            group = %self.config.kafka.group_id,
                        topics = %self.config.topic_names().join(","),
            window_secs = self.config.dedup.window.as_secs(),
            "pipeline starting"
        );
        let scan = DedupScan::start(
            Arc::clone(&store),
            Arc::clone(&self.metrics),
            Duration::from_secs(self.config.metrics.dedup_scan_secs),
        );
        let end = consumer::run(
            &self.config,
            processor,
            &self.metrics,
            &self.readiness,
            &self.shutdown,
        );
        self.readiness.set_assigned(false);
        scan.stop();
        if matches!(end, Ok(RunEnd::Stopped)) && self.config.sink.is_transactional() {
            // Leave no journal behind a clean stop, so that a replay that
            // cannot settle it (no --config) finds none.
            if let Err(e) = consumer::settle_journal(&self.config, &store, Duration::from_secs(30))
            {
                tracing::warn!(error = %e, "cannot settle the last transaction at stop; the next start does");
            }
        }
        end
    }

    /// Settles the transaction journal, retrying while the broker cannot
    /// answer: nothing may be read before the last transaction's outcome is
    /// known. `false` when shutdown came first.
    fn settle_journal(&self, store: &DedupStore) -> Result<bool, PipelineError> {
        let mut backoff = Backoff::new(self.config.retry);
        loop {
            match consumer::settle_journal(&self.config, store, Duration::from_secs(30)) {
                Err(PipelineError::Kafka(e)) => {
                    tracing::warn!(error = %e, "cannot read committed offsets to settle the last transaction; retrying");
                    if self.shutdown.sleep(backoff.next_delay()) {
                        return Ok(false);
                    }
                }
                other => return other.map(|()| true),
            }
        }
    }

    /// Creates or checks the changelog topics, waiting out an unreachable
    /// broker or a missing input topic. `None` when shutdown came first.
    fn open_changelog(&self) -> Result<Option<Changelog>, PipelineError> {
        let mut backoff = Backoff::new(self.config.retry);
        loop {
            match Changelog::open(&self.config) {
                Ok(c) => return Ok(Some(c)),
                Err(e @ ChangelogError::Unavailable(_)) => {
                    tracing::warn!(error = %e, "cannot set up the dedup changelog yet; retrying");
                    if self.shutdown.sleep(backoff.next_delay()) {
                        return Ok(None);
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Opens the sink, waiting out a locked or unreachable one. `None`
    /// when shutdown came first.
    fn open_sink(&self) -> Result<Option<Box<dyn Sink>>, PipelineError> {
        let mut backoff = Backoff::new(self.config.retry);
        loop {
            let opened = match &self.config.sink {
                SinkConfig::Sqlite(c) => SqliteSink::open(c).map(|s| Box::new(s) as Box<dyn Sink>),
                SinkConfig::Postgres(c) => {
                    PostgresSink::open(c).map(|s| Box::new(s) as Box<dyn Sink>)
                }
                SinkConfig::Files(c) => FilesSink::open(c).map(|s| Box::new(s) as Box<dyn Sink>),
                SinkConfig::Http(c) => {
                    HttpSink::open(c, self.config.retry, self.config.kafka.max_poll_interval())
                        .map(|s| Box::new(s) as Box<dyn Sink>)
                }
                SinkConfig::Kafka(c) => {
                    KafkaSink::open(&self.config, c).map(|s| Box::new(s) as Box<dyn Sink>)
                }
            };
            match opened {
                Ok(sink) => return Ok(Some(sink)),
                // Needing an operator is retried too, as it is while
                // running: the fix (a table, a certificate) comes from
                // outside, and the process should be there when it does.
                Err(e @ (SinkError::Unavailable(_) | SinkError::NeedsOperator(_))) => {
                    if matches!(e, SinkError::NeedsOperator(_)) {
                        tracing::error!(error = %e, "sink cannot be opened; retrying");
                    } else {
                        tracing::warn!(error = %e, "sink unavailable at start-up; retrying");
                    }
                    if self.shutdown.sleep(backoff.next_delay()) {
                        return Ok(None);
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Refreshes the per-partition dedup gauges from a scan of the store, on
/// a thread of its own, every `metrics.dedup_scan_secs` (0: never).
struct DedupScan {
    stop: Shutdown,
    thread: Option<JoinHandle<()>>,
}

impl DedupScan {
    fn start(store: Arc<DedupStore>, metrics: Arc<Metrics>, every: Duration) -> DedupScan {
        let stop = Shutdown::new();
        let thread = (!every.is_zero()).then(|| {
            let stop = stop.clone();
            std::thread::spawn(move || loop {
                // The first scan waits one interval: a full scan of a large
                // store at start-up competes with catching up.
                if stop.sleep(every) {
                    return;
                }
                match store.stats() {
                    Ok(stats) => {
                        metrics.dedup_keys.reset();
                        metrics.dedup_bytes.reset();
                        for s in stats {
                            let labels = [s.topic.as_str(), &s.partition.to_string()];
                            metrics
                                .dedup_keys
                                .with_label_values(&labels)
                                .set(s.keys as i64);
                            metrics
                                .dedup_bytes
                                .with_label_values(&labels)
                                .set(s.bytes as i64);
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "dedup store scan failed"),
                }
            })
        });
        DedupScan { stop, thread }
    }

    /// Stops the thread and waits for it, so that the store can be closed.
    fn stop(mut self) {
        self.stop.trigger();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
