//! Snapshots, rollback and linked clones on real dm-thin, inside a TCG guest (the host
//! kernel has no device-mapper): two `tandemd`s in the guest, on loopback with their own
//! ports, each with its own VG and thin pool on its own virtio disk. The acknowledged-write
//! checker writes to a replicated volume while `tandem snapshot create` runs; both thin
//! snapshots are sha256-identical, a consistent cut of the checker's log, and the write
//! pause is printed; rollback (refused while open) gives both replicas the snapshot's bytes
//! with no resync; a linked clone of a 10 GiB read-only base is timed and its allocation in
//! the thin pool measured.
//!
//! Not here: booting a guest from the clone (a QEMU inside this TCG guest is too slow).
//! Needs root, `qemu-system-x86_64`, apt access to Debian's kernel package and
//! `cargo build --workspace --bins`; `TANDEM_SKIP_VM_TESTS=1` skips explicitly.

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
    mkdir -p /tmp/hv$n/state /tmp/hv$n/run
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
EOF
    tandemd --config /tmp/hv$n/tandem.toml >/tmp/hv$n.log 2>&1 &
done
T1="tandem --config /tmp/hv1/tandem.toml"
T2="tandem --config /tmp/hv2/tandem.toml"
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

# Reference: one bare thin snapshot by hand in this guest (LVM's own cost under TCG).
lvcreate -q -V 16M -T vg_a/thin -n ref
t0=$(now)
section ref_snapshot lvcreate -q -n ref_s -pr -s vg_a/ref
t1=$(now)
section ref_snapshot_time echo "$t0 $t1"
lvremove -qy vg_a/ref_s vg_a/ref

section create $T1 volume create v1 --size 16M --replicas 2 --pool nvme
section settled_created wait_settled v1
tandem-check write --socket /tmp/hv1/run/nbd.sock --export v1 --blocks 256 --log /tmp/check.log \
    --duration 15 --seed 18 --flush-every 32 >/tmp/check.out 2>&1 &
writer=$!
i=0
acked() { k=$(grep -c '^K ' /tmp/check.log 2>/dev/null); echo "${k:-0}"; }
while [ "$(acked)" -lt 100 ] && [ $i -lt 300 ]; do
    sleep 0.2; i=$((i + 1))
done
before=$(wc -c </tmp/check.log)
section snapshot $T1 snapshot create v1 s1 --json
after=$(wc -c </tmp/check.log)
section cut echo "$before $after"
section rollback_open $T1 snapshot rollback v1 s1
wait $writer
section writer_exit sh -c "cat /tmp/check.out; exit $?"
section settled_written wait_settled v1
lvchange -ay -K vg_a/v1+s1 vg_b/v1+s1
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
section read_only $T1 volume set base-100-disk-0 --read-only
section lvs_before_clone $LVS vg_a
t0=$(now)
section clone $T1 volume clone base-100-disk-0 vm-101-disk-0 --json
t1=$(now)
section clone_time echo "$t0 $t1"
section lvs_after_clone $LVS vg_a
section settled_clone wait_settled vm-101-disk-0
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
    let image = ImageBuilder::new(SCRIPT)
        .file(tandem_tests::bin("tandemd"), "/usr/local/bin/tandemd")
        .file(tandem_tests::bin("tandem"), "/usr/local/bin/tandem")
        .file(
            tandem_tests::bin("tandem-check"),
            "/usr/local/bin/tandem-check",
        )
        // `lvcreate -s` wants the snapshot target even for a thin snapshot.
        .module("dm_snapshot")
        .build(&dir.path().join("image"))
        .expect("building the guest initramfs (tests/vm/build-initramfs)");
    let mut guest = Vm::new(image)
        .memory_mib(1024)
        .timeout(Duration::from_secs(900));
    for disk in ["a.img", "b.img"] {
        let path = dir.path().join(disk);
        std::fs::File::create(&path)
            .and_then(|f| f.set_len(12 * GIB))
            .expect("disk image");
        guest = guest.disk(Disk::raw(&path));
    }
    let run = guest
        .run(&dir.path().join("console.log"))
        .expect("booting the guest");
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
        "dm-thin, 2 nodes in TCG: write pause during `tandem snapshot create`: {pause_ms} ms"
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
         thin pool grew {grown:.0} bytes = {share:.3}% of the clone's size"
    );
    assert!(share < 1.0, "the clone allocated {share:.3}% of its size");
    assert_eq!(run.json("clone")["clone_of"], "base-100-disk-0");
    run.assert_section_failed("delete_base");
    assert!(
        run.section("delete_base.stderr").contains("vm-101-disk-0"),
        "{}",
        run.describe("delete_base")
    );
    // Last, so that every other figure above is measured and printed first. The bound is
    // the issue's 1 s plus what one bare `lvcreate -s` costs in this TCG guest (measured
    // above): under TCG, LVM's own command dominates (on the XFS reflink test on the host,
    // tests/tests/snapshots.rs, the pause is tens of ms against the plain 1 s).
    run.assert_section_ok("ref_snapshot");
    let lvm_ms = elapsed(&run, "ref_snapshot_time") * 1000.0;
    eprintln!(
        "reference in this guest: one bare `lvcreate -s` takes {lvm_ms:.0} ms; \
         write pause {pause_ms} ms; clone {:.0} ms",
        took * 1000.0
    );
    assert!(
        (pause_ms as f64) <= 1000.0 + lvm_ms,
        "pause {pause_ms} ms > 1 s + one lvcreate ({lvm_ms:.0} ms)"
    );
}
