//! What `Replica::status` reports (and `tandem volume status --json` prints): serde types
//! with snake_case fields and states spelled as DRBD prints them. The control API
//! (`tandem-control-api`) re-exports these types as its status: they are the wire format.

use serde::{Deserialize, Serialize};

use crate::role::{ConnectionState, DiskState, Protocol, ReplicationState, Role};

/// One replica of a volume, as seen from this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    pub volume: String,
    pub node: String,
    pub role: Role,
    pub disk_state: DiskState,
    pub protocol: Protocol,
    pub quorum: bool,
    /// Why (not) quorum, e.g. "1 of 2 voters reachable, kept by tiebreaker (1 of 1)".
    #[serde(default)]
    pub quorum_reason: String,
    pub io_suspended: bool,
    pub allow_two_primaries: bool,
    pub size_bytes: u64,
    /// Absent in a status from an older node: empty.
    #[serde(default)]
    pub current_uuid: String,
    /// Absent in a status from an older node: none.
    #[serde(default)]
    pub peers: Vec<PeerStatus>,
    pub last_verify: Option<VerifySummary>,
}

/// One peer of the volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub node: String,
    pub diskless: bool,
    pub connection: ConnectionState,
    pub role: Role,
    pub disk_state: DiskState,
    pub replication: ReplicationState,
    /// Bytes this node's bitmap marks as missing on the peer.
    pub out_of_sync_bytes: u64,
    pub resync: Option<ResyncProgress>,
    /// Set while the pair is in split brain: the operator-ready sentence with the command.
    pub split_brain: Option<String>,
    /// Set when the peer, as a second Primary, wrote blocks this node was writing at the
    /// same moment: the connection was failed instead of merging the writes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub two_primaries_conflict: Option<String>,
    /// Traffic and round-trip time of the link to this peer while connected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<crate::link::LinkFigures>,
    /// The last handshake decision, e.g. "vm-1: bitmap resync from hv1 to hv2 (rule 3 ...)".
    #[serde(default)]
    pub decision: Option<String>,
    /// The last connection error, if the link is not up.
    #[serde(default)]
    pub last_error: Option<String>,
}

/// Progress of a running resync.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResyncProgress {
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub bytes_per_sec: u64,
}

/// Result of the last online verify.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifySummary {
    pub differing_blocks: u64,
    pub checked_bytes: u64,
}
