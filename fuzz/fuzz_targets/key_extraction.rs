//! Key extraction from JSON pointers: a body made of fields the fuzzer
//! chooses (names with `/` and `~` included), keyed by one or several
//! pointers to them. The key must say exactly which values it came from, so
//! that two different tuples never share a key.

#![no_main]

use arbitrary::Arbitrary;
use idem::config::{KeySource, LimitsConfig};
use idem::decode::{decode, DeadLetterReason, Decoded, RESERVED_NUMBER_KEY};
use idem::record::{Offset, Partition, Record};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Number, Value};

#[derive(Debug, Arbitrary)]
enum Field {
    Str(String),
    Int(i64),
    /// Digits beyond 64 bits, kept exactly.
    Big(u64, u64),
    Float(f64),
    Bool(bool),
    Null,
    Object(Vec<(String, i32)>),
    Array(Vec<i32>),
}

impl Field {
    fn to_value(&self) -> Value {
        match self {
            Field::Str(s) => Value::String(s.clone()),
            Field::Int(n) => Value::from(*n),
            Field::Big(a, b) => {
                let digits = format!("{}{b:020}", a.max(&1));
                Value::Number(digits.parse::<Number>().expect("digits are a number"))
            }
            Field::Float(f) => Number::from_f64(*f).map_or(Value::Null, Value::Number),
            Field::Bool(b) => Value::Bool(*b),
            Field::Null => Value::Null,
            Field::Object(entries) => Value::Object(
                entries
                    .iter()
                    .map(|(k, v)| (k.clone(), Value::from(*v)))
                    .collect(),
            ),
            Field::Array(items) => Value::Array(items.iter().map(|v| Value::from(*v)).collect()),
        }
    }
}

#[derive(Debug, Arbitrary)]
struct Input {
    /// Fields of the body, each at `/<outer>/<inner>` or `/<inner>`.
    fields: Vec<(Option<String>, String, Field)>,
    /// Which fields the pointers name (index into `fields`, modulo).
    picks: Vec<u8>,
    /// A pointer to a field that does not exist.
    missing: Option<String>,
}

/// RFC 6901: `~` is written `~0` and `/` is written `~1`.
fn escape(segment: &str) -> String {
    segment.replace('~', "~0").replace('/', "~1")
}

fuzz_target!(|input: Input| {
    if input.fields.is_empty() || input.picks.is_empty() {
        return;
    }
    let mut body = Map::new();
    let mut paths = Vec::new();
    for (outer, inner, field) in &input.fields {
        match outer {
            Some(outer) => {
                let slot = body
                    .entry(outer.clone())
                    .or_insert_with(|| Value::Object(Map::new()));
                if let Value::Object(map) = slot {
                    map.insert(inner.clone(), field.to_value());
                    paths.push(format!("/{}/{}", escape(outer), escape(inner)));
                }
            }
            None => {
                body.insert(inner.clone(), field.to_value());
                paths.push(format!("/{}", escape(inner)));
            }
        }
    }
    if paths.is_empty() {
        return;
    }
    let mut pointers: Vec<String> = input
        .picks
        .iter()
        .map(|&i| paths[usize::from(i) % paths.len()].clone())
        .collect();
    if let Some(missing) = &input.missing {
        pointers.push(format!("/{}/{}", escape(missing), "\u{0}absent"));
    }
    let body = Value::Object(body);
    let bytes = serde_json::to_vec(&body).expect("serialising a Value");
    let record = Record {
        topic: "orders.v1".into(),
        partition: Partition(1),
        offset: Offset(0),
        timestamp_ms: None,
        key: None,
        value: Some(bytes),
        headers: Vec::new(),
    };
    let limits = LimitsConfig {
        max_record_bytes: usize::MAX,
        max_key_bytes: usize::MAX,
    };
    let source = KeySource::Pointers {
        pointers: pointers.clone(),
    };
    let decoded = decode(&record, &source, &limits);
    if let Decoded::Invalid {
        reason: DeadLetterReason::InvalidJson,
        ..
    } = decoded
    {
        // The only JSON serde_json writes that idem refuses: a field named
        // like the parser's private number marker.
        let text = String::from_utf8_lossy(record.value.as_ref().unwrap());
        assert!(text.contains(RESERVED_NUMBER_KEY), "refused: {text}");
        return;
    }
    // What the pointers find in the body as it is parsed back (a later
    // field of the same name replaces an earlier one).
    let parsed: Value = serde_json::from_slice(record.value.as_ref().unwrap())
        .expect("idem accepted a body that does not parse");
    let found: Vec<Option<&Value>> = pointers.iter().map(|p| parsed.pointer(p)).collect();

    match decoded {
        Decoded::Event(event) => {
            let values: Vec<&Value> = found
                .iter()
                .map(|v| v.expect("a key from a pointer that finds nothing"))
                .collect();
            for v in &values {
                assert!(
                    matches!(v, Value::String(_) | Value::Number(_) | Value::Bool(_)),
                    "a key from {v}"
                );
            }
            match values.as_slice() {
                [Value::String(s)] => assert_eq!(&event.key.0, s),
                [single] => assert_eq!(event.key.0, single.to_string()),
                many => {
                    // Several pointers: the key is a JSON array of exactly
                    // these values, so no two tuples can share it.
                    let back: Vec<Value> = serde_json::from_str(&event.key.0)
                        .expect("a key from several pointers is a JSON array");
                    let many: Vec<Value> = many.iter().map(|v| (*v).clone()).collect();
                    assert_eq!(back, many);
                }
            }
        }
        Decoded::Invalid { reason, .. } => match reason {
            DeadLetterReason::MissingKey => assert!(
                found.iter().any(|v| matches!(v, None | Some(Value::Null)))
                    || found
                        .iter()
                        .all(|v| v == &Some(&Value::String(String::new()))),
                "missing-key although every pointer found a value: {found:?}"
            ),
            DeadLetterReason::BadKey => assert!(
                found
                    .iter()
                    .any(|v| matches!(v, Some(Value::Object(_) | Value::Array(_)))),
                "bad-key although every value is a scalar: {found:?}"
            ),
            other => panic!("unexpected reason {other:?} for a valid JSON body"),
        },
        Decoded::Tombstone => panic!("a record with a value is not a tombstone"),
    }
});
