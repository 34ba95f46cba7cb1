//! The events log: one JSON object per line in `<state_dir>/ha/events.jsonl`, a machine
//! stream apart from the human log (`tracing` on stderr). Each event has a timestamp, the
//! node that emitted it (`source`), an event name and free-form properties:
//!
//! ```json
//! {"ts_ms":1763726400123,"source":"hv2","event":"failover","properties":{"vm":"vm1","from":"hv1","total_ms":4210}}
//! ```
//!
//! Event names: `agent_started`, `peer_up`, `peer_down` (management network), `managed`,
//! `unmanaged`, `decision` (an action other than nothing, with its reason), `fence_peer`,
//! `fenced` (a VM destroyed for lack of quorum), `demoted` / `demote_failed` (its volumes
//! made Secondary by force after a fence), `start_failed`, `defined`, `started`, `failover`,
//! `watchdog_kill`, `placement_save_failed` / `placement_saved`.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub ts_ms: u64,
    pub source: String,
    pub event: String,
    #[serde(default)]
    pub properties: serde_json::Map<String, serde_json::Value>,
}

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Appends events to the log file.
pub struct EventLog {
    path: PathBuf,
    source: String,
}

impl EventLog {
    pub fn new(path: PathBuf, source: &str) -> EventLog {
        EventLog {
            path,
            source: source.to_string(),
        }
    }

    /// Append one event (also logged at info). A write failure is logged, not fatal: the
    /// agent's job is failover, not bookkeeping.
    pub fn emit(&self, event: &str, properties: serde_json::Value) {
        let properties = match properties {
            serde_json::Value::Object(map) => map,
            _ => serde_json::Map::new(),
        };
        let e = Event {
            ts_ms: now_ms(),
            source: self.source.clone(),
            event: event.to_string(),
            properties,
        };
        tracing::info!(event, properties = %serde_json::Value::Object(e.properties.clone()), "event");
        if let Err(err) = self.append(&e) {
            tracing::warn!(path = %self.path.display(), error = %err, "cannot write the events log");
        }
    }

    fn append(&self, e: &Event) -> std::io::Result<()> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut line = serde_json::to_vec(e).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        f.write_all(&line)?;
        f.sync_data()
    }
}

/// Read every well-formed event from `path` (a torn last line after a crash is skipped).
pub fn read_events(path: &Path) -> std::io::Result<Vec<Event>> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut events = Vec::new();
    for line in std::io::BufReader::new(file).lines() {
        if let Ok(e) = serde_json::from_str::<Event>(&line?) {
            events.push(e);
        }
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ha/events.jsonl");
        let log = EventLog::new(path.clone(), "hv1");
        log.emit("peer_down", serde_json::json!({"peer": "hv2"}));
        log.emit(
            "failover",
            serde_json::json!({"vm": "vm1", "total_ms": 4000}),
        );
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"ts_ms\":1,\"sou")
            .unwrap();
        let events = read_events(&path).unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(events[1].event, "failover");
        assert_eq!(events[1].source, "hv1");
        assert_eq!(events[1].properties["total_ms"], 4000);
    }
}
