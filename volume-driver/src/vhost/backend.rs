//! One vhost-user-blk device for one frontend connection: the `VhostUserBackend` that
//! rust-vmm's `vhost-user-backend` daemon drives (feature negotiation, config space, queue
//! events), executing requests on an [`ExportHandle`].
//!
//! The volume is opened (`Exports::open(name, writable = true)`, which may promote) when the
//! frontend first asks for the device features, i.e. when a QEMU starts using the socket,
//! not when something merely connects. A refusal is logged with its reason and every request
//! of that connection is answered `VIRTIO_BLK_S_IOERR` (vhost-user has no way to send the
//! message itself). The handle is released by [`BlkBackend::release`] when the connection
//! ends, which is the "last writer closed" signal.
//!
//! Requests run in the queue's worker thread (one thread per queue), each waiting for its
//! `ExportHandle` call on the daemon's tokio runtime; one queue thus has one request in
//! flight and several queues run in parallel.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::runtime::Handle;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_TOPOLOGY,
    VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_queue::QueueT;
use vm_memory::{Bytes as _, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::config_space::ConfigSpace;
use super::request::{self, Chain, Request, Segment, Status, HEADER_LEN};
use crate::frontend::{ExportHandle, ExportIoError, Exports, OpenError};

/// Guest memory as the daemon maps it (no dirty-page log).
pub type GuestMemory = GuestMemoryAtomic<GuestMemoryMmap<()>>;
type Vring = VringRwLock<GuestMemory>;

/// Descriptors per queue offered to the frontend.
pub const QUEUE_SIZE: usize = 256;

/// The volume behind one connection, opened on first use.
enum Volume {
    NotOpened,
    Open(Arc<dyn ExportHandle>),
    Refused(String),
    Released,
}

/// The device one frontend connection talks to.
pub struct BlkBackend {
    name: String,
    exports: Arc<dyn Exports>,
    runtime: Handle,
    num_queues: usize,
    volume: Mutex<Volume>,
    mem: GuestMemory,
    /// The read ends of the exit events handed out by [`VhostUserBackend::exit_event`].
    /// vhost-user-backend 0.24 registers each with its worker's epoll through
    /// `into_raw_fd` and never closes it; a backend lives for one connection, so they are
    /// closed when it is dropped (after the workers and their epolls are gone), or every
    /// connection would leak one descriptor per worker thread.
    exit_fds: Mutex<Vec<RawFd>>,
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
    pub fn new(
        name: &str,
        exports: Arc<dyn Exports>,
        runtime: Handle,
        num_queues: usize,
        mem: GuestMemory,
    ) -> BlkBackend {
        BlkBackend {
            name: name.to_string(),
            exports,
            runtime,
            num_queues,
            volume: Mutex::new(Volume::NotOpened),
            mem,
            exit_fds: Mutex::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Volume> {
        self.volume.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The open handle, opening the volume on first use. `Err` carries the refusal.
    fn handle(&self) -> Result<Arc<dyn ExportHandle>, String> {
        let mut volume = self.lock();
        if let Volume::NotOpened = *volume {
            let opened = self.runtime.block_on(self.exports.open(&self.name, true));
            *volume = match opened {
                Ok(handle) => {
                    tracing::info!(volume = %self.name, read_only = handle.read_only(), "vhost-user-blk frontend opened the volume");
                    Volume::Open(handle)
                }
                Err(e) => {
                    let reason = match e {
                        OpenError::NotFound(_) => e.to_string(),
                        OpenError::Refused(msg) => msg,
                    };
                    tracing::error!(volume = %self.name, reason = %reason, "vhost-user-blk open refused; the guest gets I/O errors");
                    Volume::Refused(reason)
                }
            };
        }
        match &*volume {
            Volume::Open(handle) => Ok(Arc::clone(handle)),
            Volume::Refused(reason) => Err(reason.clone()),
            Volume::Released => Err("the connection ended".into()),
            Volume::NotOpened => Err("not opened".into()),
        }
    }

    /// Drop the handle (the connection ended): the last writer closing demotes, which
    /// needs the runtime's context.
    pub fn release(&self) {
        let _runtime = self.runtime.enter();
        let previous = std::mem::replace(&mut *self.lock(), Volume::Released);
        if let Volume::Open(handle) = previous {
            tracing::info!(volume = %self.name, "vhost-user-blk frontend closed the volume");
            drop(handle);
        }
    }

    /// The config space as it is now (size follows an online resize).
    fn config(&self) -> ConfigSpace {
        let size = match &*self.lock() {
            Volume::Open(handle) => handle.size(),
            _ => self
                .runtime
                .block_on(self.exports.describe(&self.name))
                .map(|info| info.size)
                .unwrap_or(0),
        };
        ConfigSpace::new(size, self.num_queues as u16)
    }

    /// Answer every available request of `vring`, then notify the guest.
    ///
    /// The vring's lock is held from taking a request until its completion is in the used
    /// ring: when QEMU stops the queue (`GET_VRING_BASE`: guest reset, pause, shutdown),
    /// the handler waits on that lock, so no request is still running when the ring is
    /// handed back, and no completion is written into guest memory after it. A stopped
    /// queue yields no more requests.
    fn process_queue(&self, vring: &Vring) {
        let mem = self.mem.memory();
        let mut state = vring.get_mut();
        let mut answered = false;
        while let Some(chain) = state.get_queue_mut().pop_descriptor_chain(mem.clone()) {
            let head = chain.head_index();
            let descriptors = chain
                .clone()
                .map(|d| (d.addr().0, d.len(), d.is_write_only()));
            let used = match Chain::split(descriptors) {
                Ok(parsed) => self.execute(&mem, &parsed),
                Err(e) => {
                    tracing::warn!(volume = %self.name, error = %e, "malformed virtio-blk descriptor chain");
                    0
                }
            };
            if let Err(e) = state.add_used(head, used) {
                tracing::warn!(volume = %self.name, error = %e, "cannot return a descriptor to the guest");
                break;
            }
            answered = true;
        }
        if answered {
            if let Err(e) = state.signal_used_queue() {
                tracing::warn!(volume = %self.name, error = %e, "cannot notify the guest");
            }
        }
    }

    /// Run one request and write its status; returns the bytes written to the guest.
    fn execute(&self, mem: &GuestMemoryMmap<()>, chain: &Chain) -> u32 {
        let Some(status_addr) = chain.status_addr() else {
            return 0;
        };
        let (status, data_in) = match self.run(mem, chain) {
            Ok(data_in) => (Status::Ok, data_in),
            Err(rejected) => {
                tracing::debug!(volume = %self.name, reason = %rejected.reason, "virtio-blk request failed");
                (rejected.status, 0)
            }
        };
        if let Err(e) = mem.write_slice(&[status.byte()], GuestAddress(status_addr)) {
            tracing::warn!(volume = %self.name, error = %e, "cannot write a request status");
            return 0;
        }
        data_in + 1
    }

    /// Parse and run one request; returns the bytes of read data written to the guest.
    fn run(&self, mem: &GuestMemoryMmap<()>, chain: &Chain) -> Result<u32, request::Rejected> {
        let io_err = |reason: String| request::Rejected {
            status: Status::IoErr,
            reason,
        };
        let mut header = [0u8; HEADER_LEN as usize];
        if chain.readable_len() >= HEADER_LEN {
            gather(mem, &chain.readable, 0, &mut header).map_err(io_err)?;
        }
        let mut ranges = vec![0u8; request::ranges_len(chain)];
        gather(mem, &chain.readable, HEADER_LEN, &mut ranges).map_err(io_err)?;
        let handle = self.handle().map_err(io_err)?;
        let size = handle.size();
        let parsed = request::parse(&header, chain, &ranges, size)?;
        let from_export = |e: ExportIoError| request::Rejected {
            status: Status::IoErr,
            reason: e.message,
        };
        let rt = &self.runtime;
        match parsed {
            Request::Read { offset, len } => {
                let data = rt.block_on(handle.read(offset, len)).map_err(from_export)?;
                if data.len() != len as usize {
                    return Err(io_err(format!("short read of {} bytes", data.len())));
                }
                scatter(mem, &chain.writable, &data).map_err(io_err)?;
                Ok(len)
            }
            Request::Write { offset, len } => {
                let mut data = vec![0u8; len as usize];
                gather(mem, &chain.readable, HEADER_LEN, &mut data).map_err(io_err)?;
                rt.block_on(handle.write(offset, Bytes::from(data), false))
                    .map_err(from_export)?;
                Ok(0)
            }
            Request::Flush => rt.block_on(handle.flush()).map(|_| 0).map_err(from_export),
            Request::Discard { offset, len } => rt
                .block_on(handle.trim(offset, len))
                .map(|_| 0)
                .map_err(from_export),
            Request::WriteZeroes { offset, len, unmap } => rt
                .block_on(handle.write_zeroes(offset, len, unmap))
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

/// Copy `out.len()` bytes starting `skip` bytes into `segments` from guest memory.
fn gather(
    mem: &GuestMemoryMmap<()>,
    segments: &[Segment],
    mut skip: u64,
    out: &mut [u8],
) -> Result<(), String> {
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
fn scatter(mem: &GuestMemoryMmap<()>, segments: &[Segment], data: &[u8]) -> Result<(), String> {
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
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.num_queues
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        // A QEMU starting to use the device: open the volume now, so the read-only bit is
        // known and a refusal is logged at VM start.
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
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        features
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, _enabled: bool) {
        // EVENT_IDX is not offered: the guest is notified after every batch.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.config().read(offset, size)
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
        let vring = vrings
            .get(usize::from(device_event))
            .ok_or_else(|| io::Error::other(format!("event for unknown queue {device_event}")))?;
        // A request may hold the last handle (after `release`): its drop demotes, which
        // needs the runtime's context.
        let _runtime = self.runtime.enter();
        self.process_queue(vring);
        Ok(())
    }
}
