//! The event stream (`tandem events`, the `events` request): one [`Event`] per state
//! change, the way `drbdsetup events2` reports them.
//!
//! After an `events` request the daemon answers with one `{"type":"event",...}` reply per
//! line for as long as the connection stays open: first an `exists` event for every object
//! (a volume, or a volume's peer), then the end marker (`exists -`), then `create`,
//! `change` (only the properties that changed) and `destroy` events as they happen. With
//! `now` it closes the connection after the marker. A `change` of a peer carrying `done`
//! and `out-of-sync` is resync progress, sent every few seconds while a resync runs.
//!
//! ```text
//! exists volume name=vm-1 role:Secondary disk:UpToDate quorum:yes suspended:no
//! exists peer name=vm-1 peer=hv1 connection:Connected role:Primary peer-disk:UpToDate ...
//! exists -
//! change peer name=vm-1 peer=hv1 connection:Connecting role:Unknown peer-disk:DUnknown
//! change volume name=vm-1 role:Primary promotion:explicit
//! ```

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// What happened to the object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// The object existed when the stream started.
    Exists,
    Create,
    Change,
    Destroy,
}

/// Which object an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventObject {
    /// A volume's local replica (DRBD's resource and device).
    Volume,
    /// One peer of a volume (DRBD's connection and peer device).
    Peer,
    /// The end of the initial `exists` events (`exists -`).
    #[serde(rename = "-")]
    End,
}

/// One line of the event stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// When the daemon saw it, Unix time in milliseconds.
    pub time_ms: u64,
    pub kind: EventKind,
    pub object: EventObject,
    /// Empty for the end marker.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub volume: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// DRBD-style properties (`role`, `disk`, `connection`, `replication`, `done`, ...);
    /// a `change` carries only those that changed.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub properties: BTreeMap<String, String>,
}

impl Event {
    /// The end marker after the initial `exists` events.
    pub fn end(time_ms: u64) -> Event {
        Event {
            time_ms,
            kind: EventKind::Exists,
            object: EventObject::End,
            volume: String::new(),
            peer: None,
            properties: BTreeMap::new(),
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EventKind::Exists => "exists",
            EventKind::Create => "create",
            EventKind::Change => "change",
            EventKind::Destroy => "destroy",
        })
    }
}

/// The human line, `drbdsetup events2` style.
impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let object = match self.object {
            EventObject::End => return write!(f, "{} -", self.kind),
            EventObject::Volume => "volume",
            EventObject::Peer => "peer",
        };
        write!(f, "{} {object} name={}", self.kind, self.volume)?;
        if let Some(peer) = &self.peer {
            write!(f, " peer={peer}")?;
        }
        for (key, value) in &self.properties {
            if value.contains(' ') {
                write!(f, " {key}:{value:?}")?;
            } else {
                write!(f, " {key}:{value}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_print_like_drbdsetup_and_keep_their_wire_form() {
        let event = Event {
            time_ms: 1,
            kind: EventKind::Change,
            object: EventObject::Peer,
            volume: "vm-1".into(),
            peer: Some("hv1".into()),
            properties: [
                ("connection".to_string(), "Connecting".to_string()),
                ("reason".to_string(), "link down".to_string()),
            ]
            .into(),
        };
        assert_eq!(
            event.to_string(),
            r#"change peer name=vm-1 peer=hv1 connection:Connecting reason:"link down""#
        );
        let json = serde_json::to_string(&event).unwrap();
        assert_eq!(
            json,
            r#"{"time_ms":1,"kind":"change","object":"peer","volume":"vm-1","peer":"hv1","properties":{"connection":"Connecting","reason":"link down"}}"#
        );
        assert_eq!(serde_json::from_str::<Event>(&json).unwrap(), event);
        assert_eq!(Event::end(2).to_string(), "exists -");
        assert_eq!(
            serde_json::to_string(&Event::end(2)).unwrap(),
            r#"{"time_ms":2,"kind":"exists","object":"-"}"#
        );
    }
}
