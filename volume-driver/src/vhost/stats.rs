//! What the vhost-user-blk frontend counts for the metrics exporter: per volume, the
//! frontends being served and the requests answered, by type and status.
//!
//! A frontend counts from the moment it opened the volume until its connection ends (a
//! guard), as an NBD client counts from the end of its handshake
//! ([`crate::nbd::connections`]). The data path only adds to atomics; a scrape copies them
//! ([`snapshot`]). Process-wide, keyed by volume name; a volume's counters are dropped with
//! its socket ([`forget`]), so a volume that comes back starts again from 0.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::request::{Op, Status};

/// One volume's counters.
#[derive(Debug, Default)]
pub struct Counters {
    connections: AtomicU64,
    /// Indexed by `Op::ALL` position, then `Status::ALL` position.
    requests: [[AtomicU64; 3]; 7],
}

static VOLUMES: Mutex<BTreeMap<String, Arc<Counters>>> = Mutex::new(BTreeMap::new());

fn volumes() -> MutexGuard<'static, BTreeMap<String, Arc<Counters>>> {
    VOLUMES.lock().unwrap_or_else(|e| e.into_inner())
}

/// The counters of `volume`, created at 0 on first use.
pub fn counters(volume: &str) -> Arc<Counters> {
    Arc::clone(volumes().entry(volume.to_string()).or_default())
}

/// Drop `volume`'s counters (its socket is gone).
pub fn forget(volume: &str) {
    volumes().remove(volume);
}

fn position<T: PartialEq>(all: &[T], item: &T) -> usize {
    all.iter().position(|x| x == item).unwrap_or(0)
}

impl Counters {
    /// Count one answered request.
    pub fn request(&self, op: Op, status: Status) {
        let by_op = &self.requests[position(Op::ALL, &op)];
        by_op[position(Status::ALL, &status)].fetch_add(1, Ordering::Relaxed);
    }

    /// Count a frontend being served until the guard is dropped.
    pub fn connected(self: &Arc<Self>) -> Connected {
        self.connections.fetch_add(1, Ordering::Relaxed);
        Connected(Arc::clone(self))
    }
}

/// A served frontend; dropping it ends the count.
#[derive(Debug)]
pub struct Connected(Arc<Counters>);

impl Drop for Connected {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One volume's figures at a scrape.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Figures {
    /// Frontends being served now.
    pub connections: u64,
    /// Requests answered: `(op, status, count)` for every pair counted at least once.
    pub requests: Vec<(&'static str, &'static str, u64)>,
}

/// Every volume's figures, by volume name.
pub fn snapshot() -> BTreeMap<String, Figures> {
    volumes()
        .iter()
        .map(|(name, c)| {
            let mut requests = Vec::new();
            for (op, by_op) in Op::ALL.iter().zip(&c.requests) {
                for (status, n) in Status::ALL.iter().zip(by_op) {
                    let n = n.load(Ordering::Relaxed);
                    if n > 0 {
                        requests.push((op.as_str(), status.as_str(), n));
                    }
                }
            }
            let figures = Figures {
                connections: c.connections.load(Ordering::Relaxed),
                requests,
            };
            (name.clone(), figures)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_connections_are_counted_per_volume_until_forgotten() {
        let c = counters("stats-test-a");
        c.request(Op::Read, Status::Ok);
        c.request(Op::Read, Status::Ok);
        c.request(Op::Other, Status::Unsupp);
        let served = c.connected();
        let figures = &snapshot()["stats-test-a"];
        assert_eq!(figures.connections, 1);
        assert_eq!(
            figures.requests,
            vec![("read", "ok", 2), ("other", "unsupp", 1)]
        );
        drop(served);
        assert_eq!(snapshot()["stats-test-a"].connections, 0);
        forget("stats-test-a");
        assert!(!snapshot().contains_key("stats-test-a"));
    }
}
