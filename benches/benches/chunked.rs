//! Chunked body decoding: GB/s of body data out of `BodyDecoder::decode`.
//!
//! A 16 MiB body in chunks of 1 MiB and 16 KiB (what curl and most clients send) and of
//! 64 B (a client writing tiny pieces): the first two show the decoder costs next to
//! nothing per data byte, the last its cost per chunk (framing is decoded byte by byte).
//! `decode` only hands back ranges; the `copy` variants also move the data out, as the
//! pipe does into its buffer, so the framing cost can be seen next to a memcpy.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use fanpipe_core::chunked::{encode, BodyDecoder};
use fanpipe_core::request::Framing;

const BODY: usize = 16 << 20;

/// Decodes all of `wire`; `out` gets the data when given. Returns the data length.
fn decode_all(wire: &[u8], mut out: Option<&mut Vec<u8>>) -> usize {
    let mut d = BodyDecoder::new(Framing::Chunked);
    let mut rest = wire;
    let mut data = 0;
    while !d.is_done() {
        let step = d.decode(rest).expect("a valid body");
        let piece = &rest[step.data];
        data += piece.len();
        match out.as_deref_mut() {
            Some(out) => out.extend_from_slice(piece),
            None => {
                black_box(piece);
            }
        }
        rest = &rest[step.consumed..];
    }
    data
}

fn chunked(c: &mut Criterion) {
    let body: Vec<u8> = (0..BODY).map(|i| (i * 7) as u8).collect();
    let mut out = Vec::with_capacity(BODY);
    let mut g = c.benchmark_group("chunked");
    g.throughput(Throughput::Bytes(BODY as u64));
    for (label, size) in [("1MiB", 1 << 20), ("16KiB", 16 << 10), ("64B", 64)] {
        let wire = encode(&body, &[size]);
        assert_eq!(decode_all(&wire, None), BODY);
        g.bench_function(BenchmarkId::new("decode", label), |b| {
            b.iter(|| decode_all(black_box(&wire), None))
        });
        g.bench_function(BenchmarkId::new("copy", label), |b| {
            b.iter(|| {
                out.clear();
                decode_all(black_box(&wire), Some(&mut out))
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20);
    targets = chunked
}
criterion_main!(benches);
