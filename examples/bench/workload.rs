//! The benchmark's workload: a deterministic stream of JSON order events of
//! about 200 bytes, with a fixed share of redeliveries.
//!
//! - Each event updates one entity (`/id`) with the next version (`/ver`)
//!   of that entity, so that every new event is applied by an upsert sink.
//! - An entity always goes to the same partition (entity number modulo the
//!   partition count), as a producer keyed by the entity id would do; the
//!   record key is the entity id.
//! - The idempotency key (header `Idempotency-Key`) is UUID-shaped and
//!   derived from the seed and the event's sequence number, so two
//!   workloads with different seeds share no key.
//! - Every tenth record (with the default 10%) is a redelivery: the same
//!   key header and the same body as one of the last 10,000 events, so
//!   some duplicates fall in the same batch as their original and most in
//!   an earlier one.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::ClientContext;

use crate::Target;

/// How far back a redelivery reaches, in events.
const REDELIVERY_REACH: usize = 10_000;

/// The workload's parameters; the same parameters give the same records.
#[derive(Args, Clone, Debug)]
pub struct Shape {
    /// Records to produce, redeliveries included.
    #[arg(long, default_value_t = 2_000_000)]
    pub records: u64,
    /// Share of the records that are redeliveries, in percent.
    #[arg(long, default_value_t = 10)]
    pub duplicate_percent: u64,
    /// Partitions of the topic; an entity always goes to the same one.
    #[arg(long, default_value_t = 8)]
    pub partitions: i32,
    /// Distinct entities the events update.
    #[arg(long, default_value_t = 200_000)]
    pub entities: u64,
    /// Picks the key space: workloads with different seeds share no key.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Approximate size of each JSON body.
    #[arg(long, default_value_t = 200)]
    pub body_bytes: usize,
}

/// One record of the workload.
pub struct Item {
    pub partition: i32,
    pub entity: String,
    pub idem_key: String,
    pub body: Vec<u8>,
    pub duplicate: bool,
}

/// SplitMix64: a tiny, well-mixed, deterministic generator.
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A UUID-shaped key (36 characters) for event `seq` of key space `seed`.
pub fn uuid_key(seed: u64, seq: u64) -> String {
    let a = mix(seed.wrapping_mul(0x1000_0000_0000_0001) ^ seq);
    let b = mix(a);
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        ((b >> 48) & 0x3fff) | 0x8000,
        b & 0xffff_ffff_ffff
    )
}

/// One event, enough to build its record again for a redelivery.
#[derive(Clone, Copy)]
struct EventId {
    seq: u64,
    entity: u64,
    version: u32,
}

/// The records of a [`Shape`], in order.
pub struct Generator {
    shape: Shape,
    versions: Vec<u32>,
    recent: VecDeque<EventId>,
    index: u64,
    next_seq: u64,
    rng: u64,
}

impl Generator {
    pub fn new(shape: &Shape) -> Generator {
        Generator {
            shape: shape.clone(),
            versions: vec![0; shape.entities as usize],
            recent: VecDeque::with_capacity(REDELIVERY_REACH),
            index: 0,
            next_seq: 0,
            rng: mix(shape.seed),
        }
    }

    fn random(&mut self) -> u64 {
        self.rng = mix(self.rng);
        self.rng
    }

    /// Whether record `i` is a redelivery: spread evenly, exactly
    /// `duplicate_percent` of every hundred.
    fn is_redelivery(&self, i: u64) -> bool {
        let p = self.shape.duplicate_percent;
        (i + 1) * p / 100 > i * p / 100
    }

    fn item(&self, event: EventId, duplicate: bool) -> Item {
        let entity = format!("cust-{:010}", event.entity);
        let h = mix(event.seq ^ 0x5eed);
        let statuses = ["placed", "paid", "packed", "shipped", "delivered"];
        let mut body = String::with_capacity(self.shape.body_bytes + 16);
        let _ = write!(
            body,
            r#"{{"id":"{entity}","ver":{},"qty":{},"status":"{}","amount":"{}.{:02}","currency":"EUR","sku":"SKU-{:06}","ts":{},"note":""#,
            event.version,
            1 + h % 20,
            statuses[(h >> 8) as usize % statuses.len()],
            (h >> 16) % 10_000,
            (h >> 32) % 100,
            (h >> 40) % 1_000_000,
            1_767_225_600_000 + event.seq * 3,
        );
        let filler = "lorem ipsum dolor sit amet consectetur adipiscing elit ";
        let room = self.shape.body_bytes.saturating_sub(body.len() + 2);
        body.extend(filler.chars().cycle().take(room));
        body.push_str("\"}");
        Item {
            partition: (event.entity % self.shape.partitions as u64) as i32,
            entity,
            idem_key: uuid_key(self.shape.seed, event.seq),
            body: body.into_bytes(),
            duplicate,
        }
    }
}

impl Iterator for Generator {
    type Item = Item;

    fn next(&mut self) -> Option<Item> {
        if self.index >= self.shape.records {
            return None;
        }
        let i = self.index;
        self.index += 1;
        if self.is_redelivery(i) && !self.recent.is_empty() {
            let pick = self.random() as usize % self.recent.len();
            return Some(self.item(self.recent[pick], true));
        }
        let entity = self.random() % self.shape.entities;
        self.versions[entity as usize] += 1;
        let event = EventId {
            seq: self.next_seq,
            entity,
            version: self.versions[entity as usize],
        };
        self.next_seq += 1;
        if self.recent.len() == REDELIVERY_REACH {
            self.recent.pop_front();
        }
        self.recent.push_back(event);
        Some(self.item(event, false))
    }
}

/// Counts failed deliveries, so that a run never measures a topic that
/// lacks records.
#[derive(Default)]
struct Deliveries {
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            self.failed.fetch_add(1, Ordering::Relaxed);
            let mut first = self.first_error.lock().expect("lock");
            first.get_or_insert_with(|| e.to_string());
        }
    }
}

/// What a produce run did.
pub struct Produced {
    pub records: u64,
    pub duplicates: u64,
    pub elapsed: Duration,
}

/// Produces the workload into `target`, as fast as the broker takes it,
/// or at `rate` records per second, evenly paced.
///
/// # Errors
/// A record the broker did not acknowledge, or a producer that cannot be
/// created.
pub fn produce(target: &Target, shape: &Shape, rate: Option<f64>) -> anyhow::Result<Produced> {
    // Paced: send soon, so that the stream reaching idem is as steady as
    // the pacing. Bulk: larger batches.
    let linger = if rate.is_some() { "2" } else { "20" };
    let producer: BaseProducer<Deliveries> = ClientConfig::new()
        .set("bootstrap.servers", &target.bootstrap)
        .set("enable.idempotence", "true")
        .set("linger.ms", linger)
        .set("queue.buffering.max.messages", "500000")
        .create_with_context(Deliveries::default())
        .context("creating the producer")?;

    if rate.is_some() {
        // Connected before the pacing starts: records sent meanwhile would
        // reach the broker in one burst once it is.
        producer
            .client()
            .fetch_metadata(Some(&target.topic), Duration::from_secs(10))
            .context("reading the topic's metadata")?;
    }
    let started = Instant::now();
    let mut produced = Produced {
        records: 0,
        duplicates: 0,
        elapsed: Duration::ZERO,
    };
    for item in Generator::new(shape) {
        if let Some(rate) = rate {
            // Sleeping per record would undershoot the rate by the
            // sleep's own overhead: catch up in bursts of at most 1 ms.
            let due = started + Duration::from_secs_f64(produced.records as f64 / rate);
            let now = Instant::now();
            if due > now + Duration::from_millis(1) {
                std::thread::sleep(due - now);
                producer.poll(Duration::ZERO);
            }
        }
        let headers = OwnedHeaders::new().insert(Header {
            key: "Idempotency-Key",
            value: Some(item.idem_key.as_bytes()),
        });
        let mut record = BaseRecord::to(&target.topic)
            .partition(item.partition)
            .key(item.entity.as_bytes())
            .payload(&item.body)
            .headers(headers);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    producer.poll(Duration::from_millis(5));
                }
                Err((e, _)) => return Err(e).context("producing"),
            }
        }
        produced.records += 1;
        produced.duplicates += u64::from(item.duplicate);
        if produced.records.is_multiple_of(1024) {
            producer.poll(Duration::ZERO);
        }
    }
    producer
        .flush(Duration::from_secs(120))
        .context("flushing the producer")?;
    produced.elapsed = started.elapsed();
    let context = producer.context();
    let failed = context.failed.load(Ordering::Relaxed);
    if failed > 0 {
        anyhow::bail!(
            "{failed} records were not delivered: {}",
            context
                .first_error
                .lock()
                .expect("lock")
                .as_deref()
                .unwrap_or("?")
        );
    }
    Ok(produced)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(records: u64) -> Shape {
        Shape {
            records,
            duplicate_percent: 10,
            partitions: 8,
            entities: 1_000,
            seed: 7,
            body_bytes: 200,
        }
    }

    #[test]
    fn a_tenth_are_redeliveries_of_earlier_records() {
        let items: Vec<Item> = Generator::new(&shape(10_000)).collect();
        assert_eq!(items.iter().filter(|i| i.duplicate).count(), 1_000);
        let mut seen = std::collections::HashMap::new();
        for item in &items {
            match seen.get(&item.idem_key) {
                Some(body) => {
                    assert!(item.duplicate);
                    assert_eq!(body, &item.body, "a redelivery has the same body");
                }
                None => {
                    assert!(!item.duplicate);
                    seen.insert(item.idem_key.clone(), item.body.clone());
                }
            }
        }
    }

    #[test]
    fn an_entity_stays_on_its_partition_and_bodies_are_about_200_bytes() {
        let mut partition_of = std::collections::HashMap::new();
        for item in Generator::new(&shape(5_000)) {
            assert_eq!(
                *partition_of
                    .entry(item.entity.clone())
                    .or_insert(item.partition),
                item.partition
            );
            assert!(
                (190..=210).contains(&item.body.len()),
                "{}",
                item.body.len()
            );
            serde_json::from_slice::<serde_json::Value>(&item.body).expect("JSON");
        }
    }

    #[test]
    fn seeds_do_not_share_keys() {
        assert_ne!(uuid_key(1, 5), uuid_key(2, 5));
        assert_eq!(uuid_key(1, 5).len(), 36);
    }
}
