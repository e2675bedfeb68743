//! fanpipe-core: the sans-io protocol core of fanpipe.
//!
//! No sockets, no runtime, no clock: bytes and `Instant`s go in through `handle_*`
//! calls, decisions and bytes come out of `poll_*` calls. Backends carry the bytes.
#![forbid(unsafe_code)]

pub mod broadcast;
pub mod budget;
pub mod chunked;
pub mod client;
pub mod config;
pub mod conn;
pub mod error;
pub mod filename;
pub mod head;
pub mod hub;
pub mod metrics;
pub mod multipart;
pub mod page;
pub mod pipe;
pub mod proxy_protocol;
pub mod registry;
pub mod request;
pub mod response;
pub mod signed;

pub use config::Config;
pub use error::Reject;

/// The version every part of fanpipe reports.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
