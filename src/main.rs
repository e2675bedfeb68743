//! The fanpipe server: command line, logging, signals. The backend is chosen at build time.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use fanpipe_core::budget::{MemoryBudget, DEFAULT_MEMORY_LIMIT};
use fanpipe_core::config::MIN_BUFFER_SIZE;
use fanpipe_core::request::Report;
use fanpipe_core::Config;

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
/// Every flag may also be given by the environment variable shown with it (a flag on the
/// command line wins). RUST_LOG filters the log (default: info).
#[derive(Parser, Debug)]
#[command(name = "fanpipe", version = LONG_VERSION, verbatim_doc_comment)]
struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, env = "FANPIPE_LISTEN", default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
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
    /// proxy's idle timeout).
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

/// Each running pipe holds a ring of up to `--buffer-size` bytes. glibc serves large blocks
/// with mmap only up to a threshold that it raises each time such a block is freed, after
/// which rings come from the heap, are zeroed page by page, and stay with the process when
/// freed: a burst of a thousand small pipes left hundreds of MiB resident for good. A fixed
/// threshold keeps every ring in its own mapping: untouched pages cost nothing and a
/// finished pipe's memory goes back to the system (BENCHMARKS.md, "Memory").
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn return_freed_buffers_to_the_system() {
    // SAFETY: mallopt takes two integers and only changes the allocator's policy for later
    // allocations; it is called first thing in main, before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 * 1024);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn return_freed_buffers_to_the_system() {}

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
    return_freed_buffers_to_the_system();
    let args = Args::parse();
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
        ..Config::default()
    };
    let grace = Duration::from_secs(args.shutdown_grace);
    let threads = args.threads.map_or_else(
        || std::thread::available_parallelism().map_or(1, |n| n.get()),
        |t| t as usize,
    );
    let result = backend::run(args.listen, config, threads, grace, |addr| {
        eprintln!("fanpipe {LONG_VERSION} listening on http://{addr}");
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fanpipe: {e}");
            ExitCode::FAILURE
        }
    }
}
