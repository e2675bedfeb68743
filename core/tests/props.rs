//! Property tests of fanpipe-core's public API: the head reader, the chunked decoder and
//! the registry (issue 4, part 1).

use fanpipe_core::chunked::{self, BodyDecoder};
use fanpipe_core::head::{Head, HeadReader, Method};
use fanpipe_core::registry::{PipeId, Registry};
use fanpipe_core::request::{Framing, Role};
use fanpipe_core::Reject;
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------
// (a) the head reader

const MAX_LINE: usize = 8 * 1024;
const MAX_HEAD: usize = 32 * 1024;
const MAX_HEADERS: usize = 100;

/// What feeding a stream gave: each head, or an error; then the bytes not taken (still
/// buffered, or not fed because the heads wanted were found).
type Outcome = (Vec<Result<Head, u16>>, Vec<u8>);

/// Feeds `input` in pieces whose sizes `pieces` cycles through (each capped by what
/// `space()` offers), polling after every fill as `Conn` does, until `max_heads` heads
/// came out, an error did, or the input ended. Checks the buffer bound.
fn feed_heads(
    r: &mut HeadReader,
    input: &[u8],
    pieces: &[usize],
    max_head: usize,
    max_heads: usize,
) -> Outcome {
    let mut out = Vec::new();
    let mut fed = 0;
    let mut i = 0;
    loop {
        loop {
            match r.poll_head() {
                None => break,
                Some(Ok(h)) => out.push(Ok(h)),
                Some(Err(e)) => {
                    out.push(Err(e.status()));
                    return (out, Vec::new());
                }
            }
            if out.len() == max_heads {
                let mut rest = r.buffered().to_vec();
                rest.extend_from_slice(&input[fed..]);
                return (out, rest);
            }
        }
        if fed == input.len() {
            return (out, r.buffered().to_vec());
        }
        let buffered = r.buffered().len();
        let space = r.space();
        assert!(
            buffered + space.len() <= max_head + 8 * 1024,
            "buffer grew to {}",
            buffered + space.len()
        );
        let k = pieces[i % pieces.len()]
            .max(1)
            .min(space.len())
            .min(input.len() - fed);
        i += 1;
        space[..k].copy_from_slice(&input[fed..fed + k]);
        r.fill(k);
        fed += k;
    }
}

fn feed(r: &mut HeadReader, input: &[u8], pieces: &[usize], max_head: usize) -> Outcome {
    feed_heads(r, input, pieces, max_head, usize::MAX)
}

fn reader() -> HeadReader {
    HeadReader::new(MAX_LINE, MAX_HEAD, MAX_HEADERS)
}

fn method() -> impl Strategy<Value = (&'static str, Method)> {
    prop_oneof![
        Just(("GET", Method::Get)),
        Just(("HEAD", Method::Head)),
        Just(("PUT", Method::Put)),
        Just(("POST", Method::Post)),
        Just(("OPTIONS", Method::Options)),
        Just(("DELETE", Method::Other("DELETE".into()))),
    ]
}

fn target() -> impl Strategy<Value = String> {
    (
        "(/api/v1/pipe)?/[a-zA-Z0-9._~%/-]{0,40}",
        proptest::option::of("n=[0-9]{1,4}(&x=[a-z]{0,3})?"),
    )
        .prop_map(|(p, q)| match q {
            Some(q) => format!("{p}?{q}"),
            None => p,
        })
}

fn header() -> impl Strategy<Value = (String, String)> {
    (
        "[A-Za-z][A-Za-z0-9!#$%&'*+.^_`|~-]{0,15}",
        "([!-~]([ -~]{0,30}[!-~])?)?",
    )
        .prop_filter("no framing headers", |(n, _)| {
            !n.eq_ignore_ascii_case("content-length")
                && !n.eq_ignore_ascii_case("transfer-encoding")
                && !n.eq_ignore_ascii_case("host")
        })
}

#[derive(Debug, Clone)]
struct GenHead {
    method: (&'static str, Method),
    target: String,
    minor: u8,
    headers: Vec<(String, String)>,
    body: Option<Vec<u8>>,
}

impl GenHead {
    fn bytes(&self) -> Vec<u8> {
        let mut out = format!(
            "{} {} HTTP/1.{}\r\n",
            self.method.0, self.target, self.minor
        );
        for (n, v) in self.all_headers() {
            out.push_str(&format!("{n}: {v}\r\n"));
        }
        out.push_str("\r\n");
        let mut out = out.into_bytes();
        if let Some(b) = &self.body {
            out.extend_from_slice(b);
        }
        out
    }

    fn all_headers(&self) -> Vec<(String, String)> {
        let mut h = vec![("Host".to_owned(), "example.test".to_owned())];
        h.extend(self.headers.iter().cloned());
        if let Some(b) = &self.body {
            h.push(("Content-Length".into(), b.len().to_string()));
        }
        h
    }

    fn expected(&self) -> Head {
        Head {
            method: self.method.1.clone(),
            target: self.target.clone(),
            minor: self.minor,
            headers: self
                .all_headers()
                .into_iter()
                .map(|(n, v)| (n, v.into_bytes()))
                .collect(),
        }
    }
}

fn gen_head() -> impl Strategy<Value = GenHead> {
    (
        method(),
        target(),
        0u8..2,
        prop::collection::vec(header(), 0..6),
        proptest::option::of(prop::collection::vec(any::<u8>(), 0..64)),
    )
        .prop_map(|(method, target, minor, headers, body)| GenHead {
            method,
            target,
            minor,
            headers,
            body,
        })
}

fn pieces() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(1usize..64, 1..16)
}

/// Fed whole or in `pieces`, `bytes` give the same heads and errors, and every error is
/// a status of the head parser.
fn same_at_any_split(bytes: &[u8], pieces: &[usize]) -> Result<(), TestCaseError> {
    let whole = feed(&mut reader(), bytes, &[usize::MAX], MAX_HEAD);
    let split = feed(&mut reader(), bytes, pieces, MAX_HEAD);
    prop_assert_eq!(&whole, &split);
    for r in &whole.0 {
        if let Err(s) = r {
            prop_assert!([400, 414, 431, 505, 501].contains(s), "status {}", s);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// A valid head, split anywhere, parses to the head fed in one piece, which is the
    /// head that was generated; the body's first bytes stay buffered.
    #[test]
    fn valid_heads_parse_the_same_at_any_split(h in gen_head(), pieces in pieces()) {
        let bytes = h.bytes();
        let whole = feed_heads(&mut reader(), &bytes, &[usize::MAX], MAX_HEAD, 1);
        let split = feed_heads(&mut reader(), &bytes, &pieces, MAX_HEAD, 1);
        prop_assert_eq!(&whole, &split);
        prop_assert_eq!(whole.0, vec![Ok(h.expected())]);
        prop_assert_eq!(whole.1, h.body.clone().unwrap_or_default());
    }

    /// Two heads back to back come out one by one, at any split.
    #[test]
    fn pipelined_heads_come_out_in_order(a in gen_head(), b in gen_head(), pieces in pieces()) {
        let a = GenHead { body: None, ..a };
        let b = GenHead { body: None, ..b };
        let mut bytes = a.bytes();
        bytes.extend(b.bytes());
        let got = feed(&mut reader(), &bytes, &pieces, MAX_HEAD);
        prop_assert_eq!(got, (vec![Ok(a.expected()), Ok(b.expected())], vec![]));
    }

    /// Arbitrary bytes never panic, and give nothing yet, heads, or an error of the head
    /// parser, the same at any split.
    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in prop::collection::vec(any::<u8>(), 0..600),
        pieces in pieces(),
    ) {
        same_at_any_split(&bytes, &pieces)?;
    }

    /// Bytes that look like HTTP (mostly head characters) never panic either.
    #[test]
    fn http_like_bytes_never_panic(
        bytes in "(GET|PUT|\r|\n| |/|HTTP/1\\.[0-9]|:|a|\t|\0|Host|\u{80}){0,80}",
        pieces in pieces(),
    ) {
        let bytes = bytes.into_bytes();
        same_at_any_split(&bytes, &pieces)?;
    }

    /// With small limits, whatever the reads: the same outcome, every head within the
    /// limits, and over them 414 (line) or 431 (head).
    #[test]
    fn limits_hold_at_any_split(
        line in 8usize..120,
        extra in 0usize..200,
        bytes in "(GET /|PUT /x HTTP/1.1\r\n|a{1,40}| HTTP/1.1|\r\n|Host: h\r\n|X: v{0,30}\r\n){0,12}",
        pieces in pieces(),
    ) {
        let max_head = line + extra;
        let bytes = bytes.into_bytes();
        let run = |pieces: &[usize]| {
            let mut r = HeadReader::new(line, max_head, 5);
            let mut taken = Vec::new();
            let mut fed = 0;
            let mut i = 0;
            let mut out = Vec::new();
            'outer: loop {
                while let Some(h) = r.poll_head() {
                    let left = r.buffered().len();
                    out.push(h.map(|h| h.target).map_err(|e| e.status()));
                    taken.push(fed - left - taken.iter().sum::<usize>());
                    if out.last().unwrap().is_err() {
                        break 'outer;
                    }
                }
                if fed == bytes.len() {
                    break;
                }
                let space = r.space();
                let k = pieces[i % pieces.len()].max(1).min(space.len()).min(bytes.len() - fed);
                i += 1;
                space[..k].copy_from_slice(&bytes[fed..fed + k]);
                r.fill(k);
                fed += k;
            }
            (out, taken)
        };
        let (whole, sizes) = run(&[usize::MAX]);
        let (split, _) = run(&pieces);
        prop_assert_eq!(&whole, &split);
        for (h, size) in whole.iter().zip(sizes) {
            if h.is_ok() {
                prop_assert!(size <= max_head, "a head of {} bytes passed max_head {}", size, max_head);
            }
        }
    }

    /// The buffer stays bounded even for an endless head, with small limits too.
    #[test]
    fn the_buffer_stays_bounded(
        max_head in 64usize..20_000,
        pieces in prop::collection::vec(1usize..20_000, 1..8),
        line_done in any::<bool>(),
    ) {
        let mut bytes = if line_done { b"GET / HTTP/1.1\r\nX: ".to_vec() } else { b"GET /".to_vec() };
        bytes.resize(max_head + 30_000, b'a');
        let mut r = HeadReader::new(max_head, max_head, 10);
        let got = feed(&mut r, &bytes, &pieces, max_head);
        prop_assert_eq!(got.0.len(), 1);
        prop_assert!(matches!(got.0[0], Err(414 | 431)), "{:?}", got.0[0]);
    }
}

/// The request-line limit, at every way of reading the line.
fn line_limit_case(pieces: &[usize]) -> Outcome {
    let max_line = 100;
    let mut bytes = b"GET /".to_vec();
    bytes.resize(150, b'a');
    bytes.extend_from_slice(b" HTTP/1.1\r\nHost: a\r\n\r\n");
    let mut r = HeadReader::new(max_line, 1000, 10);
    feed(&mut r, &bytes, pieces, 1000)
}

#[test]
fn a_request_line_over_the_limit_read_byte_by_byte_is_414() {
    assert_eq!(line_limit_case(&[1]).0, vec![Err(414)]);
}

/// Regression (found by the `head` fuzz target, fixed in the core since): the limit
/// held only when the line's CRLF came in a later read than the one crossing it.
#[test]
fn a_request_line_over_the_limit_is_414_whatever_the_reads() {
    assert_eq!(line_limit_case(&[usize::MAX]).0, vec![Err(414)]);
    assert_eq!(line_limit_case(&[90, 1000]).0, vec![Err(414)]);
}

// ---------------------------------------------------------------------------------------
// (b) the chunked decoder

/// Decodes `input` fed in pieces (`pieces` cycled); chunk data is taken through
/// `data_left`/`advance_data` (as the pipe's direct reads do) when `direct`.
fn decode(
    framing: Framing,
    input: &[u8],
    pieces: &[usize],
    direct: bool,
) -> Result<(Vec<u8>, bool), fanpipe_core::chunked::BodyError> {
    let mut d = BodyDecoder::new(framing);
    let mut out = Vec::new();
    let mut at = 0;
    let mut i = 0;
    while at < input.len() && !d.is_done() {
        let want = pieces[i % pieces.len()].max(1);
        i += 1;
        if direct && d.data_left() > 0 {
            let k = (want as u64)
                .min(d.data_left())
                .min((input.len() - at) as u64) as usize;
            out.extend_from_slice(&input[at..at + k]);
            d.advance_data(k as u64);
            at += k;
            continue;
        }
        let end = (at + want).min(input.len());
        while at < end && !d.is_done() {
            let step = d.decode(&input[at..end])?;
            assert!(step.data.end <= step.consumed && step.consumed <= end - at);
            out.extend_from_slice(&input[at + step.data.start..at + step.data.end]);
            at += step.consumed;
        }
    }
    Ok((out, d.is_done()))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Encoding with any chunk sizes and decoding at any split is the identity, and the
    /// decoder stops exactly at the end of the body.
    #[test]
    fn chunked_round_trips(
        data in prop::collection::vec(any::<u8>(), 0..5000),
        sizes in prop::collection::vec(1usize..3000, 1..8),
        pieces in prop::collection::vec(1usize..700, 1..8),
        direct in any::<bool>(),
        trailing in prop::collection::vec(any::<u8>(), 0..20),
    ) {
        let mut wire = chunked::encode(&data, &sizes);
        let body_len = wire.len();
        wire.extend_from_slice(&trailing);
        prop_assert_eq!(decode(Framing::Chunked, &wire, &pieces, direct), Ok((data.clone(), true)));
        // Stops at the end: the same with nothing after the body.
        prop_assert_eq!(decode(Framing::Chunked, &wire[..body_len], &[usize::MAX], false), Ok((data, true)));
    }

    /// A truncated body is never done.
    #[test]
    fn a_truncated_chunked_body_is_not_done(
        data in prop::collection::vec(any::<u8>(), 0..2000),
        sizes in prop::collection::vec(1usize..500, 1..4),
        cut in any::<prop::sample::Index>(),
    ) {
        let wire = chunked::encode(&data, &sizes);
        let cut = cut.index(wire.len());
        let (got, done) = decode(Framing::Chunked, &wire[..cut], &[usize::MAX], false).unwrap();
        prop_assert!(!done);
        prop_assert!(data.starts_with(&got));
    }

    /// Random bytes never panic, and decode the same at any split and with direct reads.
    #[test]
    fn random_bytes_decode_the_same_at_any_split(
        bytes in prop::collection::vec(any::<u8>(), 0..400),
        pieces in prop::collection::vec(1usize..50, 1..8),
        length in proptest::option::of(0u64..500),
    ) {
        let framing = length.map_or(Framing::Chunked, Framing::Length);
        let whole = decode(framing, &bytes, &[usize::MAX], false);
        prop_assert_eq!(&whole, &decode(framing, &bytes, &pieces, false));
        prop_assert_eq!(&whole, &decode(framing, &bytes, &pieces, true));
        prop_assert_eq!(&whole, &decode(framing, &bytes, &[1], false));
    }

    /// Chunk-like bytes (hex digits, CR, LF, `;`) exercise the framing states.
    #[test]
    fn chunk_like_bytes_decode_the_same_at_any_split(
        bytes in "([0-9a-fA-F]|\r|\n|;|\r\n|x|=| ){0,80}",
        pieces in prop::collection::vec(1usize..10, 1..8),
    ) {
        let bytes = bytes.into_bytes();
        let whole = decode(Framing::Chunked, &bytes, &[usize::MAX], false);
        prop_assert_eq!(&whole, &decode(Framing::Chunked, &bytes, &pieces, true));
        prop_assert_eq!(&whole, &decode(Framing::Chunked, &bytes, &[1], false));
    }
}

// ---------------------------------------------------------------------------------------
// (c) the registry

#[derive(Debug, Clone)]
enum RegOp {
    Admit {
        name: usize,
        role: Role,
        n: usize,
    },
    /// A waiting party (picked among those admitted) leaves.
    Leave(prop::sample::Index),
    /// A full pipe (picked) starts.
    Start(prop::sample::Index),
    /// A running pipe (picked) finishes.
    Finish(prop::sample::Index),
}

fn reg_op() -> impl Strategy<Value = RegOp> {
    prop_oneof![
        4 => (0usize..3, prop_oneof![Just(Role::Sender), Just(Role::Receiver)], 1usize..4)
            .prop_map(|(name, role, n)| RegOp::Admit { name, role, n }),
        2 => any::<prop::sample::Index>().prop_map(RegOp::Leave),
        1 => any::<prop::sample::Index>().prop_map(RegOp::Start),
        1 => any::<prop::sample::Index>().prop_map(RegOp::Finish),
    ]
}

/// The model of one name's pipe.
#[derive(Debug, Clone)]
struct ModelPipe {
    id: PipeId,
    n: usize,
    running: bool,
}

const NAMES: &[&str] = &["a", "b", "c"];

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    /// Against a model: at most one sender and `n` receivers per live pipe, and one
    /// newcomer per place for the pipe to hold and decide, `n` mismatch
    /// is 400, a running pipe is 409 Busy, the last party's leave frees the name, and a
    /// finished pipe's name is free at once.
    #[test]
    fn registry_matches_its_model(ops in prop::collection::vec(reg_op(), 1..120)) {
        let mut reg: Registry<PipeId> = Registry::default();
        let mut pipes: Vec<Option<ModelPipe>> = vec![None; NAMES.len()];
        // Admitted, not yet gone: (name, pipe id, role).
        let mut parties: Vec<(usize, PipeId, Role)> = Vec::new();
        let mut ids_seen = std::collections::BTreeSet::new();
        for op in ops {
            match op {
                RegOp::Admit { name, role, n } => {
                    let got = reg
                        .admit(NAMES[name], role, n, |id| id)
                        .map(|a| { assert_eq!(*a.handle, a.id); (a.id, a.new) });
                    fn count(parties: &[(usize, PipeId, Role)], id: PipeId, role: Role) -> usize {
                        parties.iter().filter(|p| p.1 == id && p.2 == role).count()
                    }
                    match &pipes[name] {
                        None => {
                            let (id, new) = got.expect("a free name admits");
                            prop_assert!(new);
                            prop_assert!(ids_seen.insert(id), "pipe ids are never reused");
                            pipes[name] = Some(ModelPipe { id, n, running: false });
                            parties.push((name, id, role));
                        }
                        Some(p) if p.running => {
                            prop_assert_eq!(got.unwrap_err(), Reject::Busy);
                            prop_assert_eq!(Reject::Busy.status(), 409);
                        }
                        Some(p) if p.n != n => {
                            let e = got.unwrap_err();
                            prop_assert_eq!(e.status(), 400);
                            prop_assert_eq!(e, Reject::NMismatch { expected: p.n, asked: n });
                        }
                        Some(p) => {
                            // A newcomer for a taken place goes to the pipe, which decides;
                            // one per place at most.
                            let full = match role {
                                Role::Sender => count(&parties, p.id, Role::Sender) >= 2,
                                Role::Receiver => count(&parties, p.id, Role::Receiver) >= 2 * p.n,
                            };
                            if full {
                                prop_assert_eq!(got.unwrap_err().status(), 409);
                            } else {
                                prop_assert_eq!(got.unwrap(), (p.id, false));
                                parties.push((name, p.id, role));
                            }
                        }
                    }
                    if let Some(p) = &pipes[name] {
                        prop_assert!(count(&parties, p.id, Role::Sender) <= 2);
                        prop_assert!(count(&parties, p.id, Role::Receiver) <= 2 * p.n);
                    }
                }
                RegOp::Leave(i) => {
                    // Only waiting parties leave (a pipe reports Left before it starts).
                    let waiting: Vec<usize> = (0..parties.len())
                        .filter(|&k| pipes[parties[k].0].as_ref().is_some_and(|p| p.id == parties[k].1 && !p.running))
                        .collect();
                    if waiting.is_empty() {
                        continue;
                    }
                    let k = waiting[i.index(waiting.len())];
                    let (name, id, role) = parties.remove(k);
                    let gone = reg.leave(NAMES[name], id, role);
                    let left = parties.iter().filter(|p| p.1 == id).count();
                    prop_assert_eq!(gone, left == 0, "leave says gone={} with {} left", gone, left);
                    if left == 0 {
                        pipes[name] = None;
                        // The name is free: a newcomer gets a new pipe.
                        let a = reg.admit(NAMES[name], Role::Receiver, 3, |id| id).map(|a| (a.id, a.new));
                        let (new_id, new) = a.expect("a freed name admits");
                        prop_assert!(new && new_id != id);
                        ids_seen.insert(new_id);
                        prop_assert!(reg.leave(NAMES[name], new_id, Role::Receiver));
                    }
                }
                RegOp::Start(i) => {
                    let full: Vec<usize> = (0..NAMES.len())
                        .filter(|&k| pipes[k].as_ref().is_some_and(|p| {
                            !p.running
                                && parties.iter().filter(|q| q.1 == p.id && q.2 == Role::Sender).count() == 1
                                && parties.iter().filter(|q| q.1 == p.id && q.2 == Role::Receiver).count() == p.n
                        }))
                        .collect();
                    if full.is_empty() {
                        continue;
                    }
                    let name = full[i.index(full.len())];
                    let p = pipes[name].as_mut().unwrap();
                    reg.start(NAMES[name], p.id);
                    p.running = true;
                }
                RegOp::Finish(i) => {
                    let running: Vec<usize> = (0..NAMES.len())
                        .filter(|&k| pipes[k].as_ref().is_some_and(|p| p.running))
                        .collect();
                    if running.is_empty() {
                        continue;
                    }
                    let name = running[i.index(running.len())];
                    let id = pipes[name].take().unwrap().id;
                    parties.retain(|p| p.1 != id);
                    reg.finish(NAMES[name], id);
                    // Stale calls for the old pipe change nothing.
                    prop_assert!(reg.leave(NAMES[name], id, Role::Sender));
                    reg.start(NAMES[name], id);
                    reg.finish(NAMES[name], id);
                }
            }
            let waiting = pipes.iter().flatten().filter(|p| !p.running).count();
            let running = pipes.iter().flatten().filter(|p| p.running).count();
            let counts = reg.counts();
            prop_assert_eq!((counts.waiting_pipes, counts.running_pipes), (waiting, running));
            let waiting_parties = parties
                .iter()
                .filter(|q| pipes[q.0].as_ref().is_some_and(|p| p.id == q.1 && !p.running))
                .count();
            prop_assert_eq!(counts.waiting_parties, waiting_parties);
        }
    }
}
