//! The Secondary's apply pipeline as a state machine without I/O: it takes the Primary's
//! messages and the completions of the work it started, and says what to send, what to run
//! on the device and when the link must close. `datapath::run_secondary` is its shell.
//!
//! ```text
//!  handle_message(msg, size) --> validate (range, epoch) --> queue (link order)
//!  handle_done(held, reply)  --> inflight -= 1, Send(ack) or Fail
//!  poll_action()             <-- Send | Start(Job) | Extension | Fail
//! ```
//!
//! Rules it keeps (DRBD semantics; the argument is in `datapath`'s module doc):
//!
//! - **Epoch order.** Everything queued up to a Barrier may run concurrently; nothing after
//!   the Barrier starts, and the BarrierAck is not sent, before all of it completed. The
//!   disk is therefore always a prefix of the Primary's history in epoch order.
//! - **No acknowledgement without the work.** A request is acknowledged only by its
//!   completion (`handle_done` with the shell's reply); protocol B's RecvAck is sent on
//!   receipt, as the protocol says.
//! - **A failure stops the pipeline.** After a failed job nothing more starts and the shell
//!   is told to close the link with an error ([`SecondaryAction::Fail`]): the Primary then
//!   counts the request as not replicated here.
//! - **Bounded memory.** [`SecondaryCore::wants_input`] is false while the bytes received
//!   and not yet completed reach the bound.
//! - **Inline writes.** A small page-aligned write without FUA on a device with cached
//!   writes may be applied on the shell's task ([`Job::inline`]), at most
//!   [`INLINE_BYTES_PER_PASS`] per pass (a pass ends when [`SecondaryCore::poll_action`]
//!   returns `None`).

use std::collections::VecDeque;

use bytes::Bytes;

use super::op::{Op, FRAME_OVERHEAD};
use crate::datapath::DatapathError;
use crate::resync::proto::ResyncMsg;
use crate::resync::ResyncSummary;
use crate::wire::{Message, RangeRequest};

/// Writes up to this size may be applied inline.
pub(crate) const INLINE_WRITE_MAX: usize = 128 << 10;
/// Bytes applied inline per pass of the shell's loop; the rest goes to the blocking pool, so
/// one pass never holds the shell's thread long.
pub const INLINE_BYTES_PER_PASS: usize = 1 << 20;

/// Whether a write may be applied on the calling task rather than on the blocking pool (see
/// `datapath::write_is_inline`).
pub(crate) fn write_may_be_inline(cached_writes: bool, offset: u64, len: usize, fua: bool) -> bool {
    const PAGE: u64 = 4096;
    !fua && cached_writes
        && len <= INLINE_WRITE_MAX
        && offset.is_multiple_of(PAGE)
        && (len as u64).is_multiple_of(PAGE)
}

/// Work the shell carries out on the device, then reports with
/// [`SecondaryCore::handle_done`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Work {
    /// Apply a replicated request (inside the write-intent log); reply with its WriteAck.
    Request { seq: u64, offset: u64, op: Op },
    /// Flush the device; reply with FlushAck.
    Flush { id: u64 },
    /// Write resync data durably; reply with its DataAck.
    ResyncData { id: u64, offset: u64, data: Bytes },
    /// Zero a range that is zeroes on the resync source, durably; reply with its DataAck.
    ResyncZeroes { id: u64, offset: u64, len: u64 },
    /// Compare the local range with the source's digests; reply with the DigestReply.
    ResyncDigest {
        id: u64,
        offset: u64,
        len: u32,
        digests: Bytes,
    },
    /// The resync source sent everything: flush, record the end, reply with DoneAck.
    ResyncDone { summary: ResyncSummary },
}

impl Work {
    /// The work's name in errors and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Work::Request { op, .. } => op.name(),
            Work::Flush { .. } => "flush",
            Work::ResyncData { .. } | Work::ResyncZeroes { .. } => "resync write",
            Work::ResyncDigest { .. } => "resync compare",
            Work::ResyncDone { .. } => "resync end",
        }
    }
}

/// One piece of [`Work`] started by the core.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub work: Work,
    /// Bytes this job holds; hand them back with [`SecondaryCore::handle_done`].
    pub held: usize,
    /// The shell may apply it on its own task (if its write-intent log takes the range
    /// without waiting); otherwise it runs where blocking is allowed.
    pub inline: bool,
}

/// What the shell must do next, in order.
#[derive(Debug)]
pub enum SecondaryAction {
    /// Send this control message to the Primary.
    Send(Message),
    /// Carry out this job on the device.
    Start(Job),
    /// Hand this Extension message (state, UUIDs, bitmaps, resync replies) to the engine.
    Extension(Message),
    /// This replica could not do a job: send no acknowledgement for it, close the link with
    /// an error naming the cause. Nothing more starts.
    Fail(DatapathError),
}

enum Queued {
    Job(Job),
    Barrier { epoch: u64 },
}

/// The Secondary side of one replication link.
pub struct SecondaryCore {
    cached_writes: bool,
    max_held: usize,
    queue: VecDeque<Queued>,
    /// Jobs started and not yet done (all of the oldest epoch).
    inflight: usize,
    /// Bytes received and not yet done.
    held: usize,
    /// The epoch the next request must belong to (`None` until the first one arrives).
    recv_epoch: Option<u64>,
    /// A job failed: nothing more starts.
    stopped: bool,
    /// The link is down: nothing more is received or acknowledged.
    link_down: bool,
    /// The Primary completes requests on their RecvAck (protocol B).
    acks_on_receipt: bool,
    inline_left: usize,
    actions: VecDeque<SecondaryAction>,
    /// Test-only fault: acknowledge a barrier without waiting for its epoch.
    #[cfg(test)]
    fault_barrier_early: bool,
}

impl SecondaryCore {
    /// A pipeline for a device with (or without) cached writes that holds at most
    /// `max_held` bytes received but not yet applied.
    pub fn new(cached_writes: bool, max_held: usize) -> Self {
        SecondaryCore {
            cached_writes,
            max_held,
            queue: VecDeque::new(),
            inflight: 0,
            held: 0,
            recv_epoch: None,
            stopped: false,
            link_down: false,
            acks_on_receipt: false,
            inline_left: INLINE_BYTES_PER_PASS,
            actions: VecDeque::new(),
            #[cfg(test)]
            fault_barrier_early: false,
        }
    }

    /// Whether the shell should read the next message from the link.
    pub fn wants_input(&self) -> bool {
        !self.stopped && !self.link_down && self.held < self.max_held
    }

    /// Jobs started and not yet reported done.
    pub fn inflight(&self) -> usize {
        self.inflight
    }

    /// A message from the Primary; `device_size` is the local device's size now. An error
    /// means the Primary broke the protocol: the shell closes the link with it.
    pub fn handle_message(&mut self, msg: Message, device_size: u64) -> Result<(), DatapathError> {
        let (work, held) = match msg {
            Message::Write(w) => {
                self.check_epoch(w.epoch, "write")?;
                check_range(w.offset, w.data.len() as u64, device_size)?;
                if w.ack_on_receive {
                    self.acks_on_receipt = true;
                    self.actions
                        .push_back(SecondaryAction::Send(Message::RecvAck { seq: w.seq }));
                }
                let held = w.data.len() + FRAME_OVERHEAD;
                let inline = !w.ack_on_receive
                    && write_may_be_inline(self.cached_writes, w.offset, w.data.len(), w.fua);
                let work = Work::Request {
                    seq: w.seq,
                    offset: w.offset,
                    op: Op::Write {
                        data: w.data,
                        fua: w.fua,
                    },
                };
                self.enqueue(Job { work, held, inline });
                return Ok(());
            }
            Message::Trim(r) => {
                let op = Op::Trim {
                    len: r.len,
                    fua: r.fua,
                };
                (self.range_work(&r, op, device_size)?, FRAME_OVERHEAD)
            }
            Message::WriteZeroes(r) => {
                let op = Op::WriteZeroes {
                    len: r.len,
                    may_unmap: r.may_unmap,
                    fua: r.fua,
                };
                (self.range_work(&r, op, device_size)?, FRAME_OVERHEAD)
            }
            Message::Barrier { epoch } => {
                self.check_epoch(epoch, "barrier")?;
                let next = epoch.checked_add(1).ok_or_else(|| {
                    DatapathError::PeerProtocol(format!("barrier for the last epoch {epoch}"))
                })?;
                self.recv_epoch = Some(next);
                self.queue.push_back(Queued::Barrier { epoch });
                self.pump();
                return Ok(());
            }
            Message::Flush { id } => (Work::Flush { id }, 0),
            msg @ Message::Extension { .. } => match resync_work(&msg, device_size)? {
                Some(ordered) => ordered,
                None => {
                    self.actions.push_back(SecondaryAction::Extension(msg));
                    return Ok(());
                }
            },
            other => {
                return Err(DatapathError::PeerProtocol(format!(
                    "unexpected message type {:#06x} from a primary",
                    other.msg_type()
                )))
            }
        };
        self.enqueue(Job {
            work,
            held,
            inline: false,
        });
        Ok(())
    }

    /// A started job finished: `reply` is its acknowledgement, or what this replica failed
    /// to do before it could send one.
    pub fn handle_done(&mut self, held: usize, reply: Result<Message, DatapathError>) {
        self.inflight -= 1;
        self.held -= held;
        match reply {
            Ok(ack) => self.actions.push_back(SecondaryAction::Send(ack)),
            Err(e) => {
                self.stopped = true;
                self.actions.push_back(SecondaryAction::Fail(e));
            }
        }
        self.pump();
    }

    /// A started job the shell did not run, because a job before it failed: forget it
    /// (no acknowledgement).
    pub fn handle_abandoned(&mut self, held: usize) {
        self.inflight -= 1;
        self.held -= held;
    }

    /// The link is down: nothing is acknowledged any more, and jobs already started still
    /// report with [`Self::handle_done`]. Under protocol B the Primary may have completed
    /// queued requests on their RecvAck: they are in this replica's memory only, and a
    /// failover to it must find them, so every queued request still starts, in epoch order
    /// (as DRBD's Secondary writes what it received). Anything else queued (flushes, resync
    /// work), and under A and C everything queued, is dropped: the Primary counts it as
    /// not acknowledged.
    pub fn handle_link_down(&mut self) {
        self.link_down = true;
        let keep_requests = self.acks_on_receipt;
        let mut dropped = 0;
        self.queue.retain(|q| match q {
            Queued::Barrier { .. } => keep_requests,
            Queued::Job(job) => {
                let keep = keep_requests && matches!(job.work, Work::Request { .. });
                if !keep {
                    dropped += job.held;
                }
                keep
            }
        });
        self.held -= dropped;
        self.pump();
    }

    /// The next action; `None` ends the shell's pass.
    pub fn poll_action(&mut self) -> Option<SecondaryAction> {
        let action = self.actions.pop_front();
        if action.is_none() {
            self.inline_left = INLINE_BYTES_PER_PASS;
        }
        action
    }

    fn check_epoch(&mut self, epoch: u64, what: &str) -> Result<(), DatapathError> {
        match self.recv_epoch {
            None => {
                self.recv_epoch = Some(epoch);
                Ok(())
            }
            Some(e) if e == epoch => Ok(()),
            Some(e) => Err(DatapathError::PeerProtocol(format!(
                "{what} for epoch {epoch} while epoch {e} is open"
            ))),
        }
    }

    fn range_work(
        &mut self,
        r: &RangeRequest,
        op: Op,
        device_size: u64,
    ) -> Result<Work, DatapathError> {
        self.check_epoch(r.epoch, "request")?;
        check_range(r.offset, r.len, device_size)?;
        if r.ack_on_receive {
            self.acks_on_receipt = true;
            self.actions
                .push_back(SecondaryAction::Send(Message::RecvAck { seq: r.seq }));
        }
        Ok(Work::Request {
            seq: r.seq,
            offset: r.offset,
            op,
        })
    }

    fn enqueue(&mut self, job: Job) {
        self.held += job.held;
        self.queue.push_back(Queued::Job(job));
        self.pump();
    }

    /// Start every queued job of the current epoch; finish the epoch at its barrier once all
    /// its jobs are done.
    fn pump(&mut self) {
        while !self.stopped {
            match self.queue.front() {
                None => return,
                Some(Queued::Barrier { epoch }) => {
                    if self.inflight > 0 && !self.fault_barrier_early() {
                        return;
                    }
                    let epoch = *epoch;
                    self.queue.pop_front();
                    self.actions
                        .push_back(SecondaryAction::Send(Message::BarrierAck { epoch }));
                }
                Some(Queued::Job(_)) => {
                    let Some(Queued::Job(mut job)) = self.queue.pop_front() else {
                        return;
                    };
                    if job.inline {
                        let len = match &job.work {
                            Work::Request { op, .. } => op.len() as usize,
                            _ => 0,
                        };
                        match self.inline_left.checked_sub(len) {
                            Some(left) => self.inline_left = left,
                            None => job.inline = false,
                        }
                    }
                    self.inflight += 1;
                    self.actions.push_back(SecondaryAction::Start(job));
                }
            }
        }
    }
}

impl SecondaryCore {
    #[cfg(test)]
    fn fault_barrier_early(&self) -> bool {
        self.fault_barrier_early
    }

    #[cfg(not(test))]
    fn fault_barrier_early(&self) -> bool {
        false
    }
}

fn check_range(offset: u64, len: u64, size: u64) -> Result<(), DatapathError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(DatapathError::PeerOutOfRange { offset, len, size }),
    }
}

/// Resync data, digests and the resync end become ordered work; any other Extension
/// (including resync replies, when this node is a source on the link) is `None`.
fn resync_work(msg: &Message, device_size: u64) -> Result<Option<(Work, usize)>, DatapathError> {
    let Some(decoded) = ResyncMsg::from_message(msg) else {
        return Ok(None);
    };
    let decoded = decoded.map_err(|e| DatapathError::PeerProtocol(e.to_string()))?;
    Ok(Some(match decoded {
        ResyncMsg::Data { id, offset, data } => {
            check_range(offset, data.len() as u64, device_size)?;
            let held = data.len() + FRAME_OVERHEAD;
            (Work::ResyncData { id, offset, data }, held)
        }
        ResyncMsg::Zeroes { id, offset, len } => {
            check_range(offset, len, device_size)?;
            (Work::ResyncZeroes { id, offset, len }, FRAME_OVERHEAD)
        }
        ResyncMsg::Digest {
            id,
            offset,
            len,
            digests,
        } => {
            check_range(offset, u64::from(len), device_size)?;
            // The local read of the range is held too.
            let held = digests.len() + len as usize + FRAME_OVERHEAD;
            let work = Work::ResyncDigest {
                id,
                offset,
                len,
                digests,
            };
            (work, held)
        }
        ResyncMsg::Done {
            sent_bytes,
            skipped_bytes,
        } => {
            let summary = ResyncSummary {
                sent_bytes,
                skipped_bytes,
            };
            (Work::ResyncDone { summary }, FRAME_OVERHEAD)
        }
        _ => return Ok(None),
    }))
}

#[cfg(test)]
mod tests;
