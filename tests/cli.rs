//! The binary's surface: bad config exits with code 2 and names the field;
//! `idem demo --json` prints a summary that adds up.

use std::process::Command;

fn idem(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_idem"))
        .args(args)
        .output()
        .expect("running idem")
}

#[test]
fn shipped_config_is_valid_and_check_config_prints_it_back() {
    let out = idem(&["check-config", "--config", "config/idem.toml"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8(out.stdout).unwrap();
    let again = idem::config::Config::parse(&printed, std::path::Path::new("printed"))
        .expect("check-config prints a valid config");
    assert_eq!(again.kafka.group_id, "idem");
    assert_eq!(
        again.dedup.window,
        std::time::Duration::from_secs(7 * 86_400)
    );
}

#[test]
fn bad_config_exits_2_and_names_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let good = std::fs::read_to_string("config/idem.toml").unwrap();
    let cases = [
        ("window = \"7d\"", "window = \"a week\"", "window"),
        (
            "version_column = \"ver\"",
            "version_column = \"id\"",
            "sink.table.version_column",
        ),
        ("group_id = \"idem\"", "group_id = \"\"", "kafka.group_id"),
        ("[batch]", "[batch]\nmax_recrods = 5", "max_recrods"),
    ];
    for (from, to, field) in cases {
        assert!(good.contains(from), "config/idem.toml lacks `{from}`");
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, good.replace(from, to)).unwrap();
        for command in ["run", "check-config"] {
            let out = idem(&[command, "--config", path.to_str().unwrap()]);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{command} {to}: {stderr}");
            assert!(stderr.contains(field), "{command} {to}: {stderr}");
        }
    }
    let out = idem(&["run", "--config", "/nonexistent/idem.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/idem.toml"));
}

#[test]
fn demo_json_adds_up_and_matches_the_sink() {
    let out = idem(&["demo", "--json"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout.lines().last().expect("one JSON line");
    let v: serde_json::Value = serde_json::from_str(line).expect("JSON summary");
    let n = |k: &str| v[k].as_u64().unwrap_or_else(|| panic!("missing {k}: {v}"));
    let sum = n("applied")
        + n("duplicate")
        + n("conflict")
        + n("stale")
        + n("dead_lettered")
        + n("filtered");
    assert_eq!(sum, n("read"));
    assert_eq!(v["sink_matches_expected"], true);
    assert!(n("duplicate") > 0 && n("conflict") == 1 && n("stale") >= 1);
    assert!(n("dead_lettered") >= 2 && n("filtered") == 1);
    assert_eq!(n("crashes"), 1);
}

/// The compose stack refers only to files that exist, and idem's config in
/// it is valid. (`docker compose config` needs Docker's compose plugin,
/// which the test machines lack.)
#[test]
fn compose_stack_files_exist_and_its_config_is_valid() {
    let compose = std::fs::read_to_string("docker-compose.yml").unwrap();
    for service in [
        "kafka:",
        "postgres:",
        "idem:",
        "producer:",
        "prometheus:",
        "grafana:",
    ] {
        assert!(
            compose.contains(&format!("\n  {service}")),
            "service {service} missing"
        );
    }
    for line in compose.lines() {
        let line = line.trim().trim_start_matches("- ");
        if let Some(path) = line.strip_prefix("./").and_then(|l| l.split(':').next()) {
            assert!(
                std::path::Path::new(path).exists(),
                "docker-compose.yml mounts missing {path}"
            );
        }
    }
    for file in [
        "Dockerfile",
        "deploy/prometheus.yml",
        "deploy/sample-producer.sh",
        "dashboards/provisioning/datasources/prometheus.yml",
        "dashboards/provisioning/dashboards/idem.yml",
    ] {
        assert!(std::path::Path::new(file).exists(), "{file} missing");
    }
    let out = idem(&["check-config", "--config", "config/idem.docker.toml"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
