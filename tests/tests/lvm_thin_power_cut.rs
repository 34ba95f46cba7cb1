//! Issue 16 acceptance, power-cut safety on real dm-thin: inside the LVM-thin test guest,
//! `tandemd` serves a volume on an `lvm-thin` pool (`cache = "none"`: O_DIRECT on the thin
//! LV) and `tandem-check write` keeps writing through NBD with FLUSHes and FUA writes. The
//! host kills QEMU with SIGKILL mid-run: the guest kernel's page cache and dm-thin's
//! uncommitted metadata are lost, as in a power cut (unlike killing a daemon). A second
//! boot on the same disk activates the VG and checks, with `tandem-check verify
//! --durable-only` on the thin LV, that every write acknowledged with FUA or before a
//! completed FLUSH reads back.
//!
//! The writer's log goes to the guest's second serial port (a file on the host, which
//! survives the kill); the writer drains the port after every line, so an attempt is on the
//! host before its write is sent.
//!
//! Needs root, `qemu-system-x86_64` and apt access to Debian's kernel package (CI has all
//! three); `TANDEM_SKIP_VM_TESTS=1` skips explicitly.

use std::path::Path;
use std::time::{Duration, Instant};

use tandem_tests::vm::{self, Disk, ImageBuilder, Vm};

const MIB: u64 = 1024 * 1024;
/// Acknowledged writes to wait for before the power cut.
const ACKS_BEFORE_CUT: usize = 300;

const WRITER_SCRIPT: &str = r#"
CFG=/tmp/tandem/tandem.toml
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
i=0
while [ ! -S /tmp/tandem/run/tandemd.sock ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
section create tandem --config $CFG volume create v1 --size 64M --pool nvme
echo "@@WRITER-START"
tandem-check write --socket /tmp/tandem/run/nbd.sock --export v1 --blocks 4096 \
    --log /dev/ttyS1 --duration 600 --flush-every 16 --fua-every 7 --seed 16 &
writer=$!
sleep 2
section opened grep "backing device opened" /tmp/tandemd.log
wait $writer
echo "@@WRITER-ENDED $?"
section daemon_log cat /tmp/tandemd.log
exit 1
"#;

const VERIFY_SCRIPT: &str = r#"
set -e
section activate vgchange -ay vg_nvme
section verify tandem-check verify --log /guest/power.log --image /dev/vg_nvme/v1 --durable-only --json
"#;

fn count(log: &str, prefix: &str) -> usize {
    log.lines().filter(|l| l.starts_with(prefix)).count()
}

fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).replace('\r', ""))
        .unwrap_or_default()
}

#[test]
fn acknowledged_durable_writes_survive_a_power_cut_on_dm_thin() {
    if vm::skip_requested() {
        eprintln!("TANDEM_SKIP_VM_TESTS is set: skipping guest test");
        return;
    }
    let started = Instant::now();
    let dir = tempfile::Builder::new()
        .prefix("tandem-power-cut-")
        .tempdir()
        .unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1024 * MIB)
        .unwrap();
    let writer_log = dir.path().join("writer.log");
    let console = dir.path().join("console.log");

    // Boot 1: write until the power cut.
    let image = ImageBuilder::new(WRITER_SCRIPT)
        .file(tandem_tests::bin("tandemd"), "/usr/local/bin/tandemd")
        .file(tandem_tests::bin("tandem"), "/usr/local/bin/tandem")
        .file(
            tandem_tests::bin("tandem-check"),
            "/usr/local/bin/tandem-check",
        )
        .build(&dir.path().join("image-writer"))
        .expect("building the guest initramfs (tests/vm/build-initramfs)");
    let mut running = Vm::new(image)
        .disk(Disk::raw(&disk))
        .qemu_arg("-serial")
        .qemu_arg(format!("file:{}", writer_log.display()))
        .spawn(&console)
        .expect("booting the guest");
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let log = read_lossy(&writer_log);
        let text = read_lossy(&console);
        assert!(
            !text.contains("@@GUEST-EXIT") && !text.contains("@@WRITER-ENDED"),
            "the writer guest ended before the power cut:\n{text}"
        );
        if count(&log, "K ") >= ACKS_BEFORE_CUT && text.contains("@@STATUS opened") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "fewer than {ACKS_BEFORE_CUT} acknowledged writes in 240 s:\n{text}\nlog:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    running.kill(); // SIGKILL: the power cut.
    let console_text = read_lossy(&console);
    assert!(
        console_text.contains("engine=io_uring") && console_text.contains("cache=none"),
        "the volume was not opened with O_DIRECT and io_uring:\n{console_text}"
    );
    let log = read_lossy(&writer_log);
    let acked = count(&log, "K ");
    let fua = log
        .lines()
        .filter(|l| l.starts_with("K ") && l.ends_with(" fua"))
        .count();
    let flushes = count(&log, "F");
    let after_last_flush = log
        .lines()
        .rev()
        .take_while(|l| *l != "F")
        .filter(|l| l.starts_with("K ") && !l.ends_with(" fua"))
        .count();
    eprintln!(
        "power cut after {acked} acknowledged writes ({fua} with FUA), {flushes} flushes; \
         {after_last_flush} acknowledged after the last flush without FUA (not required)"
    );
    assert!(
        fua > 0 && flushes > 0,
        "the log has no durable writes:\n{log}"
    );
    let clean_log = dir.path().join("power.log");
    std::fs::write(&clean_log, &log).unwrap();

    // Boot 2: the same disk, after the power cut.
    let image = ImageBuilder::new(VERIFY_SCRIPT)
        .file(
            tandem_tests::bin("tandem-check"),
            "/usr/local/bin/tandem-check",
        )
        .file(&clean_log, "/guest/power.log")
        .build(&dir.path().join("image-verify"))
        .expect("building the guest initramfs (tests/vm/build-initramfs)");
    let run = Vm::new(image)
        .disk(Disk::raw(&disk))
        .run(&dir.path().join("console-verify.log"))
        .expect("booting the guest");
    run.assert_script_succeeded();
    let report = run.json("verify");
    eprintln!(
        "verify after the power cut: {report}; test total {:.1}s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(report["passed"], true, "{report}");
    assert_eq!(report["lost"], 0, "{report}");
    assert_eq!(report["stale"], 0, "{report}");
    assert_eq!(report["garbage"], 0, "{report}");
    assert!(report["ok"].as_u64().unwrap() > 0, "{report}");
}
