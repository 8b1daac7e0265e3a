//! `idem inspect`: what the dedup store remembers, read beside a running
//! idem (RocksDB's read-only mode takes no lock).

use std::fmt::Write as _;
use std::time::{Duration, UNIX_EPOCH};

use crate::dedup::{DedupStore, StoreError};
use crate::record::IdemKey;

fn time(ms: i64) -> String {
    match u64::try_from(ms) {
        Ok(ms) => {
            humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
        }
        Err(_) => ms.to_string(),
    }
}

/// The dedup record of one idempotency key, in every partition that has
/// it; `None` when no partition has it.
///
/// # Errors
/// A RocksDB read error.
pub fn key(store: &DedupStore, key: &str) -> Result<Option<String>, StoreError> {
    let found = store.find(&IdemKey(key.to_string()))?;
    let mut out = String::new();
    if found.is_empty() {
        return Ok(None);
    }
    let now = store.now_ms();
    for (p, entry) in found {
        let expires = entry.expires_at_ms(store.window());
        let _ = writeln!(out, "key {key:?}");
        let _ = writeln!(out, "  topic        {}", p.topic);
        let _ = writeln!(out, "  partition    {}", p.partition);
        let _ = writeln!(out, "  first offset {}", entry.offset);
        let _ = writeln!(out, "  first seen   {}", time(entry.first_seen_ms));
        let _ = writeln!(out, "  fingerprint  {}", entry.fingerprint.to_hex());
        let _ = writeln!(
            out,
            "  expires      {}{}",
            time(expires),
            if now >= expires {
                " (expired: a new record with this key counts as new)"
            } else {
                ""
            }
        );
    }
    Ok(Some(out))
}

/// Keys, bytes and oldest entry per partition.
///
/// # Errors
/// A RocksDB read error.
pub fn stats(store: &DedupStore) -> Result<String, StoreError> {
    let rows = store.stats()?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<30} {:>9} {:>10} {:>8} {:>12} {:>12}  oldest entry",
        "topic", "partition", "keys", "expired", "bytes", "next offset"
    );
    for r in &rows {
        let _ = writeln!(
            out,
            "{:<30} {:>9} {:>10} {:>8} {:>12} {:>12}  {}",
            r.topic,
            r.partition,
            r.keys,
            r.expired,
            r.bytes,
            r.next_offset
                .map_or_else(|| "-".to_string(), |o| o.to_string()),
            r.oldest_first_seen_ms.map_or_else(|| "-".to_string(), time),
        );
    }
    let keys: u64 = rows.iter().map(|r| r.keys).sum();
    let bytes: u64 = rows.iter().map(|r| r.bytes).sum();
    let _ = writeln!(
        out,
        "total: {keys} keys, {bytes} bytes (before compression), window {}",
        humantime::format_duration(store.window())
    );
    Ok(out)
}
