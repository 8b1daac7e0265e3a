//! The pipeline in this process against the real Kafka broker: the happy
//! path and the field cases of shared/CASES.md that need no kill.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use idem::clock::ManualClock;
use idem::failpoint::CrashPlan;
use idem::outcome::Outcome;
use idem::pipeline::RunEnd;
use rdkafka::Message;

/// A stream with a fifth of its records redelivered ends with one row per
/// order and every redelivery counted as a duplicate.
#[test]
fn happy_path_with_duplicates() {
    let f = Fixture::new("happy");
    let mut records = Vec::new();
    for n in 0..100 {
        let id = format!("ord-{n}");
        let rec = Rec::order(n % 2, &format!("K{n}"), &id, 1, n as i64);
        records.push(rec.clone());
        if n % 5 == 0 {
            // The same event again, re-serialised.
            let body = format!("{{ \"qty\": {n}, \"id\": \"{id}\",  \"ver\": 1 }}");
            records.push(rec.with_value(body.as_bytes()));
        }
    }
    produce(&f.topic, &records);

    let run = Running::start(f.config(Mode::Upsert, "7d"));
    run.wait_read(120);
    f.wait_committed(&[60, 60]);
    assert_eq!(run.count(Outcome::Applied), 100);
    assert_eq!(run.count(Outcome::Duplicate), 20);
    run.assert_outcomes_add_up();
    assert_eq!(run.stop(), RunEnd::Stopped);

    let rows = f.rows();
    assert_eq!(rows.len(), 100);
    assert_eq!(rows["ord-42"], (1, 42));
}

/// A backlog of `batches` batches of ten on partition 0: each brings five
/// new events and, for the batch before, three redeliveries, a conflict
/// (entity `ord-B-3` with qty -1) and a record that is not JSON.
fn backlog_with_repeats(batches: usize) -> Vec<Rec> {
    let event = |b: usize, i: usize| {
        Rec::order(
            0,
            &format!("K{b}-{i}"),
            &format!("ord-{b}-{i}"),
            1,
            (b * 10 + i) as i64,
        )
    };
    let mut records = Vec::new();
    for b in 0..batches {
        for i in 0..5 {
            records.push(event(b, i));
        }
        if b > 0 {
            for i in 0..3 {
                records.push(event(b - 1, i));
            }
            let other = format!(r#"{{"id":"ord-{}-3","ver":1,"qty":-1}}"#, b - 1);
            records.push(event(b - 1, 3).with_value(other.as_bytes()));
            records.push(Rec::order(0, &format!("bad-{b}"), "x", 1, 0).with_value(b"{not json"));
        }
    }
    records
}

/// Batches of ten, cut by count rather than by time, so that a backlog is
/// decoded ahead.
fn ten_at_a_time(f: &Fixture) -> idem::config::Config {
    let mut config = f.config(Mode::Upsert, "7d");
    config.batch.max_records = 10;
    config.batch.linger_ms = 1_000;
    config
}

/// The sink and the dead letters after [`backlog_with_repeats`]: every
/// entity at its first event, and each dead letter the record its reason
/// names, every source offset among them exactly once unless `repeats`
/// (dead letters are at least once across a crash).
fn assert_backlog_written(f: &Fixture, batches: usize, repeats: bool) {
    let rows = f.rows();
    assert_eq!(rows.len(), 5 * batches);
    assert_eq!(rows["ord-7-3"], (1, 73), "the conflict changed nothing");
    let letters = read_all(&f.dead_letter_topic, 1);
    let mut offsets = std::collections::BTreeSet::new();
    for m in &letters {
        let value = m.payload().unwrap_or_default();
        match header(m, "idem.reason") {
            Some(b"invalid-json") => assert_eq!(value, b"{not json"),
            Some(b"conflict") => assert!(value.ends_with(br#""qty":-1}"#)),
            other => panic!("unexpected dead letter {other:?}"),
        }
        let offset = header(m, "idem.source.offset").expect("source offset");
        assert!(
            offsets.insert(offset.to_vec()) || repeats,
            "a dead letter twice"
        );
    }
    assert_eq!(offsets.len(), 2 * (batches - 1), "a dead letter missing");
}

/// A backlog of full batches: each is decoded while the batch before it
/// is written, and its dedup look-up still sees that batch's records.
#[test]
fn a_backlog_decoded_ahead_still_finds_what_the_batch_before_wrote() {
    let f = Fixture::new("ahead");
    let batches = 30;
    let records = backlog_with_repeats(batches);
    produce(&f.topic, &records);

    let run = Running::start(ten_at_a_time(&f));
    run.wait_read(records.len() as u64);
    f.wait_committed(&[records.len() as i64, -1]);
    let later = (batches - 1) as u64;
    assert_eq!(run.count(Outcome::Applied), 5 * batches as u64);
    assert_eq!(run.count(Outcome::Duplicate), 3 * later);
    assert_eq!(run.count(Outcome::Conflict), later);
    assert_eq!(run.count(Outcome::DeadLettered), later);
    run.assert_outcomes_add_up();
    let ahead = run.metrics.decoded_ahead.get();
    assert!(ahead > 0, "no batch was decoded ahead");
    assert_eq!(run.stop(), RunEnd::Stopped);
    assert_backlog_written(&f, batches, false);
}

/// A crash in the middle of a backlog, with the next batch decoded and
/// held, at each point of the write path where one could do harm: after
/// the sink write, after the dead letters, before the changelog's acks,
/// after the dedup write. The
/// restart reads the batch again and ends exactly as a run without a
/// crash.
#[test]
fn a_crash_with_a_batch_decoded_ahead_loses_and_doubles_nothing() {
    for point in [
        "after-sink-write",
        "after-dead-letter",
        "before-changelog-ack",
        "after-dedup-write",
    ] {
        let f = Fixture::new(&format!("ahead-crash-{point}"));
        let batches = 12;
        let records = backlog_with_repeats(batches);
        produce(&f.topic, &records);

        let crashed = Running::start_with_crash(ten_at_a_time(&f), CrashPlan::at(point, 4));
        let metrics = Arc::clone(&crashed.metrics);
        assert_eq!(crashed.join(), RunEnd::Crashed(point));
        let ahead = metrics.decoded_ahead.get();
        assert!(ahead > 0, "{point}: no batch was decoded ahead");
        let committed = f.committed()[0];
        assert!(
            committed < records.len() as i64,
            "{point}: the crash came before the end ({committed})"
        );

        let run = Running::start(ten_at_a_time(&f));
        f.wait_committed(&[records.len() as i64, -1]);
        run.assert_outcomes_add_up();
        assert_eq!(run.stop(), RunEnd::Stopped);
        assert_backlog_written(&f, batches, true);
    }
}

/// A batch held decoded waits only for records already fetched: with
/// batches of one record and a linger of a minute, records produced one at
/// a time are each written at once, not a linger later.
#[test]
fn a_held_batch_does_not_wait_for_records_still_to_come() {
    let f = Fixture::new("held");
    let mut config = f.config(Mode::Upsert, "7d");
    config.batch.max_records = 1;
    config.batch.linger_ms = 60_000;
    let run = Running::start(config);
    for n in 0..3u64 {
        let id = format!("ord-{n}");
        produce(
            &f.topic,
            &[Rec::order(0, &format!("K{n}"), &id, 1, n as i64)],
        );
        wait_for(Duration::from_secs(20), &format!("{id} written"), || {
            run.metrics.read_total() > n
        });
    }
    assert_eq!(run.count(Outcome::Applied), 3);
    assert!(run.metrics.decoded_ahead.get() > 0, "no batch was held");
    assert_eq!(run.stop(), RunEnd::Stopped);
    assert_eq!(f.rows().len(), 3);
}

/// insert mode: one row per idempotency key; a redelivery adds nothing.
#[test]
fn insert_mode_keeps_one_row_per_key() {
    let f = Fixture::new("insert");
    let mut records = Vec::new();
    for n in 0..30 {
        let rec = Rec::order(n % 2, &format!("E{n}"), &format!("ord-{n}"), 1, n as i64);
        records.push(rec.clone());
        if n % 3 == 0 {
            records.push(rec);
        }
    }
    produce(&f.topic, &records);
    let run = Running::start(f.config(Mode::Insert, "7d"));
    run.wait_read(40);
    assert_eq!(run.count(Outcome::Applied), 30);
    assert_eq!(run.count(Outcome::Duplicate), 10);
    run.assert_outcomes_add_up();
    run.stop();
    let rows = f.inserted();
    assert_eq!(rows.len(), 30);
    assert_eq!(rows["E7"], ("ord-7".to_string(), 7));
}

/// C3: after a clean stop, a restart with no new input re-reads nothing;
/// the committed offset is last + 1, not last.
#[test]
fn c3_off_by_one_on_commit() {
    let f = Fixture::new("c3");
    produce(
        &f.topic,
        &[
            Rec::order(0, "A0", "ord-0", 1, 1),
            Rec::order(0, "A1", "ord-1", 1, 1),
            Rec::order(0, "A2", "ord-2", 1, 1),
            Rec::order(1, "B0", "ord-3", 1, 1),
            Rec::order(1, "B1", "ord-4", 1, 1),
        ],
    );
    let run = Running::start(f.config(Mode::Upsert, "7d"));
    run.wait_read(5);
    assert_eq!(run.stop(), RunEnd::Stopped);
    assert_eq!(f.committed(), vec![3, 2]);

    let run = Running::start(f.config(Mode::Upsert, "7d"));
    produce(&f.topic, &[Rec::order(0, "A3", "ord-5", 1, 1)]);
    run.wait_read(1);
    f.wait_committed(&[4, 2]);
    assert_eq!(run.count(Outcome::Duplicate), 0, "a record was re-read");
    assert_eq!(run.count(Outcome::Applied), 1);
    run.assert_outcomes_add_up();
    run.stop();
}

/// C4: a truncated JSON record goes to the dead-letter topic with its bytes
/// and where it came from; the records around it and the other partition
/// go on; a restart does not dead-letter it again.
#[test]
fn c4_poison_pill_is_dead_lettered_once() {
    let f = Fixture::new("c4");
    let poison = br#"{"id":"ord-2","qty":"#;
    produce(
        &f.topic,
        &[
            Rec::order(0, "K1", "ord-1", 1, 1),
            Rec::order(0, "K2", "ord-2", 1, 1).with_value(poison),
            Rec::order(0, "K3", "ord-3", 1, 1),
            Rec::order(1, "K4", "ord-4", 1, 1),
        ],
    );
    let run = Running::start(f.config(Mode::Upsert, "7d"));
    run.wait_read(4);
    f.wait_committed(&[3, 1]);
    assert_eq!(run.count(Outcome::DeadLettered), 1);
    assert_eq!(run.count(Outcome::Applied), 3);
    run.assert_outcomes_add_up();
    run.stop();
    assert_eq!(f.rows().len(), 3);

    let letters = read_all(&f.dead_letter_topic, 1);
    assert_eq!(letters.len(), 1);
    let m = &letters[0];
    assert_eq!(m.payload(), Some(&poison[..]));
    assert_eq!(m.key(), Some(&b"ord-2"[..]));
    assert_eq!(header(m, "Idempotency-Key"), Some(&b"K2"[..]));
    assert_eq!(header(m, "idem.source.topic"), Some(f.topic.as_bytes()));
    assert_eq!(header(m, "idem.source.partition"), Some(&b"0"[..]));
    assert_eq!(header(m, "idem.source.offset"), Some(&b"1"[..]));
    assert_eq!(header(m, "idem.reason"), Some(&b"invalid-json"[..]));
    assert!(header(m, "idem.error").is_some_and(|e| !e.is_empty()));

    // Restart with one more record: the poison pill is not read again.
    let run = Running::start(f.config(Mode::Upsert, "7d"));
    produce(&f.topic, &[Rec::order(0, "K5", "ord-5", 1, 1)]);
    run.wait_read(1);
    f.wait_committed(&[4, 1]);
    run.stop();
    assert_eq!(read_all(&f.dead_letter_topic, 1).len(), 1);
}

/// C5: while the dead-letter topic is missing, the offset does not move
/// and the failure is counted; once it exists, exactly one dead letter,
/// then the commit. The malformed record is the last of its partition.
#[test]
fn c5_dead_letter_topic_missing_holds_the_offset() {
    let f = Fixture::with_dead_letter_topic("c5", false);
    produce(
        &f.topic,
        &[Rec::order(0, "K1", "ord-1", 1, 1).with_value(b"not json")],
    );
    let run = Running::start(f.config(Mode::Upsert, "7d"));
    wait_for(
        Duration::from_secs(60),
        "a failed dead-letter write",
        || run.metrics.dead_letter_failures.get() >= 2,
    );
    assert_eq!(
        f.committed(),
        vec![-1, -1],
        "offset moved without a dead letter"
    );
    assert_eq!(run.metrics.read_total(), 0);

    create_topic(&f.dead_letter_topic, 1);
    run.wait_read(1);
    f.wait_committed(&[1, -1]);
    assert_eq!(run.count(Outcome::DeadLettered), 1);
    run.assert_outcomes_add_up();
    run.stop();
    assert_eq!(read_all(&f.dead_letter_topic, 1).len(), 1);

    // Restart: the last record of the partition is not repeated.
    let run = Running::start(f.config(Mode::Upsert, "7d"));
    produce(&f.topic, &[Rec::order(0, "K2", "ord-2", 1, 1)]);
    run.wait_read(1);
    f.wait_committed(&[2, -1]);
    run.stop();
    assert_eq!(read_all(&f.dead_letter_topic, 1).len(), 1);
}

/// C6: the same key with another body is a conflict and is dead-lettered;
/// the same key with the same body, re-serialised, is a duplicate.
#[test]
fn c6_same_key_different_body_is_a_conflict() {
    let f = Fixture::new("c6");
    produce(
        &f.topic,
        &[
            Rec::order(0, "K7", "ord-7", 1, 5),
            Rec::order(0, "K7", "ord-7", 1, 50),
            Rec::order(0, "K7", "ord-7", 1, 5)
                .with_value(b"{ \"qty\":5,   \"ver\" : 1,\n\"id\":\"ord-7\" }"),
        ],
    );
    let run = Running::start(f.config(Mode::Upsert, "7d"));
    run.wait_read(3);
    f.wait_committed(&[3, -1]);
    assert_eq!(run.count(Outcome::Applied), 1);
    assert_eq!(run.count(Outcome::Conflict), 1);
    assert_eq!(run.count(Outcome::Duplicate), 1);
    run.assert_outcomes_add_up();
    run.stop();
    assert_eq!(f.rows()["ord-7"], (1, 5));
    let letters = read_all(&f.dead_letter_topic, 1);
    assert_eq!(letters.len(), 1);
    assert_eq!(header(&letters[0], "idem.reason"), Some(&b"conflict"[..]));
    assert_eq!(header(&letters[0], "idem.source.offset"), Some(&b"1"[..]));
}

/// C7: with a 10 s window, K9 seen again at 15 s is new, whether or not a
/// compaction ran in between; after a restart, a key inside its window is
/// still a duplicate.
#[test]
fn c7_window_expiry_does_not_wait_for_compaction() {
    for compact in [false, true] {
        let f = Fixture::new(if compact { "c7-compact" } else { "c7" });
        let clock = ManualClock::new(1_700_000_000_000);
        let run = Running::start_with_clock(f.config(Mode::Insert, "10s"), Arc::new(clock.clone()));
        produce(&f.topic, &[Rec::order(0, "K9", "ord-9", 1, 1)]);
        run.wait_read(1);
        assert_eq!(run.stop(), RunEnd::Stopped);

        clock.advance(Duration::from_secs(15));
        if compact {
            let store = idem::dedup::DedupStore::open(
                &f.dedup_path(),
                Duration::from_secs(10),
                Arc::new(clock.clone()),
            )
            .unwrap();
            store.compact();
            assert_eq!(
                store.estimated_keys(),
                0,
                "the compaction filter kept an expired key"
            );
        }
        // Remove the row, so that "new" shows as a fresh insert.
        rusqlite::Connection::open(f.sink_path())
            .unwrap()
            .execute("DELETE FROM orders", [])
            .unwrap();

        let run = Running::start_with_clock(f.config(Mode::Insert, "10s"), Arc::new(clock.clone()));
        produce(&f.topic, &[Rec::order(0, "K9", "ord-9", 1, 1)]);
        run.wait_read(1);
        assert_eq!(
            run.count(Outcome::Applied),
            1,
            "compact={compact}: K9 at 15 s must be new"
        );
        run.stop();

        // Inside the window after a restart: still a duplicate.
        clock.advance(Duration::from_secs(5));
        let run = Running::start_with_clock(f.config(Mode::Insert, "10s"), Arc::new(clock.clone()));
        produce(&f.topic, &[Rec::order(0, "K9", "ord-9", 1, 1)]);
        run.wait_read(1);
        assert_eq!(run.count(Outcome::Duplicate), 1, "compact={compact}");
        run.assert_outcomes_add_up();
        run.stop();
    }
}

/// C8 on SQLite: a late older version is stale; wiping the dedup store and
/// replaying from offset 0 never moves the row backwards.
#[test]
fn c8_stale_record_on_replay_never_regresses() {
    let f = Fixture::new("c8");
    produce(
        &f.topic,
        &[
            Rec::order(0, "V1", "ord-10", 1, 1),
            Rec::order(0, "V3", "ord-10", 3, 3),
            Rec::order(0, "V2", "ord-10", 2, 2),
        ],
    );
    let run = Running::start(f.config(Mode::Upsert, "7d"));
    run.wait_read(3);
    assert_eq!(run.count(Outcome::Stale), 1);
    assert_eq!(run.count(Outcome::Applied), 2);
    run.stop();
    assert_eq!(f.rows()["ord-10"], (3, 3));

    // Wipe the dedup store and replay from offset 0 (a new group starts at
    // the earliest offset).
    std::fs::remove_dir_all(f.dedup_path()).unwrap();
    let mut config = f.config(Mode::Upsert, "7d");
    config.kafka.group_id = unique("idem-test-c8-replay");
    let run = Running::start(config);
    run.wait_read(3);
    assert_eq!(f.rows()["ord-10"], (3, 3));
    assert_eq!(
        run.count(Outcome::Stale),
        2,
        "ver 1 and ver 2 are older than 3"
    );
    assert_eq!(
        run.count(Outcome::Duplicate),
        1,
        "ver 3 is already in the sink"
    );
    assert_eq!(run.count(Outcome::Applied), 0);
    run.assert_outcomes_add_up();
    run.stop();
}

/// C13: tombstones, null keys, bytes that are not UTF-8. No panic, one
/// documented rule each, every record counted, the partition committed.
#[test]
fn c13_tombstones_null_keys_and_bad_bytes() {
    let f = Fixture::new("c13");
    let idem = |k: &[u8]| vec![("Idempotency-Key".to_string(), Some(k.to_vec()))];
    let records = vec![
        Rec::order(0, "K18", "ord-18", 1, 1),
        // A tombstone for ord-18: filtered, the row stays.
        Rec {
            key: Some(b"ord-18".to_vec()),
            ..Rec::default()
        },
        // No record key, but a key header and a valid body: applied.
        Rec {
            partition: 0,
            key: None,
            value: Some(br#"{"id":"ord-19","ver":1,"qty":1}"#.to_vec()),
            headers: idem(b"K19"),
            timestamp: None,
        },
        // A raw 0xE9 byte inside a JSON string: invalid JSON.
        Rec {
            partition: 0,
            key: Some(b"ord-20".to_vec()),
            value: Some(b"{\"id\":\"ord-20\",\"ver\":1,\"name\":\"caf\xe9\"}".to_vec()),
            headers: idem(b"K20"),
            timestamp: None,
        },
        // An idempotency header that is not UTF-8: bad key.
        Rec {
            partition: 0,
            key: Some(b"ord-21".to_vec()),
            value: Some(br#"{"id":"ord-21","ver":1,"qty":1}"#.to_vec()),
            headers: idem(b"K\xff21"),
            timestamp: None,
        },
        // Key, value and headers all null: empty.
        Rec::default(),
    ];
    produce(&f.topic, &records);
    let run = Running::start(f.config(Mode::Upsert, "7d"));
    run.wait_read(6);
    f.wait_committed(&[6, -1]);
    assert_eq!(run.count(Outcome::Applied), 2);
    assert_eq!(run.count(Outcome::Filtered), 1);
    assert_eq!(run.count(Outcome::DeadLettered), 3);
    run.assert_outcomes_add_up();
    run.stop();

    let rows = f.rows();
    assert!(rows.contains_key("ord-18") && rows.contains_key("ord-19"));
    let letters = read_all(&f.dead_letter_topic, 1);
    let reasons: Vec<_> = letters
        .iter()
        .map(|m| String::from_utf8(header(m, "idem.reason").unwrap().to_vec()).unwrap())
        .collect();
    assert_eq!(reasons, ["invalid-json", "bad-key", "empty"]);
    assert_eq!(
        letters[0].payload(),
        records[3].value.as_deref(),
        "original bytes"
    );
    assert_eq!(
        header(&letters[1], "Idempotency-Key"),
        Some(&b"K\xff21"[..])
    );
    assert!(letters[2].payload().is_none() && letters[2].key().is_none());
}

/// C12 (the part that needs no HTTP or Kafka sink): a 1.5 MiB record is
/// too large; it is dead-lettered without blocking the partition even
/// though the dead-letter topic cannot hold it (1 MB): the dead letter then
/// carries everything but the value, and says so.
#[test]
fn c12_record_too_large_is_dead_lettered_without_blocking() {
    let f = Fixture::with_topic_config("c12", &[("max.message.bytes", "3000000")]);
    let big = format!(
        r#"{{"id":"ord-12","ver":1,"qty":1,"note":"{}"}}"#,
        "x".repeat(1_500_000)
    );
    // Poison whose record key alone is too large for the dead-letter topic.
    let mut big_key = Rec::order(0, "K14", "x", 1, 1).with_value(b"not json");
    big_key.key = Some(vec![b'k'; 2_500_000]);
    produce(
        &f.topic,
        &[
            Rec::order(0, "K12", "ord-12", 1, 1).with_value(big.as_bytes()),
            Rec::order(0, "K13", "ord-13", 1, 1),
            big_key,
            Rec::order(0, "K15", "ord-15", 1, 1),
        ],
    );
    let run = Running::start(f.config(Mode::Upsert, "7d"));
    run.wait_read(4);
    f.wait_committed(&[4, -1]);
    assert_eq!(run.count(Outcome::DeadLettered), 2);
    assert_eq!(run.count(Outcome::Applied), 2);
    run.stop();
    let letters = read_all(&f.dead_letter_topic, 1);
    assert_eq!(letters.len(), 2);
    let at = |offset: &[u8]| {
        letters
            .iter()
            .find(|m| header(m, "idem.source.offset") == Some(offset))
            .expect("a dead letter for that offset")
    };
    let m = at(b"0");
    assert_eq!(header(m, "idem.reason"), Some(&b"too-large"[..]));
    assert!(m.payload().is_none());
    let omitted = String::from_utf8(header(m, "idem.value-omitted").unwrap().to_vec()).unwrap();
    assert!(omitted.starts_with(&big.len().to_string()), "{omitted}");
    let k = at(b"2");
    assert_eq!(header(k, "idem.reason"), Some(&b"invalid-json"[..]));
    assert!(k.key().is_none() && header(k, "idem.key-omitted").is_some());
    assert!(f.rows().contains_key("ord-13") && f.rows().contains_key("ord-15"));
}
