//! The clients' TLS: rustls's sans-io [`ClientConnection`] driven over a tokio
//! [`TcpStream`], as an `AsyncRead + AsyncWrite` (tokio-rustls is not among the project's
//! dependencies, and this is all of it the load generator needs), and [`ClientConn`], a
//! client's connection with TLS on or off.
//!
//! The handshake is finished in [`TlsStream::connect`], before a receiver reports ready
//! and before a sender reaches the start gate, so it is never inside a timed run.

use std::future::poll_fn;
use std::io::{self, IoSlice, Read, Write};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use rustls::ClientConnection;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::tls::TlsClient;

/// Ciphertext read from the socket per system call. rustls takes at most one record
/// (16 KiB and a header) per `read_tls`, so reading through it directly would cost a
/// system call per record; reading ahead keeps the client's own CPU, which shares the
/// machine with the server under test, low.
const READ_AHEAD: usize = 128 << 10;

/// A client-side TLS session over a TCP stream.
pub struct TlsStream {
    tcp: TcpStream,
    /// Boxed: it is large and the stream moves into tasks.
    conn: Box<ClientConnection>,
    /// Ciphertext read ahead, `inbuf[start..end]` not yet taken by rustls.
    inbuf: Box<[u8]>,
    start: usize,
    end: usize,
    /// The socket reached EOF (and rustls has been told).
    eof: bool,
    /// close_notify is queued.
    closing: bool,
}

impl TlsStream {
    /// Runs the handshake to its end over `tcp`.
    pub async fn connect(tcp: TcpStream, tls: &TlsClient) -> io::Result<TlsStream> {
        let conn = ClientConnection::new(tls.config.clone(), tls.name.clone())
            .map_err(io::Error::other)?;
        let mut stream = TlsStream {
            tcp,
            conn: Box::new(conn),
            inbuf: vec![0u8; READ_AHEAD].into_boxed_slice(),
            start: 0,
            end: 0,
            eof: false,
            closing: false,
        };
        poll_fn(|cx| stream.poll_handshake(cx)).await?;
        Ok(stream)
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            ready!(self.poll_send(cx))?;
            if !self.conn.is_handshaking() {
                return Poll::Ready(Ok(()));
            }
            if self.eof {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the server closed the connection during the TLS handshake",
                )));
            }
            ready!(self.poll_receive(cx))?;
        }
    }

    /// Sends every queued record; `Pending` (the waker registered) while the socket is full.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.conn.wants_write() {
            let mut sink = SyncWrite {
                tcp: &mut self.tcp,
                cx,
            };
            match self.conn.write_tls(&mut sink) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Poll::Pending,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Gives rustls more ciphertext (reading the socket when none is left over) and lets
    /// it process what it has. At the socket's EOF rustls is told, so its reader then says
    /// whether the stream ended cleanly (close_notify) or was cut.
    fn poll_receive(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.start == self.end && !self.eof {
            let mut filled = ReadBuf::new(&mut self.inbuf);
            ready!(Pin::new(&mut self.tcp).poll_read(cx, &mut filled))?;
            let n = filled.filled().len();
            (self.start, self.end) = (0, n);
            self.eof = n == 0;
        }
        let mut rest = &self.inbuf[self.start..self.end];
        self.start += self.conn.read_tls(&mut rest)?;
        if let Err(e) = self.conn.process_new_packets() {
            // rustls queued an alert saying why: a best effort to send it.
            let _ = self.poll_send(cx);
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)));
        }
        Poll::Ready(Ok(()))
    }

    /// Hands `write` rustls's plaintext writer after sending older records; `Pending`
    /// while the encrypted backlog is at rustls's buffer limit and the socket is full.
    fn poll_write_with(
        &mut self,
        cx: &mut Context<'_>,
        write: impl FnOnce(&mut rustls::Writer<'_>) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        let flushed = self.poll_send(cx);
        if let Poll::Ready(Err(e)) = flushed {
            return Poll::Ready(Err(e));
        }
        let n = write(&mut self.conn.writer())?;
        if n == 0 {
            if flushed.is_ready() {
                // Nothing queued and still no room: not expected, but never hang on it.
                cx.waker().wake_by_ref();
            }
            return Poll::Pending;
        }
        // Encrypted now: on its way now, not at the next call.
        if let Poll::Ready(Err(e)) = self.poll_send(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }
}

impl AsyncRead for TlsStream {
    /// Plaintext; EOF at close_notify. A stream cut without close_notify is an
    /// `UnexpectedEof` error (HTTP framing usually ends the body first).
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let mut got = 0;
        loop {
            match this.conn.reader().read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    got += n;
                    // Ok(0): close_notify, or no room left. Otherwise more while the
                    // ciphertext already read lasts, so one call takes many records.
                    if n == 0 || buf.remaining() == 0 || this.start == this.end {
                        return Poll::Ready(Ok(()));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if got > 0 && this.start == this.end {
                        return Poll::Ready(Ok(()));
                    }
                }
                Err(e) => {
                    // What came before the error is delivered first; the next call fails.
                    return Poll::Ready(if got > 0 { Ok(()) } else { Err(e) });
                }
            }
            // Records rustls wants to send (a key update's answer, an alert) go out first.
            if let Poll::Ready(Err(e)) = this.poll_send(cx) {
                return Poll::Ready(Err(e));
            }
            match this.poll_receive(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(_)) | Poll::Pending if got > 0 => return Poll::Ready(Ok(())),
                other => return other,
            }
        }
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        self.get_mut().poll_write_with(cx, |w| w.write(buf))
    }

    /// The slices are gathered into records: a chunk's size line, data and CRLF do not
    /// become three records.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if bufs.iter().all(|b| b.is_empty()) {
            return Poll::Ready(Ok(0));
        }
        self.get_mut()
            .poll_write_with(cx, |w| w.write_vectored(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    /// close_notify, sent, then the FIN.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.closing {
            this.conn.send_close_notify();
            this.closing = true;
        }
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

/// The socket and the task's context as the blocking-style `Write` rustls writes records
/// to: `Pending` becomes `WouldBlock`, with the waker registered.
struct SyncWrite<'a, 'b> {
    tcp: &'a mut TcpStream,
    cx: &'a mut Context<'b>,
}

impl Write for SyncWrite<'_, '_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    /// rustls hands over its queued records as slices: one vectored write.
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match Pin::new(&mut *self.tcp).poll_write_vectored(self.cx, bufs) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A client's connection: plain TCP, or TLS over it.
pub enum ClientConn {
    Plain(TcpStream),
    Tls(Box<TlsStream>),
}

impl ClientConn {
    /// Connects to `addr`, with `TCP_NODELAY` if asked, and runs the TLS handshake when
    /// `tls` is given. The error says which step failed.
    pub async fn connect(
        addr: std::net::SocketAddr,
        tls: Option<&TlsClient>,
        nodelay: bool,
    ) -> Result<ClientConn, crate::error::ClientError> {
        use crate::error::ClientError;
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(ClientError::Connect)?;
        if nodelay {
            tcp.set_nodelay(true).map_err(ClientError::Io)?;
        }
        Ok(match tls {
            None => ClientConn::Plain(tcp),
            Some(tls) => ClientConn::Tls(Box::new(
                TlsStream::connect(tcp, tls)
                    .await
                    .map_err(ClientError::Handshake)?,
            )),
        })
    }
}

impl AsyncRead for ClientConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientConn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ClientConn::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientConn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ClientConn::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientConn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            ClientConn::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ClientConn::Plain(s) => s.is_write_vectored(),
            ClientConn::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientConn::Plain(s) => Pin::new(s).poll_flush(cx),
            ClientConn::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientConn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ClientConn::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}
