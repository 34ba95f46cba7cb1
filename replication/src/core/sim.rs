//! A deterministic simulator of one Primary replicating to one, two or three Secondaries
//! under protocol A, B or C: a [`PrimaryCore`] and a [`SecondaryCore`] per peer, links that
//! deliver in order and can be cut, disks that lose what was not flushed when their host
//! loses power, each Secondary's activity log, and the Primary's bitmap for each peer. One
//! seed drives everything: the number of peers, the protocol, the application's writes and
//! flushes, the order in which I/O completes and messages arrive, and the faults (link
//! cuts, power loss on any host).
//!
//! After the steps of a schedule it checks what the protocol promises (DRBD's semantics,
//! `DESIGN.md`):
//!
//! - **No acknowledged write is lost by a failover.** When the Primary loses power, every
//!   peer that was connected and in sync may be promoted. Under C, every write completed to
//!   the application with that peer's WriteAck reads back from it. Under B, so does every
//!   write completed with its RecvAck: the peer held it in memory, and it writes what it
//!   received once the link is gone. Protocol A promises nothing here (a write is
//!   acknowledged once queued to the peer), as documented.
//! - **A completed flush is durable on the peers (C).** Every write a peer acknowledged
//!   before a flush started is on that peer's stable storage once the flush completes with
//!   it.
//! - **Replicas are identical after resync.** The Primary's bitmap for a peer plus, after
//!   a power loss of that peer, its activity log cover every block that may differ, so
//!   copying them makes the replicas byte-identical.
//!
//! Three test-only fault switches prove the checks can fail: the Primary acknowledges
//! before its peer ([`PrimaryFaults::ack_before_peer`]), marks nothing on peer loss
//! ([`PrimaryFaults::no_bitmap_on_loss`]), or a Secondary skips its activity log
//! ([`Faults::skip_activity_log`], in this simulator's model of the Secondary's shell,
//! where the log lives).
//!
//! `TANDEM_SIM_SEEDS=N` runs N schedules (default 10,000); a failure prints the seed and
//! the one-line command that replays it (`TANDEM_SIM_SEED=S TANDEM_SIM_TRACE=1 ...`).
//!
//! ```text
//!  sim.rs         this simulator: one fixed Primary and its Secondaries
//!  sim/host.rs    the data host both simulators share: disk, activity log, Secondary shell
//!  sim/roles.rs   roles: two data nodes and a witness, promoted and demoted under faults
//! ```

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::op::Op;
use super::primary::{PeerId, PrimaryAction, PrimaryCore, PrimaryFaults, WaitId};
use crate::wire::{Message, ReplicationProtocol};

mod host;
mod roles;

use host::{units_of, Applier, Disk, Store, SIZE, UNIT, UNITS};

const PEER_NAMES: [&str; 3] = ["hv2", "hv3", "hv4"];

/// Faults of the simulator's own models.
#[derive(Debug, Default, Clone, Copy)]
struct Faults {
    primary: PrimaryFaults,
    /// The Secondaries apply requests without logging their ranges first.
    skip_activity_log: bool,
}

struct Request {
    offset: u64,
    units: Vec<usize>,
    tag: u64,
    fua: bool,
    epoch: u64,
    closes_epoch: bool,
    wait: Option<WaitId>,
    local_done: bool,
    /// Peers the request was queued to.
    sent_to: Vec<usize>,
    /// `Some(unacknowledged)` once every peer answered or was lost.
    peers_done: Option<Vec<String>>,
}

struct Flush {
    /// The peers attached when the flush started.
    to_peers: Vec<usize>,
    wait: Option<WaitId>,
    peers_done: Option<Vec<String>>,
    /// Per peer and unit, the newest tag that peer acknowledged before the flush started.
    must_be_stable: Vec<BTreeMap<usize, u64>>,
}

/// A Secondary host: its shell, disk and activity log, its link and what the Primary
/// knows of it.
struct Peer {
    name: &'static str,
    applier: Applier,
    store: Store,
    link: Option<PeerId>,
    to_peer: VecDeque<Message>,
    to_primary: VecDeque<Message>,
    /// Units the Primary's bitmap marks out of sync for this peer.
    bitmap: BTreeSet<usize>,
    /// Per unit, the newest write completed to the application with this peer's
    /// acknowledgement at the protocol's point (B: RecvAck, C: WriteAck).
    promised: BTreeMap<usize, u64>,
    /// The peer lost writes it had acknowledged (power loss) or missed some while cut off:
    /// it is not UpToDate until a resync.
    needs_resync: bool,
    crashed: bool,
}

impl Peer {
    fn new(name: &'static str) -> Peer {
        Peer {
            name,
            applier: Applier::new(),
            store: Store::new(),
            link: None,
            to_peer: VecDeque::new(),
            to_primary: VecDeque::new(),
            bitmap: BTreeSet::new(),
            promised: BTreeMap::new(),
            needs_resync: false,
            crashed: false,
        }
    }

    /// Sends go to the Primary while the link is up.
    fn send(&mut self, msgs: Vec<Message>) {
        if self.link.is_some() {
            self.to_primary.extend(msgs);
        }
    }

    /// Finish every job the core starts once the link is gone.
    fn run_to_idle(&mut self, faults: Faults) {
        self.applier
            .finish_after_link_down(&mut self.store, faults.skip_activity_log);
    }
}

struct World {
    rng: StdRng,
    faults: Faults,
    protocol: ReplicationProtocol,
    primary: PrimaryCore,
    primary_disk: Disk,
    requests: Vec<Request>,
    flushes: Vec<Flush>,
    next_tag: u64,
    peers: Vec<Peer>,
}

impl World {
    fn new(seed: u64, faults: Faults) -> World {
        let mut rng = StdRng::seed_from_u64(seed);
        let protocol = match rng.gen_range(0..10) {
            0..=5 => ReplicationProtocol::C,
            6..=7 => ReplicationProtocol::B,
            _ => ReplicationProtocol::A,
        };
        let peers: Vec<Peer> = PEER_NAMES[..rng.gen_range(1..=PEER_NAMES.len())]
            .iter()
            .map(|n| Peer::new(n))
            .collect();
        let mut primary = PrimaryCore::new(protocol, 8);
        primary.faults = faults.primary;
        let names: Vec<String> = peers.iter().map(|p| p.name.to_string()).collect();
        primary.set_known_peers(&names);
        let mut world = World {
            rng,
            faults,
            protocol,
            primary,
            primary_disk: Disk::new(),
            requests: Vec::new(),
            flushes: Vec::new(),
            next_tag: 1,
            peers,
        };
        for i in 0..world.peers.len() {
            world.connect(i);
        }
        world
    }

    fn connect(&mut self, i: usize) {
        let link = self.primary.attach_peer(self.peers[i].name);
        let p = &mut self.peers[i];
        p.link = Some(link);
        p.applier = Applier::new();
        self.primary_actions();
    }

    fn peer_index(&self, id: PeerId) -> Option<usize> {
        self.peers.iter().position(|p| p.link == Some(id))
    }

    fn any_peer(&mut self) -> usize {
        self.rng.gen_range(0..self.peers.len())
    }

    // ----- the Primary's shell -----

    fn issue_write(&mut self) {
        let start = self.rng.gen_range(0..UNITS);
        let count = self.rng.gen_range(1..=3).min(UNITS - start);
        let offset = start as u64 * UNIT;
        let len = count as u64 * UNIT;
        if !self.primary.try_claim(offset, offset + len, true) {
            return;
        }
        let tag = self.next_tag;
        self.next_tag += 1;
        let mut data = vec![0u8; len as usize];
        for u in 0..count {
            data[u * UNIT as usize..][..8].copy_from_slice(&tag.to_le_bytes());
        }
        let fua = self.rng.gen_bool(0.1);
        let op = Op::Write {
            data: Bytes::from(data),
            fua,
        };
        let sendable: Vec<PeerId> = self.peers.iter().filter_map(|p| p.link).collect();
        let sent_to = (0..self.peers.len())
            .filter(|&i| self.peers[i].link.is_some())
            .collect();
        let started = self.primary.start_request(offset, &op, &sendable);
        self.requests.push(Request {
            offset,
            units: units_of(offset, len),
            tag,
            fua,
            epoch: started.epoch,
            closes_epoch: started.closes_epoch,
            wait: started.wait,
            local_done: false,
            sent_to,
            peers_done: started.wait.is_none().then(Vec::new),
        });
        self.primary_actions();
    }

    fn issue_flush(&mut self) {
        self.primary_disk.flush();
        let to_peers: Vec<usize> = (0..self.peers.len())
            .filter(|&i| self.peers[i].link.is_some())
            .collect();
        let must_be_stable = self.peers.iter().map(|p| p.promised.clone()).collect();
        let wait = self
            .primary
            .start_flush(self.protocol == ReplicationProtocol::C);
        self.flushes.push(Flush {
            to_peers,
            wait,
            peers_done: wait.is_none().then(Vec::new),
            must_be_stable,
        });
        self.primary_actions();
    }

    fn complete_local(&mut self) {
        let pending: Vec<usize> = (0..self.requests.len())
            .filter(|&i| !self.requests[i].local_done)
            .collect();
        if let Some(&i) = pending.get(self.rng.gen_range(0..pending.len().max(1))) {
            let r = &mut self.requests[i];
            r.local_done = true;
            self.primary_disk.write(&r.units, r.tag, r.fua);
        }
        self.finish_requests();
    }

    /// Complete every request whose local write and peers are done.
    fn finish_requests(&mut self) {
        while let Some(i) = self
            .requests
            .iter()
            .position(|r| r.local_done && r.peers_done.is_some())
        {
            let r = self.requests.swap_remove(i);
            let lost = r.peers_done.clone().unwrap_or_default();
            if self.protocol != ReplicationProtocol::A {
                for &p in &r.sent_to {
                    let peer = &mut self.peers[p];
                    if !lost.iter().any(|l| l == peer.name) {
                        for &u in &r.units {
                            peer.promised.insert(u, r.tag);
                        }
                    }
                }
            }
            if r.closes_epoch {
                self.primary.request_finished(r.epoch);
            }
            self.primary.release(r.offset);
            self.primary_actions();
        }
    }

    fn primary_actions(&mut self) {
        while let Some(action) = self.primary.poll_action() {
            match action {
                PrimaryAction::SendRequest { peer, msg } | PrimaryAction::Send { peer, msg } => {
                    if let Some(i) = self.peer_index(peer) {
                        self.peers[i].to_peer.push_back(msg);
                    }
                }
                PrimaryAction::OutOfSync { peer, offset, len } => {
                    if let Some(p) = self.peers.iter_mut().find(|p| p.name == peer) {
                        p.bitmap.extend(units_of(offset, len));
                    }
                }
                PrimaryAction::PeersDone {
                    wait,
                    unacknowledged,
                } => {
                    if let Some(r) = self.requests.iter_mut().find(|r| r.wait == Some(wait)) {
                        r.peers_done = Some(unacknowledged);
                    } else if let Some(f) = self.flushes.iter_mut().find(|f| f.wait == Some(wait)) {
                        f.peers_done = Some(unacknowledged);
                    }
                }
                PrimaryAction::Reject { reason, .. } => {
                    panic!("primary rejected its peer: {reason}")
                }
                PrimaryAction::Extension { .. } => {}
            }
        }
    }

    // ----- the Secondaries' shells -----

    fn deliver_to_peer(&mut self, i: usize) -> Result<(), String> {
        let p = &mut self.peers[i];
        let Some(msg) = p.to_peer.pop_front() else {
            return Ok(());
        };
        p.applier
            .core
            .handle_message(msg, SIZE)
            .map_err(|e| format!("{} refused a valid message: {e}", p.name))?;
        let sends = p
            .applier
            .actions(&mut p.store, self.faults.skip_activity_log);
        p.send(sends);
        Ok(())
    }

    fn complete_peer_job(&mut self, i: usize) {
        let p = &mut self.peers[i];
        if p.applier.running.is_empty() {
            return;
        }
        let index = self.rng.gen_range(0..p.applier.running.len());
        let sends = p
            .applier
            .complete(index, &mut p.store, self.faults.skip_activity_log);
        p.send(sends);
    }

    fn deliver_to_primary(&mut self, i: usize) {
        let p = &mut self.peers[i];
        let (Some(link), Some(msg)) = (p.link, p.to_primary.pop_front()) else {
            return;
        };
        self.primary.handle_peer_message(link, msg);
        self.primary_actions();
        self.finish_requests();
    }

    // ----- faults -----

    fn cut_link(&mut self, i: usize) {
        let p = &mut self.peers[i];
        let Some(link) = p.link.take() else {
            return;
        };
        p.to_peer.clear();
        p.to_primary.clear();
        // The Secondary's shell finishes what its core still starts once the link is gone.
        p.run_to_idle(self.faults);
        p.needs_resync = true;
        self.primary.handle_link_down(link);
        self.primary_actions();
        self.finish_requests();
    }

    fn peer_loses_power(&mut self, i: usize) {
        self.peers[i].applier = Applier::new();
        self.cut_link(i);
        let p = &mut self.peers[i];
        p.store.disk.lose_power(&mut self.rng);
        p.crashed = true;
    }

    /// The Primary loses power: every peer that was connected and in sync may be promoted,
    /// once its shell finished what it had received. False if none could be (the schedule
    /// goes on).
    fn failover(&mut self) -> Result<bool, String> {
        let mut any = false;
        for p in &mut self.peers {
            if p.link.is_none() || p.needs_resync {
                continue;
            }
            any = true;
            p.to_peer.clear();
            p.run_to_idle(self.faults);
            for (&u, &tag) in &p.promised {
                let there = p.store.disk.read(u);
                if there < tag {
                    return Err(format!(
                        "after a failover to {}, block {u} reads write {there} but write \
                         {tag} was acknowledged under protocol {:?}",
                        p.name, self.protocol
                    ));
                }
            }
        }
        Ok(any)
    }

    /// Reconnect a cut-off peer once the Primary is idle, resync what the bitmap (and,
    /// after a power loss of the peer, its activity log) marks, and compare the replicas.
    fn reconnect(&mut self, i: usize) -> Result<(), String> {
        if self.peers[i].link.is_some() || !self.requests.is_empty() {
            return Ok(());
        }
        let p = &mut self.peers[i];
        let mut marked = std::mem::take(&mut p.bitmap);
        if p.crashed {
            marked.extend(p.store.hot());
        }
        for u in marked {
            p.store.disk.copy_from(&self.primary_disk, u);
        }
        // The resync target flushes at the end; only then may its log forget extents.
        p.store.flush();
        p.store.forget_log();
        for u in 0..UNITS {
            let (a, b) = (self.primary_disk.read(u), p.store.disk.read(u));
            if a != b {
                return Err(format!(
                    "after resync, block {u} holds write {a} on the primary and {b} on {}",
                    p.name
                ));
            }
        }
        // In sync: it now holds every completed write.
        p.promised = (0..UNITS).map(|u| (u, p.store.disk.read(u))).collect();
        p.needs_resync = false;
        p.crashed = false;
        self.connect(i);
        Ok(())
    }

    fn check_flushes(&mut self) -> Result<(), String> {
        let (done, open): (Vec<Flush>, Vec<Flush>) = std::mem::take(&mut self.flushes)
            .into_iter()
            .partition(|f| f.peers_done.is_some());
        self.flushes = open;
        if self.protocol != ReplicationProtocol::C {
            return Ok(());
        }
        for f in done {
            let lost = f.peers_done.unwrap_or_default();
            for &i in &f.to_peers {
                let p = &self.peers[i];
                if lost.iter().any(|l| l == p.name) {
                    continue;
                }
                for (&u, &tag) in &f.must_be_stable[i] {
                    let stable = p.store.disk.stable[u];
                    if stable < tag {
                        return Err(format!(
                            "a completed flush left block {u} at write {stable} on {}'s \
                             stable storage, not {tag}",
                            p.name
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    fn idle(&self) -> bool {
        self.requests.is_empty()
            && self
                .peers
                .iter()
                .all(|p| p.to_peer.is_empty() && p.to_primary.is_empty())
    }
}

/// Run one seeded schedule; `Err` names the broken promise.
fn run_schedule(seed: u64, faults: Faults) -> Result<(), String> {
    let mut w = World::new(seed, faults);
    let steps = w.rng.gen_range(20..200);
    let trace = std::env::var_os("TANDEM_SIM_TRACE").is_some();
    if trace {
        eprintln!("protocol {:?}, {} peers", w.protocol, w.peers.len());
    }
    for _ in 0..steps {
        let event = w.rng.gen_range(0..100);
        let i = w.any_peer();
        if trace {
            eprintln!(
                "event {event} peer {i}: requests {:?} peers {:?}",
                w.requests
                    .iter()
                    .map(|r| (r.tag, r.units.clone(), r.local_done, r.peers_done.clone()))
                    .collect::<Vec<_>>(),
                w.peers
                    .iter()
                    .map(|p| {
                        let running = p.applier.running.len();
                        (p.link, p.to_peer.len(), p.to_primary.len(), running)
                    })
                    .collect::<Vec<_>>(),
            );
        }
        match event {
            0..=24 => w.issue_write(),
            25..=27 => w.issue_flush(),
            28..=42 => w.complete_local(),
            43..=62 => w.deliver_to_peer(i)?,
            63..=77 => w.complete_peer_job(i),
            78..=93 => w.deliver_to_primary(i),
            94..=95 => w.cut_link(i),
            96 => w.peer_loses_power(i),
            97 => {
                if w.failover()? {
                    return Ok(());
                }
            }
            _ => w.reconnect(i)?,
        }
        w.check_flushes()?;
    }
    // Drain: finish everything, then the Primary fails over or every peer resyncs.
    for _ in 0..100_000 {
        if w.idle() {
            break;
        }
        let i = w.any_peer();
        match w.rng.gen_range(0..4) {
            0 => w.complete_local(),
            1 => w.deliver_to_peer(i)?,
            2 => w.complete_peer_job(i),
            _ => w.deliver_to_primary(i),
        }
        w.check_flushes()?;
    }
    if !w.idle() {
        return Err("requests never completed".into());
    }
    if w.rng.gen_bool(0.5) && w.failover()? {
        return Ok(());
    }
    for i in 0..w.peers.len() {
        w.cut_link(i);
    }
    for i in 0..w.peers.len() {
        w.reconnect(i)?;
    }
    Ok(())
}

/// `TANDEM_SIM_SEEDS`, or `default`: how many schedules a simulator runs.
fn seeds(default: u64) -> u64 {
    std::env::var("TANDEM_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// The first seed (of [`seeds`]) whose schedule breaks a promise under `faults`.
fn first_violation(faults: Faults) -> Option<(u64, String)> {
    (0..seeds(10_000)).find_map(|seed| run_schedule(seed, faults).err().map(|e| (seed, e)))
}

#[test]
fn seeded_fault_schedules_keep_every_promise_of_protocols_a_b_and_c() {
    if let Some((seed, violation)) = first_violation(Faults::default()) {
        panic!(
            "seed {seed}: {violation}\n  replay: TANDEM_SIM_SEED={seed} TANDEM_SIM_TRACE=1 \
             cargo test -p tandem-replication --lib core::sim::replay_a_seed -- --nocapture"
        );
    }
}

/// Some seed's schedule breaks a promise under `faults`, and the violation names one of
/// `kinds`.
fn assert_caught(faults: Faults, kinds: &[&str]) {
    let (seed, violation) = first_violation(faults).expect("no schedule caught the fault");
    assert!(
        kinds.iter().any(|k| violation.contains(k)),
        "seed {seed}: {violation}"
    );
}

#[test]
fn the_simulator_catches_an_acknowledgement_before_the_peer() {
    let primary = PrimaryFaults {
        ack_before_peer: true,
        ..PrimaryFaults::default()
    };
    let faults = Faults {
        primary,
        ..Faults::default()
    };
    assert_caught(faults, &["after a failover", "completed flush"]);
}

#[test]
fn the_simulator_catches_a_secondary_without_its_activity_log() {
    let faults = Faults {
        skip_activity_log: true,
        ..Faults::default()
    };
    assert_caught(faults, &["after resync"]);
}

#[test]
fn the_simulator_catches_a_peer_loss_without_bitmap_marks() {
    let primary = PrimaryFaults {
        no_bitmap_on_loss: true,
        ..PrimaryFaults::default()
    };
    let faults = Faults {
        primary,
        ..Faults::default()
    };
    assert_caught(faults, &["after resync"]);
}

/// `TANDEM_SIM_SEED=N` replays one schedule (with `TANDEM_SIM_TRACE=1`, step by step).
#[test]
fn replay_a_seed() {
    if let Some(seed) = std::env::var("TANDEM_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        if let Err(violation) = run_schedule(seed, Faults::default()) {
            panic!("seed {seed}: {violation}");
        }
    }
}
