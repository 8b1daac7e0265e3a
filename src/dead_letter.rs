//! The dead-letter topic: where records that can never succeed go, with
//! their original key, value and headers, plus headers that say where they
//! came from and why.
//!
//! Headers added: `idem.source.topic`, `idem.source.partition`,
//! `idem.source.offset`, `idem.reason` (one of the fixed reasons) and
//! `idem.error` (a human-readable detail).
//!
//! A batch of dead letters is acknowledged by the broker (acks=all,
//! idempotent producer) before the offsets they cover are committed. If
//! the broker does not take them, the caller retries and the offset stays
//! where it is. The one exception is a record too large for the topic: it
//! is sent again without its value and with `idem.value-omitted`, since it
//! could never be stored and must not hold its partition for ever.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header as KafkaHeader, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer as _};

use crate::config::Config;
use crate::decode::DeadLetterReason;
use crate::delivery::{opaque, send_waiting, Producer, Unacknowledged};
use crate::fault::{self, Fault};
use crate::record::Record;

/// One record on its way to the dead-letter topic.
#[derive(Debug, Clone, Copy)]
pub struct DeadLetter<'a> {
    pub record: &'a Record,
    pub reason: DeadLetterReason,
    pub detail: &'a str,
}

#[derive(Debug, thiserror::Error)]
#[error("dead-letter topic {topic}: {message}")]
pub struct DeadLetterError {
    pub topic: String,
    pub message: String,
    /// Indexes of the letters that were not acknowledged; only these are
    /// sent again, so that a retry does not write the others twice.
    pub undelivered: Vec<usize>,
}

/// A letter sent without its value also leaves out a record key and
/// headers larger than this together.
const OMIT_KEY_AND_HEADERS_OVER: usize = 256 << 10;

pub struct DeadLetterProducer {
    producer: Producer,
    topic: String,
    timeout: Duration,
    generation: AtomicUsize,
}

impl DeadLetterProducer {
    /// Creates the producer. It connects lazily; a missing topic shows up
    /// as a failed [`DeadLetterProducer::send`].
    ///
    /// # Errors
    /// librdkafka refused the configuration.
    pub fn new(config: &Config) -> Result<Self, KafkaError> {
        let mut client = ClientConfig::new();
        for (k, v) in &config.kafka.properties {
            client.set(k, v);
        }
        let timeout_ms = config.dead_letter.timeout_ms.max(1);
        client
            .set("bootstrap.servers", &config.kafka.bootstrap_servers)
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            // Large enough for any record idem reads (plus headers), so that
            // the topic's own limit is the one that decides.
            .set(
                "message.max.bytes",
                (config.limits.max_record_bytes.max(1_000_000) + (1 << 20))
                    .min(1_000_000_000)
                    .to_string(),
            )
            .set("message.timeout.ms", timeout_ms.to_string())
            // A topic that does not exist should fail fast, not wait out
            // the whole delivery timeout.
            .set(
                "topic.metadata.propagation.max.ms",
                timeout_ms.min(5_000).to_string(),
            );
        let producer = Producer::create(&client)?;
        Ok(DeadLetterProducer {
            producer,
            topic: config.dead_letter.topic.clone(),
            timeout: Duration::from_millis(timeout_ms),
            generation: AtomicUsize::new(0),
        })
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Produces every letter and waits until the broker acknowledged all
    /// of them. A letter too large for the topic is sent again without its
    /// value, with the header `idem.value-omitted` giving its size: the
    /// original stays readable at its source offset, and the partition does
    /// not wait for ever on a record that cannot be stored.
    ///
    /// # Errors
    /// The letters not acknowledged within the timeout, or refused, by
    /// index; the others were written and must not be sent again.
    pub fn send(&self, letters: &[DeadLetter<'_>]) -> Result<(), DeadLetterError> {
        if letters.is_empty() {
            return Ok(());
        }
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let mut errors: HashMap<usize, String> = HashMap::new();
        let mut too_large = Vec::new();
        let mut sent = 0;
        for (i, letter) in letters.iter().enumerate() {
            match self.produce(letter, opaque(generation, i), false) {
                Ok(()) => sent += 1,
                Err(e) if fault::kafka_delivery(&e) == Fault::Record => too_large.push(i),
                Err(e) => {
                    errors.insert(i, e.to_string());
                }
            }
        }
        let _ = self.wait(generation, sent);
        let mut delivered = self.take_reports(generation, &mut errors, &mut too_large);

        if !too_large.is_empty() {
            let mut sent = 0;
            for &i in &too_large {
                match self.produce(&letters[i], opaque(generation, i), true) {
                    Ok(()) => sent += 1,
                    Err(e) => {
                        errors.insert(i, e.to_string());
                    }
                }
            }
            let _ = self.wait(generation, sent);
            let mut still_too_large = Vec::new();
            delivered.extend(self.take_reports(generation, &mut errors, &mut still_too_large));
            for i in still_too_large {
                errors.insert(i, "too large even without its value".to_string());
            }
        }

        let undelivered: Vec<usize> = (0..letters.len())
            .filter(|i| !delivered.contains(i))
            .collect();
        if undelivered.is_empty() {
            return Ok(());
        }
        let first = undelivered
            .iter()
            .find_map(|i| errors.get(i))
            .cloned()
            .unwrap_or_else(|| format!("not acknowledged within {} ms", self.timeout.as_millis()));
        Err(DeadLetterError {
            topic: self.topic.clone(),
            message: format!(
                "{} of {} records not delivered: {first}",
                undelivered.len(),
                letters.len()
            ),
            undelivered,
        })
    }

    /// Waits for the reports of the `count` letters sent in `generation`.
    fn wait(&self, generation: usize, count: usize) -> Result<(), Unacknowledged> {
        self.producer
            .context()
            .wait(generation, count, self.timeout + Duration::from_secs(1))
    }

    /// This send's delivery reports: the delivered indexes are returned,
    /// failures go to `errors` or, when too large, to `too_large`. Reports
    /// of earlier sends are dropped.
    fn take_reports(
        &self,
        generation: usize,
        errors: &mut HashMap<usize, String>,
        too_large: &mut Vec<usize>,
    ) -> Vec<usize> {
        let mut delivered = Vec::new();
        for (i, report) in self.producer.context().take(generation) {
            match report {
                Ok(_) => {
                    errors.remove(&i);
                    delivered.push(i);
                }
                Err(e) if fault::kafka_delivery(&e) == Fault::Record => too_large.push(i),
                Err(e) => {
                    errors.insert(i, e.to_string());
                }
            }
        }
        delivered
    }

    fn produce(
        &self,
        letter: &DeadLetter<'_>,
        opaque: usize,
        omit_value: bool,
    ) -> Result<(), KafkaError> {
        let r = letter.record;
        let partition = r.partition.0.to_string();
        let offset = r.offset.0.to_string();
        let omitted = omit_value.then(|| {
            format!(
                "{} bytes, too large for the dead-letter topic; read the original at its source offset",
                r.value.as_ref().map_or(0, Vec::len)
            )
        });
        // Without its value a letter can still be too large: a huge record
        // key or huge headers are left out too, and said so.
        let key_and_headers = r.key.as_ref().map_or(0, Vec::len)
            + r.headers
                .iter()
                .map(|h| h.name.len() + h.value.as_ref().map_or(0, Vec::len))
                .sum::<usize>();
        let drop_key_and_headers = omit_value && key_and_headers > OMIT_KEY_AND_HEADERS_OVER;
        let key_omitted = drop_key_and_headers
            .then(|| format!("{key_and_headers} bytes of record key and headers left out"));
        let mut headers = OwnedHeaders::new_with_capacity(r.headers.len() + 7);
        for h in r.headers.iter().filter(|_| !drop_key_and_headers) {
            headers = headers.insert(KafkaHeader {
                key: &h.name,
                value: h.value.as_deref(),
            });
        }
        for (key, value) in [
            ("idem.source.topic", Some(r.topic.as_str())),
            ("idem.source.partition", Some(partition.as_str())),
            ("idem.source.offset", Some(offset.as_str())),
            ("idem.reason", Some(letter.reason.as_str())),
            ("idem.error", Some(letter.detail)),
            ("idem.value-omitted", omitted.as_deref()),
            ("idem.key-omitted", key_omitted.as_deref()),
        ] {
            if let Some(value) = value {
                headers = headers.insert(KafkaHeader {
                    key,
                    value: Some(value),
                });
            }
        }

        let mut record: BaseRecord<'_, [u8], [u8], usize> =
            BaseRecord::with_opaque_to(&self.topic, opaque).headers(headers);
        if let (Some(key), false) = (r.key.as_deref(), drop_key_and_headers) {
            record = record.key(key);
        }
        if let (Some(value), false) = (r.value.as_deref(), omit_value) {
            record = record.payload(value);
        }
        send_waiting(&self.producer, record)
    }
}
