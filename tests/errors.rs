//! Refusals and their statuses: `n` validation, conflicts on a pipe, methods, reserved paths,
//! malformed requests (over raw TCP, since curl will not send them), `Expect`, keep-alive.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;

// ---------------------------------------------------------------------------------------
// n
// ---------------------------------------------------------------------------------------

fn invalid_n_is_400_with_the_allowed_range() {
    let server = Server::start(&[]);
    let name = pipe_name("invalid-n");
    for n in [
        "0",
        "-1",
        "abc",
        "1.5",
        "",
        "1001",
        "99999999999999999999999",
    ] {
        let url = server.url(&format!("/api/v1/pipe/{name}?n={n}"));
        get(&url).assert_status_and_text(400, "from 1 to 1000", &format!("GET n={n:?}"));
        send_small("PUT", &url, "data").assert_status_and_text(
            400,
            "from 1 to 1000",
            &format!("PUT n={n:?}"),
        );
    }
}

fn max_receivers_flag_bounds_n() {
    let server = Server::start(&["--max-receivers", "5"]);
    let name = pipe_name("max-n");
    get(&server.pipe_url(&name, Some(6))).assert_status_and_text(
        400,
        "from 1 to 5",
        "GET n=6 with --max-receivers 5",
    );
    // n=5 is accepted: the sender's streamed response starts.
    let mut sender = Raw::open(
        &server,
        &raw_head(
            "PUT",
            &format!("/api/v1/pipe/{name}?n=5"),
            &["Content-Length: 4"],
        ),
    );
    assert_eq!(
        sender.read_head().status,
        200,
        "PUT n=5 with --max-receivers 5"
    );
}

fn mismatched_receiver_is_400_and_the_pipe_goes_on() {
    let server = Server::start(&[]);
    let dir = TempDir::new("mismatch");
    let name = pipe_name("mismatch");
    let bytes = payload(400_000, 50);
    let mut sender = Sender::spawn(&server.pipe_url(&name, Some(3)), Upload::Stdin, &dir, &[]);
    sender.feed(bytes.clone());
    sender.wait_registered();
    get(&server.pipe_url(&name, Some(2))).assert_status_and_text(
        400,
        "expects n=3",
        "receiver n=2 on a pipe of n=3",
    );
    get(&server.pipe_url(&name, None)).assert_status_and_text(
        400,
        "expects n=3",
        "receiver without n (n=1) on a pipe of n=3",
    );
    let receivers: Vec<_> = (0..3)
        .map(|i| {
            Receiver::spawn(
                &server.pipe_url(&name, Some(3)),
                &dir,
                &format!("r{i}"),
                &[],
            )
        })
        .collect();
    for receiver in receivers {
        receiver.finish().assert_got(&bytes);
    }
    sender.finish().assert_done(bytes.len() as u64, 3);
}

fn mismatched_sender_is_400_and_waiting_receivers_stay() {
    let server = Server::start(&[]);
    let dir = TempDir::new("mismatch-sender");
    let name = pipe_name("mismatch-sender");
    let url = server.pipe_url(&name, Some(2));
    let receivers: Vec<_> = (0..2)
        .map(|i| Receiver::spawn(&url, &dir, &format!("r{i}"), &[]))
        .collect();
    settle();
    send_small("PUT", &server.pipe_url(&name, Some(3)), "wrong").assert_status_and_text(
        400,
        "expects n=2",
        "sender n=3 on a pipe of n=2",
    );
    let bytes = payload(300_000, 51);
    let mut sender = Sender::spawn(&url, Upload::Stdin, &dir, &[]);
    sender.feed(bytes.clone());
    for receiver in receivers {
        receiver.finish().assert_got(&bytes);
    }
    sender.finish().assert_done(bytes.len() as u64, 2);
}

// ---------------------------------------------------------------------------------------
// Conflicts
// ---------------------------------------------------------------------------------------

fn second_sender_is_409_and_the_pipe_goes_on() {
    let server = Server::start(&[]);
    let dir = TempDir::new("two-senders");
    let url = server.pipe_url(&pipe_name("two-senders"), None);
    let bytes = payload(300_000, 52);
    let mut sender = Sender::spawn(&url, Upload::Stdin, &dir, &[]);
    sender.feed(bytes.clone());
    sender.wait_registered();
    for method in ["PUT", "POST"] {
        let reply = send_small(method, &url, "intruder");
        assert_eq!(
            reply.status(),
            409,
            "second sender ({method}): {:?}",
            reply.text()
        );
        assert!(!reply.text().trim().is_empty(), "409 should say why");
    }
    let receiver = Receiver::spawn(&url, &dir, "receiver", &[]);
    receiver.finish().assert_got(&bytes);
    sender.finish().assert_done(bytes.len() as u64, 1);
}

fn receiver_beyond_n_is_409_and_the_pipe_goes_on() {
    let server = Server::start(&[]);
    let dir = TempDir::new("extra-receiver");
    let path = format!("/api/v1/pipe/{}?n=2", pipe_name("extra-receiver"));
    let mut waiting: Vec<Raw> = (0..2)
        .map(|_| Raw::open(&server, &raw_head("GET", &path, &[])))
        .collect();
    settle();
    let reply = get(&server.url(&path));
    assert_eq!(
        reply.status(),
        409,
        "third receiver of n=2: {:?}",
        reply.text()
    );
    assert!(!reply.text().trim().is_empty(), "409 should say why");
    let bytes = payload(600_000, 53);
    let [first, second] = &mut waiting[..] else {
        panic!("two waiting receivers");
    };
    let mut receivers = [
        ("waiting receiver 0", first),
        ("waiting receiver 1", second),
    ];
    send_to_waiting(&server.url(&path), &dir, &bytes, &mut receivers);
}

fn newcomer_during_a_running_transfer_is_409() {
    let server = Server::start(&[]);
    let dir = TempDir::new("running");
    let name = pipe_name("running");
    let url = server.pipe_url(&name, None);
    let mut receiver = Raw::open(
        &server,
        &raw_head("GET", &format!("/api/v1/pipe/{name}"), &[]),
    );
    let mut sender = Sender::spawn(&url, Upload::Stdin, &dir, &[]);
    let mut stdin = sender.take_stdin();
    let bytes = payload(1000, 54);
    std::io::Write::write_all(&mut stdin, &bytes).unwrap();
    let head = receiver.read_head();
    assert_eq!(head.status, 200, "receiver of the running transfer");
    // The transfer runs (the body is not finished: stdin is open).
    for (what, reply) in [
        ("GET", get(&url)),
        ("PUT", send_small("PUT", &url, "late")),
        ("GET bare path", get(&server.url(&format!("/{name}")))),
    ] {
        assert_eq!(
            reply.status(),
            409,
            "{what} on a running transfer: {:?}",
            reply.text()
        );
    }
    drop(stdin);
    let (body, end) = receiver.read_body(&head);
    assert!(end.complete, "receiver's body cut: {end:?}");
    assert_same_bytes("receiver", &bytes, &body);
    sender.finish().assert_done(bytes.len() as u64, 1);
    // Ended: the name is free again.
    let again = payload(2000, 55);
    let receiver = Receiver::spawn(&url, &dir, "next", &[]);
    let mut sender = Sender::spawn(&url, Upload::Stdin, &dir, &[]);
    sender.feed(again.clone());
    receiver.finish().assert_got(&again);
    sender.finish().assert_done(again.len() as u64, 1);
}

// ---------------------------------------------------------------------------------------
// Methods and reserved paths
// ---------------------------------------------------------------------------------------

fn other_methods_are_405_with_allow() {
    let server = Server::start(&[]);
    let url = server.pipe_url(&pipe_name("methods"), None);
    for method in ["DELETE", "PATCH", "TRACE"] {
        let reply = request(&["-X", method, &url]);
        assert_eq!(reply.status(), 405, "{method}: {:?}", reply.text());
        for allowed in ["GET", "PUT", "POST"] {
            assert!(
                reply.head.lists("allow", allowed),
                "{method}: Allow should list {allowed}: {:?}",
                reply.header("allow")
            );
        }
    }
}

fn options_is_a_cors_preflight() {
    let server = Server::start(&[]);
    let url = server.pipe_url(&pipe_name("preflight"), None);
    let reply = request(&[
        "-X",
        "OPTIONS",
        "-H",
        "Origin: https://example.com",
        "-H",
        "Access-Control-Request-Method: PUT",
        "-H",
        "Access-Control-Request-Headers: content-type, x-piping-foo",
        &url,
    ]);
    assert_eq!(reply.status(), 204, "OPTIONS: {:?}", reply.text());
    assert_eq!(reply.header("access-control-allow-origin"), Some("*"));
    for method in ["GET", "PUT", "POST"] {
        assert!(
            reply.head.lists("access-control-allow-methods", method),
            "Access-Control-Allow-Methods should list {method}: {:?}",
            reply.header("access-control-allow-methods")
        );
    }
    for header in ["content-type", "x-piping-foo"] {
        assert!(
            reply.head.lists("access-control-allow-headers", header),
            "Access-Control-Allow-Headers should allow {header}: {:?}",
            reply.header("access-control-allow-headers")
        );
    }
    assert!(
        reply.header("access-control-max-age").is_some(),
        "preflight should have a max-age"
    );
}

fn reserved_paths_answer_what_their_name_says() {
    let server = Server::start(&[]);
    for path in ["/", "/help"] {
        let reply = get(&server.url(path));
        reply.assert_status_and_text(200, "curl", path);
        assert!(
            reply
                .header("content-type")
                .is_some_and(|t| t.starts_with("text/plain")),
            "{path}: Content-Type {:?}",
            reply.header("content-type")
        );
        assert!(
            reply.text().contains(&server.addr().to_string()),
            "{path}: the usage should show this server's own URL: {:?}",
            reply.text()
        );
    }
    get(&server.url("/version")).assert_status_and_text(200, VERSION, "/version");
    for path in ["/healthz", "/robots.txt", "/metrics"] {
        let reply = get(&server.url(path));
        assert_eq!(reply.status(), 200, "{path}: {:?}", reply.text());
    }
}

fn sending_to_a_reserved_path_is_400() {
    let server = Server::start(&[]);
    for path in [
        "/",
        "/help",
        "/version",
        "/healthz",
        "/metrics",
        "/favicon.ico",
        "/robots.txt",
    ] {
        for method in ["PUT", "POST"] {
            let reply = send_small(method, &server.url(path), "data");
            assert_eq!(reply.status(), 400, "{method} {path}: {:?}", reply.text());
            assert!(!reply.text().trim().is_empty(), "{method} {path}: say why");
        }
    }
}

fn http10_request_without_host_is_served() {
    let server = Server::start(&[]);
    let tail = raw_exchange(server.addr(), b"GET /healthz HTTP/1.0\r\n\r\n");
    tail.expect_status_and_close(200)
        .unwrap_or_else(|why| panic!("GET /healthz HTTP/1.0: {why}"));
}

// ---------------------------------------------------------------------------------------
// Malformed requests
// ---------------------------------------------------------------------------------------

/// One raw request per case, each must get `status` and then see the connection closed.
fn expect_statuses(server: &Server, cases: Vec<(&str, Vec<u8>, u16)>) {
    let addr = server.addr();
    let cases = cases
        .into_iter()
        .map(|(label, bytes, status)| (label.to_string(), (addr, bytes, status)))
        .collect();
    check_all(
        cases,
        |(addr, bytes, status): (SocketAddr, Vec<u8>, u16)| {
            raw_exchange(addr, &bytes).expect_status_and_close(status)
        },
    );
    // The server survived all that.
    assert_eq!(
        get(&server.url("/healthz")).status(),
        200,
        "healthz after bad input"
    );
}

fn head_bytes(text: &str) -> Vec<u8> {
    text.as_bytes().to_vec()
}

fn malformed_heads_are_400_and_closed() {
    let server = Server::start(&[]);
    let pipe = |tag: &str| format!("/api/v1/pipe/{}", pipe_name(tag));
    let put = |tag: &str, headers: &str| {
        head_bytes(&format!(
            "PUT {} HTTP/1.1\r\nHost: h\r\n{headers}\r\n",
            pipe(tag)
        ))
    };
    let cases = vec![
        ("request line garbage", head_bytes("BROKEN\r\n\r\n"), 400),
        (
            "request line: method only",
            head_bytes("GET\r\nHost: h\r\n\r\n"),
            400,
        ),
        (
            "request line: bad method token",
            head_bytes("G@T /healthz HTTP/1.1\r\nHost: h\r\n\r\n"),
            400,
        ),
        (
            "invalid header name (space)",
            head_bytes("GET /healthz HTTP/1.1\r\nHost: h\r\nBad Name: x\r\n\r\n"),
            400,
        ),
        (
            "invalid header name (control byte)",
            head_bytes("GET /healthz HTTP/1.1\r\nHost: h\r\nBad\x01: x\r\n\r\n"),
            400,
        ),
        (
            "empty header name",
            head_bytes("GET /healthz HTTP/1.1\r\nHost: h\r\n: x\r\n\r\n"),
            400,
        ),
        (
            "obs-fold",
            head_bytes("GET /healthz HTTP/1.1\r\nHost: h\r\nX-A: a\r\n  folded\r\n\r\n"),
            400,
        ),
        (
            "missing Host",
            head_bytes("GET /healthz HTTP/1.1\r\n\r\n"),
            400,
        ),
        (
            "two Host headers",
            head_bytes("GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
            400,
        ),
        (
            "CR in a header value",
            head_bytes("GET /healthz HTTP/1.1\r\nHost: h\r\nX-A: a\rb\r\n\r\n"),
            400,
        ),
        (
            "NUL in a header value",
            head_bytes("GET /healthz HTTP/1.1\r\nHost: h\r\nX-A: a\0b\r\n\r\n"),
            400,
        ),
        (
            "Content-Length with Transfer-Encoding",
            put(
                "cl-te",
                "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
            ),
            400,
        ),
        (
            "two different Content-Lengths",
            put("cl-cl", "Content-Length: 5\r\nContent-Length: 6\r\n"),
            400,
        ),
        (
            "two equal Content-Lengths",
            put("cl-cl-same", "Content-Length: 5\r\nContent-Length: 5\r\n"),
            400,
        ),
        (
            "Content-Length +5",
            put("cl-plus", "Content-Length: +5\r\n"),
            400,
        ),
        (
            "Content-Length 0x10",
            put("cl-hex", "Content-Length: 0x10\r\n"),
            400,
        ),
        (
            "Content-Length -5",
            put("cl-neg", "Content-Length: -5\r\n"),
            400,
        ),
        (
            "Content-Length 5.0",
            put("cl-dec", "Content-Length: 5.0\r\n"),
            400,
        ),
        (
            "Transfer-Encoding on HTTP/1.0",
            head_bytes(&format!(
                "PUT {} HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
                pipe("te-10")
            )),
            400,
        ),
    ];
    expect_statuses(&server, cases);
}

fn unsupported_transfer_coding_is_501() {
    let server = Server::start(&[]);
    let cases = ["gzip", "deflate"]
        .into_iter()
        .map(|coding| {
            (
                coding,
                raw_head(
                    "PUT",
                    &format!("/api/v1/pipe/{}", pipe_name("coding")),
                    &[&format!("Transfer-Encoding: {coding}")],
                ),
                501,
            )
        })
        .collect();
    expect_statuses(&server, cases);
}

fn oversized_head_is_431_and_long_url_414() {
    let server = Server::start(&[]);
    let big = "a".repeat(100 * 1024);
    let cases = vec![
        (
            "100 KB header",
            raw_head("GET", "/healthz", &[&format!("X-Big: {big}")]),
            431,
        ),
        (
            "100 KB URL",
            raw_head("GET", &format!("/api/v1/pipe/{big}"), &[]),
            414,
        ),
    ];
    expect_statuses(&server, cases);
}

fn unknown_http_version_is_505() {
    let server = Server::start(&[]);
    let cases = ["HTTP/2.0", "HTTP/1.2", "HTTP/3.0"]
        .into_iter()
        .map(|version| {
            (
                version,
                head_bytes(&format!("GET /healthz {version}\r\nHost: h\r\n\r\n")),
                505,
            )
        })
        .collect();
    expect_statuses(&server, cases);
}

/// A chunked upload whose first chunk (`hello`) reaches the receivers, then turns bad: the
/// receivers (one raw, one curl) must see a cut, never a clean end, and the sender an
/// `[ERROR]` and a closed connection.
fn bad_chunk_case((addr, name, tail): (SocketAddr, String, Vec<u8>)) -> Result<(), String> {
    let dir = TempDir::new("bad-chunk");
    let path = format!("/api/v1/pipe/{name}?n=2");
    let mut raw_receiver = Raw::open_addr(addr, &raw_head("GET", &path, &[]));
    let curl_receiver = Receiver::spawn(&url_for(addr, &path), &dir, "curl", &["--max-time", "20"]);
    let mut upload = raw_head("PUT", &path, &["Transfer-Encoding: chunked"]);
    upload.extend_from_slice(b"5\r\nhello\r\n");
    let mut sender = Raw::open_addr(addr, &upload);
    // The transfer runs: the good chunk reached the receivers. Now the bad bytes.
    curl_receiver.wait_for_bytes(5);
    sender.send(&tail);

    let head = raw_receiver.try_read_head()?;
    if head.status != 200 || !head.is_chunked() {
        return Err(format!("receiver head: {head:?}"));
    }
    let rest = raw_receiver.read_to_end();
    if !rest.closed() {
        return Err("the receiver's connection was left open".into());
    }
    let mut dechunker = Dechunker::default();
    let mut body = Vec::new();
    let _ = dechunker.feed(&rest.data, &mut |b| body.extend_from_slice(b));
    if dechunker.is_done() || rest.data.ends_with(b"0\r\n\r\n") {
        return Err(format!(
            "the raw receiver saw a clean end after {:?}",
            String::from_utf8_lossy(&body)
        ));
    }
    if !body.starts_with(b"hello") || !b"helloabc".starts_with(&body) {
        return Err(format!(
            "the raw receiver should get the good data and nothing else: {:?}",
            String::from_utf8_lossy(&body)
        ));
    }
    let received = curl_receiver.finish();
    if received.code == 0 || received.code == CURL_TIMED_OUT {
        return Err(format!(
            "the curl receiver exited {} (0: clean end, 28: never closed): {} bytes, {}",
            received.code,
            received.body.len(),
            received.stderr.trim()
        ));
    }
    let answer = sender.read_to_end();
    if !answer.closed() {
        return Err("the sender's connection was left open".into());
    }
    if !answer.text().contains("[ERROR]") {
        return Err(format!(
            "the sender was not told with an [ERROR] line: {:?}",
            answer.text()
        ));
    }
    Ok(())
}

fn malformed_chunked_body_never_reaches_receivers_as_a_clean_end() {
    let server = Server::start(&[]);
    let tails: [(&str, &[u8]); 7] = [
        ("chunk size not hex", b"zz\r\nabc\r\n0\r\n\r\n"),
        ("empty chunk size line", b"\r\nabc\r\n0\r\n\r\n"),
        ("extension without size", b";ext\r\n\r\n"),
        (
            "chunk size overflows u64",
            b"10000000000000000\r\nabc\r\n0\r\n\r\n",
        ),
        ("no CRLF after chunk data", b"3\r\nabcXY0\r\n\r\n"),
        ("bare LF after chunk data", b"3\r\nabc\n0\r\n\r\n"),
        (
            "bare LF in chunk extension",
            b"3;ext\nx\r\nabc\r\n0\r\n\r\n",
        ),
    ];
    let cases = tails
        .into_iter()
        .map(|(label, tail)| {
            (
                label.to_string(),
                (server.addr(), pipe_name("bad-chunk"), tail.to_vec()),
            )
        })
        .collect();
    check_all(cases, bad_chunk_case);
}

fn head_that_never_ends_is_dropped() {
    // Slow-loris: a head started and never finished must not hold a connection forever.
    let server = Server::start(&[]);
    let mut conn = Raw::open(&server, b"GET /healthz HTTP/1.1\r\nHost: h\r\n");
    let tail = conn.read_to_end_within(Duration::from_secs(40));
    assert!(
        tail.closed(),
        "a connection with an unfinished head was kept open for 40 s"
    );
    if let Some(status) = tail.status() {
        assert_eq!(
            status,
            408,
            "answer to an unfinished head: {:?}",
            tail.text()
        );
    }
}

// ---------------------------------------------------------------------------------------
// Expect, bodies on GET, keep-alive
// ---------------------------------------------------------------------------------------

fn refused_request_never_gets_100_continue() {
    let server = Server::start(&[]);
    let taken = format!("/api/v1/pipe/{}", pipe_name("taken"));
    let mut first = Raw::open(&server, &raw_head("PUT", &taken, &["Content-Length: 3"]));
    assert_eq!(first.read_head().status, 200, "first sender");
    let expect = "Expect: 100-continue";
    let cases = vec![
        (
            "PUT to a reserved path",
            raw_head("PUT", "/help", &["Content-Length: 3", expect]),
            400,
        ),
        (
            "PUT with n=0",
            raw_head(
                "PUT",
                &format!("/api/v1/pipe/{}?n=0", pipe_name("n0")),
                &["Content-Length: 3", expect],
            ),
            400,
        ),
        (
            "PUT with Content-Length +3",
            raw_head(
                "PUT",
                &format!("/api/v1/pipe/{}", pipe_name("plus")),
                &["Content-Length: +3", expect],
            ),
            400,
        ),
        (
            "PUT with a gzip coding",
            raw_head(
                "PUT",
                &format!("/api/v1/pipe/{}", pipe_name("gzip")),
                &["Transfer-Encoding: gzip", expect],
            ),
            501,
        ),
        (
            "second sender",
            raw_head("PUT", &taken, &["Content-Length: 3", expect]),
            409,
        ),
        (
            "DELETE",
            raw_head(
                "DELETE",
                &format!("/api/v1/pipe/{}", pipe_name("delete")),
                &["Content-Length: 3", expect],
            ),
            405,
        ),
    ];
    let addr = server.addr();
    let cases = cases
        .into_iter()
        .map(|(label, bytes, status)| (label.to_string(), (addr, bytes, status)))
        .collect();
    check_all(
        cases,
        |(addr, bytes, status): (SocketAddr, Vec<u8>, u16)| {
            let head = Raw::open_addr(addr, &bytes).try_read_any_head()?;
            if head.status != status {
                return Err(format!("first answer {} (expected {status})", head.status));
            }
            Ok(())
        },
    );
}

/// Splits a stream of responses by their framing.
fn split_responses(mut data: &[u8]) -> Vec<(Head, Vec<u8>)> {
    let mut responses = Vec::new();
    while let Ok(Some((head, used))) = parse_head(data) {
        data = &data[used..];
        let body_len = if head.is_chunked() {
            let mut dechunker = Dechunker::default();
            dechunker.feed(data, &mut |_| {}).unwrap_or(data.len())
        } else {
            head.content_length()
                .map_or(data.len(), |len| data.len().min(len as usize))
        };
        responses.push((head, data[..body_len].to_vec()));
        data = &data[body_len..];
    }
    responses
}

fn get_with_a_body_is_not_parsed_as_the_next_request() {
    let server = Server::start(&[]);
    let smuggled = "GET /version HTTP/1.1\r\nHost: h\r\n\r\n";
    let request = format!(
        "GET /healthz HTTP/1.1\r\nHost: h\r\nContent-Length: {}\r\n\r\n{smuggled}\
         GET /robots.txt HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
        smuggled.len()
    );
    let tail = raw_exchange(server.addr(), request.as_bytes());
    assert!(
        tail.closed(),
        "connection should end after Connection: close"
    );
    let responses = split_responses(&tail.data);
    assert!(!responses.is_empty(), "no response: {:?}", tail.text());
    assert_eq!(responses[0].0.status, 200, "GET /healthz with a body");
    // Drained: /healthz then /robots.txt. Closed: /healthz only. Never a third.
    assert!(
        responses.len() <= 2,
        "the GET's body was answered as a request: {} responses:\n{}",
        responses.len(),
        tail.text()
    );
    assert!(
        !responses[1..]
            .iter()
            .any(|(_, body)| String::from_utf8_lossy(body).contains(VERSION)),
        "the smuggled GET /version was answered:\n{}",
        tail.text()
    );
}

fn keep_alive_serves_two_requests_on_one_connection() {
    let server = Server::start(&[]);
    let mut conn = Raw::connect(&server);
    for round in 0..2 {
        conn.send(&raw_head("GET", "/healthz", &[]));
        let (head, _) = conn.read_response();
        assert_eq!(head.status, 200, "request {round} on one connection");
    }
}

/// A ranged upload would hand receivers a piece of a file as if it were the whole; an
/// unknown `report` is refused with what is allowed.
fn ranged_upload_and_unknown_report_are_400() {
    let server = Server::start(&[]);
    let url = server.pipe_url(&pipe_name("ranged"), None);
    request(&[
        "-X",
        "PUT",
        "-H",
        "Content-Range: bytes 0-3/100",
        "--data-binary",
        "data",
        &url,
    ])
    .assert_status_and_text(400, "Content-Range", "a ranged upload");
    send_small("PUT", &format!("{url}?report=later"), "data").assert_status_and_text(
        400,
        "report must be live",
        "report=later",
    );
}

conformance! {
    ranged_upload_and_unknown_report_are_400,
    invalid_n_is_400_with_the_allowed_range,
    max_receivers_flag_bounds_n,
    mismatched_receiver_is_400_and_the_pipe_goes_on,
    mismatched_sender_is_400_and_waiting_receivers_stay,
    second_sender_is_409_and_the_pipe_goes_on,
    receiver_beyond_n_is_409_and_the_pipe_goes_on,
    newcomer_during_a_running_transfer_is_409,
    other_methods_are_405_with_allow,
    options_is_a_cors_preflight,
    reserved_paths_answer_what_their_name_says,
    sending_to_a_reserved_path_is_400,
    http10_request_without_host_is_served,
    malformed_heads_are_400_and_closed,
    unsupported_transfer_coding_is_501,
    oversized_head_is_431_and_long_url_414,
    unknown_http_version_is_505,
    malformed_chunked_body_never_reaches_receivers_as_a_clean_end,
    head_that_never_ends_is_dropped,
    refused_request_never_gets_100_continue,
    get_with_a_body_is_not_parsed_as_the_next_request,
    keep_alive_serves_two_requests_on_one_connection,
}
