//! What can go wrong for one client, typed so a report can say it in one line.

use std::fmt;
use std::io;

/// Why one sender or receiver did not complete its exchange.
#[derive(Debug)]
pub enum ClientError {
    /// The TCP connection could not be made.
    Connect(io::Error),
    /// The TLS handshake failed (a certificate not trusted, a name that does not match,
    /// no common version or cipher suite, or the server spoke plain HTTP).
    Handshake(io::Error),
    /// A read or write on the established connection failed.
    Io(io::Error),
    /// The connection ended before a whole response head arrived.
    NoResponse,
    /// The sender did not send, because a receiver of its pipe could not make its request.
    NotSent,
    /// The sender stopped uploading because the server had already answered with an error.
    Abandoned,
    /// The response head was not HTTP/1.x as we read it.
    BadHead(String),
    /// The server answered with a status other than the one expected.
    Status {
        status: u16,
        reason: String,
        body: String,
    },
    /// The body's chunked framing was malformed.
    Framing(String),
    /// The connection ended before the body did.
    Cut { got: u64, expected: Option<u64> },
    /// The sender's response ended on an error line.
    ServerSaid(String),
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Connect(e) => write!(f, "connect failed: {e}"),
            ClientError::Handshake(e) => write!(f, "TLS handshake failed: {e}"),
            ClientError::Io(e) => write!(f, "i/o error: {e}"),
            ClientError::NoResponse => write!(f, "connection ended before a response head"),
            ClientError::NotSent => write!(
                f,
                "not sent: a receiver of this pipe could not make its request"
            ),
            ClientError::Abandoned => {
                write!(f, "upload stopped: the server answered before it ended")
            }
            ClientError::BadHead(why) => write!(f, "malformed response head: {why}"),
            ClientError::Status {
                status,
                reason,
                body,
            } => {
                write!(f, "status {status} {reason}")?;
                if !body.is_empty() {
                    write!(f, ": {body}")?;
                }
                Ok(())
            }
            ClientError::Framing(why) => write!(f, "malformed chunked body: {why}"),
            ClientError::Cut {
                got,
                expected: Some(len),
            } => {
                write!(f, "connection ended after {got} of {len} body bytes")
            }
            ClientError::Cut {
                got,
                expected: None,
            } => {
                write!(
                    f,
                    "connection ended after {got} body bytes, before the last chunk"
                )
            }
            ClientError::ServerSaid(line) => write!(f, "server said: {line}"),
        }
    }
}

impl std::error::Error for ClientError {}
