//! The load generator's clients: a receiver (GET, or a floor hello) and a sender (PUT, or a
//! floor hello), on tokio sockets, over TLS when the target has it. Each reads into one reused buffer; the HTTP head and
//! framing are skipped for the floor server, so both paths measure the same client code.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Notify};

use crate::error::ClientError;
use crate::floor;
use crate::http::{self, BodyKind, ChunkedDecoder, ResponseHead};
use crate::payload::Payload;
use crate::tls::TlsClient;
use crate::tls_stream::ClientConn;

/// How a client talks to its server.
#[derive(Debug, Clone)]
pub enum Proto {
    /// HTTP/1.1: `GET`/`PUT` of `target` (path and query) with this `Host`.
    Http { host: Arc<str>, target: String },
    /// The floor server: a fixed hello naming the group, then raw bytes.
    Floor { group: u64, n: u32 },
}

/// What one receiver should do.
#[derive(Debug, Clone)]
pub struct RecvSpec {
    pub addr: SocketAddr,
    pub proto: Proto,
    /// TLS to the target, if it speaks it.
    pub tls: Option<TlsClient>,
    /// Size of the reused read buffer.
    pub read_buf: usize,
    /// Compute the CRC-32 of the body (else only count bytes).
    pub checksum: bool,
}

/// What one receiver saw.
#[derive(Debug, Default)]
pub struct ReceiverOutcome {
    pub status: Option<u16>,
    pub bytes: u64,
    pub crc: Option<u32>,
    /// When the body's last byte (or its end) was read.
    pub done_at: Option<Instant>,
    pub error: Option<ClientError>,
}

/// What one sender should do.
#[derive(Clone)]
pub struct SendSpec {
    pub addr: SocketAddr,
    pub proto: Proto,
    /// TLS to the target, if it speaks it.
    pub tls: Option<TlsClient>,
    pub payload: Arc<Payload>,
    /// Seed of this pipe's stream in `payload`.
    pub seed: u64,
    pub size: u64,
    /// Bytes per write (one payload block).
    pub block: usize,
    pub chunked: bool,
}

/// What one sender saw.
#[derive(Debug, Default)]
pub struct SenderOutcome {
    pub status: Option<u16>,
    /// The last line of the server's response to the sender.
    pub last_line: Option<String>,
    pub bytes_sent: u64,
    /// When the sender wrote its first byte.
    pub started_at: Option<Instant>,
    pub error: Option<ClientError>,
}

/// Receives one body, publishing the bytes received so far in `progress`, and reports on
/// `ready` once its request is out (`false` if it could not make it).
pub async fn receive(
    spec: &RecvSpec,
    progress: &AtomicU64,
    ready: mpsc::Sender<bool>,
) -> ReceiverOutcome {
    let mut out = ReceiverOutcome::default();
    if let Err(error) = receive_into(spec, progress, ready, &mut out).await {
        out.error = Some(error);
    }
    out
}

async fn receive_into(
    spec: &RecvSpec,
    progress: &AtomicU64,
    ready: mpsc::Sender<bool>,
    out: &mut ReceiverOutcome,
) -> Result<(), ClientError> {
    let request = match &spec.proto {
        Proto::Http { host, target } => {
            http::request_head("GET", target, host, &[("Accept", "*/*".into())])
        }
        Proto::Floor { group, n } => floor::hello(floor::Role::Receiver, *group, *n).to_vec(),
    };
    let connected = async {
        let mut stream = ClientConn::connect(spec.addr, spec.tls.as_ref(), false).await?;
        stream.write_all(&request).await.map_err(ClientError::Io)?;
        // Out now: a TLS stream holds the record until flushed.
        stream.flush().await.map_err(ClientError::Io)?;
        Ok(stream)
    }
    .await;
    // Tell the sender, then let go of the channel so a sender never waits on us.
    let _ = ready.send(connected.is_ok()).await;
    drop(ready);
    let mut stream = connected?;

    let mut buf = vec![0u8; spec.read_buf.max(http::MAX_HEAD)];
    let (kind, start, end) = match spec.proto {
        Proto::Http { .. } => {
            let (head, start, end) = read_head(&mut stream, &mut buf).await?;
            out.status = Some(head.status);
            if head.status != 200 {
                return Err(error_status(&mut stream, &mut buf, head, start, end).await);
            }
            (head.body, start, end)
        }
        Proto::Floor { .. } => (BodyKind::UntilClose, 0, 0),
    };
    let mut hasher = spec.checksum.then(crc32fast::Hasher::new);
    let mut bytes = 0u64;
    let result = read_body(&mut stream, &mut buf, start, end, kind, |data| {
        if let Some(hasher) = hasher.as_mut() {
            hasher.update(data);
        }
        bytes += data.len() as u64;
        progress.store(bytes, Ordering::Relaxed);
    })
    .await;
    out.bytes = bytes;
    out.crc = hasher.map(crc32fast::Hasher::finalize);
    result?;
    out.done_at = Some(Instant::now());
    Ok(())
}

/// Lets every pipe's sender start at once, after all pipes' receivers made their requests
/// and all senders connected, so that the timed part is the data phase, not connection setup.
pub struct Gate {
    remaining: AtomicUsize,
    notify: Notify,
}

impl Gate {
    pub fn new(parties: usize) -> Self {
        Gate {
            remaining: AtomicUsize::new(parties),
            notify: Notify::new(),
        }
    }

    /// One party is here (or gave up); the last one opens the gate.
    pub fn arrive(&self) {
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.notify.notify_waiters();
        }
    }

    /// Waits until every party has arrived.
    pub async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.remaining.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// Sends one body once all `n` receivers of its pipe have made their requests and `gate`
/// opens, reading the server's response at the same time (a sender that does not read its
/// response can deadlock). Publishes the bytes written so far in `progress`.
pub async fn send(
    spec: &SendSpec,
    mut ready: mpsc::Receiver<bool>,
    n: usize,
    gate: &Gate,
    progress: &AtomicU64,
) -> SenderOutcome {
    let mut out = SenderOutcome::default();
    let mut all_ready = true;
    for _ in 0..n {
        if ready.recv().await != Some(true) {
            all_ready = false;
            break;
        }
    }
    let connected = if all_ready {
        Some(ClientConn::connect(spec.addr, spec.tls.as_ref(), true).await)
    } else {
        None
    };
    gate.arrive();
    let result = match connected {
        None => Err(ClientError::NotSent),
        Some(Err(e)) => Err(e),
        Some(Ok(stream)) => {
            gate.wait().await;
            send_on(stream, spec, progress, &mut out).await
        }
    };
    if let Err(error) = result {
        out.error = Some(error);
    }
    out
}

async fn send_on(
    stream: ClientConn,
    spec: &SendSpec,
    progress: &AtomicU64,
    out: &mut SenderOutcome,
) -> Result<(), ClientError> {
    out.started_at = Some(Instant::now());
    match stream {
        ClientConn::Plain(tcp) => {
            let (rd, wr) = tcp.into_split();
            exchange(rd, wr, spec, progress, out).await
        }
        // One session, read and written by the same task: the split's lock never waits.
        tls @ ClientConn::Tls(_) => {
            let (rd, wr) = tokio::io::split(tls);
            exchange(rd, wr, spec, progress, out).await
        }
    }
}

/// Uploads the body on `wr` while reading the server's answer on `rd`.
async fn exchange<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    mut rd: R,
    mut wr: W,
    spec: &SendSpec,
    progress: &AtomicU64,
    out: &mut SenderOutcome,
) -> Result<(), ClientError> {
    let writer = write_request(spec, &mut wr, progress);
    let reader = read_sender_response(&spec.proto, &mut rd);
    tokio::pin!(writer, reader);
    let mut written: Option<Result<u64, ClientError>> = None;
    let mut response: Option<Result<SenderResponse, ClientError>> = None;
    while written.is_none() || response.is_none() {
        tokio::select! {
            result = &mut writer, if written.is_none() => written = Some(result),
            result = &mut reader, if response.is_none() => {
                // An early error answer (or a dead connection) ends the upload.
                let stop = result.as_ref().map_or(true, |r| !(200..300).contains(&r.status.unwrap_or(200)));
                response = Some(result);
                if stop && written.is_none() {
                    written = Some(Err(ClientError::Abandoned));
                }
            }
        }
    }
    out.bytes_sent = progress.load(Ordering::Relaxed);
    let response = response.unwrap_or(Err(ClientError::NoResponse));
    let written = written.unwrap_or(Err(ClientError::Abandoned));
    match response {
        Ok(resp) => {
            out.status = resp.status;
            out.last_line = resp.last_line;
            if let Some(line) = resp.error_line {
                return Err(ClientError::ServerSaid(line));
            }
            if let Some(err) = resp.error {
                return Err(err);
            }
            written.map(drop)
        }
        Err(err) => {
            if let ClientError::Status { status, .. } = &err {
                out.status = Some(*status);
            }
            // A failed upload usually explains a failed response; say the first cause.
            match written {
                Err(ClientError::Abandoned) | Ok(_) => Err(err),
                Err(write_err) => Err(write_err),
            }
        }
    }
}

async fn write_request<W: AsyncWrite + Unpin>(
    spec: &SendSpec,
    wr: &mut W,
    progress: &AtomicU64,
) -> Result<u64, ClientError> {
    let io = ClientError::Io;
    match &spec.proto {
        Proto::Http { host, target } => {
            let framing = if spec.chunked {
                ("Transfer-Encoding", "chunked".to_string())
            } else {
                ("Content-Length", spec.size.to_string())
            };
            let extra = [
                ("Content-Type", "application/octet-stream".to_string()),
                framing,
            ];
            wr.write_all(&http::request_head("PUT", target, host, &extra))
                .await
                .map_err(io)?;
        }
        Proto::Floor { group, n } => {
            wr.write_all(&floor::hello(floor::Role::Sender, *group, *n))
                .await
                .map_err(io)?;
        }
    }
    let chunked = spec.chunked && matches!(spec.proto, Proto::Http { .. });
    let mut sent = 0u64;
    for block in spec.payload.blocks(spec.seed, spec.size, spec.block) {
        if chunked {
            let size_line = format!("{:x}\r\n", block.len());
            write_all_vectored(wr, &[size_line.as_bytes(), block, b"\r\n"])
                .await
                .map_err(io)?;
        } else {
            wr.write_all(block).await.map_err(io)?;
        }
        sent += block.len() as u64;
        progress.store(sent, Ordering::Relaxed);
    }
    if chunked {
        wr.write_all(b"0\r\n\r\n").await.map_err(io)?;
    }
    if matches!(spec.proto, Proto::Floor { .. }) {
        // The floor server ends the fan-out at the sender's EOF.
        wr.shutdown().await.map_err(io)?;
    } else {
        wr.flush().await.map_err(io)?;
    }
    Ok(sent)
}

/// Writes all of `parts` with as few (vectored) writes as the socket allows.
async fn write_all_vectored<W: AsyncWrite + Unpin>(
    wr: &mut W,
    parts: &[&[u8]],
) -> std::io::Result<()> {
    let mut part = 0;
    let mut offset = 0;
    while part < parts.len() {
        let slices: Vec<std::io::IoSlice<'_>> = std::iter::once(&parts[part][offset..])
            .chain(parts[part + 1..].iter().copied())
            .map(std::io::IoSlice::new)
            .collect();
        let mut wrote = wr.write_vectored(&slices).await?;
        if wrote == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while part < parts.len() && wrote >= parts[part].len() - offset {
            wrote -= parts[part].len() - offset;
            part += 1;
            offset = 0;
        }
        offset += wrote;
    }
    Ok(())
}

/// The server's answer to a sender: its status, last line and first `[ERROR]` line.
#[derive(Debug, Default)]
struct SenderResponse {
    status: Option<u16>,
    last_line: Option<String>,
    error_line: Option<String>,
    /// The response ended badly (cut, malformed) after its head.
    error: Option<ClientError>,
}

const MAX_LINE: usize = 4096;

async fn read_sender_response<R: AsyncRead + Unpin>(
    proto: &Proto,
    rd: &mut R,
) -> Result<SenderResponse, ClientError> {
    let mut buf = vec![0u8; http::MAX_HEAD];
    let mut resp = SenderResponse::default();
    let (kind, start, end) = match proto {
        Proto::Http { .. } => {
            let (head, start, end) = read_head(rd, &mut buf).await?;
            resp.status = Some(head.status);
            if !(200..300).contains(&head.status) {
                return Err(error_status(rd, &mut buf, head, start, end).await);
            }
            (head.body, start, end)
        }
        Proto::Floor { .. } => (BodyKind::UntilClose, 0, 0),
    };
    let mut line: Vec<u8> = Vec::new();
    let mut last_line = None;
    let mut error_line = None;
    let mut take_line = |line: &mut Vec<u8>| {
        let text = String::from_utf8_lossy(line)
            .trim_end_matches('\r')
            .trim()
            .to_string();
        line.clear();
        if text.is_empty() {
            return;
        }
        if error_line.is_none() && text.starts_with("[ERROR]") {
            error_line = Some(text.clone());
        }
        last_line = Some(text);
    };
    let result = read_body(rd, &mut buf, start, end, kind, |data| {
        for piece in data.split_inclusive(|&b| b == b'\n') {
            let room = MAX_LINE.saturating_sub(line.len());
            line.extend_from_slice(&piece[..piece.len().min(room)]);
            if piece.ends_with(b"\n") {
                take_line(&mut line);
            }
        }
    })
    .await;
    take_line(&mut line);
    resp.last_line = last_line;
    resp.error_line = error_line;
    resp.error = result.err();
    Ok(resp)
}

/// Reads a response head into `buf`, skipping `1xx` interim responses. Returns the head and
/// the range of `buf` that holds the body bytes read with it.
async fn read_head<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut [u8],
) -> Result<(ResponseHead, usize, usize), ClientError> {
    let mut filled = 0;
    loop {
        let limit = buf.len().min(http::MAX_HEAD);
        if let Some(len) = http::head_len(&buf[..filled]) {
            let head = http::parse_response_head(&buf[..len])?;
            if (100..200).contains(&head.status) {
                buf.copy_within(len..filled, 0);
                filled -= len;
                continue;
            }
            return Ok((head, len, filled));
        }
        if filled >= limit {
            return Err(ClientError::BadHead(format!("longer than {limit} bytes")));
        }
        let read = rd
            .read(&mut buf[filled..limit])
            .await
            .map_err(ClientError::Io)?;
        if read == 0 {
            return Err(ClientError::NoResponse);
        }
        filled += read;
    }
}

/// Reads a body framed as `kind`, starting with the bytes `buf[start..end]` that came with
/// the head, handing each piece to `on_data`. Returns the body's length.
async fn read_body<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut [u8],
    mut start: usize,
    mut end: usize,
    kind: BodyKind,
    mut on_data: impl FnMut(&[u8]),
) -> Result<u64, ClientError> {
    let mut got = 0u64;
    let mut chunked = ChunkedDecoder::default();
    loop {
        let piece = &buf[start..end];
        match kind {
            BodyKind::Length(len) => {
                let take = (len - got).min(piece.len() as u64) as usize;
                if take > 0 {
                    on_data(&piece[..take]);
                    got += take as u64;
                }
                if got == len {
                    return Ok(got);
                }
            }
            BodyKind::Chunked => {
                chunked.feed(piece, |data| {
                    got += data.len() as u64;
                    on_data(data);
                })?;
                if chunked.is_done() {
                    return Ok(got);
                }
            }
            BodyKind::UntilClose => {
                if !piece.is_empty() {
                    on_data(piece);
                    got += piece.len() as u64;
                }
            }
        }
        let read = rd.read(buf).await.map_err(ClientError::Io)?;
        if read == 0 {
            return match kind {
                BodyKind::UntilClose => Ok(got),
                BodyKind::Length(len) => Err(ClientError::Cut {
                    got,
                    expected: Some(len),
                }),
                BodyKind::Chunked => Err(ClientError::Cut {
                    got,
                    expected: None,
                }),
            };
        }
        (start, end) = (0, read);
    }
}

/// The error for a response with an unexpected status, with the start of its body as the
/// server's explanation (read for at most a second).
async fn error_status<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut [u8],
    head: ResponseHead,
    start: usize,
    end: usize,
) -> ClientError {
    let mut text = Vec::new();
    let read = read_body(rd, buf, start, end, head.body, |data| {
        let room = 300usize.saturating_sub(text.len());
        text.extend_from_slice(&data[..data.len().min(room)]);
    });
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), read).await;
    let body = String::from_utf8_lossy(&text)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    ClientError::Status {
        status: head.status,
        reason: head.reason,
        body,
    }
}
