//! A replicated request's operation (write, trim, write-zeroes) as both sides see it: its
//! length, its cost against memory budgets, and the wire message that carries it. Carrying
//! it out on a device is the shell's job (`datapath`).

use bytes::Bytes;

use crate::wire::{Message, RangeRequest, WriteRequest};

/// Room for a frame's header and fixed fields, charged to budgets per request.
pub(crate) const FRAME_OVERHEAD: usize = 64;
/// Cost charged to budgets for a request without payload.
const NOMINAL_REQUEST_COST: usize = 4096;

/// What a replicated request does to its range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Write `data` (durably before completion when `fua`).
    Write { data: Bytes, fua: bool },
    /// Discard the range.
    Trim { len: u64, fua: bool },
    /// Zero the range, deallocating it if `may_unmap`.
    WriteZeroes {
        len: u64,
        may_unmap: bool,
        fua: bool,
    },
}

impl Op {
    /// Bytes of the range.
    pub fn len(&self) -> u64 {
        match self {
            Op::Write { data, .. } => data.len() as u64,
            Op::Trim { len, .. } | Op::WriteZeroes { len, .. } => *len,
        }
    }

    /// Whether the range is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the request must be durable before it completes.
    pub fn fua(&self) -> bool {
        match self {
            Op::Write { fua, .. } | Op::Trim { fua, .. } | Op::WriteZeroes { fua, .. } => *fua,
        }
    }

    /// Bytes charged to in-flight budgets.
    pub(crate) fn cost(&self) -> usize {
        match self {
            Op::Write { data, .. } => data.len().max(1) + FRAME_OVERHEAD,
            _ => NOMINAL_REQUEST_COST,
        }
    }

    /// The operation's name in errors and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Write { .. } => "write",
            Op::Trim { .. } => "trim",
            Op::WriteZeroes { .. } => "write zeroes",
        }
    }

    /// The wire message that replicates this request.
    pub fn message(&self, seq: u64, epoch: u64, offset: u64, ack_on_receive: bool) -> Message {
        match self {
            Op::Write { data, fua } => Message::Write(WriteRequest {
                seq,
                epoch,
                offset,
                fua: *fua,
                ack_on_receive,
                data: data.clone(),
            }),
            Op::Trim { len, fua } => Message::Trim(RangeRequest {
                seq,
                epoch,
                offset,
                len: *len,
                fua: *fua,
                ack_on_receive,
                may_unmap: false,
            }),
            Op::WriteZeroes {
                len,
                may_unmap,
                fua,
            } => Message::WriteZeroes(RangeRequest {
                seq,
                epoch,
                offset,
                len: *len,
                fua: *fua,
                ack_on_receive,
                may_unmap: *may_unmap,
            }),
        }
    }
}
