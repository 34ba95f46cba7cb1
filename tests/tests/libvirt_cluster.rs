//! The multi-host libvirt test bed (issue 6's second-host and issue 8's migration
//! acceptance build on it): two simulated hosts, each with its own libvirtd, tandemd and
//! the hook, on one network. Each tandemd knows both nodes; hv1 reaches hv2's libvirtd over
//! TCP the way `virsh migrate --live DOMAIN qemu+tcp://<hv2>/system` will.
//!
//! Needs what `libvirt_start_stop.rs` needs; `TANDEM_SKIP_LIBVIRT_TESTS=1` skips.

use std::time::Instant;

use tandem_tests::libvirt::{self, Cluster};

#[test]
fn two_hosts_each_with_libvirtd_and_tandemd_reach_each_other() {
    if libvirt::skip_requested() {
        eprintln!("TANDEM_SKIP_LIBVIRT_TESTS is set: skipping libvirt test");
        return;
    }
    libvirt::require_tools().unwrap();
    let started = Instant::now();
    let cluster = Cluster::start(&["hv1", "hv2"]).unwrap();
    let (hv1, hv2) = (cluster.host("hv1"), cluster.host("hv2"));
    for host in [hv1, hv2] {
        let info = host.tandem(&["node", "info", "--json"]).ok().json();
        assert_eq!(info["name"], host.node.as_str(), "{info}");
        let names: Vec<&str> = info["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["hv1", "hv2"]);
    }
    // A domain defined on hv2 is visible from inside hv1 over the cluster network.
    let xml = "<domain type='qemu'><name>probe</name><memory unit='MiB'>64</memory>\
               <os><type arch='x86_64'>hvm</type></os></domain>";
    std::fs::write(hv2.path("probe.xml"), xml).unwrap();
    hv2.virsh(&["define", hv2.path("probe.xml").to_str().unwrap()])
        .ok();
    let uri = hv2.tcp_uri().unwrap();
    let listed = hv1
        .exec("virsh", &["-c", &uri, "list", "--all", "--name"])
        .ok();
    assert!(listed.stdout.contains("probe"), "{}", listed.stdout);
    let own = hv1.virsh(&["list", "--all", "--name"]).ok();
    assert!(
        !own.stdout.contains("probe"),
        "hosts must not share libvirt state"
    );
    eprintln!(
        "[libvirt cluster] two hosts up and checked in {:.1}s",
        started.elapsed().as_secs_f64()
    );
}
