//! The few pieces of HTTP/1.1 a load generator needs: request heads, a response-head parser
//! and a streaming chunked decoder. Written by hand so the client does no allocation or copy
//! per read and depends on nothing fanpipe-specific.

use crate::error::ClientError;

/// Largest response head we accept.
pub const MAX_HEAD: usize = 64 * 1024;

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    Length(u64),
    Chunked,
    UntilClose,
}

/// A parsed response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    pub reason: String,
    pub body: BodyKind,
}

/// The head of a request: `METHOD target HTTP/1.1` and the given extra header lines.
pub fn request_head(method: &str, target: &str, host: &str, extra: &[(&str, String)]) -> Vec<u8> {
    let mut head =
        format!("{method} {target} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: fanpipe-load\r\n");
    for (name, value) in extra {
        head.push_str(name);
        head.push_str(": ");
        head.push_str(value);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    head.into_bytes()
}

/// The length of the head at the start of `buf` (through its blank line), if it is complete.
pub fn head_len(buf: &[u8]) -> Option<usize> {
    buf.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|at| at + 4)
}

/// Parses a complete response head (as delimited by [`head_len`]).
pub fn parse_response_head(head: &[u8]) -> Result<ResponseHead, ClientError> {
    let text = std::str::from_utf8(head).map_err(|_| ClientError::BadHead("not UTF-8".into()))?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(ClientError::BadHead(format!("status line {status_line:?}")));
    }
    let status: u16 = parts
        .next()
        .and_then(|code| code.parse().ok())
        .filter(|code| (100..1000).contains(code))
        .ok_or_else(|| ClientError::BadHead(format!("status line {status_line:?}")))?;
    let reason = parts.next().unwrap_or_default().to_string();
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut other_coding = false;
    for line in lines.filter(|line| !line.is_empty()) {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| ClientError::BadHead(format!("header line {line:?}")))?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let parsed: u64 = value
                .parse()
                .map_err(|_| ClientError::BadHead(format!("Content-Length {value:?}")))?;
            if length.is_some_and(|seen| seen != parsed) {
                return Err(ClientError::BadHead("two different Content-Lengths".into()));
            }
            length = Some(parsed);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            let last = value.rsplit(',').next().unwrap_or_default().trim();
            chunked = last.eq_ignore_ascii_case("chunked");
            other_coding = !chunked;
        }
    }
    let body = if status < 200 || status == 204 || status == 304 {
        BodyKind::Length(0)
    } else if chunked {
        BodyKind::Chunked
    } else if other_coding {
        BodyKind::UntilClose
    } else if let Some(len) = length {
        BodyKind::Length(len)
    } else {
        BodyKind::UntilClose
    };
    Ok(ResponseHead {
        status,
        reason,
        body,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Size { value: u64, digits: u32 },
    Ext(u64),
    SizeLf(u64),
    Data(u64),
    DataCr,
    DataLf,
    TrailerStart,
    TrailerLine,
    TrailerLf,
    FinalLf,
    Done,
}

/// A streaming decoder of a chunked body: feed it whatever a read returned, it hands out the
/// data pieces and says when the last chunk and trailer have been read. Strict where it
/// matters to us: at least one hex digit per size, CRLF after each chunk's data.
#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    state: State,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        ChunkedDecoder {
            state: State::Size {
                value: 0,
                digits: 0,
            },
        }
    }
}

impl ChunkedDecoder {
    /// True once the last chunk and the trailer's blank line have been read.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Decodes `input`, calling `on_data` with each piece of body data. Returns how many bytes
    /// of `input` belong to the body (all of them unless the body ended inside `input`).
    pub fn feed(
        &mut self,
        input: &[u8],
        mut on_data: impl FnMut(&[u8]),
    ) -> Result<usize, ClientError> {
        let mut at = 0;
        while at < input.len() {
            let byte = input[at];
            self.state = match self.state {
                State::Data(remaining) => {
                    let take = remaining.min((input.len() - at) as u64) as usize;
                    on_data(&input[at..at + take]);
                    at += take;
                    let left = remaining - take as u64;
                    self.state = if left == 0 {
                        State::DataCr
                    } else {
                        State::Data(left)
                    };
                    continue;
                }
                State::Size { value, digits } => match (byte as char).to_digit(16) {
                    Some(d) => {
                        if digits >= 15 {
                            return Err(ClientError::Framing("chunk size too large".into()));
                        }
                        State::Size {
                            value: value * 16 + u64::from(d),
                            digits: digits + 1,
                        }
                    }
                    None if digits == 0 => {
                        return Err(ClientError::Framing("chunk size without hex digits".into()))
                    }
                    None if byte == b';' || byte == b' ' || byte == b'\t' => State::Ext(value),
                    None if byte == b'\r' => State::SizeLf(value),
                    None => {
                        return Err(ClientError::Framing(format!(
                            "byte {byte:#04x} in chunk size"
                        )))
                    }
                },
                State::Ext(value) => match byte {
                    b'\r' => State::SizeLf(value),
                    b'\n' => return Err(ClientError::Framing("bare LF in chunk extension".into())),
                    _ => State::Ext(value),
                },
                State::SizeLf(value) => match byte {
                    b'\n' if value == 0 => State::TrailerStart,
                    b'\n' => State::Data(value),
                    _ => {
                        return Err(ClientError::Framing(
                            "chunk size line not ended by CRLF".into(),
                        ))
                    }
                },
                State::DataCr => match byte {
                    b'\r' => State::DataLf,
                    _ => {
                        return Err(ClientError::Framing(
                            "chunk data not followed by CRLF".into(),
                        ))
                    }
                },
                State::DataLf => match byte {
                    b'\n' => State::Size {
                        value: 0,
                        digits: 0,
                    },
                    _ => {
                        return Err(ClientError::Framing(
                            "chunk data not followed by CRLF".into(),
                        ))
                    }
                },
                State::TrailerStart => match byte {
                    b'\r' => State::FinalLf,
                    _ => State::TrailerLine,
                },
                State::TrailerLine => match byte {
                    b'\r' => State::TrailerLf,
                    _ => State::TrailerLine,
                },
                State::TrailerLf | State::FinalLf if byte != b'\n' => {
                    return Err(ClientError::Framing(
                        "trailer line not ended by CRLF".into(),
                    ))
                }
                State::TrailerLf => State::TrailerStart,
                State::FinalLf => {
                    self.state = State::Done;
                    return Ok(at + 1);
                }
                State::Done => return Ok(at),
            };
            at += 1;
        }
        Ok(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_split(body: &[u8], split: usize) -> Result<(Vec<u8>, bool, usize), ClientError> {
        let mut decoder = ChunkedDecoder::default();
        let mut out = Vec::new();
        let first = decoder.feed(&body[..split], |d| out.extend_from_slice(d))?;
        let mut used = first;
        if !decoder.is_done() {
            used += decoder.feed(&body[split..], |d| out.extend_from_slice(d))?;
        }
        Ok((out, decoder.is_done(), used))
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_split() {
        let body = b"5\r\nhello\r\n1;ext=1\r\n \r\nA\r\n0123456789\r\n0\r\nX-T: 1\r\n\r\nextra";
        for split in 0..=body.len() {
            let (data, done, used) = decode_split(body, split).expect("valid body");
            assert_eq!(data, b"hello 0123456789");
            assert!(done);
            assert_eq!(used, body.len() - "extra".len());
        }
    }

    #[test]
    fn malformed_chunked_bodies_are_errors() {
        for bad in [
            &b"\r\n"[..],
            b"5\r\nhelloXX",
            b"zz\r\n",
            b"1;a\nb\r\n",
            b"1\rx",
        ] {
            assert!(decode_split(bad, 0).is_err(), "{bad:?}");
        }
        let (_, done, _) = decode_split(b"5\r\nhel", 3).expect("valid prefix");
        assert!(!done);
    }

    #[test]
    fn response_heads_say_how_the_body_ends() {
        let head = |text: &str| parse_response_head(text.as_bytes()).expect("valid head");
        assert_eq!(
            head("HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n").body,
            BodyKind::Length(12)
        );
        assert_eq!(
            head("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").body,
            BodyKind::Chunked
        );
        assert_eq!(head("HTTP/1.0 200 OK\r\n\r\n").body, BodyKind::UntilClose);
        assert_eq!(head("HTTP/1.1 100 Continue\r\n\r\n").status, 100);
        assert_eq!(head("HTTP/1.1 409 Conflict\r\n\r\n").reason, "Conflict");
        assert!(parse_response_head(b"SSH-2.0\r\n\r\n").is_err());
        assert!(parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n").is_err());
        assert_eq!(head_len(b"HTTP/1.1 200 OK\r\n\r\nbody"), Some(19));
        assert_eq!(head_len(b"HTTP/1.1 200 OK\r\n"), None);
    }
}
