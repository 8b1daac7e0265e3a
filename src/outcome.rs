//! The outcomes of invariant I4: every consumed record ends in exactly one.

/// What happened to one consumed record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Its effect is in the sink.
    Applied,
    /// Same key and same body as a record already handled: no new effect.
    Duplicate,
    /// Same key as a handled record but a different body: dead-lettered
    /// with reason `conflict`, the first body stays in force.
    Conflict,
    /// Older than the version the sink holds: no effect.
    Stale,
    /// Can never succeed (bad bytes, no key, too large, refused by the
    /// sink): in the dead-letter topic with its original bytes.
    DeadLettered,
    /// A tombstone (null value): counted, no effect.
    Filtered,
}

impl Outcome {
    pub const ALL: [Outcome; 6] = [
        Outcome::Applied,
        Outcome::Duplicate,
        Outcome::Conflict,
        Outcome::Stale,
        Outcome::DeadLettered,
        Outcome::Filtered,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Duplicate => "duplicate",
            Outcome::Conflict => "conflict",
            Outcome::Stale => "stale",
            Outcome::DeadLettered => "dead_lettered",
            Outcome::Filtered => "filtered",
        }
    }
}
