//! The replicated-volume engine.
//!
//! This crate owns everything that makes a Tandem volume a *replicated* volume: the peer
//! wire protocol, protocols A/B/C, per-replica metadata (generation UUIDs, bitmaps,
//! write-intent tracking), the connect-time sync decision, resync and online verify, roles,
//! quorum and the dual-primary gate.
//!
//! It knows nothing of libvirt, Proxmox, LVM or NBD. It sees a [`device::BackingDevice`]
//! (the local disk of a replica) and peers (byte streams). Frontends such as the NBD server
//! in `volume-driver` sit on top of it.

pub mod activity_log;
pub mod bitmap;
pub mod device;
pub mod generation;
pub mod metadata;
pub mod quorum;
pub mod role;
pub mod sync_decision;
