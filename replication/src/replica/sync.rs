//! Glue between the engine and the resync module (`crate::resync`, `crate::verify`): the
//! peer's bitmap as a [`ResyncBitmap`] (persisted through the metadata store), the
//! SyncTarget's hooks (bits for third peers, `finish_resync_as_target`, UpToDate), the
//! SyncSource's task (`run_resync_source`, then `finish_resync_as_source`), and online
//! verify. Obligations taken from the resync module doc: the source resyncs the union of
//! both bitmaps (exchanged in the handshake), a Primary source reads under the data path's
//! range lock (`SourceIo::Primary`), a Secondary source only while it is not Primary (the
//! task is restarted with the Primary's I/O when the source is promoted), and a resync
//! between two Secondaries never runs while a Primary replicates to the target (with two
//! data replicas the target's only writer is the source).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::mpsc;

use super::status::VerifySummary;
use super::volume::{lock, Replica};
use super::EngineError;
use crate::bitmap::Bitmap;
use crate::failure_log::error_chain;
use crate::generation::{Generation, UuidSet};
use crate::link::LinkSender;
use crate::metadata::MetaStore;
use crate::resync::{
    run_resync_source, PeerChannel, ResyncBitmap, ResyncProgress, ResyncSummary, ResyncTarget,
    SourceIo,
};
use crate::role::{DiskState, ReplicationState, Role};

/// One peer's bitmap, shared with the data path's out-of-sync hook.
pub(super) struct PeerBitmap {
    pub bitmaps: Arc<Mutex<BTreeMap<String, Bitmap>>>,
    pub meta: Arc<Mutex<Option<MetaStore>>>,
    pub peer: String,
}

impl ResyncBitmap for PeerBitmap {
    fn runs_from(&self, offset: u64, max_len: u64, max_runs: usize) -> Vec<(u64, u64)> {
        lock(&self.bitmaps)
            .get(&self.peer)
            .map(|b| b.runs_from(offset, max_len).take(max_runs).collect())
            .unwrap_or_default()
    }
    fn dirty_bytes(&self) -> u64 {
        lock(&self.bitmaps)
            .get(&self.peer)
            .map(|b| b.dirty_bytes())
            .unwrap_or(0)
    }
    fn clear(&self, offset: u64, len: u64) {
        if let Some(b) = lock(&self.bitmaps).get_mut(&self.peer) {
            let _ = b.clear_range(offset, len);
        }
    }
    fn set(&self, offset: u64, len: u64) {
        if let Some(b) = lock(&self.bitmaps).get_mut(&self.peer) {
            let _ = b.set_range(offset, len);
        }
    }
    fn persist(&self) -> Result<(), String> {
        let mut store = lock(&self.meta);
        let Some(store) = store.as_mut() else {
            return Ok(());
        };
        let mut bms = lock(&self.bitmaps);
        match bms.get_mut(&self.peer) {
            Some(bm) => store
                .flush_bitmap(&self.peer, bm)
                .map_err(|e| format!("{e}: {:?}", std::error::Error::source(&e))),
            None => Ok(()),
        }
    }
}

/// The engine's side of a resync on the SyncTarget.
pub(super) struct TargetHooks {
    pub replica: Weak<Replica>,
    pub source: String,
    /// The source's generations from the handshake.
    pub source_uuids: UuidSet,
    /// This replica's current generation when the resync started: if it changed since,
    /// the source started a newer generation during the resync and this replica followed
    /// it (`NewCurrent`).
    pub local_current_at_start: Generation,
    pub wrote: AtomicBool,
}

impl ResyncTarget for TargetHooks {
    fn written(&self, offset: u64, len: u64) {
        self.wrote.store(true, Ordering::Relaxed);
        let Some(r) = self.replica.upgrade() else {
            return;
        };
        // Only data replicas have meaningful bitmaps (a tiebreaker's slot, if the
        // metadata has one, stays clean).
        let data: Vec<String> = lock(&r.st)
            .peers
            .values()
            .filter(|p| !p.spec.diskless && p.spec.name != self.source)
            .map(|p| p.spec.name.clone())
            .collect();
        let mut bms = lock(&r.bitmaps);
        for peer in data {
            if let Some(bm) = bms.get_mut(&peer) {
                let _ = bm.set_range(offset, len);
            }
        }
    }

    fn finished(&self, summary: &ResyncSummary) -> Result<(), String> {
        let Some(r) = self.replica.upgrade() else {
            return Err("replica closed".into());
        };
        {
            let mut store = lock(&r.meta);
            let Some(store) = store.as_mut() else {
                return Err("replica closed".into());
            };
            // The source sent the union of both bitmaps: our bits for it are done too.
            r.clear_bits_and_persist(store, &self.source)?;
            let meta = {
                let mut st = lock(&r.st);
                let mut source = self.source_uuids.clone();
                // The source may have started newer generations during the resync; this
                // replica followed them (NewCurrent), so its current is the source's.
                // Otherwise this replica's current is still its own pre-resync generation,
                // which must not survive the resync: keeping it would leave the pair with
                // different currents (a split brain at the next handshake although only
                // one side ever wrote).
                if st.uuids.current != self.local_current_at_start
                    && st.uuids.current != source.current
                {
                    let old = source.current;
                    source.push_history(old);
                    source.current = st.uuids.current;
                }
                let peers: Vec<String> = st
                    .peers
                    .values()
                    .filter(|p| !p.spec.diskless)
                    .map(|p| p.spec.name.clone())
                    .collect();
                let wrote = self.wrote.load(Ordering::Relaxed) || summary.sent_bytes > 0;
                let names: Vec<&str> = if wrote {
                    peers.iter().map(String::as_str).collect()
                } else {
                    Vec::new()
                };
                let local = r.node_name().to_string();
                st.uuids
                    .finish_resync_as_target(&local, &self.source, &source, &names);
                st.disk = DiskState::UpToDate;
                if let Some(slot) = st.peers.get_mut(&self.source) {
                    slot.replication = ReplicationState::Established;
                    slot.resync_progress = None;
                }
                r.meta_snapshot(&st)
            };
            store
                .write_superblock(&meta)
                .map_err(|e| format!("writing the superblock: {e}"))?;
        }
        tracing::info!(volume = %r.volume(), source = %self.source, sent = summary.sent_bytes,
            skipped = summary.skipped_bytes, "resync finished: this replica is UpToDate");
        r.broadcast_state();
        r.notify();
        // Pairs that made this replica SyncTarget of another (Secondary) source were
        // decided on the generations this resync just replaced, and such a source defers
        // while a Primary replicates here: decide them again on the new generations.
        let stale: Vec<crate::link::LinkSender> = lock(&r.st)
            .peers
            .values()
            .filter(|p| p.spec.name != self.source && p.replication == ReplicationState::SyncTarget)
            .filter_map(|p| p.sender.clone())
            .collect();
        for s in stale {
            s.close("a resync from another source finished; deciding this pair again");
        }
        Ok(())
    }
}

impl Replica {
    /// After a resync that sent the union of both sides' bits: clear the bits for `peer` and
    /// persist every bitmap.
    pub(super) fn clear_bits_and_persist(
        &self,
        store: &mut crate::metadata::MetaStore,
        peer: &str,
    ) -> Result<(), String> {
        let mut bms = lock(&self.bitmaps);
        if let Some(bm) = bms.get_mut(peer) {
            bm.clear_all();
        }
        for (p, bm) in bms.iter_mut() {
            store
                .flush_bitmap(p, bm)
                .map_err(|e| format!("persisting the bitmap of {p}: {e}"))?;
        }
        Ok(())
    }

    /// A [`ResyncBitmap`] over `peer`'s bitmap.
    pub(super) fn peer_bitmap(&self, peer: &str) -> Arc<dyn ResyncBitmap> {
        Arc::new(PeerBitmap {
            bitmaps: self.bitmaps.clone(),
            meta: self.meta.clone(),
            peer: peer.to_string(),
        })
    }

    /// Route resync/verify replies from `peer` to a new session.
    pub(super) fn reply_channel(&self, peer: &str) -> Option<PeerChannel> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut st = lock(&self.st);
        let slot = st.peers.get_mut(peer)?;
        let sender = slot.sender.clone()?;
        slot.resync_replies = Some(tx);
        Some(PeerChannel {
            sender,
            replies: rx,
        })
    }

    /// Start (or restart) the resync task towards `peer` as SyncSource on link `id`.
    pub(super) fn spawn_resync_source(self: &Arc<Self>, peer: &str, id: u64, sender: LinkSender) {
        let (io, cfg) = {
            let st = lock(&self.st);
            if st.role != Role::Primary {
                // Resync module obligation: a Secondary may source a resync only while no
                // Primary replicates to the target (with 3+ data replicas the Primary's own
                // handshake with the target covers it; with two, there is no other writer).
                let primaries = self.known_primaries(&st);
                if primaries.iter().any(|p| p != peer) {
                    tracing::warn!(volume = %self.volume, peer, ?primaries,
                        "not resyncing from a Secondary while a Primary is connected; deferred");
                    return;
                }
            }
            let io = match (&st.primary, &self.device) {
                (Some(p), _) if st.role == Role::Primary => SourceIo::Primary(p.clone()),
                (_, Some(d)) => SourceIo::Device(d.clone()),
                _ => return,
            };
            (io, st.options.resync.clone())
        };
        let progress = Arc::new(ResyncProgress::default());
        let (tx, rx) = mpsc::unbounded_channel();
        {
            let mut st = lock(&self.st);
            // The options may have changed since `cfg` was read; a later `set_options`
            // reaches the task through `progress`.
            progress.set_limits(st.options.resync.limits());
            let Some(slot) = st.peers.get_mut(peer) else {
                return;
            };
            if slot.link_id != id {
                return;
            }
            slot.resync_replies = Some(tx);
            slot.resync_progress = Some(progress.clone());
            if let Some(t) = slot.resync_task.take() {
                t.abort();
            }
        }
        let me = self.clone();
        let bitmap = self.peer_bitmap(peer);
        let peer_name = peer.to_string();
        let task = tokio::spawn(async move {
            let chan = PeerChannel {
                sender: sender.clone(),
                replies: rx,
            };
            match run_resync_source(io, chan, bitmap, &cfg, progress).await {
                Ok(outcome) => {
                    {
                        let mut st = lock(&me.st);
                        st.uuids.finish_resync_as_source(&peer_name);
                        if let Some(slot) = st.peers.get_mut(&peer_name) {
                            if slot.link_id == id {
                                slot.replication = ReplicationState::Established;
                                slot.resync_progress = None;
                                slot.resync_replies = None;
                            }
                        }
                    }
                    if let Err(e) = me.persist().await {
                        tracing::error!(volume = %me.volume, error = %error_chain(&e), "persisting the resync end");
                    }
                    tracing::info!(volume = %me.volume, peer = %peer_name, sent = outcome.sent_bytes,
                        skipped = outcome.skipped_bytes, "resync as source finished");
                    me.notify();
                }
                Err(e) => {
                    tracing::warn!(volume = %me.volume, peer = %peer_name, error = %e,
                        "resync interrupted; it resumes from the bitmap on reconnect");
                    sender.close(&format!("resync failed: {e}"));
                }
            }
        });
        match lock(&self.st).peers.get_mut(peer) {
            Some(slot) if slot.link_id == id => slot.resync_task = Some(task),
            // The link was replaced meanwhile: this session is stale.
            _ => task.abort(),
        }
    }

    /// Online verify against the first connected UpToDate data peer (Primary only: the
    /// peer answers digests in its Secondary data path).
    pub async fn verify(&self) -> Result<crate::verify::VerifyReport, EngineError> {
        let (primary, peer, cfg) = {
            let st = lock(&self.st);
            if st.role != Role::Primary {
                return Err(EngineError::NotPrimary {
                    volume: self.volume.clone(),
                    role: st.role,
                });
            }
            let peer = st
                .peers
                .values()
                .find(|p| {
                    !p.spec.diskless
                        && p.replication == ReplicationState::Established
                        && p.state
                            .as_ref()
                            .is_some_and(|s| s.disk == DiskState::UpToDate)
                })
                .map(|p| p.spec.name.clone());
            (st.primary.clone(), peer, st.options.resync.clone())
        };
        let (Some(primary), Some(peer)) = (primary, peer) else {
            return Err(EngineError::InvalidRequest(format!(
                "{}: online verify needs a connected UpToDate peer",
                self.volume
            )));
        };
        let Some(chan) = self.reply_channel(&peer) else {
            return Err(EngineError::InvalidRequest(format!(
                "{}: the link to {peer} just went down",
                self.volume
            )));
        };
        let progress = Arc::new(ResyncProgress::default());
        let res = crate::verify::run_verify(
            SourceIo::Primary(primary),
            chan,
            self.peer_bitmap(&peer),
            &cfg,
            progress,
        )
        .await;
        if let Some(slot) = lock(&self.st).peers.get_mut(&peer) {
            slot.resync_replies = None;
        }
        let report = res.map_err(|e| {
            EngineError::InvalidRequest(format!("{}: online verify with {peer}: {e}", self.volume))
        })?;
        let summary = VerifySummary {
            differing_blocks: report.differing_blocks,
            checked_bytes: report.checked_bytes,
        };
        lock(&self.st).last_verify = Some(summary);
        self.notify();
        Ok(report)
    }
}
