//! A deterministic simulator of roles: two data nodes (hv1, hv2) and, in three schedules
//! out of four, a diskless witness (w), promoted and demoted by seeded operator and HA
//! actions while links break, nodes are isolated and hosts lose power. One seed drives
//! everything: whether there is a witness, how often each kind of event happens (drawn per
//! schedule, "swarm" testing), the application's writes and flushes, the order in which
//! messages arrive and I/O completes, the faults, and the actions: promote any data node at
//! any time (as an HA agent would after a failure), demote, fence a Primary without quorum
//! (`secondary --force`), resolve a split brain, and live migrations that open the
//! two-primaries gate, promote the destination, move the writer, demote the source and
//! close the gate.
//!
//! The decisions are the engine's own: the local promotion gate, the members' 2PC votes,
//! the round's outcome, the quorum verdicts and the outdate answer
//! ([`crate::core::promotion`]), the UUID sync decision and the handshake plan
//! (`sync_decision::decide`, `replica::handshake::plan`), the generations ([`UuidSet`]),
//! and the data path's cores ([`PrimaryCore`] per Primary, a
//! [`SecondaryCore`](crate::core::secondary) per link it replicates on). What this module
//! adds is a model of the engine's shell around them (`replica/`): which message goes where
//! and when, the witness's relays, and what a link loss, a crash and a restart do. Its
//! simplifications: a handshake is one atomic step taken only while neither node has a
//! request in flight (the resync copies the marked units at once); time passes only as "a
//! promoter gives up waiting"; no reconnect grace, snapshot hold, clean goodbye or third
//! data node (so no reconciliation of a lost Primary's tail).
//!
//! ```text
//!  roles.rs           the world (nodes, links, messages), the checks, one step, the end
//!  roles/data.rs      requests, flushes, new generations, the Secondary's shell
//!  roles/links.rs     a link lost, handshakes and resyncs, the witness's state and relays
//!  roles/messages.rs  one message delivered
//!  roles/actions.rs   promote, demote, fence, power loss and on, migrate, resolve
//!  roles/tests.rs     the seeded run, the fault switches, two scripted schedules
//! ```
//!
//! What it checks after every step, and once more at the end of each schedule, when every
//! node is powered on, every link healed and every Primary demoted, and the data nodes
//! must reconnect:
//!
//! - **At most one Primary outside the two-primaries gate.** A Primary that lost quorum
//!   while Primary (the engine's durable `primary_lost_quorum` flag: its I/O is frozen
//!   until it steps down) does not count.
//! - **No split brain while a witness holds quorum:** the data nodes' lines of acknowledged
//!   writes never diverge (each holding a write the other lacks), and no handshake finds a
//!   split brain.
//! - **No acknowledged write is lost,** as protocol C and a block device promise: a node
//!   becoming Primary reads every write completed with its own acknowledgement (unless it
//!   lost power since and the write was never flushed) and, with a witness, every flushed
//!   write anyone holds; a resync never drops a flushed write from its target. A write
//!   nobody flushed may vanish with a crash or the fencing of its Primary, as on a disk.
//! - **A completed flush is durable** on the peer that acknowledged it.
//! - **Replicas are identical** after every resync and every "no sync".
//!
//! Without a witness quorum is off: two Primaries that cannot reach each other are allowed,
//! a split brain may happen but the handshake must find it (diverged lines are never
//! connected or resynced over each other, unless the operator discards one side), and once
//! a node is promoted without its data peer, or a Primary loses the other Primary, the
//! checks for lost writes stop for that schedule: that is DRBD without fencing.
//!
//! Fault switches prove the checks can fail: promotion ignores quorum
//! ([`PromotionFaults::ignore_quorum`], caught by the seeded run within its default
//! budget), and the five rules this simulator found missing in the engine (now in
//! `replica/`; see [`Faults`] for where each is caught). `TANDEM_SIM_SEEDS=N` runs N
//! schedules (default [`DEFAULT_SEEDS`]); a failure prints the one-line command that
//! replays it.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::host::{units_of, Applier, Store, SIZE, UNIT, UNITS};
use crate::core::op::Op;
use crate::core::primary::{PeerId, PrimaryAction, PrimaryCore, WaitId};
use crate::core::promotion::{
    self, Busy, OutdateResult, PeerFacts, PromoteAnswer, PromotionFaults, Round, View,
};
use crate::generation::{moved_on_from, Generation, UuidSet};
use crate::quorum::QuorumMode;
use crate::replica::handshake::{self, Handshake, Plan};
use crate::replica::messages::{peer_facts, PeerState};
use crate::role::{self, DiskState, Protocol, ReplicationState, Role};
use crate::sync_decision::{decide, AfterSplitBrain, DecisionContext, Direction, SyncOutcome};
use crate::wire::{Message, ReplicationProtocol};

/// Schedules per `cargo test` run unless `TANDEM_SIM_SEEDS` says otherwise.
pub(super) const DEFAULT_SEEDS: u64 = 3_000;
const NAMES: [&str; 3] = ["hv1", "hv2", "w"];

mod actions;
mod data;
mod links;
mod messages;
#[cfg(test)]
mod tests;
const VOLUME: &str = "vm-100-disk-0";

/// Faults the simulator must catch: in the engine's rules, or in this model of its shell.
/// Besides `ignore_quorum`, each one removes a rule this simulator found missing in the
/// engine. The seeded run finds the first at schedule 128,920, the second at 36, the third
/// at 77,290 and the fourth at 193,095 (`TANDEM_SIM_SEEDS`), and the fifth not within a
/// million (a scripted schedule found it); `tests.rs` scripts the schedules of the first,
/// third and fifth, and `tests/takeover_safety.rs` checks the engine itself for all but
/// the third.
#[derive(Debug, Default, Clone, Copy)]
struct Faults {
    promotion: PromotionFaults,
    /// A node promoted without its data peer does not outdate it through the witness
    /// before its first write (the engine before `Replica::outdate_unreached_peers`).
    no_outdate_at_promotion: bool,
    /// A request issued before a peer loss is acknowledged after it in the old generation
    /// (the engine before `hold_after_peer_loss` started the armed generation).
    late_ack_in_old_generation: bool,
    /// A promotion round commits although a member it did not ask came up meanwhile (the
    /// engine before `twopc_link_up`).
    no_retry_on_link_up: bool,
    /// A flush after a promotion with the peer away does not start the armed generation
    /// (the engine before `Replica::flush` did).
    flush_in_old_generation: bool,
    /// A Primary that loses the other Primary arms no new generation even with quorum (the
    /// engine before `link_down` did).
    no_generation_after_dual: bool,
}

/// What one step does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    Write,
    Flush,
    CompleteLocal,
    Deliver,
    CompletePeerJob,
    Cut,
    Heal,
    PowerLoss,
    PowerOn,
    Isolate,
    Promote,
    Demote,
    Migrate,
    Fence,
    /// A promoting node decides its round once every answer is in.
    Decide,
    /// A promoting node stops waiting for answers (its prepare timed out).
    GiveUp,
    Resolve,
}

/// Each event with the range its weight is drawn from, once per schedule ("swarm"
/// testing: some schedules cut links often and deliver slowly, others hardly fail).
const EVENTS: [(Event, std::ops::RangeInclusive<u32>); 17] = [
    (Event::Write, 5..=25),
    (Event::Flush, 0..=4),
    (Event::CompleteLocal, 5..=20),
    (Event::Deliver, 10..=40),
    (Event::CompletePeerJob, 5..=15),
    (Event::Cut, 0..=6),
    (Event::Heal, 1..=8),
    (Event::PowerLoss, 0..=2),
    (Event::PowerOn, 1..=4),
    (Event::Isolate, 0..=2),
    (Event::Promote, 1..=8),
    (Event::Demote, 0..=4),
    (Event::Migrate, 0..=6),
    (Event::Fence, 0..=2),
    (Event::Decide, 1..=6),
    (Event::GiveUp, 0..=2),
    (Event::Resolve, 0..=2),
];

/// One outdate request: `requester` asks, through the witness, to outdate `target`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ticket {
    id: u64,
    target: usize,
    requester: usize,
}

/// A control or data message on a link.
#[derive(Debug)]
enum Msg {
    State(Box<PeerState>),
    Prepare {
        id: u64,
        two_primaries: bool,
    },
    Reply {
        id: u64,
        answer: PromoteAnswer,
    },
    Decision {
        id: u64,
        commit: bool,
    },
    Outdate(Ticket, Generation),
    OutdateReply(Ticket, OutdateResult),
    NewCurrent(Generation),
    /// From the sender's Primary core to the receiver's Secondary core.
    ToSecondary(Message),
    /// From the sender's Secondary core to the receiver's Primary core.
    ToPrimary(Message),
}

/// A link between two nodes: cut by the network or not, connected (handshake done) or
/// not, and a queue per direction (`q[0]` from the lower index to the higher).
#[derive(Default)]
struct Link {
    cut: bool,
    up: bool,
    q: [VecDeque<Msg>; 2],
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
    sent_to_peer: bool,
    /// The peer's power losses when the request was issued: one more since, and its
    /// acknowledgement promises nothing (its cache went) unless the write was FUA.
    peer_boots: u64,
    /// A resync copied it to the peer while it waited to be acknowledged.
    resynced_to_peer: bool,
    /// `Some(unacknowledged)` once the peer answered or was lost (or none was waited for).
    peers_done: Option<Vec<String>>,
}

struct Flush {
    wait: Option<WaitId>,
    /// Per unit, the newest write the peer held before the flush started: stable there
    /// (durable) once it completes.
    must_be_stable: BTreeMap<usize, u64>,
    /// The writes this node held before the flush started: durable once it completes.
    acked: Vec<u64>,
    /// `Some(unacknowledged)` once the peer answered or was lost.
    peers_done: Option<Vec<String>>,
}

/// One node: its role state as the engine keeps it, and (on a data node) its storage, its
/// data-path cores and the application running on it.
struct Node {
    name: &'static str,
    diskful: bool,
    up: bool,
    /// Power losses so far.
    boots: u64,
    role: Role,
    disk: DiskState,
    uuids: UuidSet,
    has_quorum: bool,
    allow_two: bool,
    /// The state each connected peer last sent.
    views: BTreeMap<usize, PeerState>,
    round: Option<Round>,
    /// The round's promotion starts the application here (HA), or not (a migration).
    round_starts_app: bool,
    grant: Option<(usize, u64)>,
    next_id: u64,
    pending_outdates: BTreeMap<usize, u64>,
    /// Promoted with the data peer away: the first write outdates it through the witness.
    outdate_at_first_write: bool,
    /// A witness's forwarded outdate requests: id → (requester, target).
    relayed_outdates: BTreeMap<u64, Ticket>,
    /// A witness's memory of each data node's lineage.
    seen_lineages: BTreeMap<String, Vec<Generation>>,
    discard_my_data: bool,
    store: Store,
    /// Units out of sync for the other data node.
    bitmap: BTreeSet<usize>,
    primary: Option<PrimaryCore>,
    /// The other data node attached to our Primary core.
    channel: Option<PeerId>,
    /// Applying the other data node's writes (it is Primary).
    applier: Option<Applier>,
    requests: Vec<Request>,
    flushes: Vec<Flush>,
    /// The application (the VM) runs here.
    app: bool,
    /// Per unit, the newest write completed to the application with this node holding it.
    promised: BTreeMap<usize, u64>,
    /// The acknowledged writes in this node's line of data (written here as Primary or
    /// received, or copied by a resync), with their units, whether they survived a power
    /// loss or not: two lines that each hold a write the other lacks have diverged.
    history: BTreeMap<u64, Vec<usize>>,
    /// The acknowledged writes that are durable here: written with FUA or covered by a
    /// completed flush (here, or on the resync source this node copied). A power loss
    /// takes every other write out of `promised`: only a flush promises durability (a node
    /// that kept power still holds what it acknowledged).
    durable: BTreeSet<u64>,
}

impl Node {
    fn new(name: &'static str, diskful: bool, day0: Generation) -> Node {
        Node {
            name,
            diskful,
            up: true,
            boots: 0,
            role: Role::Secondary,
            disk: if diskful {
                DiskState::UpToDate
            } else {
                DiskState::Diskless
            },
            uuids: if diskful {
                UuidSet::day0(day0)
            } else {
                UuidSet::default()
            },
            has_quorum: true,
            allow_two: false,
            views: BTreeMap::new(),
            round: None,
            round_starts_app: false,
            grant: None,
            next_id: 1,
            pending_outdates: BTreeMap::new(),
            outdate_at_first_write: false,
            relayed_outdates: BTreeMap::new(),
            seen_lineages: BTreeMap::new(),
            discard_my_data: false,
            store: Store::new(),
            bitmap: BTreeSet::new(),
            primary: None,
            channel: None,
            applier: None,
            requests: Vec::new(),
            flushes: Vec::new(),
            app: false,
            promised: BTreeMap::new(),
            history: BTreeMap::new(),
            durable: BTreeSet::new(),
        }
    }

    /// The acknowledged writes this node still holds (newest on some unit).
    fn held(&self) -> BTreeSet<u64> {
        self.promised.values().copied().collect()
    }

    /// Primary and counted by the one-Primary rule (not frozen by a quorum loss).
    fn active_primary(&self) -> bool {
        self.up && self.role == Role::Primary && !self.uuids.flags.primary_lost_quorum
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    OpenGate,
    PromoteDestination,
    MoveWriter,
    DemoteSource,
    CloseGate,
}

/// A live migration in progress from `source` to `destination`.
#[derive(Debug)]
struct Migration {
    source: usize,
    destination: usize,
    stage: Stage,
}

/// What the schedules did, summed over a run (printed by the seeded test).
#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    schedules: u64,
    with_witness: u64,
    promotions: u64,
    /// Promotions with the other data node not connected (a takeover).
    takeovers: u64,
    refused_promotions: u64,
    migrations: u64,
    resyncs: u64,
    split_brains: u64,
    power_losses: u64,
    acknowledged_writes: u64,
    /// Schedules where quorum was off and a node was promoted without its peer.
    unfenced: u64,
}

struct World {
    rng: StdRng,
    faults: Faults,
    /// This schedule's weight of each of [`EVENTS`].
    weights: [u32; EVENTS.len()],
    quorum: QuorumMode,
    nodes: Vec<Node>,
    /// (0,1), then (0,2) and (1,2) with a witness.
    links: Vec<Link>,
    next_tag: u64,
    migration: Option<Migration>,
    /// The last handshake of the data link found a split brain.
    split_brain: bool,
    /// Quorum is off and a node became Primary without its data peer, or a Primary lost
    /// the other Primary: DRBD without fencing, where acknowledged writes may be lost (see
    /// the module doc); the checks for lost writes stop.
    unfenced: bool,
    /// A broken promise found inside a step that cannot return it (a flush).
    violation: Option<String>,
    stats: Stats,
    trace: bool,
}

fn link_index(a: usize, b: usize) -> usize {
    match (a.min(b), a.max(b)) {
        (0, 1) => 0,
        (0, 2) => 1,
        _ => 2,
    }
}

fn other(d: usize) -> usize {
    1 - d
}

/// Each side holds an acknowledged write the other lacks.
fn diverged(a: &BTreeMap<u64, Vec<usize>>, b: &BTreeMap<u64, Vec<usize>>) -> bool {
    a.keys().any(|w| !b.contains_key(w)) && b.keys().any(|w| !a.contains_key(w))
}

impl World {
    /// The world of schedule `seed`: with a witness or not, and one data node Primary
    /// running the application.
    fn new(seed: u64, faults: Faults) -> Result<World, String> {
        let mut rng = StdRng::seed_from_u64(seed);
        let witness = rng.gen_range(0..4) != 0;
        let mut w = World::with(rng, witness, faults);
        let first = w.rng.gen_range(0..2);
        w.promote(first, true)?;
        w.settle()?;
        w.finish_round(first, false)?;
        Ok(w)
    }

    fn with(mut rng: StdRng, witness: bool, faults: Faults) -> World {
        let day0 = Generation::from_raw(0xDA70);
        let mut nodes = vec![
            Node::new(NAMES[0], true, day0),
            Node::new(NAMES[1], true, day0),
        ];
        if witness {
            nodes.push(Node::new(NAMES[2], false, day0));
        }
        let n = nodes.len();
        let weights = EVENTS.map(|(_, range)| rng.gen_range(range));
        let mut w = World {
            weights,
            rng,
            faults,
            quorum: QuorumMode::default_for(2, n - 2),
            links: (0..n * (n - 1) / 2).map(|_| Link::default()).collect(),
            nodes,
            next_tag: 1,
            migration: None,
            split_brain: false,
            unfenced: false,
            violation: None,
            stats: Stats::default(),
            trace: std::env::var_os("TANDEM_SIM_TRACE").is_some(),
        };
        for a in 0..n {
            for b in a + 1..n {
                w.connect(a, b).expect("day-0 handshake");
            }
        }
        w
    }

    /// Deliver every queued message, in link order, until none is left.
    fn settle(&mut self) -> Result<(), String> {
        let n = self.nodes.len();
        while !self
            .links
            .iter()
            .all(|l| l.q.iter().all(VecDeque::is_empty))
        {
            for (a, b) in (0..n).flat_map(|a| (0..n).map(move |b| (a, b))) {
                if a != b {
                    self.deliver(a, b)?;
                }
            }
        }
        Ok(())
    }

    fn witness(&self) -> bool {
        self.nodes.len() == 3
    }

    fn note(&self, what: impl FnOnce() -> String) {
        if self.trace {
            eprintln!("  {}", what());
        }
    }

    fn link(&mut self, a: usize, b: usize) -> &mut Link {
        &mut self.links[link_index(a, b)]
    }

    fn is_up(&self, a: usize, b: usize) -> bool {
        self.links[link_index(a, b)].up
    }

    fn send(&mut self, from: usize, to: usize, msg: Msg) {
        let dir = usize::from(from > to);
        let link = self.link(from, to);
        if link.up {
            link.q[dir].push_back(msg);
        }
    }

    fn facts(&self, n: usize) -> Vec<PeerFacts> {
        (0..self.nodes.len())
            .filter(|&m| m != n)
            .map(|m| {
                let state = self.nodes[n].views.get(&m).filter(|_| self.is_up(n, m));
                peer_facts(self.nodes[m].name, self.nodes[m].diskful, state)
            })
            .collect()
    }

    fn view<'a>(&'a self, n: usize, facts: &'a [PeerFacts]) -> View<'a> {
        let node = &self.nodes[n];
        View {
            volume: VOLUME,
            node: node.name,
            diskful: node.diskful,
            role: node.role,
            disk: node.disk,
            quorum: self.quorum,
            has_quorum: node.has_quorum,
            allow_two_primaries: node.allow_two,
            protocol: Protocol::C,
            peers: facts,
            faults: self.faults.promotion,
        }
    }

    fn writes_admitted(&self, n: usize) -> bool {
        let node = &self.nodes[n];
        promotion::writes_admitted(
            self.quorum,
            node.has_quorum,
            !node.pending_outdates.is_empty(),
        )
    }

    fn frozen(&self, n: usize) -> bool {
        let node = &self.nodes[n];
        node.role == Role::Primary && !node.has_quorum && self.quorum != QuorumMode::Off
    }

    /// Our state as sent to `to`.
    fn local_state(&self, n: usize, to: usize, handshake: bool) -> PeerState {
        let facts = self.facts(n);
        let node = &self.nodes[n];
        let mut primaries: Vec<String> = promotion::known_primaries(&self.view(n, &facts))
            .into_iter()
            .collect();
        primaries.retain(|p| p != self.nodes[to].name);
        PeerState {
            role: node.role,
            disk: node.disk,
            allow_two_primaries: node.allow_two,
            diskless: !node.diskful,
            discard_my_data: node.discard_my_data,
            keep_my_data: false,
            has_quorum: node.has_quorum,
            leaving: false,
            handshake,
            size: SIZE,
            promoted_at: 0,
            changed_blocks: if self.nodes[to].diskful {
                node.bitmap.len() as u64
            } else {
                0
            },
            primaries,
            uuids: node.diskful.then(|| node.uuids.clone()),
            seen_lineages: node
                .seen_lineages
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }

    fn broadcast(&mut self, n: usize) {
        for m in 0..self.nodes.len() {
            if m != n && self.is_up(n, m) {
                let s = self.local_state(n, m, false);
                self.send(n, m, Msg::State(Box::new(s)));
            }
        }
    }

    fn recompute_quorum(&mut self, n: usize) {
        let facts = self.facts(n);
        let had = self.nodes[n].has_quorum;
        let has = promotion::quorum(&self.view(n, &facts), had).has_quorum;
        let node = &mut self.nodes[n];
        let lost = had && !has;
        if lost && node.role == Role::Primary {
            node.uuids.on_quorum_lost(true);
        }
        if !lost && has && node.role == Role::Primary && node.uuids.flags.primary_lost_quorum {
            node.uuids.flags.primary_lost_quorum = false;
        }
        node.has_quorum = has;
    }

    fn mark_outdated(&mut self, n: usize) -> bool {
        let node = &mut self.nodes[n];
        node.uuids.mark_outdated();
        if matches!(node.disk, DiskState::UpToDate | DiskState::Consistent) {
            node.disk = DiskState::Outdated;
            return true;
        }
        false
    }

    fn check(&self) -> Result<(), String> {
        if let Some(v) = &self.violation {
            return Err(v.clone());
        }
        let primaries: Vec<usize> = (0..2).filter(|&d| self.nodes[d].active_primary()).collect();
        if primaries.len() == 2 {
            let gate = self.nodes[0].allow_two && self.nodes[1].allow_two;
            let partitioned = self.quorum == QuorumMode::Off && !self.is_up(0, 1);
            if !gate && !partitioned {
                return Err(
                    "hv1 and hv2 are both Primary outside the two-primaries gate".to_string(),
                );
            }
        }
        if self.witness() && diverged(&self.nodes[0].history, &self.nodes[1].history) {
            return Err(
                "split brain while a witness holds quorum: hv1 and hv2 both hold \
                        acknowledged writes the other lacks"
                    .to_string(),
            );
        }
        Ok(())
    }

    fn quiet(&self) -> bool {
        self.links
            .iter()
            .all(|l| l.q.iter().all(VecDeque::is_empty))
            && self.nodes.iter().all(|n| {
                n.requests.is_empty()
                    && n.round.is_none()
                    && n.applier.as_ref().is_none_or(|a| a.running.is_empty())
            })
    }

    fn describe(&self) -> String {
        self.nodes
            .iter()
            .map(|n| {
                format!(
                    "{}{} {:?} {:?} q={} gate={} app={} gen={}",
                    n.name,
                    if n.up { "" } else { "(down)" },
                    n.role,
                    n.disk,
                    n.has_quorum,
                    n.allow_two,
                    n.app,
                    n.uuids.current
                )
            })
            .collect::<Vec<_>>()
            .join(" | ")
    }

    fn pick_node(&mut self) -> usize {
        self.rng.gen_range(0..self.nodes.len())
    }

    fn pick_link(&mut self) -> (usize, usize) {
        let (a, b) = match self.rng.gen_range(0..self.links.len()) {
            0 => (0, 1),
            1 => (0, 2),
            _ => (1, 2),
        };
        if self.rng.gen_bool(0.5) {
            (a, b)
        } else {
            (b, a)
        }
    }

    /// One seeded step: an event drawn with this schedule's weights.
    fn step(&mut self) -> Result<(), String> {
        let total: u32 = self.weights.iter().sum();
        let mut pick = self.rng.gen_range(0..total);
        let event = EVENTS
            .iter()
            .zip(self.weights)
            .find(|(_, w)| {
                let hit = pick < *w;
                pick = pick.saturating_sub(*w);
                hit
            })
            .map_or(Event::Deliver, |(e, _)| e.0);
        let d = self.rng.gen_range(0..2);
        let app = (0..2).find(|&n| self.nodes[n].app);
        match event {
            Event::Write => app.into_iter().for_each(|n| self.issue_write(n)),
            Event::Flush => app.into_iter().for_each(|n| self.issue_flush(n)),
            Event::CompleteLocal => self.complete_local(d),
            Event::Deliver => {
                let (a, b) = self.pick_link();
                self.deliver(a, b)?;
            }
            Event::CompletePeerJob => self.complete_peer_job(d),
            Event::Cut => {
                let (a, b) = self.pick_link();
                self.note(|| format!("cut {}-{}", NAMES[a], NAMES[b]));
                self.cut(a, b);
            }
            Event::Heal => {
                let (a, b) = self.pick_link();
                self.link(a, b).cut = false;
                self.connect(a, b)?;
            }
            Event::PowerLoss => {
                let n = self.pick_node();
                self.power_loss(n);
            }
            Event::PowerOn => {
                let n = self.pick_node();
                self.power_on(n);
            }
            Event::Isolate => {
                let n = self.pick_node();
                self.note(|| format!("isolate {}", NAMES[n]));
                for m in (0..self.nodes.len()).filter(|&m| m != n) {
                    self.cut(n, m);
                }
            }
            Event::Promote => {
                self.note(|| format!("HA: promote {}", NAMES[d]));
                self.promote(d, true)?;
            }
            Event::Demote => self.demote(d),
            Event::Migrate => {
                self.note(|| format!("migration step {:?}", self.migration));
                self.migration_step()?;
            }
            Event::Fence => self.fence(d),
            Event::Decide => self.finish_round(d, false)?,
            Event::GiveUp => self.finish_round(d, true)?,
            Event::Resolve => self.resolve_split_brain(),
        }
        for n in 0..2 {
            self.finish_requests(n);
        }
        self.check()
    }

    /// Power everything on, heal every link, stop the application, demote every Primary,
    /// let the operator settle split brains, and drain; then the data nodes must reconnect
    /// and be identical.
    fn converge(&mut self) -> Result<(), String> {
        for n in 0..self.nodes.len() {
            self.power_on(n);
        }
        for l in &mut self.links {
            l.cut = false;
        }
        self.migration = None;
        for round in 0..500 {
            for n in 0..2 {
                self.nodes[n].app = false;
                self.complete_local(n);
                self.complete_peer_job(n);
                self.finish_round(n, round > 50)?;
                self.fence(n);
            }
            for a in 0..self.nodes.len() {
                for b in 0..self.nodes.len() {
                    if a != b {
                        self.deliver(a, b)?;
                    }
                }
            }
            for n in 0..2 {
                self.demote(n);
            }
            if self
                .nodes
                .iter()
                .filter(|n| n.role == Role::Primary)
                .count()
                < 2
            {
                for d in 0..2 {
                    self.nodes[d].allow_two = false;
                }
            }
            self.resolve_split_brain();
            for a in 0..self.nodes.len() {
                for b in a + 1..self.nodes.len() {
                    self.connect(a, b)?;
                }
            }
            for n in 0..2 {
                self.finish_requests(n);
            }
            self.check()?;
            if self.quiet() && self.links.iter().all(|l| l.up) {
                // A last handshake compares the replicas.
                self.drop_link(0, 1);
                self.connect(0, 1)?;
                if !self.is_up(0, 1) {
                    return Err(format!(
                        "hv1 and hv2 did not reconnect: {}",
                        self.describe()
                    ));
                }
                return Ok(());
            }
        }
        Err(format!("the cluster never settled: {}", self.describe()))
    }
}

/// Run one seeded schedule, adding what it did to `stats`; `Err` names the broken promise.
fn run_schedule(seed: u64, faults: Faults, stats: &mut Stats) -> Result<(), String> {
    let mut w = World::new(seed, faults)?;
    let steps = w.rng.gen_range(50..300);
    w.note(|| format!("{} nodes, quorum {:?}", w.nodes.len(), w.quorum));
    let mut result = Ok(());
    for _ in 0..steps {
        result = w.step();
        w.note(|| w.describe());
        if result.is_err() {
            break;
        }
    }
    let result = result.and_then(|()| w.converge());
    let s = &mut w.stats;
    s.schedules = 1;
    s.with_witness = u64::from(w.nodes.len() == 3);
    s.unfenced = u64::from(w.unfenced);
    stats.add(s);
    result
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.schedules += o.schedules;
        self.with_witness += o.with_witness;
        self.promotions += o.promotions;
        self.takeovers += o.takeovers;
        self.refused_promotions += o.refused_promotions;
        self.migrations += o.migrations;
        self.resyncs += o.resyncs;
        self.split_brains += o.split_brains;
        self.power_losses += o.power_losses;
        self.acknowledged_writes += o.acknowledged_writes;
        self.unfenced += o.unfenced;
    }
}

/// The first seed (of `TANDEM_SIM_SEEDS`) whose schedule breaks a promise under `faults`,
/// and what the schedules run did.
fn first_violation(faults: Faults) -> (Option<(u64, String)>, Stats) {
    let mut stats = Stats::default();
    let found = (0..super::seeds(DEFAULT_SEEDS)).find_map(|seed| {
        run_schedule(seed, faults, &mut stats)
            .err()
            .map(|e| (seed, e))
    });
    (found, stats)
}
