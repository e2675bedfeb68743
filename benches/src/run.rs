//! One measured run: P pipes of one sender and n receivers each, against an HTTP pipe server
//! or the floor server, with a deadline; then the verdict on every byte and the figures.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::client::{self, Gate, Proto, ReceiverOutcome, RecvSpec, SendSpec, SenderOutcome};
use crate::error::ClientError;
use crate::payload::{splitmix64, Payload};
use crate::procstat::{self, CpuTimes};
use crate::report::{Mode, ProcFigures, RunReport};
use crate::tls::TlsClient;

/// Where the clients connect and how they name their pipes.
#[derive(Debug, Clone)]
pub enum Target {
    /// An HTTP pipe server: `PUT`/`GET` `{base_path}/{name}-{tag}-{pipe}?n={n}`.
    Http {
        addr: SocketAddr,
        host: Arc<str>,
        base_path: String,
        url: String,
        /// Set for an `https://` URL.
        tls: Option<TlsClient>,
    },
    /// The floor server (no HTTP), over TLS when its clients should be.
    Floor {
        addr: SocketAddr,
        tls: Option<TlsClient>,
    },
}

impl Target {
    fn addr(&self) -> SocketAddr {
        match self {
            Target::Http { addr, .. } | Target::Floor { addr, .. } => *addr,
        }
    }

    fn tls(&self) -> Option<&TlsClient> {
        match self {
            Target::Http { tls, .. } | Target::Floor { tls, .. } => tls.as_ref(),
        }
    }
}

/// What to run, the same for every repetition.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub n: usize,
    pub pipes: usize,
    pub size: u64,
    pub chunked: bool,
    /// Bytes per sender write.
    pub block: usize,
    /// Receivers' read buffer.
    pub read_buf: usize,
    /// Check a CRC-32 of every body (else only lengths).
    pub checksum: bool,
    pub timeout: Duration,
    /// First part of every pipe name.
    pub name: String,
}

/// A process whose peak RSS and CPU a run reports.
#[derive(Debug, Clone)]
pub struct Watched {
    pub pid: u32,
    pub label: &'static str,
}

/// The seed of pipe `pipe`'s stream: every pipe carries different bytes.
pub fn pipe_seed(pipe: usize) -> u64 {
    splitmix64(0xFA_2F1E_u64 ^ (pipe as u64).rotate_left(32))
}

/// The CRC-32 each pipe's receivers must end with, computed once on `threads` threads.
pub fn expected_crcs(payload: &Payload, scenario: &Scenario, threads: usize) -> Vec<u32> {
    let pipes: Vec<usize> = (0..scenario.pipes).collect();
    let per_thread = pipes.len().div_ceil(threads.max(1)).max(1);
    std::thread::scope(|scope| {
        let handles: Vec<_> = pipes
            .chunks(per_thread)
            .map(|chunk| {
                scope.spawn(move || {
                    chunk
                        .iter()
                        .map(|&p| payload.crc32(pipe_seed(p), scenario.size, scenario.block))
                        .collect::<Vec<u32>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    })
}

enum Finished {
    Receiver(usize, usize, ReceiverOutcome),
    Sender(usize, SenderOutcome),
}

/// Runs the scenario once and returns its report. `group_base` makes floor groups unique
/// across runs; `tag` makes pipe names unique.
pub async fn run_once(
    scenario: &Scenario,
    target: &Target,
    payload: &Arc<Payload>,
    expected: &Arc<Vec<u32>>,
    watched: Option<&Watched>,
    tag: &str,
    group_base: u64,
) -> RunReport {
    let (n, pipes) = (scenario.n, scenario.pipes);
    let recv_progress: Arc<Vec<AtomicU64>> =
        Arc::new((0..n * pipes).map(|_| AtomicU64::new(0)).collect());
    let send_progress: Arc<Vec<AtomicU64>> =
        Arc::new((0..pipes).map(|_| AtomicU64::new(0)).collect());

    let mut notes = Vec::new();
    let before = watched.map(|w| {
        let reset = procstat::reset_peak_rss(w.pid);
        if let Err(e) = &reset {
            notes.push(format!("could not reset the peak RSS of pid {} ({e}): it is the peak since the process started", w.pid));
        }
        (reset.is_ok(), procstat::rss_kib(w.pid).ok(), procstat::cpu_times(w.pid).ok())
    });
    let self_before = procstat::self_cpu_times();
    let deadline = tokio::time::Instant::now() + scenario.timeout;

    let mut tasks = JoinSet::new();
    let gate = Arc::new(Gate::new(pipes));
    for pipe in 0..pipes {
        let proto = match target {
            Target::Http {
                host, base_path, ..
            } => Proto::Http {
                host: host.clone(),
                target: format!("{base_path}/{}-{tag}-{pipe}?n={n}", scenario.name),
            },
            Target::Floor { .. } => Proto::Floor {
                group: group_base + pipe as u64,
                n: n as u32,
            },
        };
        let addr = target.addr();
        let (ready_tx, ready_rx) = mpsc::channel(n.max(1));
        let recv_spec = Arc::new(RecvSpec {
            addr,
            proto: proto.clone(),
            tls: target.tls().cloned(),
            read_buf: scenario.read_buf,
            checksum: scenario.checksum,
        });
        for i in 0..n {
            let (spec, ready, progress) =
                (recv_spec.clone(), ready_tx.clone(), recv_progress.clone());
            tasks.spawn(async move {
                let outcome = client::receive(&spec, &progress[pipe * n + i], ready).await;
                Finished::Receiver(pipe, i, outcome)
            });
        }
        drop(ready_tx);
        let send_spec = SendSpec {
            addr,
            proto,
            tls: target.tls().cloned(),
            payload: payload.clone(),
            seed: pipe_seed(pipe),
            size: scenario.size,
            block: scenario.block,
            chunked: scenario.chunked,
        };
        let (progress, gate) = (send_progress.clone(), gate.clone());
        tasks.spawn(async move {
            let outcome = client::send(&send_spec, ready_rx, n, &gate, &progress[pipe]).await;
            Finished::Sender(pipe, outcome)
        });
    }

    let mut receivers: Vec<Option<ReceiverOutcome>> = (0..n * pipes).map(|_| None).collect();
    let mut senders: Vec<Option<SenderOutcome>> = (0..pipes).map(|_| None).collect();
    let mut failures = Vec::new();
    let mut timed_out = false;
    loop {
        match tokio::time::timeout_at(deadline, tasks.join_next()).await {
            Ok(Some(Ok(Finished::Receiver(pipe, i, outcome)))) => {
                receivers[pipe * n + i] = Some(outcome)
            }
            Ok(Some(Ok(Finished::Sender(pipe, outcome)))) => senders[pipe] = Some(outcome),
            Ok(Some(Err(e))) => failures.push(format!("a client task failed: {e}")),
            Ok(None) => break,
            Err(_) => {
                timed_out = true;
                tasks.abort_all();
                break;
            }
        }
    }
    let self_cpu = procstat::self_cpu_times().since(self_before);
    let proc = watched
        .zip(before)
        .map(|(w, (reset, start_rss_kib, cpu_before))| ProcFigures {
            label: w.label,
            pid: w.pid,
            peak_rss_kib: procstat::peak_rss_kib(w.pid).ok(),
            start_rss_kib,
            peak_reset: reset,
            cpu: cpu_before
                .zip(procstat::cpu_times(w.pid).ok())
                .map(|(b, a)| a.since(b)),
        });

    let size = scenario.size;
    let secs = scenario.timeout.as_secs_f64();
    let mut start: Option<Instant> = None;
    let mut end: Option<Instant> = None;
    let mut senders_ok = 0;
    let mut sender_line = None;
    for (pipe, outcome) in senders.iter().enumerate() {
        let sent = send_progress[pipe].load(Ordering::Relaxed);
        match outcome {
            None => failures.push(format!(
                "pipe {pipe} sender: no end within the {secs} s timeout, after writing {sent} of {size} bytes"
            )),
            Some(out) => {
                start = match (start, out.started_at) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                if sender_line.is_none() {
                    sender_line.clone_from(&out.last_line);
                }
                match &out.error {
                    None => senders_ok += 1,
                    Some(e) => failures.push(format!(
                        "pipe {pipe} sender: {e} (wrote {} of {size} bytes; status {}; last line {:?})",
                        out.bytes_sent,
                        out.status.map_or("none".to_string(), |s| s.to_string()),
                        out.last_line.as_deref().unwrap_or("")
                    )),
                }
            }
        }
    }
    let mut receivers_ok = 0;
    for (index, outcome) in receivers.iter().enumerate() {
        let (pipe, i) = (index / n.max(1), index % n.max(1));
        let who = format!("pipe {pipe} receiver {} of {n}", i + 1);
        let got = recv_progress[index].load(Ordering::Relaxed);
        let Some(out) = outcome else {
            failures.push(format!(
                "{who}: short: got {got} of {size} bytes before the {secs} s timeout"
            ));
            continue;
        };
        if let Some(at) = out.done_at {
            end = Some(end.map_or(at, |e| e.max(at)));
        }
        if let Some(e) = &out.error {
            let says_how_much = matches!(e, ClientError::Cut { .. } | ClientError::Status { .. });
            let got = if says_how_much {
                String::new()
            } else {
                format!(" (got {} of {size} bytes)", out.bytes)
            };
            failures.push(format!("{who}: {e}{got}"));
        } else if out.bytes != size {
            failures.push(format!(
                "{who}: wrong length: got {} bytes, expected {size}",
                out.bytes
            ));
        } else if out.crc.is_some_and(|crc| Some(&crc) != expected.get(pipe)) {
            failures.push(format!(
                "{who}: wrong data: CRC-32 {:08x}, expected {:08x}",
                out.crc.unwrap_or_default(),
                expected.get(pipe).copied().unwrap_or_default()
            ));
        } else {
            receivers_ok += 1;
        }
    }
    if timed_out {
        notes.push(format!("timed out after {secs} s"));
    }
    RunReport {
        mode: match target {
            Target::Http { .. } => Mode::Server,
            Target::Floor { .. } => Mode::Floor,
        },
        target: match target {
            Target::Http { url, .. } => url.clone(),
            Target::Floor { addr, tls: None } => format!("floor://{addr}"),
            Target::Floor { addr, tls: Some(_) } => format!("floor+tls://{addr}"),
        },
        size,
        n,
        pipes,
        chunked: scenario.chunked && matches!(target, Target::Http { .. }),
        checksum: scenario.checksum,
        wall: start
            .zip(end)
            .map(|(s, e)| e.saturating_duration_since(s).as_secs_f64()),
        receivers_ok,
        senders_ok,
        sender_line,
        failures,
        notes,
        proc,
        load_cpu: CpuTimes {
            user: self_cpu.user,
            system: self_cpu.system,
        },
    }
}

/// The target for a base URL like `http://127.0.0.1:8080` or `https://localhost:8443` (a
/// path in it, and `path_prefix`, go before every pipe name). An `https://` URL needs the
/// client configuration (`tls`, trusting the server's CA); the host in the URL is the
/// name its certificate must carry.
pub fn http_target(
    url: &str,
    path_prefix: &str,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<Target, String> {
    use std::net::ToSocketAddrs;
    let (rest, default_port, secure) = if let Some(rest) = url.strip_prefix("http://") {
        (rest, 80, false)
    } else if let Some(rest) = url.strip_prefix("https://") {
        (rest, 443, true)
    } else {
        return Err(format!(
            "{url:?}: only http:// and https:// URLs are supported"
        ));
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    if authority.is_empty() || authority.contains('@') {
        return Err(format!("{url:?}: expected http[s]://HOST[:PORT][/PATH]"));
    }
    let (host, has_port) = match authority.rfind(']') {
        Some(bracket) => (
            authority[..=bracket]
                .trim_start_matches('[')
                .trim_end_matches(']'),
            authority[bracket..].contains(':'),
        ),
        None => match authority.rsplit_once(':') {
            Some((host, _)) => (host, true),
            None => (authority, false),
        },
    };
    let connect = if has_port {
        authority.to_string()
    } else {
        format!("{authority}:{default_port}")
    };
    let addr = connect
        .to_socket_addrs()
        .map_err(|e| format!("{url:?}: cannot resolve {connect}: {e}"))?
        .next()
        .ok_or_else(|| format!("{url:?}: {connect} resolves to no address"))?;
    let tls = match (secure, tls) {
        (false, _) => None,
        (true, None) => {
            return Err(format!(
                "{url:?}: an https:// URL needs --cacert FILE, the CA that signed the server's certificate \
                 (`fanpipe-load cert --out DIR` makes one)"
            ))
        }
        (true, Some(config)) => {
            let name = rustls::pki_types::ServerName::try_from(host.to_string())
                .map_err(|e| format!("{url:?}: {host:?} is not a TLS server name: {e}"))?;
            Some(TlsClient { config, name })
        }
    };
    let join = |a: &str, b: &str| format!("{}/{}", a.trim_end_matches('/'), b.trim_matches('/'));
    let base_path = join(path, path_prefix).trim_end_matches('/').to_string();
    Ok(Target::Http {
        addr,
        host: authority.into(),
        base_path,
        url: url.trim_end_matches('/').to_string(),
        tls,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Arc<rustls::ClientConfig> {
        crate::tls::client_config(&[]).expect("a client config")
    }

    #[test]
    fn https_urls_carry_the_server_name_and_port() {
        let target = http_target("https://localhost:8443/base", "", Some(config())).expect("ok");
        let Target::Http {
            addr,
            tls: Some(tls),
            base_path,
            ..
        } = target
        else {
            panic!("an https target with TLS");
        };
        assert_eq!(addr.port(), 8443);
        assert_eq!(base_path, "/base");
        assert_eq!(
            format!("{:?}", tls.name),
            format!(
                "{:?}",
                rustls::pki_types::ServerName::try_from("localhost").expect("name")
            )
        );
        let Target::Http { addr, tls, .. } =
            http_target("https://127.0.0.1", "", Some(config())).expect("ok")
        else {
            panic!("http target");
        };
        assert_eq!(addr.port(), 443);
        assert!(tls.is_some());
        assert!(http_target("https://127.0.0.1:8443", "", None).is_err());
        let Target::Http { tls, .. } =
            http_target("http://[::1]:80", "", Some(config())).expect("ok")
        else {
            panic!("http target");
        };
        assert!(tls.is_none());
    }
}
