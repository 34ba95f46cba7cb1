//! Two Primaries (live migration, `allow-two-primaries` on both nodes, protocol C).
//!
//! The data path replicates in one direction per link (`datapath::Primary` sends,
//! `run_secondary` applies). So while two nodes are Primary, the pair has two links: the
//! normal one (first Primary → second, as before), and a *reverse* link that the second
//! Primary dials when it is promoted, with the volume name suffixed by [`DUAL_SUFFIX`] in
//! its Hello. The first Primary applies it with `run_secondary`; the second attaches it to
//! its own `datapath::Primary`.
//!
//! The two links live and die together: when either goes down, or either node demotes,
//! both are closed, and the normal link reconnects with a fresh handshake (writes that were
//! in flight are in the writers' bitmaps; "equal generations with a dirty bitmap" resyncs
//! them). Concurrent writes to the same blocks from both Primaries are not resolved: the VM
//! manager must serialise access (live migration does). They are *detected*: every local
//! write is tracked from submission to completion ([`WriteTracker`]), and a peer's write
//! that overlaps one still in flight here is not applied; the link is failed with an error
//! naming the range (logged on both sides, shown in `status` as the peer's
//! `two_primaries_conflict`).
//!
//! The window closes by itself: once two Primaries were seen, the gate switches off on this
//! node as soon as only one Primary is left — this node demoted, or the peer is connected
//! and Secondary ([`Replica::watch_two_primaries`]).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

use crate::device::{BackingDevice, DeviceError};

use super::reconcile::{RecentPeerWrites, RecordingDevice};
use super::volume::{lock, Replica};
use super::EngineError;
use crate::datapath::{run_secondary, SecondaryConfig};
use crate::failure_log::error_chain;
use crate::link::{LinkSender, PeerLink};
use crate::role::{ConnectionState, Role};
use crate::wire::{Hello, Message};

/// Suffix of the volume name in the Hello of a reverse (second Primary's) link.
pub const DUAL_SUFFIX: &str = "#dual";

/// The volume a Hello names, and whether it is a reverse link.
pub(super) fn split_volume(name: &str) -> (&str, bool) {
    match name.strip_suffix(DUAL_SUFFIX) {
        Some(v) => (v, true),
        None => (name, false),
    }
}

impl Replica {
    /// Our Hello for an incoming reverse link from `peer`: only while we are Primary,
    /// allow two primaries, and `peer` is a connected data peer.
    pub(super) fn hello_for_dual(&self, peer: &str) -> Option<Hello> {
        {
            let st = lock(&self.st);
            let slot = st.peers.get(peer)?;
            if st.closed
                || st.role != Role::Primary
                || !st.allow_two_primaries
                || slot.spec.diskless
                || slot.conn != ConnectionState::Connected
            {
                return None;
            }
        }
        let mut h = self.our_hello();
        h.volume.push_str(DUAL_SUFFIX);
        Some(h)
    }

    /// The first Primary's side: apply the second Primary's writes from the reverse link.
    pub(super) fn incoming_dual_link(&self, link: PeerLink) {
        let Some(me) = self.arc() else { return };
        let Some(device) = self.device.clone() else {
            link.sender.close("diskless");
            return;
        };
        let peer = link.info.hello.node.clone();
        let main = {
            let mut st = lock(&self.st);
            let Some(slot) = st.peers.get_mut(&peer) else {
                link.sender.close("not a member");
                return;
            };
            if let Some(old) = slot.dual_sender.replace(link.sender.clone()) {
                old.close("replaced by a new reverse link");
            }
            slot.sender.clone()
        };
        tracing::info!(volume = %self.volume, peer = %peer, "two primaries: applying the peer's writes");
        self.spawn(async move {
            let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
            let me2 = me.clone();
            let p = peer.clone();
            let handler = tokio::spawn(async move {
                while let Some(msg) = rx.recv().await {
                    me2.handle_extension(&p, msg).await;
                }
            });
            let sender = link.sender.clone();
            let cfg = SecondaryConfig {
                extensions: Some(tx),
                write_intent: Some(me.peer_write_intent()),
                local_failures: me.local_failures.clone(),
                ..SecondaryConfig::default()
            };
            let recent = Arc::new(Mutex::new(RecentPeerWrites::default()));
            let device = Arc::new(RecordingDevice {
                inner: me.peer_write_guard(device, &peer, &sender),
                recent: recent.clone(),
            });
            let res = run_secondary(link, device, cfg).await;
            handler.abort();
            let result = res.map(|d| d.to_string()).map_err(|e| error_chain(&e));
            tracing::info!(volume = %me.volume, peer = %peer, ?result,
                "reverse link ended; re-establishing the pair");
            me.end_dual(&peer, &sender);
            let tail = std::mem::take(&mut *lock(&recent));
            me.mark_dual_tail(&peer, tail).await;
            if let Some(m) = main {
                m.close("the reverse (two primaries) link ended");
            }
        });
    }

    /// The second Primary's side: dial every connected Primary peer and attach the reverse
    /// link to our data path. Called by `promote` with the data path in place.
    pub(super) async fn connect_dual_links(&self, primaries: &[String]) -> Result<(), EngineError> {
        for peer in primaries {
            let (addr, primary, allowed) = {
                let st = lock(&self.st);
                let slot = st.peers.get(peer);
                (
                    slot.map(|s| s.spec.replication),
                    st.primary.clone(),
                    slot.and_then(|s| s.state.as_ref())
                        .is_some_and(|s| s.allow_two_primaries),
                )
            };
            let (Some(addr), Some(primary)) = (addr, primary) else {
                continue;
            };
            if !allowed {
                return Err(EngineError::InvalidRequest(format!(
                    "{}: allow-two-primaries is off on {peer}; switch it on there too",
                    self.volume
                )));
            }
            let mut hello = self.our_hello();
            hello.volume.push_str(DUAL_SUFFIX);
            let link = PeerLink::connect(addr, &self.node.cfg.secret, &hello, &self.node.cfg.link)
                .await
                .map_err(|e| {
                    EngineError::InvalidRequest(format!(
                        "{}: connecting the second data link to {peer} for two primaries: {e}",
                        self.volume
                    ))
                })?;
            let sender = link.sender.clone();
            let main = {
                let mut st = lock(&self.st);
                match st.peers.get_mut(peer) {
                    Some(slot) => {
                        if let Some(old) = slot.dual_sender.replace(sender.clone()) {
                            old.close("replaced by a new reverse link");
                        }
                        slot.sender.clone()
                    }
                    None => None,
                }
            };
            primary.attach_peer(link);
            tracing::info!(volume = %self.volume, peer = %peer, "two primaries: replicating our writes to the other Primary");
            let Some(me) = self.arc() else { continue };
            let peer = peer.clone();
            self.spawn(async move {
                sender.closed().await;
                me.end_dual(&peer, &sender);
                if let Some(m) = main {
                    m.close("the reverse (two primaries) link ended");
                }
            });
        }
        Ok(())
    }

    /// The reverse link from `peer` ended, every write it carried applied (`tail`, the
    /// last of them). `peer` may have died with writes that only this node applied, so,
    /// like a Secondary that loses its Primary, this node marks them towards the third
    /// replicas (`reconcile.rs`); as the Primary it then resyncs them itself. When this node
    /// stepped down instead (which closed the link), `peer` usually goes on as the only
    /// Primary, and its writes reach every replica from it; the tail is kept aside until
    /// this node knows (`Replica::settle_stepped_down_tail`). Nothing when closing.
    async fn mark_dual_tail(&self, peer: &str, tail: RecentPeerWrites) {
        let marked = {
            let mut st = lock(&self.st);
            if st.closed {
                return;
            }
            if st.role != Role::Primary {
                let mut tail = tail;
                if let Some((_, older)) = st.stepped_down_tail.take() {
                    tail.put_before(older);
                }
                st.stepped_down_tail = Some((peer.to_string(), tail));
                return;
            }
            self.mark_tail(&st, peer, tail.into_ranges())
        };
        if let Some(marked) = marked {
            self.lost_primary_tail_marked(marked).await;
        }
    }

    fn end_dual(&self, peer: &str, sender: &crate::link::LinkSender) {
        if let Some(slot) = lock(&self.st).peers.get_mut(peer) {
            if slot
                .dual_sender
                .as_ref()
                .is_some_and(|s| s.peer_addr() == sender.peer_addr())
            {
                slot.dual_sender = None;
            }
        }
    }

    /// Close every reverse link (on demote, link loss, close).
    pub(super) fn close_dual_links(&self, reason: &str) {
        let senders: Vec<crate::link::LinkSender> = lock(&self.st)
            .peers
            .values_mut()
            .filter_map(|p| p.dual_sender.take())
            .collect();
        for s in senders {
            s.close(reason);
        }
    }
}

/// Local writes in flight (from submission to completion) and the overlapping peer writes
/// seen, per peer.
#[derive(Default)]
pub struct WriteTracker {
    inner: Mutex<TrackerState>,
}

#[derive(Default)]
struct TrackerState {
    next_id: u64,
    inflight: BTreeMap<u64, (u64, u64)>,
    conflicts: BTreeMap<String, String>,
}

impl WriteTracker {
    fn state(&self) -> std::sync::MutexGuard<'_, TrackerState> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A local write of `len` bytes at `offset` is submitted; it is in flight until
    /// [`WriteTracker::end_tag`] is called with the returned tag (the engine's request
    /// holds do it once the write is over, see `Replica::modify`).
    pub fn begin_tag(&self, offset: u64, len: u64) -> u64 {
        let mut st = self.state();
        st.next_id = st.next_id.wrapping_add(1);
        let id = st.next_id;
        st.inflight.insert(id, (offset, len));
        id
    }

    /// The local write that [`WriteTracker::begin_tag`] returned `tag` for is over.
    pub fn end_tag(&self, tag: u64) {
        let ended = self.state().inflight.remove(&tag);
        debug_assert!(
            ended.is_some(),
            "write tag {tag} ended twice or never began"
        );
    }

    /// A local write in flight that overlaps `[offset, offset + len)`.
    pub fn overlapping(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        let end = offset.saturating_add(len);
        self.state()
            .inflight
            .values()
            .copied()
            .find(|&(o, l)| len > 0 && l > 0 && o < end && offset < o.saturating_add(l))
    }

    /// The overlap that failed the link to `peer` since two primaries were last allowed.
    pub fn conflict(&self, peer: &str) -> Option<String> {
        self.state().conflicts.get(peer).cloned()
    }

    fn record_conflict(&self, peer: &str, text: &str) {
        self.state()
            .conflicts
            .insert(peer.to_string(), text.to_string());
    }

    /// Forget recorded overlaps (two primaries allowed anew).
    pub fn clear_conflicts(&self) {
        self.state().conflicts.clear();
    }
}

/// The device a peer's writes are applied through: refuses (and fails the link for) a write
/// that overlaps a local write still in flight, i.e. two Primaries writing the same blocks
/// at once.
struct PeerWriteGuard {
    inner: Arc<dyn BackingDevice>,
    tracker: Arc<WriteTracker>,
    volume: String,
    peer: String,
    link: LinkSender,
}

impl PeerWriteGuard {
    fn check(&self, op: &'static str, offset: u64, len: u64) -> Result<(), DeviceError> {
        let Some((o, l)) = self.tracker.overlapping(offset, len) else {
            return Ok(());
        };
        let text = format!(
            "{}: overlapping concurrent writes from two Primaries: {} wrote {len} bytes at offset {offset} \
             while this node's write of {l} bytes at offset {o} was in flight; the peer's write was not \
             applied and the connection is failed (the VM manager must never let both sides write the same blocks)",
            self.volume, self.peer
        );
        tracing::error!(volume = %self.volume, peer = %self.peer, offset, len, local_offset = o, local_len = l, "{text}");
        self.tracker.record_conflict(&self.peer, &text);
        self.link
            .close_with_error(crate::wire::error_code::PROTOCOL, &text);
        Err(DeviceError::Io {
            op,
            offset,
            len,
            source: std::io::Error::other(text),
        })
    }
}

impl BackingDevice for PeerWriteGuard {
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
        // A conflict fails here (not again in `write_at`); a write the inner device cannot
        // start here falls back to `write_at`, which checks again.
        if let Err(e) = self.check("write", offset, data.len() as u64) {
            return Some(Box::pin(std::future::ready(Err(e))));
        }
        self.inner.write_async(offset, data, fua)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError> {
        self.check("write", offset, buf.len() as u64)?;
        self.inner.write_at(buf, offset)
    }
    fn write_at_durable(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError> {
        self.check("write", offset, buf.len() as u64)?;
        self.inner.write_at_durable(buf, offset)
    }
    fn flush(&self) -> Result<(), DeviceError> {
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.check("discard", offset, len)?;
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), DeviceError> {
        self.check("write zeroes", offset, len)?;
        self.inner.write_zeroes(offset, len, may_unmap)
    }
    fn set_size(&self, size: u64) {
        self.inner.set_size(size)
    }
    fn cached_writes(&self) -> bool {
        self.inner.cached_writes()
    }
}

impl Replica {
    /// The device `peer`'s replicated writes (arriving on `link`) are applied through.
    pub(super) fn peer_write_guard(
        &self,
        device: Arc<dyn BackingDevice>,
        peer: &str,
        link: &LinkSender,
    ) -> Arc<dyn BackingDevice> {
        Arc::new(PeerWriteGuard {
            inner: device,
            tracker: Arc::clone(&self.writes),
            volume: self.volume.clone(),
            peer: peer.to_string(),
            link: link.clone(),
        })
    }

    /// While the gate is on: once two Primaries were seen, switch it off as soon as only one
    /// is left (this node demoted, or the peer is connected and Secondary). Started when the
    /// gate is switched on; ends when it is off.
    pub(super) fn watch_two_primaries(&self) {
        let Some(me) = self.arc() else { return };
        self.writes.clear_conflicts();
        self.spawn(async move {
            let mut rx = me.changed.subscribe();
            let mut both_seen = false;
            loop {
                let verdict = {
                    let st = lock(&me.st);
                    if st.closed || !st.allow_two_primaries {
                        return;
                    }
                    let connected_roles: Vec<Role> = st
                        .peers
                        .values()
                        .filter(|p| !p.spec.diskless && p.conn == ConnectionState::Connected)
                        .filter_map(|p| p.state.as_ref().map(|s| s.role))
                        .collect();
                    let peer_primary = connected_roles.contains(&Role::Primary);
                    let me_primary = st.role == Role::Primary;
                    if me_primary && peer_primary {
                        both_seen = true;
                        None
                    } else if both_seen && !me_primary {
                        Some("this node is Secondary again")
                    } else if both_seen
                        && !connected_roles.is_empty()
                        && connected_roles.iter().all(|r| *r == Role::Secondary)
                    {
                        Some("the peer is Secondary again")
                    } else {
                        None
                    }
                };
                if let Some(why) = verdict {
                    lock(&me.st).allow_two_primaries = false;
                    tracing::info!(volume = %me.volume, "only one Primary left ({why}): two primaries switched off");
                    me.broadcast_state();
                    me.notify();
                    return;
                }
                tokio::select! {
                    changed = rx.changed() => if changed.is_err() { return },
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
        });
    }
}
