//! Progress of a long catch-up (after a replay, or a long stop): a bar on a
//! terminal, log lines with rate and time remaining otherwise.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use tracing::info;

/// Lag at which a catch-up is reported, in records.
const BEHIND: u64 = 1_000;

#[derive(Default)]
pub struct CatchUp {
    run: Option<Run>,
}

struct Run {
    started: Instant,
    read_at_start: u64,
    last: (Instant, u64),
    bar: Option<ProgressBar>,
}

impl CatchUp {
    pub fn new() -> Self {
        CatchUp::default()
    }

    /// Takes the current total lag and the records read so far.
    pub fn update(&mut self, lag: u64, read_total: u64) {
        let now = Instant::now();
        match (&mut self.run, lag >= BEHIND) {
            (None, false) => {}
            (None, true) => {
                info!(lag, "catching up");
                let bar = std::io::stderr().is_terminal().then(|| {
                    let bar = ProgressBar::new(lag);
                    bar.set_style(
                        ProgressStyle::with_template(
                            "catching up {bar:40} {pos}/{len} records, {per_sec}, {eta} left",
                        )
                        .expect("valid template"),
                    );
                    bar
                });
                self.run = Some(Run {
                    started: now,
                    read_at_start: read_total,
                    last: (now, read_total),
                    bar,
                });
            }
            (Some(run), behind) => {
                let done = read_total.saturating_sub(run.read_at_start);
                let secs = now.duration_since(run.last.0).as_secs_f64().max(0.001);
                let rate = read_total.saturating_sub(run.last.1) as f64 / secs;
                run.last = (now, read_total);
                if let Some(bar) = &run.bar {
                    bar.set_length(done + lag);
                    bar.set_position(done);
                }
                if !behind {
                    if let Some(bar) = &run.bar {
                        bar.finish_and_clear();
                    }
                    info!(
                        records = done,
                        secs = run.started.elapsed().as_secs(),
                        "caught up"
                    );
                    self.run = None;
                } else if run.bar.is_none() {
                    let remaining = if rate > 0.0 {
                        humantime::format_duration(Duration::from_secs((lag as f64 / rate) as u64))
                            .to_string()
                    } else {
                        "unknown".to_string()
                    };
                    info!(
                        lag,
                        done,
                        rate = rate.round() as u64,
                        remaining,
                        "catching up"
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_only_while_far_behind() {
        let mut c = CatchUp::new();
        c.update(10, 0);
        assert!(c.run.is_none(), "a small lag is not a catch-up");
        c.update(50_000, 100);
        let run = c.run.as_ref().expect("started");
        assert_eq!(run.read_at_start, 100);
        c.update(20_000, 30_100);
        assert!(c.run.is_some());
        c.update(0, 50_100);
        assert!(c.run.is_none(), "caught up");
    }
}
