//! The SQLite sink's own ceiling: idem's `SqliteSink` applying the
//! workload's new records (the redeliveries never reach a sink) in
//! batches, with no Kafka, no decoding cost counted and no dedup store.
//! idem into SQLite cannot be faster than this; the table shows it next
//! to the bare consumer so that the gap between the two is visible.

use std::path::Path;
use std::time::Instant;

use anyhow::Context as _;
use idem::config::{Config, SinkConfig};
use idem::record::{IdemKey, Offset, Partition};
use idem::sink::sqlite::SqliteSink;
use idem::sink::{Sink, SinkWrite};
use serde_json::Value;

use crate::report::RunResult;
use crate::workload::{Generator, Shape};

/// Applies the new records of `shape` to a fresh SQLite file in `dir`,
/// `batch` records per transaction, with idem's table mapping of the
/// benchmark; times the sink calls only.
///
/// # Errors
/// The database cannot be created or a batch fails.
pub fn run(shape: &Shape, dir: &Path, batch: usize, label: &str) -> anyhow::Result<RunResult> {
    std::fs::create_dir_all(dir)?;
    let toml = format!(
        r#"
[kafka]
bootstrap_servers = "127.0.0.1:9"
group_id = "unused"

[[topics]]
name = "bench.in"
key = {{ from = "header", name = "Idempotency-Key" }}

[dedup]
path = "{dir}/unused-dedup"
window = "7d"

[sink]
kind = "sqlite"
path = "{dir}/orders.db"

[sink.table]
name = "orders"
mode = "upsert"
key_column = "id"
version_column = "ver"
columns = {{ id = "/id", ver = "/ver", qty = "/qty", status = "/status", amount = "/amount" }}

[dead_letter]
topic = "unused"
"#,
        dir = dir.display()
    );
    let config = Config::parse(&toml, Path::new("sink-limit.toml")).context("benchmark config")?;
    let SinkConfig::Sqlite(sqlite) = &config.sink else {
        unreachable!("the config above is a SQLite sink")
    };
    let mut sink = SqliteSink::open(sqlite).map_err(|e| anyhow::anyhow!("{e}"))?;

    // Decoded up front: only the sink is timed.
    let events: Vec<(IdemKey, Value, Vec<u8>, i32)> = Generator::new(shape)
        .filter(|item| !item.duplicate)
        .map(|item| {
            let body = serde_json::from_slice(&item.body).expect("the workload is JSON");
            (IdemKey(item.idem_key), body, item.body, item.partition)
        })
        .collect();
    let started = Instant::now();
    let mut applied = 0u64;
    let wal = dir.join("orders.db-wal");
    let mut wal_peak = 0u64;
    for (n, chunk) in events.chunks(batch).enumerate() {
        let writes: Vec<SinkWrite<'_>> = chunk
            .iter()
            .enumerate()
            .map(|(i, (key, body, raw, partition))| SinkWrite {
                topic: "bench.in",
                partition: Partition(*partition),
                offset: Offset((n * batch + i) as i64),
                key,
                body,
                raw,
            })
            .collect();
        let outcomes = sink.apply(&writes).map_err(|e| anyhow::anyhow!("{e}"))?;
        applied += outcomes.len() as u64;
        wal_peak = wal_peak.max(std::fs::metadata(&wal).map_or(0, |m| m.len()));
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "SQLite sink alone: {applied} records in {secs:.2} s, {:.0} records/s; WAL at most {:.1} MiB",
        applied as f64 / secs,
        wal_peak as f64 / 1_048_576.0
    );
    let mut result = RunResult {
        label: label.to_string(),
        records: applied,
        secs,
        ..RunResult::default()
    };
    result.outcomes.insert("applied".to_string(), applied);
    Ok(result)
}
