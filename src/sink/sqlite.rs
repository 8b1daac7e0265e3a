//! The SQLite sink, idem's embedded default.
//!
//! Why it is idempotent:
//! - upsert mode writes `INSERT ... ON CONFLICT (key) DO UPDATE ... WHERE
//!   excluded.version > table.version`. Only a strictly newer version
//!   changes a row. When nothing changed, one look-up tells the two cases
//!   apart: the row holds the same version (this event, or another body
//!   under the same version, was applied before: `AlreadyPresent`, counted
//!   as a duplicate) or a newer one (`Stale`). So the first body applied for
//!   a version stays, however often and in whatever order the log is
//!   replayed.
//! - insert mode writes `INSERT ... ON CONFLICT (idempotency key) DO
//!   NOTHING`: a second insert of a key is a no-op.
//!
//! Why it is durable: each batch is one `BEGIN IMMEDIATE ... COMMIT`
//! transaction on a WAL database with `synchronous = FULL`, so the commit
//! returns after the log is synced.
//!
//! Speed: the page cache is [`CACHE_KIB`] instead of SQLite's 2 MiB, so
//! that the pages of a table of a few hundred thousand entities stay in
//! memory instead of being read back with one `pread` each, and values are
//! bound by reference, without a copy per cell.
//!
//! Checkpoints (copying the WAL's pages into the database file) run on a
//! thread of their own with its own connection, so that a batch's latency
//! does not include them. The thread is woken once the WAL holds
//! [`CHECKPOINT_FRAMES`] pages, not after every commit: an upsert rewrites
//! a whole page for one row, the same hot pages are written again by
//! nearly every batch, and a checkpoint copies each page once however
//! often the WAL holds it, then syncs the database file once. A checkpoint
//! never makes a commit more or less durable (the commit is durable once
//! the WAL is synced). SQLite starts the WAL over only when a write
//! begins after everything in it has been copied; if the thread falls
//! behind, or its checkpoints keep overlapping the next batch, the writer
//! checkpoints by itself at [`BACKSTOP_FRAMES`], which bounds the WAL
//! (unless a reader keeps an old snapshot open). At a stop, the sink
//! copies the whole WAL into the database file, so that the file alone is
//! complete (see its `Drop`).
//!
//! A record the database refuses (constraint, type mismatch, too big) is
//! rejected alone: SQLite rolls back just that statement, and the rest of
//! the batch commits. A locked file waits `busy_timeout_ms` per statement,
//! then fails the batch as unavailable, and the caller retries with
//! backoff.

use std::cell::Cell as StdCell;
use std::os::raw::c_int;
use std::path::Path;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::hooks::Wal;
use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{params_from_iter, Connection, ToSql};
use serde_json::Value;

use super::table::{quote, Cell, TableMapping};
use super::{Sink, SinkError, SinkWrite, WriteOutcome};
use crate::config::{SinkMode, SqliteSinkConfig};
use crate::failpoint;
use crate::fault::{self, Fault};

/// The page cache, at most (SQLite allocates it as pages are used). 32 MiB
/// holds a table of about 300,000 rows of a few short columns; SQLite's
/// default of 2 MiB holds a tenth of that, and every page read past it is a
/// system call, inside the batch's transaction.
pub const CACHE_KIB: i64 = 32 * 1024;

/// Pages in the WAL after a commit that wake the checkpoint thread:
/// 16 MiB of 4 KiB pages.
pub const CHECKPOINT_FRAMES: u32 = 4_096;

/// Pages in the WAL after a commit at which the writer checkpoints by
/// itself before its next batch: 64 MiB of 4 KiB pages. Reached only when
/// the thread falls behind; the WAL starts over at the writer's next
/// transaction once everything in it has been copied.
pub const BACKSTOP_FRAMES: u32 = 16_384;

/// What SQLite cuts the `-wal` file back to when it starts the WAL over:
/// a reader that held the WAL back lets it grow past [`BACKSTOP_FRAMES`],
/// and without a limit the file would keep that size.
pub const WAL_FILE_LIMIT_BYTES: i64 = 64 << 20;

thread_local! {
    /// Pages in the WAL after the last commit on this thread, set by
    /// [`note_wal_frames`], which SQLite calls inside the commit.
    static WAL_FRAMES: StdCell<u32> = const { StdCell::new(0) };
}

/// The writer's WAL hook (replacing SQLite's own automatic checkpoint).
/// A plain function: it can only hand the count on through the thread.
fn note_wal_frames(_: &Wal, frames: c_int) -> rusqlite::Result<()> {
    WAL_FRAMES.set(u32::try_from(frames).unwrap_or(0));
    Ok(())
}

/// What a commit that left `frames` pages in the WAL asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Checkpoint {
    NotYet,
    WakeThread,
    Inline,
}

fn checkpoint_after(frames: u32, wake_at: u32, backstop_at: u32) -> Checkpoint {
    if frames >= backstop_at {
        Checkpoint::Inline
    } else if frames >= wake_at {
        Checkpoint::WakeThread
    } else {
        Checkpoint::NotYet
    }
}

pub struct SqliteSink {
    conn: Connection,
    /// For the stop's log line.
    path: std::path::PathBuf,
    /// `None`: SQLite's own automatic checkpoints run instead.
    checkpoint: Option<Checkpointer>,
    /// [`CHECKPOINT_FRAMES`] and [`BACKSTOP_FRAMES`], lowered by tests.
    wake_at: u32,
    backstop_at: u32,
    mapping: TableMapping,
    sql: String,
    /// upsert: reads the version a row holds, to tell a replay of the
    /// same version from a stale one.
    version_sql: Option<String>,
}

impl SqliteSink {
    /// Opens the database, sets WAL and durability pragmas, and creates the
    /// table when configured to.
    ///
    /// # Errors
    /// [`SinkError::NeedsOperator`] when the file cannot be opened or the
    /// table cannot be created; [`SinkError::Unavailable`] when it is
    /// locked.
    pub fn open(config: &SqliteSinkConfig) -> Result<SqliteSink, SinkError> {
        let conn = Connection::open(&config.path).map_err(classify_batch_error)?;
        conn.busy_timeout(Duration::from_millis(config.busy_timeout_ms))
            .map_err(classify_batch_error)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(classify_batch_error)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(classify_batch_error)?;
        // A negative cache_size is in KiB.
        conn.pragma_update(None, "cache_size", -CACHE_KIB)
            .map_err(classify_batch_error)?;
        conn.pragma_update(None, "journal_size_limit", WAL_FILE_LIMIT_BYTES)
            .map_err(classify_batch_error)?;
        let checkpoint = Checkpointer::start(&config.path, config.busy_timeout_ms);
        if checkpoint.is_some() {
            conn.wal_hook(Some(note_wal_frames));
        }

        let mapping = TableMapping::new(&config.table);
        let table = quote(&mapping.table);
        let key = quote(&mapping.key_column);
        if config.table.create {
            // Untyped columns: SQLite stores each value with its own type.
            let defs: Vec<String> = mapping
                .names
                .iter()
                .map(|n| {
                    if *n == mapping.key_column {
                        format!("{} PRIMARY KEY NOT NULL", quote(n))
                    } else {
                        quote(n)
                    }
                })
                .collect();
            let ddl = format!("CREATE TABLE IF NOT EXISTS {table} ({})", defs.join(", "));
            conn.execute(&ddl, []).map_err(classify_batch_error)?;
        }

        let quoted: Vec<String> = mapping.names.iter().map(|n| quote(n)).collect();
        let insert = format!(
            "INSERT INTO {table} ({}) VALUES ({})",
            quoted.join(", "),
            vec!["?"; quoted.len()].join(", ")
        );
        let (sql, version_sql) = match &mapping.version_column {
            Some(version) => {
                let v = quote(version);
                let updates: Vec<String> = quoted
                    .iter()
                    .filter(|c| **c != key)
                    .map(|c| format!("{c} = excluded.{c}"))
                    .collect();
                (
                    format!(
                        "{insert} ON CONFLICT ({key}) DO UPDATE SET {} \
                         WHERE CAST(excluded.{v} AS INTEGER) > CAST({table}.{v} AS INTEGER)",
                        updates.join(", ")
                    ),
                    Some(format!(
                        "SELECT CAST({v} AS INTEGER) FROM {table} WHERE {key} = ?"
                    )),
                )
            }
            None => (format!("{insert} ON CONFLICT ({key}) DO NOTHING"), None),
        };
        // Prepare once now so that a schema mismatch fails at start-up.
        conn.prepare_cached(&sql).map_err(classify_batch_error)?;
        if let Some(q) = &version_sql {
            conn.prepare_cached(q).map_err(classify_batch_error)?;
        }
        Ok(SqliteSink {
            conn,
            path: config.path.clone(),
            checkpoint,
            wake_at: CHECKPOINT_FRAMES,
            backstop_at: BACKSTOP_FRAMES,
            mapping,
            sql,
            version_sql,
        })
    }

    fn apply_in_transaction(
        &mut self,
        batch: &[SinkWrite<'_>],
    ) -> Result<Vec<WriteOutcome>, rusqlite::Error> {
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut stmt = self.conn.prepare_cached(&self.sql)?;
        for (i, write) in batch.iter().enumerate() {
            if i == batch.len() / 2 {
                // Half the batch is written inside the open transaction.
                failpoint::hit("mid-sink-batch");
            }
            let row = match self.mapping.row(write) {
                Ok(row) => row,
                Err(reason) => {
                    outcomes.push(WriteOutcome::Rejected(reason));
                    continue;
                }
            };
            match stmt.execute(params_from_iter(row.cells.iter().map(Param))) {
                Ok(0) => outcomes.push(match self.mapping.mode {
                    SinkMode::Upsert => self.unchanged_upsert(&row.cells, row.version)?,
                    SinkMode::Insert => WriteOutcome::AlreadyPresent,
                }),
                Ok(_) => outcomes.push(WriteOutcome::Applied),
                Err(e) if is_record_error(&e) => {
                    // SQLite rolled back this statement only; the
                    // transaction and the rest of the batch go on.
                    outcomes.push(WriteOutcome::Rejected(e.to_string()));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(outcomes)
    }
}

impl SqliteSink {
    /// An upsert that changed nothing: the same version is already there,
    /// or a newer one.
    fn unchanged_upsert(
        &self,
        cells: &[Cell],
        version: Option<i64>,
    ) -> Result<WriteOutcome, rusqlite::Error> {
        let sql = self.version_sql.as_deref().expect("upsert");
        let key = cell_to_sql(&cells[self.mapping.key_index]);
        let held: Option<i64> = self
            .conn
            .prepare_cached(sql)?
            .query_row([key], |r| r.get(0))?;
        Ok(if held == version {
            WriteOutcome::AlreadyPresent
        } else {
            WriteOutcome::Stale
        })
    }
}

impl Sink for SqliteSink {
    fn name(&self) -> &'static str {
        "sqlite"
    }

    fn apply(&mut self, batch: &[SinkWrite<'_>]) -> Result<Vec<WriteOutcome>, SinkError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        self.conn
            .execute_batch("BEGIN IMMEDIATE")
            .map_err(classify_batch_error)?;
        let outcomes = match self.apply_in_transaction(batch) {
            Ok(outcomes) => outcomes,
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                return Err(classify_batch_error(e));
            }
        };
        WAL_FRAMES.set(0);
        if let Err(e) = self.conn.execute_batch("COMMIT") {
            let _ = self.conn.execute_batch("ROLLBACK");
            return Err(classify_batch_error(e));
        }
        self.after_commit(WAL_FRAMES.take());
        Ok(outcomes)
    }
}

impl SqliteSink {
    fn after_commit(&self, frames: u32) {
        let Some(Checkpointer { wake, .. }) = &self.checkpoint else {
            return;
        };
        match checkpoint_after(frames, self.wake_at, self.backstop_at) {
            Checkpoint::NotYet => {}
            // Full: a wake-up is pending already, which will see this
            // commit's pages too.
            Checkpoint::WakeThread => {
                let _ = wake.try_send(());
            }
            Checkpoint::Inline => {
                tracing::debug!(
                    frames,
                    "sqlite sink: the WAL is long; checkpointing before the next batch"
                );
                checkpoint_passive(&self.conn);
            }
        }
    }
}

/// The checkpoint thread and what wakes it.
struct Checkpointer {
    wake: SyncSender<()>,
    thread: JoinHandle<()>,
}

impl Checkpointer {
    /// Starts the thread on a connection of its own. `None` when that
    /// connection cannot be opened: the writer then keeps SQLite's own
    /// checkpoints after its commits.
    fn start(path: &Path, busy_timeout_ms: u64) -> Option<Checkpointer> {
        let conn = Connection::open(path).ok()?;
        conn.busy_timeout(Duration::from_millis(busy_timeout_ms))
            .ok()?;
        // The checkpoint syncs the WAL before it copies and the database
        // after, as the writer's own would.
        conn.pragma_update(None, "synchronous", "FULL").ok()?;
        let (wake, woken) = mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("idem-sqlite-checkpoint".into())
            .spawn(move || checkpoint_loop(&conn, &woken))
            .ok()?;
        Some(Checkpointer { wake, thread })
    }
}

impl Drop for SqliteSink {
    /// Copies the whole WAL into the database file, so that the file alone
    /// holds every committed batch once idem has stopped:
    /// - the checkpoint thread is ended and waited for first (left to it,
    ///   the last close raced the process's exit);
    /// - a PASSIVE checkpoint copies everything unless another
    ///   connection reads an older snapshot; it does not wait, and it runs
    ///   even when another process has the file open, which keeps SQLite's
    ///   own copy at the last close from running;
    /// - only if pages are left, a FULL one waits up to `busy_timeout_ms`
    ///   for that connection's transaction to end; if it does not, the
    ///   database file alone is incomplete, and that is logged;
    /// - the writer's connection closes last, and SQLite removes the
    ///   `-wal` file unless another connection is still open.
    fn drop(&mut self) {
        if let Some(Checkpointer { wake, thread }) = self.checkpoint.take() {
            drop(wake);
            let _ = thread.join();
        }
        let copied = checkpoint(&self.conn, "PASSIVE").and_then(|pages| {
            if pages.all_copied() {
                Ok(pages)
            } else {
                checkpoint(&self.conn, "FULL")
            }
        });
        match copied {
            Ok(pages) if pages.all_copied() => {}
            Ok(pages) => tracing::warn!(
                path = %self.path.display(),
                pages_in_wal = pages.in_wal,
                pages_copied = pages.copied,
                "sqlite sink: another connection's transaction kept the WAL from being copied, \
                 so some committed batches stay in its -wal file only; nothing is lost, but \
                 the database file alone is incomplete and may not open: keep the -wal file \
                 with it"
            ),
            Err(e) => tracing::warn!(
                path = %self.path.display(),
                error = %e,
                "sqlite sink: the final checkpoint failed; committed batches may be in the \
                 -wal file only; keep it with the database file"
            ),
        }
    }
}

/// What a checkpoint reports: pages in the WAL, and how many of them are
/// in the database file.
struct WalPages {
    in_wal: i64,
    copied: i64,
}

impl WalPages {
    fn all_copied(&self) -> bool {
        self.in_wal >= 0 && self.in_wal == self.copied
    }
}

/// One checkpoint in `mode` (PASSIVE, FULL...), and what it copied.
fn checkpoint(conn: &Connection, mode: &str) -> rusqlite::Result<WalPages> {
    conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
        Ok(WalPages {
            in_wal: r.get(1)?,
            copied: r.get(2)?,
        })
    })
}

/// Checkpoints once per wake-up until the sink is dropped. PASSIVE: it
/// copies what no reader still needs and never waits for the writer, so
/// the next batch's transaction can start while it runs.
fn checkpoint_loop(conn: &Connection, woken: &Receiver<()>) {
    while woken.recv().is_ok() {
        checkpoint_passive(conn);
    }
}

/// A failed checkpoint loses nothing: the pages stay in the WAL, and the
/// next one copies them.
fn checkpoint_passive(conn: &Connection) {
    if let Err(e) = checkpoint(conn, "PASSIVE") {
        tracing::debug!(error = %e, "sqlite sink: checkpoint failed; the next one retries it");
    }
}

/// A cell bound by reference: text goes to SQLite without a copy.
struct Param<'a>(&'a Cell);

impl ToSql for Param<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self.0 {
            Cell::Text(s) | Cell::Json(Value::String(s)) => {
                ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes()))
            }
            other => ToSqlOutput::Owned(cell_to_sql(other)),
        })
    }
}

fn cell_to_sql(cell: &Cell) -> rusqlite::types::Value {
    use rusqlite::types::Value as Sql;
    match cell {
        Cell::Null | Cell::Json(Value::Null) => Sql::Null,
        Cell::Int(i) => Sql::Integer(*i),
        Cell::Text(s) | Cell::Json(Value::String(s)) => Sql::Text(s.clone()),
        Cell::Json(Value::Bool(b)) => Sql::Integer(i64::from(*b)),
        Cell::Json(Value::Number(n)) => match n.as_i64() {
            Some(i) => Sql::Integer(i),
            // Integers beyond i64 keep their exact digits as text.
            None if n
                .to_string()
                .bytes()
                .all(|b| b.is_ascii_digit() || b == b'-') =>
            {
                Sql::Text(n.to_string())
            }
            None => n
                .as_f64()
                .map_or_else(|| Sql::Text(n.to_string()), Sql::Real),
        },
        Cell::Json(other) => Sql::Text(other.to_string()),
    }
}

/// Errors caused by one record's values rather than by the database.
fn is_record_error(e: &rusqlite::Error) -> bool {
    fault::sqlite(e) == Fault::Record
}

fn classify_batch_error(e: rusqlite::Error) -> SinkError {
    fault::sqlite(&e).sink_error(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TableConfig;
    use crate::record::{IdemKey, Offset, Partition};

    fn config(dir: &std::path::Path, mode: SinkMode) -> SqliteSinkConfig {
        let upsert = mode == SinkMode::Upsert;
        SqliteSinkConfig {
            path: dir.join("sink.db"),
            busy_timeout_ms: 100,
            table: TableConfig {
                name: "orders".into(),
                mode,
                key_column: upsert.then(|| "id".to_string()),
                version_column: upsert.then(|| "ver".to_string()),
                version_from: None,
                columns: [("id", "/id"), ("ver", "/ver"), ("qty", "/qty")]
                    .into_iter()
                    .filter(|(c, _)| upsert || *c != "ver")
                    .map(|(c, p)| (c.to_string(), p.to_string()))
                    .collect(),
                payload_column: None,
                create: true,
            },
        }
    }

    fn apply(sink: &mut SqliteSink, key: &str, body: &str) -> WriteOutcome {
        crate::sink::apply_one(sink, key, body)
    }

    #[test]
    fn upsert_keeps_the_newest_version() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = SqliteSink::open(&config(dir.path(), SinkMode::Upsert)).unwrap();
        let r1 = r#"{"id":"ord-10","ver":1,"qty":1}"#;
        assert_eq!(apply(&mut sink, "a", r1), WriteOutcome::Applied);
        let r3 = r#"{"id":"ord-10","ver":3,"qty":3}"#;
        assert_eq!(apply(&mut sink, "b", r3), WriteOutcome::Applied);
        let r2 = r#"{"id":"ord-10","ver":2,"qty":2}"#;
        assert_eq!(apply(&mut sink, "c", r2), WriteOutcome::Stale);
        assert_eq!(
            apply(&mut sink, "b", r3),
            WriteOutcome::AlreadyPresent,
            "re-apply"
        );
        let other_body = r#"{"id":"ord-10","ver":3,"qty":30}"#;
        assert_eq!(
            apply(&mut sink, "d", other_body),
            WriteOutcome::AlreadyPresent,
            "the first body of a version stays"
        );
        let (ver, qty): (i64, i64) = sink
            .conn
            .query_row("SELECT ver, qty FROM orders WHERE id = 'ord-10'", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!((ver, qty), (3, 3));
    }

    /// A table made by hand with a text version column still compares
    /// versions as numbers: 10 is newer than 9.
    #[test]
    fn versions_compare_as_numbers_whatever_the_column_type() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path(), SinkMode::Upsert);
        cfg.table.create = false;
        Connection::open(&cfg.path)
            .unwrap()
            .execute_batch("CREATE TABLE orders (id TEXT PRIMARY KEY, ver TEXT, qty INTEGER)")
            .unwrap();
        let mut sink = SqliteSink::open(&cfg).unwrap();
        assert_eq!(
            apply(&mut sink, "a", r#"{"id":"x","ver":9,"qty":1}"#),
            WriteOutcome::Applied
        );
        assert_eq!(
            apply(&mut sink, "b", r#"{"id":"x","ver":10,"qty":2}"#),
            WriteOutcome::Applied
        );
        assert_eq!(
            apply(&mut sink, "c", r#"{"id":"x","ver":10,"qty":3}"#),
            WriteOutcome::AlreadyPresent
        );
    }

    #[test]
    fn a_commit_asks_for_a_checkpoint_by_the_length_of_the_wal() {
        assert_eq!(checkpoint_after(0, 10, 40), Checkpoint::NotYet);
        assert_eq!(checkpoint_after(9, 10, 40), Checkpoint::NotYet);
        assert_eq!(checkpoint_after(10, 10, 40), Checkpoint::WakeThread);
        assert_eq!(checkpoint_after(39, 10, 40), Checkpoint::WakeThread);
        assert_eq!(checkpoint_after(40, 10, 40), Checkpoint::Inline);
    }

    fn file_len(path: &std::path::Path) -> u64 {
        std::fs::metadata(path).map_or(0, |m| m.len())
    }

    /// Rows of the table as `conn` sees them (in a transaction, this
    /// takes its snapshot).
    fn count_rows(conn: &Connection) -> i64 {
        conn.query_row("SELECT count(*) FROM orders", [], |r| r.get(0))
            .unwrap()
    }

    /// Rows in a copy of the database file alone, without its WAL.
    fn rows_in_a_copy(db: &std::path::Path) -> i64 {
        let copy = db.with_file_name("copy.db");
        std::fs::copy(db, &copy).unwrap();
        count_rows(&Connection::open(&copy).unwrap())
    }

    /// An upsert sink on a new file in a directory of its own.
    fn fresh_upsert_sink() -> (tempfile::TempDir, SqliteSinkConfig, SqliteSink) {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), SinkMode::Upsert);
        let sink = SqliteSink::open(&cfg).unwrap();
        (dir, cfg, sink)
    }

    /// Writes version `ver` of entities 0 to `rows`; each must apply.
    fn batch_of(sink: &mut SqliteSink, rows: usize, ver: i64) {
        let bodies: Vec<(IdemKey, Value)> = (0..rows)
            .map(|i| {
                let body = serde_json::json!({"id": format!("ord-{i}"), "ver": ver, "qty": i});
                (IdemKey(format!("k{i}-{ver}")), body)
            })
            .collect();
        let writes: Vec<SinkWrite<'_>> = bodies
            .iter()
            .map(|(key, body)| SinkWrite {
                topic: "t",
                partition: Partition(0),
                offset: Offset(0),
                key,
                body,
                raw: b"{}",
            })
            .collect();
        let outcomes = sink.apply(&writes).unwrap();
        assert!(outcomes.iter().all(|o| *o == WriteOutcome::Applied));
    }

    /// Below both thresholds the pages stay in the WAL: nothing wakes the
    /// checkpoint thread, so the database file cannot have grown.
    #[test]
    fn a_short_wal_is_left_for_a_later_checkpoint() {
        let (dir, cfg, mut sink) = fresh_upsert_sink();
        let before = file_len(&cfg.path);
        batch_of(&mut sink, 500, 1);
        assert_eq!(file_len(&cfg.path), before, "no checkpoint yet");
        assert!(file_len(&dir.path().join("sink.db-wal")) > 0);
    }

    /// At the backstop the writer copies the WAL itself, before `apply`
    /// returns.
    #[test]
    fn a_long_wal_is_checkpointed_by_the_writer() {
        let (_dir, cfg, mut sink) = fresh_upsert_sink();
        let before = file_len(&cfg.path);
        sink.wake_at = u32::MAX;
        sink.backstop_at = 1;
        batch_of(&mut sink, 500, 1);
        assert!(
            file_len(&cfg.path) > before,
            "the batch's pages were copied"
        );
    }

    /// Once the sink is gone the database file holds every batch on its
    /// own: no `-wal` file is left to carry some of them.
    #[test]
    fn a_dropped_sink_leaves_no_wal_behind() {
        let (dir, cfg, mut sink) = fresh_upsert_sink();
        batch_of(&mut sink, 500, 1);
        let wal = dir.path().join("sink.db-wal");
        assert!(file_len(&wal) > 0, "the batch is in the WAL");
        drop(sink);
        assert!(!wal.exists(), "a -wal file was left behind");
        assert_eq!(count_rows(&Connection::open(&cfg.path).unwrap()), 500);
    }

    /// A reader's snapshot holds the WAL back, so it grows; once the
    /// reader is gone and the WAL starts over, the file is cut back to the
    /// limit instead of keeping its largest size.
    #[test]
    fn the_wal_file_shrinks_back_after_a_reader_held_it() {
        let (dir, cfg, mut sink) = fresh_upsert_sink();
        let set: i64 = sink
            .conn
            .pragma_query_value(None, "journal_size_limit", |r| r.get(0))
            .unwrap();
        assert_eq!(set, WAL_FILE_LIMIT_BYTES, "open sets the limit");
        // A smaller one, so that a few batches pass it.
        let limit = 64 * 1024;
        sink.conn
            .pragma_update(None, "journal_size_limit", limit)
            .unwrap();
        sink.wake_at = u32::MAX;
        sink.backstop_at = 1;
        let wal = dir.path().join("sink.db-wal");

        let reader = Connection::open(&cfg.path).unwrap();
        reader.execute_batch("BEGIN").unwrap();
        count_rows(&reader);
        for ver in 1..=8 {
            batch_of(&mut sink, 5_000, ver);
        }
        let held = file_len(&wal);
        assert!(
            held > 4 * limit,
            "the WAL grew while the reader held it: {held}"
        );

        reader.execute_batch("COMMIT").unwrap();
        // The first commit is copied out in full; the next write starts
        // the WAL over, and its commit cuts the file back.
        batch_of(&mut sink, 10, 9);
        batch_of(&mut sink, 10, 10);
        let after = file_len(&wal);
        assert!(
            after <= 2 * limit,
            "the WAL file kept {after} bytes of {held}"
        );
    }

    /// Another process with the file open (a `sqlite3` shell left idle)
    /// keeps SQLite from copying the WAL at the last close; the stop's own
    /// checkpoint still leaves the database file complete.
    #[test]
    fn a_dropped_sink_leaves_the_file_complete_beside_another_connection() {
        let (_dir, cfg, mut sink) = fresh_upsert_sink();
        let idle = Connection::open(&cfg.path).unwrap();
        count_rows(&idle);
        batch_of(&mut sink, 500, 1);
        drop(sink);
        assert_eq!(rows_in_a_copy(&cfg.path), 500, "the database file alone");
        drop(idle);
    }

    /// A read transaction open at the stop keeps part of the WAL from
    /// being copied (idem logs it); the stop still ends, and the database
    /// with its `-wal` file holds every batch.
    #[test]
    fn a_reader_at_the_stop_keeps_batches_in_the_wal_and_loses_none() {
        let (dir, cfg, mut sink) = fresh_upsert_sink();
        let reader = Connection::open(&cfg.path).unwrap();
        reader.execute_batch("BEGIN").unwrap();
        count_rows(&reader);
        batch_of(&mut sink, 500, 1);
        drop(sink);
        reader.execute_batch("COMMIT").unwrap();
        assert!(file_len(&dir.path().join("sink.db-wal")) > 0);
        assert_eq!(count_rows(&reader), 500);
    }

    /// A reader of the newest snapshot does not hold the stop up: nothing
    /// it reads is missing from the database file. With a ten-minute busy
    /// timeout, a stop that waited for the reader would not end within the
    /// minute.
    #[test]
    fn a_reader_of_the_newest_snapshot_does_not_hold_the_stop() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path(), SinkMode::Upsert);
        cfg.busy_timeout_ms = 600_000;
        let mut sink = SqliteSink::open(&cfg).unwrap();
        batch_of(&mut sink, 500, 1);
        let reader = Connection::open(&cfg.path).unwrap();
        reader.execute_batch("BEGIN").unwrap();
        count_rows(&reader);
        let (done, stopped) = mpsc::channel();
        std::thread::spawn(move || {
            drop(sink);
            let _ = done.send(());
        });
        stopped
            .recv_timeout(Duration::from_secs(60))
            .expect("the stop waited for a reader that needed nothing");
        assert_eq!(rows_in_a_copy(&cfg.path), 500, "the database file alone");
        reader.execute_batch("COMMIT").unwrap();
    }

    /// Past the wake-up threshold the thread copies the WAL.
    #[test]
    fn the_checkpoint_thread_copies_the_wal_once_woken() {
        let (_dir, cfg, mut sink) = fresh_upsert_sink();
        let before = file_len(&cfg.path);
        sink.wake_at = 1;
        batch_of(&mut sink, 500, 1);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while file_len(&cfg.path) == before {
            assert!(
                std::time::Instant::now() < deadline,
                "no checkpoint within 10 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn insert_ignores_a_second_insert_of_a_key() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = SqliteSink::open(&config(dir.path(), SinkMode::Insert)).unwrap();
        let body = r#"{"id":"ord-1","qty":1}"#;
        assert_eq!(apply(&mut sink, "K1", body), WriteOutcome::Applied);
        assert_eq!(apply(&mut sink, "K1", body), WriteOutcome::AlreadyPresent);
    }

    #[test]
    fn record_without_version_is_rejected_alone() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = SqliteSink::open(&config(dir.path(), SinkMode::Upsert)).unwrap();
        let outcome = apply(&mut sink, "a", r#"{"id":"ord-1","ver":"x"}"#);
        assert!(matches!(outcome, WriteOutcome::Rejected(_)), "{outcome:?}");
    }

    #[test]
    fn locked_file_is_unavailable_not_rejected() {
        let (_dir, cfg, mut sink) = fresh_upsert_sink();
        let other = Connection::open(&cfg.path).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        let value: Value = serde_json::from_str(r#"{"id":"a","ver":1}"#).unwrap();
        let key = IdemKey("k".into());
        let write = SinkWrite {
            topic: "t",
            partition: Partition(0),
            offset: Offset(0),
            key: &key,
            body: &value,
            raw: b"{}",
        };
        let err = sink.apply(&[write]).unwrap_err();
        assert!(matches!(err, SinkError::Unavailable(_)), "{err}");
        other.execute_batch("COMMIT").unwrap();
        assert_eq!(sink.apply(&[write]).unwrap(), vec![WriteOutcome::Applied]);
    }
}
