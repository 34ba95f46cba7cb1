//! What operators, HA agents and hosts do: promote (the local gate, then the 2PC round),
//! demote, fence, power loss and power on, live migrations, split-brain resolution.

use super::*;

impl World {
    /// `tandem promote` (or the HA agent): the local gate, then the 2PC round.
    pub(super) fn promote(&mut self, n: usize, starts_app: bool) -> Result<(), String> {
        let node = &self.nodes[n];
        if !node.up || !node.diskful || node.role == Role::Primary || node.round.is_some() {
            return Ok(());
        }
        let facts = self.facts(n);
        if let Err(r) = promotion::check_promote(&self.view(n, &facts)) {
            self.note(|| format!("{} refuses to promote: {r:?}", NAMES[n]));
            self.stats.refused_promotions += 1;
            if !starts_app {
                self.abort_migration();
            }
            return Ok(());
        }
        if self.nodes[n].grant.is_some() {
            return Ok(()); // busy: it granted another node's round
        }
        // The "link id" each member was asked on is its index here.
        let asked: BTreeMap<String, u64> = (0..self.nodes.len())
            .filter(|&m| m != n && self.is_up(n, m) && self.nodes[n].views.contains_key(&m))
            .map(|m| (NAMES[m].to_string(), m as u64))
            .collect();
        let two_primaries = self.nodes[n].allow_two;
        let id = self.nodes[n].id();
        self.note(|| format!("{} starts promotion round {id} asking {asked:?}", NAMES[n]));
        for &m in asked.values() {
            self.send(n, m as usize, Msg::Prepare { id, two_primaries });
        }
        let nobody = asked.is_empty();
        let node = &mut self.nodes[n];
        node.round = Some(Round::new(id, asked));
        node.round_starts_app = starts_app;
        if nobody {
            // Nobody to wait for: the engine decides at once, under the same lock.
            self.finish_round(n, false)
        } else {
            Ok(())
        }
    }

    /// The promoting node decides its round: it is decided, or `timed_out`.
    pub(super) fn finish_round(&mut self, n: usize, timed_out: bool) -> Result<(), String> {
        let node = &self.nodes[n];
        if !node
            .round
            .as_ref()
            .is_some_and(|r| r.is_decided() || timed_out)
        {
            return Ok(());
        }
        let round = self.nodes[n].round.take().unwrap();
        let facts = self.facts(n);
        let view = self.view(n, &facts);
        let outcome = promotion::round_outcome(&round, &view, self.nodes[n].has_quorum)
            .map_err(|f| format!("{f:?}"))
            .and_then(|()| promotion::check_promote(&view).map_err(|r| format!("{r:?}")));
        let commit = outcome.is_ok();
        self.note(|| format!("{} decides round {}: {outcome:?}", NAMES[n], round.id));
        if commit {
            self.become_primary(n)?;
        } else if !self.nodes[n].round_starts_app {
            self.abort_migration();
        }
        for &m in round.asked.values() {
            let id = round.id;
            self.send(n, m as usize, Msg::Decision { id, commit });
        }
        if commit {
            self.recompute_quorum(n);
            self.broadcast(n);
        }
        Ok(())
    }

    pub(super) fn become_primary(&mut self, n: usize) -> Result<(), String> {
        let d = other(n);
        let connected = self.is_up(n, d) && self.nodes[n].views.contains_key(&d);
        if self.quorum == QuorumMode::Off && !connected {
            self.unfenced = true;
        }
        self.stats.promotions += 1;
        self.stats.takeovers += u64::from(!connected);
        self.check_takeover(n)?;
        // The data peer away may reach the witness: the first write outdates it there.
        self.nodes[n].outdate_at_first_write = !connected && !self.faults.no_outdate_at_promotion;
        let node = &self.nodes[n];
        let starts_app = node.round_starts_app && !self.nodes.iter().any(|x| x.app);
        let node = &mut self.nodes[n];
        node.uuids.on_promote(!connected);
        node.role = Role::Primary;
        let mut core = PrimaryCore::new(ReplicationProtocol::C, 8);
        core.set_known_peers(&[NAMES[d].to_string()]);
        node.primary = Some(core);
        node.app = starts_app;
        self.attach(n);
        Ok(())
    }

    /// `n` becomes Primary: it reads every write completed with its own acknowledgement
    /// (the failover promise of protocol C) and, with a witness, every flushed write
    /// anybody holds; without one only its own flushed writes (a partition may promote
    /// both sides), and nothing once unfenced.
    pub(super) fn check_takeover(&self, n: usize) -> Result<(), String> {
        if self.unfenced {
            return Ok(());
        }
        let disk = &self.nodes[n].store.disk;
        let own = self.nodes[n].promised.iter().map(|(&u, &w)| (u, w, n));
        let holders = if self.witness() { 0..2 } else { n..n + 1 };
        let flushed = holders.flat_map(|y| {
            let h = &self.nodes[y];
            h.durable
                .iter()
                .filter_map(move |w| h.history.get(w).map(|units| (w, units, y)))
                .flat_map(|(&w, units, y)| units.iter().map(move |&u| (u, w, y)))
        });
        match own.chain(flushed).find(|&(u, w, _)| disk.read(u) < w) {
            Some((u, w, y)) => Err(format!(
                "{} became Primary reading write {} at block {u}, but write {w} was \
                 acknowledged there (held by {})",
                NAMES[n],
                disk.read(u),
                NAMES[y]
            )),
            None => Ok(()),
        }
    }

    /// `tandem demote`: waits until every write reached the peer, then the data link
    /// cycles (it reconnects as Secondary).
    pub(super) fn demote(&mut self, n: usize) {
        let node = &self.nodes[n];
        let idle = node.requests.is_empty()
            && node.flushes.is_empty()
            && node.primary.as_ref().is_none_or(|c| c.is_replicated());
        if node.role == Role::Primary && idle {
            // The demotion's flush (every write reached the peer, whose flush it waits for).
            // It promises the application nothing: the application stopped without one.
            let peer = node.channel.map(|_| other(n));
            for m in std::iter::once(n).chain(peer) {
                self.nodes[m].store.flush();
            }
            self.demote_now(n);
        }
    }

    /// Drop the Primary role at once (force-secondary, fencing, a clean demote): requests
    /// in flight finish locally but are never acknowledged.
    pub(super) fn demote_now(&mut self, n: usize) {
        let node = &mut self.nodes[n];
        if node.role != Role::Primary {
            return;
        }
        self.note(|| format!("{} demoted", NAMES[n]));
        let node = &mut self.nodes[n];
        for r in std::mem::take(&mut node.requests) {
            if !r.local_done {
                node.store.disk.write(&r.units, r.tag, r.fua);
            }
        }
        node.flushes.clear();
        if let (Some(core), Some(ch)) = (node.primary.as_mut(), node.channel.take()) {
            core.handle_link_down(ch);
            self.primary_actions(n);
        }
        let node = &mut self.nodes[n];
        node.primary = None;
        node.role = Role::Secondary;
        node.uuids.on_demote();
        node.pending_outdates.clear();
        node.outdate_at_first_write = false;
        node.app = false;
        self.broadcast(n);
        let d = other(n);
        if self.is_up(n, d) {
            self.drop_link(n, d);
            let _ = self.connect(n, d);
        }
    }

    /// The HA agent on a node running the application without quorum fences it.
    pub(super) fn fence(&mut self, n: usize) {
        if self.nodes[n].role == Role::Primary && self.frozen(n) {
            self.demote_now(n);
        }
    }

    pub(super) fn power_loss(&mut self, n: usize) {
        if !self.nodes[n].up {
            return;
        }
        self.note(|| format!("{} loses power", NAMES[n]));
        for m in 0..self.nodes.len() {
            if m != n && self.is_up(n, m) {
                let link = self.link(n, m);
                link.up = false;
                link.q = Default::default();
                if self.nodes[m].up {
                    self.link_down(m, n);
                }
            }
        }
        // What was not made durable is no longer promised here, whether it happens to
        // reach stable storage or not.
        let node = &mut self.nodes[n];
        let durable = &node.durable;
        node.promised.retain(|_, tag| durable.contains(tag));
        node.store.disk.lose_power(&mut self.rng);
        self.stats.power_losses += 1;
        node.up = false;
        node.boots += 1;
        node.role = Role::Secondary;
        node.has_quorum = false;
        node.allow_two = false;
        node.views.clear();
        node.round = None;
        node.grant = None;
        node.pending_outdates.clear();
        node.outdate_at_first_write = false;
        node.relayed_outdates.clear();
        node.seen_lineages.clear();
        node.discard_my_data = false;
        node.primary = None;
        node.channel = None;
        node.applier = None;
        node.requests.clear();
        node.flushes.clear();
        node.app = false;
        if self
            .migration
            .as_ref()
            .is_some_and(|mg| mg.source == n || mg.destination == n)
        {
            self.abort_migration();
        }
    }

    /// Start-up after a power loss: the activity log goes into the bitmap; a crashed
    /// Primary owes its peer a resync, a Secondary with hot extents is uncertain
    /// (`metadata.rs`).
    pub(super) fn power_on(&mut self, n: usize) {
        let node = &mut self.nodes[n];
        if node.up {
            return;
        }
        node.up = true;
        if node.diskful {
            let hot: Vec<usize> = node.store.hot().collect();
            let peer = [NAMES[other(n)]];
            if node.uuids.flags.primary {
                node.uuids.mark_crashed_primary(&peer);
                node.uuids.flags.primary = false;
            } else if !hot.is_empty() {
                node.uuids.mark_uncertain(&peer);
            }
            node.bitmap.extend(hot);
            node.store.forget_log();
            node.uuids.new_generation_pending = false;
            node.disk = role::disk_state_at_attach(&node.uuids);
        }
        self.note(|| format!("{} powers on", NAMES[n]));
    }

    /// The migration ends: the gate closes once only one Primary is left (the one not
    /// running the application is demoted first).
    pub(super) fn abort_migration(&mut self) {
        let both = self.nodes[0].role == Role::Primary && self.nodes[1].role == Role::Primary;
        let Some(m) = self.migration.as_mut() else {
            return;
        };
        if both {
            if self.nodes[m.source].app {
                m.source = m.destination;
            }
            m.stage = Stage::DemoteSource;
        } else {
            m.stage = Stage::CloseGate;
        }
    }

    /// One step of a live migration: open the gate on both, promote the destination, move
    /// the writer, demote the source, close the gate.
    pub(super) fn migration_step(&mut self) -> Result<(), String> {
        let Some(m) = self.migration.as_ref() else {
            let Some(source) = (0..2).find(|&d| self.nodes[d].app) else {
                return Ok(());
            };
            let destination = other(source);
            if self.nodes[destination].up && self.is_up(source, destination) {
                self.note(|| format!("migration {} -> {}", NAMES[source], NAMES[destination]));
                self.migration = Some(Migration {
                    source,
                    destination,
                    stage: Stage::OpenGate,
                });
            }
            return Ok(());
        };
        let (source, destination) = (m.source, m.destination);
        match m.stage {
            Stage::OpenGate => {
                for d in [source, destination] {
                    self.nodes[d].allow_two = true;
                    self.broadcast(d);
                }
                self.migration.as_mut().unwrap().stage = Stage::PromoteDestination;
            }
            Stage::PromoteDestination => {
                if self.nodes[destination].role == Role::Primary {
                    self.migration.as_mut().unwrap().stage = Stage::MoveWriter;
                } else {
                    self.promote(destination, false)?;
                }
            }
            Stage::MoveWriter => {
                // The VM moves over the replication link's network, once the source idles.
                if self.nodes[source].requests.is_empty() && self.is_up(source, destination) {
                    self.nodes[source].app = false;
                    self.nodes[destination].app = self.nodes[destination].role == Role::Primary;
                    self.migration.as_mut().unwrap().stage = Stage::DemoteSource;
                }
            }
            Stage::DemoteSource => {
                self.nodes[source].app = false;
                self.demote(source);
                if self.nodes[source].role != Role::Primary {
                    self.migration.as_mut().unwrap().stage = Stage::CloseGate;
                }
            }
            Stage::CloseGate
                if self
                    .nodes
                    .iter()
                    .all(|n| n.role == Role::Primary || !n.diskful) =>
            {
                self.abort_migration(); // promoted meanwhile (an HA agent, the gate open)
            }
            Stage::CloseGate => {
                for d in [source, destination] {
                    self.nodes[d].allow_two = false;
                    self.broadcast(d);
                }
                self.migration = None;
                self.stats.migrations += 1;
            }
        }
        Ok(())
    }

    /// Without a witness the operator resolves a split brain: a Secondary side discards
    /// its changes (its acknowledged writes since the split are given up by choice).
    pub(super) fn resolve_split_brain(&mut self) {
        if !self.split_brain || self.is_up(0, 1) || self.nodes.iter().any(|n| n.discard_my_data) {
            return;
        }
        let Some(victim) =
            (0..2).find(|&d| self.nodes[d].up && self.nodes[d].role != Role::Primary)
        else {
            return;
        };
        self.note(|| format!("operator: {} discards its data", NAMES[victim]));
        self.nodes[victim].discard_my_data = true;
    }
}
