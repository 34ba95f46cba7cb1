//! The activity log (AL): crash-safe write-intent tracking at 4 MiB extent granularity, so
//! that after a crash only the extents that were "hot" are resynced (ref `drbd.md` §2
//! "Activity log", "Primary crash").
//!
//! This module is pure: [`ActivityLog`] decides, the caller does the I/O. The contract:
//!
//! ```text
//! begin_write(range) -> Go                  all extents hot and durable: issue the write
//!                    -> Persist(tx)         1. flush the bitmap pages of take_evicted_ranges()
//!                                           2. write tx.snapshot durably (metadata::MetaStore::write_al)
//!                                           3. transaction_durable(tx.seq), then issue the write
//!                    -> WaitFor(seq)        an extent was added by a transaction not yet durable:
//!                                           issue the write after transaction_durable(seq)
//!                    -> Busy                every hot extent has writes in flight: retry after an end_write
//! end_write(range)                          the write completed (locally and on every peer that
//!                                           will get it)
//! ```
//!
//! A transaction records the *whole* hot set (a snapshot), not a delta: a later snapshot
//! supersedes every earlier one, so if several transactions are pending, persisting the
//! newest and reporting its `seq` is enough; snapshots are written one at a time, and an
//! older one is skipped once a newer one is durable. Evicting an extent needs its bitmap
//! bits on disk before *any* snapshot without it (a peer that was disconnected while it was
//! written would otherwise lose them in a crash), so the evictions of every admitted
//! transaction are collected, and whoever writes the next snapshot flushes them all first.
//!
//! After a crash (no clean-shutdown flag), [`apply_al`] ORs every extent of the last durable
//! snapshot into every peer's bitmap: every write that might have reached the disk is
//! covered. DRBD 9 keeps an AL on Secondaries too (they write what the Primary sends), and so
//! do we: a Secondary takes the extents of every request it applies (`datapath::WriteIntentLog`).
//!
//! An extent leaves the on-disk log only after the data written to it is durable: the
//! caller flushes the data device before persisting a transaction that evicts extents
//! (DRBD's flush before an AL write). Otherwise a write completed into a volatile cache,
//! then lost in a power failure, would be in neither the log nor a bitmap.
//!
//! Differences from DRBD: snapshots instead of 64-slot incremental transactions in a ring
//! (simpler to prove; a snapshot of the default 1237 extents is ~10 KiB, written only when a
//! cold extent is touched); eviction is plain LRU among idle extents.

use crate::bitmap::{Bitmap, BitmapError};
use std::collections::{BTreeMap, BTreeSet};

/// Bytes per extent (DRBD: 4 MiB).
pub const EXTENT_SIZE: u64 = 4 << 20;
/// Default number of hot extents (DRBD's default `al-extents`, ~4.8 GiB hot).
pub const DEFAULT_AL_EXTENTS: usize = 1237;
/// Smallest allowed number of hot extents.
pub const MIN_AL_EXTENTS: usize = 7;
/// Largest allowed number of hot extents (DRBD's maximum).
pub const MAX_AL_EXTENTS: usize = 65534;

/// Errors of the activity log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AlError {
    /// The configured extent count is outside the allowed range.
    #[error("al-extents {0} is outside {MIN_AL_EXTENTS}..={MAX_AL_EXTENTS}")]
    BadCapacity(usize),
    /// One write spans more extents than the log can hold.
    #[error("a write at offset {offset} length {len} spans {extents} extents, more than the {capacity} hot extents allowed")]
    WriteTooLarge {
        offset: u64,
        len: u64,
        extents: u64,
        capacity: usize,
    },
    /// A completion did not match a started write.
    #[error("end_write for extent {0} which has no write in flight")]
    NotInFlight(u64),
    /// Applying the log to a bitmap failed.
    #[error("applying the activity log to a bitmap")]
    Apply(#[source] BitmapError),
    /// A transaction could not be made durable earlier: the hot set on disk is unknown,
    /// so no write is admitted until the replica is attached again.
    #[error("an earlier activity-log write failed; no writes until the replica is reattached")]
    Failed,
}

/// A change of the hot set that must be durable before the write that caused it is issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlTransaction {
    /// Monotonic transaction number (the metadata slot sequence).
    pub seq: u64,
    /// Extents that became hot.
    pub added: Vec<u64>,
    /// Extents that left the log: flush their bitmap pages before persisting.
    pub evicted: Vec<u64>,
    /// The whole hot set after this transaction, to persist.
    pub snapshot: Vec<u64>,
}

impl AlTransaction {
    /// Byte ranges of the evicted extents (whose bitmap bits must be durable first).
    pub fn evicted_ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.evicted.iter().map(|e| (e * EXTENT_SIZE, EXTENT_SIZE))
    }
}

/// What the caller must do before issuing a write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Issue the write now.
    Go,
    /// Persist this transaction, then report it durable, then issue the write.
    Persist(AlTransaction),
    /// Issue the write once transaction `seq` is durable.
    WaitFor(u64),
    /// No room: every hot extent is busy. Nothing was reserved; retry after an `end_write`.
    Busy,
}

#[derive(Debug, Clone, Copy)]
struct Extent {
    in_flight: u32,
    last_used: u64,
    added_in: u64,
}

/// The in-memory activity log of one replica.
#[derive(Debug, Clone)]
pub struct ActivityLog {
    capacity: usize,
    hot: BTreeMap<u64, Extent>,
    clock: u64,
    next_seq: u64,
    durable_seq: u64,
    failed: bool,
    /// Extents evicted by admitted transactions whose bitmap pages the caller has not yet
    /// written ([`ActivityLog::take_evicted`]).
    evicted: BTreeSet<u64>,
}

/// The extents touched by `[offset, offset+len)` (a zero-length write touches none).
pub fn extents_of(offset: u64, len: u64) -> std::ops::Range<u64> {
    if len == 0 {
        return 0..0;
    }
    let first = offset / EXTENT_SIZE;
    let last = (offset.saturating_add(len) - 1) / EXTENT_SIZE;
    first..last + 1
}

impl ActivityLog {
    /// An empty log holding at most `capacity` hot extents. `last_seq` is the sequence
    /// number of the last persisted snapshot (0 for a new replica).
    pub fn new(capacity: usize, last_seq: u64) -> Result<ActivityLog, AlError> {
        if !(MIN_AL_EXTENTS..=MAX_AL_EXTENTS).contains(&capacity) {
            return Err(AlError::BadCapacity(capacity));
        }
        Ok(ActivityLog {
            capacity,
            hot: BTreeMap::new(),
            clock: 0,
            next_seq: last_seq + 1,
            durable_seq: last_seq,
            failed: false,
            evicted: BTreeSet::new(),
        })
    }

    /// A log resumed from a durable snapshot (after a clean restart or after `apply_al`).
    pub fn from_snapshot(
        capacity: usize,
        last_seq: u64,
        snapshot: &[u64],
    ) -> Result<ActivityLog, AlError> {
        let mut al = ActivityLog::new(capacity, last_seq)?;
        for (i, e) in snapshot.iter().take(capacity).enumerate() {
            al.hot.insert(
                *e,
                Extent {
                    in_flight: 0,
                    last_used: i as u64,
                    added_in: last_seq,
                },
            );
        }
        al.clock = snapshot.len() as u64;
        Ok(al)
    }

    /// The configured number of hot extents.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The current hot extents, ascending.
    pub fn hot_extents(&self) -> Vec<u64> {
        self.hot.keys().copied().collect()
    }

    /// Whether extent `e` is hot.
    pub fn is_hot(&self, e: u64) -> bool {
        self.hot.contains_key(&e)
    }

    /// The last transaction reported durable.
    pub fn durable_seq(&self) -> u64 {
        self.durable_seq
    }

    /// Admit a write of `[offset, offset+len)`; see the module doc for what each answer
    /// requires. On anything but `Busy` the extents are reserved until `end_write`.
    pub fn begin_write(&mut self, offset: u64, len: u64) -> Result<Admission, AlError> {
        if self.failed {
            return Err(AlError::Failed);
        }
        let wanted = extents_of(offset, len);
        let count = wanted.end - wanted.start;
        if count > self.capacity as u64 {
            return Err(AlError::WriteTooLarge {
                offset,
                len,
                extents: count,
                capacity: self.capacity,
            });
        }
        let cold: Vec<u64> = wanted
            .clone()
            .filter(|e| !self.hot.contains_key(e))
            .collect();
        let mut evicted = Vec::new();
        if !cold.is_empty() {
            let overflow = (self.hot.len() + cold.len()).saturating_sub(self.capacity);
            if overflow > 0 {
                let mut idle: Vec<(u64, u64)> = self
                    .hot
                    .iter()
                    .filter(|(e, x)| x.in_flight == 0 && !wanted.contains(e))
                    .map(|(e, x)| (x.last_used, *e))
                    .collect();
                if idle.len() < overflow {
                    return Ok(Admission::Busy);
                }
                idle.sort_unstable();
                evicted = idle[..overflow].iter().map(|(_, e)| *e).collect();
            }
        }
        // Reserve.
        let seq = if cold.is_empty() {
            None
        } else {
            Some(self.next_seq)
        };
        for e in &evicted {
            self.hot.remove(e);
            self.evicted.insert(*e);
        }
        let mut wait_for = self.durable_seq;
        for e in wanted {
            self.clock += 1;
            let clock = self.clock;
            let x = self.hot.entry(e).or_insert(Extent {
                in_flight: 0,
                last_used: clock,
                added_in: seq.unwrap_or(0),
            });
            x.in_flight += 1;
            x.last_used = clock;
            wait_for = wait_for.max(x.added_in);
        }
        match seq {
            Some(seq) => {
                self.next_seq += 1;
                Ok(Admission::Persist(AlTransaction {
                    seq,
                    added: cold,
                    evicted,
                    snapshot: self.hot_extents(),
                }))
            }
            None if wait_for > self.durable_seq => Ok(Admission::WaitFor(wait_for)),
            None => Ok(Admission::Go),
        }
    }

    /// Admit a write only if that needs no metadata I/O and no waiting: every extent it
    /// touches is hot and durable. On `true` the extents are reserved until `end_write`; on
    /// `false` nothing changed (use `begin_write`).
    pub fn try_begin_write(&mut self, offset: u64, len: u64) -> Result<bool, AlError> {
        if self.failed {
            return Err(AlError::Failed);
        }
        let ready = extents_of(offset, len).all(|e| {
            self.hot
                .get(&e)
                .is_some_and(|x| x.added_in <= self.durable_seq)
        });
        if !ready {
            return Ok(false);
        }
        let adm = self.begin_write(offset, len)?;
        debug_assert_eq!(adm, Admission::Go);
        Ok(true)
    }

    /// Every extent evicted by a transaction admitted so far whose bitmap pages were not
    /// taken yet. Transactions may be persisted out of order (a newer snapshot supersedes
    /// an older one), so whoever persists *any* snapshot takes these and writes their
    /// bitmap pages (and makes their data durable) first: a newer snapshot that lacks an
    /// extent must never be on disk before that extent's bits.
    pub fn take_evicted_ranges(&mut self) -> Vec<(u64, u64)> {
        std::mem::take(&mut self.evicted)
            .into_iter()
            .map(|e| (e * EXTENT_SIZE, EXTENT_SIZE))
            .collect()
    }

    /// Persisting a transaction failed: every later `begin_write` fails, and writes waiting
    /// for a transaction (`WaitFor`) must fail too ([`ActivityLog::has_failed`]).
    pub fn transaction_failed(&mut self) {
        self.failed = true;
    }

    /// Whether a transaction failed (see [`ActivityLog::transaction_failed`]).
    pub fn has_failed(&self) -> bool {
        self.failed
    }

    /// Transaction `seq` (and so every earlier one) is on stable storage.
    pub fn transaction_durable(&mut self, seq: u64) {
        self.durable_seq = self.durable_seq.max(seq);
    }

    /// A write admitted by `begin_write` completed.
    pub fn end_write(&mut self, offset: u64, len: u64) -> Result<(), AlError> {
        for e in extents_of(offset, len) {
            match self.hot.get_mut(&e) {
                Some(x) if x.in_flight > 0 => x.in_flight -= 1,
                _ => return Err(AlError::NotInFlight(e)),
            }
        }
        Ok(())
    }

    /// Writes currently in flight, summed over extents (for tests and status).
    pub fn in_flight(&self) -> u64 {
        self.hot.values().map(|x| u64::from(x.in_flight)).sum()
    }
}

/// After a crash: mark every extent of `snapshot` out of sync in every bitmap (clipped to
/// each bitmap's volume size). DRBD's `drbdmeta apply-al`.
pub fn apply_al<'a>(
    snapshot: &[u64],
    bitmaps: impl IntoIterator<Item = &'a mut Bitmap>,
) -> Result<(), AlError> {
    let extents: BTreeSet<u64> = snapshot.iter().copied().collect();
    for bm in bitmaps {
        let size = bm.volume_size();
        for e in &extents {
            let start = e.saturating_mul(EXTENT_SIZE);
            if start >= size {
                continue;
            }
            let len = EXTENT_SIZE.min(size - start);
            bm.set_range(start, len).map_err(AlError::Apply)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn a_write_to_a_cold_extent_needs_a_durable_transaction_first() {
        let mut al = ActivityLog::new(7, 0).unwrap();
        let Admission::Persist(tx) = al.begin_write(0, 4096).unwrap() else {
            panic!("cold extent must be persisted first")
        };
        assert_eq!(tx.seq, 1);
        assert_eq!(tx.added, vec![0]);
        assert_eq!(tx.snapshot, vec![0]);
        // A second write to the same extent must wait for that transaction.
        assert_eq!(al.begin_write(4096, 4096).unwrap(), Admission::WaitFor(1));
        al.transaction_durable(1);
        assert_eq!(al.begin_write(8192, 4096).unwrap(), Admission::Go);
        assert_eq!(al.in_flight(), 3);
    }

    #[test]
    fn a_write_straddling_extents_makes_both_hot() {
        let mut al = ActivityLog::new(7, 10).unwrap();
        let Admission::Persist(tx) = al.begin_write(4 * MIB - 512, 1024).unwrap() else {
            panic!()
        };
        assert_eq!(tx.seq, 11);
        assert_eq!(tx.added, vec![0, 1]);
    }

    #[test]
    fn eviction_takes_the_least_recently_used_idle_extent() {
        let mut al = ActivityLog::new(7, 0).unwrap();
        for e in 0..7 {
            al.begin_write(e * EXTENT_SIZE, 4096).unwrap();
            al.end_write(e * EXTENT_SIZE, 4096).unwrap();
        }
        al.transaction_durable(7);
        // Touch extent 0 again so extent 1 is the LRU.
        assert_eq!(al.begin_write(0, 4096).unwrap(), Admission::Go);
        al.end_write(0, 4096).unwrap();
        let Admission::Persist(tx) = al.begin_write(100 * EXTENT_SIZE, 4096).unwrap() else {
            panic!()
        };
        assert_eq!(tx.evicted, vec![1]);
        assert_eq!(
            tx.evicted_ranges().collect::<Vec<_>>(),
            vec![(EXTENT_SIZE, EXTENT_SIZE)]
        );
        // Until taken, the eviction is pending for whoever persists the next snapshot.
        assert_eq!(al.take_evicted_ranges(), vec![(EXTENT_SIZE, EXTENT_SIZE)]);
        assert!(al.take_evicted_ranges().is_empty());
        assert!(!tx.snapshot.contains(&1) && tx.snapshot.contains(&100));
        assert_eq!(tx.snapshot.len(), 7);
    }

    #[test]
    fn try_begin_admits_only_writes_to_durable_hot_extents() {
        let mut al = ActivityLog::new(7, 0).unwrap();
        assert!(!al.try_begin_write(0, 4096).unwrap(), "cold extent");
        assert!(al.hot_extents().is_empty(), "a refusal reserves nothing");
        let Admission::Persist(tx) = al.begin_write(0, 4096).unwrap() else {
            panic!()
        };
        assert!(!al.try_begin_write(4096, 4096).unwrap(), "not durable yet");
        al.transaction_durable(tx.seq);
        assert!(al.try_begin_write(4096, 4096).unwrap());
        assert!(
            !al.try_begin_write(EXTENT_SIZE - 4096, 8192).unwrap(),
            "straddles a cold extent"
        );
        assert_eq!(al.in_flight(), 2);
        al.end_write(4096, 4096).unwrap();
        assert_eq!(al.in_flight(), 1);
    }

    #[test]
    fn busy_extents_are_never_evicted() {
        let mut al = ActivityLog::new(7, 0).unwrap();
        for e in 0..7 {
            al.begin_write(e * EXTENT_SIZE, 4096).unwrap();
        }
        assert_eq!(
            al.begin_write(50 * EXTENT_SIZE, 4096).unwrap(),
            Admission::Busy
        );
        assert_eq!(al.hot_extents().len(), 7, "Busy reserves nothing");
        al.end_write(3 * EXTENT_SIZE, 4096).unwrap();
        let Admission::Persist(tx) = al.begin_write(50 * EXTENT_SIZE, 4096).unwrap() else {
            panic!()
        };
        assert_eq!(tx.evicted, vec![3]);
    }

    #[test]
    fn bad_inputs_are_typed_errors() {
        assert!(matches!(
            ActivityLog::new(3, 0),
            Err(AlError::BadCapacity(3))
        ));
        let mut al = ActivityLog::new(7, 0).unwrap();
        assert!(matches!(
            al.begin_write(0, 8 * EXTENT_SIZE),
            Err(AlError::WriteTooLarge { .. })
        ));
        assert_eq!(al.end_write(0, 1), Err(AlError::NotInFlight(0)));
        assert_eq!(al.begin_write(0, 0).unwrap(), Admission::Go);
    }

    #[test]
    fn after_a_failed_transaction_no_write_is_admitted() {
        let mut al = ActivityLog::new(7, 0).unwrap();
        let Admission::Persist(_) = al.begin_write(0, 4096).unwrap() else {
            panic!()
        };
        assert_eq!(al.begin_write(4096, 4096).unwrap(), Admission::WaitFor(1));
        al.transaction_failed();
        assert!(al.has_failed());
        assert_eq!(al.begin_write(8192, 4096), Err(AlError::Failed));
        assert_eq!(al.try_begin_write(8192, 4096), Err(AlError::Failed));
        // The writes already admitted can still be ended.
        al.end_write(0, 4096).unwrap();
        al.end_write(4096, 4096).unwrap();
    }

    #[test]
    fn apply_al_marks_hot_extents_in_every_bitmap_clipped_to_the_volume() {
        let size = 2 * EXTENT_SIZE + MIB;
        let mut a = Bitmap::new(size);
        let mut b = Bitmap::new(size);
        apply_al(&[0, 2, 9], [&mut a, &mut b]).unwrap();
        for bm in [&a, &b] {
            assert_eq!(
                bm.runs().collect::<Vec<_>>(),
                vec![(0, EXTENT_SIZE), (2 * EXTENT_SIZE, MIB)]
            );
        }
    }
}
