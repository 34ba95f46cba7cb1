//! The managed-VM registry: which domains are HA-managed, their preferred nodes and their
//! domain XML, so a dead host's VM can be defined on a survivor. Every agent keeps its own
//! copy in `<state_dir>/ha/registry.json` (written atomically) and agents converge over
//! the network: heartbeats carry a digest, a differing digest makes the sender push its
//! whole registry, and [`Registry::merge`] keeps per VM the entry with the higher
//! `(version, origin)` (last writer wins; `unmanage` leaves a tombstone so a removal
//! spreads like an addition).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::persist::{load_json, save_json, PersistError};

/// One managed domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManagedVm {
    pub name: String,
    /// Preferred nodes, most preferred first.
    #[serde(default)]
    pub prefer: Vec<String>,
    /// The domain's persistent XML as captured by `tandem-ha manage`.
    pub xml: String,
    /// Milliseconds since the epoch when this entry was written.
    pub version: u64,
    /// The node where `manage`/`unmanage` ran.
    pub origin: String,
    /// Tombstone left by `unmanage`.
    #[serde(default)]
    pub removed: bool,
}

impl ManagedVm {
    fn newer_than(&self, other: &ManagedVm) -> bool {
        (self.version, &self.origin) > (other.version, &other.origin)
    }
}

/// All entries, tombstones included, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registry {
    pub vms: BTreeMap<String, ManagedVm>,
}

impl Registry {
    /// Load from `path`; a missing file is an empty registry.
    pub fn load(path: &Path) -> Result<Registry, PersistError> {
        load_json("registry", path)
    }

    /// Write to `path` atomically and durably.
    pub fn save(&self, path: &Path) -> Result<(), PersistError> {
        save_json("registry", path, self)
    }

    /// Take `entry` if it is newer than what we hold. Returns whether anything changed.
    pub fn apply(&mut self, entry: ManagedVm) -> bool {
        match self.vms.get(&entry.name) {
            Some(current) if !entry.newer_than(current) => false,
            _ => {
                self.vms.insert(entry.name.clone(), entry);
                true
            }
        }
    }

    /// Merge another registry entry by entry. Returns whether anything changed.
    pub fn merge(&mut self, other: Registry) -> bool {
        let mut changed = false;
        for entry in other.vms.into_values() {
            changed |= self.apply(entry);
        }
        changed
    }

    /// The managed (not removed) VMs.
    pub fn managed(&self) -> impl Iterator<Item = &ManagedVm> {
        self.vms.values().filter(|v| !v.removed)
    }

    /// A short digest of every entry's identity and version (equal digests: same registry).
    pub fn digest(&self) -> String {
        let mut h = Sha256::new();
        for v in self.vms.values() {
            h.update(v.name.as_bytes());
            h.update([0]);
            h.update(v.version.to_le_bytes());
            h.update(v.origin.as_bytes());
            h.update([0, v.removed as u8]);
        }
        h.finalize()
            .iter()
            .take(8)
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str, version: u64, origin: &str, removed: bool) -> ManagedVm {
        ManagedVm {
            name: name.into(),
            prefer: vec![],
            xml: format!("<domain><name>{name}</name></domain>"),
            version,
            origin: origin.into(),
            removed,
        }
    }

    #[test]
    fn merge_converges_whatever_the_order() {
        let mut a = Registry::default();
        a.apply(vm("vm1", 10, "hv1", false));
        a.apply(vm("vm2", 10, "hv1", false));
        let mut b = Registry::default();
        b.apply(vm("vm1", 20, "hv2", true));
        b.apply(vm("vm3", 5, "hv2", false));
        let mut ab = a.clone();
        ab.merge(b.clone());
        let mut ba = b.clone();
        ba.merge(a.clone());
        assert_eq!(ab, ba);
        assert_eq!(ab.digest(), ba.digest());
        assert_ne!(a.digest(), ab.digest());
        let names: Vec<_> = ab.managed().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["vm2", "vm3"]);
        assert!(!ab.clone().merge(a), "an older registry changes nothing");
    }

    #[test]
    fn persists_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ha/registry.json");
        assert_eq!(Registry::load(&path).unwrap(), Registry::default());
        let mut r = Registry::default();
        r.apply(vm("vm1", 1, "hv1", false));
        r.save(&path).unwrap();
        assert_eq!(Registry::load(&path).unwrap(), r);
        std::fs::write(&path, b"{garbage").unwrap();
        assert!(matches!(
            Registry::load(&path),
            Err(PersistError::Parse { .. })
        ));
    }
}
