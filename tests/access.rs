//! Access control: signed URLs (`--secret-file`, `fanpipe sign`), per-client limits, the
//! client's address from a PROXY protocol header or a trusted proxy's X-Forwarded-For,
//! and `--min-receiver-rate`. Every test asserts what a client sees: statuses, one-line
//! messages, bytes, the sender's lines.

mod common;

use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use fanpipe_core::request::Role;
use fanpipe_core::signed::{sign, Keys};

const NEW_KEY: &str = "new 5f1c0a1e9d2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5";
const OLD_KEY: &str = "old 00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

/// A secret file with the new key first (it signs) and the old one below (still verifies).
fn secret_file(dir: &TempDir) -> String {
    let path = dir.file("keys");
    std::fs::write(&path, format!("{NEW_KEY}\n{OLD_KEY}\n")).expect("write the secret file");
    path.to_string_lossy().into_owned()
}

/// `fanpipe sign ...`: its two lines, the sender's URL and the receivers' URL.
fn fanpipe_sign(args: &[&str]) -> (String, String) {
    let out = Command::new(server_binary())
        .arg("sign")
        .args(args)
        .output()
        .expect("run fanpipe sign");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "fanpipe sign {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "two lines on stdout: {stdout:?}");
    (lines[0].to_owned(), lines[1].to_owned())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The value of a `/metrics` series line, 0 if absent. Asked from 127.0.0.3, so that it
/// takes no share of the addresses under test.
fn metric(server: &Server, series: &str) -> u64 {
    let text = request(&["--interface", "127.0.0.3", &server.url("/metrics")]).text();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

/// A small transfer to `n` receivers with these URLs succeeds.
fn transfer(send: &str, recv: &str, n: u32, seed: u64) {
    let dir = TempDir::new("signed-transfer");
    let (file, bytes) = dir.payload_file("body", 200_000, seed);
    let receivers: Vec<_> = (0..n)
        .map(|i| Receiver::spawn(recv, &dir, &format!("r{i}"), &["--max-time", "30"]))
        .collect();
    let sender = Sender::spawn(send, Upload::File(&file), &dir, &["--max-time", "30"]);
    for r in receivers {
        r.finish().assert_got(&bytes);
    }
    sender.finish().assert_done(bytes.len() as u64, n);
}

fn signed_urls_carry_a_transfer_and_refuse_every_change() {
    let dir = TempDir::new("signed");
    let keys = secret_file(&dir);
    let server = Server::start(&["--secret-file", &keys]);
    let base = server.url("");
    let name = pipe_name("signed");
    let (send, recv) = fanpipe_sign(&[
        "--secret-file",
        &keys,
        "--url",
        &base,
        "--n",
        "2",
        "--ttl",
        "600",
        &name,
    ]);
    assert!(send.contains("kid=new"), "the first key signs: {send}");
    transfer(&send, &recv, 2, 1);

    let refused = |reply: Reply, status: u16, needle: &str, what: &str| {
        reply.assert_status_and_text(status, needle, what);
        assert_eq!(reply.text().lines().count(), 1, "{what}: one line");
    };
    let bad = "signature does not match";
    refused(get(&recv.replace(&name, "other")), 403, bad, "another name");
    refused(get(&recv.replace("n=2", "n=3")), 403, bad, "another n");
    let exp = recv
        .split("exp=")
        .nth(1)
        .unwrap()
        .split('&')
        .next()
        .unwrap();
    let later = (exp.parse::<u64>().unwrap() + 3600).to_string();
    refused(get(&recv.replace(exp, &later)), 403, bad, "a later expiry");
    refused(get(&recv[..recv.len() - 2]), 403, bad, "a cut signature");
    refused(
        send_small("PUT", &recv, "x"),
        403,
        "signed for receiving",
        "a receiver's URL used to send",
    );
    refused(
        get(&send),
        403,
        "signed for sending",
        "the sender's URL used to receive",
    );
    let bare = server.pipe_url(&name, Some(2));
    refused(get(&bare), 401, "signed URLs only", "no signature");
    refused(
        get(&recv.replace("kid=new", "kid=gone")),
        403,
        "key this server does not have",
        "an unknown key",
    );
    // `/NAME` is the same pipe as `/api/v1/pipe/NAME` and signs the same.
    let short = recv.replace("/api/v1/pipe/", "/");
    let waiting = Receiver::spawn(&short, &dir, "short", &["--max-time", "30"]);
    let sender = Sender::spawn(&send, Upload::Stdin, &dir, &["--max-time", "30"]);
    let mut sender = sender;
    sender.feed(b"short path".to_vec());
    Receiver::spawn(&recv, &dir, "second", &["--max-time", "30"])
        .finish()
        .assert_got(b"short path");
    waiting.finish().assert_got(b"short path");
    sender.finish().assert_done(10, 2);

    assert_eq!(
        metric(
            &server,
            "fanpipe_signature_rejections_total{reason=\"missing\"}"
        ),
        1
    );
    assert_eq!(
        metric(
            &server,
            "fanpipe_signature_rejections_total{reason=\"bad\"}"
        ),
        7
    );
    // The signature never reaches the log.
    let sig = recv.split("sig=").nth(1).unwrap();
    assert!(!server.log_tail().contains(sig), "{}", server.log_tail());
}

fn an_expired_url_is_410_and_a_rotated_key_still_verifies() {
    let dir = TempDir::new("signed-keys");
    let keys = secret_file(&dir);
    let server = Server::start(&["--secret-file", &keys]);
    let name = pipe_name("expired");
    let path = server.url(&format!("/api/v1/pipe/{name}?n=1"));
    let new = Keys::parse(NEW_KEY).unwrap();
    let past = unix_now() - 3600;
    let expired = format!(
        "{path}&{}",
        sign(new.signing(), Role::Receiver, &name, 1, past)
    );
    let reply = get(&expired);
    reply.assert_status_and_text(410, "expired", "a URL an hour past its exp");
    assert!(
        reply.text().contains("ask for a new one"),
        "{}",
        reply.text()
    );
    assert_eq!(
        metric(
            &server,
            "fanpipe_signature_rejections_total{reason=\"expired\"}"
        ),
        1
    );

    // A URL signed by the second line's key, the one being retired, is still valid.
    let old = Keys::parse(OLD_KEY).unwrap();
    let exp = unix_now() + 600;
    let send = format!(
        "{path}&{}",
        sign(old.signing(), Role::Sender, &name, 1, exp)
    );
    let recv = format!(
        "{path}&{}",
        sign(old.signing(), Role::Receiver, &name, 1, exp)
    );
    transfer(&send, &recv, 1, 2);
}

fn a_bad_secret_file_stops_the_server_with_one_line() {
    let dir = TempDir::new("bad-keys");
    let path = dir.file("keys");
    std::fs::write(&path, "k1 00ff\n").unwrap();
    let out = Command::new(server_binary())
        .args(["--listen", "127.0.0.1:0", "--secret-file"])
        .arg(&path)
        .output()
        .expect("run fanpipe");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("line 1: the secret has 2 bytes"),
        "{stderr}"
    );
}

/// `curl` from the loopback address `from` (127.0.0.2, ...), waiting as a receiver.
fn receiver_from(from: &str, url: &str, dir: &TempDir, label: &str) -> Receiver {
    Receiver::spawn(url, dir, label, &["--interface", from, "--max-time", "30"])
}

fn one_address_over_its_waiting_share_gets_429_while_another_is_served() {
    let server = Server::start(&["--max-waiting-per-client", "2"]);
    let dir = TempDir::new("per-client");
    let waiting: Vec<Receiver> = (0..2)
        .map(|i| {
            let url = server.pipe_url(&pipe_name(&format!("hog-{i}")), None);
            receiver_from("127.0.0.2", &url, &dir, &format!("hog-{i}"))
        })
        .collect();
    wait_until("two waiting pipes", Duration::from_secs(10), || {
        metric(&server, "fanpipe_pipes{state=\"waiting\"}") == 2
    });
    let third = server.pipe_url(&pipe_name("hog-3"), None);
    let reply = request(&["--interface", "127.0.0.2", &third]);
    reply.assert_status_and_text(429, "pipes that are still waiting", "a third waiting pipe");
    // Another address opens pipes and moves bytes meanwhile.
    let name = pipe_name("other");
    let url = server.pipe_url(&name, Some(1));
    transfer(&url, &url, 1, 3);
    assert_eq!(
        metric(
            &server,
            "fanpipe_client_limit_rejections_total{limit=\"waiting_pipes\"}"
        ),
        1
    );
    drop(waiting);
}

fn one_address_over_its_connection_share_gets_429_while_another_is_served() {
    let server = Server::start(&["--max-connections-per-client", "2"]);
    let held: Vec<Raw> = (0..2).map(|_| Raw::connect(&server)).collect();
    wait_until(
        "both held connections accepted",
        Duration::from_secs(10),
        || metric(&server, "fanpipe_connections") == 3,
    );
    let mut third = Raw::open(&server, &raw_head("GET", "/healthz", &[]));
    let head = third
        .head_within(Duration::from_secs(10))
        .expect("an answer to a third connection");
    let (body, _) = third.read_body(&head);
    assert_eq!(head.status, 429, "{:?}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("connections open"));
    let other = request(&["--interface", "127.0.0.2", &server.url("/healthz")]);
    assert_eq!(other.status(), 200, "another address is served");
    drop(held);
}

/// A waiting receiver on a new pipe, on a raw connection that starts with `prefix`.
fn waiting_pipe(server: &Server, prefix: &[u8], headers: &[&str], tag: &str) -> Raw {
    let mut bytes = prefix.to_vec();
    let path = format!("/api/v1/pipe/{}", pipe_name(tag));
    bytes.extend_from_slice(&raw_head("GET", &path, headers));
    Raw::open(server, &bytes)
}

/// The status the request got within a second, or `None` if it is still waiting.
fn status_of(raw: &mut Raw) -> Option<u16> {
    raw.head_within(Duration::from_secs(1)).map(|h| h.status)
}

fn x_forwarded_for_counts_only_from_a_trusted_proxy() {
    let trusted = Server::start(&[
        "--trusted-proxy",
        "127.0.0.1",
        "--max-waiting-per-client",
        "1",
    ]);
    let a = "X-Forwarded-For: 203.0.113.1";
    let b = "X-Forwarded-For: 203.0.113.2";
    let mut first = waiting_pipe(&trusted, b"", &[a], "xff-a1");
    assert_eq!(status_of(&mut first), None);
    let mut again = waiting_pipe(&trusted, b"", &[a], "xff-a2");
    assert_eq!(status_of(&mut again), Some(429), "client A's second pipe");
    let mut other = waiting_pipe(&trusted, b"", &[b], "xff-b1");
    assert_eq!(status_of(&mut other), None, "client B is served");

    // From a peer that is no trusted proxy, the header is the client's own word: ignored.
    let untrusted = Server::start(&[
        "--trusted-proxy",
        "10.0.0.0/8",
        "--max-waiting-per-client",
        "1",
    ]);
    let mut first = waiting_pipe(&untrusted, b"", &[a], "xff-u1");
    assert_eq!(status_of(&mut first), None);
    let mut forged = waiting_pipe(&untrusted, b"", &[b], "xff-u2");
    assert_eq!(
        status_of(&mut forged),
        Some(429),
        "a forged header changes nothing"
    );
}

/// A PROXY v2 header naming IPv4 client `src`.
fn proxy_v2(src: [u8; 4]) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0, 12]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&[127, 0, 0, 1, 0x9c, 0x40, 0x1f, 0x90]);
    h
}

fn proxy_protocol_headers_name_the_client() {
    let server = Server::start(&["--proxy-protocol", "--max-waiting-per-client", "1"]);
    let v1 = |ip: &str| format!("PROXY TCP4 {ip} 127.0.0.1 40000 8080\r\n").into_bytes();
    let mut first = waiting_pipe(&server, &v1("198.51.100.1"), &[], "pp-a1");
    assert_eq!(status_of(&mut first), None);
    let mut again = waiting_pipe(&server, &proxy_v2([198, 51, 100, 1]), &[], "pp-a2");
    assert_eq!(
        status_of(&mut again),
        Some(429),
        "the same client through v2"
    );
    let mut other = waiting_pipe(&server, &proxy_v2([198, 51, 100, 2]), &[], "pp-b1");
    assert_eq!(status_of(&mut other), None, "another client is served");
    let mut other_v1 = waiting_pipe(&server, &v1("198.51.100.3"), &[], "pp-c1");
    assert_eq!(status_of(&mut other_v1), None, "and one more through v1");

    // Without a header, a connection is refused with a reason.
    let mut direct = Raw::open(&server, &raw_head("GET", "/healthz", &[]));
    let head = direct
        .head_within(Duration::from_secs(10))
        .expect("an answer to a connection with no PROXY header");
    let (body, _) = direct.read_body(&head);
    assert_eq!(head.status, 400);
    assert!(String::from_utf8_lossy(&body).contains("PROXY protocol header"));
    let mut health = Raw::open(
        &server,
        &[v1("198.51.100.9"), raw_head("GET", "/healthz", &[])].concat(),
    );
    assert_eq!(status_of(&mut health), Some(200));
}

fn a_trickling_receiver_is_dropped_and_the_others_finish() {
    let server = Server::start(&[
        "--min-receiver-rate",
        "200000",
        "--min-rate-window",
        "2",
        "--buffer-size",
        "65536",
    ]);
    let dir = TempDir::new("trickle");
    // Larger than what the kernel's socket buffers hold for the slow one.
    let (file, bytes) = dir.payload_file("body", 32 * 1024 * 1024, 4);
    let url = server.pipe_url(&pipe_name("trickle"), Some(2));
    let fast = Receiver::spawn(&url, &dir, "fast", &["--max-time", "60"]);
    let mut slow = Receiver::spawn(
        &url,
        &dir,
        "slow",
        &["--limit-rate", "20k", "--max-time", "60"],
    );
    let sender = Sender::spawn(&url, Upload::File(&file), &dir, &["--max-time", "60"]);
    fast.finish().assert_got(&bytes);
    let sent = sender.finish();
    assert!(
        sent.lines
            .iter()
            .any(|l| l.contains("dropped 1 receiver(s) slower than 200000 bytes/s over 2 s")),
        "{:?}",
        sent.lines
    );
    sent.assert_failed(1, 2);
    // What the kernel had buffered for it still trickles in; the rest never will.
    assert!(
        slow.received() < bytes.len() as u64 / 2,
        "{}",
        slow.received()
    );
    slow.kill();
}

conformance!(
    signed_urls_carry_a_transfer_and_refuse_every_change,
    an_expired_url_is_410_and_a_rotated_key_still_verifies,
    a_bad_secret_file_stops_the_server_with_one_line,
    one_address_over_its_waiting_share_gets_429_while_another_is_served,
    one_address_over_its_connection_share_gets_429_while_another_is_served,
    x_forwarded_for_counts_only_from_a_trusted_proxy,
    proxy_protocol_headers_name_the_client,
    a_trickling_receiver_is_dropped_and_the_others_finish,
);
