//! The parts of `fanpipe-load`, the end-to-end load generator (see `src/bin/fanpipe-load.rs`
//! for its usage): its HTTP/1.1 and floor clients (plain or over TLS), the payload, the
//! floor server (plain or over TLS), the /proc figures and the reports.

pub mod client;
pub mod error;
pub mod floor;
pub mod floor_tee;
pub mod floor_tls;
pub mod http;
pub mod meet;
pub mod payload;
pub mod procstat;
pub mod report;
pub mod run;
pub mod size;
pub mod tls;
pub mod tls_stream;
