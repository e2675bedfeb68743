//! What each party's socket gets next: its control bytes, then (a receiver) the ring's
//! data with chunk framing, as slices for one vectored write.

use std::io::IoSlice;

use super::{Chunk, Feed, Hold, PartyId, Pipe, State};
use crate::chunked::{chunk_header, LAST_CHUNK};

const CRLF: &[u8] = b"\r\n";

/// Up to four slices for one vectored write: control bytes, data (two pieces where the
/// ring wraps), and the CRLF that closes a chunk.
#[derive(Debug)]
pub struct Slices<'a> {
    slices: [IoSlice<'a>; 4],
    len: usize,
}

impl<'a> Slices<'a> {
    fn new() -> Self {
        Slices {
            slices: [IoSlice::new(&[]); 4],
            len: 0,
        }
    }

    fn push(&mut self, s: &'a [u8]) {
        if !s.is_empty() && self.len < 4 {
            self.slices[self.len] = IoSlice::new(s);
            self.len += 1;
        }
    }

    /// Total bytes in the slices.
    pub fn total(&self) -> usize {
        self.slices[..self.len].iter().map(|s| s.len()).sum()
    }
}

impl<'a> std::ops::Deref for Slices<'a> {
    type Target = [IoSlice<'a>];
    fn deref(&self) -> &[IoSlice<'a>] {
        &self.slices[..self.len]
    }
}

/// How much of the ring one write may take: a chunk's data ends with its chunk.
fn limit(feed: &Feed) -> u64 {
    feed.chunk.map_or(u64::MAX, |c| c.data_left)
}

impl Pipe {
    /// The next bytes for this party's socket, as slices for one vectored write; empty
    /// when it has nothing to write now.
    pub fn write_slices(&mut self, p: PartyId) -> Slices<'_> {
        self.prepare_frame(p);
        let mut out = Slices::new();
        let Some(party) = self.parties.get(p) else {
            return out;
        };
        if !party.is_open() {
            return out;
        }
        let end = party
            .hold
            .map_or(party.out.len(), |h| h.upto().max(party.out_pos));
        out.push(&party.out[party.out_pos..end]);
        let (State::Receiving(feed), Some(body)) = (&party.state, &self.body) else {
            return out;
        };
        let (a, b) = body.ring.readable(feed.slot, limit(feed));
        let data = (a.len() + b.len()) as u64;
        out.push(a);
        out.push(b);
        if let Some(chunk) = feed.chunk {
            if data == chunk.data_left && chunk.crlf_left > 0 {
                out.push(&CRLF[2 - chunk.crlf_left..]);
            }
        }
        out
    }

    /// Moves this party's cursors past `n` written bytes of [`Pipe::write_slices`].
    pub(super) fn advance(&mut self, p: PartyId, n: usize) {
        let Some(party) = self.parties.get_mut(p) else {
            return;
        };
        let k = n.min(party.out.len() - party.out_pos);
        party.out_pos += k;
        let mut n = n - k;
        if party.flushed() {
            if let Some(Hold::Continue { upto, .. } | Hold::End { upto }) = &mut party.hold {
                *upto = upto.saturating_sub(party.out.len());
            }
            party.out.clear();
            party.out_pos = 0;
        }
        let (State::Receiving(feed), Some(body)) = (&mut party.state, &mut self.body) else {
            return;
        };
        if n == 0 {
            return;
        }
        let (a, b) = body.ring.readable(feed.slot, limit(feed));
        let d = n.min(a.len() + b.len());
        body.ring.consume(feed.slot, d as u64);
        n -= d;
        if let Some(chunk) = &mut feed.chunk {
            chunk.data_left -= d as u64;
            if chunk.data_left == 0 {
                chunk.crlf_left -= n.min(chunk.crlf_left);
            }
        }
    }

    /// Queues a chunk header, or the last chunk, for a receiver whose chunk is done.
    fn prepare_frame(&mut self, p: PartyId) {
        let body_done = self.body_done();
        let (Some(party), Some(body)) = (self.parties.get_mut(p), &self.body) else {
            return;
        };
        let State::Receiving(Feed {
            slot,
            chunk: Some(chunk),
        }) = &mut party.state
        else {
            return;
        };
        if chunk.data_left > 0 || chunk.crlf_left > 0 {
            return;
        }
        let available = body.ring.written() - body.ring.position(*slot).unwrap_or(0);
        if available > 0 {
            chunk_header(available as usize, &mut party.out);
            *chunk = Chunk {
                data_left: available,
                crlf_left: 2,
                last_queued: false,
            };
        } else if body_done && !chunk.last_queued {
            party.out.extend_from_slice(LAST_CHUNK);
            chunk.last_queued = true;
        }
    }

    /// Whether the receiver at `slot` has every byte the ring has taken so far.
    pub(super) fn caught_up(&self, slot: usize) -> bool {
        self.body
            .as_ref()
            .is_some_and(|b| b.ring.position(slot) == Some(b.ring.written()))
    }

    /// A receiver leaves the ring: it no longer holds the sender back.
    pub(super) fn ring_leave(&mut self, slot: usize, now: std::time::Instant) {
        if let Some(body) = &mut self.body {
            body.ring.remove(slot);
        }
        self.space_freed(now);
    }
}
