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
//! A record the database refuses (constraint, type mismatch, too big) is
//! rejected alone: SQLite rolls back just that statement, and the rest of
//! the batch commits. A locked file waits `busy_timeout_ms` per statement,
//! then fails the batch as unavailable, and the caller retries with
//! backoff.

use std::time::Duration;

use rusqlite::{params_from_iter, Connection, ErrorCode};
use serde_json::Value;

use super::{Sink, SinkError, SinkWrite, WriteOutcome};
use crate::config::{SinkMode, SqliteSinkConfig, VersionSource};
use crate::failpoint;

/// How one column gets its value.
#[derive(Debug, Clone)]
enum ColumnValue {
    Pointer(String),
    Version,
    IdempotencyKey,
    Payload,
}

pub struct SqliteSink {
    conn: Connection,
    sql: String,
    /// upsert: reads the version a row holds, to tell a replay of the
    /// same version from a stale one.
    version_sql: Option<String>,
    /// upsert: where the entity key sits among the bound values.
    entity_index: usize,
    columns: Vec<ColumnValue>,
    mode: SinkMode,
    entity_pointer: Option<String>,
    version: Option<VersionSource>,
}

fn quote(name: &str) -> String {
    // Names are validated at start-up to [A-Za-z0-9_]; quoting keeps SQL
    // keywords usable as column names.
    format!("\"{name}\"")
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

        let table = &config.table;
        let mut names = Vec::new();
        let mut columns = Vec::new();
        let (entity_pointer, version) = match table.mode {
            SinkMode::Upsert => {
                let key_column = table.key_column.clone().expect("validated");
                let version_column = table.version_column.clone().expect("validated");
                let version = table.version_source("sink.table").expect("validated");
                for (name, pointer) in &table.columns {
                    if *name != version_column {
                        names.push(name.clone());
                        columns.push(ColumnValue::Pointer(pointer.clone()));
                    }
                }
                names.push(version_column);
                columns.push(ColumnValue::Version);
                (Some(table.columns[&key_column].clone()), Some(version))
            }
            SinkMode::Insert => {
                names.push(table.insert_key_column().to_string());
                columns.push(ColumnValue::IdempotencyKey);
                for (name, pointer) in &table.columns {
                    names.push(name.clone());
                    columns.push(ColumnValue::Pointer(pointer.clone()));
                }
                (None, None)
            }
        };
        if let Some(payload) = &table.payload_column {
            names.push(payload.clone());
            columns.push(ColumnValue::Payload);
        }

        let key_column = match table.mode {
            SinkMode::Upsert => table.key_column.as_deref().expect("validated"),
            SinkMode::Insert => table.insert_key_column(),
        };
        if table.create {
            let defs: Vec<String> = names
                .iter()
                .map(|n| {
                    if n == key_column {
                        format!("{} PRIMARY KEY NOT NULL", quote(n))
                    } else {
                        quote(n)
                    }
                })
                .collect();
            let ddl = format!(
                "CREATE TABLE IF NOT EXISTS {} ({})",
                quote(&table.name),
                defs.join(", ")
            );
            conn.execute(&ddl, []).map_err(classify_batch_error)?;
        }

        let quoted: Vec<String> = names.iter().map(|n| quote(n)).collect();
        let placeholders = vec!["?"; names.len()].join(", ");
        let insert = format!(
            "INSERT INTO {} ({}) VALUES ({})",
            quote(&table.name),
            quoted.join(", "),
            placeholders
        );
        let sql = match table.mode {
            SinkMode::Upsert => {
                let version_column = quote(table.version_column.as_deref().expect("validated"));
                let updates: Vec<String> = quoted
                    .iter()
                    .filter(|c| **c != quote(key_column))
                    .map(|c| format!("{c} = excluded.{c}"))
                    .collect();
                format!(
                    "{insert} ON CONFLICT ({}) DO UPDATE SET {} WHERE excluded.{v} > {}.{v}",
                    quote(key_column),
                    updates.join(", "),
                    quote(&table.name),
                    v = version_column,
                )
            }
            SinkMode::Insert => format!("{insert} ON CONFLICT ({}) DO NOTHING", quote(key_column)),
        };
        let version_sql = table.version_column.as_ref().map(|v| {
            format!(
                "SELECT {} FROM {} WHERE {} = ?",
                quote(v),
                quote(&table.name),
                quote(key_column)
            )
        });
        // Prepare once now so that a schema mismatch fails at start-up.
        conn.prepare_cached(&sql).map_err(classify_batch_error)?;
        if let Some(q) = &version_sql {
            conn.prepare_cached(q).map_err(classify_batch_error)?;
        }
        let entity_index = names.iter().position(|n| n == key_column).unwrap_or(0);
        Ok(SqliteSink {
            conn,
            sql,
            version_sql,
            entity_index,
            columns,
            mode: table.mode,
            entity_pointer,
            version,
        })
    }

    /// The values for one record, or why the record cannot be written.
    fn bind(&self, write: &SinkWrite<'_>) -> Result<Vec<rusqlite::types::Value>, String> {
        use rusqlite::types::Value as Sql;
        if let Some(pointer) = &self.entity_pointer {
            match write.body.pointer(pointer) {
                None | Some(Value::Null) => {
                    return Err(format!("payload has no entity key at {pointer}"))
                }
                Some(Value::Object(_) | Value::Array(_)) => {
                    return Err(format!("entity key at {pointer} is not a scalar"))
                }
                Some(_) => {}
            }
        }
        let mut values = Vec::with_capacity(self.columns.len());
        for column in &self.columns {
            values.push(match column {
                ColumnValue::Pointer(p) => json_to_sql(write.body.pointer(p)),
                ColumnValue::IdempotencyKey => Sql::Text(write.key.0.clone()),
                ColumnValue::Payload => Sql::Text(String::from_utf8_lossy(write.raw).into_owned()),
                ColumnValue::Version => match self.version.as_ref().expect("upsert") {
                    VersionSource::KafkaOffset => Sql::Integer(write.offset.0),
                    VersionSource::Pointer(p) => {
                        match write.body.pointer(p).and_then(Value::as_i64) {
                            Some(v) => Sql::Integer(v),
                            None => {
                                return Err(format!("version at {p} is missing or not an integer"))
                            }
                        }
                    }
                },
            });
        }
        Ok(values)
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
            let values = match self.bind(write) {
                Ok(values) => values,
                Err(reason) => {
                    outcomes.push(WriteOutcome::Rejected(reason));
                    continue;
                }
            };
            let (entity, version) = match self.mode {
                SinkMode::Upsert => (
                    values[self.entity_index].clone(),
                    values[self.version_index()].clone(),
                ),
                SinkMode::Insert => (rusqlite::types::Value::Null, rusqlite::types::Value::Null),
            };
            match stmt.execute(params_from_iter(values)) {
                Ok(0) => outcomes.push(match self.mode {
                    SinkMode::Upsert => self.unchanged_upsert(&entity, &version)?,
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
    fn version_index(&self) -> usize {
        self.columns
            .iter()
            .position(|c| matches!(c, ColumnValue::Version))
            .expect("upsert has a version column")
    }

    /// An upsert that changed nothing: same version already there, or an
    /// older one.
    fn unchanged_upsert(
        &self,
        entity: &rusqlite::types::Value,
        version: &rusqlite::types::Value,
    ) -> Result<WriteOutcome, rusqlite::Error> {
        let sql = self.version_sql.as_deref().expect("upsert");
        let held: rusqlite::types::Value = self
            .conn
            .prepare_cached(sql)?
            .query_row([entity], |r| r.get(0))?;
        Ok(if &held == version {
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
        Ok(outcomes)
    }
}

fn json_to_sql(value: Option<&Value>) -> rusqlite::types::Value {
    use rusqlite::types::Value as Sql;
    match value {
        None | Some(Value::Null) => Sql::Null,
        Some(Value::Bool(b)) => Sql::Integer(i64::from(*b)),
        Some(Value::Number(n)) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => Sql::Integer(i),
            // Integers beyond i64 keep their exact digits as text.
            (None, _) if n.is_u64() => Sql::Text(n.to_string()),
            (None, Some(f)) => Sql::Real(f),
            (None, None) => Sql::Text(n.to_string()),
        },
        Some(Value::String(s)) => Sql::Text(s.clone()),
        Some(other) => Sql::Text(other.to_string()),
    }
}

/// Errors caused by one record's values rather than by the database.
fn is_record_error(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::ConstraintViolation | ErrorCode::TypeMismatch | ErrorCode::TooBig)
    )
}

fn classify_batch_error(e: rusqlite::Error) -> SinkError {
    match e.sqlite_error_code() {
        Some(
            ErrorCode::DatabaseBusy
            | ErrorCode::DatabaseLocked
            | ErrorCode::SystemIoFailure
            | ErrorCode::DiskFull
            | ErrorCode::OutOfMemory,
        ) => SinkError::Unavailable(e.to_string()),
        _ => SinkError::NeedsOperator(e.to_string()),
    }
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
        let value: Value = serde_json::from_str(body).unwrap();
        let key = IdemKey(key.into());
        let write = SinkWrite {
            topic: "t",
            partition: Partition(0),
            offset: Offset(0),
            key: &key,
            body: &value,
            raw: body.as_bytes(),
        };
        sink.apply(&[write]).unwrap().remove(0)
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
