//! The transaction journal, for sinks that commit offsets themselves.
//!
//! With the Kafka sink, a batch's dedup records must be durable before
//! its transaction commits (a crash right after the commit must not lose
//! them), yet must vanish if the transaction does not commit (or the
//! records, read again, would be taken for duplicates of themselves and
//! never produced). So the dedup records are written together with a
//! journal of the batch: its keys, and each partition's offset before and
//! after. When the outcome is known, the journal is settled: a committed
//! transaction keeps the records, an aborted one removes them and puts the
//! stored progress back.
//!
//! After a commit the journal is cleared with an unsynced write, so that a
//! journal found at start-up stands for a transaction in doubt; a journal
//! whose partitions have no committed offset at all (the group's offsets
//! deleted or expired) is settled as aborted: the batch is produced again
//! rather than lost.

use rocksdb::{WriteBatch, WriteOptions};

use super::{
    partition_prefix, DedupKey, DedupStore, Entry, Progress, StoreError, CF_DEDUP, CF_PROGRESS,
};
use crate::record::{Offset, Partition};

const JOURNAL_KEY: &[u8] = b"\xfftransaction";

/// A batch written to the dedup store ahead of its transaction's commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Journal {
    /// Per partition: the offset the transaction commits, and the stored
    /// progress before the batch.
    pub partitions: Vec<(Progress, Option<Offset>)>,
    keys: Vec<DedupKey>,
}

impl Journal {
    /// Whether the group's committed offsets show the transaction
    /// committed: every partition's committed offset at or past the
    /// batch's end. Anything less counts as aborted; at worst that
    /// produces a batch again, never loses one.
    pub fn committed(&self, group_offset: impl Fn(&Progress) -> Option<Offset>) -> bool {
        self.partitions
            .iter()
            .all(|(p, _)| group_offset(p).is_some_and(|o| o >= p.next))
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(self.partitions.len() as u32).to_be_bytes());
        for (p, previous) in &self.partitions {
            out.extend_from_slice(&(p.topic.len() as u32).to_be_bytes());
            out.extend_from_slice(p.topic.as_bytes());
            out.extend_from_slice(&p.partition.0.to_be_bytes());
            out.extend_from_slice(&p.next.0.to_be_bytes());
            out.extend_from_slice(&previous.map_or(-1, |o| o.0).to_be_bytes());
        }
        out.extend_from_slice(&(self.keys.len() as u32).to_be_bytes());
        for key in &self.keys {
            out.extend_from_slice(&(key.0.len() as u32).to_be_bytes());
            out.extend_from_slice(&key.0);
        }
        out
    }

    fn decode(mut bytes: &[u8]) -> Option<Journal> {
        fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
            let (head, rest) = (bytes.get(..n)?, bytes.get(n..)?);
            *bytes = rest;
            Some(head)
        }
        fn int<const N: usize>(bytes: &mut &[u8]) -> Option<[u8; N]> {
            take(bytes, N)?.try_into().ok()
        }
        let count = u32::from_be_bytes(int(&mut bytes)?);
        let mut partitions = Vec::new();
        for _ in 0..count {
            let len = u32::from_be_bytes(int(&mut bytes)?) as usize;
            let topic = String::from_utf8(take(&mut bytes, len)?.to_vec()).ok()?;
            let partition = Partition(i32::from_be_bytes(int(&mut bytes)?));
            let next = Offset(i64::from_be_bytes(int(&mut bytes)?));
            let previous = i64::from_be_bytes(int(&mut bytes)?);
            partitions.push((
                Progress {
                    topic,
                    partition,
                    next,
                },
                (previous >= 0).then_some(Offset(previous)),
            ));
        }
        let count = u32::from_be_bytes(int(&mut bytes)?);
        let mut keys = Vec::new();
        for _ in 0..count {
            let len = u32::from_be_bytes(int(&mut bytes)?) as usize;
            keys.push(DedupKey(take(&mut bytes, len)?.to_vec()));
        }
        bytes.is_empty().then_some(Journal { partitions, keys })
    }
}

impl DedupStore {
    /// Like [`DedupStore::commit`], for a batch whose offsets are committed
    /// by a transaction that has not committed yet: the journal of the
    /// batch is written in the same synced write.
    ///
    /// # Errors
    /// A RocksDB read or write error.
    pub fn commit_in_transaction(
        &self,
        entries: &[(DedupKey, Entry)],
        progress: &[Progress],
        changelog: &[Progress],
    ) -> Result<(), StoreError> {
        let mut partitions = Vec::with_capacity(progress.len());
        for p in progress {
            partitions.push((p.clone(), self.progress(&p.topic, p.partition)?));
        }
        let journal = Journal {
            partitions,
            keys: entries.iter().map(|(k, _)| k.clone()).collect(),
        };
        let mut batch = self.commit_batch(entries, progress, changelog);
        batch.put_cf(&self.cf(CF_PROGRESS), JOURNAL_KEY, journal.encode());
        self.write_synced(batch)
    }

    /// The journal of the last batch written by
    /// [`DedupStore::commit_in_transaction`], if not settled yet.
    ///
    /// # Errors
    /// A RocksDB read error, or a journal that cannot be read.
    pub fn journal(&self) -> Result<Option<Journal>, StoreError> {
        let Some(bytes) = self.db.get_cf(&self.cf(CF_PROGRESS), JOURNAL_KEY)? else {
            return Ok(None);
        };
        Journal::decode(&bytes)
            .map(Some)
            .ok_or_else(|| StoreError::Corrupt {
                key: "transaction journal".into(),
            })
    }

    /// Settles the journal: a committed transaction keeps its dedup
    /// records; an aborted one has them removed and each partition's
    /// stored progress put back. Synced.
    ///
    /// # Errors
    /// A RocksDB read or write error.
    pub fn settle_journal(&self, committed: bool) -> Result<(), StoreError> {
        let Some(journal) = self.journal()? else {
            return Ok(());
        };
        let mut batch = WriteBatch::default();
        batch.delete_cf(&self.cf(CF_PROGRESS), JOURNAL_KEY);
        if !committed {
            let dedup = self.cf(CF_DEDUP);
            for key in &journal.keys {
                batch.delete_cf(&dedup, &key.0);
            }
            let progress = self.cf(CF_PROGRESS);
            for (p, previous) in &journal.partitions {
                let key = partition_prefix(&p.topic, p.partition);
                match previous {
                    Some(o) => batch.put_cf(&progress, key, o.0.to_be_bytes()),
                    None => batch.delete_cf(&progress, key),
                }
            }
        }
        self.write_synced(batch)
    }

    /// Forgets the journal of a batch whose transaction committed. Not
    /// synced: should a power loss undo it, the next start finds the
    /// group's offsets past the batch and keeps its records anyway.
    ///
    /// # Errors
    /// A RocksDB write error.
    pub fn clear_journal(&self) -> Result<(), StoreError> {
        self.db.delete_cf(&self.cf(CF_PROGRESS), JOURNAL_KEY)?;
        Ok(())
    }

    pub(super) fn write_synced(&self, batch: WriteBatch) -> Result<(), StoreError> {
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.db.write_opt(batch, &opts)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::clock::ManualClock;
    use crate::record::IdemKey;

    fn progress(next: i64) -> Progress {
        Progress {
            topic: "t".into(),
            partition: Partition(0),
            next: Offset(next),
        }
    }

    fn entry() -> Entry {
        Entry {
            fingerprint: crate::decode::Fingerprint([1; 16]),
            first_seen_ms: 0,
            offset: Offset(5),
        }
    }

    #[test]
    fn journal_round_trips() {
        let journal = Journal {
            partitions: vec![(progress(9), Some(Offset(4))), (progress(3), None)],
            keys: vec![DedupKey(b"a\0b".to_vec()), DedupKey(Vec::new())],
        };
        assert_eq!(Journal::decode(&journal.encode()), Some(journal.clone()));
        let mut truncated = journal.encode();
        truncated.pop();
        assert_eq!(Journal::decode(&truncated), None);
    }

    #[test]
    fn an_aborted_transaction_takes_its_dedup_records_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = DedupStore::open(
            dir.path(),
            Duration::from_secs(60),
            Arc::new(ManualClock::new(0)),
        )
        .unwrap();
        let key = DedupKey::new("t", Partition(0), &IdemKey("k".into()));
        store.commit(&[], &[progress(5)], &[]).unwrap();
        store
            .commit_in_transaction(&[(key.clone(), entry())], &[progress(6)], &[])
            .unwrap();
        assert!(store.lookup(&[&key]).unwrap()[0].is_some());
        let journal = store.journal().unwrap().expect("journal written");
        assert!(!journal.committed(|_| Some(Offset(5))));
        assert!(journal.committed(|_| Some(Offset(6))));
        assert!(!journal.committed(|_| None));

        store.settle_journal(false).unwrap();
        assert_eq!(store.lookup(&[&key]).unwrap()[0], None);
        assert_eq!(store.progress("t", Partition(0)).unwrap(), Some(Offset(5)));
        assert_eq!(store.journal().unwrap(), None);
    }

    #[test]
    fn a_committed_transaction_keeps_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = DedupStore::open(
            dir.path(),
            Duration::from_secs(60),
            Arc::new(ManualClock::new(0)),
        )
        .unwrap();
        let key = DedupKey::new("t", Partition(0), &IdemKey("k".into()));
        store
            .commit_in_transaction(&[(key.clone(), entry())], &[progress(1)], &[])
            .unwrap();
        store.settle_journal(true).unwrap();
        assert!(store.lookup(&[&key]).unwrap()[0].is_some());
        assert_eq!(store.progress("t", Partition(0)).unwrap(), Some(Offset(1)));
        assert_eq!(store.journal().unwrap(), None);
        // Settling with no journal does nothing.
        store.settle_journal(false).unwrap();
        assert!(store.lookup(&[&key]).unwrap()[0].is_some());
    }
}
