//! Which names have a pipe, and who may join it. The only state shared between pipes:
//! a backend keeps it behind one lock and holds the lock only to admit or release.
//!
//! `H` is the backend's handle to the task that owns a pipe (a channel, say).

use std::collections::HashMap;

use crate::error::Reject;
use crate::request::Role;

/// A pipe's identity: the same name is a new pipe after each transfer.
pub type PipeId = u64;

#[derive(Debug)]
struct Entry<H> {
    id: PipeId,
    n: usize,
    sender: bool,
    receivers: usize,
    running: bool,
    handle: H,
}

/// Names to pipes.
#[derive(Debug)]
pub struct Registry<H> {
    pipes: HashMap<String, Entry<H>>,
    next_id: PipeId,
}

impl<H> Default for Registry<H> {
    fn default() -> Self {
        Registry {
            pipes: HashMap::new(),
            next_id: 1,
        }
    }
}

/// A party let in: to the pipe `id`, whose owner is `handle`; `new` if it was just made.
#[derive(Debug)]
pub struct Admitted<'a, H> {
    pub id: PipeId,
    pub handle: &'a H,
    pub new: bool,
}

impl<H> Registry<H> {
    /// Lets a party onto `name`, or says why not. `make` creates the owner of a new pipe.
    pub fn admit(
        &mut self,
        name: &str,
        role: Role,
        n: usize,
        make: impl FnOnce(PipeId) -> H,
    ) -> Result<Admitted<'_, H>, Reject> {
        let mut new = false;
        if !self.pipes.contains_key(name) {
            let id = self.next_id;
            self.next_id += 1;
            let entry = Entry {
                id,
                n,
                sender: false,
                receivers: 0,
                running: false,
                handle: make(id),
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
        match role {
            Role::Sender if e.sender => return Err(Reject::SenderTaken),
            Role::Sender => e.sender = true,
            Role::Receiver if e.receivers >= e.n => return Err(Reject::ReceiversFull { n: e.n }),
            Role::Receiver => e.receivers += 1,
        }
        Ok(Admitted {
            id: e.id,
            handle: &e.handle,
            new,
        })
    }

    /// A waiting party left pipe `id`. Returns true if the pipe is now empty and gone.
    pub fn leave(&mut self, name: &str, id: PipeId, role: Role) -> bool {
        let Some(e) = self.pipes.get_mut(name).filter(|e| e.id == id) else {
            return true;
        };
        match role {
            Role::Sender => e.sender = false,
            Role::Receiver => e.receivers = e.receivers.saturating_sub(1),
        }
        if !e.running && !e.sender && e.receivers == 0 {
            self.pipes.remove(name);
            return true;
        }
        false
    }

    /// The transfer of pipe `id` started: newcomers on its name are told it is busy.
    pub fn start(&mut self, name: &str, id: PipeId) {
        if let Some(e) = self.pipes.get_mut(name).filter(|e| e.id == id) {
            e.running = true;
        }
    }

    /// The transfer of pipe `id` ended: the name is free at once.
    pub fn finish(&mut self, name: &str, id: PipeId) {
        if self.pipes.get(name).is_some_and(|e| e.id == id) {
            self.pipes.remove(name);
        }
    }

    /// Pipes that exist: (waiting, running).
    pub fn counts(&self) -> (usize, usize) {
        let running = self.pipes.values().filter(|e| e.running).count();
        (self.pipes.len() - running, running)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(
            admit(&mut r, "a", Role::Sender, 3),
            Err(Reject::SenderTaken)
        );
        assert_eq!(admit(&mut r, "a", Role::Receiver, 3), Ok(id));
        assert_eq!(admit(&mut r, "a", Role::Receiver, 3), Ok(id));
        assert_eq!(
            admit(&mut r, "a", Role::Receiver, 3),
            Err(Reject::ReceiversFull { n: 3 })
        );
    }

    #[test]
    fn a_leaving_party_frees_its_place_and_the_last_frees_the_name() {
        let mut r = Registry::default();
        let id = admit(&mut r, "a", Role::Receiver, 1).unwrap();
        assert!(!r.leave("a", id, Role::Receiver) || r.counts() == (0, 0));
        let id2 = admit(&mut r, "a", Role::Receiver, 2).unwrap();
        assert_ne!(id, id2, "an emptied name is a new pipe");
        admit(&mut r, "a", Role::Sender, 2).unwrap();
        assert!(!r.leave("a", id2, Role::Receiver));
        assert_eq!(admit(&mut r, "a", Role::Receiver, 2), Ok(id2));
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
