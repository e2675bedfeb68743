//! A connection before any pipe.

use std::io::IoSlice;
use std::task::{Context, Poll};

use fanpipe_core::client::ClientAddr;
use fanpipe_core::conn::{Action, Conn, PipeRequest};
use fanpipe_core::request::Page;
use fanpipe_core::Reject;

use crate::io::{Socket, Timer};

/// Drives one connection's [`Conn`] until it is closed (`None`) or holds a pipe request
/// for the registry (`Some`): reads, writes, shutdowns and deadlines as the core says.
/// `refused` logs and counts a refusal; `hub_page` renders a page of the server's state
/// (`/metrics`, `/healthz`) as its status and text; `client` counts the connection under
/// its client once known (a PROXY header names it), or says why it is over its share.
/// After a
/// pipe request the caller admits it, or tells the `Conn` why not and drives it again.
pub fn poll_conn<S: Socket, T: Timer>(
    cx: &mut Context<'_>,
    conn: &mut Conn,
    sock: &mut S,
    timer: &mut T,
    mut refused: impl FnMut(&Reject),
    mut hub_page: impl FnMut(Page) -> (u16, String),
    mut client: impl FnMut(ClientAddr) -> Result<(), Reject>,
) -> Poll<Option<PipeRequest>> {
    loop {
        if let Some(addr) = conn.take_new_client() {
            if let Err(why) = client(addr) {
                conn.handle_refused(&why, timer.now());
            }
        }
        if let Some(why) = conn.take_refused() {
            refused(&why);
        }
        let io = match conn.poll_action() {
            Action::Read => sock.poll_read(cx, conn.read_buf()).map(|r| match r {
                Ok(n) => conn.handle_read(n, timer.now()),
                Err(_) => conn.handle_error(),
            }),
            Action::Write => {
                let bufs = [IoSlice::new(conn.output())];
                sock.poll_write_vectored(cx, &bufs).map(|r| match r {
                    Ok(n) if n > 0 => conn.handle_wrote(n, timer.now()),
                    _ => conn.handle_error(),
                })
            }
            // A clean end: TLS's close_notify (flushed) before the FIN. Bounded by the
            // write deadline the `Conn` keeps until the shutdown is done.
            Action::Shutdown => sock.poll_shutdown(cx).map(|r| match r {
                Ok(()) => conn.handle_shutdown(timer.now()),
                Err(_) => conn.handle_error(),
            }),
            Action::HubPage => {
                if let Some(page) = conn.hub_page() {
                    let (status, text) = hub_page(page);
                    conn.handle_hub_page(status, &text, timer.now());
                }
                Poll::Ready(())
            }
            Action::Pipe => return Poll::Ready(conn.take_pipe_request()),
            Action::Close => return Poll::Ready(None),
        };
        if io.is_pending() {
            match conn.poll_timeout() {
                Some(at) if timer.poll_at(cx, at).is_ready() => {
                    conn.handle_timeout(timer.now());
                }
                _ => return Poll::Pending,
            }
        }
    }
}
