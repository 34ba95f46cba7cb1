//! Outdating through a tiebreaker, tied to generations, and learning that this replica was
//! left behind.
//!
//! - A Primary that keeps quorum while losing a data peer asks a tiebreaker to outdate it
//!   (`connection.rs`, `link_down`). The request carries the requester's lineage (current
//!   generation and history) *as it is when the request is sent*, which may be long after
//!   it was decided: it is resent on every new link to a tiebreaker. The target applies it
//!   only if its own current generation is in that lineage, i.e. it holds nothing the
//!   requester lacks. A target that took over meanwhile holds a generation the requester
//!   never had: it answers [`OutdateResult::Stale`] and keeps its state. A stale request
//!   is never applied to a newer generation.
//! - A tiebreaker remembers the current generation each data replica last reported
//!   (`State::seen_currents`) and relays it in every state it sends. A data replica that is
//!   not connected to one of them and finds there a generation it does not know was left
//!   behind: the other side moved on without it ([`Replica::left_behind`]). Such a replica
//!   never regains a role through the tiebreaker:
//!   - a Primary without quorum steps down (force-secondary; none of its frozen requests
//!     was acknowledged) instead of staying Primary and blocking the new side's promotion;
//!   - its disk becomes Outdated, durably, until a resync from the newer side.
//!
//!   The same holds for the requester of a stale outdate.
//! - The other way round, an Outdated replica that is connected to every other data
//!   replica and is the SyncTarget of none holds the newest data there is: it becomes
//!   UpToDate again ([`crate::role::outdated_but_newest`]), whatever marked it.

use super::messages::{EngineMessage, OutdateResult, PeerState};
use super::volume::{lock, Replica, State};
use crate::failure_log::error_chain;
use crate::generation::Generation;
use crate::link::LinkSender;
use crate::role::{ConnectionState, DiskState, ReplicationState, Role};
use crate::wire::Message;

impl Replica {
    /// The outdate request for `target`, with our lineage as it is now.
    pub(super) fn outdate_request(&self, st: &State, id: u64, target: &str) -> Message {
        EngineMessage::Outdate {
            id,
            target: target.to_string(),
            requester: self.node_name().to_string(),
            lineage: st.uuids.lineage(),
        }
        .to_message()
    }

    /// An outdate request for `target`, from `requester`, reached us through `from`: apply
    /// it if we are the target, else relay it (we are the tiebreaker).
    pub(super) async fn on_outdate(
        &self,
        from: &str,
        id: u64,
        target: String,
        requester: String,
        lineage: Vec<Generation>,
    ) {
        if target != self.node_name() {
            self.relay_outdate(from, id, target, requester, lineage);
            return;
        }
        let result = {
            let mut st = lock(&self.st);
            if st.role == Role::Primary {
                OutdateResult::Refused
            } else if !lineage.contains(&st.uuids.current) {
                OutdateResult::Stale
            } else {
                mark_outdated(&mut st);
                OutdateResult::Outdated
            }
        };
        match result {
            OutdateResult::Outdated => {
                // Durable before the answer.
                if let Err(e) = self.persist().await {
                    tracing::error!(volume = %self.volume, error = %error_chain(&e), "persisting Outdated");
                    return;
                }
                tracing::warn!(volume = %self.volume, by = %requester, "marked Outdated: the Primary continues without this replica");
                self.broadcast_state();
            }
            OutdateResult::Stale => {
                let current = lock(&self.st).uuids.current;
                tracing::warn!(volume = %self.volume, by = %requester, generation = %current,
                    "stale outdate request ignored: this replica holds a generation the requester never had");
            }
            OutdateResult::Refused | OutdateResult::Unreachable => {}
        }
        let back = lock(&self.st)
            .peers
            .get(from)
            .and_then(|p| p.sender.clone());
        if let Some(s) = back {
            let _ = s.send_control(
                &EngineMessage::OutdateReply {
                    id,
                    target,
                    requester,
                    result,
                }
                .to_message(),
            );
        }
    }

    /// A tiebreaker forwards an outdate request to its target, or answers Unreachable.
    fn relay_outdate(
        &self,
        from: &str,
        id: u64,
        target: String,
        requester: String,
        lineage: Vec<Generation>,
    ) {
        let (fwd, back) = {
            let mut st = lock(&self.st);
            let fwd = st
                .peers
                .get(&target)
                .filter(|p| p.conn == ConnectionState::Connected)
                .and_then(|p| p.sender.clone());
            if fwd.is_some() {
                st.relayed_outdates
                    .insert(id, (requester.clone(), target.clone()));
            }
            (fwd, st.peers.get(from).and_then(|p| p.sender.clone()))
        };
        let msg = EngineMessage::Outdate {
            id,
            target: target.clone(),
            requester: requester.clone(),
            lineage,
        };
        match fwd {
            Some(s) if s.send_control(&msg.to_message()).is_ok() => {}
            _ => {
                if let Some(b) = back {
                    answer_unreachable(&b, id, target, requester);
                }
            }
        }
    }

    /// The answer to an outdate request: ours (`requester` is us), or one to forward.
    pub(super) async fn on_outdate_reply(
        &self,
        via: &str,
        id: u64,
        target: String,
        requester: String,
        result: OutdateResult,
    ) {
        if requester != self.node_name() {
            // A tiebreaker forwards the answer to the requester.
            let to = {
                let mut st = lock(&self.st);
                if st
                    .relayed_outdates
                    .get(&id)
                    .is_some_and(|(r, t)| *r == requester && *t == target)
                {
                    st.relayed_outdates.remove(&id);
                }
                st.peers.get(&requester).and_then(|p| p.sender.clone())
            };
            if let Some(s) = to {
                let _ = s.send_control(
                    &EngineMessage::OutdateReply {
                        id,
                        target,
                        requester,
                        result,
                    }
                    .to_message(),
                );
            }
            return;
        }
        {
            let mut st = lock(&self.st);
            if st.pending_outdates.get(&target) != Some(&id) {
                return;
            }
            match result {
                OutdateResult::Outdated | OutdateResult::Unreachable => {
                    tracing::info!(volume = %self.volume, target = %target, ?result,
                        "peer outdated (or unreachable) through the tiebreaker; writes may continue with quorum");
                    st.pending_outdates.remove(&target);
                }
                // The request stays pending: no write is admitted on its account.
                OutdateResult::Refused | OutdateResult::Stale => {}
            }
        }
        self.notify();
        if result == OutdateResult::Stale {
            self.left_behind(&target, via).await;
        }
    }

    /// A tiebreaker's state: remember every data replica's current generation from it (we
    /// are the tiebreaker) or look in its memory for a generation we lack (we are a data
    /// replica). `state` is what `peer` just sent; the caller stores it afterwards. True
    /// when a tiebreaker's memory changed (every peer should get our state again).
    pub(super) fn note_generations(
        &self,
        st: &mut State,
        peer: &str,
        state: &PeerState,
    ) -> (bool, Option<String>) {
        if self.device.is_none() {
            let Some(u) = state.uuids.as_ref().filter(|_| !state.diskless) else {
                return (false, None);
            };
            let old = st.seen_currents.insert(peer.to_string(), u.current);
            return (old != Some(u.current), None);
        }
        if !state.diskless {
            return (false, None);
        }
        let me = self.node_name();
        let newer = state.seen_currents.iter().find(|(node, g)| {
            node != me
                && !g.is_zero()
                && !g.is_just_created()
                && !st.uuids.knows(*g)
                && st
                    .peers
                    .get(node)
                    .is_some_and(|p| !p.spec.diskless && p.conn != ConnectionState::Connected)
        });
        (false, newer.map(|(node, _)| node.clone()))
    }

    /// `newer_on`, a data replica we are not connected to, holds a generation we never had
    /// (we learned it through the tiebreaker `via`): it moved on without us. A Primary
    /// without quorum steps down; our disk becomes Outdated. A Primary with quorum only
    /// logs it: the handshake with that replica will decide.
    pub(super) async fn left_behind(&self, newer_on: &str, via: &str) {
        let (primary, quorum) = {
            let st = lock(&self.st);
            (st.role == Role::Primary, st.has_quorum)
        };
        if primary && quorum {
            tracing::warn!(volume = %self.volume, peer = %newer_on, via,
                "a replica holds a generation this Primary never had; the handshake with it decides");
            return;
        }
        tracing::warn!(volume = %self.volume, peer = %newer_on, via,
            "left behind: {newer_on} holds newer data (learned through {via})");
        if primary {
            let _ = self
                .demote_now(&format!(
                    "force-secondary: Primary without quorum; {newer_on} holds newer data (learned through {via})"
                ))
                .await;
        }
        let changed = {
            let mut st = lock(&self.st);
            st.role != Role::Primary && mark_outdated(&mut st)
        };
        if changed {
            if let Err(e) = self.persist().await {
                tracing::error!(volume = %self.volume, error = %error_chain(&e), "persisting Outdated");
            }
            self.broadcast_state();
            self.notify();
        }
    }

    /// An Outdated replica connected to every other data replica, and SyncTarget of none,
    /// holds the newest data there is: UpToDate again. True when it changed (persist).
    pub(super) fn reclaim_up_to_date(&self, st: &mut State) -> bool {
        let peers: Vec<Option<ReplicationState>> = st
            .peers
            .values()
            .filter(|p| !p.spec.diskless)
            .map(|p| (p.conn == ConnectionState::Connected).then_some(p.replication))
            .collect();
        if !crate::role::outdated_but_newest(st.disk, &peers) {
            return false;
        }
        tracing::info!(volume = %self.volume,
            "Outdated, but connected to every other replica and none is newer: UpToDate");
        st.disk = DiskState::UpToDate;
        st.uuids.flags.was_up_to_date = true;
        st.uuids.flags.consistent = true;
        true
    }
}

/// Mark the local data stale (consistent, but not to be promoted). True when the disk
/// state changed.
fn mark_outdated(st: &mut State) -> bool {
    st.uuids.mark_outdated();
    if matches!(st.disk, DiskState::UpToDate | DiskState::Consistent) {
        st.disk = DiskState::Outdated;
        return true;
    }
    false
}

/// Tell `requester` (through `sender`) that the tiebreaker could not reach `target` to
/// outdate it.
pub(super) fn answer_unreachable(sender: &LinkSender, id: u64, target: String, requester: String) {
    let _ = sender.send_control(
        &EngineMessage::OutdateReply {
            id,
            target,
            requester,
            result: OutdateResult::Unreachable,
        }
        .to_message(),
    );
}
