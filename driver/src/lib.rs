//! The runtime-neutral half of a fanpipe backend. Driving a connection until its request
//! is answered or handed to a pipe ([`poll_conn`]), and driving a pipe's sockets once its
//! parties are admitted ([`PipeTask`]: join arrivals, read and write each socket as the
//! core says, report the core's events, sleep until its next deadline) is the same on
//! every runtime. It is written here once, as `poll` functions over two small traits that
//! each backend implements for its own socket and timer: a backend only says how to
//! accept, read, write, wait and spawn.
#![forbid(unsafe_code)]

use std::future::{poll_fn, Future};
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use fanpipe_core::conn::{Action, Conn, PipeRequest};
use fanpipe_core::hub::{Hub, Phase};
use fanpipe_core::metrics::{Connections, OpenConn};
use fanpipe_core::pipe::{Event, Pipe, READS_PER_TURN};
use fanpipe_core::registry::PipeId;
use fanpipe_core::{Config, Reject};

pub mod tls;

/// A party's socket, as the runtime offers it.
pub trait Socket {
    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>>;
    /// One vectored write (framing and data in one call).
    fn poll_write_vectored(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>>;
    /// Ends the sending side; the reading side stays open for a lingering close.
    fn shutdown_write(&mut self, cx: &mut Context<'_>);

    /// Pushes out bytes the socket still holds after a write said they were taken (a TLS
    /// socket's encrypted records); a plain socket holds none.
    fn poll_flush(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// A clean end of the sending side that may have to wait for the socket: TLS sends
    /// close_notify and flushes it before the FIN. A plain socket just sends its FIN.
    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.shutdown_write(cx);
        Poll::Ready(Ok(()))
    }
}

/// A timer the task can re-arm to the core's next deadline.
pub trait Timer {
    /// Ready once `at` has passed; otherwise wakes the task then.
    fn poll_at(&mut self, cx: &mut Context<'_>, at: Instant) -> Poll<()>;
}

/// What all of a server's tasks share: its configuration, the hub behind one lock (`H`
/// is the backend's handle to a pipe's task), and the count of open connections.
pub struct ServerState<H> {
    pub config: Config,
    pub connections: Connections,
    hub: Mutex<Hub<H>>,
}

impl<H> ServerState<H> {
    pub fn new(config: Config) -> Self {
        ServerState {
            hub: Mutex::new(Hub::new(&config)),
            connections: Connections::default(),
            config,
        }
    }

    /// The hub, locked; held only to admit, report or step a shutdown.
    pub fn hub(&self) -> MutexGuard<'_, Hub<H>> {
        // A panic elsewhere must not take the registry down with it.
        self.hub.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drives a connection (see [`poll_conn`]) until it is closed (`None`) or holds a
    /// pipe request, logging its refusals and serving `/metrics` from the hub.
    pub async fn next_request<S: Socket, T: Timer>(
        &self,
        conn: &mut Conn,
        sock: &mut S,
        timer: &mut T,
        peer: SocketAddr,
    ) -> Option<PipeRequest> {
        poll_fn(|cx| {
            poll_conn(
                cx,
                conn,
                sock,
                timer,
                |why| self.hub().refused(peer, why),
                || self.hub().metrics_page(self.connections.count()),
            )
        })
        .await
    }

    /// A graceful shutdown, stepped until done: `tell` is called once per phase to pass
    /// it to every pipe's task, and `sleep_until` is the runtime's timer.
    pub async fn shut_down<F: Future>(
        &self,
        grace: Duration,
        mut tell: impl FnMut(&Hub<H>, Phase),
        sleep_until: impl Fn(Instant) -> F,
    ) {
        self.hub().begin_shutdown(grace, Instant::now());
        let mut told = Phase::Running;
        loop {
            let step = self.hub().poll_shutdown(Instant::now());
            if step.phase > told {
                told = step.phase;
                tell(&self.hub(), told);
            }
            sleep_until(step.next).await;
            if step.phase == Phase::Done {
                return;
            }
        }
    }
}

/// What a pipe's task is told.
pub enum Msg<S> {
    /// A party the registry admitted, with its socket.
    Arrival(Box<(S, PipeRequest, OpenConn)>),
    /// The server's shutdown reached a new phase.
    Phase(Phase),
}

/// The task that owns one pipe and all of its sockets.
pub struct PipeTask<S, T> {
    pipe: Pipe,
    sockets: Vec<Option<(S, OpenConn)>>,
    timer: T,
    /// The registry no longer routes anyone here.
    gone: bool,
    name: String,
    id: PipeId,
}

impl<S: Socket, T: Timer> PipeTask<S, T> {
    pub fn new(name: &str, n: usize, id: PipeId, config: &Config, timer: T) -> Self {
        PipeTask {
            pipe: Pipe::new(name, n, config),
            sockets: Vec::new(),
            timer,
            gone: false,
            name: name.to_owned(),
            id,
        }
    }

    /// The registry's id of this pipe.
    pub fn id(&self) -> PipeId {
        self.id
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
            let now = Instant::now();
            let mut moved = false;
            while let Poll::Ready(Some(msg)) = recv(cx) {
                match msg {
                    Msg::Arrival(arrival) => {
                        let (socket, request, open) = *arrival;
                        let role = request.role();
                        self.pipe.join(request, role, now);
                        self.sockets.push(Some((socket, open)));
                    }
                    Msg::Phase(phase) => self.pipe.handle_phase(phase, now),
                }
                moved = true;
            }
            for p in 0..self.sockets.len() {
                moved |= self.party_io(cx, p, now);
            }
            while let Some(event) = self.pipe.poll_event() {
                moved = true;
                self.gone |= report(&self.name, self.id, event);
            }
            if let Some(due) = self.pipe.poll_timeout() {
                if due <= now || self.timer.poll_at(cx, due).is_ready() {
                    self.pipe.handle_timeout(Instant::now());
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

    /// One party's socket: close, shut down, write and read as the core says.
    fn party_io(&mut self, cx: &mut Context<'_>, p: usize, now: Instant) -> bool {
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

/// Drives one connection's [`Conn`] until it is closed (`None`) or holds a pipe request
/// for the registry (`Some`): reads, writes, shutdowns and deadlines as the core says.
/// `refused` logs and counts a refusal; `metrics` renders the `/metrics` page. After a
/// pipe request the caller admits it, or tells the `Conn` why not and drives it again.
pub fn poll_conn<S: Socket, T: Timer>(
    cx: &mut Context<'_>,
    conn: &mut Conn,
    sock: &mut S,
    timer: &mut T,
    mut refused: impl FnMut(&Reject),
    mut metrics: impl FnMut() -> String,
) -> Poll<Option<PipeRequest>> {
    loop {
        if let Some(why) = conn.take_refused() {
            refused(&why);
        }
        let io = match conn.poll_action() {
            Action::Read => sock.poll_read(cx, conn.read_buf()).map(|r| match r {
                Ok(n) => conn.handle_read(n, Instant::now()),
                Err(_) => conn.handle_error(),
            }),
            Action::Write => {
                let bufs = [IoSlice::new(conn.output())];
                sock.poll_write_vectored(cx, &bufs).map(|r| match r {
                    Ok(n) if n > 0 => conn.handle_wrote(n, Instant::now()),
                    _ => conn.handle_error(),
                })
            }
            Action::Shutdown => {
                sock.shutdown_write(cx);
                conn.handle_shutdown(Instant::now());
                Poll::Ready(())
            }
            Action::Metrics => {
                conn.handle_metrics(&metrics(), Instant::now());
                Poll::Ready(())
            }
            Action::Pipe => return Poll::Ready(conn.take_pipe_request()),
            Action::Close => return Poll::Ready(None),
        };
        if io.is_pending() {
            match conn.poll_timeout() {
                Some(at) if timer.poll_at(cx, at).is_ready() => {
                    conn.handle_timeout(Instant::now());
                }
                _ => return Poll::Pending,
            }
        }
    }
}
