//! One frontend connection on a volume's socket, from accept to hang-up, and the registry
//! through which the socket hangs up all of its connections when it closes.
//!
//! [`Session::start`] accepts a connection with a fresh [`BlkBackend`] under rust-vmm's
//! `VhostUserDaemon` (whose thread answers the messages); [`Session::run`], on a thread of
//! the connection's own, then decides its fate:
//!
//! 1. a frontend is already being served on this socket (its connection is up, and stays
//!    up for the short wait that lets a frontend that just left be seen gone): hang up
//!    (logged, naming the volume), so a second QEMU fails to start instead of waiting; a
//!    previous frontend that is gone but still being released is waited for;
//! 2. otherwise wait, at most the idle timeout, for the frontend to start using the device
//!    (GET_FEATURES, its first message, opens the volume): a connection that does not is
//!    closed (logged), so a silent client cannot hold the socket; a refused open is hung up
//!    at once, before QEMU's device is realized, so QEMU fails to start (the backend logged
//!    the reason);
//! 3. serve until the frontend goes away (a [`SizeWatcher`] tells it when the volume
//!    grows), then release the handle, which demotes when it was the last writer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;

use super::backend::{BlkBackend, FirstUse};
use super::resize::SizeWatcher;

/// A running connection: its backend, which can hang it up.
type Live = Arc<BlkBackend>;

/// The connections of one socket that are still running.
#[derive(Default)]
pub struct Connections {
    live: Mutex<HashMap<u64, Live>>,
    /// Notified when a connection ends.
    ended: Condvar,
    next_id: AtomicU64,
}

impl Connections {
    fn live(&self) -> MutexGuard<'_, HashMap<u64, Live>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn register(&self, live: Live) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.live().insert(id, live);
        id
    }

    fn unregister(&self, id: u64) {
        self.live().remove(&id);
        self.ended.notify_all();
    }

    /// Hang up every connection and wait until each has released its handle. Blocking: a
    /// request in flight is waited for.
    pub fn close_all(&self) {
        let mut live = self.live();
        for connection in live.values() {
            connection.hang_up();
        }
        while !live.is_empty() {
            live = self.ended.wait(live).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// What a connection is served with.
pub struct Setup<'a> {
    pub name: &'a str,
    pub connections: &'a Arc<Connections>,
    pub idle_timeout: Duration,
}

/// One accepted connection and the daemon answering it.
pub struct Session {
    name: String,
    /// Taken (and dropped, which joins the queue workers) when the session ends.
    daemon: Option<VhostUserDaemon<Arc<BlkBackend>>>,
    backend: Arc<BlkBackend>,
    connections: Arc<Connections>,
    id: u64,
    idle_timeout: Duration,
    ended: bool,
}

impl Session {
    /// Accept the next connection on `listener` (blocking) for `backend`, whose guest
    /// memory the daemon maps.
    pub fn start(
        setup: Setup<'_>,
        backend: Arc<BlkBackend>,
        listener: &mut Listener,
    ) -> Result<Session, vhost_user_backend::Error> {
        let mem = backend.guest_memory();
        let mut daemon =
            VhostUserDaemon::new(format!("vhost-{}", setup.name), Arc::clone(&backend), mem)?;
        let started = daemon.start(listener).and_then(|()| {
            daemon.shutdown_handle().ok_or_else(|| {
                vhost_user_backend::Error::StartDaemon(std::io::Error::other(
                    "the daemon started without a connection",
                ))
            })
        });
        let hangup = match started {
            Ok(hangup) => hangup,
            Err(e) => {
                let _ = end_daemon(daemon, &backend);
                return Err(e);
            }
        };
        backend.set_hangup(hangup);
        let id = setup.connections.register(Arc::clone(&backend));
        Ok(Session {
            name: setup.name.to_string(),
            daemon: Some(daemon),
            backend,
            connections: Arc::clone(setup.connections),
            id,
            idle_timeout: setup.idle_timeout,
            ended: false,
        })
    }

    /// Hang up now (the socket is closing), after the last completion.
    pub fn hang_up(&self) {
        self.backend.hang_up();
    }

    /// Admit or refuse the frontend, serve it until it goes away, release the volume.
    pub fn run(mut self) {
        let mut watcher = None;
        if self.backend.another_frontend_is_served() {
            tracing::warn!(volume = %self.name, "vhost-user-blk: refusing a second frontend: the volume is being served on this socket");
            self.hang_up();
        } else {
            match self.backend.wait_first_use(self.idle_timeout) {
                FirstUse::Served => {
                    tracing::debug!(volume = %self.name, "vhost-user frontend connected");
                    watcher = SizeWatcher::start(&self.name, Arc::clone(&self.backend));
                }
                // The backend logged the reason.
                FirstUse::Refused(_) => self.hang_up(),
                FirstUse::Idle => {
                    tracing::warn!(volume = %self.name, timeout = ?self.idle_timeout, "vhost-user-blk: closing a connection that did not start using the device in time");
                    self.hang_up();
                }
            }
        }
        self.end();
        drop(watcher);
    }

    /// Wait for the daemon's thread, stop the queue workers, release the volume.
    fn end(&mut self) {
        if std::mem::replace(&mut self.ended, true) {
            return;
        }
        let Some(daemon) = self.daemon.take() else {
            return;
        };
        match end_daemon(daemon, &self.backend) {
            Ok(()) => tracing::debug!(volume = %self.name, "vhost-user frontend disconnected"),
            // The frontend broke the protocol or vanished mid-message: its problem, not
            // the socket's.
            Err(e) => {
                tracing::warn!(volume = %self.name, error = %e, "vhost-user frontend dropped")
            }
        }
        self.connections.unregister(self.id);
    }
}

impl Drop for Session {
    /// A session dropped without [`Session::run`] (its thread could not start) still
    /// hangs up and releases everything.
    fn drop(&mut self) {
        if !self.ended {
            self.hang_up();
            self.end();
        }
    }
}

/// Wait for the daemon's thread, stop and join the queue workers, then release the volume.
/// The order matters: a worker may still be running a request (a write waiting for its
/// peer), and the volume must stay open and the slot taken until it has finished, or a new
/// frontend could open the volume and have its write overtaken by the old one, and a
/// shutting-down daemon could close the replica under it.
fn end_daemon(
    mut daemon: VhostUserDaemon<Arc<BlkBackend>>,
    backend: &BlkBackend,
) -> Result<(), vhost_user_backend::Error> {
    let ended = daemon.wait();
    backend.frontend_gone();
    for handler in daemon.get_epoll_handlers() {
        handler.send_exit_event();
    }
    // The last reference to the handler: its drop joins the worker threads.
    drop(daemon);
    backend.release();
    ended
}
