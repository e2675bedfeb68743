//! The invariants of docs/PROTOCOL.md that the world can see from its clients' side
//! (and from what each pipe's task reported).

use fanpipe_core::conn::{Action, Conn};
use fanpipe_core::pipe::{Event, Outcome};
use fanpipe_core::request::{Role, Route};

use super::{Client, Kind, Slot, Stage, World, NAMES};

impl World {
    /// Every invariant the world can see; the broken ones as text.
    pub fn check(&mut self) -> Result<(), String> {
        self.check_final();
        let violations = self.violations();
        if violations.is_empty() {
            Ok(())
        } else {
            Err(violations.join("\n"))
        }
    }

    /// Sender bytes taken into a pipe, minus what its slowest live receiver has got,
    /// stay within the buffer (plus the bytes read along with the head, or one framing
    /// read).
    pub(super) fn check_buffer(&mut self) {
        let cap = self
            .config
            .buffer_size
            .max(fanpipe_core::config::MIN_BUFFER_SIZE);
        let mut net = self.net_mut();
        let mut found = Vec::new();
        for (s, pipe) in net.pipes.iter().enumerate() {
            let slot = &pipe.seen;
            let Some((sc, receivers)) = &slot.started else {
                continue;
            };
            if slot.summary.is_some() {
                continue;
            }
            let sender = &net.clients[*sc];
            let taken = sender.data_in_prefix(sender.sent);
            let slowest = receivers
                .iter()
                .map(|&r| &net.clients[r])
                .filter(|r| r.stage == Stage::Party(s) && r.resp.status == Some(200))
                .map(|r| r.resp.body.len())
                .min();
            let Some(slowest) = slowest else { continue };
            let slack = sender.leftover.max(64);
            if taken > slowest + cap + slack {
                found.push(format!(
                    "pipe {s}: {taken} body bytes taken, slowest receiver has {slowest}: {} buffered > {cap} + {slack}",
                    taken - slowest
                ));
            }
        }
        for f in found {
            net.violation(f);
        }
    }

    fn check_final(&mut self) {
        let mut v = Vec::new();
        let net = self.net();
        let slots: Vec<&Slot> = net.pipes.iter().map(|p| &p.seen).collect();
        // Every party is closed when every client is done.
        for (c, cl) in net.clients.iter().enumerate() {
            if !cl.closed_by_server {
                v.push(format!(
                    "client {c} ({:?}) never closed by the server, stage {:?}",
                    cl.kind_name(),
                    cl.stage
                ));
            }
            if let Some(e) = &cl.resp.error {
                v.push(format!("client {c}: response stream broken: {e}"));
            }
            if !cl.resp.interim.iter().all(|&s| s == 100 || s == 102) {
                v.push(format!(
                    "client {c}: interim statuses {:?}",
                    cl.resp.interim
                ));
            }
            // A request we refuse never gets 100 Continue.
            if cl.resp.interim.contains(&100) && cl.resp.status.is_some_and(|s| s >= 400) {
                v.push(format!(
                    "client {c}: 100 Continue before a {:?} refusal",
                    cl.resp.status
                ));
            }
            if cl.resp.interim.contains(&100) && !cl.is_sender() && !matches!(cl.kind, Kind::Raw) {
                v.push(format!("client {c}: a receiver got 100 Continue"));
            }
        }
        for (s, slot) in slots.iter().enumerate() {
            // The sender's bytes are not read before the transfer starts, but for the first
            // few after a `100 Continue` (at most 64), which release its response head.
            if let Some((sc, _)) = slot.started {
                let at_join = net.clients[sc].sent_at_join;
                if slot.sender_sent_at_start > at_join + 64 {
                    v.push(format!(
                        "pipe {s}: sender {sc} was read from {at_join} to {} bytes before the start",
                        slot.sender_sent_at_start
                    ));
                }
            }
            let Some((sc, receivers)) = &slot.started else {
                continue;
            };
            let sender = &net.clients[*sc];
            let Some(body) = sender.body() else { continue };
            // Bytes read after the end are discarded, not body.
            let whole = sender.sent_whole_body() && slot.sender_sent_at_end == sender.input.len();
            let mut full = 0;
            for &r in receivers {
                let rc = &net.clients[r];
                let resp = &rc.resp;
                if resp.status == Some(200)
                    && (resp.body.len() > body.len() || !body.starts_with(&resp.body))
                {
                    v.push(format!(
                        "pipe {s}: receiver {r} got bytes that are not a prefix of the body ({} of {})",
                        resp.body.len(),
                        body.len()
                    ));
                }
                if resp.status == Some(200) && resp.complete {
                    if resp.body != body {
                        v.push(format!(
                            "pipe {s}: receiver {r} saw a clean end on {} of {} bytes",
                            resp.body.len(),
                            body.len()
                        ));
                    }
                    if !whole {
                        v.push(format!("pipe {s}: receiver {r} saw a clean end though the sender {sc} never sent its whole body ({:?})", sender.plan));
                    }
                    if !rc.closed_by_server {
                        v.push(format!(
                            "pipe {s}: receiver {r} ended cleanly but was not closed"
                        ));
                    }
                    if resp.body == body && rc.closed_by_server {
                        full += 1;
                    }
                }
                // A receiver that stayed gets the whole body of a sender that sent it
                // (and stayed: a sender gone before the end cuts every receiver).
                let sender_stayed = slot.summary.as_ref().is_some_and(|s| {
                    !matches!(
                        s.outcome,
                        Outcome::SenderGone | Outcome::Stalled | Outcome::Shutdown
                    )
                });
                // (A receiver dropped at the idle timeout for not reading is gone.)
                let idle_dropped = rc.dropped_idle;
                if whole
                    && sender_stayed
                    && !idle_dropped
                    && rc.dropped_alive
                    && resp.status == Some(200)
                    && !(resp.complete && resp.body == body)
                {
                    v.push(format!(
                        "pipe {s}: receiver {r} stayed but got {} of {} bytes (complete {})",
                        resp.body.len(),
                        body.len(),
                        resp.complete
                    ));
                }
                if let Some(st) = resp.status {
                    // 408/503: it gave up waiting just before the start. 409: a newcomer
                    // held for a place, refused, whose socket was not closed yet.
                    if ![200, 505, 408, 503, 409].contains(&st) {
                        v.push(format!(
                            "pipe {s}: receiver {r} of the transfer got status {st}"
                        ));
                    }
                }
            }
            // The sender ends cleanly only if all n receivers got every byte.
            let sresp = &sender.resp;
            if sresp.complete && sresp.chunked {
                if full != slot.n {
                    v.push(format!("pipe {s}: sender {sc}'s response ended cleanly, but only {full} of {} receivers got every byte", slot.n));
                }
                let last = sresp.lines().last().cloned().unwrap_or_default();
                if !last.starts_with("[INFO] done: ") {
                    v.push(format!(
                        "pipe {s}: sender {sc} ended cleanly with last line {last:?}"
                    ));
                }
            } else if sresp.status == Some(200)
                && sresp.chunked
                && !sender_cut_itself(sender)
                && !sender.cut_by_exit
                && !too_slow(sender, slot, self.config.write_timeout)
            {
                let last = sresp.lines().last().cloned().unwrap_or_default();
                if !last.starts_with("[ERROR]") {
                    v.push(format!(
                        "pipe {s}: sender {sc}'s response was cut with last line {last:?}"
                    ));
                }
            }
            if let Some(sum) = &slot.summary {
                if (sum.outcome == Outcome::Complete)
                    != (full == slot.n && whole && sum.complete == slot.n)
                {
                    v.push(format!(
                        "pipe {s}: outcome {:?}, {} of {} receivers got every byte",
                        sum.outcome, full, slot.n
                    ));
                }
            }
        }
        // A sender whose pipe never started never ends cleanly, and is told why.
        for (c, cl) in net.clients.iter().enumerate() {
            let Stage::Dropped = cl.stage else { continue };
            let started = slots
                .iter()
                .any(|s| s.started.as_ref().is_some_and(|(sc, _)| *sc == c));
            if !cl.is_sender() || started || cl.resp.status != Some(200) || !cl.resp.chunked {
                continue;
            }
            if cl.resp.complete {
                v.push(format!(
                    "client {c}: a sender that never started ended cleanly"
                ));
            }
            let last = cl.resp.lines().last().cloned().unwrap_or_default();
            if !sender_cut_itself(cl) && !cl.cut_by_exit && !last.starts_with("[ERROR]") {
                v.push(format!(
                    "client {c}: a sender that never started was cut with last line {last:?}"
                ));
            }
        }
        // The names are free after every transfer.
        let page = self.rt.server.hub().metrics_page(0);
        let gauge = |state: &str| {
            let key = format!("fanpipe_pipes{{state=\"{state}\"}} ");
            page.lines()
                .find_map(|l| l.strip_prefix(key.as_str()))
                .and_then(|v| v.parse::<usize>().ok())
        };
        let (waiting, running) = (gauge("waiting"), gauge("running"));
        // (Unless the server exited: a pipe cut then is gone with the process.)
        let all_closed = net.clients.iter().all(|c| c.closed_by_server);
        if all_closed && !self.exited && (waiting, running) != (Some(0), Some(0)) {
            v.push(format!(
                "the registry still holds {waiting:?} waiting and {running:?} running pipes"
            ));
        }
        if !self.shutting_down {
            // Each name whose clients are all closed is free: a newcomer makes a new pipe.
            for name in NAMES.iter().filter(|&&name| {
                net.clients
                    .iter()
                    .all(|c| c.closed_by_server || (c.name != name && !matches!(c.kind, Kind::Raw)))
            }) {
                let raw = format!("GET /{name}?n=7 HTTP/1.1\r\nHost: x\r\n\r\n");
                let mut conn = Conn::with_bytes(&self.config, raw.as_bytes(), net.now);
                let request = match conn.poll_action() {
                    Action::Pipe => conn.take_pipe_request(),
                    _ => None,
                };
                let Some(request) = request else {
                    v.push(format!("a request for {name:?} is not a pipe request"));
                    continue;
                };
                let Route::Pipe { name, .. } = request.request.route.clone() else {
                    continue;
                };
                let mut hub = self.rt.server.hub();
                match hub.admit(&request, |_| usize::MAX).map(|a| (a.id, a.new)) {
                    Ok((id, true)) => {
                        hub.handle_event(&name, id, Event::Left(Role::Receiver));
                    }
                    Ok(_) => v.push(format!("name {name:?} still has a pipe")),
                    Err(e) => v.push(format!("name {name:?} is not free: {e}")),
                }
            }
        }
        drop(net);
        let mut net = self.net_mut();
        for x in v {
            net.violation(x);
        }
    }
}

/// A sender that reset before its response ended, or half-closed before the end of its
/// body, cannot be told anything more.
fn sender_cut_itself(c: &Client) -> bool {
    (c.dead && !c.resp.finished()) || (c.eof && c.sent < c.input.len())
}

/// A sender still not reading its last lines the write timeout after the end (the time
/// the server gives a response to be written) is dropped with them.
fn too_slow(c: &Client, slot: &Slot, write_timeout: std::time::Duration) -> bool {
    match (c.dropped_at, slot.finished_at) {
        (Some(dropped), Some(end)) => c.dropped_unread && dropped >= end + write_timeout,
        _ => false,
    }
}
