//! Two scenarios of many small pipes (n = 1), for any pipe server that takes `PUT` and
//! `GET` on the same path: `hold`, many parties waiting at once and then all transferring
//! (memory per waiting party, per running pipe), and `rendezvous`, many short transfers in
//! sequence and in parallel (pipes per second, and the time from the last party's arrival
//! to the first body byte at the receiver). Every request says `Connection: close`; every
//! body byte is checked.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use crate::http::{head_len, request_head};

/// Where the pipes are: the server's address, its `Host`, the path before each name.
#[derive(Debug, Clone)]
pub struct Where {
    pub addr: SocketAddr,
    pub host: String,
    pub base_path: String,
}

impl Where {
    fn target(&self, name: &str) -> String {
        format!("{}/{name}?n=1", self.base_path)
    }
}

/// Byte `pos` of pipe `seed`'s body.
fn body_byte(seed: u64, pos: u64) -> u8 {
    (seed.wrapping_mul(0x9E37_79B9) ^ pos.wrapping_mul(7) ^ (pos >> 11)) as u8
}

fn body_block(seed: u64, from: u64, len: usize) -> Vec<u8> {
    (0..len as u64).map(|i| body_byte(seed, from + i)).collect()
}

async fn connect(at: &Where) -> Result<TcpStream, String> {
    let sock = TcpStream::connect(at.addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = sock.set_nodelay(true);
    Ok(sock)
}

/// A receiver that has sent its request.
pub async fn open_receiver(at: &Where, name: &str) -> Result<TcpStream, String> {
    let mut sock = connect(at).await?;
    let head = request_head(
        "GET",
        &at.target(name),
        &at.host,
        &[("Connection", "close".into())],
    );
    sock.write_all(&head)
        .await
        .map_err(|e| format!("receiver write: {e}"))?;
    Ok(sock)
}

/// A sender that has sent its request head (not its body).
pub async fn open_sender(at: &Where, name: &str, size: u64) -> Result<TcpStream, String> {
    let mut sock = connect(at).await?;
    let head = request_head(
        "PUT",
        &at.target(name),
        &at.host,
        &[
            ("Content-Length", size.to_string()),
            ("Connection", "close".into()),
        ],
    );
    sock.write_all(&head)
        .await
        .map_err(|e| format!("sender write: {e}"))?;
    Ok(sock)
}

/// Reads a final (non-1xx) response head; returns its status, `Content-Length` and the
/// bytes read past it.
async fn read_head(sock: &mut TcpStream) -> Result<(u16, Option<u64>, Vec<u8>), String> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    loop {
        if let Some(len) = head_len(&buf) {
            let text = String::from_utf8_lossy(&buf[..len]).into_owned();
            let status: u16 = text
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| format!("bad status line in {text:?}"))?;
            let rest = buf[len..].to_vec();
            if (100..200).contains(&status) {
                buf = rest;
                continue;
            }
            let length = text.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            });
            return Ok((status, length, rest));
        }
        let n = sock
            .read(&mut tmp)
            .await
            .map_err(|e| format!("read head: {e}"))?;
        if n == 0 {
            return Err(format!(
                "closed before a response head ({} bytes)",
                buf.len()
            ));
        }
        buf.extend_from_slice(&tmp[..n]);
    }
}

/// Reads the receiver's response and checks every byte; returns when its first body byte
/// arrived.
pub async fn finish_receiver(
    mut sock: TcpStream,
    seed: u64,
    size: u64,
) -> Result<Option<Instant>, String> {
    let (status, length, mut data) = read_head(&mut sock).await?;
    if status != 200 {
        return Err(format!("receiver status {status}"));
    }
    if length != Some(size) {
        return Err(format!(
            "receiver Content-Length {length:?}, expected {size}"
        ));
    }
    let mut first = (!data.is_empty()).then(Instant::now);
    let mut pos = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let take = data.len().min((size - pos) as usize);
        if let Some(at) = (0..take).find(|&i| data[i] != body_byte(seed, pos + i as u64)) {
            return Err(format!("byte {} differs", pos + at as u64));
        }
        pos += take as u64;
        if pos == size {
            return Ok(first);
        }
        let n = sock
            .read(&mut buf)
            .await
            .map_err(|e| format!("receiver read: {e}"))?;
        if n == 0 {
            return Err(format!("receiver got {pos} of {size} bytes"));
        }
        first.get_or_insert_with(Instant::now);
        data = buf[..n].to_vec();
    }
}

/// Writes the sender's body, then reads its response to the end.
pub async fn finish_sender(mut sock: TcpStream, seed: u64, size: u64) -> Result<(), String> {
    let mut at = 0u64;
    while at < size {
        let len = (size - at).min(64 * 1024) as usize;
        sock.write_all(&body_block(seed, at, len))
            .await
            .map_err(|e| format!("sender body write: {e}"))?;
        at += len as u64;
    }
    let (status, _, _) = read_head(&mut sock).await?;
    if status != 200 {
        return Err(format!("sender status {status}"));
    }
    let mut sink = [0u8; 4096];
    while sock
        .read(&mut sink)
        .await
        .map_err(|e| format!("sender read: {e}"))?
        > 0
    {}
    Ok(())
}

/// One whole transfer of `size` bytes on `name`: the receiver arrives first if
/// `receiver_first`. Returns the time from the last party's request to the receiver's first
/// body byte.
pub async fn transfer(
    at: &Where,
    name: &str,
    seed: u64,
    size: u64,
    receiver_first: bool,
) -> Result<Duration, String> {
    let (r, s) = if receiver_first {
        let r = open_receiver(at, name).await?;
        (r, open_sender(at, name, size).await?)
    } else {
        let s = open_sender(at, name, size).await?;
        (open_receiver(at, name).await?, s)
    };
    let last = Instant::now();
    let sender = tokio::spawn(finish_sender(s, seed, size));
    let first = finish_receiver(r, seed, size).await?;
    sender.await.map_err(|e| format!("sender task: {e}"))??;
    Ok(first.map_or(Duration::ZERO, |f| f.saturating_duration_since(last)))
}

/// What `rendezvous` measured.
#[derive(Debug)]
pub struct Rendezvous {
    pub transfers: usize,
    pub seconds: f64,
    /// Time from the last party's arrival to the first body byte, sorted.
    pub latencies: Vec<Duration>,
    pub errors: Vec<String>,
}

impl Rendezvous {
    pub fn percentile(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let i = ((self.latencies.len() - 1) as f64 * p).round() as usize;
        self.latencies[i]
    }
}

/// `transfers` transfers of `size` bytes, `parallel` at a time, each on a fresh name.
pub async fn rendezvous(
    at: Arc<Where>,
    prefix: &str,
    transfers: usize,
    parallel: usize,
    size: u64,
) -> Rendezvous {
    let start = Instant::now();
    let lanes: Vec<_> = (0..parallel.max(1))
        .map(|lane| {
            let at = at.clone();
            let prefix = prefix.to_string();
            let parallel = parallel.max(1);
            tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut errors = Vec::new();
                for i in (lane..transfers).step_by(parallel) {
                    let name = format!("{prefix}-{i}");
                    match transfer(&at, &name, i as u64, size, i % 2 == 0).await {
                        Ok(d) => lat.push(d),
                        Err(e) => errors.push(format!("transfer {i}: {e}")),
                    }
                }
                (lat, errors)
            })
        })
        .collect();
    let mut out = Rendezvous {
        transfers,
        seconds: 0.0,
        latencies: Vec::new(),
        errors: Vec::new(),
    };
    for lane in lanes {
        match lane.await {
            Ok((lat, errors)) => {
                out.latencies.extend(lat);
                out.errors.extend(errors);
            }
            Err(e) => out.errors.push(format!("lane: {e}")),
        }
    }
    out.seconds = start.elapsed().as_secs_f64();
    out.latencies.sort_unstable();
    out
}

/// The first party of each of `pipes` pipes (a sender on even pipes, a receiver on odd),
/// opened `concurrency` at a time; they wait for their partners.
pub async fn open_first_parties(
    at: Arc<Where>,
    prefix: &str,
    pipes: usize,
    size: u64,
    concurrency: usize,
) -> Result<Vec<TcpStream>, String> {
    let gate = Arc::new(Semaphore::new(concurrency.max(1)));
    let tasks: Vec<_> = (0..pipes)
        .map(|i| {
            let (at, gate, name) = (at.clone(), gate.clone(), format!("{prefix}-{i}"));
            tokio::spawn(async move {
                let _permit = gate.acquire_owned().await;
                if i % 2 == 0 {
                    open_sender(&at, &name, size).await
                } else {
                    open_receiver(&at, &name).await
                }
            })
        })
        .collect();
    let mut socks = Vec::with_capacity(pipes);
    for (i, t) in tasks.into_iter().enumerate() {
        socks.push(
            t.await
                .map_err(|e| format!("pipe {i}: {e}"))?
                .map_err(|e| format!("pipe {i}: {e}"))?,
        );
    }
    Ok(socks)
}

/// The partners of [`open_first_parties`] arrive, and every pipe transfers; returns the
/// errors.
pub async fn complete_all(
    at: Arc<Where>,
    prefix: &str,
    first: Vec<TcpStream>,
    size: u64,
    concurrency: usize,
) -> Vec<String> {
    let gate = Arc::new(Semaphore::new(concurrency.max(1)));
    let tasks: Vec<_> = first
        .into_iter()
        .enumerate()
        .map(|(i, sock)| {
            let (at, gate, name) = (at.clone(), gate.clone(), format!("{prefix}-{i}"));
            tokio::spawn(async move {
                let seed = i as u64;
                let partner = {
                    let _permit = gate.acquire_owned().await;
                    if i % 2 == 0 {
                        open_receiver(&at, &name).await?
                    } else {
                        open_sender(&at, &name, size).await?
                    }
                };
                let (s, r) = if i % 2 == 0 {
                    (sock, partner)
                } else {
                    (partner, sock)
                };
                let sender = tokio::spawn(finish_sender(s, seed, size));
                finish_receiver(r, seed, size).await?;
                sender.await.map_err(|e| format!("sender task: {e}"))?
            })
        })
        .collect();
    let mut errors = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => errors.push(format!("pipe {i}: {e}")),
            Err(e) => errors.push(format!("pipe {i}: {e}")),
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_differ_by_pipe_and_by_position() {
        let a = body_block(1, 0, 4096);
        let b = body_block(2, 0, 4096);
        assert_ne!(a, b);
        assert_eq!(body_block(1, 100, 10), a[100..110]);
        assert!(a.windows(2).any(|w| w[0] != w[1]));
    }
}
