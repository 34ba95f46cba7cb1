//! The Primary's bookkeeping as a state machine without I/O: the one in-flight table of
//! claimed ranges, request numbering and epochs, and each peer's pending acknowledgements.
//! It decides what each peer is sent and when a request has heard from every peer it waits
//! for; `datapath::Primary` is its shell (budgets, the local disk, tasks, timeouts).
//!
//! ```text
//!  try_claim / release / reserve     the in-flight table (overlapping requests wait)
//!  start_request(offset, op, peers)  -> Started {seq, epoch, wait, unacknowledged}
//!  start_flush(wait)                 -> Option<WaitId>
//!  unattached_known()                known peers a flush issued now does not reach
//!  handle_peer_message(peer, msg)    RecvAck / WriteAck / FlushAck / Extension -> bytes acked
//!  handle_link_down(peer)            pending ranges out of sync, waits re-decided
//!  set_deadline(wait, at)            give up on the peers still holding `wait` at `at`
//!  poll_timeout() / handle_timeout(now) -> the peers that missed a deadline
//!  poll_action()                     <- SendRequest | Send | OutOfSync | PeersDone | Reject | Extension
//! ```
//!
//! Rules it keeps (the argument is in `datapath`'s module doc):
//!
//! - Requests and barriers are numbered and queued to every peer in one step, so each
//!   peer's link carries them in seq and epoch order.
//! - Every request stays pending on a peer until its WriteAck, whatever the protocol; the
//!   request's wait ends at the protocol's point (B: RecvAck, C: WriteAck; A waits for
//!   nothing).
//! - A known peer that does not receive a request, and every pending request of a peer
//!   whose link goes down, is reported out of sync for that peer before anything completes.
//!   A pending wait is re-decided when a link goes down, never by polling.
//! - A peer still holding a wait at the wait's deadline is named by `handle_timeout`; the
//!   shell closes its link, and the loss then ends the wait like any other (DRBD's
//!   ko-count). Time is an argument: the core reads no clock.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Instant;

use super::op::Op;
use crate::wire::{Message, ReplicationProtocol, WriteOutcome};

/// A peer attached to the Primary (one link; a reconnect is a new id).
pub type PeerId = u64;
/// A request's or flush's wait for its peers.
pub type WaitId = u64;

/// What the shell must do, in order, before it releases the core.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrimaryAction {
    /// Queue this request on the peer's link, within the budget reserved for it.
    SendRequest { peer: PeerId, msg: Message },
    /// Queue this control message (barrier, flush) on the peer's link.
    Send { peer: PeerId, msg: Message },
    /// The peer may lack this range: mark it in the peer's bitmap.
    OutOfSync { peer: String, offset: u64, len: u64 },
    /// Every peer the wait was for acknowledged or was lost; `unacknowledged` names the lost.
    PeersDone {
        wait: WaitId,
        unacknowledged: Vec<String>,
    },
    /// The peer broke the protocol: close its link with this error.
    Reject { peer: PeerId, reason: String },
    /// An Extension message (resync, verify, state) from a peer, for the engine.
    Extension { peer: String, msg: Message },
}

/// A request numbered and queued to its peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Started {
    pub seq: u64,
    pub epoch: u64,
    /// Wait for [`PrimaryAction::PeersDone`] with this id (`None`: nothing to wait for).
    pub wait: Option<WaitId>,
    /// Known peers the request was not sent to (already reported out of sync).
    pub unacknowledged: Vec<String>,
    /// Call [`PrimaryCore::request_finished`] when the request completes: under A and B,
    /// and for a FUA request, its epoch then closes.
    pub closes_epoch: bool,
}

struct PendingWrite {
    offset: u64,
    len: u64,
    /// The request's wait, until this peer reached the protocol's point.
    wait: Option<WaitId>,
}

struct PeerBook {
    id: PeerId,
    name: String,
    writes: HashMap<u64, PendingWrite>,
    flushes: HashMap<u64, WaitId>,
}

struct Wait {
    kind: WaitKind,
    left: usize,
    lost: Vec<String>,
    deadline: Option<Instant>,
}

#[derive(Clone, Copy)]
enum WaitKind {
    Request { seq: u64 },
    Flush,
}

/// The in-flight table: claimed ranges (disjoint, start → end) and the ranges that
/// `lock_range` callers wait for.
#[derive(Default)]
struct Inflight {
    claimed: BTreeMap<u64, u64>,
    reserved: Vec<(u64, u64)>,
}

/// Faults the simulator (`core::sim`) must catch; set only by tests.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct PrimaryFaults {
    /// Under C, end a request's wait as soon as it is queued, before any peer wrote it.
    pub ack_before_peer: bool,
    /// Report nothing out of sync for the pending requests of a lost peer.
    pub no_bitmap_on_loss: bool,
}

/// The Primary side of one volume's replication.
pub struct PrimaryCore {
    protocol: ReplicationProtocol,
    max_epoch_requests: u32,
    next_seq: u64,
    epoch: u64,
    epoch_requests: u32,
    next_flush_id: u64,
    next_peer: PeerId,
    next_wait: WaitId,
    /// Attached peers, in attach order.
    peers: Vec<PeerBook>,
    /// Every peer this volume replicates to, attached or not.
    known: Vec<String>,
    inflight: Inflight,
    waits: HashMap<WaitId, Wait>,
    /// Deadlines of open waits, earliest first; entries of waits that ended are skipped.
    deadlines: VecDeque<(Instant, WaitId)>,
    actions: VecDeque<PrimaryAction>,
    #[cfg(test)]
    pub(crate) faults: PrimaryFaults,
}

impl PrimaryCore {
    /// A Primary under `protocol` closing an epoch after `max_epoch_requests` requests.
    pub fn new(protocol: ReplicationProtocol, max_epoch_requests: u32) -> Self {
        PrimaryCore {
            protocol,
            max_epoch_requests: max_epoch_requests.max(1),
            next_seq: 1,
            epoch: 1,
            epoch_requests: 0,
            next_flush_id: 1,
            next_peer: 1,
            next_wait: 1,
            peers: Vec::new(),
            known: Vec::new(),
            inflight: Inflight::default(),
            waits: HashMap::new(),
            deadlines: VecDeque::new(),
            actions: VecDeque::new(),
            #[cfg(test)]
            faults: PrimaryFaults::default(),
        }
    }

    #[cfg(test)]
    fn faults(&self) -> PrimaryFaults {
        self.faults
    }

    #[cfg(not(test))]
    fn faults(&self) -> PrimaryFaults {
        PrimaryFaults::default()
    }

    // ----- the in-flight table -----

    /// Claim `[offset, end)` if no claimed range overlaps it (and, with
    /// `yield_to_reserved`, no reserved one). False changes nothing: wait for a release.
    pub fn try_claim(&mut self, offset: u64, end: u64, yield_to_reserved: bool) -> bool {
        let t = &mut self.inflight;
        // Ranges are disjoint: only the last one starting before `end` can overlap.
        let overlaps = t
            .claimed
            .range(..end)
            .next_back()
            .is_some_and(|(_, &e)| e > offset)
            || (yield_to_reserved && t.reserved.iter().any(|&(s, e)| s < end && e > offset));
        if !overlaps {
            t.claimed.insert(offset, end);
        }
        !overlaps
    }

    /// Release the range claimed at `offset`.
    pub fn release(&mut self, offset: u64) {
        self.inflight.claimed.remove(&offset);
    }

    /// New application requests overlapping `[offset, end)` wait (a resync chunk waiting
    /// for it is not starved).
    pub fn reserve(&mut self, offset: u64, end: u64) {
        self.inflight.reserved.push((offset, end));
    }

    /// Remove one reservation made with [`Self::reserve`].
    pub fn unreserve(&mut self, offset: u64, end: u64) {
        let reserved = &mut self.inflight.reserved;
        if let Some(i) = reserved.iter().position(|r| *r == (offset, end)) {
            reserved.swap_remove(i);
        }
    }

    // ----- peers -----

    /// A new link to `name` joins; it starts on an epoch boundary.
    pub fn attach_peer(&mut self, name: &str) -> PeerId {
        self.close_epoch();
        let id = self.next_peer;
        self.next_peer += 1;
        self.peers.push(PeerBook {
            id,
            name: name.to_string(),
            writes: HashMap::new(),
            flushes: HashMap::new(),
        });
        if !self.known.iter().any(|k| k == name) {
            self.known.push(name.to_string());
        }
        id
    }

    /// The peers this volume replicates to, attached or not (attached ones stay known).
    pub fn set_known_peers(&mut self, peers: &[String]) {
        let mut known = peers.to_vec();
        for p in &self.peers {
            if !known.contains(&p.name) {
                known.push(p.name.clone());
            }
        }
        self.known = known;
    }

    /// Every peer this volume replicates to, attached or not.
    pub fn known_peers(&self) -> &[String] {
        &self.known
    }

    /// Attached peers: (id, name).
    pub fn peers(&self) -> impl Iterator<Item = (PeerId, &str)> {
        self.peers.iter().map(|p| (p.id, p.name.as_str()))
    }

    /// Whether every attached peer acknowledged every request as written.
    pub fn is_replicated(&self) -> bool {
        self.peers.iter().all(|p| p.writes.is_empty())
    }

    /// The attached peers a wait still waits for.
    pub fn peers_holding(&self, wait: WaitId) -> Vec<PeerId> {
        let Some(w) = self.waits.get(&wait) else {
            return Vec::new();
        };
        let holds = |p: &PeerBook| match w.kind {
            WaitKind::Request { seq } => p.writes.get(&seq).is_some_and(|w| w.wait == Some(wait)),
            WaitKind::Flush => p.flushes.values().any(|w| *w == wait),
        };
        self.peers
            .iter()
            .filter(|p| holds(p))
            .map(|p| p.id)
            .collect()
    }

    // ----- requests -----

    /// Number `op` at `offset` and queue it to every peer in `sendable` (the attached peers
    /// whose links took its budget). Known peers left out are reported out of sync.
    pub fn start_request(&mut self, offset: u64, op: &Op, sendable: &[PeerId]) -> Started {
        let seq = self.next_seq;
        self.next_seq += 1;
        let epoch = self.epoch;
        self.epoch_requests += 1;
        let len = op.len();
        let waits_for_peer = self.protocol != ReplicationProtocol::A;
        let wait = waits_for_peer.then(|| self.new_wait());
        let msg = op.message(seq, epoch, offset, self.protocol == ReplicationProtocol::B);
        let mut sent = 0;
        for p in self.peers.iter_mut().filter(|p| sendable.contains(&p.id)) {
            p.writes.insert(seq, PendingWrite { offset, len, wait });
            self.actions.push_back(PrimaryAction::SendRequest {
                peer: p.id,
                msg: msg.clone(),
            });
            sent += 1;
        }
        if self.epoch_requests >= self.max_epoch_requests {
            self.close_epoch();
        }
        let unacknowledged: Vec<String> = self
            .known
            .iter()
            .filter(|k| {
                !self
                    .peers
                    .iter()
                    .any(|p| sendable.contains(&p.id) && p.name == **k)
            })
            .cloned()
            .collect();
        for peer in &unacknowledged {
            self.actions.push_back(PrimaryAction::OutOfSync {
                peer: peer.clone(),
                offset,
                len,
            });
        }
        let wait = wait.filter(|w| self.open_wait(*w, WaitKind::Request { seq }, sent));
        if let Some(w) = wait.filter(|_| self.faults().ack_before_peer) {
            for _ in 0..sent {
                self.ack_wait(w);
            }
            for p in &mut self.peers {
                if let Some(pending) = p.writes.get_mut(&seq) {
                    pending.wait = None;
                }
            }
        }
        Started {
            seq,
            epoch,
            wait,
            unacknowledged,
            closes_epoch: self.protocol != ReplicationProtocol::C || op.fua(),
        }
    }

    /// A request of `epoch` whose [`Started::closes_epoch`] is set completed to the
    /// application: its epoch closes if still open, so a request issued after the
    /// completion lands in a later epoch (that keeps dependent writes in order on an A/B
    /// Secondary; under C the completion already means the write is on the peers' disks).
    pub fn request_finished(&mut self, epoch: u64) {
        if self.epoch == epoch {
            self.close_epoch();
        }
    }

    /// Close the epoch and send Flush to every attached peer. With `wait` (protocol C), the
    /// returned wait ends when each peer answered FlushAck or was lost.
    pub fn start_flush(&mut self, wait: bool) -> Option<WaitId> {
        // Everything issued before this flush is ordered before it on the secondary.
        self.close_epoch();
        let id = wait.then(|| self.new_wait());
        let mut sent = 0;
        for p in &mut self.peers {
            let flush_id = self.next_flush_id;
            self.next_flush_id += 1;
            if let Some(w) = id {
                p.flushes.insert(flush_id, w);
                sent += 1;
            }
            self.actions.push_back(PrimaryAction::Send {
                peer: p.id,
                msg: Message::Flush { id: flush_id },
            });
        }
        id.filter(|w| self.open_wait(*w, WaitKind::Flush, sent))
    }

    /// Known peers not attached now: a flush issued now does not reach them, so its
    /// completion names them as unacknowledged (like a request's [`Started::unacknowledged`]).
    pub fn unattached_known(&self) -> Vec<String> {
        self.known
            .iter()
            .filter(|k| !self.peers.iter().any(|p| p.name == **k))
            .cloned()
            .collect()
    }

    /// A message from an attached peer. Returns the length of the request a WriteAck
    /// acknowledged (0 for any other message), for the shell's bytes in flight.
    pub fn handle_peer_message(&mut self, peer: PeerId, msg: Message) -> u64 {
        let Some(i) = self.peers.iter().position(|p| p.id == peer) else {
            return 0;
        };
        let mut acked = 0;
        let violation = match msg {
            Message::RecvAck { seq } => match self.peers[i].writes.get_mut(&seq) {
                Some(w) => {
                    if self.protocol == ReplicationProtocol::B {
                        if let Some(wait) = w.wait.take() {
                            self.ack_wait(wait);
                        }
                    }
                    None
                }
                None => Some(format!("RecvAck for unknown request {seq}")),
            },
            Message::WriteAck { seq, outcome } => match self.peers[i].writes.remove(&seq) {
                Some(w) => {
                    acked = w.len;
                    if outcome == WriteOutcome::Failed {
                        self.actions.push_back(PrimaryAction::OutOfSync {
                            peer: self.peers[i].name.clone(),
                            offset: w.offset,
                            len: w.len,
                        });
                    }
                    if let Some(wait) = w.wait {
                        self.ack_wait(wait);
                    }
                    None
                }
                None => Some(format!("WriteAck for unknown request {seq}")),
            },
            Message::BarrierAck { .. } => None,
            Message::FlushAck { id } => {
                // Under A/B flushes are not awaited, so unknown ids are normal.
                if let Some(wait) = self.peers[i].flushes.remove(&id) {
                    self.ack_wait(wait);
                }
                None
            }
            msg @ Message::Extension { .. } => {
                let peer = self.peers[i].name.clone();
                self.actions
                    .push_back(PrimaryAction::Extension { peer, msg });
                None
            }
            other => Some(format!(
                "unexpected message type {:#06x} from a secondary",
                other.msg_type()
            )),
        };
        if let Some(reason) = violation {
            self.actions
                .push_back(PrimaryAction::Reject { peer, reason });
        }
        acked
    }

    /// The peer's link is down: its pending requests are out of sync for it, and every wait
    /// on it ends with the peer lost. Returns how many requests were pending.
    pub fn handle_link_down(&mut self, peer: PeerId) -> usize {
        let Some(i) = self.peers.iter().position(|p| p.id == peer) else {
            return 0;
        };
        let book = self.peers.remove(i);
        let pending = book.writes.len();
        let mut writes: Vec<(u64, PendingWrite)> = book.writes.into_iter().collect();
        writes.sort_unstable_by_key(|(seq, _)| *seq);
        for (_, w) in writes {
            if !self.faults().no_bitmap_on_loss {
                self.actions.push_back(PrimaryAction::OutOfSync {
                    peer: book.name.clone(),
                    offset: w.offset,
                    len: w.len,
                });
            }
            if let Some(wait) = w.wait {
                self.lose_wait(wait, &book.name);
            }
        }
        for wait in book.flushes.into_values() {
            self.lose_wait(wait, &book.name);
        }
        pending
    }

    /// The next action.
    pub fn poll_action(&mut self) -> Option<PrimaryAction> {
        self.actions.pop_front()
    }

    // ----- acknowledgement deadlines -----

    /// Give up on the peers of an open `wait` at `deadline`: if they have not all answered
    /// by then, [`Self::handle_timeout`] names those still holding it.
    pub fn set_deadline(&mut self, wait: WaitId, deadline: Instant) {
        let Some(w) = self.waits.get_mut(&wait) else {
            return;
        };
        w.deadline = Some(deadline);
        // Deadlines normally come in order (one timeout for every wait): append.
        let at = self.deadlines.partition_point(|(d, _)| *d <= deadline);
        self.deadlines.insert(at, (deadline, wait));
    }

    /// The earliest deadline of a wait still open; call [`Self::handle_timeout`] then.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        while let Some(&(deadline, wait)) = self.deadlines.front() {
            if self
                .waits
                .get(&wait)
                .is_some_and(|w| w.deadline == Some(deadline))
            {
                return Some(deadline);
            }
            self.deadlines.pop_front();
        }
        None
    }

    /// The time is `now`: the attached peers still holding a wait whose deadline passed,
    /// each once. The shell closes their links; [`Self::handle_link_down`] then ends the
    /// waits with them lost.
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<PeerId> {
        let mut late = Vec::new();
        while self.poll_timeout().is_some_and(|d| d <= now) {
            let Some((_, wait)) = self.deadlines.pop_front() else {
                break;
            };
            if let Some(w) = self.waits.get_mut(&wait) {
                w.deadline = None;
            }
            for peer in self.peers_holding(wait) {
                if !late.contains(&peer) {
                    late.push(peer);
                }
            }
        }
        late
    }

    fn close_epoch(&mut self) {
        if self.epoch_requests == 0 {
            return;
        }
        for p in &self.peers {
            self.actions.push_back(PrimaryAction::Send {
                peer: p.id,
                msg: Message::Barrier { epoch: self.epoch },
            });
        }
        self.epoch += 1;
        self.epoch_requests = 0;
    }

    fn new_wait(&mut self) -> WaitId {
        let id = self.next_wait;
        self.next_wait += 1;
        id
    }

    /// Register a wait for `peers` answers; false (nothing registered) when there are none.
    fn open_wait(&mut self, wait: WaitId, kind: WaitKind, peers: usize) -> bool {
        if peers > 0 {
            self.waits.insert(
                wait,
                Wait {
                    kind,
                    left: peers,
                    lost: Vec::new(),
                    deadline: None,
                },
            );
        }
        peers > 0
    }

    fn ack_wait(&mut self, wait: WaitId) {
        self.end_one(wait, None);
    }

    fn lose_wait(&mut self, wait: WaitId, peer: &str) {
        self.end_one(wait, Some(peer));
    }

    fn end_one(&mut self, wait: WaitId, lost: Option<&str>) {
        let Some(w) = self.waits.get_mut(&wait) else {
            return;
        };
        if let Some(peer) = lost {
            w.lost.push(peer.to_string());
        }
        w.left -= 1;
        if w.left == 0 {
            if let Some(w) = self.waits.remove(&wait) {
                self.actions.push_back(PrimaryAction::PeersDone {
                    wait,
                    unacknowledged: w.lost,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests;
