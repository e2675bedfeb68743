//! What the driver needs of a runtime besides sockets and timers: spawning tasks and
//! sending to a pipe's task.

use crate::io::{Socket, Timer};
use crate::pipe_task::{Msg, PipeTask};
use crate::server::{Connection, ServerState};

/// A backend's runtime, as the driver uses it. Everything else (admission, refusals, the
/// accept backoff, shutdown phases) is the driver's.
pub trait Runtime {
    type Socket: Socket;
    type Timer: Timer;
    /// The hub's handle to a pipe's task (its mailbox, say).
    type Handle;

    /// What the server's tasks share.
    fn server(&self) -> &ServerState<Self::Handle>;

    /// A new timer on the runtime's clock.
    fn timer(&self) -> Self::Timer;

    /// Starts the task of a connection; it runs [`crate::serve_connection`].
    fn spawn_connection(&self, conn: Connection<Self::Socket>);

    /// Starts the task of a new pipe, which runs `task` (see [`PipeTask::run`]) on its
    /// mailbox until it is ready. Called under the hub's lock.
    fn spawn_pipe(&self, task: PipeTask<Self::Socket, Self::Timer>) -> Self::Handle;

    /// Puts `msg` in the mailbox of a pipe's task. Called under the hub's lock, so that
    /// a pipe gets its parties in the order they were admitted.
    fn send(&self, to: &Self::Handle, msg: Msg<Self::Socket>);

    /// Whether pipe `name` is admitted on this thread. A runtime that keeps each
    /// transfer on one core says no for the names of other cores, and gets their
    /// connections in [`Runtime::hand_over`].
    fn owns(&self, _name: &str) -> bool {
        true
    }

    /// Moves a connection whose pipe request (in `conn.request`) another thread owns
    /// there; that thread serves it with [`crate::serve_connection`].
    fn hand_over(&self, conn: Connection<Self::Socket>) {
        drop(conn);
    }

    /// The stop signal came: a connection accepted now is closed unanswered.
    fn stopped(&self) -> bool {
        false
    }
}
