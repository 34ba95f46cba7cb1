//! Fuzz the handshake parsers: client flags, option headers and option payloads.
#![no_main]

use libfuzzer_sys::fuzz_target;
use volume_driver::nbd::proto::{self, ClientOption};

fuzz_target!(|data: &[u8]| {
    if data.len() >= 4 {
        let _ = proto::parse_client_flags(data[..4].try_into().unwrap());
    }
    if data.len() >= 16 {
        let _ = proto::parse_option_header(data[..16].try_into().unwrap());
    }
    if data.len() < 4 {
        return;
    }
    // Exercise the interesting options more often than random 32-bit values would.
    let option = u32::from_be_bytes(data[..4].try_into().unwrap()) % 12;
    match proto::parse_option(option, &data[4..]) {
        ClientOption::ExportName(name) => assert!(name.len() <= proto::MAX_STRING_LEN),
        ClientOption::Info(req) | ClientOption::Go(req) => {
            assert!(req.name.len() <= proto::MAX_STRING_LEN);
            assert!(!req.name.contains('\0'));
        }
        _ => {}
    }
});
