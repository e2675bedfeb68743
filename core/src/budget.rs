//! The memory budget of all pipe buffers together (`--memory-limit`).
//!
//! Every ring is charged for the bytes it holds; the charge comes back when the ring is
//! dropped or released. The budget is shared by every pipe on every thread: a handle is
//! an `Arc` of one atomic, cloned with the [`Config`](crate::Config).
//!
//! The rules, deterministic given the bytes in use:
//! - A ring's **floor** ([`MemoryBudget::start`]'s `floor`) is always granted, even past
//!   the limit: every pipe can move its bytes, so none deadlocks or starves. Only the
//!   floors of many pipes at once may take the use past the limit.
//! - A ring **starts** at the largest of `initial`, `initial / 2`, … down to its floor that
//!   fits under the limit.
//! - A ring **grows** only while the use after the growth stays within
//!   [`MemoryBudget::growth_limit`], three quarters of the limit: the last quarter is kept
//!   for the start of new pipes, so a few large transfers cannot leave a burst of new ones
//!   with their floors only.
//!
//! When the budget is spent, pipes go on with the rings they have; growth resumes as
//! other rings are dropped.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// The default `--memory-limit`: 16 MiB of pipe buffers. A pipe moves its bytes at about
/// the same pace with a 16 KiB ring as with 1 MiB when many run at once (a thousand 1 MiB
/// transfers at once ran as fast with a 1 MiB limit as with 32 MiB), so this keeps a
/// thousand pipes at once within 64 MiB of resident memory, their connections included,
/// and still lets a dozen large transfers grow to the default 1 MiB (BENCHMARKS.md).
pub const DEFAULT_MEMORY_LIMIT: usize = 16 << 20;

/// A shared count of the bytes all rings hold, against a limit.
#[derive(Clone)]
pub struct MemoryBudget(Arc<Inner>);

struct Inner {
    limit: usize,
    used: AtomicUsize,
}

impl fmt::Debug for MemoryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryBudget")
            .field("limit", &self.limit())
            .field("used", &self.used())
            .finish()
    }
}

impl Default for MemoryBudget {
    fn default() -> Self {
        MemoryBudget::new(DEFAULT_MEMORY_LIMIT)
    }
}

impl MemoryBudget {
    /// A budget of `limit` bytes, none in use.
    pub fn new(limit: usize) -> Self {
        MemoryBudget(Arc::new(Inner {
            limit,
            used: AtomicUsize::new(0),
        }))
    }

    /// A budget that never refuses (for rings with no shared budget).
    pub fn unlimited() -> Self {
        MemoryBudget::new(usize::MAX)
    }

    /// Bytes all rings may hold together (their floors aside).
    pub fn limit(&self) -> usize {
        self.0.limit
    }

    /// Bytes charged now.
    pub fn used(&self) -> usize {
        self.0.used.load(Ordering::Relaxed)
    }

    /// How far growth may take the use: three quarters of the limit, the rest kept for
    /// new pipes' starts.
    pub fn growth_limit(&self) -> usize {
        self.0.limit - self.0.limit / 4
    }

    /// Charges `bytes` if the use stays within `cap` after it.
    fn try_charge(&self, bytes: usize, cap: usize) -> bool {
        self.0
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                used.checked_add(bytes).filter(|&after| after <= cap)
            })
            .is_ok()
    }

    /// The size of a new ring, charged: the largest of `initial`, `initial / 2`, … that
    /// fits under the limit, and at least `floor`, which is always granted.
    pub fn start(&self, initial: usize, floor: usize) -> usize {
        let floor = floor.min(initial);
        let mut size = initial;
        while size > floor {
            if self.try_charge(size, self.0.limit) {
                return size;
            }
            size = (size / 2).max(floor);
        }
        self.0.used.fetch_add(floor, Ordering::Relaxed);
        floor
    }

    /// Charges a ring's growth by `more` bytes if the use stays within the growth limit.
    pub fn grow(&self, more: usize) -> bool {
        self.try_charge(more, self.growth_limit())
    }

    /// Gives back `bytes` a ring no longer holds.
    pub fn refund(&self, bytes: usize) {
        self.0.used.fetch_sub(bytes, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_halve_to_fit_and_the_floor_is_always_granted() {
        let b = MemoryBudget::new(100_000);
        assert_eq!(b.start(65_536, 4096), 65_536);
        // 34,464 left: 32 KiB fits.
        assert_eq!(b.start(65_536, 4096), 32_768);
        // 1,696 left: below the floor, which is granted anyway.
        assert_eq!(b.start(65_536, 4096), 4096);
        assert_eq!(b.used(), 65_536 + 32_768 + 4096);
        assert!(b.used() > b.limit());
        b.refund(4096);
        b.refund(32_768);
        assert_eq!(b.used(), 65_536);
        // A ring smaller than the floor starts at its own size.
        assert_eq!(b.start(1000, 4096), 1000);
    }

    #[test]
    fn growth_stops_at_three_quarters_and_resumes_after_a_refund() {
        let b = MemoryBudget::new(1000);
        assert_eq!(b.growth_limit(), 750);
        assert!(b.grow(700));
        assert!(!b.grow(51));
        assert!(b.grow(50));
        assert!(!b.grow(1));
        // Starts may still use the last quarter.
        assert_eq!(b.start(200, 100), 200);
        b.refund(700);
        assert!(b.grow(500));
        assert_eq!(b.used(), 750);
    }

    #[test]
    fn clones_share_one_count_across_threads() {
        let b = MemoryBudget::new(200_000);
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let b = b.clone();
                std::thread::spawn(move || {
                    let mut got = 0;
                    for _ in 0..1000 {
                        if b.grow(100) {
                            got += 100;
                        }
                    }
                    got
                })
            })
            .collect();
        let total: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(total, b.used());
        assert_eq!(total, b.growth_limit());
    }
}
