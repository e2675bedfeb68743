//! Transfers that must succeed: every receiver gets exactly the sender's bytes, with the
//! sender's headers, whatever the order of arrival, the framing or the pipe's URL form.

mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::*;

const MIB: usize = 1024 * 1024;

/// Spawns `count` curl receivers of `url`, labelled `tag-0`, `tag-1`, ...
fn spawn_receivers(
    url: &str,
    dir: &TempDir,
    tag: &str,
    count: u32,
    extra: &[&str],
) -> Vec<Receiver> {
    (0..count)
        .map(|i| Receiver::spawn(url, dir, &format!("{tag}-{i}"), extra))
        .collect()
}

/// Waits for every receiver and checks each got exactly `expected`; returns what they got.
fn assert_all_got(receivers: Vec<Receiver>, expected: &[u8]) -> Vec<Received> {
    receivers
        .into_iter()
        .map(|receiver| {
            let received = receiver.finish();
            received.assert_got(expected);
            received
        })
        .collect()
}

/// `n` receivers (started first) and a `curl -T -` sender fed `len` bytes from its stdin.
fn fan_out_from_stdin(n: u32, len: usize, seed: u64) {
    let server = Server::start(&[]);
    let dir = TempDir::new("fan-out");
    let bytes = payload(len, seed);
    let url = server.pipe_url(&pipe_name("fan-out"), Some(n));
    let receivers = spawn_receivers(&url, &dir, "receiver", n, &[]);
    let mut sender = Sender::spawn(&url, Upload::Stdin, &dir, &[]);
    sender.feed(bytes.clone());
    assert_all_got(receivers, &bytes);
    sender.finish().assert_done(len as u64, n);
}

fn one_receiver_gets_every_byte() {
    fan_out_from_stdin(1, 3 * MIB + 123, 1);
}

fn three_receivers_get_every_byte() {
    fan_out_from_stdin(3, 4 * MIB + 7, 2);
}

fn a_hundred_receivers_get_every_byte() {
    fan_out_from_stdin(100, 2 * MIB + 5, 3);
}

fn post_data_binary_is_delivered_with_its_length() {
    let server = Server::start(&[]);
    let dir = TempDir::new("data-binary");
    let (path, bytes) = dir.payload_file("payload", 3 * MIB + 1, 4);
    let url = server.pipe_url(&pipe_name("data-binary"), Some(3));
    let receivers = spawn_receivers(&url, &dir, "receiver", 3, &[]);
    let sender = Sender::spawn(&url, Upload::DataBinary(&path), &dir, &[]);
    for received in assert_all_got(receivers, &bytes) {
        assert_eq!(
            received.head().content_length(),
            Some(bytes.len() as u64),
            "{}: Content-Length of a sized upload",
            received.label
        );
    }
    sender.finish().assert_done(bytes.len() as u64, 3);
}

fn put_file_is_delivered_with_its_length() {
    let server = Server::start(&[]);
    let dir = TempDir::new("put-file");
    let (path, bytes) = dir.payload_file("payload", 2 * MIB + 333, 5);
    let url = server.pipe_url(&pipe_name("put-file"), Some(2));
    let receivers = spawn_receivers(&url, &dir, "receiver", 2, &[]);
    let sender = Sender::spawn(&url, Upload::File(&path), &dir, &[]);
    for received in assert_all_got(receivers, &bytes) {
        assert_eq!(
            received.head().content_length(),
            Some(bytes.len() as u64),
            "{}: Content-Length of a sized upload",
            received.label
        );
    }
    sender.finish().assert_done(bytes.len() as u64, 2);
}

fn receivers_after_the_sender() {
    let server = Server::start(&[]);
    let dir = TempDir::new("after");
    let bytes = payload(MIB + 17, 6);
    let url = server.pipe_url(&pipe_name("after"), Some(3));
    let mut sender = Sender::spawn(&url, Upload::Stdin, &dir, &[]);
    sender.feed(bytes.clone());
    sender.wait_registered();
    let receivers = spawn_receivers(&url, &dir, "receiver", 3, &[]);
    assert_all_got(receivers, &bytes);
    sender.finish().assert_done(bytes.len() as u64, 3);
}

fn receivers_before_and_after_the_sender() {
    let server = Server::start(&[]);
    let dir = TempDir::new("around");
    let bytes = payload(MIB + 99, 7);
    let url = server.pipe_url(&pipe_name("around"), Some(4));
    let mut receivers = spawn_receivers(&url, &dir, "early", 2, &[]);
    settle();
    let mut sender = Sender::spawn(&url, Upload::Stdin, &dir, &[]);
    sender.feed(bytes.clone());
    sender.wait_registered();
    receivers.extend(spawn_receivers(&url, &dir, "late", 2, &[]));
    assert_all_got(receivers, &bytes);
    sender.finish().assert_done(bytes.len() as u64, 4);
}

fn nothing_moves_before_every_receiver_is_there() {
    let server = Server::start(&[]);
    let dir = TempDir::new("not-yet");
    let name = pipe_name("not-yet");
    let bytes = payload(MIB, 9);
    let mut first = Raw::open(
        &server,
        &raw_head("GET", &format!("/api/v1/pipe/{name}?n=2"), &[]),
    );
    let url = server.pipe_url(&name, Some(2));
    let mut sender = Sender::spawn(&url, Upload::Stdin, &dir, &[]);
    sender.feed(bytes.clone());
    sender.wait_registered();
    settle();
    assert!(
        first.no_response_yet(),
        "a receiver got bytes while the pipe still waited for its second receiver"
    );
    let second = Receiver::spawn(&url, &dir, "second", &[]);
    let (head, body) = first.read_response();
    assert_eq!(head.status, 200, "first receiver");
    assert_same_bytes("first receiver", &bytes, &body);
    second.finish().assert_got(&bytes);
    sender.finish().assert_done(bytes.len() as u64, 2);
}

fn requests_split_at_every_byte_still_work() {
    let server = Server::start(&[]);
    let path = format!("/api/v1/pipe/{}", pipe_name("bytewise"));
    let mut receiver = Raw::connect(&server);
    receiver.send_bytewise(&raw_head("GET", &path, &["Accept: */*"]));
    let mut sender = Raw::connect(&server);
    sender.send_bytewise(&raw_head(
        "PUT",
        &path,
        &["Transfer-Encoding: chunked", "Content-Type: text/plain"],
    ));
    let sender_head = sender.read_head();
    assert_eq!(sender_head.status, 200, "sender");
    let body = b"split at every byte, still one body";
    let mut upload = Vec::new();
    for piece in body.chunks(7) {
        upload.extend_from_slice(format!("{:x};ext=1\r\n", piece.len()).as_bytes());
        upload.extend_from_slice(piece);
        upload.extend_from_slice(b"\r\n");
    }
    upload.extend_from_slice(b"0\r\nX-Trailer: t\r\n\r\n");
    sender.send_bytewise(&upload);
    let (head, got) = receiver.read_response();
    assert_eq!(head.status, 200, "receiver");
    assert_same_bytes("receiver", body, &got);
    let (lines, end) = sender.read_body(&sender_head);
    assert!(end.complete, "sender's response cut: {end:?}");
    let lines = String::from_utf8_lossy(&lines).into_owned();
    assert_eq!(
        parse_done(lines.lines().last().unwrap_or_default()),
        Some((body.len() as u64, 1, 1)),
        "sender's summary: {lines:?}"
    );
}

fn bare_and_prefixed_paths_name_one_pipe() {
    let server = Server::start(&[]);
    let dir = TempDir::new("paths");
    let name = pipe_name("paths");
    // (sender's path, receiver's path): each pair must meet on one pipe.
    let pairs = [
        (format!("/{name}"), format!("/api/v1/pipe/{name}")),
        (format!("/api/v1/pipe/{name}-b"), format!("/{name}-b")),
        (
            format!("/{name}/several/segments"),
            format!("/api/v1/pipe/{name}/several/segments"),
        ),
        (
            format!("/api/v1/pipe/{name}%20pct%2Fenc"),
            format!("/{name}%20pct%2Fenc"),
        ),
        (format!("/{name}-q?n=1"), format!("/{name}-q")),
    ];
    for (i, (send_path, receive_path)) in pairs.iter().enumerate() {
        let bytes = payload(100_000 + i, 8 + i as u64);
        let receiver = Receiver::spawn(&server.url(receive_path), &dir, &format!("pair-{i}"), &[]);
        let mut sender = Sender::spawn(&server.url(send_path), Upload::Stdin, &dir, &[]);
        sender.feed(bytes.clone());
        receiver.finish().assert_got(&bytes);
        sender.finish().assert_done(bytes.len() as u64, 1);
    }
}

fn reserved_names_are_pipes_under_the_api_prefix() {
    let server = Server::start(&[]);
    let dir = TempDir::new("reserved-pipes");
    for name in ["help", "version", "healthz", "robots.txt"] {
        let bytes = payload(5000, 20);
        let url = server.url(&format!("/api/v1/pipe/{name}"));
        let receiver = Receiver::spawn(&url, &dir, name, &[]);
        let mut sender = Sender::spawn(&url, Upload::Stdin, &dir, &[]);
        sender.feed(bytes.clone());
        receiver.finish().assert_got(&bytes);
        sender.finish().assert_done(bytes.len() as u64, 1);
    }
}

fn sender_headers_pass_through_to_receivers() {
    let server = Server::start(&[]);
    let dir = TempDir::new("headers");
    let (path, bytes) = dir.payload_file("page.html", 12_345, 21);
    let url = server.pipe_url(&pipe_name("headers"), Some(2));
    let receivers = spawn_receivers(&url, &dir, "receiver", 2, &[]);
    let sender = Sender::spawn(
        &url,
        Upload::File(&path),
        &dir,
        &[
            "-H",
            "Content-Type: text/html; charset=iso-8859-1",
            "-H",
            "Content-Disposition: attachment; filename=\"page.html\"",
            "-H",
            "X-Piping-Foo: bar baz",
            "-H",
            "X-Piping-Other: 42",
        ],
    );
    for received in assert_all_got(receivers, &bytes) {
        let head = received.head();
        let label = &received.label;
        let expect = [
            ("content-type", "text/plain; charset=iso-8859-1"),
            ("content-disposition", "attachment; filename=\"page.html\""),
            ("x-piping-foo", "bar baz"),
            ("x-piping-other", "42"),
            ("access-control-allow-origin", "*"),
            ("cache-control", "no-store"),
            ("x-content-type-options", "nosniff"),
            ("x-robots-tag", "none"),
        ];
        for (name, value) in expect {
            assert_eq!(head.header(name), Some(value), "{label}: header {name}");
        }
        assert_eq!(
            head.content_length(),
            Some(bytes.len() as u64),
            "{label}: Content-Length"
        );
        for exposed in ["content-disposition", "x-piping-foo", "x-piping-other"] {
            assert!(
                head.lists("access-control-expose-headers", exposed),
                "{label}: Access-Control-Expose-Headers should name {exposed}: {:?}",
                head.header("access-control-expose-headers")
            );
        }
    }
    sender.finish().assert_done(bytes.len() as u64, 2);
}

fn defaults_without_content_type_or_length() {
    let server = Server::start(&[]);
    let dir = TempDir::new("defaults");
    let bytes = payload(300_000, 22);
    let url = server.pipe_url(&pipe_name("defaults"), None);
    let receiver = Receiver::spawn(&url, &dir, "receiver", &[]);
    let mut sender = Sender::spawn(&url, Upload::Stdin, &dir, &[]);
    sender.feed(bytes.clone());
    let received = receiver.finish();
    received.assert_got(&bytes);
    let head = received.head();
    assert_eq!(
        head.header("content-type"),
        Some("application/octet-stream"),
        "default Content-Type"
    );
    assert!(
        head.is_chunked(),
        "a body of unknown length goes out chunked"
    );
    assert_eq!(
        head.content_length(),
        None,
        "no Content-Length when unknown"
    );
    assert_eq!(head.header("content-disposition"), None);
    assert_eq!(head.header("cache-control"), Some("no-store"));
    sender.finish().assert_done(bytes.len() as u64, 1);
}

fn empty_body_is_delivered_as_empty() {
    let server = Server::start(&[]);
    let dir = TempDir::new("empty");
    let (empty_file, _) = dir.payload_file("empty", 0, 0);
    // A sized empty PUT (Content-Length: 0), a sized empty POST, a chunked empty PUT.
    for (i, upload) in [
        Upload::File(&empty_file),
        Upload::DataBinary(&empty_file),
        Upload::Stdin,
    ]
    .into_iter()
    .enumerate()
    {
        let url = server.pipe_url(&pipe_name("empty"), Some(2));
        let receivers = spawn_receivers(&url, &dir, &format!("empty-{i}"), 2, &[]);
        let chunked = matches!(upload, Upload::Stdin);
        let mut sender = Sender::spawn(&url, upload, &dir, &[]);
        if chunked {
            drop(sender.take_stdin()); // stdin closed at once: an empty chunked body
        }
        assert_all_got(receivers, &[]);
        sender.finish().assert_done(0, 2);
    }
}

fn name_is_free_right_after_a_transfer() {
    let server = Server::start(&[]);
    let dir = TempDir::new("reuse");
    let url = server.pipe_url(&pipe_name("reuse"), Some(2));
    for round in 0..4u64 {
        let bytes = payload(200_000 + round as usize, 30 + round);
        let receivers = spawn_receivers(&url, &dir, &format!("round-{round}"), 2, &[]);
        let mut sender = Sender::spawn(&url, Upload::Stdin, &dir, &[]);
        sender.feed(bytes.clone());
        // The sender's curl ends when the transfer has ended: the next round starts at once.
        sender.finish().assert_done(bytes.len() as u64, 2);
        assert_all_got(receivers, &bytes);
    }
}

fn forty_pipes_in_parallel() {
    let server = Server::start(&[]);
    let dir = TempDir::new("forty");
    let transfers: Vec<_> = (0..40u64)
        .map(|i| {
            let (path, bytes) =
                dir.payload_file(&format!("payload-{i}"), 256 * 1024 + i as usize, 100 + i);
            let url = server.pipe_url(&pipe_name(&format!("forty-{i}")), Some(2));
            let receivers = spawn_receivers(&url, &dir, &format!("pipe-{i}"), 2, &[]);
            let sender = Sender::spawn(&url, Upload::File(&path), &dir, &[]);
            (receivers, sender, bytes)
        })
        .collect();
    for (receivers, sender, bytes) in transfers {
        assert_all_got(receivers, &bytes);
        sender.finish().assert_done(bytes.len() as u64, 2);
    }
}

fn waiting_receiver_that_disconnects_frees_its_place() {
    let server = Server::start(&[]);
    let path = format!("/api/v1/pipe/{}?n=2", pipe_name("leaver"));
    let leaver = Raw::open(&server, &raw_head("GET", &path, &[]));
    settle();
    // Gone as a Ctrl-C'd curl goes: a FIN, which looks like a half-close until the server
    // probes the socket, so its place may be freed a moment later.
    drop(leaver);
    let mut stayer = Raw::open(&server, &raw_head("GET", &path, &[]));
    // Admitted before the joiner asks: two requests in flight at once may be admitted in
    // either order, and the stayer must not be the one told the pipe is full.
    assert_waiting(&mut stayer, "the stayer");
    let mut joiner = attach_when_a_place_is_free(&server, &path);
    let bytes = payload(500_000, 40);
    let dir = TempDir::new("leaver");
    let mut receivers = [("stayer", &mut stayer), ("joiner", &mut joiner)];
    send_to_waiting(&server.url(&path), &dir, &bytes, &mut receivers);
}

/// A raw receiver of `path` that got a place: retried while the pipe answers `409` (all its
/// places taken), for up to 20 s. A newcomer with no answer within 2 s is waiting in it.
fn attach_when_a_place_is_free(server: &Server, path: &str) -> Raw {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut receiver = Raw::open(server, &raw_head("GET", path, &[]));
        match receiver.head_within(Duration::from_secs(2)) {
            None => return receiver,
            Some(head) if head.status == 409 && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(100));
            }
            Some(head) => panic!(
                "a receiver on a pipe with a free place got {} (a place is never freed?)",
                head.status
            ),
        }
    }
}

fn expect_100_continue_is_answered_before_the_response() {
    let server = Server::start(&[]);
    let dir = TempDir::new("expect");
    let name = pipe_name("expect");
    let body = b"hello, expecting world";
    let mut sender = Raw::open(
        &server,
        &raw_head(
            "PUT",
            &format!("/api/v1/pipe/{name}"),
            &[
                &format!("Content-Length: {}", body.len()),
                "Expect: 100-continue",
            ],
        ),
    );
    // No receiver yet: the 100 comes at once and alone; the streamed 200 once the body
    // starts (so no proxy reads the two together).
    let first = sender.read_any_head();
    assert_eq!(first.status, 100, "first answer to Expect: 100-continue");
    sender.send(body);
    let response = sender.read_any_head();
    assert_eq!(
        response.status, 200,
        "the sender's response starts with its body"
    );
    assert_eq!(
        response.header("content-type"),
        Some("text/plain; charset=utf-8")
    );
    let receiver = Receiver::spawn(&server.pipe_url(&name, None), &dir, "receiver", &[]);
    receiver.finish().assert_got(body);
    let (lines, end) = sender.read_body(&response);
    assert!(end.complete, "sender's response should end cleanly");
    let lines = String::from_utf8_lossy(&lines).into_owned();
    let last = lines.lines().last().unwrap_or_default();
    assert_eq!(
        parse_done(last),
        Some((body.len() as u64, 1, 1)),
        "sender's summary: {lines:?}"
    );
}

fn curl_upload_over_one_mib_gets_100_continue() {
    let server = Server::start(&[]);
    let dir = TempDir::new("expect-curl");
    let (path, bytes) = dir.payload_file("payload", 2 * MIB, 41);
    let url = server.pipe_url(&pipe_name("expect-curl"), None);
    let receiver = Receiver::spawn(&url, &dir, "receiver", &[]);
    // curl sends `Expect: 100-continue` for an upload over 1 MiB; -v shows the answer.
    let sender = Sender::spawn(&url, Upload::File(&path), &dir, &["-v"]);
    receiver.finish().assert_got(&bytes);
    let sent = sender.finish();
    sent.assert_done(bytes.len() as u64, 1);
    assert!(
        sent.stderr.contains("Expect: 100-continue"),
        "curl should have sent Expect (its verbose log):\n{}",
        sent.stderr
    );
    assert!(
        sent.stderr.contains("< HTTP/1.1 100 Continue"),
        "curl should have got 100 Continue:\n{}",
        sent.stderr
    );
    assert!(
        !sent.stderr.contains("Done waiting for 100-continue"),
        "curl waited out its expect timeout:\n{}",
        sent.stderr
    );
}

fn http10_receiver_of_a_sized_body_gets_it() {
    let server = Server::start(&[]);
    let dir = TempDir::new("http10");
    let (path, bytes) = dir.payload_file("payload", 700_000, 42);
    let url = server.pipe_url(&pipe_name("http10"), Some(2));
    let old = Receiver::spawn(&url, &dir, "http10", &["-0"]);
    let new = Receiver::spawn(&url, &dir, "http11", &[]);
    let sender = Sender::spawn(&url, Upload::File(&path), &dir, &[]);
    let old = old.finish();
    old.assert_got(&bytes);
    assert_eq!(old.head().content_length(), Some(bytes.len() as u64));
    new.finish().assert_got(&bytes);
    sender.finish().assert_done(bytes.len() as u64, 2);
}

fn half_closed_receiver_gets_the_whole_stream() {
    let server = Server::start(&[]);
    let dir = TempDir::new("half-close");
    let name = pipe_name("half-close");
    let bytes = payload(3 * MIB, 43);
    let mut receiver = Raw::open(
        &server,
        &raw_head("GET", &format!("/api/v1/pipe/{name}"), &[]),
    );
    receiver.shutdown_write();
    settle();
    let mut sender = Sender::spawn(&server.pipe_url(&name, None), Upload::Stdin, &dir, &[]);
    sender.feed(bytes.clone());
    let head = receiver.read_head();
    assert_eq!(head.status, 200, "half-closed receiver's status");
    let (body, end) = receiver.read_body(&head);
    assert!(end.complete, "half-closed receiver's body cut: {end:?}");
    assert_same_bytes("half-closed receiver", &bytes, &body);
    sender.finish().assert_done(bytes.len() as u64, 1);
}

/// `report=end`: the sender's curl prints nothing until the transfer is over, then the
/// whole report under a 200, so `curl -fsS` exits 0 only when every receiver got it all.
fn report_end_answers_the_sender_when_the_transfer_is_over() {
    let server = Server::start(&[]);
    let dir = TempDir::new("report-end");
    let (file, bytes) = dir.payload_file("body", 3 << 20, 80);
    let name = pipe_name("report-end");
    let url = format!("{}&report=end", server.pipe_url(&name, Some(2)));
    let first = Receiver::spawn(&url, &dir, "r1", &[]);
    let mut sender = Sender::spawn(&url, Upload::File(&file), &dir, &["-fsS"]);
    settle();
    assert!(
        sender.lines_so_far().is_empty(),
        "a report=end sender got lines before the end"
    );
    let second = Receiver::spawn(&url, &dir, "r2", &[]);
    first.finish().assert_got(&bytes);
    second.finish().assert_got(&bytes);
    let sent = sender.finish();
    sent.assert_done(bytes.len() as u64, 2);
    assert!(
        sent.lines[0].starts_with("[INFO] waiting for 2 receiver(s), "),
        "the whole report comes at the end: {:?}",
        sent.lines
    );
}

/// A waiting sender's curl killed (its socket closed by the kernel): the name is free for
/// the next sender within a moment, not at the next heartbeat (20 s), although the server
/// never reads a waiting sender.
fn killed_waiting_sender_frees_its_name_at_once() {
    let server = Server::start(&[]);
    let dir = TempDir::new("killed-sender");
    let (file, bytes) = dir.payload_file("body", 100, 83);
    let url = server.pipe_url(&pipe_name("killed-sender"), None);
    let mut first = Sender::spawn(&url, Upload::File(&file), &dir, &["-fsS"]);
    first.wait_registered();
    first.kill();
    drop(first.finish());
    thread::sleep(Duration::from_millis(300));
    let mut second = Sender::spawn(&url, Upload::File(&file), &dir, &["-fsS"]);
    assert_eq!(
        second.next_line(),
        "[INFO] waiting for 1 receiver(s), 0 here",
        "the second sender, 0.3 s after the first was killed"
    );
    let receiver = Receiver::spawn(&url, &dir, "receiver", &[]);
    receiver.finish().assert_got(&bytes);
    second.finish().assert_done(bytes.len() as u64, 1);
}

/// A waiting receiver's curl killed and run again 0.3 s later gets its place back.
fn killed_waiting_receiver_retried_gets_its_place() {
    let server = Server::start(&[]);
    let dir = TempDir::new("killed-receiver");
    let url = server.pipe_url(&pipe_name("killed-receiver"), None);
    let mut first = Receiver::spawn(&url, &dir, "first", &[]);
    settle();
    first.kill();
    drop(first.finish());
    thread::sleep(Duration::from_millis(300));
    let second = Receiver::spawn(&url, &dir, "second", &[]);
    settle();
    let (file, bytes) = dir.payload_file("body", 5000, 84);
    let sender = Sender::spawn(&url, Upload::File(&file), &dir, &["-fsS"]);
    second.finish().assert_got(&bytes);
    sender.finish().assert_done(bytes.len() as u64, 1);
}

/// A waiting receiver's curl killed and its request sent again at once, as a user or a
/// script retries after Ctrl-C: the old one's end reached the server just before, and its
/// probe has not told yet whether it has gone or only half-closed (a retry within those
/// few milliseconds used to get 409). The retry is held until it has, then takes its
/// place and gets every byte. The retry is a raw client, which comes within a millisecond
/// of the kill; a second curl comes at once too, after its own start.
fn killed_waiting_receiver_retried_at_once_gets_its_place() {
    let server = Server::start(&[]);
    let dir = TempDir::new("retried-receiver");
    let name = pipe_name("retried-receiver");
    let url = server.pipe_url(&name, Some(2));
    let path = format!("/api/v1/pipe/{name}?n=2");
    let mut first = Receiver::spawn(&url, &dir, "first", &[]);
    let mut other = Receiver::spawn(&url, &dir, "other", &[]);
    settle();
    first.kill();
    drop(first.finish());
    let mut retry = Raw::open(&server, &raw_head("GET", &path, &[]));
    other.kill();
    drop(other.finish());
    let second = Receiver::spawn(&url, &dir, "second", &[]);
    assert_waiting(&mut retry, "the raw retry, sent at once after the kill");
    let (file, bytes) = dir.payload_file("body", 200_000, 86);
    let sender = Sender::spawn(&url, Upload::File(&file), &dir, &["-fsS"]);
    let head = retry.read_head();
    assert_eq!(head.status, 200, "the raw retry's status");
    let (body, end) = retry.read_body(&head);
    assert!(end.complete, "the raw retry's body was cut: {end:?}");
    assert_same_bytes("the raw retry", &bytes, &body);
    second.finish().assert_got(&bytes);
    sender.finish().assert_done(bytes.len() as u64, 2);
}

/// A waiting sender's curl killed and run again at once: its FIN is not seen until the
/// server looks (a waiting sender is not read), and the newcomer makes it look at once;
/// the retry is held until the old one is found gone, then is the sender.
fn killed_waiting_sender_retried_at_once_is_the_sender() {
    let server = Server::start(&[]);
    let dir = TempDir::new("retried-sender");
    let (file, bytes) = dir.payload_file("body", 200_000, 87);
    let url = server.pipe_url(&pipe_name("retried-sender"), None);
    let mut first = Sender::spawn(&url, Upload::File(&file), &dir, &["-fsS"]);
    first.wait_registered();
    first.kill();
    drop(first.finish());
    let mut second = Sender::spawn(&url, Upload::File(&file), &dir, &["-fsS"]);
    let line = second.next_line();
    assert_eq!(
        line, "[INFO] waiting for 1 receiver(s), 0 here",
        "the second sender, run at once after the first was killed"
    );
    let receiver = Receiver::spawn(&url, &dir, "receiver", &[]);
    receiver.finish().assert_got(&bytes);
    second.finish().assert_done(bytes.len() as u64, 1);
}

conformance! {
    one_receiver_gets_every_byte,
    three_receivers_get_every_byte,
    a_hundred_receivers_get_every_byte,
    post_data_binary_is_delivered_with_its_length,
    put_file_is_delivered_with_its_length,
    receivers_after_the_sender,
    receivers_before_and_after_the_sender,
    nothing_moves_before_every_receiver_is_there,
    requests_split_at_every_byte_still_work,
    bare_and_prefixed_paths_name_one_pipe,
    reserved_names_are_pipes_under_the_api_prefix,
    sender_headers_pass_through_to_receivers,
    defaults_without_content_type_or_length,
    empty_body_is_delivered_as_empty,
    name_is_free_right_after_a_transfer,
    forty_pipes_in_parallel,
    waiting_receiver_that_disconnects_frees_its_place,
    expect_100_continue_is_answered_before_the_response,
    curl_upload_over_one_mib_gets_100_continue,
    http10_receiver_of_a_sized_body_gets_it,
    half_closed_receiver_gets_the_whole_stream,
    report_end_answers_the_sender_when_the_transfer_is_over,
    killed_waiting_sender_frees_its_name_at_once,
    killed_waiting_receiver_retried_gets_its_place,
    killed_waiting_receiver_retried_at_once_gets_its_place,
    killed_waiting_sender_retried_at_once_is_the_sender,
}
