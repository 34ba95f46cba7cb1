//! Issue 8's hook side with real libvirtds: `virsh migrate --live` of a running TCG guest
//! whose disk is a Tandem volume replicated on both hosts (protocol C). The destination's
//! hook arms dual-primary and promotes; the source's release (reason `migrated`) demotes and
//! disarms; the guest keeps running on the destination; its data is there.
//!
//! Needs the replication engine in tandemd, root, libvirt, QEMU, nbdcopy;
//! `TANDEM_SKIP_LIBVIRT_TESTS=1` skips.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tandem_tests::libvirt::{self, Cluster, LibvirtHost};
use tandem_tests::vm::{self, ImageBuilder, Vm};
use tandem_tests::wait_until;

const BYTES: usize = 1 << 20;
const VOLUME: &str = "vm-5-disk-0";

fn status(host: &LibvirtHost) -> serde_json::Value {
    host.volume_status(VOLUME)
}

#[test]
fn live_migration_moves_primary_and_closes_the_dual_primary_window() {
    if libvirt::skip_requested() {
        eprintln!("TANDEM_SKIP_LIBVIRT_TESTS is set: skipping libvirt test");
        return;
    }
    libvirt::require_tools().unwrap();
    let started = Instant::now();
    let cluster = Cluster::start(&["hv1", "hv2"]).unwrap();
    let (hv1, hv2) = (cluster.host("hv1"), cluster.host("hv2"));
    let nonce = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let pattern = format!("migrated pattern {nonce}");
    let work = hv1.path("guest");
    let script = format!(
        "{}echo @@WRITTEN-AND-WAITING\nsleep 3600\n",
        libvirt::write_pattern_script(&pattern, BYTES)
    );
    let image = ImageBuilder::new(script)
        .build(&work.join("image"))
        .expect("building the guest initramfs");
    let cmdline = Vm::new(image.clone()).kernel_cmdline();
    hv1.tandem(&[
        "volume",
        "create",
        VOLUME,
        "--size",
        "64M",
        "--replicas",
        "2",
        "--protocol",
        "C",
    ])
    .ok();
    hv1.tandem(&["volume", "wait-sync", VOLUME]).ok();
    let disk = hv1
        .exec("tandem-libvirt-hook", &["disk-xml", VOLUME])
        .ok()
        .stdout;
    let console = work.join("console.log");
    let xml = libvirt::tcg_domain_xml("vm5", &image, &cmdline, &disk, &console);
    std::fs::write(hv1.path("vm5.xml"), &xml).unwrap();
    hv1.virsh(&["define", hv1.path("vm5.xml").to_str().unwrap()])
        .ok();
    hv1.virsh(&["start", "vm5"]).ok();
    assert!(wait_until(vm::DEFAULT_TIMEOUT, || {
        std::fs::read_to_string(&console)
            .unwrap_or_default()
            .contains("@@WRITTEN-AND-WAITING")
    }));

    let dest = hv2.tcp_uri().unwrap();
    let migrate_uri = format!("tcp://{}", hv2.ip().unwrap());
    let migration = Instant::now();
    let out = hv1.exec(
        "virsh",
        &[
            "-c",
            "qemu:///system",
            "migrate",
            "--live",
            "--persistent",
            "--undefinesource",
            "vm5",
            &dest,
            "--migrateuri",
            &migrate_uri,
        ],
    );
    assert!(
        out.status.success(),
        "virsh migrate failed: {}\nhv2 hook log:\n{}\nhv1 hook log:\n{}\nhv2 qemu log:\n{}",
        out.stderr,
        hv2.hook_log(),
        hv1.hook_log(),
        hv2.qemu_log("vm5")
    );
    let migration_time = migration.elapsed();
    assert_eq!(hv2.domstate("vm5"), "running");
    let s1 = status(hv1);
    let s2 = status(hv2);
    assert_eq!(s1["role"], "Secondary", "source after migration: {s1:#}");
    assert_eq!(s2["role"], "Primary", "destination after migration: {s2:#}");
    let disarmed = wait_until(Duration::from_secs(10), || {
        status(hv1)["allow_two_primaries"] == false && status(hv2)["allow_two_primaries"] == false
    });
    assert!(
        disarmed,
        "dual-primary still armed: {:#} {:#}",
        status(hv1),
        status(hv2)
    );
    let log1 = hv1.hook_log();
    assert!(
        log1.contains("domain=vm5 op=Release subop=end extra=-") || log1.contains("extra=migrated"),
        "{log1}"
    );
    let log2 = hv2.hook_log();
    assert!(log2.contains("domain=vm5 op=Migrate"), "{log2}");

    hv2.virsh(&["destroy", "vm5"]).ok();
    assert_eq!(status(hv2)["role"], "Secondary", "{:#}", status(hv2));
    hv2.tandem(&["volume", "promote", VOLUME]).ok();
    let out = std::process::Command::new("nbdcopy")
        .arg(format!(
            "nbd+unix:///{VOLUME}?socket={}",
            hv2.nbd_socket().display()
        ))
        .arg("-")
        .output()
        .expect("running nbdcopy");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout[..BYTES] == libvirt::pattern_bytes(&pattern, BYTES)[..]);
    hv2.tandem(&["volume", "demote", VOLUME]).ok();
    eprintln!(
        "[libvirt migration] virsh migrate {:.1}s; test total {:.1}s",
        migration_time.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}
