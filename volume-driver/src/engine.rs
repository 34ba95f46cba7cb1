//! The daemon's seam to the replication engine (`replication::replica`, see replication/README.md).
//!
//! ```text
//! VolumeService ── Engine (node: create_metadata, open_replica, close_replica, shutdown)
//!        │            └── EngineReplica (one volume: status, roles, verify, resize, I/O)
//!        └── ReplicatedExport (frontend handle) ── EngineReplica::{read, write, ...}
//! ```
//!
//! The daemon talks to the engine only through these two traits, so the lifecycle,
//! the control API and the frontend rules (auto-promote, last-writer demote) are tested
//! with a scripted engine, and the adapter onto `replication::replica::ReplicationNode`
//! stays one small file. Errors cross the seam as an [`EngineFailure`]: a class the daemon
//! branches on and the engine's operator-ready message, unchanged (e.g. "vm-100-disk-0 is
//! Primary on hv2").
//!
//! The real engine is [`crate::engine_adapter::ReplicationEngine`]. [`NoEngine`] is what a
//! one-node install (no secret, no replication listener) runs with: it reports replicated
//! volumes Secondary with unconnected peers and refuses every promotion, so nothing is ever
//! served from an unreplicated copy of a replicated volume (e.g. after the config lost its
//! other nodes).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use control_api::{
    ConnectionState, DiskState, PeerStatus, ReplicaStatus, ReplicationState, Role, VerifySummary,
};
use replication::device::BackingDevice;
use replication::stats::IoStats;

use crate::options::VolumeOptions;

/// Writes held by [`EngineReplica::pause_writes`] until this is dropped.
pub type WritePause = Box<dyn Send + Sync>;

/// What kind of failure the engine reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// A rule refused the request (role, quorum, disk state, two-primaries gate).
    Refused,
    /// I/O on a replica that is not Primary.
    NotPrimary,
    /// The backing device or a peer failed the I/O.
    Io,
    /// The replica is closing or closed.
    Shutdown,
    /// Anything else (metadata, setup).
    Failed,
}

/// A failure reported by the engine, with its operator-ready message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct EngineFailure {
    pub kind: FailureKind,
    pub message: String,
}

impl EngineFailure {
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        EngineFailure {
            kind,
            message: message.into(),
        }
    }
}

/// Another node of a volume, as the engine needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerPlan {
    pub name: String,
    pub replication: SocketAddr,
    pub diskless: bool,
}

/// Everything the engine needs to run one volume's replica (`replication::replica::ReplicaSpec`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaPlan {
    pub volume: String,
    /// Every other node of the volume (data replicas and tiebreakers).
    pub peers: Vec<PeerPlan>,
    /// `<state_dir>/volumes/<name>/meta`.
    pub meta_dir: PathBuf,
    pub options: VolumeOptions,
    /// Data replicas (this node included when it stores data) and tiebreakers, for the
    /// quorum default.
    pub data_replicas: usize,
    pub tiebreakers: usize,
}

/// The node-level engine.
#[async_trait]
pub trait Engine: Send + Sync + 'static {
    /// Initialise a new replica's metadata; every replica of a volume gets the same `day0`.
    fn create_metadata(
        &self,
        meta_dir: &Path,
        size: u64,
        day0: u64,
        peers: &[&str],
    ) -> Result<(), EngineFailure>;
    /// Initialise the metadata of a replica added to an existing volume: Inconsistent, so
    /// it full-syncs from an UpToDate replica at its first connect.
    fn create_metadata_inconsistent(
        &self,
        meta_dir: &Path,
        size: u64,
        peers: &[&str],
    ) -> Result<(), EngineFailure> {
        self.create_metadata(meta_dir, size, 0, peers)
    }
    /// Start replicating a volume (`device` is `None` on a diskless tiebreaker).
    async fn open_replica(
        &self,
        plan: ReplicaPlan,
        device: Option<Arc<dyn BackingDevice>>,
    ) -> Result<Arc<dyn EngineReplica>, EngineFailure>;
    /// Close a replica cleanly (before delete, on shutdown).
    async fn close_replica(&self, volume: &str) -> Result<(), EngineFailure>;
    /// Close everything and stop the listener.
    async fn shutdown(&self);
}

/// One volume's local replica.
#[async_trait]
pub trait EngineReplica: Send + Sync + 'static {
    fn status(&self) -> ReplicaStatus;
    /// The replica's I/O statistics, for the metrics exporter (`None`: not recorded).
    fn io_stats(&self) -> Option<Arc<IoStats>> {
        None
    }
    /// The volume size in bytes, as `status().size_bytes`; asked on every I/O (range
    /// checks), so engines should answer it without building a status.
    fn size_bytes(&self) -> u64 {
        self.status().size_bytes
    }
    async fn promote(&self) -> Result<(), EngineFailure>;
    async fn demote(&self) -> Result<(), EngineFailure>;
    /// Hold new writes and drain in-flight ones until every connected peer applied them,
    /// for at most `timeout` (a consistent cut for snapshots); writes resume when the
    /// returned guard is dropped. The default holds nothing (no writes ever reach it).
    async fn pause_writes(&self, _timeout: Duration) -> Result<WritePause, EngineFailure> {
        Ok(Box::new(()))
    }
    /// DRBD's `secondary --force`: fail the requests frozen for lack of quorum (none was
    /// acknowledged), then demote. Engines without frozen requests just demote.
    async fn demote_force(&self) -> Result<(), EngineFailure> {
        self.demote().await
    }
    fn set_allow_two_primaries(&self, allow: bool) -> Result<(), EngineFailure>;
    async fn resolve_split_brain(&self, discard_local: bool) -> Result<(), EngineFailure>;
    async fn verify(&self) -> Result<VerifySummary, EngineFailure>;
    /// The device is already grown to `new_size`.
    async fn resize(&self, new_size: u64) -> Result<(), EngineFailure>;
    fn set_options(&self, options: &VolumeOptions) -> Result<(), EngineFailure>;
    /// A node joined the volume: replicate to it too (the replica stays open).
    async fn add_peer(&self, peer: PeerPlan) -> Result<(), EngineFailure>;
    /// A node left the volume: stop replicating to it (the replica stays open).
    async fn remove_peer(&self, peer: &str) -> Result<(), EngineFailure>;
    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, EngineFailure>;
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), EngineFailure>;
    async fn flush(&self) -> Result<(), EngineFailure>;
    async fn trim(&self, offset: u64, len: u64) -> Result<(), EngineFailure>;
    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
    ) -> Result<(), EngineFailure>;
}

/// The engine of a node without replication (see the module doc).
pub struct NoEngine {
    node: String,
}

impl NoEngine {
    pub fn new(node: &str) -> Arc<NoEngine> {
        Arc::new(NoEngine {
            node: node.to_string(),
        })
    }
}

const NO_ENGINE: &str =
    "this tandemd has no replication engine; replicated volumes cannot be promoted or served";

#[async_trait]
impl Engine for NoEngine {
    fn create_metadata(
        &self,
        meta_dir: &Path,
        _size: u64,
        _day0: u64,
        _peers: &[&str],
    ) -> Result<(), EngineFailure> {
        std::fs::create_dir_all(meta_dir).map_err(|e| {
            EngineFailure::new(
                FailureKind::Failed,
                format!("cannot create {}: {e}", meta_dir.display()),
            )
        })
    }

    async fn open_replica(
        &self,
        plan: ReplicaPlan,
        device: Option<Arc<dyn BackingDevice>>,
    ) -> Result<Arc<dyn EngineReplica>, EngineFailure> {
        Ok(Arc::new(DetachedReplica {
            node: self.node.clone(),
            plan,
            device,
        }))
    }

    async fn close_replica(&self, _volume: &str) -> Result<(), EngineFailure> {
        Ok(())
    }

    async fn shutdown(&self) {}
}

/// A replica of [`NoEngine`]: Secondary forever, peers never connected.
struct DetachedReplica {
    node: String,
    plan: ReplicaPlan,
    device: Option<Arc<dyn BackingDevice>>,
}

fn refused() -> EngineFailure {
    EngineFailure::new(FailureKind::Refused, NO_ENGINE)
}

#[async_trait]
impl EngineReplica for DetachedReplica {
    fn status(&self) -> ReplicaStatus {
        ReplicaStatus {
            volume: self.plan.volume.clone(),
            node: self.node.clone(),
            role: Role::Secondary,
            disk_state: if self.device.is_some() {
                DiskState::Consistent
            } else {
                DiskState::Diskless
            },
            protocol: self.plan.options.protocol,
            quorum: false,
            quorum_reason: String::new(),
            io_suspended: false,
            allow_two_primaries: false,
            size_bytes: self.device.as_ref().map_or(0, |d| d.size()),
            current_uuid: String::new(),
            peers: self
                .plan
                .peers
                .iter()
                .map(|p| PeerStatus {
                    node: p.name.clone(),
                    diskless: p.diskless,
                    connection: ConnectionState::StandAlone,
                    role: Role::Unknown,
                    disk_state: DiskState::DUnknown,
                    replication: ReplicationState::Off,
                    out_of_sync_bytes: 0,
                    resync: None,
                    split_brain: None,
                    two_primaries_conflict: None,
                    link: None,
                    decision: None,
                    last_error: None,
                })
                .collect(),
            last_verify: None,
        }
    }
    async fn promote(&self) -> Result<(), EngineFailure> {
        Err(refused())
    }
    async fn demote(&self) -> Result<(), EngineFailure> {
        Ok(())
    }
    fn set_allow_two_primaries(&self, _allow: bool) -> Result<(), EngineFailure> {
        Err(refused())
    }
    async fn resolve_split_brain(&self, _discard_local: bool) -> Result<(), EngineFailure> {
        Err(refused())
    }
    async fn verify(&self) -> Result<VerifySummary, EngineFailure> {
        Err(refused())
    }
    async fn resize(&self, _new_size: u64) -> Result<(), EngineFailure> {
        Ok(())
    }
    fn set_options(&self, _options: &VolumeOptions) -> Result<(), EngineFailure> {
        Ok(())
    }
    async fn add_peer(&self, _peer: PeerPlan) -> Result<(), EngineFailure> {
        Ok(())
    }
    async fn remove_peer(&self, _peer: &str) -> Result<(), EngineFailure> {
        Ok(())
    }
    async fn read(&self, _offset: u64, _len: u32) -> Result<Bytes, EngineFailure> {
        Err(EngineFailure::new(FailureKind::NotPrimary, NO_ENGINE))
    }
    async fn write(&self, _offset: u64, _data: Bytes, _fua: bool) -> Result<(), EngineFailure> {
        Err(EngineFailure::new(FailureKind::NotPrimary, NO_ENGINE))
    }
    async fn flush(&self) -> Result<(), EngineFailure> {
        Err(EngineFailure::new(FailureKind::NotPrimary, NO_ENGINE))
    }
    async fn trim(&self, _offset: u64, _len: u64) -> Result<(), EngineFailure> {
        Err(EngineFailure::new(FailureKind::NotPrimary, NO_ENGINE))
    }
    async fn write_zeroes(
        &self,
        _offset: u64,
        _len: u64,
        _may_unmap: bool,
    ) -> Result<(), EngineFailure> {
        Err(EngineFailure::new(FailureKind::NotPrimary, NO_ENGINE))
    }
}
