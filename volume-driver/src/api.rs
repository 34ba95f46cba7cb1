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
    /// Create a volume; `pool` defaults to the first configured pool → [`Reply::Volume`].
    VolumeCreate {
        name: String,
        size_bytes: u64,
        #[serde(default)]
        pool: Option<String>,
    },
    /// All volumes, sorted by name → [`Reply::Volumes`].
    VolumeList,
    /// One volume → [`Reply::Volume`].
    VolumeShow { name: String },
    /// Grow a volume to `size_bytes` (never shrinks) → [`Reply::Volume`].
    VolumeResize { name: String, size_bytes: u64 },
    /// Delete a volume and its storage → [`Reply::Deleted`].
    VolumeDelete { name: String },
}

/// The daemon's answer to one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Response {
    Ok { result: Reply },
    Error { error: ApiError },
}

/// A successful result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    NodeInfo { node: NodeInfo },
    Pools { pools: Vec<PoolInfo> },
    Volume { volume: VolumeInfo },
    Volumes { volumes: Vec<VolumeInfo> },
    Deleted { name: String },
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
                pool: None
            }
        );
        assert_eq!(
            serde_json::to_string(&Request::PoolList).unwrap(),
            r#"{"request":"pool_list"}"#
        );
        assert!(serde_json::from_str::<Request>(r#"{"request":"reboot"}"#).is_err());
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
