//! Rules that keep a Primary's acknowledged writes from being lost to the other data
//! node, found by the role simulator (`core::sim::roles`). In process, with cuttable
//! proxies (`replica_support`).
//!
//! - A node promoted while the other data node is cut off from it but still reaches the
//!   witness: both keep quorum through the witness, so the other node stays promotable;
//!   had the new Primary acknowledged a write and died before the witness learned its new
//!   generation, the other node could take over without that write (and meet it later as a
//!   split brain). The promotion outdates the unreached node through the witness before a
//!   write is acknowledged, as a Primary does for a data peer it loses.
//! - A write in flight when its peer is lost, and a flush after a takeover, are
//!   acknowledged in the new generation the loss or the takeover armed, like a new write:
//!   in the old one, which the other node holds too, a later handshake at equal
//!   generations could make this node the SyncTarget (after it lost quorum, or when both
//!   crashed as Primary) and drop writes it had flushed. So is a write of a Primary the
//!   other Primary left (live migration), when quorum is on.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod replica_support;

use std::time::Duration;

use replica_support::*;
use replication::replica::{EngineError, ReplicaOptions};
use replication::role::{ConnectionState, DiskState, PromoteRefusal};

const MIB: u64 = 1 << 20;

/// hv1 and hv2 with a witness, fully connected.
async fn cluster() -> Cluster {
    let c = Cluster::new(
        &["hv1", "hv2"],
        &["witness"],
        32 * MIB,
        ReplicaOptions::default(),
    )
    .await;
    c.wait_fully_connected(&["hv1", "hv2", "witness"]).await;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promotion_outdates_a_data_peer_it_cannot_reach_before_acknowledging_a_write() {
    let mut c = cluster().await;
    c.cut("hv1", "hv2");
    for (me, other) in [("hv1", "hv2"), ("hv2", "hv1")] {
        wait_for(&c.r(me), "the data link down, quorum kept", 10, |s| {
            s.quorum && peer(s, other).connection != ConnectionState::Connected
        })
        .await;
    }
    let (a, b) = (c.r("hv1"), c.r("hv2"));
    promote_within(&a, 10).await;
    // From here the witness hears nothing more from hv1 (a dead cable: nothing is closed).
    c.proxy("hv1", "witness").freeze();
    let acked = tokio::time::timeout(Duration::from_secs(3), async {
        a.write(0, data(1, 4096), true).await?;
        a.flush().await
    })
    .await;
    let acked = match acked {
        Ok(Ok(())) => true,
        Ok(Err(e)) => panic!("write on hv1: {e}"),
        Err(_) => false, // held: hv2 is not confirmed Outdated
    };
    eprintln!("hv1's write acknowledged: {acked}");
    if acked {
        assert_eq!(
            b.status().disk_state,
            DiskState::Outdated,
            "hv1 acknowledged a write while hv2 could still take over"
        );
    }
    c.kill("hv1");
    wait_for(&c.r("witness"), "the witness lost hv1", 10, |s| {
        peer(s, "hv1").connection != ConnectionState::Connected
    })
    .await;
    // hv2 may take over only if hv1 acknowledged nothing; it may be Outdated either way
    // (the outdate can land before its confirmation is lost).
    match b.promote().await {
        Ok(()) => assert!(!acked, "hv2 took over without hv1's acknowledged write"),
        Err(EngineError::Promote(PromoteRefusal::LocalNotUpToDate { disk, .. })) => {
            assert_eq!(disk, DiskState::Outdated);
        }
        Err(e) => panic!("promote hv2: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_acknowledged_after_its_peer_was_lost_is_in_a_new_generation() {
    let mut c = cluster().await;
    let a = c.r("hv1");
    promote_within(&a, 10).await;
    a.write(0, data(1, 4096), false).await.unwrap();
    let before = a.status().current_uuid;
    // hv2 stops answering with the next write in flight, then dies.
    c.proxy("hv1", "hv2").freeze();
    let writer = a.clone();
    let write = tokio::spawn(async move { writer.write(4096, data(2, 4096), false).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!write.is_finished(), "acknowledged without hv2");
    c.kill("hv2");
    tokio::time::timeout(Duration::from_secs(10), write)
        .await
        .expect("acknowledged once hv2's loss is processed (the witness cannot reach it)")
        .unwrap()
        .unwrap();
    assert_ne!(
        a.status().current_uuid,
        before,
        "acknowledged in the generation hv2 holds too"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_after_a_takeover_is_in_a_new_generation() {
    let mut c = cluster().await;
    let a = c.r("hv1");
    c.kill("hv2");
    wait_for(&a, "hv2 gone, quorum kept", 10, |s| {
        s.quorum && peer(s, "hv2").connection != ConnectionState::Connected
    })
    .await;
    promote_within(&a, 10).await;
    let before = a.status().current_uuid;
    a.flush().await.unwrap();
    assert_ne!(
        a.status().current_uuid,
        before,
        "flushed in the generation hv2 holds too"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_left_alone_by_the_other_primary_writes_in_a_new_generation() {
    let mut c = cluster().await;
    let (a, b) = (c.r("hv1"), c.r("hv2"));
    promote_within(&a, 10).await;
    a.set_allow_two_primaries(true).unwrap();
    b.set_allow_two_primaries(true).unwrap();
    promote_within(&b, 10).await;
    let before = a.status().current_uuid;
    // A live migration's destination dies; the source keeps quorum through the witness.
    c.kill("hv2");
    wait_for(&a, "hv2 gone, quorum kept", 10, |s| {
        s.quorum && peer(s, "hv2").connection != ConnectionState::Connected
    })
    .await;
    a.write(0, data(1, 4096), false).await.unwrap();
    assert_ne!(
        a.status().current_uuid,
        before,
        "written in the generation hv2 holds too"
    );
}
