//! Tandem's local control API: the request, response and status types spoken on
//! `<run_dir>/tandemd.sock`, and the one client of that socket.
//!
//! `tandemd` serves these types; `tandem`, `tandem-libvirt-hook` and `tandem-ha` send and
//! read them through [`Client`]. `tandem --json` prints the result types unchanged, so
//! their field names and values are a stable interface (the Proxmox plugin parses them).
//!
//! Transport: newline-delimited JSON, one [`Request`] line answered by one [`Response`]
//! line, any number of exchanges per connection, in order; a line is at most [`MAX_LINE`]
//! bytes.
//!
//! ```text
//! → {"request":"volume_create","name":"v1","size_bytes":67108864,"pool":null}
//! ← {"status":"ok","result":{"type":"volume","volume":{"name":"v1","pool":"files",...}}}
//! → {"request":"volume_show","name":"nope"}
//! ← {"status":"error","error":{"kind":"not_found","message":"volume 'nope' does not exist"}}
//! ```
//!
//! Versioning: requests are tagged by `request` name. New requests and new optional fields
//! are added without breaking old clients; a daemon answers a request it does not know with
//! kind `bad_request`, and a client maps an error kind it does not know to
//! [`ErrorKind::Unknown`].
//!
//! Modules: [`request`] (what a client asks), [`response`] (what the daemon answers and
//! its errors), [`status`] (a volume's replication status), [`options`] (per-volume
//! replication options), [`events`] (the state-change stream), [`client`] (the blocking
//! client with timeouts).
//!
//! Why this crate depends on `tandem-replication`: the status the daemon reports *is* the
//! engine's [`ReplicaStatus`] with its [`Role`], [`DiskState`], [`ConnectionState`] and
//! [`ReplicationState`] enums (serialized in DRBD's spelling), and the options are the
//! engine's `Protocol`, `OnNoQuorum` and `AfterSplitBrain`. Re-exporting them keeps one
//! definition of each, so the daemon hands the engine's status to the wire without a
//! translation. The dependency points the allowed way (DESIGN.md: `replication` imports
//! from no other crate); the hook and the agent already built on the engine through
//! `tandem-volume-driver`.

pub mod client;
pub mod events;
pub mod options;
pub mod request;
pub mod response;
pub mod status;

pub use client::{Client, ClientError, EventStream};
pub use events::{Event, EventKind, EventObject};
pub use options::{OptionsChange, VolumeOptions};
pub use replication::role::{ConnectionState, DiskState, Protocol, ReplicationState, Role};
pub use request::Request;
pub use response::{
    ApiError, ErrorKind, EvictMove, EvictStep, NodeConfig, NodeInfo, NodeListEntry, PoolInfo,
    Reply, Response, SnapshotInfo, VolumeInfo, VolumeState,
};
pub use status::{PeerStatus, ReplicaStatus, ResyncProgress, VerifySummary, VolumeStatus};

/// Longest request or response line accepted (bytes, without the newline).
pub const MAX_LINE: usize = 1 << 20;
