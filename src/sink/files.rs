//! The files sink: one JSON file per entity (upsert) or per idempotency key
//! (insert) in a directory.
//!
//! Why it is idempotent: a file's content is the record's canonical JSON
//! (keys sorted, no whitespace) and a newline, so the same event always
//! gives the same bytes. A write whose bytes equal the file's is a no-op.
//! In upsert mode the version guard reads the version from the file there:
//! an older record changes nothing (stale), the same version is kept as it
//! is (the first body of a version stays, as in the SQL sinks), and only a
//! newer one replaces the file, after the previous content was copied to
//! `<name>.bak` beside it. In insert mode an existing file is never
//! touched.
//!
//! Why it is durable: every file is written to a temporary file in the same
//! directory, synced, and renamed over the target; the directory is synced
//! once per batch, before the batch is reported done. A crash at any point
//! leaves either the old or the new content, never a mix, and the replay
//! writes the same bytes again.

use std::fs::{self, File};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{Sink, SinkError, SinkWrite, WriteOutcome};
use crate::config::{FilesSinkConfig, SinkMode};
use crate::decode::write_canonical;
use crate::failpoint;
use crate::fault;

pub struct FilesSink {
    dir: PathBuf,
    mode: SinkMode,
    key_pointer: Option<String>,
    version_pointer: Option<String>,
}

fn io_error(what: &str, path: &Path, e: &std::io::Error) -> SinkError {
    fault::io(e).sink_error(format!("{what} {}: {e}", path.display()))
}

/// A file name for a key: letters, digits, `-`, `_` and `.` stay, every
/// other byte becomes `%XX`; names that would be too long, or that start
/// with a dot, become a hash.
fn file_name(key: &str) -> String {
    let mut name = String::with_capacity(key.len() + 5);
    for b in key.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => name.push(b as char),
            _ => name.push_str(&format!("%{b:02X}")),
        }
    }
    if name.is_empty() || name.starts_with('.') || name.len() > 200 {
        name = format!("h-{:032x}", xxhash_rust::xxh3::xxh3_128(key.as_bytes()));
    } else if name.starts_with("h-") {
        // Hashed names start with "h-": a key that does too is escaped, so
        // the two can never meet.
        name.replace_range(..1, "%68");
    }
    name.push_str(".json");
    name
}

impl FilesSink {
    /// Creates the directory when missing.
    ///
    /// # Errors
    /// [`SinkError::NeedsOperator`] when the directory cannot be created.
    pub fn open(config: &FilesSinkConfig) -> Result<FilesSink, SinkError> {
        fs::create_dir_all(&config.dir).map_err(|e| io_error("creating", &config.dir, &e))?;
        // A crash while a file was being written leaves its temporary file;
        // the target still holds the old content, and the replay writes the
        // new one again.
        let entries =
            fs::read_dir(&config.dir).map_err(|e| io_error("reading", &config.dir, &e))?;
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') && name.contains(".tmp-") {
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(FilesSink {
            dir: config.dir.clone(),
            mode: config.mode,
            key_pointer: config.key_from.clone(),
            version_pointer: config.version_from.clone(),
        })
    }

    fn key(&self, write: &SinkWrite<'_>) -> Result<String, String> {
        match (&self.mode, &self.key_pointer) {
            (SinkMode::Upsert, Some(p)) => match write.body.pointer(p) {
                Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
                Some(v @ (Value::Number(_) | Value::Bool(_))) => Ok(v.to_string()),
                _ => Err(format!("payload has no scalar entity key at {p}")),
            },
            _ => Ok(write.key.0.clone()),
        }
    }

    fn version(&self, body: &Value) -> Option<i64> {
        self.version_pointer
            .as_deref()
            .and_then(|p| body.pointer(p))
            .and_then(Value::as_i64)
    }

    /// Writes `bytes` to `path` through a synced temporary file.
    fn replace(&self, path: &Path, bytes: &[u8]) -> Result<(), SinkError> {
        let tmp = self.dir.join(format!(
            ".{}.tmp-{}",
            path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
            std::process::id()
        ));
        let mut file = File::create(&tmp).map_err(|e| io_error("creating", &tmp, &e))?;
        file.write_all(bytes)
            .and_then(|()| file.sync_all())
            .map_err(|e| io_error("writing", &tmp, &e))?;
        fs::rename(&tmp, path).map_err(|e| io_error("renaming to", path, &e))
    }

    fn apply_one(&self, write: &SinkWrite<'_>) -> Result<WriteOutcome, SinkError> {
        let key = match self.key(write) {
            Ok(key) => key,
            Err(why) => return Ok(WriteOutcome::Rejected(why)),
        };
        let version = if self.mode == SinkMode::Upsert {
            match self.version(write.body) {
                Some(v) => Some(v),
                None => {
                    let p = self.version_pointer.as_deref().unwrap_or("?");
                    return Ok(WriteOutcome::Rejected(format!(
                        "version at {p} is missing or not an integer"
                    )));
                }
            }
        } else {
            None
        };
        let mut content = Vec::with_capacity(write.raw.len() + 1);
        write_canonical(write.body, &mut content);
        content.push(b'\n');

        let path = self.dir.join(file_name(&key));
        let existing = match fs::read(&path) {
            Ok(bytes) => Some(bytes),
            Err(e) if e.kind() == ErrorKind::NotFound => None,
            Err(e) => return Err(io_error("reading", &path, &e)),
        };
        if let Some(old) = existing {
            if old == content {
                return Ok(WriteOutcome::AlreadyPresent);
            }
            if self.mode == SinkMode::Insert {
                return Ok(WriteOutcome::AlreadyPresent);
            }
            let held = serde_json::from_slice::<Value>(&old)
                .ok()
                .and_then(|v| self.version(&v));
            match (held, version) {
                (Some(h), Some(v)) if v < h => return Ok(WriteOutcome::Stale),
                (Some(h), Some(v)) if v == h => return Ok(WriteOutcome::AlreadyPresent),
                _ => {}
            }
            let mut backup = path.clone().into_os_string();
            backup.push(".bak");
            self.replace(Path::new(&backup), &old)?;
        }
        self.replace(&path, &content)?;
        Ok(WriteOutcome::Applied)
    }
}

impl Sink for FilesSink {
    fn name(&self) -> &'static str {
        "files"
    }

    fn apply(&mut self, batch: &[SinkWrite<'_>]) -> Result<Vec<WriteOutcome>, SinkError> {
        let mut outcomes = Vec::with_capacity(batch.len());
        for (i, write) in batch.iter().enumerate() {
            if i == batch.len() / 2 {
                failpoint::hit("mid-sink-batch");
            }
            outcomes.push(self.apply_one(write)?);
        }
        // The renames are durable once the directory is.
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_error("syncing", &self.dir, &e))?;
        Ok(outcomes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sink(dir: &Path, mode: SinkMode) -> FilesSink {
        FilesSink::open(&FilesSinkConfig {
            dir: dir.to_path_buf(),
            mode,
            key_from: (mode == SinkMode::Upsert).then(|| "/id".to_string()),
            version_from: (mode == SinkMode::Upsert).then(|| "/ver".to_string()),
        })
        .unwrap()
    }

    fn apply(sink: &mut FilesSink, key: &str, body: &str) -> WriteOutcome {
        crate::sink::apply_one(sink, key, body)
    }

    #[test]
    fn newer_version_replaces_and_keeps_a_backup() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = sink(dir.path(), SinkMode::Upsert);
        let v1 = r#"{"id":"ord/1","ver":1,"qty":1}"#;
        assert_eq!(apply(&mut s, "a", v1), WriteOutcome::Applied);
        // The same event, re-serialised: identical bytes, nothing written.
        let again = r#"{ "qty":1, "ver":1, "id":"ord/1" }"#;
        assert_eq!(apply(&mut s, "a", again), WriteOutcome::AlreadyPresent);
        let v2 = r#"{"id":"ord/1","ver":2,"qty":2}"#;
        assert_eq!(apply(&mut s, "b", v2), WriteOutcome::Applied);
        assert_eq!(apply(&mut s, "c", v1), WriteOutcome::Stale);
        let path = dir.path().join("ord%2F1.json");
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            "{\"id\":\"ord/1\",\"qty\":2,\"ver\":2}\n"
        );
        assert_eq!(
            fs::read_to_string(dir.path().join("ord%2F1.json.bak")).unwrap(),
            "{\"id\":\"ord/1\",\"qty\":1,\"ver\":1}\n"
        );
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
            .collect();
        assert!(leftovers.is_empty(), "temporary files left behind");
    }

    #[test]
    fn insert_mode_never_touches_an_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = sink(dir.path(), SinkMode::Insert);
        assert_eq!(apply(&mut s, "K1", r#"{"a":1}"#), WriteOutcome::Applied);
        assert_eq!(
            apply(&mut s, "K1", r#"{"a":2}"#),
            WriteOutcome::AlreadyPresent
        );
        assert_eq!(
            fs::read_to_string(dir.path().join("K1.json")).unwrap(),
            "{\"a\":1}\n"
        );
    }

    #[test]
    fn file_names_are_safe() {
        assert_eq!(file_name("ord-1"), "ord-1.json");
        assert_eq!(
            file_name("../etc/passwd"),
            "h-".to_string()
                + &format!("{:032x}", xxhash_rust::xxh3::xxh3_128(b"../etc/passwd"))
                + ".json"
        );
        assert_eq!(file_name("a b"), "a%20b.json");
        assert_eq!(file_name("h-1"), "%68-1.json");
        assert!(file_name(&"x".repeat(500)).len() < 60);
    }
}
