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
//! them). As in DRBD 9.1.4+, concurrent writes to the same blocks from both Primaries are
//! not resolved: the VM manager must serialise access (live migration does).

use tokio::sync::mpsc;

use super::volume::{lock, Replica};
use super::EngineError;
use crate::datapath::{run_secondary, SecondaryConfig};
use crate::link::PeerLink;
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
                ..SecondaryConfig::default()
            };
            let res = run_secondary(link, device, cfg).await;
            handler.abort();
            tracing::info!(volume = %me.volume, peer = %peer, result = ?res.map(|d| d.to_string()),
                "reverse link ended; re-establishing the pair");
            me.end_dual(&peer, &sender);
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
