//! Decoding the next batch while the current one is written.
//!
//! Much of a batch's time is spent waiting: for the sink's and RocksDB's
//! syncs, for the changelog's acks. Decoding (parsing each body, its
//! fingerprint) is CPU alone and needs nothing the write path changes, so
//! when records are already waiting behind the batch in flight, they are
//! decoded on a thread of their own meanwhile. The dedup look-up and the
//! classification stay in the batch's own turn: they must see every
//! earlier batch's dedup records.
//!
//! One long-lived thread rather than one per batch: the allocator keeps a
//! heap per thread, and memory is freed fastest by the thread that
//! allocated it. So the same thread also frees what a batch leaves behind
//! (its records and their decoding), which also takes that work off the
//! pipeline's thread.

use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::JoinHandle;

use super::batch::{DecodedBatch, Decoder};
use crate::record::Record;

enum Job {
    Decode(Vec<Record>),
    Free(Box<dyn Send>),
}

pub struct DecodeAhead {
    /// Dropped first, which ends the thread.
    jobs: Option<Sender<Job>>,
    done: Receiver<(Vec<Record>, DecodedBatch)>,
    thread: Option<JoinHandle<()>>,
}

impl DecodeAhead {
    /// Starts the decoding thread.
    ///
    /// # Errors
    /// The thread cannot be started.
    pub fn start(decoder: Decoder) -> std::io::Result<Self> {
        let (jobs, inbox) = mpsc::channel::<Job>();
        let (outbox, done) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("idem-decode".into())
            .spawn(move || {
                for job in inbox {
                    match job {
                        Job::Decode(records) => {
                            let decoded = decoder.decode(&records);
                            if outbox.send((records, decoded)).is_err() {
                                return;
                            }
                        }
                        Job::Free(spent) => drop(spent),
                    }
                }
            })?;
        Ok(DecodeAhead {
            jobs: Some(jobs),
            done,
            thread: Some(thread),
        })
    }

    /// Runs `work` on this thread while `records` are decoded on the
    /// decoding thread; returns what `work` returned, the records, and
    /// their decoding (none for no records).
    pub fn overlap<T>(
        &self,
        records: Vec<Record>,
        work: impl FnOnce() -> T,
    ) -> (T, Vec<Record>, Option<DecodedBatch>) {
        if records.is_empty() {
            return (work(), records, None);
        }
        self.send(Job::Decode(records));
        let result = work();
        let (records, decoded) = self.done.recv().expect("the decoding thread ended");
        (result, records, Some(decoded))
    }

    /// Has `spent` freed on the decoding thread.
    pub fn free(&self, spent: impl Send + 'static) {
        self.send(Job::Free(Box::new(spent)));
    }

    fn send(&self, job: Job) {
        self.jobs
            .as_ref()
            .expect("the decoding thread runs until drop")
            .send(job)
            .expect("the decoding thread ended");
    }
}

impl Drop for DecodeAhead {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn config() -> Config {
        Config::for_tests("", r#"key = { from = "record-key" }"#)
    }

    fn record(offset: i64, value: &str) -> Record {
        let key = format!("K{offset}").into_bytes();
        Record::on_t(offset, Some(key), value.as_bytes().to_vec())
    }

    #[test]
    fn the_records_come_back_in_order_with_their_decoding_beside_the_work() {
        let decoder = Decoder::new(&config());
        let ahead = DecodeAhead::start(decoder.clone()).expect("thread");
        let records: Vec<Record> = (0..100)
            .map(|i| record(i, &format!(r#"{{"k":"K{i}","ver":1}}"#)))
            .chain([record(100, "not json")])
            .collect();
        let expected = records.clone();
        let (answer, back, decoded) = ahead.overlap(records, || 42);
        assert_eq!(answer, 42);
        assert_eq!(format!("{back:?}"), format!("{expected:?}"));
        let decoded = decoded.expect("records were given");
        assert_eq!(decoded.len(), 101);
        assert_eq!(
            format!("{decoded:?}"),
            format!("{:?}", decoder.decode(&expected)),
            "the same decoding as on the pipeline's thread"
        );
        let (_, back, decoded) = ahead.overlap(Vec::new(), || ());
        assert!(back.is_empty());
        assert!(decoded.is_none());
    }
}
