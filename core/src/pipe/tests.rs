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
        let (body, _) = crate::chunked::tests::decode_all(Framing::Chunked, &got[at..], 7).unwrap();
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
            let at = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
            if chunked {
                // Between chunks, the cut is a line no parser takes for a chunk size.
                assert!(got.ends_with(response::CUT));
                assert!(
                    crate::chunked::tests::decode_all(Framing::Chunked, &got[at..], 7).is_err()
                );
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
    let s =
        sim.join("PUT /x HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n");
    sim.run(&[]);
    // On its own: a proxy must not read it together with the head. The head follows the
    // first body byte, the proof that the go-ahead went through.
    assert_eq!(sim.text(s), "HTTP/1.1 100 Continue\r\n\r\n");
    assert_eq!(sim.pipe.poll_timeout(), Some(sim.now + CONTINUE_HOLD));
    sim.clients[s].input = b"x".to_vec();
    sim.run(&[]);
    assert!(sim
        .text(s)
        .starts_with("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n"));
    // The byte read early is the body's first: the receiver gets it.
    let r = sim.receiver(1);
    sim.run(&[]);
    assert_eq!(sim.body_of(r), b"x");
}

#[test]
fn a_sender_silent_after_its_go_ahead_gets_its_head_after_a_while() {
    let mut sim = Sim::new(1, 4096, 1000);
    let s =
        sim.join("PUT /x HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n");
    sim.run(&[]);
    assert_eq!(sim.text(s), "HTTP/1.1 100 Continue\r\n\r\n");
    sim.now += CONTINUE_HOLD;
    sim.pipe.handle_timeout(sim.now);
    sim.run(&[]);
    assert!(sim.text(s).contains("HTTP/1.1 200 OK\r\n"));
}

#[test]
fn a_held_sender_that_closes_before_its_body_frees_its_place() {
    let mut sim = Sim::new(1, 4096, 1000);
    let s =
        sim.join("PUT /x HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 9\r\n\r\n");
    sim.run(&[]);
    sim.clients[s].shut = true; // its EOF, no body
    sim.run(&[]);
    assert!(sim.clients[s].closed);
    assert_eq!(sim.events.front(), Some(&Event::Left(Role::Sender)));
}

#[test]
fn no_go_ahead_for_a_sender_whose_body_came_with_its_head() {
    let (req, role) = request(
        "PUT /x HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc",
    );
    assert_eq!(req.leftover, b"abc");
    let mut pipe = Pipe::new("x", 1, &Config::default());
    let s = pipe.join(req, role, Instant::now());
    let out: Vec<u8> = pipe
        .write_slices(s)
        .iter()
        .flat_map(|b| b.to_vec())
        .collect();
    assert!(out.starts_with(b"HTTP/1.1 200 OK\r\n"));
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
    sim.clients[s].input = body(50_000);
    sim.run(&[r]);
    assert_eq!(sim.text(s), "HTTP/1.1 100 Continue\r\n\r\n");
    sim.pipe.handle_error(r, sim.now);
    sim.run(&[]);
    let out = sim.text(s);
    assert!(
        out.starts_with("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 502 Bad Gateway\r\n"),
        "{out}"
    );
    assert!(out.ends_with("[ERROR] 0 of 1 receivers got every byte\n\r\n"));
}

#[test]
fn the_server_default_report_applies_when_the_sender_does_not_say() {
    let config = Config {
        sender_report: Report::End,
        ..Config::default()
    };
    let mut pipe = Pipe::new("x", 1, &config);
    let (req, role) = request("PUT /x HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\n");
    let s = pipe.join(req, role, Instant::now());
    assert_eq!(pipe.write_slices(s).total(), 0);
    let (req, role) =
        request("PUT /y?report=live HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\n");
    let mut pipe = Pipe::new("y", 1, &config);
    let s = pipe.join(req, role, Instant::now());
    assert!(pipe.write_slices(s).total() > 0);
}

// ---------------------------------------------------------------------------------------
// Forms (`?form`) and watchers (`?progress`, `?status`)

fn form_body(boundary: &str, file: &[u8]) -> Vec<u8> {
    let mut b = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"r\u{e9}sum\u{e9}.pdf\"\r\nContent-Type: application/pdf\r\n\r\n"
    )
    .into_bytes();
    b.extend_from_slice(file);
    b.extend_from_slice(
        format!("\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"text\"\r\n\r\nnot this\r\n--{boundary}--\r\n").as_bytes(),
    );
    b
}

fn form_sender(sim: &mut Sim, n: usize, body: &[u8], chunked: bool) -> PartyId {
    let ct = "Content-Type: multipart/form-data; boundary=b0UND";
    let mut raw = if chunked {
        format!(
            "POST /x?n={n}&form HTTP/1.1\r\nHost: h\r\n{ct}\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        .into_bytes()
    } else {
        format!(
            "POST /x?n={n}&form HTTP/1.1\r\nHost: h\r\n{ct}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes()
    };
    if chunked {
        raw.extend_from_slice(&crate::chunked::encode(body, &[1000, 3]));
    } else {
        raw.extend_from_slice(body);
    }
    sim.join(raw)
}

#[test]
fn a_form_senders_receivers_get_only_the_file_part_with_its_type_and_name() {
    let mut file = body(30_000);
    file.extend_from_slice(b"\r\n--b0UN\r\n--b0UNDX"[..14].as_ref());
    for chunked in [false, true] {
        for piece in [1, 7, 100, 5000, 1 << 20] {
            let mut sim = Sim::new(2, 4096, piece);
            let r1 = sim.receiver(2);
            let s = form_sender(&mut sim, 2, &form_body("b0UND", &file), chunked);
            let r2 = sim.receiver(2);
            sim.run(&[]);
            for r in [r1, r2] {
                let text = sim.text(r);
                assert!(
                    text.contains("Content-Type: application/pdf\r\n"),
                    "{piece}"
                );
                assert!(text.contains(
                    "Content-Disposition: attachment; filename=\"r_sum_.pdf\"; filename*=UTF-8''r%C3%A9sum%C3%A9.pdf\r\n"
                ));
                assert_eq!(sim.body_of(r), file, "chunked={chunked} piece={piece}");
            }
            assert_eq!(sim.summary().outcome, Outcome::Complete);
            assert_eq!(sim.summary().bytes, file.len() as u64);
            assert!(sim.text(s).contains("[INFO] done"));
        }
    }
}

#[test]
fn a_truncated_form_cuts_every_receiver() {
    let full = form_body("b0UND", &body(10_000));
    let mut sim = Sim::new(1, 4096, 999);
    let r = sim.receiver(1);
    let raw = format!(
        "POST /x?form HTTP/1.1\r\nHost: h\r\nContent-Type: multipart/form-data; boundary=b0UND\r\nContent-Length: {}\r\n\r\n",
        full.len() - 30
    );
    let mut raw = raw.into_bytes();
    raw.extend_from_slice(&full[..full.len() - 30]);
    sim.join(raw);
    sim.run(&[]);
    assert!(matches!(
        sim.summary().outcome,
        Outcome::Malformed(crate::chunked::BodyError::Form(_))
    ));
    assert!(sim.clients[r].closed);
    assert!(!sim.text(r).ends_with("0\r\n\r\n"));
}

/// Everything a watcher has to write now, written.
fn drain_watcher(sim: &mut Sim, w: usize) -> String {
    let mut got = Vec::new();
    loop {
        let out = sim.pipe.watcher_output(w).to_vec();
        if out.is_empty() {
            break;
        }
        got.extend_from_slice(&out);
        sim.pipe.handle_watcher_wrote(w, out.len());
    }
    String::from_utf8(got).unwrap()
}

fn watcher(sim: &mut Sim, query: &str) -> usize {
    let now = sim.now;
    let raw = format!("GET /x?{query} HTTP/1.1\r\nHost: h\r\n\r\n");
    let mut c = Conn::with_bytes(&Config::default(), raw.as_bytes(), now);
    assert_eq!(c.poll_action(), Action::Pipe);
    sim.pipe.watch(c.take_pipe_request().unwrap(), now)
}

#[test]
fn a_watcher_sees_waiting_then_sending_then_done_and_takes_no_place() {
    let data = body(200_000);
    let mut sim = Sim::new(2, 4096, 1000);
    let s = sim.sender(2, &data, false);
    let w = watcher(&mut sim, "progress");
    let first = drain_watcher(&mut sim, w);
    assert!(first.starts_with("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream"));
    assert!(first.contains(
        "event: state\ndata: {\"state\":\"waiting\",\"n\":2,\"receivers\":0,\"sender\":true}\n\n"
    ));
    sim.receiver(2);
    assert!(drain_watcher(&mut sim, w).contains("\"receivers\":1,"));
    let r = sim.receiver(2);
    assert!(drain_watcher(&mut sim, w).contains("\"state\":\"sending\""));
    // Time passes mid-transfer: a progress event.
    sim.clients[s].input.truncate(100_000);
    sim.run(&[]);
    sim.now += PROGRESS_INTERVAL_FOR_TESTS;
    sim.pipe.handle_timeout(sim.now);
    let mid = drain_watcher(&mut sim, w);
    assert!(mid.contains("event: progress\ndata: {\"bytes\":"), "{mid}");
    assert!(mid.contains("\"total\":200000"), "{mid}");
    sim.clients[s].input = data.clone();
    sim.run(&[]);
    assert_eq!(sim.body_of(r), data);
    let end = drain_watcher(&mut sim, w);
    assert!(
        end.contains(
            "event: done\ndata: {\"outcome\":\"complete\",\"bytes\":200000,\"complete\":2,\"n\":2,"
        ),
        "{end}"
    );
    assert!(sim.pipe.take_watcher_shutdown(w));
    assert!(sim.pipe.watcher_is_closed(w));
    assert_eq!(sim.summary().complete, 2);
}

const PROGRESS_INTERVAL_FOR_TESTS: Duration = watch::PROGRESS_INTERVAL;

#[test]
fn watchers_are_bounded_and_a_slow_one_holds_nothing_back() {
    let data = body(300_000);
    let mut sim = Sim::new(1, 4096, 700);
    let r = sim.receiver(1);
    let slow = watcher(&mut sim, "progress");
    for _ in 1..watch::MAX_WATCHERS {
        watcher(&mut sim, "progress");
    }
    let extra = watcher(&mut sim, "progress");
    assert!(drain_watcher(&mut sim, extra).starts_with("HTTP/1.1 503 "));
    let status = watcher(&mut sim, "status");
    let snapshot = drain_watcher(&mut sim, status);
    assert!(snapshot.contains("Content-Type: application/json"));
    assert!(snapshot.ends_with("{\"state\":{\"state\":\"waiting\",\"n\":1,\"receivers\":1,\"sender\":false},\"progress\":null,\"watchers\":16}\n"), "{snapshot}");
    sim.sender(1, &data, true);
    // The slow watcher writes nothing while time passes and the transfer runs.
    for _ in 0..50 {
        sim.run(&[]);
        sim.now += PROGRESS_INTERVAL_FOR_TESTS;
        sim.pipe.handle_timeout(sim.now);
    }
    assert_eq!(sim.body_of(r), data);
    assert_eq!(sim.summary().outcome, Outcome::Complete);
    assert!(sim.pipe.watcher_output(slow).len() < 2048);
}

#[test]
fn a_pipe_whose_sender_gave_up_waiting_ends_its_watchers_streams() {
    let mut sim = Sim::new(2, 4096, 1000);
    sim.sender(2, b"abc", false);
    let w = watcher(&mut sim, "progress");
    drain_watcher(&mut sim, w);
    // Nobody comes: the sender is told and closed; the watcher learns the pipe is gone.
    sim.now += Config::default().wait_timeout;
    sim.pipe.handle_timeout(sim.now);
    sim.run(&[]);
    let last = drain_watcher(&mut sim, w);
    assert!(
        last.ends_with("event: state\ndata: {\"state\":\"none\"}\n\n"),
        "{last}"
    );
    assert!(sim.pipe.take_watcher_shutdown(w));
    assert!(sim.pipe.is_idle());
}
