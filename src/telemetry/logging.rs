//! Log set-up: tracing to stderr, human or JSON.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::{check_log_filter, LogConfig, LogFormat};

/// Installs the global subscriber. `RUST_LOG` overrides the configured
/// level, unless it is empty or not a filter that `log.level` would take
/// (either would silence every line, errors included): then it is ignored,
/// with a line on stderr saying why. Calling it twice keeps the first
/// subscriber.
pub fn init(config: &LogConfig) {
    let from_env = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .filter(|v| match check_log_filter(v) {
            Ok(()) => true,
            Err(why) => {
                eprintln!("RUST_LOG is ignored: {why}; logging at log.level instead");
                false
            }
        });
    let filter = EnvFilter::new(from_env.as_deref().unwrap_or(&config.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match config.format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Sends one librdkafka log line to tracing, under the `librdkafka`
/// target, at the matching level.
pub fn route_librdkafka_log(
    level: rdkafka::config::RDKafkaLogLevel,
    facility: &str,
    message: &str,
) {
    use rdkafka::config::RDKafkaLogLevel as L;
    match level {
        L::Emerg | L::Alert | L::Critical | L::Error => {
            tracing::error!(target: "librdkafka", facility, "{message}")
        }
        L::Warning => tracing::warn!(target: "librdkafka", facility, "{message}"),
        L::Notice | L::Info => tracing::info!(target: "librdkafka", facility, "{message}"),
        L::Debug => tracing::debug!(target: "librdkafka", facility, "{message}"),
    }
}

/// The context of idem's helper clients (admin, restore and look-up
/// consumers): librdkafka's log lines into tracing, its errors as
/// warnings, except the end of a partition, which a restore reads up to
/// on purpose.
pub struct LoggedContext;

impl rdkafka::ClientContext for LoggedContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        route_librdkafka_log(level, fac, message);
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        use rdkafka::error::{KafkaError, RDKafkaErrorCode};
        if !matches!(
            error,
            KafkaError::PartitionEOF(_) | KafkaError::Global(RDKafkaErrorCode::PartitionEOF)
        ) {
            tracing::warn!(target: "librdkafka", %error, reason, "client error");
        }
    }
}

impl rdkafka::consumer::ConsumerContext for LoggedContext {}
