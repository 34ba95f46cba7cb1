//! The io_uring engine, in two parts.
//!
//! [`UringEngine`] serves blocking callers: each calling thread owns a small ring, created on
//! first use, and waits for its own completion. One `io_uring_enter` carries the submission
//! and the wait; flush is an `IORING_FSYNC_DATASYNC` fsync, hole punching and zeroing are
//! ring `fallocate`s.
//!
//! [`AsyncRing`] serves async callers (a frontend's or the Primary's aligned reads, writes
//! and flushes under `O_DIRECT`): one ring per device, shared by every task, whose
//! completions a tokio task (the reaper) reaps when the ring's eventfd fires. A request
//! then waits for the disk on the runtime itself, with no hand-off to a blocking thread and
//! back. FUA is `RWF_DSYNC` on the write.
//!
//! Submissions are batched, because on a virtual disk each `io_uring_enter` that issues I/O
//! costs a device notification (a VM exit), while one enter carrying several entries is
//! plugged into one:
//! - nearly idle disk (at most [`LOW_WATER`] operations in the kernel): the caller enters
//!   at once (queue depth 1 pays no extra latency, and a burst's first entries keep the
//!   disk busy while the rest of it is still being read from the client);
//! - busy disk (more than that): the entry is queued and the reaper submits the whole
//!   queue, usually once the task that queued it has finished its poll (so a burst that
//!   one task queues goes in one enter or two);
//! - a thread already in `io_uring_enter` (made without the lock) submits whatever was
//!   queued meanwhile in its next enter, so nobody else waits for it.
//!
//! The submitting thread also hands out the completions its enter posted (COOP_TASKRUN runs
//! them there), and the reaper never reads the eventfd's counter (the reactor watches it
//! edge-triggered), which saves a system call per wake-up.
//!
//! Falling back, never failing: the probe at open records which opcodes the kernel has
//! (`register_probe`). An operation whose opcode is missing, or whose ring cannot be set up
//! (EMFILE, memory limits, seccomp), runs on the thread-pool engine instead, with one warning
//! per process. An async caller that the shared ring declines gets `None`/an error it turns
//! into the blocking path; it never sees an I/O error the disk did not report.
//!
//! Buffer invariant: memory the kernel may write or read for an operation (the buffer and
//! the descriptor, kept in [`Pending`]) is freed only after that operation's completion was
//! reaped. When the ring fails in a way that leaves completions unreapable, the memory is
//! leaked instead. An entry that never reached the kernel (the `io_uring_enter` that should
//! carry it failed) is taken back and the ring is marked dead: no later `io_uring_enter`
//! may submit it, so its buffer is free to go. Its waiter gets [`NOT_STARTED`] with its
//! buffers and runs the operation on the thread-pool engine, or, when it is the thread
//! whose enter failed, is declined at once.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::io::RawFd;
use std::sync::{Arc, Mutex, MutexGuard, Once, OnceLock};

use bytes::Bytes;
use io_uring::{opcode, squeue, types, IoUring, Probe};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::{oneshot, Notify};

use super::aligned::Uninit;
use super::block_lock::BlockGuard;
use super::engine::{cvt, Engine, IoEngine};
use super::engine_sync::SyncEngine;

/// The result a waiter gets when its entry never reached the kernel: the `io_uring_enter`
/// that was to carry it (another thread's) failed. The caller runs the operation on the
/// thread-pool engine with the buffers it got back.
pub(crate) const NOT_STARTED: i32 = i32::MIN;

/// Entries per thread ring: each thread has at most one request in flight.
const RING_ENTRIES: u32 = 4;

/// `io_uring_enter` flag: wait for completions.
const ENTER_GETEVENTS: u32 = 1;

thread_local! {
    static RING: RefCell<Option<IoUring>> = const { RefCell::new(None) };
}

/// The opcodes this engine uses, as the kernel reported them when it was probed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Opcodes {
    pub read: bool,
    pub write: bool,
    pub fsync: bool,
    pub fallocate: bool,
}

/// io_uring with one ring per thread, for the opcodes the kernel has.
#[derive(Debug)]
pub(crate) struct UringEngine {
    ops: Opcodes,
}

/// Environment switch for tests: when set, every ring created after the probe fails to set
/// up (as with EMFILE), so the fallback to the thread-pool engine can be exercised.
pub const FAULT_RING_SETUP_ENV: &str = "TANDEM_FAULT_IO_URING_SETUP";

fn setup_refused_by_env() -> bool {
    static FAULT: OnceLock<bool> = OnceLock::new();
    *FAULT.get_or_init(|| std::env::var_os(FAULT_RING_SETUP_ENV).is_some())
}

#[cfg(test)]
thread_local! {
    /// Unit tests refuse ring setup on their own thread only.
    pub(crate) static REFUSE_SETUP: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Unit tests make `io_uring_enter` on a shared ring fail, on their own thread only.
    pub(crate) static REFUSE_SUBMIT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Unit tests defer every submission made while anything is in the kernel (a
    /// [`LOW_WATER`] of 0), on their own thread only.
    pub(crate) static DEFER_WHEN_BUSY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Create a ring for I/O (not the probe's).
fn new_ring(entries: u32) -> io::Result<IoUring> {
    #[cfg(test)]
    if REFUSE_SETUP.with(|r| r.get()) {
        return Err(io::Error::from_raw_os_error(libc::EMFILE));
    }
    if setup_refused_by_env() {
        return Err(io::Error::from_raw_os_error(libc::EMFILE));
    }
    // Completions are posted when the submitting thread next enters the kernel (or wakes),
    // without an inter-processor interrupt per completion (Linux 5.19+; older kernels
    // refuse the flag with EINVAL and get a plain ring).
    match IoUring::builder().setup_coop_taskrun().build(entries) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => IoUring::new(entries),
        ring => ring,
    }
}

/// Log, once per process, that an io_uring operation ran on the thread-pool engine.
fn warn_fallback(what: &str, error: &dyn std::fmt::Display) {
    static WARNED: Once = Once::new();
    WARNED.call_once(|| {
        tracing::warn!(%error, "{what}; such operations use the thread-pool engine instead");
    });
}

impl UringEngine {
    /// Check that rings can be created and used here (seccomp and containers may refuse)
    /// and which of our opcodes the kernel has.
    pub(crate) fn probe() -> io::Result<UringEngine> {
        let mut ring = IoUring::new(RING_ENTRIES)?;
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        let ops = Opcodes {
            read: probe.is_supported(opcode::Read::CODE),
            write: probe.is_supported(opcode::Write::CODE),
            fsync: probe.is_supported(opcode::Fsync::CODE),
            fallocate: probe.is_supported(opcode::Fallocate::CODE),
        };
        submit_and_reap(&mut ring, opcode::Nop::new().build())?
            .map_err(|e| io::Error::new(e.kind(), format!("io_uring no-op failed: {e}")))?;
        Ok(UringEngine { ops })
    }

    /// The engine for a kernel with `ops`.
    pub(crate) fn new(ops: Opcodes) -> UringEngine {
        UringEngine { ops }
    }

    /// The opcodes the kernel has.
    pub(crate) fn opcodes(&self) -> Opcodes {
        self.ops
    }
}

/// Submit one operation on this thread's ring and wait for its result. `Err` means no ring
/// could carry it and it was not started: the caller runs it on the thread-pool engine.
fn run(entry: squeue::Entry) -> Result<io::Result<u32>, io::Error> {
    RING.with(|cell| {
        let mut slot = cell.borrow_mut();
        let ring = match slot.as_mut() {
            Some(ring) => ring,
            None => slot.insert(new_ring(RING_ENTRIES)?),
        };
        let outcome = submit_and_reap(ring, entry);
        if outcome.is_err() {
            // The entry never reached the kernel (see `submit_and_reap`); never reuse a ring
            // that failed.
            *slot = None;
        }
        outcome
    })
}

/// `Ok(Err(_))` is the operation's own failure; `Err(_)` means the ring refused the entry
/// before the kernel took it, so nothing of it is in flight. Once the kernel has the entry,
/// this returns only with its completion (the caller's buffers are in use until then).
fn submit_and_reap(ring: &mut IoUring, entry: squeue::Entry) -> io::Result<io::Result<u32>> {
    // SAFETY: every buffer the entry points to is kept alive by our caller until this
    // function has reaped the completion (it waits for it below).
    unsafe { ring.submission().push(&entry.user_data(1)) }
        .map_err(|_| io::Error::other("io_uring submission queue is full"))?;
    loop {
        let queued = !ring.submission().is_empty();
        let entered = if queued {
            ring.submit_and_wait(1)
        } else {
            // SAFETY: no argument pointer; waits for a completion without submitting.
            unsafe {
                ring.submitter()
                    .enter::<libc::sigset_t>(0, 1, ENTER_GETEVENTS, None)
            }
        };
        match entered {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if queued && !ring.submission().is_empty() => return Err(e),
            Err(e) => {
                // In flight but the wait failed: the kernel may still write our caller's
                // buffer, so keep waiting.
                tracing::warn!(error = %e, "waiting for an io_uring completion failed; retrying");
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
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

/// The result of `entry` on this thread's ring, or of `fallback` when no ring can carry it.
fn run_or(entry: squeue::Entry, fallback: impl FnOnce() -> io::Result<u32>) -> io::Result<u32> {
    match run(entry) {
        Ok(result) => result,
        Err(e) => {
            warn_fallback("an io_uring ring could not be set up", &e);
            fallback()
        }
    }
}

impl Engine for UringEngine {
    fn kind(&self) -> IoEngine {
        IoEngine::IoUring
    }

    fn ring_opcodes(&self) -> Option<Opcodes> {
        Some(self.ops)
    }

    unsafe fn pread(&self, fd: RawFd, ptr: *mut u8, len: usize, offset: u64) -> io::Result<usize> {
        let len = clamp(len);
        // SAFETY: the caller vouches for `ptr`, for both paths.
        let sync = || unsafe { SyncEngine.pread(fd, ptr, len as usize, offset) }.map(|n| n as u32);
        if !self.ops.read {
            return sync().map(|n| n as usize);
        }
        let entry = opcode::Read::new(types::Fd(fd), ptr, len)
            .offset(offset)
            .build();
        run_or(entry, sync).map(|n| n as usize)
    }

    /// `pwritev2` on the calling thread, not the ring: a blocking caller is already off the
    /// runtime, and a write on its own ring would wait the same. Async callers write through
    /// [`AsyncRing`].
    fn pwrite(&self, fd: RawFd, buf: &[u8], offset: u64, dsync: bool) -> io::Result<usize> {
        SyncEngine.pwrite(fd, buf, offset, dsync)
    }

    fn fdatasync(&self, fd: RawFd) -> io::Result<()> {
        if !self.ops.fsync {
            return SyncEngine.fdatasync(fd);
        }
        let entry = opcode::Fsync::new(types::Fd(fd))
            .flags(types::FsyncFlags::DATASYNC)
            .build();
        run_or(entry, || SyncEngine.fdatasync(fd).map(|()| 0)).map(drop)
    }

    fn fallocate(&self, fd: RawFd, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        if !self.ops.fallocate {
            return SyncEngine.fallocate(fd, mode, offset, len);
        }
        let entry = opcode::Fallocate::new(types::Fd(fd), len)
            .offset(offset)
            .mode(mode)
            .build();
        run_or(entry, || {
            SyncEngine.fallocate(fd, mode, offset, len).map(|()| 0)
        })
        .map(drop)
    }
}

/// What an in-flight ring operation points into; kept alive until its completion is reaped,
/// even when the waiting future was dropped.
pub(crate) enum Keep {
    /// The buffer a read fills.
    Read(Uninit),
    /// The bytes a write sends (aligned memory), and its hold on their blocks.
    Write(Bytes, BlockGuard),
    /// A flush points at no memory.
    Nothing,
}

struct Pending {
    tx: oneshot::Sender<(i32, Keep)>,
    keep: Keep,
    /// The descriptor stays open while the operation may run.
    _file: Arc<File>,
}

struct AsyncState {
    ring: IoUring,
    /// In-flight operations by `user_data`.
    slots: Vec<Option<Pending>>,
    free: Vec<usize>,
    in_flight: usize,
    /// No more `io_uring_enter` that submits: the reaper is gone, or a submission failed and
    /// an entry the kernel never took may still sit in the submission queue.
    dead: bool,
    /// Slots whose entries are in the submission queue but not yet taken by the kernel, in
    /// queue order.
    queued: VecDeque<usize>,
    /// A thread is in (or about to make) the `io_uring_enter` that submits `queued`; others
    /// only queue their entries, which it submits next, in one system call.
    entering: bool,
    /// The reaper will submit `queued` (a deferred enter is pending).
    flush_scheduled: bool,
}

impl AsyncState {
    /// Hand every posted completion to its waiter, one at a time (no allocation).
    fn reap(&mut self) {
        loop {
            let next = self.ring.completion().next();
            let Some((idx, res)) = next.map(|cqe| (cqe.user_data(), cqe.result())) else {
                return;
            };
            if let Some(pending) = self.release(idx as usize) {
                // The waiter may be gone; the buffers are dropped here, after the kernel is
                // done with them.
                let _ = pending.tx.send((res, pending.keep));
            }
        }
    }

    /// Hand every queued entry back to its waiter as [`NOT_STARTED`]: the ring is dead and
    /// no `io_uring_enter` will submit them, so their buffers are free. Only the entering
    /// thread, or anyone once nobody is entering, may call this.
    fn fail_queued(&mut self) {
        while let Some(idx) = self.queued.pop_front() {
            if let Some(pending) = self.release(idx) {
                let _ = pending.tx.send((NOT_STARTED, pending.keep));
            }
        }
    }

    fn release(&mut self, idx: usize) -> Option<Pending> {
        let pending = self.slots.get_mut(idx).and_then(Option::take)?;
        self.in_flight -= 1;
        self.free.push(idx);
        Some(pending)
    }
}

/// A ring shared by a device's async callers: submissions from any task, completions
/// reaped by one tokio task woken through an eventfd, so a request waits for the disk
/// without a thread hand-off.
pub(crate) struct AsyncRing {
    state: Mutex<AsyncState>,
    /// The ring's descriptor, for the `io_uring_enter` made without the lock.
    ring_fd: RawFd,
    shutdown: Notify,
    /// Asks the reaper for a deferred submission (`flush_scheduled`).
    flush: Notify,
    ops: Opcodes,
}

impl std::fmt::Debug for AsyncRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncRing")
            .field("in_flight", &self.lock().in_flight)
            .finish()
    }
}

/// A disk with at most this many operations in the kernel is about to run dry: a new entry
/// goes in at once instead of waiting for the reaper's deferred enter (while, on an
/// NBD connection, the reader is still taking the rest of the burst off the socket).
/// Measured with `nbd_vs_qemu_nbd --only qd32`, builds alternated round by round: our
/// 4 KiB IOPS at QD32 rose in 16 of 18 rounds for writes (mean 30.6k and 28.8k before,
/// 35.6k and 31.5k after, two sets) and in 8 of 8 for reads (45.2k before, 50.5k after),
/// at about the same CPU per request. Before, any entry in the kernel deferred the next
/// (this constant was 0).
const LOW_WATER: usize = 4;

fn low_water() -> usize {
    #[cfg(test)]
    if DEFER_WHEN_BUSY.with(|d| d.get()) {
        return 0;
    }
    LOW_WATER
}

/// Entries of a shared ring: the most operations in flight across all of a device's async
/// callers. Beyond it callers take the blocking path, so the completion queue (twice this
/// size) never overflows.
const ASYNC_RING_ENTRIES: u32 = 256;

impl AsyncRing {
    /// A ring whose reaper runs on the current tokio runtime; `None` outside one.
    pub(crate) fn start(ops: Opcodes) -> io::Result<Option<Arc<AsyncRing>>> {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return Ok(None);
        };
        let ring = new_ring(ASYNC_RING_ENTRIES)?;
        // SAFETY: eventfd has no memory arguments; we own the returned descriptor.
        let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let eventfd = unsafe { OwnedFd::from_raw_fd(raw) };
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        let this = Arc::new(AsyncRing {
            ring_fd: ring.as_raw_fd(),
            state: Mutex::new(AsyncState {
                ring,
                slots: Vec::new(),
                free: Vec::new(),
                in_flight: 0,
                dead: false,
                queued: VecDeque::new(),
                entering: false,
                flush_scheduled: false,
            }),
            flush: Notify::new(),
            shutdown: Notify::new(),
            ops,
        });
        let eventfd = {
            let _enter = handle.enter();
            // SAFETY: the AsyncFd owns the descriptor, which stays open until it is dropped.
            unsafe { AsyncFd::register_with_interest(eventfd, Interest::READABLE) }?
        };
        handle.spawn(reap(Arc::clone(&this), eventfd));
        Ok(Some(this))
    }

    /// The opcodes the kernel has.
    pub(crate) fn opcodes(&self) -> Opcodes {
        self.ops
    }

    fn lock(&self) -> MutexGuard<'_, AsyncState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Submit `entry`, whose buffers live in `keep`; the receiver gets the result and
    /// `keep` back. On `Err` the operation was not started and `keep` is dropped: the caller
    /// takes the blocking path. The receiver always gets its result, unless the ring broke
    /// with the operation in the kernel, when the sender is leaked with the buffers and the
    /// waiter hangs rather than see freed memory reused. The result is [`NOT_STARTED`] when
    /// another thread's `io_uring_enter`, which was to carry the entry, failed.
    ///
    /// Batching (see the module doc): the entry is queued, and the caller enters the kernel
    /// itself only when at most [`LOW_WATER`] entries are in the kernel, no other thread is
    /// entering and no deferred enter is scheduled; otherwise the entering thread or the
    /// reaper's deferred enter carries it along with the others queued meanwhile, in one
    /// system call (and one device notification).
    pub(crate) fn submit(
        &self,
        entry: squeue::Entry,
        keep: Keep,
        file: Arc<File>,
    ) -> io::Result<oneshot::Receiver<(i32, Keep)>> {
        let mut st = self.lock();
        if st.dead {
            return Err(io::Error::other("the shared io_uring is closed"));
        }
        if st.in_flight >= ASYNC_RING_ENTRIES as usize {
            return Err(io::Error::other("the shared io_uring is full"));
        }
        let (tx, rx) = oneshot::channel();
        let idx = match st.free.pop() {
            Some(idx) => idx,
            None => {
                st.slots.push(None);
                st.slots.len() - 1
            }
        };
        st.slots[idx] = Some(Pending {
            tx,
            keep,
            _file: file,
        });
        st.in_flight += 1;
        let entry = entry.user_data(idx as u64);
        // SAFETY: the buffers the entry points to are owned by the slot above and stay alive
        // until the completion is reaped (or, never submitted, until `fail_queued`). The
        // queue has room: queued and in-kernel entries together are at most
        // ASYNC_RING_ENTRIES, the queue's size.
        if unsafe { st.ring.submission().push(&entry) }.is_err() {
            st.release(idx);
            return Err(io::Error::other("io_uring submission queue is full"));
        }
        // More than LOW_WATER entries in the kernel before this one: the disk is busy, so
        // ours can wait for the rest of this task's burst and go in one enter with it.
        // Saturating: between an enter and its taking the entries off `queued`, the reaper
        // may already have reaped some of them.
        let in_kernel = (st.in_flight - 1).saturating_sub(st.queued.len());
        let busy = in_kernel > low_water();
        st.queued.push_back(idx);
        if st.entering || st.flush_scheduled {
            return Ok(rx);
        }
        if busy {
            st.flush_scheduled = true;
            drop(st);
            self.flush.notify_one();
            return Ok(rx);
        }
        match self.enter_queued(st, Some(idx)) {
            Ok(()) => Ok(rx),
            Err(e) => Err(e),
        }
    }

    /// Submit every queued entry, as the entering thread (returns at once if another
    /// thread is entering). `Err` only when `own`'s entry was declined because an enter
    /// failed: the ring is then dead and the other entries that missed the kernel are
    /// handed back as [`NOT_STARTED`].
    fn enter_queued<'a>(
        &'a self,
        mut st: MutexGuard<'a, AsyncState>,
        own: Option<usize>,
    ) -> io::Result<()> {
        if st.entering {
            return Ok(());
        }
        st.entering = true;
        let failure = loop {
            let count = st.queued.len();
            if count == 0 {
                break None;
            }
            if st.dead {
                break Some(io::Error::other("the shared io_uring is closed"));
            }
            drop(st);
            let entered = self.enter(count);
            st = self.lock();
            match entered {
                Ok(0) => break Some(io::Error::other("io_uring took no entry")),
                Ok(taken) => {
                    let taken = taken.min(st.queued.len());
                    st.queued.drain(..taken);
                    // The enter ran this thread's pending completion work (COOP_TASKRUN):
                    // hand out what it posted now rather than after a reaper wake-up.
                    st.reap();
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Some(e),
            }
        };
        st.entering = false;
        let Some(failure) = failure else {
            return Ok(());
        };
        // What the kernel did not take, nothing will submit now: the ring is dead, so those
        // buffers can go. Operations already in the kernel still complete. Our own entry, if
        // among them, is declined here; the others' waiters run theirs on the blocking path.
        st.dead = true;
        let declined = own.filter(|idx| st.queued.contains(idx));
        if let Some(idx) = declined {
            st.queued.retain(|&q| q != idx);
            st.release(idx);
        }
        st.fail_queued();
        warn_fallback("submitting to a shared io_uring failed", &failure);
        match declined {
            Some(_) => Err(failure),
            None => Ok(()),
        }
    }

    /// The reaper's deferred submission: submit everything queued in one enter. The reaper
    /// usually runs it once the task that asked for it has finished its poll (woken from a
    /// worker, it is that worker's next task), so that task's burst goes in one enter; when
    /// the task wakes another task after it, or the reaper is already running, part of the
    /// burst goes in a second enter. It does not yield first to wait for other tasks: a
    /// yielding task wakes an idle worker (a `futex` call, and its sleep again), which
    /// cost more than the entries it gathered.
    fn flush_deferred(&self) {
        let mut st = self.lock();
        st.flush_scheduled = false;
        // Nothing of ours to decline: a failure hands every entry back as NOT_STARTED.
        let _ = self.enter_queued(st, None);
    }

    /// Tests: pretend another thread is entering (`true`), so submissions only queue.
    #[cfg(test)]
    pub(crate) fn hold_submissions(&self, hold: bool) {
        self.lock().entering = hold;
    }

    /// `io_uring_enter` submitting `count` queued entries, made without the lock so other
    /// threads can queue theirs meanwhile (the kernel reads the queue's tail atomically).
    fn enter(&self, count: usize) -> io::Result<usize> {
        #[cfg(test)]
        if REFUSE_SUBMIT.with(|r| r.get()) {
            return Err(io::Error::from_raw_os_error(libc::EBUSY));
        }
        let count = u32::try_from(count).unwrap_or(u32::MAX);
        // SAFETY: io_uring_enter on our ring's descriptor with no argument pointer.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_io_uring_enter,
                self.ring_fd,
                count,
                0u32,
                0u32,
                std::ptr::null::<libc::c_void>(),
                0usize,
            )
        };
        cvt(rc as isize)
    }

    /// Hand every completion to its waiter.
    fn reap_completions(&self) {
        self.lock().reap();
    }

    /// Mark the ring dead and wait until every operation in the kernel completed,
    /// submitting nothing, so no buffer is freed while the kernel may still use it. Entries
    /// still queued are handed back as [`NOT_STARTED`]. If waiting fails, leak what is left.
    fn drain_blocking(&self) {
        let mut failures = 0;
        loop {
            let mut st = self.lock();
            st.dead = true;
            if st.entering {
                // The entering thread sees `dead` when it is back and declines the rest.
                drop(st);
                std::thread::yield_now();
                continue;
            }
            st.fail_queued();
            st.reap();
            if st.in_flight == 0 {
                return;
            }
            // SAFETY: no argument pointer; waits for completions without submitting.
            let waited = unsafe {
                st.ring
                    .submitter()
                    .enter::<libc::sigset_t>(0, 1, ENTER_GETEVENTS, None)
            };
            drop(st);
            match waited {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    failures += 1;
                    if failures > 100 {
                        tracing::error!(error = %e, "cannot wait for io_uring completions; leaking their buffers");
                        self.leak_in_flight();
                        return;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            }
        }
    }

    /// Forget every in-flight operation without freeing its memory.
    fn leak_in_flight(&self) {
        let mut st = self.lock();
        st.dead = true;
        for slot in st.slots.iter_mut() {
            if let Some(pending) = slot.take() {
                std::mem::forget(pending);
            }
        }
        st.in_flight = 0;
    }

    /// Stop the reaper once nothing is in flight (the device is closing).
    pub(crate) fn close(&self) {
        self.shutdown.notify_one();
    }
}

impl Drop for AsyncRing {
    /// Normally the reaper drained the ring before the last reference went; this covers a
    /// reaper that never ran (its runtime shut down first).
    fn drop(&mut self) {
        self.drain_blocking();
    }
}

/// Marks the ring dead and drains it when the reaper ends, also when its runtime drops it.
struct ReaperExit(Arc<AsyncRing>);

impl Drop for ReaperExit {
    fn drop(&mut self) {
        self.0.drain_blocking();
    }
}

async fn reap(ring: Arc<AsyncRing>, eventfd: AsyncFd<OwnedFd>) {
    let exit = ReaperExit(ring);
    let ring = &exit.0;
    let mut closing = false;
    loop {
        if closing && ring.lock().in_flight == 0 {
            return;
        }
        tokio::select! {
            ready = eventfd.readable() => {
                let Ok(mut guard) = ready else { return };
                // The reactor watches the eventfd edge-triggered and every posted completion
                // signals it again, so its counter is never read (a system call per wake-up
                // saved). Readiness is cleared before reaping: a completion posted during the
                // reap wakes us once more.
                guard.clear_ready();
                ring.reap_completions();
            }
            _ = ring.flush.notified() => ring.flush_deferred(),
            _ = ring.shutdown.notified(), if !closing => closing = true,
        }
    }
}
