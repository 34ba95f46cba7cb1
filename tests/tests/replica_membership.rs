//! Issue 19's acceptance, in network namespaces with real `tandemd`s and the `tandem` CLI:
//!
//! 1. A node joins a running cluster: its `[[nodes]]` entry is added to every host's
//!    config, the running daemons get SIGHUP, `tandem node list` shows every node
//!    reachable with one digest, and a volume is created with a replica on the new node,
//!    while a client keeps a replicated volume open and no daemon restarts. A malformed
//!    config is refused by `tandem node reload` with one line and the old one kept.
//! 2. A dead host is replaced: three data hosts and a witness; a volume on hv1 and hv2 is
//!    written by `tandem-check` through hv2; hv1 is killed for good; bad input is refused
//!    with one line and changes nothing; `tandem node evict hv1` puts the replica on hv3
//!    while the checker writes, and a closed volume on hv1 + hv3 (unknown to hv2, where the
//!    evict runs) on hv2. Then: no acknowledged write lost, hv2 and hv3 identical, hv3's
//!    allocation at most hv2's + 5%, and every node's definition agrees.
//! 3. The same with a daemon SIGKILLed at a random point of the evict and restarted: the
//!    evict runs on the witness, and the victim is the witness (the coordinator) or hv3
//!    (the new replica); the evict is run again until it succeeds. The seed is printed;
//!    `TANDEM_EVICT_SEED=N` replays one.
//!
//! Needs root (namespaces) and `cargo build --workspace --bins`.

use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use serde_json::Value;
use tandem_tests::checker::process::{verify, BackgroundWriter};
use tandem_tests::cluster::{skip_unless_root, Cluster, ClusterSpec};
use tandem_tests::replica_data::{content_hash, open, random_bytes, read_all, write_all};
use tandem_tests::volume_status::in_sync_with;
use tandem_tests::wait_until;

const MIB: u64 = 1 << 20;

fn wait_sync(cluster: &Cluster, host: &str, volume: &str, seconds: u32) {
    let out = cluster.tandem(
        host,
        &[
            "volume",
            "wait-sync",
            volume,
            "--timeout",
            &seconds.to_string(),
        ],
    );
    assert!(
        out.status.success(),
        "wait-sync {volume} on {host}: {}{}\n{}",
        out.stdout,
        out.stderr,
        cluster.logs()
    );
}

/// The data nodes of `volume` in `host`'s definition.
fn nodes_on(cluster: &Cluster, host: &str, volume: &str) -> Vec<String> {
    let out = cluster.tandem(host, &["volume", "show", volume, "--json"]);
    if !out.status.success() {
        return Vec::new();
    }
    out.json()["nodes"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|n| n.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// A refused command: exit 1, one line on stderr containing `expected`.
fn assert_refused(cluster: &Cluster, host: &str, args: &[&str], expected: &str) {
    let out = cluster.tandem(host, args);
    assert!(
        !out.status.success(),
        "{args:?} was accepted: {}",
        out.stdout
    );
    let line = out.stderr.trim_end();
    assert_eq!(line.lines().count(), 1, "{args:?}: not one line: {line}");
    assert!(line.contains(expected), "{args:?}: {line}");
    eprintln!("refused as expected: tandem {} -> {line}", args.join(" "));
}

fn node_list(cluster: &Cluster, host: &str) -> Vec<Value> {
    cluster
        .tandem(host, &["node", "list", "--json"])
        .ok()
        .json()
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[test]
fn a_node_joins_a_running_cluster_without_a_restart_and_takes_a_replica() {
    if skip_unless_root() {
        return;
    }
    let mut cluster = Cluster::new(ClusterSpec {
        hosts: 3,
        witness: true,
        start: false,
        rust_log: "info".into(),
        ..ClusterSpec::default()
    });
    let before = ["hv1", "hv2", "witness"];
    for host in before {
        cluster.set_node_list(host, &before);
        cluster.start(host);
    }
    cluster
        .tandem(
            "hv1",
            &[
                "volume", "create", "v1", "--size", "64M", "--nodes", "hv1,hv2",
            ],
        )
        .ok();
    wait_sync(&cluster, "hv1", "v1", 30);
    // A client keeps v1 open on hv1 for the whole test.
    let mut client = open(&cluster.nbd_socket("hv1"), "v1");
    let first = random_bytes(0x19, MIB as usize);
    write_all(&mut client, 0, &first);
    let pids: Vec<Option<u32>> = before
        .iter()
        .map(|h| cluster.host(h).daemon_pid())
        .collect();
    // hv3 is not known yet.
    assert_refused(
        &cluster,
        "hv1",
        &[
            "volume", "create", "v2", "--size", "64M", "--nodes", "hv1,hv3",
        ],
        "hv3",
    );

    // The join: config edited on every host, hv3 started, SIGHUP to the running daemons.
    let after = ["hv1", "hv2", "hv3", "witness"];
    for host in after {
        cluster.set_node_list(host, &after);
    }
    cluster.start("hv3");
    for host in before {
        cluster.sighup(host);
    }
    let mut last = Vec::new();
    let agreed = wait_until(Duration::from_secs(20), || {
        last = node_list(&cluster, "hv1");
        let digests: Vec<&Value> = last.iter().map(|n| &n["config_digest"]).collect();
        last.len() == 4
            && last.iter().all(|n| n["reachable"] == true)
            && digests.iter().all(|d| *d == digests[0])
    });
    assert!(
        agreed,
        "node list did not converge: {last:#?}\n{}",
        cluster.logs()
    );
    eprintln!(
        "node list on hv1:\n{}",
        cluster.tandem("hv1", &["node", "list"]).ok().stdout
    );

    cluster
        .tandem(
            "hv1",
            &[
                "volume", "create", "v2", "--size", "64M", "--nodes", "hv1,hv3",
            ],
        )
        .ok();
    wait_sync(&cluster, "hv1", "v2", 30);
    let s = cluster.wait_status("hv3", "v2", Duration::from_secs(30), |s| {
        in_sync_with(s, "hv1")
    });
    assert_eq!(s["disk_state"], "UpToDate", "{s:#}");

    // A malformed config is refused with one line; the running one stays in force.
    let good = std::fs::read_to_string(cluster.host("hv2").config()).unwrap();
    std::fs::write(
        cluster.host("hv2").config(),
        format!("{good}\n[[nodes]]\nname = 7\n"),
    )
    .unwrap();
    assert_refused(
        &cluster,
        "hv2",
        &["node", "reload"],
        "reload refused, running config kept",
    );
    std::fs::write(cluster.host("hv2").config(), &good).unwrap();
    assert_eq!(node_list(&cluster, "hv2").len(), 4);
    assert!(cluster.host("hv2").log().contains("config reload refused"));

    // Nothing restarted, nothing disconnected: the client still reads and writes v1.
    let second = random_bytes(0x20, MIB as usize);
    write_all(&mut client, MIB, &second);
    assert!(read_all(&mut client, 0, MIB as usize) == first);
    assert!(read_all(&mut client, MIB, MIB as usize) == second);
    let now: Vec<Option<u32>> = before
        .iter()
        .map(|h| cluster.host(h).daemon_pid())
        .collect();
    assert_eq!(pids, now);
    client.disconnect().unwrap();
}

/// Bytes the file system allocated for `path`.
fn allocated(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// Build the evict scene: hv1..hv3 and the witness, volume `v` on hv1 + hv2, Primary on
/// hv2 with `tandem-check` writing through it, then hv1 killed for good. With
/// `elsewhere`, also a closed volume `w` on hv1 + hv3, which hv2 holds no part of.
fn dead_hv1_scene(name: &str, elsewhere: bool) -> (Cluster, BackgroundWriter) {
    let mut cluster = Cluster::new(ClusterSpec {
        hosts: 3,
        witness: true,
        rust_log: "info".into(),
        ..ClusterSpec::default()
    });
    cluster
        .tandem(
            "hv2",
            &[
                "volume", "create", "v", "--size", "64M", "--nodes", "hv1,hv2",
            ],
        )
        .ok();
    wait_sync(&cluster, "hv2", "v", 30);
    if elsewhere {
        cluster
            .tandem(
                "hv3",
                &[
                    "volume", "create", "w", "--size", "16M", "--nodes", "hv1,hv3",
                ],
            )
            .ok();
        wait_sync(&cluster, "hv3", "w", 30);
    }
    cluster.tandem("hv2", &["volume", "promote", "v"]).ok();
    let log = cluster.root().join(format!("{name}.log"));
    // 16 MiB of 4 KiB blocks: most of the 64 MiB stays zeroes (thin on hv3).
    let writer = BackgroundWriter::spawn(
        &[cluster.nbd_socket("hv2")],
        "v",
        4096,
        &log,
        &[
            "--duration",
            "3600",
            "--seed",
            "19",
            "--flush-every",
            "32",
            "--fua-every",
            "17",
            "--reconnect-timeout",
            "120",
            "--io-timeout",
            "60",
        ],
    );
    assert!(
        writer.wait_for_more_acks(200, Duration::from_secs(60)),
        "no progress on hv2\n{}",
        cluster.logs()
    );
    cluster.kill("hv1");
    (cluster, writer)
}

/// After the evict: writes keep going, nothing acknowledged is lost, hv2 == hv3, hv3 thin,
/// and every live node's definition lists hv2 and hv3.
fn check_evicted(cluster: &Cluster, writer: BackgroundWriter, log: &std::path::Path) -> String {
    assert!(
        writer.wait_for_more_acks(100, Duration::from_secs(60)),
        "the checker stalled after the evict\n{}",
        cluster.logs()
    );
    let (code, summary) = writer.stop();
    assert_eq!(code, Some(0), "writer: {summary}");
    let agreed = wait_until(Duration::from_secs(30), || {
        ["hv2", "hv3", "witness"]
            .iter()
            .all(|h| nodes_on(cluster, h, "v") == ["hv2", "hv3"])
    });
    assert!(
        agreed,
        "definitions disagree: hv2 {:?} hv3 {:?} witness {:?}\n{}",
        nodes_on(cluster, "hv2", "v"),
        nodes_on(cluster, "hv3", "v"),
        nodes_on(cluster, "witness", "v"),
        cluster.logs()
    );
    wait_sync(cluster, "hv2", "v", 60);
    let socket = cluster.nbd_socket("hv2");
    let (code, report) = verify(log, &["--socket", socket.to_str().unwrap()]);
    assert_eq!(code, Some(0), "acknowledged writes lost: {report}");
    let (a, b) = (
        cluster.image_path("hv2", "v"),
        cluster.image_path("hv3", "v"),
    );
    assert_eq!(content_hash(&a), content_hash(&b), "hv2 and hv3 differ");
    let (source, target) = (allocated(&a), allocated(&b));
    assert!(
        target * 100 <= source * 105,
        "hv3 allocated {target} bytes, hv2 {source}"
    );
    format!(
        "{} writes acknowledged, {} lost; hv3 allocated {} KiB vs hv2 {} KiB of 64 MiB",
        report["writes_acknowledged"],
        report["lost"],
        target / 1024,
        source / 1024
    )
}

#[test]
fn evicting_a_dead_host_moves_its_replica_while_the_checker_writes() {
    if skip_unless_root() {
        return;
    }
    let started = Instant::now();
    let (cluster, writer) = dead_hv1_scene("evict", true);
    let log = writer.log.clone();
    // Bad input: one line each, nothing changes.
    assert_refused(
        &cluster,
        "hv2",
        &["volume", "replica", "add", "v", "--node", "hv9"],
        "node 'hv9' is not in",
    );
    assert_refused(
        &cluster,
        "hv2",
        &["volume", "replica", "add", "v", "--node", "hv2"],
        "already holds a replica",
    );
    assert_refused(
        &cluster,
        "witness",
        &["volume", "replica", "remove", "v", "--node", "hv2"],
        "would leave no UpToDate replica",
    );
    assert_refused(
        &cluster,
        "hv2",
        &["node", "evict", "hv2"],
        "cannot evict this node",
    );
    assert_eq!(nodes_on(&cluster, "hv2", "v"), ["hv1", "hv2"]);

    let out = cluster.tandem("hv2", &["node", "evict", "hv1"]);
    assert!(
        out.status.success(),
        "evict: {}\n{}",
        out.stderr,
        cluster.logs()
    );
    assert!(
        out.stdout.contains("v: moved from hv1 to hv3"),
        "{}",
        out.stdout
    );
    // While it waits, the command shows the volume being moved (a line on stderr when it
    // is not a terminal).
    assert!(
        out.stderr.contains("evicting hv1: v (1 of 2) to hv3"),
        "{}",
        out.stderr
    );
    // `w` is not on hv2: hv3, one of its members, moved it to hv2 for the evict.
    assert!(
        out.stdout.contains("w: moved from hv1 to hv2"),
        "{}",
        out.stdout
    );
    assert_eq!(nodes_on(&cluster, "hv3", "w"), ["hv2", "hv3"]);
    wait_sync(&cluster, "hv3", "w", 60);
    assert_eq!(
        content_hash(&cluster.image_path("hv2", "w")),
        content_hash(&cluster.image_path("hv3", "w")),
        "w differs between hv2 and hv3"
    );
    let summary = check_evicted(&cluster, writer, &log);
    eprintln!(
        "evict of a dead hv1 to hv3: {summary}; {:?}",
        started.elapsed()
    );
}

#[test]
fn evict_survives_a_daemon_killed_at_a_random_point() {
    if skip_unless_root() {
        return;
    }
    let seed: u64 = std::env::var("TANDEM_EVICT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    // The evict runs on the witness, so killing the coordinator is one of the cases. hv2
    // is not a victim: with hv1 dead for good, a crash of the last UpToDate replica's
    // daemon leaves it Consistent until a peer confirms it (DRBD semantics; the engine
    // has no `primary --force` yet), whatever the evict does.
    let victim = ["witness", "hv3"][(seed % 2) as usize];
    let delay = Duration::from_millis((seed / 2) % 1500);
    eprintln!("seed {seed} (TANDEM_EVICT_SEED={seed} replays it): SIGKILL {victim} {delay:?} into the evict");
    let (mut cluster, writer) = dead_hv1_scene("evict-kill", false);
    let log = writer.log.clone();
    let evict = {
        let host = cluster.host("witness");
        host.netns()
            .command(tandem_tests::bin("tandem"))
            .arg("--config")
            .arg(host.config())
            .args(["node", "evict", "hv1"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    std::thread::sleep(delay);
    cluster.kill(victim);
    cluster.start(victim);
    let first = evict.wait_with_output().unwrap();
    eprintln!(
        "first evict: {} {}",
        first.status,
        String::from_utf8_lossy(&first.stderr).trim()
    );
    // Run the evict again until it succeeds (it resumes; a finished one is a no-op).
    let mut last = String::new();
    let done = wait_until(Duration::from_secs(180), || {
        let out = cluster.tandem("witness", &["node", "evict", "hv1"]);
        last = format!("{}{}", out.stdout, out.stderr);
        out.status.success() && nodes_on(&cluster, "hv2", "v") == ["hv2", "hv3"]
    });
    assert!(
        done,
        "evict never completed (seed {seed}): {last}\n{}",
        cluster.logs()
    );
    let summary = check_evicted(&cluster, writer, &log);
    eprintln!("seed {seed}: {victim} killed {delay:?} into the evict; {summary}");
}
