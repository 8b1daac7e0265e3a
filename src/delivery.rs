//! Delivery reports of idem's producers (dead letters, the Kafka sink, the
//! dedup changelog), matched to what was sent.
//!
//! Each send is a generation; a record's opaque holds the generation in
//! the high bits and the record's index in the low 32, so that a late
//! report of an earlier send is never taken for this one's.

use std::collections::HashMap;
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, ProducerContext};
use rdkafka::ClientContext;

use crate::telemetry::logging::route_librdkafka_log;

const INDEX_BITS: u32 = 32;

/// idem's producers: a librdkafka producer whose delivery reports a
/// thread of its own serves as they come, so that a caller waiting for them
/// sleeps until the last one is in. (Served from the waiting thread they
/// would cost a spinning core: `BaseProducer::poll` runs to the end of its
/// timeout, and its last millisecond, so all of a 1 ms poll, never blocks.)
/// Everything else is `BaseProducer`'s, through `Deref`.
pub struct Producer {
    inner: Arc<BaseProducer<Deliveries>>,
    stop: Arc<AtomicBool>,
}

/// How long one poll of the delivery thread lasts. Its last millisecond
/// spins (see [`Producer`]): a second costs an idle producer 0.1% of a
/// core, and a dropped producer's thread ends within a second.
const POLL_STEP: Duration = Duration::from_secs(1);

impl Producer {
    /// Creates the producer and starts its delivery thread.
    ///
    /// # Errors
    /// librdkafka refused the configuration.
    pub fn create(config: &ClientConfig) -> KafkaResult<Producer> {
        let inner: Arc<BaseProducer<Deliveries>> =
            Arc::new(config.create_with_context(Deliveries::default())?);
        let stop = Arc::new(AtomicBool::new(false));
        let (producer, stopped) = (Arc::clone(&inner), Arc::clone(&stop));
        std::thread::Builder::new()
            .name("idem-deliveries".into())
            .spawn(move || {
                while !stopped.load(Ordering::Relaxed) {
                    producer.poll(POLL_STEP);
                }
            })
            .expect("the delivery thread starts");
        Ok(Producer { inner, stop })
    }
}

impl Deref for Producer {
    type Target = BaseProducer<Deliveries>;

    fn deref(&self) -> &BaseProducer<Deliveries> {
        &self.inner
    }
}

impl Drop for Producer {
    /// The delivery thread ends after its current poll, and the client
    /// with it; nothing waits for that.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The opaque of record `index` in send `generation`.
pub fn opaque(generation: usize, index: usize) -> usize {
    (generation << INDEX_BITS) | index
}

/// Records whose delivery reports did not come in time.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{missing} of {sent} records not acknowledged within {} ms", limit.as_millis())]
pub struct Unacknowledged {
    pub missing: usize,
    pub sent: usize,
    pub limit: Duration,
}

/// One delivery report: the record's index in its send, and the offset
/// written or the error.
pub type Report = (usize, Result<i64, KafkaError>);

/// The producer context: librdkafka's logs into tracing, and the reports.
#[derive(Default)]
pub struct Deliveries {
    state: Mutex<State>,
    /// Signalled when the reports a waiter counts on are all in.
    complete: Condvar,
}

#[derive(Default)]
struct State {
    /// The reports that came in, by generation.
    reports: HashMap<usize, Vec<Report>>,
    /// The generation a caller waits on, and how many reports it needs.
    awaited: Option<(usize, usize)>,
}

impl State {
    fn count(&self, generation: usize) -> usize {
        self.reports.get(&generation).map_or(0, Vec::len)
    }
}

impl Deliveries {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("delivery lock poisoned")
    }

    /// Waits until `count` reports of send `generation` have come in, or
    /// `limit` has passed.
    ///
    /// # Errors
    /// [`Unacknowledged`] when fewer came in time.
    pub fn wait(
        &self,
        generation: usize,
        count: usize,
        limit: Duration,
    ) -> Result<(), Unacknowledged> {
        let deadline = Instant::now() + limit;
        let mut state = self.lock();
        state.awaited = Some((generation, count));
        let result = loop {
            if state.count(generation) >= count {
                break Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break Err(Unacknowledged {
                    missing: count - state.count(generation),
                    sent: count,
                    limit,
                });
            }
            state = self
                .complete
                .wait_timeout(state, left)
                .expect("delivery lock poisoned")
                .0;
        };
        state.awaited = None;
        result
    }

    /// Takes the reports of one generation, by record index; reports of
    /// other generations are dropped.
    pub fn take(&self, generation: usize) -> Vec<Report> {
        let mut state = self.lock();
        let taken = state.reports.remove(&generation).unwrap_or_default();
        state.reports.clear();
        taken
    }

    /// Drops every report not taken yet.
    pub fn clear(&self) {
        self.lock().reports.clear();
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
        let generation = opaque >> INDEX_BITS;
        let mut state = self.lock();
        state
            .reports
            .entry(generation)
            .or_default()
            .push((opaque & ((1 << INDEX_BITS) - 1), report));
        if matches!(state.awaited, Some((g, n)) if g == generation && state.count(g) >= n) {
            self.complete.notify_all();
        }
    }
}

/// Sends one record, waiting while librdkafka's queue is full (the
/// producer's own thread empties it as reports come in).
pub fn send_waiting(
    producer: &Producer,
    mut record: BaseRecord<'_, [u8], [u8], usize>,
) -> Result<(), KafkaError> {
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                record = back;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err((e, _)) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::Producer as _;

    use super::*;

    #[test]
    fn a_wait_ends_with_its_own_sends_last_report() {
        let cluster = MockCluster::new(1).expect("mock cluster");
        cluster.create_topic("t", 1, 1).expect("topic");
        let producer = Producer::create(
            ClientConfig::new()
                .set("bootstrap.servers", cluster.bootstrap_servers())
                .set("linger.ms", "100"),
        )
        .expect("producer");
        let send = |generation, count| {
            for i in 0..count {
                let record = BaseRecord::with_opaque_to("t", opaque(generation, i))
                    .key(&b"k"[..])
                    .payload(&b"v"[..]);
                send_waiting(&producer, record).expect("send");
            }
        };
        send(1, 3);
        send(2, 5);
        let deliveries = producer.context();
        deliveries
            .wait(2, 5, Duration::from_secs(10))
            .expect("all five acknowledged");
        let mut reports = deliveries.take(2);
        reports.sort_by_key(|(i, _)| *i);
        let indexes: Vec<usize> = reports.iter().map(|(i, _)| *i).collect();
        assert_eq!(indexes, vec![0, 1, 2, 3, 4]);
        assert!(reports.iter().all(|(_, r)| r.is_ok()), "{reports:?}");
        // Taking a generation drops the others' reports.
        assert!(deliveries.take(1).is_empty());

        // A send with a report still missing times out.
        send(3, 1);
        let missing = deliveries.wait(3, 2, Duration::from_millis(300));
        assert_eq!(
            missing.map_err(|e| e.to_string()),
            Err("1 of 2 records not acknowledged within 300 ms".to_string())
        );
        deliveries
            .wait(3, 1, Duration::from_secs(10))
            .expect("the one sent is acknowledged");
        assert_eq!(deliveries.take(3).len(), 1);
    }
}
