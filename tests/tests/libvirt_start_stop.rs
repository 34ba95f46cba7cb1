//! A real libvirtd (Debian's, one simulated host) with the Tandem hook installed starts a
//! TCG guest whose virtio disk is a Tandem volume (the `<disk>` from
//! `tandem-libvirt-hook disk-xml`); the guest writes a known pattern to /dev/vda and powers
//! off; the pattern is read back from the volume through tandemd's NBD socket and from its
//! backing file. A domain whose Tandem disk names a volume this host does not have is
//! refused by the hook with its message, and stays shut off.
//!
//! Until the replication engine lands, tandemd has no roles: the hook logs that the volume
//! is single-host and promotes nothing (see `libvirt_hook::control`).
//!
//! Needs root, libvirt-daemon + libvirt-daemon-driver-qemu + libvirt-clients, QEMU,
//! libnbd-bin (nbdcopy) and the guest kernel download; `TANDEM_SKIP_LIBVIRT_TESTS=1` skips.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tandem_tests::libvirt::{self, LibvirtHost};
use tandem_tests::tail;
use tandem_tests::vm::{self, GuestRun, ImageBuilder, Vm};

const BYTES: usize = 1 << 20;

fn nonce() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// The first `len` bytes of export `volume` on `socket`, read with nbdcopy.
fn read_over_nbd(socket: &std::path::Path, volume: &str, len: usize) -> Vec<u8> {
    let out = std::process::Command::new("nbdcopy")
        .arg(format!("nbd+unix:///{volume}?socket={}", socket.display()))
        .arg("-")
        .output()
        .expect("running nbdcopy (Debian package libnbd-bin)");
    assert!(
        out.status.success(),
        "nbdcopy failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout[..len.min(out.stdout.len())].to_vec()
}

#[test]
fn virsh_start_boots_a_guest_on_a_tandem_volume_and_the_hook_refuses_unknown_volumes() {
    if libvirt::skip_requested() {
        eprintln!("TANDEM_SKIP_LIBVIRT_TESTS is set: skipping libvirt test");
        return;
    }
    libvirt::require_tools().unwrap();
    let started = Instant::now();
    let host = LibvirtHost::start("hv1").unwrap();

    let pattern = format!("tandem libvirt pattern {}", nonce());
    let work = host.path("guest");
    let image = ImageBuilder::new(libvirt::write_pattern_script(&pattern, BYTES))
        .build(&work.join("image"))
        .expect("building the guest initramfs");
    let cmdline = Vm::new(image.clone()).kernel_cmdline();

    // --- refused: the disk names a volume hv1 does not have -----------------------------
    let missing_disk = host
        .exec(
            "tandem-libvirt-hook",
            &["disk-xml", "vm-9-disk-0", "--target", "vda"],
        )
        .ok()
        .stdout;
    let console_missing = work.join("missing-console.log");
    let xml = libvirt::tcg_domain_xml("vm9", &image, &cmdline, &missing_disk, &console_missing);
    std::fs::write(work.join("vm9.xml"), &xml).unwrap();
    host.virsh(&["define", work.join("vm9.xml").to_str().unwrap()])
        .ok();
    let refused = host.virsh(&["start", "vm9"]).failed();
    assert!(
        refused.contains("vm-9-disk-0: no such Tandem volume on hv1"),
        "virsh start should show the hook's message, got: {refused}"
    );
    eprintln!(
        "[libvirt start/stop] virsh start refused: {}",
        refused.trim()
    );
    assert_eq!(host.domstate("vm9"), "shut off");
    assert!(!console_missing.exists() || std::fs::read(&console_missing).unwrap().is_empty());

    // --- started: a guest writes the pattern to its Tandem disk -------------------------
    host.tandem(&["volume", "create", "vm-1-disk-0", "--size", "64M"])
        .ok();
    let disk = host
        .exec(
            "tandem-libvirt-hook",
            &["disk-xml", "vm-1-disk-0", "--target", "vda"],
        )
        .ok()
        .stdout;
    assert!(disk.contains("socket='/run/tandem/nbd.sock'"), "{disk}");
    let console = work.join("console.log");
    let xml = libvirt::tcg_domain_xml("vm1", &image, &cmdline, &disk, &console);
    std::fs::write(work.join("vm1.xml"), &xml).unwrap();
    host.virsh(&["define", work.join("vm1.xml").to_str().unwrap()])
        .ok();
    let boot = Instant::now();
    let out = host.virsh(&["start", "vm1"]);
    assert!(
        out.status.success(),
        "virsh start failed: {}\nhook log:\n{}\ntandemd log (tail):\n{}\nqemu log:\n{}",
        out.stderr,
        host.hook_log(),
        tail(&host.tandemd_log(), 30),
        host.qemu_log("vm1")
    );
    let finished = host.wait_domstate("vm1", "shut off", vm::DEFAULT_TIMEOUT);
    let boot_time = boot.elapsed();
    let run = GuestRun::from_console(&std::fs::read_to_string(&console).unwrap_or_default());
    if !finished {
        host.virsh(&["destroy", "vm1"]);
    }
    assert!(
        finished,
        "guest did not power off within {:?}; console:\n{}",
        vm::DEFAULT_TIMEOUT,
        tail(&run.console, 40)
    );
    run.assert_script_succeeded();
    let written = run.section("written").split_whitespace().next().unwrap();
    let readback = run.section("readback").split_whitespace().next().unwrap();
    assert_eq!(written, readback, "the guest read back different bytes");

    // The hook ran around the domain's life.
    let log = host.hook_log();
    assert!(
        log.contains("vm1") && log.contains("Prepare"),
        "hook log:\n{log}"
    );
    assert!(log.contains("Release"), "hook log:\n{log}");

    // The pattern is on the volume: through tandemd's NBD export and in the backing file.
    let expected = libvirt::pattern_bytes(&pattern, BYTES);
    let over_nbd = read_over_nbd(&host.nbd_socket(), "vm-1-disk-0", BYTES);
    assert!(
        over_nbd == expected,
        "bytes read over NBD differ from the pattern"
    );
    let show = host
        .tandem(&["volume", "show", "vm-1-disk-0", "--json"])
        .ok();
    let path = show.json()["path"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| panic!("no path in {}", show.stdout));
    let file = std::fs::read(&path).unwrap();
    assert!(
        file[..BYTES] == expected[..],
        "backing file {path} does not hold the pattern"
    );
    eprintln!(
        "[libvirt start/stop] virsh start to poweroff {:.1}s (guest script from uptime {:.1}s to {:.1}s); test total {:.1}s",
        boot_time.as_secs_f64(),
        run.guest_uptime_at_start.map_or(f64::NAN, |d| d.as_secs_f64()),
        run.guest_uptime_at_exit.map_or(f64::NAN, |d| d.as_secs_f64()),
        started.elapsed().as_secs_f64()
    );
}

/// `tandem-libvirt-hook install` (which reloads libvirtd) run on a host whose libvirtd started without any
/// hook: libvirtd uses the hook from the next domain start on.
#[test]
fn install_with_reload_activates_the_hook_in_a_running_libvirtd() {
    if libvirt::skip_requested() {
        eprintln!("TANDEM_SKIP_LIBVIRT_TESTS is set: skipping libvirt test");
        return;
    }
    libvirt::require_tools().unwrap();
    let started = Instant::now();
    let host = LibvirtHost::start_with("hv1", false).unwrap();
    let work = host.path("guest");
    std::fs::create_dir_all(&work).unwrap();
    // No guest needs to boot: the domain is refused (or fails) before QEMU runs anything.
    let image = vm::GuestImage {
        kernel: work.join("vmlinuz"),
        initrd: work.join("initrd.gz"),
        build_time: std::time::Duration::ZERO,
    };
    std::fs::write(&image.kernel, b"not a kernel").unwrap();
    std::fs::write(&image.initrd, b"not an initrd").unwrap();
    let disk = host
        .exec(
            "tandem-libvirt-hook",
            &["disk-xml", "vm-8-disk-0", "--target", "vda"],
        )
        .ok()
        .stdout;
    let xml = libvirt::tcg_domain_xml("vm8", &image, "", &disk, &work.join("console.log"));
    std::fs::write(work.join("vm8.xml"), &xml).unwrap();
    host.virsh(&["define", work.join("vm8.xml").to_str().unwrap()])
        .ok();
    let before = host.virsh(&["start", "vm8"]).failed();
    assert!(
        !before.contains("no such Tandem volume"),
        "no hook is installed yet, but: {before}"
    );
    let out = host
        .exec(
            "tandem-libvirt-hook",
            &["install", "--hooks-dir", "/etc/libvirt/hooks"],
        )
        .ok();
    assert!(out.stdout.contains("reloaded libvirtd"), "{}", out.stdout);
    let mode = std::fs::metadata(host.path("etc-libvirt/hooks/qemu.d/tandem"))
        .unwrap()
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o755
    );
    // The reload is asynchronous: wait for the hook's refusal.
    let mut last = String::new();
    let refused = tandem_tests::wait_until(std::time::Duration::from_secs(20), || {
        last = host.virsh(&["start", "vm8"]).failed();
        last.contains("vm-8-disk-0: no such Tandem volume on hv1")
    });
    assert!(refused, "after install, virsh start said: {last}");
    eprintln!(
        "[libvirt install --reload] test total {:.1}s",
        started.elapsed().as_secs_f64()
    );
}

/// `virsh destroy` of a running guest: the hook's release runs, and what the guest wrote
/// (with fsync) before it was killed is on the volume.
#[test]
fn virsh_destroy_runs_the_release_hook_and_keeps_synced_writes() {
    if libvirt::skip_requested() {
        eprintln!("TANDEM_SKIP_LIBVIRT_TESTS is set: skipping libvirt test");
        return;
    }
    libvirt::require_tools().unwrap();
    let started = Instant::now();
    let host = LibvirtHost::start("hv1").unwrap();
    let pattern = format!("destroyed guest pattern {}", nonce());
    let work = host.path("guest");
    // Write, report, then keep running until destroyed.
    let script = format!(
        "{}echo @@WRITTEN-AND-WAITING\nsleep 3600\n",
        libvirt::write_pattern_script(&pattern, BYTES)
    );
    let image = ImageBuilder::new(script)
        .build(&work.join("image"))
        .expect("building the guest initramfs");
    let cmdline = Vm::new(image.clone()).kernel_cmdline();
    host.tandem(&["volume", "create", "vm-3-disk-0", "--size", "64M"])
        .ok();
    let disk = host
        .exec("tandem-libvirt-hook", &["disk-xml", "vm-3-disk-0"])
        .ok()
        .stdout;
    let console = work.join("console.log");
    let xml = libvirt::tcg_domain_xml("vm3", &image, &cmdline, &disk, &console);
    std::fs::write(work.join("vm3.xml"), &xml).unwrap();
    host.virsh(&["define", work.join("vm3.xml").to_str().unwrap()])
        .ok();
    host.virsh(&["start", "vm3"]).ok();
    let waiting = tandem_tests::wait_until(vm::DEFAULT_TIMEOUT, || {
        std::fs::read_to_string(&console)
            .unwrap_or_default()
            .contains("@@WRITTEN-AND-WAITING")
    });
    let run = GuestRun::from_console(&std::fs::read_to_string(&console).unwrap_or_default());
    assert!(
        waiting,
        "guest never reported its write; console:\n{}",
        tail(&run.console, 40)
    );
    assert_eq!(host.domstate("vm3"), "running");
    host.virsh(&["destroy", "vm3"]).ok();
    assert_eq!(host.domstate("vm3"), "shut off");
    let log = host.hook_log();
    assert!(
        log.contains("domain=vm3 op=Release"),
        "release hook did not run after destroy:\n{log}"
    );
    assert_eq!(
        run.section("written").split_whitespace().next(),
        run.section("readback").split_whitespace().next()
    );
    let over_nbd = read_over_nbd(&host.nbd_socket(), "vm-3-disk-0", BYTES);
    assert!(
        over_nbd == libvirt::pattern_bytes(&pattern, BYTES),
        "bytes read over NBD after destroy differ from the pattern"
    );
    eprintln!(
        "[libvirt destroy] test total {:.1}s",
        started.elapsed().as_secs_f64()
    );
}
