//! Nothing is lost silently: killed senders and receivers, an HTTP/1.0 receiver that cannot
//! be served, slow and stalled receivers, and the server's memory while they lag.

mod common;

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const MIB: usize = 1024 * 1024;
/// The server's peak resident memory must stay under this, whatever the body or the lag.
const MEMORY_BOUND_KIB: u64 = 64 * 1024;

fn assert_memory_bounded(server: &Server, what: &str) {
    let hwm = server.proc_status_kib("VmHWM");
    assert!(
        hwm < MEMORY_BOUND_KIB,
        "{what}: server peak RSS (VmHWM) {hwm} KiB, bound {MEMORY_BOUND_KIB} KiB"
    );
}

fn sender_killed_mid_body_cuts_every_receiver() {
    let server = Server::start(&[]);
    let dir = TempDir::new("sender-killed");
    let bytes = payload(4 * MIB, 60);
    let url = server.pipe_url(&pipe_name("sender-killed"), Some(3));
    let receivers: Vec<_> = (0..3)
        .map(|i| Receiver::spawn(&url, &dir, &format!("r{i}"), &[]))
        .collect();
    let mut sender = Sender::spawn(&url, Upload::Stdin, &dir, &[]);
    // Part of the body goes in; curl's stdin stays open, so the body never ends by itself.
    let mut stdin = sender.take_stdin();
    let part = bytes[..2 * MIB].to_vec();
    let writer = thread::spawn(move || {
        let _ = stdin.write_all(&part);
        stdin
    });
    for receiver in &receivers {
        receiver.wait_for_bytes(1);
    }
    sender.kill();
    for receiver in receivers {
        receiver.finish().assert_cut(&bytes);
    }
    drop(sender.finish());
    drop(writer.join());
}

fn sender_gone_short_of_its_content_length_cuts_every_receiver() {
    let server = Server::start(&[]);
    let dir = TempDir::new("sender-short");
    let bytes = payload(MIB, 61);
    let path = format!("/api/v1/pipe/{}?n=2", pipe_name("sender-short"));
    let mut raw_receiver = Raw::open(&server, &raw_head("GET", &path, &[]));
    let curl_receiver = Receiver::spawn(&server.url(&path), &dir, "curl", &[]);
    let mut sender = Raw::open(
        &server,
        &raw_head("PUT", &path, &[&format!("Content-Length: {}", bytes.len())]),
    );
    sender.send(&bytes[..300_000]);
    let head = raw_receiver.read_head();
    assert_eq!(head.status, 200, "raw receiver");
    assert_eq!(head.content_length(), Some(bytes.len() as u64));
    raw_receiver
        .fill_to(1)
        .expect("the first body bytes reach the receiver");
    drop(sender);
    let (body, end) = raw_receiver.read_body(&head);
    assert!(
        !end.complete,
        "raw receiver saw a whole body of {} bytes",
        body.len()
    );
    assert_ne!(
        end.end,
        Some(End::TimedOut),
        "the raw receiver's connection was left open after the sender left"
    );
    assert!(
        bytes.starts_with(&body),
        "the raw receiver's bytes are not a prefix of the payload"
    );
    curl_receiver.finish().assert_cut(&bytes);
}

fn receiver_killed_mid_body_the_others_get_every_byte() {
    let server = Server::start(&[]);
    let dir = TempDir::new("receiver-killed");
    let bytes = payload(32 * MIB, 62);
    let url = server.pipe_url(&pipe_name("receiver-killed"), Some(3));
    let healthy: Vec<_> = (0..2)
        .map(|i| Receiver::spawn(&url, &dir, &format!("r{i}"), &[]))
        .collect();
    // Slow, so the transfer is far from its end when it is killed.
    let mut doomed = Receiver::spawn(&url, &dir, "doomed", &["--limit-rate", "200K"]);
    let mut sender = Sender::spawn(&url, Upload::Stdin, &dir, &[]);
    sender.feed(bytes.clone());
    doomed.wait_for_bytes(1);
    doomed.kill();
    drop(doomed.finish());
    for receiver in healthy {
        receiver.finish().assert_got(&bytes);
    }
    sender.finish().assert_failed(2, 3);
}

fn all_receivers_gone_the_sender_is_told_at_once() {
    // Raw both ends: the upload keeps coming in one endless chunk, and the only receiver
    // reads a little, then closes on unread data (a reset, as a crashed client's socket).
    let server = Server::start(&[]);
    let path = format!("/api/v1/pipe/{}", pipe_name("all-gone"));
    let mut receiver = Raw::open(&server, &raw_head("GET", &path, &[]));
    let mut sender = Raw::open(
        &server,
        &raw_head("PUT", &path, &["Transfer-Encoding: chunked"]),
    );
    let head = sender.read_head();
    assert_eq!(head.status, 200, "sender");
    const CHUNK: u64 = 1 << 30;
    sender.send(format!("{CHUNK:x}\r\n").as_bytes());
    let upload = generate_into(sender.stream_clone(), CHUNK, 63, Arc::default());
    assert_eq!(receiver.read_head().status, 200, "receiver");
    receiver.fill_to(64 * 1024).expect("the body flows");
    drop(receiver);

    let (lines, end) = sender.read_body(&head);
    assert_ne!(
        end.end,
        Some(End::TimedOut),
        "the sender's connection was left open after its only receiver left"
    );
    assert!(!end.complete, "the sender's response should be cut");
    let lines = String::from_utf8_lossy(&lines).into_owned();
    assert_eq!(
        lines.lines().last(),
        Some("[ERROR] 0 of 1 receivers got every byte"),
        "the sender's last line: {lines:?}"
    );
    // (How much more of the upload the server drains while it lingers before closing is
    // its business: curl_sender_fails_when_its_only_receiver_dies checks curl stops.)
    drop(sender);
    upload.join().unwrap();
}

fn curl_sender_fails_when_its_only_receiver_dies() {
    let server = Server::start(&[]);
    let dir = TempDir::new("only-receiver-dies");
    let url = server.pipe_url(&pipe_name("only-receiver-dies"), None);
    let mut receiver = Receiver::spawn(&url, &dir, "receiver", &["--limit-rate", "200K"]);
    let mut sender = Sender::spawn(&url, Upload::Stdin, &dir, &[]);
    // A long body that keeps flowing (as from `tar c | curl -T -`) when the receiver dies.
    const TOTAL: u64 = 1 << 30;
    let progress = Arc::new(AtomicU64::new(0));
    let generator = generate_into(sender.take_stdin(), TOTAL, 67, Arc::clone(&progress));
    receiver.wait_for_bytes(1);
    receiver.kill();
    drop(receiver.finish());
    let sent = sender.finish();
    assert_cut_code("sender", sent.code, &sent.stderr);
    generator.join().unwrap();
    let pushed = progress.load(Ordering::SeqCst);
    assert!(
        pushed < TOTAL / 2,
        "the upload went on to {pushed} of {TOTAL} bytes with no receiver left"
    );
}

fn http10_receiver_of_a_chunked_sender_gets_505() {
    let server = Server::start(&[]);
    let dir = TempDir::new("http10-chunked");
    let bytes = payload(500_000, 64);
    let url = server.pipe_url(&pipe_name("http10-chunked"), Some(2));
    let old = Receiver::spawn(&url, &dir, "http10", &["-0"]);
    let new = Receiver::spawn(&url, &dir, "http11", &[]);
    let mut sender = Sender::spawn(&url, Upload::Stdin, &dir, &[]);
    sender.feed(bytes.clone());
    let old = old.finish();
    assert_eq!(
        old.head().status,
        505,
        "HTTP/1.0 receiver of a body without Content-Length"
    );
    assert!(
        !old.body.starts_with(&bytes[..1000]),
        "the 505 must not carry the payload"
    );
    new.finish().assert_got(&bytes);
    sender.finish().assert_failed(1, 2);
}

fn slow_receiver_gets_every_byte_and_memory_stays_bounded() {
    let server = Server::start(&[]);
    let dir = TempDir::new("slow");
    let (path, bytes) = dir.payload_file("payload", 16 * MIB, 65);
    let url = server.pipe_url(&pipe_name("slow"), Some(3));
    let receivers = vec![
        Receiver::spawn(&url, &dir, "fast-0", &[]),
        Receiver::spawn(&url, &dir, "fast-1", &[]),
        Receiver::spawn(&url, &dir, "slow", &["--limit-rate", "2M"]),
    ];
    let sender = Sender::spawn(&url, Upload::File(&path), &dir, &[]);
    for receiver in receivers {
        receiver.finish().assert_got(&bytes);
    }
    sender.finish().assert_done(bytes.len() as u64, 3);
    assert_memory_bounded(&server, "16 MiB to a slow receiver");
}

fn stalled_receiver_holds_back_the_sender_and_memory_stays_bounded() {
    const TOTAL: u64 = 200 * MIB as u64;
    const SEED: u64 = 66;
    let server = Server::start(&[]);
    let dir = TempDir::new("stalled");
    let name = pipe_name("stalled");
    let url = server.pipe_url(&name, Some(3));
    let mut stalled = Raw::open(
        &server,
        &raw_head("GET", &format!("/api/v1/pipe/{name}?n=3"), &[]),
    );
    let fast: Vec<_> = (0..2)
        .map(|_| StreamReceiver::spawn(&url, SEED, &[]))
        .collect();
    let mut sender = Sender::spawn(&url, Upload::Stdin, &dir, &[]);
    let progress = Arc::new(AtomicU64::new(0));
    let generator = generate_into(sender.take_stdin(), TOTAL, SEED, Arc::clone(&progress));

    // The stalled receiver reads its head, then nothing, until the sender is held back:
    // its upload stops advancing.
    let head = stalled.read_head();
    assert_eq!(head.status, 200, "stalled receiver");
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut last = u64::MAX;
    let mut still = 0;
    while still < 4 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(250));
        let now = progress.load(Ordering::SeqCst);
        still = if now == last { still + 1 } else { 0 };
        last = now;
    }
    let pushed = progress.load(Ordering::SeqCst);
    assert!(
        pushed < TOTAL / 2,
        "with one receiver stalled, the sender pushed {pushed} of {TOTAL} bytes: it is not held back"
    );
    assert_memory_bounded(&server, "while a receiver is stalled");

    // The stalled receiver reads again: everyone gets every byte.
    let mut verifier = Verifier::new(SEED);
    let end = stalled.read_body_with(&head, &mut |b| verifier.feed(b));
    assert!(end.complete, "stalled receiver's body cut: {end:?}");
    verifier.assert_whole("stalled receiver", TOTAL);
    for (i, receiver) in fast.into_iter().enumerate() {
        let (code, verifier) = receiver.finish();
        assert_eq!(code, 0, "fast receiver {i}: curl exit code");
        verifier.assert_whole(&format!("fast receiver {i}"), TOTAL);
    }
    sender.finish().assert_done(TOTAL, 3);
    generator.join().unwrap();
    assert_memory_bounded(&server, "after 200 MiB");
}

/// `report=end` and a receiver lost: the held response comes with 502, so `curl -fsS`
/// fails (22), and plain curl fails too, since the response is cut (56).
fn report_end_sender_gets_502_when_a_receiver_is_lost() {
    for flags in [&["-fsS"][..], &["-sS"][..]] {
        let server = Server::start(&[]);
        let dir = TempDir::new("report-end-lost");
        let url = format!(
            "{}?report=end",
            server.url(&format!("/{}", pipe_name("report-end-lost")))
        );
        let mut receiver = Receiver::spawn(&url, &dir, "receiver", &["--limit-rate", "200K"]);
        let mut sender = Sender::spawn(&url, Upload::Stdin, &dir, flags);
        let generator = generate_into(sender.take_stdin(), 1 << 30, 81, Arc::default());
        receiver.wait_for_bytes(1);
        receiver.kill();
        drop(receiver.finish());
        let sent = sender.finish();
        assert_cut_code("sender", sent.code, &sent.stderr);
        if flags[0] == "-fsS" {
            assert_eq!(sent.code, 22, "curl -f on a 502: {}", sent.stderr);
            assert!(sent.stderr.contains("502"), "{}", sent.stderr);
        } else {
            assert_eq!(
                sent.lines.last().map(String::as_str),
                Some("[ERROR] 0 of 1 receivers got every byte"),
                "{:?}",
                sent.lines
            );
        }
        generator.join().unwrap();
    }
}

/// A waiting sender hears from the server every `--heartbeat` seconds.
fn heartbeat_lines_come_at_the_chosen_interval() {
    let server = Server::start(&["--heartbeat", "1"]);
    let dir = TempDir::new("heartbeat");
    let url = server.pipe_url(&pipe_name("heartbeat"), Some(2));
    let (file, _) = dir.payload_file("body", 10, 82);
    let mut sender = Sender::spawn(&url, Upload::File(&file), &dir, &[]);
    assert_eq!(
        sender.next_line(),
        "[INFO] waiting for 2 receiver(s), 0 here"
    );
    let started = Instant::now();
    assert_eq!(
        sender.next_line(),
        "[INFO] still waiting: 0 of 2 receivers here"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    sender.kill();
}

conformance! {
    sender_killed_mid_body_cuts_every_receiver,
    sender_gone_short_of_its_content_length_cuts_every_receiver,
    receiver_killed_mid_body_the_others_get_every_byte,
    all_receivers_gone_the_sender_is_told_at_once,
    curl_sender_fails_when_its_only_receiver_dies,
    http10_receiver_of_a_chunked_sender_gets_505,
    slow_receiver_gets_every_byte_and_memory_stays_bounded,
    stalled_receiver_holds_back_the_sender_and_memory_stays_bounded,
    report_end_sender_gets_502_when_a_receiver_is_lost,
    heartbeat_lines_come_at_the_chosen_interval,
}
