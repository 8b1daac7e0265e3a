//! Decoding: from a record's bytes to an event with an idempotency key and
//! a fingerprint, or to the reason it can never be processed.
//!
//! The rules, in the order they are applied:
//! 1. A payload over `limits.max_record_bytes` is `too-large`.
//! 2. A record with no value but a record key is a tombstone: it is
//!    counted as `filtered` and has no effect (deletes would let a replayed
//!    older version bring a row back; see the README).
//! 3. A record with neither value nor key is `empty`.
//! 4. The value must be JSON in UTF-8 (`invalid-json` otherwise), nested
//!    at most 128 deep, and use no object key named
//!    `$serde_json::private::Number` (see [`RESERVED_NUMBER_KEY`]).
//! 5. The idempotency key must be present (`missing-key`), UTF-8 and at
//!    most `limits.max_key_bytes` long (`bad-key`).

use std::cell::RefCell;

use serde_json::Value;
use xxhash_rust::xxh3::xxh3_128;

use crate::config::{KeySource, LimitsConfig};
use crate::record::{IdemKey, Record};

/// Why a record can never be processed. A small fixed set: it is a metric
/// label and a dead-letter header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeadLetterReason {
    TooLarge,
    Empty,
    InvalidJson,
    MissingKey,
    BadKey,
    /// Same idempotency key as an earlier record, different body.
    Conflict,
    /// The sink refused this record as invalid (bad type, constraint, a
    /// missing entity key or version).
    SinkRejected,
}

impl DeadLetterReason {
    pub const ALL: [DeadLetterReason; 7] = [
        DeadLetterReason::TooLarge,
        DeadLetterReason::Empty,
        DeadLetterReason::InvalidJson,
        DeadLetterReason::MissingKey,
        DeadLetterReason::BadKey,
        DeadLetterReason::Conflict,
        DeadLetterReason::SinkRejected,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::TooLarge => "too-large",
            DeadLetterReason::Empty => "empty",
            DeadLetterReason::InvalidJson => "invalid-json",
            DeadLetterReason::MissingKey => "missing-key",
            DeadLetterReason::BadKey => "bad-key",
            DeadLetterReason::Conflict => "conflict",
            DeadLetterReason::SinkRejected => "sink-rejected",
        }
    }
}

/// A hash of the canonical payload: equal for the same event however it
/// was serialised, different for a different body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 16]);

/// A buffer larger than this is not kept for the next record, so that one
/// huge payload does not pin its size for the life of the thread.
const KEEP_BUFFER_BYTES: usize = 64 * 1024;

thread_local! {
    /// The canonical form is only hashed, never kept: one buffer per thread
    /// serves every record instead of an allocation per record.
    static CANONICAL: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(1024));
}

impl Fingerprint {
    pub fn of(value: &Value) -> Fingerprint {
        CANONICAL.with(|buffer| {
            let mut canonical = buffer.borrow_mut();
            canonical.clear();
            write_canonical(value, &mut canonical);
            let fingerprint = Fingerprint(xxh3_128(&canonical).to_be_bytes());
            if canonical.capacity() > KEEP_BUFFER_BYTES {
                *canonical = Vec::with_capacity(1024);
            }
            fingerprint
        })
    }

    pub fn to_hex(self) -> String {
        hex::encode(self.0)
    }
}

/// A record that decoded into an event.
#[derive(Debug, Clone)]
pub struct Event {
    pub key: IdemKey,
    pub fingerprint: Fingerprint,
    pub body: Value,
}

/// What decoding made of a record.
#[derive(Debug, Clone)]
pub enum Decoded {
    Event(Event),
    Tombstone,
    Invalid {
        reason: DeadLetterReason,
        detail: String,
    },
}

fn invalid(reason: DeadLetterReason, detail: impl Into<String>) -> Decoded {
    Decoded::Invalid {
        reason,
        detail: detail.into(),
    }
}

/// Decodes one record under its topic's key rule.
pub fn decode(record: &Record, key_source: &KeySource, limits: &LimitsConfig) -> Decoded {
    let Some(value) = record.value.as_deref() else {
        return if record.key.is_some() {
            Decoded::Tombstone
        } else {
            invalid(DeadLetterReason::Empty, "record has neither key nor value")
        };
    };
    if value.len() > limits.max_record_bytes {
        return invalid(
            DeadLetterReason::TooLarge,
            format!(
                "payload is {} bytes; limits.max_record_bytes is {}",
                value.len(),
                limits.max_record_bytes
            ),
        );
    }
    let body: Value = match serde_json::from_slice(value) {
        Ok(body) => body,
        Err(e) => return invalid(DeadLetterReason::InvalidJson, e.to_string()),
    };
    if uses_reserved_number_key(value) {
        return invalid(
            DeadLetterReason::InvalidJson,
            format!("an object key is `{RESERVED_NUMBER_KEY}`, which the JSON parser reserves"),
        );
    }
    let fingerprint = Fingerprint::of(&body);
    let key = match extract_key(record, &body, fingerprint, key_source) {
        Ok(key) => key,
        Err(invalid) => return invalid,
    };
    if key.0.len() > limits.max_key_bytes {
        return invalid(
            DeadLetterReason::BadKey,
            format!(
                "idempotency key is {} bytes; limits.max_key_bytes is {}",
                key.0.len(),
                limits.max_key_bytes
            ),
        );
    }
    if key.0.is_empty() {
        return invalid(DeadLetterReason::MissingKey, "idempotency key is empty");
    }
    Decoded::Event(Event {
        key,
        fingerprint,
        body,
    })
}

/// The object key by which serde_json, built with `arbitrary_precision`
/// (idem keeps every digit of a number), marks a number in transit: an
/// object whose first key it is, with a string of digits as its value,
/// is read as that number. `{"ver":{"$serde_json::private::Number":"7"}}`
/// would then be the same body as `{"ver":7}` (one fingerprint, one row),
/// and in any other place the key makes a canonical form that does not
/// parse back. A payload that uses it is refused as `invalid-json`.
pub const RESERVED_NUMBER_KEY: &str = "$serde_json::private::Number";

/// Whether valid JSON `text` has an object key that reads as
/// [`RESERVED_NUMBER_KEY`] once its escapes are undone.
fn uses_reserved_number_key(text: &[u8]) -> bool {
    let token = RESERVED_NUMBER_KEY.as_bytes();
    // The token has no character that a short escape (`\n`, `\/`...)
    // writes, so it can only be spelt out or contain `\u` escapes.
    let has = |needle: &[u8]| memchr::memmem::find(text, needle).is_some();
    if !has(token) && !has(b"\\u") {
        return false;
    }
    let mut i = 0;
    while i < text.len() {
        if text[i] != b'"' {
            i += 1;
            continue;
        }
        // A string literal from `start` to its closing quote at `i`.
        let start = i;
        let mut escaped = false;
        i += 1;
        while i < text.len() && (escaped || text[i] != b'"') {
            escaped = !escaped && text[i] == b'\\';
            i += 1;
        }
        let literal = &text[start..=i.min(text.len() - 1)];
        i += 1;
        let is_key = text[i.min(text.len())..]
            .iter()
            .find(|b| !b.is_ascii_whitespace())
            == Some(&b':');
        if is_key
            && serde_json::from_slice::<String>(literal).is_ok_and(|k| k == RESERVED_NUMBER_KEY)
        {
            return true;
        }
    }
    false
}

fn extract_key(
    record: &Record,
    body: &Value,
    fingerprint: Fingerprint,
    source: &KeySource,
) -> Result<IdemKey, Decoded> {
    match source {
        KeySource::Header { name } => {
            let header = record.header(name).ok_or_else(|| {
                invalid(DeadLetterReason::MissingKey, format!("no `{name}` header"))
            })?;
            let bytes = header.value.as_deref().ok_or_else(|| {
                invalid(
                    DeadLetterReason::MissingKey,
                    format!("`{name}` header is null"),
                )
            })?;
            utf8_key(bytes, || format!("`{name}` header"))
        }
        KeySource::RecordKey {} => {
            let bytes = record
                .key
                .as_deref()
                .ok_or_else(|| invalid(DeadLetterReason::MissingKey, "record key is null"))?;
            utf8_key(bytes, || "record key".to_string())
        }
        KeySource::Pointers { pointers } => pointer_key(body, pointers),
        KeySource::PayloadHash {} => Ok(IdemKey(format!("xxh3:{}", fingerprint.to_hex()))),
    }
}

/// `what` names the key's source in the error; it is only formatted for a
/// key that is not UTF-8, not for every record.
fn utf8_key(bytes: &[u8], what: impl FnOnce() -> String) -> Result<IdemKey, Decoded> {
    match std::str::from_utf8(bytes) {
        Ok(s) => Ok(IdemKey(s.to_string())),
        Err(e) => Err(invalid(
            DeadLetterReason::BadKey,
            format!("{} is not UTF-8: {e}", what()),
        )),
    }
}

fn pointer_key(body: &Value, pointers: &[String]) -> Result<IdemKey, Decoded> {
    let mut parts = Vec::with_capacity(pointers.len());
    for pointer in pointers {
        match body.pointer(pointer) {
            None | Some(Value::Null) => {
                return Err(invalid(
                    DeadLetterReason::MissingKey,
                    format!("payload has no value at {pointer}"),
                ))
            }
            Some(v @ (Value::String(_) | Value::Number(_) | Value::Bool(_))) => parts.push(v),
            Some(_) => {
                return Err(invalid(
                    DeadLetterReason::BadKey,
                    format!("value at {pointer} is an object or array, not a scalar"),
                ))
            }
        }
    }
    let key = match parts.as_slice() {
        [Value::String(s)] => s.clone(),
        [single] => single.to_string(),
        many => {
            let mut out = Vec::new();
            write_canonical(
                &Value::Array(many.iter().map(|v| (*v).clone()).collect()),
                &mut out,
            );
            String::from_utf8(out).expect("canonical JSON is UTF-8")
        }
    };
    Ok(IdemKey(key))
}

/// Writes JSON with object keys sorted and no whitespace. Written here
/// rather than relying on serde_json's map order, which a feature flag
/// anywhere in the dependency tree (`preserve_order`) would change.
pub fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            out.push(b'{');
            // serde_json's own map is sorted already: then the entries are
            // written as they come, without a sorted copy per object.
            if map.keys().is_sorted() {
                write_entries(map.iter(), out);
            } else {
                let mut entries: Vec<_> = map.iter().collect();
                entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
                write_entries(entries.into_iter(), out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(v, out);
            }
            out.push(b']');
        }
        scalar => serde_json::to_writer(&mut *out, scalar).expect("writing to a Vec cannot fail"),
    }
}

/// `"key":value` pairs, comma-separated, in the order given.
fn write_entries<'a>(entries: impl Iterator<Item = (&'a String, &'a Value)>, out: &mut Vec<u8>) {
    for (i, (k, v)) in entries.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        serde_json::to_writer(&mut *out, k).expect("writing to a Vec cannot fail");
        out.push(b':');
        write_canonical(v, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Header, Offset, Partition};

    fn record(value: Option<&[u8]>, key: Option<&[u8]>, headers: Vec<Header>) -> Record {
        Record {
            topic: "t".into(),
            partition: Partition(0),
            offset: Offset(0),
            timestamp_ms: None,
            key: key.map(<[u8]>::to_vec),
            value: value.map(<[u8]>::to_vec),
            headers,
        }
    }

    fn idem(value: &[u8]) -> Vec<Header> {
        vec![Header {
            name: "Idempotency-Key".into(),
            value: Some(value.to_vec()),
        }]
    }

    fn reason(d: &Decoded) -> Option<DeadLetterReason> {
        match d {
            Decoded::Invalid { reason, .. } => Some(*reason),
            _ => None,
        }
    }

    #[test]
    fn fingerprint_ignores_key_order_and_whitespace() {
        let a: Value = serde_json::from_str(r#"{"id":"ord-7","ver":1,"qty":5}"#).unwrap();
        let b: Value =
            serde_json::from_str("{ \"qty\" : 5,\n \"ver\":1, \"id\": \"ord-7\" }").unwrap();
        let c: Value = serde_json::from_str(r#"{"id":"ord-7","ver":1,"qty":50}"#).unwrap();
        assert_eq!(Fingerprint::of(&a), Fingerprint::of(&b));
        assert_ne!(Fingerprint::of(&a), Fingerprint::of(&c));
    }

    /// Numbers keep their digits: two amounts that differ beyond what a
    /// 64-bit float holds are two bodies, not one.
    #[test]
    fn big_numbers_keep_every_digit() {
        let a: Value = serde_json::from_str(r#"{"amount":12345678901234567890123}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"amount":12345678901234567890124}"#).unwrap();
        assert_ne!(Fingerprint::of(&a), Fingerprint::of(&b));
    }

    #[test]
    fn nested_objects_are_canonical_too() {
        let a: Value = serde_json::from_str(r#"{"a":{"y":1,"x":[{"q":1,"p":2}]}}"#).unwrap();
        let mut out = Vec::new();
        write_canonical(&a, &mut out);
        assert_eq!(out, br#"{"a":{"x":[{"p":2,"q":1}],"y":1}}"#);
    }

    /// Fingerprints are kept in dedup stores: a change of how they are
    /// computed would turn every stored key into a conflict. The canonical
    /// bytes and the hash of this body are pinned here, and a second body
    /// fingerprinted right after a large one (the reused buffer) must not
    /// see anything of the first.
    #[test]
    fn fingerprints_are_stable_across_versions() {
        let body = r#"{"qty":5, "id":"ord-7","ver":1,"n":{"b":[1,"x\"y"],"a":null}}"#;
        let value: Value = serde_json::from_str(body).unwrap();
        let canonical = br#"{"id":"ord-7","n":{"a":null,"b":[1,"x\"y"]},"qty":5,"ver":1}"#;
        let mut out = Vec::new();
        write_canonical(&value, &mut out);
        assert_eq!(out, canonical);
        assert_eq!(
            Fingerprint::of(&value),
            Fingerprint(xxh3_128(canonical).to_be_bytes())
        );
        assert_eq!(Fingerprint::of(&value).to_hex(), PINNED);

        let large: Value = serde_json::json!({ "pad": "x".repeat(200_000) });
        let _ = Fingerprint::of(&large);
        assert_eq!(Fingerprint::of(&value).to_hex(), PINNED);
    }

    const PINNED: &str = "800adaaf9d45cd754d4e7169b8477f9e";

    #[test]
    fn header_key_is_used() {
        let r = record(Some(br#"{"id":1}"#), None, idem(b"K1"));
        let Decoded::Event(e) = decode(&r, &KeySource::default(), &LimitsConfig::default()) else {
            panic!("expected an event");
        };
        assert_eq!(e.key.0, "K1");
    }

    #[test]
    fn truncated_json_is_invalid() {
        let r = record(Some(br#"{"id":"ord-2","qty":"#), None, idem(b"K"));
        let d = decode(&r, &KeySource::default(), &LimitsConfig::default());
        assert_eq!(reason(&d), Some(DeadLetterReason::InvalidJson));
    }

    #[test]
    fn raw_latin1_byte_in_string_is_invalid_json() {
        let r = record(Some(b"{\"id\":\"caf\xe9\"}"), None, idem(b"K"));
        let d = decode(&r, &KeySource::default(), &LimitsConfig::default());
        assert_eq!(reason(&d), Some(DeadLetterReason::InvalidJson));
    }

    #[test]
    fn non_utf8_header_is_bad_key() {
        let r = record(Some(br#"{"id":1}"#), None, idem(b"K\xff"));
        let d = decode(&r, &KeySource::default(), &LimitsConfig::default());
        assert_eq!(reason(&d), Some(DeadLetterReason::BadKey));
    }

    #[test]
    fn tombstone_and_empty() {
        let t = record(None, Some(b"ord-18"), vec![]);
        assert!(matches!(
            decode(&t, &KeySource::default(), &LimitsConfig::default()),
            Decoded::Tombstone
        ));
        let e = record(None, None, vec![]);
        let d = decode(&e, &KeySource::default(), &LimitsConfig::default());
        assert_eq!(reason(&d), Some(DeadLetterReason::Empty));
    }

    #[test]
    fn too_large_is_checked_before_parsing() {
        let limits = LimitsConfig {
            max_record_bytes: 10,
            ..LimitsConfig::default()
        };
        let r = record(Some(br#"{"id":"0123456789"}"#), None, idem(b"K"));
        assert_eq!(
            reason(&decode(&r, &KeySource::default(), &limits)),
            Some(DeadLetterReason::TooLarge)
        );
    }

    #[test]
    fn pointer_keys_do_not_collide() {
        let src = KeySource::Pointers {
            pointers: vec!["/a".into(), "/b".into()],
        };
        let one = record(Some(br#"{"a":"x:y","b":"z"}"#), None, vec![]);
        let two = record(Some(br#"{"a":"x","b":"y:z"}"#), None, vec![]);
        let key = |r: &Record| match decode(r, &src, &LimitsConfig::default()) {
            Decoded::Event(e) => e.key,
            other => panic!("{other:?}"),
        };
        assert_ne!(key(&one), key(&two));
        assert_eq!(key(&one).0, r#"["x:y","z"]"#);
    }

    #[test]
    fn missing_pointer_is_missing_key() {
        let src = KeySource::Pointers {
            pointers: vec!["/id".into()],
        };
        let r = record(Some(br#"{"other":1}"#), None, vec![]);
        assert_eq!(
            reason(&decode(&r, &src, &LimitsConfig::default())),
            Some(DeadLetterReason::MissingKey)
        );
    }

    /// A number written as serde_json's private object form was read as
    /// the number: `{"$serde_json::private::Number":"7"}` and `7` were one
    /// body, so a conflicting record counted as a duplicate.
    #[test]
    fn reserved_number_key_is_invalid_json_not_a_number() {
        let refused: [&[u8]; 4] = [
            br#"{"id":"a","ver":{"$serde_json::private::Number":"7"}}"#,
            br#"{"$serde_json::private::Number":"7"}"#,
            br#"{"a":1,"$serde_json::private::Number":"7"}"#,
            br#"{"id":"a","x":{"\u0024serde_json::private::Numbe\u0072" : "1"}}"#,
        ];
        for body in refused {
            let d = decode(
                &record(Some(body), None, idem(b"K")),
                &KeySource::default(),
                &LimitsConfig::default(),
            );
            assert_eq!(
                reason(&d),
                Some(DeadLetterReason::InvalidJson),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        // As a value, or next to escapes elsewhere, it is plain data.
        let accepted: [&[u8]; 2] = [
            br#"{"id":"a","note":"$serde_json::private::Number"}"#,
            br#"{"id":"caf\u00e9","note":"\"$serde_json::private::Number\":"}"#,
        ];
        for body in accepted {
            let d = decode(
                &record(Some(body), None, idem(b"K")),
                &KeySource::default(),
                &LimitsConfig::default(),
            );
            assert!(
                matches!(d, Decoded::Event(_)),
                "{}: {d:?}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn deeply_nested_json_is_rejected_without_overflow() {
        let deep = "[".repeat(100_000);
        let r = record(Some(deep.as_bytes()), None, idem(b"K"));
        assert_eq!(
            reason(&decode(
                &r,
                &KeySource::default(),
                &LimitsConfig {
                    max_record_bytes: 1 << 20,
                    ..LimitsConfig::default()
                }
            )),
            Some(DeadLetterReason::InvalidJson)
        );
    }
}
