//! Telemetry: Prometheus metrics, the typed events that log and count
//! together, the HTTP endpoints, and log set-up.

pub mod events;
pub mod logging;
pub mod metrics;
pub mod progress;
pub mod server;

pub use metrics::Metrics;
