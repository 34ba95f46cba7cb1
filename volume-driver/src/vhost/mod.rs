//! The vhost-user-blk frontend (issue 17): serves every volume to QEMU over
//! `<run_dir>/vhost/<volume>.sock`, virtqueues in shared guest memory.
//!
//! Built on rust-vmm's `vhost` / `vhost-user-backend` (the protocol, memory table, vrings,
//! worker threads) and `virtio-queue` (descriptor chains), as cloud-hypervisor's
//! `vhost_user_block` is. [`server`] owns the sockets, [`backend`] the device of one
//! connection, [`request`] the pure parsing of virtio-blk requests and [`config_space`] the
//! config space, [`queue`] a virtqueue's service loop (many requests in flight),
//! [`connection`] one connection's life, [`resize`] the announcement of a new size and
//! [`stats`] the metrics counters.
//! Like NBD, the device only knows the
//! [`Exports`](crate::frontend::Exports) / [`ExportHandle`](crate::frontend::ExportHandle)
//! traits.
//!
//! # Decisions
//!
//! * **Features.** VERSION_1, MQ (up to `[frontends] vhost_max_queues` queues, one worker
//!   thread each), FLUSH (the guest runs a write-back cache and flushes; FLUSH calls
//!   `ExportHandle::flush`), DISCARD and WRITE_ZEROES (one range per request, UNMAP honoured),
//!   BLK_SIZE 4096, SEG_MAX / SIZE_MAX (requests up to 32 MiB), TOPOLOGY, RO when the handle
//!   is read-only, EVENT_IDX (fewer kicks and interrupts under load), LOG_ALL with the
//!   LOG_SHMFD protocol feature (live migration: see below), BACKEND_REQ (resize). Not
//!   offered: INDIRECT_DESC, CONFIG_WCE, REPLY_ACK, inflight tracking (each queue runs many
//!   requests at once but completes them in the order it took them, so when QEMU restarts
//!   a queue at its used index after a reconnect, exactly the requests that were not
//!   answered are submitted again).
//! * **Queues.** QEMU's `vhost-user-blk-pci` asks for one queue per vCPU unless
//!   `num-queues` is given, and fails to start when the backend offers fewer; give
//!   `num-queues` (libvirt `<driver queues>`, which `tandem-libvirt-hook disk-xml
//!   --frontend vhost-user` sets to `vhost_max_queues`) for guests with more vCPUs.
//! * **Opening.** On the frontend's first GET_FEATURES, `Exports::open(name, true)`: that
//!   may promote. A refusal is logged (error, with the reason) and the connection is hung
//!   up before QEMU's device is realized (GET_CONFIG also answers the protocol's error), so
//!   QEMU fails to start, as it does when an NBD open is refused. QEMU retries the
//!   connection three times during realize; each try opens anew.
//! * **One frontend at a time.** The socket keeps accepting while a frontend is served;
//!   any further connection is closed after about half a second (`GONE_WAIT`) with a log
//!   line, so a second QEMU fails fast. A frontend that comes while the previous one,
//!   already gone, is still being released (a demotion takes a moment) waits for the
//!   release instead; so does one that comes just as the previous one closes its
//!   connection (a QEMU killed and started again), which its connection's thread notices
//!   a moment later.
//!   A connection that does not ask for the features within [`IDLE_TIMEOUT`] is closed, so
//!   a silent client cannot keep QEMU out.
//! * **Ending.** The connection ending for any reason (QEMU quit or died, a protocol error)
//!   drops the handle: the last writer closing demotes. The socket then serves the next
//!   frontend. A QEMU started with `reconnect` (libvirt `<reconnect enabled='yes'>`)
//!   connects again after tandemd restarts and resubmits what was in flight.
//! * **Untrusted input.** vhost-user messages are checked by the `vhost` crate (a bad one
//!   ends the connection); every descriptor address, length, sector and range is checked in
//!   [`request`] and by guest-memory accessors (a bad one fails that request); a chain
//!   that does not end (a loop, longer than the queue, a next index out of the table) is
//!   refused whole, since the queue stops following it without saying so. A chain is
//!   read once, at most one descriptor more than the queue holds, and checked, run and
//!   budgeted from that one read ([`queue::Taken`]). What a
//!   guest can make a connection hold is bounded: the queue size in requests per queue and
//!   NBD's 256 MiB of request bytes per connection; an unreadable available ring ends the
//!   queue's pass instead of spinning ([`queue`]).
//! * **Resize.** The config space is computed at each read. Each served connection has a
//!   [`resize::SizeWatcher`] that, within [`resize::POLL`] of a `tandem volume resize`,
//!   sends QEMU a CONFIG_CHANGE_MSG on the backend request channel (`vhost` 0.18 has no
//!   sender for it: the workspace patches the crate, see `third_party/README.md`); QEMU
//!   re-reads the config and the guest kernel logs "capacity change". No REPLY_ACK: the
//!   notice is not waited for, since QEMU answers it by a GET_CONFIG on the main socket.
//! * **Live migration.** QEMU migrates a vhost-user disk only when the backend logs the
//!   guest pages it writes (`LOG_ALL` + `LOG_SHMFD`). The guest memory carries
//!   vhost-user-backend's `BitmapMmapRegion`; `SET_LOG_BASE` points it at QEMU's log and
//!   from then on every write into guest memory (read data, status, used ring, and with
//!   EVENT_IDX the used ring's `avail_event` field) marks its pages. The library keeps
//!   logging after the migration ends (harmless: the log stays mapped). The workspace
//!   patches vhost-user-backend 0.24 (`third_party/README.md`) in two places: a region
//!   added while logging logs into the same log (QEMU sends a new SET_LOG_BASE only when
//!   the log must change size; regions added once logging is off are not logged), and
//!   the SET_VRING_ADDR that switches the log on for a running ring keeps the
//!   ring's used index (the library re-read it from guest memory, where the queue's worker
//!   may be completing requests meanwhile, and later completions would then overwrite
//!   used entries the guest had consumed).
//!   Who may open the volume on the destination is the gate's business (dual-primary
//!   during the migration only), as for NBD: the destination QEMU opens it when it starts.
//! * **Status mapping.** Every `IoErrorKind` is `VIRTIO_BLK_S_IOERR`; unknown request types
//!   and flags are `VIRTIO_BLK_S_UNSUPP`.

pub mod backend;
pub mod config_space;
pub mod connection;
#[cfg(test)]
mod dirty_log_test;
#[cfg(test)]
mod dummy_exports;
pub mod queue;
pub mod request;
pub mod resize;
pub mod server;
pub mod stats;

pub use server::{serve, socket_path, Settings, VhostError, IDLE_TIMEOUT, RECONCILE_EVERY};
