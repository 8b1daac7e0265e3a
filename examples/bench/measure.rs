//! One measured run of the real `idem run` binary.
//!
//! The clock starts when idem reports its partitions assigned (gauge
//! `idem_assigned_partitions` on `/metrics`, polled every 20 ms), which is
//! when it starts to fetch, and stops when the group's committed offsets,
//! read every 100 ms by a client of the same group that never joins it,
//! reach the end offsets of every partition. Start-up (RocksDB open, sink
//! open, the group join) is therefore not counted; the error of either end
//! is at most one polling interval.
//!
//! Then the batch-latency histogram, the outcome counters and the peak
//! resident memory (`VmHWM`) are read while idem still runs; idem is
//! stopped with SIGTERM (it must exit 0) and the dedup directory is
//! measured on disk, as `du` does.

use std::fs::File;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use crate::report::RunResult;
use crate::workload::{self, Shape};
use crate::{scrape, Target};

#[derive(Args)]
pub struct MeasureArgs {
    /// The idem binary (a plain `cargo build --release`).
    #[arg(long)]
    pub idem: PathBuf,
    /// The config idem runs with; its group must be new.
    #[arg(long)]
    pub config: PathBuf,
    #[command(flatten)]
    pub target: Target,
    /// The config's `kafka.group_id`.
    #[arg(long)]
    pub group: String,
    /// The config's `metrics.listen`.
    #[arg(long)]
    pub metrics: String,
    /// The config's `dedup.path`, measured at the end.
    #[arg(long)]
    pub dedup: PathBuf,
    /// Where idem's log goes.
    #[arg(long)]
    pub log: PathBuf,
    #[arg(long)]
    pub label: String,
    /// The results file (one JSON object per line).
    #[arg(long)]
    pub out: PathBuf,
    /// Produce the workload below at this many records per second while
    /// idem runs, instead of measuring a topic that is already full.
    #[arg(long)]
    pub rate: Option<f64>,
    /// With `--rate`: the batch latencies and step times are taken over
    /// the batches after this many seconds of paced input (connections,
    /// caches and the first batches' backlog settle meanwhile); the whole
    /// run's p99 is kept beside them.
    #[arg(long, default_value_t = 3.0)]
    pub warmup_secs: f64,
    #[command(flatten)]
    pub workload: Shape,
    #[arg(long, default_value_t = 1800)]
    pub timeout_secs: u64,
}

/// Each partition of `topic`: (partition, low watermark, high watermark).
///
/// # Errors
/// The topic is unknown or the broker does not answer.
pub fn end_offsets(consumer: &BaseConsumer, topic: &str) -> anyhow::Result<Vec<(i32, i64, i64)>> {
    let timeout = Duration::from_secs(10);
    let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    anyhow::ensure!(!partitions.is_empty(), "topic {topic} has no partitions");
    partitions
        .into_iter()
        .map(|p| {
            let (low, high) = consumer.fetch_watermarks(topic, p, timeout)?;
            Ok((p, low, high))
        })
        .collect()
}

/// Runs idem until its group has committed every partition's end.
///
/// # Errors
/// idem exits early, does not finish within the timeout, or does not stop
/// cleanly on SIGTERM.
pub fn run(args: &MeasureArgs) -> anyhow::Result<RunResult> {
    let lookup: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &args.target.bootstrap)
        .set("group.id", &args.group)
        .set("enable.auto.commit", "false")
        .create()
        .context("creating the offsets client")?;
    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);

    let mut idem = Idem::spawn(args)?;
    let started = idem.wait_for_assignment(&args.metrics, deadline)?;

    // With --rate: the metrics as they stood at the end of the warm-up.
    let mut warmed_up: Option<Vec<scrape::Sample>> = None;
    let produced = match args.rate {
        Some(rate) => {
            let (target, shape) = (args.target.clone(), args.workload.clone());
            let pacing = Instant::now();
            let producer =
                std::thread::spawn(move || workload::produce(&target, &shape, Some(rate)));
            let produced = loop {
                if producer.is_finished() {
                    break producer.join().expect("producer thread")?;
                }
                idem.check_alive()?;
                if warmed_up.is_none() && pacing.elapsed().as_secs_f64() >= args.warmup_secs {
                    warmed_up = Some(scrape::fetch(&args.metrics)?);
                }
                std::thread::sleep(Duration::from_millis(100));
            };
            anyhow::ensure!(
                warmed_up.is_some(),
                "{}: the paced input ended within the {} s warm-up",
                args.label,
                args.warmup_secs
            );
            Some(produced)
        }
        None => None,
    };
    let ends = end_offsets(&lookup, &args.target.topic)?;
    let records: i64 = ends.iter().map(|(_, low, high)| high - low).sum();

    let mut tpl = TopicPartitionList::new();
    for (p, _, _) in &ends {
        tpl.add_partition(&args.target.topic, *p);
    }
    let secs = loop {
        // A broker busy with the run can be slow to answer; that is no
        // reason to give the run up before its deadline.
        let done = match lookup.committed_offsets(tpl.clone(), Duration::from_secs(10)) {
            Ok(committed) => ends.iter().all(|(p, _, high)| {
                matches!(
                    committed.find_partition(&args.target.topic, *p).map(|e| e.offset()),
                    Some(Offset::Offset(o)) if o >= *high
                )
            }),
            Err(e) => {
                eprintln!(
                    "{}: reading the group's offsets: {e}; trying again",
                    args.label
                );
                false
            }
        };
        if done {
            break started.elapsed().as_secs_f64();
        }
        idem.check_alive()?;
        anyhow::ensure!(
            Instant::now() < deadline,
            "{}: the group did not reach the end offsets in time",
            args.label
        );
        std::thread::sleep(Duration::from_millis(100));
    };

    // The metrics of the last batch are updated just after its commit.
    let samples = wait_for_count(&args.metrics, records as f64)?;
    // Latencies and step times: after the warm-up, if there was one.
    let timed = match &warmed_up {
        Some(earlier) => scrape::since(&samples, earlier),
        None => samples.clone(),
    };
    let histogram = scrape::buckets(&timed, "idem_batch_seconds");
    let batches = histogram.last().map_or(0.0, |b| b.1);
    let mut result = RunResult {
        label: args.label.clone(),
        records: records as u64,
        secs,
        p50_ms: scrape::quantile(&histogram, 0.5).map(|s| s * 1e3),
        p99_ms: scrape::quantile(&histogram, 0.99).map(|s| s * 1e3),
        batches: Some(batches as u64),
        peak_rss_kib: idem.peak_rss_kib(),
        ..RunResult::default()
    };
    if warmed_up.is_some() {
        result.warmup_secs = Some(args.warmup_secs);
        let whole = scrape::buckets(&samples, "idem_batch_seconds");
        result.p99_whole_ms = scrape::quantile(&whole, 0.99).map(|s| s * 1e3);
    }
    for outcome in [
        "applied",
        "duplicate",
        "conflict",
        "stale",
        "dead_lettered",
        "filtered",
    ] {
        let n = scrape::sum(
            &samples,
            "idem_records_total",
            &format!("outcome=\"{outcome}\""),
        );
        if n > 0.0 {
            result.outcomes.insert(outcome.to_string(), n as u64);
        }
    }
    let batch_count = scrape::sum(&timed, "idem_batch_seconds_count", "");
    if batch_count > 0.0 {
        let total = scrape::sum(&timed, "idem_batch_seconds_sum", "");
        result
            .mean_ms
            .insert("batch".to_string(), 1e3 * total / batch_count);
        // Each step's total over every batch, per committed batch: what the
        // step adds to a batch on average, retries included.
        for step in crate::report::STEPS {
            let label = format!("step=\"{step}\"");
            let total = scrape::sum(&timed, "idem_batch_step_seconds_sum", &label);
            if total > 0.0 {
                result
                    .mean_ms
                    .insert(step.to_string(), 1e3 * total / batch_count);
            }
        }
    }
    if let Some(p) = produced {
        result.offered_rate = Some(p.records as f64 / p.elapsed.as_secs_f64());
    }

    idem.stop()?;
    result.dedup_bytes = Some(disk_usage(&args.dedup)?);
    eprintln!("{}", serde_json::to_string(&result)?);
    Ok(result)
}

/// Scrapes until `idem_records_read_total` reaches `records`, for at most
/// ten seconds.
fn wait_for_count(addr: &str, records: f64) -> anyhow::Result<Vec<scrape::Sample>> {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let samples = scrape::fetch(addr)?;
        let read = scrape::sum(&samples, "idem_records_read_total", "");
        if read >= records || Instant::now() > until {
            if read < records {
                eprintln!("warning: idem counts {read} records read, the topic holds {records}");
            }
            return Ok(samples);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The idem process under measurement.
struct Idem {
    child: Child,
    log: PathBuf,
}

impl Idem {
    fn spawn(args: &MeasureArgs) -> anyhow::Result<Idem> {
        let log = File::create(&args.log)?;
        let child = Command::new(&args.idem)
            .arg("run")
            .arg("--config")
            .arg(&args.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", args.idem.display()))?;
        Ok(Idem {
            child,
            log: args.log.clone(),
        })
    }

    /// Polls `/metrics` until idem owns partitions; returns that moment.
    fn wait_for_assignment(&mut self, addr: &str, deadline: Instant) -> anyhow::Result<Instant> {
        loop {
            self.check_alive()?;
            if let Ok(samples) = scrape::fetch(addr) {
                if scrape::sum(&samples, "idem_assigned_partitions", "") > 0.0 {
                    return Ok(Instant::now());
                }
            }
            anyhow::ensure!(Instant::now() < deadline, "idem was never assigned");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            anyhow::bail!(
                "idem exited early ({status}); its log ends:\n{}",
                tail(&self.log)
            );
        }
        Ok(())
    }

    /// `VmHWM` of /proc/PID/status: the peak resident set so far.
    fn peak_rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    /// SIGTERM, then waits up to 60 s for a clean exit.
    fn stop(mut self) -> anyhow::Result<()> {
        let pid = libc::pid_t::try_from(self.child.id())?;
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait()? {
                anyhow::ensure!(
                    status.success(),
                    "idem stopped with {status}; its log ends:\n{}",
                    tail(&self.log)
                );
                return Ok(());
            }
            if Instant::now() > until {
                self.child.kill()?;
                self.child.wait()?;
                anyhow::bail!("idem did not stop within 60 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The last lines of a log file.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Bytes a directory takes on disk (allocated blocks, as `du` counts).
pub fn disk_usage(dir: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            disk_usage(&entry.path())?
        } else {
            meta.blocks() * 512
        };
    }
    Ok(total)
}
