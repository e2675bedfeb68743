//! The runtime-neutral half of a fanpipe backend, written once for every runtime:
//! accepting ([`accept`]), driving a connection to its pipe request ([`poll_conn`]),
//! admitting it under the hub's lock and handing its socket to the pipe's task, or
//! answering the refusal ([`serve_connection`]), driving a pipe's sockets once its
//! parties are admitted ([`PipeTask`]), and stepping a graceful shutdown to its end
//! ([`shut_down`]).
//!
//! A backend implements three small traits for its own runtime: [`Socket`] (read, write,
//! shut down), [`Timer`] (the clock and a wake-up at an instant) and [`Runtime`] (spawn
//! a task, send to a pipe's task). The driver reads the time only from its `Timer`, so a
//! simulation with a virtual clock drives the same code as production.
#![forbid(unsafe_code)]

mod conn;
mod io;
mod pipe_task;
mod runtime;
mod server;
pub mod tls;

pub use conn::poll_conn;
pub use io::{sleep_until, Socket, Timer};
pub use pipe_task::{Msg, PipeTask};
pub use runtime::Runtime;
pub use server::{
    accept, accepted, announce_stop, serve_connection, shut_down, Connection, Listen, ServerState,
    ACCEPT_BACKOFF,
};
