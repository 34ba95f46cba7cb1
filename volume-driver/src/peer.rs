//! The peer control API: how `tandemd`s of one cluster ask each other to create, delete,
//! resize and report replicas.
//!
//! Transport: TCP on each node's `control` address (management network). Every connection
//! is authenticated first with `replication::auth::authenticate` and the cluster's shared
//! secret (the dialer is the initiator); a peer that fails is dropped and logged, and no
//! request is read before authentication succeeds. Then the framing is the local API's:
//! newline-delimited JSON, one [`PeerRequest`] line answered by one [`PeerResponse`] line,
//! lines at most [`MAX_LINE`] bytes. The listener runs only when the config lists more than
//! one node; local clients keep using the unix socket (the peer API offers none of its
//! requests).
//!
//! Creating a replicated volume is two-phase so that nothing is half-done and two
//! concurrent creates of one name exactly one wins (the coordinator is the node where
//! `tandem volume create` ran; see [`crate::cluster`]):
//!
//! ```text
//! coordinator                          each node of the volume, in config order
//!   replica_prepare {name, token} ───▶ validate, reserve the name (placeholder + token)
//!   replica_commit {token, def, day0} ▶ allocate storage, metadata (day0), definition, open
//!   on any failure: replica_delete (committed) / replica_abort (prepared), in reverse
//! ```

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use control_api::{ApiError, ErrorKind, VolumeInfo, VolumeStatus, MAX_LINE};
use replication::auth::{authenticate, AuthRole, Secret, DEFAULT_AUTH_TIMEOUT};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use crate::options::VolumeOptions;
use crate::service::VolumeService;
use crate::store::VolumeDefinition;

/// How long to wait for a peer's TCP connect.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a peer may take to answer (allocations run `lvm`).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);

/// A request from one daemon to another.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case", deny_unknown_fields)]
pub enum PeerRequest {
    /// Validate and reserve `name` for a create coordinated under `token`: the name is free,
    /// and (unless `diskless`) the pool exists and has room for `size_bytes`.
    ReplicaPrepare {
        name: String,
        size_bytes: u64,
        #[serde(default)]
        pool: Option<String>,
        diskless: bool,
        token: String,
        /// A linked clone: it allocates nothing up front, so no room check.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        linked: bool,
    },
    /// Allocate and register the reserved replica: storage (unless diskless), metadata
    /// with the shared `day0` generation, the definition, then open it in the engine.
    ReplicaCommit {
        token: String,
        definition: VolumeDefinition,
        day0: u64,
        /// A replica added to an existing volume (`replica add`): its metadata starts
        /// Inconsistent and `day0` is unused; it full-syncs from an UpToDate replica.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        joining: bool,
    },
    /// Release a reservation taken by `replica_prepare` (no-op when not held by `token`).
    ReplicaAbort { name: String, token: String },
    /// Close and remove this node's replica (definition, storage, metadata).
    ReplicaDelete {
        name: String,
        #[serde(default)]
        force: bool,
    },
    /// Check that this node's pool has room to grow the replica to `size_bytes`.
    ReplicaCheckGrow { name: String, size_bytes: u64 },
    /// Grow this node's replica (storage, then the engine) to `size_bytes`.
    ReplicaResize { name: String, size_bytes: u64 },
    /// This node's view of the volume.
    ReplicaStatus { name: String },
    /// Replace the volume's options on this node (persisted, applied to the replica).
    ReplicaSetOptions {
        name: String,
        options: VolumeOptions,
    },
    /// Check that this node's replica of `name` may be renamed to `new_name` and reserve
    /// `new_name` under `token` (see [`crate::rename`]).
    ReplicaRenamePrepare {
        name: String,
        new_name: String,
        token: String,
    },
    /// Close the replica and rename this node's copy; it stays closed.
    ReplicaRenameCommit {
        name: String,
        new_name: String,
        token: String,
    },
    /// Open the replica of `name` in the engine unless it runs already.
    ReplicaOpen { name: String },
    /// Switch this node's two-primaries gate for `name` (one leg of the cluster-wide
    /// `volume_allow_two_primaries`, see [`crate::cluster`]).
    ReplicaAllowTwoPrimaries { name: String, allow: bool },
    /// This node's identity and config digest (`tandem node list`).
    NodeInfo,
    /// Space per pool on this node (`tandem node evict` picks the node with most free).
    PoolList,
    /// Set the volume's data nodes and tiebreakers in this node's definition and add or
    /// remove the engine's peers to match (idempotent; see [`crate::membership`]).
    ReplicaMembers {
        name: String,
        nodes: Vec<String>,
        tiebreakers: Vec<String>,
    },
    /// Check that this node holds `name`'s storage and that `name@snapshot` exists
    /// (`exists`) or not; answers the status (see [`crate::snapshot`]).
    ReplicaSnapshotCheck {
        name: String,
        snapshot: String,
        exists: bool,
    },
    /// On the Primary: hold writes, take the snapshot under its pending name on every node
    /// of `nodes`, resume; answers the pause and each node's status after its snapshot.
    ReplicaSnapshotTake {
        name: String,
        snapshot: String,
        nodes: Vec<String>,
        /// The command's take token (see [`crate::snapshot_pending`]).
        token: u64,
    },
    /// One snapshot operation on this node's copy.
    ReplicaSnapshotLocal {
        name: String,
        snapshot: String,
        op: crate::snapshot::SnapshotOp,
    },
    /// The snapshots of this node's copy.
    ReplicaSnapshotList { name: String },
    /// The snapshots of `name` this node's `snapshot create`s are taking now (see
    /// [`crate::snapshot_pending`]).
    ReplicaSnapshotsInFlight { name: String },
    /// The replicated volumes this node knows with a replica or tiebreaker on `node`
    /// (`tandem node evict` run on a node that is not a member of them all).
    EvictCandidates { node: String },
    /// `replica_add` coordinated by this node (a member of `name`), for an evict
    /// coordinated elsewhere.
    EvictAdd { name: String, node: String },
    /// `replica_remove` coordinated by this node, for an evict coordinated elsewhere.
    EvictRemove { name: String, node: String },
}

/// A successful peer answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PeerReply {
    Done,
    Volume {
        volume: VolumeInfo,
    },
    Status {
        status: VolumeStatus,
    },
    /// `replica_snapshot_take`: how long writes were held (none on a closed volume), and
    /// each node's status right after it took its snapshot.
    Taken {
        pause_ms: Option<u64>,
        after: Vec<(String, VolumeStatus)>,
    },
    /// `replica_snapshot_list`.
    Names {
        names: Vec<String>,
    },
    /// `evict_candidates`.
    Definitions {
        volumes: Vec<VolumeDefinition>,
    },
    Node {
        node: control_api::NodeInfo,
    },
    Pools {
        pools: Vec<control_api::PoolInfo>,
    },
}

/// One answer line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
// One value per request line, moved once: boxing the larger variant buys nothing.
#[allow(clippy::large_enum_variant)]
pub enum PeerResponse {
    Ok { result: PeerReply },
    Error { error: ApiError },
}

impl PeerRequest {
    fn name(&self) -> &'static str {
        match self {
            PeerRequest::ReplicaPrepare { .. } => "replica_prepare",
            PeerRequest::ReplicaCommit { .. } => "replica_commit",
            PeerRequest::ReplicaAbort { .. } => "replica_abort",
            PeerRequest::ReplicaDelete { .. } => "replica_delete",
            PeerRequest::ReplicaCheckGrow { .. } => "replica_check_grow",
            PeerRequest::ReplicaResize { .. } => "replica_resize",
            PeerRequest::ReplicaStatus { .. } => "replica_status",
            PeerRequest::ReplicaSetOptions { .. } => "replica_set_options",
            PeerRequest::ReplicaRenamePrepare { .. } => "replica_rename_prepare",
            PeerRequest::ReplicaRenameCommit { .. } => "replica_rename_commit",
            PeerRequest::ReplicaOpen { .. } => "replica_open",
            PeerRequest::ReplicaAllowTwoPrimaries { .. } => "replica_allow_two_primaries",
            PeerRequest::NodeInfo => "node_info",
            PeerRequest::PoolList => "pool_list",
            PeerRequest::ReplicaMembers { .. } => "replica_members",
            PeerRequest::ReplicaSnapshotCheck { .. } => "replica_snapshot_check",
            PeerRequest::ReplicaSnapshotTake { .. } => "replica_snapshot_take",
            PeerRequest::ReplicaSnapshotLocal { .. } => "replica_snapshot_local",
            PeerRequest::ReplicaSnapshotList { .. } => "replica_snapshot_list",
            PeerRequest::ReplicaSnapshotsInFlight { .. } => "replica_snapshots_in_flight",
            PeerRequest::EvictCandidates { .. } => "evict_candidates",
            PeerRequest::EvictAdd { .. } => "evict_add",
            PeerRequest::EvictRemove { .. } => "evict_remove",
        }
    }
}

/// Why the peer listener could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen for peers on {addr}")]
pub struct PeerBindError {
    pub addr: SocketAddr,
    #[source]
    pub source: io::Error,
}

/// Bind this node's `control` address.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, PeerBindError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| PeerBindError { addr, source })
}

/// Accept peers forever: authenticate each connection, then answer its requests.
pub async fn serve(
    listener: TcpListener,
    service: Arc<VolumeService>,
    secret: Secret,
) -> io::Result<()> {
    loop {
        let (mut stream, remote) = listener.accept().await?;
        let service = Arc::clone(&service);
        let secret = secret.clone();
        tokio::spawn(async move {
            let peer = remote.to_string();
            if let Err(e) = authenticate(
                &mut stream,
                &secret,
                AuthRole::Acceptor,
                &peer,
                DEFAULT_AUTH_TIMEOUT,
            )
            .await
            {
                tracing::warn!(peer = %peer, error = %crate::report::error_chain(&e),
                    "peer control connection refused: authentication failed");
                return;
            }
            if let Err(e) = answer(stream, &service).await {
                tracing::debug!(peer = %peer, error = %e, "peer control connection ended with an error");
            }
        });
    }
}

async fn read_line<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    line: &mut Vec<u8>,
) -> io::Result<Option<bool>> {
    line.clear();
    let n = reader
        .take(MAX_LINE as u64 + 1)
        .read_until(b'\n', line)
        .await?;
    if n == 0 {
        return Ok(None);
    }
    Ok(Some(line.last() == Some(&b'\n')))
}

async fn answer<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    service: &VolumeService,
) -> io::Result<()> {
    let (read, mut write) = tokio::io::split(stream);
    let mut reader = BufReader::new(read);
    let mut line = Vec::new();
    while let Some(complete) = read_line(&mut reader, &mut line).await? {
        let response = if !complete {
            PeerResponse::Error {
                error: ApiError::new(ErrorKind::BadRequest, "request line too long"),
            }
        } else {
            match serde_json::from_slice::<PeerRequest>(&line) {
                Ok(request) => dispatch(service, request).await,
                Err(e) => PeerResponse::Error {
                    error: ApiError::new(
                        ErrorKind::BadRequest,
                        format!("peer request not understood: {e}"),
                    ),
                },
            }
        };
        let mut out = serde_json::to_vec(&response).map_err(io::Error::other)?;
        out.push(b'\n');
        write.write_all(&out).await?;
        if !complete {
            return Ok(());
        }
    }
    Ok(())
}

/// Carry out one peer request on this node.
pub async fn dispatch(service: &VolumeService, request: PeerRequest) -> PeerResponse {
    let what = request.name();
    let result = match request {
        PeerRequest::ReplicaPrepare {
            name,
            size_bytes,
            pool,
            diskless,
            token,
            linked,
        } => service
            .prepare_replica(&name, size_bytes, pool.as_deref(), diskless, &token, linked)
            .await
            .map(|()| PeerReply::Done),
        PeerRequest::ReplicaCommit {
            token,
            definition,
            day0,
            joining,
        } => service
            .commit_replica(&token, definition, day0, joining)
            .await
            .map(|volume| PeerReply::Volume { volume }),
        PeerRequest::ReplicaAbort { name, token } => {
            service.abort_replica(&name, &token);
            Ok(PeerReply::Done)
        }
        PeerRequest::ReplicaDelete { name, force } => service
            .delete_replica(&name, force)
            .await
            .map(|()| PeerReply::Done),
        PeerRequest::ReplicaCheckGrow { name, size_bytes } => service
            .check_grow(&name, size_bytes)
            .await
            .map(|()| PeerReply::Done),
        PeerRequest::ReplicaResize { name, size_bytes } => service
            .resize_replica(&name, size_bytes)
            .await
            .map(|volume| PeerReply::Volume { volume }),
        PeerRequest::ReplicaStatus { name } => service
            .status(&name)
            .map(|status| PeerReply::Status { status }),
        PeerRequest::ReplicaSetOptions { name, options } => service
            .set_options_local(&name, options)
            .await
            .map(|volume| PeerReply::Volume { volume }),
        PeerRequest::ReplicaRenamePrepare {
            name,
            new_name,
            token,
        } => service
            .prepare_rename(&name, &new_name, &token)
            .await
            .map(|()| PeerReply::Done),
        PeerRequest::ReplicaRenameCommit {
            name,
            new_name,
            token,
        } => service
            .commit_rename(&name, &new_name, &token)
            .await
            .map(|volume| PeerReply::Volume { volume }),
        PeerRequest::ReplicaOpen { name } => service
            .open_replica_if_closed(&name)
            .await
            .map(|()| PeerReply::Done),
        PeerRequest::ReplicaAllowTwoPrimaries { name, allow } => service
            .allow_two_primaries_local(&name, allow)
            .map(|status| PeerReply::Status { status }),
        PeerRequest::NodeInfo => Ok(PeerReply::Node {
            node: service.node_info(),
        }),
        PeerRequest::PoolList => Ok(PeerReply::Pools {
            pools: service.pools().await,
        }),
        PeerRequest::ReplicaMembers {
            name,
            nodes,
            tiebreakers,
        } => service
            .set_members(&name, nodes, tiebreakers)
            .await
            .map(|volume| PeerReply::Volume { volume }),
        PeerRequest::ReplicaSnapshotCheck {
            name,
            snapshot,
            exists,
        } => service
            .snapshot_check(&name, &snapshot, exists)
            .await
            .map(|status| PeerReply::Status { status }),
        PeerRequest::ReplicaSnapshotTake {
            name,
            snapshot,
            nodes,
            token,
        } => Box::pin(service.snapshot_take(&name, &snapshot, &nodes, token))
            .await
            .map(|(pause_ms, after)| PeerReply::Taken { pause_ms, after }),
        PeerRequest::ReplicaSnapshotLocal { name, snapshot, op } => {
            Box::pin(service.snapshot_local(&name, &snapshot, op))
                .await
                .map(|status| match status {
                    Some(status) => PeerReply::Status { status },
                    None => PeerReply::Done,
                })
        }
        PeerRequest::ReplicaSnapshotList { name } => service
            .local_snapshots(&name)
            .await
            .map(|names| PeerReply::Names { names }),
        PeerRequest::ReplicaSnapshotsInFlight { name } => Ok(PeerReply::Names {
            names: service.snapshots_in_flight(&name),
        }),
        PeerRequest::EvictCandidates { node } => Ok(PeerReply::Definitions {
            volumes: service.volumes_with(&node),
        }),
        PeerRequest::EvictAdd { name, node } => Box::pin(service.replica_add(&name, &node))
            .await
            .map(|volume| PeerReply::Volume { volume }),
        PeerRequest::EvictRemove { name, node } => Box::pin(service.replica_remove(&name, &node))
            .await
            .map(|volume| PeerReply::Volume { volume }),
    };
    match result {
        Ok(result) => PeerResponse::Ok { result },
        Err(error) => {
            tracing::warn!(request = what, error = %error.message, "peer request refused or failed");
            PeerResponse::Error { error }
        }
    }
}

/// An authenticated connection to one peer, for several requests in turn (the commands
/// that call a node in more than one round open it once: see [`crate::links`]).
pub struct PeerLink {
    node: String,
    addr: SocketAddr,
    stream: BufReader<TcpStream>,
}

impl PeerLink {
    /// Connect to `node` at `addr` and authenticate. Failures are [`ErrorKind::Peer`] errors
    /// naming the node.
    pub async fn connect(
        node: &str,
        addr: SocketAddr,
        secret: &Secret,
    ) -> Result<PeerLink, ApiError> {
        let started = std::time::Instant::now();
        let peer_err = |what: String| link_error(node, addr, what);
        let mut stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await
        {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                return Err(peer_err(format!(
                    "cannot connect: {e} (is tandemd running there?)"
                )))
            }
            Err(_) => {
                return Err(peer_err(format!(
                    "cannot connect within {}s (is the node down?)",
                    CONNECT_TIMEOUT.as_secs()
                )))
            }
        };
        // Requests are single small lines answered at once: no Nagle delay.
        let _ = stream.set_nodelay(true);
        authenticate(
            &mut stream,
            secret,
            AuthRole::Initiator,
            node,
            DEFAULT_AUTH_TIMEOUT,
        )
        .await
        .map_err(|e| peer_err(crate::report::error_chain(&e)))?;
        tracing::debug!(
            node,
            ms = crate::phases::millis(started.elapsed()),
            "peer connected"
        );
        Ok(PeerLink {
            node: node.to_string(),
            addr,
            stream: BufReader::new(stream),
        })
    }

    /// Send one request and wait for its answer. A refusal by the peer keeps its kind and
    /// gets the node's name in front of the message; after a transport error (an
    /// [`ErrorKind::Peer`] error) the link must not be used again.
    pub async fn call(&mut self, request: &PeerRequest) -> Result<PeerReply, ApiError> {
        let started = std::time::Instant::now();
        let stream = &mut self.stream;
        let exchange = async {
            let mut line = serde_json::to_vec(request).map_err(io::Error::other)?;
            line.push(b'\n');
            stream.get_mut().write_all(&line).await?;
            let mut answer = Vec::new();
            match read_line(stream, &mut answer).await? {
                Some(true) => Ok(answer),
                _ => Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the connection without a complete answer",
                )),
            }
        };
        let answer = match tokio::time::timeout(ANSWER_TIMEOUT, exchange).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => return Err(self.error(format!("request failed: {e}"))),
            Err(_) => {
                return Err(self.error(format!("no answer within {}s", ANSWER_TIMEOUT.as_secs())))
            }
        };
        tracing::debug!(node = %self.node, request = request.name(),
            ms = crate::phases::millis(started.elapsed()), "peer call answered");
        match serde_json::from_slice::<PeerResponse>(&answer) {
            Ok(PeerResponse::Ok { result }) => Ok(result),
            Ok(PeerResponse::Error { error }) => Err(ApiError::new(
                error.kind,
                format!("on node '{}': {}", self.node, error.message),
            )),
            Err(e) => Err(self.error(format!("answer not understood: {e}"))),
        }
    }

    fn error(&self, what: String) -> ApiError {
        link_error(&self.node, self.addr, what)
    }
}

fn link_error(node: &str, addr: SocketAddr, what: String) -> ApiError {
    ApiError::new(ErrorKind::Peer, format!("node '{node}' ({addr}): {what}"))
}

/// Send one request to the peer `node` at `addr` on a connection of its own and wait for
/// its answer (see [`PeerLink`] for the errors).
pub async fn call(
    node: &str,
    addr: SocketAddr,
    secret: &Secret,
    request: &PeerRequest,
) -> Result<PeerReply, ApiError> {
    PeerLink::connect(node, addr, secret)
        .await?
        .call(request)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_requests_have_a_stable_wire_form() {
        let request = PeerRequest::ReplicaPrepare {
            name: "v".into(),
            size_bytes: 4096,
            pool: None,
            diskless: false,
            token: "t".into(),
            linked: false,
        };
        let line = serde_json::to_string(&request).unwrap();
        assert_eq!(
            line,
            r#"{"request":"replica_prepare","name":"v","size_bytes":4096,"pool":null,"diskless":false,"token":"t"}"#
        );
        assert_eq!(serde_json::from_str::<PeerRequest>(&line).unwrap(), request);
        let rename = PeerRequest::ReplicaRenameCommit {
            name: "v".into(),
            new_name: "w".into(),
            token: "t".into(),
        };
        let line = serde_json::to_string(&rename).unwrap();
        assert_eq!(
            line,
            r#"{"request":"replica_rename_commit","name":"v","new_name":"w","token":"t"}"#
        );
        assert_eq!(serde_json::from_str::<PeerRequest>(&line).unwrap(), rename);
        // Local-API requests are not peer requests.
        assert!(
            serde_json::from_str::<PeerRequest>(r#"{"request":"volume_delete","name":"v"}"#)
                .is_err()
        );
    }

    #[tokio::test]
    async fn a_peer_with_the_wrong_secret_gets_no_answer() {
        let dir = tempfile::tempdir().unwrap();
        let service = Arc::new(crate::service::tests::service(dir.path()));
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let good = Secret::new(b"right".to_vec()).unwrap();
        tokio::spawn(serve(listener, Arc::clone(&service), good.clone()));
        let status = PeerRequest::ReplicaStatus {
            name: "nope".into(),
        };
        let bad = Secret::new(b"wrong".to_vec()).unwrap();
        let e = call("hv2", addr, &bad, &status).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Peer, "{}", e.message);
        assert!(e.message.starts_with("node 'hv2'"), "{}", e.message);
        // The right secret gets the daemon's own answer.
        let e = call("hv2", addr, &good, &status).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::NotFound, "{}", e.message);
        assert!(
            e.message.contains("on node 'hv2': volume 'nope'"),
            "{}",
            e.message
        );
        // One link carries request after request (a refusal does not end it).
        let mut link = PeerLink::connect("hv2", addr, &good).await.unwrap();
        for _ in 0..3 {
            let e = link.call(&status).await.unwrap_err();
            assert_eq!(e.kind, ErrorKind::NotFound, "{}", e.message);
        }
        let answer = link.call(&PeerRequest::NodeInfo).await.unwrap();
        assert!(matches!(answer, PeerReply::Node { .. }), "{answer:?}");
    }
}
