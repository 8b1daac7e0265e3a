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

use std::sync::Mutex;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header as KafkaHeader, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::ClientContext;

use crate::config::Config;
use crate::decode::DeadLetterReason;
use crate::record::Record;
use crate::telemetry::logging::route_librdkafka_log;

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
}

struct DeliveryContext {
    /// Letters not delivered in this send: (index, error).
    failures: Mutex<Vec<(usize, KafkaError)>>,
}

impl ClientContext for DeliveryContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        route_librdkafka_log(level, fac, message);
    }
}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, index: usize) {
        if let Err((e, _)) = result {
            self.failures
                .lock()
                .expect("delivery lock poisoned")
                .push((index, e.clone()));
        }
    }
}

pub struct DeadLetterProducer {
    producer: BaseProducer<DeliveryContext>,
    topic: String,
    timeout: Duration,
}

fn is_too_large(e: &KafkaError) -> bool {
    matches!(
        e,
        KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge)
    )
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
            .set("message.timeout.ms", timeout_ms.to_string())
            // A topic that does not exist should fail fast, not wait out
            // the whole delivery timeout.
            .set(
                "topic.metadata.propagation.max.ms",
                timeout_ms.min(5_000).to_string(),
            );
        let producer = client.create_with_context(DeliveryContext {
            failures: Mutex::new(Vec::new()),
        })?;
        Ok(DeadLetterProducer {
            producer,
            topic: config.dead_letter.topic.clone(),
            timeout: Duration::from_millis(timeout_ms),
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
    /// Any letter not acknowledged within the timeout, or refused.
    pub fn send(&self, letters: &[DeadLetter<'_>]) -> Result<(), DeadLetterError> {
        if letters.is_empty() {
            return Ok(());
        }
        let mut too_large = Vec::new();
        self.take_failures();
        for (i, letter) in letters.iter().enumerate() {
            match self.produce(letter, i, false) {
                Ok(()) => {}
                Err(KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge)) => {
                    too_large.push(i)
                }
                Err(e) => return Err(self.error(e.to_string())),
            }
        }
        self.wait()?;
        let mut failures = self.take_failures();
        failures.retain(|(i, e)| {
            if is_too_large(e) {
                too_large.push(*i);
                false
            } else {
                true
            }
        });
        if let Some((_, first)) = failures.first() {
            return Err(self.error(format!(
                "{} of {} records not delivered: {first}",
                failures.len(),
                letters.len()
            )));
        }
        if too_large.is_empty() {
            return Ok(());
        }
        for &i in &too_large {
            self.produce(&letters[i], i, true)
                .map_err(|e| self.error(e.to_string()))?;
        }
        self.wait()?;
        match self.take_failures().first() {
            None => Ok(()),
            Some((_, e)) => Err(self.error(format!("record without its value not delivered: {e}"))),
        }
    }

    fn wait(&self) -> Result<(), DeadLetterError> {
        self.producer
            .flush(self.timeout + Duration::from_secs(1))
            .map_err(|e| self.error(format!("not acknowledged in time: {e}")))
    }

    fn take_failures(&self) -> Vec<(usize, KafkaError)> {
        std::mem::take(
            &mut *self
                .producer
                .context()
                .failures
                .lock()
                .expect("delivery lock poisoned"),
        )
    }

    fn produce(
        &self,
        letter: &DeadLetter<'_>,
        index: usize,
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
        let mut headers = OwnedHeaders::new_with_capacity(r.headers.len() + 6);
        for h in &r.headers {
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
        ] {
            if let Some(value) = value {
                headers = headers.insert(KafkaHeader {
                    key,
                    value: Some(value),
                });
            }
        }

        let mut record: BaseRecord<'_, [u8], [u8], usize> =
            BaseRecord::with_opaque_to(&self.topic, index).headers(headers);
        if let Some(key) = r.key.as_deref() {
            record = record.key(key);
        }
        if let (Some(value), false) = (r.value.as_deref(), omit_value) {
            record = record.payload(value);
        }
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    // The local queue is full: let deliveries drain.
                    record = back;
                    self.producer.poll(Duration::from_millis(50));
                }
                Err((e, _)) => return Err(e),
            }
        }
    }

    fn error(&self, message: String) -> DeadLetterError {
        DeadLetterError {
            topic: self.topic.clone(),
            message,
        }
    }
}
