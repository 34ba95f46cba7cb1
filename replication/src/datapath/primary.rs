//! The Primary's shell: one task per volume (`task`) owns the volume's
//! [`PrimaryCore`](crate::core::primary::PrimaryCore), the attached links and every request
//! in flight, and carries out the core's actions in their order. This module is the
//! [`Primary`] handle, which only sends the task inputs and awaits its reply: nothing is
//! shared by lock between the request path and the task.
//!
//! ```text
//!  write_request / flush_request ─┐ Input (one channel)  ┌─> link writers (frames)
//!  lock_range / RangeLock::drop ──┼──────────> volume ───┼─> device (io_uring, blocking pool)
//!  attach_peer / set_known_peers ─┘             task     ├─> on_out_of_sync hook
//!            link readers (acks) ─────────────> (core) <─┴── device completions
//!                                                  └──────> reply (oneshot) per request
//! ```
//!
//! A request handed to the task is carried through to its end whatever its caller does, so
//! a cancelled caller cannot leave this disk ahead of the peers unmarked. The task ends
//! once every handle and range lock is gone, nothing is in flight and every link is down.
//! A task that ends any other way (it panicked) marks what it left unfinished out of sync,
//! forgets its links and says so to [`Primary::failure`]: every request from then on gets
//! `Stopped`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};

use super::{Completion, DatapathError, ExtensionSink, Holds, OutOfSyncHook, PrimaryConfig};
use crate::core::op::{Op, FRAME_OVERHEAD};
use crate::device::BackingDevice;
use crate::link::{LinkReceiver, LinkSender, PeerLink};
use crate::wire::{ReplicationProtocol, MAX_DATA_LEN};

mod task;

use task::VolumeTask;

/// A request's outcome, with the [`Holds`] it was submitted with (given back so that a
/// waiting submitter releases them itself, after it has the outcome).
type Answer = (Result<Completion, DatapathError>, Holds);
type Reply = oneshot::Sender<Answer>;

/// What the handles send the volume task.
enum Input {
    Request {
        offset: u64,
        op: Op,
        start: Instant,
        reply: Reply,
        holds: Holds,
    },
    Flush {
        start: Instant,
        reply: Reply,
    },
    LockRange {
        offset: u64,
        len: u64,
        reply: oneshot::Sender<RangeLock>,
    },
    Release {
        offset: u64,
    },
    Attach {
        key: u64,
        name: String,
        sender: LinkSender,
        receiver: LinkReceiver,
    },
    KnownPeers(Vec<String>),
    Extensions(ExtensionSink),
    WaitReplicated(oneshot::Sender<()>),
}

/// The attached links as the control path sees them (status, resync, disconnect): added by
/// [`Primary::attach_peer`], removed by the task once it has handled the link's loss.
#[derive(Default)]
struct Directory {
    next_key: u64,
    links: Vec<(u64, String, LinkSender)>,
}

/// What the handles and the task share: fixed settings, a counter, and the directory (a
/// lock the request path never takes).
struct Shared {
    device: Arc<dyn BackingDevice>,
    cfg: PrimaryConfig,
    /// Bytes of application requests submitted so far (resync rate control reads it).
    app_bytes: AtomicU64,
    directory: Mutex<Directory>,
    /// Becomes true when the task ends without finishing (see [`Primary::failure`]).
    failed: watch::Receiver<bool>,
}

impl Shared {
    fn directory(&self) -> MutexGuard<'_, Directory> {
        self.directory.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Names one [`Primary`] (one volume task) without keeping it alive.
#[derive(Clone)]
pub struct PrimaryId(Weak<Shared>);

impl PrimaryId {
    /// Whether `p` is a handle on the Primary this names.
    pub fn is(&self, p: &Primary) -> bool {
        std::ptr::eq(self.0.as_ptr(), Arc::as_ptr(&p.shared))
    }
}

/// A range of the volume claimed with [`Primary::lock_range`]: no application request
/// overlapping it starts (locally or towards a peer) until this is dropped.
pub struct RangeLock {
    tx: mpsc::UnboundedSender<Input>,
    start: Option<u64>,
}

impl Drop for RangeLock {
    fn drop(&mut self) {
        if let Some(offset) = self.start {
            // The task is gone only once every lock is: nothing left to release then.
            let _ = self.tx.send(Input::Release { offset });
        }
    }
}

/// The Primary side of the replicated write path for one volume: a handle on the task that
/// owns its [`PrimaryCore`]. Cheap to clone. Create it inside a tokio runtime.
#[derive(Clone)]
pub struct Primary {
    tx: mpsc::UnboundedSender<Input>,
    shared: Arc<Shared>,
}

impl Primary {
    /// A Primary over `device` with no peers yet. `on_out_of_sync` is called for every
    /// range a peer may lack (peer lost mid-request, peer write failed); it must be quick
    /// (mark a bitmap in memory) and must not call back into the Primary.
    pub fn new(
        device: Arc<dyn BackingDevice>,
        cfg: PrimaryConfig,
        on_out_of_sync: OutOfSyncHook,
    ) -> Primary {
        let cfg = PrimaryConfig {
            max_inflight_bytes: cfg.max_inflight_bytes.max(MAX_DATA_LEN + FRAME_OVERHEAD),
            max_epoch_requests: cfg.max_epoch_requests.max(1),
            ..cfg
        };
        let (failure, failed) = watch::channel(false);
        let shared = Arc::new(Shared {
            device,
            cfg,
            app_bytes: AtomicU64::new(0),
            directory: Mutex::default(),
            failed,
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let task = VolumeTask::new(shared.clone(), on_out_of_sync, rx, tx.downgrade(), failure);
        tokio::spawn(task.run());
        Primary { tx, shared }
    }

    fn send(&self, input: Input) -> Result<(), DatapathError> {
        self.tx.send(input).map_err(|_| DatapathError::Stopped)
    }

    /// Resolves when the volume task has ended: true if it was dropped unfinished (it
    /// panicked, which is a bug, or its runtime shut down; its unfinished requests were
    /// marked out of sync and every request since gets [`DatapathError::Stopped`]), false
    /// if it ended normally (every handle was gone). Holds no handle, so awaiting it does
    /// not keep the task alive.
    pub fn failure(&self) -> impl std::future::Future<Output = bool> + Send + 'static {
        let mut failed = self.shared.failed.clone();
        async move { failed.wait_for(|failed| *failed).await.is_ok() }
    }

    /// This Primary's name, which does not keep it alive.
    pub fn id(&self) -> PrimaryId {
        PrimaryId(Arc::downgrade(&self.shared))
    }

    /// Whether `other` is a handle on the same Primary (the same volume task).
    pub fn is_same(&self, other: &Primary) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    /// The replication protocol in force.
    pub fn protocol(&self) -> ReplicationProtocol {
        self.shared.cfg.protocol
    }

    /// The local device (resync and verify read it under [`Primary::lock_range`]).
    pub fn device(&self) -> Arc<dyn BackingDevice> {
        self.shared.device.clone()
    }

    /// Bytes of application requests (writes, trims, zeroes) submitted so far.
    pub fn application_bytes(&self) -> u64 {
        self.shared.app_bytes.load(Ordering::Relaxed)
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), DatapathError> {
        let size = self.shared.device.size();
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(DatapathError::OutOfRange { offset, len, size });
        }
        Ok(())
    }

    /// Claim `[offset, offset + len)` the way a request does: wait until no request in
    /// flight overlaps it, then hold it until the returned lock is dropped. Requests
    /// overlapping the range wait meanwhile, and new ones already wait while this call
    /// waits for the range (a resync is not starved by overlapping writes). Resync and
    /// verify read the local disk and exchange the range with a peer under this lock, so
    /// the exchange cannot interleave with an overlapping application write (see
    /// `crate::resync`).
    pub async fn lock_range(&self, offset: u64, len: u64) -> Result<RangeLock, DatapathError> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(RangeLock {
                tx: self.tx.clone(),
                start: None,
            });
        }
        let (reply, rx) = oneshot::channel();
        self.send(Input::LockRange { offset, len, reply })?;
        // A lock sent after this call was cancelled is dropped with the channel: released.
        rx.await.map_err(|_| DatapathError::Stopped)
    }

    /// Start replicating to the peer at the other end of `link`. Requests submitted from
    /// now on go to it too. When the link goes down, the peer's pending ranges are reported
    /// out of sync and the requests waiting for it complete without it.
    ///
    /// Call this after any connect-time exchange (UUIDs, bitmaps) on the link is finished.
    pub fn attach_peer(&self, link: PeerLink) {
        let PeerLink {
            info,
            sender,
            receiver,
        } = link;
        let name = info.hello.node;
        let key = {
            let mut dir = self.shared.directory();
            dir.next_key += 1;
            let key = dir.next_key;
            dir.links.push((key, name.clone(), sender.clone()));
            key
        };
        tracing::info!(peer = %name, protocol = %self.shared.cfg.protocol, "replicating to peer");
        let attach = Input::Attach {
            key,
            name,
            sender,
            receiver,
        };
        if self.send(attach).is_err() {
            self.shared.directory().links.retain(|(k, ..)| *k != key);
        }
    }

    /// Register the peers this volume replicates to (by node name), connected or not.
    /// While a known peer is not attached, every request is reported out of sync for it,
    /// so its bitmap covers everything it missed. Attached peers become known implicitly.
    pub fn set_known_peers(&self, peers: &[String]) {
        let _ = self.send(Input::KnownPeers(peers.to_vec()));
    }

    /// Route Extension messages arriving from attached peers to `sink` (resync, verify and
    /// state traffic the data path does not handle itself).
    pub fn set_extension_sink(&self, sink: ExtensionSink) {
        let _ = self.send(Input::Extensions(sink));
    }

    /// The sending half of an attached peer's link, to send Extension messages on the
    /// same connection as the data path.
    pub fn peer_sender(&self, peer: &str) -> Option<LinkSender> {
        self.shared
            .directory()
            .links
            .iter()
            .find(|(_, name, _)| name == peer)
            .map(|(_, _, sender)| sender.clone())
    }

    /// Names of the peers currently replicated to.
    pub fn connected_peers(&self) -> Vec<String> {
        let dir = self.shared.directory();
        dir.links.iter().map(|(_, name, _)| name.clone()).collect()
    }

    /// Wait until every connected peer has acknowledged every request as written (or was
    /// disconnected). Useful under A and B before a planned switchover.
    pub async fn wait_replicated(&self) {
        let (tx, rx) = oneshot::channel();
        if self.send(Input::WaitReplicated(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    /// Disconnect `peer` (its pending ranges are reported out of sync). False if unknown.
    pub fn disconnect_peer(&self, peer: &str, reason: &str) -> bool {
        match self.peer_sender(peer) {
            Some(sender) => {
                sender.close(reason);
                true
            }
            None => false,
        }
    }

    /// Write `data` at `offset` on the local disk and every connected peer; completes at
    /// the protocol's point. With `fua` the data is durable on the local disk (and, under
    /// C, on every connected peer's disk) when this returns.
    pub async fn submit_write(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> Result<(), DatapathError> {
        self.write_request(offset, data, fua).await.map(drop)
    }

    /// Discard a range on the local disk and every connected peer.
    pub async fn submit_trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), DatapathError> {
        self.trim_request(offset, len, fua).await.map(drop)
    }

    /// Zero a range on the local disk and every connected peer.
    pub async fn submit_write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        fua: bool,
    ) -> Result<(), DatapathError> {
        self.write_zeroes_request(offset, len, may_unmap, fua)
            .await
            .map(drop)
    }

    /// [`Primary::submit_write`], telling which known peers did not acknowledge the write
    /// (the caller decides whether it may be acknowledged without them).
    pub async fn write_request(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> Result<Completion, DatapathError> {
        // `submit_held` refuses a write over MAX_DATA_LEN.
        self.submit(offset, Op::Write { data, fua }).await
    }

    /// Hand `op` at `offset` to the volume task with `holds`, and wait for its completion.
    /// The task keeps `holds` while the request is in flight and gives them back with its
    /// outcome (the caller drops them when it is done with the outcome); if this future
    /// is dropped first, the task drops them once the request's local I/O and its peers
    /// are done, never while the device may still be writing. On an error before the
    /// request reached the task (too large, out of range, task stopped) they come back
    /// unused.
    pub async fn submit_held(
        &self,
        offset: u64,
        op: Op,
        holds: Holds,
    ) -> (Result<Completion, DatapathError>, Holds) {
        if let Op::Write { data, .. } = &op {
            if data.len() > MAX_DATA_LEN {
                let e = DatapathError::TooLarge {
                    len: data.len(),
                    max: MAX_DATA_LEN,
                };
                return (Err(e), holds);
            }
        }
        let len = op.len();
        if let Err(e) = self.check_range(offset, len) {
            return (Err(e), holds);
        }
        self.shared.app_bytes.fetch_add(len, Ordering::Relaxed);
        let (reply, rx) = oneshot::channel();
        let start = Instant::now();
        let input = Input::Request {
            offset,
            op,
            start,
            reply,
            holds,
        };
        if let Err(mpsc::error::SendError(input)) = self.tx.send(input) {
            let holds = match input {
                Input::Request { holds, .. } => holds,
                _ => Holds::none(),
            };
            return (Err(DatapathError::Stopped), holds);
        }
        match rx.await {
            Ok(answer) => answer,
            // The task dropped the request (it is gone). It released the holds, after the
            // request's local I/O if that was running.
            Err(_) => (Err(DatapathError::Stopped), Holds::none()),
        }
    }

    /// [`Primary::submit_trim`] with its [`Completion`].
    pub async fn trim_request(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
    ) -> Result<Completion, DatapathError> {
        self.submit(offset, Op::Trim { len, fua }).await
    }

    /// [`Primary::submit_write_zeroes`] with its [`Completion`].
    pub async fn write_zeroes_request(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        fua: bool,
    ) -> Result<Completion, DatapathError> {
        let op = Op::WriteZeroes {
            len,
            may_unmap,
            fua,
        };
        self.submit(offset, op).await
    }

    /// Hand one request to the volume task and wait for its completion. The task carries
    /// it through even if this future is dropped.
    async fn submit(&self, offset: u64, op: Op) -> Result<Completion, DatapathError> {
        self.submit_held(offset, op, Holds::none()).await.0
    }

    /// Flush the local disk and send Flush to every connected peer. Under protocol C this
    /// returns only after every connected peer has flushed its disk (or was disconnected).
    pub async fn flush(&self) -> Result<(), DatapathError> {
        self.flush_request().await.map(drop)
    }

    /// [`Primary::flush`], telling which connected peers were lost before their FlushAck
    /// (under C; A and B do not wait for peers).
    pub async fn flush_request(&self) -> Result<Completion, DatapathError> {
        let (reply, rx) = oneshot::channel();
        let start = Instant::now();
        self.send(Input::Flush { start, reply })?;
        rx.await.map_err(|_| DatapathError::Stopped)?.0
    }
}
