//! The `pipe` fuzz target's script: operations on a world, decoded from bytes by hand.

use std::time::Duration;

use fanpipe_core::request::Role;
use fanpipe_core::Config;

use super::{Plan, Spec, World};

/// Reads the script of the `pipe` fuzz target.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from(self.u8()?) | (u16::from(self.u8()?) << 8))
    }
    fn take(&mut self, k: usize) -> &[u8] {
        let k = k.min(self.0.len());
        let (a, b) = self.0.split_at(k);
        self.0 = b;
        a
    }
}

impl World {
    /// Builds a world from a fuzz script and runs it. Byte 0 chooses the buffer size;
    /// then each operation is one byte (its low 3 bits) and its arguments:
    /// - 0 `kind name n flags len:u16`: a new client connects (`kind` even: receiver,
    ///   odd: sender; `flags`: chunked, HTTP/1.0, expect, bare path, malformed, and a
    ///   plan in the top bits);
    /// - 1 `c k`: client `c` offers `k * 97 + 1` more bytes; 2 `c k`: opens its window
    ///   by `k * 131 + 1`; 3 `c`: half-closes; 4 `c`: resets;
    /// - 5 `t`: `t * 20` ms pass (255: the server shuts down, 254: its grace ends, 253:
    ///   the next accept fails);
    ///   6: the server runs;
    /// - 7 `len bytes`: a client of raw bytes connects and sends them.
    pub fn from_script(data: &[u8]) -> World {
        let mut b = Bytes(data);
        let buffer = 4096 << (b.u8().unwrap_or(0) % 5);
        let config = Config {
            buffer_size: buffer,
            wait_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            ..Config::default()
        };
        let mut w = World::new(config);
        let pick = |w: &World, x: u8| -> Option<usize> {
            let k = w.net().clients.len();
            (k > 0).then(|| x as usize % k)
        };
        let mut ops = 0;
        while let Some(op) = b.u8() {
            ops += 1;
            if ops > 400 || w.net().clients.len() > 24 {
                break;
            }
            match op % 8 {
                0 => {
                    let (Some(kind), Some(name), Some(n), Some(flags), Some(len)) =
                        (b.u8(), b.u8(), b.u8(), b.u8(), b.u16())
                    else {
                        break;
                    };
                    let plan = match flags >> 5 {
                        0..=3 => Plan::Normal,
                        4 => Plan::ResetAt(len as usize / 3),
                        5 => Plan::EofAt(len as usize / 2),
                        _ => Plan::ResetAfterReading(len as usize % 4000),
                    };
                    let spec = Spec {
                        role: if kind % 2 == 0 {
                            Role::Receiver
                        } else {
                            Role::Sender
                        },
                        name: name as usize,
                        n: 1 + n as usize % 3,
                        body_len: len as usize * 4,
                        chunked: flags & 1 != 0,
                        chunk_size: 1 + (kind as usize >> 1) * 37,
                        malformed: (flags & 16 != 0).then_some(len as usize),
                        http10: flags & 2 != 0 && flags & 1 == 0,
                        expect: flags & 4 != 0,
                        bare_path: flags & 8 != 0,
                        plan,
                        seed: u64::from(len) ^ (u64::from(kind) << 16) ^ (ops as u64) << 24,
                    };
                    let c = w.add(&spec);
                    w.connect(c);
                }
                1 => {
                    let (Some(c), Some(k)) = (b.u8(), b.u8()) else {
                        break;
                    };
                    if let Some(c) = pick(&w, c) {
                        w.offer(c, k as usize * 97 + 1);
                    }
                }
                2 => {
                    let (Some(c), Some(k)) = (b.u8(), b.u8()) else {
                        break;
                    };
                    if let Some(c) = pick(&w, c) {
                        w.open_window(c, k as usize * 131 + 1);
                    }
                }
                3 => {
                    let Some(c) = b.u8() else { break };
                    if let Some(c) = pick(&w, c) {
                        w.half_close(c);
                    }
                }
                4 => {
                    let Some(c) = b.u8() else { break };
                    if let Some(c) = pick(&w, c) {
                        w.reset(c);
                    }
                }
                5 => {
                    let Some(t) = b.u8() else { break };
                    match t {
                        255 => w.shutdown(),
                        254 => w.abort(),
                        253 => w.fail_accepts(1),
                        t => w.advance(Duration::from_millis(u64::from(t) * 20)),
                    }
                }
                6 => w.run(),
                _ => {
                    let Some(len) = b.u8() else { break };
                    let bytes = b.take(len as usize).to_vec();
                    let c = w.add_raw(bytes);
                    w.connect(c);
                }
            }
        }
        w.run();
        w
    }
}
