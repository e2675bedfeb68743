//! A form posted to a pipe (`POST /NAME?form`, `multipart/form-data`, RFC 7578 over RFC
//! 2046 §5.1): its first part's body is what the receivers get, streamed.
//!
//! The decoder takes the request body (after chunked or length decoding) in pieces split
//! anywhere, consumes every byte it is given, and hands out the first part's data as it
//! goes. It never holds a part: it keeps at most the first part's headers
//! ([`MAX_PART_HEAD`] bytes), and of the data only how many bytes of a possible
//! delimiter it has matched (those bytes are the delimiter's own, so they need no
//! buffer). Later parts are checked and dropped; the preamble and epilogue are ignored.

/// Largest header block of one part.
pub const MAX_PART_HEAD: usize = 8 * 1024;

/// Longest boundary RFC 2046 allows.
pub const MAX_BOUNDARY: usize = 70;

/// Why a form body cannot be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FormError {
    /// A boundary line followed by something other than `--` or a line end.
    Delimiter,
    /// A part's header block is not `name: value` lines.
    PartHead,
    /// A part's header block is over [`MAX_PART_HEAD`].
    PartHeadTooLarge,
    /// The body ended before the closing boundary.
    Truncated,
}

impl std::fmt::Display for FormError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FormError::Delimiter => "a boundary line has trailing bytes",
            FormError::PartHead => "a part's headers are malformed",
            FormError::PartHeadTooLarge => "a part's headers are too large",
            FormError::Truncated => "the form ended before its closing boundary",
        })
    }
}

/// What the receivers learn from the first part's headers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartHead {
    /// The form field's name.
    pub name: Option<String>,
    /// The file's name, for a file field (may be empty: no file chosen).
    pub filename: Option<String>,
    /// The part's `Content-Type`.
    pub content_type: Option<String>,
}

/// The boundary of a `multipart/form-data` content type: 1 to 70 characters, quoted or
/// not; `None` for any other type or a missing or invalid boundary.
pub fn boundary(content_type: &str) -> Option<String> {
    let mut params = split_params(content_type);
    let essence = params.next()?;
    if !essence.trim().eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    let value = params.find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("boundary")
            .then(|| unquote(v))
    })?;
    let ok = |c: char| c.is_ascii_alphanumeric() || "'()+_,-./:=? ".contains(c);
    let valid = !value.is_empty()
        && value.len() <= MAX_BOUNDARY
        && !value.ends_with(' ')
        && value.chars().all(ok);
    valid.then_some(value)
}

/// Splits `a; b="x;y"; c` at the semicolons outside quotes.
fn split_params(s: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(s);
    std::iter::from_fn(move || {
        let s = rest?;
        let (mut quoted, mut escaped) = (false, false);
        for (i, c) in s.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' if quoted => escaped = true,
                '"' => quoted = !quoted,
                ';' if !quoted => {
                    rest = Some(&s[i + 1..]);
                    return Some(&s[..i]);
                }
                _ => {}
            }
        }
        rest = None;
        Some(s)
    })
}

/// A parameter value: a quoted string (backslash escapes undone) or a token.
fn unquote(v: &str) -> String {
    let v = v.trim();
    match v.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
        Some(inner) => {
            let mut out = String::with_capacity(inner.len());
            let mut chars = inner.chars();
            while let Some(c) = chars.next() {
                out.push(if c == '\\' {
                    chars.next().unwrap_or(c)
                } else {
                    c
                });
            }
            out
        }
        None => v.to_owned(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before the first boundary: bytes are ignored.
    Preamble,
    /// Just after a boundary: `--` closes the form, else padding and CRLF.
    AfterBoundary,
    /// Saw `-` after a boundary.
    CloseDash,
    /// Spaces or tabs after a boundary.
    Padding,
    /// Saw CR after a boundary.
    BoundaryLf,
    /// In a part's header block.
    Head,
    /// In a part's data.
    Body,
    /// After the closing boundary: bytes are ignored.
    Epilogue,
}

/// Decodes one form body; see the module's notes.
#[derive(Debug, Clone)]
pub struct FormDecoder {
    /// `CRLF--boundary`.
    delim: Vec<u8>,
    state: State,
    /// Bytes of `delim` matched so far (held back from the data until the match fails).
    matched: usize,
    head: Vec<u8>,
    /// Parts whose headers were read.
    parts: usize,
    first: Option<PartHead>,
}

impl FormDecoder {
    /// A decoder for bodies delimited by `boundary` (see [`boundary`]).
    pub fn new(boundary: &str) -> Self {
        let mut delim = b"\r\n--".to_vec();
        delim.extend_from_slice(boundary.as_bytes());
        FormDecoder {
            delim,
            state: State::Preamble,
            // The first boundary may start the body: as if a CRLF came before it.
            matched: 2,
            head: Vec::new(),
            parts: 0,
            first: None,
        }
    }

    /// The first part's headers, once read.
    pub fn first_head(&self) -> Option<&PartHead> {
        self.first.as_ref()
    }

    /// Whether the closing boundary was read (what follows is ignored).
    pub fn is_done(&self) -> bool {
        self.state == State::Epilogue
    }

    /// Whether the first part's headers are known, or the form ended without a part: the
    /// receivers' heads can be written.
    pub fn head_known(&self) -> bool {
        self.first.is_some() || self.is_done()
    }

    /// Most bytes one [`FormDecoder::decode`] call may hand out beyond its input: the
    /// bytes of a possible boundary held back so far.
    pub fn held(&self) -> usize {
        if self.state == State::Body {
            self.matched
        } else {
            0
        }
    }

    /// Takes all of `input`, handing each piece of the first part's data to `emit`, in
    /// order. At most `input.len() + self.held()` bytes are handed out.
    pub fn decode(&mut self, input: &[u8], emit: &mut dyn FnMut(&[u8])) -> Result<(), FormError> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                State::Preamble | State::Body | State::Epilogue => {
                    i += self.scan(&input[i..], emit);
                }
                State::AfterBoundary => {
                    self.state = match b {
                        b'-' => State::CloseDash,
                        b' ' | b'\t' => State::Padding,
                        b'\r' => State::BoundaryLf,
                        _ => return Err(FormError::Delimiter),
                    };
                    i += 1;
                }
                State::CloseDash if b == b'-' => {
                    self.state = State::Epilogue;
                    i += 1;
                }
                State::Padding if b == b' ' || b == b'\t' => i += 1,
                State::Padding if b == b'\r' => {
                    self.state = State::BoundaryLf;
                    i += 1;
                }
                State::BoundaryLf if b == b'\n' => {
                    self.state = State::Head;
                    self.head.clear();
                    i += 1;
                }
                State::CloseDash | State::Padding | State::BoundaryLf => {
                    return Err(FormError::Delimiter)
                }
                State::Head => {
                    if self.head.len() >= MAX_PART_HEAD {
                        return Err(FormError::PartHeadTooLarge);
                    }
                    self.head.push(b);
                    i += 1;
                    if self.head == b"\r\n" || self.head.ends_with(b"\r\n\r\n") {
                        let head = parse_head(&self.head)?;
                        if self.parts == 0 {
                            self.first = Some(head);
                        }
                        self.parts += 1;
                        self.head = Vec::new();
                        self.state = State::Body;
                    }
                }
            }
        }
        Ok(())
    }

    /// The body ended: the form must have been closed.
    pub fn finish(&self) -> Result<(), FormError> {
        if self.is_done() {
            Ok(())
        } else {
            Err(FormError::Truncated)
        }
    }

    /// Scans preamble, data or epilogue for the delimiter; returns the bytes taken (all of
    /// `input`, or up to the end of a delimiter).
    fn scan(&mut self, input: &[u8], emit: &mut dyn FnMut(&[u8])) -> usize {
        if self.state == State::Epilogue {
            return input.len();
        }
        // Only the first part's data is handed out.
        let keep = self.state == State::Body && self.parts == 1;
        let mut out = |s: &[u8]| {
            if keep && !s.is_empty() {
                emit(s);
            }
        };
        // Bytes of `input` from `start` to `i` are data not yet handed out.
        let mut start = 0;
        let mut i = 0;
        while i < input.len() {
            if self.matched == 0 {
                // CR can only start a delimiter (the boundary has none).
                match input[i..].iter().position(|&c| c == b'\r') {
                    None => i = input.len(),
                    Some(k) => {
                        out(&input[start..i + k]);
                        self.matched = 1;
                        i += k + 1;
                        start = i;
                    }
                }
            } else if input[i] == self.delim[self.matched] {
                self.matched += 1;
                i += 1;
                start = i;
                if self.matched == self.delim.len() {
                    self.matched = 0;
                    self.state = State::AfterBoundary;
                    return i;
                }
            } else {
                // Not a delimiter after all: what was held is data; look at this byte
                // again from the start (it may be a CR).
                out(&self.delim[..self.matched]);
                self.matched = 0;
                start = i;
            }
        }
        if self.matched == 0 {
            out(&input[start..]);
        }
        input.len()
    }
}

/// A part's header block (lines ending in CRLF, then an empty line).
fn parse_head(block: &[u8]) -> Result<PartHead, FormError> {
    let text = String::from_utf8_lossy(block);
    let mut head = PartHead::default();
    for line in text.split("\r\n").filter(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':').ok_or(FormError::PartHead)?;
        let name_ok = !name.is_empty()
            && name
                .bytes()
                .all(|c| c.is_ascii_graphic() && c != b':' && c != b'"');
        if !name_ok || value.contains(['\r', '\n']) {
            return Err(FormError::PartHead);
        }
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-type") {
            head.content_type = Some(value.to_owned()).filter(|v| !v.is_empty());
        } else if name.eq_ignore_ascii_case("content-disposition") {
            for p in split_params(value).skip(1) {
                if let Some((k, v)) = p.split_once('=') {
                    let k = k.trim();
                    if k.eq_ignore_ascii_case("name") {
                        head.name = Some(unquote(v));
                    } else if k.eq_ignore_ascii_case("filename") {
                        head.filename = Some(unquote(v));
                    }
                }
            }
        }
    }
    Ok(head)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `input` fed in the given pieces; the data, the first head, and the result.
    fn run(boundary: &str, pieces: &[&[u8]]) -> (Vec<u8>, Option<PartHead>, Result<(), FormError>) {
        let mut d = FormDecoder::new(boundary);
        let mut data = Vec::new();
        for piece in pieces {
            let before = data.len();
            let held = d.held();
            if let Err(e) = d.decode(piece, &mut |s| data.extend_from_slice(s)) {
                return (data, d.first_head().cloned(), Err(e));
            }
            assert!(data.len() - before <= piece.len() + held, "output bound");
        }
        let r = d.finish();
        (data, d.first_head().cloned(), r)
    }

    const FORM: &[u8] = b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a \\\"b\\\".txt\"\r\nContent-Type: text/csv\r\n\r\nline1\r\n--Xy\r\r\n--XyY\r\nend\r\n--XyZ\r\nContent-Disposition: form-data; name=\"text\"\r\n\r\nignored\r\n--XyZ--\r\nepilogue";

    #[test]
    fn every_split_gives_the_first_parts_bytes_and_headers() {
        let want: &[u8] = b"line1\r\n--Xy\r\r\n--XyY\r\nend";
        for cut in 0..=FORM.len() {
            let (data, head, r) = run("XyZ", &[&FORM[..cut], &FORM[cut..]]);
            assert_eq!(r, Ok(()), "cut {cut}");
            assert_eq!(data, want, "cut {cut}");
            let head = head.unwrap();
            assert_eq!(head.filename.as_deref(), Some("a \"b\".txt"));
            assert_eq!(head.name.as_deref(), Some("file"));
            assert_eq!(head.content_type.as_deref(), Some("text/csv"));
        }
        let bytes: Vec<&[u8]> = FORM.chunks(1).collect();
        assert_eq!(run("XyZ", &bytes).0, want);
    }

    #[test]
    fn a_boundary_run_into_other_bytes_is_refused() {
        // "--XyY" at the start of a line inside data is data (tested above), but a
        // boundary followed by other bytes where a boundary is due is not.
        let (_, _, r) = run("XyZ", &[b"--XyZ\r\n\r\nabc\r\n--XyZ!\r\n"]);
        assert_eq!(r, Err(FormError::Delimiter));
    }

    #[test]
    fn the_form_must_be_closed() {
        let (data, head, r) = run("b", &[b"--b\r\n\r\nabc"]);
        assert_eq!(data, b"abc");
        assert!(head.is_some());
        assert_eq!(r, Err(FormError::Truncated));
        let (data, head, r) = run("b", &[b"preamble\r\n--b--"]);
        assert_eq!((data, head, r), (vec![], None, Ok(())));
    }

    #[test]
    fn part_headers_are_bounded_and_checked() {
        let mut big = b"--b\r\nX: ".to_vec();
        big.resize(MAX_PART_HEAD + 100, b'a');
        assert_eq!(run("b", &[&big]).2, Err(FormError::PartHeadTooLarge));
        assert_eq!(
            run("b", &[b"--b\r\nno colon\r\n\r\nx\r\n--b--"]).2,
            Err(FormError::PartHead)
        );
        assert_eq!(run("b", &[b"--b  \r\n\r\nx\r\n--b--"]).0, b"x");
    }

    #[test]
    fn boundaries_come_from_the_content_type() {
        assert_eq!(
            boundary("multipart/form-data; boundary=----WebKitFormBoundaryAb1"),
            Some("----WebKitFormBoundaryAb1".into())
        );
        assert_eq!(
            boundary("Multipart/Form-Data; charset=x; boundary=\"a b:c\""),
            Some("a b:c".into())
        );
        for bad in [
            "multipart/mixed; boundary=a",
            "multipart/form-data",
            "multipart/form-data; boundary=",
            "multipart/form-data; boundary=a\rb",
            "text/plain",
        ] {
            assert_eq!(boundary(bad), None, "{bad}");
        }
        let long = format!("multipart/form-data; boundary={}", "a".repeat(71));
        assert_eq!(boundary(&long), None);
    }
}
