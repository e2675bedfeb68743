//! fanpipe on glommio: io_uring, one executor per core, nothing `Send`. Runtime glue
//! only: the driver (`fanpipe_driver`) accepts, admits, and drives connections and
//! pipes; this file supplies glommio's sockets, timers, mailboxes, executors, the
//! hand-over between cores and the stop signal.
//!
//! Each core accepts on its own listener (SO_REUSEPORT) and reads request heads. A pipe
//! belongs to the core its name hashes to (`shard_of`); a connection accepted elsewhere
//! is handed over to that core with its socket and the bytes already read, before the
//! transfer, so that a transfer's whole data path runs on one core with no lock and no
//! cross-core copy. Only the hub (registry and counters) is shared, behind a mutex taken
//! to admit and to report.

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::future::{poll_fn, Future};
use std::io::{self, IoSlice};
use std::net::{Shutdown, SocketAddr};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use fanpipe_core::config::LISTEN_BACKLOG;
use fanpipe_core::pipe::PeerState;
use fanpipe_core::registry::{shard_of, PipeId};
use fanpipe_core::Config;
use fanpipe_driver::tls::{MaybeTls, TlsSession, TlsSocket};
use fanpipe_driver::{Connection, Listen, Msg, PipeTask, Runtime, ServerState, Socket};
use futures_lite::{AsyncRead, AsyncWrite, FutureExt};
use glommio::channels::shared_channel::{self, ConnectedSender, SharedReceiver, SharedSender};
use glommio::net::{TcpListener, TcpStream};
use glommio::timer::{sleep, Timer};
use glommio::{LocalExecutorBuilder, LocalExecutorPoolBuilder, Placement, PoolPlacement};
use socket2::SockRef;

/// The name of this backend, for `--version`.
pub const BACKEND: &str = "glommio";

/// Memory each executor sets aside for io_uring's registered buffers. Those serve file
/// I/O, which fanpipe does not do: sockets are read into the pipes' own rings. glommio's
/// default (10 MiB per executor) would be most of the server's resident memory.
const IO_MEMORY: usize = 256 << 10;

/// How often an idle core looks whether a stop signal came.
const STOP_POLL: Duration = Duration::from_millis(50);

/// Binds `listen` and serves until SIGINT or SIGTERM, with one executor per thread, each
/// pinned to its own core when there are enough; SIGHUP reloads the certificate. Fails
/// at once, with one clear error, where io_uring is not available. `on_bound` gets the
/// main address and the plain one beside it, if any.
pub fn run(
    listen: Listen,
    config: Config,
    threads: usize,
    grace: Duration,
    on_bound: impl FnOnce(SocketAddr, Option<SocketAddr>),
) -> io::Result<()> {
    let threads = threads.max(1);
    if let Err(why) = io_uring_works() {
        return Err(io::Error::other(format!(
            "the glommio backend needs io_uring, which this system does not allow ({why}); \
             build fanpipe with the tokio or smol backend instead"
        )));
    }
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, stop.clone())?;
    }
    let hangup = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGHUP, hangup.clone())?;
    let main = bind(listen.addr, threads)?;
    let plain = match listen.plain {
        Some(addr) => Some(bind(addr, threads)?),
        None => None,
    };
    on_bound(
        main[0].local_addr()?,
        plain.as_ref().map(|p| p[0].local_addr()).transpose()?,
    );
    let shared = Arc::new(Shared {
        state: ServerState::new(config).with_tls(listen.tls),
        stop,
        closing: AtomicBool::new(false),
        hangup,
        grace,
        threads,
    });
    // Each core takes one of each.
    let listeners: Vec<_> = match plain {
        Some(plain) => main.into_iter().zip(plain.into_iter().map(Some)).collect(),
        None => main.into_iter().map(|l| (l, None)).collect(),
    };
    let listeners = Arc::new(Mutex::new(listeners));
    let wirings = Arc::new(Mutex::new(wirings(threads)));
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let placement = if threads <= cores {
        PoolPlacement::MaxSpread(threads, None)
    } else {
        PoolPlacement::Unbound(threads)
    };
    let handles = LocalExecutorPoolBuilder::new(placement)
        .io_memory(IO_MEMORY)
        .on_all_shards(move || {
            let (shared, listeners, wirings) = (shared.clone(), listeners.clone(), wirings.clone());
            async move { shard(shared, listeners, wirings).await }
        })
        .map_err(|e| io::Error::other(e.to_string()))?;
    for result in handles.join_all() {
        result.map_err(|e| io::Error::other(e.to_string()))??;
    }
    Ok(())
}

/// Makes one executor and drops it. glommio panics, rather than failing, where io_uring
/// is missing or too old (old kernel, seccomp); that panic is caught here, quietly, so
/// the user reads one line instead of a backtrace.
fn io_uring_works() -> Result<(), String> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let made = std::panic::catch_unwind(|| {
        LocalExecutorBuilder::new(Placement::Unbound)
            .io_memory(IO_MEMORY)
            .make()
    });
    std::panic::set_hook(hook);
    match made {
        Ok(Ok(_executor)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(panic) => Err(panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("glommio could not start")
            .to_owned()),
    }
}

/// One listening socket per executor, all on the same port, so the kernel spreads
/// connections over the cores.
fn bind(addr: SocketAddr, threads: usize) -> io::Result<Vec<std::net::TcpListener>> {
    let mut listeners = Vec::with_capacity(threads);
    let mut addr = addr;
    for _ in 0..threads {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        // Responses are written whole, each as soon as it is ready: no Nagle delay.
        socket.set_nodelay(true)?;
        socket.bind(&addr.into())?;
        socket.listen(LISTEN_BACKLOG)?;
        let listener = std::net::TcpListener::from(socket);
        // Port 0 picks a port once; the other cores join it.
        addr = listener.local_addr()?;
        listeners.push(listener);
    }
    Ok(listeners)
}

/// What every core shares. The registry's handle to a pipe is its id: each core finds
/// its own pipes' mailboxes in its `Core::pipes`.
struct Shared {
    state: ServerState<PipeId>,
    /// The stop signal came.
    stop: Arc<AtomicBool>,
    /// The drain delay after it is over: the listeners close.
    closing: AtomicBool,
    /// A SIGHUP came and the certificate is still to reload (by core 0).
    hangup: Arc<AtomicBool>,
    grace: Duration,
    threads: usize,
}

/// A connection moving to the core that owns its pipe, before its transfer: its socket
/// travels as a duplicate descriptor, with its TLS session if it has one (the handshake
/// and the head were done here, see `fanpipe_driver::tls`), its `Conn` and the pipe
/// request it read.
type Handover = Connection<(OwnedFd, Option<TlsSession>)>;

/// A client's socket as the driver drives it: TLS over TCP on an HTTPS listener.
type Sock = MaybeTls<Party>;

/// One core's state: its pipes, and the way to the other cores.
struct Core {
    shared: Arc<Shared>,
    me: usize,
    /// To each other core (`None` at this core's own index).
    peers: Vec<Option<ConnectedSender<Handover>>>,
    pipes: RefCell<BTreeMap<PipeId, Rc<Inbox>>>,
}

/// The driver's view of one core's executor.
#[derive(Clone)]
struct Glommio(Rc<Core>);

impl Runtime for Glommio {
    type Socket = Sock;
    type Timer = Wake;
    type Handle = PipeId;

    fn server(&self) -> &ServerState<PipeId> {
        &self.0.shared.state
    }

    fn timer(&self) -> Wake {
        Wake(None)
    }

    fn spawn_connection(&self, conn: Connection<Sock>) {
        let rt = self.clone();
        glommio::spawn_local(async move { fanpipe_driver::serve_connection(&rt, conn).await })
            .detach();
    }

    fn spawn_pipe(&self, mut task: PipeTask<Sock, Wake>) -> PipeId {
        let id = task.id();
        let inbox = Rc::new(Inbox::default());
        self.0.pipes.borrow_mut().insert(id, inbox.clone());
        let core = self.0.clone();
        glommio::spawn_local(async move {
            poll_fn(|cx| task.run(cx, &core.shared.state, |cx| inbox.poll_recv(cx))).await;
            core.pipes.borrow_mut().remove(&id);
        })
        .detach();
        id
    }

    /// Only this core's pipes are found: during a shutdown each core tells its own.
    fn send(&self, to: &PipeId, msg: Msg<Sock>) {
        if let Some(inbox) = self.0.pipes.borrow().get(to) {
            inbox.send(msg);
        }
    }

    fn owns(&self, name: &str) -> bool {
        shard_of(name, self.0.shared.threads) == self.0.me
    }

    fn hand_over(&self, conn: Connection<Sock>) {
        let Some(name) = conn.request.as_ref().and_then(|r| r.request.pipe_name()) else {
            return;
        };
        let owner = shard_of(name, self.0.shared.threads);
        tracing::debug!(pipe = %name, from = self.0.me, to = owner, "handed over");
        let Connection {
            sock,
            peer,
            conn,
            open,
            request,
        } = conn;
        // The TLS session leaves with the descriptor; this core never touches the stream
        // again, and its copy of the descriptor closes when `party` drops, here.
        let (party, session) = match sock {
            MaybeTls::Plain(party) => (party, None),
            MaybeTls::Tls(tls) => {
                let (party, session) = tls.into_parts();
                (party, Some(session))
            }
        };
        let Ok(socket) = fd(&party.0).try_clone_to_owned() else {
            return;
        };
        drop(party);
        let handover = Connection {
            sock: (socket, session),
            peer,
            conn,
            open,
            request,
        };
        let core = self.0.clone();
        glommio::spawn_local(async move {
            if let Some(Some(to)) = core.peers.get(owner) {
                let _ = to.send(handover).await;
            }
        })
        .detach();
    }

    fn stopped(&self) -> bool {
        self.0.shared.closing.load(Ordering::Relaxed)
    }
}

/// A pipe task's mailbox; only its own core writes to it.
#[derive(Default)]
struct Inbox {
    msgs: RefCell<VecDeque<Msg<Sock>>>,
    waker: RefCell<Option<Waker>>,
}

impl Inbox {
    fn send(&self, msg: Msg<Sock>) {
        self.msgs.borrow_mut().push_back(msg);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    fn poll_recv(&self, cx: &Context<'_>) -> Poll<Option<Msg<Sock>>> {
        let msg = self.msgs.borrow_mut().pop_front();
        if msg.is_none() {
            *self.waker.borrow_mut() = Some(cx.waker().clone());
            return Poll::Pending;
        }
        Poll::Ready(msg)
    }
}

/// One core's ends of the channels between cores: to each other core, and from each.
struct Wiring {
    me: usize,
    to: Vec<Option<SharedSender<Handover>>>,
    from: Vec<SharedReceiver<Handover>>,
}

/// A channel from every core to every other, made here and moved whole into the executor
/// that takes each wiring. Not glommio's channel mesh: its builder shares one `Rc` among
/// the executors' threads, which clone and drop it at once as they join; under
/// AddressSanitizer that is a use after free, and in CI it once corrupted the heap.
fn wirings(threads: usize) -> Vec<Wiring> {
    let mut to: Vec<Vec<Option<SharedSender<Handover>>>> = (0..threads)
        .map(|_| (0..threads).map(|_| None).collect())
        .collect();
    let mut from: Vec<Vec<SharedReceiver<Handover>>> = (0..threads).map(|_| Vec::new()).collect();
    for (a, ends) in to.iter_mut().enumerate() {
        for (b, end) in ends.iter_mut().enumerate() {
            if a != b {
                let (sender, receiver) = shared_channel::new_bounded(1024);
                *end = Some(sender);
                from[b].push(receiver);
            }
        }
    }
    to.into_iter()
        .zip(from)
        .enumerate()
        .map(|(me, (to, from))| Wiring { me, to, from })
        .collect()
}

/// One core's listeners: the main one (HTTPS when TLS is on) and the plain one beside it.
type Listeners = (std::net::TcpListener, Option<std::net::TcpListener>);

/// The life of one executor: accept until stopped, take connections from the other
/// cores, then step the shutdown until it is done.
async fn shard(
    shared: Arc<Shared>,
    listeners: Arc<Mutex<Vec<Listeners>>>,
    wirings: Arc<Mutex<Vec<Wiring>>>,
) -> io::Result<()> {
    let Wiring { me, to, from } = wirings
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .pop()
        .ok_or_else(|| io::Error::other("no channels left for this executor"))?;
    // Every end connects at once: a connect waits for the other end's.
    let to: Vec<_> = to
        .into_iter()
        .map(|end| end.map(|end| glommio::spawn_local(end.connect())))
        .collect();
    let from: Vec<_> = from
        .into_iter()
        .map(|end| glommio::spawn_local(end.connect()))
        .collect();
    let mut peers = Vec::with_capacity(to.len());
    for end in to {
        peers.push(match end {
            Some(task) => Some(task.await),
            None => None,
        });
    }
    let mut inbound = Vec::with_capacity(from.len());
    for end in from {
        inbound.push(end.await);
    }
    let (std_listener, std_plain) = listeners
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .pop()
        .ok_or_else(|| io::Error::other("no listener left for this executor"))?;
    // SAFETY: the descriptors come from listeners this function owns and gives up here;
    // nothing else closes or uses them.
    let listener = unsafe { TcpListener::from_raw_fd(std_listener.into_raw_fd()) };
    let plain = std_plain.map(|l| unsafe { TcpListener::from_raw_fd(l.into_raw_fd()) });
    let rt = Glommio(Rc::new(Core {
        shared: shared.clone(),
        me,
        peers,
        pipes: RefCell::new(BTreeMap::new()),
    }));
    for receiver in inbound {
        let rt = rt.clone();
        glommio::spawn_local(async move {
            while let Some(h) = receiver.recv().await {
                let (descriptor, session) = h.sock;
                let stream =
                    TcpStream::from(socket2::Socket::from(std::net::TcpStream::from(descriptor)));
                let party = Party(stream);
                let sock = match session {
                    Some(session) => MaybeTls::Tls(TlsSocket::from_parts(party, session)),
                    None => MaybeTls::Plain(party),
                };
                rt.spawn_connection(Connection {
                    sock,
                    peer: h.peer,
                    conn: h.conn,
                    open: h.open,
                    request: h.request,
                });
            }
        })
        .detach();
    }
    let stopped = async {
        while !shared.stop.load(Ordering::Relaxed) {
            // The certificate store is shared: one core reloads it for all.
            if me == 0 && shared.hangup.swap(false, Ordering::Relaxed) {
                shared.state.reload_tls();
            }
            sleep(STOP_POLL).await;
        }
        fanpipe_driver::announce_stop(&rt).await;
        shared.closing.store(true, Ordering::Relaxed);
    };
    let main = fanpipe_driver::accept(&rt, || accept_on(&listener, shared.state.tls()));
    let beside = async {
        match &plain {
            Some(plain) => fanpipe_driver::accept(&rt, || accept_on(plain, None)).await,
            None => std::future::pending().await,
        }
    };
    main.or(beside).or(stopped).await;
    drop(listener);
    drop(plain);
    fanpipe_driver::shut_down(&rt, shared.grace).await;
    Ok(())
}

/// The next connection on `listener`, wrapped in TLS when `tls` is set.
async fn accept_on(
    listener: &TcpListener,
    tls: Option<&fanpipe_driver::tls::TlsConfig>,
) -> io::Result<(Sock, SocketAddr)> {
    let stream = listener
        .accept()
        .await
        .map_err(|e| io::Error::other(e.to_string()))?;
    // Linux gives an accepted socket the listener's TCP_NODELAY (set in `bind`): one
    // system call less per connection.
    #[cfg(not(target_os = "linux"))]
    let _ = stream.set_nodelay(true);
    let peer = stream
        .peer_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    Ok((MaybeTls::accept(Party(stream), tls)?, peer))
}

/// The descriptor of a glommio socket, borrowed for as long as the socket is.
fn fd(stream: &TcpStream) -> BorrowedFd<'_> {
    // SAFETY: `stream` owns this descriptor and keeps it open while it is borrowed; the
    // returned lifetime is tied to that borrow.
    unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) }
}

/// A client's socket.
struct Party(TcpStream);

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
        write_vectored(&mut self.0, cx, bufs)
    }

    fn shutdown_write(&mut self, _: &mut Context<'_>) {
        let _ = SockRef::from(&fd(&self.0)).shutdown(Shutdown::Write);
    }
}

/// A task's timer: glommio's timers take a duration, so one is made per deadline.
struct Wake(Option<(Instant, Timer)>);

impl fanpipe_driver::Timer for Wake {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn poll_at(&mut self, cx: &mut Context<'_>, at: Instant) -> Poll<()> {
        let timer = match &mut self.0 {
            Some((due, timer)) if *due == at => timer,
            slot => {
                let timer = Timer::new(at.saturating_duration_since(Instant::now()));
                &mut slot.insert((at, timer)).1
            }
        };
        let fired = Pin::new(timer).poll(cx).map(|_| ());
        if fired.is_ready() {
            self.0 = None;
        }
        fired
    }
}

/// One vectored write, which glommio's streams lack (they write the first slice only):
/// `sendmsg` without blocking, and only when the socket is full, glommio's own write of
/// the first slice, which waits on io_uring for room and wakes the task.
fn write_vectored(
    sock: &mut TcpStream,
    cx: &mut Context<'_>,
    bufs: &[IoSlice<'_>],
) -> Poll<io::Result<usize>> {
    match SockRef::from(&fd(sock)).send_vectored_with_flags(bufs, libc::MSG_DONTWAIT) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            let first = bufs
                .iter()
                .find(|b| !b.is_empty())
                .map_or(&[][..], |b| &b[..]);
            Pin::new(sock).poll_write(cx, first)
        }
        done => Poll::Ready(done),
    }
}
