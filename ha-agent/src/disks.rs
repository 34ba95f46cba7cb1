//! The local view of a VM's disks: which Tandem volumes its domain XML uses (the hook's
//! domain-XML reader) and their replication status from this node's tandemd
//! (`volume_status` through the control API's client), and
//! the forced demotion that finishes fencing a VM (`volume_demote` with `force`).

use std::time::Duration;

use control_api::{Client, ClientError, Request};
use libvirt_hook::domain_xml::{parse_domain, tandem_volumes, Endpoints};
use volume_driver::config::Config;

use crate::decide::{DiskView, Disks};

/// How long one status exchange with tandemd may take.
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a forced demotion may take (the engine waits up to 10 s for requests in flight).
pub const DEMOTE_TIMEOUT: Duration = Duration::from_secs(15);

/// The Tandem volumes of a domain XML.
pub fn volumes_of(xml: &str, config: &Config) -> Result<Vec<String>, String> {
    let domain = parse_domain(xml).map_err(|e| format!("domain XML: {e}"))?;
    let disks = tandem_volumes(&domain, &Endpoints::of_node(config)).map_err(|e| e.to_string())?;
    Ok(disks.into_iter().map(|d| d.volume).collect())
}

/// Reads volume status from tandemd, reconnecting after a failure.
pub struct DiskReader {
    socket: std::path::PathBuf,
    client: Option<Client>,
}

impl DiskReader {
    pub fn new(config: &Config) -> DiskReader {
        DiskReader {
            socket: config.control_socket(),
            client: None,
        }
    }

    /// Status of every volume, or the first reason one could not be read.
    pub fn read(&mut self, volumes: &[String]) -> Disks {
        volumes.iter().map(|v| self.read_one(v)).collect()
    }

    /// Make the local replica of `volume` Secondary by force (`volume_demote` with
    /// `force`, i.e. `tandem volume demote --force`, DRBD's `secondary --force`): requests
    /// frozen for lack of quorum fail with an I/O error (none was acknowledged) and the
    /// writer a killed QEMU left open does not block it. For a VM this agent fenced. Own
    /// connection with [`DEMOTE_TIMEOUT`]: the engine waits for requests in flight.
    pub fn demote_force(&mut self, volume: &str) -> Result<(), String> {
        let mut client =
            Client::connect(&self.socket, Some(DEMOTE_TIMEOUT)).map_err(|e| e.to_string())?;
        let request = Request::VolumeDemote {
            name: volume.to_string(),
            force: true,
        };
        client
            .call(&request)
            .map(drop)
            .map_err(|e| format!("{volume}: {e}"))
    }

    fn read_one(&mut self, volume: &str) -> Result<DiskView, String> {
        if self.client.is_none() {
            self.client = Some(
                Client::connect(&self.socket, Some(STATUS_TIMEOUT)).map_err(|e| e.to_string())?,
            );
        }
        let Some(client) = self.client.as_mut() else {
            return Err("no tandemd connection".into());
        };
        match client.status(volume) {
            Ok(status) => Ok(DiskView::from(&status)),
            Err(ClientError::Api(e)) => Err(format!("{volume}: {e}")),
            Err(e) => {
                self.client = None;
                Err(e.to_string())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use control_api::{ConnectionState, DiskState, Role};

    #[test]
    fn the_decision_reads_the_typed_status() {
        let status: control_api::VolumeStatus = serde_json::from_value(serde_json::json!({
            "volume":"vm-1-disk-0","node":"hv2","role":"Secondary","disk_state":"UpToDate",
            "protocol":"C","quorum":false,"quorum_reason":"1 of 3 voters reachable",
            "io_suspended":true,"allow_two_primaries":false,"size_bytes":1,
            "peers":[{"node":"hv1","diskless":false,"connection":"Connecting","role":"Unknown",
                      "disk_state":"DUnknown","replication":"Off","out_of_sync_bytes":0}],
            "last_verify":null,"promoted_explicitly":false,"open_writers":0}))
        .unwrap();
        let d = DiskView::from(&status);
        assert!(!d.quorum && d.io_suspended);
        assert_eq!(d.quorum_reason, "1 of 3 voters reachable");
        assert_eq!(d.disk_state, DiskState::UpToDate);
        assert_eq!(d.peers[0].connection, ConnectionState::Connecting);
        assert_eq!(d.peers[0].role, Role::Unknown);
    }

    #[test]
    fn finds_the_tandem_volumes_of_a_domain() {
        let config = Config::parse(
            "node = \"hv1\"\n[[nodes]]\nname = \"hv1\"\ncontrol = \"10.0.0.1:7700\"\nreplication = \"10.1.0.1:7788\"\n[[pools]]\nname = \"files\"\nbackend = \"file\"\npath = \"/var/lib/tandem/images\"\n",
            std::path::Path::new("t.toml"),
        )
        .unwrap();
        let xml = format!(
            "<domain type='qemu'><name>vm1</name><devices>\
             <disk type='network' device='disk'><source protocol='nbd' name='vm-1-disk-0'>\
             <host transport='unix' socket='{}'/></source><target dev='vda'/></disk>\
             <disk type='file' device='disk'><source file='/x.img'/><target dev='vdb'/></disk>\
             </devices></domain>",
            config.nbd_socket().display()
        );
        assert_eq!(volumes_of(&xml, &config).unwrap(), ["vm-1-disk-0"]);
    }
}
