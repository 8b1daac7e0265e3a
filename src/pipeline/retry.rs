//! Shutdown signalling and backoff for transient failures.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::config::RetryConfig;

/// A flag that, once raised, wakes every sleeper at once.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    inner: Arc<(Mutex<bool>, Condvar)>,
}

impl Shutdown {
    pub fn new() -> Self {
        Shutdown::default()
    }

    pub fn trigger(&self) {
        let (lock, cvar) = &*self.inner;
        *lock.lock().expect("shutdown lock poisoned") = true;
        cvar.notify_all();
    }

    pub fn is_triggered(&self) -> bool {
        *self.inner.0.lock().expect("shutdown lock poisoned")
    }

    /// Sleeps for `d`, or less if shutdown is triggered meanwhile.
    /// Returns true when shutdown was triggered.
    pub fn sleep(&self, d: Duration) -> bool {
        let (lock, cvar) = &*self.inner;
        let guard = lock.lock().expect("shutdown lock poisoned");
        let (guard, _) = cvar
            .wait_timeout_while(guard, d, |stop| !*stop)
            .expect("shutdown lock poisoned");
        *guard
    }
}

/// Exponential backoff with jitter: each wait doubles up to the maximum,
/// and a random quarter is taken off so that many instances retrying the
/// same sink do not move in lockstep.
#[derive(Debug)]
pub struct Backoff {
    config: RetryConfig,
    attempt: u32,
}

impl Backoff {
    pub fn new(config: RetryConfig) -> Self {
        Backoff { config, attempt: 0 }
    }

    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The next wait; advances the attempt count.
    pub fn next_delay(&mut self) -> Duration {
        let exp = self.attempt.min(20);
        self.attempt += 1;
        let base = self
            .config
            .initial_backoff_ms
            .saturating_mul(1 << exp)
            .min(self.config.max_backoff_ms);
        let jitter = base / 4 * u64::from(jitter_percent()) / 100;
        Duration::from_millis(base - jitter)
    }
}

fn jitter_percent() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    // Scramble the low bits; this only needs to differ between processes.
    (nanos.wrapping_mul(2_654_435_761) >> 8) % 101
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        let mut b = Backoff::new(RetryConfig {
            initial_backoff_ms: 100,
            max_backoff_ms: 1_000,
        });
        let delays: Vec<_> = (0..8).map(|_| b.next_delay().as_millis()).collect();
        assert!(delays[0] >= 75 && delays[0] <= 100, "{delays:?}");
        assert!(delays[3] >= 600 && delays[3] <= 800, "{delays:?}");
        assert!(delays[7] >= 750 && delays[7] <= 1_000, "{delays:?}");
    }

    #[test]
    fn shutdown_wakes_a_sleeper() {
        let s = Shutdown::new();
        let s2 = s.clone();
        let t = std::thread::spawn(move || s2.sleep(Duration::from_secs(60)));
        s.trigger();
        assert!(t.join().unwrap());
    }
}
