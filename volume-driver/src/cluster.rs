//! Cluster-wide volume operations: the node where a `tandem volume ...` command runs
//! coordinates the other nodes of the volume through the peer control API ([`crate::peer`]).
//!
//! **Create** ([`plan_create`], then two phases). Everything that can be refused is checked
//! before anything is allocated: names, size, nodes (configured, not diskless, no
//! duplicates, `--replicas` ≤ data nodes), then every node validates and *reserves* the name
//! (`replica_prepare`: name free, pool exists with room). Only then does every node
//! *commit*, all at the same time (storage, metadata with the shared day0 generation,
//! definition, replica). A failure at any step undoes what was done, in reverse order
//! ([`rollback_plan`]): committed replicas are deleted, reservations released. The first
//! node in config order is prepared first and the others at once after it, so of two
//! concurrent creates of one name on different nodes, the one that reserves the name on
//! the first node wins and the other is refused there before it touched anything. A
//! reservation whose coordinator died expires after [`RESERVATION_TTL`]. Every round
//! reuses the command's connections ([`crate::links`]).
//!
//! Tiebreakers: every diskless node of the config becomes a voter of every replicated
//! volume; it holds the definition and no storage. A volume with one replica is not
//! replicated and lives only on the node where it was created (no peers, no tiebreakers).
//!
//! **Delete** removes the volume on every node, this node last (so a failure elsewhere leaves
//! the definition here and the command can be repeated). It is refused, naming the node, when a node
//! cannot be reached, when the volume is Primary anywhere, or when it is open anywhere.
//! `--force` overrides the first two (an unreachable node keeps its replica; the answer
//! lists it in `left_on` and the log says to delete it there), never the third: a running
//! VM's disk is not pulled away.
//!
//! **Resize** first checks room on every data node, then grows each (storage, then the
//! engine's replica, online). Sizes only grow, so a failure half-way is completed by running
//! the same resize again; the error says which nodes grew.
//!
//! **Rename** lives in [`crate::rename`].
//!
//! **Set** applies changed options to every node's definition and replica.
//!
//! **Two primaries** (`volume_allow_two_primaries`) is cluster-wide: switching it on checks
//! every node of the volume first (protocol C, every data replica UpToDate, every node
//! reachable) and then switches every node's gate, undoing the nodes already switched if
//! one fails; switching it off visits every node and reports the ones it could not reach.

use std::time::Duration;

use control_api::{ApiError, DiskState, ErrorKind, Role, VolumeInfo, VolumeState, VolumeStatus};
use rand::RngCore;

use crate::config::Config;
use crate::links::Links;
use crate::names::validate_volume_name;
use crate::options::{apply_change, OptionsChange, VolumeOptions};
use crate::peer::{PeerReply, PeerRequest};
use crate::service::{
    blocking, invalid, not_found, now_unix, pool_error, store_error, Reservation, Slot,
    VolumeService,
};
use crate::store::{VolumeDefinition, DEFINITION_VERSION};

/// How long a reservation taken by `replica_prepare` blocks the name without a commit.
pub const RESERVATION_TTL: Duration = Duration::from_secs(300);

/// Which nodes a new volume lives on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatePlan {
    /// Nodes with a data replica, in config order.
    pub data_nodes: Vec<String>,
    /// Diskless voters (only for replicated volumes), in config order.
    pub tiebreakers: Vec<String>,
    /// Data nodes and tiebreakers in config order: the order every phase visits them.
    pub participants: Vec<String>,
}

impl CreatePlan {
    /// More than one data replica: created through the peer API and the engine.
    pub fn is_replicated(&self) -> bool {
        self.data_nodes.len() > 1
    }
}

/// Choose the nodes of a new volume (pure; see the module doc for the rules).
pub fn plan_create(
    config: &Config,
    replicas: Option<u32>,
    nodes: Option<&[String]>,
) -> Result<CreatePlan, ApiError> {
    let data: Vec<&str> = config
        .nodes
        .iter()
        .filter(|n| !n.diskless)
        .map(|n| n.name.as_str())
        .collect();
    let listed = |names: &[&str]| names.join(", ");
    let mut chosen: Vec<String> = match nodes {
        Some(nodes) => {
            if nodes.is_empty() {
                return Err(invalid("--nodes names no node"));
            }
            let mut seen = Vec::new();
            for node in nodes {
                let Some(entry) = config.node_named(node) else {
                    return Err(invalid(format!(
                        "node '{node}' is not in the config (nodes: {})",
                        listed(
                            &config
                                .nodes
                                .iter()
                                .map(|n| n.name.as_str())
                                .collect::<Vec<_>>()
                        )
                    )));
                };
                if entry.diskless {
                    return Err(invalid(format!(
                        "node '{node}' is a diskless tiebreaker and cannot hold a replica"
                    )));
                }
                if seen.contains(node) {
                    return Err(invalid(format!("node '{node}' is named twice in --nodes")));
                }
                seen.push(node.clone());
            }
            if let Some(n) = replicas {
                if n as usize != seen.len() {
                    return Err(invalid(format!(
                        "--replicas {n} but --nodes names {} node(s)",
                        seen.len()
                    )));
                }
            }
            seen
        }
        None => {
            let n = replicas.unwrap_or(1) as usize;
            if n == 0 {
                return Err(invalid("--replicas must be at least 1"));
            }
            if n > data.len() {
                return Err(invalid(format!(
                    "--replicas {n} but the cluster has {} data node(s) ({})",
                    data.len(),
                    listed(&data)
                )));
            }
            // This node first (when it stores data), then the others in config order.
            let mut order: Vec<&str> = data.iter().copied().filter(|d| *d == config.node).collect();
            order.extend(data.iter().copied().filter(|d| *d != config.node));
            order.into_iter().take(n).map(String::from).collect()
        }
    };
    if chosen.len() == 1 && chosen[0] != config.node {
        return Err(invalid(format!(
            "a volume with one replica is not replicated and lives where it is created; \
             run the command on node '{}'",
            chosen[0]
        )));
    }
    // Config order everywhere.
    chosen.sort_by_key(|n| config.nodes.iter().position(|c| &c.name == n));
    let tiebreakers: Vec<String> = if chosen.len() > 1 {
        config
            .nodes
            .iter()
            .filter(|n| n.diskless)
            .map(|n| n.name.clone())
            .collect()
    } else {
        Vec::new()
    };
    let participants = config
        .nodes
        .iter()
        .filter(|n| chosen.contains(&n.name) || tiebreakers.contains(&n.name))
        .map(|n| n.name.clone())
        .collect();
    Ok(CreatePlan {
        data_nodes: chosen,
        tiebreakers,
        participants,
    })
}

/// One undo step of a failed create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Undo {
    /// Delete the replica that node committed.
    Delete(String),
    /// Release the name that node reserved.
    Release(String),
}

/// The undo steps after a create failed with `prepared` participants reserved and the first
/// `committed` of them committed: newest first. The node whose step failed is released
/// too (harmless if it cleaned up itself).
pub fn rollback_plan(participants: &[String], prepared: usize, committed: usize) -> Vec<Undo> {
    let prepared = prepared.min(participants.len());
    let committed = committed.min(prepared);
    let mut undo = Vec::new();
    for node in participants[committed..prepared].iter().rev() {
        undo.push(Undo::Release(node.clone()));
    }
    for node in participants[..committed].iter().rev() {
        undo.push(Undo::Delete(node.clone()));
    }
    undo
}

pub(crate) fn random_token() -> String {
    let mut bytes = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn random_day0() -> u64 {
    let mut rng = rand::thread_rng();
    replication::generation::Generation::fresh(&mut || rng.next_u64()).raw()
}

impl VolumeService {
    /// Run a peer request on `node`: locally when it is this node, else over the peer API
    /// on a connection of its own.
    pub(crate) async fn on_node(
        &self,
        node: &str,
        request: PeerRequest,
    ) -> Result<PeerReply, ApiError> {
        self.call_node(&mut Links::default(), node, request).await
    }

    /// `volume_create`: an unreplicated volume here, or a replicated one on every node of
    /// the plan (see the module doc).
    pub async fn create(
        &self,
        name: &str,
        size_bytes: u64,
        pool: Option<&str>,
        replicas: Option<u32>,
        protocol: Option<&str>,
        nodes: Option<&[String]>,
    ) -> Result<VolumeInfo, ApiError> {
        validate_volume_name(name).map_err(|e| invalid(e.to_string()))?;
        let size = Self::checked_size(size_bytes)?;
        let plan = plan_create(&self.config(), replicas, nodes)?;
        let options = apply_change(
            &OptionsChange {
                protocol: protocol.map(String::from),
                ..Default::default()
            },
            self.config().replication,
        )
        .map_err(invalid)?;
        if !plan.is_replicated() {
            if protocol.is_some() {
                return Err(invalid(
                    "--protocol applies to replicated volumes (--replicas 2 or more)",
                ));
            }
            return self.create_local(name, size, pool).await;
        }
        let mut links = Links::default();
        self.create_on_nodes(&mut links, name, size, pool, &plan, options, None)
            .await
    }

    /// The replicated part of `volume_create` (and of `volume_clone`, with `clone_of`):
    /// prepare on every node of `plan` (the first one, then the others at once), then
    /// commit on all at once, undoing on a failure. The nodes are called through `links`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn create_on_nodes(
        &self,
        links: &mut Links,
        name: &str,
        size: u64,
        pool: Option<&str>,
        plan: &CreatePlan,
        options: VolumeOptions,
        clone_of: Option<String>,
    ) -> Result<VolumeInfo, ApiError> {
        let token = random_token();
        let day0 = random_day0();
        let participants = &plan.participants;
        let mut phases = crate::phases::Phases::start("create", name);
        let mut committed = 0;
        let mut local_info = None;
        let prepare = |node: &String| PeerRequest::ReplicaPrepare {
            name: name.to_string(),
            size_bytes: size,
            pool: pool.map(String::from),
            diskless: plan.tiebreakers.contains(node),
            token: token.clone(),
            linked: clone_of.is_some(),
        };
        // The first node settles two concurrent creates of one name: the one that reserves
        // it there wins, the other is refused before it touched anything. The others are
        // prepared at once after it.
        let (mut prepared, mut failure) = (0, None);
        if let Some((first, rest)) = participants.split_first() {
            failure = self.call_node(links, first, prepare(first)).await.err();
            if failure.is_none() {
                let calls = rest.iter().map(|n| (n.clone(), prepare(n))).collect();
                let answers = self.call_at_once(links, calls).await;
                // Every node is released on a failure (a no-op where the name is not held).
                prepared = participants.len();
                failure = answers.into_iter().find_map(Result::err);
            }
        }
        phases.done("prepare");
        // Every node commits at the same time (each allocates its storage, e.g. a linked
        // clone's `lvcreate`); the undo below goes through the committed ones first.
        let mut order: Vec<String> = participants.clone();
        if failure.is_none() {
            let calls: Vec<(String, PeerRequest)> = participants
                .iter()
                .map(|node| {
                    let diskless = plan.tiebreakers.contains(node);
                    let definition = VolumeDefinition {
                        version: DEFINITION_VERSION,
                        name: name.to_string(),
                        pool: if diskless {
                            String::new()
                        } else {
                            pool.unwrap_or_default().to_string()
                        },
                        size_bytes: size,
                        created_unix: now_unix(),
                        nodes: plan.data_nodes.clone(),
                        tiebreakers: plan.tiebreakers.clone(),
                        diskless,
                        options,
                        renamed_from: None,
                        clone_of: clone_of.clone(),
                    };
                    let request = PeerRequest::ReplicaCommit {
                        token: token.clone(),
                        definition,
                        day0,
                        joining: false,
                    };
                    (node.clone(), request)
                })
                .collect();
            let answers = self.call_at_once(links, calls).await;
            let mut not_committed = Vec::new();
            order.clear();
            for (node, answer) in participants.iter().zip(answers) {
                let diskless = plan.tiebreakers.contains(node);
                match answer {
                    Ok(PeerReply::Volume { volume }) => {
                        order.push(node.clone());
                        // Report this node's replica, else the first data replica's.
                        if *node == self.config().node || (local_info.is_none() && !diskless) {
                            local_info = Some(volume);
                        }
                    }
                    Ok(other) => {
                        not_committed.push(node.clone());
                        failure = failure.or(Some(ApiError::new(
                            ErrorKind::Peer,
                            format!("node '{node}' answered the commit with {other:?}"),
                        )));
                    }
                    Err(e) => {
                        not_committed.push(node.clone());
                        failure = failure.or(Some(e));
                    }
                }
            }
            committed = order.len();
            order.extend(not_committed);
            phases.done("commit");
        }
        let Some(failure) = failure else {
            tracing::info!(volume = %name, nodes = ?plan.data_nodes, tiebreakers = ?plan.tiebreakers,
                size, "replicated volume created");
            return local_info.ok_or_else(|| {
                ApiError::new(ErrorKind::Internal, "no node reported the created volume")
            });
        };
        let mut leftovers = Vec::new();
        for step in rollback_plan(&order, prepared, committed) {
            let (node, request) = match &step {
                Undo::Delete(node) => (
                    node,
                    PeerRequest::ReplicaDelete {
                        name: name.to_string(),
                        force: true,
                    },
                ),
                Undo::Release(node) => (
                    node,
                    PeerRequest::ReplicaAbort {
                        name: name.to_string(),
                        token: token.clone(),
                    },
                ),
            };
            if let Err(e) = self.call_node(links, node, request).await {
                tracing::error!(volume = %name, node = %node, error = %e.message,
                    "cannot undo a failed create on this node; clean up there by hand");
                if matches!(step, Undo::Delete(_)) {
                    leftovers.push(node.clone());
                }
            }
        }
        if leftovers.is_empty() {
            Err(ApiError::new(
                failure.kind,
                format!(
                    "cannot create volume '{name}' (nothing was kept): {}",
                    failure.message
                ),
            ))
        } else {
            Err(ApiError::new(
                failure.kind,
                format!(
                    "cannot create volume '{name}': {}; undoing it failed on {} (run `tandem volume delete {name} --force` there)",
                    failure.message,
                    leftovers.join(", ")
                ),
            ))
        }
    }

    /// Peer `replica_prepare`: validate and reserve the name under `token`.
    pub async fn prepare_replica(
        &self,
        name: &str,
        size_bytes: u64,
        pool: Option<&str>,
        diskless: bool,
        token: &str,
        linked: bool,
    ) -> Result<(), ApiError> {
        validate_volume_name(name).map_err(|e| invalid(e.to_string()))?;
        let size = Self::checked_size(size_bytes)?;
        let node = self.config().node.clone();
        if !diskless {
            let pool_name = self.pick_pool(pool)?.name().to_string();
            let backend = self
                .pool_backend(&pool_name)
                .ok_or_else(|| ApiError::new(ErrorKind::Internal, "pool vanished"))?;
            backend.check_name(name).map_err(pool_error)?;
            if !linked {
                let checked = backend.clone();
                blocking(move || checked.check_room(size).map_err(pool_error)).await?;
            }
        }
        let mut volumes = self.lock();
        if let Some(slot) = volumes.get(name) {
            let stale = slot
                .reservation
                .as_ref()
                .is_some_and(|r| r.since.elapsed() > RESERVATION_TTL);
            if !stale {
                return Err(ApiError::new(
                    ErrorKind::AlreadyExists,
                    if slot.definition.is_some() {
                        format!("volume '{name}' already exists on node '{node}'")
                    } else {
                        format!(
                            "volume '{name}' is being created on node '{node}' by another command"
                        )
                    },
                ));
            }
            tracing::warn!(volume = %name, "taking over a reservation whose create never finished");
        }
        volumes.insert(
            name.to_string(),
            Slot {
                definition: None,
                state: VolumeState::Ok,
                busy: Some("create"),
                device: None,
                reservation: Some(Reservation {
                    token: token.to_string(),
                    since: std::time::Instant::now(),
                }),
                runtime: None,
                io: Default::default(),
            },
        );
        Ok(())
    }

    /// Peer `replica_abort`: drop the reservation if `token` holds it.
    pub fn abort_replica(&self, name: &str, token: &str) {
        let mut volumes = self.lock();
        let held = volumes.get(name).is_some_and(|s| {
            s.definition.is_none() && s.reservation.as_ref().is_some_and(|r| r.token == token)
        });
        if held {
            volumes.remove(name);
        }
    }

    pub(crate) fn take_reservation(&self, name: &str, token: &str) -> Result<(), ApiError> {
        let mut volumes = self.lock();
        match volumes.get_mut(name) {
            Some(slot)
                if slot.definition.is_none()
                    && slot.reservation.as_ref().is_some_and(|r| r.token == token) =>
            {
                // Still a placeholder; refresh so the TTL cannot expire mid-commit.
                if let Some(r) = slot.reservation.as_mut() {
                    r.since = std::time::Instant::now();
                }
                Ok(())
            }
            _ => Err(ApiError::new(
                ErrorKind::Busy,
                format!(
                    "volume '{name}' is not reserved for this create on node '{}' (reservation expired or taken)",
                    self.config().node
                ),
            )),
        }
    }

    /// Peer `replica_commit`: allocate storage, write metadata with `day0`, save the
    /// definition, open the replica. On failure everything done here is undone and the
    /// reservation released.
    pub async fn commit_replica(
        &self,
        token: &str,
        mut definition: VolumeDefinition,
        day0: u64,
        joining: bool,
    ) -> Result<VolumeInfo, ApiError> {
        let name = definition.name.clone();
        validate_volume_name(&name).map_err(|e| invalid(e.to_string()))?;
        self.take_reservation(&name, token)?;
        let mut phases = crate::phases::Phases::start("replica commit", &name);
        let result = self.commit_reserved(&mut definition, day0, joining).await;
        phases.done("storage, metadata, definition");
        match result {
            Ok(()) => {
                if let Some(slot) = self.lock().get_mut(&name) {
                    slot.reservation = None;
                    slot.busy = None;
                }
                let opened = self.open_replica(&name).await;
                phases.done("open");
                if let Err(e) = opened {
                    // A replica the engine cannot run is no replica: undo it here, and the
                    // coordinator undoes the others.
                    if let Err(undo) = self.delete_local(&name).await {
                        tracing::error!(volume = %name, error = %undo.message,
                            "cannot remove a replica the engine refused to open");
                    }
                    return Err(ApiError::new(
                        e.kind,
                        format!(
                            "the replication engine cannot open the new replica: {}",
                            e.message
                        ),
                    ));
                }
                tracing::info!(volume = %name, diskless = definition.diskless, "replica created");
                Ok(self.info(&definition, VolumeState::Ok))
            }
            Err(e) => {
                self.abort_replica(&name, token);
                Err(e)
            }
        }
    }

    async fn commit_reserved(
        &self,
        definition: &mut VolumeDefinition,
        day0: u64,
        joining: bool,
    ) -> Result<(), ApiError> {
        let name = definition.name.clone();
        let backend = if definition.diskless {
            definition.pool.clear();
            None
        } else {
            let pool = (!definition.pool.is_empty()).then_some(definition.pool.as_str());
            let pool_name = self.pick_pool(pool)?.name().to_string();
            definition.pool = pool_name.clone();
            self.pool_backend(&pool_name)
        };
        let peers: Vec<String> = definition
            .peers(&self.config().node)
            .map(String::from)
            .collect();
        let meta_dir = self.meta_dir(&name);
        let volume_dir = self.store.dir().join(&name);
        let engine = std::sync::Arc::clone(&self.engine);
        let store = self.store.clone();
        let to_save = definition.clone();
        let saved = blocking(move || {
            let mut allocated = to_save.size_bytes;
            // A joining replica's storage is marked as this add's before it exists, so
            // storage found under the name is replaced only if an interrupted add of
            // ours made it, never storage of anything else.
            let joining_marker = volume_dir.join("joining");
            let ours_if_left = joining && joining_marker.exists();
            if joining && backend.is_some() {
                mark_joining(&joining_marker).map_err(|e| {
                    ApiError::new(
                        ErrorKind::Internal,
                        format!(
                            "cannot record the replica add in {}: {e}",
                            volume_dir.display()
                        ),
                    )
                })?;
            }
            if let Some(backend) = &backend {
                allocated = match crate::linked_clone::allocate(
                    backend.as_ref(),
                    &name,
                    allocated,
                    to_save.clone_of.as_deref(),
                ) {
                    // Left by a replica add that crashed here before its definition was
                    // saved (this node has no definition of the name: it was reserved). A
                    // joining replica is fully resynced, so nothing of it is kept.
                    Err(crate::pool::PoolError::Exists { .. }) if ours_if_left => {
                        tracing::warn!(volume = %name,
                            "replacing storage left by an interrupted replica add");
                        let _ = std::fs::remove_dir_all(&volume_dir);
                        backend.delete(&name).map_err(pool_error)?;
                        backend.create(&name, allocated).map_err(pool_error)?
                    }
                    created => created.map_err(|e| {
                        if joining {
                            let _ = std::fs::remove_file(&joining_marker);
                        }
                        pool_error(e)
                    })?,
                };
            }
            let undo = |backend: &Option<std::sync::Arc<dyn crate::pool::Pool>>| {
                let _ = std::fs::remove_dir_all(&volume_dir);
                if let Some(backend) = backend {
                    if let Err(e) = backend.delete(&name) {
                        tracing::error!(volume = %name, error = %crate::report::error_chain(&e),
                            "cannot free the storage of a failed create; remove it by hand");
                    }
                }
            };
            let peer_names: Vec<&str> = peers.iter().map(String::as_str).collect();
            let created = if joining {
                engine.create_metadata_inconsistent(&meta_dir, allocated, &peer_names)
            } else {
                engine.create_metadata(&meta_dir, allocated, day0, &peer_names)
            };
            if let Err(e) = created {
                undo(&backend);
                return Err(ApiError::new(
                    ErrorKind::Internal,
                    format!("cannot initialise replication metadata: {}", e.message),
                ));
            }
            let definition = VolumeDefinition {
                size_bytes: allocated,
                ..to_save
            };
            if let Err(e) = store.save(&definition) {
                undo(&backend);
                return Err(store_error(e));
            }
            let _ = std::fs::remove_file(&joining_marker);
            Ok(definition)
        })
        .await?;
        *definition = saved.clone();
        if let Some(slot) = self.lock().get_mut(&saved.name) {
            slot.definition = Some(saved);
        }
        Ok(())
    }

    /// `volume_delete`: everywhere for a replicated volume (module doc), else here.
    pub async fn delete(&self, name: &str, force: bool) -> Result<Vec<String>, ApiError> {
        validate_volume_name(name).map_err(|e| invalid(e.to_string()))?;
        let definition = self.definition(name)?;
        self.check_no_clones(name, None)?;
        if !definition.is_replicated() {
            return self.delete_local(name).await.map(|()| Vec::new());
        }
        let nodes = self.ordered_nodes(&definition);
        let mut unreachable = Vec::new();
        let mut present = Vec::new();
        for node in &nodes {
            match self
                .on_node(
                    node,
                    PeerRequest::ReplicaStatus {
                        name: name.to_string(),
                    },
                )
                .await
            {
                Ok(PeerReply::Status { status }) => {
                    check_deletable(name, node, &status, force)?;
                    present.push(node.clone());
                }
                Ok(_) => present.push(node.clone()),
                Err(e) if e.kind == ErrorKind::NotFound => {}
                Err(e) if e.kind == ErrorKind::Peer => unreachable.push((node.clone(), e.message)),
                Err(e) => return Err(e),
            }
        }
        if !unreachable.is_empty() && !force {
            let (node, why) = &unreachable[0];
            return Err(ApiError::new(
                ErrorKind::Peer,
                format!(
                    "cannot delete volume '{name}': node '{node}' is unreachable ({why}); \
                     bring it back, or use --force (its replica then stays on '{node}' until \
                     you delete it there)"
                ),
            ));
        }
        // This node last: if another node fails, the definition stays here and the same
        // command can be run again.
        present.sort_by_key(|n| *n == self.config().node);
        let mut failed = Vec::new();
        for node in &present {
            if let Err(e) = self
                .on_node(
                    node,
                    PeerRequest::ReplicaDelete {
                        name: name.to_string(),
                        force,
                    },
                )
                .await
            {
                failed.push(format!("{node}: {}", e.message));
            }
        }
        if !failed.is_empty() {
            return Err(ApiError::new(
                ErrorKind::Peer,
                format!(
                    "volume '{name}' was not deleted everywhere: {} (run the delete again)",
                    failed.join("; ")
                ),
            ));
        }
        let left_on: Vec<String> = unreachable.into_iter().map(|(n, _)| n).collect();
        for node in &left_on {
            tracing::warn!(volume = %name, node = %node,
                "forced delete: node unreachable, its replica remains; run `tandem volume delete {name} --force` there");
        }
        Ok(left_on)
    }

    /// Peer `replica_delete`: this node's copy, refusing an open or (unless `force`)
    /// Primary replica.
    pub async fn delete_replica(&self, name: &str, force: bool) -> Result<(), ApiError> {
        if let Ok(status) = self.status(name) {
            check_deletable(name, &self.config().node, &status, force)?;
        }
        self.delete_local(name).await
    }

    /// `volume_resize`: every node of a replicated volume (module doc), else here.
    pub async fn resize(&self, name: &str, size_bytes: u64) -> Result<VolumeInfo, ApiError> {
        let definition = self.definition(name)?;
        if !definition.is_replicated() {
            return self.resize_local(name, size_bytes).await;
        }
        let size = Self::checked_size(size_bytes)?;
        let nodes = self.ordered_nodes(&definition);
        for node in &nodes {
            self.on_node(
                node,
                PeerRequest::ReplicaCheckGrow {
                    name: name.to_string(),
                    size_bytes: size,
                },
            )
            .await?;
        }
        let mut grown = Vec::new();
        let mut local = None;
        for node in &nodes {
            match self
                .on_node(
                    node,
                    PeerRequest::ReplicaResize {
                        name: name.to_string(),
                        size_bytes: size,
                    },
                )
                .await
            {
                Ok(PeerReply::Volume { volume }) => {
                    if *node == self.config().node {
                        local = Some(volume);
                    }
                    grown.push(node.clone());
                }
                Ok(_) => grown.push(node.clone()),
                Err(e) => {
                    return Err(ApiError::new(
                        e.kind,
                        format!(
                            "volume '{name}' grew on [{}] but not on '{node}': {}; fix that and run the resize again",
                            grown.join(", "),
                            e.message
                        ),
                    ))
                }
            }
        }
        match local {
            Some(info) => Ok(info),
            None => self.show(name),
        }
    }

    /// Peer `replica_check_grow`.
    pub async fn check_grow(&self, name: &str, size_bytes: u64) -> Result<(), ApiError> {
        let definition = self.definition(name)?;
        let size = Self::checked_size(size_bytes)?;
        if size < definition.size_bytes {
            return Err(invalid(format!(
                "volume '{name}' is {} bytes on node '{}'; volumes only grow",
                definition.size_bytes,
                self.config().node
            )));
        }
        if definition.diskless || size == definition.size_bytes {
            return Ok(());
        }
        let backend = self.pool_backend(&definition.pool).ok_or_else(|| {
            ApiError::new(
                ErrorKind::NotFound,
                format!("pool '{}' is not configured", definition.pool),
            )
        })?;
        let additional = size - definition.size_bytes;
        blocking(move || backend.check_room(additional).map_err(pool_error)).await
    }

    /// Peer `replica_resize`.
    pub async fn resize_replica(
        &self,
        name: &str,
        size_bytes: u64,
    ) -> Result<VolumeInfo, ApiError> {
        self.resize_local(name, size_bytes).await
    }

    /// `volume_set`: new options on every node of the volume.
    pub async fn set_options(
        &self,
        name: &str,
        change: &OptionsChange,
    ) -> Result<VolumeInfo, ApiError> {
        let definition = self.definition(name)?;
        let only_read_only = OptionsChange {
            read_only: None,
            ..change.clone()
        }
        .is_empty();
        if !definition.is_replicated() {
            if let (Some(read_only), true) = (change.read_only, only_read_only) {
                let options = VolumeOptions {
                    read_only,
                    ..definition.options
                };
                return self.set_options_local(name, options).await;
            }
            return Err(invalid(format!(
                "volume '{name}' has a single replica; replication options do not apply"
            )));
        }
        if change.is_empty() {
            return Err(invalid("nothing to change: give at least one option"));
        }
        let options = apply_change(change, definition.options).map_err(invalid)?;
        let mut failed = Vec::new();
        for node in self.ordered_nodes(&definition) {
            if let Err(e) = self
                .on_node(
                    &node,
                    PeerRequest::ReplicaSetOptions {
                        name: name.to_string(),
                        options,
                    },
                )
                .await
            {
                failed.push(format!("{node}: {}", e.message));
            }
        }
        if !failed.is_empty() {
            return Err(ApiError::new(
                ErrorKind::Peer,
                format!(
                    "options of '{name}' not changed everywhere: {} (run the command again)",
                    failed.join("; ")
                ),
            ));
        }
        self.show(name)
    }

    /// Peer `replica_set_options`: engine first (it may refuse), then the definition.
    pub async fn set_options_local(
        &self,
        name: &str,
        options: VolumeOptions,
    ) -> Result<VolumeInfo, ApiError> {
        let (claim, definition, state) = self.claim(name, "set")?;
        let runtime = self.lock().get(name).and_then(|s| s.runtime.clone());
        if let Some(runtime) = runtime {
            runtime
                .replica()
                .set_options(&options)
                .map_err(crate::replicated_export::engine_error)?;
        }
        let new_definition = VolumeDefinition {
            options,
            ..definition
        };
        let store = self.store.clone();
        let to_save = new_definition.clone();
        blocking(move || store.save(&to_save).map_err(store_error)).await?;
        if let Some(slot) = self.lock().get_mut(name) {
            slot.definition = Some(new_definition.clone());
        }
        drop(claim);
        Ok(self.info(&new_definition, state))
    }

    /// `volume_allow_two_primaries`: the gate on every node of the volume (see the module doc).
    pub async fn allow_two_primaries(
        &self,
        name: &str,
        allow: bool,
    ) -> Result<VolumeStatus, ApiError> {
        let definition = self.definition(name)?;
        if !definition.is_replicated() {
            return Err(invalid(format!(
                "volume '{name}' has a single replica; two Primaries need a replicated volume"
            )));
        }
        let nodes = self.ordered_nodes(&definition);
        let request = |allow| PeerRequest::ReplicaAllowTwoPrimaries {
            name: name.to_string(),
            allow,
        };
        if !allow {
            let mut failed = Vec::new();
            for node in &nodes {
                if let Err(e) = self.on_node(node, request(false)).await {
                    failed.push(format!("{node}: {}", e.message));
                }
            }
            if !failed.is_empty() {
                return Err(ApiError::new(
                    ErrorKind::Peer,
                    format!(
                        "two primaries of '{name}' not switched off everywhere: {} (run the command again)",
                        failed.join("; ")
                    ),
                ));
            }
            tracing::info!(volume = %name, "two primaries switched off on every node");
            return self.status(name);
        }
        let mut statuses = Vec::new();
        for node in &nodes {
            let status = match self
                .on_node(node, PeerRequest::ReplicaStatus { name: name.to_string() })
                .await
            {
                Ok(PeerReply::Status { status }) => status,
                Ok(other) => {
                    return Err(ApiError::new(
                        ErrorKind::Peer,
                        format!("node '{node}' answered replica_status with {other:?}"),
                    ))
                }
                Err(e) => {
                    return Err(ApiError::new(
                        e.kind,
                        format!(
                            "cannot allow two primaries for '{name}': node '{node}' must be reachable: {}",
                            e.message
                        ),
                    ))
                }
            };
            statuses.push((node.clone(), status));
        }
        check_two_primaries_allowed(name, &definition, &statuses)?;
        let mut done: Vec<&String> = Vec::new();
        for node in &nodes {
            if let Err(e) = self.on_node(node, request(true)).await {
                for undo in done.iter().rev() {
                    if let Err(u) = self.on_node(undo, request(false)).await {
                        tracing::error!(volume = %name, node = %undo, error = %u.message,
                            "could not switch two primaries off again after a failure");
                    }
                }
                return Err(ApiError::new(
                    e.kind,
                    format!(
                        "two primaries for '{name}' not allowed (switched off again): {node}: {}",
                        e.message
                    ),
                ));
            }
            done.push(node);
        }
        tracing::info!(volume = %name, "two primaries allowed on every node");
        self.status(name)
    }

    pub(crate) fn definition(&self, name: &str) -> Result<VolumeDefinition, ApiError> {
        self.lock()
            .get(name)
            .and_then(|s| s.definition.clone())
            .ok_or_else(|| not_found(name))
    }

    /// The volume's nodes (data and tiebreakers) in config order.
    pub(crate) fn ordered_nodes(&self, definition: &VolumeDefinition) -> Vec<String> {
        self.config()
            .nodes
            .iter()
            .filter(|n| {
                definition.nodes.contains(&n.name) || definition.tiebreakers.contains(&n.name)
            })
            .map(|n| n.name.clone())
            .collect()
    }
}

/// May `name` get two Primaries, given every node's status? Protocol C, and every data
/// replica UpToDate (one of them is the migration's destination).
pub fn check_two_primaries_allowed(
    name: &str,
    definition: &VolumeDefinition,
    statuses: &[(String, VolumeStatus)],
) -> Result<(), ApiError> {
    let protocol = definition.options.protocol.to_string();
    if protocol != "C" {
        return Err(invalid(format!(
            "'{name}' runs protocol {protocol}; two Primaries (live migration) need protocol C \
             (`tandem volume set {name} --protocol C`)"
        )));
    }
    let not_ready: Vec<String> = statuses
        .iter()
        .filter(|(node, _)| definition.nodes.contains(node))
        .filter(|(_, s)| s.replica.disk_state != DiskState::UpToDate)
        .map(|(node, s)| format!("the replica on {node} is {}", s.replica.disk_state))
        .collect();
    if !not_ready.is_empty() {
        return Err(ApiError::new(
            ErrorKind::Refused,
            format!(
                "cannot allow two primaries for '{name}': {}; every replica must be UpToDate \
                 (`tandem volume wait-sync {name}`)",
                not_ready.join(", ")
            ),
        ));
    }
    Ok(())
}

fn check_deletable(
    name: &str,
    node: &str,
    status: &VolumeStatus,
    force: bool,
) -> Result<(), ApiError> {
    if status.open_writers > 0 {
        return Err(ApiError::new(
            ErrorKind::InUse,
            format!(
                "volume '{name}' is open for writing on node '{node}' (a running VM?); stop it first"
            ),
        ));
    }
    if status.replica.role == Role::Primary && !force {
        return Err(ApiError::new(
            ErrorKind::InUse,
            format!(
                "volume '{name}' is Primary on node '{node}'; run `tandem volume demote {name}` there first, or use --force"
            ),
        ));
    }
    Ok(())
}

/// Record durably that a joining replica's storage is about to be created here.
fn mark_joining(marker: &std::path::Path) -> std::io::Result<()> {
    let dir = marker.parent().unwrap_or(std::path::Path::new("."));
    std::fs::create_dir_all(dir)?;
    std::fs::File::create(marker)?.sync_all()?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(this: &str) -> Config {
        let text = format!(
            "node = \"{this}\"\n\
             [[nodes]]\nname = \"hv1\"\ncontrol = \"127.0.0.1:7701\"\nreplication = \"127.0.0.1:7791\"\n\
             [[nodes]]\nname = \"witness\"\ncontrol = \"127.0.0.1:7703\"\nreplication = \"127.0.0.1:7793\"\ndiskless = true\n\
             [[nodes]]\nname = \"hv2\"\ncontrol = \"127.0.0.1:7702\"\nreplication = \"127.0.0.1:7792\"\n\
             [[nodes]]\nname = \"hv3\"\ncontrol = \"127.0.0.1:7704\"\nreplication = \"127.0.0.1:7794\"\n\
             [[pools]]\nname = \"f\"\nbackend = \"file\"\npath = \"/srv/f\"\n"
        );
        Config::parse(&text, Path::new("/etc/tandem/tandem.toml")).unwrap()
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn default_nodes_are_this_node_then_the_others_in_config_order() {
        let plan = plan_create(&config("hv2"), Some(2), None).unwrap();
        assert_eq!(plan.data_nodes, names(&["hv1", "hv2"]));
        assert_eq!(plan.tiebreakers, names(&["witness"]));
        assert_eq!(plan.participants, names(&["hv1", "witness", "hv2"]));
        assert!(plan.is_replicated());
        let plan = plan_create(&config("hv3"), Some(2), None).unwrap();
        assert_eq!(plan.data_nodes, names(&["hv1", "hv3"]));
        // Run on the witness: the first data nodes in config order.
        let plan = plan_create(&config("witness"), Some(2), None).unwrap();
        assert_eq!(plan.data_nodes, names(&["hv1", "hv2"]));
    }

    #[test]
    fn one_replica_is_local_and_has_no_tiebreakers() {
        let plan = plan_create(&config("hv1"), None, None).unwrap();
        assert_eq!(plan.data_nodes, names(&["hv1"]));
        assert!(plan.tiebreakers.is_empty());
        assert!(!plan.is_replicated());
        let e = plan_create(&config("hv1"), None, Some(&names(&["hv2"]))).unwrap_err();
        assert!(
            e.message.contains("run the command on node 'hv2'"),
            "{}",
            e.message
        );
    }

    #[test]
    fn explicit_nodes_are_validated_and_put_in_config_order() {
        let c = config("hv1");
        let plan = plan_create(&c, None, Some(&names(&["hv3", "hv1"]))).unwrap();
        assert_eq!(plan.data_nodes, names(&["hv1", "hv3"]));
        let err = |replicas, nodes: &[&str]| {
            plan_create(&c, replicas, Some(&names(nodes)))
                .unwrap_err()
                .message
        };
        assert_eq!(
            err(None, &["hv1", "hv9"]),
            "node 'hv9' is not in the config (nodes: hv1, witness, hv2, hv3)"
        );
        assert_eq!(
            err(None, &["hv1", "witness"]),
            "node 'witness' is a diskless tiebreaker and cannot hold a replica"
        );
        assert_eq!(
            err(None, &["hv1", "hv1"]),
            "node 'hv1' is named twice in --nodes"
        );
        assert_eq!(
            err(Some(3), &["hv1", "hv2"]),
            "--replicas 3 but --nodes names 2 node(s)"
        );
        assert_eq!(
            plan_create(&c, Some(4), None).unwrap_err().message,
            "--replicas 4 but the cluster has 3 data node(s) (hv1, hv2, hv3)"
        );
        assert_eq!(
            plan_create(&c, Some(0), None).unwrap_err().kind,
            ErrorKind::InvalidArgument
        );
    }

    #[test]
    fn rollback_deletes_committed_and_releases_reserved_newest_first() {
        let p = names(&["hv1", "witness", "hv2"]);
        // Prepare failed on the second node: release the first only.
        assert_eq!(rollback_plan(&p, 1, 0), vec![Undo::Release("hv1".into())]);
        // Commit failed on hv2 (all prepared, two committed).
        assert_eq!(
            rollback_plan(&p, 3, 2),
            vec![
                Undo::Release("hv2".into()),
                Undo::Delete("witness".into()),
                Undo::Delete("hv1".into()),
            ]
        );
        // Nothing prepared: nothing to undo.
        assert!(rollback_plan(&p, 0, 0).is_empty());
    }

    #[test]
    fn day0_generations_are_nonzero_and_even() {
        for _ in 0..100 {
            let g = random_day0();
            assert!(g != 0 && g & 1 == 0);
        }
        assert_ne!(random_token(), random_token());
    }
}

#[cfg(test)]
mod two_primaries_tests {
    use super::*;

    fn definition(protocol: &str) -> VolumeDefinition {
        serde_json::from_value(serde_json::json!({
            "version": DEFINITION_VERSION, "name": "v", "pool": "f", "size_bytes": 4096,
            "created_unix": 0, "nodes": ["hv1", "hv2"], "tiebreakers": ["w"],
            "options": { "protocol": protocol }
        }))
        .unwrap()
    }

    fn status(node: &str, disk_state: &str) -> (String, VolumeStatus) {
        let status = serde_json::from_value(serde_json::json!({
            "volume": "v", "node": node, "role": "Secondary", "disk_state": disk_state,
            "protocol": "C", "quorum": true, "io_suspended": false,
            "allow_two_primaries": false, "size_bytes": 4096,
            "promoted_explicitly": false, "open_writers": 0
        }))
        .unwrap();
        (node.to_string(), status)
    }

    #[test]
    fn two_primaries_need_protocol_c_and_every_data_replica_uptodate() {
        let ok = [
            status("hv1", "UpToDate"),
            status("w", "Diskless"),
            status("hv2", "UpToDate"),
        ];
        check_two_primaries_allowed("v", &definition("C"), &ok).unwrap();
        let e = check_two_primaries_allowed("v", &definition("A"), &ok).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
        assert!(
            e.message.starts_with("'v' runs protocol A; two Primaries"),
            "{}",
            e.message
        );
        let outdated = [status("hv1", "UpToDate"), status("hv2", "Outdated")];
        let e = check_two_primaries_allowed("v", &definition("C"), &outdated).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Refused);
        assert!(
            e.message
                .contains("the replica on hv2 is Outdated; every replica must be UpToDate"),
            "{}",
            e.message
        );
    }
}
