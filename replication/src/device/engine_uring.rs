//! The io_uring engine: each calling thread owns a small ring, created on first use, and
//! waits for its own completion (the device API is blocking). One `io_uring_enter` carries
//! the submission and the wait; FUA is `RWF_DSYNC` on the write, flush is an
//! `IORING_FSYNC_DATASYNC` fsync, hole punching and zeroing are ring `fallocate`s.
//!
//! A ring that fails mid-operation is dropped and rebuilt on the next call, so a stale
//! completion can never be taken for another request's.

use std::cell::RefCell;
use std::io;
use std::os::unix::io::RawFd;

use io_uring::{opcode, squeue, types, IoUring};

use super::engine::{Engine, IoEngine};

/// Entries per ring: each thread has at most one request in flight.
const RING_ENTRIES: u32 = 4;

thread_local! {
    static RING: RefCell<Option<IoUring>> = const { RefCell::new(None) };
}

/// io_uring with one ring per thread.
#[derive(Debug)]
pub(crate) struct UringEngine;

impl UringEngine {
    /// Check that rings can be created and used here (seccomp and containers may refuse).
    pub(crate) fn probe() -> io::Result<()> {
        run(opcode::Nop::new().build()).map(drop)
    }
}

/// Submit one operation on this thread's ring and wait for its result.
fn run(entry: squeue::Entry) -> io::Result<u32> {
    RING.with(|cell| {
        let mut slot = cell.borrow_mut();
        let ring = match slot.as_mut() {
            Some(ring) => ring,
            None => slot.insert(IoUring::new(RING_ENTRIES)?),
        };
        let outcome = submit_and_reap(ring, entry);
        if outcome.is_err() {
            // The ring may still hold our request; never reuse it.
            *slot = None;
        }
        outcome?
    })
}

/// `Ok(Err(_))` is the operation's own failure; `Err(_)` means the ring is unusable.
fn submit_and_reap(ring: &mut IoUring, entry: squeue::Entry) -> io::Result<io::Result<u32>> {
    // SAFETY: every buffer the entry points to is kept alive by our caller until this
    // function has reaped the completion (it waits for it below).
    unsafe { ring.submission().push(&entry.user_data(1)) }
        .map_err(|_| io::Error::other("io_uring submission queue is full"))?;
    loop {
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        if let Some(cqe) = ring.completion().next() {
            let res = cqe.result();
            return Ok(if res < 0 {
                Err(io::Error::from_raw_os_error(-res))
            } else {
                Ok(res as u32)
            });
        }
    }
}

fn clamp(len: usize) -> u32 {
    // One ring operation moves at most u32::MAX bytes; the device loops on short counts.
    len.min(1 << 30) as u32
}

impl Engine for UringEngine {
    fn kind(&self) -> IoEngine {
        IoEngine::IoUring
    }

    unsafe fn pread(&self, fd: RawFd, ptr: *mut u8, len: usize, offset: u64) -> io::Result<usize> {
        let entry = opcode::Read::new(types::Fd(fd), ptr, clamp(len))
            .offset(offset)
            .build();
        run(entry).map(|n| n as usize)
    }

    fn pwrite(&self, fd: RawFd, buf: &[u8], offset: u64, dsync: bool) -> io::Result<usize> {
        let flags = if dsync { libc::RWF_DSYNC } else { 0 };
        let entry = opcode::Write::new(types::Fd(fd), buf.as_ptr(), clamp(buf.len()))
            .offset(offset)
            .rw_flags(flags)
            .build();
        run(entry).map(|n| n as usize)
    }

    fn fdatasync(&self, fd: RawFd) -> io::Result<()> {
        let entry = opcode::Fsync::new(types::Fd(fd))
            .flags(types::FsyncFlags::DATASYNC)
            .build();
        run(entry).map(drop)
    }

    fn fallocate(&self, fd: RawFd, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let entry = opcode::Fallocate::new(types::Fd(fd), len)
            .offset(offset)
            .mode(mode)
            .build();
        run(entry).map(drop)
    }
}
