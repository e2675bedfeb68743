//! fanpipe on tokio. A thin driver: it accepts connections, gives each a task that runs
//! `fanpipe_driver::poll_conn` on its socket, and once a request is admitted to a pipe,
//! hands the socket to the task that owns that pipe (`fanpipe_driver::PipeTask`), which
//! drives all of that pipe's sockets, so the data path takes no lock. Only the hub
//! (registry and counters) is shared. What is tokio's own: sockets, timers, channels,
//! spawning and signals.

use std::future::{poll_fn, Future};
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use fanpipe_core::config::LISTEN_BACKLOG;
use fanpipe_core::conn::Conn;
use fanpipe_core::hub::Hub;
use fanpipe_core::metrics::OpenConn;
use fanpipe_core::registry::PipeId;
use fanpipe_core::{Config, Reject};
use fanpipe_driver::{Msg, PipeTask, ServerState, Socket, Timer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Sleep};

/// The name of this backend, for `--version`.
pub const BACKEND: &str = "tokio";

type Handle = mpsc::UnboundedSender<Msg<Party>>;

type Server = ServerState<Handle>;

/// Serves on `listener` until `shutdown` completes, then shuts down gracefully: no new
/// connections, waiting parties let go, running transfers given `grace` to finish.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    grace: Duration,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let server = Arc::new(Server::new(config));
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
    let tell = |hub: &Hub<Handle>, phase| {
        for handle in hub.handles() {
            let _ = handle.send(Msg::Phase(phase));
        }
    };
    server
        .shut_down(grace, tell, |at| sleep_until(at.into()))
        .await;
    Ok(())
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
    stream: TcpStream,
    peer: SocketAddr,
    (open, full): (OpenConn, Option<Reject>),
) {
    let mut conn = Conn::new(&server.config, Instant::now());
    if let Some(why) = full {
        conn.handle_refused(&why, Instant::now());
    }
    let mut party = Party(stream);
    let mut timer = Wake(Box::pin(sleep_until(tokio::time::Instant::now())));
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
                    let _ = admitted
                        .handle
                        .send(Msg::Arrival(Box::new((party, request, open))));
                    return;
                }
                Err(why) => why,
            }
        };
        conn.handle_refused(&refused, Instant::now());
    }
}

fn spawn_pipe(server: Arc<Server>, name: &str, n: usize, id: PipeId) -> Handle {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let timer = Wake(Box::pin(sleep_until(tokio::time::Instant::now())));
    let mut task = PipeTask::new(name, n, id, &server.config, timer);
    tokio::spawn(async move {
        poll_fn(|cx| {
            task.drive(
                cx,
                |cx| rx.poll_recv(cx),
                |name, id, event| server.hub().handle_event(name, id, event),
            )
        })
        .await;
    });
    tx
}

/// A party's socket, for the pipe's task.
struct Party(TcpStream);

impl Socket for Party {
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

/// The pipe task's timer.
struct Wake(Pin<Box<Sleep>>);

impl Timer for Wake {
    fn poll_at(&mut self, cx: &mut Context<'_>, at: Instant) -> Poll<()> {
        self.0.as_mut().reset(at.into());
        self.0.as_mut().poll(cx)
    }
}
