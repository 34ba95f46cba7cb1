//! Test data on replicated volumes: seeded random bytes, bulk writes and reads over a
//! node's NBD socket ([`crate::nbd_client`], 1 MiB requests), and content hashes of
//! replica backing files (sparse-aware, via `sha256sum` from coreutils) to prove replicas
//! hold the same bytes.

use std::path::Path;
use std::time::Duration;

use crate::checker::block::SplitMix64;
use crate::nbd_client::NbdClient;

/// Largest request the helpers send.
pub const CHUNK: usize = 1 << 20;

/// `len` bytes of seeded pseudo-random data (different seeds give different data).
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = SplitMix64::new(seed);
    let mut data = Vec::with_capacity(len + 8);
    while data.len() < len {
        data.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    data.truncate(len);
    data
}

/// Open `volume` on the NBD socket (a writable open: the node must be, or become, Primary).
pub fn open(socket: &Path, volume: &str) -> NbdClient {
    NbdClient::connect(socket, volume, Some(Duration::from_secs(60)))
        .unwrap_or_else(|e| panic!("NBD open of {volume} on {}: {e}", socket.display()))
}

/// Write `data` at `offset` in 1 MiB requests, then FLUSH; panics on any error.
pub fn write_all(client: &mut NbdClient, offset: u64, data: &[u8]) {
    for (i, chunk) in data.chunks(CHUNK).enumerate() {
        let at = offset + (i * CHUNK) as u64;
        client
            .write(at, chunk, false)
            .unwrap_or_else(|e| panic!("NBD write at {at}: {e}"));
    }
    client.flush().unwrap_or_else(|e| panic!("NBD flush: {e}"));
}

/// Read `len` bytes at `offset` in 1 MiB requests; panics on any error.
pub fn read_all(client: &mut NbdClient, offset: u64, len: usize) -> Vec<u8> {
    let mut data = Vec::with_capacity(len);
    while data.len() < len {
        let at = offset + data.len() as u64;
        let n = (len - data.len()).min(CHUNK) as u32;
        let part = client
            .read(at, n)
            .unwrap_or_else(|e| panic!("NBD read at {at}: {e}"));
        data.extend_from_slice(&part);
    }
    data
}

/// A content hash of a file, e.g. a replica's backing file in a file pool: sha256 over
/// every 1 MiB-aligned chunk that is not all zeroes, each preceded by its offset. Holes are
/// skipped (`SEEK_DATA`/`SEEK_HOLE`), so a sparse 2 GiB image hashes in a moment, and the
/// hash depends only on the bytes (a hole and written zeroes hash alike), not on which
/// ranges happen to be allocated.
pub fn content_hash(path: &Path) -> String {
    use std::os::unix::fs::FileExt;
    use std::os::unix::io::AsRawFd;
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let size = file.metadata().expect("stat").len();
    let fd = file.as_raw_fd();
    let seek = |offset: u64, whence: libc::c_int| -> Option<u64> {
        // SAFETY: lseek on a descriptor we own; it only moves the file offset.
        let at = unsafe { libc::lseek(fd, offset as libc::off_t, whence) };
        (at >= 0).then_some(at as u64)
    };
    let zero = vec![0u8; CHUNK];
    let mut buf = vec![0u8; CHUNK];
    let mut stream = Vec::new();
    let mut next_chunk = 0u64; // first chunk offset not yet hashed
    let mut pos = 0u64;
    while pos < size {
        let Some(data) = seek(pos, libc::SEEK_DATA) else {
            break; // ENXIO: only a hole remains
        };
        let hole = seek(data, libc::SEEK_HOLE).unwrap_or(size).min(size);
        let mut chunk = (data / CHUNK as u64 * CHUNK as u64).max(next_chunk);
        while chunk < hole {
            let len = (size - chunk).min(CHUNK as u64) as usize;
            file.read_exact_at(&mut buf[..len], chunk)
                .unwrap_or_else(|e| panic!("read {} at {chunk}: {e}", path.display()));
            if buf[..len] != zero[..len] {
                stream.extend_from_slice(&chunk.to_le_bytes());
                stream.extend_from_slice(&buf[..len]);
            }
            chunk += CHUNK as u64;
        }
        next_chunk = chunk;
        pos = hole.max(chunk);
    }
    stream.extend_from_slice(&size.to_le_bytes());
    sha256_bytes(&stream)
}

/// sha256 (hex) of a byte slice, through `sha256sum` (fast even in debug builds).
pub fn sha256_bytes(data: &[u8]) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("sha256sum (coreutils) must be installed");
    let mut stdin = child.stdin.take().expect("piped stdin");
    let data = data.to_vec();
    let feeder = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output().expect("wait for sha256sum");
    feeder
        .join()
        .expect("feeder thread")
        .expect("feeding sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// `len` bytes of a file at `offset` (a replica's backing file, read directly).
pub fn read_file_range(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut data = vec![0u8; len];
    file.read_exact_at(&mut data, offset)
        .unwrap_or_else(|e| panic!("read {} at {offset}: {e}", path.display()));
    data
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_bytes_are_seeded_and_sized() {
        assert_eq!(random_bytes(1, 1000), random_bytes(1, 1000));
        assert_ne!(random_bytes(1, 64), random_bytes(2, 64));
        assert_eq!(random_bytes(3, 13).len(), 13);
    }

    #[test]
    fn sha256_of_bytes_and_file_agree() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"abc").unwrap();
        let expected = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(sha256_bytes(b"abc"), expected);
        assert_eq!(read_file_range(&path, 1, 2), b"bc");
    }

    #[test]
    fn content_hash_sees_bytes_not_allocation() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let (sparse, dense) = (dir.path().join("sparse"), dir.path().join("dense"));
        let size = 8 * CHUNK as u64 + 123;
        let f = std::fs::File::create(&sparse).unwrap();
        f.set_len(size).unwrap();
        f.write_all_at(b"x", 3 * CHUNK as u64 + 5).unwrap();
        let g = std::fs::File::create(&dense).unwrap();
        g.write_all_at(&vec![0u8; size as usize], 0).unwrap();
        g.write_all_at(b"x", 3 * CHUNK as u64 + 5).unwrap();
        assert_eq!(content_hash(&sparse), content_hash(&dense));
        f.write_all_at(b"y", size - 1).unwrap();
        assert_ne!(content_hash(&sparse), content_hash(&dense));
        g.write_all_at(b"y", size - 1).unwrap();
        assert_eq!(content_hash(&sparse), content_hash(&dense));
        g.write_all_at(b"z", 0).unwrap();
        assert_ne!(content_hash(&sparse), content_hash(&dense));
    }
}
