//! idem: an exactly-once-effect Kafka consumer.
//!
//! idem reads JSON events from Kafka, drops duplicates by an idempotency key
//! kept in a RocksDB window, applies version-guarded idempotent writes to a
//! sink, and commits offsets only after the sink write and the dedup record
//! are durable.
//!
//! Module map, in data-path order:
//! - [`config`]: the configuration file and its start-up checks.
//! - [`record`]: a consumed record and the newtypes around it.
//! - [`decode`]: bytes to event: idempotency key, canonical fingerprint, or
//!   the reason a record can never succeed.
//! - [`dedup`]: the RocksDB dedup window, per-partition progress, and the
//!   changelog topic that lets a partition's dedup state follow it.
//! - [`sink`]: the sink contract and the sinks (SQLite, PostgreSQL, files,
//!   HTTP, Kafka).
//! - [`dead_letter`]: the dead-letter topic producer.
//! - [`delivery`]: delivery reports shared by idem's producers.
//! - [`pipeline`]: the write path per batch, and the consumer loop.
//! - [`outcome`]: the outcomes every record is counted in.
//! - [`fault`]: every failure classified, once: record, transient,
//!   operator or fatal.
//! - [`telemetry`]: metrics, typed events, `/metrics`, logging.
//! - [`clock`], [`failpoint`]: injectable time and crash points for tests.
//! - [`demo`]: `idem demo`, the whole job on an embedded Kafka cluster.
//! - [`replay`], [`inspect`]: the operator commands.

pub mod clock;
pub mod config;
pub mod dead_letter;
pub mod decode;
pub mod dedup;
pub mod delivery;
pub mod demo;
pub mod failpoint;
pub mod fault;
pub mod inspect;
pub mod outcome;
pub mod pipeline;
pub mod record;
pub mod replay;
pub mod sink;
pub mod telemetry;
