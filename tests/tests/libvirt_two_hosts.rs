//! Issue 6's acceptance on two simulated hosts, each with its own libvirtd, tandemd and the
//! hook, and a volume replicated on both (protocol C):
//!
//! - `virsh start` on hv1 promotes hv1's replica; the guest writes a known pattern;
//! - `virsh start` of the same domain on hv2 meanwhile fails with the hook's message, and
//!   the VM on hv1 keeps running;
//! - `virsh destroy` on hv1 demotes the volume there;
//! - promoted on hv2, the volume reads back the pattern byte for byte (NBD).
//!
//! Needs the replication engine in tandemd, root, libvirt, QEMU, nbdcopy;
//! `TANDEM_SKIP_LIBVIRT_TESTS=1` skips.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tandem_tests::libvirt::{self, Cluster, LibvirtHost};
use tandem_tests::vm::{self, GuestRun, ImageBuilder, Vm};
use tandem_tests::wait_until;

const BYTES: usize = 1 << 20;
const VOLUME: &str = "vm-1-disk-0";

fn status(host: &LibvirtHost) -> serde_json::Value {
    host.volume_status(VOLUME)
}

/// Poll `check` on the host's volume status (up to 60 s); panics with the last status.
fn wait_status(host: &LibvirtHost, what: &str, check: impl Fn(&serde_json::Value) -> bool) {
    host.wait_volume_status(VOLUME, what, Duration::from_secs(60), check);
}

fn peer_role(status: &serde_json::Value, peer: &str) -> String {
    status["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["node"] == peer)
        .map(|p| p["role"].as_str().unwrap_or("").to_string())
        .unwrap_or_default()
}

#[test]
fn start_promotes_second_host_is_refused_destroy_demotes_other_replica_has_the_data() {
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
    let pattern = format!("two hosts pattern {nonce}");
    let work = hv1.path("guest");
    // Write, report, then keep running until destroyed.
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

    // The same domain defined on both hosts (the disk XML is valid on every host).
    let disk = hv1
        .exec("tandem-libvirt-hook", &["disk-xml", VOLUME])
        .ok()
        .stdout;
    let console = work.join("console.log");
    let xml = libvirt::tcg_domain_xml("vm1", &image, &cmdline, &disk, &console);
    for host in [hv1, hv2] {
        let file = host.path("vm1.xml");
        std::fs::write(&file, &xml).unwrap();
        host.virsh(&["define", file.to_str().unwrap()]).ok();
    }

    // Start on hv1: the hook promotes hv1's replica.
    let out = hv1.virsh(&["start", "vm1"]);
    assert!(
        out.status.success(),
        "virsh start on hv1 failed: {}\nhook log:\n{}",
        out.stderr,
        hv1.hook_log()
    );
    assert_eq!(status(hv1)["role"], "Primary", "{:#}", status(hv1));
    let written = wait_until(vm::DEFAULT_TIMEOUT, || {
        std::fs::read_to_string(&console)
            .unwrap_or_default()
            .contains("@@WRITTEN-AND-WAITING")
    });
    let run = GuestRun::from_console(&std::fs::read_to_string(&console).unwrap_or_default());
    assert!(written, "guest never reported its write:\n{}", run.console);
    assert_eq!(
        run.section("written").split_whitespace().next(),
        run.section("readback").split_whitespace().next()
    );

    // Start on hv2 meanwhile: refused by the hook with its message; hv1's VM is untouched.
    wait_status(hv2, "hv1 seen as Primary", |s| {
        peer_role(s, "hv1") == "Primary"
    });
    let refused = hv2.virsh(&["start", "vm1"]).failed();
    eprintln!("[libvirt two hosts] hv2 refused: {}", refused.trim());
    assert!(
        refused.contains("tandem: vm-1-disk-0 is Primary on hv1"),
        "virsh start on hv2 should show the hook's refusal, got: {refused}"
    );
    assert_eq!(hv2.domstate("vm1"), "shut off");
    assert_eq!(hv1.domstate("vm1"), "running");
    assert_eq!(status(hv2)["role"], "Secondary");

    // Destroy on hv1: the release hook demotes hv1's replica.
    hv1.virsh(&["destroy", "vm1"]).ok();
    assert_eq!(status(hv1)["role"], "Secondary", "{:#}", status(hv1));
    let log = hv1.hook_log();
    assert!(
        log.contains("domain=vm1 op=Release"),
        "release did not run:\n{log}"
    );

    // hv2 has the pattern: promote it there and read over its NBD socket.
    wait_status(hv2, "in sync, hv1 Secondary", |s| {
        s["disk_state"] == "UpToDate" && peer_role(s, "hv1") == "Secondary"
    });
    hv2.tandem(&["volume", "promote", VOLUME]).ok();
    let out = std::process::Command::new("nbdcopy")
        .arg(format!(
            "nbd+unix:///{VOLUME}?socket={}",
            hv2.nbd_socket().display()
        ))
        .arg("-")
        .output()
        .expect("running nbdcopy (Debian package libnbd-bin)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stdout[..BYTES] == libvirt::pattern_bytes(&pattern, BYTES)[..],
        "hv2's replica does not hold the pattern the guest wrote on hv1"
    );
    hv2.tandem(&["volume", "demote", VOLUME]).ok();
    eprintln!(
        "[libvirt two hosts] test total {:.1}s",
        started.elapsed().as_secs_f64()
    );
}
