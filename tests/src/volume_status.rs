//! Reading `tandem volume status NAME --json` from tests: the entry of one peer, the data
//! (not diskless) peer, and whether a split brain is reported.

use serde_json::Value;

/// The status entry of peer `node`, or `Value::Null` if the status does not list it.
pub fn peer(status: &Value, node: &str) -> Value {
    status["peers"]
        .as_array()
        .and_then(|peers| peers.iter().find(|p| p["node"] == node).cloned())
        .unwrap_or(Value::Null)
}

/// The status entry of the data (not diskless) peer of a two-replica volume.
pub fn data_peer(status: &Value) -> Value {
    status["peers"]
        .as_array()
        .and_then(|peers| peers.iter().find(|p| p["diskless"] != true).cloned())
        .unwrap_or(Value::Null)
}

/// A split brain as status reports it: a peer with a non-null `split_brain` explanation,
/// or a connection state naming it. Returns "peer NODE: EXPLANATION (CONNECTION)".
pub fn split_brain(status: &Value) -> Option<String> {
    status["peers"].as_array()?.iter().find_map(|peer| {
        let connection = peer["connection"].as_str().unwrap_or_default();
        if !peer["split_brain"].is_null() || connection.to_ascii_lowercase().contains("splitbrain")
        {
            Some(format!(
                "peer {}: {} ({})",
                peer["node"], peer["split_brain"], connection
            ))
        } else {
            None
        }
    })
}

/// Whether the local replica is UpToDate and peer `node` is Connected and UpToDate.
pub fn in_sync_with(status: &Value, node: &str) -> bool {
    let p = peer(status, node);
    status["disk_state"] == "UpToDate"
        && p["connection"] == "Connected"
        && p["disk_state"] == "UpToDate"
        && p["out_of_sync_bytes"] == 0
}

/// A `tandem volume status --json` of a Secondary that is UpToDate and connected to every
/// peer with nothing out of sync.
pub fn secondary_and_in_sync(status: &Value) -> bool {
    status["role"] == "Secondary"
        && status["disk_state"] == "UpToDate"
        && status["peers"].as_array().is_some_and(|peers| {
            peers
                .iter()
                .all(|p| p["connection"] == "Connected" && p["out_of_sync_bytes"] == 0)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_and_split_brain_are_read_from_status_json() {
        let status = serde_json::json!({
            "role": "Primary", "disk_state": "UpToDate",
            "peers": [
                {"node": "witness", "diskless": true, "connection": "Connected", "split_brain": null},
                {"node": "hv2", "diskless": false, "connection": "Connected", "disk_state": "UpToDate",
                 "out_of_sync_bytes": 0, "split_brain": null}
            ]
        });
        assert_eq!(split_brain(&status), None);
        assert_eq!(data_peer(&status)["node"], "hv2");
        assert_eq!(peer(&status, "witness")["diskless"], true);
        assert!(peer(&status, "hv9").is_null());
        assert!(in_sync_with(&status, "hv2"));
        let mut broken = status.clone();
        broken["peers"][1]["split_brain"] =
            "split brain: run tandem volume resolve chaos --discard-local".into();
        assert!(split_brain(&broken).unwrap().contains("hv2"));
    }
}
