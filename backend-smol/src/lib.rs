//! fanpipe on smol / async-io. A thin driver: it moves bytes between sockets and the
//! sans-io core and sleeps until the core's next deadline; every decision is the core's.
//!
//! One task per connection until its request is understood; then the connection is
//! handed to the task that owns its pipe, which drives all of that pipe's sockets, so
//! the data path takes no lock. Only the hub (registry and counters) is shared. The
//! executor runs on one thread per core.

use std::future::{poll_fn, Future};
use std::io::{self, IoSlice};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_executor::Executor;
use async_io::{Async, Timer};
use fanpipe_core::config::LISTEN_BACKLOG;
use fanpipe_core::conn::{Action, Conn, PipeRequest};
use fanpipe_core::hub::{Hub, Phase};
use fanpipe_core::metrics::{Connections, OpenConn};
use fanpipe_core::pipe::{Pipe, READS_PER_TURN};
use fanpipe_core::registry::PipeId;
use fanpipe_core::request::Role;
use fanpipe_core::{Config, Reject};
use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, FutureExt, Stream};

/// The name of this backend, for `--version`.
pub const BACKEND: &str = "smol";

/// A connection on its way to a pipe's task.
struct Arrival {
    stream: Async<TcpStream>,
    request: PipeRequest,
    role: Role,
    _open: OpenConn,
}

/// What a pipe's task is told.
enum Msg {
    Arrival(Box<Arrival>),
    /// The server's shutdown reached a new phase.
    Phase(Phase),
}

type Handle = async_channel::Sender<Msg>;

struct Server {
    config: Config,
    hub: Mutex<Hub<Handle>>,
    connections: Connections,
    executor: Arc<Executor<'static>>,
}

impl Server {
    fn hub(&self) -> MutexGuard<'_, Hub<Handle>> {
        // A panic elsewhere must not take the registry down with it.
        self.hub.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Serves on `listener` until `shutdown` completes, then shuts down gracefully: no new
/// connections, waiting parties let go, running transfers given `grace` to finish.
/// Tasks are spawned on `executor`, which the caller runs on as many threads as it likes.
pub async fn serve(
    executor: Arc<Executor<'static>>,
    listener: Async<TcpListener>,
    config: Config,
    grace: Duration,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let server = Arc::new(Server {
        hub: Mutex::new(Hub::new(&config)),
        config,
        connections: Connections::default(),
        executor,
    });
    let accept = async {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    let _ = stream.get_ref().set_nodelay(true);
                    let open = server.connections.open(server.config.max_connections);
                    let task = connection(server.clone(), stream, peer, open);
                    server.executor.spawn(task).detach();
                }
                Err(e) => {
                    // Out of descriptors and the like: wait a little rather than spin.
                    tracing::warn!("accept failed: {e}");
                    Timer::after(Duration::from_millis(50)).await;
                }
            }
        }
    };
    accept.or(shutdown).await;
    drop(listener);
    server.hub().begin_shutdown(grace, Instant::now());
    let mut told = Phase::Running;
    loop {
        let step = server.hub().poll_shutdown(Instant::now());
        if step.phase > told {
            told = step.phase;
            for handle in server.hub().handles() {
                let _ = handle.try_send(Msg::Phase(told));
            }
        }
        Timer::at(step.next).await;
        if step.phase == Phase::Done {
            return Ok(());
        }
    }
}

/// Binds `addr` and serves until SIGINT or SIGTERM, on `threads` threads.
pub fn run(
    addr: SocketAddr,
    config: Config,
    threads: usize,
    grace: Duration,
    on_bound: impl FnOnce(SocketAddr),
) -> io::Result<()> {
    let signals =
        async_signal::Signals::new([async_signal::Signal::Term, async_signal::Signal::Int])?;
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    let listener = Async::new(TcpListener::from(socket))?;
    on_bound(listener.get_ref().local_addr()?);
    let executor = Arc::new(Executor::new());
    let (stop, stopped) = async_channel::bounded::<()>(1);
    let workers: Vec<_> = (1..threads)
        .map(|i| {
            let (ex, stopped) = (executor.clone(), stopped.clone());
            std::thread::Builder::new()
                .name(format!("fanpipe-{i}"))
                .spawn(move || async_io::block_on(ex.run(stopped.recv())))
        })
        .collect::<io::Result<_>>()?;
    let stop_signal = async move {
        let mut signals = signals;
        let _ = futures_lite::StreamExt::next(&mut signals).await;
    };
    let served = async_io::block_on(executor.run(serve(
        executor.clone(),
        listener,
        config,
        grace,
        stop_signal,
    )));
    drop(stop);
    for w in workers {
        let _ = w.join();
    }
    served
}

/// A connection until it is answered or handed to a pipe.
async fn connection(
    server: Arc<Server>,
    mut stream: Async<TcpStream>,
    peer: SocketAddr,
    (open, full): (OpenConn, Option<Reject>),
) {
    let mut conn = Conn::new(&server.config, Instant::now());
    if let Some(why) = full {
        conn.handle_refused(&why, Instant::now());
    }
    loop {
        if let Some(why) = conn.take_refused() {
            server.hub().refused(peer, &why);
        }
        let deadline = conn.poll_timeout();
        let timer = async {
            match deadline {
                Some(d) => Timer::at(d).await,
                None => Timer::never().await,
            };
            None
        };
        match conn.poll_action() {
            Action::Read => match async { Some(stream.read(conn.read_buf()).await) }
                .or(timer)
                .await
            {
                Some(Ok(n)) => conn.handle_read(n, Instant::now()),
                Some(Err(_)) => conn.handle_error(),
                None => conn.handle_timeout(Instant::now()),
            },
            Action::Write => match async { Some(stream.write(conn.output()).await) }
                .or(timer)
                .await
            {
                Some(Ok(n)) if n > 0 => conn.handle_wrote(n, Instant::now()),
                Some(_) => conn.handle_error(),
                None => conn.handle_timeout(Instant::now()),
            },
            Action::Shutdown => {
                let _ = stream.get_ref().shutdown(Shutdown::Write);
                conn.handle_shutdown(Instant::now());
            }
            Action::Metrics => {
                let text = server.hub().metrics_page(server.connections.count());
                conn.handle_metrics(&text, Instant::now());
            }
            Action::Pipe => {
                let Some(request) = conn.take_pipe_request() else {
                    return;
                };
                let refused = {
                    let mut hub = server.hub();
                    let make = |name: &str, n, id| spawn_pipe(server.clone(), name, n, id);
                    match hub.admit(&request, make) {
                        Ok(admitted) => {
                            // Sent under the lock, so the pipe sees parties in admission order.
                            let role = request.role();
                            let arrival = Arrival {
                                stream,
                                request,
                                role,
                                _open: open,
                            };
                            let _ = admitted.handle.try_send(Msg::Arrival(Box::new(arrival)));
                            return;
                        }
                        Err(why) => why,
                    }
                };
                conn.handle_refused(&refused, Instant::now());
            }
            Action::Close => return,
        }
    }
}

fn spawn_pipe(server: Arc<Server>, name: &str, n: usize, id: PipeId) -> Handle {
    let (tx, rx) = async_channel::unbounded();
    let name = name.to_owned();
    let executor = server.executor.clone();
    executor
        .spawn(async move {
            let mut task = PipeTask {
                pipe: Pipe::new(&name, n, &server.config),
                sockets: Vec::new(),
                arrivals: Box::pin(rx),
                timer: Timer::never(),
                gone: false,
                server,
                name,
                id,
            };
            poll_fn(|cx| task.drive(cx)).await;
        })
        .detach();
    tx
}

/// The task that owns one pipe and all of its sockets.
struct PipeTask {
    pipe: Pipe,
    sockets: Vec<Option<(Async<TcpStream>, OpenConn)>>,
    arrivals: Pin<Box<async_channel::Receiver<Msg>>>,
    timer: Timer,
    /// The registry no longer routes anyone here.
    gone: bool,
    server: Arc<Server>,
    name: String,
    id: PipeId,
}

impl PipeTask {
    /// Does all the I/O the core asks for until none can proceed; done once the pipe is
    /// out of the registry and every socket is closed.
    fn drive(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let now = Instant::now();
            let mut moved = false;
            while let Poll::Ready(Some(msg)) = self.arrivals.as_mut().poll_next(cx) {
                match msg {
                    Msg::Arrival(a) => {
                        self.pipe.join(a.request, a.role, now);
                        self.sockets.push(Some((a.stream, a._open)));
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
                let name = &self.name;
                self.gone |= self.server.hub().handle_event(name, self.id, event);
            }
            if let Some(due) = self.pipe.poll_timeout() {
                if due <= now {
                    self.pipe.handle_timeout(now);
                    moved = true;
                } else {
                    self.timer.set_at(due);
                    if Pin::new(&mut self.timer).poll(cx).is_ready() {
                        moved = true;
                    }
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
            let _ = sock.get_ref().shutdown(Shutdown::Write);
            moved = true;
        }
        let slices = self.pipe.write_slices(p);
        if slices.total() > 0 {
            let bufs: &[IoSlice<'_>] = &slices;
            match Pin::new(&mut *sock).poll_write_vectored(cx, bufs) {
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
            match Pin::new(&mut *sock).poll_read(cx, buf) {
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
