//! The engine's Extension messages (types 0x0100–0x013F, see replication/README.md): state exchange at
//! connect and on every change, new generations, and the witness relay for outdating.
//! Encoding and checked decoding only; no I/O.
//!
//! ```text
//! 0x0100 State        version u8 (2) | role u8 | disk u8 | flags u8 | size u64
//!                     | promoted_at u64 | changed_blocks u64
//!                     | primaries (u8 count, each u8 len + name)
//!                     | uuids (u32 len + UuidSet::to_wire, empty on a diskless node)
//!                     | seen lineages (u8 count, each name + u8 count + generation u64
//!                       each; only a tiebreaker fills it: the lineage, current first,
//!                       it last saw from each data replica)
//!                     flags: 1 allow-two-primaries, 2 diskless, 4 discard-my-data,
//!                            8 has-quorum, 16 leaving (clean goodbye), 32 handshake,
//!                            64 keep-my-data (the operator chose this side)
//! 0x0101 NewCurrent   generation u64 | names of replicas that do not receive its writes
//! 0x0102 Outdate      request id u64 | target name | requester name
//!                     | generation u64 (the requester's current: a target that moved on
//!                       from it answers stale)
//! 0x0103 OutdateReply request id u64 | target name | requester name | result u8
//!                     (0 outdated, 1 unreachable, 2 refused, 3 stale)
//! 0x0104 BitmapRuns   last u8 | count u32 | (offset u64, len u64) x count  (at most
//!                     MAX_RUNS_PER_MESSAGE): the SyncTarget's bitmap for the source, so
//!                     the source resyncs the union of both bitmaps; outside a handshake,
//!                     from a Secondary to the Primary it follows: a reconciliation
//!                     request (`reconcile.rs`)
//! ```
//! All integers little-endian; names are 1..=64 bytes of UTF-8.

use bytes::Bytes;

use crate::core::promotion::PeerFacts;
use crate::generation::{Generation, UuidDecodeError, UuidSet};
use crate::role::{DiskState, Role};
use crate::wire::Message;

/// State exchange.
pub const MSG_STATE: u16 = 0x0100;
/// A Primary started a new generation.
pub const MSG_NEW_CURRENT: u16 = 0x0101;
/// Outdate a replica (relayed through a tiebreaker).
pub const MSG_OUTDATE: u16 = 0x0102;
/// Answer to [`MSG_OUTDATE`].
pub const MSG_OUTDATE_REPLY: u16 = 0x0103;
/// The target's bitmap runs for the source.
pub const MSG_BITMAP_RUNS: u16 = 0x0104;
/// Two-phase promotion, phase 1: "may I become Primary?" (see `twopc.rs`).
pub const MSG_PROMOTE_PREPARE: u16 = 0x0105;
/// Answer to [`MSG_PROMOTE_PREPARE`].
pub const MSG_PROMOTE_REPLY: u16 = 0x0106;
/// Two-phase promotion, phase 2: commit (the sender is Primary now) or abort.
pub const MSG_PROMOTE_DECISION: u16 = 0x0107;
/// Runs per [`MSG_BITMAP_RUNS`] message.
pub const MAX_RUNS_PER_MESSAGE: usize = 4096;

const MAX_NAME: usize = 64;
const MAX_NAMES: usize = 32;
/// Generations in a relayed lineage: the current and the whole history.
const MAX_LINEAGE: usize = 1 + crate::generation::HISTORY_LEN;
const STATE_VERSION: u8 = 2;

/// A malformed engine message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    #[error("engine message {msg_type:#06x} truncated")]
    Truncated { msg_type: u16 },
    #[error("engine message {msg_type:#06x}: {what}")]
    Invalid { msg_type: u16, what: String },
    #[error("engine message carries a bad uuid set")]
    Uuids(#[source] UuidDecodeError),
    #[error("unknown engine message type {0:#06x}")]
    UnknownType(u16),
}

/// One node's state as sent to a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerState {
    pub role: Role,
    pub disk: DiskState,
    pub allow_two_primaries: bool,
    pub diskless: bool,
    pub discard_my_data: bool,
    /// The operator chose this side's data over the peer's (the peer discards).
    pub keep_my_data: bool,
    pub has_quorum: bool,
    pub leaving: bool,
    pub handshake: bool,
    pub size: u64,
    /// Unix seconds of the last promotion (0 = none known).
    pub promoted_at: u64,
    /// Blocks set in the sender's bitmap for the receiver.
    pub changed_blocks: u64,
    /// Nodes the sender knows to be Primary (itself included).
    pub primaries: Vec<String>,
    /// The sender's generations (None on a diskless node).
    pub uuids: Option<UuidSet>,
    /// From a tiebreaker only: the lineage (current generation first, then history) it
    /// last saw from each data replica (kept while that replica is away), so a replica
    /// cut off from the others learns that one of them moved on without it.
    pub seen_lineages: Vec<(String, Vec<Generation>)>,
}

pub use crate::core::promotion::{OutdateResult, PromoteAnswer};

/// What the promotion rules know of the member `name` from the `state` it last sent on a
/// link that is up (`None`: not connected). Graceful leaving and joining are the caller's.
pub(crate) fn peer_facts(name: &str, diskful: bool, state: Option<&PeerState>) -> PeerFacts {
    PeerFacts {
        name: name.to_string(),
        diskful,
        connected: state.is_some(),
        role: state.map_or(Role::Unknown, |s| s.role),
        disk: state.map_or(DiskState::DUnknown, |s| s.disk),
        relayed_primaries: state
            .filter(|s| s.diskless)
            .map(|s| s.primaries.clone())
            .unwrap_or_default(),
        left_gracefully: false,
        joining: false,
    }
}

/// A decoded engine message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineMessage {
    State(Box<PeerState>),
    NewCurrent {
        generation: Generation,
        disconnected: Vec<String>,
    },
    Outdate {
        id: u64,
        target: String,
        requester: String,
        /// The requester's current generation when the request was sent.
        generation: Generation,
    },
    OutdateReply {
        id: u64,
        target: String,
        requester: String,
        result: OutdateResult,
    },
    BitmapRuns {
        runs: Vec<(u64, u64)>,
        last: bool,
    },
    PromotePrepare {
        id: u64,
        /// The requester has allow-two-primaries on (protocol C).
        two_primaries: bool,
    },
    PromoteReply {
        id: u64,
        answer: PromoteAnswer,
    },
    PromoteDecision {
        id: u64,
        commit: bool,
    },
}

fn role_byte(r: Role) -> u8 {
    match r {
        Role::Primary => 1,
        Role::Secondary => 0,
        _ => 2,
    }
}

fn put_name(out: &mut Vec<u8>, name: &str) {
    let b = name.as_bytes();
    let n = b.len().min(MAX_NAME);
    out.push(n as u8);
    out.extend_from_slice(&b[..n]);
}

impl EngineMessage {
    /// A bitmap as [`EngineMessage::BitmapRuns`] messages of at most
    /// [`MAX_RUNS_PER_MESSAGE`] runs, the last one flagged; an empty bitmap is one empty,
    /// last message.
    pub fn bitmap_runs(runs: &[(u64, u64)]) -> Vec<EngineMessage> {
        let mut chunks: Vec<&[(u64, u64)]> = runs.chunks(MAX_RUNS_PER_MESSAGE).collect();
        if chunks.is_empty() {
            chunks.push(&[]);
        }
        let n = chunks.len();
        chunks
            .into_iter()
            .enumerate()
            .map(|(i, c)| EngineMessage::BitmapRuns {
                runs: c.to_vec(),
                last: i + 1 == n,
            })
            .collect()
    }

    /// The wire message.
    pub fn to_message(&self) -> Message {
        let mut out = Vec::with_capacity(128);
        let msg_type = match self {
            EngineMessage::State(s) => {
                out.push(STATE_VERSION);
                out.push(role_byte(s.role));
                let disk = DiskState::ALL
                    .iter()
                    .position(|d| *d == s.disk)
                    .unwrap_or(0);
                out.push(disk as u8);
                out.push(
                    u8::from(s.allow_two_primaries)
                        | u8::from(s.diskless) << 1
                        | u8::from(s.discard_my_data) << 2
                        | u8::from(s.has_quorum) << 3
                        | u8::from(s.leaving) << 4
                        | u8::from(s.handshake) << 5
                        | u8::from(s.keep_my_data) << 6,
                );
                out.extend_from_slice(&s.size.to_le_bytes());
                out.extend_from_slice(&s.promoted_at.to_le_bytes());
                out.extend_from_slice(&s.changed_blocks.to_le_bytes());
                let names: Vec<&String> = s.primaries.iter().take(MAX_NAMES).collect();
                out.push(names.len() as u8);
                for n in names {
                    put_name(&mut out, n);
                }
                let uuids = s.uuids.as_ref().map(|u| u.to_wire()).unwrap_or_default();
                out.extend_from_slice(&(uuids.len() as u32).to_le_bytes());
                out.extend_from_slice(&uuids);
                let seen = &s.seen_lineages[..s.seen_lineages.len().min(MAX_NAMES)];
                out.push(seen.len() as u8);
                for (name, lineage) in seen {
                    put_name(&mut out, name);
                    let lineage = &lineage[..lineage.len().min(MAX_LINEAGE)];
                    out.push(lineage.len() as u8);
                    for g in lineage {
                        out.extend_from_slice(&g.raw().to_le_bytes());
                    }
                }
                MSG_STATE
            }
            EngineMessage::NewCurrent {
                generation,
                disconnected,
            } => {
                out.extend_from_slice(&generation.raw().to_le_bytes());
                let names: Vec<&String> = disconnected.iter().take(MAX_NAMES).collect();
                out.push(names.len() as u8);
                for n in names {
                    put_name(&mut out, n);
                }
                MSG_NEW_CURRENT
            }
            EngineMessage::Outdate {
                id,
                target,
                requester,
                generation,
            } => {
                out.extend_from_slice(&id.to_le_bytes());
                put_name(&mut out, target);
                put_name(&mut out, requester);
                out.extend_from_slice(&generation.raw().to_le_bytes());
                MSG_OUTDATE
            }
            EngineMessage::OutdateReply {
                id,
                target,
                requester,
                result,
            } => {
                out.extend_from_slice(&id.to_le_bytes());
                put_name(&mut out, target);
                put_name(&mut out, requester);
                out.push(match result {
                    OutdateResult::Outdated => 0,
                    OutdateResult::Unreachable => 1,
                    OutdateResult::Refused => 2,
                    OutdateResult::Stale => 3,
                });
                MSG_OUTDATE_REPLY
            }
            EngineMessage::BitmapRuns { runs, last } => {
                out.push(u8::from(*last));
                let runs = &runs[..runs.len().min(MAX_RUNS_PER_MESSAGE)];
                out.extend_from_slice(&(runs.len() as u32).to_le_bytes());
                for (o, l) in runs {
                    out.extend_from_slice(&o.to_le_bytes());
                    out.extend_from_slice(&l.to_le_bytes());
                }
                MSG_BITMAP_RUNS
            }
            EngineMessage::PromotePrepare { id, two_primaries } => {
                out.extend_from_slice(&id.to_le_bytes());
                out.push(u8::from(*two_primaries));
                MSG_PROMOTE_PREPARE
            }
            EngineMessage::PromoteReply { id, answer } => {
                out.extend_from_slice(&id.to_le_bytes());
                match answer {
                    PromoteAnswer::Yes => out.push(0),
                    PromoteAnswer::Primary { node } => {
                        out.push(1);
                        put_name(&mut out, node);
                    }
                    PromoteAnswer::TwoPrimariesOff { node } => {
                        out.push(2);
                        put_name(&mut out, node);
                    }
                    PromoteAnswer::Promoting { node } => {
                        out.push(3);
                        put_name(&mut out, node);
                    }
                    PromoteAnswer::Closing => out.push(4),
                    PromoteAnswer::Snapshotting { node } => {
                        out.push(5);
                        put_name(&mut out, node);
                    }
                }
                MSG_PROMOTE_REPLY
            }
            EngineMessage::PromoteDecision { id, commit } => {
                out.extend_from_slice(&id.to_le_bytes());
                out.push(u8::from(*commit));
                MSG_PROMOTE_DECISION
            }
        };
        Message::Extension {
            msg_type,
            flags: 0,
            payload: Bytes::from(out),
        }
    }

    /// Whether `msg_type` is one of the engine's.
    pub fn is_engine_type(msg_type: u16) -> bool {
        (0x0100..=0x013f).contains(&msg_type)
    }

    /// Decode an Extension payload of type `msg_type`.
    pub fn decode(msg_type: u16, payload: &[u8]) -> Result<EngineMessage, MessageError> {
        let mut r = Reader {
            buf: payload,
            pos: 0,
            msg_type,
        };
        let msg = match msg_type {
            MSG_STATE => {
                let version = r.u8()?;
                if version != STATE_VERSION {
                    return Err(r.invalid(format!("state version {version}")));
                }
                let role = match r.u8()? {
                    0 => Role::Secondary,
                    1 => Role::Primary,
                    b => return Err(r.invalid(format!("role byte {b}"))),
                };
                let d = r.u8()? as usize;
                let disk = *DiskState::ALL
                    .get(d)
                    .ok_or_else(|| r.invalid(format!("disk state {d}")))?;
                let f = r.u8()?;
                if f & !0x7f != 0 {
                    return Err(r.invalid(format!("state flags {f:#x}")));
                }
                let size = r.u64()?;
                let promoted_at = r.u64()?;
                let changed_blocks = r.u64()?;
                let n = r.u8()? as usize;
                if n > MAX_NAMES {
                    return Err(r.invalid(format!("{n} primaries")));
                }
                let mut primaries = Vec::with_capacity(n);
                for _ in 0..n {
                    primaries.push(r.name()?);
                }
                let len = r.u32()? as usize;
                let bytes = r.take(len)?;
                let uuids = if len == 0 {
                    None
                } else {
                    Some(UuidSet::from_wire(bytes).map_err(MessageError::Uuids)?)
                };
                let n = r.u8()? as usize;
                if n > MAX_NAMES {
                    return Err(r.invalid(format!("{n} seen lineages")));
                }
                let mut seen_lineages = Vec::with_capacity(n);
                for _ in 0..n {
                    let name = r.name()?;
                    seen_lineages.push((name, r.generations()?));
                }
                EngineMessage::State(Box::new(PeerState {
                    role,
                    disk,
                    allow_two_primaries: f & 1 != 0,
                    diskless: f & 2 != 0,
                    discard_my_data: f & 4 != 0,
                    keep_my_data: f & 64 != 0,
                    has_quorum: f & 8 != 0,
                    leaving: f & 16 != 0,
                    handshake: f & 32 != 0,
                    size,
                    promoted_at,
                    changed_blocks,
                    primaries,
                    uuids,
                    seen_lineages,
                }))
            }
            MSG_NEW_CURRENT => {
                let generation = Generation::from_raw(r.u64()?);
                let n = r.u8()? as usize;
                if n > MAX_NAMES {
                    return Err(r.invalid(format!("{n} names")));
                }
                let mut disconnected = Vec::with_capacity(n);
                for _ in 0..n {
                    disconnected.push(r.name()?);
                }
                EngineMessage::NewCurrent {
                    generation,
                    disconnected,
                }
            }
            MSG_OUTDATE => EngineMessage::Outdate {
                id: r.u64()?,
                target: r.name()?,
                requester: r.name()?,
                generation: Generation::from_raw(r.u64()?),
            },
            MSG_OUTDATE_REPLY => EngineMessage::OutdateReply {
                id: r.u64()?,
                target: r.name()?,
                requester: r.name()?,
                result: match r.u8()? {
                    0 => OutdateResult::Outdated,
                    1 => OutdateResult::Unreachable,
                    2 => OutdateResult::Refused,
                    3 => OutdateResult::Stale,
                    b => return Err(r.invalid(format!("outdate result {b}"))),
                },
            },
            MSG_BITMAP_RUNS => {
                let last = match r.u8()? {
                    0 => false,
                    1 => true,
                    b => return Err(r.invalid(format!("last flag {b}"))),
                };
                let n = r.u32()? as usize;
                if n > MAX_RUNS_PER_MESSAGE {
                    return Err(r.invalid(format!("{n} runs")));
                }
                let mut runs = Vec::with_capacity(n);
                for _ in 0..n {
                    let (o, l) = (r.u64()?, r.u64()?);
                    if o.checked_add(l).is_none() {
                        return Err(r.invalid(format!("run {o}+{l} overflows")));
                    }
                    runs.push((o, l));
                }
                EngineMessage::BitmapRuns { runs, last }
            }
            MSG_PROMOTE_PREPARE => EngineMessage::PromotePrepare {
                id: r.u64()?,
                two_primaries: r.flag("two-primaries flag")?,
            },
            MSG_PROMOTE_REPLY => {
                let id = r.u64()?;
                let answer = match r.u8()? {
                    0 => PromoteAnswer::Yes,
                    1 => PromoteAnswer::Primary { node: r.name()? },
                    2 => PromoteAnswer::TwoPrimariesOff { node: r.name()? },
                    3 => PromoteAnswer::Promoting { node: r.name()? },
                    4 => PromoteAnswer::Closing,
                    5 => PromoteAnswer::Snapshotting { node: r.name()? },
                    b => return Err(r.invalid(format!("promote answer {b}"))),
                };
                EngineMessage::PromoteReply { id, answer }
            }
            MSG_PROMOTE_DECISION => EngineMessage::PromoteDecision {
                id: r.u64()?,
                commit: r.flag("commit flag")?,
            },
            other => return Err(MessageError::UnknownType(other)),
        };
        if r.pos != payload.len() {
            return Err(r.invalid(format!("{} trailing bytes", payload.len() - r.pos)));
        }
        Ok(msg)
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    msg_type: u16,
}

impl<'a> Reader<'a> {
    fn invalid(&self, what: String) -> MessageError {
        MessageError::Invalid {
            msg_type: self.msg_type,
            what,
        }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], MessageError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.buf.len())
            .ok_or(MessageError::Truncated {
                msg_type: self.msg_type,
            })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, MessageError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, MessageError> {
        let mut b = [0u8; 4];
        b.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(b))
    }
    fn u64(&mut self) -> Result<u64, MessageError> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(b))
    }
    fn flag(&mut self, what: &str) -> Result<bool, MessageError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(self.invalid(format!("{what} {b}"))),
        }
    }
    /// A u8 count, then that many generations (at most [`MAX_LINEAGE`]).
    fn generations(&mut self) -> Result<Vec<Generation>, MessageError> {
        let n = self.u8()? as usize;
        if n > MAX_LINEAGE {
            return Err(self.invalid(format!("lineage of {n} generations")));
        }
        (0..n)
            .map(|_| self.u64().map(Generation::from_raw))
            .collect()
    }
    fn name(&mut self) -> Result<String, MessageError> {
        let n = self.u8()? as usize;
        if n == 0 || n > MAX_NAME {
            return Err(self.invalid(format!("name of {n} bytes")));
        }
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.invalid("name is not UTF-8".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_garbage_is_rejected() {
        let mut u = UuidSet::day0(Generation::from_raw(0xD0));
        u.bitmap.insert("hv2".into(), Generation::from_raw(0x40));
        let msgs = vec![
            EngineMessage::State(Box::new(PeerState {
                role: Role::Primary,
                disk: DiskState::UpToDate,
                allow_two_primaries: true,
                diskless: false,
                discard_my_data: true,
                keep_my_data: false,
                has_quorum: true,
                leaving: false,
                handshake: true,
                size: 1 << 30,
                promoted_at: 17,
                changed_blocks: 3,
                primaries: vec!["hv1".into()],
                uuids: Some(u),
                seen_lineages: vec![(
                    "hv2".into(),
                    vec![Generation::from_raw(0x5678), Generation::from_raw(0x10)],
                )],
            })),
            EngineMessage::NewCurrent {
                generation: Generation::from_raw(0x1234),
                disconnected: vec!["hv3".into()],
            },
            EngineMessage::Outdate {
                id: 9,
                target: "hv2".into(),
                requester: "hv1".into(),
                generation: Generation::from_raw(0x10),
            },
            EngineMessage::OutdateReply {
                id: 9,
                target: "hv2".into(),
                requester: "hv1".into(),
                result: OutdateResult::Unreachable,
            },
            EngineMessage::OutdateReply {
                id: 10,
                target: "hv2".into(),
                requester: "hv1".into(),
                result: OutdateResult::Stale,
            },
            EngineMessage::BitmapRuns {
                runs: vec![(0, 4096), (1 << 20, 8192)],
                last: true,
            },
            EngineMessage::PromotePrepare {
                id: 11,
                two_primaries: true,
            },
            EngineMessage::PromoteReply {
                id: 11,
                answer: PromoteAnswer::Yes,
            },
            EngineMessage::PromoteReply {
                id: 12,
                answer: PromoteAnswer::Promoting { node: "hv2".into() },
            },
            EngineMessage::PromoteReply {
                id: 13,
                answer: PromoteAnswer::Closing,
            },
            EngineMessage::PromoteReply {
                id: 10,
                answer: PromoteAnswer::Snapshotting { node: "hv1".into() },
            },
            EngineMessage::PromoteDecision {
                id: 11,
                commit: true,
            },
        ];
        for m in msgs {
            let Message::Extension {
                msg_type, payload, ..
            } = m.to_message()
            else {
                panic!("not an extension")
            };
            assert_eq!(EngineMessage::decode(msg_type, &payload).unwrap(), m);
            for cut in 0..payload.len() {
                assert!(EngineMessage::decode(msg_type, &payload[..cut]).is_err());
            }
            let mut long = payload.to_vec();
            long.push(0);
            assert!(EngineMessage::decode(msg_type, &long).is_err());
        }
        assert!(EngineMessage::decode(0x0130, &[]).is_err());
    }
}
