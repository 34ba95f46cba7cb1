//! Roles, disk/connection/replication states, protocols, and the promotion gate.
//!
//! Owns the vocabulary an operator sees in `tandem volume status` — spelled exactly as
//! `drbdadm status` prints it (`Primary`, `UpToDate`, `SyncTarget`, ...), with `Display` and
//! `FromStr` round-tripping — and the two pure decisions built on it:
//!
//! - [`may_promote`]: may this replica become Primary? Refusals are operator-ready sentences
//!   (`local replica is Outdated; newest data is on hv2`, `vm-100-disk-0 is Primary on hv2`).
//! - [`check_two_primaries_gate`]: may `allow-two-primaries` be switched on?
//!
//! Rules (DRBD 9, ref `drbd.md` §4/§5): a node may be promoted only when its disk is
//! UpToDate, it has quorum (when quorum is on), and no connected peer is Primary — unless
//! two primaries are allowed, which requires protocol C, and even then at most two Primaries.
//!
//! Differences from DRBD: there is no `primary --force`; a replica that is not UpToDate is
//! made UpToDate only by a resync or by an explicit operator resolution handled elsewhere.
//! The promotion gate is evaluated locally on the facts given; the cluster-wide two-phase
//! commit that makes concurrent promotions exclusive belongs to the engine.

use std::fmt;
use std::str::FromStr;

/// A string did not name a known state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} {value:?} (expected one of: {expected})")]
pub struct ParseStateError {
    /// Which enum was parsed.
    pub kind: &'static str,
    /// The rejected text.
    pub value: String,
    /// The accepted spellings, comma-separated.
    pub expected: String,
}

macro_rules! spelled_enum {
    ($(#[$meta:meta])* $name:ident, $kind:literal, { $($(#[$vmeta:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The DRBD spelling.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = ParseStateError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                $name::ALL
                    .iter()
                    .copied()
                    .find(|v| v.as_str().eq_ignore_ascii_case(s))
                    .ok_or_else(|| ParseStateError {
                        kind: $kind,
                        value: s.to_string(),
                        expected: $name::ALL
                            .iter()
                            .map(|v| v.as_str())
                            .collect::<Vec<_>>()
                            .join(", "),
                    })
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str> as serde::Deserialize>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

spelled_enum!(
    /// A replica's role. `Unknown` is only ever shown for a peer we are not connected to.
    Role, "role", {
        /// Serves reads and writes.
        Primary => "Primary",
        /// Receives replicated writes; no access for applications.
        Secondary => "Secondary",
        /// A peer whose role we do not know (no connection).
        Unknown => "Unknown",
    }
);

spelled_enum!(
    /// The state of a replica's local disk (DRBD's disk states).
    DiskState, "disk state", {
        /// No local disk (diskless tiebreaker or detached).
        Diskless => "Diskless",
        /// Reading metadata.
        Attaching => "Attaching",
        /// Detaching.
        Detaching => "Detaching",
        /// The backing device failed.
        Failed => "Failed",
        /// Attached, waiting for the handshake with peers.
        Negotiating => "Negotiating",
        /// Data is not consistent (a resync target mid-sync, or never synced).
        Inconsistent => "Inconsistent",
        /// Consistent but known to be stale.
        Outdated => "Outdated",
        /// A peer's disk we cannot see.
        DUnknown => "DUnknown",
        /// Consistent, not yet known whether newest (no connection yet).
        Consistent => "Consistent",
        /// Consistent and newest.
        UpToDate => "UpToDate",
    }
);

spelled_enum!(
    /// The state of the link to one peer (DRBD's connection states).
    ConnectionState, "connection state", {
        /// Not trying to connect (after split brain or an administrative disconnect).
        StandAlone => "StandAlone",
        /// Tearing the connection down.
        Disconnecting => "Disconnecting",
        /// Transient state before Connecting.
        Unconnected => "Unconnected",
        /// The peer did not answer in time.
        Timeout => "Timeout",
        /// The link broke.
        BrokenPipe => "BrokenPipe",
        /// The network failed.
        NetworkFailure => "NetworkFailure",
        /// The peer violated the protocol.
        ProtocolError => "ProtocolError",
        /// Closing down.
        TearDown => "TearDown",
        /// Trying to connect.
        Connecting => "Connecting",
        /// Connected and authenticated.
        Connected => "Connected",
    }
);

spelled_enum!(
    /// The replication state towards one connected peer (DRBD's replication states).
    ReplicationState, "replication state", {
        /// Not connected.
        Off => "Off",
        /// Connected, in sync, replicating.
        Established => "Established",
        /// About to become SyncSource.
        StartingSyncS => "StartingSyncS",
        /// About to become SyncTarget.
        StartingSyncT => "StartingSyncT",
        /// Exchanging bitmaps as source.
        WFBitMapS => "WFBitMapS",
        /// Exchanging bitmaps as target.
        WFBitMapT => "WFBitMapT",
        /// Waiting for the source's sync UUID.
        WFSyncUUID => "WFSyncUUID",
        /// Sending resync data.
        SyncSource => "SyncSource",
        /// Receiving resync data.
        SyncTarget => "SyncTarget",
        /// Resync paused, source side.
        PausedSyncS => "PausedSyncS",
        /// Resync paused, target side.
        PausedSyncT => "PausedSyncT",
        /// Online verify, source side.
        VerifyS => "VerifyS",
        /// Online verify, target side.
        VerifyT => "VerifyT",
        /// Congestion mode, primary side.
        Ahead => "Ahead",
        /// Congestion mode, secondary side.
        Behind => "Behind",
    }
);

spelled_enum!(
    /// Replication protocol: when a write counts as complete (DESIGN.md "Protocols").
    Protocol, "protocol", {
        /// Local disk + queued to the peer.
        A => "A",
        /// Local disk + peer memory.
        B => "B",
        /// Local disk + every connected peer's disk.
        C => "C",
    }
);

/// The local disk state right after attach, before any handshake (DRBD: a consistent disk
/// is `Consistent` until a peer confirms it newest, `Outdated` if it knows it is stale).
pub fn disk_state_at_attach(uuids: &crate::generation::UuidSet) -> DiskState {
    if uuids.current.is_just_created() || !uuids.flags.consistent {
        DiskState::Inconsistent
    } else if uuids.flags.was_up_to_date {
        DiskState::Consistent
    } else {
        DiskState::Outdated
    }
}

/// The local disk state after the handshake with a peer decided `outcome` (see
/// `sync_decision`): in sync with an UpToDate peer, or resync source -> UpToDate; resync
/// target -> Inconsistent until the resync finishes; split brain -> unchanged.
pub fn disk_state_after_handshake(
    before: DiskState,
    outcome: crate::sync_decision::SyncOutcome,
    peer_disk: DiskState,
) -> DiskState {
    use crate::sync_decision::{Direction, SyncOutcome};
    match outcome {
        SyncOutcome::NoSync
            if peer_disk == DiskState::UpToDate || before == DiskState::UpToDate =>
        {
            DiskState::UpToDate
        }
        SyncOutcome::NoSync if before == DiskState::Consistent => DiskState::UpToDate,
        SyncOutcome::BitmapResync(Direction::LocalIsSource)
        | SyncOutcome::FullSync(Direction::LocalIsSource)
            if matches!(before, DiskState::Consistent | DiskState::UpToDate) =>
        {
            DiskState::UpToDate
        }
        SyncOutcome::BitmapResync(Direction::LocalIsTarget)
        | SyncOutcome::FullSync(Direction::LocalIsTarget) => DiskState::Inconsistent,
        _ => before,
    }
}

/// Whether an Outdated replica holds the newest data after all: it is connected to every
/// other data replica (`data_peers`: each one's replication state seen from here and its
/// disk state as it last reported, `None` when not connected), is the SyncTarget of none,
/// and each of them holds data of its own (UpToDate, Outdated or Consistent: a replica
/// that got its data from a resync cannot vouch for anything). Every acknowledged write
/// lives on some data replica, and the handshakes just found none newer, so whatever
/// marked this one Outdated (a stale outdate request, a peer that has since lost its
/// newer data to a resync from here) no longer holds. A lone replica never qualifies.
pub fn outdated_but_newest(
    disk: DiskState,
    data_peers: &[Option<(ReplicationState, DiskState)>],
) -> bool {
    disk == DiskState::Outdated
        && !data_peers.is_empty()
        && data_peers.iter().all(|p| {
            matches!(
                p,
                Some((
                    ReplicationState::Established | ReplicationState::SyncSource,
                    DiskState::UpToDate | DiskState::Outdated | DiskState::Consistent
                ))
            )
        })
}

/// What the promotion gate needs to know about one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerView {
    /// The peer's node name.
    pub name: String,
    /// Whether the link to it is `Connected`.
    pub connected: bool,
    /// Its role as last reported (Unknown when disconnected).
    pub role: Role,
    /// Its disk state as last reported (DUnknown when disconnected).
    pub disk: DiskState,
}

/// Inputs to [`may_promote`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromoteContext<'a> {
    /// Volume name, quoted in refusals.
    pub volume: &'a str,
    /// This node's name.
    pub local_node: &'a str,
    /// Local role (promoting a Primary is a no-op and allowed).
    pub local_role: Role,
    /// Local disk state.
    pub local_disk: DiskState,
    /// Whether quorum is enabled for this volume.
    pub quorum_enabled: bool,
    /// Whether this node currently has quorum (ignored when quorum is off).
    pub has_quorum: bool,
    /// The volume's other replicas and tiebreakers. A peer counts as `connected` when it
    /// is reachable directly *or through a connected node* (e.g. the witness relays that
    /// the other data node is Primary): a Primary behind a broken direct link still blocks.
    pub peers: &'a [PeerView],
    /// The dual-primary gate.
    pub allow_two_primaries: bool,
    /// The replication protocol.
    pub protocol: Protocol,
}

/// Why a promotion was refused. `Display` is the sentence the operator reads.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PromoteRefusal {
    /// The local disk is not UpToDate.
    #[error("{volume}: local replica is {disk}; {}", newest_hint(newest_on))]
    LocalNotUpToDate {
        volume: String,
        disk: DiskState,
        /// A connected peer holding UpToDate data, if any.
        newest_on: Option<String>,
    },
    /// Quorum is on and this node does not have it.
    #[error("{volume}: no quorum on {node} (a majority of the volume's voters is not reachable); I/O stays frozen until it returns")]
    NoQuorum { volume: String, node: String },
    /// Another connected peer is Primary and dual-primary is not allowed.
    #[error("{volume} is Primary on {peer}; demote it there first (or allow two primaries for a live migration)")]
    OtherPrimary { volume: String, peer: String },
    /// Two primaries are allowed but the protocol is not C.
    #[error("{volume}: two primaries require protocol C, the volume uses protocol {protocol}")]
    TwoPrimariesNeedProtocolC { volume: String, protocol: Protocol },
    /// Two Primaries already exist.
    #[error(
        "{volume} is already Primary on {first} and {second}; at most two primaries are allowed"
    )]
    TooManyPrimaries {
        volume: String,
        first: String,
        second: String,
    },
}

fn newest_hint(newest_on: &Option<String>) -> String {
    match newest_on {
        Some(node) => format!("newest data is on {node}"),
        None => "no connected replica has UpToDate data; reconnect the replica with the newest data first".to_string(),
    }
}

/// Decide whether this replica may become Primary. Pure; order of checks: disk, quorum,
/// other Primaries (so the first refusal is the one the operator must fix first).
pub fn may_promote(ctx: &PromoteContext<'_>) -> Result<(), PromoteRefusal> {
    if ctx.local_role == Role::Primary {
        return Ok(());
    }
    if ctx.local_disk != DiskState::UpToDate {
        let newest_on = ctx
            .peers
            .iter()
            .find(|p| p.connected && p.disk == DiskState::UpToDate)
            .map(|p| p.name.clone());
        return Err(PromoteRefusal::LocalNotUpToDate {
            volume: ctx.volume.to_string(),
            disk: ctx.local_disk,
            newest_on,
        });
    }
    if ctx.quorum_enabled && !ctx.has_quorum {
        return Err(PromoteRefusal::NoQuorum {
            volume: ctx.volume.to_string(),
            node: ctx.local_node.to_string(),
        });
    }
    let primaries: Vec<&PeerView> = ctx
        .peers
        .iter()
        .filter(|p| p.connected && p.role == Role::Primary)
        .collect();
    let Some(first) = primaries.first() else {
        return Ok(());
    };
    if !ctx.allow_two_primaries {
        return Err(PromoteRefusal::OtherPrimary {
            volume: ctx.volume.to_string(),
            peer: first.name.clone(),
        });
    }
    check_two_primaries_gate(ctx.volume, ctx.protocol)?;
    if let Some(second) = primaries.get(1) {
        return Err(PromoteRefusal::TooManyPrimaries {
            volume: ctx.volume.to_string(),
            first: first.name.clone(),
            second: second.name.clone(),
        });
    }
    Ok(())
}

/// The dual-primary gate: `allow-two-primaries on` is accepted only under protocol C
/// (DRBD asserts "two primaries implies protocol C", ref §5).
pub fn check_two_primaries_gate(volume: &str, protocol: Protocol) -> Result<(), PromoteRefusal> {
    if protocol == Protocol::C {
        Ok(())
    } else {
        Err(PromoteRefusal::TwoPrimariesNeedProtocolC {
            volume: volume.to_string(),
            protocol,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outdated_replica_is_newest_only_when_every_data_peer_is_connected_and_older() {
        use DiskState::{Consistent, Inconsistent, Outdated, UpToDate};
        use ReplicationState::*;
        let newest = outdated_but_newest;
        assert!(newest(Outdated, &[Some((SyncSource, UpToDate))]));
        assert!(newest(
            Outdated,
            &[
                Some((Established, Outdated)),
                Some((SyncSource, Consistent))
            ]
        ));
        // A peer away may hold newer data; a peer we resync from does.
        assert!(!newest(Outdated, &[Some((SyncSource, UpToDate)), None]));
        assert!(!newest(Outdated, &[Some((SyncTarget, UpToDate))]));
        assert!(!newest(Outdated, &[]));
        // A peer with no data of its own cannot vouch.
        assert!(!newest(Outdated, &[Some((SyncSource, Inconsistent))]));
        // Only Outdated is ever reclaimed.
        assert!(!newest(Inconsistent, &[Some((SyncSource, UpToDate))]));
        assert!(!newest(UpToDate, &[Some((SyncSource, UpToDate))]));
    }

    #[test]
    fn every_state_round_trips_through_its_drbd_spelling() {
        for r in Role::ALL {
            assert_eq!(r.to_string().parse::<Role>().unwrap(), *r);
        }
        for d in DiskState::ALL {
            assert_eq!(d.to_string().parse::<DiskState>().unwrap(), *d);
        }
        for c in ConnectionState::ALL {
            assert_eq!(c.to_string().parse::<ConnectionState>().unwrap(), *c);
        }
        for s in ReplicationState::ALL {
            assert_eq!(s.to_string().parse::<ReplicationState>().unwrap(), *s);
        }
        for p in Protocol::ALL {
            assert_eq!(p.to_string().parse::<Protocol>().unwrap(), *p);
        }
        assert_eq!(DiskState::UpToDate.to_string(), "UpToDate");
        assert_eq!("c".parse::<Protocol>().unwrap(), Protocol::C);
        let err = "Sideways".parse::<Role>().unwrap_err();
        assert!(
            err.to_string().contains("Primary, Secondary, Unknown"),
            "{err}"
        );
    }

    #[test]
    fn disk_state_follows_flags_at_attach_and_the_handshake_after() {
        use crate::generation::{Generation, UuidSet};
        use crate::sync_decision::{Direction, SyncOutcome};
        assert_eq!(
            disk_state_at_attach(&UuidSet::just_created()),
            DiskState::Inconsistent
        );
        let mut u = UuidSet::day0(Generation::from_raw(0x10));
        assert_eq!(disk_state_at_attach(&u), DiskState::Consistent);
        u.flags.was_up_to_date = false;
        assert_eq!(disk_state_at_attach(&u), DiskState::Outdated);
        let f = disk_state_after_handshake;
        assert_eq!(
            f(
                DiskState::Consistent,
                SyncOutcome::NoSync,
                DiskState::Consistent
            ),
            DiskState::UpToDate
        );
        assert_eq!(
            f(
                DiskState::Outdated,
                SyncOutcome::NoSync,
                DiskState::UpToDate
            ),
            DiskState::UpToDate
        );
        assert_eq!(
            f(
                DiskState::UpToDate,
                SyncOutcome::BitmapResync(Direction::LocalIsTarget),
                DiskState::UpToDate
            ),
            DiskState::Inconsistent
        );
        assert_eq!(
            f(
                DiskState::Consistent,
                SyncOutcome::SplitBrainDisconnect,
                DiskState::Consistent
            ),
            DiskState::Consistent
        );
    }

    fn peer(name: &str, connected: bool, role: Role, disk: DiskState) -> PeerView {
        PeerView {
            name: name.into(),
            connected,
            role,
            disk,
        }
    }

    fn ctx<'a>(peers: &'a [PeerView]) -> PromoteContext<'a> {
        PromoteContext {
            volume: "vm-100-disk-0",
            local_node: "hv1",
            local_role: Role::Secondary,
            local_disk: DiskState::UpToDate,
            quorum_enabled: true,
            has_quorum: true,
            peers,
            allow_two_primaries: false,
            protocol: Protocol::C,
        }
    }

    #[test]
    fn promotion_requires_local_uptodate_and_names_where_newest_data_is() {
        let peers = [peer("hv2", true, Role::Secondary, DiskState::UpToDate)];
        let mut c = ctx(&peers);
        c.local_disk = DiskState::Outdated;
        let err = may_promote(&c).unwrap_err();
        assert_eq!(
            err.to_string(),
            "vm-100-disk-0: local replica is Outdated; newest data is on hv2"
        );
    }

    #[test]
    fn promotion_requires_quorum_when_quorum_is_on() {
        let mut c = ctx(&[]);
        c.has_quorum = false;
        assert!(matches!(
            may_promote(&c),
            Err(PromoteRefusal::NoQuorum { .. })
        ));
        c.quorum_enabled = false;
        assert_eq!(may_promote(&c), Ok(()));
    }

    #[test]
    fn promotion_is_refused_while_another_primary_is_connected() {
        let peers = [peer("hv2", true, Role::Primary, DiskState::UpToDate)];
        let err = may_promote(&ctx(&peers)).unwrap_err();
        assert!(err
            .to_string()
            .starts_with("vm-100-disk-0 is Primary on hv2"));
        // A disconnected Primary does not block (quorum is what protects that case).
        let peers = [peer("hv2", false, Role::Primary, DiskState::DUnknown)];
        assert_eq!(may_promote(&ctx(&peers)), Ok(()));
    }

    #[test]
    fn two_primaries_only_when_allowed_under_protocol_c_and_at_most_two() {
        let peers = [peer("hv2", true, Role::Primary, DiskState::UpToDate)];
        let mut c = ctx(&peers);
        c.allow_two_primaries = true;
        assert_eq!(may_promote(&c), Ok(()));
        c.protocol = Protocol::A;
        assert!(matches!(
            may_promote(&c),
            Err(PromoteRefusal::TwoPrimariesNeedProtocolC { .. })
        ));
        let peers = [
            peer("hv2", true, Role::Primary, DiskState::UpToDate),
            peer("hv3", true, Role::Primary, DiskState::UpToDate),
        ];
        let mut c = ctx(&peers);
        c.allow_two_primaries = true;
        assert!(matches!(
            may_promote(&c),
            Err(PromoteRefusal::TooManyPrimaries { .. })
        ));
        assert!(check_two_primaries_gate("v", Protocol::B).is_err());
        assert!(check_two_primaries_gate("v", Protocol::C).is_ok());
    }
}
