//! Decoding one record under each key source: any bytes in the record key,
//! the headers and the value must give an event, a tombstone or a reason,
//! never a panic, and an event must keep the rules of `idem::decode`.

#![no_main]

use arbitrary::Arbitrary;
use idem::config::{KeySource, LimitsConfig};
use idem::decode::{decode, DeadLetterReason, Decoded, Fingerprint};
use idem::record::{Header, Offset, Partition, Record};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
enum Source {
    Header(String),
    DefaultHeader,
    RecordKey,
    Pointers(Vec<String>),
    PayloadHash,
}

#[derive(Debug, Arbitrary)]
struct Input {
    source: Source,
    max_record_bytes: u16,
    max_key_bytes: u16,
    key: Option<Vec<u8>>,
    headers: Vec<(String, Option<Vec<u8>>)>,
    /// Last, so that the rest of the fuzzer's bytes become the payload.
    value: Option<Vec<u8>>,
}

fuzz_target!(|input: Input| {
    let source = match input.source {
        Source::Header(name) => KeySource::Header { name },
        Source::DefaultHeader => KeySource::default(),
        Source::RecordKey => KeySource::RecordKey {},
        Source::Pointers(pointers) => KeySource::Pointers { pointers },
        Source::PayloadHash => KeySource::PayloadHash {},
    };
    // The config refuses 0 for either limit.
    let limits = LimitsConfig {
        max_record_bytes: usize::from(input.max_record_bytes).max(1),
        max_key_bytes: usize::from(input.max_key_bytes).max(1),
    };
    let record = Record {
        topic: "orders.v1".into(),
        partition: Partition(0),
        offset: Offset(7),
        timestamp_ms: None,
        key: input.key,
        value: input.value,
        headers: input
            .headers
            .into_iter()
            .map(|(name, value)| Header { name, value })
            .collect(),
    };

    let decoded = decode(&record, &source, &limits);
    check(&record, &source, &limits, &decoded);

    // Decoding is a pure function of the record: a redelivery decodes alike.
    match (&decoded, &decode(&record, &source, &limits)) {
        (Decoded::Event(a), Decoded::Event(b)) => {
            assert_eq!(a.key, b.key);
            assert_eq!(a.fingerprint, b.fingerprint);
        }
        (Decoded::Tombstone, Decoded::Tombstone) => {}
        (Decoded::Invalid { reason: a, .. }, Decoded::Invalid { reason: b, .. }) => {
            assert_eq!(a, b)
        }
        (a, b) => panic!("decoded twice differently: {a:?} then {b:?}"),
    }
});

fn check(record: &Record, source: &KeySource, limits: &LimitsConfig, decoded: &Decoded) {
    match decoded {
        Decoded::Event(event) => {
            let value = record.value.as_deref().expect("an event has a value");
            assert!(value.len() <= limits.max_record_bytes);
            let body: serde_json::Value =
                serde_json::from_slice(value).expect("an event's value is JSON");
            assert_eq!(body, event.body);
            assert_eq!(event.fingerprint, Fingerprint::of(&event.body));
            assert!(!event.key.0.is_empty(), "empty key accepted");
            assert!(
                event.key.0.len() <= limits.max_key_bytes,
                "long key accepted"
            );
            match source {
                KeySource::Header { name } => {
                    let first = record.headers.iter().find(|h| &h.name == name);
                    let bytes = first.and_then(|h| h.value.as_deref());
                    assert_eq!(bytes, Some(event.key.0.as_bytes()), "not the first header");
                }
                KeySource::RecordKey {} => {
                    assert_eq!(record.key.as_deref(), Some(event.key.0.as_bytes()));
                }
                KeySource::PayloadHash {} => {
                    assert_eq!(event.key.0, format!("xxh3:{}", event.fingerprint.to_hex()));
                }
                KeySource::Pointers { .. } => {}
            }
        }
        Decoded::Tombstone => {
            assert!(record.value.is_none() && record.key.is_some());
        }
        Decoded::Invalid { reason, detail } => {
            assert!(!detail.is_empty(), "a reason without detail");
            assert!(
                !matches!(
                    reason,
                    DeadLetterReason::Conflict | DeadLetterReason::SinkRejected
                ),
                "decoding cannot know {reason:?}"
            );
            if record.value.is_none() {
                assert_eq!(*reason, DeadLetterReason::Empty);
            }
        }
    }
}
