//! The floor over TLS: the best "read once, write n times" can do when every receiver has
//! its own TLS session, so that fanpipe over HTTPS is measured against what TLS itself
//! costs, not against plaintext.
//!
//! The same rustls server configuration as fanpipe's ([`crate::tls::server_config`]), the
//! same buffered rustls API and the same cap on each session's encrypted backlog
//! ([`BUFFER_LIMIT`], fanpipe's `driver::tls::BUFFER_LIMIT`), on one thread per group as
//! fanpipe runs one task per pipe. No HTTP: after the handshake and the hello, the
//! sender's records are decrypted once into the window, and each receiver's session
//! encrypts from the window straight into its records, as many as its socket takes per
//! turn. Done better than a straightforward server: the sender's ciphertext is read
//! 256 KiB per system call, not a record at a time, and at most [`PULL_PER_TURN`] is
//! decrypted before the receivers' turns, so that what is encrypted is still cached.

use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;

use rustls::{ServerConfig, ServerConnection};

use crate::floor::HELLO_LEN;

/// Encrypted bytes each session may hold before the socket takes them: fanpipe's
/// `BUFFER_LIMIT` in `driver/src/tls.rs`, so both hold the same memory per receiver.
pub const BUFFER_LIMIT: usize = 64 << 10;

/// The sender's ciphertext read per system call.
const READ_AHEAD: usize = 256 << 10;

/// Plaintext decrypted into the window per turn before the receivers' turns, so each
/// piece is encrypted n times while it is still in the cache. Reading until the window
/// (1 MiB) was full instead cost 3.1-3.3 s of CPU for 6 GB at n = 30, against 1.7-2.1 s
/// with 64, 128 or 256 KiB per turn (16 KiB: 2.1-2.2 s).
const PULL_PER_TURN: u64 = 128 << 10;

/// A client of the floor with its TLS session, the handshake done.
pub struct TlsPeer {
    pub sock: TcpStream,
    pub conn: Box<ServerConnection>,
}

/// Runs the handshake on a freshly accepted (blocking) socket and reads the client's
/// hello through the session; the session's own records (TLS 1.3 tickets) are sent
/// before this returns, so the fan-out starts with nothing queued.
///
/// `TCP_NODELAY` on every socket, as fanpipe sets it: a write of whole records is rarely
/// a whole number of segments, and with Nagle's algorithm the tail waits for an ACK and
/// goes out from the ACK's processing. At n = 30 over TLS that cost the floor a fifth
/// more CPU (3.8 against 3.0 s for 6 GB), with no gain in throughput.
pub fn accept(
    mut sock: TcpStream,
    config: &Arc<ServerConfig>,
) -> io::Result<(TlsPeer, [u8; HELLO_LEN])> {
    sock.set_nodelay(true)?;
    let mut conn = ServerConnection::new(config.clone()).map_err(io::Error::other)?;
    conn.set_buffer_limit(Some(BUFFER_LIMIT));
    let mut hello = [0u8; HELLO_LEN];
    rustls::Stream::new(&mut conn, &mut sock).read_exact(&mut hello)?;
    while conn.wants_write() {
        conn.write_tls(&mut sock)?;
    }
    Ok((
        TlsPeer {
            sock,
            conn: Box::new(conn),
        },
        hello,
    ))
}

/// The sender, with the ciphertext read ahead of rustls.
struct Sender {
    peer: TlsPeer,
    inbuf: Vec<u8>,
    start: usize,
    end: usize,
}

/// What one turn on the sender did.
enum Pulled {
    /// Bytes into the window (or none), and it would block or the window is full.
    Some(bool),
    /// The sender's stream ended: close_notify, a cut, or a TLS error.
    End,
}

impl Sender {
    /// Decrypts into the window `ring` (`head` the next position, `tail` the slowest
    /// receiver's) until the socket is empty, the window full, or [`PULL_PER_TURN`] in.
    fn pull(&mut self, ring: &mut [u8], head: &mut u64, tail: u64) -> Pulled {
        let cap = ring.len();
        let mut moved = false;
        let stop = *head + PULL_PER_TURN;
        loop {
            if *head >= stop {
                return Pulled::Some(moved);
            }
            let free = cap - (*head - tail) as usize;
            let at = (*head % cap as u64) as usize;
            let room = free.min(cap - at);
            if room == 0 {
                return Pulled::Some(moved);
            }
            match self.peer.conn.reader().read(&mut ring[at..at + room]) {
                Ok(0) => return Pulled::End,
                Ok(k) => {
                    *head += k as u64;
                    moved = true;
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return Pulled::End,
            }
            if self.start == self.end {
                match self.peer.sock.read(&mut self.inbuf) {
                    // At EOF rustls is handed nothing, which tells it; its reader then ends.
                    Ok(n) => (self.start, self.end) = (0, n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Pulled::Some(moved),
                    Err(_) => return Pulled::End,
                }
            }
            let mut rest = &self.inbuf[self.start..self.end];
            match self.peer.conn.read_tls(&mut rest) {
                Ok(k) => self.start += k,
                Err(_) => return Pulled::End,
            }
            if self.peer.conn.process_new_packets().is_err() {
                return Pulled::End;
            }
        }
    }

    /// Answers the sender's close_notify with ours, so its client sees a clean end.
    fn close(mut self) {
        self.peer.conn.send_close_notify();
        close(&mut self.peer);
    }
}

/// Sends what `peer`'s session holds (and a queued close_notify) on the now blocking
/// socket, then shuts the socket.
fn close(peer: &mut TlsPeer) {
    let _ = peer.sock.set_nonblocking(false);
    while peer.conn.wants_write() {
        if peer.conn.write_tls(&mut peer.sock).is_err() {
            break;
        }
    }
    let _ = peer.sock.shutdown(Shutdown::Both);
}

/// Encrypts from the window into `peer`'s session and sends its records, until the
/// socket is full or the receiver has all of `ring` up to `head`. `Err` if it failed.
fn push(peer: &mut TlsPeer, at: &mut u64, ring: &[u8], head: u64) -> Result<bool, ()> {
    let cap = ring.len();
    let mut moved = false;
    loop {
        if peer.conn.wants_write() {
            match peer.conn.write_tls(&mut peer.sock) {
                Ok(k) if k > 0 => {
                    moved = true;
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(moved),
                _ => return Err(()),
            }
        }
        if *at == head {
            return Ok(moved);
        }
        let from = (*at % cap as u64) as usize;
        let len = (head - *at) as usize;
        let first = len.min(cap - from);
        let bufs = [
            IoSlice::new(&ring[from..from + first]),
            IoSlice::new(&ring[..len - first]),
        ];
        match peer.conn.writer().write_vectored(&bufs) {
            Ok(k) if k > 0 => {
                *at += k as u64;
                moved = true;
            }
            // No room though nothing is queued: not expected; the socket decides next turn.
            Ok(_) => return Ok(moved),
            Err(_) => return Err(()),
        }
    }
}

/// Reads the sender once into a window of `block` bytes and encrypts it for every
/// receiver, all sockets non-blocking under one `poll(2)` (as the plain floor's
/// `fan_out`). A receiver that fails is dropped; the others go on. Every session ends
/// with close_notify.
pub fn fan_out(sender: TlsPeer, receivers: Vec<TlsPeer>, block: usize) {
    let cap = block.max(4096);
    let mut ring = vec![0u8; cap];
    let mut head: u64 = 0;
    let mut live: Vec<Option<(TlsPeer, u64)>> =
        receivers.into_iter().map(|r| Some((r, 0))).collect();
    for (r, _) in live.iter().flatten() {
        let _ = r.sock.set_nonblocking(true);
    }
    let _ = sender.sock.set_nonblocking(true);
    let mut sender = Some(Sender {
        peer: sender,
        inbuf: vec![0u8; READ_AHEAD],
        start: 0,
        end: 0,
    });
    loop {
        let mut moved = false;
        if let Some(s) = sender.as_mut() {
            let tail = slowest(&live, head);
            match s.pull(&mut ring, &mut head, tail) {
                Pulled::Some(m) => moved |= m,
                Pulled::End => {
                    if let Some(s) = sender.take() {
                        s.close();
                    }
                    moved = true;
                }
            }
        }
        for slot in live.iter_mut() {
            let Some((r, at)) = slot else { continue };
            match push(r, at, &ring, head) {
                Ok(m) => moved |= m,
                Err(()) => *slot = None,
            }
        }
        let behind = live
            .iter()
            .flatten()
            .any(|(r, at)| *at < head || r.conn.wants_write());
        if sender.is_none() && !behind {
            break;
        }
        if !moved {
            wait(sender.as_ref(), &live, head, cap);
        }
    }
    for (mut receiver, _) in live.into_iter().flatten() {
        receiver.conn.send_close_notify();
        close(&mut receiver);
    }
}

/// The position of the slowest live receiver; `head` once none is left.
fn slowest(live: &[Option<(TlsPeer, u64)>], head: u64) -> u64 {
    live.iter()
        .flatten()
        .map(|(_, at)| *at)
        .min()
        .unwrap_or(head)
}

/// Sleeps in `poll(2)` until the sender has bytes (if the window has room) or a receiver
/// with something to send can take it.
fn wait(sender: Option<&Sender>, live: &[Option<(TlsPeer, u64)>], head: u64, cap: usize) {
    let tail = slowest(live, head);
    let mut fds: Vec<libc::pollfd> = Vec::with_capacity(live.len() + 1);
    if let Some(s) = sender.filter(|_| ((head - tail) as usize) < cap) {
        fds.push(libc::pollfd {
            fd: s.peer.sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
    }
    for (r, at) in live.iter().flatten() {
        if *at < head || r.conn.wants_write() {
            fds.push(libc::pollfd {
                fd: r.sock.as_raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            });
        }
    }
    if fds.is_empty() {
        return;
    }
    // SAFETY: `fds` is a live, correctly sized array of pollfd for the whole call, and
    // every descriptor in it belongs to a socket borrowed for that time.
    unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 1000) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::floor::{hello, Role};
    use crate::tls::{certificates, client_config, server_config, Pki, TlsClient};
    use crate::tls_stream::TlsStream;
    use rustls::pki_types::ServerName;
    use std::net::TcpListener;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Two receivers and a sender over TLS through a window smaller than the payload:
    /// every byte arrives in order, and every client sees close_notify, not a cut.
    #[test]
    fn a_tls_group_gets_every_byte_and_a_clean_end() {
        let pki = Pki::generate().expect("pki");
        let server =
            server_config(pki.cert_pem.as_bytes(), pki.key_pem.as_bytes()).expect("server");
        let cas = certificates(pki.ca_pem.as_bytes(), "ca").expect("ca");
        let client = TlsClient {
            config: client_config(&cas).expect("client config"),
            name: ServerName::try_from("localhost").expect("name"),
        };
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("address");
        let floor = std::thread::spawn(move || {
            let (mut sender, mut receivers) = (None, Vec::new());
            for _ in 0..3 {
                let (sock, _) = listener.accept().expect("accept");
                let (peer, hello) = accept(sock, &server).expect("handshake and hello");
                match hello[4] {
                    b'S' => sender = Some(peer),
                    _ => receivers.push(peer),
                }
            }
            fan_out(sender.expect("a sender"), receivers, 64 << 10);
        });
        let payload: Vec<u8> = (0..3_000_017u32).map(|i| (i % 251) as u8).collect();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let connect = |role| {
                let client = client.clone();
                async move {
                    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
                    let mut tls = TlsStream::connect(tcp, &client).await.expect("handshake");
                    tls.write_all(&hello(role, 7, 2)).await.expect("hello");
                    tls.flush().await.expect("flush");
                    tls
                }
            };
            let receivers = [connect(Role::Receiver).await, connect(Role::Receiver).await];
            let mut sender = connect(Role::Sender).await;
            let reads = receivers.map(|mut r| {
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    r.read_to_end(&mut got).await.map(|_| got)
                })
            });
            sender.write_all(&payload).await.expect("upload");
            sender.shutdown().await.expect("close_notify");
            let mut rest = Vec::new();
            sender
                .read_to_end(&mut rest)
                .await
                .expect("a clean end for the sender");
            for read in reads {
                let got = read.await.expect("task").expect("a clean end");
                assert!(got == payload, "a receiver got {} bytes", got.len());
            }
        });
        floor.join().expect("the floor's thread");
    }
}
