//! virtio-blk requests: pure parsing and checking of what a guest puts in a virtqueue.
//!
//! Nothing here touches guest memory. A descriptor chain is first reduced to two lists of
//! [`Segment`]s ([`Chain::split`]): the bytes the driver gives (header, then write data or
//! discard ranges) and the bytes it wants back (read data, then the one status byte). The
//! chain is treated as a byte stream, so a header split over descriptors is fine. Then
//! [`parse`] turns the 16-byte header (and, for DISCARD/WRITE_ZEROES, the range list) into a
//! [`Request`] whose byte range is checked against the volume size. Every length, sector and
//! count comes from the guest and is checked here; a bad one is an [`Status::IoErr`] or
//! [`Status::Unsupp`] answer, never a panic.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};

/// virtio-blk sectors are 512 bytes whatever the block size.
pub const SECTOR_SIZE: u64 = 512;
/// The request header: `u32 type, u32 ioprio, u64 sector`.
pub const HEADER_LEN: u64 = 16;
/// One DISCARD / WRITE_ZEROES range: `u64 sector, u32 num_sectors, u32 flags`.
pub const RANGE_LEN: u64 = 16;
/// Largest READ or WRITE payload accepted (as NBD's maximum block size).
pub const MAX_IO_BYTES: u64 = 32 << 20;
/// Ranges per DISCARD / WRITE_ZEROES request (advertised as max_discard_seg and
/// max_write_zeroes_seg).
pub const MAX_RANGES: u64 = 1;
/// `VIRTIO_BLK_GET_ID` answers at most this many bytes.
pub const ID_BYTES: usize = 20;
/// The only flag a WRITE_ZEROES range may carry: the device may deallocate.
const RANGE_FLAG_UNMAP: u32 = 1;

/// One guest-physical buffer of a descriptor chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: u64,
    pub len: u32,
}

/// Why a chain cannot be answered at all (no status byte to write into).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    #[error("the chain carries more than {max} bytes")]
    TooLong { max: u64 },
    #[error("the chain has no device-writable byte for the status")]
    NoStatus,
    #[error("the chain does not end (it loops, is longer than the queue, or leads out of the descriptor table or guest memory)")]
    Unterminated,
    #[error("the chain's first descriptor cannot be read (out of the descriptor table or guest memory, or a bad indirect table)")]
    Unreadable,
}

/// Check that a chain read from the ring (at most `queue_size + 1` descriptors, `read` of
/// them, the last saying NEXT or not) ends where the guest ended it. The queue stops
/// following a chain that loops, runs past the queue's size, leads out of the descriptor
/// table, to an unreadable descriptor or to a bad (or nested) indirect table, without
/// saying so: the last descriptor read then still says NEXT, or (through an indirect
/// table, which the queue follows for its own length) there are more descriptors than the
/// queue holds. What was read is then not the request the guest built, so it is refused
/// whole.
pub fn check_ends(read: usize, last_has_next: bool, queue_size: u16) -> Result<(), ChainError> {
    if read == 0 {
        Err(ChainError::Unreadable)
    } else if read > usize::from(queue_size) || last_has_next {
        Err(ChainError::Unterminated)
    } else {
        Ok(())
    }
}

/// A descriptor chain as two byte streams.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Chain {
    /// Device-readable segments, in order (header first).
    pub readable: Vec<Segment>,
    /// Device-writable segments, in order (status byte last).
    pub writable: Vec<Segment>,
    readable_len: u64,
    writable_len: u64,
}

impl Chain {
    /// The most bytes a chain may carry: the largest payload plus header and status.
    pub const MAX_BYTES: u64 = MAX_IO_BYTES + HEADER_LEN + 1;

    /// Split `(addr, len, device_writable)` descriptors. Empty descriptors are skipped.
    pub fn split(
        descriptors: impl IntoIterator<Item = (u64, u32, bool)>,
    ) -> Result<Chain, ChainError> {
        let mut chain = Chain::default();
        for (addr, len, writable) in descriptors {
            if len == 0 {
                continue;
            }
            let segment = Segment { addr, len };
            if writable {
                chain.writable.push(segment);
                chain.writable_len += u64::from(len);
            } else {
                if !chain.writable.is_empty() {
                    return Err(ChainError::ReadableAfterWritable);
                }
                chain.readable.push(segment);
                chain.readable_len += u64::from(len);
            }
            if chain.readable_len + chain.writable_len > Self::MAX_BYTES {
                return Err(ChainError::TooLong {
                    max: Self::MAX_BYTES,
                });
            }
        }
        if chain.writable_len == 0 {
            return Err(ChainError::NoStatus);
        }
        Ok(chain)
    }

    /// Bytes the driver gives after the header (write data or ranges).
    pub fn data_out_len(&self) -> u64 {
        self.readable_len.saturating_sub(HEADER_LEN)
    }

    /// Bytes the driver wants back before the status byte (read data, id).
    pub fn data_in_len(&self) -> u64 {
        self.writable_len - 1
    }

    /// Bytes the driver gives in all.
    pub fn readable_len(&self) -> u64 {
        self.readable_len
    }

    /// Where the status byte goes: the last writable byte.
    pub fn status_addr(&self) -> Option<u64> {
        let last = self.writable.last()?;
        last.addr.checked_add(u64::from(last.len) - 1)
    }
}

/// Where to answer `VIRTIO_BLK_S_IOERR` for a chain [`Chain::split`] refused: the last
/// byte of its last descriptor when that one is device-writable (where a well-formed chain
/// has its status byte), else nowhere.
pub fn fallback_status_addr(last_descriptor: Option<(u64, u32, bool)>) -> Option<u64> {
    match last_descriptor {
        Some((addr, len, true)) if len > 0 => addr.checked_add(u64::from(len) - 1),
        _ => None,
    }
}

/// The status byte answered to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    IoErr,
    Unsupp,
}

impl Status {
    pub const ALL: &'static [Status] = &[Status::Ok, Status::IoErr, Status::Unsupp];

    pub fn byte(self) -> u8 {
        match self {
            Status::Ok => VIRTIO_BLK_S_OK as u8,
            Status::IoErr => VIRTIO_BLK_S_IOERR as u8,
            Status::Unsupp => VIRTIO_BLK_S_UNSUPP as u8,
        }
    }

    /// The metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::IoErr => "ioerr",
            Status::Unsupp => "unsupp",
        }
    }
}

/// A request's type as the metrics count it; `Other` is an unknown type or a chain too
/// malformed to read one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    Other,
}

impl Op {
    pub const ALL: &'static [Op] = &[
        Op::Read,
        Op::Write,
        Op::Flush,
        Op::GetId,
        Op::Discard,
        Op::WriteZeroes,
        Op::Other,
    ];

    /// The type of a request from its header's first field.
    pub fn of(header: &[u8; HEADER_LEN as usize]) -> Op {
        match u32::from_le_bytes([header[0], header[1], header[2], header[3]]) {
            VIRTIO_BLK_T_IN => Op::Read,
            VIRTIO_BLK_T_OUT => Op::Write,
            VIRTIO_BLK_T_FLUSH => Op::Flush,
            VIRTIO_BLK_T_GET_ID => Op::GetId,
            VIRTIO_BLK_T_DISCARD => Op::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => Op::WriteZeroes,
            _ => Op::Other,
        }
    }

    /// The metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::GetId => "get_id",
            Op::Discard => "discard",
            Op::WriteZeroes => "write_zeroes",
            Op::Other => "other",
        }
    }
}

/// A checked request: every byte range lies inside the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Read { offset: u64, len: u32 },
    Write { offset: u64, len: u32 },
    Flush,
    GetId,
    Discard { offset: u64, len: u64 },
    WriteZeroes { offset: u64, len: u64, unmap: bool },
}

/// A request the device answers with an error status, with the reason for the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Rejected {
    pub status: Status,
    pub reason: String,
}

fn reject(status: Status, reason: impl Into<String>) -> Rejected {
    Rejected {
        status,
        reason: reason.into(),
    }
}

/// The bytes of a request's range list (`data_out`), for DISCARD / WRITE_ZEROES.
pub type RangeBytes<'a> = &'a [u8];

/// Parse `header` (the first 16 readable bytes) of `chain` against a volume of `size`
/// bytes; `ranges` are the readable bytes after the header when the type needs them
/// (callers read at most [`MAX_RANGES`] × 16 of them, see [`ranges_len`]).
pub fn parse(
    header: &[u8; HEADER_LEN as usize],
    chain: &Chain,
    ranges: RangeBytes<'_>,
    size: u64,
) -> Result<Request, Rejected> {
    let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let mut sector_bytes = [0u8; 8];
    sector_bytes.copy_from_slice(&header[8..16]);
    let sector = u64::from_le_bytes(sector_bytes);
    if chain.readable_len() < HEADER_LEN {
        return Err(reject(Status::IoErr, "header shorter than 16 bytes"));
    }
    match kind {
        VIRTIO_BLK_T_IN => {
            let len = chain.data_in_len();
            let (offset, len) = io_range(sector, len, size)?;
            Ok(Request::Read { offset, len })
        }
        VIRTIO_BLK_T_OUT => {
            let len = chain.data_out_len();
            let (offset, len) = io_range(sector, len, size)?;
            Ok(Request::Write { offset, len })
        }
        VIRTIO_BLK_T_FLUSH => Ok(Request::Flush),
        VIRTIO_BLK_T_GET_ID => Ok(Request::GetId),
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let zeroes = kind == VIRTIO_BLK_T_WRITE_ZEROES;
            let (offset, len, unmap) = range(chain, ranges, size, zeroes)?;
            Ok(if zeroes {
                Request::WriteZeroes { offset, len, unmap }
            } else {
                Request::Discard { offset, len }
            })
        }
        other => Err(reject(Status::Unsupp, format!("request type {other}"))),
    }
}

/// How many range bytes to read after the header for a chain (0 when it has none or too
/// many: [`parse`] rejects those).
pub fn ranges_len(chain: &Chain) -> usize {
    let len = chain.data_out_len();
    if len == 0 || len > MAX_RANGES * RANGE_LEN {
        0
    } else {
        len as usize
    }
}

fn byte_range(sector: u64, len: u64, size: u64) -> Result<u64, Rejected> {
    let offset = sector
        .checked_mul(SECTOR_SIZE)
        .ok_or_else(|| reject(Status::IoErr, format!("sector {sector} overflows")))?;
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(offset),
        _ => Err(reject(
            Status::IoErr,
            format!("{len} bytes at sector {sector} go past the end ({size} bytes)"),
        )),
    }
}

fn io_range(sector: u64, len: u64, size: u64) -> Result<(u64, u32), Rejected> {
    if !len.is_multiple_of(SECTOR_SIZE) {
        return Err(reject(
            Status::IoErr,
            format!("data length {len} is not a multiple of 512"),
        ));
    }
    if len > MAX_IO_BYTES {
        return Err(reject(
            Status::IoErr,
            format!("data length {len} exceeds {MAX_IO_BYTES}"),
        ));
    }
    let offset = byte_range(sector, len, size)?;
    Ok((offset, len as u32))
}

fn range(
    chain: &Chain,
    ranges: &[u8],
    size: u64,
    zeroes: bool,
) -> Result<(u64, u64, bool), Rejected> {
    let len = chain.data_out_len();
    if len == 0 || !len.is_multiple_of(RANGE_LEN) || len > MAX_RANGES * RANGE_LEN {
        return Err(reject(
            Status::IoErr,
            format!("range list of {len} bytes (one 16-byte range expected)"),
        ));
    }
    if ranges.len() as u64 != len {
        return Err(reject(Status::IoErr, "range list truncated"));
    }
    let mut sector = [0u8; 8];
    sector.copy_from_slice(&ranges[0..8]);
    let sector = u64::from_le_bytes(sector);
    let sectors = u32::from_le_bytes([ranges[8], ranges[9], ranges[10], ranges[11]]);
    let flags = u32::from_le_bytes([ranges[12], ranges[13], ranges[14], ranges[15]]);
    let allowed = if zeroes { RANGE_FLAG_UNMAP } else { 0 };
    if flags & !allowed != 0 {
        return Err(reject(Status::Unsupp, format!("range flags {flags:#x}")));
    }
    let bytes = u64::from(sectors) * SECTOR_SIZE;
    let offset = byte_range(sector, bytes, size)?;
    Ok((offset, bytes, flags & RANGE_FLAG_UNMAP != 0))
}

/// The GET_ID answer: the volume name, cut to 20 bytes (the guest's serial number).
pub fn device_id(name: &str) -> Vec<u8> {
    name.bytes().take(ID_BYTES).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: u64 = 1 << 20;

    fn header(kind: u32, sector: u64) -> [u8; 16] {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        h
    }

    fn chain(out: u32, inn: u32) -> Chain {
        let mut d = vec![(0x1000, 16, false)];
        if out > 0 {
            d.push((0x2000, out, false));
        }
        if inn > 0 {
            d.push((0x10_0000, inn, true));
        }
        d.push((0x9000, 1, true));
        Chain::split(d).expect("valid chain")
    }

    #[test]
    fn read_and_write_ranges_are_checked_against_the_size() {
        let c = chain(0, 4096);
        assert_eq!(
            parse(&header(VIRTIO_BLK_T_IN, 8), &c, &[], SIZE),
            Ok(Request::Read {
                offset: 4096,
                len: 4096
            })
        );
        let last = SIZE / 512 - 8;
        assert!(parse(&header(VIRTIO_BLK_T_IN, last), &c, &[], SIZE).is_ok());
        let past = parse(&header(VIRTIO_BLK_T_IN, last + 1), &c, &[], SIZE);
        assert_eq!(past.map_err(|r| r.status), Err(Status::IoErr));
        let overflow = parse(
            &header(VIRTIO_BLK_T_OUT, u64::MAX),
            &chain(512, 0),
            &[],
            SIZE,
        );
        assert_eq!(overflow.map_err(|r| r.status), Err(Status::IoErr));
        let odd = parse(&header(VIRTIO_BLK_T_OUT, 0), &chain(100, 0), &[], SIZE);
        assert_eq!(odd.map_err(|r| r.status), Err(Status::IoErr));
    }

    #[test]
    fn chains_without_status_or_out_of_order_or_too_long_are_refused() {
        assert_eq!(Chain::split([(0, 16, false)]), Err(ChainError::NoStatus));
        assert_eq!(
            Chain::split([(0, 1, true), (0, 16, false)]),
            Err(ChainError::ReadableAfterWritable)
        );
        let huge = (0..20).map(|i| (i << 32, u32::MAX, true));
        assert!(matches!(
            Chain::split(huge),
            Err(ChainError::TooLong { .. })
        ));
    }

    #[test]
    fn a_chain_ends_only_at_a_descriptor_without_next_within_the_queues_size() {
        assert_eq!(check_ends(3, false, 16), Ok(()));
        assert_eq!(check_ends(16, false, 16), Ok(()));
        assert_eq!(check_ends(0, false, 16), Err(ChainError::Unreadable));
        assert_eq!(check_ends(3, true, 16), Err(ChainError::Unterminated));
        assert_eq!(check_ends(16, true, 16), Err(ChainError::Unterminated));
        // Through an indirect table longer than the queue (walked for one more).
        assert_eq!(check_ends(17, false, 16), Err(ChainError::Unterminated));
    }

    #[test]
    fn status_is_the_last_writable_byte_even_inside_a_data_buffer() {
        let c = Chain::split([(0x1000, 16, false), (0x5000, 513, true)]).expect("chain");
        assert_eq!(c.status_addr(), Some(0x5000 + 512));
        assert_eq!(c.data_in_len(), 512);
    }

    #[test]
    fn discard_and_write_zeroes_take_one_range_with_only_known_flags() {
        let mut r = [0u8; 16];
        r[0..8].copy_from_slice(&2u64.to_le_bytes());
        r[8..12].copy_from_slice(&8u32.to_le_bytes());
        let c = chain(16, 0);
        assert_eq!(
            parse(&header(VIRTIO_BLK_T_DISCARD, 0), &c, &r, SIZE),
            Ok(Request::Discard {
                offset: 1024,
                len: 4096
            })
        );
        r[12] = 1;
        assert_eq!(
            parse(&header(VIRTIO_BLK_T_WRITE_ZEROES, 0), &c, &r, SIZE),
            Ok(Request::WriteZeroes {
                offset: 1024,
                len: 4096,
                unmap: true
            })
        );
        let bad_flag = parse(&header(VIRTIO_BLK_T_DISCARD, 0), &c, &r, SIZE);
        assert_eq!(bad_flag.map_err(|r| r.status), Err(Status::Unsupp));
        let two = chain(32, 0);
        assert_eq!(ranges_len(&two), 0);
        let refused = parse(&header(VIRTIO_BLK_T_DISCARD, 0), &two, &[], SIZE);
        assert_eq!(refused.map_err(|r| r.status), Err(Status::IoErr));
    }

    #[test]
    fn a_refused_chain_gets_its_status_in_the_last_descriptor_only_when_that_is_writable() {
        assert_eq!(
            fallback_status_addr(Some((0x9000, 16, true))),
            Some(0x9000 + 15)
        );
        assert_eq!(fallback_status_addr(Some((0x9000, 16, false))), None);
        assert_eq!(fallback_status_addr(Some((0x9000, 0, true))), None);
        assert_eq!(fallback_status_addr(Some((u64::MAX, 2, true))), None);
        assert_eq!(fallback_status_addr(None), None);
    }

    #[test]
    fn ops_follow_the_header_type() {
        assert_eq!(Op::of(&header(VIRTIO_BLK_T_IN, 0)), Op::Read);
        assert_eq!(
            Op::of(&header(VIRTIO_BLK_T_WRITE_ZEROES, 0)),
            Op::WriteZeroes
        );
        assert_eq!(Op::of(&header(0xdead, 0)), Op::Other);
    }

    #[test]
    fn unknown_types_are_unsupported() {
        let got = parse(&header(0xdead, 0), &chain(0, 0), &[], SIZE);
        assert_eq!(got.map_err(|r| r.status), Err(Status::Unsupp));
    }
}
