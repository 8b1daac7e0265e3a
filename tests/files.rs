//! The files sink against the real broker: one file per entity, atomic
//! replacement with a backup, no-op for identical content, the version
//! guard, and SIGKILL in the middle of a batch and after the write.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::Duration;

use common::*;
use idem::config::Config;
use idem::outcome::Outcome;

fn files_sink(f: &Fixture, mode: &str) -> String {
    let dir = f.dir.path().join("out");
    match mode {
        "upsert" => format!(
            "[sink]\nkind = \"files\"\ndir = \"{}\"\nmode = \"upsert\"\nkey_from = \"/id\"\n\
             version_from = \"/ver\"\n",
            dir.display()
        ),
        _ => format!(
            "[sink]\nkind = \"files\"\ndir = \"{}\"\nmode = \"insert\"\n",
            dir.display()
        ),
    }
}

fn read(f: &Fixture, name: &str) -> Option<String> {
    std::fs::read_to_string(f.dir.path().join("out").join(name)).ok()
}

fn json_files(f: &Fixture) -> usize {
    std::fs::read_dir(f.dir.path().join("out"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn files_sink_writes_each_entity_once_and_keeps_a_backup() {
    let f = Fixture::new("files");
    produce(
        &f.topic,
        &[
            Rec::order(0, "A1", "ord-1", 1, 1),
            // The same event redelivered, re-serialised.
            Rec::order(0, "A1", "ord-1", 1, 1)
                .with_value(b"{ \"qty\":1, \"ver\":1, \"id\":\"ord-1\" }"),
            Rec::order(0, "A2", "ord-1", 2, 2),
            // Late: older than the file.
            Rec::order(0, "A0", "ord-1", 1, 9),
            Rec::order(1, "B1", "ord-2", 1, 5),
        ],
    );
    let text = f.config_text_with_sink("7d", &files_sink(&f, "upsert"));
    let run = Running::start(Config::parse(&text, Path::new("files.toml")).unwrap());
    run.wait_read(5);
    f.wait_committed(&[4, 1]);
    assert_eq!(run.count(Outcome::Applied), 3);
    assert_eq!(run.count(Outcome::Duplicate), 1);
    assert_eq!(run.count(Outcome::Stale), 1);
    run.assert_outcomes_add_up();
    run.stop();
    assert_eq!(
        read(&f, "ord-1.json").as_deref(),
        Some("{\"id\":\"ord-1\",\"qty\":2,\"ver\":2}\n")
    );
    assert_eq!(
        read(&f, "ord-1.json.bak").as_deref(),
        Some("{\"id\":\"ord-1\",\"qty\":1,\"ver\":1}\n")
    );
    assert_eq!(
        read(&f, "ord-2.json").as_deref(),
        Some("{\"id\":\"ord-2\",\"qty\":5,\"ver\":1}\n")
    );
    assert_eq!(json_files(&f), 2);
}

#[test]
fn sigkill_during_file_writes() {
    for mode in ["upsert", "insert"] {
        for point in ["mid-sink-batch", "after-sink-write"] {
            let f = Fixture::new(&format!("files-kill-{mode}-{point}"));
            produce(
                &f.topic,
                &(0..4)
                    .map(|n| Rec::order(0, &format!("K{n}"), &format!("ord-{n}"), 1, n))
                    .collect::<Vec<_>>(),
            );
            let config = f.write_text(&f.config_text_with_sink("7d", &files_sink(&f, mode)));
            let mut bin = Binary::start(&config, Some(point));
            let status = bin.wait(Duration::from_secs(90));
            assert_eq!(status.signal(), Some(libc::SIGKILL), "{mode} {point}");
            let mut bin = Binary::start(&config, None);
            f.wait_committed(&[4, -1]);
            assert!(bin.stop().success());
            assert_eq!(json_files(&f), 4, "{mode} {point}");
            let name = if mode == "upsert" {
                "ord-3.json"
            } else {
                "K3.json"
            };
            assert_eq!(
                read(&f, name).as_deref(),
                Some("{\"id\":\"ord-3\",\"qty\":3,\"ver\":1}\n"),
                "{mode} {point}"
            );
            let tmp = std::fs::read_dir(f.dir.path().join("out"))
                .unwrap()
                .filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
                .count();
            assert_eq!(tmp, 0, "temporary files are cleaned up at start");
        }
    }
}
