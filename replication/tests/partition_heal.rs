//! A Primary cut off from the replication network while the other replica takes over,
//! writes and closes, then heals in stages (issue 22): first only its link to the witness
//! comes back, then everything. In process, with cuttable proxies (`replica_support`).
//! The tests from `a_primary_that_loses_a_peer_silently_resyncs_from_it_by_bitmap` on run
//! three data replicas, the last three across a live migration (two Primaries): which
//! resync a replica that was away gets, and that it misses nothing.
//!
//! What must hold: the replica that took over is never outdated by the old Primary (whose
//! outdate request, queued before the cut, is stale by then), it stays promotable while the
//! old Primary can reach only the witness, and the old Primary steps down and is Outdated
//! until it resyncs from the newer side; no acknowledged write is lost and both end
//! UpToDate with equal data, without an operator.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod replica_support;

use std::sync::Arc;
use std::time::Duration;

use replica_support::*;
use replication::replica::{EngineError, Replica, ReplicaOptions};
use replication::role::{ConnectionState, DiskState, ReplicationState, Role};
use tokio::task::JoinHandle;

const MIB: u64 = 1 << 20;

async fn cluster() -> Cluster {
    let opts = ReplicaOptions {
        suspend_timeout: Duration::from_secs(60),
        ..ReplicaOptions::default()
    };
    let c = Cluster::new(&["hv1", "hv2"], &["witness"], 32 * MIB, opts).await;
    c.wait_fully_connected(&["hv1", "hv2", "witness"]).await;
    c
}

/// Three data replicas, no witness, every link up.
async fn three_replicas(opts: ReplicaOptions) -> Cluster {
    let c = Cluster::new(&["hv1", "hv2", "hv3"], &[], 32 * MIB, opts).await;
    c.wait_fully_connected(&["hv1", "hv2", "hv3"]).await;
    c
}

/// A live migration between three data replicas begins: hv1 Primary with a write, the gate
/// on hv1 and hv2, hv2 promoted as the second Primary.
async fn migration_started(c: &Cluster) {
    let (a, b) = (c.r("hv1"), c.r("hv2"));
    a.promote().await.unwrap();
    a.write(0, data(1, 4096), false).await.unwrap();
    wait_for(&b, "hv2 sees hv1 Primary", 10, |s| {
        peer(s, "hv1").role == Role::Primary
    })
    .await;
    a.set_allow_two_primaries(true).unwrap();
    b.set_allow_two_primaries(true).unwrap();
    promote_within(&b, 10).await;
    wait_for(&a, "hv1 sees hv2 Primary", 10, |s| {
        peer(s, "hv2").role == Role::Primary
    })
    .await;
}

/// Two Primaries (`migration_started`): hv2's link to hv3 dies silently, and hv2 starts a
/// write that only hv1 applies (from the reverse link). Returns hv2's writer, which waits
/// for hv3.
async fn write_only_hv1_applies(c: &Cluster) -> JoinHandle<Result<(), EngineError>> {
    let (a, b) = (c.r("hv1"), c.r("hv2"));
    migration_started(c).await;
    c.proxy("hv2", "hv3").freeze();
    let writer = tokio::spawn(async move { b.write(8192, data(4, 4096), false).await });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while a.read(8192, 4096).await.unwrap()[..] != data(4, 4096)[..] {
        assert!(
            tokio::time::Instant::now() < deadline,
            "hv1 never applied hv2's write"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    writer
}

/// hv1 and hv3 end in sync and identical. hv1 may mark hv2's last write only after the
/// pair looked converged (once the reverse link has ended, which may be after the main
/// link's loss shows), so "converged" alone is not the end.
async fn hv1_and_hv3_end_identical(c: &Cluster) {
    let (a, x) = (c.r("hv1"), c.r("hv3"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        wait_converged(&a, &x, 30).await;
        if c.disk_hash("hv1") == c.disk_hash("hv3") {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "hv1 and hv3 are in sync but differ in hv2's last write"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Writers on `r` that keep going until a write fails; each returns that error and the
/// blocks it got acknowledged.
fn writers(r: &Arc<Replica>, first_block: u64) -> Vec<JoinHandle<(EngineError, Vec<u64>)>> {
    (0..4u64)
        .map(|w| {
            let r = r.clone();
            tokio::spawn(async move {
                let mut acked = Vec::new();
                for i in 0.. {
                    let block = first_block + w * 100 + i % 100;
                    if let Err(e) = r.write(block * 4096, data(block, 4096), false).await {
                        return (e, acked);
                    }
                    acked.push(block);
                }
                unreachable!()
            })
        })
        .collect()
}

/// The writers of the old Primary end with `Demoted` once it stepped down; returns the
/// blocks they got acknowledged.
async fn demoted(writers: Vec<JoinHandle<(EngineError, Vec<u64>)>>) -> Vec<u64> {
    let mut acked = Vec::new();
    for w in writers {
        let (err, blocks) = tokio::time::timeout(Duration::from_secs(20), w)
            .await
            .expect("the frozen writes end once the old Primary steps down")
            .unwrap();
        assert!(matches!(err, EngineError::Demoted { .. }), "{err:?}");
        acked.extend(blocks);
    }
    acked
}

/// hv2 takes over from the cut-off hv1, writes 2 MiB at 8 MiB, and closes (demotes).
async fn take_over_write_and_close(c: &Cluster) {
    let b = c.r("hv2");
    wait_for(&b, "hv2 lost hv1", 10, |s| {
        s.quorum && peer(s, "hv1").connection != ConnectionState::Connected
    })
    .await;
    promote_within(&b, 10).await;
    for i in 8..10 {
        b.write(i * MIB, data(100 + i, MIB as usize), false)
            .await
            .unwrap();
    }
    b.flush().await.unwrap();
    b.demote().await.unwrap();
}

/// With only hv1↔witness healed: hv2 is UpToDate and (if `hv2_has_quorum`) can serve
/// again, hv1 has stepped down and is Outdated. Then the full heal: both converge,
/// UpToDate, equal, and every write hv1 acknowledged and hv2's are there.
async fn check_heal(
    c: &Cluster,
    old_writers: Vec<JoinHandle<(EngineError, Vec<u64>)>>,
    hv2_has_quorum: bool,
) {
    let (a, b) = (c.r("hv1"), c.r("hv2"));
    let acked_on_hv1 = demoted(old_writers).await;
    let sa = wait_for(&a, "hv1 Secondary and Outdated", 10, |s| {
        s.role == Role::Secondary && s.disk_state == DiskState::Outdated
    })
    .await;
    assert!(!sa.quorum, "hv1 reaches only the witness: {sa:#?}");
    let sb = b.status();
    assert_eq!(sb.disk_state, DiskState::UpToDate, "{sb:#?}");
    if hv2_has_quorum {
        // hv2 serves again while hv1 still reaches only the witness.
        promote_within(&b, 10).await;
        b.write(12 * MIB, data(12, 4096), false).await.unwrap();
        b.demote().await.unwrap();
    }

    c.heal_all();
    wait_converged(&a, &b, 30).await;
    b.promote().await.unwrap();
    for block in acked_on_hv1 {
        let got = b.read(block * 4096, 4096).await.unwrap();
        assert_eq!(got[..], data(block, 4096)[..], "acknowledged block {block}");
    }
    for i in 8..10 {
        let got = b.read(i * MIB, 4096).await.unwrap();
        assert_eq!(got[..], data(100 + i, MIB as usize)[..4096]);
    }
    b.flush().await.unwrap();
    b.demote().await.unwrap();
    assert_eq!(c.disk_hash("hv1"), c.disk_hash("hv2"));
}

/// `asym2.sh`: hv1 loses hv2 while its witness link is already dead without hv1 knowing
/// yet, so the outdate request for hv2 stays queued; hv2 takes over and writes; then only
/// hv1↔witness heals. Before this was fixed hv1 sent the request again and hv2 marked
/// itself Outdated. Now hv1 learns from the witness that hv2 moved on and steps down
/// instead (were the request sent anyway, hv2 would answer that it is stale:
/// `replica::outdate` unit tests).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stale_outdate_request_never_outdates_the_replica_that_took_over() {
    let c = cluster().await;
    let (a, b) = (c.r("hv1"), c.r("hv2"));
    a.promote().await.unwrap();
    a.write(0, data(1, 4096), false).await.unwrap();
    c.proxy("hv1", "witness").freeze();
    c.cut("hv1", "hv2");
    // hv1 still counts the (frozen) witness: it keeps quorum and asks it to outdate hv2;
    // the request goes nowhere and writes wait for its answer.
    wait_for(&a, "hv1 lost hv2", 10, |s| {
        peer(s, "hv2").connection != ConnectionState::Connected
    })
    .await;
    let old_writers = writers(&a, 1000);
    wait_for(&a, "hv1 lost the witness too", 10, |s| !s.quorum).await;
    c.cut("hv1", "witness");

    take_over_write_and_close(&c).await;
    assert_eq!(b.status().disk_state, DiskState::UpToDate);

    c.proxy("hv1", "witness").heal();
    check_heal(&c, old_writers, true).await;
}

/// Which neighbour of the partition-and-heal case [`a_cut_off_primary_steps_down`] runs.
#[derive(Clone, Copy, PartialEq)]
enum During {
    /// Nothing else happens during the cut.
    Nothing,
    /// The witness restarts (and forgets everything) during the cut. hv2 loses quorum
    /// with it and cannot regain it through the witness alone (the sticky tiebreaker), so
    /// it serves again only after the full heal.
    WitnessRestarts,
    /// The old Primary is restarted during the cut instead of healed.
    OldPrimaryRestarts,
}

/// hv1 is cut off from both at once (no outdate request is ever made), hv2 takes over,
/// writes and closes, then only hv1↔witness heals: the witness's memory of hv2's
/// generation tells hv1 it was left behind.
async fn a_cut_off_primary_steps_down(during: During) {
    let mut c = cluster().await;
    let a = c.r("hv1");
    a.promote().await.unwrap();
    a.write(0, data(1, 4096), false).await.unwrap();
    c.isolate("hv1").await;
    wait_for(&a, "hv1 frozen", 10, |s| !s.quorum && s.io_suspended).await;
    let old_writers = writers(&a, 1000);

    take_over_write_and_close(&c).await;
    let old_writers = match during {
        During::Nothing => old_writers,
        During::WitnessRestarts => {
            c.kill("witness");
            c.restart("witness").await;
            wait_for(&c.r("hv2"), "hv2 back with the witness", 10, |s| {
                peer(s, "witness").connection == ConnectionState::Connected
            })
            .await;
            old_writers
        }
        During::OldPrimaryRestarts => {
            c.kill("hv1");
            for w in old_writers {
                w.abort();
            }
            c.restart("hv1").await;
            Vec::new()
        }
    };
    c.proxy("hv1", "witness").heal();
    check_heal(&c, old_writers, during != During::WitnessRestarts).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cut_off_primary_that_regains_only_the_witness_steps_down() {
    a_cut_off_primary_steps_down(During::Nothing).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cut_off_primary_steps_down_through_a_witness_restarted_during_the_cut() {
    a_cut_off_primary_steps_down(During::WitnessRestarts).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_old_primary_restarted_during_the_cut_learns_it_was_left_behind() {
    a_cut_off_primary_steps_down(During::OldPrimaryRestarts).await;
}

/// Three data replicas, no witness (the `ha_failover` isolation test's cluster): hv1's link
/// to hv3 breaks at once while its link to hv2 dies silently. hv1 still counts hv2, keeps
/// quorum and starts a new generation for hv3's loss with its next write, which hv2 never
/// hears of; then it loses hv2 too, and quorum. hv2 takes over with hv3 and writes; hv1 is
/// fenced. At the heal hv1 must resync from hv2 by bitmap, not in full: it knew hv2 had not
/// followed its last generation when it lost it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_primary_that_loses_a_peer_silently_resyncs_from_it_by_bitmap() {
    let opts = ReplicaOptions {
        suspend_timeout: Duration::from_secs(60),
        ..ReplicaOptions::default()
    };
    let c = three_replicas(opts).await;
    let (a, b) = (c.r("hv1"), c.r("hv2"));
    a.promote().await.unwrap();
    a.write(0, data(1, 4096), false).await.unwrap();

    c.proxy("hv1", "hv2").freeze();
    c.cut("hv1", "hv3");
    wait_for(&a, "hv1 lost hv3 and still counts hv2", 10, |s| {
        peer(s, "hv3").connection != ConnectionState::Connected && s.quorum
    })
    .await;
    // This write starts hv1's new generation and waits for hv2, which never answers.
    let frozen = {
        let a = a.clone();
        tokio::spawn(async move { a.write(4096, data(2, 4096), false).await })
    };
    wait_for(&a, "hv1 lost hv2 and quorum", 10, |s| {
        peer(s, "hv2").connection != ConnectionState::Connected && !s.quorum
    })
    .await;

    wait_for(&b, "hv2 lost hv1", 10, |s| {
        s.quorum && peer(s, "hv1").connection != ConnectionState::Connected
    })
    .await;
    promote_within(&b, 10).await;
    b.write(8 * MIB, data(8, MIB as usize), false)
        .await
        .unwrap();
    a.demote_force().await.unwrap();
    assert!(
        frozen.await.unwrap().is_err(),
        "the frozen write was never acknowledged"
    );

    // hv1 meets hv2 first: hv3 followed hv2 as a Secondary, so a resync from it would be
    // a full one (see the next test).
    c.cut("hv1", "hv2");
    c.proxy("hv1", "hv2").heal();
    wait_converged(&a, &b, 30).await;
    let decision = peer(&a.status(), "hv2")
        .decision
        .clone()
        .unwrap_or_default();
    assert!(
        decision.contains("bitmap resync from hv2 to hv1"),
        "hv1 did not resync from hv2 by bitmap: {decision}"
    );
    c.heal_all();
    wait_converged(&a, &c.r("hv3"), 30).await;
    b.flush().await.unwrap();
    b.demote().await.unwrap();
    assert_eq!(c.disk_hash("hv1"), c.disk_hash("hv2"));
    assert_eq!(c.disk_hash("hv1"), c.disk_hash("hv3"));
}

/// Three data replicas: hv2 is cut off, hv3 takes over (with hv1) and writes, then hv3 goes
/// away and hv2 comes back to meet only hv1. hv1 applied hv3's writes as a Secondary and
/// marked none of them for hv2, so it must not resync hv2 by its bitmap (it once did, and
/// hv2 came back UpToDate without hv3's write): hv2 gets a full sync and reads the write.
/// hv1 is restarted before the heal.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_back_from_a_cut_gets_every_write_a_secondary_applied_meanwhile() {
    let mut c = three_replicas(ReplicaOptions::default()).await;
    let (b, x) = (c.r("hv2"), c.r("hv3"));
    c.isolate("hv2").await;
    wait_for(&x, "hv3 lost hv2", 10, |s| {
        peer(s, "hv2").connection != ConnectionState::Connected
    })
    .await;
    promote_within(&x, 10).await;
    x.write(4 * MIB, data(44, 4096), false).await.unwrap();
    x.flush().await.unwrap();
    x.demote().await.unwrap();

    c.kill("hv3");
    // hv1 restarts meanwhile (its metadata must keep every peer and bit).
    c.kill("hv1");
    c.restart("hv1").await;
    let a = c.r("hv1");
    c.heal_all();
    wait_converged(&a, &b, 30).await;
    let decision = peer(&b.status(), "hv1")
        .decision
        .clone()
        .unwrap_or_default();
    assert!(decision.contains("full sync from hv1 to hv2"), "{decision}");
    promote_within(&b, 10).await;
    let got = b.read(4 * MIB, 4096).await.unwrap();
    assert_eq!(got[..], data(44, 4096)[..], "hv2 lacks hv3's write");
    b.demote().await.unwrap();
    assert_eq!(c.disk_hash("hv1"), c.disk_hash("hv2"));
}

/// Three data replicas: hv1's link to hv3 dies silently with a write in flight; the write
/// completes on hv1 and hv2 once hv3 is declared dead. hv1 then steps down cleanly with no
/// further write, hv2 takes over while hv3 is still away and writes, and hv1 is lost. hv3
/// comes back to meet hv2 only: it must get hv1's last write too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_a_replica_missed_before_a_clean_step_down_reaches_it_from_the_next_primary() {
    let mut c = three_replicas(ReplicaOptions::default()).await;
    let (a, b, x) = (c.r("hv1"), c.r("hv2"), c.r("hv3"));
    a.promote().await.unwrap();
    a.write(0, data(1, 4096), false).await.unwrap();
    c.proxy("hv1", "hv3").freeze();
    a.write(8192, data(4, 4096), false).await.unwrap();
    c.isolate("hv3").await;
    wait_for(&b, "hv2 lost hv3", 10, |s| {
        peer(s, "hv3").connection != ConnectionState::Connected
    })
    .await;
    a.demote().await.unwrap();
    promote_within(&b, 10).await;
    b.write(8 * MIB, data(8, 4096), false).await.unwrap();
    b.demote().await.unwrap();

    c.kill("hv1");
    c.heal_all();
    wait_converged(&b, &x, 30).await;
    promote_within(&x, 10).await;
    let got = x.read(8192, 4096).await.unwrap();
    assert_eq!(got[..], data(4, 4096)[..], "hv3 lacks hv1's last write");
    let got = x.read(8 * MIB, 4096).await.unwrap();
    assert_eq!(got[..], data(8, 4096)[..], "hv3 lacks hv2's write");
    x.demote().await.unwrap();
    assert_eq!(c.disk_hash("hv2"), c.disk_hash("hv3"));
}

/// Three data replicas, two Primaries (a live migration): hv2's link to hv3 dies silently
/// with a write of hv2 in flight, which hv1 applies. hv2 completes it once hv3 is declared
/// dead, after starting a new generation that hv1 follows. hv2 steps down with no further
/// write, hv1 writes on, and hv2 is lost. hv3 comes back to meet hv1 only and must get
/// hv2's write: hv3 holds a generation that hv1 left behind without a bitmap slot for it,
/// so it gets a full sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_of_the_other_primary_that_a_replica_missed_reaches_it_after_the_migration() {
    let mut c = three_replicas(ReplicaOptions::default()).await;
    let (a, b, x) = (c.r("hv1"), c.r("hv2"), c.r("hv3"));
    migration_started(&c).await;
    c.proxy("hv2", "hv3").freeze();
    b.write(8192, data(4, 4096), false).await.unwrap();
    c.isolate("hv3").await;
    wait_for(&a, "hv1 lost hv3", 10, |s| {
        peer(s, "hv3").connection != ConnectionState::Connected
    })
    .await;
    b.demote().await.unwrap();
    wait_for(&a, "hv1 sees hv2 Secondary", 10, |s| {
        established(s, "hv2") && peer(s, "hv2").role == Role::Secondary
    })
    .await;
    a.write(8 * MIB, data(8, 4096), false).await.unwrap();
    a.demote().await.unwrap();

    c.kill("hv2");
    c.heal_all();
    wait_converged(&a, &x, 30).await;
    let decision = peer(&x.status(), "hv1")
        .decision
        .clone()
        .unwrap_or_default();
    assert!(decision.contains("full sync from hv1 to hv3"), "{decision}");
    promote_within(&x, 10).await;
    let got = x.read(8192, 4096).await.unwrap();
    assert_eq!(got[..], data(4, 4096)[..], "hv3 lacks hv2's write");
    let got = x.read(8 * MIB, 4096).await.unwrap();
    assert_eq!(got[..], data(8, 4096)[..], "hv3 lacks hv1's write");
    x.demote().await.unwrap();
    assert_eq!(c.disk_hash("hv1"), c.disk_hash("hv3"));
}

/// Three data replicas, two Primaries: hv2's link to hv3 dies silently with a write of hv2
/// in flight, which hv1 applies, and hv2 dies before anybody acknowledges it to hv2's
/// writer. hv1 must mark that write towards hv3, as a Secondary marks its lost Primary's
/// last writes: the replicas are identical once hv3 is back in sync with hv1 (they once
/// stayed "in sync" with different data in that block).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_last_writes_of_a_lost_second_primary_reach_the_third_replica() {
    let mut c = three_replicas(ReplicaOptions::default()).await;
    let writer = write_only_hv1_applies(&c).await;
    c.kill("hv2");
    writer.abort();
    hv1_and_hv3_end_identical(&c).await;
}

/// Three data replicas, a live migration: hv2 becomes the second Primary and writes, hv1
/// steps down, hv2 writes the same blocks again and steps down. Every replica ends
/// identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_live_migration_with_three_replicas_leaves_them_identical() {
    let c = three_replicas(ReplicaOptions::default()).await;
    let (a, b, x) = (c.r("hv1"), c.r("hv2"), c.r("hv3"));
    migration_started(&c).await;
    for i in 0..50u64 {
        b.write(i * 8192, data(i, 4096), false).await.unwrap();
    }
    a.demote().await.unwrap();
    for round in 1..20u64 {
        for i in 0..50u64 {
            b.write(i * 8192, data(1000 * round + i, 4096), false)
                .await
                .unwrap();
        }
    }
    b.demote().await.unwrap();
    // Bits the Secondaries marked for each other when a Primary stepped down (its link may
    // close before its new state arrives) wait for the next Primary (`reconcile.rs`).
    promote_within(&a, 10).await;
    wait_converged(&a, &x, 30).await;
    wait_converged(&a, &b, 30).await;
    a.demote().await.unwrap();
    assert_eq!(c.disk_hash("hv1"), c.disk_hash("hv2"));
    assert_eq!(c.disk_hash("hv2"), c.disk_hash("hv3"));
}

/// Three data replicas, a live migration: hv2's link to hv3 dies silently with a write of
/// hv2 in flight that only hv1 applies (from the reverse link); hv1 steps down and follows
/// hv2, in sync; then hv2 dies. hv1 marks that write towards hv3 as hv2's last, and once
/// hv1 is promoted, hv1 and hv3 end identical (also when hv3's link to hv1 began as a
/// resync from hv1 and has to be set up again to reconcile).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_last_writes_of_a_second_primary_lost_after_the_first_stepped_down_reach_the_third_replica(
) {
    let mut c = three_replicas(ReplicaOptions::default()).await;
    let a = c.r("hv1");
    let writer = write_only_hv1_applies(&c).await;
    a.demote().await.unwrap();
    wait_for(&a, "hv1 follows hv2, in sync", 10, |s| {
        s.disk_state == DiskState::UpToDate
            && peer(s, "hv2").role == Role::Primary
            && peer(s, "hv2").replication == ReplicationState::Established
    })
    .await;
    c.kill("hv2");
    writer.abort();
    promote_within(&a, 10).await;
    hv1_and_hv3_end_identical(&c).await;
}
