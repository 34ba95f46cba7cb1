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
//! Crash ordering of create/resize/delete is described in [`crate::store`]. Everything a
//! request could refuse (name, size, pool, free space, duplicate) is checked before any
//! storage or definition is touched.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use replication::device::{BackingDevice, FileDevice};

use crate::api::{ApiError, ErrorKind, NodeInfo, PoolInfo, VolumeInfo, VolumeState};
use crate::config::Config;
use crate::frontend::{ExportHandle, ExportInfo, Exports, OpenError};
use crate::local_export::LocalExport;
use crate::names::validate_volume_name;
use crate::pool::{self, Pool, PoolError};
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

struct PoolHandle {
    backend: Arc<dyn Pool>,
    /// Serializes free-space check + allocation within this pool.
    alloc: tokio::sync::Mutex<()>,
}

/// One registry entry.
struct Slot {
    /// `None` while the volume is being created.
    definition: Option<VolumeDefinition>,
    state: VolumeState,
    /// The operation in progress, if any.
    busy: Option<&'static str>,
    /// The device, once a frontend opened the volume; kept so resize can `set_size` it.
    device: Option<Arc<FileDevice>>,
}

/// The registry and its operations.
pub struct VolumeService {
    config: Config,
    pools: Vec<PoolHandle>,
    store: Store,
    volumes: Mutex<BTreeMap<String, Slot>>,
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorKind::InvalidArgument, message)
}

fn not_found(name: &str) -> ApiError {
    ApiError::new(
        ErrorKind::NotFound,
        format!("volume '{name}' does not exist"),
    )
}

fn pool_error(error: PoolError) -> ApiError {
    let kind = match &error {
        PoolError::Full { .. } => ErrorKind::NoSpace,
        PoolError::BadName { .. } => ErrorKind::InvalidArgument,
        PoolError::Exists { .. } => ErrorKind::AlreadyExists,
        _ => ErrorKind::Backend,
    };
    ApiError::new(kind, error_chain(&error))
}

fn store_error(error: StoreError) -> ApiError {
    ApiError::new(ErrorKind::Storage, error_chain(&error))
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Run blocking work off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::new(ErrorKind::Internal, format!("worker task failed: {e}")))?
}

/// Clears a claim on drop: removes a create placeholder or the busy mark.
struct Claim<'a> {
    service: &'a VolumeService,
    name: String,
    placeholder: bool,
    armed: bool,
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
        let mut pools = Vec::new();
        for spec in &config.pools {
            let backend: Arc<dyn Pool> = Arc::from(pool::open(spec));
            backend.open_check()?;
            tracing::info!(pool = %spec.name, backend = backend.backend(), "pool opened");
            pools.push(PoolHandle {
                backend,
                alloc: tokio::sync::Mutex::new(()),
            });
        }
        let store = Store::open(&config.state_dir)?;
        let definitions = store.load_all()?;
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
            volumes.insert(
                name,
                Slot {
                    definition: Some(definition),
                    state,
                    busy: None,
                    device: None,
                },
            );
        }
        for (pool, found) in &stored {
            for name in found.keys() {
                tracing::warn!(pool = %pool, volume = %name,
                    "storage without a volume definition (left by an interrupted create or delete?); not touching it");
            }
        }
        tracing::info!(volumes = volumes.len(), "volume definitions loaded");
        Ok(VolumeService {
            config,
            pools,
            store,
            volumes: Mutex::new(volumes),
        })
    }

    /// The configuration the service runs with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Slot>> {
        // A panic while holding the lock leaves the map consistent (updates are single
        // inserts/removes), so a poisoned lock is still usable.
        self.volumes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn pool(&self, name: &str) -> Option<&PoolHandle> {
        self.pools.iter().find(|p| p.backend.name() == name)
    }

    fn info(&self, definition: &VolumeDefinition, state: VolumeState) -> VolumeInfo {
        let path = self
            .pool(&definition.pool)
            .map(|p| p.backend.device_path(&definition.name))
            .unwrap_or_default();
        VolumeInfo {
            name: definition.name.clone(),
            pool: definition.pool.clone(),
            size_bytes: definition.size_bytes,
            path,
            state,
            created_unix: definition.created_unix,
        }
    }

    fn checked_size(size_bytes: u64) -> Result<u64, ApiError> {
        if size_bytes == 0 {
            return Err(invalid("size must be greater than 0"));
        }
        round_up_to_block(size_bytes)
            .ok_or_else(|| invalid(format!("size {size_bytes} is too large")))
    }

    /// Claim an existing, settled volume for an operation; returns its definition.
    fn claim(
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

    /// Create a volume of `size_bytes` (rounded up to 4 KiB) in `pool` (default: the first).
    pub async fn create(
        &self,
        name: &str,
        size_bytes: u64,
        pool: Option<&str>,
    ) -> Result<VolumeInfo, ApiError> {
        validate_volume_name(name).map_err(|e| invalid(e.to_string()))?;
        let size = Self::checked_size(size_bytes)?;
        let handle = match pool {
            None => self
                .pools
                .first()
                .ok_or_else(|| ApiError::new(ErrorKind::NotFound, "no pool is configured"))?,
            Some(p) => self.pool(p).ok_or_else(|| {
                let known: Vec<_> = self
                    .pools
                    .iter()
                    .map(|h| format!("'{}'", h.backend.name()))
                    .collect();
                ApiError::new(
                    ErrorKind::NotFound,
                    format!(
                        "pool '{p}' does not exist (configured: {})",
                        known.join(", ")
                    ),
                )
            })?,
        };
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
            backend.check_room(size).map_err(pool_error)?;
            let allocated = backend.create(&volume, size).map_err(pool_error)?;
            let definition = VolumeDefinition {
                version: DEFINITION_VERSION,
                name: volume.clone(),
                pool: backend.name().to_string(),
                size_bytes: allocated,
                created_unix: now_unix(),
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
            volumes.insert(
                name.to_string(),
                Slot {
                    definition: Some(definition),
                    state: VolumeState::Ok,
                    busy: None,
                    device: None,
                },
            );
        }
        tracing::info!(volume = %name, pool = %info.pool, size = info.size_bytes, "volume created");
        Ok(info)
    }

    /// Grow a volume to `size_bytes` (rounded up to 4 KiB). Shrinking is refused.
    pub async fn resize(&self, name: &str, size_bytes: u64) -> Result<VolumeInfo, ApiError> {
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
        {
            // The storage is grown: tell an open device before anything else.
            let mut volumes = self.lock();
            if let Some(slot) = volumes.get_mut(name) {
                if let Some(device) = &slot.device {
                    device.set_size(grown);
                }
                slot.definition = Some(new_definition.clone());
            }
        }
        let store = self.store.clone();
        let to_save = new_definition.clone();
        blocking(move || store.save(&to_save).map_err(store_error)).await?;
        drop(claim);
        tracing::info!(volume = %name, size = grown, "volume resized");
        Ok(self.info(&new_definition, VolumeState::Ok))
    }

    /// Delete a volume: definition first, then storage (see [`crate::store`]).
    pub async fn delete(&self, name: &str) -> Result<(), ApiError> {
        validate_volume_name(name).map_err(|e| invalid(e.to_string()))?;
        let (mut claim, definition, state) = self.claim(name, "delete")?;
        {
            let mut volumes = self.lock();
            if let Some(slot) = volumes.get_mut(name) {
                if let Some(device) = &slot.device {
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
            }
        }
        let store = self.store.clone();
        let backend = self.pool(&definition.pool).map(|h| Arc::clone(&h.backend));
        let volume = name.to_string();
        blocking(move || {
            store.remove(&volume).map_err(store_error)?;
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
                total_bytes: 0,
                used_bytes: 0,
                free_bytes: 0,
                provisioned_bytes,
                volumes,
                error: None,
            };
            match usage {
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

    /// This node's identity.
    pub fn node_info(&self) -> NodeInfo {
        NodeInfo {
            name: self.config.node.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            config_path: self.config.path.clone(),
            state_dir: self.config.state_dir.clone(),
            run_dir: self.config.run_dir.clone(),
            nodes: self.config.nodes.clone(),
            pools: self.config.pools.iter().map(|p| p.name.clone()).collect(),
            volumes: self
                .lock()
                .values()
                .filter(|s| s.definition.is_some())
                .count(),
        }
    }
}

#[async_trait]
impl Exports for VolumeService {
    fn list(&self) -> Vec<String> {
        let volumes = self.lock();
        volumes
            .iter()
            .filter(|(_, s)| s.definition.is_some() && s.state == VolumeState::Ok)
            .map(|(name, _)| name.clone())
            .collect()
    }

    async fn describe(&self, name: &str) -> Result<ExportInfo, OpenError> {
        let volumes = self.lock();
        let definition = volumes
            .get(name)
            .and_then(|s| s.definition.as_ref())
            .ok_or_else(|| OpenError::NotFound(name.to_string()))?;
        Ok(ExportInfo {
            size: definition.size_bytes,
            read_only: false,
        })
    }

    async fn open(&self, name: &str, writable: bool) -> Result<Arc<dyn ExportHandle>, OpenError> {
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
        if slot.state == VolumeState::Missing {
            return Err(OpenError::Refused(format!(
                "volume '{name}' has no storage on this host"
            )));
        }
        let device = match &slot.device {
            Some(device) => Arc::clone(device),
            None => {
                let Some(path) = slot
                    .definition
                    .as_ref()
                    .and_then(|d| self.pool(&d.pool))
                    .map(|p| p.backend.device_path(name))
                else {
                    return Err(OpenError::Refused(format!("volume '{name}' has no pool")));
                };
                // One open(2) under the lock, so a concurrent resize cannot miss this device.
                let device = Arc::new(FileDevice::open(&path).map_err(|e| {
                    OpenError::Refused(format!("cannot open volume '{name}': {}", error_chain(&e)))
                })?);
                slot.device = Some(Arc::clone(&device));
                device
            }
        };
        let device: Arc<dyn BackingDevice> = device;
        Ok(Arc::new(LocalExport::new(name, device, !writable)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::path::Path;

    fn service(root: &Path) -> VolumeService {
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
        service.create("v1", 1 << 20, None).await.unwrap();
        assert_eq!(Exports::list(&service), vec!["v1".to_string()]);

        let handle = service.open("v1", true).await.unwrap();
        assert_eq!(handle.size(), 1 << 20);
        service.resize("v1", 2 << 20).await.unwrap();
        assert_eq!(handle.size(), 2 << 20, "resize reached the open device");
        // The new tail is writable through the already open handle.
        let data = Bytes::from(vec![0x5Au8; 4096]);
        handle
            .write((2 << 20) - 4096, data.clone(), true)
            .await
            .unwrap();
        assert_eq!(handle.read((2 << 20) - 4096, 4096).await.unwrap(), data);

        let e = service.delete("v1").await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::InUse, "{}", e.message);
        drop(handle);
        service.delete("v1").await.unwrap();
        assert!(matches!(
            service.open("v1", false).await,
            Err(OpenError::NotFound(_))
        ));
        assert!(!dir.path().join("images/v1.img").exists());
    }

    #[tokio::test]
    async fn a_read_only_open_refuses_writes() {
        let dir = tempfile::tempdir().unwrap();
        let service = service(dir.path());
        service.create("ro", 1 << 20, None).await.unwrap();
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
        let e = service.create("big", u64::MAX / 2, None).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::NoSpace, "{}", e.message);
        assert!(!dir.path().join("images/big.img").exists());
        assert!(!dir.path().join("state/volumes/big.json").exists());
        service.create("big", 4096, None).await.unwrap();
    }
}
