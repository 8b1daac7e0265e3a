//! Crash points on the write path.
//!
//! Two ways to crash at a named point:
//! - With the `failpoints` cargo feature (tests only), the environment
//!   variable `IDEM_CRASH_AT=<point>[:<n>]` makes the process SIGKILL
//!   itself the n-th time (default 1st) it reaches `<point>`, and
//!   `IDEM_STALL_AT=<point>:<seconds>` makes it sleep there the first
//!   time, as a long pause would. Release builds for users do not compile
//!   this in.
//! - A [`CrashPlan`] given to the pipeline stops it at a point as if it
//!   had been killed: nothing after the point runs, nothing is committed.
//!   `idem demo` uses it to show a crash and a recovery in one process.
//!
//! The points, in write-path order: `mid-sink-batch` (inside the sink
//! transaction), `after-sink-write`, `after-dead-letter`,
//! `before-changelog-ack` (RocksDB written, the changelog's acks not yet
//! waited for), `after-dedup-write` (before the offset commit), and with
//! the Kafka sink
//! `before-transaction-commit` (offsets sent, commit not yet).

use std::sync::atomic::{AtomicUsize, Ordering};

/// Reaching a point: with the `failpoints` feature and a matching
/// `IDEM_CRASH_AT`, the process dies here by SIGKILL.
#[cfg(feature = "failpoints")]
pub fn hit(point: &str) {
    use std::sync::OnceLock;
    static PLAN: OnceLock<Option<(String, usize)>> = OnceLock::new();
    static HITS: AtomicUsize = AtomicUsize::new(0);
    let plan = PLAN.get_or_init(|| {
        let spec = std::env::var("IDEM_CRASH_AT").ok()?;
        let (name, n) = match spec.split_once(':') {
            Some((name, n)) => (name.to_string(), n.parse().unwrap_or(1)),
            None => (spec, 1),
        };
        Some((name, n))
    });
    static STALL: OnceLock<Option<(String, u64)>> = OnceLock::new();
    static STALLED: AtomicUsize = AtomicUsize::new(0);
    let stall = STALL.get_or_init(|| {
        let spec = std::env::var("IDEM_STALL_AT").ok()?;
        let (name, secs) = spec.split_once(':')?;
        Some((name.to_string(), secs.parse().ok()?))
    });
    if let Some((name, secs)) = stall {
        if name == point && STALLED.fetch_add(1, Ordering::SeqCst) == 0 {
            eprintln!("idem: failpoint {point} reached; stalling for {secs} s");
            std::thread::sleep(std::time::Duration::from_secs(*secs));
        }
    }
    if let Some((name, n)) = plan {
        if name == point && HITS.fetch_add(1, Ordering::SeqCst) + 1 == *n {
            eprintln!("idem: failpoint {point} reached; killing this process with SIGKILL");
            // SAFETY: kill(2) on our own pid has no memory-safety impact.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
        }
    }
}

/// Without the `failpoints` feature, crash points compile to nothing.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_point: &str) {}

/// The pipeline stopped at a crash point, as if killed.
#[derive(Debug, thiserror::Error)]
#[error("stopped at crash point {0}")]
pub struct Crashed(pub &'static str);

/// An in-process crash at the n-th time a point is reached.
#[derive(Debug, Default)]
pub struct CrashPlan {
    at: Option<(&'static str, usize)>,
    hits: AtomicUsize,
}

impl CrashPlan {
    pub fn none() -> Self {
        CrashPlan::default()
    }

    pub fn at(point: &'static str, nth: usize) -> Self {
        CrashPlan {
            at: Some((point, nth)),
            hits: AtomicUsize::new(0),
        }
    }

    /// Called at each crash point.
    ///
    /// # Errors
    /// [`Crashed`] when this is the planned point and hit.
    pub fn check(&self, point: &'static str) -> Result<(), Crashed> {
        hit(point);
        match self.at {
            Some((name, nth)) if name == point => {
                if self.hits.fetch_add(1, Ordering::SeqCst) + 1 == nth {
                    Err(Crashed(point))
                } else {
                    Ok(())
                }
            }
            _ => Ok(()),
        }
    }
}
