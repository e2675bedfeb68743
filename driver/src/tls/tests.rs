//! The TLS layer against a rustls client over an in-memory duplex stream: each side is
//! stepped by hand, so every test is deterministic and needs no network.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};

use super::*;

/// Steps enough for any exchange here; a test that needs more is stuck.
const MAX_STEPS: usize = 100_000;

/// One direction of the duplex: bytes in flight, a capacity (the kernel's buffer), and
/// whether the writer has sent its FIN.
struct Wire {
    data: VecDeque<u8>,
    cap: usize,
    fin: bool,
}

impl Wire {
    fn new(cap: usize) -> Self {
        Wire {
            data: VecDeque::new(),
            cap,
            fin: false,
        }
    }
}

struct Duplex {
    to_server: Wire,
    to_client: Wire,
    /// Open descriptors of the server's end: the last one to close sends the FIN.
    server_handles: usize,
}

/// The server's end, as a backend's socket: `Pending` when empty or full.
struct ServerEnd(Arc<Mutex<Duplex>>);

/// The client's end, as the nonblocking `Read`/`Write` a rustls client drives.
struct ClientEnd(Arc<Mutex<Duplex>>);

fn pair(cap: usize) -> (ServerEnd, ClientEnd) {
    let duplex = Arc::new(Mutex::new(Duplex {
        to_server: Wire::new(cap),
        to_client: Wire::new(cap),
        server_handles: 1,
    }));
    (ServerEnd(duplex.clone()), ClientEnd(duplex))
}

impl ServerEnd {
    /// A second descriptor for the same connection, as `dup` makes.
    fn dup(&self) -> ServerEnd {
        self.0.lock().unwrap().server_handles += 1;
        ServerEnd(self.0.clone())
    }
}

impl Drop for ServerEnd {
    fn drop(&mut self) {
        let mut d = self.0.lock().unwrap();
        d.server_handles -= 1;
        if d.server_handles == 0 {
            d.to_client.fin = true;
        }
    }
}

impl Socket for ServerEnd {
    fn poll_read(&mut self, _: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        let mut d = self.0.lock().unwrap();
        let wire = &mut d.to_server;
        if wire.data.is_empty() {
            return if wire.fin {
                Poll::Ready(Ok(0))
            } else {
                Poll::Pending
            };
        }
        let n = buf.len().min(wire.data.len());
        for (b, byte) in buf.iter_mut().zip(wire.data.drain(..n)) {
            *b = byte;
        }
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        &mut self,
        _: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut d = self.0.lock().unwrap();
        let wire = &mut d.to_client;
        assert!(!wire.fin, "a write after the FIN");
        let room = wire.cap - wire.data.len();
        if room == 0 {
            return Poll::Pending;
        }
        let mut n = 0;
        for b in bufs {
            let take = b.len().min(room - n);
            wire.data.extend(&b[..take]);
            n += take;
        }
        Poll::Ready(Ok(n))
    }

    fn shutdown_write(&mut self, _: &mut Context<'_>) {
        self.0.lock().unwrap().to_client.fin = true;
    }
}

impl ClientEnd {
    fn shutdown(&self) {
        self.0.lock().unwrap().to_server.fin = true;
    }

    fn server_fin(&self) -> bool {
        let d = self.0.lock().unwrap();
        d.to_client.fin && d.to_client.data.is_empty()
    }

    fn pending_to_client(&self) -> usize {
        self.0.lock().unwrap().to_client.data.len()
    }
}

impl Read for ClientEnd {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut d = self.0.lock().unwrap();
        let wire = &mut d.to_client;
        if wire.data.is_empty() {
            return if wire.fin {
                Ok(0)
            } else {
                Err(io::ErrorKind::WouldBlock.into())
            };
        }
        let n = buf.len().min(wire.data.len());
        for (b, byte) in buf.iter_mut().zip(wire.data.drain(..n)) {
            *b = byte;
        }
        Ok(n)
    }
}

impl Write for ClientEnd {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut d = self.0.lock().unwrap();
        let wire = &mut d.to_server;
        let n = buf.len().min(wire.cap - wire.data.len());
        if n == 0 && !buf.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        wire.data.extend(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct Noop;

impl Wake for Noop {
    fn wake(self: Arc<Self>) {}
}

fn waker() -> Waker {
    Waker::from(Arc::new(Noop))
}

/// A test CA, and leaf certificates for `localhost` it signs.
struct Pki {
    ca: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

struct Leaf {
    der: CertificateDer<'static>,
    cert_pem: String,
    key_pem: String,
}

impl Pki {
    fn new() -> Self {
        let mut params = CertificateParams::new(Vec::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "fanpipe test CA");
        let key = KeyPair::generate().unwrap();
        let ca = params.self_signed(&key).unwrap();
        Pki {
            ca: ca.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    fn leaf(&self, label: &str) -> Leaf {
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, label);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            der: cert.der().clone(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    fn client(&self, versions: &[&'static rustls::SupportedProtocolVersion]) -> ClientConnection {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.clone()).unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let name = ServerName::try_from("localhost").unwrap();
        ClientConnection::new(Arc::new(config), name).unwrap()
    }
}

/// A directory of its own for one test's PEM files, removed at the end.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("fanpipe-tls-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn install(&self, leaf: &Leaf) -> (PathBuf, PathBuf) {
        (
            self.write("cert.pem", &leaf.cert_pem),
            self.write("key.pem", &leaf.key_pem),
        )
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A server certificate on disk, its config, and the CA that clients trust.
struct Setup {
    pki: Pki,
    leaf: Leaf,
    dir: TempDir,
    config: TlsConfig,
}

fn setup() -> Setup {
    let pki = Pki::new();
    let leaf = pki.leaf("first");
    let dir = TempDir::new();
    let (cert, key) = dir.install(&leaf);
    let config = TlsConfig::load(cert, key).unwrap();
    Setup {
        pki,
        leaf,
        dir,
        config,
    }
}

/// One connection: the server's TLS socket, a rustls client, and the client's end.
struct Session {
    server: TlsSocket<ServerEnd>,
    client: ClientConnection,
    wire: ClientEnd,
}

impl Session {
    fn new(setup: &Setup, cap: usize) -> Self {
        Self::with_versions(setup, cap, rustls::DEFAULT_VERSIONS)
    }

    fn with_versions(
        setup: &Setup,
        cap: usize,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Self {
        let (server, wire) = pair(cap);
        Session {
            server: TlsSocket::new(server, &setup.config).unwrap(),
            client: setup.pki.client(versions),
            wire,
        }
    }

    /// Moves the client's records both ways as far as the wire allows. `Ok(true)` once
    /// the server's FIN has been read.
    fn pump_client(&mut self) -> Result<bool, rustls::Error> {
        while self.client.wants_write() {
            match self.client.write_tls(&mut self.wire) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("client write: {e}"),
            }
        }
        loop {
            match self.client.read_tls(&mut self.wire) {
                Ok(0) => return Ok(true),
                Ok(_) => {
                    self.client.process_new_packets()?;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                // The client's plaintext buffer is full: the test reads it next.
                Err(e) if e.kind() == io::ErrorKind::Other => return Ok(false),
                Err(e) => panic!("client read: {e}"),
            }
        }
    }

    /// Plaintext the server has for us, until it would block.
    fn server_read(&mut self, cx: &mut Context<'_>) -> io::Result<Vec<u8>> {
        let mut got = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            match self.server.poll_read(cx, &mut buf) {
                Poll::Ready(Ok(0)) | Poll::Pending => return Ok(got),
                Poll::Ready(Ok(n)) => got.extend_from_slice(&buf[..n]),
                Poll::Ready(Err(e)) => return Err(e),
            }
        }
    }

    /// Plaintext the client has received: `Ok(None)` at close_notify.
    fn client_read(&mut self) -> io::Result<Option<Vec<u8>>> {
        let mut got = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            match self.client.reader().read(&mut buf) {
                Ok(0) if got.is_empty() => return Ok(None),
                Ok(0) => return Ok(Some(got)),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Some(got)),
                Err(e) => return Err(e),
            }
        }
    }

    fn handshake(&mut self) {
        let waker = waker();
        let mut cx = Context::from_waker(&waker);
        for _ in 0..MAX_STEPS {
            self.pump_client().unwrap();
            let got = self.server_read(&mut cx).unwrap();
            assert!(got.is_empty(), "no data was sent");
            if !self.client.is_handshaking() && !self.server.is_handshaking() {
                // The server's last records (session tickets) reach the client too.
                self.pump_client().unwrap();
                return;
            }
        }
        panic!("the handshake did not finish");
    }

    /// Sends `data` from the client, and has the server echo it back in writes of three
    /// slices each; returns what the client got back and how many of the server's
    /// writes took bytes from past their first slice.
    fn echo(&mut self, data: &[u8]) -> (Vec<u8>, usize) {
        let waker = waker();
        let mut cx = Context::from_waker(&waker);
        let (mut sent, mut back, mut pending) = (0, Vec::new(), Vec::<u8>::new());
        let mut gathered = 0;
        for _ in 0..MAX_STEPS {
            if sent < data.len() {
                let end = data.len().min(sent + 50_000);
                sent += self.client.writer().write(&data[sent..end]).unwrap();
            }
            self.pump_client().unwrap();
            pending.extend(self.server_read(&mut cx).unwrap());
            while !pending.is_empty() {
                let (a, rest) = pending.split_at(pending.len().min(1000));
                let (b, c) = rest.split_at(rest.len() / 2);
                let slices = [IoSlice::new(a), IoSlice::new(b), IoSlice::new(c)];
                match self.server.poll_write_vectored(&mut cx, &slices) {
                    Poll::Ready(Ok(n)) => {
                        assert!(n > 0);
                        gathered += usize::from(n > a.len());
                        pending.drain(..n);
                    }
                    Poll::Ready(Err(e)) => panic!("server write: {e}"),
                    Poll::Pending => break,
                }
            }
            self.pump_client().unwrap();
            back.extend(self.client_read().unwrap().expect("no close_notify yet"));
            if back.len() == data.len() {
                return (back, gathered);
            }
        }
        panic!("the echo stalled at {} of {} bytes", back.len(), data.len());
    }
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

#[test]
fn handshake_and_large_echo_through_vectored_writes() {
    let setup = setup();
    let mut s = Session::new(&setup, 32 << 10);
    s.handshake();
    assert_eq!(s.server.alpn_protocol(), Some(ALPN_HTTP11));
    assert_eq!(s.client.alpn_protocol(), Some(ALPN_HTTP11));
    assert_eq!(s.server.server_name(), Some("localhost"));
    assert_eq!(
        s.client.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    let data = pattern(3 << 20);
    let (back, gathered) = s.echo(&data);
    assert!(back == data, "the echo differs");
    assert!(gathered > 0, "no write took bytes from more than one slice");
    let stats = setup.config.stats();
    assert_eq!(
        (stats.handshakes_completed(), stats.handshakes_failed()),
        (1, 0)
    );
}

/// What the server reads with a buffer of `size` until the stream ends (`Ok(0)`), the
/// client having sent `data` in uneven writes, then `end`.
fn read_body(s: &mut Session, data: &[u8], size: usize, end: impl FnOnce(&mut Session)) -> Vec<u8> {
    let waker = waker();
    let mut cx = Context::from_waker(&waker);
    let (mut sent, mut step) = (0, 5_000);
    while sent < data.len() {
        let end = data.len().min(sent + step);
        sent += s.client.writer().write(&data[sent..end]).unwrap();
        s.pump_client().unwrap();
        step = step * 7 % 70_001 + 1;
    }
    end(s);
    s.pump_client().unwrap();
    let mut buf = vec![0u8; size];
    let mut got = Vec::new();
    for _ in 0..MAX_STEPS {
        match s.server.poll_read(&mut cx, &mut buf) {
            Poll::Ready(Ok(0)) => return got,
            Poll::Ready(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Poll::Ready(Err(e)) => panic!("server read: {e}"),
            Poll::Pending => panic!(
                "the server waits with {} of {} bytes",
                got.len(),
                data.len()
            ),
        }
    }
    panic!("the read never ended");
}

#[test]
fn a_body_read_with_any_buffer_gives_every_byte_then_the_end() {
    let setup = setup();
    let data = pattern(300_001);
    // Buffers smaller and larger than a record, so that records are split across reads
    // wherever the sizes fall.
    for size in [
        8 << 10,
        24 << 10,
        24 << 10 | 1,
        40_000,
        81_920 + 7,
        256 << 10,
    ] {
        for clean in [true, false] {
            let mut s = Session::new(&setup, 1 << 20);
            s.handshake();
            let got = read_body(&mut s, &data, size, |s| {
                if clean {
                    // close_notify right behind the last records.
                    s.client.send_close_notify();
                } else {
                    // The FIN alone: the end of the stream all the same (HTTP's framing
                    // tells a cut body).
                    s.wire.shutdown();
                }
            });
            assert!(
                got == data,
                "buffer {size}, clean {clean}: the body differs"
            );
        }
    }
}

#[test]
fn tls12_works_too() {
    let setup = setup();
    let mut s = Session::with_versions(&setup, 32 << 10, &[&rustls::version::TLS12]);
    s.handshake();
    assert_eq!(
        s.client.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    assert_eq!(s.server.alpn_protocol(), Some(ALPN_HTTP11));
    let data = pattern(200_000);
    assert!(s.echo(&data).0 == data);
}

#[test]
fn a_client_that_does_not_read_holds_the_writer_back() {
    let setup = setup();
    let cap = 16 << 10;
    let mut s = Session::new(&setup, cap);
    s.handshake();
    let waker = waker();
    let mut cx = Context::from_waker(&waker);
    let chunk = pattern(1 << 20);
    let mut taken = 0;
    let mut blocked = false;
    for _ in 0..1000 {
        match s
            .server
            .poll_write_vectored(&mut cx, &[IoSlice::new(&chunk)])
        {
            Poll::Ready(Ok(n)) => taken += n,
            Poll::Ready(Err(e)) => panic!("server write: {e}"),
            Poll::Pending => {
                blocked = true;
                break;
            }
        }
    }
    assert!(blocked, "writes never waited");
    // The wire holds `cap`, rustls at most its limit (plus one record's overhead).
    assert!(
        taken <= cap + BUFFER_LIMIT + 1024,
        "took {taken} bytes with no reader"
    );
    // Once the client reads, the writer moves again and every taken byte arrives.
    let mut got = 0;
    for _ in 0..MAX_STEPS {
        s.pump_client().unwrap();
        got += s.client_read().unwrap().unwrap().len();
        if let Poll::Ready(r) = s.server.poll_flush(&mut cx) {
            r.unwrap();
        }
        if got == taken {
            break;
        }
    }
    assert_eq!(got, taken);
    assert!(matches!(s.server.poll_flush(&mut cx), Poll::Ready(Ok(()))));
    assert!(matches!(
        s.server
            .poll_write_vectored(&mut cx, &[IoSlice::new(b"more")]),
        Poll::Ready(Ok(4))
    ));
}

#[test]
fn a_clean_shutdown_sends_close_notify_then_the_fin() {
    let setup = setup();
    let mut s = Session::new(&setup, 4 << 10);
    s.handshake();
    let waker = waker();
    let mut cx = Context::from_waker(&waker);
    // Fill the wire so the shutdown has to wait for the client.
    let data = pattern(100_000);
    let mut taken = 0;
    while let Poll::Ready(Ok(n)) = s
        .server
        .poll_write_vectored(&mut cx, &[IoSlice::new(&data[taken..])])
    {
        taken += n;
    }
    assert!(s.server.poll_shutdown(&mut cx).is_pending());
    assert!(!s.wire.server_fin());
    let mut got = Vec::new();
    let mut closed = false;
    for _ in 0..MAX_STEPS {
        s.pump_client().unwrap();
        // An EOF before close_notify would be an `UnexpectedEof` error here.
        match s.client_read().unwrap() {
            Some(bytes) => got.extend(bytes),
            None => {
                closed = true;
                break;
            }
        }
        let _ = s.server.poll_shutdown(&mut cx);
    }
    assert!(closed, "no close_notify");
    assert!(got == data[..taken], "the data before close_notify differs");
    assert!(matches!(
        s.server.poll_shutdown(&mut cx),
        Poll::Ready(Ok(()))
    ));
    assert!(s.wire.server_fin(), "no FIN after close_notify");
    // Nothing may be written after the shutdown.
    assert!(matches!(
        s.server
            .poll_write_vectored(&mut cx, &[IoSlice::new(b"late")]),
        Poll::Ready(Err(_))
    ));
}

#[test]
fn shutdown_write_also_sends_close_notify() {
    let setup = setup();
    let mut s = Session::new(&setup, 32 << 10);
    s.handshake();
    let waker = waker();
    let mut cx = Context::from_waker(&waker);
    s.server.shutdown_write(&mut cx);
    assert!(s.pump_client().unwrap(), "no FIN");
    assert!(s.client_read().unwrap().is_none(), "no close_notify");
    // The client answers with its own close_notify and FIN: a clean end of stream.
    s.client.send_close_notify();
    s.pump_client().unwrap();
    s.wire.shutdown();
    assert!(matches!(
        s.server.poll_read(&mut cx, &mut [0u8; 16]),
        Poll::Ready(Ok(0))
    ));
}

#[test]
fn a_dropped_socket_is_a_cut_without_close_notify() {
    let setup = setup();
    let mut s = Session::new(&setup, 32 << 10);
    s.handshake();
    let waker = waker();
    let mut cx = Context::from_waker(&waker);
    assert!(matches!(
        s.server
            .poll_write_vectored(&mut cx, &[IoSlice::new(b"partial")]),
        Poll::Ready(Ok(7))
    ));
    drop(s.server);
    let (mut client, mut wire) = (s.client, s.wire);
    // The client reads what came, then sees the EOF with no close_notify.
    while client.read_tls(&mut wire).unwrap() > 0 {
        client.process_new_packets().unwrap();
    }
    let mut buf = [0u8; 64];
    assert_eq!(client.reader().read(&mut buf).unwrap(), 7);
    let cut = client.reader().read(&mut buf).unwrap_err();
    assert_eq!(cut.kind(), io::ErrorKind::UnexpectedEof);
}

#[test]
fn a_client_that_closes_sees_end_of_stream() {
    let setup = setup();
    let mut s = Session::new(&setup, 32 << 10);
    s.handshake();
    let waker = waker();
    let mut cx = Context::from_waker(&waker);
    s.client.writer().write_all(b"last words").unwrap();
    s.pump_client().unwrap();
    s.wire.shutdown();
    assert_eq!(s.server_read(&mut cx).unwrap(), b"last words");
    // EOF without close_notify reads as an end too; HTTP's framing tells a cut body.
    assert!(matches!(
        s.server.poll_read(&mut cx, &mut [0u8; 16]),
        Poll::Ready(Ok(0))
    ));
}

#[test]
fn a_response_written_before_the_handshake_waits_for_it() {
    // A refusal (503) is written before anything is read.
    let setup = setup();
    let mut s = Session::new(&setup, 32 << 10);
    let waker = waker();
    let mut cx = Context::from_waker(&waker);
    let reply = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n";
    let mut written = None;
    for _ in 0..100 {
        s.pump_client().unwrap();
        match s
            .server
            .poll_write_vectored(&mut cx, &[IoSlice::new(reply)])
        {
            Poll::Ready(Ok(n)) => {
                written = Some(n);
                break;
            }
            Poll::Ready(Err(e)) => panic!("server write: {e}"),
            Poll::Pending => assert!(s.server.is_handshaking()),
        }
    }
    assert_eq!(written, Some(reply.len()));
    s.pump_client().unwrap();
    assert_eq!(s.client_read().unwrap().unwrap(), reply);
}

#[test]
fn a_silent_client_costs_nothing_but_its_connection() {
    let setup = setup();
    let mut s = Session::new(&setup, 32 << 10);
    let waker = waker();
    let mut cx = Context::from_waker(&waker);
    for _ in 0..3 {
        assert!(s.server.poll_read(&mut cx, &mut [0u8; 64]).is_pending());
    }
    assert_eq!(s.wire.pending_to_client(), 0);
    // A probe that connects and leaves is no failed handshake.
    s.wire.shutdown();
    assert!(matches!(
        s.server.poll_read(&mut cx, &mut [0u8; 64]),
        Poll::Ready(Ok(0))
    ));
    let stats = setup.config.stats();
    assert_eq!(
        (stats.handshakes_completed(), stats.handshakes_failed()),
        (0, 0)
    );
}

#[test]
fn plain_http_gets_a_400_that_says_to_use_https() {
    let setup = setup();
    let (server, mut wire) = pair(32 << 10);
    let mut server = TlsSocket::new(server, &setup.config).unwrap();
    let waker = waker();
    let mut cx = Context::from_waker(&waker);
    wire.write_all(b"PUT /pipe HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n\r\nhello")
        .unwrap();
    // The reply and the FIN go out; the server then waits (bounded) for the client.
    assert!(server.poll_read(&mut cx, &mut [0u8; 64]).is_pending());
    let mut reply = Vec::new();
    wire.read_to_end(&mut reply).unwrap();
    let reply = String::from_utf8(reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{reply}");
    let (head, body) = reply.split_once("\r\n\r\n").unwrap();
    assert!(head.contains(&format!("Content-Length: {}\r\n", body.len())));
    assert!(body.contains("https://"), "{body}");
    wire.shutdown();
    assert!(matches!(
        server.poll_read(&mut cx, &mut [0u8; 64]),
        Poll::Ready(Err(_))
    ));
    // Writes fail too, at once.
    assert!(matches!(
        server.poll_write_vectored(&mut cx, &[IoSlice::new(b"x")]),
        Poll::Ready(Err(_))
    ));
    let stats = setup.config.stats();
    assert_eq!(stats.plain_http(), 1);
    assert_eq!(
        (stats.handshakes_completed(), stats.handshakes_failed()),
        (0, 0)
    );
}

#[test]
fn a_plain_http_client_that_keeps_sending_is_cut_off() {
    let setup = setup();
    let (server, mut wire) = pair(1 << 20);
    let mut server = TlsSocket::new(server, &setup.config).unwrap();
    let waker = waker();
    let mut cx = Context::from_waker(&waker);
    wire.write_all(&[b'P'; 200_000]).unwrap();
    assert!(matches!(
        server.poll_read(&mut cx, &mut [0u8; 64]),
        Poll::Ready(Err(_))
    ));
}

#[test]
fn garbage_is_an_error_and_a_failed_handshake() {
    let setup = setup();
    for garbage in [
        &b"\x00\x01\x02\x03\x04\x05\x06\x07 not TLS at all"[..],
        &b"\x16\x03\x01\x00\x08not a ClientHello"[..],
        &b"\x80\x2e\x01\x00\x02 an SSLv2 hello"[..],
        // A close_notify alert before any hello, with more bytes behind it.
        &b"\x15\x03\x03\x00\x02\x01\x00\x16\x03\x01\x00\x04more"[..],
    ] {
        let (server, mut wire) = pair(32 << 10);
        let mut server = TlsSocket::new(server, &setup.config).unwrap();
        let waker = waker();
        let mut cx = Context::from_waker(&waker);
        wire.write_all(garbage).unwrap();
        let mut result = server.poll_read(&mut cx, &mut [0u8; 64]);
        // A record shorter than its header says waits for the rest, which never comes.
        if result.is_pending() {
            wire.shutdown();
            result = server.poll_read(&mut cx, &mut [0u8; 64]);
        }
        assert!(
            matches!(result, Poll::Ready(Err(_))),
            "{garbage:?}: {result:?}"
        );
        assert!(server.poll_read(&mut cx, &mut [0u8; 64]).is_ready());
    }
    let stats = setup.config.stats();
    assert_eq!(stats.handshakes_failed(), 4);
    assert_eq!(stats.handshakes_completed(), 0);
    assert_eq!(stats.plain_http(), 0);
}

#[test]
fn a_client_that_rejects_the_certificate_fails_the_handshake() {
    let setup = setup();
    let mut s = Session::new(&setup, 32 << 10);
    // A client that trusts another CA aborts with an alert.
    s.client = Pki::new().client(rustls::DEFAULT_VERSIONS);
    let waker = waker();
    let mut cx = Context::from_waker(&waker);
    let mut server_error = None;
    for _ in 0..100 {
        if s.pump_client().is_err() {
            s.pump_client().ok();
        }
        match s.server.poll_read(&mut cx, &mut [0u8; 64]) {
            Poll::Ready(Err(e)) => {
                server_error = Some(e);
                break;
            }
            Poll::Ready(Ok(n)) => panic!("read {n}"),
            Poll::Pending => {}
        }
    }
    let e = server_error.expect("the server saw no alert");
    assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    assert_eq!(setup.config.stats().handshakes_failed(), 1);
}

#[test]
fn reload_serves_the_new_certificate_to_new_handshakes_only() {
    let setup = setup();
    let mut old = Session::new(&setup, 32 << 10);
    old.handshake();
    assert_eq!(old.client.peer_certificates().unwrap()[0], setup.leaf.der);

    let second = setup.pki.leaf("second");
    setup.dir.install(&second);
    setup.config.reload().unwrap();
    let mut new = Session::new(&setup, 32 << 10);
    new.handshake();
    assert_eq!(new.client.peer_certificates().unwrap()[0], second.der);

    // The connection from before the reload goes on, with its own certificate.
    let data = pattern(100_000);
    assert!(old.echo(&data).0 == data);
    assert!(new.echo(&data).0 == data);
    assert_eq!(setup.config.stats().handshakes_completed(), 2);
}

#[test]
fn a_failed_reload_keeps_the_old_certificate() {
    let setup = setup();
    let other = setup.pki.leaf("other");
    // A key that is not the certificate's.
    setup.dir.write("key.pem", &other.key_pem);
    assert!(matches!(
        setup.config.reload(),
        Err(TlsError::KeyMismatch { .. })
    ));
    // A certificate file that is no PEM at all.
    setup.dir.write("cert.pem", "not a certificate\n");
    assert!(matches!(
        setup.config.reload(),
        Err(TlsError::NoCertificate { .. })
    ));
    // A missing file.
    std::fs::remove_file(setup.dir.0.join("cert.pem")).unwrap();
    let e = setup.config.reload().unwrap_err();
    assert!(matches!(e, TlsError::Read { .. }), "{e}");
    assert!(e.to_string().contains("cert.pem"), "{e}");

    let mut s = Session::new(&setup, 32 << 10);
    s.handshake();
    assert_eq!(s.client.peer_certificates().unwrap()[0], setup.leaf.der);
}

#[test]
fn loading_says_what_is_wrong() {
    let pki = Pki::new();
    let leaf = pki.leaf("leaf");
    let other = pki.leaf("other");
    let dir = TempDir::new();
    let cert = dir.write("cert.pem", &leaf.cert_pem);
    let key = dir.write("key.pem", &leaf.key_pem);
    let wrong_key = dir.write("other-key.pem", &other.key_pem);
    let empty = dir.write("empty.pem", "");
    let missing = dir.0.join("missing.pem");
    let broken = dir.write(
        "broken.pem",
        "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n",
    );

    assert!(TlsConfig::load(&cert, &key).is_ok());
    // One file with the chain and the key serves as both.
    let both = dir.write("both.pem", &format!("{}{}", leaf.cert_pem, leaf.key_pem));
    assert!(TlsConfig::load(&both, &both).is_ok());

    let check = |cert: &PathBuf, key: &PathBuf, what: fn(&TlsError) -> bool| {
        let e = TlsConfig::load(cert, key).unwrap_err();
        assert!(what(&e), "{e:?}");
        assert!(!e.to_string().is_empty());
    };
    check(&missing, &key, |e| matches!(e, TlsError::Read { .. }));
    check(&cert, &missing, |e| matches!(e, TlsError::Read { .. }));
    check(&empty, &key, |e| {
        matches!(e, TlsError::NoCertificate { .. })
    });
    check(&key, &key, |e| matches!(e, TlsError::NoCertificate { .. }));
    check(&cert, &empty, |e| matches!(e, TlsError::NoKey { .. }));
    check(&cert, &cert, |e| matches!(e, TlsError::NoKey { .. }));
    check(&cert, &wrong_key, |e| {
        matches!(e, TlsError::KeyMismatch { .. })
    });
    check(&broken, &key, |e| matches!(e, TlsError::Pem { .. }));
}

#[test]
fn a_session_moves_to_another_descriptor() {
    fn send<T: Send>() {}
    send::<TlsSession>();
    send::<TlsConfig>();

    let setup = setup();
    let mut s = Session::new(&setup, 32 << 10);
    s.handshake();
    let waker = waker();
    let mut cx = Context::from_waker(&waker);
    // The request head is read, and bytes after it already wait, as at a handover.
    s.client
        .writer()
        .write_all(b"GET /p HTTP/1.1\r\n\r\nbody")
        .unwrap();
    s.pump_client().unwrap();
    let mut head = [0u8; 19];
    assert!(matches!(
        s.server.poll_read(&mut cx, &mut head),
        Poll::Ready(Ok(19))
    ));
    let (stream, session) = s.server.into_parts();
    let moved = stream.dup();
    drop(stream);
    s.server = TlsSocket::from_parts(moved, session);
    assert_eq!(s.server_read(&mut cx).unwrap(), b"body");
    let data = pattern(50_000);
    assert!(s.echo(&data).0 == data);
}

#[test]
fn the_counters_render_as_prometheus_series() {
    let stats = TlsStats::default();
    TlsStats::count(&stats.completed);
    TlsStats::count(&stats.completed);
    TlsStats::count(&stats.failed);
    let mut page = String::new();
    stats.render(&mut page);
    assert!(page.contains("fanpipe_tls_handshakes_total{outcome=\"completed\"} 2\n"));
    assert!(page.contains("fanpipe_tls_handshakes_total{outcome=\"failed\"} 1\n"));
    assert!(page.contains("fanpipe_tls_plain_http_total 0\n"));
}

/// A real loopback connection: the kernel's partial reads and writes, FIN and close.
mod loopback {
    use std::net::{Shutdown, TcpListener, TcpStream};
    use std::thread;
    use std::time::{Duration, Instant};

    use super::*;

    /// A nonblocking std stream as a backend's socket; the test's loop polls it again at
    /// once instead of waiting for readiness.
    struct Tcp(TcpStream);

    impl Socket for Tcp {
        fn poll_read(&mut self, _: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
            match self.0.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Poll::Pending,
                r => Poll::Ready(r),
            }
        }

        fn poll_write_vectored(
            &mut self,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            match self.0.write_vectored(bufs) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Poll::Pending,
                r => Poll::Ready(r),
            }
        }

        fn shutdown_write(&mut self, _: &mut Context<'_>) {
            let _ = self.0.shutdown(Shutdown::Write);
        }
    }

    /// Polls `f` until it is ready, for at most ten seconds.
    fn block_on<T>(mut f: impl FnMut(&mut Context<'_>) -> Poll<T>) -> T {
        let waker = waker();
        let mut cx = Context::from_waker(&waker);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Poll::Ready(t) = f(&mut cx) {
                return t;
            }
            assert!(Instant::now() < deadline, "stuck");
            thread::sleep(Duration::from_micros(200));
        }
    }

    /// A tiny HTTPS responder: reads a request head, answers with `body` in writes of
    /// head and body slices, ends cleanly, and waits for the client to close.
    fn serve(listener: TcpListener, config: TlsConfig, body: Vec<u8>) -> io::Result<()> {
        let (stream, _) = listener.accept()?;
        stream.set_nonblocking(true)?;
        let mut sock = TlsSocket::new(Tcp(stream), &config)?;
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut buf = [0u8; 1024];
            let n = block_on(|cx| sock.poll_read(cx, &mut buf))?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            head.extend_from_slice(&buf[..n]);
        }
        let reply = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        );
        let mut sent = 0;
        let total = reply.len() + body.len();
        while sent < total {
            let slices = if sent < reply.len() {
                [IoSlice::new(&reply.as_bytes()[sent..]), IoSlice::new(&body)]
            } else {
                [IoSlice::new(&body[sent - reply.len()..]), IoSlice::new(&[])]
            };
            sent += block_on(|cx| sock.poll_write_vectored(cx, &slices))?;
        }
        block_on(|cx| sock.poll_shutdown(cx))?;
        // The lingering close: read until the client's close.
        let mut buf = [0u8; 1024];
        while block_on(|cx| sock.poll_read(cx, &mut buf))? > 0 {}
        Ok(())
    }

    #[test]
    fn an_https_exchange_over_loopback_tcp() {
        let setup = setup();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let body = pattern(4 << 20);
        let server = {
            let (config, body) = (setup.config.clone(), body.clone());
            thread::spawn(move || serve(listener, config, body))
        };
        let tcp = TcpStream::connect(addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut tls = rustls::StreamOwned::new(setup.pki.client(rustls::DEFAULT_VERSIONS), tcp);
        tls.write_all(b"GET /x HTTP/1.1\r\nhost: localhost\r\n\r\n")
            .unwrap();
        let mut response = Vec::new();
        // read_to_end fails on an EOF that no close_notify announced.
        tls.read_to_end(&mut response).unwrap();
        let split = response.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        assert!(response.starts_with(b"HTTP/1.1 200 OK\r\n"));
        assert!(response[split..] == body[..], "the body differs");
        tls.conn.send_close_notify();
        tls.flush().unwrap();
        tls.sock.shutdown(Shutdown::Both).unwrap();
        server.join().unwrap().unwrap();
        assert_eq!(setup.config.stats().handshakes_completed(), 1);
    }
}

#[test]
fn maybe_tls_passes_plain_sockets_through() {
    let setup = setup();
    let waker = waker();
    let mut cx = Context::from_waker(&waker);
    let (server, mut wire) = pair(1024);
    let mut plain = MaybeTls::accept(server, None).unwrap();
    wire.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let mut buf = [0u8; 64];
    assert!(matches!(
        plain.poll_read(&mut cx, &mut buf),
        Poll::Ready(Ok(18))
    ));
    assert!(matches!(plain.poll_shutdown(&mut cx), Poll::Ready(Ok(()))));
    assert!(wire.server_fin());

    let (server, wire) = pair(32 << 10);
    let mut s = Session {
        server: TlsSocket::new(server, &setup.config).unwrap(),
        client: setup.pki.client(rustls::DEFAULT_VERSIONS),
        wire,
    };
    s.handshake();
    let (stream, session) = s.server.into_parts();
    let mut tls = MaybeTls::Tls(TlsSocket::from_parts(stream, session));
    assert!(matches!(
        tls.poll_write_vectored(&mut cx, &[IoSlice::new(b"hi")]),
        Poll::Ready(Ok(2))
    ));
    assert!(matches!(tls.poll_shutdown(&mut cx), Poll::Ready(Ok(()))));
    let (mut client, mut wire) = (s.client, s.wire);
    while client.read_tls(&mut wire).unwrap() > 0 {
        client.process_new_packets().unwrap();
    }
    let mut got = Vec::new();
    client.reader().read_to_end(&mut got).unwrap();
    assert_eq!(got, b"hi");
}
