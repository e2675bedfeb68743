//! The state every connection of a server shares: the registry of pipes, the counters
//! of `/metrics` and the clock of a graceful shutdown. A backend keeps one `Hub` behind a
//! lock and calls it to admit a party, to report what a pipe did and to step a shutdown;
//! the hub decides and logs, so the three backends do not repeat it.

use std::time::{Duration, Instant};

use crate::budget::MemoryBudget;
use crate::conn::PipeRequest;
use crate::error::Reject;
use crate::metrics::Metrics;
use crate::pipe::Event;
use crate::registry::{Admitted, PipeId, Registry};
use crate::request::{Page, Route};
use crate::signed::{self, Keys};
use crate::Config;
use std::sync::Arc;

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
    /// The stop signal came (`/healthz` says 503).
    stopping: bool,
    /// With a secret file: the keys every pipe request's signature is checked with.
    keys: Option<Arc<Keys>>,
    /// The pipes' buffers, for `/metrics`.
    memory: MemoryBudget,
    /// Pipes whose task has not reported [`Event::Closed`]. A shutdown waits for them
    /// too: a transfer that ended may still have bytes on their way out (the last
    /// records of a TLS session), which the process's exit would drop.
    open_pipes: usize,
}

impl<H> Hub<H> {
    pub fn new(config: &Config) -> Self {
        let mut registry = Registry::new(config.max_pipes);
        registry.limit_per_client(config.max_waiting_per_client);
        Hub {
            keys: config.keys.clone(),
            registry,
            metrics: Metrics::default(),
            phase: Phase::Running,
            until: None,
            stopping: false,
            memory: config.memory.clone(),
            open_pipes: 0,
        }
    }

    /// Lets the party of `request` onto its pipe, or says why not; `make` starts the
    /// owner of a new pipe. With no wall-clock time, a server with a secret file takes
    /// no signature as unexpired: use [`Hub::admit_at`].
    pub fn admit(
        &mut self,
        request: &PipeRequest,
        make: impl FnOnce(PipeParams) -> H,
    ) -> Result<Admitted<'_, H>, Reject> {
        self.admit_at(request, u64::MAX, make)
    }

    /// [`Hub::admit`] at `unix_now` (seconds since the epoch, the wall clock that signed
    /// URLs expire by): with a secret file the URL's signature is checked first, then
    /// the party is admitted as its client (per-client limits).
    pub fn admit_at(
        &mut self,
        request: &PipeRequest,
        unix_now: u64,
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
        if let Some(keys) = &self.keys {
            signed::verify(keys, &request.credentials, *role, name, *n, unix_now)?;
        }
        let open_pipes = &mut self.open_pipes;
        self.registry
            .admit_from(request.client, name, *role, *n, |id| {
                *open_pipes += 1;
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
        let mut page = self.metrics.render(self.registry.counts(), connections);
        page.push_str(&Metrics::render_memory(&self.memory));
        page
    }

    /// One of the pages that tell the server's state ([`Conn::hub_page`]): its status
    /// and text. `/healthz` says `503` from the stop signal on, while the server still
    /// serves, so a load balancer moves new names elsewhere before anyone is refused.
    pub fn page(&self, page: Page, connections: usize) -> (u16, String) {
        match page {
            Page::Metrics => (200, self.metrics_page(connections)),
            Page::Health if self.stopping => (503, "draining\n".to_owned()),
            _ => (200, "ok\n".to_owned()),
        }
    }

    /// The stop signal came: `/healthz` says so (see [`Hub::page`]); everything else is
    /// served as before until [`Hub::begin_shutdown`].
    pub fn announce_stop(&mut self) {
        if !self.stopping {
            tracing::info!("stopping: /healthz answers 503 from now on");
        }
        self.stopping = true;
    }

    /// What pipe `id` on `name` reported. Returns true once the registry no longer
    /// routes anyone to it, so that its owner may end when its sockets are closed.
    pub fn handle_event(&mut self, name: &str, id: PipeId, event: Event) -> bool {
        match event {
            Event::Left(role) => self.registry.leave(name, id, role),
            Event::Refused(role, why) => {
                tracing::info!(pipe = %name, status = why.status(), "refused: {why}");
                self.metrics.reject(&why);
                self.registry.leave(name, id, role)
            }
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
            Event::Closed => {
                self.open_pipes = self.open_pipes.saturating_sub(1);
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
        self.stopping = true;
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
        let pipes_left = c.waiting_pipes + c.running_pipes > 0 || self.open_pipes > 0;
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
    fn a_new_pipe_is_started_with_the_parameters_of_its_request() {
        let mut hub: Hub<PipeParams> = Hub::new(&Config::default());
        let get = "GET /a%20b?n=3 HTTP/1.1\r\nHost: h\r\n\r\n";
        let admitted = hub.admit(&request(get), |p| p).unwrap();
        let expected = PipeParams {
            name: "a b".into(),
            n: 3,
            id: admitted.id,
        };
        assert_eq!(admitted.handle, &expected);
        let again = hub.admit(&request(get), |_| unreachable!()).unwrap();
        assert!(!again.new, "a second party joins the same pipe");
    }

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
        // Out of the registry, but its task still has sockets to close (the last bytes
        // of a transfer, say): the process must not exit yet.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(hub.poll_shutdown(t1).phase, Phase::Draining);
        assert!(hub.handle_event("x", id, Event::Closed));
        assert_eq!(hub.poll_shutdown(t1).phase, Phase::Done);
    }

    /// A task whose sockets do not close within the grace does not hold the exit longer.
    #[test]
    fn a_pipe_task_still_closing_holds_the_shutdown_only_for_the_grace() {
        let t0 = Instant::now();
        let mut hub: Hub<()> = Hub::new(&Config::default());
        let id = hub.admit(&request(GET), |_| ()).unwrap().id;
        assert!(hub.handle_event("x", id, Event::Left(Role::Receiver)));
        hub.begin_shutdown(Duration::from_secs(30), t0);
        assert_eq!(hub.poll_shutdown(t0).phase, Phase::Draining);
        let after_grace = t0 + Duration::from_secs(30);
        assert_eq!(hub.poll_shutdown(after_grace).phase, Phase::Aborting);
        let after_abort = after_grace + ABORT_DRAIN;
        assert_eq!(hub.poll_shutdown(after_abort).phase, Phase::Done);
    }

    /// A newcomer the pipe held and then refused is counted and logged like one the
    /// registry refused, and its count in the registry is released.
    #[test]
    fn a_refusal_by_the_pipe_is_counted_and_frees_what_the_registry_counted() {
        let mut hub: Hub<()> = Hub::new(&Config::default());
        let id = hub.admit(&request(GET), |_| ()).unwrap().id;
        assert_eq!(hub.admit(&request(GET), |_| ()).unwrap().id, id, "held");
        assert_eq!(
            hub.admit(&request(GET), |_| ()).unwrap_err(),
            Reject::ReceiversFull { n: 1 }
        );
        let why = Reject::ReceiversFull { n: 1 };
        assert!(!hub.handle_event("x", id, Event::Refused(Role::Receiver, why)));
        let page = hub.metrics_page(0);
        assert!(
            page.contains("fanpipe_rejections_total{status=\"409\"} 1"),
            "{page}"
        );
        assert_eq!(hub.admit(&request(GET), |_| ()).unwrap().id, id);
        assert!(!hub.handle_event("x", id, Event::Left(Role::Receiver)));
        assert!(hub.handle_event("x", id, Event::Left(Role::Receiver)));
    }

    #[test]
    fn health_says_503_from_the_stop_signal_on_and_metrics_stay_200() {
        let mut hub: Hub<()> = Hub::new(&Config::default());
        assert_eq!(hub.page(Page::Health, 0), (200, "ok\n".to_owned()));
        hub.announce_stop();
        assert_eq!(hub.page(Page::Health, 0), (503, "draining\n".to_owned()));
        assert_eq!(hub.page(Page::Metrics, 0).0, 200);
        // Still admitting until the shutdown begins.
        assert!(hub.admit(&request(GET), |_| ()).is_ok());
    }
}
