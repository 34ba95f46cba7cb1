//! The HA agents for real, without the replication engine: two simulated hosts (network
//! namespaces, a libvirtd and tandemd each), `tandem-ha run` on both. Heartbeats on the
//! management network, `manage` capturing the domain XML through libvirt and storing it on
//! both agents, `status`, `events`, a dead agent detected within dead-after, a restarted
//! agent keeping its registry, `unmanage` spreading; and the agent's libvirt actions
//! (define from XML, start, list, destroy through the `virt` crate) on a real libvirtd.

use std::time::{Duration, Instant};

use ha_agent::hypervisor::Hypervisor;
use tandem_tests::ha::{self, Agent};
use tandem_tests::libvirt::{self, Cluster, LibvirtHost};
use tandem_tests::wait_until;

fn skip() -> bool {
    if libvirt::skip_requested() {
        eprintln!("TANDEM_SKIP_LIBVIRT_TESTS set: skipping");
        return true;
    }
    libvirt::require_tools().unwrap();
    false
}

#[test]
fn agents_heartbeat_share_managed_vms_and_detect_a_dead_agent() {
    if skip() {
        return;
    }
    let cluster = Cluster::start(&["hv1", "hv2"]).unwrap();
    let (hv1, hv2) = (cluster.host("hv1"), cluster.host("hv2"));
    for h in [hv1, hv2] {
        ha::write_ha_toml(h, "heartbeat_interval_ms = 500\ndead_after_ms = 2000\n");
    }
    let _a1 = Agent::start(hv1);
    let mut a2 = Agent::start(hv2);
    ha::wait_all_alive(&[hv1, hv2]);

    // manage: refused for a domain without Tandem disks, accepted with one.
    ha::define(hv1, "plain", &ha::bios_domain_xml("plain", ""));
    let refused = ha::ha(hv1, &["manage", "plain"]).failed();
    assert!(refused.contains("has no Tandem disk"), "{refused}");
    let disk = ha::tandem_disk_xml("vm-1-disk-0", "vda");
    ha::define(hv1, "vm1", &ha::bios_domain_xml("vm1", &disk));
    let out = ha::ha(hv1, &["manage", "vm1", "--prefer", "hv2,hv1"]).ok();
    assert!(
        out.stdout.contains("stored by the agents of hv1, hv2"),
        "{}",
        out.stdout
    );
    let bad = ha::ha(hv1, &["manage", "vm1", "--prefer", "hv9"]).failed();
    assert!(bad.contains("no such node"), "{bad}");

    // Both agents know it, with its XML, persisted under <state_dir>/ha.
    for h in [hv1, hv2] {
        // The status is rebuilt every tick (250 ms).
        assert!(
            wait_until(Duration::from_secs(5), || ha::vm_status(h, "vm1").is_some()),
            "{} lacks vm1",
            h.node
        );
        let vm = ha::vm_status(h, "vm1").unwrap();
        assert_eq!(vm["prefer"], serde_json::json!(["hv2", "hv1"]));
        assert_eq!(vm["running_on"], serde_json::Value::Null);
        assert_eq!(vm["action"], "nothing", "{vm}");
        let registry = std::fs::read_to_string(h.path("state/ha/registry.json")).unwrap();
        assert!(registry.contains("vm-1-disk-0"), "{registry}");
    }
    let human = ha::ha(hv2, &["status"]).ok().stdout;
    assert!(
        human.contains("vm1 runs on -") && human.contains("prefer: hv2,hv1"),
        "{human}"
    );
    assert!(ha::events(hv2)
        .iter()
        .any(|e| e["event"] == "managed" && e["properties"]["vm"] == "vm1"));

    // A dead agent on hv2: hv1 declares it dead on the management network within
    // dead-after (2 s) plus one tick.
    a2.kill();
    let killed = Instant::now();
    assert!(wait_until(Duration::from_secs(10), || ha::sees_alive(
        hv1, "hv2"
    ) == Some(false)));
    let detected = killed.elapsed();
    eprintln!(
        "[ha] dead agent detected after {:.2} s (dead_after 2 s)",
        detected.as_secs_f64()
    );
    assert!(detected < Duration::from_secs(4), "{detected:?}");
    let down = ha::events(hv1);
    let e = down
        .iter()
        .find(|e| e["event"] == "peer_down" && e["properties"]["peer"] == "hv2")
        .expect("peer_down event");
    assert_eq!(e["properties"]["path"], "management");
    assert_eq!(e["source"], "hv1");
    let text = ha::ha(hv1, &["events"]).ok().stdout;
    assert!(
        text.lines()
            .any(|l| l.contains(" hv1 peer_down ") && l.contains("peer=\"hv2\"")),
        "{text}"
    );

    // While hv2's agent is down, hv1 unmanages vm1; the restarted agent (registry kept on
    // disk) learns of it through the registry sync.
    let out = ha::ha(hv1, &["unmanage", "vm1"]).ok();
    assert!(out.stdout.contains("not reached: hv2"), "{}", out.stdout);
    let _a2 = Agent::start(hv2);
    ha::wait_all_alive(&[hv1, hv2]);
    assert!(
        wait_until(Duration::from_secs(10), || ha::status(hv2)
            .is_some_and(|s| s["vms"].as_array().is_some_and(|v| v.is_empty()))),
        "hv2 still manages vm1: {:?}\n{}",
        ha::status(hv2),
        a2.log_text()
    );
    assert!(ha::events(hv2).iter().any(|e| e["event"] == "unmanaged"));
}

#[test]
fn hypervisor_defines_starts_lists_and_destroys_through_libvirt() {
    if skip() {
        return;
    }
    let host = LibvirtHost::start("hv1").unwrap();
    let mut hv = Hypervisor::new(&host.uri());
    let xml = ha::bios_domain_xml("bios1", "");
    assert!(!hv.is_defined("bios1").unwrap());
    assert!(hv.ensure_defined("bios1", &xml).unwrap(), "defined");
    assert!(
        !hv.ensure_defined("bios1", &xml).unwrap(),
        "already defined"
    );
    let captured = hv.domain_xml("bios1").unwrap();
    assert!(captured.contains("<name>bios1</name>"), "{captured}");
    assert!(!hv.active_domains().unwrap().contains("bios1"));
    let t = Instant::now();
    hv.start("bios1").unwrap();
    eprintln!("[ha] libvirt start took {:.2} s", t.elapsed().as_secs_f64());
    assert!(hv.active_domains().unwrap().contains("bios1"));
    assert_eq!(host.domstate("bios1"), "running");
    hv.destroy("bios1").unwrap();
    assert!(!hv.active_domains().unwrap().contains("bios1"));
    hv.destroy("bios1").unwrap();
    let err = hv.start("nope").unwrap_err().to_string();
    assert!(err.contains("nope"), "{err}");
    let err = hv.domain_xml("nope").unwrap_err().to_string();
    assert!(err.contains("no domain named 'nope'"), "{err}");
}
