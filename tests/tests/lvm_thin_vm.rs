//! Real LVM thin provisioning, inside a TCG guest (the host kernel has no device-mapper):
//! first the guest infrastructure with plain LVM commands, then `tandemd` + `tandem` driving
//! an `lvm-thin` pool, checked against `lvs --reportformat json` (issue 2, "Real LVM, not a
//! mock").
//!
//! Needs root, `qemu-system-x86_64` and apt access to Debian's kernel package (CI has all
//! three); `TANDEM_SKIP_VM_TESTS=1` skips explicitly.

use std::time::Instant;

use serde_json::Value;
use tandem_tests::vm::{self, Disk, GuestRun, ImageBuilder, Vm};

const MIB: u64 = 1024 * 1024;
/// Size of the thin pool the guests create (`lvcreate -L 400M -T ...`).
const POOL_BYTES: u64 = 400 * MIB;

/// Builds the image for `builder`, boots it with a fresh 1 GiB raw disk and returns the run.
fn boot_with_disk(name: &str, builder: ImageBuilder) -> GuestRun {
    let started = Instant::now();
    let dir = tempfile::Builder::new()
        .prefix(&format!("tandem-{name}-"))
        .tempdir()
        .unwrap();
    let image = builder
        .build(&dir.path().join("image"))
        .expect("building the guest initramfs (tests/vm/build-initramfs)");
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1024 * MIB)
        .unwrap();
    let console = dir.path().join("console.log");
    let build_time = image.build_time;
    let run = Vm::new(image)
        .disk(Disk::raw(&disk))
        .run(&console)
        .expect("booting the guest");
    eprintln!(
        "[{name}] initramfs build {:.1}s; {}; test total {:.1}s",
        build_time.as_secs_f64(),
        run.timing_summary(),
        started.elapsed().as_secs_f64()
    );
    run
}

/// The LVs of an `lvs --reportformat json` report, by name.
fn lvs_by_name(report: &Value) -> std::collections::BTreeMap<String, Value> {
    let lvs = report["report"][0]["lv"]
        .as_array()
        .unwrap_or_else(|| panic!("no report[0].lv array in lvs output: {report}"));
    lvs.iter()
        .map(|lv| (lv["lv_name"].as_str().unwrap().to_string(), lv.clone()))
        .collect()
}

/// A byte count from a JSON number or a numeric string (`lvs --units b --nosuffix` prints
/// strings).
fn bytes(value: &Value) -> u64 {
    match value {
        Value::Number(n) => n.as_u64().unwrap(),
        Value::String(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("not a byte count: {value}")),
        _ => panic!("not a byte count: {value}"),
    }
}

fn skip() -> bool {
    if vm::skip_requested() {
        eprintln!("TANDEM_SKIP_VM_TESTS is set: skipping guest test");
        return true;
    }
    false
}

/// The infrastructure alone: a VG and thin pool on the guest's virtio disk, a thin LV,
/// bytes written through device-mapper and read back, `lvs` JSON parsed on the host.
#[test]
fn thin_pool_in_guest_works() {
    if skip() {
        return;
    }
    let script = r#"set -e
LVS="lvs --reportformat json --units b --nosuffix -o lv_name,lv_size,pool_lv,data_percent vg_nvme"
section pvcreate pvcreate /dev/vda
section vgcreate vgcreate vg_nvme /dev/vda
section pool lvcreate -L 400M -T vg_nvme/thin
section thin lvcreate -V 1G -T vg_nvme/thin -n v0
dd if=/dev/urandom of=/tmp/pattern bs=1M count=8 2>/dev/null
# Past the pool's 400 MiB: only a thin LV can hold this offset.
section write dd if=/tmp/pattern of=/dev/vg_nvme/v0 bs=1M seek=512 oflag=direct conv=fsync
section readback sh -c 'dd if=/dev/vg_nvme/v0 bs=1M skip=512 count=8 iflag=direct 2>/dev/null | sha256sum'
section pattern sha256sum /tmp/pattern
section lvs $LVS
"#;
    let run = boot_with_disk("thin-pool", ImageBuilder::new(script));
    run.assert_script_succeeded();

    let written = run.section("pattern").split_whitespace().next().unwrap();
    let read = run.section("readback").split_whitespace().next().unwrap();
    assert_eq!(written.len(), 64, "{}", run.describe("pattern"));
    assert_eq!(read, written, "bytes read back from the thin LV differ");

    let lvs = lvs_by_name(&run.json("lvs"));
    assert_eq!(bytes(&lvs["thin"]["lv_size"]), POOL_BYTES, "{lvs:?}");
    assert_eq!(bytes(&lvs["v0"]["lv_size"]), 1024 * MIB, "{lvs:?}");
    assert_eq!(lvs["v0"]["pool_lv"], "thin", "{lvs:?}");
    let used: f64 = lvs["v0"]["data_percent"].as_str().unwrap().parse().unwrap();
    assert!(used > 0.0, "the write allocated no thin blocks: {lvs:?}");
}

/// Guest script for the Tandem lifecycle on LVM thin. `tandemd`/`tandem` sit in
/// /usr/local/bin. Every step prints a section; the host asserts.
const TANDEM_SCRIPT: &str = r#"
LVS="lvs --reportformat json --units b --nosuffix -o lv_name,lv_size,pool_lv,lv_tags vg_nvme"
CFG=/tmp/tandem/tandem.toml
T="tandem --config $CFG"

set -e
section pvcreate pvcreate /dev/vda
section vgcreate vgcreate vg_nvme /dev/vda
section pool lvcreate -L 400M -T vg_nvme/thin
set +e

mkdir -p /tmp/tandem/state /tmp/tandem/run
echo "guest-test-secret" >/tmp/tandem/secret
chmod 600 /tmp/tandem/secret
cat >$CFG <<'EOF'
node = "hv1"
state_dir = "/tmp/tandem/state"
run_dir = "/tmp/tandem/run"
secret_file = "/tmp/tandem/secret"

[[nodes]]
name = "hv1"
control = "127.0.0.1:7700"
replication = "127.0.0.1:7788"

[[pools]]
name = "nvme"
backend = "lvm-thin"
vg = "vg_nvme"
thinpool = "thin"
EOF

tandemd --config $CFG >/tmp/tandemd.log 2>&1 &
daemon=$!
i=0
while [ ! -S /tmp/tandem/run/tandemd.sock ] && [ $i -lt 300 ]; do
    kill -0 $daemon 2>/dev/null || break
    sleep 0.1; i=$((i + 1))
done
if [ ! -S /tmp/tandem/run/tandemd.sock ]; then
    echo "tandemd did not create its control socket"
    section daemon_log cat /tmp/tandemd.log
    exit 20
fi

section create $T volume create v1 --size 64M --pool nvme
section lvs_created $LVS
section resize $T volume resize v1 --size 128M
section list $T volume list --json
section pools $T pool list --json
section lvs_resized $LVS

# Bytes through the LV at an offset only the grown volume has (100 MiB).
dd if=/dev/urandom of=/tmp/pattern bs=1M count=4 2>/dev/null
section pattern sha256sum /tmp/pattern
section write dd if=/tmp/pattern of=/dev/vg_nvme/v1 bs=1M seek=100 oflag=direct conv=fsync
section readback sh -c 'dd if=/dev/vg_nvme/v1 bs=1M skip=100 count=4 iflag=direct 2>/dev/null | sha256sum'

# Bad input: each must fail and change nothing.
section bad_name $T volume create bad/name --size 64M --pool nvme
section bad_size $T volume create big --size 10G --pool nvme
section bad_pool $T volume create v2 --size 64M --pool nope
section lvs_after_bad $LVS
section list_after_bad $T volume list --json

# Rename: the LV follows the volume (lvrename on the real thin pool), the data with it.
section rename $T volume rename v1 v1r
section lvs_renamed $LVS
section readback_renamed sh -c 'dd if=/dev/vg_nvme/v1r bs=1M skip=100 count=4 iflag=direct 2>/dev/null | sha256sum'
section list_renamed $T volume list --json

section delete $T volume delete v1r
section lvs_deleted $LVS
section list_deleted $T volume list --json

# SIGTERM must stop the daemon cleanly (exit status 0).
kill -TERM $daemon
wait $daemon
echo "@@STATUS daemon_exit $?"
section daemon_log cat /tmp/tandemd.log
exit 0
"#;

/// The volume entries of `tandem volume list --json`, by name.
fn volumes_by_name(list: &Value) -> std::collections::BTreeMap<String, Value> {
    list.as_array()
        .unwrap_or_else(|| panic!("volume list --json is not an array: {list}"))
        .iter()
        .map(|v| (v["name"].as_str().unwrap().to_string(), v.clone()))
        .collect()
}

/// (name, size_bytes, pool) of every listed volume: what bad input must not change.
fn volume_summary(list: &Value) -> Vec<(String, u64, String)> {
    volumes_by_name(list)
        .into_iter()
        .map(|(name, v)| (name, bytes(&v["size_bytes"]), v["pool"].to_string()))
        .collect()
}

/// Issue 2: `tandemd` on a real LVM thin pool; create, resize, list, delete through
/// `tandem`, checked against `lvs`; bad input refused without side effects.
#[test]
fn tandem_manages_lvm_thin_volumes_in_guest() {
    if skip() {
        return;
    }
    let builder = ImageBuilder::new(TANDEM_SCRIPT)
        .file(tandem_tests::bin("tandemd"), "/usr/local/bin/tandemd")
        .file(tandem_tests::bin("tandem"), "/usr/local/bin/tandem");
    let run = boot_with_disk("tandem-lvm-thin", builder);
    run.assert_script_succeeded();
    let log = || run.describe("daemon_log");

    // create + resize
    run.assert_section_ok("create");
    let created = lvs_by_name(&run.json("lvs_created"));
    let v1 = created
        .get("v1")
        .unwrap_or_else(|| panic!("no LV v1 after create: {created:?}\n{}", log()));
    assert_eq!(bytes(&v1["lv_size"]), 64 * MIB, "{created:?}");
    assert_eq!(v1["pool_lv"], "thin", "{created:?}");

    run.assert_section_ok("resize");
    let resized = lvs_by_name(&run.json("lvs_resized"));
    assert_eq!(bytes(&resized["v1"]["lv_size"]), 128 * MIB, "{resized:?}");
    assert_eq!(resized["v1"]["pool_lv"], "thin", "{resized:?}");

    // the CLI agrees with LVM
    run.assert_section_ok("list");
    let listed = volumes_by_name(&run.json("list"));
    let entry = listed
        .get("v1")
        .unwrap_or_else(|| panic!("v1 missing from volume list: {listed:?}"));
    assert_eq!(bytes(&entry["size_bytes"]), 128 * MIB, "{entry}");
    assert_eq!(entry["pool"], "nvme", "{entry}");

    run.assert_section_ok("pools");
    let pools = run.json("pools");
    let nvme = pools
        .as_array()
        .unwrap_or_else(|| panic!("pool list --json is not an array: {pools}"))
        .iter()
        .find(|p| p["name"] == "nvme")
        .unwrap_or_else(|| panic!("pool nvme missing: {pools}"));
    assert_eq!(bytes(&nvme["total_bytes"]), POOL_BYTES, "{nvme}");
    assert_eq!(
        bytes(&nvme["used_bytes"]) + bytes(&nvme["free_bytes"]),
        POOL_BYTES,
        "{nvme}"
    );

    // data goes through the LV, past the original 64 MiB
    run.assert_section_ok("write");
    let written = run.section("pattern").split_whitespace().next().unwrap();
    let read = run.section("readback").split_whitespace().next().unwrap();
    assert_eq!(read, written, "bytes read back from /dev/vg_nvme/v1 differ");

    // bad input fails and changes nothing
    for bad in ["bad_name", "bad_size", "bad_pool"] {
        run.assert_section_failed(bad);
        let stderr = run.section(&format!("{bad}.stderr"));
        assert!(
            !stderr.trim().is_empty(),
            "{bad} failed without an error message"
        );
    }
    assert_eq!(
        run.json("lvs_after_bad"),
        run.json("lvs_resized"),
        "bad input changed the LVs"
    );
    assert_eq!(
        volume_summary(&run.json("list_after_bad")),
        volume_summary(&run.json("list")),
        "bad input changed the volume list"
    );

    // rename
    run.assert_section_ok("rename");
    let renamed = lvs_by_name(&run.json("lvs_renamed"));
    assert!(
        !renamed.contains_key("v1"),
        "v1 kept its LV name: {renamed:?}"
    );
    assert_eq!(bytes(&renamed["v1r"]["lv_size"]), 128 * MIB, "{renamed:?}");
    let read_renamed = run
        .section("readback_renamed")
        .split_whitespace()
        .next()
        .unwrap();
    assert_eq!(read_renamed, written, "data changed across the rename");
    let listed = volumes_by_name(&run.json("list_renamed"));
    assert!(
        listed.contains_key("v1r") && !listed.contains_key("v1"),
        "{listed:?}"
    );

    // delete
    run.assert_section_ok("delete");
    let deleted = lvs_by_name(&run.json("lvs_deleted"));
    assert!(
        !deleted.contains_key("v1r"),
        "v1r still exists: {deleted:?}"
    );
    assert!(
        deleted.contains_key("thin"),
        "the thin pool vanished: {deleted:?}"
    );
    assert!(
        volumes_by_name(&run.json("list_deleted")).is_empty(),
        "volume list not empty after delete"
    );

    // SIGTERM stops the daemon cleanly
    assert_eq!(
        run.status("daemon_exit"),
        0,
        "tandemd on SIGTERM:\n{}",
        log()
    );
}
