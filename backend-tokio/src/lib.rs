//! fanpipe on tokio. A thin driver: it moves bytes between sockets and the sans-io core
//! and sleeps until the core's next deadline; every decision is the core's.
//!
//! One task per connection until its request is understood; then the connection is
//! handed to the task that owns its pipe, which drives all of that pipe's sockets, so
//! the data path takes no lock. Only the registry is shared.

use std::future::{poll_fn, Future};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use fanpipe_core::config::LISTEN_BACKLOG;
use fanpipe_core::conn::{Action, Conn, PipeRequest};
use fanpipe_core::hub::{Hub, Phase};
use fanpipe_core::metrics::{Connections, OpenConn};
use fanpipe_core::pipe::{Pipe, READS_PER_TURN};
use fanpipe_core::registry::PipeId;
use fanpipe_core::request::Role;
use fanpipe_core::{Config, Reject};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Sleep};

/// The name of this backend, for `--version`.
pub const BACKEND: &str = "tokio";

/// A connection on its way to a pipe's task.
struct Arrival {
    stream: TcpStream,
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

type Handle = mpsc::UnboundedSender<Msg>;

struct Server {
    config: Config,
    hub: Mutex<Hub<Handle>>,
    connections: Connections,
}

impl Server {
    fn hub(&self) -> MutexGuard<'_, Hub<Handle>> {
        // A panic elsewhere must not take the registry down with it.
        self.hub.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Serves on `listener` until `shutdown` completes, then shuts down gracefully: no new
/// connections, waiting parties let go, running transfers given `grace` to finish.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    grace: Duration,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let server = Arc::new(Server {
        hub: Mutex::new(Hub::new(&config)),
        config,
        connections: Connections::default(),
    });
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let open = server.connections.open(server.config.max_connections);
                    tokio::spawn(connection(server.clone(), stream, peer, open));
                }
                Err(e) => {
                    // Out of descriptors and the like: wait a little rather than spin.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    server.hub().begin_shutdown(grace, Instant::now());
    let mut told = Phase::Running;
    loop {
        let step = server.hub().poll_shutdown(Instant::now());
        if step.phase > told {
            told = step.phase;
            for handle in server.hub().handles() {
                let _ = handle.send(Msg::Phase(told));
            }
        }
        sleep_until(step.next.into()).await;
        if step.phase == Phase::Done {
            return Ok(());
        }
    }
}

/// Binds `addr` and serves until SIGINT or SIGTERM, on `threads` worker threads.
pub fn run(
    addr: SocketAddr,
    config: Config,
    threads: usize,
    grace: Duration,
    on_bound: impl FnOnce(SocketAddr),
) -> io::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()?;
    rt.block_on(async {
        let socket = match addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        let listener = socket.listen(LISTEN_BACKLOG as u32)?;
        on_bound(listener.local_addr()?);
        serve(listener, config, grace, stop_signal()).await
    })
}

async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! { _ = int.recv() => {}, _ = term.recv() => {} }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// A connection until it is answered or handed to a pipe.
async fn connection(
    server: Arc<Server>,
    mut stream: TcpStream,
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
                Some(d) => sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        match conn.poll_action() {
            Action::Read => tokio::select! {
                r = stream.read(conn.read_buf()) => match r {
                    Ok(n) => conn.handle_read(n, Instant::now()),
                    Err(_) => conn.handle_error(),
                },
                () = timer => conn.handle_timeout(Instant::now()),
            },
            Action::Write => tokio::select! {
                r = stream.write(conn.output()) => match r {
                    Ok(n) if n > 0 => conn.handle_wrote(n, Instant::now()),
                    _ => conn.handle_error(),
                },
                () = timer => conn.handle_timeout(Instant::now()),
            },
            Action::Shutdown => {
                let _ = stream.shutdown().await;
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
                            let _ = admitted.handle.send(Msg::Arrival(Box::new(arrival)));
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
    let (tx, rx) = mpsc::unbounded_channel();
    let name = name.to_owned();
    tokio::spawn(async move {
        let mut task = PipeTask {
            pipe: Pipe::new(&name, n, &server.config),
            sockets: Vec::new(),
            arrivals: rx,
            timer: Box::pin(sleep_until(tokio::time::Instant::now())),
            gone: false,
            server,
            name,
            id,
        };
        poll_fn(|cx| task.drive(cx)).await;
    });
    tx
}

/// The task that owns one pipe and all of its sockets.
struct PipeTask {
    pipe: Pipe,
    sockets: Vec<Option<(TcpStream, OpenConn)>>,
    arrivals: mpsc::UnboundedReceiver<Msg>,
    timer: Pin<Box<Sleep>>,
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
            while let Poll::Ready(Some(msg)) = self.arrivals.poll_recv(cx) {
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
                    self.timer
                        .as_mut()
                        .reset(tokio::time::Instant::from_std(due));
                    if self.timer.as_mut().poll(cx).is_ready() {
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
            let _ = Pin::new(&mut *sock).poll_shutdown(cx);
            moved = true;
        }
        let slices = self.pipe.write_slices(p);
        if slices.total() > 0 {
            match Pin::new(&mut *sock).poll_write_vectored(cx, &slices) {
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
            let mut rb = ReadBuf::new(buf);
            match Pin::new(&mut *sock).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
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
