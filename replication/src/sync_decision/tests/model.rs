//! Randomized comparison of the UUID-based decision against a reference model of the data.
//!
//! The model runs 2–3 nodes through seeded random events (write on the Primary, promote,
//! demote, disconnect, connect, crash of a node, restart) and tracks what the UUIDs cannot
//! lie about: each node's actual disk (a block -> write-id map), the set of writes it holds,
//! which writes were acknowledged, and the per-peer out-of-sync blocks (as the engine would
//! set them, including the activity-log blocks ORed in after a crash). At every connect it
//! asks [`decide`] (both ways: the two answers must mirror each other) and checks:
//!
//! - no sync => both disks are identical;
//! - a resync direction never overwrites an acknowledged write only the target holds;
//! - after a (bitmap or full) resync the target's disk equals the source's, i.e. the bitmaps
//!   covered every difference;
//! - divergence (each side holds an acknowledged write the other lacks) is always reported
//!   as split brain.
//!
//! A sixth of the sequences run three nodes with quorum on (majority), a sixth two data
//! nodes plus a diskless witness (tiebreaker) with quorum on: promotion needs quorum and
//! UpToDate data (a Primary with quorum outdates, through the witness, a data node that no
//! longer receives its writes), a Primary without quorum freezes, and no split brain may
//! ever be reported.
//!
//! Model choices: protocol C (the only protocol that acknowledges nothing the peer lacks;
//! the A/B crash directions are table-tested); a write needs every node of its Primary's
//! connected component to be connected to every other (a clique): DRBD's 3-node
//! secondary-to-secondary peer-ack bookkeeping is not modelled, writes simply wait. A crash
//! of a Primary may leave one in-flight (unacknowledged) write on its own disk, on its
//! peers' disks, on both, or nowhere. Split brains are resolved sometimes by a random
//! policy, sometimes manually, which discards the victim's own writes (by choice).
//! On failure the seed is printed; rerun one seed with `TANDEM_MODEL_SEED=<seed>`.
//! `TANDEM_MODEL_RUNS` (default 6000) and `TANDEM_MODEL_STEPS` (default 150) scale it up.

use super::super::*;
use crate::generation::{SplitMix64, UuidSet};
use std::collections::{BTreeMap, BTreeSet};

const BLOCKS: usize = 16;

#[derive(Clone, Debug)]
struct Node {
    name: String,
    up: bool,
    primary: bool,
    promoted_at: Option<u64>,
    uuids: UuidSet,
    disk: Vec<u64>,
    writes: BTreeSet<u64>,
    out_of_sync: BTreeMap<String, BTreeSet<usize>>,
    /// A diskless tiebreaker (witness): votes, stores nothing, never Primary.
    diskless: bool,
    /// Told (through a path the Primary can reach) that it no longer receives writes.
    outdated: bool,
}

struct World {
    rng: SplitMix64,
    gens: SplitMix64,
    nodes: Vec<Node>,
    links: BTreeSet<(usize, usize)>,
    acked: BTreeSet<u64>,
    next_write: u64,
    tick: u64,
    log: Vec<String>,
    stats: Stats,
    /// Quorum on (majority of 3 replicas): promotion and writes need it.
    quorum: bool,
    had_quorum: Vec<bool>,
}

#[derive(Default, Debug, Clone, Copy)]
struct Stats {
    no_sync: u64,
    bitmap: u64,
    full: u64,
    split_auto: u64,
    split: u64,
    unrelated: u64,
}

fn key(a: usize, b: usize) -> (usize, usize) {
    (a.min(b), a.max(b))
}

impl World {
    fn new(seed: u64, n: usize, quorum: bool, witness: bool) -> World {
        let day0 = crate::generation::Generation::from_raw(0xDA70);
        let names: Vec<String> = (0..n).map(|i| format!("n{i}")).collect();
        let data_names: Vec<String> = names
            .iter()
            .take(if witness { n - 1 } else { n })
            .cloned()
            .collect();
        let nodes = names
            .iter()
            .enumerate()
            .map(|(i, name)| Node {
                diskless: witness && i == n - 1,
                outdated: false,
                name: name.clone(),
                up: true,
                primary: false,
                promoted_at: None,
                uuids: UuidSet::day0(day0),
                disk: vec![0; BLOCKS],
                writes: BTreeSet::new(),
                out_of_sync: data_names
                    .iter()
                    .filter(|o| *o != name)
                    .map(|o| (o.clone(), BTreeSet::new()))
                    .collect(),
            })
            .collect();
        let mut links = BTreeSet::new();
        for a in 0..n {
            for b in a + 1..n {
                links.insert((a, b));
            }
        }
        World {
            rng: SplitMix64::new(seed),
            gens: SplitMix64::new(seed ^ 0x5EED),
            nodes,
            links,
            acked: BTreeSet::new(),
            next_write: 1,
            tick: 0,
            quorum,
            had_quorum: vec![true; n],
            log: Vec::new(),
            stats: Stats::default(),
        }
    }

    fn pick(&mut self, n: usize) -> usize {
        (self.rng.next_u64() % n as u64) as usize
    }

    fn connected(&self, a: usize, b: usize) -> bool {
        self.links.contains(&key(a, b))
    }

    fn neighbours(&self, a: usize) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&b| b != a && self.connected(a, b))
            .collect()
    }

    fn data_neighbours(&self, a: usize) -> Vec<usize> {
        self.neighbours(a)
            .into_iter()
            .filter(|&b| !self.nodes[b].diskless)
            .collect()
    }

    /// The data nodes connected to `a` through data links (who receives its writes).
    fn data_component(&self, a: usize) -> BTreeSet<usize> {
        let mut seen = BTreeSet::from([a]);
        let mut todo = vec![a];
        while let Some(x) = todo.pop() {
            for y in self.data_neighbours(x) {
                if seen.insert(y) {
                    todo.push(y);
                }
            }
        }
        seen
    }

    /// Everything reachable from `a`, also through the witness (who knows who is Primary).
    fn component(&self, a: usize) -> BTreeSet<usize> {
        let mut seen = BTreeSet::from([a]);
        let mut todo = vec![a];
        while let Some(x) = todo.pop() {
            for y in self.neighbours(x) {
                if seen.insert(y) {
                    todo.push(y);
                }
            }
        }
        seen
    }

    fn has_quorum(&self, a: usize) -> bool {
        if !self.quorum {
            return true;
        }
        let members: Vec<crate::quorum::Member> = (0..self.nodes.len())
            .map(|x| crate::quorum::Member {
                name: self.nodes[x].name.clone(),
                diskful: !self.nodes[x].diskless,
                status: if x == a || self.connected(a, x) {
                    crate::quorum::MemberStatus::Reachable
                } else {
                    crate::quorum::MemberStatus::Unknown
                },
            })
            .collect();
        crate::quorum::evaluate(
            crate::quorum::QuorumMode::Majority,
            &members,
            self.had_quorum[a],
        )
        .has_quorum
    }

    fn update_quorum(&mut self) {
        for a in 0..self.nodes.len() {
            let q = self.nodes[a].up && self.has_quorum(a);
            if self.had_quorum[a] && !q && self.nodes[a].primary {
                self.nodes[a].uuids.on_quorum_lost(true);
                self.log.push(format!("n{a} lost quorum (I/O frozen)"));
            }
            self.had_quorum[a] = q;
        }
        // A Primary with quorum outdates, through any path, the data nodes that no longer
        // receive its writes (DRBD's cluster-wide state change).
        for p in 0..self.nodes.len() {
            if !(self.nodes[p].primary && self.had_quorum[p]) {
                continue;
            }
            let receivers = self.data_component(p);
            for d in self.component(p) {
                if !self.nodes[d].diskless && !receivers.contains(&d) && !self.nodes[d].outdated {
                    self.nodes[d].outdated = true;
                    self.log.push(format!("n{d} outdated by n{p}"));
                }
            }
        }
    }

    fn disconnected_names(&self, a: usize) -> Vec<String> {
        (0..self.nodes.len())
            .filter(|&b| b != a && !self.nodes[b].diskless && !self.connected(a, b))
            .map(|b| self.nodes[b].name.clone())
            .collect()
    }

    fn disconnect(&mut self, a: usize, b: usize) {
        if !self.connected(a, b) {
            return;
        }
        let before = self.data_component(a);
        let data_link = !self.nodes[a].diskless && !self.nodes[b].diskless;
        self.links.remove(&key(a, b));
        // Cluster-wide state change: a Primary learns when any replica leaves the set of
        // nodes receiving its writes, not only when its own link breaks.
        for p in before {
            if data_link && self.nodes[p].primary {
                self.nodes[p].uuids.on_peer_lost(true, false);
            }
        }
        self.log.push(format!("disconnect n{a} n{b}"));
    }

    /// Issue a write on Primary `p` to every node of its component (a clique). Returns the
    /// write id, or None when writes must wait.
    fn write(&mut self, p: usize, fate: Fate) -> Option<u64> {
        if self.quorum && !self.had_quorum[p] {
            return None; // frozen: on-no-quorum suspend-io
        }
        let comp = self.data_component(p);
        for &x in &comp {
            for &y in &comp {
                if x < y && !self.connected(x, y) {
                    return None;
                }
            }
        }
        let disc: Vec<String> = self.disconnected_names(p);
        let disc_refs: Vec<&str> = disc.iter().map(String::as_str).collect();
        let mut gens = self.gens.clone();
        let new_gen = self.nodes[p]
            .uuids
            .before_write(&disc_refs, &mut gens.as_fn());
        self.gens = gens;
        if let Some(g) = new_gen {
            for &r in comp.iter().filter(|&&r| r != p) {
                self.nodes[r].uuids.follow_new_current(g);
            }
        }
        let w = self.next_write;
        self.next_write += 1;
        let block = self.pick(BLOCKS);
        for &r in &comp {
            let reaches = match fate {
                Fate::Acked => true,
                Fate::LocalOnly => r == p,
                Fate::PeersOnly => r != p,
                Fate::Nowhere => false,
            };
            if !reaches {
                continue;
            }
            self.nodes[r].disk[block] = w;
            self.nodes[r].writes.insert(w);
            if r != p {
                // As in the engine, a Secondary marks nothing for third peers, except the
                // tail of a Primary it loses (`replica/reconcile.rs`): an unacknowledged
                // write is such a tail (its Primary crashes), marked for every other peer.
                if fate != Fate::Acked {
                    let lost = self.nodes[p].name.clone();
                    for (peer, set) in self.nodes[r].out_of_sync.iter_mut() {
                        if *peer != lost {
                            set.insert(block);
                        }
                    }
                }
                continue;
            }
            for other in self.disconnected_names(r) {
                self.nodes[r]
                    .out_of_sync
                    .get_mut(&other)
                    .expect("slot")
                    .insert(block);
            }
        }
        if fate != Fate::Acked {
            // The crashed Primary's activity log covered this block: apply-al on restart
            // sets it in every peer bitmap of the Primary.
            for set in self.nodes[p].out_of_sync.values_mut() {
                set.insert(block);
            }
        } else {
            self.acked.insert(w);
        }
        self.log
            .push(format!("write w{w} block {block} on n{p} ({fate:?})"));
        Some(w)
    }

    fn crash(&mut self, a: usize) {
        if self.nodes[a].primary {
            let fate = match self.pick(4) {
                0 => Fate::LocalOnly,
                1 => Fate::PeersOnly,
                2 => Fate::Nowhere,
                _ => Fate::Acked,
            };
            if fate != Fate::Acked {
                self.write(a, fate);
            }
            // The primary indicator was durable: on restart it is a crashed Primary.
            let peers: Vec<String> = self.nodes[a].out_of_sync.keys().cloned().collect();
            let peers: Vec<&str> = peers.iter().map(String::as_str).collect();
            self.nodes[a].uuids.mark_crashed_primary(&peers);
            // Some extra hot extents: apply-al may resync more than the in-flight block.
            let extra = self.pick(BLOCKS);
            for set in self.nodes[a].out_of_sync.values_mut() {
                set.insert(extra);
            }
        }
        for b in self.neighbours(a) {
            self.disconnect(a, b);
        }
        let node = &mut self.nodes[a];
        node.up = false;
        node.primary = false;
        node.uuids.flags.primary = false;
        node.uuids.new_generation_pending = false;
        self.log.push(format!("crash n{a}"));
    }

    fn connect(&mut self, a: usize, b: usize) -> Result<(), String> {
        let mut joined = self.component(a);
        joined.extend(self.component(b));
        if joined.iter().filter(|&&x| self.nodes[x].primary).count() > 1 {
            return Ok(()); // would put two Primaries in one component
        }
        if self.nodes[a].diskless || self.nodes[b].diskless {
            self.links.insert(key(a, b));
            self.log.push(format!("connect n{a} n{b} (witness link)"));
            return Ok(());
        }
        let ctx_ab = DecisionContext {
            local_name: &self.nodes[a].name,
            peer_name: &self.nodes[b].name,
            protocol: Protocol::C,
        };
        let ctx_ba = DecisionContext {
            local_name: &self.nodes[b].name,
            peer_name: &self.nodes[a].name,
            protocol: Protocol::C,
        };
        let d = decide(&self.nodes[a].uuids, &self.nodes[b].uuids, &ctx_ab);
        let m = decide(&self.nodes[b].uuids, &self.nodes[a].uuids, &ctx_ba);
        self.log
            .push(format!("connect n{a} n{b}: {:?} by {}", d.outcome, d.rule));
        if m.outcome != d.outcome.mirrored() {
            return Err(format!(
                "asymmetric decision: n{a}->n{b} {:?} by {}, n{b}->n{a} {:?} by {}",
                d.outcome, d.rule, m.outcome, m.rule
            ));
        }
        let acked_a: BTreeSet<u64> = self.nodes[a]
            .writes
            .intersection(&self.acked)
            .copied()
            .collect();
        let acked_b: BTreeSet<u64> = self.nodes[b]
            .writes
            .intersection(&self.acked)
            .copied()
            .collect();
        let diverged = !acked_a.is_subset(&acked_b) && !acked_b.is_subset(&acked_a);
        match d.outcome {
            SyncOutcome::NoSync => {
                self.stats.no_sync += 1;
                if self.nodes[a].disk != self.nodes[b].disk {
                    return Err(format!(
                        "no sync decided by {} but disks differ: n{a}={:?} n{b}={:?}",
                        d.rule, self.nodes[a].disk, self.nodes[b].disk
                    ));
                }
                let (na, nb) = (self.nodes[a].name.clone(), self.nodes[b].name.clone());
                self.nodes[a].uuids.in_sync_with(&nb);
                self.nodes[b].uuids.in_sync_with(&na);
                self.nodes[a]
                    .out_of_sync
                    .get_mut(&nb)
                    .expect("slot")
                    .clear();
                self.nodes[b]
                    .out_of_sync
                    .get_mut(&na)
                    .expect("slot")
                    .clear();
                let outdated = self.nodes[a].outdated && self.nodes[b].outdated;
                self.nodes[a].outdated = outdated;
                self.nodes[b].outdated = outdated;
                self.links.insert(key(a, b));
                Ok(())
            }
            SyncOutcome::BitmapResync(dir) | SyncOutcome::FullSync(dir) => {
                let full = matches!(d.outcome, SyncOutcome::FullSync(_));
                if full {
                    self.stats.full += 1;
                } else {
                    self.stats.bitmap += 1;
                }
                if diverged {
                    return Err(format!(
                        "diverged replicas (n{a} acked {acked_a:?}, n{b} acked {acked_b:?}) but {} decided {:?}",
                        d.rule, d.outcome
                    ));
                }
                let (s, t) = match dir {
                    Direction::LocalIsSource => (a, b),
                    Direction::LocalIsTarget => (b, a),
                };
                let lost: Vec<u64> = self.nodes[t]
                    .writes
                    .intersection(&self.acked)
                    .filter(|w| !self.nodes[s].writes.contains(w))
                    .copied()
                    .collect();
                if !lost.is_empty() {
                    return Err(format!(
                        "{} makes n{t} SyncTarget of n{s} and loses acknowledged writes {lost:?}",
                        d.rule
                    ));
                }
                self.resync(s, t, full, &d)
            }
            SyncOutcome::SplitBrainAutoRecoverable => {
                self.stats.split_auto += 1;
                self.resolve(a, b, d, true)
            }
            SyncOutcome::SplitBrainDisconnect => {
                self.stats.split += 1;
                self.resolve(a, b, d, false)
            }
            SyncOutcome::UnrelatedData => {
                self.stats.unrelated += 1;
                Ok(())
            }
        }
    }

    fn resolve(&mut self, a: usize, b: usize, d: SyncDecision, auto: bool) -> Result<(), String> {
        let (na, nb) = (self.nodes[a].name.clone(), self.nodes[b].name.clone());
        let victim = if auto {
            let policy = AfterSplitBrain::ALL[self.pick(AfterSplitBrain::ALL.len())];
            let side = |n: &Node, other: &str| SplitBrainSide {
                changed_blocks: n.out_of_sync[other].len() as u64,
                promoted_at: n.promoted_at,
                is_primary_now: n.primary,
            };
            let la = side(&self.nodes[a], &nb);
            let lb = side(&self.nodes[b], &na);
            match resolve_split_brain(policy, &la, &lb) {
                SplitBrainResolution::Disconnect => None,
                SplitBrainResolution::DiscardLocal => Some(a),
                SplitBrainResolution::DiscardPeer => Some(b),
            }
        } else {
            None
        };
        let victim = match victim {
            Some(v) => Some(v),
            // The operator resolves by hand half of the time, on a non-Primary.
            None if self.pick(2) == 0 => {
                let v = if self.pick(2) == 0 { a } else { b };
                (!self.nodes[v].primary).then_some(v)
            }
            None => None,
        };
        let Some(t) = victim else {
            return Ok(());
        };
        let s = if t == a { b } else { a };
        let outcome = resolve_manually(d, t == a).map_err(|e| e.to_string())?;
        let full = matches!(outcome, SyncOutcome::FullSync(_));
        // The victim's own writes are discarded by choice.
        let discarded: Vec<u64> = self.nodes[t]
            .writes
            .difference(&self.nodes[s].writes)
            .copied()
            .collect();
        for w in discarded {
            self.acked.remove(&w);
        }
        self.log.push(format!("resolve: n{t} discards its data"));
        self.resync(s, t, full, &d)
    }

    fn resync(&mut self, s: usize, t: usize, full: bool, d: &SyncDecision) -> Result<(), String> {
        if self.nodes[t].primary {
            return Ok(()); // DRBD's rr-conflict: a Primary never becomes SyncTarget
        }
        for x in self.data_neighbours(t) {
            self.disconnect(t, x);
        }
        let (ns, nt) = (self.nodes[s].name.clone(), self.nodes[t].name.clone());
        let blocks: BTreeSet<usize> = if full {
            (0..BLOCKS).collect()
        } else {
            self.nodes[s].out_of_sync[&nt]
                .union(&self.nodes[t].out_of_sync[&ns])
                .copied()
                .collect()
        };
        // Checksum-based resync: only blocks whose content differs are written.
        let mut changed_any = false;
        for &blk in &blocks {
            if self.nodes[t].disk[blk] == self.nodes[s].disk[blk] {
                continue;
            }
            changed_any = true;
            self.nodes[t].disk[blk] = self.nodes[s].disk[blk];
            // Resync writes are writes: peers of the target that do not see them get bits.
            for (peer, set) in self.nodes[t].out_of_sync.iter_mut() {
                if *peer != ns {
                    set.insert(blk);
                }
            }
        }
        if self.nodes[t].disk != self.nodes[s].disk {
            return Err(format!(
                "after {} resync by {} n{t} differs from n{s}: {:?} vs {:?} (resynced {blocks:?})",
                if full { "full" } else { "bitmap" },
                d.rule,
                self.nodes[t].disk,
                self.nodes[s].disk
            ));
        }
        self.nodes[t].writes = self.nodes[s].writes.clone();
        let src_uuids = self.nodes[s].uuids.clone();
        let all: Vec<String> = if changed_any {
            self.nodes.iter().map(|n| n.name.clone()).collect()
        } else {
            Vec::new()
        };
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        self.nodes[t]
            .uuids
            .finish_resync_as_target(&nt, &ns, &src_uuids, &all);
        self.nodes[s].uuids.finish_resync_as_source(&nt);
        self.nodes[s]
            .out_of_sync
            .get_mut(&nt)
            .expect("slot")
            .clear();
        self.nodes[t]
            .out_of_sync
            .get_mut(&ns)
            .expect("slot")
            .clear();
        self.nodes[t].outdated = self.nodes[s].outdated;
        self.links.insert(key(s, t));
        Ok(())
    }

    fn step(&mut self) -> Result<(), String> {
        self.tick += 1;
        let n = self.nodes.len();
        let a = self.pick(n);
        let b = (a + 1 + self.pick(n - 1)) % n;
        match self.pick(10) {
            _ if self.nodes[a].diskless && self.pick(2) == 0 => {
                // The witness only connects, disconnects, crashes and restarts.
                match self.pick(3) {
                    0 => self.disconnect(a, b),
                    1 => {
                        if self.nodes[a].up && self.nodes[b].up && !self.connected(a, b) {
                            self.connect(a, b)?;
                        }
                    }
                    _ => {
                        self.nodes[a].up = !self.nodes[a].up;
                        if !self.nodes[a].up {
                            for x in self.neighbours(a) {
                                self.disconnect(a, x);
                            }
                        }
                    }
                }
            }
            0..=3 => {
                if self.nodes[a].up && self.nodes[a].primary {
                    self.write(a, Fate::Acked);
                }
            }
            4 => {
                let comp = self.component(a);
                if self.nodes[a].up
                    && !self.nodes[a].diskless
                    && !self.nodes[a].outdated
                    && !self.nodes[a].primary
                    && !comp.iter().any(|&x| self.nodes[x].primary)
                    && self.has_quorum(a)
                {
                    let any_disc = !self.disconnected_names(a).is_empty();
                    self.nodes[a].uuids.on_promote(any_disc);
                    self.nodes[a].primary = true;
                    self.nodes[a].promoted_at = Some(self.tick);
                    self.log.push(format!("promote n{a}"));
                }
            }
            5 => {
                if self.nodes[a].primary {
                    self.nodes[a].primary = false;
                    self.nodes[a].uuids.on_demote();
                    self.log.push(format!("demote n{a}"));
                }
            }
            6 => self.disconnect(a, b),
            7 | 8 => {
                if self.nodes[a].up && self.nodes[b].up && !self.connected(a, b) {
                    self.connect(a, b)?;
                }
            }
            _ => {
                if self.nodes[a].up {
                    if self.pick(3) == 0 {
                        self.crash(a);
                    }
                } else {
                    self.nodes[a].up = true;
                    self.log.push(format!("restart n{a}"));
                }
            }
        }
        self.update_quorum();
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Acked,
    LocalOnly,
    PeersOnly,
    Nowhere,
}

fn run(seed: u64) -> Result<Stats, String> {
    let nodes = 2 + (seed % 2) as usize;
    let steps: usize = std::env::var("TANDEM_MODEL_STEPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(150);
    // Odd seeds run three nodes: plain, with quorum, or two data nodes plus a witness.
    let variant = if nodes == 3 { (seed / 2) % 3 } else { 0 };
    let witness = variant == 2;
    let quorum = variant != 0;
    let mut w = World::new(seed, nodes, quorum, witness);
    for _ in 0..steps {
        let mut result = w.step();
        if result.is_ok() && quorum {
            let s = w.stats;
            if s.split + s.split_auto + s.unrelated > 0 {
                result = Err("split brain although quorum is on".to_string());
            }
        }
        if let Err(e) = result {
            let tail = w
                .log
                .iter()
                .rev()
                .take(40)
                .rev()
                .cloned()
                .collect::<Vec<_>>();
            return Err(format!(
                "seed {seed} ({nodes} nodes, quorum {quorum}, witness {witness}): {e}\nlast events:\n  {}",
                tail.join("\n  ")
            ));
        }
    }
    if quorum {
        let count = |pat: &str| w.log.iter().filter(|l| l.contains(pat)).count() as u64;
        QUORUM_EVENTS.with(|q| {
            let mut q = q.borrow_mut();
            q.0 += count("promote");
            q.1 += count("lost quorum");
            q.2 += count("(Acked)");
            q.3 += w.stats.bitmap;
        });
    }
    Ok(w.stats)
}

thread_local! {
    /// (promotions, quorum losses of a Primary, acknowledged writes, bitmap resyncs) in
    /// quorum runs: proof that the quorum variant exercises failover.
    static QUORUM_EVENTS: std::cell::RefCell<(u64, u64, u64, u64)> =
        const { std::cell::RefCell::new((0, 0, 0, 0)) };
}

#[test]
fn randomized_uuid_decisions_never_lose_acknowledged_writes_and_detect_divergence() {
    if let Ok(seed) = std::env::var("TANDEM_MODEL_SEED") {
        let seed: u64 = seed.parse().expect("TANDEM_MODEL_SEED is a number");
        if let Err(e) = run(seed) {
            panic!("{e}");
        }
        return;
    }
    let runs: u64 = std::env::var("TANDEM_MODEL_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6000);
    let mut total = Stats::default();
    for seed in 0..runs {
        match run(seed) {
            Ok(s) => {
                total.no_sync += s.no_sync;
                total.bitmap += s.bitmap;
                total.full += s.full;
                total.split_auto += s.split_auto;
                total.split += s.split;
                total.unrelated += s.unrelated;
            }
            Err(e) => panic!("{e}\nrerun with TANDEM_MODEL_SEED={seed}"),
        }
    }
    let (promotions, losses, writes, resyncs) = QUORUM_EVENTS.with(|q| *q.borrow());
    eprintln!(
        "{runs} sequences: {total:?}; quorum runs: {promotions} promotions, \
         {losses} Primary quorum losses, {writes} acked writes, {resyncs} bitmap resyncs"
    );
    // The generator must actually reach every interesting outcome.
    assert!(total.no_sync > 100, "{total:?}");
    assert!(total.bitmap > 100, "{total:?}");
    assert!(total.split_auto > 10, "{total:?}");
    assert!(total.split + total.full > 0, "{total:?}");
    assert_eq!(total.unrelated, 0, "{total:?}");
    if runs >= 4000 {
        assert!(promotions > 100 && losses > 10 && writes > 1000 && resyncs > 50);
    }
}
