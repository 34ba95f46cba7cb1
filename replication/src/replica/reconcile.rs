//! Reconciling a lost Primary's last writes between the surviving data replicas (three or
//! more data replicas; with two there is nobody to reconcile with).
//!
//! A Primary that dies with writes in flight may leave each Secondary with a different
//! subset of them (none was acknowledged, so no acknowledged write is at stake, but the
//! survivors differ in those blocks). DRBD closes this with peer-acks; we do it after the
//! fact, never delaying a promotion:
//! 1. a Secondary records the tail of the writes it applies for its Primary
//!    ([`RecentPeerWrites`] through [`RecordingDevice`]); when the link to that Primary goes
//!    down it marks the tail out of sync in its bitmaps for every *other* data peer
//!    (durably, like any bitmap bit); nothing else changes (still UpToDate, no grace timer).
//!    With two Primaries, the first one records the second one's writes from the reverse
//!    link the same way, and marks them when that link ends while it is still Primary
//!    (`dual.rs`). When it stepped down instead, it keeps them aside until it knows what
//!    became of the other Primary ([`Replica::settle_stepped_down_tail`]);
//! 2. when a Secondary starts following a Primary (after a promotion, or a promoted peer's
//!    idle link joining the data path) and either side has bits for the other, the
//!    Secondary becomes Inconsistent (durably), sends its bits for the Primary
//!    (`BitmapRuns` outside a handshake), and the Primary resyncs the union on the live
//!    link as the source, under its range lock, while it keeps serving writes
//!    ([`ReconcileHooks`] finish it: bits cleared, UpToDate again; generations untouched).
//!
//! The Primary is always the source: a Secondary never overwrites the Primary's blocks.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, Weak};

use super::messages::EngineMessage;
use super::volume::{lock, LinkMode, Replica, State};
use crate::device::{BackingDevice, DeviceError};
use crate::failure_log::error_chain;
use crate::resync::{ResyncSummary, ResyncTarget};
use crate::role::{ConnectionState, DiskState, ReplicationState, Role};

/// The tail of the writes this Secondary applied for its Primary. A write that reached one
/// Secondary but not another was not acknowledged by the other, so it was still in flight
/// at the Primary, whose requests in flight are bounded
/// ([`crate::datapath::PrimaryConfig::max_inflight_bytes`]); every such write is therefore
/// among the last writes this Secondary applied. The tail keeps twice that bound (writes of
/// one epoch may be acknowledged out of order), minus at most one coalesced range
/// ([`COALESCE_COST`]) or one single write: the oldest ranges are dropped whole.
#[derive(Default)]
pub(super) struct RecentPeerWrites {
    /// (offset, len, cost), oldest first.
    ranges: VecDeque<(u64, u64, u64)>,
    cost: u64,
}

/// Cost of a trim/zeroing request in the tail (it carries no data, like the data path's
/// nominal request cost).
const NOMINAL_COST: u64 = 4096;

/// Sequential writes coalesce into one range up to this cost: eviction drops whole ranges
/// from the front, so this bounds how much of the tail one eviction can take with it (a
/// long sequential run must not be dropped whole, newest writes included, because one
/// more write arrived).
const COALESCE_COST: u64 = 1 << 20;

impl RecentPeerWrites {
    /// Twice the Primary's in-flight bound. The engine's Primaries always run with the data
    /// path's default bound (`Replica` builds `PrimaryConfig::new` without overriding it),
    /// and the bound that matters is the remote Primary's, which this node cannot see: if
    /// the bound ever becomes configurable, exchange it in the handshake and size this from
    /// the peer's value.
    fn limit() -> u64 {
        2 * crate::datapath::default_max_inflight_bytes() as u64
    }

    fn record(&mut self, offset: u64, len: u64, cost: u64) {
        if len == 0 {
            return;
        }
        match self.ranges.back_mut() {
            // Sequential writes coalesce (bounded memory for small writes), up to a chunk
            // (bounded eviction granularity).
            Some((o, l, c))
                if o.saturating_add(*l) == offset && c.saturating_add(cost) <= COALESCE_COST =>
            {
                *l = l.saturating_add(len);
                *c = c.saturating_add(cost);
            }
            _ => self.ranges.push_back((offset, len, cost)),
        }
        self.cost = self.cost.saturating_add(cost);
        self.trim();
    }

    /// Drop the oldest ranges beyond the bound, never the newest.
    fn trim(&mut self) {
        while self.cost > Self::limit() && self.ranges.len() > 1 {
            if let Some((_, _, c)) = self.ranges.pop_front() {
                self.cost = self.cost.saturating_sub(c);
            }
        }
    }

    /// The ranges of the tail; the tail is emptied.
    pub(super) fn take(&mut self) -> Vec<(u64, u64)> {
        std::mem::take(self).into_ranges()
    }

    /// The ranges of the tail, oldest first.
    pub(super) fn into_ranges(self) -> Vec<(u64, u64)> {
        self.ranges.into_iter().map(|(o, l, _)| (o, l)).collect()
    }

    /// Put `older`, writes applied before every write of this tail, in front of them,
    /// within the same bound (the oldest go first).
    pub(super) fn put_before(&mut self, older: RecentPeerWrites) {
        let newer = std::mem::replace(&mut self.ranges, older.ranges);
        self.ranges.extend(newer);
        self.cost = self.cost.saturating_add(older.cost);
        self.trim();
    }
}

/// The device a Primary's replicated writes are applied through on a Secondary (and the
/// other Primary's, on a Primary): records each write in a [`RecentPeerWrites`] before
/// applying it.
pub(super) struct RecordingDevice {
    pub inner: Arc<dyn BackingDevice>,
    pub recent: Arc<Mutex<RecentPeerWrites>>,
}

impl RecordingDevice {
    fn note(&self, offset: u64, len: u64, cost: u64) {
        lock(&self.recent).record(offset, len, cost);
    }
}

impl BackingDevice for RecordingDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DeviceError> {
        self.inner.read_at(buf, offset)
    }
    fn read_owned(&self, offset: u64, len: usize) -> Result<bytes::Bytes, DeviceError> {
        self.inner.read_owned(offset, len)
    }
    fn read_async(
        &self,
        offset: u64,
        len: usize,
    ) -> Option<crate::device::DeviceFuture<bytes::Bytes>> {
        self.inner.read_async(offset, len)
    }
    fn write_async(
        &self,
        offset: u64,
        data: &bytes::Bytes,
        fua: bool,
    ) -> Option<crate::device::DeviceFuture<()>> {
        // Noted only when started here: on `None` the caller writes with `write_at`.
        let io = self.inner.write_async(offset, data, fua)?;
        self.note(offset, data.len() as u64, data.len() as u64);
        Some(io)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError> {
        self.note(offset, buf.len() as u64, buf.len() as u64);
        self.inner.write_at(buf, offset)
    }
    fn write_at_durable(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError> {
        self.note(offset, buf.len() as u64, buf.len() as u64);
        self.inner.write_at_durable(buf, offset)
    }
    fn flush(&self) -> Result<(), DeviceError> {
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.note(offset, len, NOMINAL_COST);
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), DeviceError> {
        self.note(offset, len, NOMINAL_COST);
        self.inner.write_zeroes(offset, len, may_unmap)
    }
    fn set_size(&self, size: u64) {
        self.inner.set_size(size)
    }
    fn cached_writes(&self) -> bool {
        self.inner.cached_writes()
    }
}

/// The Secondary's side of a reconciliation with its Primary on link `link_id`: resync
/// data is applied by `datapath::run_secondary` like a handshake resync's; at the end the
/// bits for the Primary are cleared and the replica is UpToDate again. A `Done` that
/// arrives while no reconciliation runs (none was requested on this link) changes nothing.
pub(super) struct ReconcileHooks {
    pub replica: Weak<Replica>,
    pub primary: String,
    pub link_id: u64,
}

impl ResyncTarget for ReconcileHooks {
    fn written(&self, offset: u64, len: u64) {
        // The Primary's data now differs from what disconnected data peers may hold; the
        // connected ones get the same blocks from the Primary (or reconcile with it).
        let Some(r) = self.replica.upgrade() else {
            return;
        };
        let away: Vec<String> = lock(&r.st)
            .peers
            .values()
            .filter(|p| {
                !p.spec.diskless
                    && p.spec.name != self.primary
                    && p.conn != ConnectionState::Connected
            })
            .map(|p| p.spec.name.clone())
            .collect();
        let mut bms = lock(&r.bitmaps);
        for peer in away {
            if let Some(bm) = bms.get_mut(&peer) {
                if let Err(e) = bm.set_range(offset, len) {
                    tracing::warn!(volume = %r.volume(), peer = %peer, offset, len, error = %e,
                        "marking a reconciled block out of sync towards a disconnected peer");
                }
            }
        }
    }

    fn finished(&self, summary: &ResyncSummary) -> Result<(), String> {
        let Some(r) = self.replica.upgrade() else {
            return Err("replica closed".into());
        };
        let ours = lock(&r.st)
            .peers
            .get(&self.primary)
            .is_some_and(|p| p.link_id == self.link_id && p.reconciling);
        if !ours {
            return Ok(());
        }
        {
            let mut store = lock(&r.meta);
            let Some(store) = store.as_mut() else {
                return Err("replica closed".into());
            };
            // The Primary resynced the union of both sides' bits.
            r.clear_bits_and_persist(store, &self.primary)?;
            let meta = {
                let mut st = lock(&r.st);
                let still_ours = st.peers.get_mut(&self.primary).is_some_and(|slot| {
                    let ours = slot.link_id == self.link_id && slot.reconciling;
                    if ours {
                        slot.reconciling = false;
                        slot.replication = ReplicationState::Established;
                    }
                    ours
                });
                if !still_ours {
                    return Ok(());
                }
                if st.disk == DiskState::Inconsistent {
                    st.disk = DiskState::UpToDate;
                }
                st.uuids.flags.consistent = true;
                st.uuids.flags.was_up_to_date = true;
                r.meta_snapshot(&st)
            };
            store
                .write_superblock(&meta)
                .map_err(|e| format!("writing the superblock: {e}"))?;
        }
        tracing::info!(volume = %r.volume(), primary = %self.primary, sent = summary.sent_bytes,
            skipped = summary.skipped_bytes, "reconciled with the Primary: this replica is UpToDate");
        r.broadcast_state();
        r.notify();
        // A pair that made this (then Inconsistent) replica SyncTarget of a Secondary
        // waits for a Primary-free moment that may never come: decide it again.
        let stale: Vec<crate::link::LinkSender> = lock(&r.st)
            .peers
            .values()
            .filter(|p| {
                p.spec.name != self.primary && p.replication == ReplicationState::SyncTarget
            })
            .filter_map(|p| p.sender.clone())
            .collect();
        for s in stale {
            s.close("reconciled with the Primary; deciding this pair again");
        }
        Ok(())
    }
}

/// What [`Replica::mark_lost_primary_tail`] marked, for the follow-up outside the lock.
pub(super) struct MarkedTail {
    lost: String,
    ranges: usize,
    others: Vec<String>,
    /// This node was Primary when it marked (two primaries).
    as_primary: bool,
}

impl Replica {
    /// The link to `lost`, our Primary, went down: mark the tail of the writes applied for
    /// it out of sync towards every other data peer, in memory, so that whichever of us is
    /// promoted next resyncs those blocks to the other (see the module doc). Called by
    /// `link_down` with the state locked, before anybody is woken: a promotion of this node
    /// that waited for the loss cannot complete first and leave the tail unmarked (a new
    /// Primary must still resync its tail to the other Secondaries). With two data replicas
    /// there is no other data peer and nothing is marked. [`Self::lost_primary_tail_marked`]
    /// persists the bits afterwards.
    pub(super) fn mark_lost_primary_tail(&self, st: &State, lost: &str) -> Option<MarkedTail> {
        let tail = lock(&self.recent_peer_writes).take();
        self.mark_tail(st, lost, tail)
    }

    /// Mark `tail`, the last writes applied for `lost`, out of sync towards every other
    /// data peer (see [`Self::mark_lost_primary_tail`]).
    pub(super) fn mark_tail(
        &self,
        st: &State,
        lost: &str,
        tail: Vec<(u64, u64)>,
    ) -> Option<MarkedTail> {
        if tail.is_empty() || self.device.is_none() {
            return None;
        }
        let others: Vec<String> = st
            .peers
            .values()
            .filter(|p| !p.spec.diskless && p.spec.name != lost)
            .map(|p| p.spec.name.clone())
            .collect();
        if others.is_empty() {
            return None;
        }
        {
            let mut bms = lock(&self.bitmaps);
            for p in &others {
                if let Some(bm) = bms.get_mut(p) {
                    for (o, l) in &tail {
                        if let Err(e) = bm.set_range(*o, *l) {
                            tracing::warn!(volume = %self.volume, peer = %p, offset = o, len = l,
                                error = %e, "marking a lost Primary's write out of sync");
                        }
                    }
                }
            }
        }
        Some(MarkedTail {
            lost: lost.to_string(),
            ranges: tail.len(),
            others,
            as_primary: st.role == Role::Primary,
        })
    }

    /// The writes this node applied from the other Primary before it stepped down
    /// (`dual.rs`), now that this node follows `primary` on a link set up for it, or was
    /// promoted as the only Primary (`primary` is then this node): following that Primary
    /// again, they join the tail kept for it (marked if it is lost, dropped if it steps
    /// down cleanly); otherwise that Primary may be gone, and they are marked towards the
    /// other replicas (the caller hands the result to [`Self::lost_primary_tail_marked`]).
    pub(super) fn settle_stepped_down_tail(
        &self,
        st: &mut State,
        primary: &str,
    ) -> Option<MarkedTail> {
        let (peer, tail) = st.stepped_down_tail.take()?;
        if peer == primary && st.role != Role::Primary {
            lock(&self.recent_peer_writes).put_before(tail);
            return None;
        }
        self.mark_tail(st, &peer, tail.into_ranges())
    }

    /// After [`Self::mark_lost_primary_tail`], outside the lock: persist the bits, and start
    /// the reconciliation where nobody else will. A Secondary that already follows another
    /// Primary (two primaries) reconciles with it now; a node that was Primary itself when
    /// it marked resyncs the Secondaries following it through a handshake (their link is
    /// closed; at equal generations the Primary is the source of its bits). A node promoted
    /// after marking needs nothing more: its peers reconcile when they start following it.
    pub(super) async fn lost_primary_tail_marked(&self, marked: MarkedTail) {
        let MarkedTail {
            lost,
            ranges,
            others,
            as_primary,
        } = marked;
        for p in &others {
            if let Err(e) = self.flush_bitmap(p).await {
                tracing::error!(volume = %self.volume, peer = %p, error = %error_chain(&e), "persisting the bitmap");
            }
        }
        tracing::info!(volume = %self.volume, primary = %lost, ranges, peers = ?others,
            "Primary lost: its last writes are marked out of sync towards the other replicas");
        let (follow, refollow, resync) = {
            let st = lock(&self.st);
            let following = || {
                st.peers
                    .values()
                    .filter(|p| others.contains(&p.spec.name) && p.mode == LinkMode::Secondary)
                    .filter(|p| p.state.as_ref().is_some_and(|s| s.role == Role::Primary))
            };
            let follow: Vec<(String, u64)> = following()
                .filter(|p| p.follower_link)
                .map(|p| (p.spec.name.clone(), p.link_id))
                .collect();
            // A link set up for a resync that this replica then kept applying the Primary's
            // writes on cannot reconcile (`Replica::data_link`): it is set up again.
            let refollow: Vec<crate::link::LinkSender> = following()
                .filter(|p| !p.follower_link)
                .filter_map(|p| p.sender.clone())
                .collect();
            let resync: Vec<crate::link::LinkSender> = if as_primary && st.role == Role::Primary {
                st.peers
                    .values()
                    .filter(|p| others.contains(&p.spec.name))
                    .filter(|p| {
                        p.conn == ConnectionState::Connected
                            && p.replication == ReplicationState::Established
                    })
                    .filter_map(|p| p.sender.clone())
                    .collect()
            } else {
                Vec::new()
            };
            (follow, refollow, resync)
        };
        self.broadcast_state();
        for s in resync {
            s.close("resyncing a lost Primary's last writes from this Primary");
        }
        for s in refollow {
            s.close(
                "re-establishing the link to the Primary to reconcile a lost Primary's last writes",
            );
        }
        if let Some(me) = self.arc() {
            for (p, id) in follow {
                let me = me.clone();
                self.spawn(async move { me.reconcile_with_primary(p, id).await });
            }
        }
    }

    /// This Secondary follows the Primary `primary` on link `id`: if either side has bits
    /// for the other, become Inconsistent (durably) and ask the Primary to resync the
    /// union (our bits travel as `BitmapRuns`; the Primary adds its own).
    pub(super) async fn reconcile_with_primary(self: Arc<Self>, primary: String, id: u64) {
        let (runs, sender) = {
            let mut st = lock(&self.st);
            if st.role == Role::Primary || st.closed {
                return;
            }
            let mine = lock(&self.bitmaps)
                .get(&primary)
                .map(|b| b.runs().collect::<Vec<_>>())
                .unwrap_or_default();
            let Some(slot) = st.peers.get_mut(&primary) else {
                return;
            };
            let follows = slot.link_id == id
                && slot.mode == LinkMode::Secondary
                && slot.replication == ReplicationState::Established
                && !slot.reconciling
                && slot.state.as_ref().is_some_and(|s| s.role == Role::Primary);
            let theirs = slot.state.as_ref().map(|s| s.changed_blocks).unwrap_or(0);
            if !follows || (mine.is_empty() && theirs == 0) {
                return;
            }
            let Some(sender) = slot.sender.clone() else {
                return;
            };
            slot.reconciling = true;
            slot.replication = ReplicationState::SyncTarget;
            st.disk = DiskState::Inconsistent;
            st.uuids.flags.consistent = false;
            (mine, sender)
        };
        // Inconsistent is durable before any block is overwritten: a crash in the middle
        // leaves a replica that cannot be promoted and resyncs from the Primary.
        if let Err(e) = self.persist().await {
            tracing::error!(volume = %self.volume, error = %error_chain(&e), "persisting the reconciliation start");
            sender.close("could not persist the reconciliation start");
            return;
        }
        tracing::info!(volume = %self.volume, %primary, runs = runs.len(),
            "reconciling the last writes of a lost Primary: resync from the Primary starts");
        self.broadcast_state();
        self.notify();
        for msg in EngineMessage::bitmap_runs(&runs) {
            if sender.send(&msg.to_message()).await.is_err() {
                // The link is down; the next handshake resyncs (we stay Inconsistent and
                // keep our bits).
                return;
            }
        }
    }

    /// The Primary's side: `peer`, a Secondary following us, sent its bits for us outside
    /// a handshake (a reconciliation request). Merge them and resync the union as source
    /// on the live link.
    pub(super) fn on_reconcile_bits(&self, peer: &str, runs: Vec<(u64, u64)>, last: bool) {
        let target = {
            let mut st = lock(&self.st);
            if st.role != Role::Primary {
                None
            } else {
                match st.peers.get_mut(peer) {
                    Some(slot)
                        if !slot.spec.diskless
                            && matches!(slot.mode, LinkMode::Attached | LinkMode::Idle)
                            && slot.conn == ConnectionState::Connected =>
                    {
                        {
                            let mut bms = lock(&self.bitmaps);
                            if let Some(bm) = bms.get_mut(peer) {
                                for (o, l) in runs {
                                    if let Err(e) = bm.set_range(o, l) {
                                        tracing::warn!(volume = %self.volume, peer, error = %e,
                                            "bad run in a reconciliation request; reconnecting");
                                        if let Some(s) = &slot.sender {
                                            s.close("bad reconciliation request");
                                        }
                                        return;
                                    }
                                }
                            }
                        }
                        if last {
                            slot.replication = ReplicationState::SyncSource;
                            // Promoted a moment ago, the link not in the data path yet:
                            // `data_link` starts the resync once it attached the link.
                            if slot.mode == LinkMode::Idle {
                                return;
                            }
                            slot.sender.clone().map(|s| (slot.link_id, s))
                        } else {
                            None
                        }
                    }
                    _ => None,
                }
            }
        };
        if !last {
            return;
        }
        match (target, self.arc()) {
            (Some((id, sender)), Some(me)) => {
                tracing::info!(volume = %self.volume, peer, "reconciling a lost Primary's last writes: resyncing them to the peer");
                me.spawn_resync_source(peer, id, sender);
            }
            _ => {
                // Not (or no longer) this peer's Primary on a usable link: a handshake
                // sorts it out (the peer stays Inconsistent with its bits until then).
                tracing::warn!(volume = %self.volume, peer, "reconciliation request while not the peer's Primary; reconnecting");
                let sender = lock(&self.st)
                    .peers
                    .get(peer)
                    .and_then(|p| p.sender.clone());
                if let Some(s) = sender {
                    s.close("reconciliation request while not the peer's Primary");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tail_coalesces_sequential_writes_and_keeps_separate_ones() {
        let mut t = RecentPeerWrites::default();
        t.record(0, 4096, 4096);
        t.record(4096, 8192, 8192);
        t.record(1 << 20, 4096, 4096);
        t.record(0, 0, 0);
        assert_eq!(t.take(), vec![(0, 12288), (1 << 20, 4096)]);
        assert!(t.take().is_empty(), "take empties the tail");
    }

    #[test]
    fn an_older_tail_goes_in_front_and_the_bound_drops_its_oldest_first() {
        let chunk = 1u64 << 20;
        let per_tail = RecentPeerWrites::limit() / chunk;
        let (mut older, mut newer) = (RecentPeerWrites::default(), RecentPeerWrites::default());
        for i in 0..per_tail {
            older.record(i * 2 * chunk, chunk, chunk);
        }
        newer.record(1 << 40, chunk, chunk);
        newer.put_before(older);
        let ranges = newer.take();
        assert_eq!(ranges.len() as u64, per_tail);
        assert_eq!(ranges.first(), Some(&(2 * chunk, chunk)), "the oldest went");
        assert_eq!(
            ranges.last(),
            Some(&(1 << 40, chunk)),
            "the newest stayed last"
        );
    }

    #[test]
    fn the_tail_keeps_twice_the_in_flight_bound_and_drops_the_oldest() {
        let mut t = RecentPeerWrites::default();
        let chunk = 1u64 << 20;
        let limit = RecentPeerWrites::limit();
        let n = limit / chunk + 10;
        // Non-adjacent writes (a gap between each), so nothing coalesces.
        for i in 0..n {
            t.record(i * 2 * chunk, chunk, chunk);
        }
        let ranges = t.take();
        assert_eq!(ranges.len() as u64, limit / chunk);
        assert_eq!(ranges.last(), Some(&((n - 1) * 2 * chunk, chunk)));
        assert_eq!(
            ranges.first(),
            Some(&((n - limit / chunk) * 2 * chunk, chunk))
        );
    }

    #[test]
    fn a_long_sequential_run_keeps_its_newest_writes_after_a_distant_write() {
        let mut t = RecentPeerWrites::default();
        let limit = RecentPeerWrites::limit();
        let w = 64u64 << 10;
        // One sequential run longer than the tail, then one distant write.
        let run_end = limit + 8 * COALESCE_COST;
        let mut off = 0;
        while off < run_end {
            t.record(off, w, w);
            off += w;
        }
        let far = 1u64 << 40;
        t.record(far, w, w);
        let ranges = t.take();
        assert_eq!(ranges.last(), Some(&(far, w)));
        let run: Vec<(u64, u64)> = ranges.iter().copied().filter(|r| r.0 < far).collect();
        // The run's last bytes are in the tail, contiguous back from its end.
        let last = run.last().copied().unwrap();
        assert_eq!(
            last.0 + last.1,
            run_end,
            "the newest writes of the run are kept"
        );
        for pair in run.windows(2) {
            assert_eq!(pair[0].0 + pair[0].1, pair[1].0, "no gap in the kept run");
        }
        let kept: u64 = run.iter().map(|r| r.1).sum();
        assert!(
            kept + w >= limit - COALESCE_COST,
            "kept {kept} of the run, limit {limit}"
        );
        assert!(kept + w <= limit, "the tail stays within its bound");
        assert!(
            run.iter().all(|r| r.1 <= COALESCE_COST),
            "ranges are at most a chunk"
        );
    }

    #[test]
    fn trims_and_zeroing_cost_a_nominal_amount() {
        let mut t = RecentPeerWrites::default();
        // A huge trim does not push the writes before it out of the tail.
        t.record(0, 4096, 4096);
        t.record(1 << 30, 1 << 40, NOMINAL_COST);
        assert_eq!(t.take(), vec![(0, 4096), (1 << 30, 1 << 40)]);
    }
}
