//! tandemd's Prometheus metrics: what one scrape reports, built from a [`Snapshot`] of the
//! daemon (volume statuses, pool usage, the engine's I/O statistics, NBD connections) and
//! encoded in the Prometheus text format with `prometheus-client`.
//!
//! Every name starts with `tandem_` and every series carries `node`. The families follow
//! drbd-reactor's (resource, connection, device, peer device) with Tandem's words for the
//! labels (`volume`, `peer`, `pool`; its `lowerpending` and `upperpending` are
//! `device_lower_pending` and `device_upper_pending`), plus what drbd-reactor lacks:
//! latency histograms (`tandem_io_latency_seconds`, split into the local disk and the peer
//! acknowledgement), resync rate and ETA, pool capacity, NBD connections, and the
//! vhost-user-blk frontends served and requests answered (by type and status). States are
//! state sets, DRBD's spelling in the label, exactly one series at 1:
//! `tandem_volume_role{volume="vm-1",role="Primary"} 1`.
//!
//! Nothing here runs on the data path: the data path only adds to atomics
//! ([`replication::stats`]); a scrape reads them.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use control_api::{ConnectionState, DiskState, PoolInfo, ReplicationState, Role, VolumeStatus};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeGaugeValue, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use replication::stats::{HistogramSnapshot, IoStats};

use crate::service::VolumeService;

/// Everything one scrape reports, taken from the daemon before encoding.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub node: String,
    pub statuses: Vec<VolumeStatus>,
    pub pools: Vec<PoolInfo>,
    /// The engine's I/O statistics, by volume.
    pub io: Vec<(String, Arc<IoStats>)>,
    /// Open NBD connections, by export (volume) name.
    pub nbd_connections: BTreeMap<String, u64>,
    /// The vhost-user-blk frontend's counters, by volume.
    pub vhost: BTreeMap<String, crate::vhost::stats::Figures>,
}

impl Snapshot {
    /// The daemon's state as one scrape reports it.
    pub async fn take(service: &VolumeService) -> Snapshot {
        Snapshot {
            node: service.config().node.clone(),
            statuses: service.status_all(),
            pools: service.pools().await,
            io: service.io_stats_all(),
            nbd_connections: crate::nbd::connections::open_connections(),
            vhost: crate::vhost::stats::snapshot(),
        }
    }
}

/// The Prometheus text exposition (format 0.0.4) of `snapshot`.
pub fn render(snapshot: Snapshot) -> String {
    let node = snapshot.node.clone();
    let mut registry = Registry::with_prefix_and_labels(
        "tandem",
        [(Cow::Borrowed("node"), Cow::Owned(node))].into_iter(),
    );
    registry.register_collector(Box::new(snapshot));
    let mut out = String::new();
    // Writing into a String cannot fail; an encoder error would be a bug in a label.
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry) {
        tracing::error!(error = %e, "encoding metrics failed");
    }
    out
}

/// The labels of one series.
type Labels = Vec<(&'static str, String)>;

/// One metric family being written: its descriptor once, then its series.
struct Family<'a, 'b> {
    encoder: &'b mut DescriptorEncoder<'a>,
}

impl<'a> Family<'a, '_> {
    /// One family of `kind`: its descriptor, then each series.
    fn family<M: EncodeMetric>(
        &mut self,
        name: &str,
        help: &str,
        kind: MetricType,
        series: impl IntoIterator<Item = (Labels, M)>,
    ) -> Result<(), std::fmt::Error> {
        let mut metric = self.encoder.encode_descriptor(name, help, None, kind)?;
        for (labels, value) in series {
            value.encode(metric.encode_family(&labels)?)?;
        }
        Ok(())
    }

    fn gauges<V: EncodeGaugeValue + std::fmt::Debug>(
        &mut self,
        name: &str,
        help: &str,
        series: impl IntoIterator<Item = (Labels, V)>,
    ) -> Result<(), std::fmt::Error> {
        let series = series.into_iter().map(|(l, v)| (l, ConstGauge::new(v)));
        self.family(name, help, MetricType::Gauge, series)
    }

    fn counters(
        &mut self,
        name: &str,
        help: &str,
        series: impl IntoIterator<Item = (Labels, u64)>,
    ) -> Result<(), std::fmt::Error> {
        let series = series.into_iter().map(|(l, v)| (l, ConstCounter::new(v)));
        self.family(name, help, MetricType::Counter, series)
    }

    fn histograms(
        &mut self,
        name: &str,
        help: &str,
        series: impl IntoIterator<Item = (Labels, HistogramSnapshot)>,
    ) -> Result<(), std::fmt::Error> {
        let mut metric = self
            .encoder
            .encode_descriptor(name, help, None, MetricType::Histogram)?;
        for (labels, h) in series {
            metric
                .encode_family(&labels)?
                .encode_histogram::<NoLabelSet>(h.sum_seconds, h.count, &h.buckets, None)?;
        }
        Ok(())
    }
}

fn flag(b: bool) -> i64 {
    i64::from(b)
}

/// A byte count or other unsigned figure as a gauge value.
fn int(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn volume(s: &VolumeStatus) -> Labels {
    vec![("volume", s.replica.volume.clone())]
}

/// Series of a state set: one per possible state, 1 for the current one.
fn state_set<T: Copy + PartialEq>(
    base: Labels,
    label: &'static str,
    all: &[T],
    name: impl Fn(T) -> &'static str,
    current: T,
) -> Vec<(Labels, i64)> {
    all.iter()
        .map(|&state| {
            let mut labels = base.clone();
            labels.push((label, name(state).to_string()));
            (labels, flag(state == current))
        })
        .collect()
}

/// DRBD's "may promote": this replica could become Primary now.
fn may_promote(s: &VolumeStatus) -> bool {
    let r = &s.replica;
    r.role == Role::Secondary
        && r.disk_state == DiskState::UpToDate
        && r.quorum
        && (r.allow_two_primaries
            || !r
                .peers
                .iter()
                .any(|p| p.connection == ConnectionState::Connected && p.role == Role::Primary))
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut f = Family {
            encoder: &mut encoder,
        };
        self.encode_volumes(&mut f)?;
        self.encode_peers(&mut f)?;
        self.encode_io(&mut f)?;
        self.encode_pools(&mut f)?;
        f.gauges(
            "nbd_connections",
            "Open NBD client connections per volume",
            self.nbd_connections
                .iter()
                .map(|(v, n)| (vec![("volume", v.clone())], int(*n))),
        )?;
        self.encode_vhost(&mut f)
    }
}

impl Snapshot {
    /// drbd-reactor's resource and device families.
    fn encode_volumes(&self, f: &mut Family) -> Result<(), std::fmt::Error> {
        let st = &self.statuses;
        f.gauges(
            "volume_role",
            "Role of the local replica (state set: 1 for the current role)",
            st.iter().flat_map(|s| {
                state_set(volume(s), "role", Role::ALL, Role::as_str, s.replica.role)
            }),
        )?;
        f.gauges(
            "volume_suspended",
            "1 while I/O is frozen (no quorum with on_no_quorum = suspend-io)",
            st.iter().map(|s| (volume(s), flag(s.replica.io_suspended))),
        )?;
        f.gauges(
            "volume_quorum",
            "1 while the local replica has quorum",
            st.iter().map(|s| (volume(s), flag(s.replica.quorum))),
        )?;
        f.gauges(
            "volume_may_promote",
            "1 when the local replica could be promoted now (Secondary, UpToDate, quorum, no other Primary)",
            st.iter().map(|s| (volume(s), flag(may_promote(s)))),
        )?;
        f.gauges(
            "device_disk_state",
            "State of the local disk (state set: 1 for the current state)",
            st.iter().flat_map(|s| {
                state_set(
                    volume(s),
                    "disk_state",
                    DiskState::ALL,
                    DiskState::as_str,
                    s.replica.disk_state,
                )
            }),
        )?;
        f.gauges(
            "device_open",
            "Writable frontend handles (NBD clients, vhost-user-blk frontends) open on this node",
            st.iter().map(|s| (volume(s), int(s.open_writers as u64))),
        )?;
        f.gauges(
            "device_size_bytes",
            "Volume size",
            st.iter().map(|s| (volume(s), int(s.replica.size_bytes))),
        )
    }

    /// drbd-reactor's connection and peer-device families, with resync rate and ETA.
    fn encode_peers(&self, f: &mut Family) -> Result<(), std::fmt::Error> {
        let peers: Vec<(Labels, &control_api::PeerStatus)> = self
            .statuses
            .iter()
            .flat_map(|s| {
                s.replica.peers.iter().map(move |p| {
                    let mut labels = volume(s);
                    labels.push(("peer", p.node.clone()));
                    (labels, p)
                })
            })
            .collect();
        f.gauges(
            "connection_state",
            "State of the link to a peer (state set: 1 for the current state)",
            peers.iter().flat_map(|(l, p)| {
                state_set(
                    l.clone(),
                    "state",
                    ConnectionState::ALL,
                    ConnectionState::as_str,
                    p.connection,
                )
            }),
        )?;
        f.gauges(
            "peer_device_replication_state",
            "Replication state towards a peer (state set; SyncSource/SyncTarget while resyncing)",
            peers.iter().flat_map(|(l, p)| {
                state_set(
                    l.clone(),
                    "state",
                    ReplicationState::ALL,
                    ReplicationState::as_str,
                    p.replication,
                )
            }),
        )?;
        f.gauges(
            "peer_device_disk_state",
            "The peer's disk state as this node sees it (state set)",
            peers.iter().flat_map(|(l, p)| {
                state_set(
                    l.clone(),
                    "disk_state",
                    DiskState::ALL,
                    DiskState::as_str,
                    p.disk_state,
                )
            }),
        )?;
        f.gauges(
            "peer_device_out_of_sync_bytes",
            "Bytes this node's bitmap marks as missing on the peer",
            peers
                .iter()
                .map(|(l, p)| (l.clone(), int(p.out_of_sync_bytes))),
        )?;
        f.gauges(
            "peer_device_split_brain",
            "1 while this node and the peer are in split brain",
            peers
                .iter()
                .map(|(l, p)| (l.clone(), flag(p.split_brain.is_some()))),
        )?;
        let links: Vec<_> = peers
            .iter()
            .filter_map(|(l, p)| Some((l, p.link?)))
            .collect();
        f.counters(
            "connection_sent_bytes",
            "Bytes sent on the link to the peer (restarts from 0 when the link reconnects)",
            links.iter().map(|(l, k)| ((*l).clone(), k.sent_bytes)),
        )?;
        f.counters(
            "connection_received_bytes",
            "Bytes received on the link from the peer (restarts from 0 when the link reconnects)",
            links.iter().map(|(l, k)| ((*l).clone(), k.received_bytes)),
        )?;
        f.gauges(
            "connection_congested",
            "1 while less than a quarter of the link's send budget is free (senders wait, or soon will, for the peer)",
            links.iter().map(|(l, k)| ((*l).clone(), flag(k.congested))),
        )?;
        f.gauges(
            "connection_app_in_flight_bytes",
            "Bytes of application requests sent to the peer and not yet acknowledged as written",
            links
                .iter()
                .map(|(l, k)| ((*l).clone(), int(k.app_in_flight_bytes))),
        )?;
        f.gauges(
            "connection_resync_in_flight_bytes",
            "Bytes of resync sent to the peer and not yet acknowledged",
            links
                .iter()
                .map(|(l, k)| ((*l).clone(), int(k.resync_in_flight_bytes))),
        )?;
        f.gauges(
            "connection_rtt_seconds",
            "Round-trip time of the link's last ping (queued behind data under load)",
            links
                .iter()
                .filter_map(|(l, k)| Some(((*l).clone(), k.rtt_us? as f64 / 1e6))),
        )?;
        let resyncs: Vec<_> = peers
            .iter()
            .filter_map(|(l, p)| Some((l, p.resync.as_ref()?)))
            .collect();
        f.gauges(
            "resync_remaining_bytes",
            "Bytes left to resync with the peer (only while a resync runs)",
            resyncs.iter().map(|(l, r)| {
                let left = r.total_bytes.saturating_sub(r.done_bytes);
                ((*l).clone(), int(left))
            }),
        )?;
        f.gauges(
            "resync_rate_bytes_per_second",
            "Current resync rate",
            resyncs
                .iter()
                .map(|(l, r)| ((*l).clone(), int(r.bytes_per_sec))),
        )?;
        f.gauges(
            "resync_eta_seconds",
            "Estimated seconds until the resync ends, at the current rate",
            resyncs
                .iter()
                .filter(|(_, r)| r.bytes_per_sec > 0)
                .map(|(l, r)| {
                    let left = r.total_bytes.saturating_sub(r.done_bytes);
                    ((*l).clone(), left as f64 / r.bytes_per_sec as f64)
                }),
        )
    }

    /// The data path's latencies and counters.
    fn encode_io(&self, f: &mut Family) -> Result<(), std::fmt::Error> {
        let io = &self.io;
        let labels = |v: &str, op: &'static str, part: &'static str| {
            vec![
                ("volume", v.to_string()),
                ("op", op.to_string()),
                ("part", part.to_string()),
            ]
        };
        f.histograms(
            "io_latency_seconds",
            "Request latency: part=local until the local disk completed it, part=peer until every connected peer acknowledged it at the protocol's point",
            io.iter().flat_map(|(v, s)| {
                [
                    (labels(v, "read", "local"), s.read.local.snapshot()),
                    (labels(v, "write", "local"), s.write.local.snapshot()),
                    (labels(v, "write", "peer"), s.write.peer.snapshot()),
                    (labels(v, "flush", "local"), s.flush.local.snapshot()),
                    (labels(v, "flush", "peer"), s.flush.peer.snapshot()),
                ]
            }),
        )?;
        // One series per volume of the atomic `get` picks.
        let per_volume = |get: fn(&IoStats) -> &AtomicU64| {
            io.iter()
                .map(move |(v, s)| (vec![("volume", v.clone())], IoStats::get(get(s))))
        };
        f.counters(
            "device_read_bytes",
            "Bytes read by applications",
            per_volume(|s| &s.read_bytes),
        )?;
        f.counters(
            "device_written_bytes",
            "Bytes written by applications (writes, trims, write-zeroes)",
            per_volume(|s| &s.written_bytes),
        )?;
        f.counters(
            "device_al_writes",
            "Activity-log transactions written",
            per_volume(|s| &s.al_writes),
        )?;
        f.counters(
            "device_bitmap_writes",
            "Bitmap flushes written",
            per_volume(|s| &s.bitmap_writes),
        )?;
        f.gauges(
            "device_upper_pending",
            "Application requests in progress on this node, waits included",
            per_volume(|s| &s.pending_upper).map(|(l, n)| (l, int(n))),
        )?;
        f.gauges(
            "device_lower_pending",
            "Calls on the local disk in progress (requests, peers' writes, resync)",
            per_volume(|s| &s.pending_lower).map(|(l, n)| (l, int(n))),
        )
    }

    /// The vhost-user-blk frontend: frontends served, requests answered.
    fn encode_vhost(&self, f: &mut Family) -> Result<(), std::fmt::Error> {
        f.gauges(
            "vhost_connections",
            "vhost-user-blk frontends (QEMU) being served per volume",
            self.vhost
                .iter()
                .map(|(v, figures)| (vec![("volume", v.clone())], int(figures.connections))),
        )?;
        f.counters(
            "vhost_requests",
            "virtio-blk requests answered over vhost-user-blk, by type (op) and status",
            self.vhost.iter().flat_map(|(v, figures)| {
                figures.requests.iter().map(move |(op, status, n)| {
                    let labels = vec![
                        ("volume", v.clone()),
                        ("op", op.to_string()),
                        ("status", status.to_string()),
                    ];
                    (labels, *n)
                })
            }),
        )
    }

    /// Pool capacity, usage and thin overcommit.
    fn encode_pools(&self, f: &mut Family) -> Result<(), std::fmt::Error> {
        let ok: Vec<&PoolInfo> = self.pools.iter().filter(|p| p.error.is_none()).collect();
        let pool = |p: &PoolInfo| vec![("pool", p.name.clone())];
        f.gauges(
            "pool_total_bytes",
            "Pool capacity",
            ok.iter().map(|p| (pool(p), int(p.total_bytes))),
        )?;
        f.gauges(
            "pool_used_bytes",
            "Pool space in use",
            ok.iter().map(|p| (pool(p), int(p.used_bytes))),
        )?;
        f.gauges(
            "pool_provisioned_bytes",
            "Sum of the pool's volume sizes (above total: thin overcommit)",
            self.pools
                .iter()
                .map(|p| (pool(p), int(p.provisioned_bytes))),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// The status of `control_api::status`'s golden Secondary, resyncing to hv1.
    fn status() -> VolumeStatus {
        let mut s: VolumeStatus = serde_json::from_str(
            r#"{"volume":"vm-1","node":"hv2","role":"Secondary","disk_state":"UpToDate","protocol":"C","quorum":true,"quorum_reason":"","io_suspended":false,"allow_two_primaries":false,"size_bytes":1048576,"current_uuid":"1","peers":[{"node":"hv1","diskless":false,"connection":"Connected","role":"Secondary","disk_state":"Inconsistent","replication":"SyncSource","out_of_sync_bytes":8192,"resync":{"done_bytes":4096,"total_bytes":12288,"bytes_per_sec":4096},"split_brain":null,"decision":null,"last_error":null}],"last_verify":null,"promoted_explicitly":false,"open_writers":0}"#,
        )
        .unwrap();
        s.open_writers = 1;
        s.replica.peers[0].link = Some(replication::link::LinkFigures {
            sent_bytes: 300,
            received_bytes: 200,
            rtt_us: Some(250),
            congested: true,
            app_in_flight_bytes: 8192,
            resync_in_flight_bytes: 4096,
        });
        s
    }

    #[test]
    fn a_scrape_reports_states_resync_latency_and_pools() {
        let io = Arc::new(IoStats::default());
        io.write
            .observe(Duration::from_micros(80), Some(Duration::from_micros(300)));
        IoStats::add(&io.written_bytes, 4096);
        IoStats::add(&io.pending_lower, 3);
        let text = render(Snapshot {
            node: "hv2".into(),
            statuses: vec![status()],
            pools: vec![PoolInfo {
                name: "files".into(),
                backend: "file".into(),
                cache: "none".into(),
                total_bytes: 100,
                used_bytes: 95,
                free_bytes: 5,
                provisioned_bytes: 300,
                volumes: 1,
                error: None,
            }],
            io: vec![("vm-1".into(), io)],
            nbd_connections: [("vm-1".to_string(), 2)].into(),
            vhost: [(
                "vm-1".to_string(),
                crate::vhost::stats::Figures {
                    connections: 1,
                    requests: vec![("read", "ok", 7), ("other", "unsupp", 1)],
                },
            )]
            .into(),
        });
        for line in [
            r#"tandem_volume_role{node="hv2",volume="vm-1",role="Secondary"} 1"#,
            r#"tandem_volume_role{node="hv2",volume="vm-1",role="Primary"} 0"#,
            r#"tandem_volume_may_promote{node="hv2",volume="vm-1"} 1"#,
            r#"tandem_peer_device_replication_state{node="hv2",volume="vm-1",peer="hv1",state="SyncSource"} 1"#,
            r#"tandem_peer_device_out_of_sync_bytes{node="hv2",volume="vm-1",peer="hv1"} 8192"#,
            r#"tandem_resync_remaining_bytes{node="hv2",volume="vm-1",peer="hv1"} 8192"#,
            r#"tandem_resync_eta_seconds{node="hv2",volume="vm-1",peer="hv1"} 2.0"#,
            r#"tandem_io_latency_seconds_bucket{node="hv2",volume="vm-1",op="write",part="local",le="0.0001"} 1"#,
            r#"tandem_io_latency_seconds_bucket{node="hv2",volume="vm-1",op="write",part="peer",le="0.0001"} 0"#,
            r#"tandem_io_latency_seconds_count{node="hv2",volume="vm-1",op="write",part="peer"} 1"#,
            r#"tandem_device_written_bytes_total{node="hv2",volume="vm-1"} 4096"#,
            r#"tandem_pool_provisioned_bytes{node="hv2",pool="files"} 300"#,
            r#"tandem_nbd_connections{node="hv2",volume="vm-1"} 2"#,
            r#"tandem_vhost_connections{node="hv2",volume="vm-1"} 1"#,
            r#"tandem_vhost_requests_total{node="hv2",volume="vm-1",op="read",status="ok"} 7"#,
            r#"tandem_vhost_requests_total{node="hv2",volume="vm-1",op="other",status="unsupp"} 1"#,
            r#"tandem_connection_sent_bytes_total{node="hv2",volume="vm-1",peer="hv1"} 300"#,
            r#"tandem_connection_rtt_seconds{node="hv2",volume="vm-1",peer="hv1"} 0.00025"#,
            r#"tandem_connection_congested{node="hv2",volume="vm-1",peer="hv1"} 1"#,
            r#"tandem_connection_app_in_flight_bytes{node="hv2",volume="vm-1",peer="hv1"} 8192"#,
            r#"tandem_connection_resync_in_flight_bytes{node="hv2",volume="vm-1",peer="hv1"} 4096"#,
            r#"tandem_device_lower_pending{node="hv2",volume="vm-1"} 3"#,
            r#"tandem_device_upper_pending{node="hv2",volume="vm-1"} 0"#,
            "# TYPE tandem_io_latency_seconds histogram",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
        }
    }
}
