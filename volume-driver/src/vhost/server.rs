//! The vhost-user-blk sockets: one `<run_dir>/vhost/<volume>.sock` per volume served here.
//!
//! [`serve`] keeps the set of sockets equal to [`Exports::list`] (checked every
//! [`RECONCILE_EVERY`]): a socket appears when a volume is created or arrives on this node
//! and disappears when it is deleted, renamed or leaves. Each socket has a thread that
//! accepts one frontend at a time and runs rust-vmm's `VhostUserDaemon` on it with a fresh
//! [`BlkBackend`]; when the connection ends (QEMU quit, died, or sent garbage) the backend
//! releases its handle, which demotes when it was the last writer, and the socket accepts
//! the next frontend.

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::runtime::Handle;
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use super::backend::BlkBackend;
use crate::frontend::Exports;

/// How often the socket set is compared with the volume list.
pub const RECONCILE_EVERY: Duration = Duration::from_millis(200);

/// Why a volume's socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum VhostError {
    #[error("cannot create {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen on {path}")]
    Listen {
        path: PathBuf,
        #[source]
        source: vhost::vhost_user::Error,
    },
    #[error("cannot set the mode of {path}")]
    Chmod {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the thread serving {path}")]
    Thread {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The socket path of `volume` under `dir` (`<run_dir>/vhost`).
pub fn socket_path(dir: &Path, volume: &str) -> PathBuf {
    dir.join(format!("{volume}.sock"))
}

/// What the socket threads share.
#[derive(Clone)]
pub struct Settings {
    /// `<run_dir>/vhost`.
    pub dir: PathBuf,
    /// Queues offered to each frontend (`[frontends] vhost_max_queues`).
    pub max_queues: usize,
    pub exports: Arc<dyn Exports>,
    pub runtime: Handle,
}

/// Serve every volume on its socket until `stop` turns true, then remove the sockets
/// (closing open connections first).
pub async fn serve(settings: Settings, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut sockets: HashMap<String, VolumeSocket> = HashMap::new();
    let mut failed: HashMap<String, String> = HashMap::new();
    let mut tick = tokio::time::interval(RECONCILE_EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => {}
        }
        if *stop.borrow() {
            break;
        }
        let wanted = settings.exports.list();
        let gone: Vec<String> = sockets
            .keys()
            .filter(|name| !wanted.contains(name))
            .cloned()
            .collect();
        for name in gone {
            if let Some(socket) = sockets.remove(&name) {
                let _ = tokio::task::spawn_blocking(move || socket.close()).await;
                tracing::info!(volume = %name, "vhost-user-blk socket removed");
            }
        }
        failed.retain(|name, _| wanted.contains(name));
        for name in wanted {
            if sockets.contains_key(&name) {
                continue;
            }
            match VolumeSocket::open(&settings, &name) {
                Ok(socket) => {
                    tracing::info!(volume = %name, socket = %socket.path.display(), "vhost-user-blk listening");
                    failed.remove(&name);
                    sockets.insert(name, socket);
                }
                Err(e) => {
                    // Logged once per volume until it works or goes away; retried each tick.
                    let message = crate::report::error_chain(&e);
                    if failed.get(&name) != Some(&message) {
                        tracing::error!(volume = %name, error = %message, "cannot serve the volume over vhost-user-blk");
                        failed.insert(name, message);
                    }
                }
            }
        }
    }
    let all: Vec<VolumeSocket> = sockets.into_values().collect();
    let _ =
        tokio::task::spawn_blocking(move || all.into_iter().for_each(VolumeSocket::close)).await;
}

/// One volume's socket and the thread that serves it.
struct VolumeSocket {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    connection: Arc<Mutex<Option<ShutdownHandle>>>,
    thread: JoinHandle<()>,
}

impl VolumeSocket {
    fn open(settings: &Settings, name: &str) -> Result<VolumeSocket, VhostError> {
        std::fs::create_dir_all(&settings.dir).map_err(|source| VhostError::Dir {
            path: settings.dir.clone(),
            source,
        })?;
        let path = socket_path(&settings.dir, name);
        let listener = Listener::new(&path, true).map_err(|source| VhostError::Listen {
            path: path.clone(),
            source,
        })?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660)).map_err(
            |source| VhostError::Chmod {
                path: path.clone(),
                source,
            },
        )?;
        let stop = Arc::new(AtomicBool::new(false));
        let connection = Arc::new(Mutex::new(None));
        let thread = {
            let worker = Worker {
                name: name.to_string(),
                settings: settings.clone(),
                stop: Arc::clone(&stop),
                connection: Arc::clone(&connection),
            };
            std::thread::Builder::new()
                .name(format!("vhost-{name}"))
                .spawn(move || worker.run(listener))
                .map_err(|source| VhostError::Thread {
                    path: path.clone(),
                    source,
                })?
        };
        Ok(VolumeSocket {
            path,
            stop,
            connection,
            thread,
        })
    }

    /// Close the current connection, stop accepting, wait for the thread (which removes
    /// the socket file). Blocking.
    fn close(self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(connection) = lock(&self.connection).as_ref() {
            connection.shutdown();
        }
        // Wake a thread blocked in accept(); it sees `stop` and ends.
        let _ = std::os::unix::net::UnixStream::connect(&self.path);
        if self.thread.join().is_err() {
            tracing::error!(socket = %self.path.display(), "vhost-user-blk socket thread panicked");
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The thread behind one socket.
struct Worker {
    name: String,
    settings: Settings,
    stop: Arc<AtomicBool>,
    connection: Arc<Mutex<Option<ShutdownHandle>>>,
}

impl Worker {
    fn run(self, mut listener: Listener) {
        while !self.stop.load(Ordering::SeqCst) {
            if let Err(e) = self.serve_one(&mut listener) {
                tracing::warn!(volume = %self.name, error = %e, "vhost-user-blk connection failed");
                // Do not spin when accept() itself keeps failing.
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        // Dropping the listener removes the socket file.
    }

    /// Accept one frontend and serve it until it goes away.
    fn serve_one(&self, listener: &mut Listener) -> Result<(), vhost_user_backend::Error> {
        let s = &self.settings;
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let backend = Arc::new(BlkBackend::new(
            &self.name,
            Arc::clone(&s.exports),
            s.runtime.clone(),
            s.max_queues,
            mem.clone(),
        ));
        let mut daemon =
            VhostUserDaemon::new(format!("vhost-{}", self.name), Arc::clone(&backend), mem)?;
        let started = daemon.start(listener);
        if started.is_ok() {
            *lock(&self.connection) = daemon.shutdown_handle();
            // `close` may have run between accept and the line above.
            if self.stop.load(Ordering::SeqCst) {
                daemon.request_shutdown();
            }
            tracing::debug!(volume = %self.name, "vhost-user frontend connected");
        }
        let ended = started.and_then(|()| daemon.wait());
        *lock(&self.connection) = None;
        for handler in daemon.get_epoll_handlers() {
            handler.send_exit_event();
        }
        drop(daemon);
        backend.release();
        match ended {
            Ok(()) => {
                tracing::debug!(volume = %self.name, "vhost-user frontend disconnected");
                Ok(())
            }
            Err(vhost_user_backend::Error::HandleRequest(e)) => {
                // The frontend broke the protocol or vanished mid-message: its problem,
                // not the socket's. Accept the next one.
                tracing::warn!(volume = %self.name, error = %e, "vhost-user frontend dropped");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}
