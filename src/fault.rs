//! Every failure idem meets is classified here, and only here: the broker,
//! the dedup store, each sink, and decoding.
//!
//! The classes decide what happens (I6 in the design: a transient failure
//! is never dead-lettered):
//! - [`Fault::Record`]: caused by one record's bytes or values; it can
//!   never succeed, so that record alone is dead-lettered and the others go
//!   on. Every decoding failure is of this class.
//! - [`Fault::Transient`]: expected to heal (a lock, a restart, a timeout,
//!   a lost connection); retried with backoff for as long as it takes,
//!   holding the offset.
//! - [`Fault::Operator`]: will not heal by itself (missing table, bad
//!   credentials, wrong URL); retried like a transient one, since the
//!   records are not at fault, and logged at error for an operator.
//! - [`Fault::Fatal`]: this process can do nothing more (a fenced
//!   transactional producer); idem stops with an error, never goes on.

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rusqlite::ErrorCode;
use tokio_postgres::error::SqlState;

use crate::sink::SinkError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Record,
    Transient,
    Operator,
    Fatal,
}

impl Fault {
    /// The sink error for a failure of a whole batch of this class. A
    /// record fault found at batch level (the caller could not tell which
    /// record) fails the batch as transient, to be split or retried.
    pub fn sink_error(self, text: String) -> SinkError {
        match self {
            Fault::Operator => SinkError::NeedsOperator(text),
            Fault::Fatal => SinkError::Fatal(text),
            Fault::Record | Fault::Transient => SinkError::Unavailable(text),
        }
    }
}

/// PostgreSQL, by SQLSTATE class: data exceptions (22), integrity
/// constraints (23) and a value beyond a limit (54000, such as a key too
/// long for its index) are the record's; connection (08), resources (53),
/// operator intervention such as a restart (57), transaction rollbacks
/// like serialization failures and deadlocks (40), system errors (58) and
/// lock timeouts heal; the rest (syntax, missing table, permissions) needs
/// an operator. No SQLSTATE means the connection under it failed.
pub fn postgres(e: &tokio_postgres::Error) -> Fault {
    let Some(code) = e.code() else {
        // No answer from the server: the connection, or its TLS set-up.
        return connection(e);
    };
    let c = code.code();
    if c.starts_with("22")
        || c.starts_with("23")
        || *code == SqlState::DATATYPE_MISMATCH
        || *code == SqlState::PROGRAM_LIMIT_EXCEEDED
    {
        Fault::Record
    } else if ["08", "53", "57", "40", "58"]
        .iter()
        .any(|p| c.starts_with(p))
        || *code == SqlState::LOCK_NOT_AVAILABLE
    {
        Fault::Transient
    } else {
        Fault::Operator
    }
}

/// SQLite, by result code: a constraint, a type mismatch or a value too
/// big is the record's; busy, locked, I/O, a full disk or memory heal;
/// the rest (read-only file, corrupt database, schema) needs an operator.
pub fn sqlite(e: &rusqlite::Error) -> Fault {
    match e.sqlite_error_code() {
        Some(ErrorCode::ConstraintViolation | ErrorCode::TypeMismatch | ErrorCode::TooBig) => {
            Fault::Record
        }
        Some(
            ErrorCode::DatabaseBusy
            | ErrorCode::DatabaseLocked
            | ErrorCode::SystemIoFailure
            | ErrorCode::DiskFull
            | ErrorCode::OutOfMemory,
        ) => Fault::Transient,
        _ => Fault::Operator,
    }
}

/// The files sink's file system: permissions, a read-only file system or
/// a file where a directory should be need an operator; the rest (a full
/// disk, interrupted calls) may heal.
pub fn io(e: &std::io::Error) -> Fault {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::PermissionDenied | ErrorKind::ReadOnlyFilesystem | ErrorKind::NotADirectory => {
            Fault::Operator
        }
        _ => Fault::Transient,
    }
}

/// An HTTP status that is not an answer about the key (2xx, 409, 413 and
/// 422 are, and are handled by the HTTP sink): 408, 429 and 5xx heal;
/// 3xx, 401, 403, 404, 405, 407 and 421 say the sink is misconfigured;
/// any other 4xx refuses the record. Anything else is retried.
pub fn http_status(code: u16) -> Fault {
    match code {
        408 | 429 | 500..=599 => Fault::Transient,
        // Redirects are not followed (a POST turned into a GET would be
        // taken for a success): sink.url should name the final address.
        300..=399 | 401 | 403 | 404 | 405 | 407 | 421 => Fault::Operator,
        400..=499 => Fault::Record,
        _ => Fault::Transient,
    }
}

/// A connection that failed its TLS handshake (an untrusted or expired
/// certificate, a name that does not match) will not heal by itself; any
/// other failure to connect may. Decided on the error's whole chain of
/// causes, since clients wrap the TLS library's error in their own.
pub fn connection(e: &(dyn std::error::Error + 'static)) -> Fault {
    let mut cause = Some(e);
    while let Some(c) = cause {
        let text = c.to_string().to_ascii_lowercase();
        // "wrong version number": TLS spoken to a server that does not.
        if text.contains("certificate")
            || text.contains("tls handshake")
            || text.contains("wrong version number")
        {
            return Fault::Operator;
        }
        cause = c.source();
    }
    Fault::Transient
}

/// An error with its chain of causes, `: `-separated, for messages: the
/// outer text of client errors ("error sending request") rarely says why.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let part = c.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        cause = c.source();
    }
    text
}

/// A record the broker or librdkafka would not take: too large is the
/// record's; anything else (a missing topic, a broker away, a timeout) may
/// heal.
pub fn kafka_delivery(e: &KafkaError) -> Fault {
    match e {
        KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge) => Fault::Record,
        _ => Fault::Transient,
    }
}

/// How a failure of the Kafka sink's transactional producer is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransactionFault {
    /// Abort the transaction and do the batch again.
    Abort,
    /// Call the same operation again (librdkafka says it may).
    Retry,
    /// Fenced, or otherwise finished: stop.
    Fatal,
}

/// librdkafka's own verdict on a transactional error; an error that is
/// not a transaction error aborts.
pub fn kafka_transaction(e: &KafkaError) -> TransactionFault {
    match e {
        KafkaError::Transaction(rd) if rd.is_fatal() => TransactionFault::Fatal,
        KafkaError::Transaction(rd) if rd.txn_requires_abort() => TransactionFault::Abort,
        KafkaError::Transaction(rd) if rd.is_retriable() => TransactionFault::Retry,
        _ => TransactionFault::Abort,
    }
}

/// A RocksDB error on local disk does not heal by retrying, except a busy
/// or timed-out write.
pub fn store(e: &rocksdb::Error) -> Fault {
    match e.kind() {
        rocksdb::ErrorKind::Busy
        | rocksdb::ErrorKind::TimedOut
        | rocksdb::ErrorKind::TryAgain
        | rocksdb::ErrorKind::Incomplete => Fault::Transient,
        _ => Fault::Fatal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_statuses_fall_in_their_classes() {
        for (code, fault) in [
            (408, Fault::Transient),
            (429, Fault::Transient),
            (503, Fault::Transient),
            (401, Fault::Operator),
            (404, Fault::Operator),
            (400, Fault::Record),
            (415, Fault::Record),
            (302, Fault::Operator),
            (307, Fault::Operator),
            (600, Fault::Transient),
        ] {
            assert_eq!(http_status(code), fault, "HTTP {code}");
        }
    }

    #[derive(Debug)]
    struct Wrapped(&'static str, Option<Box<Wrapped>>);

    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    #[test]
    fn a_certificate_failure_anywhere_in_the_chain_needs_an_operator() {
        let tls = Wrapped(
            "error sending request",
            Some(Box::new(Wrapped(
                "client error (Connect)",
                Some(Box::new(Wrapped(
                    "error:0A000086:SSL routines:tls_post_process_server_certificate:certificate verify failed",
                    None,
                ))),
            ))),
        );
        assert_eq!(connection(&tls), Fault::Operator);
        assert!(
            chain(&tls).ends_with("certificate verify failed"),
            "{}",
            chain(&tls)
        );
        let refused = Wrapped(
            "error sending request",
            Some(Box::new(Wrapped("Connection refused (os error 111)", None))),
        );
        assert_eq!(connection(&refused), Fault::Transient);
    }

    #[test]
    fn io_permissions_need_an_operator() {
        let denied = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        assert_eq!(io(&denied), Fault::Operator);
        let other = std::io::Error::from(std::io::ErrorKind::Interrupted);
        assert_eq!(io(&other), Fault::Transient);
    }
}
