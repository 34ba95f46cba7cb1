//! Outdating through a tiebreaker, tied to generations, and learning that this replica was
//! left behind. Every rule here asks for *positive ancestry*: a replica is newer than
//! another only if the other's current generation is in its history
//! ([`moved_on_from`]); a generation that is merely unknown (older than the history
//! reaches, or on a branch that ended) never counts.
//!
//! - A Primary that keeps quorum while losing a data peer asks a tiebreaker to outdate it
//!   (`connection.rs`, `link_down`); so does a node promoted while a data peer was not
//!   connected to it, before its first write ([`Replica::outdate_unreached_peers`]): that
//!   peer may still reach the tiebreaker and keep quorum through it, and if the new Primary
//!   died before the tiebreaker learned its new generation, the peer could take over
//!   without its writes. (DRBD outdates such a "weak" node at the promotion itself; we
//!   wait for the first write, so promoting and demoting again leaves the peer
//!   promotable.) The request carries the requester's current
//!   generation *as it is when the request is sent*, which may be long after it was
//!   decided: it is resent on every new link to a tiebreaker. A target that moved on from
//!   that generation (it took over meanwhile) and holds consistent data answers
//!   [`OutdateResult::Stale`] and keeps its state
//!   ([`crate::core::promotion::outdate_answer`]): a stale request is
//!   never applied to a newer generation. The requester keeps it pending, so no write is
//!   admitted on its account.
//! - A tiebreaker remembers the lineage each data replica last reported
//!   (`State::seen_lineages`) and relays it in every state it sends. A data replica not
//!   connected to one of them that finds there a lineage that moved on from its own
//!   current generation was left behind ([`Replica::left_behind`]); so is the requester of
//!   a stale outdate. Such a replica never regains a role through the tiebreaker:
//!   - a Primary without quorum steps down (force-secondary; none of its frozen requests
//!     was acknowledged) instead of staying Primary and blocking the new side's promotion;
//!   - its disk becomes Outdated, durably, until a resync from the newer side.
//! - The other way round, an Outdated replica that is connected to every other data
//!   replica, each holding data of its own, and is the SyncTarget of none holds the newest
//!   data there is: it becomes UpToDate again ([`crate::role::outdated_but_newest`]),
//!   whatever marked it.

use super::messages::{EngineMessage, OutdateResult, PeerState};
use super::volume::{lock, Replica, State};
use crate::core::promotion::outdate_answer;
use crate::failure_log::error_chain;
use crate::generation::{moved_on_from, Generation};
use crate::link::LinkSender;
use crate::role::{ConnectionState, DiskState, ReplicationState, Role};
use crate::wire::Message;

impl Replica {
    /// The outdate request for `target`, with our current generation as it is now.
    pub(super) fn outdate_request(&self, st: &State, id: u64, target: &str) -> Message {
        EngineMessage::Outdate {
            id,
            target: target.to_string(),
            requester: self.node_name().to_string(),
            generation: st.uuids.current,
        }
        .to_message()
    }

    /// The first write since a promotion with a data peer away, with quorum: every data
    /// peer not connected to us must be seen Outdated (or unreachable) through a connected
    /// tiebreaker before the write is admitted, as after losing it while Primary. Records
    /// them in `pending_outdates` and returns the requests and the tiebreakers to send them
    /// through.
    pub(super) fn outdate_unreached_peers(
        &self,
        st: &mut State,
    ) -> Option<(Vec<Message>, Vec<LinkSender>)> {
        let relays = tiebreakers(st);
        if !st.has_quorum || relays.is_empty() {
            return None;
        }
        let unreached: Vec<String> = st
            .peers
            .values()
            .filter(|p| !p.spec.diskless)
            .filter(|p| p.conn != ConnectionState::Connected || p.state.is_none())
            .map(|p| p.spec.name.clone())
            .collect();
        let mut requests = Vec::new();
        for target in unreached {
            let id = st.next_request_id;
            st.next_request_id += 1;
            st.pending_outdates.insert(target.clone(), id);
            requests.push(self.outdate_request(st, id, &target));
        }
        (!requests.is_empty()).then_some((requests, relays))
    }

    /// An outdate request for `target`, from `requester`, reached us through `from`: apply
    /// it if we are the target, else relay it (we are the tiebreaker).
    pub(super) async fn on_outdate(
        &self,
        from: &str,
        id: u64,
        target: String,
        requester: String,
        generation: Generation,
    ) {
        if target != self.node_name() {
            self.relay_outdate(from, id, target, requester, generation);
            return;
        }
        let result = {
            let mut st = lock(&self.st);
            let result = outdate_answer(st.role, st.disk, &st.uuids, generation);
            if result == OutdateResult::Outdated {
                mark_outdated(&mut st);
            }
            result
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
                    "stale outdate request ignored: this replica moved on from the requester's generation");
            }
            OutdateResult::Refused | OutdateResult::Unreachable => {}
        }
        let back = lock(&self.st)
            .peers
            .get(from)
            .and_then(|p| p.sender.clone());
        if let Some(s) = back {
            send_outdate_reply(&s, id, target, requester, result);
        }
    }

    /// A tiebreaker forwards an outdate request to its target, or answers Unreachable.
    fn relay_outdate(
        &self,
        from: &str,
        id: u64,
        target: String,
        requester: String,
        generation: Generation,
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
            generation,
        };
        match fwd {
            Some(s) if s.send_control(&msg.to_message()).is_ok() => {}
            _ => {
                if let Some(b) = back {
                    send_outdate_reply(&b, id, target, requester, OutdateResult::Unreachable);
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
                send_outdate_reply(&s, id, target, requester, result);
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
            self.left_behind(&target, via, None).await;
        }
    }

    /// A tiebreaker's state: remember every data replica's lineage from it (we are the
    /// tiebreaker) or look in its memory for a replica that moved on from us (we are a
    /// data replica). `state` is what `peer` just sent; the caller stores it afterwards.
    /// Returns whether a tiebreaker's memory changed (every peer should get our state
    /// again) and, for a data replica, who moved on without us with that lineage.
    pub(super) fn note_generations(
        &self,
        st: &mut State,
        peer: &str,
        state: &PeerState,
    ) -> (bool, Option<(String, Vec<Generation>)>) {
        if self.device.is_none() {
            let Some(u) = state.uuids.as_ref().filter(|_| !state.diskless) else {
                return (false, None);
            };
            let lineage = u.lineage();
            let old = st.seen_lineages.insert(peer.to_string(), lineage.clone());
            return (old.as_ref() != Some(&lineage), None);
        }
        if !state.diskless {
            return (false, None);
        }
        let newer = state
            .seen_lineages
            .iter()
            .find(|(node, lineage)| self.left_behind_by(st, node, lineage));
        (false, newer.cloned())
    }

    /// `node` (as a tiebreaker remembers its `lineage`) moved on from our generation and is
    /// a data replica we are not connected to (a connected one is the handshake's).
    fn left_behind_by(&self, st: &State, node: &str, lineage: &[Generation]) -> bool {
        node != self.node_name()
            && moved_on_from(lineage, st.uuids.current)
            && st
                .peers
                .get(node)
                .is_some_and(|p| !p.spec.diskless && p.conn != ConnectionState::Connected)
    }

    /// `newer_on`, a data replica we are not connected to, moved on from our generation
    /// (we learned it through the tiebreaker `via`, with its `lineage` when the tiebreaker
    /// relayed it): it went on without us. A Primary without quorum steps down; our disk
    /// becomes Outdated. A Primary with quorum only logs it: the handshake with that
    /// replica will decide. Everything is checked again under the lock before the disk is
    /// marked: a handshake with `newer_on` may have resynced us meanwhile.
    pub(super) async fn left_behind(
        &self,
        newer_on: &str,
        via: &str,
        lineage: Option<&[Generation]>,
    ) {
        let (primary, quorum) = {
            let st = lock(&self.st);
            (st.role == Role::Primary, st.has_quorum)
        };
        if primary && quorum {
            tracing::warn!(volume = %self.volume, peer = %newer_on, via,
                "a replica moved on from this Primary's generation; the handshake with it decides");
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
            let still = match lineage {
                Some(l) => self.left_behind_by(&st, newer_on, l),
                None => st
                    .peers
                    .get(newer_on)
                    .is_some_and(|p| p.conn != ConnectionState::Connected),
            };
            still && st.role != Role::Primary && mark_outdated(&mut st)
        };
        if changed {
            if let Err(e) = self.persist().await {
                tracing::error!(volume = %self.volume, error = %error_chain(&e), "persisting Outdated");
            }
            self.broadcast_state();
            self.notify();
        }
    }

    /// An Outdated replica connected to every other data replica (each with data of its
    /// own, as it last reported), and SyncTarget of none, holds the newest data there is:
    /// UpToDate again. True when it changed (persist).
    pub(super) fn reclaim_up_to_date(&self, st: &mut State) -> bool {
        let peers: Vec<Option<(ReplicationState, DiskState)>> = st
            .peers
            .values()
            .filter(|p| !p.spec.diskless)
            .map(|p| {
                let disk = p.state.as_ref().map_or(DiskState::DUnknown, |s| s.disk);
                (p.conn == ConnectionState::Connected).then_some((p.replication, disk))
            })
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

/// The links to the connected tiebreakers, which relay outdate requests.
pub(super) fn tiebreakers(st: &State) -> Vec<LinkSender> {
    st.peers
        .values()
        .filter(|p| p.spec.diskless && p.conn == ConnectionState::Connected)
        .filter_map(|p| p.sender.clone())
        .collect()
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

/// Send the answer to outdate request `id` (`requester` asked to outdate `target`).
pub(super) fn send_outdate_reply(
    sender: &LinkSender,
    id: u64,
    target: String,
    requester: String,
    result: OutdateResult,
) {
    let _ = sender.send_control(
        &EngineMessage::OutdateReply {
            id,
            target,
            requester,
            result,
        }
        .to_message(),
    );
}
