//! One node's part of `tandem snapshot rollback` on disk, and its completion at startup.
//!
//! **Crash order on one node** (each step durable before the next):
//!
//! 1. write `<state>/volumes/<name>/rollback.json` (`{snapshot, day0}`);
//! 2. replace the storage by the snapshot (file: reflink + rename; lvm-thin: clone, rename,
//!    remove, see the pools), grown back to the volume's size if the volume was resized
//!    after the snapshot (the grown range reads as zeroes, on every replica alike);
//! 3. replace the replication metadata by a new one of generation `day0`;
//! 4. remove the marker.
//!
//! Storage rolled back under the old metadata would look in sync with the peers while it
//! is not; so at startup [`complete_interrupted_rollbacks`] redoes steps 2 to 4 for every
//! marker it finds (each step is idempotent), before any replica opens. If that fails the
//! marker stays and the replica is not opened (see [`pending`]), with the command that
//! finishes the rollback in the log.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::engine::Engine;
use crate::pool::Pool;
use crate::store::{Store, VolumeDefinition};

/// A rollback in progress on this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackMarker {
    pub snapshot: String,
    pub day0: u64,
}

/// Why a rollback step failed on this node.
#[derive(Debug, thiserror::Error)]
pub enum RollbackError {
    #[error("cannot {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot roll the storage back")]
    Pool(#[source] crate::pool::PoolError),
    #[error("cannot start the new generation: {0}")]
    Metadata(String),
}

fn marker_path(store: &Store, volume: &str) -> PathBuf {
    store.dir().join(volume).join("rollback.json")
}

/// The marker of an interrupted rollback of `volume`, if any.
pub fn pending(store: &Store, volume: &str) -> Option<RollbackMarker> {
    let text = std::fs::read(marker_path(store, volume)).ok()?;
    serde_json::from_slice(&text).ok()
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> RollbackError {
    let path = path.to_path_buf();
    move |source| RollbackError::Io { op, path, source }
}

fn sync_dir(dir: &Path) -> Result<(), RollbackError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("sync", dir))
}

/// Steps 1 to 4 of the module doc for this node's copy of `definition` (`backend` is
/// `None` on a diskless tiebreaker).
pub fn rollback_on_disk(
    store: &Store,
    backend: Option<&dyn Pool>,
    engine: &dyn Engine,
    node: &str,
    definition: &VolumeDefinition,
    marker: &RollbackMarker,
) -> Result<(), RollbackError> {
    let path = marker_path(store, &definition.name);
    let dir = store.dir().join(&definition.name);
    std::fs::create_dir_all(&dir).map_err(io("create", &dir))?;
    let text = serde_json::to_vec(marker).map_err(|e| RollbackError::Io {
        op: "encode",
        path: path.clone(),
        source: e.into(),
    })?;
    std::fs::write(&path, text)
        .and_then(|()| std::fs::File::open(&path)?.sync_all())
        .map_err(io("write", &path))?;
    sync_dir(&dir)?;
    if let Some(backend) = backend {
        backend
            .rollback(&definition.name, &marker.snapshot)
            .map_err(RollbackError::Pool)?;
        // A snapshot taken before a resize is smaller than the volume: grow it back to the
        // definition's size (the new range reads as zeroes on every replica alike).
        backend
            .grow(&definition.name, definition.size_bytes)
            .map_err(RollbackError::Pool)?;
    }
    if definition.is_replicated() {
        let meta_dir = dir.join("meta");
        match std::fs::remove_dir_all(&meta_dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io("remove", &meta_dir)(e))
            }
            _ => {}
        }
        let peers: Vec<&str> = definition.peers(node).collect();
        engine
            .create_metadata(&meta_dir, definition.size_bytes, marker.day0, &peers)
            .map_err(|e| RollbackError::Metadata(e.message))?;
    }
    std::fs::remove_file(&path).map_err(io("remove", &path))?;
    sync_dir(&dir)
}

/// At startup: finish every rollback a crash interrupted (see the module doc).
pub fn complete_interrupted_rollbacks(
    store: &Store,
    pool_for: &dyn Fn(&str) -> Option<std::sync::Arc<dyn Pool>>,
    engine: &dyn Engine,
    node: &str,
    definitions: &[VolumeDefinition],
) {
    for definition in definitions {
        let Some(marker) = pending(store, &definition.name) else {
            continue;
        };
        let name = &definition.name;
        tracing::warn!(volume = %name, snapshot = %marker.snapshot,
            "completing a rollback interrupted by a crash");
        let backend = (!definition.diskless)
            .then(|| pool_for(&definition.pool))
            .flatten();
        if let Err(e) =
            rollback_on_disk(store, backend.as_deref(), engine, node, definition, &marker)
        {
            tracing::error!(volume = %name, error = %crate::report::error_chain(&e),
                "cannot complete the interrupted rollback; the replica stays closed until `tandem snapshot rollback {name} {}` succeeds", marker.snapshot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::NoEngine;
    use crate::pool::file::tests::Mounted;
    use std::sync::Arc;

    #[test]
    fn startup_finishes_a_rollback_cut_after_its_marker() {
        let fs = Mounted::xfs_reflink();
        let pool: Arc<dyn Pool> = Arc::new(fs.pool());
        let state = tempfile::tempdir().unwrap();
        let store = Store::open(state.path()).unwrap();
        let definition = VolumeDefinition {
            version: 1,
            name: "v".into(),
            pool: "files".into(),
            size_bytes: 1 << 20,
            created_unix: 0,
            nodes: vec!["hv1".into(), "hv2".into()],
            tiebreakers: vec![],
            diskless: false,
            options: Default::default(),
            renamed_from: None,
            clone_of: None,
        };
        store.save(&definition).unwrap();
        pool.create("v", 1 << 20).unwrap();
        let disk = pool.device_path("v");
        std::fs::write(&disk, vec![1u8; 1 << 20]).unwrap();
        pool.snapshot("v", "s1").unwrap();
        std::fs::write(&disk, vec![2u8; 1 << 20]).unwrap();
        // The crash came right after step 1: the marker, nothing else.
        let marker = RollbackMarker {
            snapshot: "s1".into(),
            day0: 42,
        };
        std::fs::create_dir_all(state.path().join("volumes/v")).unwrap();
        std::fs::write(
            marker_path(&store, "v"),
            serde_json::to_vec(&marker).unwrap(),
        )
        .unwrap();
        assert_eq!(pending(&store, "v"), Some(marker));

        let pool_for = |_: &str| Some(Arc::clone(&pool));
        let engine = NoEngine::new("hv1");
        complete_interrupted_rollbacks(&store, &pool_for, engine.as_ref(), "hv1", &[definition]);
        assert_eq!(std::fs::read(&disk).unwrap(), vec![1u8; 1 << 20]);
        assert!(store.dir().join("v/meta").is_dir(), "new metadata");
        assert_eq!(pending(&store, "v"), None, "marker removed");
    }
}
