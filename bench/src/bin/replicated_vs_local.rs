//! What replication costs, from one run: fio (nbd engine) against
//! (a) a protocol-C replicated Tandem volume whose peer runs in another network namespace,
//! (b) an unreplicated (1-replica) Tandem volume on the same host and pool, and
//! (c) `qemu-nbd` serving a file on the same disk,
//! for 4 KiB random writes at queue depth 1 and 32 and 1 MiB sequential writes. Prints the
//! values and the ratios replicated/unreplicated (goal: at least 0.8) and
//! replicated/qemu-nbd.
//!
//! The hosts are the test bed's namespace cluster (`tandem_tests::cluster`: `hv1`, `hv2`
//! and a witness, each with its own `tandemd`, a replication link over veth and a bridge),
//! under `$TMPDIR` (must be on a real disk; `/var/tmp` by default here). Both volumes live
//! in hv1's file pool; the qemu-nbd file sits next to them. Every target is written once in
//! full first (so no row pays for block allocation), and before each fio run every backing
//! file involved is synced and dropped from the page cache. Rows are measured `--repeat`
//! times per target, alternating, keeping the best.
//!
//! After the table come two references measured in the same run, which say what this
//! machine allows whatever the software does:
//! - **QD1**: the cost of waking a sleeping thread on the other CPU. A replicated write
//!   needs two more such wake-ups than an unreplicated one (the peer's daemon for the
//!   write, this daemon for the acknowledgement), in series, so QD1 cannot get far above
//!   unrepl / (unrepl + 2 x wake-up).
//! - **QD32 and sequential**: each daemon's and fio's CPU time per request (per MiB). Here
//!   fio and both hosts share the same CPUs, so even if the Primary cost no more than an
//!   unreplicated volume, the peer's CPU would be added to every request: a run that keeps
//!   the CPUs busy reaches at most (fio + hv1 unreplicated) / (that + hv2 replicated), the
//!   "ceiling" column. On two real hosts the peer's CPU is its own and this does not apply.
//!   The "host" columns are the whole machine's busy CPU time per request: they add what
//!   the kernel's own threads spend, such as the writeback flushers that write out the
//!   page cache under `cache = "writeback"`, which a daemon's CPU time leaves out. Data
//!   still dirty when the window ends is written out later and counted nowhere, so
//!   "host" still favours `writeback`; and anything else running on the machine counts
//!   there too.
//! - Then each daemon's context switches per request over the same window: how often its
//!   threads slept and were woken (or preempted), which hand-offs between tasks cost.
//!
//! What we saw in three full runs on the quiet 2-vCPU dev VM (its host makes runs vary):
//! replicated/unreplicated 0.41-0.53x at 4 KiB QD1 (4,942-6,584 vs 11,894-12,536 IOPS),
//! 0.33-0.54x at QD32 (28,799-40,128 vs 71,180-106,870), 0.28-0.61x for 1 MiB sequential
//! writes (440-771 vs 1,176-1,616 MiB/s); replicated vs qemu-nbd 0.77-1.20x, 1.09-1.38x and
//! 0.42-0.99x. A cross-CPU wake-up took 37-47 us, which puts QD1 near 0.47-0.53x (the
//! replicated write added 72-119 us); the shared-CPU ceilings were 0.77-0.89x (QD32) and
//! 0.54-0.87x (sequential). So this machine cannot show the 0.8x goal at QD1 at all; the
//! other rows are below their ceilings, which are near 0.8x themselves. Small page-aligned
//! writes skip the blocking pool on both sides (`replication::datapath::write_is_inline`);
//! the unreplicated volume takes the same shortcut, so the comparison is like for like.
//!
//! Needs root (namespaces), fio, qemu-nbd, and the release binaries:
//! `cargo build --release -p tandem-volume-driver --bins && \
//!  sudo target/release/replicated_vs_local`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use tandem_bench::cluster::{create_on_hv1_and_hv2, daemon_pid, prepare, tandem, CpuSampler};
use tandem_bench::{cross_cpu_wake_up, fio_fill, fio_run, nbd_uri, settle, QemuNbd, Row, HOST};
use tandem_tests::cluster::{Cluster, ClusterSpec};

/// Replicated (protocol C, peer in another namespace) vs unreplicated Tandem volume vs
/// qemu-nbd: 4 KiB random-write IOPS at QD1/QD32 and 1 MiB sequential-write MiB/s.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Directory for the cluster (pools) and the qemu-nbd file; must be on a real disk.
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// Size of each volume in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Seconds per fio run.
    #[arg(long, default_value_t = 5)]
    runtime: u32,
    /// Runs per row and target (alternating); the best run counts, to damp noise.
    #[arg(long, default_value_t = 2)]
    repeat: u32,
    /// Only run rows whose name contains this text.
    #[arg(long)]
    only: Option<String>,
    /// The pools' `cache` key: `none` (O_DIRECT, the default) or `writeback`.
    #[arg(long, default_value = "none")]
    cache: String,
    /// Keep backing files in the page cache between runs (only sync them).
    #[arg(long)]
    warm: bool,
    /// `RUST_LOG` for the daemons.
    #[arg(long, default_value = "warn")]
    rust_log: String,
    /// After setup, print the targets' NBD URIs and wait this many seconds before
    /// measuring (to run fio or a profiler by hand against the live cluster).
    #[arg(long, default_value_t = 0)]
    hold_secs: u64,
    /// Directory holding `tandemd` and `tandem` [default: this program's directory].
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

const REPLICATED: &str = "bench-replicated";
const LOCAL: &str = "bench-local";
const QEMU_EXPORT: &str = "bench";

const ROWS: &[Row] = &[
    Row {
        name: "4k randwrite qd1",
        rw: "randwrite",
        bs: "4k",
        iodepth: 1,
        unit: "IOPS",
    },
    Row {
        name: "4k randwrite qd32",
        rw: "randwrite",
        bs: "4k",
        iodepth: 32,
        unit: "IOPS",
    },
    Row {
        name: "1M seqwrite  qd8",
        rw: "write",
        bs: "1M",
        iodepth: 8,
        unit: "MiB/s",
    },
];

/// One thing fio measures: its NBD URI, the backing files to settle before a run, whether
/// it is the replicated volume (whose peer must stay in sync through every run), and the
/// daemons whose CPU time it costs.
struct Target {
    uri: String,
    files: Vec<PathBuf>,
    replicated: bool,
    daemons: Vec<u32>,
}

/// What one fio run measured: the row's value and each daemon's CPU time per unit (per
/// request for IOPS rows, per MiB otherwise) over fio's measuring window.
struct Measured {
    value: f64,
    cpu_per_unit: Vec<Duration>,
    /// Each daemon's context switches per unit.
    switches_per_unit: Vec<f64>,
    /// fio's own CPU time per unit.
    fio_per_unit: Duration,
    /// The whole machine's busy CPU time per unit: the daemons, fio and the kernel's
    /// threads (under `cache = "writeback"` the flushers write the data out).
    host_per_unit: Duration,
}

impl Target {
    fn measure(&self, cluster: &Cluster, row: &Row, args: &Args) -> Result<Measured> {
        for file in &self.files {
            settle(file, args.warm)?;
        }
        // Sample the daemons' CPU time over the same window fio measures (after its 1 s
        // ramp, for `runtime` seconds).
        let window = Duration::from_secs(args.runtime.into());
        let sampled = self.daemons.iter().copied().chain([HOST]).collect();
        let sampler = CpuSampler::start(sampled, Duration::from_secs(1), window);
        let run = fio_run(&self.uri, row, args.runtime)?;
        let mut used = sampler.finish_usage()?;
        let host = used.pop().unwrap_or_default().cpu;
        if self.replicated {
            check_in_sync(cluster)?;
        }
        let units = (run.value * window.as_secs_f64()).max(1.0);
        Ok(Measured {
            value: run.value,
            cpu_per_unit: used.iter().map(|u| u.cpu.div_f64(units)).collect(),
            switches_per_unit: used.iter().map(|u| u.switches as f64 / units).collect(),
            fio_per_unit: Duration::from_secs_f64(run.cpus / run.value.max(1.0)),
            host_per_unit: host.div_f64(units),
        })
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    prepare(args.bin_dir.as_deref(), &args.dir)?;

    eprintln!(
        "starting hv1, hv2 and a witness in network namespaces under {}",
        args.dir.display()
    );
    let cluster = Cluster::new(ClusterSpec {
        hosts: 2,
        witness: true,
        pool_size: None,
        start: true,
        rust_log: args.rust_log.clone(),
        cache: Some(args.cache.clone()),
    });
    let size = format!("{}M", args.size_mib);
    create_on_hv1_and_hv2(&cluster, REPLICATED, args.size_mib)?;
    tandem(
        &cluster,
        "hv1",
        &[
            "volume",
            "create",
            LOCAL,
            "--size",
            &size,
            "--replicas",
            "1",
            "--nodes",
            "hv1",
        ],
    )?;
    tandem(
        &cluster,
        "hv1",
        &["volume", "wait-sync", REPLICATED, "--timeout", "60"],
    )?;
    tandem(&cluster, "hv1", &["volume", "promote", REPLICATED])?;

    let qemu_file = cluster.root().join("qemu-nbd.img");
    let qemu_sock = cluster.root().join("qemu-nbd.sock");
    std::fs::File::create(&qemu_file)
        .and_then(|f| f.set_len(args.size_mib << 20))
        .context("creating the qemu-nbd file")?;
    let _qemu = QemuNbd::start(&qemu_sock, &qemu_file, QEMU_EXPORT)?;

    let hv1_sock = cluster.nbd_socket("hv1");
    let (hv1, hv2) = (daemon_pid(&cluster, "hv1")?, daemon_pid(&cluster, "hv2")?);
    let targets = [
        (
            "replicated",
            Target {
                uri: nbd_uri(REPLICATED, &hv1_sock),
                files: vec![
                    cluster.image_path("hv1", REPLICATED),
                    cluster.image_path("hv2", REPLICATED),
                ],
                replicated: true,
                daemons: vec![hv1, hv2],
            },
        ),
        (
            "unreplicated",
            Target {
                uri: nbd_uri(LOCAL, &hv1_sock),
                files: vec![cluster.image_path("hv1", LOCAL)],
                replicated: false,
                daemons: vec![hv1],
            },
        ),
        (
            "qemu-nbd",
            Target {
                uri: nbd_uri(QEMU_EXPORT, &qemu_sock),
                files: vec![qemu_file.clone()],
                replicated: false,
                daemons: vec![],
            },
        ),
    ];
    for (name, target) in &targets {
        let speed = fio_fill(&target.uri).with_context(|| format!("filling {name}"))?;
        eprintln!("filled {name} ({} MiB) at {speed:.0} MiB/s", args.size_mib);
    }

    if args.hold_secs > 0 {
        for (name, target) in &targets {
            eprintln!("{name}: {}", target.uri);
        }
        eprintln!("holding for {} s", args.hold_secs);
        std::thread::sleep(std::time::Duration::from_secs(args.hold_secs));
    }
    println!(
        "{:<18} {:>11} {:>13} {:>10}  {:>12} {:>13}  unit",
        "row", "replicated", "unreplicated", "qemu-nbd", "repl/unrepl", "repl/qemu-nbd"
    );
    let mut cpu_rows = Vec::new();
    let mut qd1 = None;
    for row in ROWS {
        if args
            .only
            .as_ref()
            .is_some_and(|o| !row.name.contains(o.as_str()))
        {
            continue;
        }
        let mut best: [Option<Measured>; 3] = [None, None, None];
        for _ in 0..args.repeat.max(1) {
            for (i, (name, target)) in targets.iter().enumerate() {
                let run = target
                    .measure(&cluster, row, &args)
                    .with_context(|| format!("{} on {name}", row.name))?;
                if best[i].as_ref().is_none_or(|b| run.value > b.value) {
                    best[i] = Some(run);
                }
            }
        }
        let [Some(replicated), Some(local), Some(qemu)] = best else {
            bail!("no measurement for {}", row.name);
        };
        println!(
            "{:<18} {:>11.0} {:>13.0} {:>10.0}  {:>11.2}x {:>12.2}x  {}",
            row.name,
            replicated.value,
            local.value,
            qemu.value,
            replicated.value / local.value,
            replicated.value / qemu.value,
            row.unit
        );
        if row.iodepth == 1 && row.unit == "IOPS" {
            qd1 = Some((replicated.value, local.value));
        }
        cpu_rows.push((row, replicated, local));
    }
    if let Some((replicated_iops, local_iops)) = qd1 {
        if let Err(e) = print_qd1_bound(replicated_iops, local_iops) {
            eprintln!("warning: no QD1 reference: {e:#}");
        }
    }
    print_cpu(&cpu_rows);
    print_switches(&cpu_rows);
    eprintln!("hv2 stayed connected and in sync after every replicated run");
    Ok(())
}

/// Each daemon's and fio's CPU time per request (per MiB for MiB/s rows), the CPUs each
/// run kept busy, and what the peer's share leaves when fio and both hosts run on this
/// machine's CPUs: had the Primary cost no more than an unreplicated volume, every request
/// would still need (unreplicated fio + hv1 + replicated hv2) of CPU, so no run can exceed
/// CPUs / that, the "ceiling" column as a ratio to the unreplicated run. Two real hosts do
/// not share CPUs, so there the ceiling does not apply.
fn print_cpu(rows: &[(&Row, Measured, Measured)]) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let us = |d: Option<&Duration>| d.map_or(0.0, |d| d.as_secs_f64() * 1e6);
    let busy = |m: &Measured| {
        let per_unit: f64 = m
            .cpu_per_unit
            .iter()
            .chain([&m.fio_per_unit])
            .map(|d| d.as_secs_f64())
            .sum();
        per_unit * m.value
    };
    println!(
        "\nCPU time per request (per MiB for MiB/s rows), in microseconds, over fio's window; \
         CPUs kept busy ({cpus} here)"
    );
    println!(
        "{:<18} {:>8} {:>8} {:>8} {:>8} {:>5}  {:>10} {:>10} {:>11} {:>5}  {:>7}",
        "row",
        "repl hv1",
        "repl hv2",
        "repl fio",
        "host",
        "CPUs",
        "unrepl hv1",
        "unrepl fio",
        "unrepl host",
        "CPUs",
        "ceiling"
    );
    for (row, replicated, local) in rows {
        let (l_hv1, l_fio) = (
            us(local.cpu_per_unit.first()),
            us(Some(&local.fio_per_unit)),
        );
        let r_hv2 = us(replicated.cpu_per_unit.get(1));
        let least_per_unit = (l_hv1 + l_fio + r_hv2) * 1e-6;
        println!(
            "{:<18} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>5.2}  {:>10.1} {:>10.1} {:>11.1} {:>5.2}  {:>6.2}x",
            row.name,
            us(replicated.cpu_per_unit.first()),
            r_hv2,
            us(Some(&replicated.fio_per_unit)),
            us(Some(&replicated.host_per_unit)),
            busy(replicated),
            l_hv1,
            l_fio,
            us(Some(&local.host_per_unit)),
            busy(local),
            (cpus / least_per_unit / local.value).min(1.0)
        );
    }
}

/// Each daemon's context switches per request, over the same window: how often its threads
/// went to sleep and were woken (or were preempted), the cost of hand-offs between tasks.
fn print_switches(rows: &[(&Row, Measured, Measured)]) {
    let per = |m: &Measured, i: usize| m.switches_per_unit.get(i).copied().unwrap_or(0.0);
    println!("\nContext switches per request (per MiB for MiB/s rows), over fio's window");
    println!(
        "{:<18} {:>8} {:>8}  {:>10}",
        "row", "repl hv1", "repl hv2", "unrepl hv1"
    );
    for (row, replicated, local) in rows {
        println!(
            "{:<18} {:>8.3} {:>8.3}  {:>10.3}",
            row.name,
            per(replicated, 0),
            per(replicated, 1),
            per(local, 0)
        );
    }
}

/// At QD1 a request waits for every hop in turn. An unreplicated write wakes the daemon
/// and then fio; a replicated one also wakes the peer's daemon and then this daemon again
/// for the acknowledgement. Print the machine's cost of such a wake-up and the QD1 ratio
/// those two alone leave, even if replication cost nothing else.
fn print_qd1_bound(replicated_iops: f64, local_iops: f64) -> Result<()> {
    let wake = cross_cpu_wake_up(20_000)?.as_secs_f64();
    let (local, replicated) = (1.0 / local_iops, 1.0 / replicated_iops);
    println!(
        "\nQD1 latency: unreplicated {:.1} us, replicated {:.1} us (+{:.1} us). Waking a \
         sleeping thread on the other CPU takes {:.1} us here (median); two more of those \
         per write alone put QD1 near {:.2}x, whatever else replication costs.",
        local * 1e6,
        replicated * 1e6,
        (replicated - local) * 1e6,
        wake * 1e6,
        local / (local + 2.0 * wake)
    );
    Ok(())
}

/// The replicated volume's peer must still be connected and in sync after a run (a run
/// that dropped the peer would have measured an unreplicated volume).
fn check_in_sync(cluster: &Cluster) -> Result<()> {
    let status = cluster.volume_status("hv1", REPLICATED);
    let peer = tandem_tests::volume_status::peer(&status, "hv2");
    if peer["connection"] != "Connected" || peer["out_of_sync_bytes"] != 0 {
        bail!("hv2 fell behind during the benchmark: {status:#}");
    }
    Ok(())
}
