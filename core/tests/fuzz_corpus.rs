//! Replays every file of `fuzz/corpus/<target>/` through its fuzz target's logic, so the
//! normal `cargo test` keeps every input the fuzzers were seeded with or found.
//!
//! The logic lives in `fuzz/src/lib.rs` (fanpipe-core and std only), included here.

#[allow(dead_code)]
#[path = "../../fuzz/src/lib.rs"]
mod targets;

#[path = "../../fuzz/src/multipart.rs"]
mod multipart_target;

use std::path::PathBuf;

/// Corpus files that show a core bug not fixed yet, as (target, file name): the normal
/// replay tolerates the bug's symptom (see `KNOWN BUG` in fuzz/src/lib.rs), and
/// `known_bugs_still_fail_only_as_known` replays them strictly and says whether they
/// still fail. (The one found so far, `head/crash-line-limit-split`, is fixed.)
const KNOWN_BUGS: &[(&str, &str)] = &[];

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

/// Runs every file through `f`; `strict` replays the known-bug files strictly and skips
/// the rest.
fn replay(target: &str, f: fn(&[u8], bool), strict: bool) {
    let mut failed = Vec::new();
    let mut ran = 0;
    for (name, data) in corpus(target) {
        let known = KNOWN_BUGS.iter().any(|(t, n)| *t == target && *n == name);
        if strict && !known {
            continue;
        }
        ran += 1;
        let r = std::panic::catch_unwind(|| f(&data, !strict));
        if r.is_err() {
            failed.push(name);
        }
    }
    assert!(
        failed.is_empty(),
        "{target}: corpus files failed: {failed:?}"
    );
    eprintln!("{target}: {ran} corpus files replayed");
}

#[test]
fn head_corpus() {
    replay("head", targets::head, false);
}

#[test]
fn chunked_corpus() {
    replay("chunked", targets::chunked, false);
}

#[test]
fn pipe_corpus() {
    replay("pipe", targets::pipe, false);
}

#[test]
fn multipart_corpus() {
    replay(
        "multipart",
        |data, _| multipart_target::multipart(data),
        false,
    );
}

/// Replays strictly the corpus files of known, unfixed core bugs (none at the moment).
#[test]
fn known_bugs_still_fail_only_as_known() {
    for target in ["head", "chunked", "pipe"] {
        if KNOWN_BUGS.iter().any(|(t, _)| *t == target) {
            let f = match target {
                "head" => targets::head,
                "chunked" => targets::chunked,
                _ => targets::pipe,
            };
            let r = std::panic::catch_unwind(|| replay(target, f, true));
            eprintln!(
                "{target}: known bugs {}",
                if r.is_err() {
                    "still fail"
                } else {
                    "pass now: remove them from KNOWN_BUGS"
                }
            );
        }
    }
}
