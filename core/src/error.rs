//! Why a request is refused, and the HTTP status each refusal maps to.

use std::fmt;

use crate::request::Role;

/// A request the server will not serve. Each variant knows its status and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reject {
    /// The head is not valid HTTP/1.1 (RFC 9112); the text says what was wrong.
    Malformed(&'static str),
    /// The request line is longer than the server accepts.
    UriTooLong,
    /// The head or its header count is larger than the server accepts.
    HeadTooLarge,
    /// An HTTP version other than 1.0 or 1.1.
    Version,
    /// A transfer coding other than `chunked`.
    Coding,
    /// An `Expect` other than `100-continue`.
    Expectation,
    /// The `n` query parameter is not a whole number in range.
    InvalidN { max: usize },
    /// The `report` query parameter is neither `live` nor `end`.
    InvalidReport,
    /// The pipe was opened with another `n`.
    NMismatch { expected: usize, asked: usize },
    /// A sender (PUT/POST) to a reserved path such as `/help`.
    Reserved(String),
    /// No pipe name after the API prefix.
    NoName,
    /// The pipe has a sender already.
    SenderTaken,
    /// The pipe has all its receivers already.
    ReceiversFull { n: usize },
    /// A transfer on this name is still running.
    Busy,
    /// A method with no meaning here.
    Method,
    /// Nothing lives at this path.
    NotFound,
    /// An HTTP/1.0 receiver of a body whose length is unknown.
    NeedsLength,
    /// The client took too long to send its request head.
    Timeout,
    /// The pipe did not fill within the wait timeout.
    WaitTimeout { secs: u64 },
    /// Too many open connections.
    TooManyConnections,
    /// Too many pipes.
    TooManyPipes,
    /// The server is shutting down.
    ShuttingDown,
    /// The server wants signed URLs and this one has no `exp`, `kid` and `sig`.
    SignatureMissing,
    /// The signature does not match the URL (a changed name, `n` or expiry), or is not
    /// one at all.
    SignatureBad,
    /// The URL names a key the server does not have (retired, or another server's).
    SignatureUnknownKey,
    /// The URL is signed for the other side of the pipe.
    SignatureWrongRole { signed_for: Role },
    /// The URL expired this many seconds ago.
    SignatureExpired { ago: u64 },
    /// This client address has this many connections open already.
    ClientConnections { max: usize },
    /// This client address has opened this many pipes that are still waiting.
    ClientPipes { max: usize },
    /// A listener that expects a PROXY protocol header did not get a valid one.
    ProxyHeader(&'static str),
    /// A `GET` with `Service-Worker: script`: a pipe never serves a service worker.
    ServiceWorker,
    /// A watcher (`?progress`, `?status`) of a name that has no pipe now.
    NoPipe,
    /// A pipe already has its most watchers.
    TooManyWatchers { max: usize },
}

impl Reject {
    /// The status code this refusal is answered with.
    pub fn status(&self) -> u16 {
        match self {
            Reject::Malformed(_)
            | Reject::InvalidN { .. }
            | Reject::InvalidReport
            | Reject::NMismatch { .. }
            | Reject::Reserved(_)
            | Reject::NoName
            | Reject::ProxyHeader(_) => 400,
            Reject::SignatureMissing => 401,
            Reject::SignatureBad
            | Reject::SignatureUnknownKey
            | Reject::SignatureWrongRole { .. } => 403,
            Reject::SignatureExpired { .. } => 410,
            Reject::ClientConnections { .. } | Reject::ClientPipes { .. } => 429,
            Reject::UriTooLong => 414,
            Reject::HeadTooLarge => 431,
            Reject::Version | Reject::NeedsLength => 505,
            Reject::Coding => 501,
            Reject::Expectation => 417,
            Reject::SenderTaken | Reject::ReceiversFull { .. } | Reject::Busy => 409,
            Reject::Method => 405,
            Reject::NotFound => 404,
            Reject::Timeout | Reject::WaitTimeout { .. } => 408,
            Reject::TooManyConnections | Reject::TooManyPipes | Reject::ShuttingDown => 503,
            Reject::ServiceWorker => 403,
            Reject::NoPipe => 404,
            Reject::TooManyWatchers { .. } => 503,
        }
    }
}

impl Reject {
    /// Why a signed-URL check refused, as `/metrics` labels it: `missing`, `bad` (a
    /// changed URL, an unknown key, the other role's URL) or `expired`.
    pub fn signature_reason(&self) -> Option<&'static str> {
        match self {
            Reject::SignatureMissing => Some("missing"),
            Reject::SignatureBad
            | Reject::SignatureUnknownKey
            | Reject::SignatureWrongRole { .. } => Some("bad"),
            Reject::SignatureExpired { .. } => Some("expired"),
            _ => None,
        }
    }
}

impl fmt::Display for Reject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reject::Malformed(why) => write!(f, "malformed request: {why}"),
            Reject::UriTooLong => f.write_str("request line too long"),
            Reject::HeadTooLarge => f.write_str("request head too large"),
            Reject::Version => f.write_str("only HTTP/1.0 and HTTP/1.1 are served"),
            Reject::Coding => f.write_str("only the chunked transfer coding is supported"),
            Reject::Expectation => f.write_str("only 'Expect: 100-continue' is supported"),
            Reject::InvalidN { max } => {
                write!(f, "n must be a whole number from 1 to {max} (the number of receivers)")
            }
            Reject::InvalidReport => f.write_str(
                "report must be live (progress lines at once) or end (one answer when the transfer is over)",
            ),
            Reject::NMismatch { expected, asked } => {
                write!(f, "this pipe expects n={expected}, you asked n={asked}")
            }
            Reject::Reserved(path) => write!(
                f,
                "{path} is reserved; send to another name, or under /api/v1/pipe/"
            ),
            Reject::NoName => f.write_str("no pipe name: use /api/v1/pipe/NAME or /NAME"),
            Reject::SenderTaken => f.write_str("this pipe already has its sender"),
            Reject::ReceiversFull { n } => {
                write!(f, "this pipe already has its {n} receivers")
            }
            Reject::Busy => f.write_str(
                "a transfer on this name is still running; retry when it ends, or use another name",
            ),
            Reject::Method => f.write_str(
                "use PUT or POST to send, GET to receive (OPTIONS for CORS preflight)",
            ),
            Reject::NotFound => f.write_str("not found"),
            Reject::NeedsLength => f.write_str(
                "the sender gave no Content-Length, so an HTTP/1.0 client cannot see the end; use HTTP/1.1",
            ),
            Reject::Timeout => f.write_str("request head not received in time"),
            Reject::WaitTimeout { secs } => write!(
                f,
                "no transfer started within {secs} s: the sender and all receivers must connect in that time"
            ),
            Reject::TooManyConnections => f.write_str("too many connections; retry later"),
            Reject::TooManyPipes => f.write_str("too many pipes open; retry later"),
            Reject::ShuttingDown => f.write_str("the server is shutting down; retry later"),
            Reject::SignatureMissing => f.write_str(
                "this server serves signed URLs only: ask for a URL made with `fanpipe sign` (it carries exp, kid and sig)",
            ),
            Reject::SignatureBad => f.write_str(
                "the URL's signature does not match: its name, n or exp was changed, or it was cut short; use the URL exactly as signed",
            ),
            Reject::SignatureUnknownKey => f.write_str(
                "the URL is signed with a key this server does not have (retired, or another server's); ask for a new URL",
            ),
            Reject::SignatureWrongRole { signed_for } => write!(
                f,
                "this URL is signed for {}; {} needs its own URL (the other line of `fanpipe sign`)",
                match signed_for {
                    Role::Sender => "sending",
                    Role::Receiver => "receiving",
                },
                match signed_for {
                    Role::Sender => "a receiver",
                    Role::Receiver => "the sender",
                }
            ),
            Reject::SignatureExpired { ago } => write!(
                f,
                "this signed URL expired {ago} s ago; ask for a new one (or sign with a longer --ttl)"
            ),
            Reject::ClientConnections { max } => write!(
                f,
                "your address has {max} connections open, the most one client may hold; close some or retry later"
            ),
            Reject::ClientPipes { max } => write!(
                f,
                "your address has opened {max} pipes that are still waiting, the most one client may; let them start or end first"
            ),
            Reject::ProxyHeader(why) => write!(
                f,
                "this listener expects a PROXY protocol header first ({why}); connect through the proxy"
            ),
            Reject::ServiceWorker => f.write_str(
                "this server does not serve service worker scripts (Service-Worker: script)",
            ),
            Reject::NoPipe => f.write_str("no pipe has this name now"),
            Reject::TooManyWatchers { max } => {
                write!(f, "this pipe already has its {max} watchers; retry later")
            }
        }
    }
}
