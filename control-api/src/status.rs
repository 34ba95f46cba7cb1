//! A volume's replication status on one node: [`VolumeStatus`], the engine's
//! [`ReplicaStatus`] (re-exported from `replication::replica`, the one definition) plus the
//! daemon's own fields. `tandem volume status --json` prints it unchanged; roles and states
//! are the engine's enums, serialized as DRBD prints them (`Primary`, `UpToDate`,
//! `Connected`, `Established`).

use serde::{Deserialize, Serialize};

use crate::{ConnectionState, DiskState};

pub use replication::replica::{PeerStatus, ReplicaStatus, ResyncProgress, VerifySummary};

/// One volume's replication status on one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeStatus {
    #[serde(flatten)]
    pub replica: ReplicaStatus,
    /// Promoted by `tandem volume promote` (stays Primary when the last writer closes).
    pub promoted_explicitly: bool,
    /// Writable frontend handles (NBD clients) open on this node.
    pub open_writers: usize,
}

impl VolumeStatus {
    /// Every data replica (local and peers) is UpToDate and connected peers are not
    /// resyncing: what `tandem volume wait-sync` waits for.
    pub fn in_sync(&self) -> bool {
        self.replica.disk_state == DiskState::UpToDate
            && self.replica.peers.iter().all(|p| {
                p.diskless
                    || (p.connection == ConnectionState::Connected
                        && p.disk_state == DiskState::UpToDate
                        && p.out_of_sync_bytes == 0
                        && p.resync.is_none())
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Protocol, ReplicationState, Role};

    /// `tandem volume status vm-100-disk-0 --json` on the Secondary of a two-host cluster
    /// with a witness, as tandemd printed it before this crate existed (field order too).
    const SECONDARY: &str = r#"{"volume":"vm-100-disk-0","node":"hv2","role":"Secondary","disk_state":"UpToDate","protocol":"C","quorum":true,"quorum_reason":"3 of 3 voters reachable","io_suspended":false,"allow_two_primaries":false,"size_bytes":2147483648,"current_uuid":"5A3F00000000A1B2","peers":[{"node":"hv1","diskless":false,"connection":"Connected","role":"Primary","disk_state":"UpToDate","replication":"Established","out_of_sync_bytes":0,"resync":null,"split_brain":null,"decision":"no sync needed","last_error":null},{"node":"witness","diskless":true,"connection":"Connected","role":"Secondary","disk_state":"Diskless","replication":"Established","out_of_sync_bytes":0,"resync":null,"split_brain":null,"decision":null,"last_error":null}],"last_verify":{"differing_blocks":0,"checked_bytes":2147483648},"promoted_explicitly":false,"open_writers":0}"#;

    /// A resync target cut off from its source: the states an HA decision reads.
    const SYNC_TARGET: &str = r#"{"volume":"v","node":"hv1","role":"Secondary","disk_state":"Inconsistent","protocol":"A","quorum":false,"quorum_reason":"1 of 3 voters reachable","io_suspended":true,"allow_two_primaries":false,"size_bytes":4096,"current_uuid":"0","peers":[{"node":"hv2","diskless":false,"connection":"Connecting","role":"Unknown","disk_state":"DUnknown","replication":"Off","out_of_sync_bytes":4096,"resync":{"done_bytes":0,"total_bytes":4096,"bytes_per_sec":0},"split_brain":null,"two_primaries_conflict":"hv2 wrote block 0 too","decision":null,"last_error":"connection refused"}],"last_verify":null,"promoted_explicitly":true,"open_writers":2}"#;

    #[test]
    fn todays_status_output_round_trips_byte_for_byte() {
        for golden in [SECONDARY, SYNC_TARGET] {
            let status: VolumeStatus = serde_json::from_str(golden).unwrap();
            assert_eq!(serde_json::to_string(&status).unwrap(), golden);
        }
    }

    #[test]
    fn roles_and_states_are_the_engines_enums() {
        let status: VolumeStatus = serde_json::from_str(SECONDARY).unwrap();
        assert_eq!(status.replica.role, Role::Secondary);
        assert_eq!(status.replica.protocol, Protocol::C);
        let hv1 = &status.replica.peers[0];
        assert_eq!(
            (hv1.role, hv1.disk_state, hv1.connection, hv1.replication),
            (
                Role::Primary,
                DiskState::UpToDate,
                ConnectionState::Connected,
                ReplicationState::Established
            )
        );
        assert_eq!(status.replica.peers[1].disk_state, DiskState::Diskless);
        let target: VolumeStatus = serde_json::from_str(SYNC_TARGET).unwrap();
        assert_eq!(target.replica.disk_state, DiskState::Inconsistent);
        assert_eq!(target.replica.peers[0].role, Role::Unknown);
        assert_eq!(target.open_writers, 2);
        // An unknown spelling is refused, naming what was expected.
        let bad = SECONDARY.replacen("\"Secondary\"", "\"Sideways\"", 1);
        let err = serde_json::from_str::<VolumeStatus>(&bad).unwrap_err();
        assert!(err.to_string().contains("unknown role"), "{err}");
    }

    #[test]
    fn in_sync_needs_every_data_replica_uptodate_and_idle() {
        let status: VolumeStatus = serde_json::from_str(SECONDARY).unwrap();
        assert!(status.in_sync());
        let mut syncing = status.clone();
        syncing.replica.peers[0].out_of_sync_bytes = 4096;
        assert!(!syncing.in_sync());
        let mut away = status.clone();
        away.replica.peers[0].connection = ConnectionState::Connecting;
        assert!(!away.in_sync());
        let target: VolumeStatus = serde_json::from_str(SYNC_TARGET).unwrap();
        assert!(!target.in_sync());
    }
}
