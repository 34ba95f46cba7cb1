//! What both simulators model of a data host: a disk with a volatile cache in front of
//! stable storage, the activity log that survives a power loss, and the Secondary's shell
//! around a [`SecondaryCore`] (apply a job on the disk inside the log, hand back its reply).
//!
//! A unit is 4 KiB; a write stamps every unit it covers with its tag, a number that grows
//! with every write, so "reads write N" is one comparison.

use std::collections::{BTreeMap, BTreeSet};

use rand::rngs::StdRng;
use rand::Rng;

use crate::core::op::Op;
use crate::core::secondary::{Job, SecondaryAction, SecondaryCore, Work};
use crate::wire::{Message, WriteOutcome};

pub(super) const UNIT: u64 = 4096;
pub(super) const UNITS: usize = 24;
pub(super) const SIZE: u64 = UNIT * UNITS as u64;

/// The tag written into every unit of a request's data.
pub(super) fn tag_of(data: &[u8]) -> u64 {
    u64::from_le_bytes(data[..8].try_into().unwrap())
}

pub(super) fn units_of(offset: u64, len: u64) -> Vec<usize> {
    ((offset / UNIT) as usize..((offset + len) / UNIT) as usize).collect()
}

/// A disk: a tag per unit, with a volatile cache in front of stable storage.
#[derive(Clone)]
pub(super) struct Disk {
    pub stable: Vec<u64>,
    pub cache: BTreeMap<usize, u64>,
}

impl Disk {
    pub fn new() -> Disk {
        Disk {
            stable: vec![0; UNITS],
            cache: BTreeMap::new(),
        }
    }

    pub fn write(&mut self, units: &[usize], tag: u64, fua: bool) {
        for &u in units {
            if fua {
                self.cache.remove(&u);
                self.stable[u] = tag;
            } else {
                self.cache.insert(u, tag);
            }
        }
    }

    pub fn flush(&mut self) {
        for (u, tag) in std::mem::take(&mut self.cache) {
            self.stable[u] = tag;
        }
    }

    pub fn read(&self, u: usize) -> u64 {
        self.cache.get(&u).copied().unwrap_or(self.stable[u])
    }

    /// Each cached unit independently reached stable storage or not.
    pub fn lose_power(&mut self, rng: &mut StdRng) {
        for (u, tag) in std::mem::take(&mut self.cache) {
            if rng.gen_bool(0.5) {
                self.stable[u] = tag;
            }
        }
    }

    /// Resync unit `u` from `source`: written and flushed on the target.
    pub fn copy_from(&mut self, source: &Disk, u: usize) {
        self.stable[u] = source.read(u);
        self.cache.remove(&u);
    }
}

/// A data host's disk and its activity log: the units of writes in flight or applied since
/// the last flush, on stable storage (they survive a power loss).
pub(super) struct Store {
    pub disk: Disk,
    log_active: BTreeMap<usize, u32>,
    log_unflushed: BTreeSet<usize>,
}

impl Store {
    pub fn new() -> Store {
        Store {
            disk: Disk::new(),
            log_active: BTreeMap::new(),
            log_unflushed: BTreeSet::new(),
        }
    }

    /// A write of `units` enters the log before it is issued.
    pub fn log(&mut self, units: &[usize]) {
        for &u in units {
            *self.log_active.entry(u).or_default() += 1;
        }
    }

    /// Write `units`; the logged ones stay hot until the next flush.
    pub fn write(&mut self, units: &[usize], tag: u64, fua: bool) {
        self.disk.write(units, tag, fua);
        self.end(units);
    }

    /// A logged request on `units` completed (a Primary's: locally and on its peers).
    pub fn end(&mut self, units: &[usize]) {
        for &u in units {
            if let Some(n) = self.log_active.get_mut(&u) {
                *n -= 1;
                if *n == 0 {
                    self.log_active.remove(&u);
                }
                self.log_unflushed.insert(u);
            }
        }
    }

    pub fn flush(&mut self) {
        self.disk.flush();
        self.log_unflushed.clear();
    }

    /// The units the log marks: what may differ from the peers after a crash.
    pub fn hot(&self) -> impl Iterator<Item = usize> + '_ {
        self.log_active
            .keys()
            .chain(self.log_unflushed.iter())
            .copied()
    }

    /// After a resync (which flushes at the end) the log may forget every extent.
    pub fn forget_log(&mut self) {
        self.log_active.clear();
        self.log_unflushed.clear();
    }
}

/// The Secondary's shell for one link: its core and the jobs started and not finished.
pub(super) struct Applier {
    pub core: SecondaryCore,
    pub running: Vec<Job>,
}

impl Applier {
    pub fn new() -> Applier {
        Applier {
            core: SecondaryCore::new(false, 1 << 20),
            running: Vec::new(),
        }
    }

    /// Carry out a job on the disk (inside the activity log) and build its reply.
    fn apply(store: &mut Store, work: &Work) -> Message {
        match work {
            Work::Request { seq, offset, op } => {
                let units = units_of(*offset, op.len());
                match op {
                    Op::Write { data, fua } => store.write(&units, tag_of(data), *fua),
                    _ => store.end(&units),
                }
                Message::WriteAck {
                    seq: *seq,
                    outcome: WriteOutcome::Written,
                }
            }
            Work::Flush { id } => {
                store.flush();
                Message::FlushAck { id: *id }
            }
            other => panic!("unexpected job {other:?}"),
        }
    }

    /// The core's actions: started jobs enter the activity log (unless `skip_log`, a
    /// fault); returns what to send to the Primary.
    pub fn actions(&mut self, store: &mut Store, skip_log: bool) -> Vec<Message> {
        let mut sends = Vec::new();
        while let Some(action) = self.core.poll_action() {
            match action {
                SecondaryAction::Send(msg) => sends.push(msg),
                SecondaryAction::Start(job) => {
                    if let Work::Request { offset, op, .. } = &job.work {
                        if !skip_log {
                            store.log(&units_of(*offset, op.len()));
                        }
                    }
                    self.running.push(job);
                }
                SecondaryAction::Extension(_) => {}
                SecondaryAction::Fail(e) => panic!("a secondary failed: {e}"),
            }
        }
        sends
    }

    /// Finish the running job at `index`; returns what to send to the Primary.
    pub fn complete(&mut self, index: usize, store: &mut Store, skip_log: bool) -> Vec<Message> {
        let job = self.running.swap_remove(index);
        let reply = Self::apply(store, &job.work);
        self.core.handle_done(job.held, Ok(reply));
        self.actions(store, skip_log)
    }

    /// The link is gone: finish what the core still starts (the shell writes what it
    /// received), sending nothing.
    pub fn finish_after_link_down(&mut self, store: &mut Store, skip_log: bool) {
        self.core.handle_link_down();
        self.actions(store, skip_log);
        while let Some(job) = self.running.pop() {
            let reply = Self::apply(store, &job.work);
            self.core.handle_done(job.held, Ok(reply));
            self.actions(store, skip_log);
        }
    }
}
