//! The floor server: the physical limit of "read once, write n times" on this machine.
//!
//! No HTTP at all. Each client opens with a fixed 24-byte hello (role, group, n); when a
//! group has its `n` receivers and its sender, one thread reads the sender's bytes once
//! into a window of 1 MiB (fanpipe's default buffer) and writes them to the `n` receiver
//! sockets, all non-blocking under one `poll(2)`, then closes them all once the sender's
//! EOF reached every receiver. Whatever a real pipe server adds (HTTP, framing, a
//! runtime, buffering policy) shows as the distance from this floor. With `tls` every
//! client speaks TLS first and the fan-out is `floor_tls`'s: the floor for HTTPS.

use std::collections::HashMap;
use std::io::{self, BufRead, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use rustls::ServerConfig;

use crate::floor_tls::{self, TlsPeer};
use crate::tls::Pki;

const MAGIC: [u8; 4] = *b"FLR1";
/// Length of the hello a floor client sends first.
pub const HELLO_LEN: usize = 24;

/// Which side of a group a floor client is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Sender,
    Receiver,
}

/// The hello of a floor client: magic, role, group id, receivers in the group.
pub fn hello(role: Role, group: u64, n: u32) -> [u8; HELLO_LEN] {
    let mut out = [0u8; HELLO_LEN];
    out[..4].copy_from_slice(&MAGIC);
    out[4] = match role {
        Role::Sender => b'S',
        Role::Receiver => b'R',
    };
    out[8..16].copy_from_slice(&group.to_le_bytes());
    out[16..20].copy_from_slice(&n.to_le_bytes());
    out
}

fn parse_hello(bytes: &[u8; HELLO_LEN]) -> io::Result<(Role, u64, u32)> {
    let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidData, why.to_string());
    if bytes[..4] != MAGIC {
        return Err(bad("not a floor hello"));
    }
    let role = match bytes[4] {
        b'S' => Role::Sender,
        b'R' => Role::Receiver,
        _ => return Err(bad("unknown role")),
    };
    let group = u64::from_le_bytes(bytes[8..16].try_into().map_err(|_| bad("group"))?);
    let n = u32::from_le_bytes(bytes[16..20].try_into().map_err(|_| bad("n"))?);
    if n == 0 {
        return Err(bad("n is 0"));
    }
    Ok((role, group, n))
}

/// How the floor server moves bytes.
#[derive(Debug, Clone, Copy)]
pub struct FloorConfig {
    /// Bytes in flight between the sender and the slowest receiver: the window (the tee
    /// variant: each kernel pipe's size).
    pub block: usize,
    /// Set TCP_NODELAY on the receivers' sockets.
    pub nodelay: bool,
    /// Move bytes with splice and tee instead of read and write (see `floor_tee`).
    pub tee: bool,
    /// Speak TLS to every client (see `floor_tls`), with a certificate made at start
    /// whose CA the server prints after its port.
    pub tls: bool,
}

/// An accepted client, its hello read: its socket, and its session if it speaks TLS.
struct Peer {
    sock: TcpStream,
    tls: Option<Box<rustls::ServerConnection>>,
}

#[derive(Default)]
struct Group {
    n: u32,
    receivers: Vec<Peer>,
    sender: Option<Peer>,
}

/// Listens on `listen`, prints the bound port on stdout, and fans out groups until stdin
/// closes (the parent went away) or the listener fails.
/// With TLS, the CA of its certificate follows the port, as PEM.
pub fn serve(listen: &str, config: FloorConfig) -> io::Result<()> {
    let tls = match config.tls {
        false => None,
        true => {
            let pki = Pki::generate().map_err(io::Error::other)?;
            let server = crate::tls::server_config(pki.cert_pem.as_bytes(), pki.key_pem.as_bytes())
                .map_err(io::Error::other)?;
            Some((server, pki.ca_pem))
        }
    };
    let listener = TcpListener::bind(listen)?;
    // A deep accept queue, so a burst of a thousand connects is not dropped and retried.
    // SAFETY: listen() on our own listening socket only changes its backlog.
    unsafe { libc::listen(listener.as_raw_fd(), 4096) };
    let mut stdout = io::stdout();
    writeln!(stdout, "{}", listener.local_addr()?.port())?;
    if let Some((_, ca_pem)) = &tls {
        write!(stdout, "{ca_pem}")?;
    }
    stdout.flush()?;
    let tls: Option<Arc<ServerConfig>> = tls.map(|(server, _)| server);
    std::thread::spawn(|| {
        // The parent holds our stdin: its end is our end, so no floor server outlives a run.
        let mut sink = Vec::new();
        let _ = io::stdin().read_to_end(&mut sink);
        std::process::exit(0);
    });
    let (hellos_tx, hellos) = mpsc::channel::<(Role, u64, u32, Peer)>();
    std::thread::spawn(move || group_up(hellos, config));
    for conn in listener.incoming() {
        let mut conn = match conn {
            Ok(conn) => conn,
            Err(e) => {
                // Out of descriptors or similar: say so and keep serving what we have.
                eprintln!("floor-server: accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        // A sender may connect well before it says hello: wait for it on a thread of its
        // own (which also runs the TLS handshake).
        let hellos_tx = hellos_tx.clone();
        let tls = tls.clone();
        std::thread::spawn(move || {
            let hello = match &tls {
                None => {
                    let mut bytes = [0u8; HELLO_LEN];
                    conn.read_exact(&mut bytes).map(|()| {
                        let peer = Peer {
                            sock: conn,
                            tls: None,
                        };
                        (peer, bytes)
                    })
                }
                Some(server) => floor_tls::accept(conn, server).map(|(peer, bytes)| {
                    let peer = Peer {
                        sock: peer.sock,
                        tls: Some(peer.conn),
                    };
                    (peer, bytes)
                }),
            };
            match hello.and_then(|(peer, bytes)| Ok((parse_hello(&bytes)?, peer))) {
                Ok(((role, id, n), peer)) => {
                    let _ = hellos_tx.send((role, id, n, peer));
                }
                Err(e) => eprintln!("floor-server: bad hello: {e}"),
            }
        });
    }
    Ok(())
}

/// Collects the clients of each group and starts its fan-out when it is complete.
fn group_up(hellos: mpsc::Receiver<(Role, u64, u32, Peer)>, config: FloorConfig) {
    let mut groups: HashMap<u64, Group> = HashMap::new();
    for (role, id, n, conn) in hellos {
        let group = groups.entry(id).or_insert_with(|| Group {
            n,
            ..Group::default()
        });
        match role {
            Role::Receiver => {
                if config.nodelay {
                    let _ = conn.sock.set_nodelay(true);
                }
                group.receivers.push(conn);
            }
            Role::Sender => group.sender = Some(conn),
        }
        if group.receivers.len() >= group.n as usize && group.sender.is_some() {
            if let Some(Group {
                receivers,
                sender: Some(sender),
                ..
            }) = groups.remove(&id)
            {
                let block = config.block;
                if config.tls {
                    let tls = |p: Peer| p.tls.map(|conn| TlsPeer { sock: p.sock, conn });
                    // Every client of a TLS floor has its session.
                    if let (Some(sender), Some(receivers)) = (
                        tls(sender),
                        receivers.into_iter().map(tls).collect::<Option<Vec<_>>>(),
                    ) {
                        std::thread::spawn(move || floor_tls::fan_out(sender, receivers, block));
                    }
                } else {
                    let receivers = receivers.into_iter().map(|p| p.sock).collect();
                    let sender = sender.sock;
                    if config.tee {
                        std::thread::spawn(move || {
                            crate::floor_tee::fan_out(sender, receivers, block)
                        });
                    } else {
                        std::thread::spawn(move || fan_out(sender, receivers, block));
                    }
                }
            }
        }
    }
}

/// Reads the sender once into a window of `block` bytes and writes it to every receiver,
/// all sockets non-blocking under one `poll(2)`: a receiver whose socket is full never
/// holds back the writes to the others, and the sender is read whenever the slowest
/// receiver leaves room. A receiver whose write fails is dropped; the others go on.
fn fan_out(sender: TcpStream, receivers: Vec<TcpStream>, block: usize) {
    let block = block.max(4096);
    // The window: bytes in flight between the sender and the slowest receiver, as
    // fanpipe's --buffer-size (same default, 1 MiB), so that both hold the same memory.
    let cap = block;
    let mut ring = vec![0u8; cap];
    let mut head: u64 = 0;
    let mut eof = false;
    let mut live: Vec<Option<(TcpStream, u64)>> =
        receivers.into_iter().map(|r| Some((r, 0))).collect();
    for (r, _) in live.iter().flatten() {
        let _ = r.set_nonblocking(true);
    }
    let _ = sender.set_nonblocking(true);
    let mut sender = Some(sender);
    loop {
        let mut moved = false;
        // The sender, into the free part of the window (up to the wrap), until its socket
        // is empty or the window full: each receiver write then carries all there is.
        while let Some(s) = sender.as_mut().filter(|_| !eof) {
            let tail = slowest(&live, head);
            let free = cap - (head - tail) as usize;
            let at = (head % cap as u64) as usize;
            let room = free.min(cap - at);
            if room == 0 {
                break;
            }
            match s.read(&mut ring[at..at + room]) {
                Ok(0) => eof = true,
                Ok(k) => {
                    head += k as u64;
                    moved = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => eof = true,
            }
        }
        if eof {
            sender = None;
        }
        // Every receiver, as much as its socket takes (the window may wrap: two slices).
        for slot in live.iter_mut() {
            let Some((r, at)) = slot else { continue };
            if *at == head {
                continue;
            }
            let from = (*at % cap as u64) as usize;
            let len = (head - *at) as usize;
            let first = len.min(cap - from);
            let bufs = [
                io::IoSlice::new(&ring[from..from + first]),
                io::IoSlice::new(&ring[..len - first]),
            ];
            match r.write_vectored(&bufs) {
                Ok(k) if k > 0 => {
                    *at += k as u64;
                    moved = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                _ => *slot = None,
            }
        }
        let behind = live.iter().flatten().any(|(_, at)| *at < head);
        if sender.is_none() && !behind {
            break;
        }
        if !moved {
            wait(sender.as_ref(), &live, head, cap);
        }
    }
    for (receiver, _) in live.into_iter().flatten() {
        let _ = receiver.set_nonblocking(false);
        let _ = receiver.shutdown(Shutdown::Both);
    }
}

/// The position of the slowest live receiver; `head` once none is left.
fn slowest(live: &[Option<(TcpStream, u64)>], head: u64) -> u64 {
    live.iter()
        .flatten()
        .map(|(_, at)| *at)
        .min()
        .unwrap_or(head)
}

/// Sleeps in `poll(2)` until the sender has bytes (if there is room for them) or a
/// receiver that is behind can take more.
fn wait(sender: Option<&TcpStream>, live: &[Option<(TcpStream, u64)>], head: u64, cap: usize) {
    let tail = slowest(live, head);
    let mut fds: Vec<libc::pollfd> = Vec::with_capacity(live.len() + 1);
    if let Some(s) = sender.filter(|_| ((head - tail) as usize) < cap) {
        fds.push(libc::pollfd {
            fd: s.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
    }
    for (r, at) in live.iter().flatten() {
        if *at < head {
            fds.push(libc::pollfd {
                fd: r.as_raw_fd(),
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

/// A floor server running as our child process (this same binary's hidden `floor-server`
/// subcommand). It is killed when dropped, and exits by itself if we die (its stdin closes).
pub struct FloorChild {
    child: Child,
    port: u16,
    /// The CA of a TLS floor's certificate, as PEM.
    ca_pem: Option<String>,
}

impl FloorChild {
    pub fn spawn(config: FloorConfig) -> io::Result<FloorChild> {
        let exe = std::env::current_exe()?;
        let mut command = Command::new(exe);
        command.args([
            "floor-server",
            "--listen",
            "127.0.0.1:0",
            "--block",
            &config.block.to_string(),
        ]);
        if config.nodelay {
            command.arg("--nodelay");
        }
        if config.tee {
            command.arg("--tee");
        }
        if config.tls {
            command.arg("--tls");
        }
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let mut line = String::new();
        let mut ca_pem = String::new();
        if let Some(stdout) = child.stdout.take() {
            let mut stdout = io::BufReader::new(stdout);
            stdout.read_line(&mut line)?;
            while config.tls && !ca_pem.ends_with("-----END CERTIFICATE-----\n") {
                if stdout.read_line(&mut ca_pem)? == 0 {
                    break;
                }
            }
        }
        match (line.trim().parse(), config.tls) {
            (Ok(port), false) => Ok(FloorChild {
                child,
                port,
                ca_pem: None,
            }),
            (Ok(port), true) if ca_pem.ends_with("-----END CERTIFICATE-----\n") => Ok(FloorChild {
                child,
                port,
                ca_pem: Some(ca_pem),
            }),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                Err(io::Error::other(format!(
                    "the floor server printed {line:?}, not its port (and with TLS, its CA)"
                )))
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The CA a client of a TLS floor must trust.
    pub fn ca_pem(&self) -> Option<&str> {
        self.ca_pem.as_deref()
    }
}

impl Drop for FloorChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hellos_round_trip() {
        let bytes = hello(Role::Receiver, 42, 30);
        let (role, group, n) = parse_hello(&bytes).expect("valid hello");
        assert_eq!((role, group, n), (Role::Receiver, 42, 30));
        assert!(parse_hello(&[0u8; HELLO_LEN]).is_err());
    }
}
