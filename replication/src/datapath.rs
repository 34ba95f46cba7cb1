//! The replicated write path: a [`Primary`] that writes to its local disk and to every
//! connected peer in parallel and completes each request at its protocol's point, and the
//! [`run_secondary`] loop that applies a Primary's requests to a replica in epoch order.
//!
//! ```text
//!  application          Primary                                  Secondary
//!     | submit_write        |-- local write -------------------.        |
//!     |-------------------> |-- Write{seq,epoch,..} -----------|-----> | RecvAck (if B)
//!     |                     |                                  |       | device write
//!     |                     | <------------------------------- |------ | WriteAck{seq}
//!     | <------------------ | A: local done + queued to every peer
//!     |   complete          | B: local done + RecvAck from every connected peer
//!     |                     | C: local done + WriteAck from every connected peer
//!     |                     |-- Barrier{epoch} (epoch closed) ------> | after all of epoch
//!     |                     | <---------------------------------------|- BarrierAck{epoch}
//!     | flush               |-- local flush, Flush{id} -------------> | device flush
//!     | <------------------ | <------------------------------------ | FlushAck{id}
//! ```
//!
//! The decisions are made by two cores without I/O: [`PrimaryCore`](crate::core::primary)
//! (the in-flight table, numbering and epochs, each peer's pending acknowledgements and
//! their deadlines) and [`SecondaryCore`] (the apply pipeline). This module is their shell:
//! link budgets, the device, tasks, timeouts. Each core is owned by one task: the Primary's
//! by its volume task (`primary`), which the request path reaches through a channel and
//! which polls the links and the device itself; the Secondary's by [`run_secondary`].
//! `docs/write-path.md` counts the locks, hand-offs, allocations and copies of one write.
//!
//! Decisions (DRBD semantics, see `shared/ref/drbd.md` section 1):
//!
//! - **Epochs.** Requests are grouped into epochs separated by Barrier frames. The
//!   Secondary starts no request of epoch n+1 before every request of epoch n has completed
//!   on its device (DRBD's "drain" write ordering; no device flush per epoch), so its disk
//!   is always a prefix of the Primary's history in epoch order. The Primary closes an
//!   epoch before a flush, when a FUA request completes, when it reaches
//!   [`PrimaryConfig::max_epoch_requests`], and, under protocols A and B, whenever a request
//!   completes to the application (so a request issued after a completion lands in a later
//!   epoch: that is what keeps dependent writes in order on an A/B secondary). Under C a
//!   completion already means the write is on every connected peer's disk, so C does not
//!   close epochs on every completion and the Secondary keeps applying at full queue depth.
//! - **Flush.** `flush()` flushes the local device and sends Flush to every connected
//!   peer, which flushes its device and answers FlushAck. Under C, `flush()` returns only
//!   after every connected peer's FlushAck (a guest FLUSH is durable on every replica that
//!   stays connected); under A and B it does not wait for peers. A FUA write is forwarded
//!   with FUA, written durably by the peer, and under C acknowledged only when durable.
//! - **Peer loss.** Every request stays in its peer's pending map until that peer's
//!   WriteAck, whatever the protocol. When a link goes down, every pending range of that
//!   peer is reported to the out-of-sync hook (`on_out_of_sync(peer, offset, len)`, which
//!   the owner wires to the peer's bitmap) and the waiting requests complete as soon as the
//!   local disk has them: a dead peer never blocks the data path. Each request's
//!   [`Completion`] names the known peers that did not acknowledge it (not connected when
//!   it was issued, or lost in flight); the owner decides whether it may be acknowledged
//!   to the application without them (the engine's quorum rule). A connected peer that
//!   does not acknowledge a request or flush within [`PrimaryConfig::peer_ack_timeout`]
//!   of its being queued is disconnected the same way (DRBD's ko-count).
//! - **Bounded memory.** Requests in flight are bounded in bytes
//!   ([`PrimaryConfig::max_inflight_bytes`]); each link has a send budget; the Secondary
//!   stops reading from the link while [`SecondaryConfig::max_held_bytes`] are received but
//!   not yet applied. No lock is held across I/O or across an await.
//! - **Thread hand-offs.** An aligned write or flush under `O_DIRECT` goes to the device's
//!   io_uring, and the task owning the core polls its completion (no task per I/O). Other
//!   device calls block, so they run on tokio's blocking pool. A small page-aligned cached
//!   write ([`write_is_inline`]) is cheaper than the two thread switches of that hand-off,
//!   so both sides apply it on the task that owns the core, at most
//!   [`crate::core::secondary::INLINE_BYTES_PER_PASS`] per pass: the Primary right after
//!   queueing the request to its peers, the Secondary in its receive loop, which answers
//!   at once.
//! - **Write intent on the Secondary.** With a [`WriteIntentLog`] (the engine's activity
//!   log), the Secondary logs each request's range before applying it, as DRBD 9 does, so
//!   a crash of this replica leaves its half-written ranges known. A request whose extents
//!   are not yet in the durable log is applied on the blocking pool, never inline.
//! - **Overlapping requests.** A request waits until no request in flight overlaps its
//!   range (DRBD's conflicting-write wait), so overlapping writes reach every replica in
//!   the same order and concurrent writes to one block cannot leave replicas different.
//! - **Resync and verify in order.** A resync source that is the Primary claims the
//!   range of each resync chunk like a request ([`Primary::lock_range`]) and holds it from
//!   the local read until the target has answered, so no overlapping application write is
//!   in flight meanwhile; the Secondary applies resync data and verify digests (Extension
//!   types of `crate::resync::proto`) as ordered items of its pipeline, in link order with
//!   the writes and respecting epochs, instead of handing them to the extension channel
//!   (see `crate::resync` for the argument).
//! - **A Secondary that cannot apply a request** (its disk fails a write or flush, or its
//!   activity log cannot take the request) sends no acknowledgement and disconnects with
//!   an Error frame, so the Primary counts the request as not replicated there (DRBD
//!   detaches a failing disk). Acknowledging a failure and staying connected would leave
//!   an UpToDate-looking, promotable replica without an acknowledged write. The Error
//!   frame and the log name the whole cause, down to the OS error ("local write failed:
//!   write at offset 4096 length 4096 failed: No space left on device (os error 28)");
//!   the Secondary's log lines for local failures go through one [`FailureLog`] per
//!   replica ([`SecondaryConfig::local_failures`]), so a full disk, which fails every
//!   request, every resync block and again after every reconnect, logs one line per
//!   interval with a count of the others.
//! - **Validation.** The Secondary checks every request against its device size and its
//!   expected epoch before anything touches the disk; a violation is answered with an
//!   Error frame and the connection is dropped.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::StreamExt;
use tokio::sync::mpsc;

use crate::core::op::{Op, FRAME_OVERHEAD};
use crate::core::secondary::{write_may_be_inline, Job, SecondaryAction, SecondaryCore, Work};
use crate::device::{BackingDevice, DeviceError};
use crate::failure_log::{error_chain, FailureLog};
use crate::future_set::FutureSet;
use crate::link::{LinkDown, LinkSender, PeerLink};
use crate::resync::proto::{self as rsproto, ResyncMsg};
use crate::resync::{ResyncSummary, ResyncTargetHooks};
use crate::wire::{error_code, Message, ReplicationProtocol, WriteOutcome, MAX_DATA_LEN};

mod primary;

pub use primary::{Primary, PrimaryId, RangeLock};

/// An engine's bookkeeping for one request in flight, released by [`Holds`] (see
/// [`ReleaseHolds::release_holds`]).
pub trait ReleaseHolds: Send + Sync {
    /// The request `[offset, offset + len)` that took `tag` is over: its local I/O has
    /// completed (or it never reached the device) and its peers are done with it. Called
    /// once per [`Holds`], from whichever side drops it; must be quick and must not call
    /// into the [`Primary`].
    fn release_holds(&self, offset: u64, len: u64, tag: u64);

    /// The request completed after its submitter went away, and `peers` did not
    /// acknowledge it: what the submitter would have done about them (see
    /// [`Completion::unacknowledged`]) is now the engine's, with `links_before` as given to
    /// [`Holds::new`]. Called before `release_holds`, under the same rules.
    fn unacknowledged_after_cancel(&self, peers: &[String], links_before: u64);
}

/// What a [`Holds`] gives back to its owner.
struct Owner {
    releaser: Arc<dyn ReleaseHolds>,
    offset: u64,
    len: u64,
    tag: u64,
    links_before: u64,
}

/// What an engine keeps taken while a request is in flight (its I/O gate, the
/// write-intent extents, its record of local writes in flight), handed to the [`Primary`]
/// with the request ([`Primary::submit_held`]). The volume task keeps it with the request
/// and gives it back with the completion, so a submitter that waits releases it after the
/// request completed, exactly as if it had kept it; one whose future is dropped (or
/// unwinds) meanwhile does not release it early: the task drops it once the local I/O and
/// the peers are done. No allocation: the owner is an `Arc` the engine already has.
#[derive(Default)]
pub struct Holds {
    /// Released first (`release_holds`), then the gate.
    owner: Option<Owner>,
    gate: Option<tokio::sync::OwnedRwLockReadGuard<()>>,
}

impl Holds {
    /// Nothing held.
    pub fn none() -> Holds {
        Holds::default()
    }

    /// `gate` (if any) and whatever `owner` releases for `[offset, offset + len)` and
    /// `tag`; dropping the value releases them, the owner's first. `links_before` is the
    /// engine's note of the links the request started with, handed back to
    /// [`ReleaseHolds::unacknowledged_after_cancel`].
    pub fn new(
        gate: Option<tokio::sync::OwnedRwLockReadGuard<()>>,
        owner: Arc<dyn ReleaseHolds>,
        offset: u64,
        len: u64,
        tag: u64,
        links_before: u64,
    ) -> Holds {
        Holds {
            owner: Some(Owner {
                releaser: owner,
                offset,
                len,
                tag,
                links_before,
            }),
            gate,
        }
    }

    /// Whether nothing is held.
    pub(crate) fn is_empty(&self) -> bool {
        self.owner.is_none() && self.gate.is_none()
    }

    /// Release everything now (the same as dropping it).
    pub fn release(self) {
        drop(self);
    }

    /// The request completed with `unacknowledged` peers after its submitter went away:
    /// tell the owner (if there are such peers), then release everything.
    pub(crate) fn release_abandoned(self, unacknowledged: &[String]) {
        if let Some(owner) = &self.owner {
            if !unacknowledged.is_empty() {
                owner
                    .releaser
                    .unacknowledged_after_cancel(unacknowledged, owner.links_before);
            }
        }
    }
}

impl Drop for Holds {
    fn drop(&mut self) {
        if let Some(o) = self.owner.take() {
            o.releaser.release_holds(o.offset, o.len, o.tag);
        }
        // The gate guard is a field: dropped after this, i.e. after the owner's release.
    }
}

impl std::fmt::Debug for Holds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Holds")
            .field("gate", &self.gate.is_some())
            .field(
                "owner",
                &self.owner.as_ref().map(|o| (o.offset, o.len, o.tag)),
            )
            .finish()
    }
}

/// Called with (peer node name, offset, length) for every range a peer may lack.
pub type OutOfSyncHook = Arc<dyn Fn(&str, u64, u64) + Send + Sync>;

/// Receives Extension messages (state, UUID, bitmap, resync, verify) that arrive on a data
/// path link, with the sending peer's node name.
pub type ExtensionSink = mpsc::UnboundedSender<(String, Message)>;

/// Errors of the replicated data path.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("request at offset {offset} length {len} is beyond the volume size {size}")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("write of {len} bytes exceeds the maximum request size {max}")]
    TooLarge { len: usize, max: usize },
    #[error("local {op} failed")]
    Local {
        op: &'static str,
        #[source]
        source: DeviceError,
    },
    #[error("local {op} task did not complete")]
    LocalTask {
        op: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
    #[error("the peer broke the replication protocol: {0}")]
    PeerProtocol(String),
    #[error("the peer sent a request at offset {offset} length {len}, beyond our size {size}")]
    PeerOutOfRange { offset: u64, len: u64, size: u64 },
    #[error("the activity log could not take a replicated request: {0}")]
    WriteIntent(String),
    #[error("the volume's data path task has stopped")]
    Stopped,
}

/// Tunables of a Primary. Every default is a named function.
#[derive(Debug, Clone)]
pub struct PrimaryConfig {
    /// When a request counts as replicated.
    pub protocol: ReplicationProtocol,
    /// Bytes of requests in flight at once (memory bound per volume).
    pub max_inflight_bytes: usize,
    /// Requests per epoch before the epoch is closed anyway (DRBD max-epoch-size).
    pub max_epoch_requests: u32,
    /// A connected peer that does not acknowledge a request for this long is disconnected.
    pub peer_ack_timeout: Duration,
}

impl PrimaryConfig {
    /// Defaults for `protocol`.
    pub fn new(protocol: ReplicationProtocol) -> Self {
        PrimaryConfig {
            protocol,
            max_inflight_bytes: default_max_inflight_bytes(),
            max_epoch_requests: default_max_epoch_requests(),
            peer_ack_timeout: default_peer_ack_timeout(),
        }
    }
}

/// Default in-flight bound: 128 MiB.
pub fn default_max_inflight_bytes() -> usize {
    128 << 20
}
/// Default epoch size limit: 2048 requests (DRBD's default).
pub fn default_max_epoch_requests() -> u32 {
    2048
}
/// Default peer acknowledgement timeout: 30 s.
pub fn default_peer_ack_timeout() -> Duration {
    Duration::from_secs(30)
}

/// Whether a write is applied on the calling task rather than on the blocking pool: a small,
/// page-aligned write without FUA to a device with [`BackingDevice::cached_writes`] only
/// copies into the page cache (no read of a partial page, no flush), which costs less than
/// the two thread switches of a hand-off. It can still block while the kernel throttles
/// dirty pages, and a blocked runtime worker may also delay the runtime's network and timer
/// events for that time, so the Primary and the Secondary each apply at most
/// [`crate::core::secondary::INLINE_BYTES_PER_PASS`] this way per pass of their loops.
pub fn write_is_inline(device: &dyn BackingDevice, offset: u64, len: usize, fua: bool) -> bool {
    write_may_be_inline(device.cached_writes(), offset, len, fua)
}

/// Carrying out an [`Op`] on a device (the Primary's local half, the Secondary's apply).
impl Op {
    /// See [`write_is_inline`].
    fn applies_inline(&self, device: &dyn BackingDevice, offset: u64) -> bool {
        matches!(self, Op::Write { data, fua } if write_is_inline(device, offset, data.len(), *fua))
    }

    fn apply(&self, device: &dyn BackingDevice, offset: u64) -> Result<(), DeviceError> {
        match self {
            Op::Write { data, fua: true } => device.write_at_durable(data, offset),
            Op::Write { data, fua: false } => device.write_at(data, offset),
            Op::Trim { len, fua } => {
                device.discard(offset, *len)?;
                if *fua {
                    device.flush()?;
                }
                Ok(())
            }
            Op::WriteZeroes {
                len,
                may_unmap,
                fua,
            } => {
                device.write_zeroes(offset, *len, *may_unmap)?;
                if *fua {
                    device.flush()?;
                }
                Ok(())
            }
        }
    }
}

/// How a request completed towards the peers (it is on the local disk).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Completion {
    /// Known peers that did not acknowledge the request at the protocol's point: not
    /// connected when it was issued, or lost while it was in flight. Its range is already
    /// reported out of sync for each of them.
    pub unacknowledged: Vec<String>,
    /// From the request's start until the local disk completed it.
    pub local: Duration,
    /// From the request's start until the last connected peer acknowledged it at the
    /// protocol's point; `None` when the request waited for no peer.
    pub peers: Option<Duration>,
}

/// Write-intent tracking for the requests a Secondary applies (the engine's activity log):
/// `begin` before a request touches its range, `end` after it completed, so that after a
/// crash of this replica every range that might have been half-written is known.
pub trait WriteIntentLog: Send + Sync {
    /// Take the range if that needs no I/O and no waiting; `false` changes nothing.
    fn try_begin(&self, offset: u64, len: u64) -> bool;
    /// Take the range, persisting the log first if needed. Blocks; runs on the blocking
    /// pool. On an error the request is not applied.
    fn begin(&self, offset: u64, len: u64) -> Result<(), String>;
    /// A request taken with `try_begin` or `begin` completed.
    fn end(&self, offset: u64, len: u64);
}

/// A Secondary's [`WriteIntentLog`].
#[derive(Clone)]
pub struct WriteIntentHooks(pub Arc<dyn WriteIntentLog>);

impl std::fmt::Debug for WriteIntentHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WriteIntentHooks")
    }
}

/// Tunables of a Secondary.
#[derive(Debug, Clone)]
pub struct SecondaryConfig {
    /// Bytes received but not yet applied before the Secondary stops reading.
    pub max_held_bytes: usize,
    /// Where Extension messages (state, UUID, bitmap, resync, verify) arriving on the data
    /// path go; `None` drops them. Answers go out through a clone of the link's sender.
    pub extensions: Option<mpsc::UnboundedSender<Message>>,
    /// The engine's side of a resync that targets this replica: told about every resync
    /// write and about the end of the resync (see [`crate::resync::ResyncTarget`]). With
    /// `None`, resync data is still applied and acknowledged.
    pub resync_target: Option<ResyncTargetHooks>,
    /// Where the ranges of replicated requests are logged before they are applied; `None`
    /// applies them unlogged.
    pub write_intent: Option<WriteIntentHooks>,
    /// The rate limit of this replica's log lines for local failures (device errors of
    /// requests, resync writes and reads, a request the write-intent log refused). Share
    /// one per replica across its links, so reconnects do not reset it.
    pub local_failures: Arc<FailureLog>,
}

impl Default for SecondaryConfig {
    fn default() -> Self {
        SecondaryConfig {
            max_held_bytes: default_max_held_bytes(),
            extensions: None,
            resync_target: None,
            write_intent: None,
            local_failures: Arc::default(),
        }
    }
}

/// Logs a Secondary's local failures through its [`FailureLog`], with the volume, the
/// peer and the error's whole chain (the OS error included).
#[derive(Clone)]
struct FailureReporter {
    log: Arc<FailureLog>,
    volume: Arc<str>,
    peer: Arc<str>,
}

impl FailureReporter {
    fn report(&self, what: &str, error: &dyn std::error::Error) {
        if let Some(suppressed) = self.log.admit(std::time::Instant::now()) {
            tracing::error!(volume = %self.volume, peer = %self.peer, error = %error_chain(error),
                suppressed, "{what}");
        }
    }
}

/// Default bound on received-but-unapplied bytes: 128 MiB.
pub fn default_max_held_bytes() -> usize {
    128 << 20
}

/// A job the Secondary started on the device, polled by [`run_secondary`] itself (no task
/// and no channel per job): a write on the device's async ring, or any job on the blocking
/// pool.
enum Running {
    Async {
        write: crate::device::DeviceFuture<()>,
        seq: u64,
        offset: u64,
        len: u64,
        op: &'static str,
        held: usize,
    },
    Blocking {
        task: tokio::task::JoinHandle<Result<Message, DatapathError>>,
        op: &'static str,
        held: usize,
    },
}

/// A finished [`Running`] job.
struct Done {
    held: usize,
    reply: Result<Message, DatapathError>,
    /// The write-intent range to end before the reply goes out (async writes; a blocking
    /// job ends its own).
    logged: Option<(u64, u64)>,
}

impl std::future::Future for Running {
    type Output = Done;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Done> {
        use std::task::Poll;
        match self.get_mut() {
            Running::Async {
                write,
                seq,
                offset,
                len,
                op,
                held,
            } => {
                let Poll::Ready(result) = write.as_mut().poll(cx) else {
                    return Poll::Pending;
                };
                let reply = result
                    .map(|()| Message::WriteAck {
                        seq: *seq,
                        outcome: WriteOutcome::Written,
                    })
                    .map_err(|source| DatapathError::Local { op, source });
                Poll::Ready(Done {
                    held: *held,
                    reply,
                    logged: Some((*offset, *len)),
                })
            }
            Running::Blocking { task, op, held } => {
                let Poll::Ready(joined) = std::pin::Pin::new(task).poll(cx) else {
                    return Poll::Pending;
                };
                let reply = joined
                    .map_err(|source| DatapathError::LocalTask { op, source })
                    .and_then(|reply| reply);
                Poll::Ready(Done {
                    held: *held,
                    reply,
                    logged: None,
                })
            }
        }
    }
}

/// Apply a Primary's requests arriving on `link` to `device` until the link goes down: the
/// shell of [`SecondaryCore`], which decides what runs when; this loop reads the link,
/// carries out the core's actions and reports their completions.
///
/// Returns the reason the link went down, or an error when the Primary broke the protocol
/// (in which case an Error frame was sent and the link closed). Requests already started on
/// the device, and under protocol B every request received, are finished before this
/// returns.
pub async fn run_secondary(
    link: PeerLink,
    device: Arc<dyn BackingDevice>,
    cfg: SecondaryConfig,
) -> Result<LinkDown, DatapathError> {
    let PeerLink {
        info,
        sender,
        mut receiver,
    } = link;
    let peer = info.hello.node;
    let max_held = cfg.max_held_bytes.max(MAX_DATA_LEN + FRAME_OVERHEAD);
    let mut core = SecondaryCore::new(device.cached_writes(), max_held);
    let mut shell = SecondaryShell {
        failures: FailureReporter {
            log: cfg.local_failures.clone(),
            volume: info.hello.volume.into(),
            peer: peer.as_str().into(),
        },
        device,
        sender,
        running: FutureSet::new(),
        extensions: cfg.extensions,
        resync_target: cfg.resync_target,
        write_intent: cfg.write_intent,
    };

    let result = loop {
        if let Err(e) = shell.carry_out(&mut core) {
            shell
                .failures
                .report("this replica could not apply a request; disconnecting", &e);
            shell
                .sender
                .close_with_error(error_code::INTERNAL, &error_chain(&e));
            break Err(e);
        }
        tokio::select! {
            biased;
            Some(done) = shell.running.next(), if !shell.running.is_empty() => {
                shell.finished(&mut core, done);
            }
            msg = receiver.recv(), if core.wants_input() => {
                let Some(msg) = msg else {
                    break Ok(receiver.down_reason().unwrap_or(LinkDown::PeerClosed));
                };
                if let Err(e) = core.handle_message(msg, shell.device.size()) {
                    let code = match e {
                        DatapathError::PeerOutOfRange { .. } => error_code::OUT_OF_RANGE,
                        _ => error_code::PROTOCOL,
                    };
                    tracing::warn!(peer = %peer, error = %e, "rejecting the primary's request; disconnecting");
                    shell.sender.close_with_error(code, &e.to_string());
                    break Err(e);
                }
            }
        }
    };
    // Let requests already on the device, and under protocol B those received, finish
    // (their acks may no longer be deliverable).
    core.handle_link_down();
    let _ = shell.carry_out(&mut core);
    while core.inflight() > 0 {
        let Some(done) = shell.running.next().await else {
            break;
        };
        shell.finished(&mut core, done);
        let _ = shell.carry_out(&mut core);
    }
    result
}

/// What [`run_secondary`] carries the core's actions out with.
struct SecondaryShell {
    device: Arc<dyn BackingDevice>,
    sender: LinkSender,
    /// Jobs started on the device and not yet finished.
    running: FutureSet<Running>,
    extensions: Option<mpsc::UnboundedSender<Message>>,
    resync_target: Option<ResyncTargetHooks>,
    write_intent: Option<WriteIntentHooks>,
    failures: FailureReporter,
}

impl SecondaryShell {
    /// Carry out every action the core has; returns the first failure it reported. After
    /// a failure, jobs the core started before it knew are abandoned, not run.
    fn carry_out(&mut self, core: &mut SecondaryCore) -> Result<(), DatapathError> {
        let mut failed = None;
        let mut stopped = false;
        while let Some(action) = core.poll_action() {
            match action {
                SecondaryAction::Send(msg) => {
                    let _ = self.sender.send_control(&msg);
                }
                SecondaryAction::Extension(msg) => match &self.extensions {
                    Some(tx) => {
                        let _ = tx.send(msg);
                    }
                    None => tracing::debug!(
                        msg_type = msg.msg_type(),
                        "no extension handler; ignoring message"
                    ),
                },
                SecondaryAction::Fail(e) => {
                    stopped = true;
                    failed.get_or_insert(e);
                }
                SecondaryAction::Start(job) if stopped => core.handle_abandoned(job.held),
                SecondaryAction::Start(job) => {
                    if let Some(reply) = self.try_inline(&job) {
                        stopped = reply.is_err();
                        core.handle_done(job.held, reply);
                    } else if !self.try_async(&job) {
                        self.spawn(job);
                    }
                }
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// A started job finished: end its write intent, then report it (the core queues its
    /// acknowledgement).
    fn finished(&self, core: &mut SecondaryCore, done: Done) {
        if let (Some(log), Some((offset, len))) = (&self.write_intent, done.logged) {
            log.0.end(offset, len);
        }
        core.handle_done(done.held, done.reply);
    }

    /// Apply an inline job on this task if the write-intent log takes its range without
    /// waiting; `None` leaves it to the blocking pool.
    fn try_inline(&self, job: &Job) -> Option<Result<Message, DatapathError>> {
        let Work::Request { seq, offset, op } = &job.work else {
            return None;
        };
        if !job.inline {
            return None;
        }
        let log = self.write_intent.as_ref();
        if !log.is_none_or(|log| log.0.try_begin(*offset, op.len())) {
            return None;
        }
        let applied = apply_request(&*self.device, *seq, *offset, op);
        if let Some(log) = log {
            log.0.end(*offset, op.len());
        }
        Some(applied)
    }

    /// Start a write on the device's async ring (no thread hand-off) if the device can and
    /// the write-intent log takes the range without waiting; [`run_secondary`] polls its
    /// completion. `false` leaves the job to the blocking pool.
    fn try_async(&self, job: &Job) -> bool {
        let Work::Request {
            seq,
            offset,
            op: op @ Op::Write { data, fua },
        } = &job.work
        else {
            return false;
        };
        let (seq, offset, len) = (*seq, *offset, data.len() as u64);
        let log = self.write_intent.as_ref();
        if !log.is_none_or(|log| log.0.try_begin(offset, len)) {
            return false;
        }
        let Some(write) = self.device.write_async(offset, data, *fua) else {
            if let Some(log) = log {
                log.0.end(offset, len);
            }
            return false;
        };
        self.running.push(Running::Async {
            write,
            seq,
            offset,
            len,
            op: op.name(),
            held: job.held,
        });
        true
    }

    /// Run a job on the blocking pool; [`run_secondary`] polls its completion.
    fn spawn(&self, job: Job) {
        let (op, held) = (job.work.name(), job.held);
        let work = BlockingWork {
            work: job.work,
            device: self.device.clone(),
            hooks: self.resync_target.clone(),
            intent: self.write_intent.clone(),
            failures: self.failures.clone(),
        };
        let task = tokio::task::spawn_blocking(move || work.run());
        self.running.push(Running::Blocking { task, op, held });
    }
}

/// A job for the blocking pool, with what it needs there.
struct BlockingWork {
    work: Work,
    device: Arc<dyn BackingDevice>,
    hooks: Option<ResyncTargetHooks>,
    intent: Option<WriteIntentHooks>,
    failures: FailureReporter,
}

impl BlockingWork {
    /// Do the job; its acknowledgement, or what this replica failed to do.
    fn run(self) -> Result<Message, DatapathError> {
        let BlockingWork {
            work,
            device,
            hooks,
            intent,
            failures,
        } = self;
        let hooks = hooks.as_ref();
        match work {
            Work::ResyncData { id, offset, data } => {
                let len = data.len() as u64;
                // Durable before the ack: the source clears its bits on the ack, so the
                // data must survive a crash of this replica.
                let result = write_resync_data(&*device, &data, offset);
                Ok(resync_written(result, hooks, &failures, id, offset, len))
            }
            Work::ResyncZeroes { id, offset, len } => {
                let result = device
                    .write_zeroes(offset, len, true)
                    .and_then(|()| device.flush());
                Ok(resync_written(result, hooks, &failures, id, offset, len))
            }
            Work::ResyncDigest {
                id,
                offset,
                len,
                digests,
            } => Ok(compare_digests(
                &*device, &failures, id, offset, len, &digests,
            )),
            Work::ResyncDone { summary } => Ok(finish_resync_target(&*device, hooks, &summary)),
            Work::Request { seq, offset, op } => {
                apply_logged_request(&*device, intent.as_ref(), seq, offset, &op)
            }
            Work::Flush { id } => {
                device
                    .flush()
                    .map(|()| Message::FlushAck { id })
                    .map_err(|source| DatapathError::Local {
                        op: "flush",
                        source,
                    })
            }
        }
    }
}

/// Write resync data durably; its 4 KiB blocks of zeroes are written as zeroes that may
/// unmap, so a thin target (a new replica's fresh LV, a sparse file) stays as thin as the
/// source instead of allocating every block of a chunk that holds some data.
fn write_resync_data(
    device: &dyn BackingDevice,
    data: &[u8],
    offset: u64,
) -> Result<(), crate::device::DeviceError> {
    const BLOCK: usize = 4096;
    let zero: Vec<bool> = data
        .chunks(BLOCK)
        .map(|b| b.iter().all(|&x| x == 0))
        .collect();
    if !zero.contains(&true) {
        return device.write_at_durable(data, offset);
    }
    // Runs of blocks that are all zeroes or all data, each written once.
    let mut block = 0;
    while block < zero.len() {
        let is_zero = zero[block];
        let run = zero[block..].iter().take_while(|&&z| z == is_zero).count();
        let (start, end) = (block * BLOCK, ((block + run) * BLOCK).min(data.len()));
        let at = offset + start as u64;
        if is_zero {
            device.write_zeroes(at, (end - start) as u64, true)?;
        } else {
            device.write_at(&data[start..end], at)?;
        }
        block += run;
    }
    device.flush()
}

/// Apply a replicated request on this replica and build its acknowledgement.
fn apply_request(
    device: &dyn BackingDevice,
    seq: u64,
    offset: u64,
    op: &Op,
) -> Result<Message, DatapathError> {
    op.apply(device, offset)
        .map(|()| Message::WriteAck {
            seq,
            outcome: WriteOutcome::Written,
        })
        .map_err(|source| DatapathError::Local {
            op: op.name(),
            source,
        })
}

/// [`apply_request`] inside the write-intent log: the range is logged before the device is
/// touched and released after; a request the log cannot take is not applied.
fn apply_logged_request(
    device: &dyn BackingDevice,
    log: Option<&WriteIntentHooks>,
    seq: u64,
    offset: u64,
    op: &Op,
) -> Result<Message, DatapathError> {
    let Some(log) = log else {
        return apply_request(device, seq, offset, op);
    };
    log.0
        .begin(offset, op.len())
        .map_err(DatapathError::WriteIntent)?;
    let applied = apply_request(device, seq, offset, op);
    log.0.end(offset, op.len());
    applied
}

/// A resync write on the target finished: tell the engine (before the acknowledgement).
fn resync_written(
    result: Result<(), DeviceError>,
    hooks: Option<&ResyncTargetHooks>,
    failures: &FailureReporter,
    id: u64,
    offset: u64,
    len: u64,
) -> Message {
    let written = match result {
        Ok(()) => {
            if let Some(h) = hooks {
                h.0.written(offset, len);
            }
            true
        }
        Err(e) => {
            failures.report("resync write failed on this replica", &e);
            false
        }
    };
    ResyncMsg::DataAck { id, written }.to_message()
}

/// Hash the local range block by block and answer which blocks differ from the source.
fn compare_digests(
    device: &dyn BackingDevice,
    failures: &FailureReporter,
    id: u64,
    offset: u64,
    len: u32,
    digests: &[u8],
) -> Message {
    let mut buf = vec![0u8; len as usize];
    let reply = match device.read_at(&mut buf, offset) {
        Ok(()) => ResyncMsg::DigestReply {
            id,
            ok: true,
            mask: Bytes::from(rsproto::differing_mask(&buf, digests)),
        },
        Err(e) => {
            failures.report("read for a resync/verify compare failed", &e);
            ResyncMsg::DigestReply {
                id,
                ok: false,
                mask: Bytes::new(),
            }
        }
    };
    reply.to_message()
}

/// The source sent everything: make it durable, let the engine record the end, answer.
fn finish_resync_target(
    device: &dyn BackingDevice,
    hooks: Option<&ResyncTargetHooks>,
    summary: &ResyncSummary,
) -> Message {
    let result = device
        .flush()
        .map_err(|e| format!("flushing the resynced data failed: {}", error_chain(&e)))
        .and_then(|()| match hooks {
            Some(h) => h.0.finished(summary),
            None => Ok(()),
        });
    let reply = match result {
        Ok(()) => ResyncMsg::DoneAck {
            ok: true,
            message: String::new(),
        },
        Err(message) => {
            tracing::error!(%message, "could not finish the resync on this replica");
            ResyncMsg::DoneAck { ok: false, message }
        }
    };
    reply.to_message()
}

#[cfg(test)]
mod resync_write_tests {
    use super::*;
    use crate::device::FileDevice;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn zero_blocks_of_resync_data_stay_unallocated_and_read_back_as_zeroes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let device = FileDevice::open(&path).unwrap();
        // data, zeroes, zeroes, data, zeroes (the tail): 8 KiB of data in 20 KiB.
        let mut data = vec![0u8; 5 * 4096];
        data[..4096].fill(0xA5);
        data[3 * 4096..4 * 4096].fill(0x5A);
        write_resync_data(&device, &data, 64 * 1024).unwrap();
        let mut back = vec![0xFFu8; data.len()];
        device.read_at(&mut back, 64 * 1024).unwrap();
        assert_eq!(back, data);
        let allocated = std::fs::metadata(&path).unwrap().blocks() * 512;
        assert!(allocated <= 8 * 1024, "{allocated} bytes allocated");
    }
}
