//! The agent-to-agent protocol on the management network (TCP, `<control IP>:<port>`,
//! default port 7701): a connection first runs the shared-secret challenge-response
//! (`replication::auth::authenticate`, the dialer is the initiator), then carries
//! newline-delimited JSON [`Message`]s, each answered by one message.
//!
//! Agents dial each other and exchange [`Message::Heartbeat`] every heartbeat interval
//! (the answer is the other side's heartbeat, so one connection proves both directions);
//! a differing registry digest makes the dialer push [`Message::Registry`]. The CLI uses
//! the same port for `manage`, `unmanage`, `status` and `drill` (one request per
//! connection).

use std::time::Duration;

use replication::auth::{self, AuthRole, Secret};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::registry::{ManagedVm, Registry};
use crate::status::AgentStatus;

/// Longest accepted message line (a registry with domain XMLs fits easily).
pub const MAX_MESSAGE: usize = 16 << 20;

/// "I am alive": the managed VMs running on the sender, the ones it could start (eligible),
/// is starting and sees due for a failover, and its registry digest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub node: String,
    pub running: Vec<String>,
    pub eligible: Vec<String>,
    /// Managed VMs the sender is starting right now (its peers wait for the outcome).
    #[serde(default)]
    pub starting: Vec<String>,
    /// Managed VMs whose failover is due at the sender: it saw their host dead on both
    /// paths (with `eligible`, whether it could start them).
    #[serde(default)]
    pub due: Vec<String>,
    pub registry_digest: String,
    /// The sender's decision loop has run (its `running` list is meaningful).
    #[serde(default)]
    pub ready: bool,
}

/// One message between agents (or from the CLI).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    /// "I am alive" (see [`Heartbeat`]).
    Heartbeat(Heartbeat),
    /// The sender's whole registry (merged by the receiver).
    Registry { node: String, registry: Registry },
    /// Store (or, with `removed`, drop) one managed VM.
    Manage { vm: ManagedVm },
    /// Ask for the receiver's status.
    StatusQuery,
    /// The receiver's status.
    Status { status: Box<AgentStatus> },
    /// A request was done.
    Ok,
    /// A request failed.
    Error { message: String },
}

/// Errors of a peer exchange.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connecting to {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("connecting to {addr} timed out")]
    ConnectTimeout { addr: String },
    #[error("authenticating with {addr}")]
    Auth {
        addr: String,
        #[source]
        source: auth::AuthError,
    },
    #[error("talking to {addr}")]
    Io {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{addr} sent no answer within {} ms", timeout.as_millis())]
    Timeout { addr: String, timeout: Duration },
    #[error("{addr} closed the connection")]
    Closed { addr: String },
    #[error("{addr} sent a message this agent does not understand: {message}")]
    Protocol { addr: String, message: String },
}

/// An authenticated connection speaking JSON lines.
pub struct Conn<S> {
    reader: BufReader<tokio::io::ReadHalf<S>>,
    writer: tokio::io::WriteHalf<S>,
    pub addr: String,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    /// Authenticate `stream` as `role` and wrap it.
    pub async fn establish(
        mut stream: S,
        secret: &Secret,
        role: AuthRole,
        addr: String,
        timeout: Duration,
    ) -> Result<Conn<S>, WireError> {
        auth::authenticate(&mut stream, secret, role, &addr, timeout)
            .await
            .map_err(|source| WireError::Auth {
                addr: addr.clone(),
                source,
            })?;
        let (r, w) = tokio::io::split(stream);
        Ok(Conn {
            reader: BufReader::new(r),
            writer: w,
            addr,
        })
    }

    pub async fn send(&mut self, message: &Message) -> Result<(), WireError> {
        let mut line = serde_json::to_vec(message).map_err(|e| WireError::Protocol {
            addr: self.addr.clone(),
            message: e.to_string(),
        })?;
        line.push(b'\n');
        self.writer
            .write_all(&line)
            .await
            .map_err(|source| WireError::Io {
                addr: self.addr.clone(),
                source,
            })
    }

    /// The next message (None: the peer closed cleanly between messages).
    pub async fn recv(&mut self) -> Result<Option<Message>, WireError> {
        let mut line = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_MESSAGE as u64 + 1)
            .read_until(b'\n', &mut line)
            .await
            .map_err(|source| WireError::Io {
                addr: self.addr.clone(),
                source,
            })?;
        if n == 0 {
            return Ok(None);
        }
        if line.last() != Some(&b'\n') {
            return Err(WireError::Protocol {
                addr: self.addr.clone(),
                message: format!("message longer than {MAX_MESSAGE} bytes or cut short"),
            });
        }
        serde_json::from_slice(&line)
            .map(Some)
            .map_err(|e| WireError::Protocol {
                addr: self.addr.clone(),
                message: e.to_string(),
            })
    }

    /// Send `message` and wait (up to `timeout`) for the answer.
    pub async fn request(
        &mut self,
        message: &Message,
        timeout: Duration,
    ) -> Result<Message, WireError> {
        self.send(message).await?;
        match tokio::time::timeout(timeout, self.recv()).await {
            Ok(Ok(Some(m))) => Ok(m),
            Ok(Ok(None)) => Err(WireError::Closed {
                addr: self.addr.clone(),
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(WireError::Timeout {
                addr: self.addr.clone(),
                timeout,
            }),
        }
    }
}

/// Dial `addr` and authenticate, all within `timeout`.
pub async fn dial(
    addr: std::net::SocketAddr,
    secret: &Secret,
    timeout: Duration,
) -> Result<Conn<TcpStream>, WireError> {
    let name = addr.to_string();
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(source)) => return Err(WireError::Connect { addr: name, source }),
        Err(_) => return Err(WireError::ConnectTimeout { addr: name }),
    };
    let _ = stream.set_nodelay(true);
    Conn::establish(stream, secret, AuthRole::Initiator, name, timeout).await
}

/// One request on a fresh connection (what the CLI does).
pub async fn one_request(
    addr: std::net::SocketAddr,
    secret: &Secret,
    message: &Message,
    timeout: Duration,
) -> Result<Message, WireError> {
    let mut conn = dial(addr, secret, timeout).await?;
    conn.request(message, timeout).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_heartbeat_from_an_agent_without_the_starting_list_still_parses() {
        let older = r#"{"type":"heartbeat","node":"hv1","running":["vm1"],"eligible":[],"registry_digest":"00","ready":true}"#;
        let Message::Heartbeat(hb) = serde_json::from_str(older).unwrap() else {
            panic!("not a heartbeat");
        };
        assert_eq!(hb.running, ["vm1"]);
        assert!(hb.starting.is_empty() && hb.due.is_empty());
    }

    #[tokio::test]
    async fn authenticated_exchange_and_wrong_secret() {
        let secret = Secret::new(b"s3cret".to_vec()).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server_secret = secret.clone();
        let server = tokio::spawn(async move {
            for _ in 0..2 {
                let (s, _) = listener.accept().await.unwrap();
                let Ok(mut c) = Conn::establish(
                    s,
                    &server_secret,
                    AuthRole::Acceptor,
                    "client".into(),
                    Duration::from_secs(2),
                )
                .await
                else {
                    continue;
                };
                while let Ok(Some(m)) = c.recv().await {
                    let answer = match m {
                        Message::StatusQuery => Message::Error {
                            message: "no status".into(),
                        },
                        _ => Message::Ok,
                    };
                    c.send(&answer).await.unwrap();
                }
            }
        });
        let mut c = dial(addr, &secret, Duration::from_secs(2)).await.unwrap();
        let hb = Message::Heartbeat(Heartbeat {
            node: "hv1".into(),
            running: vec!["vm1".into()],
            eligible: vec![],
            starting: vec![],
            due: vec![],
            registry_digest: "00".into(),
            ready: true,
        });
        assert_eq!(
            c.request(&hb, Duration::from_secs(2)).await.unwrap(),
            Message::Ok
        );
        assert_eq!(
            c.request(&Message::StatusQuery, Duration::from_secs(2))
                .await
                .unwrap(),
            Message::Error {
                message: "no status".into()
            }
        );
        drop(c);
        let wrong = Secret::new(b"other".to_vec()).unwrap();
        assert!(matches!(
            dial(addr, &wrong, Duration::from_secs(2)).await,
            Err(WireError::Auth { .. })
        ));
        server.await.unwrap();
    }
}
