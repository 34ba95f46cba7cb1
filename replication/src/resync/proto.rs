//! Resync and verify messages on the peer link: Extension frames of types
//! `0x0140..=0x017F`, encoded and decoded without I/O; every field from a peer is checked.
//!
//! ```text
//! 0x0140 Data        source -> target  id u64, offset u64, data...         (ordered on target)
//! 0x0141 DataAck     target -> source  id u64, outcome u8 (0 written, 1 failed)
//! 0x0142 Digest      source -> target  id u64, offset u64, len u32,
//!                                      sha256 of each 4 KiB block (32 bytes each)  (ordered)
//! 0x0143 DigestReply target -> source  id u64, outcome u8, one bit per block (1 = differs)
//! 0x0144 Done        source -> target  sent u64, skipped u64              (ordered; flush)
//! 0x0145 DoneAck     target -> source  outcome u8, message (UTF-8, <= 4 KiB)
//! 0x0146 Zeroes      source -> target  id u64, offset u64, len u64     (ordered; answered
//!                                      by DataAck; the target zeroes and may unmap: a
//!                                      thin volume stays thin, like DRBD's
//!                                      rs-discard-granularity)
//! ```
//!
//! Ordered messages go through the Secondary's apply pipeline (`datapath::run_secondary`)
//! in link order with the application writes; the replies come back as plain Extension
//! frames that the engine forwards to the running resync or verify.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use sha2::{Digest as _, Sha256};

use crate::bitmap::BLOCK_SIZE;
use crate::wire::{Message, MAX_DATA_LEN, MAX_ERROR_MESSAGE_LEN};

/// First Extension type owned by resync and verify.
pub const TYPE_FIRST: u16 = 0x0140;
/// Last Extension type owned by resync and verify.
pub const TYPE_LAST: u16 = 0x017f;
/// Resync data for the target to write.
pub const DATA: u16 = 0x0140;
/// The target wrote (or failed to write) a Data.
pub const DATA_ACK: u16 = 0x0141;
/// Per-block digests of a source range, to compare on the target.
pub const DIGEST: u16 = 0x0142;
/// Which blocks of a Digest differ on the target.
pub const DIGEST_REPLY: u16 = 0x0143;
/// The source finished the resync.
pub const DONE: u16 = 0x0144;
/// The target made the resync durable and recorded its end.
pub const DONE_ACK: u16 = 0x0145;
/// A range that reads as zeroes on the source: the target zeroes it (may unmap).
pub const ZEROES: u16 = 0x0146;

/// Largest range one Digest may cover (1024 blocks, 32 KiB of digests).
pub const MAX_DIGEST_LEN: u64 = 4 << 20;
/// Bytes of one block digest.
pub const DIGEST_BYTES: usize = 32;

/// Whether an Extension type belongs to resync/verify (the engine forwards these replies).
pub fn is_resync_type(msg_type: u16) -> bool {
    (TYPE_FIRST..=TYPE_LAST).contains(&msg_type)
}

/// Why a resync message from a peer is malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("resync message {msg_type:#06x} is truncated or has trailing bytes")]
    BadLength { msg_type: u16 },
    #[error("resync message {msg_type:#06x} has an invalid field: {what}")]
    BadField { msg_type: u16, what: &'static str },
    #[error("message type {0:#06x} is not a resync message")]
    NotResync(u16),
}

/// A decoded resync/verify message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResyncMsg {
    Data {
        id: u64,
        offset: u64,
        data: Bytes,
    },
    DataAck {
        id: u64,
        written: bool,
    },
    Digest {
        id: u64,
        offset: u64,
        len: u32,
        digests: Bytes,
    },
    DigestReply {
        id: u64,
        /// False when the target could not read its range (nothing compared).
        ok: bool,
        /// Bit i (LSB first within each byte) set = block i of the range differs.
        mask: Bytes,
    },
    Done {
        sent_bytes: u64,
        skipped_bytes: u64,
    },
    DoneAck {
        ok: bool,
        message: String,
    },
    Zeroes {
        id: u64,
        offset: u64,
        len: u64,
    },
}

/// Number of 4 KiB blocks (the last may be partial) in `len` bytes.
pub fn blocks_in(len: u64) -> usize {
    len.div_ceil(BLOCK_SIZE) as usize
}

/// sha256 of each 4 KiB block of `data`, concatenated.
pub fn block_digests(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(blocks_in(data.len() as u64) * DIGEST_BYTES);
    for block in data.chunks(BLOCK_SIZE as usize) {
        out.extend_from_slice(&Sha256::digest(block));
    }
    out
}

/// Compare `local` data with the peer's concatenated block digests: a bitmask of the
/// blocks that differ (LSB first).
pub fn differing_mask(local: &[u8], peer_digests: &[u8]) -> Vec<u8> {
    let mine = block_digests(local);
    let n = blocks_in(local.len() as u64);
    let mut mask = vec![0u8; n.div_ceil(8)];
    for i in 0..n {
        let a = mine.get(i * DIGEST_BYTES..(i + 1) * DIGEST_BYTES);
        let b = peer_digests.get(i * DIGEST_BYTES..(i + 1) * DIGEST_BYTES);
        if a != b || a.is_none() {
            mask[i / 8] |= 1 << (i % 8);
        }
    }
    mask
}

/// Whether block `i` is set in `mask`.
pub fn mask_bit(mask: &[u8], i: usize) -> bool {
    mask.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0)
}

impl ResyncMsg {
    /// The Extension frame for this message.
    pub fn to_message(&self) -> Message {
        let mut p = BytesMut::new();
        let msg_type = match self {
            ResyncMsg::Data { id, offset, data } => {
                p.reserve(16 + data.len());
                p.put_u64(*id);
                p.put_u64(*offset);
                p.put_slice(data);
                DATA
            }
            ResyncMsg::DataAck { id, written } => {
                p.put_u64(*id);
                p.put_u8(if *written { 0 } else { 1 });
                DATA_ACK
            }
            ResyncMsg::Digest {
                id,
                offset,
                len,
                digests,
            } => {
                p.put_u64(*id);
                p.put_u64(*offset);
                p.put_u32(*len);
                p.put_slice(digests);
                DIGEST
            }
            ResyncMsg::DigestReply { id, ok, mask } => {
                p.put_u64(*id);
                p.put_u8(if *ok { 0 } else { 1 });
                p.put_slice(mask);
                DIGEST_REPLY
            }
            ResyncMsg::Done {
                sent_bytes,
                skipped_bytes,
            } => {
                p.put_u64(*sent_bytes);
                p.put_u64(*skipped_bytes);
                DONE
            }
            ResyncMsg::Zeroes { id, offset, len } => {
                p.put_u64(*id);
                p.put_u64(*offset);
                p.put_u64(*len);
                ZEROES
            }
            ResyncMsg::DoneAck { ok, message } => {
                p.put_u8(if *ok { 0 } else { 1 });
                let m = truncate_utf8(message, MAX_ERROR_MESSAGE_LEN);
                p.put_slice(m.as_bytes());
                DONE_ACK
            }
        };
        Message::Extension {
            msg_type,
            flags: 0,
            payload: p.freeze(),
        }
    }

    /// Decode an Extension frame of a resync type. Checks every length; `offset + len`
    /// overflow is rejected here, the device range by the receiver.
    pub fn decode(msg_type: u16, flags: u16, mut p: Bytes) -> Result<ResyncMsg, ProtoError> {
        if !is_resync_type(msg_type) {
            return Err(ProtoError::NotResync(msg_type));
        }
        if flags != 0 {
            return Err(ProtoError::BadField {
                msg_type,
                what: "flags",
            });
        }
        let short = ProtoError::BadLength { msg_type };
        let need = |p: &Bytes, n: usize| {
            if p.len() < n {
                Err(short.clone())
            } else {
                Ok(())
            }
        };
        let outcome = |b: u8| match b {
            0 => Ok(true),
            1 => Ok(false),
            _ => Err(ProtoError::BadField {
                msg_type,
                what: "outcome",
            }),
        };
        let msg = match msg_type {
            DATA => {
                need(&p, 16)?;
                let id = p.get_u64();
                let offset = p.get_u64();
                if p.is_empty() || p.len() > MAX_DATA_LEN {
                    return Err(ProtoError::BadField {
                        msg_type,
                        what: "data length",
                    });
                }
                if offset.checked_add(p.len() as u64).is_none() {
                    return Err(ProtoError::BadField {
                        msg_type,
                        what: "offset + length overflows",
                    });
                }
                ResyncMsg::Data {
                    id,
                    offset,
                    data: p,
                }
            }
            DATA_ACK => {
                need(&p, 9)?;
                let id = p.get_u64();
                let written = outcome(p.get_u8())?;
                if !p.is_empty() {
                    return Err(short);
                }
                ResyncMsg::DataAck { id, written }
            }
            DIGEST => {
                need(&p, 20)?;
                let id = p.get_u64();
                let offset = p.get_u64();
                let len = p.get_u32();
                if len == 0 || u64::from(len) > MAX_DIGEST_LEN {
                    return Err(ProtoError::BadField {
                        msg_type,
                        what: "digest range length",
                    });
                }
                if offset.checked_add(u64::from(len)).is_none() {
                    return Err(ProtoError::BadField {
                        msg_type,
                        what: "offset + length overflows",
                    });
                }
                if p.len() != blocks_in(u64::from(len)) * DIGEST_BYTES {
                    return Err(short);
                }
                ResyncMsg::Digest {
                    id,
                    offset,
                    len,
                    digests: p,
                }
            }
            DIGEST_REPLY => {
                need(&p, 9)?;
                let id = p.get_u64();
                let ok = outcome(p.get_u8())?;
                if p.len() > blocks_in(MAX_DIGEST_LEN).div_ceil(8) {
                    return Err(short);
                }
                ResyncMsg::DigestReply { id, ok, mask: p }
            }
            DONE => {
                need(&p, 16)?;
                let sent_bytes = p.get_u64();
                let skipped_bytes = p.get_u64();
                if !p.is_empty() {
                    return Err(short);
                }
                ResyncMsg::Done {
                    sent_bytes,
                    skipped_bytes,
                }
            }
            DONE_ACK => {
                need(&p, 1)?;
                let ok = outcome(p.get_u8())?;
                if p.len() > MAX_ERROR_MESSAGE_LEN {
                    return Err(short);
                }
                let message = String::from_utf8(p.to_vec()).map_err(|_| ProtoError::BadField {
                    msg_type,
                    what: "message is not UTF-8",
                })?;
                ResyncMsg::DoneAck { ok, message }
            }
            ZEROES => {
                need(&p, 24)?;
                let id = p.get_u64();
                let offset = p.get_u64();
                let len = p.get_u64();
                if !p.is_empty() {
                    return Err(short);
                }
                if len == 0 || len > MAX_DATA_LEN as u64 {
                    return Err(ProtoError::BadField {
                        msg_type,
                        what: "zeroes length",
                    });
                }
                if offset.checked_add(len).is_none() {
                    return Err(ProtoError::BadField {
                        msg_type,
                        what: "offset + length overflows",
                    });
                }
                ResyncMsg::Zeroes { id, offset, len }
            }
            _ => {
                return Err(ProtoError::BadField {
                    msg_type,
                    what: "unknown resync message type",
                })
            }
        };
        Ok(msg)
    }

    /// Decode a link [`Message`]; `None` if it is not a resync Extension.
    pub fn from_message(msg: &Message) -> Option<Result<ResyncMsg, ProtoError>> {
        match msg {
            Message::Extension {
                msg_type,
                flags,
                payload,
            } if is_resync_type(*msg_type) => {
                Some(ResyncMsg::decode(*msg_type, *flags, payload.clone()))
            }
            _ => None,
        }
    }
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn roundtrip(m: ResyncMsg) {
        let Message::Extension {
            msg_type,
            flags,
            payload,
        } = m.to_message()
        else {
            panic!("not an extension");
        };
        assert_eq!(ResyncMsg::decode(msg_type, flags, payload).unwrap(), m);
    }

    #[test]
    fn every_message_roundtrips() {
        roundtrip(ResyncMsg::Data {
            id: 7,
            offset: 4096,
            data: Bytes::from(vec![1u8; 8192]),
        });
        roundtrip(ResyncMsg::DataAck {
            id: 7,
            written: false,
        });
        let data = vec![3u8; 10000];
        roundtrip(ResyncMsg::Digest {
            id: 1,
            offset: 0,
            len: 10000,
            digests: Bytes::from(block_digests(&data)),
        });
        roundtrip(ResyncMsg::DigestReply {
            id: 1,
            ok: true,
            mask: Bytes::from(vec![0b101]),
        });
        roundtrip(ResyncMsg::Zeroes {
            id: 3,
            offset: 8192,
            len: 1 << 20,
        });
        roundtrip(ResyncMsg::Done {
            sent_bytes: 1,
            skipped_bytes: 2,
        });
        roundtrip(ResyncMsg::DoneAck {
            ok: false,
            message: "disk full".into(),
        });
    }

    #[test]
    fn malformed_messages_are_rejected() {
        assert!(ResyncMsg::decode(DATA, 0, Bytes::from_static(&[0; 16])).is_err());
        assert!(ResyncMsg::decode(DATA, 1, Bytes::from(vec![0; 20])).is_err());
        let mut p = BytesMut::new();
        p.put_u64(1);
        p.put_u64(u64::MAX - 1);
        p.put_slice(&[0; 8]);
        assert!(ResyncMsg::decode(DATA, 0, p.freeze()).is_err());
        let mut p = BytesMut::new();
        p.put_u64(1);
        p.put_u64(0);
        p.put_u32(8192);
        p.put_slice(&[0; 32]); // one digest for two blocks
        assert!(ResyncMsg::decode(DIGEST, 0, p.freeze()).is_err());
        let mut p = BytesMut::new();
        p.put_u64(1);
        p.put_u64(0);
        p.put_u32(u32::MAX);
        assert!(ResyncMsg::decode(DIGEST, 0, p.freeze()).is_err());
        assert!(ResyncMsg::decode(DATA_ACK, 0, Bytes::from_static(&[0; 8])).is_err());
        assert!(ResyncMsg::decode(0x0100, 0, Bytes::new()).is_err());
        for t in TYPE_FIRST..=TYPE_LAST {
            for len in [0usize, 1, 9, 17, 21] {
                let _ = ResyncMsg::decode(t, 0, Bytes::from(vec![0xff; len]));
            }
        }
    }

    #[test]
    fn differing_mask_marks_exactly_the_changed_blocks() {
        let a = vec![0u8; 5 * 4096 + 100];
        let mut b = a.clone();
        b[4096 * 2 + 5] = 1;
        b[5 * 4096 + 99] = 1;
        let mask = differing_mask(&b, &block_digests(&a));
        let set: Vec<usize> = (0..6).filter(|&i| mask_bit(&mask, i)).collect();
        assert_eq!(set, vec![2, 5]);
    }
}
