//! Reading idem's `/metrics`: a plain HTTP/1.0 GET on the loopback
//! address, the Prometheus text format, and quantiles from a histogram's
//! cumulative buckets.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::time::Duration;

/// One sample: metric name, label text (inside the braces) and value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: String,
    pub value: f64,
}

/// Fetches `http://{addr}/metrics` and parses it.
///
/// # Errors
/// The server does not answer, or answers other than 200.
pub fn fetch(addr: &str) -> anyhow::Result<Vec<Sample>> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("no HTTP header in the answer"))?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        anyhow::bail!("/metrics answered {}", head.lines().next().unwrap_or(""));
    }
    Ok(parse(body))
}

/// Parses Prometheus text; comment lines and lines it cannot read are
/// skipped.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let value = value.parse::<f64>().ok()?;
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            Some(Sample {
                name: name.to_string(),
                labels: labels.to_string(),
                value,
            })
        })
        .collect()
}

/// What the counters and histograms of `later` added since `earlier`
/// (a sample missing from `earlier` counts from 0).
pub fn since(later: &[Sample], earlier: &[Sample]) -> Vec<Sample> {
    later
        .iter()
        .map(|s| {
            let before = earlier
                .iter()
                .find(|e| e.name == s.name && e.labels == s.labels)
                .map_or(0.0, |e| e.value);
            Sample {
                value: s.value - before,
                ..s.clone()
            }
        })
        .collect()
}

/// The sum of every sample of `name` whose labels contain `filter`.
pub fn sum(samples: &[Sample], name: &str, filter: &str) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name && s.labels.contains(filter))
        .map(|s| s.value)
        .sum()
}

/// A histogram's cumulative buckets: (upper bound, count), ascending, the
/// `+Inf` bucket last.
pub fn buckets(samples: &[Sample], histogram: &str) -> Vec<(f64, f64)> {
    let name = format!("{histogram}_bucket");
    let mut out: Vec<(f64, f64)> = samples
        .iter()
        .filter(|s| s.name == name)
        .filter_map(|s| {
            let le = s.labels.split("le=\"").nth(1)?.split('"').next()?;
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((bound, s.value))
        })
        .collect();
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

/// The `q` quantile, interpolated linearly inside the bucket it falls in
/// (as Prometheus' `histogram_quantile` does), the first bucket starting
/// at 0. A quantile in the `+Inf` bucket is reported as the largest finite
/// bound. `None` for an empty histogram.
pub fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(bound, count) in buckets {
        if count >= rank {
            if bound.is_infinite() {
                return Some(lower.0);
            }
            let inside = count - lower.1;
            let fraction = if inside > 0.0 {
                (rank - lower.1) / inside
            } else {
                1.0
            };
            return Some(lower.0 + (bound - lower.0) * fraction);
        }
        lower = (bound, count);
    }
    Some(lower.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP idem_batch_seconds x\n\
        # TYPE idem_batch_seconds histogram\n\
        idem_batch_seconds_bucket{le=\"0.01\"} 10\n\
        idem_batch_seconds_bucket{le=\"0.025\"} 90\n\
        idem_batch_seconds_bucket{le=\"0.05\"} 100\n\
        idem_batch_seconds_bucket{le=\"+Inf\"} 100\n\
        idem_batch_seconds_count 100\n\
        idem_records_total{outcome=\"applied\",topic=\"t\"} 900\n\
        idem_records_total{outcome=\"duplicate\",topic=\"t\"} 100\n\
        idem_assigned_partitions 8\n";

    #[test]
    fn quantiles_interpolate_inside_the_bucket() {
        let samples = parse(TEXT);
        let b = buckets(&samples, "idem_batch_seconds");
        assert_eq!(b.len(), 4);
        // Rank 50 of 100 lies half-way through the (0.01, 0.025] bucket.
        let p50 = quantile(&b, 0.5).unwrap();
        assert!((p50 - 0.0175).abs() < 1e-9, "{p50}");
        // Rank 99 is 9/10 into (0.025, 0.05].
        let p99 = quantile(&b, 0.99).unwrap();
        assert!((p99 - 0.0475).abs() < 1e-9, "{p99}");
        // The first bucket starts at 0.
        let p05 = quantile(&b, 0.05).unwrap();
        assert!((p05 - 0.005).abs() < 1e-9, "{p05}");
    }

    #[test]
    fn counters_add_up_by_label() {
        let samples = parse(TEXT);
        assert_eq!(
            sum(&samples, "idem_records_total", "outcome=\"applied\""),
            900.0
        );
        assert_eq!(sum(&samples, "idem_records_total", ""), 1000.0);
        assert_eq!(sum(&samples, "idem_assigned_partitions", ""), 8.0);
    }

    #[test]
    fn an_empty_histogram_has_no_quantile() {
        assert_eq!(quantile(&[(0.1, 0.0), (f64::INFINITY, 0.0)], 0.5), None);
    }
}
