//! The configuration file: serde structs, defaults, and the cross-field
//! checks that run at start-up.
//!
//! Every struct denies unknown fields, so a misspelt key fails loudly
//! instead of silently falling back to a default. Every error names the
//! field (dotted path) and says what to change; the binary exits with
//! code 2 on any of them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod secrets;
mod sink;

pub(crate) use secrets::is_secret;
pub use secrets::{describe, redact_url, redact_url_password};
pub use sink::*;

/// A configuration error: which field, and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config field `{field}`: {problem}")]
    Invalid { field: String, problem: String },
}

pub(crate) fn invalid(field: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        problem: problem.into(),
    }
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub kafka: KafkaConfig,
    /// The input topics. At least one.
    pub topics: Vec<TopicConfig>,
    #[serde(default)]
    pub batch: BatchConfig,
    pub dedup: DedupConfig,
    pub sink: SinkConfig,
    pub dead_letter: DeadLetterConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub retry: RetryConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub log: LogConfig,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// librdkafka's `bootstrap.servers`.
    pub bootstrap_servers: String,
    /// The consumer group. Instances with the same group share partitions.
    pub group_id: String,
    /// Where a partition starts when neither the group's committed offset
    /// nor idem's own stored progress is usable (see `pipeline::start`).
    #[serde(default)]
    pub offset_reset: OffsetReset,
    /// librdkafka's `session.timeout.ms`; its default is 45 s.
    #[serde(default = "default_session_timeout_ms")]
    pub session_timeout_ms: u64,
    /// Extra librdkafka properties (security, TLS, SASL, client.id...),
    /// passed through as they are. The few that would break the guarantee
    /// (auto commit, auto offset store, isolation level) are refused.
    /// Numbers and booleans are taken as their text.
    #[serde(default, deserialize_with = "property_values")]
    pub properties: BTreeMap<String, String>,
}

/// librdkafka properties are text; a number or a boolean is taken as it is
/// written. Any other value is refused by name only: a property may be a
/// password, and the error must not quote it.
fn property_values<'de, D>(deserializer: D) -> Result<BTreeMap<String, String>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    use serde::de::Error as _;
    let raw = BTreeMap::<String, toml::Value>::deserialize(deserializer)?;
    raw.into_iter()
        .map(|(key, value)| {
            let text = match value {
                toml::Value::String(s) => s,
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                toml::Value::Float(f) => f.to_string(),
                _ => {
                    return Err(D::Error::custom(format!(
                        "property `{key}` must be a string, a number or a boolean \
                         (its value is not shown)"
                    )))
                }
            };
            Ok((key, text))
        })
        .collect()
}

fn default_session_timeout_ms() -> u64 {
    45_000
}

/// librdkafka properties that idem owns, because the guarantee depends on
/// their value.
pub const RESERVED_KAFKA_PROPERTIES: &[&str] = &[
    "metadata.broker.list",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "isolation.level",
    "group.id",
    "bootstrap.servers",
    "auto.offset.reset",
    "partition.assignment.strategy",
];

/// The librdkafka property whose mere setting loads shared libraries; see
/// `Config::validate_kafka`.
const LOADS_LIBRARIES: &str = "plugin.library.paths";

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum OffsetReset {
    /// Start at the oldest record still in the partition (default: a new
    /// group processes everything the topic holds).
    #[default]
    Earliest,
    /// Start at the end: only records produced after the group first joined.
    Latest,
    /// Stop with an error: an operator chooses the offset (`idem replay`).
    Fail,
}

impl OffsetReset {
    pub fn as_librdkafka(self) -> &'static str {
        match self {
            OffsetReset::Earliest => "earliest",
            OffsetReset::Latest => "latest",
            OffsetReset::Fail => "error",
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TopicConfig {
    pub name: String,
    /// Where the idempotency key comes from; default: the
    /// `Idempotency-Key` header.
    #[serde(default)]
    pub key: KeySource,
}

/// Where a record's idempotency key comes from.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(tag = "from", rename_all = "kebab-case", deny_unknown_fields)]
pub enum KeySource {
    /// A record header; its value must be UTF-8.
    Header { name: String },
    /// The Kafka record key; it must be UTF-8.
    RecordKey {},
    /// One or more JSON pointers into the payload. One pointer gives the
    /// value itself; several give a JSON array of the values, so that
    /// `["a:b","c"]` and `["a","b:c"]` never collide.
    Pointers { pointers: Vec<String> },
    /// A hash of the canonical payload: identical events are duplicates,
    /// and no two different bodies can conflict.
    PayloadHash {},
}

impl Default for KeySource {
    fn default() -> Self {
        KeySource::Header {
            name: "Idempotency-Key".to_string(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// Most records in one batch.
    #[serde(default = "default_max_records")]
    pub max_records: usize,
    /// Most payload bytes in one batch.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: usize,
    /// How long a batch waits to fill before it is processed anyway.
    #[serde(default = "default_linger_ms")]
    pub linger_ms: u64,
}

fn default_max_records() -> usize {
    5000
}
fn default_max_bytes() -> usize {
    8 << 20
}
fn default_linger_ms() -> u64 {
    10
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_records: default_max_records(),
            max_bytes: default_max_bytes(),
            linger_ms: default_linger_ms(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DedupConfig {
    /// The RocksDB directory. Keep it on local disk that survives restarts.
    pub path: PathBuf,
    /// How long a key is remembered from when it was first seen, as a
    /// humantime string ("10s", "36h", "7d").
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Write every dedup record to a compacted changelog topic, so that a
    /// partition's dedup state follows it to another instance. Off only
    /// for a group that will only ever have one instance.
    #[serde(default = "default_true")]
    pub changelog: bool,
    /// How often keys past the window are removed, with a tombstone in the
    /// changelog, as a humantime string.
    #[serde(with = "humantime_serde", default = "default_sweep_interval")]
    pub sweep_interval: Duration,
}

pub(crate) fn default_true() -> bool {
    true
}

fn default_sweep_interval() -> Duration {
    Duration::from_secs(600)
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterConfig {
    /// The topic that receives records that can never succeed. It must
    /// exist; while it is missing or unwritable, the offset does not move.
    pub topic: String,
    /// How long one dead-letter write may wait for the broker's ack before
    /// it is retried.
    #[serde(default = "default_dead_letter_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_dead_letter_timeout_ms() -> u64 {
    30_000
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// A payload larger than this is dead-lettered as too-large.
    #[serde(default = "default_max_record_bytes")]
    pub max_record_bytes: usize,
    /// An idempotency key longer than this is dead-lettered as bad-key.
    #[serde(default = "default_max_key_bytes")]
    pub max_key_bytes: usize,
}

fn default_max_record_bytes() -> usize {
    1 << 20
}
fn default_max_key_bytes() -> usize {
    1024
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_record_bytes: default_max_record_bytes(),
            max_key_bytes: default_max_key_bytes(),
        }
    }
}

/// Backoff for transient failures (sink locked or down, broker errors).
#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    #[serde(default = "default_initial_backoff_ms")]
    pub initial_backoff_ms: u64,
    #[serde(default = "default_max_backoff_ms")]
    pub max_backoff_ms: u64,
}

fn default_initial_backoff_ms() -> u64 {
    100
}
fn default_max_backoff_ms() -> u64 {
    10_000
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            initial_backoff_ms: default_initial_backoff_ms(),
            max_backoff_ms: default_max_backoff_ms(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the `/metrics` and `/healthz` server. Loopback by
    /// default, so that nothing is exposed unless asked for.
    #[serde(default = "default_metrics_listen")]
    pub listen: String,
    /// How often the per-partition dedup gauges are refreshed by a scan of
    /// the store (a few seconds of one core per ten million keys); 0 turns
    /// the scan off.
    #[serde(default = "default_dedup_scan_secs")]
    pub dedup_scan_secs: u64,
}

fn default_dedup_scan_secs() -> u64 {
    60
}

fn default_metrics_listen() -> String {
    "127.0.0.1:9464".to_string()
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: default_metrics_listen(),
            dedup_scan_secs: default_dedup_scan_secs(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default)]
    pub format: LogFormat,
    /// A tracing filter directive, e.g. `info` or `idem=debug,rdkafka=warn`.
    /// The `RUST_LOG` environment variable overrides it.
    #[serde(default = "default_log_level")]
    pub level: String,
}

fn default_log_level() -> String {
    "info".to_string()
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::default(),
            level: default_log_level(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

/// Checks a log filter (`log.level`, `RUST_LOG`). A bare word that is not
/// a level reads to tracing as a target name and silences every log line,
/// so it is refused too.
///
/// # Errors
/// What is wrong with it.
pub fn check_log_filter(filter: &str) -> Result<(), String> {
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(filter) {
        return Err(format!("not a tracing filter: {e}"));
    }
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    for directive in filter.split(',').map(str::trim) {
        if !directive.contains('=') && !LEVELS.contains(&directive.to_ascii_lowercase().as_str()) {
            return Err(format!(
                "`{directive}` is not a level; use trace, debug, info, warn, error or off, or \
                 target=level"
            ));
        }
    }
    Ok(())
}

impl KafkaConfig {
    /// librdkafka's `max.poll.interval.ms` as configured (default 300 s):
    /// how long one batch may keep the consumer from polling.
    pub fn max_poll_interval(&self) -> Duration {
        let ms = self
            .properties
            .get("max.poll.interval.ms")
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(300_000);
        Duration::from_millis(ms)
    }
}

impl Config {
    /// Reads, parses and validates a config file.
    ///
    /// # Errors
    /// Any [`ConfigError`]: unreadable file, TOML that does not match the
    /// schema (the message names the field), or a failed cross-field check.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parses and validates config text; `origin` names it in errors.
    ///
    /// # Errors
    /// As [`Config::load`].
    pub fn parse(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        // The parser's own message quotes the offending line, which may hold
        // a secret: say where, not what.
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_path_buf(),
            message: parse_error_message(text, &e),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// The cross-field checks that serde cannot express.
    ///
    /// # Errors
    /// The first problem found, naming its field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_kafka()?;
        self.validate_topics()?;
        if self.batch.max_records == 0 {
            return Err(invalid("batch.max_records", "must be at least 1"));
        }
        if self.batch.max_bytes == 0 {
            return Err(invalid("batch.max_bytes", "must be at least 1"));
        }
        if self.batch.linger_ms > 60_000 {
            return Err(invalid(
                "batch.linger_ms",
                "must be at most 60000 (one minute)",
            ));
        }
        if self.limits.max_record_bytes == 0 || self.limits.max_key_bytes == 0 {
            return Err(invalid(
                "limits",
                "max_record_bytes and max_key_bytes must be at least 1",
            ));
        }
        if self.dead_letter.timeout_ms == 0 {
            return Err(invalid("dead_letter.timeout_ms", "must be at least 1"));
        }
        if self.dedup.path.as_os_str().is_empty() {
            return Err(invalid(
                "dedup.path",
                "must name a directory, e.g. \"data/dedup\"",
            ));
        }
        let sink_path = match &self.sink {
            SinkConfig::Sqlite(s) => Some(&s.path),
            SinkConfig::Files(f) => Some(&f.dir),
            _ => None,
        };
        if let Some(path) = sink_path {
            if path.as_os_str().is_empty() {
                return Err(invalid(
                    "sink.path",
                    "must name a file (sqlite) or directory (files), e.g. \"data/orders.db\"",
                ));
            }
            if *path == self.dedup.path {
                return Err(invalid("sink.path", "must differ from dedup.path"));
            }
        }
        if self.dedup.sweep_interval < Duration::from_secs(1) {
            return Err(invalid(
                "dedup.sweep_interval",
                "must be at least 1s (each sweep scans the owned partitions' keys), e.g. \"10m\"",
            ));
        }
        if self.dedup.window.is_zero() {
            return Err(invalid(
                "dedup.window",
                "must be longer than zero, e.g. \"7d\"",
            ));
        }
        if self.dead_letter.topic.trim().is_empty() {
            return Err(invalid("dead_letter.topic", "must name a topic"));
        }
        if let SinkConfig::Kafka(k) = &self.sink {
            if self.topics.iter().any(|t| t.name == k.topic) {
                return Err(invalid(
                    "sink.topic",
                    "must not be one of the input topics: idem would read its own output",
                ));
            }
            if k.topic == self.dead_letter.topic {
                return Err(invalid(
                    "sink.topic",
                    "must differ from dead_letter.topic, so that outputs and dead letters stay apart",
                ));
            }
        }
        if self.topics.iter().any(|t| t.name == self.dead_letter.topic) {
            return Err(invalid(
                "dead_letter.topic",
                "must not be one of the input topics",
            ));
        }
        if self.retry.initial_backoff_ms == 0
            || self.retry.max_backoff_ms < self.retry.initial_backoff_ms
        {
            return Err(invalid(
                "retry",
                "initial_backoff_ms must be at least 1 and at most max_backoff_ms",
            ));
        }
        if self.metrics.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(invalid(
                "metrics.listen",
                format!(
                    "`{}` is not an IP:port address, e.g. \"127.0.0.1:9464\"",
                    self.metrics.listen
                ),
            ));
        }
        check_log_filter(&self.log.level).map_err(|why| invalid("log.level", why))?;
        self.sink.validate()?;
        Ok(())
    }

    fn validate_kafka(&self) -> Result<(), ConfigError> {
        if self.kafka.bootstrap_servers.trim().is_empty() {
            return Err(invalid(
                "kafka.bootstrap_servers",
                "must list at least one host:port",
            ));
        }
        if self.kafka.group_id.trim().is_empty() {
            return Err(invalid("kafka.group_id", "must name a consumer group"));
        }
        if !(1_000..=3_600_000).contains(&self.kafka.session_timeout_ms) {
            return Err(invalid(
                "kafka.session_timeout_ms",
                "must be between 1000 and 3600000 (librdkafka's range; the broker may ask for more)",
            ));
        }
        for key in self.kafka.properties.keys() {
            if RESERVED_KAFKA_PROPERTIES.contains(&key.to_ascii_lowercase().as_str()) {
                return Err(invalid(
                    format!("kafka.properties.{key}"),
                    "is set by idem itself, because the guarantee depends on it; remove it",
                ));
            }
        }
        if let Some(v) = self.kafka.properties.get("max.poll.interval.ms") {
            if v.parse::<u64>()
                .is_ok_and(|ms| ms < self.kafka.session_timeout_ms)
            {
                return Err(invalid(
                    "kafka.properties.max.poll.interval.ms",
                    format!(
                        "must be at least kafka.session_timeout_ms ({})",
                        self.kafka.session_timeout_ms
                    ),
                ));
            }
        }
        // librdkafka checks names and values without connecting anywhere.
        // All but one: setting `plugin.library.paths` loads (dlopen) the
        // libraries it names, which would run their code while a config is
        // only being checked (`idem check-config` on a file from anywhere).
        // They are loaded when idem creates its clients, as librdkafka
        // documents.
        let mut client = rdkafka::ClientConfig::new();
        for (k, v) in &self.kafka.properties {
            if k == LOADS_LIBRARIES {
                continue;
            }
            client.set(k, v);
            if let Err(e) = client.create_native_config() {
                // librdkafka's message quotes the value, which may be a
                // secret under a misspelt name: it is never shown.
                let why = if is_secret(k) || v.is_empty() {
                    "librdkafka refuses this property (its value is not shown)".to_string()
                } else {
                    e.to_string().replace(v.as_str(), "<value not shown>")
                };
                return Err(invalid(format!("kafka.properties.{k}"), why));
            }
        }
        Ok(())
    }

    fn validate_topics(&self) -> Result<(), ConfigError> {
        if self.topics.is_empty() {
            return Err(invalid(
                "topics",
                "add at least one [[topics]] table with a name",
            ));
        }
        for (i, topic) in self.topics.iter().enumerate() {
            let field = format!("topics[{i}]");
            if topic.name.trim().is_empty() {
                return Err(invalid(format!("{field}.name"), "must name a topic"));
            }
            if self.topics[..i].iter().any(|t| t.name == topic.name) {
                return Err(invalid(
                    format!("{field}.name"),
                    format!("topic `{}` is listed twice", topic.name),
                ));
            }
            match &topic.key {
                KeySource::Header { name } if name.is_empty() => {
                    return Err(invalid(format!("{field}.key.name"), "must name a header"));
                }
                KeySource::Pointers { pointers } => {
                    if pointers.is_empty() {
                        return Err(invalid(
                            format!("{field}.key.pointers"),
                            "list at least one JSON pointer, e.g. [\"/id\"]",
                        ));
                    }
                    for p in pointers {
                        check_pointer(&format!("{field}.key.pointers"), p)?;
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The topic names, in config order.
    pub fn topic_names(&self) -> Vec<&str> {
        self.topics.iter().map(|t| t.name.as_str()).collect()
    }
}

/// A TOML error as "field (line N): problem", without quoting the line,
/// which may hold a secret.
fn parse_error_message(text: &str, e: &toml::de::Error) -> String {
    let Some(span) = e.span() else {
        return e.message().trim_end().to_string();
    };
    let start = span.start.min(text.len());
    let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
    let line_no = text[..start].matches('\n').count() + 1;
    let line = text[line_start..].lines().next().unwrap_or_default().trim();
    // A whole table's error (a tagged table such as [sink]) points at its
    // header line; otherwise the nearest header above names the table.
    let section = std::iter::once(line)
        .filter(|l| l.starts_with('['))
        .chain(
            text[..line_start]
                .lines()
                .rev()
                .map(str::trim)
                .filter(|l| l.starts_with('[')),
        )
        .next()
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    let key = line
        .split_once('=')
        .map(|(k, _)| k.trim().trim_matches('"').to_string())
        .filter(|k| !k.is_empty() && !line.starts_with('['));
    let field = match (section, key) {
        (Some(s), Some(k)) => format!("`{s}.{k}` "),
        (None, Some(k)) => format!("`{k}` "),
        (Some(s), None) => format!("`{s}` "),
        (None, None) => String::new(),
    };
    format!("{field}(line {line_no}): {}", e.message().trim_end())
}

pub(crate) fn check_pointer(field: &str, pointer: &str) -> Result<(), ConfigError> {
    if pointer.is_empty() || !pointer.starts_with('/') {
        return Err(invalid(
            field,
            format!("`{pointer}` is not a JSON pointer; it must start with '/', e.g. \"/id\""),
        ));
    }
    Ok(())
}

/// SQL identifiers come from config, never from data; even so they are
/// restricted to a plain alphabet and always quoted when used.
pub(crate) fn check_identifier(field: &str, name: &str) -> Result<(), ConfigError> {
    let mut chars = name.chars();
    let ok = matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 63;
    if ok {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!(
                "`{name}` is not a plain SQL name; use letters, digits and '_' \
                 (at most 63, not starting with a digit)"
            ),
        ))
    }
}

#[cfg(test)]
impl Config {
    /// A valid configuration for unit tests elsewhere: topic `t` into a
    /// SQLite table. `kafka` is added to the `[kafka]` table (or starts
    /// tables of its own), `topic` to the topic's.
    pub(crate) fn for_tests(kafka: &str, topic: &str) -> Config {
        let text = format!(
            r#"
[kafka]
bootstrap_servers = "127.0.0.1:9092"
group_id = "g"
{kafka}

[[topics]]
name = "t"
{topic}

[dedup]
path = "/tmp/d"
window = "1d"

[sink]
kind = "sqlite"
path = "/tmp/s.db"

[sink.table]
name = "t"
mode = "upsert"
key_column = "id"
version_column = "ver"
columns = {{ id = "/id", ver = "/ver" }}

[dead_letter]
topic = "t.dlq"
"#
        );
        Config::parse(&text, Path::new("test.toml")).expect("test config")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[kafka]
bootstrap_servers = "127.0.0.1:9092"
group_id = "g"

[[topics]]
name = "orders.v1"

[dedup]
path = "/tmp/d"
window = "7d"

[sink]
kind = "sqlite"
path = "/tmp/s.db"

[sink.table]
name = "orders"
mode = "upsert"
key_column = "id"
version_column = "ver"
columns = { id = "/id", ver = "/ver", qty = "/qty" }

[dead_letter]
topic = "orders.v1.dlq"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    #[test]
    fn good_config_parses_with_defaults() {
        let config = parse(GOOD).unwrap();
        assert_eq!(config.dedup.window, Duration::from_secs(7 * 86_400));
        assert_eq!(config.topics[0].key, KeySource::default());
        assert_eq!(config.batch.max_records, 5000);
        let SinkConfig::Sqlite(sqlite) = &config.sink else {
            panic!("the test config uses SQLite");
        };
        assert_eq!(
            sqlite.table.version_source("t").unwrap(),
            VersionSource::Pointer("/ver".into())
        );
    }

    fn with_kafka_sink(extra: &str) -> String {
        let start = GOOD.find("[sink]").unwrap();
        let end = GOOD.find("[dead_letter]").unwrap();
        format!(
            "{}[sink]\nkind = \"kafka\"\n{extra}\n\n{}",
            &GOOD[..start],
            &GOOD[end..]
        )
    }

    #[test]
    fn kafka_sink_config_is_checked() {
        let config = parse(&with_kafka_sink("topic = \"orders.clean\"")).unwrap();
        let SinkConfig::Kafka(kafka) = &config.sink else {
            panic!("kafka sink expected");
        };
        assert_eq!(kafka.transactional_id("g"), "idem-g");
        assert_eq!(kafka.transaction_timeout_ms, 60_000);
        for (extra, field) in [
            ("topic = \"orders.v1\"", "sink.topic"),
            ("topic = \"orders.v1.dlq\"", "sink.topic"),
            ("topic = \" \"", "sink.topic"),
            (
                "topic = \"o\"\ntransaction_timeout_ms = 100",
                "sink.transaction_timeout_ms",
            ),
            (
                "topic = \"o\"\ntransactional_id = \"\"",
                "sink.transactional_id",
            ),
            ("topic = \"o\"\nkey_from = \"id\"", "sink.key_from"),
        ] {
            let err = parse(&with_kafka_sink(extra)).unwrap_err().to_string();
            assert!(err.contains(field), "{extra}: {err}");
        }
    }

    #[test]
    fn unknown_field_is_named() {
        let text = GOOD.replace("group_id = \"g\"", "group_id = \"g\"\ngroup = \"x\"");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("unknown field `group`"), "{err}");
    }

    #[test]
    fn upsert_without_version_names_the_field() {
        let text = GOOD.replace("version_column = \"ver\"\n", "");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("sink.table.version_column"), "{err}");
    }

    #[test]
    fn reserved_kafka_property_is_refused() {
        let text = GOOD.replace(
            "group_id = \"g\"",
            "group_id = \"g\"\nproperties = { \"enable.auto.commit\" = \"true\" }",
        );
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("kafka.properties.enable.auto.commit"), "{err}");
    }

    /// Checking a config loaded the librdkafka plugins it named: `idem
    /// check-config` ran the code of any shared library a config pointed at.
    #[test]
    fn checking_a_config_loads_no_plugin_library() {
        let text = GOOD.replace(
            "group_id = \"g\"",
            "group_id = \"g\"\nproperties = { \"plugin.library.paths\" = \"/nonexistent/libidem-test-plugin\" }",
        );
        // Had librdkafka tried to load it, dlopen's failure would refuse
        // the config.
        let config = parse(&text).unwrap();
        assert_eq!(
            config.kafka.properties["plugin.library.paths"],
            "/nonexistent/libidem-test-plugin"
        );
    }

    #[test]
    fn sql_injection_in_table_name_is_refused() {
        let text = GOOD.replace("name = \"orders\"", "name = \"orders; drop table x\"");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("sink.table.name"), "{err}");
    }

    #[test]
    fn bad_window_names_the_field() {
        let text = GOOD.replace("window = \"7d\"", "window = \"seven days\"");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("window"), "{err}");
    }

    #[test]
    fn describe_redacts_secrets() {
        let text = GOOD.replace(
            "group_id = \"g\"",
            "group_id = \"g\"\nproperties = { \"sasl.password\" = \"hunter2\" }",
        );
        let shown = describe(&parse(&text).unwrap());
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("<redacted>"));
    }

    #[test]
    fn postgres_password_is_redacted() {
        assert_eq!(
            redact_url_password("postgresql://idem:s3cret@db:5432/orders"),
            "postgresql://idem:<redacted>@db:5432/orders"
        );
        assert_eq!(
            redact_url_password("postgresql://idem@db/x"),
            "postgresql://idem@db/x"
        );
        assert_eq!(
            redact_url_password("postgresql://db/x?user=a&password=s3cret&sslmode=require"),
            "postgresql://db/x?user=a&password=<redacted>&sslmode=require"
        );
        assert_eq!(
            secrets::redact_url("https://user:TOPSECRET6@hooks.test/x?token=T0K&a=1"),
            "https://user:<redacted>@hooks.test/x?token=<redacted>&a=1"
        );
        assert_eq!(
            secrets::redact_url("https://T0KEN@hooks.test/x"),
            "https://<redacted>@hooks.test/x"
        );
        assert_eq!(
            redact_url_password("postgresql://idem:TOP?SECRET@db:5432/x?sslmode=require"),
            "postgresql://idem:<redacted>@db:5432/x?sslmode=require"
        );
        assert_eq!(
            secrets::redact_url("https://h.test/x?api_key=A&key=B&sig=C&X-Amz-Signature=D&n=1"),
            "https://h.test/x?api_key=<redacted>&key=<redacted>&sig=<redacted>\
             &X-Amz-Signature=<redacted>&n=1"
        );
        assert_eq!(
            redact_url_password("postgresql://db/x?user=a@b"),
            "postgresql://db/x?user=a@b"
        );
    }

    #[test]
    fn property_errors_never_quote_the_value() {
        for properties in [
            "{ \"sasl.passwrod\" = \"TOPSECRET1\" }",
            "{ \"sasl.password\" = [\"TOPSECRET1\"] }",
        ] {
            let text = GOOD.replace(
                "group_id = \"g\"",
                &format!("group_id = \"g\"\nproperties = {properties}"),
            );
            let err = parse(&text).unwrap_err().to_string();
            assert!(!err.contains("TOPSECRET1"), "{err}");
            assert!(err.contains("sasl.passw"), "{err}");
        }
        // A number is taken as its text.
        let text = GOOD.replace(
            "group_id = \"g\"",
            "group_id = \"g\"\nproperties = { \"fetch.wait.max.ms\" = 100 }",
        );
        let config = parse(&text).unwrap();
        assert_eq!(config.kafka.properties["fetch.wait.max.ms"], "100");
    }

    #[test]
    fn a_parse_error_names_the_field_but_does_not_quote_the_line() {
        let text = GOOD.replace(
            "group_id = \"g\"",
            "group_id = \"g\"\nproperties = { \"sasl.password\" = \"hunter2\", \"x\" = 1 }",
        );
        let err = parse(&text).unwrap_err().to_string();
        assert!(!err.contains("hunter2"), "{err}");
        assert!(err.contains("kafka.properties"), "{err}");
    }

    #[test]
    fn errors_inside_the_sink_table_name_the_sink() {
        let text = GOOD.replace("path = \"/tmp/s.db\"", "path = \"/tmp/s.db\"\nbusy = 1");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("`sink"), "{err}");
    }

    #[test]
    fn a_misspelt_log_level_is_refused() {
        let text = GOOD.to_string() + "\n[log]\nlevel = \"warning\"\n";
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("log.level"), "{err}");
        let ok = GOOD.to_string() + "\n[log]\nlevel = \"info,librdkafka=warn\"\n";
        assert!(parse(&ok).is_ok());
    }

    #[test]
    fn key_source_variants_parse() {
        let text = GOOD.replace(
            "name = \"orders.v1\"",
            "name = \"orders.v1\"\nkey = { from = \"pointers\", pointers = [\"/id\", \"/ver\"] }",
        );
        let config = parse(&text).unwrap();
        assert_eq!(
            config.topics[0].key,
            KeySource::Pointers {
                pointers: vec!["/id".into(), "/ver".into()]
            }
        );
        let text = GOOD.replace(
            "name = \"orders.v1\"",
            "name = \"orders.v1\"\nkey = { from = \"record-key\", extra = 1 }",
        );
        assert!(parse(&text).is_err());
    }
}
