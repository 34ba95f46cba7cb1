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
//!
//! The decisions themselves (a member's answer, the round's outcome, the local gate) are
//! the pure rules of [`crate::core::promotion`], which the role simulator drives too; this
//! module carries them out: messages, grants with their expiry, waiting and retrying.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

use super::messages::{EngineMessage, PromoteAnswer};
use super::volume::{lock, Replica, State};
use super::EngineError;
use crate::core::promotion::{self, Busy, Refusal, Round};
use crate::link::LinkSender;
use crate::role::{ConnectionState, Role};

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

/// This node's promotion round in progress (the rules' [`Round`]) and when it started.
pub(super) struct PromotionRound {
    pub round: Round,
    pub started: Instant,
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

impl Replica {
    /// The engine's error for a refusal of the promotion rules.
    pub(super) fn refusal_error(&self, refusal: Refusal) -> EngineError {
        let volume = self.volume.clone();
        match refusal {
            Refusal::Gate(r) => EngineError::Promote(r),
            Refusal::PrimaryNotConnected { peer } => EngineError::InvalidRequest(format!(
                "{volume}: {peer} is Primary but not connected to this node; two primaries need a working replication link"
            )),
            Refusal::TwoPrimariesOff { node } => EngineError::InvalidRequest(format!(
                "{volume}: allow-two-primaries is off on {node}; switch it on there too"
            )),
            Refusal::NotAnswered { member } => EngineError::PromotionNotAgreed {
                volume,
                reason: format!("{member} did not answer within {PREPARE_TIMEOUT:?}; try again"),
            },
            Refusal::Closing { member } => EngineError::PromotionNotAgreed {
                volume,
                reason: format!("{member} is closing the volume"),
            },
        }
    }

    fn round_failure(&self, failure: promotion::RoundFailure) -> RoundFailure {
        match failure {
            promotion::RoundFailure::Busy { node } => RoundFailure::Busy { node },
            promotion::RoundFailure::Snapshotting { node } => RoundFailure::Snapshotting { node },
            promotion::RoundFailure::Reconnecting { node } => RoundFailure::Reconnecting { node },
            promotion::RoundFailure::Refused(r) => RoundFailure::Refused(self.refusal_error(r)),
        }
    }
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
            if st.promotion.as_ref().is_some_and(|r| r.round.id == self.id) {
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
            round: Round::new(id, asked),
            started: Instant::now(),
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
                    Some(r) if r.round.id == id => r.round.is_decided() || st.closed,
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
        let Some(round) = st.promotion.take_if(|r| r.round.id == id) else {
            return Err(RoundFailure::Refused(EngineError::Closed {
                volume: self.volume.clone(),
            }));
        };
        if st.closed {
            return Err(RoundFailure::Refused(EngineError::Closed {
                volume: self.volume.clone(),
            }));
        }
        let facts = Self::peer_facts(st);
        promotion::round_outcome(&round.round, &self.view(st, &facts), st.has_quorum)
            .map_err(|f| self.round_failure(f))?;
        Ok(round.started)
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
        let (answer, back) = {
            let mut st = lock(&self.st);
            let answer = self.prepare_answer(&mut st, peer, id, two_primaries);
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
    ) -> PromoteAnswer {
        let granted_to = Self::active_grant(st, Some(peer));
        let facts = Self::peer_facts(st);
        let busy = Busy {
            closing: st.closed,
            snapshotting: st.promotion_holds > 0,
            promoting: st.promotion.is_some(),
            granted_to: granted_to.as_deref(),
        };
        let vote = promotion::answer_prepare(&self.view(st, &facts), busy, peer, two_primaries);
        if vote.yield_round {
            if let Some(p) = st.promotion.as_mut() {
                if p.round.lost_to.is_none() {
                    tracing::info!(volume = %self.volume, winner = peer, "concurrent promotion: yielding to the node whose name sorts first");
                }
                p.round.yield_to(peer);
            }
        }
        if vote.grant {
            st.grant = Some(Grant {
                to: peer.to_string(),
                id,
                until: Instant::now() + GRANT_HOLD,
            });
        }
        vote.answer
    }

    /// The requester's side: an answer to our prepare.
    pub(super) fn on_promote_reply(&self, peer: &str, id: u64, answer: PromoteAnswer) {
        {
            let mut st = lock(&self.st);
            let Some(p) = st.promotion.as_mut().filter(|r| r.round.id == id) else {
                return;
            };
            p.round.handle_answer(peer, answer);
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

    /// The link to `peer` came up: our round fails unless it asked `peer` (then retried
    /// with everyone; `core::promotion::Round::handle_link_up`).
    pub(super) fn twopc_link_up(st: &mut State, peer: &str) {
        if let Some(p) = st.promotion.as_mut() {
            p.round.handle_link_up(peer);
        }
    }

    /// The link to `peer` went down: a grant for it lapses, our round asking it fails.
    pub(super) fn twopc_link_down(st: &mut State, peer: &str) {
        if st.grant.as_ref().is_some_and(|g| g.to == peer) {
            st.grant = None;
        }
        if let Some(p) = st.promotion.as_mut() {
            p.round.handle_link_down(peer);
        }
    }
}
