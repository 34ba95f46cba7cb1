//! The range lock that keeps a read-modify-write from losing a neighbour's bytes under
//! `O_DIRECT`.
//!
//! A write that does not cover whole blocks reads them, patches them and writes them back;
//! another write to the same blocks in between would be overwritten with stale bytes. So a
//! read-modify-write holds its blocks exclusively and every aligned write holds its blocks
//! shared. Blocks map onto [`STRIPES`] stripes (block `b` to stripe `b % STRIPES`), so
//! requests on unrelated blocks rarely meet, and only the stripes a request touches are
//! locked. A waiting exclusive request holds new shared ones back, so a steady stream of
//! aligned writes cannot starve it. Guards are owned ([`BlockGuard`]), so one can ride along
//! with an asynchronous write until its completion is reaped.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use super::aligned::ALIGN;

/// Number of stripes (bits of a `u64` mask).
pub(crate) const STRIPES: usize = 64;

struct Stripes {
    /// Per stripe: number of shared holders, or -1 when held exclusively.
    held: [i32; STRIPES],
    /// Per stripe: exclusive requests waiting for it.
    waiting: [u32; STRIPES],
    /// Threads asleep on `changed`. A release wakes them only when there are some: std's
    /// `Condvar::notify_all` makes a system call even with nobody waiting, which every
    /// aligned write would otherwise pay.
    sleepers: u32,
}

impl Default for Stripes {
    fn default() -> Self {
        Stripes {
            held: [0; STRIPES],
            waiting: [0; STRIPES],
            sleepers: 0,
        }
    }
}

/// The block range lock of one device.
#[derive(Default)]
pub(crate) struct BlockLocks {
    state: Mutex<Stripes>,
    changed: Condvar,
}

impl std::fmt::Debug for BlockLocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BlockLocks")
    }
}

/// The stripes of the blocks `[offset, offset + len)` touches.
pub(crate) fn stripes_of(offset: u64, len: u64) -> u64 {
    let block = ALIGN as u64;
    let first = offset / block;
    let last = (offset + len.max(1) - 1) / block;
    if last - first + 1 >= STRIPES as u64 {
        return u64::MAX;
    }
    (first..=last).fold(0u64, |mask, b| mask | 1 << (b % STRIPES as u64))
}

fn bits(mask: u64) -> impl Iterator<Item = usize> {
    (0..STRIPES).filter(move |i| mask & (1 << i) != 0)
}

/// Holds stripes shared or exclusively; released on drop.
pub(crate) struct BlockGuard {
    locks: Arc<BlockLocks>,
    mask: u64,
    exclusive: bool,
}

impl BlockLocks {
    fn lock(&self) -> MutexGuard<'_, Stripes> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sleep until a guard is released.
    fn wait<'a>(&self, mut st: MutexGuard<'a, Stripes>) -> MutexGuard<'a, Stripes> {
        st.sleepers += 1;
        let mut st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        st.sleepers -= 1;
        st
    }

    fn shared_free(st: &Stripes, mask: u64) -> bool {
        bits(mask).all(|i| st.held[i] >= 0 && st.waiting[i] == 0)
    }

    fn take_shared(st: &mut Stripes, mask: u64) {
        for i in bits(mask) {
            st.held[i] += 1;
        }
    }

    /// Hold `mask` shared, waiting while a read-modify-write holds or wants any of it.
    pub(crate) fn shared(self: &Arc<Self>, mask: u64) -> BlockGuard {
        let mut st = self.lock();
        while !Self::shared_free(&st, mask) {
            st = self.wait(st);
        }
        Self::take_shared(&mut st, mask);
        self.guard(mask, false)
    }

    /// Hold `mask` shared if that needs no wait (for callers that must not block).
    pub(crate) fn try_shared(self: &Arc<Self>, mask: u64) -> Option<BlockGuard> {
        let mut st = self.lock();
        if !Self::shared_free(&st, mask) {
            return None;
        }
        Self::take_shared(&mut st, mask);
        Some(self.guard(mask, false))
    }

    /// Hold `mask` exclusively.
    pub(crate) fn exclusive(self: &Arc<Self>, mask: u64) -> BlockGuard {
        let mut st = self.lock();
        for i in bits(mask) {
            st.waiting[i] += 1;
        }
        while bits(mask).any(|i| st.held[i] != 0) {
            st = self.wait(st);
        }
        for i in bits(mask) {
            st.waiting[i] -= 1;
            st.held[i] = -1;
        }
        self.guard(mask, true)
    }

    fn guard(self: &Arc<Self>, mask: u64, exclusive: bool) -> BlockGuard {
        BlockGuard {
            locks: Arc::clone(self),
            mask,
            exclusive,
        }
    }
}

impl Drop for BlockGuard {
    fn drop(&mut self) {
        let mut st = self.locks.lock();
        for i in bits(self.mask) {
            if self.exclusive {
                st.held[i] = 0;
            } else {
                st.held[i] -= 1;
            }
        }
        let sleepers = st.sleepers > 0;
        drop(st);
        if sleepers {
            self.locks.changed.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stripes_cover_the_touched_blocks() {
        assert_eq!(stripes_of(0, 4096), 1);
        assert_eq!(stripes_of(4000, 200), 0b11);
        assert_eq!(stripes_of(4096 * 63, 8192), 1 << 63 | 1);
        assert_eq!(stripes_of(0, 1 << 20), u64::MAX);
        assert_eq!(stripes_of(512, 0), 1);
    }

    #[test]
    fn exclusive_excludes_shared_on_its_stripes_only() {
        let locks = Arc::new(BlockLocks::default());
        let rmw = locks.exclusive(stripes_of(0, 512));
        assert!(locks.try_shared(stripes_of(0, 4096)).is_none());
        let other = locks.try_shared(stripes_of(4096, 4096));
        assert!(other.is_some());
        drop(rmw);
        let a = locks.try_shared(stripes_of(0, 4096)).unwrap();
        let b = locks.shared(stripes_of(0, 8192));
        drop((a, b, other));
        drop(locks.exclusive(u64::MAX));
    }

    #[test]
    fn a_waiting_exclusive_holds_back_new_shared_holders() {
        let locks = Arc::new(BlockLocks::default());
        let first = locks.shared(1);
        let waiter = {
            let locks = Arc::clone(&locks);
            std::thread::spawn(move || drop(locks.exclusive(1)))
        };
        while locks.lock().waiting[0] == 0 {
            std::thread::yield_now();
        }
        assert!(locks.try_shared(1).is_none());
        drop(first);
        waiter.join().unwrap();
        assert!(locks.try_shared(1).is_some());
    }

    #[test]
    fn a_release_wakes_a_sleeping_shared_holder() {
        let locks = Arc::new(BlockLocks::default());
        let rmw = locks.exclusive(1);
        let waiter = {
            let locks = Arc::clone(&locks);
            std::thread::spawn(move || drop(locks.shared(1)))
        };
        while locks.lock().sleepers == 0 {
            std::thread::yield_now();
        }
        drop(rmw);
        waiter.join().unwrap();
        assert_eq!(locks.lock().sleepers, 0);
    }
}
