//! The backing device: the local disk a replica lives on.
//!
//! ```text
//! BackingDevice (trait: size, read_at, write_at, flush, discard, write_zeroes, set_size)
//!   └── FileDevice (a regular file or a block device, positional I/O on one descriptor)
//! ```
//!
//! The engine never assumes what is behind the trait: the `file` pool hands out sparse
//! files, the `lvm-thin` pool hands out `/dev/<vg>/<lv>` block devices, and both are opened
//! as a [`FileDevice`]. All methods are blocking and thread-safe (`&self`); async callers run
//! them on a blocking thread pool.
//!
//! Durability contract: `write_at` may leave data in a volatile cache; data is durable only
//! after `flush` returns, or immediately when written with `write_at_durable`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

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
            DeviceError::Open { source, .. } | DeviceError::Io { source, .. } => {
                source.raw_os_error().unwrap_or(libc::EIO)
            }
            DeviceError::OutOfRange { .. } => libc::EINVAL,
        }
    }
}

/// A replica's local disk, addressed in bytes.
pub trait BackingDevice: Send + Sync + 'static {
    /// Current size in bytes.
    fn size(&self) -> u64;
    /// Read exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DeviceError>;
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
    /// block device opened without `O_DIRECT`), so it returns in microseconds unless the
    /// kernel throttles dirty pages. The data path then applies small writes without a
    /// thread hand-off (`crate::datapath::write_is_inline`).
    fn cached_writes(&self) -> bool {
        false
    }
}

/// Positional I/O on a regular file or a block device.
#[derive(Debug)]
pub struct FileDevice {
    file: File,
    path: PathBuf,
    size: AtomicU64,
    is_block_device: bool,
}

const ZERO_CHUNK: usize = 1 << 20;

impl FileDevice {
    /// Open `path` for reading and writing. Its size is the file length or the block device
    /// size.
    pub fn open(path: &Path) -> Result<Self, DeviceError> {
        let open_err = |source| DeviceError::Open {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        let is_block_device = meta.file_type().is_block_device();
        let size = if is_block_device {
            block_device_size(&file).map_err(open_err)?
        } else {
            meta.len()
        };
        Ok(FileDevice {
            file,
            path: path.to_path_buf(),
            size: AtomicU64::new(size),
            is_block_device,
        })
    }

    /// The path this device was opened from.
    pub fn path(&self) -> &Path {
        &self.path
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

    fn write_zero_bytes(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        let zeroes = vec![0u8; ZERO_CHUNK.min(len as usize)];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(zeroes.len() as u64) as usize;
            self.file
                .write_all_at(&zeroes[..n], offset + done)
                .map_err(Self::io_err("write zeroes", offset, len))?;
            done += n as u64;
        }
        Ok(())
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: fallocate only reads its integer arguments; the descriptor is owned by self.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                mode,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn block_ioctl_range(&self, request: libc::c_ulong, offset: u64, len: u64) -> io::Result<()> {
        let range: [u64; 2] = [offset, len];
        // SAFETY: BLKZEROOUT reads a [u64; 2] that lives for the whole call.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), request, range.as_ptr()) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
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
        self.check_range(offset, buf.len() as u64)?;
        self.file
            .read_exact_at(buf, offset)
            .map_err(Self::io_err("read", offset, buf.len() as u64))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError> {
        self.check_range(offset, buf.len() as u64)?;
        self.file
            .write_all_at(buf, offset)
            .map_err(Self::io_err("write", offset, buf.len() as u64))
    }

    fn write_at_durable(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError> {
        self.write_at(buf, offset)?;
        self.file
            .sync_data()
            .map_err(Self::io_err("write (FUA)", offset, buf.len() as u64))
    }

    fn flush(&self) -> Result<(), DeviceError> {
        self.file.sync_data().map_err(Self::io_err("flush", 0, 0))
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if self.is_block_device {
            // A thin LV may or may not zero discarded blocks; zero-out keeps "reads as
            // zeroes" true and still unmaps on dm-thin.
            self.block_ioctl_range(BLKZEROOUT, offset, len)
                .map_err(Self::io_err("discard", offset, len))
        } else {
            self.fallocate(
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
        let fast = if self.is_block_device {
            // BLKZEROOUT promises zeroes; dm-thin unmaps whole blocks it zeroes anyway.
            self.block_ioctl_range(BLKZEROOUT, offset, len)
        } else if may_unmap {
            self.fallocate(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            )
        } else {
            self.fallocate(libc::FALLOC_FL_ZERO_RANGE, offset, len)
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

    /// Opened without `O_DIRECT`.
    fn cached_writes(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(size: u64) -> (tempfile::TempDir, FileDevice) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        File::create(&path).unwrap().set_len(size).unwrap();
        let dev = FileDevice::open(&path).unwrap();
        (dir, dev)
    }

    #[test]
    fn write_then_read_returns_the_same_bytes() {
        let (_dir, dev) = device(1 << 20);
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        dev.write_at(&data, 4096).unwrap();
        let mut back = vec![0u8; data.len()];
        dev.read_at(&mut back, 4096).unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn requests_past_the_end_are_refused() {
        let (_dir, dev) = device(8192);
        let mut buf = [0u8; 4096];
        assert!(matches!(
            dev.read_at(&mut buf, 8192),
            Err(DeviceError::OutOfRange { .. })
        ));
        assert!(matches!(
            dev.write_at(&buf, u64::MAX - 10),
            Err(DeviceError::OutOfRange { .. })
        ));
    }

    #[test]
    fn discard_and_write_zeroes_read_back_as_zeroes() {
        let (_dir, dev) = device(1 << 20);
        dev.write_at(&[0xAB; 65536], 0).unwrap();
        dev.discard(0, 16384).unwrap();
        dev.write_zeroes(16384, 16384, false).unwrap();
        dev.write_zeroes(32768, 4096, true).unwrap();
        let mut back = vec![0xFFu8; 65536];
        dev.read_at(&mut back, 0).unwrap();
        assert!(back[..36864].iter().all(|&b| b == 0));
        assert!(back[36864..].iter().all(|&b| b == 0xAB));
    }
}
