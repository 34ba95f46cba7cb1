//! The soft watchdog: if the decision loop stops ticking for `soft_watchdog_ms` (a hung
//! libvirt call, a stuck tandemd exchange, a bug), a separate thread checks the managed VMs
//! that were running here: any whose disks this node's tandemd reports without quorum is
//! SIGKILLed through its QEMU pid file (`/run/libvirt/qemu/<domain>.pid`) and its volumes
//! are demoted by force, so a hung agent cannot leave a VM of the isolated side alive (or
//! its replica Primary) until the network heals. A VM whose status cannot be read is left
//! alone (no evidence). VMs with quorum are never touched: no other host can take them
//! over. Off with `soft_watchdog_ms = 0`. There is no hardware watchdog (`/dev/watchdog`):
//! a dead agent process kills nothing, which is safe for the same reason (the engine
//! freezes I/O without quorum and a survivor's promotion needs quorum).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::disks::DiskReader;
use crate::events::{now_ms, EventLog};

/// Where libvirt's QEMU driver keeps the pid of a running domain.
pub const QEMU_PID_DIR: &str = "/run/libvirt/qemu";

/// What the decision loop shares with the watchdog.
#[derive(Default)]
pub struct Pet {
    /// When the loop last finished a tick (ms since the epoch).
    pub last_tick_ms: AtomicU64,
    /// Managed VMs running here at the last tick, with their volumes.
    pub running: Mutex<Vec<(String, Vec<String>)>>,
}

impl Pet {
    pub fn pet(&self, running: Vec<(String, Vec<String>)>) {
        *self.running.lock().unwrap_or_else(|p| p.into_inner()) = running;
        self.last_tick_ms.store(now_ms(), Ordering::SeqCst);
    }
}

/// The loop has not ticked for longer than `limit` (pure, for tests).
pub fn stalled(last_tick_ms: u64, now_ms: u64, limit: Duration) -> bool {
    last_tick_ms != 0 && now_ms.saturating_sub(last_tick_ms) > limit.as_millis() as u64
}

/// The pid in `<dir>/<domain>.pid`.
pub fn qemu_pid(dir: &Path, domain: &str) -> Option<i32> {
    let text = std::fs::read_to_string(dir.join(format!("{domain}.pid"))).ok()?;
    text.trim().parse().ok().filter(|p| *p > 1)
}

/// Run the watchdog thread: while the loop is stalled, every 500 ms, each managed VM that
/// was running here and whose disks lost quorum is SIGKILLed (once per stall) and its
/// volumes demoted by force, as the decision loop's fence would.
pub fn spawn(
    pet: Arc<Pet>,
    limit: Duration,
    mut disks: DiskReader,
    events: Arc<EventLog>,
) -> std::io::Result<()> {
    let pid_dir = PathBuf::from(QEMU_PID_DIR);
    std::thread::Builder::new()
        .name("soft-watchdog".into())
        .spawn(move || {
            // VMs killed during the current stall (the loop ticking again clears it).
            let mut killed: BTreeSet<String> = BTreeSet::new();
            loop {
                std::thread::sleep(Duration::from_millis(500));
                let last = pet.last_tick_ms.load(Ordering::SeqCst);
                if !stalled(last, now_ms(), limit) {
                    killed.clear();
                    continue;
                }
                let running = pet
                    .running
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                for (vm, volumes) in running {
                    if killed.contains(&vm) {
                        continue;
                    }
                    let Ok(views) = disks.read(&volumes) else {
                        continue;
                    };
                    if views.iter().all(|d| d.quorum) {
                        continue;
                    }
                    let Some(pid) = qemu_pid(&pid_dir, &vm) else {
                        continue;
                    };
                    // SAFETY: kill(2) on the pid libvirt recorded for this domain's QEMU.
                    let rc = unsafe { libc::kill(pid, libc::SIGKILL) };
                    killed.insert(vm.clone());
                    let demoted: Vec<_> = volumes
                        .iter()
                        .map(|v| match disks.demote_force(v) {
                            Ok(()) => serde_json::json!({"volume": v, "demoted": true}),
                            Err(e) => {
                                serde_json::json!({"volume": v, "demoted": false, "error": e})
                            }
                        })
                        .collect();
                    events.emit(
                        "watchdog_kill",
                        serde_json::json!({"vm": vm, "pid": pid, "ok": rc == 0,
                            "stalled_ms": now_ms().saturating_sub(last), "volumes": demoted}),
                    );
                }
            }
        })
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stall_detection_and_pid_files() {
        let limit = Duration::from_secs(10);
        assert!(!stalled(0, 50_000, limit), "never ticked: not armed");
        assert!(!stalled(40_000, 50_000, limit));
        assert!(stalled(39_999, 50_000, limit));
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vm1.pid"), "4242\n").unwrap();
        std::fs::write(dir.path().join("vm2.pid"), "1").unwrap();
        std::fs::write(dir.path().join("vm3.pid"), "x").unwrap();
        assert_eq!(qemu_pid(dir.path(), "vm1"), Some(4242));
        assert_eq!(qemu_pid(dir.path(), "vm2"), None);
        assert_eq!(qemu_pid(dir.path(), "vm3"), None);
        assert_eq!(qemu_pid(dir.path(), "vm4"), None);
    }
}
