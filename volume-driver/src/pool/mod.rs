//! Storage pools: where a volume's bytes live on this host.
//!
//! ```text
//! Pool (trait: usage, check_name, create, grow, delete, rename, device_path, list,
//!       snapshot, snapshots, delete_snapshot, rollback, clone_volume)
//!   ├── FilePool     sparse files <path>/<volume>.img          (file.rs, reflink.rs)
//!   └── LvmThinPool  thin LVs <vg>/<volume> in <vg>/<thinpool> (lvm_thin.rs, lvm_report.rs)
//! ```
//!
//! Snapshots are read-only point-in-time copies of one volume's storage, named
//! `<volume>@<snapshot>` in messages; they share blocks with the volume (thin snapshots,
//! reflinks) and are never full copies. A backend that cannot share blocks refuses with
//! [`PoolError::Unsupported`]. A snapshot name follows the volume-name rule.
//!
//! A snapshot is taken in two steps ([`Pool::take_snapshot`], [`Pool::commit_snapshot`]):
//! first under its *pending* name `<snapshot>+pending` (`+` never appears in a snapshot
//! name, so a pending snapshot is never listed as one), renamed to its final name only once
//! every replica took its own (see [`crate::snapshot`]).
//!
//! A pool only allocates and frees storage; it knows nothing of definitions, replication or
//! frontends. The daemon opens what [`Pool::device_path`] names as a
//! `replication::device::FileDevice`, with the pool's `cache` and `io_engine` keys. All
//! methods block (file system calls, `lvm` commands): async callers run them on a blocking
//! thread.

pub mod file;
pub mod lvm_report;
pub mod lvm_thin;
pub mod reflink;

use std::path::PathBuf;

use replication::device::CacheMode;

use serde::{Deserialize, Serialize};

use crate::config::{BackendSpec, PoolSpec};

/// Space in a pool, in bytes, as the backend reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolUsage {
    pub total_bytes: u64,
    pub used_bytes: u64,
    pub free_bytes: u64,
}

/// A volume's storage found in a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredVolume {
    pub name: String,
    pub size_bytes: u64,
}

/// Errors of a pool operation. Messages name the pool and the volume.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The pool itself is unusable (directory missing, VG or thin pool not found).
    #[error("pool '{pool}': {message}")]
    Unavailable { pool: String, message: String },
    /// The backend cannot hold a volume of this name.
    #[error("pool '{pool}': {message}")]
    BadName { pool: String, message: String },
    /// Storage for the volume exists already.
    #[error("pool '{pool}' already holds storage named '{volume}'")]
    Exists { pool: String, volume: String },
    /// Storage for the volume does not exist.
    #[error("pool '{pool}' holds no storage named '{volume}'")]
    Missing { pool: String, volume: String },
    /// The pool is too full to allocate; `message` completes "pool 'x' ...".
    #[error("pool '{pool}' {message}")]
    Full { pool: String, message: String },
    /// A file system call failed.
    #[error("pool '{pool}': cannot {op} {path}")]
    Io {
        pool: String,
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The backend cannot do this (e.g. a file system without reflink for snapshots).
    #[error("{message}")]
    Unsupported { message: String },
    /// The snapshot does not exist.
    #[error("pool '{pool}' holds no snapshot '{volume}@{snapshot}'")]
    MissingSnapshot {
        pool: String,
        volume: String,
        snapshot: String,
    },
    /// A snapshot of that name exists already.
    #[error("pool '{pool}' already holds a snapshot '{volume}@{snapshot}'")]
    SnapshotExists {
        pool: String,
        volume: String,
        snapshot: String,
    },
    /// The `lvm` command could not run or failed.
    #[error("pool '{pool}': `{command}` failed: {message}")]
    Command {
        pool: String,
        command: String,
        message: String,
    },
}

/// The storage backend of a pool.
pub trait Pool: Send + Sync + 'static {
    /// The pool's name from the config.
    fn name(&self) -> &str;
    /// The backend's config name (`file`, `lvm-thin`).
    fn backend(&self) -> &'static str;
    /// Check that the pool is usable (directory exists, VG/thin pool exist).
    fn open_check(&self) -> Result<(), PoolError>;
    /// Current space, read from the backend.
    fn usage(&self) -> Result<PoolUsage, PoolError>;
    /// Refuse names this backend cannot hold (beyond the common volume-name rule).
    fn check_name(&self, volume: &str) -> Result<(), PoolError>;
    /// Refuse to allocate `additional` bytes now (fill thresholds, free space).
    fn check_room(&self, additional: u64) -> Result<(), PoolError> {
        let usage = self.usage()?;
        if additional > usage.free_bytes {
            return Err(PoolError::Full {
                pool: self.name().to_string(),
                message: format!(
                    "has {} free, volume needs {}",
                    crate::units::format_size(usage.free_bytes),
                    crate::units::format_size(additional)
                ),
            });
        }
        Ok(())
    }
    /// Allocate storage of `size` bytes; returns the size actually allocated (≥ `size`).
    /// Fails with [`PoolError::Exists`] without touching existing storage.
    fn create(&self, volume: &str, size: u64) -> Result<u64, PoolError>;
    /// Grow storage to `new_size` bytes; returns the size actually allocated.
    fn grow(&self, volume: &str, new_size: u64) -> Result<u64, PoolError>;
    /// Free the storage. Fails with [`PoolError::Missing`] if there is none.
    fn delete(&self, volume: &str) -> Result<(), PoolError>;
    /// Rename the storage of `from` to `to` (durably). Fails with [`PoolError::Missing`]
    /// when `from` has none and [`PoolError::Exists`] when `to` has some, touching nothing.
    fn rename(&self, from: &str, to: &str) -> Result<(), PoolError>;
    /// The file or block device holding the volume.
    fn device_path(&self, volume: &str) -> PathBuf;
    /// Every volume's storage in this pool (for the startup consistency check). Snapshots
    /// are not listed here.
    fn list(&self) -> Result<Vec<StoredVolume>, PoolError>;

    /// Refuse a new snapshot `volume@snapshot` this backend cannot store: the common rule
    /// ([`validate_snapshot_name`]) and, for backends with a name limit, its pending name
    /// (the longest it has) must fit. This decides the longest name `snapshot create`
    /// accepts; commands on existing snapshots check the common rule only.
    fn check_new_snapshot(&self, _volume: &str, snapshot: &str) -> Result<(), PoolError> {
        validate_snapshot_name(self.name(), snapshot)
    }

    /// Take a block-sharing snapshot `volume@snapshot` of the storage as it is now, under
    /// its pending name (one atomic step). The caller makes sure no write is in flight.
    /// Fails with [`PoolError::SnapshotExists`] when that pending snapshot exists, or
    /// [`PoolError::Missing`], touching nothing.
    fn take_snapshot(&self, volume: &str, snapshot: &str) -> Result<(), PoolError>;
    /// Give the pending `volume@snapshot` its final name (one atomic step, never replacing
    /// a snapshot). Done already is success; fails with [`PoolError::SnapshotExists`] when
    /// both names exist and [`PoolError::MissingSnapshot`] when neither does.
    fn commit_snapshot(&self, volume: &str, snapshot: &str) -> Result<(), PoolError>;
    /// Remove the pending `volume@snapshot`, if there is one.
    fn discard_snapshot(&self, volume: &str, snapshot: &str) -> Result<(), PoolError>;
    /// Take and commit at once (one node, nothing to wait for); a failed commit discards
    /// the pending snapshot again.
    fn snapshot(&self, volume: &str, snapshot: &str) -> Result<(), PoolError> {
        self.take_snapshot(volume, snapshot)?;
        self.commit_snapshot(volume, snapshot).inspect_err(|_| {
            if let Err(e) = self.discard_snapshot(volume, snapshot) {
                tracing::warn!(volume, snapshot, error = %e, "cannot discard a pending snapshot");
            }
        })
    }
    /// The names of the volume's snapshots, final and pending, each sorted.
    fn snapshot_names(&self, volume: &str) -> Result<SnapshotNames, PoolError>;
    /// The names of the volume's (final) snapshots, sorted.
    fn snapshots(&self, volume: &str) -> Result<Vec<String>, PoolError> {
        Ok(self.snapshot_names(volume)?.done)
    }
    /// Every pending snapshot in the pool as `(volume, snapshot)`, sorted.
    fn pending_snapshots(&self) -> Result<Vec<(String, String)>, PoolError>;
    /// Remove `volume@snapshot`. Fails with [`PoolError::MissingSnapshot`].
    fn delete_snapshot(&self, volume: &str, snapshot: &str) -> Result<(), PoolError>;
    /// Replace the volume's storage by the snapshot's content (the snapshot stays). The
    /// caller makes sure the volume is not open. A crash leaves the old or the new content.
    fn rollback(&self, volume: &str, snapshot: &str) -> Result<(), PoolError>;
    /// Make new writable storage `new` sharing the blocks of `source` (or of
    /// `source@snapshot`); returns its size. Fails with [`PoolError::Exists`] when `new`
    /// has storage, touching nothing.
    fn clone_volume(
        &self,
        source: &str,
        snapshot: Option<&str>,
        new: &str,
    ) -> Result<u64, PoolError>;
}

/// A volume's snapshots in a pool.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotNames {
    /// Final snapshots, sorted.
    pub done: Vec<String>,
    /// Pending snapshots (taken, not yet final), sorted.
    pub pending: Vec<String>,
}

/// What a pending snapshot's stored name ends with.
pub const PENDING_SUFFIX: &str = "+pending";

/// The stored name of `snapshot` while it is pending.
pub fn pending_name(snapshot: &str) -> String {
    format!("{snapshot}{PENDING_SUFFIX}")
}

impl SnapshotNames {
    /// Sort the stored snapshot names of one volume (what follows `<volume>+` or
    /// `<volume>@`): final, pending, or neither (rollback's `.`-temporaries, unknown).
    pub fn from_stored<'a>(stored: impl IntoIterator<Item = &'a str>) -> SnapshotNames {
        let mut names = SnapshotNames::default();
        for name in stored {
            match split_stored(name) {
                Some((snapshot, false)) => names.done.push(snapshot.to_string()),
                Some((snapshot, true)) => names.pending.push(snapshot.to_string()),
                None => {}
            }
        }
        names.done.sort();
        names.pending.sort();
        names
    }
}

/// A stored snapshot name as `(snapshot, pending)`; `None` for names that are no snapshot.
pub fn split_stored(stored: &str) -> Option<(&str, bool)> {
    let (snapshot, pending) = match stored.strip_suffix(PENDING_SUFFIX) {
        Some(snapshot) => (snapshot, true),
        None => (stored, false),
    };
    let valid = !snapshot.is_empty()
        && !snapshot.starts_with('.')
        && crate::names::validate_volume_name(snapshot).is_ok();
    valid.then_some((snapshot, pending))
}

/// Check a snapshot name against the rule every snapshot name follows on every backend:
/// the volume-name rule (so `volume@snapshot` is unambiguous and no name is a path), no
/// leading '.', none of LVM's reserved suffixes. Length limits of a backend's stored names
/// are [`Pool::check_new_snapshot`]'s, checked only where a pending name is built: a
/// snapshot that exists already fits them (see [`crate::snapshot`]).
pub fn validate_snapshot_name(pool: &str, snapshot: &str) -> Result<(), PoolError> {
    crate::names::validate_volume_name(snapshot).map_err(|e| PoolError::BadName {
        pool: pool.to_string(),
        message: e.to_string().replacen("volume name", "snapshot name", 1),
    })?;
    // A leading '.' would collide with rollback's temporary names; LVM reserves these suffixes.
    const RESERVED_SUFFIXES: [&str; 8] = [
        "_tmeta", "_tdata", "_rimage", "_rmeta", "_mlog", "_pmspare", "_cdata", "_cmeta",
    ];
    let reason = if snapshot.starts_with('.') {
        Some("must not start with '.' (reserved for rollback's temporary names)".to_string())
    } else {
        RESERVED_SUFFIXES
            .iter()
            .find(|s| snapshot.contains(*s))
            .map(|s| format!("must not contain '{s}' (reserved by LVM)"))
    };
    match reason {
        Some(reason) => Err(PoolError::BadName {
            pool: pool.to_string(),
            message: format!("snapshot name '{snapshot}' {reason}"),
        }),
        None => Ok(()),
    }
}

/// Build the backend a pool spec names.
pub fn open(spec: &PoolSpec) -> Box<dyn Pool> {
    match &spec.backend {
        BackendSpec::File { path } => Box::new(file::FilePool::new(&spec.name, path.clone())),
        BackendSpec::LvmThin {
            vg,
            thinpool,
            max_fill_percent,
        } => Box::new(lvm_thin::LvmThinPool::new(
            &spec.name,
            vg,
            thinpool,
            *max_fill_percent,
        )),
    }
}

/// Refuse `cache = "none"` (the default) on a `file` pool whose file system has no
/// `O_DIRECT` (tmpfs before Linux 6.6, ramfs), naming the pool and the fix. Block devices
/// (`lvm-thin`) always support it. Probes with a short-lived file in the pool directory.
pub fn check_cache(spec: &PoolSpec) -> Result<(), PoolError> {
    use std::os::unix::fs::OpenOptionsExt;
    let (BackendSpec::File { path }, CacheMode::None) = (&spec.backend, spec.cache) else {
        return Ok(());
    };
    let probe = path.join(".tandem-direct-io-probe");
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC)
        .open(&probe);
    let _ = std::fs::remove_file(&probe);
    match opened {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Err(PoolError::Unavailable {
            pool: spec.name.clone(),
            message: format!(
                "the file system of {} does not support O_DIRECT, which cache = \"none\" \
                 (the default) needs; set cache = \"writeback\" in this pool's [[pools]] entry",
                path.display()
            ),
        }),
        Err(source) => Err(PoolError::Io {
            pool: spec.name.clone(),
            op: "probe O_DIRECT in",
            path: path.clone(),
            source,
        }),
    }
}

#[cfg(test)]
mod snapshot_name_tests {
    #[test]
    fn reserved_snapshot_names_are_refused() {
        for bad in [
            ".old",
            ".rollback",
            "x_tmeta",
            "a_rimage_0",
            "p_pmspare",
            "../x",
        ] {
            assert!(super::validate_snapshot_name("p", bad).is_err(), "{bad}");
        }
        for good in ["s1", "before-upgrade", "a.b", &"s".repeat(64)] {
            super::validate_snapshot_name("p", good).unwrap();
        }
        assert!(super::validate_snapshot_name("p", &"s".repeat(65)).is_err());
    }

    #[test]
    fn stored_names_split_into_final_and_pending_snapshots() {
        let names = super::SnapshotNames::from_stored([
            "s2",
            "s1+pending",
            "s1",
            ".rollback",
            ".old",
            "+pending",
            "a+b",
        ]);
        assert_eq!(names.done, vec!["s1", "s2"]);
        assert_eq!(names.pending, vec!["s1"]);
        assert_eq!(super::pending_name("s1"), "s1+pending");
        assert_eq!(super::split_stored("s1+pending"), Some(("s1", true)));
        assert_eq!(super::split_stored("s1"), Some(("s1", false)));
        assert_eq!(super::split_stored(".old"), None);
    }
}
