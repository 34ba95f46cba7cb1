//! Issue 4 role rules of a replicated volume as QEMU sees them, with `qemu-io` over each
//! node's NBD socket (two `tandemd`s on loopback): a writer auto-promotes; a writer on the
//! other node is refused during the handshake with the engine's message; the last writer
//! closing demotes, after which the other node can take over and
//! reads what was written; both replicas' files are then byte-identical. (NBD has no
//! read-only open: every connection opens for writing and so promotes; the "a Secondary
//! serves no reads" rule for read-only frontend opens is tested on `Exports` directly.) Needs `qemu-io`
//! (qemu-utils) and `cargo build --workspace --bins`.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use tandem_tests::loopback_cluster::LoopbackCluster;
use tandem_tests::{wait_until, TandemNode};

fn status(node: &TandemNode, volume: &str) -> Value {
    node.tandem(&["volume", "status", volume, "--json"])
        .ok()
        .json()
}

fn connected(node: &TandemNode, volume: &str) -> bool {
    let s = status(node, volume);
    s["disk_state"] == "UpToDate"
        && s["peers"]
            .as_array()
            .is_some_and(|p| p.iter().all(|p| p["connection"] == "Connected"))
}

#[test]
fn qemu_sees_the_role_rules() {
    let cluster = LoopbackCluster::start(&[("hv1", false), ("hv2", false)]);
    let (hv1, hv2) = (cluster.node("hv1"), cluster.node("hv2"));
    hv1.tandem(&[
        "volume",
        "create",
        "vm-1",
        "--size",
        "16M",
        "--replicas",
        "2",
    ])
    .ok();
    assert!(
        wait_until(Duration::from_secs(30), || connected(hv1, "vm-1")
            && connected(hv2, "vm-1")),
        "replicas never connected\n{}",
        cluster.logs()
    );

    // A writer on hv1 stays open (qemu-io reading commands from stdin).
    let mut writer = Command::new("qemu-io")
        .args(["-f", "raw"])
        .arg(hv1.nbd_uri("vm-1"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-io (package qemu-utils) must be installed");
    let mut stdin = writer.stdin.take().unwrap();
    writeln!(stdin, "write -P 0x5a 0 1M").unwrap();
    writeln!(stdin, "write -P 0xc3 15M 1M").unwrap();
    writeln!(stdin, "flush").unwrap();
    stdin.flush().unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || status(hv1, "vm-1")
            ["open_writers"]
            == 1
            && status(hv2, "vm-1")["peers"][0]["role"] == "Primary"),
        "hv1 never became Primary for its writer: {:#}\n{}",
        status(hv1, "vm-1"),
        cluster.logs()
    );
    assert_eq!(status(hv1, "vm-1")["role"], "Primary");
    assert_eq!(status(hv1, "vm-1")["promoted_explicitly"], false);

    // A writer on hv2 is refused during the handshake with the engine's message.
    let (ok, text) = hv2.qemu_io("vm-1", &["write -P 0x11 0 4k"]);
    assert!(!ok, "hv2 opened for writing while hv1 is Primary: {text}");
    assert!(text.contains("Primary on hv1"), "{text}");

    // The writer quits: hv1 demotes by itself.
    writeln!(stdin, "quit").unwrap();
    drop(stdin);
    let out = writer.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains("wrote 1048576/1048576 bytes") && !said.contains("failed"),
        "{said}"
    );
    assert!(
        wait_until(Duration::from_secs(20), || status(hv1, "vm-1")["role"]
            == "Secondary"
            && status(hv1, "vm-1")["open_writers"] == 0),
        "hv1 did not demote after its last writer: {:#}",
        status(hv1, "vm-1")
    );

    // hv2 takes over (once the links are back) and reads what hv1 wrote.
    assert!(
        wait_until(Duration::from_secs(20), || connected(hv1, "vm-1")
            && connected(hv2, "vm-1")),
        "{}",
        cluster.logs()
    );
    let (ok, text) = hv2.qemu_io("vm-1", &["read -P 0x5a 0 1M"]);
    assert!(ok, "{text}\n{}", cluster.logs());
    let (ok, text) = hv2.qemu_io("vm-1", &["read -P 0xc3 15M 1M"]);
    assert!(ok, "{text}");
    assert!(
        wait_until(Duration::from_secs(20), || status(hv2, "vm-1")["role"]
            == "Secondary"),
        "hv2 did not demote"
    );
    let a = std::fs::read(hv1.images().join("vm-1.img")).unwrap();
    let b = std::fs::read(hv2.images().join("vm-1.img")).unwrap();
    assert!(a == b, "the replicas differ");
    assert!(a[..1 << 20].iter().all(|&x| x == 0x5a));
}

/// Create `vm-2` on hv1+hv2, stop hv2, write 4 MiB of 0x77 at 4 MiB on hv1 (two voters:
/// no quorum rule), check that hv1 tracks them as out of sync for hv2 and that `wait-sync`
/// times out with a non-zero exit.
fn write_while_hv2_is_away() -> LoopbackCluster {
    let mut cluster = LoopbackCluster::start(&[("hv1", false), ("hv2", false)]);
    cluster
        .node("hv1")
        .tandem(&[
            "volume",
            "create",
            "vm-2",
            "--size",
            "32M",
            "--replicas",
            "2",
        ])
        .ok();
    assert!(
        wait_until(Duration::from_secs(30), || connected(
            cluster.node("hv1"),
            "vm-2"
        ) && connected(
            cluster.node("hv2"),
            "vm-2"
        )),
        "{}",
        cluster.logs()
    );
    cluster.node_mut("hv2").stop();
    let (ok, text) = cluster
        .node("hv1")
        .qemu_io("vm-2", &["write -P 0x77 4M 4M"]);
    assert!(ok, "{text}\n{}", cluster.logs());
    let s = status(cluster.node("hv1"), "vm-2");
    let behind = s["peers"][0]["out_of_sync_bytes"].as_u64().unwrap();
    assert!(behind >= 4 << 20, "{s:#}");
    let e = cluster
        .node("hv1")
        .tandem(&["volume", "wait-sync", "vm-2", "--timeout", "1"])
        .failed();
    assert!(e.contains("not in sync after 1 s"), "{e}");
    cluster
}

#[test]
fn writes_without_the_peer_are_tracked_and_wait_sync_times_out() {
    write_while_hv2_is_away();
}

#[test]
fn a_returning_node_resyncs_what_it_missed_and_wait_sync_sees_it() {
    let mut cluster = write_while_hv2_is_away();
    cluster.node_mut("hv2").start();
    cluster
        .node("hv1")
        .tandem(&["volume", "wait-sync", "vm-2", "--timeout", "60"])
        .ok();
    let s = status(cluster.node("hv2"), "vm-2");
    assert_eq!(s["disk_state"], "UpToDate", "{s:#}");
    let a = std::fs::read(cluster.node("hv1").images().join("vm-2.img")).unwrap();
    let b = std::fs::read(cluster.node("hv2").images().join("vm-2.img")).unwrap();
    assert!(a == b, "the replicas differ after the resync");
    assert!(b[4 << 20..8 << 20].iter().all(|&x| x == 0x77));
    // Online verify (the engine runs it from the Primary) finds nothing to fix.
    cluster
        .node("hv1")
        .tandem(&["volume", "promote", "vm-2"])
        .ok();
    let verified = cluster
        .node("hv1")
        .tandem(&["volume", "verify", "vm-2", "--json"])
        .ok()
        .json();
    assert_eq!(verified["differing_blocks"], 0, "{verified}");
    assert_eq!(verified["checked_bytes"], 32 << 20, "{verified}");
    let human = cluster
        .node("hv1")
        .tandem(&["volume", "verify", "vm-2"])
        .ok()
        .stdout;
    assert!(human.contains("0 differing block(s)"), "{human}");
    cluster
        .node("hv1")
        .tandem(&["volume", "demote", "vm-2"])
        .ok();
}

/// The export's size (asked on every request's range check) follows an online resize.
#[test]
fn an_online_resize_is_seen_by_new_nbd_clients_and_range_checks() {
    let cluster = LoopbackCluster::start(&[("hv1", false), ("hv2", false)]);
    let (hv1, hv2) = (cluster.node("hv1"), cluster.node("hv2"));
    hv1.tandem(&[
        "volume",
        "create",
        "vm-3",
        "--size",
        "16M",
        "--replicas",
        "2",
    ])
    .ok();
    assert!(
        wait_until(Duration::from_secs(30), || connected(hv1, "vm-3")
            && connected(hv2, "vm-3")),
        "{}",
        cluster.logs()
    );
    let (ok, text) = hv1.qemu_io("vm-3", &["write -P 0x21 17M 1M"]);
    assert!(!ok, "a write beyond 16 MiB succeeded: {text}");
    hv1.tandem(&["volume", "resize", "vm-3", "--size", "32M"])
        .ok();
    let (ok, text) = hv1.qemu_io("vm-3", &["write -P 0x21 31M 1M", "read -P 0x21 31M 1M"]);
    assert!(ok, "{text}\n{}", cluster.logs());
    let out = std::process::Command::new("qemu-img")
        .args(["info", "--output=json", "-f", "raw"])
        .arg(hv1.nbd_uri("vm-3"))
        .output()
        .expect("qemu-img (package qemu-utils) must be installed");
    let info: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "qemu-img info: {e}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(info["virtual-size"], 32 << 20, "{info}");
}
