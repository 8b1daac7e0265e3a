//! The transactional Kafka sink against the real broker, read back as a
//! downstream `read_committed` consumer would: each new record once, the
//! offsets moving only with committed outputs, SIGKILL at every point of
//! the transaction, C10 (transaction timeout, and a second producer with
//! the same transactional id) and C12's record too large for the output.

mod common;

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::Duration;

use common::*;
use idem::config::Config;
use idem::outcome::Outcome;

fn kafka_sink(output: &str, extra: &str) -> String {
    format!("[sink]\nkind = \"kafka\"\ntopic = \"{output}\"\n{extra}\n")
}

/// Output topic of one partition, beside the fixture's topics.
fn output_topic(f: &Fixture, configs: &[(&str, &str)]) -> String {
    let name = format!("{}.out", f.topic);
    create_topic_with(&name, 1, configs);
    name
}

/// How many times each idempotency key appears in the committed output.
fn outputs_by_key(topic: &str) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for m in read_committed(topic, 1) {
        let key =
            String::from_utf8(header(&m, "idem.key").expect("idem.key header").to_vec()).unwrap();
        *seen.entry(key).or_insert(0) += 1;
    }
    seen
}

fn once_each(keys: &[&str]) -> BTreeMap<String, usize> {
    keys.iter().map(|k| (k.to_string(), 1)).collect()
}

fn four_orders(f: &Fixture) {
    produce(
        &f.topic,
        &(0..4)
            .map(|n| Rec::order(0, &format!("K{n}"), &format!("ord-{n}"), 1, n))
            .collect::<Vec<_>>(),
    );
}

#[test]
fn kafka_sink_outputs_each_new_record_once() {
    let f = Fixture::new("ksink");
    let out = output_topic(&f, &[]);
    produce(
        &f.topic,
        &[
            Rec::order(0, "A1", "ord-1", 1, 1),
            Rec::order(0, "A1", "ord-1", 1, 1)
                .with_value(b"{ \"qty\":1, \"ver\":1, \"id\":\"ord-1\" }"),
            Rec::order(0, "A2", "ord-1", 2, 2),
            Rec::order(0, "P1", "x", 1, 1).with_value(b"{\"id\":"),
            Rec::order(0, "A1", "ord-1", 1, 99),
            Rec::order(1, "B1", "ord-2", 1, 5),
        ],
    );
    let text = f.config_text_with_sink("7d", &kafka_sink(&out, "key_from = \"/id\""));
    let run = Running::start(Config::parse(&text, Path::new("kafka.toml")).unwrap());
    run.wait_read(6);
    f.wait_committed(&[5, 1]);
    assert_eq!(run.count(Outcome::Applied), 3);
    assert_eq!(run.count(Outcome::Duplicate), 1);
    assert_eq!(run.count(Outcome::DeadLettered), 1);
    assert_eq!(run.count(Outcome::Conflict), 1);
    run.assert_outcomes_add_up();
    run.stop();

    let messages = read_committed(&out, 1);
    assert_eq!(messages.len(), 3);
    let first = messages
        .iter()
        .find(|m| header(m, "idem.key") == Some(&b"A1"[..]))
        .expect("A1 is in the output");
    use rdkafka::Message;
    assert_eq!(first.key(), Some(&b"ord-1"[..]), "key_from names the key");
    assert_eq!(
        first.payload(),
        Some(&br#"{"id":"ord-1","ver":1,"qty":1}"#[..]),
        "the payload bytes are passed on unchanged"
    );
    assert_eq!(header(first, "idem.source.offset"), Some(&b"0"[..]));
    assert_eq!(outputs_by_key(&out), once_each(&["A1", "A2", "B1"]));
    assert_eq!(read_all(&f.dead_letter_topic, 1).len(), 2);
    let store = idem::dedup::DedupStore::open_read_only(
        &f.dedup_path(),
        Duration::from_secs(7 * 86_400),
        std::sync::Arc::new(idem::clock::SystemClock),
    )
    .unwrap();
    assert_eq!(
        store.journal().unwrap(),
        None,
        "a clean stop leaves no transaction journal behind"
    );
}

#[test]
fn c12_a_record_too_large_for_the_output_is_dead_lettered() {
    let f = Fixture::new("ksink-large");
    let out = output_topic(&f, &[("max.message.bytes", "4000")]);
    let big = format!(
        r#"{{"id":"ord-big","ver":1,"qty":1,"pad":"{}"}}"#,
        "x".repeat(8_000)
    );
    produce(
        &f.topic,
        &[
            Rec::order(0, "S1", "ord-1", 1, 1),
            Rec::order(0, "BIG", "ord-big", 1, 1).with_value(big.as_bytes()),
            Rec::order(0, "S2", "ord-2", 1, 1),
        ],
    );
    let text = f.config_text_with_sink("7d", &kafka_sink(&out, ""));
    let run = Running::start(Config::parse(&text, Path::new("kafka.toml")).unwrap());
    run.wait_read(3);
    f.wait_committed(&[3, -1]);
    assert_eq!(run.count(Outcome::Applied), 2);
    assert_eq!(run.count(Outcome::DeadLettered), 1);
    run.stop();
    assert_eq!(outputs_by_key(&out), once_each(&["S1", "S2"]));
    let letters = read_all(&f.dead_letter_topic, 1);
    assert_eq!(letters.len(), 1);
    assert_eq!(header(&letters[0], "idem.reason"), Some(&b"too-large"[..]));
}

#[test]
fn sigkill_at_every_point_of_the_transaction() {
    for point in [
        "mid-sink-batch",
        "after-sink-write",
        "after-dedup-write",
        "before-transaction-commit",
    ] {
        let f = Fixture::new(&format!("ksink-kill-{point}"));
        let out = output_topic(&f, &[]);
        four_orders(&f);
        let config = f.write_text(&f.config_text_with_sink("7d", &kafka_sink(&out, "")));
        let mut bin = Binary::start(&config, Some(point));
        let status = bin.wait(Duration::from_secs(90));
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{point}");
        if point != "before-transaction-commit" {
            // (After that point the broker holds the offsets in the open
            // transaction and answers no offset fetch until it ends.)
            assert_eq!(f.committed(), vec![-1, -1], "{point}: nothing committed");
        }
        assert!(
            outputs_by_key(&out).is_empty(),
            "{point}: no output visible before its transaction commits"
        );

        let mut bin = Binary::start(&config, None);
        f.wait_committed(&[4, -1]);
        assert!(bin.stop().success());
        assert_eq!(
            outputs_by_key(&out),
            once_each(&["K0", "K1", "K2", "K3"]),
            "{point}"
        );
        // A replay afterwards produces nothing more.
        let replay = idem(&[
            "replay",
            "--config",
            config.to_str().unwrap(),
            "--topic",
            &f.topic,
            "--to-earliest",
        ]);
        assert!(replay.status.success(), "{replay:?}");
        let mut bin = Binary::start(&config, None);
        // Partition 1 is empty: the replay moved it to its start, 0.
        f.wait_committed(&[4, 0]);
        assert!(bin.stop().success());
        assert_eq!(
            outputs_by_key(&out),
            once_each(&["K0", "K1", "K2", "K3"]),
            "{point}: after a replay"
        );
    }
}

/// Waits until the run's first sink write finished: idem is then inside
/// the stall that follows it, with its transaction open.
fn wait_until_stalled(bin: &Binary) {
    wait_for(Duration::from_secs(60), "the first sink write", || {
        bin.metric("idem_sink_write_seconds_count", None)
            .is_some_and(|n| n >= 1)
    });
}

#[test]
fn c10_a_transaction_that_times_out_is_done_again() {
    let f = Fixture::new("ksink-c10");
    let out = output_topic(&f, &[]);
    produce(
        &f.topic,
        &(0..3)
            .map(|n| Rec::order(0, &format!("T{n}"), &format!("ord-{n}"), 1, n))
            .collect::<Vec<_>>(),
    );
    let config = f.write_text(
        &f.config_text_with_sink("7d", &kafka_sink(&out, "transaction_timeout_ms = 10000")),
    );
    let mut bin = Binary::start_with_env(&config, &[("IDEM_STALL_AT", "after-sink-write:15")]);
    wait_until_stalled(&bin);
    assert!(
        outputs_by_key(&out).is_empty(),
        "outputs of an open transaction are not visible"
    );
    assert_eq!(f.committed(), vec![-1, -1]);

    // The broker aborts the transaction after 10 s. idem then either
    // aborts and does the batch again, or stops with an error; it never
    // commits the offsets without the outputs.
    let mut restarted = false;
    wait_for(Duration::from_secs(120), "the batch to commit", || {
        if let Ok(Some(status)) = bin.child.try_wait() {
            assert!(!status.success(), "a fenced idem must not exit cleanly");
            assert_eq!(f.committed(), vec![-1, -1]);
            bin = Binary::start(&config, None);
            restarted = true;
        }
        f.committed() == vec![3, -1]
    });
    eprintln!(
        "c10 timeout: idem {}",
        if restarted {
            "stopped and was restarted"
        } else {
            "aborted and redid the batch"
        }
    );
    assert!(bin.stop().success());
    assert_eq!(outputs_by_key(&out), once_each(&["T0", "T1", "T2"]));
}

#[test]
fn c10_a_second_producer_with_the_same_transactional_id_fences_the_first() {
    let f = Fixture::new("ksink-fence");
    let out = output_topic(&f, &[]);
    produce(
        &f.topic,
        &(0..3)
            .map(|n| Rec::order(0, &format!("F{n}"), &format!("ord-{n}"), 1, n))
            .collect::<Vec<_>>(),
    );
    let text = f.config_text_with_sink("7d", &kafka_sink(&out, ""));
    let config_a = f.write_text(&text);
    let mut a = Binary::start_with_env(&config_a, &[("IDEM_STALL_AT", "after-sink-write:15")]);
    wait_until_stalled(&a);

    // The second instance: same group and transactional id, its own
    // dedup store and metrics port.
    let second_dedup = f.dir.path().join("dedup-b");
    let text_b = f
        .config_text_with_sink("7d", &kafka_sink(&out, ""))
        .replace(
            &f.dedup_path().display().to_string(),
            &second_dedup.display().to_string(),
        );
    let config_b = f.dir.path().join("idem-b.toml");
    std::fs::write(&config_b, text_b).unwrap();
    let mut b = Binary::start(&config_b, None);

    let status = a.wait(Duration::from_secs(120));
    assert!(
        !status.success(),
        "the fenced instance stops with an error: {status:?}"
    );
    f.wait_committed(&[3, -1]);
    assert!(b.stop().success());
    assert_eq!(outputs_by_key(&out), once_each(&["F0", "F1", "F2"]));
}
