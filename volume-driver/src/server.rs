//! The control API server: binds `<run_dir>/tandemd.sock` and answers [`Request`]s with the
//! [`VolumeService`] (wire format in [`crate::api`]).
//!
//! Binding creates `run_dir` if missing, refuses to start when another daemon answers on
//! the socket, removes a stale socket file, and restricts the socket to its owner (0600).

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use control_api::{ApiError, ErrorKind, Reply, Request, Response, MAX_LINE};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::broadcast::error::RecvError;

use crate::events::EventHub;
use crate::service::VolumeService;

/// Why the control socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("cannot create run directory {path}")]
    RunDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("another tandemd is already serving {path}")]
    InUse { path: PathBuf },
    #[error("cannot remove stale socket {path}")]
    Stale {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen on {path}")]
    Listen {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Bind the control socket at `path` (must be called inside a tokio runtime).
pub fn bind(path: &Path) -> Result<UnixListener, BindError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| BindError::RunDir {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    if path.exists() || path.symlink_metadata().is_ok() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(BindError::InUse {
                path: path.to_path_buf(),
            });
        }
        tracing::info!(path = %path.display(), "removing stale control socket");
        std::fs::remove_file(path).map_err(|source| BindError::Stale {
            path: path.to_path_buf(),
            source,
        })?;
    }
    let listen = |source| BindError::Listen {
        path: path.to_path_buf(),
        source,
    };
    let listener = UnixListener::bind(path).map_err(listen)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(listen)?;
    Ok(listener)
}

/// Accept connections forever, one task per connection. `events` requests are served
/// from `events`.
pub async fn serve(
    listener: UnixListener,
    service: Arc<VolumeService>,
    events: Arc<EventHub>,
) -> io::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        let service = Arc::clone(&service);
        let events = Arc::clone(&events);
        tokio::spawn(async move {
            if let Err(e) = handle_connection(stream, service, events).await {
                tracing::debug!(error = %e, "control connection ended with an error");
            }
        });
    }
}

async fn handle_connection(
    stream: UnixStream,
    service: Arc<VolumeService>,
    events: Arc<EventHub>,
) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = (&mut reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 {
            return Ok(());
        }
        let too_long = line.last() != Some(&b'\n');
        let response = if too_long {
            Response::Error {
                error: ApiError::new(
                    ErrorKind::BadRequest,
                    format!("request longer than {MAX_LINE} bytes or not newline-terminated"),
                ),
            }
        } else {
            match serde_json::from_slice::<Request>(&line) {
                // The rest of this connection is the event stream.
                Ok(Request::Events { now }) => {
                    return stream_events(&events, now, reader, write).await
                }
                Ok(request) => dispatch(&service, request).await,
                Err(e) => Response::Error {
                    error: ApiError::new(
                        ErrorKind::BadRequest,
                        format!("request not understood: {e}"),
                    ),
                },
            }
        };
        let mut out = serde_json::to_vec(&response).map_err(io::Error::other)?;
        out.push(b'\n');
        write.write_all(&out).await?;
        if too_long {
            return Ok(());
        }
    }
}

/// Write `exists` events, the end marker and (unless `now`) every later event, one
/// [`Reply::Event`] per line, until the client goes away or falls [`crate::events::BACKLOG`]
/// batches behind (it reconnects and starts over). The client sends nothing more: its
/// end of the connection is only watched for the close, so a departed client stops the
/// stream at once, not at the next event.
async fn stream_events(
    hub: &EventHub,
    now: bool,
    mut read: BufReader<tokio::net::unix::OwnedReadHalf>,
    mut write: tokio::net::unix::OwnedWriteHalf,
) -> io::Result<()> {
    let (initial, mut rx) = hub.subscribe();
    write_events(&mut write, &initial).await?;
    if now {
        return Ok(());
    }
    let mut ignored = [0u8; 512];
    loop {
        let received = tokio::select! {
            r = rx.recv() => r,
            n = read.read(&mut ignored) => match n {
                Ok(0) | Err(_) => return Ok(()),
                Ok(_) => continue,
            },
        };
        match received {
            Ok(batch) => write_events(&mut write, &batch).await?,
            Err(RecvError::Lagged(n)) => {
                tracing::warn!(
                    batches = n,
                    "an events client fell behind; closing its stream"
                );
                return Ok(());
            }
            Err(RecvError::Closed) => return Ok(()),
        }
    }
}

async fn write_events(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    events: &[control_api::Event],
) -> io::Result<()> {
    let mut out = Vec::new();
    for event in events {
        let line = Response::Ok {
            result: Reply::Event {
                event: event.clone(),
            },
        };
        serde_json::to_writer(&mut out, &line).map_err(io::Error::other)?;
        out.push(b'\n');
    }
    write.write_all(&out).await
}

/// Carry out one request.
pub async fn dispatch(service: &VolumeService, request: Request) -> Response {
    let what = request_name(&request);
    let started = std::time::Instant::now();
    let result = match request {
        Request::NodeInfo => Ok(Reply::NodeInfo {
            node: service.node_info(),
        }),
        Request::PoolList => Ok(Reply::Pools {
            pools: service.pools().await,
        }),
        Request::VolumeCreate {
            name,
            size_bytes,
            pool,
            replicas,
            protocol,
            nodes,
        } => service
            .create(
                &name,
                size_bytes,
                pool.as_deref(),
                replicas,
                protocol.as_deref(),
                nodes.as_deref(),
            )
            .await
            .map(|volume| Reply::Volume { volume }),
        Request::VolumeList => Ok(Reply::Volumes {
            volumes: service.list(),
        }),
        Request::VolumeShow { name } => service.show(&name).map(|volume| Reply::Volume { volume }),
        Request::VolumeResize { name, size_bytes } => service
            .resize(&name, size_bytes)
            .await
            .map(|volume| Reply::Volume { volume }),
        Request::VolumeDelete { name, force } => service
            .delete(&name, force)
            .await
            .map(|left_on| Reply::Deleted { name, left_on }),
        Request::VolumeRename { name, new_name } => service
            .rename(&name, &new_name)
            .await
            .map(|volume| Reply::Volume { volume }),
        Request::VolumeStatus { name } => {
            service.status(&name).map(|status| Reply::Status { status })
        }
        Request::VolumeStatusAll => Ok(Reply::Statuses {
            statuses: service.status_all(),
        }),
        Request::VolumePromote { name } => service
            .promote(&name)
            .await
            .map(|status| Reply::Status { status }),
        Request::VolumeDemote { name, force } => service
            .demote_with(&name, force)
            .await
            .map(|status| Reply::Status { status }),
        Request::VolumeAllowTwoPrimaries { name, allow } => service
            .allow_two_primaries(&name, allow)
            .await
            .map(|status| Reply::Status { status }),
        Request::VolumeResolve {
            name,
            discard_local,
        } => service
            .resolve(&name, discard_local)
            .await
            .map(|status| Reply::Status { status }),
        Request::VolumeVerify { name } => service
            .verify(&name)
            .await
            .map(|report| Reply::Verified { name, report }),
        // Streams are answered by `handle_connection`; a lone dispatch cannot stream.
        Request::Events { .. } => Err(ApiError::new(
            ErrorKind::BadRequest,
            "events is a stream: send it on its own connection",
        )),
        Request::VolumeSet { name, change } => service
            .set_options(&name, &change)
            .await
            .map(|volume| Reply::Volume { volume }),
        Request::NodeList => Ok(Reply::Nodes {
            nodes: service.node_list().await,
        }),
        Request::NodeReload => service.reload().await,
        Request::NodeEvict { node, to } => service.evict(&node, to.as_deref()).await,
        Request::NodeEvictProgress { node } => Ok(Reply::EvictProgress {
            step: service.evict_step(&node),
        }),
        Request::ReplicaAdd { name, node } => service
            .replica_add(&name, &node)
            .await
            .map(|volume| Reply::Volume { volume }),
        Request::ReplicaRemove { name, node } => service
            .replica_remove(&name, &node)
            .await
            .map(|volume| Reply::Volume { volume }),
        Request::ReplicaMove { name, from, to } => service
            .replica_move(&name, &from, &to)
            .await
            .map(|volume| Reply::Volume { volume }),
        Request::VolumeClone { origin, new_name } => service
            .volume_clone(&origin, &new_name)
            .await
            .map(|volume| Reply::Volume { volume }),
        Request::SnapshotCreate { name, snapshot } => service
            .snapshot_create(&name, &snapshot)
            .await
            .map(|snapshot| Reply::Snapshot { snapshot }),
        Request::SnapshotList { name } => service
            .snapshot_list(&name)
            .await
            .map(|snapshots| Reply::Snapshots { snapshots }),
        Request::SnapshotDelete { name, snapshot } => service
            .snapshot_delete(&name, &snapshot)
            .await
            .map(|snapshot| Reply::Snapshot { snapshot }),
        Request::SnapshotRollback { name, snapshot } => service
            .snapshot_rollback(&name, &snapshot)
            .await
            .map(|snapshot| Reply::Snapshot { snapshot }),
    };
    tracing::debug!(
        request = what,
        ms = crate::phases::millis(started.elapsed()),
        "control request answered"
    );
    match result {
        Ok(result) => Response::Ok { result },
        Err(error) => {
            match error.kind {
                ErrorKind::Backend | ErrorKind::Storage | ErrorKind::Internal | ErrorKind::Peer => {
                    tracing::error!(request = what, error = %error.message, "request failed")
                }
                _ => tracing::warn!(request = what, error = %error.message, "request refused"),
            }
            Response::Error { error }
        }
    }
}

fn request_name(request: &Request) -> &'static str {
    match request {
        Request::NodeInfo => "node_info",
        Request::PoolList => "pool_list",
        Request::VolumeCreate { .. } => "volume_create",
        Request::VolumeList => "volume_list",
        Request::VolumeShow { .. } => "volume_show",
        Request::VolumeResize { .. } => "volume_resize",
        Request::VolumeDelete { .. } => "volume_delete",
        Request::VolumeRename { .. } => "volume_rename",
        Request::VolumeStatus { .. } => "volume_status",
        Request::VolumeStatusAll => "volume_status_all",
        Request::VolumePromote { .. } => "volume_promote",
        Request::VolumeDemote { .. } => "volume_demote",
        Request::VolumeAllowTwoPrimaries { .. } => "volume_allow_two_primaries",
        Request::VolumeResolve { .. } => "volume_resolve",
        Request::VolumeVerify { .. } => "volume_verify",
        Request::VolumeSet { .. } => "volume_set",
        Request::VolumeClone { .. } => "volume_clone",
        Request::SnapshotCreate { .. } => "snapshot_create",
        Request::SnapshotList { .. } => "snapshot_list",
        Request::SnapshotDelete { .. } => "snapshot_delete",
        Request::SnapshotRollback { .. } => "snapshot_rollback",
        Request::Events { .. } => "events",
        Request::NodeList => "node_list",
        Request::NodeReload => "node_reload",
        Request::NodeEvict { .. } => "node_evict",
        Request::NodeEvictProgress { .. } => "node_evict_progress",
        Request::ReplicaAdd { .. } => "replica_add",
        Request::ReplicaRemove { .. } => "replica_remove",
        Request::ReplicaMove { .. } => "replica_move",
    }
}
