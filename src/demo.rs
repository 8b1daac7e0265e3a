//! `idem demo`: the main job with no set-up at all.
//!
//! It starts librdkafka's embedded mock cluster, produces a stream of orders
//! with redelivered duplicates (re-serialised with other key order and
//! whitespace), a conflicting key, a late stale version, a tombstone and
//! poison records, and runs the real pipeline into a SQLite file. The first
//! run is stopped at a crash point after a sink write and before its dedup
//! record and offset commit, as a kill there would; the second run starts
//! from the committed offsets and finishes the stream. Then it compares the
//! table with the state the stream should produce and prints the counts.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::TopicPartitionList;
use serde::Serialize;

use crate::config::Config;
use crate::failpoint::CrashPlan;
use crate::outcome::Outcome;
use crate::pipeline::{Pipeline, RunEnd};
use crate::telemetry::Metrics;

const TOPIC: &str = "orders.v1";
const DEAD_LETTER_TOPIC: &str = "orders.v1.dlq";
const GROUP: &str = "idem-demo";
const ORDERS: u32 = 300;

/// The demo's result. The JSON form has exactly these keys.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub produced: u64,
    pub read: u64,
    pub applied: u64,
    pub duplicate: u64,
    pub conflict: u64,
    pub stale: u64,
    pub dead_lettered: u64,
    pub filtered: u64,
    pub crashes: u64,
    pub sink_matches_expected: bool,
}

impl Summary {
    fn from_metrics(metrics: &Metrics, produced: u64, crashes: u64, matches: bool) -> Self {
        Summary {
            produced,
            read: metrics.read_total(),
            applied: metrics.outcome_total(Outcome::Applied),
            duplicate: metrics.outcome_total(Outcome::Duplicate),
            conflict: metrics.outcome_total(Outcome::Conflict),
            stale: metrics.outcome_total(Outcome::Stale),
            dead_lettered: metrics.outcome_total(Outcome::DeadLettered),
            filtered: metrics.outcome_total(Outcome::Filtered),
            crashes,
            sink_matches_expected: matches,
        }
    }

    /// Outcomes add up to the records read, and the sink is right.
    pub fn is_consistent(&self) -> bool {
        self.applied
            + self.duplicate
            + self.conflict
            + self.stale
            + self.dead_lettered
            + self.filtered
            == self.read
            && self.sink_matches_expected
    }

    fn print_table(&self) {
        let rows = [
            ("produced", self.produced),
            ("read", self.read),
            ("  applied", self.applied),
            ("  duplicate", self.duplicate),
            ("  conflict", self.conflict),
            ("  stale", self.stale),
            ("  dead_lettered", self.dead_lettered),
            ("  filtered", self.filtered),
            ("crashes", self.crashes),
        ];
        println!("idem demo: embedded Kafka cluster -> idem -> SQLite");
        println!("{:<18}{:>8}", "", "records");
        for (name, n) in rows {
            println!("{name:<18}{n:>8}");
        }
        let sum = self.applied
            + self.duplicate
            + self.conflict
            + self.stale
            + self.dead_lettered
            + self.filtered;
        println!("outcomes add up to read: {}", yes(sum == self.read));
        println!(
            "sink matches expected:   {}",
            yes(self.sink_matches_expected)
        );
        println!(
            "(counts are taken when a batch commits: the batch stopped by the crash was \
             counted once, when the restart read it again; its sink writes had already \
             happened, so the restart found them there and counted them as duplicates, \
             or as stale where the entity had meanwhile reached a newer version)"
        );
    }
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "NO"
    }
}

/// One event of the generated stream.
struct Produced {
    key: String,
    idem: Option<String>,
    value: Option<Vec<u8>>,
}

/// The stream, and the rows it must leave: id -> (ver, qty).
fn stream() -> (Vec<Produced>, BTreeMap<String, (i64, i64)>) {
    let mut events = Vec::new();
    let mut expected = BTreeMap::new();
    let order =
        |id: &str, ver: i64, qty: i64| format!(r#"{{"id":"{id}","ver":{ver},"qty":{qty}}}"#);
    let reordered = |id: &str, ver: i64, qty: i64| {
        format!("{{ \"qty\": {qty},\n  \"ver\": {ver}, \"id\": \"{id}\" }}")
    };
    for n in 0..ORDERS {
        let id = format!("ord-{n}");
        let qty = i64::from(n % 7 + 1);
        events.push(Produced {
            key: id.clone(),
            idem: Some(format!("{id}-v1")),
            value: Some(order(&id, 1, qty).into_bytes()),
        });
        expected.insert(id.clone(), (1, qty));
        // Every fifth order is delivered twice: the same event re-serialised.
        if n % 5 == 0 {
            events.push(Produced {
                key: id.clone(),
                idem: Some(format!("{id}-v1")),
                value: Some(reordered(&id, 1, qty).into_bytes()),
            });
        }
        // Every tenth order gets a second version.
        if n % 10 == 3 {
            events.push(Produced {
                key: id.clone(),
                idem: Some(format!("{id}-v2")),
                value: Some(order(&id, 2, qty * 10).into_bytes()),
            });
            expected.insert(id.clone(), (2, qty * 10));
        }
    }
    // The same key as ord-7's first event, with another body: a conflict.
    events.push(Produced {
        key: "ord-7".into(),
        idem: Some("ord-7-v1".into()),
        value: Some(order("ord-7", 1, 999).into_bytes()),
    });
    // A late version 1 of ord-13, which is already at version 2: stale.
    events.push(Produced {
        key: "ord-13".into(),
        idem: Some("ord-13-v1-late".into()),
        value: Some(order("ord-13", 1, 1).into_bytes()),
    });
    // Poison: truncated JSON, and an event without an idempotency key.
    events.push(Produced {
        key: "ord-2".into(),
        idem: Some("ord-2-broken".into()),
        value: Some(br#"{"id":"ord-2","qty":"#.to_vec()),
    });
    events.push(Produced {
        key: "ord-4".into(),
        idem: None,
        value: Some(order("ord-4", 3, 3).into_bytes()),
    });
    // A tombstone: counted as filtered, no effect.
    events.push(Produced {
        key: "ord-9".into(),
        idem: None,
        value: None,
    });
    (events, expected)
}

/// Runs the demo and prints its summary (a table, or one JSON object).
///
/// # Errors
/// The embedded cluster, the pipeline or the SQLite check failed.
pub fn run(json: bool) -> anyhow::Result<Summary> {
    let dir = tempfile::Builder::new()
        .prefix("idem-demo-")
        .tempdir()
        .context("creating a temporary directory")?;
    let cluster = MockCluster::new(1).context("starting the embedded Kafka cluster")?;
    cluster.create_topic(TOPIC, 2, 1)?;
    cluster.create_topic(DEAD_LETTER_TOPIC, 1, 1)?;
    // The mock cluster makes a topic up when asked about one it lacks, so
    // the dedup changelog is created here, as idem would create it.
    cluster.create_topic(&crate::dedup::changelog::topic_name(GROUP, TOPIC), 2, 1)?;
    let bootstrap = cluster.bootstrap_servers();

    let (events, expected) = stream();
    produce(&bootstrap, &events)?;
    let config = demo_config(&bootstrap, dir.path())?;
    let metrics = Arc::new(Metrics::new());

    // First run: stopped after the sink write of its second batch, before
    // the dedup record and the offset commit, as a kill would stop it.
    let first = Pipeline::new(config.clone())
        .with_metrics(Arc::clone(&metrics))
        .with_crash_plan(CrashPlan::at("after-sink-write", 2))
        .run()?;
    let crashes = u64::from(matches!(first, RunEnd::Crashed(_)));

    // Second run: picks up from the committed offsets and finishes.
    let pipeline = Pipeline::new(config.clone()).with_metrics(Arc::clone(&metrics));
    let stop = pipeline.shutdown_handle();
    let worker = std::thread::spawn(move || pipeline.run());
    let caught_up = wait_for_commits(&bootstrap, Duration::from_secs(120));
    stop.trigger();
    let second = worker.join().expect("pipeline thread panicked")?;
    caught_up?;
    if second != RunEnd::Stopped {
        bail!("second run ended unexpectedly: {second:?}");
    }

    let matches = sink_matches(&dir.path().join("orders.db"), &expected)?;
    let summary = Summary::from_metrics(&metrics, events.len() as u64, crashes, matches);
    if json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        summary.print_table();
    }
    Ok(summary)
}

fn demo_config(bootstrap: &str, dir: &Path) -> anyhow::Result<Config> {
    let text = format!(
        r#"
[kafka]
bootstrap_servers = "{bootstrap}"
group_id = "{GROUP}"
session_timeout_ms = 6000

[[topics]]
name = "{TOPIC}"

[batch]
max_records = 40
linger_ms = 20

[dedup]
path = "{dedup}"
window = "7d"

[sink]
kind = "sqlite"
path = "{sink}"

[sink.table]
name = "orders"
mode = "upsert"
key_column = "id"
version_column = "ver"
columns = {{ id = "/id", ver = "/ver", qty = "/qty" }}

[dead_letter]
topic = "{DEAD_LETTER_TOPIC}"
timeout_ms = 10000

[log]
level = "warn"
"#,
        dedup = dir.join("dedup").display(),
        sink = dir.join("orders.db").display(),
    );
    Ok(Config::parse(&text, Path::new("<demo>"))?)
}

fn produce(bootstrap: &str, events: &[Produced]) -> anyhow::Result<()> {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "5")
        .create()?;
    for e in events {
        let mut headers = OwnedHeaders::new();
        if let Some(idem) = &e.idem {
            headers = headers.insert(Header {
                key: "Idempotency-Key",
                value: Some(idem.as_str()),
            });
        }
        let mut record = BaseRecord::<str, [u8]>::to(TOPIC)
            .key(e.key.as_str())
            .headers(headers);
        if let Some(v) = &e.value {
            record = record.payload(v.as_slice());
        }
        producer.send(record).map_err(|(e, _)| e)?;
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(30))?;
    Ok(())
}

/// Waits until the group's committed offsets reach the end of every
/// partition of the topic.
fn wait_for_commits(bootstrap: &str, limit: Duration) -> anyhow::Result<()> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", GROUP)
        .create()?;
    let deadline = Instant::now() + limit;
    loop {
        let mut done = true;
        let mut tpl = TopicPartitionList::new();
        for p in 0..2 {
            tpl.add_partition(TOPIC, p);
        }
        let committed = consumer.committed_offsets(tpl, Duration::from_secs(5))?;
        for p in 0..2 {
            let (_, high) = consumer.fetch_watermarks(TOPIC, p, Duration::from_secs(5))?;
            let at = committed
                .find_partition(TOPIC, p)
                .and_then(|e| e.offset().to_raw())
                .unwrap_or(-1);
            done &= at >= high;
        }
        if done {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the pipeline did not commit the whole stream within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn sink_matches(path: &Path, expected: &BTreeMap<String, (i64, i64)>) -> anyhow::Result<bool> {
    let conn = rusqlite::Connection::open(path)?;
    let mut stmt = conn.prepare("SELECT id, ver, qty FROM orders ORDER BY id")?;
    let rows: BTreeMap<String, (i64, i64)> = stmt
        .query_map([], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?))))?
        .collect::<Result<_, _>>()?;
    Ok(&rows == expected)
}
