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
use std::time::Instant;

use fanpipe_core::conn::{Action, Conn, PipeRequest};
use fanpipe_core::metrics::Metrics;
use fanpipe_core::pipe::{Event, Pipe};
use fanpipe_core::registry::{PipeId, Registry};
use fanpipe_core::request::{Role, Route};
use fanpipe_core::Config;
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
}

type Handle = mpsc::UnboundedSender<Arrival>;

struct Shared {
    registry: Registry<Handle>,
    metrics: Metrics,
}

struct Server {
    config: Config,
    shared: Mutex<Shared>,
}

impl Server {
    fn lock(&self) -> MutexGuard<'_, Shared> {
        // A panic elsewhere must not take the registry down with it.
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Serves on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let server = Arc::new(Server {
        config,
        shared: Mutex::new(Shared {
            registry: Registry::default(),
            metrics: Metrics::default(),
        }),
    });
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(connection(server.clone(), stream, peer));
                }
                Err(e) => {
                    // Out of descriptors and the like: wait a little rather than spin.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            () = &mut shutdown => return Ok(()),
        }
    }
}

/// Binds `addr` and serves until SIGINT or SIGTERM.
pub fn run(addr: SocketAddr, config: Config, on_bound: impl FnOnce(SocketAddr)) -> io::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let listener = TcpListener::bind(addr).await?;
        on_bound(listener.local_addr()?);
        serve(listener, config, stop_signal()).await
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
async fn connection(server: Arc<Server>, mut stream: TcpStream, peer: SocketAddr) {
    let mut conn = Conn::new(&server.config, Instant::now());
    loop {
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
                    let (waiting, running) = shared.registry.counts();
                    shared.metrics.render(waiting, running)
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
                            let _ = admitted.handle.send(Arrival {
                                stream,
                                request,
                                role,
                            });
                            return;
                        }
                        Err(why) => why,
                    }
                };
                tracing::info!(%peer, pipe = %name, status = refused.status(), "refused: {refused}");
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
    sockets: Vec<Option<TcpStream>>,
    arrivals: mpsc::UnboundedReceiver<Arrival>,
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
            while let Poll::Ready(Some(a)) = self.arrivals.poll_recv(cx) {
                self.pipe.join(a.request, a.role, now);
                self.sockets.push(Some(a.stream));
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
        let Some(sock) = self.sockets[p].as_mut() else {
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
                    outcome = ?s.outcome,
                    "transfer ended"
                );
            }
        }
    }
}
