//! The cluster fixture itself (issue 5): hosts in network namespaces with separate
//! management and replication links, a daemon per host, link cuts that affect one host and
//! one link only, a full partition, a pool that really runs out of space, restart, and
//! cleanup of everything on drop. Needs root (`TANDEM_SKIP_NETNS_TESTS=1` skips).

use std::time::Instant;

use tandem_tests::cluster::{skip_unless_root, Cluster, ClusterSpec, Link};
use tandem_tests::netns;

const MIB: u64 = 1 << 20;

fn namespaces() -> String {
    netns::ip(&["netns", "list"]).unwrap()
}

#[test]
fn hosts_links_faults_and_cleanup() {
    if skip_unless_root() {
        return;
    }
    let started = Instant::now();
    let mut cluster = Cluster::new(ClusterSpec::default());
    let names: Vec<String> = cluster
        .hosts()
        .iter()
        .map(|h| h.netns().name().to_string())
        .collect();
    assert_eq!(cluster.data_hosts(), ["hv1", "hv2"]);
    assert!(cluster.host("witness").diskless);
    let root = cluster.root().to_path_buf();
    let listed = namespaces();
    for name in &names {
        assert!(listed.contains(name.as_str()), "{name} missing in {listed}");
    }
    // The secret is private; every config lists all three nodes; the witness is diskless.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(cluster.secret_file())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let config = std::fs::read_to_string(cluster.host("hv2").config()).unwrap();
    assert!(config.contains("node = \"hv2\""), "{config}");
    assert_eq!(config.matches("[[nodes]]").count(), 3, "{config}");
    assert!(config.contains("diskless = true"), "{config}");

    // Each daemon answers inside its namespace.
    for host in ["hv1", "hv2", "witness"] {
        let info = cluster
            .tandem(host, &["node", "info", "--json"])
            .ok()
            .json();
        assert_eq!(info["name"], host, "{info}");
    }
    // The witness runs without any [[pools]] entry: it lists no pool and refuses a data
    // replica, naming itself.
    let config = std::fs::read_to_string(cluster.host("witness").config()).unwrap();
    assert!(!config.contains("[[pools]]"), "{config}");
    let info = cluster
        .tandem("witness", &["node", "info", "--json"])
        .ok()
        .json();
    assert_eq!(info["pools"], serde_json::json!([]), "{info}");
    let pools = cluster
        .tandem("witness", &["pool", "list", "--json"])
        .ok()
        .json();
    assert_eq!(pools, serde_json::json!([]), "{pools}");
    let refused = cluster
        .tandem(
            "witness",
            &[
                "volume",
                "create",
                "w1",
                "--size",
                "16M",
                "--nodes",
                "hv1,witness",
            ],
        )
        .failed();
    assert!(
        refused.contains("node 'witness' is a diskless tiebreaker and cannot hold a replica"),
        "{refused}"
    );

    // Full mesh on both links.
    for link in [Link::Management, Link::Replication] {
        assert!(cluster.can_connect("hv1", "hv2", link));
        assert!(cluster.can_connect("hv2", "witness", link));
    }
    // Cutting hv2's replication link leaves its management link and the others alone.
    cluster.cut_replication("hv2");
    assert!(!cluster.can_connect("hv1", "hv2", Link::Replication));
    assert!(!cluster.can_connect("hv2", "witness", Link::Replication));
    assert!(cluster.can_connect("hv1", "hv2", Link::Management));
    assert!(cluster.can_connect("hv1", "witness", Link::Replication));
    cluster.heal_replication("hv2");
    assert!(cluster.can_connect("hv1", "hv2", Link::Replication));
    // Link counters see the probes' traffic on the replication link.
    let (rx, tx) = cluster.link_bytes("hv2", Link::Replication);
    assert!(rx > 0 && tx > 0, "rx {rx} tx {tx}");
    // A partition isolates hv1 completely; the others still reach each other.
    cluster.partition("hv1");
    assert!(!cluster.can_connect("hv2", "hv1", Link::Management));
    assert!(!cluster.can_connect("hv2", "hv1", Link::Replication));
    assert!(cluster.can_connect("hv2", "witness", Link::Management));
    cluster.heal("hv1");
    assert!(cluster.can_connect("hv2", "hv1", Link::Management));
    assert!(cluster.can_connect("hv2", "hv1", Link::Replication));

    // A volume survives kill + restart (local volume lifecycle; replication not needed).
    cluster
        .tandem("hv1", &["volume", "create", "v1", "--size", "16M"])
        .ok();
    assert_eq!(
        std::fs::metadata(cluster.image_path("hv1", "v1"))
            .unwrap()
            .len(),
        16 * MIB
    );
    cluster.kill("hv1");
    assert!(!cluster.host("hv1").running());
    cluster.start("hv1");
    let listed = cluster
        .tandem("hv1", &["volume", "list", "--json"])
        .ok()
        .json();
    assert_eq!(listed[0]["name"], "v1", "{listed}");
    cluster.restart("hv2");
    assert!(cluster.stop("hv2").success(), "SIGTERM is a clean stop");

    drop(cluster);
    let listed = namespaces();
    for name in &names {
        assert!(
            !listed.contains(name.as_str()),
            "{name} left behind: {listed}"
        );
    }
    assert!(!root.exists(), "{} left behind", root.display());
    eprintln!("cluster fixture test took {:?}", started.elapsed());
}

#[test]
fn fill_pool_gives_real_enospc_and_is_undone() {
    if skip_unless_root() {
        return;
    }
    let cluster = Cluster::new(ClusterSpec {
        hosts: 1,
        witness: false,
        pool_size: Some(32 * MIB),
        start: false,
        ..ClusterSpec::default()
    });
    let pool = cluster.host("hv1").pool_dir();
    let written = cluster.fill_pool("hv1");
    assert!(written > 30 * MIB && written <= 32 * MIB, "wrote {written}");
    let err = std::fs::write(pool.join("more"), vec![1u8; 8192]).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    cluster.unfill_pool("hv1");
    std::fs::write(pool.join("more"), vec![1u8; 8192]).unwrap();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let point = pool.to_str().unwrap().to_string();
    assert!(mounts.contains(&point));
    drop(cluster);
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&point), "pool tmpfs left mounted");
}

#[test]
fn sweeper_removes_namespaces_of_dead_runs_only() {
    if skip_unless_root() {
        return;
    }
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let stale = format!("tdm-{dead}-0-hv1");
    netns::ip(&["netns", "add", &stale]).unwrap();
    let ours = netns::Netns::add(&format!("{}-probe", netns::unique_tag())).unwrap();
    // Another test process's sweeper may get there first; either way it must be gone.
    let removed = netns::sweep_stale();
    let listed = namespaces();
    assert!(
        removed.contains(&stale) || !listed.contains(&stale),
        "{removed:?}"
    );
    assert!(!listed.contains(&stale));
    assert!(
        listed.contains(ours.name()),
        "a live run's namespace must stay"
    );
}

#[test]
fn everything_is_removed_after_a_panic() {
    if skip_unless_root() {
        return;
    }
    let mut seen = (Vec::new(), std::path::PathBuf::new());
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let cluster = Cluster::new(ClusterSpec {
            hosts: 2,
            witness: false,
            pool_size: Some(8 * MIB),
            ..ClusterSpec::default()
        });
        seen = (
            cluster
                .hosts()
                .iter()
                .map(|h| h.netns().name().to_string())
                .collect(),
            cluster.root().to_path_buf(),
        );
        panic!("deliberate failure inside a test using the cluster");
    }));
    assert!(result.is_err());
    let (names, root) = seen;
    assert_eq!(names.len(), 2);
    let listed = namespaces();
    for name in &names {
        assert!(
            !listed.contains(name.as_str()),
            "{name} left behind after a panic"
        );
    }
    assert!(
        !root.exists(),
        "{} left behind after a panic",
        root.display()
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(root.to_str().unwrap()),
        "pool mount left behind"
    );
    // No process still has the cluster's directory on its command line (its daemons).
    let needle = root.to_str().unwrap().as_bytes().to_vec();
    let survivors: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| std::fs::read(entry.path().join("cmdline")).ok())
        .filter(|cmdline| {
            cmdline
                .windows(needle.len())
                .any(|w| w == needle.as_slice())
        })
        .map(|cmdline| String::from_utf8_lossy(&cmdline).replace('\0', " "))
        .collect();
    assert!(survivors.is_empty(), "daemons left running: {survivors:?}");
}
