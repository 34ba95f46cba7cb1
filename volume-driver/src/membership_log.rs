//! The journal of membership changes still owed to nodes, and the task that delivers them.
//!
//! A replica add/remove ([`crate::membership`]) changes the volume's node list on every
//! node of the volume. Nodes that cannot be told at once (down, restarting, killed in the
//! middle) must still end up with the same list, and a coordinator that dies half-way must
//! resume or undo. So before anything changes, the coordinator writes what it owes to
//! `<state_dir>/membership/<volume>.json` (atomically, fsynced):
//!
//! ```text
//! { "volume": "v", "nodes": ["hv2", "hv3"],    the volume's node list after the change
//!   "tiebreakers": ["witness"],
//!   "notify": ["hv1", "hv2", "witness"],       nodes that must get that list
//!   "delete_on": ["hv1"],                      removed nodes whose replica must go
//!   "undo_on": "hv3" }                         an add whose new replica is not confirmed:
//!                                              delete it there (only before `notify`)
//! ```
//!
//! [`VolumeService::deliver_owed`] works through it: `undo_on` first (the add is undone),
//! then `replica_members` with the journal's list to every `notify` node of that list
//! (this node included), then `replica_delete` on every `delete_on` node. Each step is idempotent, and a
//! node is dropped from the journal only once it answered (or left the config). tandemd
//! runs it at startup and every few seconds ([`VolumeService::run_membership_log`]), so a
//! killed participant is brought up to date when it is back, and a killed coordinator
//! resumes (or undoes an unconfirmed add) when it restarts. A dead host stays in
//! `delete_on` until it answers or is removed from the config: when a replaced board
//! comes back, its stale replica is deleted.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use control_api::{ApiError, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::peer::PeerRequest;
use crate::service::{blocking, VolumeService};

/// How often owed updates are retried.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(3);

/// What the coordinator still owes other nodes for one volume.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owed {
    pub volume: String,
    /// The volume's data nodes after the change (the latest change wins).
    #[serde(default)]
    pub nodes: Vec<String>,
    #[serde(default)]
    pub tiebreakers: Vec<String>,
    #[serde(default)]
    pub notify: BTreeSet<String>,
    #[serde(default)]
    pub delete_on: BTreeSet<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub undo_on: Option<String>,
}

impl Owed {
    fn is_empty(&self) -> bool {
        self.notify.is_empty() && self.delete_on.is_empty() && self.undo_on.is_none()
    }
}

fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("membership")
}

fn path_of(state_dir: &Path, volume: &str) -> PathBuf {
    dir(state_dir).join(format!("{volume}.json"))
}

fn io_error(what: &str, path: &Path, e: std::io::Error) -> ApiError {
    ApiError::new(
        ErrorKind::Storage,
        format!("cannot {what} {}: {e}", path.display()),
    )
}

/// Write (or, when empty, remove) the journal of `owed.volume`, durably.
pub fn store(state_dir: &Path, owed: &Owed) -> Result<(), ApiError> {
    let dir = dir(state_dir);
    std::fs::create_dir_all(&dir).map_err(|e| io_error("create", &dir, e))?;
    let path = path_of(state_dir, &owed.volume);
    if owed.is_empty() {
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_error("remove", &path, e)),
        }
    } else {
        let tmp = dir.join(format!(".{}.json.tmp", owed.volume));
        let json = serde_json::to_vec_pretty(owed)
            .map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))?;
        let mut file = std::fs::File::create(&tmp).map_err(|e| io_error("create", &tmp, e))?;
        file.write_all(&json)
            .and_then(|()| file.sync_all())
            .map_err(|e| io_error("write", &tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| io_error("rename", &path, e))?;
    }
    std::fs::File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error("sync", &dir, e))
}

/// The journal of `volume` (empty when there is none).
pub fn load(state_dir: &Path, volume: &str) -> Result<Owed, ApiError> {
    let path = path_of(state_dir, volume);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
            ApiError::new(
                ErrorKind::Storage,
                format!("{} is corrupt: {e}", path.display()),
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Owed {
            volume: volume.to_string(),
            ..Owed::default()
        }),
        Err(e) => Err(io_error("read", &path, e)),
    }
}

/// Every volume with a journal.
pub fn volumes(state_dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir(state_dir)) else {
        return Vec::new();
    };
    let mut out: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".json"))
                .filter(|n| !n.starts_with('.'))
                .map(String::from)
        })
        .collect();
    out.sort();
    out
}

/// Whether a failure means "try again later" (the node did not answer or was busy).
fn transient(e: &ApiError) -> bool {
    matches!(e.kind, ErrorKind::Peer | ErrorKind::Busy)
}

impl VolumeService {
    /// Add `add` to what is owed for its volume (merged with an existing journal), durably.
    pub(crate) async fn owe(&self, add: Owed) -> Result<(), ApiError> {
        let state_dir = self.config().state_dir.clone();
        blocking(move || {
            let mut owed = load(&state_dir, &add.volume)?;
            if !add.nodes.is_empty() {
                owed.nodes = add.nodes;
                owed.tiebreakers = add.tiebreakers;
            }
            owed.notify.extend(add.notify);
            owed.delete_on.extend(add.delete_on);
            if add.undo_on.is_some() {
                owed.undo_on = add.undo_on;
            }
            store(&state_dir, &owed)
        })
        .await
    }

    async fn save_owed(&self, owed: Owed) -> Result<(), ApiError> {
        let state_dir = self.config().state_dir.clone();
        blocking(move || store(&state_dir, &owed)).await
    }

    /// Deliver what is owed for `volume`. Returns the nodes still owed something.
    pub async fn deliver_owed(&self, volume: &str) -> Result<Vec<String>, ApiError> {
        let state_dir = self.config().state_dir.clone();
        let name = volume.to_string();
        let mut owed = blocking(move || load(&state_dir, &name)).await?;
        if let Some(node) = owed.undo_on.clone() {
            let request = PeerRequest::ReplicaDelete {
                name: volume.to_string(),
                force: true,
            };
            match self.on_node(&node, request).await {
                Ok(_) => {}
                Err(e) if e.kind == ErrorKind::NotFound => {}
                Err(e) if transient(&e) => return Ok(vec![node]),
                Err(e) => return Err(e),
            }
            tracing::warn!(volume, node = %node, "undid an interrupted replica add");
            owed.undo_on = None;
            self.save_owed(owed.clone()).await?;
        }
        let config = self.config();
        for node in owed.notify.clone() {
            if !owed.nodes.contains(&node) && !owed.tiebreakers.contains(&node) {
                // Not a node of the volume any more (a removed one gets `delete_on`).
                owed.notify.remove(&node);
                continue;
            }
            let request = PeerRequest::ReplicaMembers {
                name: volume.to_string(),
                nodes: owed.nodes.clone(),
                tiebreakers: owed.tiebreakers.clone(),
            };
            match self.on_node(&node, request).await {
                Ok(_) => {
                    owed.notify.remove(&node);
                }
                Err(e) if transient(&e) && config.node_named(&node).is_some() => {
                    tracing::debug!(volume, node = %node, error = %e.message,
                        "node not updated yet; retrying later");
                }
                Err(e) => {
                    tracing::warn!(volume, node = %node, error = %e.message,
                        "node refused the volume's new node list; giving up on it");
                    owed.notify.remove(&node);
                }
            }
        }
        for node in owed.delete_on.clone() {
            let request = PeerRequest::ReplicaDelete {
                name: volume.to_string(),
                force: true,
            };
            match self.on_node(&node, request).await {
                Ok(_) => {
                    tracing::info!(volume, node = %node, "removed replica deleted there");
                    owed.delete_on.remove(&node);
                }
                Err(e) if e.kind == ErrorKind::NotFound => {
                    owed.delete_on.remove(&node);
                }
                Err(e) if transient(&e) && config.node_named(&node).is_some() => {}
                Err(e) => {
                    tracing::warn!(volume, node = %node, error = %e.message,
                        "cannot delete the removed replica there; delete it by hand");
                    owed.delete_on.remove(&node);
                }
            }
        }
        let left: Vec<String> = owed.notify.iter().chain(&owed.delete_on).cloned().collect();
        self.save_owed(owed).await?;
        Ok(left)
    }

    /// Deliver every journal now and then every [`RETRY_INTERVAL`], forever (tandemd
    /// spawns this). Volumes with a membership command running are left to it.
    pub async fn run_membership_log(&self) {
        loop {
            let state_dir = self.config().state_dir.clone();
            for volume in volumes(&state_dir) {
                if self.membership_busy(&volume) {
                    continue;
                }
                if let Err(e) = self.deliver_owed(&volume).await {
                    tracing::warn!(volume = %volume, error = %e.message,
                        "cannot deliver a membership change");
                }
            }
            tokio::time::sleep(RETRY_INTERVAL).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_journal_round_trips_and_an_empty_one_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let owed = Owed {
            volume: "v".into(),
            nodes: vec!["hv2".into(), "hv3".into()],
            tiebreakers: vec!["witness".into()],
            notify: ["hv1".to_string(), "hv2".to_string()].into(),
            delete_on: ["hv1".to_string()].into(),
            undo_on: None,
        };
        store(dir.path(), &owed).unwrap();
        assert_eq!(volumes(dir.path()), vec!["v".to_string()]);
        assert_eq!(load(dir.path(), "v").unwrap(), owed);
        store(
            dir.path(),
            &Owed {
                volume: "v".into(),
                ..Owed::default()
            },
        )
        .unwrap();
        assert!(volumes(dir.path()).is_empty());
        assert!(load(dir.path(), "v").unwrap().is_empty());
    }
}
