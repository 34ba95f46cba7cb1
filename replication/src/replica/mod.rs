//! The replication engine: one [`ReplicationNode`] per daemon (the replication listener and
//! the volumes it replicates) and one [`Replica`] per volume (connections to its peers,
//! handshake and sync decision, roles, quorum, the I/O entry points). The contract with the
//! daemon and the resync module is `replication/README.md`; the state core it drives is documented in
//! the crate root.
//!
//! ```text
//! ReplicationNode::start ── listener: accept → auth + Hello → lookup(volume) → Replica
//! Replica (per volume)
//!   per peer: dialer task (if our name sorts first; reconnect forever with backoff)
//!             link task: State exchange → decide → Established / SyncSource|Target /
//!                        StandAlone (split brain, unrelated) → data path until link down
//!   Primary:  write → quorum gate → new generation durable → AL durable → datapath::Primary
//!   Secondary: datapath::run_secondary on the Primary's link
//!   witness:  control links only: votes, relays who is Primary, relays outdating
//! ```
//!
//! Engine decisions written down (see also the module docs of `link` and `connection`):
//! - **Quorum loss** on a Primary under `suspend-io` freezes new I/O; a frozen request
//!   waits at most [`ReplicaOptions::suspend_timeout`] (default 120 s) and then fails, so a
//!   request never hangs forever. Under `io-error` it fails at once.
//! - **Force-secondary**: a Primary whose I/O is frozen for lack of quorum and that meets a
//!   peer with newer data on reconnect demotes itself (DRBD's
//!   `on-suspended-primary-outdated force-secondary`) and becomes SyncTarget; its frozen
//!   requests fail (they were never acknowledged).
//! - **Requests in flight at a peer loss**: a request the data path completes because a
//!   peer it was sent to disconnected is acknowledged only once quorum is confirmed (and
//!   the peer outdated where a tiebreaker can), like a new request; otherwise it is frozen
//!   with the others. A write acknowledged by a Primary that then turns out isolated would
//!   be lost when the other side takes over.
//! - **Force demotion** ([`Replica::demote_force`], DRBD's `secondary --force`): fences an
//!   isolated Primary; frozen requests fail, no peer is waited for.
//! - **Resync end**: the target adopts the source's generations; it keeps its own current
//!   only when that is a newer generation of the source it followed during the resync.
//! - **Handshake gate**: while a Primary runs the state exchange with a data peer, new
//!   writes wait (bounded by the handshake timeout), so the exchanged generations and
//!   bitmaps are exactly what the decision acts on.
//! - **Equal generations with a dirty bitmap**: when the decision is "no sync" but a
//!   side's bitmap for the other has bits (writes in flight when a link broke, before the
//!   next write rotated the generation), the pair resyncs those bits by bitmap instead; the
//!   side with bits is the source (both: the Primary, else the smaller name).
//! - **Two primaries** (`allow-two-primaries` on both nodes, protocol C) use a second,
//!   reverse data link per pair (`dual.rs`); both links end together.
//! - **Demote** closes the data links; they reconnect at once as Secondary/Secondary (one
//!   handshake, no resync). Promote hands idle links to the data path in place.
//! - **Outdating through the witness**: a Primary that keeps quorum while losing a data
//!   peer holds new writes until the witness confirms the peer is Outdated (durably) or
//!   unreachable from the witness (bounded like a suspension). The witness also relays who
//!   is Primary, so a peer cut off from the Primary cannot be promoted while it lives.
//!   Requests are tied to generations (`outdate.rs`): a target that moved on answers
//!   *stale* and keeps its state; and a replica that learns through the witness that
//!   another moved on without it steps down (if a Primary without quorum) and is Outdated.
//! - **Secondaries keep an activity log** of the writes they apply (`peer_al.rs`), as
//!   DRBD 9 does: a Secondary that crashes comes back with its hot extents in every
//!   bitmap and uncertain towards its peers, so those extents are resynced to it even when
//!   the Primary that sent the writes is gone too.
//! - **Promotion is a cluster-wide two-phase commit** (`twopc.rs`): every connected member
//!   (data peers and tiebreakers) must agree before a node becomes Primary; between two
//!   concurrent promotions the node whose name sorts first wins, collisions through a
//!   third member are retried after a random backoff. A disconnected member is not asked
//!   (quorum covers that; with quorum off, a split brain is detected at the handshake).
//! - **A lost Primary's in-flight writes** (3+ data replicas, `reconcile.rs`): a Secondary
//!   marks the tail of the writes it applied towards the other data replicas when its
//!   Primary's link drops (not after a clean demotion); after a promotion the new Primary
//!   resyncs the union of both sides' bits to each Secondary on the live link. Promotion
//!   never waits for it. Two handshake rules go with it (`handshake.rs`, `settle`): two
//!   Secondaries at equal generations, one Inconsistent and one UpToDate, resync towards
//!   the Inconsistent one ("no sync" must not make it UpToDate), no handshake ever makes
//!   an Inconsistent replica a resync source (the pair does not connect), and two UpToDate
//!   Secondaries with bits for each other while a Primary is known connect without a
//!   resync and keep their bits.
//! - **Not yet**: no `primary --force`
//!   for a lone Consistent replica; with 3+ data replicas a Secondary→Secondary resync is
//!   deferred while a Primary is connected, and third-node bitmap slots fall back to a
//!   full sync (see `generation`).
//! - **Split brain** leaves the pair StandAlone with the resolve command in status; the
//!   dialer keeps re-running the (deterministic) handshake every few seconds so that a
//!   `resolve` on either node takes effect without a second command on the other.

mod connection;
mod dual;
pub(crate) mod handshake;
mod membership;
pub mod messages;
mod outdate;
mod peer_al;
mod reconcile;
pub mod status;
mod sync;
mod twopc;
mod volume;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;

use crate::activity_log::{AlError, DEFAULT_AL_EXTENTS};
use crate::auth::Secret;
use crate::datapath::DatapathError;
use crate::device::{BackingDevice, DeviceError};
use crate::failure_log::error_chain;
use crate::generation::{Generation, UuidSet};
use crate::link::{LinkConfig, PeerLink};
use crate::metadata::{MetaError, MetaStore, ReplicaMeta};
use crate::quorum::{OnNoQuorum, QuorumMode};
use crate::role::{PromoteRefusal, Protocol};
use crate::sync_decision::{AfterSplitBrain, ResolveError};

pub use status::{PeerStatus, ReplicaStatus, ResyncProgress, VerifySummary};
pub use volume::{PauseGuard, Replica};

/// This node's identity and replication endpoint.
#[derive(Clone)]
pub struct NodeConfig {
    /// This node's name.
    pub name: String,
    /// The replication listen address.
    pub listen: SocketAddr,
    /// The cluster secret.
    pub secret: Secret,
    /// Link tunables.
    pub link: LinkConfig,
    /// Engine tunables for every volume of this node.
    pub tunables: EngineTunables,
}

/// Engine tunables shared by every volume of a node (the daemon's `[engine]` config table).
/// Every default is a named function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineTunables {
    /// A connected peer that does not acknowledge a request for this long is disconnected
    /// and its pending ranges are marked out of sync (DRBD's `ko-count` × `timeout`).
    pub peer_ack_timeout: Duration,
    /// A promotion waits this long for a peer whose link just ended (a demotion cycles the
    /// links) before it goes ahead without that peer.
    pub reconnect_grace: Duration,
    /// The longest wait between two attempts to reach a peer (DRBD's `connect-int`); the
    /// first retry comes after 100 ms and the wait doubles up to this.
    pub reconnect_interval: Duration,
    /// Activity-log size of new volumes, in 4 MiB extents (DRBD's `al-extents`).
    pub al_extents: usize,
}

impl Default for EngineTunables {
    fn default() -> Self {
        EngineTunables {
            peer_ack_timeout: crate::datapath::default_peer_ack_timeout(),
            reconnect_grace: default_reconnect_grace(),
            reconnect_interval: default_reconnect_interval(),
            al_extents: DEFAULT_AL_EXTENTS,
        }
    }
}

/// Default wait for a peer whose link just ended: 3 s.
pub fn default_reconnect_grace() -> Duration {
    Duration::from_secs(3)
}

/// Default longest wait between two connection attempts: 2 s.
pub fn default_reconnect_interval() -> Duration {
    Duration::from_secs(2)
}

/// Another node of a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSpec {
    pub name: String,
    pub replication: SocketAddr,
    /// A diskless tiebreaker (witness).
    pub diskless: bool,
}

/// Per-volume replication options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaOptions {
    pub protocol: Protocol,
    /// `None`: `QuorumMode::default_for(replicas, tiebreakers)`.
    pub quorum: Option<QuorumMode>,
    pub on_no_quorum: OnNoQuorum,
    pub after_split_brain: AfterSplitBrain,
    pub resync: crate::resync::ResyncConfig,
    /// How long a request frozen for lack of quorum waits before it fails.
    pub suspend_timeout: Duration,
}

impl Default for ReplicaOptions {
    fn default() -> Self {
        ReplicaOptions {
            protocol: Protocol::C,
            quorum: None,
            on_no_quorum: OnNoQuorum::SuspendIo,
            after_split_brain: AfterSplitBrain::Disconnect,
            resync: crate::resync::ResyncConfig::default(),
            suspend_timeout: Duration::from_secs(120),
        }
    }
}

/// A volume to replicate.
#[derive(Debug, Clone)]
pub struct ReplicaSpec {
    pub volume: String,
    /// Every other node of the volume (data replicas and diskless tiebreakers).
    pub peers: Vec<PeerSpec>,
    /// Metadata directory (created by [`ReplicationNode::create_metadata`]); unused on a
    /// diskless tiebreaker.
    pub meta_dir: PathBuf,
    pub options: ReplicaOptions,
}

/// Errors of the engine. `Display` is operator-ready.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("binding the replication listener on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{volume}: {op} metadata")]
    Metadata {
        volume: String,
        op: &'static str,
        #[source]
        source: MetaError,
    },
    #[error("{volume}: activity log")]
    ActivityLog {
        volume: String,
        #[source]
        source: AlError,
    },
    #[error("{volume}: local {op} failed")]
    Device {
        volume: String,
        op: &'static str,
        #[source]
        source: DeviceError,
    },
    #[error("{volume}: replicated {op} failed")]
    Datapath {
        volume: String,
        op: &'static str,
        #[source]
        source: DatapathError,
    },
    #[error("{volume} is not Primary on this node (role {role}); promote it first")]
    NotPrimary {
        volume: String,
        role: crate::role::Role,
    },
    #[error("{volume}: local replica is {disk}; I/O needs UpToDate data")]
    NotUpToDate {
        volume: String,
        disk: crate::role::DiskState,
    },
    #[error("{volume} is diskless on this node (a tiebreaker); it serves no I/O")]
    Diskless { volume: String },
    #[error(transparent)]
    Promote(#[from] PromoteRefusal),
    #[error("{volume} is being promoted on {node}; try again once that promotion finished")]
    PromotionInProgress { volume: String, node: String },
    #[error("{volume}: a snapshot is being taken on {node}; try again in a moment")]
    SnapshotInProgress { volume: String, node: String },
    #[error("{volume}: promotion not agreed by the cluster: {reason}")]
    PromotionNotAgreed { volume: String, reason: String },
    #[error("{volume}: no quorum ({reason}); I/O fails (on-no-quorum io-error)")]
    NoQuorum { volume: String, reason: String },
    #[error(
        "{volume}: I/O was suspended for lack of quorum ({reason}) for {waited:?}; request failed"
    )]
    SuspendTimeout {
        volume: String,
        reason: String,
        waited: Duration,
    },
    #[error("{volume}: the replica was demoted while the request waited ({reason})")]
    Demoted { volume: String, reason: String },
    #[error("{volume}: not in split brain with any peer; nothing to resolve")]
    NotSplitBrain { volume: String },
    #[error("{volume}: cannot resolve the split brain")]
    Resolve {
        volume: String,
        #[source]
        source: ResolveError,
    },
    #[error("{0}")]
    InvalidRequest(String),
    #[error("volume {0} is already open on this node")]
    AlreadyOpen(String),
    #[error("volume {0} is not open on this node")]
    UnknownVolume(String),
    #[error("{volume} is closed")]
    Closed { volume: String },
    #[error("not supported yet: {0}")]
    Unsupported(String),
}

pub(crate) struct NodeShared {
    pub(crate) cfg: NodeConfig,
    pub(crate) volumes: Mutex<HashMap<String, Arc<Replica>>>,
}

/// The replication side of one daemon: a listener and the replicas it serves.
pub struct ReplicationNode {
    shared: Arc<NodeShared>,
    listener_task: tokio::task::JoinHandle<()>,
    local_addr: SocketAddr,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ReplicationNode {
    /// Bind the replication listener; incoming links are dispatched by the volume in Hello.
    pub async fn start(cfg: NodeConfig) -> Result<Arc<ReplicationNode>, EngineError> {
        let listener = TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| EngineError::Bind {
                addr: cfg.listen,
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| EngineError::Bind {
            addr: cfg.listen,
            source,
        })?;
        let shared = Arc::new(NodeShared {
            cfg,
            volumes: Mutex::new(HashMap::new()),
        });
        let listener_task = tokio::spawn(accept_loop(listener, shared.clone()));
        tracing::info!(node = %shared.cfg.name, addr = %local_addr, "replication listener up");
        Ok(Arc::new(ReplicationNode {
            shared,
            listener_task,
            local_addr,
        }))
    }

    /// The bound listen address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// This node's name.
    pub fn name(&self) -> &str {
        &self.shared.cfg.name
    }

    /// This node's engine tunables.
    pub fn tunables(&self) -> &EngineTunables {
        &self.shared.cfg.tunables
    }

    /// Initialise metadata for a new replica: every replica of a volume created together
    /// gets the same `day0` generation, so they start UpToDate with no initial sync.
    /// `al_extents` is the activity log's size ([`EngineTunables::al_extents`]).
    pub fn create_metadata(
        meta_dir: &Path,
        size: u64,
        day0: u64,
        peers: &[&str],
        al_extents: usize,
    ) -> Result<(), EngineError> {
        let g = Generation::from_raw(day0);
        if g.is_zero() || g.is_just_created() {
            return Err(EngineError::InvalidRequest(format!(
                "day0 generation {day0:#x} is reserved; pick a random value"
            )));
        }
        Self::write_new_metadata(meta_dir, size, UuidSet::day0(g), peers, al_extents)
    }

    /// Initialise metadata for a replica added to an existing volume: `JUST_CREATED` and
    /// Inconsistent, so its first handshake with an UpToDate replica decides a full sync
    /// towards it (ranges that read as zeroes travel as Zeroes and stay unallocated).
    pub fn create_metadata_inconsistent(
        meta_dir: &Path,
        size: u64,
        peers: &[&str],
        al_extents: usize,
    ) -> Result<(), EngineError> {
        Self::write_new_metadata(meta_dir, size, UuidSet::just_created(), peers, al_extents)
    }

    fn write_new_metadata(
        meta_dir: &Path,
        size: u64,
        uuids: UuidSet,
        peers: &[&str],
        al_extents: usize,
    ) -> Result<(), EngineError> {
        let volume = meta_dir.display().to_string();
        let err = |op| {
            let volume = volume.clone();
            move |source| EngineError::Metadata { volume, op, source }
        };
        std::fs::create_dir_all(meta_dir).map_err(|e| {
            err("creating")(MetaError::Io {
                op: "create_dir_all",
                path: meta_dir.to_path_buf(),
                source: e,
            })
        })?;
        let meta = ReplicaMeta {
            volume_size: size,
            al_extents,
            uuids,
            clean_shutdown: true,
        };
        MetaStore::create(meta_dir, &meta, peers).map_err(err("creating"))?;
        Ok(())
    }

    /// Start replicating a volume. `device` is None on a diskless tiebreaker.
    pub async fn open_replica(
        &self,
        spec: ReplicaSpec,
        device: Option<Arc<dyn BackingDevice>>,
    ) -> Result<Arc<Replica>, EngineError> {
        if lock(&self.shared.volumes).contains_key(&spec.volume) {
            return Err(EngineError::AlreadyOpen(spec.volume));
        }
        let replica = Replica::open(self.shared.clone(), spec, device).await?;
        {
            let mut vols = lock(&self.shared.volumes);
            if vols.contains_key(replica.volume()) {
                return Err(EngineError::AlreadyOpen(replica.volume().to_string()));
            }
            vols.insert(replica.volume().to_string(), replica.clone());
        }
        replica.start_dialers();
        Ok(replica)
    }

    /// The open replica of `volume`.
    pub fn replica(&self, volume: &str) -> Option<Arc<Replica>> {
        lock(&self.shared.volumes).get(volume).cloned()
    }

    /// Clean close (flush bitmaps, mark clean shutdown), e.g. before delete or on SIGTERM.
    pub async fn close_replica(&self, volume: &str) -> Result<(), EngineError> {
        let r = lock(&self.shared.volumes)
            .remove(volume)
            .ok_or_else(|| EngineError::UnknownVolume(volume.to_string()))?;
        r.close().await
    }

    /// Close every replica cleanly and stop listening.
    pub async fn shutdown(&self) {
        self.listener_task.abort();
        let all: Vec<Arc<Replica>> = lock(&self.shared.volumes).drain().map(|(_, r)| r).collect();
        for r in all {
            if let Err(e) = r.close().await {
                tracing::error!(volume = %r.volume(), error = %error_chain(&e), "closing replica failed");
            }
        }
    }
}

impl Drop for ReplicationNode {
    /// Dropping a node without `shutdown` is a crash as far as the metadata is concerned
    /// (tests use it to kill a node): tasks stop, links drop, nothing is flushed.
    fn drop(&mut self) {
        self.listener_task.abort();
        let all: Vec<Arc<Replica>> = lock(&self.shared.volumes).drain().map(|(_, r)| r).collect();
        for r in all {
            r.abort();
        }
    }
}

/// The replica an incoming link is for, and whether it is a reverse (two primaries) link.
type Accepted = (Arc<Replica>, bool);

async fn accept_loop(listener: TcpListener, shared: Arc<NodeShared>) {
    loop {
        let (stream, addr) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a replication connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        tokio::spawn(async move {
            let found: Arc<Mutex<Option<Accepted>>> = Arc::new(Mutex::new(None));
            let found2 = found.clone();
            let lookup_shared = shared.clone();
            let lookup = move |hello: &crate::wire::Hello| {
                let (volume, dual) = dual::split_volume(&hello.volume);
                let r = lock(&lookup_shared.volumes).get(volume).cloned()?;
                let ours = if dual {
                    r.hello_for_dual(&hello.node)?
                } else {
                    r.hello_for_incoming(&hello.node)?
                };
                *lock(&found2) = Some((r, dual));
                Some(ours)
            };
            let res = PeerLink::establish_acceptor(
                stream,
                &shared.cfg.secret,
                &shared.cfg.link,
                &addr.to_string(),
                lookup,
            )
            .await;
            let replica = lock(&found).take();
            match (res, replica) {
                (Ok(link), Some((r, false))) => r.incoming_link(link),
                (Ok(link), Some((r, true))) => r.incoming_dual_link(link),
                (Ok(_), None) => {}
                (Err(e), _) => {
                    tracing::debug!(peer = %addr, error = %e, "incoming replication link refused")
                }
            }
        });
    }
}
