//! The contract between the daemon and its frontends (NBD today, vhost-user-blk later).
//!
//! A frontend looks volumes up by export name in an [`Exports`] catalog and does I/O through
//! the [`ExportHandle`] it gets back. The daemon implements the catalog; the handle is where
//! the replication engine decides when a write may be acknowledged. Dropping the last
//! writable handle of a volume is the "last writer closed" signal (auto-demotion).

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

/// Why an export could not be opened. The message is shown to the client (QEMU prints it).
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// No volume of that name exists on this host.
    #[error("no volume named '{0}' on this host")]
    NotFound(String),
    /// The volume exists but may not be opened here now (e.g. Primary elsewhere).
    #[error("{0}")]
    Refused(String),
}

/// The class of an I/O failure, which frontends map to their protocol's error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoErrorKind {
    /// The backing disk or the replication engine failed the request.
    Io,
    /// The pool is out of space.
    NoSpace,
    /// The request is malformed (range, alignment).
    Invalid,
    /// Writing to a read-only export.
    ReadOnly,
    /// The volume is shutting down, frozen without quorum past the timeout, or demoted.
    Shutdown,
}

/// An I/O request that failed, with a message for the log.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ExportIoError {
    pub kind: IoErrorKind,
    pub message: String,
}

impl ExportIoError {
    pub fn new(kind: IoErrorKind, message: impl Into<String>) -> Self {
        ExportIoError {
            kind,
            message: message.into(),
        }
    }
}

/// What a client may learn about an export without opening it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// Whether an open would be read-only.
    pub read_only: bool,
}

/// The volumes a frontend can serve.
#[async_trait]
pub trait Exports: Send + Sync + 'static {
    /// Export names (volume names) available on this host, sorted.
    fn list(&self) -> Vec<String>;
    /// Describe a volume without opening it: never promotes, never counts as a writer.
    /// Frontends answer information queries (NBD_OPT_INFO) with this.
    async fn describe(&self, name: &str) -> Result<ExportInfo, OpenError>;
    /// Open a volume. Opening for writing may promote the local replica, or be refused.
    async fn open(&self, name: &str, writable: bool) -> Result<Arc<dyn ExportHandle>, OpenError>;
}

/// An open volume. All offsets and lengths are in bytes and already checked by the
/// frontend against [`ExportHandle::size`]; implementations check them again.
#[async_trait]
pub trait ExportHandle: Send + Sync + 'static {
    /// The export name.
    fn name(&self) -> &str;
    /// Size in bytes at this moment (volumes can grow online).
    fn size(&self) -> u64;
    /// Whether writes are refused.
    fn read_only(&self) -> bool;
    /// Read `len` bytes at `offset`.
    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, ExportIoError>;
    /// Write `data` at `offset`; returns when the replication protocol allows the
    /// acknowledgement. With `fua` the data is durable (locally and, under protocol C, on
    /// every connected peer) before this returns.
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), ExportIoError>;
    /// Make all acknowledged writes durable (see `write`'s `fua`).
    async fn flush(&self) -> Result<(), ExportIoError>;
    /// Deallocate a range (it reads as zeroes afterwards).
    async fn trim(&self, offset: u64, len: u64) -> Result<(), ExportIoError>;
    /// Zero a range; `may_unmap` allows deallocation (NBD's absence of NO_HOLE).
    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
    ) -> Result<(), ExportIoError>;
}
