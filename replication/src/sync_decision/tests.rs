//! Tests of the handshake decision: the text table, rule-named cases, the split-brain
//! policies, and (in `model`) the randomized comparison against a reference model.

use super::*;
use crate::generation::{Generation, UuidSet};
use std::collections::BTreeMap;

mod model;

const LOCAL: &str = "hv1";
const PEER: &str = "hv2";

#[derive(Default)]
pub(crate) struct Symbols(BTreeMap<String, Generation>);

impl Symbols {
    pub(crate) fn get(&mut self, word: &str) -> Generation {
        match word {
            "JC" => Generation::JUST_CREATED,
            "0" => Generation::ZERO,
            w => {
                let next = Generation::from_raw((self.0.len() as u64 + 1) * 0x1000);
                *self.0.entry(w.to_string()).or_insert(next)
            }
        }
    }
}

pub(crate) fn parse_set(text: &str, syms: &mut Symbols) -> UuidSet {
    let mut set = UuidSet::default();
    let mut have_current = false;
    for field in text.split_whitespace() {
        if let Some(v) = field.strip_prefix("cur=") {
            set.current = syms.get(v);
            have_current = true;
        } else if let Some(rest) = field.strip_prefix("bm.") {
            let (node, g) = rest.split_once('=').expect("bm.NODE=G");
            set.bitmap.insert(node.to_string(), syms.get(g));
        } else if let Some(v) = field.strip_prefix("hist=") {
            set.history = v.split(',').map(|w| syms.get(w)).collect();
        } else if let Some(v) = field.strip_prefix("crashed=") {
            set.crashed_primary.insert(v.to_string());
        } else if let Some(v) = field.strip_prefix("uncertain=") {
            set.uncertain_peers.insert(v.to_string());
        } else if field == "lostq" {
            set.flags.primary_lost_quorum = true;
        } else {
            panic!("unknown field {field:?} in {text:?}");
        }
    }
    assert!(have_current, "set without cur=: {text:?}");
    set
}

fn parse_outcome(text: &str) -> SyncOutcome {
    use Direction::*;
    match text {
        "no-sync" => SyncOutcome::NoSync,
        "bitmap-source" => SyncOutcome::BitmapResync(LocalIsSource),
        "bitmap-target" => SyncOutcome::BitmapResync(LocalIsTarget),
        "full-source" => SyncOutcome::FullSync(LocalIsSource),
        "full-target" => SyncOutcome::FullSync(LocalIsTarget),
        "split-brain-auto" => SyncOutcome::SplitBrainAutoRecoverable,
        "split-brain" => SyncOutcome::SplitBrainDisconnect,
        "unrelated" => SyncOutcome::UnrelatedData,
        other => panic!("unknown outcome {other:?}"),
    }
}

fn ctx_for<'a>(local: &'a str, peer: &'a str, protocol: Protocol) -> DecisionContext<'a> {
    DecisionContext {
        local_name: local,
        peer_name: peer,
        protocol,
    }
}

#[test]
fn decision_table_in_testdata_sync_rules_txt() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/sync_rules.txt");
    let text = std::fs::read_to_string(path).unwrap();
    let mut cases = 0;
    let mut failures = Vec::new();
    for (lineno, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let cols: Vec<&str> = line.split('|').map(str::trim).collect();
        assert_eq!(cols.len(), 6, "line {}: expected 6 columns", lineno + 1);
        let mut syms = Symbols::default();
        let local = parse_set(cols[1], &mut syms);
        let peer = parse_set(cols[2], &mut syms);
        let protocol: Protocol = cols[3].parse().unwrap();
        let want = parse_outcome(cols[4]);
        let want_rule = cols[5];
        let got = decide(&local, &peer, &ctx_for(LOCAL, PEER, protocol));
        if got.outcome != want || got.rule.name() != want_rule {
            failures.push(format!(
                "line {} ({}): want {:?} by {}, got {:?} by {}",
                lineno + 1,
                cols[0],
                want,
                want_rule,
                got.outcome,
                got.rule.name()
            ));
        }
        let mirrored = decide(&peer, &local, &ctx_for(PEER, LOCAL, protocol));
        if mirrored.outcome != want.mirrored() {
            failures.push(format!(
                "line {} ({}): mirrored case gives {:?} by {}, want {:?}",
                lineno + 1,
                cols[0],
                mirrored.outcome,
                mirrored.rule.name(),
                want.mirrored()
            ));
        }
        cases += 1;
    }
    assert!(cases >= 25, "table has only {cases} cases");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn set(current: u64) -> UuidSet {
    UuidSet::day0(Generation::from_raw(current))
}

#[test]
fn rule_1_a_just_created_replica_gets_a_full_sync_from_the_other() {
    let d = decide(
        &UuidSet::just_created(),
        &set(0x10),
        &ctx_for(LOCAL, PEER, Protocol::C),
    );
    assert_eq!(d.outcome, SyncOutcome::FullSync(Direction::LocalIsTarget));
    assert_eq!(d.rule, Rule::LocalJustCreated);
    assert_eq!(d.rule.to_string(), "rule 1 (local-just-created)");
}

#[test]
fn rule_2_crashed_primary_protocol_c_survivor_is_source_protocol_a_crashed_is_source() {
    let mut crashed = set(0x10);
    crashed.mark_crashed_primary(&[PEER]);
    let survivor = set(0x10);
    let c = decide(&crashed, &survivor, &ctx_for(LOCAL, PEER, Protocol::C));
    assert_eq!(
        c.outcome,
        SyncOutcome::BitmapResync(Direction::LocalIsTarget)
    );
    let a = decide(&crashed, &survivor, &ctx_for(LOCAL, PEER, Protocol::A));
    assert_eq!(
        a.outcome,
        SyncOutcome::BitmapResync(Direction::LocalIsSource)
    );
}

#[test]
fn rule_3_peer_bitmap_uuid_equal_to_my_current_makes_me_bitmap_sync_target() {
    let mut rng = crate::generation::SplitMix64::new(9);
    let me = set(0x10);
    let mut peer = set(0x10);
    peer.new_generation_pending = true;
    peer.before_write(&[LOCAL], &mut rng.as_fn());
    let d = decide(&me, &peer, &ctx_for(LOCAL, PEER, Protocol::C));
    assert_eq!(
        d.outcome,
        SyncOutcome::BitmapResync(Direction::LocalIsTarget)
    );
    assert_eq!(d.rule, Rule::PeerBitmapMatchesLocalCurrent);
}

#[test]
fn rule_5_both_sides_wrote_since_the_same_bitmap_generation_is_auto_recoverable_split_brain() {
    let mut rng = crate::generation::SplitMix64::new(10);
    let mut me = set(0x10);
    let mut peer = set(0x10);
    me.new_generation_pending = true;
    me.before_write(&[PEER], &mut rng.as_fn());
    peer.new_generation_pending = true;
    peer.before_write(&[LOCAL], &mut rng.as_fn());
    let d = decide(&me, &peer, &ctx_for(LOCAL, PEER, Protocol::C));
    assert_eq!(d.outcome, SyncOutcome::SplitBrainAutoRecoverable);
    assert!(d.outcome.is_split_brain());
}

#[test]
fn rule_4_my_current_in_peer_history_without_a_bitmap_slot_means_full_sync_as_target() {
    let me = set(0x10);
    let mut peer = set(0x30);
    peer.history = vec![Generation::from_raw(0x20), Generation::from_raw(0x10)];
    let d = decide(&me, &peer, &ctx_for(LOCAL, PEER, Protocol::C));
    assert_eq!(d.outcome, SyncOutcome::FullSync(Direction::LocalIsTarget));
    assert_eq!(d.rule, Rule::LocalCurrentInPeerHistory);
}

#[test]
fn rule_6_common_history_without_matching_bitmaps_is_split_brain_disconnect() {
    let mut me = set(0x20);
    me.history = vec![Generation::from_raw(0x10)];
    let mut peer = set(0x30);
    peer.history = vec![Generation::from_raw(0x10)];
    let d = decide(&me, &peer, &ctx_for(LOCAL, PEER, Protocol::C));
    assert_eq!(d.outcome, SyncOutcome::SplitBrainDisconnect);
    assert_eq!(d.rule, Rule::CommonHistory);
}

#[test]
fn rule_2_a_primary_that_lost_quorum_becomes_target_at_equal_generations() {
    let mut me = set(0x10);
    me.on_quorum_lost(true);
    let d = decide(&me, &set(0x10), &ctx_for(LOCAL, PEER, Protocol::C));
    assert_eq!(
        d.outcome,
        SyncOutcome::BitmapResync(Direction::LocalIsTarget)
    );
    assert_eq!(d.rule, Rule::LocalLostQuorum);
    me.finish_resync_as_target(LOCAL, PEER, &set(0x10), &[]);
    assert!(!me.flags.primary_lost_quorum);
}

#[test]
fn rule_7_nothing_in_common_is_unrelated_data_and_cannot_be_resolved_by_discarding() {
    let d = decide(&set(0x10), &set(0x20), &ctx_for(LOCAL, PEER, Protocol::C));
    assert_eq!(d.outcome, SyncOutcome::UnrelatedData);
    assert!(matches!(
        resolve_manually(d, true),
        Err(ResolveError::Unrelated(_))
    ));
}

#[test]
fn manual_resolution_bitmap_for_auto_recoverable_full_for_common_history() {
    let auto = SyncDecision {
        outcome: SyncOutcome::SplitBrainAutoRecoverable,
        rule: Rule::EqualBitmapUuids,
    };
    assert_eq!(
        resolve_manually(auto, true),
        Ok(SyncOutcome::BitmapResync(Direction::LocalIsTarget))
    );
    let hist = SyncDecision {
        outcome: SyncOutcome::SplitBrainDisconnect,
        rule: Rule::CommonHistory,
    };
    assert_eq!(
        resolve_manually(hist, false),
        Ok(SyncOutcome::FullSync(Direction::LocalIsSource))
    );
    let none = SyncDecision {
        outcome: SyncOutcome::NoSync,
        rule: Rule::EqualCurrents,
    };
    assert!(matches!(
        resolve_manually(none, true),
        Err(ResolveError::NotSplitBrain(_))
    ));
}

fn side(changed: u64, promoted_at: Option<u64>, primary: bool) -> SplitBrainSide {
    SplitBrainSide {
        changed_blocks: changed,
        promoted_at,
        is_primary_now: primary,
    }
}

#[test]
fn after_sb_disconnect_is_the_default_and_never_picks_a_victim() {
    assert_eq!(AfterSplitBrain::default(), AfterSplitBrain::Disconnect);
    assert_eq!(
        resolve_split_brain(
            AfterSplitBrain::Disconnect,
            &side(0, None, false),
            &side(5, Some(1), false)
        ),
        SplitBrainResolution::Disconnect
    );
}

#[test]
fn after_sb_discard_zero_changes_discards_only_a_side_that_wrote_nothing() {
    let p = AfterSplitBrain::DiscardZeroChanges;
    use SplitBrainResolution::*;
    assert_eq!(
        resolve_split_brain(p, &side(0, None, false), &side(3, None, false)),
        DiscardLocal
    );
    assert_eq!(
        resolve_split_brain(p, &side(3, None, false), &side(0, None, false)),
        DiscardPeer
    );
    assert_eq!(
        resolve_split_brain(p, &side(3, None, false), &side(4, None, false)),
        Disconnect
    );
    assert_eq!(
        resolve_split_brain(p, &side(0, None, false), &side(0, None, false)),
        Disconnect
    );
}

#[test]
fn after_sb_discard_younger_primary_keeps_the_side_promoted_first() {
    let p = AfterSplitBrain::DiscardYoungerPrimary;
    use SplitBrainResolution::*;
    assert_eq!(
        resolve_split_brain(p, &side(1, Some(200), false), &side(1, Some(100), false)),
        DiscardLocal
    );
    assert_eq!(
        resolve_split_brain(p, &side(1, Some(100), false), &side(1, Some(200), false)),
        DiscardPeer
    );
    assert_eq!(
        resolve_split_brain(p, &side(1, Some(100), false), &side(1, Some(100), false)),
        Disconnect
    );
}

#[test]
fn after_sb_discard_least_changes_keeps_the_side_that_changed_more_and_ties_disconnect() {
    let p = AfterSplitBrain::DiscardLeastChanges;
    use SplitBrainResolution::*;
    assert_eq!(
        resolve_split_brain(p, &side(1, None, false), &side(9, None, false)),
        DiscardLocal
    );
    assert_eq!(
        resolve_split_brain(p, &side(9, None, false), &side(1, None, false)),
        DiscardPeer
    );
    assert_eq!(
        resolve_split_brain(p, &side(4, None, false), &side(4, None, false)),
        Disconnect
    );
}

#[test]
fn after_sb_policies_never_discard_a_current_primary() {
    for p in AfterSplitBrain::ALL {
        let r = resolve_split_brain(*p, &side(0, Some(9), true), &side(9, Some(1), false));
        assert_ne!(r, SplitBrainResolution::DiscardLocal, "{p}");
    }
    assert_eq!(
        "discard-least-changes".parse::<AfterSplitBrain>().unwrap(),
        AfterSplitBrain::DiscardLeastChanges
    );
    assert!("discard-node-hv1".parse::<AfterSplitBrain>().is_err());
}

#[test]
fn decisions_describe_themselves_for_the_operator() {
    let d = SyncDecision {
        outcome: SyncOutcome::SplitBrainAutoRecoverable,
        rule: Rule::EqualBitmapUuids,
    };
    let text = d.describe("vm-100-disk-0", "hv1", "hv2");
    assert!(text.contains("split brain between hv1 and hv2"), "{text}");
    assert!(
        text.contains("tandem volume resolve vm-100-disk-0 --discard-local"),
        "{text}"
    );
    assert!(text.contains("rule 5 (equal-bitmap-uuids)"), "{text}");
    assert_eq!(
        d.connection_state(),
        crate::role::ConnectionState::StandAlone
    );
    let d = SyncDecision {
        outcome: SyncOutcome::BitmapResync(Direction::LocalIsTarget),
        rule: Rule::PeerBitmapMatchesLocalCurrent,
    };
    assert_eq!(
        d.describe("v", "hv1", "hv2"),
        "v: bitmap resync from hv2 to hv1 (rule 3 (peer-bitmap-matches-local-current))"
    );
    assert_eq!(
        d.replication_state(),
        crate::role::ReplicationState::SyncTarget
    );
}
