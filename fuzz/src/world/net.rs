//! The server's side of the world: in-memory sockets over the clients, timers on the
//! virtual clock, and the runtime the driver spawns its tasks on. Tasks are kept here
//! and polled by hand, in a fixed order, by `World::run`.

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use fanpipe_core::pipe::Summary;
use fanpipe_core::registry::PipeId;
use fanpipe_core::request::Role;
use fanpipe_core::Config;
use fanpipe_driver::{Connection, Msg, PipeTask, Runtime, ServerState, Socket, Timer};

use super::client::{Client, Plan, Stage};

/// A task of the server (accept loop, connection, shutdown), polled by the world.
pub type Task = Pin<Box<dyn Future<Output = ()>>>;

/// A pipe's task, its mailbox, and what the world saw of it.
pub struct PipeSlot {
    /// `None` once the task ended (or while it is being polled).
    pub task: Option<PipeTask<SimSocket, SimTimer>>,
    pub mailbox: VecDeque<Msg<SimSocket>>,
    pub seen: Slot,
}

/// Clients of senders, each with the bytes it had sent.
pub type SentBy = Vec<(usize, usize)>;

/// What the world saw of one pipe: who arrived, when it started and ended.
#[derive(Debug, Default)]
pub struct Slot {
    pub name: String,
    pub id: PipeId,
    pub n: usize,
    /// Clients sent to this pipe, in admission order, with their roles.
    pub arrivals: Vec<(usize, Role)>,
    /// Arrivals the task took from its mailbox.
    pub joined: usize,
    /// The clients of the senders the task took and that have not left nor been refused,
    /// in the order they came: the first holds the place, a second may be held for it
    /// (the pipe reports a left sender for the first, a refused one for the second).
    pub senders: VecDeque<usize>,
    /// Before the task's last turn of I/O: its senders with their bytes read, and its
    /// receivers still connected.
    pub before_io: Option<(SentBy, Vec<usize>)>,
    /// At the start: the sender and the receivers that were there.
    pub started: Option<(usize, Vec<usize>)>,
    pub summary: Option<Summary>,
    /// The registry no longer routes anyone here.
    pub gone: bool,
    /// The task ended.
    pub ended: bool,
    pub sender_sent_at_start: usize,
    /// The sender's bytes read when the transfer's end was reported.
    pub sender_sent_at_end: usize,
    /// When the transfer's end was reported.
    pub finished_at: Option<Instant>,
}

/// The state the world and the server's sockets share.
pub struct Net {
    pub config: Config,
    pub base: Instant,
    pub now: Instant,
    pub clients: Vec<Client>,
    pub log: Vec<String>,
    pub violations: Vec<String>,
    /// Counts everything that moves (I/O, sends, spawns, timers firing, tasks ending):
    /// a round of polls that leaves it unchanged leaves the world still.
    pub progress: u64,
    /// The deadline each live timer waits for.
    pub deadlines: BTreeMap<u64, Instant>,
    next_timer: u64,
    /// Clients connected and not accepted yet.
    pub backlog: VecDeque<usize>,
    /// Accepts still to fail (out of descriptors, say).
    pub accept_failures: usize,
    pub conns: Vec<Option<Task>>,
    pub pipes: Vec<PipeSlot>,
    /// The server is exiting: sockets dropped now are cut by the exit.
    pub exiting: bool,
}

impl Net {
    pub fn new(config: Config, now: Instant) -> Self {
        Net {
            config,
            base: now,
            now,
            clients: Vec::new(),
            log: Vec::new(),
            violations: Vec::new(),
            progress: 0,
            deadlines: BTreeMap::new(),
            next_timer: 0,
            backlog: VecDeque::new(),
            accept_failures: 0,
            conns: Vec::new(),
            pipes: Vec::new(),
            exiting: false,
        }
    }

    fn t(&self) -> f64 {
        (self.now - self.base).as_secs_f64()
    }

    pub fn note(&mut self, s: String) {
        let line = format!("[{:9.3}] {s}", self.t());
        self.log.push(line);
    }

    pub fn violation(&mut self, s: String) {
        let line = format!("[{:9.3}] VIOLATION: {s}", self.t());
        self.log.push(line.clone());
        self.violations.push(line);
    }

    /// The server dropped client `c`'s socket.
    fn dropped(&mut self, c: usize) {
        let (now, idle, exiting) = (self.now, self.config.idle_timeout, self.exiting);
        let cl = &mut self.clients[c];
        let stage = cl.stage;
        if let Stage::Party(_) = stage {
            cl.dropped_unread = cl.window == 0;
            cl.dropped_alive = !cl.dead;
            cl.dropped_idle = now >= cl.last_write_at.unwrap_or(now) + idle;
        }
        cl.dropped_at = Some(now);
        cl.stage = Stage::Dropped;
        cl.closed_by_server = true;
        cl.cut_by_exit = exiting;
        self.progress += 1;
        match stage {
            Stage::Party(p) => self.note(format!("client {c}: socket dropped by pipe {p}")),
            _ => self.note(format!("client {c}: connection closed")),
        }
    }

    /// The task of pipe `p` took a message from its mailbox (`Some`), or found it empty
    /// and is about to do its I/O (`None`).
    fn took(&mut self, p: usize, msg: Option<&Msg<SimSocket>>) {
        match msg {
            Some(Msg::Arrival(a)) => {
                let slot = &mut self.pipes[p].seen;
                slot.joined += 1;
                if a.1.role() == Role::Sender {
                    slot.senders.push_back(a.0.c);
                }
            }
            Some(Msg::Phase(_)) => {}
            None => {
                let slot = &self.pipes[p].seen;
                let senders = slot
                    .senders
                    .iter()
                    .map(|&s| (s, self.clients[s].sent))
                    .collect();
                let receivers = slot.arrivals[..slot.joined]
                    .iter()
                    .filter(|&&(c, role)| {
                        role == Role::Receiver && self.clients[c].stage == Stage::Party(p)
                    })
                    .map(|&(c, _)| c)
                    .collect();
                self.pipes[p].seen.before_io = Some((senders, receivers));
            }
        }
    }
}

/// The runtime the driver runs on in the world.
#[derive(Clone)]
pub struct SimRt {
    pub server: Arc<ServerState<usize>>,
    pub net: Rc<RefCell<Net>>,
}

impl Runtime for SimRt {
    type Socket = SimSocket;
    type Timer = SimTimer;
    type Handle = usize;

    fn server(&self) -> &ServerState<usize> {
        &self.server
    }

    fn timer(&self) -> SimTimer {
        let mut net = self.net.borrow_mut();
        net.next_timer += 1;
        SimTimer {
            net: self.net.clone(),
            id: net.next_timer,
        }
    }

    fn spawn_connection(&self, conn: Connection<SimSocket>) {
        let rt = self.clone();
        let task: Task = Box::pin(async move { fanpipe_driver::serve_connection(&rt, conn).await });
        let mut net = self.net.borrow_mut();
        net.conns.push(Some(task));
        net.progress += 1;
    }

    fn spawn_pipe(&self, task: PipeTask<SimSocket, SimTimer>) -> usize {
        let mut net = self.net.borrow_mut();
        let p = net.pipes.len();
        let params = task.params();
        let seen = Slot {
            name: params.name.clone(),
            id: params.id,
            n: params.n,
            ..Slot::default()
        };
        net.note(format!(
            "pipe {p}: new ({}, id {}, n={})",
            seen.name, seen.id, seen.n
        ));
        net.pipes.push(PipeSlot {
            task: Some(task),
            mailbox: VecDeque::new(),
            seen,
        });
        net.progress += 1;
        p
    }

    fn send(&self, to: &usize, msg: Msg<SimSocket>) {
        let mut net = self.net.borrow_mut();
        let p = *to;
        net.progress += 1;
        if p >= net.pipes.len() || net.pipes[p].seen.ended {
            net.violation(format!("a message for the ended pipe {p}"));
            return;
        }
        if let Msg::Arrival(a) = &msg {
            let (c, leftover, role) = (a.0.c, a.1.leftover.len(), a.1.role());
            let now = net.now;
            let cl = &mut net.clients[c];
            cl.stage = Stage::Party(p);
            cl.leftover = leftover;
            cl.sent_at_join = cl.sent;
            cl.last_write_at = Some(now);
            net.pipes[p].seen.arrivals.push((c, role));
            net.note(format!(
                "client {c}: admitted to pipe {p} as {role:?}, leftover {leftover}"
            ));
        }
        net.pipes[p].mailbox.push_back(msg);
    }
}

impl SimRt {
    /// Polls the mailbox of pipe `p` for its task.
    pub fn recv(&self, p: usize) -> Poll<Option<Msg<SimSocket>>> {
        let mut net = self.net.borrow_mut();
        let msg = net.pipes[p].mailbox.pop_front();
        net.took(p, msg.as_ref());
        match msg {
            Some(msg) => Poll::Ready(Some(msg)),
            None => Poll::Pending,
        }
    }
}

/// The server's end of client `c`'s connection.
pub struct SimSocket {
    pub net: Rc<RefCell<Net>>,
    pub c: usize,
}

/// The address a client connects from.
pub fn peer_of(c: usize) -> SocketAddr {
    SocketAddr::from((
        [10, 0, (c >> 8) as u8, c as u8],
        40_000 + (c % 20_000) as u16,
    ))
}

fn reset() -> io::Error {
    io::Error::from(io::ErrorKind::ConnectionReset)
}

impl Socket for SimSocket {
    fn poll_read(&mut self, _: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        let c = self.c;
        let mut net = self.net.borrow_mut();
        if buf.is_empty() {
            net.violation(format!("client {c}: the server reads into an empty buffer"));
            return Poll::Ready(Err(reset()));
        }
        let cl = &mut net.clients[c];
        let read = if cl.dead {
            Err(reset())
        } else if cl.sent < cl.offered {
            let k = buf.len().min(cl.offered - cl.sent);
            buf[..k].copy_from_slice(&cl.input[cl.sent..cl.sent + k]);
            cl.sent += k;
            Ok(k)
        } else if cl.eof {
            Ok(0)
        } else {
            return Poll::Pending;
        };
        net.progress += 1;
        Poll::Ready(read)
    }

    fn poll_write_vectored(
        &mut self,
        _: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let c = self.c;
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let mut net = self.net.borrow_mut();
        let now = net.now;
        let cl = &mut net.clients[c];
        if cl.dead {
            net.progress += 1;
            return Poll::Ready(Err(reset()));
        }
        if cl.shut_by_server {
            net.violation(format!("client {c}: write of {total} bytes after shutdown"));
            return Poll::Ready(Err(reset()));
        }
        if cl.window == 0 || total == 0 {
            return Poll::Pending;
        }
        let wrote = total.min(cl.window);
        cl.window -= wrote;
        cl.last_write_at = Some(now);
        let mut k = wrote;
        for b in bufs {
            let m = b.len().min(k);
            cl.got.extend_from_slice(&b[..m]);
            cl.resp.feed(&b[..m]);
            k -= m;
            if k == 0 {
                break;
            }
        }
        let mut reset_now = false;
        if let Plan::ResetAfterReading(limit) = cl.plan {
            if cl.got.len() >= limit {
                cl.dead = true;
                reset_now = true;
            }
        }
        let got = cl.got.len();
        net.progress += 1;
        if reset_now {
            net.note(format!("client {c} resets after reading {got} bytes"));
        }
        Poll::Ready(Ok(wrote))
    }

    fn shutdown_write(&mut self, _: &mut Context<'_>) {
        let c = self.c;
        let mut net = self.net.borrow_mut();
        net.progress += 1;
        if net.clients[c].shut_by_server {
            net.violation(format!("client {c}: shut down twice"));
        }
        net.clients[c].shut_by_server = true;
    }
}

impl Drop for SimSocket {
    fn drop(&mut self) {
        if let Ok(mut net) = self.net.try_borrow_mut() {
            net.dropped(self.c);
        }
    }
}

/// A timer on the world's virtual clock: it records the deadline it waits for, so that
/// the world knows how far it may step the clock when nothing moves.
pub struct SimTimer {
    net: Rc<RefCell<Net>>,
    id: u64,
}

impl Timer for SimTimer {
    fn now(&self) -> Instant {
        self.net.borrow().now
    }

    fn poll_at(&mut self, _: &mut Context<'_>, at: Instant) -> Poll<()> {
        let mut net = self.net.borrow_mut();
        if at <= net.now {
            net.deadlines.remove(&self.id);
            net.progress += 1;
            return Poll::Ready(());
        }
        net.deadlines.insert(self.id, at);
        Poll::Pending
    }
}

impl Drop for SimTimer {
    fn drop(&mut self) {
        if let Ok(mut net) = self.net.try_borrow_mut() {
            net.deadlines.remove(&self.id);
        }
    }
}
