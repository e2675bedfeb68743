//! Reading a request head that may arrive split at any byte.
//!
//! The backend reads into [`HeadReader::space`] and reports [`HeadReader::fill`]. The reader
//! scans only the new bytes for the end of the head, so a client that sends one byte at a
//! time costs linear work; `httparse` runs once, on a complete head.

use crate::error::Reject;

/// The methods that mean something to fanpipe; the rest are `Other`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Put,
    Post,
    Options,
    Other(String),
}

/// A request head, parsed and owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub method: Method,
    pub target: String,
    /// Minor version: 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor: u8,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Head {
    /// Every value of the header `name` (case-insensitive), in order.
    pub fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    /// The single value of `name`, if it is present once and is valid UTF-8.
    pub fn value(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
            .next()
            .and_then(|v| std::str::from_utf8(v).ok())
    }
}

/// Buffers bytes until a whole head is there, within the size limits.
#[derive(Debug)]
pub struct HeadReader {
    buf: Vec<u8>,
    len: usize,
    /// Bytes already scanned for the end of the head.
    scanned: usize,
    /// Whether the request line has ended (its CRLF was seen).
    line_done: bool,
    /// Set once a complete head or an error is found.
    end: Option<Result<usize, Reject>>,
    max_line: usize,
    max_head: usize,
    max_headers: usize,
}

/// How much the reader asks for at a time.
const READ_CHUNK: usize = 8 * 1024;

/// The first read of a connection: most heads (curl's, a proxy's) fit in it, so a thousand
/// connections reading their heads at once do not each hold (and zero) `READ_CHUNK`.
const FIRST_READ: usize = 1024;

impl HeadReader {
    pub fn new(max_line: usize, max_head: usize, max_headers: usize) -> Self {
        HeadReader {
            buf: Vec::new(),
            len: 0,
            scanned: 0,
            line_done: false,
            end: None,
            max_line,
            max_head,
            max_headers,
        }
    }

    /// Where the backend should read the next bytes to.
    pub fn space(&mut self) -> &mut [u8] {
        // Allow one byte past the limit so an oversized head is seen as such.
        let chunk = if self.buf.is_empty() {
            FIRST_READ
        } else {
            READ_CHUNK
        };
        let want = (self.len + chunk).min(self.max_head + 1).max(self.len + 1);
        if self.buf.len() < want {
            self.buf.resize(want, 0);
        }
        &mut self.buf[self.len..]
    }

    /// Reports that `n` bytes were read into [`Self::space`].
    pub fn fill(&mut self, n: usize) {
        self.len = (self.len + n).min(self.buf.len());
        if self.end.is_none() {
            self.scan();
        }
    }

    /// Bytes buffered and not yet consumed.
    pub fn buffered(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// Whether no byte of a next request has arrived.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A complete head, or why the bytes can never be one; `None` while more are needed.
    pub fn poll_head(&mut self) -> Option<Result<Head, Reject>> {
        let end = match self.end.take()? {
            Ok(end) => end,
            Err(e) => return Some(Err(e)),
        };
        let parsed = parse(&self.buf[..end], self.max_headers);
        self.buf.copy_within(end..self.len, 0);
        self.len -= end;
        self.scanned = 0;
        self.line_done = false;
        self.scan();
        Some(parsed)
    }

    /// Takes the bytes that followed the last head (a body's start, or pipelined requests).
    pub fn take_rest(&mut self) -> Vec<u8> {
        let rest = self.buf[..self.len].to_vec();
        self.len = 0;
        self.scanned = 0;
        self.line_done = false;
        self.end = None;
        rest
    }

    /// Looks at the bytes not yet scanned for the blank line that ends a head.
    fn scan(&mut self) {
        let mut i = self.scanned;
        while i < self.len {
            // Limits hold however the bytes were split into reads.
            if !self.line_done && i >= self.max_line {
                self.end = Some(Err(Reject::UriTooLong));
                return;
            }
            if i >= self.max_head {
                self.end = Some(Err(Reject::HeadTooLarge));
                return;
            }
            let b = self.buf[i];
            if b == b'\n' {
                if i == 0 || self.buf[i - 1] != b'\r' {
                    self.end = Some(Err(Reject::Malformed("line ended by LF without CR")));
                    return;
                }
                // Empty lines before the request line are ignored (RFC 9112, 2.2).
                let line_start = self.buf[..i - 1]
                    .iter()
                    .rposition(|&c| c == b'\n')
                    .map_or(0, |p| p + 1);
                if i - 1 == line_start && self.line_done {
                    self.end = Some(Ok(i + 1));
                    return;
                }
                if i - 1 > line_start {
                    self.line_done = true;
                }
            }
            i += 1;
        }
        self.scanned = i;
    }
}

fn parse(bytes: &[u8], max_headers: usize) -> Result<Head, Reject> {
    let mut headers = vec![httparse::EMPTY_HEADER; max_headers];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(bytes) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(Reject::Malformed("incomplete head")),
        Err(httparse::Error::TooManyHeaders) => return Err(Reject::HeadTooLarge),
        Err(httparse::Error::Version) => {
            return Err(if looks_like_http_version(bytes) {
                Reject::Version
            } else {
                Reject::Malformed("bad HTTP version")
            })
        }
        Err(httparse::Error::HeaderName) => return Err(Reject::Malformed("invalid header name")),
        Err(httparse::Error::HeaderValue) => return Err(Reject::Malformed("invalid header value")),
        Err(httparse::Error::Token) => return Err(Reject::Malformed("invalid method")),
        Err(_) => return Err(Reject::Malformed("invalid request line")),
    }
    let method = match req.method.unwrap_or("") {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        "PUT" => Method::Put,
        "POST" => Method::Post,
        "OPTIONS" => Method::Options,
        other => Method::Other(other.to_owned()),
    };
    let target = req.path.unwrap_or("").to_owned();
    let minor = req.version.unwrap_or(1);
    let headers = req
        .headers
        .iter()
        .map(|h| (h.name.to_owned(), h.value.to_vec()))
        .collect::<Vec<_>>();
    for (_, v) in &headers {
        if v.iter().any(|&c| c == b'\r' || c == b'\n' || c == 0) {
            return Err(Reject::Malformed("CR, LF or NUL in a header value"));
        }
    }
    Ok(Head {
        method,
        target,
        minor,
        headers,
    })
}

/// Whether the request line ends in a well-formed `HTTP/x.y` that we just do not serve.
fn looks_like_http_version(bytes: &[u8]) -> bool {
    let start = bytes
        .iter()
        .position(|&c| c != b'\r' && c != b'\n')
        .unwrap_or(0);
    let line = &bytes[start..];
    let end = line.iter().position(|&c| c == b'\r').unwrap_or(line.len());
    let line = &line[..end];
    let Some(sp) = line.iter().rposition(|&c| c == b' ') else {
        return false;
    };
    let v = &line[sp + 1..];
    v.len() == 8
        && v.starts_with(b"HTTP/")
        && v[5].is_ascii_digit()
        && v[6] == b'.'
        && v[7].is_ascii_digit()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader() -> HeadReader {
        HeadReader::new(8192, 32768, 100)
    }

    fn feed(r: &mut HeadReader, bytes: &[u8]) {
        let mut rest = bytes;
        while !rest.is_empty() {
            let space = r.space();
            let k = space.len().min(rest.len());
            space[..k].copy_from_slice(&rest[..k]);
            r.fill(k);
            rest = &rest[k..];
        }
    }

    fn parse_all(bytes: &[u8]) -> Option<Result<Head, Reject>> {
        let mut r = reader();
        feed(&mut r, bytes);
        r.poll_head()
    }

    #[test]
    fn parses_a_head_split_at_every_byte() {
        let req = b"PUT /x?n=2 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc";
        let whole = parse_all(req).unwrap().unwrap();
        for split in 0..req.len() {
            let mut r = reader();
            feed(&mut r, &req[..split]);
            let early = r.poll_head();
            feed(&mut r, &req[split..]);
            let head = early.or_else(|| r.poll_head()).unwrap().unwrap();
            assert_eq!(head, whole);
            assert_eq!(r.buffered(), b"abc");
        }
        assert_eq!(whole.method, Method::Put);
        assert_eq!(whole.target, "/x?n=2");
        assert_eq!(whole.value("content-length"), Some("3"));
    }

    #[test]
    fn a_byte_at_a_time_waits_without_reparsing() {
        let mut r = reader();
        for &b in b"GET / HTTP/1.1\r\nHost: a\r\n" {
            feed(&mut r, &[b]);
            assert!(r.poll_head().is_none());
        }
        feed(&mut r, b"\r\n");
        assert!(r.poll_head().unwrap().is_ok());
    }

    #[test]
    fn pipelined_heads_come_out_one_by_one() {
        let mut r = reader();
        feed(
            &mut r,
            b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\n\r\n",
        );
        assert_eq!(r.poll_head().unwrap().unwrap().target, "/a");
        assert_eq!(r.poll_head().unwrap().unwrap().target, "/b");
        assert!(r.poll_head().is_none());
        assert!(r.is_empty());
    }

    #[test]
    fn leading_empty_lines_are_ignored() {
        let head = parse_all(b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(head.target, "/");
    }

    #[test]
    fn malformed_heads_are_refused_with_their_status() {
        let cases: &[(&[u8], u16)] = &[
            (b"GET / HTTP/1.1\nHost: a\n\n", 400),
            (b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nBad Name: a\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: a\0b\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: a\rb\r\n\r\n", 400),
            (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
            (b"GET / HTTP/1.2\r\nHost: a\r\n\r\n", 505),
            (b"GET / HTTX/1.1\r\nHost: a\r\n\r\n", 400),
            (b"G(T / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        ];
        for (req, status) in cases {
            let got = parse_all(req).unwrap();
            assert_eq!(
                got.map_err(|e| e.status()),
                Err(*status),
                "{}",
                String::from_utf8_lossy(req)
            );
        }
    }

    #[test]
    fn limits_hold_whatever_the_reads() {
        let mut r = HeadReader::new(16, 40, 100);
        feed(
            &mut r,
            b"GET /aaaaaaaaaaaaaaaaaaaa HTTP/1.1\r\nHost: a\r\n\r\n",
        );
        assert_eq!(r.poll_head().unwrap().unwrap_err(), Reject::UriTooLong);
        let mut r = HeadReader::new(40, 40, 100);
        feed(
            &mut r,
            b"GET / HTTP/1.1\r\nHost: a\r\nX: aaaaaaaaaaaaaaaa\r\n\r\n",
        );
        assert_eq!(r.poll_head().unwrap().unwrap_err(), Reject::HeadTooLarge);
        let exact = b"GET / HTTP/1.1\r\nHost: a\r\nX: aaaaaaa\r\n\r\n";
        let mut r = HeadReader::new(40, exact.len(), 100);
        feed(&mut r, exact);
        assert!(
            r.poll_head().unwrap().is_ok(),
            "a head of exactly the limit passes"
        );
    }

    #[test]
    fn limits_give_414_and_431() {
        let mut long_line = b"GET /".to_vec();
        long_line.extend(std::iter::repeat_n(b'a', 10_000));
        assert_eq!(
            parse_all(&long_line).unwrap().unwrap_err(),
            Reject::UriTooLong
        );

        let mut big = b"GET / HTTP/1.1\r\nHost: a\r\nX: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', 40_000));
        assert_eq!(parse_all(&big).unwrap().unwrap_err(), Reject::HeadTooLarge);

        let mut many = b"GET / HTTP/1.1\r\nHost: a\r\n".to_vec();
        for i in 0..150 {
            many.extend(format!("X-{i}: v\r\n").as_bytes());
        }
        many.extend(b"\r\n");
        assert_eq!(parse_all(&many).unwrap().unwrap_err(), Reject::HeadTooLarge);
    }
}
