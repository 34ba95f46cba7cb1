//! Issue 3 lifecycle of replicated volumes, through the real `tandem` CLI against real
//! `tandemd`s on loopback (each with its own control and replication port): create on two
//! nodes (plus a diskless tiebreaker), status, promote/demote, online resize, delete
//! everywhere, rollback of failed creates, concurrent creates of one name. Needs
//! `cargo build --workspace --bins` first.

use std::fs;
use std::time::Duration;

use serde_json::Value;
use tandem_tests::loopback_cluster::LoopbackCluster;
use tandem_tests::{wait_until, TandemNode};

const MIB: u64 = 1 << 20;

fn status(node: &TandemNode, name: &str) -> Value {
    node.tandem(&["volume", "status", name, "--json"])
        .ok()
        .json()
}

fn peer<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["peers"]
        .as_array()
        .expect("peers array")
        .iter()
        .find(|p| p["node"] == name)
        .unwrap_or_else(|| panic!("no peer {name} in {status}"))
}

/// Wait until `node` sees its replica UpToDate and the data peer `other` Connected and
/// UpToDate.
fn wait_connected(cluster: &LoopbackCluster, node: &str, other: &str, volume: &str) -> Value {
    let mut last = Value::Null;
    let ok = wait_until(Duration::from_secs(30), || {
        last = status(cluster.node(node), volume);
        last["disk_state"] == "UpToDate"
            && peer(&last, other)["connection"] == "Connected"
            && peer(&last, other)["disk_state"] == "UpToDate"
    });
    assert!(
        ok,
        "{node} never saw {other} Connected/UpToDate: {last:#}\n{}",
        cluster.logs()
    );
    last
}

fn image_len(node: &TandemNode, volume: &str) -> Option<u64> {
    fs::metadata(node.images().join(format!("{volume}.img")))
        .ok()
        .map(|m| m.len())
}

fn has_definition(node: &TandemNode, volume: &str) -> bool {
    node.definitions().join(format!("{volume}.json")).exists()
}

#[test]
fn two_replicas_and_a_tiebreaker_live_and_die_together() {
    let cluster = LoopbackCluster::start(&[("hv1", false), ("hv2", false), ("witness", true)]);
    let (hv1, hv2, witness) = (
        cluster.node("hv1"),
        cluster.node("hv2"),
        cluster.node("witness"),
    );

    let created = hv1
        .tandem(&[
            "volume",
            "create",
            "vm-100-disk-0",
            "--size",
            "64M",
            "--replicas",
            "2",
            "--json",
        ])
        .ok()
        .json();
    assert_eq!(created["name"], "vm-100-disk-0");
    assert_eq!(created["nodes"], serde_json::json!(["hv1", "hv2"]));
    assert_eq!(created["tiebreakers"], serde_json::json!(["witness"]));
    assert_eq!(created["options"]["protocol"], "C");
    // Both data nodes have definition and storage; the witness only the definition.
    for node in [hv1, hv2] {
        assert!(has_definition(node, "vm-100-disk-0"));
        assert_eq!(image_len(node, "vm-100-disk-0"), Some(64 * MIB));
    }
    assert!(has_definition(witness, "vm-100-disk-0"));
    assert_eq!(image_len(witness, "vm-100-disk-0"), None);
    let shown = witness
        .tandem(&["volume", "show", "vm-100-disk-0", "--json"])
        .ok()
        .json();
    assert_eq!(shown["diskless"], true);

    // Day0 generation shared: both UpToDate and connected without any sync.
    let s1 = wait_connected(&cluster, "hv1", "hv2", "vm-100-disk-0");
    let s2 = wait_connected(&cluster, "hv2", "hv1", "vm-100-disk-0");
    assert_eq!(s1["role"], "Secondary");
    assert_eq!(s1["quorum"], true, "{s1:#}");
    assert_eq!(peer(&s1, "hv2")["replication"], "Established", "{s1:#}");
    assert_eq!(peer(&s1, "hv2")["out_of_sync_bytes"], 0);
    assert_eq!(s1["current_uuid"], s2["current_uuid"]);
    assert_eq!(s1["open_writers"], 0);
    assert_eq!(s1["promoted_explicitly"], false);
    // The human table names the peers.
    let table = hv1.tandem(&["volume", "status"]).ok().stdout;
    assert!(table.contains("vm-100-disk-0 role:Secondary"), "{table}");
    assert!(table.contains("hv2 connection:Connected"), "{table}");
    assert!(table.contains("witness connection:"), "{table}");
    hv1.tandem(&["volume", "wait-sync", "vm-100-disk-0", "--timeout", "10"])
        .ok();

    // Promote explicitly on hv1; hv2 is then refused with the engine's message.
    let promoted = hv1
        .tandem(&["volume", "promote", "vm-100-disk-0", "--json"])
        .ok()
        .json();
    assert_eq!(promoted["role"], "Primary");
    assert_eq!(promoted["promoted_explicitly"], true);
    let refused = hv2.tandem(&["volume", "promote", "vm-100-disk-0"]).failed();
    assert!(
        refused.contains("Primary on hv1"),
        "expected the engine's refusal: {refused}"
    );
    // Delete is refused while Primary anywhere.
    let e = hv2.tandem(&["volume", "delete", "vm-100-disk-0"]).failed();
    assert!(e.contains("is Primary on node 'hv1'"), "{e}");
    let demoted = hv1
        .tandem(&["volume", "demote", "vm-100-disk-0", "--json"])
        .ok()
        .json();
    assert_eq!(demoted["role"], "Secondary");
    // hv2 may now be promoted (after it saw the demotion), and demoted again.
    let ok = wait_until(Duration::from_secs(15), || {
        hv2.tandem(&["volume", "promote", "vm-100-disk-0"])
            .status
            .success()
    });
    assert!(
        ok,
        "hv2 could not be promoted after hv1 demoted\n{}",
        cluster.logs()
    );
    hv2.tandem(&["volume", "demote", "vm-100-disk-0"]).ok();

    // Online resize grows both replicas (and the tiebreaker's definition).
    let resized = hv2
        .tandem(&[
            "volume",
            "resize",
            "vm-100-disk-0",
            "--size",
            "96M",
            "--json",
        ])
        .ok()
        .json();
    assert_eq!(resized["size_bytes"], 96 * MIB);
    for node in [hv1, hv2] {
        assert_eq!(image_len(node, "vm-100-disk-0"), Some(96 * MIB));
    }
    let ok = wait_until(Duration::from_secs(10), || {
        status(hv1, "vm-100-disk-0")["size_bytes"] == 96 * MIB
    });
    assert!(ok, "{:#}", status(hv1, "vm-100-disk-0"));
    // The grown area is in sync on both sides (it reads zeros everywhere): nothing to wait for.
    for node in [hv1, hv2] {
        let st = status(node, "vm-100-disk-0");
        assert_eq!(st["disk_state"], "UpToDate", "{st:#}");
        assert!(
            st["peers"]
                .as_array()
                .unwrap()
                .iter()
                .all(|p| p["out_of_sync_bytes"].as_u64().unwrap_or(0) == 0),
            "{st:#}"
        );
    }
    hv1.tandem(&["volume", "wait-sync", "vm-100-disk-0", "--timeout", "10"])
        .ok();
    let on_witness = witness
        .tandem(&["volume", "show", "vm-100-disk-0", "--json"])
        .ok()
        .json();
    assert_eq!(on_witness["size_bytes"], 96 * MIB);

    // Options change on every node.
    hv1.tandem(&[
        "volume",
        "set",
        "vm-100-disk-0",
        "--after-split-brain",
        "discard-zero-changes",
        "--resync-rate",
        "20M",
    ])
    .ok();
    for node in [hv1, hv2, witness] {
        let shown = node
            .tandem(&["volume", "show", "vm-100-disk-0", "--json"])
            .ok()
            .json();
        assert_eq!(
            shown["options"]["after_split_brain"], "discard-zero-changes",
            "{shown}"
        );
        assert_eq!(shown["options"]["resync_rate_bytes"], 20 * MIB);
    }
    // The resync controller's keys (issue 19): set on every node, shown; a floor above the
    // cap is refused with one line and changes nothing anywhere.
    hv1.tandem(&[
        "volume",
        "set",
        "vm-100-disk-0",
        "--resync-min-rate",
        "5M",
        "--resync-max-rate",
        "40M",
        "--resync-plan-ahead",
        "3s",
    ])
    .ok();
    let e = hv2
        .tandem(&["volume", "set", "vm-100-disk-0", "--resync-min-rate", "50M"])
        .failed();
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(
        e.contains("--resync-min-rate: 50 MiB/s is above the max rate 40 MiB/s"),
        "{e}"
    );
    for node in [hv1, hv2, witness] {
        let options = &node
            .tandem(&["volume", "show", "vm-100-disk-0", "--json"])
            .ok()
            .json()["options"];
        assert_eq!(options["resync_rate_bytes"], 40 * MIB, "{options}");
        assert_eq!(options["resync_min_rate_bytes"], 5 * MIB, "{options}");
        assert_eq!(options["resync_plan_ahead_ms"], 3000, "{options}");
    }
    let shown = hv2.tandem(&["volume", "show", "vm-100-disk-0"]).ok().stdout;
    assert!(
        shown.contains("resync:   max 40 MiB/s, min 5 MiB/s, plan-ahead 3s"),
        "{shown}"
    );

    // The dual-primary gate opens and closes; it needs protocol C and every replica
    // UpToDate (right after the resize above, hv2 may still be Inconsistent).
    let ok = wait_until(Duration::from_secs(30), || {
        [hv1, hv2]
            .iter()
            .all(|n| status(n, "vm-100-disk-0")["disk_state"] == "UpToDate")
    });
    assert!(ok, "{:#}", status(hv2, "vm-100-disk-0"));
    let gate = hv1
        .tandem(&[
            "volume",
            "allow-two-primaries",
            "vm-100-disk-0",
            "on",
            "--json",
        ])
        .ok()
        .json();
    assert_eq!(gate["allow_two_primaries"], true);
    hv1.tandem(&["volume", "allow-two-primaries", "vm-100-disk-0", "off"])
        .ok();
    assert_eq!(status(hv1, "vm-100-disk-0")["allow_two_primaries"], false);
    hv1.tandem(&["volume", "set", "vm-100-disk-0", "--protocol", "A"])
        .ok();
    let e = hv1
        .tandem(&["volume", "allow-two-primaries", "vm-100-disk-0", "on"])
        .failed();
    assert!(e.contains("protocol C"), "{e}");
    hv1.tandem(&["volume", "set", "vm-100-disk-0", "--protocol", "C"])
        .ok();
    let e = hv1
        .tandem(&["volume", "set", "vm-100-disk-0", "--protocol", "D"])
        .failed();
    assert!(e.contains("--protocol"), "{e}");
    // Nothing to resolve without a split brain; the engine says so.
    let e = hv1
        .tandem(&["volume", "resolve", "vm-100-disk-0", "--discard-local"])
        .failed();
    assert!(e.contains("not in split brain"), "{e}");

    // Delete removes it everywhere.
    hv2.tandem(&["volume", "delete", "vm-100-disk-0"]).ok();
    for node in [hv1, hv2, witness] {
        assert!(!has_definition(node, "vm-100-disk-0"));
        assert_eq!(image_len(node, "vm-100-disk-0"), None);
        assert!(!node.definitions().join("vm-100-disk-0").exists());
        let listed = node.tandem(&["volume", "list", "--json"]).ok().json();
        assert_eq!(listed, serde_json::json!([]));
    }
}

#[test]
fn a_failed_create_leaves_nothing_on_any_node() {
    let cluster = LoopbackCluster::start(&[("hv1", false), ("hv2", false)]);
    let (hv1, hv2) = (cluster.node("hv1"), cluster.node("hv2"));

    // Refused during validation on hv2 (the name exists there): nothing allocated on hv1.
    hv2.tandem(&["volume", "create", "clash", "--size", "4M"])
        .ok();
    // An unreplicated volume: always Primary, no peers; promote is a no-op.
    let single = hv2
        .tandem(&["volume", "promote", "clash", "--json"])
        .ok()
        .json();
    assert_eq!(single["role"], "Primary");
    assert_eq!(single["disk_state"], "UpToDate");
    assert_eq!(single["peers"], serde_json::json!([]));
    let e = hv1
        .tandem(&[
            "volume",
            "create",
            "clash",
            "--size",
            "4M",
            "--replicas",
            "2",
        ])
        .failed();
    assert!(e.contains("already exists on node 'hv2'"), "{e}");
    assert!(!has_definition(hv1, "clash"));
    assert_eq!(image_len(hv1, "clash"), None);

    // Failing while allocating on hv2 (its pool directory replaced by a file): hv1's
    // replica, already created, is removed again.
    fs::remove_dir_all(hv2.images()).unwrap();
    fs::write(hv2.images(), b"not a directory").unwrap();
    let e = hv1
        .tandem(&["volume", "create", "v2", "--size", "4M", "--replicas", "2"])
        .failed();
    assert!(e.contains("nothing was kept"), "{e}");
    assert!(e.contains("hv2"), "{e}");
    assert!(!has_definition(hv1, "v2"), "{}", cluster.logs());
    assert_eq!(image_len(hv1, "v2"), None);
    assert!(
        !hv1.definitions().join("v2").exists(),
        "metadata left behind"
    );
    // The name is free again everywhere: with hv2's pool back, the create succeeds.
    fs::remove_file(hv2.images()).unwrap();
    fs::create_dir(hv2.images()).unwrap();
    hv1.tandem(&["volume", "create", "v2", "--size", "4M", "--replicas", "2"])
        .ok();
    assert!(has_definition(hv2, "v2"));

    // Validation errors name the problem before anything happens.
    let e = hv1
        .tandem(&["volume", "create", "v3", "--size", "4M", "--replicas", "3"])
        .failed();
    assert!(
        e.contains("--replicas 3 but the cluster has 2 data node(s)"),
        "{e}"
    );
    let e = hv1
        .tandem(&[
            "volume", "create", "v3", "--size", "4M", "--nodes", "hv1,hv9",
        ])
        .failed();
    assert!(e.contains("node 'hv9' is not in the config"), "{e}");
}

#[test]
fn concurrent_creates_of_one_name_on_two_nodes_exactly_one_wins() {
    let cluster = LoopbackCluster::start(&[("hv1", false), ("hv2", false)]);
    for round in 0..3 {
        let name = format!("race{round}");
        let args = ["volume", "create", &name, "--size", "4M", "--replicas", "2"];
        let spawn = |node: &str| {
            cluster
                .node(node)
                .tandem_command(&args)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        };
        let (a, b) = (spawn("hv1"), spawn("hv2"));
        let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
        let wins = [a.status.success(), b.status.success()];
        assert_eq!(
            wins.iter().filter(|w| **w).count(),
            1,
            "round {round}: hv1 {:?} / hv2 {:?}\n{}",
            String::from_utf8_lossy(&a.stderr),
            String::from_utf8_lossy(&b.stderr),
            cluster.logs()
        );
        for node in ["hv1", "hv2"] {
            let n = cluster.node(node);
            assert!(has_definition(n, &name), "{node} lacks {name}");
            assert_eq!(image_len(n, &name), Some(4 * MIB));
        }
    }
}

#[test]
fn delete_with_a_node_down_is_refused_unless_forced() {
    let mut cluster = LoopbackCluster::start(&[("hv1", false), ("hv2", false)]);
    cluster
        .node("hv1")
        .tandem(&["volume", "create", "v", "--size", "4M", "--replicas", "2"])
        .ok();
    cluster.node_mut("hv2").stop();
    let e = cluster
        .node("hv1")
        .tandem(&["volume", "delete", "v"])
        .failed();
    assert!(e.contains("node 'hv2'") && e.contains("unreachable"), "{e}");
    assert!(e.contains("--force"), "{e}");
    assert!(has_definition(cluster.node("hv1"), "v"));
    let out = cluster
        .node("hv1")
        .tandem(&["volume", "delete", "v", "--force", "--json"])
        .ok()
        .json();
    assert_eq!(out["left_on"], serde_json::json!(["hv2"]));
    assert!(!has_definition(cluster.node("hv1"), "v"));
    // hv2 still holds its replica; deleting it there finds hv1's gone and removes it.
    cluster.node_mut("hv2").start();
    assert!(has_definition(cluster.node("hv2"), "v"));
    cluster.node("hv2").tandem(&["volume", "delete", "v"]).ok();
    assert!(!has_definition(cluster.node("hv2"), "v"));
    assert_eq!(image_len(cluster.node("hv2"), "v"), None);
}

#[test]
fn a_cluster_without_a_private_secret_refuses_to_start() {
    let mut cluster = LoopbackCluster::new(&[("hv1", false), ("hv2", false)]);
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(cluster.secret_file(), fs::Permissions::from_mode(0o644)).unwrap();
    let node = cluster.node_mut("hv1");
    let out = std::process::Command::new(tandem_tests::bin("tandemd"))
        .arg("--config")
        .arg(node.config())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("secret_file"), "{stderr}");
    assert!(stderr.contains("chmod 600"), "{stderr}");
}

#[test]
fn replicas_reconnect_up_to_date_after_daemon_restarts() {
    let mut cluster = LoopbackCluster::start(&[("hv1", false), ("hv2", false)]);
    cluster
        .node("hv1")
        .tandem(&["volume", "create", "v", "--size", "8M", "--replicas", "2"])
        .ok();
    let before = wait_connected(&cluster, "hv1", "hv2", "v");
    // SIGTERM closes the replicas cleanly; after the restart they reconnect with no resync.
    let status = cluster.node_mut("hv2").stop();
    assert!(status.success(), "tandemd exit status {status}");
    assert!(cluster.node("hv2").log().contains("tandemd stopped"));
    let s = status_of(&cluster, "hv1", "v");
    assert_ne!(peer(&s, "hv2")["connection"], "Connected", "{s:#}");
    cluster.node_mut("hv2").start();
    let after = wait_connected(&cluster, "hv2", "hv1", "v");
    assert_eq!(peer(&after, "hv1")["out_of_sync_bytes"], 0, "{after:#}");
    assert_eq!(before["current_uuid"], after["current_uuid"]);
    // Both restart.
    cluster.node_mut("hv1").stop();
    cluster.node_mut("hv2").stop();
    cluster.node_mut("hv1").start();
    cluster.node_mut("hv2").start();
    wait_connected(&cluster, "hv1", "hv2", "v");
    wait_connected(&cluster, "hv2", "hv1", "v");
}

fn status_of(cluster: &LoopbackCluster, node: &str, volume: &str) -> Value {
    let mut last = Value::Null;
    // The peer's loss is noticed within the link's keepalive; poll briefly.
    wait_until(Duration::from_secs(15), || {
        last = status(cluster.node(node), volume);
        last["peers"][0]["connection"] != "Connected"
    });
    last
}
