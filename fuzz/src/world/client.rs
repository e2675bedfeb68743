//! The world's clients: what each one is, what it sends, and what it has seen.

use std::time::Instant;

use fanpipe_core::request::Role;

use super::resp::RespParser;

/// What a client is.
#[derive(Debug, Clone)]
pub enum Kind {
    Sender {
        body: Vec<u8>,
        chunked: bool,
        /// The chunked body is broken at this input offset (it never ends well).
        malformed: Option<usize>,
    },
    Receiver,
    /// Arbitrary bytes: not checked beyond the world's general invariants.
    Raw,
}

/// How a client ends if the script does not end it first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Sends everything, reads everything, closes when its response ended.
    Normal,
    /// Stops sending at this input offset and resets the connection.
    ResetAt(usize),
    /// Stops sending at this input offset and half-closes.
    EofAt(usize),
    /// Resets the connection once it has read this many response bytes.
    ResetAfterReading(usize),
}

/// Where a client is on the server side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Not connected yet.
    Outside,
    /// In the listener's queue, not accepted yet.
    Queued,
    /// Accepted: a connection task holds its socket.
    Conn,
    /// Admitted: its socket was sent to the task of this pipe.
    Party(usize),
    /// The server dropped its socket.
    Dropped,
}

/// A client and its end of the socket.
#[derive(Debug)]
pub struct Client {
    pub kind: Kind,
    pub name: String,
    pub n: usize,
    pub plan: Plan,
    /// Every byte it will send: head and body.
    pub input: Vec<u8>,
    pub head_len: usize,
    /// For senders: input offsets of body data, as (start, len, data before).
    pub data_runs: Vec<(usize, usize, usize)>,
    /// Bytes made available to the server.
    pub offered: usize,
    /// Bytes the server has read.
    pub sent: usize,
    /// The client has half-closed (after `offered`).
    pub eof: bool,
    /// The client reset the connection: every read and write fails.
    pub dead: bool,
    /// Bytes the client will still accept.
    pub window: usize,
    pub got: Vec<u8>,
    pub resp: RespParser,
    pub shut_by_server: bool,
    pub closed_by_server: bool,
    /// The server exited with this connection still open.
    pub cut_by_exit: bool,
    pub stage: Stage,
    /// Bytes past the head the server had read when this client was admitted.
    pub leftover: usize,
    /// Bytes read when this client was admitted.
    pub sent_at_join: usize,
    /// The pipe dropped this client while it was not reading.
    pub dropped_unread: bool,
    /// The pipe dropped this client while it had not reset.
    pub dropped_alive: bool,
    /// When the server last wrote to this client (or admitted it).
    pub last_write_at: Option<Instant>,
    /// The pipe dropped this client after writing it nothing for the idle timeout.
    pub dropped_idle: bool,
    /// When the server dropped this client.
    pub dropped_at: Option<Instant>,
}

impl Client {
    /// A raw client with nothing sent or received yet.
    pub(super) fn fresh() -> Client {
        Client {
            kind: Kind::Raw,
            name: String::new(),
            n: 0,
            plan: Plan::Normal,
            head_len: 0,
            data_runs: Vec::new(),
            input: Vec::new(),
            offered: 0,
            sent: 0,
            eof: false,
            dead: false,
            window: 0,
            got: Vec::new(),
            resp: RespParser::default(),
            shut_by_server: false,
            closed_by_server: false,
            cut_by_exit: false,
            stage: Stage::Outside,
            leftover: 0,
            sent_at_join: 0,
            dropped_unread: false,
            dropped_alive: false,
            last_write_at: None,
            dropped_idle: false,
            dropped_at: None,
        }
    }

    /// Body data bytes in the first `k` input bytes.
    pub fn data_in_prefix(&self, k: usize) -> usize {
        let i = self.data_runs.partition_point(|&(s, _, _)| s < k);
        if i == 0 {
            return 0;
        }
        let (s, len, before) = self.data_runs[i - 1];
        before + len.min(k - s)
    }

    pub fn is_sender(&self) -> bool {
        matches!(self.kind, Kind::Sender { .. })
    }

    pub fn body(&self) -> Option<&[u8]> {
        match &self.kind {
            Kind::Sender { body, .. } => Some(body),
            _ => None,
        }
    }

    /// Whether the server read this sender's whole, well-formed body.
    pub fn sent_whole_body(&self) -> bool {
        match &self.kind {
            Kind::Sender { malformed, .. } => malformed.is_none() && self.sent == self.input.len(),
            _ => false,
        }
    }

    pub(super) fn kind_name(&self) -> &'static str {
        match self.kind {
            Kind::Sender { .. } => "sender",
            Kind::Receiver => "receiver",
            Kind::Raw => "raw",
        }
    }
}

/// What a client is to be, before it is built.
#[derive(Debug, Clone)]
pub struct Spec {
    pub role: Role,
    pub name: usize,
    pub n: usize,
    pub body_len: usize,
    pub chunked: bool,
    pub chunk_size: usize,
    /// Breaks the chunked body before chunk number `k` (mod the chunk count).
    pub malformed: Option<usize>,
    pub http10: bool,
    pub expect: bool,
    pub bare_path: bool,
    pub plan: Plan,
    pub seed: u64,
}
