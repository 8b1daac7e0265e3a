//! The limit: how fast a consumer that does nothing reads the topic on
//! this machine and this broker. A `BaseConsumer` with `read_committed`,
//! assigned every partition from its first record, polled one message at
//! a time as idem polls, and no processing beyond counting.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use crate::report::RunResult;
use crate::Target;

/// Reads `target` from its first record to the end offsets it has now.
///
/// # Errors
/// The broker cannot be reached, a fetch fails, or the end is not reached
/// within ten minutes.
pub fn run(target: &Target, label: &str) -> anyhow::Result<RunResult> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &target.bootstrap)
        .set("group.id", format!("bench-bare-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "false")
        .create()
        .context("creating the bare consumer")?;

    let ends = crate::measure::end_offsets(&consumer, &target.topic)?;
    let total: i64 = ends.iter().map(|(_, low, high)| high - low).sum();
    let mut tpl = TopicPartitionList::new();
    for (partition, low, _) in &ends {
        tpl.add_partition_offset(&target.topic, *partition, Offset::Offset(*low))?;
    }
    consumer.assign(&tpl)?;

    let started = Instant::now();
    let deadline = started + Duration::from_secs(600);
    let (mut records, mut bytes) = (0i64, 0u64);
    while records < total {
        match consumer.poll(Duration::from_secs(1)) {
            Some(Ok(message)) => {
                records += 1;
                bytes += message.payload().map_or(0, <[u8]>::len) as u64;
            }
            Some(Err(e)) => anyhow::bail!("bare consumer: {e}"),
            None => {}
        }
        if Instant::now() > deadline {
            anyhow::bail!("bare consumer read {records} of {total} records in 600 s");
        }
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "bare consumer: {records} records, {:.0} MB in {secs:.2} s",
        bytes as f64 / 1e6
    );
    Ok(RunResult {
        label: label.to_string(),
        records: records as u64,
        secs,
        ..RunResult::default()
    })
}
