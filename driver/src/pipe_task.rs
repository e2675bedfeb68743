//! The task that owns one pipe and all of its sockets.

use std::io::IoSlice;
use std::task::{Context, Poll};

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

/// The task that owns one pipe and all of its sockets, so the data path takes no lock.
pub struct PipeTask<S, T> {
    pipe: Pipe,
    sockets: Vec<Option<(S, OpenConn)>>,
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
                            self.sockets.push(Some((socket, open)));
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
            if let Some(due) = self.pipe.poll_timeout() {
                if due <= now || self.timer.poll_at(cx, due).is_ready() {
                    self.pipe.handle_timeout(self.timer.now());
                    moved = true;
                }
            }
            if self.gone && self.pipe.is_idle() {
                return Poll::Ready(());
            }
            if !moved {
                return Poll::Pending;
            }
        }
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
    fn party_io(&mut self, cx: &mut Context<'_>, p: usize, now: std::time::Instant) -> bool {
        let Some((sock, _)) = self.sockets[p].as_mut() else {
            return false;
        };
        if self.pipe.is_closed(p) {
            self.sockets[p] = None;
            return true;
        }
        let mut moved = false;
        if self.pipe.take_shutdown(p) {
            sock.shutdown_write(cx);
            moved = true;
        }
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
