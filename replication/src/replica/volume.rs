//! One replicated volume on this node (the `Replica`): its state (role, disk, generations, bitmaps,
//! quorum, peers), roles and the I/O entry points. Connection handling lives in
//! `connection.rs`; both share [`State`] under one mutex that is never held across an
//! await or across disk I/O (metadata writes run on the blocking pool, taking the
//! metadata lock first: lock order is meta → state → bitmaps).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::messages::{peer_facts, EngineMessage, PeerState};
use super::status::{PeerStatus, ReplicaStatus, VerifySummary};
use super::twopc::{
    Grant, PromotionRound, RoundFailure, RoundGuard, COMMIT_DEADLINE, PROMOTE_TIMEOUT,
};
use super::{EngineError, NodeShared, PeerSpec, ReplicaOptions, ReplicaSpec};
use crate::activity_log::{
    ActivityLog, Admission, AlError, AlTransaction, EXTENT_SIZE, MIN_AL_EXTENTS,
};
use crate::bitmap::Bitmap;
use crate::core::op::Op;
use crate::core::promotion::{self, PeerFacts, View};
use crate::datapath::{Holds, Primary, PrimaryConfig, PrimaryId, ReleaseHolds};
use crate::device::BackingDevice;
use crate::failure_log::{error_chain, FailureLog};
use crate::generation::{Generation, SplitMix64, UuidSet};
use crate::link::LinkSender;
use crate::metadata::{MetaStore, ReplicaMeta};
use crate::quorum::{OnNoQuorum, QuorumMode};
use crate::role::{self, ConnectionState, DiskState, Protocol, ReplicationState, Role};
use crate::stats::{hold, IoStats, PendingDevice};
use crate::wire::{Hello, ReplicationProtocol};

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(super) fn wire_protocol(p: Protocol) -> ReplicationProtocol {
    match p {
        Protocol::A => ReplicationProtocol::A,
        Protocol::B => ReplicationProtocol::B,
        Protocol::C => ReplicationProtocol::C,
    }
}

/// How long a request a connected peer did not acknowledge waits for the engine to see
/// that peer's link end; then the link is closed so the peer resyncs the request (see
/// `Replica::hold_after_peer_loss`).
const LOSS_PROCESSING_WAIT: Duration = Duration::from_secs(1);

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// How a connected data link is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LinkMode {
    /// Handshake running, or no link.
    None,
    /// Both Secondary (or a control link to a tiebreaker).
    Idle,
    /// Attached to our `datapath::Primary`.
    Attached,
    /// Running `datapath::run_secondary` for the peer's writes.
    Secondary,
}

pub(super) struct PeerSlot {
    pub spec: PeerSpec,
    /// We dial this peer (our name sorts first).
    pub dialer: bool,
    pub conn: ConnectionState,
    pub link_id: u64,
    pub sender: Option<LinkSender>,
    pub mode: LinkMode,
    pub state: Option<PeerState>,
    pub replication: ReplicationState,
    pub split_brain: Option<String>,
    pub decision: Option<String>,
    pub last_error: Option<String>,
    pub left_gracefully: bool,
    /// Where resync/verify replies from this peer go (a session on this node is running).
    pub resync_replies: Option<tokio::sync::mpsc::UnboundedSender<crate::wire::Message>>,
    /// Progress of the resync with this peer (either direction).
    pub resync_progress: Option<Arc<crate::resync::ResyncProgress>>,
    /// The resync task when this node is the source.
    pub resync_task: Option<JoinHandle<()>>,
    /// The reverse data link while both nodes are Primary (see `dual.rs`).
    pub dual_sender: Option<LinkSender>,
    /// When an established link to this peer last ended (a promotion waits briefly for
    /// the reconnect, e.g. after a demotion cycled the links).
    pub lost_at: Option<tokio::time::Instant>,
    /// This Secondary asked its Primary on this link to resync the blocks a lost Primary
    /// may have left different (`reconcile.rs`) and is Inconsistent until it finished.
    pub reconciling: bool,
    /// This node set the link up to follow the peer as its Primary, so a reconciliation
    /// can run on it; not when it set it up as a resync target (of a Primary, or of a
    /// Secondary that was promoted later) and went on following the peer on it.
    pub follower_link: bool,
    /// Added online and not yet connected once: not a quorum voter (`membership.rs`).
    pub joining: bool,
}

pub(super) struct State {
    pub role: Role,
    pub disk: DiskState,
    pub uuids: UuidSet,
    pub volume_size: u64,
    pub al_extents: usize,
    pub options: ReplicaOptions,
    pub allow_two_primaries: bool,
    pub has_quorum: bool,
    pub quorum_reason: String,
    pub io_suspended: bool,
    pub promoted_at: u64,
    /// Operator chose to discard local changes at the next split-brain handshake.
    pub discard_my_data: bool,
    /// Operator chose to keep local changes (discard the peer's) at the next handshake.
    pub discard_peer_data: bool,
    pub peers: BTreeMap<String, PeerSlot>,
    /// The newest link id issued to any peer: link ids grow across all peers, so a link
    /// whose id is at most a value read earlier already existed then.
    pub last_link_id: u64,
    pub primary: Option<Primary>,
    pub closed: bool,
    /// A new generation is being made durable (writes wait).
    pub gen_persisting: bool,
    /// Data peers this Primary must see outdated (through a tiebreaker) before it writes
    /// again: target → request id.
    pub pending_outdates: BTreeMap<String, u64>,
    /// Promoted while a data peer was not connected: the first write outdates every data
    /// peer still away through a tiebreaker before it starts the new generation.
    pub outdate_at_first_write: bool,
    /// The last writes applied from the other Primary before this node stepped down
    /// (`dual.rs`), with that Primary's name (the latest one's, should two step-downs
    /// leave tails), until it is known what became of it
    /// (`Replica::settle_stepped_down_tail`).
    pub stepped_down_tail: Option<(String, super::reconcile::RecentPeerWrites)>,
    pub next_request_id: u64,
    /// Outdate requests this tiebreaker forwarded: id → (requester, target).
    pub relayed_outdates: BTreeMap<u64, (String, String)>,
    /// A tiebreaker's memory of the lineage each data replica last reported (kept while
    /// the replica is away; relayed in every state it sends).
    pub seen_lineages: BTreeMap<String, Vec<Generation>>,
    pub last_verify: Option<VerifySummary>,
    /// Why the replica was last demoted by force (frozen requests report it).
    pub forced_demotion: Option<String>,
    /// This node's promotion round in progress (two-phase commit, `twopc.rs`).
    pub promotion: Option<PromotionRound>,
    /// The promotion this node agreed to and holds until its decision.
    pub grant: Option<Grant>,
    /// Consistent cuts in progress ([`Replica::pause_writes`]): every promotion, local or
    /// asked by a peer, is refused (and retried by its promoter) while this is not zero.
    pub promotion_holds: u32,
}

/// A replicated volume on this node.
pub struct Replica {
    pub(super) node: Arc<NodeShared>,
    pub(super) volume: String,
    pub(super) meta_dir: std::path::PathBuf,
    pub(super) device: Option<Arc<dyn BackingDevice>>,
    pub(super) st: Mutex<State>,
    pub(super) meta: Arc<Mutex<Option<MetaStore>>>,
    pub(super) bitmaps: Arc<Mutex<BTreeMap<String, Bitmap>>>,
    al: Mutex<Option<ActivityLog>>,
    al_written: Mutex<u64>,
    al_changed: watch::Sender<u64>,
    gen_lock: tokio::sync::Mutex<()>,
    pub(super) io_gate: Arc<tokio::sync::RwLock<()>>,
    pub(super) changed: watch::Sender<u64>,
    pub(super) tasks: Mutex<Vec<JoinHandle<()>>>,
    rng: Mutex<SplitMix64>,
    pub(super) me: Weak<Replica>,
    /// Releases what a write's [`Holds`] keep (see [`WriteHoldsOwner`]).
    holds_owner: Arc<WriteHoldsOwner>,
    /// Local writes in flight, for detecting overlaps with a second Primary (`dual.rs`).
    pub(super) writes: Arc<super::dual::WriteTracker>,
    /// The tail of the writes applied here for a Primary (`reconcile.rs`).
    pub(super) recent_peer_writes: Arc<Mutex<super::reconcile::RecentPeerWrites>>,
    /// Rate limit of the log lines for local failures while applying a peer's data, across
    /// all links (`datapath::SecondaryConfig::local_failures`).
    pub(super) local_failures: Arc<FailureLog>,
    /// Latencies and byte counts of this replica's I/O, for the metrics exporter.
    stats: Arc<IoStats>,
}

pub(super) fn meta_err(
    volume: &str,
    op: &'static str,
) -> impl Fn(crate::metadata::MetaError) -> EngineError {
    let volume = volume.to_string();
    move |source| EngineError::Metadata {
        volume: volume.clone(),
        op,
        source,
    }
}

/// Writes and promotions held by [`Replica::pause_writes`]; both resume when this is
/// dropped.
pub struct PauseGuard {
    _gate: tokio::sync::OwnedRwLockWriteGuard<()>,
    _promotions: PromotionHold,
}

/// Refuses every promotion of the volume (this node's and, through the two-phase commit,
/// every connected member's) until dropped.
struct PromotionHold(Arc<Replica>);

impl Drop for PromotionHold {
    fn drop(&mut self) {
        lock(&self.0.st).promotion_holds -= 1;
        self.0.notify();
    }
}

impl Replica {
    pub(super) async fn open(
        node: Arc<NodeShared>,
        spec: ReplicaSpec,
        device: Option<Arc<dyn BackingDevice>>,
    ) -> Result<Arc<Replica>, EngineError> {
        let volume = spec.volume.clone();
        // Every call on the local disk (requests, peers' writes, resync) is counted.
        let stats = Arc::new(IoStats::default());
        let device = device
            .map(|d| Arc::new(PendingDevice::new(d, stats.clone())) as Arc<dyn BackingDevice>);
        if spec.peers.iter().any(|p| p.name == node.cfg.name) {
            return Err(EngineError::InvalidRequest(format!(
                "{volume}: the peer list names this node ({})",
                node.cfg.name
            )));
        }
        let data_peers: Vec<String> = spec
            .peers
            .iter()
            .filter(|p| !p.diskless)
            .map(|p| p.name.clone())
            .collect();
        let (store, uuids, bitmaps, al, size, al_extents, disk) = match &device {
            Some(dev) => {
                let dir = spec.meta_dir.clone();
                let dev_size = dev.size();
                let peers = data_peers.clone();
                let tiebreakers: Vec<String> = spec
                    .peers
                    .iter()
                    .filter(|p| p.diskless)
                    .map(|p| p.name.clone())
                    .collect();
                let volume2 = volume.clone();
                let loaded = tokio::task::spawn_blocking(move || {
                    let (mut store, mut loaded) =
                        MetaStore::open(&dir).map_err(meta_err(&volume2, "opening"))?;
                    // A tiebreaker's bitmap slot (if the metadata has one) means nothing: it
                    // stores no data. Keep it clean (apply-al after a crash sets it).
                    for t in &tiebreakers {
                        if let Some(bm) = loaded.bitmaps.get_mut(t) {
                            if bm.dirty_blocks() > 0 {
                                bm.clear_all();
                                store
                                    .flush_bitmap(t, bm)
                                    .map_err(meta_err(&volume2, "writing the bitmap of"))?;
                            }
                        }
                    }
                    for p in &peers {
                        if !loaded.bitmaps.contains_key(p) {
                            let mut bm = Bitmap::new(loaded.meta.volume_size);
                            store
                                .add_peer(p, &mut bm)
                                .map_err(meta_err(&volume2, "adding a peer to"))?;
                            loaded.bitmaps.insert(p.clone(), bm);
                            loaded.meta.uuids.bitmap.insert(p.clone(), Generation::ZERO);
                            store
                                .write_superblock(&loaded.meta)
                                .map_err(meta_err(&volume2, "writing"))?;
                        }
                    }
                    Ok::<_, EngineError>((store, loaded))
                })
                .await
                .map_err(|e| EngineError::InvalidRequest(format!("{volume}: open task: {e}")))??;
                let (store, loaded) = loaded;
                if loaded.recovered_from_crash {
                    tracing::warn!(volume = %volume, crashed_primary = loaded.crashed_primary,
                        "replica was not shut down cleanly; activity log applied to the peer bitmaps");
                }
                if dev_size < loaded.meta.volume_size {
                    return Err(EngineError::InvalidRequest(format!(
                        "{volume}: the device has {dev_size} bytes, the metadata says {}; grow the device first",
                        loaded.meta.volume_size
                    )));
                }
                let al = ActivityLog::from_snapshot(
                    loaded.meta.al_extents,
                    loaded.al_seq,
                    &loaded.al_snapshot,
                )
                .map_err(|source| EngineError::ActivityLog {
                    volume: volume.clone(),
                    source,
                })?;
                let disk = role::disk_state_at_attach(&loaded.meta.uuids);
                (
                    Some(store),
                    loaded.meta.uuids,
                    loaded.bitmaps,
                    Some(al),
                    loaded.meta.volume_size,
                    loaded.meta.al_extents,
                    disk,
                )
            }
            None => (
                None,
                UuidSet::default(),
                BTreeMap::new(),
                None,
                0,
                0,
                DiskState::Diskless,
            ),
        };
        let me_name = node.cfg.name.clone();
        let peers = spec
            .peers
            .iter()
            .map(|p| {
                let slot = super::membership::new_slot(p.clone(), me_name < p.name, false);
                (p.name.clone(), slot)
            })
            .collect();
        let seed: u64 = rand::random();
        let state = State {
            role: Role::Secondary,
            disk,
            uuids,
            volume_size: size,
            al_extents,
            options: spec.options.clone(),
            allow_two_primaries: false,
            has_quorum: false,
            quorum_reason: String::new(),
            io_suspended: false,
            promoted_at: 0,
            discard_my_data: false,
            discard_peer_data: false,
            peers,
            primary: None,
            closed: false,
            gen_persisting: false,
            pending_outdates: BTreeMap::new(),
            outdate_at_first_write: false,
            stepped_down_tail: None,
            next_request_id: 1,
            last_link_id: 0,
            relayed_outdates: BTreeMap::new(),
            seen_lineages: BTreeMap::new(),
            last_verify: None,
            forced_demotion: None,
            promotion: None,
            grant: None,
            promotion_holds: 0,
        };
        let replica = Arc::new_cyclic(|me| Replica {
            node,
            volume,
            meta_dir: spec.meta_dir.clone(),
            device,
            st: Mutex::new(state),
            meta: Arc::new(Mutex::new(store)),
            bitmaps: Arc::new(Mutex::new(bitmaps)),
            al: Mutex::new(al),
            al_written: Mutex::new(0),
            al_changed: watch::channel(0).0,
            gen_lock: tokio::sync::Mutex::new(()),
            io_gate: Arc::new(tokio::sync::RwLock::new(())),
            changed: watch::channel(0).0,
            tasks: Mutex::new(Vec::new()),
            rng: Mutex::new(SplitMix64::new(seed)),
            me: me.clone(),
            holds_owner: Arc::new(WriteHoldsOwner(me.clone())),
            writes: Arc::default(),
            recent_peer_writes: Arc::default(),
            local_failures: Arc::default(),
            stats,
        });
        {
            let mut st = lock(&replica.st);
            replica.recompute_quorum(&mut st);
        }
        Ok(replica)
    }

    /// The volume name.
    pub fn volume(&self) -> &str {
        &self.volume
    }

    /// The metadata directory.
    pub fn meta_dir(&self) -> &std::path::Path {
        &self.meta_dir
    }

    /// This node's name.
    pub fn node_name(&self) -> &str {
        &self.node.cfg.name
    }

    pub(super) fn arc(&self) -> Option<Arc<Replica>> {
        self.me.upgrade()
    }

    pub(super) fn notify(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    pub(super) fn spawn(&self, fut: impl std::future::Future<Output = ()> + Send + 'static) {
        let h = tokio::spawn(fut);
        let mut tasks = lock(&self.tasks);
        tasks.retain(|t| !t.is_finished());
        tasks.push(h);
    }

    pub(super) fn our_hello(&self) -> Hello {
        let st = lock(&self.st);
        Hello::new(
            &self.node.cfg.name,
            &self.volume,
            st.volume_size,
            wire_protocol(st.options.protocol),
        )
    }

    /// Our Hello for an incoming link from `peer`, or None when `peer` is not a member of
    /// this volume (or should dial us, not we it... either way: not expected).
    pub(super) fn hello_for_incoming(&self, peer: &str) -> Option<Hello> {
        {
            let st = lock(&self.st);
            // Only the node whose name sorts first dials; refuse the other direction, so a
            // pair never has two links racing to replace each other.
            if st.closed || st.peers.get(peer).is_none_or(|p| p.dialer) {
                return None;
            }
        }
        Some(self.our_hello())
    }

    // ----- metadata helpers (blocking pool) -----

    pub(super) fn meta_snapshot(&self, st: &State) -> ReplicaMeta {
        ReplicaMeta {
            volume_size: st.volume_size,
            al_extents: st.al_extents,
            uuids: st.uuids.clone(),
            clean_shutdown: false,
        }
    }

    /// Tests: every metadata write (superblock, bitmaps, activity log) waits while the
    /// returned guard is held, which keeps the engine inside a persist.
    #[doc(hidden)]
    pub fn hold_metadata_writes(&self) -> impl Sized + '_ {
        lock(&self.meta)
    }

    /// Write the superblock from the current state, durably. The snapshot is taken under
    /// the metadata lock, so concurrent persists cannot reorder.
    pub(super) async fn persist(&self) -> Result<(), EngineError> {
        let Some(me) = self.arc() else {
            return Ok(());
        };
        let volume = self.volume.clone();
        tokio::task::spawn_blocking(move || {
            let mut store = lock(&me.meta);
            let Some(store) = store.as_mut() else {
                return Ok(());
            };
            let meta = me.meta_snapshot(&lock(&me.st));
            store
                .write_superblock(&meta)
                .map_err(meta_err(&me.volume, "writing"))
        })
        .await
        .map_err(|e| EngineError::InvalidRequest(format!("{volume}: metadata task: {e}")))?
    }

    /// Write `peer`'s changed bitmap pages durably.
    pub(super) async fn flush_bitmap(&self, peer: &str) -> Result<(), EngineError> {
        let Some(me) = self.arc() else {
            return Ok(());
        };
        let peer = peer.to_string();
        let volume = self.volume.clone();
        tokio::task::spawn_blocking(move || {
            let mut store = lock(&me.meta);
            let Some(store) = store.as_mut() else {
                return Ok(());
            };
            let mut bms = lock(&me.bitmaps);
            match bms.get_mut(&peer) {
                Some(bm) => store
                    .flush_bitmap(&peer, bm)
                    .map_err(meta_err(&me.volume, "writing the bitmap of"))
                    .map(|()| IoStats::add(&me.stats.bitmap_writes, 1)),
                None => Ok(()),
            }
        })
        .await
        .map_err(|e| EngineError::InvalidRequest(format!("{volume}: metadata task: {e}")))?
    }

    // ----- state views -----

    pub(super) fn data_peers(st: &State) -> Vec<String> {
        st.peers
            .values()
            .filter(|p| !p.spec.diskless)
            .map(|p| p.spec.name.clone())
            .collect()
    }

    /// Whether another Primary's writes may reach this replica (two Primaries). Applied
    /// here, they are marked for no third peer, so no bitmap slot may be filled meanwhile.
    pub(super) fn another_primary(st: &State) -> bool {
        st.peers.values().any(|p| {
            p.dual_sender.is_some()
                || (p.conn == ConnectionState::Connected
                    && p.state.as_ref().is_some_and(|s| s.role == Role::Primary))
        })
    }

    pub(super) fn quorum_mode(st: &State) -> QuorumMode {
        st.options.quorum.unwrap_or_else(|| {
            let data = st.peers.values().filter(|p| !p.spec.diskless).count();
            let tb = st.peers.len() - data;
            // This node counts as a replica when it is one.
            let (data, tb) = if st.disk == DiskState::Diskless {
                (data, tb + 1)
            } else {
                (data + 1, tb)
            };
            QuorumMode::default_for(data, tb)
        })
    }

    /// Whether this Primary may complete writes now (`core::promotion::writes_admitted`).
    pub(super) fn writes_admitted(st: &State) -> bool {
        promotion::writes_admitted(
            Self::quorum_mode(st),
            st.has_quorum,
            !st.pending_outdates.is_empty(),
        )
    }

    /// Re-evaluate quorum after a membership change. Returns true when this Primary just
    /// lost quorum (the caller persists `primary_lost_quorum`).
    pub(super) fn recompute_quorum(&self, st: &mut State) -> bool {
        let facts = Self::peer_facts(st);
        let v = promotion::quorum(&self.view(st, &facts), st.has_quorum);
        for p in st.peers.values_mut() {
            if p.conn == ConnectionState::Connected && p.state.is_some() {
                p.joining = false;
            }
        }
        let lost = st.has_quorum && !v.has_quorum;
        if lost || (!st.has_quorum && v.has_quorum) {
            tracing::info!(volume = %self.volume, quorum = v.has_quorum, reason = %v.reason, "quorum changed");
        }
        st.has_quorum = v.has_quorum;
        st.quorum_reason = v.reason;
        let mut must_persist = false;
        if lost && st.role == Role::Primary {
            st.uuids.on_quorum_lost(true);
            must_persist = true;
            tracing::error!(volume = %self.volume, on_no_quorum = %st.options.on_no_quorum,
            "Primary lost quorum; I/O is {}", match st.options.on_no_quorum {
                OnNoQuorum::SuspendIo => "suspended",
                OnNoQuorum::IoError => "failed",
            });
        }
        if !lost && st.has_quorum && st.role == Role::Primary && st.uuids.flags.primary_lost_quorum
        {
            // Quorum is back and this node is still Primary: the handshake that brought it
            // back already decided (nobody took over, or we would have stepped down), so
            // the frozen I/O resumes and the flag has done its job.
            st.uuids.flags.primary_lost_quorum = false;
            must_persist = true;
            tracing::info!(volume = %self.volume, "quorum regained; I/O resumes");
        }
        st.io_suspended = st.role == Role::Primary
            && !st.has_quorum
            && st.options.on_no_quorum == OnNoQuorum::SuspendIo;
        self.notify();
        must_persist
    }

    /// What this node knows of each peer, for the promotion and quorum rules.
    pub(super) fn peer_facts(st: &State) -> Vec<PeerFacts> {
        st.peers
            .values()
            .map(|p| {
                let state = p
                    .state
                    .as_ref()
                    .filter(|_| p.conn == ConnectionState::Connected);
                PeerFacts {
                    left_gracefully: p.left_gracefully,
                    joining: p.joining,
                    ..peer_facts(&p.spec.name, !p.spec.diskless, state)
                }
            })
            .collect()
    }

    /// This node's view for the promotion and quorum rules (`facts` from [`Self::peer_facts`]).
    pub(super) fn view<'a>(&'a self, st: &State, facts: &'a [PeerFacts]) -> View<'a> {
        View {
            volume: &self.volume,
            node: &self.node.cfg.name,
            diskful: self.device.is_some(),
            role: st.role,
            disk: st.disk,
            quorum: Self::quorum_mode(st),
            has_quorum: st.has_quorum,
            allow_two_primaries: st.allow_two_primaries,
            protocol: st.options.protocol,
            peers: facts,
            #[cfg(test)]
            faults: Default::default(),
        }
    }

    /// Nodes known to be Primary: this node, connected peers, and what connected
    /// tiebreakers relay (a Primary seen through the witness).
    pub(super) fn known_primaries(&self, st: &State) -> BTreeSet<String> {
        let facts = Self::peer_facts(st);
        promotion::known_primaries(&self.view(st, &facts))
    }

    /// Our state as sent to `peer`.
    pub(super) fn local_state(&self, st: &State, peer: &str, handshake: bool) -> PeerState {
        let changed_blocks = lock(&self.bitmaps)
            .get(peer)
            .map(|b| b.dirty_blocks())
            .unwrap_or(0);
        let mut primaries: Vec<String> = self.known_primaries(st).into_iter().collect();
        // Never relay the receiver's own role back to it.
        primaries.retain(|n| n != peer);
        PeerState {
            role: st.role,
            disk: st.disk,
            allow_two_primaries: st.allow_two_primaries,
            diskless: self.device.is_none(),
            discard_my_data: st.discard_my_data,
            keep_my_data: st.discard_peer_data,
            has_quorum: st.has_quorum,
            leaving: st.closed,
            handshake,
            size: st.volume_size,
            promoted_at: st.promoted_at,
            changed_blocks,
            primaries,
            uuids: self.device.as_ref().map(|_| st.uuids.clone()),
            seen_lineages: st
                .seen_lineages
                .iter()
                .map(|(n, l)| (n.clone(), l.clone()))
                .collect(),
        }
    }

    /// Send our state to every connected peer (after a role, disk or view change).
    pub(super) fn broadcast_state(&self) {
        let st = lock(&self.st);
        for p in st.peers.values() {
            self.send_state(&st, p);
        }
    }

    /// Send our state to `peer` alone, if it is connected.
    pub(super) fn send_state_to(&self, peer: &str) {
        let st = lock(&self.st);
        if let Some(p) = st.peers.get(peer) {
            self.send_state(&st, p);
        }
    }

    fn send_state(&self, st: &State, p: &PeerSlot) {
        if p.conn != ConnectionState::Connected {
            return;
        }
        if let Some(s) = &p.sender {
            let msg = EngineMessage::State(Box::new(self.local_state(st, &p.spec.name, false)));
            let _ = s.send_control(&msg.to_message());
        }
    }

    // ----- status -----

    /// The replica's status as `tandem volume status --json` prints it.
    pub fn status(&self) -> ReplicaStatus {
        let st = lock(&self.st);
        let bms = lock(&self.bitmaps);
        let peers = st
            .peers
            .values()
            .map(|p| {
                let connected = p.conn == ConnectionState::Connected && p.state.is_some();
                PeerStatus {
                    node: p.spec.name.clone(),
                    diskless: p.spec.diskless,
                    connection: p.conn,
                    role: p
                        .state
                        .as_ref()
                        .filter(|_| connected)
                        .map(|s| s.role)
                        .unwrap_or(Role::Unknown),
                    disk_state: p
                        .state
                        .as_ref()
                        .filter(|_| connected)
                        .map(|s| s.disk)
                        .unwrap_or(DiskState::DUnknown),
                    replication: if connected {
                        p.replication
                    } else {
                        ReplicationState::Off
                    },
                    // A tiebreaker stores no data: nothing of it is ever out of sync
                    // (a bitmap slot for it, if the metadata has one, means nothing).
                    out_of_sync_bytes: if p.spec.diskless {
                        0
                    } else {
                        bms.get(&p.spec.name).map(|b| b.dirty_bytes()).unwrap_or(0)
                    },
                    resync: p.resync_progress.as_ref().filter(|_| connected).map(|r| {
                        let s = r.snapshot();
                        super::status::ResyncProgress {
                            done_bytes: s.done_bytes,
                            total_bytes: s.total_bytes,
                            bytes_per_sec: s.bytes_per_sec,
                        }
                    }),
                    split_brain: p.split_brain.clone(),
                    two_primaries_conflict: self.writes.conflict(&p.spec.name),
                    link: p.sender.as_ref().filter(|_| connected).map(|s| s.figures()),
                    decision: p.decision.clone(),
                    last_error: if connected {
                        None
                    } else {
                        p.last_error.clone()
                    },
                }
            })
            .collect();
        ReplicaStatus {
            volume: self.volume.clone(),
            node: self.node.cfg.name.clone(),
            role: st.role,
            disk_state: st.disk,
            protocol: st.options.protocol,
            quorum: st.has_quorum,
            quorum_reason: st.quorum_reason.clone(),
            io_suspended: st.io_suspended,
            allow_two_primaries: st.allow_two_primaries,
            size_bytes: st.volume_size,
            current_uuid: st.uuids.current.to_string(),
            peers,
            last_verify: st.last_verify.clone(),
        }
    }

    /// Wait until `pred` holds on the status, or `timeout` passes. Returns the last status
    /// and whether `pred` held (convenience for the daemon's wait-sync and for tests).
    pub async fn wait_status(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&ReplicaStatus) -> bool,
    ) -> (ReplicaStatus, bool) {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut rx = self.changed.subscribe();
        loop {
            let s = self.status();
            if pred(&s) {
                return (s, true);
            }
            let tick = tokio::time::sleep(Duration::from_millis(50));
            tokio::select! {
                _ = rx.changed() => {}
                _ = tick => {}
                _ = tokio::time::sleep_until(deadline) => return (self.status(), false),
            }
        }
    }

    // ----- roles -----

    /// Local promotion checks with this node's current view: returns the other Primaries
    /// (two primaries allowed: each must be connected directly, the reverse data link goes
    /// to it).
    fn local_promote_checks(&self, st: &State) -> Result<Vec<String>, EngineError> {
        let facts = Self::peer_facts(st);
        promotion::check_promote(&self.view(st, &facts)).map_err(|r| self.refusal_error(r))
    }

    /// Become Primary; refused with an operator-ready message when the disk is not
    /// UpToDate, quorum is missing, another Primary is known (directly or relayed), or
    /// the connected members do not all agree (cluster-wide two-phase commit, see
    /// `twopc.rs`; a round lost to a concurrent promotion is retried for a few seconds).
    pub async fn promote(&self) -> Result<(), EngineError> {
        let started = tokio::time::Instant::now();
        loop {
            match self.promote_round().await {
                Ok(()) => return Ok(()),
                Err(RoundFailure::Refused(e)) => return Err(e),
                Err(RoundFailure::Reconnecting { node }) => {
                    if started.elapsed() >= PROMOTE_TIMEOUT {
                        return Err(EngineError::PromotionNotAgreed {
                            volume: self.volume.clone(),
                            reason: format!(
                                "the link to {node} is being re-established; try again"
                            ),
                        });
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(RoundFailure::Busy { node }) => {
                    self.promote_backoff(started, &node).await.map_err(|()| {
                        EngineError::PromotionInProgress {
                            volume: self.volume.clone(),
                            node,
                        }
                    })?;
                }
                Err(RoundFailure::Snapshotting { node }) => {
                    self.promote_backoff(started, &node).await.map_err(|()| {
                        EngineError::SnapshotInProgress {
                            volume: self.volume.clone(),
                            node,
                        }
                    })?;
                }
            }
        }
    }

    /// Wait a random 20–200 ms before retrying a round that `other` kept from committing;
    /// `Err` once the retries would outlast [`PROMOTE_TIMEOUT`] since `started`.
    async fn promote_backoff(&self, started: tokio::time::Instant, other: &str) -> Result<(), ()> {
        let backoff = Duration::from_millis(20 + rand::random::<u64>() % 180);
        if started.elapsed() + backoff >= PROMOTE_TIMEOUT {
            return Err(());
        }
        tracing::debug!(volume = %self.volume, other, ?backoff, "promotion collided; retrying");
        tokio::time::sleep(backoff).await;
        Ok(())
    }

    /// One promotion round: local checks, prepare, wait for the answers, commit or abort.
    async fn promote_round(&self) -> Result<(), RoundFailure> {
        let Some(device) = self.device.clone() else {
            return Err(RoundFailure::Refused(EngineError::Diskless {
                volume: self.volume.clone(),
            }));
        };
        let (id, senders, two_primaries) = {
            let mut st = lock(&self.st);
            if st.closed {
                return Err(RoundFailure::Refused(EngineError::Closed {
                    volume: self.volume.clone(),
                }));
            }
            if st.role == Role::Primary {
                return Ok(());
            }
            self.local_promote_checks(&st)
                .map_err(RoundFailure::Refused)?;
            let (id, senders) = self.start_round(&mut st)?;
            (
                id,
                senders,
                st.allow_two_primaries && st.options.protocol == Protocol::C,
            )
        };
        let prepare = EngineMessage::PromotePrepare { id, two_primaries }.to_message();
        for s in &senders {
            let _ = s.send_control(&prepare);
        }
        // Abort unless this node becomes Primary (also when this future is dropped).
        let mut guard = RoundGuard {
            replica: self,
            id,
            senders,
            commit: false,
            done: false,
        };
        self.wait_round(id).await;
        let other_primaries: Vec<String>;
        let round_started;
        let installed;
        {
            let mut st = lock(&self.st);
            match self.round_won(&mut st, id) {
                Ok(t) => round_started = t,
                Err(f) => {
                    drop(st);
                    return Err(f);
                }
            }
            // Everyone agreed; the local view must still allow it.
            match self.local_promote_checks(&st) {
                Ok(o) => other_primaries = o,
                Err(e) => {
                    drop(st);
                    return Err(RoundFailure::Refused(e));
                }
            }
            let data = Self::data_peers(&st);
            let any_disconnected = data.iter().any(|p| {
                st.peers
                    .get(p)
                    .is_none_or(|s| s.conn != ConnectionState::Connected || s.state.is_none())
            });
            st.uuids.on_promote(any_disconnected);
            st.role = Role::Primary;
            st.promoted_at = unix_now();
            st.forced_demotion = None;
            let bitmaps = self.bitmaps.clone();
            let volume = self.volume.clone();
            let hook: crate::datapath::OutOfSyncHook = Arc::new(move |peer, off, len| {
                if let Some(bm) = lock(&bitmaps).get_mut(peer) {
                    if let Err(e) = bm.set_range(off, len) {
                        tracing::error!(volume = %volume, peer, error = %e, "marking out of sync failed");
                    }
                }
            });
            let mut cfg = PrimaryConfig::new(wire_protocol(st.options.protocol));
            cfg.peer_ack_timeout = self.node.cfg.tunables.peer_ack_timeout;
            let primary = Primary::new(device, cfg, hook);
            primary.set_known_peers(&data);
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            primary.set_extension_sink(tx);
            if let Some(me) = self.arc() {
                let (failure, id) = (primary.failure(), primary.id());
                self.spawn(async move {
                    while let Some((peer, msg)) = rx.recv().await {
                        me.handle_extension(&peer, msg).await;
                    }
                    if failure.await {
                        me.data_path_failed(&id).await;
                    }
                });
            }
            installed = primary.id();
            st.primary = Some(primary);
            st.io_suspended = false;
            // Primary from here on: a dropped future still commits.
            guard.commit = true;
            st.outdate_at_first_write = any_disconnected;
        };
        // The primary indicator is durable before any write (crash detection).
        if let Err(e) = self.persist().await {
            {
                let mut st = lock(&self.st);
                st.role = Role::Secondary;
                st.uuids.on_demote();
                st.primary = None;
                st.outdate_at_first_write = false;
            }
            guard.decide(false);
            return Err(RoundFailure::Refused(e));
        }
        if let Err(e) = self.still_promoted(&installed) {
            guard.decide(false);
            return Err(e);
        }
        if round_started.elapsed() > COMMIT_DEADLINE {
            // The members' grants may have lapsed meanwhile: do not rely on them.
            let reason = "promotion took too long";
            let _ = self.demote_inner(reason, false, Some(&installed)).await;
            guard.decide(false);
            return Err(RoundFailure::Refused(EngineError::PromotionNotAgreed {
                volume: self.volume.clone(),
                reason: format!(
                    "making the promotion durable took longer than {COMMIT_DEADLINE:?}"
                ),
            }));
        }
        guard.decide(true);
        if !other_primaries.is_empty() {
            if let Err(e) = self.connect_dual_links(&other_primaries).await {
                let _ = self
                    .demote_inner("two primaries refused", false, Some(&installed))
                    .await;
                return Err(RoundFailure::Refused(e));
            }
        }
        tracing::info!(volume = %self.volume, "promoted to Primary");
        let stepped_down_tail = {
            let mut st = lock(&self.st);
            self.recompute_quorum(&mut st);
            // The only Primary: the one this node stepped down for is gone or stepped down.
            let me = self.node_name().to_string();
            if other_primaries.is_empty() {
                self.settle_stepped_down_tail(&mut st, &me)
            } else {
                None
            }
        };
        if let Some(marked) = stepped_down_tail {
            self.lost_primary_tail_marked(marked).await;
        }
        // A link still applying a (finished) resync from a Secondary peer is re-established
        // so it joins the data path; writes meanwhile are tracked in the bitmap and the
        // reconnect resyncs them ("equal generations with a dirty bitmap").
        let reconnect: Vec<LinkSender> = {
            let st = lock(&self.st);
            st.peers
                .values()
                .filter(|p| p.mode == LinkMode::Secondary)
                .filter(|p| p.state.as_ref().is_none_or(|s| s.role != Role::Primary))
                .filter_map(|p| p.sender.clone())
                .collect()
        };
        for s in reconnect {
            s.close("promoted; re-establishing the link as Primary");
        }
        self.broadcast_state();
        self.notify();
        // Idle data links hand themselves to the data path; wait for that, so no write is
        // issued while a connected peer is not attached yet.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let mut rx = self.changed.subscribe();
        loop {
            let pending = {
                let st = lock(&self.st);
                st.peers.values().any(|p| {
                    !p.spec.diskless
                        && p.conn == ConnectionState::Connected
                        && p.mode == LinkMode::Idle
                })
            };
            if !pending {
                break;
            }
            tokio::select! {
                _ = rx.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                _ = tokio::time::sleep_until(deadline) => {
                    tracing::warn!(volume = %self.volume, "a peer link did not join the data path in time");
                    break;
                }
            }
        }
        self.still_promoted(&installed)
    }

    /// `Err` when the Primary this promotion installed is gone: its data path failed
    /// (`data_path_failed`) and the replica stepped down while the promotion was being made
    /// durable or its links joined. The promotion then reports that, instead of success for
    /// a replica that is Secondary.
    fn still_promoted(&self, installed: &PrimaryId) -> Result<(), RoundFailure> {
        let st = lock(&self.st);
        if st.role == Role::Primary && st.primary.as_ref().is_some_and(|p| installed.is(p)) {
            return Ok(());
        }
        Err(RoundFailure::Refused(EngineError::Demoted {
            volume: self.volume.clone(),
            reason: st
                .forced_demotion
                .clone()
                .unwrap_or_else(|| "demoted during the promotion".into()),
        }))
    }

    /// Hold every new write and every promotion, and drain the writes in flight until each
    /// connected peer has applied them (flush under protocol C, the peers'
    /// acknowledgements under A and B): the one entry point for a consistent cut (`tandem
    /// snapshot create`). It fails, holding nothing, unless the cut is the same on every
    /// data replica: each one connected, UpToDate and with nothing out of sync once the
    /// writes drained, and no peer lost a drained write. Writes and promotions resume when
    /// the guard is dropped. Gives up after `timeout`. On a replica that is not Primary no
    /// write can arrive here; the guard then keeps the volume from being promoted anywhere
    /// (every promotion needs this member's agreement while it is connected).
    pub async fn pause_writes(&self, timeout: Duration) -> Result<PauseGuard, EngineError> {
        let promotions = self.hold_promotion()?;
        let pause = async {
            let gate = self.io_gate.clone().write_owned().await;
            let primary = lock(&self.st).primary.clone();
            if let Some(p) = primary {
                let done = p
                    .flush_request()
                    .await
                    .map_err(|source| EngineError::Datapath {
                        volume: self.volume.clone(),
                        op: "flush before a pause",
                        source,
                    })?;
                if !done.unacknowledged.is_empty() {
                    // A peer already away says so; one lost during the drain is named.
                    let why = Self::why_not_in_sync(&self.status()).unwrap_or_else(|| {
                        format!(
                            "{} did not acknowledge the writes drained for the pause",
                            done.unacknowledged.join(", ")
                        )
                    });
                    return Err(self.not_a_cut(&why));
                }
                p.wait_replicated().await;
            }
            if let Some(why) = Self::why_not_in_sync(&self.status()) {
                return Err(self.not_a_cut(&why));
            }
            Ok(PauseGuard {
                _gate: gate,
                _promotions: promotions,
            })
        };
        tokio::time::timeout(timeout, pause).await.map_err(|_| {
            EngineError::InvalidRequest(format!(
                "{}: in-flight writes did not drain within {timeout:?}; writes resumed",
                self.volume
            ))
        })?
    }

    /// Refuse promotions until the hold is dropped; fails if one is being decided now.
    fn hold_promotion(&self) -> Result<PromotionHold, EngineError> {
        let Some(me) = self.me.upgrade() else {
            return Err(EngineError::Closed {
                volume: self.volume.clone(),
            });
        };
        let mut st = lock(&self.st);
        let promoting = match st.promotion {
            Some(_) => Some(self.node_name().to_string()),
            None => Self::active_grant(&mut st, None),
        };
        if let Some(node) = promoting {
            return Err(EngineError::PromotionInProgress {
                volume: self.volume.clone(),
                node,
            });
        }
        st.promotion_holds += 1;
        Ok(PromotionHold(me))
    }

    /// Why the replicas would not hold the same bytes at a cut taken now, if they would not.
    fn why_not_in_sync(status: &ReplicaStatus) -> Option<String> {
        if status.disk_state != DiskState::UpToDate {
            return Some(format!("this replica is {}", status.disk_state));
        }
        status.peers.iter().filter(|p| !p.diskless).find_map(|p| {
            if p.connection != ConnectionState::Connected {
                Some(format!("{} is {}", p.node, p.connection))
            } else if p.disk_state != DiskState::UpToDate {
                Some(format!("{} is {}", p.node, p.disk_state))
            } else if p.out_of_sync_bytes > 0 || p.resync.is_some() {
                Some(format!("{} has out-of-sync blocks", p.node))
            } else {
                None
            }
        })
    }

    fn not_a_cut(&self, why: &str) -> EngineError {
        EngineError::InvalidRequest(format!(
            "{}: not every replica would hold the same cut ({why}); writes resumed",
            self.volume
        ))
    }

    /// Become Secondary: flush, wait until connected peers have every write, clear the
    /// primary indicator durably, then re-establish the data links as Secondary.
    pub async fn demote(&self) -> Result<(), EngineError> {
        let primary = {
            let st = lock(&self.st);
            if st.role != Role::Primary {
                return Ok(());
            }
            st.primary.clone()
        };
        let _gate = self.io_gate.clone().write_owned().await;
        if let Some(p) = &primary {
            if let Err(source) = p.flush().await {
                tracing::warn!(volume = %self.volume, error = %error_chain(&source),
                    "flush before demote failed");
            }
            p.wait_replicated().await;
        }
        self.demote_inner("demoted", true, None).await
    }

    /// DRBD's `secondary --force`, for fencing a Primary that lost quorum: requests frozen
    /// for lack of quorum fail ([`EngineError::Demoted`]; none of them was acknowledged),
    /// requests already in the data path finish (bounded), then the replica is Secondary.
    /// Unlike [`Replica::demote`] it does not wait for unreachable peers.
    pub async fn demote_force(&self) -> Result<(), EngineError> {
        if lock(&self.st).role != Role::Primary {
            return Ok(());
        }
        let _gate = self.gate_for_demotion().await;
        self.demote_now("demoted by force (secondary --force); frozen requests fail")
            .await
    }

    /// The I/O gate for a demotion that does not wait for unreachable peers: requests past
    /// admission hold the gate only while the data path runs them (a dead peer never
    /// blocks it), so wait for them, bounded, and none completes after the demotion.
    async fn gate_for_demotion(&self) -> Option<tokio::sync::OwnedRwLockWriteGuard<()>> {
        let gate =
            tokio::time::timeout(Duration::from_secs(10), self.io_gate.clone().write_owned()).await;
        if gate.is_err() {
            tracing::warn!(volume = %self.volume, "requests in flight did not finish within 10 s; demoting anyway");
        }
        gate.ok()
    }

    /// The Primary `failed` names lost its data path (its task panicked: a bug). It marked
    /// what it left unfinished out of sync for the peers and fails every request since,
    /// and its links are gone. Staying Primary on it would fail every write while no peer
    /// could reconnect to resync those ranges, so the replica steps down like
    /// `secondary --force`: the peers reconnect and resync, the log says why, and a
    /// promotion starts a new data path. A Primary that replaced it meanwhile is left alone.
    async fn data_path_failed(&self, failed: &PrimaryId) {
        if !lock(&self.st)
            .primary
            .as_ref()
            .is_some_and(|p| failed.is(p))
        {
            return;
        }
        tracing::error!(volume = %self.volume, "the data path failed (internal error); demoting");
        let _gate = self.gate_for_demotion().await;
        let reason =
            "demoted: the data path failed (internal error, see the log); promote again to resume";
        if let Err(e) = self.demote_inner(reason, false, Some(failed)).await {
            tracing::error!(volume = %self.volume, error = %error_chain(&e), "demotion after the data path failed");
        }
    }

    /// Drop the Primary role (no flush): force-secondary, by the operator or of a Primary
    /// without quorum that meets newer data.
    pub(super) async fn demote_now(&self, reason: &str) -> Result<(), EngineError> {
        self.demote_inner(reason, false, None).await
    }

    /// Drop the Primary role. `clean`: every write reached every connected peer
    /// (`demote`); the data links then carry our new state before they close, so the
    /// Secondaries know no write of ours was left in flight (`reconcile.rs`).
    /// `only`: nothing happens unless the current Primary is this one.
    async fn demote_inner(
        &self,
        reason: &str,
        clean: bool,
        only: Option<&PrimaryId>,
    ) -> Result<(), EngineError> {
        let primary = {
            let mut st = lock(&self.st);
            let replaced = only.is_some_and(|id| !st.primary.as_ref().is_some_and(|p| id.is(p)));
            if st.role != Role::Primary || replaced {
                return Ok(());
            }
            st.role = Role::Secondary;
            st.uuids.on_demote();
            st.io_suspended = false;
            st.pending_outdates.clear();
            st.outdate_at_first_write = false;
            st.forced_demotion = Some(reason.to_string());
            st.primary.take()
        };
        self.notify();
        self.close_dual_links(&format!("{reason}; two primaries end"));
        let res = self.persist().await;
        if let Some(p) = primary {
            for peer in p.connected_peers() {
                let why = format!("{reason}; reconnecting as Secondary");
                match p.peer_sender(&peer).filter(|_| clean) {
                    Some(s) => {
                        let state = {
                            let st = lock(&self.st);
                            self.local_state(&st, &peer, false)
                        };
                        let _ = s.send_control(&EngineMessage::State(Box::new(state)).to_message());
                        s.close_after_queued(&why);
                    }
                    None => {
                        p.disconnect_peer(&peer, &why);
                    }
                }
            }
        }
        self.broadcast_state();
        tracing::info!(volume = %self.volume, reason, "now Secondary");
        res
    }

    /// Switch the dual-primary gate (protocol C only).
    pub fn set_allow_two_primaries(&self, allow: bool) -> Result<(), EngineError> {
        {
            let mut st = lock(&self.st);
            if allow {
                role::check_two_primaries_gate(&self.volume, st.options.protocol)?;
            }
            st.allow_two_primaries = allow;
        }
        if allow {
            self.watch_two_primaries();
        }
        self.broadcast_state();
        Ok(())
    }

    /// Resolve a split brain: `discard_local` on the node whose changes are given up (it
    /// becomes SyncTarget), or `false` on the node whose changes win.
    pub async fn resolve_split_brain(&self, discard_local: bool) -> Result<(), EngineError> {
        {
            let mut st = lock(&self.st);
            if !st.peers.values().any(|p| p.split_brain.is_some()) {
                return Err(EngineError::NotSplitBrain {
                    volume: self.volume.clone(),
                });
            }
            if discard_local && st.role == Role::Primary {
                return Err(EngineError::InvalidRequest(format!(
                    "{}: this node is Primary; demote it before discarding its data",
                    self.volume
                )));
            }
            st.discard_my_data = discard_local;
            st.discard_peer_data = !discard_local;
        }
        tracing::warn!(volume = %self.volume, discard_local, "split brain resolution requested");
        self.notify();
        Ok(())
    }

    /// Grow the volume (the device was already grown).
    pub async fn resize(&self, new_size: u64) -> Result<(), EngineError> {
        let Some(dev) = self.device.clone() else {
            return Ok(());
        };
        let Some(me) = self.arc() else {
            return Ok(());
        };
        dev.set_size(new_size);
        if dev.size() < new_size {
            return Err(EngineError::InvalidRequest(format!(
                "{}: the device has {} bytes, less than {new_size}",
                self.volume,
                dev.size()
            )));
        }
        let volume = self.volume.clone();
        tokio::task::spawn_blocking(move || {
            let mut store = lock(&me.meta);
            let Some(store) = store.as_mut() else {
                return Ok(());
            };
            let mut meta = me.meta_snapshot(&lock(&me.st));
            if new_size < meta.volume_size {
                return Err(EngineError::InvalidRequest(format!(
                    "{}: volumes only grow ({} -> {new_size})",
                    me.volume, meta.volume_size
                )));
            }
            {
                // Every pool grows with zeros (a sparse file's new tail, a thin LV's
                // unprovisioned extents) and a cluster resize grows every replica, so the
                // new area is in sync everywhere (DRBD's `resize --assume-clean`); marking
                // it out of sync would leave bits that no resync of a connected pair clears.
                let mut bms = lock(&me.bitmaps);
                store
                    .grow(&mut meta, &mut bms, new_size, false)
                    .map_err(meta_err(&me.volume, "growing"))?;
            }
            // Bitmaps released first: the lock order is meta → state → bitmaps (status()
            // takes state then bitmaps).
            lock(&me.st).volume_size = new_size;
            Ok(())
        })
        .await
        .map_err(|e| EngineError::InvalidRequest(format!("{volume}: resize task: {e}")))?
    }

    /// Change options (protocol changes take effect at the next connect; resync rate
    /// bounds at the next chunk of a running resync, or verify's next run).
    pub fn set_options(&self, options: ReplicaOptions) -> Result<(), EngineError> {
        let mut st = lock(&self.st);
        if st.allow_two_primaries {
            role::check_two_primaries_gate(&self.volume, options.protocol)?;
        }
        for progress in st.peers.values().filter_map(|p| p.resync_progress.as_ref()) {
            progress.set_limits(options.resync.limits());
        }
        st.options = options;
        self.recompute_quorum(&mut st);
        Ok(())
    }

    // ----- I/O -----

    /// Admission of an I/O request: Primary, UpToDate, quorum (waits under suspend-io,
    /// bounded), no outdating in progress. Returns the data path.
    async fn admit(&self) -> Result<Primary, EngineError> {
        let mut rx = self.changed.subscribe();
        let started = tokio::time::Instant::now();
        let mut waited = false;
        loop {
            let timeout = {
                let st = lock(&self.st);
                if st.closed {
                    return Err(EngineError::Closed {
                        volume: self.volume.clone(),
                    });
                }
                if self.device.is_none() {
                    return Err(EngineError::Diskless {
                        volume: self.volume.clone(),
                    });
                }
                if st.role != Role::Primary {
                    if let Some(reason) = &st.forced_demotion {
                        if waited {
                            return Err(EngineError::Demoted {
                                volume: self.volume.clone(),
                                reason: reason.clone(),
                            });
                        }
                    }
                    return Err(EngineError::NotPrimary {
                        volume: self.volume.clone(),
                        role: st.role,
                    });
                }
                if st.disk != DiskState::UpToDate {
                    return Err(EngineError::NotUpToDate {
                        volume: self.volume.clone(),
                        disk: st.disk,
                    });
                }
                let quorum_ok = st.has_quorum || Self::quorum_mode(&st) == QuorumMode::Off;
                if !quorum_ok && st.options.on_no_quorum == OnNoQuorum::IoError {
                    return Err(EngineError::NoQuorum {
                        volume: self.volume.clone(),
                        reason: st.quorum_reason.clone(),
                    });
                }
                if Self::writes_admitted(&st) {
                    if let Some(p) = &st.primary {
                        return Ok(p.clone());
                    }
                }
                if started.elapsed() >= st.options.suspend_timeout {
                    return Err(EngineError::SuspendTimeout {
                        volume: self.volume.clone(),
                        reason: if quorum_ok {
                            format!(
                                "waiting for {} to be marked Outdated",
                                st.pending_outdates
                                    .keys()
                                    .cloned()
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            )
                        } else {
                            st.quorum_reason.clone()
                        },
                        waited: started.elapsed(),
                    });
                }
                st.options.suspend_timeout - started.elapsed()
            };
            tokio::select! {
                _ = rx.changed() => {}
                _ = tokio::time::sleep(timeout.min(Duration::from_millis(200))) => {}
            }
            waited = true;
        }
    }

    /// Create an armed new generation before the first write after a peer loss or a
    /// promotion with a peer away; durable before the write is issued; announced to the
    /// connected data peers ahead of the write on the same links.
    ///
    /// Only while the admission rule holds (quorum, no outdating in progress): a Primary
    /// that lost a peer together with its quorum must not start a generation the peer
    /// never sees, or a takeover by that peer would meet it as a split brain instead of
    /// finding this node a plain bitmap SyncTarget. False: admission no longer holds;
    /// the caller waits in [`Replica::admit`] (outside the I/O gate) and tries again.
    async fn new_generation_if_armed(&self) -> Result<bool, EngineError> {
        loop {
            {
                let st = lock(&self.st);
                if !st.uuids.new_generation_pending && !st.gen_persisting {
                    return Ok(true);
                }
            }
            let _g = self.gen_lock.lock().await;
            let (outdates, work) = {
                let mut st = lock(&self.st);
                // The first write after a promotion with a data peer away outdates it
                // through a tiebreaker first (`outdate.rs`). Without quorum no request can
                // go out (and no write is admitted): the duty stays for the next attempt.
                let outdates = if st.uuids.new_generation_pending
                    && st.has_quorum
                    && std::mem::take(&mut st.outdate_at_first_write)
                {
                    self.outdate_unreached_peers(&mut st)
                } else {
                    None
                };
                let admitted = st.role == Role::Primary && Self::writes_admitted(&st);
                let work = if !st.uuids.new_generation_pending {
                    Some(None)
                } else if !admitted {
                    None
                } else {
                    let attached: Vec<String> = st
                        .primary
                        .as_ref()
                        .map(|p| p.connected_peers())
                        .unwrap_or_default();
                    let disconnected: Vec<String> = Self::data_peers(&st)
                        .into_iter()
                        .filter(|p| !attached.contains(p))
                        .collect();
                    // With another Primary writing here no slot is filled (see
                    // `another_primary`): a later handshake with these peers resyncs in full.
                    let names: Vec<&str> = if Self::another_primary(&st) {
                        Vec::new()
                    } else {
                        disconnected.iter().map(String::as_str).collect()
                    };
                    let g = {
                        let mut rng = lock(&self.rng);
                        let mut next = || rng.next_u64();
                        st.uuids.before_write(&names, &mut next)
                    };
                    Some(g.map(|g| {
                        st.gen_persisting = true;
                        (g, disconnected, attached)
                    }))
                };
                (outdates, work)
            };
            if let Some((requests, relays)) = outdates {
                for r in &relays {
                    for msg in &requests {
                        let _ = r.send_control(msg);
                    }
                }
            }
            let Some(work) = work else {
                return Ok(false);
            };
            let Some((g, disconnected, attached)) = work else {
                continue;
            };
            let res = self.persist().await;
            {
                let mut st = lock(&self.st);
                st.gen_persisting = false;
                // Not on disk: no write may run in it; the next one starts a generation
                // again.
                if res.is_err() {
                    st.uuids.new_generation_pending = true;
                }
            }
            res?;
            tracing::info!(volume = %self.volume, generation = %g, ?disconnected, "new data generation");
            let msg = EngineMessage::NewCurrent {
                generation: g,
                disconnected,
            }
            .to_message();
            let senders: Vec<LinkSender> = {
                let st = lock(&self.st);
                attached
                    .iter()
                    .filter_map(|p| st.primary.as_ref().and_then(|pr| pr.peer_sender(p)))
                    .collect()
            };
            for s in senders {
                let _ = s.send_control(&msg);
            }
            // Tiebreakers remember every replica's lineage (`seen_lineages`):
            // a replica cut off now learns from them that it was left behind.
            self.broadcast_state();
            return Ok(true);
        }
    }

    /// Ask the activity log to admit a write of `[offset, offset+len)` (`None`: no log).
    fn al_admit(&self, offset: u64, len: u64) -> Result<Option<Admission>, EngineError> {
        let mut al = lock(&self.al);
        let Some(al) = al.as_mut() else {
            return Ok(None);
        };
        al.begin_write(offset, len)
            .map(Some)
            .map_err(|source| EngineError::ActivityLog {
                volume: self.volume.clone(),
                source,
            })
    }

    /// Make AL transaction `tx` durable (blocking I/O), then report it (also when the
    /// write that asked for it was dropped meanwhile, so nobody waits for it forever).
    /// Snapshots are written one at a time (`al_written`); first every pending eviction
    /// (of this transaction or any other admitted one) gets the data device flushed (a
    /// completed write to an evicted extent may still sit in a volatile cache) and its
    /// bitmap pages written.
    fn persist_al(&self, tx: &AlTransaction) -> Result<(), EngineError> {
        let res = self.write_al_snapshot(tx);
        self.al_persisted(tx.seq, res.is_ok());
        res
    }

    fn write_al_snapshot(&self, tx: &AlTransaction) -> Result<(), EngineError> {
        let mut written = lock(&self.al_written);
        if tx.seq <= *written {
            // A newer snapshot (a superset of this one's extents) is durable.
            return Ok(());
        }
        let evicted = lock(&self.al)
            .as_mut()
            .map(|al| al.take_evicted_ranges())
            .unwrap_or_default();
        if let (false, Some(dev)) = (evicted.is_empty(), &self.device) {
            // Before the metadata lock: a flush may take long.
            dev.flush().map_err(|source| EngineError::Device {
                volume: self.volume.clone(),
                op: "flush (before the activity log drops extents)",
                source,
            })?;
        }
        let mut store = lock(&self.meta);
        let Some(store) = store.as_mut() else {
            return Err(EngineError::InvalidRequest(format!(
                "{}: the replica is closed; its activity log cannot be written",
                self.volume
            )));
        };
        let meta_err = |source| EngineError::Metadata {
            volume: self.volume.clone(),
            op: "writing the activity log of",
            source,
        };
        let mut bms = lock(&self.bitmaps);
        for (off, len) in evicted {
            for (peer, bm) in bms.iter_mut() {
                store
                    .flush_bitmap_range(peer, bm, off, len)
                    .map_err(meta_err)?;
            }
        }
        drop(bms);
        store.write_al(tx.seq, &tx.snapshot).map_err(meta_err)?;
        *written = tx.seq;
        IoStats::add(&self.stats.al_writes, 1);
        Ok(())
    }

    /// Persisting a transaction ended: on success writes waiting for `seq` may go; on a
    /// failure every waiting and later write fails (the hot set on disk is unknown).
    fn al_persisted(&self, seq: u64, ok: bool) {
        if let Some(al) = lock(&self.al).as_mut() {
            if ok {
                al.transaction_durable(seq);
            } else {
                al.transaction_failed();
            }
        }
        self.al_notify();
    }

    /// Wake the writes waiting for room or durability in the activity log. Only such a
    /// write subscribes to `al_changed` (it re-checks after subscribing, so none misses
    /// this), and with nobody subscribed the send is skipped: waking a watch's waiters
    /// takes its eight waiter lists' locks, on every write.
    fn al_notify(&self) {
        if self.al_changed.receiver_count() > 0 {
            self.al_changed.send_modify(|v| *v = v.wrapping_add(1));
        }
    }

    /// Whether transaction `seq` is durable (`Ok(true)`), pending (`Ok(false)`), or will
    /// never be (a transaction failed).
    fn al_durable(&self, seq: u64) -> Result<bool, EngineError> {
        match lock(&self.al).as_ref() {
            None => Ok(true),
            Some(al) if al.has_failed() => Err(EngineError::ActivityLog {
                volume: self.volume.clone(),
                source: AlError::Failed,
            }),
            Some(al) => Ok(al.durable_seq() >= seq),
        }
    }

    /// Take the activity-log extents of `[offset, offset+len)`, persisting a transaction
    /// when a cold extent is touched (durable before the write is issued). The extents are
    /// released when the returned hold is dropped, also if the write is cancelled.
    async fn al_begin(&self, offset: u64, len: u64) -> Result<AlHold<'_>, EngineError> {
        // Subscribed before the check that finds it must wait (see `al_notify`).
        let mut rx: Option<watch::Receiver<u64>> = None;
        loop {
            match self.al_admit(offset, len)? {
                None | Some(Admission::Go) => return Ok(self.al_hold(offset, len)),
                Some(Admission::Persist(tx)) => {
                    let hold = self.al_hold(offset, len);
                    let Some(me) = self.arc() else {
                        return Err(EngineError::InvalidRequest(format!(
                            "{}: the replica is closing",
                            self.volume
                        )));
                    };
                    tokio::task::spawn_blocking(move || me.persist_al(&tx))
                        .await
                        .unwrap_or_else(|e| {
                            Err(EngineError::InvalidRequest(format!(
                                "{}: activity log task: {e}",
                                self.volume
                            )))
                        })?;
                    return Ok(hold);
                }
                Some(Admission::WaitFor(seq)) => {
                    let hold = self.al_hold(offset, len);
                    let mut rx = self.al_changed.subscribe();
                    while !self.al_durable(seq)? {
                        let _ = tokio::time::timeout(Duration::from_millis(50), rx.changed()).await;
                    }
                    return Ok(hold);
                }
                Some(Admission::Busy) => match &mut rx {
                    None => rx = Some(self.al_changed.subscribe()),
                    Some(rx) => {
                        let _ = tokio::time::timeout(Duration::from_millis(50), rx.changed()).await;
                    }
                },
            }
        }
    }

    fn al_hold(&self, offset: u64, len: u64) -> AlHold<'_> {
        AlHold {
            replica: self,
            offset,
            len,
        }
    }

    /// [`Replica::al_begin`] for a thread that may block (the blocking pool), for the
    /// writes a Secondary applies; the caller calls `al_end` after the write. It needs no
    /// runtime, and it gives up after [`PEER_WRITE_AL_WAIT`]: with two Primaries, local
    /// writes hold extents until the peer acknowledges, so waiting for room without end
    /// could deadlock both; failing disconnects the pair instead, and they resync.
    pub(super) fn al_begin_blocking(&self, offset: u64, len: u64) -> Result<(), EngineError> {
        let deadline = std::time::Instant::now() + PEER_WRITE_AL_WAIT;
        let out_of_time = || {
            EngineError::InvalidRequest(format!(
                "{}: no room in the activity log for a replicated write at {offset} length \
                 {len} within {PEER_WRITE_AL_WAIT:?}",
                self.volume
            ))
        };
        loop {
            match self.al_admit(offset, len)? {
                None | Some(Admission::Go) => return Ok(()),
                Some(Admission::Persist(tx)) => {
                    let hold = self.al_hold(offset, len);
                    self.persist_al(&tx)?;
                    hold.keep();
                    return Ok(());
                }
                Some(Admission::WaitFor(seq)) => {
                    let hold = self.al_hold(offset, len);
                    while !self.al_durable(seq)? {
                        if std::time::Instant::now() > deadline {
                            return Err(out_of_time());
                        }
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    hold.keep();
                    return Ok(());
                }
                Some(Admission::Busy) => {
                    if std::time::Instant::now() > deadline {
                        return Err(out_of_time());
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }

    /// Take the extents of `[offset, offset+len)` if they are hot and durable (no I/O, no
    /// waiting); `false` takes nothing.
    pub(super) fn al_try_begin(&self, offset: u64, len: u64) -> bool {
        match lock(&self.al).as_mut() {
            None => true,
            Some(al) => al.try_begin_write(offset, len).unwrap_or(false),
        }
    }

    pub(super) fn al_end(&self, offset: u64, len: u64) {
        if let Some(al) = lock(&self.al).as_mut() {
            if let Err(e) = al.end_write(offset, len) {
                tracing::error!(volume = %self.volume, error = %e, "activity log bookkeeping");
            }
        }
        self.al_notify();
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), EngineError> {
        let size = lock(&self.st).volume_size;
        if offset.checked_add(len).is_none_or(|e| e > size) {
            return Err(EngineError::InvalidRequest(format!(
                "{}: request at offset {offset} length {len} is beyond the volume size {size}",
                self.volume
            )));
        }
        Ok(())
    }

    /// Run `request` (a write, trim or write-zeroes of `[offset, offset + len)`) on `p`
    /// inside the I/O gate, with its activity-log extents taken and recorded as a local
    /// write in flight. Those three holds travel with the request into the volume task
    /// ([`Holds`]): if this future is dropped or unwinds while the request is in flight,
    /// they are released only once its local I/O and its peers are done, so no demotion,
    /// pause or handshake passes the gate, no extent goes cold and no overlapping peer
    /// write is accepted while the device may still be writing the range.
    async fn modify(
        &self,
        op: &'static str,
        offset: u64,
        len: u64,
        p: Primary,
        request: Op,
    ) -> Result<(), EngineError> {
        self.check_range(offset, len)?;
        let mut p = p;
        let gate = loop {
            let gate = self.io_gate.clone().read_owned().await;
            if self.new_generation_if_armed().await? && self.still_admitted(&p) {
                break gate;
            }
            drop(gate);
            p = self.admit().await?;
        };
        let al_hold = self.al_begin(offset, len).await?;
        // Before the data path picks the peers (the request is not submitted yet).
        let links_before = self.link_ids();
        let tag = self.writes.begin_tag(offset, len);
        // From here on the extents and the tracker entry are released by the holds
        // (`release_holds`), wherever they are dropped.
        al_hold.keep();
        let holds = Holds::new(
            Some(gate),
            self.holds_owner.clone(),
            offset,
            len,
            tag,
            links_before,
        );
        let (res, holds) = p.submit_held(offset, request, holds).await;
        // Outside the gate: a handshake that brings quorum back needs it.
        holds.release();
        let done = res.map_err(|source| EngineError::Datapath {
            volume: self.volume.clone(),
            op,
            source,
        })?;
        if op == "write" {
            self.stats.write.observe(done.local, done.peers);
        }
        IoStats::add(&self.stats.written_bytes, len);
        self.ack_gate(&done, links_before).await
    }

    /// Under the I/O gate: whether `p`, admitted before the gate was taken, is still this
    /// replica's Primary and takes writes. A demotion takes the gate for itself, so one that
    /// came in between shows here, and the write must not reach the disk through the
    /// Primary it took down (found by review: the write landed after a clean demotion).
    fn still_admitted(&self, p: &Primary) -> bool {
        let st = lock(&self.st);
        !st.closed
            && st.role == Role::Primary
            && st.disk == DiskState::UpToDate
            && Self::writes_admitted(&st)
            && st
                .primary
                .as_ref()
                .is_some_and(|current| current.is_same(p))
    }

    /// The newest link id issued so far: the links a request started with are those with
    /// an id at most this (see [`Replica::hold_after_peer_loss`]). No allocation per request.
    fn link_ids(&self) -> u64 {
        lock(&self.st).last_link_id
    }

    /// The acknowledgement rule: a request every known peer acknowledged completes; one
    /// that some peer did not acknowledge waits in [`Replica::hold_after_peer_loss`].
    async fn ack_gate(
        &self,
        done: &crate::datapath::Completion,
        links_before: u64,
    ) -> Result<(), EngineError> {
        if done.unacknowledged.is_empty() {
            return Ok(());
        }
        self.hold_after_peer_loss(&done.unacknowledged, links_before)
            .await
    }

    /// A request completed without the acknowledgement of some data peers (`lost`): it
    /// is on this disk and in their bitmaps, but maybe not on them. Acknowledge it only
    /// once the engine has processed each of those peers' absence (the peer is not
    /// Connected, or has a link newer than the request, whose handshake exchanged the
    /// bitmap) and this Primary still has quorum with the lost peers outdated where a
    /// tiebreaker can do it — exactly like a new request's admission. Without quorum it
    /// is frozen like one (suspend-io) or fails (io-error), and it fails if the replica is
    /// demoted meanwhile: a Primary that lost quorum may be replaced, and a write it
    /// acknowledged alone would be lost. A peer still Connected on the same link that did
    /// not get the request has its link closed, so the reconnect resyncs the range.
    ///
    /// Like a new request, it is acknowledged only in a new generation when the loss armed
    /// one: a request issued before the loss would otherwise be acknowledged in the
    /// generation the lost peer holds too, and a later handshake at equal generations could
    /// make this replica the SyncTarget (e.g. after it lost quorum) and drop the write
    /// (found by the role simulator, `core::sim::roles`).
    async fn hold_after_peer_loss(
        &self,
        lost: &[String],
        links_before: u64,
    ) -> Result<(), EngineError> {
        let mut rx = self.changed.subscribe();
        let started = tokio::time::Instant::now();
        // However this ends (even dropped by its caller, or failed before the wait below),
        // a peer still on the link that missed the request is reconnected.
        let mut reconnect = ReconnectUnreplicated {
            replica: self,
            lost,
            links_before,
            done: false,
        };
        loop {
            let mut rotate = false;
            {
                let st = lock(&self.st);
                if st.closed {
                    return Err(EngineError::Closed {
                        volume: self.volume.clone(),
                    });
                }
                if st.role != Role::Primary {
                    return Err(EngineError::Demoted {
                        volume: self.volume.clone(),
                        reason: st
                            .forced_demotion
                            .clone()
                            .unwrap_or_else(|| "demoted".into()),
                    });
                }
                // Wait until the engine has processed each loss: quorum and outdating
                // below are only meaningful then.
                let unprocessed = Self::missed_on_open_links(&st, lost, links_before);
                if !unprocessed.is_empty()
                    && !reconnect.done
                    && started.elapsed() >= LOSS_PROCESSING_WAIT
                {
                    // Connected, yet it did not get the request (e.g. its link was not in
                    // the data path yet): reconnect it so the handshake resyncs the range.
                    reconnect.done = true;
                    self.reconnect_unreplicated(&st, &unprocessed);
                }
                if unprocessed.is_empty() {
                    let quorum_ok = st.has_quorum || Self::quorum_mode(&st) == QuorumMode::Off;
                    if Self::writes_admitted(&st) {
                        if !st.uuids.new_generation_pending && !st.gen_persisting {
                            return Ok(());
                        }
                        rotate = true;
                    }
                    if !quorum_ok && st.options.on_no_quorum == OnNoQuorum::IoError {
                        return Err(EngineError::NoQuorum {
                            volume: self.volume.clone(),
                            reason: st.quorum_reason.clone(),
                        });
                    }
                }
                if started.elapsed() >= st.options.suspend_timeout {
                    return Err(EngineError::SuspendTimeout {
                        volume: self.volume.clone(),
                        reason: format!(
                            "a peer ({}) was lost while the request was in flight; {}",
                            lost.join(", "),
                            st.quorum_reason
                        ),
                        waited: started.elapsed(),
                    });
                }
            }
            if rotate {
                // Inside the I/O gate, like a new request's; then check everything again.
                let _gate = self.io_gate.read().await;
                self.new_generation_if_armed().await?;
                continue;
            }
            tokio::select! {
                _ = rx.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
    }

    /// The peers of `lost` still Connected on a link no newer than `links_before`: the
    /// engine has not processed their loss of a request yet, or they never had it.
    fn missed_on_open_links<'a>(
        st: &State,
        lost: &'a [String],
        links_before: u64,
    ) -> Vec<&'a String> {
        lost.iter()
            .filter(|p| {
                st.peers.get(*p).is_some_and(|s| {
                    s.conn == ConnectionState::Connected && s.link_id <= links_before
                })
            })
            .collect()
    }

    /// Reconnect the peers of `lost` still Connected on a link no newer than `links_before`:
    /// they may have missed a request that is on this disk, and the handshake resyncs it.
    /// Nothing while the replica closes (its peers get a clean goodbye).
    fn reconnect_missed(&self, lost: &[String], links_before: u64) {
        let st = lock(&self.st);
        if st.closed {
            return;
        }
        let missed = Self::missed_on_open_links(&st, lost, links_before);
        self.reconnect_unreplicated(&st, &missed);
    }

    /// Close the links of `peers`, Connected on a link older than a request they did not
    /// get: the reconnect's handshake resyncs the range.
    fn reconnect_unreplicated(&self, st: &State, peers: &[&String]) {
        for p in peers {
            if let Some(s) = st.peers.get(*p).and_then(|s| s.sender.as_ref()) {
                tracing::warn!(volume = %self.volume, peer = %p,
                    "connected peer did not acknowledge a request; reconnecting it to resync");
                s.close("a request was not replicated to this peer; reconnecting to resync it");
            }
        }
    }

    /// Read from the local replica (Primary and UpToDate only).
    pub async fn read(&self, offset: u64, len: u32) -> Result<Bytes, EngineError> {
        let _pending = hold(&self.stats.pending_upper, 1);
        self.admit().await?;
        self.check_range(offset, u64::from(len))?;
        let Some(dev) = self.device.clone() else {
            return Err(EngineError::Diskless {
                volume: self.volume.clone(),
            });
        };
        let volume = self.volume.clone();
        let started = Instant::now();
        let read = match dev.read_async(offset, len as usize) {
            Some(read) => read.await.map_err(|source| EngineError::Device {
                volume,
                op: "read",
                source,
            })?,
            None => tokio::task::spawn_blocking(move || {
                dev.read_owned(offset, len as usize)
                    .map_err(|source| EngineError::Device {
                        volume: volume.clone(),
                        op: "read",
                        source,
                    })
            })
            .await
            .map_err(|e| {
                EngineError::InvalidRequest(format!("{}: read task: {e}", self.volume))
            })??,
        };
        self.stats.read.observe(started.elapsed(), None);
        IoStats::add(&self.stats.read_bytes, u64::from(len));
        Ok(read)
    }

    /// This replica's I/O statistics (latencies, bytes, metadata writes).
    pub fn io_stats(&self) -> Arc<IoStats> {
        Arc::clone(&self.stats)
    }

    /// Replicated write.
    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), EngineError> {
        let _pending = hold(&self.stats.pending_upper, 1);
        let p = self.admit().await?;
        let len = data.len() as u64;
        self.modify("write", offset, len, p, Op::Write { data, fua })
            .await
    }

    /// Replicated flush (under C: returns after every connected peer flushed; a peer lost
    /// before its FlushAck holds the flush like a write, see `hold_after_peer_loss`).
    pub async fn flush(&self) -> Result<(), EngineError> {
        let _pending = hold(&self.stats.pending_upper, 1);
        // Like a write, a flush starts the generation a promotion with a peer away or a
        // peer loss armed: what it makes durable is then newer than what that peer holds
        // (at equal generations a handshake could resync it away, e.g. between two
        // crashed Primaries; found by the role simulator).
        let p = loop {
            let p = self.admit().await?;
            let _gate = self.io_gate.read().await;
            if self.new_generation_if_armed().await? {
                break p;
            }
        };
        let links_before = self.link_ids();
        let done = p
            .flush_request()
            .await
            .map_err(|source| EngineError::Datapath {
                volume: self.volume.clone(),
                op: "flush",
                source,
            })?;
        self.stats.flush.observe(done.local, done.peers);
        self.ack_gate(&done, links_before).await
    }

    /// Replicated discard.
    pub async fn trim(&self, offset: u64, len: u64) -> Result<(), EngineError> {
        let _pending = hold(&self.stats.pending_upper, 1);
        self.check_range(offset, len)?;
        for (offset, len) in self.range_parts(offset, len) {
            let p = self.admit().await?;
            let trim = Op::Trim { len, fua: false };
            self.modify("trim", offset, len, p, trim).await?;
        }
        Ok(())
    }

    /// Replicated write-zeroes.
    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
    ) -> Result<(), EngineError> {
        let _pending = hold(&self.stats.pending_upper, 1);
        self.check_range(offset, len)?;
        for (offset, len) in self.range_parts(offset, len) {
            let p = self.admit().await?;
            let zeroes = Op::WriteZeroes {
                len,
                may_unmap,
                fua: false,
            };
            self.modify("write zeroes", offset, len, p, zeroes).await?;
        }
        Ok(())
    }

    /// A trim or write-zeroes range in parts that each take at most half the activity log
    /// (and at most 1 GiB), on this node and on every peer: a request over more extents
    /// than the log holds could never be admitted. Parts are issued one after another; a
    /// failure leaves the earlier parts done, as any failed request may leave part of its
    /// range written.
    fn range_parts(&self, offset: u64, len: u64) -> impl Iterator<Item = (u64, u64)> {
        let extents = lock(&self.al)
            .as_ref()
            .map_or(MIN_AL_EXTENTS, |al| al.capacity());
        let part = (extents as u64 / 2 * EXTENT_SIZE).clamp(EXTENT_SIZE, 1 << 30);
        let end = offset.saturating_add(len);
        (0..len.div_ceil(part)).map(move |i| {
            let start = offset + i * part;
            (start, part.min(end - start))
        })
    }

    // ----- lifecycle -----

    /// Clean close: demote, say goodbye to the peers, flush bitmaps, mark clean shutdown.
    pub(super) async fn close(&self) -> Result<(), EngineError> {
        let was_primary = lock(&self.st).role == Role::Primary;
        if was_primary {
            self.demote().await?;
        }
        let _gate = self.io_gate.clone().write_owned().await;
        {
            let mut st = lock(&self.st);
            st.closed = true;
        }
        // Goodbye: peers count us as "left gracefully" (last man standing). Each link ends
        // once the goodbye is written (within a second), then everything stops.
        self.broadcast_state();
        let links: Vec<LinkSender> = lock(&self.st)
            .peers
            .values()
            .filter(|p| p.conn == ConnectionState::Connected)
            .filter_map(|p| p.sender.clone())
            .collect();
        for link in &links {
            link.close_after_queued("replica closed");
        }
        for link in links {
            link.closed().await;
        }
        self.abort();
        let Some(me) = self.arc() else {
            return Ok(());
        };
        let volume = self.volume.clone();
        tokio::task::spawn_blocking(move || {
            let store = lock(&me.meta).take();
            let Some(store) = store else {
                return Ok(());
            };
            let meta = me.meta_snapshot(&lock(&me.st));
            let mut bms = lock(&me.bitmaps);
            store
                .close_clean(&meta, &mut bms)
                .map_err(meta_err(&me.volume, "closing"))
        })
        .await
        .map_err(|e| EngineError::InvalidRequest(format!("{volume}: close task: {e}")))?
    }

    /// Stop every task and drop every link without touching the metadata (a crash, as far
    /// as the metadata knows).
    pub(super) fn abort(&self) {
        let tasks: Vec<JoinHandle<()>> = std::mem::take(&mut *lock(&self.tasks));
        for t in tasks {
            t.abort();
        }
        let mut st = lock(&self.st);
        st.closed = true;
        for p in st.peers.values_mut() {
            if let Some(s) = p.sender.take() {
                s.close("replica closed");
            }
            if let Some(t) = p.resync_task.take() {
                t.abort();
            }
            if let Some(s) = p.dual_sender.take() {
                s.close("replica closed");
            }
        }
        if let Some(p) = st.primary.take() {
            for peer in p.connected_peers() {
                p.disconnect_peer(&peer, "replica closed");
            }
        }
        drop(st);
        self.notify();
    }
}

/// How long a Secondary's write waits for room in the activity log before it fails (see
/// [`Replica::al_begin_blocking`]).
const PEER_WRITE_AL_WAIT: Duration = Duration::from_secs(10);

/// What [`Holds`] release for a write, trim or write-zeroes once it is over (see
/// [`Replica::modify`]): its record as a local write in flight, then its activity-log
/// extents (the I/O gate is released by the holds right after). A type of its own, not
/// `Replica`, so that no holder of a replica can release a request's holds.
struct WriteHoldsOwner(Weak<Replica>);

impl ReleaseHolds for WriteHoldsOwner {
    fn release_holds(&self, offset: u64, len: u64, tag: u64) {
        if let Some(replica) = self.0.upgrade() {
            replica.writes.end_tag(tag);
            replica.al_end(offset, len);
        }
    }

    fn unacknowledged_after_cancel(&self, peers: &[String], links_before: u64) {
        if let Some(replica) = self.0.upgrade() {
            replica.reconnect_missed(peers, links_before);
        }
    }
}

/// Reconnects, when dropped unless `done`, the peers of `lost` still Connected on a link
/// no newer than `links_before` ([`Replica::reconnect_missed`]). Without it a request
/// whose caller gave up in [`Replica::hold_after_peer_loss`], or that failed there
/// (demoted, no quorum) before the links were closed, left such a peer Connected and
/// silently different until some later reconnect (found by review). A caller that gave up
/// earlier, while the request was in the data path, is covered by
/// [`ReleaseHolds::unacknowledged_after_cancel`].
struct ReconnectUnreplicated<'a> {
    replica: &'a Replica,
    lost: &'a [String],
    links_before: u64,
    /// The links were closed already.
    done: bool,
}

impl Drop for ReconnectUnreplicated<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.replica.reconnect_missed(self.lost, self.links_before);
        }
    }
}

/// Activity-log extents taken for one write: released (`al_end`) on drop.
struct AlHold<'a> {
    replica: &'a Replica,
    offset: u64,
    len: u64,
}

impl AlHold<'_> {
    /// Keep the extents taken; the caller releases them with `al_end`.
    fn keep(self) {
        std::mem::forget(self);
    }
}

impl Drop for AlHold<'_> {
    fn drop(&mut self) {
        self.replica.al_end(self.offset, self.len);
    }
}
