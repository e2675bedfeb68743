//! Which names have a pipe, and who may join it. The only state shared between pipes:
//! a backend keeps it behind one lock and holds the lock only to admit or release.
//!
//! `H` is the backend's handle to the task that owns a pipe (a channel, say).

use std::collections::{BTreeMap, HashMap};

use crate::client::ClientAddr;
use crate::error::Reject;
use crate::request::Role;

/// A pipe's identity: the same name is a new pipe after each transfer.
pub type PipeId = u64;

/// Which of `shards` owns the pipe `name`, for a backend that runs one registry user per
/// core and keeps each transfer's data path on one core. Stable across runs (FNV-1a).
pub fn shard_of(name: &str, shards: usize) -> usize {
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    (hash % shards.max(1) as u64) as usize
}

#[derive(Debug)]
struct Entry<H> {
    id: PipeId,
    n: usize,
    /// Parties the pipe was sent, by role, less those it said left: the places taken,
    /// and the newcomers it holds for a place whose party may have gone (at most one per
    /// place).
    senders: usize,
    receivers: usize,
    running: bool,
    handle: H,
    /// Who opened it, charged for it while it waits.
    opener: Option<ClientAddr>,
}

/// Names to pipes, in the order of their names, so that whoever walks them (to tell a
/// shutdown, say) does so in the same order on every run.
#[derive(Debug)]
pub struct Registry<H> {
    pipes: BTreeMap<String, Entry<H>>,
    next_id: PipeId,
    max_pipes: usize,
    closed: bool,
    /// Waiting pipes by the client that opened them.
    waiting_by_client: HashMap<ClientAddr, usize>,
    /// Most of them per client (0: no limit).
    max_waiting_per_client: usize,
}

impl<H> Default for Registry<H> {
    fn default() -> Self {
        Registry::new(usize::MAX)
    }
}

/// What exists now, for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub waiting_pipes: usize,
    pub running_pipes: usize,
    pub waiting_parties: usize,
}

/// A party let in: to the pipe `id`, whose owner is `handle`; `new` if it was just made.
#[derive(Debug)]
pub struct Admitted<'a, H> {
    pub id: PipeId,
    pub handle: &'a H,
    pub new: bool,
}

impl<H> Registry<H> {
    /// A registry that holds at most `max_pipes` pipes.
    pub fn new(max_pipes: usize) -> Self {
        Registry {
            pipes: BTreeMap::new(),
            next_id: 1,
            max_pipes,
            closed: false,
            waiting_by_client: HashMap::new(),
            max_waiting_per_client: 0,
        }
    }

    /// At most `max` waiting pipes opened by one client (0: no limit), so one address
    /// cannot take every pipe of the server.
    pub fn limit_per_client(&mut self, max: usize) {
        self.max_waiting_per_client = max;
    }

    /// Waiting pipes `client` has opened.
    pub fn waiting_of(&self, client: ClientAddr) -> usize {
        self.waiting_by_client.get(&client).copied().unwrap_or(0)
    }

    /// A waiting pipe opened by `opener` starts or goes: it is no longer charged.
    fn uncharge(&mut self, opener: Option<ClientAddr>) {
        let Some(c) = opener else { return };
        if let Some(count) = self.waiting_by_client.get_mut(&c) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.waiting_by_client.remove(&c);
            }
        }
    }

    /// The server is shutting down: nobody is admitted any more.
    pub fn close(&mut self) {
        self.closed = true;
    }

    /// Lets a party onto `name`, or says why not. `make` creates the owner of a new pipe.
    pub fn admit(
        &mut self,
        name: &str,
        role: Role,
        n: usize,
        make: impl FnOnce(PipeId) -> H,
    ) -> Result<Admitted<'_, H>, Reject> {
        self.admit_from(None, name, role, n, make)
    }

    /// [`Registry::admit`] for a party of `client`, who is charged for a pipe it opens
    /// while that pipe waits.
    pub fn admit_from(
        &mut self,
        client: Option<ClientAddr>,
        name: &str,
        role: Role,
        n: usize,
        make: impl FnOnce(PipeId) -> H,
    ) -> Result<Admitted<'_, H>, Reject> {
        let mut new = false;
        if self.closed {
            return Err(Reject::ShuttingDown);
        }
        if !self.pipes.contains_key(name) {
            let max = self.max_waiting_per_client;
            if let Some(c) = client.filter(|&c| max > 0 && self.waiting_of(c) >= max) {
                tracing::debug!(client = %c, "waiting pipes per client at the limit");
                return Err(Reject::ClientPipes { max });
            }
            if self.pipes.len() >= self.max_pipes {
                return Err(Reject::TooManyPipes);
            }
            if let Some(c) = client {
                *self.waiting_by_client.entry(c).or_default() += 1;
            }
            let id = self.next_id;
            self.next_id += 1;
            let entry = Entry {
                id,
                n,
                senders: 0,
                receivers: 0,
                running: false,
                handle: make(id),
                opener: client,
            };
            self.pipes.insert(name.to_owned(), entry);
            new = true;
        }
        let Some(e) = self.pipes.get_mut(name) else {
            return Err(Reject::NotFound);
        };
        if e.running {
            return Err(Reject::Busy);
        }
        if e.n != n {
            return Err(Reject::NMismatch {
                expected: e.n,
                asked: n,
            });
        }
        // A newcomer for a place that is taken goes to the pipe all the same, which holds
        // it while it looks whether the party there has gone (a client killed and run
        // again at once), and seats it or refuses it with this same 409: only the pipe
        // knows its parties' sockets. One newcomer per place at most: more could never
        // be seated.
        let (count, places, full) = match role {
            Role::Sender => (&mut e.senders, 1, Reject::SenderTaken),
            Role::Receiver => (&mut e.receivers, e.n, Reject::ReceiversFull { n: e.n }),
        };
        if *count >= places.saturating_mul(2) {
            return Err(full);
        }
        *count += 1;
        Ok(Admitted {
            id: e.id,
            handle: &e.handle,
            new,
        })
    }

    /// A waiting party left pipe `id`, or a newcomer it held was refused. Returns true if
    /// the pipe is now empty and gone.
    pub fn leave(&mut self, name: &str, id: PipeId, role: Role) -> bool {
        let Some(e) = self.pipes.get_mut(name).filter(|e| e.id == id) else {
            return true;
        };
        match role {
            Role::Sender => e.senders = e.senders.saturating_sub(1),
            Role::Receiver => e.receivers = e.receivers.saturating_sub(1),
        }
        if !e.running && e.senders == 0 && e.receivers == 0 {
            let opener = e.opener;
            self.pipes.remove(name);
            self.uncharge(opener);
            return true;
        }
        false
    }

    /// The transfer of pipe `id` started: newcomers on its name are told it is busy.
    pub fn start(&mut self, name: &str, id: PipeId) {
        if let Some(e) = self.pipes.get_mut(name).filter(|e| e.id == id) {
            if !e.running {
                e.running = true;
                let opener = e.opener;
                self.uncharge(opener);
            }
        }
    }

    /// The transfer of pipe `id` ended: the name is free at once.
    pub fn finish(&mut self, name: &str, id: PipeId) {
        if self.pipes.get(name).is_some_and(|e| e.id == id) {
            if let Some(e) = self.pipes.remove(name) {
                if !e.running {
                    self.uncharge(e.opener);
                }
            }
        }
    }

    /// The pipe that has `name` now, waiting or running, for a watcher (who takes no
    /// place in it).
    pub fn handle(&self, name: &str) -> Option<Admitted<'_, H>> {
        self.pipes.get(name).map(|e| Admitted {
            id: e.id,
            handle: &e.handle,
            new: false,
        })
    }

    /// The owners of every pipe, to tell them all something.
    pub fn handles(&self) -> impl Iterator<Item = &H> {
        self.pipes.values().map(|e| &e.handle)
    }

    /// Pipes and waiting parties that exist now.
    pub fn counts(&self) -> Counts {
        let mut c = Counts::default();
        for e in self.pipes.values() {
            if e.running {
                c.running_pipes += 1;
            } else {
                c.waiting_pipes += 1;
                c.waiting_parties += e.senders + e.receivers;
            }
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_has_one_shard_and_names_spread_over_all() {
        assert_eq!(shard_of("build-12af", 1), 0);
        assert_eq!(shard_of("x", 0), 0);
        let mut seen = [0usize; 4];
        for i in 0..400 {
            let name = format!("pipe-{i}");
            let s = shard_of(&name, 4);
            assert_eq!(s, shard_of(&name, 4));
            seen[s] += 1;
        }
        assert!(seen.iter().all(|&c| c > 50), "{seen:?}");
    }

    fn admit(r: &mut Registry<()>, name: &str, role: Role, n: usize) -> Result<PipeId, Reject> {
        r.admit(name, role, n, |_| ()).map(|a| a.id)
    }

    #[test]
    fn first_party_fixes_n_and_others_are_refused_without_harm() {
        let mut r = Registry::default();
        let id = admit(&mut r, "a", Role::Receiver, 3).unwrap();
        let e = admit(&mut r, "a", Role::Sender, 2).unwrap_err();
        assert_eq!(e.to_string(), "this pipe expects n=3, you asked n=2");
        assert_eq!(admit(&mut r, "a", Role::Sender, 3), Ok(id));
        assert_eq!(admit(&mut r, "a", Role::Receiver, 3), Ok(id));
        assert_eq!(admit(&mut r, "a", Role::Receiver, 3), Ok(id));
    }

    #[test]
    fn a_newcomer_for_a_taken_place_goes_to_the_pipe_one_per_place() {
        let mut r = Registry::default();
        let id = admit(&mut r, "a", Role::Sender, 2).unwrap();
        // The pipe holds it while it looks at the sender there, and decides.
        assert_eq!(admit(&mut r, "a", Role::Sender, 2), Ok(id));
        assert_eq!(
            admit(&mut r, "a", Role::Sender, 2),
            Err(Reject::SenderTaken),
            "one newcomer per place: a second could never be seated"
        );
        for _ in 0..4 {
            assert_eq!(admit(&mut r, "a", Role::Receiver, 2), Ok(id));
        }
        let e = admit(&mut r, "a", Role::Receiver, 2).unwrap_err();
        assert_eq!(e, Reject::ReceiversFull { n: 2 });
        assert_eq!(e.status(), 409);
        // The pipe refused the held sender (its sender is there): a place for one again.
        assert!(!r.leave("a", id, Role::Sender));
        assert_eq!(admit(&mut r, "a", Role::Sender, 2), Ok(id));
        assert_eq!(r.counts().waiting_parties, 6);
        // A running pipe is sent no one.
        r.start("a", id);
        assert_eq!(admit(&mut r, "a", Role::Receiver, 2), Err(Reject::Busy));
    }

    #[test]
    fn a_leaving_party_frees_its_place_and_the_last_frees_the_name() {
        let mut r = Registry::default();
        let id = admit(&mut r, "a", Role::Receiver, 1).unwrap();
        assert!(r.leave("a", id, Role::Receiver));
        assert_eq!(r.counts(), Counts::default());
        let id2 = admit(&mut r, "a", Role::Receiver, 2).unwrap();
        assert_ne!(id, id2, "an emptied name is a new pipe");
        admit(&mut r, "a", Role::Sender, 2).unwrap();
        assert!(!r.leave("a", id2, Role::Receiver));
        assert_eq!(admit(&mut r, "a", Role::Receiver, 2), Ok(id2));
    }

    #[test]
    fn pipe_limit_and_shutdown_refuse_with_503() {
        let mut r = Registry::new(1);
        let id = admit(&mut r, "a", Role::Receiver, 2).unwrap();
        assert_eq!(
            admit(&mut r, "b", Role::Receiver, 1),
            Err(Reject::TooManyPipes)
        );
        assert_eq!(
            admit(&mut r, "a", Role::Receiver, 2),
            Ok(id),
            "joining is not opening"
        );
        assert_eq!(
            r.counts(),
            Counts {
                waiting_pipes: 1,
                running_pipes: 0,
                waiting_parties: 2
            }
        );
        r.close();
        assert_eq!(
            admit(&mut r, "a", Role::Sender, 2).unwrap_err().status(),
            503
        );
    }

    #[test]
    fn one_client_may_open_only_so_many_waiting_pipes_and_others_are_served() {
        let addr_a = ClientAddr::of("127.0.0.1".parse().unwrap());
        let (a, b) = (
            Some(addr_a),
            Some(ClientAddr::of("127.0.0.2".parse().unwrap())),
        );
        let mut r: Registry<()> = Registry::new(100);
        r.limit_per_client(2);
        let open = |r: &mut Registry<()>, c, name: &str| {
            r.admit_from(c, name, Role::Receiver, 1, |_| ())
                .map(|a| a.id)
        };
        let p1 = open(&mut r, a, "a1").unwrap();
        let p2 = open(&mut r, a, "a2").unwrap();
        let e = open(&mut r, a, "a3").unwrap_err();
        assert_eq!(e, Reject::ClientPipes { max: 2 });
        assert_eq!(e.status(), 429);
        assert!(open(&mut r, b, "b1").is_ok(), "another address opens pipes");
        // Joining a pipe someone else opened is not opening one.
        assert!(r.admit_from(a, "b1", Role::Sender, 1, |_| ()).is_ok());
        // A pipe that starts, or whose parties leave, is no longer charged.
        r.start("a1", p1);
        assert!(r.leave("a2", p2, Role::Receiver));
        assert_eq!(r.waiting_of(addr_a), 0);
        open(&mut r, a, "a4").unwrap();
        open(&mut r, a, "a5").unwrap();
        r.finish("a1", p1);
        assert_eq!(r.waiting_of(addr_a), 2);
    }

    #[test]
    fn a_running_name_is_busy_until_finished_then_free_at_once() {
        let mut r = Registry::default();
        let id = admit(&mut r, "a", Role::Receiver, 1).unwrap();
        admit(&mut r, "a", Role::Sender, 1).unwrap();
        r.start("a", id);
        assert_eq!(admit(&mut r, "a", Role::Receiver, 1), Err(Reject::Busy));
        assert_eq!(admit(&mut r, "a", Role::Receiver, 5), Err(Reject::Busy));
        r.finish("a", id);
        assert_ne!(admit(&mut r, "a", Role::Receiver, 5).unwrap(), id);
    }
}
