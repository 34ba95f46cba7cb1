//! The replica engine end to end, in process: several `ReplicationNode`s on 127.0.0.1 with
//! temp-file devices and cuttable proxies on every link (see `replica_support`).

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod replica_support;

use std::time::Duration;

use replica_support::*;
use replication::replica::{EngineError, EngineTunables, ReplicaOptions};
use replication::role::{ConnectionState, DiskState, ReplicationState, Role};

const MIB: u64 = 1 << 20;

/// Three 32 MiB data replicas, all connected, hv1 Primary.
async fn three_replicas_with_hv1_primary(options: ReplicaOptions) -> Cluster {
    three_replicas_on(options, tunables()).await
}

/// Three replicas whose promotions never wait for a peer whose link just ended, for
/// scenarios that kill the Primary and promote another at once.
async fn three_replicas_without_reconnect_grace(options: ReplicaOptions) -> Cluster {
    let tunables = EngineTunables {
        reconnect_grace: Duration::ZERO,
        ..tunables()
    };
    three_replicas_on(options, tunables).await
}

async fn three_replicas_on(options: ReplicaOptions, tunables: EngineTunables) -> Cluster {
    let c = Cluster::with_tunables(&["hv1", "hv2", "hv3"], &[], 32 * MIB, options, tunables).await;
    c.wait_fully_connected(&["hv1", "hv2", "hv3"]).await;
    c.r("hv1").promote().await.unwrap();
    c
}

async fn write_mib(r: &replication::replica::Replica, first_mib: u64, count: u64, seed: u64) {
    for i in first_mib..first_mib + count {
        r.write(i * MIB, data(seed + i, MIB as usize), false)
            .await
            .unwrap();
    }
    r.flush().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_protocol_c_replicate_and_refuse_a_second_primary() {
    let c = Cluster::new(&["hv1", "hv2"], &[], 64 * MIB, ReplicaOptions::default()).await;
    let (a, b) = (c.r("hv1"), c.r("hv2"));
    wait_for(&a, "hv1 connected to hv2", 10, |s| established(s, "hv2")).await;
    wait_for(&b, "hv2 connected to hv1", 10, |s| established(s, "hv1")).await;
    // Day-0 replicas start UpToDate with no sync.
    assert_eq!(a.status().disk_state, DiskState::UpToDate);

    // A Secondary serves no I/O.
    let err = a.write(0, data(1, 4096), false).await.unwrap_err();
    assert!(matches!(err, EngineError::NotPrimary { .. }), "{err}");

    a.promote().await.unwrap();
    write_mib(&a, 0, 16, 100).await;
    let s = a.status();
    assert_eq!(s.role, Role::Primary);
    let p = peer(&s, "hv2");
    assert_eq!(p.connection, ConnectionState::Connected);
    assert_eq!(p.disk_state, DiskState::UpToDate);
    assert_eq!(p.role, Role::Secondary);
    assert_eq!(p.replication, ReplicationState::Established);
    assert_eq!(p.out_of_sync_bytes, 0);
    assert_eq!(c.disk_hash("hv1"), c.disk_hash("hv2"));
    let back = a.read(3 * MIB, 4096).await.unwrap();
    assert_eq!(&back[..], &data(103, MIB as usize)[..4096]);

    // The Secondary sees the Primary and refuses to be promoted.
    wait_for(&b, "hv2 sees hv1 as Primary", 5, |s| {
        peer(s, "hv1").role == Role::Primary
    })
    .await;
    let err = b.promote().await.unwrap_err();
    assert!(
        err.to_string()
            .starts_with("vm-100-disk-0 is Primary on hv1"),
        "{err}"
    );
    assert!(b.read(0, 4096).await.is_err());

    // JSON status as the CLI prints it.
    let json = serde_json::to_value(a.status()).unwrap();
    assert_eq!(json["role"], "Primary");
    assert_eq!(json["peers"][0]["disk_state"], "UpToDate");
    assert_eq!(json["peers"][0]["replication"], "Established");

    // Demote, then the other side can take over (links re-established in between).
    a.demote().await.unwrap();
    wait_for(&b, "hv2 sees hv1 Secondary", 10, |s| {
        established(s, "hv1") && peer(s, "hv1").role == Role::Secondary
    })
    .await;
    b.promote().await.unwrap();
    b.write(0, data(7, 65536), true).await.unwrap();
    assert_eq!(c.disk_hash("hv1"), c.disk_hash("hv2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_peer_is_tracked_in_the_bitmap_and_resyncs_by_bitmap_on_return() {
    let mut c = Cluster::new(&["hv1", "hv2"], &[], 64 * MIB, ReplicaOptions::default()).await;
    let a = c.r("hv1");
    wait_for(&a, "connected", 10, |s| established(s, "hv2")).await;
    a.promote().await.unwrap();
    write_mib(&a, 0, 2, 1).await;
    assert_eq!(c.disk_hash("hv1"), c.disk_hash("hv2"));

    c.kill("hv2");
    wait_for(&a, "hv2 gone", 10, |s| {
        peer(s, "hv2").connection != ConnectionState::Connected
    })
    .await;
    // Two data nodes without witness: quorum is off, the Primary keeps writing.
    let before = a.status().current_uuid;
    write_mib(&a, 8, 4, 50).await;
    a.write(20 * MIB + 512, data(9, 1024), false).await.unwrap();
    let s = a.status();
    assert_eq!(peer(&s, "hv2").out_of_sync_bytes, 4 * MIB + 4096);
    assert_ne!(
        s.current_uuid, before,
        "a new generation after losing the peer"
    );

    c.restart("hv2").await;
    let b = c.r("hv2");
    let s = wait_for(&a, "hv1 decided a resync", 10, |s| {
        peer(s, "hv2").connection == ConnectionState::Connected && peer(s, "hv2").decision.is_some()
    })
    .await;
    let d = peer(&s, "hv2").decision.clone().unwrap();
    assert!(d.contains("bitmap resync from hv1 to hv2"), "{d}");
    let sb = wait_for(&b, "hv2 SyncTarget or done", 10, |s| {
        peer(s, "hv1").replication == ReplicationState::SyncTarget
            || (established(s, "hv1") && s.disk_state == DiskState::UpToDate)
    })
    .await;
    assert!(
        sb.disk_state == DiskState::Inconsistent || sb.disk_state == DiskState::UpToDate,
        "{sb:#?}"
    );
    // An Inconsistent SyncTarget may not be promoted.
    if b.status().disk_state == DiskState::Inconsistent {
        let err = b.promote().await.unwrap_err();
        assert!(err.to_string().contains("Inconsistent"), "{err}");
    }
    // The resync converges; the Primary kept writing during it.
    a.write(30 * MIB, data(31, 8192), false).await.unwrap();
    wait_converged(&a, &b, 30).await;
    a.flush().await.unwrap();
    assert_eq!(c.disk_hash("hv1"), c.disk_hash("hv2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn witness_isolated_primary_freezes_the_other_side_takes_over_no_split_brain() {
    let opts = ReplicaOptions {
        suspend_timeout: Duration::from_secs(60),
        ..ReplicaOptions::default()
    };
    let c = Cluster::new(&["hv1", "hv2"], &["witness"], 32 * MIB, opts).await;
    let (a, b, w) = (c.r("hv1"), c.r("hv2"), c.r("witness"));
    wait_for(&a, "hv1 fully connected", 10, |s| {
        established(s, "hv2") && established(s, "witness") && s.quorum
    })
    .await;
    wait_for(&b, "hv2 fully connected", 10, |s| {
        established(s, "hv1") && established(s, "witness") && s.quorum
    })
    .await;
    a.promote().await.unwrap();
    write_mib(&a, 0, 2, 3).await;
    // The witness relays who is Primary.
    wait_for(&w, "witness sees hv1 Primary", 5, |s| {
        peer(s, "hv1").role == Role::Primary
    })
    .await;

    c.isolate("hv1").await;
    let s = wait_for(&a, "hv1 loses quorum", 10, |s| !s.quorum).await;
    assert!(s.io_suspended, "{s:#?}");
    let a2 = a.clone();
    let frozen = tokio::spawn(async move { a2.write(4 * MIB, data(77, 4096), false).await });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!frozen.is_finished(), "a write without quorum must freeze");

    // hv2 keeps quorum through the witness and may be promoted once hv1 is gone from the
    // witness's view.
    wait_for(&b, "hv2 keeps quorum", 10, |s| {
        s.quorum && peer(s, "hv1").connection != ConnectionState::Connected
    })
    .await;
    promote_within(&b, 10).await;
    write_mib(&b, 8, 2, 40).await;

    c.heal_all();
    // The frozen Primary meets newer data: it steps down and becomes SyncTarget.
    let res = tokio::time::timeout(Duration::from_secs(20), frozen)
        .await
        .expect("frozen write finishes after heal")
        .unwrap();
    assert!(matches!(res, Err(EngineError::Demoted { .. })), "{res:?}");
    let sa = wait_for(&a, "hv1 resynced from hv2", 20, |s| {
        peer(s, "hv2")
            .decision
            .as_deref()
            .is_some_and(|d| d.contains("from hv2 to hv1"))
    })
    .await;
    assert_eq!(sa.role, Role::Secondary);
    assert!(peer(&sa, "hv2").split_brain.is_none());
    wait_converged(&a, &b, 30).await;
    let sb = b.status();
    assert!(peer(&sb, "hv1").split_brain.is_none());
    assert_eq!(sb.role, Role::Primary);
    // No acknowledged write lost: hv1 now holds exactly hv2's data.
    b.flush().await.unwrap();
    assert_eq!(c.disk_hash("hv1"), c.disk_hash("hv2"));
    let back = b.read(8 * MIB, 4096).await.unwrap();
    assert_eq!(&back[..], &data(48, MIB as usize)[..4096]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn witness_outdates_a_secondary_cut_off_from_the_primary() {
    let c = Cluster::new(
        &["hv1", "hv2"],
        &["witness"],
        32 * MIB,
        ReplicaOptions::default(),
    )
    .await;
    let (a, b) = (c.r("hv1"), c.r("hv2"));
    wait_for(&a, "connected", 10, |s| {
        established(s, "hv2") && established(s, "witness") && s.quorum
    })
    .await;
    wait_for(&b, "connected", 10, |s| {
        established(s, "hv1") && established(s, "witness") && s.quorum
    })
    .await;
    a.promote().await.unwrap();
    // Only the data link breaks: both still reach the witness.
    c.cut("hv1", "hv2");
    wait_for(&a, "hv1 lost hv2", 10, |s| {
        peer(s, "hv2").connection != ConnectionState::Connected
    })
    .await;
    // The Primary keeps quorum (tiebreaker) and writes on once hv2 is Outdated.
    tokio::time::timeout(Duration::from_secs(10), a.write(0, data(5, 8192), false))
        .await
        .expect("write proceeds after outdating")
        .unwrap();
    let s = wait_for(&b, "hv2 Outdated", 10, |s| {
        s.disk_state == DiskState::Outdated
    })
    .await;
    assert!(s.quorum, "hv2 still has quorum via the witness: {s:#?}");
    // hv2 may not be promoted: Outdated, and hv1 is Primary as relayed by the witness.
    let err = b.promote().await.unwrap_err();
    assert!(err.to_string().contains("Outdated"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn split_brain_is_detected_reported_and_resolved_by_discarding_one_side() {
    let c = Cluster::new(&["hv1", "hv2"], &[], 32 * MIB, ReplicaOptions::default()).await;
    let (a, b) = (c.r("hv1"), c.r("hv2"));
    wait_for(&a, "connected", 10, |s| established(s, "hv2")).await;
    c.cut("hv1", "hv2");
    wait_for(&a, "hv1 alone", 10, |s| {
        peer(s, "hv2").connection != ConnectionState::Connected
    })
    .await;
    wait_for(&b, "hv2 alone", 10, |s| {
        peer(s, "hv1").connection != ConnectionState::Connected
    })
    .await;
    // Quorum is off for two nodes: both may be promoted, both write.
    a.promote().await.unwrap();
    b.promote().await.unwrap();
    write_mib(&a, 0, 2, 11).await;
    write_mib(&b, 1, 2, 22).await;
    let (ha, hb) = (c.disk_hash("hv1"), c.disk_hash("hv2"));
    assert_ne!(ha, hb);

    c.heal_all();
    let sa = wait_for(&a, "split brain on hv1", 10, |s| {
        peer(s, "hv2").split_brain.is_some()
    })
    .await;
    let sb = wait_for(&b, "split brain on hv2", 10, |s| {
        peer(s, "hv1").split_brain.is_some()
    })
    .await;
    let text = peer(&sa, "hv2").split_brain.clone().unwrap();
    assert!(
        text.contains("tandem volume resolve vm-100-disk-0 --discard-local"),
        "{text}"
    );
    assert_eq!(peer(&sa, "hv2").connection, ConnectionState::StandAlone);
    assert_eq!(peer(&sb, "hv1").connection, ConnectionState::StandAlone);
    // Nothing overwritten while split (the pair retries its handshake every 250 ms).
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(c.disk_hash("hv1"), ha);
    assert_eq!(c.disk_hash("hv2"), hb);

    // A Primary cannot discard its own data; demote first.
    assert!(b.resolve_split_brain(true).await.is_err());
    b.demote().await.unwrap();
    b.resolve_split_brain(true).await.unwrap();
    let sb = wait_for(&b, "hv2 resyncs from hv1", 15, |s| {
        peer(s, "hv1")
            .decision
            .as_deref()
            .is_some_and(|d| d.contains("from hv1 to hv2"))
    })
    .await;
    assert!(peer(&sb, "hv1").split_brain.is_none());
    wait_converged(&a, &b, 30).await;
    assert!(peer(&a.status(), "hv2").split_brain.is_none());
    // hv1's changes won and were not touched; hv2 now equals hv1.
    assert_eq!(c.disk_hash("hv1"), ha);
    assert_eq!(c.disk_hash("hv2"), ha);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crashed_primary_resyncs_its_hot_extents_from_the_survivor() {
    let mut c = Cluster::new(&["hv1", "hv2"], &[], 64 * MIB, ReplicaOptions::default()).await;
    let a = c.r("hv1");
    wait_for(&a, "connected", 10, |s| established(s, "hv2")).await;
    a.promote().await.unwrap();
    // Extents 0 (0..4 MiB) and 2 (8..12 MiB) are hot in the activity log.
    write_mib(&a, 0, 1, 1).await;
    write_mib(&a, 9, 1, 2).await;
    drop(a);
    c.kill("hv1");
    let b = c.r("hv2");
    wait_for(&b, "hv1 gone", 10, |s| {
        peer(s, "hv1").connection != ConnectionState::Connected
    })
    .await;
    c.restart("hv1").await;
    let a = c.r("hv1");
    let sa = wait_for(&a, "hv1 decided after its crash", 10, |s| {
        peer(s, "hv2").decision.is_some()
    })
    .await;
    assert_eq!(sa.role, Role::Secondary);
    let d = peer(&sa, "hv2").decision.clone().unwrap();
    assert!(d.contains("bitmap resync from hv2 to hv1"), "{d}");
    assert!(d.contains("local-crashed-primary"), "{d}");
    wait_converged(&a, &b, 30).await;
    assert_eq!(c.disk_hash("hv1"), c.disk_hash("hv2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_clean_close_and_reopen_needs_no_resync_and_tracks_only_missed_writes_verify_finds_corruption(
) {
    let mut c = Cluster::new(&["hv1", "hv2"], &[], 32 * MIB, ReplicaOptions::default()).await;
    let a = c.r("hv1");
    wait_for(&a, "connected", 10, |s| established(s, "hv2")).await;
    a.promote().await.unwrap();
    write_mib(&a, 0, 1, 1).await;

    c.close("hv2").await;
    wait_for(&a, "hv2 left", 10, |s| {
        peer(s, "hv2").connection != ConnectionState::Connected
    })
    .await;
    c.reopen("hv2").await;
    let s = wait_for(&a, "hv2 back, in sync", 10, |s| established(s, "hv2")).await;
    assert_eq!(peer(&s, "hv2").out_of_sync_bytes, 0);
    assert_eq!(c.disk_hash("hv1"), c.disk_hash("hv2"));

    c.close("hv2").await;
    wait_for(&a, "hv2 left again", 10, |s| {
        peer(s, "hv2").connection != ConnectionState::Connected
    })
    .await;
    write_mib(&a, 4, 1, 9).await;
    assert_eq!(peer(&a.status(), "hv2").out_of_sync_bytes, MIB);
    c.reopen("hv2").await;
    let b = c.r("hv2");
    wait_converged(&a, &b, 30).await;
    let d = peer(&a.status(), "hv2").decision.clone().unwrap();
    assert!(d.contains("bitmap resync from hv1 to hv2"), "{d}");
    assert_eq!(c.disk_hash("hv1"), c.disk_hash("hv2"));

    // Online verify: equal, then a block corrupted behind the engine's back is found.
    let report = a.verify().await.unwrap();
    assert_eq!(report.differing_blocks, 0);
    assert_eq!(report.checked_bytes, 32 * MIB);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&c.hosts[c.idx("hv2")].disk)
            .unwrap();
        f.write_all_at(&[0xAB; 100], 5 * MIB + 10).unwrap();
        f.sync_all().unwrap();
    }
    let report = a.verify().await.unwrap();
    assert_eq!(report.differing_blocks, 1);
    let s = a.status();
    assert_eq!(s.last_verify.as_ref().unwrap().differing_blocks, 1);
    assert_eq!(peer(&s, "hv2").out_of_sync_bytes, 4096);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_primaries_for_a_live_migration_replicate_both_ways() {
    let c = Cluster::new(&["hv1", "hv2"], &[], 32 * MIB, ReplicaOptions::default()).await;
    let (a, b) = (c.r("hv1"), c.r("hv2"));
    wait_for(&a, "connected", 10, |s| established(s, "hv2")).await;
    a.promote().await.unwrap();
    write_mib(&a, 0, 1, 1).await;
    wait_for(&b, "hv2 sees hv1 Primary", 5, |s| {
        peer(s, "hv1").role == Role::Primary
    })
    .await;

    // The gate is per node: on hv2 alone it is not enough.
    b.set_allow_two_primaries(true).unwrap();
    let err = b.promote().await.unwrap_err();
    assert!(
        err.to_string()
            .contains("allow-two-primaries is off on hv1"),
        "{err}"
    );
    assert_eq!(b.status().role, Role::Secondary);
    wait_for(&b, "links back after the refusal", 10, |s| {
        established(s, "hv1")
    })
    .await;

    a.set_allow_two_primaries(true).unwrap();
    let mut ok = false;
    for _ in 0..20 {
        match b.promote().await {
            Ok(()) => {
                ok = true;
                break;
            }
            Err(e) => {
                eprintln!("second promote: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    assert!(ok, "second Primary");
    assert_eq!(b.status().role, Role::Primary);
    wait_for(&a, "hv1 sees hv2 Primary", 5, |s| {
        peer(s, "hv2").role == Role::Primary
    })
    .await;
    // Both write (disjoint ranges, as a migrating VM does) and both replicas get both.
    write_mib(&a, 4, 1, 40).await;
    write_mib(&b, 8, 1, 80).await;
    assert_eq!(c.disk_hash("hv1"), c.disk_hash("hv2"));
    // A third promotion is impossible with two nodes; the source demotes after migration.
    a.demote().await.unwrap();
    b.set_allow_two_primaries(false).unwrap();
    write_mib(&b, 12, 1, 120).await;
    wait_converged(&a, &b, 20).await;
    b.flush().await.unwrap();
    assert_eq!(c.disk_hash("hv1"), c.disk_hash("hv2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_short_isolation_without_takeover_resumes_the_frozen_primary() {
    let c = Cluster::new(
        &["hv1", "hv2"],
        &["witness"],
        32 * MIB,
        ReplicaOptions::default(),
    )
    .await;
    let (a, b) = (c.r("hv1"), c.r("hv2"));
    wait_for(&a, "connected", 10, |s| {
        established(s, "hv2") && established(s, "witness") && s.quorum
    })
    .await;
    wait_for(&b, "connected", 10, |s| established(s, "hv1") && s.quorum).await;
    a.promote().await.unwrap();
    write_mib(&a, 0, 1, 1).await;
    c.isolate("hv1").await;
    wait_for(&a, "hv1 frozen", 10, |s| !s.quorum && s.io_suspended).await;
    let a2 = a.clone();
    let frozen = tokio::spawn(async move { a2.write(2 * MIB, data(2, 65536), false).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!frozen.is_finished());
    // Nobody takes over; the network comes back.
    c.heal_all();
    tokio::time::timeout(Duration::from_secs(20), frozen)
        .await
        .expect("the frozen write resumes")
        .unwrap()
        .unwrap();
    let s = wait_for(&a, "quorum back", 20, |s| s.quorum && !s.io_suspended).await;
    assert_eq!(s.role, Role::Primary);
    wait_converged(&a, &b, 30).await;
    a.flush().await.unwrap();
    assert_eq!(c.disk_hash("hv1"), c.disk_hash("hv2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn io_error_policy_fails_requests_without_quorum_and_the_witness_serves_nothing() {
    let opts = ReplicaOptions {
        on_no_quorum: replication::quorum::OnNoQuorum::IoError,
        ..ReplicaOptions::default()
    };
    let c = Cluster::new(&["hv1", "hv2"], &["witness"], 16 * MIB, opts).await;
    let (a, w) = (c.r("hv1"), c.r("witness"));
    wait_for(&a, "connected", 10, |s| {
        established(s, "hv2") && established(s, "witness") && s.quorum
    })
    .await;
    let err = w.promote().await.unwrap_err();
    assert!(matches!(err, EngineError::Diskless { .. }), "{err}");
    assert_eq!(w.status().disk_state, DiskState::Diskless);
    a.promote().await.unwrap();
    a.write(0, data(1, 4096), false).await.unwrap();
    c.isolate("hv1").await;
    let s = wait_for(&a, "hv1 without quorum", 10, |s| !s.quorum).await;
    assert!(!s.io_suspended, "io-error does not suspend");
    let err = a.write(0, data(2, 4096), false).await.unwrap_err();
    assert!(matches!(err, EngineError::NoQuorum { .. }), "{err}");
    assert!(err.to_string().contains("no quorum"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn primary_killed_with_a_witness_the_survivor_takes_over_and_the_old_primary_resyncs() {
    let mut c = Cluster::new(
        &["hv1", "hv2"],
        &["witness"],
        32 * MIB,
        ReplicaOptions::default(),
    )
    .await;
    let (a, b) = (c.r("hv1"), c.r("hv2"));
    wait_for(&a, "connected", 10, |s| {
        established(s, "hv2") && established(s, "witness") && s.quorum
    })
    .await;
    wait_for(&b, "connected", 10, |s| established(s, "hv1") && s.quorum).await;
    a.promote().await.unwrap();
    write_mib(&a, 0, 8, 5).await;
    let before = c.disk_hash("hv1");
    drop(a);
    c.kill("hv1");
    // The witness must notice too before hv2 may be promoted (it relays who is Primary).
    promote_within(&b, 10).await;
    assert!(b.status().quorum);
    // Every acknowledged write is there.
    assert_eq!(c.disk_hash("hv2"), before);
    write_mib(&b, 16, 2, 60).await;
    c.restart("hv1").await;
    let a = c.r("hv1");
    let s = wait_for(&a, "hv1 resyncs from hv2", 20, |s| {
        peer(s, "hv2")
            .decision
            .as_deref()
            .is_some_and(|d| d.contains("from hv2 to hv1"))
    })
    .await;
    assert_eq!(s.role, Role::Secondary);
    wait_converged(&a, &b, 30).await;
    b.flush().await.unwrap();
    assert_eq!(c.disk_hash("hv1"), c.disk_hash("hv2"));
}

/// Chaos seed 258247687: a Secondary that crashed and resynced by bitmap kept its own old
/// generation instead of adopting the Primary's, so the next link cut ended in a split
/// brain (rule 6) although only one side ever wrote, and the frozen Primary stayed frozen.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_resync_target_adopts_the_source_generation_so_the_next_cut_is_no_split_brain() {
    let mut c = Cluster::new(
        &["hv1", "hv2"],
        &["witness"],
        32 * MIB,
        ReplicaOptions::default(),
    )
    .await;
    let a = c.r("hv1");
    wait_for(&a, "connected", 10, |s| {
        established(s, "hv2") && established(s, "witness") && s.quorum
    })
    .await;
    a.promote().await.unwrap();
    write_mib(&a, 0, 1, 1).await;
    // The Secondary crashes; the Primary keeps quorum through the witness and writes on
    // in a new generation.
    c.kill("hv2");
    tokio::time::timeout(Duration::from_secs(10), write_mib(&a, 2, 2, 2))
        .await
        .expect("writes continue without hv2");
    c.restart("hv2").await;
    let b = c.r("hv2");
    wait_converged(&a, &b, 30).await;
    assert_eq!(
        a.status().current_uuid,
        b.status().current_uuid,
        "after the resync the target holds the source's generation"
    );

    // A short isolation of the Primary without takeover: no split brain, I/O resumes.
    c.isolate("hv1").await;
    wait_for(&a, "hv1 frozen", 10, |s| !s.quorum && s.io_suspended).await;
    let a2 = a.clone();
    let frozen = tokio::spawn(async move { a2.write(6 * MIB, data(6, 65536), false).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.heal_all();
    tokio::time::timeout(Duration::from_secs(20), frozen)
        .await
        .expect("the frozen write resumes")
        .unwrap()
        .unwrap();
    let s = wait_for(&a, "quorum back", 20, |s| s.quorum && !s.io_suspended).await;
    assert_eq!(s.role, Role::Primary);
    assert!(peer(&s, "hv2").split_brain.is_none(), "{s:#?}");
    wait_converged(&a, &b, 30).await;
    assert!(peer(&b.status(), "hv1").split_brain.is_none());
    a.flush().await.unwrap();
    assert_eq!(c.disk_hash("hv1"), c.disk_hash("hv2"));
}

/// DRBD's `secondary --force`: an isolated Primary with a frozen request is demoted; the
/// request fails (it was never acknowledged), and the node resyncs from the new Primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn demote_force_fails_frozen_requests_and_demotes_an_isolated_primary() {
    let opts = ReplicaOptions {
        suspend_timeout: Duration::from_secs(60),
        ..ReplicaOptions::default()
    };
    let c = Cluster::new(&["hv1", "hv2"], &["witness"], 32 * MIB, opts).await;
    let (a, b) = (c.r("hv1"), c.r("hv2"));
    wait_for(&a, "connected", 10, |s| {
        established(s, "hv2") && established(s, "witness") && s.quorum
    })
    .await;
    wait_for(&b, "connected", 10, |s| established(s, "hv1") && s.quorum).await;
    a.promote().await.unwrap();
    write_mib(&a, 0, 1, 1).await;
    c.isolate("hv1").await;
    wait_for(&a, "hv1 frozen", 10, |s| !s.quorum && s.io_suspended).await;
    let a2 = a.clone();
    let frozen = tokio::spawn(async move { a2.write(2 * MIB, data(2, 4096), false).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!frozen.is_finished());

    tokio::time::timeout(Duration::from_secs(15), a.demote_force())
        .await
        .expect("demote --force does not hang")
        .unwrap();
    let res = tokio::time::timeout(Duration::from_secs(5), frozen)
        .await
        .expect("the frozen request fails at once")
        .unwrap();
    assert!(matches!(res, Err(EngineError::Demoted { .. })), "{res:?}");
    let s = a.status();
    assert_eq!(s.role, Role::Secondary);
    assert!(!s.io_suspended);

    // The other side takes over and writes; the fenced node rejoins as SyncTarget.
    promote_within(&b, 10).await;
    write_mib(&b, 8, 1, 9).await;
    c.heal_all();
    wait_converged(&a, &b, 30).await;
    assert!(peer(&a.status(), "hv2").split_brain.is_none());
    b.flush().await.unwrap();
    assert_eq!(c.disk_hash("hv1"), c.disk_hash("hv2"));
}

/// Chaos seed 7: a Primary closed cleanly (SIGTERM) while the other side is promoted and
/// writes comes back as bitmap SyncTarget of the new Primary — no split brain. The new
/// Primary had been a resync target before: it must have adopted the old Primary's
/// generation then, or its new generation is unrelated to the returning node's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cleanly_stopped_primary_returns_as_sync_target_of_the_new_primary() {
    let mut c = Cluster::new(
        &["hv1", "hv2"],
        &["witness"],
        32 * MIB,
        ReplicaOptions::default(),
    )
    .await;
    let a = c.r("hv1");
    wait_for(&a, "connected", 10, |s| {
        established(s, "hv2") && established(s, "witness") && s.quorum
    })
    .await;
    a.promote().await.unwrap();
    write_mib(&a, 0, 1, 1).await;
    // hv2 becomes a resync target once (crash, bitmap resync from hv1).
    c.kill("hv2");
    tokio::time::timeout(Duration::from_secs(10), write_mib(&a, 1, 1, 2))
        .await
        .expect("writes continue without hv2");
    c.restart("hv2").await;
    let b = c.r("hv2");
    wait_converged(&a, &b, 30).await;

    // Clean stop of the Primary; the other side takes over and writes.
    drop(a);
    c.close("hv1").await;
    promote_within(&b, 10).await;
    write_mib(&b, 4, 2, 3).await;
    c.reopen("hv1").await;
    let a = c.r("hv1");
    let s = wait_for(&a, "hv1 resyncs from hv2", 20, |s| {
        peer(s, "hv2")
            .decision
            .as_deref()
            .is_some_and(|d| d.contains("bitmap resync from hv2 to hv1"))
    })
    .await;
    assert!(peer(&s, "hv2").split_brain.is_none(), "{s:#?}");
    wait_converged(&a, &b, 30).await;
    assert_eq!(a.status().current_uuid, b.status().current_uuid);
    b.flush().await.unwrap();
    assert_eq!(c.disk_hash("hv1"), c.disk_hash("hv2"));
    // The witness's slot is never reported out of sync.
    assert_eq!(peer(&b.status(), "witness").out_of_sync_bytes, 0);
}

/// Both nodes of a connected pair promoted at the same instant: the two-phase commit lets
/// exactly one win each round; the other is refused with an operator-ready message.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_promotes_on_a_connected_pair_make_exactly_one_primary() {
    let c = Cluster::new(&["hv1", "hv2"], &[], 16 * MIB, ReplicaOptions::default()).await;
    let (a, b) = (c.r("hv1"), c.r("hv2"));
    let mut wins = [0u32; 2];
    for round in 0..30 {
        for (r, other) in [(&a, "hv2"), (&b, "hv1")] {
            wait_for(r, "pair connected, both Secondary", 10, |s| {
                established(s, other)
                    && s.role == Role::Secondary
                    && peer(s, other).role == Role::Secondary
            })
            .await;
        }
        let (ra, rb) = tokio::join!(a.promote(), b.promote());
        let (sa, sb) = (a.status(), b.status());
        assert!(
            !(sa.role == Role::Primary && sb.role == Role::Primary),
            "round {round}: two Primaries"
        );
        let (winner, loser_err) = match (ra, rb) {
            (Ok(()), Err(e)) => {
                wins[0] += 1;
                (&a, e)
            }
            (Err(e), Ok(())) => {
                wins[1] += 1;
                (&b, e)
            }
            (ra, rb) => panic!("round {round}: expected exactly one winner: {ra:?} / {rb:?}"),
        };
        let msg = loser_err.to_string();
        assert!(
            msg.starts_with("vm-100-disk-0 is Primary on ")
                || msg.starts_with("vm-100-disk-0 is being promoted on "),
            "round {round}: {msg}"
        );
        assert_eq!(winner.status().role, Role::Primary);
        // The winner really is Primary for the cluster: it writes, the peer gets it.
        winner.write(0, data(round, 4096), true).await.unwrap();
        winner.demote().await.unwrap();
    }
    eprintln!("wins hv1/hv2: {wins:?}");
}

/// Two data nodes that cannot see each other but both see the witness: the witness
/// answers the prepares like any member, so at most one of them becomes Primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_promotes_through_the_witness_make_at_most_one_primary() {
    let c = Cluster::new(
        &["hv1", "hv2"],
        &["witness"],
        16 * MIB,
        ReplicaOptions::default(),
    )
    .await;
    let (a, b, w) = (c.r("hv1"), c.r("hv2"), c.r("witness"));
    for (r, other) in [(&a, "hv2"), (&b, "hv1")] {
        wait_for(r, "fully connected", 10, |s| {
            established(s, other) && established(s, "witness") && s.quorum
        })
        .await;
    }
    c.cut("hv1", "hv2");
    for (r, other) in [(&a, "hv2"), (&b, "hv1")] {
        wait_for(r, "data link down, quorum through the witness", 10, |s| {
            peer(s, other).connection != ConnectionState::Connected
                && established(s, "witness")
                && s.quorum
        })
        .await;
    }
    let mut wins = 0;
    for round in 0..15 {
        wait_for(&w, "witness sees both Secondary", 10, |s| {
            s.peers.iter().all(|p| p.role == Role::Secondary)
        })
        .await;
        // Let the witness's relay of the last demotion reach both.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (ra, rb) = tokio::join!(a.promote(), b.promote());
        let (sa, sb) = (a.status(), b.status());
        assert!(
            !(sa.role == Role::Primary && sb.role == Role::Primary),
            "round {round}: two Primaries through the witness"
        );
        assert!(
            !(ra.is_ok() && rb.is_ok()),
            "round {round}: both promotions succeeded"
        );
        for (r, res) in [(&a, ra), (&b, rb)] {
            match res {
                Ok(()) => {
                    wins += 1;
                    r.demote().await.unwrap();
                }
                Err(e) => {
                    let msg = e.to_string();
                    assert!(
                        msg.contains("is Primary on") || msg.contains("is being promoted on"),
                        "round {round}: {msg}"
                    );
                }
            }
        }
    }
    assert!(wins > 0, "no round produced a Primary");
}

/// Writes in flight when an isolated Primary loses quorum are not acknowledged: the other
/// side takes over, and every write the isolated node acknowledged must be there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_in_flight_when_the_primary_is_isolated_are_not_acknowledged_unless_replicated() {
    let opts = ReplicaOptions {
        suspend_timeout: Duration::from_secs(60),
        ..ReplicaOptions::default()
    };
    let c = Cluster::new(&["hv1", "hv2"], &["witness"], 32 * MIB, opts).await;
    let (a, b) = (c.r("hv1"), c.r("hv2"));
    wait_for(&a, "connected", 10, |s| {
        established(s, "hv2") && established(s, "witness") && s.quorum
    })
    .await;
    wait_for(&b, "connected", 10, |s| established(s, "hv1") && s.quorum).await;
    a.promote().await.unwrap();
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u64>::new()));
    let mut writers = Vec::new();
    for w in 0..16u64 {
        let (a, acked) = (a.clone(), acked.clone());
        writers.push(tokio::spawn(async move {
            for i in 0.. {
                let block = (w * 400 + i) % 8000;
                if a.write(block * 4096, data(block + 1, 4096), false)
                    .await
                    .is_err()
                {
                    return;
                }
                acked.lock().unwrap().push(block);
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.isolate("hv1").await;
    wait_for(&a, "hv1 frozen", 10, |s| !s.quorum && s.io_suspended).await;
    let acked: Vec<u64> = acked.lock().unwrap().clone();
    promote_within(&b, 10).await;
    let mut missing = 0;
    for block in &acked {
        let got = b.read(block * 4096, 4096).await.unwrap();
        if got[..] != data(block + 1, 4096)[..] {
            missing += 1;
        }
    }
    assert_eq!(
        missing,
        0,
        "{missing} of {} acknowledged writes are not on the new Primary",
        acked.len()
    );
    a.demote_force().await.unwrap();
    for w in writers {
        let _ = tokio::time::timeout(Duration::from_secs(10), w).await;
    }
}

/// DRBD's `on-suspended-primary-outdated force-secondary`: an isolated Primary with writes
/// frozen in flight (some of them already on its own disk) meets the new Primary's newer
/// generation on heal. It turns itself Secondary, its frozen writes fail (none was
/// acknowledged), and it becomes bitmap SyncTarget — no split brain; the resync overwrites
/// what reached only its disk, and every write it acknowledged is on the new Primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_isolated_primary_with_frozen_writes_turns_sync_target_of_the_new_primary_on_heal() {
    let opts = ReplicaOptions {
        suspend_timeout: Duration::from_secs(60),
        ..ReplicaOptions::default()
    };
    let c = Cluster::new(&["hv1", "hv2"], &["witness"], 32 * MIB, opts).await;
    let (a, b) = (c.r("hv1"), c.r("hv2"));
    wait_for(&a, "connected", 10, |s| {
        established(s, "hv2") && established(s, "witness") && s.quorum
    })
    .await;
    wait_for(&b, "connected", 10, |s| established(s, "hv1") && s.quorum).await;
    a.promote().await.unwrap();
    // Writers keep requests in flight at the cut; they write blocks below 28 MiB.
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u64>::new()));
    let mut writers = Vec::new();
    for w in 0..16u64 {
        let (a, acked) = (a.clone(), acked.clone());
        writers.push(tokio::spawn(async move {
            for i in 0.. {
                let block = (w * 400 + i) % 7000;
                if let Err(e) = a.write(block * 4096, data(block + 1, 4096), false).await {
                    return e;
                }
                acked.lock().unwrap().push(block);
            }
            unreachable!()
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.isolate("hv1").await;
    wait_for(&a, "hv1 frozen", 10, |s| !s.quorum && s.io_suspended).await;
    let acked_at_freeze = acked.lock().unwrap().len();
    assert!(
        writers.iter().all(|w| !w.is_finished()),
        "writes are frozen, not failed"
    );

    promote_within(&b, 10).await;
    // The new Primary writes past the old one's blocks: a newer generation with changes.
    write_mib(&b, 28, 2, 77).await;

    c.heal_all();
    // Force-secondary: the frozen writes fail, none of them was acknowledged.
    for w in writers {
        let err = tokio::time::timeout(Duration::from_secs(30), w)
            .await
            .expect("the frozen writes end once hv1 learns of the new Primary")
            .unwrap();
        assert!(
            matches!(
                err,
                EngineError::Demoted { .. } | EngineError::NotPrimary { .. }
            ),
            "{err:?}"
        );
    }
    assert_eq!(
        acked.lock().unwrap().len(),
        acked_at_freeze,
        "a frozen write was acknowledged"
    );
    let s = wait_for(&a, "hv1 resyncs from hv2", 30, |s| {
        peer(s, "hv2")
            .decision
            .as_deref()
            .is_some_and(|d| d.contains("from hv2 to hv1"))
    })
    .await;
    assert_eq!(s.role, Role::Secondary);
    assert!(peer(&s, "hv2").split_brain.is_none(), "{s:#?}");
    wait_converged(&a, &b, 30).await;
    assert!(peer(&b.status(), "hv1").split_brain.is_none());
    let acked: Vec<u64> = acked.lock().unwrap().clone();
    for block in &acked {
        let got = b.read(block * 4096, 4096).await.unwrap();
        assert_eq!(
            got[..],
            data(block + 1, 4096)[..],
            "acknowledged block {block} lost"
        );
    }
    b.flush().await.unwrap();
    assert_eq!(c.disk_hash("hv1"), c.disk_hash("hv2"));
}

/// Cut a three-replica volume's Primary off (with writes in flight when `in_flight`),
/// promote hv2 with hv3, write there, heal, and check that hv1 was fenced by the new
/// generation (force-secondary), its frozen write failed, and all three replicas converge.
async fn fence_and_rejoin_with_three_replicas(in_flight: bool) {
    let opts = ReplicaOptions {
        suspend_timeout: Duration::from_secs(60),
        ..ReplicaOptions::default()
    };
    let c = three_replicas_with_hv1_primary(opts).await;
    let (a, b, d) = (c.r("hv1"), c.r("hv2"), c.r("hv3"));
    write_mib(&a, 0, 1, 3).await;
    let writer = |a: std::sync::Arc<replication::replica::Replica>| async move {
        for i in 0.. {
            let block = 256 + i % 1000;
            if let Err(e) = a.write(block * 4096, data(block, 4096), false).await {
                return e;
            }
        }
        unreachable!()
    };
    let writer = if in_flight {
        let w = tokio::spawn(writer(a.clone()));
        tokio::time::sleep(Duration::from_millis(200)).await;
        c.isolate("hv1").await;
        wait_for(&a, "hv1 frozen", 10, |s| !s.quorum && s.io_suspended).await;
        w
    } else {
        c.isolate("hv1").await;
        wait_for(&a, "hv1 frozen", 10, |s| !s.quorum && s.io_suspended).await;
        tokio::spawn(writer(a.clone()))
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!writer.is_finished(), "the write is frozen");
    promote_within(&b, 10).await;
    write_mib(&b, 8, 2, 11).await;

    c.heal_all();
    let err = tokio::time::timeout(Duration::from_secs(30), writer)
        .await
        .expect("the frozen write ends once hv1 learns of the new Primary")
        .unwrap();
    assert!(matches!(err, EngineError::Demoted { .. }), "{err:?}");
    let s = wait_for(&a, "hv1 UpToDate and connected to both", 60, |s| {
        s.disk_state == DiskState::UpToDate && ["hv2", "hv3"].iter().all(|o| established(s, o))
    })
    .await;
    assert_eq!(s.role, Role::Secondary);
    for h in ["hv1", "hv2", "hv3"] {
        let s = c.r(h).status();
        assert!(s.peers.iter().all(|p| p.split_brain.is_none()), "{s:#?}");
    }
    wait_converged(&a, &b, 30).await;
    wait_converged(&d, &b, 30).await;
    b.flush().await.unwrap();
    assert_eq!(c.disk_hash("hv1"), c.disk_hash("hv2"));
    assert_eq!(c.disk_hash("hv3"), c.disk_hash("hv2"));
}

/// Three replicas: the isolated Primary with a frozen write is fenced by the new Primary's
/// generation on heal and rejoins UpToDate with *both* others — its resync from the new
/// Primary leaves it "uncertain" towards the third replica, which must not turn into a
/// resync from a Secondary that is deferred for as long as the Primary runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fenced_primary_of_three_replicas_rejoins_up_to_date_with_both() {
    fence_and_rejoin_with_three_replicas(false).await;
}

/// The same with writes in flight at the cut. The isolated Primary may have started a
/// generation nobody saw (it kept quorum for a moment with hv3): the heal must still make
/// it SyncTarget, not a split brain (rule 5 with a frozen lost-quorum Primary).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fenced_primary_of_three_replicas_with_writes_in_flight_rejoins() {
    fence_and_rejoin_with_three_replicas(true).await;
}

/// Three data replicas, the Primary killed while a writer keeps requests in flight: the two
/// survivors may each hold a different part of its unacknowledged last writes. Promotion
/// does not wait for anything; afterwards the new Primary resyncs the blocks either
/// survivor marked (its own tail and the other's) to the other, which ends identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn survivors_of_a_killed_primary_are_reconciled_after_the_promotion() {
    survivors_of_a_killed_primary(false).await;
}

/// The same with the promotion of hv2 retried from the moment hv1 dies (an HA agent): the
/// promotion may complete right as hv2 notices the loss, and hv2 must still mark its own
/// tail towards hv3 (marked before the loss wakes anything) and resync it as the new
/// Primary. The race window is narrow: this covers the path, it does not reproduce the
/// race reliably.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_promotion_racing_the_loss_of_the_primary_still_reconciles_its_own_tail() {
    survivors_of_a_killed_primary(true).await;
}

async fn survivors_of_a_killed_primary(promote_at_once: bool) {
    let mut c = three_replicas_without_reconnect_grace(ReplicaOptions::default()).await;
    let (a, b, d) = (c.r("hv1"), c.r("hv2"), c.r("hv3"));
    write_mib(&a, 0, 2, 5).await;
    let writers: Vec<_> = (0..8u64)
        .map(|w| {
            let a = a.clone();
            tokio::spawn(async move {
                for i in 0u64.. {
                    let block = 512 + (w * 997 + i * 13) % 4096;
                    if a.write(block * 4096, data(block + i, 4096), false)
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(a);
    c.kill("hv1");
    if promote_at_once {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            match b.promote().await {
                Ok(_) => break,
                Err(e) if std::time::Instant::now() < deadline => {
                    eprintln!("promotion refused (retrying): {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => panic!("hv2 was never promoted: {e}"),
            }
        }
        for w in writers {
            let _ = w.await;
        }
    } else {
        for w in writers {
            let _ = w.await;
        }
        for (r, name) in [(&b, "hv2"), (&d, "hv3")] {
            wait_for(r, &format!("{name} sees hv1 gone"), 10, |s| {
                peer(s, "hv1").connection != ConnectionState::Connected && s.quorum
            })
            .await;
        }
        // The promotion waits for nothing (no reconciliation before it).
        let started = std::time::Instant::now();
        b.promote().await.unwrap();
        let promotion = started.elapsed();
        assert!(
            promotion < Duration::from_secs(1),
            "promotion waited for something: {promotion:?}"
        );
    }
    // The new Primary serves writes during the reconciliation.
    write_mib(&b, 20, 1, 9).await;
    wait_converged(&b, &d, 30).await;
    b.flush().await.unwrap();
    assert_eq!(c.disk_hash("hv2"), c.disk_hash("hv3"));
}

/// A reconciliation cut off by a crash of the Secondary being reconciled: the replica comes
/// back Inconsistent (never promotable with half-reconciled blocks), its bits are still on
/// disk, and the handshake with the Primary resyncs the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reconciliation_cut_off_by_a_crash_resumes_at_the_next_handshake() {
    let slow = ReplicaOptions {
        resync: replication::resync::ResyncConfig {
            max_rate_bytes_per_sec: MIB,
            min_rate_bytes_per_sec: MIB,
            chunk_bytes: 256 * 1024,
            ..Default::default()
        },
        ..ReplicaOptions::default()
    };
    let mut c = three_replicas_without_reconnect_grace(slow).await;
    let (a, b, d) = (c.r("hv1"), c.r("hv2"), c.r("hv3"));
    // Scattered writes, so the tail is many ranges and the reconciliation takes seconds.
    for i in 0..1024u64 {
        let block = (i * 37) % 8192;
        a.write(block * 4096, data(i, 4096), false).await.unwrap();
    }
    a.flush().await.unwrap();
    drop(a);
    c.kill("hv1");
    wait_for(&b, "hv2 sees hv1 gone", 10, |s| {
        peer(s, "hv1").connection != ConnectionState::Connected && s.quorum
    })
    .await;
    wait_for(
        &d,
        "hv3 marks the lost Primary's tail towards hv2",
        10,
        |s| {
            peer(s, "hv1").connection != ConnectionState::Connected
                && peer(s, "hv2").out_of_sync_bytes > 0
                && s.disk_state == DiskState::UpToDate
        },
    )
    .await;
    b.promote().await.unwrap();
    wait_for(&d, "hv3 reconciling", 10, |s| {
        s.disk_state == DiskState::Inconsistent
            && peer(s, "hv2").replication == ReplicationState::SyncTarget
    })
    .await;
    wait_for(&b, "part of the reconciliation sent", 10, |s| {
        peer(s, "hv3")
            .resync
            .as_ref()
            .is_some_and(|r| r.done_bytes >= 512 * 1024 && r.done_bytes < r.total_bytes)
    })
    .await;
    drop(d);
    c.kill("hv3");
    c.restart("hv3").await;
    let d = c.r("hv3");
    assert_eq!(d.status().disk_state, DiskState::Inconsistent);
    // Full speed for the rest.
    for r in [&b, &d] {
        r.set_options(ReplicaOptions::default()).unwrap();
    }
    wait_for(&b, "hv2 has quorum again", 20, |s| s.quorum).await;
    write_mib(&b, 16, 1, 31).await;
    wait_converged(&b, &d, 30).await;
    b.flush().await.unwrap();
    assert_eq!(c.disk_hash("hv2"), c.disk_hash("hv3"));
}

/// A clean switchover (demote, then promote another node) leaves nothing in flight: the
/// Secondaries do not mark anything towards each other and nothing is resynced.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_clean_switchover_of_three_replicas_marks_nothing() {
    let c = Cluster::new(
        &["hv1", "hv2", "hv3"],
        &[],
        32 * MIB,
        ReplicaOptions::default(),
    )
    .await;
    let (a, b, d) = (c.r("hv1"), c.r("hv2"), c.r("hv3"));
    let all = ["hv1", "hv2", "hv3"];
    let fully_connected = |name: &'static str| {
        move |s: &replication::replica::ReplicaStatus| {
            all.iter()
                .filter(|o| **o != name)
                .all(|o| established(s, o))
        }
    };
    wait_for(&a, "hv1 connected", 10, fully_connected("hv1")).await;
    wait_for(&b, "hv2 connected", 10, fully_connected("hv2")).await;
    wait_for(&d, "hv3 connected", 10, fully_connected("hv3")).await;
    a.promote().await.unwrap();
    write_mib(&a, 0, 4, 21).await;
    a.demote().await.unwrap();
    for r in [&b, &d] {
        wait_for(r, "hv1 seen Secondary", 10, |s| {
            established(s, "hv1") && peer(s, "hv1").role == Role::Secondary
        })
        .await;
    }
    for (r, name) in [(&a, "hv1"), (&b, "hv2"), (&d, "hv3")] {
        wait_for(r, "reconnected as Secondary", 10, fully_connected(name)).await;
    }
    b.promote().await.unwrap();
    write_mib(&b, 8, 1, 22).await;
    for r in [&a, &b, &d] {
        let s = r.status();
        assert_eq!(s.disk_state, DiskState::UpToDate, "{s:#?}");
        for p in &s.peers {
            assert_eq!(p.out_of_sync_bytes, 0, "{s:#?}");
            assert!(p.resync.is_none(), "{s:#?}");
        }
    }
    wait_converged(&b, &d, 10).await;
    wait_converged(&b, &a, 10).await;
    assert_eq!(c.disk_hash("hv1"), c.disk_hash("hv2"));
    assert_eq!(c.disk_hash("hv3"), c.disk_hash("hv2"));
}

/// Three data replicas; the Primary hv1 and the Secondary hv3 die together while writes
/// that only hv3 received are in flight (the link to hv2 is frozen, so none of them was
/// acknowledged). hv3 logged those writes in its activity log before applying them, so it
/// comes back with their extents out of sync and uncertain towards hv2: the handshake makes
/// it the target and the two survivors end identical. (Without the log on Secondaries,
/// hv3 came back "in sync" with blocks hv2 never had.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_secondary_that_dies_with_the_primary_is_resynced_on_its_unacknowledged_writes() {
    let mut c = three_replicas_with_hv1_primary(ReplicaOptions::default()).await;
    let (a, b) = (c.r("hv1"), c.r("hv2"));
    write_mib(&a, 0, 2, 5).await;
    c.proxy("hv1", "hv2").freeze();
    let blocks: Vec<u64> = (0..16).map(|i| 8 * MIB + i * 8192).collect();
    let writers: Vec<_> = blocks
        .iter()
        .map(|&off| {
            let a = a.clone();
            tokio::spawn(async move { a.write(off, data(off, 4096), false).await })
        })
        .collect();
    // Every write reached hv3's disk, and none could complete: hv2 never answers (and hv1
    // declares it dead only after the test links' 1 s, long after this).
    let hv3_disk = std::fs::File::open(&c.hosts[c.idx("hv3")].disk).unwrap();
    let on_disk = |off: u64| {
        let mut block = vec![0u8; 4096];
        std::os::unix::fs::FileExt::read_exact_at(&hv3_disk, &mut block, off).unwrap();
        block == data(off, 4096)[..]
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !blocks.iter().all(|&off| on_disk(off)) {
        assert!(
            std::time::Instant::now() < deadline,
            "hv3 never applied the writes"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        writers.iter().all(|w| !w.is_finished()),
        "a write completed without hv2"
    );
    c.kill("hv3");
    drop(a);
    c.kill("hv1");
    for w in writers {
        w.abort();
    }
    c.cut("hv1", "hv2");
    wait_for(&b, "hv2 sees hv1 and hv3 gone", 10, |s| {
        ["hv1", "hv3"]
            .iter()
            .all(|p| peer(s, p).connection != ConnectionState::Connected)
    })
    .await;
    c.restart("hv3").await;
    let d = c.r("hv3");
    let s = wait_for(&d, "hv3 decided", 20, |s| peer(s, "hv2").decision.is_some()).await;
    let decision = peer(&s, "hv2").decision.clone().unwrap();
    assert!(decision.contains("from hv2 to hv3"), "{decision}");
    wait_converged(&b, &d, 30).await;
    assert_eq!(c.disk_hash("hv2"), c.disk_hash("hv3"));
}

/// A trim and a write-zeroes over more extents than the activity log holds (1237 x 4 MiB)
/// are done in parts on both replicas, instead of failing as a request that could never be
/// admitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_trim_larger_than_the_activity_log_reaches_both_replicas() {
    const GIB: u64 = 1 << 30;
    let c = Cluster::new(&["hv1", "hv2"], &[], 6 * GIB, ReplicaOptions::default()).await;
    let (a, b) = (c.r("hv1"), c.r("hv2"));
    wait_for(&a, "connected", 10, |s| established(s, "hv2")).await;
    a.promote().await.unwrap();
    let blocks = [0, 2 * GIB, 5 * GIB - 4096, 5 * GIB + 8192];
    for off in blocks {
        a.write(off, data(off, 4096), false).await.unwrap();
    }
    a.trim(0, 5 * GIB).await.unwrap();
    a.write_zeroes(5 * GIB, GIB, false).await.unwrap();
    a.flush().await.unwrap();
    wait_converged(&a, &b, 30).await;
    for host in ["hv1", "hv2"] {
        let disk = std::fs::File::open(&c.hosts[c.idx(host)].disk).unwrap();
        for off in blocks {
            let mut block = vec![1u8; 4096];
            std::os::unix::fs::FileExt::read_exact_at(&disk, &mut block, off).unwrap();
            assert!(block.iter().all(|&x| x == 0), "{host} at {off}");
        }
    }
}

/// `Replica::add_peer` / `remove_peer` (issue 19): a host replaces a dead one while the
/// Primary keeps writing. hv1 Primary with hv2 and a witness; hv2 dies for good; hv3 joins
/// (JUST_CREATED) without the Primary losing quorum or closing, is fully resynced with its
/// zero ranges left unallocated, then hv2 is removed and quorum holds with hv1 + hv3.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_added_online_full_syncs_sparse_and_a_dead_one_is_removed() {
    let mut c = Cluster::new(
        &["hv1", "hv2"],
        &["witness"],
        32 * MIB,
        ReplicaOptions::default(),
    )
    .await;
    c.wait_fully_connected(&["hv1", "hv2", "witness"]).await;
    let a = c.r("hv1");
    a.promote().await.unwrap();
    // 4 MiB of data at 0 and at 16 MiB; the rest of the 32 MiB is never written.
    write_mib(&a, 0, 2, 1).await;
    write_mib(&a, 16, 2, 2).await;
    c.kill("hv2");
    wait_for(&a, "hv1 keeps quorum through the witness", 10, |s| {
        s.quorum && peer(s, "hv2").connection != ConnectionState::Connected
    })
    .await;

    let spec = c.join("hv3").await;
    a.add_peer(spec.clone()).await.unwrap();
    c.r("witness").add_peer(spec).await.unwrap();
    assert!(
        a.status().quorum,
        "a joining replica must not cost quorum: {:#?}",
        a.status()
    );
    // The Primary keeps writing during the full sync.
    write_mib(&a, 8, 1, 3).await;
    let d = c.r("hv3");
    wait_for(&d, "hv3 UpToDate", 30, |s| {
        s.disk_state == DiskState::UpToDate && established(s, "hv1")
    })
    .await;
    wait_for(&a, "hv1 sees hv3 in sync", 10, |s| {
        peer(s, "hv3").disk_state == DiskState::UpToDate && peer(s, "hv3").out_of_sync_bytes == 0
    })
    .await;
    a.flush().await.unwrap();
    assert_eq!(c.disk_hash("hv1"), c.disk_hash("hv3"));
    // Zero ranges travelled as Zeroes: hv3's file holds about the 5 MiB written, not 32.
    let allocated = std::os::unix::fs::MetadataExt::blocks(
        &std::fs::metadata(&c.hosts[c.idx("hv3")].disk).unwrap(),
    ) * 512;
    assert!(allocated <= 6 * MIB, "hv3 allocated {allocated} bytes");

    // hv2 is gone for good: remove it everywhere; hv1 + hv3 (+ witness) keep quorum.
    a.remove_peer("hv2").await.unwrap();
    d.remove_peer("hv2").await.unwrap();
    c.r("witness").remove_peer("hv2").await.unwrap();
    let s = a.status();
    assert!(s.peers.iter().all(|p| p.node != "hv2"), "{s:#?}");
    assert!(s.quorum, "{s:#?}");
    assert!(!c.hosts[c.idx("hv1")].meta.join("bitmap.hv2").exists());
    write_mib(&a, 20, 1, 4).await;
    wait_converged(&a, &d, 10).await;
    assert_eq!(c.disk_hash("hv1"), c.disk_hash("hv3"));
}

/// The consistent-cut entry point of `tandem snapshot create`: while one member holds a
/// pause, no member becomes Primary (the promotion is retried until the pause ends), and a
/// pause is refused while a data peer is not connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pause_holds_every_promotion_and_needs_every_replica_in_sync() {
    let c = Cluster::new(&["hv1", "hv2"], &[], 16 * MIB, ReplicaOptions::default()).await;
    c.wait_fully_connected(&["hv1", "hv2"]).await;
    let (a, b) = (c.r("hv1"), c.r("hv2"));
    wait_for(&a, "hv1 sees hv2 UpToDate", 10, |s| {
        peer(s, "hv2").disk_state == DiskState::UpToDate
    })
    .await;

    // A closed volume: hv1 holds the pause, hv2's promotion waits until it is dropped.
    let pause = a.pause_writes(Duration::from_secs(1)).await.unwrap();
    let promoting = tokio::spawn({
        let b = b.clone();
        async move { b.promote().await }
    });
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(b.status().role, Role::Secondary, "promoted during a pause");
    drop(pause);
    promoting.await.unwrap().unwrap();
    assert_eq!(b.status().role, Role::Primary);
    b.write(0, data(1, 4096), false).await.unwrap();

    // hv2 is Primary: its pause drains and holds. With the link to hv1 gone it is refused.
    drop(b.pause_writes(Duration::from_secs(1)).await.unwrap());
    // Cut twice: a connection the proxy accepted just as the first cut ran survives it.
    c.cut("hv1", "hv2");
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.cut("hv1", "hv2");
    wait_for(&b, "hv2 lost hv1", 10, |s| {
        peer(s, "hv1").connection != ConnectionState::Connected
    })
    .await;
    let err = b.pause_writes(Duration::from_secs(1)).await.err().unwrap();
    assert!(
        err.to_string()
            .contains("not every replica would hold the same cut (hv1 is"),
        "{err}"
    );
}

/// A device whose data writes wait while it is held (flushes and reads pass), and that
/// says when a write arrived.
struct HeldWrites {
    inner: std::sync::Arc<dyn replication::device::BackingDevice>,
    held: std::sync::Mutex<bool>,
    released: std::sync::Condvar,
    arrived: tokio::sync::Notify,
    /// Panic when the data path asks for a write on its own task: a bug there.
    panic_on_write: std::sync::atomic::AtomicBool,
}

impl HeldWrites {
    fn hold(&self) {
        *self.held.lock().unwrap() = true;
    }

    fn release(&self) {
        *self.held.lock().unwrap() = false;
        self.released.notify_all();
    }

    /// A data write arrived: wait while held.
    fn gate(&self) {
        let mut held = self.held.lock().unwrap();
        if *held {
            self.arrived.notify_one();
        }
        while *held {
            held = self.released.wait(held).unwrap();
        }
    }
}

/// Releases the held writes when dropped, also when the test fails (the runtime's
/// shutdown waits for a write held on the blocking pool).
struct ReleaseOnDrop(std::sync::Arc<HeldWrites>);

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        self.0.release();
    }
}

impl replication::device::BackingDevice for HeldWrites {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn write_async(
        &self,
        _offset: u64,
        _data: &bytes::Bytes,
        _fua: bool,
    ) -> Option<replication::device::DeviceFuture<()>> {
        let panic = self
            .panic_on_write
            .load(std::sync::atomic::Ordering::SeqCst);
        assert!(!panic, "test: a bug on the volume task");
        None
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), replication::device::DeviceError> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), replication::device::DeviceError> {
        self.gate();
        self.inner.write_at(buf, offset)
    }
    fn write_at_durable(
        &self,
        buf: &[u8],
        offset: u64,
    ) -> Result<(), replication::device::DeviceError> {
        self.gate();
        self.inner.write_at_durable(buf, offset)
    }
    fn flush(&self) -> Result<(), replication::device::DeviceError> {
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), replication::device::DeviceError> {
        self.gate();
        self.inner.discard(offset, len)
    }
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
    ) -> Result<(), replication::device::DeviceError> {
        self.gate();
        self.inner.write_zeroes(offset, len, may_unmap)
    }
    fn set_size(&self, size: u64) {
        self.inner.set_size(size)
    }
}

/// hv1 Primary over a device whose writes a test can hold ([`HeldWrites`]), with hv2 its
/// UpToDate peer and one write done.
async fn primary_over_held_writes() -> (Cluster, std::sync::Arc<HeldWrites>) {
    let mut c = Cluster::new(&["hv1", "hv2"], &[], 16 * MIB, ReplicaOptions::default()).await;
    let mut dev = None;
    c.reopen_on("hv1", |inner| {
        let d = std::sync::Arc::new(HeldWrites {
            inner,
            held: std::sync::Mutex::new(false),
            released: std::sync::Condvar::new(),
            arrived: tokio::sync::Notify::new(),
            panic_on_write: Default::default(),
        });
        dev = Some(d.clone());
        d
    })
    .await;
    let dev = dev.unwrap();
    c.wait_fully_connected(&["hv1", "hv2"]).await;
    let a = c.r("hv1");
    wait_for(&a, "hv1 sees hv2 UpToDate", 10, |s| {
        peer(s, "hv2").disk_state == DiskState::UpToDate
    })
    .await;
    promote_within(&a, 10).await;
    a.write(0, data(1, 4096), false).await.unwrap();
    (c, dev)
}

/// The Primary's data path fails (its volume task panics: a bug) while a write is on its
/// disk but not yet on the peer's (the link is frozen): both writes fail, the replica
/// steps down instead of staying a Primary whose every write fails, with those ranges
/// marked out of sync for the peer; once the link is back the peer resyncs them, and a
/// new promotion writes through a new data path.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_primary_whose_data_path_fails_steps_down_and_the_peer_resyncs() {
    let (c, dev) = primary_over_held_writes().await;
    let (a, b) = (c.r("hv1"), c.r("hv2"));
    c.proxy("hv1", "hv2").freeze();
    let unreplicated = tokio::spawn({
        let a = a.clone();
        async move { a.write(MIB, data(2, 4096), false).await }
    });
    // On hv1's disk, not on hv2's. Keepalive gives up on the frozen link after 1 s: the
    // panic must come well before.
    let t0 = std::time::Instant::now();
    while c.disk_bytes("hv1", MIB, 4096) != data(2, 4096) {
        let waited = t0.elapsed();
        assert!(
            waited < Duration::from_millis(500),
            "no write on hv1's disk after {waited:?}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_ne!(c.disk_bytes("hv2", MIB, 4096), data(2, 4096));
    dev.panic_on_write
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let failed = a.write(2 * MIB, data(3, 4096), false).await;
    dev.panic_on_write
        .store(false, std::sync::atomic::Ordering::SeqCst);
    assert!(failed.is_err(), "{failed:?}");
    let unreplicated = unreplicated.await.unwrap();
    assert!(unreplicated.is_err(), "{unreplicated:?}");
    wait_for(
        &a,
        "hv1 Secondary, both writes out of sync for hv2",
        10,
        |s| s.role == Role::Secondary && peer(s, "hv2").out_of_sync_bytes >= 8192,
    )
    .await;

    c.proxy("hv1", "hv2").cut();
    c.proxy("hv1", "hv2").heal();
    wait_converged(&a, &b, 20).await;
    assert_eq!(c.disk_hash("hv1"), c.disk_hash("hv2"));
    promote_within(&a, 10).await;
    assert_eq!(a.read(MIB, 4096).await.unwrap(), data(2, 4096));
    a.write(3 * MIB, data(4, 4096), false).await.unwrap();
    assert_eq!(a.read(3 * MIB, 4096).await.unwrap(), data(4, 4096));
    wait_converged(&a, &b, 10).await;
    assert_eq!(c.disk_hash("hv1"), c.disk_hash("hv2"));
}

/// A write whose caller goes away (its future dropped or unwound: a vhost queue thread that
/// panics, a timeout) while the local disk still writes keeps the I/O gate, its
/// activity-log extents and its in-flight record until the disk is done: a pause (a
/// snapshot's consistent cut; a demotion or handshake takes the same gate) waits for it
/// instead of cutting while the block is still being written.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dropped_write_keeps_the_io_gate_until_its_disk_write_completes() {
    let (c, dev) = primary_over_held_writes().await;
    let _release = ReleaseOnDrop(dev.clone());
    let (a, b) = (c.r("hv1"), c.r("hv2"));

    // A FUA write goes to the disk on the blocking pool, in parallel with the peer: hold
    // it there, then drop its future.
    dev.hold();
    {
        let write = a.write(MIB, data(2, 4096), true);
        tokio::pin!(write);
        tokio::select! {
            r = &mut write => panic!("the held write completed: {r:?}"),
            () = dev.arrived.notified() => {}
            () = tokio::time::sleep(Duration::from_secs(10)) => panic!("the write never reached the disk"),
        }
    }

    let pausing = tokio::spawn({
        let a = a.clone();
        async move { a.pause_writes(Duration::from_secs(10)).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !pausing.is_finished(),
        "a pause got the I/O gate while a dropped write was still being written: {:?}",
        pausing.await.unwrap().map(drop)
    );

    // The disk completes the write: the gate is free, the pause drains and holds.
    dev.release();
    let pause = tokio::time::timeout(Duration::from_secs(10), pausing)
        .await
        .expect("the pause still waits once the write completed")
        .unwrap()
        .unwrap();
    drop(pause);
    assert_eq!(a.read(MIB, 4096).await.unwrap(), data(2, 4096));
    wait_converged(&a, &b, 10).await;
    assert_eq!(c.disk_hash("hv1"), c.disk_hash("hv2"));
}

/// A write admitted while the replica is Primary, but whose I/O gate comes only after a
/// demotion took it, must fail without reaching the disk: the demotion told the peers that
/// no write was in flight (found by review; before the fix the write went through the
/// demoted Primary's still-running task onto hv1's disk).
#[tokio::test]
async fn a_write_admitted_before_a_demotion_does_not_reach_the_disk_after_it() {
    let (c, dev) = primary_over_held_writes().await;
    let _release = ReleaseOnDrop(dev.clone());
    let a = c.r("hv1");

    // A first write holds the gate (its disk write is held), so the demotion waits for
    // the gate; a second write, admitted meanwhile, queues for the gate behind it.
    dev.hold();
    let first = tokio::spawn({
        let a = a.clone();
        async move { a.write(MIB, data(2, 4096), true).await }
    });
    tokio::time::timeout(Duration::from_secs(10), dev.arrived.notified())
        .await
        .expect("the first write never reached the disk");
    let demoting = tokio::spawn({
        let a = a.clone();
        async move { a.demote().await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = tokio::spawn({
        let a = a.clone();
        async move { a.write(2 * MIB, data(3, 4096), false).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !second.is_finished(),
        "the second write did not wait for the gate"
    );

    dev.release();
    first.await.unwrap().unwrap();
    tokio::time::timeout(Duration::from_secs(10), demoting)
        .await
        .expect("the demotion never finished")
        .unwrap()
        .unwrap();
    let second = tokio::time::timeout(Duration::from_secs(10), second)
        .await
        .expect("the second write never finished")
        .unwrap();
    assert!(
        second.is_err(),
        "a write completed on a demoted replica: {second:?}"
    );
    let mut on_disk = vec![0u8; 4096];
    replication::device::BackingDevice::read_at(&*dev, &mut on_disk, 2 * MIB).unwrap();
    assert_ne!(
        on_disk,
        data(3, 4096),
        "the second write reached hv1's disk after the demotion"
    );
}

/// The data path fails while the promotion that started it is still being made durable: the
/// replica steps down, and the promotion reports that instead of success (before, it
/// returned `Ok` for a replica that was Secondary). The metadata writes are held so the
/// failure lands inside that window; a later promotion writes through a new data path.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_data_path_failing_while_the_promotion_persists_fails_the_promotion() {
    let (c, dev) = primary_over_held_writes().await;
    let (a, b) = (c.r("hv1"), c.r("hv2"));
    a.demote().await.unwrap();
    // The demotion re-establishes the link (see `demote_inner`).
    wait_for(&a, "the link to hv2 re-established", 10, |s| {
        peer(s, "hv2").connection != ConnectionState::Connected
    })
    .await;
    // Back to a connected, UpToDate peer: the promotion starts no new generation, so the
    // write below needs no metadata write before it reaches the data path.
    c.wait_fully_connected(&["hv1", "hv2"]).await;
    wait_for(&a, "hv1 Secondary, hv2 UpToDate", 10, |s| {
        s.role == Role::Secondary && peer(s, "hv2").disk_state == DiskState::UpToDate
    })
    .await;

    let held = a.hold_metadata_writes();
    let promote = tokio::spawn({
        let a = a.clone();
        async move { a.promote().await }
    });
    // The role changes before the persist, which now waits for the metadata lock.
    wait_for(&a, "hv1 Primary, not yet durable", 10, |s| {
        s.role == Role::Primary
    })
    .await;
    assert!(!promote.is_finished());
    dev.panic_on_write
        .store(true, std::sync::atomic::Ordering::SeqCst);
    // Offset 0 is in a hot activity-log extent: the write needs no metadata write of its own.
    let failed = tokio::time::timeout(Duration::from_secs(10), a.write(0, data(2, 4096), false))
        .await
        .unwrap_or_else(|_| panic!("the write never returned: {:#?}", a.status()));
    dev.panic_on_write
        .store(false, std::sync::atomic::Ordering::SeqCst);
    assert!(failed.is_err(), "{failed:?}");
    // Longer than the demotion's wait for the I/O gate (10 s), which a reconnecting link
    // could hold while its handshake waits for the held metadata.
    wait_for(&a, "hv1 stepped down", 15, |s| s.role == Role::Secondary).await;
    drop(held);
    let promoted = tokio::time::timeout(Duration::from_secs(10), promote)
        .await
        .expect("the promotion never returned")
        .unwrap();
    match promoted {
        Err(EngineError::Demoted { reason, .. }) => {
            assert!(reason.contains("data path failed"), "{reason}")
        }
        other => panic!("the promotion of a replica that stepped down returned {other:?}"),
    }
    assert_eq!(a.status().role, Role::Secondary);

    promote_within(&a, 10).await;
    a.write(MIB, data(3, 4096), false).await.unwrap();
    assert_eq!(a.read(MIB, 4096).await.unwrap(), data(3, 4096));
    wait_converged(&a, &b, 20).await;
    assert_eq!(c.disk_hash("hv1"), c.disk_hash("hv2"));
}
