//! Telemetry against real components: a Prometheus server (Debian's
//! package) scrapes the idem binary while it consumes from the real broker;
//! then every query of the Grafana dashboard must parse and return series,
//! and promtool must accept the exposition.

mod common;

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

/// A Prometheus server on 127.0.0.1, stopped on drop.
struct PrometheusServer {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl PrometheusServer {
    fn start(target_port: u16) -> PrometheusServer {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: idem\n    \
                 static_configs:\n      - targets: ['127.0.0.1:{target_port}']\n"
            ),
        )
        .unwrap();
        let port = free_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "the prometheus binary (Debian package `prometheus`; scripts/setup.sh installs it)",
            );
        PrometheusServer {
            child,
            port,
            _dir: dir,
        }
    }

    /// Runs an instant query; returns the result vector.
    fn query(&self, expr: &str) -> Result<Vec<serde_json::Value>, String> {
        let body = http_get(self.port, &format!("/api/v1/query?query={}", encode(expr)))
            .ok_or("no answer")?;
        let v: serde_json::Value =
            serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        if v["status"] != "success" {
            return Err(format!("query failed: {body}"));
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn dashboard_queries() -> Vec<String> {
    let text = std::fs::read_to_string("dashboards/idem.json").expect("dashboards/idem.json");
    let v: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let queries: Vec<String> = v["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_string))
        .collect();
    assert!(queries.len() >= 10, "the dashboard lost its queries");
    queries
}

#[test]
fn prometheus_scrapes_idem_and_every_dashboard_query_returns_data() {
    let f = Fixture::new("observability");
    let text = f
        .config_text(Mode::Upsert, "7d", "")
        .replace("[log]", "dedup_scan_secs = 1\n\n[log]");
    let config = f.dir.path().join("idem.toml");
    std::fs::write(&config, &text).unwrap();
    let mut bin = Binary::start(&config, None);
    let prometheus = PrometheusServer::start(bin.metrics_port);

    // Traffic for the whole test: new orders, redeliveries, poison.
    let stop = Arc::new(AtomicBool::new(false));
    let producing = {
        let stop = Arc::clone(&stop);
        let topic = f.topic.clone();
        std::thread::spawn(move || {
            let producer = producer();
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) && n < 20_000 {
                let mut batch = Vec::new();
                for _ in 0..20 {
                    let rec = Rec::order(n % 2, &format!("K{n}"), &format!("ord-{n}"), 1, 1);
                    batch.push(rec.clone());
                    if n % 4 == 0 {
                        batch.push(rec);
                    }
                    if n % 10 == 0 {
                        batch.push(Rec::order(n % 2, &format!("P{n}"), "x", 1, 1).with_value(b"{"));
                    }
                    n += 1;
                }
                produce_with(&producer, &topic, &batch);
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };

    // Enough scrapes for rate() over one minute: several samples, lag
    // statistics (every 5 s) and a dedup scan.
    wait_for(Duration::from_secs(90), "Prometheus to scrape idem", || {
        prometheus
            .query("count_over_time(idem_records_read_total[1m]) >= 8")
            .is_ok_and(|r| !r.is_empty())
            && prometheus
                .query("idem_consumer_lag_records")
                .is_ok_and(|r| !r.is_empty())
            && prometheus
                .query("idem_dedup_keys")
                .is_ok_and(|r| !r.is_empty())
    });

    let mut empty = Vec::new();
    for q in dashboard_queries() {
        match prometheus.query(&q) {
            Ok(result) if !result.is_empty() => {}
            Ok(_) => empty.push(format!("no series: {q}")),
            Err(e) => empty.push(format!("{e}: {q}")),
        }
    }
    stop.store(true, Ordering::SeqCst);
    producing.join().unwrap();
    assert!(
        empty.is_empty(),
        "dashboard queries without data:\n{}",
        empty.join("\n")
    );

    // promtool accepts the exposition as it is.
    let exposition = http_get(bin.metrics_port, "/metrics").expect("/metrics");
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package `prometheus`)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // /healthz and /readyz.
    assert_eq!(
        http_get(bin.metrics_port, "/healthz").as_deref(),
        Some("ok\n")
    );
    assert_eq!(
        http_get(bin.metrics_port, "/readyz").as_deref(),
        Some("ready\n")
    );
    assert!(bin.stop().success());
}

/// /readyz says 503 while the sink is locked, and ready again after.
#[test]
fn readyz_follows_the_sink() {
    let f = Fixture::new("readyz");
    let config = f.write_config(Mode::Upsert, "7d");
    let mut bin = Binary::start(&config, None);
    wait_for(Duration::from_secs(60), "idem to be ready", || {
        http_get(bin.metrics_port, "/readyz").as_deref() == Some("ready\n")
    });
    let conn = rusqlite::Connection::open(f.sink_path()).unwrap();
    conn.execute_batch("BEGIN IMMEDIATE").unwrap();
    produce(&f.topic, &[Rec::order(0, "K1", "ord-1", 1, 1)]);
    wait_for(
        Duration::from_secs(60),
        "/readyz to report the sink",
        || http_get(bin.metrics_port, "/readyz").is_some_and(|b| b.contains("sink")),
    );
    conn.execute_batch("COMMIT").unwrap();
    f.wait_committed(&[1, -1]);
    wait_for(Duration::from_secs(30), "ready again", || {
        http_get(bin.metrics_port, "/readyz").as_deref() == Some("ready\n")
    });
    assert!(bin.stop().success());
}
