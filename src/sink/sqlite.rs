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
//! bound by reference, without a copy per cell. The WAL is checkpointed
//! (its pages copied into the database file) by a thread of its own with
//! its own connection, woken after each commit, instead of inside the
//! commit of every batch that crosses SQLite's 1,000-page threshold: the
//! batch's latency no longer includes it. A checkpoint never makes a commit
//! more or less durable (the commit is durable once the WAL is synced); if
//! the thread falls behind, the writer checkpoints by itself at
//! [`BACKSTOP_PAGES`].
//!
//! A record the database refuses (constraint, type mismatch, too big) is
//! rejected alone: SQLite rolls back just that statement, and the rest of
//! the batch commits. A locked file waits `busy_timeout_ms` per statement,
//! then fails the batch as unavailable, and the caller retries with
//! backoff.

use std::path::Path;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::time::Duration;

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

/// The writer's own checkpoint threshold, in pages of WAL: reached only
/// when the checkpoint thread cannot keep up (or cannot open the file).
pub const BACKSTOP_PAGES: i64 = 10_000;

pub struct SqliteSink {
    conn: Connection,
    /// Wakes the checkpoint thread; the thread ends when this is dropped.
    checkpoint: Option<SyncSender<()>>,
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
        let checkpoint = start_checkpointer(&config.path, config.busy_timeout_ms);
        if checkpoint.is_some() {
            conn.pragma_update(None, "wal_autocheckpoint", BACKSTOP_PAGES)
                .map_err(classify_batch_error)?;
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
            checkpoint,
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
        if let Err(e) = self.conn.execute_batch("COMMIT") {
            let _ = self.conn.execute_batch("ROLLBACK");
            return Err(classify_batch_error(e));
        }
        if let Some(wake) = &self.checkpoint {
            // Full: a wake-up is pending already, which will see this
            // commit's pages too.
            let _ = wake.try_send(());
        }
        Ok(outcomes)
    }
}

/// Starts the checkpoint thread on a connection of its own. `None` when
/// that connection cannot be opened: the writer then keeps SQLite's own
/// checkpoints after its commits.
fn start_checkpointer(path: &Path, busy_timeout_ms: u64) -> Option<SyncSender<()>> {
    let conn = Connection::open(path).ok()?;
    conn.busy_timeout(Duration::from_millis(busy_timeout_ms))
        .ok()?;
    // The checkpoint syncs the WAL before it copies and the database
    // after, as the writer's own would.
    conn.pragma_update(None, "synchronous", "FULL").ok()?;
    let (wake, woken) = mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("idem-sqlite-checkpoint".into())
        .spawn(move || checkpoint_loop(&conn, &woken))
        .ok()?;
    Some(wake)
}

/// Checkpoints once per wake-up until the sink is dropped. PASSIVE: it
/// copies what no reader still needs and never waits for the writer, so
/// the next batch's transaction can start while it runs.
fn checkpoint_loop(conn: &Connection, woken: &Receiver<()>) {
    while woken.recv().is_ok() {
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::debug!(error = %e, "sqlite sink: checkpoint failed; the next commit retries it");
        }
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
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), SinkMode::Upsert);
        let mut sink = SqliteSink::open(&cfg).unwrap();
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
