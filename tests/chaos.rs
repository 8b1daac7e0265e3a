//! The chaos harness: the real idem binary, twice (one group writing to a
//! real PostgreSQL server, one to a local HTTP receiver that applies each
//! idempotency key once), on a Kafka broker and a PostgreSQL server of the
//! test's own, so that it can restart them. While a stream with
//! duplicates (some far apart), conflicts, stale versions and poison goes
//! through, the harness SIGKILLs idem at random moments, restarts the
//! broker, restarts PostgreSQL and takes the receiver down for a while.
//! At the end it checks the table against a model of the stream, the
//! receiver's effects (one per key, with the first body), that every
//! poison and conflicting record is in the dead-letter topic, and that the
//! committed offsets reached the end; and it prints a table.
//!
//! The size and the faults come from the environment (defaults: the
//! short run of the test command): IDEM_CHAOS_RECORDS (8000),
//! IDEM_CHAOS_KILLS (4), IDEM_CHAOS_BROKER_RESTARTS (1),
//! IDEM_CHAOS_PG_RESTARTS (1), IDEM_CHAOS_OUTAGES (1).
//! `scripts/chaos.sh` runs the long version.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::receiver::Receiver;
use common::*;
use rdkafka::message::{Headers, Message};

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The broker and the PostgreSQL server of this test, stopped on drop.
struct Services {
    kafka: tempfile::TempDir,
    pg: PathBuf,
}

impl Services {
    fn start() -> (Services, String, String) {
        let kafka = tempfile::Builder::new()
            .prefix("idem-chaos-kafka")
            .tempdir()
            .unwrap();
        // PostgreSQL runs as its own user, which must own the directory.
        let pg = std::env::temp_dir().join(unique("idem-chaos-pg"));
        let bootstrap = script("kafka.sh", &["start", kafka.path().to_str().unwrap()]);
        let url = script("postgres.sh", &["start", pg.to_str().unwrap()]);
        (Services { kafka, pg }, bootstrap, url)
    }

    fn restart_broker(&self) {
        script(
            "kafka.sh",
            &["restart", self.kafka.path().to_str().unwrap()],
        );
    }

    fn restart_postgres(&self) {
        script("postgres.sh", &["restart", self.pg.to_str().unwrap()]);
    }
}

impl Drop for Services {
    fn drop(&mut self) {
        let _ = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/kafka.sh"))
            .args(["stop", self.kafka.path().to_str().unwrap()])
            .output();
        let _ = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/postgres.sh"))
            .args(["stop", self.pg.to_str().unwrap()])
            .output();
        let _ = std::fs::remove_dir_all(&self.pg);
    }
}

fn pg_rows(url: &str, table: &str) -> BTreeMap<String, (i64, i64)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .expect("connect to PostgreSQL");
        tokio::spawn(connection);
        client
            .query(
                &format!("SELECT id, ver, (qty #>> '{{}}')::bigint FROM {table}"),
                &[],
            )
            .await
            .expect("rows")
            .iter()
            .map(|r| (r.get::<_, String>(0), (r.get(1), r.get(2))))
            .collect()
    })
}

/// The records idem must dead-letter, as (partition, offset): poison, and
/// a key seen before in its partition with another body.
fn expected_dead_letters(topic: &str, partitions: i32) -> BTreeSet<(i32, i64)> {
    let mut first: HashMap<(i32, String), serde_json::Value> = HashMap::new();
    let mut out = BTreeSet::new();
    for m in read_all(topic, partitions) {
        let key = header(&m, "Idempotency-Key")
            .map(|k| String::from_utf8_lossy(k).to_string())
            .unwrap_or_default();
        match serde_json::from_slice::<serde_json::Value>(m.payload().unwrap_or_default()) {
            Err(_) => {
                out.insert((m.partition(), m.offset()));
            }
            Ok(body) => match first.get(&(m.partition(), key.clone())) {
                Some(earlier) if *earlier != body => {
                    out.insert((m.partition(), m.offset()));
                }
                Some(_) => {}
                None => {
                    first.insert((m.partition(), key), body);
                }
            },
        }
    }
    out
}

fn dead_lettered(topic: &str) -> BTreeSet<(i32, i64)> {
    read_all(topic, 1)
        .iter()
        .filter_map(|m| {
            let field = |name: &str| -> Option<i64> {
                let h = m.headers()?.iter().find(|h| h.key == name)?;
                std::str::from_utf8(h.value?).ok()?.parse().ok()
            };
            Some((
                field("idem.source.partition")? as i32,
                field("idem.source.offset")?,
            ))
        })
        .collect()
}

#[derive(Clone, Copy)]
enum Fault {
    Kill,
    BrokerRestart,
    PgRestart,
    Outage,
}

#[test]
fn chaos() {
    let total = env_or("IDEM_CHAOS_RECORDS", 8_000);
    let mut faults = Vec::new();
    for (fault, count) in [
        (Fault::Kill, env_or("IDEM_CHAOS_KILLS", 4)),
        (
            Fault::BrokerRestart,
            env_or("IDEM_CHAOS_BROKER_RESTARTS", 1),
        ),
        (Fault::PgRestart, env_or("IDEM_CHAOS_PG_RESTARTS", 1)),
        (Fault::Outage, env_or("IDEM_CHAOS_OUTAGES", 1)),
    ] {
        faults.extend(std::iter::repeat_n(fault, count));
    }
    let mut rng = 0x853c_49e6_748f_ea9b_u64;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n.max(1)
    };
    // Faults in a random order.
    for i in (1..faults.len()).rev() {
        faults.swap(i, next(i as u64 + 1) as usize);
    }

    let (services, broker, pg_url) = Services::start();
    // This test binary has this one test: the helpers in `common` read the
    // broker's address from here.
    std::env::set_var("IDEM_KAFKA_BOOTSTRAP", &broker);

    let partitions = 4;
    let receiver = Receiver::start();
    let f = Fixture::with_partitions("chaos", partitions);
    let table = unique("chaos_orders").replace(['-', '.'], "_");
    let pg_sink = format!(
        "[sink]\nkind = \"postgres\"\nurl = \"{pg_url}\"\nstatement_timeout_ms = 5000\n\n\
         [sink.table]\nname = \"{table}\"\nmode = \"upsert\"\nkey_column = \"id\"\n\
         version_column = \"ver\"\ncolumns = {{ id = \"/id\", ver = \"/ver\", qty = \"/qty\" }}\n"
    );
    let pg_config = f.write_text(&f.config_text_with_sink("7d", &pg_sink));
    let http_group = format!("{}-http", f.group);
    let http_dlq = format!("{}.http", f.dead_letter_topic);
    create_topic(&http_dlq, 1);
    let http_text = f
        .instance_text(&f.config_text_with_sink("7d", &receiver.sink(8)), "http")
        .replace(&f.group, &http_group)
        .replace(&f.dead_letter_topic, &http_dlq);
    let http_config = f.dir.path().join("idem-http.toml");
    std::fs::write(&http_config, http_text).unwrap();
    let configs = [pg_config, http_config];
    let groups = [f.group.clone(), http_group.clone()];

    let model = stream(total, partitions);
    let chunks: Vec<&[Rec]> = model
        .records
        .chunks(total.div_ceil(faults.len() + 1))
        .collect();
    let producer = producer();
    let mut idem: Vec<Binary> = configs.iter().map(|c| Binary::start(c, None)).collect();
    let progress = |group: &str| -> i64 {
        try_committed(group, &f.topic, partitions)
            .map(|c| c.iter().map(|o| (*o).max(0)).sum())
            .unwrap_or(0)
    };
    let started = Instant::now();
    let (mut kills, mut broker_restarts, mut pg_restarts, mut outages) = (0, 0, 0, 0);
    let mut produced = 0i64;
    for (i, chunk) in chunks.iter().enumerate() {
        produce_with(&producer, &f.topic, chunk);
        let before = produced;
        produced += chunk.len() as i64;
        let Some(fault) = faults.get(i).copied() else {
            break;
        };
        // Strike while both groups are working through the new records.
        let target = before + chunk.len() as i64 / 3;
        wait_for(Duration::from_secs(300), "progress before a fault", || {
            groups.iter().all(|g| progress(g) >= target)
        });
        std::thread::sleep(Duration::from_millis(next(800)));
        match fault {
            Fault::Kill => {
                let victim = next(2) as usize;
                idem[victim].sigkill();
                idem[victim] = Binary::start(&configs[victim], None);
                kills += 1;
            }
            Fault::BrokerRestart => {
                services.restart_broker();
                broker_restarts += 1;
            }
            Fault::PgRestart => {
                services.restart_postgres();
                pg_restarts += 1;
            }
            Fault::Outage => {
                receiver
                    .seen
                    .down
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                std::thread::sleep(Duration::from_secs(5));
                receiver
                    .seen
                    .down
                    .store(false, std::sync::atomic::Ordering::SeqCst);
                outages += 1;
            }
        }
        eprintln!("chaos: {:?} {} done", started.elapsed(), fault_name(fault));
    }

    let ends = end_offsets(&f.topic, partitions);
    wait_for(
        Duration::from_secs(900),
        "both groups committed to the end",
        || {
            groups
                .iter()
                .all(|g| try_committed(g, &f.topic, partitions).as_ref() == Some(&ends))
        },
    );
    // Each surviving process counted every record it read in exactly one
    // outcome. (A killed process's counters die with it; its records are
    // read again by the next one and counted there.)
    let mut miscounted = 0u64;
    for bin in &mut idem {
        let read = bin.metric("idem_records_read_total", None).unwrap_or(0);
        let outcomes = bin.metric("idem_records_total", None).unwrap_or(0);
        miscounted += read.abs_diff(outcomes);
        assert!(bin.stop().success(), "idem stops cleanly");
    }

    // PostgreSQL: exactly the model's rows.
    let rows = pg_rows(&pg_url, &table);
    let mut lost = 0;
    let mut regressed = 0;
    let mut doubled = 0;
    for (id, (ver, qty)) in &model.rows {
        match rows.get(id) {
            None => lost += 1,
            Some((v, _)) if v < ver => regressed += 1,
            Some((v, q)) if v > ver || q != qty => doubled += 1,
            Some(_) => {}
        }
    }
    doubled += rows
        .keys()
        .filter(|id| !model.rows.contains_key(*id))
        .count();
    // The receiver: one effect per key, with the first body.
    let effects = receiver.effects();
    for (key, (id, qty)) in &model.inserted {
        match effects.get(key) {
            None => lost += 1,
            Some(body) => {
                let body: serde_json::Value = serde_json::from_slice(body).unwrap();
                if body["id"].as_str() != Some(id) || body["qty"].as_i64() != Some(*qty) {
                    doubled += 1;
                }
            }
        }
    }
    doubled += effects
        .keys()
        .filter(|k| !model.inserted.contains_key(*k))
        .count();
    // Every record that can never succeed is in each group's dead letters.
    let must = expected_dead_letters(&f.topic, partitions);
    let unaccounted = [&f.dead_letter_topic, &http_dlq]
        .iter()
        .map(|t| must.difference(&dead_lettered(t)).count())
        .sum::<usize>()
        + miscounted as usize;

    eprintln!(
        "\n| records | duplicates | kills | broker restarts | PostgreSQL restarts | receiver outages | lost | doubled | regressed | unaccounted | time |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n\
         | {total} | {} | {kills} | {broker_restarts} | {pg_restarts} | {outages} | {lost} | {doubled} | {regressed} | {unaccounted} | {:.0} s |\n",
        model.duplicates,
        started.elapsed().as_secs_f64()
    );
    assert_eq!(
        (lost, doubled, regressed, unaccounted),
        (0, 0, 0, 0),
        "lost, doubled, regressed, unaccounted"
    );
    receiver.assert_one_body_per_key();
    drop(services);
}

fn fault_name(f: Fault) -> &'static str {
    match f {
        Fault::Kill => "SIGKILL of idem",
        Fault::BrokerRestart => "broker restart",
        Fault::PgRestart => "PostgreSQL restart",
        Fault::Outage => "receiver outage",
    }
}
