//! The README's virt-install flow: a domain created by `virt-install` with the `--disk`
//! argument printed by `tandem-libvirt-hook virt-install-disk` boots a TCG guest from a
//! Tandem volume under a real libvirtd with the hook installed; the guest writes a pattern
//! that is then read back from the volume through tandemd's NBD socket.
//!
//! Needs what `libvirt_start_stop.rs` needs plus `virt-install` (Debian package virtinst);
//! `TANDEM_SKIP_LIBVIRT_TESTS=1` skips.

use std::process::Command;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tandem_tests::libvirt::{self, LibvirtHost};
use tandem_tests::vm::{self, GuestRun, ImageBuilder, Vm};

const BYTES: usize = 1 << 20;

#[test]
fn virt_install_line_from_the_readme_boots_a_guest_on_a_tandem_volume() {
    if libvirt::skip_requested() {
        eprintln!("TANDEM_SKIP_LIBVIRT_TESTS is set: skipping libvirt test");
        return;
    }
    libvirt::require_tools().unwrap();
    assert!(
        libvirt::which("virt-install").is_some(),
        "virt-install not found: install the Debian package virtinst (or set TANDEM_SKIP_LIBVIRT_TESTS=1)"
    );
    let started = Instant::now();
    let host = LibvirtHost::start("hv1").unwrap();
    let nonce = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let pattern = format!("virt-install pattern {nonce}");
    let work = host.path("guest");
    let image = ImageBuilder::new(libvirt::write_pattern_script(&pattern, BYTES))
        .build(&work.join("image"))
        .expect("building the guest initramfs");
    let cmdline = Vm::new(image.clone()).kernel_cmdline();

    host.tandem(&["volume", "create", "vm-2-disk-0", "--size", "64M"])
        .ok();
    // As in the README: virt-install ... $(tandem-libvirt-hook virt-install-disk VOLUME)
    let disk_args = host
        .exec("tandem-libvirt-hook", &["virt-install-disk", "vm-2-disk-0"])
        .ok()
        .stdout;
    let disk_args: Vec<&str> = disk_args.split_whitespace().collect();
    assert_eq!(disk_args[0], "--disk", "{disk_args:?}");
    let console = work.join("console.log");
    let boot = Instant::now();
    let out = Command::new("virt-install")
        .arg("--connect")
        .arg(host.uri())
        .args(["--name", "vm2", "--memory", "512", "--vcpus", "1"])
        .args(["--virt-type", "qemu", "--arch", "x86_64", "--machine", "pc"])
        .args(["--osinfo", "detect=off,require=off", "--import"])
        .arg("--boot")
        .arg(format!(
            "kernel={},initrd={},kernel_args={cmdline}",
            image.kernel.display(),
            image.initrd.display()
        ))
        .args(&disk_args)
        .arg("--serial")
        .arg(format!("file,path={}", console.display()))
        .args(["--graphics", "none", "--network", "none", "--sound", "none"])
        .args([
            "--events",
            "on_poweroff=destroy,on_reboot=destroy,on_crash=destroy",
        ])
        .args(["--noautoconsole", "--wait", "0"])
        .output()
        .expect("running virt-install");
    assert!(
        out.status.success(),
        "virt-install failed: {}\n{}\nhook log:\n{}\nqemu log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        host.hook_log(),
        host.qemu_log("vm2")
    );
    let dumped = host.virsh(&["dumpxml", "--inactive", "vm2"]).ok().stdout;
    assert!(
        dumped.contains("<source protocol=\"nbd\" name=\"vm-2-disk-0\">")
            || dumped.contains("<source protocol='nbd' name='vm-2-disk-0'>"),
        "{dumped}"
    );
    let finished = host.wait_domstate("vm2", "shut off", vm::DEFAULT_TIMEOUT);
    let boot_time = boot.elapsed();
    let run = GuestRun::from_console(&std::fs::read_to_string(&console).unwrap_or_default());
    if !finished {
        host.virsh(&["destroy", "vm2"]);
    }
    assert!(
        finished,
        "guest did not power off within {:?}; state {}; console:\n{}",
        vm::DEFAULT_TIMEOUT,
        host.domstate("vm2"),
        run.console
    );
    run.assert_script_succeeded();
    assert_eq!(
        run.section("written").split_whitespace().next(),
        run.section("readback").split_whitespace().next()
    );
    let log = host.hook_log();
    assert!(log.contains("domain=vm2 op=Prepare"), "hook log:\n{log}");

    let out = Command::new("nbdcopy")
        .arg(format!(
            "nbd+unix:///vm-2-disk-0?socket={}",
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
        out.stdout[..BYTES] == libvirt::pattern_bytes(&pattern, BYTES)[..],
        "bytes read over NBD differ from the pattern"
    );
    eprintln!(
        "[libvirt virt-install] virt-install to poweroff {:.1}s (guest script from uptime {:.1}s to {:.1}s); test total {:.1}s",
        boot_time.as_secs_f64(),
        run.guest_uptime_at_start.map_or(f64::NAN, |d| d.as_secs_f64()),
        run.guest_uptime_at_exit.map_or(f64::NAN, |d| d.as_secs_f64()),
        started.elapsed().as_secs_f64()
    );
}
