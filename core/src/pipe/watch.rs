//! Watchers: clients that follow a pipe's state without taking a place in it
//! (`GET /NAME?progress`, server-sent events; `GET /NAME?status`, one JSON snapshot).
//!
//! Events, each `event: KIND` and one line of JSON `data`:
//! - `state`: `{"state":"waiting","n":3,"receivers":1,"sender":true}`, then
//!   `{"state":"sending",...}` when the transfer starts (`receivers`: those still
//!   receiving); `{"state":"none"}` when the pipe is gone without a transfer (its parties
//!   left), after which the stream ends and the client's `EventSource` comes back (every
//!   [`RETRY_MS`]) to watch the name's next pipe.
//! - `progress`: `{"bytes":B,"delivered":D,"total":T,"rate":R,"seconds":S}` at most every
//!   [`PROGRESS_INTERVAL`] while bytes move: `bytes` read from the sender into the pipe,
//!   `delivered` to the slowest receiver still there, `total` the body's length if the
//!   sender gave one (else `null`), `rate` bytes per second since the start.
//! - `done`: `{"outcome":"complete","bytes":B,"complete":k,"n":N,"seconds":S}`; the
//!   stream ends.
//!
//! - a comment line (`: keep-alive`) every [`heartbeat_interval`](crate::Config) (20 s),
//!   so that a proxy in front does not close a quiet stream (a
//!   pipe that waits long, or a stalled transfer) as idle. `EventSource` ignores it.
//!
//! A watcher never slows the transfer: the pipe only marks what changed; a watcher's
//! buffer is refilled with the latest state and progress once it has written what it
//! had, so a slow watcher loses intermediate events and holds at most a few hundred
//! bytes. At most [`MAX_WATCHERS`] per pipe; more get `503`.

use std::io::Write as _;
use std::time::{Duration, Instant};

use super::{Pipe, Stage, State, Summary};
use crate::conn::PipeRequest;
use crate::error::Reject;
use crate::request::{Framing, Role, Route};
use crate::response;

/// Most watchers of one pipe.
pub const MAX_WATCHERS: usize = 16;

/// Least time between two `progress` events.
pub const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);

/// How long an `EventSource` waits before it comes back after the stream ends.
pub const RETRY_MS: u32 = 1000;

/// A watcher's index in its pipe.
pub type WatcherId = usize;

/// The head of an event stream (closed by the server: no length, no chunks).
const SSE_HEAD: &str = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\nCache-Control: no-store\r\nAccess-Control-Allow-Origin: *\r\nX-Content-Type-Options: nosniff\r\nX-Accel-Buffering: no\r\nConnection: close\r\n\r\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Life {
    Open,
    /// Its last bytes go out by `until`, then a shutdown and the close.
    Flushing {
        until: Instant,
    },
    Closed,
}

#[derive(Debug)]
struct Watcher {
    life: Life,
    out: Vec<u8>,
    pos: usize,
    state_due: bool,
    progress_due: bool,
    /// It was told the transfer is sending.
    saw_sending: bool,
    /// A keep-alive comment is due.
    keep_alive_due: bool,
}

/// A pipe's watchers and the latest of what they are told.
#[derive(Debug, Default)]
pub(super) struct Watch {
    watchers: Vec<Watcher>,
    /// The latest `state` data.
    state: String,
    /// The latest `progress` data.
    progress: String,
    /// When the next `progress` event is due.
    next_tick: Option<Instant>,
    /// When the open watchers are next sent a keep-alive comment.
    next_keep_alive: Option<Instant>,
    /// The pipe ended (a `done` event) or is gone (a last `state`): sent to everyone.
    last_words: Option<String>,
    /// The transfer ran: the `sending` state, for a watcher not told it yet (the
    /// transfer ended in the step it started, or the watcher was slow).
    sending: Option<String>,
    /// The last instant the pipe was told, for the watchers' deadlines.
    now: Option<Instant>,
    scratch: Vec<u8>,
}

/// An event-stream comment: bytes on a quiet stream, and no event.
const KEEP_ALIVE: &[u8] = b": keep-alive\n\n";

fn event(out: &mut Vec<u8>, kind: &str, data: &str) {
    let _ = write!(out, "event: {kind}\ndata: {data}\n\n");
}

/// The answer to a watcher of a name that has no pipe: `{"state":"none"}`, as an event
/// stream that ends (the client comes back) or, for `?status`, as JSON.
pub fn no_pipe(out: &mut Vec<u8>, once: bool, keep_alive: bool) {
    let data = "{\"state\":\"none\"}";
    if once {
        json(out, &format!("{data}\n"), keep_alive);
    } else {
        out.extend_from_slice(SSE_HEAD.as_bytes());
        let _ = write!(out, "retry: {RETRY_MS}\n\n");
        event(out, "state", data);
    }
}

fn json(out: &mut Vec<u8>, body: &str, keep_alive: bool) {
    let _ = write!(
        out,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nCache-Control: no-store\r\nAccess-Control-Allow-Origin: *\r\nX-Content-Type-Options: nosniff\r\n{}\r\n{body}",
        body.len(),
        if keep_alive { "" } else { "Connection: close\r\n" }
    );
}

impl Pipe {
    /// A watcher joins (its request is a [`Route::Watch`]); it is answered at once.
    pub fn watch(&mut self, request: PipeRequest, now: Instant) -> WatcherId {
        let once = matches!(request.request.route, Route::Watch { once: true, .. });
        let mut w = Watcher {
            life: Life::Open,
            out: Vec::new(),
            pos: 0,
            state_due: true,
            progress_due: false,
            saw_sending: false,
            keep_alive_due: false,
        };
        let open = self
            .watch
            .watchers
            .iter()
            .filter(|w| w.life == Life::Open)
            .count();
        let flush = Life::Flushing {
            until: now + self.config.write_timeout,
        };
        // A snapshot (`?status`) is answered at once and closed: it is not counted.
        if open >= MAX_WATCHERS && !once {
            let why = Reject::TooManyWatchers { max: MAX_WATCHERS };
            response::reject(&mut w.out, &why, false);
            w.life = flush;
        } else if once {
            let progress = match self.stage {
                Stage::Running { .. } => self.progress_data(now),
                _ => "null".to_owned(),
            };
            let body = format!(
                "{{\"state\":{},\"progress\":{progress},\"watchers\":{open}}}\n",
                self.state_data()
            );
            json(&mut w.out, &body, false);
            w.life = flush;
        } else {
            w.out.extend_from_slice(SSE_HEAD.as_bytes());
            let _ = write!(w.out, "retry: {RETRY_MS}\n\n");
        }
        self.watch.watchers.push(w);
        self.watch_sync(now);
        self.watch.watchers.len() - 1
    }

    /// How many watchers have joined (ids are `0..watchers()`).
    pub fn watchers(&self) -> usize {
        self.watch.watchers.len()
    }

    /// The bytes to write to this watcher now (the latest state and progress once it
    /// has written what it had).
    pub fn watcher_output(&mut self, w: WatcherId) -> &[u8] {
        // The last party may have closed with no instant given (its shutdown): a pipe
        // left empty before any transfer ends its watchers' streams now.
        if let Some(now) = self.watch.now {
            if self.watch.last_words.is_none() && !self.parties.iter().any(|p| p.is_open()) {
                self.watch_sync(now);
            }
        }
        let Watch {
            watchers,
            state,
            progress,
            ..
        } = &mut self.watch;
        let Some(x) = watchers.get_mut(w) else {
            return &[];
        };
        if x.life == Life::Closed {
            return &[];
        }
        if x.pos == x.out.len() {
            x.out.clear();
            x.pos = 0;
            if x.life == Life::Open {
                if std::mem::take(&mut x.state_due) && !state.is_empty() {
                    event(&mut x.out, "state", state);
                    x.saw_sending |= state.contains("\"sending\"");
                }
                if std::mem::take(&mut x.progress_due) && !progress.is_empty() {
                    event(&mut x.out, "progress", progress);
                }
                if std::mem::take(&mut x.keep_alive_due) && x.out.is_empty() {
                    x.out.extend_from_slice(KEEP_ALIVE);
                }
            }
        }
        &x.out[x.pos..]
    }

    /// `n` bytes of [`Pipe::watcher_output`] were written.
    pub fn handle_watcher_wrote(&mut self, w: WatcherId, n: usize) {
        if let Some(x) = self.watch.watchers.get_mut(w) {
            x.pos = (x.pos + n).min(x.out.len());
        }
    }

    /// Where to read what a watcher sends (it is dropped; its end is its leaving).
    pub fn watcher_read_buf(&mut self, w: WatcherId) -> Option<&mut [u8]> {
        let x = self.watch.watchers.get(w)?;
        if x.life == Life::Closed {
            return None;
        }
        self.watch.scratch.resize(1024, 0);
        Some(&mut self.watch.scratch)
    }

    /// `n` bytes were read from a watcher; 0: it has gone.
    pub fn handle_watcher_read(&mut self, w: WatcherId, n: usize) {
        if n == 0 {
            self.handle_watcher_error(w);
        }
    }

    /// A watcher's socket failed or it has gone.
    pub fn handle_watcher_error(&mut self, w: WatcherId) {
        if let Some(x) = self.watch.watchers.get_mut(w) {
            x.life = Life::Closed;
        }
    }

    /// Whether the backend should drop this watcher's socket.
    pub fn watcher_is_closed(&self, w: WatcherId) -> bool {
        self.watch
            .watchers
            .get(w)
            .is_none_or(|x| x.life == Life::Closed)
    }

    /// Whether the backend should shut down this watcher's socket now (its last bytes
    /// are out); it is closed after.
    pub fn take_watcher_shutdown(&mut self, w: WatcherId) -> bool {
        match self.watch.watchers.get_mut(w) {
            Some(x) if matches!(x.life, Life::Flushing { .. }) && x.pos == x.out.len() => {
                x.life = Life::Closed;
                true
            }
            _ => false,
        }
    }

    /// Whether every watcher is closed.
    pub(super) fn watchers_idle(&self) -> bool {
        self.watch.watchers.iter().all(|x| x.life == Life::Closed)
    }

    /// When the watchers need [`Pipe::handle_timeout`]: the next `progress`, the next
    /// keep-alive, or the end of a flush.
    pub(super) fn watch_timeout(&self) -> Option<Instant> {
        let flush = self.watch.watchers.iter().filter_map(|x| match x.life {
            Life::Flushing { until } => Some(until),
            _ => None,
        });
        flush
            .chain(self.watch.next_tick)
            .chain(self.watch.next_keep_alive)
            .min()
    }

    /// Time passed: a `progress` event if one is due, flushes that took too long.
    pub(super) fn watch_tick(&mut self, now: Instant) {
        for x in &mut self.watch.watchers {
            if matches!(x.life, Life::Flushing { until } if until <= now) {
                x.life = Life::Closed;
            }
        }
        if self.watch.next_keep_alive.is_some_and(|t| t <= now) {
            self.watch.next_keep_alive = None;
            for x in &mut self.watch.watchers {
                x.keep_alive_due = x.life == Life::Open;
            }
        }
        if self.watch.next_tick.is_some_and(|t| t <= now) {
            self.watch.next_tick = None;
            if let Stage::Running { .. } = self.stage {
                let data = self.progress_data(now);
                if data != self.watch.progress {
                    self.watch.progress = data;
                    for x in &mut self.watch.watchers {
                        x.progress_due = true;
                    }
                }
            }
        }
        self.watch_sync(now);
    }

    /// The pipe ended: every watcher gets the `done` event, then its stream ends.
    pub(super) fn watch_done(&mut self, s: &Summary, now: Instant) {
        let data = format!(
            "{{\"outcome\":\"{}\",\"bytes\":{},\"complete\":{},\"n\":{},\"seconds\":{:.3}}}",
            s.outcome.label(),
            s.bytes,
            s.complete,
            s.n,
            s.seconds
        );
        let mut words = Vec::new();
        let sending = format!(
            "{{\"state\":\"sending\",\"n\":{},\"receivers\":{},\"sender\":true}}",
            s.n, s.n
        );
        let mut told = Vec::new();
        event(&mut told, "state", &sending);
        self.watch.sending = Some(String::from_utf8_lossy(&told).into_owned());
        if let Stage::Running { .. } | Stage::Ended = self.stage {
            let bytes = self.body.as_ref().map_or(0, |b| b.bytes);
            let progress = format!(
                "{{\"bytes\":{bytes},\"delivered\":{},\"total\":{},\"rate\":{},\"seconds\":{:.3}}}",
                self.delivered(),
                self.total(),
                if s.seconds > 0.0 {
                    (bytes as f64 / s.seconds) as u64
                } else {
                    0
                },
                s.seconds
            );
            event(&mut words, "progress", &progress);
        }
        event(&mut words, "done", &data);
        self.watch.last_words = Some(String::from_utf8_lossy(&words).into_owned());
        self.watch_sync(now);
    }

    /// Marks what changed for the watchers; sends the last words once the pipe is over.
    /// Called after everything that may change the pipe's state.
    pub(super) fn watch_sync(&mut self, now: Instant) {
        if self.watch.watchers.is_empty() {
            return;
        }
        self.watch.now = Some(now);
        let gone = self.stage == Stage::Waiting && self.parties.iter().all(|p| !p.is_open());
        if gone && self.watch.last_words.is_none() {
            let mut words = Vec::new();
            event(&mut words, "state", "{\"state\":\"none\"}");
            self.watch.last_words = Some(String::from_utf8_lossy(&words).into_owned());
        }
        if let Some(words) = &self.watch.last_words {
            let until = now + self.config.write_timeout;
            for x in &mut self.watch.watchers {
                if x.life == Life::Open {
                    if x.pos == x.out.len() {
                        x.out.clear();
                        x.pos = 0;
                    }
                    if let (Some(sending), false) = (&self.watch.sending, x.saw_sending) {
                        x.out.extend_from_slice(sending.as_bytes());
                    }
                    x.out.extend_from_slice(words.as_bytes());
                    x.life = Life::Flushing { until };
                }
            }
            self.watch.next_tick = None;
            self.watch.next_keep_alive = None;
            return;
        }
        let open = self.watch.watchers.iter().any(|x| x.life == Life::Open);
        if open && self.watch.next_keep_alive.is_none() {
            self.watch.next_keep_alive = Some(now + self.config.heartbeat_interval);
        }
        let state = self.state_data();
        if state != self.watch.state {
            self.watch.state = state;
            for x in &mut self.watch.watchers {
                x.state_due = true;
            }
        }
        if let Stage::Running { .. } = self.stage {
            if self.watch.next_tick.is_none() {
                self.watch.next_tick = Some(now + PROGRESS_INTERVAL);
            }
        }
    }

    /// The `state` data now.
    fn state_data(&self) -> String {
        let receiving = self
            .receivers
            .iter()
            .filter(|&&p| matches!(self.parties[p].state, State::Receiving(_)))
            .count();
        let waiting = self
            .parties
            .iter()
            .filter(|p| p.role == Role::Receiver && p.is_waiting())
            .count();
        let (state, receivers) = match self.stage {
            Stage::Waiting => ("waiting", waiting),
            Stage::Running { .. } => ("sending", receiving),
            Stage::Ended => ("ended", receiving),
        };
        format!(
            "{{\"state\":\"{state}\",\"n\":{},\"receivers\":{receivers},\"sender\":{}}}",
            self.n,
            self.sender.is_some()
        )
    }

    /// The `progress` data now.
    fn progress_data(&self, now: Instant) -> String {
        let bytes = self.body.as_ref().map_or(0, |b| b.bytes);
        let seconds = match self.stage {
            Stage::Running { started } => now.saturating_duration_since(started).as_secs_f64(),
            _ => 0.0,
        };
        let rate = if seconds > 0.0 {
            (bytes as f64 / seconds) as u64
        } else {
            0
        };
        format!(
            "{{\"bytes\":{bytes},\"delivered\":{},\"total\":{},\"rate\":{rate},\"seconds\":{seconds:.3}}}",
            self.delivered(),
            self.total()
        )
    }

    /// Bytes the slowest receiver still receiving has.
    fn delivered(&self) -> u64 {
        let Some(body) = &self.body else { return 0 };
        self.receivers
            .iter()
            .filter_map(|&p| match self.parties[p].state {
                State::Receiving(feed) => body.ring.position(feed.slot),
                _ => None,
            })
            .min()
            .unwrap_or(body.bytes)
    }

    /// The body's length as JSON, if the sender gave one (not for a form).
    fn total(&self) -> String {
        let sender = self.sender.and_then(|s| self.parties.get(s));
        match sender.map(|s| (&s.request.framing, &s.request.web.form)) {
            Some((Framing::Length(l), None)) => l.to_string(),
            _ => "null".to_owned(),
        }
    }
}
