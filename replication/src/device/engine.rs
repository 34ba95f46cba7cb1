//! The I/O engine under [`super::FileDevice`]: which system calls move the bytes.
//!
//! ```text
//! Engine (trait: pread, pwrite (+RWF_DSYNC for FUA), fdatasync, fallocate)
//!   ├── UringEngine   io_uring, one small ring per calling thread   (engine_uring.rs)
//!   └── SyncEngine    pread/pwritev2/fdatasync on the calling thread (engine_sync.rs)
//! ```
//!
//! Blocking device calls run on the caller's thread (tokio's blocking pool) with either
//! engine. With io_uring, their reads, flushes, hole punching and zeroing are ring
//! operations and their writes `pwritev2` (`RWF_DSYNC` for FUA); a device's async aligned
//! reads, writes and flushes share one ring awaited on the runtime (`AsyncRing`). `Auto`
//! picks io_uring when a probe ring works and falls back to [`SyncEngine`] where io_uring is
//! unavailable or refused (seccomp, containers, `kernel.io_uring_disabled`), with a warning;
//! a ring that later fails to set up, or an opcode the kernel lacks, sends that one
//! operation to [`SyncEngine`] too (see `engine_uring.rs`). `ThreadPool` forces the fallback
//! (pool key `io_engine = "thread-pool"`).

use std::fmt;
use std::io;
use std::os::unix::io::RawFd;
use std::str::FromStr;
use std::sync::{Arc, OnceLock};

use super::engine_sync::SyncEngine;
use super::engine_uring::{Opcodes, UringEngine};

/// The engine a device uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoEngine {
    /// io_uring.
    IoUring,
    /// Plain system calls on the calling thread.
    ThreadPool,
}

impl fmt::Display for IoEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IoEngine::IoUring => "io_uring",
            IoEngine::ThreadPool => "thread-pool",
        })
    }
}

/// Which engine to use, as configured (`io_engine` pool key).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EngineChoice {
    /// io_uring when it works here, else the thread pool.
    #[default]
    Auto,
    /// io_uring or fail to open.
    #[serde(rename = "io_uring")]
    IoUring,
    /// The thread-pool engine, always.
    ThreadPool,
}

impl FromStr for EngineChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(EngineChoice::Auto),
            "io_uring" => Ok(EngineChoice::IoUring),
            "thread-pool" => Ok(EngineChoice::ThreadPool),
            other => Err(format!(
                "unknown I/O engine '{other}' (expected 'auto', 'io_uring' or 'thread-pool')"
            )),
        }
    }
}

impl fmt::Display for EngineChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EngineChoice::Auto => "auto",
            EngineChoice::IoUring => "io_uring",
            EngineChoice::ThreadPool => "thread-pool",
        })
    }
}

/// The system calls a [`super::FileDevice`] needs. Each call may move fewer bytes than
/// asked (end of file, signals); the device loops.
pub(crate) trait Engine: Send + Sync + fmt::Debug {
    /// Which engine this is.
    fn kind(&self) -> IoEngine;
    /// Read up to `len` bytes at `offset` into `ptr`; returns the count (0 at end of file).
    ///
    /// # Safety
    /// `ptr` is valid for writes of `len` bytes for the whole call.
    unsafe fn pread(&self, fd: RawFd, ptr: *mut u8, len: usize, offset: u64) -> io::Result<usize>;
    /// Write up to `buf.len()` bytes at `offset`; with `dsync` they are durable on return.
    fn pwrite(&self, fd: RawFd, buf: &[u8], offset: u64, dsync: bool) -> io::Result<usize>;
    /// Make completed writes durable.
    fn fdatasync(&self, fd: RawFd) -> io::Result<()>;
    /// `fallocate(2)` with `mode`.
    fn fallocate(&self, fd: RawFd, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()>;
    /// The io_uring opcodes the kernel has, for an engine that uses io_uring.
    fn ring_opcodes(&self) -> Option<Opcodes> {
        None
    }
}

/// Whether io_uring works in this process, and with which opcodes (probed once: a ring, its
/// opcode probe and a no-op).
fn uring_works() -> &'static Result<Opcodes, String> {
    static PROBE: OnceLock<Result<Opcodes, String>> = OnceLock::new();
    PROBE.get_or_init(|| {
        let ops = UringEngine::probe().map(|e| e.opcodes());
        if let Ok(ops) = &ops {
            tracing::debug!(?ops, "io_uring opcodes");
        }
        ops.map_err(|e| e.to_string())
    })
}

/// The engine for `choice`. Fails only when io_uring is demanded and does not work.
pub(crate) fn select(choice: EngineChoice) -> io::Result<Arc<dyn Engine>> {
    match choice {
        EngineChoice::ThreadPool => Ok(Arc::new(SyncEngine)),
        EngineChoice::IoUring => match uring_works() {
            Ok(ops) => Ok(Arc::new(UringEngine::new(*ops))),
            Err(e) => Err(io::Error::other(format!("io_uring is not available: {e}"))),
        },
        EngineChoice::Auto => match uring_works() {
            Ok(ops) => Ok(Arc::new(UringEngine::new(*ops))),
            Err(e) => {
                static WARNED: OnceLock<()> = OnceLock::new();
                WARNED.get_or_init(|| {
                    tracing::warn!(error = %e, "io_uring is not available; backing I/O uses the thread-pool engine");
                });
                Ok(Arc::new(SyncEngine))
            }
        },
    }
}

/// Turn a system call's `-1`/errno into an `io::Result` of the count.
pub(crate) fn cvt(rc: isize) -> io::Result<usize> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc as usize)
    }
}
