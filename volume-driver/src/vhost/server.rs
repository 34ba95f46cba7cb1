//! The vhost-user-blk sockets: one `<run_dir>/vhost/<volume>.sock` per volume served here.
//!
//! [`serve`] keeps the set of sockets equal to [`Exports::list`] (checked every
//! [`RECONCILE_EVERY`]): a socket appears when a volume is created or arrives on this node
//! and disappears when it is deleted, renamed or leaves. Closing a socket waits for its
//! requests in flight, so it runs in a task of its own: one stuck volume does not hold up
//! the others. The task is tracked: the volume's socket is not created again before the old
//! one is gone, and tandemd's shutdown waits for every close.
//!
//! Each socket has a thread that keeps accepting for as long as the socket exists, and
//! each connection a thread of its own ([`super::connection`]): at most one frontend is
//! served at a time, further connections are closed at once, and a connection that does
//! not start using the device within [`Settings::idle_timeout`] is closed.

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::runtime::Handle;
use vhost::vhost_user::Listener;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use super::backend::{BlkBackend, FrontendSlot};
use super::connection::{Connections, Session, Setup};
use super::stats;
use crate::frontend::Exports;

/// How often the socket set is compared with the volume list.
pub const RECONCILE_EVERY: Duration = Duration::from_millis(200);

/// How long a new connection may take to start using the device (GET_FEATURES).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(5);

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
    /// A connection that has not asked for the device features after this long is closed
    /// ([`IDLE_TIMEOUT`]).
    pub idle_timeout: Duration,
}

/// Serve every volume on its socket until `stop` turns true, then remove the sockets
/// (closing open connections first).
pub async fn serve(settings: Settings, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut sockets: HashMap<String, VolumeSocket> = HashMap::new();
    let mut closing: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
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
        closing.retain(|_, task| !task.is_finished());
        let wanted = settings.exports.list();
        let gone: Vec<String> = sockets
            .keys()
            .filter(|name| !wanted.contains(name))
            .cloned()
            .collect();
        for name in gone {
            if let Some(socket) = sockets.remove(&name) {
                closing.insert(name, close_in_background(socket));
            }
        }
        failed.retain(|name, _| wanted.contains(name));
        for name in wanted {
            // A socket still closing keeps its path until it is gone.
            if sockets.contains_key(&name) || closing.contains_key(&name) {
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
    let tasks: Vec<_> = sockets
        .into_values()
        .map(close_in_background)
        .chain(closing.into_values())
        .collect();
    for task in tasks {
        if let Err(e) = task.await {
            tracing::error!(error = %e, "closing a vhost-user-blk socket failed");
        }
    }
}

/// Close `socket` on a blocking thread; the handle says when it is gone.
fn close_in_background(socket: VolumeSocket) -> tokio::task::JoinHandle<()> {
    tokio::task::spawn_blocking(move || {
        let name = socket.name.clone();
        socket.close();
        tracing::info!(volume = %name, "vhost-user-blk socket removed");
    })
}

/// One volume's socket and the thread accepting on it.
struct VolumeSocket {
    name: String,
    path: PathBuf,
    stop: Arc<AtomicBool>,
    connections: Arc<Connections>,
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
        let connections = Arc::new(Connections::default());
        let thread = {
            let acceptor = Acceptor {
                name: name.to_string(),
                settings: settings.clone(),
                stop: Arc::clone(&stop),
                slot: Arc::default(),
                connections: Arc::clone(&connections),
            };
            std::thread::Builder::new()
                .name(format!("vhost-{name}"))
                .spawn(move || acceptor.run(listener))
                .map_err(|source| VhostError::Thread {
                    path: path.clone(),
                    source,
                })?
        };
        Ok(VolumeSocket {
            name: name.to_string(),
            path,
            stop,
            connections,
            thread,
        })
    }

    /// Stop accepting (the thread removes the socket file), hang up every connection and
    /// wait until each has released the volume. Blocking.
    fn close(self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the thread blocked in accept(); it sees `stop` and ends.
        let _ = std::os::unix::net::UnixStream::connect(&self.path);
        if self.thread.join().is_err() {
            tracing::error!(socket = %self.path.display(), "vhost-user-blk socket thread panicked");
        }
        self.connections.close_all();
        stats::forget(&self.name);
    }
}

/// The thread accepting on one socket.
struct Acceptor {
    name: String,
    settings: Settings,
    stop: Arc<AtomicBool>,
    /// The one frontend served at a time.
    slot: Arc<FrontendSlot>,
    connections: Arc<Connections>,
}

impl Acceptor {
    fn run(self, mut listener: Listener) {
        while !self.stop.load(Ordering::SeqCst) {
            if let Err(e) = self.accept_one(&mut listener) {
                tracing::warn!(volume = %self.name, error = %e, "vhost-user-blk: accepting a connection failed");
                // Do not spin when accept() itself keeps failing.
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        // Dropping the listener removes the socket file.
    }

    /// Accept one connection and hand it to a thread of its own.
    fn accept_one(&self, listener: &mut Listener) -> Result<(), vhost_user_backend::Error> {
        let s = &self.settings;
        let backend = Arc::new(BlkBackend::new(
            &self.name,
            Arc::clone(&s.exports),
            s.runtime.clone(),
            s.max_queues,
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            Arc::clone(&self.slot),
        ));
        let setup = Setup {
            name: &self.name,
            connections: &self.connections,
            idle_timeout: s.idle_timeout,
        };
        let session = Session::start(setup, backend, listener)?;
        if self.stop.load(Ordering::SeqCst) {
            // `close` woke us, or raced with this connection: it is not served.
            session.hang_up();
            return Ok(());
        }
        // If the thread cannot start, dropping the session hangs up and cleans up.
        std::thread::Builder::new()
            .name(format!("vhost-{}-conn", self.name))
            .spawn(move || session.run())
            .map(|_| ())
            .map_err(vhost_user_backend::Error::StartDaemon)
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::time::Instant;

    use super::*;
    use crate::vhost::backend::GONE_WAIT;
    use crate::vhost::dummy_exports::DummyExports;

    /// tandemd's vhost-user-blk serving on a scratch directory; stops and waits for every
    /// socket to close when dropped.
    struct Served {
        dir: tempfile::TempDir,
        exports: Arc<DummyExports>,
        stop: tokio::sync::watch::Sender<bool>,
        task: Option<tokio::task::JoinHandle<()>>,
        runtime: tokio::runtime::Runtime,
    }

    impl Served {
        fn start(volumes: &[&str], idle_timeout: Duration) -> Served {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            let dir = tempfile::tempdir().expect("temp dir");
            let exports = DummyExports::new(volumes);
            let settings = Settings {
                dir: dir.path().join("vhost"),
                max_queues: 1,
                exports: Arc::clone(&exports) as Arc<dyn Exports>,
                runtime: runtime.handle().clone(),
                idle_timeout,
            };
            let (stop, stopped) = tokio::sync::watch::channel(false);
            let task = runtime.spawn(serve(settings, stopped));
            let served = Served {
                dir,
                exports,
                stop,
                task: Some(task),
                runtime,
            };
            for volume in volumes {
                served.wait_for_socket(volume);
            }
            served
        }

        fn path(&self, volume: &str) -> PathBuf {
            socket_path(&self.dir.path().join("vhost"), volume)
        }

        fn wait_for_socket(&self, volume: &str) {
            let path = self.path(volume);
            assert!(
                wait(Duration::from_secs(5), || path.exists()),
                "{} never appeared",
                path.display()
            );
        }

        fn connect(&self, volume: &str) -> UnixStream {
            let stream = UnixStream::connect(self.path(volume)).expect("connect");
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            stream
        }
    }

    impl Drop for Served {
        fn drop(&mut self) {
            self.exports.unstick();
            let _ = self.stop.send(true);
            if let Some(task) = self.task.take() {
                let _ = self.runtime.block_on(task);
            }
        }
    }

    fn wait(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if check() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        check()
    }

    /// Send GET_FEATURES; the device features when the daemon answers, `None` when it hangs
    /// up instead.
    fn get_features(stream: &mut UnixStream) -> Option<u64> {
        let mut message = 1u32.to_le_bytes().to_vec(); // GET_FEATURES
        message.extend_from_slice(&1u32.to_le_bytes()); // version 1
        message.extend_from_slice(&0u32.to_le_bytes()); // no payload
        stream.write_all(&message).ok()?;
        let mut reply = [0u8; 20];
        stream.read_exact(&mut reply).ok()?;
        Some(u64::from_le_bytes(reply[12..20].try_into().ok()?))
    }

    /// How long until the daemon closes `stream` (reading and dropping whatever it sends).
    fn time_to_hang_up(stream: &mut UnixStream) -> Duration {
        let start = Instant::now();
        let mut sink = [0u8; 64];
        loop {
            match stream.read(&mut sink) {
                Ok(0) => return start.elapsed(),
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return start.elapsed(),
                Err(e) => panic!("the daemon kept the connection open ({e})"),
            }
        }
    }

    fn served_frontends(volume: &str) -> u64 {
        stats::snapshot()
            .get(volume)
            .map_or(0, |figures| figures.connections)
    }

    #[test]
    fn a_silent_connection_is_closed_after_the_idle_timeout_and_keeps_no_frontend_out() {
        let served = Served::start(&["quiet"], Duration::from_millis(500));
        let mut silent = served.connect("quiet");
        let mut qemu = served.connect("quiet");
        assert!(
            get_features(&mut qemu).is_some_and(|f| f & (1 << 32) != 0),
            "the frontend behind a silent connection was not served"
        );
        let waited = time_to_hang_up(&mut silent);
        assert!(
            waited >= Duration::from_millis(300) && waited < Duration::from_secs(3),
            "the silent connection was closed after {waited:?}"
        );
        assert_eq!(served_frontends("quiet"), 1);
        assert!(
            get_features(&mut qemu).is_some(),
            "the frontend was dropped"
        );
    }

    #[test]
    fn while_a_frontend_is_served_a_second_connection_is_closed_after_about_half_a_second() {
        let served = Served::start(&["busy"], Duration::from_secs(30));
        let mut first = served.connect("busy");
        assert!(get_features(&mut first).is_some());
        let mut second = served.connect("busy");
        let waited = time_to_hang_up(&mut second);
        assert!(
            waited < 2 * GONE_WAIT,
            "the second connection waited {waited:?}"
        );
        assert_eq!(served.exports.opens("busy"), 1, "the second one opened");
        assert_eq!(served_frontends("busy"), 1);
        // Once the first frontend is gone, the next one is served.
        drop(first);
        assert!(wait(Duration::from_secs(5), || served_frontends("busy") == 0));
        let mut third = served.connect("busy");
        assert!(
            get_features(&mut third).is_some(),
            "the next frontend was refused"
        );
        assert_eq!(served.exports.opens("busy"), 2);
    }

    // Deterministic twin: backend::tests::a_second_frontend_refused_at_its_open_is_hung_up_without_waiting_again
    #[test]
    fn while_a_frontend_is_served_a_second_one_asking_for_the_device_is_hung_up_after_about_half_a_second(
    ) {
        let served = Served::start(&["busy-asking"], Duration::from_secs(30));
        let mut first = served.connect("busy-asking");
        assert!(get_features(&mut first).is_some());
        // The second frontend asks at once, as QEMU does: its open waits GONE_WAIT for the
        // first one to go away and is refused; the connection's check must not wait again.
        let mut second = served.connect("busy-asking");
        let asked = Instant::now();
        let _ = get_features(&mut second);
        let _ = time_to_hang_up(&mut second);
        let waited = asked.elapsed();
        assert!(
            waited < 2 * GONE_WAIT,
            "the second frontend was hung up after {waited:?}"
        );
        assert_eq!(
            served.exports.opens("busy-asking"),
            1,
            "the second one opened"
        );
        assert_eq!(served_frontends("busy-asking"), 1);
        assert!(
            get_features(&mut first).is_some(),
            "the first frontend was dropped"
        );
    }

    #[test]
    fn a_frontend_that_comes_while_the_previous_one_is_released_waits_instead_of_failing() {
        let served = Served::start(&["slow-close"], Duration::from_secs(30));
        let mut first = served.connect("slow-close");
        assert!(get_features(&mut first).is_some());
        drop(first);
        // The daemon sees the hang-up at once; releasing the handle takes SLOW_CLOSE.
        std::thread::sleep(Duration::from_millis(100));
        let started = Instant::now();
        let mut next = served.connect("slow-close");
        assert!(
            get_features(&mut next).is_some(),
            "a frontend was refused while the previous one was being released"
        );
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(200),
            "the open did not wait for the release ({waited:?})"
        );
        assert_eq!(served.exports.opens("slow-close"), 2);
    }

    #[test]
    fn a_refused_open_hangs_up_before_the_device_can_be_used_and_is_tried_again_next_time() {
        let served = Served::start(&["refused-vol"], Duration::from_secs(30));
        for attempt in 1..=2 {
            let mut qemu = served.connect("refused-vol");
            let _ = get_features(&mut qemu);
            let waited = time_to_hang_up(&mut qemu);
            assert!(waited < Duration::from_secs(2), "hung up after {waited:?}");
            assert_eq!(served.exports.opens("refused-vol"), attempt);
        }
        assert_eq!(served_frontends("refused-vol"), 0);
    }

    #[test]
    fn a_volume_whose_close_is_stuck_does_not_hold_up_the_other_sockets() {
        let served = Served::start(&["stuck-vol"], Duration::from_secs(30));
        let mut qemu = served.connect("stuck-vol");
        let message = [1u32.to_le_bytes(), 1u32.to_le_bytes(), 0u32.to_le_bytes()].concat();
        qemu.write_all(&message).expect("GET_FEATURES");
        assert!(wait(Duration::from_secs(5), || served
            .exports
            .opens("stuck-vol")
            == 1));
        // The stuck volume leaves and another arrives: its socket appears, although closing
        // the stuck one waits for its open to end.
        served.exports.set_list(&["other"]);
        served.wait_for_socket("other");
        assert!(wait(Duration::from_secs(5), || !served
            .path("stuck-vol")
            .exists()));
        // Coming back while its old socket is still closing: not served until it is gone.
        served.exports.set_list(&["other", "stuck-vol"]);
        std::thread::sleep(RECONCILE_EVERY * 3);
        assert!(!served.path("stuck-vol").exists());
        served.exports.unstick();
        served.wait_for_socket("stuck-vol");
        let mut next = served.connect("other");
        assert!(get_features(&mut next).is_some());
    }
}
