//! One resync or verify session on the source: where it reads ([`SourceIo`]), the link to
//! the target ([`PeerChannel`]), and request/reply matching by id ([`Session`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::proto::ResyncMsg;
use super::{lock, ResyncError};
use crate::datapath::{Primary, RangeLock};
use crate::device::BackingDevice;
use crate::link::LinkSender;
use crate::wire::{error_code, Message};

/// Where the source reads its data.
#[derive(Clone)]
pub enum SourceIo {
    /// The source is the Primary: each chunk is read and exchanged under
    /// [`Primary::lock_range`], so it is atomic against overlapping application writes.
    Primary(Primary),
    /// No application writes happen on this node (it is not Primary); see the module doc
    /// of [`crate::resync`] for when this is safe.
    Device(Arc<dyn BackingDevice>),
}

impl SourceIo {
    pub(crate) fn device(&self) -> Arc<dyn BackingDevice> {
        match self {
            SourceIo::Primary(p) => p.device(),
            SourceIo::Device(d) => d.clone(),
        }
    }

    pub(crate) fn app_bytes(&self) -> Option<u64> {
        match self {
            SourceIo::Primary(p) => Some(p.application_bytes()),
            SourceIo::Device(_) => None,
        }
    }

    /// Lock the range against application writes (Primary), then read it.
    pub(crate) async fn lock_and_read(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<(Option<RangeLock>, Bytes), ResyncError> {
        let guard =
            match self {
                SourceIo::Primary(p) => Some(p.lock_range(offset, len).await.map_err(
                    |source| ResyncError::Lock {
                        offset,
                        len,
                        source,
                    },
                )?),
                SourceIo::Device(_) => None,
            };
        let device = self.device();
        let data = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; len as usize];
            device
                .read_at(&mut buf, offset)
                .map(|()| Bytes::from(buf))
                .map_err(|source| ResyncError::LocalRead {
                    offset,
                    len,
                    source,
                })
        })
        .await
        .map_err(ResyncError::LocalTask)??;
        Ok((guard, data))
    }
}

/// The link to the target: its sending half, and the resync/verify replies the engine
/// forwards from the link (Extension types `proto::TYPE_FIRST..=TYPE_LAST`).
pub struct PeerChannel {
    pub sender: LinkSender,
    pub replies: mpsc::UnboundedReceiver<Message>,
}

type Waiters = Arc<Mutex<Waiting>>;

#[derive(Default)]
struct Waiting {
    by_id: HashMap<u64, oneshot::Sender<ResyncMsg>>,
    done_ack: Option<oneshot::Sender<ResyncMsg>>,
    /// The reply router ended: no reply can arrive any more.
    closed: bool,
}

/// Request/reply matching for one session. Dropping it stops the reply router.
pub(crate) struct Session {
    sender: LinkSender,
    waiting: Waiters,
    next_id: AtomicU64,
    timeout: Duration,
    router: tokio::task::JoinHandle<()>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.router.abort();
    }
}

impl Session {
    pub(crate) fn new(peer: PeerChannel, timeout: Duration) -> Session {
        let waiting: Waiters = Arc::default();
        let router = tokio::spawn(route_replies(
            peer.replies,
            peer.sender.clone(),
            waiting.clone(),
        ));
        Session {
            sender: peer.sender,
            waiting,
            next_id: AtomicU64::new(1),
            timeout,
            router,
        }
    }

    /// The bytes in flight on the session's link.
    pub(crate) fn in_flight(&self) -> &crate::link::InFlight {
        self.sender.in_flight()
    }

    pub(crate) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Send `msg` (whose id is `id`) and wait for the reply with that id.
    pub(crate) async fn request(
        &self,
        id: u64,
        msg: ResyncMsg,
        op: &'static str,
        offset: u64,
    ) -> Result<ResyncMsg, ResyncError> {
        let (tx, rx) = oneshot::channel();
        {
            let mut w = lock(&self.waiting);
            if w.closed {
                return Err(ResyncError::RepliesClosed { op });
            }
            w.by_id.insert(id, tx);
        }
        self.send_and_wait(msg, rx, op, offset).await
    }

    /// Send Done and wait for DoneAck.
    pub(crate) async fn finish(&self, msg: ResyncMsg) -> Result<ResyncMsg, ResyncError> {
        let (tx, rx) = oneshot::channel();
        {
            let mut w = lock(&self.waiting);
            if w.closed {
                return Err(ResyncError::RepliesClosed { op: "resync end" });
            }
            w.done_ack = Some(tx);
        }
        self.send_and_wait(msg, rx, "resync end", 0).await
    }

    async fn send_and_wait(
        &self,
        msg: ResyncMsg,
        rx: oneshot::Receiver<ResyncMsg>,
        op: &'static str,
        offset: u64,
    ) -> Result<ResyncMsg, ResyncError> {
        self.sender
            .send(&msg.to_message())
            .await
            .map_err(|source| ResyncError::LinkDown { op, source })?;
        tokio::select! {
            reply = tokio::time::timeout(self.timeout, rx) => match reply {
                Ok(Ok(r)) => Ok(r),
                Ok(Err(_)) => Err(match self.sender.down_reason() {
                    Some(source) => ResyncError::LinkDown { op, source },
                    None => ResyncError::RepliesClosed { op },
                }),
                Err(_) => {
                    // A peer that is alive but silent is broken; a late reply must not
                    // match a later request either.
                    self.sender.close(&format!("resync peer did not answer {op} in time"));
                    Err(ResyncError::Timeout { op, offset, timeout: self.timeout })
                }
            },
            () = self.sender.closed() => Err(ResyncError::LinkDown {
                op,
                source: self.sender.down_reason().unwrap_or(crate::link::LinkDown::PeerClosed),
            }),
        }
    }
}

/// Hand each reply to the request waiting for its id. A malformed or unmatched reply is a
/// protocol error: the link is closed (every waiter then fails with LinkDown).
async fn route_replies(
    mut replies: mpsc::UnboundedReceiver<Message>,
    sender: LinkSender,
    waiting: Waiters,
) {
    while let Some(msg) = replies.recv().await {
        let decoded = match ResyncMsg::from_message(&msg) {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                protocol_error(&sender, &e.to_string());
                break;
            }
            None => continue, // not ours; the engine should not forward it
        };
        let waiter = match &decoded {
            ResyncMsg::DataAck { id, .. } | ResyncMsg::DigestReply { id, .. } => {
                lock(&waiting).by_id.remove(id)
            }
            ResyncMsg::DoneAck { .. } => lock(&waiting).done_ack.take(),
            _ => None,
        };
        match waiter {
            Some(tx) => {
                let _ = tx.send(decoded);
            }
            None => {
                protocol_error(
                    &sender,
                    &format!("unexpected resync reply {}", describe(&decoded)),
                );
                break;
            }
        }
    }
    // Replies end: wake every waiter with an error.
    let mut w = lock(&waiting);
    w.by_id.clear();
    w.done_ack = None;
    w.closed = true;
}

fn describe(m: &ResyncMsg) -> String {
    match m {
        ResyncMsg::Data { id, offset, data } => {
            format!("Data id {id} at {offset} len {}", data.len())
        }
        ResyncMsg::DataAck { id, .. } => format!("DataAck id {id}"),
        ResyncMsg::Digest { id, offset, .. } => format!("Digest id {id} at {offset}"),
        ResyncMsg::DigestReply { id, .. } => format!("DigestReply id {id}"),
        ResyncMsg::Done { .. } => "Done".into(),
        ResyncMsg::DoneAck { .. } => "DoneAck".into(),
        ResyncMsg::Zeroes { id, offset, .. } => format!("Zeroes id {id} at {offset}"),
    }
}

fn protocol_error(sender: &LinkSender, what: &str) {
    let what: String = what.chars().take(200).collect();
    tracing::warn!("resync target broke the protocol: {what}; disconnecting");
    sender.close_with_error(error_code::PROTOCOL, &what);
}
