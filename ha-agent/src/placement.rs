//! What the agent must not forget across its own restart, kept in
//! `<state_dir>/ha/placement.json` (written atomically: temp file, fsync, rename, fsync
//! dir): where each managed VM was last seen running (so a restarted agent still fails a
//! VM over when the host that ran it died while the agent was down), the VMs it fenced
//! whose volumes still have to be demoted, and the last failover per VM (for `status`).
//!
//! The file records knowledge, not decisions: after a restart the agent still waits to hear
//! from its peers (up to `dead_after_ms`) and trusts libvirt and the peers' heartbeats over
//! anything read here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::persist::{load_json, save_json, PersistError};
use crate::status::Failover;

/// The persisted part of the decision loop's memory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// VM name → the node it was last seen running on.
    #[serde(default)]
    pub owners: BTreeMap<String, String>,
    /// VMs fenced here whose volumes must still be demoted (`demote --force`).
    #[serde(default)]
    pub demote_pending: BTreeSet<String>,
    /// The last failover this agent performed, per VM.
    #[serde(default)]
    pub failovers: BTreeMap<String, Failover>,
}

impl Placement {
    /// Load from `path`; a missing file is an empty placement (first start).
    pub fn load(path: &Path) -> Result<Placement, PersistError> {
        load_json("placement file", path)
    }

    /// Write to `path` atomically and durably.
    pub fn save(&self, path: &Path) -> Result<(), PersistError> {
        save_json("placement file", path, self)
    }

    /// Forget VMs that are no longer managed (unmanaged while the agent was down).
    pub fn retain_managed(&mut self, managed: &BTreeSet<&str>) {
        self.owners.retain(|vm, _| managed.contains(vm.as_str()));
        self.demote_pending
            .retain(|vm| managed.contains(vm.as_str()));
        self.failovers.retain(|vm, _| managed.contains(vm.as_str()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_a_restart_and_refuses_a_damaged_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ha/placement.json");
        assert_eq!(Placement::load(&path).unwrap(), Placement::default());
        let mut p = Placement::default();
        p.owners.insert("vm1".into(), "hv1".into());
        p.owners.insert("vm2".into(), "hv2".into());
        p.demote_pending.insert("vm2".into());
        p.failovers.insert(
            "vm1".into(),
            Failover {
                vm: "vm1".into(),
                from: "hv3".into(),
                to: "hv1".into(),
                at_ms: 1,
                detect_ms: 3000,
                total_ms: 3400,
            },
        );
        p.save(&path).unwrap();
        assert_eq!(Placement::load(&path).unwrap(), p);
        // Only the file itself is left in the directory (no temp file).
        assert_eq!(std::fs::read_dir(dir.path().join("ha")).unwrap().count(), 1);

        let mut only_vm1 = p.clone();
        only_vm1.retain_managed(&["vm1"].into_iter().collect());
        assert_eq!(only_vm1.owners.len(), 1);
        assert!(only_vm1.demote_pending.is_empty());

        std::fs::write(&path, b"{\"owners\": {\"vm1\": ").unwrap();
        let err = Placement::load(&path).unwrap_err();
        assert!(matches!(err, PersistError::Parse { .. }));
        assert!(err.to_string().contains("move it away"), "{err}");
        // An older agent's file without some fields still loads.
        std::fs::write(&path, b"{\"owners\": {\"vm1\": \"hv2\"}}").unwrap();
        assert_eq!(Placement::load(&path).unwrap().owners["vm1"], "hv2");
    }
}
