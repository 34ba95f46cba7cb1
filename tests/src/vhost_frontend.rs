//! A vhost-user-blk frontend driven by hand, for tests that put any content (hostile
//! included) into a real daemon's virtqueue.
//!
//! The vhost-user handshake is the `vhost` crate's frontend side
//! (`vhost::vhost_user::Frontend`, feature `vhost-user-frontend`), as QEMU does it:
//! SET_OWNER, features (VERSION_1, FLUSH, DISCARD, WRITE_ZEROES, PROTOCOL_FEATURES; no
//! EVENT_IDX, no INDIRECT_DESC), the memory table, then queue 0's size, addresses, base,
//! call and kick eventfds, and SET_VRING_ENABLE. Guest memory is a memfd that this process
//! maps as well (`vm-memory`), in two regions with a gap between them:
//!
//! ```text
//! GPA 0x0       .. 0x10_0000   region LOW  (memfd offset 0):  descriptor table at 0x0,
//!                                          available ring at 0x1000, used ring at 0x2000,
//!                                          the rest free for headers, data and statuses
//! GPA 0x10_0000 .. 0x100_0000  no memory
//! GPA 0x100_0000.. 0x110_0000  region HIGH (memfd offset 0x10_0000)
//! ```
//!
//! The ring is a split virtqueue of [`QUEUE_SIZE`] descriptors written byte by byte, not
//! through `virtio-queue`, so a test can write what no driver would: descriptors out of
//! memory, loops, indirect tables, an available index far ahead. The frontend's
//! "userspace addresses" are the guest-physical ones (the daemon only uses them to
//! translate the vring addresses).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Descriptors in the queue.
pub const QUEUE_SIZE: u16 = 16;
/// Size of each of the two memory regions.
pub const REGION_SIZE: u64 = 0x10_0000;
/// Where the second region starts; `REGION_SIZE..HIGH` is no memory at all.
pub const HIGH: u64 = 0x100_0000;
const DESC_TABLE: u64 = 0x0;
const AVAIL_RING: u64 = 0x1000;
const USED_RING: u64 = 0x2000;
/// Scratch area of [`VhostFrontend::read`] / [`VhostFrontend::write`]: header, status,
/// data (at most [`MAX_IO`] bytes).
const IO_HEADER: u64 = 0x3000;
const IO_STATUS: u64 = 0x3100;
const IO_DATA: u64 = 0x8_0000;
/// Largest request of [`VhostFrontend::read`] / [`VhostFrontend::write`].
pub const MAX_IO: usize = 0x4_0000;
/// How long a request may take to be answered.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the daemon may take to answer a vhost-user message: above the 30 s a new
/// frontend's open waits for the previous frontend's release.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(35);

/// Why the handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("creating the guest memory")]
    Memory(#[source] std::io::Error),
    #[error("creating an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("mapping the guest memory")]
    Map(#[source] vm_memory::mmap::FromRangesError),
    #[error("setting the socket's receive timeout")]
    Socket(#[source] std::io::Error),
    #[error("vhost-user {step}")]
    Vhost {
        step: &'static str,
        #[source]
        source: vhost::Error,
    },
}

/// One split-ring descriptor, as the driver writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

impl Descriptor {
    /// A buffer the device reads.
    pub fn readable(addr: u64, len: u32) -> Descriptor {
        Descriptor {
            addr,
            len,
            flags: 0,
            next: 0,
        }
    }

    /// A buffer the device writes.
    pub fn writable(addr: u64, len: u32) -> Descriptor {
        Descriptor {
            flags: VRING_DESC_F_WRITE as u16,
            ..Descriptor::readable(addr, len)
        }
    }

    /// An indirect descriptor: a table of `len` bytes at `addr`.
    pub fn indirect(addr: u64, len: u32) -> Descriptor {
        Descriptor {
            flags: VRING_DESC_F_INDIRECT as u16,
            ..Descriptor::readable(addr, len)
        }
    }

    /// This descriptor, chained to descriptor `next`.
    pub fn then(self, next: u16) -> Descriptor {
        Descriptor {
            flags: self.flags | VRING_DESC_F_NEXT as u16,
            next,
            ..self
        }
    }

    fn bytes(&self) -> [u8; 16] {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&self.addr.to_le_bytes());
        raw[8..12].copy_from_slice(&self.len.to_le_bytes());
        raw[12..14].copy_from_slice(&self.flags.to_le_bytes());
        raw[14..16].copy_from_slice(&self.next.to_le_bytes());
        raw
    }
}

/// `descriptors` chained in order: the `i`th (but the last) to slot `first + i + 1`.
pub fn linked(first: u16, descriptors: &[Descriptor]) -> Vec<Descriptor> {
    let last = descriptors.len().saturating_sub(1);
    descriptors
        .iter()
        .enumerate()
        .map(|(i, d)| {
            if i < last {
                d.then(first + i as u16 + 1)
            } else {
                *d
            }
        })
        .collect()
}

/// A virtio-blk request header: type, ioprio 0, sector.
pub fn request_header(kind: u32, sector: u64) -> [u8; 16] {
    let mut header = [0u8; 16];
    header[0..4].copy_from_slice(&kind.to_le_bytes());
    header[8..16].copy_from_slice(&sector.to_le_bytes());
    header
}

/// One used-ring element: the chain's head and the bytes the device wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Used {
    pub id: u32,
    pub len: u32,
}

/// A connected frontend with queue 0 running; dropping it closes the connection.
pub struct VhostFrontend {
    frontend: Frontend,
    memory: GuestMemoryMmap,
    kick: EventFd,
    _call: EventFd,
    /// The available index this frontend has published.
    avail_idx: u16,
}

fn vhost(step: &'static str) -> impl FnOnce(vhost::Error) -> HandshakeError {
    move |source| HandshakeError::Vhost { step, source }
}

impl VhostFrontend {
    /// Connect to `socket` and set up queue 0 as described in the module doc.
    pub fn connect(socket: &Path) -> Result<VhostFrontend, HandshakeError> {
        let memfd = memfd(2 * REGION_SIZE).map_err(HandshakeError::Memory)?;
        let memory = GuestMemoryMmap::from_ranges_with_files([
            (
                GuestAddress(0),
                REGION_SIZE as usize,
                Some(FileOffset::new(
                    memfd.try_clone().map_err(HandshakeError::Memory)?,
                    0,
                )),
            ),
            (
                GuestAddress(HIGH),
                REGION_SIZE as usize,
                Some(FileOffset::new(
                    memfd.try_clone().map_err(HandshakeError::Memory)?,
                    REGION_SIZE,
                )),
            ),
        ])
        .map_err(HandshakeError::Map)?;
        let region = |gpa: u64, offset: u64| VhostUserMemoryRegionInfo {
            guest_phys_addr: gpa,
            memory_size: REGION_SIZE,
            userspace_addr: gpa,
            mmap_offset: offset,
            mmap_handle: memfd.as_raw_fd(),
        };

        let mut frontend = Frontend::connect(socket, 1).map_err(vhost("connect"))?;
        // The vhost crate waits for each reply forever: a silent daemon fails the
        // handshake (and any later request with a reply) instead of hanging the test.
        set_receive_timeout(frontend.as_raw_fd(), REPLY_TIMEOUT).map_err(HandshakeError::Socket)?;
        frontend.set_owner().map_err(vhost("SET_OWNER"))?;
        let offered = frontend.get_features().map_err(vhost("GET_FEATURES"))?;
        let wanted = (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_DISCARD)
            | (1 << VIRTIO_BLK_F_WRITE_ZEROES)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        frontend
            .set_features(offered & wanted)
            .map_err(vhost("SET_FEATURES"))?;
        let protocol = frontend
            .get_protocol_features()
            .map_err(vhost("GET_PROTOCOL_FEATURES"))?;
        frontend
            .set_protocol_features(protocol & VhostUserProtocolFeatures::CONFIG)
            .map_err(vhost("SET_PROTOCOL_FEATURES"))?;
        frontend
            .set_mem_table(&[region(0, 0), region(HIGH, REGION_SIZE)])
            .map_err(vhost("SET_MEM_TABLE"))?;
        frontend
            .set_vring_num(0, QUEUE_SIZE)
            .map_err(vhost("SET_VRING_NUM"))?;
        let addresses = VringConfigData {
            queue_max_size: QUEUE_SIZE,
            queue_size: QUEUE_SIZE,
            flags: 0,
            desc_table_addr: DESC_TABLE,
            used_ring_addr: USED_RING,
            avail_ring_addr: AVAIL_RING,
            log_addr: None,
        };
        frontend
            .set_vring_addr(0, &addresses)
            .map_err(vhost("SET_VRING_ADDR"))?;
        frontend
            .set_vring_base(0, 0)
            .map_err(vhost("SET_VRING_BASE"))?;
        let eventfd = || EventFd::new(libc::EFD_NONBLOCK).map_err(HandshakeError::EventFd);
        let (kick, call) = (eventfd()?, eventfd()?);
        frontend
            .set_vring_call(0, &call)
            .map_err(vhost("SET_VRING_CALL"))?;
        frontend
            .set_vring_kick(0, &kick)
            .map_err(vhost("SET_VRING_KICK"))?;
        frontend
            .set_vring_enable(0, true)
            .map_err(vhost("SET_VRING_ENABLE"))?;
        // A request with a reply: every message before it has been handled.
        frontend.get_features().map_err(vhost("GET_FEATURES"))?;
        Ok(VhostFrontend {
            frontend,
            memory,
            kick,
            _call: call,
            avail_idx: 0,
        })
    }

    /// Write `bytes` at guest address `addr` (inside the memory; a test bug otherwise).
    pub fn poke(&self, addr: u64, bytes: &[u8]) {
        self.memory
            .write_slice(bytes, GuestAddress(addr))
            .expect("test guest memory");
    }

    /// Read `len` bytes at guest address `addr`.
    pub fn peek(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; len];
        self.memory
            .read_slice(&mut bytes, GuestAddress(addr))
            .expect("test guest memory");
        bytes
    }

    /// Write `descriptors` into the descriptor table from slot `first` on.
    pub fn descriptors(&self, first: u16, descriptors: &[Descriptor]) {
        for (i, d) in descriptors.iter().enumerate() {
            self.poke(DESC_TABLE + 16 * (u64::from(first) + i as u64), &d.bytes());
        }
    }

    /// Write `descriptors` as a table at `addr` (an indirect table).
    pub fn table(&self, addr: u64, descriptors: &[Descriptor]) {
        for (i, d) in descriptors.iter().enumerate() {
            self.poke(addr + 16 * i as u64, &d.bytes());
        }
    }

    /// Publish `idx` as the available index, whatever the ring holds.
    pub fn publish_avail_idx(&self, idx: u16) {
        fence(Ordering::SeqCst);
        self.poke(AVAIL_RING + 2, &idx.to_le_bytes());
    }

    /// Put the chain at `head` in the available ring (and publish it).
    pub fn offer(&mut self, head: u16) {
        let slot = AVAIL_RING + 4 + 2 * u64::from(self.avail_idx % QUEUE_SIZE);
        self.poke(slot, &head.to_le_bytes());
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.publish_avail_idx(self.avail_idx);
    }

    /// The available index this frontend published through [`VhostFrontend::offer`].
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// Tell the device to look at the available ring.
    pub fn kick(&self) {
        self.kick.write(1).expect("kick eventfd");
    }

    /// The used index the device published.
    pub fn used_idx(&self) -> u16 {
        let raw = self.peek(USED_RING + 2, 2);
        u16::from_le_bytes([raw[0], raw[1]])
    }

    /// The used element at position `idx` (modulo the queue size).
    pub fn used(&self, idx: u16) -> Used {
        let raw = self.peek(USED_RING + 4 + 8 * u64::from(idx % QUEUE_SIZE), 8);
        Used {
            id: u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]),
            len: u32::from_le_bytes([raw[4], raw[5], raw[6], raw[7]]),
        }
    }

    /// Offer the chain at `head`, kick, and wait for its used element (`None`: not
    /// answered within [`ANSWER_TIMEOUT`]).
    pub fn submit(&mut self, head: u16) -> Option<Used> {
        let before = self.used_idx();
        self.offer(head);
        self.kick();
        let until = Instant::now() + ANSWER_TIMEOUT;
        while self.used_idx() == before {
            if Instant::now() > until {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        fence(Ordering::SeqCst);
        Some(self.used(before))
    }

    /// Whether the daemon closed the connection within `limit`.
    pub fn hung_up(&self, limit: Duration) -> bool {
        let mut poll = libc::pollfd {
            fd: self.frontend.as_raw_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        };
        let ms = limit.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd, for the call's duration.
        let n = unsafe { libc::poll(&mut poll, 1, ms) };
        n == 1 && poll.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
    }

    /// A well-formed request in slots 0..=2: header, `len` bytes of data (device-writable
    /// for a read), status; returns the status byte and the used element.
    fn io(&mut self, kind: u32, sector: u64, len: usize, writable: bool) -> (u8, Option<Used>) {
        assert!(len <= MAX_IO, "at most {MAX_IO} bytes");
        self.poke(IO_HEADER, &request_header(kind, sector));
        self.poke(IO_STATUS, &[0xee]);
        let data = if writable {
            Descriptor::writable(IO_DATA, len as u32)
        } else {
            Descriptor::readable(IO_DATA, len as u32)
        };
        self.descriptors(
            0,
            &linked(
                0,
                &[
                    Descriptor::readable(IO_HEADER, 16),
                    data,
                    Descriptor::writable(IO_STATUS, 1),
                ],
            ),
        );
        let used = self.submit(0);
        (self.peek(IO_STATUS, 1)[0], used)
    }

    /// Write `data` at `sector`; whether the device answered OK.
    pub fn write(&mut self, sector: u64, data: &[u8]) -> bool {
        self.poke(IO_DATA, data);
        let (status, used) = self.io(VIRTIO_BLK_T_OUT, sector, data.len(), false);
        status == VIRTIO_BLK_S_OK as u8 && used == Some(Used { id: 0, len: 1 })
    }

    /// Read `len` bytes at `sector`; `None` unless the device answered OK.
    pub fn read(&mut self, sector: u64, len: usize) -> Option<Vec<u8>> {
        let (status, used) = self.io(VIRTIO_BLK_T_IN, sector, len, true);
        let whole = Some(Used {
            id: 0,
            len: len as u32 + 1,
        });
        (status == VIRTIO_BLK_S_OK as u8 && used == whole).then(|| self.peek(IO_DATA, len))
    }
}

/// Make reads on socket `fd` fail after `timeout` instead of blocking forever.
fn set_receive_timeout(fd: std::os::fd::RawFd, timeout: Duration) -> std::io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: `tv` is a valid timeval for the call's duration; `fd` is a socket this
    // frontend owns.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// An anonymous shared-memory file of `size` bytes.
fn memfd(size: u64) -> std::io::Result<File> {
    // SAFETY: a NUL-terminated name; the descriptor returned is checked and then owned by
    // the `File`.
    let fd = unsafe { libc::memfd_create(c"tandem-test-guest".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)?;
    Ok(file)
}
