//! One client connection until it becomes a party of a pipe: reads heads, answers the
//! server's own pages, refusals and preflights, keeps alive, and closes politely.
//!
//! The backend asks [`Conn::poll_action`] what to do next and reports back.

use std::net::IpAddr;
use std::time::Instant;

use crate::client::{forwarded_client, ClientAddr};
use crate::config::Config;
use crate::error::Reject;
use crate::head::{Head, HeadReader};
use crate::proxy_protocol;
use crate::request::{interpret, Page, Request, Role, Route};
use crate::response;
use crate::signed::Credentials;

/// What the backend must do next for this connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Read into [`Conn::read_buf`], then [`Conn::handle_read`]; race it with the deadline.
    Read,
    /// Write [`Conn::output`], then [`Conn::handle_wrote`].
    Write,
    /// Shut down the write side, then call [`Conn::handle_shutdown`].
    Shutdown,
    /// Ask the hub for the page [`Conn::hub_page`] names (the server's own state: metrics,
    /// health) and give it to [`Conn::handle_hub_page`].
    HubPage,
    /// Take [`Conn::take_pipe_request`] to the registry.
    Pipe,
    /// Drop the connection.
    Close,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum After {
    NextRequest,
    Linger,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// A PROXY protocol header is expected before the first head.
    Proxy,
    Head,
    Write(After),
    Shutdown,
    Linger,
    HubPage,
    Pipe,
    Closed,
}

/// A connection's HTTP state before any pipe.
#[derive(Debug)]
pub struct Conn {
    config: Config,
    reader: HeadReader,
    state: State,
    out: Vec<u8>,
    out_pos: usize,
    deadline: Option<Instant>,
    /// When the first byte of the current head arrived.
    head_started: Option<Instant>,
    pending: Option<Request>,
    discard: Vec<u8>,
    discarded: usize,
    refused: Option<Reject>,
    /// The client came through TLS: the URLs shown to it are `https://`.
    tls: bool,
    /// The client's address as the connection shows it: the TCP peer, or the one its
    /// PROXY header names. `None`: not known (a connection made by a test).
    peer: Option<IpAddr>,
    /// The bytes of a PROXY header read so far.
    proxy_buf: Vec<u8>,
    /// How many bytes of `proxy_buf` were read (the rest is lent to the next read).
    proxy_len: usize,
    /// A client to count this connection under, for the backend to take.
    new_client: Option<ClientAddr>,
    /// Who sent the pending pipe request, and its signature parameters.
    client: Option<ClientAddr>,
    credentials: Credentials,
    /// The request handed over was a watcher's (`Some(once)`): a name with no pipe is
    /// answered with the `none` state, not a refusal.
    watching: Option<bool>,
}

/// Bytes a read of a PROXY header may take at a time.
const PROXY_READ: usize = 512;

/// Most bytes read and thrown away while lingering before a close.
const MAX_LINGER_BYTES: usize = 1 << 20;

/// A pipe request handed to the registry, with the bytes read past its head.
#[derive(Debug, Clone)]
pub struct PipeRequest {
    pub request: Request,
    pub leftover: Vec<u8>,
    /// Whom the per-client limits count it under (`None`: no one, a connection made by a
    /// test).
    pub client: Option<ClientAddr>,
    /// The signature parameters of its URL.
    pub credentials: Credentials,
}

impl PipeRequest {
    /// The role its route names. `take_pipe_request` only hands over pipe routes; any
    /// other would be a receiver of nothing.
    pub fn role(&self) -> Role {
        match &self.request.route {
            Route::Pipe { role, .. } => *role,
            _ => Role::Receiver,
        }
    }
}

impl Conn {
    pub fn new(config: &Config, now: Instant) -> Self {
        Conn {
            reader: HeadReader::new(
                config.max_request_line,
                config.max_head_size,
                config.max_headers,
            ),
            config: config.clone(),
            state: State::Head,
            out: Vec::new(),
            out_pos: 0,
            deadline: Some(now + config.head_timeout),
            head_started: None,
            pending: None,
            discard: Vec::new(),
            discarded: 0,
            refused: None,
            tls: false,
            peer: None,
            proxy_buf: Vec::new(),
            proxy_len: 0,
            new_client: None,
            client: None,
            credentials: Credentials::default(),
            watching: None,
        }
    }

    /// A connection accepted from `peer`. On a listener that expects a PROXY header it
    /// waits for one first (within the head timeout); else, unless the peer is a trusted
    /// proxy (whose connections carry many clients), its client is the peer, to be
    /// counted ([`Conn::take_new_client`]).
    pub fn accepted(config: &Config, peer: IpAddr, now: Instant) -> Self {
        let mut conn = Conn::new(config, now);
        conn.peer = Some(peer);
        if config.proxy_protocol {
            conn.state = State::Proxy;
        } else {
            conn.new_client = conn.own_client();
        }
        conn
    }

    /// The client this connection is to be counted under, once it is known.
    pub fn take_new_client(&mut self) -> Option<ClientAddr> {
        self.new_client.take()
    }

    /// The peer as a client, if it is not a trusted proxy.
    fn own_client(&self) -> Option<ClientAddr> {
        let peer = self.peer?;
        let trusted = self.config.trusted_proxies.iter().any(|c| c.contains(peer));
        (!trusted).then(|| ClientAddr::of(peer))
    }

    /// Who sent this head: the peer, or for a trusted proxy, the client its
    /// `X-Forwarded-For` names (the proxy itself when it names none).
    fn client_of(&self, head: &Head) -> Option<ClientAddr> {
        let peer = self.peer?;
        let trusted = &self.config.trusted_proxies;
        if !trusted.iter().any(|c| c.contains(peer)) {
            return Some(ClientAddr::of(peer));
        }
        let forwarded = forwarded_client(head.values("x-forwarded-for"), trusted);
        Some(ClientAddr::of(forwarded.unwrap_or(peer)))
    }

    /// Bytes of a PROXY header came: on a whole one, the client is known and what
    /// followed it is the first head.
    fn proxy_read(&mut self, n: usize, now: Instant) {
        if n == 0 {
            return self.close();
        }
        match proxy_protocol::parse(&self.proxy_buf) {
            Ok(None) => {}
            Err(why) => self.refuse(&Reject::ProxyHeader(why), now),
            Ok(Some(header)) => {
                if let Some(client) = header.client {
                    self.peer = Some(client);
                }
                self.new_client = self.own_client();
                self.state = State::Head;
                let rest = self.proxy_buf.split_off(header.len);
                self.proxy_buf = Vec::new();
                self.feed(&rest, now);
            }
        }
    }

    /// Bytes read already, as if read now.
    fn feed(&mut self, bytes: &[u8], now: Instant) {
        let mut rest = bytes;
        while !rest.is_empty() && self.state == State::Head {
            let space = self.reader.space();
            let k = space.len().min(rest.len());
            space[..k].copy_from_slice(&rest[..k]);
            self.handle_read(k, now);
            rest = &rest[k..];
        }
    }

    /// Says the connection came through TLS (the driver knows; the request cannot tell),
    /// so the server's own URLs on its pages are `https://`.
    pub fn set_tls(&mut self, tls: bool) {
        self.tls = tls;
    }

    /// Starts a connection on bytes already read (a keep-alive connection handed back).
    pub fn with_bytes(config: &Config, bytes: &[u8], now: Instant) -> Self {
        let mut conn = Conn::new(config, now);
        conn.feed(bytes, now);
        conn
    }

    pub fn poll_action(&self) -> Action {
        match self.state {
            State::Proxy | State::Head | State::Linger => Action::Read,
            State::Write(_) => Action::Write,
            State::Shutdown => Action::Shutdown,
            State::HubPage => Action::HubPage,
            State::Pipe => Action::Pipe,
            State::Closed => Action::Close,
        }
    }

    /// When [`Conn::handle_timeout`] is due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadline
    }

    pub fn read_buf(&mut self) -> &mut [u8] {
        if self.state == State::Linger {
            self.discard.resize(16 * 1024, 0);
            return &mut self.discard;
        }
        if self.state == State::Proxy {
            // Taken in small reads, so that a v1 line is not followed by much of the head.
            let at = self.proxy_len;
            let room = PROXY_READ.min(proxy_protocol::V2_MAX + 1 - at.min(proxy_protocol::V2_MAX));
            self.proxy_buf.resize(at + room, 0);
            return &mut self.proxy_buf[at..];
        }
        self.reader.space()
    }

    /// `n` bytes were read; 0 is the end of the stream (or a read error).
    pub fn handle_read(&mut self, n: usize, now: Instant) {
        match self.state {
            State::Linger => {
                self.discarded += n;
                if n == 0 || self.discarded > MAX_LINGER_BYTES {
                    self.close();
                }
            }
            State::Proxy => {
                self.proxy_len = (self.proxy_len + n).min(self.proxy_buf.len());
                self.proxy_buf.truncate(self.proxy_len);
                self.proxy_read(n, now);
            }
            State::Head if n == 0 => self.close(),
            State::Head => {
                if self.head_started.is_none() {
                    self.head_started = Some(now);
                    self.deadline = Some(now + self.config.head_timeout);
                }
                self.reader.fill(n);
                self.next_head(now);
            }
            _ => {}
        }
    }

    pub fn output(&self) -> &[u8] {
        &self.out[self.out_pos..]
    }

    pub fn handle_wrote(&mut self, n: usize, now: Instant) {
        let State::Write(after) = self.state else {
            return;
        };
        self.out_pos += n;
        if self.out_pos < self.out.len() {
            return;
        }
        self.out.clear();
        self.out_pos = 0;
        match after {
            After::NextRequest => {
                self.state = State::Head;
                self.head_started = None;
                self.deadline = Some(now + self.config.keepalive_timeout);
                self.next_head(now);
            }
            After::Linger => self.state = State::Shutdown,
        }
    }

    /// A write or read failed: nothing more can be said.
    pub fn handle_error(&mut self) {
        self.close();
    }

    pub fn handle_shutdown(&mut self, now: Instant) {
        if self.state == State::Shutdown {
            self.state = State::Linger;
            self.deadline = Some(now + self.config.linger_timeout);
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.deadline.is_none_or(|d| now < d) {
            return;
        }
        match self.state {
            State::Head if self.reader.is_empty() => self.close(),
            State::Head => self.refuse(&Reject::Timeout, now),
            _ => self.close(),
        }
    }

    /// Which of the hub's pages the request asks for, while [`Action::HubPage`].
    pub fn hub_page(&self) -> Option<Page> {
        match (&self.state, &self.pending) {
            (State::HubPage, Some(req)) => match req.route {
                Route::Page(page) => Some(page),
                _ => None,
            },
            _ => None,
        }
    }

    /// The hub's answer to [`Conn::hub_page`].
    pub fn handle_hub_page(&mut self, status: u16, text: &str, now: Instant) {
        if let (State::HubPage, Some(req)) = (self.state, self.pending.take()) {
            let keep = req.keep_alive && !req.has_body();
            response::text(&mut self.out, status, text, keep, req.head_only, "");
            self.write(keep, now);
        }
    }

    /// The pipe request, with the bytes that came after its head.
    pub fn take_pipe_request(&mut self) -> Option<PipeRequest> {
        if self.state != State::Pipe {
            return None;
        }
        let request = self.pending.take()?;
        self.watching = match request.route {
            Route::Watch { once, .. } => Some(once),
            _ => None,
        };
        self.state = State::Closed;
        self.deadline = None;
        Some(PipeRequest {
            request,
            leftover: self.reader.take_rest(),
            client: self.client.take(),
            credentials: std::mem::take(&mut self.credentials),
        })
    }

    /// The last request this connection refused, for the logs and metrics.
    pub fn take_refused(&mut self) -> Option<Reject> {
        self.refused.take()
    }

    /// The request is refused (by the registry, or the server is full): answer it and close.
    pub fn handle_refused(&mut self, why: &Reject, now: Instant) {
        if let (Reject::NoPipe, Some(once)) = (why, self.watching.take()) {
            self.out.clear();
            self.out_pos = 0;
            crate::pipe::watch::no_pipe(&mut self.out, once, false);
            self.write(false, now);
            return;
        }
        self.refuse(why, now);
    }

    fn next_head(&mut self, now: Instant) {
        if self.state != State::Head {
            return;
        }
        let Some(parsed) = self.reader.poll_head() else {
            return;
        };
        self.head_started = None;
        let head = match parsed {
            Ok(head) => head,
            Err(why) => return self.refuse(&why, now),
        };
        let mut req = match interpret(&head, self.config.max_receivers) {
            Ok(req) => req,
            Err(why) => return self.refuse(&why, now),
        };
        if self.tls {
            if let Some(rest) = req.base_url.strip_prefix("http://") {
                req.base_url = format!("https://{rest}");
            }
        }
        let keep = req.keep_alive && !req.has_body();
        match &req.route {
            Route::Pipe { .. } | Route::Watch { .. } => {
                self.client = self.client_of(&head);
                self.credentials = Credentials::from_target(&head.target);
                self.pending = Some(req);
                self.state = State::Pipe;
                self.deadline = None;
            }
            Route::Page(Page::Metrics | Page::Health) => {
                self.pending = Some(req);
                self.state = State::HubPage;
            }
            Route::Page(page) => {
                if !crate::page::respond(&mut self.out, *page, &req, keep) {
                    response::page(&mut self.out, *page, &req.base_url, "", keep, req.head_only);
                }
                self.write(keep, now);
            }
            Route::Preflight => {
                let headers = req.cors_headers.as_deref();
                let pna = req.web.private_network;
                response::preflight_private(&mut self.out, headers, keep, pna);
                self.write(keep, now);
            }
        }
    }

    fn refuse(&mut self, why: &Reject, now: Instant) {
        self.refused = Some(why.clone());
        self.out.clear();
        self.out_pos = 0;
        response::reject(&mut self.out, why, false);
        self.write(false, now);
    }

    fn write(&mut self, keep_alive: bool, now: Instant) {
        self.state = State::Write(if keep_alive {
            After::NextRequest
        } else {
            After::Linger
        });
        self.deadline = Some(now + self.config.write_timeout);
    }

    fn close(&mut self) {
        self.state = State::Closed;
        self.deadline = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Feeds `input` in pieces of `piece` bytes, writing out every response; returns
    /// what was written and the final action.
    fn run(input: &[u8], piece: usize) -> (String, Action, Conn) {
        let now = Instant::now();
        let mut c = Conn::new(&Config::default(), now);
        let mut written = Vec::new();
        let mut rest = input;
        loop {
            match c.poll_action() {
                Action::Write => {
                    written.extend_from_slice(c.output());
                    let n = c.output().len();
                    c.handle_wrote(n, now);
                }
                Action::Shutdown => c.handle_shutdown(now),
                Action::HubPage => c.handle_hub_page(200, "m 1\n", now),
                Action::Read => {
                    let buf = c.read_buf();
                    let k = buf.len().min(rest.len()).min(piece);
                    buf[..k].copy_from_slice(&rest[..k]);
                    rest = &rest[k..];
                    c.handle_read(k, now);
                    if k == 0 {
                        break;
                    }
                }
                a @ (Action::Pipe | Action::Close) => {
                    return (String::from_utf8_lossy(&written).into(), a, c)
                }
            }
        }
        (String::from_utf8_lossy(&written).into(), c.poll_action(), c)
    }

    #[test]
    fn keep_alive_serves_pipelined_requests_at_any_split() {
        let input =
            b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\nGET /version HTTP/1.1\r\nHost: a\r\n\r\n";
        for piece in [1, 5, 1000] {
            let (out, action, _) = run(input, piece);
            assert_eq!(out.matches("HTTP/1.1 200 OK").count(), 2, "{out}");
            assert!(out.ends_with(&format!("fanpipe {}\n", crate::VERSION)));
            assert_eq!(action, Action::Close);
        }
    }

    #[test]
    fn a_get_body_is_never_read_as_the_next_request() {
        let input = b"GET /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: 37\r\n\r\nGET /version HTTP/1.1\r\nHost: a\r\n\r\n";
        let (out, _, _) = run(input, 7);
        assert_eq!(out.matches("HTTP/1.1").count(), 1);
        assert!(out.contains("Connection: close\r\n"));
    }

    #[test]
    fn malformed_head_is_answered_and_closed() {
        let (out, action, _) = run(
            b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            3,
        );
        assert!(out.starts_with("HTTP/1.1 400 Bad Request\r\n"));
        assert!(out.contains("Connection: close\r\n"));
        assert_eq!(action, Action::Close);
    }

    #[test]
    fn pipe_requests_are_handed_over_with_their_leftover() {
        let (out, action, mut c) = run(b"PUT /x?n=2 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\nab", 4);
        assert_eq!(out, "");
        assert_eq!(action, Action::Pipe);
        let p = c.take_pipe_request().unwrap();
        assert_eq!(p.leftover, b"ab");
        assert!(p.request.expect_continue);
    }

    #[test]
    fn slow_head_gets_408_at_the_deadline() {
        let now = Instant::now();
        let mut c = Conn::new(&Config::default(), now);
        let buf = c.read_buf();
        buf[..3].copy_from_slice(b"GET");
        c.handle_read(3, now);
        let due = c.poll_timeout().unwrap();
        assert_eq!(due, now + Config::default().head_timeout);
        c.handle_timeout(due - Duration::from_millis(1));
        assert_eq!(c.poll_action(), Action::Read);
        c.handle_timeout(due);
        assert_eq!(c.poll_action(), Action::Write);
        assert!(c.output().starts_with(b"HTTP/1.1 408 "));
    }

    #[test]
    fn preflight_allows_the_requested_headers() {
        let (out, _, _) = run(b"OPTIONS /x HTTP/1.1\r\nHost: a\r\nAccess-Control-Request-Headers: content-type\r\n\r\n", 100);
        assert!(out.starts_with("HTTP/1.1 204 No Content\r\n"));
        assert!(out.contains("Access-Control-Allow-Headers: content-type\r\n"));
        assert!(out.contains("Access-Control-Allow-Methods: GET, HEAD, POST, PUT, OPTIONS\r\n"));
        assert!(out.contains("Access-Control-Max-Age: "));
    }

    #[test]
    fn the_usage_page_shows_https_for_a_tls_connection() {
        let now = Instant::now();
        for (tls, scheme) in [(false, "http://"), (true, "https://")] {
            let mut c = Conn::new(&Config::default(), now);
            c.set_tls(tls);
            let input = b"GET / HTTP/1.1\r\nHost: pipe.example\r\n\r\n";
            c.read_buf()[..input.len()].copy_from_slice(input);
            c.handle_read(input.len(), now);
            assert_eq!(c.poll_action(), Action::Write);
            let out = String::from_utf8_lossy(c.output()).into_owned();
            assert!(out.contains(&format!("{scheme}pipe.example/")), "{out}");
        }
    }

    fn accepted(config: &Config, peer: &str, input: &[u8]) -> (String, Action, Conn) {
        let now = Instant::now();
        let mut c = Conn::accepted(config, peer.parse().unwrap(), now);
        let mut written = Vec::new();
        let mut rest = input;
        // Small reads, so that a header and the head come in several pieces.
        while c.poll_action() == Action::Read && !rest.is_empty() {
            let buf = c.read_buf();
            let k = buf.len().min(rest.len()).min(7);
            buf[..k].copy_from_slice(&rest[..k]);
            rest = &rest[k..];
            c.handle_read(k, now);
        }
        while c.poll_action() == Action::Write {
            written.extend_from_slice(c.output());
            let n = c.output().len();
            c.handle_wrote(n, now);
        }
        (String::from_utf8_lossy(&written).into(), c.poll_action(), c)
    }

    fn client(s: &str) -> Option<ClientAddr> {
        Some(ClientAddr::of(s.parse().unwrap()))
    }

    const PIPE: &[u8] = b"GET /x HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 198.51.100.1\r\n\r\n";

    #[test]
    fn a_direct_client_is_its_peer_whatever_its_headers_say() {
        let (_, action, mut c) = accepted(&Config::default(), "127.0.0.2", PIPE);
        assert_eq!(action, Action::Pipe);
        assert_eq!(c.take_new_client(), client("127.0.0.2"));
        assert_eq!(c.take_pipe_request().unwrap().client, client("127.0.0.2"));
    }

    #[test]
    fn a_trusted_proxy_names_the_client_in_x_forwarded_for() {
        let config = Config {
            trusted_proxies: vec!["127.0.0.0/8".parse().unwrap()],
            ..Config::default()
        };
        let (_, action, mut c) = accepted(&config, "127.0.0.1", PIPE);
        assert_eq!(action, Action::Pipe);
        assert_eq!(
            c.take_new_client(),
            None,
            "a proxy's connection carries many clients"
        );
        assert_eq!(
            c.take_pipe_request().unwrap().client,
            client("198.51.100.1")
        );
        let bare = b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n";
        let (_, _, mut c) = accepted(&config, "127.0.0.1", bare);
        assert_eq!(c.take_pipe_request().unwrap().client, client("127.0.0.1"));
    }

    #[test]
    fn a_proxy_protocol_listener_takes_the_client_from_the_header() {
        let config = Config {
            proxy_protocol: true,
            ..Config::default()
        };
        let mut input = b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 8080\r\n".to_vec();
        input.extend_from_slice(PIPE);
        let (out, action, mut c) = accepted(&config, "127.0.0.1", &input);
        assert_eq!((out.as_str(), action), ("", Action::Pipe));
        assert_eq!(c.take_new_client(), client("203.0.113.7"));
        assert_eq!(c.take_pipe_request().unwrap().client, client("203.0.113.7"));

        let (out, action, _) = accepted(&config, "127.0.0.1", PIPE);
        assert!(out.starts_with("HTTP/1.1 400 "), "{out}");
        assert!(out.contains("expects a PROXY protocol header"), "{out}");
        assert_eq!(action, Action::Shutdown, "then the close");
    }

    #[test]
    fn a_proxy_header_that_never_comes_is_closed_at_the_head_timeout() {
        let config = Config {
            proxy_protocol: true,
            ..Config::default()
        };
        let now = Instant::now();
        let mut c = Conn::accepted(&config, "127.0.0.1".parse().unwrap(), now);
        let buf = c.read_buf();
        buf[..5].copy_from_slice(b"PROXY");
        c.handle_read(5, now);
        assert_eq!(c.poll_action(), Action::Read);
        c.handle_timeout(now + config.head_timeout);
        assert_eq!(c.poll_action(), Action::Close);
    }
}
