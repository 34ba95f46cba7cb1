//! The test NBD client against a real server (`qemu-nbd` serving a temp file): handshake,
//! size, write/read round trip with and without FUA, flush, the bytes landing in the file,
//! a refused open carrying the server's message, and range checks. Needs `qemu-nbd`
//! (qemu-utils).

use std::os::unix::fs::FileExt;

use tandem_tests::nbd_client::{NbdClient, NbdClientError};
use tandem_tests::vm::QemuNbd;

const MIB: u64 = 1 << 20;

#[test]
fn client_round_trips_against_qemu_nbd() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(8 * MIB)
        .unwrap();
    let socket = dir.path().join("nbd.sock");
    let _server = QemuNbd::serve(&image, &socket, "disk0").unwrap();

    let mut client = NbdClient::connect(&socket, "disk0", None).unwrap();
    assert_eq!(client.size(), 8 * MIB);
    assert!(!client.read_only());

    let pattern: Vec<u8> = (0..65536u32).map(|i| (i * 7 + 3) as u8).collect();
    client.write(MIB, &pattern, false).unwrap();
    client.write(3 * MIB, &pattern[..4096], true).unwrap();
    client.flush().unwrap();
    assert_eq!(client.read(MIB, 65536).unwrap(), pattern);
    assert_eq!(client.read(3 * MIB, 4096).unwrap(), pattern[..4096]);
    assert_eq!(client.read(0, 4096).unwrap(), vec![0u8; 4096]);

    // Past the end is refused before anything is sent; the connection stays usable.
    let past = client.read(8 * MIB - 512, 4096).unwrap_err();
    assert!(matches!(past, NbdClientError::Invalid(_)), "{past}");
    assert_eq!(client.read(MIB, 16).unwrap(), pattern[..16]);
    client.disconnect().unwrap();

    // The bytes are in the file.
    let file = std::fs::File::open(&image).unwrap();
    let mut back = vec![0u8; 65536];
    file.read_exact_at(&mut back, MIB).unwrap();
    assert_eq!(back, pattern);

    // An unknown export is refused with the server's reply code.
    let refused = NbdClient::connect(&socket, "nope", None)
        .err()
        .expect("unknown export must be refused");
    match &refused {
        NbdClientError::Refused { code, .. } => {
            assert_eq!(*code, "NBD_REP_ERR_UNKNOWN", "{refused}")
        }
        other => panic!("expected a refusal, got {other}"),
    }
    assert!(!refused.is_connection_lost());
}

#[test]
fn connect_to_missing_socket_is_a_connection_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = NbdClient::connect(&dir.path().join("none.sock"), "x", None)
        .err()
        .unwrap();
    assert!(err.is_connection_lost(), "{err}");
    assert!(err.to_string().contains("none.sock"), "{err}");
}
