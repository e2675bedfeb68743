//! What browsers get, checked over HTTP with real curl against the real server: the page
//! and the text help on `/`, the noscript forms, a form upload (`?form`), the watchers
//! (`?progress`, `?status`), a receiver's file name (`?filename`, `?download`), active
//! types served as text, service workers refused, Private Network Access preflights.
//!
//! Run once, on the default backend: all of it is the core's.

// The conformance machinery runs these once, on the default backend.
#[allow(unused_imports)]
mod common;

use common::Server;

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Output, Stdio};
use std::thread;
use std::time::Duration;

/// curl with a time limit, its output kept.
fn curl(args: &[&str]) -> Output {
    common::curl()
        .args(["-sS", "--max-time", "30"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run curl")
}

/// curl in the background: `-i` output (head and body) on its stdout.
fn curl_bg(args: &[&str]) -> Child {
    common::curl()
        .args(["-sS", "-i", "--max-time", "30"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run curl")
}

fn output_of(child: Child) -> (String, Vec<u8>) {
    let out = child.wait_with_output().unwrap();
    split(&out.stdout)
}

/// A `-i` response: its head (as text) and body.
fn split(raw: &[u8]) -> (String, Vec<u8>) {
    let at = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no head in {:?}", String::from_utf8_lossy(raw)));
    (
        String::from_utf8_lossy(&raw[..at + 4]).into_owned(),
        raw[at + 4..].to_vec(),
    )
}

fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fanpipe-page-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 + i / 97) as u8).collect()
}

/// Waits until a watcher of `name` sees the state `want` (the pipe's parties are there).
fn wait_state(server: &Server, name: &str, want: &str) {
    for _ in 0..200 {
        let out = curl(&[&server.url(&format!("/{name}?status"))]);
        if String::from_utf8_lossy(&out.stdout).contains(want) {
            return;
        }
        thread::sleep(Duration::from_millis(25));
    }
    panic!("{name} never showed {want}");
}

#[test]
fn browsers_get_the_page_and_curl_the_text_help() {
    let server = Server::start(&[]);
    let (head, body) = split(&curl(&["-i", &server.url("/")]).stdout);
    assert!(
        head.contains("Content-Type: text/plain; charset=utf-8\r\n"),
        "{head}"
    );
    assert!(head.contains("Vary: Accept\r\n"), "{head}");
    assert!(String::from_utf8_lossy(&body).contains("curl -fsS"));

    let accept = "Accept: text/html,application/xhtml+xml,*/*;q=0.8";
    let (head, body) = split(&curl(&["-i", "-H", accept, &server.url("/")]).stdout);
    assert!(
        head.contains("Content-Type: text/html; charset=utf-8\r\n"),
        "{head}"
    );
    assert!(head.contains("Vary: Accept\r\n"));
    assert!(head.contains("Content-Security-Policy: default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; form-action 'self'; base-uri 'none'; frame-ancestors 'none'\r\n"), "{head}");
    let html = String::from_utf8_lossy(&body);
    assert!(html.contains("<script src=\"/page.js\""));

    for (path, kind) in [("/page.js", "text/javascript"), ("/page.css", "text/css")] {
        let (head, body) = split(&curl(&["-i", &server.url(path)]).stdout);
        assert!(
            head.contains(&format!("Content-Type: {kind}; charset=utf-8")),
            "{head}"
        );
        assert!(body.len() > 500);
    }
    // Reserved: nobody sends to them.
    let out = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-T",
        "/dev/null",
        &server.url("/page.js"),
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "400");

    let (head, body) = split(&curl(&["-i", &server.url("/noscript?name=a%20b&n=2")]).stdout);
    assert!(head.contains("Content-Security-Policy: "));
    let html = String::from_utf8_lossy(&body);
    assert!(html.contains("action=\"/a%20b?n=2&amp;form\""), "{html}");
    assert!(!html.contains("<script"));
}

#[test]
fn a_form_upload_reaches_receivers_as_its_file_part_and_other_multipart_bytes_are_piped_as_they_are(
) {
    let server = Server::start(&[]);
    let data = payload(400_000);
    let file = temp_file("form-data.bin", &data);
    let url = server.url("/form?n=2");
    let receivers: Vec<Child> = (0..2).map(|_| curl_bg(&[&url])).collect();
    let form = format!("file=@{};type=image/png;filename=shot.png", file.display());
    let out = curl(&[
        "-f",
        "-F",
        &form,
        "-F",
        "text=not this",
        &server.url("/form?n=2&form"),
    ]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("[INFO] done: 400000 bytes to 2 of 2"));
    for r in receivers {
        let (head, body) = output_of(r);
        assert!(head.contains("Content-Type: image/png\r\n"), "{head}");
        assert!(head.contains("Content-Disposition: attachment; filename=\"shot.png\"\r\n"));
        assert!(body == data, "a receiver got {} bytes", body.len());
    }

    // Without ?form, the multipart body itself is what the receivers get.
    let r = curl_bg(&[&server.url("/verbatim")]);
    wait_state(&server, "verbatim", "waiting");
    let out = curl(&["-f", "-F", "text=hello", &server.url("/verbatim")]);
    assert!(out.status.success());
    let (head, body) = output_of(r);
    assert!(
        head.contains("Content-Type: multipart/form-data; boundary="),
        "{head}"
    );
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains("name=\"text\"\r\n\r\nhello\r\n--"), "{body}");

    // ?form with no multipart body is refused.
    let out = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--data",
        "x",
        &server.url("/f?form"),
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "400");
}

#[test]
fn watchers_see_waiting_sending_done_without_taking_a_place() {
    let server = Server::start(&[]);
    // No pipe yet: the state is "none" and the stream ends (EventSource comes back).
    let out = curl(&["-N", &server.url("/w?progress")]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text,
        "retry: 1000\n\nevent: state\ndata: {\"state\":\"none\"}\n\n"
    );
    assert_eq!(
        String::from_utf8_lossy(&curl(&[&server.url("/w?status")]).stdout),
        "{\"state\":\"none\"}\n"
    );

    let data = payload(24_000_000);
    let file = temp_file("watched.bin", &data);
    let sender = common::curl()
        .args(["-sS", "-f", "--max-time", "30", "-T"])
        .arg(&file)
        .arg(server.url("/w?n=1"))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_state(&server, "w", "\"sender\":true");
    let mut watcher = common::curl()
        .args(["-sS", "-N", "--max-time", "30"])
        .arg(server.url("/w?progress"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // The watcher took no place: the one receiver still gets in.
    let mut first = [0u8; 300];
    let n = watcher.stdout.as_mut().unwrap().read(&mut first).unwrap();
    let first = String::from_utf8_lossy(&first[..n]).into_owned();
    let r = curl_bg(&["--limit-rate", "10M", &server.url("/w?n=1")]);
    let (_, body) = output_of(r);
    assert!(body == data);
    let rest = watcher.wait_with_output().unwrap().stdout;
    let events = first + &String::from_utf8_lossy(&rest);
    let waiting = events
        .find("data: {\"state\":\"waiting\",\"n\":1,\"receivers\":0,\"sender\":true}")
        .unwrap_or_else(|| panic!("{events}"));
    let sending = events.find("data: {\"state\":\"sending\"").unwrap();
    let progress = events.find("event: progress\ndata: {\"bytes\":").unwrap();
    let done = events
        .find("event: done\ndata: {\"outcome\":\"complete\",\"bytes\":24000000,\"complete\":1,\"n\":1,")
        .unwrap_or_else(|| panic!("{events}"));
    assert!(
        waiting < sending && sending < progress && progress < done,
        "{events}"
    );
    assert!(events.contains("\"total\":24000000"));
    assert_eq!(
        events.matches("\"state\":\"sending\"").count(),
        1,
        "{events}"
    );
    // Progress comes at most every 250 ms: about 2 s of transfer gives a few, not one
    // per write.
    let count = events.matches("event: progress").count();
    assert!(
        (2..=12).contains(&count),
        "{count} progress events:\n{events}"
    );
    let mut sender = sender;
    assert!(sender.wait().unwrap().success());
}

#[test]
fn at_most_sixteen_watchers_per_pipe() {
    let server = Server::start(&[]);
    let r = curl_bg(&[&server.url("/many?n=1")]);
    wait_state(&server, "many", "waiting");
    let watchers: Vec<Child> = (0..16)
        .map(|_| {
            common::curl()
                .args(["-sS", "-N", "--max-time", "30"])
                .arg(server.url("/many?progress"))
                .stdout(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    // The 17th is refused once the 16 are in.
    wait_state(&server, "many", "\"watchers\":16}");
    let out = curl(&["-i", &server.url("/many?progress")]);
    let (head, body) = split(&out.stdout);
    assert!(head.starts_with("HTTP/1.1 503 "), "{head}");
    assert!(String::from_utf8_lossy(&body).contains("16 watchers"));
    let out = curl(&["-f", "--data", "end", &server.url("/many?n=1")]);
    assert!(out.status.success());
    let (_, body) = output_of(r);
    assert_eq!(body, b"end");
    for mut w in watchers {
        assert!(w.wait().unwrap().success());
    }
}

#[test]
fn receivers_choose_the_file_name_and_active_types_reach_them_as_text() {
    let server = Server::start(&[]);
    let cases = [
        ("/d1?filename=r%C3%A9sum%C3%A9%22%0D%0A.pdf", Some("Content-Disposition: attachment; filename=\"r_sum____.pdf\"; filename*=UTF-8''r%C3%A9sum%C3%A9___.pdf\r\n")),
        ("/d2?download", Some("Content-Disposition: attachment; filename=\"sent.svg\"\r\n")),
        ("/dir/d3?download", Some("Content-Disposition: attachment; filename=\"sent.svg\"\r\n")),
        ("/d4?download=0", None),
    ];
    for (path, want) in cases {
        let r = curl_bg(&[&server.url(path)]);
        let name = path.split('?').next().unwrap().trim_start_matches('/');
        wait_state(&server, name, "waiting");
        let out = curl(&[
            "-f",
            "-H",
            "Content-Type: image/svg+xml; charset=utf-8",
            "-H",
            "Content-Disposition: attachment; filename=\"sent.svg\"",
            "--data-binary",
            "<svg onload=alert(1)/>",
            &server.url(&format!("/{name}")),
        ]);
        assert!(out.status.success(), "{path}");
        let (head, body) = output_of(r);
        assert!(
            head.contains("Content-Type: text/plain; charset=utf-8\r\n"),
            "{path}: {head}"
        );
        match want {
            Some(cd) => assert!(head.contains(cd), "{path}: {head}"),
            None => assert!(!head.contains("Content-Disposition"), "{path}: {head}"),
        }
        assert_eq!(body, b"<svg onload=alert(1)/>");
    }

    let out = curl(&["-i", "-H", "Service-Worker: script", &server.url("/sw.js")]);
    let (head, body) = split(&out.stdout);
    assert!(head.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{head}");
    assert!(String::from_utf8_lossy(&body).contains("service worker"));

    let out = curl(&[
        "-i",
        "-X",
        "OPTIONS",
        "-H",
        "Origin: https://public.example",
        "-H",
        "Access-Control-Request-Method: PUT",
        "-H",
        "Access-Control-Request-Private-Network: true",
        &server.url("/x"),
    ]);
    let (head, _) = split(&out.stdout);
    assert!(
        head.contains("Access-Control-Allow-Private-Network: true\r\n"),
        "{head}"
    );
}
