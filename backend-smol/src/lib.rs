//! fanpipe on smol / async-io. A thin driver: it accepts connections, gives each a task that runs
//! `fanpipe_driver::poll_conn` on its socket, and once a request is admitted to a pipe,
//! hands the socket to the task that owns that pipe (`fanpipe_driver::PipeTask`), which
//! drives all of that pipe's sockets, so the data path takes no lock. Only the hub
//! (registry and counters) is shared. What is smol's own: sockets, timers, channels,
//! spawning, threads and signals.

use std::future::{poll_fn, Future};
use std::io::{self, IoSlice};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_executor::Executor;
use async_io::{Async, Timer};
use fanpipe_core::config::LISTEN_BACKLOG;
use fanpipe_core::conn::Conn;
use fanpipe_core::hub::Hub;
use fanpipe_core::metrics::OpenConn;
use fanpipe_core::registry::PipeId;
use fanpipe_core::{Config, Reject};
use fanpipe_driver::{Msg, PipeTask, ServerState, Socket};
use futures_lite::{AsyncRead, AsyncWrite, FutureExt, Stream};

/// The name of this backend, for `--version`.
pub const BACKEND: &str = "smol";

type Handle = async_channel::Sender<Msg<Party>>;

struct Server {
    state: ServerState<Handle>,
    executor: Arc<Executor<'static>>,
}

impl std::ops::Deref for Server {
    type Target = ServerState<Handle>;

    fn deref(&self) -> &ServerState<Handle> {
        &self.state
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
        state: ServerState::new(config),
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
    let tell = |hub: &Hub<Handle>, phase| {
        for handle in hub.handles() {
            let _ = handle.try_send(Msg::Phase(phase));
        }
    };
    server.shut_down(grace, tell, Timer::at).await;
    Ok(())
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
    stream: Async<TcpStream>,
    peer: SocketAddr,
    (open, full): (OpenConn, Option<Reject>),
) {
    let mut conn = Conn::new(&server.config, Instant::now());
    if let Some(why) = full {
        conn.handle_refused(&why, Instant::now());
    }
    let mut party = Party(stream);
    let mut timer = Wake(Timer::never());
    loop {
        let polled = server.next_request(&mut conn, &mut party, &mut timer, peer);
        let Some(request) = polled.await else {
            return;
        };
        let refused = {
            let mut hub = server.hub();
            let make = |name: &str, n, id| spawn_pipe(server.clone(), name, n, id);
            match hub.admit(&request, make) {
                Ok(admitted) => {
                    // Sent under the lock, so the pipe sees parties in admission order.
                    let arrival = Box::new((party, request, open));
                    let _ = admitted.handle.try_send(Msg::Arrival(arrival));
                    return;
                }
                Err(why) => why,
            }
        };
        conn.handle_refused(&refused, Instant::now());
    }
}

fn spawn_pipe(server: Arc<Server>, name: &str, n: usize, id: PipeId) -> Handle {
    let (tx, rx) = async_channel::unbounded();
    let mut rx = Box::pin(rx);
    let mut task = PipeTask::new(name, n, id, &server.config, Wake(Timer::never()));
    let executor = server.executor.clone();
    executor
        .spawn(async move {
            poll_fn(|cx| {
                task.drive(
                    cx,
                    |cx| rx.as_mut().poll_next(cx),
                    |name, id, event| server.hub().handle_event(name, id, event),
                )
            })
            .await;
        })
        .detach();
    tx
}

/// A party's socket, for the pipe's task.
struct Party(Async<TcpStream>);

impl Socket for Party {
    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }

    fn poll_write_vectored(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn shutdown_write(&mut self, _: &mut Context<'_>) {
        let _ = self.0.get_ref().shutdown(Shutdown::Write);
    }
}

/// The pipe task's timer.
struct Wake(Timer);

impl fanpipe_driver::Timer for Wake {
    fn poll_at(&mut self, cx: &mut Context<'_>, at: Instant) -> Poll<()> {
        self.0.set_at(at);
        Pin::new(&mut self.0).poll(cx).map(|_| ())
    }
}
