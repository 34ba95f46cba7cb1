//! Issue 17's vhost-user-blk frontend with real QEMU guests (TCG): `tandemd` serves each
//! volume on `<run_dir>/vhost/<volume>.sock` and QEMU attaches it with
//! `-device vhost-user-blk-pci,num-queues=2` (guest RAM as a shared memfd).
//!
//! * A guest makes ext4 on a replicated volume over vhost-user-blk on hv1 and writes a file
//!   (opening promotes hv1); it powers off (closing demotes hv1), a second boot reads the
//!   file back, and hv2's replica holds the same bytes.
//! * While hv1 is Primary, a QEMU on hv2's socket is refused: tandemd logs the reason and
//!   hangs up, QEMU exits with an error and the guest never runs. Once hv1 demotes, the
//!   same start on hv2 works; killed with SIGKILL, that QEMU releases the volume (hv2
//!   demotes).
//! * A client that connects and stays silent is closed after a few seconds and does not
//!   keep a real QEMU out; a second QEMU on a served socket fails at once instead of
//!   hanging.
//! * `tandem volume resize` while a guest runs reaches the guest (capacity change), which
//!   writes and reads at the new end.
//! * A malicious frontend (garbage, truncated and oversized vhost-user messages) neither
//!   stops the daemon nor the other volumes' sockets, and a real QEMU is served afterwards.
//!   Before that QEMU, a hostile frontend completes a valid handshake and attacks the
//!   virtqueue itself (`ring_attacks`: descriptors out of guest memory, loops, indirect
//!   tables, bogus indexes and headers, a missing status, leaving with requests in flight);
//!   each request is answered as documented or the connection is hung up, and nothing is
//!   written to the volume.
//!
//! Needs root and `qemu-system-x86_64`; `TANDEM_SKIP_VM_TESTS=1` skips explicitly.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use tandem_tests::loopback_cluster::LoopbackCluster;
use tandem_tests::vhost_frontend::{self, linked, request_header, Descriptor, Used, VhostFrontend};
use tandem_tests::vm::{self, Disk, ImageBuilder, Vm};
use tandem_tests::{volume_status, wait_until, TandemNode};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};

const VOLUME: &str = "vhost-disk";

fn socket(node: &TandemNode, volume: &str) -> PathBuf {
    node.root().join(format!("run/vhost/{volume}.sock"))
}

fn status(node: &TandemNode) -> Value {
    node.tandem(&["volume", "status", VOLUME, "--json"])
        .ok()
        .json()
}

fn role(node: &TandemNode) -> String {
    status(node)["role"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn secondary_and_in_sync(node: &TandemNode) -> bool {
    volume_status::secondary_and_in_sync(&status(node))
}

fn wait_for_socket(path: &Path) {
    assert!(
        wait_until(Duration::from_secs(10), || path.exists()),
        "{} never appeared",
        path.display()
    );
}

#[test]
fn a_guest_writes_over_vhost_user_blk_reboots_and_reads_back_and_the_volume_follows_qemu() {
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
    let (sock1, sock2) = (socket(hv1, VOLUME), socket(hv2, VOLUME));
    wait_for_socket(&sock1);
    wait_for_socket(&sock2);

    let nonce = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_nanos();
    let content = format!("written over vhost-user-blk\nnonce {nonce}\n");
    let work = tempfile::Builder::new()
        .prefix("tandem-vhost-")
        .tempdir()
        .expect("temp dir");

    // Boot 1: mkfs, write, power off.
    let writer = ImageBuilder::new(vm::mkfs_write_file_script("hello.txt", &content))
        .build(&work.path().join("writer"))
        .expect("building the guest initramfs (tests/vm/build-initramfs)");
    let run = Vm::new(writer)
        .disk(Disk::vhost_user(&sock1, 2))
        .run(&work.path().join("writer.log"))
        .expect("booting the writer guest on hv1");
    eprintln!("[vhost writer on hv1] {}", run.timing_summary());
    run.assert_script_succeeded();
    run.assert_section_ok("mkfs");
    run.assert_section_ok("umount");
    let written_sha = run
        .section("write")
        .split_whitespace()
        .next()
        .expect("sha256 of the written file")
        .to_string();
    assert!(
        wait_until(Duration::from_secs(30), || secondary_and_in_sync(hv1)
            && secondary_and_in_sync(hv2)),
        "QEMU exited but hv1 did not demote (or the replicas are not in sync): hv1 {:#}\n{}",
        status(hv1),
        cluster.logs()
    );

    // Boot 2 on the same host: the file is there.
    let reader = ImageBuilder::new(vm::read_file_script("hello.txt"))
        .build(&work.path().join("reader"))
        .expect("building the reader guest");
    let run = Vm::new(reader.clone())
        .disk(Disk::vhost_user(&sock1, 2))
        .run(&work.path().join("reader.log"))
        .expect("booting the reader guest on hv1");
    eprintln!("[vhost reader on hv1] {}", run.timing_summary());
    run.assert_script_succeeded();
    assert_eq!(
        run.section("sha256").split_whitespace().next(),
        Some(written_sha.as_str()),
        "the second boot read different bytes"
    );
    // hv2's replica holds the file too (read on the host from its backing file).
    let on_hv2 = vm::read_ext4_file(&hv2.images().join(format!("{VOLUME}.img")), "/hello.txt")
        .expect("reading the file from hv2's replica");
    assert_eq!(String::from_utf8_lossy(&on_hv2), format!("{content}\n"));

    // A refusal: hv1 is Primary, so hv2 may not open the volume. hv2 logs why and hangs
    // up before QEMU's device is realized: QEMU exits with an error, the guest never runs.
    assert!(wait_until(Duration::from_secs(30), || {
        secondary_and_in_sync(hv1)
    }));
    hv1.tandem(&["volume", "promote", VOLUME]).ok();
    let reader_on_hv2 = ImageBuilder::new(
        "section read dd if=/dev/vda of=/dev/null bs=4096 count=1 iflag=direct\n\
         echo @@READ-DONE\n\
         sleep 600\n",
    )
    .build(&work.path().join("reader-hv2"))
    .expect("building the hv2 guest");
    let refused_console = work.path().join("refused.log");
    let started = Instant::now();
    let refused = Vm::new(reader_on_hv2.clone())
        .disk(Disk::vhost_user(&sock2, 1))
        .run(&refused_console);
    let failed_after = started.elapsed();
    let error = match refused {
        Err(e) => format!("{e:#}"),
        Ok(run) => panic!(
            "QEMU ran a guest on a refused volume:\n{}",
            run.script_console()
        ),
    };
    eprintln!("[vhost refusal] QEMU failed after {failed_after:.1?}: {error}");
    assert!(
        error.contains("vhost-user-blk"),
        "QEMU did not fail in the vhost-user-blk device: {error}"
    );
    let console = std::fs::read_to_string(&refused_console).unwrap_or_default();
    assert!(
        !console.contains("Linux version"),
        "the refused guest's kernel ran:\n{console}"
    );
    let log = hv2.log();
    assert!(
        log.contains("vhost-user-blk open refused")
            && log.contains(&format!("{VOLUME} is Primary on hv1")),
        "hv2 did not log the refusal with its reason:\n{log}"
    );
    assert_eq!(role(hv2), "Secondary", "the refused open promoted hv2");

    // Once hv1 demotes, the same QEMU start on hv2 works (a refusal is not remembered);
    // a QEMU that dies releases the volume: hv2 demotes.
    hv1.tandem(&["volume", "demote", VOLUME]).ok();
    assert!(wait_until(Duration::from_secs(30), || {
        secondary_and_in_sync(hv1) && secondary_and_in_sync(hv2)
    }));
    let hv2_console = work.path().join("reader-hv2.log");
    let mut running = Vm::new(reader_on_hv2)
        .disk(Disk::vhost_user(&sock2, 1))
        .spawn(&hv2_console)
        .expect("booting the guest on hv2");
    assert!(
        wait_until(vm::DEFAULT_TIMEOUT, || {
            std::fs::read_to_string(&hv2_console)
                .unwrap_or_default()
                .contains("@@READ-DONE")
        }),
        "the guest on hv2 never read its disk:\n{}",
        std::fs::read_to_string(&hv2_console).unwrap_or_default()
    );
    let run =
        vm::GuestRun::from_console(&std::fs::read_to_string(&hv2_console).unwrap_or_default());
    run.assert_section_ok("read");
    assert_eq!(role(hv2), "Primary", "{:#}", status(hv2));
    running.kill();
    assert!(
        wait_until(Duration::from_secs(30), || role(hv2) == "Secondary"),
        "hv2 stayed {} after QEMU was killed\n{}",
        role(hv2),
        hv2.log()
    );
}

/// The guest of the resize test: prints its disk size, says when to resize, waits (at
/// most 120 s) for the size to change, then writes a tagged 4 KiB block at the new end,
/// drops its caches and reads the block back.
const RESIZE_GUEST: &str = r#"section before cat /sys/block/vda/size
before=$(cat /sys/block/vda/size)
echo @@RESIZE-NOW
n=0
while [ "$(cat /sys/block/vda/size)" = "$before" ] && [ $n -lt 600 ]; do sleep 0.2; n=$((n + 1)); done
section after cat /sys/block/vda/size
section dmesg sh -c 'dmesg | grep -i "capacity change"'
last=$(( $(cat /sys/block/vda/size) / 8 - 1 ))
section write sh -c "printf 'TANDEM-RESIZE-NEW-END' | dd of=/dev/vda bs=4096 seek=$last conv=sync,fsync,notrunc"
echo 3 > /proc/sys/vm/drop_caches
section read sh -c "dd if=/dev/vda bs=4096 skip=$last count=1 2>/dev/null | head -c 21"
"#;

/// Issue 17's resize: `tandem volume resize` while a guest runs on the volume over
/// vhost-user-blk reaches the guest (tandemd sends CONFIG_CHANGE_MSG, QEMU re-reads the
/// config space, the guest kernel logs a capacity change), and the guest writes at the
/// new end and reads it back; the bytes are in the volume on the host.
#[test]
fn a_resize_reaches_a_running_guest_which_writes_and_reads_at_the_new_end() {
    resize_reaches_the_guest(false);
}

/// The same with the VM paused during the resize: QEMU drops a config-change notice while
/// its device is stopped, so tandemd repeats it until QEMU reads the config; after `cont`
/// the guest sees the new size.
#[test]
fn a_resize_while_the_vm_is_paused_reaches_the_guest_once_it_resumes() {
    resize_reaches_the_guest(true);
}

/// Send one QMP command on `qmp` and wait for its answer.
fn qmp_command(qmp: &mut std::io::BufReader<UnixStream>, command: &str) {
    use std::io::BufRead;
    qmp.get_mut()
        .write_all(format!("{{\"execute\":\"{command}\"}}\n").as_bytes())
        .expect("QMP write");
    let mut line = String::new();
    loop {
        line.clear();
        let n = qmp.read_line(&mut line).expect("QMP read");
        assert!(n > 0, "QMP closed while waiting for {command}");
        if line.contains("\"return\"") {
            return;
        }
        assert!(!line.contains("\"error\""), "QMP {command}: {line}");
    }
}

fn resize_reaches_the_guest(paused: bool) {
    if vm::skip_requested() {
        eprintln!("TANDEM_SKIP_VM_TESTS is set: skipping guest test");
        return;
    }
    const GROWN: &str = "vhost-grown";
    const OLD: u64 = 64 << 20;
    const NEW: u64 = 96 << 20;
    let node = TandemNode::start_new();
    node.tandem(&["volume", "create", GROWN, "--size", "64M"])
        .ok();
    let sock = socket(&node, GROWN);
    wait_for_socket(&sock);
    let work = tempfile::Builder::new()
        .prefix("tandem-vhost-resize-")
        .tempdir()
        .expect("temp dir");
    let image = ImageBuilder::new(RESIZE_GUEST)
        .build(&work.path().join("guest"))
        .expect("building the guest");
    let console = work.path().join("resize.log");
    let qmp_path = work.path().join("qmp.sock");
    let running = Vm::new(image)
        .disk(Disk::vhost_user(&sock, 1))
        .qemu_arg("-qmp")
        .qemu_arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
        .spawn(&console)
        .expect("booting the guest");
    let console_text = || std::fs::read_to_string(&console).unwrap_or_default();
    assert!(
        wait_until(vm::DEFAULT_TIMEOUT, || console_text()
            .contains("@@RESIZE-NOW")),
        "the guest never came up:\n{}",
        console_text()
    );
    let mut qmp = std::io::BufReader::new(UnixStream::connect(&qmp_path).expect("QMP socket"));
    {
        use std::io::BufRead;
        let mut greeting = String::new();
        qmp.read_line(&mut greeting).expect("QMP greeting");
    }
    qmp_command(&mut qmp, "qmp_capabilities");
    if paused {
        qmp_command(&mut qmp, "stop");
    }
    let started = Instant::now();
    node.tandem(&["volume", "resize", GROWN, "--size", "96M"])
        .ok();
    if paused {
        // The first notice goes out (and is dropped by the paused QEMU) before `cont`.
        assert!(
            wait_until(Duration::from_secs(10), || node
                .log()
                .contains("told the frontend the volume's new size")),
            "{}",
            node.log()
        );
        std::thread::sleep(Duration::from_millis(500));
        qmp_command(&mut qmp, "cont");
    }
    let run = running.wait().expect("the guest ran");
    eprintln!(
        "[vhost resize] {}; the guest saw the new size, wrote, read back and powered off {:.1?} after the resize",
        run.timing_summary(),
        started.elapsed()
    );
    run.assert_script_succeeded();
    let sectors = |section: &str| run.section(section).trim().parse::<u64>().ok();
    assert_eq!(
        sectors("before"),
        Some(OLD / 512),
        "{}",
        run.script_console()
    );
    assert_eq!(
        sectors("after"),
        Some(NEW / 512),
        "the guest did not see the new size:\n{}\n{}",
        run.script_console(),
        node.log()
    );
    assert!(
        run.section("dmesg").contains("capacity change"),
        "the guest kernel logged no capacity change: {}",
        run.script_console()
    );
    run.assert_section_ok("write");
    assert_eq!(run.section("read"), "TANDEM-RESIZE-NEW-END");
    assert!(
        node.log()
            .contains("told the frontend the volume's new size"),
        "{}",
        node.log()
    );
    // The block is in the volume, at the new end.
    let bytes = std::fs::read(node.images().join(format!("{GROWN}.img"))).expect("volume file");
    assert_eq!(bytes.len() as u64, NEW);
    assert_eq!(
        &bytes[(NEW - 4096) as usize..][..21],
        b"TANDEM-RESIZE-NEW-END"
    );
}

/// A vhost-user message header: request, flags (version 1), payload size.
fn header(request: u32, size: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(12);
    h.extend_from_slice(&request.to_le_bytes());
    h.extend_from_slice(&1u32.to_le_bytes());
    h.extend_from_slice(&size.to_le_bytes());
    h
}

/// Send `bytes` on a fresh connection to `path`, then close it.
fn send_and_close(path: &Path, bytes: &[u8]) {
    let mut stream = UnixStream::connect(path).expect("connect to the vhost socket");
    let _ = stream.write_all(bytes);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    // Wait for the daemon to drop us (or give up after a while).
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut sink = [0u8; 256];
    while let Ok(n) = stream.read(&mut sink) {
        if n == 0 {
            break;
        }
    }
}

/// A proper GET_FEATURES exchange: the device answers with VERSION_1 set.
fn get_features(path: &Path) -> u64 {
    let mut stream = UnixStream::connect(path).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream.write_all(&header(1, 0)).expect("send GET_FEATURES");
    let mut reply = [0u8; 20];
    stream.read_exact(&mut reply).expect("GET_FEATURES reply");
    u64::from_le_bytes(reply[12..20].try_into().expect("8 bytes"))
}

#[test]
fn a_malicious_frontend_neither_stops_the_daemon_nor_other_volumes_nor_the_next_qemu() {
    if vm::skip_requested() {
        eprintln!("TANDEM_SKIP_VM_TESTS is set: skipping guest test");
        return;
    }
    let node = TandemNode::start_new();
    for name in ["victim", "bystander"] {
        node.tandem(&["volume", "create", name, "--size", "64M"])
            .ok();
    }
    let (victim, bystander) = (socket(&node, "victim"), socket(&node, "bystander"));
    wait_for_socket(&victim);
    wait_for_socket(&bystander);

    let mut oversized_mem_table = header(5, 0xffff_fff0); // SET_MEM_TABLE, 4 GiB claimed
    oversized_mem_table.extend_from_slice(&[0xa5; 64]);
    let mut bad_vring_index = header(1, 0);
    bad_vring_index.extend(header(3, 0)); // SET_OWNER
    let mut state = header(8, 8); // SET_VRING_NUM
    state.extend_from_slice(&0xffff_u32.to_le_bytes()); // queue 65535
    state.extend_from_slice(&0xffff_u32.to_le_bytes()); // 65535 descriptors
    bad_vring_index.extend(state);
    let mut config = header(24, 12); // GET_CONFIG past the config space
    config.extend_from_slice(&0xffff_fff0_u32.to_le_bytes());
    config.extend_from_slice(&0x100_u32.to_le_bytes());
    config.extend_from_slice(&0u32.to_le_bytes());
    let attacks: Vec<(&str, Vec<u8>)> = vec![
        (
            "random bytes",
            (0..4096u32)
                .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
                .collect(),
        ),
        ("truncated header", vec![1, 0, 0]),
        ("unknown request", header(0xdead_beef, 0)),
        ("payload shorter than announced", {
            let mut m = header(2, 8); // SET_FEATURES
            m.extend_from_slice(&[1, 2, 3]);
            m
        }),
        ("oversized SET_MEM_TABLE", oversized_mem_table),
        ("vring index out of range", bad_vring_index),
        ("config read out of range", config),
        ("version 0 flags", vec![1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
    ];
    for (what, bytes) in &attacks {
        send_and_close(&victim, bytes);
        assert!(
            node.tandem(&["volume", "list", "--json"]).status.success(),
            "tandemd stopped answering after '{what}':\n{}",
            node.log()
        );
        assert_ne!(
            get_features(&bystander) & (1 << 32),
            0,
            "the other volume's socket stopped serving after '{what}'"
        );
    }

    ring_attacks(&node, &victim, &bystander);

    // A real QEMU on the attacked socket: writes a pattern and reads it back.
    let work = tempfile::Builder::new()
        .prefix("tandem-vhost-evil-")
        .tempdir()
        .expect("temp dir");
    let image = ImageBuilder::new(
        "set -e\n\
         dd if=/dev/urandom of=/tmp/pattern bs=64k count=16 2>/dev/null\n\
         section put dd if=/tmp/pattern of=/dev/vda bs=64k oflag=direct conv=fsync\n\
         section want sha256sum /tmp/pattern\n\
         dd if=/dev/vda of=/tmp/back bs=64k count=16 iflag=direct\n\
         section got sha256sum /tmp/back\n",
    )
    .build(work.path())
    .expect("building the guest");
    let run = Vm::new(image)
        .disk(Disk::vhost_user(&victim, 2))
        .run(&work.path().join("console.log"))
        .expect("booting a guest on the attacked socket");
    run.assert_script_succeeded();
    let sha = |s: &str| run.section(s).split_whitespace().next().map(str::to_string);
    assert!(sha("want").is_some());
    assert_eq!(sha("want"), sha("got"), "the guest read back other bytes");
    // And the bytes are on the volume.
    let image = std::fs::read(node.images().join("victim.img")).expect("victim image");
    let on_disk = &image[..16 * 65536];
    assert_eq!(
        sha("want"),
        Some(sha256_hex(on_disk)),
        "the volume does not hold what the guest wrote"
    );
}

/// Guest addresses of the ring attacks, in the frontend's first memory region (see
/// `tandem_tests::vhost_frontend`); slots 0.. of the descriptor table hold each attack.
const HEADER: u64 = 0x4000;
/// A DISCARD / WRITE_ZEROES range.
const RANGE: u64 = 0x4100;
const STATUS: u64 = 0x5000;
/// An indirect descriptor table.
const TABLE: u64 = 0x6000;
const DATA: u64 = 0x1_0000;
const DATA_LEN: u32 = 4096;
/// No guest memory there.
const OUTSIDE: u64 = 0x4000_0000;
/// What the status byte holds until the device writes it.
const UNTOUCHED: u8 = 0xee;
/// The victim volume (64 MiB) in sectors.
const VICTIM_SECTORS: u64 = (64 << 20) / 512;

/// What the device answers to a hostile request, as `volume-driver/src/vhost/request.rs`
/// and `backend.rs` document it: a request that cannot be run gets an error status in its
/// status byte (a malformed chain: the last byte of its last descriptor, when that one is
/// device-writable); with no such place (or one outside guest memory) its used element
/// says 0 bytes and nothing is written anywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// This status byte at this guest address; the used length is 1 (no data).
    Status { at: u64, status: u32 },
    /// A used element of length 0, and the status byte at [`STATUS`] untouched.
    Nothing,
}

fn ioerr() -> Answer {
    Answer::Status {
        at: STATUS,
        status: VIRTIO_BLK_S_IOERR,
    }
}

fn unsupp() -> Answer {
    Answer::Status {
        at: STATUS,
        status: VIRTIO_BLK_S_UNSUPP,
    }
}

/// One hostile request: its header (at [`HEADER`]), its chain (from slot 0, as given:
/// links included), and the documented answer.
struct Attack {
    what: &'static str,
    header: [u8; 16],
    chain: Vec<Descriptor>,
    answer: Answer,
    /// Whether the victim's image is compared right after this attack (a well-formed
    /// write up to where the chain goes wrong); the others are checked once at the end.
    checks_image: bool,
}

fn attack(
    what: &'static str,
    kind: u32,
    sector: u64,
    chain: &[Descriptor],
    answer: Answer,
) -> Attack {
    Attack {
        what,
        header: request_header(kind, sector),
        chain: linked(0, chain),
        answer,
        checks_image: false,
    }
}

/// The attacks answered on one connection, one after the other.
fn hostile_requests() -> Vec<Attack> {
    let header = Descriptor::readable(HEADER, 16);
    let status = Descriptor::writable(STATUS, 1);
    let data_in = Descriptor::writable(DATA, DATA_LEN);
    let data_out = Descriptor::readable(DATA, DATA_LEN);
    let range = Descriptor::readable(RANGE, 16);
    let region_end = vhost_frontend::REGION_SIZE - u64::from(DATA_LEN) / 2;
    let mut attacks = vec![
        // Buffers outside the memory table, or straddling a region's end (the next region
        // starts far beyond it).
        attack(
            "a header outside guest memory",
            VIRTIO_BLK_T_IN,
            0,
            &[Descriptor::readable(OUTSIDE, 16), data_in, status],
            ioerr(),
        ),
        attack(
            "a header at the top of the address space",
            VIRTIO_BLK_T_IN,
            0,
            &[Descriptor::readable(u64::MAX - 7, 16), data_in, status],
            ioerr(),
        ),
        attack(
            "write data outside guest memory",
            VIRTIO_BLK_T_OUT,
            0,
            &[header, Descriptor::readable(OUTSIDE, DATA_LEN), status],
            ioerr(),
        ),
        attack(
            "write data straddling a region's end",
            VIRTIO_BLK_T_OUT,
            0,
            &[header, Descriptor::readable(region_end, DATA_LEN), status],
            ioerr(),
        ),
        attack(
            "read data straddling a region's end",
            VIRTIO_BLK_T_IN,
            0,
            &[header, Descriptor::writable(region_end, DATA_LEN), status],
            ioerr(),
        ),
        attack(
            "read data outside guest memory",
            VIRTIO_BLK_T_IN,
            0,
            &[header, Descriptor::writable(OUTSIDE, DATA_LEN), status],
            ioerr(),
        ),
        attack(
            "a status byte outside guest memory",
            VIRTIO_BLK_T_IN,
            0,
            &[header, data_in, Descriptor::writable(OUTSIDE, 1)],
            Answer::Nothing,
        ),
        attack(
            "a chain claiming 64 MiB of write data",
            VIRTIO_BLK_T_OUT,
            0,
            &[header, Descriptor::readable(DATA, 64 << 20), status],
            ioerr(),
        ),
        // Headers: past the end, overflowing, unknown type, a range past the end.
        attack(
            "a read past the volume's end",
            VIRTIO_BLK_T_IN,
            VICTIM_SECTORS - 4,
            &[header, data_in, status],
            ioerr(),
        ),
        attack(
            "a write past the volume's end",
            VIRTIO_BLK_T_OUT,
            VICTIM_SECTORS - 1,
            &[header, data_out, status],
            ioerr(),
        ),
        attack(
            "a sector whose byte offset overflows",
            VIRTIO_BLK_T_OUT,
            u64::MAX / 2,
            &[header, data_out, status],
            ioerr(),
        ),
        attack(
            "an unknown request type",
            0xdead,
            0,
            &[header, data_out, status],
            unsupp(),
        ),
        attack(
            "a discard past the volume's end",
            VIRTIO_BLK_T_DISCARD,
            0,
            &[header, range, status],
            ioerr(),
        ),
        // The status byte: read-only, missing, empty.
        attack(
            "a read-only status descriptor",
            VIRTIO_BLK_T_OUT,
            0,
            &[header, data_out, Descriptor::readable(STATUS, 1)],
            Answer::Nothing,
        ),
        attack(
            "no status descriptor",
            VIRTIO_BLK_T_OUT,
            0,
            &[header, data_out],
            Answer::Nothing,
        ),
        attack(
            "an empty status descriptor",
            VIRTIO_BLK_T_OUT,
            0,
            &[header, data_out, Descriptor::writable(STATUS, 0)],
            Answer::Nothing,
        ),
        // The status goes into the last writable byte, which leaves 4095 bytes for data.
        attack(
            "an empty status descriptor after read data",
            VIRTIO_BLK_T_IN,
            0,
            &[header, data_in, Descriptor::writable(STATUS, 0)],
            Answer::Status {
                at: DATA + u64::from(DATA_LEN) - 1,
                status: VIRTIO_BLK_S_IOERR,
            },
        ),
        // Indirect tables (INDIRECT_DESC is not offered, yet the queue follows them): a
        // length that is no multiple of 16, a table outside guest memory, one after the
        // header.
        attack(
            "an indirect table of 56 bytes",
            VIRTIO_BLK_T_OUT,
            0,
            &[Descriptor::indirect(TABLE, 56)],
            Answer::Nothing,
        ),
        attack(
            "an indirect table outside guest memory",
            VIRTIO_BLK_T_OUT,
            0,
            &[Descriptor::indirect(OUTSIDE, 48)],
            Answer::Nothing,
        ),
        attack(
            "an indirect table of 24 bytes after the header",
            VIRTIO_BLK_T_OUT,
            0,
            &[header, Descriptor::indirect(TABLE, 24)],
            Answer::Nothing,
        ),
    ];
    // Chains that do not end: a loop, one longer than the queue, one leading out of the
    // descriptor table. Each holds a well-formed write up to where it goes wrong.
    let mut looping = attack(
        "a status descriptor chained to itself",
        VIRTIO_BLK_T_OUT,
        0,
        &[header, data_out, status],
        ioerr(),
    );
    looping.chain[2] = status.then(2);
    let mut outside = attack(
        "a chain leading out of the descriptor table",
        VIRTIO_BLK_T_OUT,
        0,
        &[header, data_out, status],
        ioerr(),
    );
    outside.chain[2] = status.then(200);
    // Header, 14 x 512 bytes of data, status: every slot, and back to the first. Cut at
    // the queue's size it would be a well-formed write of 7 KiB.
    let mut long = vec![header];
    long.extend((0..14).map(|i| Descriptor::readable(DATA + 512 * i, 512)));
    long.push(status);
    let mut longer = attack(
        "a chain longer than the queue",
        VIRTIO_BLK_T_OUT,
        0,
        &long,
        ioerr(),
    );
    longer.chain[15] = status.then(0);
    for unterminated in [&mut looping, &mut outside, &mut longer] {
        unterminated.checks_image = true;
    }
    attacks.extend([looping, outside, longer]);
    attacks
}

/// The victim's image: nothing hostile may change it.
fn image_crc(node: &TandemNode, volume: &str) -> u32 {
    let image = std::fs::read(node.images().join(format!("{volume}.img"))).expect("volume image");
    crc32c::crc32c(&image)
}

/// tandemd answers its control socket and `bystander` still reads back what it writes.
fn daemon_and_bystander_serve(node: &TandemNode, bystander: &mut VhostFrontend, after: &str) {
    assert!(
        node.tandem(&["volume", "list", "--json"]).status.success(),
        "tandemd stopped answering after {after}:\n{}",
        node.log()
    );
    let pattern: Vec<u8> = after.bytes().cycle().take(4096).collect();
    assert!(
        bystander.write(8, &pattern),
        "the bystander's write failed after {after}"
    );
    assert_eq!(
        bystander.read(8, 4096).as_deref(),
        Some(pattern.as_slice()),
        "the bystander read back other bytes after {after}"
    );
}

/// CPU clock ticks (user + system) each of tandemd's vhost-user queue workers used so far,
/// by thread id: the threads vhost-user-backend names `vring_worker` (the victim's, and
/// the bystander's, which is idle while the victim is attacked).
fn queue_worker_ticks(node: &TandemNode) -> HashMap<u32, u64> {
    let pid = node.pid().expect("tandemd runs");
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("/proc/<pid>/task");
    let mut ticks = HashMap::new();
    for task in tasks {
        let task = task.expect("/proc/<pid>/task entry").path();
        // A thread that ended meanwhile has no stat any more.
        let Ok(stat) = std::fs::read_to_string(task.join("stat")) else {
            continue;
        };
        // "tid (name) state ...": the name may hold anything, so it ends at the last ')'.
        let (tid, rest) = stat.split_once(" (").expect("thread stat: tid");
        let (name, fields) = rest.rsplit_once(')').expect("thread stat: name");
        if name != "vring_worker" {
            continue;
        }
        // After the name, utime and stime are the 12th and 13th fields.
        let fields: Vec<&str> = fields.split_whitespace().collect();
        let field = |i: usize| -> u64 {
            fields
                .get(i)
                .and_then(|f| f.parse().ok())
                .unwrap_or_else(|| panic!("thread stat field {i}: {stat}"))
        };
        let tid = tid.parse().expect("thread stat: tid");
        ticks.insert(tid, field(11) + field(12));
    }
    assert!(!ticks.is_empty(), "tandemd has no vring_worker thread");
    ticks
}

/// CPU seconds the queue workers used between two [`queue_worker_ticks`].
fn queue_worker_cpu_secs(before: &HashMap<u32, u64>, after: &HashMap<u32, u64>) -> f64 {
    let ticks: u64 = after
        .iter()
        .map(|(tid, &t)| t.saturating_sub(before.get(tid).copied().unwrap_or(0)))
        .sum();
    // SAFETY: sysconf has no preconditions.
    let per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    assert!(per_sec > 0, "sysconf(_SC_CLK_TCK) = {per_sec}");
    ticks as f64 / per_sec as f64
}

/// Wait until no frontend has `volume` open (the previous connection was released), so
/// that the next handshake does not race the previous frontend's going away.
fn wait_until_released(node: &TandemNode, volume: &str) {
    let released = wait_until(Duration::from_secs(10), || {
        let status = node
            .tandem(&["volume", "status", volume, "--json"])
            .ok()
            .json();
        status["open_writers"].as_u64() == Some(0)
    });
    assert!(
        released,
        "a frontend still holds {volume} open:\n{}",
        node.log()
    );
}

/// Issue 17's hostile frontend on the virtqueues: a valid vhost-user handshake on the
/// `victim` socket (the `vhost` crate's frontend, guest memory in a memfd, see
/// `tandem_tests::vhost_frontend`), then hostile descriptors, ring indexes and headers,
/// and kicks. Each is answered as documented ([`Answer`]) or, for a head index out of
/// range, the connection is hung up; tandemd keeps answering, the `bystander` volume keeps
/// serving its own frontend, and the victim's image is never written. A connection closed
/// with requests in flight is followed by a working one.
fn ring_attacks(node: &TandemNode, victim: &Path, bystander: &Path) {
    let started = Instant::now();
    let mut bystander = VhostFrontend::connect(bystander).expect("bystander handshake");
    // The malicious messages' connections are gone: no race with the 500 ms grace a new
    // frontend gets while the previous one goes away.
    wait_until_released(node, "victim");
    let mut evil = VhostFrontend::connect(victim).expect("victim handshake");
    let image = image_crc(node, "victim");
    let sane = evil.read(0, 4096);
    assert_eq!(
        sane,
        Some(vec![0; 4096]),
        "a well-formed read on the victim failed"
    );

    for attack in hostile_requests() {
        evil.poke(HEADER, &attack.header);
        evil.poke(STATUS, &[UNTOUCHED]);
        evil.poke(DATA, &[0xa5; DATA_LEN as usize]);
        // An indirect table holding a well-formed write, a range past the end.
        let mut range = [0u8; 16];
        range[0..8].copy_from_slice(&VICTIM_SECTORS.to_le_bytes());
        range[8..12].copy_from_slice(&8u32.to_le_bytes());
        evil.poke(RANGE, &range);
        evil.table(
            TABLE,
            &linked(
                0,
                &[
                    Descriptor::readable(HEADER, 16),
                    Descriptor::readable(DATA, DATA_LEN),
                    Descriptor::writable(STATUS, 1),
                ],
            ),
        );
        evil.descriptors(0, &attack.chain);
        let used = evil.submit(0);
        let what = format!("'{}'", attack.what);
        let (want_len, status_at, want_status) = match attack.answer {
            Answer::Status { at, status } => (1, at, status as u8),
            Answer::Nothing => (0, STATUS, UNTOUCHED),
        };
        assert_eq!(
            used,
            Some(Used {
                id: 0,
                len: want_len
            }),
            "{what}: not answered as {:?}\n{}",
            attack.answer,
            node.log()
        );
        assert_eq!(
            evil.peek(status_at, 1)[0],
            want_status,
            "{what}: status byte"
        );
        assert!(
            !evil.hung_up(Duration::ZERO),
            "{what}: the connection was hung up"
        );
        if attack.checks_image {
            assert_eq!(
                image_crc(node, "victim"),
                image,
                "{what} changed the victim's image"
            );
        }
        daemon_and_bystander_serve(node, &mut bystander, &what);
    }
    assert_eq!(
        image_crc(node, "victim"),
        image,
        "a hostile request changed the victim's image"
    );

    // An available index more than a queue ahead of the used index: nothing is taken, the
    // worker does not spin, and once the index is sane again the next kick is served.
    let used_before = evil.used_idx();
    let cpu_before = queue_worker_ticks(node);
    let kicking = Instant::now();
    evil.publish_avail_idx(
        evil.avail_idx()
            .wrapping_add(3 * vhost_frontend::QUEUE_SIZE),
    );
    for _ in 0..10 {
        evil.kick();
        std::thread::sleep(Duration::from_millis(50));
    }
    let elapsed = kicking.elapsed().as_secs_f64();
    let cpu = queue_worker_cpu_secs(&cpu_before, &queue_worker_ticks(node));
    assert_eq!(
        evil.used_idx(),
        used_before,
        "requests taken past a bogus available index"
    );
    assert!(
        cpu < 0.5 * elapsed,
        "tandemd's queue workers used {cpu:.2} s of CPU in {elapsed:.2} s on a bogus available index (spinning?)"
    );
    assert!(!evil.hung_up(Duration::ZERO));
    evil.publish_avail_idx(evil.avail_idx());
    assert_eq!(
        evil.read(0, 4096),
        Some(vec![0; 4096]),
        "the queue did not recover"
    );
    daemon_and_bystander_serve(node, &mut bystander, "a bogus available index");

    // A head index out of the descriptor table: its completion cannot enter the used ring
    // (later ones would be out of order), so the connection is hung up.
    let used_before = evil.used_idx();
    evil.offer(200);
    evil.kick();
    assert!(
        evil.hung_up(Duration::from_secs(5)),
        "a head index of 200 did not hang up\n{}",
        node.log()
    );
    assert_eq!(evil.used_idx(), used_before);
    drop(evil);
    daemon_and_bystander_serve(node, &mut bystander, "a head index out of range");

    // A frontend that closes its connection right after kicking five requests (reads and
    // flushes: nothing legitimate writes either), then the next frontend, which connects
    // at once, is served: the one step that races a frontend's going away on purpose.
    wait_until_released(node, "victim");
    let mut leaving = VhostFrontend::connect(victim).expect("handshake after a hang-up");
    for i in 0..5u16 {
        let (first, at) = (3 * i, u64::from(i));
        let kind = if i % 2 == 0 {
            VIRTIO_BLK_T_IN
        } else {
            VIRTIO_BLK_T_FLUSH
        };
        leaving.poke(HEADER + 16 * at, &request_header(kind, 128 * at));
        leaving.descriptors(
            first,
            &linked(
                first,
                &[
                    Descriptor::readable(HEADER + 16 * at, 16),
                    Descriptor::writable(DATA + 0x1_0000 * at, 0x1_0000),
                    Descriptor::writable(STATUS + at, 1),
                ],
            ),
        );
        leaving.offer(first);
    }
    leaving.kick();
    drop(leaving);
    let mut next = VhostFrontend::connect(victim)
        .unwrap_or_else(|e| panic!("handshake after a frontend left: {e:?}\n{}", node.log()));
    assert_eq!(
        next.read(0, 4096),
        Some(vec![0; 4096]),
        "the next frontend was not served\n{}",
        node.log()
    );
    drop(next);
    daemon_and_bystander_serve(
        node,
        &mut bystander,
        "a frontend leaving with requests in flight",
    );
    assert_eq!(
        image_crc(node, "victim"),
        image,
        "the victim's image changed"
    );
    let log = node.log();
    assert!(!log.contains("panicked"), "tandemd panicked:\n{log}");
    eprintln!("[vhost ring attacks] done in {:.1?}", started.elapsed());
}

fn sha256_hex(bytes: &[u8]) -> String {
    use std::process::{Command, Stdio};
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(bytes)
        .expect("write to sha256sum");
    let out = child.wait_with_output().expect("sha256sum output");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Read from `stream` until the daemon closes it; how long that took (`None`: still open
/// after `limit`).
fn closed_within(stream: &mut UnixStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    stream.set_read_timeout(Some(limit)).expect("read timeout");
    let mut sink = [0u8; 64];
    loop {
        match stream.read(&mut sink) {
            Ok(0) => return Some(started.elapsed()),
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Some(started.elapsed())
            }
            Err(_) => return None,
        }
    }
}

#[test]
fn a_silent_client_is_closed_and_a_second_qemu_fails_fast_while_the_first_is_served() {
    if vm::skip_requested() {
        eprintln!("TANDEM_SKIP_VM_TESTS is set: skipping guest test");
        return;
    }
    const SHARED: &str = "one-frontend";
    let node = TandemNode::start_new();
    node.tandem(&["volume", "create", SHARED, "--size", "64M"])
        .ok();
    let sock = socket(&node, SHARED);
    wait_for_socket(&sock);
    let work = tempfile::Builder::new()
        .prefix("tandem-vhost-one-")
        .tempdir()
        .expect("temp dir");

    // A client that connects and says nothing, then a real QEMU: the QEMU comes up while
    // the silent client is still connected, and tandemd closes the silent one after its
    // idle timeout (5 s).
    let image = ImageBuilder::new(
        "section read dd if=/dev/vda of=/dev/null bs=4096 count=1 iflag=direct\n\
         echo @@READ-DONE\n\
         sleep 600\n",
    )
    .build(&work.path().join("image"))
    .expect("building the guest");
    let connected = Instant::now();
    let mut silent = UnixStream::connect(&sock).expect("connect");
    let first_console = work.path().join("first.log");
    let mut first = Vm::new(image.clone())
        .disk(Disk::vhost_user(&sock, 1))
        .spawn(&first_console)
        .expect("starting the first QEMU");
    let open_writers = || {
        node.tandem(&["volume", "status", SHARED, "--json"])
            .ok()
            .json()["open_writers"]
            .clone()
    };
    assert!(
        wait_until(Duration::from_secs(30), || open_writers() == 1),
        "the QEMU behind a silent client never opened the volume\n{}",
        node.log()
    );
    let opened_after = connected.elapsed();
    silent.set_nonblocking(true).expect("nonblocking");
    let still_open =
        matches!(silent.read(&mut [0u8; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
    silent.set_nonblocking(false).expect("blocking");
    assert!(
        still_open,
        "the silent client was closed before QEMU opened the volume ({opened_after:?})"
    );
    let closed = closed_within(&mut silent, Duration::from_secs(30)).map(|_| connected.elapsed());
    eprintln!(
        "[vhost one frontend] QEMU opened the volume {opened_after:.1?} after the silent client connected; the silent client was closed after {closed:.1?}"
    );
    assert!(
        closed.is_some_and(|t| t >= Duration::from_secs(4) && t < Duration::from_secs(15)),
        "the silent connection was not closed after the idle timeout ({closed:?})"
    );
    assert!(
        wait_until(vm::DEFAULT_TIMEOUT, || {
            std::fs::read_to_string(&first_console)
                .unwrap_or_default()
                .contains("@@READ-DONE")
        }),
        "the QEMU after a silent client never read its disk:\n{}\n{}",
        std::fs::read_to_string(&first_console).unwrap_or_default(),
        node.log()
    );
    let run =
        vm::GuestRun::from_console(&std::fs::read_to_string(&first_console).unwrap_or_default());
    run.assert_section_ok("read");

    // A second QEMU on the served socket fails at once with an error.
    let started = Instant::now();
    let second = Vm::new(image)
        .disk(Disk::vhost_user(&sock, 1))
        .timeout(Duration::from_secs(60))
        .run(&work.path().join("second.log"));
    let failed_after = started.elapsed();
    let error = match second {
        Err(e) => format!("{e:#}"),
        Ok(run) => panic!(
            "a second QEMU ran on a served socket (timed out: {}):\n{}",
            run.timed_out,
            run.script_console()
        ),
    };
    eprintln!("[vhost one frontend] second QEMU failed after {failed_after:.1?}: {error}");
    assert!(
        failed_after < Duration::from_secs(20),
        "the second QEMU took {failed_after:?} to fail"
    );
    let log = node.log();
    assert!(
        log.contains("refusing a second frontend") && log.contains(SHARED),
        "tandemd did not log the refused connection with the volume:\n{log}"
    );
    // The first guest is still served.
    assert_eq!(
        node.tandem(&["volume", "status", SHARED, "--json"])
            .ok()
            .json()["open_writers"],
        1
    );
    first.kill();
}

/// The failover drill over vhost-user-blk: a guest on hv1 writes numbered 4 KiB blocks, each
/// with `O_DIRECT` and an fsync, and prints `ack N` once the write returned; tandemd on hv1
/// is killed mid-stream, hv2 is promoted, and every acknowledged block is on hv2.
#[test]
fn a_replicated_volume_over_vhost_user_blk_loses_no_acknowledged_write_when_the_primary_dies() {
    if vm::skip_requested() {
        eprintln!("TANDEM_SKIP_VM_TESTS is set: skipping guest test");
        return;
    }
    const DRILL: &str = "vhost-drill";
    let mut cluster = LoopbackCluster::start(&[("hv1", false), ("hv2", false)]);
    cluster
        .node("hv1")
        .tandem(&[
            "volume",
            "create",
            DRILL,
            "--size",
            "64M",
            "--replicas",
            "2",
        ])
        .ok();
    let in_sync = |node: &TandemNode| {
        let s = node
            .tandem(&["volume", "status", DRILL, "--json"])
            .ok()
            .json();
        s["disk_state"] == "UpToDate"
            && s["peers"].as_array().is_some_and(|p| {
                p.iter()
                    .all(|p| p["connection"] == "Connected" && p["out_of_sync_bytes"] == 0)
            })
    };
    assert!(
        wait_until(Duration::from_secs(30), || in_sync(cluster.node("hv1"))
            && in_sync(cluster.node("hv2"))),
        "replicas never connected\n{}",
        cluster.logs()
    );
    let sock1 = socket(cluster.node("hv1"), DRILL);
    wait_for_socket(&sock1);

    let work = tempfile::Builder::new()
        .prefix("tandem-vhost-drill-")
        .tempdir()
        .expect("temp dir");
    let image = ImageBuilder::new(
        "i=1\n\
         while [ $i -le 4000 ]; do\n\
           printf 'seq %08d\\n' $i > /tmp/b\n\
           dd if=/tmp/b of=/dev/vda bs=4096 seek=$i conv=sync,fsync oflag=direct 2>/dev/null || break\n\
           echo \"ack $i\"\n\
           i=$((i + 1))\n\
         done\n\
         sleep 600\n",
    )
    .build(work.path())
    .expect("building the writer guest");
    let console = work.path().join("console.log");
    let mut running = Vm::new(image)
        .disk(Disk::vhost_user(&sock1, 2))
        .spawn(&console)
        .expect("booting the writer guest on hv1");
    let acked = || -> Vec<u64> {
        std::fs::read_to_string(&console)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().strip_prefix("ack ")?.parse().ok())
            .collect()
    };
    assert!(
        wait_until(Duration::from_secs(180), || acked().len() >= 30),
        "the guest never acknowledged 30 writes\n{}",
        std::fs::read_to_string(&console).unwrap_or_default()
    );
    cluster.node_mut("hv1").crash();
    // Acks already on their way to the console land within a moment; none can follow.
    std::thread::sleep(Duration::from_secs(3));
    let acked = acked();
    running.kill();

    let hv2 = cluster.node("hv2");
    assert!(
        wait_until(Duration::from_secs(30), || {
            hv2.tandem(&["volume", "promote", DRILL]).status.success()
        }),
        "hv2 could not be promoted after hv1 died\n{}",
        hv2.log()
    );
    let data = std::fs::read(hv2.images().join(format!("{DRILL}.img"))).expect("hv2's image");
    let lost: Vec<u64> = acked
        .iter()
        .copied()
        .filter(|&i| {
            let at = (i * 4096) as usize;
            let want = format!("seq {i:08}\n");
            data.get(at..at + want.len()) != Some(want.as_bytes())
        })
        .collect();
    eprintln!(
        "[vhost drill] {} writes acknowledged before hv1 died, {} lost",
        acked.len(),
        lost.len()
    );
    assert!(
        lost.is_empty(),
        "acknowledged writes missing on hv2: {lost:?}"
    );
}
