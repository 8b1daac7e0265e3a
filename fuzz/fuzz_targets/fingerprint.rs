//! Canonical fingerprints: for any payload idem accepts, the canonical
//! form must be JSON that parses back to the same value, be a fixed point,
//! and give the same fingerprint however the value is re-serialised (key
//! order, whitespace); any other bytes must be refused without a panic.

#![no_main]

use idem::config::{KeySource, LimitsConfig};
use idem::decode::{decode, write_canonical, Decoded, Fingerprint};
use idem::record::{Offset, Partition, Record};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    // The body as idem's decoding makes it (keyed by the payload's hash,
    // so that every payload idem accepts gets here).
    let record = Record {
        topic: "orders.v1".into(),
        partition: Partition(0),
        offset: Offset(0),
        timestamp_ms: None,
        key: None,
        value: Some(data.to_vec()),
        headers: Vec::new(),
    };
    let limits = LimitsConfig {
        max_record_bytes: usize::MAX,
        max_key_bytes: usize::MAX,
    };
    let Decoded::Event(event) = decode(&record, &KeySource::PayloadHash {}, &limits) else {
        return;
    };
    let value = event.body;
    assert_eq!(event.fingerprint, Fingerprint::of(&value));
    let mut canonical = Vec::new();
    write_canonical(&value, &mut canonical);
    let text = std::str::from_utf8(&canonical).expect("canonical JSON is UTF-8");
    assert!(
        !text.contains([' ', '\n', '\t', '\r']) || has_whitespace_in_strings(&value),
        "whitespace outside strings: {text}"
    );

    // It parses back to the same value, and is its own canonical form.
    let back: Value = serde_json::from_str(text).expect("canonical JSON parses");
    assert_eq!(back, value, "canonical form changed the value");
    let mut again = Vec::new();
    write_canonical(&back, &mut again);
    assert_eq!(again, canonical, "canonical form is not a fixed point");

    // The same event re-serialised: pretty, and with every object's keys
    // written in reverse order with extra whitespace.
    let fingerprint = Fingerprint::of(&value);
    let pretty = serde_json::to_string_pretty(&value).unwrap();
    let pretty: Value = serde_json::from_str(&pretty).unwrap();
    assert_eq!(Fingerprint::of(&pretty), fingerprint);
    let mut reversed = String::new();
    write_reversed(&value, &mut reversed);
    let reversed: Value = serde_json::from_str(&reversed).expect("reversed JSON parses");
    assert_eq!(Fingerprint::of(&reversed), fingerprint);
});

fn has_whitespace_in_strings(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains([' ', '\n', '\t', '\r']),
        Value::Array(items) => items.iter().any(has_whitespace_in_strings),
        Value::Object(map) => map
            .iter()
            .any(|(k, v)| k.contains([' ', '\n', '\t', '\r']) || has_whitespace_in_strings(v)),
        _ => false,
    }
}

fn write_reversed(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            out.push_str("{ ");
            for (i, (k, v)) in map.iter().rev().enumerate() {
                if i > 0 {
                    out.push_str(" ,\n\t");
                }
                out.push_str(&serde_json::to_string(k).unwrap());
                out.push_str(" : ");
                write_reversed(v, out);
            }
            out.push_str(" }");
        }
        Value::Array(items) => {
            out.push_str("[ ");
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(" , ");
                }
                write_reversed(v, out);
            }
            out.push_str(" ]");
        }
        scalar => out.push_str(&serde_json::to_string(scalar).unwrap()),
    }
}
