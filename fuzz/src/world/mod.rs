//! A deterministic world: byte-level clients, each on an in-memory socket, and the real
//! server (fanpipe-driver's accept loop, connection tasks, admission, pipe tasks and
//! shutdown, over the hub) on a virtual clock. Every task is polled by hand with a
//! no-op waker, in a fixed order, until nothing moves; then the clock may step to the
//! earliest deadline any timer asked for. A run is a function of its script alone.

mod check;
mod client;
mod net;
mod resp;
mod script;

use std::cell::{Ref, RefCell, RefMut};
use std::future::poll_fn;
use std::io;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use fanpipe_core::chunked::chunk_header;
use fanpipe_core::pipe::Event;
use fanpipe_core::registry::PipeId;
use fanpipe_core::request::Role;
use fanpipe_core::Config;
use fanpipe_driver::ServerState;

pub use client::{Client, Kind, Plan, Spec, Stage};
pub use net::{Net, Slot};

use super::Rng;
use net::{peer_of, SimRt, SimSocket, Task};

/// The names clients use.
pub const NAMES: &[&str] = &["a", "b/c", "d%20e"];

/// Most rounds of polls `run` may take before it calls the server livelocked.
const MAX_ROUNDS: usize = 200_000;

/// The world.
pub struct World {
    pub config: Config,
    rt: SimRt,
    /// How long a graceful shutdown lets running transfers go on.
    pub grace: Duration,
    /// The server is shutting down: its listener is closed.
    pub shutting_down: bool,
    shutdown_began: Option<Instant>,
    /// The shutdown's grace was stepped over.
    pub aborted: bool,
    /// The shutdown is done and the server exited: every socket it held is closed.
    pub exited: bool,
    accept: Option<Task>,
    shutdown: Option<Task>,
}

impl World {
    pub fn new(config: Config) -> Self {
        let net = Rc::new(RefCell::new(Net::new(config.clone(), Instant::now())));
        let rt = SimRt {
            server: Arc::new(ServerState::new(config.clone())),
            net,
        };
        let accept_rt = rt.clone();
        let accept: Task = Box::pin(async move {
            let net = accept_rt.net.clone();
            let next = move || {
                let net = net.clone();
                poll_fn(move |_| accept_one(&net))
            };
            fanpipe_driver::accept(&accept_rt, next).await;
        });
        World {
            config,
            rt,
            grace: Duration::from_secs(5),
            shutting_down: false,
            shutdown_began: None,
            aborted: false,
            exited: false,
            accept: Some(accept),
            shutdown: None,
        }
    }

    /// The clients, the log and what the world saw of each pipe.
    pub fn net(&self) -> Ref<'_, Net> {
        self.rt.net.borrow()
    }

    fn net_mut(&self) -> RefMut<'_, Net> {
        self.rt.net.borrow_mut()
    }

    pub fn client(&self, c: usize) -> Ref<'_, Client> {
        Ref::map(self.net(), |n| &n.clients[c])
    }

    pub fn now(&self) -> Instant {
        self.net().now
    }

    pub fn violations(&self) -> Vec<String> {
        self.net().violations.clone()
    }

    fn note(&self, s: String) {
        self.net_mut().note(s);
    }

    pub fn log_tail(&self, k: usize) -> String {
        let net = self.net();
        let from = net.log.len().saturating_sub(k);
        net.log[from..].join("\n")
    }

    /// Builds a client's bytes from its spec.
    pub fn add(&mut self, spec: &Spec) -> usize {
        let name = NAMES[spec.name % NAMES.len()];
        let path = if spec.bare_path {
            format!("/{name}")
        } else {
            format!("/api/v1/pipe/{name}")
        };
        let q = if spec.n == 1 && spec.seed & 1 == 0 {
            String::new()
        } else {
            format!("?n={}", spec.n)
        };
        let version = if spec.http10 { "1.0" } else { "1.1" };
        let mut input;
        let mut data_runs = Vec::new();
        let kind;
        let head_len;
        match spec.role {
            Role::Receiver => {
                input = format!("GET {path}{q} HTTP/{version}\r\nHost: sim\r\n\r\n").into_bytes();
                head_len = input.len();
                kind = Kind::Receiver;
            }
            Role::Sender => {
                let mut body = vec![0u8; spec.body_len];
                Rng::new(spec.seed).fill(&mut body);
                let chunked = spec.chunked && !spec.http10;
                let framing = if chunked {
                    "Transfer-Encoding: chunked\r\n".to_owned()
                } else {
                    format!("Content-Length: {}\r\n", body.len())
                };
                let expect = if spec.expect {
                    "Expect: 100-continue\r\n"
                } else {
                    ""
                };
                input = format!(
                    "PUT {path}{q} HTTP/{version}\r\nHost: sim\r\nContent-Type: application/x-sim\r\nX-Piping-Seed: {}\r\n{framing}{expect}\r\n",
                    spec.seed
                )
                .into_bytes();
                head_len = input.len();
                let mut malformed = None;
                if chunked {
                    let size = spec.chunk_size.max(1);
                    let chunks = body.len().div_ceil(size);
                    let bad = spec.malformed.map(|k| k % (chunks + 1));
                    let mut before = 0;
                    for (i, c) in body.chunks(size).enumerate() {
                        if bad == Some(i) {
                            malformed = Some(input.len());
                            input.extend_from_slice(b"zz\r\n");
                        }
                        chunk_header(c.len(), &mut input);
                        data_runs.push((input.len(), c.len(), before));
                        before += c.len();
                        input.extend_from_slice(c);
                        input.extend_from_slice(b"\r\n");
                    }
                    if bad == Some(chunks) {
                        malformed = Some(input.len());
                        // Every byte of data is there, but the end is broken.
                        input.extend_from_slice(b"zz\r\n");
                    }
                    input.extend_from_slice(b"0\r\n\r\n");
                } else {
                    data_runs.push((input.len(), body.len(), 0));
                    input.extend_from_slice(&body);
                }
                kind = Kind::Sender {
                    body,
                    chunked,
                    malformed,
                };
            }
        }
        let plan = match spec.plan {
            // A cut must fall before the end, or it is no cut at all.
            Plan::ResetAt(k) | Plan::EofAt(k) if input.len() <= head_len + 1 => {
                let _ = k;
                Plan::Normal
            }
            Plan::ResetAt(k) => Plan::ResetAt(head_len + k % (input.len() - head_len)),
            Plan::EofAt(k) => Plan::EofAt(head_len + k % (input.len() - head_len)),
            p => p,
        };
        let mut net = self.net_mut();
        let c = net.clients.len();
        net.note(format!(
            "client {c}: {:?} {name} n={} http1.{} len={} plan={plan:?}",
            spec.role,
            spec.n,
            if spec.http10 { 0 } else { 1 },
            input.len()
        ));
        net.clients.push(Client {
            kind,
            name: name.to_owned(),
            n: spec.n,
            plan,
            input,
            head_len,
            data_runs,
            ..Client::fresh()
        });
        c
    }
    /// A client of arbitrary bytes.
    pub fn add_raw(&mut self, bytes: Vec<u8>) -> usize {
        let mut net = self.net_mut();
        let c = net.clients.len();
        net.note(format!(
            "client {c}: raw {:?}",
            String::from_utf8_lossy(&bytes)
        ));
        net.clients.push(Client {
            input: bytes,
            ..Client::fresh()
        });
        c
    }

    /// The stop signal: the listener closes (clients it had not accepted are dropped
    /// unanswered) and the driver's shutdown starts (nobody is admitted any more,
    /// waiting parties are let go, running transfers get the grace).
    pub fn shutdown(&mut self) {
        if self.shutting_down {
            return;
        }
        self.note("server shuts down".into());
        self.shutting_down = true;
        self.shutdown_began = Some(self.now());
        self.accept = None;
        let mut net = self.net_mut();
        while let Some(c) = net.backlog.pop_front() {
            net.clients[c].stage = Stage::Dropped;
            net.clients[c].closed_by_server = true;
            net.note(format!("client {c}: never accepted"));
        }
        drop(net);
        let (rt, grace) = (self.rt.clone(), self.grace);
        self.shutdown = Some(Box::pin(async move {
            fanpipe_driver::shut_down(&rt, grace).await;
        }));
    }

    /// The shutdown's grace runs out: time moves to its end.
    pub fn abort(&mut self) {
        let Some(began) = self.shutdown_began else {
            return;
        };
        if self.aborted {
            return;
        }
        self.aborted = true;
        self.note("the grace runs out".into());
        let end = began + self.grace;
        let now = self.now();
        if end > now {
            self.advance(end - now);
        }
    }

    /// The next `k` accepts fail (out of descriptors, say).
    pub fn fail_accepts(&mut self, k: usize) {
        self.net_mut().accept_failures += k;
    }

    /// The client connects: it waits in the listener's queue to be accepted.
    pub fn connect(&mut self, c: usize) {
        let mut net = self.net_mut();
        if net.clients[c].stage != Stage::Outside {
            return;
        }
        if self.shutting_down {
            // Nobody listens any more: the connection is refused.
            net.clients[c].stage = Stage::Dropped;
            net.clients[c].closed_by_server = true;
            return;
        }
        net.clients[c].stage = Stage::Queued;
        net.backlog.push_back(c);
        net.progress += 1;
        net.note(format!("client {c} connects"));
    }

    /// The limit the client's plan puts on what it sends.
    fn send_limit(&self, c: usize) -> usize {
        let cl = self.client(c);
        match cl.plan {
            Plan::ResetAt(k) | Plan::EofAt(k) => k,
            _ => cl.input.len(),
        }
    }

    /// The client makes `k` more bytes available (within its plan).
    pub fn offer(&mut self, c: usize, k: usize) {
        let limit = self.send_limit(c);
        let plan = {
            let mut net = self.net_mut();
            let cl = &mut net.clients[c];
            if cl.dead || cl.eof || cl.stage == Stage::Outside {
                return;
            }
            cl.offered = (cl.offered + k).min(limit);
            if cl.offered < limit || limit == cl.input.len() {
                return;
            }
            cl.plan
        };
        match plan {
            Plan::ResetAt(_) => self.reset(c),
            Plan::EofAt(_) => self.half_close(c),
            _ => {}
        }
    }

    /// The client is willing to read `k` more bytes.
    pub fn open_window(&mut self, c: usize, k: usize) {
        let mut net = self.net_mut();
        let cl = &mut net.clients[c];
        cl.window = cl.window.saturating_add(k);
    }

    pub fn half_close(&mut self, c: usize) {
        let mut net = self.net_mut();
        let cl = &mut net.clients[c];
        if !cl.eof && cl.stage != Stage::Outside {
            cl.eof = true;
            let offered = cl.offered;
            net.note(format!("client {c} half-closes after {offered} bytes"));
        }
    }

    pub fn reset(&mut self, c: usize) {
        let mut net = self.net_mut();
        let cl = &mut net.clients[c];
        if !cl.dead && cl.stage != Stage::Outside {
            cl.dead = true;
            net.note(format!("client {c} resets the connection"));
        }
    }

    /// The server does all it can until nothing moves: every task is polled in turn,
    /// again and again, until a whole round moves nothing.
    pub fn run(&mut self) {
        let mut cx = Context::from_waker(Waker::noop());
        for _ in 0..MAX_ROUNDS {
            if self.exited {
                return;
            }
            let before = self.net().progress;
            if let Some(task) = &mut self.accept {
                if task.as_mut().poll(&mut cx).is_ready() {
                    self.accept = None;
                }
            }
            let mut i = 0;
            while i < self.net().conns.len() {
                let task = self.net_mut().conns[i].take();
                if let Some(mut task) = task {
                    match task.as_mut().poll(&mut cx) {
                        Poll::Ready(()) => self.net_mut().progress += 1,
                        Poll::Pending => self.net_mut().conns[i] = Some(task),
                    }
                }
                i += 1;
            }
            let mut p = 0;
            while p < self.net().pipes.len() {
                self.poll_pipe(&mut cx, p);
                p += 1;
            }
            if let Some(task) = &mut self.shutdown {
                if task.as_mut().poll(&mut cx).is_ready() {
                    self.shutdown = None;
                    self.exit();
                    return;
                }
            }
            self.check_buffer();
            if self.net().progress == before {
                return;
            }
        }
        let mut net = self.net_mut();
        net.violation("the server never stops moving (livelock)".into());
    }

    /// One turn of pipe `p`'s task.
    fn poll_pipe(&self, cx: &mut Context<'_>, p: usize) {
        let task = self.net_mut().pipes[p].task.take();
        let Some(mut task) = task else { return };
        let rt = &self.rt;
        let polled = task.drive(
            cx,
            |_| rt.recv(p),
            |name, id, event| self.report(p, name, id, event),
        );
        match polled {
            Poll::Ready(()) => {
                let mut net = self.net_mut();
                net.pipes[p].seen.ended = true;
                net.progress += 1;
                net.note(format!("pipe {p}: its task ends"));
                drop(net);
                drop(task);
            }
            Poll::Pending => self.net_mut().pipes[p].task = Some(task),
        }
    }

    /// What pipe `p` reported: the world notes it, then the hub handles it.
    fn report(&self, p: usize, name: &str, id: PipeId, event: Event) -> bool {
        let left = match &event {
            Event::Left(role) => Some(format!("a waiting {role:?} left")),
            Event::Refused(role, why) => Some(format!("a held {role:?} was refused: {why}")),
            _ => None,
        };
        self.observe(p, &event);
        let gone = self.rt.server.hub().handle_event(name, id, event);
        let mut net = self.net_mut();
        net.progress += 1;
        net.pipes[p].seen.gone |= gone;
        if let Some(what) = left {
            net.note(format!("pipe {p}: {what} (gone {gone})"));
        }
        gone
    }

    fn observe(&self, p: usize, event: &Event) {
        let mut net = self.net_mut();
        let net = &mut *net;
        match event {
            // The sender that held the place left; a held one was refused.
            Event::Left(Role::Sender) => {
                net.pipes[p].seen.senders.pop_front();
            }
            Event::Refused(Role::Sender, _) => {
                net.pipes[p].seen.senders.pop_back();
            }
            Event::Left(Role::Receiver) | Event::Refused(Role::Receiver, _) => {}
            Event::Started => {
                let n = net.pipes[p].seen.n;
                let (senders, receivers) = net.pipes[p].seen.before_io.clone().unwrap_or_default();
                // The sender that holds the place now (one that left in this turn has
                // been reported already), with its bytes read before the turn.
                let sender = net.pipes[p].seen.senders.front().copied();
                let sent = senders
                    .iter()
                    .find(|&&(s, _)| Some(s) == sender)
                    .map_or(0, |&(_, sent)| sent);
                net.note(format!(
                    "pipe {p}: started, sender {sender:?}, receivers {receivers:?}"
                ));
                // Parties that gave up waiting in the same instant may still be counted
                // here: the pipe does not say which party left.
                if receivers.len() < n {
                    let msg = format!(
                        "pipe {p}: started with {} receivers, n = {n}",
                        receivers.len()
                    );
                    net.violation(msg);
                }
                match sender {
                    Some(sc) => {
                        net.pipes[p].seen.sender_sent_at_start = sent;
                        net.pipes[p].seen.started = Some((sc, receivers));
                    }
                    None => net.violation(format!("pipe {p}: started without a sender")),
                }
            }
            Event::Finished(summary) => {
                net.note(format!("pipe {p}: finished {summary:?}"));
                let slot = &net.pipes[p].seen;
                let (twice, unstarted) = (slot.summary.is_some(), slot.started.is_none());
                if twice {
                    net.violation(format!("pipe {p}: finished twice"));
                }
                if unstarted {
                    net.violation(format!("pipe {p}: finished without starting"));
                }
                if let Some((sc, _)) = net.pipes[p].seen.started {
                    net.pipes[p].seen.sender_sent_at_end = net.clients[sc].sent;
                }
                net.pipes[p].seen.summary = Some(summary.clone());
                net.pipes[p].seen.finished_at = Some(net.now);
            }
            Event::Closed => net.note(format!("pipe {p}: task over, every socket closed")),
        }
    }

    /// The shutdown is done: the server returns and the process exits, closing every
    /// socket it still holds.
    fn exit(&mut self) {
        self.exited = true;
        self.note("the server exits".into());
        self.net_mut().exiting = true;
        let held = self.take_tasks();
        drop(held);
        self.net_mut().exiting = false;
    }

    /// Every task and mailbox, out of the world, to be dropped outside its borrow.
    fn take_tasks(&mut self) -> Vec<Box<dyn std::any::Any>> {
        let mut held: Vec<Box<dyn std::any::Any>> = Vec::new();
        held.extend(
            self.accept
                .take()
                .map(|t| Box::new(t) as Box<dyn std::any::Any>),
        );
        held.extend(
            self.shutdown
                .take()
                .map(|t| Box::new(t) as Box<dyn std::any::Any>),
        );
        let mut net = self.net_mut();
        for task in std::mem::take(&mut net.conns).into_iter().flatten() {
            held.push(Box::new(task));
        }
        for slot in &mut net.pipes {
            held.push(Box::new(slot.task.take()));
            held.push(Box::new(std::mem::take(&mut slot.mailbox)));
        }
        held
    }

    /// Moves time on by `d`; the server first does what it can, and after, what fell due.
    pub fn advance(&mut self, d: Duration) {
        self.run();
        self.net_mut().now += d;
        self.run();
    }

    /// The earliest deadline any of the server's timers waits for.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.net().deadlines.values().min().copied()
    }

    /// Every client finishes: connects, sends all its plan allows, reads everything,
    /// and closes once its response has ended; one still waiting after a minute of
    /// virtual time gives up and resets. Time runs on to every deadline.
    pub fn finish(&mut self) {
        let start = self.now();
        let clients = self.net().clients.len();
        for c in 0..clients {
            self.connect(c);
        }
        for _round in 0..10_000 {
            for c in 0..clients {
                let k = self.client(c).input.len();
                self.offer(c, k);
                self.open_window(c, usize::MAX / 4);
            }
            self.run();
            let mut all_closed = true;
            for c in 0..clients {
                let (closed, finished, dead) = {
                    let cl = self.client(c);
                    (cl.closed_by_server, cl.resp.finished(), cl.dead)
                };
                if closed {
                    continue;
                }
                all_closed = false;
                // A response that ended: the client is done (curl exits).
                if finished && !dead {
                    self.note(format!("client {c} is done and closes"));
                    self.reset(c);
                }
            }
            if all_closed {
                break;
            }
            self.run();
            let waited = self.now() - start;
            if self.shutting_down && waited > Duration::from_secs(20) {
                self.abort();
            }
            if waited > Duration::from_secs(60) {
                for c in 0..clients {
                    let (closed, dead) = {
                        let cl = self.client(c);
                        (cl.closed_by_server, cl.dead)
                    };
                    if !closed && !dead {
                        self.note(format!("client {c} gives up"));
                        self.reset(c);
                    }
                }
            }
            let now = self.now();
            let step = match self.next_deadline() {
                Some(t) if t > now => (t - now).min(Duration::from_secs(30)),
                _ => Duration::from_millis(500),
            };
            self.advance(step);
            let limit = self.config.wait_timeout
                + self.config.idle_timeout
                + self.config.linger_timeout
                + Duration::from_secs(120);
            if waited > limit {
                break;
            }
        }
        self.run();
    }
}

impl Drop for World {
    /// Tasks hold sockets and timers that hold the world's state: they go first.
    fn drop(&mut self) {
        let held = self.take_tasks();
        drop(held);
    }
}

/// The listener: the next client in its queue, or the failure of an accept.
fn accept_one(net: &Rc<RefCell<Net>>) -> Poll<io::Result<(SimSocket, std::net::SocketAddr)>> {
    let mut n = net.borrow_mut();
    if n.backlog.is_empty() {
        return Poll::Pending;
    }
    n.progress += 1;
    if n.accept_failures > 0 {
        n.accept_failures -= 1;
        n.note("an accept fails".into());
        return Poll::Ready(Err(io::Error::other("too many open files")));
    }
    let Some(c) = n.backlog.pop_front() else {
        return Poll::Pending;
    };
    n.clients[c].stage = Stage::Conn;
    n.note(format!("client {c} is accepted"));
    let sock = SimSocket {
        net: net.clone(),
        c,
    };
    Poll::Ready(Ok((sock, peer_of(c))))
}
