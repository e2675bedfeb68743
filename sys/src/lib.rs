//! What fanpipe asks the kernel that std cannot: whether the client of a connection has
//! ended its side of it. A waiting sender is not read (TCP holds its body back until its
//! receivers are there), so neither a read nor, until a write, a write shows that it has
//! gone; the socket's TCP state does, at once. One `getsockopt`, in one place.
#![deny(unsafe_code)]

use std::io;
use std::os::fd::AsRawFd;

use fanpipe_core::pipe::PeerState;

/// The client's side of the connection of `socket`, from its TCP state (`TCP_INFO`).
pub fn peer_state(socket: &impl AsRawFd) -> PeerState {
    match tcp_state(socket) {
        // The peer's FIN arrived; we have not closed our side.
        Ok(TCP_CLOSE_WAIT) => PeerState::Closed,
        // Reset, or closed for good.
        Ok(TCP_CLOSE) | Err(_) => PeerState::Reset,
        Ok(_) => PeerState::Open,
    }
}

/// `tcp_states` of `include/net/tcp_states.h`.
const TCP_CLOSE: u8 = 7;
const TCP_CLOSE_WAIT: u8 = 8;

#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn tcp_state(socket: &impl AsRawFd) -> io::Result<u8> {
    // `struct tcp_info` starts with `__u8 tcpi_state`; the kernel copies only the first
    // `len` bytes of the struct, so one byte is all that is asked for and written.
    let mut state: u8 = 0;
    let mut len = std::mem::size_of::<u8>() as libc::socklen_t;
    // SAFETY: the descriptor belongs to `socket`, borrowed for the whole call (and were it
    // closed, getsockopt would only fail with EBADF). `optval` points to
    // `state`, one writable byte that outlives the call, and `optlen` to `len`, which says
    // one byte; getsockopt writes at most `*optlen` bytes to `optval` and a socklen_t to
    // `optlen`. Nothing is read from either before the call returns.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_TCP,
            libc::TCP_INFO,
            (&mut state as *mut u8).cast::<libc::c_void>(),
            &mut len,
        )
    };
    if rc == 0 && len >= 1 {
        Ok(state)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Elsewhere the state is not asked: a waiting sender that goes away is found by its
/// heartbeat write instead.
#[cfg(not(target_os = "linux"))]
fn tcp_state(_socket: &impl AsRawFd) -> io::Result<u8> {
    Ok(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener, TcpStream};
    use std::time::{Duration, Instant};

    fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        (client, server)
    }

    /// The kernel's view catches up within a moment on loopback.
    fn eventually(server: &TcpStream, want: PeerState) {
        let until = Instant::now() + Duration::from_secs(5);
        while peer_state(server) != want {
            assert!(Instant::now() < until, "never {want:?}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn open_then_half_closed_then_reset() {
        let (client, mut server) = pair();
        assert_eq!(peer_state(&server), PeerState::Open);
        // Body bytes waiting unread do not hide the FIN behind them.
        (&client).write_all(b"body bytes nobody read yet").unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        eventually(&server, PeerState::Closed);
        // A client that has gone answers a write with a reset.
        drop(client);
        let _ = server.write_all(b"probe");
        eventually(&server, PeerState::Reset);
        let mut rest = Vec::new();
        let _ = server.read_to_end(&mut rest);
    }

    #[test]
    fn a_half_closed_client_that_still_reads_stays_closed_not_reset() {
        let (mut client, mut server) = pair();
        client.shutdown(Shutdown::Write).unwrap();
        eventually(&server, PeerState::Closed);
        server.write_all(b"still waiting\n").unwrap();
        let mut got = [0u8; 14];
        client.read_exact(&mut got).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(peer_state(&server), PeerState::Closed);
    }
}
