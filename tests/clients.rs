//! A cut is an error for every client, not only curl: Node's fetch (undici) and Python's
//! requests, as receivers and as a sender. Both once took the end of the connection for
//! the end of a response that said `Connection: close`; a response cut between chunks now
//! also carries a line that no parser takes for a chunk size.
//!
//! These run on the default backend only: what they check is the core's framing. A client
//! runtime that is missing prints `SKIPPED on <client>: ...` and the test returns.

// Only the default backend here: the conformance! machinery stays unused.
#[allow(unused_imports)]
mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::Duration;

use common::*;

/// Reads a pipe URL and prints `first` at its first bytes, then `clean N` or `error N WHY`
/// (exit 3).
const NODE_RECEIVER: &str = r#"
(async () => {
  let n = 0;
  try {
    const r = await fetch(process.argv[1], { cache: 'no-store' });
    for await (const c of r.body) { if (n === 0) console.log('first'); n += c.length; }
    console.log('clean ' + n); process.exit(0);
  } catch (e) {
    console.log('error ' + n + ' ' + ((e.cause && (e.cause.code || e.cause.message)) || e.message));
    process.exit(3);
  }
})();
"#;

/// Sends a 64 MiB body to a pipe URL and prints the response: `clean` and its text, or
/// `error WHY` (exit 3).
const NODE_SENDER: &str = r#"
(async () => {
  try {
    const r = await fetch(process.argv[1], { method: 'PUT', body: new Uint8Array(64 << 20) });
    const text = await r.text();
    console.log('clean ' + JSON.stringify(text)); process.exit(0);
  } catch (e) {
    console.log('error ' + ((e.cause && (e.cause.code || e.cause.message)) || e.message));
    process.exit(3);
  }
})();
"#;

const PYTHON_RECEIVER: &str = r#"
import sys
import requests
n = 0
try:
    r = requests.get(sys.argv[1], stream=True, timeout=30)
    for c in r.iter_content(65536):
        if n == 0:
            print('first', flush=True)
        n += len(c)
    print('clean', n, flush=True)
    sys.exit(0)
except Exception as e:
    print('error', n, type(e).__name__, flush=True)
    sys.exit(3)
"#;

#[derive(Clone, Copy, Debug)]
enum Client {
    Node,
    Python,
}

impl Client {
    fn name(self) -> &'static str {
        match self {
            Client::Node => "node",
            Client::Python => "python3",
        }
    }

    /// Why this client cannot run here, if it cannot.
    fn missing(self) -> Option<String> {
        let check = match self {
            Client::Node => "typeof fetch === 'function' || process.exit(1)",
            Client::Python => "import requests",
        };
        let flag = match self {
            Client::Node => "-e",
            Client::Python => "-c",
        };
        match Command::new(self.name()).args([flag, check]).output() {
            Ok(out) if out.status.success() => None,
            Ok(_) => Some(match self {
                Client::Node => "this node has no fetch (Node 18 or later needed)".into(),
                Client::Python => "python3 has no requests module (pip install requests)".into(),
            }),
            Err(e) => Some(format!("{} not found: {e}", self.name())),
        }
    }

    fn script(self, script: &str, url: &str) -> Command {
        let mut cmd = Command::new(self.name());
        cmd.arg(match self {
            Client::Node => "-e",
            Client::Python => "-c",
        });
        cmd.args([script, url]);
        if common::tls::enabled() {
            // Over HTTPS (FANPIPE_TLS=1) each trusts the suite's test CA.
            let ca = common::tls::suite().pki.ca_file();
            cmd.env("NODE_EXTRA_CA_CERTS", &ca)
                .env("REQUESTS_CA_BUNDLE", &ca);
        }
        cmd
    }
}

/// Runs `script` with `url`; hands each stdout line to `on_line` as it comes; returns
/// the exit code and the last line.
fn run_client(
    client: Client,
    script: &str,
    url: &str,
    mut on_line: impl FnMut(&str),
) -> (i32, String) {
    let mut proc = Proc::spawn(client.script(script, url).stdout(Stdio::piped()));
    let stdout = proc.child().stdout.take().expect("client stdout");
    let mut last = String::new();
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        on_line(&line);
        last = line;
    }
    (proc.wait(), last)
}

fn skip_if_missing(client: Client) -> bool {
    match client.missing() {
        Some(why) => {
            eprintln!("SKIPPED on {}: {why}", client.name());
            true
        }
        None => false,
    }
}

fn receiver_script(client: Client) -> &'static str {
    match client {
        Client::Node => NODE_RECEIVER,
        Client::Python => PYTHON_RECEIVER,
    }
}

/// A raw sender sends part of its body, then goes away once the client got its first
/// bytes: the client must report an error, never a clean end.
fn receiver_sees_a_cut(client: Client, chunked: bool) {
    if skip_if_missing(client) {
        return;
    }
    let server = Arc::new(Server::start(&[]));
    let path = format!("/api/v1/pipe/{}", pipe_name("client-cut"));
    let url = server.url(&path);
    let bytes = payload(1 << 20, 70);
    let framing = if chunked {
        "Transfer-Encoding: chunked".to_string()
    } else {
        format!("Content-Length: {}", 4 * bytes.len())
    };
    let (go, gone) = mpsc::channel::<()>();
    let sender = {
        let server = server.clone();
        thread::spawn(move || {
            let mut sender = Raw::open(&server, &raw_head("PUT", &path, &[&framing]));
            if chunked {
                sender.send(format!("{:x}\r\n", bytes.len()).as_bytes());
                sender.send(&bytes);
                sender.send(b"\r\n");
            } else {
                sender.send(&bytes);
            }
            // Until the client has its first bytes; then the sender goes away.
            let _ = gone.recv_timeout(Duration::from_secs(20));
        })
    };
    let (code, last) = run_client(client, receiver_script(client), &url, |line| {
        if line == "first" {
            let _ = go.send(());
        }
    });
    let _ = sender.join();
    assert_eq!(
        code,
        3,
        "{} (chunked={chunked}) must see the cut as an error; it said: {last}",
        client.name()
    );
    assert!(last.starts_with("error "), "{last}");
}

/// The same client gets a whole body and a clean end when nothing goes wrong.
fn receiver_gets_a_whole_body(client: Client, chunked: bool) {
    if skip_if_missing(client) {
        return;
    }
    let server = Server::start(&[]);
    let dir = TempDir::new("client-whole");
    let (file, bytes) = dir.payload_file("body", 3 << 20, 71);
    let url = server.pipe_url(&pipe_name("client-whole"), None);
    let upload = if chunked {
        Upload::Stdin
    } else {
        Upload::File(&file)
    };
    let mut sender = Sender::spawn(&url, upload, &dir, &["-fsS"]);
    if chunked {
        sender.feed(bytes.clone());
    }
    let (code, last) = run_client(client, receiver_script(client), &url, |_| {});
    assert_eq!(code, 0, "{}: {last}", client.name());
    assert_eq!(last, format!("clean {}", bytes.len()));
    sender.finish().assert_done(bytes.len() as u64, 1);
}

#[test]
fn node_fetch_receiver_sees_a_cut_chunked_response() {
    receiver_sees_a_cut(Client::Node, true);
}

#[test]
fn node_fetch_receiver_sees_a_cut_length_response() {
    receiver_sees_a_cut(Client::Node, false);
}

#[test]
fn python_requests_receiver_sees_a_cut_chunked_response() {
    receiver_sees_a_cut(Client::Python, true);
}

#[test]
fn python_requests_receiver_sees_a_cut_length_response() {
    receiver_sees_a_cut(Client::Python, false);
}

#[test]
fn node_fetch_and_python_requests_get_whole_bodies() {
    for client in [Client::Node, Client::Python] {
        for chunked in [false, true] {
            receiver_gets_a_whole_body(client, chunked);
        }
    }
}

/// Node's fetch sends a body whole into the socket buffers; its only receiver reads
/// nothing, and the idle timeout drops it. (The body is larger than every buffer on the
/// way, the TLS bridge's two sockets included, so that it cannot all be delivered.) the sender's progress response must end in an
/// error for fetch, not in a clean end after its `[ERROR]` line.
#[test]
fn node_fetch_sender_sees_an_error_when_its_receiver_is_lost() {
    if skip_if_missing(Client::Node) {
        return;
    }
    let server = Server::start(&["--idle-timeout", "2"]);
    let path = format!("/api/v1/pipe/{}", pipe_name("client-sender"));
    let url = server.url(&path);
    let _stalled = Raw::open(&server, &raw_head("GET", &path, &[]));
    let (code, last) = run_client(Client::Node, NODE_SENDER, &url, |_| {});
    assert_eq!(code, 3, "node's fetch took a cut response as whole: {last}");
}
