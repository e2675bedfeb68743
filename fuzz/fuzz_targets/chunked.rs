#![no_main]
//! `cargo fuzz run chunked`: see fuzz/README.md. The logic is in `fanpipe_fuzz::chunked`, so the
//! normal `cargo test` of fanpipe-driver replays every corpus file through it.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    fanpipe_fuzz::chunked(data);
});
