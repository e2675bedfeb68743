//! The logic of the `multipart` fuzz target, on its own so that both the target
//! (`fuzz_targets/multipart.rs`) and the corpus replay of fanpipe-core
//! (`driver/tests/fuzz_corpus.rs`) include it with `#[path]`; fanpipe-core and std only.
//!
//! The first byte chooses the boundary (a prefix of a fixed one) and the second a split
//! stride; the rest is a form body. The body decoded in one piece and in pieces must give
//! the same data, the same first part's headers and the same result, and no call may hand
//! out more than its input and the bytes it held.

use fanpipe_core::multipart::{FormDecoder, FormError, PartHead};

const BOUNDARY: &str = "----WebKitFormBoundary7MA4YWxkTrZu0gW";

type Decoded = (Vec<u8>, Option<PartHead>, Result<(), FormError>);

fn decode(boundary: &str, body: &[u8], stride: usize) -> Decoded {
    let mut d = FormDecoder::new(boundary);
    let mut data = Vec::new();
    for piece in body.chunks(stride.max(1)) {
        let (before, held) = (data.len(), d.held());
        let r = d.decode(piece, &mut |s| data.extend_from_slice(s));
        assert!(
            data.len() - before <= piece.len() + held,
            "a call handed out more than its input and what it held"
        );
        if let Err(e) = r {
            return (data, d.first_head().cloned(), Err(e));
        }
    }
    let r = d.finish();
    (data, d.first_head().cloned(), r)
}

/// One fuzz input; panics on a property broken.
pub fn multipart(data: &[u8]) {
    let (Some(&b), Some(&s)) = (data.first(), data.get(1)) else {
        return;
    };
    let boundary = &BOUNDARY[..1 + usize::from(b) % BOUNDARY.len()];
    let body = &data[2..];
    let whole = decode(boundary, body, body.len());
    for stride in [1, 1 + usize::from(s) % 97] {
        assert_eq!(decode(boundary, body, stride), whole, "stride {stride}");
    }
}
