//! `tandem volume rename` through the real CLI against real `tandemd`s on loopback: a
//! 2-replica volume (plus a diskless tiebreaker) with data written over NBD is renamed on
//! every node, reads back under the new name on both replicas and reconnects; refusals
//! (target exists on another node, Primary, node down) change nothing; a failed commit is
//! rolled back; a create racing a rename to one name: exactly one wins; a single-node volume
//! on a file pool (refused while an NBD writer has it open). Needs
//! `cargo build --workspace --bins` and `qemu-io` (qemu-utils).

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

fn settled(node: &TandemNode, volume: &str) -> bool {
    let s = status(node, volume);
    s["disk_state"] == "UpToDate"
        && s["role"] == "Secondary"
        && s["peers"].as_array().is_some_and(|p| {
            p.iter()
                .filter(|p| p["diskless"] == false)
                .all(|p| p["connection"] == "Connected" && p["disk_state"] == "UpToDate")
        })
}

fn wait_settled(cluster: &LoopbackCluster, nodes: &[&str], volume: &str) {
    for n in nodes {
        let node = cluster.node(n);
        assert!(
            wait_until(Duration::from_secs(30), || settled(node, volume)),
            "{n}: {volume} never Secondary with its peer Connected/UpToDate: {:#}\n{}",
            status(node, volume),
            cluster.logs()
        );
    }
}

fn names(node: &TandemNode) -> Vec<String> {
    node.tandem(&["volume", "list", "--json"])
        .ok()
        .json()
        .as_array()
        .expect("volume list is an array")
        .iter()
        .map(|v| v["name"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// Definition, metadata directory and image of `volume` on `node`.
fn traces(node: &TandemNode, volume: &str) -> [bool; 3] {
    [
        node.definitions().join(format!("{volume}.json")).exists(),
        node.definitions().join(volume).exists(),
        node.images().join(format!("{volume}.img")).exists(),
    ]
}

#[test]
fn a_replicated_volume_with_data_is_renamed_on_every_node() {
    let cluster = LoopbackCluster::start(&[("hv1", false), ("hv2", false), ("witness", true)]);
    let (hv1, hv2, witness) = (
        cluster.node("hv1"),
        cluster.node("hv2"),
        cluster.node("witness"),
    );
    let (old, new) = ("vm-100-disk-0", "vm-200-disk-1");
    hv1.tandem(&["volume", "create", old, "--size", "16M", "--replicas", "2"])
        .ok();
    wait_settled(&cluster, &["hv1", "hv2"], old);
    let (ok, text) = hv1.qemu_io(
        old,
        &["write -P 0x5a 0 1M", "write -P 0xc3 15M 1M", "flush"],
    );
    assert!(ok, "{text}\n{}", cluster.logs());
    wait_settled(&cluster, &["hv1", "hv2"], old);

    // Refused: NEW exists on another node (a single-replica volume on hv2).
    hv2.tandem(&["volume", "create", new, "--size", "4M"]).ok();
    let e = hv1.tandem(&["volume", "rename", old, new]).failed();
    assert!(
        e.contains(&format!("'{new}' already exists on node 'hv2'")),
        "{e}"
    );
    hv2.tandem(&["volume", "delete", new]).ok();

    // Refused: Primary on hv1 (an explicit promote stands in for a running VM).
    hv1.tandem(&["volume", "promote", old]).ok();
    let e = hv2.tandem(&["volume", "rename", old, new]).failed();
    assert!(
        e.contains(&format!(
            "{old} is in use on hv1 (Primary); stop the VM first"
        )),
        "{e}"
    );
    hv1.tandem(&["volume", "demote", old]).ok();
    // Refused: an invalid new name.
    let e = hv1.tandem(&["volume", "rename", old, "bad/name"]).failed();
    assert!(e.contains("new name"), "{e}");
    for node in [hv1, hv2, witness] {
        assert_eq!(
            names(node),
            vec![old.to_string()],
            "a refusal changed something"
        );
    }
    wait_settled(&cluster, &["hv1", "hv2"], old);

    let renamed = hv1
        .tandem(&["volume", "rename", old, new, "--json"])
        .ok()
        .json();
    assert_eq!(renamed["name"], new);
    assert_eq!(renamed["nodes"], serde_json::json!(["hv1", "hv2"]));
    assert_eq!(renamed["tiebreakers"], serde_json::json!(["witness"]));
    for node in [hv1, hv2, witness] {
        assert_eq!(names(node), vec![new.to_string()]);
        assert_eq!(traces(node, old), [false, false, false], "old name left");
    }
    assert_eq!(traces(hv1, new), [true, true, true]);
    assert_eq!(traces(hv2, new), [true, true, true]);
    assert!(traces(witness, new)[0]);

    // Connected/UpToDate again under the new name; the data reads back on both replicas.
    wait_settled(&cluster, &["hv1", "hv2"], new);
    let s = status(hv1, new);
    assert_eq!(s["volume"], new);
    let (ok, text) = hv1.qemu_io(new, &["read -P 0x5a 0 1M", "read -P 0xc3 15M 1M"]);
    assert!(ok, "{text}\n{}", cluster.logs());
    wait_settled(&cluster, &["hv1", "hv2"], new);
    // hv2 is promoted by its reader (a writable open) and reads its own replica.
    let (ok, text) = hv2.qemu_io(new, &["read -P 0x5a 0 1M", "read -P 0xc3 15M 1M"]);
    assert!(ok, "{text}\n{}", cluster.logs());
    wait_settled(&cluster, &["hv1", "hv2"], new);
    let (ok, _) = hv1.qemu_io(old, &["read 0 4k"]);
    assert!(!ok, "the old export name still serves");
    if std::env::var_os("TANDEM_TEST_SHOW_LOGS").is_some() {
        eprintln!("{}", cluster.logs());
    }
    let a = std::fs::read(hv1.images().join(format!("{new}.img"))).unwrap();
    let b = std::fs::read(hv2.images().join(format!("{new}.img"))).unwrap();
    assert!(a == b, "replicas differ after the rename");
}

#[test]
fn a_rename_with_a_node_down_is_refused_and_changes_nothing() {
    let mut cluster = LoopbackCluster::start(&[("hv1", false), ("hv2", false)]);
    cluster
        .node("hv1")
        .tandem(&["volume", "create", "v", "--size", "4M", "--replicas", "2"])
        .ok();
    cluster.node_mut("hv2").stop();
    let e = cluster
        .node("hv1")
        .tandem(&["volume", "rename", "v", "w"])
        .failed();
    assert!(
        e.contains("node 'hv2'") && e.contains("unreachable") && e.contains("nothing was changed"),
        "{e}"
    );
    assert_eq!(names(cluster.node("hv1")), vec!["v".to_string()]);
    assert_eq!(traces(cluster.node("hv1"), "w"), [false, false, false]);
    // With hv2 back, the same command works and the replicas reconnect under the new name.
    cluster.node_mut("hv2").start();
    wait_settled(&cluster, &["hv1", "hv2"], "v");
    cluster
        .node("hv1")
        .tandem(&["volume", "rename", "v", "w"])
        .ok();
    assert_eq!(names(cluster.node("hv2")), vec!["w".to_string()]);
    wait_settled(&cluster, &["hv1", "hv2"], "w");
    // A restart keeps the new name.
    cluster.node_mut("hv2").stop();
    cluster.node_mut("hv2").start();
    assert_eq!(names(cluster.node("hv2")), vec!["w".to_string()]);
    wait_settled(&cluster, &["hv1", "hv2"], "w");
}

#[test]
fn a_single_node_volume_is_renamed_on_a_file_pool() {
    let node = TandemNode::start_new();
    node.tandem(&["volume", "create", "vm-1-disk-0", "--size", "8M"])
        .ok();
    let (ok, text) = node.qemu_io("vm-1-disk-0", &["write -P 0x42 1M 1M"]);
    assert!(ok, "{text}");
    node.tandem(&["volume", "create", "other", "--size", "4M"])
        .ok();
    let e = node
        .tandem(&["volume", "rename", "vm-1-disk-0", "other"])
        .failed();
    assert!(e.contains("already exists"), "{e}");
    // Refused while an NBD client (a VM) has it open for writing.
    let mut writer = Command::new("qemu-io")
        .args(["-f", "raw"])
        .arg(node.nbd_uri("vm-1-disk-0"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-io (package qemu-utils) must be installed");
    let mut stdin = writer.stdin.take().unwrap();
    writeln!(stdin, "write -P 0x43 2M 4k").unwrap();
    stdin.flush().unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || status(&node, "vm-1-disk-0")
            ["open_writers"]
            == 1),
        "the writer never showed up"
    );
    let e = node
        .tandem(&["volume", "rename", "vm-1-disk-0", "vm-2-disk-0"])
        .failed();
    assert!(
        e.contains("vm-1-disk-0 is in use on hv1") && e.contains("stop the VM first"),
        "{e}"
    );
    writeln!(stdin, "quit").unwrap();
    drop(stdin);
    writer.wait().unwrap();
    let e = node.tandem(&["volume", "rename", "nope", "x"]).failed();
    assert!(e.contains("does not exist"), "{e}");
    let out = node
        .tandem(&["volume", "rename", "vm-1-disk-0", "vm-2-disk-0"])
        .ok();
    assert!(out.stdout.contains("vm-2-disk-0"), "{}", out.stdout);
    assert_eq!(
        names(&node),
        vec!["other".to_string(), "vm-2-disk-0".to_string()]
    );
    assert_eq!(traces(&node, "vm-1-disk-0"), [false, false, false]);
    let (ok, text) = node.qemu_io("vm-2-disk-0", &["read -P 0x42 1M 1M", "read -P 0x43 2M 4k"]);
    assert!(ok, "{text}");
}

#[test]
fn a_failure_half_way_renames_the_done_nodes_back() {
    let cluster = LoopbackCluster::start(&[("hv1", false), ("hv2", false)]);
    let (hv1, hv2) = (cluster.node("hv1"), cluster.node("hv2"));
    hv1.tandem(&["volume", "create", "v", "--size", "8M", "--replicas", "2"])
        .ok();
    wait_settled(&cluster, &["hv1", "hv2"], "v");
    let (ok, text) = hv1.qemu_io("v", &["write -P 0x33 2M 1M", "flush"]);
    assert!(ok, "{text}");
    wait_settled(&cluster, &["hv1", "hv2"], "v");
    // A stray metadata directory under the new name on hv2 (left by hand): hv1 renames
    // first (config order), hv2's commit then fails, and hv1 is renamed back.
    std::fs::create_dir_all(hv2.definitions().join("w/meta")).unwrap();
    let e = hv1.tandem(&["volume", "rename", "v", "w"]).failed();
    assert!(e.contains("on node 'hv2'"), "{e}");
    assert!(e.contains("hv1: renamed back to 'v'"), "{e}");
    assert!(e.contains("hv2: failed, 'v' kept"), "{e}");
    assert!(!e.contains("on node 'hv2': on node"), "{e}");
    eprintln!("rollback error as the operator sees it: {e}");
    for node in [hv1, hv2] {
        assert_eq!(names(node), vec!["v".to_string()]);
        assert!(!node.definitions().join("w.json").exists());
        assert!(!node.images().join("w.img").exists());
    }
    assert_eq!(traces(hv1, "v"), [true, true, true]);
    // The replicas reopened under the old name, connected, with the data.
    wait_settled(&cluster, &["hv1", "hv2"], "v");
    let (ok, text) = hv2.qemu_io("v", &["read -P 0x33 2M 1M"]);
    assert!(ok, "{text}\n{}", cluster.logs());
    // Once the stray directory is gone the rename goes through.
    wait_settled(&cluster, &["hv1", "hv2"], "v");
    std::fs::remove_dir_all(hv2.definitions().join("w")).unwrap();
    hv1.tandem(&["volume", "rename", "v", "w"]).ok();
    wait_settled(&cluster, &["hv1", "hv2"], "w");
}

#[test]
fn a_create_racing_a_rename_to_the_same_name_exactly_one_wins() {
    let cluster = LoopbackCluster::start(&[("hv1", false), ("hv2", false)]);
    let (hv1, hv2) = (cluster.node("hv1"), cluster.node("hv2"));
    hv1.tandem(&["volume", "create", "v", "--size", "4M", "--replicas", "2"])
        .ok();
    wait_settled(&cluster, &["hv1", "hv2"], "v");
    for round in 0..3 {
        let target = format!("t{round}");
        let mut rename = hv1.tandem_command(&["volume", "rename", "v", &target]);
        let mut create = hv2.tandem_command(&[
            "volume",
            "create",
            &target,
            "--size",
            "4M",
            "--replicas",
            "2",
        ]);
        for c in [&mut rename, &mut create] {
            c.stdout(Stdio::null()).stderr(Stdio::piped());
        }
        // Alternate which command starts first.
        let (rename, create) = if round % 2 == 0 {
            let r = rename.spawn().unwrap();
            (r, create.spawn().unwrap())
        } else {
            let c = create.spawn().unwrap();
            (rename.spawn().unwrap(), c)
        };
        let renamed = rename.wait_with_output().unwrap();
        let created = create.wait_with_output().unwrap();
        assert!(
            renamed.status.success() != created.status.success(),
            "round {round}: rename {:?} ({}), create {:?} ({})",
            renamed.status,
            String::from_utf8_lossy(&renamed.stderr),
            created.status,
            String::from_utf8_lossy(&created.stderr)
        );
        let expected: Vec<String> = if renamed.status.success() {
            vec![target.clone()]
        } else {
            vec![target.clone(), "v".to_string()]
        };
        for node in [hv1, hv2] {
            let mut got = names(node);
            got.sort();
            assert_eq!(got, expected, "round {round}");
        }
        // Back to one volume named v for the next round.
        if renamed.status.success() {
            wait_settled(&cluster, &["hv1", "hv2"], &target);
            hv1.tandem(&["volume", "rename", &target, "v"]).ok();
        } else {
            hv1.tandem(&["volume", "delete", &target]).ok();
        }
        wait_settled(&cluster, &["hv1", "hv2"], "v");
    }
}
