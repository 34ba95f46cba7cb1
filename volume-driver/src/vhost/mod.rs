//! The vhost-user-blk frontend (issue 17): serves every volume to QEMU over
//! `<run_dir>/vhost/<volume>.sock`, virtqueues in shared guest memory.
//!
//! Built on rust-vmm's `vhost` / `vhost-user-backend` (the protocol, memory table, vrings,
//! worker threads) and `virtio-queue` (descriptor chains), as cloud-hypervisor's
//! `vhost_user_block` is. [`server`] owns the sockets, [`backend`] the device of one
//! connection, [`request`] the pure parsing of virtio-blk requests and [`config_space`] the
//! config space. Like NBD, the device only knows the
//! [`Exports`](crate::frontend::Exports) / [`ExportHandle`](crate::frontend::ExportHandle)
//! traits.
//!
//! # Decisions
//!
//! * **Features.** VERSION_1, MQ (up to `[frontends] vhost_max_queues` queues, one worker
//!   thread each), FLUSH (the guest runs a write-back cache and flushes; FLUSH calls
//!   `ExportHandle::flush`), DISCARD and WRITE_ZEROES (one range per request, UNMAP honoured),
//!   BLK_SIZE 4096, SEG_MAX / SIZE_MAX (requests up to 32 MiB), TOPOLOGY, RO when the handle
//!   is read-only. Not offered: EVENT_IDX, INDIRECT_DESC, CONFIG_WCE, LOG_ALL (so QEMU
//!   refuses to live-migrate these disks for now), inflight tracking (a QEMU that
//!   reconnects resubmits nothing).
//! * **Queues.** QEMU's `vhost-user-blk-pci` asks for one queue per vCPU unless
//!   `num-queues` is given, and fails to start when the backend offers fewer; give
//!   `num-queues` (libvirt `<driver queues>`, which `tandem-libvirt-hook disk-xml
//!   --frontend vhost-user` sets to `vhost_max_queues`) for guests with more vCPUs.
//! * **Opening.** On the frontend's first GET_FEATURES, `Exports::open(name, true)`: that
//!   may promote. A refusal is logged (error, with the reason) and the guest gets
//!   `VIRTIO_BLK_S_IOERR` for every request of that connection.
//! * **Ending.** The connection ending for any reason (QEMU quit or died, a protocol error)
//!   drops the handle: the last writer closing demotes. The socket then accepts the next
//!   frontend; one volume has at most one frontend at a time.
//! * **Untrusted input.** vhost-user messages are checked by the `vhost` crate (a bad one
//!   ends the connection); every descriptor address, length, sector and range is checked in
//!   [`request`] and by guest-memory accessors (a bad one fails that request).
//! * **Resize.** The config space is computed at each read, so a guest that rereads it sees
//!   the new size, but no config-change notification is sent: `vhost` 0.18's `Backend` has
//!   no CONFIG_CHANGE_MSG sender. The guest sees a grown volume after its next boot.
//! * **Status mapping.** Every `IoErrorKind` is `VIRTIO_BLK_S_IOERR`; unknown request types
//!   and flags are `VIRTIO_BLK_S_UNSUPP`.

pub mod backend;
pub mod config_space;
pub mod request;
pub mod server;

pub use server::{serve, socket_path, Settings, VhostError, RECONCILE_EVERY};
