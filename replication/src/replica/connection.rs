//! Connections of one replica: who dials (the node whose name sorts first; reconnect
//! forever with backoff), the state exchange after Hello, the sync decision on both sides,
//! the link's use afterwards (data path as Primary or Secondary, idle, or a tiebreaker's
//! control link), and what a lost link means (new generation armed, quorum re-evaluated,
//! the peer outdated through the tiebreaker).
//!
//! Resync hand-over: a bitmap or full resync sets the pair to SyncSource/SyncTarget (the
//! target Inconsistent, durably), the target sends its bitmap so the source resyncs the
//! union, then the source runs `resync::run_resync_source` on the link (attached to the
//! data path when it is Primary) and the target applies it in `run_secondary` with the
//! engine's hooks (`sync.rs`). A Secondary following a Primary may also ask it for a
//! resync on the live link, outside any handshake (`reconcile.rs`).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::handshake::{self, Handshake, Plan, Refusal};
use super::messages::{EngineMessage, OutdateResult, PeerState, MSG_STATE};
use super::outdate::{send_outdate_reply, tiebreakers};
use super::volume::{lock, LinkMode, Replica};
use std::sync::atomic::AtomicBool;

use super::reconcile::{ReconcileHooks, RecordingDevice};
use super::sync::TargetHooks;
use crate::datapath::{run_secondary, SecondaryConfig};
use crate::failure_log::error_chain;
use crate::link::{LinkReceiver, PeerLink};
use crate::quorum::QuorumMode;
use crate::resync::ResyncTargetHooks;
use crate::role::{ConnectionState, DiskState, ReplicationState, Role};
use crate::sync_decision::{decide, DecisionContext, Direction, SyncDecision, SyncOutcome};
use crate::wire::Message;

/// How long the peer may take to send its state after Hello.
const STATE_TIMEOUT: Duration = Duration::from_secs(10);
/// Reconnect backoff: the first retry (the cap is `EngineTunables::reconnect_interval`).
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// How long a Secondary link's end waits for the engine messages still queued from it.
const HANDLER_DRAIN: Duration = Duration::from_millis(500);

/// Why a link task ended.
type LinkEnd = String;

impl Replica {
    /// Start one dialer per peer whose name sorts after ours.
    pub(super) fn start_dialers(&self) {
        let Some(me) = self.arc() else { return };
        let peers: Vec<(String, std::net::SocketAddr)> = {
            let st = lock(&self.st);
            st.peers
                .values()
                .filter(|p| p.dialer)
                .map(|p| (p.spec.name.clone(), p.spec.replication))
                .collect()
        };
        for (peer, addr) in peers {
            let me = me.clone();
            self.spawn(async move { me.dial_loop(peer, addr).await });
        }
    }

    pub(super) async fn dial_loop(self: Arc<Self>, peer: String, addr: std::net::SocketAddr) {
        let backoff_max = self.node.cfg.tunables.reconnect_interval.max(BACKOFF_MIN);
        let mut backoff = BACKOFF_MIN;
        loop {
            {
                // Closed, or the peer was removed from the volume (`membership.rs`).
                let st = lock(&self.st);
                if st.closed || !st.peers.contains_key(&peer) {
                    return;
                }
            }
            let hello = self.our_hello();
            match PeerLink::connect(addr, &self.node.cfg.secret, &hello, &self.node.cfg.link).await
            {
                Ok(link) => {
                    if link.info.hello.node != peer {
                        tracing::warn!(volume = %self.volume, expected = %peer, got = %link.info.hello.node,
                            "peer at {addr} is another node; check the node list");
                        link.sender.close("unexpected node");
                        self.set_last_error(
                            &peer,
                            format!("{addr} answered as {}", link.info.hello.node),
                        );
                    } else if self.clone().run_link(link).await {
                        backoff = BACKOFF_MIN;
                    }
                }
                Err(e) => {
                    tracing::debug!(volume = %self.volume, peer = %peer, error = %e, "connect failed");
                    self.set_last_error(&peer, format!("connecting to {addr}: {e}"));
                }
            }
            // A split-brain pair keeps re-running the handshake (deterministic: nothing is
            // overwritten) so that `resolve` on either node takes effect.
            let standalone = lock(&self.st)
                .peers
                .get(&peer)
                .is_some_and(|p| p.conn == ConnectionState::StandAlone);
            let wait = if standalone {
                Duration::from_secs(1).min(backoff_max)
            } else {
                backoff
            };
            let mut rx = self.changed.subscribe();
            let kicked = async {
                // A resolve request wakes a StandAlone dialer early.
                loop {
                    if rx.changed().await.is_err() {
                        return;
                    }
                    let resolving = {
                        let st = lock(&self.st);
                        st.discard_my_data || st.discard_peer_data
                    };
                    if standalone && resolving {
                        return;
                    }
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = kicked => {}
            }
            backoff = (backoff * 2).min(backoff_max);
        }
    }

    fn set_last_error(&self, peer: &str, err: String) {
        if let Some(p) = lock(&self.st).peers.get_mut(peer) {
            p.last_error = Some(err);
        }
    }

    /// An authenticated link accepted by the node's listener.
    pub(super) fn incoming_link(&self, link: PeerLink) {
        let Some(me) = self.arc() else { return };
        self.spawn(async move {
            me.run_link(link).await;
        });
    }

    /// Run one link to its end; true if it got past the handshake.
    async fn run_link(self: Arc<Self>, link: PeerLink) -> bool {
        let peer = link.info.hello.node.clone();
        let id = {
            let mut st = lock(&self.st);
            if st.closed {
                link.sender.close("replica closed");
                return false;
            }
            let link_id = st.last_link_id + 1;
            let Some(slot) = st.peers.get_mut(&peer) else {
                link.sender.close("not a member of this volume");
                return false;
            };
            if let Some(old) = slot.sender.replace(link.sender.clone()) {
                old.close("replaced by a new connection");
            }
            // `hold_after_peer_loss` relies on link ids growing across every peer: a slot's
            // id is 0 or taken from `last_link_id`, never set any other way.
            debug_assert!(slot.link_id < link_id, "link ids only grow");
            slot.link_id = link_id;
            slot.mode = LinkMode::None;
            // No state broadcasts into a link that is still in its handshake.
            if slot.conn == ConnectionState::Connected {
                slot.lost_at = Some(tokio::time::Instant::now());
                slot.conn = ConnectionState::Connecting;
            }
            st.last_link_id = link_id;
            link_id
        };
        let (ok, reason) = match self.serve_link(&peer, id, link).await {
            Ok(reason) => (true, reason),
            Err(reason) => (false, reason),
        };
        self.link_down(&peer, id, reason).await;
        ok
    }

    /// Handshake, then use the link until it goes down.
    async fn serve_link(
        self: &Arc<Self>,
        peer: &str,
        id: u64,
        link: PeerLink,
    ) -> Result<LinkEnd, LinkEnd> {
        let PeerLink {
            info,
            sender,
            mut receiver,
        } = link;
        let peer_diskless = lock(&self.st)
            .peers
            .get(peer)
            .is_some_and(|p| p.spec.diskless);
        let data_pair = !peer_diskless && self.device.is_some();
        // A Primary holds new writes while it exchanges state with a data peer, so the
        // generations and bitmaps exchanged are exactly what the decision acts on.
        let gate = if data_pair && lock(&self.st).role == Role::Primary {
            Some(self.io_gate.clone().write_owned().await)
        } else {
            None
        };
        let mine = {
            let st = lock(&self.st);
            self.local_state(&st, peer, true)
        };
        sender
            .send(&EngineMessage::State(Box::new(mine.clone())).to_message())
            .await
            .map_err(|e| format!("sending state: {e}"))?;
        let theirs = match tokio::time::timeout(STATE_TIMEOUT, recv_state(&mut receiver)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                sender.close(&e);
                return Err(e);
            }
            Err(_) => {
                let e = format!("no state from {peer} within {STATE_TIMEOUT:?}");
                sender.close(&e);
                return Err(e);
            }
        };
        if theirs.diskless != peer_diskless {
            tracing::warn!(volume = %self.volume, peer, "peer's diskless flag differs from the node list");
        }

        if !data_pair {
            // Control link: a tiebreaker, or we are one.
            let (lost, behind, outdates) = {
                let mut st = lock(&self.st);
                if st.peers.get(peer).is_some_and(|slot| slot.link_id != id) {
                    return Err("superseded".into());
                }
                let (_, behind) = self.note_generations(&mut st, peer, &theirs);
                if let Some(slot) = st.peers.get_mut(peer) {
                    slot.conn = ConnectionState::Connected;
                    slot.replication = ReplicationState::Established;
                    slot.state = Some(theirs);
                    slot.mode = LinkMode::Idle;
                    slot.left_gracefully = false;
                    slot.last_error = None;
                }
                Self::twopc_link_up(&mut st, peer);
                // Outdate requests sent through an earlier link to a tiebreaker may be
                // lost with it: ask again through this one, with our lineage as it is now
                // (a target that moved on meanwhile answers Stale).
                let outdates: Vec<Message> =
                    if peer_diskless && st.role == Role::Primary && behind.is_none() {
                        st.pending_outdates
                            .iter()
                            .map(|(t, id)| self.outdate_request(&st, *id, t))
                            .collect()
                    } else {
                        Vec::new()
                    };
                (self.recompute_quorum(&mut st), behind, outdates)
            };
            if lost {
                let _ = self.persist().await;
            }
            for msg in outdates {
                let _ = sender.send_control(&msg);
            }
            tracing::info!(volume = %self.volume, peer, "control link up");
            if let Some((newer_on, lineage)) = behind {
                self.left_behind(&newer_on, peer, Some(&lineage)).await;
            }
            self.broadcast_state();
            return self.control_loop(peer, receiver).await;
        }

        let Some(peer_uuids) = theirs.uuids.clone() else {
            let e = format!("{peer} sent no generations although it is a data replica");
            sender.close(&e);
            return Err(e);
        };
        let Some(my_uuids) = mine.uuids.clone() else {
            return Err("no local generations".into());
        };
        let protocol = lock(&self.st).options.protocol;
        let ctx = DecisionContext {
            local_name: self.node_name(),
            peer_name: peer,
            protocol,
        };
        let decision = decide(&my_uuids, &peer_uuids, &ctx);
        let (after_split_brain, frozen) = {
            let st = lock(&self.st);
            (st.options.after_split_brain, st.io_suspended)
        };
        let (outcome, plan) = handshake::plan(
            &Handshake {
                local_name: self.node_name(),
                peer_name: peer,
                mine: &mine,
                theirs: &theirs,
                after_split_brain,
                frozen,
            },
            &decision,
        );
        let describe = SyncDecision {
            outcome,
            rule: decision.rule,
        }
        .describe(&self.volume, self.node_name(), peer);
        tracing::info!(volume = %self.volume, peer, decision = %describe, "handshake decided");
        match plan {
            Plan::Refuse(Refusal::InconsistentSource { local }) => {
                let why = if local {
                    "this replica is Inconsistent and cannot be a resync source"
                } else {
                    "the peer is Inconsistent and cannot be a resync source"
                };
                let e = format!("{}: {describe}, but {why}", self.volume);
                tracing::warn!(volume = %self.volume, peer, "{e}; not connecting");
                {
                    let mut st = lock(&self.st);
                    if let Some(slot) = st.peers.get_mut(peer) {
                        slot.decision = Some(e.clone());
                    }
                }
                sender.close(&e);
                return Err(e);
            }
            Plan::StandAlone => {
                let text = decision.describe(&self.volume, self.node_name(), peer);
                {
                    let mut st = lock(&self.st);
                    if let Some(slot) = st.peers.get_mut(peer) {
                        if slot.split_brain.as_deref() != Some(text.as_str()) {
                            tracing::error!(volume = %self.volume, peer, "{text}");
                        }
                        slot.conn = ConnectionState::StandAlone;
                        slot.split_brain = Some(text.clone());
                        slot.decision = Some(text.clone());
                        slot.state = Some(theirs);
                    }
                }
                self.notify();
                sender.close("split brain");
                return Err(text);
            }
            Plan::StepDown => {
                drop(gate);
                let _ = self
                    .demote_now(&format!(
                        "force-secondary: Primary without quorum met newer data on {peer}"
                    ))
                    .await;
                sender.close("reconnecting after force-secondary");
                return Err("force-secondary".into());
            }
            Plan::Refuse(Refusal::LocalPrimaryWouldBeTarget) => {
                let e = format!(
                    "{}: {describe}, but {} is Primary; demote it to let it resync",
                    self.volume,
                    self.node_name()
                );
                sender.close(&e);
                return Err(e);
            }
            Plan::Refuse(Refusal::PeerPrimaryWouldBeTarget) => {
                // The peer refuses the same way; try again later.
                sender.close("peer is Primary and would be SyncTarget");
                return Err(format!("{describe}, but {peer} is Primary"));
            }
            Plan::Refuse(Refusal::BothPrimary) => {
                let e = format!(
                    "{}: both {} and {peer} are Primary; demote one of them",
                    self.volume,
                    self.node_name()
                );
                sender.close(&e);
                return Err(e);
            }
            Plan::InSync | Plan::KeepBits | Plan::Resync { .. } => {}
        }

        // The source resyncs the union of both bitmaps: the target sends its bits.
        match plan {
            Plan::Resync {
                direction: Direction::LocalIsTarget,
                ..
            } => {
                let runs: Vec<(u64, u64)> = lock(&self.bitmaps)
                    .get(peer)
                    .map(|b| b.runs().collect())
                    .unwrap_or_default();
                for msg in EngineMessage::bitmap_runs(&runs) {
                    sender
                        .send(&msg.to_message())
                        .await
                        .map_err(|e| format!("sending the bitmap: {e}"))?;
                }
            }
            Plan::Resync {
                direction: Direction::LocalIsSource,
                ..
            } => {
                match tokio::time::timeout(STATE_TIMEOUT, self.recv_bitmap(peer, &mut receiver))
                    .await
                {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        sender.close(&e);
                        return Err(e);
                    }
                    Err(_) => {
                        let e = format!("no bitmap from {peer} within {STATE_TIMEOUT:?}");
                        sender.close(&e);
                        return Err(e);
                    }
                }
            }
            _ => {}
        }

        // Act on the plan.
        match plan {
            Plan::InSync => self.apply_in_sync(peer, theirs.disk).await,
            Plan::Resync { direction, full } => self.start_resync(peer, direction, full).await,
            _ => {}
        }
        let must_persist = {
            let mut st = lock(&self.st);
            if let Some(slot) = st.peers.get_mut(peer) {
                if slot.link_id != id {
                    return Err("superseded".into());
                }
                slot.conn = ConnectionState::Connected;
                slot.replication = match plan {
                    Plan::Resync {
                        direction: Direction::LocalIsSource,
                        ..
                    } => ReplicationState::SyncSource,
                    Plan::Resync {
                        direction: Direction::LocalIsTarget,
                        ..
                    } => ReplicationState::SyncTarget,
                    _ => ReplicationState::Established,
                };
                slot.split_brain = None;
                slot.decision = Some(describe);
                slot.state = Some(theirs);
                slot.left_gracefully = false;
                slot.last_error = None;
            }
            // The peer is back in the set receiving our writes: nothing to outdate.
            st.pending_outdates.remove(peer);
            Self::twopc_link_up(&mut st, peer);
            st.discard_my_data = false;
            st.discard_peer_data = false;
            let reclaimed = self.reclaim_up_to_date(&mut st);
            self.recompute_quorum(&mut st) || reclaimed
        };
        if must_persist {
            let _ = self.persist().await;
        }
        self.broadcast_state();
        self.data_link(
            peer,
            id,
            PeerLink {
                info,
                sender,
                receiver,
            },
            gate,
        )
        .await
    }

    /// Receive the target's bitmap runs and merge them into ours for `peer`.
    async fn recv_bitmap(&self, peer: &str, receiver: &mut LinkReceiver) -> Result<(), String> {
        loop {
            let Some(msg) = receiver.recv().await else {
                return Err("link closed during the bitmap exchange".into());
            };
            let Message::Extension {
                msg_type, payload, ..
            } = msg
            else {
                return Err(format!(
                    "expected the peer's bitmap, got message type {:#06x}",
                    msg.msg_type()
                ));
            };
            match EngineMessage::decode(msg_type, &payload) {
                Ok(EngineMessage::BitmapRuns { runs, last }) => {
                    {
                        let mut bms = lock(&self.bitmaps);
                        let Some(bm) = bms.get_mut(peer) else {
                            return Err(format!("no bitmap for {peer}"));
                        };
                        for (o, l) in runs {
                            bm.set_range(o, l)
                                .map_err(|e| format!("peer's bitmap run: {e}"))?;
                        }
                    }
                    if last {
                        return Ok(());
                    }
                }
                // A state update overtaking the exchange is harmless.
                Ok(EngineMessage::State(_)) => {}
                Ok(_) => return Err("unexpected message during the bitmap exchange".into()),
                Err(e) => return Err(format!("bad bitmap message: {e}")),
            }
        }
    }

    /// "No sync": clear the pair's slot and bits, confirm the disk state.
    async fn apply_in_sync(&self, peer: &str, peer_disk: DiskState) {
        {
            let mut st = lock(&self.st);
            st.uuids.in_sync_with(peer);
            let disk =
                crate::role::disk_state_after_handshake(st.disk, SyncOutcome::NoSync, peer_disk);
            if disk == DiskState::UpToDate {
                st.uuids.flags.was_up_to_date = true;
                st.uuids.flags.consistent = true;
            }
            st.disk = disk;
            if let Some(bm) = lock(&self.bitmaps).get_mut(peer) {
                bm.clear_all();
            }
        }
        if let Err(e) = self.flush_bitmap(peer).await {
            tracing::error!(volume = %self.volume, peer, error = %error_chain(&e), "persisting the bitmap");
        }
        if let Err(e) = self.persist().await {
            tracing::error!(volume = %self.volume, peer, error = %error_chain(&e), "persisting the superblock");
        }
    }

    /// Enter SyncSource/SyncTarget. The target is Inconsistent (durably) until the resync
    /// finishes; the transfer itself starts with the link's data mode (`data_link`).
    pub(super) async fn start_resync(&self, peer: &str, dir: Direction, full: bool) {
        {
            let mut st = lock(&self.st);
            match dir {
                Direction::LocalIsTarget => {
                    st.disk = DiskState::Inconsistent;
                    st.uuids.flags.consistent = false;
                }
                Direction::LocalIsSource => {
                    if matches!(st.disk, DiskState::Consistent) {
                        st.disk = DiskState::UpToDate;
                    }
                    if full {
                        if let Some(bm) = lock(&self.bitmaps).get_mut(peer) {
                            bm.set_all();
                        }
                    }
                }
            }
        }
        if let Err(e) = self.persist().await {
            tracing::error!(volume = %self.volume, peer, error = %error_chain(&e), "persisting the resync start");
        }
        tracing::info!(volume = %self.volume, peer, ?dir, full, "resync starts");
    }

    /// Use an established data link according to the roles, until it goes down.
    async fn data_link(
        self: &Arc<Self>,
        peer: &str,
        id: u64,
        link: PeerLink,
        gate: Option<tokio::sync::OwnedRwLockWriteGuard<()>>,
    ) -> Result<LinkEnd, LinkEnd> {
        let mut link = link;
        let mut gate = gate;
        loop {
            let (
                i_am_primary,
                primary,
                peer_is_primary,
                replication,
                source_uuids,
                local_current_at_start,
            ) = {
                let st = lock(&self.st);
                let slot = st.peers.get(peer);
                (
                    st.role == Role::Primary,
                    st.primary.clone(),
                    slot.and_then(|p| p.state.as_ref())
                        .is_some_and(|s| s.role == Role::Primary),
                    slot.map(|p| p.replication).unwrap_or(ReplicationState::Off),
                    slot.and_then(|p| p.state.as_ref())
                        .and_then(|s| s.uuids.clone()),
                    st.uuids.current,
                )
            };
            if i_am_primary {
                let Some(primary) = primary else {
                    return Err("Primary without data path".into());
                };
                let sender = link.sender.clone();
                primary.attach_peer(link);
                // Mode and resync state read together: a reconciliation request that
                // arrives meanwhile (`reconcile.rs`) either finds the link attached and
                // starts the resync itself, or marks SyncSource for this check.
                let syncing = {
                    let mut st = lock(&self.st);
                    match st.peers.get_mut(peer) {
                        Some(slot) if slot.link_id == id => {
                            slot.mode = LinkMode::Attached;
                            slot.replication == ReplicationState::SyncSource
                        }
                        _ => false,
                    }
                };
                self.notify();
                drop(gate.take());
                if syncing {
                    self.spawn_resync_source(peer, id, sender.clone());
                }
                sender.closed().await;
                return Ok(sender
                    .down_reason()
                    .map(|r| r.to_string())
                    .unwrap_or_else(|| "link closed".into()));
            }
            drop(gate.take());
            let target = replication == ReplicationState::SyncTarget;
            if peer_is_primary || target {
                let Some(device) = self.device.clone() else {
                    return Err("diskless".into());
                };
                let follower = peer_is_primary && !target;
                let stepped_down_tail = {
                    let mut st = lock(&self.st);
                    if let Some(slot) = st.peers.get_mut(peer).filter(|s| s.link_id == id) {
                        slot.follower_link = follower;
                    }
                    if follower {
                        self.settle_stepped_down_tail(&mut st, peer)
                    } else {
                        None
                    }
                };
                // Marked as a follower before anybody can see it in Secondary mode.
                self.set_mode(peer, id, LinkMode::Secondary);
                if let Some(marked) = stepped_down_tail {
                    self.lost_primary_tail_marked(marked).await;
                }
                let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
                let me = self.clone();
                let p = peer.to_string();
                let mut handler = tokio::spawn(async move {
                    while let Some(msg) = rx.recv().await {
                        me.handle_extension(&p, msg).await;
                    }
                });
                let resync_target = match (target, source_uuids) {
                    (true, Some(source_uuids)) => {
                        let hooks = Arc::new(TargetHooks {
                            replica: self.me.clone(),
                            source: peer.to_string(),
                            source_uuids,
                            local_current_at_start,
                            wrote: AtomicBool::new(false),
                        });
                        Some(ResyncTargetHooks(hooks))
                    }
                    // Following a Primary: a reconciliation may run on this link.
                    _ if peer_is_primary => Some(ResyncTargetHooks(Arc::new(ReconcileHooks {
                        replica: self.me.clone(),
                        primary: peer.to_string(),
                        link_id: id,
                    }))),
                    _ => None,
                };
                let cfg = SecondaryConfig {
                    extensions: Some(tx),
                    resync_target,
                    write_intent: Some(self.peer_write_intent()),
                    local_failures: self.local_failures.clone(),
                    ..SecondaryConfig::default()
                };
                let device = self.peer_write_guard(device, peer, &link.sender);
                let device: Arc<dyn crate::device::BackingDevice> = Arc::new(RecordingDevice {
                    inner: device,
                    recent: self.recent_peer_writes.clone(),
                });
                if peer_is_primary && !target {
                    let me = self.clone();
                    let p = peer.to_string();
                    self.spawn(async move { me.reconcile_with_primary(p, id).await });
                }
                let res = run_secondary(link, device, cfg).await;
                // Engine messages that arrived before the link went down (e.g. the
                // Primary's last state) are handled before the loss is.
                let drained = tokio::time::timeout(HANDLER_DRAIN, &mut handler).await;
                if drained.is_err() {
                    handler.abort();
                }
                return match res {
                    Ok(down) => Ok(down.to_string()),
                    // The whole chain: the status and the link-down line name the OS error.
                    Err(e) => Err(error_chain(&e)),
                };
            }
            // Both Secondary: idle until one side promotes. A resync to a Secondary
            // target runs from here with this node's device as the source.
            self.set_mode(peer, id, LinkMode::Idle);
            let resyncing = replication == ReplicationState::SyncSource;
            if resyncing {
                self.spawn_resync_source(peer, id, link.sender.clone());
            }
            let mut rx = self.changed.subscribe();
            loop {
                tokio::select! {
                    msg = link.receiver.recv() => {
                        let Some(msg) = msg else {
                            return Ok(link.receiver.down_reason().map(|r| r.to_string()).unwrap_or_else(|| "link closed".into()));
                        };
                        self.handle_extension(peer, msg).await;
                        let promoted = lock(&self.st).peers.get(peer).and_then(|p| p.state.as_ref()).is_some_and(|s| s.role == Role::Primary);
                        if promoted {
                            break;
                        }
                    }
                    changed = rx.changed() => {
                        if changed.is_err() {
                            return Err("replica gone".into());
                        }
                        let (closed, promoted) = {
                            let st = lock(&self.st);
                            (st.closed, st.role == Role::Primary && st.primary.is_some())
                        };
                        if closed {
                            return Err("closed".into());
                        }
                        if promoted {
                            let still_resyncing = lock(&self.st)
                                .peers
                                .get(peer)
                                .is_some_and(|p| p.replication == ReplicationState::SyncSource);
                            if still_resyncing {
                                // The resync read the device without the Primary's range
                                // lock; restart it under the Primary (reconnect resumes
                                // from the bitmap).
                                link.sender.close("promoted during resync; resuming as Primary");
                                return Err("promoted during resync".into());
                            }
                            break;
                        }
                    }
                }
            }
        }
    }

    fn set_mode(&self, peer: &str, id: u64, mode: LinkMode) {
        if let Some(slot) = lock(&self.st).peers.get_mut(peer) {
            if slot.link_id == id {
                slot.mode = mode;
            }
        }
        self.notify();
    }

    /// A control link (to or from a tiebreaker): state updates and the outdate relay.
    async fn control_loop(
        self: &Arc<Self>,
        peer: &str,
        mut receiver: LinkReceiver,
    ) -> Result<LinkEnd, LinkEnd> {
        while let Some(msg) = receiver.recv().await {
            self.handle_extension(peer, msg).await;
        }
        Ok(receiver
            .down_reason()
            .map(|r| r.to_string())
            .unwrap_or_else(|| "link closed".into()))
    }

    /// An engine message from `peer` (any link mode).
    pub(super) async fn handle_extension(&self, peer: &str, msg: Message) {
        let Message::Extension {
            msg_type,
            flags,
            payload,
        } = msg
        else {
            return;
        };
        if crate::resync::proto::is_resync_type(msg_type) {
            // Replies for a resync/verify session running on this node.
            let tx = lock(&self.st)
                .peers
                .get(peer)
                .and_then(|p| p.resync_replies.clone());
            match tx {
                Some(tx) => {
                    let _ = tx.send(Message::Extension {
                        msg_type,
                        flags,
                        payload,
                    });
                }
                None => {
                    tracing::debug!(volume = %self.volume, peer, msg_type, "resync message without a session; ignored")
                }
            }
            return;
        }
        if !EngineMessage::is_engine_type(msg_type) {
            tracing::debug!(volume = %self.volume, peer, msg_type, "unknown extension message; ignored");
            return;
        }
        let msg = match EngineMessage::decode(msg_type, &payload) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(volume = %self.volume, peer, error = %e, "bad engine message; disconnecting");
                if let Some(s) = lock(&self.st)
                    .peers
                    .get(peer)
                    .and_then(|p| p.sender.clone())
                {
                    s.close_with_error(crate::wire::error_code::PROTOCOL, &e.to_string());
                }
                return;
            }
        };
        match msg {
            EngineMessage::State(s) => {
                let (relay, behind, refollow) = {
                    let mut st = lock(&self.st);
                    if !st.peers.contains_key(peer) {
                        return;
                    }
                    let (seen_changed, behind) = self.note_generations(&mut st, peer, &s);
                    let i_am_secondary = st.role != Role::Primary;
                    let Some(slot) = st.peers.get_mut(peer) else {
                        return;
                    };
                    if s.leaving {
                        slot.left_gracefully = true;
                    }
                    // The Primary we follow stepped down cleanly (every write of it reached
                    // us and every other connected peer): its tail needs no reconciliation.
                    let stepped_down = slot.mode == LinkMode::Secondary
                        && s.role != Role::Primary
                        && slot.state.as_ref().is_some_and(|o| o.role == Role::Primary);
                    if stepped_down {
                        lock(&self.recent_peer_writes).take();
                    }
                    // The peer that resynced this replica on this link (or is resyncing
                    // it: a resync from a Primary) is Primary, and this replica has bits for
                    // it, marked since the resync (whose end cleared the others), e.g. a
                    // lost Primary's last writes: they would stay, as only a link set up to
                    // follow a Primary reconciles (`reconcile.rs`). The link is set up
                    // again, so the handshake resyncs them. The peer's bits for this
                    // replica do not count: a state it sent before its side of the resync
                    // ended may still show them.
                    let refollow = (i_am_secondary
                        && slot.mode == LinkMode::Secondary
                        && !slot.follower_link
                        && slot.replication == ReplicationState::Established
                        && s.role == Role::Primary
                        && lock(&self.bitmaps)
                            .get(peer)
                            .is_some_and(|b| b.dirty_blocks() > 0))
                    .then(|| slot.sender.clone())
                    .flatten();
                    let changed_view = slot
                        .state
                        .as_ref()
                        .is_none_or(|old| old.role != s.role || old.primaries != s.primaries);
                    slot.state = Some(*s);
                    // So are its writes from before this node stepped down (`dual.rs`).
                    if stepped_down {
                        st.stepped_down_tail.take_if(|(p, _)| p == peer);
                    }
                    self.recompute_quorum(&mut st);
                    // A tiebreaker passes role and generation changes on to the others.
                    (
                        (changed_view || seen_changed) && self.device.is_none(),
                        behind,
                        refollow,
                    )
                };
                if relay {
                    self.broadcast_state();
                }
                self.notify();
                if let Some(s) = refollow {
                    s.close("bits for the Primary on a link set up for a resync; setting it up again to resync them");
                }
                if let Some((newer_on, lineage)) = behind {
                    self.left_behind(&newer_on, peer, Some(&lineage)).await;
                }
            }
            EngineMessage::NewCurrent { generation, .. } => {
                lock(&self.st).uuids.follow_new_current(generation);
                match self.persist().await {
                    // The Primary learns that this replica holds its new generation
                    // (`UuidSet::on_peer_lost_behind`). Only the Primary: a tiebreaker
                    // relaying it could tell a replica that has not followed yet that it
                    // was left behind.
                    Ok(()) => self.send_state_to(peer),
                    Err(e) => {
                        tracing::error!(volume = %self.volume, error = %error_chain(&e), "persisting a new generation")
                    }
                }
            }
            EngineMessage::Outdate {
                id,
                target,
                requester,
                generation,
            } => {
                self.on_outdate(peer, id, target, requester, generation)
                    .await
            }
            // Outside a handshake: a Secondary following us asks for a reconciliation.
            EngineMessage::BitmapRuns { runs, last } => self.on_reconcile_bits(peer, runs, last),
            EngineMessage::PromotePrepare { id, two_primaries } => {
                self.on_promote_prepare(peer, id, two_primaries)
            }
            EngineMessage::PromoteReply { id, answer } => self.on_promote_reply(peer, id, answer),
            EngineMessage::PromoteDecision { id, commit } => {
                self.on_promote_decision(peer, id, commit)
            }
            EngineMessage::OutdateReply {
                id,
                target,
                requester,
                result,
            } => {
                self.on_outdate_reply(peer, id, target, requester, result)
                    .await
            }
        }
    }

    /// The link to `peer` went down.
    async fn link_down(&self, peer: &str, id: u64, reason: String) {
        let mut unreachable = Vec::new();
        let lost_primary_tail;
        let (lost_quorum, outdate) = {
            let mut st = lock(&self.st);
            let i_am_primary = st.role == Role::Primary;
            let another_primary = Self::another_primary(&st);
            let Some(slot) = st.peers.get_mut(peer) else {
                return;
            };
            if slot.link_id != id {
                return;
            }
            let was_connected = slot.conn == ConnectionState::Connected;
            let followed = slot.mode == LinkMode::Secondary;
            let peer_was_primary = slot.state.as_ref().is_some_and(|s| s.role == Role::Primary);
            // The generation an in-sync peer last reported holding (it reports each one it
            // follows, once it is durable; a report may still be on its way).
            let peer_generation = slot
                .state
                .as_ref()
                .filter(|s| {
                    slot.replication == ReplicationState::Established
                        && s.disk == DiskState::UpToDate
                })
                .and_then(|s| s.uuids.as_ref())
                .map(|u| u.current);
            let data_peer = !slot.spec.diskless;
            slot.sender = None;
            if st.closed {
                // This replica is closing and ended its links itself (after its goodbye):
                // nothing of the peer's absence needs handling.
                return;
            }
            let Some(slot) = st.peers.get_mut(peer) else {
                return;
            };
            slot.mode = LinkMode::None;
            slot.follower_link = false;
            slot.replication = ReplicationState::Off;
            slot.resync_replies = None;
            slot.resync_progress = None;
            // A reconciliation ends with its link; the replica stays Inconsistent (with its
            // bits) until a handshake resyncs it.
            slot.reconciling = false;
            if let Some(t) = slot.resync_task.take() {
                t.abort();
            }
            if let Some(d) = slot.dual_sender.take() {
                d.close("the main link to the peer went down");
            }
            if was_connected {
                slot.lost_at = Some(tokio::time::Instant::now());
            }
            if slot.conn != ConnectionState::StandAlone {
                slot.conn = ConnectionState::Connecting;
                slot.state = None;
                slot.last_error = Some(reason.clone());
            }
            if was_connected {
                tracing::warn!(volume = %self.volume, peer, reason = %reason, "peer link down");
            }
            if data_peer && was_connected && i_am_primary {
                // DRBD starts no new generation when two Primaries lose each other: without
                // quorum both may go on writing. With quorum, a Primary that goes on alone
                // does start one (the other is frozen by the outdate it cannot get, or gone),
                // or a later handshake between the two at equal generations, after both
                // crashed say, could resync its flushed writes away (found by the role
                // simulator).
                let dual_without_quorum =
                    peer_was_primary && Self::quorum_mode(&st) == QuorumMode::Off;
                st.uuids.on_peer_lost(true, dual_without_quorum);
                if let Some(g) = peer_generation.filter(|_| !another_primary) {
                    st.uuids.on_peer_lost_behind(peer, g);
                }
            }
            // A replica that loses its Primary marks the Primary's last writes towards the
            // other replicas (`reconcile.rs`), before anybody is woken: a promotion of this
            // node waiting for the loss must find the tail marked.
            lost_primary_tail = if data_peer && was_connected && peer_was_primary {
                // Its writes from before this node stepped down are part of its tail once
                // this node followed it (as a Secondary, or as the second Primary).
                if followed {
                    if let Some((_, tail)) = st.stepped_down_tail.take_if(|(p, _)| p == peer) {
                        lock(&self.recent_peer_writes).put_before(tail);
                    }
                }
                self.mark_lost_primary_tail(&st, peer)
            } else {
                None
            };
            Self::twopc_link_down(&mut st, peer);
            // A tiebreaker that forwarded an outdate to this peer will get no answer from
            // it: the requester learns it is unreachable (it cannot regain quorum through
            // the tiebreaker alone, so it cannot be promoted with stale data).
            let ids: Vec<u64> = st
                .relayed_outdates
                .iter()
                .filter(|(_, (_, target))| target == peer)
                .map(|(id, _)| *id)
                .collect();
            for id in ids {
                if let Some((requester, target)) = st.relayed_outdates.remove(&id) {
                    if let Some(s) = st.peers.get(&requester).and_then(|p| p.sender.clone()) {
                        unreachable.push((s, id, requester, target));
                    }
                }
            }
            let lost = self.recompute_quorum(&mut st);
            // Keep the lost Secondary from being promoted with stale data: outdate it
            // through a tiebreaker before writing on.
            let mut outdate = None;
            if data_peer && was_connected && st.role == Role::Primary && st.has_quorum {
                let relays = tiebreakers(&st);
                if !relays.is_empty() {
                    let rid = st.next_request_id;
                    st.next_request_id += 1;
                    st.pending_outdates.insert(peer.to_string(), rid);
                    outdate = Some((self.outdate_request(&st, rid, peer), relays));
                }
            }
            (lost, outdate)
        };
        self.notify();
        for (s, id, requester, target) in unreachable {
            send_outdate_reply(&s, id, target, requester, OutdateResult::Unreachable);
        }
        if lost_quorum {
            if let Err(e) = self.persist().await {
                tracing::error!(volume = %self.volume, error = %error_chain(&e), "persisting the lost-quorum flag");
            }
        }
        if let Some(marked) = lost_primary_tail {
            self.lost_primary_tail_marked(marked).await;
        }
        if let Some((msg, relays)) = outdate {
            for r in relays {
                let _ = r.send_control(&msg);
            }
        }
        self.broadcast_state();
    }
}

/// Read messages until the peer's State arrives.
async fn recv_state(receiver: &mut LinkReceiver) -> Result<PeerState, String> {
    let Some(msg) = receiver.recv().await else {
        return Err(receiver
            .down_reason()
            .map(|r| r.to_string())
            .unwrap_or_else(|| "link closed during the state exchange".into()));
    };
    match msg {
        Message::Extension {
            msg_type: MSG_STATE,
            payload,
            ..
        } => match EngineMessage::decode(MSG_STATE, &payload) {
            Ok(EngineMessage::State(s)) => Ok(*s),
            Ok(_) => Err("unexpected message in the state exchange".into()),
            Err(e) => Err(format!("bad state message: {e}")),
        },
        other => Err(format!(
            "expected the peer's state, got message type {:#06x}",
            other.msg_type()
        )),
    }
}
