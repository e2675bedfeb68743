//! Request heads per second, through the API the backends use.
//!
//! `head/reader` reuses one `HeadReader` (a keep-alive connection's next request);
//! `head/conn` builds a `Conn` per request and takes its `PipeRequest` (a new connection:
//! buffers, parse, `interpret`). Each head is fed whole, in 16-byte reads and (for the
//! reader) one byte at a time: the per-request cost should grow with the number of reads,
//! never with the square of the head's length, since the reader never re-scans.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use fanpipe_core::conn::{Action, Conn};
use fanpipe_core::head::HeadReader;
use fanpipe_core::Config;

/// What `curl -T file http://host/mypipe?n=3` sends (curl 8 adds the Expect for big files).
const PUT: &[u8] =
    b"PUT /mypipe?n=3 HTTP/1.1\r\nHost: localhost:8080\r\nUser-Agent: curl/8.5.0\r\n\
Accept: */*\r\nContent-Length: 104857600\r\nExpect: 100-continue\r\n\r\n";

/// What `curl http://host/mypipe?n=3` sends.
const GET: &[u8] =
    b"GET /mypipe?n=3 HTTP/1.1\r\nHost: localhost:8080\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n";

/// A browser-sized head of about 4 KiB: long lines make a re-scan, if any, show.
fn large_get() -> Vec<u8> {
    let mut head = GET[..GET.len() - 2].to_vec();
    head.extend_from_slice(b"Cookie: ");
    head.extend_from_slice(&[b'c'; 2000]);
    head.extend_from_slice(b"\r\n");
    for i in 0..30 {
        head.extend_from_slice(format!("X-Extra-{i}: {}\r\n", "v".repeat(40)).as_bytes());
    }
    head.extend_from_slice(b"\r\n");
    head
}

/// Copies `head` into the lent buffers `piece` bytes at a time, as reads would.
fn feed_reader(r: &mut HeadReader, head: &[u8], piece: usize) {
    let mut rest = head;
    while !rest.is_empty() {
        let space = r.space();
        let k = space.len().min(rest.len()).min(piece);
        space[..k].copy_from_slice(&rest[..k]);
        r.fill(k);
        rest = &rest[k..];
    }
}

fn feed_conn(c: &mut Conn, head: &[u8], piece: usize, now: Instant) {
    let mut rest = head;
    while !rest.is_empty() {
        let buf = c.read_buf();
        let k = buf.len().min(rest.len()).min(piece);
        buf[..k].copy_from_slice(&rest[..k]);
        c.handle_read(k, now);
        rest = &rest[k..];
    }
}

/// (label, piece size) for the ways a head is split into reads.
const SPLITS: &[(&str, usize)] = &[("whole", usize::MAX), ("16B", 16), ("1B", 1)];

fn reader(c: &mut Criterion) {
    let large = large_get();
    let heads: [(&str, &[u8]); 3] = [("put", PUT), ("get", GET), ("large-4KiB", &large)];
    let config = Config::default();
    let mut g = c.benchmark_group("head/reader");
    g.throughput(Throughput::Elements(1));
    for (name, head) in heads {
        for &(split, piece) in SPLITS {
            let mut r = HeadReader::new(
                config.max_request_line,
                config.max_head_size,
                config.max_headers,
            );
            g.bench_function(BenchmarkId::new(name, split), |b| {
                b.iter(|| {
                    feed_reader(&mut r, black_box(head), piece);
                    let parsed = r.poll_head().expect("a whole head").expect("a valid head");
                    black_box(parsed)
                })
            });
        }
    }
    g.finish();
}

fn conn(c: &mut Criterion) {
    let config = Config::default();
    let now = Instant::now();
    let mut g = c.benchmark_group("head/conn");
    g.throughput(Throughput::Elements(1));
    for (name, head) in [("put", PUT), ("get", GET)] {
        // One byte at a time is covered by head/reader; here the per-connection cost matters.
        for &(split, piece) in &SPLITS[..2] {
            g.bench_function(BenchmarkId::new(name, split), |b| {
                b.iter(|| {
                    let mut c = Conn::new(&config, now);
                    feed_conn(&mut c, black_box(head), piece, now);
                    assert_eq!(c.poll_action(), Action::Pipe);
                    black_box(c.take_pipe_request())
                })
            });
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(50);
    targets = reader, conn
}
criterion_main!(benches);
