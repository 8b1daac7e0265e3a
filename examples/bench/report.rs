//! The results file (one JSON object per run) and the table printed from
//! it, with each run's ratio to the bare consumer and the targets.
//!
//! Labels the table knows: `bare` (the limit), `sqlite`, `postgres`,
//! `kafka`, `sqlite-before` (an earlier build, `--before`),
//! `sqlite-sink-only` (idem's SQLite sink with no Kafka, the
//! ceiling of idem into SQLite), `keys-N` (SQLite with N keys prefilled in the window),
//! `keys-N-noscan` (the same without the periodic dedup scan) and `steady`
//! (SQLite at a paced input rate).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The steps of a batch that idem times, in `idem_batch_step_seconds`.
pub const STEPS: [&str; 6] = [
    "classify",
    "sink",
    "dead_letter",
    "store",
    "changelog",
    "commit",
];

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunResult {
    pub label: String,
    pub records: u64,
    /// From the start of consumption to the group's commit of the end.
    pub secs: f64,
    /// Batch latency quantiles, interpolated inside histogram buckets.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub batches: Option<u64>,
    pub peak_rss_kib: Option<u64>,
    pub dedup_bytes: Option<u64>,
    /// Records by outcome, from `idem_records_total`.
    pub outcomes: BTreeMap<String, u64>,
    /// The paced producer's achieved rate (steady runs).
    pub offered_rate: Option<f64>,
    /// Steady runs: the latencies, batch count and step times are over the
    /// batches after this many seconds of paced input.
    #[serde(default)]
    pub warmup_secs: Option<f64>,
    /// Steady runs: the p99 over every batch, warm-up included.
    #[serde(default)]
    pub p99_whole_ms: Option<f64>,
    /// Mean time per batch (exact: sums over the batch count): `batch`,
    /// and each step of `idem_batch_step_seconds`: `classify`, `sink`,
    /// `dead_letter`, `changelog`, `store`, `commit`.
    #[serde(default)]
    pub mean_ms: BTreeMap<String, f64>,
}

impl RunResult {
    fn rate(&self) -> f64 {
        self.records as f64 / self.secs
    }

    fn title(&self) -> String {
        match self.label.as_str() {
            "bare" => "bare consumer (the limit)".to_string(),
            "sqlite" => "idem -> SQLite".to_string(),
            "sqlite-sink-only" => "SQLite sink alone, no Kafka (its ceiling)".to_string(),
            "sqlite-before" => "idem -> SQLite, the earlier build".to_string(),
            "postgres" => "idem -> PostgreSQL".to_string(),
            "kafka" => "idem -> Kafka topic".to_string(),
            "steady" => format!(
                "idem -> SQLite, paced at {:.0}/s",
                self.offered_rate.unwrap_or(0.0)
            ),
            other => match scale_run(other) {
                Some((keys, false)) => format!("idem -> SQLite, {} keys in window", millions(keys)),
                Some((keys, true)) => format!("  same, {}, dedup scan off", millions(keys)),
                None => other.to_string(),
            },
        }
    }
}

/// `keys-N`: N keys prefilled, idem's defaults; `keys-N-noscan`: the same
/// with `metrics.dedup_scan_secs = 0`.
fn scale_run(label: &str) -> Option<(u64, bool)> {
    let rest = label.strip_prefix("keys-")?;
    match rest.strip_suffix("-noscan") {
        Some(keys) => Some((keys.parse().ok()?, true)),
        None => Some((rest.parse().ok()?, false)),
    }
}

fn millions(n: u64) -> String {
    if n >= 1_000_000 && n.is_multiple_of(1_000_000) {
        format!("{}M", n / 1_000_000)
    } else {
        n.to_string()
    }
}

/// Appends one result to the results file.
///
/// # Errors
/// The file cannot be written.
pub fn append(path: &Path, result: &RunResult) -> anyhow::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    writeln!(file, "{}", serde_json::to_string(result)?)?;
    Ok(())
}

/// Prints the table and the targets.
///
/// # Errors
/// The file cannot be read or holds something other than results.
pub fn print(path: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path)?;
    let runs: Vec<RunResult> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let limit = runs.iter().find(|r| r.label == "bare").map(RunResult::rate);

    let opt =
        |v: Option<f64>, digits: usize| v.map_or("-".to_string(), |v| format!("{v:.digits$}"));
    let w = runs
        .iter()
        .map(|r| r.title().chars().count())
        .max()
        .unwrap_or(0)
        .max(3);
    println!(
        "| {:<w$} | {:>9} | {:>7} | {:>9} | {:>8} | {:>6} | {:>6} | {:>8} | {:>9} | {:>9} | {:>9} |",
        "run",
        "records",
        "seconds",
        "records/s",
        "of limit",
        "p50 ms",
        "p99 ms",
        "peak RSS",
        "dedup dir",
        "applied",
        "duplicate"
    );
    println!(
        "|{:-<dashes$}|{:->11}|{:->9}|{:->11}|{:->10}|{:->8}|{:->8}|{:->10}|{:->11}|{:->11}|{:->11}|",
        "",
        "",
        "",
        "",
        "",
        "",
        "",
        "",
        "",
        "",
        "",
        dashes = w + 2
    );
    for run in &runs {
        let ratio = match (run.label.as_str(), limit) {
            ("steady", _) | (_, None) => "-".to_string(),
            (_, Some(limit)) => percent(run.rate() / limit),
        };
        let count = |o: &str| {
            run.outcomes
                .get(o)
                .map_or("-".to_string(), |n| n.to_string())
        };
        println!(
            "| {:<w$} | {:>9} | {:>7.1} | {:>9.0} | {:>8} | {:>6} | {:>6} | {:>8} | {:>9} | {:>9} | {:>9} |",
            run.title(),
            run.records,
            run.secs,
            run.rate(),
            ratio,
            opt(run.p50_ms, 1),
            opt(run.p99_ms, 1),
            run.peak_rss_kib
                .map_or("-".to_string(), |k| format!("{:.0} MiB", k as f64 / 1024.0)),
            run.dedup_bytes
                .map_or("-".to_string(), |b| format!("{:.0} MiB", b as f64 / 1048576.0)),
            count("applied"),
            count("duplicate"),
        );
    }
    println!();
    println!(
        "Latency: idem_batch_seconds (decode to offset commit, per batch), quantiles \
         interpolated linearly inside its buckets (bounds 5, 10, 25, 50, 100 ms ...)."
    );
    if let Some(warmup) = runs.iter().find_map(|r| r.warmup_secs) {
        println!(
            "The paced run's latencies and step times leave out its first {warmup:.0} s \
             (connections, caches and the first batches' backlog settling)."
        );
    }
    let timed: Vec<&RunResult> = runs
        .iter()
        .filter(|r| STEPS.iter().any(|s| r.mean_ms.contains_key(*s)))
        .collect();
    if !timed.is_empty() {
        println!();
        println!("Mean ms per batch, by step (idem_batch_step_seconds):");
        println!();
        print!("| {:<w$} | {:>8} |", "run", "batch");
        for step in STEPS {
            print!(" {step:>11} |");
        }
        println!();
        print!("|{:-<dashes$}|{:->10}|", "", "", dashes = w + 2);
        for _ in STEPS {
            print!("{:->13}|", "");
        }
        println!();
        for run in timed {
            print!(
                "| {:<w$} | {:>8} |",
                run.title(),
                opt(run.mean_ms.get("batch").copied(), 1)
            );
            for step in STEPS {
                print!(" {:>11} |", opt(run.mean_ms.get(step).copied(), 1));
            }
            println!();
        }
    }
    println!();
    for line in targets(&runs, limit) {
        println!("{line}");
    }
    Ok(())
}

/// A share as a percentage, with one decimal below 10%.
fn percent(share: f64) -> String {
    if share < 0.1 {
        format!("{:.1}%", 100.0 * share)
    } else {
        format!("{:.0}%", 100.0 * share)
    }
}

/// The targets, each with the measured figure and met / not met.
fn targets(runs: &[RunResult], limit: Option<f64>) -> Vec<String> {
    let find = |label: &str| runs.iter().find(|r| r.label == label);
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    let mut out = Vec::new();
    if let (Some(sqlite), Some(limit)) = (find("sqlite"), limit) {
        let share = sqlite.rate() / limit;
        out.push(format!(
            "target: idem -> SQLite >= 50% of the bare consumer: {} ({})",
            percent(share),
            verdict(share >= 0.5)
        ));
        if let Some(ceiling) = find("sqlite-sink-only") {
            out.push(format!(
                "  (the SQLite sink alone, with no Kafka and no dedup, reaches {} of the bare \
                 consumer: the most idem into SQLite could reach on this machine)",
                percent(ceiling.rate() / limit)
            ));
        }
    }
    let mut scaled: Vec<(u64, &RunResult)> = runs
        .iter()
        .filter_map(|r| match scale_run(&r.label)? {
            (keys, false) => Some((keys, r)),
            (_, true) => None,
        })
        .collect();
    scaled.sort_by_key(|(keys, _)| *keys);
    if let (Some((few, small)), Some((many, large))) = (scaled.first(), scaled.last()) {
        if few < many {
            let share = large.rate() / small.rate();
            out.push(format!(
                "target: throughput with {} keys >= 80% of with {}: {:.0}% ({})",
                millions(*many),
                millions(*few),
                100.0 * share,
                verdict(share >= 0.8)
            ));
        }
        let unscanned = runs
            .iter()
            .find(|r| scale_run(&r.label) == Some((*many, true)));
        if let (Some(unscanned), true) = (unscanned, few < many) {
            out.push(format!(
                "  (with metrics.dedup_scan_secs = 0, {} keys give {:.0}% of the rate with {})",
                millions(*many),
                100.0 * unscanned.rate() / small.rate(),
                millions(*few)
            ));
        }
        if let Some(kib) = large.peak_rss_kib {
            let mib = kib as f64 / 1024.0;
            out.push(format!(
                "target: peak RSS with {} keys < 300 MiB: {mib:.0} MiB ({})",
                millions(*many),
                verdict(mib < 300.0)
            ));
        }
    }
    if let Some(steady) = find("steady") {
        if let Some(p99) = steady.p99_ms {
            out.push(format!(
                "target: p99 batch latency at a steady {:.0} records/s < 50 ms: {p99:.1} ms ({})",
                steady.offered_rate.unwrap_or(0.0),
                verdict(p99 < 50.0)
            ));
            if let (Some(warmup), Some(whole)) = (steady.warmup_secs, steady.p99_whole_ms) {
                out.push(format!(
                    "        over the batches after the first {warmup:.0} s of paced input; \
                     over every batch, the first ones included: {whole:.1} ms"
                ));
            }
        }
    }
    out
}
