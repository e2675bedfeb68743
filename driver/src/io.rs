//! What the driver needs of a runtime's sockets and timers.

use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::task::{Context, Poll};
use std::time::Instant;

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
