//! Hostile input through the real broker and the real binary: every kind of
//! malformed record in shared/CASES.md and more (JSON nested 100,000 deep,
//! huge strings and headers, numbers beyond 64 bits, bytes that are not
//! UTF-8 in keys, header values and payloads, empty and null bodies, a
//! missing or broken idempotency key under each key source). Nothing may
//! panic or stop the process; each record is applied, filtered or
//! dead-lettered with its reason; the outcomes add up and the committed
//! offsets reach the end of every partition.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{c_char, c_void, CStr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{
    bootstrap, create_topic_with, end_offsets, read_all, send_waiting, unique, wait_for, Binary,
    Fixture, Mode,
};
use rdkafka::bindings as rd;
use rdkafka::config::ClientConfig;
use rdkafka::message::{BorrowedHeaders, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

/// What must become of one record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// Applied; the row with this entity id exists afterwards.
    Applied(&'static str),
    Duplicate,
    /// Same key as an earlier record, another body: dead-lettered with
    /// reason `conflict`.
    Conflict,
    Stale,
    Filtered,
    /// Dead-lettered with this `idem.reason`.
    Dead(&'static str),
    /// Dead-lettered with this reason, too large for the dead-letter topic:
    /// its value (and its key and headers when `all`) are left out.
    DeadOmitted {
        reason: &'static str,
        all: bool,
    },
}

type RawHeaders = Vec<(Vec<u8>, Option<Vec<u8>>)>;

/// One hostile record: which input topic, and its raw bytes.
#[derive(Clone, Debug)]
struct Case {
    what: &'static str,
    /// Index into the fixture's input topics (see `Topics`).
    topic: usize,
    partition: i32,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    headers: RawHeaders,
    expect: Expect,
}

/// A record on the main topic, with its name as record key and no headers.
fn case(what: &'static str, value: Option<Vec<u8>>) -> Case {
    Case {
        what,
        topic: MAIN,
        partition: 0,
        key: Some(what.as_bytes().to_vec()),
        value,
        headers: Vec::new(),
        expect: Expect::Applied(""),
    }
}

impl Case {
    fn expect(mut self, expect: Expect) -> Case {
        self.expect = expect;
        self
    }
    fn on(mut self, topic: usize, partition: i32) -> Case {
        self.topic = topic;
        self.partition = partition;
        self
    }
    fn key(mut self, key: &[u8]) -> Case {
        self.key = Some(key.to_vec());
        self
    }
    fn no_key(mut self) -> Case {
        self.key = None;
        self
    }
    fn header(mut self, name: &[u8], value: &[u8]) -> Case {
        self.headers.push((name.to_vec(), Some(value.to_vec())));
        self
    }
    fn null_header(mut self, name: &[u8]) -> Case {
        self.headers.push((name.to_vec(), None));
        self
    }
    /// The `Idempotency-Key` header.
    fn idem(self, key: &[u8]) -> Case {
        self.header(b"Idempotency-Key", key)
    }
}

/// A valid order body for entity `id`.
fn order(id: &str) -> Vec<u8> {
    format!(r#"{{"id":"{id}","ver":1,"qty":1}}"#).into_bytes()
}

/// A body whose `field` is the raw JSON text `raw`.
fn order_with(id: &str, field: &str, raw: &str) -> Vec<u8> {
    let mut fields = BTreeMap::from([
        ("id", format!("\"{id}\"")),
        ("ver", "1".to_string()),
        ("qty", "1".to_string()),
    ]);
    fields.insert(field, raw.to_string());
    let inner: Vec<String> = fields.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
    format!("{{{}}}", inner.join(",")).into_bytes()
}

const MAIN: usize = 0;
const BY_RECORD_KEY: usize = 1;
const BY_POINTERS: usize = 2;
const BY_HASH: usize = 3;

/// The corpus. Entity ids are unique, so that every applied record is a
/// row of its own and no version guard interferes.
fn corpus() -> Vec<Case> {
    use Expect::*;
    let ok = |what: &'static str| {
        case(what, Some(order(what)))
            .idem(what.as_bytes())
            .expect(Applied(what))
    };
    let poison = |what: &'static str, value: &[u8]| {
        case(what, Some(value.to_vec()))
            .idem(what.as_bytes())
            .expect(Dead("invalid-json"))
    };
    let body = |what: &'static str, value: Vec<u8>, expect: Expect| {
        case(what, Some(value)).idem(what.as_bytes()).expect(expect)
    };
    let deep = |open: &str, close: &str, n: usize| {
        let mut s = open.repeat(n);
        s.push('1');
        s.push_str(&close.repeat(n));
        s
    };
    let big_headers = |c: Case, count: usize, size: usize| {
        (0..count).fold(c, |c, i| {
            c.header(format!("h{i}").as_bytes(), &vec![b'h'; size])
        })
    };
    let two_pow_70 = "1180591620717411303424";

    vec![
        ok("baseline-p0"),
        ok("baseline-p1").on(MAIN, 1),
        // Not JSON, or not only JSON.
        poison("truncated", br#"{"id":"truncated","qty":"#),
        poison("not-json", b"not json"),
        poison("empty-body", b""),
        poison("whitespace-body", b" \n\t "),
        poison(
            "trailing-garbage",
            br#"{"id":"trailing-garbage","ver":1,"qty":1} x"#,
        ),
        poison("two-documents", br#"{"id":"a","ver":1}{"id":"b","ver":1}"#),
        poison("nan", br#"{"id":"nan","ver":1,"qty":NaN}"#),
        poison("infinity", br#"{"id":"infinity","ver":1,"qty":Infinity}"#),
        poison(
            "raw-control-char",
            b"{\"id\":\"raw-control-char\",\"ver\":1,\"n\":\"a\x01b\"}",
        ),
        // Not UTF-8 inside the payload.
        poison(
            "latin1-in-string",
            b"{\"id\":\"caf\xe9\",\"ver\":1,\"qty\":1}",
        ),
        poison(
            "ff-outside-string",
            b"{\"id\":\"ff\",\"ver\":1,\xff\"qty\":1}",
        ),
        poison(
            "overlong-slash",
            b"{\"id\":\"x\xc0\xaf\",\"ver\":1,\"qty\":1}",
        ),
        poison(
            "utf8-surrogate",
            b"{\"id\":\"x\xed\xa0\x80\",\"ver\":1,\"qty\":1}",
        ),
        poison("cut-multibyte", b"{\"id\":\"caf\xc3\",\"ver\":1,\"qty\":1}"),
        poison(
            "lone-surrogate-escape",
            br#"{"id":"x\ud800","ver":1,"qty":1}"#,
        ),
        poison("bom", b"\xef\xbb\xbf{\"id\":\"bom\",\"ver\":1,\"qty\":1}"),
        poison("utf16", b"{\x00\"\x00i\x00d\x00\"\x00:\x001\x00}\x00"),
        // Nesting: 100,000 levels, and just over idem's 128.
        poison("deep-arrays", deep("[", "]", 100_000).as_bytes()),
        poison("deep-objects", deep("{\"a\":", "}", 100_000).as_bytes()),
        poison("deep-unclosed", "[".repeat(100_000).as_bytes()),
        poison(
            "deep-200-field",
            &order_with("deep-200-field", "deep", &deep("[", "]", 200)),
        ),
        body(
            "deep-100-field",
            order_with("deep-100-field", "deep", &deep("[", "]", 100)),
            Applied("deep-100-field"),
        ),
        // The parser's private name for arbitrary-precision numbers is no
        // way to smuggle a number in as an object.
        poison(
            "reserved-number-key",
            br#"{"id":"reserved-number-key","ver":{"$serde_json::private::Number":"7"},"qty":1}"#,
        ),
        // Huge strings: under the limit, over it, and over the dead-letter
        // topic's 1 MB too.
        body(
            "string-900k",
            order_with(
                "string-900k",
                "note",
                &format!("\"{}\"", "x".repeat(900_000)),
            ),
            Applied("string-900k"),
        ),
        body(
            "string-2m",
            order_with(
                "string-2m",
                "note",
                &format!("\"{}\"", "x".repeat(2_000_000)),
            ),
            DeadOmitted {
                reason: "too-large",
                all: false,
            },
        ),
        // Numbers out of range: fine as data, refused as a version.
        body(
            "qty-1e400",
            order_with("qty-1e400", "qty", "1e400"),
            Applied("qty-1e400"),
        ),
        body(
            "qty--1e400",
            order_with("qty--1e400", "qty", "-1e400"),
            Applied("qty--1e400"),
        ),
        body(
            "qty-2^70",
            order_with("qty-2^70", "qty", two_pow_70),
            Applied("qty-2^70"),
        ),
        body(
            "qty-10k-digits",
            order_with("qty-10k-digits", "qty", &format!("1{}", "0".repeat(10_000))),
            Applied("qty-10k-digits"),
        ),
        body(
            "qty--0",
            order_with("qty--0", "qty", "-0"),
            Applied("qty--0"),
        ),
        body(
            "ver-i64-max",
            order_with("ver-i64-max", "ver", "9223372036854775807"),
            Applied("ver-i64-max"),
        ),
        body(
            "ver-2^70",
            order_with("ver-2^70", "ver", two_pow_70),
            Dead("sink-rejected"),
        ),
        body(
            "ver-1e400",
            order_with("ver-1e400", "ver", "1e400"),
            Dead("sink-rejected"),
        ),
        body(
            "ver-below-i64",
            order_with("ver-below-i64", "ver", "-9223372036854775809"),
            Dead("sink-rejected"),
        ),
        body(
            "ver-fraction",
            order_with("ver-fraction", "ver", "1.5"),
            Dead("sink-rejected"),
        ),
        body(
            "ver-string",
            order_with("ver-string", "ver", "\"2\""),
            Dead("sink-rejected"),
        ),
        // JSON, but not an order.
        body("top-array", b"[]".to_vec(), Dead("sink-rejected")),
        body(
            "top-string",
            b"\"just a string\"".to_vec(),
            Dead("sink-rejected"),
        ),
        body("top-number", b"42".to_vec(), Dead("sink-rejected")),
        body("json-null", b"null".to_vec(), Dead("sink-rejected")),
        body(
            "id-object",
            order_with("x", "id", r#"{"a":1}"#),
            Dead("sink-rejected"),
        ),
        body(
            "id-null",
            order_with("x", "id", "null"),
            Dead("sink-rejected"),
        ),
        body(
            "id-missing",
            br#"{"ver":1,"qty":1}"#.to_vec(),
            Dead("sink-rejected"),
        ),
        body(
            "duplicate-json-key",
            br#"{"id":"dupkey-a","id":"dupkey-b","ver":1,"qty":1}"#.to_vec(),
            Applied("dupkey-b"),
        ),
        body(
            "nul-escape",
            br#"{"id":"nul-escape","ver":1,"qty":1,"n":"a\u0000b"}"#.to_vec(),
            Applied("nul-escape"),
        ),
        // Null values and empty records.
        case("tombstone", None).idem(b"tombstone").expect(Filtered),
        case("null-everything", None).no_key().expect(Dead("empty")),
        case("null-with-header", None)
            .idem(b"null-with-header")
            .no_key()
            .expect(Dead("empty")),
        // The idempotency header, missing or broken.
        case("no-header", Some(order("no-header"))).expect(Dead("missing-key")),
        case("header-null", Some(order("header-null")))
            .null_header(b"Idempotency-Key")
            .expect(Dead("missing-key")),
        case("header-empty", Some(order("header-empty")))
            .idem(b"")
            .expect(Dead("missing-key")),
        case("header-case", Some(order("header-case")))
            .header(b"idempotency-key", b"header-case")
            .expect(Dead("missing-key")),
        case("header-not-utf8", Some(order("header-not-utf8")))
            .idem(b"K\xff\xfe")
            .expect(Dead("bad-key")),
        case("header-2000-bytes", Some(order("header-2000-bytes")))
            .idem(&[b'k'; 2000])
            .expect(Dead("bad-key")),
        case("header-twice", Some(order("header-twice")))
            .idem(b"header-twice")
            .idem(b"other")
            .expect(Applied("header-twice")),
        // Bytes that are not UTF-8 elsewhere: applied, or kept exactly in
        // the dead letter.
        ok("other-header-not-utf8").header(b"trace", b"\xff\x00\xc3"),
        poison("other-header-not-utf8-poison", b"{").header(b"trace", b"\xff\x00\xc3"),
        ok("record-key-not-utf8").key(b"\xff\xfe\xc0"),
        poison("record-key-not-utf8-poison", b"{").key(b"\xff\xfe\xc0"),
        poison("record-key-200k", b"{").key(&[b'r'; 200_000]),
        // Huge headers: 900 KB with a valid body; 1.5 MB with a poison body,
        // too large for the dead-letter topic even without its value.
        big_headers(ok("headers-900k"), 300, 3_000),
        big_headers(ok("headers-1000-small"), 1_000, 1),
        big_headers(poison("headers-1m5-poison", b"{"), 500, 3_000).expect(DeadOmitted {
            reason: "invalid-json",
            all: true,
        }),
        // C6 and C8 among the hostile ones: a key reused with another
        // body, the first body re-serialised, and an older version.
        case("conflict-first", Some(order("conflict-row")))
            .idem(b"conflict-k")
            .expect(Applied("conflict-row")),
        case(
            "conflict-second",
            Some(order_with("conflict-row", "qty", "2")),
        )
        .idem(b"conflict-k")
        .expect(Conflict),
        case(
            "conflict-reserialised",
            Some(b"{ \"ver\": 1, \"qty\": 1, \"id\": \"conflict-row\" }".to_vec()),
        )
        .idem(b"conflict-k")
        .expect(Duplicate),
        case("stale-new", Some(order_with("stale-row", "ver", "2")))
            .idem(b"stale-2")
            .expect(Applied("stale-row")),
        case("stale-old", Some(order("stale-row")))
            .idem(b"stale-1")
            .expect(Stale),
        ok("last-p0"),
        ok("last-p1").on(MAIN, 1),
        // The record key as the idempotency key.
        case("rk-ok", Some(order("rk-ok")))
            .on(BY_RECORD_KEY, 0)
            .expect(Applied("rk-ok")),
        case("rk-not-utf8", Some(order("rk-not-utf8")))
            .on(BY_RECORD_KEY, 0)
            .key(b"rk\xff\xfe")
            .expect(Dead("bad-key")),
        case("rk-null", Some(order("rk-null")))
            .on(BY_RECORD_KEY, 0)
            .no_key()
            .expect(Dead("missing-key")),
        case("rk-empty", Some(order("rk-empty")))
            .on(BY_RECORD_KEY, 0)
            .key(b"")
            .expect(Dead("missing-key")),
        case("rk-2000", Some(order("rk-2000")))
            .on(BY_RECORD_KEY, 0)
            .key(&[b'k'; 2000])
            .expect(Dead("bad-key")),
        case("rk-tombstone", None)
            .on(BY_RECORD_KEY, 0)
            .expect(Filtered),
        // Pointers ["/id", "/region"] as the idempotency key.
        case("ptr-ok", Some(order_with("ptr-ok", "region", "\"eu\"")))
            .on(BY_POINTERS, 0)
            .expect(Applied("ptr-ok")),
        case("ptr-missing", Some(order("ptr-missing")))
            .on(BY_POINTERS, 0)
            .expect(Dead("missing-key")),
        case("ptr-null", Some(order_with("ptr-null", "region", "null")))
            .on(BY_POINTERS, 0)
            .expect(Dead("missing-key")),
        case(
            "ptr-object",
            Some(order_with("ptr-object", "region", r#"{"a":1}"#)),
        )
        .on(BY_POINTERS, 0)
        .expect(Dead("bad-key")),
        case("ptr-array", Some(order_with("ptr-array", "region", "[1]")))
            .on(BY_POINTERS, 0)
            .expect(Dead("bad-key")),
        case(
            "ptr-id-2^70",
            Some(format!(r#"{{"id":{two_pow_70},"ver":1,"qty":1,"region":"eu"}}"#).into_bytes()),
        )
        .on(BY_POINTERS, 0)
        .expect(Applied(two_pow_70)),
        case(
            "ptr-long",
            Some(order_with(
                "ptr-long",
                "region",
                &format!("\"{}\"", "r".repeat(5_000)),
            )),
        )
        .on(BY_POINTERS, 0)
        .expect(Dead("bad-key")),
        case("ptr-top-array", Some(b"[]".to_vec()))
            .on(BY_POINTERS, 0)
            .expect(Dead("missing-key")),
        // A hash of the canonical payload as the idempotency key.
        case("hash-a", Some(order("hash-a")))
            .on(BY_HASH, 0)
            .expect(Applied("hash-a")),
        case(
            "hash-a-again",
            Some(b"{ \"qty\" : 1,\n  \"ver\":1, \"id\" : \"hash-a\" }".to_vec()),
        )
        .on(BY_HASH, 0)
        .expect(Duplicate),
        case("hash-1e400", Some(order_with("hash-1e400", "qty", "1e400")))
            .on(BY_HASH, 0)
            .expect(Applied("hash-1e400")),
        case("hash-empty-object", Some(b"{}".to_vec()))
            .on(BY_HASH, 0)
            .expect(Dead("sink-rejected")),
    ]
}

/// The fixture's four input topics, one per key source.
struct Topics {
    f: Fixture,
    names: [String; 4],
    partitions: [i32; 4],
}

const BIG_TOPIC: &[(&str, &str)] = &[("max.message.bytes", "5000000")];

impl Topics {
    fn new(name: &str) -> Topics {
        let f = Fixture::with_topic_config(name, BIG_TOPIC);
        let names = [
            f.topic.clone(),
            unique(&format!("{name}-record-key")),
            unique(&format!("{name}-pointers")),
            unique(&format!("{name}-hash")),
        ];
        for n in &names[1..] {
            create_topic_with(n, 1, BIG_TOPIC);
        }
        Topics {
            names,
            partitions: [f.partitions, 1, 1, 1],
            f,
        }
    }

    fn config(&self) -> PathBuf {
        let text = self.f.config_text(Mode::Upsert, "7d", "");
        let first = format!("[[topics]]\nname = \"{}\"\n", self.names[MAIN]);
        assert!(text.contains(&first));
        let all = format!(
            "{first}\n[[topics]]\nname = \"{}\"\nkey = {{ from = \"record-key\" }}\n\n\
             [[topics]]\nname = \"{}\"\nkey = {{ from = \"pointers\", pointers = [\"/id\", \"/region\"] }}\n\n\
             [[topics]]\nname = \"{}\"\nkey = {{ from = \"payload-hash\" }}\n",
            self.names[BY_RECORD_KEY], self.names[BY_POINTERS], self.names[BY_HASH]
        );
        self.f.write_text(&text.replace(&first, &all))
    }

    fn ends(&self) -> Vec<Vec<i64>> {
        (0..4)
            .map(|t| end_offsets(&self.names[t], self.partitions[t]))
            .collect()
    }

    fn committed(&self) -> Vec<Vec<i64>> {
        (0..4)
            .map(|t| common::committed(&self.f.group, &self.names[t], self.partitions[t]))
            .collect()
    }
}

fn producer() -> BaseProducer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("linger.ms", "5")
        .set("enable.idempotence", "true")
        .set("message.max.bytes", "6000000")
        .create()
        .expect("producer")
}

/// Headers with any bytes as names: rdkafka's own `Header` takes a `&str`
/// name, so the names go through librdkafka's C API.
fn raw_headers(headers: &RawHeaders) -> OwnedHeaders {
    let owned = OwnedHeaders::new_with_capacity(headers.len().max(1));
    // `as_borrowed` is a view of the same native headers object.
    let native = owned.as_borrowed() as *const BorrowedHeaders as *mut rd::rd_kafka_headers_t;
    for (name, value) in headers {
        let (ptr, len) = match value {
            Some(v) => (v.as_ptr() as *const c_void, v.len() as isize),
            None => (std::ptr::null(), 0),
        };
        // SAFETY: librdkafka copies the name and value; both outlive the call.
        let err = unsafe {
            rd::rd_kafka_header_add(
                native,
                name.as_ptr() as *const c_char,
                name.len() as isize,
                ptr,
                len,
            )
        };
        assert_eq!(err, rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR);
    }
    owned
}

/// A message's headers as raw bytes (rdkafka's reader would panic on a
/// name that is not UTF-8).
fn headers_of(m: &OwnedMessage) -> RawHeaders {
    let Some(headers) = m.headers() else {
        return Vec::new();
    };
    let native = headers.as_borrowed() as *const BorrowedHeaders as *const rd::rd_kafka_headers_t;
    let mut out = Vec::new();
    for idx in 0.. {
        let mut name: *const c_char = std::ptr::null();
        let mut value: *const c_void = std::ptr::null();
        let mut size = 0usize;
        // SAFETY: reading header `idx` of a live headers object.
        let err =
            unsafe { rd::rd_kafka_header_get_all(native, idx, &mut name, &mut value, &mut size) };
        if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
            break;
        }
        // SAFETY: librdkafka returns a NUL-terminated name and `size` bytes
        // of value, valid while the headers live.
        let name = unsafe { CStr::from_ptr(name) }.to_bytes().to_vec();
        let value = (!value.is_null())
            .then(|| unsafe { std::slice::from_raw_parts(value as *const u8, size) }.to_vec());
        out.push((name, value));
    }
    out
}

fn header<'a>(headers: &'a RawHeaders, name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .find(|(n, _)| n == name.as_bytes())
        .and_then(|(_, v)| v.as_deref())
}

fn produce(topics: &Topics, cases: &[Case]) {
    let producer = producer();
    for c in cases {
        let mut record = BaseRecord::<[u8], [u8]>::to(&topics.names[c.topic])
            .partition(c.partition)
            .headers(raw_headers(&c.headers));
        if let Some(k) = &c.key {
            record = record.key(k.as_slice());
        }
        if let Some(v) = &c.value {
            record = record.payload(v.as_slice());
        }
        send_waiting(&producer, record);
    }
    producer.flush(Duration::from_secs(60)).expect("flush");
}

/// Waits until the group committed the end of every partition, while the
/// process stays up.
fn wait_committed_to_end(idem: &mut Binary, topics: &Topics) {
    let ends = topics.ends();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        assert!(
            idem.alive(),
            "idem exited while reading hostile input:\n{}",
            idem.stderr()
        );
        // An empty partition has nothing to commit: no offset (-1) is its
        // end too.
        let committed: Vec<Vec<i64>> = topics
            .committed()
            .into_iter()
            .zip(&ends)
            .map(|(c, e)| {
                c.into_iter()
                    .zip(e)
                    .map(|(c, e)| if c == -1 && *e == 0 { 0 } else { c })
                    .collect()
            })
            .collect();
        if committed == ends {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "committed offsets {committed:?}, expected the ends {ends:?}\n{}",
            idem.stderr()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn assert_no_panic(idem: &Binary) {
    let stderr = idem.stderr();
    assert!(!stderr.contains("panicked"), "idem panicked:\n{stderr}");
}

/// Every kind of malformed record, through each key source: no panic, the
/// process keeps running, every record applied, filtered, a duplicate or
/// dead-lettered with its reason and its original bytes; the outcomes add
/// up; the committed offsets reach the end; a restart repeats nothing.
#[test]
fn hostile_corpus_is_applied_or_dead_lettered_and_never_blocks() {
    let topics = Topics::new("hostile");
    let cases = corpus();
    produce(&topics, &cases);
    let config = topics.config();
    let stderr = topics.f.dir.path().join("idem.stderr");
    let mut idem = Binary::start_logged(&config, "warn", &stderr);

    wait_committed_to_end(&mut idem, &topics);
    let total = cases.len() as u64;
    wait_for(Duration::from_secs(30), "records counted", || {
        idem.metric("idem_records_read_total", None) == Some(total)
    });
    assert!(idem.alive(), "idem exited:\n{}", idem.stderr());

    // I4: the outcomes match the corpus one by one, and add up.
    let count = |f: &dyn Fn(&Expect) -> bool| cases.iter().filter(|c| f(&c.expect)).count() as u64;
    let expected = [
        ("applied", count(&|e| matches!(e, Expect::Applied(_)))),
        ("duplicate", count(&|e| *e == Expect::Duplicate)),
        ("filtered", count(&|e| *e == Expect::Filtered)),
        (
            "dead_lettered",
            count(&|e| matches!(e, Expect::Dead(_) | Expect::DeadOmitted { .. })),
        ),
        ("conflict", count(&|e| *e == Expect::Conflict)),
        ("stale", count(&|e| *e == Expect::Stale)),
    ];
    let mut sum = 0;
    for (outcome, n) in expected {
        let got = idem
            .metric(
                "idem_records_total",
                Some(&format!("outcome=\"{outcome}\"")),
            )
            .unwrap();
        assert_eq!(got, n, "records counted {outcome}");
        sum += got;
    }
    assert_eq!(sum, total, "outcomes must add up to records read");

    // The rows: exactly the applied entities.
    let conn = rusqlite::Connection::open(topics.f.sink_path()).unwrap();
    let rows: BTreeSet<String> = conn
        .prepare("SELECT CAST(id AS TEXT) FROM orders")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let applied: BTreeSet<String> = cases
        .iter()
        .filter_map(|c| match c.expect {
            Expect::Applied(id) => Some(id.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(rows, applied);

    // The dead letters: one per dead-lettered record, found by source
    // topic, partition and offset, with its reason and its original bytes.
    check_dead_letters(&topics, &cases);
    let dead = count(&|e| {
        matches!(
            e,
            Expect::Dead(_) | Expect::DeadOmitted { .. } | Expect::Conflict
        )
    });
    assert_eq!(
        idem.metric("idem_dead_letters_total", None).unwrap(),
        dead,
        "idem_dead_letters_total"
    );
    assert_eq!(
        idem.metric("idem_dead_letter_failures_total", None),
        Some(0)
    );
    assert_no_panic(&idem);
    assert!(idem.stop().success(), "{}", idem.stderr());

    // A restart reads nothing again and dead-letters nothing twice.
    let mut idem = Binary::start_logged(&config, "warn", &stderr);
    let more = vec![case("after-restart", Some(order("after-restart")))
        .idem(b"after-restart")
        .expect(Expect::Applied("after-restart"))];
    produce(&topics, &more);
    wait_committed_to_end(&mut idem, &topics);
    wait_for(Duration::from_secs(30), "the new record counted", || {
        idem.metric("idem_records_read_total", None) == Some(1)
    });
    assert_eq!(
        idem.metric("idem_records_total", Some("outcome=\"applied\"")),
        Some(1)
    );
    assert_eq!(read_all(&topics.f.dead_letter_topic, 1).len() as u64, dead);
    assert_no_panic(&idem);
    assert!(idem.stop().success(), "{}", idem.stderr());
}

fn check_dead_letters(topics: &Topics, cases: &[Case]) {
    // Each case's offset: its place among the records of its partition.
    let mut next: BTreeMap<(usize, i32), i64> = BTreeMap::new();
    let mut by_source = BTreeMap::new();
    for c in cases {
        let offset = next.entry((c.topic, c.partition)).or_insert(0);
        by_source.insert(
            (topics.names[c.topic].clone(), c.partition, *offset),
            c.clone(),
        );
        *offset += 1;
    }
    let letters = read_all(&topics.f.dead_letter_topic, 1);
    let mut seen = BTreeSet::new();
    for m in &letters {
        let headers = headers_of(m);
        let text = |name: &str| {
            String::from_utf8(header(&headers, name).unwrap_or_default().to_vec()).unwrap()
        };
        let source = (
            text("idem.source.topic"),
            text("idem.source.partition").parse::<i32>().unwrap(),
            text("idem.source.offset").parse::<i64>().unwrap(),
        );
        let c = by_source
            .get(&source)
            .unwrap_or_else(|| panic!("a dead letter for no record: {source:?}"));
        assert!(
            seen.insert(source.clone()),
            "{}: dead-lettered twice",
            c.what
        );
        let (reason, omitted_value, omitted_all) = match c.expect {
            Expect::Dead(r) => (r, false, false),
            Expect::Conflict => ("conflict", false, false),
            Expect::DeadOmitted { reason, all } => (reason, true, all),
            other => panic!("{}: expected {other:?}, but dead-lettered", c.what),
        };
        assert_eq!(text("idem.reason"), reason, "{}", c.what);
        assert!(!text("idem.error").is_empty(), "{}: no idem.error", c.what);
        if omitted_value {
            assert!(m.payload().is_none(), "{}", c.what);
            assert!(
                header(&headers, "idem.value-omitted").is_some(),
                "{}",
                c.what
            );
        } else {
            assert_eq!(m.payload(), c.value.as_deref(), "{}: payload", c.what);
        }
        if omitted_all {
            assert!(m.key().is_none(), "{}", c.what);
            assert!(header(&headers, "idem.key-omitted").is_some(), "{}", c.what);
        } else {
            assert_eq!(m.key(), c.key.as_deref(), "{}: record key", c.what);
            // Header names that are not UTF-8 are kept with U+FFFD in
            // place of the bad bytes (see README, Security); values byte
            // for byte.
            let sent: Vec<_> = c
                .headers
                .iter()
                .map(|(name, value)| {
                    (
                        String::from_utf8_lossy(name).into_owned().into_bytes(),
                        value.clone(),
                    )
                })
                .collect();
            assert_eq!(
                &headers[..c.headers.len()],
                &sent[..],
                "{}: original headers, in order",
                c.what
            );
        }
    }
    let expected: BTreeSet<_> = by_source
        .iter()
        .filter(|(_, c)| {
            matches!(
                c.expect,
                Expect::Dead(_) | Expect::DeadOmitted { .. } | Expect::Conflict
            )
        })
        .map(|(s, _)| s.clone())
        .collect();
    let missing: Vec<_> = expected
        .difference(&seen)
        .map(|s| &by_source[s].what)
        .collect();
    assert!(missing.is_empty(), "not dead-lettered: {missing:?}");
}

/// A header *name* that is not UTF-8 must not stop idem: the record is
/// handled by the rules like any other (here: applied, since the name is
/// not the key header), and the partition goes on. (rust-rdkafka's own
/// header iterator would panic here; idem reads headers through
/// librdkafka's C API.)
#[test]
fn header_name_not_utf8_does_not_stop_idem() {
    let topics = Topics::new("header-name");
    let cases = vec![
        case("name-not-utf8", Some(order("name-not-utf8")))
            .idem(b"name-not-utf8")
            .header(b"tr\xffce", b"1")
            .expect(Expect::Applied("name-not-utf8")),
        case("name-not-utf8-poison", Some(b"{".to_vec()))
            .idem(b"name-not-utf8-poison")
            .header(b"tr\xffce", b"1")
            .expect(Expect::Dead("invalid-json")),
        case("after", Some(order("after")))
            .idem(b"after")
            .expect(Expect::Applied("after")),
    ];
    produce(&topics, &cases);
    let config = topics.config();
    let mut idem = Binary::start_logged(&config, "warn", &topics.f.dir.path().join("idem.stderr"));
    wait_committed_to_end(&mut idem, &topics);
    wait_for(Duration::from_secs(30), "records counted", || {
        idem.metric("idem_records_read_total", None) == Some(3)
    });
    assert_eq!(
        idem.metric("idem_records_total", Some("outcome=\"applied\"")),
        Some(2)
    );
    check_dead_letters(&topics, &cases);
    assert_no_panic(&idem);
    assert!(idem.stop().success());
}
