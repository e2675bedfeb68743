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
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use fanpipe_core::conn::{Action, Conn, PipeRequest};
use fanpipe_core::metrics::{admit_connection, outcome_label, Metrics};
use fanpipe_core::pipe::{Event, Pipe};
use fanpipe_core::registry::{PipeId, Registry};
use fanpipe_core::request::{Role, Route};
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
    /// The server stops: let waiting parties go, finish the transfer.
    Shutdown,
    /// The grace is over: cut the transfer.
    Abort,
}

type Handle = mpsc::UnboundedSender<Msg>;

/// Counts a connection as open while it lives, wherever its socket goes.
struct OpenConn(Arc<AtomicUsize>);

impl Drop for OpenConn {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Shared {
    registry: Registry<Handle>,
    metrics: Metrics,
}

struct Server {
    config: Config,
    shared: Mutex<Shared>,
    connections: Arc<AtomicUsize>,
}

impl Server {
    fn lock(&self) -> MutexGuard<'_, Shared> {
        // A panic elsewhere must not take the registry down with it.
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tells every pipe's task.
    fn tell_pipes(&self, msg: impl Fn() -> Msg) {
        let shared = self.lock();
        for handle in shared.registry.handles() {
            let _ = handle.send(msg());
        }
    }

    fn pipes_left(&self) -> bool {
        let c = self.lock().registry.counts();
        c.waiting_pipes + c.running_pipes > 0
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
        shared: Mutex::new(Shared {
            registry: Registry::new(config.max_pipes),
            metrics: Metrics::default(),
        }),
        config,
        connections: Arc::new(AtomicUsize::new(0)),
    });
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let open = server.connections.fetch_add(1, Ordering::Relaxed);
                    let guard = OpenConn(server.connections.clone());
                    let full = admit_connection(open, server.config.max_connections).err();
                    tokio::spawn(connection(server.clone(), stream, peer, guard, full));
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
    tracing::info!(
        "shutting down: waiting up to {} s for running transfers",
        grace.as_secs()
    );
    server.lock().registry.close();
    server.tell_pipes(|| Msg::Shutdown);
    let deadline = tokio::time::Instant::now() + grace;
    while server.pipes_left() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if server.pipes_left() {
        server.tell_pipes(|| Msg::Abort);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while server.pipes_left() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Let the last words reach the clients before the runtime drops every socket.
    tokio::time::sleep(Duration::from_millis(100)).await;
    Ok(())
}

/// Binds `addr` and serves until SIGINT or SIGTERM.
pub fn run(
    addr: SocketAddr,
    config: Config,
    grace: Duration,
    on_bound: impl FnOnce(SocketAddr),
) -> io::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let listener = TcpListener::bind(addr).await?;
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
    open: OpenConn,
    full: Option<Reject>,
) {
    let mut conn = Conn::new(&server.config, Instant::now());
    if let Some(why) = full {
        conn.handle_refused(&why, Instant::now());
    }
    loop {
        if let Some(why) = conn.take_refused() {
            tracing::info!(%peer, status = why.status(), "refused: {why}");
            server.lock().metrics.reject(&why);
        }
        let deadline = conn.poll_timeout().map(tokio::time::Instant::from_std);
        let timer = async {
            match deadline {
                Some(d) => sleep_until(d).await,
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
                let text = {
                    let shared = server.lock();
                    let connections = server.connections.load(Ordering::Relaxed);
                    shared.metrics.render(shared.registry.counts(), connections)
                };
                conn.handle_metrics(&text, Instant::now());
            }
            Action::Pipe => {
                let Some(request) = conn.take_pipe_request() else {
                    return;
                };
                let Route::Pipe { name, role, n } = request.request.route.clone() else {
                    return;
                };
                let refused = {
                    let mut shared = server.lock();
                    let make = |id| spawn_pipe(server.clone(), name.clone(), n, id);
                    match shared.registry.admit(&name, role, n, make) {
                        Ok(admitted) => {
                            // Sent under the lock, so the pipe sees parties in admission order.
                            let _ = admitted.handle.send(Msg::Arrival(Box::new(Arrival {
                                stream,
                                request,
                                role,
                                _open: open,
                            })));
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

fn spawn_pipe(server: Arc<Server>, name: String, n: usize, id: PipeId) -> Handle {
    let (tx, rx) = mpsc::unbounded_channel();
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
                    Msg::Shutdown => self.pipe.handle_shutdown(now),
                    Msg::Abort => self.pipe.handle_abort(now),
                }
                moved = true;
            }
            for p in 0..self.sockets.len() {
                moved |= self.party_io(cx, p, now);
            }
            while let Some(event) = self.pipe.poll_event() {
                moved = true;
                self.event(event);
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
        if let Some(buf) = self.pipe.read_buf(p) {
            let mut rb = ReadBuf::new(buf);
            match Pin::new(&mut *sock).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    self.pipe.handle_read(p, n, now);
                    moved = true;
                }
                Poll::Ready(Err(_)) => {
                    self.pipe.handle_error(p, now);
                    moved = true;
                }
                Poll::Pending => {}
            }
        }
        moved
    }

    fn event(&mut self, event: Event) {
        let mut shared = self.server.lock();
        match event {
            Event::Left(role) => self.gone |= shared.registry.leave(&self.name, self.id, role),
            Event::Started => {
                shared.registry.start(&self.name, self.id);
                tracing::debug!(pipe = %self.name, "transfer started");
            }
            Event::Finished(s) => {
                shared.registry.finish(&self.name, self.id);
                shared.metrics.record(&s);
                self.gone = true;
                tracing::info!(
                    pipe = %s.name,
                    n = s.n,
                    bytes = s.bytes,
                    complete = s.complete,
                    seconds = format_args!("{:.3}", s.seconds),
                    outcome = outcome_label(s.outcome),
                    "transfer ended"
                );
            }
        }
    }
}
