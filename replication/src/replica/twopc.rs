//! Cluster-wide promotion as a two-phase commit (DRBD's `P_TWOPC_PREPARE/YES/NO/COMMIT`,
//! ref §4): the promoting node asks every connected member of the volume (data peers and
//! tiebreakers) "may I become Primary?", becomes Primary only after every one of them said
//! Yes (and the Yes voters plus itself have quorum when quorum is on), then sends Commit;
//! on any No, timeout or link loss it sends Abort and refuses.
//!
//! A member answers Yes when it is not Primary (unless both sides allow two primaries),
//! knows no other Primary, is not promoting itself, and holds no grant for another node.
//! It then holds the grant (refusing every other prepare) until the requester's Commit or
//! Abort, the loss of the link to the requester, or [`GRANT_HOLD`] as a backstop.
//!
//! **Tie-break** between two nodes that promote at the same time and ask each other: the
//! node whose name sorts first wins. The other one yields: it answers Yes and gives its
//! own round up (it will not commit even with every Yes). Interleavings with a third member
//! (a witness that granted the loser first) can still make both rounds fail; `promote`
//! therefore retries a round that failed only because of a concurrent promotion after a
//! random backoff (20–200 ms) until [`PROMOTE_TIMEOUT`], then refuses with "being promoted
//! on <node>". A promote that meets an existing Primary is refused at once.
//!
//! A member whose link ended within the reconnect grace
//! ([`super::EngineTunables::reconnect_grace`], 3 s by default; a demotion cycles the data links;
//! a link broke during the round) is waited for and asked once it is back; only a member
//! gone for longer is left out (quorum protects that case; with quorum off it is DRBD's
//! behaviour, a split brain is then detected at the handshake).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio::time::Instant;

use super::messages::{EngineMessage, PromoteAnswer};
use super::volume::{lock, Replica, State};
use super::EngineError;
use crate::link::LinkSender;
use crate::quorum::{self, Member, MemberStatus, QuorumMode};
use crate::role::{ConnectionState, PromoteRefusal, Protocol, Role};

/// How long a promoting node waits for every answer.
pub(super) const PREPARE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long `promote` keeps retrying rounds lost to a concurrent promotion.
pub(super) const PROMOTE_TIMEOUT: Duration = Duration::from_secs(5);
/// Backstop: a member drops a grant whose decision never came (the link to the requester
/// stays up but it went silent). The requester never commits later than
/// [`COMMIT_DEADLINE`] after its prepare.
pub(super) const GRANT_HOLD: Duration = Duration::from_secs(30);
/// A requester whose local commit (metadata write) ends later than this after the prepare
/// steps down again instead of relying on grants that may have lapsed.
pub(super) const COMMIT_DEADLINE: Duration = Duration::from_secs(20);

/// This node's promotion round in progress.
pub(super) struct PromotionRound {
    pub id: u64,
    pub started: Instant,
    /// Asked member → link id it was asked on.
    pub asked: BTreeMap<String, u64>,
    pub yes: BTreeSet<String>,
    /// The first refusal (member, answer), or a lost link (member, None).
    pub refusal: Option<(String, Option<PromoteAnswer>)>,
    /// We yielded to this node's concurrent promotion (its name sorts first).
    pub lost_to: Option<String>,
}

/// A Yes this node gave and holds until the decision.
pub(super) struct Grant {
    pub to: String,
    pub id: u64,
    pub until: Instant,
}

/// Why one round did not commit.
pub(super) enum RoundFailure {
    /// A concurrent promotion of `node`: worth a retry.
    Busy { node: String },
    /// `node` is taking a snapshot (a consistent cut): worth a retry, it lasts a moment.
    Snapshotting { node: String },
    /// The link to `node` was established a moment ago and is being re-established
    /// (or broke during the round): wait for it, within the reconnect grace.
    Reconnecting { node: String },
    /// Final.
    Refused(EngineError),
}

/// Ends this node's round however `promote_round` leaves (including when its future is
/// dropped): the round is removed and the asked members get the decision, so they never
/// hold a grant for an abandoned round until [`GRANT_HOLD`].
pub(super) struct RoundGuard<'a> {
    pub replica: &'a Replica,
    pub id: u64,
    pub senders: Vec<LinkSender>,
    /// This node became Primary in this round: the decision is Commit.
    pub commit: bool,
    /// The decision was sent.
    pub done: bool,
}

impl RoundGuard<'_> {
    /// Send the decision now.
    pub(super) fn decide(&mut self, commit: bool) {
        self.commit = commit;
        self.finish();
    }

    fn finish(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        {
            let mut st = lock(&self.replica.st);
            if st.promotion.as_ref().is_some_and(|r| r.id == self.id) {
                st.promotion = None;
            }
        }
        Replica::send_decision(&self.senders, self.id, self.commit);
        self.replica.notify();
    }
}

impl Drop for RoundGuard<'_> {
    fn drop(&mut self) {
        self.finish();
    }
}

impl Replica {
    /// A live grant for another node than `except`, if any (expired grants are dropped).
    pub(super) fn active_grant(st: &mut State, except: Option<&str>) -> Option<String> {
        if st.grant.as_ref().is_some_and(|g| g.until <= Instant::now()) {
            st.grant = None;
        }
        st.grant
            .as_ref()
            .filter(|g| except != Some(g.to.as_str()))
            .map(|g| g.to.clone())
    }

    /// Phase 1 for a promotion whose local checks passed: returns Ok when every connected
    /// member granted it; the caller then becomes Primary under the same lock as
    /// [`Replica::round_won`] and sends the decision.
    pub(super) fn start_round(
        &self,
        st: &mut State,
    ) -> Result<(u64, Vec<LinkSender>), RoundFailure> {
        if st.promotion_holds > 0 {
            return Err(RoundFailure::Snapshotting {
                node: self.node_name().to_string(),
            });
        }
        if st.promotion.is_some() {
            return Err(RoundFailure::Busy {
                node: self.node_name().to_string(),
            });
        }
        if let Some(node) = Self::active_grant(st, None) {
            return Err(RoundFailure::Busy { node });
        }
        if let Some(p) = st.peers.values().find(|p| {
            p.conn != ConnectionState::Connected
                && p.conn != ConnectionState::StandAlone
                && p.lost_at
                    .is_some_and(|t| t.elapsed() < self.node.cfg.tunables.reconnect_grace)
        }) {
            return Err(RoundFailure::Reconnecting {
                node: p.spec.name.clone(),
            });
        }
        let id = st.next_request_id;
        st.next_request_id += 1;
        let mut asked = BTreeMap::new();
        let mut senders = Vec::new();
        for p in st.peers.values() {
            if p.conn != ConnectionState::Connected || p.state.is_none() {
                continue;
            }
            if let Some(s) = &p.sender {
                asked.insert(p.spec.name.clone(), p.link_id);
                senders.push(s.clone());
            }
        }
        st.promotion = Some(PromotionRound {
            id,
            started: Instant::now(),
            asked,
            yes: BTreeSet::new(),
            refusal: None,
            lost_to: None,
        });
        Ok((id, senders))
    }

    /// Wait until the round `id` is decided by the answers (or times out). Returns with
    /// the round still in the state; [`Replica::round_won`] reads the outcome.
    pub(super) async fn wait_round(&self, id: u64) {
        let deadline = Instant::now() + PREPARE_TIMEOUT;
        let mut rx = self.changed.subscribe();
        loop {
            let done = {
                let st = lock(&self.st);
                match &st.promotion {
                    Some(r) if r.id == id => {
                        r.refusal.is_some()
                            || r.lost_to.is_some()
                            || st.closed
                            || r.asked.keys().all(|n| r.yes.contains(n))
                    }
                    _ => true,
                }
            };
            if done {
                return;
            }
            tokio::select! {
                _ = rx.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                _ = tokio::time::sleep_until(deadline) => return,
            }
        }
    }

    /// The round's outcome, under the state lock. On Ok the round is over and the caller
    /// must make this node Primary before releasing the lock (so no prepare from another
    /// node slips in between); on Err the round is over as well (the caller aborts).
    pub(super) fn round_won(&self, st: &mut State, id: u64) -> Result<Instant, RoundFailure> {
        let Some(round) = st.promotion.take_if(|r| r.id == id) else {
            return Err(RoundFailure::Refused(EngineError::Closed {
                volume: self.volume.clone(),
            }));
        };
        if st.closed {
            return Err(RoundFailure::Refused(EngineError::Closed {
                volume: self.volume.clone(),
            }));
        }
        if let Some(node) = round.lost_to {
            return Err(RoundFailure::Busy { node });
        }
        if let Some((member, answer)) = round.refusal {
            return Err(self.refusal(&member, answer));
        }
        if let Some(missing) = round.asked.keys().find(|n| !round.yes.contains(*n)) {
            return Err(RoundFailure::Refused(EngineError::PromotionNotAgreed {
                volume: self.volume.clone(),
                reason: format!("{missing} did not answer within {PREPARE_TIMEOUT:?}; try again"),
            }));
        }
        // Quorum: the members that agreed plus this node must have it.
        if Self::quorum_mode(st) != QuorumMode::Off {
            let mut members = vec![Member {
                name: self.node_name().to_string(),
                diskful: self.device.is_some(),
                status: MemberStatus::Reachable,
            }];
            for p in st.peers.values() {
                members.push(Member {
                    name: p.spec.name.clone(),
                    diskful: !p.spec.diskless,
                    status: if round.yes.contains(&p.spec.name) {
                        MemberStatus::Reachable
                    } else if p.left_gracefully {
                        MemberStatus::LeftGracefully
                    } else {
                        MemberStatus::Unknown
                    },
                });
            }
            let v = quorum::evaluate(Self::quorum_mode(st), &members, st.has_quorum);
            if !v.has_quorum {
                return Err(RoundFailure::Refused(EngineError::Promote(
                    PromoteRefusal::NoQuorum {
                        volume: self.volume.clone(),
                        node: self.node_name().to_string(),
                    },
                )));
            }
        }
        Ok(round.started)
    }

    fn refusal(&self, member: &str, answer: Option<PromoteAnswer>) -> RoundFailure {
        let volume = self.volume.clone();
        match answer {
            None | Some(PromoteAnswer::Yes) => RoundFailure::Reconnecting {
                node: member.to_string(),
            },
            Some(PromoteAnswer::Primary { node }) => {
                RoundFailure::Refused(EngineError::Promote(PromoteRefusal::OtherPrimary {
                    volume,
                    peer: node,
                }))
            }
            Some(PromoteAnswer::TwoPrimariesOff { node }) => {
                RoundFailure::Refused(EngineError::InvalidRequest(format!(
                    "{volume}: allow-two-primaries is off on {node}; switch it on there too"
                )))
            }
            Some(PromoteAnswer::Promoting { node }) => RoundFailure::Busy { node },
            Some(PromoteAnswer::Snapshotting { node }) => RoundFailure::Snapshotting { node },
            Some(PromoteAnswer::Closing) => {
                RoundFailure::Refused(EngineError::PromotionNotAgreed {
                    volume,
                    reason: format!("{member} is closing the volume"),
                })
            }
        }
    }

    /// Send the decision of round `id` to the asked members.
    pub(super) fn send_decision(senders: &[LinkSender], id: u64, commit: bool) {
        let msg = EngineMessage::PromoteDecision { id, commit }.to_message();
        for s in senders {
            let _ = s.send_control(&msg);
        }
    }

    /// A member's side: answer `peer`'s prepare at once (never waits).
    pub(super) fn on_promote_prepare(&self, peer: &str, id: u64, two_primaries: bool) {
        let me = self.node_name().to_string();
        let (answer, back) = {
            let mut st = lock(&self.st);
            let answer = self.prepare_answer(&mut st, peer, id, two_primaries, &me);
            let back = st.peers.get(peer).and_then(|p| p.sender.clone());
            (answer, back)
        };
        tracing::info!(volume = %self.volume, requester = peer, ?answer, "promotion prepare answered");
        if let Some(s) = back {
            let _ = s.send_control(&EngineMessage::PromoteReply { id, answer }.to_message());
        }
        self.notify();
    }

    fn prepare_answer(
        &self,
        st: &mut State,
        peer: &str,
        id: u64,
        two_primaries: bool,
        me: &str,
    ) -> PromoteAnswer {
        if st.closed {
            return PromoteAnswer::Closing;
        }
        if st.promotion_holds > 0 {
            return PromoteAnswer::Snapshotting { node: me.into() };
        }
        let two_ok = two_primaries && st.options.protocol == Protocol::C;
        if st.role == Role::Primary {
            if !two_primaries {
                return PromoteAnswer::Primary { node: me.into() };
            }
            if !st.allow_two_primaries || !two_ok {
                return PromoteAnswer::TwoPrimariesOff { node: me.into() };
            }
        }
        let others: Vec<String> = self
            .known_primaries(st)
            .into_iter()
            .filter(|n| n != peer && n != me)
            .collect();
        if let Some(q) = others.first() {
            // At most two primaries, and only when the requester allows it.
            if !two_ok || st.role == Role::Primary || others.len() > 1 {
                return PromoteAnswer::Primary { node: q.clone() };
            }
        }
        if let Some(round) = st.promotion.as_mut() {
            if *me < *peer {
                // Tie-break: the name that sorts first wins.
                return PromoteAnswer::Promoting { node: me.into() };
            }
            if round.lost_to.is_none() {
                tracing::info!(volume = %self.volume, winner = peer, "concurrent promotion: yielding to the node whose name sorts first");
            }
            round.lost_to = Some(peer.to_string());
        }
        if let Some(node) = Self::active_grant(st, Some(peer)) {
            return PromoteAnswer::Promoting { node };
        }
        st.grant = Some(Grant {
            to: peer.to_string(),
            id,
            until: Instant::now() + GRANT_HOLD,
        });
        PromoteAnswer::Yes
    }

    /// The requester's side: an answer to our prepare.
    pub(super) fn on_promote_reply(&self, peer: &str, id: u64, answer: PromoteAnswer) {
        {
            let mut st = lock(&self.st);
            let Some(round) = st.promotion.as_mut().filter(|r| r.id == id) else {
                return;
            };
            if !round.asked.contains_key(peer) {
                return;
            }
            if answer == PromoteAnswer::Yes {
                round.yes.insert(peer.to_string());
            } else if round.refusal.is_none() {
                round.refusal = Some((peer.to_string(), Some(answer)));
            }
        }
        self.notify();
    }

    /// A member's side: the decision for a grant. A commit makes the requester Primary in
    /// our view at once (its State follows on the same link).
    pub(super) fn on_promote_decision(&self, peer: &str, id: u64, commit: bool) {
        let relay = {
            let mut st = lock(&self.st);
            let ours = st
                .grant
                .as_ref()
                .is_some_and(|g| g.to == peer && g.id == id);
            if ours {
                st.grant = None;
            }
            let mut changed = false;
            if commit {
                if let Some(s) = st.peers.get_mut(peer).and_then(|p| p.state.as_mut()) {
                    changed = s.role != Role::Primary;
                    s.role = Role::Primary;
                }
            }
            changed && self.device.is_none()
        };
        tracing::info!(volume = %self.volume, requester = peer, commit, "promotion decided");
        if relay {
            self.broadcast_state();
        }
        self.notify();
    }

    /// The link to `peer` went down: a grant for it lapses, our round asking it fails.
    pub(super) fn twopc_link_down(st: &mut State, peer: &str) {
        if st.grant.as_ref().is_some_and(|g| g.to == peer) {
            st.grant = None;
        }
        if let Some(round) = st.promotion.as_mut() {
            // Even after its Yes: the member dropped its grant with the link.
            if round.asked.contains_key(peer) && round.refusal.is_none() {
                round.refusal = Some((peer.to_string(), None));
            }
        }
    }
}
