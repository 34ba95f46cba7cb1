//! The `file` pool: one sparse file `<path>/<volume>.img` per volume.
//!
//! Allocation is `set_len` on a newly created file (no blocks are written, so a 1 TiB
//! volume costs nothing until written); discard punches holes (done by
//! `replication::device::FileDevice`). Creating uses `O_EXCL`, so existing data is never
//! truncated; every change is followed by an fsync of the file and the directory.
//! Usage is that of the file system holding `path` (like `df`).
//!
//! Snapshots are reflink copies `<path>/<volume>@<snapshot>.snap` (see [`super::reflink`]),
//! `<path>/<volume>@<snapshot>+pending.snap` while they are taken;
//! clones are reflink copies `<path>/<new>.img`; rollback reflinks the snapshot over the
//! volume's file atomically. On a file system without reflink they are refused: a full
//! copy of a large image would silently cost its whole size and minutes of I/O.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::{reflink, Pool, PoolError, PoolUsage, SnapshotNames, StoredVolume};

const SUFFIX: &str = ".img";
const SNAPSHOT_SUFFIX: &str = ".snap";

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

    fn snapshot_path(&self, volume: &str, snapshot: &str) -> PathBuf {
        self.dir
            .join(format!("{volume}@{snapshot}{SNAPSHOT_SUFFIX}"))
    }

    fn pending_path(&self, volume: &str, snapshot: &str) -> PathBuf {
        self.snapshot_path(volume, &super::pending_name(snapshot))
    }

    /// Every snapshot file as `(volume, stored snapshot name, file name)`:
    /// `<volume>@<stored>.snap`, and the temporary file of a pending one.
    fn snapshot_files(&self) -> Result<Vec<(String, String, String)>, PoolError> {
        let mut found = Vec::new();
        let entries = fs::read_dir(&self.dir).map_err(self.io("list", &self.dir))?;
        for entry in entries {
            let entry = entry.map_err(self.io("list", &self.dir))?;
            let file_name = entry.file_name();
            let Some(file) = file_name.to_str() else {
                continue;
            };
            // `.<volume>@<snapshot>+pending.snap.tmp`: a take cut short (reflink::tmp_path).
            let pending_tail = format!("{}{SNAPSHOT_SUFFIX}", super::PENDING_SUFFIX);
            let name = match file.strip_prefix('.').and_then(|n| n.strip_suffix(".tmp")) {
                Some(tmp) if tmp.ends_with(&pending_tail) => tmp,
                _ => file,
            };
            let Some((volume, stored)) = name
                .strip_suffix(SNAPSHOT_SUFFIX)
                .and_then(|n| n.split_once('@'))
            else {
                continue;
            };
            if !volume.is_empty() && !volume.starts_with('.') && !stored.is_empty() {
                found.push((volume.to_string(), stored.to_string(), file.to_string()));
            }
        }
        Ok(found)
    }

    /// The stored snapshot names of `volume` (final and pending).
    fn stored_snapshots(&self, volume: &str) -> Result<Vec<String>, PoolError> {
        Ok(self
            .snapshot_files()?
            .into_iter()
            .filter(|(v, _, _)| v == volume)
            .map(|(_, stored, _)| stored)
            .collect())
    }

    fn missing(&self, volume: &str) -> PoolError {
        PoolError::Missing {
            pool: self.name.clone(),
            volume: volume.to_string(),
        }
    }

    fn missing_snapshot(&self, volume: &str, snapshot: &str) -> PoolError {
        PoolError::MissingSnapshot {
            pool: self.name.clone(),
            volume: volume.to_string(),
            snapshot: snapshot.to_string(),
        }
    }

    /// Map a reflink failure; `missing` and `exists` say what a missing source or an
    /// existing target means for this operation.
    fn reflink_error(
        &self,
        e: reflink::CloneError,
        missing: PoolError,
        exists: PoolError,
        path: &Path,
    ) -> PoolError {
        match e {
            reflink::CloneError::Unsupported => PoolError::Unsupported {
                message: format!(
                    "pool {}'s filesystem has no reflink; snapshots need XFS with reflink=1 or btrfs",
                    self.name
                ),
            },
            reflink::CloneError::SourceMissing => missing,
            reflink::CloneError::Exists => exists,
            reflink::CloneError::Io { op, source } => PoolError::Io {
                pool: self.name.clone(),
                op,
                path: path.to_path_buf(),
                source,
            },
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

    /// Removes the volume's snapshots too (after the volume: a crash in between leaves
    /// `.snap` files, which a later delete of a volume of that name removes).
    fn delete(&self, volume: &str) -> Result<(), PoolError> {
        let path = self.device_path(volume);
        match fs::remove_file(&path) {
            Ok(()) => {
                let names = self.snapshot_names(volume)?;
                for snapshot in names.done {
                    self.delete_snapshot(volume, &snapshot)?;
                }
                for snapshot in names.pending {
                    self.discard_snapshot(volume, &snapshot)?;
                }
                self.sync_dir()
            }
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
        let old = self.device_path(from);
        let new = self.device_path(to);
        if let Err(e) = reflink::rename_at(&old, &new, true) {
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
        // The snapshots follow, pending ones too (plain renames; a crash in between
        // leaves some under the old name, where `snapshot_names(from)` still finds them).
        // Moved by their real names; the temporary file of a take cut short is never a
        // snapshot, so it is removed rather than moved.
        for (volume, stored, file) in self.snapshot_files()? {
            let old = self.dir.join(&file);
            if volume != from {
                continue;
            } else if file.starts_with('.') {
                match fs::remove_file(&old) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => {
                        return Err(self.io("remove", &old)(e))
                    }
                    _ => {}
                }
            } else {
                let new = self.dir.join(format!("{to}@{stored}{SNAPSHOT_SUFFIX}"));
                fs::rename(&old, new).map_err(self.io("rename", &old))?;
            }
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

    fn take_snapshot(&self, volume: &str, snapshot: &str) -> Result<(), PoolError> {
        self.check_new_snapshot(volume, snapshot)?;
        let dst = self.pending_path(volume, snapshot);
        reflink::clone_to_new(&self.device_path(volume), &dst, false).map_err(|e| {
            let exists = PoolError::SnapshotExists {
                pool: self.name.clone(),
                volume: volume.to_string(),
                snapshot: snapshot.to_string(),
            };
            self.reflink_error(e, self.missing(volume), exists, &dst)
        })
    }

    /// `renameat2(RENAME_NOREPLACE)` of the pending file to the final name, then an fsync
    /// of the directory.
    fn commit_snapshot(&self, volume: &str, snapshot: &str) -> Result<(), PoolError> {
        let (pending, done) = (
            self.pending_path(volume, snapshot),
            self.snapshot_path(volume, snapshot),
        );
        match reflink::rename_at(&pending, &done, true) {
            Ok(()) => self.sync_dir(),
            Err(e) if e.kind() == io::ErrorKind::NotFound && done.exists() => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(self.missing_snapshot(volume, snapshot))
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Err(PoolError::SnapshotExists {
                pool: self.name.clone(),
                volume: volume.to_string(),
                snapshot: snapshot.to_string(),
            }),
            Err(e) => Err(self.io("rename", &pending)(e)),
        }
    }

    /// Removes the pending file and the temporary file of an interrupted take.
    fn discard_snapshot(&self, volume: &str, snapshot: &str) -> Result<(), PoolError> {
        let pending = self.pending_path(volume, snapshot);
        for path in [reflink::tmp_path(&pending), pending] {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(self.io("remove", &path)(e)),
            }
        }
        self.sync_dir()
    }

    fn snapshot_names(&self, volume: &str) -> Result<SnapshotNames, PoolError> {
        let stored = self.stored_snapshots(volume)?;
        Ok(SnapshotNames::from_stored(
            stored.iter().map(String::as_str),
        ))
    }

    fn pending_snapshots(&self) -> Result<Vec<(String, String)>, PoolError> {
        let mut found = Vec::new();
        for (volume, stored, _) in self.snapshot_files()? {
            if let Some((snapshot, true)) = super::split_stored(&stored) {
                found.push((volume, snapshot.to_string()));
            }
        }
        found.sort();
        Ok(found)
    }

    fn delete_snapshot(&self, volume: &str, snapshot: &str) -> Result<(), PoolError> {
        let path = self.snapshot_path(volume, snapshot);
        match fs::remove_file(&path) {
            Ok(()) => self.sync_dir(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(self.missing_snapshot(volume, snapshot))
            }
            Err(e) => Err(self.io("remove", &path)(e)),
        }
    }

    /// Reflinks the snapshot to a temporary file and renames it over the volume's file.
    fn rollback(&self, volume: &str, snapshot: &str) -> Result<(), PoolError> {
        let dst = self.device_path(volume);
        if !dst.exists() {
            return Err(self.missing(volume));
        }
        let src = self.snapshot_path(volume, snapshot);
        reflink::clone_to_new(&src, &dst, true).map_err(|e| {
            self.reflink_error(
                e,
                self.missing_snapshot(volume, snapshot),
                self.missing(volume),
                &dst,
            )
        })
    }

    fn clone_volume(
        &self,
        source: &str,
        snapshot: Option<&str>,
        new: &str,
    ) -> Result<u64, PoolError> {
        let (src, missing) = match snapshot {
            Some(s) => (
                self.snapshot_path(source, s),
                self.missing_snapshot(source, s),
            ),
            None => (self.device_path(source), self.missing(source)),
        };
        let dst = self.device_path(new);
        let exists = PoolError::Exists {
            pool: self.name.clone(),
            volume: new.to_string(),
        };
        reflink::clone_to_new(&src, &dst, false)
            .map_err(|e| self.reflink_error(e, missing, exists, &dst))?;
        Ok(fs::metadata(&dst).map_err(self.io("stat", &dst))?.len())
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
pub(crate) mod tests {
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
    fn rename_moves_snapshots_by_their_real_names_and_drops_a_cut_short_take() {
        let (dir, pool) = pool();
        pool.create("a", 4096).unwrap();
        let images = dir.path().join("images");
        fs::write(images.join("a@s1.snap"), b"final").unwrap();
        fs::write(images.join("a@s2+pending.snap"), b"pending").unwrap();
        fs::write(images.join(".a@s3+pending.snap.tmp"), b"half").unwrap();
        pool.rename("a", "b").unwrap();
        assert_eq!(fs::read(images.join("b@s1.snap")).unwrap(), b"final");
        assert_eq!(
            fs::read(images.join("b@s2+pending.snap")).unwrap(),
            b"pending"
        );
        let mut left: Vec<_> = fs::read_dir(&images)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["b.img", "b@s1.snap", "b@s2+pending.snap"]);
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

    /// A file system mounted for one test (root: loop device, `mount`); unmounted and
    /// detached on drop, so also when the test fails.
    pub(crate) struct Mounted {
        _dir: tempfile::TempDir,
        mountpoint: PathBuf,
        loop_device: Option<String>,
    }

    fn run(cmd: &str, args: &[&str]) -> String {
        let out = std::process::Command::new(cmd).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{cmd} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    impl Mounted {
        /// XFS with reflink on a 320 MiB sparse image (XFS's smallest size is 300 MiB).
        pub(crate) fn xfs_reflink() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let image = dir.path().join("xfs.img");
            File::create(&image).unwrap().set_len(320 << 20).unwrap();
            let mountpoint = dir.path().join("mnt");
            fs::create_dir(&mountpoint).unwrap();
            let device = run("losetup", &["--find", "--show", image.to_str().unwrap()]);
            let mounted = Mounted {
                _dir: dir,
                mountpoint,
                loop_device: Some(device.trim().to_string()),
            };
            let device = mounted.loop_device.as_deref().unwrap();
            run("mkfs.xfs", &["-q", "-m", "reflink=1", device]);
            run("mount", &[device, mounted.mountpoint.to_str().unwrap()]);
            mounted
        }

        /// tmpfs: no reflink.
        fn tmpfs() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let mountpoint = dir.path().join("mnt");
            fs::create_dir(&mountpoint).unwrap();
            run(
                "mount",
                &[
                    "-t",
                    "tmpfs",
                    "-o",
                    "size=64m",
                    "tmpfs",
                    mountpoint.to_str().unwrap(),
                ],
            );
            Mounted {
                _dir: dir,
                mountpoint,
                loop_device: None,
            }
        }

        pub(crate) fn pool(&self) -> FilePool {
            let pool = FilePool::new("files", self.mountpoint.join("images"));
            pool.open_check().unwrap();
            pool
        }
    }

    impl Drop for Mounted {
        fn drop(&mut self) {
            // A process forked by another test thread may hold a descriptor of this file
            // system for a moment (until its exec): retry, then detach lazily.
            let umount = |lazy: bool| {
                let mut cmd = std::process::Command::new("umount");
                if lazy {
                    cmd.arg("-l");
                }
                cmd.arg(&self.mountpoint)
                    .status()
                    .is_ok_and(|s| s.success())
            };
            if !(0..20).any(|_| {
                umount(false) || {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                    false
                }
            }) {
                umount(true);
            }
            if let Some(device) = &self.loop_device {
                let _ = std::process::Command::new("losetup")
                    .args(["-d", device])
                    .status();
            }
        }
    }

    fn write_at(path: &Path, offset: u64, data: &[u8]) {
        use std::os::unix::fs::FileExt;
        let f = OpenOptions::new().write(true).open(path).unwrap();
        f.write_all_at(data, offset).unwrap();
        f.sync_all().unwrap();
    }

    fn allocated(path: &Path) -> u64 {
        fs::metadata(path).unwrap().blocks() * 512
    }

    #[test]
    fn snapshots_rollback_and_clones_share_blocks_on_xfs_reflink() {
        let fs = Mounted::xfs_reflink();
        let pool = fs.pool();
        pool.create("v1", 64 << 20).unwrap();
        let disk = pool.device_path("v1");
        write_at(&disk, 0, &[1u8; 1 << 20]);
        write_at(&disk, 32 << 20, &[2u8; 1 << 20]);
        let before = fs::read(&disk).unwrap();

        let used = pool.usage().unwrap().used_bytes;
        pool.snapshot("v1", "s1").unwrap();
        let grown = pool.usage().unwrap().used_bytes.saturating_sub(used);
        assert!(
            grown < 1 << 20,
            "a snapshot shares blocks; used grew {grown} bytes"
        );
        assert!(matches!(
            pool.snapshot("v1", "s1"),
            Err(PoolError::SnapshotExists { .. })
        ));
        assert!(matches!(
            pool.snapshot("nope", "s1"),
            Err(PoolError::Missing { .. })
        ));
        assert!(matches!(
            pool.snapshot("v1", "bad/name"),
            Err(PoolError::BadName { .. })
        ));
        assert_eq!(pool.snapshots("v1").unwrap(), vec!["s1"]);
        assert_eq!(pool.list().unwrap().len(), 1, "snapshots are not volumes");

        // Writes after the snapshot do not reach it; rollback brings the old bytes back.
        write_at(&disk, 0, &[9u8; 4096]);
        assert_ne!(fs::read(&disk).unwrap(), before);
        pool.rollback("v1", "s1").unwrap();
        assert_eq!(fs::read(&disk).unwrap(), before);
        assert!(matches!(
            pool.rollback("v1", "s9"),
            Err(PoolError::MissingSnapshot { .. })
        ));

        // Linked clones from the volume and from the snapshot, both writable and separate.
        assert_eq!(pool.clone_volume("v1", Some("s1"), "c1").unwrap(), 64 << 20);
        assert_eq!(pool.clone_volume("v1", None, "c2").unwrap(), 64 << 20);
        assert_eq!(fs::read(pool.device_path("c1")).unwrap(), before);
        write_at(&pool.device_path("c2"), 0, &[7u8; 4096]);
        assert_eq!(
            fs::read(&disk).unwrap(),
            before,
            "a clone's writes stay in it"
        );
        assert!(matches!(
            pool.clone_volume("v1", None, "c1"),
            Err(PoolError::Exists { .. })
        ));
        assert!(matches!(
            pool.clone_volume("v1", Some("s9"), "c3"),
            Err(PoolError::MissingSnapshot { .. })
        ));
        assert!(!pool.device_path("c3").exists());
        assert!(allocated(&pool.device_path("c1")) <= allocated(&disk));

        // Rename carries the snapshots; delete removes them.
        pool.rename("v1", "v2").unwrap();
        assert_eq!(pool.snapshots("v2").unwrap(), vec!["s1"]);
        assert!(pool.snapshots("v1").unwrap().is_empty());
        pool.delete_snapshot("v2", "s1").unwrap();
        assert!(matches!(
            pool.delete_snapshot("v2", "s1"),
            Err(PoolError::MissingSnapshot { .. })
        ));
        pool.snapshot("v2", "s2").unwrap();
        pool.delete("v2").unwrap();
        assert!(pool.snapshots("v2").unwrap().is_empty());
        let leftovers: Vec<_> = fs::read_dir(&pool.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn a_pending_snapshot_is_listed_only_once_committed_and_follows_its_volume() {
        let fs = Mounted::xfs_reflink();
        let pool = fs.pool();
        pool.create("v1", 8 << 20).unwrap();
        write_at(&pool.device_path("v1"), 0, &[3u8; 4096]);
        pool.take_snapshot("v1", "s1").unwrap();
        // Written after the take: not in the snapshot.
        write_at(&pool.device_path("v1"), 0, &[4u8; 4096]);
        assert!(
            pool.snapshots("v1").unwrap().is_empty(),
            "pending, not listed"
        );
        let pending = vec![("v1".to_string(), "s1".to_string())];
        assert_eq!(pool.pending_snapshots().unwrap(), pending);
        assert!(matches!(
            pool.take_snapshot("v1", "s1"),
            Err(PoolError::SnapshotExists { .. })
        ));
        // A volume's rename carries it along.
        pool.rename("v1", "v2").unwrap();
        assert_eq!(
            pool.pending_snapshots().unwrap(),
            vec![("v2".to_string(), "s1".to_string())]
        );
        pool.commit_snapshot("v2", "s1").unwrap();
        pool.commit_snapshot("v2", "s1").unwrap();
        assert_eq!(pool.snapshots("v2").unwrap(), vec!["s1"]);
        assert!(pool.pending_snapshots().unwrap().is_empty());
        let snap = fs::read(pool.snapshot_path("v2", "s1")).unwrap();
        assert_eq!(&snap[..4096], &[3u8; 4096][..]);
        assert!(matches!(
            pool.commit_snapshot("v2", "s9"),
            Err(PoolError::MissingSnapshot { .. })
        ));
        // A second take of the same name cannot replace the committed snapshot.
        pool.take_snapshot("v2", "s1").unwrap();
        assert!(matches!(
            pool.commit_snapshot("v2", "s1"),
            Err(PoolError::SnapshotExists { .. })
        ));
        pool.discard_snapshot("v2", "s1").unwrap();
        pool.discard_snapshot("v2", "s1").unwrap();
        assert_eq!(fs::read(pool.snapshot_path("v2", "s1")).unwrap(), snap);
        // The temporary file of a take cut short by a crash is part of that pending one.
        let tmp = pool.dir.join(".v2@s9+pending.snap.tmp");
        fs::write(&tmp, b"partial").unwrap();
        assert_eq!(
            pool.pending_snapshots().unwrap(),
            vec![("v2".to_string(), "s9".to_string())]
        );
        pool.discard_snapshot("v2", "s9").unwrap();
        assert!(!tmp.exists());
        // Delete takes pending snapshots along.
        pool.take_snapshot("v2", "s2").unwrap();
        pool.delete("v2").unwrap();
        assert!(pool.pending_snapshots().unwrap().is_empty());
        assert!(pool.snapshot_names("v2").unwrap().done.is_empty());
    }

    #[test]
    fn without_reflink_snapshots_and_clones_are_refused_not_copied() {
        let fs = Mounted::tmpfs();
        let pool = fs.pool();
        pool.create("v1", 8 << 20).unwrap();
        let expected =
            "pool files's filesystem has no reflink; snapshots need XFS with reflink=1 or btrfs";
        let e = pool.snapshot("v1", "s1").unwrap_err().to_string();
        assert_eq!(e, expected);
        let e = pool.clone_volume("v1", None, "c1").unwrap_err().to_string();
        assert_eq!(e, expected);
        let names: Vec<_> = fs::read_dir(&pool.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["v1.img"], "nothing was copied or left behind");
    }
}
