//! One transfer: a sender, its `n` receivers, and the bounded buffer between them.
//!
//! The pipe owns every decision from the first party's arrival to the last close: who is
//! waiting, when the transfer starts, which bytes each socket gets next, who is lost, and
//! what the sender is told. A backend asks each party's [`Pipe::read_buf`] and
//! [`Pipe::write_slices`], reports what happened, and drops a socket once
//! [`Pipe::is_closed`] says so.
//!
//! Every change of a party's [`State`] is made in this file; `ingest.rs` decodes the
//! sender's body into the ring and `egress.rs` frames what each receiver gets.

mod egress;
mod ingest;
pub mod watch;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::broadcast::{Broadcast, INITIAL_CAPACITY};
use crate::chunked::{chunk_header, BodyDecoder, BodyError, LAST_CHUNK};
use crate::config::{Config, MIN_BUFFER_SIZE};
use crate::conn::PipeRequest;
use crate::error::Reject;
use crate::request::{Framing, Report, Request, Role};
use crate::response;

pub use egress::Slices;

/// A party's index in its pipe.
pub type PartyId = usize;

/// What the pipe tells its backend besides bytes.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A waiting (or held) party left: release its place in the registry.
    Left(Role),
    /// A newcomer the registry sent for a place another party held was refused after
    /// all (that party is still there, or the transfer started): release what the
    /// registry counted for it, and count the refusal.
    Refused(Role, Reject),
    /// The transfer started: the name is busy.
    Started,
    /// Not from the pipe itself: its task reports it once every socket of the pipe is
    /// closed (its last bytes out, or given up at their deadline), as its very last event.
    Closed,
    /// The transfer ended: the name is free; log the summary.
    Finished(Summary),
}

/// How a transfer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every receiver got every byte.
    Complete,
    /// The body was read whole, but some receivers did not get all of it.
    ReceiversLost,
    /// The sender went away before the end of its body.
    SenderGone,
    /// The sender's chunked body was malformed.
    Malformed(BodyError),
    /// No byte moved for the idle timeout, and the sender was the one not sending.
    Stalled,
    /// The server shut down before the transfer ended.
    Shutdown,
}

impl Outcome {
    /// The status of a sender's response held to the end (`report=end`).
    fn sender_status(self) -> u16 {
        match self {
            Outcome::Complete => 200,
            Outcome::Malformed(_) | Outcome::SenderGone => 400,
            Outcome::Stalled => 408,
            Outcome::ReceiversLost => 502,
            Outcome::Shutdown => 503,
        }
    }
}

/// One line per transfer for the log.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub name: String,
    pub n: usize,
    pub bytes: u64,
    pub complete: usize,
    pub seconds: f64,
    pub outcome: Outcome,
}

/// How many times a backend reads one party's socket in a turn, while it has bytes and
/// [`Pipe::read_buf`] offers room. The sender is read until its socket is empty or the
/// ring is full before the receivers are written, so each of the `n` writes carries as
/// much as there is (and a chunk's data goes out with its framing): fewer, larger
/// writes. With 64 KiB chunks at n=30 this took the server's CPU from 8.3 s to 4.8 s per
/// 800 MiB (BENCHMARKS.md). Bounded, so that a client that never stops sending cannot
/// hold the pipe's task.
pub const READS_PER_TURN: usize = 64;

/// How long a sender's response head may wait after its `100 Continue` is written for the
/// first body byte (see [`Hold::Continue`]) before it is written anyway.
pub const CONTINUE_HOLD: Duration = Duration::from_secs(1);

/// How many body bytes a waiting sender is read for, to learn that its `100 Continue`
/// went through (or that it has gone).
const FIRST_BYTES: usize = 64;

/// How much of a party that is only drained (to see its end) is read at a time: most never
/// send a byte, and every pipe with a waiting receiver holds this buffer.
const DRAIN_READ: usize = 1024;

/// Where a party is in its life. Each state holds what only it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Sent by the registry for a place another party holds, while the pipe looks whether
    /// that party is still there: nothing is written to it and it is not read (a sender
    /// gets no `100 Continue`). It takes the first place that frees, or is refused as the
    /// registry would have refused it once no party of its role is in doubt, or at
    /// `until` ([`HOLD`]).
    Held { until: Instant },
    /// Admitted; waits for the transfer to start until `until`. `probe_at`: when to
    /// write to it next to learn whether it is still there (a receiver that half-closed,
    /// a sender's heartbeat).
    Waiting {
        until: Instant,
        probe_at: Option<Instant>,
        check: Check,
    },
    /// The sender during the transfer: its body is read.
    Sending,
    /// A receiver during the transfer.
    Receiving(Feed),
    /// Our last bytes go out, then (if `shutdown`) a shutdown of our side, then a linger
    /// that reads and drops what the client still sends, all by `until`.
    Closing { until: Instant, shutdown: bool },
    /// Our last bytes go out (by `until`), then a shutdown and the close, with no linger:
    /// the end of a failed exchange, whose client may still be sending a body it should
    /// stop sending (the close resets it).
    Flushing { until: Instant },
    /// The backend drops the socket.
    Closed,
}

/// When to ask the kernel whether a waiting sender is still there: it is not read, so
/// its end of the connection shows only in the socket's TCP state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    /// Not asked (receivers are read instead).
    Off,
    /// Ask at `at`. `probed`: a write went to it after its side was seen closed, so a
    /// reset from a client that has gone is on its way.
    At { at: Instant, probed: bool },
    /// Ask now ([`Pipe::take_check`]).
    Due { probed: bool },
}

/// What the kernel says of a client's side of a connection ([`Pipe::handle_peer`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerState {
    /// Still open.
    Open,
    /// The client ended its side (a FIN): gone, or only half-closed.
    Closed,
    /// The connection was reset, or failed: the client has gone.
    Reset,
}

/// How soon a waiting party is written to again after its side was seen closed: on a
/// client that has gone, the first write draws a reset and the next one fails.
pub const REPROBE: Duration = Duration::from_millis(10);

/// How long a newcomer is held, at most, for a place another party holds ([`State::Held`]).
/// The verdict on a party that may have gone comes [`REPROBE`] after its probe, and its
/// FIN is seen at once when the newcomer comes; this only bounds a client that does not
/// read its probe.
pub const HOLD: Duration = Duration::from_secs(1);

/// A receiver's place in the transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Feed {
    /// Its cursor in the ring.
    slot: usize,
    /// Chunk framing, for a response without a length.
    chunk: Option<Chunk>,
}

/// Where a chunked receiver stands in its current chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Chunk {
    /// Data bytes of the current chunk not yet written.
    data_left: u64,
    /// Bytes of the CRLF that closes the current chunk not yet written.
    crlf_left: usize,
    /// The last chunk is queued in `out`.
    last_queued: bool,
}

/// Bytes of a sender's `out` past `upto` that may not be written yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hold {
    /// The head waits until the first body byte arrives, which shows that the `100
    /// Continue` went through on its own: some proxies (HAProxy 2.6) that read both at
    /// once end the response after its first line, so the sender's curl exits 0 having
    /// sent nothing. `until`: [`CONTINUE_HOLD`] after the `100 Continue` was written.
    Continue { upto: usize, until: Option<Instant> },
    /// `report=end`: the head and every line wait for the end of the transfer, which
    /// decides the status.
    End { upto: usize },
}

impl Hold {
    fn upto(self) -> usize {
        match self {
            Hold::Continue { upto, .. } | Hold::End { upto } => upto,
        }
    }
}

#[derive(Debug)]
struct Party {
    role: Role,
    request: Request,
    state: State,
    /// Control bytes to write before any data: heads, progress lines, chunk framing.
    out: Vec<u8>,
    out_pos: usize,
    /// The client has ended its side of the connection.
    eof: bool,
    hold: Option<Hold>,
    /// A waiting party whose side was seen closed and that was just probed: whether it
    /// has gone is known at its next check, [`REPROBE`] later. Until then a newcomer for
    /// its place is held rather than refused, and the transfer does not start (with a
    /// receiver that has gone, or a sender that cannot send).
    suspect: bool,
    /// The body bytes read with a held sender's head, until it takes the place.
    leftover: Vec<u8>,
}

impl Party {
    fn is_open(&self) -> bool {
        self.state != State::Closed
    }

    fn is_waiting(&self) -> bool {
        matches!(self.state, State::Waiting { .. })
    }

    fn is_held(&self) -> bool {
        matches!(self.state, State::Held { .. })
    }

    /// A waiting party whose verdict is pending: it was probed, or is to be checked now.
    fn in_doubt(&self) -> bool {
        match self.state {
            State::Waiting { check, .. } => self.suspect || matches!(check, Check::Due { .. }),
            _ => false,
        }
    }

    fn flushed(&self) -> bool {
        self.out_pos == self.out.len()
    }

    /// A sender whose head waits for its first body byte, after its `100 Continue` is out.
    fn awaits_first_byte(&self) -> bool {
        matches!(self.hold, Some(Hold::Continue { until: Some(_), .. }))
    }

    fn release_continue(&mut self) {
        if matches!(self.hold, Some(Hold::Continue { .. })) {
            self.hold = None;
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Waiting,
    Running { started: Instant },
    Ended,
}

/// One pipe, from its first party to its last close.
#[derive(Debug)]
pub struct Pipe {
    name: String,
    n: usize,
    config: Config,
    parties: Vec<Party>,
    sender: Option<PartyId>,
    stage: Stage,
    /// The ring and the decoder of the sender's body, once the transfer started.
    body: Option<ingest::Ingest>,
    /// Receivers in the transfer, in start order.
    receivers: Vec<PartyId>,
    /// Receivers that got every byte.
    complete: usize,
    /// Where the reads of a party that only needs draining go.
    scratch: Vec<u8>,
    events: VecDeque<Event>,
    /// When a byte last moved in the running transfer.
    last_progress: Option<Instant>,
    /// The sender's bytes read with its head, decoded once the transfer starts.
    leftover: Vec<u8>,
    /// With `--min-receiver-rate`: when the current rate window ends.
    rate_check: Option<Instant>,
    /// Each receiver's ring position (by slot) when the current rate window began.
    rate_marks: Vec<u64>,
    /// A form sender's transfer started, and the receivers' heads wait for its first
    /// part's headers (bounded by `multipart::MAX_PART_HEAD`).
    heads_pending: bool,
    /// Who watches this pipe's state without taking a place (`?progress`, `?status`).
    watch: watch::Watch,
}

impl Pipe {
    pub fn new(name: &str, n: usize, config: &Config) -> Self {
        Pipe {
            name: name.to_owned(),
            n,
            config: config.clone(),
            parties: Vec::new(),
            sender: None,
            stage: Stage::Waiting,
            body: None,
            receivers: Vec::new(),
            complete: 0,
            scratch: Vec::new(),
            events: VecDeque::new(),
            last_progress: None,
            leftover: Vec::new(),
            rate_check: None,
            rate_marks: Vec::new(),
            heads_pending: false,
            watch: watch::Watch::default(),
        }
    }

    /// A party the registry admitted joins. It takes a free place of its role, or, when
    /// none is free, is held ([`State::Held`]) while the parties holding the places are
    /// looked at: the registry sends a newcomer here rather than refuse it, since only the
    /// pipe can tell a party that has just gone (a curl killed and run again at once)
    /// from one that is there.
    pub fn join(&mut self, pipe_request: PipeRequest, role: Role, now: Instant) -> PartyId {
        let id = self.parties.len();
        let PipeRequest {
            request, leftover, ..
        } = pipe_request;
        self.parties.push(Party {
            role,
            request,
            state: State::Held { until: now + HOLD },
            out: Vec::new(),
            out_pos: 0,
            eof: false,
            hold: None,
            suspect: false,
            leftover,
        });
        if self.stage == Stage::Waiting && !self.has_place(role) {
            self.contest(role, now);
        }
        self.settle(now);
        self.watch_sync(now);
        id
    }

    /// A held party takes a free place: it waits for the transfer from now on, and is
    /// told (a sender gets its go-ahead and its head) as if it had just come.
    fn seat(&mut self, p: PartyId, now: Instant) {
        let party = &mut self.parties[p];
        let role = party.role;
        let leftover = std::mem::take(&mut party.leftover);
        // A waiting sender is not read: its heartbeat and its socket's state tell whether it
        // has gone.
        let sender = role == Role::Sender;
        party.state = State::Waiting {
            until: now + self.config.wait_timeout,
            probe_at: sender.then(|| now + self.config.heartbeat_interval),
            check: if sender {
                Check::At {
                    at: now + self.config.peer_check_interval,
                    probed: false,
                }
            } else {
                Check::Off
            },
        };
        match role {
            Role::Sender => {
                // A client whose body came with its head is not waiting for the go-ahead.
                let go_ahead = party.request.expect_continue && leftover.is_empty();
                if go_ahead {
                    party.out.extend_from_slice(response::CONTINUE);
                }
                let upto = party.out.len();
                match party.request.report.unwrap_or(self.config.sender_report) {
                    Report::Live => {
                        response::sender_head(&mut party.out, 200, party.request.minor == 1);
                        if go_ahead {
                            party.hold = Some(Hold::Continue { upto, until: None });
                        }
                    }
                    Report::End => party.hold = Some(Hold::End { upto }),
                }
                self.leftover = leftover;
                self.sender = Some(p);
                let here = self.waiting_receivers();
                self.say(&format!(
                    "[INFO] waiting for {} receiver(s), {here} here",
                    self.n
                ));
            }
            Role::Receiver => {
                if self.sender.is_some() {
                    let here = self.waiting_receivers();
                    self.say(&format!("[INFO] receiver {here} of {} joined", self.n));
                }
            }
        }
    }

    /// Whether a newcomer of `role` would find a place free now.
    fn has_place(&self, role: Role) -> bool {
        match role {
            Role::Sender => self.sender.is_none(),
            Role::Receiver => self.waiting_receivers() < self.n,
        }
    }

    /// A newcomer of `role` found no place free: each waiting party of that role not
    /// already in doubt is looked at now, since a client that has just gone may not be
    /// known yet. A waiting sender is written a heartbeat line at once and is in doubt
    /// until its check [`REPROBE`] later: it is not read, and a sender killed with its
    /// body still in its kernel's buffers (more than the server's socket takes while it
    /// waits) sends no FIN until that body is taken, so its socket looks open; but a
    /// client that has gone answers the write with a reset. One whose line cannot be
    /// written yet (its head is held) is asked about at once. A receiver is read, so
    /// its FIN reaches the kernel: its socket's state is asked at once (its next read
    /// may not have come yet), and one that half-closed is probed again.
    fn contest(&mut self, role: Role, now: Instant) {
        for p in 0..self.parties.len() {
            let party = &mut self.parties[p];
            if party.role != role || party.suspect {
                continue;
            }
            let writable = party.hold.is_none();
            let State::Waiting { until, check, .. } = &mut party.state else {
                continue;
            };
            if role == Role::Sender && writable {
                let until = *until;
                self.suspect(p, until, now);
            } else if !matches!(check, Check::Due { .. }) {
                *check = Check::Due { probed: false };
            }
        }
    }

    /// Decides the held parties, in the order they came: each takes a free place, or
    /// waits while a party of its role is in doubt, or is refused with the `409` the
    /// registry would have given (the transfer started, or every place is held by a
    /// party that is there). Then the transfer starts if it can.
    fn settle(&mut self, now: Instant) {
        if self.parties.iter().any(Party::is_held) {
            let mut seated = false;
            for p in 0..self.parties.len() {
                if !self.parties[p].is_held() {
                    continue;
                }
                let role = self.parties[p].role;
                if self.stage == Stage::Waiting && self.has_place(role) {
                    self.seat(p, now);
                    seated = true;
                } else if self.stage != Stage::Waiting || !self.in_doubt(role) {
                    self.refuse(p, self.full(role), now);
                }
            }
            if seated {
                // Watchers see the pipe's parties, which held ones were not.
                self.watch_sync(now);
            }
        }
        let waiting = self.stage == Stage::Waiting;
        self.try_start(now);
        if waiting && self.stage != Stage::Waiting {
            self.watch_sync(now);
        }
    }

    /// Whether a waiting party of `role` is in doubt ([`Party::in_doubt`]).
    fn in_doubt(&self, role: Role) -> bool {
        self.parties.iter().any(|x| x.role == role && x.in_doubt())
    }

    /// Why a newcomer of `role` finds no place: the registry's words for it.
    fn full(&self, role: Role) -> Reject {
        match role {
            Role::Sender => Reject::SenderTaken,
            Role::Receiver => Reject::ReceiversFull { n: self.n },
        }
    }

    /// A held party is refused, as the registry refuses (the response, then a linger
    /// that reads and drops what it still sends), and its count in the registry freed.
    fn refuse(&mut self, p: PartyId, why: Reject, now: Instant) {
        let party = &mut self.parties[p];
        party.leftover = Vec::new();
        response::reject(&mut party.out, &why, false);
        self.events.push_back(Event::Refused(party.role, why));
        self.close_politely(p, now);
    }

    /// How many parties have joined (ids are `0..parties()`).
    pub fn parties(&self) -> usize {
        self.parties.len()
    }

    /// Whether the backend should drop this party's socket (at once if it is still open).
    pub fn is_closed(&self, p: PartyId) -> bool {
        self.parties.get(p).is_none_or(|x| !x.is_open())
    }

    /// Whether the backend should shut down the write side of this party now.
    pub fn take_shutdown(&mut self, p: PartyId) -> bool {
        let Some(party) = self.parties.get_mut(p) else {
            return false;
        };
        let flushed = party.flushed();
        match &mut party.state {
            State::Closing { shutdown, .. } if *shutdown && flushed => {
                *shutdown = false;
                true
            }
            State::Flushing { .. } if flushed => {
                party.state = State::Closed;
                true
            }
            _ => false,
        }
    }

    /// Whether the backend should ask the kernel about this party's side of its
    /// connection now, and report it with [`Pipe::handle_peer`].
    pub fn take_check(&self, p: PartyId) -> bool {
        self.parties.get(p).is_some_and(|x| {
            matches!(
                x.state,
                State::Waiting {
                    check: Check::Due { .. },
                    ..
                }
            )
        })
    }

    /// What the kernel says of a waiting party's side of its connection. A reset frees
    /// its place at once. A FIN (or a receiver's end of stream) draws a write, a heartbeat
    /// line or a probe, since a half-closed client may still read its answer while one
    /// that has gone answers the write with a reset: the party is in doubt until the next
    /// check, [`REPROBE`] later, says which. Then a party still there is kept, and held
    /// newcomers for its place are refused.
    pub fn handle_peer(&mut self, p: PartyId, peer: PeerState, now: Instant) {
        let Some(party) = self.parties.get_mut(p) else {
            return;
        };
        let State::Waiting {
            until,
            check: Check::Due { probed },
            ..
        } = party.state
        else {
            return;
        };
        let role = party.role;
        // A socket that cannot tell says `Open`; a receiver's own end of stream still does.
        let closed = peer == PeerState::Closed || (role == Role::Receiver && party.eof);
        // An HTTP/1.0 receiver cannot be probed (no interim responses): a close is its end.
        let unprobeable = role == Role::Receiver && party.request.minor == 0;
        if peer == PeerState::Reset || (closed && unprobeable) {
            return self.handle_error(p, now);
        }
        let writable = party.hold.is_none();
        if closed && !probed && writable {
            self.suspect(p, until, now);
        } else {
            // The verdict, if it was in doubt: still there (or it cannot be told).
            party.suspect = false;
            let check = match role {
                Role::Sender => Check::At {
                    at: now + self.config.peer_check_interval,
                    probed: probed && closed,
                },
                // A receiver is read: its end shows there, and it is asked only when in
                // doubt or contested.
                Role::Receiver => Check::Off,
            };
            if let State::Waiting { check: c, .. } = &mut party.state {
                *c = check;
            }
        }
        self.settle(now);
    }

    /// A waiting party's side was seen closed: it is written to now, and is in doubt
    /// until the check that gives the verdict. A sender's is [`REPROBE`] later (the kernel
    /// says whether the write drew a reset). A receiver is written to again [`REPROBE`]
    /// later, a write that fails if the first drew a reset (where the kernel cannot tell),
    /// and its verdict comes [`REPROBE`] after that one.
    fn suspect(&mut self, p: PartyId, until: Instant, now: Instant) {
        let receiver = self.parties[p].role == Role::Receiver;
        self.probe(p, until, now, receiver.then_some(REPROBE));
        let party = &mut self.parties[p];
        party.suspect = true;
        let verdict = if receiver { 2 * REPROBE } else { REPROBE };
        if let State::Waiting { check, .. } = &mut party.state {
            *check = Check::At {
                at: now + verdict,
                probed: true,
            };
        }
    }

    /// Whether every party is closed: the owner of this pipe may end.
    pub fn is_idle(&self) -> bool {
        self.parties.iter().all(|p| !p.is_open()) && self.watchers_idle()
    }

    /// Whether the transfer ran and ended.
    pub fn is_ended(&self) -> bool {
        self.stage == Stage::Ended
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The next instant at which [`Pipe::handle_timeout`] has something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let (idle, rate) = match self.stage {
            Stage::Running { .. } => (
                self.last_progress.map(|t| t + self.config.idle_timeout),
                self.rate_check,
            ),
            _ => (None, None),
        };
        self.parties
            .iter()
            .filter(|p| p.is_open())
            .flat_map(|p| {
                let gap = match p.hold {
                    Some(Hold::Continue { until, .. }) => until,
                    _ => None,
                };
                let [a, b, c] = match p.state {
                    State::Waiting {
                        until,
                        probe_at,
                        check,
                    } => [
                        Some(until),
                        probe_at,
                        match check {
                            Check::At { at, .. } => Some(at),
                            Check::Off | Check::Due { .. } => None,
                        },
                    ],
                    State::Closing { until, .. } | State::Flushing { until } => {
                        [Some(until), None, None]
                    }
                    State::Held { until } => [Some(until), None, None],
                    State::Sending | State::Receiving(_) | State::Closed => [None, None, None],
                };
                [a, b, c, gap]
            })
            .flatten()
            .chain(idle)
            .chain(rate)
            .chain(self.watch_timeout())
            .min()
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        for p in 0..self.parties.len() {
            let party = &mut self.parties[p];
            if let Some(Hold::Continue { until: Some(t), .. }) = party.hold {
                if t <= now {
                    party.hold = None;
                }
            }
            match party.state {
                State::Closing { until, .. } | State::Flushing { until } if until <= now => {
                    self.parties[p].state = State::Closed;
                }
                State::Waiting { until, .. } if until <= now => {
                    let secs = self.config.wait_timeout.as_secs();
                    self.give_up_waiting(p, &Reject::WaitTimeout { secs }, now);
                }
                State::Held { until } if until <= now => {
                    let why = self.full(self.parties[p].role);
                    self.refuse(p, why, now);
                }
                State::Waiting {
                    until,
                    probe_at: Some(at),
                    ..
                } if at <= now => self.probe(p, until, now, None),
                _ => {}
            }
            if let State::Waiting { check, .. } = &mut self.parties[p].state {
                if let Check::At { at, probed } = *check {
                    if at <= now {
                        *check = Check::Due { probed };
                    }
                }
            }
        }
        // A party gone at its timeout frees a place for a held one.
        self.settle(now);
        if let (Stage::Running { .. }, Some(last)) = (self.stage, self.last_progress) {
            if now >= last + self.config.idle_timeout {
                self.stalled(now);
            }
        }
        if let (Stage::Running { .. }, Some(at)) = (self.stage, self.rate_check) {
            if now >= at {
                self.check_rates(now);
            }
        }
        self.watch_tick(now);
    }

    /// The end of a rate window (`--min-receiver-rate`): a receiver that took fewer than
    /// rate × window bytes in it while at least half the buffer waited for it holds the
    /// sender and the others back, and is dropped (counted lost) so they go on. One that
    /// is slow only because the sender is (it has little waiting) stays.
    fn check_rates(&mut self, now: Instant) {
        let window = self.config.min_rate_window;
        self.rate_check = Some(now + window);
        let Some(body) = &self.body else { return };
        let need = self
            .config
            .min_receiver_rate
            .saturating_mul(window.as_secs().max(1));
        let half = (body.ring.limit() as u64 / 2).max(1);
        let written = body.ring.written();
        let mut slow = Vec::new();
        for &p in &self.receivers {
            let State::Receiving(feed) = self.parties[p].state else {
                continue;
            };
            let Some(pos) = body.ring.position(feed.slot) else {
                continue;
            };
            let mark = self.rate_marks.get(feed.slot).copied().unwrap_or(0);
            if pos.saturating_sub(mark) < need && written - pos >= half {
                slow.push(p);
            }
            if let Some(m) = self.rate_marks.get_mut(feed.slot) {
                *m = pos;
            }
        }
        if slow.is_empty() {
            return;
        }
        self.say(&format!(
            "[INFO] dropped {} receiver(s) slower than {} bytes/s over {} s",
            slow.len(),
            self.config.min_receiver_rate,
            window.as_secs()
        ));
        for p in slow {
            self.handle_error(p, now);
        }
    }

    /// The server is shutting down: waiting parties are told and let go; a running
    /// transfer goes on until [`Pipe::handle_abort`].
    pub fn handle_shutdown(&mut self, now: Instant) {
        for p in 0..self.parties.len() {
            if self.parties[p].is_waiting() {
                self.give_up_waiting(p, &Reject::ShuttingDown, now);
            } else if self.parties[p].is_held() {
                self.refuse(p, Reject::ShuttingDown, now);
            }
        }
        self.watch_sync(now);
    }

    /// The shutdown grace is over: a running transfer is cut by the failure rules.
    pub fn handle_abort(&mut self, now: Instant) {
        self.handle_shutdown(now);
        if matches!(self.stage, Stage::Running { .. }) {
            self.say("[ERROR] the server is shutting down");
            self.fail(Outcome::Shutdown, now);
        }
    }

    /// Where to read this party's socket into; `None`: do not read it now.
    pub fn read_buf(&mut self, p: PartyId) -> Option<&mut [u8]> {
        let party = self.parties.get(p)?;
        let drain = match (party.role, party.state) {
            (Role::Sender, State::Sending) => return self.sender_buf(),
            (Role::Sender, State::Waiting { .. }) if party.awaits_first_byte() => {
                self.scratch.resize(FIRST_BYTES, 0);
                return Some(&mut self.scratch[..FIRST_BYTES]);
            }
            // What a receiver or a closing party sends is read to see its end, and dropped.
            (Role::Receiver, State::Waiting { .. } | State::Receiving(_))
            | (_, State::Closing { .. }) => !party.eof,
            _ => false,
        };
        if !drain {
            return None;
        }
        self.scratch.resize(DRAIN_READ, 0);
        Some(&mut self.scratch)
    }

    /// `n` bytes were read into [`Pipe::read_buf`]; 0 is the end of the client's stream.
    pub fn handle_read(&mut self, p: PartyId, n: usize, now: Instant) {
        let before = self.state_kind(p);
        let Some(party) = self.parties.get_mut(p) else {
            return;
        };
        match (party.role, party.state) {
            (Role::Sender, State::Sending) => {
                if n > 0 {
                    party.release_continue();
                }
                self.sender_read(n, now);
            }
            (Role::Sender, State::Waiting { .. }) if party.awaits_first_byte() => {
                if n == 0 {
                    // It ended its side before its body: it has gone.
                    self.handle_error(p, now);
                } else {
                    party.release_continue();
                    let n = n.min(FIRST_BYTES);
                    self.leftover.extend_from_slice(&self.scratch[..n]);
                }
            }
            (_, State::Closing { shutdown, .. }) if n == 0 => {
                // The client is done sending, not reading: it closes once our last bytes
                // are out (or the deadline passes), not before.
                party.eof = true;
                if party.flushed() && !shutdown {
                    party.state = State::Closed;
                }
            }
            (Role::Receiver, State::Waiting { until, .. }) if n == 0 => {
                party.eof = true;
                if party.request.minor == 1 {
                    // A half-close or a close? Only a write can tell: probe until it fails,
                    // and ask the kernel after the first write whether it drew a reset.
                    if !party.suspect {
                        self.suspect(p, until, now);
                    }
                } else {
                    self.handle_error(p, now);
                }
                self.settle(now);
            }
            (Role::Receiver, _) if n == 0 => party.eof = true,
            _ => {}
        }
        if self.state_kind(p) != before {
            self.watch_sync(now);
        }
    }

    /// The kind of a party's state (not its progress), to tell watchers only of changes.
    fn state_kind(&self, p: PartyId) -> Option<std::mem::Discriminant<State>> {
        self.parties
            .get(p)
            .map(|x| std::mem::discriminant(&x.state))
    }

    /// `n` bytes of [`Pipe::write_slices`] were written.
    pub fn handle_wrote(&mut self, p: PartyId, n: usize, now: Instant) {
        let before = self.state_kind(p);
        if n > 0 && self.stage != Stage::Waiting {
            self.last_progress = Some(now);
        }
        self.advance(p, n);
        if let Some(party) = self.parties.get_mut(p) {
            if let Some(Hold::Continue { upto, until: None }) = party.hold {
                if party.out_pos >= upto {
                    party.hold = Some(Hold::Continue {
                        upto,
                        until: Some(now + CONTINUE_HOLD),
                    });
                }
            }
        }
        self.after_progress(p, now);
        if self.state_kind(p) != before {
            self.watch_sync(now);
        }
    }

    /// This party's socket failed, or it is gone.
    pub fn handle_error(&mut self, p: PartyId, now: Instant) {
        let Some(party) = self.parties.get_mut(p) else {
            return;
        };
        let was = std::mem::replace(&mut party.state, State::Closed);
        match (party.role, was) {
            (role, State::Waiting { .. }) => {
                self.events.push_back(Event::Left(role));
                if role == Role::Sender {
                    self.sender = None;
                } else if self.sender.is_some() {
                    let here = self.waiting_receivers();
                    self.say(&format!(
                        "[INFO] a receiver left; {here} of {} here",
                        self.n
                    ));
                }
            }
            (_, State::Receiving(feed)) => {
                self.ring_leave(feed.slot, now);
                self.check_end(now);
            }
            // A held party took no place, but the registry counts it until told.
            (role, State::Held { .. }) => self.events.push_back(Event::Left(role)),
            (_, State::Sending) => self.fail(Outcome::SenderGone, now),
            (_, State::Closing { .. } | State::Flushing { .. } | State::Closed) => {}
        }
        // Its place, or the doubt about it, goes to a held newcomer.
        self.settle(now);
        self.watch_sync(now);
    }

    /// Writes to a waiting party: a receiver gets a probe, a sender a heartbeat line.
    /// A write to a client that has gone fails, and that frees its place. `next`: how
    /// soon to probe again, if sooner than usual.
    fn probe(&mut self, p: PartyId, until: Instant, now: Instant, next: Option<Duration>) {
        let party = &mut self.parties[p];
        let State::Waiting { check, .. } = party.state else {
            return;
        };
        match party.role {
            Role::Receiver => {
                party.out.extend_from_slice(response::PROBE);
                party.state = State::Waiting {
                    until,
                    probe_at: Some(now + next.unwrap_or(self.config.probe_interval)),
                    check,
                };
            }
            Role::Sender => {
                party.state = State::Waiting {
                    until,
                    probe_at: Some(now + next.unwrap_or(self.config.heartbeat_interval)),
                    check,
                };
                let here = self.waiting_receivers();
                self.say(&format!(
                    "[INFO] still waiting: {here} of {} receivers here",
                    self.n
                ));
            }
        }
    }

    /// A waiting party is told why it waits no more, and leaves the pipe.
    fn give_up_waiting(&mut self, p: PartyId, why: &Reject, now: Instant) {
        let party = &mut self.parties[p];
        let role = party.role;
        if role == Role::Receiver {
            response::reject(&mut party.out, why, false);
        }
        self.events.push_back(Event::Left(role));
        if role == Role::Sender {
            let here = self.waiting_receivers();
            self.say(&format!(
                "[ERROR] {why} ({here} of {} receivers came)",
                self.n
            ));
            self.conclude(p, why.status(), false);
            self.sender = None;
            self.flush_and_close(p, now);
        } else {
            self.close_politely(p, now);
        }
    }

    /// No byte moved for the idle timeout: receivers that hold the others back by not
    /// reading are dropped; if none did, the sender is the one that stalled.
    fn stalled(&mut self, now: Instant) {
        let stuck: Vec<PartyId> = self
            .receivers
            .iter()
            .copied()
            .filter(|&p| match self.parties[p].state {
                State::Receiving(feed) => {
                    !self.parties[p].out.is_empty() || !self.caught_up(feed.slot)
                }
                _ => false,
            })
            .collect();
        let secs = self.config.idle_timeout.as_secs();
        if stuck.is_empty() {
            self.say(&format!(
                "[ERROR] the sender sent nothing for {secs} s (or a proxy in front stopped forwarding its body)"
            ));
            self.fail(Outcome::Stalled, now);
            return;
        }
        self.say(&format!(
            "[INFO] dropped {} receiver(s) that read nothing for {secs} s",
            stuck.len()
        ));
        self.last_progress = Some(now);
        for p in stuck {
            self.handle_error(p, now);
        }
    }

    fn waiting_receivers(&self) -> usize {
        self.parties
            .iter()
            .filter(|p| p.role == Role::Receiver && p.is_waiting())
            .count()
    }

    /// A progress line for the sender.
    fn say(&mut self, line: &str) {
        let Some(party) = self.sender.and_then(|s| self.parties.get_mut(s)) else {
            return;
        };
        if !party.is_open() {
            return;
        }
        let chunked = party.request.minor == 1;
        if chunked {
            chunk_header(line.len() + 1, &mut party.out);
        }
        party.out.extend_from_slice(line.as_bytes());
        party.out.push(b'\n');
        if chunked {
            party.out.extend_from_slice(b"\r\n");
        }
    }

    fn try_start(&mut self, now: Instant) {
        let Some(s) = self.sender else { return };
        if self.stage != Stage::Waiting || self.waiting_receivers() != self.n {
            return;
        }
        // Not with a party that may have gone (the transfer would fail for it), nor before
        // a held newcomer is decided (it may be the one to take that party's place).
        let undecided = |x: &Party| x.is_held() || (x.suspect && x.is_waiting());
        if self.parties.iter().any(undecided) {
            return;
        }
        let framing = self.parties[s].request.framing;
        let form = self.parties[s].request.web.form.clone();
        let length = match framing {
            // A form's first part is shorter than the body, by an amount known at its end.
            _ if form.is_some() => None,
            Framing::Length(l) => Some(l),
            Framing::Chunked => None,
        };
        let pass_on = self.parties[s].request.pass_on.clone();
        let ids: Vec<PartyId> = (0..self.parties.len())
            .filter(|&p| self.parties[p].role == Role::Receiver && self.parties[p].is_waiting())
            .collect();
        // A body of known length needs no more room than itself: a thousand small pipes
        // must not each hold a whole buffer.
        let most = self.config.buffer_size.max(MIN_BUFFER_SIZE);
        let capacity = length.map_or(most, |l| {
            usize::try_from(l).map_or(most, |l| l.clamp(MIN_BUFFER_SIZE, most))
        });
        let mut ring =
            Broadcast::budgeted(INITIAL_CAPACITY, capacity, ids.len(), &self.config.memory);
        for (slot, &p) in ids.iter().enumerate() {
            let party = &mut self.parties[p];
            if length.is_none() && party.request.minor == 0 {
                response::reject(&mut party.out, &Reject::NeedsLength, false);
                party.state = State::Closing {
                    until: now + self.config.linger_timeout,
                    shutdown: true,
                };
                ring.remove(slot);
            } else {
                if form.is_none() {
                    let choice = &party.request.web.disposition;
                    response::receiver_head_as(
                        &mut party.out,
                        &pass_on,
                        length,
                        choice,
                        &self.name,
                    );
                }
                let chunk = length.is_none().then(Chunk::default);
                party.state = State::Receiving(Feed { slot, chunk });
            }
        }
        if self.config.min_receiver_rate > 0 {
            self.rate_check = Some(now + self.config.min_rate_window);
            self.rate_marks = vec![0; ids.len()];
        }
        self.receivers = ids;
        let leftover = std::mem::take(&mut self.leftover);
        let ingest = ingest::Ingest::new(ring, BodyDecoder::new(framing), leftover);
        self.heads_pending = form.is_some();
        self.body = Some(match &form {
            Some(boundary) => ingest.with_form(boundary),
            None => ingest,
        });
        self.parties[s].state = State::Sending;
        self.stage = Stage::Running { started: now };
        self.last_progress = Some(now);
        self.events.push_back(Event::Started);
        self.say(&format!(
            "[INFO] all {} receiver(s) joined, sending",
            self.n
        ));
        self.pump(now);
        self.check_end(now);
    }

    /// A form sender's first part's headers are known: the receivers' heads go out, with
    /// the part's type and file name.
    fn form_heads(&mut self) {
        if !self.heads_pending {
            return;
        }
        let Some(pass_on) = self.form_pass_on() else {
            return;
        };
        self.heads_pending = false;
        for &p in &self.receivers {
            let party = &mut self.parties[p];
            if let State::Receiving(_) = party.state {
                let choice = &party.request.web.disposition;
                // After a probe still queued; no framing is queued yet (no data came).
                response::receiver_head_as(&mut party.out, &pass_on, None, choice, &self.name);
            }
        }
    }

    /// After a write: is this receiver done, is the transfer over?
    fn after_progress(&mut self, p: PartyId, now: Instant) {
        self.space_freed(now);
        let body_done = self.body_done();
        let Some(party) = self.parties.get(p) else {
            return;
        };
        let flushed = party.out.is_empty();
        match party.state {
            State::Receiving(feed) => {
                let framed = feed
                    .chunk
                    .is_none_or(|c| c.last_queued && c.data_left == 0 && c.crlf_left == 0);
                if body_done && self.caught_up(feed.slot) && framed && flushed {
                    self.complete += 1;
                    self.close_politely(p, now);
                    self.ring_leave(feed.slot, now);
                    self.check_end(now);
                }
            }
            State::Closing {
                shutdown: true,
                until: _,
            } if flushed => {
                // The last bytes are out: the linger starts now.
                self.parties[p].state = State::Closing {
                    until: now + self.config.linger_timeout,
                    shutdown: true,
                };
            }
            _ => {}
        }
    }

    /// Ends the sender's response: its head now if it was held to the end (`status` tells
    /// the outcome), then the last chunk if the transfer is `complete`. Otherwise the
    /// response stops after its `[ERROR]` line, short of its last chunk: no `!transfer
    /// cut` line here, since a proxy that meets one drops what came in the same read,
    /// and that is the line the sender most needs to see.
    fn conclude(&mut self, s: PartyId, status: u16, complete: bool) {
        let party = &mut self.parties[s];
        let chunked = party.request.minor == 1;
        if let Some(Hold::End { upto }) = party.hold {
            let mut head = Vec::new();
            response::sender_head(&mut head, status, chunked);
            party.out.splice(upto..upto, head);
            party.hold = None;
        }
        if chunked && complete {
            party.out.extend_from_slice(LAST_CHUNK);
        }
    }

    /// Closes once the queued bytes are written (within the write timeout), with no linger.
    fn flush_and_close(&mut self, p: PartyId, now: Instant) {
        if let Some(party) = self.parties.get_mut(p) {
            party.state = State::Flushing {
                until: now + self.config.write_timeout,
            };
        }
    }

    /// Closes after the queued bytes are written (within the write timeout), then a
    /// shutdown and a short linger so the client reads them before the close.
    fn close_politely(&mut self, p: PartyId, now: Instant) {
        if let Some(party) = self.parties.get_mut(p) {
            let wait = if party.flushed() {
                self.config.linger_timeout
            } else {
                self.config.write_timeout
            };
            party.state = State::Closing {
                until: now + wait,
                shutdown: true,
            };
        }
    }

    /// Ends the transfer once no receiver is still getting bytes.
    fn check_end(&mut self, now: Instant) {
        let Stage::Running { started } = self.stage else {
            return;
        };
        let active = self
            .receivers
            .iter()
            .any(|&p| matches!(self.parties[p].state, State::Receiving(_)));
        if active {
            return;
        }
        let outcome = if self.complete == self.n && self.body_done() {
            Outcome::Complete
        } else {
            Outcome::ReceiversLost
        };
        self.end(outcome, started, self.complete, now);
    }

    /// The sender failed: every receiver is cut so its client sees an error.
    fn fail(&mut self, outcome: Outcome, now: Instant) {
        let Stage::Running { started } = self.stage else {
            return;
        };
        let linger = now + self.config.linger_timeout;
        for &p in &self.receivers {
            let party = &mut self.parties[p];
            let State::Receiving(feed) = party.state else {
                continue;
            };
            party.state = match feed.chunk {
                // No head was written (a form whose headers never came): the close
                // with nothing is the error.
                _ if self.heads_pending => State::Closed,
                // Between chunks, a line that is no chunk size makes the cut plain to
                // every client; within a chunk or a length, the close short of it does.
                Some(c) if c.data_left == 0 && c.crlf_left == 0 && !c.last_queued => {
                    party.out.extend_from_slice(response::CUT);
                    State::Flushing { until: linger }
                }
                _ => State::Closed,
            };
        }
        if let Outcome::Malformed(e) = outcome {
            self.say(&format!("[ERROR] malformed body: {e}"));
        }
        self.end(outcome, started, 0, now);
    }

    fn end(&mut self, outcome: Outcome, started: Instant, complete: usize, now: Instant) {
        self.stage = Stage::Ended;
        // No one reads the ring any more: its memory goes back to the budget now.
        if let Some(body) = self.body.as_mut() {
            body.ring.release();
        }
        let seconds = now.saturating_duration_since(started).as_secs_f64();
        let bytes = self.body.as_ref().map_or(0, |b| b.bytes);
        let rate = if seconds > 0.0 {
            bytes as f64 / seconds / 1e6
        } else {
            0.0
        };
        match outcome {
            Outcome::Complete => self.say(&format!(
                "[INFO] done: {bytes} bytes to {complete} of {} receivers in {seconds:.2}s ({rate:.1} MB/s)",
                self.n
            )),
            Outcome::ReceiversLost
            | Outcome::Malformed(_)
            | Outcome::Stalled
            | Outcome::Shutdown => self.say(&format!(
                "[ERROR] {complete} of {} receivers got every byte",
                self.n
            )),
            Outcome::SenderGone => {}
        }
        if let Some(s) = self.sender {
            if outcome == Outcome::SenderGone {
                self.parties[s].state = State::Closed;
            } else {
                let complete = outcome == Outcome::Complete;
                // A status held to the end must reach a client still uploading: a reset
                // right after it could be met first. A live response had its lines.
                let held = matches!(self.parties[s].hold, Some(Hold::End { .. }));
                self.conclude(s, outcome.sender_status(), complete);
                if complete || held {
                    self.close_politely(s, now);
                } else {
                    self.flush_and_close(s, now);
                }
            }
        }
        let summary = Summary {
            name: self.name.clone(),
            n: self.n,
            bytes,
            complete,
            seconds,
            outcome,
        };
        self.watch_done(&summary, now);
        self.events.push_back(Event::Finished(summary));
    }
}

#[cfg(test)]
mod tests;
