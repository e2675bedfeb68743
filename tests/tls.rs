//! HTTPS itself, on every backend: the handshake deadline, certificate reload on SIGHUP,
//! plain HTTP and garbage on the TLS port, and the TLS counters of `/metrics`. (The whole
//! conformance suite also runs over HTTPS with `FANPIPE_TLS=1`; see `common/tls.rs`.)

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// Every test here speaks HTTPS: curl trusts the suite's CA.
fn init() {
    // Before any of the harness reads it; every test of this binary sets the same value.
    std::env::set_var("FANPIPE_TLS", "1");
    assert!(
        tls::enabled(),
        "FANPIPE_TLS must be 1 (or unset) for tests/tls.rs"
    );
}

/// A server on its own certificate files (a fresh leaf of the suite's CA), so that a test
/// may rewrite them.
fn start_with_own_cert(
    label: &str,
    extra: &[&str],
) -> (Server, std::path::PathBuf, std::path::PathBuf) {
    init();
    let pki = &tls::suite().pki;
    let name = pipe_name(label);
    let (cert, key) = pki.write(&pki.leaf(label), &name);
    let (c, k) = (cert.display().to_string(), key.display().to_string());
    let mut args = vec!["--tls-cert", &c, "--tls-key", &k];
    args.extend_from_slice(extra);
    (Server::start(&args), cert, key)
}

/// The subject CN of the certificate a new handshake gets, as curl shows it.
fn served_subject(server: &Server) -> String {
    let out = curl()
        .arg("-v")
        .arg("-o")
        .arg("/dev/null")
        .arg(server.url("/healthz"))
        .output()
        .expect("run curl");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "curl /healthz over TLS: {err}");
    err.lines()
        .find_map(|l| l.split("subject:").nth(1).map(|s| s.trim().to_owned()))
        .unwrap_or_else(|| panic!("no subject in curl's output: {err}"))
}

fn metric(server: &Server, series: &str) -> u64 {
    let reply = get(&server.url("/metrics"));
    assert_eq!(reply.status(), 200, "/metrics");
    reply
        .text()
        .lines()
        .find_map(|l| l.strip_prefix(series).map(|v| v.trim().parse().unwrap()))
        .unwrap_or_else(|| panic!("no {series} in /metrics:\n{}", reply.text()))
}

const FAILED: &str = "fanpipe_tls_handshakes_total{outcome=\"failed\"}";
const COMPLETED: &str = "fanpipe_tls_handshakes_total{outcome=\"completed\"}";
const PLAIN: &str = "fanpipe_tls_plain_http_total";

/// Reads until the server closes (`true`) or `wait` passes (`false`).
fn closed_within(stream: &mut TcpStream, wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    let mut buf = [0; 4096];
    stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    while Instant::now() < deadline {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return true,
        }
    }
    false
}

fn https_serves_a_transfer_and_shows_https_urls() {
    init();
    let server = Server::start(&[]);
    assert!(server.is_tls());
    let dir = TempDir::new("https");
    let name = pipe_name("https");
    let bytes = payload(2 * 1024 * 1024, 7);
    let r1 = Receiver::spawn(&server.pipe_url(&name, Some(2)), &dir, "r1", &[]);
    let r2 = Receiver::spawn(&server.pipe_url(&name, Some(2)), &dir, "r2", &[]);
    let mut sender = Sender::spawn(&server.pipe_url(&name, Some(2)), Upload::Stdin, &dir, &[]);
    sender.feed(bytes.clone());
    r1.finish().assert_got(&bytes);
    r2.finish().assert_got(&bytes);
    sender.finish().assert_done(bytes.len() as u64, 2);
    let page = get(&server.url("/"));
    assert!(
        page.text().contains(&format!("https://{}/", server.addr())),
        "the usage page over TLS shows https:// URLs:\n{}",
        page.text()
    );
    assert!(metric(&server, COMPLETED) >= 4);
}

fn plain_http_on_the_https_port_gets_a_clear_400() {
    init();
    let server = Server::start(&[]);
    let mut stream = TcpStream::connect(server.addr()).unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert!(answer.contains("use https://"), "{answer}");
    assert_eq!(metric(&server, PLAIN), 1);
}

fn garbage_is_closed_and_counted() {
    init();
    let server = Server::start(&[]);
    // A TLS record header, then nonsense.
    let mut stream = TcpStream::connect(server.addr()).unwrap();
    let _ = stream.write_all(b"\x16\x03\x01\x00\x10garbage garbage!");
    assert!(
        closed_within(&mut stream, Duration::from_secs(5)),
        "garbage on the TLS port left the connection open"
    );
    wait_until(
        "the failed handshake counted",
        Duration::from_secs(5),
        || metric(&server, FAILED) >= 1,
    );
    // Nothing else was hurt.
    assert_eq!(get(&server.url("/healthz")).status(), 200);
}

fn a_silent_or_slow_handshake_is_closed_at_the_head_timeout() {
    init();
    let server = Server::start(&["--head-timeout", "2"]);
    let started = Instant::now();
    let mut silent = TcpStream::connect(server.addr()).unwrap();
    let mut slow = TcpStream::connect(server.addr()).unwrap();
    // A ClientHello a byte at a time (a real one's first bytes), one every 300 ms.
    let dripping = {
        let mut slow = slow.try_clone().unwrap();
        thread::spawn(move || {
            for b in b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" {
                if slow.write_all(&[*b]).is_err() {
                    return;
                }
                thread::sleep(Duration::from_millis(300));
            }
        })
    };
    // Others are served meanwhile.
    for _ in 0..3 {
        let t = Instant::now();
        assert_eq!(get(&server.url("/healthz")).status(), 200);
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "a waiting handshake blocked others"
        );
    }
    assert!(
        closed_within(&mut silent, Duration::from_secs(8)),
        "a client that sent nothing was not closed"
    );
    assert!(
        closed_within(&mut slow, Duration::from_secs(8)),
        "a ClientHello a byte at a time was not closed"
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(8),
        "closed after {took:?}, not at the 2 s head timeout"
    );
    let _ = dripping.join();
}

fn sighup_reloads_the_certificate_and_keeps_running_transfers() {
    let (server, cert, key) = start_with_own_cert("reload-a", &[]);
    assert!(served_subject(&server).contains("reload-a"));
    // A transfer that runs across the reloads.
    let dir = TempDir::new("reload");
    let name = pipe_name("reload");
    let bytes = payload(4 * 1024 * 1024, 11);
    let receiver = Receiver::spawn(&server.pipe_url(&name, Some(1)), &dir, "r", &[]);
    let mut sender = Sender::spawn(&server.pipe_url(&name, Some(1)), Upload::Stdin, &dir, &[]);
    let mut stdin = sender.take_stdin();
    let half = bytes.len() / 2;
    stdin.write_all(&bytes[..half]).unwrap();
    stdin.flush().unwrap();
    receiver.wait_for_bytes(1);

    // A new certificate: served to new handshakes after SIGHUP.
    let pki = &tls::suite().pki;
    let b = pki.leaf("reload-b");
    std::fs::write(&cert, &b.cert_pem).unwrap();
    std::fs::write(&key, &b.key_pem).unwrap();
    hangup(&server);
    wait_until("the new certificate served", Duration::from_secs(5), || {
        served_subject(&server).contains("reload-b")
    });

    // A bad file: logged, and the last good certificate stays.
    std::fs::write(&key, "not a key\n").unwrap();
    hangup(&server);
    wait_until("the failed reload logged", Duration::from_secs(5), || {
        server.log_tail().contains("not reloaded")
    });
    assert!(served_subject(&server).contains("reload-b"));

    stdin.write_all(&bytes[half..]).unwrap();
    drop(stdin);
    receiver.finish().assert_got(&bytes);
    sender.finish().assert_done(bytes.len() as u64, 1);
}

fn hangup(server: &Server) {
    let status = Command::new("kill")
        .args(["-HUP", &server.pid().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
}

fn plain_listener_beside_https_serves_http() {
    init();
    // A free port, taken back at once for the server.
    let plain = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let server = Server::start(&["--listen-plain", &plain.to_string()]);
    assert!(server.is_tls());
    let reply = get(&format!("http://{plain}/"));
    assert_eq!(reply.status(), 200);
    assert!(
        reply.text().contains(&format!("http://{plain}/")),
        "{}",
        reply.text()
    );
    assert_eq!(get(&server.url("/healthz")).status(), 200);
}

conformance!(
    https_serves_a_transfer_and_shows_https_urls,
    plain_http_on_the_https_port_gets_a_clear_400,
    garbage_is_closed_and_counted,
    a_silent_or_slow_handshake_is_closed_at_the_head_timeout,
    sighup_reloads_the_certificate_and_keeps_running_transfers,
    plain_listener_beside_https_serves_http,
);
