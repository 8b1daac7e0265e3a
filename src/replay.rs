//! `idem replay`: moves a stopped group's committed offsets back, so that
//! idem reads part of a topic again.
//!
//! It prints a plan first (partition, committed offset, new offset, records
//! to re-read) and changes nothing with `--dry-run`. It refuses while the
//! group has members (idem would overwrite the offsets on its next commit),
//! and refuses to move an offset forward, which would skip records.
//! Records read again inside the dedup window count as duplicates and change
//! nothing; past it, the sink's version guard or insert key does the same.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};

const TIMEOUT: Duration = Duration::from_secs(15);

/// Where to move the offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Offset(i64),
    /// The first record at or after this time (ms since the epoch).
    Timestamp(i64),
    Earliest,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("cannot settle the Kafka sink's last transaction first: {0}")]
    Settle(String),
    #[error("topic {0} does not exist")]
    NoSuchTopic(String),
    #[error("topic {topic} has no partition {partition}")]
    NoSuchPartition { topic: String, partition: i32 },
    #[error(
        "group {group} has {} active member(s): {}; stop every idem instance of the group first",
        members.len(),
        members.join(", ")
    )]
    GroupActive { group: String, members: Vec<String> },
    #[error(
        "partition {partition}: the new offset {new} is ahead of the committed offset {committed}, \
         which would skip {} records; idem replay only moves offsets back",
        new - committed
    )]
    WouldSkip {
        partition: i32,
        committed: i64,
        new: i64,
    },
}

/// With the Kafka sink: settles the dedup store's transaction journal
/// against the offsets before they move, since afterwards a committed
/// transaction would look aborted.
///
/// # Errors
/// The store or the broker failed.
pub fn settle_journal(config: &crate::config::Config) -> Result<(), ReplayError> {
    if !config.dedup.path.join("CURRENT").exists() {
        return Ok(());
    }
    let store = crate::dedup::DedupStore::open(
        &config.dedup.path,
        config.dedup.window,
        std::sync::Arc::new(crate::clock::SystemClock),
    )
    .map_err(|e| ReplayError::Settle(e.to_string()))?;
    crate::pipeline::consumer::settle_journal(config, &store, TIMEOUT)
        .map_err(|e| ReplayError::Settle(e.to_string()))
}

/// One partition of the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanRow {
    pub partition: i32,
    /// None when the group has no committed offset for the partition.
    pub committed: Option<i64>,
    pub new: i64,
    pub low: i64,
    pub high: i64,
}

impl PlanRow {
    /// Records between the new offset and where the group would go on from.
    pub fn to_reread(&self) -> i64 {
        self.committed
            .unwrap_or(self.high)
            .max(self.low)
            .saturating_sub(self.new)
            .max(0)
    }
}

/// Connects as the group, without joining it.
pub fn group_client(
    bootstrap: &str,
    properties: &std::collections::BTreeMap<String, String>,
    group: &str,
) -> Result<BaseConsumer, KafkaError> {
    let mut client = ClientConfig::new();
    // This client never joins the group, so the poll interval (which
    // librdkafka checks against the session timeout) does not apply.
    for (k, v) in properties
        .iter()
        .filter(|(k, _)| *k != "max.poll.interval.ms")
    {
        client.set(k, v);
    }
    client
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
}

/// Builds the plan for one topic (one partition, or all).
///
/// # Errors
/// A missing topic or partition, or a broker error.
pub fn plan(
    consumer: &BaseConsumer,
    topic: &str,
    partition: Option<i32>,
    target: Target,
) -> Result<Vec<PlanRow>, ReplayError> {
    let metadata = consumer.fetch_metadata(Some(topic), TIMEOUT)?;
    let meta = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none())
        .ok_or_else(|| ReplayError::NoSuchTopic(topic.to_string()))?;
    let mut partitions: Vec<i32> = meta.partitions().iter().map(|p| p.id()).collect();
    partitions.sort_unstable();
    if let Some(p) = partition {
        if !partitions.contains(&p) {
            return Err(ReplayError::NoSuchPartition {
                topic: topic.to_string(),
                partition: p,
            });
        }
        partitions = vec![p];
    }

    let mut tpl = TopicPartitionList::new();
    for p in &partitions {
        tpl.add_partition(topic, *p);
    }
    let committed = consumer.committed_offsets(tpl, TIMEOUT)?;
    let by_time = match target {
        Target::Timestamp(ms) => {
            let mut tpl = TopicPartitionList::new();
            for p in &partitions {
                tpl.add_partition_offset(topic, *p, Offset::Offset(ms))?;
            }
            Some(consumer.offsets_for_times(tpl, TIMEOUT)?)
        }
        _ => None,
    };

    let mut rows = Vec::with_capacity(partitions.len());
    for p in partitions {
        let (low, high) = consumer.fetch_watermarks(topic, p, TIMEOUT)?;
        let committed = match committed.find_partition(topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => Some(o),
            _ => None,
        };
        let new = match target {
            Target::Earliest => low,
            Target::Offset(o) => o.clamp(low, high),
            Target::Timestamp(_) => {
                let found = by_time
                    .as_ref()
                    .and_then(|t| t.find_partition(topic, p))
                    .map(|e| e.offset());
                match found {
                    Some(Offset::Offset(o)) => o,
                    // No record at or after that time: the end.
                    _ => high,
                }
            }
        };
        rows.push(PlanRow {
            partition: p,
            committed,
            new,
            low,
            high,
        });
    }
    Ok(rows)
}

/// Refuses when the group has members, naming them.
///
/// # Errors
/// [`ReplayError::GroupActive`], or a broker error.
pub fn check_group_inactive(consumer: &BaseConsumer, group: &str) -> Result<(), ReplayError> {
    let list = consumer.fetch_group_list(Some(group), TIMEOUT)?;
    let members: Vec<String> = list
        .groups()
        .iter()
        .filter(|g| g.name() == group)
        .flat_map(|g| g.members())
        .map(|m| format!("{} ({} at {})", m.id(), m.client_id(), m.client_host()))
        .collect();
    if members.is_empty() {
        Ok(())
    } else {
        Err(ReplayError::GroupActive {
            group: group.to_string(),
            members,
        })
    }
}

/// Refuses a plan that moves any offset forward.
///
/// # Errors
/// [`ReplayError::WouldSkip`] for the first such partition.
pub fn check_no_skip(rows: &[PlanRow]) -> Result<(), ReplayError> {
    for row in rows {
        if let Some(committed) = row.committed {
            // Below the oldest retained record, nothing is left to skip.
            if row.new > committed.max(row.low) {
                return Err(ReplayError::WouldSkip {
                    partition: row.partition,
                    committed,
                    new: row.new,
                });
            }
        }
    }
    Ok(())
}

/// Commits the plan's offsets for the group.
///
/// # Errors
/// A broker error; then some partitions may have moved and others not.
pub fn apply(consumer: &BaseConsumer, topic: &str, rows: &[PlanRow]) -> Result<(), ReplayError> {
    let mut tpl = TopicPartitionList::new();
    for row in rows {
        tpl.add_partition_offset(topic, row.partition, Offset::Offset(row.new))?;
    }
    consumer.commit(&tpl, CommitMode::Sync)?;
    Ok(())
}

/// The plan as a table.
pub fn render(group: &str, topic: &str, rows: &[PlanRow]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "group {group}, topic {topic}");
    let _ = writeln!(
        out,
        "{:>9}  {:>12}  {:>12}  {:>16}",
        "partition", "committed", "new offset", "records to read"
    );
    for row in rows {
        let committed = row
            .committed
            .map_or_else(|| "none".to_string(), |c| c.to_string());
        let _ = writeln!(
            out,
            "{:>9}  {:>12}  {:>12}  {:>16}",
            row.partition,
            committed,
            row.new,
            row.to_reread()
        );
    }
    let total: i64 = rows.iter().map(PlanRow::to_reread).sum();
    let _ = writeln!(out, "total records to read again: {total}");
    if rows.iter().all(|r| r.committed.is_none()) {
        let _ = writeln!(
            out,
            "note: group {group} has no committed offset on {topic}; check the group name \
             (this replay would create the group's offsets)"
        );
    }
    out
}

/// Parses an RFC 3339 time with a zone (`Z` or `+hh:mm`) to milliseconds
/// since the epoch. A time without a zone is refused rather than guessed.
///
/// # Errors
/// What is wrong with the text.
pub fn parse_datetime_ms(text: &str) -> Result<i64, String> {
    let t = text.trim();
    let (base, offset_secs) =
        if let Some(base) = t.strip_suffix('Z').or_else(|| t.strip_suffix('z')) {
            (base.to_string(), 0i64)
        } else {
            let split = t.len().checked_sub(6).filter(|&i| t.is_char_boundary(i));
            let zone = split.map(|i| &t[i..]);
            match zone {
                Some(z) if (z.starts_with('+') || z.starts_with('-')) && &z[3..4] == ":" => {
                    let hours: i64 = z[1..3].parse().map_err(|_| "bad zone hours".to_string())?;
                    let minutes: i64 = z[4..6]
                        .parse()
                        .map_err(|_| "bad zone minutes".to_string())?;
                    let sign = if z.starts_with('-') { -1 } else { 1 };
                    (
                        t[..t.len() - 6].to_string(),
                        sign * (hours * 3600 + minutes * 60),
                    )
                }
                _ => return Err("add a zone: Z or an offset like +01:00".to_string()),
            }
        };
    let at = humantime::parse_rfc3339_weak(&base).map_err(|e| e.to_string())?;
    let ms = at
        .duration_since(UNIX_EPOCH)
        .map_err(|_| "before 1970".to_string())?
        .as_millis() as i64;
    Ok(ms - offset_secs * 1000)
}

/// Milliseconds since the epoch of `now - ago`.
pub fn ago_ms(ago: Duration) -> i64 {
    let at = SystemTime::now()
        .checked_sub(ago)
        .unwrap_or(UNIX_EPOCH)
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    i64::try_from(at.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(committed: Option<i64>, new: i64) -> PlanRow {
        PlanRow {
            partition: 0,
            committed,
            new,
            low: 0,
            high: 100,
        }
    }

    #[test]
    fn datetimes_need_a_zone() {
        let utc = parse_datetime_ms("2026-12-04T10:00:00Z").unwrap();
        assert_eq!(parse_datetime_ms("2026-12-04T11:00:00+01:00").unwrap(), utc);
        assert_eq!(parse_datetime_ms("2026-12-04T08:30:00-01:30").unwrap(), utc);
        assert!(parse_datetime_ms("2026-12-04T10:00:00").is_err());
        assert!(parse_datetime_ms("yesterday").is_err());
    }

    #[test]
    fn records_to_read_count_from_the_committed_offset() {
        assert_eq!(row(Some(80), 30).to_reread(), 50);
        assert_eq!(row(None, 30).to_reread(), 70);
    }

    #[test]
    fn moving_up_to_the_oldest_record_skips_nothing() {
        // Retention removed records below 200; the group is at 162.
        let row = PlanRow {
            partition: 0,
            committed: Some(162),
            new: 200,
            low: 200,
            high: 300,
        };
        assert!(check_no_skip(&[row]).is_ok());
    }

    #[test]
    fn moving_forward_is_refused() {
        assert!(check_no_skip(&[row(Some(10), 5)]).is_ok());
        assert!(check_no_skip(&[row(None, 50)]).is_ok());
        let err = check_no_skip(&[row(Some(10), 20)]).unwrap_err().to_string();
        assert!(err.contains("skip 10 records"), "{err}");
    }
}
