//! The `idem` binary: argument parsing, exit codes, signals, and the
//! metrics server. Everything else lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use idem::config::Config;
use idem::pipeline::{Pipeline, RunEnd};
use idem::telemetry::{logging, server};

/// Decoding builds and drops a JSON tree per record; mimalloc's per-thread
/// free lists make that noticeably cheaper than glibc's malloc.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit code for bad configuration or arguments.
const EXIT_CONFIG: u8 = 2;

#[derive(Parser)]
#[command(
    name = "idem",
    version,
    about = "Exactly-once effects from a Kafka topic"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Consume the configured topics until SIGTERM or SIGINT.
    Run {
        #[arg(long, short)]
        config: PathBuf,
        /// Ignore dedup entries from before this start, so that every record
        /// read is applied again: rebuilds a lost or new sink after
        /// `idem replay --to-earliest`. The version guard keeps rows from
        /// going backwards.
        #[arg(long)]
        rebuild: bool,
    },
    /// Move a stopped group's committed offsets back, so that idem reads
    /// records again. Prints the plan; changes nothing with --dry-run.
    Replay(ReplayArgs),
    /// Show what the dedup store remembers.
    Inspect {
        #[arg(long, short)]
        config: PathBuf,
        #[command(subcommand)]
        what: InspectWhat,
    },
    /// Validate a config file and print the effective settings.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run the whole job on an embedded Kafka cluster and a SQLite file,
    /// crash it part-way, restart it, and check the result.
    Demo {
        /// Print the summary as one JSON object.
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("target").required(true).multiple(false)))]
#[command(group(clap::ArgGroup::new("broker").required(true).multiple(true)))]
struct ReplayArgs {
    /// Read the broker address and client properties from this config.
    #[arg(long, short, group = "broker")]
    config: Option<PathBuf>,
    /// The broker address, instead of (or overriding) the config's.
    #[arg(long, group = "broker")]
    bootstrap_servers: Option<String>,
    /// The consumer group; default: the config's kafka.group_id.
    #[arg(long)]
    group: Option<String>,
    #[arg(long)]
    topic: String,
    /// Only this partition; default all.
    #[arg(long)]
    partition: Option<i32>,
    /// Move to this offset (clamped to what the partition holds).
    #[arg(long, group = "target", value_parser = clap::value_parser!(i64).range(0..))]
    to_offset: Option<i64>,
    /// Move to the first record at or after this time (RFC 3339 with a zone,
    /// e.g. 2026-12-04T10:00:00Z or 2026-12-04T11:00:00+01:00).
    #[arg(long, group = "target")]
    to_datetime: Option<String>,
    /// Move to the first record at or after this long ago (e.g. 90m, 2h).
    #[arg(long, group = "target")]
    by_duration: Option<String>,
    /// Move to the oldest record the partition holds.
    #[arg(long, group = "target")]
    to_earliest: bool,
    /// Print the plan and change nothing.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Subcommand)]
enum InspectWhat {
    /// The dedup record of one idempotency key.
    Key { key: String },
    /// Keys, bytes and the oldest entry per partition.
    Stats,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config, rebuild } => run(&config, rebuild),
        Command::Replay(args) => replay(&args),
        Command::Inspect { config, what } => inspect(&config, &what),
        Command::CheckConfig { config } => check_config(&config),
        Command::Demo { json } => demo(json),
    }
}

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("idem: {e}");
        ExitCode::from(EXIT_CONFIG)
    })
}

fn check_config(path: &std::path::Path) -> ExitCode {
    match load(path) {
        Ok(config) => {
            println!("{}", idem::config::describe(&config));
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

fn run(path: &std::path::Path, rebuild: bool) -> ExitCode {
    let config = match load(path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    logging::init(&config.log);
    match run_service(config, rebuild) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "idem stopped on an error");
            eprintln!("idem: {e:#}");
            if e.downcast_ref::<BadListenAddress>().is_some() {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("config field `metrics.listen`: cannot listen on {addr}: {source}")]
struct BadListenAddress {
    addr: String,
    source: std::io::Error,
}

fn run_service(config: Config, rebuild: bool) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let addr = config.metrics.listen.parse().expect("validated at load");
    let pipeline = Pipeline::new(config).with_rebuild(rebuild);
    let metrics = pipeline.metrics();
    let readiness = pipeline.readiness();
    let shutdown = pipeline.shutdown_handle();

    // The runtime serves HTTP and waits for signals on its own thread; the
    // pipeline, which blocks by nature (RocksDB, SQLite), runs here.
    let (bound, serve) = runtime
        .block_on(server::bind(addr, Arc::clone(&metrics), readiness))
        .map_err(|source| BadListenAddress {
            addr: addr.to_string(),
            source,
        })?;
    tracing::info!(%bound, "serving /metrics, /healthz and /readyz");
    runtime.spawn(async move {
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "metrics server failed");
        }
    });
    let on_signal = shutdown.clone();
    runtime.spawn(async move {
        wait_for_signal().await;
        tracing::info!("signal received; finishing the batch in flight");
        on_signal.trigger();
    });

    let end = pipeline.run()?;
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match end {
        RunEnd::Stopped => Ok(()),
        RunEnd::Crashed(point) => anyhow::bail!("stopped at crash point {point}"),
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn demo(json: bool) -> ExitCode {
    match idem::demo::run(json) {
        Ok(summary) if summary.is_consistent() => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("idem demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn replay(args: &ReplayArgs) -> ExitCode {
    use idem::replay::{self, Target};

    let (mut bootstrap, mut properties, mut group) = (None, Default::default(), None);
    let mut transactional = None;
    if let Some(path) = &args.config {
        match load(path) {
            Ok(config) => {
                bootstrap = Some(config.kafka.bootstrap_servers.clone());
                properties = config.kafka.properties.clone();
                group = Some(config.kafka.group_id.clone());
                if config.sink.is_transactional() {
                    transactional = Some(config);
                }
            }
            Err(code) => return code,
        }
    }
    let Some(group) = args.group.clone().or(group) else {
        eprintln!("idem replay: give --group, or --config with kafka.group_id");
        return ExitCode::from(EXIT_CONFIG);
    };
    let Some(bootstrap) = args.bootstrap_servers.clone().or(bootstrap) else {
        eprintln!("idem replay: give --config or --bootstrap-servers");
        return ExitCode::from(EXIT_CONFIG);
    };
    let target = if let Some(o) = args.to_offset {
        Target::Offset(o)
    } else if let Some(t) = &args.to_datetime {
        match replay::parse_datetime_ms(t) {
            Ok(ms) => Target::Timestamp(ms),
            Err(e) => {
                eprintln!(
                    "idem replay: --to-datetime {t:?}: {e}; use e.g. 2026-12-04T10:00:00Z \
                     or 2026-12-04T11:00:00+01:00"
                );
                return ExitCode::from(EXIT_CONFIG);
            }
        }
    } else if let Some(d) = &args.by_duration {
        match humantime::parse_duration(d) {
            Ok(d) => Target::Timestamp(replay::ago_ms(d)),
            Err(e) => {
                eprintln!("idem replay: --by-duration {d:?}: {e}; use e.g. 90m or 2h");
                return ExitCode::from(EXIT_CONFIG);
            }
        }
    } else {
        Target::Earliest
    };

    let result = (|| -> Result<(), replay::ReplayError> {
        let client = replay::group_client(&bootstrap, &properties, &group)?;
        let rows = replay::plan(&client, &args.topic, args.partition, target)?;
        print!("{}", replay::render(&group, &args.topic, &rows));
        replay::check_no_skip(&rows)?;
        replay::check_group_inactive(&client, &group)?;
        if args.dry_run {
            println!("dry run: nothing changed");
        } else {
            if let Some(config) = &transactional {
                // The last transaction is judged by the offsets about to
                // move: settle it first.
                replay::settle_journal(config)?;
            }
            replay::apply(&client, &args.topic, &rows)?;
            println!("offsets moved; start idem to read the records again");
        }
        Ok(())
    })();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("idem replay: {e}");
            ExitCode::FAILURE
        }
    }
}

fn inspect(path: &std::path::Path, what: &InspectWhat) -> ExitCode {
    let config = match load(path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    if !config.dedup.path.join("CURRENT").exists() {
        eprintln!(
            "idem inspect: no dedup store at {} (dedup.path); has idem run with this config?",
            config.dedup.path.display()
        );
        return ExitCode::FAILURE;
    }
    let store = match idem::dedup::DedupStore::open_read_only(
        &config.dedup.path,
        config.dedup.window,
        Arc::new(idem::clock::SystemClock),
    ) {
        Ok(store) => store,
        Err(e) => {
            eprintln!("idem inspect: {e}");
            return ExitCode::FAILURE;
        }
    };
    let shown = match what {
        InspectWhat::Key { key } => match idem::inspect::key(&store, key) {
            Ok(None) => {
                eprintln!("idem inspect: key {key:?} is not in the dedup store");
                return ExitCode::FAILURE;
            }
            other => other.map(Option::unwrap_or_default),
        },
        InspectWhat::Stats => idem::inspect::stats(&store),
    };
    match shown {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("idem inspect: {e}");
            ExitCode::FAILURE
        }
    }
}
