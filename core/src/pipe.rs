//! One transfer: a sender, its `n` receivers, and the bounded buffer between them.
//!
//! The pipe owns every decision from the first party's arrival to the last close: who is
//! waiting, when the transfer starts, which bytes each socket gets next, who is lost, and
//! what the sender is told. A backend asks each party's [`Pipe::read_buf`] and
//! [`Pipe::write_slices`], reports what happened, and drops a socket once
//! [`Pipe::is_closed`] says so.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::time::Instant;

use crate::broadcast::{Broadcast, INITIAL_CAPACITY};
use crate::chunked::{chunk_header, BodyDecoder, BodyError, LAST_CHUNK};
use crate::config::{Config, MIN_BUFFER_SIZE};
use crate::conn::PipeRequest;
use crate::error::Reject;
use crate::request::{Framing, Request, Role};
use crate::response;

/// A party's index in its pipe.
pub type PartyId = usize;

/// What the pipe tells its backend besides bytes.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A waiting party left: release its place in the registry.
    Left(Role),
    /// The transfer started: the name is busy.
    Started,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Waiting,
    /// Receiving the body (receivers: getting it).
    Active,
    /// Finished on our side; closing politely.
    Closing,
    Closed,
}

#[derive(Debug)]
struct Party {
    role: Role,
    request: Request,
    phase: Phase,
    /// Control bytes to write before any data: heads, progress lines, chunk framing.
    out: Vec<u8>,
    out_pos: usize,
    /// The client has ended its side (receivers only matter).
    eof: bool,
    probe_at: Option<Instant>,
    /// When a waiting party gives up.
    wait_until: Option<Instant>,
    shutdown: bool,
    linger_until: Option<Instant>,
    // A receiver's place in the transfer.
    slot: usize,
    chunked: bool,
    frame_left: u64,
    crlf_left: usize,
    /// The last chunk is queued in `out`.
    last_queued: bool,
    complete: bool,
}

impl Party {
    fn new(role: Role, request: Request) -> Self {
        Party {
            role,
            request,
            phase: Phase::Waiting,
            out: Vec::new(),
            out_pos: 0,
            eof: false,
            probe_at: None,
            wait_until: None,
            shutdown: false,
            linger_until: None,
            slot: 0,
            chunked: false,
            frame_left: 0,
            crlf_left: 0,
            last_queued: false,
            complete: false,
        }
    }

    fn is_open(&self) -> bool {
        self.phase != Phase::Closed
    }
}

/// Where the sender's next read goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadInto {
    Nowhere,
    /// Straight into the buffer: chunk or body data. `all_free`: the read was lent all
    /// of the ring's free space, so filling it means the ring, not the sender, set the
    /// size of the read.
    Buffer {
        lent: usize,
        all_free: bool,
    },
    /// Into `raw`: framing to decode first.
    Raw,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Waiting,
    Running { started: Instant },
    Ended,
}

/// How many times a backend reads one party's socket in a turn, while it has bytes and
/// [`Pipe::read_buf`] offers room. The sender is read until its socket is empty or the
/// ring is full before the receivers are written, so each of the `n` writes carries as
/// much as there is (and a chunk's data goes out with its framing): fewer, larger
/// writes. With 64 KiB chunks at n=30 this took the server's CPU from 8.3 s to 4.8 s per
/// 800 MiB (BENCHMARKS.md). Bounded, so that a client that never stops sending cannot
/// hold the pipe's task.
pub const READS_PER_TURN: usize = 64;

/// How many framing bytes the sender is read for at a time; data that comes with them is
/// copied, the rest of a chunk is read straight into the buffer.
const RAW_READ: usize = 64;
const CRLF: &[u8] = b"\r\n";

/// Up to four slices for one vectored write: control bytes, data (two pieces where the
/// ring wraps), and the CRLF that closes a chunk.
#[derive(Debug)]
pub struct Slices<'a> {
    slices: [IoSlice<'a>; 4],
    len: usize,
}

impl<'a> Slices<'a> {
    fn push(&mut self, s: &'a [u8]) {
        if !s.is_empty() && self.len < 4 {
            self.slices[self.len] = IoSlice::new(s);
            self.len += 1;
        }
    }

    /// Total bytes in the slices.
    pub fn total(&self) -> usize {
        self.slices[..self.len].iter().map(|s| s.len()).sum()
    }
}

impl<'a> std::ops::Deref for Slices<'a> {
    type Target = [IoSlice<'a>];
    fn deref(&self) -> &[IoSlice<'a>] {
        &self.slices[..self.len]
    }
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
    buffer: Option<Broadcast>,
    decoder: Option<BodyDecoder>,
    /// Sender bytes read but not yet decoded (the leftover after its head, or framing).
    raw: Vec<u8>,
    raw_pos: usize,
    /// Lent to the backend for reads of framing.
    frame_in: Vec<u8>,
    read_into: ReadInto,
    body_bytes: u64,
    /// Receivers' slots in the buffer, in start order.
    receivers: Vec<PartyId>,
    scratch: Vec<u8>,
    events: VecDeque<Event>,
    /// When a byte last moved in the running transfer.
    last_progress: Option<Instant>,
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
            buffer: None,
            decoder: None,
            raw: Vec::new(),
            raw_pos: 0,
            frame_in: vec![0; RAW_READ],
            read_into: ReadInto::Nowhere,
            body_bytes: 0,
            receivers: Vec::new(),
            scratch: Vec::new(),
            events: VecDeque::new(),
            last_progress: None,
        }
    }

    /// A party the registry admitted joins.
    pub fn join(&mut self, pipe_request: PipeRequest, role: Role, now: Instant) -> PartyId {
        let id = self.parties.len();
        let PipeRequest { request, leftover } = pipe_request;
        let mut party = Party::new(role, request);
        party.wait_until = Some(now + self.config.wait_timeout);
        if role == Role::Sender {
            // A waiting sender is not read, so only a write finds out that it has gone.
            party.probe_at = Some(now + self.config.heartbeat_interval);
        }
        match role {
            Role::Sender => {
                if party.request.expect_continue {
                    party.out.extend_from_slice(response::CONTINUE);
                }
                response::sender_head(&mut party.out, party.request.minor == 1);
                self.raw = leftover;
                self.sender = Some(id);
                self.parties.push(party);
                let here = self.waiting_receivers();
                self.say(&format!(
                    "[INFO] waiting for {} receiver(s), {here} here",
                    self.n
                ));
            }
            Role::Receiver => {
                self.parties.push(party);
                if self.sender.is_some() {
                    let here = self.waiting_receivers();
                    self.say(&format!("[INFO] receiver {here} of {} joined", self.n));
                }
            }
        }
        self.try_start(now);
        id
    }

    /// How many parties have joined (ids are `0..parties()`).
    pub fn parties(&self) -> usize {
        self.parties.len()
    }

    /// Whether the backend should drop this party's socket (at once if it is still open).
    pub fn is_closed(&self, p: PartyId) -> bool {
        self.parties.get(p).is_none_or(|x| x.phase == Phase::Closed)
    }

    /// Whether the backend should shut down the write side of this party now.
    pub fn take_shutdown(&mut self, p: PartyId) -> bool {
        let Some(party) = self.parties.get_mut(p) else {
            return false;
        };
        let due =
            party.shutdown && party.phase == Phase::Closing && party.out_pos == party.out.len();
        if due {
            party.shutdown = false;
        }
        due
    }

    /// Whether every party is closed: the owner of this pipe may end.
    pub fn is_idle(&self) -> bool {
        self.parties.iter().all(|p| !p.is_open())
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
        let idle = match self.stage {
            Stage::Running { .. } => self.last_progress.map(|t| t + self.config.idle_timeout),
            _ => None,
        };
        self.parties
            .iter()
            .filter(|p| p.is_open())
            .flat_map(|p| match p.phase {
                Phase::Waiting => [p.probe_at, p.wait_until],
                _ => [p.linger_until, None],
            })
            .flatten()
            .chain(idle)
            .min()
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        for p in 0..self.parties.len() {
            let party = &mut self.parties[p];
            if party.phase == Phase::Closing && party.linger_until.is_some_and(|t| t <= now) {
                party.phase = Phase::Closed;
            }
            if party.phase != Phase::Waiting {
                continue;
            }
            if party.wait_until.is_some_and(|t| t <= now) {
                let secs = self.config.wait_timeout.as_secs();
                self.give_up_waiting(p, &Reject::WaitTimeout { secs }, now);
            } else if party.probe_at.is_some_and(|t| t <= now) {
                if party.role == Role::Receiver {
                    party.out.extend_from_slice(response::PROBE);
                    party.probe_at = Some(now + self.config.probe_interval);
                } else {
                    party.probe_at = Some(now + self.config.heartbeat_interval);
                    let here = self.waiting_receivers();
                    self.say(&format!(
                        "[INFO] still waiting: {here} of {} receivers here",
                        self.n
                    ));
                }
            }
        }
        if let (Stage::Running { .. }, Some(last)) = (self.stage, self.last_progress) {
            if now >= last + self.config.idle_timeout {
                self.stalled(now);
            }
        }
    }

    /// The server is shutting down: waiting parties are told and let go; a running
    /// transfer goes on until [`Pipe::handle_abort`].
    pub fn handle_shutdown(&mut self, now: Instant) {
        for p in 0..self.parties.len() {
            if self.parties[p].phase == Phase::Waiting {
                self.give_up_waiting(p, &Reject::ShuttingDown, now);
            }
        }
    }

    /// The shutdown grace is over: a running transfer is cut by the failure rules.
    pub fn handle_abort(&mut self, now: Instant) {
        self.handle_shutdown(now);
        if matches!(self.stage, Stage::Running { .. }) {
            self.say("[ERROR] the server is shutting down");
            self.fail(Outcome::Shutdown, now);
        }
    }

    /// A waiting party is told why it waits no more, and leaves the pipe.
    fn give_up_waiting(&mut self, p: PartyId, why: &Reject, now: Instant) {
        let party = &mut self.parties[p];
        let role = party.role;
        match role {
            Role::Receiver => response::reject(&mut party.out, why, false),
            Role::Sender => {}
        }
        self.close_politely(p, now);
        self.events.push_back(Event::Left(role));
        if role == Role::Sender {
            let here = self.waiting_receivers();
            self.say(&format!(
                "[ERROR] {why} ({here} of {} receivers came)",
                self.n
            ));
            self.sender = None;
        }
    }

    /// No byte moved for the idle timeout: receivers that hold the others back by not
    /// reading are dropped; if none did, the sender is the one that stalled.
    fn stalled(&mut self, now: Instant) {
        let written = self.buffer.as_ref().map_or(0, Broadcast::written);
        let stuck: Vec<PartyId> = self
            .receivers
            .iter()
            .copied()
            .filter(|&p| {
                let party = &self.parties[p];
                let pos = self.buffer.as_ref().and_then(|b| b.position(party.slot));
                party.phase == Phase::Active && (pos != Some(written) || !party.out.is_empty())
            })
            .collect();
        let secs = self.config.idle_timeout.as_secs();
        if stuck.is_empty() {
            self.say(&format!("[ERROR] the sender sent nothing for {secs} s"));
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

    /// Where to read this party's socket into; `None`: do not read it now.
    pub fn read_buf(&mut self, p: PartyId) -> Option<&mut [u8]> {
        let party = self.parties.get(p)?;
        let discard = match (party.role, party.phase) {
            (_, Phase::Closing) => party.linger_until.is_some() && !party.eof,
            (Role::Receiver, Phase::Waiting | Phase::Active) => !party.eof,
            (Role::Sender, Phase::Active) => return self.sender_buf(),
            _ => false,
        };
        if !discard {
            return None;
        }
        self.scratch.resize(4096, 0);
        Some(&mut self.scratch)
    }

    /// `n` bytes were read into [`Pipe::read_buf`]; 0 is the end of the client's stream.
    pub fn handle_read(&mut self, p: PartyId, n: usize, now: Instant) {
        let Some(party) = self.parties.get_mut(p) else {
            return;
        };
        match (party.role, party.phase) {
            (Role::Sender, Phase::Active) => self.sender_read(n, now),
            (_, Phase::Closing) if n == 0 => party.phase = Phase::Closed,
            (Role::Receiver, Phase::Waiting) if n == 0 => {
                party.eof = true;
                if party.request.minor == 1 {
                    // A half-close or a close? Only a write can tell: probe until it fails.
                    party.out.extend_from_slice(response::PROBE);
                    party.probe_at = Some(now + self.config.probe_interval);
                } else {
                    self.handle_error(p, now);
                }
            }
            (Role::Receiver, _) if n == 0 => party.eof = true,
            _ => {}
        }
    }

    /// The next bytes for this party's socket, as slices for one vectored write; empty
    /// when it has nothing to write now.
    pub fn write_slices(&mut self, p: PartyId) -> Slices<'_> {
        self.prepare_frame(p);
        let mut out = Slices {
            slices: [IoSlice::new(&[]); 4],
            len: 0,
        };
        let Some(party) = self.parties.get(p) else {
            return out;
        };
        if party.phase == Phase::Closed {
            return out;
        }
        if party.out_pos < party.out.len() {
            out.push(&party.out[party.out_pos..]);
        }
        if party.role != Role::Receiver || party.phase != Phase::Active {
            return out;
        }
        let Some(buffer) = &self.buffer else {
            return out;
        };
        let limit = if party.chunked {
            party.frame_left
        } else {
            u64::MAX
        };
        let (a, b) = buffer.readable(party.slot, limit);
        let data = (a.len() + b.len()) as u64;
        out.push(a);
        out.push(b);
        if party.chunked && data == party.frame_left && party.crlf_left > 0 {
            out.push(&CRLF[2 - party.crlf_left..]);
        }
        out
    }

    /// `n` bytes of [`Pipe::write_slices`] were written.
    pub fn handle_wrote(&mut self, p: PartyId, n: usize, now: Instant) {
        let Some(party) = self.parties.get_mut(p) else {
            return;
        };
        if n > 0 && self.stage != Stage::Waiting {
            self.last_progress = Some(now);
        }
        let mut n = n;
        let k = n.min(party.out.len() - party.out_pos);
        party.out_pos += k;
        n -= k;
        if party.out_pos == party.out.len() {
            party.out.clear();
            party.out_pos = 0;
        }
        if party.role == Role::Receiver && party.phase == Phase::Active && n > 0 {
            if let Some(buffer) = &mut self.buffer {
                let limit = if party.chunked {
                    party.frame_left
                } else {
                    u64::MAX
                };
                let (a, b) = buffer.readable(party.slot, limit);
                let d = n.min(a.len() + b.len());
                buffer.consume(party.slot, d as u64);
                n -= d;
                if party.chunked {
                    party.frame_left -= d as u64;
                    if party.frame_left == 0 {
                        let c = n.min(party.crlf_left);
                        party.crlf_left -= c;
                    }
                }
            }
        }
        self.after_progress(p, now);
    }

    /// This party's socket failed, or it is gone.
    pub fn handle_error(&mut self, p: PartyId, now: Instant) {
        let Some(party) = self.parties.get_mut(p) else {
            return;
        };
        let was = party.phase;
        party.phase = Phase::Closed;
        match (party.role, was) {
            (role, Phase::Waiting) => {
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
            (Role::Receiver, Phase::Active) => {
                let slot = party.slot;
                if let Some(b) = &mut self.buffer {
                    b.remove(slot);
                }
                self.space_freed(now);
                self.check_end(now);
            }
            (Role::Sender, Phase::Active) => self.fail(Outcome::SenderGone, now),
            _ => {}
        }
    }

    fn waiting_receivers(&self) -> usize {
        self.parties
            .iter()
            .filter(|p| p.role == Role::Receiver && p.phase == Phase::Waiting)
            .count()
    }

    /// A progress line for the sender.
    fn say(&mut self, line: &str) {
        let Some(party) = self.sender.and_then(|s| self.parties.get_mut(s)) else {
            return;
        };
        if party.phase == Phase::Closed {
            return;
        }
        let chunked = party.request.minor == 1;
        if chunked {
            chunk_header(line.len() + 1, &mut party.out);
        }
        party.out.extend_from_slice(line.as_bytes());
        party.out.push(b'\n');
        if chunked {
            party.out.extend_from_slice(CRLF);
        }
    }

    fn try_start(&mut self, now: Instant) {
        let Some(s) = self.sender else { return };
        if self.stage != Stage::Waiting || self.waiting_receivers() != self.n {
            return;
        }
        let framing = self.parties[s].request.framing;
        let length = match framing {
            Framing::Length(l) => Some(l),
            Framing::Chunked => None,
        };
        let pass_on = self.parties[s].request.pass_on.clone();
        let ids: Vec<PartyId> = (0..self.parties.len())
            .filter(|&p| {
                self.parties[p].role == Role::Receiver && self.parties[p].phase == Phase::Waiting
            })
            .collect();
        // A body of known length needs no more room than itself: a thousand small pipes
        // must not each hold a whole buffer.
        let most = self.config.buffer_size.max(MIN_BUFFER_SIZE);
        let capacity = length.map_or(most, |l| {
            usize::try_from(l).map_or(most, |l| l.clamp(MIN_BUFFER_SIZE, most))
        });
        let mut buffer = Broadcast::growing(INITIAL_CAPACITY, capacity, ids.len());
        for (slot, &p) in ids.iter().enumerate() {
            let party = &mut self.parties[p];
            party.slot = slot;
            party.probe_at = None;
            if length.is_none() && party.request.minor == 0 {
                response::reject(&mut party.out, &Reject::NeedsLength, false);
                party.phase = Phase::Closing;
                party.shutdown = true;
                party.linger_until = Some(now + self.config.linger_timeout);
                buffer.remove(slot);
            } else {
                response::receiver_head(&mut party.out, &pass_on, length);
                party.chunked = length.is_none();
                party.phase = Phase::Active;
            }
        }
        self.receivers = ids;
        self.buffer = Some(buffer);
        self.decoder = Some(BodyDecoder::new(framing));
        self.parties[s].phase = Phase::Active;
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

    /// The sender's read buffer: straight into the broadcast buffer for data, a small
    /// buffer for framing.
    fn sender_buf(&mut self) -> Option<&mut [u8]> {
        self.read_into = ReadInto::Nowhere;
        if self.raw_pos < self.raw.len() {
            return None;
        }
        let decoder = self.decoder.as_ref()?;
        if decoder.is_done() {
            return None;
        }
        let data_left = decoder.data_left();
        let buffer = self.buffer.as_mut()?;
        if data_left > 0 {
            let free = buffer.capacity() - buffer.buffered();
            let space = buffer.writable();
            let k = space
                .len()
                .min(usize::try_from(data_left).unwrap_or(usize::MAX));
            if k == 0 {
                return None;
            }
            self.read_into = ReadInto::Buffer {
                lent: k,
                all_free: k == free,
            };
            return Some(&mut space[..k]);
        }
        // Data read with framing is copied in, across the wrap if need be.
        if buffer.reserve(RAW_READ) < RAW_READ {
            return None;
        }
        self.read_into = ReadInto::Raw;
        Some(&mut self.frame_in)
    }

    fn sender_read(&mut self, n: usize, now: Instant) {
        let into = std::mem::replace(&mut self.read_into, ReadInto::Nowhere);
        if n == 0 {
            if !self.decoder.as_ref().is_some_and(BodyDecoder::is_done) {
                self.fail(Outcome::SenderGone, now);
            }
            return;
        }
        match into {
            ReadInto::Buffer { lent, all_free } => {
                if let (Some(b), Some(d)) = (&mut self.buffer, &mut self.decoder) {
                    b.commit(n);
                    if n == lent && all_free {
                        // The sender had more than the ring could take: a larger ring
                        // makes fewer, larger writes to every receiver.
                        b.grow();
                    }
                    d.advance_data(n as u64);
                    self.body_bytes += n as u64;
                    self.last_progress = Some(now);
                }
            }
            ReadInto::Raw => {
                self.last_progress = Some(now);
                self.raw.clear();
                self.raw_pos = 0;
                self.raw
                    .extend_from_slice(&self.frame_in[..n.min(RAW_READ)]);
                self.pump(now);
            }
            ReadInto::Nowhere => {}
        }
        self.check_end(now);
    }

    /// Decodes buffered raw sender bytes into the broadcast buffer, as far as space allows.
    fn pump(&mut self, now: Instant) {
        let (Some(buffer), Some(decoder)) = (&mut self.buffer, &mut self.decoder) else {
            return;
        };
        let mut error = None;
        while self.raw_pos < self.raw.len() && !decoder.is_done() {
            // Input is never shorter than the data it holds, so `room` input bytes fit.
            let room = buffer.reserve(self.raw.len() - self.raw_pos);
            if room == 0 {
                break;
            }
            let end = self.raw.len().min(self.raw_pos + room);
            match decoder.decode(&self.raw[self.raw_pos..end]) {
                Ok(step) => {
                    let data =
                        &self.raw[self.raw_pos + step.data.start..self.raw_pos + step.data.end];
                    let pushed = buffer.push(data);
                    self.body_bytes += pushed as u64;
                    self.raw_pos += step.consumed;
                    if step.consumed == 0 {
                        break;
                    }
                }
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        if decoder.is_done() || self.raw_pos >= self.raw.len() {
            self.raw.clear();
            self.raw_pos = 0;
        }
        if let Some(e) = error {
            self.fail(Outcome::Malformed(e), now);
        }
    }

    /// Queues a chunk header, or the last chunk, for a receiver whose frame is done.
    fn prepare_frame(&mut self, p: PartyId) {
        let body_done = self.decoder.as_ref().is_some_and(BodyDecoder::is_done);
        let (Some(party), Some(buffer)) = (self.parties.get_mut(p), &self.buffer) else {
            return;
        };
        if party.role != Role::Receiver || party.phase != Phase::Active || !party.chunked {
            return;
        }
        if party.frame_left > 0 || party.crlf_left > 0 {
            return;
        }
        let available = buffer.written() - buffer.position(party.slot).unwrap_or(0);
        if available > 0 {
            chunk_header(available as usize, &mut party.out);
            party.frame_left = available;
            party.crlf_left = 2;
        } else if body_done && !party.last_queued {
            party.out.extend_from_slice(LAST_CHUNK);
            party.last_queued = true;
        }
    }

    /// After a write: is this receiver done, is the transfer over?
    /// Space may have freed for sender bytes that were read along with framing.
    fn space_freed(&mut self, now: Instant) {
        if self.raw_pos < self.raw.len() {
            self.pump(now);
        }
    }

    fn after_progress(&mut self, p: PartyId, now: Instant) {
        self.space_freed(now);
        let body_done = self.decoder.as_ref().is_some_and(BodyDecoder::is_done);
        let written = self.buffer.as_ref().map_or(0, Broadcast::written);
        let Some(party) = self.parties.get_mut(p) else {
            return;
        };
        let flushed = party.out.is_empty();
        match (party.role, party.phase) {
            (Role::Receiver, Phase::Active) => {
                let pos = self.buffer.as_ref().and_then(|b| b.position(party.slot));
                let all_data = body_done && pos == Some(written);
                let framed = !party.chunked || party.last_queued;
                if all_data && framed && flushed && party.frame_left == 0 && party.crlf_left == 0 {
                    party.complete = true;
                    let slot = party.slot;
                    self.close_politely(p, now);
                    if let Some(b) = &mut self.buffer {
                        b.remove(slot);
                    }
                    self.space_freed(now);
                    self.check_end(now);
                }
            }
            (_, Phase::Closing) if flushed && party.linger_until.is_none() => {
                party.phase = Phase::Closed;
            }
            (_, Phase::Closing) if flushed && party.shutdown => {
                // The last bytes are out: the linger starts now.
                party.linger_until = Some(now + self.config.linger_timeout);
            }
            _ => {}
        }
    }

    /// Closes after the queued bytes are written (within the write timeout), then a
    /// shutdown and a short linger so the client reads them before the close.
    fn close_politely(&mut self, p: PartyId, now: Instant) {
        if let Some(party) = self.parties.get_mut(p) {
            party.phase = Phase::Closing;
            party.shutdown = true;
            let wait = if party.out_pos == party.out.len() {
                self.config.linger_timeout
            } else {
                self.config.write_timeout
            };
            party.linger_until = Some(now + wait);
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
            .any(|&p| self.parties[p].phase == Phase::Active);
        if active {
            return;
        }
        let complete = self
            .receivers
            .iter()
            .filter(|&&p| self.parties[p].complete)
            .count();
        let body_done = self.decoder.as_ref().is_some_and(BodyDecoder::is_done);
        let outcome = if complete == self.n && body_done {
            Outcome::Complete
        } else {
            Outcome::ReceiversLost
        };
        self.end(outcome, started, complete, now);
    }

    /// The sender failed: every receiver is cut so its client sees an error.
    fn fail(&mut self, outcome: Outcome, now: Instant) {
        let Stage::Running { started } = self.stage else {
            return;
        };
        for &p in &self.receivers {
            let party = &mut self.parties[p];
            if party.phase == Phase::Active {
                party.phase = Phase::Closed;
            }
        }
        if let Outcome::Malformed(e) = outcome {
            self.say(&format!("[ERROR] malformed body: {e}"));
        }
        self.end(outcome, started, 0, now);
    }

    fn end(&mut self, outcome: Outcome, started: Instant, complete: usize, now: Instant) {
        self.stage = Stage::Ended;
        let seconds = now.saturating_duration_since(started).as_secs_f64();
        let bytes = self.body_bytes;
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
            let party = &mut self.parties[s];
            if outcome == Outcome::Complete && party.request.minor == 1 {
                party.out.extend_from_slice(LAST_CHUNK);
            }
            if outcome == Outcome::SenderGone {
                party.phase = Phase::Closed;
            } else {
                self.close_politely(s, now);
            }
        }
        self.events.push_back(Event::Finished(Summary {
            name: self.name.clone(),
            n: self.n,
            bytes,
            complete,
            seconds,
            outcome,
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::{Action, Conn};
    use crate::registry::Registry;

    /// A scripted client: the bytes it will send, and what it got back.
    struct Client {
        input: Vec<u8>,
        sent: usize,
        got: Vec<u8>,
        closed: bool,
        shut: bool,
    }

    /// Drives one pipe with in-memory clients, moving at most `piece` bytes per call.
    struct Sim {
        pipe: Pipe,
        clients: Vec<Client>,
        now: Instant,
        events: VecDeque<Event>,
        piece: usize,
        /// Offered reads are left unused every other round, as a socket with no data does.
        lazy: bool,
        round: usize,
    }

    fn request(raw: &str) -> (PipeRequest, Role) {
        let now = Instant::now();
        let mut c = Conn::with_bytes(&Config::default(), raw.as_bytes(), now);
        assert_eq!(c.poll_action(), Action::Pipe, "{raw}");
        let p = c.take_pipe_request().unwrap();
        let role = match &p.request.route {
            crate::request::Route::Pipe { role, .. } => *role,
            _ => unreachable!(),
        };
        (p, role)
    }

    impl Sim {
        fn new(n: usize, buffer: usize, piece: usize) -> Self {
            let config = Config {
                buffer_size: buffer,
                ..Config::default()
            };
            Sim {
                pipe: Pipe::new("x", n, &config),
                clients: Vec::new(),
                now: Instant::now(),
                events: VecDeque::new(),
                piece,
                lazy: false,
                round: 0,
            }
        }

        /// A client sends its whole request; the head goes through a `Conn` first.
        fn join(&mut self, raw: impl AsRef<[u8]>) -> PartyId {
            let raw = raw.as_ref();
            let head_end = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
            let (req, role) = request(std::str::from_utf8(&raw[..head_end]).unwrap());
            let id = self.pipe.join(req, role, self.now);
            self.clients.push(Client {
                input: raw[head_end..].to_vec(),
                sent: 0,
                got: Vec::new(),
                closed: false,
                shut: false,
            });
            id
        }

        fn sender(&mut self, n: usize, body: &[u8], chunked: bool) -> PartyId {
            let mut raw = if chunked {
                format!("PUT /x?n={n} HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")
                    .into_bytes()
            } else {
                format!(
                    "PUT /x?n={n} HTTP/1.1\r\nHost: h\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                )
                .into_bytes()
            };
            if chunked {
                raw.extend_from_slice(&crate::chunked::encode(body, &[1000]));
            } else {
                raw.extend_from_slice(body);
            }
            self.join(raw)
        }

        fn receiver(&mut self, n: usize) -> PartyId {
            self.join(format!("GET /x?n={n} HTTP/1.1\r\nHost: h\r\n\r\n"))
        }

        /// Runs until nothing moves; `stuck` receivers do not read.
        fn run(&mut self, stuck: &[PartyId]) {
            for _ in 0..1_000_000 {
                self.round += 1;
                let mut moved = false;
                for p in 0..self.pipe.parties() {
                    if self.clients[p].closed {
                        continue;
                    }
                    if self.pipe.is_closed(p) {
                        self.clients[p].closed = true;
                        moved = true;
                        continue;
                    }
                    if self.pipe.take_shutdown(p) {
                        self.clients[p].shut = true;
                        moved = true;
                    }
                    if !stuck.contains(&p) {
                        let slices = self.pipe.write_slices(p);
                        let mut budget = self.piece;
                        let mut wrote = 0;
                        for s in slices.iter() {
                            let k = s.len().min(budget);
                            self.clients[p].got.extend_from_slice(&s[..k]);
                            budget -= k;
                            wrote += k;
                        }
                        if wrote > 0 {
                            self.pipe.handle_wrote(p, wrote, self.now);
                            moved = true;
                        }
                    }
                    let c = &mut self.clients[p];
                    if let Some(buf) = self.pipe.read_buf(p) {
                        if self.lazy && self.round.is_multiple_of(2) {
                            moved = true;
                            continue;
                        }
                        let k = buf.len().min(self.piece).min(c.input.len() - c.sent);
                        if k > 0 || c.shut {
                            buf[..k].copy_from_slice(&c.input[c.sent..c.sent + k]);
                            c.sent += k;
                            self.pipe.handle_read(p, k, self.now);
                            moved = true;
                        }
                    }
                }
                while let Some(e) = self.pipe.poll_event() {
                    self.events.push_back(e);
                    moved = true;
                }
                if !moved {
                    return;
                }
            }
            panic!("no quiescence");
        }

        fn body_of(&self, p: PartyId) -> Vec<u8> {
            let got = &self.clients[p].got;
            let at = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
            let head = String::from_utf8_lossy(&got[..at]);
            if head.contains("chunked") {
                crate::chunked::tests::decode_all(Framing::Chunked, &got[at..], 7)
                    .unwrap()
                    .0
            } else {
                got[at..].to_vec()
            }
        }

        fn text(&self, p: PartyId) -> String {
            String::from_utf8_lossy(&self.clients[p].got).into_owned()
        }

        fn summary(&self) -> &Summary {
            self.events
                .iter()
                .find_map(|e| match e {
                    Event::Finished(s) => Some(s),
                    _ => None,
                })
                .unwrap()
        }
    }

    fn body(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[test]
    fn every_receiver_gets_every_byte_in_any_arrival_order() {
        for chunked in [false, true] {
            for piece in [1, 100, 5000, 1 << 20] {
                let data = body(20_000);
                let mut sim = Sim::new(3, 4096, piece);
                sim.lazy = piece == 100;
                let r1 = sim.receiver(3);
                let s = sim.sender(3, &data, chunked);
                sim.run(&[]);
                assert!(sim.text(s).contains("receiver") || sim.text(s).contains("1 here"));
                let r2 = sim.receiver(3);
                let r3 = sim.receiver(3);
                sim.run(&[]);
                for r in [r1, r2, r3] {
                    assert_eq!(sim.body_of(r), data, "chunked={chunked} piece={piece}");
                    assert!(sim.clients[r].closed);
                }
                assert_eq!(sim.summary().outcome, Outcome::Complete);
                let out = sim.text(s);
                assert!(
                    out.contains("[INFO] done: 20000 bytes to 3 of 3 receivers"),
                    "{out}"
                );
                assert!(out.ends_with("0\r\n\r\n"), "{out}");
            }
        }
    }

    #[test]
    fn one_big_chunk_arriving_after_the_start_reaches_the_receiver() {
        for piece in [4096, 65536, 100_000] {
            let data = body(256 * 1024);
            let mut sim = Sim::new(1, 1 << 20, piece);
            let r = sim.receiver(1);
            let s = sim.join("PUT /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n");
            sim.run(&[]);
            let mut input = format!("{:x}\r\n", data.len()).into_bytes();
            input.extend_from_slice(&data);
            input.extend_from_slice(b"\r\n");
            sim.clients[s].input = input;
            sim.run(&[]);
            let got = &sim.clients[r].got;
            let at = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
            let (body, _) =
                crate::chunked::tests::decode_all(Framing::Chunked, &got[at..], 7).unwrap();
            assert_eq!(body.len(), data.len(), "piece {piece}");
        }
    }

    fn later(sim: &mut Sim, secs: u64) {
        sim.now += std::time::Duration::from_secs(secs);
        sim.pipe.handle_timeout(sim.now);
        sim.run(&[]);
    }

    #[test]
    fn waiting_past_the_wait_timeout_tells_everyone_and_frees_the_places() {
        let mut sim = Sim::new(3, 4096, 1000);
        let r = sim.receiver(3);
        let s = sim.sender(3, b"abc", false);
        sim.run(&[]);
        let due = sim.pipe.poll_timeout().unwrap();
        assert_eq!(due, sim.now + Config::default().heartbeat_interval);
        later(&mut sim, 30);
        assert!(sim
            .text(s)
            .contains("[INFO] still waiting: 1 of 3 receivers here"));
        later(&mut sim, Config::default().wait_timeout.as_secs() - 30);
        assert!(sim.text(r).starts_with("HTTP/1.1 408 "), "{}", sim.text(r));
        assert!(sim.text(r).contains("no transfer started within 3600 s"));
        let out = sim.text(s);
        assert!(
            out.contains("[ERROR] no transfer started within 3600 s"),
            "{out}"
        );
        assert!(!out.ends_with("0\r\n\r\n"), "the sender's response is cut");
        let left: Vec<_> = sim
            .events
            .iter()
            .filter(|e| matches!(e, Event::Left(_)))
            .collect();
        assert_eq!(left.len(), 2);
        assert!(sim.clients[r].shut && sim.clients[s].shut);
    }

    #[test]
    fn a_receiver_that_stops_reading_is_dropped_at_the_idle_timeout() {
        let data = body(50_000);
        let mut sim = Sim::new(2, 4096, 1000);
        let (r1, r2) = (sim.receiver(2), sim.receiver(2));
        let s = sim.sender(2, &data, false);
        sim.run(&[r2]);
        assert!(sim.pipe.poll_timeout().is_some());
        later(&mut sim, 300);
        assert_eq!(sim.body_of(r1), data);
        let out = sim.text(s);
        assert!(
            out.contains("[INFO] dropped 1 receiver(s) that read nothing for 300 s"),
            "{out}"
        );
        assert!(
            out.ends_with("[ERROR] 1 of 2 receivers got every byte\n\r\n"),
            "{out}"
        );
    }

    #[test]
    fn a_sender_that_stops_sending_is_cut_at_the_idle_timeout() {
        let mut sim = Sim::new(1, 4096, 1000);
        let r = sim.receiver(1);
        let s = sim.sender(1, &body(10_000), true);
        sim.clients[s].input.truncate(3_000);
        sim.run(&[]);
        later(&mut sim, 299);
        assert!(!sim.clients[r].closed);
        later(&mut sim, 1);
        assert!(sim.clients[r].closed);
        assert!(!sim.clients[r].got.ends_with(b"0\r\n\r\n"));
        assert!(sim
            .text(s)
            .contains("[ERROR] the sender sent nothing for 300 s"));
        assert_eq!(sim.summary().outcome, Outcome::Stalled);
    }

    #[test]
    fn shutdown_lets_waiting_parties_go_and_aborts_running_transfers_after_the_grace() {
        let mut waiting = Sim::new(2, 4096, 1000);
        let r = waiting.receiver(2);
        waiting.pipe.handle_shutdown(waiting.now);
        waiting.run(&[]);
        assert!(waiting.text(r).starts_with("HTTP/1.1 503 "));

        let mut running = Sim::new(1, 4096, 1000);
        let r = running.receiver(1);
        let s = running.sender(1, &body(100_000), false);
        running.run(&[r]);
        running.pipe.handle_shutdown(running.now);
        running.run(&[r]);
        assert!(!running.clients[r].closed, "a running transfer goes on");
        running.pipe.handle_abort(running.now);
        running.run(&[]);
        assert!(running.clients[r].closed);
        assert!(running
            .text(s)
            .ends_with("[ERROR] 0 of 1 receivers got every byte\n\r\n"));
        assert_eq!(running.summary().outcome, Outcome::Shutdown);
    }

    #[test]
    fn no_byte_moves_before_all_receivers_are_there() {
        let mut sim = Sim::new(2, 4096, 1000);
        let s = sim.sender(2, b"hello", false);
        let r1 = sim.receiver(2);
        sim.run(&[]);
        assert_eq!(sim.clients[s].sent, 0);
        assert!(sim.clients[r1].got.is_empty());
        assert!(sim.events.is_empty());
        let r2 = sim.receiver(2);
        sim.run(&[]);
        assert_eq!(sim.body_of(r1), b"hello");
        assert_eq!(sim.body_of(r2), b"hello");
    }

    #[test]
    fn a_slow_receiver_holds_the_sender_to_one_buffer() {
        let data = body(100_000);
        let mut sim = Sim::new(2, 4096, 1 << 20);
        let r1 = sim.receiver(2);
        let r2 = sim.receiver(2);
        sim.sender(2, &data, false);
        sim.run(&[r2]);
        let head = sim.clients[r1]
            .got
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap()
            + 4;
        assert_eq!(
            sim.clients[r1].got.len() - head,
            4096,
            "fast receiver stops one buffer ahead"
        );
        sim.run(&[]);
        assert_eq!(sim.body_of(r1), data);
        assert_eq!(sim.body_of(r2), data);
    }

    #[test]
    fn a_lost_receiver_does_not_stop_the_others_and_the_sender_is_told() {
        let data = body(50_000);
        let mut sim = Sim::new(3, 4096, 3000);
        let rs = [sim.receiver(3), sim.receiver(3), sim.receiver(3)];
        let s = sim.sender(3, &data, true);
        sim.run(&[rs[1]]);
        sim.pipe.handle_error(rs[1], sim.now);
        sim.run(&[]);
        assert_eq!(sim.body_of(rs[0]), data);
        assert_eq!(sim.body_of(rs[2]), data);
        let out = sim.text(s);
        assert!(
            out.ends_with("[ERROR] 2 of 3 receivers got every byte\n\r\n"),
            "{out}"
        );
        assert_eq!(sim.summary().outcome, Outcome::ReceiversLost);
    }

    #[test]
    fn when_every_receiver_is_gone_the_sender_is_told_at_once() {
        let mut sim = Sim::new(1, 4096, 100);
        let r = sim.receiver(1);
        let s = sim.sender(1, &body(50_000), false);
        sim.run(&[r]);
        sim.pipe.handle_error(r, sim.now);
        sim.run(&[]);
        assert!(sim
            .text(s)
            .contains("[ERROR] 0 of 1 receivers got every byte"));
        assert!(sim.clients[s].shut);
    }

    #[test]
    fn a_sender_gone_mid_body_cuts_every_receiver() {
        for chunked in [false, true] {
            let data = body(30_000);
            let mut sim = Sim::new(2, 4096, 1000);
            let rs = [sim.receiver(2), sim.receiver(2)];
            let s = sim.sender(2, &data, chunked);
            sim.clients[s].input.truncate(10_000);
            sim.clients[s].shut = true; // EOF after its bytes
            sim.run(&[]);
            for r in rs {
                assert!(sim.clients[r].closed);
                let got = &sim.clients[r].got;
                assert!(!got.ends_with(b"0\r\n\r\n"));
                let body = sim.body_of(r);
                assert!(body.len() < data.len() || body.is_empty());
            }
            assert_eq!(sim.summary().outcome, Outcome::SenderGone);
        }
    }

    #[test]
    fn a_malformed_chunk_cuts_receivers_and_tells_the_sender() {
        let mut sim = Sim::new(1, 4096, 1000);
        let r = sim.receiver(1);
        let s = sim.join(
            "PUT /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n",
        );
        sim.run(&[]);
        assert!(sim.clients[r].closed);
        assert!(!sim.clients[r].got.ends_with(b"0\r\n\r\n"));
        assert!(sim
            .text(s)
            .contains("[ERROR] malformed body: malformed chunk size"));
        assert!(matches!(sim.summary().outcome, Outcome::Malformed(_)));
    }

    #[test]
    fn empty_body_reaches_every_receiver_cleanly() {
        for chunked in [false, true] {
            let mut sim = Sim::new(2, 4096, 1000);
            let rs = [sim.receiver(2), sim.receiver(2)];
            let s = sim.sender(2, b"", chunked);
            sim.run(&[]);
            for r in rs {
                assert_eq!(sim.body_of(r), b"");
            }
            assert!(sim.text(s).contains("done: 0 bytes to 2 of 2"));
        }
    }

    #[test]
    fn http10_receiver_needs_a_length() {
        let mut sim = Sim::new(2, 4096, 1000);
        let old = sim.join("GET /x?n=2 HTTP/1.0\r\n\r\n");
        let new = sim.receiver(2);
        let s = sim.sender(2, b"data", true);
        sim.run(&[]);
        assert!(sim.text(old).starts_with("HTTP/1.1 505 "));
        assert_eq!(sim.body_of(new), b"data");
        assert!(sim
            .text(s)
            .contains("[ERROR] 1 of 2 receivers got every byte"));
    }

    #[test]
    fn receiver_head_passes_the_sender_headers() {
        let mut sim = Sim::new(1, 4096, 1000);
        let r = sim.receiver(1);
        sim.join("POST /x HTTP/1.1\r\nHost: h\r\nContent-Type: text/html\r\nX-Piping-K: v\r\nContent-Length: 2\r\n\r\nhi");
        sim.run(&[]);
        let t = sim.text(r);
        assert!(
            t.contains("Content-Type: text/plain\r\n")
                && t.contains("X-Piping-K: v\r\n")
                && t.contains("Content-Length: 2\r\n"),
            "{t}"
        );
    }

    #[test]
    fn a_waiting_receiver_that_closed_is_found_by_probing_and_frees_its_place() {
        let mut sim = Sim::new(2, 4096, 1000);
        let r = sim.receiver(2);
        sim.clients[r].shut = true; // EOF
        sim.run(&[]);
        assert!(sim.text(r).starts_with("HTTP/1.1 102 Processing\r\n\r\n"));
        let due = sim.pipe.poll_timeout().unwrap();
        assert!(due > sim.now);
        // The probe's write fails: the client is gone.
        sim.pipe.handle_error(r, sim.now);
        assert_eq!(sim.pipe.poll_event(), Some(Event::Left(Role::Receiver)));
    }

    #[test]
    fn expect_continue_is_answered_before_the_progress_response() {
        let mut sim = Sim::new(1, 4096, 1000);
        let s = sim.join(
            "PUT /x HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
        );
        sim.run(&[]);
        assert!(sim
            .text(s)
            .starts_with("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n"));
    }

    #[test]
    fn the_registry_and_the_pipe_agree_on_places() {
        let mut reg: Registry<()> = Registry::default();
        let id = reg.admit("x", Role::Receiver, 1, |_| ()).unwrap().id;
        let mut sim = Sim::new(1, 4096, 1000);
        let r = sim.receiver(1);
        sim.pipe.handle_error(r, sim.now);
        assert_eq!(sim.pipe.poll_event(), Some(Event::Left(Role::Receiver)));
        assert!(reg.leave("x", id, Role::Receiver));
    }
}
