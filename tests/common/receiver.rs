//! A local HTTP receiver on 127.0.0.1 for the HTTP sink's tests: it
//! records every request and applies each idempotency key once, as a
//! receiver that honours `Idempotency-Key` does.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::any;
use axum::Router;

/// What the receiver saw and did.
#[derive(Default)]
pub struct Seen {
    /// Every request: (idempotency key, body).
    pub requests: Mutex<Vec<(String, Vec<u8>)>>,
    /// The effect of each key: the body it was first applied with.
    pub effects: Mutex<HashMap<String, Vec<u8>>>,
    /// How many effects were applied (must equal the number of keys).
    pub applied: AtomicU64,
    pub delay_ms: AtomicU64,
    pub down: AtomicBool,
    /// Accept requests and never answer them.
    pub hang: AtomicBool,
    /// Answer with a redirect to `/landing`, which answers 200 to a GET,
    /// as an auth gateway or an http-to-https redirect would.
    pub redirect: AtomicBool,
    pub max_body: AtomicUsize,
}

pub struct Receiver {
    pub port: u16,
    pub seen: Arc<Seen>,
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
    if seen.hang.load(Ordering::SeqCst) {
        std::future::pending::<()>().await;
    }
    if seen.redirect.load(Ordering::SeqCst) {
        out.insert("location", "/landing".parse().unwrap());
        return (StatusCode::FOUND, out, "moved");
    }
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
    pub fn start() -> Receiver {
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
            .route("/landing", any(|| async { "welcome" }))
            .layer(DefaultBodyLimit::max(16 << 20))
            .with_state(Arc::clone(&seen));
        runtime.spawn(async move { axum::serve(listener, app).await });
        Receiver {
            port,
            seen,
            _runtime: runtime,
        }
    }

    pub fn applied(&self) -> u64 {
        self.seen.applied.load(Ordering::SeqCst)
    }

    /// Every key's requests carried one body only: retries and replays
    /// resend the same bytes.
    pub fn assert_one_body_per_key(&self) {
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

impl Receiver {
    /// The HTTP sink section that sends to this receiver.
    pub fn sink(&self, concurrency: usize) -> String {
        format!(
            "[sink]\nkind = \"http\"\nurl = \"http://127.0.0.1:{}/orders/{{key}}\"\n\
             concurrency = {concurrency}\nmax_attempts = 3\ntimeout_ms = 20000\n",
            self.port
        )
    }

    /// The keys applied, with their bodies.
    pub fn effects(&self) -> HashMap<String, Vec<u8>> {
        self.seen.effects.lock().unwrap().clone()
    }

    pub fn requests(&self) -> usize {
        self.seen.requests.lock().unwrap().len()
    }
}
