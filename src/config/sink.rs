//! The `[sink]` section: which sink, and how records map onto it.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{check_identifier, check_pointer, default_true, invalid, ConfigError};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum SinkConfig {
    Sqlite(SqliteSinkConfig),
    Postgres(PostgresSinkConfig),
    Files(FilesSinkConfig),
    Http(HttpSinkConfig),
    Kafka(KafkaSinkConfig),
}

/// A topic on the same cluster as the input, written by a transactional
/// producer together with the consumed offsets.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSinkConfig {
    /// The output topic. It must exist, and must not be an input topic or
    /// the dead-letter topic.
    pub topic: String,
    /// The producer's `transactional.id`; default `idem-<group_id>`. Each
    /// running instance needs one of its own that stays the same across
    /// its restarts, so that a restart fences the instance it replaces.
    #[serde(default)]
    pub transactional_id: Option<String>,
    /// The broker aborts a transaction left open longer than this.
    #[serde(default = "default_transaction_timeout_ms")]
    pub transaction_timeout_ms: u64,
    /// JSON pointer to the field that becomes the output record's key (the
    /// entity id, so that a compacted output keeps the latest per entity);
    /// default: the idempotency key.
    #[serde(default)]
    pub key_from: Option<String>,
}

fn default_transaction_timeout_ms() -> u64 {
    60_000
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSinkConfig {
    /// The URL, with optional placeholders `{key}` (the idempotency key,
    /// percent-encoded), `{topic}`, `{partition}` and `{offset}`.
    pub url: String,
    /// `POST`, `PUT` or `PATCH`.
    #[serde(default = "default_http_method")]
    pub method: String,
    /// Extra request headers (e.g. Authorization). `Idempotency-Key` and
    /// `Content-Type` are idem's and cannot be set here.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// One request's time limit.
    #[serde(default = "default_http_timeout_ms")]
    pub timeout_ms: u64,
    /// Requests in flight at once. Records with the same order key are
    /// never in flight together and go in offset order.
    #[serde(default = "default_http_concurrency")]
    pub concurrency: usize,
    /// Tries of one request (408, 429, 5xx, connection errors, timeouts)
    /// before the batch fails and is retried as a whole, holding its
    /// partition; never dead-lettered.
    #[serde(default = "default_http_max_attempts")]
    pub max_attempts: u32,
    /// JSON pointer to the key whose records must arrive in order (the
    /// entity id); default: the idempotency key.
    #[serde(default)]
    pub order_by: Option<String>,
    /// Accept any TLS certificate. Off unless set: certificates are
    /// verified.
    #[serde(default)]
    pub insecure_skip_tls_verify: bool,
}

fn default_http_method() -> String {
    "POST".to_string()
}
fn default_http_timeout_ms() -> u64 {
    10_000
}
fn default_http_concurrency() -> usize {
    8
}
fn default_http_max_attempts() -> u32 {
    5
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FilesSinkConfig {
    /// The directory; created if missing.
    pub dir: PathBuf,
    /// `upsert`: one file per entity, version-guarded, with a backup of the
    /// content it replaces; `insert`: one file per idempotency key.
    pub mode: SinkMode,
    /// upsert: JSON pointer to the entity key, which names the file.
    #[serde(default)]
    pub key_from: Option<String>,
    /// upsert: JSON pointer to the integer version.
    #[serde(default)]
    pub version_from: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSinkConfig {
    /// A libpq-style URL, e.g. `postgresql://idem:secret@db:5432/orders`.
    /// `idem check-config` shows its password as `<redacted>`.
    pub url: String,
    /// Connections kept open.
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// `disable`, `require` (encrypt, trust any certificate) or
    /// `verify-full` (encrypt and verify the server's certificate and name).
    #[serde(default)]
    pub tls: PostgresTls,
    /// A PEM file with extra CA certificates for `verify-full`.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// The server cancels a batch statement running longer than this; the
    /// batch is then retried.
    #[serde(default = "default_statement_timeout_ms")]
    pub statement_timeout_ms: u64,
    pub table: TableConfig,
}

fn default_pool_size() -> usize {
    2
}
fn default_statement_timeout_ms() -> u64 {
    30_000
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum PostgresTls {
    #[default]
    Disable,
    Require,
    VerifyFull,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SqliteSinkConfig {
    /// The database file; created if missing.
    pub path: PathBuf,
    /// How long one statement waits for another writer's lock before it
    /// gives up and the batch is retried with backoff.
    #[serde(default = "default_busy_timeout_ms")]
    pub busy_timeout_ms: u64,
    pub table: TableConfig,
}

fn default_busy_timeout_ms() -> u64 {
    5_000
}

/// How records map onto one SQL table.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TableConfig {
    pub name: String,
    pub mode: SinkMode,
    /// upsert: the entity key column (must be one of `columns`).
    /// insert: the column that holds the idempotency key (default
    /// `idem_key`).
    #[serde(default)]
    pub key_column: Option<String>,
    /// upsert only: the column holding the version that guards the row.
    #[serde(default)]
    pub version_column: Option<String>,
    /// upsert only: where the version comes from, a JSON pointer to an
    /// integer or `kafka-offset`. Default: the pointer mapped to
    /// `version_column` in `columns`.
    #[serde(default)]
    pub version_from: Option<String>,
    /// Column name to JSON pointer. Missing values are stored as NULL;
    /// objects and arrays as JSON text.
    pub columns: BTreeMap<String, String>,
    /// A column that receives the whole payload as JSON text.
    #[serde(default)]
    pub payload_column: Option<String>,
    /// Create the table when it does not exist.
    #[serde(default = "default_true")]
    pub create: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SinkMode {
    /// One row per entity, updated only by a version at least as new.
    Upsert,
    /// One row per idempotency key; a second insert of a key does nothing.
    Insert,
}

/// Where an upsert's version comes from, after validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VersionSource {
    Pointer(String),
    KafkaOffset,
}

impl TableConfig {
    fn validate(&self, field: &str) -> Result<(), ConfigError> {
        check_identifier(&format!("{field}.name"), &self.name)?;
        // SQL names are case-insensitive: `qty` and `QTY` are one column.
        let mut seen = std::collections::HashSet::new();
        let names = self.columns.keys().chain(self.payload_column.iter()).chain(
            self.key_column
                .iter()
                .filter(|_| self.mode == SinkMode::Insert),
        );
        for name in names {
            if !seen.insert(name.to_ascii_lowercase()) {
                return Err(invalid(
                    format!("{field}.columns"),
                    format!("`{name}` appears twice (SQL names ignore case)"),
                ));
            }
        }
        for (column, pointer) in &self.columns {
            check_identifier(&format!("{field}.columns"), column)?;
            check_pointer(&format!("{field}.columns.{column}"), pointer)?;
        }
        if let Some(c) = &self.payload_column {
            check_identifier(&format!("{field}.payload_column"), c)?;
            if self.columns.contains_key(c) {
                return Err(invalid(
                    format!("{field}.payload_column"),
                    format!("`{c}` is also mapped in columns; use another name"),
                ));
            }
        }
        match self.mode {
            SinkMode::Upsert => self.validate_upsert(field),
            SinkMode::Insert => self.validate_insert(field),
        }
    }

    fn validate_upsert(&self, field: &str) -> Result<(), ConfigError> {
        let key = self.key_column.as_deref().ok_or_else(|| {
            invalid(
                format!("{field}.key_column"),
                "upsert mode needs the entity key column, e.g. \"id\"",
            )
        })?;
        check_identifier(&format!("{field}.key_column"), key)?;
        if !self.columns.contains_key(key) {
            return Err(invalid(
                format!("{field}.key_column"),
                format!("`{key}` must also be mapped in {field}.columns to a JSON pointer"),
            ));
        }
        let version = self.version_column.as_deref().ok_or_else(|| {
            invalid(
                format!("{field}.version_column"),
                "upsert mode needs a version column, so that an older record never \
                 overwrites a newer one",
            )
        })?;
        check_identifier(&format!("{field}.version_column"), version)?;
        if version == key {
            return Err(invalid(
                format!("{field}.version_column"),
                "must differ from key_column",
            ));
        }
        self.version_source(field).map(|_| ())
    }

    fn validate_insert(&self, field: &str) -> Result<(), ConfigError> {
        if self.version_column.is_some() || self.version_from.is_some() {
            return Err(invalid(
                format!("{field}.version_column"),
                "only upsert mode uses a version; remove version_column and version_from",
            ));
        }
        let key = self.insert_key_column();
        check_identifier(&format!("{field}.key_column"), key)?;
        if self.columns.contains_key(key) {
            return Err(invalid(
                format!("{field}.key_column"),
                format!("`{key}` holds the idempotency key; do not also map it in columns"),
            ));
        }
        Ok(())
    }

    /// insert mode: the column holding the idempotency key.
    pub fn insert_key_column(&self) -> &str {
        self.key_column.as_deref().unwrap_or("idem_key")
    }

    /// upsert mode: where the version comes from.
    ///
    /// # Errors
    /// When neither `version_from` nor a mapping of the version column
    /// says where the version is.
    pub fn version_source(&self, field: &str) -> Result<VersionSource, ConfigError> {
        let from = match (&self.version_from, &self.version_column) {
            (Some(from), _) => from.clone(),
            (None, Some(column)) => self.columns.get(column).cloned().ok_or_else(|| {
                invalid(
                    format!("{field}.version_from"),
                    format!(
                        "set a JSON pointer or \"kafka-offset\", or map `{column}` in \
                         {field}.columns"
                    ),
                )
            })?,
            (None, None) => {
                return Err(invalid(
                    format!("{field}.version_column"),
                    "upsert mode needs a version column",
                ))
            }
        };
        if from == "kafka-offset" {
            return Ok(VersionSource::KafkaOffset);
        }
        check_pointer(&format!("{field}.version_from"), &from)?;
        Ok(VersionSource::Pointer(from))
    }
}

impl HttpSinkConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            return Err(invalid(
                "sink.url",
                "must be an http:// or https:// URL, e.g. \"https://hooks.example/orders/{key}\"",
            ));
        }
        if !["POST", "PUT", "PATCH"].contains(&self.method.as_str()) {
            return Err(invalid("sink.method", "must be POST, PUT or PATCH"));
        }
        for name in self.headers.keys() {
            if name.eq_ignore_ascii_case("idempotency-key")
                || name.eq_ignore_ascii_case("content-type")
            {
                return Err(invalid(
                    format!("sink.headers.{name}"),
                    "is set by idem on every request; remove it",
                ));
            }
        }
        if self.concurrency == 0 {
            return Err(invalid("sink.concurrency", "must be at least 1"));
        }
        if self.max_attempts == 0 {
            return Err(invalid("sink.max_attempts", "must be at least 1"));
        }
        if let Some(p) = &self.order_by {
            check_pointer("sink.order_by", p)?;
        }
        Ok(())
    }
}

impl KafkaSinkConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.topic.trim().is_empty() {
            return Err(invalid("sink.topic", "must name the output topic"));
        }
        if let Some(id) = &self.transactional_id {
            if id.trim().is_empty() {
                return Err(invalid(
                    "sink.transactional_id",
                    "must not be empty; leave it out for the default idem-<group_id>",
                ));
            }
        }
        // librdkafka's and the broker's default bounds.
        if !(1_000..=900_000).contains(&self.transaction_timeout_ms) {
            return Err(invalid(
                "sink.transaction_timeout_ms",
                "must be between 1000 and 900000 (the broker's transaction.max.timeout.ms)",
            ));
        }
        if let Some(p) = &self.key_from {
            check_pointer("sink.key_from", p)?;
        }
        Ok(())
    }

    /// The transactional id in use.
    pub fn transactional_id(&self, group_id: &str) -> String {
        self.transactional_id
            .clone()
            .unwrap_or_else(|| format!("idem-{group_id}"))
    }
}

impl fmt::Display for SinkMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SinkMode::Upsert => "upsert",
            SinkMode::Insert => "insert",
        })
    }
}

impl SinkConfig {
    /// Whether the sink commits the consumed offsets in its own
    /// transaction (the Kafka sink).
    pub fn is_transactional(&self) -> bool {
        matches!(self, SinkConfig::Kafka(_))
    }

    /// The checks of the sink section that serde cannot express.
    ///
    /// # Errors
    /// The first problem found, naming its field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match self {
            SinkConfig::Sqlite(sqlite) => sqlite.table.validate("sink.table")?,
            SinkConfig::Postgres(pg) => {
                if !(pg.url.starts_with("postgres://") || pg.url.starts_with("postgresql://")) {
                    return Err(invalid(
                        "sink.url",
                        "must be a postgresql:// URL, e.g. \"postgresql://idem@db:5432/orders\"",
                    ));
                }
                if pg.pool_size == 0 {
                    return Err(invalid("sink.pool_size", "must be at least 1"));
                }
                if pg.ca_file.is_some() && pg.tls != PostgresTls::VerifyFull {
                    return Err(invalid(
                        "sink.ca_file",
                        "is used only with tls = \"verify-full\"",
                    ));
                }
                pg.table.validate("sink.table")?;
            }
            SinkConfig::Http(http) => http.validate()?,
            SinkConfig::Kafka(kafka) => kafka.validate()?,
            SinkConfig::Files(files) => {
                match files.mode {
                    SinkMode::Upsert => {
                        for (field, value) in [
                            ("sink.key_from", &files.key_from),
                            ("sink.version_from", &files.version_from),
                        ] {
                            match value {
                                Some(p) => check_pointer(field, p)?,
                                None => return Err(invalid(
                                    field,
                                    "upsert mode needs a JSON pointer, e.g. \"/id\" or \"/ver\"",
                                )),
                            }
                        }
                    }
                    SinkMode::Insert => {
                        if files.key_from.is_some() || files.version_from.is_some() {
                            return Err(invalid(
                                "sink.key_from",
                                "insert mode names each file by the idempotency key; remove \
                         key_from and version_from",
                            ));
                        }
                    }
                }
            }
        }
        Ok(())
    }
}
