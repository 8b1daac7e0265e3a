//! idem's benchmark tool, driven by `scripts/bench.sh`.
//!
//! Module map:
//! - [`workload`]: the fixed, deterministic workload (keys, bodies,
//!   duplicates, partitions) and the producer that writes it, in bulk or
//!   at a paced rate.
//! - [`bare`]: the limit: a bare consumer that reads the same records and
//!   does nothing with them.
//! - [`measure`]: runs the real `idem run` binary and watches it until the
//!   group's committed offsets reach the end of the topic.
//! - [`prefill`]: fills a dedup store with synthetic keys, for the runs
//!   with millions of keys already in the window.
//! - [`sink_limit`]: the SQLite sink alone, with no Kafka: the ceiling of
//!   idem into SQLite on this machine.
//! - [`scrape`]: reads idem's Prometheus text and interpolates quantiles.
//! - [`report`]: the table, with the ratio to the limit and the targets.
//!
//! Every subcommand that measures appends one JSON object per line to the
//! results file; `report` reads them back.

mod bare;
mod measure;
mod prefill;
mod report;
mod scrape;
mod sink_limit;
mod workload;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;

/// idem's own allocator, so that the sink-alone run allocates as idem does.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(about = "idem's benchmark tool (see scripts/bench.sh)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Creates topics (NAME:PARTITIONS ...), replication factor 1.
    Topics {
        #[arg(long)]
        bootstrap: String,
        #[arg(required = true)]
        topics: Vec<String>,
    },
    /// Produces the workload into a topic, as fast as the broker takes it.
    Produce {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        workload: workload::Shape,
    },
    /// Reads a whole topic with a bare consumer (the limit).
    Bare {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        label: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Runs `idem run` until its group has committed the end of the topic.
    Measure(Box<measure::MeasureArgs>),
    /// Fills a dedup store with synthetic keys of a topic's partitions.
    Prefill(Box<prefill::PrefillArgs>),
    /// Applies the workload's new records with idem's SQLite sink alone.
    SinkLimit {
        #[command(flatten)]
        workload: workload::Shape,
        /// Where the SQLite file goes.
        #[arg(long)]
        dir: PathBuf,
        /// Records per transaction.
        #[arg(long, default_value_t = 5000)]
        batch: usize,
        #[arg(long)]
        label: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Prints the table of a results file.
    Report { results: PathBuf },
}

/// A broker and a topic.
#[derive(Args, Clone)]
pub struct Target {
    #[arg(long)]
    pub bootstrap: String,
    #[arg(long)]
    pub topic: String,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Topics { bootstrap, topics } => create_topics(&bootstrap, &topics),
        Command::Produce { target, workload } => {
            let produced = workload::produce(&target, &workload, None)?;
            eprintln!(
                "produced {} records ({} duplicates) in {:.1} s: {:.0} records/s",
                produced.records,
                produced.duplicates,
                produced.elapsed.as_secs_f64(),
                produced.records as f64 / produced.elapsed.as_secs_f64()
            );
            Ok(())
        }
        Command::Bare { target, label, out } => {
            let result = bare::run(&target, &label)?;
            report::append(&out, &result)
        }
        Command::Measure(args) => {
            let result = measure::run(&args)?;
            report::append(&args.out, &result)
        }
        Command::Prefill(args) => prefill::run(&args),
        Command::SinkLimit {
            workload,
            dir,
            batch,
            label,
            out,
        } => {
            let result = sink_limit::run(&workload, &dir, batch, &label)?;
            report::append(&out, &result)
        }
        Command::Report { results } => report::print(&results),
    }
}

fn create_topics(bootstrap: &str, topics: &[String]) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()?;
    let mut specs = Vec::new();
    for t in topics {
        let (name, partitions) = t
            .rsplit_once(':')
            .ok_or_else(|| anyhow::anyhow!("{t}: write NAME:PARTITIONS"))?;
        specs.push((name.to_string(), partitions.parse::<i32>()?));
    }
    let new: Vec<NewTopic<'_>> = specs
        .iter()
        .map(|(name, partitions)| NewTopic::new(name, *partitions, TopicReplication::Fixed(1)))
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for result in futures::executor::block_on(admin.create_topics(&new, &options))? {
        result.map_err(|(name, e)| anyhow::anyhow!("cannot create topic {name}: {e}"))?;
    }
    Ok(())
}
