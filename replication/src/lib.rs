//! The replicated-volume engine.
//!
//! This crate owns everything that makes a Tandem volume a *replicated* volume: the peer
//! wire protocol, protocols A/B/C, per-replica metadata (generation UUIDs, bitmaps,
//! write-intent tracking), the connect-time sync decision, resync and online verify, roles,
//! quorum and the dual-primary gate.
//!
//! It knows nothing of libvirt, Proxmox, LVM or NBD. It sees a [`device::BackingDevice`]
//! (the local disk of a replica) and peers (byte streams). Frontends such as the NBD server
//! in `volume-driver` sit on top of it.
//!
//! ## The state core (pure) and how the engine drives it
//!
//! ```text
//! generation      UuidSet: current / per-peer bitmap / history generations, flags
//! sync_decision   decide(local, peer) -> SyncDecision {outcome, rule}; split-brain policies
//! bitmap          per-peer out-of-sync bits (4 KiB), resync planner (runs)
//! activity_log    hot 4 MiB extents: begin_write -> Go | Persist(tx) | WaitFor | Busy
//! metadata        MetaStore: the only module here that touches metadata files
//! quorum, role    evaluate(...) -> QuorumVerdict; may_promote(...) -> Result<(), PromoteRefusal>
//! ```
//!
//! Around them: `resync` (run_resync_source: bitmap-driven and checksum resync; the target
//! side is ordered inside `datapath::run_secondary`) and `verify` (run_verify: online
//! verify); their module docs list what the engine does before and after.
//!
//! The engine that drives all of this per volume is [`replica`] (`ReplicationNode`,
//! `Replica`: links, handshake, roles, quorum, I/O, status); the walkthrough below is what it
//! does around one write.
//!
//! A write on a replica (Primary, or a Secondary applying a peer write):
//!
//! ```
//! use replication::activity_log::{ActivityLog, Admission};
//! use replication::bitmap::Bitmap;
//! use replication::generation::{Generation, SplitMix64, UuidSet};
//! use replication::metadata::{MetaStore, ReplicaMeta};
//! use replication::sync_decision::{decide, DecisionContext, Direction, SyncOutcome};
//! use replication::role::Protocol;
//!
//! let dir = tempfile::tempdir().unwrap();
//! let size = 64 << 20;
//! let meta = ReplicaMeta {
//!     volume_size: size,
//!     al_extents: 61,
//!     uuids: UuidSet::day0(Generation::from_raw(0xD0)),
//!     clean_shutdown: true,
//! };
//! MetaStore::create(dir.path(), &meta, &["hv2"]).unwrap();
//! let (mut store, loaded) = MetaStore::open(dir.path()).unwrap();
//! let mut uuids = loaded.meta.uuids.clone();
//! let mut bitmaps = loaded.bitmaps;
//! let mut al = ActivityLog::from_snapshot(61, loaded.al_seq, &loaded.al_snapshot).unwrap();
//! let mut rng = SplitMix64::new(0x5eed); // the daemon seeds it from the OS once
//!
//! // Promoted while hv2 is unreachable: the first write starts a new generation.
//! uuids.on_promote(true);
//! if let Some(_new) = uuids.before_write(&["hv2"], &mut rng.as_fn()) {
//!     let m = ReplicaMeta { uuids: uuids.clone(), ..loaded.meta.clone() };
//!     store.write_superblock(&m).unwrap(); // durable before the write is issued
//! }
//! match al.begin_write(4096, 8192).unwrap() {
//!     Admission::Go => {}
//!     Admission::Persist(tx) => {
//!         for (off, len) in al.take_evicted_ranges() {
//!             let bm = bitmaps.get_mut("hv2").unwrap();
//!             store.flush_bitmap_range("hv2", bm, off, len).unwrap();
//!         }
//!         store.write_al(tx.seq, &tx.snapshot).unwrap();
//!         al.transaction_durable(tx.seq);
//!     }
//!     Admission::WaitFor(_seq) => { /* wait until that transaction is durable */ }
//!     Admission::Busy => { /* wait for an in-flight write to complete, retry */ }
//! }
//! // ... write to the device; hv2 is disconnected, so it misses the write:
//! bitmaps.get_mut("hv2").unwrap().set_range(4096, 8192).unwrap();
//! al.end_write(4096, 8192).unwrap();
//!
//! // hv2 comes back, still on the old generation: bitmap resync, we are the source.
//! let hv2 = UuidSet::day0(Generation::from_raw(0xD0));
//! let ctx = DecisionContext { local_name: "hv1", peer_name: "hv2", protocol: Protocol::C };
//! let d = decide(&uuids, &hv2, &ctx);
//! assert_eq!(d.outcome, SyncOutcome::BitmapResync(Direction::LocalIsSource));
//! let plan: Vec<(u64, u64)> = bitmaps["hv2"].runs().collect();
//! assert_eq!(plan, vec![(4096, 8192)]);
//! // ... after the resync: uuids.finish_resync_as_source("hv2"), clear the bits, persist.
//! ```

pub mod activity_log;
pub mod auth;
pub mod bitmap;
pub mod core;
pub mod datapath;
pub mod device;
pub mod failure_log;
pub mod future_set;
pub mod generation;
pub mod link;
pub mod metadata;
pub mod quorum;
pub mod replica;
pub mod resync;
pub mod role;
pub mod stats;
pub mod sync_decision;
pub mod verify;
pub mod wire;
