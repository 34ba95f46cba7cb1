//! What a client asks the daemon: one [`Request`] per line, tagged by `request`.
//! (The `→` lines of the crate doc's example.) Each variant names the [`Reply`] it gets.

use serde::{Deserialize, Serialize};

use crate::options::OptionsChange;
#[cfg(doc)]
use crate::response::Reply;

/// A request to the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// This node's identity and configuration summary → [`Reply::NodeInfo`].
    NodeInfo,
    /// Space per pool → [`Reply::Pools`].
    PoolList,
    /// Create a volume; `pool` defaults to the first configured pool (on every node) →
    /// [`Reply::Volume`]. `replicas` > 1 (or `nodes` with more than one node) creates a
    /// replicated volume on `nodes` (default: this node, then the others in config order),
    /// with the cluster's diskless nodes as tiebreakers; `protocol` defaults to the
    /// config's `[replication]` value.
    VolumeCreate {
        name: String,
        size_bytes: u64,
        #[serde(default)]
        pool: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        replicas: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        protocol: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        nodes: Option<Vec<String>>,
    },
    /// All volumes, sorted by name → [`Reply::Volumes`].
    VolumeList,
    /// One volume → [`Reply::Volume`].
    VolumeShow { name: String },
    /// Grow a volume to `size_bytes` (never shrinks) → [`Reply::Volume`].
    VolumeResize { name: String, size_bytes: u64 },
    /// Delete a volume and its storage, on every node of a replicated volume →
    /// [`Reply::Deleted`]. Refused while it is open or Primary anywhere, or while a node
    /// is unreachable, unless `force`.
    VolumeDelete {
        name: String,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        force: bool,
    },
    /// Rename a volume on every node that holds it → [`Reply::Volume`] (under the new
    /// name). Refused while it is open or Primary anywhere or a node is unreachable.
    VolumeRename { name: String, new_name: String },
    /// Replication status of one volume on this node → [`Reply::Status`].
    VolumeStatus { name: String },
    /// Replication status of every volume on this node → [`Reply::Statuses`].
    VolumeStatusAll,
    /// Make the local replica Primary (explicitly: it stays Primary when the last NBD
    /// writer closes) → [`Reply::Status`].
    VolumePromote { name: String },
    /// Make the local replica Secondary → [`Reply::Status`]. With `force` (DRBD's
    /// `secondary --force`), requests frozen for lack of quorum fail with an I/O error
    /// (none was acknowledged) and open writers do not prevent the demotion.
    VolumeDemote {
        name: String,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        force: bool,
    },
    /// Open or close the dual-primary gate (protocol C only) → [`Reply::Status`].
    VolumeAllowTwoPrimaries { name: String, allow: bool },
    /// Resolve a split brain; with `discard_local` this node's changes since the split are
    /// thrown away and it becomes SyncTarget → [`Reply::Status`].
    VolumeResolve { name: String, discard_local: bool },
    /// Online verify against the peers → [`Reply::Verified`].
    VolumeVerify { name: String },
    /// Stream state changes → [`Reply::Event`] lines for as long as the connection stays
    /// open: `exists` events, the end marker, then `create`/`change`/`destroy` events (see
    /// [`crate::events`]). With `now` the daemon closes the connection after the marker.
    Events {
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        now: bool,
    },
    /// Every configured node with its reachability and config digest → [`Reply::Nodes`].
    NodeList,
    /// Re-read the config file (as SIGHUP does) → [`Reply::Reloaded`]. A config that is
    /// malformed or changes what needs a restart is refused and the running one kept.
    NodeReload,
    /// Move every replica off `node` (to `to`, else by free space) → [`Reply::Evicted`].
    /// Resumes an interrupted evict of the same node.
    NodeEvict {
        node: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to: Option<String>,
    },
    /// The volume an evict of `node` running on this node is moving now →
    /// [`Reply::EvictProgress`] (`tandem node evict` shows it while it waits).
    NodeEvictProgress { node: String },
    /// Put a new data replica of `name` on `node`; it full-syncs from an UpToDate replica
    /// → [`Reply::Volume`].
    ReplicaAdd { name: String, node: String },
    /// Remove `node`'s replica of `name` (also while `node` is unreachable) →
    /// [`Reply::Volume`]. Refused when no UpToDate replica or no quorum would be left.
    ReplicaRemove { name: String, node: String },
    /// Add on `to`, wait until it is UpToDate, then remove `from` → [`Reply::Volume`].
    ReplicaMove {
        name: String,
        from: String,
        to: String,
    },
    /// A writable linked clone `new_name` of `origin` (`VOLUME` or `VOLUME@SNAPSHOT`) on
    /// the same nodes, starting UpToDate with no initial sync → [`Reply::Volume`].
    VolumeClone { origin: String, new_name: String },
    /// Snapshot the volume on every data replica at one point of the write stream (the
    /// Primary holds new writes and drains in-flight ones meanwhile) → [`Reply::Snapshot`]
    /// with the pause's length. Refused, with nothing changed, when a node is unreachable,
    /// a replica is not UpToDate, or the name is taken; removed everywhere on a failure.
    SnapshotCreate { name: String, snapshot: String },
    /// The volume's snapshots and the nodes holding each → [`Reply::Snapshots`].
    SnapshotList { name: String },
    /// Remove a snapshot on every data replica → [`Reply::Snapshot`].
    SnapshotDelete { name: String, snapshot: String },
    /// Roll every data replica back to its copy of the snapshot (volume closed
    /// everywhere), with a new generation shared by all (no resync) → [`Reply::Snapshot`].
    SnapshotRollback { name: String, snapshot: String },
    /// Change replication options on every replica (persisted) → [`Reply::Volume`].
    VolumeSet {
        name: String,
        #[serde(flatten)]
        change: OptionsChange,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_a_stable_wire_form() {
        let request = Request::VolumeCreate {
            name: "v1".into(),
            size_bytes: 64 << 20,
            pool: None,
            replicas: None,
            protocol: None,
            nodes: None,
        };
        assert_eq!(
            serde_json::to_string(&request).unwrap(),
            r#"{"request":"volume_create","name":"v1","size_bytes":67108864,"pool":null}"#
        );
        assert_eq!(
            serde_json::from_str::<Request>(
                r#"{"request":"volume_create","name":"v1","size_bytes":4096}"#
            )
            .unwrap(),
            Request::VolumeCreate {
                name: "v1".into(),
                size_bytes: 4096,
                pool: None,
                replicas: None,
                protocol: None,
                nodes: None,
            }
        );
        assert_eq!(
            serde_json::to_string(&Request::PoolList).unwrap(),
            r#"{"request":"pool_list"}"#
        );
        assert!(serde_json::from_str::<Request>(r#"{"request":"reboot"}"#).is_err());
    }

    #[test]
    fn replication_requests_keep_the_names_other_tools_use() {
        for (request, line) in [
            (
                Request::VolumeStatus { name: "v".into() },
                r#"{"request":"volume_status","name":"v"}"#,
            ),
            (
                Request::VolumePromote { name: "v".into() },
                r#"{"request":"volume_promote","name":"v"}"#,
            ),
            (
                Request::VolumeDemote {
                    name: "v".into(),
                    force: false,
                },
                r#"{"request":"volume_demote","name":"v"}"#,
            ),
            (
                Request::VolumeDemote {
                    name: "v".into(),
                    force: true,
                },
                r#"{"request":"volume_demote","name":"v","force":true}"#,
            ),
            (
                Request::VolumeAllowTwoPrimaries {
                    name: "v".into(),
                    allow: true,
                },
                r#"{"request":"volume_allow_two_primaries","name":"v","allow":true}"#,
            ),
            (
                Request::VolumeResolve {
                    name: "v".into(),
                    discard_local: true,
                },
                r#"{"request":"volume_resolve","name":"v","discard_local":true}"#,
            ),
            (
                Request::VolumeSet {
                    name: "v".into(),
                    change: OptionsChange {
                        protocol: Some("B".into()),
                        ..Default::default()
                    },
                },
                r#"{"request":"volume_set","name":"v","protocol":"B"}"#,
            ),
            (
                Request::VolumeRename {
                    name: "v".into(),
                    new_name: "w".into(),
                },
                r#"{"request":"volume_rename","name":"v","new_name":"w"}"#,
            ),
            (Request::Events { now: false }, r#"{"request":"events"}"#),
            (
                Request::Events { now: true },
                r#"{"request":"events","now":true}"#,
            ),
            (
                Request::VolumeDelete {
                    name: "v".into(),
                    force: false,
                },
                r#"{"request":"volume_delete","name":"v"}"#,
            ),
            (
                Request::VolumeCreate {
                    name: "v".into(),
                    size_bytes: 4096,
                    pool: None,
                    replicas: Some(2),
                    protocol: Some("C".into()),
                    nodes: Some(vec!["hv1".into(), "hv2".into()]),
                },
                r#"{"request":"volume_create","name":"v","size_bytes":4096,"pool":null,"replicas":2,"protocol":"C","nodes":["hv1","hv2"]}"#,
            ),
        ] {
            assert_eq!(serde_json::to_string(&request).unwrap(), line);
            assert_eq!(serde_json::from_str::<Request>(line).unwrap(), request);
        }
    }
}
