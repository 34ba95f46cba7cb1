//! Replica membership commands: `tandem volume replica add|remove|move`, and the
//! `replica_members` step every node of the volume runs. The node where a command runs
//! coordinates; it must hold the volume (a data replica or a tiebreaker) and is never the
//! node removed.
//!
//! ```text
//! add VOL hv3    check (hv3 configured, data-capable, not already a node of VOL; an
//!                UpToDate replica answers) → hv3: prepare (name reserved) → journal
//!                {undo_on: hv3} → hv3: commit (joining: storage, Inconsistent metadata, definition with hv3,
//!                replica opened) → journal {notify: every other node} → each node:
//!                replica_members (definition saved, engine add_peer) → journal done
//! remove VOL hv1 check (hv1 holds a replica and is not Primary; at least two replicas
//!                stay, one of them UpToDate, and a majority of them answers) → journal
//!                {notify: every remaining node, delete_on: hv1} → each node:
//!                replica_members (engine remove_peer) → hv1: replica_delete (if it answers)
//! move VOL a→b   add b (skipped when b already holds it), wait until b is UpToDate,
//!                remove a (skipped when already gone): running it again resumes it
//! ```
//!
//! `tandem node evict` is [`crate::evict`], a `move` per volume.
//!
//! Crash safety lives in [`crate::membership_log`]: whatever is not confirmed is in the
//! journal before it is attempted, and tandemd delivers (or, for an unconfirmed add,
//! undoes) it at startup and every few seconds. Nodes that do not answer (a dead host, a
//! daemon restarting) get the volume's node list when they answer again; the node list
//! every answering node stores is always this coordinator's.
//!
//! On each node, [`VolumeService::set_members`] saves the definition first, then adds or
//! removes the engine's peers (`EngineReplica::add_peer/remove_peer`: the replica stays
//! open and a Primary keeps serving). A crash between the two is repaired by the next
//! open, which runs with the saved peer list.

use std::time::Duration;

use control_api::{ApiError, DiskState, ErrorKind, Role, VolumeInfo};

use crate::engine::PeerPlan;
use crate::membership_log::Owed;
use crate::peer::{PeerReply, PeerRequest};
use crate::replicated_export::engine_error;
use crate::service::{blocking, invalid, store_error, VolumeService};
use crate::store::VolumeDefinition;

/// How long `move` waits for a syncing node that stopped answering.
const SYNC_NODE_SILENCE: Duration = Duration::from_secs(60);
/// How often `move` polls the new replica's state.
const SYNC_POLL: Duration = Duration::from_secs(1);

pub(crate) fn refused(message: String) -> ApiError {
    ApiError::new(ErrorKind::InvalidArgument, message)
}

/// Marks a volume as having a membership command running; cleared on drop.
struct OpGuard<'a> {
    service: &'a VolumeService,
    volume: String,
}

impl Drop for OpGuard<'_> {
    fn drop(&mut self) {
        crate::service::lock_set(&self.service.membership_ops).remove(&self.volume);
    }
}

impl VolumeService {
    pub(crate) fn membership_busy(&self, volume: &str) -> bool {
        crate::service::lock_set(&self.membership_ops).contains(volume)
    }

    fn begin_op(&self, volume: &str) -> Result<OpGuard<'_>, ApiError> {
        if !crate::service::lock_set(&self.membership_ops).insert(volume.to_string()) {
            return Err(ApiError::new(
                ErrorKind::Busy,
                format!("volume '{volume}' has a replica change running already"),
            ));
        }
        Ok(OpGuard {
            service: self,
            volume: volume.to_string(),
        })
    }

    /// Deliver what an earlier change still owes before starting a new one; an undo of
    /// an unconfirmed add that cannot be delivered yet blocks it.
    async fn finish_owed(&self, name: &str) -> Result<(), ApiError> {
        let state_dir = self.config().state_dir.clone();
        if crate::membership_log::volumes(&state_dir)
            .iter()
            .all(|v| v != name)
        {
            return Ok(());
        }
        self.deliver_owed(name).await?;
        let volume = name.to_string();
        let owed = blocking(move || crate::membership_log::load(&state_dir, &volume)).await?;
        match owed.undo_on {
            Some(node) => Err(ApiError::new(
                ErrorKind::Busy,
                format!(
                    "an interrupted add of a replica of '{name}' on '{node}' is still to be \
                     undone there (it does not answer yet); try again when it is up"
                ),
            )),
            None => Ok(()),
        }
    }

    /// The definition of a replicated volume this node coordinates changes of.
    fn coordinated(&self, name: &str) -> Result<VolumeDefinition, ApiError> {
        let definition = self.definition(name)?;
        if !definition.is_replicated() {
            return Err(refused(format!(
                "volume '{name}' has a single replica and is not replicated; replica \
                 commands apply to replicated volumes"
            )));
        }
        Ok(definition)
    }

    /// Nodes of the volume (data and tiebreakers) sorted in config order.
    fn in_config_order(&self, names: &mut [String]) {
        let config = self.config();
        let position = |n: &String| {
            config
                .nodes
                .iter()
                .position(|c| c.name == *n)
                .unwrap_or(usize::MAX)
        };
        names.sort_by_key(position);
    }

    /// Check that `node` may receive a new replica of `definition`.
    fn check_new_node(&self, definition: &VolumeDefinition, node: &str) -> Result<(), ApiError> {
        let config = self.config();
        let name = &definition.name;
        let Some(entry) = config.node_named(node) else {
            return Err(refused(format!(
                "node '{node}' is not in {} (add it to [[nodes]] on every host and reload)",
                config.path.display()
            )));
        };
        if entry.diskless {
            return Err(refused(format!(
                "node '{node}' is a diskless tiebreaker and cannot hold a data replica"
            )));
        }
        if definition.nodes.iter().any(|n| n == node) {
            return Err(refused(format!(
                "node '{node}' already holds a replica of '{name}'"
            )));
        }
        if definition.tiebreakers.iter().any(|n| n == node) {
            return Err(refused(format!(
                "node '{node}' is a tiebreaker of '{name}' and cannot also hold a data replica"
            )));
        }
        Ok(())
    }

    /// Ask every data node of `definition` (except `skip`) for its status.
    async fn data_statuses(
        &self,
        definition: &VolumeDefinition,
        skip: &str,
    ) -> Vec<(String, Result<control_api::VolumeStatus, ApiError>)> {
        let mut out = Vec::new();
        for node in definition.nodes.iter().filter(|n| *n != skip) {
            out.push((node.clone(), self.node_status(node, &definition.name).await));
        }
        out
    }

    async fn node_status(
        &self,
        node: &str,
        name: &str,
    ) -> Result<control_api::VolumeStatus, ApiError> {
        let request = PeerRequest::ReplicaStatus {
            name: name.to_string(),
        };
        match self.on_node(node, request).await? {
            PeerReply::Status { status } => Ok(status),
            other => Err(ApiError::new(
                ErrorKind::Peer,
                format!("node '{node}' answered the status with {other:?}"),
            )),
        }
    }

    /// `replica_add`: a new data replica of `name` on `node`.
    pub async fn replica_add(&self, name: &str, node: &str) -> Result<VolumeInfo, ApiError> {
        let _op = self.begin_op(name)?;
        self.add_locked(name, node).await
    }

    async fn add_locked(&self, name: &str, node: &str) -> Result<VolumeInfo, ApiError> {
        self.finish_owed(name).await?;
        let definition = self.coordinated(name)?;
        self.check_new_node(&definition, node)?;
        let statuses = self.data_statuses(&definition, "").await;
        if !statuses.iter().any(|(_, s)| {
            s.as_ref()
                .is_ok_and(|s| s.replica.disk_state == DiskState::UpToDate)
        }) {
            return Err(refused(format!(
                "no UpToDate replica of '{name}' answers to sync node '{node}' from ({})",
                describe(&statuses)
            )));
        }
        let mut nodes = definition.nodes.clone();
        nodes.push(node.to_string());
        self.in_config_order(&mut nodes);
        let token = crate::cluster::random_token();
        let prepare = PeerRequest::ReplicaPrepare {
            name: name.to_string(),
            size_bytes: definition.size_bytes,
            pool: None,
            diskless: false,
            token: token.clone(),
            linked: false,
        };
        let commit = PeerRequest::ReplicaCommit {
            token: token.clone(),
            definition: VolumeDefinition {
                pool: String::new(),
                nodes: nodes.clone(),
                diskless: false,
                renamed_from: None,
                // A joining replica is a full copy (full sync), never a clone here.
                clone_of: None,
                ..definition.clone()
            },
            day0: 0,
            joining: true,
        };
        // The undo is owed only once the node reserved the name for this add (a
        // reservation creates nothing and expires by itself): a prepare refused because
        // the name exists there must never lead to deleting that volume.
        let created = match self.on_node(node, prepare).await {
            Ok(_) => {
                self.owe(Owed {
                    volume: name.to_string(),
                    undo_on: Some(node.to_string()),
                    ..Owed::default()
                })
                .await?;
                self.on_node(node, commit).await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = created {
            // Nothing was told to the other nodes, and a failed commit removed what it
            // made: release the reservation and forget the undo (a prepare refused because
            // the name exists there must not delete that volume).
            let abort = PeerRequest::ReplicaAbort {
                name: name.to_string(),
                token,
            };
            let _ = self.on_node(node, abort).await;
            // Unless the node's answer was lost (it may have committed): then the undo
            // stays owed and is delivered once it answers.
            if e.kind != ErrorKind::Peer {
                let state_dir = self.config().state_dir.clone();
                let volume = name.to_string();
                blocking(move || {
                    let mut owed = crate::membership_log::load(&state_dir, &volume)?;
                    owed.undo_on = None;
                    crate::membership_log::store(&state_dir, &owed)
                })
                .await?;
            }
            return Err(ApiError::new(
                e.kind,
                format!(
                    "cannot add a replica of '{name}' on '{node}' (nothing changed): {}",
                    e.message
                ),
            ));
        }
        // The new replica exists: from here on the add goes forward. The coordinator is
        // told first (it is one of the notified nodes, sorted first).
        let mut notify: Vec<String> = definition.peers("").map(String::from).collect();
        notify.retain(|n| n != node);
        let state_dir = self.config().state_dir.clone();
        let owed = Owed {
            volume: name.to_string(),
            nodes,
            tiebreakers: definition.tiebreakers.clone(),
            notify: notify.into_iter().collect(),
            delete_on: Default::default(),
            undo_on: None,
        };
        blocking(move || {
            let mut current = crate::membership_log::load(&state_dir, &owed.volume)?;
            current.undo_on = None;
            current.nodes = owed.nodes;
            current.tiebreakers = owed.tiebreakers;
            current.notify.extend(owed.notify);
            crate::membership_log::store(&state_dir, &current)
        })
        .await?;
        let pending = self.deliver_owed(name).await?;
        if !pending.is_empty() {
            tracing::warn!(volume = %name, nodes = ?pending,
                "nodes not answering keep the old node list until they answer (retried)");
        }
        tracing::info!(volume = %name, node, "replica added; it syncs from an UpToDate replica");
        self.show(name)
    }

    /// `replica_remove`: drop `node`'s replica of `name` (also while `node` is down).
    pub async fn replica_remove(&self, name: &str, node: &str) -> Result<VolumeInfo, ApiError> {
        let _op = self.begin_op(name)?;
        self.remove_locked(name, node).await
    }

    async fn remove_locked(&self, name: &str, node: &str) -> Result<VolumeInfo, ApiError> {
        self.finish_owed(name).await?;
        let definition = self.coordinated(name)?;
        let config = self.config();
        if !definition.nodes.iter().any(|n| n == node) {
            return Err(refused(format!(
                "node '{node}' holds no replica of '{name}'"
            )));
        }
        if node == config.node {
            return Err(refused(format!(
                "cannot remove this node's own replica of '{name}'; run the command on \
                 another node of the volume"
            )));
        }
        let remaining: Vec<String> = definition
            .nodes
            .iter()
            .filter(|n| *n != node)
            .cloned()
            .collect();
        let statuses = self.data_statuses(&definition, node).await;
        let up_to_date = statuses.iter().any(|(_, s)| {
            s.as_ref()
                .is_ok_and(|s| s.replica.disk_state == DiskState::UpToDate)
        });
        if !up_to_date {
            return Err(refused(format!(
                "removing '{node}' would leave no UpToDate replica of '{name}' ({})",
                describe(&statuses)
            )));
        }
        if remaining.len() < 2 {
            return Err(refused(format!(
                "removing '{node}' would leave '{name}' with a single replica; add one first \
                 (tandem volume replica add {name} --node NODE, or replica move)"
            )));
        }
        let answering = statuses.iter().filter(|(_, s)| s.is_ok()).count();
        let mut tiebreaker_answers = false;
        for t in &definition.tiebreakers {
            if self.node_status(t, name).await.is_ok() {
                tiebreaker_answers = true;
            }
        }
        if !keeps_quorum(remaining.len(), answering, tiebreaker_answers) {
            return Err(refused(format!(
                "removing '{node}' would break quorum of '{name}': {answering} of the {} \
                 remaining replicas answer ({})",
                remaining.len(),
                describe(&statuses)
            )));
        }
        if let Ok(status) = self.node_status(node, name).await {
            if status.replica.role == Role::Primary {
                return Err(refused(format!(
                    "'{name}' is Primary on '{node}'; move the VM (or demote it) first"
                )));
            }
        }
        self.owe(Owed {
            volume: name.to_string(),
            nodes: remaining,
            tiebreakers: definition.tiebreakers.clone(),
            notify: definition.peers(node).map(String::from).collect(),
            delete_on: [node.to_string()].into(),
            undo_on: None,
        })
        .await?;
        let pending = self.deliver_owed(name).await?;
        if !pending.is_empty() {
            tracing::warn!(volume = %name, nodes = ?pending,
                "not yet told (retried until they answer or leave the config)");
        }
        tracing::info!(volume = %name, node, "replica removed");
        self.show(name)
    }

    /// `replica_move`: add on `to`, wait until it is UpToDate, remove `from`.
    pub async fn replica_move(
        &self,
        name: &str,
        from: &str,
        to: &str,
    ) -> Result<VolumeInfo, ApiError> {
        let _op = self.begin_op(name)?;
        self.move_locked(name, from, to).await
    }

    async fn move_locked(&self, name: &str, from: &str, to: &str) -> Result<VolumeInfo, ApiError> {
        let definition = self.coordinated(name)?;
        if from == to {
            return Err(refused("--from and --to name the same node".into()));
        }
        let has_from = definition.nodes.iter().any(|n| n == from);
        let has_to = definition.nodes.iter().any(|n| n == to);
        if !has_from && !has_to {
            return Err(refused(format!(
                "node '{from}' holds no replica of '{name}'"
            )));
        }
        if !has_to {
            self.add_locked(name, to).await?;
        }
        if has_from || !has_to {
            self.wait_up_to_date(name, to).await?;
            if self.definition(name)?.nodes.iter().any(|n| n == from) {
                self.remove_locked(name, from).await?;
            }
        }
        self.show(name)
    }

    /// Poll `node` until its replica of `name` is UpToDate.
    pub(crate) async fn wait_up_to_date(&self, name: &str, node: &str) -> Result<(), ApiError> {
        let mut last_answer = tokio::time::Instant::now();
        let mut last_log = tokio::time::Instant::now();
        loop {
            match self.node_status(node, name).await {
                Ok(status) if status.replica.disk_state == DiskState::UpToDate => return Ok(()),
                Ok(status) => {
                    last_answer = tokio::time::Instant::now();
                    if last_log.elapsed() >= Duration::from_secs(10) {
                        last_log = tokio::time::Instant::now();
                        let done = status
                            .replica
                            .peers
                            .iter()
                            .filter_map(|p| p.resync.as_ref())
                            .map(|r| format!("{}%", r.done_bytes * 100 / r.total_bytes.max(1)))
                            .next()
                            .unwrap_or_else(|| status.replica.disk_state.to_string());
                        tracing::info!(volume = %name, node, progress = %done, "new replica syncing");
                    }
                }
                Err(e) if last_answer.elapsed() < SYNC_NODE_SILENCE => {
                    tracing::debug!(volume = %name, node, error = %e.message, "no status yet");
                }
                Err(e) => {
                    return Err(ApiError::new(
                        e.kind,
                        format!(
                            "node '{node}' stopped answering while '{name}' synced to it: {}",
                            e.message
                        ),
                    ))
                }
            }
            tokio::time::sleep(SYNC_POLL).await;
        }
    }

    /// Peer `replica_members`: this node's definition of `name` takes `nodes` and
    /// `tiebreakers`; the engine's peers follow. Idempotent.
    pub async fn set_members(
        &self,
        name: &str,
        nodes: Vec<String>,
        tiebreakers: Vec<String>,
    ) -> Result<VolumeInfo, ApiError> {
        let config = self.config();
        if !nodes.contains(&config.node) && !tiebreakers.contains(&config.node) {
            return Err(invalid(format!(
                "the new node list of '{name}' does not include this node ('{}'); \
                 use replica_delete",
                config.node
            )));
        }
        if nodes.len() < 2 {
            return Err(invalid(format!(
                "a replicated volume keeps at least two data nodes ('{name}': {nodes:?})"
            )));
        }
        let (claim, definition, state) = self.claim(name, "membership")?;
        let new_definition = VolumeDefinition {
            nodes,
            tiebreakers,
            ..definition.clone()
        };
        let before: Vec<String> = definition.peers(&config.node).map(String::from).collect();
        let after: Vec<String> = new_definition
            .peers(&config.node)
            .map(String::from)
            .collect();
        let added: Vec<PeerPlan> = after
            .iter()
            .filter(|n| !before.contains(n))
            .map(|n| {
                config
                    .node_named(n)
                    .map(|c| PeerPlan {
                        name: c.name.clone(),
                        replication: c.replication,
                        diskless: c.diskless,
                    })
                    .ok_or_else(|| {
                        invalid(format!(
                            "node '{n}' is not in {} (reload the config on this node first)",
                            config.path.display()
                        ))
                    })
            })
            .collect::<Result<_, _>>()?;
        let removed: Vec<String> = before.into_iter().filter(|n| !after.contains(n)).collect();
        if new_definition != definition {
            let store = self.store.clone();
            let to_save = new_definition.clone();
            blocking(move || store.save(&to_save).map_err(store_error)).await?;
            if let Some(slot) = self.lock().get_mut(name) {
                slot.definition = Some(new_definition.clone());
            }
            tracing::info!(volume = %name, nodes = ?new_definition.nodes,
                tiebreakers = ?new_definition.tiebreakers, "volume's node list changed");
        }
        let runtime = self.lock().get(name).and_then(|s| s.runtime.clone());
        if let Some(runtime) = runtime {
            for peer in added {
                runtime
                    .replica()
                    .add_peer(peer)
                    .await
                    .map_err(engine_error)?;
            }
            for peer in removed {
                runtime
                    .replica()
                    .remove_peer(&peer)
                    .await
                    .map_err(engine_error)?;
            }
        }
        drop(claim);
        Ok(self.info(&new_definition, state))
    }
}

/// Would `replicas` voters keep quorum with `answering` of them reachable (and a
/// tiebreaker breaking an even split)?
pub fn keeps_quorum(replicas: usize, answering: usize, tiebreaker: bool) -> bool {
    answering * 2 > replicas || (answering * 2 == replicas && tiebreaker)
}

fn describe(statuses: &[(String, Result<control_api::VolumeStatus, ApiError>)]) -> String {
    statuses
        .iter()
        .map(|(node, s)| match s {
            Ok(s) => format!("{node}: {}", s.replica.disk_state),
            Err(_) => format!("{node}: not answering"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quorum_after_a_removal_needs_a_majority_or_a_tiebreaker_on_a_tie() {
        assert!(keeps_quorum(2, 2, false));
        assert!(!keeps_quorum(2, 1, false));
        assert!(keeps_quorum(2, 1, true));
        assert!(keeps_quorum(3, 2, false));
        assert!(!keeps_quorum(3, 1, true));
        assert!(!keeps_quorum(2, 0, true));
    }
}
