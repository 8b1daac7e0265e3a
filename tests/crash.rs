//! The real `idem` binary against the real Kafka broker, killed with
//! SIGKILL: at each point of the write path (C2), at random moments of a
//! long run, and held up by another process's SQLite lock (C11).

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use idem::dedup::changelog::topic_name;
use rdkafka::Message;

const READ: &str = "idem_records_read_total";

fn records_read(bin: &Binary) -> u64 {
    bin.metric(READ, None).unwrap_or(0)
}

fn outcome(bin: &Binary, outcome: &str) -> u64 {
    bin.metric(
        "idem_records_total",
        Some(&format!("outcome=\"{outcome}\"")),
    )
    .unwrap_or(0)
}

fn row_count(f: &Fixture) -> usize {
    let conn = rusqlite::Connection::open(f.sink_path()).unwrap();
    conn.query_row("SELECT count(*) FROM orders", [], |r| r.get::<_, i64>(0))
        .unwrap_or(0) as usize
}

/// C2: SIGKILL (a) after the sink write, before the dedup write, (b) after
/// the dedup write to RocksDB, before the changelog's acknowledgement, (c)
/// after both, before the offset commit, (d) in the middle of a sink
/// batch; then restart. Three rows, p0 committed at 3, no record counted
/// as a duplicate that was never applied, and every key in the changelog.
#[test]
fn c2_sigkill_at_each_point_of_the_write_path() {
    for mode in [Mode::Upsert, Mode::Insert] {
        for point in [
            "after-sink-write",
            "after-dead-letter",
            "before-changelog-ack",
            "after-dedup-write",
            "mid-sink-batch",
        ] {
            let f = Fixture::new(&format!("c2-{point}"));
            produce(
                &f.topic,
                &[
                    Rec::order(0, "K0", "ord-0", 1, 1),
                    Rec::order(0, "K1", "ord-1", 1, 1),
                    Rec::order(0, "K2", "ord-2", 1, 1),
                ],
            );
            let config = f.write_config(mode, "7d");
            let mut bin = Binary::start(&config, Some(point));
            let status = bin.wait(Duration::from_secs(90));
            assert_eq!(
                status.signal(),
                Some(libc::SIGKILL),
                "{mode:?} {point}: {status:?}"
            );
            assert_eq!(
                f.committed(),
                vec![-1, -1],
                "{point}: committed before the kill"
            );
            let applied_before_restart = row_count(&f);
            let expected_before = if point == "mid-sink-batch" { 0 } else { 3 };
            assert_eq!(applied_before_restart, expected_before, "{mode:?} {point}");

            let mut bin = Binary::start(&config, None);
            f.wait_committed(&[3, -1]);
            // Killed after the dedup write and the changelog's
            // acknowledgement, nothing was committed, but the progress
            // stored after them says where to resume: nothing is read
            // again. Killed between the two, the batch is read again.
            let reread = if point == "after-dedup-write" { 0 } else { 3 };
            wait_for(Duration::from_secs(30), "metrics of the restart", || {
                bin.metric("idem_build_info", None).is_some() && records_read(&bin) == reread
            });
            let duplicates = outcome(&bin, "duplicate");
            let applied = outcome(&bin, "applied");
            assert_eq!(duplicates + applied, reread, "{mode:?} {point}");
            assert!(
                duplicates as usize <= applied_before_restart,
                "{mode:?} {point}: {duplicates} duplicates but {applied_before_restart} applied"
            );
            // Killed inside the sink transaction, nothing was applied and
            // everything is new; after the sink write and before the dedup
            // write, the sink already holds all three (same version, or the
            // same key), as the dedup store does before the changelog's
            // acknowledgement; after both nothing is read again.
            let expected_duplicates = match point {
                "mid-sink-batch" | "after-dedup-write" => 0,
                _ => 3,
            };
            assert_eq!(duplicates, expected_duplicates, "{mode:?} {point}");
            assert!(bin.stop().success());
            assert_eq!(row_count(&f), 3, "{mode:?} {point}");
            let mut keys: Vec<Vec<u8>> = read_all(&topic_name(&f.group, &f.topic), 2)
                .into_iter()
                .filter_map(|m| m.key().map(<[u8]>::to_vec))
                .collect();
            keys.sort();
            keys.dedup();
            assert_eq!(
                keys,
                [b"K0".to_vec(), b"K1".to_vec(), b"K2".to_vec()],
                "{mode:?} {point}: the changelog lacks a key"
            );
        }
    }
}

/// Holds `BEGIN IMMEDIATE` on a SQLite file from another process.
struct Locker(std::process::Child);

impl Locker {
    fn hold(path: &std::path::Path, secs: u64) -> Locker {
        let script = format!(
            "import sqlite3, sys, time\n\
             c = sqlite3.connect(sys.argv[1], isolation_level=None)\n\
             c.execute('BEGIN IMMEDIATE')\n\
             print('locked', flush=True)\n\
             time.sleep({secs})\n\
             c.execute('COMMIT')\n"
        );
        let mut child = Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(path)
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 runs the lock holder");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "locked");
        Locker(child)
    }

    fn wait(mut self) {
        assert!(self.0.wait().unwrap().success());
    }
}

/// C11: another process holds the SQLite write lock for 3 s, then for
/// 60 s, while p0@0..4 arrive. Short: 5 rows, no retries. Long: idem backs
/// off, commits nothing and dead-letters nothing until the lock goes.
#[test]
fn c11_sqlite_locked_by_another_process() {
    for (secs, busy_timeout_ms) in [(3, 5_000), (60, 500)] {
        let f = Fixture::new(&format!("c11-{secs}s"));
        let text = f.config_text(Mode::Upsert, "7d", "").replace(
            "busy_timeout_ms = 500",
            &format!("busy_timeout_ms = {busy_timeout_ms}"),
        );
        let config = f.dir.path().join("idem.toml");
        std::fs::write(&config, text).unwrap();
        let mut bin = Binary::start(&config, None);
        wait_for(Duration::from_secs(60), "idem to be up", || {
            bin.metric("idem_build_info", None).is_some() && f.sink_path().exists()
        });

        let locker = Locker::hold(&f.sink_path(), secs);
        let started = Instant::now();
        produce(
            &f.topic,
            &(0..5)
                .map(|n| Rec::order(0, &format!("K{n}"), &format!("ord-{n}"), 1, 1))
                .collect::<Vec<_>>(),
        );
        if secs > 10 {
            wait_for(Duration::from_secs(30), "sink retries", || {
                bin.metric("idem_sink_retries_total", None).unwrap_or(0) >= 3
            });
            assert!(
                started.elapsed() < Duration::from_secs(secs),
                "lock ended too early"
            );
            assert_eq!(
                f.committed(),
                vec![-1, -1],
                "committed while the sink was locked"
            );
        }
        locker.wait();
        f.wait_committed(&[5, -1]);
        assert_eq!(row_count(&f), 5);
        assert_eq!(bin.metric("idem_dead_letters_total", None), Some(0));
        let retries = bin.metric("idem_sink_retries_total", None).unwrap_or(0);
        if secs < 10 {
            assert_eq!(retries, 0, "a short lock is waited out by busy_timeout");
        } else {
            assert!(retries >= 3);
        }
        assert!(bin.stop().success());
        assert!(read_all(&f.dead_letter_topic, 1).is_empty());
    }
}

/// A clean stop (SIGTERM) leaves the database file complete: a copy of
/// just `orders.db` has every committed row. The batches are too small to
/// wake a checkpoint while idem runs, so until the stop they are all in
/// the WAL. With nothing else open, no `-wal` file is left; in the last
/// round an idle connection (a `sqlite3` shell left open) keeps SQLite
/// from copying the WAL at its last close, and idem's own final
/// checkpoint must do it. Several rounds, since a fault of this kind (the
/// last close on a thread that raced the process's exit) showed in one
/// stop of three.
#[test]
fn a_clean_stop_leaves_every_batch_in_the_database_file() {
    for (round, idle_connection) in [false, false, false, true].into_iter().enumerate() {
        let f = Fixture::new(&format!("clean-stop-{round}"));
        produce(
            &f.topic,
            &(0..200)
                .map(|n| Rec::order(n % 2, &format!("K{n}"), &format!("ord-{n}"), 1, 1))
                .collect::<Vec<_>>(),
        );
        let mut bin = Binary::start(&f.write_config(Mode::Upsert, "7d"), None);
        f.wait_committed(&[100, 100]);
        let wal = f.sink_path().with_extension("db-wal");
        assert!(wal.exists(), "the batches are in the WAL while idem runs");
        let idle = idle_connection.then(|| {
            let conn = rusqlite::Connection::open(f.sink_path()).unwrap();
            conn.query_row("SELECT count(*) FROM orders", [], |r| r.get::<_, i64>(0))
                .unwrap();
            conn
        });
        assert!(bin.stop().success());
        if idle.is_none() {
            assert!(!wal.exists(), "round {round}: the stop left a -wal file");
        }
        let copy = f.dir.path().join("copy.db");
        std::fs::copy(f.sink_path(), &copy).unwrap();
        let rows: i64 = rusqlite::Connection::open(&copy)
            .unwrap()
            .query_row("SELECT count(*) FROM orders", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 200, "round {round}: the database file alone");
        drop(idle);
    }
}

/// Backpressure: a sink locked for longer than `max.poll.interval.ms`
/// pauses consumption while idem keeps polling, so the consumer stays in
/// its group (no revoke, no rebalance) and commits nothing; once the lock
/// is gone the batch goes through.
#[test]
fn a_sink_down_longer_than_max_poll_interval_keeps_the_member() {
    let f = Fixture::new("backpressure");
    let text = f.config_text(Mode::Upsert, "7d", "").replace(
        "session_timeout_ms = 6000",
        "session_timeout_ms = 6000\nproperties = { \"max.poll.interval.ms\" = \"7000\" }",
    );
    let config = f.dir.path().join("idem.toml");
    std::fs::write(&config, text).unwrap();
    let mut bin = Binary::start(&config, None);
    wait_for(Duration::from_secs(60), "the assignment", || {
        bin.metric("idem_assigned_partitions", None) == Some(2) && f.sink_path().exists()
    });
    let revokes = || {
        bin.metric("idem_rebalances_total", Some("kind=\"revoke\""))
            .unwrap_or(0)
    };
    assert_eq!(revokes(), 0);

    let locker = Locker::hold(&f.sink_path(), 20);
    produce(
        &f.topic,
        &(0..50)
            .map(|n| Rec::order(n % 2, &format!("K{n}"), &format!("ord-{n}"), 1, 1))
            .collect::<Vec<_>>(),
    );
    wait_for(Duration::from_secs(30), "sink retries", || {
        bin.metric("idem_sink_retries_total", None).unwrap_or(0) >= 3
    });
    locker.wait();
    f.wait_committed(&[25, 25]);
    assert_eq!(row_count(&f), 50);
    assert_eq!(
        revokes(),
        0,
        "the member stayed in its group through a 20 s outage with max.poll.interval.ms = 7 s"
    );
    assert_eq!(bin.metric("idem_assigned_partitions", None), Some(2));
    assert!(bin.stop().success());
}

/// The acceptance run of the core: a stream with duplicates, conflicts,
/// stale versions and poison, and idem killed with SIGKILL several times
/// during the run, ends with exactly the expected rows in both sink modes
/// and the committed offsets at the end of each partition.
///
/// IDEM_SOAK_RECORDS (default 20000) and IDEM_SOAK_KILLS (default 5) set
/// the size; scripts/crash-soak.sh runs it with 100000.
#[test]
fn sigkill_during_a_long_run_ends_exactly_right() {
    let total: usize = std::env::var("IDEM_SOAK_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let kills: usize = std::env::var("IDEM_SOAK_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let s = stream(total, 2);
    for mode in [Mode::Upsert, Mode::Insert] {
        let f = Fixture::new(&format!("soak-{mode:?}").to_lowercase());
        produce(&f.topic, &s.records);
        let ends = end_offsets(&f.topic, 2);
        let config = f.write_config(mode, "7d");

        let started = Instant::now();
        let mut killed = 0;
        let step = (total / (kills + 1) / 2).max(1) as u64;
        for k in 0..kills {
            let bin = Binary::start(&config, None);
            let mut bin = bin;
            wait_for(Duration::from_secs(120), "progress before a kill", || {
                records_read(&bin) >= step
            });
            // Kill a little after the threshold, at a moment that varies.
            std::thread::sleep(Duration::from_millis((k as u64 * 37) % 200));
            bin.sigkill();
            killed += 1;
        }
        let mut bin = Binary::start(&config, None);
        let deadline = Duration::from_secs(600);
        let wait_started = Instant::now();
        while f.committed() != ends {
            assert!(
                wait_started.elapsed() < deadline,
                "did not reach the end: {:?} vs {ends:?}",
                f.committed()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        assert!(bin.stop().success());
        eprintln!(
            "soak {mode:?}: {total} records ({} duplicates), {killed} SIGKILLs, {:.1} s",
            s.duplicates,
            started.elapsed().as_secs_f64()
        );
        match mode {
            Mode::Upsert => assert!(f.rows() == s.rows, "upsert rows differ from the model"),
            Mode::Insert => assert!(
                f.inserted() == s.inserted,
                "inserted rows differ from the model"
            ),
        }
        assert_eq!(f.committed(), ends);
    }
}
