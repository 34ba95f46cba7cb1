//! The thread-pool engine: plain system calls on the calling thread (a tokio blocking
//! thread). The fallback where io_uring is unavailable, and forced by
//! `io_engine = "thread-pool"`.

use std::io;
use std::os::unix::io::RawFd;

use super::engine::{cvt, Engine, IoEngine};

/// `pread`, `pwritev2` (`RWF_DSYNC` for FUA), `fdatasync`, `fallocate`.
#[derive(Debug)]
pub(crate) struct SyncEngine;

impl Engine for SyncEngine {
    fn kind(&self) -> IoEngine {
        IoEngine::ThreadPool
    }

    unsafe fn pread(&self, fd: RawFd, ptr: *mut u8, len: usize, offset: u64) -> io::Result<usize> {
        // SAFETY: the caller guarantees `ptr` is writable for `len` bytes.
        cvt(unsafe { libc::pread(fd, ptr.cast(), len, offset as libc::off_t) })
    }

    fn pwrite(&self, fd: RawFd, buf: &[u8], offset: u64, dsync: bool) -> io::Result<usize> {
        let iov = libc::iovec {
            iov_base: buf.as_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        let flags = if dsync { libc::RWF_DSYNC } else { 0 };
        // SAFETY: the kernel only reads `buf` through the one iovec, which outlives the call.
        cvt(unsafe { libc::pwritev2(fd, &iov, 1, offset as libc::off_t, flags) })
    }

    fn fdatasync(&self, fd: RawFd) -> io::Result<()> {
        // SAFETY: plain system call on an integer descriptor.
        cvt(unsafe { libc::fdatasync(fd) } as isize).map(drop)
    }

    fn fallocate(&self, fd: RawFd, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: plain system call on integer arguments.
        let rc = unsafe { libc::fallocate(fd, mode, offset as libc::off_t, len as libc::off_t) };
        cvt(rc as isize).map(drop)
    }
}
