//! One pipe's task (`PipeTask`) driven on in-memory sockets and a virtual clock: the
//! bytes each party gets, the sender's progress lines and summary, the timeouts and the
//! probing, as a backend runs them.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use fanpipe_core::chunked::{BodyDecoder, BodyError};
use fanpipe_core::conn::{Action, Conn, PipeRequest};
use fanpipe_core::hub::{Phase, PipeParams};
use fanpipe_core::metrics::Connections;
use fanpipe_core::pipe::{Event, Outcome, PeerState, Summary, CONTINUE_HOLD, REPROBE};
use fanpipe_core::request::{Framing, Report, Role};
use fanpipe_core::{response, Config};
use fanpipe_driver::{Msg, PipeTask, ServerState, Socket, Timer};

/// A scripted client: the bytes it will send, and what it got back.
struct Client {
    input: Vec<u8>,
    sent: usize,
    got: Vec<u8>,
    /// Its socket was dropped by the task.
    closed: bool,
    /// The task shut down its write side.
    shut: bool,
    /// It half-closed after its input (it also does once the server shut down).
    eof: bool,
    /// It reset the connection.
    dead: bool,
    /// It reads nothing now.
    stuck: bool,
    /// Response bytes it will still read.
    window: usize,
    /// Reads the task made of its socket.
    reads: usize,
    /// What the kernel says of its side of the connection ([`Socket::peer_state`]).
    peer: PeerState,
    /// Times the task asked for `peer`.
    checks: usize,
}

impl Client {
    /// A client that will send `input`, reads all it gets, and is there.
    fn new(input: Vec<u8>) -> Self {
        Client {
            input,
            sent: 0,
            got: Vec::new(),
            closed: false,
            shut: false,
            eof: false,
            dead: false,
            stuck: false,
            window: usize::MAX,
            reads: 0,
            peer: PeerState::Open,
            checks: 0,
        }
    }
}

/// The clients' side of the sockets, and the clock.
struct Net {
    now: Instant,
    clients: Vec<Client>,
    /// Most bytes a read or a write moves.
    piece: usize,
    /// Every other read of a socket finds no data, as between packets.
    lazy: bool,
    /// The deadline the task last asked its timer for.
    deadline: Option<Instant>,
    progress: u64,
}

struct Mem {
    net: Rc<RefCell<Net>>,
    c: usize,
}

impl Socket for Mem {
    fn poll_read(&mut self, _: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        let mut net = self.net.borrow_mut();
        let (piece, lazy) = (net.piece, net.lazy);
        let c = &mut net.clients[self.c];
        c.reads += 1;
        let ready = c.dead || c.eof || c.sent < c.input.len();
        if lazy && c.reads.is_multiple_of(2) && ready {
            // Not now: the next turn finds it.
            net.progress += 1;
            return Poll::Pending;
        }
        if c.dead {
            return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
        }
        let k = buf.len().min(piece).min(c.input.len() - c.sent);
        if k == 0 && !c.eof {
            return Poll::Pending;
        }
        buf[..k].copy_from_slice(&c.input[c.sent..c.sent + k]);
        c.sent += k;
        net.progress += 1;
        Poll::Ready(Ok(k))
    }

    fn poll_write_vectored(
        &mut self,
        _: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut net = self.net.borrow_mut();
        let piece = net.piece;
        let c = &mut net.clients[self.c];
        if c.dead {
            return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
        }
        let mut budget = piece.min(c.window);
        if c.stuck || budget == 0 {
            return Poll::Pending;
        }
        let mut wrote = 0;
        for b in bufs {
            let k = b.len().min(budget);
            c.got.extend_from_slice(&b[..k]);
            budget -= k;
            wrote += k;
        }
        c.window -= wrote;
        net.progress += 1;
        Poll::Ready(Ok(wrote))
    }

    fn shutdown_write(&mut self, _: &mut Context<'_>) {
        let mut net = self.net.borrow_mut();
        let c = &mut net.clients[self.c];
        c.shut = true;
        // The client reads the end of its response and closes its side too.
        c.eof = true;
        net.progress += 1;
    }

    fn peer_state(&self) -> PeerState {
        let mut net = self.net.borrow_mut();
        let c = &mut net.clients[self.c];
        c.checks += 1;
        let peer = c.peer;
        net.progress += 1;
        peer
    }
}

impl Drop for Mem {
    fn drop(&mut self) {
        let mut net = self.net.borrow_mut();
        net.clients[self.c].closed = true;
        net.progress += 1;
    }
}

struct Clock(Rc<RefCell<Net>>);

impl Timer for Clock {
    fn now(&self) -> Instant {
        self.0.borrow().now
    }

    fn poll_at(&mut self, _: &mut Context<'_>, at: Instant) -> Poll<()> {
        let mut net = self.0.borrow_mut();
        if at <= net.now {
            return Poll::Ready(());
        }
        net.deadline = Some(at);
        Poll::Pending
    }
}

/// A pipe's task with in-memory clients.
struct Sim {
    net: Rc<RefCell<Net>>,
    task: PipeTask<Mem, Clock>,
    mailbox: VecDeque<Msg<Mem>>,
    events: Vec<Event>,
    /// Keeps the connection counts the parties hold.
    connections: Connections,
}

fn request(raw: &[u8]) -> PipeRequest {
    let mut c = Conn::with_bytes(&Config::default(), raw, Instant::now());
    assert_eq!(
        c.poll_action(),
        Action::Pipe,
        "{}",
        String::from_utf8_lossy(raw)
    );
    c.take_pipe_request().unwrap()
}

impl Sim {
    fn new(n: usize, buffer: usize, piece: usize) -> Self {
        let config = Config {
            buffer_size: buffer,
            ..Config::default()
        };
        Sim::with_config(n, &config, piece)
    }

    fn with_config(n: usize, config: &Config, piece: usize) -> Self {
        let net = Rc::new(RefCell::new(Net {
            now: Instant::now(),
            clients: Vec::new(),
            piece,
            lazy: false,
            deadline: None,
            progress: 0,
        }));
        let params = PipeParams {
            name: "x".into(),
            n,
            id: 1,
        };
        Sim {
            task: PipeTask::new(params, config, Clock(net.clone())),
            net,
            mailbox: VecDeque::new(),
            events: Vec::new(),
            connections: Connections::default(),
        }
    }

    /// A client sends its whole request; its head goes through a `Conn` first, and the
    /// pipe gets it as admitted (the bytes after the head stay in its socket).
    fn join(&mut self, raw: impl AsRef<[u8]>) -> usize {
        let raw = raw.as_ref();
        let head_end = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        self.admit(request(&raw[..head_end]), raw[head_end..].to_vec())
    }

    /// A client whose whole request came in the reads of its head: the pipe gets its
    /// body's first bytes with the request, and its socket has no more to give.
    fn join_read(&mut self, raw: impl AsRef<[u8]>) -> usize {
        self.admit(request(raw.as_ref()), Vec::new())
    }

    /// The pipe's task gets a party as admitted; its client will still send `input`.
    fn admit(&mut self, req: PipeRequest, input: Vec<u8>) -> usize {
        let mut net = self.net.borrow_mut();
        let c = net.clients.len();
        net.clients.push(Client::new(input));
        drop(net);
        let sock = Mem {
            net: self.net.clone(),
            c,
        };
        let (open, _) = self.connections.open(usize::MAX);
        self.mailbox
            .push_back(Msg::Arrival(Box::new((sock, req, open))));
        c
    }

    fn sender(&mut self, n: usize, body: &[u8], chunked: bool) -> usize {
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
            raw.extend_from_slice(&fanpipe_core::chunked::encode(body, &[1000]));
        } else {
            raw.extend_from_slice(body);
        }
        self.join(raw)
    }

    fn receiver(&mut self, n: usize) -> usize {
        self.join(format!("GET /x?n={n} HTTP/1.1\r\nHost: h\r\n\r\n"))
    }

    /// The server's shutdown reached `phase`.
    fn phase(&mut self, phase: Phase) {
        self.mailbox.push_back(Msg::Phase(phase));
    }

    /// Drives the task until nothing moves; `stuck` clients read nothing meanwhile.
    fn run(&mut self, stuck: &[usize]) {
        for (c, client) in self.net.borrow_mut().clients.iter_mut().enumerate() {
            client.stuck = stuck.contains(&c);
        }
        let mut cx = Context::from_waker(Waker::noop());
        for _ in 0..1_000_000 {
            let before = self.net.borrow().progress + self.mailbox.len() as u64;
            // What the task asks of its timer in this turn.
            self.net.borrow_mut().deadline = None;
            let events = &mut self.events;
            let mailbox = &mut self.mailbox;
            let polled = self.task.drive(
                &mut cx,
                |_| match mailbox.pop_front() {
                    Some(msg) => Poll::Ready(Some(msg)),
                    None => Poll::Pending,
                },
                |_, _, event| {
                    events.push(event);
                    false
                },
            );
            assert!(polled.is_pending(), "the registry never lets this pipe go");
            if self.net.borrow().progress + self.mailbox.len() as u64 == before {
                return;
            }
        }
        panic!("no quiescence");
    }

    /// Time passes; what falls due is done.
    fn later(&mut self, secs: u64) {
        self.pass(Duration::from_secs(secs));
    }

    fn pass(&mut self, time: Duration) {
        self.net.borrow_mut().now += time;
        self.run(&[]);
    }

    /// The clock goes to the deadline the task last asked its timer for; what falls due
    /// is done.
    fn until_next_deadline(&mut self) {
        let due = self.deadline();
        self.net.borrow_mut().now = due;
        self.run(&[]);
    }

    fn deadline(&self) -> Instant {
        self.net.borrow().deadline.expect("a deadline")
    }

    fn now(&self) -> Instant {
        self.net.borrow().now
    }

    fn client<T>(&self, c: usize, f: impl FnOnce(&Client) -> T) -> T {
        f(&self.net.borrow().clients[c])
    }

    fn closed(&self, c: usize) -> bool {
        self.client(c, |c| c.closed)
    }

    fn body_of(&self, c: usize) -> Vec<u8> {
        self.client(c, |c| {
            let got = &c.got;
            let at = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
            let head = String::from_utf8_lossy(&got[..at]);
            if head.contains("chunked") {
                decode_chunked(&got[at..])
            } else {
                got[at..].to_vec()
            }
        })
    }

    fn text(&self, c: usize) -> String {
        self.client(c, |c| String::from_utf8_lossy(&c.got).into_owned())
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

/// The data of a whole chunked body.
fn decode_chunked(wire: &[u8]) -> Vec<u8> {
    let (out, done) = decode_chunks(wire).expect("well-formed chunks");
    assert!(done, "a cut chunked body");
    out
}

/// The data of the chunks in `wire`, and whether its last chunk is there; an error if it
/// is no chunked body (or the start of one).
fn decode_chunks(mut wire: &[u8]) -> Result<(Vec<u8>, bool), BodyError> {
    let mut d = BodyDecoder::new(Framing::Chunked);
    let mut out = Vec::new();
    while !wire.is_empty() && !d.is_done() {
        let step = d.decode(wire)?;
        out.extend_from_slice(&wire[step.data.clone()]);
        if step.consumed == 0 {
            break;
        }
        wire = &wire[step.consumed..];
    }
    Ok((out, d.is_done()))
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
            sim.net.borrow_mut().lazy = piece == 100;
            let r1 = sim.receiver(3);
            let s = sim.sender(3, &data, chunked);
            sim.run(&[]);
            assert!(sim
                .text(s)
                .contains("[INFO] waiting for 3 receiver(s), 1 here"));
            let r2 = sim.receiver(3);
            let r3 = sim.receiver(3);
            sim.run(&[]);
            for r in [r1, r2, r3] {
                assert_eq!(sim.body_of(r), data, "chunked={chunked} piece={piece}");
                assert!(sim.closed(r));
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
        sim.net.borrow_mut().clients[s].input = input;
        sim.run(&[]);
        let got = sim.client(r, |c| c.got.clone());
        let at = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let (body, _) = decode_chunks(&got[at..]).unwrap();
        assert_eq!(body.len(), data.len(), "piece {piece}");
    }
}

#[test]
fn waiting_past_the_wait_timeout_tells_everyone_and_frees_the_places() {
    let mut sim = Sim::new(3, 4096, 1000);
    let r = sim.receiver(3);
    let s = sim.sender(3, b"abc", false);
    sim.run(&[]);
    // A waiting sender is not read: its next deadline is the check of its socket.
    let due = sim.net.borrow().deadline.unwrap();
    assert_eq!(due, sim.now() + Config::default().peer_check_interval);
    sim.later(30);
    assert!(sim
        .text(s)
        .contains("[INFO] still waiting: 1 of 3 receivers here"));
    sim.later(Config::default().wait_timeout.as_secs() - 30);
    assert!(sim.text(r).starts_with("HTTP/1.1 408 "), "{}", sim.text(r));
    assert!(sim.text(r).contains("no transfer started within 3600 s"));
    let out = sim.text(s);
    assert!(
        out.contains("[ERROR] no transfer started within 3600 s"),
        "{out}"
    );
    assert!(!out.ends_with("0\r\n\r\n"), "the sender's response is cut");
    let left = sim
        .events
        .iter()
        .filter(|e| matches!(e, Event::Left(_)))
        .count();
    assert_eq!(left, 2);
    assert!(sim.client(r, |c| c.shut) && sim.client(s, |c| c.shut));
}

#[test]
fn a_receiver_that_stops_reading_is_dropped_at_the_idle_timeout() {
    let data = body(50_000);
    let mut sim = Sim::new(2, 4096, 1000);
    let (r1, r2) = (sim.receiver(2), sim.receiver(2));
    let s = sim.sender(2, &data, false);
    sim.run(&[r2]);
    assert!(sim.net.borrow().deadline.is_some());
    sim.net.borrow_mut().now += Duration::from_secs(300);
    sim.run(&[r2]);
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
    sim.net.borrow_mut().clients[s].input.truncate(3_000);
    sim.run(&[]);
    sim.later(299);
    assert!(!sim.closed(r));
    sim.later(1);
    assert!(sim.closed(r));
    assert!(!sim.client(r, |c| c.got.ends_with(b"0\r\n\r\n")));
    assert!(sim
        .text(s)
        .contains("[ERROR] the sender sent nothing for 300 s"));
    assert_eq!(sim.summary().outcome, Outcome::Stalled);
}

#[test]
fn shutdown_lets_waiting_parties_go_and_aborts_running_transfers_after_the_grace() {
    let mut waiting = Sim::new(2, 4096, 1000);
    let r = waiting.receiver(2);
    waiting.phase(Phase::Draining);
    waiting.run(&[]);
    assert!(waiting.text(r).starts_with("HTTP/1.1 503 "));

    let mut running = Sim::new(1, 4096, 1000);
    let r = running.receiver(1);
    let s = running.sender(1, &body(100_000), false);
    running.run(&[r]);
    running.phase(Phase::Draining);
    running.run(&[r]);
    assert!(!running.closed(r), "a running transfer goes on");
    running.phase(Phase::Aborting);
    running.run(&[]);
    assert!(running.closed(r));
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
    assert_eq!(sim.client(s, |c| c.sent), 0);
    assert!(sim.client(r1, |c| c.got.is_empty()));
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
    let got = sim.client(r1, |c| c.got.clone());
    let head = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert_eq!(
        got.len() - head,
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
    sim.net.borrow_mut().clients[rs[1]].dead = true;
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
    sim.net.borrow_mut().clients[r].dead = true;
    sim.run(&[]);
    assert!(sim
        .text(s)
        .contains("[ERROR] 0 of 1 receivers got every byte"));
    assert!(sim.client(s, |c| c.shut));
}

#[test]
fn a_sender_gone_mid_body_cuts_every_receiver() {
    // `caught_up`: the sender goes only once the receivers have every byte it sent, so
    // that they stand between chunks; otherwise its end is read in the same turn as its
    // last bytes, and they are cut within a chunk.
    for (chunked, caught_up) in [(false, false), (true, false), (true, true)] {
        let data = body(30_000);
        let mut sim = Sim::new(2, 4096, 1000);
        let rs = [sim.receiver(2), sim.receiver(2)];
        let s = sim.sender(2, &data, chunked);
        sim.net.borrow_mut().clients[s].input.truncate(10_000);
        if caught_up {
            sim.run(&[]);
            assert!(sim.events.iter().all(|e| *e == Event::Started));
        }
        sim.net.borrow_mut().clients[s].eof = true; // EOF after its bytes
        sim.run(&[]);
        for r in rs {
            assert!(sim.closed(r));
            assert!(!sim.client(r, |c| c.got.ends_with(b"0\r\n\r\n")));
            let got = sim.client(r, |c| c.got.clone());
            let at = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
            if chunked {
                let cut = decode_chunks(&got[at..]);
                assert!(!matches!(cut, Ok((_, true))), "a whole body");
                if caught_up {
                    // Between chunks, the cut is a line no parser takes for a chunk size.
                    assert!(got.ends_with(response::CUT));
                    assert!(cut.is_err());
                } else {
                    // Within a chunk, the close short of it shows the cut.
                    assert!(!got.ends_with(response::CUT));
                }
            } else {
                assert!(got.len() - at < data.len());
            }
        }
        assert_eq!(sim.summary().outcome, Outcome::SenderGone);
    }
}

#[test]
fn a_malformed_chunk_cuts_receivers_and_tells_the_sender() {
    let mut sim = Sim::new(1, 4096, 1000);
    let r = sim.receiver(1);
    let s = sim
        .join("PUT /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n");
    sim.run(&[]);
    assert!(sim.closed(r));
    assert!(!sim.client(r, |c| c.got.ends_with(b"0\r\n\r\n")));
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
    sim.net.borrow_mut().clients[r].eof = true;
    sim.run(&[]);
    assert!(sim.text(r).starts_with("HTTP/1.1 102 Processing\r\n\r\n"));
    // A half-close or a close? It is written to again soon: a client that has gone
    // answers the first write with a reset, and the next write fails.
    let due = sim.net.borrow().deadline.unwrap();
    assert_eq!(due, sim.now() + REPROBE);
    assert!(sim.events.is_empty());
    // The next probe's write fails: the client is gone.
    sim.net.borrow_mut().clients[r].dead = true;
    sim.later(1);
    assert_eq!(sim.events, [Event::Left(Role::Receiver)]);
    assert!(sim.closed(r));
}

#[test]
fn expect_continue_is_answered_before_the_progress_response() {
    let mut sim = Sim::new(1, 4096, 1000);
    let s =
        sim.join("PUT /x HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n");
    sim.run(&[]);
    // On its own: a proxy must not read it together with the head. The head follows the
    // first body byte, the proof that the go-ahead went through.
    assert_eq!(sim.text(s), "HTTP/1.1 100 Continue\r\n\r\n");
    sim.net.borrow_mut().clients[s].input = b"x".to_vec();
    sim.run(&[]);
    assert!(sim
        .text(s)
        .starts_with("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n"));
    // The byte read early is the body's first: the receiver gets it.
    let r = sim.receiver(1);
    sim.run(&[]);
    assert_eq!(sim.body_of(r), b"x");
}

/// Issue 17: a sender that half-closed right after its body, and reads its response
/// slowly, still gets its summary: its end of stream is not the end of the response.
#[test]
fn a_sender_that_half_closed_still_gets_its_summary() {
    let mut sim = Sim::new(1, 4096, 1000);
    let s = sim.sender(1, b"", true);
    {
        let mut net = sim.net.borrow_mut();
        net.clients[s].eof = true;
        net.clients[s].window = 300; // its head and a line, then it reads no more for now
    }
    let r = sim.receiver(1);
    sim.run(&[]);
    assert_eq!(sim.body_of(r), b"");
    assert_eq!(sim.summary().outcome, Outcome::Complete);
    sim.net.borrow_mut().clients[s].window = usize::MAX;
    sim.run(&[]);
    let out = sim.text(s);
    assert!(
        out.contains("[INFO] done: 0 bytes to 1 of 1 receivers"),
        "{out}"
    );
    assert!(out.ends_with("0\r\n\r\n"), "{out}");
}

/// A waiting party that leaves frees its place: the hub hears it from the pipe's task,
/// the name is free again, and the task ends once its sockets are closed.
#[test]
fn the_registry_and_the_pipe_agree_on_places() {
    let server: ServerState<()> = ServerState::new(Config::default());
    let raw = b"GET /x?n=1 HTTP/1.1\r\nHost: h\r\n\r\n";
    let mut params = None;
    let admitted = server
        .hub()
        .admit(&request(raw), |p| params = Some(p))
        .map(|a| a.new);
    assert_eq!(admitted, Ok(true));
    let mut sim = Sim::new(1, 4096, 1000);
    sim.task = PipeTask::new(params.unwrap(), &server.config, Clock(sim.net.clone()));
    let r = sim.receiver(1);
    sim.run(&[]);
    sim.net.borrow_mut().clients[r].dead = true;
    let mut cx = Context::from_waker(Waker::noop());
    let mut reported = Vec::new();
    let ended = sim.task.drive(
        &mut cx,
        |_| Poll::Ready(None),
        |name, id, event| {
            reported.push(event.clone());
            server.hub().handle_event(name, id, event)
        },
    );
    assert_eq!(
        reported,
        [Event::Left(Role::Receiver), Event::Closed],
        "the task says it is over, last"
    );
    assert!(ended.is_ready(), "the task ends with its last socket");
    let net = sim.net.clone();
    drop(sim);
    assert!(net.borrow().clients[r].closed);
    let again = server.hub().admit(&request(raw), |_| ()).map(|a| a.new);
    assert_eq!(
        again,
        Ok(true),
        "the name is free: a newcomer opens a new pipe"
    );
}

/// A waiting sender that gives up is told why, even if it reads that last line a few
/// seconds late: the server gives it the write timeout, not the short linger.
#[test]
fn a_sender_slow_to_read_why_it_waits_no_more_still_reads_it() {
    let mut sim = Sim::new(2, 4096, 1000);
    let s = sim.sender(2, b"abc", false);
    sim.run(&[]);
    sim.later(Config::default().wait_timeout.as_secs() - 1);
    sim.net.borrow_mut().clients[s].window = 0;
    sim.later(1);
    sim.later(5);
    assert!(!sim.closed(s), "dropped before it read its last line");
    sim.net.borrow_mut().clients[s].window = usize::MAX;
    sim.run(&[]);
    let out = sim.text(s);
    assert!(
        out.contains("[ERROR] no transfer started within 3600 s")
            && out.contains("(0 of 2 receivers came)\n"),
        "{out}"
    );
}

#[test]
fn a_sender_silent_after_its_go_ahead_gets_its_head_after_a_while() {
    let mut sim = Sim::new(1, 4096, 1000);
    let s =
        sim.join("PUT /x HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n");
    sim.run(&[]);
    assert_eq!(sim.text(s), "HTTP/1.1 100 Continue\r\n\r\n");
    sim.pass(CONTINUE_HOLD / 2);
    assert_eq!(sim.text(s), "HTTP/1.1 100 Continue\r\n\r\n");
    sim.pass(CONTINUE_HOLD / 2);
    assert!(
        sim.text(s).contains("HTTP/1.1 200 OK\r\n"),
        "{}",
        sim.text(s)
    );
}

#[test]
fn a_held_sender_that_closes_before_its_body_frees_its_place() {
    let mut sim = Sim::new(1, 4096, 1000);
    let s =
        sim.join("PUT /x HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 9\r\n\r\n");
    sim.run(&[]);
    sim.net.borrow_mut().clients[s].eof = true; // its EOF, no body
    sim.run(&[]);
    assert!(sim.closed(s));
    assert_eq!(sim.events.first(), Some(&Event::Left(Role::Sender)));
}

#[test]
fn no_go_ahead_for_a_sender_whose_body_came_with_its_head() {
    let raw = "PUT /x HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc";
    assert_eq!(request(raw.as_bytes()).leftover, b"abc");
    let mut sim = Sim::new(1, 4096, 1000);
    let s = sim.join_read(raw);
    sim.run(&[]);
    assert!(
        sim.text(s).starts_with("HTTP/1.1 200 OK\r\n"),
        "{}",
        sim.text(s)
    );
    // The bytes read with its head are its body.
    let r = sim.receiver(1);
    sim.run(&[]);
    assert_eq!(sim.body_of(r), b"abc");
}

#[test]
fn a_sender_asking_report_end_gets_its_head_only_when_the_transfer_is_over() {
    let data = body(20_000);
    let mut sim = Sim::new(2, 4096, 1000);
    let head = format!(
        "PUT /x?n=2&report=end HTTP/1.1\r\nHost: h\r\nContent-Length: {}\r\n\r\n",
        data.len()
    );
    let s = sim.join([head.as_bytes(), &data].concat());
    let r1 = sim.receiver(2);
    sim.run(&[]);
    assert_eq!(sim.text(s), "", "nothing before the end");
    let r2 = sim.receiver(2);
    sim.run(&[]);
    assert_eq!(sim.body_of(r1), data);
    assert_eq!(sim.body_of(r2), data);
    let out = sim.text(s);
    assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
    assert!(
        out.contains("[INFO] waiting for 2 receiver(s), 0 here"),
        "{out}"
    );
    assert!(
        out.contains("[INFO] done: 20000 bytes to 2 of 2 receivers"),
        "{out}"
    );
    assert!(out.ends_with("0\r\n\r\n"), "{out}");
}

#[test]
fn a_report_end_sender_whose_receiver_is_lost_gets_502_and_a_cut_response() {
    let mut sim = Sim::new(1, 4096, 1000);
    let r = sim.receiver(1);
    let s = sim.join(
        "PUT /x?report=end HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 50000\r\n\r\n",
    );
    sim.net.borrow_mut().clients[s].input = body(50_000);
    sim.run(&[r]);
    assert_eq!(sim.text(s), "HTTP/1.1 100 Continue\r\n\r\n");
    sim.net.borrow_mut().clients[r].dead = true;
    sim.run(&[]);
    let out = sim.text(s);
    assert!(
        out.starts_with("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 502 Bad Gateway\r\n"),
        "{out}"
    );
    assert!(
        out.ends_with("[ERROR] 0 of 1 receivers got every byte\n\r\n"),
        "{out}"
    );
}

#[test]
fn the_server_default_report_applies_when_the_sender_does_not_say() {
    let config = Config {
        sender_report: Report::End,
        ..Config::default()
    };
    let mut sim = Sim::with_config(1, &config, 1000);
    let s = sim.join("PUT /x HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\n");
    sim.run(&[]);
    assert_eq!(sim.text(s), "");
    let mut sim = Sim::with_config(1, &config, 1000);
    let s = sim.join("PUT /x?report=live HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\n");
    sim.run(&[]);
    assert!(
        sim.text(s).starts_with("HTTP/1.1 200 OK\r\n"),
        "{}",
        sim.text(s)
    );
}

/// A waiting sender is not read: the task asks the kernel about its socket
/// (`Socket::peer_state`) at each peer check, and a reset frees its place.
#[test]
fn a_waiting_sender_whose_connection_was_reset_frees_its_name_at_the_next_check() {
    let mut sim = Sim::new(1, 4096, 1000);
    let t0 = sim.now();
    let s = sim.sender(1, b"abc", false);
    sim.run(&[]);
    assert_eq!(sim.client(s, |c| c.checks), 0);
    sim.until_next_deadline();
    assert_eq!(sim.now() - t0, Config::default().peer_check_interval);
    assert_eq!(sim.client(s, |c| c.checks), 1, "asked once per check");
    assert!(!sim.closed(s));
    assert_eq!(
        sim.deadline(),
        sim.now() + Config::default().peer_check_interval
    );
    sim.net.borrow_mut().clients[s].peer = PeerState::Reset;
    sim.until_next_deadline();
    assert_eq!(sim.client(s, |c| c.checks), 2);
    assert_eq!(sim.events, [Event::Left(Role::Sender)]);
    assert!(sim.closed(s));
}

#[test]
fn a_waiting_sender_that_ended_its_side_is_written_to_once_and_kept_if_it_reads() {
    let mut sim = Sim::new(1, 4096, 1000);
    let s = sim.sender(1, b"abc", false);
    sim.run(&[]);
    let before = sim.text(s).len();
    sim.net.borrow_mut().clients[s].peer = PeerState::Closed;
    sim.until_next_deadline();
    assert_eq!(sim.client(s, |c| c.checks), 1);
    assert!(
        sim.text(s)[before..].contains("[INFO] still waiting: 0 of 1 receivers here"),
        "a FIN draws a write"
    );
    // A client that has gone answers that write with a reset: it is asked again soon.
    assert_eq!(sim.deadline(), sim.now() + REPROBE);
    // Half-closed but still there: the write drew no reset. No more lines for it.
    let after = sim.text(s).len();
    for _ in 0..5 {
        sim.until_next_deadline();
    }
    assert_eq!(sim.client(s, |c| c.checks), 6);
    assert_eq!(sim.text(s).len(), after);
    assert!(!sim.closed(s));
    // Its receiver comes: the transfer runs.
    let r = sim.receiver(1);
    sim.run(&[]);
    assert_eq!(sim.body_of(r), b"abc");
}

#[test]
fn a_waiting_receiver_that_closed_is_written_to_again_soon() {
    let mut sim = Sim::new(2, 4096, 1000);
    let r = sim.receiver(2);
    sim.net.borrow_mut().clients[r].eof = true;
    sim.run(&[]);
    assert_eq!(sim.text(r), "HTTP/1.1 102 Processing\r\n\r\n");
    assert_eq!(sim.deadline(), sim.now() + REPROBE);
    sim.until_next_deadline();
    assert_eq!(
        sim.text(r),
        "HTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n"
    );
    // The second write went through; the kernel is asked REPROBE later whether the
    // probes drew a reset (the verdict a held newcomer waits for).
    assert_eq!(sim.deadline(), sim.now() + REPROBE);
    assert_eq!(sim.client(r, |c| c.checks), 0);
    sim.until_next_deadline();
    assert_eq!(sim.client(r, |c| c.checks), 1);
    // Still there: it is probed at the usual pace again.
    let interval = Config::default().probe_interval;
    assert_eq!(sim.deadline(), sim.now() + interval - REPROBE);
    assert!(!sim.closed(r));
    assert!(sim.events.is_empty());
}

/// `curl -T file URL` killed while it waits and run again at once: the second sender
/// reaches the pipe (the registry sends a newcomer for a taken place), the waiting
/// sender is written a heartbeat line at once rather than at its next heartbeat (its
/// socket still looks open: the rest of its body holds its FIN back), and the reset that
/// answers the line frees the place for the second, which got nothing while held.
#[test]
fn a_sender_retried_at_once_takes_the_place_of_one_killed_while_waiting() {
    let mut sim = Sim::new(1, 4096, 1000);
    let old = sim.sender(1, b"abc", false);
    sim.run(&[]);
    let new = sim.sender(1, b"xyz", false);
    sim.run(&[]);
    assert_eq!(sim.client(old, |c| c.checks), 0);
    assert!(
        sim.text(old).contains("[INFO] still waiting"),
        "written at once"
    );
    assert_eq!(sim.text(new), "", "held: told nothing yet");
    assert!(sim.events.is_empty());
    sim.net.borrow_mut().clients[old].peer = PeerState::Reset;
    assert_eq!(sim.deadline(), sim.now() + REPROBE);
    sim.until_next_deadline();
    assert_eq!(sim.events, [Event::Left(Role::Sender)]);
    assert!(sim.closed(old));
    assert!(
        sim.text(new)
            .contains("[INFO] waiting for 1 receiver(s), 0 here"),
        "{}",
        sim.text(new)
    );
    let r = sim.receiver(1);
    sim.run(&[]);
    assert_eq!(sim.body_of(r), b"xyz");
}

/// The registry and the pipe agree on a held newcomer: the hub sends it to the pipe for
/// a place whose receiver may have gone, counts it until the pipe says, and the place is
/// the newcomer's once the old receiver's probe fails; a newcomer for a place whose
/// receiver is there gets the registry's 409 from the pipe, counted in `/metrics`.
#[test]
fn the_registry_and_the_pipe_agree_on_held_newcomers() {
    let server: ServerState<()> = ServerState::new(Config::default());
    let get = b"GET /x?n=1 HTTP/1.1\r\nHost: h\r\n\r\n";
    let mut params = None;
    let admit = |server: &ServerState<()>, params: &mut Option<PipeParams>| {
        server
            .hub()
            .admit(&request(get), |p| *params = Some(p))
            .map(|a| a.new)
    };
    assert_eq!(admit(&server, &mut params), Ok(true));
    let mut sim = Sim::new(1, 4096, 1000);
    sim.task = PipeTask::new(
        params.take().unwrap(),
        &server.config,
        Clock(sim.net.clone()),
    );
    let report = |sim: &mut Sim| {
        for event in std::mem::take(&mut sim.events) {
            server.hub().handle_event("x", 1, event);
        }
    };
    let old = sim.admit(request(get), Vec::new());
    sim.run(&[]);
    // Killed: its FIN is read and it is probed.
    sim.net.borrow_mut().clients[old].eof = true;
    sim.run(&[]);
    assert_eq!(admit(&server, &mut params), Ok(false), "sent to the pipe");
    let new = sim.admit(request(get), Vec::new());
    sim.run(&[]);
    assert_eq!(sim.text(new), "");
    // The first probe drew its reset; the second write fails.
    sim.net.borrow_mut().clients[old].dead = true;
    sim.until_next_deadline();
    assert_eq!(sim.events, [Event::Left(Role::Receiver)]);
    report(&mut sim);
    // A third receiver: its place is taken by one that is there.
    assert_eq!(admit(&server, &mut params), Ok(false));
    let third = sim.admit(request(get), Vec::new());
    sim.run(&[]);
    assert_eq!(
        sim.events,
        [Event::Refused(
            Role::Receiver,
            fanpipe_core::Reject::ReceiversFull { n: 1 }
        )]
    );
    report(&mut sim);
    assert!(sim.text(third).starts_with("HTTP/1.1 409 Conflict\r\n"));
    let metrics = server.hub().metrics_page(0);
    assert!(
        metrics.contains("fanpipe_rejections_total{status=\"409\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("fanpipe_waiting_parties 1\n"), "{metrics}");
    // The newcomer got the place: the transfer runs with it.
    let s = sim.sender(1, b"abc", false);
    sim.run(&[]);
    assert_eq!(sim.body_of(new), b"abc");
    assert!(sim
        .text(s)
        .contains("[INFO] done: 3 bytes to 1 of 1 receivers"));
}
