//! Fills a dedup store with synthetic keys, through idem's own library
//! API, so that a run can be measured with millions of keys already in the
//! window.
//!
//! The keys are UUID-shaped like the workload's, spread evenly over the
//! topic's partitions, first seen now (so none expires during the run),
//! and from a key space no workload uses. No partition progress is
//! written: idem must start each partition from the group's offsets as
//! usual. The store is compacted at the end, as a long-running store would
//! be, so that the run does not pay for the prefill's compactions.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use idem::clock::{Clock as _, SystemClock};
use idem::decode::Fingerprint;
use idem::dedup::{DedupKey, DedupStore, Entry};
use idem::record::{IdemKey, Offset, Partition};

use crate::workload::{mix, uuid_key};

/// Keys written in one synced commit.
const CHUNK: u64 = 20_000;

#[derive(Args)]
pub struct PrefillArgs {
    /// The dedup directory (the config's `dedup.path`).
    #[arg(long)]
    pub dedup: PathBuf,
    #[arg(long)]
    pub topic: String,
    #[arg(long, default_value_t = 8)]
    pub partitions: i32,
    /// Keys to write.
    #[arg(long)]
    pub keys: u64,
    /// The key space; must differ from every workload's seed.
    #[arg(long, default_value_t = 1_000_000)]
    pub seed: u64,
    /// The config's `dedup.window`.
    #[arg(long, default_value = "7d")]
    pub window: humantime::Duration,
}

/// # Errors
/// The store cannot be opened or written.
pub fn run(args: &PrefillArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let store = DedupStore::open(
        &args.dedup,
        Duration::from(args.window),
        Arc::new(SystemClock),
    )?;
    let now = SystemClock.now_ms();
    let mut written = 0;
    while written < args.keys {
        let end = (written + CHUNK).min(args.keys);
        let entries: Vec<(DedupKey, Entry)> = (written..end)
            .map(|i| {
                let partition = Partition((i % args.partitions as u64) as i32);
                let key = IdemKey(uuid_key(args.seed, i));
                let h = mix(i ^ args.seed);
                let mut fingerprint = [0u8; 16];
                fingerprint[..8].copy_from_slice(&h.to_be_bytes());
                fingerprint[8..].copy_from_slice(&mix(h).to_be_bytes());
                let entry = Entry {
                    fingerprint: Fingerprint(fingerprint),
                    first_seen_ms: now,
                    offset: Offset((i / args.partitions as u64) as i64),
                };
                (DedupKey::new(&args.topic, partition, &key), entry)
            })
            .collect();
        store.commit(&entries, &[], &[])?;
        written = end;
        if written.is_multiple_of(1_000_000) {
            eprintln!(
                "prefill: {written} keys in {:.0} s",
                started.elapsed().as_secs_f64()
            );
        }
    }
    let compacting = Instant::now();
    store.compact();
    eprintln!(
        "prefill: {} keys written in {:.0} s, compacted in {:.0} s",
        args.keys,
        compacting.duration_since(started).as_secs_f64(),
        compacting.elapsed().as_secs_f64()
    );
    Ok(())
}
