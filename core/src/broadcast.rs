//! The bounded buffer between one sender and its receivers: one write position, one read
//! cursor per receiver. The slowest live receiver alone decides how much space is free,
//! so memory never grows past the limit, however large the body or slow a receiver.
//!
//! The ring starts small and doubles, up to its limit, only when the writer finds it full:
//! a short transfer, or one whose receivers keep up, never holds a whole buffer, so a
//! thousand small pipes cost a thousand small rings. A ring given a [`MemoryBudget`] is
//! charged for its bytes, starts smaller and stops growing when the budget is spent, and
//! gives its bytes back when dropped or released.

use crate::budget::MemoryBudget;

/// Where a ring starts (or its limit, if smaller).
pub const INITIAL_CAPACITY: usize = 64 * 1024;

/// The least a budgeted ring is given, spent budget or not (or its limit, if smaller).
pub const FLOOR_CAPACITY: usize = 16 * 1024;

/// A ring of at most `limit` bytes with absolute (never wrapping) positions.
#[derive(Debug)]
pub struct Broadcast {
    buf: Vec<u8>,
    limit: usize,
    /// Bytes ever written.
    head: u64,
    /// Each receiver's position; `None` once it has gone.
    cursors: Vec<Option<u64>>,
    /// Charged for `buf.len()` bytes.
    budget: MemoryBudget,
}

impl Broadcast {
    /// A ring of `capacity` bytes, allocated at once.
    pub fn new(capacity: usize, receivers: usize) -> Self {
        Self::growing(capacity, capacity, receivers)
    }

    /// A ring of `initial` bytes that grows up to `limit` as the writer needs room.
    pub fn growing(initial: usize, limit: usize, receivers: usize) -> Self {
        Self::budgeted(initial, limit, receivers, &MemoryBudget::unlimited())
    }

    /// A growing ring charged to `budget`: it starts at `initial` or, if the budget has
    /// not that much left, smaller down to [`FLOOR_CAPACITY`], and grows only while the
    /// budget allows.
    pub fn budgeted(initial: usize, limit: usize, receivers: usize, budget: &MemoryBudget) -> Self {
        let limit = limit.max(1);
        let size = budget.start(initial.clamp(1, limit), FLOOR_CAPACITY);
        Broadcast {
            buf: vec![0; size],
            limit,
            head: 0,
            cursors: vec![Some(0); receivers],
            budget: budget.clone(),
        }
    }

    /// The transfer is over: the memory goes back to the budget (and the system) now,
    /// not when the pipe's last connection closes. Nothing is readable or writable after.
    pub fn release(&mut self) {
        self.budget.refund(self.buf.len());
        self.buf = Vec::new();
        self.limit = 0;
        self.cursors.iter_mut().for_each(|c| *c = None);
    }

    /// Bytes the buffer holds now; it may grow up to [`Self::limit`].
    pub fn capacity(&self) -> usize {
        self.buf.len()
    }

    /// Bytes the buffer may ever hold.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Free bytes, after growing the ring (if it may) until at least `want` are free.
    pub fn reserve(&mut self, want: usize) -> usize {
        while self.buf.len() - self.buffered() < want && self.grow() {}
        self.buf.len() - self.buffered()
    }

    /// Doubles the ring (up to its limit) for a writer that could have written more, if
    /// the budget allows; says whether it grew.
    pub fn grow(&mut self) -> bool {
        let (now, to) = (self.buf.len(), (self.buf.len() * 2).min(self.limit));
        if to <= now || !self.budget.grow(to - now) {
            return false;
        }
        self.grow_to(to);
        true
    }

    /// Moves the held bytes into a larger ring; positions are absolute, so cursors stay.
    fn grow_to(&mut self, capacity: usize) {
        let mut buf = vec![0; capacity];
        let tail = self.tail();
        let (old, new) = (self.buf.len() as u64, capacity as u64);
        let mut at = tail;
        while at < self.head {
            let from = (at % old) as usize;
            let to = (at % new) as usize;
            let k = ((self.head - at) as usize)
                .min(self.buf.len() - from)
                .min(capacity - to);
            buf[to..to + k].copy_from_slice(&self.buf[from..from + k]);
            at += k as u64;
        }
        self.buf = buf;
    }

    /// Bytes ever written.
    pub fn written(&self) -> u64 {
        self.head
    }

    /// The position of the slowest live receiver; `head` if none is left.
    fn tail(&self) -> u64 {
        self.cursors
            .iter()
            .flatten()
            .copied()
            .min()
            .unwrap_or(self.head)
    }

    /// Bytes held for the slowest live receiver.
    pub fn buffered(&self) -> usize {
        (self.head - self.tail()) as usize
    }

    /// The contiguous free space at the write position; empty when the slowest is a
    /// whole buffer (at its limit) behind.
    pub fn writable(&mut self) -> &mut [u8] {
        self.reserve(1);
        let cap = self.buf.len();
        if cap == 0 {
            return &mut [];
        }
        let free = cap - self.buffered();
        let at = (self.head % cap as u64) as usize;
        let end = at + free.min(cap - at);
        &mut self.buf[at..end]
    }

    /// How many bytes [`Self::writable`] would offer.
    pub fn writable_len(&self) -> usize {
        let cap = self.buf.len();
        if cap == 0 {
            return 0;
        }
        let at = (self.head % cap as u64) as usize;
        (cap - self.buffered()).min(cap - at)
    }

    /// Records `n` bytes written into [`Self::writable`].
    pub fn commit(&mut self, n: usize) {
        debug_assert!(n <= self.writable_len());
        self.head += n.min(self.writable_len()) as u64;
    }

    /// Copies `data` in; returns how much fit.
    pub fn push(&mut self, data: &[u8]) -> usize {
        let mut done = 0;
        while done < data.len() {
            let space = self.writable();
            let k = space.len().min(data.len() - done);
            if k == 0 {
                break;
            }
            space[..k].copy_from_slice(&data[done..done + k]);
            self.commit(k);
            done += k;
        }
        done
    }

    /// Receiver `r`'s position (bytes it has consumed).
    pub fn position(&self, r: usize) -> Option<u64> {
        self.cursors.get(r).copied().flatten()
    }

    /// The bytes receiver `r` has not consumed, as one or two slices, at most `limit` long.
    pub fn readable(&self, r: usize, limit: u64) -> (&[u8], &[u8]) {
        let Some(pos) = self.position(r) else {
            return (&[], &[]);
        };
        let cap = self.buf.len();
        let len = (self.head - pos).min(limit) as usize;
        let at = (pos % cap as u64) as usize;
        let first = len.min(cap - at);
        (&self.buf[at..at + first], &self.buf[..len - first])
    }

    /// Receiver `r` consumed `n` more bytes.
    pub fn consume(&mut self, r: usize, n: u64) {
        if let Some(Some(pos)) = self.cursors.get_mut(r) {
            *pos = (*pos + n).min(self.head);
        }
    }

    /// Receiver `r` is gone: it no longer holds the sender back.
    pub fn remove(&mut self, r: usize) {
        if let Some(c) = self.cursors.get_mut(r) {
            *c = None;
        }
    }
}

impl Drop for Broadcast {
    fn drop(&mut self) {
        self.budget.refund(self.buf.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn slowest_receiver_gates_the_writer() {
        let mut b = Broadcast::new(8, 2);
        assert_eq!(b.push(b"abcdefghij"), 8);
        assert_eq!(b.writable_len(), 0);
        b.consume(0, 8);
        assert_eq!(b.writable_len(), 0);
        b.consume(1, 3);
        assert_eq!(b.push(b"XYZW"), 3);
        assert_eq!(b.readable(1, u64::MAX), (&b"defgh"[..], &b"XYZ"[..]));
        b.remove(1);
        assert_eq!(b.buffered(), 3);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Push(usize),
        Read(usize, usize),
        Leave(usize),
    }

    fn op(receivers: usize) -> impl Strategy<Value = Op> {
        prop_oneof![
            (1usize..300).prop_map(Op::Push),
            (0..receivers, 1usize..300).prop_map(|(r, n)| Op::Read(r, n)),
            (0..receivers).prop_map(Op::Leave),
        ]
    }

    #[test]
    fn a_growing_ring_keeps_its_bytes_in_order() {
        let mut b = Broadcast::growing(4, 16, 2);
        assert_eq!(b.push(b"abc"), 3);
        b.consume(0, 2);
        b.consume(1, 2);
        // Wrapped in the small ring, then grown: "c" and the new bytes stay in order.
        assert_eq!(b.push(b"defghijklmnopqrstu"), 16 - 1);
        assert_eq!(b.capacity(), 16);
        let (x, y) = b.readable(0, u64::MAX);
        assert_eq!([x, y].concat(), b"cdefghijklmnopqr");
        assert_eq!(b.writable_len(), 0);
    }

    #[test]
    fn a_budgeted_ring_grows_while_the_budget_allows_and_refunds_on_drop() {
        let budget = MemoryBudget::new(8 * FLOOR_CAPACITY);
        let mut a = Broadcast::budgeted(2 * FLOOR_CAPACITY, 1 << 20, 1, &budget);
        assert_eq!(a.capacity(), 2 * FLOOR_CAPACITY);
        // Growth stops at three quarters of the budget: 6 floors.
        assert_eq!(a.reserve(1 << 20), 4 * FLOOR_CAPACITY);
        assert_eq!(budget.used(), 4 * FLOOR_CAPACITY);
        let b = Broadcast::budgeted(4 * FLOOR_CAPACITY, 1 << 20, 1, &budget);
        assert_eq!(b.capacity(), 4 * FLOOR_CAPACITY);
        // Spent: a new ring gets its floor, and still moves bytes.
        let mut c = Broadcast::budgeted(4 * FLOOR_CAPACITY, 1 << 20, 1, &budget);
        assert_eq!(c.capacity(), FLOOR_CAPACITY);
        assert_eq!(budget.used(), 9 * FLOOR_CAPACITY);
        assert_eq!(c.push(&[7; 3 * FLOOR_CAPACITY]), FLOOR_CAPACITY);
        assert!(!c.grow());
        drop(b);
        assert_eq!(budget.used(), 5 * FLOOR_CAPACITY);
        // Others ended: growth resumes.
        assert!(c.grow());
        a.release();
        assert_eq!(a.writable_len(), 0);
        assert_eq!(a.push(b"x"), 0);
        assert_eq!(budget.used(), 2 * FLOOR_CAPACITY);
        drop((a, c));
        assert_eq!(budget.used(), 0);
    }

    proptest! {
        /// Against a model where each receiver is a Vec: every live receiver's output is
        /// a prefix of the stream, the buffer stays within its limit however it grows,
        /// and only live receivers gate.
        #[test]
        fn matches_a_model(
            cap in 1usize..200,
            initial in 1usize..200,
            ops in prop::collection::vec(op(4), 1..200),
        ) {
            let mut b = Broadcast::growing(initial, cap, 4);
            let mut stream: Vec<u8> = Vec::new();
            let mut got: Vec<Vec<u8>> = vec![Vec::new(); 4];
            let mut live = [true; 4];
            let mut next = 0u8;
            for op in ops {
                match op {
                    Op::Push(n) => {
                        let data: Vec<u8> = (0..n).map(|_| { next = next.wrapping_add(1); next }).collect();
                        // With nobody left, nothing is held and every byte fits.
                        let room = (0..4).filter(|&r| live[r]).map(|r| got[r].len()).min()
                            .map_or(n, |slowest| cap - (stream.len() - slowest));
                        let k = b.push(&data);
                        prop_assert_eq!(k, n.min(room));
                        stream.extend_from_slice(&data[..k]);
                    }
                    Op::Read(r, n) => {
                        let (a, c) = b.readable(r, n as u64);
                        let mut chunk = a.to_vec();
                        chunk.extend_from_slice(c);
                        if live[r] {
                            prop_assert_eq!(chunk.len(), n.min(stream.len() - got[r].len()));
                        } else {
                            prop_assert!(chunk.is_empty());
                        }
                        b.consume(r, chunk.len() as u64);
                        got[r].extend_from_slice(&chunk);
                    }
                    Op::Leave(r) => { b.remove(r); live[r] = false; }
                }
                prop_assert!(b.buffered() <= cap);
                prop_assert!(b.capacity() <= cap);
                for r in 0..4 {
                    prop_assert_eq!(&got[r][..], &stream[..got[r].len()]);
                }
            }
        }
    }
}
