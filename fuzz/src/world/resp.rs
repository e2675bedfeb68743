//! What a client makes of the response stream it reads.

/// Client-side reading of an HTTP/1.1 response stream.
#[derive(Debug, Clone, Default)]
pub struct RespParser {
    state: PState,
    head: Vec<u8>,
    /// Interim (1xx) responses seen.
    pub interim: Vec<u16>,
    pub status: Option<u16>,
    pub chunked: bool,
    pub length: Option<u64>,
    pub body: Vec<u8>,
    /// The body ended as its framing says (length reached, last chunk seen).
    pub complete: bool,
    /// What was wrong with the stream, if anything.
    pub error: Option<String>,
    /// The response said `Connection: close`.
    pub close: bool,
    /// Earlier responses on this connection (keep-alive).
    pub responses: usize,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum PState {
    #[default]
    Head,
    Length(u64),
    /// Close-delimited.
    ToClose,
    Size(u64, u32),
    SizeLf(u64),
    Data(u64),
    DataCr,
    DataLf,
    LastCr,
    LastLf,
    Done,
    /// The server's mark of a cut (`!transfer cut` where a chunk size was due): not
    /// whole, and not a framing error.
    Cut,
    Broken,
}

impl RespParser {
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match self.state {
                PState::Head => {
                    let b = bytes[0];
                    bytes = &bytes[1..];
                    self.head.push(b);
                    if self.head.ends_with(b"\r\n\r\n") {
                        self.end_head();
                    }
                }
                PState::Length(left) => {
                    let k = (left as usize).min(bytes.len());
                    self.body.extend_from_slice(&bytes[..k]);
                    bytes = &bytes[k..];
                    if left as usize == k {
                        self.state = PState::Done;
                        self.complete = true;
                    } else {
                        self.state = PState::Length(left - k as u64);
                    }
                }
                PState::ToClose => {
                    self.body.extend_from_slice(bytes);
                    bytes = &[];
                }
                PState::Data(left) => {
                    let k = (left as usize).min(bytes.len());
                    self.body.extend_from_slice(&bytes[..k]);
                    bytes = &bytes[k..];
                    self.state = if left as usize == k {
                        PState::DataCr
                    } else {
                        PState::Data(left - k as u64)
                    };
                }
                PState::Done if !self.close => {
                    // Keep-alive: the next response starts.
                    self.responses += 1;
                    self.state = PState::Head;
                    self.status = None;
                    self.complete = false;
                    self.body.clear();
                }
                PState::Done => {
                    self.broken(format!(
                        "{} bytes after the end of the response",
                        bytes.len()
                    ));
                    return;
                }
                PState::Broken | PState::Cut => return,
                s => {
                    let b = bytes[0];
                    bytes = &bytes[1..];
                    self.state = match (s, b) {
                        (PState::Size(v, d), b) if b.is_ascii_hexdigit() && d < 15 => {
                            PState::Size(v * 16 + (b as char).to_digit(16).unwrap() as u64, d + 1)
                        }
                        (PState::Size(0, 0), b'!') => PState::Cut,
                        (PState::Size(v, d), b'\r') if d > 0 => PState::SizeLf(v),
                        (PState::SizeLf(0), b'\n') => PState::LastCr,
                        (PState::SizeLf(v), b'\n') => PState::Data(v),
                        (PState::DataCr, b'\r') => PState::DataLf,
                        (PState::DataLf, b'\n') => PState::Size(0, 0),
                        (PState::LastCr, b'\r') => PState::LastLf,
                        (PState::LastLf, b'\n') => {
                            self.complete = true;
                            PState::Done
                        }
                        _ => {
                            self.broken(format!("bad chunk framing byte {b:#04x} in {s:?}"));
                            return;
                        }
                    };
                }
            }
        }
    }

    fn broken(&mut self, why: String) {
        self.error.get_or_insert(why);
        self.state = PState::Broken;
    }

    fn end_head(&mut self) {
        let text = String::from_utf8_lossy(&self.head).into_owned();
        self.head.clear();
        let status = text
            .strip_prefix("HTTP/1.1 ")
            .and_then(|t| t.get(..3))
            .and_then(|s| s.parse::<u16>().ok());
        let Some(status) = status else {
            return self.broken(format!("bad status line: {text:?}"));
        };
        if (100..200).contains(&status) {
            self.interim.push(status);
            return;
        }
        self.status = Some(status);
        let mut length = None;
        let mut chunked = false;
        for line in text.split("\r\n").skip(1) {
            if let Some((k, v)) = line.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse::<u64>().ok();
                } else if k.eq_ignore_ascii_case("connection") {
                    self.close = v.trim().eq_ignore_ascii_case("close");
                } else if k.eq_ignore_ascii_case("transfer-encoding") {
                    chunked = v.trim().eq_ignore_ascii_case("chunked");
                }
            }
        }
        self.chunked = chunked;
        self.length = length;
        self.state = match (chunked, length) {
            (true, Some(_)) => return self.broken("Content-Length and chunked".into()),
            (true, None) => PState::Size(0, 0),
            (false, Some(0)) => {
                self.complete = true;
                PState::Done
            }
            (false, Some(n)) => PState::Length(n),
            (false, None) => PState::ToClose,
        };
    }

    /// The body's text lines (for a sender's progress response).
    pub fn lines(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.body)
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Whether the client would stop reading: the response ended or broke.
    pub fn finished(&self) -> bool {
        matches!(self.state, PState::Done | PState::Broken | PState::Cut)
    }
}
