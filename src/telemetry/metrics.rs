//! The Prometheus metrics, one registry per pipeline so that tests running
//! several pipelines in one process do not mix their numbers.
//!
//! Names follow `idem_<thing>_<unit>`, counters end in `_total`, and labels
//! come from small fixed sets (topic, outcome, reason, cause), never from
//! keys or offsets.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::decode::DeadLetterReason;
use crate::outcome::Outcome;

pub struct Metrics {
    registry: Registry,
    pub records_read: IntCounterVec,
    pub records: IntCounterVec,
    pub dead_letters: IntCounterVec,
    pub dead_letter_failures: IntCounter,
    pub sink_retries: IntCounterVec,
    pub commit_failures: IntCounter,
    pub transactions_aborted: IntCounter,
    pub decoded_ahead: IntCounter,
    pub changelog_failures: IntCounter,
    pub restored: IntCounter,
    pub restore_remaining: IntGaugeVec,
    pub batch_records: Histogram,
    pub batch_seconds: Histogram,
    pub sink_write_seconds: Histogram,
    pub commit_seconds: Histogram,
    pub step_seconds: HistogramVec,
    pub rebalances: IntCounterVec,
    pub assigned_partitions: IntGauge,
    pub dedup_keys: IntGaugeVec,
    pub dedup_bytes: IntGaugeVec,
    pub consumer_lag: IntGaugeVec,
    pub build_info: IntGaugeVec,
}

fn latency_buckets() -> Vec<f64> {
    vec![
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ]
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
                .expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };

        let metrics = Metrics {
            records_read: counter_vec(
                "idem_records_read_total",
                "Records consumed from Kafka.",
                &["topic"],
            ),
            records: counter_vec(
                "idem_records_total",
                "Records by final outcome; the outcomes add up to idem_records_read_total.",
                &["topic", "outcome"],
            ),
            dead_letters: counter_vec(
                "idem_dead_letters_total",
                "Records written to the dead-letter topic, by reason.",
                &["reason"],
            ),
            dead_letter_failures: counter(
                "idem_dead_letter_failures_total",
                "Failed attempts to write to the dead-letter topic; the offset waits.",
            ),
            sink_retries: counter_vec(
                "idem_sink_retries_total",
                "Sink batches retried, by sink and cause: unavailable (healing by \
                 itself) or needs-operator.",
                &["sink", "cause"],
            ),
            commit_failures: counter(
                "idem_offset_commit_failures_total",
                "Offset commits that failed; the records will be re-read as duplicates.",
            ),
            transactions_aborted: counter(
                "idem_sink_transactions_aborted_total",
                "Kafka sink transactions aborted at their commit (timed out, leader \
                 moved, the member unknown to the group); each batch is done again, \
                 nothing is lost or doubled. Aborts before the commit (a delivery \
                 failure, a record refused) count in idem_sink_retries_total or as \
                 dead letters.",
            ),
            decoded_ahead: counter(
                "idem_batches_decoded_ahead_total",
                "Batches decoded ahead of their turn, on a thread of their own, \
                 while the batch before them was written: when records wait \
                 behind the batch in flight.",
            ),
            changelog_failures: counter(
                "idem_dedup_changelog_failures_total",
                "Failed writes to the dedup changelog topic; retried, the offset waits.",
            ),
            restored: counter(
                "idem_dedup_restored_records_total",
                "Changelog records read into the dedup store: on partition assignment, and when a write found records of another writer before or among its own.",
            ),
            restore_remaining: gauge_vec(
                "idem_dedup_restore_remaining_records",
                "Changelog records left to read before a newly assigned partition is processed.",
                &["topic", "partition"],
            ),
            batch_records: histogram(
                "idem_batch_records",
                "Records per processed batch.",
                vec![
                    1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 25000.0,
                ],
            ),
            batch_seconds: histogram(
                "idem_batch_seconds",
                "Time to process one batch, from decode to offset commit.",
                latency_buckets(),
            ),
            sink_write_seconds: histogram(
                "idem_sink_write_seconds",
                "Time for the sink to apply one batch durably.",
                latency_buckets(),
            ),
            commit_seconds: histogram(
                "idem_commit_seconds",
                "Time to commit offsets to Kafka: to send the commit, which is \
                 not waited for (it is before partitions are given up and at \
                 shutdown); with the Kafka sink, the transaction commit, \
                 offsets included.",
                latency_buckets(),
            ),
            step_seconds: {
                let h = HistogramVec::new(
                    HistogramOpts::new(
                        "idem_batch_step_seconds",
                        "Time of each step of a batch: classify (decode and dedup look-up), \
                         sink, dead_letter, changelog, store (the synced dedup write), commit.",
                    )
                    .buckets(latency_buckets()),
                    &["step"],
                )
                .expect("valid metric");
                registry
                    .register(Box::new(h.clone()))
                    .expect("unique metric");
                h
            },
            rebalances: counter_vec(
                "idem_rebalances_total",
                "Consumer group rebalances seen, by kind (assign, revoke).",
                &["kind"],
            ),
            assigned_partitions: gauge(
                "idem_assigned_partitions",
                "Partitions currently assigned to this instance.",
            ),
            dedup_keys: gauge_vec(
                "idem_dedup_keys",
                "Keys in the dedup store per partition, expired keys not yet \
                 compacted away included (a scan every metrics.dedup_scan_secs).",
                &["topic", "partition"],
            ),
            dedup_bytes: gauge_vec(
                "idem_dedup_bytes",
                "Bytes of keys and values in the dedup store per partition, before \
                 compression (a scan every metrics.dedup_scan_secs).",
                &["topic", "partition"],
            ),
            consumer_lag: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "idem_consumer_lag_records",
                        "Records between the committed offset and the end of each \
                         assigned partition (from librdkafka statistics, every 5 s).",
                    ),
                    &["topic", "partition"],
                )
                .expect("valid metric");
                registry
                    .register(Box::new(g.clone()))
                    .expect("unique metric");
                g
            },
            build_info: {
                let g = IntGaugeVec::new(
                    Opts::new("idem_build_info", "Always 1; labels carry the version."),
                    &["version"],
                )
                .expect("valid metric");
                registry
                    .register(Box::new(g.clone()))
                    .expect("unique metric");
                g
            },
            registry,
        };
        metrics
            .build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        for reason in DeadLetterReason::ALL {
            metrics.dead_letters.with_label_values(&[reason.as_str()]);
        }
        for kind in ["assign", "revoke"] {
            metrics.rebalances.with_label_values(&[kind]);
        }
        metrics
    }

    /// Makes every outcome series of a topic exist at zero, so that
    /// dashboards and rate() see them before the first such record.
    pub fn register_topic(&self, topic: &str) {
        self.records_read.with_label_values(&[topic]);
        for outcome in Outcome::ALL {
            self.records.with_label_values(&[topic, outcome.as_str()]);
        }
    }

    /// Makes the retry series of a sink exist at zero.
    pub fn register_sink(&self, sink: &str) {
        for cause in ["unavailable", "needs-operator"] {
            self.sink_retries.with_label_values(&[sink, cause]);
        }
    }

    /// Records read, over all topics.
    pub fn read_total(&self) -> u64 {
        sum(&self.records_read)
    }

    /// Records with this outcome, over all topics.
    pub fn outcome_total(&self, outcome: Outcome) -> u64 {
        use prometheus::core::Collector;
        self.records
            .collect()
            .iter()
            .flat_map(|f| f.get_metric())
            .filter(|m| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == "outcome" && l.value() == outcome.as_str())
            })
            .map(|m| m.get_counter().get_value() as u64)
            .sum()
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding to a Vec cannot fail");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

fn sum(vec: &IntCounterVec) -> u64 {
    use prometheus::core::Collector;
    vec.collect()
        .iter()
        .flat_map(|f| f.get_metric())
        .map(|m| m.get_counter().get_value() as u64)
        .sum()
}
