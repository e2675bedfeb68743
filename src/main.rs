//! The fanpipe server: command line, logging, signals. The backend is chosen at build time.

mod sign;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use fanpipe_core::budget::{MemoryBudget, DEFAULT_MEMORY_LIMIT};
use fanpipe_core::client::Cidr;
use fanpipe_core::config::{
    DEFAULT_MAX_CONNECTIONS_PER_CLIENT, DEFAULT_MAX_WAITING_PER_CLIENT, MIN_BUFFER_SIZE,
};
use fanpipe_core::request::Report;
use fanpipe_core::Config;
use fanpipe_driver::tls::TlsConfig;
use fanpipe_driver::Listen;

/// Picks the backend of `$feature` when it is the only backend feature on.
macro_rules! backend {
    ($feature:literal, $krate:ident, $other1:literal, $other2:literal) => {
        #[cfg(all(feature = $feature, not(feature = $other1), not(feature = $other2)))]
        use $krate as backend;
        #[cfg(all(feature = $feature, not(feature = $other1), not(feature = $other2)))]
        const LONG_VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (backend: ", $feature, ")");
    };
}
backend!("tokio", fanpipe_tokio, "smol", "glommio");
backend!("smol", fanpipe_smol, "tokio", "glommio");
backend!("glommio", fanpipe_glommio, "tokio", "smol");

#[cfg(not(any(
    all(feature = "tokio", not(feature = "smol"), not(feature = "glommio")),
    all(feature = "smol", not(feature = "tokio"), not(feature = "glommio")),
    all(feature = "glommio", not(feature = "tokio"), not(feature = "smol")),
)))]
compile_error!(
    "build fanpipe with exactly one backend feature: `tokio` (the default), or \
     `--no-default-features --features smol`, or `--no-default-features --features glommio`"
);

/// HTTP fan-out pipe: one sender streams bytes to n receivers, with plain curl.
///
/// Send:    tar c . | curl -T - 'http://HOST:8080/NAME?n=3'
/// Receive: curl 'http://HOST:8080/NAME?n=3' | tar x
///
/// HTTPS: --tls-cert cert.pem --tls-key key.pem, and https:// URLs; SIGHUP reloads the
/// two files without a restart (a bad file is logged and the old certificate kept).
///
/// Every flag may also be given by the environment variable shown with it (a flag on the
/// command line wins). RUST_LOG filters the log (default: info).
#[derive(Parser, Debug)]
#[command(name = "fanpipe", version = LONG_VERSION, verbatim_doc_comment)]
#[command(args_conflicts_with_subcommands = true)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Address to listen on (port 0 picks a free port); HTTPS with --tls-cert and --tls-key.
    #[arg(long, env = "FANPIPE_LISTEN", default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// PEM certificate chain (leaf first): with --tls-key, --listen serves HTTPS.
    #[arg(
        long,
        env = "FANPIPE_TLS_CERT",
        requires = "tls_key",
        value_name = "FILE"
    )]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert (PKCS#8, PKCS#1 or SEC1, unencrypted).
    #[arg(
        long,
        env = "FANPIPE_TLS_KEY",
        requires = "tls_cert",
        value_name = "FILE"
    )]
    tls_key: Option<PathBuf>,
    /// Also serve plain HTTP on this address, beside HTTPS on --listen (needs --tls-cert).
    #[arg(
        long,
        env = "FANPIPE_LISTEN_PLAIN",
        requires = "tls_cert",
        value_name = "ADDR"
    )]
    listen_plain: Option<SocketAddr>,
    /// Largest n (receivers per pipe) a client may ask for.
    #[arg(long, env = "FANPIPE_MAX_RECEIVERS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    max_receivers: u64,
    /// Bytes buffered per running pipe between the sender and its slowest receiver.
    #[arg(long, env = "FANPIPE_BUFFER_SIZE", default_value_t = 1 << 20, value_parser = clap::value_parser!(u64).range(MIN_BUFFER_SIZE as u64..=1 << 32))]
    buffer_size: u64,
    /// Bytes all pipes' buffers may hold together. A pipe's buffer starts at 64 KiB (less
    /// when this is spent, never under 16 KiB) and grows toward --buffer-size only while
    /// three quarters of this are not in use; it goes back when its transfer ends.
    #[arg(long, env = "FANPIPE_MEMORY_LIMIT", default_value_t = DEFAULT_MEMORY_LIMIT as u64, value_parser = clap::value_parser!(u64).range(MIN_BUFFER_SIZE as u64..=1 << 48))]
    memory_limit: u64,
    /// Largest request head in bytes (431 past it); the request line alone may have 8 KiB (414).
    #[arg(long, env = "FANPIPE_MAX_HEAD_SIZE", default_value_t = 32 * 1024, value_parser = clap::value_parser!(u64).range(1024..=1 << 20))]
    max_head_size: u64,
    /// Most header fields in one request (431 past it).
    #[arg(long, env = "FANPIPE_MAX_HEADERS", default_value_t = 100, value_parser = clap::value_parser!(u64).range(8..=10_000))]
    max_headers: u64,
    /// Seconds a client has to send a whole request head once it started (408 after).
    #[arg(long, env = "FANPIPE_HEAD_TIMEOUT", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    head_timeout: u64,
    /// Seconds an idle keep-alive connection is kept open.
    #[arg(long, env = "FANPIPE_KEEPALIVE_TIMEOUT", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    keepalive_timeout: u64,
    /// Seconds a party may wait for its pipe to fill (sender and all n receivers).
    #[arg(long, env = "FANPIPE_WAIT_TIMEOUT", default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..=7 * 86400))]
    wait_timeout: u64,
    /// Seconds a running transfer may move no byte: receivers that read nothing are dropped,
    /// or, if the sender sent nothing, the transfer is cut.
    #[arg(long, env = "FANPIPE_IDLE_TIMEOUT", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=86400))]
    idle_timeout: u64,
    /// Most open connections; more are answered 503.
    #[arg(long, env = "FANPIPE_MAX_CONNECTIONS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    max_connections: u64,
    /// Most pipes, waiting or running; a party opening one more gets 503.
    #[arg(long, env = "FANPIPE_MAX_PIPES", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    max_pipes: u64,
    /// Threads serving connections (default: one per core). On glommio, one executor
    /// pinned to each.
    #[arg(long, env = "FANPIPE_THREADS", value_parser = clap::value_parser!(u64).range(1..=1024))]
    threads: Option<u64>,
    /// Seconds between the lines a waiting sender is sent: they find a sender that has
    /// gone, and keep a proxy in front from cutting a silent response (keep it below the
    /// proxy's idle timeout); watchers (`?progress`) get a keep-alive comment as often.
    #[arg(long, env = "FANPIPE_HEARTBEAT", default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=3600))]
    heartbeat: u64,
    /// When a sender's response head is written, unless the sender says (`?report=`):
    /// `live`, at once, then one line per event; `end`, when the transfer is over, with
    /// 200 only if every receiver got every byte (for proxies such as nginx that stop
    /// forwarding a request body once the response has begun).
    #[arg(long, env = "FANPIPE_SENDER_REPORT", value_enum, default_value_t = SenderReport::Live)]
    sender_report: SenderReport,
    /// Seconds after SIGTERM or SIGINT during which `/healthz` answers 503 while everything
    /// else is still served and new connections accepted, so a load balancer's health check
    /// moves new names away before anyone is refused; then the listener closes.
    #[arg(long, env = "FANPIPE_DRAIN_DELAY", default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=3600))]
    drain_delay: u64,
    /// Seconds running transfers get to finish after SIGTERM or SIGINT before they are cut.
    #[arg(long, env = "FANPIPE_SHUTDOWN_GRACE", default_value_t = 30, value_parser = clap::value_parser!(u64).range(0..=86400))]
    shutdown_grace: u64,
    /// Log lines as plain text, or as one JSON object per line for log pipelines.
    #[arg(long, env = "FANPIPE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Serve signed URLs only (made by `fanpipe sign`). FILE has one key per line,
    /// `ID SECRET` (SECRET: at least 32 bytes in hex, `openssl rand -hex 32`); the first
    /// line's key signs, every line's key verifies, so keys rotate.
    #[arg(long, env = "FANPIPE_SECRET_FILE", value_name = "FILE")]
    secret_file: Option<PathBuf>,
    /// Most connections one client address (an IPv6 client by its /64) may hold open;
    /// more get 429. 0: no limit.
    #[arg(long, env = "FANPIPE_MAX_CONNECTIONS_PER_CLIENT", default_value_t = DEFAULT_MAX_CONNECTIONS_PER_CLIENT as u64, value_parser = clap::value_parser!(u64).range(0..=10_000_000))]
    max_connections_per_client: u64,
    /// Most pipes one client address may have opened that still wait to fill; one more
    /// gets 429. 0: no limit.
    #[arg(long, env = "FANPIPE_MAX_WAITING_PER_CLIENT", default_value_t = DEFAULT_MAX_WAITING_PER_CLIENT as u64, value_parser = clap::value_parser!(u64).range(0..=10_000_000))]
    max_waiting_per_client: u64,
    /// Every connection starts with a PROXY protocol header (v1 or v2, as HAProxy's
    /// send-proxy and nginx's proxy_protocol send it), which names the client; a
    /// connection without one is refused.
    #[arg(long, env = "FANPIPE_PROXY_PROTOCOL")]
    proxy_protocol: bool,
    /// A proxy (address or CIDR block; repeat the flag, or comma-separate) whose
    /// X-Forwarded-For names the client. From any other peer the header is ignored.
    #[arg(
        long,
        env = "FANPIPE_TRUSTED_PROXY",
        value_name = "CIDR",
        value_delimiter = ','
    )]
    trusted_proxy: Vec<Cidr>,
    /// Bytes per second a receiver must take, over --min-rate-window, while bytes wait
    /// for it; a slower one is dropped (counted lost) so the others go on. 0: off.
    #[arg(
        long,
        env = "FANPIPE_MIN_RECEIVER_RATE",
        value_name = "BYTES_PER_SEC",
        default_value_t = 0
    )]
    min_receiver_rate: u64,
    /// Seconds over which --min-receiver-rate is measured.
    #[arg(long, env = "FANPIPE_MIN_RATE_WINDOW", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=86400))]
    min_rate_window: u64,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Print a signed pipe's two URLs: the sender's on line 1, the receivers' on line 2.
    ///
    ///   { read -r send; read -r recv; } < <(fanpipe sign --secret-file F --url https://pipe.example --n 30)
    #[command(verbatim_doc_comment)]
    Sign {
        /// The server's secret file; its first key signs.
        #[arg(long, env = "FANPIPE_SECRET_FILE", value_name = "FILE")]
        secret_file: PathBuf,
        /// The server's base URL as clients reach it, such as https://pipe.example.
        #[arg(long, value_name = "BASE_URL")]
        url: String,
        /// The number of receivers.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
        n: u64,
        /// Seconds the URLs stay valid.
        #[arg(long, value_name = "SECONDS", default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..=366 * 86400))]
        ttl: u64,
        /// The pipe's name; default: 128 random bits in hex, which nobody can guess.
        name: Option<String>,
    },
}

/// When a sender's response head is written (see `--sender-report`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum SenderReport {
    Live,
    End,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum LogFormat {
    Text,
    Json,
}

/// Each running pipe holds a ring of up to `--buffer-size` bytes, and `--memory-limit`
/// bounds all rings together. glibc would serve a large ring with its own mapping, every
/// page of it faulted in and zeroed, then unmapped when the ring is freed (a shootdown
/// across threads): with a thousand 1 MiB transfers at once that was 15-20 % of the
/// server's CPU, and smol ran at 0.62 of the floor (BENCHMARKS.md, "Memory"). Rings
/// come from the heap instead, where a freed ring is reused by the next: the mapping
/// threshold is put above the largest ring, and the heap keeps that much free memory
/// before it trims, so TLS's record buffers (16 KiB each, freed once sent) are not
/// faulted in again either. What stays resident is bounded by the budget, not by the
/// number of pipes.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_rings_on_the_heap(buffer_size: usize) {
    // glibc's ceiling for the mapping threshold on 64-bit (HEAP_MAX_SIZE / 2).
    const MAX_THRESHOLD: usize = 32 << 20;
    let threshold = buffer_size
        .saturating_mul(2)
        .clamp(4 << 20, MAX_THRESHOLD)
        .try_into()
        .unwrap_or(i32::MAX);
    // SAFETY: mallopt takes two integers and only changes the allocator's policy for later
    // allocations; it is called right after the arguments are parsed, before any other
    // thread exists or any allocation it could affect is made.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, threshold);
        libc::mallopt(libc::M_TRIM_THRESHOLD, threshold);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_rings_on_the_heap(_buffer_size: usize) {}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`): text for people, or one JSON
/// object per line (timestamp, level, target, fields) for log pipelines.
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => builder.json().with_current_span(false).init(),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    keep_rings_on_the_heap(args.buffer_size as usize);
    if let Some(Command::Sign {
        secret_file,
        url,
        n,
        ttl,
        name,
    }) = args.command
    {
        return match sign::run(&secret_file, &url, n as usize, ttl, name) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("fanpipe sign: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let keys = match args.secret_file.as_deref().map(sign::load_keys).transpose() {
        Ok(keys) => keys.map(Arc::new),
        Err(e) => {
            eprintln!("fanpipe: {e}");
            return ExitCode::FAILURE;
        }
    };
    init_logging(args.log_format);
    let config = Config {
        max_receivers: args.max_receivers as usize,
        buffer_size: args.buffer_size as usize,
        memory: MemoryBudget::new(args.memory_limit as usize),
        max_head_size: args.max_head_size as usize,
        max_request_line: (args.max_head_size as usize).min(8 * 1024),
        max_headers: args.max_headers as usize,
        head_timeout: Duration::from_secs(args.head_timeout),
        keepalive_timeout: Duration::from_secs(args.keepalive_timeout),
        wait_timeout: Duration::from_secs(args.wait_timeout),
        idle_timeout: Duration::from_secs(args.idle_timeout),
        max_connections: args.max_connections as usize,
        max_pipes: args.max_pipes as usize,
        heartbeat_interval: Duration::from_secs(args.heartbeat),
        drain_delay: Duration::from_secs(args.drain_delay),
        sender_report: match args.sender_report {
            SenderReport::Live => Report::Live,
            SenderReport::End => Report::End,
        },
        keys,
        proxy_protocol: args.proxy_protocol,
        trusted_proxies: args.trusted_proxy,
        max_connections_per_client: args.max_connections_per_client as usize,
        max_waiting_per_client: args.max_waiting_per_client as usize,
        min_receiver_rate: args.min_receiver_rate,
        min_rate_window: Duration::from_secs(args.min_rate_window),
        ..Config::default()
    };
    let grace = Duration::from_secs(args.shutdown_grace);
    let threads = args.threads.map_or_else(
        || std::thread::available_parallelism().map_or(1, |n| n.get()),
        |t| t as usize,
    );
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => match TlsConfig::load(cert, key) {
            Ok(tls) => Some(tls),
            Err(e) => {
                eprintln!("fanpipe: {e}");
                return ExitCode::FAILURE;
            }
        },
        _ => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let listen = Listen {
        addr: args.listen,
        plain: args.listen_plain,
        tls,
    };
    let result = backend::run(listen, config, threads, grace, |addr, plain| match plain {
        Some(plain) => {
            eprintln!("fanpipe {LONG_VERSION} listening on {scheme}://{addr} and http://{plain}")
        }
        None => eprintln!("fanpipe {LONG_VERSION} listening on {scheme}://{addr}"),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fanpipe: {e}");
            ExitCode::FAILURE
        }
    }
}
