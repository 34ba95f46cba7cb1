//! Reflink copies (`ioctl(FICLONE)`): a new file sharing every block of another, made in
//! constant time on XFS (`reflink=1`) and btrfs. There is deliberately no fallback to a
//! byte copy: a file system without reflink is reported as such ([`CloneError::Unsupported`]).
//!
//! [`clone_to_new`] is crash-safe: the clone is made under a temporary name in the target's
//! directory, fsynced, then moved to its name, so a crash leaves either no target or a
//! complete one (and possibly a `.tmp` file, which the next attempt replaces).

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Why a reflink copy failed.
#[derive(Debug, thiserror::Error)]
pub enum CloneError {
    /// The file system cannot share blocks between files.
    #[error("the file system has no reflink")]
    Unsupported,
    /// The target exists already (nothing was touched).
    #[error("the target exists")]
    Exists,
    /// The source does not exist.
    #[error("the source does not exist")]
    SourceMissing,
    /// Another file system call failed.
    #[error("cannot {op}")]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

fn io(op: &'static str) -> impl FnOnce(io::Error) -> CloneError {
    move |source| CloneError::Io { op, source }
}

/// Make `dst` a reflink of `src`; `dst` must not exist. With `replace`, an existing `dst`
/// is atomically replaced instead (rollback). Both files and the directory are fsynced.
pub fn clone_to_new(src: &Path, dst: &Path, replace: bool) -> Result<(), CloneError> {
    let source = match File::open(src) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(CloneError::SourceMissing),
        Err(e) => return Err(io("open the source")(e)),
    };
    if !replace && dst.exists() {
        return Err(CloneError::Exists);
    }
    let dir = dst.parent().unwrap_or(Path::new("."));
    let tmp = tmp_path(dst);
    let _ = fs::remove_file(&tmp);
    let target = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(io("create the clone"))?;
    let made = ficlone(&target, &source)
        .and_then(|()| target.sync_all().map_err(io("sync the clone")))
        .and_then(|()| rename(&tmp, dst, replace))
        .and_then(|()| sync_dir(dir));
    if made.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    made
}

/// The temporary name `.<name>.tmp` a clone to `dst` is made under.
pub(super) fn tmp_path(dst: &Path) -> std::path::PathBuf {
    let mut name = std::ffi::OsString::from(".");
    name.push(dst.file_name().unwrap_or_default());
    name.push(".tmp");
    dst.with_file_name(name)
}

fn ficlone(target: &File, source: &File) -> Result<(), CloneError> {
    // SAFETY: both descriptors are open for the call's duration; FICLONE takes an fd value.
    let rc = unsafe { libc::ioctl(target.as_raw_fd(), libc::FICLONE, source.as_raw_fd()) };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) | Some(libc::EINVAL) | Some(libc::EXDEV) => {
            Err(CloneError::Unsupported)
        }
        _ => Err(io("reflink")(e)),
    }
}

fn rename(from: &Path, to: &Path, replace: bool) -> Result<(), CloneError> {
    rename_at(from, to, !replace).map_err(|e| {
        if e.kind() == io::ErrorKind::AlreadyExists {
            CloneError::Exists
        } else {
            io("move the clone into place")(e)
        }
    })
}

/// `renameat2(2)`: atomic; with `noreplace`, an existing `to` is never replaced (it fails
/// with `AlreadyExists`), which a plain `rename(2)` would do.
pub(super) fn rename_at(from: &Path, to: &Path, noreplace: bool) -> io::Result<()> {
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
    };
    let (c_from, c_to) = (c(from)?, c(to)?);
    let flags = if noreplace { libc::RENAME_NOREPLACE } else { 0 };
    // SAFETY: both pointers are valid NUL-terminated strings for the call's duration.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            c_from.as_ptr(),
            libc::AT_FDCWD,
            c_to.as_ptr(),
            flags,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn sync_dir(dir: &Path) -> Result<(), CloneError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("sync the directory"))
}
