//! The logic of fanpipe's fuzz targets, as plain functions of bytes so that any input can
//! be replayed without libFuzzer: `driver/tests/fuzz_corpus.rs` includes this file with
//! `#[path]` and runs every corpus file through it, and `driver/tests/sim.rs` drives the
//! same [`world::World`] from a seeded RNG.
//!
//! This crate depends on `fanpipe-core`, `fanpipe-driver` and `std` only (no
//! `libfuzzer-sys`, which only the targets use): the `pipe` target decodes its operations
//! from the bytes by hand.

#![allow(clippy::new_without_default)]

use fanpipe_core::chunked::BodyDecoder;
use fanpipe_core::head::{Head, HeadReader};
use fanpipe_core::request::{interpret, Framing};

/// A tiny deterministic RNG (xorshift64*), so runs replay exactly without dependencies.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        // Spread the seed so that nearby seeds give unrelated streams.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Rng((z ^ (z >> 31)) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n` (0 if `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }

    /// A number in `lo..=hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `percent` / 100.
    pub fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    pub fn fill(&mut self, out: &mut [u8]) {
        for b in out {
            *b = self.next_u64() as u8;
        }
    }
}

fn seed_of(data: &[u8]) -> u64 {
    // FNV-1a: the splits of an input are a function of the input alone.
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

// ---------------------------------------------------------------------------------------
// head

/// What a [`HeadReader`] made of a byte stream: each head, or the error that ended it.
pub type HeadOutcome = Vec<Result<(Head, usize), u16>>;

/// Limits a head reader is built with.
#[derive(Debug, Clone, Copy)]
pub struct HeadLimits {
    pub max_line: usize,
    pub max_head: usize,
    pub max_headers: usize,
}

/// Feeds `input` to a fresh reader in pieces of the sizes `pieces` cycles through (each
/// also capped by what `space()` offers), polling after every fill as `Conn` does.
/// Returns every head (with the bytes it took) or the error, in order. Panics if the
/// reader's buffer grows past `max_head + 8 KiB`.
pub fn read_heads(input: &[u8], pieces: &[usize], lim: HeadLimits) -> HeadOutcome {
    let mut r = HeadReader::new(lim.max_line, lim.max_head, lim.max_headers);
    let mut out = Vec::new();
    let mut fed = 0usize;
    let mut taken = 0usize;
    let mut i = 0;
    loop {
        // Poll before each read: pipelined heads come out without new bytes.
        loop {
            match r.poll_head() {
                None => break,
                Some(Ok(h)) => {
                    let now_taken = fed - r.buffered().len();
                    out.push(Ok((h, now_taken - taken)));
                    taken = now_taken;
                }
                Some(Err(e)) => {
                    out.push(Err(e.status()));
                    return out;
                }
            }
        }
        if fed == input.len() {
            return out;
        }
        let buffered = r.buffered().len();
        let space = r.space();
        assert!(
            buffered + space.len() <= lim.max_head + 8 * 1024,
            "head reader buffer grew to {} (max_head {})",
            buffered + space.len(),
            lim.max_head
        );
        assert!(!space.is_empty(), "head reader offers no space");
        let want = pieces[i % pieces.len()].max(1);
        i += 1;
        let k = want.min(space.len()).min(input.len() - fed);
        space[..k].copy_from_slice(&input[fed..fed + k]);
        r.fill(k);
        fed += k;
    }
}

/// Fuzz target `head`: bytes 0..3 choose limits, the rest is the stream. The stream is
/// read whole, a byte at a time and in pseudo-random pieces; all three must agree, every
/// error is one of the head parser's statuses, every head is within the limits, and
/// `interpret` of every head gives a request or a refusal without panicking.
pub fn head(data: &[u8]) {
    if data.len() < 3 {
        return;
    }
    let lim = HeadLimits {
        max_line: 16 + (data[0] as usize % 64) * 4,
        max_head: 16 + (data[0] as usize % 64) * 4 + (data[1] as usize % 64) * 8,
        max_headers: 1 + (data[2] as usize % 8),
    };
    let input = &data[3..];
    let mut rng = Rng::new(seed_of(data));
    let random: Vec<usize> = (0..16).map(|_| rng.range(1, 40)).collect();
    let whole = read_heads(input, &[usize::MAX], lim);
    let bytewise = read_heads(input, &[1], lim);
    let pieces = read_heads(input, &random, lim);
    for other in [&bytewise, &pieces] {
        // (Found here once: the request-line limit depended on the reads; fixed.)
        assert_eq!(&whole, other, "the split changes the outcome");
    }
    for r in whole.iter().chain(&bytewise).chain(&pieces) {
        match r {
            Err(s) => assert!([400, 414, 431, 505].contains(s), "head parser status {s}"),
            Ok((h, len)) => {
                assert!(
                    *len <= lim.max_head,
                    "head of {len} bytes > {}",
                    lim.max_head
                );
                assert!(h.headers.len() <= lim.max_headers);
                match interpret(h, 1000) {
                    Ok(req) => {
                        if let Framing::Length(_) = req.framing {
                            assert!(h.values("transfer-encoding").next().is_none());
                        }
                    }
                    Err(e) => assert!(
                        [400, 405, 417, 501].contains(&e.status()),
                        "interpret status {} ({e})",
                        e.status()
                    ),
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// chunked

/// Decodes `input` with `framing`, fed in the pieces `pieces` cycles through; with
/// `direct`, chunk data is taken through `data_left`/`advance_data` as the pipe reads it
/// straight into its buffer. Returns (data, done, error).
pub fn decode_body(
    framing: Framing,
    input: &[u8],
    pieces: &[usize],
    direct: bool,
) -> (Vec<u8>, bool, Option<fanpipe_core::chunked::BodyError>) {
    let mut d = BodyDecoder::new(framing);
    let mut out = Vec::new();
    let mut at = 0usize;
    let mut i = 0;
    while at < input.len() && !d.is_done() {
        let want = pieces[i % pieces.len()].max(1);
        i += 1;
        let left = d.data_left();
        if direct && left > 0 {
            let k = (want as u64).min(left).min((input.len() - at) as u64) as usize;
            out.extend_from_slice(&input[at..at + k]);
            d.advance_data(k as u64);
            at += k;
            continue;
        }
        let piece = &input[at..(at + want).min(input.len())];
        let mut off = 0;
        while off < piece.len() && !d.is_done() {
            match d.decode(&piece[off..]) {
                Ok(step) => {
                    assert!(step.consumed <= piece.len() - off);
                    assert!(step.data.start <= step.data.end && step.data.end <= step.consumed);
                    out.extend_from_slice(&piece[off + step.data.start..off + step.data.end]);
                    if step.consumed == 0 {
                        assert!(d.is_done(), "decoder consumed nothing and is not done");
                        break;
                    }
                    off += step.consumed;
                }
                Err(e) => return (out, false, Some(e)),
            }
        }
        at += off;
        if off < piece.len() {
            break;
        }
    }
    (out, d.is_done(), None)
}

/// Fuzz target `chunked`: byte 0 picks chunked (even) or Content-Length (odd, length
/// from bytes 1..3); the rest is the body. Any split, and direct data reads, decode the
/// same; Content-Length takes exactly its prefix; decoded chunked data re-encodes and
/// decodes to itself.
pub fn chunked(data: &[u8]) {
    if data.len() < 3 {
        return;
    }
    let framing = if data[0] & 1 == 0 {
        Framing::Chunked
    } else {
        Framing::Length(u64::from(u16::from_le_bytes([data[1], data[2]])))
    };
    let input = &data[3..];
    let mut rng = Rng::new(seed_of(data));
    let random: Vec<usize> = (0..16).map(|_| rng.range(1, 30)).collect();
    let whole = decode_body(framing, input, &[usize::MAX], false);
    for (pieces, direct) in [
        (&[1usize][..], false),
        (&random[..], false),
        (&random[..], true),
    ] {
        let other = decode_body(framing, input, pieces, direct);
        assert_eq!(whole, other, "pieces {pieces:?} direct {direct}");
    }
    match framing {
        Framing::Length(n) => {
            let k = (n as usize).min(input.len());
            assert_eq!(
                whole,
                (input[..k].to_vec(), input.len() >= n as usize, None)
            );
        }
        Framing::Chunked => {
            let (body, done, err) = &whole;
            if *done {
                assert!(err.is_none());
                let wire = fanpipe_core::chunked::encode(body, &random);
                let again = decode_body(Framing::Chunked, &wire, &random, true);
                assert_eq!(again, (body.clone(), true, None));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// pipe

/// Fuzz target `pipe`: the bytes are a script of operations on a [`world::World`] (see
/// [`world::World::from_script`]); after the script every client finishes, and the
/// world's invariants (docs/PROTOCOL.md) must hold.
pub fn pipe(data: &[u8]) {
    let mut w = world::World::from_script(data);
    w.finish();
    if let Err(e) = w.check() {
        panic!("{e}\n--- log (last 60) ---\n{}", w.log_tail(60));
    }
}

pub mod world;
