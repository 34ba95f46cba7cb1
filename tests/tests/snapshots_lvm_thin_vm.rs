//! Snapshots, rollback and linked clones on real dm-thin, inside a TCG guest (the host
//! kernel has no device-mapper): two `tandemd`s in the guest, on loopback with their own
//! ports, each with its own VG and thin pool on its own virtio disk. The acknowledged-write
//! checker writes to a replicated volume while `tandem snapshot create` runs; both thin
//! snapshots are sha256-identical, a consistent cut of the checker's log, and the write
//! pause is printed; rollback (refused while open) gives both replicas the snapshot's bytes
//! with no resync; a linked clone of a 10 GiB read-only base is timed and its allocation in
//! the thin pool measured. Where the snapshot's and the clone's time went (each phase, lvm
//! command and peer call of both daemons, logged at debug) is printed beside them. Each
//! node's lvm sees only its own disk and locks in its own directory, as on two hosts; the
//! two still share this one guest's CPU.
//!
//! A guest then boots from the clone while the base is read-only: hv1 serves it over NBD
//! on TCP, forwarded to the host by QEMU user networking, and a second TCG guest on the host
//! mounts it as its root file system and runs its init (the base holds that file system,
//! written through Tandem before it became a template); the base's bytes stay unchanged on
//! both replicas and the clone's replicas stay identical.
//!
//! Needs root, `qemu-system-x86_64`, `mkfs.ext4`, a static `/bin/busybox`, apt access to Debian's kernel package and
//! `cargo build --workspace --bins`; `TANDEM_SKIP_VM_TESTS=1` skips explicitly.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use tandem_tests::checker::cut::check_cut;
use tandem_tests::vm::{self, Disk, ImageBuilder, Vm};

const GIB: u64 = 1 << 30;
const BLOCKS: u64 = 256;
const POOL_BYTES: f64 = 11.0 * GIB as f64;

const SCRIPT: &str = r#"
LVS="lvs --reportformat json --units b --nosuffix -o lv_name,lv_size,data_percent"
set -e
section setup sh -c 'pvcreate -q /dev/vda /dev/vdb && vgcreate -q vg_a /dev/vda &&
    vgcreate -q vg_b /dev/vdb && lvcreate -q -L 11G -T vg_a/thin && lvcreate -q -L 11G -T vg_b/thin'
set +e
echo "guest-test-secret" >/tmp/secret
chmod 600 /tmp/secret
for n in 1 2; do
    vg=$(test $n = 1 && echo vg_a || echo vg_b)
    disk=$(test $n = 1 && echo vda || echo vdb)
    mkdir -p /tmp/hv$n/state /tmp/hv$n/run /tmp/hv$n/lvm /tmp/hv$n/lock
    # As on two hosts, each node's lvm sees its own disk only and locks in its own
    # directory (LVM_SYSTEM_DIR below): the two nodes' commands do not wait for each other.
    cat >/tmp/hv$n/lvm/lvm.conf <<EOF
activation { udev_sync = 0 udev_rules = 0 verify_udev_operations = 1 monitoring = 0 }
global { use_lvmpolld = 0 locking_dir = "/tmp/hv$n/lock" }
devices { obtain_device_list_from_udev = 0 hints = "none" filter = [ "a|^/dev/$disk\$|", "r|.*|" ] }
EOF
    cat >/tmp/hv$n/tandem.toml <<EOF
node = "hv$n"
state_dir = "/tmp/hv$n/state"
run_dir = "/tmp/hv$n/run"
secret_file = "/tmp/secret"
[[nodes]]
name = "hv1"
control = "127.0.0.1:7701"
replication = "127.0.0.1:7781"
[[nodes]]
name = "hv2"
control = "127.0.0.1:7702"
replication = "127.0.0.1:7782"
[[pools]]
name = "nvme"
backend = "lvm-thin"
vg = "$vg"
thinpool = "thin"
[nbd]
tcp_listen = "0.0.0.0:1080$((7 + n))"
EOF
    LVM_SYSTEM_DIR=/tmp/hv$n/lvm \
    RUST_LOG=info,volume_driver::phases=debug,volume_driver::pool::lvm_thin=debug,volume_driver::peer=debug,volume_driver::server=debug \
        tandemd --config /tmp/hv$n/tandem.toml >/tmp/hv$n.log 2>&1 &
done
T1="tandem --config /tmp/hv1/tandem.toml"
T2="tandem --config /tmp/hv2/tandem.toml"
# The guest's own lvm commands on a node's VG go through that node's lvm config.
L1="env LVM_SYSTEM_DIR=/tmp/hv1/lvm"
L2="env LVM_SYSTEM_DIR=/tmp/hv2/lvm"
i=0
while [ ! -S /tmp/hv1/run/tandemd.sock ] || [ ! -S /tmp/hv2/run/tandemd.sock ]; do
    sleep 0.2; i=$((i + 1)); [ $i -lt 300 ] || break
done
# Both replicas UpToDate and Connected, both Secondary.
settled() {
    s=$($T1 volume status $1 --json 2>/dev/null)
    [ "$(echo "$s" | grep -c '"disk_state": "UpToDate"')" -ge 2 ] &&
        [ "$(echo "$s" | grep -c '"role": "Secondary"')" -ge 2 ] &&
        echo "$s" | grep -q '"connection": "Connected"'
}
wait_settled() {
    i=0
    while ! settled $1; do sleep 0.5; i=$((i + 1)); [ $i -lt 240 ] || return 1; done
}
now() { cut -d' ' -f1 /proc/uptime; }
# Where the time of a command went: both daemons' phase, lvm and peer-call timings logged
# since `mark`.
mark() { for n in 1 2; do wc -l </tmp/hv$n.log >/tmp/mark$n; done; }
timings() {
    for n in 1 2; do
        tail -n +$(( $(cat /tmp/mark$n) + 1 )) /tmp/hv$n.log |
            grep -E 'phase done|lvm ran|peer call answered|peer connected|request answered' |
            sed "s/^[^ ]* *DEBUG /hv$n /"
    done
}

# Reference: one bare thin snapshot by hand in this guest (LVM's own cost under TCG).
$L1 lvcreate -q -V 16M -T vg_a/thin -n ref
t0=$(now)
section ref_snapshot $L1 lvcreate -q -n ref_s -pr -s vg_a/ref
t1=$(now)
section ref_snapshot_time echo "$t0 $t1"
$L1 lvremove -qy vg_a/ref_s vg_a/ref

section create $T1 volume create v1 --size 16M --replicas 2 --pool nvme
section settled_created wait_settled v1
# The writer runs until it is stopped (SIGTERM) after the refused rollback below.
tandem-check write --socket /tmp/hv1/run/nbd.sock --export v1 --blocks 256 --log /tmp/check.log \
    --duration 600 --seed 18 --flush-every 32 >/tmp/check.out 2>&1 &
writer=$!
i=0
acked() { k=$(grep -c '^K ' /tmp/check.log 2>/dev/null); echo "${k:-0}"; }
while [ "$(acked)" -lt 100 ] && [ $i -lt 300 ]; do
    sleep 0.2; i=$((i + 1))
done
mark
before=$(wc -c </tmp/check.log)
section snapshot $T1 snapshot create v1 s1 --json
after=$(wc -c </tmp/check.log)
section snapshot_timings timings
section cut echo "$before $after"
section rollback_open $T1 snapshot rollback v1 s1
kill -TERM $writer
wait $writer
section writer_exit sh -c "cat /tmp/check.out; exit $?"
section settled_written wait_settled v1
$L1 lvchange -ay -K vg_a/v1+s1
$L2 lvchange -ay -K vg_b/v1+s1
section snap_sha sh -c 'sha256sum /dev/vg_a/v1+s1 /dev/vg_b/v1+s1 | cut -d" " -f1'
section snap_blocks sh -c 'dd if=/dev/vg_a/v1+s1 bs=4096 count=256 2>/dev/null | base64'
section check_log cat /tmp/check.log

logs=$(cat /tmp/hv1.log /tmp/hv2.log | grep -c 'resync starts')
section rollback $T1 snapshot rollback v1 s1 --json
section rolled_sha sh -c 'sha256sum /dev/vg_a/v1 /dev/vg_b/v1 | cut -d" " -f1'
section settled_rolled wait_settled v1
section resyncs_after_rollback sh -c "echo \$(( \$(cat /tmp/hv1.log /tmp/hv2.log | grep -c 'resync starts') - $logs ))"

section base $T1 volume create base-100-disk-0 --size 10G --replicas 2 --pool nvme
section settled_base wait_settled base-100-disk-0
# The template's bytes: a small bootable root file system, written through hv1's export.
ROOT_IMG=/usr/local/share/root.img
section put_root tandem-check put --socket /tmp/hv1/run/nbd.sock --export base-100-disk-0 $ROOT_IMG
section settled_put wait_settled base-100-disk-0
root_sha() { head -c $(wc -c <$ROOT_IMG) $1 | sha256sum | cut -d" " -f1; }
section base_sha echo $(root_sha $ROOT_IMG) $(root_sha /dev/vg_a/base-100-disk-0) $(root_sha /dev/vg_b/base-100-disk-0)
section read_only $T1 volume set base-100-disk-0 --read-only
# Reference: LVM's own cost of the clone's one command, timed just before it (TCG guests
# slow down with the host's load).
t0=$(now)
section ref_clone $L1 lvcreate -q -n ref_c -prw -kn -s vg_a/base-100-disk-0
t1=$(now)
section ref_clone_time echo "$t0 $t1"
$L1 lvremove -qy vg_a/ref_c
# Reference: one trivial CLI round trip (`tandem` starting and asking the daemon).
t0=$(now)
section ref_cli $T1 volume show base-100-disk-0
t1=$(now)
section ref_cli_time echo "$t0 $t1"
section lvs_before_clone $L1 $LVS vg_a
mark
t0=$(now)
section clone $T1 volume clone base-100-disk-0 vm-101-disk-0 --json
t1=$(now)
section clone_time echo "$t0 $t1"
section clone_timings timings
section lvs_after_clone $L1 $LVS vg_a
section settled_clone wait_settled vm-101-disk-0
# The host boots a guest from the clone through hv1's NBD port (QEMU user networking);
# the guest closing it demotes hv1 again.
ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0
section clone_ready echo "serving vm-101-disk-0 on 10.0.2.15:10808"
i=0
until grep -q 'last writer closed; demoted volume=vm-101-disk-0' /tmp/hv1.log; do
    sleep 1; i=$((i + 1)); [ $i -lt 600 ] || break
done
section settled_booted wait_settled vm-101-disk-0
section base_sha_after echo $(root_sha /dev/vg_a/base-100-disk-0) $(root_sha /dev/vg_b/base-100-disk-0)
section clone_sha echo $(root_sha /dev/vg_a/vm-101-disk-0) $(root_sha /dev/vg_b/vm-101-disk-0)
section delete_base $T1 volume delete base-100-disk-0
section daemon_logs sh -c 'tail -n 40 /tmp/hv1.log /tmp/hv2.log'
exit 0
"#;

/// Seconds between the two uptimes a section printed.
fn elapsed(run: &vm::GuestRun, section: &str) -> f64 {
    let times: Vec<f64> = run
        .section(section)
        .split_whitespace()
        .map(|t| t.parse().expect("uptime"))
        .collect();
    assert_eq!(times.len(), 2, "{}", run.describe(section));
    times[1] - times[0]
}

fn percent(report: &serde_json::Value, lv: &str) -> f64 {
    report["report"][0]["lv"]
        .as_array()
        .and_then(|lvs| lvs.iter().find(|l| l["lv_name"] == lv))
        .and_then(|l| l["data_percent"].as_str())
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no data_percent of {lv} in {report}"))
}

/// A free TCP port on the host's loopback (for QEMU's `hostfwd`).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A small ext4 root file system for the template: a static busybox and an `/sbin/init`
/// that prints `marker` and writes a file (into the writable clone it runs from).
fn make_root_image(tree: &Path, image: &Path, marker: &str) {
    for d in ["bin", "sbin", "etc", "var"] {
        std::fs::create_dir_all(tree.join(d)).expect("root tree");
    }
    std::fs::copy("/bin/busybox", tree.join("bin/busybox")).expect("static busybox");
    let init = format!(
        "#!/bin/busybox sh\n/bin/busybox echo {marker}\n\
         /bin/busybox echo booted >/var/booted && /bin/busybox sync\n"
    );
    std::fs::write(tree.join("sbin/init"), init).expect("init");
    std::fs::set_permissions(
        tree.join("sbin/init"),
        std::fs::Permissions::from_mode(0o755),
    )
    .expect("chmod init");
    let status = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "tandem-root", "-d"])
        .arg(tree)
        .arg(image)
        .arg("16M")
        .status()
        .expect("running mkfs.ext4 (e2fsprogs)");
    assert!(status.success(), "mkfs.ext4 -d failed");
}

/// Once the LVM guest serves the clone (section `clone_ready`), boot a second guest on the
/// host from it through the forwarded NBD port: its kernel and initramfs are the host's, its
/// root file system and the init it runs are the clone's. `None` if the LVM guest never got
/// there (its own assertions then say why).
fn boot_from_clone(dir: &tempfile::TempDir, console: &Path, port: u16) -> Option<vm::GuestRun> {
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let text = std::fs::read_to_string(console).unwrap_or_default();
        if text.contains("@@STATUS clone_ready 0") {
            break;
        }
        if text.contains("@@GUEST-EXIT") || Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let image = ImageBuilder::new(BOOT_SCRIPT)
        .build(&dir.path().join("boot-image"))
        .expect("building the boot guest's initramfs");
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let run = Vm::new(image)
        .disk(Disk::nbd_tcp(addr, "vm-101-disk-0"))
        .timeout(Duration::from_secs(300))
        .run(&dir.path().join("boot.log"))
        .expect("booting a guest from the clone");
    Some(run)
}

/// The guest booted from the clone: mount it as its root file system and run its init.
const BOOT_SCRIPT: &str = r#"set -e
mkdir -p /newroot
mount -t ext4 /dev/vda /newroot
section boot chroot /newroot /sbin/init
umount /newroot
"#;

#[test]
fn snapshots_and_linked_clones_on_two_nodes_with_dm_thin() {
    if vm::skip_requested() {
        eprintln!("TANDEM_SKIP_VM_TESTS is set: skipping guest test");
        return;
    }
    let started = Instant::now();
    let dir = tempfile::Builder::new()
        .prefix("tandem-snap-vm-")
        .tempdir()
        .expect("temp dir");
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let marker = format!("TANDEM-CLONE-BOOTED {nonce}");
    let root_img = dir.path().join("root.img");
    make_root_image(&dir.path().join("root"), &root_img, &marker);
    let image = ImageBuilder::new(SCRIPT)
        .file(&root_img, "/usr/local/share/root.img")
        .file(tandem_tests::bin("tandemd"), "/usr/local/bin/tandemd")
        .file(tandem_tests::bin("tandem"), "/usr/local/bin/tandem")
        .file(
            tandem_tests::bin("tandem-check"),
            "/usr/local/bin/tandem-check",
        )
        // `lvcreate -s` wants the snapshot target even for a thin snapshot.
        .module("dm_snapshot")
        .module("virtio_net")
        .build(&dir.path().join("image"))
        .expect("building the guest initramfs (tests/vm/build-initramfs)");
    // hv1's NBD TCP port, forwarded to the host for the guest that boots from the clone.
    let nbd_port = free_port();
    // Two vCPUs: the two nodes' `lvcreate`s run at the same time, as on two hosts.
    let mut guest = Vm::new(image)
        .memory_mib(1024)
        .cpus(2)
        .timeout(Duration::from_secs(900))
        .qemu_arg("-netdev")
        .qemu_arg(format!(
            "user,id=n0,hostfwd=tcp:127.0.0.1:{nbd_port}-:10808"
        ))
        .qemu_arg("-device")
        .qemu_arg("virtio-net-pci,netdev=n0,romfile=");
    for disk in ["a.img", "b.img"] {
        let path = dir.path().join(disk);
        std::fs::File::create(&path)
            .and_then(|f| f.set_len(12 * GIB))
            .expect("disk image");
        guest = guest.disk(Disk::raw(&path));
    }
    let console = dir.path().join("console.log");
    let running = guest.spawn(&console).expect("booting the guest");
    let (run, booted) = std::thread::scope(|scope| {
        let booted = scope.spawn(|| boot_from_clone(&dir, &console, nbd_port));
        let run = running.wait().expect("running the guest");
        (run, booted.join().expect("the boot thread"))
    });
    eprintln!(
        "{}; test total {:.1}s",
        run.timing_summary(),
        started.elapsed().as_secs_f64()
    );
    run.assert_script_succeeded();
    let logs = || run.describe("daemon_logs");
    for step in [
        "create",
        "settled_created",
        "snapshot",
        "writer_exit",
        "settled_written",
    ] {
        assert_eq!(run.status(step), 0, "{}\n{}", run.describe(step), logs());
    }

    // The snapshot under writes: pause, identical on both replicas, a consistent cut.
    let snap = run.json("snapshot");
    let pause_ms = snap["pause_ms"].as_u64().expect("pause_ms");
    eprintln!(
        "dm-thin, 2 nodes in TCG: write pause during `tandem snapshot create`: {pause_ms} ms\n\
         where the time went:\n{}",
        run.section("snapshot_timings")
    );
    let shas: Vec<&str> = run.section("snap_sha").split_whitespace().collect();
    assert_eq!(shas.len(), 2, "{}", run.describe("snap_sha"));
    assert_eq!(shas[0], shas[1], "the replicas' thin snapshots differ");
    let cut: Vec<usize> = run
        .section("cut")
        .split_whitespace()
        .map(|n| n.parse().expect("log offset"))
        .collect();
    assert_eq!(cut.len(), 2, "{}", run.describe("cut"));
    let image = tandem_tests::lab::agent::decode(run.section("snap_blocks")).expect("base64");
    let acked = check_cut(&image, BLOCKS, run.section("check_log"), cut[0], cut[1])
        .unwrap_or_else(|e| panic!("not a consistent cut: {e}"));
    eprintln!("consistent cut: {acked} blocks acknowledged before the snapshot, all in it");
    run.assert_section_failed("rollback_open");
    assert!(
        run.section("rollback_open.stderr")
            .contains("in use on hv1"),
        "{}",
        run.describe("rollback_open")
    );

    // Rollback: both replicas hold the snapshot's bytes; no resync followed.
    run.assert_section_ok("rollback");
    let rolled: Vec<&str> = run.section("rolled_sha").split_whitespace().collect();
    assert_eq!(
        rolled, shas,
        "the replicas do not hold the snapshot after rollback"
    );
    assert_eq!(run.status("settled_rolled"), 0, "{}", logs());
    assert_eq!(
        run.section("resyncs_after_rollback").trim(),
        "0",
        "{}",
        logs()
    );

    // A linked clone of a 10 GiB read-only base.
    for step in [
        "base",
        "settled_base",
        "read_only",
        "clone",
        "settled_clone",
    ] {
        assert_eq!(run.status(step), 0, "{}\n{}", run.describe(step), logs());
    }
    let took = elapsed(&run, "clone_time");
    let grown = (percent(&run.json("lvs_after_clone"), "thin")
        - percent(&run.json("lvs_before_clone"), "thin"))
        * POOL_BYTES
        / 100.0;
    let share = grown / (10.0 * GIB as f64) * 100.0;
    eprintln!(
        "linked clone of a 10 GiB base on 2 replicas (dm-thin, under TCG): {took:.2} s, \
         thin pool grew {grown:.0} bytes = {share:.3}% of the clone's size\n\
         where the time went:\n{}",
        run.section("clone_timings")
    );
    assert!(share < 1.0, "the clone allocated {share:.3}% of its size");
    assert_eq!(run.json("clone")["clone_of"], "base-100-disk-0");

    // A guest booted from the clone while the base is a read-only template; the base's
    // bytes stayed those written, on both replicas, and both clone replicas agree.
    let booted = booted.unwrap_or_else(|| panic!("the clone was never served\n{}", logs()));
    eprintln!("[guest booted from the clone] {}", booted.timing_summary());
    booted.assert_script_succeeded();
    assert!(
        booted.section("boot").contains(&marker),
        "{}",
        booted.describe("boot")
    );
    for step in ["put_root", "settled_put", "settled_booted"] {
        assert_eq!(run.status(step), 0, "{}\n{}", run.describe(step), logs());
    }
    let base: Vec<&str> = run.section("base_sha").split_whitespace().collect();
    assert_eq!(base.len(), 3, "{}", run.describe("base_sha"));
    assert!(
        base[1] == base[0] && base[2] == base[0],
        "the base does not hold the root image on both replicas: {base:?}"
    );
    let after: Vec<&str> = run.section("base_sha_after").split_whitespace().collect();
    assert_eq!(
        after,
        base[1..],
        "the read-only base changed while a clone booted"
    );
    let clone: Vec<&str> = run.section("clone_sha").split_whitespace().collect();
    assert_eq!(clone.len(), 2, "{}", run.describe("clone_sha"));
    assert_eq!(
        clone[0], clone[1],
        "the clone's replicas differ after the boot"
    );
    assert_ne!(
        clone[0], base[0],
        "the booted guest wrote nothing to its clone"
    );
    run.assert_section_failed("delete_base");
    assert!(
        run.section("delete_base.stderr").contains("vm-101-disk-0"),
        "{}",
        run.describe("delete_base")
    );
    // Last, so that every other figure above is measured and printed first. The goal is
    // the issue's 1 s plus what one bare `lvcreate -s` costs in this TCG guest (measured
    // above): under TCG, LVM's own command dominates (on the XFS reflink test on the host,
    // tests/tests/snapshots.rs, the pause is tens of ms against the plain 1 s).
    run.assert_section_ok("ref_snapshot");
    let lvm_ms = elapsed(&run, "ref_snapshot_time") * 1000.0;
    run.assert_section_ok("ref_clone");
    let clone_lvm_ms = elapsed(&run, "ref_clone_time") * 1000.0;
    run.assert_section_ok("ref_cli");
    let cli_ms = elapsed(&run, "ref_cli_time") * 1000.0;
    eprintln!(
        "reference in this guest: one bare `lvcreate -s` takes {lvm_ms:.0} ms before the \
         snapshot, {clone_lvm_ms:.0} ms before the clone, a trivial `tandem volume show` \
         {cli_ms:.0} ms; write pause {pause_ms} ms; clone {:.0} ms",
        took * 1000.0
    );
    // Reported, not asserted: a test never fails on time (the machine's load decides it);
    // the figures above are the measurement.
    let goal = if (pause_ms as f64) <= 1000.0 + lvm_ms {
        "within"
    } else {
        "NOT within"
    };
    eprintln!("write pause {pause_ms} ms: {goal} 1 s + one lvcreate ({lvm_ms:.0} ms)");
}
