//! The resync controller's keys on a running cluster (issue 19, "Resync controller"): a
//! `tandem volume set --resync-max-rate` reaches a resync that is already running, through
//! the daemons and the engine, without restarting it.
//!
//! Real daemons in network namespaces (`hv1`, `hv2`, a witness) and fio writing through
//! hv1's NBD socket; the cluster and its processes are removed on drop, even on failure.

use std::time::{Duration, Instant};

use tandem_tests::cluster::{skip_unless_root, Cluster, ClusterSpec};
use tandem_tests::volume_status::{in_sync_with, peer};

const VOL: &str = "rate-vol";
const MIB: u64 = 1 << 20;

#[test]
fn raising_the_max_rate_speeds_up_a_running_resync() {
    if skip_unless_root() {
        return;
    }
    let cluster = Cluster::new(ClusterSpec {
        hosts: 2,
        witness: true,
        rust_log: "info".into(),
        ..ClusterSpec::default()
    });
    let create = [
        "volume",
        "create",
        VOL,
        "--size",
        "128M",
        "--replicas",
        "2",
        "--protocol",
        "C",
    ];
    cluster.tandem("hv1", &create).ok();
    cluster
        .tandem("hv1", &["volume", "wait-sync", VOL, "--timeout", "30"])
        .ok();
    cluster.tandem("hv1", &["volume", "promote", VOL]).ok();
    // 1 MiB/s: the min rate follows the max down (it was 10 MiB/s).
    cluster
        .tandem("hv1", &["volume", "set", VOL, "--resync-max-rate", "1M"])
        .ok();

    // 48 MiB written while hv2's link is cut: 48 s of resync at 1 MiB/s.
    cluster.cut_replication("hv2");
    cluster.wait_status("hv1", VOL, Duration::from_secs(30), |s| {
        peer(s, "hv2")["connection"] != "Connected"
    });
    let uri = format!(
        "nbd+unix:///{VOL}?socket={}",
        cluster.nbd_socket("hv1").display()
    );
    let fio = std::process::Command::new("fio")
        .args(["--name=w", "--ioengine=nbd", &format!("--uri={uri}")])
        .args(["--rw=write", "--bs=1M", "--iodepth=4", "--size=48M"])
        .output()
        .expect("run fio");
    assert!(
        fio.status.success(),
        "fio: {}",
        String::from_utf8_lossy(&fio.stderr)
    );
    cluster.heal_replication("hv2");
    cluster.wait_status("hv1", VOL, Duration::from_secs(30), |s| {
        peer(s, "hv2")["resync"]["done_bytes"].as_u64() > Some(0)
    });
    std::thread::sleep(Duration::from_secs(1));
    let status = cluster.volume_status("hv1", VOL);
    let done = peer(&status, "hv2")["resync"]["done_bytes"]
        .as_u64()
        .unwrap_or(u64::MAX);
    assert!(
        done < 8 * MIB,
        "paced at 1 MiB/s, yet {done} bytes: {status:#}"
    );

    // At the old rate the remaining 40+ MiB take 40+ s; at the new one, about a second.
    let raised = Instant::now();
    cluster
        .tandem("hv1", &["volume", "set", VOL, "--resync-max-rate", "1G"])
        .ok();
    cluster
        .tandem("hv1", &["volume", "wait-sync", VOL, "--timeout", "20"])
        .ok();
    eprintln!("in sync {:?} after raising the max rate", raised.elapsed());
    let status = cluster.volume_status("hv1", VOL);
    assert!(in_sync_with(&status, "hv2"), "{status:#}");
    let shown = cluster
        .tandem("hv2", &["volume", "show", VOL, "--json"])
        .ok()
        .json();
    assert_eq!(shown["options"]["resync_rate_bytes"], 1 << 30, "{shown}");
    assert_eq!(shown["options"]["resync_min_rate_bytes"], MIB, "{shown}");
}
