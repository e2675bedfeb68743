//! The harness of the conformance suite: a guard around one server process per test, real
//! `curl` senders and receivers, a raw TCP client for what curl will not send, and a
//! deterministic payload generator with a streaming verifier.
//!
//! Every wait here is bounded: curl runs with `--max-time`, sockets with read timeouts, polls
//! with deadlines, and each server is killed by a watchdog if its test runs too long (which
//! makes every client of that server fail, so the test ends and reports it).
//!
//! The server under test is the `fanpipe` binary of the test's backend (see `backend.rs`).

#![allow(dead_code)]

mod backend;
pub mod tls;

pub use backend::{current, run_on, spawn_server, Backend};

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The version the server must report on `/version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// A server whose test is still running after this long is killed.
pub const WATCHDOG: Duration = Duration::from_secs(120);
/// `--max-time` of every curl.
pub const CURL_MAX_TIME: u64 = 60;
/// Read timeout of raw sockets (one read) and bound of a whole raw read.
pub const RAW_READ_TIMEOUT: Duration = Duration::from_secs(10);
pub const RAW_TOTAL_TIMEOUT: Duration = Duration::from_secs(30);
/// curl's exit code for `--max-time` reached: a hang, never an acceptable failure.
pub const CURL_TIMED_OUT: i32 = 28;

// ---------------------------------------------------------------------------------------
// Server guard
// ---------------------------------------------------------------------------------------

/// The server binary to test: the current test's backend.
pub fn server_binary() -> PathBuf {
    current().binary()
}

/// One server process, listening on a free port of 127.0.0.1, killed on drop.
pub struct Server {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
    watchdog_stop: Option<mpsc::Sender<()>>,
    watchdog: Option<JoinHandle<()>>,
    watchdog_fired: Arc<AtomicBool>,
    /// The server speaks HTTPS on its address.
    tls: bool,
}

impl Server {
    /// Starts a server with `--listen 127.0.0.1:0` and `extra` flags, and waits for its
    /// `listening on http://ADDR` line on stderr (`https://` with `--tls-cert`, which
    /// `FANPIPE_TLS=1` adds with the suite's certificate when `extra` has none).
    pub fn start(extra: &[&str]) -> Server {
        Server::start_as(extra, tls::enabled())
    }

    /// A server that speaks plain HTTP whatever `FANPIPE_TLS` says: the upstream of the
    /// proxies in `deploy/`, which speak HTTP to fanpipe and TLS to their clients.
    pub fn start_plain(extra: &[&str]) -> Server {
        Server::start_as(extra, false)
    }

    fn start_as(extra: &[&str], suite_tls: bool) -> Server {
        let bin = server_binary();
        let mut args: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
        if suite_tls && !extra.contains(&"--tls-cert") {
            args.extend(tls::server_flags());
        }
        let tls = args.iter().any(|a| a == "--tls-cert");
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let extra = &args[..];
        let mut child = spawn_server(&bin, extra);
        let stderr = child.stderr.take().expect("server stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = mpsc::channel();
        {
            let log = Arc::clone(&log);
            thread::spawn(move || drain_server_log(stderr, log, addr_tx));
        }
        let addr = match addr_rx.recv_timeout(Duration::from_secs(20)) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                let status = child.wait();
                panic!(
                    "{} server {} {extra:?} printed no `listening on http://` line (exit: {status:?}); its log:\n{}",
                    current().name(),
                    bin.display(),
                    log.lock().unwrap().join("\n")
                );
            }
        };
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let fired = Arc::new(AtomicBool::new(false));
        let watchdog = {
            let fired = Arc::clone(&fired);
            let pid = child.id();
            thread::spawn(move || {
                if let Err(mpsc::RecvTimeoutError::Timeout) = stop_rx.recv_timeout(WATCHDOG) {
                    fired.store(true, Ordering::SeqCst);
                    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
                }
            })
        };
        Server {
            child,
            addr,
            log,
            watchdog_stop: Some(stop_tx),
            watchdog: Some(watchdog),
            watchdog_fired: fired,
            tls,
        }
    }

    /// Whether the server speaks HTTPS on [`Server::addr`].
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `http://127.0.0.1:PORT` + `path` (which starts with `/`); `https://` over TLS.
    pub fn url(&self, path: &str) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}{}", self.addr, path)
    }

    /// The URL of pipe `name` under the documented prefix, with `?n=` when `n` is given.
    pub fn pipe_url(&self, name: &str, n: Option<u32>) -> String {
        match n {
            Some(n) => self.url(&format!("/api/v1/pipe/{name}?n={n}")),
            None => self.url(&format!("/api/v1/pipe/{name}")),
        }
    }

    /// A field of `/proc/PID/status` in KiB (e.g. `VmHWM`, the peak resident set).
    pub fn proc_status_kib(&self, field: &str) -> u64 {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc/PID/status of the server");
        status
            .lines()
            .find_map(|line| {
                let rest = line.strip_prefix(field)?.strip_prefix(':')?;
                rest.trim().strip_suffix("kB")?.trim().parse().ok()
            })
            .unwrap_or_else(|| panic!("no {field} in /proc/PID/status:\n{status}"))
    }

    /// The last lines the server wrote to stderr.
    pub fn log_tail(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        drop(self.watchdog_stop.take());
        if let Some(watchdog) = self.watchdog.take() {
            let _ = watchdog.join();
        }
        let exited = self.child.try_wait().ok().flatten();
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!("--- server log (last lines) ---\n{}", self.log_tail());
            return;
        }
        if self.watchdog_fired.load(Ordering::SeqCst) {
            panic!(
                "watchdog: the test ran over {WATCHDOG:?}, the server was killed; log:\n{}",
                self.log_tail()
            );
        }
        if let Some(status) = exited {
            panic!(
                "the server exited during the test ({status}); log:\n{}",
                self.log_tail()
            );
        }
    }
}

fn drain_server_log(
    stderr: impl Read,
    log: Arc<Mutex<Vec<String>>>,
    addr_tx: mpsc::Sender<SocketAddr>,
) {
    const KEEP: usize = 300;
    let mut reader = BufReader::new(stderr);
    let mut addr_tx = Some(addr_tx);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let text = String::from_utf8_lossy(&line).trim_end().to_string();
        if let Some(addr) = addr_tx.as_ref().and(parse_listening(&text)) {
            let _ = addr_tx.take().unwrap().send(addr);
        }
        let mut log = log.lock().unwrap();
        if log.len() == KEEP {
            log.remove(0);
        }
        log.push(text);
    }
}

/// The address in a line containing `listening on http://ADDR` (or `https://ADDR`).
fn parse_listening(line: &str) -> Option<SocketAddr> {
    let at = line.find("listening on ")? + "listening on ".len();
    let rest = &line[at..];
    let start = at
        + ["http://", "https://"]
            .iter()
            .find(|s| rest.starts_with(*s))?
            .len();
    let addr: String = line[start..]
        .chars()
        .take_while(|c| c.is_ascii_hexdigit() || matches!(c, '.' | ':' | '[' | ']'))
        .collect();
    addr.parse().ok()
}

// ---------------------------------------------------------------------------------------
// Names, temporary files, waiting
// ---------------------------------------------------------------------------------------

static UNIQUE: AtomicU64 = AtomicU64::new(0);

fn unique_suffix() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{}-{}-{nanos}",
        std::process::id(),
        UNIQUE.fetch_add(1, Ordering::SeqCst)
    )
}

/// A pipe name no other test uses.
pub fn pipe_name(tag: &str) -> String {
    format!("{tag}-{}", unique_suffix())
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!("fanpipe-test-{tag}-{}", unique_suffix()));
        fs::create_dir_all(&path).expect("create temp dir");
        TempDir { path }
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Writes `payload(len, seed)` to `name` and returns its path and bytes.
    pub fn payload_file(&self, name: &str, len: usize, seed: u64) -> (PathBuf, Vec<u8>) {
        let bytes = payload(len, seed);
        let path = self.file(name);
        fs::write(&path, &bytes).expect("write payload file");
        (path, bytes)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// Polls `done` every 20 ms until it holds; panics after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// Gives requests already sent time to reach the server before the next party arrives.
/// An ordering aid where the protocol offers no signal, never a timing assertion: if the
/// server is slower than this, the test still checks a valid (other) arrival order.
pub fn settle() {
    thread::sleep(Duration::from_millis(500));
}

/// Panics unless the raw client `raw` is still waiting for an answer (no head in 0.7 s):
/// the server admitted it to its pipe. Also orders it before the next client's request.
pub fn assert_waiting(raw: &mut Raw, what: &str) {
    if let Some(head) = raw.head_within(Duration::from_millis(700)) {
        panic!("{what} should be waiting, got {}", head.status);
    }
}

/// Runs `check` on every case in its own thread and fails once with every failed case.
pub fn check_all<T: Send + 'static>(cases: Vec<(String, T)>, check: fn(T) -> Result<(), String>) {
    let handles: Vec<_> = cases
        .into_iter()
        .map(|(label, case)| (label, thread::spawn(move || check(case))))
        .collect();
    let failures: Vec<String> = handles
        .into_iter()
        .filter_map(|(label, handle)| match handle.join() {
            Ok(Ok(())) => None,
            Ok(Err(why)) => Some(format!("{label}: {why}")),
            Err(panic) => {
                let why = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                Some(format!("{label}: panicked: {why}"))
            }
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
}

// ---------------------------------------------------------------------------------------
// Payloads
// ---------------------------------------------------------------------------------------

/// Payloads are built of blocks of this size, each a function of (seed, block index), so a
/// stream can be generated and verified piecewise without holding it.
pub const BLOCK: usize = 64 * 1024;

fn fill_block(seed: u64, index: u64, out: &mut [u8]) {
    // splitmix64 for the block's start state, xorshift64* for its bytes.
    let mut z = seed
        .wrapping_add(index.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    let mut x = (z ^ (z >> 31)) | 1;
    for chunk in out.chunks_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let word = x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
        chunk.copy_from_slice(&word[..chunk.len()]);
    }
}

/// `len` pseudo-random bytes, the same for the same seed.
pub fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut bytes = vec![0; len];
    for (index, block) in bytes.chunks_mut(BLOCK).enumerate() {
        fill_block(seed, index as u64, block);
    }
    bytes
}

/// Checks a stream, piece by piece, against `payload(_, seed)`.
pub struct Verifier {
    seed: u64,
    pos: u64,
    block: Vec<u8>,
    block_index: u64,
    mismatch_at: Option<u64>,
}

impl Verifier {
    pub fn new(seed: u64) -> Verifier {
        Verifier {
            seed,
            pos: 0,
            block: vec![0; BLOCK],
            block_index: u64::MAX,
            mismatch_at: None,
        }
    }

    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let index = self.pos / BLOCK as u64;
            if index != self.block_index {
                fill_block(self.seed, index, &mut self.block);
                self.block_index = index;
            }
            let offset = (self.pos % BLOCK as u64) as usize;
            let take = data.len().min(BLOCK - offset);
            if self.mismatch_at.is_none() && data[..take] != self.block[offset..offset + take] {
                let first = (0..take)
                    .find(|&i| data[i] != self.block[offset + i])
                    .unwrap_or(0);
                self.mismatch_at = Some(self.pos + first as u64);
            }
            self.pos += take as u64;
            data = &data[take..];
        }
    }

    /// Bytes seen so far.
    pub fn len(&self) -> u64 {
        self.pos
    }

    pub fn is_empty(&self) -> bool {
        self.pos == 0
    }

    /// Offset of the first byte that differs from the payload, if any.
    pub fn mismatch_at(&self) -> Option<u64> {
        self.mismatch_at
    }

    /// Panics unless exactly the first `len` bytes of the payload were seen.
    pub fn assert_whole(&self, label: &str, len: u64) {
        assert_eq!(
            self.mismatch_at, None,
            "{label}: bytes differ from the payload"
        );
        assert_eq!(self.pos, len, "{label}: byte count");
    }
}

/// Writes `payload(total, seed)` to `out` block by block, counting bytes written in
/// `progress`; closes `out` at the end. Stops quietly when the reader goes away.
pub fn generate_into(
    mut out: impl Write + Send + 'static,
    total: u64,
    seed: u64,
    progress: Arc<AtomicU64>,
) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut block = vec![0; BLOCK];
        let mut index = 0u64;
        let mut left = total;
        while left > 0 {
            let take = left.min(BLOCK as u64) as usize;
            fill_block(seed, index, &mut block);
            if out.write_all(&block[..take]).is_err() {
                return;
            }
            progress.fetch_add(take as u64, Ordering::SeqCst);
            left -= take as u64;
            index += 1;
        }
    })
}

/// Panics with the first differing offset (not a dump) unless `got == expected`.
pub fn assert_same_bytes(label: &str, expected: &[u8], got: &[u8]) {
    if expected == got {
        return;
    }
    let first = expected
        .iter()
        .zip(got)
        .position(|(a, b)| a != b)
        .unwrap_or(expected.len().min(got.len()));
    panic!(
        "{label}: got {} bytes, expected {}; first difference at offset {first}",
        got.len(),
        expected.len()
    );
}

// ---------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------

/// A child process killed (and reaped) on drop unless already waited for.
pub struct Proc(Option<Child>);

impl Proc {
    pub fn spawn(cmd: &mut Command) -> Proc {
        Proc(Some(cmd.spawn().expect("spawn child process")))
    }

    pub fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("process already waited for")
    }

    /// SIGKILL, as a user's Ctrl-C or a crashed client would end it.
    pub fn kill(&mut self) {
        let _ = self.child().kill();
    }

    /// Waits for the exit and returns the exit code (-1 when killed by a signal).
    pub fn wait(&mut self) -> i32 {
        let mut child = self.0.take().expect("process already waited for");
        let status = child.wait().expect("wait for child process");
        status.code().unwrap_or(-1)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------
// curl
// ---------------------------------------------------------------------------------------

/// `curl -q -sS --max-time 60 --noproxy '*'`: no config file, no progress, errors shown,
/// bounded, never through a proxy.
pub fn curl() -> Command {
    let mut cmd = Command::new(std::env::var_os("CURL").unwrap_or_else(|| "curl".into()));
    cmd.args(["-q", "-sS", "--noproxy", "*", "--max-time"])
        .arg(CURL_MAX_TIME.to_string())
        .stdin(Stdio::null());
    if tls::enabled() {
        cmd.arg("--cacert").arg(tls::suite().pki.ca_file());
    }
    cmd
}

/// `http://ADDR` + `path` (which starts with `/`); `https://` with `FANPIPE_TLS=1`.
pub fn url_for(addr: SocketAddr, path: &str) -> String {
    let scheme = if tls::enabled() { "https" } else { "http" };
    format!("{scheme}://{addr}{path}")
}

/// A TCP connection to the server at `addr` that carries plain HTTP either way: with
/// `FANPIPE_TLS=1`, through a TLS bridge ([`tls::bridge`]).
pub fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    if tls::enabled() {
        tls::bridge(addr, tls::suite().client.clone())
    } else {
        TcpStream::connect(addr)
    }
}

/// The answer to a simple request made with `curl -i`.
#[derive(Debug)]
pub struct Reply {
    /// curl's exit code.
    pub code: i32,
    /// The final (non-1xx) response head.
    pub head: Head,
    pub body: Vec<u8>,
    pub stderr: String,
}

impl Reply {
    pub fn status(&self) -> u16 {
        self.head.status
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.header(name)
    }

    /// Panics unless the status is `status` and the body contains `needle`.
    pub fn assert_status_and_text(&self, status: u16, needle: &str, what: &str) {
        assert_eq!(
            self.status(),
            status,
            "{what}: status; body: {:?}",
            self.text()
        );
        assert!(
            self.text().contains(needle),
            "{what}: body should contain {needle:?}: {:?}",
            self.text()
        );
    }
}

/// Runs `curl -i ARGS` to completion and parses its answer.
pub fn request(args: &[&str]) -> Reply {
    let out = curl().arg("-i").args(args).output().expect("run curl");
    let code = out.status.code().unwrap_or(-1);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let (head, body) = final_head(&out.stdout)
        .unwrap_or_else(|why| panic!("curl {args:?} (exit {code}, {stderr}): {why}"));
    Reply {
        code,
        head,
        body,
        stderr,
    }
}

/// `GET url`.
pub fn get(url: &str) -> Reply {
    request(&[url])
}

/// A small upload of `body` with `method` (PUT or POST) to `url`.
pub fn send_small(method: &str, url: &str, body: &str) -> Reply {
    request(&["-X", method, "--data-binary", body, url])
}

/// Skips 1xx heads; returns the final head and the rest.
fn final_head(mut data: &[u8]) -> Result<(Head, Vec<u8>), String> {
    loop {
        let (head, used) = parse_head(data)?.ok_or_else(|| {
            format!(
                "no complete response head in {:?}",
                String::from_utf8_lossy(&data[..data.len().min(300)])
            )
        })?;
        data = &data[used..];
        if head.status >= 200 {
            return Ok((head, data.to_vec()));
        }
    }
}

/// A receiver: `curl -N -D HEADFILE -o BODYFILE URL`, running until `finish`.
pub struct Receiver {
    proc: Proc,
    label: String,
    body_path: PathBuf,
    head_path: PathBuf,
    err_path: PathBuf,
}

impl Receiver {
    pub fn spawn(url: &str, dir: &TempDir, label: &str, extra: &[&str]) -> Receiver {
        let body_path = dir.file(&format!("{label}.body"));
        let head_path = dir.file(&format!("{label}.head"));
        let err_path = dir.file(&format!("{label}.err"));
        let err = File::create(&err_path).expect("create stderr file");
        // -N: no output buffering, so the file's size is what arrived (`received`).
        let proc = Proc::spawn(
            curl()
                .arg("-N")
                .arg("-D")
                .arg(&head_path)
                .arg("-o")
                .arg(&body_path)
                .args(extra)
                .arg(url)
                .stdout(Stdio::null())
                .stderr(err),
        );
        Receiver {
            proc,
            label: label.to_string(),
            body_path,
            head_path,
            err_path,
        }
    }

    /// Bytes of body written so far.
    pub fn received(&self) -> u64 {
        fs::metadata(&self.body_path).map(|m| m.len()).unwrap_or(0)
    }

    /// Waits until at least `bytes` bytes of body arrived (the transfer is under way).
    pub fn wait_for_bytes(&self, bytes: u64) {
        wait_until(
            &format!("{} to receive {bytes} bytes", self.label),
            Duration::from_secs(30),
            || self.received() >= bytes,
        );
    }

    pub fn kill(&mut self) {
        self.proc.kill();
    }

    pub fn finish(mut self) -> Received {
        let code = self.proc.wait();
        let head_dump = fs::read(&self.head_path).unwrap_or_default();
        let head = final_head(&head_dump).ok().map(|(head, _)| head);
        Received {
            label: self.label.clone(),
            code,
            head,
            body: fs::read(&self.body_path).unwrap_or_default(),
            stderr: fs::read_to_string(&self.err_path).unwrap_or_default(),
        }
    }
}

/// What a receiver got.
#[derive(Debug)]
pub struct Received {
    pub label: String,
    pub code: i32,
    pub head: Option<Head>,
    pub body: Vec<u8>,
    pub stderr: String,
}

impl Received {
    pub fn head(&self) -> &Head {
        self.head.as_ref().unwrap_or_else(|| {
            panic!(
                "{}: no response head (curl exit {}: {})",
                self.label, self.code, self.stderr
            )
        })
    }

    /// Panics unless curl succeeded with `200` and exactly `expected`.
    pub fn assert_got(&self, expected: &[u8]) {
        assert_eq!(
            self.code, 0,
            "{}: curl exit code ({})",
            self.label, self.stderr
        );
        assert_eq!(self.head().status, 200, "{}: status", self.label);
        assert_same_bytes(&self.label, expected, &self.body);
    }

    /// Panics unless curl saw an error that is not its own timeout (a cut response, then
    /// the connection closed), and what it got is a prefix of `payload`.
    pub fn assert_cut(&self, payload: &[u8]) {
        assert_cut_code(&self.label, self.code, &self.stderr);
        assert!(
            self.body.len() <= payload.len() && payload.starts_with(&self.body),
            "{}: the {} bytes received are not a prefix of the payload",
            self.label,
            self.body.len()
        );
    }
}

/// Panics unless `code` is a curl failure other than a timeout (a hang is not a cut).
pub fn assert_cut_code(label: &str, code: i32, stderr: &str) {
    assert_ne!(
        code, 0,
        "{label}: curl exited 0, it saw a clean end of a cut transfer"
    );
    assert_ne!(
        code, CURL_TIMED_OUT,
        "{label}: curl timed out: the connection was never closed ({stderr})"
    );
}

/// How a sender's body is handed to curl.
pub enum Upload<'a> {
    /// `-T -`: chunked PUT from curl's stdin, which the test writes (`feed`, `take_stdin`).
    /// curl blocks reading an idle stdin and reads no response meanwhile, so its output
    /// shows only while the body flows or after it ended. (`-T .`, curl's non-blocking
    /// stdin, showed no response line at all here with curl 7.88 and `-sS`.)
    Stdin,
    /// `-T FILE`: PUT with Content-Length.
    File(&'a Path),
    /// `--data-binary @FILE`: POST with Content-Length.
    DataBinary(&'a Path),
}

/// A sender: `curl -N` uploading to a pipe, its response read line by line as it streams.
pub struct Sender {
    proc: Proc,
    stdin: Option<ChildStdin>,
    lines_rx: mpsc::Receiver<String>,
    lines: Vec<String>,
    reader: Option<JoinHandle<()>>,
    feeder: Option<JoinHandle<()>>,
    err_path: PathBuf,
}

impl Sender {
    pub fn spawn(url: &str, upload: Upload, dir: &TempDir, extra: &[&str]) -> Sender {
        let err_path = dir.file(&format!("sender-{}.err", unique_suffix()));
        let err = File::create(&err_path).expect("create stderr file");
        let mut cmd = curl();
        cmd.arg("-N").args(extra);
        match upload {
            Upload::Stdin => {
                cmd.args(["-T", "-"]).stdin(Stdio::piped());
            }
            Upload::File(path) => {
                cmd.arg("-T").arg(path);
            }
            Upload::DataBinary(path) => {
                cmd.arg("--data-binary").arg(format!("@{}", path.display()));
            }
        }
        let mut proc = Proc::spawn(cmd.arg(url).stdout(Stdio::piped()).stderr(err));
        let stdin = proc.child().stdin.take();
        let stdout = proc.child().stdout.take().expect("curl stdout");
        let (tx, lines_rx) = mpsc::channel();
        let reader = thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = Vec::new();
            loop {
                line.clear();
                match reader.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        let text = String::from_utf8_lossy(&line);
                        let _ = tx.send(text.trim_end_matches(['\r', '\n']).to_string());
                    }
                }
            }
        });
        Sender {
            proc,
            stdin,
            lines_rx,
            lines: Vec::new(),
            reader: Some(reader),
            feeder: None,
            err_path,
        }
    }

    /// curl's stdin (`Upload::Stdin`); the body ends when it is dropped.
    pub fn take_stdin(&mut self) -> ChildStdin {
        self.stdin
            .take()
            .expect("sender stdin (Upload::Stdin, not taken yet)")
    }

    /// Writes `data` to curl's stdin from a thread, then closes it.
    pub fn feed(&mut self, data: Vec<u8>) {
        let mut stdin = self.take_stdin();
        self.feeder = Some(thread::spawn(move || {
            let _ = stdin.write_all(&data);
        }));
    }

    /// The next line of the sender's response; panics if none comes within 20 s.
    pub fn next_line(&mut self) -> String {
        let line = self
            .lines_rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| {
                panic!(
                    "sender: no response line within 20 s (lines so far: {:?}; curl: {})",
                    self.lines,
                    fs::read_to_string(&self.err_path).unwrap_or_default()
                )
            });
        self.lines.push(line.clone());
        line
    }

    /// Waits for the first line of the response, which comes at once: after it, the sender
    /// is known to be registered on its pipe. With `Upload::Stdin`, `feed` it first (see
    /// there why).
    /// The lines printed so far, without waiting for more.
    pub fn lines_so_far(&mut self) -> &[String] {
        self.lines.extend(self.lines_rx.try_iter());
        &self.lines
    }

    pub fn wait_registered(&mut self) {
        let line = self.next_line();
        assert!(
            line.starts_with("[INFO] "),
            "sender's first line should be [INFO]: {line:?}"
        );
    }

    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// Closes stdin if still held, waits for curl, and returns what it printed.
    pub fn finish(mut self) -> Sent {
        drop(self.stdin.take());
        let code = self.proc.wait();
        for thread in [self.reader.take(), self.feeder.take()]
            .into_iter()
            .flatten()
        {
            let _ = thread.join();
        }
        let mut lines = std::mem::take(&mut self.lines);
        lines.extend(self.lines_rx.try_iter());
        Sent {
            code,
            lines,
            stderr: fs::read_to_string(&self.err_path).unwrap_or_default(),
        }
    }
}

/// What a sender's curl printed.
#[derive(Debug)]
pub struct Sent {
    pub code: i32,
    pub lines: Vec<String>,
    pub stderr: String,
}

impl Sent {
    fn assert_lines_tagged(&self) {
        for line in &self.lines {
            assert!(
                line.starts_with("[INFO] ") || line.starts_with("[ERROR] "),
                "sender line without [INFO]/[ERROR] tag: {line:?} (all: {:?})",
                self.lines
            );
        }
    }

    fn last_line(&self) -> &str {
        self.lines.last().map(String::as_str).unwrap_or_else(|| {
            panic!(
                "sender printed nothing (curl exit {}: {})",
                self.code, self.stderr
            )
        })
    }

    /// Panics unless the transfer succeeded: `bytes` bytes to all `n` receivers, curl exit 0.
    pub fn assert_done(&self, bytes: u64, n: u32) {
        self.assert_lines_tagged();
        let last = self.last_line();
        let done = parse_done(last)
            .unwrap_or_else(|| panic!("sender's last line is not a done summary: {last:?}"));
        assert_eq!(
            done,
            (bytes, n, n),
            "sender summary (bytes, k, n) in {last:?}"
        );
        assert_eq!(
            self.code, 0,
            "sender curl exit code ({}); lines: {:?}",
            self.stderr, self.lines
        );
    }

    /// Panics unless the last line says only `k` of `n` got every byte and curl failed
    /// (other than by its own timeout).
    pub fn assert_failed(&self, k: u32, n: u32) {
        self.assert_lines_tagged();
        assert_eq!(
            self.last_line(),
            format!("[ERROR] {k} of {n} receivers got every byte"),
            "sender's last line (all: {:?})",
            self.lines
        );
        assert_cut_code("sender", self.code, &self.stderr);
    }
}

/// `[INFO] done: BYTES bytes to K of N receivers in S.SSs (RATE)` → (BYTES, K, N).
pub fn parse_done(line: &str) -> Option<(u64, u32, u32)> {
    let rest = line.strip_prefix("[INFO] done: ")?;
    let (bytes, rest) = rest.split_once(" bytes to ")?;
    let (k, rest) = rest.split_once(" of ")?;
    let (n, rest) = rest.split_once(" receivers in ")?;
    let (secs, rest) = rest.split_once("s (")?;
    let rate = rest.strip_suffix(')')?;
    let (whole, frac) = secs.split_once('.')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !(digits(bytes) && digits(whole) && frac.len() == 2 && digits(frac)) || rate.is_empty() {
        return None;
    }
    Some((bytes.parse().ok()?, k.parse().ok()?, n.parse().ok()?))
}

/// A receiver `curl URL` whose stdout is checked against `payload(_, seed)` as it streams,
/// so that bodies larger than memory need no file.
pub struct StreamReceiver {
    proc: Proc,
    checker: Option<JoinHandle<Verifier>>,
}

impl StreamReceiver {
    pub fn spawn(url: &str, seed: u64, extra: &[&str]) -> StreamReceiver {
        let mut proc = Proc::spawn(
            curl()
                .args(extra)
                .arg(url)
                .stdout(Stdio::piped())
                .stderr(Stdio::null()),
        );
        let mut stdout = proc.child().stdout.take().expect("curl stdout");
        let checker = thread::spawn(move || {
            let mut verifier = Verifier::new(seed);
            let mut buf = vec![0; BLOCK];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                verifier.feed(&buf[..n]);
            }
            verifier
        });
        StreamReceiver {
            proc,
            checker: Some(checker),
        }
    }

    /// curl's exit code and the verifier of what it printed.
    pub fn finish(mut self) -> (i32, Verifier) {
        let code = self.proc.wait();
        let verifier = self
            .checker
            .take()
            .expect("checker")
            .join()
            .expect("checker thread");
        (code, verifier)
    }
}

// ---------------------------------------------------------------------------------------
// HTTP parsing of responses
// ---------------------------------------------------------------------------------------

/// A response head.
#[derive(Debug, Clone)]
pub struct Head {
    pub version: String,
    pub status: u16,
    pub reason: String,
    pub headers: Vec<(String, String)>,
}

impl Head {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Whether a comma-separated header `name` lists `token` (case-insensitive).
    pub fn lists(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    pub fn is_chunked(&self) -> bool {
        self.lists("transfer-encoding", "chunked")
    }

    pub fn content_length(&self) -> Option<u64> {
        self.header("content-length").and_then(|v| v.parse().ok())
    }
}

/// Parses a response head at the start of `buf`: `Ok(None)` if it is not complete yet,
/// else the head and the bytes it took.
pub fn parse_head(buf: &[u8]) -> Result<Option<(Head, usize)>, String> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let text = std::str::from_utf8(&buf[..end]).map_err(|_| "response head is not UTF-8")?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default().to_string();
    let status = parts
        .next()
        .and_then(|s| s.parse().ok())
        .filter(|_| version.starts_with("HTTP/"))
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let reason = parts.next().unwrap_or_default().to_string();
    let mut headers = Vec::new();
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("bad header line {line:?}"))?;
        headers.push((name.to_string(), value.trim().to_string()));
    }
    Ok(Some((
        Head {
            version,
            status,
            reason,
            headers,
        },
        end + 4,
    )))
}

/// A strict, incremental decoder of a chunked body (what the server sends).
#[derive(Debug, Default)]
pub struct Dechunker {
    state: ChunkState,
    line: Vec<u8>,
}

#[derive(Debug, Default, PartialEq)]
enum ChunkState {
    #[default]
    Size,
    Data(u64),
    DataEnd(usize),
    Trailer,
    Done,
}

impl Dechunker {
    /// Feeds `input`, passing body bytes to `sink`; returns how many bytes of `input` were
    /// used (all of them unless the body ended inside it).
    pub fn feed(&mut self, input: &[u8], sink: &mut dyn FnMut(&[u8])) -> Result<usize, String> {
        let mut i = 0;
        while i < input.len() {
            match self.state {
                ChunkState::Size | ChunkState::Trailer => {
                    self.line.push(input[i]);
                    i += 1;
                    if !self.line.ends_with(b"\r\n") {
                        if self.line.len() > 1024 {
                            return Err("chunk line over 1 KiB".into());
                        }
                        continue;
                    }
                    let line = &self.line[..self.line.len() - 2];
                    if self.state == ChunkState::Trailer {
                        if line.is_empty() {
                            self.state = ChunkState::Done;
                        }
                    } else {
                        let digits = line.split(|&b| b == b';').next().unwrap_or_default();
                        let text = std::str::from_utf8(digits).unwrap_or("?");
                        let size = u64::from_str_radix(text, 16)
                            .map_err(|_| format!("bad chunk size line {line:?}"))?;
                        self.state = if size == 0 {
                            ChunkState::Trailer
                        } else {
                            ChunkState::Data(size)
                        };
                    }
                    self.line.clear();
                }
                ChunkState::Data(left) => {
                    let take = (input.len() - i).min(usize::try_from(left).unwrap_or(usize::MAX));
                    sink(&input[i..i + take]);
                    i += take;
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        ChunkState::DataEnd(0)
                    } else {
                        ChunkState::Data(left)
                    };
                }
                ChunkState::DataEnd(seen) => {
                    if input[i] != b"\r\n"[seen] {
                        return Err("chunk data not followed by CRLF".into());
                    }
                    i += 1;
                    self.state = if seen == 1 {
                        ChunkState::Size
                    } else {
                        ChunkState::DataEnd(1)
                    };
                }
                ChunkState::Done => break,
            }
        }
        Ok(i)
    }

    /// Whether the last chunk and the end of the trailer section were seen.
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }
}

// ---------------------------------------------------------------------------------------
// Raw TCP client
// ---------------------------------------------------------------------------------------

/// How a raw read ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The server closed the connection (FIN).
    Closed,
    /// The connection was reset: closed too, without a clean FIN.
    Reset,
    /// Nothing came within the read timeout: the connection is still open.
    TimedOut,
    /// Where a chunk size was due came a line that is none: the server's mark of a cut.
    BadChunk,
}

/// The line a server writes where a chunk size was due when it cuts a chunked response.
pub const CUT: &[u8] = b"!transfer cut\r\n";

/// Everything read from a raw connection until it ended.
#[derive(Debug)]
pub struct Tail {
    pub data: Vec<u8>,
    pub end: End,
}

impl Tail {
    /// The status of the first response in the data.
    pub fn status(&self) -> Option<u16> {
        parse_head(&self.data)
            .ok()
            .flatten()
            .map(|(head, _)| head.status)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }

    pub fn closed(&self) -> bool {
        self.end != End::TimedOut
    }

    /// `Err` unless the first response has `status` and the connection was then closed.
    pub fn expect_status_and_close(&self, status: u16) -> Result<(), String> {
        let excerpt = || {
            let text = self.text();
            text.chars().take(200).collect::<String>()
        };
        if self.status() != Some(status) {
            return Err(format!("expected {status}, got {:?}", excerpt()));
        }
        if !self.closed() {
            return Err(format!("{status} sent but the connection was left open"));
        }
        Ok(())
    }
}

/// How a body read by framing ended.
#[derive(Debug)]
pub struct BodyEnd {
    /// Whether the body was whole by its framing (Content-Length reached, last chunk seen).
    pub complete: bool,
    /// Body bytes passed on.
    pub len: u64,
    /// How the connection ended, if it did before the body was whole.
    pub end: Option<End>,
}

/// A raw TCP connection to the server, for bytes curl will not send.
pub struct Raw {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    pub fn connect(server: &Server) -> Raw {
        let stream = if server.is_tls() {
            tls::bridge(server.addr(), tls::suite().client.clone())
        } else {
            TcpStream::connect(server.addr())
        };
        Raw::over(stream.expect("connect to the server"))
    }

    /// Connects to `addr` (through TLS with `FANPIPE_TLS=1`, see [`connect`]).
    pub fn connect_addr(addr: SocketAddr) -> Raw {
        Raw::over(connect(addr).expect("connect to the server"))
    }

    /// A raw client on a stream already connected.
    pub fn over(stream: TcpStream) -> Raw {
        stream.set_nodelay(true).expect("set TCP_NODELAY");
        stream
            .set_read_timeout(Some(RAW_READ_TIMEOUT))
            .expect("set read timeout");
        stream
            .set_write_timeout(Some(RAW_READ_TIMEOUT))
            .expect("set write timeout");
        Raw {
            stream,
            buf: Vec::new(),
        }
    }

    /// Connects and writes `bytes`.
    pub fn open(server: &Server, bytes: &[u8]) -> Raw {
        let mut raw = Raw::connect(server);
        raw.send(bytes);
        raw
    }

    pub fn open_addr(addr: SocketAddr, bytes: &[u8]) -> Raw {
        let mut raw = Raw::connect_addr(addr);
        raw.send(bytes);
        raw
    }

    /// Writes `bytes`. A write error is ignored: the server may close early on bad input,
    /// and what it answered is read next.
    pub fn send(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes);
    }

    /// A second handle on the socket, e.g. to write from another thread.
    pub fn stream_clone(&self) -> TcpStream {
        self.stream.try_clone().expect("clone the socket")
    }

    /// The next response head if one comes within `wait`; `None` if nothing complete came
    /// (the request is still pending). Panics if the connection ends.
    pub fn head_within(&mut self, wait: Duration) -> Option<Head> {
        self.stream
            .set_read_timeout(Some(wait))
            .expect("set read timeout");
        let deadline = Instant::now() + wait;
        let head = loop {
            match parse_head(&self.buf) {
                Ok(Some((head, used))) => {
                    self.buf.drain(..used);
                    break Some(head);
                }
                Ok(None) => {}
                Err(why) => panic!("{why}"),
            }
            if Instant::now() >= deadline {
                break None;
            }
            match self.fill() {
                Ok(_) => {}
                Err(End::TimedOut) => break None,
                Err(end) => panic!(
                    "connection ended ({end:?}) while waiting for an answer; got {:?}",
                    String::from_utf8_lossy(&self.buf)
                ),
            }
        };
        self.stream
            .set_read_timeout(Some(RAW_READ_TIMEOUT))
            .expect("set read timeout");
        head
    }

    pub fn shutdown_write(&self) {
        let _ = self.stream.shutdown(Shutdown::Write);
    }

    /// One read, appended to the buffer; `Err` when the connection ended or stalled.
    fn fill(&mut self) -> Result<usize, End> {
        let mut tmp = [0; 64 * 1024];
        match self.stream.read(&mut tmp) {
            Ok(0) => Err(End::Closed),
            Ok(n) => {
                self.buf.extend_from_slice(&tmp[..n]);
                Ok(n)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Err(End::TimedOut)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(0),
            Err(_) => Err(End::Reset),
        }
    }

    /// Whether no final response has begun so far: what arrived (read without blocking) is
    /// at most interim (1xx) heads.
    pub fn no_response_yet(&mut self) -> bool {
        self.stream.set_nonblocking(true).expect("set nonblocking");
        while let Ok(n) = self.fill() {
            if n == 0 {
                break;
            }
        }
        self.stream.set_nonblocking(false).expect("set blocking");
        let mut rest = &self.buf[..];
        loop {
            match parse_head(rest) {
                Ok(Some((head, used))) if head.status < 200 => rest = &rest[used..],
                Ok(Some(_)) | Err(_) => return false,
                Ok(None) => return rest.is_empty() || rest.starts_with(b"HTTP/1.1 1"),
            }
        }
    }

    /// Reads until at least `n` unconsumed bytes are buffered (e.g. part of a body).
    pub fn fill_to(&mut self, n: usize) -> Result<(), End> {
        let deadline = Instant::now() + RAW_TOTAL_TIMEOUT;
        while self.buf.len() < n {
            if Instant::now() > deadline {
                return Err(End::TimedOut);
            }
            self.fill()?;
        }
        Ok(())
    }

    /// Writes `bytes` one at a time, each in its own segment as far as TCP allows.
    pub fn send_bytewise(&mut self, bytes: &[u8]) {
        for byte in bytes {
            if self.stream.write_all(std::slice::from_ref(byte)).is_err() {
                return;
            }
            thread::sleep(Duration::from_micros(100));
        }
    }

    /// Reads until the server closes (or nothing comes within the read timeout).
    pub fn read_to_end(&mut self) -> Tail {
        self.read_to_end_within(RAW_TOTAL_TIMEOUT)
    }

    /// `read_to_end`, waiting up to `total` for each read and for the whole.
    pub fn read_to_end_within(&mut self, total: Duration) -> Tail {
        self.stream
            .set_read_timeout(Some(total))
            .expect("set read timeout");
        let deadline = Instant::now() + total;
        let end = loop {
            if Instant::now() > deadline {
                break End::TimedOut;
            }
            if let Err(end) = self.fill() {
                break end;
            }
        };
        Tail {
            data: std::mem::take(&mut self.buf),
            end,
        }
    }

    /// Reads the next response head, an interim (1xx) one included; `Err` if the
    /// connection ends first.
    pub fn try_read_any_head(&mut self) -> Result<Head, String> {
        let deadline = Instant::now() + RAW_TOTAL_TIMEOUT;
        loop {
            if let Some((head, used)) = parse_head(&self.buf)? {
                self.buf.drain(..used);
                return Ok(head);
            }
            if Instant::now() > deadline {
                return Err("no response head within the deadline".into());
            }
            if let Err(end) = self.fill() {
                return Err(format!(
                    "connection ended ({end:?}) before a response head; got {:?}",
                    String::from_utf8_lossy(&self.buf)
                ));
            }
        }
    }

    pub fn read_any_head(&mut self) -> Head {
        self.try_read_any_head()
            .unwrap_or_else(|why| panic!("{why}"))
    }

    /// Reads the final response head, skipping interim (1xx) ones as clients do.
    pub fn try_read_head(&mut self) -> Result<Head, String> {
        loop {
            let head = self.try_read_any_head()?;
            if head.status >= 200 {
                return Ok(head);
            }
        }
    }

    pub fn read_head(&mut self) -> Head {
        self.try_read_head().unwrap_or_else(|why| panic!("{why}"))
    }

    /// Reads the body of `head` by its framing, passing body bytes to `sink`.
    pub fn read_body_with(&mut self, head: &Head, sink: &mut dyn FnMut(&[u8])) -> BodyEnd {
        let deadline = Instant::now() + RAW_TOTAL_TIMEOUT;
        let mut len = 0u64;
        let mut dechunker = head.is_chunked().then(Dechunker::default);
        let mut wanted = if dechunker.is_some() {
            None
        } else {
            head.content_length()
        };
        loop {
            // Pass on what is buffered.
            if let Some(dechunker) = dechunker.as_mut() {
                let mut counted = |b: &[u8]| {
                    len += b.len() as u64;
                    sink(b);
                };
                let used = match dechunker.feed(&self.buf, &mut counted) {
                    Ok(used) => used,
                    Err(why) => {
                        assert!(
                            self.buf.windows(CUT.len()).any(|w| w == CUT),
                            "server sent a bad chunked body: {why}"
                        );
                        return BodyEnd {
                            complete: false,
                            len,
                            end: Some(End::BadChunk),
                        };
                    }
                };
                self.buf.drain(..used);
                if dechunker.is_done() {
                    return BodyEnd {
                        complete: true,
                        len,
                        end: None,
                    };
                }
            } else {
                let take = match wanted {
                    Some(left) => self
                        .buf
                        .len()
                        .min(usize::try_from(left).unwrap_or(usize::MAX)),
                    None => self.buf.len(),
                };
                sink(&self.buf[..take]);
                self.buf.drain(..take);
                len += take as u64;
                if let Some(left) = wanted.as_mut() {
                    *left -= take as u64;
                    if *left == 0 {
                        return BodyEnd {
                            complete: true,
                            len,
                            end: None,
                        };
                    }
                }
            }
            let end = if Instant::now() > deadline {
                Some(End::TimedOut)
            } else {
                self.fill().err()
            };
            if let Some(end) = end {
                // A body delimited by the close is whole when the server closed cleanly.
                let complete = wanted.is_none() && dechunker.is_none() && end == End::Closed;
                return BodyEnd {
                    complete,
                    len,
                    end: Some(end),
                };
            }
        }
    }

    /// Reads the body of `head` into memory; the flag says whether it was whole.
    pub fn read_body(&mut self, head: &Head) -> (Vec<u8>, BodyEnd) {
        let mut body = Vec::new();
        let end = self.read_body_with(head, &mut |b| body.extend_from_slice(b));
        (body, end)
    }

    /// Reads one whole response; panics if it is cut.
    pub fn read_response(&mut self) -> (Head, Vec<u8>) {
        let head = self.read_head();
        let (body, end) = self.read_body(&head);
        assert!(
            end.complete,
            "response {} cut after {} body bytes ({:?})",
            head.status, end.len, end.end
        );
        (head, body)
    }
}

/// Connects, writes `bytes` and reads until the server closes or stalls.
pub fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> Tail {
    Raw::open_addr(addr, bytes).read_to_end()
}

/// `METHOD PATH HTTP/1.1` with a Host header and `extra` header lines, head only.
pub fn raw_head(method: &str, path: &str, extra: &[&str]) -> Vec<u8> {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    for line in extra {
        head.push_str(line);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    head.into_bytes()
}

// ---------------------------------------------------------------------------------------
// Signals and exit
// ---------------------------------------------------------------------------------------

/// How a server process ended, and the last lines it logged.
#[derive(Debug)]
pub struct Exit {
    pub status: std::process::ExitStatus,
    pub log: String,
}

impl Server {
    /// Sends SIGTERM to the server (`kill -TERM PID`).
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("run kill -TERM");
        assert!(
            status.success(),
            "kill -TERM {} failed: {status}",
            self.pid()
        );
    }

    /// Waits up to `timeout` for the server to exit by itself and returns how it ended;
    /// the guard is then spent (nothing left to kill). `Err` (the server killed) if it
    /// is still running at the deadline.
    pub fn wait_exit(mut self, timeout: Duration) -> Result<Exit, String> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    drop(self.watchdog_stop.take());
                    if let Some(watchdog) = self.watchdog.take() {
                        let _ = watchdog.join();
                    }
                    // Let the log reader take the last lines (it ends at EOF).
                    thread::sleep(Duration::from_millis(50));
                    let exit = Exit {
                        status,
                        log: self.log_tail(),
                    };
                    // The process is reaped and the watchdog stopped: nothing for Drop.
                    std::mem::forget(self);
                    return Ok(exit);
                }
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                Ok(None) => {
                    return Err(format!(
                        "the server did not exit within {timeout:?}; log:\n{}",
                        self.log_tail()
                    ))
                }
                Err(e) => return Err(format!("cannot wait for the server: {e}")),
            }
        }
    }
}

/// A curl sender fills a pipe whose raw receivers are all waiting: each receiver gets
/// exactly `bytes` with a 200, and the sender's summary says every one of them did.
pub fn send_to_waiting(url: &str, dir: &TempDir, bytes: &[u8], receivers: &mut [(&str, &mut Raw)]) {
    let mut sender = Sender::spawn(url, Upload::Stdin, dir, &[]);
    sender.feed(bytes.to_vec());
    for (label, receiver) in receivers.iter_mut() {
        let (head, body) = receiver.read_response();
        assert_eq!(head.status, 200, "{label}");
        assert_same_bytes(label, bytes, &body);
    }
    sender
        .finish()
        .assert_done(bytes.len() as u64, receivers.len() as u32);
}
