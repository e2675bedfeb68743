//! The conformance suite over HTTPS. With `FANPIPE_TLS=1`, [`crate::common::Server::start`]
//! gives the server a certificate made at test time (signed by a test CA, for `localhost`
//! and `127.0.0.1`), its URLs are `https://`, [`crate::common::curl`] trusts the CA, and
//! raw clients ([`connect`]) reach the server through a TLS bridge on a loopback port, so
//! a test's bytes are the same either way.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::thread;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};
use socket2::{Domain, Socket, Type};

/// Whether this run of the suite speaks HTTPS (`FANPIPE_TLS=1`).
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("FANPIPE_TLS").is_ok_and(|v| v == "1"))
}

/// A test CA, and a way to sign leaf certificates with it.
pub struct Pki {
    pub ca_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    pub dir: PathBuf,
}

/// A leaf certificate and its key, as PEM.
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Pki {
    /// A new CA, its certificate written to `dir/ca.pem`.
    pub fn new(dir: PathBuf) -> Pki {
        let mut params = CertificateParams::new(Vec::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "fanpipe test CA");
        let key = KeyPair::generate().expect("CA key");
        let ca = params.self_signed(&key).expect("CA certificate");
        std::fs::create_dir_all(&dir).expect("PKI directory");
        std::fs::write(dir.join("ca.pem"), ca.pem()).expect("write ca.pem");
        Pki {
            ca_der: ca.der().clone(),
            issuer: Issuer::new(params, key),
            dir,
        }
    }

    /// A leaf certificate for `localhost` and `127.0.0.1`, named `label`.
    pub fn leaf(&self, label: &str) -> Leaf {
        let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        let mut params = CertificateParams::new(names).expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, label);
        let key = KeyPair::generate().expect("leaf key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("leaf certificate");
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// Writes `leaf` to `dir/NAME.crt` and `dir/NAME.key`; returns the two paths.
    pub fn write(&self, leaf: &Leaf, name: &str) -> (PathBuf, PathBuf) {
        let (cert, key) = (
            self.dir.join(format!("{name}.crt")),
            self.dir.join(format!("{name}.key")),
        );
        std::fs::write(&cert, &leaf.cert_pem).expect("write the certificate");
        std::fs::write(&key, &leaf.key_pem).expect("write the key");
        (cert, key)
    }

    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// A rustls client config that trusts this CA (HTTP/1.1 by ALPN).
    pub fn client_config(&self) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca_der.clone()).expect("add the CA");
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }
}

/// This process's CA and the server certificate of the suite over HTTPS.
pub struct Suite {
    pub pki: Pki,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client: Arc<ClientConfig>,
}

/// Made once per test binary, in a directory of the system's temp dir.
pub fn suite() -> &'static Suite {
    static SUITE: OnceLock<Suite> = OnceLock::new();
    SUITE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("fanpipe-tls-suite-{}", std::process::id()));
        let pki = Pki::new(dir);
        let (cert, key) = pki.write(&pki.leaf("fanpipe test server"), "server");
        let client = pki.client_config();
        Suite {
            pki,
            cert,
            key,
            client,
        }
    })
}

/// The flags that make the server serve HTTPS with the suite's certificate.
pub fn server_flags() -> Vec<String> {
    let s = suite();
    vec![
        "--tls-cert".into(),
        s.cert.display().to_string(),
        "--tls-key".into(),
        s.key.display().to_string(),
    ]
}

/// A plain TCP connection that reaches `server` (an HTTPS port) through a TLS client of
/// its own: a thread speaks TLS to the server and plaintext to the caller, whose
/// connection it takes from the process's [`Meeting`] point. The ends are passed on: the
/// caller's FIN becomes close_notify and a FIN; the server's close_notify or FIN becomes
/// a FIN; a TLS error or a reset closes both ways.
pub fn bridge(server: SocketAddr, config: Arc<ClientConfig>) -> io::Result<TcpStream> {
    let meeting = Meeting::get()?;
    let upstream = TcpStream::connect(server)?;
    let caller = TcpStream::connect(meeting.addr)?;
    let key = caller.local_addr()?;
    thread::Builder::new()
        .name("tls-bridge".into())
        .stack_size(256 * 1024)
        .spawn(move || {
            run_bridge(|| meeting.take(key), upstream, config);
        })?;
    Ok(caller)
}

/// One loopback listener for every bridge of the process, so that a bridge costs no port
/// of its own: a load test bridges thousands of connections, and listeners on ephemeral
/// ports, with the connections' own ports and their TIME_WAITs, once ran the range out.
/// Each accepted connection goes to the bridge whose caller made it (by its address),
/// whichever of the two comes first.
struct Meeting {
    addr: SocketAddr,
    slots: Mutex<HashMap<SocketAddr, Slot>>,
}

enum Slot {
    /// Accepted before its bridge asked for it.
    Arrived(TcpStream),
    /// A bridge waits for it.
    Awaited(mpsc::Sender<TcpStream>),
}

impl Meeting {
    fn get() -> io::Result<&'static Meeting> {
        static MEETING: OnceLock<Meeting> = OnceLock::new();
        if let Some(meeting) = MEETING.get() {
            return Ok(meeting);
        }
        // std listens with a backlog of 128: a thousand callers connecting at once would
        // overflow it and wait out SYN retransmits.
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        socket.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
        socket.listen(4096)?;
        let listener = TcpListener::from(socket);
        let meeting = MEETING.get_or_init(|| Meeting {
            addr: listener.local_addr().expect("the listener's address"),
            slots: Mutex::new(HashMap::new()),
        });
        if meeting.addr == listener.local_addr()? {
            // This call made it: its listener is the one callers connect to.
            thread::Builder::new()
                .name("tls-bridge-meeting".into())
                .spawn(move || {
                    for (stream, peer) in listener.incoming().filter_map(|s| {
                        let s = s.ok()?;
                        let peer = s.peer_addr().ok()?;
                        Some((s, peer))
                    }) {
                        meeting.arrive(peer, stream);
                    }
                })?;
        }
        Ok(meeting)
    }

    fn arrive(&self, peer: SocketAddr, stream: TcpStream) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        match slots.remove(&peer) {
            Some(Slot::Awaited(to)) => {
                let _ = to.send(stream);
            }
            _ => {
                slots.insert(peer, Slot::Arrived(stream));
            }
        }
    }

    /// The connection the caller at `peer` made, once accepted.
    fn take(&self, peer: SocketAddr) -> Option<TcpStream> {
        let waiting = {
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            match slots.remove(&peer) {
                Some(Slot::Arrived(stream)) => return Some(stream),
                _ => {
                    let (to, from) = mpsc::channel();
                    slots.insert(peer, Slot::Awaited(to));
                    from
                }
            }
        };
        waiting.recv_timeout(HANDSHAKE_TIMEOUT).ok()
    }
}

/// The bytes the TLS client wants to send, sent in order under `out`'s lock.
fn flush(conn: &Mutex<ClientConnection>, out: &Mutex<&TcpStream>) -> io::Result<()> {
    let mut sock = out.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let mut bytes = Vec::new();
        {
            let mut c = conn.lock().unwrap_or_else(|e| e.into_inner());
            while c.wants_write() {
                c.write_tls(&mut bytes)?;
            }
        }
        if bytes.is_empty() {
            return Ok(());
        }
        sock.write_all(&bytes)?;
    }
}

/// Hands `bytes` to the TLS client and sends its records (the handshake is done: rustls
/// takes what fits in its buffer, and each flush empties it).
fn send_plaintext(
    conn: &Mutex<ClientConnection>,
    out: &Mutex<&TcpStream>,
    mut bytes: &[u8],
) -> io::Result<()> {
    while !bytes.is_empty() {
        let taken = conn
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .writer()
            .write(bytes)?;
        flush(conn, out)?;
        if taken == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        bytes = &bytes[taken..];
    }
    Ok(())
}

/// How long the bridge waits for the server to finish a handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);

/// Bridges the caller's connection (`plain`, once the handshake is done) to `upstream`.
fn run_bridge(
    plain: impl FnOnce() -> Option<TcpStream>,
    upstream: TcpStream,
    config: Arc<ClientConfig>,
) {
    let _ = upstream.set_nodelay(true);
    let name = ServerName::try_from("localhost").expect("server name");
    let mut client = ClientConnection::new(config, name).expect("TLS client");
    // The handshake first, blocking: the caller's bytes wait in its socket meanwhile, as
    // behind a slow TCP peer, and no thread polls a handshake still under way (thousands
    // of bridges doing so once took the CPU from the server they wait for).
    let _ = upstream.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
    let handshake = {
        let mut io = &upstream;
        client.complete_io(&mut io)
    };
    let _ = upstream.set_read_timeout(None);
    // The caller's connection is taken after the handshake, which the server times from
    // its accept: a caller slow to be accepted here delays nothing on that side.
    let Some(plain) = plain() else {
        return;
    };
    let _ = plain.set_nodelay(true);
    if handshake.is_err() || client.is_handshaking() {
        let _ = plain.shutdown(Shutdown::Both);
        let _ = upstream.shutdown(Shutdown::Both);
        return;
    }
    // Both ways share the two sockets (no duplicated descriptors: a load test bridges
    // thousands of connections); records go out under `out`'s lock, in order.
    let conn = Mutex::new(client);
    let out = Mutex::new(&upstream);
    thread::scope(|scope| {
        // Caller to server: plaintext in, records out.
        let up = thread::Builder::new()
            .name("tls-bridge-up".into())
            .stack_size(256 * 1024)
            .spawn_scoped(scope, || bridge_up(&plain, &conn, &out));
        // Server to caller: records in, plaintext out.
        bridge_down(&plain, &upstream, &conn, &out);
        // The caller's side ends when it closes; the bridge ends with it.
        drop(up);
    });
}

/// The caller's plaintext to the server, as records; its FIN as close_notify and a FIN.
fn bridge_up(plain: &TcpStream, conn: &Mutex<ClientConnection>, out: &Mutex<&TcpStream>) {
    let mut from = plain;
    let mut buf = vec![0; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) => {
                conn.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .send_close_notify();
                let _ = flush(conn, out);
                let sock = out.lock().unwrap_or_else(|e| e.into_inner());
                let _ = sock.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => {
                if send_plaintext(conn, out, &buf[..n]).is_err() {
                    // As over TCP, a failed send leaves what the server sent before to
                    // be read: the other way ends the caller's side.
                    return;
                }
            }
            Err(_) => {
                let sock = out.lock().unwrap_or_else(|e| e.into_inner());
                let _ = sock.shutdown(Shutdown::Both);
                return;
            }
        }
    }
}

/// The server's records to the caller, as plaintext; its close_notify or FIN as a FIN, a
/// TLS error or a reset as both ways closed.
fn bridge_down(
    plain: &TcpStream,
    upstream: &TcpStream,
    conn: &Mutex<ClientConnection>,
    out: &Mutex<&TcpStream>,
) {
    let (mut from, mut to) = (upstream, plain);
    let mut buf = vec![0; 32 * 1024];
    let mut plaintext = vec![0; 32 * 1024];
    // The handshake's last read may have brought the server's first bytes too.
    if !pass_plaintext(conn, &mut to, &mut plaintext) {
        return;
    }
    'down: loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break 'down,
            Ok(n) => n,
            Err(_) => {
                let _ = plain.shutdown(Shutdown::Both);
                break 'down;
            }
        };
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            let processed = {
                let mut c = conn.lock().unwrap_or_else(|e| e.into_inner());
                match c.read_tls(&mut rest) {
                    Ok(_) => c.process_new_packets().map(|_| ()),
                    Err(_) => Ok(()),
                }
            };
            let _ = flush(conn, out);
            if processed.is_err() {
                let _ = plain.shutdown(Shutdown::Both);
                let _ = upstream.shutdown(Shutdown::Both);
                break 'down;
            }
            if !pass_plaintext(conn, &mut to, &mut plaintext) {
                let _ = upstream.shutdown(Shutdown::Both);
                break 'down;
            }
        }
    }
    let _ = plain.shutdown(Shutdown::Write);
}

/// Writes what plaintext the TLS client holds to the caller (the server's close_notify
/// as a FIN); `false` once the caller is gone.
fn pass_plaintext(conn: &Mutex<ClientConnection>, to: &mut &TcpStream, buf: &mut [u8]) -> bool {
    loop {
        let read = conn
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .reader()
            .read(buf);
        match read {
            Ok(0) => {
                // close_notify: the server's clean end.
                let _ = to.shutdown(Shutdown::Write);
                return true;
            }
            Ok(k) => {
                if to.write_all(&buf[..k]).is_err() {
                    return false;
                }
            }
            // WouldBlock: nothing more until records come.
            Err(_) => return true,
        }
    }
}
