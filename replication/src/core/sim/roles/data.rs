//! The data path on the data nodes: a Primary's requests through its `PrimaryCore` (the
//! activity log, the new generation of the first write, acknowledgement after a peer loss
//! only once writes are admitted), flushes, and the Secondary's shell applying the peer's
//! writes.

use super::*;

impl World {
    pub(super) fn attach(&mut self, n: usize) {
        let d = other(n);
        if self.nodes[n].role != Role::Primary || !self.is_up(n, d) {
            return;
        }
        let node = &mut self.nodes[n];
        if let (Some(core), None) = (node.primary.as_mut(), node.channel) {
            node.channel = Some(core.attach_peer(NAMES[d]));
            self.nodes[d].applier = Some(Applier::new());
            self.primary_actions(n);
        }
    }

    pub(super) fn primary_actions(&mut self, n: usize) {
        while let Some(action) = self.nodes[n].primary.as_mut().and_then(|c| c.poll_action()) {
            match action {
                PrimaryAction::SendRequest { msg, .. } | PrimaryAction::Send { msg, .. } => {
                    self.send(n, other(n), Msg::ToSecondary(msg));
                }
                PrimaryAction::OutOfSync { offset, len, .. } => {
                    self.nodes[n].bitmap.extend(units_of(offset, len));
                }
                PrimaryAction::PeersDone {
                    wait,
                    unacknowledged,
                } => {
                    let node = &mut self.nodes[n];
                    if let Some(r) = node.requests.iter_mut().find(|r| r.wait == Some(wait)) {
                        r.peers_done = Some(unacknowledged);
                    } else if let Some(f) = node.flushes.iter_mut().find(|f| f.wait == Some(wait)) {
                        f.peers_done = Some(unacknowledged);
                    }
                }
                PrimaryAction::Reject { reason, .. } => panic!("rejected its peer: {reason}"),
                PrimaryAction::Extension { .. } => {}
            }
        }
    }

    /// A flush the peer `d` acknowledged: what it held before is stable there, durable.
    pub(super) fn flush_done(&mut self, d: usize, f: Flush) {
        let peer = &mut self.nodes[d];
        peer.durable.extend(f.must_be_stable.values().copied());
        for (u, tag) in f.must_be_stable {
            let stable = self.nodes[d].store.disk.stable[u];
            if stable < tag {
                self.violation.get_or_insert(format!(
                    "a completed flush left block {u} at write {stable} on {}'s stable \
                     storage, not {tag}",
                    NAMES[d]
                ));
            }
        }
    }

    /// The application may issue a request on `n` now (`Replica::admit`).
    pub(super) fn admits(&self, n: usize) -> bool {
        let node = &self.nodes[n];
        node.up
            && node.app
            && node.role == Role::Primary
            && node.disk == DiskState::UpToDate
            && self.writes_admitted(n)
    }

    pub(super) fn issue_write(&mut self, n: usize) {
        if !self.admits(n) || !self.new_generation_if_armed(n) {
            return;
        }
        let start = self.rng.gen_range(0..UNITS);
        let count = self.rng.gen_range(1..=3).min(UNITS - start);
        let (offset, len) = (start as u64 * UNIT, count as u64 * UNIT);
        let fua = self.rng.gen_bool(0.1);
        let tag = self.next_tag;
        let node = &mut self.nodes[n];
        let core = node.primary.as_mut().unwrap();
        if !core.try_claim(offset, offset + len, true) {
            return;
        }
        self.next_tag += 1;
        let mut data = vec![0u8; len as usize];
        for u in 0..count {
            data[u * UNIT as usize..][..8].copy_from_slice(&tag.to_le_bytes());
        }
        let op = Op::Write {
            data: Bytes::from(data),
            fua,
        };
        let units = units_of(offset, len);
        node.store.log(&units);
        let sendable: Vec<PeerId> = node.channel.into_iter().collect();
        let started = core.start_request(offset, &op, &sendable);
        let peer_boots = self.nodes[other(n)].boots;
        let node = &mut self.nodes[n];
        node.requests.push(Request {
            offset,
            units,
            tag,
            fua,
            epoch: started.epoch,
            closes_epoch: started.closes_epoch,
            wait: started.wait,
            local_done: false,
            sent_to_peer: !sendable.is_empty(),
            peer_boots,
            resynced_to_peer: false,
            peers_done: started.wait.is_none().then(Vec::new),
        });
        self.note(|| format!("{} writes w{tag} at {start}+{count}", NAMES[n]));
        self.primary_actions(n);
    }

    /// A flush starts the armed generation too (`Replica::flush`).
    fn flush_starts_generation(&mut self, n: usize) -> bool {
        self.faults.flush_in_old_generation || self.new_generation_if_armed(n)
    }

    /// The first write after a promotion with the peer away, or after a peer loss, starts
    /// a new generation; the attached peer follows it, the witness learns it. After a
    /// promotion it first outdates the peer away through the witness (false: the write
    /// waits for the answer).
    pub(super) fn new_generation_if_armed(&mut self, n: usize) -> bool {
        if !self.nodes[n].uuids.new_generation_pending {
            return true;
        }
        let d = other(n);
        let reached = self.is_up(n, d) && self.nodes[n].views.contains_key(&d);
        if std::mem::take(&mut self.nodes[n].outdate_at_first_write)
            && self.nodes[n].has_quorum
            && self.witness_reachable(n)
            && !reached
        {
            self.request_outdate(n, d);
        }
        if !self.writes_admitted(n) {
            return false;
        }
        let attached = self.nodes[n].channel.is_some();
        let disconnected: Vec<&str> = if attached {
            Vec::new()
        } else {
            vec![NAMES[other(n)]]
        };
        let rng = &mut self.rng;
        let g = self.nodes[n]
            .uuids
            .before_write(&disconnected, &mut || rng.gen());
        if let Some(generation) = g {
            self.note(|| format!("{} starts generation {generation}", NAMES[n]));
            self.send(n, other(n), Msg::NewCurrent(generation));
            self.broadcast(n);
        }
        true
    }

    pub(super) fn issue_flush(&mut self, n: usize) {
        if !self.admits(n) || !self.flush_starts_generation(n) {
            return;
        }
        let node = &mut self.nodes[n];
        node.store.flush();
        let must_be_stable = if node.channel.is_some() {
            self.nodes[other(n)].promised.clone()
        } else {
            BTreeMap::new()
        };
        let node = &mut self.nodes[n];
        let acked: Vec<u64> = node.held().into_iter().collect();
        let wait = node.primary.as_mut().unwrap().start_flush(true);
        if wait.is_some() {
            node.flushes.push(Flush {
                wait,
                must_be_stable,
                acked,
                peers_done: None,
            });
        } else {
            node.durable.extend(acked);
        }
        self.primary_actions(n);
    }

    pub(super) fn complete_local(&mut self, n: usize) {
        let pending: Vec<usize> = (0..self.nodes[n].requests.len())
            .filter(|&i| !self.nodes[n].requests[i].local_done)
            .collect();
        if pending.is_empty() {
            return;
        }
        let i = pending[self.rng.gen_range(0..pending.len())];
        let node = &mut self.nodes[n];
        let r = &mut node.requests[i];
        r.local_done = true;
        // The activity log keeps the units until the request completed on the peer too.
        node.store.disk.write(&r.units, r.tag, r.fua);
        self.finish_requests(n);
    }

    /// Complete every request and flush whose local part and peer are done, to the
    /// application: one the peer did not acknowledge (lost meanwhile) only once writes are
    /// admitted again (quorum, the peer outdated) and in the new generation the loss armed,
    /// like a new request (`hold_after_peer_loss`).
    pub(super) fn finish_requests(&mut self, n: usize) {
        let admitted = self.writes_admitted(n);
        let held = |lost: &Vec<String>| !lost.is_empty();
        let lost_any = self.nodes[n]
            .requests
            .iter()
            .any(|r| r.peers_done.as_ref().is_some_and(held))
            || self.nodes[n]
                .flushes
                .iter()
                .any(|f| f.peers_done.as_ref().is_some_and(held));
        let rotate = admitted && lost_any && !self.faults.late_ack_in_old_generation;
        if rotate && !self.new_generation_if_armed(n) {
            return;
        }
        while let Some(i) = self.nodes[n].flushes.iter().position(|f| {
            f.peers_done
                .as_ref()
                .is_some_and(|lost| lost.is_empty() || admitted)
        }) {
            let f = self.nodes[n].flushes.swap_remove(i);
            self.nodes[n].durable.extend(f.acked.iter().copied());
            if f.peers_done.as_ref().is_some_and(|l| l.is_empty()) {
                self.flush_done(other(n), f);
            }
        }
        loop {
            let admitted = self.writes_admitted(n);
            let node = &mut self.nodes[n];
            let Some(i) = node.requests.iter().position(|r| {
                r.local_done
                    && r.peers_done
                        .as_ref()
                        .is_some_and(|lost| lost.is_empty() || admitted)
            }) else {
                return;
            };
            let r = node.requests.swap_remove(i);
            node.store.end(&r.units);
            let d = other(n);
            // The peer's acknowledgement still holds unless it lost its cache since.
            let peer_holds = r.resynced_to_peer
                || r.sent_to_peer
                    && r.peers_done.as_ref().is_some_and(|l| l.is_empty())
                    && (self.nodes[d].boots == r.peer_boots || r.fua);
            for m in std::iter::once(n).chain(peer_holds.then_some(d)) {
                let holder = &mut self.nodes[m];
                holder.history.insert(r.tag, r.units.clone());
                if r.fua {
                    holder.durable.insert(r.tag);
                }
                for &u in &r.units {
                    holder.promised.insert(u, r.tag);
                }
            }
            self.note(|| {
                format!(
                    "{} acknowledges w{} (fua {}, peer holds it: {peer_holds})",
                    NAMES[n], r.tag, r.fua
                )
            });
            self.stats.acknowledged_writes += 1;
            let core = self.nodes[n].primary.as_mut().unwrap();
            if r.closes_epoch {
                core.request_finished(r.epoch);
            }
            core.release(r.offset);
            self.primary_actions(n);
        }
    }

    pub(super) fn complete_peer_job(&mut self, n: usize) {
        let node = &mut self.nodes[n];
        let Some(applier) = node.applier.as_mut().filter(|a| !a.running.is_empty()) else {
            return;
        };
        let index = self.rng.gen_range(0..applier.running.len());
        let sends = applier.complete(index, &mut node.store, false);
        for m in sends {
            self.send(n, other(n), Msg::ToPrimary(m));
        }
    }
}
