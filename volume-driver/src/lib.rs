//! The Tandem node: the daemon `tandemd`, the CLI `tandem`, and what they share.
//!
//! `tandemd` owns the host's storage pools, the volume definitions under `state_dir`, one
//! replication engine per volume, the control API on `<run_dir>/tandemd.sock` and the
//! frontends that serve volumes to QEMU. `tandem` is a thin client of the control API.

pub mod cli;
pub mod cluster;
pub mod config;
pub mod engine;
pub mod engine_adapter;
pub mod engine_config;
pub mod events;
pub mod evict;
pub mod frontend;
pub mod linked_clone;
pub mod links;
pub mod local_export;
pub mod membership;
pub mod membership_log;
pub mod metrics;
pub mod metrics_http;
pub mod names;
pub mod nbd;
pub mod options;
pub mod peer;
pub mod phases;
pub mod pool;
pub mod reload;
pub mod rename;
pub mod replicated_export;
pub mod report;
pub mod rollback;
pub mod server;
pub mod service;
pub mod snapshot;
pub mod snapshot_pending;
pub mod store;
pub mod test_switch;
pub mod units;
pub mod vhost;
