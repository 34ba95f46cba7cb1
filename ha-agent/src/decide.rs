//! The failover decision: a pure function from what this agent knows about one managed VM
//! (its disks' local replication status, the peers' liveness on the management network and
//! on the replication link, where the VM was last seen running, the preference order) to
//! one [`Action`] with a reason an operator can read in `tandem-ha status`.
//!
//! Rules (issue 7):
//!
//! - A VM running here whose disks lost quorum is fenced: the engine froze its I/O, the
//!   agent destroys it so nothing stale writes when the network heals.
//! - A VM not running here is started here only when the host it last ran on is dead on
//!   **both** paths (silent on the management network for the dead-after timeout and its
//!   replication links down), every disk of the VM is UpToDate here with quorum and no
//!   other Primary, and this node is the first eligible node in preference order (the
//!   VM's `prefer` list, then the config's node order). Eligibility of the other survivors
//!   comes from their heartbeats; a node before this one that is alive but said it cannot
//!   start the VM is passed over once its heartbeat says the failover is due there too
//!   and it has been due here for two heartbeat intervals, or, whatever it says, once it
//!   has been due here for dead-after more (its link to the owner may time out later
//!   than ours). A node that is starting the VM says so in its heartbeats, and every
//!   other node waits for the outcome. If two nodes still race, the volume's promotion
//!   decides: only one can be Primary, the loser's start fails and it backs off.
//! - A management-only or replication-only silence is never a failover: "alive on one path"
//!   means the host (and likely the VM) still runs.
//! - A VM that stopped cleanly (its host is alive and no longer lists it) is not restarted:
//!   HA restarts VMs whose host failed, not VMs an operator shut down.
//! - A restarted agent (owners come back from `placement.json`) decides nothing about a VM
//!   whose owner it has not heard from yet, until dead-after has passed since its start.

use control_api::{ConnectionState, DiskState, Role, VolumeStatus};
use serde::{Deserialize, Serialize};

/// One disk of the VM as this node's tandemd reports it (`volume_status`): the fields of
/// the control API's [`VolumeStatus`] the decision reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskView {
    pub volume: String,
    pub role: Role,
    pub disk_state: DiskState,
    pub quorum: bool,
    /// The engine's words for the quorum state, e.g. "1 of 3 voters reachable".
    pub quorum_reason: String,
    pub io_suspended: bool,
    /// Writable frontend handles (NBD clients) open on this node.
    pub open_writers: usize,
    pub peers: Vec<DiskPeer>,
}

/// How the local replica of a disk sees one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskPeer {
    pub node: String,
    pub connection: ConnectionState,
    pub role: Role,
    pub diskless: bool,
}

impl From<&VolumeStatus> for DiskView {
    fn from(status: &VolumeStatus) -> DiskView {
        let r = &status.replica;
        DiskView {
            volume: r.volume.clone(),
            role: r.role,
            disk_state: r.disk_state,
            quorum: r.quorum,
            quorum_reason: r.quorum_reason.clone(),
            io_suspended: r.io_suspended,
            open_writers: status.open_writers,
            peers: r
                .peers
                .iter()
                .map(|p| DiskPeer {
                    node: p.node.clone(),
                    connection: p.connection,
                    role: p.role,
                    diskless: p.diskless,
                })
                .collect(),
        }
    }
}

impl DiskView {
    fn peer(&self, node: &str) -> Option<&DiskPeer> {
        self.peers.iter().find(|p| p.node == node)
    }

    fn quorum_words(&self) -> String {
        if !self.quorum_reason.is_empty() {
            return self.quorum_reason.clone();
        }
        let voters = self.peers.len() + 1;
        let reachable = 1 + self
            .peers
            .iter()
            .filter(|p| p.connection == ConnectionState::Connected)
            .count();
        format!("{reachable} of {voters} voters reachable")
    }
}

/// The local disks of a VM: read, or why they could not be.
pub type Disks = Result<Vec<DiskView>, String>;

/// What this agent knows of another node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerView {
    pub node: String,
    /// Heard from within the dead-after timeout on the management network, or not heard
    /// yet while this agent started less than dead-after ago (a restarted agent gives
    /// every peer that long before calling it dead).
    pub management_alive: bool,
    /// Heard from at least once since this agent started.
    pub heard: bool,
    /// Its last heartbeat says it could start this VM (UpToDate + quorum for every disk).
    pub eligible: bool,
    /// Its last heartbeat lists this VM as running there (only meaningful while alive).
    pub running: bool,
    /// Its last heartbeat says it is starting this VM right now.
    pub starting: bool,
    /// Its last heartbeat says the failover of this VM is due there (it saw the owner dead
    /// on both paths): its `eligible` is then not a view from before the owner died.
    pub due: bool,
}

/// Everything the decision for one VM depends on.
#[derive(Debug, Clone)]
pub struct VmInput<'a> {
    pub vm: &'a str,
    /// This node's name.
    pub here: &'a str,
    /// The domain runs (or is paused) on this node's libvirt.
    pub running_here: bool,
    pub disks: Disks,
    /// The node the VM was last seen running on (None: not running anywhere we know of).
    pub owner: Option<&'a str>,
    /// Every other node of the cluster (witnesses included: they never qualify).
    pub peers: Vec<PeerView>,
    /// The VM's preferred nodes, most preferred first.
    pub prefer: &'a [String],
    /// The config's node order (tie-break after preferences).
    pub node_order: &'a [String],
    /// Set while a failed start backs off: why, and when it retries.
    pub backoff: Option<String>,
    /// The failover has been due here (the owner dead on both paths) for two heartbeat
    /// intervals: every alive peer has since sent a heartbeat saying whether it can start
    /// the VM.
    pub settled: bool,
    /// The failover has been due here for dead-after beyond that: a peer before this node
    /// that still has not said it is due (its view of the owner differs, or an agent
    /// too old to say) is passed over too.
    pub overdue: bool,
}

/// What the agent does for one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    /// Nothing to do (running here and healthy, running elsewhere, stopped on purpose).
    Nothing,
    /// A failover may be needed but not by this node, or not yet.
    Wait,
    /// Start the VM here; `fence_peer` is the dead owner, to be fenced first when a fencing
    /// command is configured.
    Start { fence_peer: Option<String> },
    /// Destroy the local VM: it lost quorum (isolated side).
    Fence,
}

/// The decision and its reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub action: Action,
    pub reason: String,
    /// This node could start the VM (announced in heartbeats).
    pub eligible: bool,
    /// The owner is dead on both paths: a failover is due (the agent times
    /// [`VmInput::settled`] from the first such decision).
    pub failover_due: bool,
}

/// Why this node cannot run the VM (None: it can): the first disk that is not UpToDate
/// with quorum, or that is Primary elsewhere.
pub fn ineligibility(vm: &str, disks: &Disks) -> Option<String> {
    let disks = match disks {
        Ok(d) => d,
        Err(e) => return Some(format!("not starting {vm}: disk status unavailable: {e}")),
    };
    if disks.is_empty() {
        return Some(format!(
            "not starting {vm}: it has no Tandem disk on this node"
        ));
    }
    for d in disks {
        if d.disk_state == DiskState::Diskless {
            return Some(format!(
                "not starting {vm}: {} is Diskless here (tiebreaker)",
                d.volume
            ));
        }
        if !d.quorum {
            return Some(format!(
                "not starting {vm}: no quorum for {} ({})",
                d.volume,
                d.quorum_words()
            ));
        }
        if d.disk_state != DiskState::UpToDate {
            return Some(format!(
                "not starting {vm}: {} is {} here",
                d.volume, d.disk_state
            ));
        }
        if let Some(p) = d
            .peers
            .iter()
            .find(|p| p.role == Role::Primary && p.connection == ConnectionState::Connected)
        {
            return Some(format!(
                "not starting {vm}: {} is Primary on {}",
                d.volume, p.node
            ));
        }
    }
    None
}

/// Decide for one VM. Pure: same input, same output.
pub fn decide(input: &VmInput<'_>) -> Decision {
    let vm = input.vm;
    let not_eligible = ineligibility(vm, &input.disks);
    // A node backing off from a failed start does not claim the VM: the next one may.
    let eligible = not_eligible.is_none() && !input.running_here && input.backoff.is_none();
    let decision = |action, reason: String| Decision {
        action,
        reason,
        eligible,
        failover_due: false,
    };
    let due = |action, reason: String| Decision {
        failover_due: true,
        ..decision(action, reason)
    };

    if input.running_here {
        if let Ok(disks) = &input.disks {
            if let Some(d) = disks.iter().find(|d| !d.quorum) {
                return decision(
                    Action::Fence,
                    format!(
                        "{vm} runs here without quorum for {} ({}): destroying it (fencing; the side with quorum takes over)",
                        d.volume,
                        d.quorum_words()
                    ),
                );
            }
        }
        return decision(Action::Nothing, format!("{vm} runs here"));
    }

    if let Some(p) = input.peers.iter().find(|p| p.management_alive && p.running) {
        return decision(Action::Nothing, format!("{vm} runs on {}", p.node));
    }
    if let Some(p) = input
        .peers
        .iter()
        .find(|p| p.management_alive && p.starting)
    {
        return decision(
            Action::Wait,
            format!("{} is starting {vm}; waiting for the outcome", p.node),
        );
    }

    let Some(owner) = input.owner else {
        return decision(
            Action::Nothing,
            format!(
                "{vm} is not running; HA restarts it only when its host fails (start it with virsh start)"
            ),
        );
    };
    if owner == input.here {
        // The owner is updated from local state before deciding: a VM that stopped here
        // is no longer owned by this node. Reaching this is a caller bug; do nothing.
        return decision(Action::Nothing, format!("{vm} stopped here"));
    }

    let owner_view = input.peers.iter().find(|p| p.node == owner);
    let owner_alive = owner_view.is_some_and(|p| p.management_alive);
    if owner_view.is_some_and(|p| p.management_alive && !p.heard) {
        return decision(
            Action::Wait,
            format!(
                "{vm} last ran on {owner}: this agent just started and has not heard from {owner} yet (waiting up to dead-after)"
            ),
        );
    }
    let replication_up_to_owner = match &input.disks {
        Ok(disks) => disks.iter().any(|d| {
            d.peer(owner)
                .is_some_and(|p| p.connection == ConnectionState::Connected)
        }),
        Err(_) => false,
    };
    if owner_alive {
        if replication_up_to_owner {
            return decision(Action::Nothing, format!("{vm} runs on {owner}"));
        }
        return decision(
            Action::Nothing,
            format!(
                "not starting {vm}: {owner} alive on the management network; replication link cut only"
            ),
        );
    }
    if replication_up_to_owner {
        return decision(
            Action::Wait,
            format!(
                "not starting {vm}: {owner} silent on the management network but its replication link is up (agent down? host alive)"
            ),
        );
    }

    // The owner is dead on both paths: a failover is due.
    if let Some(why) = not_eligible {
        return due(Action::Wait, format!("{owner} is down; {why}"));
    }
    let here_is = |node: &str| node == input.here;
    let qualifies = |node: &str| {
        here_is(node)
            || input
                .peers
                .iter()
                .any(|p| p.node == node && p.management_alive && p.eligible)
    };
    let order = input
        .prefer
        .iter()
        .chain(input.node_order.iter())
        .map(String::as_str);
    let winner = order.clone().filter(|n| *n != owner).find(|n| qualifies(n));
    // An alive node before this one that said it cannot start the VM is passed over once
    // its word is final: it saw the owner dead too (`due`) and the failover has been due
    // here for two heartbeat intervals. One that has not seen the owner die yet (its link
    // to the owner may just be slower to time out) is waited for up to `overdue`.
    let waiting_for = order
        .filter(|n| *n != owner)
        .take_while(|n| !here_is(n))
        .find_map(|n| {
            input.peers.iter().find(|p| {
                p.node == n
                    && p.management_alive
                    && !p.eligible
                    && !(input.overdue || (input.settled && p.due))
            })
        });
    match winner {
        Some(w) if here_is(w) => {
            if let Some(backoff) = &input.backoff {
                return due(Action::Wait, format!("{owner} is down; {backoff}"));
            }
            if let Some(p) = waiting_for {
                let n = &p.node;
                let what = if p.due {
                    format!("{n}'s next heartbeat")
                } else {
                    format!("{n} to see {owner} down")
                };
                return due(
                    Action::Wait,
                    format!("{owner} is down; waiting for {what} ({n} is before this node in preference order)"),
                );
            }
            due(
                Action::Start {
                    fence_peer: Some(owner.to_string()),
                },
                format!("{owner} is down on both paths: starting {vm} here"),
            )
        }
        Some(w) => due(
            Action::Wait,
            format!("{owner} is down; {w} takes {vm} over (before this node in preference order)"),
        ),
        // This node is eligible but in neither list: it still qualifies, last.
        None => due(
            Action::Start {
                fence_peer: Some(owner.to_string()),
            },
            format!("{owner} is down on both paths: starting {vm} here"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(volume: &str, state: &str, quorum: bool, peers: &[(&str, &str, &str)]) -> DiskView {
        DiskView {
            volume: volume.into(),
            role: Role::Secondary,
            disk_state: state.parse().unwrap(),
            quorum,
            quorum_reason: String::new(),
            io_suspended: !quorum,
            open_writers: 0,
            peers: peers
                .iter()
                .map(|(node, connection, role)| DiskPeer {
                    node: (*node).into(),
                    connection: connection.parse().unwrap(),
                    role: role.parse().unwrap(),
                    diskless: *node == "witness",
                })
                .collect(),
        }
    }

    fn peer(node: &str, alive: bool, eligible: bool, running: bool) -> PeerView {
        PeerView {
            node: node.into(),
            management_alive: alive,
            heard: alive,
            eligible,
            running,
            starting: false,
            due: alive,
        }
    }

    struct Case {
        name: &'static str,
        here: &'static str,
        running_here: bool,
        disks: Disks,
        owner: Option<&'static str>,
        peers: Vec<PeerView>,
        prefer: Vec<String>,
        backoff: Option<String>,
        settled: bool,
        action: Action,
        reason_contains: &'static str,
    }

    fn nodes() -> Vec<String> {
        vec!["hv1".into(), "hv2".into(), "hv3".into(), "witness".into()]
    }

    fn start_fencing(node: &str) -> Action {
        Action::Start {
            fence_peer: Some(node.into()),
        }
    }

    #[test]
    fn decision_table() {
        let up = |q| {
            disk(
                "vm-1-disk-0",
                "UpToDate",
                q,
                &[
                    ("hv1", "Connecting", "Unknown"),
                    ("witness", "Connected", "Secondary"),
                ],
            )
        };
        let cases = vec![
            Case {
                name: "host dead on both paths: the survivor with quorum starts the VM",
                here: "hv2",
                running_here: false,
                disks: Ok(vec![up(true)]),
                owner: Some("hv1"),
                peers: vec![
                    peer("hv1", false, false, false),
                    peer("witness", true, false, false),
                ],
                prefer: vec![],
                backoff: None,
                settled: true,
                action: start_fencing("hv1"),
                reason_contains: "hv1 is down on both paths: starting vm1 here",
            },
            Case {
                name: "replication link cut only: no failover",
                here: "hv2",
                running_here: false,
                disks: Ok(vec![up(true)]),
                owner: Some("hv1"),
                peers: vec![
                    peer("hv1", true, false, true),
                    peer("witness", true, false, false),
                ],
                prefer: vec![],
                backoff: None,
                settled: true,
                action: Action::Nothing,
                reason_contains: "runs on hv1",
            },
            Case {
                name: "replication link cut, owner's heartbeat does not list the VM yet",
                here: "hv2",
                running_here: false,
                disks: Ok(vec![up(true)]),
                owner: Some("hv1"),
                peers: vec![
                    peer("hv1", true, false, false),
                    peer("witness", true, false, false),
                ],
                prefer: vec![],
                backoff: None,
                settled: true,
                action: Action::Nothing,
                reason_contains: "hv1 alive on the management network; replication link cut only",
            },
            Case {
                name: "management silent but replication link up: agent down, host alive",
                here: "hv2",
                running_here: false,
                disks: Ok(vec![disk(
                    "vm-1-disk-0",
                    "UpToDate",
                    true,
                    &[("hv1", "Connected", "Primary")],
                )]),
                owner: Some("hv1"),
                peers: vec![peer("hv1", false, false, false)],
                prefer: vec![],
                backoff: None,
                settled: true,
                action: Action::Wait,
                reason_contains: "silent on the management network but its replication link is up",
            },
            Case {
                name: "isolated running host lost quorum: fence (destroy) the VM",
                here: "hv1",
                running_here: true,
                disks: Ok(vec![disk(
                    "vm-1-disk-0",
                    "UpToDate",
                    false,
                    &[
                        ("hv2", "Connecting", "Unknown"),
                        ("witness", "Connecting", "Unknown"),
                    ],
                )]),
                owner: Some("hv1"),
                peers: vec![
                    peer("hv2", false, false, false),
                    peer("witness", false, false, false),
                ],
                prefer: vec![],
                backoff: None,
                settled: true,
                action: Action::Fence,
                reason_contains:
                    "vm1 runs here without quorum for vm-1-disk-0 (1 of 3 voters reachable)",
            },
            Case {
                name: "isolation seen from the side with quorum: takeover",
                here: "hv2",
                running_here: false,
                disks: Ok(vec![up(true)]),
                owner: Some("hv1"),
                peers: vec![
                    peer("hv1", false, false, false),
                    peer("witness", true, false, false),
                ],
                prefer: vec!["hv1".into()],
                backoff: None,
                settled: true,
                action: start_fencing("hv1"),
                reason_contains: "starting vm1 here",
            },
            Case {
                name: "two hosts dead: no quorum, nothing starts, status says why",
                here: "hv2",
                running_here: false,
                disks: Ok(vec![disk(
                    "vm-1-disk-0",
                    "UpToDate",
                    false,
                    &[
                        ("hv1", "Connecting", "Unknown"),
                        ("witness", "Connecting", "Unknown"),
                    ],
                )]),
                owner: Some("hv1"),
                peers: vec![
                    peer("hv1", false, false, false),
                    peer("witness", false, false, false),
                ],
                prefer: vec![],
                backoff: None,
                settled: true,
                action: Action::Wait,
                reason_contains:
                    "not starting vm1: no quorum for vm-1-disk-0 (1 of 3 voters reachable)",
            },
            Case {
                name: "the engine's quorum words are used when present",
                here: "hv2",
                running_here: false,
                disks: Ok(vec![DiskView {
                    quorum_reason: "1 of 3 voters".into(),
                    ..disk("vm-1-disk-0", "UpToDate", false, &[])
                }]),
                owner: Some("hv1"),
                peers: vec![peer("hv1", false, false, false)],
                prefer: vec![],
                backoff: None,
                settled: true,
                action: Action::Wait,
                reason_contains: "no quorum for vm-1-disk-0 (1 of 3 voters)",
            },
            Case {
                name: "a local replica that is Outdated never starts",
                here: "hv2",
                running_here: false,
                disks: Ok(vec![disk(
                    "vm-1-disk-0",
                    "Outdated",
                    true,
                    &[("hv1", "Connecting", "Unknown")],
                )]),
                owner: Some("hv1"),
                peers: vec![peer("hv1", false, false, false)],
                prefer: vec![],
                backoff: None,
                settled: true,
                action: Action::Wait,
                reason_contains: "vm-1-disk-0 is Outdated here",
            },
            Case {
                name: "one of two disks not UpToDate: not starting",
                here: "hv2",
                running_here: false,
                disks: Ok(vec![
                    up(true),
                    disk("vm-1-disk-1", "Inconsistent", true, &[]),
                ]),
                owner: Some("hv1"),
                peers: vec![peer("hv1", false, false, false)],
                prefer: vec![],
                backoff: None,
                settled: true,
                action: Action::Wait,
                reason_contains: "vm-1-disk-1 is Inconsistent here",
            },
            Case {
                name: "several survivors qualify: the preferred one wins, the other waits",
                here: "hv2",
                running_here: false,
                disks: Ok(vec![up(true)]),
                owner: Some("hv1"),
                peers: vec![
                    peer("hv1", false, false, false),
                    peer("hv3", true, true, false),
                ],
                prefer: vec!["hv3".into()],
                backoff: None,
                settled: true,
                action: Action::Wait,
                reason_contains: "hv3 takes vm1 over",
            },
            Case {
                name: "preferred survivor not eligible: the next one starts",
                here: "hv2",
                running_here: false,
                disks: Ok(vec![up(true)]),
                owner: Some("hv1"),
                peers: vec![
                    peer("hv1", false, false, false),
                    peer("hv3", true, false, false),
                ],
                prefer: vec!["hv3".into()],
                backoff: None,
                settled: true,
                action: start_fencing("hv1"),
                reason_contains: "starting vm1 here",
            },
            Case {
                name: "preferred survivor said not eligible, failover just due: wait for its heartbeat",
                here: "hv2",
                running_here: false,
                disks: Ok(vec![up(true)]),
                owner: Some("hv1"),
                peers: vec![
                    peer("hv1", false, false, false),
                    peer("hv3", true, false, false),
                ],
                prefer: vec!["hv3".into()],
                backoff: None,
                settled: false,
                action: Action::Wait,
                reason_contains: "waiting for hv3's next heartbeat",
            },
            Case {
                name: "a node that said not eligible is starting it now: wait, never race it",
                here: "hv3",
                running_here: false,
                disks: Ok(vec![up(true)]),
                owner: Some("hv1"),
                peers: vec![
                    peer("hv1", false, false, false),
                    PeerView {
                        starting: true,
                        ..peer("hv2", true, false, false)
                    },
                ],
                prefer: vec!["hv2".into()],
                backoff: None,
                settled: true,
                action: Action::Wait,
                reason_contains: "hv2 is starting vm1",
            },
            Case {
                name: "no preference: config node order breaks the tie (hv2 before hv3)",
                here: "hv3",
                running_here: false,
                disks: Ok(vec![up(true)]),
                owner: Some("hv1"),
                peers: vec![
                    peer("hv1", false, false, false),
                    peer("hv2", true, true, false),
                ],
                prefer: vec![],
                backoff: None,
                settled: true,
                action: Action::Wait,
                reason_contains: "hv2 takes vm1 over",
            },
            Case {
                name: "a failed start backs off",
                here: "hv2",
                running_here: false,
                disks: Ok(vec![up(true)]),
                owner: Some("hv1"),
                peers: vec![peer("hv1", false, false, false)],
                prefer: vec![],
                backoff: Some(
                    "start failed: vm-1-disk-0 is Primary on hv3; retrying in 5 s".into(),
                ),
                settled: true,
                action: Action::Wait,
                reason_contains: "retrying in 5 s",
            },
            Case {
                name: "another node already Primary on the volume: not starting",
                here: "hv2",
                running_here: false,
                disks: Ok(vec![disk(
                    "vm-1-disk-0",
                    "UpToDate",
                    true,
                    &[("hv3", "Connected", "Primary")],
                )]),
                owner: Some("hv1"),
                peers: vec![
                    peer("hv1", false, false, false),
                    peer("hv3", true, false, false),
                ],
                prefer: vec![],
                backoff: None,
                settled: true,
                action: Action::Wait,
                reason_contains: "vm-1-disk-0 is Primary on hv3",
            },
            Case {
                name: "restarted agent, owner not heard yet (grace): wait, never start",
                here: "hv2",
                running_here: false,
                disks: Ok(vec![up(true)]),
                owner: Some("hv1"),
                peers: vec![
                    PeerView {
                        heard: false,
                        ..peer("hv1", true, false, false)
                    },
                    peer("witness", true, false, false),
                ],
                prefer: vec![],
                backoff: None,
                settled: true,
                action: Action::Wait,
                reason_contains: "has not heard from hv1 yet",
            },
            Case {
                name: "stopped on purpose (no owner): not restarted",
                here: "hv2",
                running_here: false,
                disks: Ok(vec![up(true)]),
                owner: None,
                peers: vec![peer("hv1", true, false, false)],
                prefer: vec![],
                backoff: None,
                settled: true,
                action: Action::Nothing,
                reason_contains: "not running",
            },
            Case {
                name: "running here with quorum: nothing",
                here: "hv1",
                running_here: true,
                disks: Ok(vec![up(true)]),
                owner: Some("hv1"),
                peers: vec![peer("hv2", true, true, false)],
                prefer: vec![],
                backoff: None,
                settled: true,
                action: Action::Nothing,
                reason_contains: "vm1 runs here",
            },
            Case {
                name: "running elsewhere (reported by an alive peer)",
                here: "hv2",
                running_here: false,
                disks: Ok(vec![up(true)]),
                owner: Some("hv3"),
                peers: vec![peer("hv3", true, false, true)],
                prefer: vec![],
                backoff: None,
                settled: true,
                action: Action::Nothing,
                reason_contains: "runs on hv3",
            },
            Case {
                name: "disk status unreadable: wait, never start blind",
                here: "hv2",
                running_here: false,
                disks: Err("cannot reach tandemd".into()),
                owner: Some("hv1"),
                peers: vec![peer("hv1", false, false, false)],
                prefer: vec![],
                backoff: None,
                settled: true,
                action: Action::Wait,
                reason_contains: "disk status unavailable: cannot reach tandemd",
            },
            Case {
                name: "witness never starts a VM",
                here: "witness",
                running_here: false,
                disks: Ok(vec![disk("vm-1-disk-0", "Diskless", true, &[])]),
                owner: Some("hv1"),
                peers: vec![peer("hv1", false, false, false)],
                prefer: vec![],
                backoff: None,
                settled: true,
                action: Action::Wait,
                reason_contains: "Diskless here",
            },
        ];
        let order = nodes();
        for case in cases {
            let input = VmInput {
                vm: "vm1",
                here: case.here,
                running_here: case.running_here,
                disks: case.disks.clone(),
                owner: case.owner,
                peers: case.peers.clone(),
                prefer: &case.prefer,
                node_order: &order,
                backoff: case.backoff.clone(),
                settled: case.settled,
                overdue: false,
            };
            let d = decide(&input);
            assert_eq!(d.action, case.action, "{}: {}", case.name, d.reason);
            assert!(
                d.reason.contains(case.reason_contains),
                "{}: reason {:?} lacks {:?}",
                case.name,
                d.reason,
                case.reason_contains
            );
            assert_eq!(decide(&input), d, "{}: not deterministic", case.name);
        }
    }

    /// A preferred node that says it cannot start the VM but has not seen the owner die
    /// yet (its link to the owner times out later) is waited for, up to `overdue`.
    #[test]
    fn a_preferred_node_that_has_not_seen_the_owner_die_is_waited_for() {
        let up = disk(
            "vm-1-disk-0",
            "UpToDate",
            true,
            &[("hv1", "Connecting", "Unknown")],
        );
        let order = nodes();
        let prefer = vec!["hv2".to_string()];
        let decide_with = |hv2_due: bool, overdue: bool| {
            decide(&VmInput {
                vm: "vm1",
                here: "hv3",
                running_here: false,
                disks: Ok(vec![up.clone()]),
                owner: Some("hv1"),
                peers: vec![
                    peer("hv1", false, false, false),
                    PeerView {
                        due: hv2_due,
                        ..peer("hv2", true, false, false)
                    },
                ],
                prefer: &prefer,
                node_order: &order,
                backoff: None,
                settled: true,
                overdue,
            })
        };
        let d = decide_with(false, false);
        assert_eq!(d.action, Action::Wait, "{}", d.reason);
        assert!(
            d.reason.contains("waiting for hv2 to see hv1 down"),
            "{}",
            d.reason
        );
        assert!(d.failover_due);
        for (hv2_due, overdue) in [(true, false), (false, true)] {
            let d = decide_with(hv2_due, overdue);
            assert_eq!(d.action, start_fencing("hv1"), "{}", d.reason);
        }
    }

    #[test]
    fn eligibility_is_announced_only_when_every_disk_qualifies() {
        let ok = disk("a", "UpToDate", true, &[]);
        assert_eq!(ineligibility("vm1", &Ok(vec![ok.clone()])), None);
        assert!(ineligibility("vm1", &Ok(vec![ok, disk("b", "UpToDate", false, &[])])).is_some());
        assert!(ineligibility("vm1", &Ok(vec![])).is_some());
    }
}
