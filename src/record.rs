//! Domain values: a consumed record owned by idem, and the newtypes that
//! keep partitions, offsets and keys from being mixed up.

use std::fmt;

use rdkafka::message::{BorrowedMessage, Headers, Message};

/// A Kafka partition number.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Partition(pub i32);

/// A Kafka offset within a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Offset(pub i64);

impl Offset {
    /// The offset to commit after this record has been handled: Kafka's
    /// committed offset names the next record to read, not the last read.
    pub fn next(self) -> Offset {
        Offset(self.0 + 1)
    }
}

impl fmt::Display for Partition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for Offset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A record's idempotency key, always valid UTF-8.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdemKey(pub String);

impl fmt::Display for IdemKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One header; its value may be absent (a null header).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub name: String,
    pub value: Option<Vec<u8>>,
}

/// A consumed record with owned bytes, so that it can outlive the poll
/// that returned it and be dead-lettered exactly as it arrived.
#[derive(Debug, Clone)]
pub struct Record {
    pub topic: String,
    pub partition: Partition,
    pub offset: Offset,
    pub timestamp_ms: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<Header>,
}

impl Record {
    pub fn from_message(message: &BorrowedMessage<'_>) -> Record {
        // Sized up front: the headers' iterator gives no size hint, and a
        // record is copied on the consumer's thread before each poll.
        let headers = message
            .headers()
            .map(|hs| {
                let mut headers = Vec::with_capacity(hs.count());
                headers.extend(hs.iter().map(|h| Header {
                    name: h.key.to_string(),
                    value: h.value.map(<[u8]>::to_vec),
                }));
                headers
            })
            .unwrap_or_default();
        Record {
            topic: message.topic().to_string(),
            partition: Partition(message.partition()),
            offset: Offset(message.offset()),
            timestamp_ms: message.timestamp().to_millis(),
            key: message.key().map(<[u8]>::to_vec),
            value: message.payload().map(<[u8]>::to_vec),
            headers,
        }
    }

    /// Bytes this record weighs in a batch.
    pub fn size(&self) -> usize {
        self.key.as_ref().map_or(0, Vec::len) + self.value.as_ref().map_or(0, Vec::len)
    }

    /// The first header with this name (case-sensitive, as Kafka is).
    pub fn header(&self, name: &str) -> Option<&Header> {
        self.headers.iter().find(|h| h.name == name)
    }
}
