//! The handshake's plan: what a pair of replicas does after exchanging states, from the
//! generation decision (`sync_decision::decide`) and both states. Pure: no I/O, no locks;
//! both sides compute it from the same exchanged states and reach mirrored plans.
//!
//! [`plan`] settles the decision (split-brain policy or manual resolution, "no sync" with
//! dirty bitmaps, the reconciliation rules of `reconcile.rs`, force-secondary across
//! generations for a Primary that lost quorum) and then checks it against the roles:
//!
//! | settled outcome | roles | plan |
//! | --- | --- | --- |
//! | split brain, unrelated data | any | [`Plan::StandAlone`] |
//! | resync from an Inconsistent side | any | [`Plan::Refuse`] (DRBD never syncs from one) |
//! | this side SyncTarget | this side Primary, frozen without quorum | [`Plan::StepDown`] (force-secondary) |
//! | this side SyncTarget | this side Primary, with quorum | [`Plan::Refuse`] (demote it first) |
//! | this side SyncSource | the peer Primary | [`Plan::Refuse`] (the peer refuses too) |
//! | no sync | both Primary | [`Plan::Refuse`] |
//! | no sync | two UpToDate Secondaries with bits while a Primary is known | [`Plan::KeepBits`] |
//! | no sync | otherwise | [`Plan::InSync`] |
//! | resync | otherwise | [`Plan::Resync`] |
//!
//! The table in `testdata/handshake_plans.txt` pins these rules down, each case checked
//! from both sides.

use super::messages::PeerState;
use crate::role::{DiskState, Role};
use crate::sync_decision::{
    resolution_outcome, resolve_manually, resolve_split_brain, AfterSplitBrain, Direction, Rule,
    SplitBrainSide, SyncDecision, SyncOutcome,
};

/// What the handshake plan needs: both sides' states as exchanged, and local settings.
#[derive(Debug, Clone, Copy)]
pub struct Handshake<'a> {
    pub local_name: &'a str,
    pub peer_name: &'a str,
    pub mine: &'a PeerState,
    pub theirs: &'a PeerState,
    pub after_split_brain: AfterSplitBrain,
    /// This node is Primary with its I/O frozen for lack of quorum.
    pub frozen: bool,
}

/// Why a pair does not connect now (it retries; the peer refuses the same way).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The resync would copy from this (`local`) or the peer's Inconsistent replica.
    InconsistentSource { local: bool },
    /// This node is Primary (with quorum) and would be SyncTarget.
    LocalPrimaryWouldBeTarget,
    /// The peer is Primary and would be SyncTarget.
    PeerPrimaryWouldBeTarget,
    /// Both are Primary and nothing to resync: one must be demoted.
    BothPrimary,
}

/// What the pair does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Connect, no resync: clear the pair's bits, confirm the disk state.
    InSync,
    /// Connect without a resync and keep the pair's bits (two Secondaries of a Primary).
    KeepBits,
    /// Resync in `direction`, by bitmap or (`full`) everything.
    Resync { direction: Direction, full: bool },
    /// Split brain or unrelated data: StandAlone until an operator resolves it.
    StandAlone,
    /// This Primary is frozen without quorum and the peer is newer: step down
    /// (force-secondary; its frozen requests were never acknowledged), then reconnect.
    StepDown,
    /// Do not connect now.
    Refuse(Refusal),
}

/// The settled outcome (for logs and status) and the plan.
pub fn plan(h: &Handshake, decision: &SyncDecision) -> (SyncOutcome, Plan) {
    let outcome = settle(h, decision);
    (outcome, plan_for(h, decision, outcome))
}

fn plan_for(h: &Handshake, decision: &SyncDecision, outcome: SyncOutcome) -> Plan {
    let (mine, theirs) = (h.mine, h.theirs);
    if let Some(local) = inconsistent_source(outcome, mine, theirs) {
        return Plan::Refuse(Refusal::InconsistentSource { local });
    }
    let (direction, full) = match outcome {
        SyncOutcome::SplitBrainAutoRecoverable
        | SyncOutcome::SplitBrainDisconnect
        | SyncOutcome::UnrelatedData => return Plan::StandAlone,
        SyncOutcome::NoSync => {
            if mine.role == Role::Primary && theirs.role == Role::Primary {
                return Plan::Refuse(Refusal::BothPrimary);
            }
            if secondaries_keep_bits(decision, mine, theirs) {
                return Plan::KeepBits;
            }
            return Plan::InSync;
        }
        SyncOutcome::BitmapResync(d) => (d, false),
        SyncOutcome::FullSync(d) => (d, true),
    };
    match direction {
        Direction::LocalIsTarget if mine.role == Role::Primary => {
            if h.frozen {
                Plan::StepDown
            } else {
                Plan::Refuse(Refusal::LocalPrimaryWouldBeTarget)
            }
        }
        Direction::LocalIsSource if theirs.role == Role::Primary => {
            Plan::Refuse(Refusal::PeerPrimaryWouldBeTarget)
        }
        _ => Plan::Resync { direction, full },
    }
}

/// Post-process a decision: split-brain policy or manual resolution, and "no sync"
/// with a dirty bitmap. Symmetric: both sides reach mirrored outcomes from the same
/// exchanged states.
fn settle(h: &Handshake, d: &SyncDecision) -> SyncOutcome {
    let (mine, theirs, policy) = (h.mine, h.theirs, h.after_split_brain);
    if uncertainty_covered_by_primary(d, mine, theirs) {
        return SyncOutcome::NoSync;
    }
    if let Some(o) = inconsistent_secondary_is_target(d, mine, theirs) {
        return o;
    }
    if secondaries_keep_bits(d, mine, theirs) {
        return SyncOutcome::NoSync;
    }
    if d.outcome.is_split_brain() && d.outcome != SyncOutcome::UnrelatedData {
        // Force-secondary across generations: a Primary that lost quorum (the durable
        // flag stays until it regains quorum as Primary or is resynced) may have
        // started a generation (it still had quorum when a first peer left) that no
        // surviving peer saw. Every write of it was then unacknowledged: an
        // acknowledgement needs a connected peer's ack or quorum, and such a peer
        // would have carried the generation into the takeover. Its side is the
        // SyncTarget (by bitmap from a common base, else in full); the other side,
        // which moved on without it, the source.
        let lost_quorum = |s: &PeerState| {
            s.uuids
                .as_ref()
                .is_some_and(|u| u.flags.primary_lost_quorum)
        };
        let full = d.outcome == SyncOutcome::SplitBrainDisconnect;
        let resync = |dir| {
            if full {
                SyncOutcome::FullSync(dir)
            } else {
                SyncOutcome::BitmapResync(dir)
            }
        };
        match (lost_quorum(mine), lost_quorum(theirs)) {
            (true, false) => return resync(Direction::LocalIsTarget),
            (false, true) => return resync(Direction::LocalIsSource),
            _ => {}
        }
    }
    match d.outcome {
        SyncOutcome::SplitBrainAutoRecoverable | SyncOutcome::SplitBrainDisconnect => {
            // Manual: the operator chose a side on one node (discard-local there, or
            // keep-local on the other); both sides see both flags.
            let local_discards = mine.discard_my_data || theirs.keep_my_data;
            let peer_discards = theirs.discard_my_data || mine.keep_my_data;
            if local_discards != peer_discards {
                if let Ok(o) = resolve_manually(*d, local_discards) {
                    return o;
                }
            }
            if d.outcome == SyncOutcome::SplitBrainAutoRecoverable {
                let side = |s: &PeerState, other_changed: u64| SplitBrainSide {
                    changed_blocks: other_changed,
                    promoted_at: (s.promoted_at != 0).then_some(s.promoted_at),
                    is_primary_now: s.role == Role::Primary,
                };
                // changed_blocks in a state = the sender's bitmap for the receiver =
                // what the sender changed since the split.
                let local = side(mine, mine.changed_blocks);
                let peer = side(theirs, theirs.changed_blocks);
                if let Some(o) = resolution_outcome(resolve_split_brain(policy, &local, &peer)) {
                    return o;
                }
            }
            d.outcome
        }
        SyncOutcome::NoSync if mine.changed_blocks > 0 || theirs.changed_blocks > 0 => {
            // At equal generations a Primary holds the generation's data: it is the
            // source whatever the bits say (a Secondary's bits there only mark blocks
            // that may differ). Otherwise the side that changed blocks is.
            let i_source = match (mine.role == Role::Primary, theirs.role == Role::Primary) {
                (true, false) => true,
                (false, true) => false,
                _ => match (mine.changed_blocks > 0, theirs.changed_blocks > 0) {
                    (true, false) => true,
                    (false, true) => false,
                    _ => h.local_name < h.peer_name,
                },
            };
            SyncOutcome::BitmapResync(if i_source {
                Direction::LocalIsSource
            } else {
                Direction::LocalIsTarget
            })
        }
        SyncOutcome::BitmapResync(_)
            if matches!(
                d.rule,
                Rule::LocalUncertain | Rule::PeerUncertain | Rule::BothUncertain
            ) && (mine.role == Role::Primary) != (theirs.role == Role::Primary) =>
        {
            // Equal generations, blocks that may differ: the Primary's copy is what its
            // clients read and wrote, so it is the source.
            SyncOutcome::BitmapResync(if mine.role == Role::Primary {
                Direction::LocalIsSource
            } else {
                Direction::LocalIsTarget
            })
        }
        SyncOutcome::BitmapResync(Direction::LocalIsTarget)
            if d.rule == Rule::LocalLostQuorum
                && mine.role == Role::Primary
                && theirs.role != Role::Primary =>
        {
            // The lost-quorum Primary got its quorum back and nobody took over: it
            // stays the source (its unacknowledged writes become the truth).
            SyncOutcome::BitmapResync(Direction::LocalIsSource)
        }
        SyncOutcome::BitmapResync(Direction::LocalIsSource)
            if d.rule == Rule::PeerLostQuorum
                && theirs.role == Role::Primary
                && mine.role != Role::Primary =>
        {
            SyncOutcome::BitmapResync(Direction::LocalIsTarget)
        }
        other => other,
    }
}

/// Two UpToDate Secondaries at equal generations, "uncertain" only because one of them
/// was resynced (from the Primary) since, while the same Primary replicates to both:
/// the Primary's own handshakes resynced whichever was behind, so both hold the
/// Primary's data and there is nothing to resync between them. Without this the pair
/// would make one of them SyncTarget (Inconsistent) of a Secondary source, which must
/// not resync while a Primary writes (`sync.rs`): it would stay Inconsistent for as
/// long as that Primary runs. Symmetric in both states, so both sides agree.
fn uncertainty_covered_by_primary(d: &SyncDecision, mine: &PeerState, theirs: &PeerState) -> bool {
    use crate::sync_decision::Rule;
    let mut a = mine.primaries.clone();
    let mut b = theirs.primaries.clone();
    a.sort();
    b.sort();
    matches!(
        d.rule,
        Rule::LocalUncertain | Rule::PeerUncertain | Rule::BothUncertain
    ) && matches!(d.outcome, SyncOutcome::BitmapResync(_))
        && mine.role == Role::Secondary
        && theirs.role == Role::Secondary
        && mine.disk == DiskState::UpToDate
        && theirs.disk == DiskState::UpToDate
        && !a.is_empty()
        && a == b
}

/// Two Secondaries at equal generations, one of them Inconsistent (its reconciliation
/// with a Primary, `reconcile.rs`, or a resync was cut off) and the other UpToDate: the
/// UpToDate side is the source whatever the bits say, and "no sync" must not make the
/// Inconsistent side UpToDate. An Outdated or Consistent other side is not enough (it
/// may lack the Primary's last writes): the other rules decide, and
/// [`inconsistent_source`] refuses any that would resync from the Inconsistent
/// side. Symmetric.
fn inconsistent_secondary_is_target(
    d: &SyncDecision,
    mine: &PeerState,
    theirs: &PeerState,
) -> Option<SyncOutcome> {
    use crate::sync_decision::Rule;
    let equal_generations = matches!(
        d.rule,
        Rule::EqualCurrents | Rule::LocalUncertain | Rule::PeerUncertain | Rule::BothUncertain
    ) && matches!(
        d.outcome,
        SyncOutcome::NoSync | SyncOutcome::BitmapResync(_)
    );
    let inconsistent = |s: &PeerState| s.disk == DiskState::Inconsistent;
    let up_to_date = |s: &PeerState| s.disk == DiskState::UpToDate;
    if !equal_generations
        || mine.role != Role::Secondary
        || theirs.role != Role::Secondary
        || !((inconsistent(mine) && up_to_date(theirs))
            || (up_to_date(mine) && inconsistent(theirs)))
    {
        return None;
    }
    Some(SyncOutcome::BitmapResync(if inconsistent(mine) {
        Direction::LocalIsTarget
    } else {
        Direction::LocalIsSource
    }))
}

/// The resync `outcome` would copy from an Inconsistent replica (its blocks are partly
/// someone else's and partly stale): DRBD never syncs from an Inconsistent disk, and
/// neither do we (the pair retries, and connects once one side got UpToDate data from
/// elsewhere). `Some(true)`: this replica would be that source, `Some(false)`: the peer.
fn inconsistent_source(outcome: SyncOutcome, mine: &PeerState, theirs: &PeerState) -> Option<bool> {
    let local_source = match outcome {
        SyncOutcome::BitmapResync(d) | SyncOutcome::FullSync(d) => d == Direction::LocalIsSource,
        _ => return None,
    };
    let source = if local_source { mine } else { theirs };
    (source.disk == DiskState::Inconsistent).then_some(local_source)
}

/// Two UpToDate Secondaries at equal generations with bits for each other (typically
/// the tail of a lost Primary's writes, `reconcile.rs`) while a Primary is known: a
/// resync between two Secondaries must not run while a Primary replicates to them, so
/// the pair connects without a resync and *keeps* its bits (the next promotion of one
/// of them reconciles them; the serving Primary resyncs each of them from itself).
/// Symmetric in both states.
fn secondaries_keep_bits(d: &SyncDecision, mine: &PeerState, theirs: &PeerState) -> bool {
    d.outcome == SyncOutcome::NoSync
        && (mine.changed_blocks > 0 || theirs.changed_blocks > 0)
        && mine.role == Role::Secondary
        && theirs.role == Role::Secondary
        && mine.disk == DiskState::UpToDate
        && theirs.disk == DiskState::UpToDate
        && (!mine.primaries.is_empty() || !theirs.primaries.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::role::Protocol;
    use crate::sync_decision::tests::{parse_set, Symbols};
    use crate::sync_decision::{decide, DecisionContext};

    fn state(role: Role, disk: DiskState) -> PeerState {
        PeerState {
            role,
            disk,
            allow_two_primaries: false,
            diskless: false,
            discard_my_data: false,
            keep_my_data: false,
            has_quorum: true,
            leaving: false,
            handshake: true,
            size: 1 << 30,
            promoted_at: 0,
            changed_blocks: 0,
            primaries: Vec::new(),
            uuids: None,
            seen_lineages: Vec::new(),
        }
    }

    /// One side of a table line: its state, whether it is frozen, and a policy if named.
    fn parse_side(text: &str, syms: &mut Symbols) -> (PeerState, bool, Option<AfterSplitBrain>) {
        let mut s = state(Role::Secondary, DiskState::UpToDate);
        let (mut frozen, mut policy) = (false, None);
        let mut generations = Vec::new();
        for field in text.split_whitespace() {
            match field {
                "P" => s.role = Role::Primary,
                "S" => s.role = Role::Secondary,
                "frozen" => frozen = true,
                "discard" => s.discard_my_data = true,
                "keep" => s.keep_my_data = true,
                _ if field.starts_with("bits=") => {
                    s.changed_blocks = field[5..].parse().expect("bits=N")
                }
                _ if field.starts_with("primaries=") => {
                    s.primaries = field[10..].split(',').map(String::from).collect()
                }
                _ if field.starts_with("asb=") => {
                    policy = Some(
                        field[4..]
                            .parse()
                            .expect("a known after-split-brain policy"),
                    )
                }
                _ => match field.parse::<DiskState>() {
                    Ok(disk) => s.disk = disk,
                    Err(_) => generations.push(field),
                },
            }
        }
        s.uuids = Some(parse_set(&generations.join(" "), syms));
        (s, frozen, policy)
    }

    fn parse_plan(text: &str) -> Plan {
        use Direction::*;
        let resync = |direction, full| Plan::Resync { direction, full };
        match text {
            "in-sync" => Plan::InSync,
            "keep-bits" => Plan::KeepBits,
            "resync bitmap-source" => resync(LocalIsSource, false),
            "resync bitmap-target" => resync(LocalIsTarget, false),
            "resync full-source" => resync(LocalIsSource, true),
            "resync full-target" => resync(LocalIsTarget, true),
            "stand-alone" => Plan::StandAlone,
            "step-down" => Plan::StepDown,
            "refuse inconsistent-local" => {
                Plan::Refuse(Refusal::InconsistentSource { local: true })
            }
            "refuse inconsistent-peer" => {
                Plan::Refuse(Refusal::InconsistentSource { local: false })
            }
            "refuse local-primary" => Plan::Refuse(Refusal::LocalPrimaryWouldBeTarget),
            "refuse peer-primary" => Plan::Refuse(Refusal::PeerPrimaryWouldBeTarget),
            "refuse both-primary" => Plan::Refuse(Refusal::BothPrimary),
            other => panic!("unknown plan {other:?}"),
        }
    }

    /// The plan the other side must reach when this side reaches `p`.
    fn mirrored(p: Plan) -> Plan {
        match p {
            Plan::Resync { direction, full } => Plan::Resync {
                direction: direction.mirrored(),
                full,
            },
            Plan::StepDown | Plan::Refuse(Refusal::LocalPrimaryWouldBeTarget) => {
                Plan::Refuse(Refusal::PeerPrimaryWouldBeTarget)
            }
            Plan::Refuse(Refusal::InconsistentSource { local }) => {
                Plan::Refuse(Refusal::InconsistentSource { local: !local })
            }
            other => other,
        }
    }

    fn plan_between(
        (local, local_state, frozen): (&str, &PeerState, bool),
        (peer, peer_state): (&str, &PeerState),
        after_split_brain: AfterSplitBrain,
    ) -> Plan {
        let ctx = DecisionContext {
            local_name: local,
            peer_name: peer,
            protocol: Protocol::C,
        };
        let (Some(a), Some(b)) = (&local_state.uuids, &peer_state.uuids) else {
            panic!("both sides need generations")
        };
        let decision = decide(a, b, &ctx);
        let h = Handshake {
            local_name: local,
            peer_name: peer,
            mine: local_state,
            theirs: peer_state,
            after_split_brain,
            frozen,
        };
        plan(&h, &decision).1
    }

    #[test]
    fn plan_table_in_testdata_handshake_plans_txt() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/handshake_plans.txt");
        let text = std::fs::read_to_string(path).expect("read the plan table");
        let (mut cases, mut failures) = (0, Vec::new());
        for (lineno, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let cols: Vec<&str> = line.split('|').map(str::trim).collect();
            assert_eq!(cols.len(), 4, "line {}: expected 4 columns", lineno + 1);
            let mut syms = Symbols::default();
            let (local, local_frozen, p1) = parse_side(cols[1], &mut syms);
            let (peer, peer_frozen, p2) = parse_side(cols[2], &mut syms);
            let policy = p1.or(p2).unwrap_or_default();
            let want = parse_plan(cols[3]);
            let got = plan_between(("hv1", &local, local_frozen), ("hv2", &peer), policy);
            if got != want {
                failures.push(format!(
                    "line {} ({}): want {want:?}, got {got:?}",
                    lineno + 1,
                    cols[0]
                ));
            }
            let back = plan_between(("hv2", &peer, peer_frozen), ("hv1", &local), policy);
            if back != mirrored(want) {
                failures.push(format!(
                    "line {} ({}): from hv2 got {back:?}, want {:?}",
                    lineno + 1,
                    cols[0],
                    mirrored(want)
                ));
            }
            cases += 1;
        }
        assert!(cases >= 25, "only {cases} cases read");
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn no_resync_ever_copies_from_an_inconsistent_replica() {
        let inc = state(Role::Secondary, DiskState::Inconsistent);
        let out = state(Role::Secondary, DiskState::Outdated);
        let up = state(Role::Secondary, DiskState::UpToDate);
        let to_peer = SyncOutcome::BitmapResync(Direction::LocalIsSource);
        let from_peer = SyncOutcome::FullSync(Direction::LocalIsTarget);
        assert_eq!(inconsistent_source(to_peer, &inc, &out), Some(true));
        assert_eq!(inconsistent_source(from_peer, &out, &inc), Some(false));
        assert_eq!(inconsistent_source(to_peer, &inc, &inc), Some(true));
        assert_eq!(inconsistent_source(to_peer, &up, &inc), None);
        assert_eq!(inconsistent_source(from_peer, &inc, &up), None);
        assert_eq!(inconsistent_source(SyncOutcome::NoSync, &inc, &inc), None);
    }
}
