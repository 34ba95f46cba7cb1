//! tandem-ha's Prometheus metrics, served on `metrics_listen` (ha.toml; default
//! `127.0.0.1:9943`, next to tandemd's 9942): the managed VMs' state from the agent's last
//! decision, the peers' liveness, and the failovers this agent performed, counted and
//! timed as a histogram (from the dead host's last heartbeat to the VM running here,
//! the `total_ms` of `tandem-ha status`).
//!
//! Every name starts with `tandem_ha_` and every series carries `node`.

use std::borrow::Cow;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::status::AgentStatus;

/// Upper bounds of the failover duration buckets, in seconds.
pub const FAILOVER_BUCKETS: [f64; 12] = [
    1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 300.0,
];

/// The agent's counters; clones share them.
#[derive(Debug, Clone)]
pub struct HaMetrics {
    failovers: Counter,
    failover_duration: Histogram,
}

impl Default for HaMetrics {
    fn default() -> Self {
        HaMetrics {
            failovers: Counter::default(),
            failover_duration: Histogram::new(FAILOVER_BUCKETS),
        }
    }
}

impl HaMetrics {
    /// Count a failover that took `total_ms` (which VM: `tandem-ha events`).
    pub fn failover(&self, total_ms: u64) {
        self.failovers.inc();
        self.failover_duration.observe(total_ms as f64 / 1000.0);
    }

    /// The Prometheus text exposition, with the VM and peer state of `status`.
    pub fn render(&self, status: &AgentStatus) -> String {
        let mut registry = Registry::with_prefix_and_labels(
            "tandem_ha",
            [(Cow::Borrowed("node"), Cow::Owned(status.node.clone()))].into_iter(),
        );
        registry.register(
            "failovers",
            "VMs this agent restarted here after their host failed",
            self.failovers.clone(),
        );
        registry.register(
            "failover_duration_seconds",
            "From the dead host's last heartbeat to the VM running here",
            self.failover_duration.clone(),
        );
        registry.register_collector(Box::new(StatusCollector(status.clone())));
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        out
    }
}

/// The text an agent that has not decided anything yet exports (every family, no series);
/// tests compare dashboards with it.
pub fn render_empty(node: &str) -> String {
    HaMetrics::default().render(&AgentStatus {
        node: node.to_string(),
        ts_ms: 0,
        peers: Vec::new(),
        vms: Vec::new(),
    })
}

/// Gauges from the agent's last status.
#[derive(Debug)]
struct StatusCollector(AgentStatus);

impl Collector for StatusCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let vms = &self.0.vms;
        let mut gauge = |name: &str, help: &str, series: Vec<(Vec<(&str, String)>, i64)>| {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (labels, value) in series {
                ConstGauge::new(value).encode(metric.encode_family(&labels)?)?;
            }
            Ok::<(), std::fmt::Error>(())
        };
        gauge(
            "vm_running_here",
            "1 while the managed VM runs on this node",
            vms.iter()
                .map(|v| (vec![("vm", v.name.clone())], i64::from(v.running_here)))
                .collect(),
        )?;
        gauge(
            "vm_health",
            "The managed VM's health as this agent sees it (1 for the current one)",
            vms.iter()
                .map(|v| {
                    let labels = vec![("vm", v.name.clone()), ("health", v.health.clone())];
                    (labels, 1)
                })
                .collect(),
        )?;
        gauge(
            "vm_eligible",
            "1 when this node could start the VM (all its disks UpToDate with quorum)",
            vms.iter()
                .map(|v| (vec![("vm", v.name.clone())], i64::from(v.eligible)))
                .collect(),
        )?;
        gauge(
            "peer_alive",
            "1 while the peer's agent is heard on the management network",
            self.0
                .peers
                .iter()
                .map(|p| {
                    (
                        vec![("peer", p.node.clone())],
                        i64::from(p.management_alive),
                    )
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{PeerLiveness, VmStatus};

    #[test]
    fn failovers_and_vm_state_are_exported() {
        let metrics = HaMetrics::default();
        metrics.failover(7_500);
        let text = metrics.render(&AgentStatus {
            node: "hv2".into(),
            ts_ms: 0,
            peers: vec![PeerLiveness {
                node: "hv1".into(),
                management_alive: false,
                last_heard_ms_ago: None,
            }],
            vms: vec![VmStatus {
                name: "vm100".into(),
                prefer: vec![],
                running_on: Some("hv2".into()),
                running_here: true,
                health: "running".into(),
                action: "nothing".into(),
                reason: String::new(),
                eligible: true,
                last_failover: None,
            }],
        });
        for line in [
            r#"tandem_ha_failovers_total{node="hv2"} 1"#,
            r#"tandem_ha_failover_duration_seconds_bucket{node="hv2",le="5"} 0"#,
            r#"tandem_ha_failover_duration_seconds_bucket{node="hv2",le="10"} 1"#,
            r#"tandem_ha_vm_running_here{node="hv2",vm="vm100"} 1"#,
            r#"tandem_ha_vm_health{node="hv2",vm="vm100",health="running"} 1"#,
            r#"tandem_ha_peer_alive{node="hv2",peer="hv1"} 0"#,
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
        }
        let empty = render_empty("hv1");
        for family in [
            "tandem_ha_failovers_total counter",
            "tandem_ha_failover_duration_seconds histogram",
            "tandem_ha_vm_running_here gauge",
            "tandem_ha_peer_alive gauge",
        ] {
            assert!(empty.contains(&format!("# TYPE {family}")), "{empty}");
        }
    }
}
