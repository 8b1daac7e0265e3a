//! A broker outage longer than the group's session timeout, on a broker of
//! the test's own that it stops and starts again: the Kafka sink's batch in
//! hand fails its transaction until the broker is back, and the group no
//! longer knows the member by then. idem must rejoin and finish the
//! stream, each new record once in the output, without a restart.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

/// Stops the test's broker however the test ends.
struct Broker(tempfile::TempDir);

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/kafka.sh"))
            .args(["stop", self.0.path().to_str().unwrap()])
            .output();
    }
}

#[test]
fn a_kafka_sink_expelled_during_an_outage_rejoins_and_finishes() {
    let dir = tempfile::Builder::new()
        .prefix("idem-outage-kafka")
        .tempdir()
        .unwrap();
    let broker = Broker(dir);
    let broker_dir = broker.0.path().to_str().unwrap().to_string();
    // This test binary has this one test: the helpers in `common` read the
    // broker's address from here.
    std::env::set_var(
        "IDEM_KAFKA_BOOTSTRAP",
        script("kafka.sh", &["start", &broker_dir]),
    );

    let f = Fixture::with_partitions("outage", 2);
    let out = format!("{}.out", f.topic);
    create_topic(&out, 1);
    let total = 6_000;
    let records: Vec<Rec> = (0..total)
        .map(|n| {
            let partition = n % 2;
            Rec::order(
                partition,
                &format!("K{n}"),
                &format!("ord-{n}"),
                1,
                n as i64,
            )
        })
        .collect();
    produce(&f.topic, &records);
    let ends = end_offsets(&f.topic, 2);

    // Small batches, so that the stream takes several seconds and the
    // outage comes while records are in hand (the fixture's session
    // timeout is 6 s).
    let text = f
        .config_text_with_sink(
            "7d",
            &format!(
                "[sink]\nkind = \"kafka\"\ntopic = \"{out}\"\ntransaction_timeout_ms = 30000\n"
            ),
        )
        .replace("max_records = 200", "max_records = 20");
    let config = f.write_text(&text);
    let log = f.dir.path().join("idem.log");
    let mut idem = Binary::start_logged(&config, "info", &log);
    let progress = || -> i64 {
        try_committed(&f.group, &f.topic, 2)
            .map(|c| c.iter().map(|o| (*o).max(0)).sum())
            .unwrap_or(0)
    };
    wait_for(
        Duration::from_secs(90),
        "the first batches committed",
        || progress() > 0,
    );
    script("kafka.sh", &["stop", &broker_dir]);
    // Longer than the session timeout: the member is gone when the broker
    // is back.
    std::thread::sleep(Duration::from_secs(12));
    script("kafka.sh", &["restart", &broker_dir]);

    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while progress() < ends.iter().sum::<i64>() {
        assert!(
            idem.alive(),
            "idem stopped after the outage: {}",
            idem.stderr()
        );
        assert!(
            std::time::Instant::now() < deadline,
            "no progress after the outage: committed {} of {}; idem's log:\n{}",
            progress(),
            ends.iter().sum::<i64>(),
            idem.stderr()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    idem.stop();

    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for m in read_committed(&out, 1) {
        let key = String::from_utf8(header(&m, "idem.key").expect("idem.key").to_vec()).unwrap();
        *seen.entry(key).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), total as usize, "every record in the output");
    let repeated: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(repeated.is_empty(), "outputs repeated: {repeated:?}");
}
