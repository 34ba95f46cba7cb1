//! A tiny in-memory NBD server (fixed newstyle, `NBD_OPT_GO`, READ/WRITE/FLUSH/DISC, simple
//! replies) whose [`Behaviour`] can be a lie: it acknowledges writes it drops, or applies
//! an acknowledged write late, over a newer one. It exists to prove that `tandem-check`
//! catches such backends (issue 5: "a deliberately broken backend makes it fail"), and to
//! play a Secondary that refuses writable opens in the reconnect tests.
//!
//! One thread per connection, one request at a time; enough for the checker's workload.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// How the server treats writes and opens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Behaviour {
    /// A correct server.
    Honest,
    /// Acknowledges every n-th write without applying it.
    DropEveryNth(u64),
    /// Acknowledges every n-th write but holds it back; it is applied right after the next
    /// write to the same offset, i.e. the older version lands over the newer one.
    ReorderEveryNth(u64),
    /// Refuses `NBD_OPT_GO` with `NBD_REP_ERR_POLICY` and this message (a Secondary).
    Refuse(String),
    /// Opens, but fails every write with this NBD errno (a demoted or shut-down volume).
    FailWrites(u32),
    /// Opens, but never answers a write (a Primary whose I/O froze without quorum).
    HangWrites,
}

struct Shared {
    export: String,
    data: Mutex<Vec<u8>>,
    behaviour: Mutex<Behaviour>,
    writes: AtomicU64,
    held_back: Mutex<HashMap<u64, Vec<u8>>>,
    connections: Mutex<Vec<UnixStream>>,
    stop: AtomicBool,
}

/// A running fake server on a unix socket; stops on drop.
pub struct FakeNbdServer {
    socket: PathBuf,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl FakeNbdServer {
    /// Serve `export` of `size` bytes (zeroes) at `socket`.
    pub fn start(
        socket: &Path,
        export: &str,
        size: u64,
        behaviour: Behaviour,
    ) -> std::io::Result<Self> {
        let listener = UnixListener::bind(socket)?;
        let shared = Arc::new(Shared {
            export: export.to_string(),
            data: Mutex::new(vec![0u8; size as usize]),
            behaviour: Mutex::new(behaviour),
            writes: AtomicU64::new(0),
            held_back: Mutex::new(HashMap::new()),
            connections: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        });
        let accept_shared = Arc::clone(&shared);
        let acceptor = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if accept_shared.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                if let Ok(clone) = stream.try_clone() {
                    lock(&accept_shared.connections).push(clone);
                }
                let conn_shared = Arc::clone(&accept_shared);
                std::thread::spawn(move || {
                    let _ = serve(stream, &conn_shared);
                });
            }
        });
        Ok(FakeNbdServer {
            socket: socket.to_path_buf(),
            shared,
            acceptor: Some(acceptor),
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Change the behaviour for new opens and writes.
    pub fn set_behaviour(&self, behaviour: Behaviour) {
        *lock(&self.shared.behaviour) = behaviour;
    }

    /// Cut every open connection (clients see EOF or a reset).
    pub fn disconnect_all(&self) {
        for stream in lock(&self.shared.connections).drain(..) {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }

    /// A copy of the export's bytes.
    pub fn contents(&self) -> Vec<u8> {
        lock(&self.shared.data).clone()
    }
}

impl Drop for FakeNbdServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.disconnect_all();
        // Wake the acceptor so it sees the stop flag.
        let _ = UnixStream::connect(&self.socket);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be64(b: &[u8]) -> u64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&b[..8]);
    u64::from_be_bytes(raw)
}

fn option_reply(
    stream: &mut UnixStream,
    option: u32,
    reply: u32,
    data: &[u8],
) -> std::io::Result<()> {
    let mut frame = Vec::new();
    frame.extend_from_slice(&0x0003_e889_0455_65a9u64.to_be_bytes());
    frame.extend_from_slice(&option.to_be_bytes());
    frame.extend_from_slice(&reply.to_be_bytes());
    frame.extend_from_slice(&(data.len() as u32).to_be_bytes());
    frame.extend_from_slice(data);
    stream.write_all(&frame)
}

fn simple_reply(
    stream: &mut UnixStream,
    errno: u32,
    cookie: u64,
    data: &[u8],
) -> std::io::Result<()> {
    let mut frame = Vec::with_capacity(16 + data.len());
    frame.extend_from_slice(&0x6744_6698u32.to_be_bytes());
    frame.extend_from_slice(&errno.to_be_bytes());
    frame.extend_from_slice(&cookie.to_be_bytes());
    frame.extend_from_slice(data);
    stream.write_all(&frame)
}

fn invalid(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string())
}

fn serve(mut stream: UnixStream, shared: &Shared) -> std::io::Result<()> {
    let mut greeting = Vec::new();
    greeting.extend_from_slice(b"NBDMAGIC");
    greeting.extend_from_slice(b"IHAVEOPT");
    greeting.extend_from_slice(&3u16.to_be_bytes()); // FIXED_NEWSTYLE | NO_ZEROES
    stream.write_all(&greeting)?;
    let mut flags = [0u8; 4];
    stream.read_exact(&mut flags)?;
    loop {
        let mut header = [0u8; 16];
        stream.read_exact(&mut header)?;
        if &header[0..8] != b"IHAVEOPT" {
            return Err(invalid("bad option magic"));
        }
        let option = be32(&header[8..12]);
        let len = be32(&header[12..16]);
        if len > 65536 {
            return Err(invalid("option too long"));
        }
        let mut data = vec![0u8; len as usize];
        stream.read_exact(&mut data)?;
        match option {
            7 => {
                if data.len() < 6 {
                    option_reply(&mut stream, option, (1 << 31) | 3, b"short NBD_OPT_GO")?;
                    continue;
                }
                let name_len = be32(&data[0..4]) as usize;
                let name = data.get(4..4 + name_len).unwrap_or_default();
                let behaviour = lock(&shared.behaviour).clone();
                if let Behaviour::Refuse(message) = behaviour {
                    option_reply(&mut stream, option, (1 << 31) | 2, message.as_bytes())?;
                    continue;
                }
                if name != shared.export.as_bytes() {
                    option_reply(&mut stream, option, (1 << 31) | 6, b"no such export")?;
                    continue;
                }
                let size = lock(&shared.data).len() as u64;
                let mut info = Vec::new();
                info.extend_from_slice(&0u16.to_be_bytes());
                info.extend_from_slice(&size.to_be_bytes());
                info.extend_from_slice(&(1u16 | 4 | 8).to_be_bytes()); // HAS_FLAGS|SEND_FLUSH|SEND_FUA
                option_reply(&mut stream, option, 3, &info)?;
                option_reply(&mut stream, option, 1, &[])?;
                return transmission(stream, shared);
            }
            2 => {
                option_reply(&mut stream, option, 1, &[])?;
                return Ok(());
            }
            _ => option_reply(&mut stream, option, (1 << 31) | 1, b"unsupported")?,
        }
    }
}

fn transmission(mut stream: UnixStream, shared: &Shared) -> std::io::Result<()> {
    loop {
        let mut header = [0u8; 28];
        stream.read_exact(&mut header)?;
        if be32(&header[0..4]) != 0x2560_9513 {
            return Err(invalid("bad request magic"));
        }
        let command = u16::from_be_bytes([header[6], header[7]]);
        let cookie = be64(&header[8..16]);
        let offset = be64(&header[16..24]);
        let len = be32(&header[24..28]) as u64;
        let size = lock(&shared.data).len() as u64;
        let in_range = offset.checked_add(len).is_some_and(|end| end <= size) && len <= 32 << 20;
        match command {
            0 => {
                if !in_range {
                    simple_reply(&mut stream, 22, cookie, &[])?;
                    continue;
                }
                let data = lock(&shared.data)[offset as usize..(offset + len) as usize].to_vec();
                simple_reply(&mut stream, 0, cookie, &data)?;
            }
            1 => {
                if len > 32 << 20 {
                    return Err(invalid("write too large"));
                }
                let mut payload = vec![0u8; len as usize];
                stream.read_exact(&mut payload)?;
                if !in_range {
                    simple_reply(&mut stream, 28, cookie, &[])?;
                    continue;
                }
                match *lock(&shared.behaviour) {
                    Behaviour::FailWrites(errno) => {
                        simple_reply(&mut stream, errno, cookie, &[])?;
                        continue;
                    }
                    // Hold the connection without replying until the client gives up.
                    Behaviour::HangWrites => loop {
                        let mut sink = [0u8; 64];
                        if stream.read(&mut sink)? == 0 {
                            return Ok(());
                        }
                    },
                    _ => {}
                }
                apply_write(shared, offset, payload);
                simple_reply(&mut stream, 0, cookie, &[])?;
            }
            2 => return Ok(()),
            3 => simple_reply(&mut stream, 0, cookie, &[])?,
            _ => simple_reply(&mut stream, 22, cookie, &[])?,
        }
    }
}

fn store(shared: &Shared, offset: u64, payload: &[u8]) {
    let mut data = lock(&shared.data);
    data[offset as usize..offset as usize + payload.len()].copy_from_slice(payload);
}

fn apply_write(shared: &Shared, offset: u64, payload: Vec<u8>) {
    let count = shared.writes.fetch_add(1, Ordering::SeqCst) + 1;
    let behaviour = lock(&shared.behaviour).clone();
    match behaviour {
        Behaviour::DropEveryNth(n) if count.is_multiple_of(n.max(1)) => {}
        Behaviour::ReorderEveryNth(n) => {
            let held = lock(&shared.held_back).remove(&offset);
            if count.is_multiple_of(n.max(1)) && held.is_none() {
                lock(&shared.held_back).insert(offset, payload);
                return;
            }
            store(shared, offset, &payload);
            if let Some(older) = held {
                store(shared, offset, &older);
            }
        }
        _ => store(shared, offset, &payload),
    }
}
