//! Issue 4's guest acceptance: a real QEMU guest (TCG) boots with a Tandem volume as its
//! virtio disk, served by `tandemd` over `<run_dir>/nbd.sock`, makes an ext4 file system,
//! writes a file and shuts down cleanly; the file's bytes are then read back on the host from
//! the volume's backing file and, by a second guest, through Tandem's NBD export again.
//!
//! Needs root, `qemu-system-x86_64`, `debugfs` and apt access to Debian's kernel package;
//! `TANDEM_SKIP_VM_TESTS=1` skips explicitly.

use std::time::{SystemTime, UNIX_EPOCH};

use tandem_tests::vm::{self, Disk, ImageBuilder, Vm};
use tandem_tests::TandemNode;

#[test]
fn guest_makes_ext4_on_a_tandem_volume_and_the_bytes_read_back() {
    if vm::skip_requested() {
        eprintln!("TANDEM_SKIP_VM_TESTS is set: skipping guest test");
        return;
    }
    let node = TandemNode::start_new();
    node.tandem(&["volume", "create", "guest-disk", "--size", "256M"])
        .ok();
    let nbd_socket = node.root().join("run/nbd.sock");
    let backing = node.images().join("guest-disk.img");

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
        .disk(Disk::nbd_unix(&nbd_socket, "guest-disk"))
        .run(&work.path().join("writer.log"))
        .expect("booting the writer guest");
    eprintln!("[guest-tandem writer] {}", run.timing_summary());
    run.assert_script_succeeded();
    run.assert_section_ok("mkfs");
    run.assert_section_ok("umount");
    let written_sha = run
        .section("write")
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();

    let on_disk = vm::read_ext4_file(&backing, "/hello.txt").unwrap();
    assert_eq!(
        String::from_utf8_lossy(&on_disk),
        format!("{content}\n"),
        "the file in the volume's backing file differs from what the guest wrote"
    );

    let reader = ImageBuilder::new(vm::read_file_script("hello.txt"))
        .build(&work.path().join("reader"))
        .expect("building the reader guest");
    let run = Vm::new(reader)
        .disk(Disk::nbd_unix(&nbd_socket, "guest-disk"))
        .run(&work.path().join("reader.log"))
        .expect("booting the reader guest");
    eprintln!("[guest-tandem reader] {}", run.timing_summary());
    run.assert_script_succeeded();
    let read_sha = run.section("sha256").split_whitespace().next().unwrap();
    assert_eq!(read_sha, written_sha, "second guest read different bytes");
}
