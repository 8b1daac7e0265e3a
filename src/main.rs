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

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config } => run(&config),
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

fn run(path: &std::path::Path) -> ExitCode {
    let config = match load(path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    logging::init(&config.log);
    match run_service(config) {
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

fn run_service(config: Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let addr = config.metrics.listen.parse().expect("validated at load");
    let pipeline = Pipeline::new(config);
    let metrics = pipeline.metrics();
    let shutdown = pipeline.shutdown_handle();

    runtime.block_on(async move {
        let (bound, serve) = server::bind(addr, Arc::clone(&metrics))
            .await
            .map_err(|source| BadListenAddress {
                addr: addr.to_string(),
                source,
            })?;
        tracing::info!(%bound, "serving /metrics and /healthz");
        tokio::spawn(async move {
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "metrics server failed");
            }
        });

        let on_signal = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("signal received; finishing the batch in flight");
            on_signal.trigger();
        });

        let end = tokio::task::spawn_blocking(move || pipeline.run())
            .await
            .context("pipeline thread panicked")??;
        match end {
            RunEnd::Stopped => Ok(()),
            RunEnd::Crashed(point) => anyhow::bail!("stopped at crash point {point}"),
        }
    })
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
