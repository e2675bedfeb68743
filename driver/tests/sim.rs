//! A deterministic simulation of the server: fanpipe-driver's accept loop, connections,
//! admission, pipe tasks and shutdown, over the hub and the core.
//!
//! Each seed builds a world (virtual clock, seeded xorshift RNG, several pipes at once)
//! of byte-level clients on in-memory sockets. The world, its sockets and timers, and its
//! invariant checks are in `fuzz/src/world`, shared with the `pipe` fuzz target; this
//! file writes the scripts.
//!
//! `FANPIPE_SIM_SEED=N` runs just seed N and prints its log; `FANPIPE_SIM_SEEDS=K` runs
//! K seeds (default 4000 in release, 200 in debug).

#[allow(dead_code)]
#[path = "../../fuzz/src/lib.rs"]
mod targets;

use std::time::Duration;

use fanpipe_core::request::Role;
use fanpipe_core::Config;
use targets::world::{Plan, Spec, Stage, World, NAMES};
use targets::Rng;

/// How a client behaves during the script.
#[derive(Debug, Clone, Copy)]
struct Habit {
    /// Largest piece it sends or reads at once.
    piece: usize,
    /// Percent of its turns at which it does not read (a stalled receiver).
    stall: usize,
}

fn body_len(rng: &mut Rng) -> usize {
    match rng.below(10) {
        0..=2 => rng.below(100),
        3..=6 => rng.below(20_000),
        _ => rng.below(200_001),
    }
}

fn spec(rng: &mut Rng, role: Role, name: usize, n: usize) -> Spec {
    let chunked = rng.chance(50);
    let plan = match (role, rng.below(100)) {
        (Role::Sender, 0..=7) => Plan::ResetAt(rng.below(300_000)),
        (Role::Sender, 8..=13) => Plan::EofAt(rng.below(300_000)),
        (Role::Receiver, 0..=9) => Plan::ResetAfterReading(rng.below(60_000)),
        _ => Plan::Normal,
    };
    Spec {
        role,
        name,
        n,
        body_len: body_len(rng),
        chunked,
        chunk_size: [1, 7, 100, 4096, 16_384, 100_000][rng.below(6)],
        malformed: (chunked && rng.chance(8)).then(|| rng.below(1000)),
        http10: rng.chance(4),
        expect: rng.chance(30),
        bare_path: rng.chance(50),
        plan,
        seed: rng.next_u64(),
    }
}

/// Builds and runs the world of `seed`.
fn simulate(seed: u64) -> World {
    let mut rng = Rng::new(seed);
    let config = Config {
        buffer_size: [4096, 5000, 16_384, 65_536, 1 << 20][rng.below(5)],
        wait_timeout: Duration::from_secs([20, 45, 3600][rng.below(3)]),
        idle_timeout: Duration::from_secs([30, 90, 300][rng.below(3)]),
        ..Config::default()
    };
    let mut w = World::new(config);
    w.grace = Duration::from_secs([1, 5, 30][rng.below(3)]);
    // Sometimes accepts fail (out of descriptors): the driver backs off and retries.
    if rng.chance(5) {
        w.fail_accepts(rng.range(1, 3));
    }
    // The clients of one to three transfers, with some extras.
    let mut specs = Vec::new();
    for name in 0..rng.range(1, NAMES.len()) {
        for _round in 0..rng.range(1, 2) {
            let n = rng.range(1, 3);
            specs.push(spec(&mut rng, Role::Sender, name, n));
            for _ in 0..n {
                specs.push(spec(&mut rng, Role::Receiver, name, n));
            }
            if rng.chance(20) {
                specs.push(spec(&mut rng, Role::Receiver, name, n + 1)); // wrong n
            }
            if rng.chance(15) {
                specs.push(spec(&mut rng, Role::Receiver, name, n)); // one too many
            }
            if rng.chance(10) {
                specs.push(spec(&mut rng, Role::Sender, name, n)); // a second sender
            }
        }
    }
    // Arrival order: shuffled.
    for i in (1..specs.len()).rev() {
        let j = rng.below(i + 1);
        specs.swap(i, j);
    }
    let mut habits = Vec::new();
    for s in &specs {
        w.add(s);
        habits.push(Habit {
            piece: [16, 1500, 65_536][rng.below(3)],
            stall: if rng.chance(20) { 90 } else { 0 },
        });
    }
    let mut arrived = 0;
    let steps = rng.range(50, 1500);
    // Sometimes the server shuts down gracefully, and sometimes its grace runs out.
    let shutdown_at = rng.chance(5).then(|| rng.below(steps));
    let abort_at = shutdown_at.map(|s| s + rng.below(400));
    for step in 0..steps {
        if shutdown_at == Some(step) {
            w.shutdown();
        }
        if abort_at == Some(step) {
            w.abort();
        }
        match rng.below(100) {
            0..=14 if arrived < specs.len() => {
                w.connect(arrived);
                arrived += 1;
            }
            0..=44 if arrived > 0 => {
                let c = rng.below(arrived);
                let k = rng.range(1, habits[c].piece);
                w.offer(c, k);
            }
            45..=84 if arrived > 0 => {
                let c = rng.below(arrived);
                if !rng.chance(habits[c].stall) {
                    let k = rng.range(1, habits[c].piece);
                    w.open_window(c, k);
                }
            }
            85..=89 => {
                let ms = if rng.chance(10) {
                    rng.range(1000, 15_000)
                } else {
                    rng.below(300)
                };
                w.advance(Duration::from_millis(ms as u64));
            }
            90..=91 if arrived > 0 => {
                // A waiting receiver may half-close (curl does not, a proxy may).
                let c = rng.below(arrived);
                let whole = {
                    let cl = w.client(c);
                    !cl.is_sender() && cl.offered == cl.input.len()
                };
                if whole {
                    w.half_close(c);
                }
            }
            _ => {}
        }
        w.run();
    }
    w.finish();
    w
}

fn seeds() -> Vec<u64> {
    if let Ok(s) = std::env::var("FANPIPE_SIM_SEED") {
        return vec![s.trim().parse().expect("FANPIPE_SIM_SEED=N")];
    }
    let k = std::env::var("FANPIPE_SIM_SEEDS")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(if cfg!(debug_assertions) { 200 } else { 4000 });
    (0..k).collect()
}

#[test]
fn simulation_keeps_every_invariant() {
    let single = std::env::var_os("FANPIPE_SIM_SEED").is_some();
    let started = std::time::Instant::now();
    let mut failed = Vec::new();
    let mut outcomes = std::collections::BTreeMap::new();
    let mut bytes = 0u64;
    let mut statuses = std::collections::BTreeMap::new();
    let seeds = seeds();
    for &seed in &seeds {
        let mut w = simulate(seed);
        let net = w.net();
        for c in &net.clients {
            let k = match c.resp.status {
                Some(s) => s.to_string(),
                None => "none".into(),
            };
            *statuses.entry(k).or_insert(0usize) += 1;
            for i in &c.resp.interim {
                *statuses.entry(format!("interim {i}")).or_insert(0usize) += 1;
            }
        }
        for pipe in &net.pipes {
            if let Some(s) = &pipe.seen.summary {
                let k = format!("{:?}", s.outcome);
                let k = k.split('(').next().unwrap_or("").to_owned();
                *outcomes.entry(k).or_insert(0usize) += 1;
                bytes += s.bytes;
            }
        }
        if single {
            eprintln!("{}", net.log.join("\n"));
        }
        drop(net);
        if let Err(violations) = w.check() {
            eprintln!(
                "seed {seed} FAILED (FANPIPE_SIM_SEED={seed} reproduces it):\n{violations}\n--- log (last 40) ---\n{}\n",
                w.log_tail(40)
            );
            failed.push(seed);
        }
    }
    eprintln!(
        "{} seeds in {:.1}s, {} failed; transfers by outcome {outcomes:?}, {bytes} body bytes; responses by status {statuses:?}",
        seeds.len(),
        started.elapsed().as_secs_f64(),
        failed.len()
    );
    assert!(failed.is_empty(), "failing seeds: {failed:?}");
}

// ---------------------------------------------------------------------------------------
// Minimal reproductions of what the simulation found, as scripted worlds.

fn plain(role: Role, n: usize, body_len: usize) -> Spec {
    Spec {
        role,
        name: 0,
        n,
        body_len,
        chunked: false,
        chunk_size: 1000,
        malformed: None,
        http10: false,
        expect: false,
        bare_path: false,
        plan: Plan::Normal,
        seed: 7,
    }
}

/// Connects client `c` and lets it send its whole request.
fn arrive(w: &mut World, c: usize, reads: bool) {
    w.connect(c);
    let k = w.client(c).input.len();
    w.offer(c, k);
    if reads {
        w.open_window(c, usize::MAX / 4);
    }
    w.run();
}

#[test]
fn a_happy_transfer_byte_by_byte() {
    let mut w = World::new(Config::default());
    let r = w.add(&plain(Role::Receiver, 1, 0));
    let s = w.add(&plain(Role::Sender, 1, 3000));
    for c in [r, s] {
        w.connect(c);
    }
    for _ in 0..4000 {
        for c in [r, s] {
            w.offer(c, 1);
            w.open_window(c, 1);
        }
        w.run();
    }
    w.finish();
    w.check().unwrap();
    assert_eq!(w.client(r).resp.body, w.client(s).body().unwrap());
    assert!(w.client(s).resp.complete);
}

/// docs/PROTOCOL.md: "A waiting party that goes away frees its place". A waiting sender is
/// not read (the body must not be read before the start), so the pipe writes it a
/// heartbeat line now and then; the write that fails frees its place. (Regression: the
/// place used to stay taken until `wait_timeout`.)
#[test]
fn a_waiting_sender_that_disconnects_frees_its_place() {
    let mut w = World::new(Config::default());
    let s1 = w.add(&plain(Role::Sender, 1, 10));
    arrive(&mut w, s1, true);
    assert_eq!(w.client(s1).resp.status, Some(200));
    w.reset(s1);
    w.run();
    w.advance(Duration::from_secs(120));
    w.run();
    let s2 = w.add(&plain(Role::Sender, 1, 10));
    arrive(&mut w, s2, true);
    assert_eq!(
        w.client(s2).resp.status,
        Some(200),
        "second sender: {}",
        String::from_utf8_lossy(&w.client(s2).got)
    );
}

/// docs/PROTOCOL.md: the sender's response ends cleanly only when all `n` receivers got every byte.
/// A sender slow to read its last lines still gets them: the linger before the close
/// starts once they are written. (Regression: the linger clock used to start at the end
/// of the transfer, and a sender that did not read for 2 s lost its summary.)
#[test]
fn a_sender_slow_to_read_still_gets_its_summary() {
    let mut w = World::new(Config::default());
    let r = w.add(&plain(Role::Receiver, 1, 0));
    let s = w.add(&plain(Role::Sender, 1, 30));
    arrive(&mut w, r, true);
    arrive(&mut w, s, false); // the sender does not read its response yet
    assert_eq!(w.client(r).resp.body.len(), 30);
    w.advance(Duration::from_secs(3));
    w.run();
    w.open_window(s, usize::MAX / 4);
    w.run();
    let lines = w.client(s).resp.lines();
    assert!(
        w.client(s).resp.complete,
        "sender got: {:?}",
        String::from_utf8_lossy(&w.client(s).got)
    );
    assert!(lines.last().unwrap().starts_with("[INFO] done: "));
}

/// Out of descriptors, say: a failed accept is retried after a short backoff, not in a
/// busy loop, and the connection is served then.
#[test]
fn a_failed_accept_is_retried_after_the_backoff() {
    let mut w = World::new(Config::default());
    w.fail_accepts(1);
    let r = w.add(&plain(Role::Receiver, 1, 0));
    arrive(&mut w, r, true);
    assert_eq!(w.client(r).stage, Stage::Queued);
    w.advance(fanpipe_driver::ACCEPT_BACKOFF - Duration::from_millis(1));
    assert_eq!(w.client(r).stage, Stage::Queued);
    w.advance(Duration::from_millis(1));
    assert!(matches!(w.client(r).stage, Stage::Party(_)));
}

/// A receiver killed while it waits (its FIN, then a reset for the probe it is sent) and
/// run again at once: the newcomer is not refused, though the registry still counts the
/// old one; it is held until the old one's probe fails, then gets the transfer. Through
/// the accept loop, the registry, the hub and the pipe's task.
#[test]
fn a_receiver_retried_at_once_gets_the_place_of_one_killed_while_waiting() {
    let mut w = World::new(Config::default());
    let old = w.add(&plain(Role::Receiver, 1, 0));
    arrive(&mut w, old, true);
    w.half_close(old);
    w.run();
    let new = w.add(&plain(Role::Receiver, 1, 0));
    arrive(&mut w, new, true);
    assert_eq!(w.client(new).resp.status, None, "held, not refused");
    // The probe's reset: its next write fails.
    w.reset(old);
    w.advance(fanpipe_core::pipe::REPROBE);
    let s = w.add(&plain(Role::Sender, 1, 5000));
    arrive(&mut w, s, true);
    w.finish();
    w.check().unwrap();
    assert_eq!(w.client(new).resp.status, Some(200));
    assert_eq!(w.client(new).resp.body, w.client(s).body().unwrap());
    assert!(w.client(s).resp.complete);
}

/// A second receiver for the place of one that half-closed and is there gets the 409 it
/// would have had, once the probe says so, and the transfer goes on with the first.
#[test]
fn a_newcomer_for_the_place_of_a_half_closed_receiver_gets_409_after_the_probe() {
    let mut w = World::new(Config::default());
    let old = w.add(&plain(Role::Receiver, 1, 0));
    arrive(&mut w, old, true);
    w.half_close(old);
    w.run();
    let new = w.add(&plain(Role::Receiver, 1, 0));
    arrive(&mut w, new, true);
    assert_eq!(
        w.client(new).resp.status,
        None,
        "held while the probe is out"
    );
    w.advance(2 * fanpipe_core::pipe::REPROBE);
    assert_eq!(w.client(new).resp.status, Some(409));
    let s = w.add(&plain(Role::Sender, 1, 5000));
    arrive(&mut w, s, true);
    w.finish();
    w.check().unwrap();
    assert_eq!(w.client(old).resp.body, w.client(s).body().unwrap());
    assert!(w.client(s).resp.complete);
}
