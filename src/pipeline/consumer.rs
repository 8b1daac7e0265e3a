//! The Kafka side: the consumer loop that fills batches, and the rebalance
//! callback that finishes the batch in flight before a partition is
//! released.
//!
//! Locking: the batch state sits behind one mutex shared by the loop and
//! the rebalance callback. librdkafka runs the callback inside `poll()` on
//! the loop's own thread, so the loop never holds the mutex while it polls.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, ConsumerGroupMetadata, Rebalance,
};
use rdkafka::error::KafkaError;
use rdkafka::topic_partition_list::{Offset as KafkaOffset, TopicPartitionList};
use rdkafka::ClientContext;
use tracing::{error, info, warn};

use super::ahead::DecodeAhead;
use super::batch::{BatchError, BatchProcessor, DecodedBatch, OffsetCommitter};
use super::retry::Shutdown;
use super::start::{self, Start};
use super::{PipelineError, RunEnd};
use crate::config::{BatchConfig, Config, OffsetReset};
use crate::dedup::{DedupStore, Progress};
use crate::record::{Partition, Record};
use crate::telemetry::events::Event as Telemetry;
use crate::telemetry::logging::{route_librdkafka_log, LoggedContext};
use crate::telemetry::progress::CatchUp;
use crate::telemetry::{Metrics, Readiness};

/// Records polled but not yet processed, and the processor that will take
/// them.
///
/// Batches are cut from the front of `pending`. While records wait behind
/// the batch in flight, the next batch is decoded meanwhile (see
/// [`super::ahead`]): when a full batch has been polled behind a decoded
/// one, the decoded one is processed while the new one is decoded, and the
/// new one is held, decoded, until the next is full, a poll finds nothing
/// behind it, or it is due. A held batch is always the first to be
/// processed, by every flush. Batches over [`AHEAD_MAX_BYTES`] are neither
/// decoded ahead nor held.
struct Engine {
    processor: BatchProcessor,
    batch: BatchConfig,
    ahead: DecodeAhead,
    pending: Vec<Record>,
    pending_bytes: usize,
    /// The decoding of the first records of `pending`, and their bytes.
    decoded: Option<(DecodedBatch, usize)>,
    first_polled: Option<Instant>,
    /// Set when a batch failed inside a rebalance callback, where the
    /// error cannot be returned; the loop picks it up after `poll()`.
    failed: Option<BatchError>,
    /// After a crash, nothing more may be processed or committed.
    dead: bool,
    /// Partitions started from idem's stored progress: that offset is
    /// durable in the dedup store, and is committed to the group as soon as
    /// the loop is out of the rebalance callback.
    start_commits: Vec<Progress>,
    /// The partitions this instance owns now.
    assigned: BTreeSet<(String, Partition)>,
    last_sweep: Instant,
    /// The sink is down: the pending batch is offered again at this time;
    /// meanwhile consumption is paused.
    retry_at: Option<Instant>,
}

impl Engine {
    fn push(&mut self, record: Record) {
        self.pending_bytes += record.size();
        self.first_polled.get_or_insert_with(Instant::now);
        self.pending.push(record);
    }

    /// Whether a full batch waits behind the decoded one (or is all
    /// there is).
    fn is_full(&self) -> bool {
        let (held, held_bytes) = self
            .decoded
            .as_ref()
            .map_or((0, 0), |(d, bytes)| (d.len(), *bytes));
        self.pending.len().saturating_sub(held) >= self.batch.max_records
            || self.pending_bytes.saturating_sub(held_bytes) >= self.batch.max_bytes
    }

    /// How long the next poll may wait before the batch is due. With a
    /// batch held, it does not wait: the held batch waits only for
    /// records already fetched.
    fn poll_timeout(&self) -> Duration {
        let idle = Duration::from_millis(200);
        if self.decoded.is_some() {
            return Duration::ZERO;
        }
        match self.first_polled {
            None => idle,
            Some(t) => Duration::from_millis(self.batch.linger_ms)
                .saturating_sub(t.elapsed())
                .min(idle),
        }
    }

    /// Whether what is pending is processed now: a linger has passed since
    /// it was polled, or a batch is held and the last poll found nothing
    /// (`idle`) behind it.
    fn is_due(&self, idle: bool) -> bool {
        (idle && self.decoded.is_some())
            || self
                .first_polled
                .is_some_and(|t| t.elapsed() >= Duration::from_millis(self.batch.linger_ms))
    }

    /// Processes and commits everything pending, a batch at a time. When
    /// the sink is down the records stay pending and `retry_at` says when
    /// to try again.
    fn flush(&mut self, committer: &dyn OffsetCommitter) -> Result<(), BatchError> {
        self.process_pending(committer, false)
    }

    /// Processes the batches that have a full batch behind them, and holds
    /// the last, decoded.
    fn flush_ahead(&mut self, committer: &dyn OffsetCommitter) -> Result<(), BatchError> {
        self.process_pending(committer, true)
    }

    fn process_pending(
        &mut self,
        committer: &dyn OffsetCommitter,
        hold_last: bool,
    ) -> Result<(), BatchError> {
        if self.dead {
            return Ok(());
        }
        loop {
            let head = match &self.decoded {
                Some((d, _)) => d.len(),
                None => batch_len(&self.pending, &self.batch).0,
            };
            if head == 0 {
                break;
            }
            let (next, next_full) = batch_len(&self.pending[head..], &self.batch);
            if hold_last && !next_full && self.hold(head) {
                break;
            }
            // The next batch is decoded meanwhile, unless it is too large
            // to be.
            let ahead = if fits_ahead(&self.pending[head..head + next]) {
                next
            } else {
                0
            };
            let mut next_records = self.pending.split_off(head);
            let after = next_records.split_off(ahead);
            let records = std::mem::replace(&mut self.pending, after);
            let decoded = self.decoded.take().map(|(d, _)| d);
            let decoded_ahead = decoded.is_some();
            let processor = &mut self.processor;
            let (result, next_records, next_decoded) = self.ahead.overlap(next_records, || {
                processor.process(&records, decoded, committer)
            });
            let bytes = next_records.iter().map(Record::size).sum();
            self.put_back(next_records);
            match result {
                Ok(spent) => {
                    if decoded_ahead {
                        // Freed by the thread that allocated most of it.
                        self.ahead.free((records, spent));
                    }
                    self.retry_at = None;
                    self.decoded = next_decoded.map(|d| (d, bytes));
                }
                Err(BatchError::SinkDown(delay)) => {
                    // Nothing of it counts as done: keep it, in order,
                    // ahead of whatever is polled meanwhile.
                    self.put_back(records);
                    self.pending_bytes = self.pending.iter().map(Record::size).sum();
                    self.first_polled = Some(Instant::now());
                    self.retry_at = Some(Instant::now() + delay);
                    return Err(BatchError::SinkDown(delay));
                }
                Err(e) => {
                    self.dead = true;
                    return Err(e);
                }
            }
        }
        self.pending_bytes = self.pending.iter().map(Record::size).sum();
        // A held batch is due a linger after it was held, at the latest.
        self.first_polled = (!self.pending.is_empty()).then(Instant::now);
        Ok(())
    }

    /// Holds the first `head` records, decoded, until a whole batch is
    /// polled behind them; false if they are too large to be decoded ahead.
    fn hold(&mut self, head: usize) -> bool {
        if self.decoded.is_some() {
            return true;
        }
        if !fits_ahead(&self.pending[..head]) {
            return false;
        }
        // The first batch of a backlog, with nothing to write meanwhile:
        // decoded now, on the decoding thread like every batch held, so
        // that the same thread frees it.
        let rest = self.pending.split_off(head);
        let records = std::mem::replace(&mut self.pending, rest);
        let ((), records, decoded) = self.ahead.overlap(records, || ());
        let bytes = records.iter().map(Record::size).sum();
        self.put_back(records);
        self.decoded = decoded.map(|d| (d, bytes));
        true
    }

    /// Puts records taken from the front of `pending` back in front of it.
    fn put_back(&mut self, records: Vec<Record>) {
        let newer = std::mem::replace(&mut self.pending, records);
        self.pending.extend(newer);
    }

    /// Leaves the pending records of revoked partitions to their next
    /// owner: they are not committed, so it reads them again.
    fn drop_pending(&mut self, revoked: &TopicPartitionList) {
        self.pending
            .retain(|r| revoked.find_partition(&r.topic, r.partition.0).is_none());
        self.decoded = None;
        self.pending_bytes = self.pending.iter().map(Record::size).sum();
        if self.pending.is_empty() {
            self.first_polled = None;
            self.retry_at = None;
        }
    }
}

/// Whether these records may be decoded ahead: a decoded JSON tree can
/// take many times the bytes of its text (some 50 times for an array of
/// small numbers), and a batch decoded ahead is held beside the batch in
/// flight.
fn fits_ahead(records: &[Record]) -> bool {
    records.iter().map(Record::size).sum::<usize>() <= AHEAD_MAX_BYTES
}

/// The most record bytes decoded ahead: twice the benchmark's batch of
/// 5,000 records of about 200 bytes.
const AHEAD_MAX_BYTES: usize = 2 << 20;

/// The length of the first batch of `records`, and whether it is full
/// (reaches `max_records` or `max_bytes`) rather than all there is.
fn batch_len(records: &[Record], batch: &BatchConfig) -> (usize, bool) {
    let mut bytes = 0;
    for (i, r) in records.iter().enumerate() {
        bytes += r.size();
        if i + 1 >= batch.max_records || bytes >= batch.max_bytes {
            return (i + 1, true);
        }
    }
    (records.len(), false)
}

/// librdkafka callbacks: logs into tracing, statistics, rebalances.
pub struct IdemContext {
    engine: Arc<Mutex<Engine>>,
    metrics: Arc<Metrics>,
    offset_reset: OffsetReset,
    readiness: Arc<Readiness>,
    catch_up: Mutex<CatchUp>,
    /// A second client of the same group that never joins it: it reads
    /// committed offsets and watermarks while the group's own handle is in
    /// the middle of a rebalance, where its requests would wait for the
    /// rebalance to finish.
    lookup: BaseConsumer<LoggedContext>,
    /// A commit sent without waiting failed (during a rebalance, say):
    /// the loop commits the last offsets again, waiting this time.
    commit_failed: std::sync::atomic::AtomicBool,
}

impl IdemContext {
    fn engine(&self) -> MutexGuard<'_, Engine> {
        self.engine.lock().expect("engine lock poisoned")
    }
}

impl ClientContext for IdemContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        route_librdkafka_log(level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        warn!(target: "librdkafka", %error, reason, "client error");
    }

    /// Every `statistics.interval.ms`: consumer lag per partition, and
    /// catch-up progress when far behind. Only the fields used are parsed,
    /// so that new fields in librdkafka's statistics cannot break it.
    fn stats_raw(&self, statistics: &[u8]) {
        let stats: LagStatistics = match serde_json::from_slice(statistics) {
            Ok(stats) => stats,
            Err(e) => {
                warn!(error = %e, "cannot read librdkafka statistics; lag metrics are stale");
                return;
            }
        };
        let mut total_lag = 0u64;
        for (topic, t) in &stats.topics {
            for (id, p) in &t.partitions {
                let Ok(id) = id.parse::<i32>() else { continue };
                if id < 0 || !p.desired || p.consumer_lag < 0 {
                    continue;
                }
                self.metrics
                    .consumer_lag
                    .with_label_values(&[topic, &id.to_string()])
                    .set(p.consumer_lag);
                total_lag += p.consumer_lag as u64;
            }
        }
        self.catch_up
            .lock()
            .expect("catch-up lock poisoned")
            .update(total_lag, self.metrics.read_total());
    }
}

/// The part of librdkafka's statistics JSON that idem reads.
#[derive(serde::Deserialize)]
struct LagStatistics {
    #[serde(default)]
    topics: std::collections::HashMap<String, TopicStatistics>,
}

#[derive(serde::Deserialize)]
struct TopicStatistics {
    #[serde(default)]
    partitions: std::collections::HashMap<String, PartitionStatistics>,
}

#[derive(serde::Deserialize)]
struct PartitionStatistics {
    #[serde(default)]
    desired: bool,
    #[serde(default = "unknown_lag")]
    consumer_lag: i64,
}

fn unknown_lag() -> i64 {
    -1
}

impl ConsumerContext for IdemContext {
    /// Served by `poll()`, for commits sent without waiting too.
    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        _offsets: &TopicPartitionList,
    ) {
        if let Err(e) = result {
            Telemetry::OffsetCommitFailed {
                error: &e.to_string(),
            }
            .emit(&self.metrics);
            self.commit_failed
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            // Finish and commit the batch in flight while we still own its
            // partitions; the next owner then starts after it.
            let mut engine = self.engine();
            match engine.flush(consumer) {
                Ok(()) => {}
                // Still down: what the revoked partitions had pending goes
                // to their next owner uncommitted.
                Err(BatchError::SinkDown(_)) => engine.drop_pending(tpl),
                Err(e) => engine.failed = Some(e),
            }
            if !engine.dead {
                engine.processor.confirm_commits(
                    consumer,
                    |topic, partition| tpl.find_partition(topic, partition.0).is_some(),
                    false,
                );
            }
            for e in tpl.elements() {
                let _ = self
                    .metrics
                    .consumer_lag
                    .remove_label_values(&[e.topic(), &e.partition().to_string()]);
                engine
                    .assigned
                    .remove(&(e.topic().to_string(), Partition(e.partition())));
            }
            Telemetry::PartitionsRevoked {
                partitions: &describe(tpl),
                count: tpl.count(),
            }
            .emit(&self.metrics);
        }
        if let Rebalance::Assign(tpl) = rebalance {
            // Set where each new partition starts before librdkafka assigns
            // it; the list handed to us is the one it assigns.
            let mut engine = self.engine();
            // A partition's dedup state first: what this store lacks of
            // its changelog is read in before any of its records.
            for e in tpl.elements() {
                let partition = Partition(e.partition());
                if let Err(error) = engine.processor.restore(e.topic(), partition) {
                    engine.failed = Some(error);
                    return;
                }
                engine.assigned.insert((e.topic().to_string(), partition));
            }
            let store = engine.processor.store();
            match set_start_offsets(&self.lookup, tpl, store, self.offset_reset) {
                Ok(from_store) => engine.start_commits.extend(from_store),
                Err(refused) => engine.failed = Some(BatchError::NoStartingOffset(refused)),
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                // librdkafka keeps a partition's pause across a revoke and
                // a new assignment: a partition paused while the sink was
                // down, taken away and given back, would stay paused. New
                // partitions follow the current state instead.
                let sink_down = self.engine().retry_at.is_some();
                let set = if sink_down {
                    consumer.pause(tpl)
                } else {
                    consumer.resume(tpl)
                };
                if let Err(e) = set {
                    warn!(error = %e, "cannot set the pause of newly assigned partitions");
                }
                self.readiness.set_assigned(true);
                Telemetry::PartitionsAssigned {
                    partitions: &describe(tpl),
                    count: tpl.count(),
                }
                .emit(&self.metrics)
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => warn!(error = %e, "rebalance error"),
        }
    }
}

impl OffsetCommitter for BaseConsumer<IdemContext> {
    fn commit(&self, offsets: &[Progress], wait: bool) -> Result<(), String> {
        let mut tpl = TopicPartitionList::with_capacity(offsets.len());
        for p in offsets {
            tpl.add_partition_offset(&p.topic, p.partition.0, KafkaOffset::Offset(p.next.0))
                .map_err(|e| e.to_string())?;
        }
        let mode = if wait {
            CommitMode::Sync
        } else {
            CommitMode::Async
        };
        Consumer::commit(self, &tpl, mode).map_err(|e| e.to_string())
    }

    fn group_metadata(&self) -> Option<ConsumerGroupMetadata> {
        Consumer::group_metadata(self)
    }
}

/// Applies [`start::choose`] to each partition of an assignment.
///
/// Returns the partitions started from stored progress, whose offsets
/// should be committed.
///
/// # Errors
/// A description of the partition that policy `fail` refuses to start.
fn set_start_offsets(
    consumer: &BaseConsumer<LoggedContext>,
    tpl: &TopicPartitionList,
    store: &DedupStore,
    policy: OffsetReset,
) -> Result<Vec<Progress>, String> {
    let mut from_store = Vec::new();
    let timeout = Duration::from_secs(10);
    let committed = match consumer.committed_offsets(tpl.clone(), timeout) {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "cannot read committed offsets; librdkafka applies kafka.offset_reset");
            return Ok(from_store);
        }
    };
    for mut elem in tpl.elements() {
        let (topic, partition) = (elem.topic().to_string(), elem.partition());
        let group_offset = match committed
            .find_partition(&topic, partition)
            .map(|e| e.offset())
        {
            Some(KafkaOffset::Offset(o)) => Some(o),
            _ => None,
        };
        let (low, high) = match consumer.fetch_watermarks(&topic, partition, timeout) {
            Ok(w) => w,
            Err(e) => {
                warn!(topic, partition, error = %e, "cannot read watermarks; starting at the committed offset");
                continue;
            }
        };
        let stored = store
            .progress(&topic, Partition(partition))
            .ok()
            .flatten()
            .map(|o| o.0);
        let choice = start::choose(group_offset, stored, low, high, policy);
        let offset = match choice {
            Start::Committed => continue,
            Start::Stored(o) => {
                from_store.push(Progress {
                    topic: topic.clone(),
                    partition: Partition(partition),
                    next: crate::record::Offset(o),
                });
                KafkaOffset::Offset(o)
            }
            Start::Earliest => KafkaOffset::Beginning,
            Start::Latest => KafkaOffset::End,
            Start::Refuse => {
                let show = |o: Option<i64>| o.map_or_else(|| "none".to_string(), |o| o.to_string());
                return Err(format!(
                    "{topic}/{partition}: neither the group's committed offset ({}) nor \
                     idem's stored progress ({}) lies within the partition's offsets \
                     [{low}, {high}], and kafka.offset_reset is \"fail\": set the group's \
                     offset with `idem replay`, or choose \"earliest\" or \"latest\"",
                    show(group_offset),
                    show(stored)
                ));
            }
        };
        warn!(
            topic,
            partition,
                        committed = group_offset.unwrap_or(-1),
            stored_progress = stored.unwrap_or(-1),
            low,
            high,
            start = ?choice,
            "the group has no usable committed offset for this partition; starting from {}",
            match choice {
                Start::Stored(_) => "idem's own stored progress",
                _ => "kafka.offset_reset",
            }
        );
        if let Err(e) = elem.set_offset(offset) {
            warn!(topic, partition, error = %e, "cannot set the start offset");
        }
    }
    Ok(from_store)
}

/// `wait` rounded up to whole milliseconds. librdkafka waits in whole
/// milliseconds and rust-rdkafka's poll rounds the time left down, then
/// polls without waiting until the timeout has passed: a fraction of a
/// millisecond left is spent spinning.
fn whole_millis(wait: Duration) -> Duration {
    Duration::from_millis(u64::try_from(wait.as_micros().div_ceil(1000)).unwrap_or(u64::MAX))
}

/// Pauses or resumes fetching for every assigned partition.
fn set_paused(consumer: &BaseConsumer<IdemContext>, pause: bool) {
    let Ok(assignment) = consumer.assignment() else {
        return;
    };
    let done = if pause {
        consumer.pause(&assignment)
    } else {
        consumer.resume(&assignment)
    };
    if let Err(e) = done {
        warn!(error = %e, pause, "cannot pause or resume the assigned partitions");
    }
}

fn describe(tpl: &TopicPartitionList) -> String {
    tpl.elements()
        .iter()
        .map(|e| format!("{}/{}", e.topic(), e.partition()))
        .collect::<Vec<_>>()
        .join(",")
}

/// The librdkafka consumer configuration. Auto commit and auto offset
/// store are off: idem commits itself, after the write path.
pub fn client_config(config: &Config) -> ClientConfig {
    let mut client = lookup_config(config);
    client
        .set("enable.auto.offset.store", "false")
        .set(
            "auto.offset.reset",
            config.kafka.offset_reset.as_librdkafka(),
        )
        .set("isolation.level", "read_committed")
        .set("statistics.interval.ms", "5000")
        .set("enable.partition.eof", "false")
        // Incremental rebalances: partitions that stay keep going while
        // others move.
        .set("partition.assignment.strategy", "cooperative-sticky");
    let defaults = fetch_defaults(config.batch.linger_ms)
        .into_iter()
        .chain(queue_defaults(config.batch.max_bytes));
    for (key, value) in defaults {
        if !config.kafka.properties.contains_key(key) {
            client.set(key, value);
        }
    }
    client
}

/// How much librdkafka may fetch ahead of what idem has polled: two batches
/// of `batch.max_bytes`, at least 16 MiB and at most librdkafka's own
/// 64 MiB. idem takes records far slower than the broker sends them, so
/// behind a backlog the queue is always full: memory held for nothing,
/// about 9 MiB of peak RSS at idem's defaults. A full queue postpones the
/// partition's next fetch by `fetch.queue.backoff.ms`, one second by
/// default, longer than a queue this size lasts with large records (it
/// halved the rate of records of 570 KB): [`FETCH_QUEUE_BACKOFF_MS`].
fn queue_defaults(max_bytes: usize) -> [(&'static str, String); 2] {
    let kib = max_bytes
        .saturating_mul(2)
        .div_ceil(1024)
        .clamp(QUEUE_MIN_KIB, QUEUE_MAX_KIB);
    [
        ("queued.max.messages.kbytes", kib.to_string()),
        ("fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS.to_string()),
    ]
}

/// How long a full queue holds a partition's next fetch back.
const FETCH_QUEUE_BACKOFF_MS: u64 = 10;

/// The bounds of librdkafka's queue as idem sets it, in KiB.
const QUEUE_MIN_KIB: usize = 16 << 10;
const QUEUE_MAX_KIB: usize = 64 << 10;

/// A batch waits up to `linger_ms` for records anyway, so the broker may
/// hold a fetch as long, until [`FETCH_MIN_BYTES`] are there, instead of
/// answering with the few records that came since the last fetch: fewer,
/// fuller fetches cost the broker and idem less CPU. With no linger,
/// librdkafka's defaults stand. `kafka.properties` overrides either.
fn fetch_defaults(linger_ms: u64) -> Vec<(&'static str, String)> {
    if linger_ms == 0 {
        return Vec::new();
    }
    vec![
        ("fetch.wait.max.ms", linger_ms.min(500).to_string()),
        ("fetch.min.bytes", FETCH_MIN_BYTES.to_string()),
    ]
}

/// What a fetch waits for, at most `batch.linger_ms`.
const FETCH_MIN_BYTES: usize = 64 << 10;

/// The client that reads committed offsets and watermarks: same broker and
/// group, never subscribed, no statistics.
fn lookup_config(config: &Config) -> ClientConfig {
    let mut client = ClientConfig::new();
    for (k, v) in &config.kafka.properties {
        client.set(k, v);
    }
    client
        .set("bootstrap.servers", &config.kafka.bootstrap_servers)
        .set("group.id", &config.kafka.group_id)
        .set("enable.auto.commit", "false")
        // librdkafka checks it against max.poll.interval.ms on every
        // consumer, joined or not.
        .set(
            "session.timeout.ms",
            config.kafka.session_timeout_ms.to_string(),
        );
    client
}

/// Settles the dedup store's transaction journal (see
/// [`crate::dedup::Journal`]) against the group's committed offsets: an
/// aborted transaction's dedup records are taken back. Call it after the
/// transactional producer's `init_transactions`, which finishes or aborts
/// the transaction the journal stands for.
///
/// # Errors
/// The committed offsets cannot be read within `timeout`, or the store
/// fails.
pub fn settle_journal(
    config: &Config,
    store: &DedupStore,
    timeout: Duration,
) -> Result<(), PipelineError> {
    let Some(journal) = store.journal()? else {
        return Ok(());
    };
    let lookup: BaseConsumer<LoggedContext> =
        lookup_config(config).create_with_context(LoggedContext)?;
    let mut tpl = TopicPartitionList::new();
    for (p, _) in &journal.partitions {
        tpl.add_partition(&p.topic, p.partition.0);
    }
    // With isolation.level=read_committed (librdkafka's default) the
    // broker answers only once no transaction holds these offsets open.
    let committed = lookup.committed_offsets(tpl, timeout)?;
    let group_offset = |p: &Progress| match committed
        .find_partition(&p.topic, p.partition.0)
        .map(|e| e.offset())
    {
        Some(KafkaOffset::Offset(o)) => Some(crate::record::Offset(o)),
        _ => None,
    };
    let was_committed = journal.committed(group_offset);
    store.settle_journal(was_committed)?;
    let batch = journal
        .partitions
        .iter()
        .map(|(p, _)| format!("{}/{} up to {}", p.topic, p.partition, p.next))
        .collect::<Vec<_>>()
        .join(", ");
    if was_committed {
        info!(batch, "last transaction committed; its dedup records stay");
    } else {
        warn!(
            batch,
            "last transaction did not commit; its dedup records were taken back and its \
             records will be produced again"
        );
    }
    Ok(())
}

/// Consumes until shutdown.
pub fn run(
    config: &Config,
    processor: BatchProcessor,
    metrics: &Arc<Metrics>,
    readiness: &Arc<Readiness>,
    shutdown: &Shutdown,
) -> Result<RunEnd, PipelineError> {
    let ahead = DecodeAhead::start(processor.decoder().clone()).map_err(PipelineError::Thread)?;
    let engine = Arc::new(Mutex::new(Engine {
        processor,
        batch: config.batch.clone(),
        ahead,
        pending: Vec::new(),
        pending_bytes: 0,
        decoded: None,
        first_polled: None,
        failed: None,
        dead: false,
        start_commits: Vec::new(),
        assigned: BTreeSet::new(),
        last_sweep: Instant::now(),
        retry_at: None,
    }));
    let context = IdemContext {
        engine: Arc::clone(&engine),
        metrics: Arc::clone(metrics),
        offset_reset: config.kafka.offset_reset,
        readiness: Arc::clone(readiness),
        catch_up: Mutex::new(CatchUp::new()),
        lookup: lookup_config(config).create_with_context(LoggedContext)?,
        commit_failed: std::sync::atomic::AtomicBool::new(false),
    };
    let consumer: BaseConsumer<IdemContext> = client_config(config).create_with_context(context)?;
    consumer.subscribe(&config.topic_names())?;
    let lock = || engine.lock().expect("engine lock poisoned");

    let mut paused = false;
    let mut last_confirm = Instant::now();
    let result = loop {
        if shutdown.is_triggered() {
            // The batch in flight finishes and commits before we leave (if
            // the sink lets it; otherwise it is read again on restart). A
            // sink that is down is not tried again: the stop would wait
            // for it.
            let mut engine = lock();
            if engine.retry_at.is_some() {
                break Ok(());
            }
            break engine.flush(&consumer);
        }
        // Backpressure: while the sink is down, consumption is paused and
        // the loop keeps polling (rebalances are served, the group keeps
        // this member), until the pending batch is due again.
        let retry_at = lock().retry_at;
        match retry_at {
            Some(at) if Instant::now() < at => {
                if !paused {
                    info!("sink down: consumption paused until it takes the batch");
                }
                set_paused(&consumer, true);
                paused = true;
            }
            Some(_) => {
                match lock().flush(&consumer) {
                    Ok(()) | Err(BatchError::SinkDown(_)) => {}
                    Err(e) => break Err(e),
                }
                continue;
            }
            None if paused => {
                set_paused(&consumer, false);
                paused = false;
                info!("consumption resumed");
            }
            None => {}
        }
        let timeout = match retry_at {
            Some(at) => at
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(200)),
            None => lock().poll_timeout(),
        };
        let polled = consumer.poll(whole_millis(timeout));
        let idle = polled.is_none();
        if let Some(e) = lock().failed.take() {
            break Err(e);
        }
        let starts = std::mem::take(&mut lock().start_commits);
        if !starts.is_empty() {
            if let Err(error) = OffsetCommitter::commit(&consumer, &starts, true) {
                // Tried again on the next turn of the loop.
                warn!(
                    error,
                    "cannot commit the offsets taken from stored progress yet"
                );
                lock().start_commits = starts;
            }
        }
        match polled {
            Some(Ok(message)) => {
                let record = Record::from_message(&message);
                drop(message);
                let mut engine = lock();
                engine.push(record);
                if engine.retry_at.is_none() && engine.is_full() {
                    match engine.flush_ahead(&consumer) {
                        Ok(()) | Err(BatchError::SinkDown(_)) => {}
                        Err(e) => break Err(e),
                    }
                }
            }
            Some(Err(e)) => warn!(error = %e, "consumer error"),
            None => {}
        }
        let mut engine = lock();
        // Offsets sent without waiting are confirmed, waiting, when a
        // commit failed and whenever the loop is idle (at most once a
        // second): a partition that gets no more records has no later
        // commit to cover a lost one.
        let failed_flag = &consumer.context().commit_failed;
        let commit_failed = failed_flag.load(std::sync::atomic::Ordering::SeqCst);
        if !engine.dead
            && (commit_failed || (idle && engine.pending.is_empty()))
            && last_confirm.elapsed() >= Duration::from_secs(1)
        {
            failed_flag.store(false, std::sync::atomic::Ordering::SeqCst);
            last_confirm = Instant::now();
            let assigned = engine.assigned.clone();
            engine.processor.confirm_commits(
                &consumer,
                |topic, partition| assigned.contains(&(topic.to_string(), partition)),
                true,
            );
        }
        if engine.retry_at.is_none() && engine.is_due(idle) {
            match engine.flush(&consumer) {
                Ok(()) | Err(BatchError::SinkDown(_)) => {}
                Err(e) => break Err(e),
            }
        }
        if engine.retry_at.is_none() && engine.last_sweep.elapsed() >= config.dedup.sweep_interval {
            // Between batches: nothing of the swept partitions is in
            // flight.
            engine.last_sweep = Instant::now();
            let partitions: Vec<_> = engine.assigned.iter().cloned().collect();
            if let Err(e) = engine.processor.sweep(&partitions) {
                break Err(e);
            }
        }
    };

    if matches!(
        result,
        Ok(()) | Err(BatchError::Interrupted) | Err(BatchError::SinkDown(_))
    ) {
        lock()
            .processor
            .confirm_commits(&consumer, |_, _| true, false);
    }
    // Whatever happened, nothing more is processed: closing the consumer
    // runs the revoke callback, which must not commit after a crash.
    lock().dead = true;
    lock().pending.clear();
    lock().decoded = None;
    drop(consumer);
    match result {
        Ok(()) => {
            info!("pipeline stopped");
            Ok(RunEnd::Stopped)
        }
        Err(e @ (BatchError::Interrupted | BatchError::SinkDown(_))) => {
            warn!(
                reason = %e,
                "pipeline stopped with a batch left uncommitted; its records are read again at the next start"
            );
            Ok(RunEnd::Stopped)
        }
        Err(BatchError::Crashed(c)) => {
            warn!(point = c.0, "pipeline stopped at a crash point");
            Ok(RunEnd::Crashed(c.0))
        }
        Err(BatchError::Store(e)) => {
            error!(error = %e, "dedup store failed; stopping without committing");
            Err(e.into())
        }
        Err(BatchError::SinkFatal(why)) => {
            error!(
                why,
                "the sink cannot go on; stopping without committing (a restart settles \
                 the open transaction)"
            );
            Err(PipelineError::Sink(crate::sink::SinkError::Fatal(why)))
        }
        Err(BatchError::TransactionAborted(why)) => {
            unreachable!("a batch whose transaction aborted comes back as SinkDown: {why}")
        }
        Err(BatchError::NoStartingOffset(why)) => {
            error!(why, "refusing to guess where a partition starts");
            Err(PipelineError::NoStartingOffset(why))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        Config::for_tests(extra, "")
    }

    fn records(sizes: &[usize]) -> Vec<Record> {
        (0..)
            .zip(sizes)
            .map(|(i, size)| Record::on_t(i, None, vec![b'x'; *size]))
            .collect()
    }

    #[test]
    fn a_batch_ends_at_max_records_or_max_bytes_whichever_comes_first() {
        let limits = BatchConfig {
            max_records: 3,
            max_bytes: 1000,
            linger_ms: 10,
        };
        assert_eq!(batch_len(&[], &limits), (0, false));
        assert_eq!(batch_len(&records(&[10, 10]), &limits), (2, false));
        assert_eq!(batch_len(&records(&[10, 10, 10]), &limits), (3, true));
        assert_eq!(batch_len(&records(&[10; 7]), &limits), (3, true));
        let size = records(&[600])[0].size();
        assert!(size >= 600);
        // The record that reaches max_bytes is the last of its batch.
        assert_eq!(batch_len(&records(&[600, 600, 10]), &limits), (2, true));
        // A record over max_bytes alone is a batch of its own.
        assert_eq!(batch_len(&records(&[2000, 10]), &limits), (1, true));
    }

    #[test]
    fn a_poll_waits_whole_milliseconds() {
        assert_eq!(
            whole_millis(Duration::from_micros(3_500)),
            Duration::from_millis(4)
        );
        assert_eq!(
            whole_millis(Duration::from_micros(1)),
            Duration::from_millis(1)
        );
        assert_eq!(
            whole_millis(Duration::from_millis(7)),
            Duration::from_millis(7)
        );
        assert_eq!(whole_millis(Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn a_fetch_waits_for_a_fuller_answer_no_longer_than_the_batch_lingers() {
        let client = client_config(&config(""));
        assert_eq!(client.get("fetch.wait.max.ms"), Some("10"));
        assert_eq!(client.get("fetch.min.bytes"), Some("65536"));

        let client = client_config(&config("properties = { \"fetch.min.bytes\" = 1 }"));
        assert_eq!(client.get("fetch.min.bytes"), Some("1"));
        assert_eq!(client.get("fetch.wait.max.ms"), Some("10"));

        let client = client_config(&config("[batch]\nlinger_ms = 0"));
        assert_eq!(client.get("fetch.wait.max.ms"), None);
        assert_eq!(client.get("fetch.min.bytes"), None);
        assert_eq!(fetch_defaults(60_000)[0].1, "500");
    }

    #[test]
    fn librdkafka_queues_two_batches_ahead_unless_told_otherwise() {
        let client = client_config(&config(""));
        assert_eq!(client.get("queued.max.messages.kbytes"), Some("16384"));
        let client = client_config(&config("[batch]\nmax_bytes = 20971520"));
        assert_eq!(client.get("queued.max.messages.kbytes"), Some("40960"));
        // Never more than librdkafka's own default, nor past its range.
        let client = client_config(&config("[batch]\nmax_bytes = 1100000000"));
        assert_eq!(client.get("queued.max.messages.kbytes"), Some("65536"));
        let client = client_config(&config("[batch]\nmax_bytes = 1000"));
        assert_eq!(client.get("queued.max.messages.kbytes"), Some("16384"));
        assert_eq!(client.get("fetch.queue.backoff.ms"), Some("10"));
        let client = client_config(&config(
            "properties = { \"queued.max.messages.kbytes\" = 4096 }",
        ));
        assert_eq!(client.get("queued.max.messages.kbytes"), Some("4096"));
    }
}
