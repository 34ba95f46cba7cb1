//! The NBD frontend (issue 4): serves every volume to QEMU and standard NBD clients.
//!
//! [`proto`] is the wire format (pure parsers and encoders); [`server`] owns the listeners,
//! the handshake and the transmission loop. The server only knows the
//! [`Exports`](crate::frontend::Exports) / [`ExportHandle`](crate::frontend::ExportHandle)
//! traits; the export name is the volume name.
//!
//! # Supported
//!
//! * Fixed newstyle negotiation only (oldstyle and non-fixed newstyle clients are
//!   disconnected with a log line). `NBD_FLAG_NO_ZEROES` is offered.
//! * Options: `NBD_OPT_GO`, `NBD_OPT_INFO` (`NBD_INFO_EXPORT`, `NBD_INFO_BLOCK_SIZE`
//!   always, `NBD_INFO_NAME` on request), `NBD_OPT_LIST`, `NBD_OPT_EXPORT_NAME`,
//!   `NBD_OPT_ABORT`. Everything else (STARTTLS, STRUCTURED_REPLY, meta contexts) gets
//!   `NBD_REP_ERR_UNSUP`; malformed options get `NBD_REP_ERR_INVALID`, option data over
//!   8 KiB gets `NBD_REP_ERR_TOO_BIG` (over 1 MiB: disconnect).
//! * Commands: READ, WRITE (+FUA), FLUSH, TRIM (+FUA), WRITE_ZEROES (+FUA, +NO_HOLE),
//!   DISC. Transmission flags: HAS_FLAGS, SEND_FLUSH, SEND_FUA, SEND_TRIM,
//!   SEND_WRITE_ZEROES, CAN_MULTI_CONN, and READ_ONLY when the handle is read-only.
//!
//! # Decisions
//!
//! * **Opening.** NBD has no way for a client to ask for read-only access, so GO, INFO and
//!   EXPORT_NAME all call `Exports::open(name, writable = true)` and the handle decides
//!   (it may be read-only, then READ_ONLY is advertised and writes get `EPERM`).
//!   `OpenError::NotFound` becomes `NBD_REP_ERR_UNKNOWN`, `OpenError::Refused(msg)` becomes
//!   `NBD_REP_ERR_POLICY`; both carry the message as reply data, which QEMU prints
//!   ("server reported: ..."). A handle opened by INFO is kept for a directly following GO
//!   of the same name, so INFO+GO opens once. `NBD_OPT_EXPORT_NAME` cannot carry errors:
//!   a failed open ends the connection, as the spec requires.
//! * **Simple replies only.** Reads are answered after the whole buffer is read from the
//!   export, so an error is always known before the reply header goes out and the simple
//!   reply can carry it. Structured replies would only add sparse-read holes (we do not
//!   expose allocation) and error strings; not worth the per-read overhead now.
//! * **Block sizes.** Minimum 1 (the device does byte-granular positional I/O), preferred
//!   4096, maximum 32 MiB for READ/WRITE payloads. Longer READs get `EINVAL`; longer
//!   WRITEs get their payload read and discarded in a streaming fashion (no allocation),
//!   then `EINVAL`. TRIM and WRITE_ZEROES carry no payload and may span up to the export
//!   size.
//! * **Range checks.** Requests past the end: `EINVAL` for READ and TRIM, `ENOSPC` for WRITE
//!   and WRITE_ZEROES (spec: writes beyond the end SHOULD be ENOSPC); write payloads are
//!   discarded first. Unknown commands and flags not valid for a command: `EINVAL`.
//! * **FLUSH / FUA.** FLUSH calls `ExportHandle::flush`, which makes every write the volume
//!   acknowledged durable (the contract in `frontend`), regardless of the connection it
//!   came on; that covers the spec's "writes completed (replied to) before the FLUSH was
//!   received". FUA on WRITE is passed to the handle; FUA on TRIM/WRITE_ZEROES is a flush
//!   after the operation; FUA on READ/FLUSH is accepted and ignored.
//! * **CAN_MULTI_CONN** is advertised: every connection to a volume reaches the same device
//!   through the same daemon, there is no per-connection cache, and flush is volume-wide.
//! * **Errors** (`IoErrorKind` → NBD errno): Io → EIO, NoSpace → ENOSPC, Invalid → EINVAL,
//!   ReadOnly → EPERM, Shutdown → ESHUTDOWN.
//! * **Concurrency.** Requests of one connection run concurrently (one task each); they
//!   are read through a 64 KiB buffer (a queue of small requests in one syscall) and
//!   replies are written by one writer task, small ones batched into one syscall. At most
//!   [`server::MAX_IN_FLIGHT`] requests and [`server::MAX_IN_FLIGHT_BYTES`] payload bytes per
//!   connection are in flight; beyond that the server stops reading the socket.
//! * **Ending.** DISC, shutdown, EOF or garbage (bad magic) stop the reading of requests;
//!   in-flight requests complete and their replies are sent before the socket is closed.
//!   One connection's failure never affects another.
//!
//! # Handshake sketch
//!
//! ```text
//! S: "NBDMAGIC" "IHAVEOPT" u16 FIXED_NEWSTYLE|NO_ZEROES
//! C: u32 C_FIXED_NEWSTYLE[|C_NO_ZEROES]          (anything else: disconnect)
//! C: "IHAVEOPT" u32 NBD_OPT_GO u32 len | u32 namelen name u16 n u16*n
//!        (server: exports.open(name, writable = true))
//! S: REP_MAGIC GO NBD_REP_INFO  INFO_EXPORT u64 size u16 flags
//! S: REP_MAGIC GO NBD_REP_INFO  INFO_BLOCK_SIZE 1 4096 32MiB
//! S: REP_MAGIC GO NBD_REP_ACK 0                  -> transmission
//!    or  REP_MAGIC GO NBD_REP_ERR_POLICY len "vm-100-disk-0 is Primary on hv2; ..."
//! C: 0x25609513 u16 flags u16 type u64 cookie u64 offset u32 len [data]
//! S: 0x67446698 u32 errno u64 cookie [data]
//! ```

pub mod connections;
pub mod proto;
pub mod server;

pub use server::{
    bind_unix, serve_connection, serve_tcp, serve_unix, NbdError, Shutdown, MAX_IN_FLIGHT,
    MAX_IN_FLIGHT_BYTES,
};
