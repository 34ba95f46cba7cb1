//! Issue 16 acceptance: backing I/O without the host page cache, through a real `tandemd`
//! and real NBD clients (fio's nbd engine, qemu-io).
//!
//! - A 1 GiB fio write through a `cache = "none"` volume grows the page cache by at most
//!   64 MiB, measured with `/proc/meminfo` (`Cached`) and the backing file's resident pages
//!   (`fincore`, util-linux). A `cache = "writeback"` volume is the control: the same
//!   measurement sees its data in the page cache.
//! - The thread-pool engine (`io_engine = "thread-pool"`) serves the same requests,
//!   unaligned ones included, and the log names the engine and cache mode in use.
//! - io_uring rings that fail to set up fall back to the thread-pool engine, never to an
//!   I/O error, on `cache = "none"` and `writeback` pools alike.
//! - A pool whose file system refuses O_DIRECT is refused alone; the others serve.
//!
//! Needs `cargo build --workspace --bins` first, fio, qemu-io and fincore.

use std::path::Path;
use std::process::Command;

use tandem_tests::TandemNode;

const MIB: u64 = 1 << 20;

/// A one-node config with `pools` (TOML `[[pools]]` entries; `{root}` is the test's
/// temp directory).
fn config(root: &Path, pools: &str) -> String {
    format!(
        r#"node = "hv1"
state_dir = "{root}/state"
run_dir = "{root}/run"
secret_file = "{root}/secret"

[[nodes]]
name = "hv1"
control = "127.0.0.1:7700"
replication = "127.0.0.1:7788"
{pools}"#,
        root = root.display(),
        pools = pools.replace("{root}", &root.display().to_string())
    )
}

/// A node with three pools: the default (`cache = "none"`, engine `auto`), a thread-pool
/// engine pool and a `writeback` pool, all on the test's temp directory (ext4 in CI).
fn node() -> TandemNode {
    let mut node = TandemNode::with_config(|root| {
        config(
            root,
            r#"
[[pools]]
name = "direct"
backend = "file"
path = "{root}/images"

[[pools]]
name = "threads"
backend = "file"
path = "{root}/images-threads"
io_engine = "thread-pool"

[[pools]]
name = "cached"
backend = "file"
path = "{root}/images-cached"
cache = "writeback"
"#,
        )
    });
    node.start();
    node
}

fn create(node: &TandemNode, volume: &str, size: &str, pool: &str) {
    node.tandem(&["volume", "create", volume, "--size", size, "--pool", pool])
        .ok();
}

/// `Cached:` of /proc/meminfo, in bytes.
fn page_cache_bytes() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let line = meminfo
        .lines()
        .find(|l| l.starts_with("Cached:"))
        .expect("Cached: in /proc/meminfo");
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

/// Resident bytes of `file` in the page cache, as `fincore` reports them.
fn resident_bytes(file: &Path) -> u64 {
    let out = Command::new("fincore")
        .args(["--bytes", "--noheadings", "--output", "RES"])
        .arg(file)
        .output()
        .expect("run fincore (util-linux)");
    assert!(out.status.success(), "fincore: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// fio's nbd engine writes `size` sequentially in 1 MiB requests at queue depth 8.
fn fio_write(node: &TandemNode, volume: &str, size: &str) {
    let out = Command::new("fio")
        .args([
            "--name=w",
            "--ioengine=nbd",
            &format!("--uri={}", node.nbd_uri(volume)),
            "--rw=write",
            "--bs=1M",
            "--iodepth=8",
            &format!("--size={size}"),
            "--end_fsync=1",
        ])
        .output()
        .expect("run fio");
    assert!(
        out.status.success(),
        "fio failed: {}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        node.log()
    );
}

#[test]
fn a_1_gib_write_through_cache_none_stays_out_of_the_page_cache() {
    let node = node();
    create(&node, "big", "1G", "direct");
    create(&node, "control", "256M", "cached");
    let image = node.images().join("big.img");

    let cached_before = page_cache_bytes();
    fio_write(&node, "big", "1G");
    let growth = page_cache_bytes().saturating_sub(cached_before);
    let resident = resident_bytes(&image);
    eprintln!(
        "cache = none, 1 GiB written: page cache grew {} MiB, backing file resident {} MiB",
        growth / MIB,
        resident / MIB
    );
    assert!(
        resident <= 64 * MIB,
        "backing file resident: {resident} bytes"
    );
    assert!(growth <= 64 * MIB, "page cache grew by {growth} bytes");

    // The control: the same measurement does see a writeback volume's data.
    let control = node.root().join("images-cached/control.img");
    fio_write(&node, "control", "256M");
    let resident = resident_bytes(&control);
    eprintln!(
        "cache = writeback, 256 MiB written: backing file resident {} MiB",
        resident / MIB
    );
    assert!(
        resident >= 200 * MIB,
        "writeback resident: {resident} bytes"
    );

    let pools = node.tandem(&["pool", "list", "--json"]).ok().json();
    let cache_of = |name: &str| {
        pools
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .map(|p| p["cache"].as_str().unwrap().to_string())
    };
    assert_eq!(cache_of("direct").as_deref(), Some("none"));
    assert_eq!(cache_of("cached").as_deref(), Some("writeback"));
    let table = node.tandem(&["pool", "list"]).ok().stdout;
    assert!(
        table.contains("CACHE") && table.contains("writeback"),
        "{table}"
    );
    let log = node.log();
    assert!(log.contains("go through the host page cache"), "{log}");
}

/// Aligned and unaligned writes, zeroes, a discard and a flush through qemu-io, then every
/// byte range read back with the pattern it must hold.
fn aligned_and_unaligned_round_trip(node: &TandemNode, volume: &str) {
    let (ok, out) = node.qemu_io(
        volume,
        &[
            "write -P 0x11 0 64k",
            "write -P 0x22 513 1000",
            "write -P 0x33 4095 2",
            "write -z 8192 100",
            "write -P 0x44 1048576 4096",
            "write -P 0x55 65536 4096",
            "discard 65536 4096",
            "flush",
        ],
    );
    assert!(ok, "{volume}: {out}");
    let (ok, out) = node.qemu_io(
        volume,
        &[
            "read -P 0x11 0 513",
            "read -P 0x22 513 1000",
            "read -P 0x11 1513 2582",
            "read -P 0x33 4095 2",
            "read -P 0x11 4097 4095",
            "read -P 0 8192 100",
            "read -P 0x11 8292 57244",
            "read -P 0x44 1048576 4096",
            "read -P 0 65536 4096",
        ],
    );
    assert!(ok, "{volume}: {out}");
}

/// The same unaligned and aligned requests through both engines read back exactly.
#[test]
fn both_engines_serve_aligned_and_unaligned_requests() {
    let node = node();
    for (volume, pool, engine) in [("u", "direct", "io_uring"), ("t", "threads", "thread-pool")] {
        create(&node, volume, "16M", pool);
        aligned_and_unaligned_round_trip(&node, volume);
        let log = node.log();
        let opened = log
            .lines()
            .find(|l| l.contains("backing device opened") && l.contains(&format!("{volume}.img")))
            .unwrap_or_else(|| panic!("no open line for {volume}:\n{log}"));
        assert!(opened.contains(&format!("engine={engine}")), "{opened}");
        assert!(opened.contains("cache=none"), "{opened}");
    }
}

/// A ramfs mounted on `dir` for the length of a test (unmounted on drop, also on failure).
/// ramfs refuses O_DIRECT on every kernel (tmpfs accepts it since Linux 6.6).
struct Ramfs(std::path::PathBuf);

impl Ramfs {
    fn mount(dir: &Path) -> Ramfs {
        std::fs::create_dir_all(dir).unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "ramfs", "ramfs"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(mounted.success(), "mount -t ramfs (needs root)");
        Ramfs(dir.to_path_buf())
    }
}

impl Drop for Ramfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// `cache = "none"` on a file system without O_DIRECT: that pool alone is refused, naming
/// the pool and the fix; tandemd runs and its other pool serves volumes.
#[test]
fn a_pool_without_o_direct_is_refused_alone() {
    let mut node = TandemNode::with_config(|root| {
        config(
            root,
            r#"
[[pools]]
name = "ram"
backend = "file"
path = "{root}/ram"

[[pools]]
name = "files"
backend = "file"
path = "{root}/images"
"#,
        )
    });
    let _ram = Ramfs::mount(&node.root().join("ram"));
    node.start();

    // `pool list` exits non-zero while a pool has an error, and still lists every pool.
    let pools = node.tandem(&["pool", "list", "--json"]).json();
    let error_of = |name: &str| {
        pools
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .map(|p| p["error"].as_str().unwrap_or_default().to_string())
            .unwrap_or_else(|| panic!("pool {name} listed: {pools}"))
    };
    let refusal = error_of("ram");
    assert!(refusal.contains("O_DIRECT"), "{refusal}");
    assert!(refusal.contains("cache = \"writeback\""), "{refusal}");
    assert_eq!(error_of("files"), "");
    let log = node.log();
    assert!(
        log.lines()
            .any(|l| l.contains("ERROR") && l.contains("pool refused") && l.contains("ram")),
        "{log}"
    );

    let refused = node
        .tandem(&["volume", "create", "r", "--size", "16M", "--pool", "ram"])
        .failed();
    assert!(refused.contains("pool 'ram'"), "{refused}");
    assert!(refused.contains("cache = \"writeback\""), "{refused}");

    create(&node, "ok", "16M", "files");
    let (ok, out) = node.qemu_io("ok", &["write -P 0x5a 0 64k", "flush"]);
    assert!(ok, "{out}");
    let (ok, out) = node.qemu_io("ok", &["read -P 0x5a 0 64k"]);
    assert!(ok, "{out}");
}

/// io_uring rings that fail to set up after the probe (forced with
/// `TANDEM_FAULT_IO_URING_SETUP`, as EMFILE would): a `cache = "none"` and a `writeback`
/// pool under `io_engine = "auto"` still serve every request, on the thread-pool engine,
/// and the daemon says so once.
#[test]
fn ring_setup_failures_fall_back_to_the_thread_pool() {
    let mut node = TandemNode::with_config(|root| {
        config(
            root,
            r#"
[[pools]]
name = "direct"
backend = "file"
path = "{root}/images"

[[pools]]
name = "cached"
backend = "file"
path = "{root}/images-cached"
cache = "writeback"
"#,
        )
    });
    node.start_with_env(&[("TANDEM_FAULT_IO_URING_SETUP", "1")]);
    for (volume, pool) in [("d", "direct"), ("c", "cached")] {
        create(&node, volume, "16M", pool);
        aligned_and_unaligned_round_trip(&node, volume);
    }
    let log = node.log();
    let warnings = log
        .lines()
        .filter(|l| l.contains("could not be set up; such operations use the thread-pool engine"))
        .count();
    assert_eq!(warnings, 1, "{log}");
    assert!(log.contains("cannot start a shared io_uring"), "{log}");
}
