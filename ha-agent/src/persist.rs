//! Crash-safe small files: write a temp file, fsync it, rename it over the target, fsync
//! the directory. A reader sees the old or the new content, never a torn one. The agent's
//! JSON state files (registry, placement) load and save through here.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Errors reading or writing one of the agent's JSON files; `what` names the file for the
/// operator ("registry", "placement file").
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("reading the {what} {}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the {what} {} is not valid JSON (move it away to start without it)", path.display())]
    Parse {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("writing the {what} {}", path.display())]
    Write {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Load `path` as JSON; a missing file is `T::default()` (first start).
pub fn load_json<T: DeserializeOwned + Default>(
    what: &'static str,
    path: &Path,
) -> Result<T, PersistError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| PersistError::Parse {
            what,
            path: path.to_path_buf(),
            source,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(source) => Err(PersistError::Read {
            what,
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Write `value` to `path` as JSON, atomically and durably.
pub fn save_json<T: Serialize>(
    what: &'static str,
    path: &Path,
    value: &T,
) -> Result<(), PersistError> {
    let write_err = |source| PersistError::Write {
        what,
        path: path.to_path_buf(),
        source,
    };
    let bytes =
        serde_json::to_vec_pretty(value).map_err(|e| write_err(std::io::Error::other(e)))?;
    write_atomic(path, &bytes).map_err(write_err)
}

/// Replace `path` with `bytes` atomically and durably (creates the directory if needed).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    #[test]
    fn replaces_content() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/x.json");
        super::write_atomic(&p, b"one").unwrap();
        super::write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(p.parent().unwrap()).unwrap().count(), 1);
    }
}
