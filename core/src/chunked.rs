//! The request body decoder: Content-Length or strict chunked, fed any split of bytes.
//!
//! Stricter than `httparse::parse_chunk_size`: a size needs at least one hex digit, a
//! size that overflows is refused, every line ends in CRLF, and chunk data must be
//! followed by exactly CRLF.

use crate::request::Framing;

/// Why a body cannot be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyError {
    ChunkSize,
    ChunkLineEnd,
    ChunkDataEnd,
    TrailerTooLarge,
    /// A form sender's (`?form`) multipart body is malformed.
    Form(crate::multipart::FormError),
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let BodyError::Form(e) = self {
            return write!(f, "malformed form: {e}");
        }
        f.write_str(match self {
            BodyError::ChunkSize => "malformed chunk size",
            BodyError::ChunkLineEnd => "chunk size line not ended by CRLF",
            BodyError::ChunkDataEnd => "chunk data not followed by CRLF",
            BodyError::TrailerTooLarge => "chunked trailer too large",
            BodyError::Form(_) => "malformed form",
        })
    }
}

/// Most bytes of trailer fields we skip before refusing the body.
const MAX_TRAILER: usize = 16 * 1024;
/// Most bytes of chunk extensions on one size line.
const MAX_EXTENSION: usize = 4 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading a size; `digits` so far.
    Size {
        value: u64,
        digits: u32,
    },
    /// In a chunk extension, after `;`.
    Ext {
        size: u64,
        len: usize,
    },
    /// Saw CR after the size line; LF must follow.
    SizeLf {
        size: u64,
    },
    Data {
        left: u64,
    },
    DataCr,
    DataLf,
    /// At the start of a trailer line; `line` bytes into it.
    Trailer {
        line: usize,
        total: usize,
    },
    TrailerLf {
        empty: bool,
        total: usize,
    },
    Done,
}

/// Decodes one request body.
#[derive(Debug, Clone)]
pub struct BodyDecoder {
    chunked: bool,
    state: State,
}

/// One step of decoding: `consumed` input bytes, of which `data` (a range) is body data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub consumed: usize,
    pub data: std::ops::Range<usize>,
}

impl BodyDecoder {
    pub fn new(framing: Framing) -> Self {
        match framing {
            Framing::Length(n) => BodyDecoder {
                chunked: false,
                state: if n == 0 {
                    State::Done
                } else {
                    State::Data { left: n }
                },
            },
            Framing::Chunked => BodyDecoder {
                chunked: true,
                state: State::Size {
                    value: 0,
                    digits: 0,
                },
            },
        }
    }

    /// Whether the whole body has been seen.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Body bytes that may be read straight to their destination: the rest of this chunk.
    pub fn data_left(&self) -> u64 {
        match self.state {
            State::Data { left } => left,
            _ => 0,
        }
    }

    /// Reports `n` bytes of data read straight in (at most [`Self::data_left`]).
    pub fn advance_data(&mut self, n: u64) {
        if let State::Data { left } = self.state {
            let left = left.saturating_sub(n);
            self.state = if left > 0 {
                State::Data { left }
            } else if self.chunked {
                State::DataCr
            } else {
                State::Done
            };
        }
    }

    /// Decodes from the start of `input` up to the end of the first data run (or all of
    /// it if it holds only framing). Call again with the rest.
    pub fn decode(&mut self, input: &[u8]) -> Result<Step, BodyError> {
        let mut i = 0;
        while i < input.len() {
            if let State::Data { left } = self.state {
                let take = left.min((input.len() - i) as u64) as usize;
                self.advance_data(take as u64);
                return Ok(Step {
                    consumed: i + take,
                    data: i..i + take,
                });
            }
            if self.state == State::Done {
                break;
            }
            self.framing_byte(input[i])?;
            i += 1;
        }
        Ok(Step {
            consumed: i,
            data: i..i,
        })
    }

    fn framing_byte(&mut self, b: u8) -> Result<(), BodyError> {
        self.state = match (self.state, b) {
            (State::Size { value, digits }, _) if b.is_ascii_hexdigit() => {
                let d = u64::from((b as char).to_digit(16).unwrap_or(0));
                let value = value
                    .checked_mul(16)
                    .and_then(|v| v.checked_add(d))
                    .ok_or(BodyError::ChunkSize)?;
                State::Size {
                    value,
                    digits: digits + 1,
                }
            }
            (State::Size { digits: 0, .. }, _) => return Err(BodyError::ChunkSize),
            (State::Size { value, .. }, b';') => State::Ext {
                size: value,
                len: 0,
            },
            (State::Size { value, .. }, b'\r') => State::SizeLf { size: value },
            (State::Size { .. }, _) => return Err(BodyError::ChunkSize),
            (State::Ext { size, .. }, b'\r') => State::SizeLf { size },
            (State::Ext { .. }, b'\n' | 0) => return Err(BodyError::ChunkLineEnd),
            (State::Ext { size, len }, _) if len < MAX_EXTENSION => {
                State::Ext { size, len: len + 1 }
            }
            (State::Ext { .. }, _) => return Err(BodyError::ChunkSize),
            (State::SizeLf { size: 0 }, b'\n') => State::Trailer { line: 0, total: 0 },
            (State::SizeLf { size }, b'\n') => State::Data { left: size },
            (State::SizeLf { .. }, _) => return Err(BodyError::ChunkLineEnd),
            (State::DataCr, b'\r') => State::DataLf,
            (State::DataLf, b'\n') => State::Size {
                value: 0,
                digits: 0,
            },
            (State::DataCr | State::DataLf, _) => return Err(BodyError::ChunkDataEnd),
            (State::Trailer { line, total }, b'\r') => State::TrailerLf {
                empty: line == 0,
                total,
            },
            (State::Trailer { .. }, b'\n' | 0) => return Err(BodyError::ChunkLineEnd),
            (State::Trailer { line, total }, _) if total < MAX_TRAILER => State::Trailer {
                line: line + 1,
                total: total + 1,
            },
            (State::Trailer { .. }, _) => return Err(BodyError::TrailerTooLarge),
            (State::TrailerLf { empty: true, .. }, b'\n') => State::Done,
            (State::TrailerLf { total, .. }, b'\n') => State::Trailer { line: 0, total },
            (State::TrailerLf { .. }, _) => return Err(BodyError::ChunkLineEnd),
            (State::Data { .. } | State::Done, _) => self.state,
        };
        Ok(())
    }
}

/// Writes the chunk-size line for `len` bytes of data into `out`. Once per receiver per
/// write, so by hand rather than through the formatting machinery.
pub fn chunk_header(len: usize, out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0u8; 2 * std::mem::size_of::<usize>()];
    let mut at = digits.len();
    let mut v = len;
    loop {
        at -= 1;
        digits[at] = HEX[v & 0xf];
        v >>= 4;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
    out.extend_from_slice(b"\r\n");
}

/// The end of a chunked body: the last chunk and an empty trailer.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// A whole chunked body: `data` in chunks of the sizes `sizes` cycles through (each at
/// least 1), then the last chunk. What a client sends; the tests and fuzzers use it.
pub fn encode(data: &[u8], sizes: &[usize]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut at = 0;
    let mut sizes = sizes.iter().copied().cycle();
    while at < data.len() {
        // No sizes: the whole body in one chunk.
        let k = sizes
            .next()
            .unwrap_or(data.len())
            .max(1)
            .min(data.len() - at);
        chunk_header(k, &mut out);
        out.extend_from_slice(&data[at..at + k]);
        out.extend_from_slice(b"\r\n");
        at += k;
    }
    out.extend_from_slice(LAST_CHUNK);
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn chunk_headers_are_lowercase_hex_without_padding() {
        for (len, line) in [
            (0, "0\r\n"),
            (1, "1\r\n"),
            (255, "ff\r\n"),
            (0x10000, "10000\r\n"),
            (usize::MAX, "ffffffffffffffff\r\n"),
        ] {
            let mut out = b"x".to_vec();
            chunk_header(len, &mut out);
            assert_eq!(out, format!("x{line}").as_bytes());
        }
    }

    /// Decodes all of `input`, fed in pieces of `piece` bytes.
    pub(crate) fn decode_all(
        framing: Framing,
        input: &[u8],
        piece: usize,
    ) -> Result<(Vec<u8>, bool), BodyError> {
        let mut d = BodyDecoder::new(framing);
        let mut out = Vec::new();
        for part in input.chunks(piece.max(1)) {
            let mut rest = part;
            while !rest.is_empty() && !d.is_done() {
                let step = d.decode(rest)?;
                out.extend_from_slice(&rest[step.data.clone()]);
                rest = &rest[step.consumed..];
            }
        }
        Ok((out, d.is_done()))
    }

    #[test]
    fn chunked_decodes_at_any_split() {
        let data: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let wire = encode(&data, &[77]);
        for piece in [1, 2, 3, 7, 64, 5000] {
            assert_eq!(
                decode_all(Framing::Chunked, &wire, piece),
                Ok((data.clone(), true))
            );
        }
    }

    #[test]
    fn extensions_and_trailers_are_skipped() {
        let wire = b"3;a=b\r\nabc\r\n0;x\r\nX-T: 1\r\n\r\n";
        assert_eq!(
            decode_all(Framing::Chunked, wire, 1),
            Ok((b"abc".to_vec(), true))
        );
    }

    #[test]
    fn httparse_quirks_are_refused() {
        let bad: &[(&[u8], BodyError)] = &[
            (b"\r\n", BodyError::ChunkSize),
            (b";ext\r\n\r\n", BodyError::ChunkSize),
            (b"zz\r\n", BodyError::ChunkSize),
            (b"-1\r\n", BodyError::ChunkSize),
            (b"3 \r\nabc\r\n", BodyError::ChunkSize),
            (b"3;a\nabc\r\n", BodyError::ChunkLineEnd),
            (b"3\nabc\r\n", BodyError::ChunkSize),
            (b"3\r\nabcX\r\n", BodyError::ChunkDataEnd),
            (b"3\r\nabc\n0\r\n\r\n", BodyError::ChunkDataEnd),
            (b"10000000000000000\r\n", BodyError::ChunkSize),
        ];
        for (wire, err) in bad {
            assert_eq!(
                decode_all(Framing::Chunked, wire, 1).map(|_| ()),
                Err(*err),
                "{:?}",
                String::from_utf8_lossy(wire)
            );
        }
    }

    #[test]
    fn content_length_stops_at_its_length() {
        assert_eq!(
            decode_all(Framing::Length(3), b"abcdef", 2),
            Ok((b"abc".to_vec(), true))
        );
        assert_eq!(
            decode_all(Framing::Length(0), b"abc", 2),
            Ok((vec![], true))
        );
        assert_eq!(
            decode_all(Framing::Length(5), b"abc", 2),
            Ok((b"abc".to_vec(), false))
        );
    }

    #[test]
    fn direct_reads_advance_the_chunk() {
        let mut d = BodyDecoder::new(Framing::Chunked);
        let step = d.decode(b"5\r\nab").unwrap();
        assert_eq!(step.data, 3..5);
        assert_eq!(d.data_left(), 3);
        d.advance_data(3);
        assert_eq!(d.data_left(), 0);
        let step = d.decode(b"\r\n0\r\n\r\n").unwrap();
        assert_eq!(step.consumed, 7);
        assert!(d.is_done());
    }
}
