//! The dedup store: which idempotency keys were seen, in a RocksDB window.
//!
//! Layout, two column families:
//! - `dedup`: key = topic, 0x00, partition (4 bytes big-endian), then the
//!   idempotency key; value = [`Entry`]. Scoped by partition, so that a
//!   partition's state can move with it when the group rebalances.
//! - `progress`: key = topic, 0x00, partition; value = the next offset to
//!   read (8 bytes big-endian), written in the same synced batch as the
//!   dedup records it covers; also the transaction journal (see
//!   [`journal`]).
//! - `changelog`: key = topic, 0x00, partition; value = the next offset of
//!   the partition's changelog that this store holds (see [`changelog`]).
//!
//! The window is fixed from first sight: a duplicate does not extend it.
//! Whether a key has expired is decided at look-up from the time stored
//! with it and the injected clock, never from whether RocksDB has
//! compacted; the compaction filter only reclaims the space of keys that
//! look-ups already treat as gone.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rocksdb::compaction_filter::Decision;
use rocksdb::{
    BlockBasedIndexType, BlockBasedOptions, Cache, ColumnFamilyDescriptor, DBCompressionType,
    IteratorMode, Options, WriteBatch, WriteOptions, DB,
};

use crate::clock::Clock;
use crate::decode::Fingerprint;
use crate::record::{IdemKey, Offset, Partition};

pub mod changelog;
mod journal;

pub use changelog::{Changelog, ChangelogError, ChangelogRecord};
pub use journal::Journal;

const CF_DEDUP: &str = "dedup";
const CF_PROGRESS: &str = "progress";
const CF_CHANGELOG: &str = "changelog";
const ENTRY_FORMAT: u8 = 1;
/// The dedup family's block cache: room for the filters and indexes of
/// tens of millions of keys, and the data blocks duplicates are read from.
const BLOCK_CACHE_BYTES: usize = 64 << 20;
/// The dedup family's memtable, of which RocksDB keeps up to two (one
/// filling, one being flushed): half of RocksDB's 64 MiB. With 20 million
/// keys in the window, peak RSS fell from about 299 to 275 MiB and the
/// throughput did not change (`scripts/bench.sh scale`).
const MEMTABLE_BYTES: usize = 32 << 20;
/// In the progress column family; no topic name starts with 0xFF.
const REBUILD_KEY: &[u8] = b"\xffrebuild-since";
const ENTRY_LEN: usize = 1 + 16 + 8 + 8;

/// A dedup store failure. RocksDB errors on a local disk are not expected
/// to heal by retrying, except a busy or timed-out write.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("dedup store at {path}: {source}")]
    Open {
        path: String,
        source: rocksdb::Error,
    },
    #[error("dedup store: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("dedup store: corrupt entry for key {key:?}")]
    Corrupt { key: String },
}

impl StoreError {
    pub fn is_retriable(&self) -> bool {
        match self {
            StoreError::Rocks(e) => crate::fault::store(e) == crate::fault::Fault::Transient,
            _ => false,
        }
    }
}

/// What the store remembers of one idempotency key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub fingerprint: Fingerprint,
    /// Clock time when the key was first seen; the window counts from here.
    pub first_seen_ms: i64,
    /// Offset of the record that first carried the key.
    pub offset: Offset,
}

impl Entry {
    fn encode(&self) -> [u8; ENTRY_LEN] {
        let mut out = [0u8; ENTRY_LEN];
        out[0] = ENTRY_FORMAT;
        out[1..17].copy_from_slice(&self.fingerprint.0);
        out[17..25].copy_from_slice(&self.first_seen_ms.to_be_bytes());
        out[25..33].copy_from_slice(&self.offset.0.to_be_bytes());
        out
    }

    fn decode(bytes: &[u8]) -> Option<Entry> {
        if bytes.len() != ENTRY_LEN || bytes[0] != ENTRY_FORMAT {
            return None;
        }
        Some(Entry {
            fingerprint: Fingerprint(bytes[1..17].try_into().ok()?),
            first_seen_ms: i64::from_be_bytes(bytes[17..25].try_into().ok()?),
            offset: Offset(i64::from_be_bytes(bytes[25..33].try_into().ok()?)),
        })
    }

    /// When the window of this key ends.
    pub fn expires_at_ms(&self, window: Duration) -> i64 {
        self.first_seen_ms.saturating_add(window_ms(window))
    }

    fn is_expired(&self, now_ms: i64, window: Duration) -> bool {
        now_ms >= self.expires_at_ms(window)
    }
}

fn window_ms(window: Duration) -> i64 {
    i64::try_from(window.as_millis()).unwrap_or(i64::MAX)
}

/// The store key of an idempotency key within its partition.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DedupKey(Vec<u8>);

impl DedupKey {
    pub fn new(topic: &str, partition: Partition, key: &IdemKey) -> DedupKey {
        let mut bytes = partition_prefix(topic, partition);
        bytes.extend_from_slice(key.0.as_bytes());
        DedupKey(bytes)
    }
}

fn partition_prefix(topic: &str, partition: Partition) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(topic.len() + 5 + 32);
    bytes.extend_from_slice(topic.as_bytes());
    bytes.push(0);
    bytes.extend_from_slice(&partition.0.to_be_bytes());
    bytes
}

/// What `idem inspect stats` shows of one partition.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartitionStats {
    pub topic: String,
    pub partition: Partition,
    pub keys: u64,
    pub expired: u64,
    /// Logical bytes (keys and values), before RocksDB's compression.
    pub bytes: u64,
    pub oldest_first_seen_ms: Option<i64>,
    pub next_offset: Option<Offset>,
}

/// Splits a store key into topic, partition and the rest.
fn split_key(key: &[u8]) -> Option<(String, Partition, &[u8])> {
    let nul = key.iter().position(|b| *b == 0)?;
    let topic = std::str::from_utf8(&key[..nul]).ok()?.to_string();
    let partition = i32::from_be_bytes(key.get(nul + 1..nul + 5)?.try_into().ok()?);
    Some((topic, Partition(partition), &key[nul + 5..]))
}

/// One partition's progress: the next offset to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    pub topic: String,
    pub partition: Partition,
    pub next: Offset,
}

/// The RocksDB-backed dedup window.
pub struct DedupStore {
    db: DB,
    window: Duration,
    clock: Arc<dyn Clock>,
    /// Entries first seen before this time read as absent (rebuild mode).
    ignore_before_ms: i64,
}

impl DedupStore {
    /// Opens (or creates) the store at `path`.
    ///
    /// # Errors
    /// [`StoreError::Open`] when RocksDB cannot open the directory (held by
    /// another process, unreadable, corrupt).
    pub fn open(path: &Path, window: Duration, clock: Arc<dyn Clock>) -> Result<Self, StoreError> {
        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        // The progress family is written every batch but never fills a
        // memtable; without a cap its WAL files would pile up.
        db_opts.set_max_total_wal_size(64 << 20);

        let mut dedup_opts = Options::default();
        let mut table = BlockBasedOptions::default();
        // Most look-ups are misses (new keys): a bloom filter answers them
        // without reading a data block.
        table.set_bloom_filter(10.0, false);
        // Filters and indexes in partitions of 4 KiB, cached one by one:
        // a whole-file filter (about 0.75 MiB per million keys) is larger
        // than a shard of the block cache and would be read from disk
        // again on every batch. The top level of each stays pinned.
        table.set_index_type(BlockBasedIndexType::TwoLevelIndexSearch);
        table.set_partition_filters(true);
        table.set_metadata_block_size(4096);
        table.set_cache_index_and_filter_blocks(true);
        table.set_pin_top_level_index_and_filter(true);
        table.set_pin_l0_filter_and_index_blocks_in_cache(true);
        table.set_block_cache(&Cache::new_lru_cache(BLOCK_CACHE_BYTES));
        dedup_opts.set_block_based_table_factory(&table);
        // The same for the memtable, where the newest keys are: a miss
        // there otherwise walks the skip list.
        dedup_opts.set_memtable_whole_key_filtering(true);
        dedup_opts.set_memtable_prefix_bloom_ratio(0.1);
        dedup_opts.set_compression_type(DBCompressionType::Lz4);
        dedup_opts.set_write_buffer_size(MEMTABLE_BYTES);
        let filter_clock = Arc::clone(&clock);
        dedup_opts.set_compaction_filter("idem-window-expiry", move |_level, _key, value| {
            match Entry::decode(value) {
                Some(entry) if entry.is_expired(filter_clock.now_ms(), window) => Decision::Remove,
                _ => Decision::Keep,
            }
        });

        let cfs = vec![
            ColumnFamilyDescriptor::new(CF_DEDUP, dedup_opts),
            ColumnFamilyDescriptor::new(CF_PROGRESS, Options::default()),
            ColumnFamilyDescriptor::new(CF_CHANGELOG, Options::default()),
        ];
        let db =
            DB::open_cf_descriptors(&db_opts, path, cfs).map_err(|source| StoreError::Open {
                path: path.display().to_string(),
                source,
            })?;
        Ok(DedupStore {
            db,
            window,
            clock,
            ignore_before_ms: i64::MIN,
        })
    }

    /// Opens the store for reading only, beside a running idem (RocksDB
    /// allows one writer, any number of read-only openers).
    ///
    /// # Errors
    /// [`StoreError::Open`] when the directory is not a dedup store.
    pub fn open_read_only(
        path: &Path,
        window: Duration,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, StoreError> {
        let db =
            DB::open_cf_for_read_only(&Options::default(), path, [CF_DEDUP, CF_PROGRESS], false)
                .map_err(|source| StoreError::Open {
                    path: path.display().to_string(),
                    source,
                })?;
        Ok(DedupStore {
            db,
            window,
            clock,
            ignore_before_ms: i64::MIN,
        })
    }

    /// Rebuild mode: entries first seen before `ms` read as absent, so every
    /// record is applied again, while keys seen during the rebuild are
    /// judged as usual (duplicates and conflicts within the replayed
    /// stream come out as in the first run).
    pub fn ignore_entries_before(&mut self, ms: i64) {
        self.ignore_before_ms = ms;
    }

    pub fn window(&self) -> Duration {
        self.window
    }

    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    /// Looks up many keys at once. An expired entry reads as absent.
    ///
    /// # Errors
    /// A RocksDB read error, or an entry that cannot be decoded.
    pub fn lookup(&self, keys: &[&DedupKey]) -> Result<Vec<Option<Entry>>, StoreError> {
        let cf = self.cf(CF_DEDUP);
        let now = self.clock.now_ms();
        let results = self
            .db
            .batched_multi_get_cf(&cf, keys.iter().map(|k| k.0.as_slice()), false);
        keys.iter()
            .zip(results)
            .map(|(key, result)| match result? {
                None => Ok(None),
                Some(bytes) => {
                    let entry = Entry::decode(&bytes).ok_or_else(|| StoreError::Corrupt {
                        key: String::from_utf8_lossy(&key.0).into_owned(),
                    })?;
                    let live = !entry.is_expired(now, self.window)
                        && entry.first_seen_ms >= self.ignore_before_ms;
                    Ok(live.then_some(entry))
                }
            })
            .collect()
    }

    /// Writes dedup entries and partition progress in one synced batch:
    /// after it returns, both survive a crash or power loss together.
    ///
    /// # Errors
    /// A RocksDB write error.
    pub fn commit(
        &self,
        entries: &[(DedupKey, Entry)],
        progress: &[Progress],
        changelog: &[Progress],
    ) -> Result<(), StoreError> {
        self.write_synced(self.commit_batch(entries, progress, changelog))
    }

    /// Records partitions' progress and changelog positions without
    /// waiting for the disk. Made durable by the next synced write; lost
    /// to a power cut, they only make a restart read a batch again.
    ///
    /// # Errors
    /// A RocksDB write error.
    pub fn record_progress(
        &self,
        progress: &[Progress],
        changelog: &[Progress],
    ) -> Result<(), StoreError> {
        self.db.write(self.commit_batch(&[], progress, changelog))?;
        Ok(())
    }

    /// The write of one batch: its entries, each partition's next offset,
    /// and how far each partition's changelog is known here.
    fn commit_batch(
        &self,
        entries: &[(DedupKey, Entry)],
        progress: &[Progress],
        changelog: &[Progress],
    ) -> WriteBatch {
        let dedup = self.cf(CF_DEDUP);
        let mut batch = WriteBatch::default();
        // In key order, the memtable's skip list finds each insert's
        // place from the one before it instead of from its top.
        let mut sorted: Vec<&(DedupKey, Entry)> = entries.iter().collect();
        sorted.sort_unstable_by(|a, b| a.0 .0.cmp(&b.0 .0));
        for (key, entry) in sorted {
            batch.put_cf(&dedup, &key.0, entry.encode());
        }
        for (cf, offsets) in [(CF_PROGRESS, progress), (CF_CHANGELOG, changelog)] {
            let cf = self.cf(cf);
            for p in offsets {
                batch.put_cf(
                    &cf,
                    partition_prefix(&p.topic, p.partition),
                    p.next.0.to_be_bytes(),
                );
            }
        }
        batch
    }

    /// The next offset recorded for a partition, if any.
    ///
    /// # Errors
    /// A RocksDB read error.
    pub fn progress(
        &self,
        topic: &str,
        partition: Partition,
    ) -> Result<Option<Offset>, StoreError> {
        self.stored_offset(CF_PROGRESS, topic, partition)
    }

    /// An offset stored under a partition's key in a column family.
    fn stored_offset(
        &self,
        cf: &str,
        topic: &str,
        partition: Partition,
    ) -> Result<Option<Offset>, StoreError> {
        let bytes = self
            .db
            .get_cf(&self.cf(cf), partition_prefix(topic, partition))?;
        Ok(bytes
            .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
            .map(|b| Offset(i64::from_be_bytes(b))))
    }

    /// Compacts the whole dedup column family now, running the expiry
    /// filter over every entry. Space is reclaimed by RocksDB's own
    /// compactions too; this is for operators and tests.
    pub fn compact(&self) {
        self.db
            .compact_range_cf(&self.cf(CF_DEDUP), None::<&[u8]>, None::<&[u8]>);
    }

    /// Entries physically present, expired or not (an estimate from
    /// RocksDB, exact after a compaction).
    pub fn estimated_keys(&self) -> u64 {
        self.db
            .property_int_value_cf(&self.cf(CF_DEDUP), "rocksdb.estimate-num-keys")
            .ok()
            .flatten()
            .unwrap_or(0)
    }

    /// When the rebuild in progress started, if one is: kept in the store
    /// so that a restarted rebuild goes on with the same cut-off and still
    /// knows the keys its first run wrote.
    ///
    /// # Errors
    /// A RocksDB read error.
    pub fn rebuild_since(&self) -> Result<Option<i64>, StoreError> {
        let bytes = self.db.get_cf(&self.cf(CF_PROGRESS), REBUILD_KEY)?;
        Ok(bytes
            .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
            .map(i64::from_be_bytes))
    }

    /// Records (or, with `None`, ends) a rebuild, synced.
    ///
    /// # Errors
    /// A RocksDB write error.
    pub fn set_rebuild_since(&self, since: Option<i64>) -> Result<(), StoreError> {
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        let cf = self.cf(CF_PROGRESS);
        match since {
            Some(ms) => self
                .db
                .put_cf_opt(&cf, REBUILD_KEY, ms.to_be_bytes(), &opts)?,
            None => self.db.delete_cf_opt(&cf, REBUILD_KEY, &opts)?,
        }
        Ok(())
    }

    /// Every partition with recorded progress, and its next offset.
    ///
    /// # Errors
    /// A RocksDB read error.
    pub fn partitions(&self) -> Result<Vec<Progress>, StoreError> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(&self.cf(CF_PROGRESS), IteratorMode::Start)
        {
            let (key, value) = item?;
            if let (Some((topic, partition, _)), Ok(next)) =
                (split_key(&key), <[u8; 8]>::try_from(&value[..]))
            {
                out.push(Progress {
                    topic,
                    partition,
                    next: Offset(i64::from_be_bytes(next)),
                });
            }
        }
        Ok(out)
    }

    /// The entries of one idempotency key, in every partition that has it
    /// (expired ones included; see [`Entry::expires_at_ms`]).
    ///
    /// # Errors
    /// A RocksDB read error.
    pub fn find(&self, key: &IdemKey) -> Result<Vec<(Progress, Entry)>, StoreError> {
        let cf = self.cf(CF_DEDUP);
        let mut found = Vec::new();
        for p in self.partitions()? {
            let k = DedupKey::new(&p.topic, p.partition, key);
            if let Some(bytes) = self.db.get_cf(&cf, &k.0)? {
                let entry = Entry::decode(&bytes)
                    .ok_or_else(|| StoreError::Corrupt { key: key.0.clone() })?;
                found.push((p, entry));
            }
        }
        Ok(found)
    }

    /// Keys, expired keys, bytes and the oldest entry, per partition. Reads
    /// the whole store: seconds per million keys.
    ///
    /// # Errors
    /// A RocksDB read error.
    pub fn stats(&self) -> Result<Vec<PartitionStats>, StoreError> {
        let now = self.clock.now_ms();
        let mut by_partition: std::collections::BTreeMap<(String, Partition), PartitionStats> =
            std::collections::BTreeMap::new();
        for item in self.db.iterator_cf(&self.cf(CF_DEDUP), IteratorMode::Start) {
            let (key, value) = item?;
            let Some((topic, partition, _)) = split_key(&key) else {
                continue;
            };
            let stats = by_partition
                .entry((topic.clone(), partition))
                .or_insert_with(|| PartitionStats {
                    topic,
                    partition,
                    ..PartitionStats::default()
                });
            stats.keys += 1;
            stats.bytes += (key.len() + value.len()) as u64;
            if let Some(entry) = Entry::decode(&value) {
                if entry.is_expired(now, self.window) {
                    stats.expired += 1;
                }
                let oldest = stats
                    .oldest_first_seen_ms
                    .get_or_insert(entry.first_seen_ms);
                *oldest = (*oldest).min(entry.first_seen_ms);
            }
        }
        for p in self.partitions()? {
            by_partition
                .entry((p.topic.clone(), p.partition))
                .or_insert_with(|| PartitionStats {
                    topic: p.topic.clone(),
                    partition: p.partition,
                    ..PartitionStats::default()
                })
                .next_offset = Some(p.next);
        }
        Ok(by_partition.into_values().collect())
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("column families are created at open")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    fn entry(fp: u8, at: i64, offset: i64) -> Entry {
        Entry {
            fingerprint: Fingerprint([fp; 16]),
            first_seen_ms: at,
            offset: Offset(offset),
        }
    }

    fn open(dir: &Path, clock: &ManualClock) -> DedupStore {
        DedupStore::open(dir, Duration::from_secs(10), Arc::new(clock.clone())).unwrap()
    }

    #[test]
    fn entry_round_trips() {
        let e = entry(7, 1_234, 99);
        assert_eq!(Entry::decode(&e.encode()), Some(e));
        assert_eq!(Entry::decode(&[0u8; 3]), None);
    }

    #[test]
    fn keys_are_partition_scoped() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(0);
        let store = open(dir.path(), &clock);
        let k = IdemKey("K9".into());
        let p0 = DedupKey::new("t", Partition(0), &k);
        let p1 = DedupKey::new("t", Partition(1), &k);
        store
            .commit(&[(p0.clone(), entry(1, 0, 0))], &[], &[])
            .unwrap();
        let found = store.lookup(&[&p0, &p1]).unwrap();
        assert!(found[0].is_some());
        assert!(found[1].is_none());
    }

    /// C7: expiry is decided by the stored time, with or without a
    /// compaction in between, and survives a reopen inside the window.
    #[test]
    fn window_expiry_does_not_wait_for_compaction() {
        for compact in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let clock = ManualClock::new(1_000_000);
            let key = DedupKey::new("t", Partition(0), &IdemKey("K9".into()));
            {
                let store = open(dir.path(), &clock);
                store
                    .commit(&[(key.clone(), entry(1, clock.now_ms(), 0))], &[], &[])
                    .unwrap();
                clock.advance(Duration::from_secs(9));
                assert!(store.lookup(&[&key]).unwrap()[0].is_some());
            }
            // Reopen inside the window: still remembered.
            let store = open(dir.path(), &clock);
            assert!(store.lookup(&[&key]).unwrap()[0].is_some());
            clock.advance(Duration::from_secs(6));
            if compact {
                store.compact();
                assert_eq!(store.estimated_keys(), 0, "filter should drop the key");
            }
            assert!(
                store.lookup(&[&key]).unwrap()[0].is_none(),
                "compact={compact}"
            );
        }
    }

    #[test]
    fn find_and_stats_read_what_was_written() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(5_000);
        let store = open(dir.path(), &clock);
        let k = IdemKey("K1".into());
        let progress = |p| Progress {
            topic: "orders".into(),
            partition: Partition(p),
            next: Offset(8),
        };
        store
            .commit(
                &[
                    (
                        DedupKey::new("orders", Partition(0), &k),
                        entry(1, 1_000, 7),
                    ),
                    (
                        DedupKey::new("orders", Partition(1), &IdemKey("K2".into())),
                        entry(2, 2_000, 7),
                    ),
                ],
                &[progress(0), progress(1)],
                &[],
            )
            .unwrap();
        let found = store.find(&k).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].0.partition, Partition(0));
        assert_eq!(found[0].1.offset, Offset(7));
        let stats = store.stats().unwrap();
        assert_eq!(stats.len(), 2);
        assert_eq!(stats[0].keys, 1);
        assert_eq!(stats[0].oldest_first_seen_ms, Some(1_000));
        assert_eq!(stats[1].next_offset, Some(Offset(8)));
    }

    #[test]
    fn rebuild_ignores_entries_from_before_it_started() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(10_000);
        let mut store = open(dir.path(), &clock);
        let old = DedupKey::new("t", Partition(0), &IdemKey("old".into()));
        let new = DedupKey::new("t", Partition(0), &IdemKey("new".into()));
        store
            .commit(&[(old.clone(), entry(1, 9_000, 0))], &[], &[])
            .unwrap();
        store.ignore_entries_before(10_000);
        store
            .commit(&[(new.clone(), entry(1, 10_000, 1))], &[], &[])
            .unwrap();
        let found = store.lookup(&[&old, &new]).unwrap();
        assert!(found[0].is_none() && found[1].is_some());
    }

    #[test]
    fn a_rebuild_is_remembered_until_ended() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(0);
        {
            let store = open(dir.path(), &clock);
            assert_eq!(store.rebuild_since().unwrap(), None);
            store.set_rebuild_since(Some(42)).unwrap();
        }
        let store = open(dir.path(), &clock);
        assert_eq!(store.rebuild_since().unwrap(), Some(42));
        assert!(store.partitions().unwrap().is_empty(), "not a partition");
        store.set_rebuild_since(None).unwrap();
        assert_eq!(store.rebuild_since().unwrap(), None);
    }

    #[test]
    fn progress_is_written_with_entries() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(0);
        let store = open(dir.path(), &clock);
        assert_eq!(store.progress("t", Partition(0)).unwrap(), None);
        let p = Progress {
            topic: "t".into(),
            partition: Partition(0),
            next: Offset(3),
        };
        store.commit(&[], &[p], &[]).unwrap();
        assert_eq!(store.progress("t", Partition(0)).unwrap(), Some(Offset(3)));
    }

    #[test]
    fn progress_recorded_after_the_changelog_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(0);
        let at = |next| Progress {
            topic: "t".into(),
            partition: Partition(1),
            next: Offset(next),
        };
        {
            let store = open(dir.path(), &clock);
            store.commit(&[], &[at(3)], &[]).unwrap();
            store.record_progress(&[at(8)], &[at(40)]).unwrap();
        }
        let store = open(dir.path(), &clock);
        assert_eq!(store.progress("t", Partition(1)).unwrap(), Some(Offset(8)));
        assert_eq!(
            store.changelog_position("t", Partition(1)).unwrap(),
            Some(Offset(40))
        );
    }
}
