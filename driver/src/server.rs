//! What a server's tasks share, and the life of a connection from its accept to its
//! admission: written once, so a backend only supplies its runtime.

use std::future::{poll_fn, Future};
use std::io;
use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fanpipe_core::client::ClientConns;

use fanpipe_core::conn::{Conn, PipeRequest};
use fanpipe_core::hub::{Hub, Phase};
use fanpipe_core::metrics::{Connections, OpenConn};
use fanpipe_core::request::Page;
use fanpipe_core::Config;

use crate::conn::poll_conn;
use crate::io::{sleep_until, Socket, Timer};
use crate::pipe_task::{Msg, PipeTask};
use crate::runtime::Runtime;
use crate::tls::TlsConfig;

/// How long to wait after a failed accept (out of descriptors and the like) rather than
/// spin on the error.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// What all of a server's tasks share: its configuration, the hub behind one lock (`H`
/// is the backend's handle to a pipe's task), and the count of open connections.
pub struct ServerState<H> {
    pub config: Config,
    pub connections: Connections,
    /// Open connections per client address.
    pub clients: ClientConns,
    hub: Mutex<Hub<H>>,
    /// The certificate store when the server speaks HTTPS (see [`ServerState::with_tls`]).
    tls: Option<TlsConfig>,
}

impl<H> ServerState<H> {
    pub fn new(config: Config) -> Self {
        ServerState {
            hub: Mutex::new(Hub::new(&config)),
            connections: Connections::default(),
            clients: ClientConns::default(),
            config,
            tls: None,
        }
    }

    /// Serves HTTPS with `tls` (when `Some`): its counters join `/metrics`, and
    /// [`ServerState::reload_tls`] reloads it.
    pub fn with_tls(mut self, tls: Option<TlsConfig>) -> Self {
        self.tls = tls;
        self
    }

    /// The certificate store, when the server speaks HTTPS: what a backend wraps each
    /// accepted stream with ([`crate::tls::MaybeTls::accept`]).
    pub fn tls(&self) -> Option<&TlsConfig> {
        self.tls.as_ref()
    }

    /// On `SIGHUP`: reads the certificate and key again for the handshakes to come. A bad
    /// file is logged and the old certificate kept; running connections are untouched.
    pub fn reload_tls(&self) {
        let Some(tls) = &self.tls else {
            tracing::info!("SIGHUP: no certificate to reload (TLS is off)");
            return;
        };
        match tls.reload() {
            Ok(()) => tracing::info!("SIGHUP: certificate reloaded"),
            Err(e) => tracing::error!("SIGHUP: certificate not reloaded, the old one stays: {e}"),
        }
    }

    /// A page of the server's state, as its status and text (see `Hub::page`): `/metrics`
    /// gets the TLS counters after the hub's series when TLS is on.
    pub fn hub_page(&self, page: Page) -> (u16, String) {
        let (status, mut text) = self.hub().page(page, self.connections.count());
        if let (Page::Metrics, Some(tls)) = (page, &self.tls) {
            tls.stats().render(&mut text);
        }
        (status, text)
    }

    /// The hub, locked; held only to admit, report or step a shutdown.
    pub fn hub(&self) -> MutexGuard<'_, Hub<H>> {
        // A panic elsewhere must not take the registry down with it.
        self.hub.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drives a connection (see [`poll_conn`]) until it is closed (`None`) or holds a
    /// pipe request, logging its refusals and serving `/metrics` from the hub.
    pub async fn next_request<S: Socket, T: Timer>(
        &self,
        conn: &mut Conn,
        sock: &mut S,
        timer: &mut T,
        peer: SocketAddr,
        open: &mut OpenConn,
    ) -> Option<PipeRequest> {
        poll_fn(|cx| {
            poll_conn(
                cx,
                conn,
                sock,
                timer,
                |why| self.hub().refused(peer, why),
                |page| self.hub_page(page),
                |client| self.count_client(open, client),
            )
        })
        .await
    }

    /// Counts the connection `open` under `client` too, or refuses it past the
    /// per-client limit.
    fn count_client(
        &self,
        open: &mut OpenConn,
        client: fanpipe_core::client::ClientAddr,
    ) -> Result<(), fanpipe_core::Reject> {
        let held = self
            .clients
            .open(client, self.config.max_connections_per_client)?;
        open.hold(held);
        Ok(())
    }
}

/// Where a backend listens, and whether it speaks HTTPS there.
#[derive(Debug, Clone)]
pub struct Listen {
    /// The main address: HTTPS when `tls` is set, else plain HTTP.
    pub addr: SocketAddr,
    /// Plain HTTP beside HTTPS (`--listen-plain`); only with `tls`.
    pub plain: Option<SocketAddr>,
    /// The certificate store: each stream accepted on `addr` is wrapped in TLS.
    pub tls: Option<TlsConfig>,
}

impl Listen {
    /// Plain HTTP on `addr` alone.
    pub fn plain(addr: SocketAddr) -> Self {
        Listen {
            addr,
            plain: None,
            tls: None,
        }
    }
}

/// A connection not yet in a pipe, with what travels with it.
pub struct Connection<S> {
    pub sock: S,
    pub peer: SocketAddr,
    pub conn: Conn,
    /// Counts the connection as open until dropped with its socket.
    pub open: OpenConn,
    /// A pipe request read already (on another thread), to admit before reading more.
    pub request: Option<PipeRequest>,
}

/// Accepts connections with `next` until [`Runtime::stopped`] (or forever: the caller
/// races this with its stop signal), and starts each one's task. A failed accept is
/// retried after [`ACCEPT_BACKOFF`].
pub async fn accept<R, F>(rt: &R, mut next: impl FnMut() -> F)
where
    R: Runtime,
    F: Future<Output = io::Result<(R::Socket, SocketAddr)>>,
{
    let mut timer = rt.timer();
    loop {
        match next().await {
            // The stop is polled; a connection accepted after the signal, before this
            // thread saw it, is closed unanswered like the ones still queued.
            Ok(_) if rt.stopped() => return,
            Ok((sock, peer)) => accepted(rt, sock, peer, timer.now()),
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                let at = timer.now() + ACCEPT_BACKOFF;
                sleep_until(&mut timer, at).await;
            }
        }
    }
}

/// Counts a connection just accepted and starts its task; past the connection limit it
/// only gets its `503`.
pub fn accepted<R: Runtime>(rt: &R, sock: R::Socket, peer: SocketAddr, now: Instant) {
    let server = rt.server();
    let (mut open, full) = server.connections.open(server.config.max_connections);
    let mut conn = Conn::accepted(&server.config, peer.ip(), now);
    conn.set_tls(sock.is_tls());
    let over_share = match conn.take_new_client() {
        Some(client) if full.is_none() => server.count_client(&mut open, client).err(),
        _ => None,
    };
    if let Some(why) = full.or(over_share) {
        conn.handle_refused(&why, now);
    }
    rt.spawn_connection(Connection {
        sock,
        peer,
        conn,
        open,
        request: None,
    });
}

/// A connection until it is answered, handed to another thread, or joins a pipe: each
/// pipe request is admitted under the hub's lock and the socket handed to the pipe's
/// task (started if the pipe is new), or the refusal is answered on the connection.
pub async fn serve_connection<R: Runtime>(rt: &R, mut c: Connection<R::Socket>) {
    let server = rt.server();
    let mut timer = rt.timer();
    loop {
        let request = match c.request.take() {
            Some(request) => request,
            None => {
                let polled =
                    server.next_request(&mut c.conn, &mut c.sock, &mut timer, c.peer, &mut c.open);
                let Some(request) = polled.await else {
                    return;
                };
                request
            }
        };
        if let Some(name) = request.request.pipe_name() {
            if !rt.owns(name) {
                c.request = Some(request);
                rt.hand_over(c);
                return;
            }
        }
        let refused = {
            let mut hub = server.hub();
            let make = |params| rt.spawn_pipe(PipeTask::new(params, &server.config, rt.timer()));
            match hub.admit_at(&request, unix_now(), make) {
                Ok(admitted) => {
                    let arrival = Box::new((c.sock, request, c.open));
                    rt.send(admitted.handle, Msg::Arrival(arrival));
                    return;
                }
                Err(why) => why,
            }
        };
        c.conn.handle_refused(&refused, timer.now());
    }
}

/// The stop signal came: `/healthz` answers `503` for the configured drain delay while
/// everything else is still served (the caller keeps accepting meanwhile), so a load
/// balancer's health check moves new names away before anyone is refused. Then the
/// caller closes its listener and [`shut_down`]s.
pub async fn announce_stop<R: Runtime>(rt: &R) {
    let server = rt.server();
    server.hub().announce_stop();
    let mut timer = rt.timer();
    let at = timer.now() + server.config.drain_delay;
    sleep_until(&mut timer, at).await;
}

/// The wall clock in unix seconds, which signed URLs expire by (0 if it is set before
/// 1970: every signature is then unexpired rather than the server refusing all).
fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A graceful shutdown, stepped until done: no one is admitted any more, each phase is
/// sent once to every pipe's task, and running transfers get `grace` to finish.
pub async fn shut_down<R: Runtime>(rt: &R, grace: Duration) {
    let server = rt.server();
    let mut timer = rt.timer();
    server.hub().begin_shutdown(grace, timer.now());
    let mut told = Phase::Running;
    loop {
        let step = server.hub().poll_shutdown(timer.now());
        if step.phase > told {
            told = step.phase;
            let hub = server.hub();
            for handle in hub.handles() {
                rt.send(handle, Msg::Phase(told));
            }
        }
        sleep_until(&mut timer, step.next).await;
        if step.phase == Phase::Done {
            return;
        }
    }
}
