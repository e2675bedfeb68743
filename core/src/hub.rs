//! The state every connection of a server shares: the registry of pipes, the counters
//! of `/metrics` and the clock of a graceful shutdown. A backend keeps one `Hub` behind a
//! lock and calls it to admit a party, to report what a pipe did and to step a shutdown;
//! the hub decides and logs, so the three backends do not repeat it.

use std::time::{Duration, Instant};

use crate::conn::PipeRequest;
use crate::error::Reject;
use crate::metrics::Metrics;
use crate::pipe::Event;
use crate::registry::{Admitted, PipeId, Registry};
use crate::request::Route;
use crate::Config;

/// How often a shutdown looks again whether the pipes are all gone.
const SHUTDOWN_TICK: Duration = Duration::from_millis(50);
/// After the grace, how long cut transfers get to send their last words.
const ABORT_DRAIN: Duration = Duration::from_secs(2);
/// Before the process exits, time for the last bytes to leave the sockets.
const LAST_WORDS: Duration = Duration::from_millis(100);

/// Where a graceful shutdown stands. Each phase is told to every pipe once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Serving.
    Running,
    /// No new party; waiting parties let go; running transfers may finish.
    Draining,
    /// The grace is over: transfers are cut.
    Aborting,
    /// Nothing is left to wait for: the backend may return.
    Done,
}

/// What a backend does next during a shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownStep {
    /// Tell every pipe this phase if it has not been told yet.
    pub phase: Phase,
    /// Step again at this instant (unless `phase` is `Done`).
    pub next: Instant,
}

/// What the task of a new pipe is started with, taken from the request that opened it:
/// one value, so that a new parameter of a pipe is added here and where the pipe is
/// made, not in every backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipeParams {
    pub name: String,
    /// Receivers the transfer waits for.
    pub n: usize,
    /// The registry's id of this pipe.
    pub id: PipeId,
}

/// Shared server state; `H` is the backend's handle to the task that owns a pipe.
#[derive(Debug)]
pub struct Hub<H> {
    registry: Registry<H>,
    metrics: Metrics,
    phase: Phase,
    /// When the current phase's wait ends.
    until: Option<Instant>,
}

impl<H> Hub<H> {
    pub fn new(config: &Config) -> Self {
        Hub {
            registry: Registry::new(config.max_pipes),
            metrics: Metrics::default(),
            phase: Phase::Running,
            until: None,
        }
    }

    /// Lets the party of `request` onto its pipe, or says why not; `make` starts the
    /// owner of a new pipe.
    pub fn admit(
        &mut self,
        request: &PipeRequest,
        make: impl FnOnce(PipeParams) -> H,
    ) -> Result<Admitted<'_, H>, Reject> {
        if let Route::Watch { name, .. } = &request.request.route {
            // A watcher takes no place: it goes to the pipe that has the name now.
            let handle = self.registry.handle(name).ok_or(Reject::NoPipe)?;
            return Ok(handle);
        }
        let Route::Pipe { name, role, n } = &request.request.route else {
            return Err(Reject::NotFound);
        };
        self.registry.admit(name, *role, *n, |id| {
            make(PipeParams {
                name: name.clone(),
                n: *n,
                id,
            })
        })
    }

    /// Counts and logs a refused request.
    pub fn refused(&mut self, peer: impl std::fmt::Display, why: &Reject) {
        tracing::info!(%peer, status = why.status(), "refused: {why}");
        self.metrics.reject(why);
    }

    /// The text of `/metrics`, given how many connections are open.
    pub fn metrics_page(&self, connections: usize) -> String {
        self.metrics.render(self.registry.counts(), connections)
    }

    /// What pipe `id` on `name` reported. Returns true once the registry no longer
    /// routes anyone to it, so that its owner may end when its sockets are closed.
    pub fn handle_event(&mut self, name: &str, id: PipeId, event: Event) -> bool {
        match event {
            Event::Left(role) => self.registry.leave(name, id, role),
            Event::Started => {
                self.registry.start(name, id);
                tracing::debug!(pipe = %name, "transfer started");
                false
            }
            Event::Finished(s) => {
                self.registry.finish(name, id);
                self.metrics.record(&s);
                tracing::info!(
                    pipe = %s.name,
                    n = s.n,
                    bytes = s.bytes,
                    complete = s.complete,
                    seconds = format_args!("{:.3}", s.seconds),
                    outcome = s.outcome.label(),
                    "transfer ended"
                );
                true
            }
        }
    }

    /// The owners of every pipe, to tell them a shutdown phase.
    pub fn handles(&self) -> impl Iterator<Item = &H> {
        self.registry.handles()
    }

    /// Starts a graceful shutdown (once): nobody is admitted any more, and running
    /// transfers get `grace` to finish.
    pub fn begin_shutdown(&mut self, grace: Duration, now: Instant) {
        if self.phase == Phase::Running {
            tracing::info!(
                "shutting down: waiting up to {} s for running transfers",
                grace.as_secs()
            );
            self.registry.close();
            self.phase = Phase::Draining;
            self.until = Some(now + grace);
        }
    }

    /// Where the shutdown stands at `now`, and when to look again.
    pub fn poll_shutdown(&mut self, now: Instant) -> ShutdownStep {
        let c = self.registry.counts();
        let pipes_left = c.waiting_pipes + c.running_pipes > 0;
        let until = self.until.unwrap_or(now);
        match self.phase {
            Phase::Running => {}
            Phase::Draining | Phase::Aborting if pipes_left && now < until => {}
            Phase::Draining if pipes_left => {
                self.phase = Phase::Aborting;
                self.until = Some(now + ABORT_DRAIN);
            }
            Phase::Draining | Phase::Aborting => {
                self.phase = Phase::Done;
                self.until = Some(now + LAST_WORDS);
            }
            Phase::Done => {}
        }
        let until = self.until.unwrap_or(now);
        let next = match self.phase {
            Phase::Done => until,
            _ => until.min(now + SHUTDOWN_TICK),
        };
        ShutdownStep {
            phase: self.phase,
            next,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::{Action, Conn};
    use crate::request::Role;

    fn request(raw: &str) -> PipeRequest {
        let mut c = Conn::with_bytes(&Config::default(), raw.as_bytes(), Instant::now());
        assert_eq!(c.poll_action(), Action::Pipe);
        c.take_pipe_request().unwrap()
    }

    const GET: &str = "GET /x?n=1 HTTP/1.1\r\nHost: h\r\n\r\n";

    #[test]
    fn a_shutdown_with_no_pipe_is_done_after_the_last_words() {
        let t0 = Instant::now();
        let mut hub: Hub<()> = Hub::new(&Config::default());
        assert_eq!(hub.poll_shutdown(t0).phase, Phase::Running);
        hub.begin_shutdown(Duration::from_secs(30), t0);
        let step = hub.poll_shutdown(t0);
        assert_eq!(step.phase, Phase::Done);
        assert_eq!(step.next, t0 + LAST_WORDS);
    }

    #[test]
    fn a_running_pipe_gets_the_grace_then_is_aborted() {
        let t0 = Instant::now();
        let grace = Duration::from_secs(5);
        let mut hub: Hub<()> = Hub::new(&Config::default());
        let id = hub.admit(&request(GET), |_| ()).unwrap().id;
        assert!(!hub.handle_event("x", id, Event::Started));
        hub.begin_shutdown(grace, t0);
        assert_eq!(
            hub.admit(&request(GET), |_| ()).unwrap_err(),
            Reject::ShuttingDown
        );
        let step = hub.poll_shutdown(t0);
        assert_eq!(step.phase, Phase::Draining);
        assert_eq!(step.next, t0 + SHUTDOWN_TICK);
        assert_eq!(hub.poll_shutdown(t0 + grace).phase, Phase::Aborting);
        let t1 = t0 + grace + ABORT_DRAIN;
        assert_eq!(hub.poll_shutdown(t1).phase, Phase::Done);
    }

    #[test]
    fn a_shutdown_ends_as_soon_as_the_last_pipe_is_gone() {
        let t0 = Instant::now();
        let mut hub: Hub<()> = Hub::new(&Config::default());
        let id = hub.admit(&request(GET), |_| ()).unwrap().id;
        hub.begin_shutdown(Duration::from_secs(30), t0);
        assert_eq!(hub.poll_shutdown(t0).phase, Phase::Draining);
        assert!(hub.handle_event("x", id, Event::Left(Role::Receiver)));
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(hub.poll_shutdown(t1).phase, Phase::Done);
    }
}
