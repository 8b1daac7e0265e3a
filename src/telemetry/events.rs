//! Things that happen, each logged once with structured fields and counted
//! in its metric in the same place, so that logs and metrics never
//! disagree.
//!
//! Levels: error means data is at risk or an operator must act; warn means
//! degraded but healing by itself; info is lifecycle; debug is per batch.

use std::time::Duration;

use tracing::{debug, error, info, warn};

use super::Metrics;
use crate::decode::DeadLetterReason;
use crate::sink::SinkError;

pub enum Event<'a> {
    /// A batch went through every step, offsets included.
    BatchCommitted {
        records: usize,
        elapsed: Duration,
        ranges: &'a str,
    },
    /// The sink failed a batch; it is retried after `backoff`.
    SinkWriteFailed {
        sink: &'static str,
        error: &'a SinkError,
        attempt: u32,
        backoff: Duration,
    },
    /// A record was written to the dead-letter topic.
    RecordDeadLettered {
        reason: DeadLetterReason,
        topic: &'a str,
        partition: i32,
        offset: i64,
        detail: &'a str,
    },
    /// The dead-letter topic did not take a batch; the offset waits.
    DeadLetterWriteFailed {
        error: &'a str,
        attempt: u32,
        backoff: Duration,
    },
    /// Kafka refused an offset commit. The records are durable in the sink
    /// and the dedup store, so a re-read counts them as duplicates.
    OffsetCommitFailed {
        error: &'a str,
    },
    PartitionsAssigned {
        partitions: &'a str,
        count: usize,
    },
    PartitionsRevoked {
        partitions: &'a str,
        count: usize,
    },
}

impl Event<'_> {
    pub fn emit(self, metrics: &Metrics) {
        match self {
            Event::BatchCommitted {
                records,
                elapsed,
                ranges,
            } => {
                metrics.batch_records.observe(records as f64);
                metrics.batch_seconds.observe(elapsed.as_secs_f64());
                debug!(
                    records,
                    elapsed_ms = elapsed.as_millis() as u64,
                    ranges,
                    "batch committed"
                );
            }
            Event::SinkWriteFailed {
                sink,
                error,
                attempt,
                backoff,
            } => {
                metrics
                    .sink_retries
                    .with_label_values(&[sink, error.cause()])
                    .inc();
                let backoff_ms = backoff.as_millis() as u64;
                match error {
                    SinkError::Unavailable(_) => {
                        warn!(%error, attempt, backoff_ms, "sink write failed; retrying")
                    }
                    SinkError::NeedsOperator(_) | SinkError::Fatal(_) => error!(
                        %error, attempt, backoff_ms,
                        "sink write failed and will not heal by itself; fix the sink, \
                         idem keeps retrying and commits nothing meanwhile"
                    ),
                }
            }
            Event::RecordDeadLettered {
                reason,
                topic,
                partition,
                offset,
                detail,
            } => {
                metrics
                    .dead_letters
                    .with_label_values(&[reason.as_str()])
                    .inc();
                debug!(
                    reason = reason.as_str(),
                    topic, partition, offset, detail, "record dead-lettered"
                );
            }
            Event::DeadLetterWriteFailed {
                error,
                attempt,
                backoff,
            } => {
                metrics.dead_letter_failures.inc();
                error!(
                    error,
                    attempt,
                    backoff_ms = backoff.as_millis() as u64,
                    "dead-letter write failed; the offset will not advance until it succeeds"
                );
            }
            Event::OffsetCommitFailed { error } => {
                metrics.commit_failures.inc();
                warn!(
                    error,
                    "offset commit failed; records will be re-read as duplicates"
                );
            }
            Event::PartitionsAssigned { partitions, count } => {
                metrics.rebalances.with_label_values(&["assign"]).inc();
                metrics.assigned_partitions.add(count as i64);
                info!(partitions, "partitions assigned");
            }
            Event::PartitionsRevoked { partitions, count } => {
                metrics.rebalances.with_label_values(&["revoke"]).inc();
                metrics.assigned_partitions.sub(count as i64);
                info!(partitions, "partitions revoked");
            }
        }
    }
}
