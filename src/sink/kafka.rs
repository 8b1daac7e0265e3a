//! The Kafka topic sink: a transactional producer on the input's cluster.
//!
//! Why it is exactly once: a batch's outputs and the batch's consumed
//! offsets are committed in one Kafka transaction. A reader with
//! `isolation.level=read_committed` sees a batch's outputs if and only if
//! the group's offsets moved past the batch. A crash or an abort before the
//! commit leaves neither, and the batch is read and produced again in a new
//! transaction.
//!
//! The dedup records of a batch are written before the commit, together
//! with a journal of the batch (see `DedupStore::commit_in_transaction`).
//! At start-up, once `init_transactions` has finished whatever the previous
//! producer with this transactional id left open, the journal is settled
//! against the group's committed offsets: a batch whose transaction did not
//! commit has its dedup records removed, so that its records count as new
//! when read again.
//!
//! Each output record carries the input's payload bytes unchanged, the
//! idempotency key (or the `key_from` field) as its key, and the headers
//! `idem.key`, `idem.source.topic`, `idem.source.partition` and
//! `idem.source.offset`.
//!
//! Failures:
//! - A record larger than the output topic accepts is dead-lettered as
//!   `too-large`; the batch's other records go on.
//! - A delivery failure aborts the transaction; the batch fails as
//!   unavailable and is retried with backoff.
//! - A commit that fails in a way that needs an abort (the broker timed
//!   the transaction out, a partition leader moved) aborts; the batch is
//!   done again from its first record, which is where the group's
//!   committed offsets stand.
//! - A fatal error (another producer with the same transactional id
//!   fenced this one) stops idem with an error: it never goes on writing
//!   outside a transaction it owns.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header as KafkaHeader, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer as _};
use rdkafka::topic_partition_list::{Offset as KafkaOffset, TopicPartitionList};

use super::{Sink, SinkError, SinkWrite, TransactionError, Transactional, WriteOutcome};
use crate::config::{Config, KafkaSinkConfig};
use crate::dedup::changelog::{block_on_timeout, positions};
use crate::dedup::{ChangelogRecord, Progress};
use crate::delivery::{opaque, send_waiting, Producer};
use crate::fault::{self, Fault, TransactionFault};
use crate::telemetry::logging::LoggedContext;

/// Room left under the topic's `max.message.bytes` for the record batch's
/// own framing, so that a record librdkafka accepts is one the broker
/// accepts too.
const FRAMING_BYTES: usize = 512;

/// Kafka's default `max.message.bytes`, used when the topic's cannot be
/// read.
const DEFAULT_MAX_MESSAGE_BYTES: usize = 1_048_588;

pub struct KafkaSink {
    producer: Producer,
    topic: String,
    key_from: Option<String>,
    /// A transaction is open: `apply` wrote into it, or `commit` began it.
    open: bool,
    /// Set once librdkafka reported a fatal error; nothing more is tried.
    fatal: Option<String>,
    timeout: Duration,
    generation: AtomicUsize,
}

impl KafkaSink {
    /// Checks that the output topic exists, reads its size limit, and
    /// starts the transactional producer; `init_transactions` finishes or
    /// aborts whatever an earlier producer with the same id left open.
    ///
    /// # Errors
    /// [`SinkError::Unavailable`] when the broker cannot be reached;
    /// [`SinkError::NeedsOperator`] when the topic is missing.
    pub fn open(config: &Config, sink: &KafkaSinkConfig) -> Result<Self, SinkError> {
        let timeout = Duration::from_millis(sink.transaction_timeout_ms);
        let max_message_bytes = topic_max_message_bytes(config, &sink.topic)?;
        let mut client = ClientConfig::new();
        for (k, v) in &config.kafka.properties {
            client.set(k, v);
        }
        client
            .set("bootstrap.servers", &config.kafka.bootstrap_servers)
            .set(
                "transactional.id",
                sink.transactional_id(&config.kafka.group_id),
            )
            .set(
                "transaction.timeout.ms",
                sink.transaction_timeout_ms.to_string(),
            )
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set(
                "message.max.bytes",
                max_message_bytes
                    .saturating_sub(FRAMING_BYTES)
                    .clamp(1_000, 1_000_000_000)
                    .to_string(),
            );
        let producer = Producer::create(&client)
            .map_err(|e| SinkError::NeedsOperator(format!("kafka sink: {e}")))?;
        producer
            .init_transactions(timeout)
            .map_err(|e| match transaction_failure(&e) {
                Failure::Fatal(why) => SinkError::NeedsOperator(format!(
                    "kafka sink: cannot start transactions: {why}"
                )),
                _ => SinkError::Unavailable(format!("kafka sink: cannot start transactions: {e}")),
            })?;
        tracing::info!(
            topic = %sink.topic,
            transactional_id = %sink.transactional_id(&config.kafka.group_id),
            max_message_bytes,
            "kafka sink ready"
        );
        Ok(KafkaSink {
            producer,
            topic: sink.topic.clone(),
            key_from: sink.key_from.clone(),
            open: false,
            fatal: None,
            timeout,
            generation: AtomicUsize::new(0),
        })
    }

    fn begin(&mut self) -> Result<(), Failure> {
        if let Some(why) = &self.fatal {
            return Err(Failure::Fatal(why.clone()));
        }
        if !self.open {
            self.producer
                .begin_transaction()
                .map_err(|e| self.note(transaction_failure(&e)))?;
            self.open = true;
        }
        Ok(())
    }

    /// Remembers a fatal failure, so that every later call reports it.
    fn note(&mut self, failure: Failure) -> Failure {
        if let Failure::Fatal(why) = &failure {
            self.fatal = Some(why.clone());
        }
        failure
    }

    /// Produces the records without a verdict yet, in one attempt, and
    /// waits for every delivery report. Records found too large or without
    /// a key get their verdict here.
    fn produce_all(
        &mut self,
        batch: &[SinkWrite<'_>],
        verdicts: &mut [Option<WriteOutcome>],
    ) -> Attempt {
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let too_large = || {
            WriteOutcome::TooLarge(format!(
                "larger than the output topic {} accepts",
                self.topic
            ))
        };
        let mut sent = 0usize;
        for (i, write) in batch.iter().enumerate() {
            if verdicts[i].is_some() {
                continue;
            }
            #[cfg(feature = "failpoints")]
            if i == batch.len() / 2 {
                // Half the batch is delivered inside the open transaction.
                let _ = self.producer.context().wait(generation, sent, self.timeout);
                crate::failpoint::hit("mid-sink-batch");
            }
            let key = match output_key(write, self.key_from.as_deref()) {
                Ok(key) => key,
                Err(why) => {
                    verdicts[i] = Some(WriteOutcome::Rejected(why));
                    continue;
                }
            };
            match self.send(write, &key, opaque(generation, i)) {
                Ok(()) => sent += 1,
                Err(e) if fault::kafka_delivery(&e) == Fault::Record => {
                    verdicts[i] = Some(too_large())
                }
                Err(e) => return Attempt::Failed(Failure::Retry(e.to_string())),
            }
        }
        if sent > 0 {
            if let Err(e) = self.producer.context().wait(generation, sent, self.timeout) {
                return Attempt::Failed(Failure::Retry(format!("outputs: {e}")));
            }
        }
        let mut refused = false;
        for (i, report) in self.producer.context().take(generation) {
            match report {
                Ok(_) => {}
                Err(e) if fault::kafka_delivery(&e) == Fault::Record => {
                    verdicts[i] = Some(too_large());
                    refused = true;
                }
                Err(e) => return Attempt::Failed(transaction_failure(&e)),
            }
        }
        if refused {
            Attempt::Again
        } else {
            Attempt::Done
        }
    }

    fn send(&self, write: &SinkWrite<'_>, key: &[u8], opaque: usize) -> Result<(), KafkaError> {
        let partition = write.partition.0.to_string();
        let offset = write.offset.0.to_string();
        let mut headers = OwnedHeaders::new_with_capacity(4);
        for (key, value) in [
            ("idem.key", write.key.0.as_str()),
            ("idem.source.topic", write.topic),
            ("idem.source.partition", &partition),
            ("idem.source.offset", &offset),
        ] {
            headers = headers.insert(KafkaHeader {
                key,
                value: Some(value),
            });
        }
        let record: BaseRecord<'_, [u8], [u8], usize> =
            BaseRecord::with_opaque_to(&self.topic, opaque)
                .key(key)
                .payload(write.raw)
                .headers(headers);
        send_waiting(&self.producer, record)
    }

    /// Waits for the acknowledgements of the `count` changelog records of
    /// `generation`, so that the commit does not wait for them: rust-rdkafka's
    /// `commit_transaction` flushes first, and its flush polls for 100 ms
    /// whenever a record is still in flight. Records not acknowledged in
    /// time are left to the commit. The producer's thread releases a
    /// report's records just after handing the report over, so the wait
    /// ends with librdkafka counting none in flight.
    fn await_changelog(&self, generation: usize, count: usize) {
        if count == 0
            || self
                .producer
                .context()
                .wait(generation, count, self.timeout)
                .is_err()
        {
            return;
        }
        let deadline = Instant::now() + Duration::from_millis(100);
        while self.producer.in_flight_count() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    fn abort_open(&mut self) {
        if !self.open {
            return;
        }
        self.open = false;
        if let Err(e) = self.producer.abort_transaction(self.timeout) {
            // librdkafka would want the same call again until it ends;
            // rather than guess, this producer is done: idem stops with an
            // error, and its next start's init_transactions aborts the
            // transaction and settles the journal.
            tracing::error!(error = %e, "kafka sink: abort failed; stopping");
            self.fatal = Some(format!("abort failed: {e}"));
        }
        self.producer.context().clear();
    }
}

/// One try at producing a batch.
enum Attempt {
    /// Every record without a verdict was delivered.
    Done,
    /// The broker refused some as too large: abort, and produce the rest
    /// again.
    Again,
    Failed(Failure),
}

/// How a transactional failure is handled, with its text.
#[derive(Debug)]
enum Failure {
    /// Abort the transaction and do the batch again.
    Abort(String),
    /// Try the same call again.
    Retry(String),
    /// This producer is finished.
    Fatal(String),
}

/// [`fault::kafka_transaction`]'s verdict, with the error's text.
fn transaction_failure(e: &KafkaError) -> Failure {
    match fault::kafka_transaction(e) {
        TransactionFault::Fatal => Failure::Fatal(e.to_string()),
        TransactionFault::Abort => Failure::Abort(e.to_string()),
        TransactionFault::Retry => Failure::Retry(e.to_string()),
    }
}

/// The output record's key: the `key_from` field (a string as its text,
/// anything else as its JSON), or the idempotency key.
fn output_key(write: &SinkWrite<'_>, key_from: Option<&str>) -> Result<Vec<u8>, String> {
    let Some(pointer) = key_from else {
        return Ok(write.key.0.as_bytes().to_vec());
    };
    match write.body.pointer(pointer) {
        Some(serde_json::Value::String(s)) => Ok(s.as_bytes().to_vec()),
        Some(serde_json::Value::Null) | None => Err(format!(
            "sink.key_from {pointer} is missing or null in this record"
        )),
        Some(other) => Ok(other.to_string().into_bytes()),
    }
}

/// The output topic's `max.message.bytes`, which also proves it exists.
fn topic_max_message_bytes(config: &Config, topic: &str) -> Result<usize, SinkError> {
    let mut client = ClientConfig::new();
    for (k, v) in &config.kafka.properties {
        client.set(k, v);
    }
    client.set("bootstrap.servers", &config.kafka.bootstrap_servers);
    let admin: AdminClient<LoggedContext> = client
        .create_with_context(LoggedContext)
        .map_err(|e| SinkError::NeedsOperator(format!("kafka sink: {e}")))?;
    let timeout = Duration::from_secs(10);
    let metadata = admin
        .inner()
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| SinkError::Unavailable(format!("kafka sink: cannot read metadata: {e}")))?;
    let exists = metadata
        .topics()
        .iter()
        .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty());
    if !exists {
        return Err(SinkError::NeedsOperator(format!(
            "kafka sink: the output topic {topic} does not exist; create it (sink.topic)"
        )));
    }
    let options = AdminOptions::new().request_timeout(Some(timeout));
    let described = block_on_timeout(
        admin.describe_configs([&ResourceSpecifier::Topic(topic)], &options),
        timeout,
    );
    let limit = described
        .and_then(Result::ok)
        .and_then(|mut results| results.pop())
        .and_then(Result::ok)
        .and_then(|resource| {
            resource
                .get("max.message.bytes")
                .and_then(|e| e.value.as_deref()?.parse::<usize>().ok())
        });
    Ok(limit.unwrap_or_else(|| {
        tracing::warn!(
            topic,
            "kafka sink: cannot read the topic's max.message.bytes; assuming Kafka's default"
        );
        DEFAULT_MAX_MESSAGE_BYTES
    }))
}

impl Sink for KafkaSink {
    fn name(&self) -> &'static str {
        "kafka"
    }

    fn apply(&mut self, batch: &[SinkWrite<'_>]) -> Result<Vec<WriteOutcome>, SinkError> {
        let mut verdicts: Vec<Option<WriteOutcome>> = vec![None; batch.len()];
        loop {
            self.begin().map_err(into_sink_error)?;
            match self.produce_all(batch, &mut verdicts) {
                Attempt::Done => {
                    return Ok(verdicts
                        .into_iter()
                        .map(|v| v.unwrap_or(WriteOutcome::Applied))
                        .collect())
                }
                // A transaction with a refused record in it cannot commit:
                // start over without the refused ones.
                Attempt::Again => self.abort_open(),
                Attempt::Failed(failure) => {
                    let failure = self.note(failure);
                    self.abort_open();
                    // An abort that failed leaves this producer done.
                    if let Some(why) = &self.fatal {
                        return Err(SinkError::Fatal(format!("kafka sink: {why}")));
                    }
                    return Err(into_sink_error(failure));
                }
            }
        }
    }

    fn transactional(&mut self) -> Option<&mut dyn Transactional> {
        Some(self)
    }
}

fn into_sink_error(failure: Failure) -> SinkError {
    match failure {
        Failure::Fatal(why) => SinkError::Fatal(format!("kafka sink: {why}")),
        Failure::Abort(why) | Failure::Retry(why) => {
            SinkError::Unavailable(format!("kafka sink: {why}"))
        }
    }
}

impl Transactional for KafkaSink {
    fn commit(
        &mut self,
        offsets: &[Progress],
        group: &ConsumerGroupMetadata,
        changelog: &[ChangelogRecord],
    ) -> Result<Vec<Progress>, TransactionError> {
        let fail = |sink: &mut KafkaSink, failure: Failure| -> TransactionError {
            match sink.note(failure) {
                Failure::Fatal(why) => TransactionError::Fatal(why),
                Failure::Abort(why) | Failure::Retry(why) => {
                    sink.abort_open();
                    TransactionError::Aborted(why)
                }
            }
        };
        if let Err(failure) = self.begin() {
            return Err(fail(self, failure));
        }
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        for (i, r) in changelog.iter().enumerate() {
            if let Err(e) = r.send(&self.producer, opaque(generation, i)) {
                return Err(fail(self, Failure::Abort(format!("dedup changelog: {e}"))));
            }
        }
        let mut tpl = TopicPartitionList::with_capacity(offsets.len());
        for p in offsets {
            if let Err(e) =
                tpl.add_partition_offset(&p.topic, p.partition.0, KafkaOffset::Offset(p.next.0))
            {
                return Err(fail(self, Failure::Abort(e.to_string())));
            }
        }
        if let Err(e) = self
            .producer
            .send_offsets_to_transaction(&tpl, group, self.timeout)
        {
            let failure = transaction_failure(&e);
            return Err(fail(self, failure));
        }
        self.await_changelog(generation, changelog.len());
        crate::failpoint::hit("before-transaction-commit");
        // A commit that timed out may be called again; it then finishes
        // the same transaction.
        let mut tries = 0;
        loop {
            match self.producer.commit_transaction(self.timeout) {
                Ok(()) => {
                    self.open = false;
                    // Committed: every changelog record was delivered.
                    let reports = self.producer.context().take(generation);
                    return Ok(positions(changelog, reports)
                        .unwrap_or_default()
                        .into_iter()
                        .map(|w| w.after)
                        .collect());
                }
                Err(e) => match transaction_failure(&e) {
                    Failure::Retry(why) if tries < 5 => {
                        tries += 1;
                        tracing::warn!(error = %why, "kafka sink: commit not finished; calling it again");
                    }
                    // Still not finished: stop rather than leave a
                    // transaction half-ended (see abort_open).
                    Failure::Retry(why) => {
                        let why = format!("commit did not finish after {tries} retries: {why}");
                        self.fatal = Some(why.clone());
                        return Err(TransactionError::Fatal(why));
                    }
                    failure => return Err(fail(self, failure)),
                },
            }
        }
    }

    fn abort(&mut self) {
        self.abort_open();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{IdemKey, Offset, Partition};

    fn write<'a>(key: &'a IdemKey, body: &'a serde_json::Value) -> SinkWrite<'a> {
        SinkWrite {
            topic: "in",
            partition: Partition(0),
            offset: Offset(7),
            key,
            body,
            raw: b"{}",
        }
    }

    #[test]
    fn output_key_is_the_idempotency_key_or_the_named_field() {
        let key = IdemKey("k-1".into());
        let body = serde_json::json!({"id": "order-9", "n": 42, "nothing": null});
        assert_eq!(output_key(&write(&key, &body), None).unwrap(), b"k-1");
        assert_eq!(
            output_key(&write(&key, &body), Some("/id")).unwrap(),
            b"order-9"
        );
        assert_eq!(output_key(&write(&key, &body), Some("/n")).unwrap(), b"42");
        let missing = output_key(&write(&key, &body), Some("/nothing")).unwrap_err();
        assert!(missing.contains("/nothing"), "{missing}");
        assert!(output_key(&write(&key, &body), Some("/absent")).is_err());
    }
}
