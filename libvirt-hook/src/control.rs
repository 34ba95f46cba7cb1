//! The hook's view of tandemd's control API (`<run_dir>/tandemd.sock`, newline-delimited
//! JSON, see `volume_driver::api`): the replication requests it sends, the per-volume status
//! it reads, and a blocking client with timeouts (a hook must never hang libvirt).
//!
//! The replication requests (`volume_status`, `volume_promote`, `volume_demote`,
//! `volume_allow_two_primaries`) are the replication engine's contract; they live here, in
//! this one module, until `volume_driver::api` carries them. A tandemd without the engine
//! answers them with kind `bad_request` ("unknown variant `volume_status`"): the client
//! reports that as [`StatusAnswer::NoRoles`] after confirming with `volume_show` that the
//! volume exists, and nothing else is ever read as "no roles".

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use volume_driver::api::{ApiError, ErrorKind, Request, MAX_LINE};

/// How long one exchange with tandemd may take before the hook gives up.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// The replication requests the hook sends (the engine's contract).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum ReplicationRequest {
    VolumeStatus { name: String },
    VolumePromote { name: String },
    VolumeDemote { name: String },
    VolumeAllowTwoPrimaries { name: String, allow: bool },
}

/// A replica's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum Role {
    Primary,
    Secondary,
    /// A role this hook does not know (from a newer daemon) or a peer whose role is unknown.
    #[serde(other)]
    Unknown,
}

/// A replica's disk state, as DRBD names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum DiskState {
    UpToDate,
    Outdated,
    Inconsistent,
    Diskless,
    Consistent,
    #[serde(other)]
    Unknown,
}

impl std::fmt::Display for DiskState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = match self {
            DiskState::UpToDate => "UpToDate",
            DiskState::Outdated => "Outdated",
            DiskState::Inconsistent => "Inconsistent",
            DiskState::Diskless => "Diskless",
            DiskState::Consistent => "Consistent",
            DiskState::Unknown => "in an unknown state",
        };
        f.write_str(text)
    }
}

/// One peer in a volume's status.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct PeerStatus {
    pub node: String,
    /// `Connected`, `Connecting`, `StandAlone`, ...
    #[serde(default)]
    pub connection: String,
    pub role: Role,
    pub disk_state: DiskState,
}

/// `volume_status`'s answer for one volume on this node.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct VolumeStatus {
    /// The volume (the engine's `ReplicaStatus` calls it `volume`).
    #[serde(default, alias = "volume")]
    pub name: String,
    pub role: Role,
    pub disk_state: DiskState,
    #[serde(default)]
    pub peers: Vec<PeerStatus>,
    /// Whether this node has quorum for the volume.
    pub quorum: bool,
    pub allow_two_primaries: bool,
    /// `A`, `B` or `C`.
    pub protocol: String,
    /// Promoted by an operator (`tandem volume promote`), not by a consumer such as this
    /// hook: the hook's release leaves such a volume Primary.
    #[serde(default)]
    pub promoted_explicitly: bool,
    /// Writable frontend handles (NBD clients) open on this node, when tandemd reports it.
    #[serde(default)]
    pub open_writers: Option<u64>,
}

/// What this node's tandemd says about a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatusAnswer {
    /// The replication engine's status.
    Replicated(VolumeStatus),
    /// This tandemd has no replication engine (no roles): the volume exists and is a
    /// single-host volume, there is nothing to promote or demote.
    NoRoles,
    /// No such volume on this node (tandemd's message).
    NotFound(String),
}

/// A failed exchange with tandemd.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot reach tandemd at {} (is it running?)", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no answer from tandemd at {} within {} s", path.display(), timeout.as_secs())]
    Timeout { path: PathBuf, timeout: Duration },
    #[error("lost connection to tandemd at {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("tandemd at {} sent an answer this hook does not understand: {message}", path.display())]
    Protocol { path: PathBuf, message: String },
    /// tandemd refused or failed the request; its message is for the operator.
    #[error(transparent)]
    Api(#[from] ApiError),
}

/// What the hook asks of tandemd; a trait so the executor can be tested without a daemon.
pub trait Control {
    fn status(&mut self, volume: &str) -> Result<StatusAnswer, ControlError>;
    fn promote(&mut self, volume: &str) -> Result<(), ControlError>;
    fn demote(&mut self, volume: &str) -> Result<(), ControlError>;
    fn allow_two_primaries(&mut self, volume: &str, allow: bool) -> Result<(), ControlError>;
}

/// A blocking client of tandemd's control socket with a timeout on every exchange.
pub struct ControlClient {
    path: PathBuf,
    timeout: Duration,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// An exchange failed midway (timeout, I/O, garbled answer): a late answer may still
    /// arrive on this connection, so the next call reconnects instead of reading it.
    broken: bool,
}

impl ControlClient {
    /// Connect to `socket` (`<run_dir>/tandemd.sock`).
    pub fn connect(socket: &Path, timeout: Duration) -> Result<ControlClient, ControlError> {
        let (reader, writer) = ControlClient::open(socket, timeout)?;
        Ok(ControlClient {
            path: socket.to_path_buf(),
            timeout,
            reader,
            writer,
            broken: false,
        })
    }

    fn open(
        socket: &Path,
        timeout: Duration,
    ) -> Result<(BufReader<UnixStream>, UnixStream), ControlError> {
        let connect_err = |source| ControlError::Connect {
            path: socket.to_path_buf(),
            source,
        };
        let stream = UnixStream::connect(socket).map_err(connect_err)?;
        stream
            .set_read_timeout(Some(timeout))
            .and_then(|()| stream.set_write_timeout(Some(timeout)))
            .map_err(connect_err)?;
        let writer = stream.try_clone().map_err(connect_err)?;
        Ok((BufReader::new(stream), writer))
    }

    fn io_error(&self, source: std::io::Error) -> ControlError {
        match source.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                ControlError::Timeout {
                    path: self.path.clone(),
                    timeout: self.timeout,
                }
            }
            _ => ControlError::Io {
                path: self.path.clone(),
                source,
            },
        }
    }

    /// Send one request line and return the `result` of an `ok` answer.
    pub fn call<R: Serialize>(&mut self, request: &R) -> Result<serde_json::Value, ControlError> {
        if self.broken {
            let (reader, writer) = ControlClient::open(&self.path, self.timeout)?;
            self.reader = reader;
            self.writer = writer;
            self.broken = false;
        }
        let result = self.exchange(request);
        if let Err(e) = &result {
            self.broken = !matches!(e, ControlError::Api(_));
        }
        result
    }

    fn exchange<R: Serialize>(&mut self, request: &R) -> Result<serde_json::Value, ControlError> {
        let mut line = serde_json::to_vec(request).map_err(|e| ControlError::Protocol {
            path: self.path.clone(),
            message: e.to_string(),
        })?;
        line.push(b'\n');
        if let Err(e) = self.writer.write_all(&line) {
            return Err(self.io_error(e));
        }
        let mut answer = Vec::new();
        let read = (&mut self.reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut answer);
        match read {
            Err(e) => return Err(self.io_error(e)),
            Ok(0) => {
                return Err(ControlError::Io {
                    path: self.path.clone(),
                    source: std::io::ErrorKind::UnexpectedEof.into(),
                })
            }
            Ok(_) => {}
        }
        if answer.last() != Some(&b'\n') {
            return Err(ControlError::Protocol {
                path: self.path.clone(),
                message: format!("answer longer than {MAX_LINE} bytes or cut short"),
            });
        }
        parse_response(&answer).map_err(|e| match e {
            ResponseError::Api(api) => ControlError::Api(api),
            ResponseError::Protocol(message) => ControlError::Protocol {
                path: self.path.clone(),
                message,
            },
        })
    }
}

enum ResponseError {
    Api(ApiError),
    Protocol(String),
}

/// `{"status":"ok","result":R}` → R; `{"status":"error","error":E}` → E.
fn parse_response(line: &[u8]) -> Result<serde_json::Value, ResponseError> {
    #[derive(Deserialize)]
    #[serde(tag = "status", rename_all = "snake_case")]
    enum Raw {
        Ok {
            #[serde(default)]
            result: serde_json::Value,
        },
        Error {
            error: ApiError,
        },
    }
    match serde_json::from_slice::<Raw>(line) {
        Ok(Raw::Ok { result }) => Ok(result),
        Ok(Raw::Error { error }) => Err(ResponseError::Api(error)),
        Err(e) => Err(ResponseError::Protocol(e.to_string())),
    }
}

/// Find `volume`'s status in a `volume_status` result: the status object itself, or one
/// level down (`{"type":"volume_status","status":{...}}`), or an element of a list one
/// level down whose `volume`/`name` is `volume`.
pub fn status_from_result(
    result: &serde_json::Value,
    volume: &str,
) -> Result<VolumeStatus, String> {
    let is_status = |v: &serde_json::Value| v.get("role").is_some();
    let names = |v: &serde_json::Value| {
        v.get("volume").and_then(|n| n.as_str()) == Some(volume)
            || v.get("name").and_then(|n| n.as_str()) == Some(volume)
    };
    let candidate = if is_status(result) {
        Some(result)
    } else {
        result.as_object().and_then(|map| {
            map.values().find(|v| is_status(v)).or_else(|| {
                map.values()
                    .filter_map(|v| v.as_array())
                    .flatten()
                    .find(|v| is_status(v) && names(v))
            })
        })
    };
    let Some(candidate) = candidate else {
        return Err(format!(
            "volume_status result has no volume status: {result}"
        ));
    };
    serde_json::from_value(candidate.clone())
        .map_err(|e| format!("volume_status result not understood ({e}): {candidate}"))
}

/// Whether an error means "this tandemd does not know request `request`".
pub fn is_unknown_request(error: &ApiError, request: &str) -> bool {
    error.kind == ErrorKind::BadRequest
        && error.message.contains("unknown variant")
        && error.message.contains(&format!("`{request}`"))
}

impl Control for ControlClient {
    fn status(&mut self, volume: &str) -> Result<StatusAnswer, ControlError> {
        let request = ReplicationRequest::VolumeStatus {
            name: volume.to_string(),
        };
        match self.call(&request) {
            Ok(result) => status_from_result(&result, volume)
                .map(StatusAnswer::Replicated)
                .map_err(|message| ControlError::Protocol {
                    path: self.path.clone(),
                    message,
                }),
            Err(ControlError::Api(e)) if e.kind == ErrorKind::NotFound => {
                Ok(StatusAnswer::NotFound(e.message))
            }
            Err(ControlError::Api(e)) if is_unknown_request(&e, "volume_status") => {
                // An older tandemd: no replication, no roles. Make sure the volume exists.
                match self.call(&Request::VolumeShow {
                    name: volume.to_string(),
                }) {
                    Ok(_) => Ok(StatusAnswer::NoRoles),
                    Err(ControlError::Api(e)) if e.kind == ErrorKind::NotFound => {
                        Ok(StatusAnswer::NotFound(e.message))
                    }
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }

    fn promote(&mut self, volume: &str) -> Result<(), ControlError> {
        self.call(&ReplicationRequest::VolumePromote {
            name: volume.to_string(),
        })
        .map(drop)
    }

    fn demote(&mut self, volume: &str) -> Result<(), ControlError> {
        self.call(&ReplicationRequest::VolumeDemote {
            name: volume.to_string(),
        })
        .map(drop)
    }

    fn allow_two_primaries(&mut self, volume: &str, allow: bool) -> Result<(), ControlError> {
        self.call(&ReplicationRequest::VolumeAllowTwoPrimaries {
            name: volume.to_string(),
            allow,
        })
        .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_follow_the_engine_contract() {
        let cases = [
            (
                ReplicationRequest::VolumeStatus { name: "v".into() },
                r#"{"request":"volume_status","name":"v"}"#,
            ),
            (
                ReplicationRequest::VolumePromote { name: "v".into() },
                r#"{"request":"volume_promote","name":"v"}"#,
            ),
            (
                ReplicationRequest::VolumeDemote { name: "v".into() },
                r#"{"request":"volume_demote","name":"v"}"#,
            ),
            (
                ReplicationRequest::VolumeAllowTwoPrimaries {
                    name: "v".into(),
                    allow: true,
                },
                r#"{"request":"volume_allow_two_primaries","name":"v","allow":true}"#,
            ),
        ];
        for (request, wire) in cases {
            assert_eq!(serde_json::to_string(&request).unwrap(), wire);
        }
    }

    #[test]
    fn status_is_found_bare_or_wrapped_and_tolerates_new_states() {
        let status = serde_json::json!({
            "name": "vm-1-disk-0", "role": "Secondary", "disk_state": "UpToDate",
            "peers": [{"node": "hv2", "connection": "Connected", "role": "Primary",
                       "disk_state": "UpToDate", "replication": "Established"}],
            "quorum": true, "allow_two_primaries": false, "protocol": "C",
            "promoted_explicitly": false, "size_bytes": 4096
        });
        let bare = status_from_result(&status, "vm-1-disk-0").unwrap();
        let wrapped = status_from_result(
            &serde_json::json!({"type": "volume_status", "status": status}),
            "vm-1-disk-0",
        )
        .unwrap();
        assert_eq!(bare, wrapped);
        let listed = status_from_result(
            &serde_json::json!({"type": "volume_statuses", "volumes": [
                {"volume": "other", "role": "Primary", "disk_state": "UpToDate", "quorum": true,
                 "allow_two_primaries": false, "protocol": "C"},
                status
            ]}),
            "vm-1-disk-0",
        )
        .unwrap();
        assert_eq!(bare, listed);
        assert_eq!(bare.peers[0].role, Role::Primary);
        let newer = serde_json::json!({
            "name": "v", "role": "Primary", "disk_state": "Negotiating", "quorum": false,
            "allow_two_primaries": false, "protocol": "A"
        });
        let newer = status_from_result(&newer, "v").unwrap();
        assert_eq!(newer.disk_state, DiskState::Unknown);
        assert!(!newer.promoted_explicitly);
        assert!(status_from_result(&serde_json::json!({"type": "deleted"}), "v").is_err());
    }

    #[test]
    fn the_engines_replica_status_is_understood() {
        // ReplicaStatus as documented for the engine (replication/README.md), plus the daemon's fields.
        let engine = serde_json::json!({
            "volume": "vm-100-disk-0", "node": "hv1", "role": "Secondary",
            "disk_state": "Outdated", "protocol": "C", "quorum": true, "quorum_reason": "",
            "io_suspended": false, "allow_two_primaries": false, "size_bytes": 2147483648u64,
            "current_uuid": "5A3F", "last_verify": null,
            "peers": [{"node": "hv2", "diskless": false, "connection": "Connected",
                       "role": "Primary", "disk_state": "UpToDate", "replication": "Established",
                       "out_of_sync_bytes": 0, "resync": null, "split_brain": null},
                      {"node": "witness", "diskless": true, "connection": "Connected",
                       "role": "Secondary", "disk_state": "Diskless", "replication": "Off",
                       "out_of_sync_bytes": 0, "resync": null, "split_brain": null}],
            "promoted_explicitly": false, "open_writers": 0
        });
        let status = status_from_result(&engine, "vm-100-disk-0").unwrap();
        assert_eq!(status.name, "vm-100-disk-0");
        assert_eq!(status.disk_state, DiskState::Outdated);
        assert_eq!(status.peers[0].role, Role::Primary);
        assert_eq!(status.peers[1].disk_state, DiskState::Diskless);
        assert_eq!(status.protocol, "C");
    }

    #[test]
    fn only_an_unknown_variant_error_means_no_roles() {
        let old = ApiError::new(
            ErrorKind::BadRequest,
            "request not understood: unknown variant `volume_status`, expected one of `node_info`, `pool_list` at line 1 column 26",
        );
        assert!(is_unknown_request(&old, "volume_status"));
        assert!(!is_unknown_request(&old, "volume_promote"));
        let other = ApiError::new(ErrorKind::BadRequest, "invalid volume name");
        assert!(!is_unknown_request(&other, "volume_status"));
        let wrong_kind = ApiError::new(ErrorKind::Internal, "unknown variant `volume_status`");
        assert!(!is_unknown_request(&wrong_kind, "volume_status"));
    }

    #[test]
    fn a_silent_daemon_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("tandemd.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let held = std::thread::spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            std::thread::sleep(Duration::from_millis(800));
            drop(conn);
        });
        let mut client = ControlClient::connect(&socket, Duration::from_millis(200)).unwrap();
        let started = std::time::Instant::now();
        let err = client.status("v").unwrap_err();
        assert!(matches!(err, ControlError::Timeout { .. }), "{err:?}");
        assert!(started.elapsed() < Duration::from_millis(700));
        held.join().unwrap();
    }

    #[test]
    fn a_late_answer_is_never_taken_for_the_next_requests() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("tandemd.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let server = std::thread::spawn(move || {
            // First connection: answers the first request too late.
            let (first, _) = listener.accept().unwrap();
            let mut lines = BufReader::new(first.try_clone().unwrap()).lines();
            lines.next().unwrap().unwrap();
            std::thread::sleep(Duration::from_millis(400));
            let mut w = first;
            let late = r#"{"status":"ok","result":{"type":"status","status":{"volume":"late","role":"Primary","disk_state":"UpToDate","quorum":true,"allow_two_primaries":false,"protocol":"C"}}}"#;
            let _ = writeln!(w, "{late}");
            // The client reconnects for its next request: answer that one properly.
            let (second, _) = listener.accept().unwrap();
            let mut lines = BufReader::new(second.try_clone().unwrap()).lines();
            let request = lines.next().unwrap().unwrap();
            assert!(request.contains("volume_demote"), "{request}");
            let mut w = second;
            writeln!(w, r#"{{"status":"ok","result":{{"type":"done"}}}}"#).unwrap();
        });
        let mut client = ControlClient::connect(&socket, Duration::from_millis(150)).unwrap();
        assert!(matches!(
            client.status("v"),
            Err(ControlError::Timeout { .. })
        ));
        std::thread::sleep(Duration::from_millis(400));
        client.demote("v").unwrap();
        server.join().unwrap();
    }
}
