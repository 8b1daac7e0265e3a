//! Security against the real broker and the real binary: idem consumes and
//! dead-letters through a SASL_PLAINTEXT listener with SCRAM-SHA-256; a
//! wrong password fails clearly and never hangs a stop; the password shows
//! in no log line (at debug, librdkafka's own debug included) nor in
//! `idem check-config`; the metrics server binds 127.0.0.1 by default;
//! table and column names that try SQL injection are refused.
//!
//! The SCRAM listener and its user come from `scripts/kafka.sh`, exported
//! by `scripts/test.sh` as `IDEM_KAFKA_SASL_BOOTSTRAP`,
//! `IDEM_KAFKA_SASL_USER` and `IDEM_KAFKA_SASL_PASSWORD`.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{
    bootstrap, committed, header, http_get, produce, read_all, wait_for, Binary, Fixture, Mode, Rec,
};
use rdkafka::Message;

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: these tests need the SCRAM listener that scripts/kafka.sh \
             starts; run the suites with scripts/test.sh"
        )
    })
}

struct Sasl {
    bootstrap: String,
    user: String,
    password: String,
}

fn sasl() -> Sasl {
    let s = Sasl {
        bootstrap: env("IDEM_KAFKA_SASL_BOOTSTRAP"),
        user: env("IDEM_KAFKA_SASL_USER"),
        password: env("IDEM_KAFKA_SASL_PASSWORD"),
    };
    assert_ne!(
        s.bootstrap,
        bootstrap(),
        "the SASL listener is a listener of its own"
    );
    assert!(
        s.password.len() >= 12,
        "the test password is long enough to spot"
    );
    s
}

/// The fixture's config, pointed at the SCRAM listener with `password`.
/// librdkafka's own security, broker and config debug output is on, so
/// that a leak from librdkafka would show too.
fn sasl_config(f: &Fixture, user: &str, password: &str) -> PathBuf {
    let text = f.config_text(Mode::Upsert, "7d", "");
    let plain = format!("bootstrap_servers = \"{}\"", bootstrap());
    assert!(text.contains(&plain));
    let text = text.replace(
        &plain,
        &format!(
            "bootstrap_servers = \"{}\"\n\
             properties = {{ \"security.protocol\" = \"SASL_PLAINTEXT\", \
             \"sasl.mechanisms\" = \"SCRAM-SHA-256\", \"sasl.username\" = \"{user}\", \
             \"sasl.password\" = \"{password}\", \"debug\" = \"security,broker,conf\" }}",
            sasl().bootstrap
        ),
    );
    f.write_text(&text)
}

fn idem(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_idem"))
        .args(args)
        .env("RUST_LOG", "debug")
        .output()
        .expect("running idem")
}

fn assert_not_in(secret: &str, what: &str, text: &str) {
    assert!(!secret.is_empty());
    if let Some(at) = text.find(secret) {
        let from = text[..at].rfind('\n').map_or(0, |i| i + 1);
        let line = text[from..].lines().next().unwrap_or_default();
        panic!(
            "{what} shows the secret: {}",
            line.replace(secret, "<THE SECRET>")
        );
    }
}

/// idem joins, consumes, writes its dead letters and commits, all through
/// the SCRAM listener (the config names no other address); the password is
/// in no log line, librdkafka's debug output included.
#[test]
fn consumes_and_dead_letters_through_sasl_scram() {
    let s = sasl();
    let f = Fixture::new("sasl");
    // A value that tries SQL injection is data: bound, stored verbatim.
    let injection = "ord-3'); DROP TABLE orders; --";
    produce(
        &f.topic,
        &[
            Rec::order(0, "S1", "ord-1", 1, 1),
            Rec::order(0, "S2", "ord-2", 1, 2).with_value(b"{\"id\":\"ord-2\""),
            Rec::order(1, "S3", injection, 1, 3).with_value(
                serde_json::json!({"id": injection, "ver": 1, "qty": 3})
                    .to_string()
                    .as_bytes(),
            ),
            Rec::order(0, "S4", "ord-4", 1, 4),
        ],
    );
    let config = sasl_config(&f, &s.user, &s.password);
    let mut run = Binary::start_logged(&config, "debug", &f.dir.path().join("idem.stderr"));

    let deadline = Instant::now() + Duration::from_secs(90);
    while f.committed() != [3, 1] {
        assert!(run.alive(), "idem exited:\n{}", run.stderr());
        assert!(
            Instant::now() < deadline,
            "committed {:?}, expected [3, 1]",
            f.committed()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let ready = http_get(run.metrics_port, "/readyz").unwrap_or_default();
    assert_eq!(ready.trim(), "ready");
    assert!(run.stop_within(Duration::from_secs(60)).success());

    let rows = f.rows();
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert_eq!(rows[injection], (1, 3));
    assert_eq!(rows["ord-4"], (1, 4));
    let letters = read_all(&f.dead_letter_topic, 1);
    assert_eq!(letters.len(), 1);
    assert_eq!(
        header(&letters[0], "idem.reason"),
        Some(&b"invalid-json"[..])
    );
    assert_eq!(letters[0].payload(), Some(&b"{\"id\":\"ord-2\""[..]));

    let log = run.stderr();
    assert!(
        log.contains(&format!("sasl_plaintext://{}", s.bootstrap)),
        "the log does not show the SASL listener in use"
    );
    assert!(
        log.contains("SCRAM-SHA-256"),
        "librdkafka's security debug output is missing; the leak check would be blind"
    );
    assert!(!log.contains("Authentication failed"), "{log}");
    assert_not_in(&s.password, "idem's log at debug", &log);
}

/// A wrong password: idem says so at error level within seconds, is not
/// ready, commits and applies nothing, stops at once on SIGTERM, and names
/// neither password. `idem replay` fails with exit 1 instead of hanging.
#[test]
fn wrong_password_fails_clearly_and_never_hangs() {
    let s = sasl();
    let f = Fixture::new("sasl-wrong");
    produce(&f.topic, &[Rec::order(0, "W1", "ord-1", 1, 1)]);
    let wrong = format!("{}Wrong", s.password);
    let config = sasl_config(&f, &s.user, &wrong);
    let mut run = Binary::start_logged(&config, "debug", &f.dir.path().join("idem.stderr"));

    wait_for(
        Duration::from_secs(30),
        "an error-level authentication failure in the log",
        || {
            run.stderr().lines().any(|l| {
                l.contains("ERROR")
                    && l.contains("SASL authentication error")
                    && l.contains("invalid credentials")
            })
        },
    );
    assert!(run.alive(), "{}", run.stderr());
    let ready = http_get(run.metrics_port, "/readyz").unwrap_or_default();
    assert!(ready.contains("not ready"), "{ready}");
    assert_eq!(committed(&f.group, &f.topic, 2), vec![-1, -1]);
    let started = Instant::now();
    let status = run.stop_within(Duration::from_secs(30));
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "stopping took {:?}",
        started.elapsed()
    );
    assert!(status.code().is_some(), "killed by a signal: {status:?}");
    assert!(
        !f.sink_path().exists() || f.rows().is_empty(),
        "a row was written"
    );
    let log = run.stderr();
    assert_not_in(&wrong, "idem's log", &log);
    assert_not_in(&s.password, "idem's log", &log);

    // A one-shot command gives up with an error, not a hang.
    let started = Instant::now();
    let out = idem(&[
        "replay",
        "--config",
        config.to_str().unwrap(),
        "--topic",
        &f.topic,
        "--to-earliest",
        "--dry-run",
    ]);
    assert!(started.elapsed() < Duration::from_secs(90));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    for text in [&out.stdout, &out.stderr] {
        let text = String::from_utf8_lossy(text);
        assert_not_in(&wrong, "idem replay", &text);
    }
}

/// `idem check-config` (and a config error) never print a secret: Kafka
/// SASL and TLS passwords, a PostgreSQL URL's password, an HTTP
/// Authorization header.
#[test]
fn check_config_and_config_errors_never_print_secrets() {
    let f = Fixture::new("secrets");
    let secrets = [
        "Sasl-Pass-3b1f0c",
        "Key-Pass-9d2e7a",
        "Keystore-Secret-5c8b",
        "Pg-Pass-7e4d2a",
        "Bearer-Token-1a9f",
    ];
    let kafka = format!(
        "properties = {{ \"security.protocol\" = \"SASL_PLAINTEXT\", \
         \"sasl.mechanisms\" = \"SCRAM-SHA-256\", \"sasl.username\" = \"idem\", \
         \"sasl.password\" = \"{}\", \"ssl.key.password\" = \"{}\", \
         \"ssl.keystore.password\" = \"{}\" }}",
        secrets[0], secrets[1], secrets[2]
    );
    let sqlite = f.config_text(Mode::Upsert, "7d", "");
    let postgres = f.config_text_with_sink(
        "7d",
        &format!(
            "[sink]\nkind = \"postgres\"\nurl = \"postgresql://idem:{}@127.0.0.1:1/orders\"\n\n\
             [sink.table]\nname = \"orders\"\nmode = \"upsert\"\nkey_column = \"id\"\n\
             version_column = \"ver\"\ncolumns = {{ id = \"/id\", ver = \"/ver\" }}\n",
            secrets[3]
        ),
    );
    let http = f.config_text_with_sink(
        "7d",
        &format!(
            "[sink]\nkind = \"http\"\nurl = \"http://127.0.0.1:1/orders/{{key}}\"\n\
             headers = {{ Authorization = \"Bearer {}\" }}\n",
            secrets[4]
        ),
    );
    let session = "session_timeout_ms = 6000";
    for base in [sqlite, postgres, http] {
        let text = base.replace(session, &format!("{session}\n{kafka}"));
        let path = f.write_text(&text);
        let out = idem(&["check-config", "--config", path.to_str().unwrap()]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("<redacted>"), "{stdout}");
        for secret in secrets {
            assert_not_in(secret, "check-config's output", &stdout);
            assert_not_in(
                secret,
                "check-config's log",
                &String::from_utf8_lossy(&out.stderr),
            );
        }

        // The same file with an error on the secret's own line.
        let broken = text.replace(
            &format!("\"{}\" }}", secrets[2]),
            &format!("\"{}\", \"x\" = 1 }}", secrets[2]),
        );
        assert_ne!(broken, text);
        let path = f.write_text(&broken);
        for command in ["check-config", "run"] {
            let out = idem(&[command, "--config", path.to_str().unwrap()]);
            assert_eq!(out.status.code(), Some(2), "{out:?}");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(stderr.contains("kafka.properties"), "{stderr}");
            for secret in secrets {
                assert_not_in(secret, "a config error", &stderr);
                assert_not_in(
                    secret,
                    "a config error",
                    &String::from_utf8_lossy(&out.stdout),
                );
            }
        }
    }
}

/// With no `[metrics]` section, idem serves /metrics on 127.0.0.1:9464
/// only: `check-config` says so, and the running binary (in a network
/// namespace of its own, so that the fixed port is free) listens on
/// 127.0.0.1 and on no wildcard or IPv6 address.
#[test]
fn metrics_server_binds_loopback_by_default() {
    let f = Fixture::new("metrics-default");
    let text = f.config_text(Mode::Upsert, "7d", "");
    let start = text.find("[metrics]").unwrap();
    let end = start + text[start..].find("\n\n").unwrap();
    let path = f.write_text(&format!("{}{}", &text[..start], &text[end..]));
    assert!(!std::fs::read_to_string(&path).unwrap().contains("listen"));

    let out = idem(&["check-config", "--config", path.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains("listen = \"127.0.0.1:9464\""), "{printed}");

    // A network namespace with only its own loopback: nothing can reach
    // idem there, and port 9464 is free whatever runs on this machine.
    // Its loopback starts down; python3 (which scripts/setup.sh installs)
    // brings it up with SIOCGIFFLAGS/SIOCSIFFLAGS, as `ip link set lo up`
    // would.
    let lo_up = "import fcntl, socket, struct; s = socket.socket(); \
                 q = struct.pack('16sh', b'lo', 0); \
                 f = struct.unpack('16sh', fcntl.ioctl(s, 0x8913, q))[1]; \
                 fcntl.ioctl(s, 0x8914, struct.pack('16sh', b'lo', f | 1))";
    let stderr = f.dir.path().join("idem.stderr");
    let mut child = Command::new("unshare")
        .arg("--net")
        .arg("sh")
        .arg("-c")
        .arg(format!(
            "python3 -c \"{lo_up}\" && exec \"$0\" run --config \"$1\""
        ))
        .arg(env!("CARGO_BIN_EXE_idem"))
        .arg(&path)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .expect("unshare (util-linux) runs idem in a network namespace of its own");
    let pid = child.id();
    let listeners = |file: &str| -> Vec<String> {
        std::fs::read_to_string(format!("/proc/{pid}/net/{file}"))
            .unwrap_or_default()
            .lines()
            .skip(1)
            .filter_map(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                (cols.get(3) == Some(&"0A")).then(|| cols[1].to_string())
            })
            .collect()
    };
    let loopback_9464 = "0100007F:24F8";
    let deadline = Instant::now() + Duration::from_secs(30);
    while !listeners("tcp").iter().any(|l| l == loopback_9464) {
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "idem in its namespace exited ({status}):\n{}",
                std::fs::read_to_string(&stderr).unwrap()
            );
        }
        assert!(
            Instant::now() < deadline,
            "no listener on 127.0.0.1:9464 (tcp: {:?})",
            listeners("tcp")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let tcp = listeners("tcp");
    let tcp6 = listeners("tcp6");
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(tcp, vec![loopback_9464.to_string()], "IPv4 listeners");
    assert!(tcp6.is_empty(), "IPv6 listeners: {tcp6:?}");
}

/// Table and column names come from the config and end up in SQL: a name
/// that tries injection is refused with exit code 2, naming the field,
/// before idem touches the database.
#[test]
fn sql_injection_in_table_and_column_names_is_refused() {
    let f = Fixture::new("sql-names");
    let attempts = [
        "orders; DROP TABLE orders",
        "orders\" (x int); --",
        "o'rders",
        "orders--",
        "x)",
        "a b",
        "ord\u{0}ers",
        "1orders",
        "",
    ];
    let table = |name: &str, key: &str, version: &str, qty: &str, payload: &str| {
        format!(
            "[sink.table]\nname = {}\nmode = \"upsert\"\nkey_column = {}\n\
             version_column = {}\ncolumns = {{ {} = \"/id\", {} = \"/ver\", {} = \"/qty\" }}\n\
             payload_column = {}\n",
            toml_string(name),
            toml_string(key),
            toml_string(version),
            toml_string(key),
            toml_string(version),
            toml_string(qty),
            toml_string(payload),
        )
    };
    let ok = ["orders", "id", "ver", "qty", "payload"];
    let fields = [
        "sink.table.name",
        "sink.table.key_column",
        "sink.table.version_column",
        "sink.table.columns",
        "sink.table.payload_column",
    ];
    let sqlite = |t: &str| {
        format!(
            "[sink]\nkind = \"sqlite\"\npath = \"{}\"\n\n{t}",
            f.sink_path().display()
        )
    };
    let postgres = |t: &str| {
        format!("[sink]\nkind = \"postgres\"\nurl = \"postgresql://idem@127.0.0.1:1/x\"\n\n{t}")
    };

    // The valid names pass, so that each refusal below is the name's doing.
    let good = table(ok[0], ok[1], ok[2], ok[3], ok[4]);
    for sink in [sqlite(&good), postgres(&good)] {
        let path = f.write_text(&f.config_text_with_sink("7d", &sink));
        let out = idem(&["check-config", "--config", path.to_str().unwrap()]);
        assert!(out.status.success(), "{out:?}");
    }

    for attempt in attempts {
        for (i, field) in fields.iter().enumerate() {
            let mut names = ok;
            names[i] = attempt;
            let t = table(names[0], names[1], names[2], names[3], names[4]);
            for sink in [sqlite(&t), postgres(&t)] {
                let path = f.write_text(&f.config_text_with_sink("7d", &sink));
                for command in ["check-config", "run"] {
                    let out = idem(&[command, "--config", path.to_str().unwrap()]);
                    let stderr = String::from_utf8_lossy(&out.stderr);
                    assert_eq!(
                        out.status.code(),
                        Some(2),
                        "{command}: {field} = {attempt:?} was accepted: {stderr}"
                    );
                    // Names that collide with the other columns' checks are
                    // refused by those first; all name the table section.
                    assert!(
                        stderr.contains(field) || stderr.contains("sink.table"),
                        "{command}: {field} = {attempt:?}: {stderr}"
                    );
                }
                assert!(
                    !f.sink_path().exists(),
                    "{field} = {attempt:?}: the database was opened"
                );
            }
        }
    }
}

/// A TOML basic string holding `s` exactly.
fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
