//! The broadcast buffer alone: GB/s of bytes delivered (bytes x receivers).
//!
//! Each round the writer fills the free space at the write position from a prepared
//! block (the memcpy a socket read does), commits it, and every receiver takes its
//! readable slices and consumes them whole (a socket write that took everything, which
//! copies nothing here). Writes of a whole 1 MiB ring and of 64 KiB (one busy socket
//! read) show how the per-round cost, which grows with the receivers, compares to the
//! one copy per byte.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use fanpipe_core::broadcast::Broadcast;

/// Bytes written per iteration.
const PAYLOAD: usize = 16 << 20;
/// The core's default pipe buffer.
const CAPACITY: usize = 1 << 20;

/// Moves `PAYLOAD` bytes through `b` to all its receivers, `write` bytes at most per round.
fn transfer(b: &mut Broadcast, block: &[u8], receivers: usize, write: usize) -> u64 {
    let mut left = PAYLOAD;
    let mut delivered = 0u64;
    while left > 0 {
        let space = b.writable();
        let k = space.len().min(left).min(write);
        space[..k].copy_from_slice(&block[..k]);
        b.commit(k);
        left -= k;
        for r in 0..receivers {
            let (x, y) = b.readable(r, u64::MAX);
            let n = (x.len() + y.len()) as u64;
            black_box((x, y));
            b.consume(r, n);
            delivered += n;
        }
    }
    delivered
}

fn broadcast(c: &mut Criterion) {
    let block: Vec<u8> = (0..CAPACITY).map(|i| (i * 7) as u8).collect();
    let mut g = c.benchmark_group("broadcast");
    for receivers in [1, 30, 1000] {
        g.throughput(Throughput::Bytes((PAYLOAD * receivers) as u64));
        for (label, write) in [("write=1MiB", CAPACITY), ("write=64KiB", 64 << 10)] {
            let id = BenchmarkId::new(label, format!("n={receivers}"));
            g.bench_function(id, |bench| {
                bench.iter(|| {
                    // A fresh buffer per transfer, as each pipe makes one.
                    let mut b = Broadcast::new(CAPACITY, receivers);
                    let delivered = transfer(&mut b, &block, receivers, write);
                    debug_assert_eq!(delivered, (PAYLOAD * receivers) as u64);
                    delivered
                })
            });
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20);
    targets = broadcast
}
criterion_main!(benches);
