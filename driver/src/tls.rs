//! TLS for any [`Socket`]: a server-side wrapper over rustls's sans-io
//! [`ServerConnection`], so that every backend gets HTTPS by wrapping its stream and the
//! driver and core see plaintext as before.
//!
//! # Wiring it into a backend
//!
//! - At start, load the certificate chain and key once: `TlsConfig::load(cert, key)`. A
//!   failure is a typed [`TlsError`] to report before binding. The handle is an `Arc`:
//!   clone it into every accept loop and core.
//! - At accept, when TLS is on, wrap the stream before anything reads it:
//!   `TlsSocket::new(stream, &tls_config)`, or `MaybeTls::accept(stream, tls.as_ref())`
//!   so one socket type serves both modes, and drive that instead of the bare stream.
//!   No handshake is awaited in the accept loop: it runs inside the first `poll_read`
//!   (or `poll_write_vectored`), so a client that sends nothing costs only its own
//!   connection, and the head timeout the driver already arms bounds it.
//! - The driver should end a connection with [`Socket::poll_shutdown`] (close_notify,
//!   then the FIN) and call [`Socket::poll_flush`] when it has nothing more to write.
//!   Until it does, the legacy [`Socket::shutdown_write`] queues close_notify and later
//!   `poll_read`/`poll_write_vectored` calls finish the flush and the FIN, and every
//!   `poll_read` pushes out records still queued, so a driver that reads after its last
//!   write (as the lingering close does) never strands the response's tail. Dropping a
//!   socket without a shutdown is a cut: no close_notify is sent.
//! - `SIGHUP`: call [`TlsConfig::reload`]; on error it keeps serving the old certificate
//!   and returns the error for the caller to log. Running connections keep the config
//!   they started with.
//! - `/metrics`: [`TlsConfig::stats`] counts handshakes completed and failed and plain
//!   HTTP requests answered 400; [`TlsStats::render`] appends them as Prometheus series.
//!
//! # glommio's cross-core handover
//!
//! glommio hands a connection to the core that owns its pipe as a duplicate descriptor
//! plus the `Conn` holding the bytes already read. It could hand over before any byte
//! is read only if the owner were known at accept; it is not, since the owner follows
//! from the pipe's name in the request head, which under TLS is encrypted. So the
//! handshake and the head are done on the accepting core, and the TLS session (keys,
//! sequence numbers, ciphertext read past the head, records not yet sent) must travel
//! with the descriptor: the new core cannot start a new session on the same TCP stream.
//! [`TlsSocket::into_parts`] splits the socket into the stream and a [`TlsSession`],
//! which is `Send` (rustls's connection is), to put in the `Handover` beside the
//! descriptor; the owning core rebuilds it around its own stream with
//! [`TlsSocket::from_parts`]. The accepting core must neither read nor write the
//! stream after `into_parts`, and drops its copy of the descriptor right away, as now.

use std::fmt;
use std::fs;
use std::io::{self, IoSlice, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{ready, Context, Poll};

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{InconsistentKeys, ServerConfig, ServerConnection};

use fanpipe_core::pipe::PeerState;

use crate::Socket;

#[cfg(test)]
mod tests;

/// The application protocols offered: fanpipe speaks HTTP/1.1, and HTTP/1.0.
pub const ALPN_HTTP11: &[u8] = b"http/1.1";
/// HTTP/1.0, which fanpipe also serves (a receiver of a body of known length).
pub const ALPN_HTTP10: &[u8] = b"http/1.0";

/// How much plaintext waiting for the handshake and how many encrypted bytes waiting for
/// the socket rustls may hold per connection. Past it writes return `Pending`, so a slow
/// client slows its pipe instead of growing the server's memory.
pub const BUFFER_LIMIT: usize = 64 << 10;

/// What a client that spoke plain HTTP to the TLS port gets before the close.
const PLAIN_HTTP_REPLY: &[u8] = b"HTTP/1.1 400 Bad Request\r\n\
Content-Type: text/plain\r\n\
Content-Length: 49\r\n\
Connection: close\r\n\
\r\n\
This port speaks TLS: use https:// not http://.\r\n";

/// How much of a plain HTTP request is read and dropped after the 400, so that closing
/// with unread bytes does not reset the connection and lose the reply on the way.
const PLAIN_DRAIN_LIMIT: usize = 64 << 10;

/// Why a certificate and key could not be loaded.
#[derive(Debug)]
pub enum TlsError {
    /// A file could not be read (missing, no permission).
    Read { path: PathBuf, source: io::Error },
    /// A file is not well-formed PEM.
    Pem { path: PathBuf, source: pem::Error },
    /// The certificate file holds no certificate.
    NoCertificate { path: PathBuf },
    /// The key file holds no unencrypted private key (PKCS#8, PKCS#1 or SEC1).
    NoKey { path: PathBuf },
    /// The private key is not the one the (first) certificate was issued for.
    KeyMismatch { cert: PathBuf, key: PathBuf },
    /// rustls refused the chain or the key (an unsupported key type, say).
    Rejected(rustls::Error),
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsError::Read { path, source } => {
                write!(f, "cannot read {}: {source}", path.display())
            }
            TlsError::Pem { path, source } => {
                write!(f, "{} is not valid PEM: {source}", path.display())
            }
            TlsError::NoCertificate { path } => {
                write!(
                    f,
                    "no certificate (BEGIN CERTIFICATE) in {}",
                    path.display()
                )
            }
            TlsError::NoKey { path } => write!(
                f,
                "no unencrypted private key (PKCS#8, PKCS#1 or SEC1 PEM) in {}",
                path.display()
            ),
            TlsError::KeyMismatch { cert, key } => write!(
                f,
                "the key in {} does not match the certificate in {}",
                key.display(),
                cert.display()
            ),
            TlsError::Rejected(e) => write!(f, "certificate or key refused: {e}"),
        }
    }
}

impl std::error::Error for TlsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TlsError::Read { source, .. } => Some(source),
            TlsError::Pem { source, .. } => Some(source),
            TlsError::Rejected(e) => Some(e),
            _ => None,
        }
    }
}

/// Counters for `/metrics`, shared by every connection of a [`TlsConfig`].
#[derive(Debug, Default)]
pub struct TlsStats {
    completed: AtomicU64,
    failed: AtomicU64,
    plain_http: AtomicU64,
}

impl TlsStats {
    /// Handshakes that finished.
    pub fn handshakes_completed(&self) -> u64 {
        self.completed.load(Ordering::Relaxed)
    }

    /// Handshakes that began (a first byte that is not plain HTTP) and did not finish: a
    /// TLS error, an alert, garbage, or the client leaving mid-way.
    pub fn handshakes_failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// Connections that spoke plain HTTP and were answered 400.
    pub fn plain_http(&self) -> u64 {
        self.plain_http.load(Ordering::Relaxed)
    }

    /// The counters as Prometheus series, to append to the `/metrics` page.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        let _ = writeln!(
            out,
            "# HELP fanpipe_tls_handshakes_total TLS handshakes by outcome.\n\
             # TYPE fanpipe_tls_handshakes_total counter\n\
             fanpipe_tls_handshakes_total{{outcome=\"completed\"}} {}\n\
             fanpipe_tls_handshakes_total{{outcome=\"failed\"}} {}\n\
             # HELP fanpipe_tls_plain_http_total Plain HTTP requests on the TLS port, answered 400.\n\
             # TYPE fanpipe_tls_plain_http_total counter\n\
             fanpipe_tls_plain_http_total {}",
            self.handshakes_completed(),
            self.handshakes_failed(),
            self.plain_http()
        );
    }

    fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// The server's certificate store: where the chain and key live, the rustls config built
/// from them, and the handshake counters. Cheap to clone and share across threads; a
/// [`reload`](Self::reload) is seen by the handshakes that start after it.
#[derive(Clone)]
pub struct TlsConfig {
    shared: Arc<Shared>,
}

struct Shared {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<ServerConfig>>,
    stats: Arc<TlsStats>,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("cert", &self.shared.cert)
            .field("key", &self.shared.key)
            .finish_non_exhaustive()
    }
}

impl TlsConfig {
    /// Loads a PEM certificate chain (leaf first) and its PEM private key.
    pub fn load(cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Result<Self, TlsError> {
        let (cert, key) = (cert.into(), key.into());
        let config = server_config(&cert, &key)?;
        Ok(TlsConfig {
            shared: Arc::new(Shared {
                cert,
                key,
                current: RwLock::new(config),
                stats: Arc::default(),
            }),
        })
    }

    /// Reads the same two files again and serves them to new handshakes. On error the
    /// old certificate stays in use and the error is returned for the caller to log.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = server_config(&self.shared.cert, &self.shared.key)?;
        // A panic elsewhere must not stop the server from handshaking.
        *self
            .shared
            .current
            .write()
            .unwrap_or_else(|e| e.into_inner()) = config;
        Ok(())
    }

    /// The rustls config that new handshakes use.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.shared
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The handshake counters.
    pub fn stats(&self) -> &TlsStats {
        &self.shared.stats
    }
}

/// Builds a rustls server config from PEM files: aws-lc-rs, rustls's safe default
/// protocol versions (TLS 1.2 and 1.3) and cipher suites, ALPN `http/1.1`.
fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let read = |path: &Path| {
        fs::read(path).map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })
    };
    let cert_pem = read(cert)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            path: cert.to_owned(),
            source,
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert.to_owned(),
        });
    }
    let key_der = PrivateKeyDer::from_pem_slice(&read(key)?).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsError::NoKey {
            path: key.to_owned(),
        },
        source => TlsError::Pem {
            path: key.to_owned(),
            source,
        },
    })?;
    let config = server_config_for(chain, key_der).map_err(|e| match e {
        rustls::Error::InconsistentKeys(InconsistentKeys::KeyMismatch) => TlsError::KeyMismatch {
            cert: cert.to_owned(),
            key: key.to_owned(),
        },
        e => TlsError::Rejected(e),
    })?;
    Ok(Arc::new(config))
}

/// fanpipe's rustls server configuration for a certificate chain and its key: aws-lc-rs,
/// rustls's safe default protocol versions (TLS 1.2 and 1.3) and cipher suites, no client
/// authentication, ALPN `http/1.1` and `http/1.0`. Public so that the benchmarks' floor
/// over TLS is built by the same code.
pub fn server_config_for(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<ServerConfig, rustls::Error> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    // HTTP/1.0 too: a client that offers only it (curl --http1.0) is served, not refused
    // with no_application_protocol.
    config.alpn_protocols = vec![ALPN_HTTP11.to_vec(), ALPN_HTTP10.to_vec()];
    Ok(config)
}

/// Where a connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing read yet: the first bytes tell TLS from plain HTTP.
    Sniff,
    Handshake,
    Open,
    /// Plain HTTP: sending the 400 (`sent` bytes so far), then the FIN, then dropping
    /// what the client still sends (`drained`).
    Plain {
        sent: usize,
        fin: bool,
        drained: usize,
    },
    /// A TLS error, an answered plain request, or EOF mid-handshake: nothing more to do.
    Failed,
}

/// The TLS half of a [`TlsSocket`], apart from its stream: what must travel with a
/// connection handed to another thread (see the module's doc). `Send`.
pub struct TlsSession {
    /// Boxed: it is large, and sockets move (into a pipe's task, across cores).
    conn: Box<ServerConnection>,
    state: State,
    stats: Arc<TlsStats>,
    /// close_notify is queued: no more writes.
    closing: bool,
    /// The inner socket's sending side is shut.
    fin_sent: bool,
}

impl fmt::Debug for TlsSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSession")
            .field("state", &self.state)
            .field("closing", &self.closing)
            .field("fin_sent", &self.fin_sent)
            .finish_non_exhaustive()
    }
}

/// A server-side TLS connection over any [`Socket`], itself a [`Socket`] that reads and
/// writes plaintext. See the module's doc for how a backend uses it.
pub struct TlsSocket<S> {
    inner: S,
    session: TlsSession,
}

impl<S: Socket> TlsSocket<S> {
    /// Starts a server session on a freshly accepted stream with the config's current
    /// certificate. Nothing is read or written until the socket is polled.
    pub fn new(inner: S, config: &TlsConfig) -> io::Result<Self> {
        let mut conn =
            Box::new(ServerConnection::new(config.server_config()).map_err(io::Error::other)?);
        conn.set_buffer_limit(Some(BUFFER_LIMIT));
        Ok(TlsSocket {
            inner,
            session: TlsSession {
                conn,
                state: State::Sniff,
                stats: config.shared.stats.clone(),
                closing: false,
                fin_sent: false,
            },
        })
    }

    /// Splits off the stream, for a handover: the session goes with the connection.
    pub fn into_parts(self) -> (S, TlsSession) {
        (self.inner, self.session)
    }

    /// Resumes a session, handed over by [`into_parts`](Self::into_parts), on a stream
    /// for the same TCP connection (a duplicate of its descriptor, say).
    pub fn from_parts(inner: S, session: TlsSession) -> Self {
        TlsSocket { inner, session }
    }

    /// The stream underneath.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The stream underneath. Reading or writing it directly corrupts the session.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Whether the handshake is still to finish (or has not begun).
    pub fn is_handshaking(&self) -> bool {
        matches!(self.session.state, State::Sniff | State::Handshake)
    }

    /// The protocol agreed by ALPN, if the client offered any.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.session.conn.alpn_protocol()
    }

    /// The host name the client asked for (SNI), if it sent one.
    pub fn server_name(&self) -> Option<&str> {
        self.session.conn.server_name()
    }

    /// Sends queued TLS records until none are left or the socket is full (`Pending`,
    /// with the task's waker registered by the inner socket).
    fn flush_tls(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut io = SyncIo {
            sock: &mut self.inner,
            cx,
        };
        while self.session.conn.wants_write() {
            match self.session.conn.write_tls(&mut io) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Poll::Pending,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// One read of ciphertext into rustls, processed. `true` at the stream's EOF.
    fn read_tls(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        let mut io = SyncIo {
            sock: &mut self.inner,
            cx,
        };
        let n = match self.session.conn.read_tls(&mut io) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Poll::Pending,
            Err(e) => return Poll::Ready(Err(e)),
        };
        self.process(cx)?;
        Poll::Ready(Ok(n == 0))
    }

    /// Lets rustls act on what it read; counts the handshake's end either way.
    fn process(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if let Err(e) = self.session.conn.process_new_packets() {
            if self.session.state == State::Handshake {
                TlsStats::count(&self.session.stats.failed);
            }
            self.session.state = State::Failed;
            // rustls queued an alert saying why; a best effort to send it.
            let _ = self.flush_tls(cx);
            return Err(io::Error::new(io::ErrorKind::InvalidData, e));
        }
        if self.session.state == State::Handshake && !self.session.conn.is_handshaking() {
            TlsStats::count(&self.session.stats.completed);
            self.session.state = State::Open;
        }
        Ok(())
    }

    /// Reads the first bytes: plain HTTP (an ASCII method) gets the 400; anything else
    /// goes to rustls, which refuses what is not a ClientHello. `true` if the client
    /// closed before sending a byte (a probe, not a handshake: not counted).
    fn poll_sniff(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        let mut first = [0u8; 1024];
        let n = ready!(self.inner.poll_read(cx, &mut first))?;
        let Some(&lead) = first[..n].first() else {
            self.session.state = State::Failed;
            return Poll::Ready(Ok(true));
        };
        if lead.is_ascii_uppercase() {
            TlsStats::count(&self.session.stats.plain_http);
            self.session.state = State::Plain {
                sent: 0,
                fin: false,
                drained: 0,
            };
            return Poll::Ready(Ok(false));
        }
        self.session.state = State::Handshake;
        let mut rest = &first[..n];
        while !rest.is_empty() {
            // Processed piece by piece, in case rustls takes less than the whole read.
            match self.session.conn.read_tls(&mut rest) {
                // rustls reads nothing more after a close_notify.
                Ok(0) => break,
                Ok(_) => self.process(cx)?,
                Err(e) => {
                    TlsStats::count(&self.session.stats.failed);
                    self.session.state = State::Failed;
                    return Poll::Ready(Err(e));
                }
            }
        }
        Poll::Ready(Ok(false))
    }

    /// Answers plain HTTP: the 400, the FIN, then a bounded drain of the request. Ends
    /// in an error, since the connection carries nothing more.
    fn poll_plain(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        while let State::Plain { sent, fin, drained } = &mut self.session.state {
            if *sent < PLAIN_HTTP_REPLY.len() {
                let rest = [IoSlice::new(&PLAIN_HTTP_REPLY[*sent..])];
                match ready!(self.inner.poll_write_vectored(cx, &rest)) {
                    Ok(n) if n > 0 => *sent += n,
                    Ok(_) => {
                        self.session.state = State::Failed;
                        return Poll::Ready(io::ErrorKind::WriteZero.into());
                    }
                    Err(e) => {
                        self.session.state = State::Failed;
                        return Poll::Ready(e);
                    }
                }
                continue;
            }
            if !*fin {
                self.inner.shutdown_write(cx);
                *fin = true;
                self.session.fin_sent = true;
            }
            if *drained >= PLAIN_DRAIN_LIMIT {
                break;
            }
            let mut scratch = [0u8; 4096];
            match ready!(self.inner.poll_read(cx, &mut scratch)) {
                Ok(n) if n > 0 => *drained += n,
                _ => break,
            }
        }
        self.session.state = State::Failed;
        Poll::Ready(io::Error::new(
            io::ErrorKind::InvalidData,
            "plain HTTP on the TLS port (answered 400)",
        ))
    }

    /// Moves the connection on until it is open: sniffing, the handshake, or the plain
    /// HTTP answer. `Pending` with the waker registered by the inner socket.
    fn poll_open(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            match self.session.state {
                State::Open => return Poll::Ready(Ok(())),
                State::Failed => return Poll::Ready(Err(failed())),
                State::Plain { .. } => return self.poll_plain(cx).map(Err),
                State::Sniff => {
                    if ready!(self.poll_sniff(cx))? {
                        return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                    }
                }
                State::Handshake => {
                    // The server's flight goes out before the client can answer it.
                    ready!(self.flush_tls(cx))?;
                    if ready!(self.read_tls(cx))? && self.session.state == State::Handshake {
                        TlsStats::count(&self.session.stats.failed);
                        self.session.state = State::Failed;
                        return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                    }
                }
            }
        }
    }

    /// A shutdown begun by `shutdown_write` is finished by whatever is polled next.
    fn continue_shutdown(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if self.session.closing && !self.session.fin_sent {
            if let Poll::Ready(Err(e)) = self.poll_shutdown(cx) {
                return Err(e);
            }
        }
        Ok(())
    }
}

impl<S: Socket> Socket for TlsSocket<S> {
    /// Plaintext, once the handshake (run here) is done. `Ok(0)` at close_notify or at the
    /// stream's EOF (HTTP's own framing tells a cut body); a TLS error or alert, or
    /// garbage, is an error.
    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        loop {
            match self.session.state {
                State::Sniff => {
                    if ready!(self.poll_sniff(cx))? {
                        return Poll::Ready(Ok(0));
                    }
                    continue;
                }
                State::Plain { .. } => return self.poll_plain(cx).map(Err),
                State::Failed => return Poll::Ready(Err(failed())),
                State::Handshake | State::Open => {}
            }
            self.continue_shutdown(cx)?;
            match self.session.conn.reader().read(buf) {
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Poll::Ready(Ok(0)),
                Err(e) => return Poll::Ready(Err(e)),
            }
            // Records still queued (the handshake's, or a response's tail the caller never
            // flushed) go out before waiting for the client, whose answer may need them.
            if let Poll::Ready(Err(e)) = self.flush_tls(cx) {
                return Poll::Ready(Err(e));
            }
            let eof = ready!(self.read_tls(cx))?;
            if eof && self.session.state == State::Handshake {
                TlsStats::count(&self.session.stats.failed);
                self.session.state = State::Failed;
                return Poll::Ready(Ok(0));
            }
        }
    }

    /// Takes as much of `bufs` as rustls's bounded buffer accepts, gathered into records
    /// across the slices, and counts only that as written. `Pending` until the handshake
    /// is done, and while the encrypted backlog is at [`BUFFER_LIMIT`].
    fn poll_write_vectored(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.session.closing {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write after the TLS shutdown",
            )));
        }
        ready!(self.poll_open(cx))?;
        if bufs.iter().all(|b| b.is_empty()) {
            return Poll::Ready(Ok(0));
        }
        // Older records first; a full socket leaves them queued and registers the waker.
        if let Poll::Ready(Err(e)) = self.flush_tls(cx) {
            return Poll::Ready(Err(e));
        }
        let n = self.session.conn.writer().write_vectored(bufs)?;
        if n == 0 {
            // At the limit, which the flush above could not lower: it is waiting on the
            // socket, and the socket wakes the task.
            return Poll::Pending;
        }
        // Encrypted at once: send it now rather than at the next call.
        if let Poll::Ready(Err(e)) = self.flush_tls(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    /// Queues close_notify and sends what it can; [`poll_read`](Socket::poll_read) and
    /// [`poll_write_vectored`](Socket::poll_write_vectored) finish the flush and the FIN
    /// if the socket is full now. [`poll_shutdown`](Socket::poll_shutdown) waits instead.
    fn shutdown_write(&mut self, cx: &mut Context<'_>) {
        let _ = self.poll_shutdown(cx);
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.flush_tls(cx)
    }

    /// close_notify, flushed, then the inner socket's own shutdown (the FIN).
    /// The TCP connection's: TLS adds no state of its own to a client's leaving.
    fn peer_state(&self) -> PeerState {
        self.inner.peer_state()
    }

    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.session.closing {
            self.session.closing = true;
            if matches!(self.session.state, State::Handshake | State::Open) {
                self.session.conn.send_close_notify();
            }
        }
        ready!(self.flush_tls(cx))?;
        if !self.session.fin_sent {
            ready!(self.inner.poll_shutdown(cx))?;
            self.session.fin_sent = true;
        }
        Poll::Ready(Ok(()))
    }

    /// Records still queued, flushed, then the FIN, with no close_notify: the client sees
    /// the stream end short of a clean TLS close.
    fn poll_cut(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.session.closing = true;
        ready!(self.flush_tls(cx))?;
        if !self.session.fin_sent {
            ready!(self.inner.poll_shutdown(cx))?;
            self.session.fin_sent = true;
        }
        Poll::Ready(Ok(()))
    }

    fn is_tls(&self) -> bool {
        true
    }
}

/// A backend's socket with TLS on or off, so one `PipeTask` type serves both.
pub enum MaybeTls<S> {
    Plain(S),
    Tls(TlsSocket<S>),
}

impl<S: Socket> MaybeTls<S> {
    /// Wraps a freshly accepted stream in TLS when the server has a certificate.
    pub fn accept(stream: S, tls: Option<&TlsConfig>) -> io::Result<Self> {
        Ok(match tls {
            Some(config) => MaybeTls::Tls(TlsSocket::new(stream, config)?),
            None => MaybeTls::Plain(stream),
        })
    }
}

impl<S: Socket> Socket for MaybeTls<S> {
    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        match self {
            MaybeTls::Plain(s) => s.poll_read(cx, buf),
            MaybeTls::Tls(s) => s.poll_read(cx, buf),
        }
    }

    fn poll_write_vectored(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self {
            MaybeTls::Plain(s) => s.poll_write_vectored(cx, bufs),
            MaybeTls::Tls(s) => s.poll_write_vectored(cx, bufs),
        }
    }

    fn shutdown_write(&mut self, cx: &mut Context<'_>) {
        match self {
            MaybeTls::Plain(s) => s.shutdown_write(cx),
            MaybeTls::Tls(s) => s.shutdown_write(cx),
        }
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            MaybeTls::Plain(s) => s.poll_flush(cx),
            MaybeTls::Tls(s) => s.poll_flush(cx),
        }
    }

    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            MaybeTls::Plain(s) => s.poll_shutdown(cx),
            MaybeTls::Tls(s) => s.poll_shutdown(cx),
        }
    }

    fn peer_state(&self) -> PeerState {
        match self {
            MaybeTls::Plain(s) => s.peer_state(),
            MaybeTls::Tls(s) => s.peer_state(),
        }
    }

    fn poll_cut(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            MaybeTls::Plain(s) => s.poll_cut(cx),
            MaybeTls::Tls(s) => s.poll_cut(cx),
        }
    }

    fn is_tls(&self) -> bool {
        matches!(self, MaybeTls::Tls(_))
    }
}

fn failed() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "the TLS connection has failed")
}

/// A [`Socket`] and its task's context as the blocking-style `Read`/`Write` rustls
/// reads from and writes to: `Pending` becomes `WouldBlock`, with the waker registered.
struct SyncIo<'a, 'b, S> {
    sock: &'a mut S,
    cx: &'a mut Context<'b>,
}

impl<S: Socket> Read for SyncIo<'_, '_, S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.sock.poll_read(self.cx, buf) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl<S: Socket> Write for SyncIo<'_, '_, S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    /// rustls hands over its queued records as slices: one vectored write to the socket.
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self.sock.poll_write_vectored(self.cx, bufs) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
