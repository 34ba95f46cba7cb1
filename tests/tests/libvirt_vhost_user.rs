//! Issue 17 through libvirt, with real libvirtds (simulated hosts, the Tandem hook
//! installed) running TCG guests whose disk is the `<disk type='vhostuser'>` printed by
//! `tandem-libvirt-hook disk-xml --frontend vhost-user`, in a domain with the shared memfd
//! `<memoryBacking>` the command asks for.
//!
//! * One host: the domain `virt-install` makes from `virt-install-disk --frontend
//!   vhost-user` is accepted with its `<reconnect>`. `virsh start` boots the guest (the
//!   hook considers the volume), the guest
//!   writes a pattern with fsync, then reads and writes a block every second. tandemd is
//!   restarted under it: libvirt 9.0 accepts the `<reconnect enabled='yes'>` the command
//!   prints, QEMU reconnects, and the guest's I/O goes on without an error. `virsh
//!   destroy` kills it; the hook's release considers the volume, which has no open writer
//!   and holds the pattern (read back over tandemd's NBD socket).
//! * Two hosts: while hv1 runs the domain, `virsh start` on hv2 is refused by the hook with
//!   the reason; after `virsh destroy` on hv1 (the hook demotes there), the start on hv2
//!   works.
//!
//! Needs what `libvirt_start_stop` needs; `TANDEM_SKIP_LIBVIRT_TESTS=1` skips.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tandem_tests::libvirt::{self, Cluster, LibvirtHost};
use tandem_tests::vm::{self, GuestRun, ImageBuilder, Vm};

const BYTES: usize = 1 << 20;
const VOLUME: &str = "vm-5-disk-0";
/// Define `name` on `host`: a TCG domain booting `image` with `disk` and shared memory.
fn define(
    host: &LibvirtHost,
    name: &str,
    image: &vm::GuestImage,
    disk: &str,
) -> std::path::PathBuf {
    let work = host.path("guest");
    std::fs::create_dir_all(&work).expect("guest directory");
    let console = work.join(format!("{name}-console.log"));
    let cmdline = Vm::new(image.clone()).kernel_cmdline();
    let xml = libvirt::with_vhost_memory(&libvirt::tcg_domain_xml(
        name, image, &cmdline, disk, &console,
    ));
    let file = work.join(format!("{name}.xml"));
    std::fs::write(&file, &xml).expect("domain xml");
    host.virsh(&["define", file.to_str().expect("utf-8 path")])
        .ok();
    console
}

fn console_text(console: &std::path::Path) -> String {
    std::fs::read_to_string(console).unwrap_or_default()
}

/// The numbers of the guest's `@@TICK-OK n` (or `@@TICK-FAIL n`) lines.
fn ticks(console: &str, kind: &str) -> Vec<u64> {
    console
        .lines()
        .filter_map(|l| l.trim().strip_prefix(kind)?.trim().parse().ok())
        .collect()
}

#[test]
fn virsh_start_and_destroy_a_guest_on_a_vhost_user_disk_that_outlives_a_tandemd_restart() {
    if libvirt::skip_requested() {
        eprintln!("TANDEM_SKIP_LIBVIRT_TESTS is set: skipping libvirt test");
        return;
    }
    libvirt::require_tools().expect("libvirt tools");
    let mut host = LibvirtHost::start("hv1").expect("libvirt host");
    let nonce = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_nanos();
    let pattern = format!("vhost-user libvirt pattern {nonce}");
    // After the pattern: every second read one block and write another (direct, fsync).
    let script = format!(
        "{}echo @@WRITTEN-AND-WAITING\n\
         n=0\n\
         while true; do\n\
           n=$((n + 1))\n\
           if dd if=/dev/vda of=/dev/null bs=4096 count=1 skip=$n iflag=direct 2>/dev/null &&\n\
              printf 'tick %d' $n | dd of=/dev/vda bs=4096 count=1 seek=$((1024 + n)) conv=sync,fsync oflag=direct 2>/dev/null\n\
           then echo \"@@TICK-OK $n\"; else echo \"@@TICK-FAIL $n\"; fi\n\
           sleep 1\n\
         done\n",
        libvirt::write_pattern_script(&pattern, BYTES)
    );
    let image = ImageBuilder::new(script)
        .build(&host.path("guest").join("image"))
        .expect("building the guest initramfs");
    host.tandem(&["volume", "create", VOLUME, "--size", "64M"])
        .ok();
    let disk = libvirt::vhost_disk_xml(&host, VOLUME);
    virt_install_defines_the_vhost_user_disk(&host, &image);
    let console = define(&host, "vm5", &image, &disk);
    let started = host.virsh(&["start", "vm5"]);
    assert!(
        started.status.success(),
        "virsh start failed: {}\nqemu log:\n{}\ntandemd log:\n{}",
        started.stderr,
        host.qemu_log("vm5"),
        host.tandemd_log()
    );
    // The hook saw the vhost-user disk (a lone host's volume is Primary already).
    let hook_log = host.hook_log();
    assert!(
        hook_log
            .lines()
            .any(|l| l.contains("decided domain=vm5 op=Prepare") && l.contains(VOLUME)),
        "the hook did not consider the vhost-user disk:\n{hook_log}"
    );
    let waiting = tandem_tests::wait_until(vm::DEFAULT_TIMEOUT, || {
        ticks(&console_text(&console), "@@TICK-OK").len() >= 2
    });
    let run = GuestRun::from_console(&console_text(&console));
    assert!(
        waiting,
        "guest never reported its write and ticks; console:\n{}",
        run.console
    );
    assert_eq!(
        run.section("written").split_whitespace().next(),
        run.section("readback").split_whitespace().next(),
        "the guest read back other bytes"
    );

    // tandemd restarts under the running guest: QEMU reconnects, the disk works again.
    let before = ticks(&console_text(&console), "@@TICK-OK")
        .into_iter()
        .max()
        .unwrap_or(0);
    let restarted = Instant::now();
    host.restart_tandemd().expect("restarting tandemd");
    let resumed = tandem_tests::wait_until(Duration::from_secs(90), || {
        ticks(&console_text(&console), "@@TICK-OK")
            .iter()
            .filter(|&&n| n > before + 1)
            .count()
            >= 2
    });
    let console_now = console_text(&console);
    eprintln!(
        "[libvirt vhost-user] guest I/O resumed {:.1}s after the tandemd restart began (ticks ok {:?}, failed {:?})",
        restarted.elapsed().as_secs_f64(),
        ticks(&console_now, "@@TICK-OK"),
        ticks(&console_now, "@@TICK-FAIL")
    );
    assert!(
        resumed,
        "the guest's disk did not work again after the tandemd restart:\n{}\nqemu log:\n{}\ntandemd log:\n{}",
        GuestRun::from_console(&console_now).script_console(),
        host.qemu_log("vm5"),
        host.tandemd_log()
    );
    assert_eq!(
        ticks(&console_now, "@@TICK-FAIL"),
        Vec::<u64>::new(),
        "the guest saw I/O errors across the restart"
    );
    assert_eq!(host.domstate("vm5"), "running");

    host.virsh(&["destroy", "vm5"]).ok();
    assert_eq!(host.domstate("vm5"), "shut off");
    // The dead QEMU released the volume and the hook's release saw it; what the guest
    // synced is there.
    let released = tandem_tests::wait_until(Duration::from_secs(10), || {
        host.volume_status(VOLUME)["open_writers"] == 0
    });
    assert!(
        released,
        "the volume still has a writer after virsh destroy: {:#}",
        host.volume_status(VOLUME)
    );
    let hook_log = host.hook_log();
    assert!(
        hook_log
            .lines()
            .any(|l| l.contains("decided domain=vm5 op=Release") && l.contains(VOLUME)),
        "the hook's release did not consider the vhost-user disk:\n{hook_log}"
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

/// `virt-install --print-xml` with the arguments `virt-install-disk --frontend vhost-user`
/// prints gives a domain this libvirt defines, with the vhostuser disk, its `<reconnect>`
/// and the shared memfd memory.
fn virt_install_defines_the_vhost_user_disk(host: &LibvirtHost, image: &vm::GuestImage) {
    let args = host
        .exec(
            "tandem-libvirt-hook",
            &["virt-install-disk", VOLUME, "--frontend", "vhost-user"],
        )
        .ok()
        .stdout;
    let args: Vec<&str> = args.split_whitespace().collect();
    let out = std::process::Command::new("virt-install")
        .arg("--connect")
        .arg(host.uri())
        .args(["--name", "vm5vi", "--memory", "512", "--vcpus", "1"])
        .args(["--virt-type", "qemu", "--arch", "x86_64", "--machine", "pc"])
        .args(["--osinfo", "detect=off,require=off", "--import"])
        .arg("--boot")
        .arg(format!(
            "kernel={},initrd={}",
            image.kernel.display(),
            image.initrd.display()
        ))
        .args(&args)
        .args(["--graphics", "none", "--network", "none", "--sound", "none"])
        .arg("--print-xml")
        .output()
        .expect("running virt-install (Debian package virtinst)");
    assert!(
        out.status.success(),
        "virt-install {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let file = host.path("guest").join("vm5vi.xml");
    std::fs::write(&file, &out.stdout).expect("virt-install's XML");
    host.virsh(&["define", file.to_str().expect("utf-8 path")])
        .ok();
    let dumped = host.virsh(&["dumpxml", "--inactive", "vm5vi"]).ok().stdout;
    let squeezed = dumped.replace('"', "'");
    for want in [
        "<disk type='vhostuser' device='disk'",
        &format!("<source type='unix' path='/run/tandem/vhost/{VOLUME}.sock'>"),
        "<reconnect enabled='yes' timeout='5'/>",
        "<source type='memfd'/>",
        "<access mode='shared'/>",
    ] {
        assert!(squeezed.contains(want), "no {want} in:\n{dumped}");
    }
    host.virsh(&["undefine", "vm5vi"]).ok();
}

#[test]
fn virsh_start_is_refused_by_the_hook_while_the_other_host_holds_the_vhost_user_volume() {
    if libvirt::skip_requested() {
        eprintln!("TANDEM_SKIP_LIBVIRT_TESTS is set: skipping libvirt test");
        return;
    }
    libvirt::require_tools().expect("libvirt tools");
    const SHARED: &str = "vm-6-disk-0";
    let cluster = Cluster::start(&["hv1", "hv2"]).expect("two libvirt hosts");
    let (hv1, hv2) = (cluster.host("hv1"), cluster.host("hv2"));
    hv1.tandem(&[
        "volume",
        "create",
        SHARED,
        "--size",
        "64M",
        "--replicas",
        "2",
        "--protocol",
        "C",
    ])
    .ok();
    hv1.tandem(&["volume", "wait-sync", SHARED]).ok();
    let image = ImageBuilder::new("sleep 3600\n")
        .build(&hv1.path("guest").join("image"))
        .expect("building the guest initramfs");
    // The same domain on both hosts: the socket path is the same on every host.
    let disk = libvirt::vhost_disk_xml(hv1, SHARED);
    assert_eq!(disk, libvirt::vhost_disk_xml(hv2, SHARED));
    for host in [hv1, hv2] {
        define(host, "vm6", &image, &disk);
    }

    let out = hv1.virsh(&["start", "vm6"]);
    assert!(
        out.status.success(),
        "virsh start on hv1 failed: {}\nhook log:\n{}\nqemu log:\n{}",
        out.stderr,
        hv1.hook_log(),
        hv1.qemu_log("vm6")
    );
    hv1.wait_volume_status(
        SHARED,
        "QEMU on hv1 holds the volume",
        Duration::from_secs(60),
        |s| s["role"] == "Primary" && s["open_writers"] == 1,
    );
    hv2.wait_volume_status(
        SHARED,
        "hv1 seen as Primary",
        Duration::from_secs(60),
        |s| {
            s["peers"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|p| p["node"] == "hv1" && p["role"] == "Primary")
        },
    );
    let refused = hv2.virsh(&["start", "vm6"]).failed();
    eprintln!("[libvirt vhost-user] hv2 refused: {}", refused.trim());
    assert!(
        refused.contains(&format!("tandem: {SHARED} is Primary on hv1")),
        "virsh start on hv2 should show the hook's refusal, got: {refused}"
    );
    assert_eq!(hv2.domstate("vm6"), "shut off");
    assert_eq!(hv1.domstate("vm6"), "running");
    assert_eq!(hv2.volume_status(SHARED)["role"], "Secondary");

    // Destroyed on hv1, the hook demotes there; then hv2 may start it.
    hv1.virsh(&["destroy", "vm6"]).ok();
    assert_eq!(hv1.volume_status(SHARED)["role"], "Secondary");
    hv2.wait_volume_status(
        SHARED,
        "hv1 seen as Secondary",
        Duration::from_secs(60),
        |s| {
            s["peers"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|p| p["node"] == "hv1" && p["role"] == "Secondary")
        },
    );
    let out = hv2.virsh(&["start", "vm6"]);
    assert!(
        out.status.success(),
        "virsh start on hv2 after hv1 let go failed: {}\nhook log:\n{}",
        out.stderr,
        hv2.hook_log()
    );
    hv2.wait_volume_status(
        SHARED,
        "QEMU on hv2 holds the volume",
        Duration::from_secs(60),
        |s| s["role"] == "Primary" && s["open_writers"] == 1,
    );
    hv2.virsh(&["destroy", "vm6"]).ok();
    assert_eq!(hv2.volume_status(SHARED)["role"], "Secondary");
}
