//! One vhost-user-blk device for one frontend connection: the `VhostUserBackend` that
//! rust-vmm's `vhost-user-backend` daemon drives (feature negotiation, config space, queue
//! events), executing requests on an [`ExportHandle`].
//!
//! The volume is opened (`Exports::open(name, writable = true)`, which may promote) when the
//! frontend first asks for the device features, i.e. when a QEMU starts using the socket,
//! not when something merely connects. Opening first claims the socket's [`FrontendSlot`]:
//! a volume has at most one frontend at a time. A refusal (the slot is taken, or the open is
//! refused) is logged with its reason; the connection's owner ([`super::server`]) then hangs
//! up, and GET_CONFIG answers the protocol's error (an empty payload), so QEMU's device
//! realize fails whichever comes first and QEMU does not start. The handle is released by
//! [`BlkBackend::release`] when the connection ends, which is the "last writer closed"
//! signal.
//!
//! While QEMU migrates the VM, every guest page the device writes (read data, status
//! bytes, used ring, and with EVENT_IDX the used ring's `avail_event` field) is marked in
//! QEMU's dirty log: the guest memory carries vhost-user-backend's [`BitmapMmapRegion`]
//! (the vring's memory too, through which `virtio-queue` writes the ring), which the
//! library points at the log (`SET_LOG_BASE`, offered through `LOG_SHMFD` and the
//! `LOG_ALL` feature), and every `vm-memory` write marks the pages it touches. Without a
//! log the bitmap is empty and marks nothing.
//!
//! A grown volume is announced to the frontend ([`BlkBackend::announce_size`]): a
//! `CONFIG_CHANGE_MSG` on the backend request channel (`BACKEND_REQ`), after which QEMU
//! reads the config space again and tells the guest the new capacity.
//!
//! Requests run in the queue's worker thread (one thread per queue), many at a time: the
//! worker drives their `ExportHandle` calls itself ([`super::queue`]), so a queue keeps
//! every request the guest gave it in flight, and several queues run in parallel.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::runtime::Handle;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Backend, VhostUserFrontendReqHandler};
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{ShutdownHandle, VhostUserBackend, VringRwLock};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_TOPOLOGY,
    VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes as _, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::config_space::ConfigSpace;
use super::queue;
use super::request::{self, Chain, Op, Request, Segment, Status, HEADER_LEN};
use super::stats::{self, Connected, Counters};
use crate::frontend::{ExportHandle, ExportIoError, Exports, OpenError};

/// Guest memory as one connection maps it; every write marks QEMU's dirty log while a
/// migration has one.
pub type Mem = GuestMemoryMmap<BitmapMmapRegion>;
/// Guest memory as the daemon maps it (follows the frontend's memory table).
pub type GuestMemory = GuestMemoryAtomic<Mem>;
type Vring = VringRwLock<GuestMemory>;

/// Descriptors per queue offered to the frontend.
pub const QUEUE_SIZE: usize = 256;

/// The volume behind one connection, opened on first use.
enum Volume {
    NotOpened,
    Open {
        handle: Arc<dyn ExportHandle>,
        _served: Connected,
    },
    Refused(String),
    Released,
}

/// Where a socket's one frontend stands.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Turn {
    #[default]
    Free,
    Served,
    /// The frontend went away; its handle is being released (a demotion takes a moment).
    Ending,
}

/// How long an open waits for the previous frontend's handle to be released.
const RELEASE_WAIT: Duration = Duration::from_secs(30);

/// How long a new frontend waits for the served one to be seen gone before it is refused:
/// a frontend that closed its connection just before (a QEMU killed and started again)
/// is noticed by its connection's thread a moment later.
pub(crate) const GONE_WAIT: Duration = Duration::from_millis(500);

/// How often a config-change notice is repeated until the frontend reads the config.
pub const NOTICE_REPEAT: Duration = Duration::from_secs(2);

/// A socket's one frontend at a time: taken by the connection whose backend opens the
/// volume, until that connection's handle is released. A frontend that comes while the
/// previous one, already gone, is being released waits for it instead of being refused,
/// and so does one that comes just as the previous one goes (within [`GONE_WAIT`]).
#[derive(Debug, Default)]
pub struct FrontendSlot {
    turn: Mutex<Turn>,
    /// Notified at each change of `turn`.
    freed: Condvar,
}

impl FrontendSlot {
    fn turn(&self) -> MutexGuard<'_, Turn> {
        self.turn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `turn` once it left `state`, or after `timeout`.
    fn wait_while<'a>(
        &self,
        turn: MutexGuard<'a, Turn>,
        state: Turn,
        timeout: Duration,
    ) -> MutexGuard<'a, Turn> {
        self.freed
            .wait_timeout_while(turn, timeout, |t| *t == state)
            .unwrap_or_else(|e| e.into_inner())
            .0
    }

    /// Whether a frontend is served, once one going away just now was seen gone.
    fn is_served(&self) -> bool {
        *self.wait_while(self.turn(), Turn::Served, GONE_WAIT) == Turn::Served
    }

    /// Take the slot, once a frontend going away just now was seen gone and its release
    /// is done.
    fn claim(&self) -> bool {
        let turn = self.wait_while(self.turn(), Turn::Served, GONE_WAIT);
        let mut turn = self.wait_while(turn, Turn::Ending, RELEASE_WAIT);
        let free = *turn == Turn::Free;
        if free {
            *turn = Turn::Served;
        }
        free
    }

    /// The holder's frontend went away.
    fn ending(&self) {
        let mut turn = self.turn();
        if *turn == Turn::Served {
            *turn = Turn::Ending;
            self.freed.notify_all();
        }
    }

    fn free(&self) {
        *self.turn() = Turn::Free;
        self.freed.notify_all();
    }
}

/// How a connection began, as [`BlkBackend::wait_first_use`] sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirstUse {
    /// The volume is open for this frontend.
    Served,
    /// The frontend asked, and was refused for this reason.
    Refused(String),
    /// The frontend has not asked for the device features in time.
    Idle,
}

/// The device one frontend connection talks to.
pub struct BlkBackend {
    name: String,
    exports: Arc<dyn Exports>,
    runtime: Handle,
    num_queues: usize,
    slot: Arc<FrontendSlot>,
    volume: Mutex<Volume>,
    /// Notified when `volume` leaves `NotOpened`.
    opened: Condvar,
    counters: Arc<Counters>,
    mem: GuestMemory,
    /// The read ends of the exit events handed out by [`VhostUserBackend::exit_event`].
    /// vhost-user-backend 0.24 registers each with its worker's epoll through
    /// `into_raw_fd` and never closes it; a backend lives for one connection, so they are
    /// closed when it is dropped (after the workers and their epolls are gone), or every
    /// connection would leak one descriptor per worker thread.
    exit_fds: Mutex<Vec<RawFd>>,
    /// What the queues share: stopped once the frontend is gone (nothing is started, or
    /// completed into the used ring, for a frontend that left; QEMU resubmits what it
    /// never got back) or before the socket is hung up (QEMU reads the used index when it
    /// sees the hang-up, and a completion added after that would be replayed on
    /// reconnect); and the budget of bytes in flight.
    queues: queue::Shared,
    /// How to hang up the connection, once it is up.
    hangup: Mutex<Option<ShutdownHandle>>,
    /// The backend request channel to the frontend (`SET_BACKEND_REQ_FD`), if it gave one.
    to_frontend: Mutex<Option<Backend>>,
    /// The size the frontend last read (the size at the open, then each GET_CONFIG);
    /// `u64::MAX` before the open. A notice does not change it: QEMU drops a notice while
    /// its device is stopped (VM paused, guest reset, incoming migration), so notices are
    /// repeated until the frontend reads the config.
    announced_size: AtomicU64,
    /// When the last config-change notice went out, and for which size (rate limit, and
    /// one log line per size).
    last_notice: Mutex<Option<(Instant, u64)>>,
}

impl Drop for BlkBackend {
    fn drop(&mut self) {
        let fds = self.exit_fds.get_mut().unwrap_or_else(|e| e.into_inner());
        for fd in fds.drain(..) {
            // SAFETY: `fd` is a descriptor this backend created in `exit_event` whose
            // ownership the library gave up (`into_raw_fd`) and nothing else closes.
            unsafe { libc::close(fd) };
        }
    }
}

impl BlkBackend {
    /// The device for one connection to `name`'s socket, whose frontends share `slot`.
    pub fn new(
        name: &str,
        exports: Arc<dyn Exports>,
        runtime: Handle,
        num_queues: usize,
        mem: GuestMemory,
        slot: Arc<FrontendSlot>,
    ) -> BlkBackend {
        BlkBackend {
            name: name.to_string(),
            exports,
            runtime,
            num_queues,
            slot,
            volume: Mutex::new(Volume::NotOpened),
            opened: Condvar::new(),
            counters: stats::counters(name),
            queues: queue::Shared::new(name),
            hangup: Mutex::default(),
            mem,
            exit_fds: Mutex::default(),
            to_frontend: Mutex::default(),
            announced_size: AtomicU64::new(u64::MAX),
            last_notice: Mutex::default(),
        }
    }

    /// The guest memory this device reads, which the daemon serving it must map.
    pub fn guest_memory(&self) -> GuestMemory {
        self.mem.clone()
    }

    fn lock(&self) -> MutexGuard<'_, Volume> {
        self.volume.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The open handle, opening the volume on first use. `Err` carries the refusal.
    fn handle(&self) -> Result<Arc<dyn ExportHandle>, String> {
        let mut volume = self.lock();
        if let Volume::NotOpened = *volume {
            *volume = self.open();
            self.opened.notify_all();
        }
        match &*volume {
            Volume::Open { handle, .. } => Ok(Arc::clone(handle)),
            Volume::Refused(reason) => Err(reason.clone()),
            Volume::Released => Err("the connection ended".into()),
            Volume::NotOpened => Err("not opened".into()),
        }
    }

    /// The handle the frontend opened (with its first GET_FEATURES). Requests never open
    /// the volume themselves: they run inside the queue's `block_on`, where opening (which
    /// blocks on the runtime) may not run, and a frontend that never asked for the device
    /// has no business sending requests.
    fn opened(&self) -> Result<Arc<dyn ExportHandle>, String> {
        match &*self.lock() {
            Volume::Open { handle, .. } => Ok(Arc::clone(handle)),
            Volume::Refused(reason) => Err(reason.clone()),
            Volume::Released => Err("the connection ended".into()),
            Volume::NotOpened => Err("the frontend did not ask for the device features".into()),
        }
    }

    /// Claim the socket's slot and open the volume.
    fn open(&self) -> Volume {
        if !self.slot.claim() {
            tracing::warn!(volume = %self.name, "vhost-user-blk: refusing a second frontend: the volume is being served on this socket");
            return Volume::Refused("another frontend is using the volume".into());
        }
        match self.runtime.block_on(self.exports.open(&self.name, true)) {
            Ok(handle) => {
                tracing::info!(volume = %self.name, read_only = handle.read_only(), "vhost-user-blk frontend opened the volume");
                // What the frontend knows until it reads the config: a QEMU that reconnects
                // (tandemd restarted) does not read it again.
                let _ = self.announced_size.compare_exchange(
                    u64::MAX,
                    handle.size(),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                );
                Volume::Open {
                    handle,
                    _served: self.counters.connected(),
                }
            }
            Err(e) => {
                self.slot.free();
                let reason = match e {
                    OpenError::NotFound(_) => e.to_string(),
                    OpenError::Refused(msg) => msg,
                };
                tracing::error!(volume = %self.name, reason = %reason, "vhost-user-blk open refused; hanging up so that QEMU fails to start");
                Volume::Refused(reason)
            }
        }
    }

    /// Whether another connection's frontend is being served on this socket (waits for an
    /// open of this connection in progress). Once this connection's frontend asked for the
    /// device, its open decided (a refusal already waited for a going frontend and was
    /// logged): `false`, and [`BlkBackend::wait_first_use`] says how it went, at once.
    pub fn another_frontend_is_served(&self) -> bool {
        let volume = self.lock();
        matches!(*volume, Volume::NotOpened) && self.slot.is_served()
    }

    /// The connection is about to be hung up: from here on no request is taken and no
    /// completion reaches the used ring (one being added is waited for). A request still
    /// running finishes against the volume; QEMU resubmits it after a reconnect.
    pub fn stop_completions(&self) {
        self.queues.stop_completions();
    }

    /// How [`BlkBackend::hang_up`] ends the connection (given once it is up).
    pub fn set_hangup(&self, hangup: ShutdownHandle) {
        *self.hangup.lock().unwrap_or_else(|e| e.into_inner()) = Some(hangup);
    }

    /// No completion reaches the guest after this (QEMU reads the used index when it sees
    /// the hang-up), then hang up the connection.
    pub fn hang_up(&self) {
        self.stop_completions();
        if let Some(hangup) = &*self.hangup.lock().unwrap_or_else(|e| e.into_inner()) {
            hangup.shutdown();
        }
    }

    /// The frontend is gone (its connection ended): a new one may come while the handle
    /// is released.
    pub fn frontend_gone(&self) {
        self.queues.stop_taking();
        if let Volume::Open { .. } = *self.lock() {
            self.slot.ending();
        }
    }

    /// Wait until the frontend asked for the device (and was served or refused), at most
    /// `timeout`.
    pub fn wait_first_use(&self, timeout: Duration) -> FirstUse {
        let volume = self.lock();
        let (volume, _) = self
            .opened
            .wait_timeout_while(volume, timeout, |v| matches!(v, Volume::NotOpened))
            .unwrap_or_else(|e| e.into_inner());
        match &*volume {
            Volume::NotOpened => FirstUse::Idle,
            Volume::Refused(reason) => FirstUse::Refused(reason.clone()),
            Volume::Open { .. } | Volume::Released => FirstUse::Served,
        }
    }

    /// Drop the handle (the connection ended): the last writer closing demotes, which
    /// needs the runtime's context. Frees the socket for the next frontend afterwards.
    pub fn release(&self) {
        let _runtime = self.runtime.enter();
        let previous = std::mem::replace(&mut *self.lock(), Volume::Released);
        self.opened.notify_all();
        if let Volume::Open {
            handle,
            _served: served,
        } = previous
        {
            tracing::info!(volume = %self.name, "vhost-user-blk frontend closed the volume");
            drop(handle);
            drop(served);
            self.slot.free();
        }
    }

    /// The config space as it is now (size follows an online resize); `None` once the
    /// open was refused, which GET_CONFIG answers as an error.
    fn config(&self) -> Option<ConfigSpace> {
        // The lock is not held while asking the daemon (`describe` may wait).
        let open_size = match &*self.lock() {
            Volume::Open { handle, .. } => Some(handle.size()),
            Volume::NotOpened => None,
            Volume::Refused(_) | Volume::Released => return None,
        };
        let size = match open_size {
            Some(size) => size,
            None => self
                .runtime
                .block_on(self.exports.describe(&self.name))
                .map(|info| info.size)
                .unwrap_or(0),
        };
        self.announced_size.store(size, Ordering::Release);
        Some(ConfigSpace::new(size, self.num_queues as u16))
    }

    /// Tell the frontend when the open volume's size differs from what it last read (an
    /// online resize): a `CONFIG_CHANGE_MSG`, after which QEMU reads the config space
    /// again and raises the guest's config interrupt. Repeated every [`NOTICE_REPEAT`]
    /// until the frontend reads the config (QEMU ignores a notice while its device is
    /// stopped). Returns whether a notice went out. A frontend that gave no request
    /// channel is not told (the new size reaches its guest when QEMU restarts).
    pub fn announce_size(&self) -> bool {
        let size = match &*self.lock() {
            Volume::Open { handle, .. } => handle.size(),
            _ => return false,
        };
        let announced = self.announced_size.load(Ordering::Acquire);
        if announced == u64::MAX || announced == size {
            return false;
        }
        let channel = self.to_frontend.lock().unwrap_or_else(|e| e.into_inner());
        let Some(channel) = channel.as_ref() else {
            return false;
        };
        let mut last = self.last_notice.lock().unwrap_or_else(|e| e.into_inner());
        let first_for_size = last.is_none_or(|(_, told)| told != size);
        if !first_for_size && last.is_some_and(|(at, _)| at.elapsed() < NOTICE_REPEAT) {
            return false;
        }
        *last = Some((Instant::now(), size));
        match channel.handle_config_change() {
            Ok(_) => {
                if first_for_size {
                    tracing::info!(volume = %self.name, size, previous = announced, "vhost-user-blk: told the frontend the volume's new size");
                }
                true
            }
            Err(e) => {
                if first_for_size {
                    tracing::warn!(volume = %self.name, size, error = %e, "vhost-user-blk: cannot tell the frontend the volume's new size");
                }
                false
            }
        }
    }

    /// Answer the available requests of `vring`, many at a time ([`queue::serve`]); hang
    /// up when the queue can no longer complete in order.
    fn process_queue(&self, vring: &Vring) {
        let outcome = queue::serve(&self.runtime, vring, &self.mem, &self.queues, |chain| {
            self.answer(chain)
        });
        if outcome == queue::Outcome::HangUp {
            self.hang_up();
        }
    }

    /// Run the request of one descriptor chain and write its status; returns its used
    /// entry. A malformed chain gets IOERR in its last descriptor when that is writable.
    /// Everything here comes from the one walk of the chain made when it was taken
    /// ([`queue::Taken`]).
    async fn answer(&self, chain: queue::Taken) -> queue::Answered {
        let mem: &Mem = chain.memory();
        let descriptors = chain.descriptors();
        let parts = |d: &Descriptor| (d.addr().0, d.len(), d.is_write_only());
        // A chain the queue stopped following is not the request the guest built: it is
        // refused whole.
        let last_has_next = descriptors.last().is_some_and(|d| d.has_next());
        let split = request::check_ends(descriptors.len(), last_has_next, chain.queue_size())
            .and_then(|()| Chain::split(descriptors.iter().map(parts)));
        let used = match split {
            Ok(parsed) => self.execute(mem, &parsed).await,
            Err(e) => {
                tracing::warn!(volume = %self.name, error = %e, "malformed virtio-blk descriptor chain");
                self.counters.request(Op::Other, Status::IoErr);
                let last = descriptors.last().map(parts);
                self.write_status(mem, request::fallback_status_addr(last), Status::IoErr)
            }
        };
        (chain.head_index(), used)
    }

    /// Run one request and write its status; returns the bytes written to the guest.
    async fn execute(&self, mem: &Mem, chain: &Chain) -> u32 {
        let (op, outcome) = match read_header(mem, chain) {
            Ok(header) => (Op::of(&header), self.run(mem, chain, &header).await),
            Err(rejected) => (Op::Other, Err(rejected)),
        };
        let (status, data_in) = match outcome {
            Ok(data_in) => (Status::Ok, data_in),
            Err(rejected) => {
                tracing::debug!(volume = %self.name, reason = %rejected.reason, "virtio-blk request failed");
                (rejected.status, 0)
            }
        };
        self.counters.request(op, status);
        match self.write_status(mem, chain.status_addr(), status) {
            0 => 0,
            status_len => data_in + status_len,
        }
    }

    /// Write `status` at `addr`; returns the bytes written (1, or 0 when there is no
    /// place for it).
    fn write_status(&self, mem: &Mem, addr: Option<u64>, status: Status) -> u32 {
        let Some(addr) = addr else {
            return 0;
        };
        match mem.write_slice(&[status.byte()], GuestAddress(addr)) {
            Ok(()) => 1,
            Err(e) => {
                tracing::warn!(volume = %self.name, error = %e, "cannot write a request status");
                0
            }
        }
    }

    /// Run one request whose `header` was read; returns the bytes of read data written to
    /// the guest.
    async fn run(
        &self,
        mem: &Mem,
        chain: &Chain,
        header: &[u8; HEADER_LEN as usize],
    ) -> Result<u32, request::Rejected> {
        let mut ranges = vec![0u8; request::ranges_len(chain)];
        gather(mem, &chain.readable, HEADER_LEN, &mut ranges).map_err(io_err)?;
        let handle = self.opened().map_err(io_err)?;
        let size = handle.size();
        let parsed = request::parse(header, chain, &ranges, size)?;
        let from_export = |e: ExportIoError| request::Rejected {
            status: Status::IoErr,
            reason: e.message,
        };
        match parsed {
            Request::Read { offset, len } => {
                let data = handle.read(offset, len).await.map_err(from_export)?;
                if data.len() != len as usize {
                    return Err(io_err(format!("short read of {} bytes", data.len())));
                }
                scatter(mem, &chain.writable, &data).map_err(io_err)?;
                Ok(len)
            }
            Request::Write { offset, len } => {
                let mut data = vec![0u8; len as usize];
                gather(mem, &chain.readable, HEADER_LEN, &mut data).map_err(io_err)?;
                handle
                    .write(offset, Bytes::from(data), false)
                    .await
                    .map_err(from_export)?;
                Ok(0)
            }
            Request::Flush => handle.flush().await.map(|_| 0).map_err(from_export),
            Request::Discard { offset, len } => handle
                .trim(offset, len)
                .await
                .map(|_| 0)
                .map_err(from_export),
            Request::WriteZeroes { offset, len, unmap } => handle
                .write_zeroes(offset, len, unmap)
                .await
                .map(|_| 0)
                .map_err(from_export),
            Request::GetId => {
                let id = request::device_id(handle.name());
                let n = (id.len() as u64).min(chain.data_in_len()) as usize;
                scatter(mem, &chain.writable, &id[..n]).map_err(io_err)?;
                Ok(n as u32)
            }
        }
    }
}

fn io_err(reason: String) -> request::Rejected {
    request::Rejected {
        status: Status::IoErr,
        reason,
    }
}

/// The 16-byte request header at the start of the chain's readable bytes.
fn read_header(mem: &Mem, chain: &Chain) -> Result<[u8; HEADER_LEN as usize], request::Rejected> {
    if chain.readable_len() < HEADER_LEN {
        return Err(io_err("header shorter than 16 bytes".into()));
    }
    let mut header = [0u8; HEADER_LEN as usize];
    gather(mem, &chain.readable, 0, &mut header).map_err(io_err)?;
    Ok(header)
}

/// Copy `out.len()` bytes starting `skip` bytes into `segments` from guest memory.
fn gather(mem: &Mem, segments: &[Segment], mut skip: u64, out: &mut [u8]) -> Result<(), String> {
    let mut done = 0usize;
    for segment in segments {
        if done == out.len() {
            break;
        }
        let len = u64::from(segment.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = ((len - skip) as usize).min(out.len() - done);
        let addr = GuestAddress(segment.addr.saturating_add(skip));
        mem.read_slice(&mut out[done..done + n], addr)
            .map_err(|e| format!("guest buffer at {:#x}: {e}", addr.0))?;
        done += n;
        skip = 0;
    }
    if done == out.len() {
        Ok(())
    } else {
        Err(format!(
            "descriptor chain holds {done} of {} bytes",
            out.len()
        ))
    }
}

/// Copy `data` into the start of `segments` in guest memory.
fn scatter(mem: &Mem, segments: &[Segment], data: &[u8]) -> Result<(), String> {
    let mut done = 0usize;
    for segment in segments {
        if done == data.len() {
            break;
        }
        let n = (segment.len as usize).min(data.len() - done);
        mem.write_slice(&data[done..done + n], GuestAddress(segment.addr))
            .map_err(|e| format!("guest buffer at {:#x}: {e}", segment.addr))?;
        done += n;
    }
    if done == data.len() {
        Ok(())
    } else {
        Err(format!(
            "descriptor chain holds {done} of {} bytes",
            data.len()
        ))
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = BitmapMmapRegion;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.num_queues
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        // A QEMU starting to use the device: open the volume now, so the read-only bit is
        // known and a refusal stops the VM start (the connection is hung up).
        let read_only = match self.handle() {
            Ok(handle) => handle.read_only(),
            Err(_) => false,
        };
        let mut features = (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_BLK_F_SIZE_MAX)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_TOPOLOGY)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_MQ)
            | (1 << VIRTIO_BLK_F_DISCARD)
            | (1 << VIRTIO_BLK_F_WRITE_ZEROES)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | VhostUserVirtioFeatures::LOG_ALL.bits();
        if read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        features
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::LOG_SHMFD
    }

    fn set_backend_req_fd(&self, backend: Backend) {
        // REPLY_ACK is never offered: a frontend claiming it must not make a notice wait
        // for an answer that never comes.
        backend.set_reply_ack_flag(false);
        *self.to_frontend.lock().unwrap_or_else(|e| e.into_inner()) = Some(backend);
    }

    fn set_event_idx(&self, _enabled: bool) {
        // vhost-user-backend sets it on each vring's queue, which `queue` asks
        // (`needs_notification`, `enable_notification`).
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        match self.config() {
            Some(config) => config.read(offset, size),
            // An empty payload is the protocol's error answer: QEMU's realize fails.
            None => Vec::new(),
        }
    }

    fn update_memory(&self, _mem: GuestMemory) -> io::Result<()> {
        // `self.mem` is the daemon's atomic view: it already follows the new table.
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.num_queues).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok(pair) => {
                self.exit_fds
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(pair.0.as_raw_fd());
                Some(pair)
            }
            Err(e) => {
                tracing::error!(volume = %self.name, error = %e, "cannot create a vhost-user worker exit event");
                None
            }
        }
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            // An error here would end the queue's worker for good: log and go on.
            tracing::warn!(volume = %self.name, ?evset, "unexpected vhost-user queue event");
            return Ok(());
        }
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            tracing::warn!(volume = %self.name, device_event, "vhost-user event for an unknown queue");
            return Ok(());
        };
        // A request may hold the last handle (after `release`): its drop demotes, which
        // needs the runtime's context.
        let _runtime = self.runtime.enter();
        self.process_queue(vring);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use vhost_user_backend::VringT;
    use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
    use virtio_bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;

    use super::*;
    use crate::vhost::dummy_exports::DummyExports;

    const HEADER: u64 = 0x10_0000;
    const DATA: u64 = 0x20_0000;
    const MORE: u64 = 0x30_0000;
    const STATUS: u64 = 0x40_0000;
    /// An indirect descriptor table.
    const TABLE: u64 = 0x50_0000;
    const NOT_WRITTEN: u8 = 0xee;

    /// A device on `volume` with one queue in 16 MiB of test guest memory.
    struct Device {
        backend: BlkBackend,
        exports: Arc<DummyExports>,
        mem: Mem,
        _runtime: tokio::runtime::Runtime,
    }

    fn device(volume: &str) -> Device {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .expect("runtime");
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).expect("memory");
        let exports = DummyExports::new(&[volume]);
        let backend = BlkBackend::new(
            volume,
            exports.clone(),
            runtime.handle().clone(),
            1,
            GuestMemoryAtomic::new(mem.clone()),
            Arc::default(),
        );
        // The frontend's first GET_FEATURES opens the volume.
        let _ = backend.features();
        Device {
            backend,
            exports,
            mem,
            _runtime: runtime,
        }
    }

    /// `(addr, len, device-writable)` descriptors chained in order, the first at `first`
    /// in the descriptor table.
    fn chain(descriptors: &[(u64, u32, bool)], first: u16) -> Vec<RawDescriptor> {
        descriptors
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, writable))| {
                let mut flags = if writable { VRING_DESC_F_WRITE } else { 0 };
                if i + 1 < descriptors.len() {
                    flags |= VRING_DESC_F_NEXT;
                }
                let next = first + i as u16 + 1;
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
            })
            .collect()
    }

    impl Device {
        /// A ready vring over a queue holding `chains` (each `(addr, len, device-writable)`
        /// descriptors, chained in order).
        fn queue_with(&self, chains: &[&[(u64, u32, bool)]]) -> (MockSplitQueue<'_, Mem>, Vring) {
            let mut first = 0u16;
            let chains: Vec<Vec<RawDescriptor>> = chains
                .iter()
                .map(|descriptors| {
                    let raw = chain(descriptors, first);
                    first += descriptors.len() as u16;
                    raw
                })
                .collect();
            self.queue_of(&chains)
        }

        /// A ready vring over a queue holding `chains` of raw descriptors, one after the
        /// other in the descriptor table (their `next` fields as given).
        fn queue_of(&self, chains: &[Vec<RawDescriptor>]) -> (MockSplitQueue<'_, Mem>, Vring) {
            let queue = MockSplitQueue::new(&self.mem, 64);
            let mut first = 0u16;
            for descriptors in chains {
                queue.add_desc_chains(descriptors, first).expect("chain");
                first += descriptors.len() as u16;
            }
            let vring = Vring::new(self.backend.guest_memory(), 64).expect("vring");
            vring
                .set_queue_info(
                    queue.desc_table_addr().0,
                    queue.avail_addr().0,
                    queue.used_addr().0,
                )
                .expect("queue addresses");
            vring.set_queue_size(64);
            vring.set_queue_ready(true);
            vring.set_enabled(true);
            (queue, vring)
        }

        /// The index and `(id, len)` elements of the used ring at `base`.
        fn used(&self, base: u64) -> (u16, Vec<(u32, u32)>) {
            let idx: u16 = self.mem.read_obj(GuestAddress(base + 2)).expect("used idx");
            let elements = (0..u64::from(idx))
                .map(|i| {
                    let at = base + 4 + 8 * i;
                    let id: u32 = self.mem.read_obj(GuestAddress(at)).expect("used id");
                    let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).expect("used len");
                    (id, len)
                })
                .collect();
            (idx, elements)
        }

        /// Put `descriptors` in the queue, let the device answer; the used length.
        fn answer(&self, descriptors: &[(u64, u32, bool)]) -> u32 {
            self.answer_raw(chain(descriptors, 0))
        }

        /// [`Device::answer`] for raw descriptors, from slot 0.
        fn answer_raw(&self, descriptors: Vec<RawDescriptor>) -> u32 {
            self.mem
                .write_slice(&[NOT_WRITTEN], GuestAddress(STATUS))
                .expect("status byte");
            let (queue, vring) = self.queue_of(&[descriptors]);
            self.backend.process_queue(&vring);
            let (idx, used) = self.used(queue.used_addr().0);
            assert_eq!(idx, 1, "the request was not completed");
            used[0].1
        }

        fn status(&self) -> u8 {
            self.mem.read_obj(GuestAddress(STATUS)).expect("status")
        }

        /// A request header of type `kind` for `sector` at [`HEADER`].
        fn header(&self, kind: u32, sector: u64) {
            let mut header = [0u8; 16];
            header[..4].copy_from_slice(&kind.to_le_bytes());
            header[8..].copy_from_slice(&sector.to_le_bytes());
            self.mem
                .write_slice(&header, GuestAddress(HEADER))
                .expect("header");
        }

        /// A write of one sector of 0xa5 bytes to sector 0: its header at [`HEADER`], its
        /// data at [`DATA`].
        fn a5_write(&self) {
            self.header(VIRTIO_BLK_T_OUT, 0);
            self.mem
                .write_slice(&[0xa5; 512], GuestAddress(DATA))
                .expect("data");
        }
    }

    fn requests(volume: &str) -> Vec<(&'static str, &'static str, u64)> {
        stats::snapshot()
            .get(volume)
            .map(|f| f.requests.clone())
            .unwrap_or_default()
    }

    #[test]
    fn a_read_is_answered_with_the_volumes_bytes_and_counted() {
        let d = device("backend-test-read");
        d.header(VIRTIO_BLK_T_IN, 1);
        let used = d.answer(&[(HEADER, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
        assert_eq!(used, 513);
        assert_eq!(d.status(), Status::Ok.byte());
        let mut data = [0u8; 512];
        d.mem
            .read_slice(&mut data, GuestAddress(DATA))
            .expect("data");
        let want: Vec<u8> = (512..1024u64).map(|i| (i % 251) as u8).collect();
        assert_eq!(data.to_vec(), want);
        assert_eq!(requests("backend-test-read"), vec![("read", "ok", 1)]);
    }

    #[test]
    fn a_malformed_chain_gets_ioerr_in_its_last_writable_descriptor() {
        let d = device("backend-test-malformed");
        let readable_after_writable = [
            (HEADER, 16, false),
            (DATA, 512, true),
            (MORE, 16, false),
            (STATUS, 1, true),
        ];
        assert_eq!(d.answer(&readable_after_writable), 1);
        assert_eq!(d.status(), Status::IoErr.byte());
        // No writable last descriptor: nothing is written anywhere.
        let no_place = [(STATUS, 1, true), (HEADER, 16, false)];
        assert_eq!(d.answer(&no_place), 0);
        assert_eq!(d.status(), NOT_WRITTEN);
        assert_eq!(
            requests("backend-test-malformed"),
            vec![("other", "ioerr", 2)]
        );
    }

    #[test]
    fn a_frontend_coming_just_as_the_served_one_goes_away_is_served_and_a_live_one_refuses_it() {
        let slot = Arc::new(FrontendSlot::default());
        assert!(slot.claim());
        // The served frontend is alive: the next one is refused (after the short wait).
        let asked = std::time::Instant::now();
        assert!(slot.is_served());
        assert!(!slot.claim(), "two frontends served at once");
        assert!(asked.elapsed() < 2 * GONE_WAIT + Duration::from_secs(1));
        // It closed its connection just before the next one came; its connection's
        // thread notices a moment later, then releases the volume.
        let going = {
            let slot = Arc::clone(&slot);
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                slot.ending();
                std::thread::sleep(Duration::from_millis(50));
                slot.free();
            })
        };
        assert!(
            !slot.is_served(),
            "refused as if the gone frontend were served"
        );
        assert!(
            slot.claim(),
            "refused while the previous frontend was going away"
        );
        going.join().expect("the going frontend");
    }

    #[test]
    fn a_second_frontend_refused_at_its_open_is_hung_up_without_waiting_again() {
        let d = device("backend-test-second");
        let second = BlkBackend::new(
            "backend-test-second",
            d.exports.clone(),
            d._runtime.handle().clone(),
            1,
            GuestMemoryAtomic::new(d.mem.clone()),
            Arc::clone(&d.backend.slot),
        );
        // Its GET_FEATURES came first: the open waited GONE_WAIT for the first frontend
        // to go away, then was refused.
        let _ = second.features();
        assert!(matches!(
            second.wait_first_use(Duration::ZERO),
            FirstUse::Refused(_)
        ));
        // The connection's check does not wait for it once more.
        let checked = std::time::Instant::now();
        assert!(!second.another_frontend_is_served());
        assert!(
            checked.elapsed() < GONE_WAIT / 2,
            "waited {:?} again",
            checked.elapsed()
        );
    }

    #[test]
    fn a_chain_that_does_not_end_is_refused_whole_and_its_write_never_runs() {
        let d = device("backend-test-unterminated");
        d.a5_write();
        let write = [(HEADER, 16, false), (DATA, 512, false), (STATUS, 1, true)];
        // The status descriptor chained to itself (a loop, which the queue follows for
        // its size in descriptors), then to a slot beyond the 64-descriptor table.
        for next in [2u16, 200] {
            let mut descriptors = chain(&write, 0);
            let status = SplitDescriptor::new(
                STATUS,
                1,
                (VRING_DESC_F_WRITE | VRING_DESC_F_NEXT) as u16,
                next,
            );
            descriptors[2] = RawDescriptor::from(status);
            assert_eq!(d.answer_raw(descriptors), 1, "next {next}");
            assert_eq!(d.status(), Status::IoErr.byte(), "next {next}");
        }
        assert_eq!(
            requests("backend-test-unterminated"),
            vec![("other", "ioerr", 2)],
            "a write ran"
        );
        // The volume still holds its own bytes at sector 0.
        let read = [(HEADER, 16, false), (DATA, 512, true), (STATUS, 1, true)];
        d.header(VIRTIO_BLK_T_IN, 0);
        assert_eq!(d.answer(&read), 513);
        let mut data = [0u8; 512];
        d.mem
            .read_slice(&mut data, GuestAddress(DATA))
            .expect("data");
        let want: Vec<u8> = (0..512u64).map(|i| (i % 251) as u8).collect();
        assert_eq!(data.to_vec(), want, "the volume was written");
    }

    /// An indirect descriptor: a table of `len` bytes at [`TABLE`].
    fn indirect(len: u32) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(
            TABLE,
            len,
            VRING_DESC_F_INDIRECT as u16,
            0,
        ))
    }

    impl Device {
        /// Write `descriptors` as the indirect table at [`TABLE`].
        fn table(&self, descriptors: &[RawDescriptor]) {
            for (i, d) in descriptors.iter().enumerate() {
                self.mem
                    .write_obj(*d, GuestAddress(TABLE + 16 * i as u64))
                    .expect("indirect table");
            }
        }

        /// The volume's first sector, read through the queue.
        fn sector_0(&self) -> Vec<u8> {
            self.mem
                .write_slice(&[0u8; 16], GuestAddress(HEADER))
                .expect("header");
            let read = [(HEADER, 16, false), (DATA, 512, true), (STATUS, 1, true)];
            assert_eq!(self.answer(&read), 513);
            let mut data = vec![0u8; 512];
            self.mem
                .read_slice(&mut data, GuestAddress(DATA))
                .expect("data");
            data
        }
    }

    #[test]
    fn a_read_through_an_indirect_table_is_answered() {
        let d = device("backend-test-indirect");
        d.header(VIRTIO_BLK_T_IN, 1);
        d.table(&chain(
            &[(HEADER, 16, false), (DATA, 512, true), (STATUS, 1, true)],
            0,
        ));
        assert_eq!(d.answer_raw(vec![indirect(48)]), 513);
        assert_eq!(d.status(), Status::Ok.byte());
        let mut data = [0u8; 512];
        d.mem
            .read_slice(&mut data, GuestAddress(DATA))
            .expect("data");
        let want: Vec<u8> = (512..1024u64).map(|i| (i % 251) as u8).collect();
        assert_eq!(data.to_vec(), want);
    }

    #[test]
    fn chains_the_queue_stops_following_through_indirect_tables_are_refused_and_nothing_is_written()
    {
        let d = device("backend-test-indirect-bad");
        d.a5_write();
        // A whole write whose status descriptor still says NEXT, to `table` after it:
        // without the end check, a valid write. It gets IOERR at its status byte.
        let write_then = |table: RawDescriptor| {
            let mut descriptors = chain(
                &[(HEADER, 16, false), (DATA, 512, false), (STATUS, 1, true)],
                0,
            );
            descriptors[2] = RawDescriptor::from(SplitDescriptor::new(
                STATUS,
                1,
                (VRING_DESC_F_WRITE | VRING_DESC_F_NEXT) as u16,
                3,
            ));
            descriptors.push(table);
            descriptors
        };
        // An indirect table inside an indirect table.
        d.table(&write_then(indirect(64)));
        assert_eq!(d.answer_raw(vec![indirect(64)]), 1, "nested table");
        assert_eq!(d.status(), Status::IoErr.byte(), "nested table");
        // The same write in the ring, then an indirect table whose length is no multiple
        // of 16.
        assert_eq!(
            d.answer_raw(write_then(indirect(24))),
            1,
            "table of 24 bytes"
        );
        assert_eq!(d.status(), Status::IoErr.byte(), "table of 24 bytes");
        // Nothing can be read at all: a table of 56 bytes at the head.
        assert_eq!(d.answer_raw(vec![indirect(56)]), 0);
        assert_eq!(d.status(), NOT_WRITTEN, "table of 56 bytes");
        // A write through a table longer than the 64-descriptor queue (its empty
        // descriptors would be skipped): refused whole, the 65th descriptor (read-only)
        // gets no status.
        let mut long = vec![(HEADER, 16, false), (DATA, 512, false)];
        long.extend([(DATA, 0, false); 98]);
        long.push((STATUS, 1, true));
        d.table(&chain(&long, 0));
        assert_eq!(d.answer_raw(vec![indirect(16 * 101)]), 0, "long table");
        assert_eq!(d.status(), NOT_WRITTEN, "long table");
        // A write through a table of 65 descriptors that ends there (62 empty ones between
        // the data and the status): read whole, but more than the queue holds, so refused
        // (without that check, a valid write).
        let mut long = vec![(HEADER, 16, false), (DATA, 512, false)];
        long.extend([(DATA, 0, false); 62]);
        long.push((STATUS, 1, true));
        d.table(&chain(&long, 0));
        assert_eq!(d.answer_raw(vec![indirect(16 * 65)]), 1, "table of 65");
        assert_eq!(d.status(), Status::IoErr.byte(), "table of 65");
        assert_eq!(
            requests("backend-test-indirect-bad"),
            vec![("other", "ioerr", 5)],
            "a write ran"
        );
        let want: Vec<u8> = (0..512u64).map(|i| (i % 251) as u8).collect();
        assert_eq!(d.sector_0(), want, "the volume was written");
    }

    impl Device {
        /// A queue holding `n` reads of 4 KiB: the `i`th reads sector `8 * i` into its own
        /// buffer and status byte.
        fn queue_of_reads(&self, n: u64) -> (MockSplitQueue<'_, Mem>, Vring) {
            let mut chains = Vec::new();
            for i in 0..n {
                let mut header = [0u8; 16]; // VIRTIO_BLK_T_IN
                header[8..].copy_from_slice(&(8 * i).to_le_bytes());
                self.mem
                    .write_slice(&header, GuestAddress(HEADER + 16 * i))
                    .expect("header");
                chains.push([
                    (HEADER + 16 * i, 16, false),
                    (DATA + 4096 * i, 4096, true),
                    (STATUS + i, 1, true),
                ]);
            }
            let chains: Vec<&[(u64, u32, bool)]> = chains.iter().map(|c| c.as_slice()).collect();
            self.queue_with(&chains)
        }
    }

    fn wait_for(mut check: impl FnMut() -> bool) -> bool {
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < until {
            if check() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    #[test]
    fn many_requests_on_one_queue_are_in_flight_together_and_all_complete_with_their_bytes() {
        const N: u64 = 16;
        let d = device("held-test-many");
        let (queue, vring) = d.queue_of_reads(N);
        std::thread::scope(|s| {
            let worker = s.spawn(|| d.backend.process_queue(&vring));
            // Each read is held until released: all N started means all N are in flight
            // at once (one at a time, the first would wait forever).
            let all_started = wait_for(|| d.exports.reads_started() == N as usize);
            d.exports.release_reads();
            assert!(
                all_started,
                "only {} of {N} reads started",
                d.exports.reads_started()
            );
            worker.join().expect("worker");
        });
        let (idx, used) = d.used(queue.used_addr().0);
        assert_eq!(idx, N as u16);
        // In the order taken: chain i starts at descriptor 3 * i.
        let want: Vec<(u32, u32)> = (0..N as u32).map(|i| (3 * i, 4097)).collect();
        assert_eq!(used, want);
        for i in 0..N {
            let status: u8 = d.mem.read_obj(GuestAddress(STATUS + i)).expect("status");
            assert_eq!(status, Status::Ok.byte(), "read {i}");
            let mut data = vec![0u8; 4096];
            d.mem
                .read_slice(&mut data, GuestAddress(DATA + 4096 * i))
                .expect("data");
            let start = 4096 * i;
            let want: Vec<u8> = (start..start + 4096).map(|b| (b % 251) as u8).collect();
            assert!(data == want, "read {i} returned other bytes");
        }
    }

    #[test]
    fn a_queue_stop_waits_for_every_request_in_flight() {
        const N: u64 = 4;
        let d = device("held-test-stop");
        let (queue, vring) = d.queue_of_reads(N);
        let used_ring = queue.used_addr().0;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|s| {
            s.spawn(|| d.backend.process_queue(&vring));
            assert!(wait_for(|| d.exports.reads_started() == N as usize));
            // GET_VRING_BASE's handler takes the vring's lock to stop the queue.
            s.spawn(|| {
                let _stopped = vring.get_mut();
                let _ = tx.send(d.used(used_ring).0);
            });
            assert!(
                rx.recv_timeout(Duration::from_millis(300)).is_err(),
                "the queue was stopped with requests in flight"
            );
            d.exports.release_reads();
            let used_at_stop = rx.recv_timeout(Duration::from_secs(10)).expect("stopped");
            assert_eq!(
                used_at_stop, N as u16,
                "the stop returned before every completion"
            );
        });
    }

    #[test]
    fn after_a_hang_up_with_reads_in_flight_none_of_them_reaches_the_used_ring() {
        const N: u64 = 16;
        let d = device("held-test-hangup");
        let (queue, vring) = d.queue_of_reads(N);
        std::thread::scope(|s| {
            let worker = s.spawn(|| d.backend.process_queue(&vring));
            assert!(wait_for(|| d.exports.reads_started() == N as usize));
            // The hang-up does not wait for the reads (they wait for the volume)...
            d.backend.hang_up();
            // ...which then finish, into guest memory but not into the used ring.
            d.exports.release_reads();
            worker.join().expect("worker");
        });
        assert_eq!(d.used(queue.used_addr().0).0, 0);
    }

    #[test]
    fn memory_added_while_a_queue_is_busy_serves_its_next_request() {
        const HOTPLUG: u64 = 0x1000_0000;
        let d = device("held-test-hotplug");
        let (queue, vring) = d.queue_of_reads(4);
        std::thread::scope(|s| {
            let worker = s.spawn(|| d.backend.process_queue(&vring));
            assert!(wait_for(|| d.exports.reads_started() == 4));
            // The frontend adds a region (ADD_MEM_REG) while the queue is busy...
            let region =
                vm_memory::GuestRegionMmap::from_range(GuestAddress(HOTPLUG), 0x1_0000, None)
                    .expect("region");
            let grown = d.mem.insert_region(Arc::new(region)).expect("grown memory");
            d.backend
                .guest_memory()
                .lock()
                .expect("memory lock")
                .replace(grown.clone());
            // ...and the guest reads sector 0 into it.
            d.mem
                .write_slice(&[0u8; 16], GuestAddress(HEADER + 16 * 4))
                .expect("header");
            queue
                .add_desc_chains(
                    &chain(
                        &[
                            (HEADER + 16 * 4, 16, false),
                            (HOTPLUG, 4096, true),
                            (STATUS + 4, 1, true),
                        ],
                        12,
                    ),
                    12,
                )
                .expect("chain");
            d.exports.release_reads();
            worker.join().expect("worker");
            let (idx, _) = d.used(queue.used_addr().0);
            assert_eq!(idx, 5);
            let status: u8 = d.mem.read_obj(GuestAddress(STATUS + 4)).expect("status");
            assert_eq!(
                status,
                Status::Ok.byte(),
                "the read into added memory failed"
            );
            let mut data = vec![0u8; 4096];
            grown
                .read_slice(&mut data, GuestAddress(HOTPLUG))
                .expect("data");
            let want: Vec<u8> = (0..4096u64).map(|b| (b % 251) as u8).collect();
            assert!(
                data == want,
                "the read into added memory returned other bytes"
            );
        });
    }

    #[test]
    fn unexpected_queue_events_do_not_end_the_worker() {
        let d = device("backend-test-events");
        assert!(d.backend.handle_event(0, EventSet::ERROR, &[], 0).is_ok());
        assert!(d.backend.handle_event(7, EventSet::IN, &[], 0).is_ok());
    }
}
