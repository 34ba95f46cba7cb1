//! The one client of `<run_dir>/tandemd.sock`: blocking, one exchange at a time, with an
//! optional timeout on every exchange (a libvirt hook or an HA agent must never hang on a
//! stuck daemon; `tandem` waits as long as the operation takes).
//!
//! After an exchange fails midway (timeout, I/O, garbled answer) a late answer may still
//! arrive on that connection, so the next call reconnects instead of reading it.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::events::Event;
use crate::request::Request;
use crate::response::{ApiError, Reply, Response};
use crate::status::VolumeStatus;
use crate::MAX_LINE;

/// A failed exchange with tandemd.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach tandemd at {} (is it running?)", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no answer from tandemd at {} within {} s", path.display(), timeout.as_secs_f32())]
    Timeout { path: PathBuf, timeout: Duration },
    #[error("lost connection to tandemd at {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("tandemd at {} sent an answer this client does not understand: {message}", path.display())]
    Protocol { path: PathBuf, message: String },
    /// The daemon refused or failed the request; its message is for the operator.
    #[error(transparent)]
    Api(#[from] ApiError),
}

/// A blocking client of the control API.
pub struct Client {
    path: PathBuf,
    timeout: Option<Duration>,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// The last exchange failed midway: reconnect before the next one.
    broken: bool,
}

impl Client {
    /// Connect to the daemon's socket; every exchange then takes at most `timeout`
    /// (`None`: wait as long as the daemon works).
    pub fn connect(path: &Path, timeout: Option<Duration>) -> Result<Client, ClientError> {
        let (reader, writer) = open(path, timeout)?;
        Ok(Client {
            path: path.to_path_buf(),
            timeout,
            reader,
            writer,
            broken: false,
        })
    }

    /// Send one request and wait for its answer. A refusal is [`ClientError::Api`].
    pub fn call(&mut self, request: &Request) -> Result<Reply, ClientError> {
        if self.broken {
            (self.reader, self.writer) = open(&self.path, self.timeout)?;
            self.broken = false;
        }
        let result = self.exchange(request);
        if let Err(e) = &result {
            self.broken = !matches!(e, ClientError::Api(_));
        }
        result
    }

    /// `volume_status`: the volume's replication status on this node.
    pub fn status(&mut self, name: &str) -> Result<VolumeStatus, ClientError> {
        let request = Request::VolumeStatus {
            name: name.to_string(),
        };
        match self.call(&request)? {
            Reply::Status { status } => Ok(status),
            other => Err(self.unexpected("volume_status", &other)),
        }
    }

    /// A reply of the wrong type for `request`.
    fn unexpected(&self, request: &str, reply: &Reply) -> ClientError {
        ClientError::Protocol {
            path: self.path.clone(),
            message: format!("unexpected answer to {request}: {reply:?}"),
        }
    }

    fn exchange(&mut self, request: &Request) -> Result<Reply, ClientError> {
        let mut line = serde_json::to_vec(request).map_err(|e| self.protocol(e.to_string()))?;
        line.push(b'\n');
        self.writer.write_all(&line).map_err(|e| self.io_error(e))?;
        let mut answer = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut answer)
            .map_err(|e| self.io_error(e))?;
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
            Err(e) => Err(self.protocol(e.to_string())),
        }
    }

    fn protocol(&self, message: String) -> ClientError {
        ClientError::Protocol {
            path: self.path.clone(),
            message,
        }
    }

    fn io_error(&self, source: std::io::Error) -> ClientError {
        match (source.kind(), self.timeout) {
            (std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut, Some(timeout)) => {
                ClientError::Timeout {
                    path: self.path.clone(),
                    timeout,
                }
            }
            _ => ClientError::Io {
                path: self.path.clone(),
                source,
            },
        }
    }
}

/// An open `events` stream: blocking reads of one [`Event`] per line, no timeout (the
/// daemon sends when something changes). Ends when the daemon closes the connection.
pub struct EventStream {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    /// Kept open: closing it would end the stream.
    _writer: UnixStream,
}

impl EventStream {
    /// Connect to the daemon's socket and ask for its events (`now`: only the current
    /// state, then the stream ends).
    pub fn open(path: &Path, now: bool) -> Result<EventStream, ClientError> {
        let (reader, mut writer) = open(path, None)?;
        let mut line =
            serde_json::to_vec(&Request::Events { now }).map_err(|e| ClientError::Protocol {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        line.push(b'\n');
        writer.write_all(&line).map_err(|source| ClientError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(EventStream {
            path: path.to_path_buf(),
            reader,
            _writer: writer,
        })
    }

    /// The next event; `None` when the daemon closed the stream.
    pub fn next_event(&mut self) -> Result<Option<Event>, ClientError> {
        let mut line = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
            .map_err(|source| ClientError::Io {
                path: self.path.clone(),
                source,
            })?;
        if n == 0 {
            return Ok(None);
        }
        let protocol = |message: String| ClientError::Protocol {
            path: self.path.clone(),
            message,
        };
        if line.last() != Some(&b'\n') {
            return Err(protocol("event line too long or cut off".into()));
        }
        match serde_json::from_slice::<Response>(&line) {
            Ok(Response::Ok {
                result: Reply::Event { event },
            }) => Ok(Some(event)),
            Ok(Response::Ok { result }) => Err(protocol(format!("unexpected answer: {result:?}"))),
            Ok(Response::Error { error }) => Err(ClientError::Api(error)),
            Err(e) => Err(protocol(e.to_string())),
        }
    }
}

/// Connect and arm the timeouts: a buffered reader and a writer on one stream.
fn open(
    path: &Path,
    timeout: Option<Duration>,
) -> Result<(BufReader<UnixStream>, UnixStream), ClientError> {
    let connect_err = |source| ClientError::Connect {
        path: path.to_path_buf(),
        source,
    };
    let stream = UnixStream::connect(path).map_err(connect_err)?;
    stream
        .set_read_timeout(timeout)
        .and_then(|()| stream.set_write_timeout(timeout))
        .map_err(connect_err)?;
    let writer = stream.try_clone().map_err(connect_err)?;
    Ok((BufReader::new(stream), writer))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    const STATUS: &str = r#"{"status":"ok","result":{"type":"status","status":{"volume":"v","node":"hv1","role":"Primary","disk_state":"UpToDate","protocol":"C","quorum":true,"quorum_reason":"","io_suspended":false,"allow_two_primaries":false,"size_bytes":4096,"current_uuid":"1","peers":[],"last_verify":null,"promoted_explicitly":false,"open_writers":0}}}"#;

    fn listen() -> (tempfile::TempDir, PathBuf, UnixListener) {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("tandemd.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        (dir, socket, listener)
    }

    /// A dummy daemon's side of the next connection: its request lines and its writer.
    fn accept(listener: &UnixListener) -> (std::io::Lines<BufReader<UnixStream>>, UnixStream) {
        let (conn, _) = listener.accept().unwrap();
        (BufReader::new(conn.try_clone().unwrap()).lines(), conn)
    }

    #[test]
    fn a_status_and_a_refusal_over_a_real_socket() {
        let (_dir, socket, listener) = listen();
        let server = std::thread::spawn(move || {
            let (mut lines, mut w) = accept(&listener);
            let first = lines.next().unwrap().unwrap();
            assert_eq!(first, r#"{"request":"volume_status","name":"v"}"#);
            writeln!(w, "{STATUS}").unwrap();
            lines.next().unwrap().unwrap();
            let refusal =
                r#"{"status":"error","error":{"kind":"refused","message":"v is Primary on hv2"}}"#;
            writeln!(w, "{refusal}").unwrap();
        });
        let mut client = Client::connect(&socket, Some(Duration::from_secs(5))).unwrap();
        let status = client.status("v").unwrap();
        assert_eq!(status.replica.role, crate::Role::Primary);
        let err = client
            .call(&Request::VolumePromote { name: "v".into() })
            .unwrap_err();
        assert_eq!(err.to_string(), "v is Primary on hv2");
        server.join().unwrap();
    }

    #[test]
    fn a_silent_daemon_times_out() {
        let (_dir, socket, listener) = listen();
        let held = std::thread::spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            std::thread::sleep(Duration::from_millis(800));
            drop(conn);
        });
        let mut client = Client::connect(&socket, Some(Duration::from_millis(200))).unwrap();
        let started = std::time::Instant::now();
        let err = client.status("v").unwrap_err();
        assert!(matches!(err, ClientError::Timeout { .. }), "{err:?}");
        assert!(started.elapsed() < Duration::from_millis(700));
        held.join().unwrap();
    }

    #[test]
    fn a_late_answer_is_never_taken_for_the_next_requests() {
        let (_dir, socket, listener) = listen();
        let server = std::thread::spawn(move || {
            // First connection: answers the first request too late.
            let (mut lines, mut w) = accept(&listener);
            lines.next().unwrap().unwrap();
            std::thread::sleep(Duration::from_millis(400));
            let _ = writeln!(w, "{STATUS}");
            // The client reconnects for its next request: answer that one properly.
            let (mut lines, mut w) = accept(&listener);
            let request = lines.next().unwrap().unwrap();
            assert!(request.contains("volume_demote"), "{request}");
            writeln!(w, "{}", STATUS.replace("Primary", "Secondary")).unwrap();
        });
        let mut client = Client::connect(&socket, Some(Duration::from_millis(150))).unwrap();
        assert!(matches!(
            client.status("v"),
            Err(ClientError::Timeout { .. })
        ));
        std::thread::sleep(Duration::from_millis(400));
        let demote = Request::VolumeDemote {
            name: "v".into(),
            force: false,
        };
        assert!(matches!(
            client.call(&demote).unwrap(),
            Reply::Status { status } if status.replica.role == crate::Role::Secondary
        ));
        server.join().unwrap();
    }
}
