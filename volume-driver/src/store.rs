//! Volume definitions on disk: `<state_dir>/volumes/<name>.json`, one file per volume.
//!
//! Every write is atomic: the JSON goes to `.<name>.json.tmp` in the same directory, is
//! fsynced, renamed over `<name>.json`, and the directory is fsynced. A reader therefore
//! sees the old definition or the new one, never a torn one; leftover `.tmp` files are
//! ignored and removed on load.
//!
//! Crash ordering (the daemon keeps to it; see `service`):
//!
//! - create: reserve the name in memory → allocate storage → write the definition. A crash
//!   before the definition leaves storage without a definition, which the startup check
//!   reports as a warning and never deletes (the operator decides). A failed definition write
//!   frees the storage again.
//! - resize: grow storage → rewrite the definition. A crash in between leaves storage larger
//!   than its definition; the startup check completes the resize (sizes only grow).
//! - delete: remove the definition → free storage. A crash in between leaves storage
//!   without a definition (reported, as above). A failed storage removal writes the
//!   definition back. So a definition never silently points at nothing; if storage vanished
//!   behind Tandem's back, the startup check marks the volume `missing` and says so.
//! - rename: new definition marked `renamed_from` → storage → metadata → remove the old
//!   definition → drop the marker; startup completes it (see [`crate::rename`]).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::names::validate_volume_name;
use crate::options::VolumeOptions;

/// Format version written into every definition.
pub const DEFINITION_VERSION: u32 = 1;

/// What Tandem knows about a volume, persisted across restarts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeDefinition {
    pub version: u32,
    pub name: String,
    pub pool: String,
    pub size_bytes: u64,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix: u64,
    /// The nodes holding data replicas, in the cluster's config order. Empty for a
    /// volume with a single replica on this node (no replication; definitions written
    /// before replication existed look like that).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    /// Diskless tiebreaker nodes voting for the volume's quorum.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tiebreakers: Vec<String>,
    /// This node is one of the tiebreakers: it holds this definition and no storage
    /// (`pool` is empty then).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub diskless: bool,
    /// Replication options (ignored for an unreplicated volume).
    #[serde(default)]
    pub options: VolumeOptions,
    /// Set while a rename from this name is in progress on this node (see
    /// [`crate::rename`]); startup completes the rename.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renamed_from: Option<String>,
    /// A linked clone's origin, `VOLUME` or `VOLUME@SNAPSHOT` (see [`crate::clone`]); an
    /// origin with clones is not deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone_of: Option<String>,
}

impl VolumeDefinition {
    /// A volume with replicas on more than one node, served through the replication engine.
    pub fn is_replicated(&self) -> bool {
        self.nodes.len() > 1
    }

    /// Every node of the volume other than `this`: data replicas and tiebreakers.
    pub fn peers<'a>(&'a self, this: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.nodes
            .iter()
            .chain(&self.tiebreakers)
            .map(String::as_str)
            .filter(move |n| *n != this)
    }
}

/// Errors of the definition store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("definition {path} is not valid")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("definition {path} is not valid: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// The directory of definitions.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io { op, path, source }
}

impl Store {
    /// Open (and create if needed) `<state_dir>/volumes`.
    pub fn open(state_dir: &Path) -> Result<Store, StoreError> {
        let dir = state_dir.join("volumes");
        fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
        Ok(Store { dir })
    }

    /// The directory holding the definitions.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where a volume's definition lives.
    pub fn path_of(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }

    fn sync_dir(&self) -> Result<(), StoreError> {
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("sync directory", &self.dir))
    }

    /// Write (create or replace) a definition atomically and durably.
    pub fn save(&self, definition: &VolumeDefinition) -> Result<(), StoreError> {
        let path = self.path_of(&definition.name);
        let tmp = self.dir.join(format!(".{}.json.tmp", definition.name));
        let mut json =
            serde_json::to_vec_pretty(definition).map_err(|source| StoreError::Corrupt {
                path: path.clone(),
                source,
            })?;
        json.push(b'\n');
        let written = (|| {
            let mut file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)
                .map_err(io_err("create", &tmp))?;
            file.write_all(&json).map_err(io_err("write", &tmp))?;
            file.sync_all().map_err(io_err("sync", &tmp))?;
            fs::rename(&tmp, &path).map_err(io_err("rename into place", &path))
        })();
        if written.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        written?;
        self.sync_dir()
    }

    /// Remove a definition durably. Removing one that does not exist is not an error.
    pub fn remove(&self, name: &str) -> Result<(), StoreError> {
        let path = self.path_of(name);
        match fs::remove_file(&path) {
            Ok(()) => self.sync_dir(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("remove", &path)(e)),
        }
    }

    /// Read every definition, sorted by name. Unreadable files are errors: the daemon must
    /// not start with a partial view of its volumes.
    pub fn load_all(&self) -> Result<Vec<VolumeDefinition>, StoreError> {
        let mut definitions = Vec::new();
        let entries = fs::read_dir(&self.dir).map_err(io_err("list", &self.dir))?;
        for entry in entries {
            let entry = entry.map_err(io_err("list", &self.dir))?;
            let path = entry.path();
            let Some(file_name) = entry.file_name().to_str().map(String::from) else {
                continue;
            };
            if file_name.starts_with('.') && file_name.ends_with(".json.tmp") {
                // An interrupted save: the rename never happened, the old file is intact.
                tracing::warn!(path = %path.display(), "removing leftover temporary definition");
                let _ = fs::remove_file(&path);
                continue;
            }
            let Some(name) = file_name.strip_suffix(".json") else {
                continue;
            };
            // `<name>/` directories hold replication metadata, not definitions.
            if entry.file_type().map_err(io_err("stat", &path))?.is_dir() {
                continue;
            }
            let text = fs::read(&path).map_err(io_err("read", &path))?;
            let definition: VolumeDefinition =
                serde_json::from_slice(&text).map_err(|source| StoreError::Corrupt {
                    path: path.clone(),
                    source,
                })?;
            let invalid = |message: String| StoreError::Invalid {
                path: path.clone(),
                message,
            };
            if definition.version != DEFINITION_VERSION {
                return Err(invalid(format!(
                    "version {} is not supported (expected {DEFINITION_VERSION})",
                    definition.version
                )));
            }
            if definition.name != name {
                return Err(invalid(format!(
                    "it names volume '{}' but the file is for '{name}'",
                    definition.name
                )));
            }
            validate_volume_name(name).map_err(|e| invalid(e.to_string()))?;
            definitions.push(definition);
        }
        definitions.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(definitions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn definition(name: &str, size: u64) -> VolumeDefinition {
        VolumeDefinition {
            version: DEFINITION_VERSION,
            name: name.into(),
            pool: "files".into(),
            size_bytes: size,
            created_unix: 1_700_000_000,
            nodes: Vec::new(),
            tiebreakers: Vec::new(),
            diskless: false,
            options: VolumeOptions::default(),
            renamed_from: None,
            clone_of: None,
        }
    }

    #[test]
    fn single_node_definitions_of_the_first_format_still_load() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        fs::write(
            store.path_of("old"),
            br#"{"version":1,"name":"old","pool":"files","size_bytes":4096,"created_unix":1}"#,
        )
        .unwrap();
        fs::create_dir_all(store.dir().join("old.json").with_extension("d")).unwrap();
        fs::create_dir_all(store.dir().join("meta.json")).unwrap();
        let loaded = store.load_all().unwrap();
        assert_eq!(loaded.len(), 1);
        assert!(!loaded[0].is_replicated());
        assert_eq!(loaded[0].options, VolumeOptions::default());
        // A replicated definition round-trips.
        let mut replicated = definition("r", 8192);
        replicated.nodes = vec!["hv1".into(), "hv2".into()];
        replicated.tiebreakers = vec!["witness".into()];
        store.save(&replicated).unwrap();
        let loaded = store.load_all().unwrap();
        assert_eq!(loaded[1], replicated);
        assert_eq!(
            replicated.peers("hv1").collect::<Vec<_>>(),
            vec!["hv2", "witness"]
        );
    }

    #[test]
    fn save_replace_reload_remove() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.save(&definition("v1", 4096)).unwrap();
        store.save(&definition("v2", 8192)).unwrap();
        store.save(&definition("v1", 65536)).unwrap();
        let reopened = Store::open(dir.path()).unwrap();
        assert_eq!(
            reopened.load_all().unwrap(),
            vec![definition("v1", 65536), definition("v2", 8192)]
        );
        let names: Vec<_> = fs::read_dir(store.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
        reopened.remove("v1").unwrap();
        reopened.remove("v1").unwrap();
        assert_eq!(reopened.load_all().unwrap(), vec![definition("v2", 8192)]);
    }

    #[test]
    fn an_interrupted_save_leaves_the_old_definition() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.save(&definition("v1", 4096)).unwrap();
        // A crash after writing the temp file but before the rename.
        fs::write(store.dir().join(".v1.json.tmp"), b"{\"version\":1,\"na").unwrap();
        assert_eq!(store.load_all().unwrap(), vec![definition("v1", 4096)]);
        assert!(!store.dir().join(".v1.json.tmp").exists());
    }

    #[test]
    fn corrupt_or_mismatched_definitions_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        fs::write(store.path_of("bad"), b"not json").unwrap();
        let e = store.load_all().unwrap_err().to_string();
        assert!(e.contains("bad.json is not valid"), "{e}");
        fs::remove_file(store.path_of("bad")).unwrap();
        let json = serde_json::to_vec(&definition("other", 4096)).unwrap();
        fs::write(store.path_of("v1"), json).unwrap();
        let e = store.load_all().unwrap_err().to_string();
        assert!(e.contains("names volume 'other'"), "{e}");
    }
}
