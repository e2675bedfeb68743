//! The task that owns one pipe and all of its sockets.

use std::io::IoSlice;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use fanpipe_core::conn::PipeRequest;
use fanpipe_core::hub::{Phase, PipeParams};
use fanpipe_core::metrics::OpenConn;
use fanpipe_core::pipe::{Event, Pipe, READS_PER_TURN};
use fanpipe_core::registry::PipeId;
use fanpipe_core::request::Route;
use fanpipe_core::Config;

use crate::io::{Socket, Timer};
use crate::server::ServerState;

/// What a pipe's task is told.
pub enum Msg<S> {
    /// A party the registry admitted, with its socket.
    Arrival(Box<(S, PipeRequest, OpenConn)>),
    /// The server's shutdown reached a new phase.
    Phase(Phase),
}

/// How a party's socket ends once the core has said its last byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// A whole exchange: [`Socket::poll_shutdown`] (TLS: close_notify, then the FIN).
    Clean,
    /// A cut or failed exchange: [`Socket::poll_cut`] (the FIN alone).
    Cut,
    /// Closed at once by the core: what the socket still holds of bytes the core counts
    /// as written (a TLS socket's records) goes out with [`Socket::poll_flush`], then
    /// the socket is dropped, with no close_notify, as a plain socket is at once.
    Drop,
}

/// A party's socket and how far its end has gone.
struct Slot<S> {
    sock: S,
    /// Counts the connection as open until dropped with its socket.
    _open: OpenConn,
    /// The end the core asked for, and whether the socket has finished it.
    ending: Option<(Ending, bool)>,
}

impl<S: Socket> Slot<S> {
    /// Steps the socket's end; ready once it is done (or failed: nothing more to send).
    fn poll_end(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some((how, done)) = &mut self.ending else {
            return Poll::Ready(());
        };
        if !*done {
            let polled = match how {
                Ending::Clean => self.sock.poll_shutdown(cx),
                Ending::Cut => self.sock.poll_cut(cx),
                Ending::Drop => self.sock.poll_flush(cx),
            };
            if polled.is_pending() {
                return Poll::Pending;
            }
            *done = true;
        }
        Poll::Ready(())
    }
}

/// A socket the core has closed, whose end (records a TLS socket still holds, its
/// close_notify, the FIN) is still on its way out, until `until`.
struct Closing<S> {
    slot: Slot<S>,
    until: Instant,
}

/// The task that owns one pipe and all of its sockets, so the data path takes no lock.
pub struct PipeTask<S, T> {
    pipe: Pipe,
    sockets: Vec<Option<Slot<S>>>,
    /// Closed by the core, still sending their end.
    ending: Vec<Closing<S>>,
    /// How long a closed socket may take to send its end.
    write_timeout: Duration,
    /// The sockets of the pipe's watchers (`?progress`, `?status`), by watcher id.
    watchers: Vec<Option<(S, OpenConn)>>,
    timer: T,
    /// The registry no longer routes anyone here.
    gone: bool,
    params: PipeParams,
}

impl<S: Socket, T: Timer> PipeTask<S, T> {
    pub fn new(params: PipeParams, config: &Config, timer: T) -> Self {
        PipeTask {
            pipe: Pipe::new(&params.name, params.n, config),
            sockets: Vec::new(),
            ending: Vec::new(),
            write_timeout: config.write_timeout,
            watchers: Vec::new(),
            timer,
            gone: false,
            params,
        }
    }

    /// The registry's id of this pipe.
    pub fn id(&self) -> PipeId {
        self.params.id
    }

    /// What the pipe was opened with.
    pub fn params(&self) -> &PipeParams {
        &self.params
    }

    /// [`PipeTask::drive`], reporting the pipe's events to the server's hub.
    pub fn run<H>(
        &mut self,
        cx: &mut Context<'_>,
        server: &ServerState<H>,
        recv: impl FnMut(&mut Context<'_>) -> Poll<Option<Msg<S>>>,
    ) -> Poll<()> {
        self.drive(cx, recv, |name, id, event| {
            server.hub().handle_event(name, id, event)
        })
    }

    /// Does all the I/O the core asks for until none can proceed; ready once the pipe is
    /// out of the registry and every socket is closed. `recv` polls the task's mailbox;
    /// `report` hands an event to the hub (under its lock) and says whether the registry
    /// has let the pipe go.
    pub fn drive(
        &mut self,
        cx: &mut Context<'_>,
        mut recv: impl FnMut(&mut Context<'_>) -> Poll<Option<Msg<S>>>,
        mut report: impl FnMut(&str, PipeId, Event) -> bool,
    ) -> Poll<()> {
        loop {
            let now = self.timer.now();
            let mut moved = false;
            while let Poll::Ready(Some(msg)) = recv(cx) {
                match msg {
                    Msg::Arrival(arrival) => {
                        let (socket, request, open) = *arrival;
                        if let Route::Watch { .. } = request.request.route {
                            self.pipe.watch(request, now);
                            self.watchers.push(Some((socket, open)));
                        } else {
                            let role = request.role();
                            self.pipe.join(request, role, now);
                            self.sockets.push(Some(Slot {
                                sock: socket,
                                _open: open,
                                ending: None,
                            }));
                        }
                    }
                    // The server's phase, in the pipe's own terms.
                    Msg::Phase(Phase::Running) => {}
                    Msg::Phase(Phase::Draining) => self.pipe.handle_shutdown(now),
                    Msg::Phase(Phase::Aborting | Phase::Done) => self.pipe.handle_abort(now),
                }
                moved = true;
            }
            for p in 0..self.sockets.len() {
                moved |= self.party_io(cx, p, now);
            }
            for w in 0..self.watchers.len() {
                moved |= self.watcher_io(cx, w);
            }
            while let Some(event) = self.pipe.poll_event() {
                moved = true;
                self.gone |= report(&self.params.name, self.params.id, event);
            }
            moved |= self.poll_ending(cx, now);
            let ends = self.ending.iter().map(|e| e.until).min();
            let due = match (self.pipe.poll_timeout(), ends) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            if let Some(due) = due {
                if due <= now || self.timer.poll_at(cx, due).is_ready() {
                    let now = self.timer.now();
                    self.pipe.handle_timeout(now);
                    // Past its deadline a socket's end is given up: dropped, as a cut.
                    self.ending.retain(|e| e.until > now);
                    moved = true;
                }
            }
            if self.gone && self.pipe.is_idle() && self.ending.is_empty() {
                report(&self.params.name, self.params.id, Event::Closed);
                return Poll::Ready(());
            }
            if !moved {
                return Poll::Pending;
            }
        }
    }

    /// Steps the ends of closed sockets; drops each once its end is out.
    fn poll_ending(&mut self, cx: &mut Context<'_>, now: Instant) -> bool {
        let before = self.ending.len();
        self.ending
            .retain_mut(|e| e.until > now && e.slot.poll_end(cx).is_pending());
        self.ending.len() != before
    }

    /// One watcher's socket: what the core has for it, written as it can take it (a slow
    /// watcher only gets less), and its end read.
    fn watcher_io(&mut self, cx: &mut Context<'_>, w: usize) -> bool {
        let Some((sock, _)) = self.watchers[w].as_mut() else {
            return false;
        };
        if self.pipe.watcher_is_closed(w) {
            self.watchers[w] = None;
            return true;
        }
        let mut moved = false;
        let out = self.pipe.watcher_output(w);
        if !out.is_empty() {
            match sock.poll_write_vectored(cx, &[IoSlice::new(out)]) {
                Poll::Ready(Ok(n)) if n > 0 => {
                    self.pipe.handle_watcher_wrote(w, n);
                    moved = true;
                }
                Poll::Ready(_) => {
                    self.pipe.handle_watcher_error(w);
                    return true;
                }
                Poll::Pending => {}
            }
        }
        if self.pipe.take_watcher_shutdown(w) {
            sock.shutdown_write(cx);
            moved = true;
        }
        if let Some(buf) = self.pipe.watcher_read_buf(w) {
            match sock.poll_read(cx, buf) {
                Poll::Ready(Ok(n)) => {
                    self.pipe.handle_watcher_read(w, n);
                    moved = true;
                }
                Poll::Ready(Err(_)) => {
                    self.pipe.handle_watcher_error(w);
                    moved = true;
                }
                Poll::Pending => {}
            }
        }
        moved
    }

    /// One party's socket: close, shut down, write and read as the core says.
    fn party_io(&mut self, cx: &mut Context<'_>, p: usize, now: Instant) -> bool {
        let Some(slot) = self.sockets[p].as_mut() else {
            return false;
        };
        if self.pipe.is_closed(p) {
            // A socket the core ended cleanly (or after flushing a cut's last bytes)
            // finishes that end first; one it closed at once sends what it holds and is
            // dropped: a cut.
            let mut slot = self.sockets[p].take().expect("the slot is here");
            if slot.ending.is_none() {
                slot.ending = Some((Ending::Drop, false));
            }
            if slot.poll_end(cx).is_pending() {
                self.ending.push(Closing {
                    slot,
                    until: now + self.write_timeout,
                });
            }
            return true;
        }
        let mut moved = false;
        if self.pipe.take_check(p) {
            self.pipe.handle_peer(p, slot.sock.peer_state(), now);
            moved = true;
        }
        if self.pipe.take_shutdown(p) {
            // The core closes at once after a flush that ends a failed exchange; after a
            // whole one it lingers, reading, and the socket says so with its clean end.
            let how = if self.pipe.is_closed(p) {
                Ending::Cut
            } else {
                Ending::Clean
            };
            slot.ending = Some((how, false));
            moved = true;
        }
        if slot.ending.is_some() {
            // Stepped as the socket allows; reads below go on meanwhile (the linger).
            let _ = slot.poll_end(cx);
        }
        let sock = &mut slot.sock;
        let slices = self.pipe.write_slices(p);
        if slices.total() > 0 {
            match sock.poll_write_vectored(cx, &slices) {
                Poll::Ready(Ok(n)) if n > 0 => {
                    self.pipe.handle_wrote(p, n, now);
                    moved = true;
                }
                Poll::Ready(_) => {
                    self.pipe.handle_error(p, now);
                    return true;
                }
                Poll::Pending => {}
            }
        } else if slot.ending.is_none() {
            // Nothing new to write: what the socket still holds (a TLS socket's records
            // from a write the socket could not take whole) goes out now.
            if let Poll::Ready(Err(_)) = sock.poll_flush(cx) {
                self.pipe.handle_error(p, now);
                return true;
            }
        }
        for _ in 0..READS_PER_TURN {
            let Some(buf) = self.pipe.read_buf(p) else {
                break;
            };
            match sock.poll_read(cx, buf) {
                Poll::Ready(Ok(n)) => {
                    self.pipe.handle_read(p, n, now);
                    moved = true;
                    if n == 0 {
                        break;
                    }
                }
                Poll::Ready(Err(_)) => {
                    self.pipe.handle_error(p, now);
                    return true;
                }
                Poll::Pending => break,
            }
        }
        moved
    }
}
