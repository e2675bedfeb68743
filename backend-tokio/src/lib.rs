//! fanpipe on tokio. Runtime glue only: the driver (`fanpipe_driver`) accepts, admits,
//! and drives connections and pipes; this file supplies tokio's sockets, timers,
//! channels, spawning and signals. Each pipe has a task that owns all of its sockets,
//! so the data path takes no lock; only the hub (registry and counters) is shared.

use std::future::{poll_fn, Future};
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use fanpipe_core::config::LISTEN_BACKLOG;
use fanpipe_core::pipe::PeerState;
use fanpipe_core::Config;
use fanpipe_driver::tls::MaybeTls;
use fanpipe_driver::{Connection, Listen, Msg, PipeTask, Runtime, ServerState, Socket, Timer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Sleep};

/// The name of this backend, for `--version`.
pub const BACKEND: &str = "tokio";

/// A client's socket as the driver drives it: TLS over TCP on an HTTPS listener.
type Sock = MaybeTls<Party>;

type Handle = mpsc::UnboundedSender<Msg<Sock>>;

/// The driver's view of tokio: the server's shared state, and tokio's tasks.
#[derive(Clone)]
struct Tokio {
    server: Arc<ServerState<Handle>>,
}

impl Runtime for Tokio {
    type Socket = Sock;
    type Timer = Wake;
    type Handle = Handle;

    fn server(&self) -> &ServerState<Handle> {
        &self.server
    }

    fn timer(&self) -> Wake {
        Wake(Box::pin(sleep_until(tokio::time::Instant::now())))
    }

    fn spawn_connection(&self, conn: Connection<Sock>) {
        let rt = self.clone();
        tokio::spawn(async move { fanpipe_driver::serve_connection(&rt, conn).await });
    }

    fn spawn_pipe(&self, mut task: PipeTask<Sock, Wake>) -> Handle {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let server = self.server.clone();
        tokio::spawn(async move {
            poll_fn(|cx| task.run(cx, &server, |cx| rx.poll_recv(cx))).await;
        });
        tx
    }

    fn send(&self, to: &Handle, msg: Msg<Sock>) {
        let _ = to.send(msg);
    }
}

/// Serves on `listener` (HTTPS when `tls` is set) and on `plain` (plain HTTP) until
/// `shutdown` completes, then shuts down gracefully: no new connections, waiting parties
/// let go, running transfers given `grace` to finish. SIGHUP reloads the certificate.
pub async fn serve(
    listener: TcpListener,
    plain: Option<TcpListener>,
    tls: Option<fanpipe_driver::tls::TlsConfig>,
    config: Config,
    grace: Duration,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let rt = Tokio {
        server: Arc::new(ServerState::new(config).with_tls(tls)),
    };
    let main = fanpipe_driver::accept(&rt, || accept_on(&listener, rt.server.tls()));
    let beside = async {
        match &plain {
            Some(plain) => fanpipe_driver::accept(&rt, || accept_on(plain, None)).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        () = main => {}
        () = beside => {}
        () = reload_on_hangup(&rt.server) => {}
        () = async { shutdown.await; fanpipe_driver::announce_stop(&rt).await } => {}
    }
    drop(listener);
    drop(plain);
    fanpipe_driver::shut_down(&rt, grace).await;
    Ok(())
}

/// The next connection on `listener`, wrapped in TLS when `tls` is set.
async fn accept_on(
    listener: &TcpListener,
    tls: Option<&fanpipe_driver::tls::TlsConfig>,
) -> io::Result<(Sock, SocketAddr)> {
    let (stream, peer) = listener.accept().await?;
    // Linux gives an accepted socket the listener's TCP_NODELAY (set in `bind`): one
    // system call less per connection.
    #[cfg(not(target_os = "linux"))]
    let _ = stream.set_nodelay(true);
    Ok((MaybeTls::accept(Party(stream), tls)?, peer))
}

/// Reloads the certificate on each SIGHUP, forever.
async fn reload_on_hangup(server: &ServerState<Handle>) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        return std::future::pending().await;
    };
    while hup.recv().await.is_some() {
        server.reload_tls();
    }
    std::future::pending().await
}

/// Binds a listener on `addr`.
fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    // Responses are written whole, each as soon as it is ready: no Nagle delay.
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG as u32)
}

/// Binds `listen` and serves until SIGINT or SIGTERM, on `threads` worker threads.
/// `on_bound` gets the main address and the plain one beside it, if any.
pub fn run(
    listen: Listen,
    config: Config,
    threads: usize,
    grace: Duration,
    on_bound: impl FnOnce(SocketAddr, Option<SocketAddr>),
) -> io::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()?;
    rt.block_on(async {
        let listener = bind(listen.addr)?;
        let plain = listen.plain.map(bind).transpose()?;
        let plain_addr = plain.as_ref().map(TcpListener::local_addr).transpose()?;
        on_bound(listener.local_addr()?, plain_addr);
        serve(listener, plain, listen.tls, config, grace, stop_signal()).await
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

/// A client's socket.
struct Party(TcpStream);

impl Socket for Party {
    fn peer_state(&self) -> PeerState {
        fanpipe_sys::peer_state(&self.0)
    }

    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        let mut rb = ReadBuf::new(buf);
        Pin::new(&mut self.0)
            .poll_read(cx, &mut rb)
            .map_ok(|()| rb.filled().len())
    }

    fn poll_write_vectored(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn shutdown_write(&mut self, cx: &mut Context<'_>) {
        let _ = Pin::new(&mut self.0).poll_shutdown(cx);
    }
}

/// A task's timer, on tokio's clock.
struct Wake(Pin<Box<Sleep>>);

impl Timer for Wake {
    fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }

    fn poll_at(&mut self, cx: &mut Context<'_>, at: Instant) -> Poll<()> {
        self.0.as_mut().reset(at.into());
        self.0.as_mut().poll(cx)
    }
}
