//! The simulator's tests: the seeded schedules, the fault switches they catch within the
//! default budget, the schedules of two engine rules the simulator found missing (scripted,
//! each with the fault switch that removes the rule), and the replay of one seed.

use super::*;

#[test]
fn seeded_role_schedules_keep_one_primary_no_split_brain_and_every_acknowledged_write() {
    let (found, stats) = first_violation(Faults::default());
    eprintln!("{stats:?}");
    if let Some((seed, violation)) = found {
        panic!(
            "seed {seed}: {violation}\n  replay: TANDEM_SIM_SEED={seed} TANDEM_SIM_TRACE=1 \
             cargo test -p tandem-replication --lib core::sim::roles::tests::replay_a_seed -- --nocapture"
        );
    }
}

/// Some seed's schedule breaks a promise under `faults`, and the violation names one of
/// `kinds`.
fn assert_caught(faults: Faults, kinds: &[&str]) {
    let (seed, violation) = first_violation(faults)
        .0
        .expect("no schedule caught the fault");
    eprintln!("caught by seed {seed}: {violation}");
    assert!(
        kinds.iter().any(|k| violation.contains(k)),
        "seed {seed}: {violation}"
    );
}

#[test]
fn the_simulator_catches_a_promotion_that_ignores_quorum() {
    let promotion = PromotionFaults {
        ignore_quorum: true,
    };
    let faults = Faults {
        promotion,
        ..Faults::default()
    };
    assert_caught(faults, &["both Primary", "split brain"]);
}

/// The generation rule of `hold_after_peer_loss`: without it a write is acknowledged in the
/// generation the lost peer holds, and a handshake at equal generations drops it.
#[test]
fn the_simulator_catches_a_late_acknowledgement_in_the_old_generation() {
    let faults = Faults {
        late_ack_in_old_generation: true,
        ..Faults::default()
    };
    assert_caught(faults, &["lost flushed write"]);
}

/// `TANDEM_SIM_SEED=N` replays one schedule (with `TANDEM_SIM_TRACE=1`, step by step).
#[test]
fn replay_a_seed() {
    if let Some(seed) = std::env::var("TANDEM_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        if let Err(violation) = run_schedule(seed, Faults::default(), &mut Stats::default()) {
            panic!("seed {seed}: {violation}");
        }
    }
}

/// The schedule of `a_node_promoted_through_the_witness_outdates_the_peer_it_cannot_reach`.
fn promotion_through_the_witness(faults: Faults) -> Result<(), String> {
    let mut w = World::with(StdRng::seed_from_u64(1), true, faults);
    w.settle()?;
    // hv1 and hv2 lose each other and keep quorum through the witness; hv1 is promoted.
    w.cut(0, 1);
    w.settle()?;
    w.promote(0, true)?;
    w.settle()?;
    w.finish_round(0, false)?;
    w.settle()?;
    // hv1 writes and flushes, and dies before the witness hears of its new generation.
    w.issue_write(0);
    w.complete_local(0);
    w.issue_flush(0);
    w.finish_requests(0);
    w.power_loss(0);
    w.settle()?;
    // hv2's HA agent promotes it.
    w.promote(1, true)?;
    w.settle()?;
    w.finish_round(1, false)?;
    w.check()
}

/// The outdating of `Replica::outdate_unreached_peers` (the seeded run catches its fault
/// switch only after 128,920 schedules, so this is its schedule, scripted).
#[test]
fn a_node_promoted_through_the_witness_outdates_the_peer_it_cannot_reach() {
    promotion_through_the_witness(Faults::default()).unwrap();
    let faults = Faults {
        no_outdate_at_promotion: true,
        ..Faults::default()
    };
    let violation = promotion_through_the_witness(faults).unwrap_err();
    assert!(violation.contains("became Primary"), "{violation}");
}

/// The schedule of `a_round_fails_when_a_member_it_did_not_ask_comes_up`.
fn member_up_during_a_round(faults: Faults) -> Result<(), String> {
    let mut w = World::with(StdRng::seed_from_u64(1), true, faults);
    w.settle()?;
    w.promote(1, true)?;
    w.settle()?;
    w.finish_round(1, false)?;
    w.settle()?;
    // hv2, Primary, is cut off from everyone and freezes; hv1 asks the witness, which no
    // longer knows of hv2, and says Yes.
    w.cut(1, 2);
    w.cut(0, 1);
    w.settle()?;
    w.promote(0, true)?;
    w.deliver(0, 2)?;
    // Before the answer arrives, hv1 reconnects to hv2 (as its Secondary: hv2 keeps its
    // data) and hv2 to the witness: hv2 is a Primary with quorum again.
    w.link(0, 1).cut = false;
    w.connect(0, 1)?;
    w.link(1, 2).cut = false;
    w.connect(1, 2)?;
    w.cut(0, 1);
    // Now the witness's Yes arrives, ahead of its news of hv2.
    w.deliver(2, 0)?;
    w.finish_round(0, false)?;
    w.check()
}

/// The round rule of `twopc_link_up` (the seeded run catches its fault switch only after
/// 77,290 schedules; scripted here).
#[test]
fn a_round_fails_when_a_member_it_did_not_ask_comes_up() {
    member_up_during_a_round(Faults::default()).unwrap();
    let faults = Faults {
        no_retry_on_link_up: true,
        ..Faults::default()
    };
    let violation = member_up_during_a_round(faults).unwrap_err();
    assert!(violation.contains("both Primary"), "{violation}");
}

/// The schedule of `a_primary_left_alone_by_the_other_primary_starts_a_new_generation`.
fn dual_primary_crash(faults: Faults) -> Result<(), String> {
    let mut w = World::with(StdRng::seed_from_u64(1), true, faults);
    w.settle()?;
    w.promote(1, true)?;
    w.settle()?;
    w.finish_round(1, false)?;
    // A live migration from hv2 to hv1: both Primary.
    for d in 0..2 {
        w.nodes[d].allow_two = true;
        w.broadcast(d);
    }
    w.settle()?;
    w.promote(0, false)?;
    w.settle()?;
    w.finish_round(0, false)?;
    w.settle()?;
    // The destination dies; the source goes on (the witness cannot reach hv1 either),
    // writes and flushes, and dies too.
    w.power_loss(0);
    w.settle()?;
    w.issue_write(1);
    w.complete_local(1);
    w.finish_requests(1);
    w.issue_flush(1);
    w.finish_requests(1);
    w.power_loss(1);
    for n in 0..3 {
        w.power_on(n);
    }
    w.connect(0, 1)?;
    w.check()
}

/// The generation rule of `link_down` for two Primaries with quorum (the seeded run does
/// not reach it within a million schedules; scripted here).
#[test]
fn a_primary_left_alone_by_the_other_primary_starts_a_new_generation() {
    dual_primary_crash(Faults::default()).unwrap();
    let faults = Faults {
        no_generation_after_dual: true,
        ..Faults::default()
    };
    let violation = dual_primary_crash(faults).unwrap_err();
    assert!(violation.contains("lost flushed write"), "{violation}");
}
