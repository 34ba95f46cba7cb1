//! Metadata persistence tests: round trips, torn writes of every file, clean versus crashed
//! restarts, and a randomized crash simulation of activity log + bitmap + store.

use super::*;
use crate::activity_log::{ActivityLog, Admission};
use crate::generation::SplitMix64;

const MIB: u64 = 1 << 20;

fn meta(size: u64) -> ReplicaMeta {
    let mut uuids = UuidSet::day0(Generation::from_raw(0xD00D));
    uuids.history = vec![Generation::from_raw(0x10), Generation::from_raw(0x20)];
    ReplicaMeta {
        volume_size: size,
        al_extents: 7,
        uuids,
        clean_shutdown: true,
    }
}

#[test]
fn create_then_open_round_trips_every_field() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("meta");
    let mut m = meta(300 * MIB);
    m.uuids
        .bitmap
        .insert("hv2".into(), Generation::from_raw(0x30));
    m.uuids.crashed_primary.insert("hv3".into());
    m.uuids.uncertain_peers.insert("hv2".into());
    m.uuids.flags.primary_lost_quorum = true;
    let store = MetaStore::create(&dir, &m, &["hv2", "hv3"]).unwrap();
    drop(store);
    let (_store, loaded) = MetaStore::open(&dir).unwrap();
    assert!(!loaded.recovered_from_crash);
    assert_eq!(loaded.meta.uuids.current, m.uuids.current);
    assert_eq!(loaded.meta.uuids.history, m.uuids.history);
    assert_eq!(
        loaded.meta.uuids.bitmap_for("hv2"),
        Generation::from_raw(0x30)
    );
    assert!(loaded.meta.uuids.is_crashed_primary_for("hv3"));
    assert!(loaded.meta.uuids.is_uncertain_for("hv2"));
    assert!(loaded.meta.uuids.flags.primary_lost_quorum);
    assert!(loaded.meta.uuids.flags.consistent);
    assert!(
        !loaded.meta.clean_shutdown,
        "open marks the metadata in use"
    );
    assert_eq!(loaded.bitmaps.len(), 2);
    assert_eq!(loaded.bitmaps["hv2"].dirty_blocks(), 0);
    assert!(loaded.torn_bitmap_pages.is_empty());
    assert!(matches!(
        MetaStore::create(&dir, &m, &["hv2"]),
        Err(MetaError::AlreadyExists(_))
    ));
}

#[test]
fn missing_metadata_is_not_found_and_bad_peer_names_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    assert!(matches!(
        MetaStore::open(tmp.path()),
        Err(MetaError::NotFound(_))
    ));
    assert!(matches!(
        MetaStore::create(&tmp.path().join("m"), &meta(MIB), &["../etc"]),
        Err(MetaError::BadPeerName(_))
    ));
}

fn corrupt(path: &Path, offset: u64) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&[0xFF, 0x00, 0xFF], offset).unwrap();
}

#[test]
fn a_torn_superblock_slot_falls_back_to_the_other_and_both_torn_is_a_typed_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let mut m = meta(64 * MIB);
    let mut store = MetaStore::create(&dir, &m, &["hv2"]).unwrap(); // seq 1 -> slot 1
    m.uuids.current = Generation::from_raw(0xBEEF0);
    store.write_superblock(&m).unwrap(); // seq 2 -> slot 0
    drop(store);
    // Tear the newest slot (0): the previous generation (slot 1) is used.
    corrupt(&dir.join("superblock"), 30);
    let (store, loaded) = MetaStore::open(&dir).unwrap();
    assert_eq!(loaded.meta.uuids.current, Generation::from_raw(0xD00D));
    drop(store);
    // open wrote seq 2 into slot 0 again; now tear both slots.
    corrupt(&dir.join("superblock"), 30);
    corrupt(&dir.join("superblock"), SB_SLOT + 30);
    let err = MetaStore::open(&dir).unwrap_err();
    assert!(matches!(err, MetaError::SuperblockCorrupt { .. }), "{err}");
    assert!(err.to_string().contains("refusing to guess"));
    // Truncation is a torn write too.
    let f = OpenOptions::new()
        .write(true)
        .open(dir.join("superblock"))
        .unwrap();
    f.set_len(10).unwrap();
    assert!(matches!(
        MetaStore::open(&dir),
        Err(MetaError::SuperblockCorrupt { .. })
    ));
}

#[test]
fn a_torn_al_slot_falls_back_to_the_older_snapshot_and_both_torn_is_a_typed_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let mut m = meta(64 * MIB);
    m.clean_shutdown = false;
    let mut store = MetaStore::create(&dir, &m, &["hv2"]).unwrap();
    store.write_al(1, &[1]).unwrap();
    store.write_al(2, &[1, 5]).unwrap();
    drop(store);
    let al_slot = al_slot_size(7);
    corrupt(&dir.join("al"), 30); // slot 0 holds seq 2
    let (store, loaded) = MetaStore::open(&dir).unwrap();
    assert_eq!((loaded.al_seq, loaded.al_snapshot.clone()), (1, vec![1]));
    assert!(loaded.recovered_from_crash);
    assert_eq!(
        loaded.bitmaps["hv2"].runs().collect::<Vec<_>>(),
        vec![(4 * MIB, 4 * MIB)],
        "apply-al used the older snapshot"
    );
    drop(store);
    corrupt(&dir.join("al"), al_slot + 30);
    assert!(matches!(
        MetaStore::open(&dir),
        Err(MetaError::AlCorrupt { .. })
    ));
}

#[test]
fn a_torn_bitmap_page_reads_as_all_out_of_sync_and_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let mut m = meta(300 * MIB); // 3 pages
    m.uuids.bitmap.insert("hv2".into(), Generation::ZERO);
    let mut store = MetaStore::create(&dir, &m, &["hv2"]).unwrap();
    let mut bm = Bitmap::new(300 * MIB);
    bm.set_range(0, 4096).unwrap();
    store.flush_bitmap("hv2", &mut bm).unwrap();
    let mut bms = BTreeMap::from([("hv2".to_string(), bm)]);
    store.close_clean(&m, &mut bms).unwrap();
    corrupt(&dir.join("bitmap.hv2"), PAGE_RECORD + 10);
    let (_s, loaded) = MetaStore::open(&dir).unwrap();
    assert_eq!(loaded.torn_bitmap_pages, vec![("hv2".to_string(), 1)]);
    let bm = &loaded.bitmaps["hv2"];
    assert!(bm.is_dirty_at(0));
    assert!(bm.is_dirty_at(128 * MIB) && bm.is_dirty_at(256 * MIB - 1));
    assert!(!bm.is_dirty_at(256 * MIB));
    // The page was rewritten: a second open finds it intact (and still dirty).
    drop(_s);
    let (_s, again) = MetaStore::open(&dir).unwrap();
    assert!(again.torn_bitmap_pages.is_empty());
    assert_eq!(again.bitmaps["hv2"].dirty_blocks(), bm.dirty_blocks());
}

#[test]
fn clean_restart_does_not_apply_the_al_and_a_crash_while_primary_is_recorded() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let m = meta(64 * MIB);
    let store = MetaStore::create(&dir, &m, &["hv2", "hv3"]).unwrap();
    drop(store);
    // Run 1: Primary, one hot extent, clean shutdown.
    let (mut store, loaded) = MetaStore::open(&dir).unwrap();
    let mut m = loaded.meta.clone();
    m.uuids.on_promote(false);
    store.write_superblock(&m).unwrap();
    store.write_al(1, &[2]).unwrap();
    m.uuids.on_demote();
    let mut bms = loaded.bitmaps.clone();
    store.close_clean(&m, &mut bms).unwrap();
    let (store, loaded) = MetaStore::open(&dir).unwrap();
    assert!(!loaded.recovered_from_crash && !loaded.crashed_primary);
    assert_eq!(
        loaded.bitmaps["hv2"].dirty_blocks(),
        0,
        "clean: AL not applied"
    );
    assert_eq!(loaded.al_snapshot, vec![2]);
    drop(store);
    // Run 2: Primary, crash (no close).
    let (mut store, loaded) = MetaStore::open(&dir).unwrap();
    let mut m = loaded.meta.clone();
    m.uuids.on_promote(false);
    store.write_superblock(&m).unwrap();
    drop(store);
    let (_store, loaded) = MetaStore::open(&dir).unwrap();
    assert!(loaded.recovered_from_crash && loaded.crashed_primary);
    assert!(loaded.meta.uuids.is_crashed_primary_for("hv2"));
    assert!(loaded.meta.uuids.is_crashed_primary_for("hv3"));
    assert!(!loaded.meta.uuids.flags.primary);
    for bm in loaded.bitmaps.values() {
        assert_eq!(bm.runs().collect::<Vec<_>>(), vec![(8 * MIB, 4 * MIB)]);
    }
}

#[test]
fn a_crashed_secondary_with_hot_extents_is_uncertain_towards_every_peer() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let store = MetaStore::create(&dir, &meta(64 * MIB), &["hv2", "hv3"]).unwrap();
    drop(store);
    // Secondary receiving writes in extent 2, then killed (no close).
    let (mut store, _) = MetaStore::open(&dir).unwrap();
    store.write_al(1, &[2]).unwrap();
    drop(store);
    let (store, loaded) = MetaStore::open(&dir).unwrap();
    assert!(loaded.recovered_from_crash && !loaded.crashed_primary);
    for p in ["hv2", "hv3"] {
        assert!(loaded.meta.uuids.is_uncertain_for(p), "{p}");
        assert!(!loaded.meta.uuids.is_crashed_primary_for(p), "{p}");
    }
    // Crash with an empty AL: nothing was in flight, nothing uncertain.
    drop(store);
    let tmp2 = tempfile::tempdir().unwrap();
    let store = MetaStore::create(tmp2.path(), &meta(64 * MIB), &["hv2"]).unwrap();
    drop(store);
    let (store, _) = MetaStore::open(tmp2.path()).unwrap();
    drop(store);
    let (_store, loaded) = MetaStore::open(tmp2.path()).unwrap();
    assert!(loaded.recovered_from_crash && !loaded.meta.uuids.is_uncertain_for("hv2"));
}

#[test]
fn following_a_new_generation_keeps_every_peer_and_its_bits() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let mut m = meta(64 * MIB);
    m.uuids
        .bitmap
        .insert("hv2".into(), Generation::from_raw(0x30));
    drop(MetaStore::create(&dir, &m, &["hv2", "hv3"]).unwrap());
    let (mut store, mut loaded) = MetaStore::open(&dir).unwrap();
    let bm = loaded.bitmaps.get_mut("hv2").unwrap();
    bm.set_range(4 * MIB, 4096).unwrap();
    store.flush_bitmap("hv2", bm).unwrap();
    loaded
        .meta
        .uuids
        .follow_new_current(Generation::from_raw(0x40));
    store.write_superblock(&loaded.meta).unwrap();
    drop(store);
    let (_store, again) = MetaStore::open(&dir).unwrap();
    assert_eq!(again.meta.uuids.current, Generation::from_raw(0x40));
    assert_eq!(again.meta.uuids.bitmap_for("hv2"), Generation::ZERO);
    assert_eq!(again.bitmaps.len(), 2, "no peer forgotten");
    assert_eq!(again.bitmaps["hv2"].dirty_blocks(), 1, "no bit lost");
}

#[test]
fn grow_extends_bitmaps_and_survives_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    MetaStore::create(&dir, &meta(100 * MIB), &["hv2"]).unwrap();
    let (mut store, loaded) = MetaStore::open(&dir).unwrap();
    let mut m = loaded.meta.clone();
    let mut bms = loaded.bitmaps.clone();
    store.grow(&mut m, &mut bms, 400 * MIB, true).unwrap();
    assert!(matches!(
        store.grow(&mut m, &mut bms, 10 * MIB, false),
        Err(MetaError::Bitmap { .. })
    ));
    store.close_clean(&m, &mut bms).unwrap();
    let (_s, loaded) = MetaStore::open(&dir).unwrap();
    assert_eq!(loaded.meta.volume_size, 400 * MIB);
    assert!(loaded.torn_bitmap_pages.is_empty());
    assert_eq!(
        loaded.bitmaps["hv2"].runs().collect::<Vec<_>>(),
        vec![(100 * MIB, 300 * MIB)]
    );
}

/// The engine's write path, reduced to metadata: AL admission, bitmap bits for a
/// disconnected peer, eviction flushes, and crashes injected into metadata writes.
struct Sim {
    dir: PathBuf,
    rng: SplitMix64,
    store: Option<MetaStore>,
    meta: ReplicaMeta,
    bm: Bitmap,
    al: ActivityLog,
    connected: bool,
    in_flight: Vec<(u64, u64)>,
    unreplicated: Vec<(u64, u64)>,
    crashes: u64,
}

const SIM_SIZE: u64 = 256 * MIB + 12_345;
const PEER: &str = "p";

impl Sim {
    fn store(&mut self) -> &mut MetaStore {
        self.store.as_mut().expect("open store")
    }

    fn r(&mut self, n: u64) -> u64 {
        self.rng.next_u64() % n
    }

    /// Returns Err(()) when an injected crash hit a metadata write.
    fn write(&mut self) -> Result<(), MetaError> {
        let offset = self.r(SIM_SIZE / 512) * 512;
        let len = ((1 + self.r(512)) * 512).min(SIM_SIZE - offset);
        loop {
            match self.al.begin_write(offset, len).map_err(MetaError::Al)? {
                Admission::Go => break,
                Admission::Persist(tx) => {
                    let ranges: Vec<(u64, u64)> = tx.evicted_ranges().collect();
                    let mut bm = std::mem::replace(&mut self.bm, Bitmap::new(1));
                    let res = (|| {
                        for (o, l) in ranges {
                            self.store().flush_bitmap_range(PEER, &mut bm, o, l)?;
                        }
                        self.store().write_al(tx.seq, &tx.snapshot)
                    })();
                    self.bm = bm;
                    res?;
                    self.al.transaction_durable(tx.seq);
                    break;
                }
                Admission::WaitFor(seq) => panic!("single-threaded sim waits for {seq}"),
                Admission::Busy => {
                    let (o, l) = self.in_flight.remove(0);
                    self.al.end_write(o, l).map_err(MetaError::Al)?;
                }
            }
        }
        // Issued: from here the data may be on the local disk.
        self.in_flight.push((offset, len));
        if !self.connected {
            self.bm.set_range(offset, len).expect("in range");
            self.unreplicated.push((offset, len));
        }
        Ok(())
    }

    fn step(&mut self) -> Result<(), MetaError> {
        match self.r(12) {
            0..=5 => self.write()?,
            6..=7 => {
                if !self.in_flight.is_empty() {
                    let i = self.r(self.in_flight.len() as u64) as usize;
                    let (o, l) = self.in_flight.remove(i);
                    self.al.end_write(o, l).map_err(MetaError::Al)?;
                }
            }
            8 => {
                if self.connected {
                    // In-flight writes may not reach the peer any more.
                    self.connected = false;
                    for (o, l) in self.in_flight.clone() {
                        self.bm.set_range(o, l).expect("in range");
                        self.unreplicated.push((o, l));
                    }
                }
            }
            9 => {
                if !self.connected && self.in_flight.is_empty() {
                    // Reconnect and resync everything instantly.
                    self.connected = true;
                    self.bm.clear_all();
                    self.unreplicated.clear();
                }
            }
            10 => {
                let mut bm = std::mem::replace(&mut self.bm, Bitmap::new(1));
                let res = self.store().flush_bitmap(PEER, &mut bm);
                self.bm = bm;
                res?;
            }
            _ => {
                if self.r(4) == 0 {
                    // Clean shutdown and restart.
                    for (o, l) in std::mem::take(&mut self.in_flight) {
                        self.al.end_write(o, l).map_err(MetaError::Al)?;
                    }
                    let mut bms = BTreeMap::from([(PEER.to_string(), self.bm.clone())]);
                    let store = self.store.take().expect("store");
                    store.close_clean(&self.meta, &mut bms)?;
                    self.reopen(false);
                } else {
                    return Err(MetaError::InjectedCrash); // power cut between writes
                }
            }
        }
        Ok(())
    }

    fn reopen(&mut self, crashed: bool) {
        self.store = None;
        let (store, loaded) = MetaStore::open(&self.dir).expect("metadata must always open");
        if !crashed {
            assert!(
                !loaded.recovered_from_crash,
                "clean shutdown must not apply the AL"
            );
        }
        // (After a crash the flag may still read clean: the crash can hit just after the
        // clean-shutdown superblock reached the disk.)
        let bm = loaded.bitmaps[PEER].clone();
        for &(o, l) in self.unreplicated.iter().chain(self.in_flight.iter()) {
            let mut b = o - o % 4096;
            while b < o + l {
                assert!(
                    bm.is_dirty_at(b),
                    "after {} crashes: block at {b} (write {o}+{l}) may differ from the peer but its bit is clear",
                    self.crashes
                );
                b += 4096;
            }
        }
        self.unreplicated.append(&mut self.in_flight);
        self.bm = bm;
        self.al = ActivityLog::from_snapshot(7, loaded.al_seq, &loaded.al_snapshot).unwrap();
        self.meta = loaded.meta;
        self.connected = false;
        self.store = Some(store);
    }
}

#[test]
fn crash_at_any_metadata_write_leaves_every_possibly_written_block_marked_out_of_sync() {
    for seed in 0..24u64 {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("meta");
        let m = meta(SIM_SIZE);
        let store = MetaStore::create(&dir, &m, &[PEER]).unwrap();
        drop(store);
        let (store, loaded) = MetaStore::open(&dir).unwrap();
        let mut sim = Sim {
            dir,
            rng: SplitMix64::new(seed),
            store: Some(store),
            meta: loaded.meta,
            bm: loaded.bitmaps[PEER].clone(),
            al: ActivityLog::new(7, loaded.al_seq).unwrap(),
            connected: seed % 3 != 0,
            in_flight: Vec::new(),
            unreplicated: Vec::new(),
            crashes: 0,
        };
        for _ in 0..6 {
            let budget = sim.r(40);
            let tear = sim.rng.next_u64();
            sim.store().crash_after(budget, tear);
            let mut steps = 0;
            loop {
                steps += 1;
                match sim.step() {
                    Ok(()) if steps < 400 => {}
                    Ok(()) => break,
                    Err(MetaError::InjectedCrash) => break,
                    Err(e) => panic!("seed {seed}: {e}"),
                }
            }
            sim.crashes += 1;
            sim.reopen(true);
        }
    }
}

#[test]
fn a_crash_while_new_bitmaps_are_written_leaves_no_metadata_and_a_retry_succeeds() {
    // 512 MiB: 4 bitmap pages per peer; create writes 2 x 4 pages, then the superblock.
    let m = meta(512 * MIB);
    let writes = 2 * 4 + 1;
    for budget in 0..=writes {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("meta");
        MetaStore::crash_next_create(budget, budget * 7 + 1);
        let created = MetaStore::create(&dir, &m, &["hv2", "hv3"]);
        if budget == writes {
            // One sync per bitmap file (not per page), then the superblock's.
            assert_eq!(created.unwrap().syncs, 3);
            continue;
        }
        assert!(
            matches!(created, Err(MetaError::InjectedCrash)),
            "crash at write {budget}: {created:?}"
        );
        assert!(
            matches!(MetaStore::open(&dir), Err(MetaError::NotFound(_))),
            "crash at write {budget}: metadata without its superblock"
        );
        drop(MetaStore::create(&dir, &m, &["hv2", "hv3"]).unwrap());
        let (_, loaded) = MetaStore::open(&dir).unwrap();
        assert_eq!(loaded.bitmaps["hv3"].dirty_blocks(), 0, "budget {budget}");
        assert!(loaded.torn_bitmap_pages.is_empty(), "budget {budget}");
    }
}

#[test]
fn a_crash_while_a_new_peer_s_bitmap_is_written_leaves_the_peer_unknown() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("meta");
    let m = meta(512 * MIB);
    drop(MetaStore::create(&dir, &m, &["hv2"]).unwrap());
    for budget in 0..4 {
        let (mut store, _) = MetaStore::open(&dir).unwrap();
        store.crash_after(budget, budget + 3);
        let mut bm = Bitmap::new(512 * MIB);
        bm.set_range(0, 512 * MIB).unwrap();
        let added = store.add_peer("hv4", &mut bm);
        assert!(matches!(added, Err(MetaError::InjectedCrash)), "{added:?}");
        drop(store);
        let (_, loaded) = MetaStore::open(&dir).unwrap();
        assert!(!loaded.bitmaps.contains_key("hv4"), "budget {budget}");
    }
    let (mut store, mut loaded) = MetaStore::open(&dir).unwrap();
    let mut bm = Bitmap::new(512 * MIB);
    bm.set_range(0, 512 * MIB).unwrap();
    let syncs = store.syncs;
    store.add_peer("hv4", &mut bm).unwrap();
    assert_eq!(
        store.syncs - syncs,
        1,
        "one fdatasync for the whole new bitmap"
    );
    loaded
        .meta
        .uuids
        .bitmap
        .insert("hv4".into(), Generation::ZERO);
    store.write_superblock(&loaded.meta).unwrap();
    drop(store);
    let (_, loaded) = MetaStore::open(&dir).unwrap();
    assert_eq!(loaded.bitmaps["hv4"].dirty_blocks(), (512 * MIB) / 4096);
    assert!(loaded.torn_bitmap_pages.is_empty());
}

#[test]
fn garbage_payloads_with_valid_checksums_are_rejected_without_panicking() {
    let mut rng = SplitMix64::new(77);
    let good = encode_payload(&meta(MIB)).unwrap();
    for i in 0..5000 {
        let mut payload = if i % 2 == 0 {
            good.clone()
        } else {
            (0..(rng.next_u64() % 200))
                .map(|_| rng.next_u64() as u8)
                .collect()
        };
        if !payload.is_empty() {
            let n = 1 + rng.next_u64() % 4;
            for _ in 0..n {
                let at = (rng.next_u64() % payload.len() as u64) as usize;
                payload[at] = rng.next_u64() as u8;
            }
            payload.truncate(1 + (rng.next_u64() % payload.len() as u64) as usize);
        }
        let slot = frame(SB_MAGIC, 1, payload.len() as u32, &payload);
        let parsed = unframe(&slot, SB_MAGIC, |n| Some(n as usize))
            .unwrap()
            .unwrap();
        // Decoding may succeed or fail, but never panics or allocates unboundedly.
        let _ = decode_payload(&parsed.2);
    }
    // A frame whose length field points past the slot is corrupt, not a panic.
    let mut slot = frame(SB_MAGIC, 1, 4, &[1, 2, 3, 4]);
    slot[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(unframe(&slot, SB_MAGIC, |n| Some(n as usize)).is_err());
}
