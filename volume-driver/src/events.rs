//! The daemon's side of `tandem events`: turns successive status snapshots into
//! [`Event`]s and hands them to every open `events` stream.
//!
//! ```text
//! EventHub::run ── every SAMPLE: status_all() ── objects() ── diff(old, new) ──┐
//!                  every PROGRESS while resyncing: progress() ──────────────────┤
//!                                                                  broadcast ───┴─> streams
//! EventHub::subscribe ── exists(current objects) + a receiver, taken under one lock
//! ```
//!
//! Objects are a volume's local replica and each of its peers; their properties are the
//! DRBD words `drbdsetup events2` prints (`role`, `disk`, `connection`, `replication`,
//! `peer-disk`, ...). A `change` carries the properties that changed. Out-of-sync bytes move
//! with every write while a peer is away, so they are not a property; they travel with the
//! resync progress (`done`, `out-of-sync`), sent when a resync starts and every
//! [`PROGRESS`] while it runs.
//!
//! The hub samples the engine's status every [`SAMPLE`] while at least one stream is open
//! (and not at all otherwise); clients never poll. A stream that falls more than
//! [`BACKLOG`] batches behind is closed, and `tandem events` reconnects and starts again
//! with `exists` events.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use control_api::{ConnectionState, Event, EventKind, EventObject, Role, VolumeStatus};
use tokio::sync::{broadcast, Notify};

/// How often the hub compares the status with the last one.
pub const SAMPLE: Duration = Duration::from_millis(200);
/// How often a running resync reports its progress.
pub const PROGRESS: Duration = Duration::from_secs(2);
/// Batches a stream may fall behind before it is closed.
pub const BACKLOG: usize = 1024;

/// A volume (`peer: None`) or one of its peers.
type ObjectKey = (String, Option<String>);
type Properties = BTreeMap<String, String>;
/// Every object with its properties.
pub type Objects = BTreeMap<ObjectKey, Properties>;

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_string()
}

fn props<const N: usize>(pairs: [(&str, String); N]) -> Properties {
    pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

/// The objects of `statuses` and their properties (pure).
pub fn objects(statuses: &[VolumeStatus]) -> Objects {
    let mut out = Objects::new();
    for s in statuses {
        let r = &s.replica;
        let mut volume = props([
            ("role", r.role.to_string()),
            ("disk", r.disk_state.to_string()),
            ("quorum", yes_no(r.quorum)),
            ("suspended", yes_no(r.io_suspended)),
        ]);
        if r.role == Role::Primary {
            // Why it is Primary: `tandem volume promote`, or a writer opened it.
            let how = if s.promoted_explicitly {
                "explicit"
            } else {
                "auto"
            };
            volume.insert("promotion".into(), how.into());
        }
        out.insert((r.volume.clone(), None), volume);
        for p in &r.peers {
            let mut peer = props([
                ("connection", p.connection.to_string()),
                ("role", p.role.to_string()),
                ("peer-disk", p.disk_state.to_string()),
                ("replication", p.replication.to_string()),
                ("split-brain", yes_no(p.split_brain.is_some())),
            ]);
            if let Some(e) = &p.last_error {
                if p.connection != ConnectionState::Connected {
                    peer.insert("reason".into(), e.clone());
                }
            }
            out.insert((r.volume.clone(), Some(p.node.clone())), peer);
        }
    }
    out
}

fn event(time_ms: u64, kind: EventKind, key: &ObjectKey, properties: Properties) -> Event {
    Event {
        time_ms,
        kind,
        object: if key.1.is_some() {
            EventObject::Peer
        } else {
            EventObject::Volume
        },
        volume: key.0.clone(),
        peer: key.1.clone(),
        properties,
    }
}

/// `exists` events for every object, then the end marker (pure).
pub fn exists(objects: &Objects, time_ms: u64) -> Vec<Event> {
    let mut out: Vec<Event> = objects
        .iter()
        .map(|(k, p)| event(time_ms, EventKind::Exists, k, p.clone()))
        .collect();
    out.push(Event::end(time_ms));
    out
}

/// What changed from `old` to `new` (pure): `destroy` for objects gone, `create` for new
/// ones, `change` with the changed properties for the others. Volumes come before their
/// peers on creation and after them on destruction.
pub fn diff(old: &Objects, new: &Objects, time_ms: u64) -> Vec<Event> {
    let mut out = Vec::new();
    for (key, _) in old.iter().rev().filter(|(k, _)| !new.contains_key(*k)) {
        out.push(event(time_ms, EventKind::Destroy, key, Properties::new()));
    }
    for (key, props) in new {
        match old.get(key) {
            None => out.push(event(time_ms, EventKind::Create, key, props.clone())),
            Some(before) => {
                let mut changed: Properties = props
                    .iter()
                    .filter(|(k, v)| before.get(*k) != Some(*v))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                // A property that disappeared (e.g. `promotion` on demotion) reads as "-".
                for k in before.keys().filter(|k| !props.contains_key(*k)) {
                    changed.insert(k.clone(), "-".into());
                }
                if !changed.is_empty() {
                    out.push(event(time_ms, EventKind::Change, key, changed));
                }
            }
        }
    }
    out
}

/// Resync progress of every peer a resync runs with (pure): `done` in percent of the
/// resync's total, `out-of-sync` bytes, the rate and the replication state.
pub fn progress(statuses: &[VolumeStatus], time_ms: u64) -> Vec<Event> {
    let mut out = Vec::new();
    for s in statuses {
        for p in &s.replica.peers {
            let Some(r) = &p.resync else { continue };
            let done = if r.total_bytes == 0 {
                100.0
            } else {
                r.done_bytes as f64 * 100.0 / r.total_bytes as f64
            };
            let key = (s.replica.volume.clone(), Some(p.node.clone()));
            let properties = props([
                ("replication", p.replication.to_string()),
                ("done", format!("{done:.1}")),
                ("out-of-sync", p.out_of_sync_bytes.to_string()),
                ("rate", format!("{}/s", r.bytes_per_sec)),
            ]);
            out.push(event(time_ms, EventKind::Change, &key, properties));
        }
    }
    out
}

/// True when some peer of some volume is resyncing.
fn resyncing(statuses: &[VolumeStatus]) -> bool {
    statuses
        .iter()
        .any(|s| s.replica.peers.iter().any(|p| p.resync.is_some()))
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Where the statuses come from (the service's `status_all`; a closure in tests).
pub type StatusSource = Box<dyn Fn() -> Vec<VolumeStatus> + Send + Sync>;

/// The event source every `events` stream subscribes to.
pub struct EventHub {
    source: StatusSource,
    /// The objects as last reported; locked while reporting, so a subscriber's `exists`
    /// events and its first received batch follow each other without a gap.
    current: Mutex<Objects>,
    tx: broadcast::Sender<Arc<Vec<Event>>>,
    subscribed: Notify,
}

impl EventHub {
    pub fn new(source: StatusSource) -> Arc<EventHub> {
        Arc::new(EventHub {
            source,
            current: Mutex::new(Objects::new()),
            tx: broadcast::channel(BACKLOG).0,
            subscribed: Notify::new(),
        })
    }

    fn current(&self) -> std::sync::MutexGuard<'_, Objects> {
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new stream: the `exists` events (end marker included) and the receiver of
    /// everything after them.
    pub fn subscribe(&self) -> (Vec<Event>, broadcast::Receiver<Arc<Vec<Event>>>) {
        let fresh = objects(&(self.source)());
        let mut current = self.current();
        // Changes since the last report go to the other streams first.
        let changes = diff(&current, &fresh, now_ms());
        if !changes.is_empty() {
            let _ = self.tx.send(Arc::new(changes));
        }
        *current = fresh;
        let rx = self.tx.subscribe();
        let initial = exists(&current, now_ms());
        drop(current);
        self.subscribed.notify_one();
        (initial, rx)
    }

    /// Compare and report forever; idle while no stream is open.
    pub async fn run(self: Arc<Self>) {
        let mut last_progress = tokio::time::Instant::now();
        loop {
            if self.tx.receiver_count() == 0 {
                self.subscribed.notified().await;
                continue;
            }
            self.report(&mut last_progress);
            tokio::time::sleep(SAMPLE).await;
        }
    }

    /// Send what changed since the last report, with resync progress when due.
    fn report(&self, last_progress: &mut tokio::time::Instant) {
        let statuses = (self.source)();
        let fresh = objects(&statuses);
        let time = now_ms();
        let mut current = self.current();
        let mut batch = diff(&current, &fresh, time);
        let resync_started = batch.iter().any(|e| {
            e.properties
                .get("replication")
                .is_some_and(|r| r.starts_with("Sync"))
        });
        if resync_started || (last_progress.elapsed() >= PROGRESS && resyncing(&statuses)) {
            batch.extend(progress(&statuses, time));
            *last_progress = tokio::time::Instant::now();
        }
        if !batch.is_empty() {
            let _ = self.tx.send(Arc::new(batch));
        }
        *current = fresh;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECONDARY: &str = r#"{"volume":"vm-1","node":"hv2","role":"Secondary","disk_state":"UpToDate","protocol":"C","quorum":true,"quorum_reason":"","io_suspended":false,"allow_two_primaries":false,"size_bytes":4096,"current_uuid":"1","peers":[{"node":"hv1","diskless":false,"connection":"Connected","role":"Primary","disk_state":"UpToDate","replication":"Established","out_of_sync_bytes":0,"resync":null,"split_brain":null,"decision":null,"last_error":null}],"last_verify":null,"promoted_explicitly":false,"open_writers":0}"#;

    fn status() -> VolumeStatus {
        serde_json::from_str(SECONDARY).unwrap()
    }

    #[test]
    fn exists_lists_volumes_then_peers_then_the_marker() {
        let lines: Vec<String> = exists(&objects(&[status()]), 0)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            lines,
            [
                "exists volume name=vm-1 disk:UpToDate quorum:yes role:Secondary suspended:no",
                "exists peer name=vm-1 peer=hv1 connection:Connected peer-disk:UpToDate replication:Established role:Primary split-brain:no",
                "exists -",
            ]
        );
    }

    #[test]
    fn a_failover_reads_as_peer_lost_then_promotion() {
        let before = objects(&[status()]);
        let mut s = status();
        s.replica.peers[0].connection = ConnectionState::Connecting;
        s.replica.peers[0].role = Role::Unknown;
        s.replica.peers[0].last_error = Some("link down".into());
        let lost = objects(&[s.clone()]);
        let events = diff(&before, &lost, 0);
        assert_eq!(
            events.iter().map(ToString::to_string).collect::<Vec<_>>(),
            [
                r#"change peer name=vm-1 peer=hv1 connection:Connecting reason:"link down" role:Unknown"#
            ]
        );
        s.replica.role = Role::Primary;
        s.promoted_explicitly = true;
        let promoted = objects(&[s.clone()]);
        let events = diff(&lost, &promoted, 0);
        assert_eq!(
            events[0].to_string(),
            "change volume name=vm-1 promotion:explicit role:Primary"
        );
        // Demotion drops the promotion property.
        let events = diff(&promoted, &lost, 0);
        assert_eq!(
            events[0].to_string(),
            "change volume name=vm-1 promotion:- role:Secondary"
        );
        assert!(diff(&lost, &lost, 0).is_empty());
    }

    #[test]
    fn created_and_deleted_volumes_and_resync_progress() {
        let one = objects(&[status()]);
        let events = diff(&Objects::new(), &one, 0);
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].kind, EventKind::Create);
        assert_eq!(events[0].object, EventObject::Volume);
        let events = diff(&one, &Objects::new(), 0);
        assert_eq!(
            events.iter().map(|e| e.object).collect::<Vec<_>>(),
            [EventObject::Peer, EventObject::Volume]
        );
        let mut s = status();
        s.replica.peers[0].resync = Some(control_api::ResyncProgress {
            done_bytes: 1024,
            total_bytes: 4096,
            bytes_per_sec: 512,
        });
        s.replica.peers[0].out_of_sync_bytes = 3072;
        s.replica.peers[0].replication = control_api::ReplicationState::SyncSource;
        assert_eq!(
            progress(&[s], 0)[0].to_string(),
            "change peer name=vm-1 peer=hv1 done:25.0 out-of-sync:3072 rate:512/s replication:SyncSource"
        );
    }

    #[tokio::test]
    async fn a_subscriber_gets_exists_then_the_changes() {
        let state = Arc::new(Mutex::new(status()));
        let source = Arc::clone(&state);
        let hub = EventHub::new(Box::new(move || {
            vec![source.lock().unwrap_or_else(|e| e.into_inner()).clone()]
        }));
        tokio::spawn(Arc::clone(&hub).run());
        let (initial, mut rx) = hub.subscribe();
        assert_eq!(initial.len(), 3);
        state.lock().unwrap().replica.role = Role::Primary;
        let batch = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(batch[0].properties["role"], "Primary");
        assert_eq!(batch[0].properties["promotion"], "auto");
    }
}
