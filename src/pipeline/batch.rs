//! One batch through the write path, in the order the guarantee needs:
//!
//! 1. decode every record (key, fingerprint, or why it is invalid);
//! 2. look the keys up in the dedup store, all at once;
//! 3. classify: new, duplicate, conflict, invalid, filtered; a key seen
//!    twice within the batch is classified against its first occurrence;
//! 4. apply the new records to the sink and wait until durable (I2: the
//!    sink comes before the dedup record that stands for it);
//! 5. dead-letter what can never succeed and wait for the acks;
//! 6. produce the dedup records to the changelog topic and, while the
//!    broker acknowledges them, write them to RocksDB, synced; then
//!    record each partition's progress (the next synced write makes it
//!    durable). A record read again that finds its own entry (same
//!    offset) restates the entry to the changelog, since the crash that
//!    made it read again may have come before the changelog's acks;
//! 7. commit offset last + 1 of each partition to Kafka (I1: last).
//!
//! With a transactional sink (Kafka), step 4 writes into an open
//! transaction, the changelog records join it, step 6 also writes a
//! journal of the batch, and step 7 commits the transaction with the
//! offsets in it; an abort takes the batch's dedup records back and does
//! the batch again.
//!
//! Transient failures in steps 2, 4, 5 and 6 are retried with backoff for
//! as long as it takes; nothing is dead-lettered for them (I6). A failed
//! sink write (step 4) returns [`BatchError::SinkDown`] instead of waiting
//! here, so that the consumer loop can pause consumption and keep polling
//! (and so its group membership) while the sink is down. A crash at
//! any point leaves the records uncommitted, and the re-read finds the sink
//! already holding their effect (I3, I5).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::ConsumerGroupMetadata;
use tracing::debug_span;

use super::retry::{Backoff, Shutdown};
use crate::config::{Config, KeySource, LimitsConfig, RetryConfig};
use crate::dead_letter::{DeadLetter, DeadLetterProducer};
use crate::decode::{decode, DeadLetterReason, Decoded, Event, Fingerprint};
use crate::dedup::changelog::{Sent, Written};
use crate::dedup::{
    Changelog, ChangelogError, ChangelogRecord, DedupKey, DedupStore, Entry, Progress, StoreError,
};
use crate::failpoint::{CrashPlan, Crashed};
use crate::outcome::Outcome;
use crate::record::{Offset, Partition, Record};
use crate::sink::{Sink, SinkError, SinkWrite, TransactionError, WriteOutcome};
use crate::telemetry::events::Event as Telemetry;
use crate::telemetry::{Metrics, Readiness};

/// Commits offsets to Kafka. A trait so that the write path can be driven
/// by the consumer loop and by the rebalance callback alike.
pub trait OffsetCommitter {
    /// Commits each partition's next offset. With `wait`, synchronously;
    /// otherwise the request is sent and its result comes back through
    /// the consumer's commit callback.
    ///
    /// # Errors
    /// The broker's refusal (or, without `wait`, the client's), as text.
    fn commit(&self, offsets: &[Progress], wait: bool) -> Result<(), String>;

    /// The consumer group's metadata, for a transactional sink that
    /// commits the offsets itself.
    fn group_metadata(&self) -> Option<ConsumerGroupMetadata>;
}

/// Why a batch did not complete. None of these lose data: the batch is
/// not committed, so its records are read again.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("stopped while retrying a batch; it will be re-read on restart")]
    Interrupted,
    #[error(transparent)]
    Crashed(#[from] Crashed),
    /// The dedup store failed in a way retrying will not fix.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The sink write failed in a way that heals (or needs an operator):
    /// nothing of the batch took effect that counts. The consumer loop
    /// pauses consumption, stays in its group, and offers the batch again
    /// after this delay.
    #[error("sink down; the batch is tried again in {0:?}")]
    SinkDown(Duration),
    /// The sink can do nothing more (a fenced Kafka producer).
    #[error("sink failed for good: {0}")]
    SinkFatal(String),
    /// The sink's transaction aborted and the batch's dedup records were
    /// taken back; [`BatchProcessor::process`] hands the batch back as
    /// [`BatchError::SinkDown`], to be done again.
    #[error("sink transaction aborted: {0}")]
    TransactionAborted(String),
    /// Policy `fail`: a partition has no offset to start from.
    #[error("no starting offset: {0}")]
    NoStartingOffset(String),
}

/// How one record will be handled.
enum Plan {
    New {
        event: Event,
        dedup: DedupKey,
    },
    /// With `restate`, the record is the one its stored entry came from,
    /// read again because its batch was not committed: the entry goes to
    /// the changelog again, in case the changelog never acknowledged it.
    Duplicate {
        restate: Option<(DedupKey, Entry)>,
    },
    Conflict {
        first_offset: Option<Offset>,
    },
    Invalid {
        reason: DeadLetterReason,
        detail: String,
    },
    Filtered,
}

/// Step 1 on its own: decoding needs only the records and the
/// configuration, never the dedup store, so the consumer loop can decode
/// the next batch on another thread while this one is written (see
/// [`super::ahead`]).
#[derive(Clone)]
pub struct Decoder {
    topics: HashMap<String, KeySource>,
    limits: LimitsConfig,
}

/// What [`Decoder::decode`] made of each record of a batch, in order: its
/// decoding and, for an event, its dedup key.
#[derive(Debug)]
pub struct DecodedBatch(Vec<(Decoded, Option<DedupKey>)>);

impl DecodedBatch {
    /// How many records it stands for.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Decoder {
    pub fn new(config: &Config) -> Self {
        Decoder {
            topics: config
                .topics
                .iter()
                .map(|t| (t.name.clone(), t.key.clone()))
                .collect(),
            limits: config.limits.clone(),
        }
    }

    pub fn decode(&self, records: &[Record]) -> DecodedBatch {
        let default_source = KeySource::default();
        DecodedBatch(
            records
                .iter()
                .map(|r| {
                    let source = self.topics.get(&r.topic).unwrap_or(&default_source);
                    let d = decode(r, source, &self.limits);
                    let key = match &d {
                        Decoded::Event(e) => Some(DedupKey::new(&r.topic, r.partition, &e.key)),
                        _ => None,
                    };
                    (d, key)
                })
                .collect(),
        )
    }
}

/// What a processed batch leaves to be freed: its decoded records. The
/// consumer loop has them freed on the decoding thread, which allocated
/// most of them (see [`super::ahead`]).
pub struct Spent {
    _plans: Vec<Plan>,
}

pub struct BatchProcessor {
    decoder: Decoder,
    retry: RetryConfig,
    store: Arc<DedupStore>,
    sink: Box<dyn Sink>,
    dead_letters: DeadLetterProducer,
    /// The dedup changelog, unless `dedup.changelog = false`.
    changelog: Option<Changelog>,
    /// Whether the sink commits offsets in its own transaction.
    transactional_sink: bool,
    /// Changelog positions learnt from a transaction's commit, written
    /// with the next batch's dedup records.
    changelog_positions: Vec<Progress>,
    /// Backoff of the sink's failed writes, across tries of a batch.
    sink_backoff: Backoff,
    /// Backoff of a batch whose transaction aborted, across its tries.
    abort_backoff: Backoff,
    /// Offsets committed without waiting, and not yet confirmed by a
    /// synchronous commit (see [`BatchProcessor::confirm_commits`]).
    unconfirmed: BTreeMap<(String, Partition), Offset>,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    crash: Arc<CrashPlan>,
    shutdown: Shutdown,
}

impl BatchProcessor {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: &Config,
        store: Arc<DedupStore>,
        mut sink: Box<dyn Sink>,
        dead_letters: DeadLetterProducer,
        changelog: Option<Changelog>,
        metrics: Arc<Metrics>,
        readiness: Arc<Readiness>,
        crash: Arc<CrashPlan>,
        shutdown: Shutdown,
    ) -> Self {
        BatchProcessor {
            decoder: Decoder::new(config),
            retry: config.retry,
            store,
            transactional_sink: sink.transactional().is_some(),
            sink,
            dead_letters,
            changelog,
            changelog_positions: Vec::new(),
            sink_backoff: Backoff::new(config.retry),
            abort_backoff: Backoff::new(config.retry),
            unconfirmed: BTreeMap::new(),
            metrics,
            readiness,
            crash,
            shutdown,
        }
    }

    pub fn store(&self) -> &Arc<DedupStore> {
        &self.store
    }

    pub fn decoder(&self) -> &Decoder {
        &self.decoder
    }

    /// Runs one batch through every step, offsets included. `decoded` is
    /// the batch's step 1 if it was done already (it is done here
    /// otherwise).
    ///
    /// # Errors
    /// See [`BatchError`]; in every case nothing of this batch was
    /// committed to Kafka.
    pub fn process(
        &mut self,
        records: &[Record],
        decoded: Option<DecodedBatch>,
        committer: &dyn OffsetCommitter,
    ) -> Result<Spent, BatchError> {
        if records.is_empty() {
            return Ok(Spent { _plans: Vec::new() });
        }
        match self.process_once(records, decoded, committer) {
            // The sink's transaction was aborted: nothing of the batch took
            // effect and its dedup records were taken back. The batch is
            // handed back as if the sink were down, and done again after
            // the backoff: meanwhile the consumer loop keeps polling, so
            // that a member the group expelled (an outage longer than the
            // session timeout) rejoins. The transaction's offsets name the
            // member, so without that every try would abort again.
            Err(BatchError::TransactionAborted(why)) => {
                let delay = self.abort_backoff.next_delay();
                tracing::warn!(
                    error = %why,
                    attempt = self.abort_backoff.attempt(),
                    backoff_ms = delay.as_millis() as u64,
                    "sink transaction aborted; the batch is done again after the backoff"
                );
                self.metrics.transactions_aborted.inc();
                Err(BatchError::SinkDown(delay))
            }
            Err(e) => {
                if matches!(e, BatchError::Interrupted | BatchError::Store(_)) {
                    // Leave no transaction open behind us.
                    if let Some(txn) = self.sink.transactional() {
                        txn.abort();
                    }
                }
                Err(e)
            }
            Ok(spent) => {
                self.abort_backoff = Backoff::new(self.retry);
                Ok(spent)
            }
        }
    }

    fn process_once(
        &mut self,
        records: &[Record],
        decoded: Option<DecodedBatch>,
        committer: &dyn OffsetCommitter,
    ) -> Result<Spent, BatchError> {
        let started = Instant::now();
        let progress = next_offsets(records);
        let ranges = describe_ranges(records);
        let _span = debug_span!("batch", records = records.len(), ranges = %ranges).entered();

        let mut step = Instant::now();
        let plans = self.classify(records, decoded)?;
        self.step_done("classify", &mut step);

        // Step 4: the sink, before anything that says "done".
        let writes: Vec<(usize, SinkWrite<'_>)> = plans
            .iter()
            .enumerate()
            .filter_map(|(i, plan)| match plan {
                Plan::New { event, .. } => Some((i, sink_write(&records[i], event))),
                _ => None,
            })
            .collect();
        let sink_outcomes = self.apply_to_sink(&writes)?;
        self.step_done("sink", &mut step);
        self.crash.check("after-sink-write")?;

        // Step 5: dead letters, acknowledged before the offsets move.
        let mut outcomes: Vec<Outcome> = plans.iter().map(plan_outcome).collect();
        let mut letters = Vec::new();
        let mut details: Vec<(usize, DeadLetterReason, String)> = Vec::new();
        for (i, plan) in plans.iter().enumerate() {
            match plan {
                Plan::Invalid { reason, detail } => details.push((i, *reason, detail.clone())),
                Plan::Conflict { first_offset } => details.push((
                    i,
                    DeadLetterReason::Conflict,
                    match first_offset {
                        Some(o) => {
                            format!("idempotency key first seen at offset {o} with another body")
                        }
                        None => "idempotency key seen with another body".to_string(),
                    },
                )),
                _ => {}
            }
        }
        for ((i, _), outcome) in writes.iter().zip(&sink_outcomes) {
            outcomes[*i] = match outcome {
                WriteOutcome::Applied => Outcome::Applied,
                WriteOutcome::Stale => Outcome::Stale,
                WriteOutcome::AlreadyPresent => Outcome::Duplicate,
                WriteOutcome::Rejected(why) => {
                    details.push((*i, DeadLetterReason::SinkRejected, why.clone()));
                    Outcome::DeadLettered
                }
                WriteOutcome::TooLarge(why) => {
                    details.push((*i, DeadLetterReason::TooLarge, why.clone()));
                    Outcome::DeadLettered
                }
                WriteOutcome::Conflict(why) => {
                    details.push((*i, DeadLetterReason::Conflict, why.clone()));
                    Outcome::Conflict
                }
            };
        }
        details.sort_by_key(|(i, _, _)| *i);
        for (i, reason, detail) in &details {
            letters.push(DeadLetter {
                record: &records[*i],
                reason: *reason,
                detail,
            });
        }
        self.send_dead_letters(&letters)?;
        self.step_done("dead_letter", &mut step);
        self.crash.check("after-dead-letter")?;

        // Step 6: the dedup records, to the changelog and to RocksDB.
        let now = self.store.now_ms();
        let entries: Vec<(DedupKey, Entry)> = writes
            .iter()
            .zip(&sink_outcomes)
            .filter(|(_, o)| o.took_effect_or_was_there())
            .filter_map(|((i, _), _)| match &plans[*i] {
                Plan::New { event, dedup } => Some((
                    dedup.clone(),
                    Entry {
                        fingerprint: event.fingerprint,
                        first_seen_ms: now,
                        offset: records[*i].offset,
                    },
                )),
                _ => None,
            })
            .collect();
        let changelog = match &self.changelog {
            Some(c) => c.records(entries.iter().map(|(k, e)| (k, Some(*e))).chain(
                plans.iter().filter_map(|plan| match plan {
                    Plan::Duplicate {
                        restate: Some((k, e)),
                    } => Some((k, Some(*e))),
                    _ => None,
                }),
            )),
            None => Vec::new(),
        };
        if self.transactional_sink {
            // The changelog records join the sink's transaction (step 7).
            let positions = std::mem::take(&mut self.changelog_positions);
            self.write_store(&entries, &progress, &positions, true)?;
            self.step_done("store", &mut step);
            self.crash.check("after-dedup-write")?;
            self.changelog_positions = self.commit_transaction(committer, &progress, &changelog)?;
        } else {
            match self.changelog.as_ref().filter(|_| !changelog.is_empty()) {
                None => {
                    self.write_store(&entries, &progress, &[], false)?;
                    self.step_done("store", &mut step);
                }
                Some(c) => {
                    // The broker acknowledges the changelog records while
                    // RocksDB syncs. The progress that lets a restart skip
                    // the batch is recorded only once both are done: a
                    // crash in between reads the batch again, and the
                    // re-read restates its records to the changelog (see
                    // `classify`).
                    let sent = c.start(&changelog);
                    self.write_store(&entries, &[], &[], false)?;
                    self.step_done("store", &mut step);
                    self.crash.check("before-changelog-ack")?;
                    let written = self.changelog_acknowledged(c, &changelog, sent)?;
                    let positions = self.advance_positions(written)?;
                    self.step_done("changelog", &mut step);
                    self.record_progress(&progress, &positions)?;
                }
            }
            self.crash.check("after-dedup-write")?;
            // Step 7: the commit, last.
            self.commit_offsets(committer, &progress);
        }
        self.step_done("commit", &mut step);

        self.count_outcomes(records, &outcomes);
        for letter in &letters {
            Telemetry::RecordDeadLettered {
                reason: letter.reason,
                topic: &letter.record.topic,
                partition: letter.record.partition.0,
                offset: letter.record.offset.0,
                detail: letter.detail,
            }
            .emit(&self.metrics);
        }
        Telemetry::BatchCommitted {
            records: records.len(),
            elapsed: started.elapsed(),
            ranges: &ranges,
        }
        .emit(&self.metrics);
        Ok(Spent { _plans: plans })
    }

    fn step_done(&self, name: &str, since: &mut Instant) {
        let now = Instant::now();
        self.metrics
            .step_seconds
            .with_label_values(&[name])
            .observe((now - *since).as_secs_f64());
        *since = now;
    }

    /// Adds the batch's outcomes to the counters, once per topic and
    /// outcome rather than once per record.
    fn count_outcomes(&self, records: &[Record], outcomes: &[Outcome]) {
        let mut counts: HashMap<(&str, Outcome), u64> = HashMap::new();
        for (record, outcome) in records.iter().zip(outcomes) {
            *counts.entry((&record.topic, *outcome)).or_default() += 1;
        }
        let mut read: HashMap<&str, u64> = HashMap::new();
        for ((topic, outcome), n) in counts {
            *read.entry(topic).or_default() += n;
            self.metrics
                .records
                .with_label_values(&[topic, outcome.as_str()])
                .inc_by(n);
        }
        for (topic, n) in read {
            self.metrics
                .records_read
                .with_label_values(&[topic])
                .inc_by(n);
        }
    }

    /// Steps 1 to 3: decode (unless `decoded` holds it), look up,
    /// classify.
    fn classify(
        &self,
        records: &[Record],
        decoded: Option<DecodedBatch>,
    ) -> Result<Vec<Plan>, BatchError> {
        let decoded = match decoded {
            Some(d) if d.len() == records.len() => {
                self.metrics.decoded_ahead.inc();
                d.0
            }
            _ => self.decoder.decode(records).0,
        };

        let keys: Vec<&DedupKey> = decoded.iter().filter_map(|(_, k)| k.as_ref()).collect();
        let mut stored = self.lookup(&keys)?.into_iter();

        let mut in_batch: HashMap<DedupKey, (Fingerprint, Offset)> = HashMap::new();
        let mut plans = Vec::with_capacity(records.len());
        for (record, (d, key)) in records.iter().zip(decoded) {
            let plan = match (d, key) {
                (Decoded::Event(event), Some(dedup)) => {
                    let stored_entry = stored.next().expect("one look-up per key");
                    let earlier = stored_entry
                        .map(|e| (e.fingerprint, e.offset))
                        .or_else(|| in_batch.get(&dedup).copied());
                    match earlier {
                        Some((fp, _)) if fp == event.fingerprint => Plan::Duplicate {
                            restate: stored_entry
                                .filter(|e| self.changelog.is_some() && e.offset == record.offset)
                                .map(|e| (dedup, e)),
                        },
                        Some((_, offset)) => Plan::Conflict {
                            first_offset: Some(offset),
                        },
                        None => {
                            in_batch.insert(dedup.clone(), (event.fingerprint, record.offset));
                            Plan::New { event, dedup }
                        }
                    }
                }
                (Decoded::Tombstone, _) => Plan::Filtered,
                (Decoded::Invalid { reason, detail }, _) => Plan::Invalid { reason, detail },
                (Decoded::Event(_), None) => unreachable!("events always have a dedup key"),
            };
            plans.push(plan);
        }
        Ok(plans)
    }

    fn lookup(&self, keys: &[&DedupKey]) -> Result<Vec<Option<Entry>>, BatchError> {
        self.store_retrying(|| self.store.lookup(keys))
    }

    /// Runs a dedup store operation until it succeeds, waiting with
    /// backoff while the store is busy.
    fn store_retrying<T>(
        &self,
        operation: impl Fn() -> Result<T, StoreError>,
    ) -> Result<T, BatchError> {
        let mut backoff = Backoff::new(self.retry);
        loop {
            match operation() {
                Ok(done) => return Ok(done),
                Err(e) if e.is_retriable() => self.wait(&mut backoff, &e.to_string())?,
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn apply_to_sink(
        &mut self,
        writes: &[(usize, SinkWrite<'_>)],
    ) -> Result<Vec<WriteOutcome>, BatchError> {
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        let batch: Vec<SinkWrite<'_>> = writes.iter().map(|(_, w)| *w).collect();
        let started = Instant::now();
        match self.sink.apply(&batch) {
            Ok(outcomes) => {
                self.readiness.set_sink_ok(true);
                if self.sink_backoff.attempt() > 0 {
                    tracing::info!(
                        sink = self.sink.name(),
                        retries = self.sink_backoff.attempt(),
                        "sink write succeeded after retries; consumption resumes"
                    );
                    self.sink_backoff = Backoff::new(self.retry);
                }
                self.metrics
                    .sink_write_seconds
                    .observe(started.elapsed().as_secs_f64());
                assert_eq!(
                    outcomes.len(),
                    batch.len(),
                    "a sink must return one outcome per record"
                );
                Ok(outcomes)
            }
            Err(SinkError::Fatal(why)) => {
                self.readiness.set_sink_ok(false);
                Err(BatchError::SinkFatal(why))
            }
            Err(error) => {
                self.readiness.set_sink_ok(false);
                let delay = self.sink_backoff.next_delay();
                Telemetry::SinkWriteFailed {
                    sink: self.sink.name(),
                    error: &error,
                    attempt: self.sink_backoff.attempt(),
                    backoff: delay,
                }
                .emit(&self.metrics);
                Err(BatchError::SinkDown(delay))
            }
        }
    }

    /// Retries only the letters not yet acknowledged, so that none is
    /// written twice by a retry.
    fn send_dead_letters(&self, letters: &[DeadLetter<'_>]) -> Result<(), BatchError> {
        let mut backoff = Backoff::new(self.retry);
        let mut pending: Vec<DeadLetter<'_>> = letters.to_vec();
        loop {
            match self.dead_letters.send(&pending) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    pending = e.undelivered.iter().map(|&i| pending[i]).collect();
                    let delay = backoff.next_delay();
                    Telemetry::DeadLetterWriteFailed {
                        error: &e.to_string(),
                        attempt: backoff.attempt(),
                        backoff: delay,
                    }
                    .emit(&self.metrics);
                    if self.shutdown.sleep(delay) {
                        return Err(BatchError::Interrupted);
                    }
                }
            }
        }
    }

    fn write_store(
        &self,
        entries: &[(DedupKey, Entry)],
        progress: &[Progress],
        changelog: &[Progress],
        transactional: bool,
    ) -> Result<(), BatchError> {
        self.store_retrying(|| {
            if transactional {
                self.store
                    .commit_in_transaction(entries, progress, changelog)
            } else {
                self.store.commit(entries, progress, changelog)
            }
        })
    }

    fn wait(&self, backoff: &mut Backoff, error: &str) -> Result<(), BatchError> {
        let delay = backoff.next_delay();
        tracing::warn!(
            error,
            attempt = backoff.attempt(),
            "dedup store busy; retrying"
        );
        if self.shutdown.sleep(delay) {
            Err(BatchError::Interrupted)
        } else {
            Ok(())
        }
    }

    /// Commits the sink's transaction with the batch's offsets. An abort
    /// takes the batch's dedup records back before it is done again.
    fn commit_transaction(
        &mut self,
        committer: &dyn OffsetCommitter,
        progress: &[Progress],
        changelog: &[ChangelogRecord],
    ) -> Result<Vec<Progress>, BatchError> {
        let started = Instant::now();
        let Some(group) = committer.group_metadata() else {
            return Err(
                self.take_back("the consumer has no group metadata to commit with".to_string())?
            );
        };
        let txn = self
            .sink
            .transactional()
            .expect("called for transactional sinks only");
        match txn.commit(progress, &group, changelog) {
            Ok(positions) => {
                if let Err(e) = self.store.clear_journal() {
                    // Harmless: the next start settles it as committed.
                    tracing::warn!(error = %e, "cannot clear the transaction journal");
                }
                self.metrics
                    .commit_seconds
                    .observe(started.elapsed().as_secs_f64());
                Ok(positions)
            }
            Err(TransactionError::Aborted(why)) => Err(self.take_back(why)?),
            // The journal stays; the next start settles it.
            Err(TransactionError::Fatal(why)) => Err(BatchError::SinkFatal(why)),
        }
    }

    /// The changelog positions this store may record after a write: a
    /// partition's position moves past the write only when the write
    /// follows it directly and nothing else lies among its records.
    /// Otherwise records this store lacks lie before or among them
    /// (another instance wrote there, say while this one was expelled
    /// from the group and did not know it yet, or an earlier try of this
    /// write landed): they are read into the store now, which also moves
    /// the position to the partition's end.
    fn advance_positions(&self, written: Vec<Written>) -> Result<Vec<Progress>, BatchError> {
        let mut advanced = Vec::with_capacity(written.len());
        for w in written {
            let (topic, partition) = (&w.after.topic, w.after.partition);
            let known = self.store_retrying(|| self.store.changelog_position(topic, partition))?;
            if w.follows(known) {
                advanced.push(w.after);
                continue;
            }
            tracing::info!(
                topic,
                partition = partition.0,
                known = known.map_or(-1, |o| o.0),
                written_from = w.first.0,
                "the dedup changelog holds records this store lacks before this write; reading them"
            );
            self.restore(topic, partition)?;
        }
        Ok(advanced)
    }

    /// Waits for the acknowledgements of changelog records produced by
    /// [`Changelog::start`]; when they fail (or the start did), sends the
    /// records again until all are acknowledged.
    fn changelog_acknowledged(
        &self,
        changelog: &Changelog,
        records: &[ChangelogRecord],
        sent: Result<Sent, ChangelogError>,
    ) -> Result<Vec<Written>, BatchError> {
        let mut backoff = Backoff::new(self.retry);
        let mut acked = sent.and_then(|sent| changelog.acknowledged(records, sent));
        loop {
            match acked {
                Ok(positions) => return Ok(positions),
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(
                        error = %e,
                        attempt = backoff.attempt(),
                        "dedup changelog write failed; retrying, nothing is committed meanwhile"
                    );
                    self.metrics.changelog_failures.inc();
                    if self.shutdown.sleep(delay) {
                        return Err(BatchError::Interrupted);
                    }
                    acked = changelog.send(records);
                }
            }
        }
    }

    /// Records the batch's progress once its changelog records are
    /// acknowledged (not synced: see [`DedupStore::record_progress`]).
    fn record_progress(
        &self,
        progress: &[Progress],
        changelog: &[Progress],
    ) -> Result<(), BatchError> {
        self.store_retrying(|| self.store.record_progress(progress, changelog))
    }

    /// Reads a newly assigned partition's changelog into the store, as far
    /// as the store lacks it, before any of its records is processed;
    /// retried until it succeeds, since processing without it could miss
    /// duplicates.
    ///
    /// # Errors
    /// [`BatchError::Interrupted`] when shutdown came first; a store error.
    pub fn restore(&self, topic: &str, partition: Partition) -> Result<(), BatchError> {
        let Some(changelog) = &self.changelog else {
            return Ok(());
        };
        let labels = [topic, &partition.to_string()];
        let gauge = self.metrics.restore_remaining.with_label_values(&labels);
        let started = Instant::now();
        let mut last_log = Instant::now();
        let mut backoff = Backoff::new(self.retry);
        self.readiness.restoring(1);
        let result = loop {
            let mut report = |read: u64, remaining: u64| {
                gauge.set(remaining as i64);
                if last_log.elapsed() >= Duration::from_secs(5) {
                    let secs = started.elapsed().as_secs_f64().max(0.001);
                    tracing::info!(
                        topic,
                        partition = partition.0,
                        read,
                        remaining,
                        rate = (read as f64 / secs) as u64,
                        "restoring dedup state from the changelog"
                    );
                    last_log = Instant::now();
                }
            };
            match changelog.restore(&self.store, topic, partition, &mut report) {
                Ok(read) => {
                    self.metrics.restored.inc_by(read);
                    if read > 0 {
                        tracing::info!(
                            topic,
                            partition = partition.0,
                            read,
                            elapsed_ms = started.elapsed().as_millis() as u64,
                            "dedup state restored from the changelog"
                        );
                    }
                    break Ok(());
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, topic, partition = partition.0, "dedup restore failed; retrying");
                    if self.shutdown.sleep(delay) {
                        break Err(BatchError::Interrupted);
                    }
                }
            }
        };
        gauge.set(0);
        self.readiness.restoring(-1);
        result
    }

    /// Removes the keys past the window from these partitions, with a
    /// tombstone in the changelog for each, so that the changelog does not
    /// grow for ever. Without a changelog, RocksDB's compaction filter
    /// does this alone.
    ///
    /// # Errors
    /// [`BatchError::Interrupted`] when shutdown came first; a store error.
    pub fn sweep(&self, partitions: &[(String, Partition)]) -> Result<(), BatchError> {
        let Some(changelog) = &self.changelog else {
            return Ok(());
        };
        for (topic, partition) in partitions {
            let expired = self.store.expired_keys(topic, *partition)?;
            if expired.is_empty() {
                continue;
            }
            for chunk in expired.chunks(10_000) {
                let tombstones = changelog.records(chunk.iter().map(|k| (k, None)));
                let sent = changelog.start(&tombstones);
                let written = self.changelog_acknowledged(changelog, &tombstones, sent)?;
                self.store.remove(chunk)?;
                // After the removal: a restore that reads records written
                // after the tombstones must leave them in the store. With
                // a transactional sink, the store's position lags a batch
                // and every transaction leaves a marker, so the gap check
                // would always restore: the position is left as it is.
                if !self.transactional_sink {
                    let positions = self.advance_positions(written)?;
                    self.record_progress(&[], &positions)?;
                }
            }
            tracing::info!(
                topic,
                partition = partition.0,
                keys = expired.len(),
                "expired dedup keys removed, with changelog tombstones"
            );
        }
        Ok(())
    }

    /// Removes the dedup records of a batch whose transaction aborted.
    fn take_back(&self, why: String) -> Result<BatchError, BatchError> {
        self.store_retrying(|| self.store.settle_journal(false))?;
        Ok(BatchError::TransactionAborted(why))
    }

    /// Commits without waiting for the broker: the records are durable in
    /// the sink and the dedup store, so a commit that is lost only makes
    /// them read again, as duplicates. The next batch's commit covers this
    /// one's offsets too; a failure is counted by the commit callback.
    fn commit_offsets(&mut self, committer: &dyn OffsetCommitter, progress: &[Progress]) {
        let started = Instant::now();
        match committer.commit(progress, false) {
            Ok(()) => self
                .metrics
                .commit_seconds
                .observe(started.elapsed().as_secs_f64()),
            Err(error) => Telemetry::OffsetCommitFailed { error: &error }.emit(&self.metrics),
        }
        for p in progress {
            self.unconfirmed
                .insert((p.topic.clone(), p.partition), p.next);
        }
    }

    /// Commits again, and waits for, the offsets committed without waiting
    /// of the partitions `which` selects: before partitions are given up
    /// (so that their next owner starts after everything done here), at
    /// shutdown, after a failed commit and when idle. A failure is logged;
    /// with `retry_later` the offsets are kept for the next confirmation
    /// (unless a newer batch replaced them), otherwise those records are
    /// read again, as duplicates, by the partition's next reader.
    pub fn confirm_commits(
        &mut self,
        committer: &dyn OffsetCommitter,
        which: impl Fn(&str, Partition) -> bool,
        retry_later: bool,
    ) {
        let (confirm, keep): (BTreeMap<_, _>, BTreeMap<_, _>) =
            std::mem::take(&mut self.unconfirmed)
                .into_iter()
                .partition(|((topic, partition), _)| which(topic, *partition));
        self.unconfirmed = keep;
        if confirm.is_empty() {
            return;
        }
        let progress: Vec<Progress> = confirm
            .into_iter()
            .map(|((topic, partition), next)| Progress {
                topic,
                partition,
                next,
            })
            .collect();
        let mut last_error = String::new();
        for _ in 0..3 {
            match committer.commit(&progress, true) {
                Ok(()) => return,
                Err(e) => last_error = e,
            }
        }
        tracing::warn!(
            error = last_error,
            retry_later,
            "cannot confirm the last offset commit; until it is, those records would be read \
             again as duplicates"
        );
        if retry_later {
            for p in progress {
                self.unconfirmed
                    .entry((p.topic, p.partition))
                    .or_insert(p.next);
            }
        }
    }
}

fn sink_write<'a>(record: &'a Record, event: &'a Event) -> SinkWrite<'a> {
    SinkWrite {
        topic: &record.topic,
        partition: record.partition,
        offset: record.offset,
        key: &event.key,
        body: &event.body,
        raw: record.value.as_deref().unwrap_or_default(),
    }
}

fn plan_outcome(plan: &Plan) -> Outcome {
    match plan {
        // Replaced by the sink's answer.
        Plan::New { .. } => Outcome::Applied,
        Plan::Duplicate { .. } => Outcome::Duplicate,
        Plan::Conflict { .. } => Outcome::Conflict,
        Plan::Invalid { .. } => Outcome::DeadLettered,
        Plan::Filtered => Outcome::Filtered,
    }
}

/// The offset to commit per partition: the last offset of the batch + 1.
fn next_offsets(records: &[Record]) -> Vec<Progress> {
    let mut last: BTreeMap<(&str, Partition), Offset> = BTreeMap::new();
    for r in records {
        let e = last.entry((&r.topic, r.partition)).or_insert(r.offset);
        *e = (*e).max(r.offset);
    }
    last.into_iter()
        .map(|((topic, partition), offset)| Progress {
            topic: topic.to_string(),
            partition,
            next: offset.next(),
        })
        .collect()
}

/// "topic/partition@first..=last" for each partition in the batch.
pub fn describe_ranges(records: &[Record]) -> String {
    let mut ranges: BTreeMap<(&str, Partition), (Offset, Offset)> = BTreeMap::new();
    for r in records {
        let e = ranges
            .entry((&r.topic, r.partition))
            .or_insert((r.offset, r.offset));
        e.0 = e.0.min(r.offset);
        e.1 = e.1.max(r.offset);
    }
    let mut out = String::new();
    for ((topic, partition), (first, last)) in ranges {
        if !out.is_empty() {
            out.push(',');
        }
        let _ = write!(out, "{topic}/{partition}@{first}..={last}");
    }
    out
}
