//! The volume service: the daemon's registry of volumes and the lifecycle operations the
//! control API exposes (create, resize, delete, list, show, pool and node info). It also
//! implements [`Exports`], the catalog frontends (NBD) open volumes through.
//!
//! Concurrency: the registry is a map behind one `std::sync::Mutex`, held only for map
//! updates and for opening a device (one `open(2)`), never across `lvm` commands or fsyncs.
//! An operation first claims its volume under the lock — create inserts a placeholder
//! (so of two concurrent creates of one name exactly one wins), resize and delete mark the
//! volume busy — and then does its slow I/O on a blocking thread. Allocations in one pool
//! are serialized by a per-pool async mutex, so the free-space check and the allocation
//! cannot interleave with another create or resize in that pool.
//!
//! Replicated volumes (more than one data node in the definition) additionally hold the
//! engine's replica in their slot ([`ReplicaRuntime`]), opened at startup and on create,
//! closed on delete and shutdown; frontends reach them through the role rules of
//! [`crate::replicated_export`]. The cluster-wide operations (coordinated create, delete,
//! resize, options) live in [`crate::cluster`]; the per-node halves they call over the peer
//! API are here and there.
//!
//! Crash ordering of create/resize/delete is described in [`crate::store`]. Everything a
//! request could refuse (name, size, pool, free space, duplicate) is checked before any
//! storage or definition is touched.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use control_api::{
    ApiError, DiskState, ErrorKind, NodeInfo, PoolInfo, ReplicaStatus, Role, VerifySummary,
    VolumeInfo, VolumeState, VolumeStatus,
};
use replication::auth::Secret;
use replication::device::{BackingDevice, CacheMode, DeviceOptions, FileDevice};
use replication::stats::{IoStats, PendingDevice};

use crate::config::Config;
use crate::engine::{Engine, NoEngine, PeerPlan, ReplicaPlan};
use crate::frontend::{ExportHandle, ExportInfo, Exports, OpenError};
use crate::local_export::LocalExport;
use crate::names::validate_volume_name;
use crate::pool::{self, Pool, PoolError};
use crate::replicated_export::{engine_error, ReplicaRuntime};
use crate::report::error_chain;
use crate::store::{Store, StoreError, VolumeDefinition, DEFINITION_VERSION};
use crate::units::{format_size, round_up_to_block};

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot open pool")]
    Pool(#[from] PoolError),
    #[error("cannot load volume definitions")]
    Store(#[from] StoreError),
}

pub(crate) struct PoolHandle {
    backend: Arc<dyn Pool>,
    /// How volumes of this pool are opened (`cache`, `io_engine`).
    device: DeviceOptions,
    /// Serializes free-space check + allocation within this pool.
    alloc: tokio::sync::Mutex<()>,
    /// Why this pool serves no volume (its file system refuses `cache = "none"`); the other
    /// pools keep working.
    refused: Option<String>,
}

impl PoolHandle {
    pub(crate) fn name(&self) -> &str {
        self.backend.name()
    }

    /// An error if this pool was refused at startup.
    fn usable(&self) -> Result<(), String> {
        match &self.refused {
            Some(reason) => Err(format!("pool '{}' is refused: {reason}", self.name())),
            None => Ok(()),
        }
    }
}

/// One registry entry.
pub(crate) struct Slot {
    /// `None` while the volume is being created.
    pub(crate) definition: Option<VolumeDefinition>,
    pub(crate) state: VolumeState,
    /// The operation in progress, if any.
    pub(crate) busy: Option<&'static str>,
    /// The device, once a frontend (or the engine) opened the volume; kept so resize can
    /// `set_size` it.
    pub(crate) device: Option<Arc<FileDevice>>,
    /// A create coordinated by another node holds this (placeholder) slot.
    pub(crate) reservation: Option<Reservation>,
    /// The engine's replica of a replicated volume, with the frontend bookkeeping.
    pub(crate) runtime: Option<Arc<ReplicaRuntime>>,
    /// An unreplicated volume's I/O statistics (its exports record them); a replicated
    /// volume's are the engine's.
    pub(crate) io: Arc<IoStats>,
}

/// The token of a coordinated create and when it was taken.
pub(crate) struct Reservation {
    pub(crate) token: String,
    pub(crate) since: Instant,
}

impl Slot {
    pub(crate) fn ready(definition: VolumeDefinition, state: VolumeState) -> Slot {
        Slot {
            definition: Some(definition),
            state,
            busy: None,
            device: None,
            reservation: None,
            runtime: None,
            io: Arc::default(),
        }
    }
}

/// The registry and its operations.
pub struct VolumeService {
    /// Swapped whole by a reload ([`crate::reload`]); read through [`VolumeService::config`].
    config: std::sync::RwLock<Arc<Config>>,
    pools: Vec<PoolHandle>,
    pub(crate) store: Store,
    volumes: Mutex<BTreeMap<String, Slot>>,
    pub(crate) engine: Arc<dyn Engine>,
    pub(crate) secret: Option<Secret>,
    /// Volumes with a replica add/remove/move running here ([`crate::membership`]).
    pub(crate) membership_ops: Mutex<std::collections::BTreeSet<String>>,
    /// The step of each evict running here, by evicted node ([`crate::evict`]).
    pub(crate) evict_steps: Mutex<BTreeMap<String, control_api::EvictStep>>,
    /// `(volume, snapshot)` of each `snapshot create` running here
    /// ([`crate::snapshot_pending`]).
    pub(crate) snapshots_in_flight: Mutex<std::collections::BTreeSet<(String, String)>>,
    /// `(volume, snapshot)` taken here under its pending name and not yet committed or
    /// discarded, with when and by which command ([`crate::snapshot_pending`]).
    pub(crate) snapshots_taken: Mutex<BTreeMap<(String, String), crate::snapshot_pending::Take>>,
    /// `(volume, snapshot)` locked by a take or a resolution here
    /// ([`crate::snapshot_pending`]).
    pub(crate) snapshots_locked: Mutex<std::collections::BTreeSet<(String, String)>>,
}

pub(crate) fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorKind::InvalidArgument, message)
}

pub(crate) fn not_found(name: &str) -> ApiError {
    ApiError::new(
        ErrorKind::NotFound,
        format!("volume '{name}' does not exist"),
    )
}

pub(crate) fn pool_error(error: PoolError) -> ApiError {
    ApiError::new(pool_error_kind(&error), error_chain(&error))
}

/// The API error kind of a pool error.
pub(crate) fn pool_error_kind(error: &PoolError) -> ErrorKind {
    match error {
        PoolError::Full { .. } => ErrorKind::NoSpace,
        PoolError::BadName { .. } => ErrorKind::InvalidArgument,
        PoolError::Exists { .. } | PoolError::SnapshotExists { .. } => ErrorKind::AlreadyExists,
        PoolError::MissingSnapshot { .. } => ErrorKind::NotFound,
        _ => ErrorKind::Backend,
    }
}

pub(crate) fn store_error(error: StoreError) -> ApiError {
    ApiError::new(ErrorKind::Storage, error_chain(&error))
}

pub(crate) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Lock a set, usable after a panic elsewhere (updates are single inserts/removes).
pub(crate) fn lock_set<T>(set: &Mutex<T>) -> MutexGuard<'_, T> {
    set.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Run blocking work off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::new(ErrorKind::Internal, format!("worker task failed: {e}")))?
}

/// Clears a claim on drop: removes a create placeholder or the busy mark.
pub(crate) struct Claim<'a> {
    service: &'a VolumeService,
    name: String,
    placeholder: bool,
    pub(crate) armed: bool,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut volumes = self.service.lock();
        if self.placeholder {
            volumes.remove(&self.name);
        } else if let Some(slot) = volumes.get_mut(&self.name) {
            slot.busy = None;
        }
    }
}

impl VolumeService {
    /// Open the pools, load the definitions and reconcile them with the storage found
    /// (blocking). Problems that need an operator are logged as warnings, never "fixed" by
    /// deleting anything.
    pub fn open(config: Config) -> Result<VolumeService, StartError> {
        let engine = NoEngine::new(&config.node);
        VolumeService::open_with(config, engine, None)
    }

    /// [`VolumeService::open`] with a replication engine and the cluster secret (needed
    /// to call peers when the config lists other nodes). Replicas are opened later, by
    /// [`VolumeService::start_replicas`].
    pub fn open_with(
        config: Config,
        engine: Arc<dyn Engine>,
        secret: Option<Secret>,
    ) -> Result<VolumeService, StartError> {
        let mut pools = Vec::new();
        for spec in &config.pools {
            let backend: Arc<dyn Pool> = Arc::from(pool::open(spec));
            backend.open_check()?;
            let refused = pool::check_cache(spec).err().map(|e| error_chain(&e));
            if let Some(reason) = &refused {
                tracing::error!(pool = %spec.name, %reason,
                    "pool refused: its volumes are not served; the other pools keep working");
            }
            if spec.cache == CacheMode::Writeback {
                tracing::warn!(pool = %spec.name, "cache = \"writeback\": this pool's volumes \
                    go through the host page cache (a second copy of guest data in host memory)");
            }
            tracing::info!(pool = %spec.name, backend = backend.backend(), cache = %spec.cache,
                io_engine = %spec.io_engine, "pool opened");
            pools.push(PoolHandle {
                backend,
                device: spec.device_options(),
                alloc: tokio::sync::Mutex::new(()),
                refused,
            });
        }
        let store = Store::open(&config.state_dir)?;
        let definitions = {
            let pool_for = |name: &str| {
                pools
                    .iter()
                    .find(|h| h.backend.name() == name)
                    .map(|h| Arc::clone(&h.backend))
            };
            let definitions =
                crate::rename::complete_interrupted_renames(&store, &pool_for, store.load_all()?)?;
            crate::rollback::complete_interrupted_rollbacks(
                &store,
                &pool_for,
                engine.as_ref(),
                &config.node,
                &definitions,
            );
            definitions
        };
        let mut stored: HashMap<String, HashMap<String, u64>> = HashMap::new();
        for handle in &pools {
            let found = handle.backend.list()?;
            stored.insert(
                handle.backend.name().to_string(),
                found.into_iter().map(|v| (v.name, v.size_bytes)).collect(),
            );
        }
        let mut volumes = BTreeMap::new();
        for mut definition in definitions {
            let name = definition.name.clone();
            if definition.diskless {
                volumes.insert(name, Slot::ready(definition, VolumeState::Ok));
                continue;
            }
            let storage = stored
                .get_mut(&definition.pool)
                .and_then(|found| found.remove(&name));
            let state = match storage {
                None if !stored.contains_key(&definition.pool) => {
                    tracing::warn!(volume = %name, pool = %definition.pool,
                        "volume's pool is not in the config; volume marked missing");
                    VolumeState::Missing
                }
                None => {
                    tracing::warn!(volume = %name, pool = %definition.pool,
                        "volume's storage was not found; volume marked missing (delete it with `tandem volume delete {name}`)");
                    VolumeState::Missing
                }
                Some(size) if size > definition.size_bytes => {
                    tracing::warn!(volume = %name, from = definition.size_bytes, to = size,
                        "storage is larger than the definition (interrupted resize); completing the resize");
                    definition.size_bytes = size;
                    store.save(&definition)?;
                    VolumeState::Ok
                }
                Some(size) if size < definition.size_bytes => {
                    tracing::warn!(volume = %name, storage = size, definition = definition.size_bytes,
                        "storage is smaller than the definition; serving the storage's size");
                    VolumeState::Ok
                }
                Some(_) => VolumeState::Ok,
            };
            volumes.insert(name, Slot::ready(definition, state));
        }
        for (pool, found) in &stored {
            for name in found.keys() {
                tracing::warn!(pool = %pool, volume = %name,
                    "storage without a volume definition (left by an interrupted create or delete?); not touching it");
            }
        }
        tracing::info!(volumes = volumes.len(), "volume definitions loaded");
        Ok(VolumeService {
            config: std::sync::RwLock::new(Arc::new(config)),
            pools,
            store,
            volumes: Mutex::new(volumes),
            engine,
            secret,
            membership_ops: Mutex::default(),
            snapshots_in_flight: Mutex::default(),
            snapshots_taken: Mutex::default(),
            snapshots_locked: Mutex::default(),
            evict_steps: Mutex::default(),
        })
    }

    /// The configuration in force (a reload swaps it; see [`crate::reload`]).
    pub fn config(&self) -> Arc<Config> {
        Arc::clone(
            &self
                .config
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        )
    }

    /// Put a checked configuration in force.
    pub(crate) fn set_config(&self, config: Config) {
        *self
            .config
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(config);
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Slot>> {
        // A panic while holding the lock leaves the map consistent (updates are single
        // inserts/removes), so a poisoned lock is still usable.
        self.volumes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn pool_backend(&self, name: &str) -> Option<Arc<dyn Pool>> {
        self.pool(name).map(|h| Arc::clone(&h.backend))
    }

    /// Every configured pool's backend.
    pub(crate) fn pool_backends(&self) -> Vec<Arc<dyn Pool>> {
        self.pools.iter().map(|h| Arc::clone(&h.backend)).collect()
    }

    /// The pool a create names, or the first one; errors list the configured pools. A
    /// diskless tiebreaker refuses: it holds no data replica, even if pools are configured.
    pub(crate) fn pick_pool(&self, pool: Option<&str>) -> Result<&PoolHandle, ApiError> {
        if self.config().is_diskless() {
            return Err(invalid(format!(
                "node '{}' is a diskless tiebreaker (diskless = true in {}) and cannot hold a \
                 data replica",
                self.config().node,
                self.config().path.display()
            )));
        }
        let handle = match pool {
            None => self
                .pools
                .iter()
                .find(|h| h.refused.is_none())
                .or(self.pools.first())
                .ok_or_else(|| ApiError::new(ErrorKind::NotFound, "no pool is configured")),
            Some(p) => self.pool(p).ok_or_else(|| {
                let known: Vec<_> = self
                    .pools
                    .iter()
                    .map(|h| format!("'{}'", h.backend.name()))
                    .collect();
                ApiError::new(
                    ErrorKind::NotFound,
                    if self.config().is_cluster() {
                        format!(
                            "pool '{p}' does not exist on node '{}' (configured: {})",
                            self.config().node,
                            known.join(", ")
                        )
                    } else {
                        format!(
                            "pool '{p}' does not exist (configured: {})",
                            known.join(", ")
                        )
                    },
                )
            }),
        }?;
        handle
            .usable()
            .map_err(|reason| ApiError::new(ErrorKind::Backend, reason))?;
        Ok(handle)
    }

    fn pool(&self, name: &str) -> Option<&PoolHandle> {
        self.pools.iter().find(|p| p.backend.name() == name)
    }

    pub(crate) fn info(&self, definition: &VolumeDefinition, state: VolumeState) -> VolumeInfo {
        let path = if definition.diskless {
            Default::default()
        } else {
            self.pool(&definition.pool)
                .map(|p| p.backend.device_path(&definition.name))
                .unwrap_or_default()
        };
        VolumeInfo {
            name: definition.name.clone(),
            pool: definition.pool.clone(),
            size_bytes: definition.size_bytes,
            path,
            state,
            created_unix: definition.created_unix,
            nodes: definition.nodes.clone(),
            tiebreakers: definition.tiebreakers.clone(),
            diskless: definition.diskless,
            options: definition.is_replicated().then_some(definition.options),
            read_only: definition.options.read_only,
            clone_of: definition.clone_of.clone(),
        }
    }

    /// `<state_dir>/volumes/<name>/meta`: the engine's metadata of a replica.
    pub(crate) fn meta_dir(&self, name: &str) -> std::path::PathBuf {
        self.store.dir().join(name).join("meta")
    }

    /// What the engine needs to run this node's replica of `definition`.
    pub(crate) fn replica_plan(
        &self,
        definition: &VolumeDefinition,
    ) -> Result<ReplicaPlan, ApiError> {
        let mut peers = Vec::new();
        let config = self.config();
        for peer in definition.peers(&config.node) {
            let node = config.node_named(peer).ok_or_else(|| {
                ApiError::new(
                    ErrorKind::InvalidArgument,
                    format!(
                        "volume '{}' has a replica on node '{peer}', which is not in {}",
                        definition.name,
                        self.config().path.display()
                    ),
                )
            })?;
            peers.push(PeerPlan {
                name: node.name.clone(),
                replication: node.replication,
                diskless: node.diskless,
            });
        }
        Ok(ReplicaPlan {
            volume: definition.name.clone(),
            peers,
            meta_dir: self.meta_dir(&definition.name),
            options: definition.options,
            data_replicas: definition.nodes.len(),
            tiebreakers: definition.tiebreakers.len(),
        })
    }

    /// Open (or reuse) the volume's device, under the registry lock so a resize cannot miss it.
    pub(crate) fn device_of(&self, slot: &mut Slot, name: &str) -> Result<Arc<FileDevice>, String> {
        if let Some(device) = &slot.device {
            return Ok(Arc::clone(device));
        }
        let Some(pool) = slot.definition.as_ref().and_then(|d| self.pool(&d.pool)) else {
            return Err(format!("volume '{name}' has no pool"));
        };
        pool.usable()
            .map_err(|reason| format!("cannot open volume '{name}': {reason}"))?;
        let path = pool.backend.device_path(name);
        let device = Arc::new(FileDevice::open_with(&path, pool.device).map_err(|e| {
            format!(
                "cannot open volume '{name}' of pool '{}': {}",
                pool.name(),
                error_chain(&e)
            )
        })?);
        slot.device = Some(Arc::clone(&device));
        Ok(device)
    }

    /// Open every replicated volume's replica in the engine (at startup). A replica that
    /// fails to open is logged and left closed; its status then says so.
    pub async fn start_replicas(&self) {
        let names: Vec<String> = self
            .lock()
            .iter()
            .filter(|(_, s)| s.definition.as_ref().is_some_and(|d| d.is_replicated()))
            .map(|(n, _)| n.clone())
            .collect();
        for name in names {
            if let Err(e) = self.open_replica(&name).await {
                tracing::error!(volume = %name, error = %e.message, "cannot open the replica");
            }
        }
    }

    /// Open one volume's replica in the engine and attach it to the registry.
    pub(crate) async fn open_replica(&self, name: &str) -> Result<(), ApiError> {
        if let Some(marker) = crate::rollback::pending(&self.store, name) {
            return Err(ApiError::new(
                ErrorKind::Storage,
                format!(
                    "volume '{name}': a rollback to '{}' was interrupted on '{}'; run `tandem snapshot rollback {name} {}`",
                    marker.snapshot, self.config().node, marker.snapshot
                ),
            ));
        }
        let (plan, device) = {
            let mut volumes = self.lock();
            let slot = volumes.get_mut(name).ok_or_else(|| not_found(name))?;
            let Some(definition) = slot.definition.clone() else {
                return Err(not_found(name));
            };
            let plan = self.replica_plan(&definition)?;
            let device: Option<Arc<dyn BackingDevice>> = if definition.diskless {
                None
            } else if slot.state == VolumeState::Missing {
                return Err(ApiError::new(
                    ErrorKind::Backend,
                    format!("volume '{name}' has no storage on this node"),
                ));
            } else {
                let device: Arc<dyn BackingDevice> = self
                    .device_of(slot, name)
                    .map_err(|m| ApiError::new(ErrorKind::Backend, m))?;
                Some(crate::test_switch::wrap(device))
            };
            (plan, device)
        };
        let replica = self
            .engine
            .open_replica(plan, device)
            .await
            .map_err(engine_error)?;
        let runtime = ReplicaRuntime::new(name, replica);
        if let Some(slot) = self.lock().get_mut(name) {
            slot.runtime = Some(runtime);
        }
        tracing::info!(volume = %name, "replica opened");
        Ok(())
    }

    /// Close every replica cleanly (SIGTERM), then the engine.
    pub async fn shutdown(&self) {
        let runtimes: Vec<(String, Arc<ReplicaRuntime>)> = self
            .lock()
            .iter_mut()
            .filter_map(|(n, s)| s.runtime.take().map(|r| (n.clone(), r)))
            .collect();
        // Let demotions of writers that just closed (frontends stop first) finish.
        tokio::task::yield_now().await;
        for (_, runtime) in &runtimes {
            runtime.settle().await;
        }
        for (name, _) in runtimes {
            if let Err(e) = self.engine.close_replica(&name).await {
                tracing::error!(volume = %name, error = %e, "cannot close the replica cleanly");
            }
        }
        self.engine.shutdown().await;
    }

    pub(crate) fn checked_size(size_bytes: u64) -> Result<u64, ApiError> {
        if size_bytes == 0 {
            return Err(invalid("size must be greater than 0"));
        }
        round_up_to_block(size_bytes)
            .ok_or_else(|| invalid(format!("size {size_bytes} is too large")))
    }

    /// Claim an existing, settled volume for an operation; returns its definition.
    pub(crate) fn claim(
        &self,
        name: &str,
        op: &'static str,
    ) -> Result<(Claim<'_>, VolumeDefinition, VolumeState), ApiError> {
        let mut volumes = self.lock();
        let slot = volumes.get_mut(name).ok_or_else(|| not_found(name))?;
        let Some(definition) = slot.definition.clone() else {
            return Err(ApiError::new(
                ErrorKind::Busy,
                format!("volume '{name}' is being created"),
            ));
        };
        if let Some(other) = slot.busy {
            return Err(ApiError::new(
                ErrorKind::Busy,
                format!("volume '{name}' is busy: a {other} is in progress"),
            ));
        }
        slot.busy = Some(op);
        Ok((
            Claim {
                service: self,
                name: name.to_string(),
                placeholder: false,
                armed: true,
            },
            definition,
            slot.state,
        ))
    }

    /// Create an unreplicated volume of `size_bytes` (rounded up to 4 KiB) on this node in
    /// `pool` (default: the first). Replicated volumes: [`VolumeService::create`].
    pub async fn create_local(
        &self,
        name: &str,
        size_bytes: u64,
        pool: Option<&str>,
    ) -> Result<VolumeInfo, ApiError> {
        self.create_local_from(name, size_bytes, pool, None).await
    }

    /// [`VolumeService::create_local`], or a linked clone of `clone_of` (`VOLUME[@SNAP]`).
    pub(crate) async fn create_local_from(
        &self,
        name: &str,
        size_bytes: u64,
        pool: Option<&str>,
        clone_of: Option<String>,
    ) -> Result<VolumeInfo, ApiError> {
        validate_volume_name(name).map_err(|e| invalid(e.to_string()))?;
        let size = Self::checked_size(size_bytes)?;
        let handle = self.pick_pool(pool)?;
        let backend = Arc::clone(&handle.backend);
        backend.check_name(name).map_err(pool_error)?;
        let mut claim = {
            let mut volumes = self.lock();
            if volumes.contains_key(name) {
                return Err(ApiError::new(
                    ErrorKind::AlreadyExists,
                    format!("volume '{name}' already exists"),
                ));
            }
            volumes.insert(
                name.to_string(),
                Slot {
                    definition: None,
                    state: VolumeState::Ok,
                    busy: Some("create"),
                    device: None,
                    reservation: None,
                    runtime: None,
                    io: Arc::default(),
                },
            );
            Claim {
                service: self,
                name: name.to_string(),
                placeholder: true,
                armed: true,
            }
        };
        let _allocating = handle.alloc.lock().await;
        let store = self.store.clone();
        let volume = name.to_string();
        let definition = blocking(move || {
            let allocated =
                crate::linked_clone::allocate(backend.as_ref(), &volume, size, clone_of.as_deref())
                    .map_err(pool_error)?;
            let definition = VolumeDefinition {
                version: DEFINITION_VERSION,
                name: volume.clone(),
                pool: backend.name().to_string(),
                size_bytes: allocated,
                created_unix: now_unix(),
                nodes: Vec::new(),
                tiebreakers: Vec::new(),
                diskless: false,
                options: Default::default(),
                renamed_from: None,
                clone_of,
            };
            if let Err(e) = store.save(&definition) {
                if let Err(undo) = backend.delete(&volume) {
                    tracing::error!(volume = %volume, error = %error_chain(&undo),
                        "cannot free the storage of a failed create; remove it by hand");
                }
                return Err(store_error(e));
            }
            Ok(definition)
        })
        .await?;
        let info = self.info(&definition, VolumeState::Ok);
        {
            let mut volumes = self.lock();
            claim.armed = false;
            volumes.insert(name.to_string(), Slot::ready(definition, VolumeState::Ok));
        }
        tracing::info!(volume = %name, pool = %info.pool, size = info.size_bytes, "volume created");
        Ok(info)
    }

    /// Grow this node's copy of a volume to `size_bytes` (rounded up to 4 KiB): storage,
    /// then the open device and the engine's replica, then the definition. Shrinking is
    /// refused. Replicated volumes grow on every node: [`VolumeService::resize`].
    pub async fn resize_local(&self, name: &str, size_bytes: u64) -> Result<VolumeInfo, ApiError> {
        let size = Self::checked_size(size_bytes)?;
        let (claim, definition, state) = self.claim(name, "resize")?;
        if state == VolumeState::Missing {
            return Err(ApiError::new(
                ErrorKind::Backend,
                format!("volume '{name}' has no storage (it went missing); it can only be deleted"),
            ));
        }
        if size < definition.size_bytes {
            return Err(invalid(format!(
                "volume '{name}' is {}; shrinking to {} is not supported (volumes can only grow)",
                format_size(definition.size_bytes),
                format_size(size)
            )));
        }
        if size == definition.size_bytes {
            return Ok(self.info(&definition, state));
        }
        if definition.diskless {
            let new_definition = VolumeDefinition {
                size_bytes: size,
                ..definition
            };
            let runtime = self.lock().get(name).and_then(|s| s.runtime.clone());
            if let Some(runtime) = runtime {
                runtime.replica().resize(size).await.map_err(engine_error)?;
            }
            let store = self.store.clone();
            let to_save = new_definition.clone();
            blocking(move || store.save(&to_save).map_err(store_error)).await?;
            if let Some(slot) = self.lock().get_mut(name) {
                slot.definition = Some(new_definition.clone());
            }
            drop(claim);
            return Ok(self.info(&new_definition, state));
        }
        let handle = self.pool(&definition.pool).ok_or_else(|| {
            ApiError::new(
                ErrorKind::Internal,
                format!("pool '{}' vanished", definition.pool),
            )
        })?;
        let _allocating = handle.alloc.lock().await;
        let backend = Arc::clone(&handle.backend);
        let volume = name.to_string();
        let additional = size - definition.size_bytes;
        let grown = blocking(move || {
            backend.check_room(additional).map_err(pool_error)?;
            backend.grow(&volume, size).map_err(pool_error)
        })
        .await?;
        let new_definition = VolumeDefinition {
            size_bytes: grown,
            ..definition
        };
        let runtime = {
            // The storage is grown: tell an open device before anything else.
            let mut volumes = self.lock();
            match volumes.get_mut(name) {
                Some(slot) => {
                    if let Some(device) = &slot.device {
                        device.set_size(grown);
                    }
                    slot.definition = Some(new_definition.clone());
                    slot.runtime.clone()
                }
                None => None,
            }
        };
        if let Some(runtime) = runtime {
            runtime
                .replica()
                .resize(grown)
                .await
                .map_err(engine_error)?;
        }
        let store = self.store.clone();
        let to_save = new_definition.clone();
        blocking(move || store.save(&to_save).map_err(store_error)).await?;
        drop(claim);
        tracing::info!(volume = %name, size = grown, "volume resized");
        Ok(self.info(&new_definition, VolumeState::Ok))
    }

    /// Delete this node's copy of a volume: close the replica, then definition, storage and
    /// replication metadata (see [`crate::store`]). Refused while frontends have it open.
    /// Replicated volumes are deleted on every node by [`VolumeService::delete`].
    pub async fn delete_local(&self, name: &str) -> Result<(), ApiError> {
        validate_volume_name(name).map_err(|e| invalid(e.to_string()))?;
        let (mut claim, definition, state) = self.claim(name, "delete")?;
        let runtime = {
            let mut volumes = self.lock();
            let runtime = volumes.get(name).and_then(|s| s.runtime.clone());
            if let Some(runtime) = &runtime {
                let users = runtime.open_handles();
                if users > 0 {
                    return Err(ApiError::new(
                        ErrorKind::InUse,
                        format!("volume '{name}' is open by {users} client(s) on node '{}' (a running VM?); stop them first", self.config().node),
                    ));
                }
            }
            if let Some(slot) = volumes.get_mut(name) {
                // A replicated volume's handles are counted above (the engine holds the
                // device too); an unreplicated one's users hold its device.
                if let (Some(device), None) = (&slot.device, &runtime) {
                    let users = Arc::strong_count(device) - 1;
                    if users > 0 {
                        return Err(ApiError::new(
                            ErrorKind::InUse,
                            format!("volume '{name}' is open by {users} client(s) (a running VM?); stop them first"),
                        ));
                    }
                }
                // Close our descriptor: lvremove refuses an open LV.
                slot.device = None;
                slot.runtime = None;
            }
            runtime
        };
        if runtime.is_some() {
            if let Err(e) = self.engine.close_replica(name).await {
                tracing::warn!(volume = %name, error = %e, "cannot close the replica cleanly before delete");
            }
        }
        drop(runtime);
        let store = self.store.clone();
        let backend = if definition.diskless {
            None
        } else {
            self.pool(&definition.pool).map(|h| Arc::clone(&h.backend))
        };
        let volume = name.to_string();
        let meta = self.store.dir().join(name);
        blocking(move || {
            store.remove(&volume).map_err(store_error)?;
            if meta.is_dir() {
                if let Err(e) = std::fs::remove_dir_all(&meta) {
                    tracing::warn!(volume = %volume, path = %meta.display(), error = %e,
                        "cannot remove the replication metadata");
                }
            }
            let Some(backend) = backend else {
                return Ok(());
            };
            match backend.delete(&volume) {
                Ok(()) => Ok(()),
                Err(PoolError::Missing { .. }) => {
                    if state == VolumeState::Ok {
                        tracing::warn!(volume = %volume, "storage was already gone");
                    }
                    Ok(())
                }
                Err(e) => {
                    if let Err(restore) = store.save(&definition) {
                        tracing::error!(volume = %volume, error = %error_chain(&restore),
                            "cannot restore the definition after a failed delete");
                    }
                    Err(pool_error(e))
                }
            }
        })
        .await?;
        {
            let mut volumes = self.lock();
            claim.armed = false;
            volumes.remove(name);
        }
        tracing::info!(volume = %name, "volume deleted");
        Ok(())
    }

    /// Every volume (not those still being created), sorted by name.
    pub fn list(&self) -> Vec<VolumeInfo> {
        let volumes = self.lock();
        volumes
            .values()
            .filter_map(|slot| slot.definition.as_ref().map(|d| self.info(d, slot.state)))
            .collect()
    }

    /// One volume.
    pub fn show(&self, name: &str) -> Result<VolumeInfo, ApiError> {
        let volumes = self.lock();
        volumes
            .get(name)
            .and_then(|slot| slot.definition.as_ref().map(|d| self.info(d, slot.state)))
            .ok_or_else(|| not_found(name))
    }

    /// Space and volume counts per pool.
    pub async fn pools(&self) -> Vec<PoolInfo> {
        let mut out = Vec::with_capacity(self.pools.len());
        for handle in &self.pools {
            let pool_name = handle.backend.name().to_string();
            let (volumes, provisioned_bytes) = {
                let map = self.lock();
                map.values()
                    .filter_map(|s| s.definition.as_ref())
                    .filter(|d| d.pool == pool_name)
                    .fold((0usize, 0u64), |(n, sum), d| {
                        (n + 1, sum.saturating_add(d.size_bytes))
                    })
            };
            let backend = Arc::clone(&handle.backend);
            let usage = blocking(move || backend.usage().map_err(pool_error)).await;
            let mut info = PoolInfo {
                name: pool_name,
                backend: handle.backend.backend().to_string(),
                cache: handle.device.cache.to_string(),
                total_bytes: 0,
                used_bytes: 0,
                free_bytes: 0,
                provisioned_bytes,
                volumes,
                error: handle.refused.clone(),
            };
            match usage {
                _ if handle.refused.is_some() => {}
                Ok(u) => {
                    info.total_bytes = u.total_bytes;
                    info.used_bytes = u.used_bytes;
                    info.free_bytes = u.free_bytes;
                }
                Err(e) => info.error = Some(e.message),
            }
            out.push(info);
        }
        out
    }

    fn runtime(&self, name: &str) -> Result<Arc<ReplicaRuntime>, ApiError> {
        let volumes = self.lock();
        let slot = volumes
            .get(name)
            .filter(|s| s.definition.is_some())
            .ok_or_else(|| not_found(name))?;
        slot.runtime.clone().ok_or_else(|| {
            ApiError::new(
                ErrorKind::InvalidArgument,
                if slot.definition.as_ref().is_some_and(|d| d.is_replicated()) {
                    format!("volume '{name}': the replica is not running on this node (see the tandemd log)")
                } else {
                    format!("volume '{name}' has a single replica; it is not replicated")
                },
            )
        })
    }

    /// `volume_status`: the engine's view plus the daemon's fields. An unreplicated
    /// volume reports itself Primary and UpToDate with no peers (it always serves), so
    /// promote/demote are no-ops for it.
    pub fn status(&self, name: &str) -> Result<VolumeStatus, ApiError> {
        let volumes = self.lock();
        let slot = volumes
            .get(name)
            .filter(|s| s.definition.is_some())
            .ok_or_else(|| not_found(name))?;
        if let Some(runtime) = slot.runtime.clone() {
            // Ask the engine without holding the registry lock.
            drop(volumes);
            return Ok(runtime.status());
        }
        let Some(definition) = slot.definition.as_ref() else {
            return Err(not_found(name));
        };
        let writers = slot.device.as_ref().map_or(0, |d| Arc::strong_count(d) - 1);
        let replicated = definition.is_replicated();
        Ok(VolumeStatus {
            replica: ReplicaStatus {
                volume: name.to_string(),
                node: self.config().node.clone(),
                // The only copy of an unreplicated volume always serves: Primary.
                role: if replicated {
                    Role::Secondary
                } else {
                    Role::Primary
                },
                disk_state: match (replicated, slot.state) {
                    (_, VolumeState::Missing) => DiskState::Failed,
                    (true, _) => DiskState::DUnknown,
                    (false, _) => DiskState::UpToDate,
                },
                protocol: definition.options.protocol,
                quorum: !replicated,
                quorum_reason: String::new(),
                io_suspended: false,
                allow_two_primaries: false,
                size_bytes: definition.size_bytes,
                current_uuid: String::new(),
                peers: Vec::new(),
                last_verify: None,
            },
            promoted_explicitly: false,
            open_writers: if replicated { 0 } else { writers },
        })
    }

    /// `volume_status_all`: every volume on this node, sorted by name.
    pub fn status_all(&self) -> Vec<VolumeStatus> {
        let names: Vec<String> = self
            .lock()
            .iter()
            .filter(|(_, s)| s.definition.is_some())
            .map(|(n, _)| n.clone())
            .collect();
        names.iter().filter_map(|n| self.status(n).ok()).collect()
    }

    /// The I/O statistics of every volume served here, by volume name: a replicated
    /// volume's from its running replica, an unreplicated one's from its slot.
    pub fn io_stats_all(&self) -> Vec<(String, Arc<IoStats>)> {
        let mut runtimes: Vec<(String, Arc<ReplicaRuntime>)> = Vec::new();
        let mut stats = Vec::new();
        for (name, slot) in self.lock().iter() {
            let Some(definition) = &slot.definition else {
                continue;
            };
            if let Some(runtime) = &slot.runtime {
                runtimes.push((name.clone(), runtime.clone()));
            } else if !definition.is_replicated() && slot.state != VolumeState::Missing {
                stats.push((name.clone(), slot.io.clone()));
            }
        }
        // The engine is asked without the registry lock.
        stats.extend(
            runtimes
                .into_iter()
                .filter_map(|(n, r)| Some((n, r.replica().io_stats()?))),
        );
        stats.sort_by(|a, b| a.0.cmp(&b.0));
        stats
    }

    /// `volume_promote`. An unreplicated volume is always writable here: a no-op.
    pub async fn promote(&self, name: &str) -> Result<VolumeStatus, ApiError> {
        if !self.definition_of(name)?.is_replicated() {
            return self.status(name);
        }
        self.runtime(name)?.promote_explicitly().await?;
        self.status(name)
    }

    /// `volume_demote`. A no-op for an unreplicated volume.
    pub async fn demote(&self, name: &str) -> Result<VolumeStatus, ApiError> {
        self.demote_with(name, false).await
    }

    /// `volume_demote` with `force` (`tandem volume demote --force`: fail the requests
    /// frozen for lack of quorum, ignore open writers). A no-op for an unreplicated volume.
    pub async fn demote_with(&self, name: &str, force: bool) -> Result<VolumeStatus, ApiError> {
        if !self.definition_of(name)?.is_replicated() {
            return self.status(name);
        }
        let runtime = self.runtime(name)?;
        if force {
            runtime.demote_forcibly().await?;
        } else {
            runtime.demote_explicitly().await?;
        }
        self.status(name)
    }

    /// This node's two-primaries gate (peer `replica_allow_two_primaries`); the cluster-wide
    /// `volume_allow_two_primaries` is [`VolumeService::allow_two_primaries`] in `cluster`.
    pub fn allow_two_primaries_local(
        &self,
        name: &str,
        allow: bool,
    ) -> Result<VolumeStatus, ApiError> {
        self.runtime(name)?
            .replica()
            .set_allow_two_primaries(allow)
            .map_err(engine_error)?;
        tracing::info!(volume = %name, allow, "two-primaries gate changed");
        self.status(name)
    }

    /// `volume_resolve`.
    pub async fn resolve(&self, name: &str, discard_local: bool) -> Result<VolumeStatus, ApiError> {
        self.runtime(name)?
            .replica()
            .resolve_split_brain(discard_local)
            .await
            .map_err(engine_error)?;
        tracing::info!(volume = %name, discard_local, "split brain resolution requested");
        self.status(name)
    }

    /// `volume_verify`.
    pub async fn verify(&self, name: &str) -> Result<VerifySummary, ApiError> {
        self.runtime(name)?
            .replica()
            .verify()
            .await
            .map_err(engine_error)
    }

    fn definition_of(&self, name: &str) -> Result<VolumeDefinition, ApiError> {
        self.lock()
            .get(name)
            .and_then(|s| s.definition.clone())
            .ok_or_else(|| not_found(name))
    }

    /// This node's identity.
    pub fn node_info(&self) -> NodeInfo {
        let config = self.config();
        NodeInfo {
            name: config.node.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            config_path: config.path.clone(),
            state_dir: config.state_dir.clone(),
            run_dir: config.run_dir.clone(),
            nodes: config.nodes.clone(),
            pools: config.pools.iter().map(|p| p.name.clone()).collect(),
            volumes: self
                .lock()
                .values()
                .filter(|s| s.definition.is_some())
                .count(),
            config_digest: crate::reload::config_digest(&config.nodes),
        }
    }
}

#[async_trait]
impl Exports for VolumeService {
    fn list(&self) -> Vec<String> {
        let volumes = self.lock();
        volumes
            .iter()
            .filter(|(_, s)| {
                s.definition.as_ref().is_some_and(|d| !d.diskless) && s.state == VolumeState::Ok
            })
            .map(|(name, _)| name.clone())
            .collect()
    }

    async fn describe(&self, name: &str) -> Result<ExportInfo, OpenError> {
        let volumes = self.lock();
        let slot = volumes
            .get(name)
            .filter(|s| s.definition.as_ref().is_some_and(|d| !d.diskless))
            .ok_or_else(|| OpenError::NotFound(name.to_string()))?;
        // A replica reports the size the engine serves (it grows online).
        let size = match (&slot.runtime, &slot.definition) {
            (Some(runtime), _) => runtime.status().replica.size_bytes,
            (None, Some(definition)) => definition.size_bytes,
            (None, None) => 0,
        };
        Ok(ExportInfo {
            size,
            read_only: false,
        })
    }

    async fn open(&self, name: &str, writable: bool) -> Result<Arc<dyn ExportHandle>, OpenError> {
        let runtime = match self.open_here(name, writable)? {
            Opened::Local(handle) => return Ok(handle),
            Opened::Replicated(runtime) => runtime,
        };
        let handle = runtime.open(writable).await?;
        Ok(handle)
    }
}

/// What [`VolumeService::open_here`] found: a local handle, or a replica to open through
/// its role rules (after the registry lock is released).
enum Opened {
    Local(Arc<dyn ExportHandle>),
    Replicated(Arc<ReplicaRuntime>),
}

impl VolumeService {
    fn open_here(&self, name: &str, writable: bool) -> Result<Opened, OpenError> {
        let mut volumes = self.lock();
        let slot = volumes
            .get_mut(name)
            .filter(|s| s.definition.is_some())
            .ok_or_else(|| OpenError::NotFound(name.to_string()))?;
        if slot.busy == Some("delete") {
            return Err(OpenError::Refused(format!(
                "volume '{name}' is being deleted"
            )));
        }
        if slot.definition.as_ref().is_some_and(|d| d.diskless) {
            return Err(OpenError::Refused(format!(
                "{name}: node '{}' is a diskless tiebreaker for this volume and cannot serve it",
                self.config().node
            )));
        }
        if slot.state == VolumeState::Missing {
            return Err(OpenError::Refused(format!(
                "volume '{name}' has no storage on this host"
            )));
        }
        if writable
            && slot
                .definition
                .as_ref()
                .is_some_and(|d| d.options.read_only)
        {
            return Err(OpenError::Refused(format!(
                "volume '{name}' is read-only (a template): open it read-only, make a linked clone with `tandem volume clone {name} NEW`, or run `tandem volume set {name} --writable`"
            )));
        }
        if slot.definition.as_ref().is_some_and(|d| d.is_replicated()) {
            return match slot.runtime.clone() {
                Some(runtime) => Ok(Opened::Replicated(runtime)),
                None => Err(OpenError::Refused(format!(
                    "{name}: the replica is not running on this node (see the tandemd log)"
                ))),
            };
        }
        let device = self.device_of(slot, name).map_err(OpenError::Refused)?;
        let device: Arc<dyn BackingDevice> = Arc::new(PendingDevice::new(device, slot.io.clone()));
        Ok(Opened::Local(Arc::new(LocalExport::new(
            name,
            device,
            !writable,
            slot.io.clone(),
        ))))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use bytes::Bytes;
    use std::path::Path;

    pub(crate) fn service(root: &Path) -> VolumeService {
        let text = format!(
            "node = \"hv1\"\nstate_dir = \"{root}/state\"\nrun_dir = \"{root}/run\"\n\
             [[nodes]]\nname = \"hv1\"\ncontrol = \"127.0.0.1:7700\"\nreplication = \"127.0.0.1:7788\"\n\
             [[pools]]\nname = \"files\"\nbackend = \"file\"\npath = \"{root}/images\"\n",
            root = root.display()
        );
        let config = Config::parse(&text, Path::new("test.toml")).unwrap();
        VolumeService::open(config).unwrap()
    }

    #[tokio::test]
    async fn an_open_export_sees_resize_and_blocks_delete() {
        let dir = tempfile::tempdir().unwrap();
        let service = service(dir.path());
        service.create_local("v1", 1 << 20, None).await.unwrap();
        assert_eq!(Exports::list(&service), vec!["v1".to_string()]);

        let handle = service.open("v1", true).await.unwrap();
        assert_eq!(handle.size(), 1 << 20);
        service.resize_local("v1", 2 << 20).await.unwrap();
        assert_eq!(handle.size(), 2 << 20, "resize reached the open device");
        // The new tail is writable through the already open handle.
        let data = Bytes::from(vec![0x5Au8; 4096]);
        handle
            .write((2 << 20) - 4096, data.clone(), true)
            .await
            .unwrap();
        assert_eq!(handle.read((2 << 20) - 4096, 4096).await.unwrap(), data);

        let e = service.delete_local("v1").await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::InUse, "{}", e.message);
        drop(handle);
        service.delete_local("v1").await.unwrap();
        assert!(matches!(
            service.open("v1", false).await,
            Err(OpenError::NotFound(_))
        ));
        assert!(!dir.path().join("images/v1.img").exists());
    }

    #[tokio::test]
    async fn an_unreplicated_volume_records_its_io_for_the_metrics() {
        let dir = tempfile::tempdir().unwrap();
        let service = service(dir.path());
        service.create_local("u1", 1 << 20, None).await.unwrap();
        let handle = service.open("u1", true).await.unwrap();
        handle
            .write(0, Bytes::from(vec![1u8; 8192]), false)
            .await
            .unwrap();
        assert_eq!(handle.read(0, 4096).await.unwrap(), vec![1u8; 4096]);
        handle.flush().await.unwrap();
        handle.trim(8192, 4096).await.unwrap();
        let all = service.io_stats_all();
        let [(name, io)] = &all[..] else {
            panic!("one volume expected: {:?}", all.len());
        };
        assert_eq!(name, "u1");
        assert_eq!(IoStats::get(&io.written_bytes), 8192 + 4096);
        assert_eq!(IoStats::get(&io.read_bytes), 4096);
        assert_eq!(io.write.local.snapshot().count, 1);
        assert_eq!(io.write.peer.snapshot().count, 0, "no peer to wait for");
        assert_eq!(io.read.local.snapshot().count, 1);
        assert_eq!(io.flush.local.snapshot().count, 1);
        assert_eq!(IoStats::get(&io.pending_upper), 0);
        assert_eq!(IoStats::get(&io.pending_lower), 0);
    }

    #[tokio::test]
    async fn a_read_only_open_refuses_writes() {
        let dir = tempfile::tempdir().unwrap();
        let service = service(dir.path());
        service.create_local("ro", 1 << 20, None).await.unwrap();
        let handle = service.open("ro", false).await.unwrap();
        assert!(handle.read_only());
        assert!(handle
            .write(0, Bytes::from_static(b"x"), false)
            .await
            .is_err());
    }

    #[tokio::test]
    async fn a_failed_create_leaves_nothing_and_frees_the_name() {
        let dir = tempfile::tempdir().unwrap();
        let service = service(dir.path());
        let e = service
            .create_local("big", u64::MAX / 2, None)
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::NoSpace, "{}", e.message);
        assert!(!dir.path().join("images/big.img").exists());
        assert!(!dir.path().join("state/volumes/big.json").exists());
        service.create_local("big", 4096, None).await.unwrap();
    }

    #[tokio::test]
    async fn a_diskless_witness_runs_without_pools_and_refuses_data_replicas() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "node = \"witness\"\nstate_dir = \"{root}/state\"\nrun_dir = \"{root}/run\"\n\
             [[nodes]]\nname = \"hv1\"\ncontrol = \"127.0.0.1:7700\"\nreplication = \"127.0.0.1:7788\"\n\
             [[nodes]]\nname = \"witness\"\ncontrol = \"127.0.0.1:7701\"\nreplication = \"127.0.0.1:7789\"\n\
             diskless = true\n",
            root = dir.path().display()
        );
        let config = Config::parse(&text, Path::new("/etc/tandem/tandem.toml")).unwrap();
        let service = VolumeService::open(config).unwrap();
        assert!(service.pools().await.is_empty());
        assert!(service.node_info().pools.is_empty());
        let refusal = "node 'witness' is a diskless tiebreaker (diskless = true in \
                       /etc/tandem/tandem.toml) and cannot hold a data replica";
        let e = service.create_local("v", 1 << 20, None).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
        assert_eq!(e.message, refusal);
        // A coordinator whose node list disagrees asks for a data replica: refused.
        let e = service
            .prepare_replica("v", 1 << 20, None, false, "t1", false)
            .await
            .unwrap_err();
        assert_eq!(e.message, refusal);
        // As a tiebreaker it takes the volume.
        service
            .prepare_replica("v", 1 << 20, None, true, "t2", false)
            .await
            .unwrap();
    }
}
