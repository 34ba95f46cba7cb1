//! The volume task behind a [`Primary`](super::Primary): it owns the [`PrimaryCore`], the
//! attached links and every request in flight, and carries out the core's actions in
//! their order.
//!
//! A request's way through the task, each stage FIFO:
//!
//! ```text
//!  admission: bytes in flight below max_inflight_bytes
//!  -> range claim (waits while an overlapping request or a resync chunk holds it)
//!  -> local I/O starts (a small cached write waits until it is queued to the peers)
//!  -> send budget on every attached link (waits while a peer is slow)
//!  -> numbered and queued to the peers (PrimaryCore::start_request), deadline set
//!  -> local done + PeersDone -> epoch closed (A, B, FUA), range released, reply
//! ```
//!
//! The task waits on one `poll_fn` over its event sources (device completions, each link's
//! receiver, a send budget, the input channel, the core's next deadline), handles the event,
//! then runs every stage that can move.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::stream::StreamExt;
use tokio::sync::{mpsc, oneshot, watch};

use super::{Input, RangeLock, Reply, Shared};
use crate::core::op::Op;
use crate::core::primary::{PeerId, PrimaryAction, PrimaryCore, WaitId};
use crate::core::secondary::INLINE_BYTES_PER_PASS;
use crate::datapath::{Completion, DatapathError, ExtensionSink, Holds, OutOfSyncHook};
use crate::device::{BackingDevice, DeviceError, DeviceFuture};
use crate::future_set::FutureSet;
use crate::link::{LinkDown, LinkReceiver, LinkSender, SendPermit};
use crate::wire::{error_code, Message, ReplicationProtocol};

/// Messages from one peer handled in one event, at most.
const PEER_BURST: usize = 64;
/// Inputs taken in one event, at most.
const INPUT_BURST: usize = 64;

/// The local half of a request or flush, polled by the task: an aligned write or a flush
/// on the device's async ring when it has one (no thread hand-off), anything else on the
/// blocking pool.
enum LocalIo {
    Async(DeviceFuture<()>),
    Blocking(tokio::task::JoinHandle<Result<(), DeviceError>>),
}

impl LocalIo {
    fn start(device: &Arc<dyn BackingDevice>, offset: u64, op: &Op) -> LocalIo {
        if let Op::Write { data, fua } = op {
            if let Some(write) = device.write_async(offset, data, *fua) {
                return LocalIo::Async(write);
            }
        }
        let device = device.clone();
        let op = op.clone();
        LocalIo::Blocking(tokio::task::spawn_blocking(move || {
            op.apply(&*device, offset)
        }))
    }

    fn flush(device: &Arc<dyn BackingDevice>) -> LocalIo {
        if let Some(flush) = device.flush_async() {
            return LocalIo::Async(flush);
        }
        let device = device.clone();
        LocalIo::Blocking(tokio::task::spawn_blocking(move || device.flush()))
    }
}

/// A [`LocalIo`] for the in-flight operation `key`.
struct LocalRun {
    key: usize,
    op: &'static str,
    io: LocalIo,
}

impl Future for LocalRun {
    type Output = (usize, Result<(), DatapathError>);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let op = this.op;
        let result = match &mut this.io {
            LocalIo::Async(io) => match io.as_mut().poll(cx) {
                Poll::Ready(r) => r.map_err(|source| DatapathError::Local { op, source }),
                Poll::Pending => return Poll::Pending,
            },
            LocalIo::Blocking(task) => match Pin::new(task).poll(cx) {
                Poll::Ready(Ok(r)) => r.map_err(|source| DatapathError::Local { op, source }),
                Poll::Ready(Err(source)) => Err(DatapathError::LocalTask { op, source }),
                Poll::Pending => return Poll::Pending,
            },
        };
        Poll::Ready((this.key, result))
    }
}

/// A request or flush the task has taken in and not yet answered.
struct InFlightOp {
    start: Instant,
    reply: Reply,
    what: What,
    local: Local,
    peers: Peers,
    /// Known peers that did not acknowledge it (see [`Completion::unacknowledged`]).
    unacknowledged: Vec<String>,
    /// The submitter's holds: given back with the reply, or dropped here once the op is
    /// done if the submitter is gone (never while its local I/O may still run).
    holds: Holds,
}

enum What {
    Request {
        offset: u64,
        op: Op,
        /// Charged to the bytes in flight and to each link's send budget.
        cost: usize,
        /// Its range is in the core's in-flight table (a request of length 0 claims none).
        claimed: bool,
        /// Applied on the task once queued to the peers (see `datapath::write_is_inline`).
        inline: bool,
        epoch: u64,
        closes_epoch: bool,
    },
    Flush,
}

enum Local {
    NotStarted,
    Running,
    Done(Result<(), DatapathError>, Duration),
}

enum Peers {
    Waiting,
    Done(Option<Duration>),
}

/// An application request or a [`Primary::lock_range`] waiting for its range.
enum Blocked {
    Request(usize),
    Lock {
        offset: u64,
        len: u64,
        reply: oneshot::Sender<RangeLock>,
    },
}

struct Link {
    key: u64,
    name: String,
    sender: LinkSender,
    receiver: LinkReceiver,
}

type BudgetWait = Pin<Box<dyn Future<Output = Result<SendPermit, LinkDown>> + Send>>;

enum Event {
    Input(Option<Input>),
    Local(usize, Result<(), DatapathError>),
    Peer(PeerId, Option<Message>),
    Budget(PeerId, Result<SendPermit, LinkDown>),
    Timeout,
}

/// The task that owns one volume's [`PrimaryCore`].
pub(super) struct VolumeTask {
    shared: Arc<Shared>,
    on_out_of_sync: OutOfSyncHook,
    rx: mpsc::UnboundedReceiver<Input>,
    input_open: bool,
    /// Makes the [`RangeLock`]s this task hands out; weak, so the task still ends once
    /// every handle and lock is gone.
    me: mpsc::WeakUnboundedSender<Input>,
    core: PrimaryCore,
    /// Attached links by the core's id, oldest first.
    links: BTreeMap<PeerId, Link>,
    extensions: Option<ExtensionSink>,
    ops: slab::Slab<InFlightOp>,
    by_wait: HashMap<WaitId, usize>,
    /// Requests waiting for room in the bytes in flight.
    admission: VecDeque<usize>,
    inflight_bytes: usize,
    /// Requests and range locks waiting for their range.
    blocked: Vec<Blocked>,
    /// A range left the table (or a reservation went): retry `blocked`.
    released: bool,
    /// Requests with their range, waiting for send budget on every link.
    unsent: VecDeque<usize>,
    /// The send budget reserved so far for the first of `unsent`.
    permits: Vec<(PeerId, SendPermit)>,
    /// The link the first of `unsent` waits for.
    budget_wait: Option<(PeerId, BudgetWait)>,
    local: FutureSet<LocalRun>,
    replicated_waiters: Vec<oneshot::Sender<()>>,
    /// Sleeps until `timer_at`, at or before the core's next deadline (made on first use).
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// When the timer is armed to fire; `None` once it fired.
    timer_at: Option<Instant>,
    /// Bytes still allowed inline in this pass (see [`INLINE_BYTES_PER_PASS`]).
    inline_left: u64,
    /// Scratch for `start_request`.
    sendable: Vec<PeerId>,
    /// Set when `run` returns: a drop before that is a failure.
    finished: bool,
    /// Told when the task is dropped unfinished ([`Primary::failure`]).
    failure: watch::Sender<bool>,
}

/// A task dropped with local I/O still running (it panicked: tokio drops a panicked
/// task's future during the unwind): the holds of those requests (I/O gate, activity-log
/// extents, ...) go with the I/O to a task of their own, which releases each request's
/// once its disk I/O ended. Before, the unwind released them while the disk might still be
/// writing the range (found by review). The other requests never reached the disk, or are
/// done with it: their holds go now, and their submitters get `Stopped`. A runtime that is
/// shutting down refuses the task, and the holds go at once with everything else. First,
/// the unfinished requests' ranges are marked out of sync for the peers (see
/// [`VolumeTask::mark_unfinished_out_of_sync`]).
impl Drop for VolumeTask {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        // No attach or request gets in from here on.
        self.rx.close();
        self.mark_unfinished_out_of_sync();
        // The links go down with the task: the control path must not see them attached.
        self.shared.directory().links.clear();
        self.failure.send_replace(true);
        // Releasing holds calls into the engine; like the marks, while the panic unwinds.
        let mut release_failed = 0;
        let mut running: HashMap<usize, Holds> = HashMap::new();
        for (key, op) in self.ops.iter_mut() {
            let holds = std::mem::take(&mut op.holds);
            if matches!(op.local, Local::Running) && !holds.is_empty() {
                running.insert(key, holds);
            } else {
                release_failed += usize::from(release_caught(holds).is_err());
            }
        }
        if release_failed > 0 {
            tracing::error!(
                requests = release_failed,
                "releasing the holds of requests whose volume task failed panicked; \
                 their ranges may stay locked until the volume is reopened"
            );
        }
        if running.is_empty() {
            return;
        }
        let mut local = std::mem::take(&mut self.local);
        tracing::error!(
            requests = running.len(),
            "volume task ended with local I/O running; their holds wait for it"
        );
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // Not reached: the task is only dropped inside its runtime.
            tracing::error!("no runtime to wait for the local I/O; releasing its holds");
            let _ = release_caught(running);
            return;
        };
        runtime.spawn(async move {
            while let Some((key, result)) = local.next().await {
                if let Err(e) = result {
                    tracing::warn!(error = %e, "local I/O of a request whose volume task ended");
                }
                if release_caught(running.remove(&key)).is_err() {
                    tracing::error!(
                        "releasing the holds of a request whose volume task failed panicked"
                    );
                }
            }
        });
    }
}

/// Drop `holds` (which calls the engine), catching a panic: in a drop that runs while a
/// panic unwinds, a second one escaping would abort the process.
fn release_caught<T>(holds: T) -> std::thread::Result<()> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(holds)))
}

impl VolumeTask {
    /// On a drop with requests unfinished: the peers may lack whatever reached this disk,
    /// and nothing here will learn otherwise. Every request in the table that may have
    /// reached the disk (it holds its range) is out of sync for every known peer, every
    /// request still pending on an attached peer (answered already under A and B) for that
    /// peer, and every mark the core had queued that the task had not made yet. The
    /// engine's bitmaps then resync those ranges when the peers reconnect, instead of
    /// leaving them silently different.
    fn mark_unfinished_out_of_sync(&mut self) {
        // This runs while the panic that dropped the task unwinds: a second panic escaping
        // here (from the core, or from the engine's hook) would abort the process and every
        // volume in it, so each is caught, and a miss is logged.
        let hook = &self.on_out_of_sync;
        let mut missed = 0usize;
        let mut mark = |peer: &str, offset: u64, len: u64| {
            let marked =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| hook(peer, offset, len)));
            missed += usize::from(marked.is_err());
        };
        for (_, op) in &self.ops {
            if let What::Request {
                offset,
                op,
                claimed: true,
                ..
            } = &op.what
            {
                for peer in self.core.known_peers() {
                    mark(peer, *offset, op.len());
                }
            }
        }
        // Only the core knows what is pending on the peers; the panic may have come from
        // inside it. Each step is caught on its own and what the core queued is collected
        // after every step: first what it queued before the panic (a link lost just before
        // it), then each attached peer's pending requests. A panic on one peer loses
        // neither the others' marks nor those it queued before panicking.
        let attached: Vec<PeerId> = self.links.keys().copied().collect();
        let core = &mut self.core;
        let mut pending = Vec::new();
        let mut core_broken = false;
        for peer in std::iter::once(None).chain(attached.into_iter().map(Some)) {
            if let Some(peer) = peer {
                core_broken |= std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    core.handle_link_down(peer)
                }))
                .is_err();
            }
            core_broken |= std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                while let Some(action) = core.poll_action() {
                    if let PrimaryAction::OutOfSync { peer, offset, len } = action {
                        pending.push((peer, offset, len));
                    }
                }
            }))
            .is_err();
        }
        for (peer, offset, len) in pending {
            mark(&peer, offset, len);
        }
        if core_broken || missed > 0 {
            tracing::error!(
                core_broken,
                marks_failed = missed,
                "the data path's state is broken; requests that reached this disk but not \
                 yet a peer may not be marked out of sync (check with `tandem volume verify`)"
            );
        }
    }

    pub(super) fn new(
        shared: Arc<Shared>,
        on_out_of_sync: OutOfSyncHook,
        rx: mpsc::UnboundedReceiver<Input>,
        me: mpsc::WeakUnboundedSender<Input>,
        failure: watch::Sender<bool>,
    ) -> Self {
        let core = PrimaryCore::new(shared.cfg.protocol, shared.cfg.max_epoch_requests);
        VolumeTask {
            shared,
            on_out_of_sync,
            rx,
            input_open: true,
            me,
            core,
            links: BTreeMap::new(),
            extensions: None,
            ops: slab::Slab::new(),
            by_wait: HashMap::new(),
            admission: VecDeque::new(),
            inflight_bytes: 0,
            blocked: Vec::new(),
            released: false,
            unsent: VecDeque::new(),
            permits: Vec::new(),
            budget_wait: None,
            local: FutureSet::new(),
            replicated_waiters: Vec::new(),
            timer: None,
            timer_at: None,
            inline_left: INLINE_BYTES_PER_PASS as u64,
            sendable: Vec::new(),
            finished: false,
            failure,
        }
    }

    pub(super) async fn run(mut self) {
        loop {
            self.pump();
            if !self.input_open && self.ops.is_empty() && self.links.is_empty() {
                self.finished = true;
                return;
            }
            self.inline_left = INLINE_BYTES_PER_PASS as u64;
            let event = std::future::poll_fn(|cx| self.poll_event(cx)).await;
            self.handle(event);
        }
    }

    /// The next event: completions and acknowledgements (which free resources) before new
    /// input.
    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Event> {
        if !self.local.is_empty() {
            if let Poll::Ready(Some((key, result))) = self.local.poll_next_unpin(cx) {
                return Poll::Ready(Event::Local(key, result));
            }
        }
        for (&peer, link) in self.links.iter_mut() {
            if let Poll::Ready(msg) = link.receiver.poll_recv(cx) {
                return Poll::Ready(Event::Peer(peer, msg));
            }
        }
        if let Some((peer, wait)) = &mut self.budget_wait {
            if let Poll::Ready(permit) = wait.as_mut().poll(cx) {
                let peer = *peer;
                self.budget_wait = None;
                return Poll::Ready(Event::Budget(peer, permit));
            }
        }
        if self.input_open {
            if let Poll::Ready(input) = self.rx.poll_recv(cx) {
                return Poll::Ready(Event::Input(input));
            }
        }
        if let Some(deadline) = self.core.poll_timeout() {
            let timer = self
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline.into())));
            // Re-armed only for an earlier deadline (resetting takes the timer wheel's
            // lock): firing early just finds nothing due and re-arms.
            if self.timer_at.is_none_or(|at| deadline < at) {
                timer.as_mut().reset(deadline.into());
                self.timer_at = Some(deadline);
            }
            if timer.as_mut().poll(cx).is_ready() {
                self.timer_at = None;
                return Poll::Ready(Event::Timeout);
            }
        }
        Poll::Pending
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Input(Some(input)) => {
                // Take what else is queued too: requests issued together are queued to
                // the links (and submitted to the disk) together.
                self.input(input);
                for _ in 1..INPUT_BURST {
                    let Ok(input) = self.rx.try_recv() else {
                        break;
                    };
                    self.input(input);
                }
            }
            Event::Input(None) => self.input_open = false,
            Event::Local(key, result) => {
                if let Some(op) = self.ops.get_mut(key) {
                    op.local = Local::Done(result, op.start.elapsed());
                }
                self.try_complete(key);
            }
            Event::Peer(peer, Some(msg)) => self.peer_messages(peer, msg),
            Event::Peer(peer, None) => self.link_down(peer),
            Event::Budget(peer, Ok(permit)) => self.permits.push((peer, permit)),
            // The link is down: the request is not sent there (and reported out of sync).
            Event::Budget(_, Err(_)) => {}
            Event::Timeout => self.timeout(),
        }
    }

    fn input(&mut self, input: Input) {
        match input {
            Input::Request {
                offset,
                op,
                start,
                reply,
                holds,
            } => {
                let cost = op.cost().min(self.shared.cfg.max_inflight_bytes);
                let key = self.ops.insert(InFlightOp {
                    start,
                    reply,
                    what: What::Request {
                        offset,
                        op,
                        cost,
                        claimed: false,
                        inline: false,
                        epoch: 0,
                        closes_epoch: false,
                    },
                    local: Local::NotStarted,
                    peers: Peers::Waiting,
                    unacknowledged: Vec::new(),
                    holds,
                });
                self.admission.push_back(key);
            }
            Input::Flush { start, reply } => self.flush(start, reply),
            Input::LockRange { offset, len, reply } => {
                // New application requests overlapping it wait from now on.
                self.core.reserve(offset, offset + len);
                self.claim_or_block(Blocked::Lock { offset, len, reply });
            }
            Input::Release { offset } => {
                self.core.release(offset);
                self.released = true;
            }
            Input::Attach {
                key,
                name,
                sender,
                receiver,
            } => {
                let id = self.core.attach_peer(&name);
                let link = Link {
                    key,
                    name,
                    sender,
                    receiver,
                };
                self.links.insert(id, link);
            }
            Input::KnownPeers(peers) => self.core.set_known_peers(&peers),
            Input::Extensions(sink) => self.extensions = Some(sink),
            Input::WaitReplicated(tx) => {
                // Waiters whose caller gave up (a timed-out pause) are dropped.
                self.replicated_waiters.retain(|tx| !tx.is_closed());
                self.replicated_waiters.push(tx);
            }
        }
    }

    /// Move every stage that can move, until none can; then wake the callers waiting for
    /// everything to be replicated (after the out-of-sync marks of a lost peer are made).
    fn pump(&mut self) {
        loop {
            self.carry_out();
            self.admit();
            if std::mem::take(&mut self.released) {
                self.retry_blocked();
            }
            self.send_ready();
            self.carry_out();
            if !self.released && !self.admission_can_move() {
                break;
            }
        }
        self.notify_replicated();
    }

    fn admission_can_move(&self) -> bool {
        self.admission.front().is_some_and(|&key| {
            self.cost(key) + self.inflight_bytes <= self.shared.cfg.max_inflight_bytes
        })
    }

    fn cost(&self, key: usize) -> usize {
        match self.ops.get(key).map(|op| &op.what) {
            Some(What::Request { cost, .. }) => *cost,
            _ => 0,
        }
    }

    /// Admit requests in order while the bytes in flight stay within the bound (a request
    /// costs at most the bound, so a lone one always fits).
    fn admit(&mut self) {
        while self.admission_can_move() {
            let Some(key) = self.admission.pop_front() else {
                return;
            };
            self.inflight_bytes += self.cost(key);
            self.claim_or_block(Blocked::Request(key));
        }
    }

    /// Retry what waits for a range. The core's actions are carried out first, so the
    /// barrier closing a finished write's epoch is on the links before a resync chunk gets
    /// the range (the chunk goes out in a later epoch).
    fn retry_blocked(&mut self) {
        self.carry_out();
        for blocked in std::mem::take(&mut self.blocked) {
            self.claim_or_block(blocked);
        }
    }

    fn claim_or_block(&mut self, blocked: Blocked) {
        if let Some(blocked) = self.try_claim(blocked) {
            self.blocked.push(blocked);
        }
    }

    /// Claim the range `blocked` waits for if no request in flight overlaps it (a request
    /// also yields to reserved ranges); give it back if it must wait longer.
    fn try_claim(&mut self, blocked: Blocked) -> Option<Blocked> {
        match blocked {
            Blocked::Request(key) => {
                let Some(InFlightOp {
                    what:
                        What::Request {
                            offset,
                            op,
                            claimed,
                            inline,
                            ..
                        },
                    ..
                }) = self.ops.get_mut(key)
                else {
                    return None;
                };
                let len = op.len();
                if len > 0 {
                    if !self.core.try_claim(*offset, *offset + len, true) {
                        return Some(blocked);
                    }
                    *claimed = true;
                }
                // A large or durable request starts on the local disk now, in parallel
                // with the peers; a small cached write is done once the peers have it.
                if op.applies_inline(&*self.shared.device, *offset) {
                    *inline = true;
                } else {
                    self.start_local(key);
                }
                self.unsent.push_back(key);
                None
            }
            Blocked::Lock { offset, len, reply } => {
                let end = offset + len;
                if reply.is_closed() {
                    // The caller gave up waiting.
                    self.core.unreserve(offset, end);
                    self.released = true;
                    return None;
                }
                if !self.core.try_claim(offset, end, false) {
                    return Some(Blocked::Lock { offset, len, reply });
                }
                self.core.unreserve(offset, end);
                self.released = true;
                match self.me.upgrade() {
                    // A lock its caller no longer takes is dropped, which releases it.
                    Some(tx) => drop(reply.send(RangeLock {
                        tx,
                        start: Some(offset),
                    })),
                    None => self.core.release(offset),
                }
                None
            }
        }
    }

    /// Start `key`'s local I/O on the device; the task polls its completion.
    fn start_local(&mut self, key: usize) {
        let Some(InFlightOp {
            what: What::Request { offset, op, .. },
            local,
            ..
        }) = self.ops.get_mut(key)
        else {
            return;
        };
        let io = LocalIo::start(&self.shared.device, *offset, op);
        let name = op.name();
        *local = Local::Running;
        self.local.push(LocalRun { key, op: name, io });
    }

    /// Queue requests in order once every attached link has send budget for them.
    fn send_ready(&mut self) {
        while let Some(&key) = self.unsent.front() {
            if self.budget_wait.is_some() {
                return;
            }
            let cost = self.cost(key);
            for (&peer, link) in &self.links {
                if self.permits.iter().any(|(p, _)| *p == peer) {
                    continue;
                }
                match link.sender.try_reserve(cost) {
                    Ok(Some(permit)) => self.permits.push((peer, permit)),
                    Ok(None) => {
                        let sender = link.sender.clone();
                        let wait = Box::pin(async move { sender.reserve(cost).await });
                        self.budget_wait = Some((peer, wait));
                        return;
                    }
                    // Down: the request is not sent there (and reported out of sync).
                    Err(_) => {}
                }
            }
            self.unsent.pop_front();
            self.start_request(key);
        }
    }

    /// Number the request and queue it to every peer that reserved budget for it.
    fn start_request(&mut self, key: usize) {
        let Some(InFlightOp {
            what:
                What::Request {
                    offset,
                    op,
                    epoch,
                    closes_epoch,
                    inline,
                    ..
                },
            peers,
            unacknowledged,
            ..
        }) = self.ops.get_mut(key)
        else {
            return;
        };
        self.sendable.clear();
        self.sendable.extend(self.permits.iter().map(|(p, _)| *p));
        let started = self.core.start_request(*offset, op, &self.sendable);
        *epoch = started.epoch;
        *closes_epoch = started.closes_epoch;
        *unacknowledged = started.unacknowledged;
        match started.wait {
            Some(wait) => {
                self.by_wait.insert(wait, key);
                if let Some(deadline) = now().checked_add(self.shared.cfg.peer_ack_timeout) {
                    self.core.set_deadline(wait, deadline);
                }
            }
            None => *peers = Peers::Done(None),
        }
        let (len, inline) = (op.len(), *inline);
        // In flight on each link from before it is queued until its WriteAck.
        for (_, permit) in &self.permits {
            permit
                .in_flight()
                .application
                .fetch_add(len, Ordering::Relaxed);
        }
        self.carry_out();
        // Permits left over belong to links that left meanwhile: not sent there.
        for (_, permit) in self.permits.drain(..) {
            permit
                .in_flight()
                .application
                .fetch_sub(len, Ordering::Relaxed);
        }
        // At most INLINE_BYTES_PER_PASS are written on this task per pass; the rest go to
        // the device like large writes.
        if inline && self.inline_left >= len {
            self.inline_left -= len;
            self.apply_inline(key);
        } else if inline {
            self.start_local(key);
        }
        self.try_complete(key);
    }

    /// Apply a small cached write on this task, now that the peers have it queued.
    fn apply_inline(&mut self, key: usize) {
        let Some(InFlightOp {
            start,
            what: What::Request { offset, op, .. },
            local,
            ..
        }) = self.ops.get_mut(key)
        else {
            return;
        };
        let result =
            op.apply(&*self.shared.device, *offset)
                .map_err(|source| DatapathError::Local {
                    op: op.name(),
                    source,
                });
        *local = Local::Done(result, start.elapsed());
    }

    fn flush(&mut self, start: Instant, reply: Reply) {
        let wait = self.shared.cfg.protocol == ReplicationProtocol::C;
        let wait = self.core.start_flush(wait);
        // A peer already detached when the flush is issued is named, so the engine holds
        // the flush until that loss is dealt with (new generation), as for a request.
        let key = self.ops.insert(InFlightOp {
            start,
            reply,
            what: What::Flush,
            local: Local::Running,
            peers: Peers::Done(None),
            unacknowledged: self.core.unattached_known(),
            holds: Holds::none(),
        });
        if let Some(wait) = wait {
            self.ops[key].peers = Peers::Waiting;
            self.by_wait.insert(wait, key);
            if let Some(deadline) = now().checked_add(self.shared.cfg.peer_ack_timeout) {
                self.core.set_deadline(wait, deadline);
            }
        }
        let io = LocalIo::flush(&self.shared.device);
        self.local.push(LocalRun {
            key,
            op: "flush",
            io,
        });
    }

    /// Answer `key` if both its local half and its peers are done: close its epoch if it
    /// must, release its range and bytes, then reply.
    fn try_complete(&mut self, key: usize) {
        let ready = self.ops.get(key).is_some_and(|op| {
            matches!(op.local, Local::Done(..)) && matches!(op.peers, Peers::Done(_))
        });
        if !ready {
            return;
        }
        let op = self.ops.remove(key);
        if let What::Request {
            offset,
            cost,
            claimed,
            epoch,
            closes_epoch,
            ..
        } = op.what
        {
            if closes_epoch {
                self.core.request_finished(epoch);
            }
            if claimed {
                self.core.release(offset);
                self.released = true;
            }
            self.inflight_bytes -= cost;
        }
        let (Local::Done(result, local), Peers::Done(peers)) = (op.local, op.peers) else {
            return;
        };
        let completion = result.map(|()| Completion {
            unacknowledged: op.unacknowledged,
            local,
            peers,
        });
        // A submitter that gave up gets nothing: its holds are released here, now that the
        // local I/O and the peers are done, and the peers that missed the request are left
        // to the engine.
        if let Err((Ok(done), holds)) = op.reply.send((completion, op.holds)) {
            holds.release_abandoned(&done.unacknowledged);
        }
    }

    /// Carry out the core's actions in its order: every link gets requests and barriers in
    /// seq and epoch order, and a range is marked out of sync before any request it
    /// concerns is answered.
    fn carry_out(&mut self) {
        while let Some(action) = self.core.poll_action() {
            match action {
                PrimaryAction::SendRequest { peer, msg } => {
                    if let Some(i) = self.permits.iter().position(|(p, _)| *p == peer) {
                        // If the link just died, its loss reports the request.
                        let _ = self.permits.swap_remove(i).1.send(&msg);
                    }
                }
                PrimaryAction::Send { peer, msg } => {
                    if let Some(link) = self.links.get(&peer) {
                        let _ = link.sender.send_control(&msg);
                    }
                }
                PrimaryAction::OutOfSync { peer, offset, len } => {
                    (self.on_out_of_sync)(&peer, offset, len)
                }
                PrimaryAction::PeersDone {
                    wait,
                    unacknowledged,
                } => {
                    let Some(key) = self.by_wait.remove(&wait) else {
                        continue;
                    };
                    if let Some(op) = self.ops.get_mut(key) {
                        op.unacknowledged.extend(unacknowledged);
                        op.peers = Peers::Done(Some(op.start.elapsed()));
                    }
                    self.try_complete(key);
                }
                PrimaryAction::Reject { peer, reason } => {
                    if let Some(link) = self.links.get(&peer) {
                        tracing::warn!(peer = %link.name, "{reason}; disconnecting");
                        link.sender.close_with_error(error_code::PROTOCOL, &reason);
                    }
                }
                PrimaryAction::Extension { peer, msg } => match &self.extensions {
                    Some(sink) => {
                        let _ = sink.send((peer, msg));
                    }
                    None => tracing::debug!(peer = %peer, msg_type = msg.msg_type(),
                        "no extension handler; ignoring message"),
                },
            }
        }
    }

    /// A message from a peer, and those queued behind it (one pass for a burst of
    /// acknowledgements).
    fn peer_messages(&mut self, peer: PeerId, msg: Message) {
        let Some(link) = self.links.get_mut(&peer) else {
            return;
        };
        let mut acked = self.core.handle_peer_message(peer, msg);
        for _ in 1..PEER_BURST {
            let Some(msg) = link.receiver.try_recv() else {
                break;
            };
            acked += self.core.handle_peer_message(peer, msg);
        }
        if acked > 0 {
            let in_flight = &link.receiver.in_flight().application;
            in_flight.fetch_sub(acked, Ordering::Relaxed);
        }
    }

    /// The link is down: nothing pending on this peer will be acknowledged any more.
    fn link_down(&mut self, peer: PeerId) {
        let Some(link) = self.links.remove(&peer) else {
            return;
        };
        let pending = self.core.handle_link_down(peer);
        self.shared
            .directory()
            .links
            .retain(|(key, ..)| *key != link.key);
        let reason = link
            .receiver
            .down_reason()
            .map(|r| r.to_string())
            .unwrap_or_default();
        tracing::warn!(
            peer = %link.name,
            reason,
            pending_requests = pending,
            "peer disconnected; its pending requests are out of sync"
        );
    }

    /// Peers silent past a deadline are disconnected; their loss ends the waits on them.
    fn timeout(&mut self) {
        let timeout = self.shared.cfg.peer_ack_timeout;
        for peer in self.core.handle_timeout(now()) {
            if let Some(link) = self.links.get(&peer) {
                tracing::warn!(peer = %link.name, ?timeout, "peer did not acknowledge a request in time; disconnecting");
                link.sender.close(&format!(
                    "peer did not acknowledge a request within {timeout:?}"
                ));
            }
        }
    }

    fn notify_replicated(&mut self) {
        if !self.replicated_waiters.is_empty() && self.core.is_replicated() {
            for tx in self.replicated_waiters.drain(..) {
                let _ = tx.send(());
            }
        }
    }
}

/// The time the task's timer runs on (tokio's clock, so a paused test clock stays
/// consistent with the deadlines).
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}
