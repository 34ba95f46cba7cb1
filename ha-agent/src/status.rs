//! What `tandem-ha status` shows: the agent's view of its peers and, per managed VM, where
//! it runs, its health, the current decision and its reason, and the last failover this
//! agent performed with how long it took.

use serde::{Deserialize, Serialize};

/// One agent's status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentStatus {
    pub node: String,
    pub ts_ms: u64,
    pub peers: Vec<PeerLiveness>,
    pub vms: Vec<VmStatus>,
}

/// A peer as seen on the management network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerLiveness {
    pub node: String,
    pub management_alive: bool,
    /// Milliseconds since we last heard from it (None: never).
    pub last_heard_ms_ago: Option<u64>,
}

/// One managed VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    pub name: String,
    pub prefer: Vec<String>,
    /// Where it runs, as far as this agent knows.
    pub running_on: Option<String>,
    /// It is active on this node's libvirt.
    pub running_here: bool,
    /// `running`, `running without quorum`, `stopped`, `host down`, ...
    pub health: String,
    /// `nothing`, `wait`, `start`, `fence`.
    pub action: String,
    pub reason: String,
    /// This node could start it (all disks UpToDate with quorum).
    pub eligible: bool,
    pub last_failover: Option<Failover>,
}

/// A failover performed by this agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failover {
    pub vm: String,
    pub from: String,
    pub to: String,
    /// When the VM was running again here (ms since the epoch).
    pub at_ms: u64,
    /// From the dead host's last heartbeat to the decision to start here.
    pub detect_ms: u64,
    /// From the dead host's last heartbeat to the VM running here: the failover time
    /// (the host died at most one heartbeat interval after its last heartbeat).
    pub total_ms: u64,
}

/// The human table.
pub fn render(status: &AgentStatus) -> String {
    let mut out = format!("node {}\n", status.node);
    for p in &status.peers {
        let heard = match p.last_heard_ms_ago {
            Some(ms) => format!("last heard {:.1} s ago", ms as f64 / 1000.0),
            None => "never heard".into(),
        };
        let state = if p.management_alive { "alive" } else { "DEAD" };
        out.push_str(&format!("  peer {:<12} {state:<6} ({heard})\n", p.node));
    }
    if status.vms.is_empty() {
        out.push_str("no managed VMs (tandem-ha manage DOMAIN)\n");
    }
    for vm in &status.vms {
        out.push_str(&format!(
            "{} runs on {}  health: {}\n",
            vm.name,
            vm.running_on.as_deref().unwrap_or("-"),
            vm.health
        ));
        if !vm.prefer.is_empty() {
            out.push_str(&format!("  prefer: {}\n", vm.prefer.join(",")));
        }
        out.push_str(&format!("  {}: {}\n", vm.action, vm.reason));
        if let Some(f) = &vm.last_failover {
            out.push_str(&format!(
                "  last failover: {} -> {} in {:.1} s (detected after {:.1} s)\n",
                f.from,
                f.to,
                f.total_ms as f64 / 1000.0,
                f.detect_ms as f64 / 1000.0
            ));
        }
    }
    out
}
