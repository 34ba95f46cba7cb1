//! What the daemon answers: one [`Response`] per request, a [`Reply`] or an [`ApiError`]
//! with a stable [`ErrorKind`], and the result types `tandem --json` prints unchanged.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::events::Event;
use crate::options::VolumeOptions;
use crate::status::{VerifySummary, VolumeStatus};

/// The daemon's answer to one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
// One value per request line, moved once: boxing the larger variant buys nothing.
#[allow(clippy::large_enum_variant)]
pub enum Response {
    Ok { result: Reply },
    Error { error: ApiError },
}

/// A successful result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    NodeInfo {
        node: NodeInfo,
    },
    Pools {
        pools: Vec<PoolInfo>,
    },
    Volume {
        volume: VolumeInfo,
    },
    Volumes {
        volumes: Vec<VolumeInfo>,
    },
    Deleted {
        name: String,
        /// Nodes that could not be reached by a forced delete: their replica remains.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        left_on: Vec<String>,
    },
    Status {
        status: VolumeStatus,
    },
    Statuses {
        statuses: Vec<VolumeStatus>,
    },
    Verified {
        name: String,
        report: VerifySummary,
    },
    /// `node_list`: every configured node, this one first.
    Nodes {
        nodes: Vec<NodeListEntry>,
    },
    /// `node_reload`: the config now in force.
    Reloaded {
        /// Digest of the node list now in force ([`NodeInfo::config_digest`]).
        config_digest: String,
        added: Vec<String>,
        removed: Vec<String>,
    },
    /// `node_evict`: where each volume of the node went.
    Evicted {
        node: String,
        moves: Vec<EvictMove>,
    },
    /// `node_evict_progress`: the step of the evict running here, if one runs.
    EvictProgress {
        step: Option<EvictStep>,
    },
    Snapshot {
        snapshot: SnapshotInfo,
    },
    Snapshots {
        snapshots: Vec<SnapshotInfo>,
    },
    /// One line of the `events` stream.
    Event {
        event: Event,
    },
}

/// One snapshot of a volume (`tandem snapshot ...`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub volume: String,
    pub name: String,
    /// The data nodes holding this snapshot, in config order.
    pub nodes: Vec<String>,
    /// How long writes were held for `snapshot_create` on an open volume, in ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_ms: Option<u64>,
}

/// `node_info`'s result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// This node's name (`node` in the config).
    pub name: String,
    /// tandemd's version.
    pub version: String,
    pub config_path: PathBuf,
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
    /// The cluster's nodes as configured.
    pub nodes: Vec<NodeConfig>,
    /// Configured pool names; the first is the default.
    pub pools: Vec<String>,
    /// Number of volumes on this node.
    pub volumes: usize,
    /// sha256 of the node list in force (names, addresses, diskless), 16 hex digits:
    /// equal on every node when their `[[nodes]]` agree.
    #[serde(default)]
    pub config_digest: String,
}

/// One row of `node_list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeListEntry {
    pub node: NodeConfig,
    /// The node answering the list.
    pub this_node: bool,
    /// Its tandemd answered over the peer control API (always true for this node).
    pub reachable: bool,
    /// The digest of its node list, when reachable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_digest: Option<String>,
    /// Why it could not be asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One volume of `node_evict`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvictMove {
    pub volume: String,
    /// Where the new replica went (empty when the volume only had a tiebreaker there).
    pub to: String,
}

/// The volume an evict is moving now: `step` of `of`, to `to`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvictStep {
    pub volume: String,
    pub to: String,
    pub step: usize,
    pub of: usize,
}

/// One node of the cluster as configured: a `[[nodes]]` entry of `tandem.toml` (the
/// daemon's config reads it as this type) and an element of [`NodeInfo::nodes`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub name: String,
    /// Management address (peer control API).
    pub control: SocketAddr,
    /// Replication link address.
    pub replication: SocketAddr,
    /// A tiebreaker that votes but stores no data.
    #[serde(default)]
    pub diskless: bool,
}

/// One pool in `pool_list`'s result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolInfo {
    pub name: String,
    /// `file` or `lvm-thin`.
    pub backend: String,
    /// The pool's `cache` key: `none` (O_DIRECT) or `writeback` (host page cache).
    #[serde(default)]
    pub cache: String,
    /// From the backend (file system or thin pool); 0 when `error` is set.
    pub total_bytes: u64,
    pub used_bytes: u64,
    pub free_bytes: u64,
    /// Sum of the sizes of this pool's volumes (may exceed total: thin provisioning).
    pub provisioned_bytes: u64,
    /// Number of volumes in this pool.
    pub volumes: usize,
    /// Set when the backend could not be queried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A volume's state on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VolumeState {
    /// Definition and storage are present.
    Ok,
    /// The definition exists but its storage was not found at startup.
    Missing,
}

/// One volume, as `volume_show`/`volume_list` report it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    pub name: String,
    pub pool: String,
    pub size_bytes: u64,
    /// The file or block device holding the data.
    pub path: PathBuf,
    pub state: VolumeState,
    pub created_unix: u64,
    /// Nodes holding data replicas (empty: a single replica on this node).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    /// Diskless tiebreakers voting for the volume.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tiebreakers: Vec<String>,
    /// This node stores nothing for the volume (it is a tiebreaker).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub diskless: bool,
    /// Replication options (present for replicated volumes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub options: Option<VolumeOptions>,
    /// A template: writable opens are refused.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
    /// A linked clone's origin, `VOLUME` or `VOLUME@SNAPSHOT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone_of: Option<String>,
}

/// Stable error classes callers branch on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorKind {
    /// A name, size or pool argument was refused before anything was touched.
    InvalidArgument,
    /// No such volume or pool.
    NotFound,
    /// A volume of that name exists.
    AlreadyExists,
    /// Another operation on the volume is in progress.
    Busy,
    /// The volume is open (e.g. served to QEMU) and cannot be deleted.
    InUse,
    /// The pool has not enough space.
    NoSpace,
    /// The storage backend failed (lvm command, file system).
    Backend,
    /// The definition store failed.
    Storage,
    /// The request line was not understood.
    BadRequest,
    /// A bug or unexpected failure in the daemon.
    Internal,
    /// A peer node could not be reached or failed the request.
    Peer,
    /// The replication engine refused (role, quorum, disk state, split brain).
    Refused,
    /// A kind this client does not know (sent by a newer daemon).
    #[serde(other)]
    Unknown,
}

/// An error as it crosses the API: a stable kind plus a one-line message for humans.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ApiError {
            kind,
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_carry_kind_and_message_and_tolerate_new_kinds() {
        let response = Response::Error {
            error: ApiError::new(ErrorKind::AlreadyExists, "volume 'v1' already exists"),
        };
        assert_eq!(
            serde_json::to_string(&response).unwrap(),
            r#"{"status":"error","error":{"kind":"already_exists","message":"volume 'v1' already exists"}}"#
        );
        let newer: Response = serde_json::from_str(
            r#"{"status":"error","error":{"kind":"split_brain","message":"x"}}"#,
        )
        .unwrap();
        assert_eq!(
            newer,
            Response::Error {
                error: ApiError::new(ErrorKind::Unknown, "x")
            }
        );
    }
}
