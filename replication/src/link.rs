//! The peer link: one authenticated, version-negotiated connection to a peer, carrying
//! typed [`Message`]s, with keepalive and dead-peer detection.
//!
//! ```text
//!  initiator (connects)                                   acceptor (listens)
//!    |  TCP connect, TCP_NODELAY on both ends                  |
//!    |==== auth: challenge-response, see crate::auth ==========|  fails: WrongProof/Timeout
//!    | -- Hello{min..max, node, volume, size, protocol} ------> |  acceptor looks up the
//!    | <------------------------------------------ Hello{...} - |  volume named in the Hello
//!    |   both: version = highest in both ranges, else Error{VERSION} + fatal
//!    |   both: same volume and protocol, else Error{CONFIG_MISMATCH} + fatal
//!    |==== link up: PeerLink handed to the caller ==============|
//!    |   (caller may run its own exchange first: UUIDs, bitmaps, as Extension frames)
//!    | <===== data path: Write/Trim/Barrier/Flush and acks ====> |
//!    | -- Ping every ping_interval; any frame proves liveness -> |
//!    |   nothing received for dead_after: link down, Unresponsive
//! ```
//!
//! Once up, a link is a reader task and a writer task. Senders enqueue encoded frames
//! through a [`LinkSender`]; data frames first take room from a byte budget
//! ([`LinkConfig::send_budget`]) that the writer gives back once the bytes are on the
//! socket, which is how a slow peer pushes back on the writer of a volume. The writer
//! drains whatever is queued and writes it in one `writev` (headers and small bodies are
//! copied together; write data is sent from its own `Bytes`, uncopied: `link/gather.rs`).
//! Acknowledgements are frames like any other, so under load a batch of them leaves in one
//! write.
//! The reader decodes frames, answers pings, and hands everything else to the
//! [`LinkReceiver`], again under a byte budget so a fast peer cannot grow our memory.
//!
//! A link goes down once, with one [`LinkDown`] reason; both tasks stop, the socket is
//! closed, pending and future sends fail, and [`LinkReceiver::recv`] returns the messages
//! already received, then `None`. Errors before the link is up are [`LinkError`]s;
//! [`LinkError::should_reconnect`] tells a transient failure (retry with backoff) from a
//! fatal one (wrong secret, no common version, wrong volume or protocol: fix the config).
//!
//! Who connects: both nodes know each other's replication address, so both could dial.
//! The owner of the links should let exactly one side of each pair dial (for example the
//! node whose name sorts first) and the other accept, so a pair has one connection; an
//! acceptor routes an incoming connection to its volume by the name in the peer's Hello
//! (the `lookup` argument of [`PeerLink::accept`]).
//!
//! Timeouts (DRBD uses ping-int 10 s, ping-timeout 0.5 s and timeout 6 s; we want a failover
//! in under 10 s in total, so detection must take 2-3 s): pings every 500 ms, link declared
//! dead after 2 s without any frame, i.e. detection within 2-2.5 s. The handshake has 5 s
//! for authentication and 5 s for the Hello exchange.

mod gather;

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore, TryAcquireError};
use tokio::time::Instant;

use crate::auth::{self, AuthError, AuthRole, Secret};
use crate::wire::{
    self, error_code, negotiate_version, Frame, Hello, Message, ReplicationProtocol, WireError,
};
use gather::Gather;

/// Tunables of a peer link. Every default is a named function.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// Deadline for the authentication exchange.
    pub auth_timeout: Duration,
    /// Deadline for the Hello exchange.
    pub hello_timeout: Duration,
    /// How often a Ping is sent.
    pub ping_interval: Duration,
    /// The link is declared dead when nothing arrives for this long.
    pub dead_after: Duration,
    /// Bytes of data frames that may be queued for sending.
    pub send_budget: usize,
    /// Bytes of received frames that may wait for the consumer.
    pub recv_budget: usize,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            auth_timeout: auth::DEFAULT_AUTH_TIMEOUT,
            hello_timeout: default_hello_timeout(),
            ping_interval: default_ping_interval(),
            dead_after: default_dead_after(),
            send_budget: default_budget(),
            recv_budget: default_budget(),
        }
    }
}

/// Default deadline for the Hello exchange: 5 s.
pub fn default_hello_timeout() -> Duration {
    Duration::from_secs(5)
}
/// Default keepalive interval: 500 ms.
pub fn default_ping_interval() -> Duration {
    Duration::from_millis(500)
}
/// Default silence after which a peer is dead: 2 s.
pub fn default_dead_after() -> Duration {
    Duration::from_secs(2)
}
/// Default send and receive budgets: 64 MiB each (two maximal writes).
pub fn default_budget() -> usize {
    64 << 20
}

/// Why an up link went down. Recorded once; later causes are ignored.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LinkDown {
    #[error("the peer closed the connection")]
    PeerClosed,
    #[error("{op} on the peer connection failed")]
    Io {
        op: &'static str,
        #[source]
        source: Arc<io::Error>,
    },
    #[error("the peer sent an invalid frame")]
    Protocol(#[source] WireError),
    #[error("the peer reported error {code}: {message}")]
    PeerError { code: u16, message: String },
    #[error("the peer sent nothing for {0:?}")]
    Unresponsive(Duration),
    #[error("closed locally: {0}")]
    Closed(String),
}

impl LinkDown {
    /// True when reconnecting may succeed; false when the peer refused us for a reason an
    /// operator must fix (version or configuration mismatch).
    pub fn should_reconnect(&self) -> bool {
        !matches!(
            self,
            LinkDown::PeerError { code, .. }
                if matches!(*code, error_code::VERSION | error_code::CONFIG_MISMATCH)
        )
    }
}

/// Why a link could not be established.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("connecting to {addr} failed")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("accepting a peer connection failed")]
    Accept(#[source] io::Error),
    #[error("peer authentication failed")]
    Auth(#[from] AuthError),
    #[error("{op} during the Hello exchange failed")]
    HelloIo {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the Hello exchange did not finish within {0:?}")]
    HelloTimeout(Duration),
    #[error("the peer sent an invalid frame during the Hello exchange")]
    HelloProtocol(#[source] WireError),
    #[error("expected a Hello from the peer, got message type {0:#06x}")]
    UnexpectedMessage(u16),
    #[error(
        "no common protocol version: we speak {local_min}..={local_max}, \
         the peer speaks {peer_min}..={peer_max}; upgrade the older node"
    )]
    VersionMismatch {
        local_min: u16,
        local_max: u16,
        peer_min: u16,
        peer_max: u16,
    },
    #[error("the peer connected for volume {peer:?}, not {local:?}")]
    VolumeMismatch { local: String, peer: String },
    #[error("the peer asked for volume {0:?}, which this node does not replicate")]
    UnknownVolume(String),
    #[error("replication protocol differs: ours is {local}, the peer's is {peer}")]
    ProtocolMismatch {
        local: ReplicationProtocol,
        peer: ReplicationProtocol,
    },
    #[error("the peer refused the connection with error {code}: {message}")]
    PeerError { code: u16, message: String },
}

impl LinkError {
    /// True when retrying the connection later may succeed; false when an operator must
    /// fix something first (secret, versions, volume or protocol configuration).
    pub fn should_reconnect(&self) -> bool {
        match self {
            LinkError::Connect { .. }
            | LinkError::Accept(_)
            | LinkError::HelloIo { .. }
            | LinkError::HelloTimeout(_)
            | LinkError::HelloProtocol(_)
            | LinkError::UnexpectedMessage(_) => true,
            LinkError::Auth(e) => !e.is_rejection(),
            LinkError::PeerError { code, .. } => {
                !matches!(*code, error_code::VERSION | error_code::CONFIG_MISMATCH)
            }
            LinkError::VersionMismatch { .. }
            | LinkError::VolumeMismatch { .. }
            | LinkError::UnknownVolume(_)
            | LinkError::ProtocolMismatch { .. } => false,
        }
    }
}

struct Shared {
    peer: String,
    /// A graceful close (Error frame, then shutdown) is under way.
    closing: std::sync::atomic::AtomicBool,
    down: Mutex<Option<LinkDown>>,
    /// Set once `down` is: every frame sent checks it, without the lock.
    is_down: std::sync::atomic::AtomicBool,
    down_tx: watch::Sender<bool>,
    send_budget: Semaphore,
    send_budget_total: usize,
    recv_budget: Semaphore,
    recv_budget_total: usize,
    /// Bytes written to and read from the stream, and the last ping's round trip.
    sent_bytes: AtomicU64,
    received_bytes: AtomicU64,
    /// Microseconds; 0 until the first Pong.
    rtt_us: AtomicU64,
    in_flight: InFlight,
}

/// Bytes sent on a link and not yet acknowledged, by kind of traffic (DRBD's ap-in-flight
/// and rs-in-flight). The link only carries them: the data path and the resync source,
/// which know what an acknowledgement covers, add and subtract
/// ([`LinkSender::in_flight`], [`crate::stats::hold`]).
#[derive(Debug, Default)]
pub struct InFlight {
    /// Application requests (writes, trims, write-zeroes) the peer has not acknowledged
    /// as written.
    pub application: AtomicU64,
    /// Resync ranges the peer has not acknowledged.
    pub resync: AtomicU64,
}

/// A link's traffic and latency so far (for status and metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkFigures {
    pub sent_bytes: u64,
    pub received_bytes: u64,
    /// Round-trip time of the last Ping, in microseconds (none answered yet: `None`).
    pub rtt_us: Option<u64>,
    /// Less than a quarter of the send budget is free: senders wait, or soon will, for
    /// the peer to take what is queued (DRBD's congested).
    #[serde(default)]
    pub congested: bool,
    /// See [`InFlight::application`].
    #[serde(default)]
    pub app_in_flight_bytes: u64,
    /// See [`InFlight::resync`].
    #[serde(default)]
    pub resync_in_flight_bytes: u64,
}

impl Shared {
    fn set_down(&self, reason: LinkDown) {
        let mut down = self.down.lock().unwrap_or_else(|e| e.into_inner());
        if down.is_some() {
            return;
        }
        match &reason {
            LinkDown::Closed(_) => {
                tracing::info!(peer = %self.peer, reason = %reason, "peer link closed")
            }
            _ => {
                tracing::warn!(peer = %self.peer, reason = %reason, error = ?reason, "peer link down")
            }
        }
        *down = Some(reason);
        self.is_down.store(true, Ordering::Release);
        self.send_budget.close();
        self.recv_budget.close();
        self.down_tx.send_replace(true);
    }

    fn down_reason(&self) -> Option<LinkDown> {
        if !self.is_down.load(Ordering::Acquire) {
            return None;
        }
        self.down.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    async fn wait_down(&self) {
        let mut rx = self.down_tx.subscribe();
        let _ = rx.wait_for(|down| *down).await;
    }

    fn closed_reason(&self) -> LinkDown {
        self.down_reason()
            .unwrap_or_else(|| LinkDown::Closed("link shut down".into()))
    }
}

enum Outgoing {
    Frame { frame: Frame, budget: usize },
    Close(LinkDown),
}

/// The sending half of a link; cheap to clone.
#[derive(Clone)]
pub struct LinkSender {
    tx: mpsc::UnboundedSender<Outgoing>,
    shared: Arc<Shared>,
}

/// Room reserved in a link's send budget; sending through it cannot block.
pub struct SendPermit {
    sender: LinkSender,
    budget: usize,
}

impl SendPermit {
    /// The in-flight figures of the permit's link.
    pub fn in_flight(&self) -> &InFlight {
        &self.sender.shared.in_flight
    }

    /// Queue `msg` (encoded now) without waiting.
    pub fn send(mut self, msg: &Message) -> Result<(), LinkDown> {
        let budget = std::mem::take(&mut self.budget);
        self.sender.enqueue(msg.encode(), budget)
    }
}

impl Drop for SendPermit {
    fn drop(&mut self) {
        if self.budget > 0 {
            self.sender.shared.send_budget.add_permits(self.budget);
        }
    }
}

impl LinkSender {
    fn enqueue(&self, frame: Frame, budget: usize) -> Result<(), LinkDown> {
        if let Some(reason) = self.shared.down_reason() {
            self.shared.send_budget.add_permits(budget);
            return Err(reason);
        }
        self.tx
            .send(Outgoing::Frame { frame, budget })
            .map_err(|_| self.shared.closed_reason())
    }

    /// Reserve `bytes` of the send budget, waiting while the peer is slow. Fails when the
    /// link goes down.
    pub async fn reserve(&self, bytes: usize) -> Result<SendPermit, LinkDown> {
        let n = self.budget_for(bytes);
        match self.shared.send_budget.acquire_many(n).await {
            Ok(permit) => Ok(self.permit(permit, n)),
            Err(_) => Err(self.shared.closed_reason()),
        }
    }

    /// Reserve `bytes` of the send budget if they are free now: `Ok(None)` while the peer
    /// is slow (wait with [`Self::reserve`]), `Err` once the link is down.
    pub fn try_reserve(&self, bytes: usize) -> Result<Option<SendPermit>, LinkDown> {
        let n = self.budget_for(bytes);
        match self.shared.send_budget.try_acquire_many(n) {
            Ok(permit) => Ok(Some(self.permit(permit, n))),
            Err(TryAcquireError::NoPermits) => Ok(None),
            Err(TryAcquireError::Closed) => Err(self.shared.closed_reason()),
        }
    }

    /// The budget a frame of `bytes` takes: at least 1, at most the whole budget (a frame
    /// larger than the budget still goes out, alone).
    fn budget_for(&self, bytes: usize) -> u32 {
        let budget = bytes.clamp(1, self.shared.send_budget_total);
        u32::try_from(budget).unwrap_or(u32::MAX)
    }

    /// Own `n` units of budget taken from the semaphore (given back as the writer sends).
    fn permit(&self, permit: tokio::sync::SemaphorePermit<'_>, n: u32) -> SendPermit {
        permit.forget();
        SendPermit {
            sender: self.clone(),
            budget: n as usize,
        }
    }

    /// Send `msg` under the send budget (waits while the budget is used up).
    pub async fn send(&self, msg: &Message) -> Result<(), LinkDown> {
        let frame = msg.encode();
        let permit = self.reserve(frame.len()).await?;
        let budget = permit.budget;
        std::mem::forget(permit);
        self.enqueue(frame, budget)
    }

    /// Queue a small control frame (ack, barrier, flush, ping) outside the budget. Control
    /// frames are bounded by the data frames they answer or separate.
    pub fn send_control(&self, msg: &Message) -> Result<(), LinkDown> {
        self.enqueue(msg.encode(), 0)
    }

    /// Send an Error frame, then close the link once it (and everything queued before it)
    /// is written, or after one second at the latest.
    pub fn close_with_error(&self, code: u16, message: &str) {
        self.shared
            .closing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = self.send_control(&Message::Error {
            code,
            message: message.to_string(),
        });
        self.close_when_sent(LinkDown::Closed(format!("sent error {code}: {message}")));
    }

    /// Close the link once everything queued before is written (the peer reads it, then
    /// sees the connection end), or after one second at the latest.
    pub fn close_after_queued(&self, reason: &str) {
        self.shared
            .closing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.close_when_sent(LinkDown::Closed(reason.to_string()));
    }

    fn close_when_sent(&self, reason: LinkDown) {
        if self.tx.send(Outgoing::Close(reason.clone())).is_err() {
            self.shared.set_down(reason);
            return;
        }
        let shared = self.shared.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            shared.set_down(reason);
        });
    }

    /// Take the link down now.
    pub fn close(&self, reason: &str) {
        self.shared.set_down(LinkDown::Closed(reason.to_string()));
    }

    /// Why the link is down, or `None` while it is up.
    pub fn down_reason(&self) -> Option<LinkDown> {
        self.shared.down_reason()
    }

    /// The bytes in flight on this link, for its users to keep.
    pub fn in_flight(&self) -> &InFlight {
        &self.shared.in_flight
    }

    /// Bytes sent and received on this link, its last ping's round trip, whether it is
    /// congested and what is in flight. Atomic loads only.
    pub fn figures(&self) -> LinkFigures {
        let s = &self.shared;
        let rtt = s.rtt_us.load(Ordering::Relaxed);
        LinkFigures {
            sent_bytes: s.sent_bytes.load(Ordering::Relaxed),
            received_bytes: s.received_bytes.load(Ordering::Relaxed),
            rtt_us: (rtt > 0).then_some(rtt),
            congested: s.send_budget.available_permits() < s.send_budget_total / 4,
            app_in_flight_bytes: s.in_flight.application.load(Ordering::Relaxed),
            resync_in_flight_bytes: s.in_flight.resync.load(Ordering::Relaxed),
        }
    }

    /// True once the link is down.
    pub fn is_down(&self) -> bool {
        self.down_reason().is_some()
    }

    /// Wait until the link is down.
    pub async fn closed(&self) {
        self.shared.wait_down().await
    }

    /// The peer's address, as used in logs.
    pub fn peer_addr(&self) -> &str {
        &self.shared.peer
    }
}

/// The receiving half of a link.
///
/// A taken message's receive budget goes back to the reader once per burst, not once per
/// message (each return takes the semaphore's lock): when the queue runs dry, or once
/// [`RETURN_BUDGET_AT`] bytes are owed.
pub struct LinkReceiver {
    rx: mpsc::UnboundedReceiver<(Message, usize)>,
    shared: Arc<Shared>,
    /// Budget of messages already taken, not yet given back.
    owed: usize,
    /// Give the budget back once this much is owed: [`RETURN_BUDGET_AT`], or 0 (every
    /// message) when the budget is too small to leave a largest frame room beside it.
    return_at: usize,
}

/// Owed receive budget is given back at the latest once it reaches this many bytes, so a
/// consumer that never finds the queue empty still lets the reader go on.
const RETURN_BUDGET_AT: usize = 256 << 10;

impl LinkReceiver {
    /// The next message from the peer (Ping/Pong are handled inside the link). `None` once
    /// the link is down and every message received before has been returned.
    pub async fn recv(&mut self) -> Option<Message> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// [`Self::recv`] for a caller that polls several links in one task.
    pub fn poll_recv(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Message>> {
        match self.rx.poll_recv(cx) {
            std::task::Poll::Ready(Some((msg, cost))) => {
                self.owe(cost);
                std::task::Poll::Ready(Some(msg))
            }
            other => {
                self.give_back();
                other.map(|_| None)
            }
        }
    }

    /// The next message if one is already queued; never waits (to handle a burst of
    /// messages in one step).
    pub fn try_recv(&mut self) -> Option<Message> {
        match self.rx.try_recv() {
            Ok((msg, cost)) => {
                self.owe(cost);
                Some(msg)
            }
            Err(_) => {
                self.give_back();
                None
            }
        }
    }

    fn owe(&mut self, cost: usize) {
        self.owed += cost;
        if self.owed >= self.return_at {
            self.give_back();
        }
    }

    fn give_back(&mut self) {
        if self.owed > 0 {
            self.shared
                .recv_budget
                .add_permits(std::mem::take(&mut self.owed));
        }
    }

    /// Why the link is down, or `None` while it is up.
    pub fn down_reason(&self) -> Option<LinkDown> {
        self.shared.down_reason()
    }

    /// The bytes in flight on this link (see [`LinkSender::in_flight`]).
    pub fn in_flight(&self) -> &InFlight {
        &self.shared.in_flight
    }
}

impl Drop for LinkReceiver {
    /// Nobody reads the link any more: take it down so its tasks and socket go away.
    fn drop(&mut self) {
        // A graceful close in progress takes the link down itself, after its Error frame.
        if !self
            .shared
            .closing
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            self.shared
                .set_down(LinkDown::Closed("link receiver dropped".into()));
        }
    }
}

/// What the peer told us in its Hello, and what we agreed on.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// The peer's Hello.
    pub hello: Hello,
    /// The negotiated protocol version.
    pub version: u16,
    /// The peer's address (for logs and status).
    pub addr: String,
}

/// An established link to one peer.
pub struct PeerLink {
    /// Who the peer is.
    pub info: PeerInfo,
    /// Sending half.
    pub sender: LinkSender,
    /// Receiving half.
    pub receiver: LinkReceiver,
}

impl Hello {
    /// Our Hello for `volume`, speaking every protocol version this build supports.
    pub fn new(node: &str, volume: &str, volume_size: u64, protocol: ReplicationProtocol) -> Hello {
        Hello {
            min_version: wire::PROTOCOL_VERSION_MIN,
            max_version: wire::PROTOCOL_VERSION_MAX,
            node: node.to_string(),
            volume: volume.to_string(),
            volume_size,
            protocol,
        }
    }
}

impl PeerLink {
    /// Connect to `addr` once (TCP_NODELAY), authenticate and exchange Hellos as initiator.
    pub async fn connect(
        addr: SocketAddr,
        secret: &Secret,
        local: &Hello,
        cfg: &LinkConfig,
    ) -> Result<PeerLink, LinkError> {
        let stream = connect_tcp(addr).await?;
        PeerLink::establish_initiator(stream, secret, local, cfg, &addr.to_string()).await
    }

    /// Like [`PeerLink::connect`], retrying transient failures with exponential backoff
    /// (`backoff` doubling up to `max_backoff`) until a link is up or a fatal error occurs.
    /// Cancel by dropping the future.
    pub async fn connect_with_retry(
        addr: SocketAddr,
        secret: &Secret,
        local: &Hello,
        cfg: &LinkConfig,
        backoff: Duration,
        max_backoff: Duration,
    ) -> Result<PeerLink, LinkError> {
        let mut delay = backoff;
        loop {
            match PeerLink::connect(addr, secret, local, cfg).await {
                Ok(link) => return Ok(link),
                Err(e) if e.should_reconnect() => {
                    tracing::debug!(peer = %addr, error = %e, retry_in = ?delay, "peer connection failed, retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(max_backoff);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Accept one connection from `listener` and establish it as acceptor; `lookup` maps
    /// the volume the peer asks for to our Hello (or `None`: unknown volume).
    pub async fn accept<F>(
        listener: &TcpListener,
        secret: &Secret,
        cfg: &LinkConfig,
        lookup: F,
    ) -> Result<PeerLink, LinkError>
    where
        F: FnOnce(&Hello) -> Option<Hello>,
    {
        let (stream, addr) = listener.accept().await.map_err(LinkError::Accept)?;
        stream.set_nodelay(true).map_err(LinkError::Accept)?;
        PeerLink::establish_acceptor(stream, secret, cfg, &addr.to_string(), lookup).await
    }

    /// Authenticate and exchange Hellos on `stream` as the side that connected.
    pub async fn establish_initiator<S>(
        mut stream: S,
        secret: &Secret,
        local: &Hello,
        cfg: &LinkConfig,
        peer_addr: &str,
    ) -> Result<PeerLink, LinkError>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
        S: Unpin,
    {
        auth::authenticate(
            &mut stream,
            secret,
            AuthRole::Initiator,
            peer_addr,
            cfg.auth_timeout,
        )
        .await?;
        let mut buf = BytesMut::with_capacity(64 << 10);
        let hello = async {
            write_frame(&mut stream, &Message::Hello(local.clone())).await?;
            let peer = read_hello(&mut stream, &mut buf).await?;
            check_hello(local, &peer)
                .map(|version| (peer, version))
                .map_err(|e| (e, true))
        };
        let result = tokio::time::timeout(cfg.hello_timeout, hello).await;
        finish_hello(stream, buf, result, cfg, peer_addr).await
    }

    /// Authenticate and exchange Hellos on `stream` as the side that accepted. The peer's
    /// Hello comes first; `lookup` returns our Hello for the volume it names.
    pub async fn establish_acceptor<S, F>(
        mut stream: S,
        secret: &Secret,
        cfg: &LinkConfig,
        peer_addr: &str,
        lookup: F,
    ) -> Result<PeerLink, LinkError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
        F: FnOnce(&Hello) -> Option<Hello>,
    {
        auth::authenticate(
            &mut stream,
            secret,
            AuthRole::Acceptor,
            peer_addr,
            cfg.auth_timeout,
        )
        .await?;
        let mut buf = BytesMut::with_capacity(64 << 10);
        let hello = async {
            let peer = read_hello(&mut stream, &mut buf).await?;
            let Some(local) = lookup(&peer) else {
                return Err((LinkError::UnknownVolume(peer.volume.clone()), true));
            };
            write_frame(&mut stream, &Message::Hello(local.clone())).await?;
            check_hello(&local, &peer)
                .map(|version| (peer, version))
                .map_err(|e| (e, true))
        };
        let result = tokio::time::timeout(cfg.hello_timeout, hello).await;
        finish_hello(stream, buf, result, cfg, peer_addr).await
    }
}

type HelloResult = Result<Result<(Hello, u16), (LinkError, bool)>, tokio::time::error::Elapsed>;

async fn finish_hello<S>(
    mut stream: S,
    buf: BytesMut,
    result: HelloResult,
    cfg: &LinkConfig,
    peer_addr: &str,
) -> Result<PeerLink, LinkError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    match result {
        Err(_) => {
            let e = LinkError::HelloTimeout(cfg.hello_timeout);
            tracing::warn!(peer = peer_addr, error = %e, "peer handshake failed");
            Err(e)
        }
        Ok(Err((e, tell_peer))) => {
            tracing::warn!(peer = peer_addr, error = %e, "peer handshake failed");
            if tell_peer {
                let code = match &e {
                    LinkError::VersionMismatch { .. } => error_code::VERSION,
                    LinkError::VolumeMismatch { .. }
                    | LinkError::UnknownVolume(_)
                    | LinkError::ProtocolMismatch { .. } => error_code::CONFIG_MISMATCH,
                    _ => error_code::PROTOCOL,
                };
                let msg = Message::Error {
                    code,
                    message: e.to_string(),
                };
                let _ =
                    tokio::time::timeout(Duration::from_secs(1), write_frame(&mut stream, &msg))
                        .await;
            }
            Err(e)
        }
        Ok(Ok((hello, version))) => {
            tracing::info!(
                peer = peer_addr,
                node = %hello.node,
                volume = %hello.volume,
                version,
                "peer link up"
            );
            let info = PeerInfo {
                hello,
                version,
                addr: peer_addr.to_string(),
            };
            Ok(start(stream, buf, info, cfg))
        }
    }
}

async fn write_frame<S: AsyncWrite + Unpin>(
    stream: &mut S,
    msg: &Message,
) -> Result<(), (LinkError, bool)> {
    let io = |source| {
        (
            LinkError::HelloIo {
                op: "sending Hello",
                source,
            },
            false,
        )
    };
    stream.write_all(&msg.encode().to_vec()).await.map_err(io)?;
    stream.flush().await.map_err(io)
}

async fn read_hello<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
) -> Result<Hello, (LinkError, bool)> {
    loop {
        match wire::try_decode(buf) {
            Ok(Some(Message::Hello(h))) => return Ok(h),
            Ok(Some(Message::Error { code, message })) => {
                return Err((LinkError::PeerError { code, message }, false))
            }
            Ok(Some(other)) => return Err((LinkError::UnexpectedMessage(other.msg_type()), true)),
            Ok(None) => {}
            Err(e) => return Err((LinkError::HelloProtocol(e), true)),
        }
        let n = stream.read_buf(buf).await.map_err(|source| {
            (
                LinkError::HelloIo {
                    op: "reading Hello",
                    source,
                },
                false,
            )
        })?;
        if n == 0 {
            return Err((
                LinkError::HelloIo {
                    op: "reading Hello",
                    source: io::ErrorKind::UnexpectedEof.into(),
                },
                false,
            ));
        }
    }
}

fn check_hello(local: &Hello, peer: &Hello) -> Result<u16, LinkError> {
    let version = negotiate_version(
        local.min_version,
        local.max_version,
        peer.min_version,
        peer.max_version,
    )
    .ok_or(LinkError::VersionMismatch {
        local_min: local.min_version,
        local_max: local.max_version,
        peer_min: peer.min_version,
        peer_max: peer.max_version,
    })?;
    if local.volume != peer.volume {
        return Err(LinkError::VolumeMismatch {
            local: local.volume.clone(),
            peer: peer.volume.clone(),
        });
    }
    if local.protocol != peer.protocol {
        return Err(LinkError::ProtocolMismatch {
            local: local.protocol,
            peer: peer.protocol,
        });
    }
    Ok(version)
}

/// Start the reader and writer tasks on an established stream.
fn start<S>(stream: S, buf: BytesMut, info: PeerInfo, cfg: &LinkConfig) -> PeerLink
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (down_tx, _) = watch::channel(false);
    let send_total = cfg
        .send_budget
        .max(wire::MAX_FRAME_PAYLOAD + wire::HEADER_LEN);
    let recv_total = cfg
        .recv_budget
        .max(wire::MAX_FRAME_PAYLOAD + wire::HEADER_LEN);
    let shared = Arc::new(Shared {
        peer: info.addr.clone(),
        closing: std::sync::atomic::AtomicBool::new(false),
        down: Mutex::new(None),
        is_down: std::sync::atomic::AtomicBool::new(false),
        down_tx,
        send_budget: Semaphore::new(send_total),
        send_budget_total: send_total,
        recv_budget: Semaphore::new(recv_total),
        recv_budget_total: recv_total,
        sent_bytes: AtomicU64::new(0),
        received_bytes: AtomicU64::new(0),
        rtt_us: AtomicU64::new(0),
        in_flight: InFlight::default(),
    });
    // What is owed never keeps a largest frame waiting once the queue is empty.
    let largest = wire::MAX_FRAME_PAYLOAD + wire::HEADER_LEN;
    let return_at = if recv_total - largest >= RETURN_BUDGET_AT {
        RETURN_BUDGET_AT
    } else {
        0
    };
    let (out_tx, out_rx) = mpsc::unbounded_channel();
    let (in_tx, in_rx) = mpsc::unbounded_channel();
    let sender = LinkSender {
        tx: out_tx,
        shared: shared.clone(),
    };
    let (r, w) = split_stream(stream);
    tokio::spawn(writer_task(w, out_rx, shared.clone()));
    tokio::spawn(reader_task(
        r,
        buf,
        in_tx,
        sender.clone(),
        shared.clone(),
        cfg.ping_interval,
        cfg.dead_after,
    ));
    PeerLink {
        info,
        sender,
        receiver: LinkReceiver {
            rx: in_rx,
            shared,
            owed: 0,
            return_at,
        },
    }
}

type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// Split a stream into independently owned halves. A `TcpStream` is split without a lock
/// (`into_split`); any other stream goes through `tokio::io::split`, whose halves share a
/// lock that spins when both are busy.
fn split_stream<S>(stream: S) -> (BoxRead, BoxWrite)
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let mut slot = Some(stream);
    if let Some(tcp) = (&mut slot as &mut dyn std::any::Any).downcast_mut::<Option<TcpStream>>() {
        if let Some(tcp) = tcp.take() {
            let (r, w) = tcp.into_split();
            return (Box::new(r), Box::new(w));
        }
    }
    match slot {
        Some(stream) => {
            let (r, w) = tokio::io::split(stream);
            (Box::new(r), Box::new(w))
        }
        // `slot` is only emptied by the TcpStream branch, which returned.
        None => unreachable!("stream taken by the TcpStream branch"),
    }
}

async fn writer_task<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    shared: Arc<Shared>,
) {
    let mut batch = Gather::new();
    loop {
        let first = tokio::select! {
            item = rx.recv() => item,
            _ = shared.wait_down() => None,
        };
        let Some(first) = first else { break };
        let mut close = None;
        let mut returned = 0usize;
        let mut sent = 0usize;
        let send = async {
            let mut next = Some(first);
            while let Some(item) = next {
                match item {
                    Outgoing::Frame { frame, budget } => {
                        if batch.is_full() {
                            batch.write_to(&mut w).await?;
                        }
                        sent += frame.head.len() + frame.body.len();
                        batch.push(frame);
                        returned += budget;
                    }
                    Outgoing::Close(reason) => {
                        close = Some(reason);
                        break;
                    }
                }
                // No yield to gather more: a yielded task wakes an idle runtime worker
                // (a futex call, and one more for it to park again), while the tasks that
                // feed this queue (the volume task, `run_secondary`) send a whole burst in
                // one poll, usually before this task runs.
                next = rx.try_recv().ok();
            }
            batch.write_to(&mut w).await?;
            w.flush().await
        };
        let result = tokio::select! {
            r = send => Some(r),
            _ = shared.wait_down() => None,
        };
        match result {
            None => break,
            Some(Err(e)) => {
                shared.set_down(LinkDown::Io {
                    op: "sending",
                    source: Arc::new(e),
                });
                break;
            }
            Some(Ok(())) => {
                shared.send_budget.add_permits(returned);
                shared.sent_bytes.fetch_add(sent as u64, Ordering::Relaxed);
                if let Some(reason) = close {
                    let _ = w.shutdown().await;
                    shared.set_down(reason);
                    break;
                }
            }
        }
    }
}

async fn reader_task<R: AsyncRead + Unpin>(
    mut r: R,
    mut buf: BytesMut,
    in_tx: mpsc::UnboundedSender<(Message, usize)>,
    sender: LinkSender,
    shared: Arc<Shared>,
    ping_interval: Duration,
    dead_after: Duration,
) {
    let mut ticker = tokio::time::interval(ping_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    let mut token = 0u64;
    // The last Ping sent (its token and when), to time the Pong.
    let mut ping_sent: Option<(u64, Instant)> = None;
    loop {
        // Deliver every complete frame in the buffer.
        loop {
            let frame_len = buf.len();
            let msg = match wire::try_decode(&mut buf) {
                Ok(Some(msg)) => msg,
                Ok(None) => break,
                Err(e) => {
                    shared.set_down(LinkDown::Protocol(e));
                    return;
                }
            };
            let cost = frame_len - buf.len();
            match msg {
                Message::Ping { token } => {
                    if sender.send_control(&Message::Pong { token }).is_err() {
                        return;
                    }
                }
                Message::Pong { token } => {
                    if let Some((sent, at)) = ping_sent {
                        if sent == token {
                            let us = u64::try_from(at.elapsed().as_micros()).unwrap_or(u64::MAX);
                            shared.rtt_us.store(us.max(1), Ordering::Relaxed);
                        }
                    }
                }
                Message::Error { code, message } => {
                    shared.set_down(LinkDown::PeerError { code, message });
                    return;
                }
                msg => {
                    let cost = cost.min(shared.recv_budget_total);
                    let n = u32::try_from(cost).unwrap_or(u32::MAX);
                    let acquired = tokio::select! {
                        p = shared.recv_budget.acquire_many(n) => p.ok(),
                        _ = shared.wait_down() => None,
                    };
                    let Some(permit) = acquired else { return };
                    permit.forget();
                    if in_tx.send((msg, n as usize)).is_err() {
                        // Nobody listens any more; keep answering pings until closed.
                        shared.recv_budget.add_permits(n as usize);
                    }
                    // Time spent waiting for the consumer is not the peer's silence.
                    last_heard = Instant::now();
                }
            }
        }
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(64 << 10);
        }
        tokio::select! {
            read = r.read_buf(&mut buf) => match read {
                Ok(0) => {
                    shared.set_down(LinkDown::PeerClosed);
                    return;
                }
                Ok(n) => {
                    last_heard = Instant::now();
                    shared.received_bytes.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) => {
                    shared.set_down(LinkDown::Io { op: "receiving", source: Arc::new(e) });
                    return;
                }
            },
            _ = ticker.tick() => {
                let silent = last_heard.elapsed();
                if silent >= dead_after {
                    shared.set_down(LinkDown::Unresponsive(silent));
                    return;
                }
                token = token.wrapping_add(1);
                if sender.send_control(&Message::Ping { token }).is_err() {
                    return;
                }
                ping_sent = Some((token, Instant::now()));
            }
            _ = shared.wait_down() => return,
        }
    }
}

/// Open a TCP connection to a peer's replication address with TCP_NODELAY set.
pub async fn connect_tcp(addr: SocketAddr) -> Result<TcpStream, LinkError> {
    let connect_err = |source| LinkError::Connect { addr, source };
    let stream = TcpStream::connect(addr).await.map_err(connect_err)?;
    stream.set_nodelay(true).map_err(connect_err)?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use tokio::io::duplex;

    fn secret() -> Secret {
        Secret::new(b"s3cret".to_vec()).unwrap()
    }

    fn hello(node: &str) -> Hello {
        Hello::new(node, "vol", 1 << 20, ReplicationProtocol::C)
    }

    fn fast() -> LinkConfig {
        LinkConfig {
            ping_interval: Duration::from_millis(50),
            dead_after: Duration::from_millis(300),
            ..LinkConfig::default()
        }
    }

    /// Pings as often as [`fast`], but a peer is declared dead only after 10 s: for tests
    /// about something else than liveness, which a loaded machine would otherwise fail by
    /// starving a link of its pings for 300 ms.
    fn steady() -> LinkConfig {
        LinkConfig {
            dead_after: Duration::from_secs(10),
            ..fast()
        }
    }

    async fn pair_with(
        a: Hello,
        b: Hello,
    ) -> (Result<PeerLink, LinkError>, Result<PeerLink, LinkError>) {
        pair_with_config(a, b, steady()).await
    }

    async fn pair_with_config(
        a: Hello,
        b: Hello,
        cfg: LinkConfig,
    ) -> (Result<PeerLink, LinkError>, Result<PeerLink, LinkError>) {
        let (x, y) = duplex(1 << 20);
        let s = secret();
        tokio::join!(
            PeerLink::establish_initiator(x, &s, &a, &cfg, "b"),
            PeerLink::establish_acceptor(y, &s, &cfg, "a", |_| Some(b)),
        )
    }

    #[tokio::test]
    async fn a_link_carries_messages_both_ways() {
        let (a, b) = pair_with(hello("a"), hello("b")).await;
        let (mut a, mut b) = (a.unwrap(), b.unwrap());
        assert_eq!(a.info.hello.node, "b");
        assert_eq!(b.info.hello.node, "a");
        assert_eq!(a.info.version, wire::PROTOCOL_VERSION_MAX);
        let data = Bytes::from(vec![5u8; 1 << 20]);
        for seq in 0..20 {
            a.sender
                .send(&Message::Write(wire::WriteRequest {
                    seq,
                    epoch: 0,
                    offset: 0,
                    fua: false,
                    ack_on_receive: false,
                    data: data.clone(),
                }))
                .await
                .unwrap();
        }
        for seq in 0..20 {
            match b.receiver.recv().await.unwrap() {
                Message::Write(w) => {
                    assert_eq!(w.seq, seq);
                    assert_eq!(w.data, data);
                }
                other => panic!("{other:?}"),
            }
        }
        b.sender.send_control(&Message::FlushAck { id: 3 }).unwrap();
        assert_eq!(
            a.receiver.recv().await.unwrap(),
            Message::FlushAck { id: 3 }
        );
    }

    #[tokio::test]
    async fn an_idle_link_stays_up_through_pings() {
        let (a, b) = pair_with_config(hello("a"), hello("b"), fast()).await;
        let (a, b) = (a.unwrap(), b.unwrap());
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert!(a.sender.down_reason().is_none());
        assert!(b.sender.down_reason().is_none());
    }

    #[tokio::test]
    async fn a_link_counts_its_bytes_and_times_its_pings() {
        let (a, b) = pair_with(hello("a"), hello("b")).await;
        let (a, mut b) = (a.unwrap(), b.unwrap());
        assert_eq!(a.sender.figures().rtt_us, None);
        let data = Bytes::from(vec![7u8; 64 << 10]);
        a.sender
            .send(&Message::Write(wire::WriteRequest {
                seq: 0,
                epoch: 0,
                offset: 0,
                fua: false,
                ack_on_receive: false,
                data,
            }))
            .await
            .unwrap();
        assert!(matches!(b.receiver.recv().await, Some(Message::Write(_))));
        // A few ping intervals: both sides have timed a Pong.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (fa, fb) = (a.sender.figures(), b.sender.figures());
        assert!(fa.sent_bytes > 64 << 10, "{fa:?}");
        assert!(fb.received_bytes > 64 << 10, "{fb:?}");
        assert!(fa.rtt_us.is_some_and(|us| us < 1_000_000), "{fa:?}");
        assert!(fb.rtt_us.is_some(), "{fb:?}");
    }

    #[tokio::test]
    async fn a_link_is_congested_while_most_of_its_send_budget_is_taken() {
        let (a, b) = pair_with(hello("a"), hello("b")).await;
        let (a, _b) = (a.unwrap(), b.unwrap());
        assert!(!a.sender.figures().congested);
        let total = fast().send_budget;
        let quarter_left = a.sender.reserve(total - total / 4).await.unwrap();
        assert!(!a.sender.figures().congested, "a quarter is still free");
        let more = a.sender.reserve(1).await.unwrap();
        assert!(a.sender.figures().congested);
        drop((quarter_left, more));
        assert!(!a.sender.figures().congested);
    }

    #[tokio::test]
    async fn taken_messages_give_their_receive_budget_back_once_per_burst() {
        let (a, b) = pair_with(hello("a"), hello("b")).await;
        let (a, mut b) = (a.unwrap(), b.unwrap());
        let shared = b.receiver.shared.clone();
        let budget = &shared.recv_budget;
        let total = shared.recv_budget_total;
        for id in 0..10 {
            a.sender.send_control(&Message::FlushAck { id }).unwrap();
        }
        // A large write is given back as soon as it is taken.
        let write = Message::Write(wire::WriteRequest {
            seq: 0,
            epoch: 0,
            offset: 0,
            fua: false,
            ack_on_receive: false,
            data: Bytes::from(vec![1u8; RETURN_BUDGET_AT]),
        });
        a.sender.send(&write).await.unwrap();
        let queued = async {
            while b.receiver.rx.len() < 11 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), queued)
            .await
            .expect("all 11 messages queued");
        let held = total - budget.available_permits();
        assert!(b.receiver.try_recv().is_some());
        assert!(b.receiver.recv().await.is_some());
        assert_eq!(
            total - budget.available_permits(),
            held,
            "two small messages taken, their budget still owed"
        );
        for _ in 2..10 {
            assert!(b.receiver.try_recv().is_some());
        }
        assert_eq!(b.receiver.try_recv(), Some(write));
        assert_eq!(
            budget.available_permits(),
            total,
            "a large one pays all back"
        );
        a.sender
            .send_control(&Message::FlushAck { id: 10 })
            .unwrap();
        assert!(b.receiver.recv().await.is_some());
        assert!(
            budget.available_permits() < total,
            "owed until the queue runs dry"
        );
        assert_eq!(b.receiver.try_recv(), None);
        assert_eq!(budget.available_permits(), total, "the queue ran dry");
    }

    #[tokio::test]
    async fn a_silent_peer_is_declared_dead() {
        // The peer authenticates and says Hello, then goes silent (no pongs).
        let (x, mut y) = duplex(1 << 20);
        let s = secret();
        let peer = tokio::spawn(async move {
            let s = secret();
            auth::authenticate(&mut y, &s, AuthRole::Acceptor, "a", Duration::from_secs(5))
                .await
                .unwrap();
            let mut buf = BytesMut::new();
            read_hello(&mut y, &mut buf).await.map_err(|e| e.0).unwrap();
            write_frame(&mut y, &Message::Hello(hello("b")))
                .await
                .map_err(|e| e.0)
                .unwrap();
            // Keep the stream open but never answer.
            tokio::time::sleep(Duration::from_secs(10)).await;
            drop(y);
        });
        let mut a = PeerLink::establish_initiator(x, &s, &hello("a"), &fast(), "b")
            .await
            .unwrap();
        let started = Instant::now();
        assert!(a.receiver.recv().await.is_none());
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(matches!(
            a.receiver.down_reason(),
            Some(LinkDown::Unresponsive(_))
        ));
        assert!(a.sender.send(&Message::Flush { id: 1 }).await.is_err());
        peer.abort();
    }

    #[tokio::test]
    async fn a_corrupt_frame_takes_the_link_down() {
        let (x, mut y) = duplex(1 << 20);
        let peer = tokio::spawn(async move {
            let s = secret();
            auth::authenticate(&mut y, &s, AuthRole::Acceptor, "a", Duration::from_secs(5))
                .await
                .unwrap();
            let mut buf = BytesMut::new();
            read_hello(&mut y, &mut buf).await.map_err(|e| e.0).unwrap();
            write_frame(&mut y, &Message::Hello(hello("b")))
                .await
                .map_err(|e| e.0)
                .unwrap();
            // A frame header announcing 4 GiB.
            let mut bad = Message::Flush { id: 1 }.encode().to_vec();
            bad[12..16].copy_from_slice(&u32::MAX.to_be_bytes());
            y.write_all(&bad).await.unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
            drop(y);
        });
        let mut a = PeerLink::establish_initiator(x, &secret(), &hello("a"), &fast(), "b")
            .await
            .unwrap();
        assert!(a.receiver.recv().await.is_none());
        assert!(matches!(
            a.receiver.down_reason(),
            Some(LinkDown::Protocol(WireError::HeaderChecksum { .. }))
        ));
        peer.abort();
    }

    #[tokio::test]
    async fn dropping_a_link_closes_it_for_the_peer() {
        let (a, b) = pair_with(hello("a"), hello("b")).await;
        let (a, mut b) = (a.unwrap(), b.unwrap());
        drop(a);
        assert!(b.receiver.recv().await.is_none());
        assert!(matches!(
            b.receiver.down_reason(),
            Some(LinkDown::PeerClosed)
        ));
    }

    #[tokio::test]
    async fn a_closed_peer_takes_the_link_down() {
        let (a, b) = pair_with(hello("a"), hello("b")).await;
        let (mut a, b) = (a.unwrap(), b.unwrap());
        b.sender.close("test");
        assert!(a.receiver.recv().await.is_none());
        assert!(matches!(
            a.receiver.down_reason(),
            Some(LinkDown::PeerClosed)
        ));
    }

    #[tokio::test]
    async fn an_error_frame_reaches_the_peer_before_the_close() {
        let (a, b) = pair_with(hello("a"), hello("b")).await;
        let (mut a, b) = (a.unwrap(), b.unwrap());
        b.sender
            .close_with_error(error_code::OUT_OF_RANGE, "too far");
        assert!(a.receiver.recv().await.is_none());
        match a.receiver.down_reason() {
            Some(LinkDown::PeerError { code, message }) => {
                assert_eq!(code, error_code::OUT_OF_RANGE);
                assert_eq!(message, "too far");
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn no_common_version_is_fatal_on_both_sides() {
        let mut old = hello("a");
        old.min_version = 1;
        old.max_version = 1;
        let mut new = hello("b");
        new.min_version = 2;
        new.max_version = 3;
        let (a, b) = pair_with(old, new).await;
        let (a, b) = (a.err().unwrap(), b.err().unwrap());
        assert!(
            matches!(
                a,
                LinkError::VersionMismatch { .. } | LinkError::PeerError { .. }
            ),
            "{a:?}"
        );
        assert!(matches!(b, LinkError::VersionMismatch { .. }), "{b:?}");
        assert!(!a.should_reconnect());
        assert!(!b.should_reconnect());
        assert!(b.to_string().contains("upgrade"));
    }

    #[tokio::test]
    async fn a_higher_common_version_is_chosen() {
        // A newer build that also speaks this one's versions.
        let mut a = hello("a");
        a.max_version = wire::PROTOCOL_VERSION_MAX + 2;
        let (x, y) = pair_with(a, hello("b")).await;
        assert_eq!(x.unwrap().info.version, wire::PROTOCOL_VERSION_MAX);
        assert_eq!(y.unwrap().info.version, wire::PROTOCOL_VERSION_MAX);
        assert_eq!(negotiate_version(1, 4, 2, 9), Some(4));
    }

    #[tokio::test]
    async fn a_different_volume_or_protocol_is_fatal() {
        let mut other = hello("b");
        other.volume = "other".into();
        let (a, b) = pair_with(hello("a"), other).await;
        assert!(!a.err().unwrap().should_reconnect());
        assert!(matches!(b.err().unwrap(), LinkError::VolumeMismatch { .. }));

        let mut other = hello("b");
        other.protocol = ReplicationProtocol::A;
        let (a, b) = pair_with(hello("a"), other).await;
        assert!(!a.err().unwrap().should_reconnect());
        assert!(matches!(
            b.err().unwrap(),
            LinkError::ProtocolMismatch { .. }
        ));
    }

    #[tokio::test]
    async fn an_unknown_volume_is_refused_by_the_acceptor() {
        let (x, y) = duplex(1 << 20);
        let s = secret();
        let cfg = fast();
        let ha = hello("a");
        let (a, b) = tokio::join!(
            PeerLink::establish_initiator(x, &s, &ha, &cfg, "b"),
            PeerLink::establish_acceptor(y, &s, &cfg, "a", |_| None),
        );
        match a.err().unwrap() {
            LinkError::PeerError { code, message } => {
                assert_eq!(code, error_code::CONFIG_MISMATCH);
                assert!(message.contains("vol"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(b.err().unwrap(), LinkError::UnknownVolume(_)));
    }

    #[tokio::test]
    async fn a_wrong_secret_is_fatal() {
        let (x, y) = duplex(1 << 20);
        let cfg = fast();
        let s1 = secret();
        let s2 = Secret::new(b"other".to_vec()).unwrap();
        let ha = hello("a");
        let (a, b) = tokio::join!(
            PeerLink::establish_initiator(x, &s1, &ha, &cfg, "b"),
            PeerLink::establish_acceptor(y, &s2, &cfg, "a", |_| Some(hello("b"))),
        );
        assert!(!a.err().unwrap().should_reconnect());
        assert!(!b.err().unwrap().should_reconnect());
    }

    #[tokio::test]
    async fn tcp_connect_and_accept_with_retry() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let s = secret();
        let cfg = fast();
        let acceptor = tokio::spawn(async move {
            let s = secret();
            PeerLink::accept(&listener, &s, &fast(), |h| {
                assert_eq!(h.volume, "vol");
                Some(hello("b"))
            })
            .await
        });
        let a = PeerLink::connect_with_retry(
            addr,
            &s,
            &hello("a"),
            &cfg,
            Duration::from_millis(10),
            Duration::from_millis(100),
        )
        .await
        .unwrap();
        let mut b = acceptor.await.unwrap().unwrap();
        a.sender
            .send_control(&Message::Barrier { epoch: 1 })
            .unwrap();
        assert_eq!(
            b.receiver.recv().await.unwrap(),
            Message::Barrier { epoch: 1 }
        );
    }

    #[tokio::test]
    async fn connecting_to_a_closed_port_is_transient() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let e = PeerLink::connect(addr, &secret(), &hello("a"), &fast())
            .await
            .err()
            .unwrap();
        assert!(matches!(e, LinkError::Connect { .. }));
        assert!(e.should_reconnect());
    }
}
