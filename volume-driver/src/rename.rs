//! `tandem volume rename OLD NEW`: renaming a volume on every node that holds it (data
//! replicas and tiebreakers), coordinated by the node where the command runs.
//!
//! ```text
//! coordinator                                  each node of the volume, in config order
//!   replica_rename_prepare {old,new,token} ──▶ NEW valid here (LVM words), free (reserved
//!                                              under token, so a racing create of NEW
//!                                              loses), OLD here, not open, not Primary
//!   replica_rename_commit {old,new,token}  ──▶ close the replica, rename (crash order
//!                                              below); the replica stays closed
//!   replica_open {name}                    ──▶ reopen under the final name, once every
//!                                              node is renamed (links are keyed by name)
//! ```
//!
//! Nothing changes before every node accepted the prepare; an unreachable node refuses the
//! whole rename. If a commit fails, the nodes already renamed are renamed back (best
//! effort), every node reopens the replica under the name it has, and the error lists each
//! node's state. While nodes are closed the volume is briefly not served; a replica
//! reopened under NEW dials its peers under NEW, and a peer still offering OLD finds no
//! such replica and is refused by its engine (no data crosses between different names).
//!
//! **Crash order on one node** (each step durable before the next):
//!
//! 1. write `NEW.json` with `renamed_from: OLD`;
//! 2. rename the storage (file: `renameat2(RENAME_NOREPLACE)`; lvm-thin: `lvrename`);
//! 3. rename the metadata directory `<state>/volumes/OLD` → `NEW`;
//! 4. remove `OLD.json`;
//! 5. rewrite `NEW.json` without the marker.
//!
//! At startup, [`complete_interrupted_renames`] finds a definition with `renamed_from`
//! and finishes the steps that are missing (each is idempotent: storage and directory are
//! moved only when OLD exists and NEW does not). If both OLD and NEW storage exist it
//! cannot know which is the volume: it keeps the OLD definition, sets the NEW one aside
//! (`NEW.json.rename-conflict`) and says so; nothing is deleted.

use control_api::{ApiError, ErrorKind, Role, VolumeInfo, VolumeState, VolumeStatus};
use std::path::Path;
use std::sync::Arc;

use crate::names::validate_volume_name;
use crate::peer::PeerRequest;
use crate::pool::Pool;
use crate::report::error_chain;
use crate::service::{
    blocking, invalid, not_found, pool_error, store_error, Reservation, Slot, VolumeService,
};
use crate::store::{Store, StoreError, VolumeDefinition};

/// Refuse a rename of `name` while `status` (of node `node`) shows it in use.
pub fn check_renamable(
    name: &str,
    node: &str,
    status: &VolumeStatus,
    replicated: bool,
) -> Result<(), ApiError> {
    if status.open_writers > 0 {
        return Err(ApiError::new(
            ErrorKind::InUse,
            format!(
                "{name} is in use on {node} (open by {} writer(s)); stop the VM first",
                status.open_writers
            ),
        ));
    }
    // An unreplicated volume always reports Primary; only its writers count.
    if replicated && status.replica.role == Role::Primary {
        return Err(ApiError::new(
            ErrorKind::InUse,
            format!("{name} is in use on {node} (Primary); stop the VM first (or `tandem volume demote {name}` there)"),
        ));
    }
    Ok(())
}

/// Check the two names of a rename (pure).
pub fn check_names(name: &str, new_name: &str) -> Result<(), ApiError> {
    validate_volume_name(name).map_err(|e| invalid(e.to_string()))?;
    validate_volume_name(new_name).map_err(|e| invalid(format!("new name: {e}")))?;
    if name == new_name {
        return Err(invalid(format!("volume '{name}' already has that name")));
    }
    Ok(())
}

/// The nodes to rename back after the commit on `participants[failed]` failed: the ones
/// committed before it, newest first.
pub fn rename_rollback(participants: &[String], failed: usize) -> Vec<String> {
    participants[..failed.min(participants.len())]
        .iter()
        .rev()
        .cloned()
        .collect()
}

fn pool_of(
    pool_for: &dyn Fn(&str) -> Option<Arc<dyn Pool>>,
    definition: &VolumeDefinition,
) -> Result<Option<Arc<dyn Pool>>, ApiError> {
    if definition.diskless {
        return Ok(None);
    }
    pool_for(&definition.pool).map(Some).ok_or_else(|| {
        ApiError::new(
            ErrorKind::NotFound,
            format!("pool '{}' is not configured", definition.pool),
        )
    })
}

/// Steps 1–5 of the module doc on this node's files and storage (blocking). On failure the
/// steps done are undone (best effort) and the error says what is left.
fn rename_on_disk(
    store: &Store,
    backend: Option<&dyn Pool>,
    old: &VolumeDefinition,
    new_name: &str,
) -> Result<VolumeDefinition, ApiError> {
    let name = old.name.clone();
    let marked = VolumeDefinition {
        name: new_name.to_string(),
        renamed_from: Some(name.clone()),
        ..old.clone()
    };
    store.save(&marked).map_err(store_error)?;
    if let Some(backend) = backend {
        if let Err(e) = backend.rename(&name, new_name) {
            let _ = store.remove(new_name);
            return Err(pool_error(e));
        }
    }
    let old_meta = store.dir().join(&name);
    let new_meta = store.dir().join(new_name);
    if old_meta.exists() {
        if let Err(e) = move_dir(&old_meta, &new_meta, store.dir()) {
            if let Some(backend) = backend {
                if let Err(undo) = backend.rename(new_name, &name) {
                    tracing::error!(volume = %name, error = %error_chain(&undo),
                        "cannot rename the storage back after a failed rename");
                    return Err(ApiError::new(
                        ErrorKind::Storage,
                        format!("cannot move {}: {e}; the storage is now named '{new_name}' and the definition is marked: restart tandemd to complete the rename", old_meta.display()),
                    ));
                }
            }
            let _ = store.remove(new_name);
            return Err(ApiError::new(
                ErrorKind::Storage,
                format!("cannot move {}: {e}", old_meta.display()),
            ));
        }
    }
    // From here on the rename is complete on disk; startup would finish it.
    let done = VolumeDefinition {
        renamed_from: None,
        ..marked
    };
    let finish = |e: StoreError| {
        ApiError::new(
            ErrorKind::Storage,
            format!(
                "the data of '{name}' is renamed to '{new_name}' but its definition could not be \
                 finished ({}); restart tandemd on this node to complete the rename",
                error_chain(&e)
            ),
        )
    };
    store.remove(&name).map_err(finish)?;
    store.save(&done).map_err(finish)?;
    Ok(done)
}

fn move_dir(from: &Path, to: &Path, parent: &Path) -> std::io::Result<()> {
    if to.exists() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!("{} exists", to.display()),
        ));
    }
    std::fs::rename(from, to)?;
    std::fs::File::open(parent)?.sync_all()
}

/// Finish renames a crash interrupted (module doc) before the daemon registers its volumes.
pub fn complete_interrupted_renames(
    store: &Store,
    pool_for: &dyn Fn(&str) -> Option<Arc<dyn Pool>>,
    mut definitions: Vec<VolumeDefinition>,
) -> Result<Vec<VolumeDefinition>, StoreError> {
    let marked: Vec<VolumeDefinition> = definitions
        .iter()
        .filter(|d| d.renamed_from.is_some())
        .cloned()
        .collect();
    for new in marked {
        let Some(old_name) = new.renamed_from.clone() else {
            continue;
        };
        let new_name = new.name.clone();
        let storage = match pool_of(pool_for, &new) {
            Ok(backend) => backend,
            Err(e) => {
                tracing::warn!(volume = %new_name, error = %e.message, "completing a rename without its pool");
                None
            }
        };
        let mut conflict = false;
        if let Some(backend) = &storage {
            let stored: Vec<String> = backend
                .list()
                .map_err(|e| StoreError::Invalid {
                    path: store.path_of(&new_name),
                    message: format!(
                        "cannot complete the rename from '{old_name}': {}",
                        error_chain(&e)
                    ),
                })?
                .into_iter()
                .map(|v| v.name)
                .collect();
            let has_old = stored.contains(&old_name);
            let has_new = stored.contains(&new_name);
            if has_old && has_new {
                conflict = true;
            } else if has_old {
                backend
                    .rename(&old_name, &new_name)
                    .map_err(|e| StoreError::Invalid {
                        path: store.path_of(&new_name),
                        message: format!(
                            "cannot complete the rename from '{old_name}': {}",
                            error_chain(&e)
                        ),
                    })?;
            }
        }
        let old_meta = store.dir().join(&old_name);
        let new_meta = store.dir().join(&new_name);
        if !conflict && old_meta.is_dir() {
            if new_meta.exists() {
                conflict = true;
            } else {
                move_dir(&old_meta, &new_meta, store.dir()).map_err(|source| StoreError::Io {
                    op: "move replication metadata",
                    path: old_meta.clone(),
                    source,
                })?;
            }
        }
        if conflict {
            let aside = store.dir().join(format!("{new_name}.json.rename-conflict"));
            tracing::error!(volume = %old_name, new = %new_name, aside = %aside.display(),
                "interrupted rename: storage or metadata exists under both names; keeping '{old_name}', \
                 the new definition is set aside; inspect both and remove the wrong one by hand");
            std::fs::rename(store.path_of(&new_name), &aside).map_err(|source| StoreError::Io {
                op: "set aside",
                path: store.path_of(&new_name),
                source,
            })?;
            definitions.retain(|d| d.name != new_name);
            continue;
        }
        store.remove(&old_name)?;
        let done = VolumeDefinition {
            renamed_from: None,
            ..new
        };
        store.save(&done)?;
        tracing::warn!(volume = %new_name, from = %old_name, "completed a rename interrupted by a crash");
        definitions.retain(|d| d.name != old_name && d.name != new_name);
        definitions.push(done);
    }
    definitions.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(definitions)
}

impl VolumeService {
    /// `volume_rename`: every node of a replicated volume, else here (module doc).
    pub async fn rename(&self, name: &str, new_name: &str) -> Result<VolumeInfo, ApiError> {
        check_names(name, new_name)?;
        let definition = self.definition(name)?;
        // Linked clones name their origin.
        self.check_no_clones(name, None)?;
        let participants = if definition.is_replicated() {
            self.ordered_nodes(&definition)
        } else {
            vec![self.config().node.clone()]
        };
        let token = crate::cluster::random_token();
        let mut prepared: Vec<String> = Vec::new();
        for node in &participants {
            let request = PeerRequest::ReplicaRenamePrepare {
                name: name.to_string(),
                new_name: new_name.to_string(),
                token: token.clone(),
            };
            if let Err(e) = self.on_node(node, request).await {
                for done in prepared.iter().rev() {
                    let _ = self
                        .on_node(
                            done,
                            PeerRequest::ReplicaAbort {
                                name: new_name.to_string(),
                                token: token.clone(),
                            },
                        )
                        .await;
                }
                let message = if e.kind == ErrorKind::Peer {
                    format!("cannot rename volume '{name}': node '{node}' is unreachable ({}); nothing was changed", e.message)
                } else {
                    format!(
                        "cannot rename volume '{name}' (nothing was changed): {}",
                        e.message
                    )
                };
                return Err(ApiError::new(e.kind, message));
            }
            prepared.push(node.clone());
        }
        let mut failure = None;
        let mut committed = 0;
        for node in &participants {
            let request = PeerRequest::ReplicaRenameCommit {
                name: name.to_string(),
                new_name: new_name.to_string(),
                token: token.clone(),
            };
            match self.on_node(node, request).await {
                Ok(_) => committed += 1,
                Err(e) => {
                    failure = Some((node.clone(), e));
                    break;
                }
            }
        }
        let Some((failed_node, failure)) = failure else {
            let mut not_open = Vec::new();
            if definition.is_replicated() {
                for node in &participants {
                    let request = PeerRequest::ReplicaOpen {
                        name: new_name.to_string(),
                    };
                    if let Err(e) = self.on_node(node, request).await {
                        not_open.push(format!("{node}: {}", e.message));
                    }
                }
            }
            if !not_open.is_empty() {
                return Err(ApiError::new(
                    ErrorKind::Peer,
                    format!(
                        "volume '{name}' is renamed to '{new_name}' on every node, but its replica did not reopen on {} (restart tandemd there)",
                        not_open.join("; ")
                    ),
                ));
            }
            tracing::info!(volume = %name, new = %new_name, nodes = ?participants, "volume renamed");
            return self.show(new_name);
        };
        // Release the reservations not consumed, rename back the committed nodes.
        let mut states = Vec::new();
        for node in &participants[committed..] {
            let _ = self
                .on_node(
                    node,
                    PeerRequest::ReplicaAbort {
                        name: new_name.to_string(),
                        token: token.clone(),
                    },
                )
                .await;
        }
        let back = crate::cluster::random_token();
        for node in rename_rollback(&participants, committed) {
            let undone = async {
                self.on_node(
                    &node,
                    PeerRequest::ReplicaRenamePrepare {
                        name: new_name.to_string(),
                        new_name: name.to_string(),
                        token: back.clone(),
                    },
                )
                .await?;
                self.on_node(
                    &node,
                    PeerRequest::ReplicaRenameCommit {
                        name: new_name.to_string(),
                        new_name: name.to_string(),
                        token: back.clone(),
                    },
                )
                .await
            };
            match undone.await {
                Ok(_) => states.push(format!("{node}: renamed back to '{name}'")),
                Err(e) => {
                    tracing::error!(volume = %name, node = %node, error = %e.message,
                        "cannot rename back after a failed rename");
                    states.push(format!(
                        "{node}: still named '{new_name}' (renaming back failed: {})",
                        e.message
                    ));
                }
            }
        }
        states.push(format!("{failed_node}: failed, '{name}' kept"));
        for node in &participants[(committed + 1).min(participants.len())..] {
            states.push(format!("{node}: untouched, '{name}'"));
        }
        if definition.is_replicated() {
            for node in &participants {
                let _ = self
                    .on_node(
                        node,
                        PeerRequest::ReplicaOpen {
                            name: name.to_string(),
                        },
                    )
                    .await;
            }
        }
        // Answers of other nodes already start with "on node '...'".
        let prefix = format!("on node '{failed_node}': ");
        let cause = failure
            .message
            .strip_prefix(&prefix)
            .unwrap_or(&failure.message);
        Err(ApiError::new(
            failure.kind,
            format!(
                "cannot rename volume '{name}' to '{new_name}': {prefix}{cause}; state per node: {}",
                states.join("; ")
            ),
        ))
    }

    /// Peer `replica_rename_prepare`: validate here and reserve `new_name` under `token`.
    pub async fn prepare_rename(
        &self,
        name: &str,
        new_name: &str,
        token: &str,
    ) -> Result<(), ApiError> {
        check_names(name, new_name)?;
        let node = self.config().node.clone();
        let definition = self.definition(name).map_err(|_| {
            ApiError::new(
                ErrorKind::NotFound,
                format!("volume '{name}' does not exist on node '{node}'"),
            )
        })?;
        if let Some(backend) = pool_of(&|p| self.pool_backend(p), &definition)? {
            backend.check_name(new_name).map_err(pool_error)?;
        }
        let status = self.status(name)?;
        check_renamable(name, &node, &status, definition.is_replicated())?;
        let mut volumes = self.lock();
        if let Some(slot) = volumes.get(name) {
            if let Some(other) = slot.busy {
                return Err(ApiError::new(
                    ErrorKind::Busy,
                    format!("volume '{name}' is busy on node '{node}': a {other} is in progress"),
                ));
            }
        }
        if let Some(slot) = volumes.get(new_name) {
            let stale = slot
                .reservation
                .as_ref()
                .is_some_and(|r| r.since.elapsed() > crate::cluster::RESERVATION_TTL);
            if !stale {
                return Err(ApiError::new(
                    ErrorKind::AlreadyExists,
                    if slot.definition.is_some() {
                        format!("volume '{new_name}' already exists on node '{node}'")
                    } else {
                        format!("volume '{new_name}' is being created on node '{node}' by another command")
                    },
                ));
            }
        }
        volumes.insert(
            new_name.to_string(),
            Slot {
                definition: None,
                state: VolumeState::Ok,
                busy: Some("rename"),
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

    /// Peer `replica_rename_commit`: close the replica and rename this node's copy (crash
    /// order in the module doc). The replica is reopened by `replica_open`; an
    /// unreplicated volume needs none.
    pub async fn commit_rename(
        &self,
        name: &str,
        new_name: &str,
        token: &str,
    ) -> Result<VolumeInfo, ApiError> {
        check_names(name, new_name)?;
        self.take_reservation(new_name, token)?;
        let result = self.commit_reserved_rename(name, new_name).await;
        if result.is_err() {
            self.abort_replica(new_name, token);
        }
        result
    }

    async fn commit_reserved_rename(
        &self,
        name: &str,
        new_name: &str,
    ) -> Result<VolumeInfo, ApiError> {
        let node = self.config().node.clone();
        let (mut claim, definition, state) = self.claim(name, "rename")?;
        let runtime = {
            let mut volumes = self.lock();
            let Some(slot) = volumes.get_mut(name) else {
                return Err(not_found(name));
            };
            if let Some(runtime) = &slot.runtime {
                let status = runtime.status();
                check_renamable(name, &node, &status, true)?;
                if runtime.open_handles() > 0 {
                    return Err(ApiError::new(
                        ErrorKind::InUse,
                        format!(
                            "{name} is in use on {node} (open by {} client(s)); stop the VM first",
                            runtime.open_handles()
                        ),
                    ));
                }
            } else if let Some(device) = &slot.device {
                let users = Arc::strong_count(device) - 1;
                if users > 0 {
                    return Err(ApiError::new(
                        ErrorKind::InUse,
                        format!("{name} is in use on {node} (open by {users} client(s)); stop the VM first"),
                    ));
                }
            }
            slot.device = None;
            slot.runtime.take()
        };
        if runtime.is_some() {
            if let Err(e) = self.engine.close_replica(name).await {
                tracing::warn!(volume = %name, error = %e, "cannot close the replica cleanly before rename");
            }
        }
        drop(runtime);
        let store = self.store.clone();
        let backend = pool_of(&|p| self.pool_backend(p), &definition)?;
        let old = definition.clone();
        let target = new_name.to_string();
        let renamed =
            blocking(move || rename_on_disk(&store, backend.as_deref(), &old, &target)).await;
        match renamed {
            Ok(done) => {
                let info = self.info(&done, state);
                let mut volumes = self.lock();
                claim.armed = false;
                volumes.remove(name);
                volumes.insert(new_name.to_string(), Slot::ready(done, state));
                // The takes recorded here follow it under the same lock, so that nothing
                // sees the volume under its new name without them (their commands commit
                // or discard by token, and stale ones are resolved under the new name).
                self.rename_takes(name, new_name);
                drop(volumes);
                tracing::info!(volume = %name, new = %new_name, "replica renamed");
                Ok(info)
            }
            Err(e) => {
                drop(claim);
                Err(e)
            }
        }
    }

    /// Peer `replica_open`: open the replica of a replicated volume if it is not running.
    pub async fn open_replica_if_closed(&self, name: &str) -> Result<(), ApiError> {
        let definition = self.definition(name)?;
        if !definition.is_replicated() {
            return Ok(());
        }
        let running = self.lock().get(name).is_some_and(|s| s.runtime.is_some());
        if running {
            return Ok(());
        }
        self.open_replica(name).await
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::pool::file::FilePool;
    use control_api::{DiskState, Protocol, ReplicaStatus};

    pub(crate) fn status(role: Role, writers: usize) -> VolumeStatus {
        VolumeStatus {
            replica: ReplicaStatus {
                volume: "v".into(),
                node: "hv1".into(),
                role,
                disk_state: DiskState::UpToDate,
                protocol: Protocol::C,
                quorum: true,
                quorum_reason: String::new(),
                io_suspended: false,
                allow_two_primaries: false,
                size_bytes: 4096,
                current_uuid: String::new(),
                peers: Vec::new(),
                last_verify: None,
            },
            promoted_explicitly: false,
            open_writers: writers,
        }
    }

    #[test]
    fn names_and_use_are_checked() {
        assert!(check_names("a", "b").is_ok());
        assert_eq!(
            check_names("a", "a").unwrap_err().kind,
            ErrorKind::InvalidArgument
        );
        let e = check_names("a", "bad/name").unwrap_err();
        assert!(e.message.starts_with("new name:"), "{}", e.message);
        let e =
            check_renamable("vm-100-disk-0", "hv1", &status(Role::Primary, 0), true).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InUse);
        assert!(
            e.message
                .starts_with("vm-100-disk-0 is in use on hv1 (Primary); stop the VM first"),
            "{}",
            e.message
        );
        // An unreplicated volume always says Primary: only writers refuse it.
        assert!(check_renamable("v", "hv1", &status(Role::Primary, 0), false).is_ok());
        assert!(check_renamable("v", "hv1", &status(Role::Secondary, 1), true).is_err());
        assert!(check_renamable("v", "hv1", &status(Role::Secondary, 0), true).is_ok());
    }

    #[test]
    fn rollback_renames_back_the_committed_nodes_newest_first() {
        let p: Vec<String> = ["hv1", "witness", "hv2"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert!(rename_rollback(&p, 0).is_empty());
        assert_eq!(
            rename_rollback(&p, 2),
            vec!["witness".to_string(), "hv1".to_string()]
        );
    }

    fn setup() -> (tempfile::TempDir, Store, Arc<dyn Pool>, VolumeDefinition) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state")).unwrap();
        std::fs::create_dir_all(dir.path().join("images")).unwrap();
        let pool: Arc<dyn Pool> = Arc::new(FilePool::new("files", dir.path().join("images")));
        pool.create("old", 8192).unwrap();
        std::fs::write(pool.device_path("old"), b"payload").unwrap();
        std::fs::create_dir_all(store.dir().join("old/meta")).unwrap();
        std::fs::write(store.dir().join("old/meta/m"), b"meta").unwrap();
        let definition = VolumeDefinition {
            version: crate::store::DEFINITION_VERSION,
            name: "old".into(),
            pool: "files".into(),
            size_bytes: 8192,
            created_unix: 1,
            nodes: vec!["hv1".into(), "hv2".into()],
            tiebreakers: Vec::new(),
            diskless: false,
            options: Default::default(),
            renamed_from: None,
            clone_of: None,
        };
        store.save(&definition).unwrap();
        (dir, store, pool, definition)
    }

    fn assert_renamed(store: &Store, pool: &Arc<dyn Pool>, loaded: &[VolumeDefinition]) {
        assert_eq!(loaded.len(), 1);
        assert_eq!(loaded[0].name, "new");
        assert_eq!(loaded[0].renamed_from, None);
        assert_eq!(std::fs::read(pool.device_path("new")).unwrap(), b"payload");
        assert!(!pool.device_path("old").exists());
        assert_eq!(
            std::fs::read(store.dir().join("new/meta/m")).unwrap(),
            b"meta"
        );
        assert!(!store.dir().join("old").exists());
        assert!(!store.path_of("old").exists());
        // The store on disk agrees.
        assert_eq!(store.load_all().unwrap(), loaded);
    }

    #[test]
    fn a_rename_on_disk_moves_everything() {
        let (_dir, store, pool, definition) = setup();
        let done = rename_on_disk(&store, Some(pool.as_ref()), &definition, "new").unwrap();
        assert_renamed(&store, &pool, &[done]);
    }

    #[test]
    fn startup_completes_a_rename_interrupted_after_every_step() {
        // Crash after step 1, 2, 3 and 4 of the module doc.
        for steps in 1..=4 {
            let (_dir, store, pool, definition) = setup();
            store
                .save(&VolumeDefinition {
                    name: "new".into(),
                    renamed_from: Some("old".into()),
                    ..definition.clone()
                })
                .unwrap();
            if steps >= 2 {
                pool.rename("old", "new").unwrap();
            }
            if steps >= 3 {
                std::fs::rename(store.dir().join("old"), store.dir().join("new")).unwrap();
            }
            if steps >= 4 {
                store.remove("old").unwrap();
            }
            let pools = |p: &str| (p == "files").then(|| Arc::clone(&pool));
            let loaded =
                complete_interrupted_renames(&store, &pools, store.load_all().unwrap()).unwrap();
            assert_renamed(&store, &pool, &loaded);
        }
    }

    #[test]
    fn startup_sets_aside_a_rename_it_cannot_decide() {
        let (_dir, store, pool, definition) = setup();
        store
            .save(&VolumeDefinition {
                name: "new".into(),
                renamed_from: Some("old".into()),
                ..definition.clone()
            })
            .unwrap();
        pool.create("new", 4096).unwrap();
        let pools = |p: &str| (p == "files").then(|| Arc::clone(&pool));
        let loaded =
            complete_interrupted_renames(&store, &pools, store.load_all().unwrap()).unwrap();
        assert_eq!(loaded, vec![definition]);
        assert!(store.dir().join("new.json.rename-conflict").exists());
        assert_eq!(std::fs::read(pool.device_path("old")).unwrap(), b"payload");
    }

    #[tokio::test]
    async fn an_unreplicated_volume_is_renamed_here_and_refused_while_open() {
        use crate::frontend::Exports;
        let dir = tempfile::tempdir().unwrap();
        let service = crate::service::tests::service(dir.path());
        service.create_local("a", 1 << 20, None).await.unwrap();
        service.create_local("b", 1 << 20, None).await.unwrap();
        let handle = Exports::open(&service, "a", true).await.unwrap();
        handle
            .write(4096, bytes::Bytes::from_static(b"kept"), true)
            .await
            .unwrap();
        let e = service.rename("a", "c").await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::InUse, "{}", e.message);
        assert!(e.message.contains("a is in use on hv1"), "{}", e.message);
        drop(handle);
        let e = service.rename("a", "b").await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::AlreadyExists, "{}", e.message);
        let e = service.rename("nope", "d").await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::NotFound, "{}", e.message);
        // A create of NEW while a rename holds the reservation loses.
        service.prepare_rename("a", "c", "t").await.unwrap();
        let e = service.create_local("c", 4096, None).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::AlreadyExists, "{}", e.message);
        service.abort_replica("c", "t");
        let info = service.rename("a", "c").await.unwrap();
        assert_eq!(info.name, "c");
        assert!(info.path.ends_with("c.img"));
        let names: Vec<String> = service.list().into_iter().map(|v| v.name).collect();
        assert_eq!(names, vec!["b".to_string(), "c".to_string()]);
        assert!(!dir.path().join("images/a.img").exists());
        assert!(!dir.path().join("state/volumes/a.json").exists());
        let handle = Exports::open(&service, "c", false).await.unwrap();
        assert_eq!(&handle.read(4096, 4).await.unwrap()[..], b"kept");
        drop(handle);
        // A restarted daemon sees the new name only.
        drop(service);
        let service = crate::service::tests::service(dir.path());
        let names: Vec<String> = service.list().into_iter().map(|v| v.name).collect();
        assert_eq!(names, vec!["b".to_string(), "c".to_string()]);
    }

    #[tokio::test]
    async fn the_daemon_completes_an_interrupted_rename_when_it_starts() {
        let dir = tempfile::tempdir().unwrap();
        let service = crate::service::tests::service(dir.path());
        service.create_local("a", 1 << 20, None).await.unwrap();
        let mut definition = service.definition("a").unwrap();
        drop(service);
        // A crash after steps 1 and 2: marked new definition, storage renamed.
        definition.name = "b".into();
        definition.renamed_from = Some("a".into());
        let store = Store::open(&dir.path().join("state")).unwrap();
        store.save(&definition).unwrap();
        std::fs::rename(
            dir.path().join("images/a.img"),
            dir.path().join("images/b.img"),
        )
        .unwrap();
        let service = crate::service::tests::service(dir.path());
        let names: Vec<String> = service.list().into_iter().map(|v| v.name).collect();
        assert_eq!(names, vec!["b".to_string()]);
        assert_eq!(service.show("b").unwrap().state, VolumeState::Ok);
        assert!(!store.path_of("a").exists());
        assert_eq!(service.definition("b").unwrap().renamed_from, None);
    }
}
