//! Who may become Primary and who may write: the engine's promotion, quorum and outdating
//! rules as pure functions of what one node sees. The engine (`replica::volume`,
//! `replica::twopc`, `replica::outdate`) builds a [`View`] from its state and carries out
//! the answers; the role simulator (`core::sim::roles`) drives the same functions.
//!
//! ```text
//!  View (this node, its peers as last reported)
//!   ├─ known_primaries(view)                 this node, connected Primaries, and what a
//!   │                                        connected tiebreaker relays
//!   ├─ quorum(view, had_quorum)               -> QuorumVerdict (quorum::evaluate)
//!   ├─ check_promote(view)                    -> other Primaries | Refusal   (local gate)
//!   ├─ answer_prepare(view, busy, requester)  -> Vote {answer, yield, grant} (a member)
//!   ├─ Round: handle_answer / handle_link_down / handle_link_up / yield_to / is_decided
//!   ├─ round_outcome(round, view, had_quorum) -> commit | RoundFailure   (the requester)
//!   ├─ writes_admitted(quorum, outdating)     may a Primary complete writes
//!   └─ outdate_answer(role, disk, uuids, gen) an outdate request's target
//! ```
//!
//! Promotion is a two-phase commit (DRBD's `P_TWOPC_*`, ref `drbd.md` §4): the requester
//! passes [`check_promote`] (UpToDate, quorum, no other Primary known unless two primaries
//! are allowed, `role::may_promote`), asks every connected member, each member answers with
//! [`answer_prepare`], and the requester commits only when [`round_outcome`] says so: every
//! asked member said Yes, and those members plus itself have quorum. Time (grant expiry,
//! answer timeouts, retry backoff) stays with the caller.

use std::collections::{BTreeMap, BTreeSet};

use crate::generation::{moved_on_from, Generation, UuidSet};
use crate::quorum::{self, Member, MemberStatus, QuorumMode, QuorumVerdict};
use crate::role::{self, DiskState, PeerView, PromoteContext, PromoteRefusal, Protocol, Role};

/// What this node knows of one other member of the volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerFacts {
    /// Node name.
    pub name: String,
    /// A data replica (a voter), not a diskless tiebreaker.
    pub diskful: bool,
    /// The link is up and the peer's state arrived.
    pub connected: bool,
    /// Its role as last reported (meaningful only when `connected`).
    pub role: Role,
    /// Its disk state as last reported (meaningful only when `connected`).
    pub disk: DiskState,
    /// The Primaries a connected tiebreaker relays (empty for a data peer: relaying through
    /// everyone could keep a dead Primary alive in the views).
    pub relayed_primaries: Vec<String>,
    /// It left gracefully (cleanly demoted and disconnected).
    pub left_gracefully: bool,
    /// Added online and not connected once yet: not a voter until it is.
    pub joining: bool,
}

/// Test-only faults the role simulator must catch.
#[cfg(test)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct PromotionFaults {
    /// Promote without quorum (neither the local gate nor the round checks it).
    pub ignore_quorum: bool,
}

/// One node's view of the volume, as the rules need it.
#[derive(Debug, Clone)]
pub struct View<'a> {
    /// Volume name, quoted in refusals.
    pub volume: &'a str,
    /// This node's name.
    pub node: &'a str,
    /// This node holds data (false on a tiebreaker).
    pub diskful: bool,
    /// This node's role.
    pub role: Role,
    /// This node's disk state.
    pub disk: DiskState,
    /// The volume's quorum setting.
    pub quorum: QuorumMode,
    /// This node's current quorum verdict.
    pub has_quorum: bool,
    /// The dual-primary gate on this node.
    pub allow_two_primaries: bool,
    /// The replication protocol.
    pub protocol: Protocol,
    /// Every other member.
    pub peers: &'a [PeerFacts],
    #[cfg(test)]
    pub(crate) faults: PromotionFaults,
}

impl View<'_> {
    fn quorum_checked(&self) -> bool {
        #[cfg(test)]
        if self.faults.ignore_quorum {
            return false;
        }
        self.quorum != QuorumMode::Off
    }
}

/// Nodes known to be Primary: this node, connected peers, and what connected tiebreakers
/// relay (a Primary seen through the witness).
pub fn known_primaries(view: &View) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    if view.role == Role::Primary {
        out.insert(view.node.to_string());
    }
    for p in view.peers.iter().filter(|p| p.connected) {
        if p.role == Role::Primary {
            out.insert(p.name.clone());
        }
        out.extend(
            p.relayed_primaries
                .iter()
                .filter(|n| **n != p.name)
                .cloned(),
        );
    }
    out
}

/// This node's quorum: it and its connected peers are reachable; joining peers that never
/// connected do not vote yet.
pub fn quorum(view: &View, had_quorum: bool) -> QuorumVerdict {
    let members = members(view, |p| {
        (!p.joining || p.connected).then_some(status(p.connected, p))
    });
    quorum::evaluate(view.quorum, &members, had_quorum)
}

fn status(reachable: bool, p: &PeerFacts) -> MemberStatus {
    if reachable {
        MemberStatus::Reachable
    } else if p.left_gracefully {
        MemberStatus::LeftGracefully
    } else {
        MemberStatus::Unknown
    }
}

fn members(view: &View, status: impl Fn(&PeerFacts) -> Option<MemberStatus>) -> Vec<Member> {
    let me = Member {
        name: view.node.to_string(),
        diskful: view.diskful,
        status: MemberStatus::Reachable,
    };
    std::iter::once(me)
        .chain(view.peers.iter().filter_map(|p| {
            status(p).map(|status| Member {
                name: p.name.clone(),
                diskful: p.diskful,
                status,
            })
        }))
        .collect()
}

/// Why this node may not become Primary (beyond `role::PromoteRefusal`, the 2PC's answers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The local gate (`role::may_promote`).
    Gate(PromoteRefusal),
    /// Two primaries are allowed, but `peer` is Primary without a direct link to us (the
    /// reverse data link goes to it).
    PrimaryNotConnected { peer: String },
    /// `node` is Primary and its allow-two-primaries gate is off.
    TwoPrimariesOff { node: String },
    /// `member` did not answer the prepare in time.
    NotAnswered { member: String },
    /// `member` is closing the volume.
    Closing { member: String },
}

/// The local gate with this node's current view. Ok: the other Primaries (two primaries
/// allowed: each must be connected directly).
pub fn check_promote(view: &View) -> Result<Vec<String>, Refusal> {
    let relayed = known_primaries(view);
    let mut peers: Vec<PeerView> = view
        .peers
        .iter()
        .map(|p| {
            let relayed_primary = relayed.contains(&p.name);
            PeerView {
                name: p.name.clone(),
                connected: p.connected || relayed_primary,
                role: if (p.connected && p.role == Role::Primary) || relayed_primary {
                    Role::Primary
                } else if p.connected {
                    p.role
                } else {
                    Role::Unknown
                },
                disk: if p.connected {
                    p.disk
                } else {
                    DiskState::DUnknown
                },
            }
        })
        .collect();
    peers.sort_by_key(|v| v.role != Role::Primary);
    role::may_promote(&PromoteContext {
        volume: view.volume,
        local_node: view.node,
        local_role: view.role,
        local_disk: view.disk,
        quorum_enabled: view.quorum_checked(),
        has_quorum: view.has_quorum,
        peers: &peers,
        allow_two_primaries: view.allow_two_primaries,
        protocol: view.protocol,
    })
    .map_err(Refusal::Gate)?;
    let mut others = Vec::new();
    for v in peers.iter().filter(|v| v.role == Role::Primary) {
        let direct = view
            .peers
            .iter()
            .any(|p| p.name == v.name && p.connected && p.role == Role::Primary);
        if !direct {
            return Err(Refusal::PrimaryNotConnected {
                peer: v.name.clone(),
            });
        }
        others.push(v.name.clone());
    }
    Ok(others)
}

/// Result of an outdate request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutdateResult {
    /// The target persisted Outdated.
    Outdated,
    /// The relay is not connected to the target.
    Unreachable,
    /// The target refused (it is Primary).
    Refused,
    /// The target moved on from the requester's generation (it took over while the
    /// requester was cut off): the request is stale, the target keeps its state, and the
    /// requester's data is the stale side.
    Stale,
}

/// A member's answer to a promotion prepare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PromoteAnswer {
    /// Granted: the member holds the grant until the decision (or link loss).
    Yes,
    /// `node` is Primary (and two primaries are not allowed).
    Primary { node: String },
    /// `node` is Primary and its allow-two-primaries gate is off.
    TwoPrimariesOff { node: String },
    /// A promotion of `node` is in progress (its own, or one the member granted).
    Promoting { node: String },
    /// The member is closing the volume.
    Closing,
    /// `node` is taking a snapshot of the volume and holds promotions for a moment.
    Snapshotting { node: String },
}

/// What a member is busy with when a prepare arrives.
#[derive(Debug, Clone, Copy, Default)]
pub struct Busy<'a> {
    /// The member is closing the volume.
    pub closing: bool,
    /// A snapshot holds promotions on the member.
    pub snapshotting: bool,
    /// The member runs a promotion round of its own.
    pub promoting: bool,
    /// The member holds a live grant for this node (not the requester).
    pub granted_to: Option<&'a str>,
}

/// A member's answer, and what it does with its own state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vote {
    /// Sent back to the requester.
    pub answer: PromoteAnswer,
    /// Give up the member's own round: the requester's name sorts first.
    pub yield_round: bool,
    /// Hold a grant for the requester until its decision.
    pub grant: bool,
}

/// A member's answer to `requester`'s prepare (`two_primaries`: the requester allows two
/// primaries under protocol C). Yes when this node is not Primary (unless both sides allow
/// two primaries), knows no other Primary (at most two, and only when allowed), is not
/// promoting itself (between two concurrent rounds the name that sorts first wins), and
/// holds no grant for another node.
pub fn answer_prepare(view: &View, busy: Busy, requester: &str, two_primaries: bool) -> Vote {
    let vote = |answer| Vote {
        answer,
        yield_round: false,
        grant: false,
    };
    let me = view.node;
    if busy.closing {
        return vote(PromoteAnswer::Closing);
    }
    if busy.snapshotting {
        return vote(PromoteAnswer::Snapshotting { node: me.into() });
    }
    let two_ok = two_primaries && view.protocol == Protocol::C;
    if view.role == Role::Primary {
        if !two_primaries {
            return vote(PromoteAnswer::Primary { node: me.into() });
        }
        if !view.allow_two_primaries || !two_ok {
            return vote(PromoteAnswer::TwoPrimariesOff { node: me.into() });
        }
    }
    let others: Vec<String> = known_primaries(view)
        .into_iter()
        .filter(|n| n != requester && n != me)
        .collect();
    if let Some(q) = others.first() {
        // At most two primaries, and only when the requester allows it.
        if !two_ok || view.role == Role::Primary || others.len() > 1 {
            return vote(PromoteAnswer::Primary { node: q.clone() });
        }
    }
    let mut out = vote(PromoteAnswer::Yes);
    if busy.promoting {
        if me < requester {
            out.answer = PromoteAnswer::Promoting { node: me.into() };
            return out;
        }
        out.yield_round = true;
    }
    if let Some(node) = busy.granted_to {
        out.answer = PromoteAnswer::Promoting { node: node.into() };
        return out;
    }
    out.grant = true;
    out
}

/// This node's promotion round in progress: who was asked (member → link id), who said
/// Yes, the first refusal, and whether it yielded to a concurrent round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Round {
    /// Round id, echoed in the answers and the decision.
    pub id: u64,
    /// Asked member → the link it was asked on.
    pub asked: BTreeMap<String, u64>,
    /// Members that said Yes.
    pub yes: BTreeSet<String>,
    /// The first refusal (member, answer), or a lost link (member, None).
    pub refusal: Option<(String, Option<PromoteAnswer>)>,
    /// This node yielded to that node's concurrent promotion (its name sorts first).
    pub lost_to: Option<String>,
}

impl Round {
    /// A round `id` asking `asked`.
    pub fn new(id: u64, asked: BTreeMap<String, u64>) -> Round {
        Round {
            id,
            asked,
            yes: BTreeSet::new(),
            refusal: None,
            lost_to: None,
        }
    }

    /// `member` answered.
    pub fn handle_answer(&mut self, member: &str, answer: PromoteAnswer) {
        if !self.asked.contains_key(member) {
            return;
        }
        if answer == PromoteAnswer::Yes {
            self.yes.insert(member.to_string());
        } else if self.refusal.is_none() {
            self.refusal = Some((member.to_string(), Some(answer)));
        }
    }

    /// The link to `member` went down: even after its Yes (it dropped its grant with the
    /// link), the round fails.
    pub fn handle_link_down(&mut self, member: &str) {
        if self.asked.contains_key(member) && self.refusal.is_none() {
            self.refusal = Some((member.to_string(), None));
        }
    }

    /// The link to `member` came up during the round. A member not asked has not agreed,
    /// and it may know what the asked ones did not (it may be Primary, or have made this
    /// node its Secondary): the round fails, to be retried with everyone.
    pub fn handle_link_up(&mut self, member: &str) {
        if !self.asked.contains_key(member) && self.refusal.is_none() {
            self.refusal = Some((member.to_string(), None));
        }
    }

    /// This node granted `node`'s concurrent round.
    pub fn yield_to(&mut self, node: &str) {
        self.lost_to = Some(node.to_string());
    }

    /// Every answer needed is in (or one already decided against the round).
    pub fn is_decided(&self) -> bool {
        self.refusal.is_some()
            || self.lost_to.is_some()
            || self.asked.keys().all(|n| self.yes.contains(n))
    }
}

/// Why one round did not commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoundFailure {
    /// A concurrent promotion of `node`: worth a retry.
    Busy { node: String },
    /// `node` is taking a snapshot (a consistent cut): worth a retry, it lasts a moment.
    Snapshotting { node: String },
    /// The link to `node` broke during the round (or is being re-established): retry once
    /// it is back.
    Reconnecting { node: String },
    /// Final.
    Refused(Refusal),
}

/// The requester's decision once the round is decided (or timed out): commit only when no
/// concurrent round won, nobody refused, every asked member said Yes, and the members
/// that agreed plus this node have quorum. The caller checks its local gate again.
pub fn round_outcome(round: &Round, view: &View, had_quorum: bool) -> Result<(), RoundFailure> {
    if let Some(node) = &round.lost_to {
        return Err(RoundFailure::Busy { node: node.clone() });
    }
    if let Some((member, answer)) = &round.refusal {
        return Err(failure_from_answer(view.volume, member, answer.clone()));
    }
    if let Some(missing) = round.asked.keys().find(|n| !round.yes.contains(*n)) {
        return Err(RoundFailure::Refused(Refusal::NotAnswered {
            member: missing.clone(),
        }));
    }
    if view.quorum_checked() {
        let members = members(view, |p| Some(status(round.yes.contains(&p.name), p)));
        if !quorum::evaluate(view.quorum, &members, had_quorum).has_quorum {
            return Err(RoundFailure::Refused(Refusal::Gate(
                PromoteRefusal::NoQuorum {
                    volume: view.volume.to_string(),
                    node: view.node.to_string(),
                },
            )));
        }
    }
    Ok(())
}

fn failure_from_answer(volume: &str, member: &str, answer: Option<PromoteAnswer>) -> RoundFailure {
    match answer {
        None | Some(PromoteAnswer::Yes) => RoundFailure::Reconnecting {
            node: member.to_string(),
        },
        Some(PromoteAnswer::Primary { node }) => {
            RoundFailure::Refused(Refusal::Gate(PromoteRefusal::OtherPrimary {
                volume: volume.to_string(),
                peer: node,
            }))
        }
        Some(PromoteAnswer::TwoPrimariesOff { node }) => {
            RoundFailure::Refused(Refusal::TwoPrimariesOff { node })
        }
        Some(PromoteAnswer::Promoting { node }) => RoundFailure::Busy { node },
        Some(PromoteAnswer::Snapshotting { node }) => RoundFailure::Snapshotting { node },
        Some(PromoteAnswer::Closing) => RoundFailure::Refused(Refusal::Closing {
            member: member.to_string(),
        }),
    }
}

/// Whether a Primary may complete writes now: it has quorum (or quorum is off) and no
/// lost data peer is still waiting to be outdated through a tiebreaker.
pub fn writes_admitted(quorum: QuorumMode, has_quorum: bool, outdating: bool) -> bool {
    (has_quorum || quorum == QuorumMode::Off) && !outdating
}

/// The target's answer to an outdate request from a requester at `generation`. A Primary
/// refuses. A target holding consistent data that moved on from that generation answers
/// Stale; any other target is marked Outdated (for an Inconsistent or Outdated one that
/// changes nothing it could be promoted with).
pub fn outdate_answer(
    role: Role,
    disk: DiskState,
    uuids: &UuidSet,
    generation: Generation,
) -> OutdateResult {
    if role == Role::Primary {
        OutdateResult::Refused
    } else if matches!(disk, DiskState::UpToDate | DiskState::Consistent)
        && moved_on_from(&uuids.lineage(), generation)
    {
        OutdateResult::Stale
    } else {
        OutdateResult::Outdated
    }
}

#[cfg(test)]
mod tests;
