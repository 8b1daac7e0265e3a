//! The HTTP sink against a local receiver (started by each test on
//! 127.0.0.1) that records every request and applies each idempotency key
//! once, and the real Kafka broker.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::receiver::Receiver;
use common::*;
use idem::config::Config;
use idem::outcome::Outcome;
use idem::pipeline::Pipeline;

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

/// A receiver behind a redirect: the redirect is not followed (a POST
/// turned into a GET of a landing page would be taken for an applied
/// record); the batch waits as needing an operator, nothing is committed,
/// and once the receiver answers itself every record is applied once.
#[test]
fn a_redirect_is_never_taken_for_an_applied_record() {
    let receiver = Receiver::start();
    receiver.seen.redirect.store(true, Ordering::SeqCst);
    let f = Fixture::new("http-redirect");
    produce(
        &f.topic,
        &[
            Rec::order(0, "R1", "ord-1", 1, 1),
            Rec::order(0, "R2", "ord-2", 1, 1),
        ],
    );
    let text = f.config_text_with_sink("7d", &http_sink(&receiver, 2));
    let run = Running::start(config(&text));
    wait_for(Duration::from_secs(60), "a retried redirect", || {
        run.metrics
            .sink_retries
            .with_label_values(&["http", "needs-operator"])
            .get()
            >= 2
    });
    assert_eq!(run.count(Outcome::Applied), 0);
    assert_eq!(f.committed(), vec![-1, -1]);
    receiver.seen.redirect.store(false, Ordering::SeqCst);
    run.wait_read(2);
    f.wait_committed(&[2, -1]);
    assert_eq!(run.count(Outcome::Applied), 2);
    run.stop();
    assert_eq!(receiver.applied(), 2);
}

/// Keys an HTTP header cannot carry as they are (a control character,
/// whitespace at either end, which receivers trim) and a key that is a
/// relative path segment in the URL (`..`, the parent resource) are
/// dead-lettered as sink-rejected; they do not hold the records behind
/// them.
#[test]
fn keys_a_header_cannot_carry_are_dead_lettered() {
    let receiver = Receiver::start();
    let f = Fixture::new("http-bad-key");
    produce(
        &f.topic,
        &[
            Rec::order(0, "bad\nkey", "ord-1", 1, 1),
            Rec::order(0, "order-7 ", "ord-2", 1, 1),
            Rec::order(0, "..", "ord-4", 1, 1),
            Rec::order(0, "order-7", "ord-3", 1, 1),
        ],
    );
    let text = f.config_text_with_sink("7d", &http_sink(&receiver, 2));
    let run = Running::start(config(&text));
    run.wait_read(4);
    f.wait_committed(&[4, -1]);
    assert_eq!(run.count(Outcome::DeadLettered), 3);
    assert_eq!(run.count(Outcome::Applied), 1);
    run.stop();
    let letters = read_all(&f.dead_letter_topic, 1);
    assert_eq!(letters.len(), 3);
    assert!(letters
        .iter()
        .all(|l| header(l, "idem.reason") == Some(&b"sink-rejected"[..])));
    assert_eq!(
        receiver.effects().keys().collect::<Vec<_>>(),
        vec!["order-7"]
    );
}

/// A receiver that accepts connections and never answers: the batch ends
/// at its first failed request instead of waiting out every record's
/// timeouts, consumption pauses, and the instance stays in its group
/// (no revoke) for well over `max.poll.interval.ms`; once the receiver
/// answers, every record is applied once.
#[test]
fn a_receiver_that_never_answers_does_not_cost_the_group() {
    let receiver = Receiver::start();
    receiver.seen.hang.store(true, Ordering::SeqCst);
    let f = Fixture::new("http-hang");
    let records: Vec<Rec> = (0..60)
        .map(|i| Rec::order(0, &format!("H{i}"), &format!("ord-{i}"), 1, 1))
        .collect();
    produce(&f.topic, &records);
    let sink = format!(
        "[sink]\nkind = \"http\"\nurl = \"http://127.0.0.1:{}/orders/{{key}}\"\n\
         concurrency = 2\nmax_attempts = 2\ntimeout_ms = 1000\n",
        receiver.port
    );
    let text = f.config_text_with_sink("7d", &sink).replace(
        "session_timeout_ms = 6000",
        "session_timeout_ms = 6000\nproperties = { \"max.poll.interval.ms\" = \"8000\" }",
    );
    let run = Running::start(config(&text));
    let hung = std::time::Instant::now();
    // Old behaviour: 60 records / 2 at a time, each 2 x 1 s: a minute in
    // one call, expelled after 8 s. Waited here: 20 s of failed batches.
    wait_for(
        Duration::from_secs(60),
        "20 s of a hanging receiver",
        || {
            hung.elapsed() >= Duration::from_secs(20)
                && run
                    .metrics
                    .sink_retries
                    .with_label_values(&["http", "unavailable"])
                    .get()
                    >= 2
        },
    );
    assert_eq!(
        run.metrics.rebalances.with_label_values(&["revoke"]).get(),
        0,
        "the instance left its group while the receiver hung"
    );
    assert_eq!(f.committed(), vec![-1, -1]);
    receiver.seen.hang.store(false, Ordering::SeqCst);
    run.wait_read(60);
    f.wait_committed(&[60, -1]);
    assert_eq!(run.count(Outcome::Applied), 60);
    run.stop();
    assert_eq!(receiver.applied(), 60);
}
