//! Day-two operations against the real broker: replay by offset, time and
//! duration; plain replay and rebuild; lost group offsets; inspect.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use idem::config::OffsetReset;
use idem::outcome::Outcome;
use idem::pipeline::{Pipeline, PipelineError};

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn ok(out: &std::process::Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Each way of naming the target moves the right offsets; a dry run moves
/// none; a move forward is refused.
#[test]
fn replay_moves_offsets_by_offset_time_and_duration() {
    let f = Fixture::new("replay");
    let t0 = now_ms();
    let minute = 60_000;
    // p0@i at t0 - (10 - i) minutes, i = 0..9; p1@j likewise, j = 0..4.
    let mut records = Vec::new();
    for i in 0..10 {
        let mut r = Rec::order(0, &format!("A{i}"), &format!("a{i}"), 1, 1);
        r.timestamp = Some(t0 - (10 - i) * minute);
        records.push(r);
    }
    for j in 0..5 {
        let mut r = Rec::order(1, &format!("B{j}"), &format!("b{j}"), 1, 1);
        r.timestamp = Some(t0 - (10 - j) * minute);
        records.push(r);
    }
    produce(&f.topic, &records);
    let run = Running::start(f.config(Mode::Upsert, "7d"));
    run.wait_read(15);
    f.wait_committed(&[10, 5]);
    run.stop();
    let config = f.write_config(Mode::Upsert, "7d");

    let plan = ok(&replay(&f, &config, &["--to-offset", "4", "--dry-run"]));
    assert!(plan.contains("dry run"), "{plan}");
    assert!(plan.contains("total records to read again: 7"), "{plan}");
    assert_eq!(f.committed(), vec![10, 5], "a dry run changed offsets");

    // 3.5 minutes ago: p0's first record at or after it is offset 7 (3
    // minutes ago); p1 has none, so it stays at its end.
    let at = humantime::format_rfc3339_millis(
        UNIX_EPOCH + Duration::from_millis((t0 - 7 * minute / 2) as u64),
    )
    .to_string();
    ok(&replay(&f, &config, &["--to-datetime", &at]));
    assert_eq!(f.committed(), vec![7, 5]);

    // 5.5 minutes before now (a little later than t0): p0 offset 5.
    ok(&replay(&f, &config, &["--by-duration", "5m 30s"]));
    assert_eq!(f.committed(), vec![5, 5]);

    ok(&replay(&f, &config, &["--to-offset", "2"]));
    assert_eq!(f.committed(), vec![2, 2]);

    ok(&replay(&f, &config, &["--to-earliest", "--partition", "1"]));
    assert_eq!(f.committed(), vec![2, 0]);

    let forward = replay(&f, &config, &["--to-offset", "8"]);
    assert!(!forward.status.success());
    assert!(String::from_utf8_lossy(&forward.stderr).contains("skip"));
    assert_eq!(f.committed(), vec![2, 0]);
}

/// While idem runs in the group, replay refuses and names the member.
#[test]
fn replay_refuses_while_the_group_is_active() {
    let f = Fixture::new("replay-active");
    produce(&f.topic, &[Rec::order(0, "K1", "ord-1", 1, 1)]);
    let run = Running::start(f.config(Mode::Upsert, "7d"));
    run.wait_read(1);
    f.wait_committed(&[1, -1]);
    let config = f.write_config(Mode::Upsert, "7d");
    let out = replay(&f, &config, &["--to-earliest"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("active member"), "{stderr}");
    assert!(
        stderr.contains("rdkafka"),
        "the member's client id is named: {stderr}"
    );
    assert_eq!(f.committed(), vec![1, -1]);
    run.stop();
}

/// A plain replay of 10,000 records inside the window applies nothing new:
/// every record is a duplicate and the sink is unchanged.
#[test]
fn plain_replay_inside_the_window_applies_nothing_new() {
    let f = Fixture::new("plain-replay");
    let records: Vec<Rec> = (0..10_000)
        .map(|n| Rec::order(n % 2, &format!("K{n}"), &format!("ord-{n}"), 1, n as i64))
        .collect();
    produce(&f.topic, &records);
    let run = Running::start(f.config(Mode::Upsert, "7d"));
    run.wait_read(10_000);
    run.stop();
    let before = f.rows();

    let config = f.write_config(Mode::Upsert, "7d");
    ok(&replay(&f, &config, &["--to-earliest"]));
    assert_eq!(f.committed(), vec![0, 0]);
    let run = Running::start(f.config(Mode::Upsert, "7d"));
    run.wait_read(10_000);
    f.wait_committed(&[5_000, 5_000]);
    assert_eq!(run.count(Outcome::Duplicate), 10_000);
    assert_eq!(run.count(Outcome::Applied), 0);
    run.assert_outcomes_add_up();
    run.stop();
    assert_eq!(f.rows(), before);
}

/// Rebuild: the sink is lost; a replay from the start with dedup bypassed
/// reproduces it exactly, conflicts and stale versions included, in both
/// sink modes.
#[test]
fn rebuild_into_an_empty_sink_reproduces_it() {
    let s = stream(4_000, 2);
    for mode in [Mode::Upsert, Mode::Insert] {
        let f = Fixture::new(&format!("rebuild-{mode:?}").to_lowercase());
        produce(&f.topic, &s.records);
        let total = s.records.len() as u64;
        let run = Running::start(f.config(mode, "7d"));
        run.wait_read(total);
        run.stop();
        let (rows, inserted) = (f.rows_or_empty(mode), f.inserted_or_empty(mode));

        std::fs::remove_file(f.sink_path()).unwrap();
        let config = f.write_config(mode, "7d");
        ok(&replay(&f, &config, &["--to-earliest"]));
        let run = Running::start_with(Pipeline::new(f.config(mode, "7d")).with_rebuild(true));
        run.wait_read(total);
        run.assert_outcomes_add_up();
        run.stop();
        assert_eq!(f.rows_or_empty(mode), rows, "{mode:?}");
        assert_eq!(f.inserted_or_empty(mode), inserted, "{mode:?}");
        match mode {
            Mode::Upsert => assert_eq!(rows, s.rows),
            Mode::Insert => assert_eq!(inserted, s.inserted),
        }
    }
}

/// The group's committed offsets are deleted while idem is stopped. Even
/// with offset_reset = "latest" (which would skip) idem resumes from its
/// own stored progress: the new records are applied, the old ones are not
/// read again.
#[test]
fn deleted_group_offsets_neither_skip_nor_reapply() {
    let f = Fixture::new("lost-offsets");
    produce(
        &f.topic,
        &(0..20)
            .map(|n| Rec::order(n % 2, &format!("K{n}"), &format!("ord-{n}"), 1, 1))
            .collect::<Vec<_>>(),
    );
    let run = Running::start(f.config(Mode::Upsert, "7d"));
    run.wait_read(20);
    f.wait_committed(&[10, 10]);
    run.stop();

    delete_group(&f.group);
    assert_eq!(f.committed(), vec![-1, -1]);
    produce(
        &f.topic,
        &(20..26)
            .map(|n| Rec::order(n % 2, &format!("K{n}"), &format!("ord-{n}"), 1, 1))
            .collect::<Vec<_>>(),
    );
    let mut config = f.config(Mode::Upsert, "7d");
    config.kafka.offset_reset = OffsetReset::Latest;
    let run = Running::start(config);
    run.wait_read(6);
    f.wait_committed(&[13, 13]);
    assert_eq!(run.count(Outcome::Applied), 6, "new records were skipped");
    assert_eq!(
        run.count(Outcome::Duplicate),
        0,
        "old records were read again"
    );
    run.stop();
    assert_eq!(f.rows().len(), 26);
}

/// offset_reset = "fail": no committed offset and no stored progress, so
/// idem stops with an error that says what to do.
#[test]
fn offset_reset_fail_refuses_to_guess() {
    let f = Fixture::new("reset-fail");
    produce(&f.topic, &[Rec::order(0, "K1", "ord-1", 1, 1)]);
    let mut config = f.config(Mode::Upsert, "7d");
    config.kafka.offset_reset = OffsetReset::Fail;
    let pipeline = Pipeline::new(config);
    let metrics = pipeline.metrics();
    let result = std::thread::spawn(move || pipeline.run()).join().unwrap();
    match result {
        Err(PipelineError::NoStartingOffset(why)) => {
            assert!(why.contains("idem replay"), "{why}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(metrics.read_total(), 0);
    assert_eq!(f.committed(), vec![-1, -1]);
}

/// `idem inspect key` shows a key's record; `idem inspect stats` counts
/// keys per partition; both work beside a running idem.
#[test]
fn inspect_key_and_stats() {
    let f = Fixture::new("inspect");
    produce(
        &f.topic,
        &[
            Rec::order(0, "K1", "ord-1", 1, 1),
            Rec::order(0, "K2", "ord-2", 1, 1),
            Rec::order(1, "K3", "ord-3", 1, 1),
        ],
    );
    let config = f.write_config(Mode::Upsert, "7d");
    let mut bin = Binary::start(&config, None);
    f.wait_committed(&[2, 1]);

    let shown = ok(&idem(&[
        "inspect",
        "--config",
        config.to_str().unwrap(),
        "key",
        "K2",
    ]));
    assert!(shown.contains("partition    0"), "{shown}");
    assert!(shown.contains("first offset 1"), "{shown}");
    assert!(shown.contains(&f.topic), "{shown}");
    let missing = idem(&[
        "inspect",
        "--config",
        config.to_str().unwrap(),
        "key",
        "nope",
    ]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("not in the dedup store"));

    let stats = ok(&idem(&[
        "inspect",
        "--config",
        config.to_str().unwrap(),
        "stats",
    ]));
    assert!(stats.contains("total: 3 keys"), "{stats}");
    assert!(bin.stop().success());
}

/// A rebuild stopped part-way (as a kill would) and started again with
/// `--rebuild` still reproduces the sink: the keys its first run wrote
/// still count, so a conflicting newer body stays a conflict.
#[test]
fn an_interrupted_rebuild_still_reproduces_the_sink() {
    let f = Fixture::new("rebuild-restart");
    let mut records = vec![Rec::order(0, "K1", "e1", 1, 1)];
    for n in 0..300 {
        records.push(Rec::order(0, &format!("F{n}"), &format!("f{n}"), 1, 1));
    }
    // The same key again, another body with a newer version: a conflict.
    records.push(Rec::order(0, "K1", "e1", 2, 99));
    produce(&f.topic, &records);
    let mut config = f.config(Mode::Upsert, "7d");
    config.batch.max_records = 50;
    let run = Running::start(config.clone());
    run.wait_read(302);
    assert_eq!(run.count(Outcome::Conflict), 1);
    run.stop();
    let original = f.rows();
    assert_eq!(original["e1"], (1, 1));

    std::fs::remove_file(f.sink_path()).unwrap();
    let path = f.write_config(Mode::Upsert, "7d");
    ok(&replay(&f, &path, &["--to-earliest"]));
    let first = Running::start_with(
        Pipeline::new(config.clone())
            .with_rebuild(true)
            .with_crash_plan(idem::failpoint::CrashPlan::at("after-dedup-write", 3)),
    );
    assert!(matches!(first.join(), idem::pipeline::RunEnd::Crashed(_)));
    let run = Running::start_with(Pipeline::new(config).with_rebuild(true));
    // The replay committed the empty partition 1 at 0.
    f.wait_committed(&[302, 0]);
    assert_eq!(run.count(Outcome::Conflict), 1);
    run.stop();
    assert_eq!(f.rows(), original);
}
