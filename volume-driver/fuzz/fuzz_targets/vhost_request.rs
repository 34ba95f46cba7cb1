//! Fuzz the virtio-blk request parser of the vhost-user-blk frontend: the input is a
//! descriptor chain (address, length, writable flag per descriptor), a 16-byte request
//! header, range bytes and a volume size, all guest-controlled. Parsing must never panic,
//! and an accepted request must lie inside the volume.
#![no_main]

use libfuzzer_sys::fuzz_target;
use volume_driver::vhost::request::{self, Chain, Request, HEADER_LEN};

fn u64_at(data: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    for (i, byte) in data.iter().skip(at).take(8).enumerate() {
        b[i] = *byte;
    }
    u64::from_le_bytes(b)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 + HEADER_LEN as usize {
        return;
    }
    let size = u64_at(data, 0);
    let mut header = [0u8; HEADER_LEN as usize];
    header.copy_from_slice(&data[8..8 + HEADER_LEN as usize]);
    let rest = &data[8 + HEADER_LEN as usize..];
    // Descriptors: 13 bytes each (u64 addr, u32 len, u8 flags); the tail is range bytes.
    let count = (rest.first().copied().unwrap_or(0) % 8) as usize;
    let descriptors: Vec<(u64, u32, bool)> = rest
        .get(1..)
        .unwrap_or_default()
        .chunks_exact(13)
        .take(count)
        .map(|d| {
            let len = u32::from_le_bytes([d[8], d[9], d[10], d[11]]);
            (u64_at(d, 0), len, d[12] & 1 == 1)
        })
        .collect();
    let ranges_from = 1 + 13 * descriptors.len();
    let Ok(chain) = Chain::split(descriptors) else {
        return;
    };
    let want = request::ranges_len(&chain);
    let ranges = rest.get(ranges_from..).unwrap_or_default();
    let ranges = &ranges[..want.min(ranges.len())];
    let _ = chain.status_addr();
    let Ok(parsed) = request::parse(&header, &chain, ranges, size) else {
        return;
    };
    let inside = |offset: u64, len: u64| offset.checked_add(len).is_some_and(|end| end <= size);
    match parsed {
        Request::Read { offset, len } | Request::Write { offset, len } => {
            assert!(inside(offset, u64::from(len)));
            assert!(u64::from(len) <= request::MAX_IO_BYTES);
        }
        Request::Discard { offset, len } | Request::WriteZeroes { offset, len, .. } => {
            assert!(inside(offset, len));
        }
        Request::Flush | Request::GetId => {}
    }
});
