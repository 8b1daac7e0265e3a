//! Domain values: a consumed record owned by idem, and the newtypes that
//! keep partitions, offsets and keys from being mixed up.

use std::fmt;

use rdkafka::message::{BorrowedMessage, Message};

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
        let headers = headers_of(message);
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

#[cfg(test)]
impl Record {
    /// A record of topic `t`, partition 0, with no headers: for unit tests.
    pub fn on_t(offset: i64, key: Option<Vec<u8>>, value: Vec<u8>) -> Record {
        Record {
            topic: "t".into(),
            partition: Partition(0),
            offset: Offset(offset),
            timestamp_ms: None,
            key,
            value: Some(value),
            headers: Vec::new(),
        }
    }
}

/// A message's headers, read through librdkafka's C API: rust-rdkafka's
/// header iterator panics on a name that is not UTF-8, and such a record
/// must be dead-lettered like any other, not stop the partition. A name
/// that is not UTF-8 is kept with U+FFFD in place of the bad bytes;
/// values are kept byte for byte.
fn headers_of(message: &BorrowedMessage<'_>) -> Vec<Header> {
    use rdkafka::bindings as rd;
    use rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR;

    let mut headers: *mut rd::rd_kafka_headers_t = std::ptr::null_mut();
    // SAFETY: `message.ptr()` is the live librdkafka message this borrow
    // stands for; librdkafka fills `headers` with a list the message owns,
    // valid while the message is.
    let err = unsafe { rd::rd_kafka_message_headers(message.ptr(), &mut headers) };
    if err != RD_KAFKA_RESP_ERR_NO_ERROR || headers.is_null() {
        return Vec::new();
    }
    // SAFETY: `headers` is the non-null list returned above.
    let count = unsafe { rd::rd_kafka_header_cnt(headers) };
    (0..count)
        .filter_map(|i| {
            let mut name: *const std::os::raw::c_char = std::ptr::null();
            let mut value: *const std::os::raw::c_void = std::ptr::null();
            let mut size = 0usize;
            // SAFETY: `i` is below the list's count; librdkafka points
            // `name` at a NUL-terminated string and `value` at `size` bytes
            // (or null), both owned by the message.
            let err = unsafe {
                rd::rd_kafka_header_get_all(headers, i, &mut name, &mut value, &mut size)
            };
            if err != RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
                return None;
            }
            // SAFETY: as above; both are copied before the message goes.
            let name = unsafe { std::ffi::CStr::from_ptr(name) }
                .to_string_lossy()
                .into_owned();
            let value = (!value.is_null()).then(|| {
                // SAFETY: `value` points at `size` bytes, see above.
                unsafe { std::slice::from_raw_parts(value.cast::<u8>(), size) }.to_vec()
            });
            Some(Header { name, value })
        })
        .collect()
}
