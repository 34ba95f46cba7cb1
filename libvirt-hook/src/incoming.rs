//! Remembering an incoming live migration between two hook calls.
//!
//! libvirt tells the destination that a start is an incoming migration only in the
//! `migrate begin` call; the `prepare begin -` that follows looks like a normal start
//! (libvirt 9.0 passes no reason). So `migrate` leaves a marker file
//! `<run_dir>/libvirt-hook/incoming/<domain>` holding the domain's UUID and the time, and
//! `prepare` consumes it. A marker older than [`MAX_AGE`] is stale (a migration that was
//! cancelled between the two calls) and is ignored: a later normal start must never arm
//! dual-primary. `release` removes any marker of its domain.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `migrate begin` and `prepare begin` run back to back in libvirt's Prepare phase.
pub const MAX_AGE: Duration = Duration::from_secs(120);

/// Errors of the marker store.
#[derive(Debug, thiserror::Error)]
pub enum MarkerError {
    #[error("cannot record the incoming migration in {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The marker directory under Tandem's run dir.
pub fn marker_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("libvirt-hook/incoming")
}

fn marker_path(run_dir: &Path, domain: &str) -> PathBuf {
    // Domain names may hold '/' in theory; keep the file inside the directory.
    let safe: String = domain
        .chars()
        .map(|c| if c == '/' || c == '\0' { '_' } else { c })
        .collect();
    marker_dir(run_dir).join(safe)
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Record that `domain` (with `uuid`) is migrating in (temp file + rename).
pub fn record(run_dir: &Path, domain: &str, uuid: &str) -> Result<(), MarkerError> {
    let path = marker_path(run_dir, domain);
    let write = || -> std::io::Result<()> {
        let dir = marker_dir(run_dir);
        std::fs::create_dir_all(&dir)?;
        let tmp = dir.join(format!(".{}.tmp", std::process::id()));
        let mut file = std::fs::File::create(&tmp)?;
        writeln!(file, "{uuid} {}", now_unix())?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path)
    };
    write().map_err(|source| MarkerError::Write {
        path: path.clone(),
        source,
    })
}

/// Whether a fresh marker for `domain` with `uuid` exists; removes the marker either way
/// (it is good for one `prepare`).
pub fn take(run_dir: &Path, domain: &str, uuid: &str) -> bool {
    let path = marker_path(run_dir, domain);
    let Ok(text) = std::fs::read_to_string(&path) else {
        return false;
    };
    let _ = std::fs::remove_file(&path);
    is_fresh(&text, uuid, now_unix())
}

/// Remove `domain`'s marker, if any.
pub fn clear(run_dir: &Path, domain: &str) {
    let _ = std::fs::remove_file(marker_path(run_dir, domain));
}

fn is_fresh(text: &str, uuid: &str, now: u64) -> bool {
    let mut words = text.split_whitespace();
    let (Some(marked_uuid), Some(Ok(at))) = (words.next(), words.next().map(str::parse::<u64>))
    else {
        return false;
    };
    marked_uuid == uuid && now >= at && now - at <= MAX_AGE.as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_marker_is_good_for_one_prepare_of_the_same_domain() {
        let dir = tempfile::tempdir().unwrap();
        record(dir.path(), "vm100", "u-1").unwrap();
        assert!(!take(dir.path(), "vm101", "u-1"));
        assert!(take(dir.path(), "vm100", "u-1"));
        assert!(!take(dir.path(), "vm100", "u-1"), "consumed");
        record(dir.path(), "vm100", "u-1").unwrap();
        assert!(
            !take(dir.path(), "vm100", "u-2"),
            "another domain of that name"
        );
        record(dir.path(), "a/b", "u").unwrap();
        clear(dir.path(), "a/b");
        assert!(!take(dir.path(), "a/b", "u"));
    }

    #[test]
    fn stale_or_garbled_markers_do_not_count() {
        assert!(is_fresh("u 1000", "u", 1000 + MAX_AGE.as_secs()));
        assert!(!is_fresh("u 1000", "u", 1001 + MAX_AGE.as_secs()));
        assert!(!is_fresh("u 2000", "u", 1000), "from the future");
        assert!(!is_fresh("u", "u", 1000));
        assert!(!is_fresh("", "u", 1000));
        assert!(!is_fresh("u x", "u", 1000));
    }
}
