//! One message delivered: states, the promotion's 2PC (`core::promotion` answers), the
//! outdate relay, new generations, and the data path's messages.

use super::*;

impl World {
    /// Deliver the next message from `from` to `to`.
    pub(super) fn deliver(&mut self, from: usize, to: usize) -> Result<(), String> {
        let dir = usize::from(from > to);
        let Some(msg) = self.link(from, to).q[dir].pop_front() else {
            return Ok(());
        };
        let (n, s) = (to, from);
        if !matches!(msg, Msg::ToSecondary(_) | Msg::ToPrimary(_)) {
            self.note(|| format!("{} -> {}: {msg:?}", NAMES[s], NAMES[n]));
        }
        match msg {
            Msg::State(state) => {
                let newer = self.note_generations(n, s, &state);
                let changed = self.nodes[n]
                    .views
                    .get(&s)
                    .is_none_or(|old| old.role != state.role || old.primaries != state.primaries);
                self.nodes[n].views.insert(s, *state);
                self.recompute_quorum(n);
                if changed && !self.nodes[n].diskful {
                    self.broadcast(n);
                }
                if let Some(newer) = newer {
                    self.left_behind(n, newer);
                }
            }
            Msg::Prepare { id, two_primaries } => {
                let facts = self.facts(n);
                let node = &self.nodes[n];
                let granted_to = node
                    .grant
                    .filter(|(to, _)| *to != s)
                    .map(|(to, _)| NAMES[to]);
                let busy = Busy {
                    promoting: node.round.is_some(),
                    granted_to,
                    ..Busy::default()
                };
                let vote =
                    promotion::answer_prepare(&self.view(n, &facts), busy, NAMES[s], two_primaries);
                let node = &mut self.nodes[n];
                if vote.yield_round {
                    if let Some(r) = node.round.as_mut() {
                        r.yield_to(NAMES[s]);
                    }
                }
                if vote.grant {
                    node.grant = Some((s, id));
                }
                let answer = vote.answer;
                self.note(|| format!("{} answers {}'s prepare: {answer:?}", NAMES[n], NAMES[s]));
                self.send(n, s, Msg::Reply { id, answer });
            }
            Msg::Reply { id, answer } => {
                if let Some(r) = self.nodes[n].round.as_mut().filter(|r| r.id == id) {
                    r.handle_answer(NAMES[s], answer);
                }
            }
            Msg::Decision { id, commit } => {
                let node = &mut self.nodes[n];
                if node.grant == Some((s, id)) {
                    node.grant = None;
                }
                if commit {
                    let changed = node.views.get_mut(&s).is_some_and(|v| {
                        let changed = v.role != Role::Primary;
                        v.role = Role::Primary;
                        changed
                    });
                    if changed && !node.diskful {
                        self.broadcast(n);
                    }
                }
            }
            Msg::Outdate(t, generation) => {
                if t.target != n {
                    // The witness relays it, or answers that the target is unreachable.
                    if self.is_up(n, t.target) {
                        self.nodes[n].relayed_outdates.insert(t.id, t);
                        self.send(n, t.target, Msg::Outdate(t, generation));
                    } else {
                        self.send(n, s, Msg::OutdateReply(t, OutdateResult::Unreachable));
                    }
                    return Ok(());
                }
                let node = &self.nodes[n];
                let result =
                    promotion::outdate_answer(node.role, node.disk, &node.uuids, generation);
                self.note(|| {
                    format!(
                        "{} answers an outdate from {}: {result:?}",
                        NAMES[n], NAMES[t.requester]
                    )
                });
                if result == OutdateResult::Outdated {
                    self.mark_outdated(n);
                    self.broadcast(n);
                }
                self.send(n, s, Msg::OutdateReply(t, result));
            }
            Msg::OutdateReply(t, result) => {
                if t.requester != n {
                    // The witness forwards the answer.
                    if self.nodes[n].relayed_outdates.get(&t.id) == Some(&t) {
                        self.nodes[n].relayed_outdates.remove(&t.id);
                    }
                    self.send(n, t.requester, Msg::OutdateReply(t, result));
                    return Ok(());
                }
                let node = &mut self.nodes[n];
                if node.pending_outdates.get(&t.target) != Some(&t.id) {
                    return Ok(());
                }
                if matches!(result, OutdateResult::Outdated | OutdateResult::Unreachable) {
                    node.pending_outdates.remove(&t.target);
                }
                if result == OutdateResult::Stale {
                    self.left_behind(n, t.target);
                }
            }
            Msg::NewCurrent(generation) => {
                self.nodes[n].uuids.follow_new_current(generation);
            }
            Msg::ToSecondary(msg) => {
                let node = &mut self.nodes[n];
                let Some(applier) = node.applier.as_mut() else {
                    return Err(format!(
                        "{} got replicated data without applying it",
                        NAMES[n]
                    ));
                };
                applier
                    .core
                    .handle_message(msg, SIZE)
                    .map_err(|e| format!("{} refused a valid message: {e}", NAMES[n]))?;
                for m in applier.actions(&mut node.store, false) {
                    self.send(n, s, Msg::ToPrimary(m));
                }
            }
            Msg::ToPrimary(msg) => {
                let node = &mut self.nodes[n];
                if let (Some(core), Some(ch)) = (node.primary.as_mut(), node.channel) {
                    core.handle_peer_message(ch, msg);
                    self.primary_actions(n);
                    self.finish_requests(n);
                }
            }
        }
        Ok(())
    }
}
