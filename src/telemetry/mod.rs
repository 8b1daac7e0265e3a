//! Telemetry: Prometheus metrics, the typed events that log and count
//! together, the HTTP endpoints, and log set-up.

pub mod events;
pub mod logging;
pub mod metrics;
pub mod progress;
pub mod server;

pub use metrics::Metrics;

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

/// What `/readyz` reports: the consumer has joined its group and received
/// an assignment, no partition's dedup state is being restored, and the
/// sink's last write succeeded.
#[derive(Debug, Default)]
pub struct Readiness {
    assigned: AtomicBool,
    sink_ok: AtomicBool,
    /// Partitions whose dedup state is being restored.
    restoring: AtomicI64,
}

impl Readiness {
    pub fn set_assigned(&self, v: bool) {
        self.assigned.store(v, Ordering::SeqCst);
    }

    /// One more (`1`) or one fewer (`-1`) partition restoring.
    pub fn restoring(&self, change: i64) {
        self.restoring.fetch_add(change, Ordering::SeqCst);
    }

    pub fn set_sink_ok(&self, v: bool) {
        self.sink_ok.store(v, Ordering::SeqCst);
    }

    /// `Ok` when ready, otherwise what is missing.
    ///
    /// # Errors
    /// The reason it is not ready, for the response body.
    pub fn check(&self) -> Result<(), &'static str> {
        if !self.assigned.load(Ordering::SeqCst) {
            Err("not ready: waiting for a partition assignment from the consumer group\n")
        } else if self.restoring.load(Ordering::SeqCst) > 0 {
            Err("not ready: restoring dedup state from the changelog\n")
        } else if !self.sink_ok.load(Ordering::SeqCst) {
            Err("not ready: the sink is unreachable or failing; idem is retrying\n")
        } else {
            Ok(())
        }
    }
}
