//! The PostgreSQL sink against a real PostgreSQL server (Debian's package,
//! started by scripts/test.sh, which exports IDEM_PG_URL) and the real
//! Kafka broker.

mod common;

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use idem::config::Config;
use idem::outcome::Outcome;

fn pg_url() -> String {
    std::env::var("IDEM_PG_URL").expect(
        "IDEM_PG_URL is not set: these tests need the PostgreSQL server that \
         scripts/test.sh starts; run the suites with scripts/test.sh",
    )
}

/// Runs statements (several allowed, no results).
fn pg_exec(sql: &str) {
    pg(|client| async move {
        client.batch_execute(sql).await.expect(sql);
    })
}

/// Runs one query.
fn pg_query(sql: &str) -> Vec<tokio_postgres::Row> {
    pg(|client| async move { client.query(sql, &[]).await.expect(sql) })
}

fn pg<T, F: std::future::Future<Output = T>>(f: impl FnOnce(tokio_postgres::Client) -> F) -> T {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (client, connection) = tokio_postgres::connect(&pg_url(), tokio_postgres::NoTls)
            .await
            .expect("connect to PostgreSQL");
        tokio::spawn(connection);
        f(client).await
    })
}

/// A fixture whose sink is a fresh PostgreSQL table.
struct PgFixture {
    f: Fixture,
    table: String,
}

impl PgFixture {
    fn new(name: &str) -> PgFixture {
        let f = Fixture::new(&format!("pg-{name}"));
        let table = unique(&format!("orders_{name}")).replace(['-', '.'], "_");
        PgFixture { f, table }
    }

    fn config_text(&self, mode: Mode, create: bool) -> String {
        let table = match mode {
            Mode::Upsert => {
                "mode = \"upsert\"\nkey_column = \"id\"\nversion_column = \"ver\"\n\
                 columns = { id = \"/id\", ver = \"/ver\", qty = \"/qty\" }"
            }
            Mode::Insert => "mode = \"insert\"\ncolumns = { id = \"/id\", qty = \"/qty\" }",
        };
        let sink = format!(
            "[sink]\nkind = \"postgres\"\nurl = \"{}\"\nstatement_timeout_ms = 1000\n\n\
             [sink.table]\nname = \"{}\"\ncreate = {create}\n{table}\n",
            pg_url(),
            self.table
        );
        self.f.config_text_with_sink("7d", &sink)
    }

    fn config(&self, mode: Mode) -> Config {
        Config::parse(&self.config_text(mode, true), Path::new("pg.toml")).expect("config")
    }

    fn write_config(&self, mode: Mode) -> PathBuf {
        self.f.write_text(&self.config_text(mode, true))
    }

    /// upsert rows: id -> (ver, qty)
    fn rows(&self) -> BTreeMap<String, (i64, i64)> {
        pg_query(&format!(
            "SELECT id, ver, (qty #>> '{{}}')::bigint FROM {} ORDER BY id",
            self.table
        ))
        .iter()
        .map(|r| (r.get::<_, String>(0), (r.get(1), r.get(2))))
        .collect()
    }

    /// Runs idem in upsert mode over the `n` records on partition 0 of the
    /// topic, into a table the test created, until they are committed;
    /// checks how many were applied and dead-lettered.
    fn run_upserts(&self, n: i64, applied: u64, dead_lettered: u64) {
        let text = self.config_text(Mode::Upsert, false);
        let run = Running::start(Config::parse(&text, Path::new("pg.toml")).unwrap());
        run.wait_read(n as u64);
        self.f.wait_committed(&[n, -1]);
        assert_eq!(run.count(Outcome::Applied), applied);
        assert_eq!(run.count(Outcome::DeadLettered), dead_lettered);
        run.stop();
    }

    /// The ids in the table, in order.
    fn ids(&self) -> Vec<String> {
        pg_query(&format!("SELECT id FROM {} ORDER BY id", self.table))
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    fn count(&self) -> i64 {
        pg_query(&format!("SELECT count(*) FROM {}", self.table))[0].get(0)
    }
}

/// C8 on PostgreSQL: the late older version is stale; wiping the dedup
/// store and replaying from offset 0 never moves the row backwards.
#[test]
fn c8_stale_record_on_replay_postgres() {
    let p = PgFixture::new("c8");
    produce(
        &p.f.topic,
        &[
            Rec::order(0, "V1", "ord-10", 1, 1),
            Rec::order(0, "V3", "ord-10", 3, 3),
            Rec::order(0, "V2", "ord-10", 2, 2),
        ],
    );
    let run = Running::start(p.config(Mode::Upsert));
    run.wait_read(3);
    assert_eq!(run.count(Outcome::Stale), 1);
    assert_eq!(run.count(Outcome::Applied), 2);
    run.stop();
    assert_eq!(p.rows()["ord-10"], (3, 3));

    std::fs::remove_dir_all(p.f.dedup_path()).unwrap();
    let mut config = p.config(Mode::Upsert);
    config.kafka.group_id = unique("idem-test-pg-c8-replay");
    let run = Running::start(config);
    run.wait_read(3);
    assert_eq!(p.rows()["ord-10"], (3, 3));
    assert_eq!(run.count(Outcome::Stale), 2);
    assert_eq!(run.count(Outcome::Duplicate), 1);
    run.assert_outcomes_add_up();
    run.stop();
}

/// C9: one entity twice and one key twice in one batch: no "cannot affect
/// row a second time", no retry loop.
#[test]
fn c9_one_key_twice_in_one_postgres_batch() {
    let p = PgFixture::new("c9");
    let k13 = Rec::order(0, "K13", "ord-13", 1, 13);
    produce(
        &p.f.topic,
        &[
            Rec::order(0, "K11a", "ord-11", 1, 1),
            Rec::order(0, "K11b", "ord-11", 2, 2),
            k13.clone(),
            k13,
            Rec::order(0, "K14", "ord-14", 1, 14),
        ],
    );
    let mut config = p.config(Mode::Upsert);
    config.batch.max_records = 10;
    config.batch.linger_ms = 500;
    let run = Running::start(config);
    run.wait_read(5);
    p.f.wait_committed(&[5, -1]);
    assert_eq!(run.count(Outcome::Duplicate), 1);
    assert_eq!(
        run.count(Outcome::Applied),
        4,
        "ord-11 v1 and v2, ord-13, ord-14"
    );
    assert_eq!(
        run.metrics
            .sink_retries
            .with_label_values(&["postgres", "unavailable"])
            .get(),
        0
    );
    assert_eq!(
        run.metrics
            .sink_retries
            .with_label_values(&["postgres", "needs-operator"])
            .get(),
        0
    );
    run.assert_outcomes_add_up();
    run.stop();
    let rows = p.rows();
    assert_eq!(rows["ord-11"], (2, 2));
    assert_eq!(rows["ord-13"], (1, 13));
    assert_eq!(rows["ord-14"], (1, 14));
    assert_eq!(rows.len(), 3);
}

/// A value the column type or a constraint refuses dead-letters that record
/// alone; the rest of the batch is applied.
#[test]
fn a_bad_value_dead_letters_only_its_record() {
    let p = PgFixture::new("bad_value");
    pg_exec(&format!(
        "CREATE TABLE {} (id text PRIMARY KEY, ver bigint NOT NULL, \
         qty integer NOT NULL CHECK (qty >= 0))",
        p.table
    ));
    produce(
        &p.f.topic,
        &[
            Rec::order(0, "K1", "ord-1", 1, 1),
            Rec::order(0, "K2", "ord-2", 1, 1)
                .with_value(br#"{"id":"ord-2","ver":1,"qty":"lots"}"#),
            Rec::order(0, "K3", "ord-3", 1, -5),
            Rec::order(0, "K4", "ord-4", 1, 4),
        ],
    );
    p.run_upserts(4, 2, 2);
    assert_eq!(p.ids(), ["ord-1", "ord-4"]);
    let letters = read_all(&p.f.dead_letter_topic, 1);
    assert_eq!(letters.len(), 2);
    for m in &letters {
        assert_eq!(header(m, "idem.reason"), Some(&b"sink-rejected"[..]));
    }
}

/// Entity keys PostgreSQL cannot take: one too long for the key's index
/// (SQLSTATE 54000), one holding a NUL character, and one that the key
/// column's type cannot read (in the look-up of held versions). Each is
/// dead-lettered alone; the records around them are applied.
#[test]
fn keys_postgres_cannot_store_dead_letter_only_their_record() {
    let p = PgFixture::new("bad_keys");
    pg_exec(&format!(
        "CREATE TABLE {} (id text PRIMARY KEY, ver bigint NOT NULL, qty jsonb)",
        p.table
    ));
    // Random letters: PostgreSQL compresses a repetitive key into its
    // index, and this one must not fit.
    let mut state = 0x9E37_79B9_7F4A_7C15_u64;
    let long_id = (0..12_000)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            char::from(b'a' + (state % 26) as u8)
        })
        .collect::<String>();
    produce(
        &p.f.topic,
        &[
            Rec::order(0, "K1", "ord-1", 1, 1),
            Rec::order(0, "K2", "x", 1, 1)
                .with_value(format!(r#"{{"id":"{long_id}","ver":1,"qty":1}}"#).as_bytes()),
            Rec::order(0, "K3", "x", 1, 1).with_value(br#"{"id":"k\u0000nul","ver":1,"qty":1}"#),
            Rec::order(0, "K4", "ord-4", 1, 4),
        ],
    );
    p.run_upserts(4, 2, 2);
    assert_eq!(p.ids(), ["ord-1", "ord-4"]);

    // An integer key column: a key it cannot read fails the look-up of
    // the whole batch, which is then done key by key.
    let q = PgFixture::new("int_keys");
    pg_exec(&format!(
        "CREATE TABLE {} (id bigint PRIMARY KEY, ver bigint NOT NULL, qty jsonb)",
        q.table
    ));
    produce(
        &q.f.topic,
        &[
            Rec::order(0, "K1", "x", 1, 1).with_value(br#"{"id":11,"ver":1,"qty":1}"#),
            Rec::order(0, "K2", "x", 1, 1).with_value(br#"{"id":"eleven","ver":1,"qty":1}"#),
            Rec::order(0, "K3", "x", 1, 1).with_value(br#"{"id":12,"ver":1,"qty":1}"#),
        ],
    );
    q.run_upserts(3, 2, 1);
    let letters = read_all(&q.f.dead_letter_topic, 1);
    assert_eq!(
        header(&letters[0], "idem.reason"),
        Some(&b"sink-rejected"[..])
    );
}

/// A table locked past the statement timeout: the batch is retried, never
/// dead-lettered, and lands once the lock is gone.
#[test]
fn a_locked_table_is_retried_not_dead_lettered() {
    let p = PgFixture::new("locked");
    let run = Running::start(p.config(Mode::Upsert));
    wait_for(Duration::from_secs(60), "the table", || {
        !pg_query(&format!("SELECT to_regclass('{}')::text", p.table))[0]
            .get::<_, Option<String>>(0)
            .unwrap_or_default()
            .is_empty()
    });
    let table = p.table.clone();
    let locker = std::thread::spawn(move || {
        pg_exec(&format!(
            "BEGIN; LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(4); COMMIT"
        ))
    });
    std::thread::sleep(Duration::from_millis(300));
    produce(
        &p.f.topic,
        &(0..5)
            .map(|n| Rec::order(0, &format!("K{n}"), &format!("ord-{n}"), 1, 1))
            .collect::<Vec<_>>(),
    );
    run.wait_read(5);
    locker.join().unwrap();
    assert!(
        run.metrics
            .sink_retries
            .with_label_values(&["postgres", "unavailable"])
            .get()
            >= 1
    );
    assert_eq!(run.count(Outcome::DeadLettered), 0);
    assert_eq!(run.count(Outcome::Applied), 5);
    run.stop();
    assert_eq!(p.count(), 5);
}

/// SIGKILL after the sink write (before the dedup write) and in the middle
/// of the sink transaction, in both modes: the restart ends with exactly
/// the rows, p0 committed at 3.
#[test]
fn sigkill_during_postgres_writes() {
    for mode in [Mode::Upsert, Mode::Insert] {
        for point in ["mid-sink-batch", "after-sink-write"] {
            let p = PgFixture::new(&format!("kill_{}", point.replace('-', "_")));
            produce(
                &p.f.topic,
                &[
                    Rec::order(0, "K0", "ord-0", 1, 1),
                    Rec::order(0, "K1", "ord-1", 1, 1),
                    Rec::order(0, "K2", "ord-2", 1, 1),
                ],
            );
            let config = p.write_config(mode);
            let mut bin = Binary::start(&config, Some(point));
            let status = bin.wait(Duration::from_secs(90));
            assert_eq!(status.signal(), Some(libc::SIGKILL), "{mode:?} {point}");
            let before = p.count();
            assert_eq!(
                before,
                if point == "mid-sink-batch" { 0 } else { 3 },
                "{mode:?} {point}"
            );
            let mut bin = Binary::start(&config, None);
            p.f.wait_committed(&[3, -1]);
            assert!(bin.stop().success());
            assert_eq!(p.count(), 3, "{mode:?} {point}");
        }
    }
}
