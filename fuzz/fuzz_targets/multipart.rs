#![no_main]
//! `cargo fuzz run multipart`: the form decoder of `POST /NAME?form` (see fuzz/README.md).
//! The logic is in `fuzz/src/multipart.rs`, which the normal `cargo test` of fanpipe-core
//! also runs over every file of `fuzz/corpus/multipart/`.

use libfuzzer_sys::fuzz_target;

#[path = "../src/multipart.rs"]
mod logic;

fuzz_target!(|data: &[u8]| {
    logic::multipart(data);
});
