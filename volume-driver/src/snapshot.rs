//! `tandem snapshot create|list|delete|rollback`: snapshots of a volume on every data
//! replica, coordinated by the node where the command runs (like [`crate::cluster`]: check
//! everywhere first, then act everywhere, undo on failure). Each round calls every node at
//! once over connections opened once per command ([`crate::links`]).
//!
//! ```text
//! coordinator                                 each data node (all at once)
//!   replica_snapshot_check {exists: false} ─▶ volume here with storage, name free (a
//!                                             pending leftover of that name is resolved
//!                                             first); answers its status
//!   replica_snapshot_take {nodes}          ─▶ to the Primary (or the first data node of a
//!                                             closed volume): connect to the other nodes,
//!                                             hold promotions, pause writes (drain until
//!                                             every peer applied them), then
//!     replica_snapshot_local {take}        ─▶ each data node takes it under its pending
//!                                             name and answers its status; on a failure
//!                                             the ones taken are discarded; writes resume,
//!                                             the pause and the statuses are answered
//!   (still one cut? see below)
//!   replica_snapshot_local {commit}        ─▶ each data node renames it to its final name
//! ```
//!
//! Only the drain and the snapshots themselves are inside the pause: the checks run
//! before it, the connections are open before it, and the renames run after it.
//!
//! The cut is consistent because only the Primary admits writes, and
//! [`crate::engine::EngineReplica::pause_writes`] returns once every write it admitted is
//! on every connected peer's disk (under C a replicated flush; under A and B after the
//! peers' acknowledgements), and fails unless every replica is then connected, UpToDate
//! and in sync. It also holds every promotion of the volume (the engine refuses them, and
//! every promotion needs the agreement of each connected member), so a closed volume
//! cannot be opened, written and closed between two nodes' snapshots. Each node answers
//! its status right after its own snapshot, and the coordinator checks them against the
//! statuses before ([`check_still_one_cut`]): the same Primary, every replica in sync, no
//! new generation; otherwise the snapshot is removed everywhere. The drain is bounded by
//! [`DRAIN_TIMEOUT`] and the whole pause by [`PAUSE_LIMIT`]; it is measured and printed.
//! Every data replica must be UpToDate and reachable, so that no snapshot is taken of a
//! replica in the middle of a resync. An unreplicated volume is snapshotted without a
//! pause: the reflink or `lvcreate -s` is one atomic image of the file or LV
//! (crash-consistent, like a power cut at that instant).
//!
//! **Pending until every node has it.** A snapshot is taken under its pending name
//! (`<snapshot>+pending`, never listed) and renamed to its final name on every node only
//! once every node took it and the cut is good. Before the renames a failure removes it
//! everywhere. Once any node may have renamed it, it is never rolled back: a node that
//! refuses its rename or does not answer keeps its pending copy, made final by that node
//! ([`crate::snapshot_pending`]); only a node whose copy is gone (it can never be made
//! final there) gets it removed everywhere, final and pending copies. A kill or crash at any point leaves pending copies at worst, which
//! [`crate::snapshot_pending`] resolves: made final when some node has the final name,
//! else removed. So once every node is back, a listed snapshot is on every node.
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
use crate::links::Links;
use crate::peer::{PeerReply, PeerRequest};
use crate::phases::Phases;
use crate::pool::validate_snapshot_name;
use crate::rename::check_renamable;
use crate::replicated_export::engine_error;
use crate::rollback::{rollback_on_disk, RollbackError, RollbackMarker};
use crate::service::{blocking, invalid, pool_error, VolumeService};
use crate::snapshot_pending::Resolution;
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
    /// Take it under its pending name for the command holding `token`; answers this node's
    /// status afterwards.
    Take { token: u64 },
    /// Rename the pending snapshot to its final name; refused unless this node's take of it
    /// was by `token`.
    Commit { token: u64 },
    /// Remove the pending snapshot taken by `token`, if there is one (a take by another
    /// command is refused).
    Discard { token: u64 },
    /// Remove the (final) snapshot.
    Delete,
    /// Roll back and start a new generation `day0` (see the module doc).
    Rollback { day0: u64 },
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

/// Did the volume stay one cut while the nodes took the snapshot (pure)? `before` is every
/// data node's status at the check, `after` each one's right after its own snapshot: the
/// same Primary, every replica still in sync, and no replica in a new generation. Returns
/// why not.
pub fn check_still_one_cut(
    name: &str,
    before: &[(String, VolumeStatus)],
    after: &[(String, VolumeStatus)],
) -> Result<(), String> {
    let primary = check_snapshot_allowed(name, before).map_err(|e| e.message)?;
    let now = check_snapshot_allowed(name, after).map_err(|e| e.message)?;
    if now != primary {
        return Err(format!(
            "the Primary changed from {} to {} during the snapshot",
            primary.as_deref().unwrap_or("none"),
            now.as_deref().unwrap_or("none")
        ));
    }
    for (node, status) in before {
        match after.iter().find(|(n, _)| n == node) {
            None => return Err(format!("'{node}' did not report its status")),
            Some((_, s)) if s.replica.current_uuid != status.replica.current_uuid => {
                return Err(format!("the replica on '{node}' started a new generation"))
            }
            Some(_) => {}
        }
    }
    Ok(())
}

impl VolumeService {
    /// The nodes holding data of `definition`, in config order (this node alone for an
    /// unreplicated volume).
    pub(crate) fn data_nodes(&self, definition: &VolumeDefinition) -> Vec<String> {
        if !definition.is_replicated() {
            return vec![self.config().node.clone()];
        }
        self.ordered_nodes(definition)
            .into_iter()
            .filter(|n| definition.nodes.contains(n))
            .collect()
    }

    /// Ask every node of `nodes` at once to check `name@snapshot` (see
    /// `replica_snapshot_check`); the first refusal, in node order, is the answer, prefixed
    /// with `what`.
    async fn check_everywhere(
        &self,
        links: &mut Links,
        what: &str,
        name: &str,
        snapshot: &str,
        exists: bool,
        nodes: &[String],
    ) -> Result<Vec<(String, VolumeStatus)>, ApiError> {
        let request = PeerRequest::ReplicaSnapshotCheck {
            name: name.to_string(),
            snapshot: snapshot.to_string(),
            exists,
        };
        let calls = nodes.iter().map(|n| (n.clone(), request.clone())).collect();
        let answers = self.call_at_once(links, calls).await;
        let mut statuses = Vec::new();
        for (node, answer) in nodes.iter().zip(answers) {
            match answer {
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
        check_snapshot_name(snapshot)?;
        let definition = self.definition(name)?;
        let nodes = self.data_nodes(&definition);
        let mut phases = Phases::start("snapshot create", name);
        let mut links = Links::default();
        let what = format!("cannot snapshot '{name}' (nothing changed)");
        let before = self
            .check_everywhere(&mut links, &what, name, snapshot, false, &nodes)
            .await?;
        let primary = if definition.is_replicated() {
            check_snapshot_allowed(name, &before)?
        } else {
            None
        };
        phases.done("check");
        // Until it is final or removed everywhere, this node answers that a command is
        // taking it, so that no node resolves its pending copy meanwhile.
        let _in_flight = self.snapshot_in_flight(name, snapshot)?;
        // Only this command's copies are committed or discarded (see snapshot_pending).
        let token = rand::random::<u64>();
        // The take node holds writes (a Primary) and promotions (any data node connected to
        // every other one: each promotion needs its agreement) while the nodes snapshot.
        let take_on = primary.unwrap_or_else(|| nodes[0].clone());
        let request = PeerRequest::ReplicaSnapshotTake {
            name: name.to_string(),
            snapshot: snapshot.to_string(),
            nodes: nodes.clone(),
            token,
        };
        let taken = self.call_node(&mut links, &take_on, request).await;
        phases.done("take");
        let (pause_ms, after) = match taken {
            Ok(PeerReply::Taken { pause_ms, after }) => (pause_ms, after),
            Ok(other) => {
                self.remove_everywhere(&mut links, name, snapshot, token, false, &nodes)
                    .await;
                return Err(ApiError::new(
                    ErrorKind::Peer,
                    format!("node '{take_on}' answered replica_snapshot_take with {other:?}"),
                ));
            }
            Err(e) => {
                // The take node removes what it took; when it could not even answer, do
                // it here (a pending snapshot is never listed meanwhile).
                if e.kind == ErrorKind::Peer {
                    self.remove_everywhere(&mut links, name, snapshot, token, false, &nodes)
                        .await;
                }
                return Err(e);
            }
        };
        if definition.is_replicated() {
            // The nodes hold one cut only if nothing changed meanwhile; otherwise the
            // snapshots may differ: remove them everywhere.
            if let Err(why) = check_still_one_cut(name, &before, &after) {
                let left = self
                    .remove_everywhere(&mut links, name, snapshot, token, false, &nodes)
                    .await;
                return Err(ApiError::new(
                    ErrorKind::Refused,
                    format!("cannot snapshot '{name}': the volume changed while the nodes took snapshot '{snapshot}' ({why}); {left}; try again"),
                ));
            }
        }
        // Every node holds the same cut: make it final everywhere.
        let calls = nodes
            .iter()
            .map(|n| {
                (
                    n.clone(),
                    local(name, snapshot, SnapshotOp::Commit { token }),
                )
            })
            .collect();
        let answers = self.call_at_once(&mut links, calls).await;
        phases.done("commit");
        let (mut committed, mut missing, mut pending) = (Vec::new(), Vec::new(), Vec::new());
        let mut kind = ErrorKind::Peer;
        for (node, answer) in nodes.iter().zip(answers) {
            match answer {
                Ok(_) => committed.push(node.clone()),
                // Its copy is gone: the snapshot can never be on every node.
                Err(e) if e.kind == ErrorKind::NotFound => {
                    missing.push(format!("{node}: {}", e.message))
                }
                // No answer, or refused: it may be renamed there already, and some node
                // may have renamed it, so it is never rolled back from here. It stays
                // pending there and that node makes it final (a pending snapshot with a
                // final one elsewhere).
                Err(e) => {
                    if e.kind != ErrorKind::Peer {
                        kind = e.kind;
                    }
                    pending.push(format!("{node}: {}", e.message));
                }
            }
        }
        if !missing.is_empty() {
            // No command can finish it: remove it everywhere (final and pending copies).
            let left = self
                .remove_everywhere(&mut links, name, snapshot, token, true, &nodes)
                .await;
            return Err(ApiError::new(
                ErrorKind::NotFound,
                format!(
                    "snapshot '{name}@{snapshot}' could not be made final on every node: {}; {left}",
                    missing.join("; ")
                ),
            ));
        }
        if !pending.is_empty() {
            return Err(ApiError::new(
                kind,
                format!(
                    "snapshot '{name}@{snapshot}' is final on [{}]; {} (it stays pending there and that node makes it final once it can)",
                    committed.join(", "),
                    pending.join("; ")
                ),
            ));
        }
        tracing::info!(volume = %name, snapshot, ?pause_ms, "snapshot taken on every data replica");
        Ok(SnapshotInfo {
            volume: name.to_string(),
            name: snapshot.to_string(),
            nodes,
            pause_ms,
        })
    }

    /// Remove `name@snapshot` after the failed create holding `token` on every node of
    /// `nodes` at once: its final copy first where `delete_final` (tolerating nodes without
    /// one), then its pending copy (this command's only), so that a crash in between leaves pending copies only, which are
    /// removed ([`crate::snapshot_pending`]). Says what was left.
    async fn remove_everywhere(
        &self,
        links: &mut Links,
        name: &str,
        snapshot: &str,
        token: u64,
        delete_final: bool,
        nodes: &[String],
    ) -> String {
        let mut failed = Vec::new();
        let mut final_left = false;
        let ops = [SnapshotOp::Delete, SnapshotOp::Discard { token }];
        for op in ops
            .into_iter()
            .filter(|op| delete_final || *op != SnapshotOp::Delete)
        {
            let calls = nodes.iter().map(|n| (n.clone(), local(name, snapshot, op)));
            let answers = self.call_at_once(links, calls.collect()).await;
            for (node, answer) in nodes.iter().zip(answers) {
                match answer {
                    Ok(_) => {}
                    Err(e) if e.kind == ErrorKind::NotFound => {}
                    Err(e) => {
                        tracing::error!(volume = %name, snapshot, node = %node, ?op,
                            error = %e.message, "cannot remove a snapshot that failed");
                        final_left |= op == SnapshotOp::Delete;
                        failed.push(format!("{node}: {}", e.message));
                    }
                }
            }
        }
        if failed.is_empty() {
            "it was removed everywhere".to_string()
        } else if !final_left {
            format!(
                "removing it failed on {} (a pending snapshot is never listed; it is removed once that node is reachable again)",
                failed.join("; ")
            )
        } else {
            format!(
                "removing it failed on {} (run `tandem snapshot delete {name} {snapshot}`: it removes the snapshot from the nodes that have it)",
                failed.join("; ")
            )
        }
    }

    /// Peer `replica_snapshot_take`, on the Primary (or the first data node of a closed
    /// volume): connect to the other nodes, hold writes and promotions, take the snapshot
    /// under its pending name on every node of `nodes` at once, resume. Returns the pause
    /// in ms when writes were held, and each node's status right after its snapshot.
    pub async fn snapshot_take(
        &self,
        name: &str,
        snapshot: &str,
        nodes: &[String],
        token: u64,
    ) -> Result<(Option<u64>, Vec<(String, VolumeStatus)>), ApiError> {
        check_snapshot_name(snapshot)?;
        let runtime = self.lock().get(name).and_then(|s| s.runtime.clone());
        let mut phases = Phases::start("snapshot take", name);
        let mut links = Links::default();
        // Connected before the pause: inside it only the requests travel.
        let here = self.config().node.clone();
        let others: Vec<String> = nodes.iter().filter(|n| **n != here).cloned().collect();
        self.connect(&mut links, &others).await.map_err(|e| {
            ApiError::new(
                e.kind,
                format!("cannot snapshot '{name}' (nothing changed): {}", e.message),
            )
        })?;
        phases.done("connect");
        let started = Instant::now();
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
        let calls = nodes
            .iter()
            .map(|n| (n.clone(), local(name, snapshot, SnapshotOp::Take { token })))
            .collect();
        let mut pause_ms = None;
        let mut resume = |pause: &mut Option<crate::engine::WritePause>| {
            if let Some(guard) = pause.take() {
                drop(guard);
                pause_ms = Some(crate::phases::millis(started.elapsed()));
            }
        };
        let mut overran = false;
        let answers = {
            let snapshots = self.call_at_once(&mut links, calls);
            tokio::pin!(snapshots);
            tokio::select! {
                answers = &mut snapshots => answers,
                () = tokio::time::sleep(PAUSE_LIMIT), if writes_held => {
                    overran = true;
                    resume(&mut pause);
                    snapshots.await
                }
            }
        };
        resume(&mut pause);
        phases.done("snapshots");
        let mut taken: Vec<String> = Vec::new();
        let mut after = Vec::new();
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
                Ok(PeerReply::Status { status }) => {
                    taken.push(node.clone());
                    after.push((node.clone(), status));
                }
                Ok(other) => {
                    taken.push(node.clone());
                    failure = failure.or(Some(ApiError::new(
                        ErrorKind::Peer,
                        format!("node '{node}' answered the take with {other:?}"),
                    )));
                }
                // Lost on the way: it may have been taken there.
                Err(e) if e.kind == ErrorKind::Peer => {
                    taken.push(node.clone());
                    failure = failure.or(Some(e));
                }
                // Refused there (e.g. a pending one of that name exists): nothing of ours.
                Err(e) => failure = failure.or(Some(e)),
            }
        }
        if let Some(e) = failure {
            let left = self
                .remove_everywhere(&mut links, name, snapshot, token, false, &taken)
                .await;
            return Err(ApiError::new(
                e.kind,
                format!(
                    "snapshot '{name}@{snapshot}' failed ({left}): {}",
                    e.message
                ),
            ));
        }
        Ok((pause_ms.filter(|_| writes_held), after))
    }

    /// Peer `replica_snapshot_check`: this node holds the volume's storage, and the
    /// snapshot exists (`exists`) or not. A pending leftover of that name is resolved
    /// first when it must not exist. Answers this node's status.
    pub async fn snapshot_check(
        &self,
        name: &str,
        snapshot: &str,
        exists: bool,
    ) -> Result<VolumeStatus, ApiError> {
        check_snapshot_name(snapshot)?;
        let names = self.local_snapshot_names(name).await?;
        if !exists {
            // Where the pending name is built: it must fit this node's pool.
            let backend = self.backend_of(&self.definition(name)?)?;
            backend
                .check_new_snapshot(name, snapshot)
                .map_err(|e| invalid(snapshot_name_error(&e)))?;
        }
        let node = &self.config().node;
        let mut found = names.done.iter().any(|s| s == snapshot);
        if !exists && !found && names.pending.iter().any(|s| s == snapshot) {
            match self.resolve_pending(name, snapshot).await {
                Ok(Resolution::Kept) => found = true,
                Ok(Resolution::Removed) => {}
                Err(why) => {
                    return Err(ApiError::new(
                        ErrorKind::Busy,
                        format!("snapshot '{name}@{snapshot}' is being taken on '{node}' ({why}); try again later"),
                    ))
                }
            }
        }
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
        Ok(self.local_snapshot_names(name).await?.done)
    }

    /// The final and pending snapshots of this node's copy of `name`.
    pub(crate) async fn local_snapshot_names(
        &self,
        name: &str,
    ) -> Result<crate::pool::SnapshotNames, ApiError> {
        let definition = self.definition(name)?;
        if definition.diskless {
            return Err(invalid(format!(
                "volume '{name}' has no data on '{}' (a tiebreaker)",
                self.config().node
            )));
        }
        let backend = self.backend_of(&definition)?;
        let volume = name.to_string();
        blocking(move || backend.snapshot_names(&volume).map_err(pool_error)).await
    }

    pub(crate) fn backend_of(
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

    /// Peer `replica_snapshot_local`: one operation on this node's copy; a take answers
    /// this node's status right after it.
    pub async fn snapshot_local(
        &self,
        name: &str,
        snapshot: &str,
        op: SnapshotOp,
    ) -> Result<Option<VolumeStatus>, ApiError> {
        // Checked before anything is looked up or built from it (a peer's message).
        check_snapshot_name(snapshot)?;
        let definition = self.definition(name)?;
        if let SnapshotOp::Rollback { day0 } = op {
            self.rollback_local(&definition, snapshot, day0).await?;
            return Ok(None);
        }
        let backend = self.backend_of(&definition)?;
        let (volume, snap) = (name.to_string(), snapshot.to_string());
        let mut phases = Phases::start("snapshot local", name);
        let step = match op {
            SnapshotOp::Take { .. } => "take",
            SnapshotOp::Commit { .. } => "commit",
            SnapshotOp::Discard { .. } => "discard",
            _ => "delete",
        };
        match op {
            SnapshotOp::Take { token } => {
                let _locked = self.lock_snapshot(name, snapshot)?;
                // Recorded first, so that a take cut short is resolved too.
                let previous = self.note_take(name, snapshot, token);
                let (taken, cleaned) = blocking(move || {
                    let taken = backend.take_snapshot(&volume, &snap);
                    // A failed take may leave a hidden copy: ours, so removed (a pending
                    // copy that exists already is another command's).
                    let cleaned = match &taken {
                        Err(crate::pool::PoolError::SnapshotExists { .. }) | Ok(()) => true,
                        Err(_) => backend.discard_snapshot(&volume, &snap).is_ok(),
                    };
                    Ok((taken.map_err(pool_error), cleaned))
                })
                .await?;
                match taken {
                    Ok(()) => {}
                    Err(e) if e.kind == ErrorKind::AlreadyExists => {
                        self.restore_take(name, snapshot, previous);
                        return Err(e);
                    }
                    Err(e) => {
                        // Kept while a copy may be left: this node resolves it once stale.
                        if cleaned {
                            self.forget_take(name, snapshot);
                        }
                        return Err(e);
                    }
                }
            }
            SnapshotOp::Commit { token } | SnapshotOp::Discard { token } => {
                match self.take_token(name, snapshot) {
                    Some(ours) if ours == token => {}
                    // Nothing of this command's here (e.g. it never arrived): nothing to do.
                    None if matches!(op, SnapshotOp::Discard { .. }) => return Ok(None),
                    _ => {
                        return Err(ApiError::new(
                            ErrorKind::Refused,
                            format!(
                                "cannot {step} '{name}@{snapshot}' on '{}': its pending copy here was not taken by this command",
                                self.config().node
                            ),
                        ))
                    }
                }
                blocking(move || {
                    match op {
                        SnapshotOp::Commit { .. } => backend.commit_snapshot(&volume, &snap),
                        _ => backend.discard_snapshot(&volume, &snap),
                    }
                    .map_err(pool_error)
                })
                .await?;
                self.forget_take(name, snapshot);
            }
            _ => {
                blocking(move || backend.delete_snapshot(&volume, &snap).map_err(pool_error))
                    .await?;
            }
        }
        phases.done(step);
        match op {
            SnapshotOp::Take { .. } => self.status(name).map(Some),
            _ => Ok(None),
        }
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

    /// `snapshot_list`: every snapshot on the data nodes that answer (asked at once).
    pub async fn snapshot_list(&self, name: &str) -> Result<Vec<SnapshotInfo>, ApiError> {
        let definition = self.definition(name)?;
        let mut found: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut errors = Vec::new();
        let nodes = self.data_nodes(&definition);
        let request = PeerRequest::ReplicaSnapshotList {
            name: name.to_string(),
        };
        let calls = nodes.iter().map(|n| (n.clone(), request.clone())).collect();
        let answers = self.call_at_once(&mut Links::default(), calls).await;
        for (node, answer) in nodes.iter().zip(answers) {
            match answer {
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

    /// `snapshot_delete`: checked on every data node, then removed on each that has it (a
    /// snapshot left on some nodes only can be cleaned up); refused when none has it.
    pub async fn snapshot_delete(
        &self,
        name: &str,
        snapshot: &str,
    ) -> Result<SnapshotInfo, ApiError> {
        check_snapshot_name(snapshot)?;
        let definition = self.definition(name)?;
        self.check_no_clones(name, Some(snapshot))?;
        let mut links = Links::default();
        let what = format!("cannot delete '{name}@{snapshot}' (nothing changed)");
        let request = PeerRequest::ReplicaSnapshotCheck {
            name: name.to_string(),
            snapshot: snapshot.to_string(),
            exists: true,
        };
        let data = self.data_nodes(&definition);
        let calls = data.iter().map(|n| (n.clone(), request.clone())).collect();
        let mut nodes = Vec::new();
        let mut lacking = Vec::new();
        for (node, answer) in data.iter().zip(self.call_at_once(&mut links, calls).await) {
            match answer {
                Ok(_) => nodes.push(node.clone()),
                Err(e) if e.kind == ErrorKind::NotFound => lacking.push(e.message),
                Err(e) => return Err(ApiError::new(e.kind, format!("{what}: {}", e.message))),
            }
        }
        if nodes.is_empty() {
            return Err(ApiError::new(
                ErrorKind::NotFound,
                format!("{what}: {}", lacking.join("; ")),
            ));
        }
        self.everywhere(
            &mut links,
            name,
            snapshot,
            SnapshotOp::Delete,
            &nodes,
            "deleted",
        )
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
        check_snapshot_name(snapshot)?;
        let definition = self.definition(name)?;
        let nodes = self.data_nodes(&definition);
        let mut links = Links::default();
        let what = format!("cannot roll '{name}' back (nothing changed)");
        let statuses = self
            .check_everywhere(&mut links, &what, name, snapshot, true, &nodes)
            .await?;
        for (node, status) in &statuses {
            check_renamable(name, node, status, definition.is_replicated())
                .map_err(|e| ApiError::new(e.kind, format!("{what}: {}", e.message)))?;
        }
        let all = if definition.is_replicated() {
            let all = self.ordered_nodes(&definition);
            // The tiebreakers must be reachable too: they get the new generation.
            let status = PeerRequest::ReplicaStatus {
                name: name.to_string(),
            };
            let calls = all
                .iter()
                .filter(|n| !nodes.contains(n))
                .map(|n| (n.clone(), status.clone()))
                .collect();
            for answer in self.call_at_once(&mut links, calls).await {
                answer.map_err(|e| ApiError::new(e.kind, format!("{what}: {}", e.message)))?;
            }
            all
        } else {
            nodes.clone()
        };
        let op = SnapshotOp::Rollback {
            day0: random_day0(),
        };
        self.everywhere(&mut links, name, snapshot, op, &all, "rolled back")
            .await?;
        Ok(SnapshotInfo {
            volume: name.to_string(),
            name: snapshot.to_string(),
            nodes,
            pause_ms: None,
        })
    }

    /// Run `op` on every node of `nodes` at once; failures are collected and reported
    /// together with the nodes where it was done (a delete or rollback cannot be undone).
    async fn everywhere(
        &self,
        links: &mut Links,
        name: &str,
        snapshot: &str,
        op: SnapshotOp,
        nodes: &[String],
        past: &str,
    ) -> Result<(), ApiError> {
        let mut done = Vec::new();
        let mut failed = Vec::new();
        let mut kind = ErrorKind::Peer;
        let calls = nodes
            .iter()
            .map(|n| (n.clone(), local(name, snapshot, op)))
            .collect();
        let answers = self.call_at_once(links, calls).await;
        for (node, answer) in nodes.iter().zip(answers) {
            match answer {
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

/// Refuse a snapshot name that breaks the rule every snapshot name follows
/// ([`validate_snapshot_name`]). Every command and every peer message checks it before a
/// path or LV name is built from it; only where a pending name is built does the pool's
/// name limit apply too (`replica_snapshot_check` before a create, and the take).
fn check_snapshot_name(snapshot: &str) -> Result<(), ApiError> {
    validate_snapshot_name("", snapshot).map_err(|e| invalid(snapshot_name_error(&e)))
}

fn snapshot_name_error(e: &crate::pool::PoolError) -> String {
    match e {
        crate::pool::PoolError::BadName { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use control_api::DiskState;

    fn status(node: &str, role: Role, generation: &str) -> (String, VolumeStatus) {
        let mut status = crate::rename::tests::status(role, 0);
        status.replica.node = node.into();
        status.replica.current_uuid = generation.into();
        (node.to_string(), status)
    }

    /// A service with a file pool in a temporary directory and an unreplicated 1 MiB
    /// volume `name`.
    async fn with_volume(name: &str) -> (tempfile::TempDir, VolumeService) {
        let dir = tempfile::tempdir().unwrap();
        let service = crate::service::tests::service(dir.path());
        service.create_local(name, 1 << 20, None).await.unwrap();
        (dir, service)
    }

    #[test]
    fn a_cut_is_kept_only_with_the_same_primary_and_generations() {
        let before = [
            status("hv1", Role::Primary, "A"),
            status("hv2", Role::Secondary, "A"),
        ];
        check_still_one_cut("v", &before, &before).unwrap();
        let promoted = [
            status("hv1", Role::Secondary, "A"),
            status("hv2", Role::Primary, "A"),
        ];
        let why = check_still_one_cut("v", &before, &promoted).unwrap_err();
        assert_eq!(
            why,
            "the Primary changed from hv1 to hv2 during the snapshot"
        );
        let new_generation = [
            status("hv1", Role::Primary, "A"),
            status("hv2", Role::Secondary, "B"),
        ];
        let why = check_still_one_cut("v", &before, &new_generation).unwrap_err();
        assert_eq!(why, "the replica on 'hv2' started a new generation");
        let why = check_still_one_cut("v", &before, &before[..1]).unwrap_err();
        assert_eq!(why, "'hv2' did not report its status");
        let mut out_of_sync = before.clone();
        out_of_sync[1].1.replica.disk_state = DiskState::Outdated;
        let why = check_still_one_cut("v", &before, &out_of_sync).unwrap_err();
        assert!(why.contains("on 'hv2' is Outdated"), "{why}");
    }

    #[tokio::test]
    async fn only_the_command_that_took_a_pending_copy_commits_or_discards_it() {
        let (dir, service) = with_volume("v").await;
        let pending = dir.path().join("images/v@s+pending.snap");
        // The state after command 1's take here (the file made by hand: no reflink here).
        std::fs::write(&pending, b"copy").unwrap();
        service.note_take("v", "s", 1);
        for op in [
            SnapshotOp::Commit { token: 2 },
            SnapshotOp::Discard { token: 2 },
        ] {
            let e = service.snapshot_local("v", "s", op).await.unwrap_err();
            assert_eq!(e.kind, ErrorKind::Refused, "{op:?}: {}", e.message);
        }
        assert!(pending.exists(), "another command's discard removed it");
        assert_eq!(service.take_token("v", "s"), Some(1));
        // A take while a resolution holds the name is refused and records nothing.
        let locked = service.lock_snapshot("v", "s").unwrap();
        let take = SnapshotOp::Take { token: 3 };
        let e = service.snapshot_local("v", "s", take).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Busy, "{}", e.message);
        assert!(service.resolve_pending("v", "s").await.is_err());
        drop(locked);
        assert_eq!(service.take_token("v", "s"), Some(1));
        // Command 1's discard removes it and its record; a commit without one is refused.
        let discard = SnapshotOp::Discard { token: 1 };
        service.snapshot_local("v", "s", discard).await.unwrap();
        assert!(!pending.exists());
        assert_eq!(service.take_token("v", "s"), None);
        let commit = SnapshotOp::Commit { token: 1 };
        let e = service.snapshot_local("v", "s", commit).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Refused, "{}", e.message);
    }

    #[tokio::test]
    async fn peer_messages_with_a_bad_snapshot_name_are_refused_before_any_path_is_built() {
        use crate::peer::{dispatch, PeerResponse};
        let (dir, service) = with_volume("v").await;
        // With a directory `v@..` in the pool, `v@../../../victim.snap` is `victim.snap`
        // beside the pool: what an unchecked name would reach.
        std::fs::create_dir(dir.path().join("images/v@..")).unwrap();
        let victims = ["victim.snap", "victim+pending.snap"].map(|f| dir.path().join(f));
        for victim in &victims {
            std::fs::write(victim, b"not the pool's").unwrap();
        }
        let long = "s".repeat(65);
        for bad in ["../../../victim", "a/b", "", ".hidden", long.as_str()] {
            // A take recorded under that name, so that no token check stops a commit or
            // discard before the name check would.
            service.note_take("v", bad, 1);
            let ops = [
                SnapshotOp::Take { token: 1 },
                SnapshotOp::Commit { token: 1 },
                SnapshotOp::Discard { token: 1 },
                SnapshotOp::Delete,
                SnapshotOp::Rollback { day0: 7 },
            ];
            let requests = ops.into_iter().map(|op| local("v", bad, op)).chain([
                PeerRequest::ReplicaSnapshotCheck {
                    name: "v".into(),
                    snapshot: bad.into(),
                    exists: true,
                },
                PeerRequest::ReplicaSnapshotTake {
                    name: "v".into(),
                    snapshot: bad.into(),
                    nodes: vec!["hv1".into()],
                    token: 1,
                },
            ]);
            for request in requests {
                let what = format!("{request:?}");
                match dispatch(&service, request).await {
                    PeerResponse::Error { error } => {
                        assert_eq!(error.kind, ErrorKind::InvalidArgument, "{what}: {error:?}");
                        assert!(error.message.contains("snapshot name"), "{what}: {error:?}");
                    }
                    other => panic!("{what} was not refused: {other:?}"),
                }
            }
            service.forget_take("v", bad);
        }
        for victim in &victims {
            assert_eq!(std::fs::read(victim).unwrap(), b"not the pool's");
        }
        let mut left: Vec<_> = std::fs::read_dir(dir.path().join("images"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["v.img", "v@.."], "nothing made in the pool");
    }

    #[tokio::test]
    async fn names_create_accepts_are_accepted_by_list_delete_and_rollback() {
        let volume = "v".repeat(64);
        let (dir, service) = with_volume(&volume).await;
        // A file pool has no name limit below the common rule: create's check takes 64
        // characters (the pending file name has 142), and refuses 65.
        let longest = "s".repeat(64);
        service
            .snapshot_check(&volume, &longest, false)
            .await
            .unwrap();
        let e = service
            .snapshot_check(&volume, &"s".repeat(65), false)
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidArgument, "{}", e.message);
        // A snapshot of 62 characters (taken before a rename, or on another pool) is
        // listed, rolled back to and deleted: no pending name is built for those.
        let name = "s".repeat(62);
        let file = dir.path().join(format!("images/{volume}@{name}.snap"));
        std::fs::write(&file, vec![0u8; 1 << 20]).unwrap();
        let listed = service.snapshot_list(&volume).await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].name, name);
        // Without reflink here the rollback may fail in the pool, never on the name.
        if let Err(e) = service.snapshot_rollback(&volume, &name).await {
            assert_ne!(e.kind, ErrorKind::InvalidArgument, "{}", e.message);
            assert!(!e.message.contains("snapshot name"), "{}", e.message);
        }
        service.snapshot_delete(&volume, &name).await.unwrap();
        assert!(!file.exists());
    }

    #[tokio::test]
    async fn a_rename_carries_the_snapshots_and_the_takes_recorded_here() {
        let (dir, service) = with_volume("v").await;
        let images = dir.path().join("images");
        // A final snapshot, command 1's pending take, and a leftover no command takes
        // (files made by hand: no reflink here).
        for file in ["v@s.snap", "v@t+pending.snap", "v@u+pending.snap"] {
            std::fs::write(images.join(file), b"copy").unwrap();
        }
        service.note_take("v", "t", 1);
        service.rename("v", "w").await.unwrap();
        assert_eq!(service.take_token("v", "t"), None);
        assert_eq!(
            service.take_token("w", "t"),
            Some(1),
            "the take moved with it"
        );
        let listed: Vec<_> = service
            .snapshot_list("w")
            .await
            .unwrap()
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(listed, ["s"]);
        // Command 1 commits its copy under the new name ...
        let commit = SnapshotOp::Commit { token: 1 };
        service.snapshot_local("w", "t", commit).await.unwrap();
        assert!(images.join("w@t.snap").exists());
        assert_eq!(service.take_token("w", "t"), None);
        // ... the leftover is resolved under it (final nowhere: removed) ...
        assert_eq!(
            service.resolve_pending("w", "u").await,
            Ok(Resolution::Removed)
        );
        assert!(!images.join("w@u+pending.snap").exists());
        // ... and the snapshot is deleted under it.
        service.snapshot_delete("w", "s").await.unwrap();
        assert!(!images.join("w@s.snap").exists());
    }
}
