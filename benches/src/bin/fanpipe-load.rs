//! `fanpipe-load`: the end-to-end load generator for fanpipe and any server that speaks the
//! same `PUT /NAME?n=N` / `GET /NAME?n=N` pipe protocol (piping-server, for one).
//!
//! ```text
//! # P pipes of one sender and n receivers each, against a running server
//! fanpipe-load http://127.0.0.1:8080 -n 30 --size 800MiB --pid $(pgrep -x fanpipe)
//! fanpipe-load http://127.0.0.1:8080 --pipes 1000 -n 1 --size 64KiB --json
//! # the floor: the same clients against a plain "read once, write n times" server
//! fanpipe-load floor -n 30 --size 800MiB
//! # floor and server alternately, and the ratio of their median throughputs
//! fanpipe-load compare --url http://127.0.0.1:8080 --pid PID -n 30 --size 800MiB --repeat 3
//! # over HTTPS: a CA and a localhost certificate for the server, then the same against the
//! # floor over TLS
//! fanpipe-load cert --out /tmp/pki
//! fanpipe --listen 127.0.0.1:8443 --tls-cert /tmp/pki/cert.pem --tls-key /tmp/pki/key.pem &
//! fanpipe-load compare --url https://127.0.0.1:8443 --cacert /tmp/pki/ca.pem --pid $! -n 30
//! ```
//!
//! Receivers connect and send their requests first; each sender connects once its pipe's
//! receivers have, and all senders start together once every pipe is ready (so connection
//! setup is not timed), uploading a deterministic payload (with `Content-Length`, or
//! `--chunked`) while reading the server's streamed answer. Every
//! receiver's length and CRC-32 are checked; any bad receiver or failed request prints a
//! `FAIL` line and the exit status is non-zero. Reported: wall time from the first sender's
//! first byte to the last receiver's last byte, aggregate delivered GB/s (size × n × pipes /
//! wall), with `--pid` the server's peak RSS and CPU seconds over the run, and our own CPU.
//! `--json` adds one JSON line per run (and per median) on stdout, the human text going to
//! stderr. `--repeat K` runs K times and reports the medians.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Args, Parser, Subcommand};

use fanpipe_bench::floor::{self, FloorChild, FloorConfig};
use fanpipe_bench::payload::{Payload, BASE_LEN};
use fanpipe_bench::report::{Json, RunReport, Summary};
use fanpipe_bench::run::{self, Scenario, Target, Watched};
use fanpipe_bench::tls::{self, Pki, TlsClient};
use fanpipe_bench::{procstat, size};

#[derive(Parser)]
#[command(
    name = "fanpipe-load",
    version,
    about = "End-to-end load generator for HTTP fan-out pipe servers, and their floor",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    server: ServerArgs,
    #[command(flatten)]
    load: LoadArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Measure the floor: the same clients against a minimal server (a child process) that
    /// reads the payload once and writes it to the n receivers, with no HTTP at all.
    Floor {
        #[command(flatten)]
        load: LoadArgs,
        #[command(flatten)]
        floor: FloorArgs,
    },
    /// Run the floor and the server alternately, --repeat times each, and print the ratio
    /// server/floor of their median throughputs.
    Compare {
        #[command(flatten)]
        server: ServerArgs,
        #[command(flatten)]
        load: LoadArgs,
        #[command(flatten)]
        floor: FloorArgs,
    },
    /// Hold --pipes waiting parties (the first party of each pipe, n = 1: a sender on even
    /// pipes, a receiver on odd), report the server's RSS per waiting party, then bring their
    /// partners and run every transfer, with the server's peak RSS.
    Hold {
        #[command(flatten)]
        server: ServerArgs,
        #[command(flatten)]
        meet: MeetArgs,
    },
    /// Many short transfers (n = 1), --parallel at a time, each on a fresh name: pipes per
    /// second, and p50/p99 of the time from the last party's arrival to the receiver's first
    /// body byte.
    Rendezvous {
        #[command(flatten)]
        server: ServerArgs,
        #[command(flatten)]
        meet: MeetArgs,
        /// Transfers in all
        #[arg(long, default_value_t = 2000)]
        transfers: usize,
        /// Transfers at a time
        #[arg(long, default_value_t = 1)]
        parallel: usize,
    },
    /// Write a throwaway CA and a certificate it signed for localhost, 127.0.0.1 and ::1
    /// (DIR/ca.pem, DIR/cert.pem, DIR/key.pem), to benchmark a server over HTTPS: give it
    /// cert.pem and key.pem, and fanpipe-load --cacert DIR/ca.pem.
    Cert {
        /// Directory to write into (made if missing; existing files are replaced)
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// The floor server itself (started by `floor` and `compare`).
    #[command(hide = true)]
    FloorServer {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
        #[arg(long, default_value_t = BASE_LEN)]
        block: usize,
        #[arg(long)]
        nodelay: bool,
        #[arg(long)]
        tee: bool,
        #[arg(long)]
        tls: bool,
    },
}

#[derive(Args, Clone)]
struct ServerArgs {
    /// Base URL of the pipe server, e.g. http://127.0.0.1:8080
    #[arg(value_name = "URL")]
    url_arg: Option<String>,
    /// Base URL of the pipe server (same as the positional URL)
    #[arg(long = "url", value_name = "URL")]
    url: Option<String>,
    /// Pid of the server: report its peak RSS (VmHWM) and CPU seconds over each run
    #[arg(long)]
    pid: Option<u32>,
    /// Path before each pipe name, e.g. /api/v1/pipe (default: /NAME)
    #[arg(long, default_value = "")]
    path_prefix: String,
    /// PEM file of the CA(s) to trust for an https:// URL (see the `cert` subcommand)
    #[arg(long, value_name = "FILE")]
    cacert: Option<PathBuf>,
}

#[derive(Args, Clone)]
struct LoadArgs {
    /// Receivers per pipe
    #[arg(short = 'n', long = "receivers", default_value_t = 1)]
    receivers: usize,
    /// Pipes running at once, each with one sender and n receivers
    #[arg(long, default_value_t = 1)]
    pipes: usize,
    /// Payload per pipe: 800MiB, 1GiB, 64KiB, 1MB, 12345
    #[arg(long, default_value = "100MiB", value_parser = size::parse_size)]
    size: u64,
    /// Upload with Transfer-Encoding: chunked instead of Content-Length
    #[arg(long)]
    chunked: bool,
    /// Runs of the scenario; with more than one, the medians are reported too
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Seconds a run may take before short receivers are reported and we exit non-zero
    #[arg(long, default_value_t = 300.0)]
    timeout: f64,
    /// Runtime worker threads (default: all cores)
    #[arg(long)]
    threads: Option<usize>,
    /// Print one JSON line per run on stdout (the human report goes to stderr)
    #[arg(long)]
    json: bool,
    /// Bytes per sender write (at most 1MiB)
    #[arg(long, default_value = "1MiB", value_parser = size::parse_size)]
    block_size: u64,
    /// Receivers' read buffer
    #[arg(long, default_value = "256KiB", value_parser = size::parse_size)]
    read_buffer: u64,
    /// Check lengths only, not the CRC-32 of each body (less client CPU)
    #[arg(long)]
    no_checksum: bool,
    /// First part of each pipe name (NAME-RUNID-PIPE)
    #[arg(long, default_value = "load")]
    name: String,
}

#[derive(Args, Clone)]
struct MeetArgs {
    /// Pipes (hold: waiting parties)
    #[arg(long, default_value_t = 1000)]
    pipes: usize,
    /// Payload per pipe
    #[arg(long, default_value = "16KiB", value_parser = size::parse_size)]
    size: u64,
    /// Connections opened at a time
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Runtime worker threads (default: all cores)
    #[arg(long)]
    threads: Option<usize>,
    /// First part of each pipe name (NAME-RUNID-PIPE)
    #[arg(long, default_value = "meet")]
    name: String,
}

#[derive(Args, Clone)]
struct FloorArgs {
    /// Floor server: bytes in flight between the sender and the slowest receiver (its
    /// window; fanpipe's default --buffer-size is the same 1 MiB)
    #[arg(long, default_value = "1MiB", value_parser = size::parse_size)]
    floor_block: u64,
    /// Floor server: set TCP_NODELAY on the receivers' sockets (always on over TLS)
    #[arg(long)]
    floor_nodelay: bool,
    /// Floor server: move bytes with splice(2) and tee(2), never copying them in user
    /// space (to measure what zero-copy would save; Linux only, small n)
    #[arg(long)]
    floor_tee: bool,
    /// Floor server: speak TLS to every client, with fanpipe's rustls configuration (the
    /// floor for HTTPS; `compare` with an https:// URL does so by itself)
    #[arg(long)]
    floor_tls: bool,
}

impl FloorArgs {
    fn config(&self, tls: bool) -> FloorConfig {
        FloorConfig {
            block: self.floor_block.clamp(4096, 64 << 20) as usize,
            nodelay: self.floor_nodelay,
            tee: self.floor_tee,
            tls: tls || self.floor_tls,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (load, server, floor_args, mode) = match cli.command {
        Some(Command::Cert { out }) => {
            return match Pki::generate().and_then(|pki| pki.write(&out)) {
                Ok([ca, cert, key]) => {
                    println!(
                        "wrote {}, {} and {}\n\
                         fanpipe --listen 127.0.0.1:8443 --tls-cert {} --tls-key {}\n\
                         fanpipe-load compare --url https://127.0.0.1:8443 --cacert {} --pid PID",
                        ca.display(),
                        cert.display(),
                        key.display(),
                        cert.display(),
                        key.display(),
                        ca.display()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("fanpipe-load cert: {e}");
                    ExitCode::from(2)
                }
            };
        }
        Some(Command::FloorServer {
            listen,
            block,
            nodelay,
            tee,
            tls,
        }) => {
            return match floor::serve(
                &listen,
                FloorConfig {
                    block,
                    nodelay,
                    tee,
                    tls,
                },
            ) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("floor-server: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Some(Command::Hold { server, meet }) => return run_meet(&server, &meet, None),
        Some(Command::Rendezvous {
            server,
            meet,
            transfers,
            parallel,
        }) => return run_meet(&server, &meet, Some((transfers, parallel))),
        None => (cli.load, Some(cli.server), None, Plan::Server),
        Some(Command::Floor { load, floor }) => (load, None, Some(floor), Plan::Floor),
        Some(Command::Compare {
            server,
            load,
            floor,
        }) => (load, Some(server), Some(floor), Plan::Compare),
    };
    match run(mode, &load, server.as_ref(), floor_args.as_ref()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(message) => {
            eprintln!("fanpipe-load: {message}");
            ExitCode::from(2)
        }
    }
}

/// `hold` (no `rendezvous`), or `rendezvous` of (transfers, parallel).
fn run_meet(server: &ServerArgs, args: &MeetArgs, rendezvous: Option<(usize, usize)>) -> ExitCode {
    use fanpipe_bench::meet;
    let fail = |m: String| {
        eprintln!("fanpipe-load: {m}");
        ExitCode::from(2)
    };
    let Some(url) = server.url.as_ref().or(server.url_arg.as_ref()) else {
        return fail("give the server's base URL, e.g. http://127.0.0.1:8080".into());
    };
    if url.starts_with("https://") {
        return fail("hold and rendezvous speak plain HTTP only: give an http:// URL".into());
    }
    let at = match run::http_target(url, &server.path_prefix, None) {
        Ok(Target::Http {
            addr,
            host,
            base_path,
            ..
        }) => Arc::new(meet::Where {
            addr,
            host: host.to_string(),
            base_path,
        }),
        Ok(_) => return fail("not an HTTP target".into()),
        Err(e) => return fail(e),
    };
    let files = procstat::raise_nofile_limit().unwrap_or(0);
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
        .max(1);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(format!("runtime: {e}")),
    };
    let prefix = format!(
        "{}-{}",
        args.name,
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis())
    );
    let rss = |pid: u32| procstat::rss_kib(pid).unwrap_or(0);
    if let Some((transfers, parallel)) = rendezvous {
        let cpu0 = server.pid.and_then(|p| procstat::cpu_times(p).ok());
        let r = rt.block_on(meet::rendezvous(
            at, &prefix, transfers, parallel, args.size,
        ));
        let cpu = match (server.pid, cpu0) {
            (Some(p), Some(c0)) => procstat::cpu_times(p)
                .map(|c| format!(", server CPU {:.2} s", c.since(c0).total()))
                .unwrap_or_default(),
            _ => String::new(),
        };
        println!(
            "rendezvous: {} transfers of {} bytes, {parallel} at a time: {:.2} s, {:.0} pipes/s; last arrival to first byte p50 {:.2} ms, p99 {:.2} ms{cpu}; {} errors",
            r.transfers,
            args.size,
            r.seconds,
            (r.transfers - r.errors.len()) as f64 / r.seconds,
            r.percentile(0.5).as_secs_f64() * 1e3,
            r.percentile(0.99).as_secs_f64() * 1e3,
            r.errors.len()
        );
        for e in r.errors.iter().take(10) {
            eprintln!("  {e}");
        }
        return if r.errors.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    let need = 2 * args.pipes as u64 + 64;
    if files < need {
        return fail(format!(
            "--pipes {} needs {need} open files here and the limit is {files}: lower --pipes, or raise `ulimit -n` (the server needs as many)",
            args.pipes
        ));
    }
    let base = server.pid.map(rss);
    let start = Instant::now();
    let first = match rt.block_on(meet::open_first_parties(
        at.clone(),
        &prefix,
        args.pipes,
        args.size,
        args.concurrency,
    )) {
        Ok(f) => f,
        Err(e) => return fail(e),
    };
    let opened = start.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(1));
    let waiting = server.pid.map(rss);
    if let (Some(p), Some(b), Some(w)) = (server.pid, base, waiting) {
        let _ = procstat::reset_peak_rss(p);
        println!(
            "hold: {} waiting parties opened in {opened:.2} s; server RSS {:.1} -> {:.1} MiB, {:.0} bytes per waiting party",
            args.pipes,
            b as f64 / 1024.0,
            w as f64 / 1024.0,
            (w.saturating_sub(b) * 1024) as f64 / args.pipes as f64
        );
    } else {
        println!(
            "hold: {} waiting parties opened in {opened:.2} s",
            args.pipes
        );
    }
    let start = Instant::now();
    let errors = rt.block_on(meet::complete_all(
        at,
        &prefix,
        first,
        args.size,
        args.concurrency,
    ));
    let secs = start.elapsed().as_secs_f64();
    let peak = server
        .pid
        .and_then(|p| procstat::peak_rss_kib(p).ok())
        .map(|k| format!("; server peak RSS {:.1} MiB", k as f64 / 1024.0))
        .unwrap_or_default();
    println!(
        "hold: partners joined, {} transfers of {} bytes in {secs:.2} s{peak}; {} errors",
        args.pipes,
        args.size,
        errors.len()
    );
    for e in errors.iter().take(10) {
        eprintln!("  {e}");
    }
    if errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Plan {
    Server,
    Floor,
    Compare,
}

/// Checks the arguments, sets up the targets and runs the plan. `Ok(false)`: a run failed.
fn run(
    plan: Plan,
    load: &LoadArgs,
    server: Option<&ServerArgs>,
    floor_args: Option<&FloorArgs>,
) -> Result<bool, String> {
    if load.receivers == 0 || load.pipes == 0 || load.repeat == 0 {
        return Err("--receivers, --pipes and --repeat must be at least 1".into());
    }
    if !(load.timeout > 0.0 && load.timeout.is_finite()) {
        return Err("--timeout must be a positive number of seconds".into());
    }
    if load.block_size == 0 || load.block_size > BASE_LEN as u64 {
        return Err(format!("--block-size must be from 1 to {BASE_LEN} bytes"));
    }
    check_open_files(load)?;
    let threads = load
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
        .max(1);
    let scenario = Scenario {
        n: load.receivers,
        pipes: load.pipes,
        size: load.size,
        chunked: load.chunked,
        block: load.block_size as usize,
        read_buf: load.read_buffer.clamp(4096, 64 << 20) as usize,
        checksum: !load.no_checksum,
        timeout: Duration::from_secs_f64(load.timeout),
        name: load.name.clone(),
    };

    let http = match (plan, server) {
        (Plan::Server | Plan::Compare, Some(args)) => {
            let url =
                args.url.as_ref().or(args.url_arg.as_ref()).ok_or(
                    "give the server's base URL, e.g. http://127.0.0.1:8080 (or use `floor`)",
                )?;
            let tls = match &args.cacert {
                Some(path) => Some(
                    tls::load_cas(path)
                        .and_then(|cas| tls::client_config(&cas))
                        .map_err(|e| format!("--cacert: {e}"))?,
                ),
                None => None,
            };
            let target = run::http_target(url, &args.path_prefix, tls)?;
            let watched = args.pid.map(|pid| Watched {
                pid,
                label: "server",
            });
            if let Some(w) = &watched {
                procstat::cpu_times(w.pid)
                    .map_err(|e| format!("--pid {}: cannot read its /proc/PID/stat: {e}", w.pid))?;
                warn_server_open_files(w.pid, &scenario);
            }
            Some((target, watched))
        }
        _ => None,
    };
    // Over HTTPS, the floor is the floor over TLS.
    let server_tls = matches!(&http, Some((Target::Http { tls: Some(_), .. }, _)));
    let floor = match (plan, floor_args) {
        (Plan::Floor | Plan::Compare, Some(args)) => {
            let config = args.config(server_tls);
            if config.tls && config.tee {
                return Err("--floor-tee moves plaintext only: not with TLS".into());
            }
            let child = FloorChild::spawn(config)
                .map_err(|e| format!("cannot start the floor server: {e}"))?;
            let tls = match child.ca_pem() {
                None => None,
                Some(pem) => {
                    let config = tls::certificates(pem.as_bytes(), "the floor's CA")
                        .and_then(|cas| tls::client_config(&cas))
                        .map_err(|e| format!("the floor over TLS: {e}"))?;
                    let name = rustls::pki_types::ServerName::IpAddress(
                        std::net::Ipv4Addr::LOCALHOST.into(),
                    );
                    Some(TlsClient { config, name })
                }
            };
            let target = Target::Floor {
                addr: ([127, 0, 0, 1], child.port()).into(),
                tls,
            };
            let watched = Watched {
                pid: child.pid(),
                label: "floor srv",
            };
            Some((child, target, watched))
        }
        _ => None,
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let payload = Arc::new(Payload::new(0x5EED_FA17));
    let expected = Arc::new(run::expected_crcs(&payload, &scenario, threads));
    let mut session = Session {
        runtime,
        scenario,
        payload,
        expected,
        json: load.json,
        token: run_token(),
        counter: 0,
    };

    let mut server_runs = Vec::new();
    let mut floor_runs = Vec::new();
    for k in 1..=load.repeat {
        if let Some((_, target, watched)) = &floor {
            let report = session.measure(target, Some(watched), k, load.repeat);
            let ok = report.ok();
            floor_runs.push(report);
            if !ok {
                return Ok(false);
            }
        }
        if let Some((target, watched)) = &http {
            let report = session.measure(target, watched.as_ref(), k, load.repeat);
            let ok = report.ok();
            server_runs.push(report);
            if !ok {
                return Ok(false);
            }
        }
    }
    if load.repeat > 1 {
        for summary in [Summary::of(&floor_runs), Summary::of(&server_runs)]
            .into_iter()
            .flatten()
        {
            session.emit(&summary.human(), &summary.json());
        }
    }
    if plan == Plan::Compare {
        compare(&session, load, &floor_runs, &server_runs);
    }
    drop(floor);
    Ok(true)
}

/// Prints the ratio server/floor of the median throughputs (and of the median CPU seconds
/// per run, when the server's pid was given: on a busy machine that is the steadier figure).
fn compare(
    session: &Session,
    load: &LoadArgs,
    floor_runs: &[RunReport],
    server_runs: &[RunReport],
) {
    let (Some(floor), Some(server)) = (Summary::of(floor_runs), Summary::of(server_runs)) else {
        return;
    };
    let (Some(f), Some(s)) = (floor.gbps, server.gbps) else {
        return;
    };
    let cpu_ratio = server
        .cpu
        .zip(floor.cpu)
        .filter(|&(_, f)| f > 0.0)
        .map(|(s, f)| s / f);
    let mut human = format!(
        "fanpipe-load: compare, medians of {} runs each: server {s:.3} GB/s, floor {f:.3} GB/s, \
         server/floor = {:.3}",
        load.repeat,
        s / f
    );
    if let Some(ratio) = cpu_ratio {
        human.push_str(&format!("; CPU per run server/floor = {ratio:.3}"));
    }
    // CPU seconds per GB delivered: comparable across scenarios and sizes, unlike per run.
    let delivered_gb = (load.size * load.receivers as u64 * load.pipes as u64) as f64 / 1e9;
    let per_gb = |cpu: Option<f64>| cpu.map(|c| c / delivered_gb);
    if let (Some(s), Some(f)) = (per_gb(server.cpu), per_gb(floor.cpu)) {
        human.push_str(&format!(
            "; CPU per delivered GB server {s:.3} s, floor {f:.3} s"
        ));
    }
    human.push('\n');
    let mut j = Json::new();
    j.str("mode", "compare");
    j.str("target", &server.first.target);
    j.num("runs", load.repeat as f64);
    j.num("payload_bytes", load.size as f64);
    j.num("n", load.receivers as f64);
    j.num("pipes", load.pipes as f64);
    j.num("server_gbps", s);
    j.num("floor_gbps", f);
    j.num("ratio", s / f);
    j.opt("server_cpu_s", server.cpu);
    j.opt("floor_cpu_s", floor.cpu);
    j.opt("cpu_ratio", cpu_ratio);
    j.opt("server_cpu_s_per_gb", per_gb(server.cpu));
    j.opt("floor_cpu_s_per_gb", per_gb(floor.cpu));
    j.opt("server_peak_rss_kib", server.peak_rss_kib.map(|k| k as f64));
    session.emit(&human, &j.finish());
}

/// What every run of one invocation shares.
struct Session {
    runtime: tokio::runtime::Runtime,
    scenario: Scenario,
    payload: Arc<Payload>,
    expected: Arc<Vec<u32>>,
    json: bool,
    /// Unique per invocation, so pipe names never collide with an earlier run's.
    token: String,
    counter: u64,
}

impl Session {
    fn measure(
        &mut self,
        target: &Target,
        watched: Option<&Watched>,
        run: usize,
        runs: usize,
    ) -> RunReport {
        self.counter += 1;
        let tag = format!("{}-{}", self.token, self.counter);
        let report = self.runtime.block_on(run::run_once(
            &self.scenario,
            target,
            &self.payload,
            &self.expected,
            watched,
            &tag,
            self.counter << 32,
        ));
        self.emit(&report.human(run, runs), &report.json(run, runs));
        report
    }

    /// Human text on stdout, or with --json on stderr with the JSON line on stdout.
    fn emit(&self, human: &str, json: &str) {
        if self.json {
            eprint!("{human}");
            println!("{json}");
        } else {
            print!("{human}");
        }
    }
}

fn run_token() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    format!(
        "{:x}",
        (nanos ^ u64::from(std::process::id()).rotate_left(40)) & 0xFFFF_FFFF_FFFF
    )
}

/// Raises our open-file limit and says plainly if it is still too low for the scenario.
fn check_open_files(load: &LoadArgs) -> Result<(), String> {
    let sockets = load.pipes.saturating_mul(load.receivers + 1);
    let needed = sockets as u64 + 64;
    let limit = procstat::raise_nofile_limit()
        .map_err(|e| format!("cannot read or raise RLIMIT_NOFILE: {e}"))?;
    if limit < needed {
        return Err(format!(
            "{} pipes x ({} receivers + 1 sender) need {sockets} sockets, but this process may open only {limit} \
             files even at its hard limit: raise it (e.g. `ulimit -Hn {needed}` as root, or LimitNOFILE in systemd)",
            load.pipes, load.receivers
        ));
    }
    Ok(())
}

/// Warns if the server's own open-file limit is below what the scenario needs of it.
fn warn_server_open_files(pid: u32, scenario: &Scenario) {
    let Ok(limits) = std::fs::read_to_string(format!("/proc/{pid}/limits")) else {
        return;
    };
    let soft = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .and_then(|line| line.split_whitespace().nth(3))
        .and_then(|value| value.parse::<u64>().ok());
    let needed = (scenario.pipes * (scenario.n + 1)) as u64 + 16;
    if let Some(soft) = soft.filter(|&soft| soft < needed) {
        eprintln!("fanpipe-load: warning: server pid {pid} may open only {soft} files; this run needs about {needed}");
    }
}
