//! `tandem-ha`: the HA agent, one per host. It restarts a dead host's VMs on a survivor that
//! holds UpToDate replicas of all their disks with quorum, never on two hosts at once, and
//! destroys the VMs of a host that lost quorum (fencing itself).
//!
//! Modules: [`config`] (the cluster config plus `ha.toml`), [`registry`] (managed VMs with
//! their domain XML, replicated between agents), [`wire`] (authenticated agent protocol on
//! the management network), [`decide`] (the pure failover decision), [`disks`] (a VM's
//! volumes and their status from tandemd), [`hypervisor`] (libvirt through the `virt`
//! crate), [`agent`] (the loop tying them together), [`events`] (the JSON-lines events
//! log), [`status`] (what `tandem-ha status` shows), [`watchdog`] (kills frozen VMs if the
//! agent hangs), [`placement`] (where VMs ran and pending demotions, kept across agent
//! restarts), [`persist`] (atomic small files).

pub mod agent;
pub mod config;
pub mod decide;
pub mod disks;
pub mod events;
pub mod hypervisor;
pub mod metrics;
pub mod persist;
pub mod placement;
pub mod registry;
pub mod status;
pub mod watchdog;
pub mod wire;
