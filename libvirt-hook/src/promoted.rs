//! Which volumes the hook promoted for which domain, so that `release` demotes exactly
//! those even if tandemd reports them as promoted explicitly.
//!
//! After a successful `prepare`, the hook writes `<run_dir>/libvirt-hook/promoted/<domain>`
//! (one volume per line; temp file + rename). `release` reads and removes it. The file lives
//! on the run dir (tmpfs): after a reboot no domain runs and no volume is Primary, so
//! nothing is lost. Without a record (hook upgraded, file lost) `release` falls back to the
//! status: a volume Primary and not `promoted_explicitly` is demoted.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Errors of the record store.
#[derive(Debug, thiserror::Error)]
pub enum PromotedError {
    #[error("cannot record the promoted volumes in {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn record_path(run_dir: &Path, domain: &str) -> PathBuf {
    let safe: String = domain
        .chars()
        .map(|c| if c == '/' || c == '\0' { '_' } else { c })
        .collect();
    run_dir.join("libvirt-hook/promoted").join(safe)
}

/// Add `volumes` to `domain`'s record (a no-op for none).
pub fn add(run_dir: &Path, domain: &str, volumes: &[String]) -> Result<(), PromotedError> {
    if volumes.is_empty() {
        return Ok(());
    }
    let path = record_path(run_dir, domain);
    let mut all = read(run_dir, domain);
    for v in volumes {
        if !all.contains(v) {
            all.push(v.clone());
        }
    }
    let write = || -> std::io::Result<()> {
        let dir = path.parent().unwrap_or(run_dir);
        std::fs::create_dir_all(dir)?;
        let tmp = dir.join(format!(".{}.tmp", std::process::id()));
        let mut file = std::fs::File::create(&tmp)?;
        for v in &all {
            writeln!(file, "{v}")?;
        }
        file.sync_all()?;
        std::fs::rename(&tmp, &path)
    };
    write().map_err(|source| PromotedError::Write {
        path: path.clone(),
        source,
    })
}

/// The volumes recorded for `domain` (empty when none).
pub fn read(run_dir: &Path, domain: &str) -> Vec<String> {
    std::fs::read_to_string(record_path(run_dir, domain))
        .map(|text| {
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// Forget `domain`'s record.
pub fn clear(run_dir: &Path, domain: &str) {
    let _ = std::fs::remove_file(record_path(run_dir, domain));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_accumulate_per_domain_and_clear() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read(dir.path(), "vm1").is_empty());
        add(dir.path(), "vm1", &["a".into()]).unwrap();
        add(dir.path(), "vm1", &["b".into(), "a".into()]).unwrap();
        add(dir.path(), "vm2", &[]).unwrap();
        assert_eq!(read(dir.path(), "vm1"), ["a", "b"]);
        assert!(read(dir.path(), "vm2").is_empty());
        clear(dir.path(), "vm1");
        assert!(read(dir.path(), "vm1").is_empty());
    }
}
