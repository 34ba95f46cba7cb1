//! Bitmap-driven resync (plain and checksum-based) from a SyncSource to a SyncTarget over
//! an established peer link (ref `drbd.md` §3). Online verify lives in [`crate::verify`]
//! and shares this module's session machinery.
//!
//! ```text
//!  source (run_resync_source)                               target (datapath::run_secondary)
//!   for each dirty run of the peer's bitmap, chunk <= cfg.chunk_bytes, in block order:
//!    rate.acquire(len)
//!    lock_range(off,len)   (Primary only: waits for overlapping app writes, holds them off)
//!    read local [off,len)
//!    plain:     Data{id,off,bytes} ------------------------> ordered item: write, hook.written
//!               (Zeroes{id,off,len} if it reads as zeroes)   (zero, may unmap)
//!               <----------------------------------------- DataAck{id}
//!    checksums: Digest{id,off,len,sha256/4KiB} ------------> ordered item: read, compare
//!               <----------------------------------------- DigestReply{id, differing mask}
//!               Data{..} for each differing run only ------> (as above)
//!    clear the chunk's bits, unlock
//!   until the bitmap is clean (another pass if bits were set meanwhile)
//!   persist the bitmap (hook)
//!   Done{sent,skipped} ----------------------------------> ordered item: flush device,
//!   <---------------------------------------------------- hook.finished (engine: UUIDs), DoneAck
//! ```
//!
//! **Resumable by construction.** Bits are cleared only after the target acknowledged the
//! write of the chunk (and, in checksum mode, the compare). The target acknowledges resync
//! data only once it is durable (`write_at_durable`; zeroes are flushed), so a bit cleared
//! here never describes data the target could still lose in a crash — the target may
//! crash and the source stay up, with its in-memory bitmap as the only record. (DRBD keeps
//! resync writes volatile and relies on its own bitmap handling; one data sync per chunk
//! is our simpler price, small at 1 MiB chunks.) The bitmap is persisted
//! through [`ResyncBitmap::persist`] every [`ResyncConfig::persist_interval`] and at the end.
//! A resync that is cut off (link down, error) returns an error; what it did not finish is
//! still in the bitmap, and the next resync sends only that. Persisting late is harmless: a
//! bit that is still set on disk means a block sent twice, never a block missed.
//!
//! **Concurrent application writes (source = the Primary).** The danger is a chunk read
//! on the source *before* an application write W to the same blocks but applied on the
//! target *after* W: the target would silently go back to the old data while the bitmap
//! says "in sync". Two rules exclude it:
//! 1. On the source, read + send + wait-for-the-answer + clear-bits of a chunk happen under
//!    [`crate::datapath::Primary::lock_range`], the same range gate application requests
//!    use. An overlapping W either completed before the lock was granted (its data is in
//!    what the chunk reads), or starts after the target answered (so it reaches the target
//!    after the chunk was applied). Under protocol C a request holds its range until every
//!    peer wrote it, exactly like the chunk does.
//! 2. On the target, resync data and digests are ordered items of the Secondary's apply
//!    pipeline (`datapath::run_secondary`), queued in link order with the writes and
//!    subject to the same epoch barriers. Under protocols A and B, W may have completed on
//!    the Primary (releasing its range) while it still waits in the target's queue; the
//!    Primary closes W's epoch when W completes, before releasing its range, so a chunk
//!    sent afterwards is in a later epoch and is applied only after W. (A separate
//!    Extension channel would lose exactly this order.)
//!
//! Application writes reaching the target during the resync are applied normally; blocks
//! they fully cover are resynced anyway later (same data, harmless). Bits set for the
//! target during the resync (a peer write failed) are picked up by another pass.
//!
//! **Source is not the Primary** ([`SourceIo::Device`], e.g. a Secondary resyncing a third
//! node, or no Primary at all): nothing is written locally by applications, so no lock is
//! needed. Obligation of the engine: while a Primary replicates to both, a resync between
//! two Secondaries is NOT safe (the source could read a block before the Primary's write
//! reaches it and deliver the old data to the target after the Primary's write did). When
//! a Primary is connected to the target, the engine resyncs the target from the Primary;
//! a Secondary-to-Secondary resync runs only while there is no Primary.
//!
//! **Checksum resync** ([`ResyncConfig::checksums`]): per 4 KiB block sha256 (collision-safe;
//! crc32c would make "equal" a guess). Both sides read every dirty block, only differing
//! blocks cross the link. The outcome counts sent and skipped bytes.
//!
//! **Rate control**: see [`rate`]. Default max 100 MiB/s (DRBD's `c-max-rate` default),
//! reduced by the application's write rate down to the min (default 10 MiB/s, above DRBD's
//! 250 KiB/s so a multi-GiB resync ends in minutes, not hours). On a 1 GbE replication link
//! lower the max to about 30% of the link (DRBD's advice).
//!
//! **What the engine does around a resync** (DRBD semantics, `generation`/`sync_decision`):
//! - before: the handshake decided `BitmapResync`/`FullSync`; the two sides exchanged and
//!   merged bitmaps (full sync: [`crate::bitmap::Bitmap::set_all`]); the target is
//!   Inconsistent (persisted) and runs `run_secondary` on the link with
//!   [`crate::datapath::SecondaryConfig::resync_target`] set; on a Primary source the link
//!   is attached (`Primary::attach_peer`) so application writes flow during the resync, and
//!   resync replies (types [`proto::TYPE_FIRST`]..=[`proto::TYPE_LAST`]) arriving on the
//!   extension sink are forwarded into [`PeerChannel::replies`].
//! - target, [`ResyncTarget::written`]: set the written range in the bitmaps of every peer
//!   other than the source (in memory; persisted before `finished` returns).
//! - target, [`ResyncTarget::finished`]: the resynced data is already flushed; persist those
//!   bitmaps, `UuidSet::finish_resync_as_target(local, source, source_uuids, peers)` with an
//!   *empty* peers list only if no resync write happened in the whole SyncTarget episode
//!   (including interrupted earlier attempts; when unsure pass all peers), write the
//!   superblock, then report UpToDate.
//! - source, on `Ok(outcome)`: `UuidSet::finish_resync_as_source(target)`, persist the
//!   superblock (the bitmap was persisted already). On `Err`: keep the bitmap (the next
//!   connect resumes), report the error.
//! - progress for `status`: [`ResyncProgress::snapshot`].
//! - one session (resync or verify) per link at a time: request ids are per session, and a
//!   reply nobody waits for is a protocol error that closes the link. Replies must reach
//!   the session that sent the request (a reply channel per running session).
//! - a resync that fails with [`ResyncError::LinkDown`] is resumed on the next connect by
//!   running it again with the same bitmap (plus the target's bits from the exchange).

pub mod proto;
pub mod rate;
mod session;
pub(crate) mod source;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::bitmap::Bitmap;
use crate::device::DeviceError;
use crate::link::LinkDown;

pub(crate) use session::Session;
pub use session::{PeerChannel, SourceIo};
pub use source::run_resync_source;

/// Tunables of resync and verify, per volume. Every default is a named function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResyncConfig {
    /// Upper bound of the resync/verify rate in bytes/s; 0 = unlimited.
    pub max_rate_bytes_per_sec: u64,
    /// The rate is not lowered below this in favour of application writes.
    pub min_rate_bytes_per_sec: u64,
    /// Reaction window of the rate controller (DRBD's `c-plan-ahead`): the application
    /// write rate is smoothed over this long before the resync rate follows it.
    pub plan_ahead: Duration,
    /// Compare per-block sha256 first and send only differing blocks.
    pub checksums: bool,
    /// Largest range handled as one unit (clamped to 4 KiB..=4 MiB, whole blocks).
    pub chunk_bytes: u64,
    /// Chunks in flight at once.
    pub max_inflight_chunks: usize,
    /// A peer that does not answer a chunk within this time fails the resync.
    pub reply_timeout: Duration,
    /// How often bitmap progress is persisted during a resync.
    pub persist_interval: Duration,
}

impl Default for ResyncConfig {
    fn default() -> Self {
        ResyncConfig {
            max_rate_bytes_per_sec: default_max_rate(),
            min_rate_bytes_per_sec: default_min_rate(),
            plan_ahead: rate::PLAN_AHEAD,
            checksums: false,
            chunk_bytes: default_chunk_bytes(),
            max_inflight_chunks: default_max_inflight_chunks(),
            reply_timeout: default_reply_timeout(),
            persist_interval: default_persist_interval(),
        }
    }
}

/// Default max rate: 100 MiB/s (DRBD's `c-max-rate`).
pub fn default_max_rate() -> u64 {
    100 << 20
}
/// Default min rate: 10 MiB/s.
pub fn default_min_rate() -> u64 {
    10 << 20
}
/// Default chunk: 1 MiB.
pub fn default_chunk_bytes() -> u64 {
    1 << 20
}
/// Default chunks in flight: 4.
pub fn default_max_inflight_chunks() -> usize {
    4
}
/// Default reply timeout: 60 s.
pub fn default_reply_timeout() -> Duration {
    Duration::from_secs(60)
}
/// Default persist interval: 1 s.
pub fn default_persist_interval() -> Duration {
    Duration::from_secs(1)
}

impl ResyncConfig {
    /// The rate controller's bounds.
    pub fn limits(&self) -> rate::Limits {
        rate::Limits {
            min: self.min_rate_bytes_per_sec,
            max: self.max_rate_bytes_per_sec,
            plan_ahead: self.plan_ahead,
        }
    }

    pub(crate) fn chunk(&self) -> u64 {
        let c = self
            .chunk_bytes
            .clamp(crate::bitmap::BLOCK_SIZE, proto::MAX_DIGEST_LEN);
        c / crate::bitmap::BLOCK_SIZE * crate::bitmap::BLOCK_SIZE
    }
}

/// Errors of resync and verify.
#[derive(Debug, thiserror::Error)]
pub enum ResyncError {
    #[error("the link to the peer went down during {op}")]
    LinkDown {
        op: &'static str,
        #[source]
        source: LinkDown,
    },
    #[error("the peer's resync replies stopped (reply channel closed) during {op}")]
    RepliesClosed { op: &'static str },
    #[error("the peer did not answer {op} at offset {offset} within {timeout:?}")]
    Timeout {
        op: &'static str,
        offset: u64,
        timeout: Duration,
    },
    #[error("local read of {len} bytes at offset {offset} failed")]
    LocalRead {
        offset: u64,
        len: u64,
        #[source]
        source: DeviceError,
    },
    #[error("local read task did not complete")]
    LocalTask(#[source] tokio::task::JoinError),
    #[error("claiming range {offset}+{len} on the Primary failed")]
    Lock {
        offset: u64,
        len: u64,
        #[source]
        source: crate::datapath::DatapathError,
    },
    #[error("the peer failed to write resync data at offset {offset} length {len}")]
    PeerWrite { offset: u64, len: u64 },
    #[error("the peer could not read offset {offset} length {len} to compare it")]
    PeerRead { offset: u64, len: u64 },
    #[error("the peer sent an invalid resync message")]
    Protocol(#[source] proto::ProtoError),
    #[error("the peer sent an unexpected resync message: {0}")]
    Unexpected(String),
    #[error("persisting resync progress failed: {0}")]
    Persist(String),
    #[error("the target could not finish the resync: {0}")]
    TargetFinish(String),
    #[error(
        "resync does not converge: {remaining_bytes} bytes still out of sync after {passes} passes"
    )]
    NotConverging { remaining_bytes: u64, passes: u32 },
}

/// The out-of-sync bitmap of the target, as the source's engine holds it.
pub trait ResyncBitmap: Send + Sync {
    /// Up to `max_runs` dirty runs starting at or after `offset`, each at most `max_len`
    /// bytes ([`Bitmap::runs_from`]).
    fn runs_from(&self, offset: u64, max_len: u64, max_runs: usize) -> Vec<(u64, u64)>;
    /// Out-of-sync bytes.
    fn dirty_bytes(&self) -> u64;
    /// The target acknowledged `[offset, offset+len)`: mark it in sync.
    fn clear(&self, offset: u64, len: u64);
    /// Verify found `[offset, offset+len)` differing: mark it out of sync.
    fn set(&self, offset: u64, len: u64);
    /// Persist the bitmap's changed pages (called on a blocking thread).
    fn persist(&self) -> Result<(), String>;
}

/// A bitmap held in memory only (tests, or an engine that persists elsewhere).
impl ResyncBitmap for Mutex<Bitmap> {
    fn runs_from(&self, offset: u64, max_len: u64, max_runs: usize) -> Vec<(u64, u64)> {
        lock(self)
            .runs_from(offset, max_len)
            .take(max_runs)
            .collect()
    }
    fn dirty_bytes(&self) -> u64 {
        lock(self).dirty_bytes()
    }
    fn clear(&self, offset: u64, len: u64) {
        // Ranges come from the bitmap's own runs or the device size: in range.
        let _ = lock(self).clear_range(offset, len);
    }
    fn set(&self, offset: u64, len: u64) {
        let _ = lock(self).set_range(offset, len);
    }
    fn persist(&self) -> Result<(), String> {
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the source tells the target at the end of a resync.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ResyncSummary {
    /// Bytes the source sent (data or zeroes) and the target wrote in this session.
    pub sent_bytes: u64,
    /// Bytes found equal by checksum and not sent.
    pub skipped_bytes: u64,
}

/// The engine's side of a resync on the target (called on blocking threads, in order).
pub trait ResyncTarget: Send + Sync {
    /// The resync wrote `[offset, offset+len)` on this replica (before it is acknowledged):
    /// set those bits in the bitmaps of every peer other than the source.
    fn written(&self, offset: u64, len: u64);
    /// The source finished; everything it sent is durable on this device. Persist, call
    /// `finish_resync_as_target`, write the superblock. An error is sent to the source,
    /// which then fails its side too.
    fn finished(&self, summary: &ResyncSummary) -> Result<(), String>;
}

/// A [`ResyncTarget`] for [`crate::datapath::SecondaryConfig`].
#[derive(Clone)]
pub struct ResyncTargetHooks(pub Arc<dyn ResyncTarget>);

impl std::fmt::Debug for ResyncTargetHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResyncTargetHooks")
    }
}

/// How a resync ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ResyncOutcome {
    /// Bytes that were out of sync when the resync started.
    pub total_bytes: u64,
    /// Bytes the target acknowledged (cleared from the bitmap).
    pub done_bytes: u64,
    /// Bytes written on the target (sent as data, or as Zeroes).
    pub sent_bytes: u64,
    /// Part of `sent_bytes` that read as zeroes here and went as a Zeroes request (no
    /// data on the link; the target may unmap).
    pub zero_bytes: u64,
    /// Bytes found equal by checksum and not sent.
    pub skipped_bytes: u64,
    /// Passes over the bitmap.
    pub passes: u32,
}

/// Progress of a running resync or verify, for `status` (shared with the engine), and the
/// way in for new rate bounds while it runs ([`ResyncProgress::set_limits`]).
#[derive(Debug, Default)]
pub struct ResyncProgress {
    total: AtomicU64,
    done: AtomicU64,
    sent: AtomicU64,
    skipped: AtomicU64,
    started: Mutex<Option<std::time::Instant>>,
    /// Bounds not yet taken by the running resync.
    new_limits: Mutex<Option<rate::Limits>>,
}

/// A snapshot of [`ResyncProgress`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ResyncStatus {
    pub done_bytes: u64,
    pub total_bytes: u64,
    /// Average since the start.
    pub bytes_per_sec: u64,
    pub sent_bytes: u64,
    pub skipped_bytes: u64,
}

impl ResyncProgress {
    pub(crate) fn start(&self, total: u64) {
        self.total.store(total, Ordering::Relaxed);
        self.done.store(0, Ordering::Relaxed);
        self.sent.store(0, Ordering::Relaxed);
        self.skipped.store(0, Ordering::Relaxed);
        *lock(&self.started) = Some(std::time::Instant::now());
    }
    pub(crate) fn add_total(&self, bytes: u64) {
        self.total.fetch_add(bytes, Ordering::Relaxed);
    }
    pub(crate) fn add_done(&self, done: u64, sent: u64, skipped: u64) {
        self.done.fetch_add(done, Ordering::Relaxed);
        self.sent.fetch_add(sent, Ordering::Relaxed);
        self.skipped.fetch_add(skipped, Ordering::Relaxed);
    }

    /// New rate bounds for the running resync: it paces its next chunk with them.
    pub fn set_limits(&self, limits: rate::Limits) {
        *lock(&self.new_limits) = Some(limits);
    }
    pub(crate) fn take_limits(&self) -> Option<rate::Limits> {
        lock(&self.new_limits).take()
    }

    /// Current numbers.
    pub fn snapshot(&self) -> ResyncStatus {
        let done = self.done.load(Ordering::Relaxed);
        let elapsed = lock(&self.started)
            .map(|t| t.elapsed().as_secs_f64())
            .unwrap_or(0.0);
        ResyncStatus {
            done_bytes: done,
            total_bytes: self.total.load(Ordering::Relaxed),
            bytes_per_sec: if elapsed > 0.0 {
                (done as f64 / elapsed) as u64
            } else {
                0
            },
            sent_bytes: self.sent.load(Ordering::Relaxed),
            skipped_bytes: self.skipped.load(Ordering::Relaxed),
        }
    }
}
