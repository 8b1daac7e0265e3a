//! Delivery reports of idem's producers (dead letters, the Kafka sink, the
//! dedup changelog), matched to what was sent.
//!
//! Each send is a generation; a record's opaque holds the generation in
//! the high bits and the record's index in the low 32, so that a late
//! report of an earlier send is never taken for this one's.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, ProducerContext};
use rdkafka::ClientContext;

use crate::telemetry::logging::route_librdkafka_log;

const INDEX_BITS: u32 = 32;

/// The opaque of record `index` in send `generation`.
pub fn opaque(generation: usize, index: usize) -> usize {
    (generation << INDEX_BITS) | index
}

/// The producer context: librdkafka's logs into tracing, and the reports.
#[derive(Default)]
pub struct Deliveries {
    /// By opaque: the offset written, or the error.
    reports: Mutex<HashMap<usize, Result<i64, KafkaError>>>,
}

impl Deliveries {
    /// Takes the reports of one generation, by record index; reports of
    /// other generations are dropped.
    pub fn take(&self, generation: usize) -> Vec<(usize, Result<i64, KafkaError>)> {
        let reports = std::mem::take(&mut *self.reports.lock().expect("delivery lock poisoned"));
        reports
            .into_iter()
            .filter(|(op, _)| op >> INDEX_BITS == generation)
            .map(|(op, r)| (op & ((1 << INDEX_BITS) - 1), r))
            .collect()
    }

    /// Drops every report not taken yet.
    pub fn clear(&self) {
        self.reports.lock().expect("delivery lock poisoned").clear();
    }
}

impl ClientContext for Deliveries {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        route_librdkafka_log(level, fac, message);
    }
}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: usize) {
        let report = match result {
            Ok(m) => Ok(m.offset()),
            Err((e, _)) => Err(e.clone()),
        };
        self.reports
            .lock()
            .expect("delivery lock poisoned")
            .insert(opaque, report);
    }
}

/// Sends one record, waiting while librdkafka's queue is full.
pub fn send_waiting<C: rdkafka::producer::ProducerContext>(
    producer: &BaseProducer<C>,
    mut record: BaseRecord<'_, [u8], [u8], C::DeliveryOpaque>,
) -> Result<(), KafkaError> {
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                record = back;
                producer.poll(Duration::from_millis(50));
            }
            Err((e, _)) => return Err(e),
        }
    }
}

/// Waits until every record sent through `producer` is acknowledged (or
/// failed), serving delivery reports as they come. librdkafka's `flush`
/// in rust-rdkafka polls in 100 ms steps, which would add up to 100 ms to
/// every batch; this polls in 1 ms steps.
///
/// # Errors
/// [`KafkaError::Flush`] with a timeout when records are still in flight
/// after `limit`.
pub fn wait_delivered<C: rdkafka::producer::ProducerContext>(
    producer: &BaseProducer<C>,
    limit: Duration,
) -> Result<(), KafkaError> {
    use rdkafka::producer::Producer;
    let deadline = std::time::Instant::now() + limit;
    while producer.in_flight_count() > 0 {
        if std::time::Instant::now() >= deadline {
            return Err(KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut));
        }
        producer.poll(Duration::from_millis(1));
    }
    // Reports of the last records may still be queued.
    producer.poll(Duration::ZERO);
    Ok(())
}
