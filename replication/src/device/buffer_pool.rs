//! Reuse of large aligned allocations.
//!
//! A 1 MiB request needs a 1 MiB buffer. Fresh from the allocator that is an `mmap` whose
//! 256 pages fault in one by one as the socket data is copied into them, and a `munmap`
//! once the reply is sent: about 200 µs of CPU per request, a fifth of what the whole
//! request costs (measured with `nbd_vs_qemu_nbd`, 1M seqwrite). Allocations of
//! [`MIN_POOLED`] bytes or more are therefore rounded up to a power of two, and when freed
//! they are kept here, [`MAX_CACHED`] bytes at most, to be handed out again already mapped.
//! Smaller allocations come from the heap, where that cost does not arise.

use std::ptr::NonNull;
use std::sync::{Mutex, MutexGuard};

/// The smallest allocation kept for reuse (glibc's default `mmap` threshold).
const MIN_POOLED: usize = 128 << 10;
/// The most bytes kept for reuse in all: the working set of a few large requests in flight.
const MAX_CACHED: usize = 32 << 20;

/// The allocation size for `size` bytes: a power of two from [`MIN_POOLED`] to
/// [`MAX_CACHED`], so freed buffers fit later requests of about the same size.
pub(super) fn class_size(size: usize) -> usize {
    if !(MIN_POOLED..=MAX_CACHED).contains(&size) {
        return size;
    }
    size.next_power_of_two()
}

/// One freed allocation of `size` bytes.
struct Cached {
    ptr: NonNull<u8>,
    size: usize,
}

// SAFETY: a cached allocation is owned by the pool alone; no reference to it remains.
unsafe impl Send for Cached {}

/// Freed allocations waiting for reuse.
struct Pool {
    free: Vec<Cached>,
    bytes: usize,
}

/// The process-wide pool every [`super::aligned::AlignedBuf`] allocates from and frees to.
static POOL: Mutex<Pool> = Mutex::new(Pool::new());

/// The pool, whatever a panicking holder left: it holds only whole entries.
fn pool() -> MutexGuard<'static, Pool> {
    POOL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A freed allocation of `size` bytes (a [`class_size`]) to reuse, if one is cached.
pub(super) fn take(size: usize) -> Option<NonNull<u8>> {
    if !is_pooled(size) {
        return None;
    }
    pool().take(size)
}

/// Keep the allocation `ptr` of `size` bytes for reuse; false when the caller must free it.
pub(super) fn give(ptr: NonNull<u8>, size: usize) -> bool {
    is_pooled(size) && pool().give(ptr, size)
}

fn is_pooled(size: usize) -> bool {
    size >= MIN_POOLED && size.is_power_of_two()
}

impl Pool {
    const fn new() -> Self {
        Pool {
            free: Vec::new(),
            bytes: 0,
        }
    }

    /// A cached allocation of exactly `size` bytes, if one is free.
    fn take(&mut self, size: usize) -> Option<NonNull<u8>> {
        let at = self.free.iter().rposition(|c| c.size == size)?;
        let cached = self.free.swap_remove(at);
        self.bytes -= cached.size;
        Some(cached.ptr)
    }

    /// Keep the allocation `ptr` of `size` bytes for reuse; false (the caller frees it)
    /// when it is not a pooled size or the pool is full.
    fn give(&mut self, ptr: NonNull<u8>, size: usize) -> bool {
        if !is_pooled(size) || self.bytes + size > MAX_CACHED {
            return false;
        }
        self.free.push(Cached { ptr, size });
        self.bytes += size;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake(addr: usize) -> NonNull<u8> {
        NonNull::new(addr as *mut u8).expect("non-null")
    }

    #[test]
    fn sizes_round_to_classes_in_the_pooled_range_only() {
        assert_eq!(class_size(4096), 4096);
        assert_eq!(class_size(MIN_POOLED - 4096), MIN_POOLED - 4096);
        assert_eq!(class_size(MIN_POOLED), MIN_POOLED);
        assert_eq!(class_size((1 << 20) + 4096), 2 << 20);
        assert_eq!(class_size(MAX_CACHED), MAX_CACHED);
        assert_eq!(class_size(MAX_CACHED + 4096), MAX_CACHED + 4096);
    }

    #[test]
    fn a_freed_allocation_is_handed_out_again_for_its_size_only() {
        let mut pool = Pool::new();
        assert!(pool.give(fake(1 << 20), 1 << 20));
        assert_eq!(pool.take(2 << 20), None);
        assert_eq!(pool.take(1 << 20), Some(fake(1 << 20)));
        assert_eq!(pool.take(1 << 20), None);
        assert_eq!(pool.bytes, 0);
    }

    #[test]
    fn small_odd_and_overflowing_allocations_are_not_kept() {
        let mut pool = Pool::new();
        assert!(!pool.give(fake(4096), 4096));
        assert!(!pool.give(fake(8192), MIN_POOLED + 4096));
        for i in 0..MAX_CACHED / (1 << 20) {
            assert!(pool.give(fake((i + 1) << 20), 1 << 20));
        }
        assert!(!pool.give(fake(1 << 30), 1 << 20), "the pool is full");
        assert_eq!(pool.bytes, MAX_CACHED);
    }
}
