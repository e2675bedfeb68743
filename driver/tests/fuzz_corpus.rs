//! Replays every file of `fuzz/corpus/<target>/` through its fuzz target's logic, so the
//! normal `cargo test` keeps every input the fuzzers were seeded with or found. The
//! `pipe` target runs the real driver (see `fuzz/src/world`).
//!
//! The logic lives in `fuzz/src/lib.rs` (fanpipe-core, fanpipe-driver and std only),
//! included here.

#[allow(dead_code)]
#[path = "../../fuzz/src/lib.rs"]
mod targets;

#[path = "../../fuzz/src/multipart.rs"]
mod multipart_target;

use std::path::PathBuf;

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no corpus in {}", dir.display());
    files
        .into_iter()
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect()
}

/// Runs every file through `f`; names the files that fail.
fn replay(target: &str, f: fn(&[u8])) {
    let mut failed = Vec::new();
    let files = corpus(target);
    for (name, data) in &files {
        if std::panic::catch_unwind(|| f(data)).is_err() {
            failed.push(name.clone());
        }
    }
    assert!(
        failed.is_empty(),
        "{target}: corpus files failed: {failed:?}"
    );
    eprintln!("{target}: {} corpus files replayed", files.len());
}

#[test]
fn head_corpus() {
    replay("head", targets::head);
}

#[test]
fn chunked_corpus() {
    replay("chunked", targets::chunked);
}

#[test]
fn pipe_corpus() {
    replay("pipe", targets::pipe);
}

#[test]
fn multipart_corpus() {
    replay("multipart", multipart_target::multipart);
}
