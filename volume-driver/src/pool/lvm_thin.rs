//! The `lvm-thin` pool: one thin LV `<vg>/<volume>` per volume in an existing thin pool
//! `<vg>/<thinpool>`, driven only through the `lvm` command and its JSON reports.
//!
//! | operation | command |
//! | --- | --- |
//! | inspect | `lvm lvs --reportformat json --units b --nosuffix -o <fields> <vg>` |
//! | create  | `lvm lvcreate -V <bytes>b -T <vg>/<thinpool> -n <volume> --addtag tandem -y` |
//! | grow    | `lvm lvextend -L <bytes>b <vg>/<volume>` |
//! | delete  | `lvm lvremove -y <vg>/<volume>` |
//!
//! The LV name is the volume name; LVs Tandem made carry the tag `tandem`, and only those
//! are listed, grown or removed. Usage is the thin pool's `lv_size` and `data_percent`;
//! creating and growing are refused while the pool is fuller than `max_fill_percent`.
//! LVM rounds sizes up to whole extents, so create and grow return the size lvm reports.
//! The `lvm` binary is taken from `PATH` unless `TANDEM_LVM` names another one.

use std::path::PathBuf;
use std::process::Command;

use super::lvm_report::{parse_lvs, Lv, LvKind, LVS_FIELDS};
use super::{Pool, PoolError, PoolUsage, StoredVolume};
use crate::report::error_chain;
use crate::units::format_size;

/// The tag on every LV Tandem creates.
pub const TAG: &str = "tandem";

/// Environment variable naming the `lvm` binary (default: `lvm` from `PATH`).
pub const LVM_ENV: &str = "TANDEM_LVM";

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
        }
    }

    fn lvm(&self, args: &[&str]) -> Result<String, PoolError> {
        let binary = std::env::var(LVM_ENV).unwrap_or_else(|_| "lvm".to_string());
        let command_line = format!("{binary} {}", args.join(" "));
        let failed = |message: String| PoolError::Command {
            pool: self.name.clone(),
            command: command_line.clone(),
            message,
        };
        tracing::debug!(pool = %self.name, command = %command_line, "running lvm");
        let output = Command::new(&binary)
            .args(args)
            .env("LC_ALL", "C")
            .env("LVM_SUPPRESS_FD_WARNINGS", "1")
            .output()
            .map_err(|e| failed(format!("cannot run {binary}: {e}")))?;
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
        self.lvm(&["lvremove", "-y", &self.lv_path(volume)])
            .map(|_| ())
    }

    fn device_path(&self, volume: &str) -> PathBuf {
        PathBuf::from(format!("/dev/{}/{volume}", self.vg))
    }

    fn list(&self) -> Result<Vec<StoredVolume>, PoolError> {
        let lvs = self.lvs()?;
        let mut found: Vec<_> = lvs
            .into_iter()
            .filter(|lv| {
                lv.kind == LvKind::ThinVolume && lv.pool_lv == self.thinpool && lv.is_tandem()
            })
            .map(|lv| StoredVolume {
                name: lv.name,
                size_bytes: lv.size_bytes,
            })
            .collect();
        found.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(found)
    }
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
        std::env::set_var(LVM_ENV, "/nonexistent/lvm");
        let pool = LvmThinPool::new("nvme", "vg", "thin", 90);
        let e = pool.usage().unwrap_err().to_string();
        std::env::remove_var(LVM_ENV);
        assert!(e.contains("cannot run /nonexistent/lvm"), "{e}");
    }
}
