//! The promotion rules one by one: the local gate with relayed Primaries, a member's vote,
//! a round's outcome with quorum over the members that agreed, and outdating.

#![allow(clippy::unwrap_used)]

use super::*;
use crate::generation::SplitMix64;

fn peer(name: &str, diskful: bool, connected: bool, role: Role, disk: DiskState) -> PeerFacts {
    PeerFacts {
        name: name.into(),
        diskful,
        connected,
        role,
        disk,
        relayed_primaries: Vec::new(),
        left_gracefully: false,
        joining: false,
    }
}

/// hv1, UpToDate Secondary with quorum, protocol C, in a volume with quorum on.
fn view<'a>(peers: &'a [PeerFacts]) -> View<'a> {
    View {
        volume: "vm-100-disk-0",
        node: "hv1",
        diskful: true,
        role: Role::Secondary,
        disk: DiskState::UpToDate,
        quorum: QuorumMode::Majority,
        has_quorum: true,
        allow_two_primaries: false,
        protocol: Protocol::C,
        peers,
        faults: PromotionFaults::default(),
    }
}

/// hv2 cut off from hv1; the witness still reaches both and relays `relays`.
fn cut_off_with_witness(relays: &[&str]) -> Vec<PeerFacts> {
    let mut w = peer("w", false, true, Role::Secondary, DiskState::Diskless);
    w.relayed_primaries = relays.iter().map(|s| s.to_string()).collect();
    vec![
        peer("hv2", true, false, Role::Unknown, DiskState::DUnknown),
        w,
    ]
}

#[test]
fn a_primary_relayed_by_the_witness_blocks_promotion_behind_a_broken_link() {
    let peers = cut_off_with_witness(&["hv2"]);
    let v = view(&peers);
    assert_eq!(known_primaries(&v), BTreeSet::from(["hv2".to_string()]));
    let err = check_promote(&v).unwrap_err();
    assert!(
        matches!(&err, Refusal::Gate(PromoteRefusal::OtherPrimary { peer, .. }) if peer == "hv2"),
        "{err:?}"
    );
    // Even with two primaries allowed: the reverse data link needs a direct connection.
    let mut v = view(&peers);
    v.allow_two_primaries = true;
    assert_eq!(
        check_promote(&v),
        Err(Refusal::PrimaryNotConnected { peer: "hv2".into() })
    );
    // Nobody relayed: the gate passes (quorum decides).
    let peers = cut_off_with_witness(&[]);
    assert_eq!(check_promote(&view(&peers)), Ok(Vec::new()));
}

#[test]
fn the_gate_returns_the_other_primary_when_two_primaries_are_allowed() {
    let peers = [peer("hv2", true, true, Role::Primary, DiskState::UpToDate)];
    let mut v = view(&peers);
    v.allow_two_primaries = true;
    assert_eq!(check_promote(&v), Ok(vec!["hv2".to_string()]));
}

#[test]
fn quorum_counts_connected_peers_and_skips_joining_ones_that_never_connected() {
    let peers = cut_off_with_witness(&[]);
    assert!(
        quorum(&view(&peers), true).has_quorum,
        "tiebreaker keeps it"
    );
    assert!(
        !quorum(&view(&peers), false).has_quorum,
        "but cannot regain it"
    );
    let mut peers = vec![
        peer("hv2", true, true, Role::Secondary, DiskState::UpToDate),
        peer("hv3", true, false, Role::Unknown, DiskState::DUnknown),
    ];
    peers[1].joining = true;
    let q = quorum(&view(&peers), false);
    assert!(q.has_quorum && q.voters == 2, "{}", q.reason);
}

#[test]
fn a_member_votes_no_while_it_or_a_relayed_node_is_primary() {
    let peers = cut_off_with_witness(&["hv2"]);
    let v = view(&peers);
    let vote = answer_prepare(&v, Busy::default(), "hv3", false);
    assert_eq!(vote.answer, PromoteAnswer::Primary { node: "hv2".into() });
    assert!(!vote.grant);
    let mut v = view(&[]);
    v.role = Role::Primary;
    let vote = answer_prepare(&v, Busy::default(), "hv2", false);
    assert_eq!(vote.answer, PromoteAnswer::Primary { node: "hv1".into() });
    // Two primaries asked for, but this Primary's gate is off.
    let vote = answer_prepare(&v, Busy::default(), "hv2", true);
    assert_eq!(
        vote.answer,
        PromoteAnswer::TwoPrimariesOff { node: "hv1".into() }
    );
    v.allow_two_primaries = true;
    let vote = answer_prepare(&v, Busy::default(), "hv2", true);
    assert_eq!((vote.answer, vote.grant), (PromoteAnswer::Yes, true));
}

#[test]
fn between_two_concurrent_rounds_the_name_that_sorts_first_wins() {
    let busy = Busy {
        promoting: true,
        ..Busy::default()
    };
    let v = view(&[]);
    let vote = answer_prepare(&v, busy, "hv2", false);
    assert_eq!(vote.answer, PromoteAnswer::Promoting { node: "hv1".into() });
    assert!(!vote.yield_round && !vote.grant);
    let mut v = view(&[]);
    v.node = "hv3";
    let vote = answer_prepare(&v, busy, "hv2", false);
    assert_eq!(vote.answer, PromoteAnswer::Yes);
    assert!(vote.yield_round && vote.grant);
    // A grant held for someone else: no second grant, but the round is still given up.
    let busy = Busy {
        promoting: true,
        granted_to: Some("hv1"),
        ..Busy::default()
    };
    let vote = answer_prepare(&v, busy, "hv2", false);
    assert_eq!(vote.answer, PromoteAnswer::Promoting { node: "hv1".into() });
    assert!(vote.yield_round && !vote.grant);
}

#[test]
fn a_round_commits_only_with_every_yes_and_quorum_among_those_that_agreed() {
    let asked = BTreeMap::from([("hv2".to_string(), 1), ("w".to_string(), 2)]);
    let peers = [
        peer("hv2", true, true, Role::Secondary, DiskState::UpToDate),
        peer("w", false, true, Role::Secondary, DiskState::Diskless),
    ];
    let v = view(&peers);
    let mut round = Round::new(7, asked.clone());
    assert!(!round.is_decided());
    round.handle_answer("hv2", PromoteAnswer::Yes);
    round.handle_answer("stranger", PromoteAnswer::Closing);
    assert!(!round.is_decided());
    assert_eq!(
        round_outcome(&round, &v, true),
        Err(RoundFailure::Refused(Refusal::NotAnswered {
            member: "w".into()
        }))
    );
    round.handle_answer("w", PromoteAnswer::Yes);
    assert!(round.is_decided());
    assert_eq!(round_outcome(&round, &v, true), Ok(()));
    // A link lost after the Yes: the member dropped its grant.
    let mut lost = round.clone();
    lost.handle_link_down("w");
    assert_eq!(
        round_outcome(&lost, &v, true),
        Err(RoundFailure::Reconnecting { node: "w".into() })
    );
    // A member that was not asked came up meanwhile: ask again, with it.
    let mut joined = round.clone();
    joined.handle_link_up("w");
    assert_eq!(round_outcome(&joined, &v, true), Ok(()), "w was asked");
    joined.handle_link_up("hv3");
    assert_eq!(
        round_outcome(&joined, &v, true),
        Err(RoundFailure::Reconnecting { node: "hv3".into() })
    );
    // Only the witness agreed and quorum was lost before: no quorum to promote with.
    let mut witness_only = Round::new(8, BTreeMap::from([("w".to_string(), 2)]));
    witness_only.handle_answer("w", PromoteAnswer::Yes);
    assert!(matches!(
        round_outcome(&witness_only, &v, false),
        Err(RoundFailure::Refused(Refusal::Gate(
            PromoteRefusal::NoQuorum { .. }
        )))
    ));
    assert_eq!(round_outcome(&witness_only, &v, true), Ok(()));
    // The promotion fault skips exactly this check.
    let mut faulty = view(&peers);
    faulty.faults.ignore_quorum = true;
    assert_eq!(round_outcome(&witness_only, &faulty, false), Ok(()));
    let mut yielded = Round::new(9, asked);
    yielded.yield_to("hv0");
    assert_eq!(
        round_outcome(&yielded, &v, true),
        Err(RoundFailure::Busy { node: "hv0".into() })
    );
}

#[test]
fn writes_need_quorum_and_no_outdating_in_progress() {
    assert!(writes_admitted(QuorumMode::Majority, true, false));
    assert!(!writes_admitted(QuorumMode::Majority, false, false));
    assert!(!writes_admitted(QuorumMode::Majority, true, true));
    assert!(writes_admitted(QuorumMode::Off, false, false));
}

/// hv2's generations after it took over from hv1 at `day0` and wrote.
fn took_over(day0: Generation) -> UuidSet {
    let mut u = UuidSet::day0(day0);
    u.on_promote(true);
    u.before_write(&["hv1"], &mut SplitMix64::new(3).as_fn());
    u
}

#[test]
fn a_target_that_moved_on_from_the_requester_answers_stale() {
    let day0 = Generation::from_raw(0x100);
    let hv2 = took_over(day0);
    let answer = |role, disk, u: &UuidSet| outdate_answer(role, disk, u, day0);
    assert_eq!(
        answer(Role::Secondary, DiskState::UpToDate, &hv2),
        OutdateResult::Stale
    );
    assert_eq!(
        answer(Role::Secondary, DiskState::Consistent, &hv2),
        OutdateResult::Stale
    );
    assert_eq!(
        answer(Role::Primary, DiskState::UpToDate, &hv2),
        OutdateResult::Refused
    );
    // Not stale: the target did not move on (same generation, or the requester is
    // newer), or its data is not consistent anyway.
    let same = UuidSet::day0(day0);
    assert_eq!(
        answer(Role::Secondary, DiskState::UpToDate, &same),
        OutdateResult::Outdated
    );
    assert_eq!(
        outdate_answer(Role::Secondary, DiskState::UpToDate, &same, hv2.current),
        OutdateResult::Outdated
    );
    for disk in [DiskState::Inconsistent, DiskState::Outdated] {
        assert_eq!(answer(Role::Secondary, disk, &hv2), OutdateResult::Outdated);
    }
    // An unknown generation (a divergent or long-gone requester) is no proof either.
    assert_eq!(
        outdate_answer(
            Role::Secondary,
            DiskState::UpToDate,
            &hv2,
            Generation::from_raw(0x777)
        ),
        OutdateResult::Outdated
    );
}
