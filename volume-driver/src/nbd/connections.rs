//! How many NBD clients each export has open in this process, for the metrics exporter.
//!
//! Counted when a client finishes the handshake and released when its connection ends
//! (a guard), never per request. Process-wide, because every listener (unix and TCP) serves
//! the same exports.

use std::collections::BTreeMap;
use std::sync::Mutex;

static OPEN: Mutex<BTreeMap<String, u64>> = Mutex::new(BTreeMap::new());

fn open_map() -> std::sync::MutexGuard<'static, BTreeMap<String, u64>> {
    OPEN.lock().unwrap_or_else(|e| e.into_inner())
}

/// One open connection to an export; dropping it closes the count.
pub struct Connection {
    export: String,
}

impl Connection {
    /// Count a client of `export`.
    pub fn open(export: &str) -> Connection {
        *open_map().entry(export.to_string()).or_default() += 1;
        Connection {
            export: export.to_string(),
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        let mut map = open_map();
        if let Some(n) = map.get_mut(&self.export) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.export);
            }
        }
    }
}

/// Open connections per export name (exports without clients are absent).
pub fn open_connections() -> BTreeMap<String, u64> {
    open_map().clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_counts_until_it_is_dropped() {
        let a = Connection::open("connections-test-a");
        let b = Connection::open("connections-test-a");
        assert_eq!(open_connections().get("connections-test-a"), Some(&2));
        drop(a);
        assert_eq!(open_connections().get("connections-test-a"), Some(&1));
        drop(b);
        assert_eq!(open_connections().get("connections-test-a"), None);
    }
}
