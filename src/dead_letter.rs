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
//! where it is.

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
    failures: Mutex<Vec<String>>,
}

impl ClientContext for DeliveryContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        route_librdkafka_log(level, fac, message);
    }
}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            self.failures
                .lock()
                .expect("delivery lock poisoned")
                .push(e.to_string());
        }
    }
}

pub struct DeadLetterProducer {
    producer: BaseProducer<DeliveryContext>,
    topic: String,
    timeout: Duration,
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
    /// of them.
    ///
    /// # Errors
    /// Any letter not acknowledged within the timeout, or refused.
    pub fn send(&self, letters: &[DeadLetter<'_>]) -> Result<(), DeadLetterError> {
        if letters.is_empty() {
            return Ok(());
        }
        self.producer
            .context()
            .failures
            .lock()
            .expect("delivery lock poisoned")
            .clear();

        for letter in letters {
            self.produce(letter)?;
        }
        self.producer
            .flush(self.timeout + Duration::from_secs(1))
            .map_err(|e| self.error(format!("not acknowledged in time: {e}")))?;

        let failures = self
            .producer
            .context()
            .failures
            .lock()
            .expect("delivery lock poisoned")
            .clone();
        match failures.first() {
            None => Ok(()),
            Some(first) => Err(self.error(format!(
                "{} of {} records not delivered: {first}",
                failures.len(),
                letters.len()
            ))),
        }
    }

    fn produce(&self, letter: &DeadLetter<'_>) -> Result<(), DeadLetterError> {
        let r = letter.record;
        let partition = r.partition.0.to_string();
        let offset = r.offset.0.to_string();
        let mut headers = OwnedHeaders::new_with_capacity(r.headers.len() + 5);
        for h in &r.headers {
            headers = headers.insert(KafkaHeader {
                key: &h.name,
                value: h.value.as_deref(),
            });
        }
        for (key, value) in [
            ("idem.source.topic", r.topic.as_str()),
            ("idem.source.partition", partition.as_str()),
            ("idem.source.offset", offset.as_str()),
            ("idem.reason", letter.reason.as_str()),
            ("idem.error", letter.detail),
        ] {
            headers = headers.insert(KafkaHeader {
                key,
                value: Some(value),
            });
        }

        let mut record: BaseRecord<'_, [u8], [u8], ()> =
            BaseRecord::to(&self.topic).headers(headers);
        if let Some(key) = r.key.as_deref() {
            record = record.key(key);
        }
        if let Some(value) = r.value.as_deref() {
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
                Err((e, _)) => return Err(self.error(e.to_string())),
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
