//! What the hook does for one libvirt call: a pure function from the call (operation,
//! sub-operation, extra), the domain's Tandem volumes and their status on this node to a
//! [`Plan`]. No I/O here; `execute` carries the plan out against tandemd.
//!
//! | call | plan |
//! |---|---|
//! | `prepare begin` (normal start) | every volume exists here, has a local replica that may become Primary → promote each (undone on any failure); otherwise refuse before anything changes |
//! | `prepare begin` after `migrate begin` (incoming migration) | every volume has an UpToDate replica here, runs protocol C, and this node is connected to the source's Primary replica → allow two primaries (cluster-wide), promote (undone on failure) |
//! | `migrate begin` (destination, XML filter) | the same checks, nothing changed; remember the incoming migration for `prepare` |
//! | `release end` (any reason; `-` on libvirt < 10.5) | demote what this hook promoted for the domain, and what is Primary and not promoted explicitly by an operator; disarm dual-primary |
//! | `start`, `started`, `stopped`, `restore`, `reconnect`, `attach`, others | nothing (`reconnect` must never fail: failing kills the running guest) |
//!
//! A tandemd without the replication engine (no roles yet) serves single-host volumes: a
//! normal start only checks that they exist; an incoming migration is refused, since the
//! destination's volume would be a different disk.

use control_api::{ConnectionState, DiskState, Protocol, Role, VolumeStatus};

use crate::control::StatusAnswer;

/// libvirt's QEMU hook operations (argv[2]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operation {
    Prepare,
    Start,
    Started,
    Stopped,
    Release,
    Migrate,
    Restore,
    Reconnect,
    Attach,
    Other(String),
}

impl Operation {
    pub fn parse(text: &str) -> Operation {
        match text {
            "prepare" => Operation::Prepare,
            "start" => Operation::Start,
            "started" => Operation::Started,
            "stopped" => Operation::Stopped,
            "release" => Operation::Release,
            "migrate" => Operation::Migrate,
            "restore" => Operation::Restore,
            "reconnect" => Operation::Reconnect,
            "attach" => Operation::Attach,
            other => Operation::Other(other.to_string()),
        }
    }

    /// `migrate` and `restore` hand the (possibly rewritten) XML on via stdout.
    pub fn is_xml_filter(&self) -> bool {
        matches!(self, Operation::Migrate | Operation::Restore)
    }
}

/// One hook invocation: `HOOK DOMAIN OPERATION SUBOP EXTRA`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookCall {
    pub domain: String,
    pub operation: Operation,
    pub subop: String,
    pub extra: String,
}

/// What is known on this node when deciding.
#[derive(Debug, Clone)]
pub struct Facts {
    /// This node's name, for messages.
    pub node: String,
    /// The domain's Tandem volumes with tandemd's answer, in disk order.
    pub volumes: Vec<(String, StatusAnswer)>,
    /// A `migrate begin` for this domain was seen just before (see `incoming`).
    pub incoming_migration: bool,
    /// Volumes this hook promoted for this domain (see `promoted`).
    pub promoted_by_hook: Vec<String>,
    /// Volumes the domain marks `<shareable/>` (others may have them open).
    pub shareable: Vec<String>,
}

/// One change to make through tandemd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Promote(String),
    Demote(String),
    AllowTwoPrimaries(String),
    DisallowTwoPrimaries(String),
}

impl Step {
    /// The step that undoes this one.
    pub fn undo(&self) -> Step {
        match self {
            Step::Promote(v) => Step::Demote(v.clone()),
            Step::Demote(v) => Step::Promote(v.clone()),
            Step::AllowTwoPrimaries(v) => Step::DisallowTwoPrimaries(v.clone()),
            Step::DisallowTwoPrimaries(v) => Step::AllowTwoPrimaries(v.clone()),
        }
    }

    pub fn volume(&self) -> &str {
        match self {
            Step::Promote(v)
            | Step::Demote(v)
            | Step::AllowTwoPrimaries(v)
            | Step::DisallowTwoPrimaries(v) => v,
        }
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::Promote(v) => write!(f, "promote {v}"),
            Step::Demote(v) => write!(f, "demote {v}"),
            Step::AllowTwoPrimaries(v) => write!(f, "allow two primaries on {v}"),
            Step::DisallowTwoPrimaries(v) => write!(f, "disallow two primaries on {v}"),
        }
    }
}

/// The decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Change nothing; `notes` say why (logged).
    Nothing { notes: Vec<String> },
    /// Fail the libvirt operation with this one-line message, having changed nothing.
    Refuse { message: String },
    /// Run the steps in order; if one fails, undo the ones done (reverse order) and fail.
    Activate {
        steps: Vec<Step>,
        notes: Vec<String>,
    },
    /// Run every step even if some fail (the operation cannot be stopped any more); report
    /// failures.
    Deactivate {
        steps: Vec<Step>,
        notes: Vec<String>,
    },
    /// Checks for an incoming migration passed: remember it for the `prepare` that follows.
    ExpectIncoming { notes: Vec<String> },
}

/// Decide what to do for `call` given `facts`.
pub fn decide(call: &HookCall, facts: &Facts) -> Plan {
    if facts.volumes.is_empty() {
        return Plan::Nothing {
            notes: vec!["no Tandem disks".into()],
        };
    }
    match (&call.operation, call.subop.as_str()) {
        (Operation::Prepare, "begin") if facts.incoming_migration => {
            activate(facts, check_migration_target)
        }
        (Operation::Prepare, "begin") => activate(facts, check_start),
        (Operation::Migrate, "begin") => match check_all(facts, check_migration_target) {
            Err(message) => Plan::Refuse { message },
            Ok(_) => Plan::ExpectIncoming {
                notes: vec![format!(
                    "incoming migration: {} ready on {}",
                    volume_list(facts),
                    facts.node
                )],
            },
        },
        (Operation::Release, "end") => release(facts),
        (Operation::Reconnect, _) => Plan::Nothing {
            notes: vec![format!(
                "libvirtd reconnected to the running guest; {} stay as they are",
                volume_list(facts)
            )],
        },
        (op, subop) => Plan::Nothing {
            notes: vec![format!("nothing to do for {op:?} {subop}")],
        },
    }
}

fn volume_list(facts: &Facts) -> String {
    facts
        .volumes
        .iter()
        .map(|(v, _)| v.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// What one volume needs before the domain may run here, or why it may not.
type Check = fn(&Facts, &str, &StatusAnswer) -> Result<VolumeNeeds, String>;

#[derive(Debug, Default)]
struct VolumeNeeds {
    allow_two_primaries: bool,
    promote: bool,
    note: Option<String>,
}

fn check_all(facts: &Facts, check: Check) -> Result<Vec<(String, VolumeNeeds)>, String> {
    let mut needs = Vec::new();
    let mut refusals = Vec::new();
    for (volume, answer) in &facts.volumes {
        match check(facts, volume, answer) {
            Ok(n) => needs.push((volume.clone(), n)),
            Err(message) => refusals.push(message),
        }
    }
    if refusals.is_empty() {
        Ok(needs)
    } else {
        Err(refusals.join("; "))
    }
}

fn activate(facts: &Facts, check: Check) -> Plan {
    match check_all(facts, check) {
        Err(message) => Plan::Refuse { message },
        Ok(needs) => {
            let mut steps = Vec::new();
            let mut notes = Vec::new();
            for (volume, n) in needs {
                if n.allow_two_primaries {
                    steps.push(Step::AllowTwoPrimaries(volume.clone()));
                }
                if n.promote {
                    steps.push(Step::Promote(volume.clone()));
                }
                notes.extend(n.note);
            }
            Plan::Activate { steps, notes }
        }
    }
}

/// A normal start: the local replica must be able to become the only Primary.
fn check_start(facts: &Facts, volume: &str, answer: &StatusAnswer) -> Result<VolumeNeeds, String> {
    let node = facts.node.as_str();
    let status = match answer {
        StatusAnswer::NotFound(_) => return Err(format!("{volume}: no such Tandem volume on {node}")),
        StatusAnswer::NoRoles => {
            return Ok(VolumeNeeds {
                note: Some(format!(
                    "{volume}: tandemd on {node} has no replication engine (no roles): single-host volume, nothing to promote"
                )),
                ..VolumeNeeds::default()
            })
        }
        StatusAnswer::Replicated(status) => status,
    };
    let writers = status.open_writers;
    if writers > 0 && !facts.shareable.iter().any(|v| v == volume) {
        return Err(format!(
            "{volume} is already open for writing on {node} ({writers} writer{}; another VM or client uses it)",
            if writers == 1 { "" } else { "s" }
        ));
    }
    if status.replica.role == Role::Primary {
        return Ok(VolumeNeeds {
            note: Some(format!("{volume}: already Primary on {node}")),
            ..VolumeNeeds::default()
        });
    }
    local_replica_usable(node, volume, status)?;
    if let Some(peer) = status
        .replica
        .peers
        .iter()
        .find(|p| p.role == Role::Primary)
    {
        return Err(format!(
            "{volume} is Primary on {} (stop or migrate the VM there first)",
            peer.node
        ));
    }
    if !status.replica.quorum {
        return Err(format!(
            "{volume}: {node} has no quorum for this volume (peers unreachable)"
        ));
    }
    Ok(VolumeNeeds {
        promote: true,
        ..VolumeNeeds::default()
    })
}

/// An incoming live migration: this node's replica must be UpToDate and the volume must run
/// protocol C (dual-primary needs synchronous replication).
fn check_migration_target(
    facts: &Facts,
    volume: &str,
    answer: &StatusAnswer,
) -> Result<VolumeNeeds, String> {
    let node = facts.node.as_str();
    let status = match answer {
        StatusAnswer::NotFound(_) => {
            return Err(format!(
                "{volume}: no replica on {node}; cannot migrate the VM here"
            ))
        }
        StatusAnswer::NoRoles => {
            return Err(format!(
                "{volume}: tandemd on {node} has no replication engine, so its volume is a different disk; cannot live-migrate onto it"
            ))
        }
        StatusAnswer::Replicated(status) => status,
    };
    if status.replica.protocol != Protocol::C {
        return Err(format!(
            "{volume} runs protocol {}; live migration needs protocol C",
            status.replica.protocol
        ));
    }
    local_replica_usable(node, volume, status)?;
    // The source (Primary) must be connected: otherwise this replica may be stale without
    // knowing it, and two Primaries without a link are a split brain.
    let source_connected = status
        .replica
        .peers
        .iter()
        .any(|p| p.role == Role::Primary && p.connection == ConnectionState::Connected);
    if status.replica.role != Role::Primary && !source_connected {
        let peers = status
            .replica
            .peers
            .iter()
            .filter(|p| p.disk_state != DiskState::Diskless)
            .map(|p| format!("{}: {}", p.node, p.connection))
            .collect::<Vec<_>>()
            .join(", ");
        return Err(format!(
            "{volume}: {node} is not connected to a Primary replica ({peers}); a live migration needs the replication link to the source up"
        ));
    }
    Ok(VolumeNeeds {
        allow_two_primaries: !status.replica.allow_two_primaries,
        promote: status.replica.role != Role::Primary,
        note: None,
    })
}

fn local_replica_usable(node: &str, volume: &str, status: &VolumeStatus) -> Result<(), String> {
    match status.replica.disk_state {
        DiskState::UpToDate => Ok(()),
        DiskState::Diskless => Err(format!("{volume}: no local replica on {node} (Diskless)")),
        state => {
            let newest = status
                .replica
                .peers
                .iter()
                .find(|p| p.disk_state == DiskState::UpToDate)
                .map(|p| format!("; newest data is on {}", p.node))
                .unwrap_or_default();
            Err(format!(
                "{volume}: local replica on {node} is {state}{newest}"
            ))
        }
    }
}

fn release(facts: &Facts) -> Plan {
    let mut steps = Vec::new();
    let mut notes = Vec::new();
    for (volume, answer) in &facts.volumes {
        match answer {
            StatusAnswer::NotFound(_) => notes.push(format!("{volume}: not on this node")),
            StatusAnswer::NoRoles => notes.push(format!(
                "{volume}: single-host volume (no roles), nothing to demote"
            )),
            StatusAnswer::Replicated(status) => {
                if status.replica.role == Role::Primary {
                    if status.promoted_explicitly && !facts.promoted_by_hook.contains(volume) {
                        notes.push(format!(
                            "{volume}: stays Primary (promoted explicitly by an operator)"
                        ));
                    } else {
                        steps.push(Step::Demote(volume.clone()));
                    }
                }
                // After demoting: disarming first would be refused while two Primaries exist.
                if status.replica.allow_two_primaries {
                    steps.push(Step::DisallowTwoPrimaries(volume.clone()));
                }
            }
        }
    }
    Plan::Deactivate { steps, notes }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(operation: &str, subop: &str) -> HookCall {
        HookCall {
            domain: "vm100".into(),
            operation: Operation::parse(operation),
            subop: subop.into(),
            extra: "-".into(),
        }
    }

    /// `volume_status` of a protocol C volume on hv1 whose peer hv2 is a connected
    /// UpToDate Secondary, as tandemd answers it.
    const STATUS: &str = r#"{"volume":"v","node":"hv1","role":"Secondary","disk_state":"UpToDate","protocol":"C","quorum":true,"quorum_reason":"","io_suspended":false,"allow_two_primaries":false,"size_bytes":4096,"current_uuid":"1","peers":[{"node":"hv2","diskless":false,"connection":"Connected","role":"Secondary","disk_state":"UpToDate","replication":"Established","out_of_sync_bytes":0,"resync":null,"split_brain":null,"decision":null,"last_error":null}],"last_verify":null,"promoted_explicitly":false,"open_writers":0}"#;

    fn status(role: Role, disk: DiskState) -> VolumeStatus {
        let mut status: VolumeStatus = serde_json::from_str(STATUS).unwrap();
        status.replica.role = role;
        status.replica.disk_state = disk;
        status
    }

    fn facts(volumes: Vec<(&str, StatusAnswer)>, incoming: bool) -> Facts {
        Facts {
            node: "hv1".into(),
            volumes: volumes
                .into_iter()
                .map(|(v, a)| (v.to_string(), a))
                .collect(),
            incoming_migration: incoming,
            promoted_by_hook: Vec::new(),
            shareable: Vec::new(),
        }
    }

    fn secondary() -> StatusAnswer {
        StatusAnswer::Replicated(status(Role::Secondary, DiskState::UpToDate))
    }

    fn with(f: impl FnOnce(&mut VolumeStatus)) -> StatusAnswer {
        let mut s = status(Role::Secondary, DiskState::UpToDate);
        f(&mut s);
        StatusAnswer::Replicated(s)
    }

    fn refusal(plan: Plan) -> String {
        match plan {
            Plan::Refuse { message } => message,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn prepare_promotes_every_volume() {
        let plan = decide(
            &call("prepare", "begin"),
            &facts(vec![("a", secondary()), ("b", secondary())], false),
        );
        assert_eq!(
            plan,
            Plan::Activate {
                steps: vec![Step::Promote("a".into()), Step::Promote("b".into())],
                notes: vec![]
            }
        );
    }

    #[test]
    fn prepare_refuses_before_changing_anything() {
        let f = facts(
            vec![
                ("a", secondary()),
                ("b", with(|s| s.replica.disk_state = DiskState::Outdated)),
            ],
            false,
        );
        assert_eq!(
            refusal(decide(&call("prepare", "begin"), &f)),
            "b: local replica on hv1 is Outdated; newest data is on hv2"
        );
        let cases = [
            (
                StatusAnswer::NotFound("volume 'c' does not exist".into()),
                "c: no such Tandem volume on hv1",
            ),
            (
                with(|s| s.replica.disk_state = DiskState::Diskless),
                "c: no local replica on hv1 (Diskless)",
            ),
            (
                with(|s| s.replica.peers[0].role = Role::Primary),
                "c is Primary on hv2 (stop or migrate the VM there first)",
            ),
            (
                with(|s| s.replica.quorum = false),
                "c: hv1 has no quorum for this volume (peers unreachable)",
            ),
            (
                with(|s| {
                    s.replica.disk_state = DiskState::Inconsistent;
                    s.replica.peers[0].disk_state = DiskState::Outdated;
                }),
                "c: local replica on hv1 is Inconsistent",
            ),
        ];
        for (answer, message) in cases {
            assert_eq!(
                refusal(decide(
                    &call("prepare", "begin"),
                    &facts(vec![("c", answer)], false)
                )),
                message
            );
        }
        // Several problems: one line naming all.
        let f = facts(
            vec![
                ("a", StatusAnswer::NotFound(String::new())),
                ("b", with(|s| s.replica.peers[0].role = Role::Primary)),
            ],
            false,
        );
        assert_eq!(
            refusal(decide(&call("prepare", "begin"), &f)),
            "a: no such Tandem volume on hv1; b is Primary on hv2 (stop or migrate the VM there first)"
        );
    }

    #[test]
    fn prepare_refuses_a_volume_another_writer_has_open_unless_shareable() {
        let busy = with(|s| {
            s.replica.role = Role::Primary;
            s.open_writers = 1;
        });
        let f = facts(vec![("a", busy)], false);
        assert_eq!(
            refusal(decide(&call("prepare", "begin"), &f)),
            "a is already open for writing on hv1 (1 writer; another VM or client uses it)"
        );
        let mut f = f;
        f.shareable = vec!["a".into()];
        assert!(matches!(
            decide(&call("prepare", "begin"), &f),
            Plan::Activate { .. }
        ));
    }

    #[test]
    fn prepare_leaves_primary_alone_and_single_host_volumes_unpromoted() {
        let plan = decide(
            &call("prepare", "begin"),
            &facts(
                vec![
                    (
                        "a",
                        StatusAnswer::Replicated(status(Role::Primary, DiskState::UpToDate)),
                    ),
                    ("b", StatusAnswer::NoRoles),
                ],
                false,
            ),
        );
        let Plan::Activate { steps, notes } = plan else {
            panic!("{plan:?}")
        };
        assert!(steps.is_empty());
        assert_eq!(notes.len(), 2);
        assert!(notes[1].contains("no replication engine"), "{notes:?}");
    }

    #[test]
    fn release_demotes_what_the_domain_promoted_and_disarms() {
        let f = facts(
            vec![
                (
                    "a",
                    StatusAnswer::Replicated(status(Role::Primary, DiskState::UpToDate)),
                ),
                (
                    "b",
                    with(|s| {
                        s.replica.role = Role::Primary;
                        s.promoted_explicitly = true;
                    }),
                ),
                (
                    "c",
                    with(|s| {
                        s.replica.role = Role::Primary;
                        s.replica.allow_two_primaries = true;
                    }),
                ),
                ("d", secondary()),
                ("e", StatusAnswer::NoRoles),
            ],
            false,
        );
        for extra in ["-", "destroyed", "migrated", "failed"] {
            let mut c = call("release", "end");
            c.extra = extra.into();
            let Plan::Deactivate { steps, notes } = decide(&c, &f) else {
                panic!()
            };
            assert_eq!(
                steps,
                vec![
                    Step::Demote("a".into()),
                    Step::Demote("c".into()),
                    Step::DisallowTwoPrimaries("c".into())
                ]
            );
            assert!(notes.iter().any(|n| n.contains("promoted explicitly")));
        }
        // What the hook itself promoted is demoted even if tandemd calls it explicit.
        let mut f = f;
        f.promoted_by_hook = vec!["b".into()];
        let Plan::Deactivate { steps, .. } = decide(&call("release", "end"), &f) else {
            panic!()
        };
        assert_eq!(steps[1], Step::Demote("b".into()));
    }

    #[test]
    fn incoming_migration_needs_protocol_c_and_uptodate_replica() {
        // The source is Primary: that is the point of a migration, not a refusal.
        let source_primary = with(|s| s.replica.peers[0].role = Role::Primary);
        let ok = decide(
            &call("migrate", "begin"),
            &facts(vec![("a", source_primary.clone())], false),
        );
        assert!(matches!(ok, Plan::ExpectIncoming { .. }), "{ok:?}");
        let plan = decide(
            &call("prepare", "begin"),
            &facts(vec![("a", source_primary.clone())], true),
        );
        assert_eq!(
            plan,
            Plan::Activate {
                steps: vec![
                    Step::AllowTwoPrimaries("a".into()),
                    Step::Promote("a".into())
                ],
                notes: vec![]
            }
        );
        assert!(matches!(
            decide(
                &call("prepare", "begin"),
                &facts(vec![("a", source_primary)], true)
            ),
            Plan::Activate { .. }
        ));
        let cases = [
            (
                with(|s| s.replica.protocol = Protocol::A),
                "a runs protocol A; live migration needs protocol C",
            ),
            (
                with(|s| s.replica.disk_state = DiskState::Outdated),
                "a: local replica on hv1 is Outdated; newest data is on hv2",
            ),
            (
                StatusAnswer::NotFound(String::new()),
                "a: no replica on hv1; cannot migrate the VM here",
            ),
            (
                with(|s| s.replica.peers[0].role = Role::Secondary),
                "a: hv1 is not connected to a Primary replica (hv2: Connected); a live migration needs the replication link to the source up",
            ),
            (
                with(|s| {
                    s.replica.peers[0].role = Role::Unknown;
                    s.replica.peers[0].connection = ConnectionState::Connecting;
                }),
                "a: hv1 is not connected to a Primary replica (hv2: Connecting); a live migration needs the replication link to the source up",
            ),
            (
                with(|s| {
                    s.replica.peers[0].role = Role::Primary;
                    s.replica.protocol = Protocol::B;
                }),
                "a runs protocol B; live migration needs protocol C",
            ),
            (
                StatusAnswer::NoRoles,
                "a: tandemd on hv1 has no replication engine, so its volume is a different disk; cannot live-migrate onto it",
            ),
        ];
        for (answer, message) in cases {
            for op in ["migrate", "prepare"] {
                assert_eq!(
                    refusal(decide(
                        &call(op, "begin"),
                        &facts(vec![("a", answer.clone())], true)
                    )),
                    message,
                    "{op}"
                );
            }
        }
    }

    #[test]
    fn other_operations_change_nothing() {
        let f = facts(vec![("a", secondary())], false);
        for (op, subop) in [
            ("start", "begin"),
            ("started", "begin"),
            ("stopped", "end"),
            ("restore", "begin"),
            ("reconnect", "begin"),
            ("attach", "begin"),
            ("shutdown", "-"),
            ("prepare", "-"),
        ] {
            assert!(
                matches!(decide(&call(op, subop), &f), Plan::Nothing { .. }),
                "{op} {subop}"
            );
        }
        assert!(matches!(
            decide(&call("prepare", "begin"), &facts(vec![], false)),
            Plan::Nothing { .. }
        ));
    }
}
