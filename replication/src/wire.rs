//! The peer wire format: frames and typed messages, encoded and decoded without any I/O.
//!
//! Every frame is a fixed 20-byte header followed by a payload:
//!
//! ```text
//!  0        4     5     6        8        10       12         16         20
//!  +--------+-----+-----+--------+--------+--------+----------+----------+-----------
//!  | magic  | fmt | rsv | type   | flags  | rsv    | length   | crc32c   | payload...
//!  | "TNDM" | =1  | =0  | u16 BE | u16 BE | =0     | u32 BE   | of 0..16 | (length bytes)
//!  +--------+-----+-----+--------+--------+--------+----------+----------+-----------
//! ```
//!
//! All integers are big-endian. The header carries its own CRC32C so a desynchronised or
//! corrupted stream is detected before a bogus length is trusted. Payload length is bounded
//! per type: [`MAX_CONTROL_PAYLOAD`] for control frames, [`MAX_FRAME_PAYLOAD`]
//! (32 MiB of data + 4 KiB, NBD's largest request plus room) for frames that carry data.
//! Every field decoded from a peer is checked: lengths against these maxima and against the
//! payload actually present, `offset + len` against overflow, flags against the bits the
//! type defines, names against UTF-8 and [`MAX_NAME_LEN`]. Nothing here knows the device
//! size; the data path checks ranges against it before touching the disk.
//!
//! Message types:
//!
//! ```text
//! 0x0001 Hello         0x0010 Write         0x0015 Barrier      0x0100..=0x01ff Extension
//! 0x0002 Ping          0x0011 Trim          0x0016 BarrierAck     (reserved for state, UUID
//! 0x0003 Pong          0x0012 WriteZeroes   0x0017 Flush           exchange, bitmap transfer,
//! 0x0004 Error         0x0013 RecvAck       0x0018 FlushAck        resync request/data/in-sync,
//!                      0x0014 WriteAck                             verify digests)
//! ```
//!
//! Versioning rule: the header layout (`fmt` = [`FRAME_FORMAT`]) never changes within
//! Tandem 1.x. The *protocol* version is negotiated in [`Hello`]: each side announces the
//! range `[min, max]` it speaks and both use the highest version in the intersection
//! ([`negotiate_version`]); an empty intersection is a fatal error for the connection. A new
//! protocol version may add message types or define new flag bits, never change the layout
//! of an existing one; unknown types and flag bits are protocol errors.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Frame magic, "TNDM".
pub const MAGIC: u32 = 0x544E_444D;
/// Version of the header layout.
pub const FRAME_FORMAT: u8 = 1;
/// Size of the fixed frame header in bytes.
pub const HEADER_LEN: usize = 20;
/// Largest data payload one Write may carry (NBD's largest request).
pub const MAX_DATA_LEN: usize = 32 << 20;
/// Largest payload of a data-carrying frame (data plus fixed fields and room).
pub const MAX_FRAME_PAYLOAD: usize = MAX_DATA_LEN + 4096;
/// Largest payload of a control frame.
pub const MAX_CONTROL_PAYLOAD: usize = 64 << 10;
/// Longest node or volume name in a Hello.
pub const MAX_NAME_LEN: usize = 255;
/// Longest message text in an Error frame.
pub const MAX_ERROR_MESSAGE_LEN: usize = 4096;
/// Oldest protocol version this build speaks. Version 2 changed the layout of the engine's
/// State and Outdate messages (they carry generations, `replica/messages.rs`); before 1.0
/// such a change drops the old version instead of speaking both, so nodes of different
/// versions refuse each other with "no common protocol version": upgrade every node.
pub const PROTOCOL_VERSION_MIN: u16 = 2;
/// Newest protocol version this build speaks.
pub const PROTOCOL_VERSION_MAX: u16 = 2;
/// First message type reserved for state/UUID/bitmap/resync/verify messages.
pub const EXTENSION_TYPE_FIRST: u16 = 0x0100;
/// Last message type reserved for state/UUID/bitmap/resync/verify messages.
pub const EXTENSION_TYPE_LAST: u16 = 0x01ff;

/// Message type numbers.
pub mod msg_type {
    pub const HELLO: u16 = 0x0001;
    pub const PING: u16 = 0x0002;
    pub const PONG: u16 = 0x0003;
    pub const ERROR: u16 = 0x0004;
    pub const WRITE: u16 = 0x0010;
    pub const TRIM: u16 = 0x0011;
    pub const WRITE_ZEROES: u16 = 0x0012;
    pub const RECV_ACK: u16 = 0x0013;
    pub const WRITE_ACK: u16 = 0x0014;
    pub const BARRIER: u16 = 0x0015;
    pub const BARRIER_ACK: u16 = 0x0016;
    pub const FLUSH: u16 = 0x0017;
    pub const FLUSH_ACK: u16 = 0x0018;
}

/// Flag bits of data requests (Write, Trim, WriteZeroes) in the header's flags field.
pub mod flags {
    /// The write must be durable on the peer's disk before it is acknowledged as written.
    pub const FUA: u16 = 1 << 0;
    /// Send a RecvAck as soon as the request is received (protocol B).
    pub const ACK_ON_RECEIVE: u16 = 1 << 1;
    /// WriteZeroes only: the peer may deallocate the range.
    pub const MAY_UNMAP: u16 = 1 << 2;
}

/// Codes carried by an Error frame.
pub mod error_code {
    /// The peer broke the protocol (unexpected message, bad epoch, bad field).
    pub const PROTOCOL: u16 = 1;
    /// A request reached outside the volume.
    pub const OUT_OF_RANGE: u16 = 2;
    /// No common protocol version.
    pub const VERSION: u16 = 3;
    /// Hello named another volume or an incompatible replication protocol.
    pub const CONFIG_MISMATCH: u16 = 4;
    /// The sender hit an internal failure and is closing the connection.
    pub const INTERNAL: u16 = 5;
}

/// Replication protocol of a connection (DRBD's A/B/C): when a write counts as replicated.
///
/// A minimal local definition; the lead may unify it with the volume configuration's enum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplicationProtocol {
    /// Asynchronous: local disk done and the write queued to the peer.
    A,
    /// Memory-synchronous: local disk done and the peer received the write.
    B,
    /// Synchronous: local disk and every connected peer's disk hold the write.
    C,
}

impl ReplicationProtocol {
    fn to_wire(self) -> u8 {
        match self {
            ReplicationProtocol::A => b'A',
            ReplicationProtocol::B => b'B',
            ReplicationProtocol::C => b'C',
        }
    }

    fn from_wire(b: u8) -> Result<Self, WireError> {
        match b {
            b'A' => Ok(ReplicationProtocol::A),
            b'B' => Ok(ReplicationProtocol::B),
            b'C' => Ok(ReplicationProtocol::C),
            other => Err(WireError::BadProtocol(other)),
        }
    }
}

impl std::fmt::Display for ReplicationProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.to_wire() as char)
    }
}

/// The first message on an authenticated connection, sent by both sides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Oldest protocol version the sender speaks.
    pub min_version: u16,
    /// Newest protocol version the sender speaks.
    pub max_version: u16,
    /// The sender's node name.
    pub node: String,
    /// The volume this connection replicates.
    pub volume: String,
    /// The sender's volume size in bytes.
    pub volume_size: u64,
    /// The replication protocol the sender is configured with.
    pub protocol: ReplicationProtocol,
}

/// A write with its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteRequest {
    /// Sequence number, unique per connection direction; acks name it.
    pub seq: u64,
    /// The epoch the write belongs to.
    pub epoch: u64,
    /// Byte offset in the volume.
    pub offset: u64,
    /// Durable on the peer's disk before it is acknowledged as written.
    pub fua: bool,
    /// Acknowledge receipt at once (protocol B).
    pub ack_on_receive: bool,
    /// The bytes to write.
    pub data: Bytes,
}

/// A data request without payload (Trim, WriteZeroes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeRequest {
    /// Sequence number (shared with writes).
    pub seq: u64,
    /// The epoch the request belongs to.
    pub epoch: u64,
    /// Byte offset in the volume.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// Durable on the peer's disk before it is acknowledged as written.
    pub fua: bool,
    /// Acknowledge receipt at once (protocol B).
    pub ack_on_receive: bool,
    /// WriteZeroes only: the peer may deallocate the range.
    pub may_unmap: bool,
}

/// Outcome reported by a WriteAck.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    /// The peer's device write completed (durably when the request had FUA).
    Written,
    /// The peer's device write failed; the range is out of sync on that peer.
    Failed,
}

/// A typed peer message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Version and configuration exchange after authentication.
    Hello(Hello),
    /// Keepalive request.
    Ping { token: u64 },
    /// Keepalive answer, echoing the token.
    Pong { token: u64 },
    /// The sender reports a fatal problem and closes the connection.
    Error { code: u16, message: String },
    /// Replicated write.
    Write(WriteRequest),
    /// Replicated discard.
    Trim(RangeRequest),
    /// Replicated write-zeroes.
    WriteZeroes(RangeRequest),
    /// Protocol B point: the peer received request `seq`.
    RecvAck { seq: u64 },
    /// Protocol C point: the peer's device write of request `seq` finished (or failed).
    WriteAck { seq: u64, outcome: WriteOutcome },
    /// Closes epoch `epoch`: later requests belong to `epoch + 1`.
    Barrier { epoch: u64 },
    /// Every request of epoch `epoch` is on the peer's disk.
    BarrierAck { epoch: u64 },
    /// Flush the peer's device.
    Flush { id: u64 },
    /// The peer's device flush `id` completed.
    FlushAck { id: u64 },
    /// A message in the reserved range, carried opaquely for the state/sync layers.
    Extension {
        msg_type: u16,
        flags: u16,
        payload: Bytes,
    },
}

/// Why bytes from a peer are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("bad frame magic {found:#010x}")]
    BadMagic { found: u32 },
    #[error("unsupported frame format {found}")]
    UnsupportedFrameFormat { found: u8 },
    #[error(
        "frame header checksum mismatch (computed {computed:#010x}, received {received:#010x})"
    )]
    HeaderChecksum { computed: u32, received: u32 },
    #[error("reserved header field is not zero")]
    ReservedNotZero,
    #[error("unknown message type {0:#06x}")]
    UnknownType(u16),
    #[error("frame of type {msg_type:#06x} has length {len}, maximum is {max}")]
    FrameTooLarge {
        msg_type: u16,
        len: usize,
        max: usize,
    },
    #[error("frame of type {msg_type:#06x} is truncated: {what} needs {need} bytes, {have} left")]
    Truncated {
        msg_type: u16,
        what: &'static str,
        need: usize,
        have: usize,
    },
    #[error("frame of type {msg_type:#06x} has {extra} unexpected trailing bytes")]
    TrailingBytes { msg_type: u16, extra: usize },
    #[error("frame of type {msg_type:#06x} has undefined flag bits {flags:#06x}")]
    BadFlags { msg_type: u16, flags: u16 },
    #[error("range at offset {offset} length {len} overflows")]
    RangeOverflow { offset: u64, len: u64 },
    #[error("{what} is too long ({len} bytes, maximum {max})")]
    FieldTooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{what} is not valid UTF-8")]
    BadUtf8 { what: &'static str },
    #[error("{what} must not be empty")]
    EmptyField { what: &'static str },
    #[error("unknown replication protocol byte {0:#04x}")]
    BadProtocol(u8),
    #[error("bad version range {min}..={max}")]
    BadVersionRange { min: u16, max: u16 },
    #[error("unknown write outcome {0}")]
    BadWriteOutcome(u8),
}

/// A decoded, validated frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Message type.
    pub msg_type: u16,
    /// Type-specific flags.
    pub flags: u16,
    /// Payload length, already checked against the type's maximum.
    pub len: usize,
}

/// An encoded frame: `head` (header and fixed fields) then `body` (data, possibly empty).
/// Kept in two parts so write data is never copied.
#[derive(Debug, Clone)]
pub struct Frame {
    /// Header plus the message's fixed fields.
    pub head: Bytes,
    /// Bulk data (Write data, Extension payload); empty otherwise.
    pub body: Bytes,
}

impl Frame {
    /// Total encoded length.
    pub fn len(&self) -> usize {
        self.head.len() + self.body.len()
    }

    /// Never true: a frame has at least a header.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The frame as one contiguous buffer (tests and small frames).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.len());
        v.extend_from_slice(&self.head);
        v.extend_from_slice(&self.body);
        v
    }
}

/// The highest protocol version both ranges contain, or `None` when they do not overlap.
pub fn negotiate_version(
    local_min: u16,
    local_max: u16,
    peer_min: u16,
    peer_max: u16,
) -> Option<u16> {
    let low = local_min.max(peer_min);
    let high = local_max.min(peer_max);
    (low <= high).then_some(high)
}

fn max_payload(msg_type: u16) -> Result<usize, WireError> {
    use msg_type::*;
    match msg_type {
        WRITE => Ok(MAX_FRAME_PAYLOAD),
        EXTENSION_TYPE_FIRST..=EXTENSION_TYPE_LAST => Ok(MAX_FRAME_PAYLOAD),
        HELLO | PING | PONG | ERROR | TRIM | WRITE_ZEROES | RECV_ACK | WRITE_ACK | BARRIER
        | BARRIER_ACK | FLUSH | FLUSH_ACK => Ok(MAX_CONTROL_PAYLOAD),
        other => Err(WireError::UnknownType(other)),
    }
}

fn allowed_flags(msg_type: u16) -> u16 {
    use msg_type::*;
    match msg_type {
        WRITE | TRIM => flags::FUA | flags::ACK_ON_RECEIVE,
        WRITE_ZEROES => flags::FUA | flags::ACK_ON_RECEIVE | flags::MAY_UNMAP,
        EXTENSION_TYPE_FIRST..=EXTENSION_TYPE_LAST => u16::MAX,
        _ => 0,
    }
}

/// Decode and validate a frame header from the first [`HEADER_LEN`] bytes of `buf`.
pub fn decode_header(buf: &[u8]) -> Result<FrameHeader, WireError> {
    if buf.len() < HEADER_LEN {
        return Err(WireError::Truncated {
            msg_type: 0,
            what: "frame header",
            need: HEADER_LEN,
            have: buf.len(),
        });
    }
    let mut h = &buf[..HEADER_LEN];
    let magic = h.get_u32();
    if magic != MAGIC {
        return Err(WireError::BadMagic { found: magic });
    }
    let computed = crc32c::crc32c(&buf[..16]);
    let received = u32::from_be_bytes([buf[16], buf[17], buf[18], buf[19]]);
    if computed != received {
        return Err(WireError::HeaderChecksum { computed, received });
    }
    let format = h.get_u8();
    if format != FRAME_FORMAT {
        return Err(WireError::UnsupportedFrameFormat { found: format });
    }
    let reserved1 = h.get_u8();
    let msg_type = h.get_u16();
    let flags = h.get_u16();
    let reserved2 = h.get_u16();
    let len = h.get_u32() as usize;
    if reserved1 != 0 || reserved2 != 0 {
        return Err(WireError::ReservedNotZero);
    }
    let max = max_payload(msg_type)?;
    if len > max {
        return Err(WireError::FrameTooLarge { msg_type, len, max });
    }
    if flags & !allowed_flags(msg_type) != 0 {
        return Err(WireError::BadFlags { msg_type, flags });
    }
    Ok(FrameHeader {
        msg_type,
        flags,
        len,
    })
}

fn put_header(buf: &mut BytesMut, msg_type: u16, flags: u16, len: usize) {
    let start = buf.len();
    buf.put_u32(MAGIC);
    buf.put_u8(FRAME_FORMAT);
    buf.put_u8(0);
    buf.put_u16(msg_type);
    buf.put_u16(flags);
    buf.put_u16(0);
    // Callers never build payloads above MAX_FRAME_PAYLOAD (< 4 GiB).
    buf.put_u32(len as u32);
    let crc = crc32c::crc32c(&buf[start..start + 16]);
    buf.put_u32(crc);
}

fn request_flags(fua: bool, ack_on_receive: bool, may_unmap: bool) -> u16 {
    let mut f = 0;
    if fua {
        f |= flags::FUA;
    }
    if ack_on_receive {
        f |= flags::ACK_ON_RECEIVE;
    }
    if may_unmap {
        f |= flags::MAY_UNMAP;
    }
    f
}

fn put_str(buf: &mut BytesMut, s: &str, max: usize) {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    let bytes = &s.as_bytes()[..end];
    buf.put_u16(bytes.len() as u16);
    buf.put_slice(bytes);
}

impl Message {
    /// The message type number.
    pub fn msg_type(&self) -> u16 {
        use msg_type::*;
        match self {
            Message::Hello(_) => HELLO,
            Message::Ping { .. } => PING,
            Message::Pong { .. } => PONG,
            Message::Error { .. } => ERROR,
            Message::Write(_) => WRITE,
            Message::Trim(_) => TRIM,
            Message::WriteZeroes(_) => WRITE_ZEROES,
            Message::RecvAck { .. } => RECV_ACK,
            Message::WriteAck { .. } => WRITE_ACK,
            Message::Barrier { .. } => BARRIER,
            Message::BarrierAck { .. } => BARRIER_ACK,
            Message::Flush { .. } => FLUSH,
            Message::FlushAck { .. } => FLUSH_ACK,
            Message::Extension { msg_type, .. } => *msg_type,
        }
    }

    /// Encode into a frame. Names and error texts longer than the wire maxima are cut at a
    /// character boundary.
    ///
    /// Never panics; an `Extension` outside the reserved range or with a payload above
    /// [`MAX_FRAME_PAYLOAD`] encodes a frame the peer rejects.
    pub fn encode(&self) -> Frame {
        let mut head = BytesMut::with_capacity(HEADER_LEN + 64);
        let mut body = Bytes::new();
        let msg_type = self.msg_type();
        match self {
            Message::Hello(h) => {
                let mut p = BytesMut::new();
                p.put_u16(h.min_version);
                p.put_u16(h.max_version);
                p.put_u8(h.protocol.to_wire());
                p.put_u64(h.volume_size);
                put_str(&mut p, &h.node, MAX_NAME_LEN);
                put_str(&mut p, &h.volume, MAX_NAME_LEN);
                put_header(&mut head, msg_type, 0, p.len());
                head.put_slice(&p);
            }
            Message::Ping { token } | Message::Pong { token } => {
                put_header(&mut head, msg_type, 0, 8);
                head.put_u64(*token);
            }
            Message::Error { code, message } => {
                let mut p = BytesMut::new();
                p.put_u16(*code);
                put_str(&mut p, message, MAX_ERROR_MESSAGE_LEN);
                put_header(&mut head, msg_type, 0, p.len());
                head.put_slice(&p);
            }
            Message::Write(w) => {
                put_header(
                    &mut head,
                    msg_type,
                    request_flags(w.fua, w.ack_on_receive, false),
                    24 + w.data.len(),
                );
                head.put_u64(w.seq);
                head.put_u64(w.epoch);
                head.put_u64(w.offset);
                body = w.data.clone();
            }
            Message::Trim(r) | Message::WriteZeroes(r) => {
                let may_unmap = matches!(self, Message::WriteZeroes(_)) && r.may_unmap;
                put_header(
                    &mut head,
                    msg_type,
                    request_flags(r.fua, r.ack_on_receive, may_unmap),
                    32,
                );
                head.put_u64(r.seq);
                head.put_u64(r.epoch);
                head.put_u64(r.offset);
                head.put_u64(r.len);
            }
            Message::RecvAck { seq } => {
                put_header(&mut head, msg_type, 0, 8);
                head.put_u64(*seq);
            }
            Message::WriteAck { seq, outcome } => {
                put_header(&mut head, msg_type, 0, 9);
                head.put_u64(*seq);
                head.put_u8(match outcome {
                    WriteOutcome::Written => 1,
                    WriteOutcome::Failed => 2,
                });
            }
            Message::Barrier { epoch } | Message::BarrierAck { epoch } => {
                put_header(&mut head, msg_type, 0, 8);
                head.put_u64(*epoch);
            }
            Message::Flush { id } | Message::FlushAck { id } => {
                put_header(&mut head, msg_type, 0, 8);
                head.put_u64(*id);
            }
            Message::Extension { flags, payload, .. } => {
                put_header(&mut head, msg_type, *flags, payload.len());
                body = payload.clone();
            }
        }
        Frame {
            head: head.freeze(),
            body,
        }
    }

    /// Decode a payload whose header was validated by [`decode_header`].
    pub fn decode(header: &FrameHeader, mut payload: Bytes) -> Result<Message, WireError> {
        use msg_type::*;
        let t = header.msg_type;
        if payload.len() != header.len {
            return Err(WireError::Truncated {
                msg_type: t,
                what: "payload",
                need: header.len,
                have: payload.len(),
            });
        }
        let f = header.flags;
        let msg = match t {
            HELLO => {
                let min_version = take_u16(&mut payload, t, "hello min version")?;
                let max_version = take_u16(&mut payload, t, "hello max version")?;
                if min_version == 0 || min_version > max_version {
                    return Err(WireError::BadVersionRange {
                        min: min_version,
                        max: max_version,
                    });
                }
                let protocol =
                    ReplicationProtocol::from_wire(take_u8(&mut payload, t, "hello protocol")?)?;
                let volume_size = take_u64(&mut payload, t, "hello volume size")?;
                let node = take_str(&mut payload, t, "node name", MAX_NAME_LEN)?;
                let volume = take_str(&mut payload, t, "volume name", MAX_NAME_LEN)?;
                if node.is_empty() {
                    return Err(WireError::EmptyField { what: "node name" });
                }
                if volume.is_empty() {
                    return Err(WireError::EmptyField {
                        what: "volume name",
                    });
                }
                Message::Hello(Hello {
                    min_version,
                    max_version,
                    node,
                    volume,
                    volume_size,
                    protocol,
                })
            }
            PING => Message::Ping {
                token: take_u64(&mut payload, t, "ping token")?,
            },
            PONG => Message::Pong {
                token: take_u64(&mut payload, t, "pong token")?,
            },
            ERROR => {
                let code = take_u16(&mut payload, t, "error code")?;
                let message = take_str(&mut payload, t, "error message", MAX_ERROR_MESSAGE_LEN)?;
                Message::Error { code, message }
            }
            WRITE => {
                let seq = take_u64(&mut payload, t, "write seq")?;
                let epoch = take_u64(&mut payload, t, "write epoch")?;
                let offset = take_u64(&mut payload, t, "write offset")?;
                let data = std::mem::take(&mut payload);
                if data.len() > MAX_DATA_LEN {
                    return Err(WireError::FieldTooLong {
                        what: "write data",
                        len: data.len(),
                        max: MAX_DATA_LEN,
                    });
                }
                check_range(offset, data.len() as u64)?;
                Message::Write(WriteRequest {
                    seq,
                    epoch,
                    offset,
                    fua: f & flags::FUA != 0,
                    ack_on_receive: f & flags::ACK_ON_RECEIVE != 0,
                    data,
                })
            }
            TRIM | WRITE_ZEROES => {
                let seq = take_u64(&mut payload, t, "request seq")?;
                let epoch = take_u64(&mut payload, t, "request epoch")?;
                let offset = take_u64(&mut payload, t, "request offset")?;
                let len = take_u64(&mut payload, t, "request length")?;
                check_range(offset, len)?;
                let r = RangeRequest {
                    seq,
                    epoch,
                    offset,
                    len,
                    fua: f & flags::FUA != 0,
                    ack_on_receive: f & flags::ACK_ON_RECEIVE != 0,
                    may_unmap: f & flags::MAY_UNMAP != 0,
                };
                if t == TRIM {
                    Message::Trim(r)
                } else {
                    Message::WriteZeroes(r)
                }
            }
            RECV_ACK => Message::RecvAck {
                seq: take_u64(&mut payload, t, "ack seq")?,
            },
            WRITE_ACK => {
                let seq = take_u64(&mut payload, t, "ack seq")?;
                let outcome = match take_u8(&mut payload, t, "ack outcome")? {
                    1 => WriteOutcome::Written,
                    2 => WriteOutcome::Failed,
                    other => return Err(WireError::BadWriteOutcome(other)),
                };
                Message::WriteAck { seq, outcome }
            }
            BARRIER => Message::Barrier {
                epoch: take_u64(&mut payload, t, "barrier epoch")?,
            },
            BARRIER_ACK => Message::BarrierAck {
                epoch: take_u64(&mut payload, t, "barrier epoch")?,
            },
            FLUSH => Message::Flush {
                id: take_u64(&mut payload, t, "flush id")?,
            },
            FLUSH_ACK => Message::FlushAck {
                id: take_u64(&mut payload, t, "flush id")?,
            },
            EXTENSION_TYPE_FIRST..=EXTENSION_TYPE_LAST => Message::Extension {
                msg_type: t,
                flags: f,
                payload: std::mem::take(&mut payload),
            },
            other => return Err(WireError::UnknownType(other)),
        };
        if !payload.is_empty() {
            return Err(WireError::TrailingBytes {
                msg_type: t,
                extra: payload.len(),
            });
        }
        Ok(msg)
    }
}

/// Decode one frame from the front of `buf`, consuming it. `Ok(None)` means more bytes are
/// needed (and `buf` has been grown to hold the announced frame, which is bounded by the
/// type's maximum). Any error leaves the stream unusable: the caller must disconnect.
pub fn try_decode(buf: &mut BytesMut) -> Result<Option<Message>, WireError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let header = decode_header(&buf[..HEADER_LEN])?;
    let total = HEADER_LEN + header.len;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let mut frame = buf.split_to(total);
    let payload = frame.split_off(HEADER_LEN).freeze();
    Message::decode(&header, payload).map(Some)
}

fn check_range(offset: u64, len: u64) -> Result<(), WireError> {
    match offset.checked_add(len) {
        Some(_) => Ok(()),
        None => Err(WireError::RangeOverflow { offset, len }),
    }
}

fn need(p: &Bytes, n: usize, msg_type: u16, what: &'static str) -> Result<(), WireError> {
    if p.len() < n {
        Err(WireError::Truncated {
            msg_type,
            what,
            need: n,
            have: p.len(),
        })
    } else {
        Ok(())
    }
}

fn take_u8(p: &mut Bytes, t: u16, what: &'static str) -> Result<u8, WireError> {
    need(p, 1, t, what)?;
    Ok(p.get_u8())
}

fn take_u16(p: &mut Bytes, t: u16, what: &'static str) -> Result<u16, WireError> {
    need(p, 2, t, what)?;
    Ok(p.get_u16())
}

fn take_u64(p: &mut Bytes, t: u16, what: &'static str) -> Result<u64, WireError> {
    need(p, 8, t, what)?;
    Ok(p.get_u64())
}

fn take_str(p: &mut Bytes, t: u16, what: &'static str, max: usize) -> Result<String, WireError> {
    let len = take_u16(p, t, what)? as usize;
    if len > max {
        return Err(WireError::FieldTooLong { what, len, max });
    }
    need(p, len, t, what)?;
    let raw = p.split_to(len);
    String::from_utf8(raw.to_vec()).map_err(|_| WireError::BadUtf8 { what })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Message> {
        vec![
            Message::Hello(Hello {
                min_version: 1,
                max_version: 3,
                node: "hv1".into(),
                volume: "vm-100-disk-0".into(),
                volume_size: 2 << 30,
                protocol: ReplicationProtocol::C,
            }),
            Message::Ping { token: 7 },
            Message::Pong { token: 7 },
            Message::Error {
                code: error_code::OUT_OF_RANGE,
                message: "write beyond the end".into(),
            },
            Message::Write(WriteRequest {
                seq: 1,
                epoch: 2,
                offset: 4096,
                fua: true,
                ack_on_receive: true,
                data: Bytes::from(vec![0xAB; 4096]),
            }),
            Message::Write(WriteRequest {
                seq: 2,
                epoch: 2,
                offset: 0,
                fua: false,
                ack_on_receive: false,
                data: Bytes::new(),
            }),
            Message::Trim(RangeRequest {
                seq: 3,
                epoch: 2,
                offset: 8192,
                len: 1 << 20,
                fua: false,
                ack_on_receive: false,
                may_unmap: false,
            }),
            Message::WriteZeroes(RangeRequest {
                seq: 4,
                epoch: 3,
                offset: 0,
                len: 512,
                fua: true,
                ack_on_receive: true,
                may_unmap: true,
            }),
            Message::RecvAck { seq: 9 },
            Message::WriteAck {
                seq: 9,
                outcome: WriteOutcome::Written,
            },
            Message::WriteAck {
                seq: 10,
                outcome: WriteOutcome::Failed,
            },
            Message::Barrier { epoch: 5 },
            Message::BarrierAck { epoch: 5 },
            Message::Flush { id: 11 },
            Message::FlushAck { id: 11 },
            Message::Extension {
                msg_type: 0x0101,
                flags: 0x8001,
                payload: Bytes::from_static(b"uuids"),
            },
        ]
    }

    fn decode_all(bytes: &[u8]) -> Result<Option<Message>, WireError> {
        let mut buf = BytesMut::from(bytes);
        try_decode(&mut buf)
    }

    #[test]
    fn every_message_round_trips() {
        for msg in samples() {
            let bytes = msg.encode().to_vec();
            let mut buf = BytesMut::from(&bytes[..]);
            let back = try_decode(&mut buf).unwrap().unwrap();
            assert_eq!(back, msg);
            assert!(buf.is_empty(), "decoder consumed exactly one frame");
        }
    }

    #[test]
    fn back_to_back_frames_decode_in_order() {
        let mut buf = BytesMut::new();
        for msg in samples() {
            buf.extend_from_slice(&msg.encode().to_vec());
        }
        for msg in samples() {
            assert_eq!(try_decode(&mut buf).unwrap().unwrap(), msg);
        }
        assert!(try_decode(&mut buf).unwrap().is_none());
    }

    #[test]
    fn every_truncation_waits_for_more_bytes() {
        for msg in samples() {
            let bytes = msg.encode().to_vec();
            for cut in 0..bytes.len() {
                assert_eq!(decode_all(&bytes[..cut]), Ok(None), "{msg:?} cut at {cut}");
            }
        }
    }

    /// A frame whose header announces a shorter payload than the message needs: the
    /// payload decoder must reject it, never read past it.
    #[test]
    fn every_short_payload_is_rejected() {
        for msg in samples() {
            let frame = msg.encode().to_vec();
            let payload = &frame[HEADER_LEN..];
            for cut in 0..payload.len() {
                let header = FrameHeader {
                    msg_type: msg.msg_type(),
                    flags: u16::from_be_bytes([frame[8], frame[9]]),
                    len: cut,
                };
                let res = Message::decode(&header, Bytes::copy_from_slice(&payload[..cut]));
                match &msg {
                    // Opaque or data-carrying tails are legitimately shorter.
                    Message::Extension { .. } => assert!(res.is_ok()),
                    Message::Write(_) if cut >= 24 => assert!(res.is_ok()),
                    _ => assert!(res.is_err(), "{msg:?} payload cut at {cut} accepted"),
                }
            }
        }
    }

    fn reheader(bytes: &mut [u8]) {
        let crc = crc32c::crc32c(&bytes[..16]);
        bytes[16..20].copy_from_slice(&crc.to_be_bytes());
    }

    fn ping() -> Vec<u8> {
        Message::Ping { token: 1 }.encode().to_vec()
    }

    #[test]
    fn bad_magic_is_rejected() {
        let mut b = ping();
        b[0] ^= 0xff;
        assert!(matches!(decode_all(&b), Err(WireError::BadMagic { .. })));
    }

    #[test]
    fn corrupted_header_fails_the_checksum() {
        for i in 4..20 {
            let mut b = ping();
            b[i] ^= 0x01;
            assert!(
                matches!(decode_all(&b), Err(WireError::HeaderChecksum { .. })),
                "byte {i}"
            );
        }
    }

    #[test]
    fn bad_format_reserved_type_flags_and_length_are_rejected() {
        let mut b = ping();
        b[4] = 2;
        reheader(&mut b);
        assert_eq!(
            decode_all(&b),
            Err(WireError::UnsupportedFrameFormat { found: 2 })
        );

        let mut b = ping();
        b[5] = 1;
        reheader(&mut b);
        assert_eq!(decode_all(&b), Err(WireError::ReservedNotZero));

        let mut b = ping();
        b[10] = 1;
        reheader(&mut b);
        assert_eq!(decode_all(&b), Err(WireError::ReservedNotZero));

        let mut b = ping();
        b[6..8].copy_from_slice(&0x0200u16.to_be_bytes());
        reheader(&mut b);
        assert_eq!(decode_all(&b), Err(WireError::UnknownType(0x0200)));

        let mut b = ping();
        b[8..10].copy_from_slice(&flags::FUA.to_be_bytes());
        reheader(&mut b);
        assert!(matches!(decode_all(&b), Err(WireError::BadFlags { .. })));

        let mut b = Message::Trim(RangeRequest {
            seq: 1,
            epoch: 1,
            offset: 0,
            len: 1,
            fua: false,
            ack_on_receive: false,
            may_unmap: false,
        })
        .encode()
        .to_vec();
        b[8..10].copy_from_slice(&flags::MAY_UNMAP.to_be_bytes());
        reheader(&mut b);
        assert!(matches!(decode_all(&b), Err(WireError::BadFlags { .. })));

        // Control frame above the control maximum.
        let mut b = ping();
        b[12..16].copy_from_slice(&((MAX_CONTROL_PAYLOAD + 1) as u32).to_be_bytes());
        reheader(&mut b);
        assert!(matches!(
            decode_all(&b),
            Err(WireError::FrameTooLarge { .. })
        ));

        // Data frame above the data maximum: refused before any allocation.
        let mut b = Message::Write(WriteRequest {
            seq: 1,
            epoch: 1,
            offset: 0,
            fua: false,
            ack_on_receive: false,
            data: Bytes::new(),
        })
        .encode()
        .to_vec();
        b[12..16].copy_from_slice(&u32::MAX.to_be_bytes());
        reheader(&mut b);
        assert!(matches!(
            decode_all(&b),
            Err(WireError::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let mut b = ping();
        b.push(0);
        b[12..16].copy_from_slice(&9u32.to_be_bytes());
        reheader(&mut b);
        assert!(matches!(
            decode_all(&b),
            Err(WireError::TrailingBytes { .. })
        ));
    }

    #[test]
    fn overflowing_ranges_are_rejected() {
        let w = Message::Write(WriteRequest {
            seq: 1,
            epoch: 1,
            offset: u64::MAX - 10,
            fua: false,
            ack_on_receive: false,
            data: Bytes::from(vec![1u8; 4096]),
        });
        assert!(matches!(
            decode_all(&w.encode().to_vec()),
            Err(WireError::RangeOverflow { .. })
        ));
        let t = Message::Trim(RangeRequest {
            seq: 1,
            epoch: 1,
            offset: 1,
            len: u64::MAX,
            fua: false,
            ack_on_receive: false,
            may_unmap: false,
        });
        assert!(matches!(
            decode_all(&t.encode().to_vec()),
            Err(WireError::RangeOverflow { .. })
        ));
    }

    fn hello_bytes(edit: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut b = samples()[0].encode().to_vec();
        edit(&mut b);
        reheader(&mut b);
        b
    }

    #[test]
    fn bad_hello_fields_are_rejected() {
        // min > max
        let b = hello_bytes(|b| b[HEADER_LEN..HEADER_LEN + 2].copy_from_slice(&5u16.to_be_bytes()));
        assert!(matches!(
            decode_all(&b),
            Err(WireError::BadVersionRange { .. })
        ));
        // version 0
        let b = hello_bytes(|b| b[HEADER_LEN..HEADER_LEN + 2].copy_from_slice(&0u16.to_be_bytes()));
        assert!(matches!(
            decode_all(&b),
            Err(WireError::BadVersionRange { .. })
        ));
        // protocol byte
        let b = hello_bytes(|b| b[HEADER_LEN + 4] = b'D');
        assert_eq!(decode_all(&b), Err(WireError::BadProtocol(b'D')));
        // node name not UTF-8
        let b = hello_bytes(|b| b[HEADER_LEN + 15] = 0xff);
        assert!(matches!(decode_all(&b), Err(WireError::BadUtf8 { .. })));
        // node name length beyond the maximum
        let b = hello_bytes(|b| {
            b[HEADER_LEN + 13..HEADER_LEN + 15].copy_from_slice(&300u16.to_be_bytes())
        });
        assert!(matches!(
            decode_all(&b),
            Err(WireError::FieldTooLong { .. })
        ));
        // node name length beyond the payload
        let b = hello_bytes(|b| {
            b[HEADER_LEN + 13..HEADER_LEN + 15].copy_from_slice(&200u16.to_be_bytes())
        });
        assert!(matches!(decode_all(&b), Err(WireError::Truncated { .. })));
        // empty node name
        let mut m = samples()[0].clone();
        if let Message::Hello(h) = &mut m {
            h.node.clear();
        }
        assert!(matches!(
            decode_all(&m.encode().to_vec()),
            Err(WireError::EmptyField { .. })
        ));
    }

    #[test]
    fn bad_write_outcome_is_rejected() {
        let mut b = Message::WriteAck {
            seq: 1,
            outcome: WriteOutcome::Written,
        }
        .encode()
        .to_vec();
        b[HEADER_LEN + 8] = 0;
        assert_eq!(decode_all(&b), Err(WireError::BadWriteOutcome(0)));
    }

    #[test]
    fn largest_write_round_trips_and_one_byte_more_is_refused() {
        let w = Message::Write(WriteRequest {
            seq: 1,
            epoch: 1,
            offset: 0,
            fua: false,
            ack_on_receive: false,
            data: Bytes::from(vec![7u8; MAX_DATA_LEN]),
        });
        assert_eq!(decode_all(&w.encode().to_vec()).unwrap().unwrap(), w);
        let too_big = Message::Write(WriteRequest {
            seq: 1,
            epoch: 1,
            offset: 0,
            fua: false,
            ack_on_receive: false,
            data: Bytes::from(vec![7u8; MAX_DATA_LEN + 1]),
        });
        assert!(matches!(
            decode_all(&too_big.encode().to_vec()),
            Err(WireError::FieldTooLong { .. })
        ));
    }

    /// Poor man's fuzzing: random bytes and randomly mutated valid frames (with the header
    /// checksum fixed up so the payload decoders are reached) never panic, and whatever
    /// decodes re-encodes to a frame that decodes to the same message.
    #[test]
    fn random_and_mutated_frames_never_panic() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let valid: Vec<Vec<u8>> = samples().iter().map(|m| m.encode().to_vec()).collect();
        for i in 0..20_000 {
            let mut bytes = if i % 4 == 0 {
                let len = rng.gen_range(0..128);
                (0..len).map(|_| rng.gen()).collect::<Vec<u8>>()
            } else {
                let mut b = valid[rng.gen_range(0..valid.len())].clone();
                for _ in 0..rng.gen_range(1..4) {
                    let at = rng.gen_range(0..b.len());
                    b[at] = rng.gen();
                }
                if rng.gen_bool(0.2) {
                    let cut = rng.gen_range(0..b.len());
                    b.truncate(cut);
                }
                b
            };
            if bytes.len() >= HEADER_LEN && rng.gen_bool(0.8) {
                bytes[0..4].copy_from_slice(&MAGIC.to_be_bytes());
                reheader(&mut bytes);
            }
            let mut buf = BytesMut::from(&bytes[..]);
            if let Ok(Some(msg)) = try_decode(&mut buf) {
                let again = decode_all(&msg.encode().to_vec()).unwrap().unwrap();
                assert_eq!(again, msg);
            }
        }
    }

    #[test]
    fn version_negotiation_picks_the_highest_common_version() {
        assert_eq!(negotiate_version(1, 1, 1, 1), Some(1));
        assert_eq!(negotiate_version(1, 3, 2, 5), Some(3));
        assert_eq!(negotiate_version(2, 5, 1, 3), Some(3));
        assert_eq!(negotiate_version(1, 2, 3, 4), None);
        assert_eq!(negotiate_version(3, 4, 1, 2), None);
    }
}
