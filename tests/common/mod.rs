//! Helpers for the suites that run against a real Kafka broker.
//!
//! The broker comes from `scripts/test.sh`, which starts Apache Kafka on
//! 127.0.0.1 and exports `IDEM_KAFKA_BOOTSTRAP`. Every test makes its own
//! topics and group, with names no other test uses.
#![allow(dead_code)]

pub mod receiver;

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use idem::clock::Clock;
use idem::config::Config;
use idem::failpoint::CrashPlan;
use idem::outcome::Outcome;
use idem::pipeline::retry::Shutdown;
use idem::pipeline::{Pipeline, PipelineError, RunEnd};
use idem::telemetry::Metrics;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::TopicPartitionList;

pub fn bootstrap() -> String {
    std::env::var("IDEM_KAFKA_BOOTSTRAP").expect(
        "IDEM_KAFKA_BOOTSTRAP is not set: these tests need the real broker that \
         scripts/test.sh starts; run the suites with scripts/test.sh",
    )
}

/// A name no other test in this run uses.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_micros()
    )
}

fn admin() -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .create()
        .expect("admin client")
}

/// Deletes a consumer group, and with it every committed offset.
pub fn delete_group(group: &str) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let results = rt
        .block_on(admin().delete_groups(&[group], &AdminOptions::new()))
        .expect("delete_groups");
    for r in results {
        r.unwrap_or_else(|(g, e)| panic!("deleting group {g}: {e}"));
    }
}

/// Runs the idem binary to completion.
pub fn idem(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_idem"))
        .args(args)
        .env("RUST_LOG", "error")
        .output()
        .expect("running idem")
}

/// `idem replay` of the fixture's group and topic, with `args` added.
pub fn replay(f: &Fixture, config: &Path, args: &[&str]) -> std::process::Output {
    let mut all = vec![
        "replay",
        "--config",
        config.to_str().unwrap(),
        "--group",
        &f.group,
        "--topic",
        &f.topic,
    ];
    all.extend_from_slice(args);
    idem(&all)
}

pub fn create_topic(name: &str, partitions: i32) {
    create_topic_with(name, partitions, &[]);
}

pub fn create_topic_with(name: &str, partitions: i32, configs: &[(&str, &str)]) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let results = rt
        .block_on(admin().create_topics(
            &[configs.iter().fold(
                NewTopic::new(name, partitions, TopicReplication::Fixed(1)),
                |t, (k, v)| t.set(k, v),
            )],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        ))
        .expect("create_topics");
    for r in results {
        r.unwrap_or_else(|(t, e)| panic!("creating topic {t}: {e}"));
    }
    // Wait until the new topic's metadata is served.
    let consumer = plain_consumer(None);
    wait_for(Duration::from_secs(30), "topic metadata", || {
        consumer
            .fetch_metadata(Some(name), Duration::from_secs(5))
            .map(|m| {
                m.topics()
                    .iter()
                    .any(|t| t.name() == name && t.partitions().len() == partitions as usize)
            })
            .unwrap_or(false)
    });
}

/// One record to produce.
#[derive(Clone, Debug, Default)]
pub struct Rec {
    pub partition: i32,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    /// Milliseconds since the epoch; default: the producer's clock.
    pub timestamp: Option<i64>,
}

impl Rec {
    /// An order on `partition`, record key = id, header Idempotency-Key.
    pub fn order(partition: i32, idem: &str, id: &str, ver: i64, qty: i64) -> Rec {
        Rec {
            partition,
            key: Some(id.as_bytes().to_vec()),
            value: Some(format!(r#"{{"id":"{id}","ver":{ver},"qty":{qty}}}"#).into_bytes()),
            headers: vec![("Idempotency-Key".into(), Some(idem.as_bytes().to_vec()))],
            timestamp: None,
        }
    }

    pub fn with_value(mut self, value: &[u8]) -> Rec {
        self.value = Some(value.to_vec());
        self
    }
}

pub fn producer() -> BaseProducer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("linger.ms", "5")
        .set("enable.idempotence", "true")
        .set("message.max.bytes", "4000000")
        .create()
        .expect("producer")
}

pub fn produce(topic: &str, records: &[Rec]) {
    let producer = producer();
    produce_with(&producer, topic, records);
}

pub fn produce_with(producer: &BaseProducer, topic: &str, records: &[Rec]) {
    for r in records {
        let mut headers = OwnedHeaders::new();
        for (k, v) in &r.headers {
            headers = headers.insert(Header {
                key: k,
                value: v.as_deref(),
            });
        }
        let mut record = BaseRecord::<[u8], [u8]>::to(topic)
            .partition(r.partition)
            .headers(headers);
        if let Some(k) = &r.key {
            record = record.key(k.as_slice());
        }
        if let Some(v) = &r.value {
            record = record.payload(v.as_slice());
        }
        if let Some(ts) = r.timestamp {
            record = record.timestamp(ts);
        }
        send_waiting(producer, record);
    }
    producer.flush(Duration::from_secs(60)).expect("flush");
}

/// Sends one record, waiting while the producer's queue is full.
pub fn send_waiting(producer: &BaseProducer, mut record: BaseRecord<'_, [u8], [u8]>) {
    loop {
        match producer.send(record) {
            Ok(()) => break,
            Err((_, back)) => {
                record = back;
                producer.poll(Duration::from_millis(50));
            }
        }
    }
    producer.poll(Duration::ZERO);
}

fn plain_consumer(group: Option<&str>) -> BaseConsumer {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap())
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest");
    c.set("group.id", group.unwrap_or("idem-test-reader"));
    c.create().expect("consumer")
}

/// The group's committed offset of each partition (-1 when none).
pub fn committed(group: &str, topic: &str, partitions: i32) -> Vec<i64> {
    let consumer = plain_consumer(Some(group));
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let got = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .expect("committed offsets");
    (0..partitions)
        .map(|p| match got.find_partition(topic, p).map(|e| e.offset()) {
            Some(rdkafka::Offset::Offset(o)) => o,
            _ => -1,
        })
        .collect()
}

pub fn end_offsets(topic: &str, partitions: i32) -> Vec<i64> {
    let consumer = plain_consumer(None);
    (0..partitions)
        .map(|p| {
            consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .expect("watermarks")
                .1
        })
        .collect()
}

/// Every record in a topic, read with a fresh assignment from the start.
pub fn read_all(topic: &str, partitions: i32) -> Vec<OwnedMessage> {
    let ends = end_offsets(topic, partitions);
    let total: i64 = ends.iter().sum();
    let consumer = plain_consumer(None);
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, rdkafka::Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while (out.len() as i64) < total {
        assert!(
            Instant::now() < deadline,
            "could not read {topic} to its end"
        );
        if let Some(m) = consumer.poll(Duration::from_millis(200)) {
            out.push(m.expect("read").detach());
        }
    }
    out
}

/// Every committed record of a topic, as a downstream reader with
/// `isolation.level=read_committed` sees it: read from the start until
/// each partition reports its end (the last stable offset).
pub fn read_committed(topic: &str, partitions: i32) -> Vec<OwnedMessage> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("group.id", "idem-test-reader")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, rdkafka::Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let mut at_end = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while at_end.len() < partitions as usize {
        assert!(
            Instant::now() < deadline,
            "could not read {topic} to its end"
        );
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => out.push(m.detach()),
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                at_end.insert(p);
            }
            Some(Err(e)) => panic!("reading {topic}: {e}"),
            None => {}
        }
    }
    out
}

pub fn header<'a>(m: &'a OwnedMessage, name: &str) -> Option<&'a [u8]> {
    m.headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
}

/// Polls `condition` until it holds; panics with `what` after `limit`.
pub fn wait_for(limit: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Where a test's files and names live.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub topic: String,
    pub dead_letter_topic: String,
    pub group: String,
    pub partitions: i32,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    Upsert,
    Insert,
}

impl Fixture {
    /// Topic `orders.v1-…` with 2 partitions, its dead-letter topic, a group.
    pub fn new(name: &str) -> Fixture {
        Fixture::with_dead_letter_topic(name, true)
    }

    /// Like [`Fixture::new`], with topic-level configs on the input topic
    /// (e.g. a larger `max.message.bytes`).
    pub fn with_topic_config(name: &str, configs: &[(&str, &str)]) -> Fixture {
        Fixture::build(name, configs, true)
    }

    /// Like [`Fixture::new`]; without the dead-letter topic when asked.
    pub fn with_dead_letter_topic(name: &str, create_dead_letter: bool) -> Fixture {
        Fixture::build(name, &[], create_dead_letter)
    }

    /// Like [`Fixture::new`], with this many input partitions.
    pub fn with_partitions(name: &str, partitions: i32) -> Fixture {
        Fixture::build_with(name, &[], true, partitions)
    }

    fn build(name: &str, configs: &[(&str, &str)], create_dead_letter: bool) -> Fixture {
        Fixture::build_with(name, configs, create_dead_letter, 2)
    }

    fn build_with(
        name: &str,
        configs: &[(&str, &str)],
        create_dead_letter: bool,
        partitions: i32,
    ) -> Fixture {
        let topic = unique(&format!("orders.v1-{name}"));
        let f = Fixture {
            dir: tempfile::tempdir().unwrap(),
            dead_letter_topic: format!("{topic}.dlq"),
            group: unique(&format!("idem-test-{name}")),
            topic,
            partitions,
        };
        create_topic_with(&f.topic, f.partitions, configs);
        if create_dead_letter {
            create_topic(&f.dead_letter_topic, 1);
        }
        f
    }

    pub fn sink_path(&self) -> PathBuf {
        self.dir.path().join("orders.db")
    }

    pub fn dedup_path(&self) -> PathBuf {
        self.dir.path().join("dedup")
    }

    /// Config text; `extra` is appended (more tables or fields).
    /// Config text with the SQLite sink; `extra` is appended to its table.
    pub fn config_text(&self, mode: Mode, window: &str, extra: &str) -> String {
        let table = match mode {
            Mode::Upsert => {
                r#"mode = "upsert"
key_column = "id"
version_column = "ver"
columns = { id = "/id", ver = "/ver", qty = "/qty" }"#
            }
            Mode::Insert => {
                r#"mode = "insert"
columns = { id = "/id", qty = "/qty" }"#
            }
        };
        let sink = format!(
            "[sink]\nkind = \"sqlite\"\npath = \"{}\"\nbusy_timeout_ms = 500\n\n\
             [sink.table]\nname = \"orders\"\n{table}\n{extra}\n",
            self.sink_path().display()
        );
        self.config_text_with_sink(window, &sink)
    }

    /// Config text with any `[sink]` section.
    pub fn config_text_with_sink(&self, window: &str, sink: &str) -> String {
        format!(
            r#"
[kafka]
bootstrap_servers = "{bootstrap}"
group_id = "{group}"
session_timeout_ms = 6000

[[topics]]
name = "{topic}"

[batch]
max_records = 200
linger_ms = 20

[dedup]
path = "{dedup}"
window = "{window}"

[dead_letter]
topic = "{dlq}"
timeout_ms = 3000

[retry]
initial_backoff_ms = 50
max_backoff_ms = 1000

[metrics]
listen = "127.0.0.1:{port}"

[log]
level = "info"

{sink}
"#,
            bootstrap = bootstrap(),
            group = self.group,
            topic = self.topic,
            dedup = self.dedup_path().display(),
            dlq = self.dead_letter_topic,
            port = free_port(),
        )
    }

    /// Config text for another instance of the group: its own dedup
    /// store (`dedup-<name>`) and metrics port.
    pub fn instance_text(&self, text: &str, name: &str) -> String {
        let mut text = text.replace(
            &self.dedup_path().display().to_string(),
            &self
                .dir
                .path()
                .join(format!("dedup-{name}"))
                .display()
                .to_string(),
        );
        let listen = text
            .lines()
            .find(|l| l.starts_with("listen = "))
            .expect("config has metrics.listen")
            .to_string();
        text = text.replace(&listen, &format!("listen = \"127.0.0.1:{}\"", free_port()));
        text
    }

    /// Writes config text next to the fixture's files.
    pub fn write_text(&self, text: &str) -> PathBuf {
        let path = self.dir.path().join("idem.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    pub fn config(&self, mode: Mode, window: &str) -> Config {
        Config::parse(&self.config_text(mode, window, ""), Path::new("test.toml"))
            .expect("test config")
    }

    pub fn write_config(&self, mode: Mode, window: &str) -> PathBuf {
        let path = self.dir.path().join("idem.toml");
        std::fs::write(&path, self.config_text(mode, window, "")).unwrap();
        path
    }

    pub fn committed(&self) -> Vec<i64> {
        committed(&self.group, &self.topic, self.partitions)
    }

    /// Waits until the group committed exactly `expected`.
    pub fn wait_committed(&self, expected: &[i64]) {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let last = self.committed();
            if last == expected {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "committed offsets {last:?}, expected {expected:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Rows of the upsert table: id -> (ver, qty).
    pub fn rows(&self) -> BTreeMap<String, (i64, i64)> {
        let conn = rusqlite::Connection::open(self.sink_path()).unwrap();
        let mut stmt = conn.prepare("SELECT id, ver, qty FROM orders").unwrap();
        stmt.query_map([], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?))))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    pub fn rows_or_empty(&self, mode: Mode) -> BTreeMap<String, (i64, i64)> {
        if mode == Mode::Upsert {
            self.rows()
        } else {
            BTreeMap::new()
        }
    }

    pub fn inserted_or_empty(&self, mode: Mode) -> BTreeMap<String, (String, i64)> {
        if mode == Mode::Insert {
            self.inserted()
        } else {
            BTreeMap::new()
        }
    }

    /// Rows of the insert table: idempotency key -> (id, qty).
    pub fn inserted(&self) -> BTreeMap<String, (String, i64)> {
        let conn = rusqlite::Connection::open(self.sink_path()).unwrap();
        let mut stmt = conn
            .prepare("SELECT idem_key, id, qty FROM orders")
            .unwrap();
        stmt.query_map([], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?))))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A pipeline running in this process, on its own thread.
pub struct Running {
    pub metrics: Arc<Metrics>,
    shutdown: Shutdown,
    thread: std::thread::JoinHandle<Result<RunEnd, PipelineError>>,
}

impl Running {
    pub fn start(config: Config) -> Running {
        Running::start_with(Pipeline::new(config))
    }

    pub fn start_with_clock(config: Config, clock: Arc<dyn Clock>) -> Running {
        Running::start_with(Pipeline::new(config).with_clock(clock))
    }

    pub fn start_with_crash(config: Config, plan: CrashPlan) -> Running {
        Running::start_with(Pipeline::new(config).with_crash_plan(plan))
    }

    pub fn start_with(pipeline: Pipeline) -> Running {
        let metrics = pipeline.metrics();
        let shutdown = pipeline.shutdown_handle();
        let thread = std::thread::spawn(move || pipeline.run());
        Running {
            metrics,
            shutdown,
            thread,
        }
    }

    pub fn count(&self, outcome: Outcome) -> u64 {
        self.metrics.outcome_total(outcome)
    }

    /// Waits until `n` records have been read and settled.
    pub fn wait_read(&self, n: u64) {
        wait_for(
            Duration::from_secs(90),
            &format!("{n} records read"),
            || self.metrics.read_total() >= n,
        );
        assert_eq!(
            self.metrics.read_total(),
            n,
            "read more records than expected"
        );
    }

    /// Stops cleanly and returns how the run ended.
    pub fn stop(self) -> RunEnd {
        self.shutdown.trigger();
        self.thread
            .join()
            .expect("pipeline panicked")
            .expect("pipeline failed")
    }

    /// Waits for the run to end by itself (a planned crash).
    pub fn join(self) -> RunEnd {
        self.thread
            .join()
            .expect("pipeline panicked")
            .expect("pipeline failed")
    }

    /// I4: every outcome counted once, adding up to the records read.
    pub fn assert_outcomes_add_up(&self) {
        assert_outcomes_add_up(&self.metrics);
    }
}

pub fn assert_outcomes_add_up(metrics: &Metrics) {
    let sum: u64 = Outcome::ALL.iter().map(|o| metrics.outcome_total(*o)).sum();
    assert_eq!(
        sum,
        metrics.read_total(),
        "outcomes must add up to records read"
    );
}

/// The real `idem` binary, built with the `failpoints` feature.
pub struct Binary {
    pub child: Child,
    pub metrics_port: u16,
    /// Where its stderr goes, when kept to be read.
    stderr: Option<PathBuf>,
}

impl Binary {
    pub fn start(config: &Path, crash_at: Option<&str>) -> Binary {
        match crash_at {
            Some(point) => Binary::start_with_env(config, &[("IDEM_CRASH_AT", point)]),
            None => Binary::start_with_env(config, &[]),
        }
    }

    /// Starts idem with these extra environment variables (failpoints).
    pub fn start_with_env(config: &Path, env: &[(&str, &str)]) -> Binary {
        Binary::spawn(config, env, None)
    }

    /// Starts idem logging at `rust_log` into the file `stderr`, to be
    /// read with [`Binary::stderr`].
    pub fn start_logged(config: &Path, rust_log: &str, stderr: &Path) -> Binary {
        Binary::spawn(config, &[("RUST_LOG", rust_log)], Some(stderr))
    }

    fn spawn(config: &Path, env: &[(&str, &str)], stderr: Option<&Path>) -> Binary {
        let text = std::fs::read_to_string(config).unwrap();
        let port: u16 = text
            .lines()
            .find_map(|l| l.strip_prefix("listen = \"127.0.0.1:"))
            .and_then(|rest| rest.trim_end_matches('"').parse().ok())
            .expect("config has a metrics.listen line");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_idem"));
        cmd.arg("run")
            .arg("--config")
            .arg(config)
            .env(
                "RUST_LOG",
                std::env::var("IDEM_TEST_LOG").unwrap_or_else(|_| "error".into()),
            )
            .stdout(Stdio::null())
            .stderr(match stderr {
                Some(path) => Stdio::from(std::fs::File::create(path).unwrap()),
                None => Stdio::inherit(),
            });
        cmd.env_remove("IDEM_CRASH_AT").env_remove("IDEM_STALL_AT");
        for (k, v) in env {
            cmd.env(k, v);
        }
        Binary {
            child: cmd.spawn().expect("spawning idem"),
            metrics_port: port,
            stderr: stderr.map(Path::to_path_buf),
        }
    }

    /// What it has logged so far (started with [`Binary::start_logged`]).
    pub fn stderr(&self) -> String {
        let path = self.stderr.as_ref().expect("started with start_logged");
        String::from_utf8_lossy(&std::fs::read(path).unwrap()).into_owned()
    }

    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub fn wait(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "idem did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn sigkill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn stop(&mut self) -> ExitStatus {
        self.stop_within(Duration::from_secs(60))
    }

    /// SIGTERM; panics if idem takes longer than `limit` to exit.
    pub fn stop_within(&mut self, limit: Duration) -> ExitStatus {
        // SAFETY: signalling our own child process.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        self.wait(limit)
    }

    /// A metric's value summed over its series; None while the server is
    /// not up yet.
    pub fn metric(&self, name: &str, label: Option<&str>) -> Option<u64> {
        let text = http_get(self.metrics_port, "/metrics")?;
        Some(
            text.lines()
                .filter(|l| !l.starts_with('#'))
                .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
                .filter(|l| label.is_none_or(|lab| l.contains(lab)))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>() as u64,
        )
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn http_get(port: u16, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut body = String::new();
    stream.read_to_string(&mut body).ok()?;
    Some(body.split_once("\r\n\r\n")?.1.to_string())
}

/// A generated stream and what it must leave in the sink.
pub struct Stream {
    pub records: Vec<Rec>,
    /// upsert: id -> (ver, qty)
    pub rows: BTreeMap<String, (i64, i64)>,
    /// insert: idempotency key -> (id, qty)
    pub inserted: BTreeMap<String, (String, i64)>,
    pub duplicates: usize,
}

/// A fifth duplicates (some re-serialised, some far from their first
/// copy), some conflicts, some stale versions, some poison. Entities stay
/// on one partition, as a producer partitioning by entity key does.
pub fn stream(total: usize, partitions: i32) -> Stream {
    let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let entities = (total / 4).max(1) as u64;
    let mut versions: HashMap<u64, i64> = HashMap::new();
    let mut sent: Vec<(i32, String, String, i64, i64)> = Vec::new();
    let mut records = Vec::with_capacity(total);
    let mut duplicates = 0;
    let body = |id: &str, ver: i64, qty: i64, pad: &str| {
        format!(r#"{{"id":"{id}","ver":{ver},"qty":{qty},"note":"{pad}"}}"#)
    };
    let pad = "x".repeat(120);
    while records.len() < total {
        let roll = next(1000);
        if roll < 200 && !sent.is_empty() {
            // Duplicate of any earlier event, often far back, re-serialised.
            let (p, idem, id, ver, qty) = sent[next(sent.len() as u64) as usize].clone();
            let value = format!(
                "{{ \"qty\": {qty}, \"note\": \"{pad}\",\n \"ver\": {ver}, \"id\": \"{id}\" }}"
            );
            let mut r = Rec::order(p, &idem, &id, ver, qty);
            r.value = Some(value.into_bytes());
            records.push(r);
            duplicates += 1;
        } else if roll < 210 && !sent.is_empty() {
            // Conflict: an earlier key with another body.
            let (p, idem, id, ver, qty) = sent[next(sent.len() as u64) as usize].clone();
            records.push(
                Rec::order(p, &idem, &id, ver, qty + 1_000)
                    .with_value(body(&id, ver, qty + 1_000, &pad).as_bytes()),
            );
        } else if roll < 230 && !sent.is_empty() {
            // Stale: an older version under a new key.
            let (p, _, id, ver, _) = sent[next(sent.len() as u64) as usize].clone();
            let idem = format!("late-{}", records.len());
            let old = ver - 1;
            records.push(
                Rec::order(p, &idem, &id, old, 7).with_value(body(&id, old, 7, &pad).as_bytes()),
            );
        } else if roll < 235 {
            let p = next(partitions as u64) as i32;
            records.push(
                Rec::order(p, &format!("poison-{}", records.len()), "x", 1, 1)
                    .with_value(b"{\"id\":"),
            );
        } else {
            let e = next(entities);
            let ver = versions.entry(e).or_insert(0);
            *ver += 1;
            let id = format!("ord-{e}");
            let p = (e % partitions as u64) as i32;
            let idem = format!("{id}-v{ver}");
            let qty = next(100) as i64;
            records.push(
                Rec::order(p, &idem, &id, *ver, qty)
                    .with_value(body(&id, *ver, qty, &pad).as_bytes()),
            );
            sent.push((p, idem, id, *ver, qty));
        }
    }

    // The model: per partition in order, first body per key wins, the
    // newest version per entity wins.
    let mut rows = BTreeMap::new();
    let mut inserted = BTreeMap::new();
    let mut seen: HashMap<String, String> = HashMap::new();
    for p in 0..partitions {
        for r in records.iter().filter(|r| r.partition == p) {
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(r.value.as_ref().unwrap())
            else {
                continue;
            };
            let idem = String::from_utf8(r.headers[0].1.clone().unwrap()).unwrap();
            let id = v["id"].as_str().unwrap().to_string();
            let (ver, qty) = (v["ver"].as_i64().unwrap(), v["qty"].as_i64().unwrap());
            let canon = format!("{id}/{ver}/{qty}");
            match seen.get(&idem) {
                Some(_) => continue,
                None => {
                    seen.insert(idem.clone(), canon);
                }
            }
            inserted.insert(idem, (id.clone(), qty));
            let row = rows.entry(id).or_insert((ver, qty));
            if ver >= row.0 {
                *row = (ver, qty);
            }
        }
    }
    Stream {
        records,
        rows,
        inserted,
        duplicates,
    }
}

/// Committed offsets, or None while the broker cannot answer.
pub fn try_committed(group: &str, topic: &str, partitions: i32) -> Option<Vec<i64>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .ok()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let got = consumer
        .committed_offsets(tpl, Duration::from_secs(5))
        .ok()?;
    Some(
        (0..partitions)
            .map(|p| match got.find_partition(topic, p).map(|e| e.offset()) {
                Some(rdkafka::Offset::Offset(o)) => o,
                _ => -1,
            })
            .collect(),
    )
}

/// Runs one of the project's service scripts; returns its last line.
pub fn script(name: &str, args: &[&str]) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(name);
    let out = Command::new(&path).args(args).output().expect("script");
    assert!(
        out.status.success(),
        "{name} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_string()
}
