#![no_main]
//! `cargo fuzz run pipe`: see fuzz/README.md. The logic is in `fanpipe_fuzz::pipe`, so the
//! normal `cargo test` of fanpipe-driver replays every corpus file through it.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    fanpipe_fuzz::pipe(data);
});
