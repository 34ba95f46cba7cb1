//! The backing device: the local disk a replica lives on.
//!
//! ```text
//! BackingDevice (trait: size, read_at, read_owned, read_async, write_at, flush, discard,
//!                 write_zeroes, set_size)
//!   └── FileDevice (a regular file or a block device, positional I/O on one descriptor)
//!         ├── CacheMode::None       O_DIRECT (default): aligned buffers, no host page cache
//!         ├── CacheMode::Writeback  through the page cache (file systems without O_DIRECT)
//!         └── Engine                io_uring (engine_uring.rs) or thread pool (engine_sync.rs)
//! ```
//!
//! The engine never assumes what is behind the trait: the `file` pool hands out sparse
//! files, the `lvm-thin` pool hands out `/dev/<vg>/<lv>` block devices, and both are opened
//! as a [`FileDevice`]. All methods are blocking and thread-safe (`&self`); async callers run
//! them on a blocking thread pool. The exceptions are [`BackingDevice::read_async`],
//! [`BackingDevice::write_async`] and [`BackingDevice::flush_async`]: with io_uring under
//! `O_DIRECT`, an aligned request is submitted to a ring shared by the device's async
//! callers and awaited on the runtime, without a thread hand-off. They return `None` when
//! the device cannot (another engine, an unaligned request, a ring that is full or failed):
//! the caller then takes the blocking path, so a ring problem never becomes an I/O error.
//!
//! Durability contract: `write_at` may leave data in a volatile cache (the page cache, or
//! the disk's own write cache under `O_DIRECT`); data is durable only after `flush` returns,
//! or immediately when written with `write_at_durable` (`RWF_DSYNC`).
//!
//! Alignment under `O_DIRECT`: requests whose offset and length are multiples of [`ALIGN`]
//! go straight to the device (through an aligned bounce copy when the caller's memory is not
//! aligned). Any other request is widened to whole blocks: a read reads the blocks and keeps
//! the part asked for; a write reads the blocks, patches them and writes them back. Such a
//! read-modify-write, and any unaligned discard or zeroing, holds its blocks exclusively
//! while aligned writes hold theirs shared (`block_lock.rs`), so a request sharing a block
//! with another one never loses the other's bytes.

mod aligned;
mod block_lock;
mod buffer_pool;
mod engine;
mod engine_sync;
mod engine_uring;

use std::fmt;
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use io_uring::{opcode, types};

pub use aligned::{is_aligned, AlignedBuf, AlignedBufMut, ALIGN};
use block_lock::{stripes_of, BlockGuard, BlockLocks};
use engine::Engine;
use engine_sync::SyncEngine;
pub use engine_uring::FAULT_RING_SETUP_ENV;
use engine_uring::{AsyncRing, Keep, NOT_STARTED};

/// A device operation running without a thread hand-off ([`BackingDevice::read_async`],
/// [`BackingDevice::write_async`], [`BackingDevice::flush_async`]).
pub type DeviceFuture<T> = Pin<Box<dyn Future<Output = Result<T, DeviceError>> + Send + 'static>>;
pub use engine::{EngineChoice, IoEngine};

/// Errors of a backing device. Each variant says which operation failed and keeps the cause.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The device could not be opened.
    #[error("cannot open backing device {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// `cache = "none"` needs `O_DIRECT`, which the file system refused.
    #[error("{path} does not support O_DIRECT (cache = \"none\"); use cache = \"writeback\" on a file system without direct I/O (tmpfs)")]
    DirectUnsupported {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Under `O_DIRECT` the device size must be whole blocks.
    #[error("{path} is {size} bytes, not a multiple of {ALIGN}, which cache = \"none\" needs")]
    UnalignedSize { path: PathBuf, size: u64 },
    /// A request reached past the end of the device.
    #[error("request at offset {offset} length {len} is beyond the device size {size}")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    /// The kernel failed the operation.
    #[error("{op} at offset {offset} length {len} failed")]
    Io {
        op: &'static str,
        offset: u64,
        len: u64,
        #[source]
        source: io::Error,
    },
}

impl DeviceError {
    /// The errno the failure maps to, for frontends that report errors as errno values.
    pub fn errno(&self) -> i32 {
        match self {
            DeviceError::Open { source, .. }
            | DeviceError::Io { source, .. }
            | DeviceError::DirectUnsupported { source, .. } => {
                source.raw_os_error().unwrap_or(libc::EIO)
            }
            DeviceError::OutOfRange { .. } | DeviceError::UnalignedSize { .. } => libc::EINVAL,
        }
    }
}

/// A replica's local disk, addressed in bytes.
pub trait BackingDevice: Send + Sync + 'static {
    /// Current size in bytes.
    fn size(&self) -> u64;
    /// Read exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DeviceError>;
    /// Read `len` bytes at `offset` into a new buffer, the one a frontend replies with.
    /// Devices override it to read straight into aligned memory without zero-filling it.
    fn read_owned(&self, offset: u64, len: usize) -> Result<Bytes, DeviceError> {
        let mut buf = vec![0u8; len];
        self.read_at(&mut buf, offset)?;
        Ok(Bytes::from(buf))
    }
    /// Read on the async runtime itself when the device can (io_uring under `O_DIRECT`, an
    /// aligned request, inside a tokio runtime). `None`: call [`BackingDevice::read_owned`]
    /// on a blocking thread instead.
    fn read_async(&self, offset: u64, len: usize) -> Option<DeviceFuture<Bytes>> {
        let _ = (offset, len);
        None
    }
    /// Write `data` at `offset` on the async runtime itself when the device can (as for
    /// [`BackingDevice::read_async`]); with `fua` it is durable when the future completes.
    /// The write starts before this returns. `None`: call [`BackingDevice::write_at`] or
    /// [`BackingDevice::write_at_durable`] on a blocking thread instead.
    fn write_async(&self, offset: u64, data: &Bytes, fua: bool) -> Option<DeviceFuture<()>> {
        let _ = (offset, data, fua);
        None
    }
    /// [`BackingDevice::flush`] on the async runtime when the device can; `None`: call
    /// `flush` on a blocking thread instead.
    fn flush_async(&self) -> Option<DeviceFuture<()>> {
        None
    }
    /// Write all of `buf` at `offset`; the data may sit in a volatile cache until `flush`.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError>;
    /// Write all of `buf` at `offset` and return only when it is on stable storage (FUA).
    fn write_at_durable(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError>;
    /// Make every completed write durable.
    fn flush(&self) -> Result<(), DeviceError>;
    /// Deallocate a range; afterwards it reads as zeroes.
    fn discard(&self, offset: u64, len: u64) -> Result<(), DeviceError>;
    /// Make a range read as zeroes. With `may_unmap` the device may deallocate it.
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), DeviceError>;
    /// Tell the device its size changed (after the pool grew the file or LV underneath).
    fn set_size(&self, size: u64);
    /// True when a write without FUA only copies into the kernel's page cache (a file or
    /// block device opened with `cache = "writeback"`), so it returns in microseconds unless
    /// the kernel throttles dirty pages. The data path then applies small writes without a
    /// thread hand-off (`crate::datapath::write_is_inline`).
    fn cached_writes(&self) -> bool {
        false
    }
}

/// How a device uses the host's page cache (the pool key `cache`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CacheMode {
    /// `O_DIRECT`: no second copy of the guest's data in host memory (QEMU's `cache=none`).
    #[default]
    None,
    /// Through the host page cache, for file systems without `O_DIRECT` (tmpfs).
    Writeback,
}

impl fmt::Display for CacheMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CacheMode::None => "none",
            CacheMode::Writeback => "writeback",
        })
    }
}

impl FromStr for CacheMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(CacheMode::None),
            "writeback" => Ok(CacheMode::Writeback),
            other => Err(format!(
                "unknown cache mode '{other}' (expected 'none' or 'writeback')"
            )),
        }
    }
}

/// How to open a [`FileDevice`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceOptions {
    pub cache: CacheMode,
    pub engine: EngineChoice,
}

/// Positional I/O on a regular file or a block device.
#[derive(Debug)]
pub struct FileDevice {
    file: Arc<File>,
    path: PathBuf,
    size: AtomicU64,
    is_block_device: bool,
    cache: CacheMode,
    engine: Arc<dyn Engine>,
    /// Shared by aligned writes, exclusive for read-modify-write (see the module doc).
    blocks: Arc<BlockLocks>,
    /// The shared ring of async callers, started on the first async call.
    ring: OnceLock<Option<Arc<AsyncRing>>>,
}

const ZERO_CHUNK: usize = 1 << 20;

fn align_down(x: u64) -> u64 {
    x - x % ALIGN as u64
}

fn align_up(x: u64) -> u64 {
    align_down(x + ALIGN as u64 - 1)
}

impl FileDevice {
    /// Open `path` for reading and writing with the default options (`cache = "none"`,
    /// engine `auto`). Its size is the file length or the block device size.
    pub fn open(path: &Path) -> Result<Self, DeviceError> {
        Self::open_with(path, DeviceOptions::default())
    }

    /// Open `path` with `options`. Logs the cache mode and the engine in use.
    pub fn open_with(path: &Path, options: DeviceOptions) -> Result<Self, DeviceError> {
        let open_err = |source| DeviceError::Open {
            path: path.to_path_buf(),
            source,
        };
        let mut flags = libc::O_CLOEXEC;
        if options.cache == CacheMode::None {
            flags |= libc::O_DIRECT;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(flags)
            .open(path)
            .map_err(|source: io::Error| {
                if options.cache == CacheMode::None && source.raw_os_error() == Some(libc::EINVAL) {
                    DeviceError::DirectUnsupported {
                        path: path.to_path_buf(),
                        source,
                    }
                } else {
                    open_err(source)
                }
            })?;
        let meta = file.metadata().map_err(open_err)?;
        let is_block_device = meta.file_type().is_block_device();
        let size = if is_block_device {
            block_device_size(&file).map_err(open_err)?
        } else {
            meta.len()
        };
        if options.cache == CacheMode::None && !size.is_multiple_of(ALIGN as u64) {
            return Err(DeviceError::UnalignedSize {
                path: path.to_path_buf(),
                size,
            });
        }
        let engine = engine::select(options.engine).map_err(open_err)?;
        tracing::info!(path = %path.display(), cache = %options.cache, engine = %engine.kind(),
            "backing device opened");
        Ok(FileDevice {
            file: Arc::new(file),
            path: path.to_path_buf(),
            size: AtomicU64::new(size),
            is_block_device,
            cache: options.cache,
            engine,
            blocks: Arc::default(),
            ring: OnceLock::new(),
        })
    }

    /// The path this device was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How this device uses the page cache.
    pub fn cache(&self) -> CacheMode {
        self.cache
    }

    /// The I/O engine in use.
    pub fn engine(&self) -> IoEngine {
        self.engine.kind()
    }

    fn direct(&self) -> bool {
        self.cache == CacheMode::None
    }

    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        let size = self.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(DeviceError::OutOfRange { offset, len, size }),
        }
    }

    fn io_err(op: &'static str, offset: u64, len: u64) -> impl FnOnce(io::Error) -> DeviceError {
        move |source| DeviceError::Io {
            op,
            offset,
            len,
            source,
        }
    }

    /// The lock a change of `[offset, offset + len)` needs (none without `O_DIRECT`).
    fn guard(&self, offset: u64, len: u64) -> Option<BlockGuard> {
        if !self.direct() {
            None
        } else if is_aligned(offset, len as usize) {
            Some(self.blocks.shared(stripes_of(offset, len)))
        } else {
            Some(self.blocks.exclusive(stripes_of(offset, len)))
        }
    }

    /// The shared ring for async callers: io_uring under `O_DIRECT`, inside a runtime.
    fn async_ring(&self) -> Option<&Arc<AsyncRing>> {
        if !self.direct() {
            return None;
        }
        let ops = self.engine.ring_opcodes()?;
        self.ring
            .get_or_init(|| match AsyncRing::start(ops) {
                Ok(ring) => ring,
                Err(e) => {
                    tracing::warn!(path = %self.path.display(), error = %e,
                        "cannot start a shared io_uring; this device's I/O uses the thread-pool engine");
                    None
                }
            })
            .as_ref()
    }

    /// Read exactly `len` bytes at `offset` into `ptr`.
    ///
    /// # Safety
    /// `ptr` is valid for writes of `len` bytes.
    unsafe fn read_full(&self, ptr: *mut u8, len: usize, offset: u64) -> io::Result<()> {
        // SAFETY: as vouched for by our caller.
        unsafe { read_all(&*self.engine, self.fd(), ptr, len, offset) }
    }

    fn write_full(&self, buf: &[u8], offset: u64, dsync: bool) -> io::Result<()> {
        write_all(&*self.engine, self.fd(), buf, offset, dsync)
    }

    /// Read the whole blocks covering `[offset, offset + len)` into an aligned buffer;
    /// returns it and where `offset` lies in it.
    fn read_blocks(&self, offset: u64, len: usize) -> io::Result<(AlignedBuf, usize)> {
        let start = align_down(offset);
        let end = align_up(offset + len as u64);
        let span = (end - start) as usize;
        let mut buf = AlignedBuf::uninit(span);
        // SAFETY: the buffer holds `span` writable bytes, all filled before `assume_filled`.
        let buf = unsafe {
            self.read_full(buf.as_mut_ptr(), span, start)?;
            buf.assume_filled()
        };
        Ok((buf, (offset - start) as usize))
    }

    /// Write `buf` at `offset` (range checked), honouring `O_DIRECT`'s alignment.
    fn write(
        &self,
        op: &'static str,
        buf: &[u8],
        offset: u64,
        dsync: bool,
    ) -> Result<(), DeviceError> {
        let len = buf.len() as u64;
        self.check_range(offset, len)?;
        let err = Self::io_err(op, offset, len);
        let _guard = self.guard(offset, len);
        if !self.direct() || aligned::is_aligned_slice(buf) && is_aligned(offset, buf.len()) {
            return self.write_full(buf, offset, dsync).map_err(err);
        }
        if is_aligned(offset, buf.len()) {
            let mut bounce = AlignedBufMut::with_capacity(buf.len());
            bytes::BufMut::put_slice(&mut bounce, buf);
            return self
                .write_full(&bounce.freeze(), offset, dsync)
                .map_err(err);
        }
        // Read-modify-write under the exclusive guard.
        let (mut blocks, at) = self
            .read_blocks(offset, buf.len())
            .map_err(Self::io_err(op, offset, len))?;
        blocks[at..at + buf.len()].copy_from_slice(buf);
        self.write_full(&blocks, align_down(offset), dsync)
            .map_err(err)
    }

    fn write_zero_bytes(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        let zeroes = AlignedBuf::zeroed(ZERO_CHUNK.min(len as usize));
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(zeroes.len() as u64) as usize;
            self.write("write zeroes", &zeroes[..n], offset + done, false)?;
            done += n as u64;
        }
        Ok(())
    }

    fn block_ioctl_range(&self, request: libc::c_ulong, offset: u64, len: u64) -> io::Result<()> {
        let range: [u64; 2] = [offset, len];
        // SAFETY: BLKZEROOUT reads a [u64; 2] that lives for the whole call.
        let rc = unsafe { libc::ioctl(self.fd(), request, range.as_ptr()) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

/// Read exactly `len` bytes at `offset` into `ptr` with `engine`.
///
/// # Safety
/// `ptr` is valid for writes of `len` bytes.
unsafe fn read_all(
    engine: &dyn Engine,
    fd: RawFd,
    ptr: *mut u8,
    len: usize,
    offset: u64,
) -> io::Result<()> {
    let mut done = 0usize;
    while done < len {
        // SAFETY: `ptr + done` stays within the `len` bytes the caller vouched for.
        let n = unsafe { engine.pread(fd, ptr.add(done), len - done, offset + done as u64) };
        match n {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Write all of `buf` at `offset` with `engine`, looping on short counts.
fn write_all(
    engine: &dyn Engine,
    fd: RawFd,
    buf: &[u8],
    offset: u64,
    dsync: bool,
) -> io::Result<()> {
    let mut done = 0usize;
    while done < buf.len() {
        match engine.pwrite(fd, &buf[done..], offset + done as u64, dsync) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

// Linux ioctl numbers from <linux/fs.h>: _IO(0x12, 127), _IOR(0x12, 114, u64).
const BLKZEROOUT: libc::c_ulong = 0x127f;
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

fn block_device_size(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 into the pointer we pass, which outlives the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if rc == 0 {
        Ok(size)
    } else {
        Err(io::Error::last_os_error())
    }
}

impl BackingDevice for FileDevice {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DeviceError> {
        let len = buf.len();
        self.check_range(offset, len as u64)?;
        let err = Self::io_err("read", offset, len as u64);
        if !self.direct() || aligned::is_aligned_slice(buf) && is_aligned(offset, len) {
            // SAFETY: `buf` is writable for its whole length.
            return unsafe { self.read_full(buf.as_mut_ptr(), len, offset) }.map_err(err);
        }
        let (blocks, at) = self.read_blocks(offset, len).map_err(err)?;
        buf.copy_from_slice(&blocks[at..at + len]);
        Ok(())
    }

    /// Reads into fresh aligned memory, never zero-filled, that becomes the `Bytes` as is.
    fn read_owned(&self, offset: u64, len: usize) -> Result<Bytes, DeviceError> {
        self.check_range(offset, len as u64)?;
        if self.direct() && !is_aligned(offset, len) {
            let (blocks, at) = self
                .read_blocks(offset, len)
                .map_err(Self::io_err("read", offset, len as u64))?;
            return Ok(Bytes::from_owner(blocks).slice(at..at + len));
        }
        let mut buf = AlignedBuf::uninit(len);
        // SAFETY: the buffer holds `len` writable bytes, all filled before `assume_filled`.
        let buf = unsafe {
            self.read_full(buf.as_mut_ptr(), len, offset)
                .map_err(Self::io_err("read", offset, len as u64))?;
            buf.assume_filled()
        };
        Ok(Bytes::from_owner(buf))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError> {
        self.write("write", buf, offset, false)
    }

    fn write_at_durable(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError> {
        self.write("write (FUA)", buf, offset, true)
    }

    fn flush(&self) -> Result<(), DeviceError> {
        self.engine
            .fdatasync(self.fd())
            .map_err(Self::io_err("flush", 0, 0))
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let _guard = self.guard(offset, len);
        if self.is_block_device {
            // A thin LV may or may not zero discarded blocks; zero-out keeps "reads as
            // zeroes" true and still unmaps on dm-thin.
            self.block_ioctl_range(BLKZEROOUT, offset, len)
                .map_err(Self::io_err("discard", offset, len))
        } else {
            self.engine
                .fallocate(
                    self.fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    offset,
                    len,
                )
                .map_err(Self::io_err("discard", offset, len))
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), DeviceError> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let fast = {
            let _guard = self.guard(offset, len);
            if self.is_block_device {
                // BLKZEROOUT promises zeroes; dm-thin unmaps whole blocks it zeroes anyway.
                self.block_ioctl_range(BLKZEROOUT, offset, len)
            } else if may_unmap {
                self.engine.fallocate(
                    self.fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    offset,
                    len,
                )
            } else {
                self.engine
                    .fallocate(self.fd(), libc::FALLOC_FL_ZERO_RANGE, offset, len)
            }
        };
        match fast {
            Ok(()) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY)
                ) =>
            {
                self.write_zero_bytes(offset, len)
            }
            Err(e) => Err(Self::io_err("write zeroes", offset, len)(e)),
        }
    }

    fn set_size(&self, size: u64) {
        self.size.store(size, Ordering::Release);
    }

    fn cached_writes(&self) -> bool {
        self.cache == CacheMode::Writeback
    }

    fn read_async(&self, offset: u64, len: usize) -> Option<DeviceFuture<Bytes>> {
        if len == 0 || !is_aligned(offset, len) || len > u32::MAX as usize {
            return None;
        }
        if let Err(e) = self.check_range(offset, len as u64) {
            return Some(Box::pin(std::future::ready(Err(e))));
        }
        let ring = self.async_ring().filter(|r| r.opcodes().read)?;
        let mut buf = AlignedBuf::uninit(len);
        let entry = opcode::Read::new(types::Fd(self.fd()), buf.as_mut_ptr(), len as u32)
            .offset(offset)
            .build();
        let rx = ring
            .submit(entry, Keep::Read(buf), Arc::clone(&self.file))
            .ok()?;
        let file = Arc::clone(&self.file);
        Some(Box::pin(async move {
            let err = Self::io_err("read", offset, len as u64);
            let (res, keep) = rx
                .await
                .map_err(|_| err(io::Error::other("io_uring completion lost")))?;
            let err = Self::io_err("read", offset, len as u64);
            match (res, keep) {
                (NOT_STARTED, Keep::Read(mut buf)) => {
                    let read = tokio::task::spawn_blocking(move || {
                        // SAFETY: `buf` holds `len` writable bytes.
                        unsafe {
                            read_all(&SyncEngine, file.as_raw_fd(), buf.as_mut_ptr(), len, offset)
                        }
                        // SAFETY: all `len` bytes were read.
                        .map(|()| Bytes::from_owner(unsafe { buf.assume_filled() }))
                    })
                    .await;
                    match read {
                        Ok(result) => result.map_err(err),
                        Err(join) => Err(err(io::Error::other(join))),
                    }
                }
                (res, _) if res < 0 => Err(err(io::Error::from_raw_os_error(-res))),
                (res, Keep::Read(buf)) if res as usize == len => {
                    // SAFETY: the kernel wrote all `len` bytes.
                    Ok(Bytes::from_owner(unsafe { buf.assume_filled() }))
                }
                _ => Err(err(io::ErrorKind::UnexpectedEof.into())),
            }
        }))
    }

    fn write_async(&self, offset: u64, data: &Bytes, fua: bool) -> Option<DeviceFuture<()>> {
        let len = data.len();
        if len == 0 || !is_aligned(offset, len) || len > u32::MAX as usize {
            return None;
        }
        if let Err(e) = self.check_range(offset, len as u64) {
            return Some(Box::pin(std::future::ready(Err(e))));
        }
        let ring = self.async_ring().filter(|r| r.opcodes().write)?;
        // Never wait on the runtime: a read-modify-write on these blocks sends us to the
        // blocking path, which waits for it.
        let guard = self.blocks.try_shared(stripes_of(offset, len as u64))?;
        let data = if aligned::is_aligned_slice(data) {
            data.clone()
        } else {
            let mut bounce = AlignedBufMut::with_capacity(len);
            bytes::BufMut::put_slice(&mut bounce, data);
            bounce.freeze()
        };
        let flags = if fua { libc::RWF_DSYNC } else { 0 };
        let entry = opcode::Write::new(types::Fd(self.fd()), data.as_ptr(), len as u32)
            .offset(offset)
            .rw_flags(flags)
            .build();
        let keep = Keep::Write(data, guard);
        let rx = ring.submit(entry, keep, Arc::clone(&self.file)).ok()?;
        let file = Arc::clone(&self.file);
        let op = if fua { "write (FUA)" } else { "write" };
        Some(Box::pin(async move {
            let err = Self::io_err(op, offset, len as u64);
            let (res, keep) = rx
                .await
                .map_err(|_| err(io::Error::other("io_uring completion lost")))?;
            let err = Self::io_err(op, offset, len as u64);
            let Keep::Write(data, guard) = keep else {
                return Err(err(io::Error::other("io_uring completion mismatched")));
            };
            let done = match res {
                NOT_STARTED => 0,
                res if res < 0 => return Err(err(io::Error::from_raw_os_error(-res))),
                res => res as usize,
            };
            if done == len {
                return Ok(());
            }
            // Not started, or a short write: the rest on a blocking thread, still under the
            // block guard.
            let rest = tokio::task::spawn_blocking(move || {
                let _guard = guard;
                write_all(
                    &SyncEngine,
                    file.as_raw_fd(),
                    &data[done..],
                    offset + done as u64,
                    fua,
                )
            })
            .await;
            match rest {
                Ok(result) => result.map_err(err),
                Err(join) => Err(err(io::Error::other(join))),
            }
        }))
    }

    fn flush_async(&self) -> Option<DeviceFuture<()>> {
        let ring = self.async_ring().filter(|r| r.opcodes().fsync)?;
        let entry = opcode::Fsync::new(types::Fd(self.fd()))
            .flags(types::FsyncFlags::DATASYNC)
            .build();
        let rx = ring
            .submit(entry, Keep::Nothing, Arc::clone(&self.file))
            .ok()?;
        let file = Arc::clone(&self.file);
        Some(Box::pin(async move {
            let err = Self::io_err("flush", 0, 0);
            let (res, _) = rx
                .await
                .map_err(|_| err(io::Error::other("io_uring completion lost")))?;
            let err = Self::io_err("flush", 0, 0);
            if res == NOT_STARTED {
                let flushed =
                    tokio::task::spawn_blocking(move || SyncEngine.fdatasync(file.as_raw_fd()))
                        .await;
                return match flushed {
                    Ok(result) => result.map_err(err),
                    Err(join) => Err(err(io::Error::other(join))),
                };
            }
            if res < 0 {
                return Err(Self::io_err("flush", 0, 0)(io::Error::from_raw_os_error(
                    -res,
                )));
            }
            Ok(())
        }))
    }
}

impl Drop for FileDevice {
    fn drop(&mut self) {
        if let Some(Some(ring)) = self.ring.get() {
            ring.close();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every cache mode with every engine: the conformance suite below runs on each.
    const ALL: [DeviceOptions; 4] = [
        DeviceOptions {
            cache: CacheMode::None,
            engine: EngineChoice::IoUring,
        },
        DeviceOptions {
            cache: CacheMode::None,
            engine: EngineChoice::ThreadPool,
        },
        DeviceOptions {
            cache: CacheMode::Writeback,
            engine: EngineChoice::IoUring,
        },
        DeviceOptions {
            cache: CacheMode::Writeback,
            engine: EngineChoice::ThreadPool,
        },
    ];

    fn device_with(size: u64, options: DeviceOptions) -> (tempfile::TempDir, FileDevice) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        File::create(&path).unwrap().set_len(size).unwrap();
        let dev = FileDevice::open_with(&path, options).unwrap();
        assert_eq!(dev.cache(), options.cache);
        let expected = match options.engine {
            EngineChoice::ThreadPool => IoEngine::ThreadPool,
            _ => IoEngine::IoUring,
        };
        assert_eq!(dev.engine(), expected, "{options:?}");
        (dir, dev)
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn write_then_read_returns_the_same_bytes() {
        for options in ALL {
            let (_dir, dev) = device_with(1 << 20, options);
            let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
            dev.write_at(&data, 4096).unwrap();
            let mut back = vec![0u8; data.len()];
            dev.read_at(&mut back, 4096).unwrap();
            assert_eq!(back, data, "{options:?}");
            dev.write_at_durable(&data, 65536).unwrap();
            dev.flush().unwrap();
            assert_eq!(
                dev.read_owned(65536, data.len()).unwrap(),
                data,
                "{options:?}"
            );
        }
    }

    #[test]
    fn requests_past_the_end_are_refused() {
        for options in ALL {
            let (_dir, dev) = device_with(8192, options);
            let mut buf = [0u8; 4096];
            assert!(matches!(
                dev.read_at(&mut buf, 8192),
                Err(DeviceError::OutOfRange { .. })
            ));
            assert!(matches!(
                dev.write_at(&buf, u64::MAX - 10),
                Err(DeviceError::OutOfRange { .. })
            ));
            assert!(matches!(
                dev.read_owned(4097, 4096),
                Err(DeviceError::OutOfRange { .. })
            ));
        }
    }

    #[test]
    fn discard_and_write_zeroes_read_back_as_zeroes() {
        for options in ALL {
            let (_dir, dev) = device_with(1 << 20, options);
            dev.write_at(&[0xAB; 65536], 0).unwrap();
            dev.discard(0, 16384).unwrap();
            dev.write_zeroes(16384, 16384, false).unwrap();
            dev.write_zeroes(32768, 4096, true).unwrap();
            let mut back = vec![0xFFu8; 65536];
            dev.read_at(&mut back, 0).unwrap();
            assert!(back[..36864].iter().all(|&b| b == 0), "{options:?}");
            assert!(back[36864..].iter().all(|&b| b == 0xAB), "{options:?}");
        }
    }

    /// NBD clients may send any offset and length: under O_DIRECT they are widened to
    /// blocks (read-modify-write), and the bytes around them must survive.
    #[test]
    fn unaligned_requests_read_and_write_exactly_their_bytes() {
        for options in ALL {
            let (_dir, dev) = device_with(1 << 20, options);
            let base = pattern(3 * 4096, 7);
            dev.write_at(&base, 0).unwrap();
            let mut expected = base.clone();
            for (offset, len, seed) in [(1, 1, 1u8), (511, 700, 2), (4000, 5000, 3), (8191, 1, 4)] {
                let data = pattern(len, seed);
                if seed % 2 == 0 {
                    dev.write_at_durable(&data, offset as u64).unwrap();
                } else {
                    dev.write_at(&data, offset as u64).unwrap();
                }
                expected[offset..offset + len].copy_from_slice(&data);
            }
            // Aligned offset and length, but memory that is not aligned: a bounce copy.
            let unaligned_memory = pattern(4097, 9);
            dev.write_at(&unaligned_memory[1..], 8192).unwrap();
            expected[8192..12288].copy_from_slice(&unaligned_memory[1..]);
            let mut back = vec![0u8; expected.len()];
            dev.read_at(&mut back, 0).unwrap();
            assert_eq!(back, expected, "{options:?}");
            for (offset, len) in [(3, 5), (4095, 2), (100, 8000), (4096, 4096)] {
                let got = dev.read_owned(offset as u64, len).unwrap();
                assert_eq!(&got[..], &expected[offset..offset + len], "{options:?}");
                let mut odd = vec![0u8; len + 1];
                dev.read_at(&mut odd[1..], offset as u64).unwrap();
                assert_eq!(&odd[1..], &expected[offset..offset + len], "{options:?}");
            }
            dev.write_zeroes(10, 20, false).unwrap();
            dev.discard(4000, 200).unwrap();
            expected[10..30].fill(0);
            expected[4000..4200].fill(0);
            dev.read_at(&mut back, 0).unwrap();
            assert_eq!(back, expected, "{options:?}");
        }
    }

    /// Writes that share a block but not a byte, issued concurrently, all land: the
    /// read-modify-write of one never puts back stale bytes of another.
    #[test]
    fn concurrent_unaligned_writes_in_one_block_keep_every_byte() {
        for options in ALL.iter().filter(|o| o.cache == CacheMode::None) {
            let (_dir, dev) = device_with(1 << 20, *options);
            let dev = Arc::new(dev);
            let threads: Vec<_> = (0..8u8)
                .map(|t| {
                    let dev = Arc::clone(&dev);
                    std::thread::spawn(move || {
                        for round in 0..50u8 {
                            let piece = [t.wrapping_mul(16).wrapping_add(round); 512];
                            if t == 7 {
                                // Its neighbour 3584..4096 is zeroed, as a whole piece.
                                dev.write_zeroes(3584, 512, false).unwrap();
                            } else {
                                dev.write_at(&piece, u64::from(t) * 512).unwrap();
                            }
                        }
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
            let back = dev.read_owned(0, 4096).unwrap();
            for t in 0..7u8 {
                let want = t.wrapping_mul(16).wrapping_add(49);
                let got = &back[usize::from(t) * 512..usize::from(t + 1) * 512];
                assert!(got.iter().all(|&b| b == want), "piece {t}: {options:?}");
            }
            assert!(back[3584..].iter().all(|&b| b == 0));
        }
    }

    /// `cache = "none"` leaves nothing of the written data in the host page cache.
    #[test]
    fn direct_writes_leave_no_page_cache() {
        let (dir, dev) = device_with(
            8 << 20,
            DeviceOptions {
                cache: CacheMode::None,
                engine: EngineChoice::Auto,
            },
        );
        let data = AlignedBuf::zeroed(1 << 20);
        for i in 0..8 {
            dev.write_at(&data, i << 20).unwrap();
        }
        dev.flush().unwrap();
        let resident = resident_pages(&dir.path().join("disk"));
        assert_eq!(resident, 0, "pages of the backing file in the page cache");
    }

    fn resident_pages(path: &Path) -> usize {
        let file = File::open(path).unwrap();
        let len = file.metadata().unwrap().len() as usize;
        let page = 4096;
        // SAFETY: a read-only shared mapping of a file we keep open; mincore only reads it.
        unsafe {
            let map = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            );
            assert_ne!(map, libc::MAP_FAILED);
            let mut vec = vec![0u8; len.div_ceil(page)];
            assert_eq!(libc::mincore(map, len, vec.as_mut_ptr()), 0);
            libc::munmap(map, len);
            vec.iter().filter(|&&b| b & 1 == 1).count()
        }
    }

    /// A ramfs mounted on a temporary directory (root only; CI runs as root), unmounted on
    /// drop. ramfs has no O_DIRECT on every kernel (tmpfs gained it in Linux 6.6).
    struct Ramfs(tempfile::TempDir);

    impl Ramfs {
        fn mount() -> Ramfs {
            let dir = tempfile::tempdir().unwrap();
            let status = std::process::Command::new("mount")
                .args(["-t", "ramfs", "ramfs"])
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(status.success(), "mount -t ramfs (needs root)");
            Ramfs(dir)
        }
    }

    impl Drop for Ramfs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(self.0.path())
                .status();
        }
    }

    #[test]
    fn cache_none_is_refused_where_o_direct_fails() {
        let ramfs = Ramfs::mount();
        let path = ramfs.0.path().join("disk");
        File::create(&path).unwrap().set_len(1 << 20).unwrap();
        let e = FileDevice::open(&path).unwrap_err();
        assert!(matches!(e, DeviceError::DirectUnsupported { .. }), "{e:?}");
        assert!(e.to_string().contains("cache = \"writeback\""), "{e}");
        let dev = FileDevice::open_with(
            &path,
            DeviceOptions {
                cache: CacheMode::Writeback,
                engine: EngineChoice::Auto,
            },
        )
        .unwrap();
        assert!(dev.cached_writes());
        dev.write_at(&[1; 4096], 0).unwrap();
        assert_eq!(dev.read_owned(0, 4096).unwrap(), vec![1u8; 4096]);
    }

    #[test]
    fn cache_none_refuses_a_size_of_partial_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        File::create(&path).unwrap().set_len(4096 + 512).unwrap();
        assert!(matches!(
            FileDevice::open(&path),
            Err(DeviceError::UnalignedSize { size: 4608, .. })
        ));
    }

    /// Aligned reads under O_DIRECT with io_uring wait for the disk on the runtime; the
    /// thread-pool engine, writeback and unaligned requests decline (the caller blocks).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn async_reads_on_the_shared_ring() {
        let (_dir, dev) = device_with(
            1 << 20,
            DeviceOptions {
                cache: CacheMode::None,
                engine: EngineChoice::IoUring,
            },
        );
        let dev = Arc::new(dev);
        for i in 0..64u8 {
            dev.write_at(&pattern(4096, i), u64::from(i) * 4096)
                .unwrap();
        }
        let reads: Vec<_> = (0..64u8)
            .map(|i| {
                let read = dev
                    .read_async(u64::from(i) * 4096, 4096)
                    .expect("an aligned read goes async");
                tokio::spawn(read)
            })
            .collect();
        for (i, read) in reads.into_iter().enumerate() {
            let got = read.await.unwrap().unwrap();
            assert_eq!(got, pattern(4096, i as u8), "block {i}");
            assert_eq!(got.as_ptr() as usize % ALIGN, 0);
        }
        let big = dev.read_async(0, 64 * 4096).unwrap().await.unwrap();
        assert_eq!(big, dev.read_owned(0, 64 * 4096).unwrap());
        // Out of range: refused at once.
        assert!(matches!(
            dev.read_async(1 << 20, 4096).unwrap().await,
            Err(DeviceError::OutOfRange { .. })
        ));
        // Unaligned offset or length: the caller takes the blocking path.
        assert!(dev.read_async(512, 4096).is_none());
        assert!(dev.read_async(0, 1000).is_none());

        for options in [ALL[1], ALL[2]] {
            let (_dir, other) = device_with(1 << 20, options);
            assert!(other.read_async(0, 4096).is_none(), "{options:?}");
        }
    }

    /// Rings that cannot be set up (EMFILE here, forced on this thread): every operation
    /// still succeeds, on the thread-pool engine, and the async calls decline.
    #[tokio::test(flavor = "current_thread")]
    async fn ring_setup_failure_falls_back_to_the_thread_pool() {
        engine_uring::REFUSE_SETUP.with(|r| r.set(true));
        for options in [ALL[0], ALL[2]] {
            let (_dir, dev) = device_with(1 << 20, options);
            let data = Bytes::from(pattern(8192, 5));
            assert!(dev.write_async(0, &data, true).is_none(), "{options:?}");
            assert!(dev.read_async(0, 4096).is_none(), "{options:?}");
            assert!(dev.flush_async().is_none(), "{options:?}");
            dev.write_at(&data, 4096).unwrap();
            dev.write_at(&data[..100], 10).unwrap();
            dev.flush().unwrap();
            dev.write_zeroes(65536, 4096, false).unwrap();
            dev.discard(0, 4096).unwrap();
            let mut expected = vec![0u8; 4096];
            expected.extend_from_slice(&data);
            assert_eq!(dev.read_owned(0, 12288).unwrap(), expected, "{options:?}");
        }
        engine_uring::REFUSE_SETUP.with(|r| r.set(false));
    }

    /// Aligned writes, FUA writes and flushes on the shared ring; unaligned ones decline.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn async_writes_and_flushes_on_the_shared_ring() {
        let (_dir, dev) = device_with(1 << 20, ALL[0]);
        let dev = Arc::new(dev);
        let writes: Vec<_> = (0..64u8)
            .map(|i| {
                let data = Bytes::from(pattern(4096, i));
                let write = dev
                    .write_async(u64::from(i) * 4096, &data, i % 2 == 0)
                    .expect("an aligned write goes async");
                tokio::spawn(write)
            })
            .collect();
        for write in writes {
            write.await.unwrap().unwrap();
        }
        dev.flush_async().expect("flush goes async").await.unwrap();
        for i in 0..64u8 {
            assert_eq!(
                dev.read_owned(u64::from(i) * 4096, 4096).unwrap(),
                pattern(4096, i)
            );
        }
        let data = Bytes::from(pattern(4096, 1));
        assert!(dev.write_async(512, &data, false).is_none());
        assert!(dev.write_async(0, &data.slice(..1000), false).is_none());
        assert!(matches!(
            dev.write_async(1 << 20, &data, false).unwrap().await,
            Err(DeviceError::OutOfRange { .. })
        ));
        // Unaligned memory: bounced into aligned memory, then written.
        let odd = Bytes::from(pattern(4097, 3)).slice(1..);
        dev.write_async(8192, &odd, false).unwrap().await.unwrap();
        assert_eq!(dev.read_owned(8192, 4096).unwrap(), odd);
    }

    /// A failed `io_uring_enter` on the shared ring (forced on this thread): the request
    /// that met it declines (its caller takes the blocking path) or, queued for a deferred
    /// enter, runs on the thread-pool engine; requests already in the kernel complete, and
    /// later requests decline too: the ring is dead, never hung.
    #[tokio::test(flavor = "current_thread")]
    async fn a_failed_submission_leaves_no_request_waiting() {
        let (_dir, dev) = device_with(1 << 20, ALL[0]);
        dev.write_at(&pattern(8192, 4), 0).unwrap();
        engine_uring::DEFER_WHEN_BUSY.with(|d| d.set(true));
        let before = dev.read_async(0, 4096).expect("ring works");
        engine_uring::REFUSE_SUBMIT.with(|r| r.set(true));
        let data = Bytes::from(pattern(4096, 6));
        match dev.write_async(4096, &data, false) {
            // It entered the kernel itself and met the failure: declined.
            None => dev.write_at(&data, 4096).unwrap(),
            // Queued behind the read (the disk was busy): the deferred enter, on this
            // thread, failed, and the write ran on the thread-pool engine.
            Some(write) => write.await.unwrap(),
        }
        engine_uring::REFUSE_SUBMIT.with(|r| r.set(false));
        engine_uring::DEFER_WHEN_BUSY.with(|d| d.set(false));
        assert_eq!(before.await.unwrap(), pattern(4096, 4));
        assert!(dev.read_async(0, 4096).is_none(), "a dead ring declines");
        assert_eq!(dev.read_owned(4096, 4096).unwrap(), data);
    }

    /// Requests queued behind another thread's `io_uring_enter`, which then fails, never
    /// reached the kernel: their waiters run them on the thread-pool engine and succeed,
    /// while the thread whose enter failed declines its own request.
    #[tokio::test(flavor = "current_thread")]
    async fn requests_queued_behind_a_failed_submission_run_on_the_thread_pool() {
        let (_dir, dev) = device_with(1 << 20, ALL[0]);
        dev.write_at(&pattern(8192, 4), 0).unwrap();
        let ring = Arc::clone(dev.async_ring().expect("ring works"));
        ring.hold_submissions(true);
        let read = dev.read_async(0, 4096).expect("queued");
        let data = Bytes::from(pattern(4096, 6));
        let write = dev.write_async(4096, &data, true).expect("queued");
        let flush = dev.flush_async().expect("queued");
        ring.hold_submissions(false);
        engine_uring::REFUSE_SUBMIT.with(|r| r.set(true));
        assert!(
            dev.read_async(0, 4096).is_none(),
            "the failed submitter declines"
        );
        engine_uring::REFUSE_SUBMIT.with(|r| r.set(false));
        assert_eq!(read.await.unwrap(), pattern(4096, 4));
        write.await.unwrap();
        flush.await.unwrap();
        assert_eq!(dev.read_owned(4096, 4096).unwrap(), data);
        assert!(dev.read_async(0, 4096).is_none(), "a dead ring declines");
    }

    #[test]
    fn config_words_round_trip() {
        for mode in [CacheMode::None, CacheMode::Writeback] {
            assert_eq!(mode.to_string().parse::<CacheMode>(), Ok(mode));
        }
        for choice in [
            EngineChoice::Auto,
            EngineChoice::IoUring,
            EngineChoice::ThreadPool,
        ] {
            assert_eq!(choice.to_string().parse::<EngineChoice>(), Ok(choice));
        }
        assert!("direct".parse::<CacheMode>().is_err());
    }
}
