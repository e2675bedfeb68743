//! The pipe driven through its own inputs, with no socket and no clock: every write is
//! taken whole, and the kernel's view of a socket is given to [`Pipe::handle_peer`] when
//! the pipe asks for it.

mod held;
mod watch;

use std::time::Instant;

use super::*;
use crate::conn::{Action, Conn};
use crate::pipe::watch::{WatcherId, MAX_WATCHERS};

struct Harness {
    pipe: Pipe,
    now: Instant,
    /// What each party's client got.
    got: Vec<Vec<u8>>,
    /// What each watcher got.
    watched: Vec<Vec<u8>>,
    events: Vec<Event>,
}

const RECEIVER: &str = "GET /x?n=1 HTTP/1.1\r\nHost: h\r\n\r\n";
const SENDER: &str = "PUT /x?n=1 HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\n";
const SENDER_EXPECTING: &str =
    "PUT /x?n=1 HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n";

impl Harness {
    fn new(n: usize) -> Self {
        Harness {
            pipe: Pipe::new("x", n, &Config::default()),
            now: Instant::now(),
            got: Vec::new(),
            watched: Vec::new(),
            events: Vec::new(),
        }
    }

    /// A party the registry sent joins; what it is told is written out.
    fn join(&mut self, raw: &str) -> PartyId {
        let mut conn = Conn::with_bytes(&Config::default(), raw.as_bytes(), self.now);
        assert_eq!(conn.poll_action(), Action::Pipe, "{raw}");
        let request = conn.take_pipe_request().expect("a pipe request");
        let role = request.role();
        let p = self.pipe.join(request, role, self.now);
        self.got.push(Vec::new());
        self.flush();
        p
    }

    /// A watcher (`?progress`, `?status`) joins; what it is sent is collected.
    fn watch(&mut self, raw: &str) -> WatcherId {
        let mut conn = Conn::with_bytes(&Config::default(), raw.as_bytes(), self.now);
        assert_eq!(conn.poll_action(), Action::Pipe, "{raw}");
        let request = conn.take_pipe_request().expect("a watch request");
        let w = self.pipe.watch(request, self.now);
        self.watched.push(Vec::new());
        self.flush();
        w
    }

    fn watched(&self, w: WatcherId) -> String {
        String::from_utf8_lossy(&self.watched[w]).into_owned()
    }

    /// Every party's and watcher's pending bytes are written whole, until none are left;
    /// events are collected.
    fn flush(&mut self) {
        let mut moved = true;
        while moved {
            moved = false;
            for p in 0..self.pipe.parties() {
                let slices = self.pipe.write_slices(p);
                let bytes: Vec<u8> = slices.iter().flat_map(|s| s.to_vec()).collect();
                if !bytes.is_empty() {
                    self.got[p].extend_from_slice(&bytes);
                    self.pipe.handle_wrote(p, bytes.len(), self.now);
                    moved = true;
                }
            }
            for w in 0..self.pipe.watchers() {
                let bytes = self.pipe.watcher_output(w).to_vec();
                if !bytes.is_empty() {
                    self.watched[w].extend_from_slice(&bytes);
                    self.pipe.handle_watcher_wrote(w, bytes.len());
                    moved = true;
                }
                let _ = self.pipe.take_watcher_shutdown(w);
            }
        }
        while let Some(e) = self.pipe.poll_event() {
            self.events.push(e);
        }
    }

    /// The client of `p` ended its side; the pipe reads that end.
    fn eof(&mut self, p: PartyId) {
        assert!(self.pipe.read_buf(p).is_some(), "party {p} is read");
        self.pipe.handle_read(p, 0, self.now);
        self.flush();
    }

    /// The pipe asks the kernel about `p` now, and is told `peer`.
    fn check(&mut self, p: PartyId, peer: PeerState) {
        assert!(self.pipe.take_check(p), "party {p} is to be checked now");
        self.pipe.handle_peer(p, peer, self.now);
        self.flush();
    }

    /// Time passes to `d` after now; what falls due is done.
    fn pass(&mut self, d: Duration) {
        self.now += d;
        self.pipe.handle_timeout(self.now);
        self.flush();
    }

    /// To a receiver's verdict: its second probe, then the check [`REPROBE`] after it.
    fn until_verdict(&mut self) {
        self.pass(REPROBE);
        self.pass(REPROBE);
    }

    fn text(&self, p: PartyId) -> String {
        String::from_utf8_lossy(&self.got[p]).into_owned()
    }

    fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }
}
