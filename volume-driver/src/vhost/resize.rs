//! Online resize for one frontend connection: a thread that looks at the open volume's
//! size every [`POLL`] and has the backend announce a change to QEMU
//! ([`BlkBackend::announce_size`], a `CONFIG_CHANGE_MSG`).
//!
//! Polling keeps the frontend contract ([`ExportHandle::size`](crate::frontend::ExportHandle::size)
//! is read at any time) unchanged for NBD and vhost-user alike; a size read is a cheap load,
//! and a guest sees a `tandem volume resize` within [`POLL`] of its return.

use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::backend::BlkBackend;

/// How often the size is compared with what the frontend last learned.
pub const POLL: Duration = Duration::from_millis(200);

/// The watching thread of one connection; dropping it stops and joins the thread.
pub struct SizeWatcher {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl SizeWatcher {
    /// Watch `backend`'s volume until dropped; `None` (logged) when the thread cannot start,
    /// in which case the guest sees a new size only when QEMU restarts.
    pub fn start(name: &str, backend: Arc<BlkBackend>) -> Option<SizeWatcher> {
        let (stop, stopped) = mpsc::channel::<()>();
        let spawned = std::thread::Builder::new()
            .name(format!("vhost-{name}-size"))
            .spawn(move || {
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(POLL) {
                    backend.announce_size();
                }
            });
        match spawned {
            Ok(thread) => Some(SizeWatcher {
                stop: Some(stop),
                thread: Some(thread),
            }),
            Err(e) => {
                tracing::warn!(volume = %name, error = %e, "vhost-user-blk: cannot start the resize watcher; the guest sees a new size only when QEMU restarts");
                None
            }
        }
    }
}

impl Drop for SizeWatcher {
    fn drop(&mut self) {
        // Hanging up the channel ends the thread's wait at once.
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("vhost-user-blk resize watcher panicked");
            }
        }
    }
}
