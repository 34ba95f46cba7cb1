//! `tandem snapshot create|list|delete|rollback`: snapshots of a volume on every data
//! replica, coordinated by the node where the command runs (like [`crate::cluster`]: check
//! everywhere first, then act everywhere, undo on failure).
//!
//! ```text
//! coordinator                                      each data node, config order
//!   replica_snapshot_check {exists: false}    ──▶ volume here with storage, name free;
//!                                                  answers its status (role, disk state)
//!   replica_snapshot_take {nodes}             ──▶ to the Primary (or the first data node
//!                                                  when the volume is closed): hold
//!                                                  promotions, pause writes (drain until
//!                                                  every peer applied them), then
//!     replica_snapshot_local {create}         ──▶ each data node snapshots its storage;
//!                                                  on a failure the ones made are removed;
//!                                                  writes resume, the pause is reported
//! ```
//!
//! The cut is consistent because only the Primary admits writes, and
//! [`crate::engine::EngineReplica::pause_writes`] returns once every write it admitted is
//! on every connected peer's disk (under C a replicated flush; under A and B after the
//! peers' acknowledgements), and fails unless every replica is then connected, UpToDate
//! and in sync. It also holds every promotion of the volume (the engine refuses them, and
//! every promotion needs the agreement of each connected member), so a closed volume
//! cannot be opened, written and closed between two nodes' snapshots. Afterwards the
//! coordinator checks again: the same Primary, every replica in sync, no new generation;
//! otherwise the snapshot is removed everywhere. The drain is bounded by [`DRAIN_TIMEOUT`] and the whole pause
//! by [`PAUSE_LIMIT`]; it is measured and printed. Every data replica must be UpToDate and
//! reachable, so that no snapshot is taken of a replica in the middle of a resync. An
//! unreplicated volume is snapshotted without a pause: the reflink or `lvcreate -s` is one
//! atomic image of the file or LV (crash-consistent, like a power cut at that instant).
//!
//! **Rollback** needs the volume closed on every node (not Primary, no writer). Every data
//! node replaces its storage by its own copy of the snapshot (they are identical), and every
//! node of the volume (tiebreakers too) gets fresh metadata with one new generation shared
//! by all, exactly as a newly created volume (`day0`), so the replicas reconnect UpToDate
//! with no resync. A node that fails half-way is reported; the snapshot stays everywhere,
//! so the command can be run again. A node that crashes half-way finishes its part when it
//! starts again ([`crate::rollback`]).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use control_api::{ApiError, ErrorKind, Role, SnapshotInfo, VolumeStatus};
use serde::{Deserialize, Serialize};

use crate::cluster::random_day0;
use crate::peer::{PeerReply, PeerRequest};
use crate::phases::Phases;
use crate::pool::validate_snapshot_name;
use crate::rename::check_renamable;
use crate::replicated_export::engine_error;
use crate::rollback::{rollback_on_disk, RollbackError, RollbackMarker};
use crate::service::{blocking, invalid, pool_error, VolumeService};
use crate::store::VolumeDefinition;

/// How long the Primary may take to drain in-flight writes before a snapshot gives up.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

/// The longest writes stay held: past it they resume, and the snapshot (then not a cut) is
/// removed everywhere once every node has answered.
pub const PAUSE_LIMIT: Duration = Duration::from_secs(10);

/// What `replica_snapshot_local` does to this node's copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotOp {
    Create,
    Delete,
    /// Roll back and start a new generation `day0` (see the module doc).
    Rollback {
        day0: u64,
    },
}

/// Refuse a snapshot of `name` given every data node's status (pure): all in sync
/// (UpToDate, connected to every data peer, nothing out of sync), at
/// most one Primary. Returns the Primary's node, if any.
pub fn check_snapshot_allowed(
    name: &str,
    statuses: &[(String, VolumeStatus)],
) -> Result<Option<String>, ApiError> {
    if let Some((node, status)) = statuses.iter().find(|(_, s)| !s.in_sync()) {
        return Err(ApiError::new(
            ErrorKind::Refused,
            format!(
                "cannot snapshot '{name}': its replica on '{node}' is {} or not connected and in sync with every peer (wait until it is)",
                status.replica.disk_state
            ),
        ));
    }
    let primaries: Vec<&String> = statuses
        .iter()
        .filter(|(_, s)| s.replica.role == Role::Primary)
        .map(|(n, _)| n)
        .collect();
    if primaries.len() > 1 {
        return Err(ApiError::new(
            ErrorKind::Refused,
            format!("cannot snapshot '{name}' while it is Primary on two nodes (a live migration); try again after it"),
        ));
    }
    Ok(primaries.first().map(|n| n.to_string()))
}

impl VolumeService {
    /// The nodes holding data of `definition`, in config order (this node alone for an
    /// unreplicated volume).
    fn data_nodes(&self, definition: &VolumeDefinition) -> Vec<String> {
        if !definition.is_replicated() {
            return vec![self.config().node.clone()];
        }
        self.ordered_nodes(definition)
            .into_iter()
            .filter(|n| definition.nodes.contains(n))
            .collect()
    }

    /// Ask every node of `nodes` to check `name@snapshot` (see `replica_snapshot_check`);
    /// the first refusal is the answer, prefixed with `what`.
    async fn check_everywhere(
        &self,
        what: &str,
        name: &str,
        snapshot: &str,
        exists: bool,
        nodes: &[String],
    ) -> Result<Vec<(String, VolumeStatus)>, ApiError> {
        let mut statuses = Vec::new();
        for node in nodes {
            let request = PeerRequest::ReplicaSnapshotCheck {
                name: name.to_string(),
                snapshot: snapshot.to_string(),
                exists,
            };
            match self.on_node(node, request).await {
                Ok(PeerReply::Status { status }) => statuses.push((node.clone(), status)),
                Ok(other) => {
                    return Err(ApiError::new(
                        ErrorKind::Peer,
                        format!("node '{node}' answered replica_snapshot_check with {other:?}"),
                    ))
                }
                Err(e) => return Err(ApiError::new(e.kind, format!("{what}: {}", e.message))),
            }
        }
        Ok(statuses)
    }

    /// `snapshot_create` (see the module doc).
    pub async fn snapshot_create(
        &self,
        name: &str,
        snapshot: &str,
    ) -> Result<SnapshotInfo, ApiError> {
        validate_snapshot_name("", name, snapshot).map_err(|e| invalid(snapshot_name_error(&e)))?;
        let definition = self.definition(name)?;
        let nodes = self.data_nodes(&definition);
        let mut phases = Phases::start("snapshot create", name);
        let what = format!("cannot snapshot '{name}' (nothing changed)");
        let statuses = self
            .check_everywhere(&what, name, snapshot, false, &nodes)
            .await?;
        phases.done("check");
        let primary = if definition.is_replicated() {
            check_snapshot_allowed(name, &statuses)?
        } else {
            None
        };
        // The take node holds writes (a Primary) and promotions (any data node connected to
        // every other one: each promotion needs its agreement) while the nodes snapshot.
        let take_on = primary.clone().unwrap_or_else(|| nodes[0].clone());
        let request = PeerRequest::ReplicaSnapshotTake {
            name: name.to_string(),
            snapshot: snapshot.to_string(),
            nodes: nodes.clone(),
        };
        let pause_ms = match self.on_node(&take_on, request).await? {
            PeerReply::Paused { pause_ms } => pause_ms,
            other => {
                return Err(ApiError::new(
                    ErrorKind::Peer,
                    format!("node '{take_on}' answered replica_snapshot_take with {other:?}"),
                ))
            }
        };
        phases.done("take");
        if definition.is_replicated() {
            // The nodes snapshot one cut only if nothing changed meanwhile: every replica
            // still in sync, and the same Primary (none took over, no closed volume was
            // opened). Otherwise the snapshots may differ: remove them everywhere.
            let after = self
                .check_everywhere(&what, name, snapshot, true, &nodes)
                .await
                .and_then(|after| Ok((check_snapshot_allowed(name, &after)?, after)));
            let generations = |statuses: &[(String, VolumeStatus)]| -> Vec<String> {
                statuses
                    .iter()
                    .map(|(_, s)| s.replica.current_uuid.clone())
                    .collect()
            };
            let before = generations(&statuses);
            let changed = match after {
                Ok((now, after)) if now == primary && generations(&after) == before => None,
                Ok((now, _)) if now == primary => {
                    Some("a replica started a new generation".to_string())
                }
                Ok((now, _)) => Some(format!(
                    "the Primary changed from {} to {} during the snapshot",
                    primary.as_deref().unwrap_or("none"),
                    now.as_deref().unwrap_or("none")
                )),
                Err(e) => Some(e.message),
            };
            phases.done("verify");
            if let Some(why) = changed {
                let removed = self
                    .everywhere(name, snapshot, SnapshotOp::Delete, &nodes, "deleted")
                    .await;
                let left = match removed {
                    Ok(()) => "it was removed everywhere".to_string(),
                    Err(e) => format!("removing it failed: {}", e.message),
                };
                return Err(ApiError::new(
                    ErrorKind::Refused,
                    format!("cannot snapshot '{name}': the volume changed while the nodes took snapshot '{snapshot}' ({why}); {left}; try again"),
                ));
            }
        }
        tracing::info!(volume = %name, snapshot, ?pause_ms, "snapshot taken on every data replica");
        Ok(SnapshotInfo {
            volume: name.to_string(),
            name: snapshot.to_string(),
            nodes,
            pause_ms,
        })
    }

    /// Peer `replica_snapshot_take`, on the Primary (or the first data node of a closed
    /// volume): hold writes and promotions, snapshot on every node of `nodes`, resume.
    /// Returns the pause in ms when writes were held.
    pub async fn snapshot_take(
        &self,
        name: &str,
        snapshot: &str,
        nodes: &[String],
    ) -> Result<Option<u64>, ApiError> {
        let runtime = self.lock().get(name).and_then(|s| s.runtime.clone());
        let started = Instant::now();
        let mut phases = Phases::start("snapshot take", name);
        // Writes and promotions resume when the pause is dropped: at the end, or at
        // PAUSE_LIMIT when writes are held (a closed volume keeps promotions held until
        // every node answered, so none can open it between two nodes' snapshots).
        let mut pause = match &runtime {
            Some(runtime) => Some(
                runtime
                    .replica()
                    .pause_writes(DRAIN_TIMEOUT)
                    .await
                    .map_err(engine_error)?,
            ),
            None => None,
        };
        phases.done("drain");
        let writes_held = runtime
            .as_ref()
            .is_some_and(|r| r.status().replica.role == Role::Primary);
        let request = local(name, snapshot, SnapshotOp::Create);
        let calls: Vec<_> = nodes.iter().map(|n| (n.clone(), request.clone())).collect();
        let snapshots = self.on_nodes_at_once(calls);
        tokio::pin!(snapshots);
        let mut pause_ms = None;
        let mut resume = |pause: &mut Option<crate::engine::WritePause>| {
            if let Some(guard) = pause.take() {
                drop(guard);
                pause_ms = Some(started.elapsed().as_millis() as u64);
            }
        };
        let mut overran = false;
        let answers = tokio::select! {
            answers = &mut snapshots => answers,
            () = tokio::time::sleep(PAUSE_LIMIT), if writes_held => {
                overran = true;
                resume(&mut pause);
                snapshots.await
            }
        };
        resume(&mut pause);
        phases.done("snapshots");
        let mut done: Vec<&String> = Vec::new();
        let mut failure = overran.then(|| {
            ApiError::new(
                ErrorKind::Refused,
                format!(
                    "the replicas took more than {PAUSE_LIMIT:?} to snapshot; writes were resumed"
                ),
            )
        });
        for (node, result) in nodes.iter().zip(answers) {
            match result {
                Ok(_) => done.push(node),
                Err(e) => failure = failure.or(Some(e)),
            }
        }
        if let Some(e) = failure {
            for node in done.iter().rev() {
                if let Err(u) = self
                    .on_node(node, local(name, snapshot, SnapshotOp::Delete))
                    .await
                {
                    tracing::error!(volume = %name, snapshot, node = %node, error = %u.message,
                        "cannot remove the snapshot again after a failure; remove it there");
                }
            }
            return Err(ApiError::new(
                e.kind,
                format!(
                    "snapshot '{name}@{snapshot}' failed and was removed everywhere: {}",
                    e.message
                ),
            ));
        }
        Ok(pause_ms.filter(|_| writes_held))
    }

    /// Peer `replica_snapshot_check`: this node holds the volume's storage, and the
    /// snapshot exists (`exists`) or not. Answers this node's status.
    pub async fn snapshot_check(
        &self,
        name: &str,
        snapshot: &str,
        exists: bool,
    ) -> Result<VolumeStatus, ApiError> {
        let found = self
            .local_snapshots(name)
            .await?
            .iter()
            .any(|s| s == snapshot);
        let node = &self.config().node;
        if found && !exists {
            return Err(ApiError::new(
                ErrorKind::AlreadyExists,
                format!("snapshot '{name}@{snapshot}' exists already on '{node}'"),
            ));
        }
        if !found && exists {
            return Err(ApiError::new(
                ErrorKind::NotFound,
                format!("snapshot '{name}@{snapshot}' does not exist on '{node}'"),
            ));
        }
        self.status(name)
    }

    /// The snapshots of this node's copy of `name` (peer `replica_snapshot_list`).
    pub async fn local_snapshots(&self, name: &str) -> Result<Vec<String>, ApiError> {
        let definition = self.definition(name)?;
        if definition.diskless {
            return Err(invalid(format!(
                "volume '{name}' has no data on '{}' (a tiebreaker)",
                self.config().node
            )));
        }
        let backend = self.backend_of(&definition)?;
        let volume = name.to_string();
        blocking(move || backend.snapshots(&volume).map_err(pool_error)).await
    }

    fn backend_of(
        &self,
        definition: &VolumeDefinition,
    ) -> Result<std::sync::Arc<dyn crate::pool::Pool>, ApiError> {
        self.pool_backend(&definition.pool).ok_or_else(|| {
            ApiError::new(
                ErrorKind::NotFound,
                format!(
                    "volume '{}': pool '{}' is not configured on '{}'",
                    definition.name,
                    definition.pool,
                    self.config().node
                ),
            )
        })
    }

    /// Peer `replica_snapshot_local`: one operation on this node's copy.
    pub async fn snapshot_local(
        &self,
        name: &str,
        snapshot: &str,
        op: SnapshotOp,
    ) -> Result<(), ApiError> {
        let definition = self.definition(name)?;
        if let SnapshotOp::Rollback { day0 } = op {
            return self.rollback_local(&definition, snapshot, day0).await;
        }
        let backend = self.backend_of(&definition)?;
        let (volume, snap) = (name.to_string(), snapshot.to_string());
        let mut phases = Phases::start("snapshot local", name);
        let done = blocking(move || {
            match op {
                SnapshotOp::Create => backend.snapshot(&volume, &snap),
                _ => backend.delete_snapshot(&volume, &snap),
            }
            .map_err(pool_error)
        })
        .await;
        phases.done(if op == SnapshotOp::Create {
            "create"
        } else {
            "delete"
        });
        done
    }

    /// Roll this node's copy back (data nodes) and start the generation `day0`.
    async fn rollback_local(
        &self,
        definition: &VolumeDefinition,
        snapshot: &str,
        day0: u64,
    ) -> Result<(), ApiError> {
        let name = definition.name.clone();
        let node = self.config().node.clone();
        let (claim, _, _) = self.claim(&name, "rollback")?;
        let runtime = {
            let mut volumes = self.lock();
            let slot = volumes
                .get_mut(&name)
                .ok_or_else(|| crate::service::not_found(&name))?;
            if let Some(runtime) = &slot.runtime {
                check_renamable(&name, &node, &runtime.status(), true)?;
                if runtime.open_handles() > 0 {
                    return Err(in_use(&name, &node));
                }
            } else if slot
                .device
                .as_ref()
                .is_some_and(|d| std::sync::Arc::strong_count(d) > 1)
            {
                return Err(in_use(&name, &node));
            }
            slot.device = None;
            slot.runtime.take()
        };
        if runtime.is_some() {
            if let Err(e) = self.engine.close_replica(&name).await {
                tracing::warn!(volume = %name, error = %e, "cannot close the replica cleanly before rollback");
            }
        }
        drop(runtime);
        let backend = if definition.diskless {
            None
        } else {
            Some(self.backend_of(definition)?)
        };
        let replicated = definition.is_replicated();
        let engine = std::sync::Arc::clone(&self.engine);
        let store = self.store.clone();
        let (to_roll, marker) = (
            definition.clone(),
            RollbackMarker {
                snapshot: snapshot.to_string(),
                day0,
            },
        );
        let rolled = blocking(move || {
            rollback_on_disk(
                &store,
                backend.as_deref(),
                engine.as_ref(),
                &node,
                &to_roll,
                &marker,
            )
            .map_err(|e| {
                let kind = match &e {
                    RollbackError::Pool(p) => crate::service::pool_error_kind(p),
                    _ => ErrorKind::Storage,
                };
                ApiError::new(kind, crate::report::error_chain(&e))
            })
        })
        .await;
        drop(claim);
        let reopened = if replicated {
            self.open_replica(&name).await
        } else {
            Ok(())
        };
        rolled?;
        reopened?;
        tracing::info!(volume = %name, snapshot, "rolled back to the snapshot");
        Ok(())
    }

    /// `snapshot_list`: every snapshot on the data nodes that answer.
    pub async fn snapshot_list(&self, name: &str) -> Result<Vec<SnapshotInfo>, ApiError> {
        let definition = self.definition(name)?;
        let mut found: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut errors = Vec::new();
        let nodes = self.data_nodes(&definition);
        for node in &nodes {
            let request = PeerRequest::ReplicaSnapshotList {
                name: name.to_string(),
            };
            match self.on_node(node, request).await {
                Ok(PeerReply::Names { names }) => {
                    for snapshot in names {
                        found.entry(snapshot).or_default().push(node.clone());
                    }
                }
                Ok(other) => errors.push(format!("{node} answered {other:?}")),
                Err(e) => {
                    tracing::warn!(volume = %name, node = %node, error = %e.message,
                        "snapshot list: node not answering");
                    errors.push(e.message);
                }
            }
        }
        if errors.len() == nodes.len() {
            return Err(ApiError::new(ErrorKind::Peer, errors.join("; ")));
        }
        Ok(found
            .into_iter()
            .map(|(snapshot, nodes)| SnapshotInfo {
                volume: name.to_string(),
                name: snapshot,
                nodes,
                pause_ms: None,
            })
            .collect())
    }

    /// `snapshot_delete`: checked on every data node, then removed on each.
    pub async fn snapshot_delete(
        &self,
        name: &str,
        snapshot: &str,
    ) -> Result<SnapshotInfo, ApiError> {
        let definition = self.definition(name)?;
        self.check_no_clones(name, Some(snapshot))?;
        let nodes = self.data_nodes(&definition);
        let what = format!("cannot delete '{name}@{snapshot}' (nothing changed)");
        self.check_everywhere(&what, name, snapshot, true, &nodes)
            .await?;
        self.everywhere(name, snapshot, SnapshotOp::Delete, &nodes, "deleted")
            .await?;
        Ok(SnapshotInfo {
            volume: name.to_string(),
            name: snapshot.to_string(),
            nodes,
            pause_ms: None,
        })
    }

    /// `snapshot_rollback` (see the module doc).
    pub async fn snapshot_rollback(
        &self,
        name: &str,
        snapshot: &str,
    ) -> Result<SnapshotInfo, ApiError> {
        validate_snapshot_name("", name, snapshot).map_err(|e| invalid(snapshot_name_error(&e)))?;
        let definition = self.definition(name)?;
        let nodes = self.data_nodes(&definition);
        let what = format!("cannot roll '{name}' back (nothing changed)");
        let statuses = self
            .check_everywhere(&what, name, snapshot, true, &nodes)
            .await?;
        for (node, status) in &statuses {
            check_renamable(name, node, status, definition.is_replicated())
                .map_err(|e| ApiError::new(e.kind, format!("{what}: {}", e.message)))?;
        }
        let all = if definition.is_replicated() {
            let all = self.ordered_nodes(&definition);
            for node in all.iter().filter(|n| !nodes.contains(n)) {
                let request = PeerRequest::ReplicaStatus {
                    name: name.to_string(),
                };
                self.on_node(node, request)
                    .await
                    .map_err(|e| ApiError::new(e.kind, format!("{what}: {}", e.message)))?;
            }
            all
        } else {
            nodes.clone()
        };
        let op = SnapshotOp::Rollback {
            day0: random_day0(),
        };
        self.everywhere(name, snapshot, op, &all, "rolled back")
            .await?;
        Ok(SnapshotInfo {
            volume: name.to_string(),
            name: snapshot.to_string(),
            nodes,
            pause_ms: None,
        })
    }

    /// Run `op` on every node of `nodes`; failures are collected and reported together
    /// with the nodes where it was done (a delete or rollback cannot be undone).
    async fn everywhere(
        &self,
        name: &str,
        snapshot: &str,
        op: SnapshotOp,
        nodes: &[String],
        past: &str,
    ) -> Result<(), ApiError> {
        let mut done = Vec::new();
        let mut failed = Vec::new();
        let mut kind = ErrorKind::Peer;
        for node in nodes {
            match self.on_node(node, local(name, snapshot, op)).await {
                Ok(_) => done.push(node.as_str()),
                Err(e) => {
                    kind = e.kind;
                    failed.push(e.message);
                }
            }
        }
        if failed.is_empty() {
            return Ok(());
        }
        Err(ApiError::new(
            kind,
            format!(
                "'{name}@{snapshot}' {past} on [{}] only: {} (run the command again)",
                done.join(", "),
                failed.join("; ")
            ),
        ))
    }
}

fn local(name: &str, snapshot: &str, op: SnapshotOp) -> PeerRequest {
    PeerRequest::ReplicaSnapshotLocal {
        name: name.to_string(),
        snapshot: snapshot.to_string(),
        op,
    }
}

fn in_use(name: &str, node: &str) -> ApiError {
    ApiError::new(
        ErrorKind::InUse,
        format!("{name} is open on {node}; stop the VM first"),
    )
}

fn snapshot_name_error(e: &crate::pool::PoolError) -> String {
    match e {
        crate::pool::PoolError::BadName { message, .. } => message.clone(),
        other => other.to_string(),
    }
}
