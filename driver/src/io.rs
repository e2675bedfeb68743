//! What the driver needs of a runtime's sockets and timers.

use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::task::{Context, Poll};
use std::time::Instant;

use fanpipe_core::pipe::PeerState;

/// A client's socket, as the runtime offers it.
pub trait Socket {
    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>>;
    /// One vectored write (framing and data in one call).
    fn poll_write_vectored(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>>;
    /// Ends the sending side; the reading side stays open for a lingering close.
    fn shutdown_write(&mut self, cx: &mut Context<'_>);

    /// Pushes out bytes the socket still holds after a write said they were taken (a TLS
    /// socket's encrypted records); a plain socket holds none.
    fn poll_flush(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// What the kernel says of the client's side of the connection, for a waiting
    /// sender, which is not read. A socket that cannot tell says `Open`: its client is
    /// then found gone by a heartbeat write instead.
    fn peer_state(&self) -> PeerState {
        PeerState::Open
    }

    /// A clean end of the sending side that may have to wait for the socket: TLS sends
    /// close_notify and flushes it before the FIN. A plain socket just sends its FIN.
    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.shutdown_write(cx);
        Poll::Ready(Ok(()))
    }

    /// The end of a cut or failed exchange: bytes the socket still holds go out, then the
    /// FIN, with no clean end of its own protocol (TLS sends no close_notify), so that the
    /// client tells it from a whole response. A plain socket just sends its FIN.
    fn poll_cut(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.shutdown_write(cx);
        Poll::Ready(Ok(()))
    }

    /// Whether the client speaks to this socket through TLS (for the URLs the server
    /// shows it).
    fn is_tls(&self) -> bool {
        false
    }
}

/// The runtime's clock, and a wake-up the task re-arms to the core's next deadline. The
/// driver takes every instant from here, never from the system clock itself.
pub trait Timer {
    /// The time now.
    fn now(&self) -> Instant;
    /// Ready once `at` has passed; otherwise wakes the task then.
    fn poll_at(&mut self, cx: &mut Context<'_>, at: Instant) -> Poll<()>;
}

/// Waits until `at` on `timer`.
pub async fn sleep_until<T: Timer>(timer: &mut T, at: Instant) {
    poll_fn(|cx| timer.poll_at(cx, at)).await;
}
