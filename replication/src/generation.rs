//! Generation identifiers: which version of the data a replica holds, and since when it
//! tracks changes against each peer (ref `drbd.md` §2 "Generation identifiers").
//!
//! ```text
//! UuidSet
//!   current                 this replica's data generation
//!   bitmap[peer]            generation the per-peer bitmap counts changes against (0 = in sync)
//!   history[..HISTORY_LEN]  earlier generations, newest first
//!   flags                   consistent, was_up_to_date, primary (indicator), primary_lost_quorum
//!   crashed_primary         peers still owed the post-crash resync
//!   uncertain_peers         peers that may differ at equal generations (after a resync)
//!   new_generation_pending  in memory: the next write must start a new generation
//!
//! to_wire / from_wire       the handshake encoding (every count and length checked)
//! ```
//!
//! Lifecycle (DRBD 9):
//! - [`UuidSet::on_promote`] with a peer disconnected, or [`UuidSet::on_peer_lost`] while
//!   Primary, only *arms* a new generation; it is created by [`UuidSet::before_write`] on the
//!   first write, so a promotion that never writes causes no spurious split brain. The new
//!   generation must be persisted before that write is issued.
//! - "Losing a peer" means: any replica leaves the set of nodes that receive the Primary's
//!   writes — also when the broken link is between two Secondaries (the engine learns it from
//!   the cluster-wide state change). Arming only on the Primary's own links loses writes with
//!   three nodes (found by the randomized model in `sync_decision`).
//! - A new generation moves the old current into `bitmap[peer]` for every *disconnected*
//!   peer whose slot is empty, and into history. Connected Secondaries follow the Primary's
//!   new generation with [`UuidSet::follow_new_current`]. A Primary that loses a peer
//!   which never reported following its current generation gives the peer's slot the
//!   generation the peer last reported ([`UuidSet::on_peer_lost_behind`]).
//! - Resync completion: the target adopts the source's current and history
//!   ([`UuidSet::finish_resync_as_target`]); the source only clears its slot for the target.
//!
//! Differences from DRBD, on purpose:
//! - The role bit (`UUID_PRIMARY`) is not used at all: generations are stored with bit 0
//!   cleared, and "was Primary" lives in [`UuidFlags::primary`]. Comparison therefore ignores
//!   the role bit, as in DRBD.
//! - Peers are keyed by node name, not node id.
//! - `crashed_primary` is kept per peer, so with three nodes the crashed node resyncs its
//!   hot extents with *each* peer, not only with the first one it meets.
//! - After a resync as target, bitmap slots for *third* peers are dropped (moved to history):
//!   their bits described the old data. The next handshake with such a peer then falls to
//!   the history rule (full sync) instead of DRBD's copying of bitmap slots via peer-acks.
//!   Slower, never wrong.
//! - For the same reason a Secondary that follows a new generation drops its slots to
//!   history and fills none: DRBD's Secondaries mark the Primary's writes for absent peers
//!   (peer acks tell them who missed what), ours mark nothing, so their bitmaps cannot back
//!   a slot. A replica that comes back to meet only a Secondary of the generations it
//!   missed gets a full sync from it (a bitmap resync once lost that Primary's writes).
//! - Randomness is injected: every function that creates a generation takes a
//!   `FnMut() -> u64` (see [`SplitMix64`] for a seeded source); nothing here calls an OS rng.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// How many earlier generations a replica remembers (DRBD: `HISTORY_UUIDS` = 32).
pub const HISTORY_LEN: usize = 32;

/// A generation identifier: a random 64-bit value with bit 0 (DRBD's role bit) cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Generation(u64);

impl Generation {
    /// "No generation": an empty bitmap slot or history entry.
    pub const ZERO: Generation = Generation(0);
    /// A replica that was just created and never synced (DRBD's `UUID_JUST_CREATED`).
    pub const JUST_CREATED: Generation = Generation(4);

    /// Build from a raw value (role bit dropped).
    pub fn from_raw(raw: u64) -> Generation {
        Generation(raw & !1)
    }

    /// The raw value (bit 0 always clear).
    pub fn raw(self) -> u64 {
        self.0
    }

    /// Whether this is [`Generation::ZERO`].
    pub fn is_zero(self) -> bool {
        self.0 == 0
    }

    /// Whether this is [`Generation::JUST_CREATED`].
    pub fn is_just_created(self) -> bool {
        self == Generation::JUST_CREATED
    }

    /// A fresh random generation from `rng`, never ZERO nor JUST_CREATED.
    pub fn fresh(rng: &mut impl FnMut() -> u64) -> Generation {
        loop {
            let g = Generation::from_raw(rng());
            if !g.is_zero() && !g.is_just_created() {
                return g;
            }
        }
    }
}

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016X}", self.0)
    }
}

/// A small seeded generator (SplitMix64) for generation identifiers: reproducible in tests,
/// and in the daemon seeded once from the OS.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator starting from `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A closure view, for the `FnMut() -> u64` parameters of this module.
    pub fn as_fn(&mut self) -> impl FnMut() -> u64 + '_ {
        move || self.next_u64()
    }
}

/// Persistent per-replica flags (DRBD's `MDF_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UuidFlags {
    /// The data is consistent (not a half-done resync target). `MDF_CONSISTENT`.
    pub consistent: bool,
    /// The data was UpToDate when last known. `MDF_WAS_UP_TO_DATE`.
    pub was_up_to_date: bool,
    /// Primary indicator: set (durably) while Primary, cleared on a clean demote.
    /// Found set at start-up, it means the Primary crashed. `MDF_PRIMARY_IND`.
    pub primary: bool,
    /// This replica was Primary and lost quorum (its I/O was frozen or failed).
    /// `MDF_PRIMARY_LOST_QUORUM`.
    pub primary_lost_quorum: bool,
}

/// A replica's generation identifiers and flags: what the handshake exchanges.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UuidSet {
    /// This replica's data generation.
    pub current: Generation,
    /// Per peer: the generation its bitmap counts changes against; absent or ZERO = none.
    pub bitmap: BTreeMap<String, Generation>,
    /// Earlier generations, newest first, at most [`HISTORY_LEN`].
    pub history: Vec<Generation>,
    /// Persistent flags.
    pub flags: UuidFlags,
    /// Peers this replica owes a post-crash resync (set when a crashed Primary's activity
    /// log is applied; cleared per peer when a resync with it completes).
    pub crashed_primary: BTreeSet<String>,
    /// Peers this replica may differ from *at the same generation*, in the blocks its bitmap
    /// for them marks: set for every third peer when this replica finishes a resync as
    /// target (its data changed while they did not see it); cleared per peer by a resync or
    /// an in-sync handshake with it. Without this, two replicas of one generation that
    /// synced from different crashed/surviving nodes would wrongly decide "no sync".
    pub uncertain_peers: BTreeSet<String>,
    /// In memory only (not persisted, not sent): the next write starts a new generation.
    pub new_generation_pending: bool,
    /// In memory only: while Primary, the current at promotion and every generation this
    /// replica started since (see [`UuidSet::on_peer_lost_behind`]).
    pub primary_term: Vec<Generation>,
}

impl UuidSet {
    /// A freshly created replica that has never synced (`JUST_CREATED`, inconsistent).
    pub fn just_created() -> UuidSet {
        UuidSet {
            current: Generation::JUST_CREATED,
            ..UuidSet::default()
        }
    }

    /// A replica created together with its peers on identical (e.g. all-zero) disks: every
    /// replica gets the same `day0` generation, so no initial sync is needed (DRBD's
    /// `new-current-uuid --clear-bitmap`).
    pub fn day0(day0: Generation) -> UuidSet {
        UuidSet {
            current: day0,
            flags: UuidFlags {
                consistent: true,
                was_up_to_date: true,
                ..UuidFlags::default()
            },
            ..UuidSet::default()
        }
    }

    /// The bitmap generation for `peer` (ZERO when none).
    pub fn bitmap_for(&self, peer: &str) -> Generation {
        self.bitmap.get(peer).copied().unwrap_or(Generation::ZERO)
    }

    /// Whether `g` is in the history list.
    pub fn history_contains(&self, g: Generation) -> bool {
        !g.is_zero() && self.history.contains(&g)
    }

    /// Every non-zero generation this replica knows (current, bitmap slots, history).
    pub fn known_generations(&self) -> BTreeSet<Generation> {
        std::iter::once(self.current)
            .chain(self.bitmap.values().copied())
            .chain(self.history.iter().copied())
            .filter(|g| !g.is_zero() && !g.is_just_created())
            .collect()
    }

    /// This replica's line of generations, current first, then the history: what a
    /// tiebreaker relays, so that a replica cut off can tell whether another one moved on
    /// from its generation ([`moved_on_from`]).
    pub fn lineage(&self) -> Vec<Generation> {
        std::iter::once(self.current)
            .chain(self.history.iter().copied())
            .filter(|g| !g.is_zero())
            .collect()
    }

    /// Push `g` on the history (newest first), dropping duplicates and the oldest entries.
    pub fn push_history(&mut self, g: Generation) {
        if g.is_zero() || g.is_just_created() {
            return;
        }
        self.history.retain(|h| *h != g);
        self.history.insert(0, g);
        self.history.truncate(HISTORY_LEN);
    }

    /// The replica was promoted. If any peer is disconnected, the next write must start a
    /// new generation (DRBD 9: created on the first write, not at promotion).
    pub fn on_promote(&mut self, any_peer_disconnected: bool) {
        self.flags.primary = true;
        self.primary_term = vec![self.current];
        if any_peer_disconnected {
            self.new_generation_pending = true;
        }
    }

    /// The replica was demoted cleanly.
    pub fn on_demote(&mut self) {
        self.flags.primary = false;
        self.primary_term.clear();
        self.new_generation_pending = false;
    }

    /// This replica lost quorum while Primary: remembered durably, so that at the next
    /// handshake with equal generations it becomes SyncTarget (its frozen/failed writes were
    /// never acknowledged). Cleared when a resync as target completes.
    pub fn on_quorum_lost(&mut self, i_am_primary: bool) {
        if i_am_primary {
            self.flags.primary_lost_quorum = true;
        }
    }

    /// A Primary that still has quorum told this replica (directly or through a witness)
    /// that it no longer receives its writes: the data is consistent but stale (Outdated),
    /// and may not be promoted. Persist before acknowledging. Cleared by a resync as target.
    pub fn mark_outdated(&mut self) {
        self.flags.was_up_to_date = false;
    }

    /// A peer was lost. A Primary arms a new generation unless the lost peer was itself a
    /// Primary in dual-primary mode (DRBD: no new generation then).
    pub fn on_peer_lost(&mut self, i_am_primary: bool, peer_was_primary: bool) {
        if i_am_primary && !peer_was_primary {
            self.new_generation_pending = true;
        }
    }

    /// A Primary lost `peer`, which last reported holding `peer_current`, one of this
    /// Primary's own generations (its current when it was promoted or one it started
    /// since: [`UuidSet::primary_term`]). When that is not the current (the peer never
    /// reported following the newer ones, e.g. its link died silently before it heard of
    /// them) and no slot counts against the peer yet, the slot gets `peer_current`. Every
    /// write of this Primary that the peer lacks went unacknowledged by it and is in the
    /// bitmap for it, so a later handshake can resync by bitmap from there. Left empty, the
    /// slot would get the current with the next new generation, one the peer never held:
    /// only a full sync or a split brain without a base in common would remain. A
    /// generation this replica followed as a Secondary, or from a second Primary, does not
    /// count (its bitmap lacks that Primary's writes), and the caller skips this while
    /// another Primary writes here. A report still on its way (or never sent, by an older
    /// peer) makes the slot older than what the peer holds: then no bitmap rule matches and
    /// the history rule decides (a full sync).
    pub fn on_peer_lost_behind(&mut self, peer: &str, peer_current: Generation) {
        if peer_current != self.current
            && self.primary_term.contains(&peer_current)
            && self.bitmap_for(peer).is_zero()
        {
            self.bitmap.insert(peer.to_string(), peer_current);
        }
    }

    /// Call before issuing a write on this replica. If a new generation is armed, creates it
    /// (rotating the old current into the slots of `disconnected_peers`) and returns it: the
    /// caller must persist the metadata *before* the write is issued and must send the new
    /// current to the connected peers (who call [`UuidSet::follow_new_current`]).
    pub fn before_write(
        &mut self,
        disconnected_peers: &[&str],
        rng: &mut impl FnMut() -> u64,
    ) -> Option<Generation> {
        if !self.new_generation_pending {
            return None;
        }
        self.new_generation_pending = false;
        let g = Generation::fresh(rng);
        self.rotate_in(g, disconnected_peers);
        self.primary_term.push(g);
        Some(g)
    }

    /// A connected Secondary learns that its Primary started generation `g`. Every bitmap
    /// slot is dropped to history and none is filled: a slot claims that this replica's
    /// bitmap for the peer holds every change since the slot's generation, and a Secondary
    /// marks nothing for third peers when it applies its Primary's writes (DRBD marks them
    /// through peer acks, which this engine does not have). A later handshake with such a
    /// peer then falls to the history rule (full sync) instead of resyncing too little.
    pub fn follow_new_current(&mut self, g: Generation) {
        if self.current == g {
            return;
        }
        // The keys stay: they are the peer list the metadata stores (`metadata.rs`).
        let dropped: Vec<Generation> = self.bitmap.values_mut().map(std::mem::take).collect();
        for slot in dropped {
            // Older than the current: behind the history, to keep it newest first.
            if !slot.is_zero() && !self.history.contains(&slot) && self.history.len() < HISTORY_LEN
            {
                self.history.push(slot);
            }
        }
        self.push_history(self.current);
        self.current = g;
        // A Primary following the other Primary's generation (two Primaries): its
        // generations are no longer its own alone.
        self.primary_term.clear();
    }

    fn rotate_in(&mut self, g: Generation, disconnected_peers: &[&str]) {
        let old = self.current;
        for peer in disconnected_peers {
            let slot = self.bitmap.entry((*peer).to_string()).or_default();
            if slot.is_zero() && !old.is_just_created() {
                *slot = old;
            }
        }
        self.push_history(old);
        self.current = g;
    }

    /// A resync from `source_name` finished with this replica (`local_name`) as target: adopt
    /// the source's current and history; the slot for the source is cleared; slots for
    /// other peers are dropped to history (see module doc). The crashed-primary debt towards
    /// the source is cleared, and the source's debts towards third peers are *inherited*:
    /// the target now holds the source's uncertain (activity-log) blocks too. The engine must
    /// likewise set, in this replica's bitmaps for every peer other than the source, the bits
    /// of all blocks the resync wrote. `all_peers` are the volume's other replicas (this
    /// node and the source are skipped if listed); each becomes "uncertain". Pass an empty
    /// slice when the resync wrote no block (a checksum-based resync found every block
    /// equal): then nothing became uncertain, and repeated reconnects converge instead of
    /// resyncing back and forth. Marks the data consistent.
    pub fn finish_resync_as_target(
        &mut self,
        local_name: &str,
        source_name: &str,
        source: &UuidSet,
        all_peers: &[&str],
    ) {
        for p in &source.crashed_primary {
            if p != local_name && p != source_name {
                self.crashed_primary.insert(p.clone());
            }
        }
        for p in all_peers {
            if *p != local_name && *p != source_name {
                self.uncertain_peers.insert((*p).to_string());
            }
        }
        self.uncertain_peers.remove(source_name);
        let old_current = self.current;
        let mut dropped: Vec<Generation> = Vec::new();
        for (peer, slot) in self.bitmap.iter_mut() {
            if peer != source_name && !slot.is_zero() {
                dropped.push(*slot);
            }
            *slot = Generation::ZERO;
        }
        let mut history = Vec::new();
        for g in source
            .history
            .iter()
            .copied()
            .chain(std::iter::once(old_current))
            .chain(dropped)
            .chain(self.history.iter().copied())
        {
            if !g.is_zero() && !g.is_just_created() && g != source.current && !history.contains(&g)
            {
                history.push(g);
            }
        }
        history.truncate(HISTORY_LEN);
        self.history = history;
        self.current = source.current;
        self.crashed_primary.remove(source_name);
        self.flags.consistent = true;
        self.flags.was_up_to_date = true;
        self.flags.primary_lost_quorum = false;
        self.new_generation_pending = false;
    }

    /// A resync to `target_name` finished with this replica as source: its slot is cleared.
    pub fn finish_resync_as_source(&mut self, target_name: &str) {
        if let Some(slot) = self.bitmap.get_mut(target_name) {
            let old = *slot;
            *slot = Generation::ZERO;
            self.push_history(old);
        }
        self.crashed_primary.remove(target_name);
        self.uncertain_peers.remove(target_name);
    }

    /// The handshake with `peer` found both in sync (no resync needed): clear our slot and
    /// crashed-primary debt for it.
    pub fn in_sync_with(&mut self, peer: &str) {
        if let Some(slot) = self.bitmap.get_mut(peer) {
            let old = *slot;
            *slot = Generation::ZERO;
            self.push_history(old);
        }
        self.crashed_primary.remove(peer);
        self.uncertain_peers.remove(peer);
    }

    /// Whether this replica may differ from `peer` at equal generations (see
    /// [`UuidSet::uncertain_peers`]).
    pub fn is_uncertain_for(&self, peer: &str) -> bool {
        self.uncertain_peers.contains(peer)
    }

    /// Start-up after a crash while Primary (primary indicator found set): owe every peer
    /// in `peers` a resync of the hot extents. Call after the activity log was applied.
    pub fn mark_crashed_primary(&mut self, peers: &[&str]) {
        for p in peers {
            self.crashed_primary.insert((*p).to_string());
        }
    }

    /// This replica may differ from each of `peers` at equal generations (a Secondary that
    /// crashed with writes in flight): it is the resync target unless an earlier rule
    /// decides (see `metadata.rs`, where it is set).
    pub fn mark_uncertain(&mut self, peers: &[&str]) {
        for p in peers {
            self.uncertain_peers.insert((*p).to_string());
        }
    }

    /// Whether this replica owes `peer` a post-crash resync.
    pub fn is_crashed_primary_for(&self, peer: &str) -> bool {
        self.crashed_primary.contains(peer)
    }
}

/// Whether the replica with `lineage` (current first, then history) moved on from
/// generation `g`: `g` is in its history, not its current. Positive ancestry: a generation
/// that is merely unknown (older than the history reaches, or on a branch that ended) does
/// not count, so this never mistakes an old or divergent replica for a newer one.
pub fn moved_on_from(lineage: &[Generation], g: Generation) -> bool {
    match lineage.split_first() {
        Some((current, history)) => *current != g && !g.is_zero() && history.contains(&g),
        None => false,
    }
}

/// Most peers a [`UuidSet`] may name on the wire.
pub const MAX_WIRE_PEERS: usize = 31;
/// Longest peer name on the wire.
pub const MAX_WIRE_NAME: usize = 64;
const WIRE_VERSION: u8 = 1;

/// A [`UuidSet`] received from a peer was malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UuidDecodeError {
    /// The bytes ended early.
    #[error("uuid set truncated at byte {0}")]
    Truncated(usize),
    /// Unknown encoding version.
    #[error("uuid set encoding version {0} is not supported")]
    Version(u8),
    /// A count exceeds its limit.
    #[error("uuid set has {count} {what}, at most {max}")]
    TooMany {
        what: &'static str,
        count: usize,
        max: usize,
    },
    /// A peer name is not valid UTF-8 or too long.
    #[error("uuid set contains an invalid peer name")]
    BadName,
    /// Bytes left over after the set.
    #[error("{0} trailing bytes after the uuid set")]
    Trailing(usize),
}

impl UuidSet {
    /// Encode for the handshake (everything but `new_generation_pending`). Little-endian:
    /// version u8, flags u8, current u64, history (u8 count, u64 each), peers (u8 count;
    /// each: name (u8 len, bytes), bitmap u64, crashed u8, uncertain u8).
    pub fn to_wire(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        out.push(WIRE_VERSION);
        let f = &self.flags;
        out.push(
            u8::from(f.consistent)
                | u8::from(f.was_up_to_date) << 1
                | u8::from(f.primary) << 2
                | u8::from(f.primary_lost_quorum) << 3,
        );
        out.extend_from_slice(&self.current.raw().to_le_bytes());
        let hist: Vec<&Generation> = self.history.iter().take(HISTORY_LEN).collect();
        out.push(hist.len() as u8);
        for g in hist {
            out.extend_from_slice(&g.raw().to_le_bytes());
        }
        let mut peers: BTreeSet<&String> = self.bitmap.keys().collect();
        peers.extend(self.crashed_primary.iter());
        peers.extend(self.uncertain_peers.iter());
        let peers: Vec<&String> = peers
            .into_iter()
            .filter(|p| !p.is_empty() && p.len() <= MAX_WIRE_NAME)
            .take(MAX_WIRE_PEERS)
            .collect();
        out.push(peers.len() as u8);
        for p in peers {
            out.push(p.len() as u8);
            out.extend_from_slice(p.as_bytes());
            out.extend_from_slice(&self.bitmap_for(p).raw().to_le_bytes());
            out.push(u8::from(self.crashed_primary.contains(p.as_str())));
            out.push(u8::from(self.uncertain_peers.contains(p.as_str())));
        }
        out
    }

    /// Decode a peer's [`UuidSet::to_wire`] bytes; every count and length is checked.
    pub fn from_wire(buf: &[u8]) -> Result<UuidSet, UuidDecodeError> {
        let mut pos = 0usize;
        let mut take = |n: usize| -> Result<&[u8], UuidDecodeError> {
            let end = pos.checked_add(n).ok_or(UuidDecodeError::Truncated(pos))?;
            let s = buf.get(pos..end).ok_or(UuidDecodeError::Truncated(pos))?;
            pos = end;
            Ok(s)
        };
        fn u64_of(b: &[u8]) -> u64 {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            u64::from_le_bytes(a)
        }
        let version = take(1)?[0];
        if version != WIRE_VERSION {
            return Err(UuidDecodeError::Version(version));
        }
        let flags = take(1)?[0];
        let mut set = UuidSet {
            current: Generation::from_raw(u64_of(take(8)?)),
            flags: UuidFlags {
                consistent: flags & 1 != 0,
                was_up_to_date: flags & 2 != 0,
                primary: flags & 4 != 0,
                primary_lost_quorum: flags & 8 != 0,
            },
            ..UuidSet::default()
        };
        let hist = take(1)?[0] as usize;
        if hist > HISTORY_LEN {
            return Err(UuidDecodeError::TooMany {
                what: "history entries",
                count: hist,
                max: HISTORY_LEN,
            });
        }
        for _ in 0..hist {
            set.history.push(Generation::from_raw(u64_of(take(8)?)));
        }
        let peers = take(1)?[0] as usize;
        if peers > MAX_WIRE_PEERS {
            return Err(UuidDecodeError::TooMany {
                what: "peers",
                count: peers,
                max: MAX_WIRE_PEERS,
            });
        }
        for _ in 0..peers {
            let len = take(1)?[0] as usize;
            if len == 0 || len > MAX_WIRE_NAME {
                return Err(UuidDecodeError::BadName);
            }
            let name = std::str::from_utf8(take(len)?)
                .map_err(|_| UuidDecodeError::BadName)?
                .to_string();
            let g = Generation::from_raw(u64_of(take(8)?));
            if take(1)?[0] != 0 {
                set.crashed_primary.insert(name.clone());
            }
            if take(1)?[0] != 0 {
                set.uncertain_peers.insert(name.clone());
            }
            set.bitmap.insert(name, g);
        }
        if pos != buf.len() {
            return Err(UuidDecodeError::Trailing(buf.len() - pos));
        }
        Ok(set)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_bit_is_ignored_in_comparison() {
        assert_eq!(Generation::from_raw(0xABCD), Generation::from_raw(0xABCC));
        let mut r = SplitMix64::new(1);
        for _ in 0..1000 {
            let g = Generation::fresh(&mut r.as_fn());
            assert_eq!(g.raw() & 1, 0);
            assert!(!g.is_zero() && !g.is_just_created());
        }
    }

    #[test]
    fn new_generation_is_created_on_first_write_after_promotion_while_disconnected() {
        let mut rng = SplitMix64::new(7);
        let g0 = Generation::from_raw(0x100);
        let mut s = UuidSet::day0(g0);
        s.on_promote(true);
        assert_eq!(s.current, g0, "promotion alone creates nothing");
        let g1 = s.before_write(&["hv2"], &mut rng.as_fn()).unwrap();
        assert_ne!(g1, g0);
        assert_eq!(s.current, g1);
        assert_eq!(
            s.bitmap_for("hv2"),
            g0,
            "old current -> bitmap slot of the disconnected peer"
        );
        assert_eq!(s.history[0], g0);
        assert_eq!(
            s.before_write(&["hv2"], &mut rng.as_fn()),
            None,
            "only once"
        );
    }

    #[test]
    fn promotion_with_all_peers_connected_creates_no_generation() {
        let mut rng = SplitMix64::new(7);
        let mut s = UuidSet::day0(Generation::from_raw(0x100));
        s.on_promote(false);
        assert_eq!(s.before_write(&[], &mut rng.as_fn()), None);
    }

    #[test]
    fn primary_losing_a_peer_arms_a_new_generation_but_not_when_the_peer_was_primary() {
        let mut s = UuidSet::day0(Generation::from_raw(0x100));
        s.on_peer_lost(true, true);
        assert!(!s.new_generation_pending, "dual-primary: no new generation");
        s.on_peer_lost(false, false);
        assert!(!s.new_generation_pending, "secondary: no new generation");
        s.on_peer_lost(true, false);
        assert!(s.new_generation_pending);
    }

    #[test]
    fn an_existing_bitmap_slot_keeps_its_older_generation() {
        let mut rng = SplitMix64::new(3);
        let g0 = Generation::from_raw(0x100);
        let mut s = UuidSet::day0(g0);
        s.new_generation_pending = true;
        s.before_write(&["hv2"], &mut rng.as_fn());
        s.new_generation_pending = true;
        s.before_write(&["hv2"], &mut rng.as_fn());
        assert_eq!(s.bitmap_for("hv2"), g0, "bits still count against g0");
    }

    #[test]
    fn a_peer_lost_behind_the_current_counts_from_the_generation_it_held() {
        use crate::role::Protocol;
        use crate::sync_decision::{decide, DecisionContext, Rule, SyncOutcome};
        let mut rng = SplitMix64::new(9);
        let g0 = Generation::from_raw(0x100);
        // hv1 (Primary) loses hv3 and starts g1 while it still counts hv2, whose link died
        // silently: hv2 never hears of g1. Then hv1 loses hv2 at g1.
        let mut hv1 = UuidSet::day0(g0);
        hv1.on_promote(false);
        hv1.on_peer_lost(true, false);
        let g1 = hv1.before_write(&["hv3"], &mut rng.as_fn()).unwrap();
        hv1.on_peer_lost(true, false);
        hv1.on_peer_lost_behind("hv2", g0);
        assert_eq!((hv1.current, hv1.bitmap_for("hv2")), (g1, g0));
        let mut later = hv1.clone();
        later.new_generation_pending = true;
        later.before_write(&["hv3"], &mut rng.as_fn()).unwrap();
        later.on_peer_lost_behind("hv3", g1);
        assert_eq!(later.bitmap_for("hv3"), g0, "a slot in use is kept");
        let mut up_to_date = UuidSet::day0(g0);
        up_to_date.on_promote(false);
        up_to_date.on_peer_lost_behind("hv2", g0);
        assert_eq!(
            up_to_date.bitmap_for("hv2"),
            Generation::ZERO,
            "it held the current"
        );
        let mut unknown = hv1.clone();
        unknown.bitmap.clear();
        unknown.on_peer_lost_behind("hv2", Generation::from_raw(0x9990));
        assert_eq!(
            unknown.bitmap_for("hv2"),
            Generation::ZERO,
            "not of this line"
        );
        // A generation followed as a Secondary is another Primary's: no slot from it.
        let mut follower = UuidSet::day0(g0);
        follower.follow_new_current(Generation::from_raw(0x300));
        follower.on_promote(false);
        follower.on_peer_lost_behind("hv2", g0);
        assert_eq!(
            follower.bitmap_for("hv2"),
            Generation::ZERO,
            "g0 is not its own"
        );
        // hv2 takes over at g0 without hv1 and writes: both bitmaps count from g0.
        let mut hv2 = UuidSet::day0(g0);
        hv2.on_promote(true);
        hv2.before_write(&["hv1"], &mut rng.as_fn()).unwrap();
        let ctx = DecisionContext {
            local_name: "hv1",
            peer_name: "hv2",
            protocol: Protocol::C,
        };
        let d = decide(&hv1, &hv2, &ctx);
        assert_eq!(
            (d.outcome, d.rule),
            (
                SyncOutcome::SplitBrainAutoRecoverable,
                Rule::EqualBitmapUuids
            ),
            "both bitmaps count from g0: a bitmap resync can repair it"
        );
    }

    #[test]
    fn a_secondary_following_a_new_generation_drops_its_slots() {
        let (g0, old_slot, g1) = (
            Generation::from_raw(0x100),
            Generation::from_raw(0x50),
            Generation::from_raw(0x200),
        );
        let mut s = UuidSet::day0(g0);
        s.bitmap.insert("hv2".into(), old_slot);
        s.follow_new_current(g1);
        assert_eq!(s.current, g1);
        assert_eq!(
            s.bitmap.get("hv2"),
            Some(&Generation::ZERO),
            "slot dropped (its bitmap misses the Primary's writes), peer kept"
        );
        assert_eq!(s.history, vec![g0, old_slot]);
    }

    #[test]
    fn resync_target_adopts_the_source_set() {
        let mut rng = SplitMix64::new(5);
        let g0 = Generation::from_raw(0x100);
        let mut src = UuidSet::day0(g0);
        src.new_generation_pending = true;
        src.before_write(&["b"], &mut rng.as_fn());
        let mut tgt = UuidSet::day0(g0);
        tgt.bitmap.insert("c".into(), Generation::from_raw(0x50));
        tgt.finish_resync_as_target("b", "a", &src, &["a", "c"]);
        assert!(tgt.is_uncertain_for("c") && !tgt.is_uncertain_for("a"));
        src.finish_resync_as_source("b");
        assert_eq!(tgt.current, src.current);
        assert!(tgt.history_contains(g0));
        assert!(tgt.history_contains(Generation::from_raw(0x50)));
        assert_eq!(tgt.bitmap_for("c"), Generation::ZERO);
        assert_eq!(src.bitmap_for("b"), Generation::ZERO);
        assert!(tgt.history.len() <= HISTORY_LEN);
    }

    #[test]
    fn wire_encoding_round_trips_and_rejects_malformed_input_without_panicking() {
        let mut s = UuidSet::day0(Generation::from_raw(0xABC0));
        s.history = vec![Generation::from_raw(0x10), Generation::from_raw(0x20)];
        s.bitmap.insert("hv2".into(), Generation::from_raw(0x10));
        s.bitmap.insert("hv3".into(), Generation::ZERO);
        s.crashed_primary.insert("hv3".into());
        s.uncertain_peers.insert("hv2".into());
        s.flags.primary_lost_quorum = true;
        let bytes = s.to_wire();
        assert_eq!(UuidSet::from_wire(&bytes).unwrap(), s);
        for cut in 0..bytes.len() {
            assert!(UuidSet::from_wire(&bytes[..cut]).is_err());
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(
            UuidSet::from_wire(&longer),
            Err(UuidDecodeError::Trailing(1))
        );
        let mut rng = SplitMix64::new(11);
        for _ in 0..20000 {
            let mut b = bytes.clone();
            let at = (rng.next_u64() % b.len() as u64) as usize;
            b[at] = rng.next_u64() as u8;
            let _ = UuidSet::from_wire(&b);
        }
    }

    #[test]
    fn an_outdated_replica_attaches_as_outdated_until_a_resync_makes_it_current() {
        let mut s = UuidSet::day0(Generation::from_raw(0x100));
        s.mark_outdated();
        assert_eq!(
            crate::role::disk_state_at_attach(&s),
            crate::role::DiskState::Outdated
        );
        let src = UuidSet::day0(Generation::from_raw(0x200));
        s.finish_resync_as_target("a", "b", &src, &[]);
        assert_eq!(
            crate::role::disk_state_at_attach(&s),
            crate::role::DiskState::Consistent
        );
    }

    #[test]
    fn a_replica_that_took_over_moved_on_from_the_one_it_replaced_and_not_back() {
        let mut rng = SplitMix64::new(7);
        let day0 = Generation::from_raw(0x100);
        let old_primary = UuidSet::day0(day0);
        // The other replica takes over while the old Primary is cut off and writes.
        let mut taken_over = UuidSet::day0(day0);
        taken_over.on_promote(true);
        let g1 = taken_over
            .before_write(&["hv1"], &mut rng.as_fn())
            .expect("a new generation");
        assert_eq!(taken_over.lineage(), vec![g1, day0]);
        assert!(moved_on_from(&taken_over.lineage(), old_primary.current));
        assert!(!moved_on_from(&old_primary.lineage(), taken_over.current));
        // Equal generations, an unknown one, and an empty lineage are not "moved on".
        assert!(!moved_on_from(&old_primary.lineage(), day0));
        assert!(!moved_on_from(
            &taken_over.lineage(),
            Generation::from_raw(0x999)
        ));
        assert!(!moved_on_from(&[], day0));
    }

    #[test]
    fn history_is_bounded_and_newest_first() {
        let mut s = UuidSet::day0(Generation::from_raw(2));
        for i in 1..100u64 {
            s.push_history(Generation::from_raw(i * 16));
        }
        assert_eq!(s.history.len(), HISTORY_LEN);
        assert_eq!(s.history[0], Generation::from_raw(99 * 16));
    }
}
