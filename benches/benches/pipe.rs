//! The core's whole data path for one transfer to `n` receivers, with no sockets: GB/s of
//! bytes delivered (body bytes x receivers).
//!
//! A `Pipe` is driven as backend-tokio drives it, one round at a time: every party's
//! `write_slices` is "written" whole (`handle_wrote` with the total, as if the socket took
//! everything), the sender's `read_buf` is filled from the prepared wire bytes (the memcpy
//! a socket read does) and reported with `handle_read`, events are drained and the next
//! deadline asked for. The time is one fixed `Instant`: it is passed in, never read.
//!
//! The parties join in the untimed setup (`pipe/join` measures that on its own), so the
//! timed part is the transfer alone. Before each case, one untimed run prints how many
//! rounds it took: each round costs a backend one sender read and up to `n` writes.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use fanpipe_core::chunked::encode;
use fanpipe_core::conn::{Action, Conn, PipeRequest};
use fanpipe_core::pipe::{Event, Outcome, PartyId, Pipe};
use fanpipe_core::request::{Role, Route};
use fanpipe_core::Config;

/// How the sender frames its body: Content-Length, or chunked in chunks of this size.
#[derive(Debug, Clone, Copy)]
enum Body {
    Length,
    Chunked(usize),
}

impl Body {
    fn label(self) -> String {
        match self {
            Body::Length => "length".to_owned(),
            Body::Chunked(size) if size >= 1 << 10 => format!("chunked-{}KiB", size >> 10),
            Body::Chunked(size) => format!("chunked-{size}B"),
        }
    }

    /// Body bytes per transfer: large enough to average over many rounds, small enough
    /// that an iteration stays within tens of milliseconds when rounds are many.
    fn payload(self, n: usize) -> usize {
        match (self, n) {
            (Body::Length, _) => 32 << 20,
            (Body::Chunked(size), n) if size >= 16 << 10 && n < 1000 => 32 << 20,
            (Body::Chunked(size), _) if size >= 16 << 10 => 4 << 20,
            (Body::Chunked(_), n) if n < 1000 => 1 << 20,
            (Body::Chunked(_), _) => 32 << 10,
        }
    }
}

/// One transfer's fixed inputs: the parties' requests and the sender's body on the wire.
struct Case {
    n: usize,
    payload: usize,
    sender: PipeRequest,
    receiver: PipeRequest,
    wire: Vec<u8>,
    config: Config,
    now: Instant,
}

/// A head through a `Conn`, as a backend hands it to the pipe.
fn pipe_request(head: &str, now: Instant) -> (PipeRequest, Role) {
    let mut conn = Conn::with_bytes(&Config::default(), head.as_bytes(), now);
    assert_eq!(conn.poll_action(), Action::Pipe, "{head}");
    let request = conn.take_pipe_request().expect("a pipe request");
    let Route::Pipe { role, .. } = request.request.route else {
        unreachable!("a pipe route")
    };
    (request, role)
}

impl Case {
    fn new(body: Body, n: usize, now: Instant) -> Self {
        let payload = body.payload(n);
        let data: Vec<u8> = (0..payload).map(|i| (i * 7) as u8).collect();
        let (framing, wire) = match body {
            Body::Length => (format!("Content-Length: {payload}"), data),
            Body::Chunked(size) => (
                "Transfer-Encoding: chunked".to_owned(),
                encode(&data, &[size]),
            ),
        };
        let put = format!("PUT /bench?n={n} HTTP/1.1\r\nHost: localhost\r\n{framing}\r\n\r\n");
        let get = format!("GET /bench?n={n} HTTP/1.1\r\nHost: localhost\r\n\r\n");
        let (sender, role) = pipe_request(&put, now);
        assert_eq!(role, Role::Sender);
        let (receiver, role) = pipe_request(&get, now);
        assert_eq!(role, Role::Receiver);
        Case {
            n,
            payload,
            sender,
            receiver,
            wire,
            config: Config::default(),
            now,
        }
    }

    /// A pipe with its sender and then its `n` receivers joined (the usual order: the
    /// sender starts `curl -T`, then tells the receivers): the transfer has started.
    fn joined(&self) -> (Pipe, PartyId) {
        let mut pipe = Pipe::new("bench", self.n, &self.config);
        let sender = pipe.join(self.sender.clone(), Role::Sender, self.now);
        for _ in 0..self.n {
            pipe.join(self.receiver.clone(), Role::Receiver, self.now);
        }
        (pipe, sender)
    }
}

/// What one transfer cost a backend in calls.
#[derive(Debug, Default)]
struct Stats {
    rounds: u64,
    sender_reads: u64,
    writes: u64,
}

/// Runs the transfer to its end; panics if it stalls or does not complete.
fn transfer(case: &Case, pipe: &mut Pipe, sender: PartyId) -> Stats {
    let now = case.now;
    let mut stats = Stats::default();
    let mut sent = 0;
    loop {
        stats.rounds += 1;
        let mut moved = false;
        for p in 0..pipe.parties() {
            let total = pipe.write_slices(p).total();
            if total > 0 {
                pipe.handle_wrote(p, total, now);
                stats.writes += 1;
                moved = true;
            }
        }
        if sent < case.wire.len() {
            if let Some(buf) = pipe.read_buf(sender) {
                let k = buf.len().min(case.wire.len() - sent);
                buf[..k].copy_from_slice(&case.wire[sent..sent + k]);
                pipe.handle_read(sender, k, now);
                sent += k;
                stats.sender_reads += 1;
                moved = true;
            }
        }
        while let Some(event) = pipe.poll_event() {
            if let Event::Finished(summary) = event {
                assert_eq!(summary.outcome, Outcome::Complete);
                assert_eq!(summary.bytes, case.payload as u64);
                return stats;
            }
        }
        black_box(pipe.poll_timeout());
        assert!(moved, "the transfer stalled after {sent} bytes");
    }
}

fn data_path(c: &mut Criterion) {
    let now = Instant::now();
    let mut g = c.benchmark_group("pipe");
    for body in [Body::Length, Body::Chunked(16 << 10), Body::Chunked(64)] {
        for n in [1, 30, 1000] {
            let case = Case::new(body, n, now);
            let (mut pipe, sender) = case.joined();
            let s = transfer(&case, &mut pipe, sender);
            let id = format!("{}/n={n}", body.label());
            eprintln!(
                "pipe/{id}: {} KiB body, {} rounds, {} sender reads, {} writes ({} per receiver)",
                case.payload >> 10,
                s.rounds,
                s.sender_reads,
                s.writes,
                s.writes / n as u64,
            );
            g.throughput(Throughput::Bytes((case.payload * n) as u64));
            g.bench_function(BenchmarkId::from_parameter(id), |b| {
                b.iter_batched(
                    || case.joined(),
                    |(mut pipe, sender)| transfer(&case, &mut pipe, sender),
                    BatchSize::PerIteration,
                )
            });
        }
    }
    g.finish();
}

/// The rendezvous alone: a sender and `n` receivers join, which starts the transfer.
fn join(c: &mut Criterion) {
    let now = Instant::now();
    let mut g = c.benchmark_group("pipe/join");
    for n in [30, 1000] {
        let case = Case::new(Body::Length, n, now);
        g.throughput(Throughput::Elements(n as u64 + 1));
        g.bench_function(BenchmarkId::from_parameter(format!("n={n}")), |b| {
            // One at a time: many live pipes (1 MiB buffer each) would measure the allocator.
            b.iter_batched(|| (), |()| case.joined(), BatchSize::PerIteration)
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .sample_size(10);
    targets = data_path, join
}
criterion_main!(benches);
