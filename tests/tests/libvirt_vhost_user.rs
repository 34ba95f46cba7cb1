//! Issue 17 through libvirt: a real libvirtd (one simulated host, the Tandem hook installed)
//! runs a TCG guest whose disk is the `<disk type='vhostuser'>` printed by
//! `tandem-libvirt-hook disk-xml --frontend vhost-user`, in a domain with the shared memfd
//! `<memoryBacking>` the command asks for. `virsh start` boots it, the guest writes a
//! pattern with fsync, `virsh destroy` kills it; the volume is released (no open writer)
//! and holds the pattern (read back over tandemd's NBD socket).
//!
//! Needs what `libvirt_start_stop` needs; `TANDEM_SKIP_LIBVIRT_TESTS=1` skips.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tandem_tests::libvirt::{self, LibvirtHost};
use tandem_tests::vm::{self, GuestRun, ImageBuilder, Vm};

const BYTES: usize = 1 << 20;
const VOLUME: &str = "vm-5-disk-0";

#[test]
fn virsh_start_and_destroy_a_guest_on_a_vhost_user_disk() {
    if libvirt::skip_requested() {
        eprintln!("TANDEM_SKIP_LIBVIRT_TESTS is set: skipping libvirt test");
        return;
    }
    libvirt::require_tools().expect("libvirt tools");
    let host = LibvirtHost::start("hv1").expect("libvirt host");
    let nonce = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_nanos();
    let pattern = format!("vhost-user libvirt pattern {nonce}");
    let work = host.path("guest");
    let script = format!(
        "{}echo @@WRITTEN-AND-WAITING\nsleep 3600\n",
        libvirt::write_pattern_script(&pattern, BYTES)
    );
    let image = ImageBuilder::new(script)
        .build(&work.join("image"))
        .expect("building the guest initramfs");
    let cmdline = Vm::new(image.clone()).kernel_cmdline();
    host.tandem(&["volume", "create", VOLUME, "--size", "64M"])
        .ok();
    let out = host
        .exec(
            "tandem-libvirt-hook",
            &[
                "disk-xml",
                VOLUME,
                "--target",
                "vda",
                "--frontend",
                "vhost-user",
            ],
        )
        .ok();
    let disk = out.stdout;
    assert!(
        disk.contains(&format!("path='/run/tandem/vhost/{VOLUME}.sock'")),
        "{disk}"
    );
    let needs = "<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>";
    assert!(out.stderr.contains(needs), "{}", out.stderr);
    let console = work.join("console.log");
    let xml = libvirt::tcg_domain_xml("vm5", &image, &cmdline, &disk, &console)
        .replace("<vcpu>1</vcpu>", &format!("<vcpu>1</vcpu>\n  {needs}"));
    std::fs::write(work.join("vm5.xml"), &xml).expect("domain xml");
    host.virsh(&["define", work.join("vm5.xml").to_str().expect("utf-8 path")])
        .ok();
    let started = host.virsh(&["start", "vm5"]);
    assert!(
        started.status.success(),
        "virsh start failed: {}\nqemu log:\n{}\ntandemd log:\n{}",
        started.stderr,
        host.qemu_log("vm5"),
        host.tandemd_log()
    );
    let waiting = tandem_tests::wait_until(vm::DEFAULT_TIMEOUT, || {
        std::fs::read_to_string(&console)
            .unwrap_or_default()
            .contains("@@WRITTEN-AND-WAITING")
    });
    let run = GuestRun::from_console(&std::fs::read_to_string(&console).unwrap_or_default());
    assert!(
        waiting,
        "guest never reported its write; console:\n{}",
        run.console
    );
    assert_eq!(
        run.section("written").split_whitespace().next(),
        run.section("readback").split_whitespace().next(),
        "the guest read back other bytes"
    );
    host.virsh(&["destroy", "vm5"]).ok();
    assert_eq!(host.domstate("vm5"), "shut off");

    // The dead QEMU released the volume; what it synced is there.
    let released = tandem_tests::wait_until(Duration::from_secs(10), || {
        host.tandem(&["volume", "status", VOLUME, "--json"])
            .ok()
            .json()["open_writers"]
            == 0
    });
    assert!(
        released,
        "the volume still has a writer after virsh destroy"
    );
    let out = std::process::Command::new("nbdcopy")
        .arg(format!(
            "nbd+unix:///{VOLUME}?socket={}",
            host.nbd_socket().display()
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
        out.stdout[..BYTES.min(out.stdout.len())] == libvirt::pattern_bytes(&pattern, BYTES)[..],
        "the volume does not hold what the guest synced"
    );
}
