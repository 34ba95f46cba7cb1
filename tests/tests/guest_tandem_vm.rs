//! Issue 4's guest acceptance: a real QEMU guest (TCG) boots with a replicated Tandem volume
//! as its virtio disk, served by `tandemd` over `<run_dir>/nbd.sock` on hv1 (opening it
//! promotes hv1), makes an ext4 file system, writes a file and shuts down cleanly (closing
//! the export demotes hv1). The file's bytes are then read back from the *other* replica:
//! on the host from hv2's backing file, and by a second guest booted against hv2's NBD
//! socket (which promotes hv2).
//!
//! Needs root, `qemu-system-x86_64`, `debugfs` and apt access to Debian's kernel package;
//! `TANDEM_SKIP_VM_TESTS=1` skips explicitly.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use tandem_tests::loopback_cluster::LoopbackCluster;
use tandem_tests::vm::{self, Disk, ImageBuilder, Vm};
use tandem_tests::{volume_status, wait_until, TandemNode};

const VOLUME: &str = "guest-disk";

fn status(node: &TandemNode) -> Value {
    node.tandem(&["volume", "status", VOLUME, "--json"])
        .ok()
        .json()
}

fn secondary_and_in_sync(node: &TandemNode) -> bool {
    volume_status::secondary_and_in_sync(&status(node))
}

#[test]
fn guest_writes_ext4_on_a_replicated_volume_and_the_other_replica_has_the_bytes() {
    if vm::skip_requested() {
        eprintln!("TANDEM_SKIP_VM_TESTS is set: skipping guest test");
        return;
    }
    let cluster = LoopbackCluster::start(&[("hv1", false), ("hv2", false)]);
    let (hv1, hv2) = (cluster.node("hv1"), cluster.node("hv2"));
    hv1.tandem(&[
        "volume",
        "create",
        VOLUME,
        "--size",
        "256M",
        "--replicas",
        "2",
    ])
    .ok();
    assert!(
        wait_until(Duration::from_secs(30), || secondary_and_in_sync(hv1)
            && secondary_and_in_sync(hv2)),
        "replicas never connected: {:#}\n{}",
        status(hv1),
        cluster.logs()
    );

    let nonce = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let content = format!("written by a TCG guest on a Tandem volume\nnonce {nonce}\n");
    let work = tempfile::Builder::new()
        .prefix("tandem-guest-")
        .tempdir()
        .unwrap();
    let writer = ImageBuilder::new(vm::mkfs_write_file_script("hello.txt", &content))
        .build(&work.path().join("writer"))
        .expect("building the guest initramfs (tests/vm/build-initramfs)");
    let run = Vm::new(writer)
        .disk(Disk::nbd_unix(hv1.root().join("run/nbd.sock"), VOLUME))
        .run(&work.path().join("writer.log"))
        .expect("booting the writer guest on hv1");
    eprintln!("[guest-tandem writer on hv1] {}", run.timing_summary());
    run.assert_script_succeeded();
    run.assert_section_ok("mkfs");
    run.assert_section_ok("umount");
    let written_sha = run
        .section("write")
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();

    // The guest is gone: hv1 demoted itself, and hv2 holds every acknowledged write.
    assert!(
        wait_until(Duration::from_secs(30), || secondary_and_in_sync(hv1)
            && secondary_and_in_sync(hv2)),
        "after the guest's shutdown the replicas are not Secondary and in sync: hv1 {:#} hv2 {:#}",
        status(hv1),
        status(hv2)
    );

    // The other replica's backing file, read on the host.
    let on_hv2 = vm::read_ext4_file(&hv2.images().join(format!("{VOLUME}.img")), "/hello.txt")
        .expect("reading the file from hv2's replica");
    assert_eq!(
        String::from_utf8_lossy(&on_hv2),
        format!("{content}\n"),
        "hv2's replica does not hold the file the guest wrote on hv1"
    );

    // A second guest on hv2 (its open promotes hv2) reads the same bytes.
    let reader = ImageBuilder::new(vm::read_file_script("hello.txt"))
        .build(&work.path().join("reader"))
        .expect("building the reader guest");
    let run = Vm::new(reader)
        .disk(Disk::nbd_unix(hv2.root().join("run/nbd.sock"), VOLUME))
        .run(&work.path().join("reader.log"))
        .expect("booting the reader guest on hv2");
    eprintln!("[guest-tandem reader on hv2] {}", run.timing_summary());
    run.assert_script_succeeded();
    let read_sha = run.section("sha256").split_whitespace().next().unwrap();
    assert_eq!(
        read_sha, written_sha,
        "the guest on hv2 read different bytes"
    );
}
