//! The payload: deterministic, free to produce, and not trivially periodic.
//!
//! One base block of pseudo-random bytes is stored twice in a row. Block `i` of a stream is
//! the base's window that starts at a pseudo-random offset drawn from (stream seed, `i`), so
//! producing a block is taking a slice: no byte is generated on the data path, and the
//! generator can never be the bottleneck. Streams with different seeds (one per pipe) differ,
//! so bytes that leak from one pipe into another fail the checksum.

/// Length of the base block, and the largest block a stream hands out.
pub const BASE_LEN: usize = 1 << 20;

/// The shared base block (stored twice) from which every stream is cut.
pub struct Payload {
    doubled: Box<[u8]>,
}

/// SplitMix64: a tiny, well-mixed generator, good enough for test bytes and offsets.
pub fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

impl Payload {
    /// Builds the base block from `seed` (a few milliseconds, once per invocation).
    pub fn new(seed: u64) -> Self {
        let mut doubled = vec![0u8; 2 * BASE_LEN].into_boxed_slice();
        let mut state = seed;
        for word in doubled[..BASE_LEN].chunks_exact_mut(8) {
            state = splitmix64(state);
            word.copy_from_slice(&state.to_le_bytes());
        }
        doubled.copy_within(..BASE_LEN, BASE_LEN);
        Payload { doubled }
    }

    /// The blocks of the stream `seed`, `size` bytes in all, each at most `block` bytes
    /// (`block` is clamped to 1..=[`BASE_LEN`]).
    pub fn blocks(&self, seed: u64, size: u64, block: usize) -> Blocks<'_> {
        Blocks {
            payload: self,
            seed,
            remaining: size,
            block: block.clamp(1, BASE_LEN),
            index: 0,
        }
    }

    /// The CRC-32 of the whole stream, as a receiver that got every byte computes it.
    pub fn crc32(&self, seed: u64, size: u64, block: usize) -> u32 {
        let mut hasher = crc32fast::Hasher::new();
        for piece in self.blocks(seed, size, block) {
            hasher.update(piece);
        }
        hasher.finalize()
    }
}

/// Iterator over one stream's blocks: slices of the shared base, no copy.
pub struct Blocks<'a> {
    payload: &'a Payload,
    seed: u64,
    remaining: u64,
    block: usize,
    index: u64,
}

impl<'a> Iterator for Blocks<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        if self.remaining == 0 {
            return None;
        }
        let len = self.remaining.min(self.block as u64) as usize;
        let offset = (splitmix64(self.seed ^ splitmix64(self.index)) % BASE_LEN as u64) as usize;
        self.index += 1;
        self.remaining -= len as u64;
        Some(&self.payload.doubled[offset..offset + len])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_have_the_asked_length_and_differ_by_seed() {
        let payload = Payload::new(7);
        let total: usize = payload
            .blocks(1, 3 * BASE_LEN as u64 + 5, BASE_LEN)
            .map(<[u8]>::len)
            .sum();
        assert_eq!(total, 3 * BASE_LEN + 5);
        assert_eq!(payload.blocks(1, 0, BASE_LEN).count(), 0);
        assert_ne!(
            payload.crc32(1, 1 << 22, BASE_LEN),
            payload.crc32(2, 1 << 22, BASE_LEN)
        );
        assert_eq!(
            payload.crc32(1, 1 << 22, BASE_LEN),
            payload.crc32(1, 1 << 22, BASE_LEN)
        );
    }

    #[test]
    fn consecutive_blocks_are_not_the_same_bytes() {
        let payload = Payload::new(7);
        let blocks: Vec<&[u8]> = payload.blocks(3, 4 * BASE_LEN as u64, BASE_LEN).collect();
        assert!(blocks.windows(2).all(|pair| pair[0] != pair[1]));
    }
}
