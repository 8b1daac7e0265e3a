//! The PostgreSQL sink.
//!
//! Why it is idempotent: the same version guard as the SQLite sink, in one
//! multi-row statement per batch: `INSERT ... SELECT ... FROM unnest(...)
//! ON CONFLICT (key) DO UPDATE ... WHERE excluded.version > table.version`
//! (upsert) or `... ON CONFLICT (idempotency key) DO NOTHING` (insert).
//! PostgreSQL refuses a statement that touches one row twice, so a batch is
//! first reduced to one row per key: the versions each entity holds are
//! read, the batch is played in order on the client to count each record
//! as a sequential write would (applied, duplicate, stale), and only the
//! last applied record of each entity is written.
//!
//! Why it is durable: each batch is one transaction, committed with the
//! server's `synchronous_commit` (on by default).
//!
//! Errors: connection loss, a restarting server, serialization failures,
//! deadlocks, lock and statement timeouts fail the batch as unavailable, and
//! it is retried. A data error (bad value for a column type, a constraint)
//! is found by splitting the statement under savepoints until the failing
//! records are alone; they are rejected and dead-lettered, the rest commit.
//! Schema errors (missing table or column, permissions) need an operator.
//!
//! Values are bound as text parameters and cast to each column's type, read
//! from the catalog at start-up; so any column type that accepts a text
//! literal works (`text`, `bigint`, `numeric`, `jsonb`, `timestamptz` ...).
//!
//! Speed: each column travels as one `text[]` parameter that `unnest`
//! turns back into rows, so the write statement has the same text (and
//! the same few parameters) for every batch size. It and the version
//! look-up are prepared once per connection and reused, instead of the
//! server parsing and planning a statement with thousands of parameters for
//! every batch.

use std::collections::HashMap;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Transaction};
use tokio_postgres::types::ToSql;

use super::table::{plan_upserts, quote, Cell, Row, TableMapping};
use super::{Sink, SinkError, SinkWrite, WriteOutcome};
use crate::config::{PostgresSinkConfig, PostgresTls, SinkMode};
use crate::failpoint;
use crate::fault::{self, Fault};

pub struct PostgresSink {
    runtime: tokio::runtime::Runtime,
    pool: Pool,
    mapping: TableMapping,
    /// Each column's type, for the casts.
    types: Vec<String>,
    statement_timeout_ms: u64,
    /// The write statement, the same for every batch.
    write_sql: String,
    /// upsert: reads the versions a batch's entities hold.
    versions_sql: Option<String>,
}

fn batch_error(e: &tokio_postgres::Error) -> SinkError {
    fault::postgres(e).sink_error(db_text(e))
}

/// The server's SQLSTATE and message, or the client's error with its
/// causes (a TLS failure says why only in its causes).
fn db_text(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => fault::chain(e),
    }
}

fn pool_error(e: deadpool_postgres::PoolError) -> SinkError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => batch_error(&e),
        other => SinkError::Unavailable(other.to_string()),
    }
}

impl PostgresSink {
    /// Connects, creates the table when configured to, and reads the
    /// column types.
    ///
    /// # Errors
    /// [`SinkError::Unavailable`] when the server cannot be reached;
    /// [`SinkError::NeedsOperator`] for a bad URL, TLS set-up, or a table
    /// that lacks a configured column.
    pub fn open(config: &PostgresSinkConfig) -> Result<PostgresSink, SinkError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| SinkError::NeedsOperator(format!("async runtime: {e}")))?;
        let pg: tokio_postgres::Config = config
            .url
            .parse()
            .map_err(|e| SinkError::NeedsOperator(format!("sink.url: {e}")))?;
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match config.tls {
            PostgresTls::Disable => Manager::from_config(pg, tokio_postgres::NoTls, manager_config),
            PostgresTls::Require | PostgresTls::VerifyFull => {
                let mut pg = pg;
                pg.ssl_mode(tokio_postgres::config::SslMode::Require);
                Manager::from_config(pg, tls_connector(config)?, manager_config)
            }
        };
        let pool = Pool::builder(manager)
            .max_size(config.pool_size)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| SinkError::NeedsOperator(format!("connection pool: {e}")))?;

        let mapping = TableMapping::new(&config.table);
        let types = runtime.block_on(async {
            let client = pool.get().await.map_err(pool_error)?;
            if config.table.create {
                client
                    .batch_execute(&create_table_sql(&mapping))
                    .await
                    .map_err(|e| batch_error(&e))?;
            }
            column_types(&client, &mapping).await
        })?;
        let write_sql = write_sql(&mapping, &types);
        let versions_sql = versions_sql(&mapping, &types);
        Ok(PostgresSink {
            runtime,
            pool,
            mapping,
            types,
            statement_timeout_ms: config.statement_timeout_ms,
            write_sql,
            versions_sql,
        })
    }
}

fn tls_connector(
    config: &PostgresSinkConfig,
) -> Result<postgres_native_tls::MakeTlsConnector, SinkError> {
    let mut builder = native_tls::TlsConnector::builder();
    match config.tls {
        PostgresTls::Require => {
            // Encrypted, but any certificate is taken: as libpq's
            // sslmode=require.
            builder
                .danger_accept_invalid_certs(true)
                .danger_accept_invalid_hostnames(true);
        }
        PostgresTls::VerifyFull => {
            if let Some(path) = &config.ca_file {
                let pem = std::fs::read(path).map_err(|e| {
                    SinkError::NeedsOperator(format!("sink.ca_file {}: {e}", path.display()))
                })?;
                let cert = native_tls::Certificate::from_pem(&pem).map_err(|e| {
                    SinkError::NeedsOperator(format!("sink.ca_file {}: {e}", path.display()))
                })?;
                builder.add_root_certificate(cert);
            }
        }
        PostgresTls::Disable => {}
    }
    let connector = builder
        .build()
        .map_err(|e| SinkError::NeedsOperator(format!("TLS: {e}")))?;
    Ok(postgres_native_tls::MakeTlsConnector::new(connector))
}

/// Created tables: the key as text, the version as bigint, everything else
/// as jsonb, so that values keep their JSON types.
fn create_table_sql(mapping: &TableMapping) -> String {
    let defs: Vec<String> = mapping
        .names
        .iter()
        .map(|n| {
            let ty = if *n == mapping.key_column {
                "text PRIMARY KEY"
            } else if Some(n) == mapping.version_column.as_ref() {
                "bigint NOT NULL"
            } else {
                "jsonb"
            };
            format!("{} {ty}", quote(n))
        })
        .collect();
    format!(
        "CREATE TABLE IF NOT EXISTS {} ({})",
        quote(&mapping.table),
        defs.join(", ")
    )
}

async fn column_types(
    client: &deadpool_postgres::Client,
    mapping: &TableMapping,
) -> Result<Vec<String>, SinkError> {
    let rows = client
        .query(
            "SELECT a.attname, format_type(a.atttypid, a.atttypmod) \
             FROM pg_attribute a \
             WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped",
            &[&quote(&mapping.table)],
        )
        .await
        .map_err(|e| batch_error(&e))?;
    let found: HashMap<String, String> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    if found.is_empty() {
        return Err(SinkError::NeedsOperator(format!(
            "table {} does not exist; create it or set sink.table.create = true",
            mapping.table
        )));
    }
    mapping
        .names
        .iter()
        .map(|n| {
            found.get(n).cloned().ok_or_else(|| {
                SinkError::NeedsOperator(format!("table {} has no column {n}", mapping.table))
            })
        })
        .collect()
}

/// `INSERT INTO t (c, ...) SELECT u.c::type, ... FROM unnest($1::text[],
/// ...) AS u (c, ...) ON CONFLICT ...`: one `text[]` parameter per column,
/// whatever the number of rows.
fn write_sql(m: &TableMapping, types: &[String]) -> String {
    let table = quote(&m.table);
    let key = quote(&m.key_column);
    let columns: Vec<String> = m.names.iter().map(|n| quote(n)).collect();
    let arrays: Vec<String> = (1..=columns.len())
        .map(|i| format!("${i}::text[]"))
        .collect();
    let casts: Vec<String> = columns
        .iter()
        .zip(types)
        .map(|(c, ty)| format!("u.{c}::{ty}"))
        .collect();
    let insert = format!(
        "INSERT INTO {table} ({columns}) SELECT {casts} FROM unnest({arrays}) AS u ({columns})",
        columns = columns.join(", "),
        casts = casts.join(", "),
        arrays = arrays.join(", "),
    );
    match &m.version_column {
        Some(version) => {
            let v = quote(version);
            let updates: Vec<String> = columns
                .iter()
                .filter(|c| **c != key)
                .map(|c| format!("{c} = EXCLUDED.{c}"))
                .collect();
            format!(
                "{insert} ON CONFLICT ({key}) DO UPDATE SET {} \
                 WHERE EXCLUDED.{v}::bigint > {table}.{v}::bigint RETURNING {key}::text",
                updates.join(", ")
            )
        }
        None => format!("{insert} ON CONFLICT ({key}) DO NOTHING RETURNING {key}::text"),
    }
}

/// upsert: the versions held by a list of keys.
fn versions_sql(m: &TableMapping, types: &[String]) -> Option<String> {
    let version = m.version_column.as_ref()?;
    Some(format!(
        "SELECT {k}::text, {v}::bigint FROM {t} WHERE {k} = ANY($1::text[]::{key_type}[])",
        k = quote(&m.key_column),
        v = quote(version),
        t = quote(&m.table),
        key_type = types[m.key_index],
    ))
}

impl PostgresSink {
    /// The text a cell binds as, for its column's type.
    fn param(&self, column: usize, cell: &Cell) -> Option<String> {
        if self.types[column].starts_with("json") {
            cell.to_json_text()
        } else {
            cell.to_text()
        }
    }

    /// Writes `rows` (one per key) and returns the keys the statement
    /// changed. A data error splits the rows under savepoints until the
    /// failing ones are alone; those are returned as rejected.
    async fn write_rows(
        &self,
        tx: &mut Transaction<'_>,
        rows: &[(usize, &Row)],
        rejected: &mut Vec<(usize, String)>,
    ) -> Result<Vec<String>, tokio_postgres::Error> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        // Column by column: the i-th array holds the i-th cell of every row.
        let columns: Vec<Vec<Option<String>>> = (0..self.mapping.names.len())
            .map(|c| {
                rows.iter()
                    .map(|(_, row)| self.param(c, &row.cells[c]))
                    .collect()
            })
            .collect();
        let refs: Vec<&(dyn ToSql + Sync)> =
            columns.iter().map(|c| c as &(dyn ToSql + Sync)).collect();

        let savepoint = tx.savepoint("idem_rows").await?;
        let statement = savepoint.prepare_cached(&self.write_sql).await?;
        match savepoint.query(&statement, &refs).await {
            Ok(returned) => {
                savepoint.commit().await?;
                Ok(returned.iter().map(|r| r.get::<_, String>(0)).collect())
            }
            Err(e) if fault::postgres(&e) == Fault::Record => {
                savepoint.rollback().await?;
                if rows.len() == 1 {
                    rejected.push((rows[0].0, db_text(&e)));
                    return Ok(Vec::new());
                }
                let (a, b) = rows.split_at(rows.len() / 2);
                let mut changed = Box::pin(self.write_rows(tx, a, rejected)).await?;
                changed.extend(Box::pin(self.write_rows(tx, b, rejected)).await?);
                Ok(changed)
            }
            Err(e) => Err(e),
        }
    }

    /// The version each key holds now.
    async fn held_versions(
        &self,
        tx: &mut Transaction<'_>,
        keys: Vec<String>,
    ) -> Result<HashMap<String, i64>, tokio_postgres::Error> {
        let sql = self.versions_sql.as_deref().expect("upsert");
        let savepoint = tx.savepoint("idem_versions").await?;
        let statement = savepoint.prepare_cached(sql).await?;
        match savepoint.query(&statement, &[&keys]).await {
            Ok(rows) => {
                savepoint.commit().await?;
                Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
            }
            Err(e) => {
                savepoint.rollback().await?;
                Err(e)
            }
        }
    }

    /// The versions held, read key by key after the look-up of the whole
    /// batch failed on a key's value (one that the key column's type
    /// cannot read): the keys that fail alone are rejected, so that one
    /// record cannot hold the batch.
    async fn held_versions_one_by_one(
        &self,
        tx: &mut Transaction<'_>,
        rows: &mut Vec<(usize, &Row)>,
        outcomes: &mut [Option<WriteOutcome>],
    ) -> Result<HashMap<String, i64>, tokio_postgres::Error> {
        let mut held = HashMap::new();
        let mut readable = Vec::with_capacity(rows.len());
        for (i, row) in rows.drain(..) {
            match self.held_versions(tx, vec![row.key.clone()]).await {
                Ok(found) => {
                    held.extend(found);
                    readable.push((i, row));
                }
                Err(e) if fault::postgres(&e) == Fault::Record => {
                    outcomes[i] = Some(WriteOutcome::Rejected(db_text(&e)));
                }
                Err(e) => return Err(e),
            }
        }
        *rows = readable;
        Ok(held)
    }

    async fn apply_batch(&self, batch: &[SinkWrite<'_>]) -> Result<Vec<WriteOutcome>, SinkError> {
        let mut outcomes: Vec<Option<WriteOutcome>> = vec![None; batch.len()];
        let mut rows: Vec<(usize, Row)> = Vec::with_capacity(batch.len());
        for (i, write) in batch.iter().enumerate() {
            match self.mapping.row(write) {
                Ok(row) => rows.push((i, row)),
                Err(why) => outcomes[i] = Some(WriteOutcome::Rejected(why)),
            }
        }
        let mut indexed: Vec<(usize, &Row)> = rows.iter().map(|(i, r)| (*i, r)).collect();

        let mut client = self.pool.get().await.map_err(pool_error)?;
        let mut tx = client.transaction().await.map_err(|e| batch_error(&e))?;
        tx.batch_execute(&format!(
            "SET LOCAL statement_timeout = {}",
            self.statement_timeout_ms
        ))
        .await
        .map_err(|e| batch_error(&e))?;

        // Which records to write, one per key, and how each counts.
        let (planned, winners): (Vec<(usize, WriteOutcome)>, Vec<usize>) = match self.mapping.mode {
            SinkMode::Upsert => {
                let keys: Vec<String> = indexed.iter().map(|(_, r)| r.key.clone()).collect();
                let held = match self.held_versions(&mut tx, keys).await {
                    Ok(held) => held,
                    Err(e) if fault::postgres(&e) == Fault::Record => self
                        .held_versions_one_by_one(&mut tx, &mut indexed, &mut outcomes)
                        .await
                        .map_err(|e| batch_error(&e))?,
                    Err(e) => return Err(batch_error(&e)),
                };
                plan_upserts(&indexed, &held)
            }
            SinkMode::Insert => {
                let mut first: HashMap<&str, usize> = HashMap::new();
                let planned = indexed
                    .iter()
                    .map(|(i, r)| match first.get(r.key.as_str()) {
                        Some(_) => (*i, WriteOutcome::AlreadyPresent),
                        None => {
                            first.insert(&r.key, *i);
                            (*i, WriteOutcome::Applied)
                        }
                    })
                    .collect();
                let mut winners: Vec<usize> = first.into_values().collect();
                winners.sort_unstable();
                (planned, winners)
            }
        };
        let to_write: Vec<(usize, &Row)> = indexed
            .iter()
            .filter(|(i, _)| winners.binary_search(i).is_ok())
            .copied()
            .collect();

        let mut rejected = Vec::new();
        let changed = self
            .write_rows(&mut tx, &to_write, &mut rejected)
            .await
            .map_err(|e| batch_error(&e))?;
        failpoint::hit("mid-sink-batch");
        tx.commit().await.map_err(|e| batch_error(&e))?;

        for (i, outcome) in planned {
            outcomes[i] = Some(outcome);
        }
        // A winner the statement did not change lost to a concurrent
        // writer (upsert) or found its key already there (insert).
        let changed: std::collections::HashSet<String> = changed.into_iter().collect();
        for (i, row) in &to_write {
            if !changed.contains(&row.key) {
                outcomes[*i] = Some(match self.mapping.mode {
                    SinkMode::Upsert => WriteOutcome::Stale,
                    SinkMode::Insert => WriteOutcome::AlreadyPresent,
                });
            }
        }
        for (i, why) in rejected {
            outcomes[i] = Some(WriteOutcome::Rejected(why));
        }
        Ok(outcomes
            .into_iter()
            .map(|o| o.expect("every record has an outcome"))
            .collect())
    }
}

impl Sink for PostgresSink {
    fn name(&self) -> &'static str {
        "postgres"
    }

    fn apply(&mut self, batch: &[SinkWrite<'_>]) -> Result<Vec<WriteOutcome>, SinkError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let deadline =
            Duration::from_millis(self.statement_timeout_ms.saturating_mul(2).max(1_000));
        self.runtime.block_on(async {
            match tokio::time::timeout(deadline, self.apply_batch(batch)).await {
                Ok(result) => result,
                Err(_) => Err(SinkError::Unavailable(format!(
                    "no answer from PostgreSQL within {} ms",
                    deadline.as_millis()
                ))),
            }
        })
    }
}
