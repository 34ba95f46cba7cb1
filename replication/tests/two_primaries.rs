//! Two Primaries for a live migration (issue 8), in process: the window closes by itself
//! once only one Primary is left, and overlapping concurrent writes from both Primaries fail
//! the connection loudly instead of being merged.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod replica_support;

use std::time::Duration;

use replica_support::*;
use replication::replica::ReplicaOptions;
use replication::role::Role;

const MIB: u64 = 1 << 20;

/// hv1 Primary with data, the gate on both nodes, hv2 promoted as the second Primary.
async fn two_primaries(c: &Cluster) {
    let (a, b) = (c.r("hv1"), c.r("hv2"));
    wait_for(&a, "connected", 10, |s| established(s, "hv2")).await;
    wait_for(&b, "connected", 10, |s| established(s, "hv1")).await;
    a.promote().await.unwrap();
    a.write(0, data(1, MIB as usize), false).await.unwrap();
    wait_for(&b, "hv2 sees hv1 Primary", 5, |s| {
        peer(s, "hv1").role == Role::Primary
    })
    .await;
    a.set_allow_two_primaries(true).unwrap();
    b.set_allow_two_primaries(true).unwrap();
    promote_within(&b, 5).await;
    wait_for(&a, "hv1 sees hv2 Primary", 5, |s| {
        peer(s, "hv2").role == Role::Primary
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_gate_closes_by_itself_when_the_source_demotes() {
    let c = Cluster::new(&["hv1", "hv2"], &[], 32 * MIB, ReplicaOptions::default()).await;
    let (a, b) = (c.r("hv1"), c.r("hv2"));
    two_primaries(&c).await;
    assert!(a.status().allow_two_primaries && b.status().allow_two_primaries);
    // The migration's switchover: the source writes its last blocks, then demotes; the
    // destination writes on.
    a.write(2 * MIB, data(2, MIB as usize), false)
        .await
        .unwrap();
    a.flush().await.unwrap();
    a.demote().await.unwrap();
    wait_for(&a, "gate off on the old source", 10, |s| {
        !s.allow_two_primaries
    })
    .await;
    wait_for(&b, "gate off on the new Primary", 20, |s| {
        !s.allow_two_primaries && peer(s, "hv1").role == Role::Secondary
    })
    .await;
    assert_eq!(b.status().role, Role::Primary);
    b.write(4 * MIB, data(4, MIB as usize), false)
        .await
        .unwrap();
    b.flush().await.unwrap();
    wait_converged(&a, &b, 20).await;
    assert_eq!(c.disk_hash("hv1"), c.disk_hash("hv2"));
    // A second promotion is refused again: the window is closed.
    let err = a.promote().await.unwrap_err();
    assert_eq!(a.status().role, Role::Secondary, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_migration_closes_the_gate_when_the_destination_demotes() {
    let c = Cluster::new(&["hv1", "hv2"], &[], 32 * MIB, ReplicaOptions::default()).await;
    let (a, b) = (c.r("hv1"), c.r("hv2"));
    two_primaries(&c).await;
    // The destination gives up (its QEMU died): it demotes; the source stays Primary.
    b.demote().await.unwrap();
    wait_for(&b, "gate off on the destination", 10, |s| {
        !s.allow_two_primaries
    })
    .await;
    wait_for(&a, "gate off on the source", 20, |s| {
        !s.allow_two_primaries && peer(s, "hv2").role == Role::Secondary
    })
    .await;
    assert_eq!(a.status().role, Role::Primary);
    a.write(6 * MIB, data(6, MIB as usize), false)
        .await
        .unwrap();
    a.flush().await.unwrap();
    wait_converged(&a, &b, 20).await;
    assert_eq!(c.disk_hash("hv1"), c.disk_hash("hv2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overlapping_writes_from_both_primaries_fail_the_connection() {
    let c = Cluster::new(&["hv1", "hv2"], &[], 32 * MIB, ReplicaOptions::default()).await;
    let (a, b) = (c.r("hv1"), c.r("hv2"));
    two_primaries(&c).await;
    // Disjoint writes from both sides are fine (what a migrating VM may do).
    let (ra, rb) = tokio::join!(
        a.write(8 * MIB, data(8, 65536), false),
        b.write(9 * MIB, data(9, 65536), false)
    );
    ra.unwrap();
    rb.unwrap();
    for s in [a.status(), b.status()] {
        assert!(
            s.peers.iter().all(|p| p.two_primaries_conflict.is_none()),
            "{s:?}"
        );
    }
    // Both write the same block at the same moment: never merged; one side detects it.
    let mut detected = None;
    for round in 0..50u64 {
        let (ra, rb) = tokio::join!(
            a.write(10 * MIB, data(100 + round, 65536), false),
            b.write(10 * MIB, data(200 + round, 65536), false)
        );
        eprintln!("round {round}: hv1 write {ra:?}, hv2 write {rb:?}");
        let conflict = peer(&a.status(), "hv2")
            .two_primaries_conflict
            .clone()
            .or_else(|| peer(&b.status(), "hv1").two_primaries_conflict.clone());
        if let Some(text) = conflict {
            detected = Some(text);
            break;
        }
    }
    let text = detected.expect("overlapping writes were never detected");
    eprintln!("detected: {text}");
    assert!(
        text.contains("overlapping concurrent writes from two Primaries"),
        "{text}"
    );
    assert!(text.contains(&format!("at offset {}", 10 * MIB)), "{text}");
    // The connection was failed and is not silently re-established while both are Primary
    // (their data differs in that block: the handshake refuses a Primary as resync target).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < deadline {
        let (sa, sb) = (a.status(), b.status());
        assert!(
            !established(&sa, "hv2") && !established(&sb, "hv1"),
            "the pair reconnected after overlapping writes:\n{sa:#?}\n{sb:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The conflict stays visible in status.
    assert!(
        peer(&a.status(), "hv2").two_primaries_conflict.is_some()
            || peer(&b.status(), "hv1").two_primaries_conflict.is_some()
    );
}
