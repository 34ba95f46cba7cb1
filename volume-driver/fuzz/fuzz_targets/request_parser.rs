//! Fuzz the transmission request parser and validator: never panic, and every accepted
//! request lies inside the export and within the advertised maximum.
#![no_main]

use libfuzzer_sys::fuzz_target;
use volume_driver::nbd::proto::{self, Command, ExportLimits, REQUEST_HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    if data.len() < REQUEST_HEADER_LEN + 9 {
        return;
    }
    let mut raw = [0u8; REQUEST_HEADER_LEN];
    raw.copy_from_slice(&data[..REQUEST_HEADER_LEN]);
    let size = u64::from_be_bytes(
        data[REQUEST_HEADER_LEN..REQUEST_HEADER_LEN + 8]
            .try_into()
            .unwrap(),
    );
    let read_only = data[REQUEST_HEADER_LEN + 8] & 1 == 1;
    // Also try with the magic forced right, so the validator sees every header.
    for fix_magic in [false, true] {
        if fix_magic {
            raw[..4].copy_from_slice(&proto::NBD_REQUEST_MAGIC.to_be_bytes());
        }
        let Ok(hdr) = proto::parse_request_header(&raw) else {
            continue;
        };
        let limits = ExportLimits { size, read_only };
        match proto::validate_request(&hdr, limits) {
            Ok(Command::Read { offset, len }) | Ok(Command::Write { offset, len, .. }) => {
                assert!(len <= proto::MAX_BLOCK_SIZE);
                assert!(offset
                    .checked_add(u64::from(len))
                    .is_some_and(|end| end <= size));
            }
            Ok(Command::Trim { offset, len, .. })
            | Ok(Command::WriteZeroes { offset, len, .. }) => {
                assert!(!read_only);
                assert!(offset
                    .checked_add(u64::from(len))
                    .is_some_and(|end| end <= size));
            }
            Ok(_) => {}
            Err(rej) => {
                assert_ne!(rej.errno, 0);
                if hdr.kind != proto::NBD_CMD_WRITE {
                    assert_eq!(rej.discard, 0);
                }
            }
        }
    }
});
