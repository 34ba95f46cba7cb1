//! Helpers for benchmarks that run the namespace test bed (`tandem_tests::cluster`) or a
//! single `tandemd`: the checks and environment they need before they start ([`prepare`],
//! [`use_binaries`]), `tandem` commands that must succeed ([`tandem`],
//! [`create_on_hv1_and_hv2`]), and daemons' CPU time and context switches over a measuring
//! window ([`CpuSampler`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tandem_tests::cluster::Cluster;

use crate::{context_switches_by_thread, cpu_time, HOST};

/// Check that this runs as root and that `tandemd` and `tandem` are in `bin_dir` (default:
/// this program's directory), then point the test bed at them and at `dir` for its files.
/// Call before any thread starts (it sets environment variables).
pub fn prepare(bin_dir: Option<&Path>, dir: &Path) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("this benchmark builds network namespaces: run it as root");
    }
    use_binaries(bin_dir, dir)
}

/// Check that `tandemd` and `tandem` are in `bin_dir` (default: this program's directory),
/// then point the test support (`tandem_tests`) at them and at `dir` for its files. Call
/// before any thread starts (it sets environment variables).
pub fn use_binaries(bin_dir: Option<&Path>, dir: &Path) -> Result<()> {
    let bin_dir: PathBuf = match bin_dir {
        Some(dir) => dir.to_path_buf(),
        None => std::env::current_exe()
            .context("locating this program")?
            .parent()
            .context("program directory")?
            .to_path_buf(),
    };
    for b in ["tandemd", "tandem"] {
        if !bin_dir.join(b).exists() {
            bail!(
                "{} not found: build it (`cargo build --release -p tandem-volume-driver --bins`) or pass --bin-dir",
                bin_dir.join(b).display()
            );
        }
    }
    // The test bed finds the binaries and its temp dir through the environment.
    std::env::set_var("TANDEM_BIN_DIR", &bin_dir);
    std::env::set_var("TMPDIR", dir);
    Ok(())
}

/// Run `tandem CMD` on `host`; an error carries its output.
pub fn tandem(cluster: &Cluster, host: &str, cmd: &[&str]) -> Result<()> {
    let out = cluster.tandem(host, cmd);
    if !out.status.success() {
        bail!(
            "`tandem {}` on {host} failed: {}{}",
            cmd.join(" "),
            out.stdout,
            out.stderr
        );
    }
    Ok(())
}

/// Create `volume` of `size_mib` MiB with protocol C and a data replica on hv1 and hv2.
pub fn create_on_hv1_and_hv2(cluster: &Cluster, volume: &str, size_mib: u64) -> Result<()> {
    let size = format!("{size_mib}M");
    let create = [
        "volume",
        "create",
        volume,
        "--size",
        &size,
        "--replicas",
        "2",
        "--protocol",
        "C",
        "--nodes",
        "hv1,hv2",
    ];
    tandem(cluster, "hv1", &create)
}

/// The process id of `host`'s `tandemd`.
pub fn daemon_pid(cluster: &Cluster, host: &str) -> Result<u32> {
    cluster
        .host(host)
        .daemon_pid()
        .with_context(|| format!("tandemd on {host} is not running"))
}

/// Measures processes' CPU time (user + system) and context switches over a window that
/// starts `delay` from now and lasts `window`, on a thread of its own, so the caller can
/// run the load.
pub struct CpuSampler(JoinHandle<Result<Vec<Usage>>>);

/// What one process used over a [`CpuSampler`]'s window.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    pub cpu: Duration,
    /// Context switches of its threads (0 for [`HOST`]).
    pub switches: u64,
}

/// A process's CPU time and its threads' context switches at one moment.
struct Sample {
    cpu: Duration,
    switches: HashMap<u32, u64>,
}

fn sample(pid: u32) -> Result<Sample> {
    Ok(Sample {
        cpu: cpu_time(pid)?,
        switches: if pid == HOST {
            HashMap::new()
        } else {
            context_switches_by_thread(pid)?
        },
    })
}

/// What was used between two samples. Switches are counted per thread, so a thread that
/// exits during the window only loses its own (a thread started in it counts in full).
fn used_between(before: &Sample, after: &Sample) -> Usage {
    let switches = after
        .switches
        .iter()
        .map(|(tid, &now)| now.saturating_sub(before.switches.get(tid).copied().unwrap_or(0)))
        .sum();
    Usage {
        cpu: after.cpu.saturating_sub(before.cpu),
        switches,
    }
}

impl CpuSampler {
    pub fn start(pids: Vec<u32>, delay: Duration, window: Duration) -> CpuSampler {
        CpuSampler(std::thread::spawn(move || {
            std::thread::sleep(delay);
            let before = pids
                .iter()
                .map(|&p| sample(p))
                .collect::<Result<Vec<_>>>()?;
            std::thread::sleep(window);
            pids.iter()
                .zip(before)
                .map(|(&p, b)| Ok(used_between(&b, &sample(p)?)))
                .collect()
        }))
    }

    /// Each process's CPU time over the window, in the order of `pids`.
    pub fn finish(self) -> Result<Vec<Duration>> {
        Ok(self.finish_usage()?.iter().map(|u| u.cpu).collect())
    }

    /// Each process's CPU time and context switches over the window, in the order of `pids`.
    pub fn finish_usage(self) -> Result<Vec<Usage>> {
        self.0
            .join()
            .map_err(|_| anyhow::anyhow!("CPU sampler panicked"))?
    }
}
