//! The connect-time sync decision: given both replicas' [`UuidSet`]s, who syncs from whom,
//! by bitmap or in full — or is it split brain? (ref `drbd.md` §2 "Handshake decision",
//! DRBD's `drbd_uuid_compare`.) Pure; every outcome names the [`Rule`] that fired, for the
//! log and for `tandem volume status`.
//!
//! Rule order (first match wins; "I" = local, "peer" = remote):
//!
//! | # | rule | outcome |
//! |---|------|---------|
//! | 1 | both currents JUST_CREATED | no sync |
//! | 1 | one side JUST_CREATED | full sync from the other |
//! | 2 | currents equal, nobody crashed | no sync |
//! | 2 | currents equal, one side crashed Primary | bitmap resync; protocol C: survivor is source, A/B: crashed side is source |
//! | 2 | currents equal, both crashed Primary | bitmap resync; tie broken by node name (smaller name is source) |
//! | 2 | currents equal, one side Primary-lost-quorum | bitmap resync, that side is target |
//! | 2 | currents equal, one side uncertain (was a resync target of a third node since) | bitmap resync, that side is target (both: name tie-break) |
//! | 3 | `peer.bitmap[me] == my.current` | bitmap resync, I am target |
//! | 3 | `my.bitmap[peer] == peer.current` | bitmap resync, I am source |
//! | 4 | my current in peer's history | full sync, I am target |
//! | 4 | peer's current in my history | full sync, I am source |
//! | 5 | `my.bitmap[peer] == peer.bitmap[me] != 0`, currents differ | split brain, auto-recoverable |
//! | 6 | any generation in common | split brain, disconnect |
//! | 7 | nothing in common | unrelated data, disconnect |
//!
//! A split brain of rule 5 may be resolved by an after-split-brain policy
//! ([`resolve_split_brain`]); otherwise, or for rule 6, the operator resolves it with
//! `tandem volume resolve NAME --discard-local` ([`resolve_manually`]).
//!
//! What the engine must do around a decision (the randomized model in the tests checks
//! these together with the rules):
//! - a bitmap resync transfers the *union* of both sides' bitmaps for the pair (the two
//!   replicas exchange bitmaps after the handshake);
//! - a Primary never becomes SyncTarget (DRBD's `rr-conflict`): disconnect instead;
//! - resync writes on the target set bits in its bitmaps for every other peer, and the
//!   target calls `UuidSet::finish_resync_as_target` (the source
//!   `finish_resync_as_source`) when done; "no sync" calls `UuidSet::in_sync_with` and
//!   clears the pair's bits;
//! - a Primary arms a new generation whenever any replica leaves the set receiving its
//!   writes (see `generation.rs`).
//!
//! Differences from DRBD:
//! - the "uncertain" rule is ours (DRBD tracks this through peer-acks and bitmap exchange
//!   between secondaries; see `generation.rs`);
//! - no "missed resync-finish" repair rules (our resync completion is one metadata write);
//! - rule 3 does not look at bitmap slots for *third* nodes (that case falls to rule 4, a
//!   full sync);
//! - the both-crashed tie uses node names instead of the `RESOLVE_CONFLICTS` connection bit;
//! - a policy never picks a side that is Primary right now as the victim (that would change
//!   data under a running VM), so DRBD's separate `after-sb-1pri`/`after-sb-2pri` settings
//!   are not offered: one policy, applied as if no side were Primary, and "disconnect"
//!   whenever the victim would be a Primary.

use crate::generation::UuidSet;
use crate::role::{ConnectionState, Protocol, ReplicationState};
use std::fmt;

/// Which way data flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// This replica is SyncSource.
    LocalIsSource,
    /// This replica is SyncTarget.
    LocalIsTarget,
}

impl Direction {
    /// The same direction seen from the other side.
    pub fn mirrored(self) -> Direction {
        match self {
            Direction::LocalIsSource => Direction::LocalIsTarget,
            Direction::LocalIsTarget => Direction::LocalIsSource,
        }
    }
}

/// What the handshake decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SyncOutcome {
    /// Replicas are in sync.
    NoSync,
    /// Resync the blocks set in either side's bitmap for this pair.
    BitmapResync(Direction),
    /// Resync every block.
    FullSync(Direction),
    /// Both sides wrote since a common generation tracked by both bitmaps; an
    /// after-split-brain policy may pick a victim and resync by bitmap.
    SplitBrainAutoRecoverable,
    /// Both sides diverged; the operator must pick a victim (full sync).
    SplitBrainDisconnect,
    /// Nothing in common: the replicas are not of the same volume history.
    UnrelatedData,
}

impl SyncOutcome {
    /// Whether the connection must not proceed to replication without a resolution.
    pub fn is_split_brain(self) -> bool {
        matches!(
            self,
            SyncOutcome::SplitBrainAutoRecoverable
                | SyncOutcome::SplitBrainDisconnect
                | SyncOutcome::UnrelatedData
        )
    }

    /// The same outcome seen from the other side.
    pub fn mirrored(self) -> SyncOutcome {
        match self {
            SyncOutcome::BitmapResync(d) => SyncOutcome::BitmapResync(d.mirrored()),
            SyncOutcome::FullSync(d) => SyncOutcome::FullSync(d.mirrored()),
            other => other,
        }
    }
}

/// The rule that decided (see the module table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rule {
    /// 1: both replicas were just created.
    BothJustCreated,
    /// 1: this replica was just created.
    LocalJustCreated,
    /// 1: the peer was just created.
    PeerJustCreated,
    /// 2: currents equal.
    EqualCurrents,
    /// 2: currents equal; this replica crashed while Primary.
    LocalCrashedPrimary,
    /// 2: currents equal; the peer crashed while Primary.
    PeerCrashedPrimary,
    /// 2: currents equal; both crashed while Primary.
    BothCrashedPrimary,
    /// 2: currents equal; this replica lost quorum while Primary.
    LocalLostQuorum,
    /// 2: currents equal; the peer lost quorum while Primary.
    PeerLostQuorum,
    /// 2: currents equal; this replica was a resync target since it last synced with the peer.
    LocalUncertain,
    /// 2: currents equal; the peer was a resync target since it last synced with me.
    PeerUncertain,
    /// 2: currents equal; both were resync targets of others since.
    BothUncertain,
    /// 3: the peer's bitmap slot for me equals my current.
    PeerBitmapMatchesLocalCurrent,
    /// 3: my bitmap slot for the peer equals the peer's current.
    LocalBitmapMatchesPeerCurrent,
    /// 4: my current is in the peer's history.
    LocalCurrentInPeerHistory,
    /// 4: the peer's current is in my history.
    PeerCurrentInLocalHistory,
    /// 5: equal non-zero bitmap slots, different currents.
    EqualBitmapUuids,
    /// 6: some generation in common.
    CommonHistory,
    /// 7: nothing in common.
    NothingInCommon,
}

impl Rule {
    /// The rule number of the module table.
    pub fn number(self) -> u8 {
        match self {
            Rule::BothJustCreated | Rule::LocalJustCreated | Rule::PeerJustCreated => 1,
            Rule::EqualCurrents
            | Rule::LocalCrashedPrimary
            | Rule::PeerCrashedPrimary
            | Rule::BothCrashedPrimary
            | Rule::LocalLostQuorum
            | Rule::PeerLostQuorum
            | Rule::LocalUncertain
            | Rule::PeerUncertain
            | Rule::BothUncertain => 2,
            Rule::PeerBitmapMatchesLocalCurrent | Rule::LocalBitmapMatchesPeerCurrent => 3,
            Rule::LocalCurrentInPeerHistory | Rule::PeerCurrentInLocalHistory => 4,
            Rule::EqualBitmapUuids => 5,
            Rule::CommonHistory => 6,
            Rule::NothingInCommon => 7,
        }
    }

    /// The name used in logs and test tables.
    pub fn name(self) -> &'static str {
        match self {
            Rule::BothJustCreated => "both-just-created",
            Rule::LocalJustCreated => "local-just-created",
            Rule::PeerJustCreated => "peer-just-created",
            Rule::EqualCurrents => "equal-currents",
            Rule::LocalCrashedPrimary => "local-crashed-primary",
            Rule::PeerCrashedPrimary => "peer-crashed-primary",
            Rule::BothCrashedPrimary => "both-crashed-primary",
            Rule::LocalLostQuorum => "local-lost-quorum",
            Rule::PeerLostQuorum => "peer-lost-quorum",
            Rule::LocalUncertain => "local-uncertain",
            Rule::PeerUncertain => "peer-uncertain",
            Rule::BothUncertain => "both-uncertain",
            Rule::PeerBitmapMatchesLocalCurrent => "peer-bitmap-matches-local-current",
            Rule::LocalBitmapMatchesPeerCurrent => "local-bitmap-matches-peer-current",
            Rule::LocalCurrentInPeerHistory => "local-current-in-peer-history",
            Rule::PeerCurrentInLocalHistory => "peer-current-in-local-history",
            Rule::EqualBitmapUuids => "equal-bitmap-uuids",
            Rule::CommonHistory => "common-history",
            Rule::NothingInCommon => "nothing-in-common",
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rule {} ({})", self.number(), self.name())
    }
}

/// A decision and the rule behind it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SyncDecision {
    /// What to do.
    pub outcome: SyncOutcome,
    /// Why.
    pub rule: Rule,
}

impl SyncDecision {
    /// The replication state this node enters towards the peer (`StandAlone` cases map to
    /// `Off`; the connection state says StandAlone).
    pub fn replication_state(&self) -> ReplicationState {
        match self.outcome {
            SyncOutcome::NoSync => ReplicationState::Established,
            SyncOutcome::BitmapResync(Direction::LocalIsSource)
            | SyncOutcome::FullSync(Direction::LocalIsSource) => ReplicationState::SyncSource,
            SyncOutcome::BitmapResync(Direction::LocalIsTarget)
            | SyncOutcome::FullSync(Direction::LocalIsTarget) => ReplicationState::SyncTarget,
            _ => ReplicationState::Off,
        }
    }

    /// The connection state after the handshake: split brain and unrelated data leave the
    /// connection `StandAlone` (no automatic reconnect), everything else `Connected`.
    pub fn connection_state(&self) -> ConnectionState {
        if self.outcome.is_split_brain() {
            ConnectionState::StandAlone
        } else {
            ConnectionState::Connected
        }
    }

    /// One operator-ready line for the log and `tandem volume status`, naming the rule and,
    /// for a split brain, the command that resolves it.
    pub fn describe(&self, volume: &str, local: &str, peer: &str) -> String {
        let why = self.rule;
        match self.outcome {
            SyncOutcome::NoSync => format!("{volume}: {local} and {peer} are in sync ({why})"),
            SyncOutcome::BitmapResync(d) | SyncOutcome::FullSync(d) => {
                let kind = if matches!(self.outcome, SyncOutcome::FullSync(_)) {
                    "full sync"
                } else {
                    "bitmap resync"
                };
                let (src, dst) = match d {
                    Direction::LocalIsSource => (local, peer),
                    Direction::LocalIsTarget => (peer, local),
                };
                format!("{volume}: {kind} from {src} to {dst} ({why})")
            }
            SyncOutcome::SplitBrainAutoRecoverable | SyncOutcome::SplitBrainDisconnect => format!(
                "{volume}: split brain between {local} and {peer}: both wrote since they last \
                 were connected ({why}); disconnected, nothing overwritten. On the node whose \
                 changes are to be DISCARDED run: tandem volume resolve {volume} --discard-local"
            ),
            SyncOutcome::UnrelatedData => format!(
                "{volume}: {local} and {peer} hold unrelated data ({why}); disconnected. One of \
                 the replicas does not belong to this volume: delete and re-create it"
            ),
        }
    }
}

/// Facts about the connection that the UUIDs do not carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecisionContext<'a> {
    /// This node's name (the key of my slot in the peer's bitmap map).
    pub local_name: &'a str,
    /// The peer's name (the key of its slot in my bitmap map).
    pub peer_name: &'a str,
    /// The connection's protocol (direction after a Primary crash).
    pub protocol: Protocol,
}

fn decided(outcome: SyncOutcome, rule: Rule) -> SyncDecision {
    SyncDecision { outcome, rule }
}

/// The handshake decision (rule order of the module table). Pure and symmetric:
/// `decide(a, b)` is the mirror of `decide(b, a)`.
pub fn decide(local: &UuidSet, peer: &UuidSet, ctx: &DecisionContext<'_>) -> SyncDecision {
    use Direction::*;
    use SyncOutcome::*;
    let me = local.current;
    let them = peer.current;

    // Rule 1: just created.
    match (me.is_just_created(), them.is_just_created()) {
        (true, true) => return decided(NoSync, Rule::BothJustCreated),
        (true, false) => return decided(FullSync(LocalIsTarget), Rule::LocalJustCreated),
        (false, true) => return decided(FullSync(LocalIsSource), Rule::PeerJustCreated),
        (false, false) => {}
    }

    // Rule 2: equal currents, with the crashed-primary / lost-quorum exceptions.
    if me == them {
        let i_crashed = local.is_crashed_primary_for(ctx.peer_name);
        let they_crashed = peer.is_crashed_primary_for(ctx.local_name);
        let crashed_is_source = ctx.protocol != Protocol::C;
        return match (i_crashed, they_crashed) {
            (true, true) => {
                let dir = if ctx.local_name < ctx.peer_name {
                    LocalIsSource
                } else {
                    LocalIsTarget
                };
                decided(BitmapResync(dir), Rule::BothCrashedPrimary)
            }
            (true, false) => {
                let dir = if crashed_is_source {
                    LocalIsSource
                } else {
                    LocalIsTarget
                };
                decided(BitmapResync(dir), Rule::LocalCrashedPrimary)
            }
            (false, true) => {
                let dir = if crashed_is_source {
                    LocalIsTarget
                } else {
                    LocalIsSource
                };
                decided(BitmapResync(dir), Rule::PeerCrashedPrimary)
            }
            (false, false) => {
                match (
                    local.flags.primary_lost_quorum,
                    peer.flags.primary_lost_quorum,
                ) {
                    (true, false) => decided(BitmapResync(LocalIsTarget), Rule::LocalLostQuorum),
                    (false, true) => decided(BitmapResync(LocalIsSource), Rule::PeerLostQuorum),
                    _ => match (
                        local.is_uncertain_for(ctx.peer_name),
                        peer.is_uncertain_for(ctx.local_name),
                    ) {
                        (true, true) => {
                            let dir = if ctx.local_name < ctx.peer_name {
                                LocalIsSource
                            } else {
                                LocalIsTarget
                            };
                            decided(BitmapResync(dir), Rule::BothUncertain)
                        }
                        (true, false) => decided(BitmapResync(LocalIsTarget), Rule::LocalUncertain),
                        (false, true) => decided(BitmapResync(LocalIsSource), Rule::PeerUncertain),
                        (false, false) => decided(NoSync, Rule::EqualCurrents),
                    },
                }
            }
        };
    }

    // Rule 3: bitmap slots that match the other side's current.
    let peer_slot_for_me = peer.bitmap_for(ctx.local_name);
    let my_slot_for_peer = local.bitmap_for(ctx.peer_name);
    if !peer_slot_for_me.is_zero() && peer_slot_for_me == me {
        return decided(
            BitmapResync(LocalIsTarget),
            Rule::PeerBitmapMatchesLocalCurrent,
        );
    }
    if !my_slot_for_peer.is_zero() && my_slot_for_peer == them {
        return decided(
            BitmapResync(LocalIsSource),
            Rule::LocalBitmapMatchesPeerCurrent,
        );
    }

    // Rule 4: one current in the other's history.
    let mine_in_theirs = peer.history_contains(me);
    let theirs_in_mine = local.history_contains(them);
    if mine_in_theirs && !theirs_in_mine {
        return decided(FullSync(LocalIsTarget), Rule::LocalCurrentInPeerHistory);
    }
    if theirs_in_mine && !mine_in_theirs {
        return decided(FullSync(LocalIsSource), Rule::PeerCurrentInLocalHistory);
    }

    // Rule 5: both bitmaps count against the same generation: split brain, recoverable.
    if !my_slot_for_peer.is_zero() && my_slot_for_peer == peer_slot_for_me {
        return decided(SplitBrainAutoRecoverable, Rule::EqualBitmapUuids);
    }

    // Rule 6/7.
    let mine = local.known_generations();
    if peer.known_generations().iter().any(|g| mine.contains(g)) {
        decided(SplitBrainDisconnect, Rule::CommonHistory)
    } else {
        decided(UnrelatedData, Rule::NothingInCommon)
    }
}

/// `after-sb` policy for an auto-recoverable split brain (per volume; default `disconnect`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AfterSplitBrain {
    /// Never resolve automatically.
    #[default]
    Disconnect,
    /// If exactly one side wrote nothing since the split, it is the victim.
    DiscardZeroChanges,
    /// The side that became Primary later is the victim.
    DiscardYoungerPrimary,
    /// The side with fewer changed blocks is the victim (a tie disconnects).
    DiscardLeastChanges,
}

impl AfterSplitBrain {
    /// Every policy.
    pub const ALL: &'static [AfterSplitBrain] = &[
        AfterSplitBrain::Disconnect,
        AfterSplitBrain::DiscardZeroChanges,
        AfterSplitBrain::DiscardYoungerPrimary,
        AfterSplitBrain::DiscardLeastChanges,
    ];

    /// The configuration spelling (DRBD's).
    pub fn as_str(self) -> &'static str {
        match self {
            AfterSplitBrain::Disconnect => "disconnect",
            AfterSplitBrain::DiscardZeroChanges => "discard-zero-changes",
            AfterSplitBrain::DiscardYoungerPrimary => "discard-younger-primary",
            AfterSplitBrain::DiscardLeastChanges => "discard-least-changes",
        }
    }
}

impl fmt::Display for AfterSplitBrain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown after-split-brain policy name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown after-split-brain policy {0:?} (expected disconnect, discard-zero-changes, discard-younger-primary or discard-least-changes)")]
pub struct ParsePolicyError(pub String);

impl std::str::FromStr for AfterSplitBrain {
    type Err = ParsePolicyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        AfterSplitBrain::ALL
            .iter()
            .copied()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| ParsePolicyError(s.to_string()))
    }
}

/// One side of a split brain, as the policies see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SplitBrainSide {
    /// Blocks set in this side's bitmap for the other side (what it changed since the split).
    pub changed_blocks: u64,
    /// When this side last became Primary (any monotonic cluster-comparable clock, e.g. unix
    /// seconds), or None if it was not Primary since the split.
    pub promoted_at: Option<u64>,
    /// Whether it is Primary right now (a current Primary is never discarded by a policy).
    pub is_primary_now: bool,
}

/// How a split brain is resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SplitBrainResolution {
    /// Stay disconnected; the operator decides.
    Disconnect,
    /// Discard the local changes: become SyncTarget (bitmap resync).
    DiscardLocal,
    /// Discard the peer's changes: become SyncSource (bitmap resync).
    DiscardPeer,
}

/// Apply an after-split-brain policy to an auto-recoverable split brain (rule 5). Pure and
/// symmetric (swapping sides swaps the answer). Never discards a side that is Primary now.
pub fn resolve_split_brain(
    policy: AfterSplitBrain,
    local: &SplitBrainSide,
    peer: &SplitBrainSide,
) -> SplitBrainResolution {
    use SplitBrainResolution::*;
    let victim = match policy {
        AfterSplitBrain::Disconnect => Disconnect,
        AfterSplitBrain::DiscardZeroChanges => {
            match (local.changed_blocks == 0, peer.changed_blocks == 0) {
                (true, false) => DiscardLocal,
                (false, true) => DiscardPeer,
                // Both zero: nothing to lose either way, but which is "newest" is unknown;
                // both wrote: that is exactly what this policy must not decide.
                _ => Disconnect,
            }
        }
        AfterSplitBrain::DiscardYoungerPrimary => match (local.promoted_at, peer.promoted_at) {
            (Some(l), Some(p)) if l > p => DiscardLocal,
            (Some(l), Some(p)) if p > l => DiscardPeer,
            (Some(_), None) => DiscardLocal,
            (None, Some(_)) => DiscardPeer,
            _ => Disconnect,
        },
        AfterSplitBrain::DiscardLeastChanges => {
            if local.changed_blocks < peer.changed_blocks {
                DiscardLocal
            } else if peer.changed_blocks < local.changed_blocks {
                DiscardPeer
            } else {
                Disconnect
            }
        }
    };
    match victim {
        DiscardLocal if local.is_primary_now => Disconnect,
        DiscardPeer if peer.is_primary_now => Disconnect,
        v => v,
    }
}

/// Why a manual resolution was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// There is nothing to resolve.
    #[error("the replicas are not in split brain (decided by {0})")]
    NotSplitBrain(Rule),
    /// The replicas share no history.
    #[error("the replicas hold unrelated data ({0}); refusing to overwrite either: re-create the replica that is wrong")]
    Unrelated(Rule),
}

/// The operator chose a victim (`tandem volume resolve NAME --discard-local` on the victim).
/// An auto-recoverable split brain resyncs by bitmap; a split brain with only common history
/// needs a full sync; unrelated data is refused.
pub fn resolve_manually(
    decision: SyncDecision,
    discard_local: bool,
) -> Result<SyncOutcome, ResolveError> {
    let dir = if discard_local {
        Direction::LocalIsTarget
    } else {
        Direction::LocalIsSource
    };
    match decision.outcome {
        SyncOutcome::SplitBrainAutoRecoverable => Ok(SyncOutcome::BitmapResync(dir)),
        SyncOutcome::SplitBrainDisconnect => Ok(SyncOutcome::FullSync(dir)),
        SyncOutcome::UnrelatedData => Err(ResolveError::Unrelated(decision.rule)),
        _ => Err(ResolveError::NotSplitBrain(decision.rule)),
    }
}

/// Turn a policy answer into the sync outcome for a rule-5 split brain.
pub fn resolution_outcome(resolution: SplitBrainResolution) -> Option<SyncOutcome> {
    match resolution {
        SplitBrainResolution::Disconnect => None,
        SplitBrainResolution::DiscardLocal => {
            Some(SyncOutcome::BitmapResync(Direction::LocalIsTarget))
        }
        SplitBrainResolution::DiscardPeer => {
            Some(SyncOutcome::BitmapResync(Direction::LocalIsSource))
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
