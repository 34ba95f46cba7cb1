//! The [`Engine`]/[`EngineReplica`] seam implemented by the real replication engine,
//! `replication::replica` (`ReplicationNode`, `Replica`). Options, status and errors are
//! translated here and nowhere else; the engine's status object is the control API's
//! (`control_api::ReplicaStatus` is `replication::replica::ReplicaStatus`), so the daemon
//! prints exactly what the engine reports.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use control_api::{ReplicaStatus, VerifySummary};
use replication::auth::Secret;
use replication::device::BackingDevice;

use replication::replica::{
    EngineError, NodeConfig, PeerSpec, ReplicaOptions, ReplicaSpec, ReplicationNode,
};
use replication::resync::ResyncConfig;
use replication::stats::IoStats;

use crate::engine::{Engine, EngineFailure, EngineReplica, FailureKind, PeerPlan, ReplicaPlan};
use crate::engine_config::EngineConfig;
use crate::options::VolumeOptions;
use crate::report::error_chain;

/// The engine of a cluster node.
pub struct ReplicationEngine {
    node: Arc<ReplicationNode>,
}

impl ReplicationEngine {
    /// Bind the replication listener on `listen`, with the `[engine]` tunables.
    pub async fn start(
        name: &str,
        listen: std::net::SocketAddr,
        secret: Secret,
        tunables: &EngineConfig,
    ) -> Result<Arc<ReplicationEngine>, EngineFailure> {
        let node = ReplicationNode::start(NodeConfig {
            name: name.to_string(),
            listen,
            secret,
            link: tunables.link(),
            tunables: tunables.tunables.clone(),
        })
        .await
        .map_err(failure)?;
        Ok(Arc::new(ReplicationEngine { node }))
    }
}

/// The engine's options for a volume.
pub fn replica_options(options: &VolumeOptions) -> ReplicaOptions {
    ReplicaOptions {
        protocol: options.protocol,
        quorum: None,
        on_no_quorum: options.on_no_quorum,
        after_split_brain: options.after_split_brain,
        resync: ResyncConfig {
            max_rate_bytes_per_sec: options.resync_max_rate_bytes,
            // Validated options never have min > max; the engine clamps anyway.
            min_rate_bytes_per_sec: options.resync_min_rate_bytes,
            plan_ahead: std::time::Duration::from_millis(options.resync_plan_ahead_ms),
            ..ResyncConfig::default()
        },
        ..ReplicaOptions::default()
    }
}

/// Classify an engine error; refusals keep the engine's one-line message (QEMU shows it),
/// other failures carry their cause chain.
pub fn failure(error: EngineError) -> EngineFailure {
    let kind = match &error {
        EngineError::NotPrimary { .. }
        | EngineError::NotUpToDate { .. }
        | EngineError::Diskless { .. } => FailureKind::NotPrimary,
        EngineError::Promote(_)
        | EngineError::PromotionInProgress { .. }
        | EngineError::SnapshotInProgress { .. }
        | EngineError::PromotionNotAgreed { .. }
        | EngineError::NoQuorum { .. }
        | EngineError::NotSplitBrain { .. }
        | EngineError::Resolve { .. }
        | EngineError::InvalidRequest(_)
        | EngineError::Unsupported(_) => FailureKind::Refused,
        EngineError::Closed { .. } | EngineError::Demoted { .. } => FailureKind::Shutdown,
        EngineError::Device { .. }
        | EngineError::Datapath { .. }
        | EngineError::SuspendTimeout { .. } => FailureKind::Io,
        _ => FailureKind::Failed,
    };
    let message = if kind == FailureKind::Refused {
        match &error {
            EngineError::Resolve { .. } => error_chain(&error),
            _ => error.to_string(),
        }
    } else {
        error_chain(&error)
    };
    EngineFailure::new(kind, message)
}

#[async_trait]
impl Engine for ReplicationEngine {
    fn create_metadata(
        &self,
        meta_dir: &Path,
        size: u64,
        day0: u64,
        peers: &[&str],
    ) -> Result<(), EngineFailure> {
        let al_extents = self.node.tunables().al_extents;
        ReplicationNode::create_metadata(meta_dir, size, day0, peers, al_extents).map_err(failure)
    }

    fn create_metadata_inconsistent(
        &self,
        meta_dir: &Path,
        size: u64,
        peers: &[&str],
    ) -> Result<(), EngineFailure> {
        let al_extents = self.node.tunables().al_extents;
        ReplicationNode::create_metadata_inconsistent(meta_dir, size, peers, al_extents)
            .map_err(failure)
    }

    async fn open_replica(
        &self,
        plan: ReplicaPlan,
        device: Option<Arc<dyn BackingDevice>>,
    ) -> Result<Arc<dyn EngineReplica>, EngineFailure> {
        let spec = ReplicaSpec {
            volume: plan.volume.clone(),
            peers: plan.peers.iter().map(peer_spec).collect(),
            meta_dir: plan.meta_dir.clone(),
            options: replica_options(&plan.options),
        };
        let replica = self
            .node
            .open_replica(spec, device)
            .await
            .map_err(failure)?;
        let size = AtomicU64::new(replica.status().size_bytes);
        Ok(Arc::new(EngineVolume { replica, size }))
    }

    async fn close_replica(&self, volume: &str) -> Result<(), EngineFailure> {
        self.node.close_replica(volume).await.map_err(failure)
    }

    async fn shutdown(&self) {
        self.node.shutdown().await;
    }
}

fn peer_spec(p: &PeerPlan) -> PeerSpec {
    PeerSpec {
        name: p.name.clone(),
        replication: p.replication,
        diskless: p.diskless,
    }
}

/// One engine replica behind the seam.
struct EngineVolume {
    replica: Arc<replication::replica::Replica>,
    /// The engine's volume size, read on every I/O's range check: a full `status()` per
    /// request (bitmaps counted) cost more than the write itself. The
    /// engine changes its size only in `Replica::resize`, which goes through [`Self::resize`].
    size: AtomicU64,
}

#[async_trait]
impl EngineReplica for EngineVolume {
    fn status(&self) -> ReplicaStatus {
        self.replica.status()
    }
    fn io_stats(&self) -> Option<Arc<IoStats>> {
        Some(self.replica.io_stats())
    }
    async fn promote(&self) -> Result<(), EngineFailure> {
        self.replica.promote().await.map_err(failure)
    }
    async fn demote(&self) -> Result<(), EngineFailure> {
        self.replica.demote().await.map_err(failure)
    }
    async fn pause_writes(
        &self,
        timeout: std::time::Duration,
    ) -> Result<crate::engine::WritePause, EngineFailure> {
        let guard = self.replica.pause_writes(timeout).await.map_err(failure)?;
        Ok(Box::new(guard))
    }
    async fn demote_force(&self) -> Result<(), EngineFailure> {
        self.replica.demote_force().await.map_err(failure)
    }
    fn set_allow_two_primaries(&self, allow: bool) -> Result<(), EngineFailure> {
        self.replica.set_allow_two_primaries(allow).map_err(failure)
    }
    async fn resolve_split_brain(&self, discard_local: bool) -> Result<(), EngineFailure> {
        self.replica
            .resolve_split_brain(discard_local)
            .await
            .map_err(failure)
    }
    async fn verify(&self) -> Result<VerifySummary, EngineFailure> {
        let report = self.replica.verify().await.map_err(failure)?;
        Ok(VerifySummary {
            differing_blocks: report.differing_blocks,
            checked_bytes: report.checked_bytes,
        })
    }
    fn size_bytes(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }
    async fn resize(&self, new_size: u64) -> Result<(), EngineFailure> {
        let result = self.replica.resize(new_size).await.map_err(failure);
        // Whatever the outcome, mirror the size the engine now has.
        self.size
            .store(self.replica.status().size_bytes, Ordering::Release);
        result
    }
    fn set_options(&self, options: &VolumeOptions) -> Result<(), EngineFailure> {
        self.replica
            .set_options(replica_options(options))
            .map_err(failure)
    }
    async fn add_peer(&self, peer: PeerPlan) -> Result<(), EngineFailure> {
        self.replica
            .add_peer(peer_spec(&peer))
            .await
            .map_err(failure)
    }
    async fn remove_peer(&self, peer: &str) -> Result<(), EngineFailure> {
        self.replica.remove_peer(peer).await.map_err(failure)
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, EngineFailure> {
        self.replica.read(offset, len).await.map_err(failure)
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), EngineFailure> {
        self.replica.write(offset, data, fua).await.map_err(failure)
    }
    async fn flush(&self) -> Result<(), EngineFailure> {
        self.replica.flush().await.map_err(failure)
    }
    async fn trim(&self, offset: u64, len: u64) -> Result<(), EngineFailure> {
        self.replica.trim(offset, len).await.map_err(failure)
    }
    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
    ) -> Result<(), EngineFailure> {
        self.replica
            .write_zeroes(offset, len, may_unmap)
            .await
            .map_err(failure)
    }
}
