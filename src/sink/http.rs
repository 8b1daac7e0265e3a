//! The HTTP webhook sink: one request per record.
//!
//! Why it is idempotent: every request carries the record's idempotency key
//! in the `Idempotency-Key` header (a configured header cannot replace it)
//! and the record's original payload bytes as its body, the same on every
//! retry and every replay. A receiver that honours the header applies each
//! key once; idem treats its "already done" answers as success.
//!
//! Answers:
//! - 2xx: applied. 409: the receiver already has this key (duplicate).
//! - 422: the receiver has this key with another body: a conflict,
//!   dead-lettered with reason `conflict`.
//! - 413: too large, dead-lettered with reason `too-large`; other 4xx
//!   (400, 410, 415...): dead-lettered with reason `sink-rejected`.
//! - 3xx, 401, 403, 404, 405, 407 and 421 say the sink is misconfigured,
//!   not the record: the batch fails as needing an operator and is
//!   retried. Redirects are never followed: a POST that a client turns
//!   into a GET of another page would be taken for an applied record.
//! - A key that an HTTP header cannot carry as it is (a control
//!   character, or whitespace at either end, which receivers trim) is
//!   refused: dead-lettered with reason `sink-rejected`.
//! - A key that is `.` or `..` where `{key}` is in the URL would name
//!   another resource (a path's parent): refused the same way.
//! - A failed TLS handshake (an untrusted certificate) needs an operator.
//! - 408, 429, 5xx, connection errors and timeouts: retried with
//!   exponential backoff and jitter, honouring `Retry-After` (seconds), up
//!   to `max_attempts`; then the batch fails as unavailable and is retried
//!   as a whole, holding the partition. A transient failure is never
//!   dead-lettered. The first record that fails so ends the batch at
//!   once (requests in flight are dropped), and a batch that has not
//!   finished within half of `max.poll.interval.ms` fails as unavailable
//!   too, so that the consumer polls again before the group would expel
//!   it, whatever the receiver does.
//!
//! Durability: a 2xx or 409 is the receiver's promise; idem records the key
//! and commits only after every request of the batch got one.
//!
//! Concurrency: up to `concurrency` requests at once, but records with the
//! same order key (the entity, or the idempotency key) are sent one after
//! another in offset order.

use std::collections::HashMap;
use std::time::Duration;

use futures::stream::{self, StreamExt, TryStreamExt};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use reqwest::{Method, StatusCode};
use serde_json::Value;

use super::{Sink, SinkError, SinkWrite, WriteOutcome};
use crate::config::{HttpSinkConfig, RetryConfig};
use crate::failpoint;
use crate::fault::{self, Fault};
use crate::pipeline::retry::Backoff;

pub struct HttpSink {
    runtime: tokio::runtime::Runtime,
    client: reqwest::Client,
    method: Method,
    url: String,
    headers: HeaderMap,
    concurrency: usize,
    max_attempts: u32,
    order_by: Option<String>,
    retry: RetryConfig,
    /// The longest one batch may take.
    budget: Duration,
}

/// What one answer means.
#[derive(Debug)]
enum Answer {
    Done(WriteOutcome),
    Retry {
        why: String,
        after: Option<Duration>,
    },
    Operator(String),
}

fn classify(status: StatusCode, retry_after: Option<Duration>) -> Answer {
    let code = status.as_u16();
    match code {
        200..=299 => Answer::Done(WriteOutcome::Applied),
        409 => Answer::Done(WriteOutcome::AlreadyPresent),
        422 => Answer::Done(WriteOutcome::Conflict(
            "the receiver holds this idempotency key with another body (HTTP 422)".into(),
        )),
        413 => Answer::Done(WriteOutcome::TooLarge(
            "the receiver answered HTTP 413".into(),
        )),
        _ => match fault::http_status(code) {
            Fault::Operator => Answer::Operator(format!(
                "the receiver answered HTTP {code}; check sink.url and sink.headers"
            )),
            Fault::Record => Answer::Done(WriteOutcome::Rejected(format!(
                "the receiver answered HTTP {code}"
            ))),
            Fault::Transient | Fault::Fatal => Answer::Retry {
                why: format!("HTTP {code}"),
                after: retry_after,
            },
        },
    }
}

/// The `Idempotency-Key` header for a key, or why a header cannot carry it
/// as it is: control characters are not allowed in a header, and
/// receivers trim whitespace at either end, which would make two keys one.
fn key_header(key: &str) -> Result<HeaderValue, String> {
    if key.starts_with([' ', '\t']) || key.ends_with([' ', '\t']) {
        return Err(
            "the idempotency key begins or ends with whitespace, which HTTP receivers trim \
             from the Idempotency-Key header"
                .to_string(),
        );
    }
    // Bytes past ASCII (UTF-8) are allowed as they are; control characters
    // other than tab are not.
    HeaderValue::from_bytes(key.as_bytes()).map_err(|_| {
        "the idempotency key holds a control character, which an HTTP header cannot carry"
            .to_string()
    })
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

impl HttpSink {
    /// Builds the client. Nothing is sent until the first batch.
    ///
    /// # Errors
    /// [`SinkError::NeedsOperator`] for a header that is not valid HTTP, or
    /// a client that cannot be built.
    pub fn open(
        config: &HttpSinkConfig,
        retry: RetryConfig,
        max_poll_interval: Duration,
    ) -> Result<HttpSink, SinkError> {
        let mut headers = HeaderMap::new();
        for (name, value) in &config.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| SinkError::NeedsOperator(format!("sink.headers.{name}: {e}")))?;
            let value = HeaderValue::from_str(value)
                .map_err(|e| SinkError::NeedsOperator(format!("sink.headers.{name}: {e}")))?;
            headers.insert(name, value);
        }
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.timeout_ms))
            .danger_accept_invalid_certs(config.insecure_skip_tls_verify)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| SinkError::NeedsOperator(format!("HTTP client: {e}")))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| SinkError::NeedsOperator(format!("async runtime: {e}")))?;
        Ok(HttpSink {
            runtime,
            client,
            method: Method::from_bytes(config.method.as_bytes()).expect("validated"),
            url: config.url.clone(),
            headers,
            concurrency: config.concurrency,
            max_attempts: config.max_attempts,
            order_by: config.order_by.clone(),
            retry,
            budget: max_poll_interval / 2,
        })
    }

    fn url_for(&self, write: &SinkWrite<'_>) -> String {
        self.url
            .replace("{key}", &encode(&write.key.0))
            .replace("{topic}", &encode(write.topic))
            .replace("{partition}", &write.partition.0.to_string())
            .replace("{offset}", &write.offset.0.to_string())
    }

    fn order_key(&self, write: &SinkWrite<'_>) -> String {
        match self.order_by.as_deref().and_then(|p| write.body.pointer(p)) {
            Some(Value::String(s)) => format!("e:{s}"),
            Some(v) => format!("e:{v}"),
            None => format!("k:{}", write.key.0),
        }
    }

    /// One record, with its retries.
    async fn send(&self, write: &SinkWrite<'_>) -> Result<WriteOutcome, SinkError> {
        if self.url.contains("{key}") && matches!(write.key.0.as_str(), "." | "..") {
            // A path segment `.` or `..` names this resource's parent:
            // the record would take effect on another resource.
            return Ok(WriteOutcome::Rejected(format!(
                "the idempotency key `{}` is a relative path segment in sink.url",
                write.key.0
            )));
        }
        let url = self.url_for(write);
        let key = match key_header(&write.key.0) {
            Ok(key) => key,
            Err(why) => return Ok(WriteOutcome::Rejected(why)),
        };
        let mut backoff = Backoff::new(self.retry);
        let mut last = String::new();
        for attempt in 1..=self.max_attempts {
            let request = self
                .client
                .request(self.method.clone(), &url)
                .headers(self.headers.clone())
                .header("Idempotency-Key", key.clone())
                .body(write.raw.to_vec());
            let answer = match request.send().await {
                Ok(response) => {
                    let after = response
                        .headers()
                        .get(RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(Duration::from_secs);
                    classify(response.status(), after)
                }
                // The URL may hold credentials: never in a message.
                Err(e) => {
                    let e = e.without_url();
                    if e.is_builder() {
                        // A request this record's values make unsendable.
                        return Ok(WriteOutcome::Rejected(format!(
                            "cannot build the request: {}",
                            fault::chain(&e)
                        )));
                    }
                    if fault::connection(&e) == Fault::Operator {
                        Answer::Operator(format!(
                            "{}; check the receiver's certificate, or \
                             sink.insecure_skip_tls_verify",
                            fault::chain(&e)
                        ))
                    } else {
                        // No answer at all (refused, reset, timed out):
                        // transient, as `fault::http_status` says of any
                        // status it cannot place.
                        Answer::Retry {
                            why: if e.is_timeout() {
                                "timed out".to_string()
                            } else {
                                format!("request failed: {}", fault::chain(&e))
                            },
                            after: None,
                        }
                    }
                }
            };
            match answer {
                Answer::Done(outcome) => return Ok(outcome),
                Answer::Operator(why) => return Err(SinkError::NeedsOperator(why)),
                Answer::Retry { why, after } => {
                    last = why;
                    if attempt < self.max_attempts {
                        let cap = Duration::from_millis(self.retry.max_backoff_ms);
                        let wait = after.map_or_else(|| backoff.next_delay(), |a| a.min(cap));
                        tokio::time::sleep(wait).await;
                    }
                }
            }
        }
        Err(SinkError::Unavailable(format!(
            "{}: {} attempts, last: {last}",
            crate::config::redact_url(&url),
            self.max_attempts
        )))
    }
}

impl Sink for HttpSink {
    fn name(&self) -> &'static str {
        "http"
    }

    fn apply(&mut self, batch: &[SinkWrite<'_>]) -> Result<Vec<WriteOutcome>, SinkError> {
        // Chains of records that must go in order; chains run side by side.
        let mut chains: Vec<Vec<usize>> = Vec::new();
        let mut chain_of: HashMap<String, usize> = HashMap::new();
        for (i, write) in batch.iter().enumerate() {
            let key = self.order_key(write);
            let c = *chain_of.entry(key).or_insert_with(|| {
                chains.push(Vec::new());
                chains.len() - 1
            });
            chains[c].push(i);
        }
        let this = &*self;
        // The first chain that fails ends the batch: `try_collect` drops
        // the requests still in flight instead of waiting out their
        // retries.
        let all = stream::iter(chains)
            .map(|chain| async move {
                let mut done = Vec::with_capacity(chain.len());
                for i in chain {
                    if i == batch.len() / 2 {
                        failpoint::hit("mid-sink-batch");
                    }
                    done.push((i, this.send(&batch[i]).await?));
                }
                Ok::<_, SinkError>(done)
            })
            .buffer_unordered(self.concurrency)
            .try_collect::<Vec<_>>();
        let results = self
            .runtime
            .block_on(async { tokio::time::timeout(self.budget, all).await })
            .map_err(|_| {
                SinkError::Unavailable(format!(
                    "the receiver did not answer the batch's {} requests within {:?}, half of \
                     max.poll.interval.ms; the batch is tried again (a slow receiver needs a \
                     smaller batch.max_records or a larger sink.concurrency)",
                    batch.len(),
                    self.budget
                ))
            })??;
        let mut outcomes: Vec<Option<WriteOutcome>> = vec![None; batch.len()];
        for done in results {
            for (i, outcome) in done {
                outcomes[i] = Some(outcome);
            }
        }
        Ok(outcomes
            .into_iter()
            .map(|o| o.expect("every record was sent"))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_classified_as_documented() {
        let done = |code| {
            matches!(
                classify(StatusCode::from_u16(code).unwrap(), None),
                Answer::Done(_)
            )
        };
        let retry = |code| {
            matches!(
                classify(StatusCode::from_u16(code).unwrap(), None),
                Answer::Retry { .. }
            )
        };
        let operator = |code| {
            matches!(
                classify(StatusCode::from_u16(code).unwrap(), None),
                Answer::Operator(_)
            )
        };
        assert!(
            done(200) && done(201) && done(204) && done(409) && done(422) && done(413) && done(400)
        );
        assert!(retry(408) && retry(429) && retry(500) && retry(503));
        assert!(operator(401) && operator(404));
        assert!(matches!(
            classify(StatusCode::CONFLICT, None),
            Answer::Done(WriteOutcome::AlreadyPresent)
        ));
        assert!(matches!(
            classify(StatusCode::UNPROCESSABLE_ENTITY, None),
            Answer::Done(WriteOutcome::Conflict(_))
        ));
    }

    #[test]
    fn keys_a_header_cannot_carry_are_refused() {
        assert!(key_header("order-7").is_ok());
        assert!(key_header("ordre-é 7\tx").is_ok());
        for bad in [
            "bad\nkey",
            "nul\0",
            "del\u{7f}",
            "order-7 ",
            " order-7",
            "\torder-7",
        ] {
            assert!(key_header(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn keys_are_percent_encoded_in_urls() {
        assert_eq!(encode("ord 1/é"), "ord%201%2F%C3%A9");
    }
}
