//! The self-describing 4 KiB block the workload writes, and its decoder.
//!
//! ```text
//! 0      8        16       24        32      36                      4096
//! | magic | run id | block  | version | crc32c | filler(run, block, version) |
//! ```
//!
//! All integers little-endian. `crc32c` covers bytes 0..32 and 36..4096, so a torn or
//! corrupted block fails it; the block field catches a write that landed at the wrong
//! offset; the run id tells this run's data from an earlier run's on a reused export. The
//! filler is a deterministic pseudo-random stream, so the block's whole content is fixed by
//! (run, block, version) and nothing but the header needs to be logged.

/// Size of one workload block.
pub const BLOCK_SIZE: usize = 4096;
/// First eight bytes of every block the workload writes.
pub const MAGIC: [u8; 8] = *b"TNDMCHK1";
const CRC_AT: usize = 32;
const FILLER_AT: usize = 36;

/// What a block says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockTag {
    pub run_id: u64,
    pub block: u64,
    pub version: u64,
}

/// The result of decoding a block read back from a replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// All zeroes: never written (or trimmed).
    Zero,
    /// A well-formed block of the workload (checksum correct). Its `block` field may still
    /// differ from where it was read; the verifier checks that.
    Tagged(BlockTag),
    /// Anything else, with the reason.
    Garbage(String),
}

/// SplitMix64: a tiny seeded generator, enough for filler and workload choices.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// A value in `0..bound` (`bound` > 0; modulo bias is irrelevant here).
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound.max(1)
    }
}

fn filler_seed(tag: &BlockTag) -> u64 {
    let mut mix =
        SplitMix64::new(tag.run_id ^ tag.block.rotate_left(21) ^ tag.version.rotate_left(42));
    mix.next_u64()
}

fn crc(block: &[u8]) -> u32 {
    let head = crc32c::crc32c(&block[..CRC_AT]);
    crc32c::crc32c_append(head, &block[FILLER_AT..])
}

/// The full content of a block.
pub fn encode(tag: &BlockTag) -> Vec<u8> {
    let mut block = vec![0u8; BLOCK_SIZE];
    block[0..8].copy_from_slice(&MAGIC);
    block[8..16].copy_from_slice(&tag.run_id.to_le_bytes());
    block[16..24].copy_from_slice(&tag.block.to_le_bytes());
    block[24..32].copy_from_slice(&tag.version.to_le_bytes());
    let mut rng = SplitMix64::new(filler_seed(tag));
    for chunk in block[FILLER_AT..].chunks_mut(8) {
        let bytes = rng.next_u64().to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
    let sum = crc(&block);
    block[CRC_AT..FILLER_AT].copy_from_slice(&sum.to_le_bytes());
    block
}

fn le64(bytes: &[u8]) -> u64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&bytes[..8]);
    u64::from_le_bytes(raw)
}

/// Decode a block read back (must be `BLOCK_SIZE` long).
pub fn decode(block: &[u8]) -> Decoded {
    if block.len() != BLOCK_SIZE {
        return Decoded::Garbage(format!("{} bytes, expected {BLOCK_SIZE}", block.len()));
    }
    if block.iter().all(|b| *b == 0) {
        return Decoded::Zero;
    }
    if block[0..8] != MAGIC {
        return Decoded::Garbage(format!("bad magic {:02x?}", &block[0..8]));
    }
    let stored = u32::from_le_bytes([block[32], block[33], block[34], block[35]]);
    let computed = crc(block);
    if stored != computed {
        return Decoded::Garbage(format!(
            "checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): torn or corrupted"
        ));
    }
    Decoded::Tagged(BlockTag {
        run_id: le64(&block[8..16]),
        block: le64(&block[16..24]),
        version: le64(&block[24..32]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_decode_round_trip_and_corruption_is_detected() {
        let tag = BlockTag {
            run_id: 7,
            block: 12,
            version: 3,
        };
        let mut data = encode(&tag);
        assert_eq!(decode(&data), Decoded::Tagged(tag));
        assert_ne!(encode(&tag), encode(&BlockTag { version: 4, ..tag }));
        data[2000] ^= 1;
        assert!(matches!(decode(&data), Decoded::Garbage(_)));
        assert_eq!(decode(&vec![0u8; BLOCK_SIZE]), Decoded::Zero);
        // A torn block: first half new version, second half old.
        let old = encode(&BlockTag { version: 2, ..tag });
        let mut torn = encode(&tag);
        torn[2048..].copy_from_slice(&old[2048..]);
        assert!(matches!(decode(&torn), Decoded::Garbage(_)));
    }
}
