//! The sink contract, and the sinks that implement it.
//!
//! A sink applies a batch of new records and returns only when the batch
//! is durable. It must be idempotent (applying the same record twice
//! leaves the same state) and, in upsert mode, monotonic (a record with an
//! older version than the row holds changes nothing). Together these make
//! a crash between the sink write and the dedup write harmless: the replay
//! writes the same thing again.

pub mod files;
pub mod http;
pub mod kafka;
pub mod postgres;
pub mod sqlite;
pub mod table;

use rdkafka::consumer::ConsumerGroupMetadata;
use serde_json::Value;

use crate::dedup::{ChangelogRecord, Progress};
use crate::record::{IdemKey, Offset, Partition};

/// One record to apply.
#[derive(Debug, Clone, Copy)]
pub struct SinkWrite<'a> {
    pub topic: &'a str,
    pub partition: Partition,
    pub offset: Offset,
    pub key: &'a IdemKey,
    pub body: &'a Value,
    /// The payload exactly as it arrived.
    pub raw: &'a [u8],
}

/// What the sink did with one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOutcome {
    /// The record's effect is in the sink now.
    Applied,
    /// The sink holds a newer version of this entity; nothing changed.
    Stale,
    /// The sink already held this idempotency key (insert mode); nothing
    /// changed. Seen after a crash between sink and dedup write, or when a
    /// key comes back after its dedup window.
    AlreadyPresent,
    /// The sink refused this record as invalid; it can never succeed and
    /// is dead-lettered with this reason.
    Rejected(String),
    /// The sink refused this record as too large (HTTP 413): dead-lettered
    /// with reason `too-large`.
    TooLarge(String),
    /// The sink holds this idempotency key with another body (HTTP 422):
    /// counted as a conflict and dead-lettered.
    Conflict(String),
}

impl WriteOutcome {
    /// Whether the sink now holds this record's effect (or already did),
    /// so that its dedup record may be written.
    pub fn took_effect_or_was_there(&self) -> bool {
        matches!(
            self,
            WriteOutcome::Applied | WriteOutcome::Stale | WriteOutcome::AlreadyPresent
        )
    }
}

/// A failure of the whole batch. Nothing is dead-lettered for it: the
/// batch is retried with backoff until it succeeds or idem stops.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// Expected to heal by itself: the file is locked, the server is down.
    #[error("sink unavailable: {0}")]
    Unavailable(String),
    /// Will not heal without an operator: missing table, read-only file,
    /// wrong schema. Still retried, since the records are not at fault.
    #[error("sink needs attention: {0}")]
    NeedsOperator(String),
    /// The sink can do nothing more in this process (a fenced Kafka
    /// producer): idem stops with an error instead of retrying.
    #[error("sink failed for good: {0}")]
    Fatal(String),
}

impl SinkError {
    /// A fixed label for the retry metric.
    pub fn cause(&self) -> &'static str {
        match self {
            SinkError::Unavailable(_) => "unavailable",
            SinkError::NeedsOperator(_) => "needs-operator",
            SinkError::Fatal(_) => "fatal",
        }
    }
}

/// A place where records take effect.
pub trait Sink: Send {
    /// A short fixed name for metrics and logs, e.g. `sqlite`.
    fn name(&self) -> &'static str;

    /// Applies `batch` in order and returns one outcome per record, after
    /// the applied records are durable.
    ///
    /// # Errors
    /// A [`SinkError`] when the batch as a whole could not be written; none
    /// of it may be taken as applied, and the caller retries it.
    fn apply(&mut self, batch: &[SinkWrite<'_>]) -> Result<Vec<WriteOutcome>, SinkError>;

    /// A sink whose writes take effect only when committed together with
    /// the consumed offsets (the Kafka sink) returns itself here. Its
    /// `apply` then writes into an open transaction, and the batch's
    /// offsets are committed by [`Transactional::commit`] instead of by
    /// the consumer.
    fn transactional(&mut self) -> Option<&mut dyn Transactional> {
        None
    }
}

/// The commit of a transactional sink.
pub trait Transactional {
    /// Commits what `apply` wrote since the last commit, together with
    /// each partition's next offset for the consumer group.
    ///
    /// # Errors
    /// [`TransactionError::Aborted`]: nothing of the transaction took
    /// effect and the batch must be done again; [`TransactionError::Fatal`]:
    /// this producer can do nothing more (fenced by another with the same
    /// transactional id).
    /// `changelog` holds the batch's dedup changelog records, written in
    /// the same transaction; the changelog positions after them are
    /// returned.
    fn commit(
        &mut self,
        offsets: &[Progress],
        group: &ConsumerGroupMetadata,
        changelog: &[ChangelogRecord],
    ) -> Result<Vec<Progress>, TransactionError>;

    /// Abandons what `apply` wrote since the last commit, if anything.
    fn abort(&mut self);
}

#[derive(Debug, thiserror::Error)]
pub enum TransactionError {
    #[error("transaction aborted, the batch will be done again: {0}")]
    Aborted(String),
    #[error("the transactional producer cannot go on: {0}")]
    Fatal(String),
}

/// Applies one record with this key and JSON body, for the sinks' tests.
#[cfg(test)]
pub(crate) fn apply_one(sink: &mut dyn Sink, key: &str, body: &str) -> WriteOutcome {
    let value: Value = serde_json::from_str(body).expect("test bodies are JSON");
    let key = IdemKey(key.into());
    let write = SinkWrite {
        topic: "t",
        partition: Partition(0),
        offset: Offset(0),
        key: &key,
        body: &value,
        raw: body.as_bytes(),
    };
    sink.apply(&[write]).expect("the test sink is up").remove(0)
}
