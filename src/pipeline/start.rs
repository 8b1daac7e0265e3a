//! Where a newly assigned partition starts reading.
//!
//! idem never skips records silently. In order:
//! 1. the group's committed offset, when it lies within the partition
//!    (between the low and high watermarks);
//! 2. otherwise idem's own progress from the dedup store (the next offset
//!    after its last batch, recorded once that batch's dedup records were
//!    synced and acknowledged by the changelog), when within the
//!    partition: this covers deleted or expired group offsets;
//! 3. otherwise `kafka.offset_reset`: `earliest`, `latest`, or `fail`
//!    (stop with an error and let an operator decide).
//!
//! Cases 2 and 3 are logged at warn, naming both offsets and the choice.

use crate::config::OffsetReset;

/// The start chosen for one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// The group's committed offset; nothing to change.
    Committed,
    /// idem's stored progress, because the committed offset is missing or
    /// out of range.
    Stored(i64),
    /// Neither is usable: the configured policy.
    Earliest,
    Latest,
    /// Policy `fail`: refuse to guess.
    Refuse,
}

/// Chooses where a partition starts.
///
/// `committed` and `stored` are `None` when absent; `low` and `high` are the
/// partition's watermarks (`high` is the next offset to be written).
pub fn choose(
    committed: Option<i64>,
    stored: Option<i64>,
    low: i64,
    high: i64,
    policy: OffsetReset,
) -> Start {
    let within = |o: i64| o >= low && o <= high;
    match (committed, stored) {
        (Some(c), _) if within(c) => Start::Committed,
        (_, Some(s)) if within(s) => Start::Stored(s),
        _ => match policy {
            OffsetReset::Earliest => Start::Earliest,
            OffsetReset::Latest => Start::Latest,
            OffsetReset::Fail => Start::Refuse,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_wins_when_within_the_partition() {
        assert_eq!(
            choose(Some(5), Some(9), 0, 10, OffsetReset::Latest),
            Start::Committed
        );
        // Behind our own progress (a crash before the commit, or an
        // operator's rewind): the committed offset still wins.
        assert_eq!(
            choose(Some(2), Some(9), 0, 10, OffsetReset::Latest),
            Start::Committed
        );
    }

    #[test]
    fn missing_or_out_of_range_commit_falls_back_to_progress() {
        assert_eq!(
            choose(None, Some(7), 0, 10, OffsetReset::Latest),
            Start::Stored(7)
        );
        assert_eq!(
            choose(Some(3), Some(7), 5, 10, OffsetReset::Latest),
            Start::Stored(7)
        );
        assert_eq!(
            choose(Some(30), Some(7), 0, 10, OffsetReset::Earliest),
            Start::Stored(7)
        );
    }

    #[test]
    fn nothing_usable_follows_the_policy() {
        assert_eq!(
            choose(None, None, 0, 10, OffsetReset::Earliest),
            Start::Earliest
        );
        assert_eq!(
            choose(None, Some(3), 5, 10, OffsetReset::Latest),
            Start::Latest
        );
        assert_eq!(
            choose(Some(-1), None, 0, 0, OffsetReset::Fail),
            Start::Refuse
        );
    }
}
