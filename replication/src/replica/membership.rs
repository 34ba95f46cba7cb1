//! Online membership changes of one replica: a peer added to or removed from a running
//! [`Replica`] without closing it (the Primary's frontend stays connected).
//!
//! ```text
//! add_peer(spec)     metadata: bitmap slot for the peer (bitmap generation ZERO, so the
//!                    handshake decides a full sync towards a JUST_CREATED replica), durable
//!                    superblock naming it; then the peer slot (marked `joining`), the
//!                    Primary's known peers, quorum, and a dialer when our name sorts first
//! remove_peer(name)  the slot goes first (its link's end then finds nothing to handle),
//!                    its links and resync task end, the Primary forgets it; then the
//!                    superblock without it, and its bitmap file is removed
//! ```
//!
//! **Quorum while a replica joins.** A peer added here is not a voter until its first
//! handshake with this node (`PeerSlot::joining`): adding a third replica to a Primary
//! that keeps quorum through the witness (its partner dead) must not freeze its I/O while
//! the new node connects. A joining replica never held data anyone relies on, so leaving it
//! out cannot let two partitions both write. Once connected it votes like every replica.
//!
//! Crash safety: each step is idempotent. A crash after the superblock names an added peer
//! but before the daemon recorded the change re-adds the same slot at the next open (it
//! opens with the peer list of the daemon's definition; an unknown peer's slot is then
//! unused). A crash after a removed peer's superblock write leaves at most a stray bitmap
//! file, which the next `add_peer` of that name overwrites.

use super::volume::{lock, LinkMode, PeerSlot, Replica};
use super::{EngineError, PeerSpec};
use crate::bitmap::Bitmap;
use crate::generation::Generation;
use crate::role::{ConnectionState, ReplicationState};

impl Replica {
    /// Add `spec` as a new peer of this running replica (see the module doc). Adding a
    /// peer that is already a member is a no-op.
    pub async fn add_peer(&self, spec: PeerSpec) -> Result<(), EngineError> {
        if spec.name == self.node.cfg.name {
            return Err(EngineError::InvalidRequest(format!(
                "{}: cannot add this node ({}) as its own peer",
                self.volume, spec.name
            )));
        }
        if lock(&self.st).peers.contains_key(&spec.name) {
            return Ok(());
        }
        if !spec.diskless && self.device.is_some() {
            self.add_bitmap_slot(&spec.name).await?;
        }
        let dial = {
            let mut st = lock(&self.st);
            if st.closed {
                return Err(EngineError::Closed {
                    volume: self.volume.clone(),
                });
            }
            let dialer = self.node.cfg.name < spec.name;
            st.peers
                .insert(spec.name.clone(), new_slot(spec.clone(), dialer, true));
            if let Some(primary) = &st.primary {
                primary.set_known_peers(&Self::data_peers(&st));
            }
            self.recompute_quorum(&mut st);
            dialer.then_some(spec.replication)
        };
        tracing::info!(volume = %self.volume, peer = %spec.name, diskless = spec.diskless,
            "peer added to the volume");
        if let (Some(addr), Some(me)) = (dial, self.arc()) {
            let peer = spec.name.clone();
            self.spawn(async move { me.dial_loop(peer, addr).await });
        }
        self.broadcast_state();
        Ok(())
    }

    /// Remove `peer` from this running replica (see the module doc). Removing a peer that
    /// is not a member is a no-op.
    pub async fn remove_peer(&self, peer: &str) -> Result<(), EngineError> {
        let must_persist = {
            let mut st = lock(&self.st);
            let Some(mut slot) = st.peers.remove(peer) else {
                return Ok(());
            };
            if let Some(s) = slot.sender.take() {
                s.close("removed from the volume");
            }
            if let Some(s) = slot.dual_sender.take() {
                s.close("removed from the volume");
            }
            if let Some(t) = slot.resync_task.take() {
                t.abort();
            }
            if let Some(primary) = &st.primary {
                primary.disconnect_peer(peer, "removed from the volume");
                primary.set_known_peers(&Self::data_peers(&st));
            }
            st.pending_outdates.remove(peer);
            st.seen_lineages.remove(peer);
            st.uuids.bitmap.remove(peer);
            st.uuids.crashed_primary.remove(peer);
            st.uuids.uncertain_peers.remove(peer);
            self.recompute_quorum(&mut st);
            self.device.is_some()
        };
        lock(&self.bitmaps).remove(peer);
        tracing::info!(volume = %self.volume, peer, "peer removed from the volume");
        if must_persist {
            self.persist().await?;
            self.remove_bitmap_file(peer).await?;
        }
        self.broadcast_state();
        Ok(())
    }

    /// Give `peer` a clean bitmap slot, durably, under the metadata lock (lock order
    /// meta → state → bitmaps).
    async fn add_bitmap_slot(&self, peer: &str) -> Result<(), EngineError> {
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
            let size = lock(&me.st).volume_size;
            let mut bm = Bitmap::new(size);
            store
                .add_peer(&peer, &mut bm)
                .map_err(super::volume::meta_err(&me.volume, "adding a peer to"))?;
            let meta = {
                let mut st = lock(&me.st);
                st.uuids.bitmap.insert(peer.clone(), Generation::ZERO);
                me.meta_snapshot(&st)
            };
            lock(&me.bitmaps).insert(peer, bm);
            store
                .write_superblock(&meta)
                .map_err(super::volume::meta_err(&me.volume, "writing"))
        })
        .await
        .map_err(|e| EngineError::InvalidRequest(format!("{volume}: metadata task: {e}")))?
    }

    async fn remove_bitmap_file(&self, peer: &str) -> Result<(), EngineError> {
        let Some(me) = self.arc() else {
            return Ok(());
        };
        let peer = peer.to_string();
        let volume = self.volume.clone();
        tokio::task::spawn_blocking(move || {
            let mut store = lock(&me.meta);
            match store.as_mut() {
                Some(store) => store
                    .remove_peer(&peer)
                    .map_err(super::volume::meta_err(&me.volume, "removing a peer from")),
                None => Ok(()),
            }
        })
        .await
        .map_err(|e| EngineError::InvalidRequest(format!("{volume}: metadata task: {e}")))?
    }
}

/// A peer slot before any connection.
pub(super) fn new_slot(spec: PeerSpec, dialer: bool, joining: bool) -> PeerSlot {
    PeerSlot {
        spec,
        dialer,
        conn: ConnectionState::Connecting,
        link_id: 0,
        sender: None,
        mode: LinkMode::None,
        state: None,
        replication: ReplicationState::Off,
        split_brain: None,
        decision: None,
        last_error: None,
        left_gracefully: false,
        resync_replies: None,
        resync_progress: None,
        resync_task: None,
        dual_sender: None,
        lost_at: None,
        reconciling: false,
        follower_link: false,
        joining,
    }
}
