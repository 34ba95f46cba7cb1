//! In-process micro-benchmark of the replicated write path: the same workload through a
//! Primary without peers (unreplicated) and through a Primary replicating to a Secondary
//! over TCP loopback, printed as ratios. Ignored by default; run it optimized:
//!
//! ```text
//! cargo test --release -p tandem-replication --test throughput -- --ignored --nocapture
//! ```
//!
//! Both replicas are files in the same temp directory (`TANDEM_BENCH_DIR` overrides), so
//! the numbers measure the engine's overhead (framing, tasks, loopback round trips), not a
//! second disk. The issue 3 goal is replicated >= 0.8x unreplicated at queue depth 32.

#![allow(clippy::unwrap_used)] // benchmark helpers outside #[test] functions

use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use replication::auth::Secret;
use replication::datapath::{run_secondary, Primary, PrimaryConfig, SecondaryConfig};
use replication::device::{BackingDevice, FileDevice};
use replication::link::{LinkConfig, PeerLink};
use replication::wire::{Hello, ReplicationProtocol};
use tokio::net::TcpListener;

const VOLUME: u64 = 1 << 30;
const RUN: Duration = Duration::from_secs(3);

fn device(dir: &std::path::Path, name: &str) -> Arc<dyn BackingDevice> {
    let path = dir.join(name);
    File::create(&path).unwrap().set_len(VOLUME).unwrap();
    Arc::new(FileDevice::open(&path).unwrap())
}

async fn replicated(dir: &std::path::Path, protocol: ReplicationProtocol) -> Primary {
    let secret = Secret::new(b"bench".to_vec()).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let s2 = secret.clone();
    let accept = tokio::spawn(async move {
        PeerLink::accept(&listener, &s2, &LinkConfig::default(), |_| {
            Some(Hello::new("secondary", "bench", VOLUME, protocol))
        })
        .await
        .unwrap()
    });
    let plink = PeerLink::connect(
        addr,
        &secret,
        &Hello::new("primary", "bench", VOLUME, protocol),
        &LinkConfig::default(),
    )
    .await
    .unwrap();
    let slink = accept.await.unwrap();
    tokio::spawn(run_secondary(
        slink,
        device(dir, "secondary"),
        SecondaryConfig::default(),
    ));
    let primary = Primary::new(
        device(dir, "primary-r"),
        PrimaryConfig::new(protocol),
        Arc::new(|_: &str, _, _| {}),
    );
    primary.attach_peer(plink);
    primary
}

/// Requests per second for `qd` workers writing `bs`-byte blocks, random or sequential.
async fn run(primary: &Primary, qd: usize, bs: usize, random: bool) -> f64 {
    let deadline = Instant::now() + RUN;
    let blocks = VOLUME / bs as u64;
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..qd {
        let primary = primary.clone();
        let data = Bytes::from(vec![(w as u8) | 1; bs]);
        tasks.spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(w as u64);
            let mut n = 0u64;
            let mut next = (w as u64) * (blocks / qd as u64);
            while Instant::now() < deadline {
                let block = if random {
                    rng.gen_range(0..blocks)
                } else {
                    next = (next + 1) % blocks;
                    next
                };
                primary
                    .submit_write(block * bs as u64, data.clone(), false)
                    .await
                    .unwrap();
                n += 1;
            }
            n
        });
    }
    let mut total = 0;
    while let Some(n) = tasks.join_next().await {
        total += n.unwrap();
    }
    total as f64 / RUN.as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark; run with --release -- --ignored --nocapture"]
async fn replicated_vs_unreplicated_write_throughput() {
    let dir = match std::env::var_os("TANDEM_BENCH_DIR") {
        Some(d) => tempfile::tempdir_in(PathBuf::from(d)).unwrap(),
        None => tempfile::tempdir().unwrap(),
    };
    let local = Primary::new(
        device(dir.path(), "primary-l"),
        PrimaryConfig::new(ReplicationProtocol::C),
        Arc::new(|_: &str, _, _| {}),
    );
    let repl = replicated(dir.path(), ReplicationProtocol::C).await;
    println!("workload                      unreplicated   replicated(C)   ratio");
    for (name, qd, bs, random) in [
        ("4 KiB random write QD1", 1, 4096, true),
        ("4 KiB random write QD32", 32, 4096, true),
        ("1 MiB sequential write QD4", 4, 1 << 20, false),
    ] {
        let a = run(&local, qd, bs, random).await;
        let b = run(&repl, qd, bs, random).await;
        let unit = if bs >= 1 << 20 { "MiB/s" } else { "IOPS" };
        let scale = bs as f64 / (1 << 20) as f64;
        let (a, b) = if unit == "MiB/s" {
            (a * scale, b * scale)
        } else {
            (a, b)
        };
        println!(
            "{name:<29} {a:>10.0} {unit:<5} {b:>8.0} {unit:<5} {:>5.2}",
            b / a
        );
    }
    assert_eq!(repl.connected_peers().len(), 1);
}
