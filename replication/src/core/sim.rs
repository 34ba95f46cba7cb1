//! A deterministic simulator of a protocol-C pair: a [`PrimaryCore`] and a
//! [`SecondaryCore`], a link that delivers in order and can be cut, disks that lose what
//! was not flushed when their host loses power, the Secondary's activity log, and the
//! Primary's bitmap for its peer. One seed drives everything: the application's writes and
//! flushes, the order in which I/O completes and messages arrive, and the faults (link
//! cuts, power loss on either host).
//!
//! After the steps of a schedule it checks what the protocol promises:
//!
//! - **No acknowledged write is lost by a failover.** When the Primary loses power while
//!   its peer is connected and in sync, every write completed to the application with
//!   every peer acknowledging it reads back from the peer.
//! - **A completed flush is durable on the peer.** Every write completed before a flush
//!   started is on the peer's stable storage once the flush completes with every peer.
//! - **Replicas are identical after resync.** The Primary's bitmap plus, after a power
//!   loss of the peer, the peer's activity log cover every block that may differ, so
//!   copying them makes the replicas byte-identical.
//!
//! Three test-only fault switches prove the checks can fail: the Primary acknowledges
//! before its peer ([`PrimaryFaults::ack_before_peer`]), marks nothing on peer loss
//! ([`PrimaryFaults::no_bitmap_on_loss`]), or the Secondary skips its activity log
//! ([`Faults::skip_activity_log`], in this simulator's model of the Secondary's shell,
//! where the log lives).
//!
//! `TANDEM_SIM_SEEDS=N` runs N schedules (default 10,000); a failure prints the seed and
//! the one-line command that replays it (`TANDEM_SIM_SEED=S TANDEM_SIM_TRACE=1 ...`).

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::op::Op;
use super::primary::{PeerId, PrimaryAction, PrimaryCore, PrimaryFaults, WaitId};
use super::secondary::{SecondaryAction, SecondaryCore, Work};
use crate::wire::{Message, ReplicationProtocol, WriteOutcome};

const UNIT: u64 = 4096;
const UNITS: usize = 24;
const SIZE: u64 = UNIT * UNITS as u64;
const PEER: &str = "hv2";

/// Faults of the simulator's own models.
#[derive(Debug, Default, Clone, Copy)]
struct Faults {
    primary: PrimaryFaults,
    /// The Secondary applies requests without logging their ranges first.
    skip_activity_log: bool,
}

/// A disk: a tag per unit, with a volatile cache in front of stable storage.
#[derive(Clone)]
struct Disk {
    stable: Vec<u64>,
    cache: BTreeMap<usize, u64>,
}

impl Disk {
    fn new() -> Disk {
        Disk {
            stable: vec![0; UNITS],
            cache: BTreeMap::new(),
        }
    }

    fn write(&mut self, units: &[usize], tag: u64, fua: bool) {
        for &u in units {
            if fua {
                self.cache.remove(&u);
                self.stable[u] = tag;
            } else {
                self.cache.insert(u, tag);
            }
        }
    }

    fn flush(&mut self) {
        for (u, tag) in std::mem::take(&mut self.cache) {
            self.stable[u] = tag;
        }
    }

    fn read(&self, u: usize) -> u64 {
        self.cache.get(&u).copied().unwrap_or(self.stable[u])
    }

    /// Each cached unit independently reached stable storage or not.
    fn lose_power(&mut self, rng: &mut StdRng) {
        for (u, tag) in std::mem::take(&mut self.cache) {
            if rng.gen_bool(0.5) {
                self.stable[u] = tag;
            }
        }
    }
}

/// The tag written into every unit of a request's data.
fn tag_of(data: &[u8]) -> u64 {
    u64::from_le_bytes(data[..8].try_into().unwrap())
}

fn units_of(offset: u64, len: u64) -> Vec<usize> {
    ((offset / UNIT) as usize..((offset + len) / UNIT) as usize).collect()
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
    /// `Some(unacknowledged)` once every peer answered or was lost.
    peers_done: Option<Vec<String>>,
    not_sent_to: Vec<String>,
}

struct Flush {
    /// A peer was attached when the flush started.
    to_peer: bool,
    wait: Option<WaitId>,
    peers_done: Option<Vec<String>>,
    /// Per unit, the newest tag completed to every replica before the flush started.
    must_be_stable: BTreeMap<usize, u64>,
}

/// The Secondary host: its core, disk and activity log.
struct Secondary {
    core: SecondaryCore,
    disk: Disk,
    /// Jobs started and not finished.
    running: Vec<super::secondary::Job>,
    /// Units of requests in flight or applied since the last flush: the activity log, on
    /// stable storage (it survives a power loss).
    log_active: BTreeMap<usize, u32>,
    log_unflushed: BTreeSet<usize>,
}

impl Secondary {
    /// Carry out a job on the disk (inside the activity log) and build its reply.
    fn apply(&mut self, work: &Work) -> Message {
        match work {
            Work::Request { seq, offset, op } => {
                let units = units_of(*offset, op.len());
                if let Op::Write { data, fua } = op {
                    self.disk.write(&units, tag_of(data), *fua);
                }
                for u in units {
                    if let Some(n) = self.log_active.get_mut(&u) {
                        *n -= 1;
                        if *n == 0 {
                            self.log_active.remove(&u);
                        }
                        self.log_unflushed.insert(u);
                    }
                }
                Message::WriteAck {
                    seq: *seq,
                    outcome: WriteOutcome::Written,
                }
            }
            Work::Flush { id } => {
                self.disk.flush();
                self.log_unflushed.clear();
                Message::FlushAck { id: *id }
            }
            other => panic!("unexpected job {other:?}"),
        }
    }
}

struct World {
    rng: StdRng,
    faults: Faults,
    primary: PrimaryCore,
    primary_disk: Disk,
    /// Units the Primary's bitmap marks out of sync for the peer.
    bitmap: BTreeSet<usize>,
    requests: Vec<Request>,
    flushes: Vec<Flush>,
    next_tag: u64,
    /// Per unit, the newest tag completed to the application with every peer.
    completed: BTreeMap<usize, u64>,
    link: Option<PeerId>,
    to_secondary: VecDeque<Message>,
    to_primary: VecDeque<Message>,
    secondary: Secondary,
    /// The peer lost writes it had acknowledged (power loss) or missed some while cut off:
    /// it is not UpToDate until a resync.
    needs_resync: bool,
    secondary_crashed: bool,
}

impl World {
    fn new(seed: u64, faults: Faults) -> World {
        let mut primary = PrimaryCore::new(ReplicationProtocol::C, 8);
        primary.faults = faults.primary;
        primary.set_known_peers(&[PEER.to_string()]);
        let mut world = World {
            rng: StdRng::seed_from_u64(seed),
            faults,
            primary,
            primary_disk: Disk::new(),
            bitmap: BTreeSet::new(),
            requests: Vec::new(),
            flushes: Vec::new(),
            next_tag: 1,
            completed: BTreeMap::new(),
            link: None,
            to_secondary: VecDeque::new(),
            to_primary: VecDeque::new(),
            secondary: Secondary {
                core: SecondaryCore::new(false, 1 << 20),
                disk: Disk::new(),
                running: Vec::new(),
                log_active: BTreeMap::new(),
                log_unflushed: BTreeSet::new(),
            },
            needs_resync: false,
            secondary_crashed: false,
        };
        world.connect();
        world
    }

    fn connect(&mut self) {
        self.link = Some(self.primary.attach_peer(PEER));
        self.secondary.core = SecondaryCore::new(false, 1 << 20);
        self.secondary.running.clear();
        self.primary_actions();
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
        let sendable: Vec<PeerId> = self.link.into_iter().collect();
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
            peers_done: started.wait.is_none().then(Vec::new),
            not_sent_to: started.unacknowledged,
        });
        self.primary_actions();
    }

    fn issue_flush(&mut self) {
        self.primary_disk.flush();
        let must_be_stable = self.completed.clone();
        let wait = self.primary.start_flush(true);
        self.flushes.push(Flush {
            to_peer: self.link.is_some(),
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
            let acknowledged_by_all = r.not_sent_to.is_empty()
                && r.peers_done.as_ref().is_some_and(|lost| lost.is_empty());
            if acknowledged_by_all {
                for &u in &r.units {
                    self.completed.insert(u, r.tag);
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
                    if Some(peer) == self.link {
                        self.to_secondary.push_back(msg);
                    }
                }
                PrimaryAction::OutOfSync { offset, len, .. } => {
                    self.bitmap.extend(units_of(offset, len));
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

    // ----- the Secondary's shell -----

    fn deliver_to_secondary(&mut self) -> Result<(), String> {
        let Some(msg) = self.to_secondary.pop_front() else {
            return Ok(());
        };
        self.secondary
            .core
            .handle_message(msg, SIZE)
            .map_err(|e| format!("the secondary refused a valid message: {e}"))?;
        self.secondary_actions();
        Ok(())
    }

    fn secondary_actions(&mut self) {
        let s = &mut self.secondary;
        while let Some(action) = s.core.poll_action() {
            match action {
                SecondaryAction::Send(msg) => self.to_primary.push_back(msg),
                SecondaryAction::Start(job) => {
                    if let Work::Request { offset, op, .. } = &job.work {
                        if !self.faults.skip_activity_log {
                            for u in units_of(*offset, op.len()) {
                                *s.log_active.entry(u).or_default() += 1;
                            }
                        }
                    }
                    s.running.push(job);
                }
                SecondaryAction::Extension(_) => {}
                SecondaryAction::Fail(e) => panic!("the secondary failed: {e}"),
            }
        }
    }

    fn complete_secondary_job(&mut self) {
        let s = &mut self.secondary;
        if s.running.is_empty() {
            return;
        }
        let job = s
            .running
            .swap_remove(self.rng.gen_range(0..s.running.len()));
        let reply = s.apply(&job.work);
        s.core.handle_done(job.held, Ok(reply));
        self.secondary_actions();
    }

    fn deliver_to_primary(&mut self) {
        let (Some(msg), Some(link)) = (self.to_primary.pop_front(), self.link) else {
            return;
        };
        self.primary.handle_peer_message(link, msg);
        self.primary_actions();
        self.finish_requests();
    }

    // ----- faults -----

    fn cut_link(&mut self) {
        let Some(link) = self.link.take() else {
            return;
        };
        self.to_secondary.clear();
        self.to_primary.clear();
        // The Secondary's shell finishes what it started before the link is gone.
        let s = &mut self.secondary;
        s.core.handle_link_down();
        for job in std::mem::take(&mut s.running) {
            s.apply(&job.work);
        }
        self.primary.handle_link_down(link);
        self.primary_actions();
        self.finish_requests();
        self.needs_resync = true;
    }

    fn secondary_loses_power(&mut self) {
        self.secondary.running.clear();
        self.cut_link();
        let s = &mut self.secondary;
        s.disk.lose_power(&mut self.rng);
        self.secondary_crashed = true;
    }

    /// The Primary loses power. If its peer was connected and in sync, it is promoted:
    /// every write completed to every replica must be there. False if the peer could not
    /// be promoted (the schedule goes on).
    fn failover(&self) -> Result<bool, String> {
        if self.link.is_none() || self.needs_resync {
            return Ok(false);
        }
        for (&u, &tag) in &self.completed {
            let there = self.secondary.disk.read(u);
            if there < tag {
                return Err(format!(
                    "after a failover, block {u} reads write {there} but write {tag} was acknowledged"
                ));
            }
        }
        Ok(true)
    }

    /// Reconnect once the Primary is idle, resync what the bitmap (and, after a power loss
    /// of the peer, its activity log) marks, and compare the replicas.
    fn reconnect(&mut self) -> Result<(), String> {
        if self.link.is_some() || !self.requests.is_empty() {
            return Ok(());
        }
        let mut marked = std::mem::take(&mut self.bitmap);
        let s = &mut self.secondary;
        if self.secondary_crashed {
            marked.extend(s.log_active.keys());
            marked.extend(s.log_unflushed.iter());
        }
        for u in marked {
            s.disk.stable[u] = self.primary_disk.read(u);
            s.disk.cache.remove(&u);
        }
        // The resync target flushes at the end; only then may its log forget extents.
        s.disk.flush();
        s.log_active.clear();
        s.log_unflushed.clear();
        for u in 0..UNITS {
            let (p, q) = (self.primary_disk.read(u), s.disk.read(u));
            if p != q {
                return Err(format!(
                    "after resync, block {u} holds write {p} on the primary and {q} on the peer"
                ));
            }
        }
        self.needs_resync = false;
        self.secondary_crashed = false;
        self.connect();
        Ok(())
    }

    fn check_flushes(&mut self) -> Result<(), String> {
        let (done, open): (Vec<Flush>, Vec<Flush>) = std::mem::take(&mut self.flushes)
            .into_iter()
            .partition(|f| f.peers_done.is_some());
        self.flushes = open;
        for f in done {
            if !f.to_peer || f.peers_done.as_ref().is_some_and(|lost| !lost.is_empty()) {
                continue;
            }
            for (&u, &tag) in &f.must_be_stable {
                let stable = self.secondary.disk.stable[u];
                if stable < tag {
                    return Err(format!(
                        "a completed flush left block {u} at write {stable} on the peer's stable storage, not {tag}"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Run one seeded schedule; `Err` names the broken promise.
fn run_schedule(seed: u64, faults: Faults) -> Result<(), String> {
    let mut w = World::new(seed, faults);
    let steps = w.rng.gen_range(20..200);
    let trace = std::env::var_os("TANDEM_SIM_TRACE").is_some();
    for _ in 0..steps {
        let event = w.rng.gen_range(0..100);
        if trace {
            eprintln!(
                "event {event}: requests {:?} link {:?} to_secondary {} to_primary {} running {} bitmap {:?}",
                w.requests.iter().map(|r| (r.tag, r.units.clone(), r.local_done, r.peers_done.clone())).collect::<Vec<_>>(),
                w.link, w.to_secondary.len(), w.to_primary.len(), w.secondary.running.len(), w.bitmap
            );
        }
        match event {
            0..=24 => w.issue_write(),
            25..=27 => w.issue_flush(),
            28..=42 => w.complete_local(),
            43..=62 => w.deliver_to_secondary()?,
            63..=77 => w.complete_secondary_job(),
            78..=93 => w.deliver_to_primary(),
            94..=95 => w.cut_link(),
            96 => w.secondary_loses_power(),
            97 => {
                if w.failover()? {
                    return Ok(());
                }
            }
            _ => w.reconnect()?,
        }
        w.check_flushes()?;
    }
    // Drain: finish everything, then the Primary fails over or the pair resyncs.
    for _ in 0..10_000 {
        if w.requests.is_empty() && w.to_secondary.is_empty() && w.to_primary.is_empty() {
            break;
        }
        match w.rng.gen_range(0..4) {
            0 => w.complete_local(),
            1 => w.deliver_to_secondary()?,
            2 => w.complete_secondary_job(),
            _ => w.deliver_to_primary(),
        }
        w.check_flushes()?;
    }
    if !w.requests.is_empty() {
        return Err("requests never completed".into());
    }
    if w.rng.gen_bool(0.5) && w.failover()? {
        return Ok(());
    }
    w.cut_link();
    w.reconnect()
}

fn seeds() -> u64 {
    std::env::var("TANDEM_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000)
}

/// The first seed (of [`seeds`]) whose schedule breaks a promise under `faults`.
fn first_violation(faults: Faults) -> Option<(u64, String)> {
    (0..seeds()).find_map(|seed| run_schedule(seed, faults).err().map(|e| (seed, e)))
}

#[test]
fn seeded_fault_schedules_keep_every_promise_of_protocol_c() {
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
