//! The `lvm-thin` pool: one thin LV `<vg>/<volume>` per volume in an existing thin pool
//! `<vg>/<thinpool>`, driven only through the `lvm` command and its JSON reports.
//!
//! | operation | command |
//! | --- | --- |
//! | inspect | `lvm lvs --reportformat json --units b --nosuffix -o <fields> <vg>` |
//! | create  | `lvm lvcreate -V <bytes>b -T <vg>/<thinpool> -n <volume> --addtag tandem -y` |
//! | grow    | `lvm lvextend -L <bytes>b <vg>/<volume>` |
//! | delete  | `lvm lvremove -y <vg>/<volume>` |
//! | rename  | `lvm lvrename <vg> <volume> <new>` |
//! | take snapshot | `lvm lvcreate -n <volume>+<snap>+pending -pr -s <vg>/<volume> --addtag tandem -y --noudevsync --ignoremonitoring` |
//! | commit snapshot | `lvm lvrename <vg> <volume>+<snap>+pending <volume>+<snap>` |
//! | clone   | `lvm lvcreate -n <new> -prw -kn -s <vg>/<source>[+<snap>] --addtag tandem -y --ignoremonitoring` |
//! | rollback | clone the snapshot to `<volume>+.rollback`, rename the volume to `<volume>+.old`, the clone to `<volume>`, remove `<volume>+.old` |
//!
//! Snapshots are thin snapshots named `<volume>+<snapshot>` (`+` is valid in an LV name and
//! never in a volume name, so the split is unambiguous), `<volume>+<snapshot>+pending`
//! while they are taken (see [`super`]); like PVE's `snap_*` LVs they are read-only and
//! skipped at activation (`lvchange -ay -K` shows one). Rollback never leaves the volume
//! without an LV: after a crash the volume's LV, or `<volume>+.old` and
//! `<volume>+.rollback`, exist, and [`LvmThinPool::rollback`] run again completes it.
//!
//! The snapshot's `lvcreate` runs while the Primary holds writes, so it does only what
//! the snapshot needs. `--noudevsync`: the snapshot is not activated, so no device node
//! appears that a caller could wait for; the only device event is the origin's
//! suspend/resume, whose node exists throughout, so lvcreate need not wait for udev to
//! finish processing it. `--ignoremonitoring`: lvcreate neither unregisters the thin pool
//! from dmeventd around the origin's suspend nor registers it again (two dmeventd round
//! trips), which leaves its monitoring exactly as it was (`--monitor n` would leave it
//! unmonitored). A clone is activated (the replica opens it at once), so it keeps udev
//! synchronisation and only skips the monitoring calls. Not used: `-Zn`/`-Wn` (a thin
//! snapshot is never zeroed or wiped; lvcreate refuses `-W` with snapshots), `-an`
//! (skipping activation is already the default for thin snapshots), `-An` (no measurable
//! gain; the metadata backup stays current).
//!
//! The LV name is the volume name; LVs Tandem made carry the tag `tandem`, and only those
//! are listed, grown or removed. Usage is the thin pool's `lv_size` and `data_percent`;
//! creating and growing are refused while the pool is fuller than `max_fill_percent`.
//! LVM rounds sizes up to whole extents, so create and grow return the size lvm reports.
//! The `lvm` binary is taken from `PATH` unless `TANDEM_LVM` names another one.

use std::path::PathBuf;
use std::process::Command;

use super::lvm_report::{parse_lvs, Lv, LvKind, LVS_FIELDS};
use super::{validate_snapshot_name, Pool, PoolError, PoolUsage, StoredVolume};
use crate::report::error_chain;
use crate::units::format_size;

/// The tag on every LV Tandem creates.
pub const TAG: &str = "tandem";

/// Environment variable naming the `lvm` binary (default: `lvm` from `PATH`).
pub const LVM_ENV: &str = "TANDEM_LVM";

/// Longest LV name LVM accepts (lvm(8), "VALID NAMES").
pub const LV_NAME_MAX: usize = 127;

/// Substrings LVM reserves for its internal LVs (lvm(8), "VALID NAMES").
const RESERVED_SUBSTRINGS: &[&str] = &[
    "_cdata", "_cmeta", "_corig", "_cpool", "_cvol", "_iorig", "_mimage", "_mlog", "_pmspare",
    "_rimage", "_rmeta", "_tdata", "_tmeta", "_vdata", "_vorigin", "_wcorig",
];
/// Prefixes LVM reserves.
const RESERVED_PREFIXES: &[&str] = &["snapshot", "pvmove"];

/// Thin LVs in one thin pool.
pub struct LvmThinPool {
    name: String,
    vg: String,
    thinpool: String,
    max_fill_percent: u8,
    lvm_binary: String,
}

/// Check a name against LVM's reserved words; `None` when it is usable as an LV name.
pub fn lvm_reserved(name: &str) -> Option<String> {
    if let Some(word) = RESERVED_PREFIXES.iter().find(|p| name.starts_with(*p)) {
        return Some(format!(
            "LVM does not allow LV names starting with '{word}'; choose another volume name"
        ));
    }
    RESERVED_SUBSTRINGS
        .iter()
        .find(|s| name.contains(*s))
        .map(|word| {
            format!(
                "LVM reserves '{word}' in LV names for internal LVs; choose another volume name"
            )
        })
}

impl LvmThinPool {
    pub fn new(name: &str, vg: &str, thinpool: &str, max_fill_percent: u8) -> Self {
        LvmThinPool {
            name: name.to_string(),
            vg: vg.to_string(),
            thinpool: thinpool.to_string(),
            max_fill_percent,
            lvm_binary: std::env::var(LVM_ENV).unwrap_or_else(|_| "lvm".to_string()),
        }
    }

    /// Use another `lvm` binary (tests).
    pub fn with_lvm_binary(mut self, binary: impl Into<String>) -> Self {
        self.lvm_binary = binary.into();
        self
    }

    fn lvm(&self, args: &[&str]) -> Result<String, PoolError> {
        let binary = &self.lvm_binary;
        let command_line = format!("{binary} {}", args.join(" "));
        let failed = |message: String| PoolError::Command {
            pool: self.name.clone(),
            command: command_line.clone(),
            message,
        };
        let started = std::time::Instant::now();
        let output = Command::new(binary)
            .args(args)
            .env("LC_ALL", "C")
            .env("LVM_SUPPRESS_FD_WARNINGS", "1")
            .output()
            .map_err(|e| failed(format!("cannot run {binary}: {e}")))?;
        tracing::debug!(pool = %self.name, command = %command_line,
            ms = crate::phases::millis(started.elapsed()), "lvm ran");
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let message = stderr
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join("; ");
            return Err(failed(if message.is_empty() {
                format!("exited with {}", output.status)
            } else {
                message
            }));
        }
        String::from_utf8(output.stdout).map_err(|_| failed("printed non-UTF-8 output".into()))
    }

    /// Every LV of the VG.
    fn lvs(&self) -> Result<Vec<Lv>, PoolError> {
        let json = self.lvm(&[
            "lvs",
            "--reportformat",
            "json",
            "--units",
            "b",
            "--nosuffix",
            "-o",
            LVS_FIELDS,
            &self.vg,
        ])?;
        parse_lvs(&json).map_err(|e| PoolError::Command {
            pool: self.name.clone(),
            command: "lvm lvs".into(),
            message: error_chain(&e),
        })
    }

    fn thin_pool(&self, lvs: &[Lv]) -> Result<Lv, PoolError> {
        lvs.iter()
            .find(|lv| lv.name == self.thinpool)
            .filter(|lv| lv.kind == LvKind::ThinPool)
            .cloned()
            .ok_or_else(|| PoolError::Unavailable {
                pool: self.name.clone(),
                message: format!(
                    "thin pool {}/{} not found (create it with `lvcreate --type thin-pool -L <size> -n {} {}`)",
                    self.vg, self.thinpool, self.thinpool, self.vg
                ),
            })
    }

    /// The volume's LV if it exists; an LV of that name not made by Tandem is an error.
    fn find_volume(&self, volume: &str) -> Result<Option<Lv>, PoolError> {
        let lvs = self.lvs()?;
        match lvs.into_iter().find(|lv| lv.name == volume) {
            None => Ok(None),
            Some(lv) if lv.kind == LvKind::ThinVolume && lv.pool_lv == self.thinpool && lv.is_tandem() => {
                Ok(Some(lv))
            }
            Some(_) => Err(PoolError::Unavailable {
                pool: self.name.clone(),
                message: format!(
                    "LV {}/{volume} exists but is not a Tandem volume of thin pool {} (no '{TAG}' tag); not touching it",
                    self.vg, self.thinpool
                ),
            }),
        }
    }

    fn usage_from(&self, pool_lv: &Lv) -> (PoolUsage, f64) {
        let percent = pool_lv.data_percent.unwrap_or(0.0).clamp(0.0, 100.0);
        let total = pool_lv.size_bytes;
        let used = ((total as f64) * percent / 100.0).round() as u64;
        let used = used.min(total);
        (
            PoolUsage {
                total_bytes: total,
                used_bytes: used,
                free_bytes: total - used,
            },
            percent,
        )
    }

    fn lv_path(&self, volume: &str) -> String {
        format!("{}/{volume}", self.vg)
    }

    fn snapshot_lv(volume: &str, snapshot: &str) -> String {
        format!("{volume}+{snapshot}")
    }

    fn missing(&self, volume: &str) -> PoolError {
        PoolError::Missing {
            pool: self.name.clone(),
            volume: volume.to_string(),
        }
    }

    /// A Tandem LV (volume or snapshot) of this thin pool by its LV name.
    fn find_lv(&self, lv_name: &str) -> Result<Option<Lv>, PoolError> {
        Ok(self.lvs()?.into_iter().find(|lv| {
            lv.name == lv_name
                && lv.kind == LvKind::ThinVolume
                && lv.pool_lv == self.thinpool
                && lv.is_tandem()
        }))
    }

    fn require_snapshot(&self, volume: &str, snapshot: &str) -> Result<String, PoolError> {
        let lv = Self::snapshot_lv(volume, snapshot);
        match self.find_lv(&lv)? {
            Some(_) => Ok(lv),
            None => Err(PoolError::MissingSnapshot {
                pool: self.name.clone(),
                volume: volume.to_string(),
                snapshot: snapshot.to_string(),
            }),
        }
    }

    fn pending_lv(volume: &str, snapshot: &str) -> String {
        format!("{volume}+{}", super::pending_name(snapshot))
    }

    /// Refuse an LV name longer than LVM accepts; `what` says which name it is.
    fn check_lv_len(&self, lv: &str, what: &str) -> Result<(), PoolError> {
        if lv.len() <= LV_NAME_MAX {
            return Ok(());
        }
        Err(PoolError::BadName {
            pool: self.name.clone(),
            message: format!(
                "{what}: its LV name '{lv}' would have {} characters, at most {LV_NAME_MAX} fit an LVM name",
                lv.len()
            ),
        })
    }

    /// `lvcreate -s` of `origin` as `name`: read-only snapshot or writable (active) clone
    /// (see the module doc for the options).
    fn thin_snapshot(&self, origin: &str, name: &str, writable: bool) -> Result<(), PoolError> {
        let origin = self.lv_path(origin);
        let mut args = vec!["lvcreate", "-n", name];
        args.extend_from_slice(if writable { &["-prw", "-kn"] } else { &["-pr"] });
        args.extend_from_slice(&["-s", &origin, "--addtag", TAG, "-y"]);
        if !writable {
            args.push("--noudevsync");
        }
        args.push("--ignoremonitoring");
        self.lvm(&args).map(|_| ())
    }

    /// The Tandem thin LVs of this pool whose name starts with `prefix`, by the rest of it.
    fn names_after<'a>(lvs: &'a [Lv], thinpool: &str, prefix: &str) -> Vec<&'a str> {
        lvs.iter()
            .filter(|lv| lv.kind == LvKind::ThinVolume && lv.pool_lv == thinpool)
            .filter(|lv| lv.is_tandem())
            .filter_map(|lv| lv.name.strip_prefix(prefix))
            .collect()
    }
}

impl Pool for LvmThinPool {
    fn name(&self) -> &str {
        &self.name
    }

    fn backend(&self) -> &'static str {
        "lvm-thin"
    }

    fn open_check(&self) -> Result<(), PoolError> {
        let lvs = self.lvs()?;
        self.thin_pool(&lvs).map(|_| ())
    }

    fn usage(&self) -> Result<PoolUsage, PoolError> {
        let lvs = self.lvs()?;
        Ok(self.usage_from(&self.thin_pool(&lvs)?).0)
    }

    fn check_name(&self, volume: &str) -> Result<(), PoolError> {
        match lvm_reserved(volume) {
            None => Ok(()),
            Some(message) => Err(PoolError::BadName {
                pool: self.name.clone(),
                message: format!("volume name '{volume}': {message}"),
            }),
        }
    }

    /// The pending LV `<volume>+<snapshot>+pending` must fit LVM's name limit, so the
    /// longest snapshot name is `127 - 9 - len(volume)` characters (54 for a volume of 64).
    fn check_new_snapshot(&self, volume: &str, snapshot: &str) -> Result<(), PoolError> {
        validate_snapshot_name(&self.name, snapshot)?;
        let what = format!("snapshot name '{snapshot}' is too long for volume '{volume}'");
        self.check_lv_len(&Self::pending_lv(volume, snapshot), &what)
    }

    fn check_room(&self, additional: u64) -> Result<(), PoolError> {
        let lvs = self.lvs()?;
        let (usage, percent) = self.usage_from(&self.thin_pool(&lvs)?);
        if percent > f64::from(self.max_fill_percent) {
            return Err(PoolError::Full {
                pool: self.name.clone(),
                message: format!(
                    "is {percent:.1}% full (thin pool {}/{}), over its max_fill_percent of {}%",
                    self.vg, self.thinpool, self.max_fill_percent
                ),
            });
        }
        if additional > usage.free_bytes {
            return Err(PoolError::Full {
                pool: self.name.clone(),
                message: format!(
                    "has {} free, volume needs {}",
                    format_size(usage.free_bytes),
                    format_size(additional)
                ),
            });
        }
        Ok(())
    }

    fn create(&self, volume: &str, size: u64) -> Result<u64, PoolError> {
        self.check_name(volume)?;
        if self.lvs()?.iter().any(|lv| lv.name == volume) {
            return Err(PoolError::Exists {
                pool: self.name.clone(),
                volume: volume.to_string(),
            });
        }
        let size_arg = format!("{size}b");
        let pool_arg = format!("{}/{}", self.vg, self.thinpool);
        self.lvm(&[
            "lvcreate", "-V", &size_arg, "-T", &pool_arg, "-n", volume, "--addtag", TAG, "-y",
        ])?;
        match self.find_volume(volume)? {
            Some(lv) => Ok(lv.size_bytes),
            None => Err(PoolError::Missing {
                pool: self.name.clone(),
                volume: volume.to_string(),
            }),
        }
    }

    fn grow(&self, volume: &str, new_size: u64) -> Result<u64, PoolError> {
        let lv = self
            .find_volume(volume)?
            .ok_or_else(|| PoolError::Missing {
                pool: self.name.clone(),
                volume: volume.to_string(),
            })?;
        if new_size <= lv.size_bytes {
            return Ok(lv.size_bytes);
        }
        let size_arg = format!("{new_size}b");
        self.lvm(&["lvextend", "-L", &size_arg, &self.lv_path(volume)])?;
        self.find_volume(volume)?
            .map(|lv| lv.size_bytes)
            .ok_or_else(|| PoolError::Missing {
                pool: self.name.clone(),
                volume: volume.to_string(),
            })
    }

    fn delete(&self, volume: &str) -> Result<(), PoolError> {
        if self.find_volume(volume)?.is_none() {
            return Err(PoolError::Missing {
                pool: self.name.clone(),
                volume: volume.to_string(),
            });
        }
        self.lvm(&["lvremove", "-y", &self.lv_path(volume)])?;
        // Its snapshots go with it (as PVE's free_image does), pending ones too.
        let names = self.snapshot_names(volume)?;
        for snapshot in names.done {
            self.delete_snapshot(volume, &snapshot)?;
        }
        for snapshot in names.pending {
            self.discard_snapshot(volume, &snapshot)?;
        }
        Ok(())
    }

    fn rename(&self, from: &str, to: &str) -> Result<(), PoolError> {
        self.check_name(to)?;
        let lvs = self.lvs()?;
        if lvs.iter().any(|lv| lv.name == to) {
            return Err(PoolError::Exists {
                pool: self.name.clone(),
                volume: to.to_string(),
            });
        }
        if self.find_volume(from)?.is_none() {
            return Err(PoolError::Missing {
                pool: self.name.clone(),
                volume: from.to_string(),
            });
        }
        let names = self.snapshot_names(from)?;
        // Every snapshot LV must fit LVM's limit under the new name, checked before the
        // first lvrename (a longer volume name lengthens each of them).
        for (snapshot, pending) in names
            .done
            .iter()
            .map(|s| (s, false))
            .chain(names.pending.iter().map(|s| (s, true)))
        {
            let lv = if pending {
                Self::pending_lv(to, snapshot)
            } else {
                Self::snapshot_lv(to, snapshot)
            };
            self.check_lv_len(
                &lv,
                &format!("cannot rename volume '{from}' to '{to}': snapshot '{snapshot}'"),
            )?;
        }
        self.lvm(&["lvrename", &self.vg, from, to])?;
        let stored = |volume: &str, snapshot: &str, pending: bool| {
            if pending {
                Self::pending_lv(volume, snapshot)
            } else {
                Self::snapshot_lv(volume, snapshot)
            }
        };
        let done = names.done.iter().map(|s| (s, false));
        for (snapshot, pending) in done.chain(names.pending.iter().map(|s| (s, true))) {
            let (old, new) = (
                stored(from, snapshot, pending),
                stored(to, snapshot, pending),
            );
            self.lvm(&["lvrename", &self.vg, &old, &new])?;
        }
        Ok(())
    }

    fn device_path(&self, volume: &str) -> PathBuf {
        PathBuf::from(format!("/dev/{}/{volume}", self.vg))
    }

    fn list(&self) -> Result<Vec<StoredVolume>, PoolError> {
        let lvs = self.lvs()?;
        let mut found: Vec<_> = lvs
            .into_iter()
            .filter(|lv| {
                lv.kind == LvKind::ThinVolume
                    && lv.pool_lv == self.thinpool
                    && lv.is_tandem()
                    && !lv.name.contains('+')
            })
            .map(|lv| StoredVolume {
                name: lv.name,
                size_bytes: lv.size_bytes,
            })
            .collect();
        found.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(found)
    }

    /// One `lvm` call (it runs while the Primary holds writes): `lvcreate` itself refuses an
    /// existing name or a missing origin, and its message is mapped.
    fn take_snapshot(&self, volume: &str, snapshot: &str) -> Result<(), PoolError> {
        self.check_new_snapshot(volume, snapshot)?;
        let lv = Self::pending_lv(volume, snapshot);
        // The engine writes through the page cache: fsync of the block device writes out
        // every dirty page of it, so the snapshot holds every write applied so far.
        let device = self.device_path(volume);
        if device.exists() {
            std::fs::File::open(&device)
                .and_then(|d| d.sync_all())
                .map_err(|source| PoolError::Io {
                    pool: self.name.clone(),
                    op: "flush",
                    path: device.clone(),
                    source,
                })?;
        }
        match self.thin_snapshot(volume, &lv, false) {
            Err(PoolError::Command { message, .. }) if message.contains("already exists") => {
                Err(PoolError::SnapshotExists {
                    pool: self.name.clone(),
                    volume: volume.to_string(),
                    snapshot: snapshot.to_string(),
                })
            }
            Err(PoolError::Command { message, .. })
                if message.contains("Failed to find") || message.contains("not found") =>
            {
                Err(self.missing(volume))
            }
            other => other,
        }
    }

    /// One `lvrename`; only when it fails does `lvs` tell why (or that it was done).
    fn commit_snapshot(&self, volume: &str, snapshot: &str) -> Result<(), PoolError> {
        let (pending, done) = (
            Self::pending_lv(volume, snapshot),
            Self::snapshot_lv(volume, snapshot),
        );
        let Err(failed) = self.lvm(&["lvrename", &self.vg, &pending, &done]) else {
            return Ok(());
        };
        let names = self.snapshot_names(volume)?;
        let has = |list: &[String]| list.iter().any(|s| s == snapshot);
        match (has(&names.pending), has(&names.done)) {
            (false, true) => Ok(()),
            (true, true) => Err(PoolError::SnapshotExists {
                pool: self.name.clone(),
                volume: volume.to_string(),
                snapshot: snapshot.to_string(),
            }),
            (false, false) => Err(PoolError::MissingSnapshot {
                pool: self.name.clone(),
                volume: volume.to_string(),
                snapshot: snapshot.to_string(),
            }),
            (true, false) => Err(failed),
        }
    }

    fn discard_snapshot(&self, volume: &str, snapshot: &str) -> Result<(), PoolError> {
        let lv = Self::pending_lv(volume, snapshot);
        if self.find_lv(&lv)?.is_none() {
            return Ok(());
        }
        self.lvm(&["lvremove", "-y", &self.lv_path(&lv)])
            .map(|_| ())
    }

    fn snapshot_names(&self, volume: &str) -> Result<super::SnapshotNames, PoolError> {
        let lvs = self.lvs()?;
        let prefix = format!("{volume}+");
        Ok(super::SnapshotNames::from_stored(Self::names_after(
            &lvs,
            &self.thinpool,
            &prefix,
        )))
    }

    fn pending_snapshots(&self) -> Result<Vec<(String, String)>, PoolError> {
        let lvs = self.lvs()?;
        let mut found: Vec<(String, String)> = Self::names_after(&lvs, &self.thinpool, "")
            .into_iter()
            .filter_map(|name| {
                let (volume, stored) = name.split_once('+')?;
                match super::split_stored(stored) {
                    Some((snapshot, true)) => Some((volume.to_string(), snapshot.to_string())),
                    _ => None,
                }
            })
            .collect();
        found.sort();
        Ok(found)
    }

    fn delete_snapshot(&self, volume: &str, snapshot: &str) -> Result<(), PoolError> {
        let lv = self.require_snapshot(volume, snapshot)?;
        self.lvm(&["lvremove", "-y", &self.lv_path(&lv)])
            .map(|_| ())
    }

    fn rollback(&self, volume: &str, snapshot: &str) -> Result<(), PoolError> {
        let snap_lv = self.require_snapshot(volume, snapshot)?;
        let fresh = format!("{volume}+.rollback");
        let old = format!("{volume}+.old");
        let lvs = self.lvs()?;
        let has = |name: &str| lvs.iter().any(|l| l.name == name);
        if !has(volume) && !has(&old) {
            return Err(self.missing(volume));
        }
        // Leftovers of an interrupted rollback: a fresh clone is made again.
        if has(&fresh) {
            self.lvm(&["lvremove", "-y", &self.lv_path(&fresh)])?;
        }
        self.thin_snapshot(&snap_lv, &fresh, true)?;
        if has(volume) {
            if has(&old) {
                self.lvm(&["lvremove", "-y", &self.lv_path(&old)])?;
            }
            self.lvm(&["lvrename", &self.vg, volume, &old])?;
        }
        self.lvm(&["lvrename", &self.vg, &fresh, volume])?;
        self.lvm(&["lvremove", "-y", &self.lv_path(&old)])
            .map(|_| ())
    }

    /// One `lvm` call (the clone is timed): `lvcreate` itself refuses an existing name or
    /// a missing origin, and its message is mapped. The size is read from the new LV's
    /// device (active: `-kn`), falling back to `lvs` when it cannot be opened.
    fn clone_volume(
        &self,
        source: &str,
        snapshot: Option<&str>,
        new: &str,
    ) -> Result<u64, PoolError> {
        self.check_name(new)?;
        let origin = match snapshot {
            Some(s) => Self::snapshot_lv(source, s),
            None => source.to_string(),
        };
        match self.thin_snapshot(&origin, new, true) {
            Err(PoolError::Command { message, .. }) if message.contains("already exists") => {
                return Err(PoolError::Exists {
                    pool: self.name.clone(),
                    volume: new.to_string(),
                })
            }
            Err(PoolError::Command { message, .. })
                if message.contains("Failed to find") || message.contains("not found") =>
            {
                return Err(match snapshot {
                    Some(s) => PoolError::MissingSnapshot {
                        pool: self.name.clone(),
                        volume: source.to_string(),
                        snapshot: s.to_string(),
                    },
                    None => self.missing(source),
                })
            }
            other => other?,
        }
        match block_device_size(&self.device_path(new)) {
            Some(size) => Ok(size),
            None => self
                .find_volume(new)?
                .map(|lv| lv.size_bytes)
                .ok_or_else(|| self.missing(new)),
        }
    }
}

/// The size of the block device at `path` (a `/dev/<vg>/<lv>` link, to a `dm-N` node under
/// udev or to a `/dev/mapper` node that lvm made itself), without running `lvm`: its end
/// offset. `None` when there is no such device.
fn block_device_size(path: &std::path::Path) -> Option<u64> {
    use std::io::Seek;
    let mut device = std::fs::File::open(path).ok()?;
    device.seek(std::io::SeekFrom::End(0)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lvm_reserved_names_are_refused_with_a_reason() {
        let pool = LvmThinPool::new("nvme", "vg", "thin", 90);
        pool.check_name("vm-100-disk-0").unwrap();
        for bad in [
            "a_tdata",
            "x_tmeta_y",
            "v_rimage_0",
            "m_mlog",
            "snapshot1",
            "pvmove0",
        ] {
            let e = pool.check_name(bad).unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("pool 'nvme': volume name '{bad}'")),
                "{e}"
            );
        }
    }

    #[test]
    fn usage_follows_data_percent() {
        let pool = LvmThinPool::new("nvme", "vg", "thin", 90);
        let lv = Lv {
            name: "thin".into(),
            vg: "vg".into(),
            kind: LvKind::ThinPool,
            size_bytes: 1 << 30,
            pool_lv: String::new(),
            data_percent: Some(25.0),
            tags: vec![],
        };
        let (usage, percent) = pool.usage_from(&lv);
        assert_eq!(percent, 25.0);
        assert_eq!(usage.total_bytes, 1 << 30);
        assert_eq!(usage.used_bytes, 1 << 28);
        assert_eq!(usage.free_bytes, 3 << 28);
    }

    #[test]
    fn a_missing_lvm_binary_is_a_clear_error() {
        let pool = LvmThinPool::new("nvme", "vg", "thin", 90).with_lvm_binary("/nonexistent/lvm");
        let e = pool.usage().unwrap_err().to_string();
        assert!(e.contains("cannot run /nonexistent/lvm"), "{e}");
    }

    /// A stand-in for `lvm` that keeps LVs as JSON rows in `$STATE/lvs/` and answers with
    /// lvm2's report format; it rounds sizes to 4 MiB extents like lvm does. It checks
    /// the exact command lines the backend sends (the real lvm is exercised in the VM test).
    const FAKE_LVM: &str = r#"#!/bin/bash
S="@STATE@"
echo "$*" >> "$S/calls"
row() { printf '{"lv_name":"%s", "vg_name":"vg", "lv_attr":"%s", "lv_size":"%s", "pool_lv":"%s", "data_percent":"%s", "lv_tags":"%s"}' "$@"; }
case "$1" in
lvs)
  [ "$*" = "lvs --reportformat json --units b --nosuffix -o lv_name,vg_name,lv_attr,lv_size,pool_lv,data_percent,lv_tags vg" ] || { echo "bad lvs: $*" >&2; exit 3; }
  printf '  {\n      "report": [\n          {\n              "lv": ['
  sep=""
  for f in "$S"/lvs/*; do [ -e "$f" ] || continue; printf '%s\n                  %s' "$sep" "$(cat "$f")"; sep=","; done
  printf '\n              ]\n          }\n      ]\n  }\n' ;;
lvcreate)
  if [ "$2" = -n ]; then
    name=$3
    case "${*:4}" in
      "-pr -s vg/"*" --addtag tandem -y --noudevsync --ignoremonitoring"|"-prw -kn -s vg/"*" --addtag tandem -y --ignoremonitoring") ;;
      *) echo "bad lvcreate -s: $*" >&2; exit 3 ;;
    esac
    [ "$4" = -pr ] && origin=${6#vg/} || origin=${7#vg/}
    [ -e "$S/lvs/$origin" ] || { echo "  Failed to find LV $origin" >&2; exit 5; }
    [ -e "$S/lvs/$name" ] && { echo "  Logical Volume \"$name\" already exists" >&2; exit 5; }
    sed "s/\"lv_name\":\"$origin\"/\"lv_name\":\"$name\"/" "$S/lvs/$origin" > "$S/lvs/$name"
    exit 0
  fi
  [ "$2" = -V ] && [ "$4 $5 $6 $8 $9 ${10}" = "-T vg/thin -n --addtag tandem -y" ] || { echo "bad lvcreate: $*" >&2; exit 3; }
  size=${3%b}; name=$7
  [ -e "$S/lvs/$name" ] && { echo "  Logical Volume \"$name\" already exists in volume group \"vg\"" >&2; exit 5; }
  size=$(( (size + 4194303) / 4194304 * 4194304 ))
  row "$name" Vwi-a-tz-- "$size" thin 0.00 tandem > "$S/lvs/$name" ;;
lvextend)
  [ "$2" = -L ] || { echo "bad lvextend: $*" >&2; exit 3; }
  size=${3%b}; name=${4#vg/}
  size=$(( (size + 4194303) / 4194304 * 4194304 ))
  row "$name" Vwi-a-tz-- "$size" thin 0.00 tandem > "$S/lvs/$name" ;;
lvremove)
  [ "$2" = -y ] || { echo "bad lvremove: $*" >&2; exit 3; }
  rm "$S/lvs/${3#vg/}" ;;
lvrename)
  [ "$2" = vg ] && [ -e "$S/lvs/$3" ] && [ ! -e "$S/lvs/$4" ] || { echo "bad lvrename: $*" >&2; exit 3; }
  sed "s/\"lv_name\":\"$3\"/\"lv_name\":\"$4\"/" "$S/lvs/$3" > "$S/lvs/$4" && rm "$S/lvs/$3" ;;
*) echo "unexpected: $*" >&2; exit 3 ;;
esac
"#;

    fn fake_lvm(pool_percent: &str) -> (tempfile::TempDir, LvmThinPool) {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path();
        std::fs::create_dir(state.join("lvs")).unwrap();
        let script = state.join("lvm");
        std::fs::write(
            &script,
            FAKE_LVM.replace("@STATE@", state.to_str().unwrap()),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        // A process another test thread forks while we write the script can hold the
        // write descriptor until it execs; wait out ETXTBSY once here.
        for _ in 0..100 {
            match Command::new(&script).arg("noop").output() {
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                _ => break,
            }
        }
        let row = |name: &str, attr: &str, size: u64, pool: &str, pct: &str, tags: &str| {
            format!(
                r#"{{"lv_name":"{name}", "vg_name":"vg", "lv_attr":"{attr}", "lv_size":"{size}", "pool_lv":"{pool}", "data_percent":"{pct}", "lv_tags":"{tags}"}}"#
            )
        };
        std::fs::write(
            state.join("lvs/thin"),
            row("thin", "twi-aotz--", 1 << 30, "", pool_percent, ""),
        )
        .unwrap();
        std::fs::write(
            state.join("lvs/foreign"),
            row("foreign", "Vwi-a-tz--", 8 << 20, "thin", "0.00", ""),
        )
        .unwrap();
        let pool =
            LvmThinPool::new("nvme", "vg", "thin", 90).with_lvm_binary(script.to_str().unwrap());
        (dir, pool)
    }

    #[test]
    fn lifecycle_through_lvm_commands() {
        let (dir, pool) = fake_lvm("25.00");
        pool.open_check().unwrap();
        let usage = pool.usage().unwrap();
        assert_eq!(usage.total_bytes, 1 << 30);
        assert_eq!(usage.used_bytes, 1 << 28);
        // lvm rounds up to whole extents; the backend reports what lvm allocated.
        assert_eq!(pool.create("v1", 6 << 20).unwrap(), 8 << 20);
        assert!(matches!(
            pool.create("v1", 4096),
            Err(PoolError::Exists { .. })
        ));
        assert_eq!(pool.grow("v1", 12 << 20).unwrap(), 12 << 20);
        assert_eq!(pool.grow("v1", 4 << 20).unwrap(), 12 << 20, "never shrinks");
        assert_eq!(
            pool.list().unwrap(),
            vec![StoredVolume {
                name: "v1".into(),
                size_bytes: 12 << 20
            }],
            "untagged LVs are not Tandem's"
        );
        assert_eq!(pool.device_path("v1"), PathBuf::from("/dev/vg/v1"));
        // A foreign LV of the same name is never grown or removed.
        assert!(matches!(
            pool.create("foreign", 4096),
            Err(PoolError::Exists { .. })
        ));
        let e = pool.delete("foreign").unwrap_err().to_string();
        assert!(e.contains("not a Tandem volume"), "{e}");
        assert!(matches!(
            pool.rename("v1", "foreign"),
            Err(PoolError::Exists { .. })
        ));
        assert!(matches!(
            pool.rename("v1", "snapshot"),
            Err(PoolError::BadName { .. })
        ));
        let e = pool.rename("foreign", "x").unwrap_err().to_string();
        assert!(e.contains("not a Tandem volume"), "{e}");
        pool.rename("v1", "v2").unwrap();
        assert_eq!(pool.list().unwrap()[0].name, "v2");
        pool.rename("v2", "v1").unwrap();
        pool.delete("v1").unwrap();
        assert!(matches!(pool.delete("v1"), Err(PoolError::Missing { .. })));
        assert!(pool.list().unwrap().is_empty());
        let calls = std::fs::read_to_string(dir.path().join("calls")).unwrap();
        assert!(calls.contains("lvcreate -V 6291456b -T vg/thin -n v1 --addtag tandem -y"));
        assert!(calls.contains("lvextend -L 12582912b vg/v1"));
        assert!(calls.contains("lvremove -y vg/v1"));
        assert!(calls.contains("lvrename vg v1 v2"));
        assert!(!calls.contains("vg/foreign"), "{calls}");
    }

    #[test]
    fn snapshots_clones_and_rollback_through_lvm_commands() {
        let (dir, pool) = fake_lvm("25.00");
        pool.create("v1", 8 << 20).unwrap();
        // A snapshot is pending (not listed) until it is committed.
        pool.take_snapshot("v1", "s1").unwrap();
        assert!(pool.snapshots("v1").unwrap().is_empty());
        assert_eq!(
            pool.pending_snapshots().unwrap(),
            vec![("v1".to_string(), "s1".to_string())]
        );
        assert!(matches!(
            pool.take_snapshot("v1", "s1"),
            Err(PoolError::SnapshotExists { .. })
        ));
        pool.commit_snapshot("v1", "s1").unwrap();
        pool.commit_snapshot("v1", "s1").unwrap();
        assert!(pool.pending_snapshots().unwrap().is_empty());
        assert!(matches!(
            pool.commit_snapshot("v1", "s9"),
            Err(PoolError::MissingSnapshot { .. })
        ));
        pool.take_snapshot("v1", "s2").unwrap();
        pool.discard_snapshot("v1", "s2").unwrap();
        pool.discard_snapshot("v1", "s2").unwrap();
        assert!(pool.snapshot_names("v1").unwrap().pending.is_empty());
        assert!(matches!(
            pool.snapshot("v1", "s1"),
            Err(PoolError::SnapshotExists { .. })
        ));
        assert!(pool.pending_snapshots().unwrap().is_empty(), "discarded");
        assert!(matches!(
            pool.snapshot("v9", "s1"),
            Err(PoolError::Missing { .. })
        ));
        assert_eq!(pool.snapshots("v1").unwrap(), vec!["s1"]);
        assert_eq!(pool.list().unwrap().len(), 1, "snapshots are not volumes");
        assert_eq!(pool.clone_volume("v1", Some("s1"), "c1").unwrap(), 8 << 20);
        assert_eq!(pool.clone_volume("v1", None, "c2").unwrap(), 8 << 20);
        assert!(matches!(
            pool.clone_volume("v1", None, "c1"),
            Err(PoolError::Exists { .. })
        ));
        assert!(matches!(
            pool.clone_volume("v1", Some("s9"), "c3"),
            Err(PoolError::MissingSnapshot { .. })
        ));
        pool.rollback("v1", "s1").unwrap();
        assert_eq!(pool.snapshots("v1").unwrap(), vec!["s1"]);
        let names: Vec<_> = pool.list().unwrap().into_iter().map(|v| v.name).collect();
        assert_eq!(names, vec!["c1", "c2", "v1"]);
        // A pending snapshot follows its volume's rename and goes with its delete.
        pool.take_snapshot("v1", "s3").unwrap();
        pool.rename("v1", "v2").unwrap();
        assert_eq!(pool.snapshots("v2").unwrap(), vec!["s1"]);
        assert_eq!(
            pool.pending_snapshots().unwrap(),
            vec![("v2".to_string(), "s3".to_string())]
        );
        pool.delete("v2").unwrap();
        assert!(pool.snapshots("v2").unwrap().is_empty());
        assert!(pool.pending_snapshots().unwrap().is_empty());
        let calls = std::fs::read_to_string(dir.path().join("calls")).unwrap();
        for expected in [
            "lvcreate -n v1+s1+pending -pr -s vg/v1 --addtag tandem -y --noudevsync --ignoremonitoring",
            "lvrename vg v1+s1+pending v1+s1",
            "lvremove -y vg/v1+s2+pending",
            "lvcreate -n c1 -prw -kn -s vg/v1+s1 --addtag tandem -y --ignoremonitoring",
            "lvcreate -n c2 -prw -kn -s vg/v1 --addtag tandem -y --ignoremonitoring",
            "lvcreate -n v1+.rollback -prw -kn -s vg/v1+s1 --addtag tandem -y --ignoremonitoring",
            "lvrename vg v1 v1+.old",
            "lvrename vg v1+.rollback v1",
            "lvremove -y vg/v1+.old",
            "lvrename vg v1+s1 v2+s1",
            "lvremove -y vg/v2+s1",
        ] {
            assert!(calls.contains(expected), "{expected} not in {calls}");
        }
    }

    #[test]
    fn the_longest_snapshot_name_is_what_fits_with_its_pending_suffix() {
        let (dir, pool) = fake_lvm("25.00");
        let volume = "v".repeat(64);
        pool.create(&volume, 8 << 20).unwrap();
        // `<64>+<54>+pending` has 127 characters: the longest a new snapshot may have.
        let longest = "s".repeat(54);
        pool.check_new_snapshot(&volume, &longest).unwrap();
        let e = pool
            .check_new_snapshot(&volume, &"s".repeat(55))
            .unwrap_err()
            .to_string();
        assert!(e.contains("would have 128 characters"), "{e}");
        pool.snapshot(&volume, &longest).unwrap();
        let calls = std::fs::read_to_string(dir.path().join("calls")).unwrap();
        assert!(calls.contains(&format!("-n {volume}+{longest}+pending ")));
        // A shorter volume takes a longer snapshot name; renaming the volume to a longer
        // name is refused before anything changes when its snapshot LV would not fit.
        pool.create("v2", 8 << 20).unwrap();
        let long = "s".repeat(63);
        pool.snapshot("v2", &long).unwrap();
        let e = pool.rename("v2", &"w".repeat(64)).unwrap_err().to_string();
        assert!(e.contains(&format!("snapshot '{long}'")), "{e}");
        assert_eq!(pool.snapshots("v2").unwrap(), vec![long.clone()]);
        pool.rename("v2", &"w".repeat(63)).unwrap();
        assert_eq!(pool.snapshots(&"w".repeat(63)).unwrap(), vec![long]);
    }

    #[test]
    fn a_full_pool_refuses_and_a_missing_pool_is_named() {
        let (_dir, pool) = fake_lvm("93.10");
        let e = pool.check_room(4096).unwrap_err().to_string();
        assert_eq!(
            e,
            "pool 'nvme' is 93.1% full (thin pool vg/thin), over its max_fill_percent of 90%"
        );
        let (_dir, pool) = fake_lvm("50.00");
        let e = pool.check_room(1 << 30).unwrap_err().to_string();
        assert_eq!(e, "pool 'nvme' has 512 MiB free, volume needs 1 GiB");
        let (dir, _) = fake_lvm("0.00");
        let other = LvmThinPool::new("nvme", "vg", "nothere", 90)
            .with_lvm_binary(dir.path().join("lvm").to_str().unwrap());
        let e = other.open_check().unwrap_err().to_string();
        assert!(e.contains("thin pool vg/nothere not found"), "{e}");
    }
}
