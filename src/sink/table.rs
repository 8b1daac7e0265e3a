//! How records map onto a SQL table, shared by the SQL sinks: which
//! columns exist, where each value comes from, and the checks that make a
//! record unwritable (no entity key, no integer version).

use serde_json::Value;

use super::SinkWrite;
use crate::config::{SinkMode, TableConfig, VersionSource};

/// A JSON pointer (RFC 6901) split into its tokens once, at start-up,
/// instead of at every look-up as `Value::pointer` does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonPointer {
    text: String,
    tokens: Vec<String>,
}

impl JsonPointer {
    /// `text` is a pointer that passed the config check: empty or
    /// starting with `/`.
    pub fn new(text: &str) -> JsonPointer {
        let tokens = text
            .split('/')
            .skip(1)
            .map(|t| t.replace("~1", "/").replace("~0", "~"))
            .collect();
        JsonPointer {
            text: text.to_string(),
            tokens,
        }
    }

    /// The value it points at, as `Value::pointer` would find it.
    pub fn get<'a>(&self, value: &'a Value) -> Option<&'a Value> {
        self.tokens
            .iter()
            .try_fold(value, |target, token| match target {
                Value::Object(map) => map.get(token),
                Value::Array(list) => array_index(token).and_then(|i| list.get(i)),
                _ => None,
            })
    }
}

impl std::fmt::Display for JsonPointer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// An array index token: digits, without a sign or a leading zero.
fn array_index(token: &str) -> Option<usize> {
    if token.starts_with('+') || (token.starts_with('0') && token.len() > 1) {
        return None;
    }
    token.parse().ok()
}

/// Where one column's value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Pointer(JsonPointer),
    Version,
    IdempotencyKey,
    Payload,
}

/// One value to bind, before a sink turns it into its own type.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    /// A value from the payload: JSON null, a scalar, or an object/array.
    Json(Value),
    /// A missing pointer.
    Null,
    Int(i64),
    Text(String),
}

impl Cell {
    /// The text form: strings without quotes, numbers and booleans as
    /// written, objects and arrays as JSON. None for null.
    pub fn to_text(&self) -> Option<String> {
        match self {
            Cell::Null | Cell::Json(Value::Null) => None,
            Cell::Json(Value::String(s)) | Cell::Text(s) => Some(s.clone()),
            Cell::Json(other) => Some(other.to_string()),
            Cell::Int(i) => Some(i.to_string()),
        }
    }

    /// The JSON form, for json/jsonb columns. None for null.
    pub fn to_json_text(&self) -> Option<String> {
        match self {
            Cell::Null | Cell::Json(Value::Null) => None,
            Cell::Json(v) => Some(v.to_string()),
            Cell::Int(i) => Some(i.to_string()),
            Cell::Text(s) => Some(Value::String(s.clone()).to_string()),
        }
    }
}

/// A record's row: its cells, entity key and version (upsert).
#[derive(Debug, Clone)]
pub struct Row {
    pub cells: Vec<Cell>,
    /// upsert: the entity key as text; insert: the idempotency key.
    pub key: String,
    /// upsert: the version.
    pub version: Option<i64>,
}

#[derive(Debug, Clone)]
pub struct TableMapping {
    pub table: String,
    pub mode: SinkMode,
    /// Column names, in bind order.
    pub names: Vec<String>,
    pub sources: Vec<Source>,
    /// The conflict column: the entity key (upsert) or the idempotency key
    /// column (insert).
    pub key_column: String,
    pub key_index: usize,
    /// upsert: the version column and its position.
    pub version_column: Option<String>,
    pub version_index: Option<usize>,
    version: Option<Version>,
}

/// Where an upsert's version comes from, with its pointer split.
#[derive(Debug, Clone)]
enum Version {
    KafkaOffset,
    Pointer(JsonPointer),
}

/// Quotes an identifier. Names are validated at start-up to
/// `[A-Za-z_][A-Za-z0-9_]*`; quoting keeps SQL keywords usable as names.
pub fn quote(name: &str) -> String {
    format!("\"{name}\"")
}

impl TableMapping {
    /// # Panics
    /// On a config that did not pass validation.
    pub fn new(table: &TableConfig) -> TableMapping {
        let mut names = Vec::new();
        let mut sources = Vec::new();
        let (key_column, version_column, version) = match table.mode {
            SinkMode::Upsert => {
                let version_column = table.version_column.clone().expect("validated");
                for (name, pointer) in &table.columns {
                    if *name != version_column {
                        names.push(name.clone());
                        sources.push(Source::Pointer(JsonPointer::new(pointer)));
                    }
                }
                names.push(version_column.clone());
                sources.push(Source::Version);
                (
                    table.key_column.clone().expect("validated"),
                    Some(version_column),
                    Some(
                        match table.version_source("sink.table").expect("validated") {
                            VersionSource::KafkaOffset => Version::KafkaOffset,
                            VersionSource::Pointer(p) => Version::Pointer(JsonPointer::new(&p)),
                        },
                    ),
                )
            }
            SinkMode::Insert => {
                names.push(table.insert_key_column().to_string());
                sources.push(Source::IdempotencyKey);
                for (name, pointer) in &table.columns {
                    names.push(name.clone());
                    sources.push(Source::Pointer(JsonPointer::new(pointer)));
                }
                (table.insert_key_column().to_string(), None, None)
            }
        };
        if let Some(payload) = &table.payload_column {
            names.push(payload.clone());
            sources.push(Source::Payload);
        }
        let key_index = names
            .iter()
            .position(|n| *n == key_column)
            .expect("validated");
        let version_index = sources.iter().position(|s| *s == Source::Version);
        TableMapping {
            table: table.name.clone(),
            mode: table.mode,
            names,
            sources,
            key_column,
            key_index,
            version_column,
            version_index,
            version,
        }
    }

    /// The row for one record, or why the record can never be written.
    ///
    /// # Errors
    /// The reason, for the dead letter: no entity key, a key that is an
    /// object or array, or a version that is missing or not an integer.
    pub fn row(&self, write: &SinkWrite<'_>) -> Result<Row, String> {
        let mut cells = Vec::with_capacity(self.sources.len());
        let mut version = None;
        for source in &self.sources {
            cells.push(match source {
                Source::Pointer(p) => match p.get(write.body) {
                    None => Cell::Null,
                    Some(v) => Cell::Json(v.clone()),
                },
                Source::IdempotencyKey => Cell::Text(write.key.0.clone()),
                Source::Payload => Cell::Text(String::from_utf8_lossy(write.raw).into_owned()),
                Source::Version => {
                    let v = match self.version.as_ref().expect("upsert has a version") {
                        Version::KafkaOffset => write.offset.0,
                        Version::Pointer(p) => {
                            p.get(write.body).and_then(Value::as_i64).ok_or_else(|| {
                                format!("version at {p} is missing or not an integer")
                            })?
                        }
                    };
                    version = Some(v);
                    Cell::Int(v)
                }
            });
        }
        let key = match &cells[self.key_index] {
            Cell::Json(Value::Object(_) | Value::Array(_)) => {
                return Err(format!("entity key `{}` is not a scalar", self.key_column))
            }
            cell => cell.to_text().ok_or_else(|| {
                format!(
                    "payload has no value for the key column `{}`",
                    self.key_column
                )
            })?,
        };
        Ok(Row {
            cells,
            key,
            version,
        })
    }
}

/// What applying a batch in order would do to each upsert, given the
/// version each entity held before the batch: applied (newer than what is
/// there, counting earlier records of the batch), duplicate (same version)
/// or stale (older). Also which record of each entity ends in the row: the
/// last applied one. A sink that writes one statement per batch uses this
/// to write each entity once and still count like a sink that writes
/// record by record.
pub fn plan_upserts(
    rows: &[(usize, &Row)],
    held: &std::collections::HashMap<String, i64>,
) -> (Vec<(usize, super::WriteOutcome)>, Vec<usize>) {
    use super::WriteOutcome;
    let mut current: std::collections::HashMap<&str, i64> = std::collections::HashMap::new();
    let mut last_applied: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    let mut outcomes = Vec::with_capacity(rows.len());
    for (i, row) in rows {
        let version = row.version.expect("upsert rows have a version");
        let now = current
            .get(row.key.as_str())
            .copied()
            .or_else(|| held.get(&row.key).copied());
        let outcome = match now {
            Some(v) if version < v => WriteOutcome::Stale,
            Some(v) if version == v => WriteOutcome::AlreadyPresent,
            _ => {
                current.insert(&row.key, version);
                last_applied.insert(&row.key, *i);
                WriteOutcome::Applied
            }
        };
        outcomes.push((*i, outcome));
    }
    let mut winners: Vec<usize> = last_applied.into_values().collect();
    winners.sort_unstable();
    (outcomes, winners)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::WriteOutcome;

    /// The split pointer finds what `Value::pointer` finds, escapes and
    /// array indexes included.
    #[test]
    fn split_pointer_agrees_with_serde_json() {
        let value: Value = serde_json::from_str(
            r#"{"a":{"b/c":1,"d~e":[10,20,{"f":"x"}],"":{"":2}},"0":3,"list":[4]}"#,
        )
        .unwrap();
        for text in [
            "",
            "/a",
            "/a/b~1c",
            "/a/d~0e",
            "/a/d~0e/1",
            "/a/d~0e/2/f",
            "/a/d~0e/01",
            "/a/d~0e/+1",
            "/a/d~0e/3",
            "/a//",
            "/a/",
            "/0",
            "/list/0",
            "/list/00",
            "/missing",
            "/a/b~1c/deeper",
        ] {
            assert_eq!(
                JsonPointer::new(text).get(&value),
                value.pointer(text),
                "pointer {text:?}"
            );
        }
    }

    fn row(key: &str, version: i64) -> Row {
        Row {
            cells: vec![],
            key: key.into(),
            version: Some(version),
        }
    }

    /// C9's batch: one entity twice with two versions, another written
    /// once; the plan writes each entity once, with its newest version.
    #[test]
    fn plan_writes_each_entity_once_and_counts_like_sequential_writes() {
        let rows = [
            row("ord-11", 1),
            row("ord-11", 2),
            row("ord-14", 1),
            row("ord-15", 3),
        ];
        let indexed: Vec<(usize, &Row)> = rows.iter().enumerate().collect();
        let held = [("ord-15".to_string(), 5)].into_iter().collect();
        let (outcomes, winners) = plan_upserts(&indexed, &held);
        assert_eq!(winners, vec![1, 2]);
        assert_eq!(
            outcomes.into_iter().map(|(_, o)| o).collect::<Vec<_>>(),
            vec![
                WriteOutcome::Applied,
                WriteOutcome::Applied,
                WriteOutcome::Applied,
                WriteOutcome::Stale
            ]
        );
    }

    #[test]
    fn equal_version_is_a_duplicate_and_the_first_body_stays() {
        let rows = [row("a", 2), row("a", 2), row("b", 1)];
        let indexed: Vec<(usize, &Row)> = rows.iter().enumerate().collect();
        let held = [("b".to_string(), 1)].into_iter().collect();
        let (outcomes, winners) = plan_upserts(&indexed, &held);
        assert_eq!(winners, vec![0]);
        assert_eq!(outcomes[1].1, WriteOutcome::AlreadyPresent);
        assert_eq!(outcomes[2].1, WriteOutcome::AlreadyPresent);
    }
}
