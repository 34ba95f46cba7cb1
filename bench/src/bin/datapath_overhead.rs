//! The replicated write path's own overhead, in process: the same workload through a
//! `replication::datapath::Primary` without peers (unreplicated) and through one replicating
//! under protocol C to a Secondary over TCP loopback, printed as ratios. No daemons, NBD or
//! namespaces: this isolates framing, tasks and loopback round trips (see
//! `replicated_vs_local` for the whole system).
//!
//! ```text
//! cargo run --release -p tandem-bench --bin datapath_overhead
//! ```
//!
//! Both replicas are files in one temp directory (`--dir`), so the numbers do not include a
//! second disk. Every file is written in full and synced before the runs, so no row pays
//! for block allocation (under `--cache writeback` the files stay in the page cache).
//!
//! Each row also prints the process's CPU time per request (both replicas run in this
//! process). The last lines measure, in the same run, what the metrics recording adds to
//! one replicated write (the engine's `IoStats` histograms, counters and pending gauges, the
//! data path's timestamps, the link's byte and in-flight counters: `replication::stats`,
//! `replication::link::InFlight`), on two threads sharing one
//! volume's statistics, and print it as a share of the replicated QD32 row's CPU time per
//! request. That share is what recording costs the data path, measured without the noise
//! of a shared machine, which a before/after comparison of whole runs cannot resolve.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use clap::Parser;
use replication::auth::Secret;
use replication::datapath::{run_secondary, Primary, PrimaryConfig, SecondaryConfig};
use replication::device::{BackingDevice, CacheMode, DeviceOptions, FileDevice};
use replication::link::{InFlight, LinkConfig, PeerLink};
use replication::stats::{hold, IoStats};
use replication::wire::{Hello, ReplicationProtocol};
use tandem_bench::{cpu_time, settle};
use tokio::net::TcpListener;

/// Unreplicated vs protocol-C replicated writes through the data path alone, in process.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Directory for the two 1 GiB sparse files.
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// Seconds per workload and target.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// The devices' cache mode: `none` (O_DIRECT and io_uring, the pools' default) or
    /// `writeback` (through the page cache).
    #[arg(long, default_value = "none")]
    cache: CacheMode,
    /// Only run workloads whose name contains this text (e.g. "QD32"), to profile one.
    #[arg(long)]
    only: Option<String>,
}

const VOLUME: u64 = 1 << 30;
fn device(dir: &Path, name: &str, cache: CacheMode) -> Result<Arc<dyn BackingDevice>> {
    let path = dir.join(name);
    fill(&path).with_context(|| format!("filling {}", path.display()))?;
    // Written back; under cache = "writeback" it stays in the page cache, like a volume
    // in use, and under "none" it is dropped from it.
    settle(&path, cache == CacheMode::Writeback)?;
    let options = DeviceOptions {
        cache,
        ..DeviceOptions::default()
    };
    Ok(Arc::new(FileDevice::open_with(&path, options)?))
}

async fn replicated(dir: &Path, cache: CacheMode) -> Result<Primary> {
    let protocol = ReplicationProtocol::C;
    let secret = Secret::new(b"bench".to_vec())?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let s2 = secret.clone();
    let accept = tokio::spawn(async move {
        PeerLink::accept(&listener, &s2, &LinkConfig::default(), |_| {
            Some(Hello::new("secondary", "bench", VOLUME, protocol))
        })
        .await
    });
    let plink = PeerLink::connect(
        addr,
        &secret,
        &Hello::new("primary", "bench", VOLUME, protocol),
        &LinkConfig::default(),
    )
    .await?;
    let slink = accept.await??;
    tokio::spawn(run_secondary(
        slink,
        device(dir, "secondary", cache)?,
        SecondaryConfig::default(),
    ));
    let primary = Primary::new(
        device(dir, "primary-r", cache)?,
        PrimaryConfig::new(protocol),
        Arc::new(|_: &str, _, _| {}),
    );
    primary.attach_peer(plink);
    Ok(primary)
}

/// Write the whole file once, so that no row pays for allocating blocks (or, under
/// `writeback`, page-cache pages) that the other row's file already has.
fn fill(path: &Path) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = File::create(path)?;
    let chunk = vec![0x5Au8; 1 << 20];
    for _ in 0..VOLUME / chunk.len() as u64 {
        file.write_all(&chunk)?;
    }
    Ok(())
}

/// Requests per second for `qd` workers writing `bs`-byte blocks, random or sequential,
/// and this process's CPU time per request.
async fn run(
    primary: &Primary,
    run: Duration,
    qd: usize,
    bs: usize,
    random: bool,
) -> Result<(f64, Duration)> {
    let cpu_before = cpu_time(std::process::id())?;
    let deadline = Instant::now() + run;
    let blocks = VOLUME / bs as u64;
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..qd {
        let primary = primary.clone();
        let data = Bytes::from(vec![(w as u8) | 1; bs]);
        tasks.spawn(async move {
            let mut x = (w as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let mut n = 0u64;
            let mut next = (w as u64) * (blocks / qd as u64);
            while Instant::now() < deadline {
                let block = if random {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x % blocks
                } else {
                    next = (next + 1) % blocks;
                    next
                };
                primary
                    .submit_write(block * bs as u64, data.clone(), false)
                    .await?;
                n += 1;
            }
            Ok::<u64, replication::datapath::DatapathError>(n)
        });
    }
    let mut total = 0;
    while let Some(n) = tasks.join_next().await {
        total += n??;
    }
    let cpu = cpu_time(std::process::id())?.saturating_sub(cpu_before);
    Ok((
        total as f64 / run.as_secs_f64(),
        cpu.div_f64(total.max(1) as f64),
    ))
}

/// What recording adds to one replicated write, per request: two threads doing, `n` times
/// each, exactly the recording work of a write (three timestamps, the write's local and
/// peer histograms, the byte counter, the upper and lower pending gauges, the link's sent,
/// received and in-flight counters) on one shared `IoStats`, as concurrent requests of
/// one volume do.
fn recording_cost(n: u64) -> Result<Duration> {
    let stats = Arc::new(IoStats::default());
    let link = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let in_flight = Arc::new(InFlight::default());
    let cpu_before = cpu_time(std::process::id())?;
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let stats = Arc::clone(&stats);
            let link = Arc::clone(&link);
            let in_flight = Arc::clone(&in_flight);
            std::thread::spawn(move || {
                for _ in 0..n {
                    let upper = hold(&stats.pending_upper, 1);
                    let t0 = Instant::now();
                    let lower = hold(&stats.pending_lower, 1);
                    drop(std::hint::black_box(lower));
                    let local = t0.elapsed();
                    IoStats::add(&in_flight.application, 4096);
                    in_flight.application.fetch_sub(4096, Ordering::Relaxed);
                    let peer = t0.elapsed();
                    stats.write.observe(local, Some(peer));
                    IoStats::add(&stats.written_bytes, 4096);
                    link[0].fetch_add(4160, Ordering::Relaxed);
                    link[1].fetch_add(64, Ordering::Relaxed);
                    drop(std::hint::black_box(upper));
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    std::hint::black_box(&stats);
    // CPU time (not wall time, which a busy machine stretches) per recorded request.
    let cpu = cpu_time(std::process::id())?.saturating_sub(cpu_before);
    Ok(cpu.div_f64(2.0 * n as f64))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    let run_for = Duration::from_secs(args.seconds.max(1));
    let dir = tempfile::tempdir_in(&args.dir)
        .with_context(|| format!("creating a directory under {}", args.dir.display()))?;
    let local = Primary::new(
        device(dir.path(), "primary-l", args.cache)?,
        PrimaryConfig::new(ReplicationProtocol::C),
        Arc::new(|_: &str, _, _| {}),
    );
    let repl = replicated(dir.path(), args.cache).await?;
    println!("cache = {}", args.cache);
    println!(
        "workload                      unreplicated   replicated(C)   ratio   CPU us/req: unrepl  repl"
    );
    let mut repl_qd32_cpu = Duration::ZERO;
    for (name, qd, bs, random) in [
        ("4 KiB random write QD1", 1, 4096, true),
        ("4 KiB random write QD32", 32, 4096, true),
        ("1 MiB sequential write QD4", 4, 1 << 20, false),
    ] {
        if args
            .only
            .as_ref()
            .is_some_and(|only| !name.contains(only.as_str()))
        {
            continue;
        }
        eprintln!("{name}: unreplicated");
        let (a, cpu_a) = run(&local, run_for, qd, bs, random).await?;
        eprintln!("{name}: replicated");
        let (b, cpu_b) = run(&repl, run_for, qd, bs, random).await?;
        if qd == 32 {
            repl_qd32_cpu = cpu_b;
        }
        let unit = if bs >= 1 << 20 { "MiB/s" } else { "IOPS" };
        let scale = if unit == "MiB/s" {
            bs as f64 / (1 << 20) as f64
        } else {
            1.0
        };
        let (a, b) = (a * scale, b * scale);
        println!(
            "{name:<29} {a:>10.0} {unit:<5} {b:>8.0} {unit:<5} {:>5.2} {:>18.1} {:>5.1}",
            b / a,
            cpu_a.as_secs_f64() * 1e6,
            cpu_b.as_secs_f64() * 1e6,
        );
    }
    let recording = recording_cost(5_000_000)?;
    println!(
        "metrics recording per replicated write: {:.0} ns = {:.2}% of the replicated 4 KiB QD32 \
         write's {:.1} us CPU per request",
        recording.as_secs_f64() * 1e9,
        100.0 * recording.as_secs_f64() / repl_qd32_cpu.as_secs_f64().max(1e-9),
        repl_qd32_cpu.as_secs_f64() * 1e6
    );
    anyhow::ensure!(
        repl.connected_peers().len() == 1,
        "the Secondary disconnected during the run"
    );
    Ok(())
}
