//! The `file` pool: one sparse file `<path>/<volume>.img` per volume.
//!
//! Allocation is `set_len` on a newly created file (no blocks are written, so a 1 TiB
//! volume costs nothing until written); discard punches holes (done by
//! `replication::device::FileDevice`). Creating uses `O_EXCL`, so existing data is never
//! truncated; every change is followed by an fsync of the file and the directory.
//! Usage is that of the file system holding `path` (like `df`).

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::{Pool, PoolError, PoolUsage, StoredVolume};

const SUFFIX: &str = ".img";

/// A directory of sparse image files.
pub struct FilePool {
    name: String,
    dir: PathBuf,
}

impl FilePool {
    pub fn new(name: &str, dir: PathBuf) -> Self {
        FilePool {
            name: name.to_string(),
            dir,
        }
    }

    fn io(&self, op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> PoolError {
        let pool = self.name.clone();
        let path = path.to_path_buf();
        move |source| PoolError::Io {
            pool,
            op,
            path,
            source,
        }
    }

    fn sync_dir(&self) -> Result<(), PoolError> {
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(self.io("sync directory", &self.dir))
    }
}

impl Pool for FilePool {
    fn name(&self) -> &str {
        &self.name
    }

    fn backend(&self) -> &'static str {
        "file"
    }

    /// Creates the directory if needed (the `file` pool is the zero-setup default).
    fn open_check(&self) -> Result<(), PoolError> {
        fs::create_dir_all(&self.dir).map_err(self.io("create directory", &self.dir))?;
        if !self.dir.is_dir() {
            return Err(PoolError::Unavailable {
                pool: self.name.clone(),
                message: format!("{} is not a directory", self.dir.display()),
            });
        }
        Ok(())
    }

    fn usage(&self) -> Result<PoolUsage, PoolError> {
        let stats = statvfs(&self.dir).map_err(self.io("stat file system of", &self.dir))?;
        let total = stats.f_blocks.saturating_mul(stats.f_frsize);
        let free = stats.f_bavail.saturating_mul(stats.f_frsize);
        let used = stats
            .f_blocks
            .saturating_sub(stats.f_bfree)
            .saturating_mul(stats.f_frsize);
        Ok(PoolUsage {
            total_bytes: total,
            used_bytes: used,
            free_bytes: free,
        })
    }

    fn check_name(&self, _volume: &str) -> Result<(), PoolError> {
        Ok(())
    }

    fn create(&self, volume: &str, size: u64) -> Result<u64, PoolError> {
        let path = self.device_path(volume);
        let file = match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(PoolError::Exists {
                    pool: self.name.clone(),
                    volume: volume.to_string(),
                })
            }
            Err(e) => return Err(self.io("create", &path)(e)),
        };
        let sized = file
            .set_len(size)
            .and_then(|()| file.sync_all())
            .map_err(self.io("allocate", &path));
        if let Err(e) = sized.and_then(|()| self.sync_dir()) {
            drop(file);
            let _ = fs::remove_file(&path);
            let _ = self.sync_dir();
            return Err(e);
        }
        Ok(size)
    }

    fn grow(&self, volume: &str, new_size: u64) -> Result<u64, PoolError> {
        let path = self.device_path(volume);
        let file = match OpenOptions::new().write(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(PoolError::Missing {
                    pool: self.name.clone(),
                    volume: volume.to_string(),
                })
            }
            Err(e) => return Err(self.io("open", &path)(e)),
        };
        let current = file.metadata().map_err(self.io("stat", &path))?.len();
        if new_size > current {
            file.set_len(new_size)
                .and_then(|()| file.sync_all())
                .map_err(self.io("grow", &path))?;
        }
        Ok(new_size.max(current))
    }

    fn delete(&self, volume: &str) -> Result<(), PoolError> {
        let path = self.device_path(volume);
        match fs::remove_file(&path) {
            Ok(()) => self.sync_dir(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(PoolError::Missing {
                pool: self.name.clone(),
                volume: volume.to_string(),
            }),
            Err(e) => Err(self.io("remove", &path)(e)),
        }
    }

    /// `renameat2(RENAME_NOREPLACE)`: atomic (a crash leaves one of the two names), and
    /// the new name never replaces an existing file (a plain `rename(2)` would).
    fn rename(&self, from: &str, to: &str) -> Result<(), PoolError> {
        use std::os::unix::ffi::OsStrExt;
        let old = self.device_path(from);
        let new = self.device_path(to);
        let c = |p: &Path| {
            std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|_| PoolError::BadName {
                pool: self.name.clone(),
                message: format!("path {} contains a NUL byte", p.display()),
            })
        };
        let (c_old, c_new) = (c(&old)?, c(&new)?);
        // SAFETY: both pointers are valid NUL-terminated strings for the call's duration.
        let rc = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                c_old.as_ptr(),
                libc::AT_FDCWD,
                c_new.as_ptr(),
                libc::RENAME_NOREPLACE,
            )
        };
        if rc != 0 {
            let e = io::Error::last_os_error();
            return Err(match e.kind() {
                io::ErrorKind::NotFound => PoolError::Missing {
                    pool: self.name.clone(),
                    volume: from.to_string(),
                },
                io::ErrorKind::AlreadyExists => PoolError::Exists {
                    pool: self.name.clone(),
                    volume: to.to_string(),
                },
                _ => self.io("rename", &old)(e),
            });
        }
        self.sync_dir()
    }

    fn device_path(&self, volume: &str) -> PathBuf {
        self.dir.join(format!("{volume}{SUFFIX}"))
    }

    fn list(&self) -> Result<Vec<StoredVolume>, PoolError> {
        let mut found = Vec::new();
        let entries = fs::read_dir(&self.dir).map_err(self.io("list", &self.dir))?;
        for entry in entries {
            let entry = entry.map_err(self.io("list", &self.dir))?;
            let file_name = entry.file_name();
            let Some(name) = file_name
                .to_str()
                .and_then(|n| n.strip_suffix(SUFFIX))
                .filter(|n| !n.is_empty())
            else {
                continue;
            };
            let meta = entry.metadata().map_err(self.io("stat", &entry.path()))?;
            if meta.is_file() {
                found.push(StoredVolume {
                    name: name.to_string(),
                    size_bytes: meta.len(),
                });
            }
        }
        found.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(found)
    }
}

fn statvfs(path: &Path) -> io::Result<libc::statvfs> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    // SAFETY: statvfs is plain old data; an all-zero value is valid.
    let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c_path is a valid NUL-terminated string and stats outlives the call.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), &mut stats) };
    if rc == 0 {
        Ok(stats)
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn pool() -> (tempfile::TempDir, FilePool) {
        let dir = tempfile::tempdir().unwrap();
        let pool = FilePool::new("files", dir.path().join("images"));
        pool.open_check().unwrap();
        (dir, pool)
    }

    #[test]
    fn create_grow_list_delete() {
        let (_dir, pool) = pool();
        assert_eq!(pool.create("v1", 64 << 20).unwrap(), 64 << 20);
        let path = pool.device_path("v1");
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 64 << 20);
        assert!(meta.blocks() * 512 < 1 << 20, "file is sparse");
        assert_eq!(pool.grow("v1", 128 << 20).unwrap(), 128 << 20);
        assert_eq!(fs::metadata(&path).unwrap().len(), 128 << 20);
        assert_eq!(
            pool.list().unwrap(),
            vec![StoredVolume {
                name: "v1".into(),
                size_bytes: 128 << 20
            }]
        );
        pool.delete("v1").unwrap();
        assert!(!path.exists());
        assert!(matches!(pool.delete("v1"), Err(PoolError::Missing { .. })));
    }

    #[test]
    fn rename_moves_the_data_and_never_replaces() {
        let (_dir, pool) = pool();
        pool.create("a", 8192).unwrap();
        std::fs::write(pool.device_path("a"), b"data").unwrap();
        pool.create("b", 4096).unwrap();
        assert!(matches!(
            pool.rename("a", "b"),
            Err(PoolError::Exists { .. })
        ));
        assert!(matches!(
            pool.rename("zz", "c"),
            Err(PoolError::Missing { .. })
        ));
        pool.rename("a", "c").unwrap();
        assert!(!pool.device_path("a").exists());
        assert_eq!(std::fs::read(pool.device_path("c")).unwrap(), b"data");
        let mut names: Vec<_> = pool.list().unwrap().into_iter().map(|v| v.name).collect();
        names.sort();
        assert_eq!(names, vec!["b", "c"]);
    }

    #[test]
    fn create_never_truncates_existing_storage() {
        let (_dir, pool) = pool();
        pool.create("v1", 8192).unwrap();
        fs::write(pool.device_path("v1"), b"data").unwrap();
        assert!(matches!(
            pool.create("v1", 4096),
            Err(PoolError::Exists { .. })
        ));
        assert_eq!(fs::read(pool.device_path("v1")).unwrap(), b"data");
    }

    #[test]
    fn usage_and_room_come_from_the_file_system() {
        let (_dir, pool) = pool();
        let usage = pool.usage().unwrap();
        assert!(usage.total_bytes > 0 && usage.free_bytes <= usage.total_bytes);
        pool.check_room(4096).unwrap();
        let e = pool.check_room(u64::MAX).unwrap_err().to_string();
        assert!(e.starts_with("pool 'files' has "), "{e}");
        assert!(e.contains("free, volume needs "), "{e}");
    }
}
