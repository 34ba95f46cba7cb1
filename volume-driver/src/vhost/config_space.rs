//! The virtio-blk config space (`struct virtio_blk_config`, virtio 1.2 §5.2.4) as the
//! guest reads it: size, block size, queue count and the DISCARD / WRITE_ZEROES limits.
//!
//! Laid out by hand, little-endian, up to `write_zeroes_may_unmap` (60 bytes); the fields
//! after it (secure erase, zoned) belong to features that are not offered. Reads outside
//! the layout answer nothing, which the daemon reports to the frontend as a failure.

use super::request::{MAX_IO_BYTES, MAX_RANGES, SECTOR_SIZE};

/// Logical block size shown to the guest.
pub const BLOCK_SIZE: u32 = 4096;
/// Largest data segment (size_max); seg_max × size_max is the largest request.
const SEGMENT_MAX: u32 = 1 << 20;
/// Bytes of the config space served.
pub const LEN: usize = 60;
/// Largest DISCARD / WRITE_ZEROES range, in sectors (u32::MAX sectors rounded down to
/// whole blocks).
const MAX_RANGE_SECTORS: u32 = u32::MAX - (u32::MAX % (BLOCK_SIZE / SECTOR_SIZE as u32));

/// A filled-in config space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigSpace([u8; LEN]);

impl ConfigSpace {
    /// The config space of a `size`-byte volume served on up to `num_queues` queues.
    pub fn new(size: u64, num_queues: u16) -> ConfigSpace {
        let mut b = [0u8; LEN];
        let mut put = |offset: usize, bytes: &[u8]| {
            b[offset..offset + bytes.len()].copy_from_slice(bytes);
        };
        put(0, &(size / SECTOR_SIZE).to_le_bytes()); // capacity, in 512-byte sectors
        put(8, &SEGMENT_MAX.to_le_bytes()); // size_max: bytes in one segment
        put(
            12,
            &((MAX_IO_BYTES / u64::from(SEGMENT_MAX)) as u32).to_le_bytes(),
        ); // seg_max
        put(20, &BLOCK_SIZE.to_le_bytes()); // blk_size
        put(24, &[0, 0]); // physical_block_exp, alignment_offset
        put(26, &1u16.to_le_bytes()); // min_io_size (in blocks)
        put(28, &1u32.to_le_bytes()); // opt_io_size (in blocks)
        put(34, &num_queues.to_le_bytes());
        put(36, &MAX_RANGE_SECTORS.to_le_bytes()); // max_discard_sectors
        put(40, &(MAX_RANGES as u32).to_le_bytes()); // max_discard_seg
        put(44, &(BLOCK_SIZE / SECTOR_SIZE as u32).to_le_bytes()); // discard_sector_alignment
        put(48, &MAX_RANGE_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
        put(52, &(MAX_RANGES as u32).to_le_bytes()); // max_write_zeroes_seg
        put(56, &[1]); // write_zeroes_may_unmap
        ConfigSpace(b)
    }

    /// `size` bytes at `offset`, or nothing when that is outside the layout.
    pub fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        let start = offset as usize;
        match start.checked_add(size as usize) {
            Some(end) if end <= LEN => self.0[start..end].to_vec(),
            _ => {
                tracing::warn!(offset, size, "config space read outside virtio_blk_config");
                Vec::new()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_block_size_and_queues_sit_where_virtio_blk_config_has_them() {
        let c = ConfigSpace::new(1 << 30, 4);
        assert_eq!(c.read(0, 8), (2u64 << 20).to_le_bytes());
        assert_eq!(c.read(20, 4), 4096u32.to_le_bytes());
        assert_eq!(c.read(34, 2), 4u16.to_le_bytes());
        assert_eq!(c.read(56, 1), [1]);
        assert_eq!(c.read(0, LEN as u32).len(), LEN);
    }

    #[test]
    fn reads_outside_the_layout_answer_nothing() {
        let c = ConfigSpace::new(4096, 1);
        assert!(c.read(59, 2).is_empty());
        assert!(c.read(u32::MAX, u32::MAX).is_empty());
    }
}
