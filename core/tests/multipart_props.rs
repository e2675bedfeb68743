//! Property tests of the form decoder: whatever the data and however the body is split,
//! the receivers get exactly the first part's bytes; no input makes it panic or break its
//! output bound.

use fanpipe_core::multipart::{FormDecoder, FormError};
use proptest::prelude::*;

/// Feeds `body` in pieces whose sizes `cuts` cycles through; the data handed out and the
/// result, checking the output bound of every call.
fn decode(boundary: &str, body: &[u8], cuts: &[usize]) -> (Vec<u8>, Result<(), FormError>) {
    let mut d = FormDecoder::new(boundary);
    let mut data = Vec::new();
    let mut rest = body;
    let mut k = 0;
    while !rest.is_empty() {
        let n = cuts[k % cuts.len()].clamp(1, rest.len());
        k += 1;
        let (piece, tail) = rest.split_at(n);
        rest = tail;
        let (before, held) = (data.len(), d.held());
        if let Err(e) = d.decode(piece, &mut |s| data.extend_from_slice(s)) {
            return (data, Err(e));
        }
        assert!(data.len() - before <= piece.len() + held);
    }
    (data, d.finish())
}

/// Bytes rich in what a delimiter is made of.
fn tricky() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop::sample::select(vec![b'\r', b'\n', b'-', b'b', b'B', b'x', 0u8, 0xff]),
        0..300,
    )
}

proptest! {
    #[test]
    fn the_first_parts_bytes_survive_any_split(
        first in tricky(),
        second in tricky(),
        preamble in tricky(),
        cuts in prop::collection::vec(1usize..40, 1..8),
    ) {
        let boundary = "bB-b";
        let delim = format!("\r\n--{boundary}");
        let contains = |hay: &[u8]| hay.windows(delim.len()).any(|w| w == delim.as_bytes());
        // RFC 2046: the boundary does not occur in the parts (nor, with its CRLF, in the
        // preamble, which is read as if a CRLF came before it).
        let mut pre = b"\r\n".to_vec();
        pre.extend_from_slice(&preamble);
        prop_assume!(!contains(&[&first[..], b"\r\n"].concat()));
        prop_assume!(!contains(&[&second[..], b"\r\n"].concat()));
        prop_assume!(!contains(&[&pre[..], b"\r\n"].concat()));
        let mut body = preamble.clone();
        if !preamble.is_empty() {
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(format!("--{boundary}\r\nContent-Type: a/b\r\n\r\n").as_bytes());
        body.extend_from_slice(&first);
        body.extend_from_slice(format!("{delim}\r\n\r\n").as_bytes());
        body.extend_from_slice(&second);
        body.extend_from_slice(format!("{delim}--").as_bytes());
        let (data, r) = decode(boundary, &body, &cuts);
        prop_assert_eq!(r, Ok(()));
        prop_assert_eq!(data, first);
    }

    #[test]
    fn any_input_is_decoded_the_same_at_any_split(
        body in tricky(),
        cuts in prop::collection::vec(1usize..40, 1..8),
    ) {
        let whole = decode("bB", &body, &[usize::MAX]);
        let split = decode("bB", &body, &cuts);
        prop_assert_eq!(whole, split);
    }
}
