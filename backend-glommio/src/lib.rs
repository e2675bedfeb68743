//! fanpipe on glommio: io_uring, one executor per core, nothing `Send`. A thin driver:
//! it moves bytes between sockets and the sans-io core and sleeps until the core's next
//! deadline; every decision is the core's.
//!
//! Each core accepts on its own listener (SO_REUSEPORT) and reads request heads. A pipe
//! belongs to the core its name hashes to (`shard_of`); a connection accepted elsewhere
//! is handed over to that core with its socket and the bytes already read, before the
//! transfer, so that a transfer's whole data path runs on one core with no lock and no
//! cross-core copy. Only the hub (registry and counters) is shared, behind a mutex taken
//! to admit and to report.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::future::{poll_fn, Future};
use std::io::{self, IoSlice};
use std::net::{Shutdown, SocketAddr};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use fanpipe_core::config::LISTEN_BACKLOG;
use fanpipe_core::conn::{Action, Conn, PipeRequest};
use fanpipe_core::hub::{Hub, Phase};
use fanpipe_core::metrics::{Connections, OpenConn};
use fanpipe_core::pipe::{Pipe, READS_PER_TURN};
use fanpipe_core::registry::{shard_of, PipeId};
use fanpipe_core::request::Route;
use fanpipe_core::Config;
use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, FutureExt};
use glommio::channels::channel_mesh::{Full, MeshBuilder, Senders};
use glommio::net::{TcpListener, TcpStream};
use glommio::timer::{sleep, Timer};
use glommio::{LocalExecutorBuilder, LocalExecutorPoolBuilder, Placement, PoolPlacement};
use socket2::{SockRef, Socket};

/// The name of this backend, for `--version`.
pub const BACKEND: &str = "glommio";

/// Memory each executor sets aside for io_uring's registered buffers. Those serve file
/// I/O, which fanpipe does not do: sockets are read into the pipes' own rings. glommio's
/// default (10 MiB per executor) would be most of the server's resident memory.
const IO_MEMORY: usize = 256 << 10;

/// How often an idle core looks whether a stop signal came.
const STOP_POLL: Duration = Duration::from_millis(50);

/// Binds `addr` and serves until SIGINT or SIGTERM, with one executor per thread, each
/// pinned to its own core when there are enough. Fails at once, with one clear error,
/// where io_uring is not available.
pub fn run(
    addr: SocketAddr,
    config: Config,
    threads: usize,
    grace: Duration,
    on_bound: impl FnOnce(SocketAddr),
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
    let listeners = bind(addr, threads)?;
    on_bound(listeners[0].local_addr()?);
    let shared = Arc::new(Shared {
        hub: Mutex::new(Hub::new(&config)),
        config,
        connections: Connections::default(),
        stop,
        grace,
        threads,
    });
    let listeners = Arc::new(Mutex::new(listeners));
    let mesh = MeshBuilder::full(threads, 1024);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let placement = if threads <= cores {
        PoolPlacement::MaxSpread(threads, None)
    } else {
        PoolPlacement::Unbound(threads)
    };
    let handles = LocalExecutorPoolBuilder::new(placement)
        .io_memory(IO_MEMORY)
        .on_all_shards(move || {
            let (shared, listeners, mesh) = (shared.clone(), listeners.clone(), mesh.clone());
            async move { shard(shared, listeners, mesh).await }
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
        let socket = Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.bind(&addr.into())?;
        socket.listen(LISTEN_BACKLOG)?;
        let listener = std::net::TcpListener::from(socket);
        // Port 0 picks a port once; the other cores join it.
        addr = listener.local_addr()?;
        listeners.push(listener);
    }
    Ok(listeners)
}

/// What every core shares.
struct Shared {
    config: Config,
    hub: Mutex<Hub<()>>,
    connections: Connections,
    stop: Arc<AtomicBool>,
    grace: Duration,
    threads: usize,
}

impl Shared {
    fn hub(&self) -> MutexGuard<'_, Hub<()>> {
        // A panic elsewhere must not take the registry down with it.
        self.hub.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A connection moving to the core that owns its pipe, before its transfer.
struct Handover {
    socket: OwnedFd,
    peer: SocketAddr,
    conn: Conn,
    request: PipeRequest,
    open: OpenConn,
}

/// One core's state: its pipes, and the way to the other cores.
struct Core {
    shared: Arc<Shared>,
    me: usize,
    peers: Senders<Handover>,
    pipes: RefCell<HashMap<PipeId, Rc<Inbox>>>,
}

/// What a pipe's task is told.
enum Msg {
    Arrival(Box<(TcpStream, PipeRequest, OpenConn)>),
    /// The server's shutdown reached a new phase.
    Phase(Phase),
}

/// A pipe task's mailbox; only its own core writes to it.
#[derive(Default)]
struct Inbox {
    msgs: RefCell<VecDeque<Msg>>,
    waker: RefCell<Option<Waker>>,
}

impl Inbox {
    fn send(&self, msg: Msg) {
        self.msgs.borrow_mut().push_back(msg);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    fn poll_recv(&self, cx: &Context<'_>) -> Option<Msg> {
        let msg = self.msgs.borrow_mut().pop_front();
        if msg.is_none() {
            *self.waker.borrow_mut() = Some(cx.waker().clone());
        }
        msg
    }
}

/// The life of one executor: accept until stopped, take connections from the other
/// cores, then step the shutdown until it is done.
async fn shard(
    shared: Arc<Shared>,
    listeners: Arc<Mutex<Vec<std::net::TcpListener>>>,
    mesh: MeshBuilder<Handover, Full>,
) -> io::Result<()> {
    let (peers, mut inbound) = mesh
        .join()
        .await
        .map_err(|e| io::Error::other(format!("cannot join the executors' mesh: {e}")))?;
    let me = peers.peer_id();
    let std_listener = listeners
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .pop()
        .ok_or_else(|| io::Error::other("no listener left for this executor"))?;
    // SAFETY: the descriptor comes from a listener this function owns and gives up here;
    // nothing else closes or uses it.
    let listener = unsafe { TcpListener::from_raw_fd(std_listener.into_raw_fd()) };
    let core = Rc::new(Core {
        shared: shared.clone(),
        me,
        peers,
        pipes: RefCell::new(HashMap::new()),
    });
    for (_, receiver) in inbound.streams() {
        let core = core.clone();
        glommio::spawn_local(async move {
            while let Some(h) = receiver.recv().await {
                let stream = TcpStream::from(Socket::from(std::net::TcpStream::from(h.socket)));
                let task = connection(
                    core.clone(),
                    stream,
                    h.peer,
                    h.open,
                    h.conn,
                    Some(h.request),
                );
                glommio::spawn_local(task).detach();
            }
        })
        .detach();
    }
    let stopped = async {
        while !shared.stop.load(Ordering::Relaxed) {
            sleep(STOP_POLL).await;
        }
        None
    };
    let accept = async {
        loop {
            match listener.accept().await {
                Ok(stream) => {
                    let _ = stream.set_nodelay(true);
                    let peer = stream
                        .peer_addr()
                        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
                    let (open, full) = shared.connections.open(shared.config.max_connections);
                    let mut conn = Conn::new(&shared.config, Instant::now());
                    if let Some(why) = full {
                        conn.handle_refused(&why, Instant::now());
                    }
                    let task = connection(core.clone(), stream, peer, open, conn, None);
                    glommio::spawn_local(task).detach();
                }
                Err(e) => {
                    // Out of descriptors and the like: wait a little rather than spin.
                    tracing::warn!("accept failed: {e}");
                    sleep(Duration::from_millis(50)).await;
                }
            }
        }
    };
    accept.or(stopped).await.unwrap_or(());
    drop(listener);
    shared.hub().begin_shutdown(shared.grace, Instant::now());
    let mut told = Phase::Running;
    loop {
        let step = shared.hub().poll_shutdown(Instant::now());
        if step.phase > told {
            told = step.phase;
            for inbox in core.pipes.borrow().values() {
                inbox.send(Msg::Phase(told));
            }
        }
        sleep(step.next.saturating_duration_since(Instant::now())).await;
        if step.phase == Phase::Done {
            return Ok(());
        }
    }
}

/// The descriptor of a glommio socket, borrowed for as long as the socket is.
fn fd(stream: &TcpStream) -> BorrowedFd<'_> {
    // SAFETY: `stream` owns this descriptor and keeps it open while it is borrowed; the
    // returned lifetime is tied to that borrow.
    unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) }
}

/// A connection until it is answered, handed to another core, or joins a pipe here.
/// `pending` is a pipe request that arrived from another core, still to be admitted.
async fn connection(
    core: Rc<Core>,
    mut stream: TcpStream,
    peer: SocketAddr,
    open: OpenConn,
    mut conn: Conn,
    mut pending: Option<PipeRequest>,
) {
    let shared = core.shared.clone();
    loop {
        if let Some(request) = pending.take() {
            let refused = {
                let mut hub = shared.hub();
                let make = |name: &str, n, id| spawn_pipe(&core, name, n, id);
                match hub.admit(&request, make) {
                    Ok(admitted) => {
                        // Sent under the lock, so the pipe sees parties in admission order.
                        if let Some(inbox) = core.pipes.borrow().get(&admitted.id) {
                            inbox.send(Msg::Arrival(Box::new((stream, request, open))));
                        }
                        return;
                    }
                    Err(why) => why,
                }
            };
            conn.handle_refused(&refused, Instant::now());
        }
        if let Some(why) = conn.take_refused() {
            shared.hub().refused(peer, &why);
        }
        let deadline = conn.poll_timeout();
        let timer = async {
            match deadline {
                Some(d) => sleep(d.saturating_duration_since(Instant::now())).await,
                None => std::future::pending().await,
            }
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
                let _ = SockRef::from(&fd(&stream)).shutdown(Shutdown::Write);
                conn.handle_shutdown(Instant::now());
            }
            Action::Metrics => {
                let text = shared.hub().metrics_page(shared.connections.count());
                conn.handle_metrics(&text, Instant::now());
            }
            Action::Pipe => {
                let Some(request) = conn.take_pipe_request() else {
                    return;
                };
                let Route::Pipe { name, .. } = &request.request.route else {
                    return;
                };
                let owner = shard_of(name, shared.threads);
                if owner == core.me {
                    pending = Some(request);
                    continue;
                }
                // The socket moves as a duplicate descriptor; this core's copy closes
                // when `stream` drops.
                let Ok(socket) = fd(&stream).try_clone_to_owned() else {
                    return;
                };
                drop(stream);
                tracing::debug!(pipe = %name, from = core.me, to = owner, "handed over");
                let handover = Handover {
                    socket,
                    peer,
                    conn,
                    request,
                    open,
                };
                let _ = core.peers.send_to(owner, handover).await;
                return;
            }
            Action::Close => return,
        }
    }
}

fn spawn_pipe(core: &Rc<Core>, name: &str, n: usize, id: PipeId) {
    let inbox = Rc::new(Inbox::default());
    core.pipes.borrow_mut().insert(id, inbox.clone());
    let mut task = PipeTask {
        pipe: Pipe::new(name, n, &core.shared.config),
        sockets: Vec::new(),
        inbox,
        timer: None,
        gone: false,
        core: core.clone(),
        name: name.to_owned(),
        id,
    };
    glommio::spawn_local(async move {
        poll_fn(|cx| task.drive(cx)).await;
        task.core.pipes.borrow_mut().remove(&task.id);
    })
    .detach();
}

/// The task that owns one pipe and all of its sockets.
struct PipeTask {
    pipe: Pipe,
    sockets: Vec<Option<(TcpStream, OpenConn)>>,
    inbox: Rc<Inbox>,
    timer: Option<(Instant, Timer)>,
    /// The registry no longer routes anyone here.
    gone: bool,
    core: Rc<Core>,
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
            while let Some(msg) = self.inbox.poll_recv(cx) {
                match msg {
                    Msg::Arrival(arrival) => {
                        let (stream, request, open) = *arrival;
                        let role = request.role();
                        self.pipe.join(request, role, now);
                        self.sockets.push(Some((stream, open)));
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
                let hub = &self.core.shared;
                self.gone |= hub.hub().handle_event(&self.name, self.id, event);
            }
            if let Some(due) = self.pipe.poll_timeout() {
                if due <= now {
                    self.pipe.handle_timeout(now);
                    moved = true;
                } else {
                    let timer = match &mut self.timer {
                        Some((at, timer)) if *at == due => timer,
                        slot => {
                            let timer = Timer::new(due.saturating_duration_since(now));
                            &mut slot.insert((due, timer)).1
                        }
                    };
                    if Pin::new(timer).poll(cx).is_ready() {
                        self.timer = None;
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
            let _ = SockRef::from(&fd(sock)).shutdown(Shutdown::Write);
            moved = true;
        }
        let slices = self.pipe.write_slices(p);
        if slices.total() > 0 {
            match write_vectored(sock, cx, &slices) {
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
