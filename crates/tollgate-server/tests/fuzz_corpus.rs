//! Replays the kept fuzz corpus (`fuzz/corpus/<target>/`, grown and minimized by `fuzz/run.sh`)
//! through the fuzz targets' own entry functions, so every input the fuzzer kept, and every
//! crash it found, keeps passing without the fuzzer (docs/RELIABILITY.md, "Coverage-guided
//! fuzzing").

#![allow(clippy::expect_used, reason = "test code: the replay helper and the fuzz targets, where a panic is a finding")]

#[path = "../../../fuzz/src/targets.rs"]
mod targets;

use std::path::Path;

fn replay(name: &str) {
    let (_, target) = targets::TARGETS.iter().find(|(n, _)| *n == name).expect("a target of that name");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus").join(name);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|f| f.expect("a directory entry").path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} holds no corpus", dir.display());
    for file in files {
        let data = std::fs::read(&file).expect("a corpus file");
        if std::panic::catch_unwind(|| target(&data)).is_err() {
            panic!("{name}: {} fails (see the panic above)", file.display());
        }
    }
}

#[test]
fn anthropic_sse() {
    replay("anthropic_sse");
}

#[test]
fn openai_sse() {
    replay("openai_sse");
}

#[test]
fn json_usage() {
    replay("json_usage");
}

#[test]
fn request_bound() {
    replay("request_bound");
}

#[test]
fn config() {
    replay("config");
}

#[test]
fn price_file() {
    replay("price_file");
}

#[test]
fn events() {
    replay("events");
}

#[test]
fn every_target_is_replayed() {
    let names: Vec<&str> = targets::TARGETS.iter().map(|(n, _)| *n).collect();
    assert_eq!(names, ["anthropic_sse", "openai_sse", "json_usage", "request_bound", "config", "price_file", "events"]);
}
