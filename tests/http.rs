//! The HTTP sink against a local receiver (started by each test on
//! 127.0.0.1) that records every request and applies each idempotency key
//! once, and the real Kafka broker.

mod common;

use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::any;
use axum::Router;
use common::*;
use idem::config::Config;
use idem::outcome::Outcome;
use idem::pipeline::Pipeline;

/// What the receiver saw and did.
#[derive(Default)]
struct Seen {
    /// Every request: (idempotency key, body).
    requests: Mutex<Vec<(String, Vec<u8>)>>,
    /// The effect of each key: the body it was first applied with.
    effects: Mutex<HashMap<String, Vec<u8>>>,
    /// How many effects were applied (must equal the number of keys).
    applied: AtomicU64,
    delay_ms: AtomicU64,
    down: AtomicBool,
    max_body: AtomicUsize,
}

struct Receiver {
    port: u16,
    seen: Arc<Seen>,
    _runtime: tokio::runtime::Runtime,
}

async fn handle(
    State(seen): State<Arc<Seen>>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, HeaderMap, &'static str) {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    seen.requests
        .lock()
        .unwrap()
        .push((key.clone(), body.to_vec()));
    let mut out = HeaderMap::new();
    if seen.down.load(Ordering::SeqCst) {
        out.insert("retry-after", "0".parse().unwrap());
        return (StatusCode::SERVICE_UNAVAILABLE, out, "down");
    }
    if key.is_empty() {
        return (StatusCode::BAD_REQUEST, out, "no Idempotency-Key");
    }
    if body.len() > seen.max_body.load(Ordering::SeqCst) {
        return (StatusCode::PAYLOAD_TOO_LARGE, out, "too large");
    }
    let delay = seen.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let mut effects = seen.effects.lock().unwrap();
    match effects.get(&key) {
        Some(first) if *first == body.to_vec() => (StatusCode::OK, out, "already applied"),
        Some(_) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            out,
            "key reused with another body",
        ),
        None => {
            effects.insert(key, body.to_vec());
            seen.applied.fetch_add(1, Ordering::SeqCst);
            (StatusCode::CREATED, out, "applied")
        }
    }
}

impl Receiver {
    fn start() -> Receiver {
        let seen = Arc::new(Seen::default());
        seen.max_body.store(usize::MAX, Ordering::SeqCst);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let app = Router::new()
            .route("/orders/{key}", any(handle))
            .layer(DefaultBodyLimit::max(16 << 20))
            .with_state(Arc::clone(&seen));
        runtime.spawn(async move { axum::serve(listener, app).await });
        Receiver {
            port,
            seen,
            _runtime: runtime,
        }
    }

    fn applied(&self) -> u64 {
        self.seen.applied.load(Ordering::SeqCst)
    }

    /// Every key's requests carried one body only: retries and replays
    /// resend the same bytes.
    fn assert_one_body_per_key(&self) {
        let mut bodies: HashMap<String, Vec<u8>> = HashMap::new();
        for (key, body) in self.seen.requests.lock().unwrap().iter() {
            if let Some(first) = bodies.get(key) {
                assert_eq!(first, body, "key {key} was sent with two bodies");
            } else {
                bodies.insert(key.clone(), body.clone());
            }
        }
    }
}

fn http_sink(receiver: &Receiver, concurrency: usize) -> String {
    format!(
        "[sink]\nkind = \"http\"\nurl = \"http://127.0.0.1:{}/orders/{{key}}\"\n\
         concurrency = {concurrency}\nmax_attempts = 3\ntimeout_ms = 20000\n\n\
         [limits]\nmax_record_bytes = 4000000\n",
        receiver.port
    )
}

fn config(text: &str) -> Config {
    Config::parse(text, Path::new("http.toml")).expect("config")
}

/// A receiver outage is waited out with retries, never dead-lettered;
/// redeliveries and a full rebuild replay cause no second effect; every
/// request of a key carries the same body.
#[test]
fn http_effects_once_through_outage_duplicates_and_replay() {
    let receiver = Receiver::start();
    receiver.seen.down.store(true, Ordering::SeqCst);
    let f = Fixture::new("http");
    let mut records = Vec::new();
    for n in 0..100 {
        let rec = Rec::order(n % 2, &format!("K{n}"), &format!("ord-{n}"), 1, n as i64);
        records.push(rec.clone());
        if n % 5 == 0 {
            records.push(rec);
        }
    }
    produce(&f.topic, &records);
    let text = f.config_text_with_sink("7d", &http_sink(&receiver, 8));
    let run = Running::start(config(&text));
    wait_for(Duration::from_secs(60), "retries during the outage", || {
        run.metrics
            .sink_retries
            .with_label_values(&["http", "unavailable"])
            .get()
            >= 2
    });
    assert_eq!(f.committed(), vec![-1, -1], "committed during the outage");
    receiver.seen.down.store(false, Ordering::SeqCst);
    run.wait_read(120);
    f.wait_committed(&[60, 60]);
    assert_eq!(run.count(Outcome::Applied), 100);
    assert_eq!(run.count(Outcome::Duplicate), 20);
    assert_eq!(run.count(Outcome::DeadLettered), 0);
    run.stop();
    assert_eq!(receiver.applied(), 100);

    // Rebuild: every record is sent again; the receiver's answer for a
    // known key and body counts as done, and nothing is applied twice.
    let group = f.group.clone();
    let client = idem::replay::group_client(&bootstrap(), &Default::default(), &group).unwrap();
    let rows = idem::replay::plan(&client, &f.topic, None, idem::replay::Target::Earliest).unwrap();
    idem::replay::apply(&client, &f.topic, &rows).unwrap();
    let run = Running::start_with(Pipeline::new(config(&text)).with_rebuild(true));
    run.wait_read(120);
    run.stop();
    assert_eq!(receiver.applied(), 100, "a key was applied twice");
    assert!(receiver.seen.requests.lock().unwrap().len() >= 200);
    receiver.assert_one_body_per_key();
}

/// C1: a slow receiver (2 s a request), instance B joins after K2 was
/// acknowledged and before A committed. 5 effects, p0 committed at 5,
/// repeated requests carry the same key and body.
#[test]
fn c1_rebalance_while_a_batch_is_in_flight() {
    let receiver = Receiver::start();
    receiver.seen.delay_ms.store(2_000, Ordering::SeqCst);
    let f = Fixture::new("c1");
    produce(
        &f.topic,
        &(0..5)
            .map(|n| Rec::order(0, &format!("K{n}"), &format!("ord-{n}"), 1, 1))
            .collect::<Vec<_>>(),
    );
    let text = f.config_text_with_sink("7d", &http_sink(&receiver, 1));
    let a = f.write_text(&text);
    let mut instance_a = Binary::start(&a, None);
    wait_for(Duration::from_secs(90), "K2 acknowledged", || {
        receiver.applied() >= 3
    });
    assert_eq!(f.committed(), vec![-1, -1], "A committed before B joined");

    let b_text = f
        .config_text_with_sink("7d", &http_sink(&receiver, 1))
        .replace(
            &f.dedup_path().display().to_string(),
            &f.dir.path().join("dedup-b").display().to_string(),
        );
    let b = f.dir.path().join("idem-b.toml");
    std::fs::write(&b, b_text).unwrap();
    let mut instance_b = Binary::start(&b, None);
    f.wait_committed(&[5, -1]);
    assert!(instance_a.stop().success());
    assert!(instance_b.stop().success());
    assert_eq!(receiver.applied(), 5);
    receiver.assert_one_body_per_key();
}

/// C12 over HTTP: the receiver answers 413 for a 1.5 MiB body; that record
/// is dead-lettered as too-large, the next one delivered, p0 committed at 2.
#[test]
fn c12_http_413_is_dead_lettered_as_too_large() {
    let receiver = Receiver::start();
    receiver.seen.max_body.store(1 << 20, Ordering::SeqCst);
    let f = Fixture::with_topic_config("c12-http", &[("max.message.bytes", "3000000")]);
    let big = format!(
        r#"{{"id":"ord-1","ver":1,"note":"{}"}}"#,
        "x".repeat(1_500_000)
    );
    produce(
        &f.topic,
        &[
            Rec::order(0, "K1", "ord-1", 1, 1).with_value(big.as_bytes()),
            Rec::order(0, "K2", "ord-2", 1, 1),
        ],
    );
    let text = f.config_text_with_sink("7d", &http_sink(&receiver, 2));
    let run = Running::start(config(&text));
    run.wait_read(2);
    f.wait_committed(&[2, -1]);
    assert_eq!(run.count(Outcome::DeadLettered), 1);
    assert_eq!(run.count(Outcome::Applied), 1);
    run.stop();
    let letters = read_all(&f.dead_letter_topic, 1);
    assert_eq!(letters.len(), 1);
    assert_eq!(header(&letters[0], "idem.reason"), Some(&b"too-large"[..]));
    assert_eq!(receiver.applied(), 1);
}

/// The receiver already holds the key with another body (HTTP 422): a
/// conflict, dead-lettered, the receiver's effect unchanged.
#[test]
fn http_422_is_a_conflict() {
    let receiver = Receiver::start();
    receiver
        .seen
        .effects
        .lock()
        .unwrap()
        .insert("K7".into(), b"{\"other\":true}".to_vec());
    let f = Fixture::new("http-422");
    produce(&f.topic, &[Rec::order(0, "K7", "ord-7", 1, 5)]);
    let text = f.config_text_with_sink("7d", &http_sink(&receiver, 2));
    let run = Running::start(config(&text));
    run.wait_read(1);
    f.wait_committed(&[1, -1]);
    assert_eq!(run.count(Outcome::Conflict), 1);
    run.stop();
    let letters = read_all(&f.dead_letter_topic, 1);
    assert_eq!(header(&letters[0], "idem.reason"), Some(&b"conflict"[..]));
    assert_eq!(receiver.applied(), 0);
}

/// SIGKILL in the middle of a batch of requests and after the batch was
/// acknowledged: after the restart the receiver applied each key once.
#[test]
fn sigkill_during_http_delivery() {
    for point in ["mid-sink-batch", "after-sink-write"] {
        let receiver = Receiver::start();
        let f = Fixture::new(&format!("http-kill-{point}"));
        produce(
            &f.topic,
            &(0..6)
                .map(|n| Rec::order(0, &format!("K{n}"), &format!("ord-{n}"), 1, 1))
                .collect::<Vec<_>>(),
        );
        let config = f.write_text(&f.config_text_with_sink("7d", &http_sink(&receiver, 2)));
        let mut bin = Binary::start(&config, Some(point));
        let status = bin.wait(Duration::from_secs(90));
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{point}");
        let mut bin = Binary::start(&config, None);
        f.wait_committed(&[6, -1]);
        assert!(bin.stop().success());
        assert_eq!(receiver.applied(), 6, "{point}");
        receiver.assert_one_body_per_key();
    }
}
