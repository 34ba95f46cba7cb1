//! Faults on one host without replication (issue 5), through the real NBD server of a real
//! `tandemd` in a namespace, with `tandem-check` as the workload:
//!
//! * **Daemon crash.** `tandemd` is SIGKILLed three times under load and restarted; the
//!   writer reconnects. Guarantee without replication: every *acknowledged* write survives
//!   a daemon crash, flushed or not, because an acknowledged write has reached the
//!   kernel (page cache or disk) and a dead process does not take the page cache with it.
//!   Only a host crash (power loss, kernel panic) can lose acknowledged writes that were
//!   not yet made durable by FUA or a FLUSH; `tandem-check verify --durable-only` checks
//!   that weaker rule, and replication under protocol C is what covers host loss.
//! * **ENOSPC.** The pool's file system (a tmpfs) is filled; writes to unallocated blocks
//!   get `ENOSPC` over NBD, the daemon keeps running and serving, allocated blocks stay
//!   writable, writes succeed again once space is freed, and nothing acknowledged is lost.
//!
//! Needs root and `tandemd`'s NBD server (issue 4).

use std::time::{Duration, Instant};

use tandem_tests::checker::process::{verify, BackgroundWriter};
use tandem_tests::cluster::{skip_unless_root, Cluster, ClusterSpec};
use tandem_tests::wait_until;

const MIB: u64 = 1 << 20;

fn one_host(pool_size: Option<u64>) -> Cluster {
    Cluster::new(ClusterSpec {
        hosts: 1,
        witness: false,
        pool_size,
        ..ClusterSpec::default()
    })
}

fn wait_for_nbd(cluster: &Cluster) {
    let socket = cluster.nbd_socket("hv1");
    assert!(
        wait_until(Duration::from_secs(10), || {
            std::os::unix::net::UnixStream::connect(&socket).is_ok()
        }),
        "tandemd serves no NBD socket at {}:\n{}",
        socket.display(),
        cluster.logs()
    );
}

#[test]
fn daemon_sigkill_under_load_loses_no_acknowledged_write() {
    if skip_unless_root() {
        return;
    }
    let started = Instant::now();
    let mut cluster = one_host(None);
    cluster
        .tandem("hv1", &["volume", "create", "v1", "--size", "64M"])
        .ok();
    wait_for_nbd(&cluster);
    let log = cluster.root().join("v1.log");
    let socket = cluster.nbd_socket("hv1");
    let writer = BackgroundWriter::spawn(
        std::slice::from_ref(&socket),
        "v1",
        4096,
        &log,
        &[
            "--duration",
            "120",
            "--seed",
            "5",
            "--flush-every",
            "64",
            "--fua-every",
            "50",
            "--reconnect-timeout",
            "30",
        ],
    );
    assert!(
        writer.wait_for_more_acks(500, Duration::from_secs(20)),
        "no progress:\n{}",
        cluster.logs()
    );
    for round in 0..5 {
        cluster.kill("hv1");
        std::thread::sleep(Duration::from_millis(100 + 100 * round));
        cluster.start("hv1");
        assert!(
            writer.wait_for_more_acks(1000, Duration::from_secs(30)),
            "writer made no progress after restart {round}:\n{}",
            cluster.logs()
        );
    }
    let (code, summary) = writer.stop();
    assert_eq!(code, Some(0), "{summary}");
    assert!(summary["reconnects"].as_u64().unwrap() >= 5, "{summary}");
    let (code, report) = verify(
        &log,
        &["--socket", socket.to_str().unwrap(), "--export", "v1"],
    );
    eprintln!("writer: {summary}\nverify: {report}");
    assert_eq!(report["lost"], 0, "{report}");
    assert_eq!(report["stale"], 0, "{report}");
    assert_eq!(report["garbage"], 0, "{report}");
    assert_eq!(code, Some(0), "{report}");
    // The backing file says the same.
    cluster.stop("hv1");
    let image = cluster.image_path("hv1", "v1");
    let (code, report) = verify(&log, &["--image", image.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{report}");
    eprintln!("daemon SIGKILL test took {:?}", started.elapsed());
}

#[test]
fn full_pool_fails_writes_with_enospc_and_loses_nothing() {
    if skip_unless_root() {
        return;
    }
    let started = Instant::now();
    let cluster = one_host(Some(48 * MIB));
    cluster
        .tandem("hv1", &["volume", "create", "v1", "--size", "32M"])
        .ok();
    wait_for_nbd(&cluster);
    let log = cluster.root().join("v1.log");
    let socket = cluster.nbd_socket("hv1");
    // 8192 blocks = the whole 32 MiB volume, so new writes keep hitting unallocated blocks.
    let writer = BackgroundWriter::spawn(
        std::slice::from_ref(&socket),
        "v1",
        8192,
        &log,
        &["--duration", "120", "--seed", "9", "--flush-every", "32"],
    );
    assert!(
        writer.wait_for_more_acks(300, Duration::from_secs(20)),
        "no progress:\n{}",
        cluster.logs()
    );
    let filled = cluster.fill_pool("hv1");
    eprintln!("filled the pool with {filled} bytes");
    assert!(
        wait_until(Duration::from_secs(20), || writer.count("E ") >= 50),
        "no failed writes on a full pool:\n{}",
        cluster.logs()
    );
    let failures = std::fs::read_to_string(&log).unwrap();
    let errnos: Vec<&str> = failures
        .lines()
        .filter(|l| l.starts_with("E "))
        .map(|l| l.rsplit(' ').next().unwrap())
        .collect();
    assert!(
        errnos.iter().all(|e| *e == "ENOSPC"),
        "expected ENOSPC only: {errnos:?}"
    );
    // Still serving: already-allocated blocks are writable (acks continue), control answers.
    assert!(
        writer.wait_for_more_acks(20, Duration::from_secs(20)),
        "no writes to allocated blocks on a full pool"
    );
    cluster.tandem("hv1", &["volume", "list"]).ok();
    assert!(cluster.host("hv1").running());
    cluster.unfill_pool("hv1");
    let failed_before = writer.count("E ");
    assert!(
        writer.wait_for_more_acks(500, Duration::from_secs(20)),
        "writes did not resume after freeing space"
    );
    let (code, summary) = writer.stop();
    assert_eq!(code, Some(0), "{summary}");
    assert!(
        summary["writes_enospc"].as_u64().unwrap() >= 50,
        "{summary}"
    );
    assert_eq!(
        summary["reconnects"], 0,
        "ENOSPC must not cost the connection: {summary}"
    );
    assert!(failed_before <= summary["writes_failed"].as_u64().unwrap() as usize);
    let (code, report) = verify(
        &log,
        &["--socket", socket.to_str().unwrap(), "--export", "v1"],
    );
    eprintln!("writer: {summary}\nverify: {report}");
    assert_eq!(code, Some(0), "{report}");
    assert_eq!(report["lost"], 0);
    eprintln!("ENOSPC test took {:?}", started.elapsed());
}
