//! Limits and sizes. Every one is a command-line flag of the server.

use std::sync::Arc;
use std::time::Duration;

use crate::budget::MemoryBudget;
use crate::client::Cidr;
use crate::request::Report;
use crate::signed::Keys;

/// What the core needs to know of the operator's choices.
#[derive(Debug, Clone)]
pub struct Config {
    /// Largest `n` a pipe may ask for.
    pub max_receivers: usize,
    /// Bytes a pipe holds between its sender and its slowest receiver.
    pub buffer_size: usize,
    /// Largest request line (method, target, version); past it: `414`.
    pub max_request_line: usize,
    /// Largest request head; past it: `431`.
    pub max_head_size: usize,
    /// Most header fields in one request; past it: `431`.
    pub max_headers: usize,
    /// Time a client has to send a whole head once it has started (slow-loris).
    pub head_timeout: Duration,
    /// Time an idle keep-alive connection is kept open.
    pub keepalive_timeout: Duration,
    /// Time a response write may stall before the connection is dropped.
    pub write_timeout: Duration,
    /// Time given to a client to read our error before its connection is closed.
    pub linger_timeout: Duration,
    /// How often a waiting receiver that half-closed is probed to see if it is still there.
    pub probe_interval: Duration,
    /// How often a waiting sender is told it still waits: the write finds a sender that
    /// has gone, and keeps proxies from timing out a silent response (many cut a response
    /// that is silent for 30 s or 60 s).
    pub heartbeat_interval: Duration,
    /// How often the kernel is asked whether a waiting sender (which is not read) is still
    /// there: a sender that goes away frees its name this soon.
    pub peer_check_interval: Duration,
    /// After the stop signal, how long `/healthz` answers `503` while everything else is
    /// still served, before the listener closes: a load balancer's health check moves new
    /// names away first.
    pub drain_delay: Duration,
    /// How long a party may wait for its pipe to fill.
    pub wait_timeout: Duration,
    /// How long a running transfer may move no byte before its stalled parties are dropped.
    pub idle_timeout: Duration,
    /// Most open connections; more are answered `503` and closed.
    pub max_connections: usize,
    /// Most pipes (waiting or running); a party that would open one more gets `503`.
    pub max_pipes: usize,
    /// When a sender that does not say (`report=`) gets its response head.
    pub sender_report: Report,
    /// The keys of `--secret-file`: when set, every pipe request must be signed.
    pub keys: Option<Arc<Keys>>,
    /// The listener expects a PROXY protocol header before each connection's first head.
    pub proxy_protocol: bool,
    /// Peers whose `X-Forwarded-For` names the client.
    pub trusted_proxies: Vec<Cidr>,
    /// Most connections one client address may hold open (0: no limit).
    pub max_connections_per_client: usize,
    /// Most pipes one client address may have opened that are still waiting (0: no limit).
    pub max_waiting_per_client: usize,
    /// A receiver moving fewer bytes per second than this over `min_rate_window`, while
    /// bytes wait for it, is dropped (0: never).
    pub min_receiver_rate: u64,
    /// The window `min_receiver_rate` is measured over.
    pub min_rate_window: Duration,
    /// What all pipes' buffers may hold together (`--memory-limit`), shared by every clone
    /// of this config.
    pub memory: MemoryBudget,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_receivers: 1000,
            buffer_size: 1 << 20,
            max_request_line: 8 * 1024,
            max_head_size: 32 * 1024,
            max_headers: 100,
            head_timeout: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(60),
            linger_timeout: Duration::from_secs(2),
            probe_interval: Duration::from_secs(1),
            heartbeat_interval: Duration::from_secs(20),
            peer_check_interval: Duration::from_millis(50),
            drain_delay: Duration::ZERO,
            wait_timeout: Duration::from_secs(3600),
            idle_timeout: Duration::from_secs(300),
            max_connections: 10_000,
            max_pipes: 10_000,
            sender_report: Report::Live,
            keys: None,
            proxy_protocol: false,
            trusted_proxies: Vec::new(),
            max_connections_per_client: DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
            max_waiting_per_client: DEFAULT_MAX_WAITING_PER_CLIENT,
            min_receiver_rate: 0,
            min_rate_window: Duration::from_secs(30),
            memory: MemoryBudget::default(),
        }
    }
}

/// Connections one client address may hold by default: a CI host with a few fan-outs of
/// a hundred receivers is far from it, one address alone cannot take the default
/// `max_connections` (10000).
pub const DEFAULT_MAX_CONNECTIONS_PER_CLIENT: usize = 500;

/// Waiting pipes one client address may have opened by default: one address alone
/// cannot take the default `max_pipes` (10000).
pub const DEFAULT_MAX_WAITING_PER_CLIENT: usize = 100;

/// Smallest buffer a pipe may be given: a chunk header and some data must fit.
pub const MIN_BUFFER_SIZE: usize = 4096;

/// Connections the kernel may queue before the server accepts them. A CI matrix connects
/// all at once (hundreds of receivers within a millisecond); a short queue drops SYNs and
/// costs each dropped client a one-second retransmit. Linux caps it at `somaxconn`.
pub const LISTEN_BACKLOG: i32 = 4096;
