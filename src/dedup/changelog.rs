//! The dedup changelog: a compacted Kafka topic per input topic, with the
//! input's partition count, that holds every dedup record of the group.
//!
//! Record key: the idempotency key; value: the encoded [`Entry`], or none
//! (a tombstone) once the key left the window; partition: the input
//! partition the key belongs to. Compaction keeps the latest record per
//! key, so the topic holds the group's whole window and no more.
//!
//! Why it exists: a partition's dedup state lives in the RocksDB of the
//! instance that processes it. When the group moves the partition to
//! another instance, that instance first reads the partition's changelog
//! from where its own store left off (see [`DedupStore::restore`] below),
//! so a duplicate arriving after the move is still caught.
//!
//! Order on the write path: a batch's dedup records are in the changelog,
//! acknowledged, before the offsets they cover are committed (with the
//! Kafka sink, inside the same transaction). The local store records how
//! far it knows each partition's changelog, so that a restore reads only
//! what it lacks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, Producer as _};
use rdkafka::topic_partition_list::{Offset as KafkaOffset, TopicPartitionList};
use rocksdb::{IteratorMode, WriteBatch};

use super::{
    partition_prefix, DedupKey, DedupStore, Entry, Progress, StoreError, CF_CHANGELOG, CF_DEDUP,
};
use crate::config::Config;
use crate::delivery::{opaque, send_waiting, Producer};
use crate::record::{Offset, Partition};
use crate::telemetry::logging::LoggedContext;

/// One changelog record: a dedup entry, or a tombstone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangelogRecord {
    /// The changelog topic.
    pub topic: String,
    /// The input topic whose state this is.
    pub input: String,
    pub partition: Partition,
    /// The idempotency key's bytes.
    pub key: Vec<u8>,
    pub entry: Option<Entry>,
}

impl ChangelogRecord {
    /// Produces the record through `producer` (its partition is the input
    /// partition; a tombstone has no value), waiting while the queue is
    /// full. Delivery is reported under `opaque`.
    ///
    /// # Errors
    /// librdkafka refused the record.
    pub fn send(&self, producer: &Producer, opaque: usize) -> Result<(), KafkaError> {
        let value = self.entry.map(|e| e.encode());
        let mut record: BaseRecord<'_, [u8], [u8], usize> =
            BaseRecord::with_opaque_to(&self.topic, opaque)
                .key(&self.key[..])
                .partition(self.partition.0);
        if let Some(value) = &value {
            record = record.payload(&value[..]);
        }
        send_waiting(producer, record)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ChangelogError {
    /// The broker could not be asked, or did not acknowledge in time.
    #[error("dedup changelog: {0}")]
    Unavailable(String),
    /// The topic exists but cannot serve as the changelog.
    #[error("dedup changelog: {0}")]
    Misconfigured(String),
}

/// The changelog topic of an input topic for a group:
/// `<group>.<topic>.dedup-changelog.<hash>`, where characters Kafka does
/// not allow become `_`, long names are cut, and the hash of the exact
/// group and topic keeps two pairs that read alike (`a.b` + `c`, `a` +
/// `b.c`) apart.
pub fn topic_name(group: &str, input: &str) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                    c
                } else {
                    '_'
                }
            })
            .take(100)
            .collect()
    };
    let mut exact = Vec::with_capacity(group.len() + input.len() + 1);
    exact.extend_from_slice(group.as_bytes());
    exact.push(0);
    exact.extend_from_slice(input.as_bytes());
    let hash = xxhash_rust::xxh3::xxh3_64(&exact) as u32;
    format!(
        "{}.{}.dedup-changelog.{hash:08x}",
        clean(group),
        clean(input)
    )
}

/// Records produced by [`Changelog::start`], not yet acknowledged.
#[derive(Debug)]
#[must_use = "wait for the acknowledgements with Changelog::acknowledged"]
pub struct Sent(usize);

/// Writes to the changelog topics and reads them back.
pub struct Changelog {
    producer: Producer,
    /// Input topic -> changelog topic.
    topics: HashMap<String, String>,
    client: ClientConfig,
    session_timeout_ms: u64,
    timeout: Duration,
    generation: AtomicUsize,
}

impl Changelog {
    /// Creates each input topic's changelog topic if missing (compacted,
    /// with the input's partition count and the broker's default
    /// replication), or checks it if present.
    ///
    /// # Errors
    /// [`ChangelogError::Misconfigured`] for a topic with the wrong
    /// partition count or cleanup policy; `Unavailable` when the broker
    /// cannot be asked.
    pub fn open(config: &Config) -> Result<Changelog, ChangelogError> {
        let mut client = ClientConfig::new();
        for (k, v) in &config.kafka.properties {
            client.set(k, v);
        }
        client.set("bootstrap.servers", &config.kafka.bootstrap_servers);
        let timeout = Duration::from_millis(config.dead_letter.timeout_ms.max(1_000));
        let topics: HashMap<String, String> = config
            .topic_names()
            .into_iter()
            .map(|t| (t.to_string(), topic_name(&config.kafka.group_id, t)))
            .collect();
        let admin: AdminClient<LoggedContext> = client
            .create_with_context(LoggedContext)
            .map_err(|e| ChangelogError::Misconfigured(e.to_string()))?;
        // Metadata through a consumer that is polled, so that librdkafka's
        // queued log lines and errors (a failed SASL login, say) reach the
        // log; an admin client's are never served.
        let metadata: BaseConsumer<LoggedContext> = client
            .clone()
            .set("group.id", "idem-changelog-setup")
            .set(
                "session.timeout.ms",
                config.kafka.session_timeout_ms.to_string(),
            )
            .create_with_context(LoggedContext)
            .map_err(|e| ChangelogError::Misconfigured(e.to_string()))?;
        for (input, changelog) in &topics {
            let checked = ensure_topic(&admin, &metadata, input, changelog);
            if checked.is_err() {
                let _ = metadata.poll(Duration::from_millis(100));
            }
            checked?;
        }
        let producer = Producer::create(
            client
                .clone()
                .set("acks", "all")
                .set("enable.idempotence", "true")
                .set("linger.ms", "2")
                .set("message.timeout.ms", timeout.as_millis().to_string()),
        )
        .map_err(|e| ChangelogError::Misconfigured(e.to_string()))?;
        Ok(Changelog {
            producer,
            topics,
            client,
            session_timeout_ms: config.kafka.session_timeout_ms,
            timeout,
            generation: AtomicUsize::new(0),
        })
    }

    /// The records that carry these dedup entries (or, with `None`,
    /// tombstones) to the changelog.
    pub fn records<'a>(
        &self,
        entries: impl IntoIterator<Item = (&'a DedupKey, Option<Entry>)>,
    ) -> Vec<ChangelogRecord> {
        entries
            .into_iter()
            .filter_map(|(key, entry)| {
                let (input, partition, rest) = super::split_key(&key.0)?;
                Some(ChangelogRecord {
                    topic: self.topics.get(&input)?.clone(),
                    input,
                    partition,
                    key: rest.to_vec(),
                    entry,
                })
            })
            .collect()
    }

    /// Produces the records and waits for every acknowledgement.
    ///
    /// Returns, per input partition, the changelog offsets of the first
    /// record written and after the last.
    ///
    /// # Errors
    /// Any record not acknowledged within the timeout; the caller sends
    /// them all again (a changelog record written twice is harmless).
    pub fn send(&self, records: &[ChangelogRecord]) -> Result<Vec<Written>, ChangelogError> {
        let sent = self.start(records)?;
        self.acknowledged(records, sent)
    }

    /// Produces the records without waiting for their acknowledgements,
    /// so that the caller can do other work meanwhile; then
    /// [`Changelog::acknowledged`] waits for them.
    ///
    /// # Errors
    /// librdkafka refused a record.
    pub fn start(&self, records: &[ChangelogRecord]) -> Result<Sent, ChangelogError> {
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        for (i, r) in records.iter().enumerate() {
            r.send(&self.producer, opaque(generation, i))
                .map_err(|e| ChangelogError::Unavailable(e.to_string()))?;
        }
        Ok(Sent(generation))
    }

    /// Waits for the acknowledgements of records produced by
    /// [`Changelog::start`]; returns what [`Changelog::send`] returns.
    ///
    /// # Errors
    /// Any record not acknowledged within the timeout.
    pub fn acknowledged(
        &self,
        records: &[ChangelogRecord],
        sent: Sent,
    ) -> Result<Vec<Written>, ChangelogError> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        self.producer
            .context()
            // A second past librdkafka's own delivery timeout, so that its
            // reports, which say why, come in first.
            .wait(sent.0, records.len(), self.timeout + Duration::from_secs(1))
            .map_err(|e| ChangelogError::Unavailable(e.to_string()))?;
        positions(records, self.producer.context().take(sent.0))
            .map_err(ChangelogError::Unavailable)
    }

    /// Reads one partition's changelog from where `store` left off up to
    /// its end into `store`, calling `progress` with the records left now
    /// and then. Returns the records read.
    ///
    /// # Errors
    /// The broker could not be read, or the store failed.
    pub fn restore(
        &self,
        store: &DedupStore,
        input: &str,
        partition: Partition,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<u64, ChangelogError> {
        let Some(topic) = self.topics.get(input) else {
            return Ok(0);
        };
        let unavailable = |e: KafkaError| ChangelogError::Unavailable(e.to_string());
        let consumer: BaseConsumer<LoggedContext> = self
            .client
            .clone()
            .set("group.id", format!("{topic}.restore"))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", "read_committed")
            .set("session.timeout.ms", self.session_timeout_ms.to_string())
            .create_with_context(LoggedContext)
            .map_err(unavailable)?;
        let (low, high) = consumer
            .fetch_watermarks(topic, partition.0, self.timeout)
            .map_err(unavailable)?;
        let known = store
            .changelog_position(input, partition)
            .map_err(|e| ChangelogError::Unavailable(e.to_string()))?;
        let from = known.map_or(low, |o| o.0.clamp(low, high));
        if from >= high {
            // Nothing to read; the position still says where the
            // partition ends, so that this store's next write follows it.
            if known != Some(Offset(high)) {
                store
                    .apply_restored(input, partition, &[], Offset(high), true)
                    .map_err(|e| ChangelogError::Unavailable(e.to_string()))?;
            }
            return Ok(0);
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition.0, KafkaOffset::Offset(from))
            .map_err(unavailable)?;
        consumer.assign(&tpl).map_err(unavailable)?;

        let mut read = 0u64;
        let mut pending: Vec<(Vec<u8>, Option<Entry>)> = Vec::new();
        let mut next = from;
        let mut last_report = Instant::now();
        let deadline_idle = Duration::from_secs(30);
        let mut last_record = Instant::now();
        loop {
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => {
                    last_record = Instant::now();
                    let entry = m.payload().and_then(Entry::decode);
                    if let Some(key) = m.key() {
                        pending.push((key.to_vec(), entry));
                    }
                    next = m.offset() + 1;
                    read += 1;
                }
                Some(Err(KafkaError::PartitionEOF(_))) => break,
                Some(Err(e)) => return Err(unavailable(e)),
                None if last_record.elapsed() > deadline_idle => {
                    return Err(ChangelogError::Unavailable(format!(
                        "{topic}/{partition}: no record for {} s before its end at {high}",
                        deadline_idle.as_secs()
                    )))
                }
                None => {}
            }
            if pending.len() >= 10_000 {
                store
                    .apply_restored(input, partition, &pending, Offset(next), false)
                    .map_err(|e| ChangelogError::Unavailable(e.to_string()))?;
                pending.clear();
            }
            if last_report.elapsed() >= Duration::from_secs(1) {
                progress(read, high.saturating_sub(next).max(0) as u64);
                last_report = Instant::now();
            }
        }
        store
            .apply_restored(input, partition, &pending, Offset(next.max(high)), true)
            .map_err(|e| ChangelogError::Unavailable(e.to_string()))?;
        progress(read, 0);
        Ok(read)
    }
}

/// Where one send's records landed in the changelog partition of one
/// input partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// The input partition, and the changelog offset after the send's
    /// last record there.
    pub after: Progress,
    /// The changelog offset of the send's first record there.
    pub first: Offset,
    /// How many of the send's records went there: `after.next - first`
    /// unless another writer's records lie between them.
    pub count: i64,
}

impl Written {
    /// Whether the write directly follows `known`, a store's position in
    /// this changelog partition, with no other writer's record before or
    /// among its own: only then may the store's position move past it.
    pub fn follows(&self, known: Option<Offset>) -> bool {
        known == Some(self.first) && self.after.next.0 - self.first.0 == self.count
    }
}

/// Where the records went, per input partition, from the delivery
/// reports of `records`.
///
/// # Errors
/// The first record not acknowledged.
pub(crate) fn positions(
    records: &[ChangelogRecord],
    reports: Vec<(usize, Result<i64, KafkaError>)>,
) -> Result<Vec<Written>, String> {
    let mut acked = vec![None; records.len()];
    for (i, report) in reports {
        if let Some(slot) = acked.get_mut(i) {
            *slot = Some(report);
        }
    }
    let mut span: HashMap<(&str, Partition), (i64, i64, i64)> = HashMap::new();
    for (r, report) in records.iter().zip(acked) {
        match report {
            Some(Ok(offset)) => {
                let (first, next, count) =
                    span.entry((&r.input, r.partition))
                        .or_insert((offset, offset + 1, 0));
                *first = (*first).min(offset);
                *next = (*next).max(offset + 1);
                *count += 1;
            }
            Some(Err(e)) => return Err(format!("{}/{}: {e}", r.topic, r.partition)),
            None => return Err(format!("{}/{}: not acknowledged", r.topic, r.partition)),
        }
    }
    Ok(span
        .into_iter()
        .map(|((input, partition), (first, next, count))| Written {
            after: Progress {
                topic: input.to_string(),
                partition,
                next: Offset(next),
            },
            first: Offset(first),
            count,
        })
        .collect())
}

fn ensure_topic(
    admin: &AdminClient<LoggedContext>,
    metadata: &BaseConsumer<LoggedContext>,
    input: &str,
    changelog: &str,
) -> Result<(), ChangelogError> {
    let timeout = Duration::from_secs(10);
    let unavailable = |e: KafkaError| ChangelogError::Unavailable(e.to_string());
    let partitions = |name: &str| -> Result<Option<usize>, ChangelogError> {
        let metadata = metadata
            .fetch_metadata(Some(name), timeout)
            .map_err(unavailable)?;
        Ok(metadata
            .topics()
            .iter()
            .find(|t| t.name() == name && t.error().is_none() && !t.partitions().is_empty())
            .map(|t| t.partitions().len()))
    };
    let Some(wanted) = partitions(input)? else {
        return Err(ChangelogError::Unavailable(format!(
            "input topic {input} does not exist (yet); its changelog needs its partition count"
        )));
    };
    let options = AdminOptions::new().request_timeout(Some(timeout));
    match partitions(changelog)? {
        None => {
            let topic = NewTopic::new(changelog, wanted as i32, TopicReplication::Fixed(-1))
                .set("cleanup.policy", "compact");
            let created = block_on_timeout(admin.create_topics([&topic], &options), timeout)
                .ok_or_else(|| {
                    ChangelogError::Unavailable(format!("creating {changelog} timed out"))
                })?
                .map_err(unavailable)?;
            for result in created {
                match result {
                    Ok(_) => tracing::info!(topic = changelog, partitions = wanted, "created the dedup changelog topic"),
                    Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
                    Err((_, e)) => {
                        return Err(ChangelogError::Misconfigured(format!(
                            "cannot create {changelog}: {e}; create it compacted with {wanted} partitions"
                        )))
                    }
                }
            }
            Ok(())
        }
        Some(n) if n != wanted => Err(ChangelogError::Misconfigured(format!(
            "{changelog} has {n} partitions but {input} has {wanted}; the changelog must have \
             the input's partition count: delete it so that idem creates it again \
             (the dedup state it holds is lost; each instance keeps its local store)"
        ))),
        Some(_) => {
            // A broker answers in milliseconds; the embedded mock cluster
            // never does, hence the short wait.
            let described = block_on_timeout(
                admin.describe_configs([&ResourceSpecifier::Topic(changelog)], &options),
                Duration::from_secs(3),
            );
            let Some(Ok(described)) = described else {
                tracing::warn!(
                    topic = changelog,
                    "cannot read the changelog topic's cleanup.policy; make sure it is compact"
                );
                return Ok(());
            };
            let policy = described
                .into_iter()
                .next()
                .and_then(Result::ok)
                .and_then(|r| r.get("cleanup.policy").and_then(|e| e.value.clone()))
                .unwrap_or_default();
            // compact,delete would drop dedup records by age, inside the
            // window.
            if policy.trim() == "compact" {
                Ok(())
            } else {
                Err(ChangelogError::Misconfigured(format!(
                    "{changelog} has cleanup.policy={policy}; it must be exactly compact (delete \
                     would drop dedup records inside the window; without compact it grows for \
                     ever): set cleanup.policy=compact on it"
                )))
            }
        }
    }
}

/// Waits for an admin request at most `limit` (librdkafka's own request
/// timeout is not honoured by every broker, the embedded mock included).
pub(crate) fn block_on_timeout<F: std::future::Future>(
    future: F,
    limit: Duration,
) -> Option<F::Output> {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .ok()?
        .block_on(async move { tokio::time::timeout(limit, future).await })
        .ok()
}

impl DedupStore {
    /// How far this store holds a partition's changelog: the next
    /// changelog offset it has not applied.
    ///
    /// # Errors
    /// A RocksDB read error.
    pub fn changelog_position(
        &self,
        topic: &str,
        partition: Partition,
    ) -> Result<Option<Offset>, StoreError> {
        self.stored_offset(CF_CHANGELOG, topic, partition)
    }

    /// Applies changelog records read back from Kafka (entries put,
    /// tombstones deleted) and records the new position, in one write.
    ///
    /// # Errors
    /// A RocksDB write error.
    pub fn apply_restored(
        &self,
        topic: &str,
        partition: Partition,
        records: &[(Vec<u8>, Option<Entry>)],
        position: Offset,
        sync: bool,
    ) -> Result<(), StoreError> {
        let dedup = self.cf(CF_DEDUP);
        let prefix = partition_prefix(topic, partition);
        let mut batch = WriteBatch::default();
        for (key, entry) in records {
            let mut k = prefix.clone();
            k.extend_from_slice(key);
            match entry {
                Some(e) => batch.put_cf(&dedup, k, e.encode()),
                None => batch.delete_cf(&dedup, k),
            }
        }
        batch.put_cf(&self.cf(CF_CHANGELOG), prefix, position.0.to_be_bytes());
        if sync {
            self.write_synced(batch)
        } else {
            self.db.write(batch)?;
            Ok(())
        }
    }

    /// The keys of one partition past the window.
    ///
    /// # Errors
    /// A RocksDB read error.
    pub fn expired_keys(
        &self,
        topic: &str,
        partition: Partition,
    ) -> Result<Vec<DedupKey>, StoreError> {
        let now = self.now_ms();
        let prefix = partition_prefix(topic, partition);
        let mut out = Vec::new();
        let iter = self.db.iterator_cf(
            &self.cf(CF_DEDUP),
            IteratorMode::From(&prefix, rocksdb::Direction::Forward),
        );
        for item in iter {
            let (key, value) = item?;
            if !key.starts_with(&prefix) {
                break;
            }
            if Entry::decode(&value).is_some_and(|e| e.is_expired(now, self.window)) {
                out.push(DedupKey(key.to_vec()));
            }
        }
        Ok(out)
    }

    /// Deletes these keys, synced (after their tombstones are in the
    /// changelog).
    ///
    /// # Errors
    /// A RocksDB write error.
    pub fn remove(&self, keys: &[DedupKey]) -> Result<(), StoreError> {
        let dedup = self.cf(CF_DEDUP);
        let mut batch = WriteBatch::default();
        for key in keys {
            batch.delete_cf(&dedup, &key.0);
        }
        self.write_synced(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names_keep_to_kafkas_characters() {
        let name = topic_name("orders-idem", "orders.v1");
        assert!(
            name.starts_with("orders-idem.orders.v1.dedup-changelog."),
            "{name}"
        );
        assert!(topic_name("g/1 x", "t").starts_with("g_1_x.t.dedup-changelog."));
        // Pairs that read alike get topics of their own.
        assert_ne!(topic_name("e13.p", "q"), topic_name("e13", "p.q"));
        assert_ne!(topic_name("g/1", "t"), topic_name("g_1", "t"));
        assert!(topic_name(&"g".repeat(300), &"t".repeat(300)).len() <= 249);
    }

    fn record(input: &str, partition: i32) -> ChangelogRecord {
        ChangelogRecord {
            topic: format!("{input}.cl"),
            input: input.into(),
            partition: Partition(partition),
            key: b"k".to_vec(),
            entry: None,
        }
    }

    #[test]
    fn a_write_follows_a_position_only_when_nothing_else_is_before_or_among_it() {
        let written = |first, next, count| Written {
            after: Progress {
                topic: "t".into(),
                partition: Partition(0),
                next: Offset(next),
            },
            first: Offset(first),
            count,
        };
        assert!(written(20, 25, 5).follows(Some(Offset(20))));
        // Another writer's record at 20, before this write.
        assert!(!written(21, 26, 5).follows(Some(Offset(20))));
        // Another writer's record among this write's, at 22 say.
        assert!(!written(20, 26, 5).follows(Some(Offset(20))));
        // A store that never recorded a position.
        assert!(!written(0, 5, 5).follows(None));
    }

    #[test]
    fn positions_span_the_acknowledged_offsets() {
        let records = [record("a", 0), record("a", 0), record("a", 1)];
        let mut got = positions(&records, vec![(0, Ok(9)), (1, Ok(7)), (2, Ok(3))]).unwrap();
        got.sort_by_key(|w| w.after.partition);
        assert_eq!(
            got.iter()
                .map(|w| (w.after.partition.0, w.first.0, w.after.next.0, w.count))
                .collect::<Vec<_>>(),
            vec![(0, 7, 10, 2), (1, 3, 4, 1)]
        );
        let missing = positions(&records, vec![(0, Ok(7)), (2, Ok(3))]).unwrap_err();
        assert!(missing.contains("not acknowledged"), "{missing}");
    }
}
