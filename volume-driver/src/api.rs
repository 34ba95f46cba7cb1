//! The local control API: `tandemd` ↔ `tandem` (and the libvirt hook, the HA agent).
//!
//! Transport: the unix socket `<run_dir>/tandemd.sock` (mode 0600, root only). Framing:
//! newline-delimited JSON, one [`Request`] line answered by one [`Response`] line, any
//! number of exchanges per connection, in order. A request line may be at most
//! [`MAX_LINE`] bytes.
//!
//! ```text
//! → {"request":"volume_create","name":"v1","size_bytes":67108864,"pool":null}
//! ← {"status":"ok","result":{"type":"volume","volume":{"name":"v1","pool":"files",...}}}
//! → {"request":"volume_show","name":"nope"}
//! ← {"status":"error","error":{"kind":"not_found","message":"volume 'nope' does not exist"}}
//! ```
//!
//! Versioning: requests are tagged by `request` name. New requests (replication commands)
//! and new optional fields are added without breaking old clients; a daemon answers a
//! request it does not know with kind `bad_request`, and a client maps an error kind it does
//! not know to [`ErrorKind::Unknown`]. Field names here are stable: `tandem --json` prints
//! these structures unchanged.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::NodeConfig;
use crate::options::{OptionsChange, VolumeOptions};

/// Longest request or response line accepted (bytes, without the newline).
pub const MAX_LINE: usize = 1 << 20;

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
    /// Change replication options on every replica (persisted) → [`Reply::Volume`].
    VolumeSet {
        name: String,
        #[serde(flatten)]
        change: OptionsChange,
    },
}

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
}

/// One volume's replication status on one node: the engine's status object (replication/README.md)
/// plus the daemon's own fields. `tandem volume status --json` prints it unchanged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeStatus {
    #[serde(flatten)]
    pub replica: ReplicaStatus,
    /// Promoted by `tandem volume promote` (stays Primary when the last writer closes).
    pub promoted_explicitly: bool,
    /// Writable frontend handles (NBD clients) open on this node.
    pub open_writers: usize,
}

/// The engine's view of the local replica. States are spelled as DRBD prints them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    pub volume: String,
    pub node: String,
    /// `Primary` or `Secondary`.
    pub role: String,
    /// `UpToDate`, `Outdated`, `Inconsistent`, `Diskless`, ...
    pub disk_state: String,
    /// `A`, `B` or `C`.
    pub protocol: String,
    pub quorum: bool,
    /// Why (not) quorum, e.g. "1 of 2 voters reachable, kept by tiebreaker (1 of 1)".
    #[serde(default)]
    pub quorum_reason: String,
    pub io_suspended: bool,
    pub allow_two_primaries: bool,
    pub size_bytes: u64,
    #[serde(default)]
    pub current_uuid: String,
    #[serde(default)]
    pub peers: Vec<PeerStatus>,
    #[serde(default)]
    pub last_verify: Option<VerifySummary>,
}

/// How the local replica sees one peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub node: String,
    pub diskless: bool,
    /// `Connected`, `Connecting`, `StandAlone`, ...
    pub connection: String,
    pub role: String,
    pub disk_state: String,
    /// `Established`, `SyncSource`, `SyncTarget`, `Off`, ...
    pub replication: String,
    pub out_of_sync_bytes: u64,
    #[serde(default)]
    pub resync: Option<ResyncProgress>,
    /// Set during a split brain: what happened and the command that resolves it.
    #[serde(default)]
    pub split_brain: Option<String>,
    /// Set when the peer, as a second Primary, wrote blocks this node was writing at the
    /// same moment: the connection was failed instead of merging the writes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub two_primaries_conflict: Option<String>,
    /// The last handshake decision, in words.
    #[serde(default)]
    pub decision: Option<String>,
    /// The last connection error while the link is down.
    #[serde(default)]
    pub last_error: Option<String>,
}

/// A running resync.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResyncProgress {
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub bytes_per_sec: u64,
}

/// The outcome of an online verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifySummary {
    pub differing_blocks: u64,
    pub checked_bytes: u64,
}

impl VolumeStatus {
    /// Every data replica (local and peers) is UpToDate and connected peers are not
    /// resyncing: what `tandem volume wait-sync` waits for.
    pub fn in_sync(&self) -> bool {
        self.replica.disk_state == "UpToDate"
            && self.replica.peers.iter().all(|p| {
                p.diskless
                    || (p.connection == "Connected"
                        && p.disk_state == "UpToDate"
                        && p.out_of_sync_bytes == 0
                        && p.resync.is_none())
            })
    }
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
}

/// One pool in `pool_list`'s result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolInfo {
    pub name: String,
    /// `file` or `lvm-thin`.
    pub backend: String,
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

/// Errors of the client side.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach tandemd at {} (is it running?)", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("lost connection to tandemd at {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("tandemd at {} sent an answer this client does not understand: {message}", path.display())]
    Protocol { path: PathBuf, message: String },
    /// The daemon refused or failed the request.
    #[error(transparent)]
    Api(#[from] ApiError),
}

/// A blocking client of the control API.
pub struct Client {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    /// Connect to the daemon's socket.
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        let writer = stream.try_clone().map_err(|source| ClientError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Client {
            path: path.to_path_buf(),
            reader: BufReader::new(stream),
            writer,
        })
    }

    /// Send one request and wait for its answer. A refusal is [`ClientError::Api`].
    pub fn call(&mut self, request: &Request) -> Result<Reply, ClientError> {
        let io = |source| ClientError::Io {
            path: self.path.clone(),
            source,
        };
        let mut line = serde_json::to_vec(request).map_err(|e| ClientError::Protocol {
            path: self.path.clone(),
            message: e.to_string(),
        })?;
        line.push(b'\n');
        self.writer.write_all(&line).map_err(io)?;
        let mut answer = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut answer)
            .map_err(|source| ClientError::Io {
                path: self.path.clone(),
                source,
            })?;
        if n == 0 || answer.last() != Some(&b'\n') {
            return Err(ClientError::Io {
                path: self.path.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the daemon closed the connection without a complete answer",
                ),
            });
        }
        match serde_json::from_slice::<Response>(&answer) {
            Ok(Response::Ok { result }) => Ok(result),
            Ok(Response::Error { error }) => Err(ClientError::Api(error)),
            Err(e) => Err(ClientError::Protocol {
                path: self.path.clone(),
                message: e.to_string(),
            }),
        }
    }
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

    #[test]
    fn the_status_object_is_the_engine_object_plus_the_daemon_fields() {
        let json = r#"{ "volume": "vm-100-disk-0", "node": "hv1", "role": "Primary", "disk_state": "UpToDate",
  "protocol": "C", "quorum": true, "io_suspended": false, "allow_two_primaries": false,
  "size_bytes": 2147483648, "current_uuid": "5A3F",
  "peers": [ { "node": "hv2", "diskless": false, "connection": "Connected",
               "role": "Secondary", "disk_state": "UpToDate", "replication": "Established",
               "out_of_sync_bytes": 0, "resync": null, "split_brain": null } ],
  "last_verify": null, "promoted_explicitly": true, "open_writers": 1 }"#;
        let status: VolumeStatus = serde_json::from_str(json).unwrap();
        assert_eq!(status.replica.peers[0].node, "hv2");
        assert!(status.promoted_explicitly);
        assert!(status.in_sync());
        let back = serde_json::to_value(&status).unwrap();
        assert_eq!(back["open_writers"], 1);
        assert_eq!(back["peers"][0]["replication"], "Established");
        let mut syncing = status.clone();
        syncing.replica.peers[0].out_of_sync_bytes = 4096;
        assert!(!syncing.in_sync());
    }

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
