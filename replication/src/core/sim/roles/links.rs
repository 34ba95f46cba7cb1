//! Links: what a node does when one goes down (`connection.rs`, `link_down`: the data
//! path, a new generation armed, outdating through the witness), the handshake of a data
//! link (`sync_decision::decide`, `handshake::plan`, the resync), the state exchange with
//! the witness, and the lineage relay that tells a node it was left behind (`outdate.rs`).

use super::*;

impl World {
    /// The link `a`–`b` goes down (both ends see it, if powered).
    pub(super) fn drop_link(&mut self, a: usize, b: usize) {
        let link = self.link(a, b);
        if !link.up {
            return;
        }
        link.up = false;
        link.q = Default::default();
        self.note(|| format!("link {}-{} down", NAMES[a], NAMES[b]));
        for (n, p) in [(a, b), (b, a)] {
            if self.nodes[n].up {
                self.link_down(n, p);
            }
        }
    }

    /// One end's side of a link loss (`connection.rs`, `link_down`).
    pub(super) fn link_down(&mut self, n: usize, p: usize) {
        let peer_was_primary = self.nodes[n]
            .views
            .remove(&p)
            .is_some_and(|s| s.role == Role::Primary);
        let data = self.nodes[n].diskful && self.nodes[p].diskful;
        let node = &mut self.nodes[n];
        if data {
            if let (Some(core), Some(ch)) = (node.primary.as_mut(), node.channel.take()) {
                core.handle_link_down(ch);
                self.primary_actions(n);
            }
            let node = &mut self.nodes[n];
            if let Some(mut applier) = node.applier.take() {
                applier.finish_after_link_down(&mut node.store, false);
            }
            if node.role == Role::Primary {
                let dual_without_quorum = peer_was_primary
                    && (self.quorum == QuorumMode::Off || self.faults.no_generation_after_dual);
                node.uuids.on_peer_lost(true, dual_without_quorum);
                // Two Primaries that lose each other without quorum: DRBD without fencing.
                self.unfenced |= peer_was_primary && self.quorum == QuorumMode::Off;
            }
        }
        let node = &mut self.nodes[n];
        if node.grant.is_some_and(|(to, _)| to == p) {
            node.grant = None;
        }
        if let Some(round) = node.round.as_mut() {
            round.handle_link_down(NAMES[p]);
        }
        let unreachable: Vec<Ticket> = node
            .relayed_outdates
            .values()
            .filter(|t| t.target == p)
            .copied()
            .collect();
        for t in unreachable {
            self.nodes[n].relayed_outdates.remove(&t.id);
            let reply = Msg::OutdateReply(t, OutdateResult::Unreachable);
            self.send(n, t.requester, reply);
        }
        self.recompute_quorum(n);
        // Keep the lost Secondary from being promoted with stale data: outdate it through
        // the witness before writing on.
        let node = &self.nodes[n];
        if data && node.role == Role::Primary && node.has_quorum && self.witness_reachable(n) {
            self.request_outdate(n, p);
        }
        self.broadcast(n);
    }

    /// The link `a`–`b` is connected: a promotion round of either end that did not ask
    /// the other fails (`twopc.rs`, `twopc_link_up`).
    fn link_up(&mut self, a: usize, b: usize) {
        self.link(a, b).up = true;
        self.note(|| format!("link {}-{} up", NAMES[a], NAMES[b]));
        for (n, p) in [(a, b), (b, a)] {
            if !self.faults.no_retry_on_link_up {
                if let Some(round) = self.nodes[n].round.as_mut() {
                    round.handle_link_up(NAMES[p]);
                }
            }
        }
    }

    pub(super) fn witness_reachable(&self, n: usize) -> bool {
        self.witness() && n != 2 && self.is_up(n, 2) && self.nodes[n].views.contains_key(&2)
    }

    pub(super) fn request_outdate(&mut self, n: usize, target: usize) {
        let id = self.nodes[n].id();
        self.nodes[n].pending_outdates.insert(target, id);
        self.send_outdate(n, target, id);
    }

    pub(super) fn send_outdate(&mut self, n: usize, target: usize, id: u64) {
        let generation = self.nodes[n].uuids.current;
        let ticket = Ticket {
            id,
            target,
            requester: n,
        };
        self.send(n, 2, Msg::Outdate(ticket, generation));
    }

    pub(super) fn cut(&mut self, a: usize, b: usize) {
        self.link(a, b).cut = true;
        self.drop_link(a, b);
    }

    /// Bring the link `a`–`b` up: the state exchange, and on a data link the handshake
    /// (`connection.rs`), carried out at once.
    pub(super) fn connect(&mut self, a: usize, b: usize) -> Result<(), String> {
        let link = &self.links[link_index(a, b)];
        if link.up || link.cut || !self.nodes[a].up || !self.nodes[b].up {
            return Ok(());
        }
        let (sa, sb) = (self.local_state(a, b, true), self.local_state(b, a, true));
        if !(self.nodes[a].diskful && self.nodes[b].diskful) {
            return self.connect_witness(a, b, sa, sb);
        }
        // The handshake waits for the requests in flight (not for those only waiting to be
        // acknowledged: their data is on the disk and their peer's bits are set).
        let waiting = |n: usize| {
            self.nodes[n]
                .requests
                .iter()
                .all(|r| r.local_done && r.peers_done.is_some())
        };
        if !waiting(a) || !waiting(b) {
            return Ok(());
        }
        let decision = |x: usize, y: usize| {
            let ctx = DecisionContext {
                local_name: NAMES[x],
                peer_name: NAMES[y],
                protocol: Protocol::C,
            };
            decide(&self.nodes[x].uuids, &self.nodes[y].uuids, &ctx)
        };
        let plan_of = |x: usize, y: usize, mine: &PeerState, theirs: &PeerState| {
            let h = Handshake {
                local_name: NAMES[x],
                peer_name: NAMES[y],
                mine,
                theirs,
                after_split_brain: AfterSplitBrain::Disconnect,
                frozen: self.frozen(x),
            };
            handshake::plan(&h, &decision(x, y))
        };
        let (oa, pa) = plan_of(a, b, &sa, &sb);
        let (ob, pb) = plan_of(b, a, &sb, &sa);
        let rule = decision(a, b).rule;
        self.note(|| {
            format!(
                "handshake {}-{}: {oa:?} by {rule:?}: {pa:?} / {pb:?}",
                NAMES[a], NAMES[b]
            )
        });
        if oa != ob.mirrored() || !mirrored_plans(pa, pb) {
            return Err(format!(
                "asymmetric handshake: {} decided {oa:?} ({pa:?}), {} decided {ob:?} ({pb:?})",
                NAMES[a], NAMES[b]
            ));
        }
        for (n, plan) in [(a, pa), (b, pb)] {
            if plan == Plan::StepDown {
                self.demote_now(n);
            }
        }
        let discarding = self.nodes[a].discard_my_data || self.nodes[b].discard_my_data;
        let histories_diverged = !discarding
            && !self.unfenced
            && diverged(&self.nodes[a].history, &self.nodes[b].history);
        match pa {
            Plan::StandAlone => {
                self.split_brain = true;
                self.stats.split_brains += 1;
                if self.witness() {
                    return Err(format!(
                        "split brain with a witness: {}-{} decided {oa:?} by {rule:?}",
                        NAMES[a], NAMES[b]
                    ));
                }
                return Ok(());
            }
            Plan::StepDown | Plan::Refuse(_) => return Ok(()),
            _ if matches!(pb, Plan::StepDown | Plan::Refuse(_)) => return Ok(()),
            _ if histories_diverged => {
                return Err(format!(
                    "{} and {} both hold acknowledged writes the other lacks, yet the \
                     handshake decided {oa:?} by {rule:?}",
                    NAMES[a], NAMES[b]
                ));
            }
            Plan::KeepBits => {}
            Plan::InSync => {
                if let Some(u) = (0..UNITS)
                    .find(|&u| self.nodes[a].store.disk.read(u) != self.nodes[b].store.disk.read(u))
                {
                    return Err(format!(
                        "{}-{}: no sync by {rule:?} but block {u} holds write {} on {} and {} on {}",
                        NAMES[a],
                        NAMES[b],
                        self.nodes[a].store.disk.read(u),
                        NAMES[a],
                        self.nodes[b].store.disk.read(u),
                        NAMES[b]
                    ));
                }
                for (x, peer_disk) in [(a, sb.disk), (b, sa.disk)] {
                    let node = &mut self.nodes[x];
                    node.uuids.in_sync_with(NAMES[other(x)]);
                    node.disk =
                        role::disk_state_after_handshake(node.disk, SyncOutcome::NoSync, peer_disk);
                    if node.disk == DiskState::UpToDate {
                        node.uuids.flags.was_up_to_date = true;
                        node.uuids.flags.consistent = true;
                    }
                    node.bitmap.clear();
                }
            }
            Plan::Resync { direction, full } => {
                let (s, t) = match direction {
                    Direction::LocalIsSource => (a, b),
                    Direction::LocalIsTarget => (b, a),
                };
                self.resync(s, t, full)?;
                self.stats.resyncs += 1;
            }
        }
        self.link_up(a, b);
        self.split_brain = false;
        for (x, y) in [(a, b), (b, a)] {
            let s = self.local_state(y, x, false);
            let node = &mut self.nodes[x];
            node.views.insert(y, s);
            node.pending_outdates.remove(&y);
            node.discard_my_data = false;
        }
        for x in [a, b] {
            let y = other(x);
            let peer = Some((ReplicationState::Established, self.nodes[y].disk));
            if role::outdated_but_newest(self.nodes[x].disk, &[peer]) {
                let node = &mut self.nodes[x];
                node.disk = DiskState::UpToDate;
                node.uuids.flags.was_up_to_date = true;
                node.uuids.flags.consistent = true;
            }
            self.recompute_quorum(x);
        }
        self.attach(a);
        self.attach(b);
        self.broadcast(a);
        self.broadcast(b);
        Ok(())
    }

    /// Copy what the bitmaps mark from `s` to `t`; they must then be identical.
    pub(super) fn resync(&mut self, s: usize, t: usize, full: bool) -> Result<(), String> {
        let (src, tgt) = (&self.nodes[s], &self.nodes[t]);
        // The target's flushed writes must read back afterwards (only a flush promises more
        // than a failover: an unflushed write may vanish with a crash or a fenced Primary,
        // even if the target still holds it), unless the operator discards its data.
        let flushed: Vec<(u64, Vec<usize>)> = tgt
            .durable
            .iter()
            .filter(|_| !tgt.discard_my_data && !self.unfenced)
            .filter_map(|w| tgt.history.get(w).map(|units| (*w, units.clone())))
            .collect();
        let units: BTreeSet<usize> = if full {
            (0..UNITS).collect()
        } else {
            src.bitmap.union(&tgt.bitmap).copied().collect()
        };
        let source_disk = src.store.disk.clone();
        let (source_history, source_promised) = (src.history.clone(), src.promised.clone());
        let source_durable = src.durable.clone();
        let source_uuids = src.uuids.clone();
        let node = &mut self.nodes[t];
        let mut wrote = false;
        for &u in &units {
            wrote |= node.store.disk.read(u) != source_disk.read(u);
            node.store.disk.copy_from(&source_disk, u);
        }
        node.store.flush();
        node.store.forget_log();
        if let Some(u) = (0..UNITS).find(|&u| node.store.disk.read(u) != source_disk.read(u)) {
            return Err(format!(
                "after {} resync {}->{}, block {u} holds write {} on {} and {} on {}",
                if full { "full" } else { "bitmap" },
                NAMES[s],
                NAMES[t],
                source_disk.read(u),
                NAMES[s],
                node.store.disk.read(u),
                NAMES[t]
            ));
        }
        let lost = flushed.iter().find_map(|(w, units)| {
            let disk = &node.store.disk;
            units.iter().find(|&&u| disk.read(u) < *w).map(|&u| (w, u))
        });
        if let Some((w, u)) = lost {
            return Err(format!(
                "{} became SyncTarget of {} and lost flushed write {w} at block {u}",
                NAMES[t], NAMES[s]
            ));
        }
        node.durable = source_durable;
        node.history = source_history;
        node.promised = source_promised;
        let names: &[&str] = if wrote { &NAMES[..2] } else { &[] };
        node.uuids
            .finish_resync_as_target(NAMES[t], NAMES[s], &source_uuids, names);
        node.disk = DiskState::UpToDate;
        node.bitmap.clear();
        let source = &mut self.nodes[s];
        source.uuids.finish_resync_as_source(NAMES[t]);
        for r in &mut source.requests {
            r.resynced_to_peer = true;
        }
        if source.disk == DiskState::Consistent {
            source.disk = DiskState::UpToDate;
        }
        source.bitmap.clear();
        self.note(|| {
            format!(
                "resync {} -> {} ({} units)",
                NAMES[s],
                NAMES[t],
                units.len()
            )
        });
        Ok(())
    }

    pub(super) fn connect_witness(
        &mut self,
        a: usize,
        b: usize,
        sa: PeerState,
        sb: PeerState,
    ) -> Result<(), String> {
        self.link_up(a, b);
        let mut behind = Vec::new();
        for (x, y, s) in [(a, b, sb), (b, a, sa)] {
            if let Some(newer) = self.note_generations(x, y, &s) {
                behind.push((x, newer));
            }
            self.nodes[x].views.insert(y, s);
            self.recompute_quorum(x);
            // Outdate requests sent through an earlier link may be lost with it: again.
            let node = &self.nodes[x];
            if !self.nodes[y].diskful && node.role == Role::Primary && behind.is_empty() {
                let pending: Vec<(usize, u64)> = node
                    .pending_outdates
                    .iter()
                    .map(|(t, id)| (*t, *id))
                    .collect();
                for (target, id) in pending {
                    self.send_outdate(x, target, id);
                }
            }
        }
        for (x, newer) in behind {
            self.left_behind(x, newer);
        }
        self.broadcast(a);
        self.broadcast(b);
        Ok(())
    }

    /// A witness remembers each data node's lineage (returns None); a data node looks in
    /// the witness's memory for a data node it is not connected to that moved on from its
    /// generation (`outdate.rs`, `note_generations`). A changed memory is broadcast.
    pub(super) fn note_generations(
        &mut self,
        n: usize,
        from: usize,
        state: &PeerState,
    ) -> Option<usize> {
        if !self.nodes[n].diskful {
            let u = state.uuids.as_ref().filter(|_| !state.diskless)?;
            let lineage = u.lineage();
            let old = self.nodes[n]
                .seen_lineages
                .insert(NAMES[from].to_string(), lineage.clone());
            if old.as_ref() != Some(&lineage) {
                self.broadcast(n);
            }
            return None;
        }
        if !state.diskless {
            return None;
        }
        let current = self.nodes[n].uuids.current;
        state
            .seen_lineages
            .iter()
            .find(|(node, lineage)| {
                let d = NAMES.iter().position(|x| x == node);
                d.is_some_and(|d| d != n && d < 2 && !self.is_up(n, d))
                    && moved_on_from(lineage, current)
            })
            .and_then(|(node, _)| NAMES.iter().position(|x| x == node))
    }

    /// `newer`, not connected to `n`, moved on from `n`'s generation: a Primary without
    /// quorum steps down; the disk is Outdated (`outdate.rs`, `left_behind`).
    pub(super) fn left_behind(&mut self, n: usize, newer: usize) {
        let node = &self.nodes[n];
        if node.role == Role::Primary && node.has_quorum {
            return;
        }
        self.note(|| format!("{} left behind by {}", NAMES[n], NAMES[newer]));
        if node.role == Role::Primary {
            self.demote_now(n);
        }
        if !self.is_up(n, newer) && self.nodes[n].role != Role::Primary && self.mark_outdated(n) {
            self.broadcast(n);
        }
    }
}

/// Both sides of a handshake agree on what the pair does (either may refuse or step down
/// alone: the pair then does not connect).
fn mirrored_plans(a: Plan, b: Plan) -> bool {
    let declines = |p| matches!(p, Plan::Refuse(_) | Plan::StepDown);
    match (a, b) {
        _ if declines(a) || declines(b) => true,
        (
            Plan::Resync { direction, full },
            Plan::Resync {
                direction: d,
                full: f,
            },
        ) => d == direction.mirrored() && f == full,
        _ => a == b,
    }
}
