//! The page in a real browser: headless Chromium driven over WebDriver (chromedriver, a
//! few JSON calls over HTTP written here), against the real server, with real curl on
//! the other side. The uploads are the page's own XHRs and form posts; the bytes every
//! side gets are checked.
//!
//! Run once, on the default backend (the page is the core's, the same on every backend).
//! Where chromium or chromedriver is missing, each test prints `SKIPPED on chromium:
//! <reason>` to stderr and returns. `FANPIPE_SCREENSHOT=docs/page.png` makes the
//! screenshot test write the README's picture.

// The conformance machinery runs these once, on the default backend.
#[allow(unused_imports)]
mod common;

use common::Server;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// WebDriver's key of an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A fresh directory under the system's temporary directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("fanpipe-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A program on the `PATH`.
fn which(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    names.iter().find_map(|name| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

/// Pseudo-random bytes, the same for the same seed.
fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A curl receiver in the background: its body and headers go to files.
struct Curl {
    child: Child,
    body: PathBuf,
    head: PathBuf,
}

impl Curl {
    fn receive(url: &str, dir: &Path, tag: &str, extra: &[&str]) -> Curl {
        let body = dir.join(format!("{tag}.body"));
        let head = dir.join(format!("{tag}.head"));
        let child = common::curl()
            .args(["-fsS", "--max-time", "60", "-o"])
            .arg(&body)
            .arg("-D")
            .arg(&head)
            .args(extra)
            .arg(url)
            .stdin(Stdio::null())
            .spawn()
            .expect("run curl");
        Curl { child, body, head }
    }

    /// Waits for it; its body and head.
    fn finish(mut self) -> (Vec<u8>, String) {
        let status = self.child.wait().unwrap();
        assert!(status.success(), "curl receiver: {status}");
        (
            std::fs::read(&self.body).unwrap(),
            std::fs::read_to_string(&self.head).unwrap(),
        )
    }
}

/// One chromedriver and one headless Chromium session, ended on drop.
struct Browser {
    driver: Child,
    port: u16,
    session: String,
    downloads: Scratch,
    _profile: Scratch,
}

impl Browser {
    /// A browser, or why there is none here.
    fn start() -> Result<Browser, String> {
        let chromium = which(&["chromium", "chromium-browser", "google-chrome"])
            .ok_or("no chromium on the PATH (apt-get install chromium)")?;
        let chromedriver = which(&["chromedriver"])
            .ok_or("no chromedriver on the PATH (apt-get install chromium-driver)")?;
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        let driver = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("chromedriver: {e}"))?;
        let downloads = Scratch::new("downloads");
        let profile = Scratch::new("profile");
        let mut browser = Browser {
            driver,
            port,
            session: String::new(),
            downloads,
            _profile: profile,
        };
        let ready = Instant::now() + Duration::from_secs(20);
        while browser.call("GET", "/status", None).is_err() {
            if Instant::now() > ready {
                return Err("chromedriver did not answer".into());
            }
            thread::sleep(Duration::from_millis(50));
        }
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--window-size=820,1400",
            &format!("--user-data-dir={}", browser._profile.0.display()),
        ];
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            // Over HTTPS (`FANPIPE_TLS=1`) the server's certificate comes from the
            // suite's own test CA, which this fresh profile does not know.
            "acceptInsecureCerts": common::tls::enabled(),
            "goog:chromeOptions": {
                "binary": chromium,
                "args": args,
                "prefs": {
                    "download.default_directory": browser.downloads.0,
                    "download.prompt_for_download": false,
                },
            },
        }}});
        let session = browser.call("POST", "/session", Some(&caps))?;
        browser.session = session["sessionId"]
            .as_str()
            .ok_or(format!("no session: {session}"))?
            .to_owned();
        Ok(browser)
    }

    /// One WebDriver command; its `value`, or the error it answered.
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let body = body.map(Value::to_string).unwrap_or_default();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.port,
            body.len()
        )
        .map_err(|e| e.to_string())?;
        // Read the head, then exactly its Content-Length (the connection may stay open).
        let mut raw = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        let (at, length) = loop {
            let n = s.read(&mut buf).map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("chromedriver closed the connection".into());
            }
            raw.extend_from_slice(&buf[..n]);
            if let Some(at) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&raw[..at]).to_ascii_lowercase();
                let length = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .ok_or("no Content-Length from chromedriver")?;
                break (at + 4, length);
            }
        };
        while raw.len() < at + length {
            let n = s.read(&mut buf).map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("chromedriver closed the connection early".into());
            }
            raw.extend_from_slice(&buf[..n]);
        }
        let v: Value = serde_json::from_slice(&raw[at..at + length]).map_err(|e| e.to_string())?;
        if v["value"]["error"].is_string() {
            return Err(format!("{method} {path}: {}", v["value"]));
        }
        Ok(v["value"].clone())
    }

    fn session_call(&self, method: &str, path: &str, body: Value) -> Value {
        let path = format!("/session/{}{path}", self.session);
        self.call(method, &path, Some(&body))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn goto(&self, url: &str) {
        self.session_call("POST", "/url", json!({ "url": url }));
    }

    fn element(&self, css: &str) -> String {
        let v = self.session_call(
            "POST",
            "/element",
            json!({"using": "css selector", "value": css}),
        );
        v[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no element {css}: {v}"))
            .to_owned()
    }

    /// Replaces the value of a text field, or chooses a file for a file input.
    fn fill(&self, css: &str, text: &str) {
        let e = self.element(css);
        if !css.contains("file") {
            self.session_call("POST", &format!("/element/{e}/clear"), json!({}));
        }
        self.session_call(
            "POST",
            &format!("/element/{e}/value"),
            json!({ "text": text }),
        );
    }

    fn click(&self, css: &str) {
        let e = self.element(css);
        self.session_call("POST", &format!("/element/{e}/click"), json!({}));
    }

    fn script(&self, script: &str) -> Value {
        self.session_call(
            "POST",
            "/execute/sync",
            json!({"script": script, "args": []}),
        )
    }

    /// Polls `script` until it returns something truthy; panics at the deadline with
    /// what `show` returns then.
    fn wait_for(&self, script: &str, secs: u64, show: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let v = self.script(script);
            if !(v.is_null() || v == json!(false) || v == json!("")) {
                return v;
            }
            if Instant::now() > deadline {
                panic!("waited {secs} s for `{script}`; {}", self.script(show));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn seen(&self) -> String {
        self.script("return document.getElementById('watch').dataset.seen")
            .as_str()
            .unwrap_or("")
            .to_owned()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.call("DELETE", &format!("/session/{}", self.session), None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// The browser, or `None` after saying why the test is skipped.
fn browser() -> Option<Browser> {
    match Browser::start() {
        Ok(b) => Some(b),
        Err(why) => {
            eprintln!("SKIPPED on chromium: {why}");
            None
        }
    }
}

const STATE: &str = "return document.getElementById('watch-state').textContent + ' | ' + document.getElementById('send-status').textContent + ' | seen ' + document.getElementById('watch').dataset.seen";

/// Whether `seen` (states in order) holds `want` in that order.
fn in_order(seen: &str, want: &[&str]) -> bool {
    let mut it = seen.split(',');
    want.iter().all(|w| it.any(|s| s == *w))
}

#[test]
fn the_page_sends_a_file_to_two_curl_receivers() {
    let server = Server::start(&[]);
    let Some(b) = browser() else { return };
    let dir = Scratch::new("send");
    let data = payload(3_000_000, 7);
    let file = dir.0.join("report \u{fc}.bin");
    std::fs::write(&file, &data).unwrap();
    let url = server.url("/browser-send?n=2");
    let receivers: Vec<Curl> = (0..2)
        .map(|i| Curl::receive(&url, &dir.0, &format!("r{i}"), &[]))
        .collect();

    b.goto(&server.url("/"));
    b.fill("#send-name", "browser-send");
    b.fill("#send-n", "2");
    b.fill("#send-files", file.to_str().unwrap());
    let cmd = b.script("return document.getElementById('recv-cmd').textContent");
    assert_eq!(
        cmd,
        json!(format!("curl -fsS -o 'report \u{fc}.bin' '{url}'")),
        "the receivers' command shown"
    );
    b.click("#send-go");
    b.wait_for(
        "return document.getElementById('send-status').textContent.startsWith('Sent.')",
        40,
        STATE,
    );
    for r in receivers {
        let (body, head) = r.finish();
        assert!(
            body == data,
            "a receiver got {} bytes, not the file's",
            body.len()
        );
        assert!(
            head.contains("filename*=UTF-8''report%20%C3%BC.bin"),
            "{head}"
        );
        assert!(
            head.contains("Content-Type: application/octet-stream"),
            "{head}"
        );
    }
    // A transfer this short may be over before the watch starts: then the sender's
    // report ends the view.
    b.wait_for(
        "return document.getElementById('watch').dataset.seen.endsWith('done')",
        10,
        STATE,
    );
    let text = b.script("return document.getElementById('watch-state').textContent");
    let text = text.as_str().unwrap();
    assert!(
        text.starts_with("Done: 3.0 MB to 2 of 2")
            || text.starts_with("Done: 3000000 bytes to 2 of 2"),
        "{text}"
    );
}

#[test]
fn the_page_receives_from_a_curl_sender_as_a_download() {
    let server = Server::start(&[]);
    let Some(b) = browser() else { return };
    let dir = Scratch::new("receive");
    let data = payload(1_500_000, 11);
    let file = dir.0.join("from-curl.bin");
    std::fs::write(&file, &data).unwrap();

    b.goto(&server.url("/"));
    b.fill("#recv-name", "browser-receive");
    b.fill("#recv-filename", "saved.bin");
    let href = b.script("return document.getElementById('recv-link').getAttribute('href')");
    assert_eq!(
        href,
        json!("/browser-receive?n=1&download&filename=saved.bin")
    );
    let shown = b.script("return document.getElementById('send-cmd').textContent");
    assert_eq!(
        shown,
        json!(format!(
            "curl -fsS -T FILE '{}'",
            server.url("/browser-receive?n=1")
        ))
    );
    // The sender first: a click waits for the navigation it starts, which waits for
    // the pipe's response.
    let sender = common::curl()
        .args(["-fsS", "--max-time", "60", "-T"])
        .arg(&file)
        .arg(server.url("/browser-receive?n=1"))
        .stdout(Stdio::piped())
        .spawn()
        .expect("run curl");
    b.click("#recv-link");
    let sender = sender.wait_with_output().unwrap();
    let report = String::from_utf8_lossy(&sender.stdout);
    assert!(sender.status.success(), "{report}");
    assert!(
        report.contains("[INFO] done: 1500000 bytes to 1 of 1"),
        "{report}"
    );

    let saved = b.downloads.0.join("saved.bin");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !saved.is_file() || std::fs::metadata(&saved).unwrap().len() < data.len() as u64 {
        let listing: Vec<_> = std::fs::read_dir(&b.downloads.0)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(
            Instant::now() < deadline,
            "no download; the directory holds {listing:?}"
        );
        thread::sleep(Duration::from_millis(50));
    }
    assert!(
        std::fs::read(&saved).unwrap() == data,
        "the download differs"
    );
}

#[test]
fn the_progress_view_goes_waiting_sending_done() {
    let server = Server::start(&[]);
    let Some(b) = browser() else { return };
    let dir = Scratch::new("progress");
    // Larger than the kernel's buffers between the server and the receiver (its send
    // buffer grows to 4 MiB): a 2 MB body once left in them within 3 ms, the transfer
    // ended before any progress event, and the test with it.
    let data = payload(12_000_000, 13);
    let file = dir.0.join("slow.bin");
    std::fs::write(&file, &data).unwrap();

    b.goto(&server.url("/"));
    b.fill("#send-name", "browser-progress");
    b.fill("#send-files", file.to_str().unwrap());
    b.click("#send-go");
    b.wait_for(
        "return document.getElementById('watch').dataset.seen.split(',').includes('waiting')",
        10,
        STATE,
    );
    let waiting = b.script("return document.getElementById('watch-state').textContent");
    assert_eq!(
        waiting,
        json!("Waiting: 0 of 1 receiver(s) here, sender here.")
    );
    // A receiver that reads at 4 MB/s keeps the transfer running for about 2 s.
    let r = Curl::receive(
        &server.url("/browser-progress?n=1"),
        &dir.0,
        "slow",
        &["--limit-rate", "4M"],
    );
    b.wait_for(
        "return document.getElementById('watch').dataset.seen.split(',').includes('sending')",
        10,
        STATE,
    );
    b.wait_for(
        "return document.getElementById('watch-progress').textContent.includes('of 12.0 MB sent')",
        10,
        STATE,
    );
    let (body, _) = r.finish();
    assert!(body == data);
    b.wait_for(
        "return document.getElementById('watch').dataset.seen.endsWith('done')",
        10,
        STATE,
    );
    let seen = b.seen();
    assert!(in_order(&seen, &["waiting", "sending", "done"]), "{seen}");
}

#[test]
fn the_noscript_form_posts_a_file_that_curl_receives() {
    let server = Server::start(&[]);
    let Some(b) = browser() else { return };
    let dir = Scratch::new("noscript");
    let data = payload(700_000, 17);
    let file = dir.0.join("form.csv");
    std::fs::write(&file, &data).unwrap();
    let r = Curl::receive(&server.url("/noscript-pipe?n=1"), &dir.0, "r", &[]);

    b.goto(&server.url("/noscript"));
    b.fill("#name", "noscript-pipe");
    b.click("form[action='/noscript'] button");
    b.wait_for(
        "return !!document.getElementById('file')",
        10,
        "return document.body.innerText",
    );
    b.fill("#file", file.to_str().unwrap());
    b.click("form[enctype] button");
    let (body, head) = r.finish();
    assert!(
        body == data,
        "the receiver got {} bytes, not the file",
        body.len()
    );
    assert!(head.contains("Content-Type: text/csv"), "{head}");
    assert!(
        head.contains("Content-Disposition: attachment; filename=\"form.csv\""),
        "{head}"
    );
    // The browser shows the sender's report.
    b.wait_for(
        "return document.body.innerText.includes('[INFO] done: 700000 bytes to 1 of 1')",
        10,
        "return document.body.innerText",
    );
}

#[test]
fn a_screenshot_of_the_page() {
    let server = Server::start(&[]);
    let Some(b) = browser() else { return };
    b.goto(&server.url("/"));
    b.fill("#send-name", "build-12af");
    b.fill("#send-n", "3");
    b.fill("#send-text", "hello from the page");
    b.wait_for("return document.readyState === 'complete'", 10, "return ''");
    let png = b.session_call("GET", "/screenshot", json!({}));
    let png = decode_base64(png.as_str().unwrap());
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"));
    if let Some(path) = std::env::var_os("FANPIPE_SCREENSHOT") {
        std::fs::write(path, &png).unwrap();
    }
}

fn decode_base64(s: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        _ => 63,
    };
    let digits: Vec<u8> = s
        .bytes()
        .filter(|c| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/')
        .map(value)
        .collect();
    digits
        .chunks(4)
        .flat_map(|c| {
            let n = c
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, &d)| n | u32::from(d) << (18 - 6 * i));
            let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
            bytes[..c.len().saturating_sub(1)].to_vec()
        })
        .collect()
}
