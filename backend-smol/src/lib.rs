//! fanpipe on smol / async-io. Runtime glue only: the driver (`fanpipe_driver`) accepts,
//! admits, and drives connections and pipes; this file supplies smol's sockets, timers,
//! channels, executor threads and signals. Each pipe has a task that owns all of its
//! sockets, so the data path takes no lock; only the hub (registry and counters) is
//! shared.

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
use fanpipe_core::pipe::PeerState;
use fanpipe_core::Config;
use fanpipe_driver::tls::{MaybeTls, TlsConfig};
use fanpipe_driver::{Connection, Listen, Msg, PipeTask, Runtime, ServerState, Socket};
use futures_lite::{AsyncRead, AsyncWrite, FutureExt, Stream};

/// The name of this backend, for `--version`.
pub const BACKEND: &str = "smol";

/// A client's socket as the driver drives it: TLS over TCP on an HTTPS listener.
type Sock = MaybeTls<Party>;

type Handle = async_channel::Sender<Msg<Sock>>;

/// The driver's view of smol: the server's shared state, and the executor its tasks run on.
#[derive(Clone)]
struct Smol {
    server: Arc<ServerState<Handle>>,
    executor: Arc<Executor<'static>>,
}

impl Runtime for Smol {
    type Socket = Sock;
    type Timer = Wake;
    type Handle = Handle;

    fn server(&self) -> &ServerState<Handle> {
        &self.server
    }

    fn timer(&self) -> Wake {
        Wake(Timer::never())
    }

    fn spawn_connection(&self, conn: Connection<Sock>) {
        let rt = self.clone();
        let task = async move { fanpipe_driver::serve_connection(&rt, conn).await };
        self.executor.spawn(task).detach();
    }

    fn spawn_pipe(&self, mut task: PipeTask<Sock, Wake>) -> Handle {
        let (tx, rx) = async_channel::unbounded();
        let mut rx = Box::pin(rx);
        let server = self.server.clone();
        self.executor
            .spawn(async move {
                poll_fn(|cx| task.run(cx, &server, |cx| rx.as_mut().poll_next(cx))).await;
            })
            .detach();
        tx
    }

    fn send(&self, to: &Handle, msg: Msg<Sock>) {
        let _ = to.try_send(msg);
    }
}

/// Serves on `listener` (HTTPS when `tls` is set) and on `plain` (plain HTTP) until
/// `shutdown` completes, then shuts down gracefully: no new connections, waiting parties
/// let go, running transfers given `grace` to finish. Each message of `hangups` reloads
/// the certificate. Tasks are spawned on `executor`, which the caller runs on as many
/// threads as it likes.
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    executor: Arc<Executor<'static>>,
    listener: Async<TcpListener>,
    plain: Option<Async<TcpListener>>,
    tls: Option<TlsConfig>,
    config: Config,
    grace: Duration,
    hangups: async_channel::Receiver<()>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let rt = Smol {
        server: Arc::new(ServerState::new(config).with_tls(tls)),
        executor,
    };
    let main = fanpipe_driver::accept(&rt, || accept_on(&listener, rt.server.tls()));
    let beside = async {
        match &plain {
            Some(plain) => fanpipe_driver::accept(&rt, || accept_on(plain, None)).await,
            None => std::future::pending().await,
        }
    };
    let stop = async {
        shutdown.await;
        fanpipe_driver::announce_stop(&rt).await;
    };
    let reload = async {
        while hangups.recv().await.is_ok() {
            rt.server.reload_tls();
        }
        std::future::pending().await
    };
    main.or(beside).or(reload).or(stop).await;
    drop(listener);
    drop(plain);
    fanpipe_driver::shut_down(&rt, grace).await;
    Ok(())
}

/// The next connection on `listener`, wrapped in TLS when `tls` is set.
async fn accept_on(
    listener: &Async<TcpListener>,
    tls: Option<&TlsConfig>,
) -> io::Result<(Sock, SocketAddr)> {
    let (stream, peer) = listener.accept().await?;
    // Linux gives an accepted socket the listener's TCP_NODELAY (set in `bind`): one
    // system call less per connection.
    #[cfg(not(target_os = "linux"))]
    let _ = stream.get_ref().set_nodelay(true);
    Ok((MaybeTls::accept(Party(stream), tls)?, peer))
}

/// Binds a listener on `addr`.
fn bind(addr: SocketAddr) -> io::Result<Async<TcpListener>> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    // Responses are written whole, each as soon as it is ready: no Nagle delay.
    socket.set_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Async::new(TcpListener::from(socket))
}

/// Binds `listen` and serves until SIGINT or SIGTERM, on `threads` threads; SIGHUP
/// reloads the certificate. `on_bound` gets the main address and the plain one beside
/// it, if any.
pub fn run(
    listen: Listen,
    config: Config,
    threads: usize,
    grace: Duration,
    on_bound: impl FnOnce(SocketAddr, Option<SocketAddr>),
) -> io::Result<()> {
    use async_signal::Signal;
    let signals = async_signal::Signals::new([Signal::Term, Signal::Int, Signal::Hup])?;
    let listener = bind(listen.addr)?;
    let plain = listen.plain.map(bind).transpose()?;
    let plain_addr = plain
        .as_ref()
        .map(|p| p.get_ref().local_addr())
        .transpose()?;
    on_bound(listener.get_ref().local_addr()?, plain_addr);
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
    let (hangup, hangups) = async_channel::unbounded();
    let stop_signal = async move {
        let mut signals = signals;
        while let Some(signal) = futures_lite::StreamExt::next(&mut signals).await {
            match signal {
                Ok(Signal::Hup) => {
                    let _ = hangup.try_send(());
                }
                _ => return,
            }
        }
    };
    let served = async_io::block_on(executor.run(serve(
        executor.clone(),
        listener,
        plain,
        listen.tls,
        config,
        grace,
        hangups,
        stop_signal,
    )));
    drop(stop);
    for w in workers {
        let _ = w.join();
    }
    served
}

/// A client's socket.
struct Party(Async<TcpStream>);

impl Socket for Party {
    fn peer_state(&self) -> PeerState {
        fanpipe_sys::peer_state(&self.0)
    }

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

/// A task's timer, on the system clock.
struct Wake(Timer);

impl fanpipe_driver::Timer for Wake {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn poll_at(&mut self, cx: &mut Context<'_>, at: Instant) -> Poll<()> {
        self.0.set_at(at);
        Pin::new(&mut self.0).poll(cx).map(|_| ())
    }
}
