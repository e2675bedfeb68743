//! One client connection until it becomes a party of a pipe: reads heads, answers the
//! server's own pages, refusals and preflights, keeps alive, and closes politely.
//!
//! The backend asks [`Conn::poll_action`] what to do next and reports back.

use std::time::Instant;

use crate::config::Config;
use crate::error::Reject;
use crate::head::HeadReader;
use crate::request::{interpret, Page, Request, Role, Route};
use crate::response;

/// What the backend must do next for this connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Read into [`Conn::read_buf`], then [`Conn::handle_read`]; race it with the deadline.
    Read,
    /// Write [`Conn::output`], then [`Conn::handle_wrote`].
    Write,
    /// Shut down the write side, then call [`Conn::handle_shutdown`].
    Shutdown,
    /// Render the metrics and give them to [`Conn::handle_metrics`].
    Metrics,
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
    Head,
    Write(After),
    Shutdown,
    Linger,
    Metrics,
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
    /// The request handed over was a watcher's (`Some(once)`): a name with no pipe is
    /// answered with the `none` state, not a refusal.
    watching: Option<bool>,
}

/// Most bytes read and thrown away while lingering before a close.
const MAX_LINGER_BYTES: usize = 1 << 20;

/// A pipe request handed to the registry, with the bytes read past its head.
#[derive(Debug, Clone)]
pub struct PipeRequest {
    pub request: Request,
    pub leftover: Vec<u8>,
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
            watching: None,
        }
    }

    /// Starts a connection on bytes already read (a keep-alive connection handed back).
    pub fn with_bytes(config: &Config, bytes: &[u8], now: Instant) -> Self {
        let mut conn = Conn::new(config, now);
        let mut rest = bytes;
        while !rest.is_empty() && conn.state == State::Head {
            let space = conn.reader.space();
            let k = space.len().min(rest.len());
            space[..k].copy_from_slice(&rest[..k]);
            conn.handle_read(k, now);
            rest = &rest[k..];
        }
        conn
    }

    pub fn poll_action(&self) -> Action {
        match self.state {
            State::Head | State::Linger => Action::Read,
            State::Write(_) => Action::Write,
            State::Shutdown => Action::Shutdown,
            State::Metrics => Action::Metrics,
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

    pub fn handle_metrics(&mut self, text: &str, now: Instant) {
        if let (State::Metrics, Some(req)) = (self.state, self.pending.take()) {
            let keep = req.keep_alive && !req.has_body();
            response::page(
                &mut self.out,
                Page::Metrics,
                &req.base_url,
                text,
                keep,
                req.head_only,
            );
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
        let req = match parsed.and_then(|h| interpret(&h, self.config.max_receivers)) {
            Ok(req) => req,
            Err(why) => return self.refuse(&why, now),
        };
        let keep = req.keep_alive && !req.has_body();
        match &req.route {
            Route::Pipe { .. } | Route::Watch { .. } => {
                self.pending = Some(req);
                self.state = State::Pipe;
                self.deadline = None;
            }
            Route::Page(Page::Metrics) => {
                self.pending = Some(req);
                self.state = State::Metrics;
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
                Action::Metrics => c.handle_metrics("m 1\n", now),
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
}
