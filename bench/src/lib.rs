//! Shared helpers for the benchmark programs under `bench/src/bin/`: fio runs against an
//! NBD URI ([`fio`], [`Row`]), `qemu-nbd` as the reference server ([`QemuNbd`]),
//! resetting backing files between runs ([`settle`], [`fill`]), and running the namespace
//! test bed ([`cluster`]). The `frontends` bench's load generator ([`load`]) and its clients:
//! vhost-user-blk through libblkio ([`vhost_blk`]), pipelined NBD ([`nbd_pipeline`]) and
//! the backing device in process ([`device_client`]).

pub mod cluster;
pub mod device_client;
pub mod load;
pub mod nbd_pipeline;
pub mod vhost_blk;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// One fio workload.
pub struct Row {
    pub name: &'static str,
    /// fio `--rw`.
    pub rw: &'static str,
    /// fio `--bs`.
    pub bs: &'static str,
    pub iodepth: u32,
    /// IOPS for small blocks, MiB/s for large ones.
    pub unit: &'static str,
}

/// What one fio run measured.
pub struct FioRun {
    /// IOPS or MiB/s as the row's unit says.
    pub value: f64,
    /// CPUs fio itself kept busy on average (user + system).
    pub cpus: f64,
}

/// Run fio's nbd engine against `uri` for `runtime` seconds (after a 1 s ramp); returns
/// IOPS or MiB/s as `row.unit` says.
pub fn fio(uri: &str, row: &Row, runtime: u32) -> Result<f64> {
    fio_run(uri, row, runtime).map(|r| r.value)
}

/// [`fio`], with fio's own CPU use.
pub fn fio_run(uri: &str, row: &Row, runtime: u32) -> Result<FioRun> {
    fio_with(
        uri,
        row,
        &[
            "--time_based",
            &format!("--runtime={runtime}"),
            "--ramp_time=1",
        ],
    )
}

/// Write the whole export once, sequentially in 1 MiB requests (allocates every block, so
/// measurements do not pay for first writes); returns MiB/s.
pub fn fio_fill(uri: &str) -> Result<f64> {
    let row = Row {
        name: "fill",
        rw: "write",
        bs: "1M",
        iodepth: 8,
        unit: "MiB/s",
    };
    fio_with(uri, &row, &[]).map(|r| r.value)
}

fn fio_with(uri: &str, row: &Row, extra: &[&str]) -> Result<FioRun> {
    let out = Command::new("fio")
        .args([
            "--name=b",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            &format!("--rw={}", row.rw),
            &format!("--bs={}", row.bs),
            &format!("--iodepth={}", row.iodepth),
            "--output-format=json",
        ])
        .args(extra)
        .output()
        .context("running fio (install fio)")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "fio failed ({}): {stdout} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // fio prints "connected to NBD server" (and maybe more) before the JSON document.
    let start = stdout
        .find("\n{")
        .map(|i| i + 1)
        .or_else(|| stdout.find('{'));
    let json = &stdout[start.context("no JSON in fio output")?..];
    let v: serde_json::Value = serde_json::from_str(json).context("parsing fio JSON")?;
    let job = &v["jobs"][0];
    if job["error"].as_i64() != Some(0) {
        bail!("fio reported error {} for {}", job["error"], row.name);
    }
    let dir = if row.rw.contains("read") {
        "read"
    } else {
        "write"
    };
    let value = if row.unit == "IOPS" {
        job[dir]["iops"].as_f64()
    } else {
        job[dir]["bw_bytes"].as_f64().map(|b| b / (1 << 20) as f64)
    };
    let percent = |key: &str| job[key].as_f64().context("fio JSON lacks its CPU use");
    Ok(FioRun {
        value: value.context("fio JSON lacks the measured value")?,
        cpus: (percent("usr_cpu")? + percent("sys_cpu")?) / 100.0,
    })
}

/// Context switches (voluntary and not) that a process's live threads have made so far,
/// summed over `/proc/PID/task/*/status`. A thread that exits takes its count with it.
pub fn context_switches(pid: u32) -> Result<u64> {
    Ok(context_switches_by_thread(pid)?.values().sum())
}

/// Context switches (voluntary and not) of each of a process's live threads so far, by
/// thread id, from `/proc/PID/task/*/status`.
pub fn context_switches_by_thread(pid: u32) -> Result<HashMap<u32, u64>> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .with_context(|| format!("listing /proc/{pid}/task"))?;
    let mut counts = HashMap::new();
    for task in tasks {
        let Ok(task) = task else { continue };
        let Some(tid) = task
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue; // the thread exited meanwhile
        };
        let total = status
            .lines()
            .filter_map(|line| line.split_once(':'))
            .filter(|(key, _)| key.ends_with("ctxt_switches"))
            .map(|(_, value)| value.trim().parse::<u64>().unwrap_or(0))
            .sum();
        counts.insert(tid, total);
    }
    Ok(counts)
}

/// The "process" [`cpu_time`] reads as the whole machine.
pub const HOST: u32 = 0;

/// CPU time (user + system) a process has used so far, from `/proc/PID/stat`; for [`HOST`],
/// the busy time of every CPU (user, system, interrupts: the kernel's own threads, such as
/// writeback flushers, included), from `/proc/stat`.
pub fn cpu_time(pid: u32) -> Result<Duration> {
    if pid == HOST {
        return host_busy_time();
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("malformed /proc/PID/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let ticks = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .context("short /proc/PID/stat")?
            .parse()
            .context("parsing /proc/PID/stat")
    };
    Ok(Duration::from_micros(
        (ticks(11)? + ticks(12)?) * 1_000_000 / clock_ticks_per_second()?,
    ))
}

fn clock_ticks_per_second() -> Result<u64> {
    // SAFETY: sysconf has no preconditions.
    u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) })
        .ok()
        .filter(|&hz| hz > 0)
        .context("sysconf(_SC_CLK_TCK)")
}

/// Every CPU's busy time so far: the first line of `/proc/stat` (`cpu user nice system idle
/// iowait irq softirq steal ...`, in clock ticks) without idle, iowait and steal.
fn host_busy_time() -> Result<Duration> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|t| t.parse().context("parsing /proc/stat"))
        .collect::<Result<_>>()?;
    let busy: u64 = [0, 1, 2, 5, 6]
        .iter()
        .map(|&i| ticks.get(i).copied().context("short /proc/stat"))
        .sum::<Result<u64>>()?;
    Ok(Duration::from_micros(
        busy * 1_000_000 / clock_ticks_per_second()?,
    ))
}

/// `nbd+unix:///EXPORT?socket=SOCKET`
pub fn nbd_uri(export: &str, socket: &Path) -> String {
    format!("nbd+unix:///{export}?socket={}", socket.display())
}

/// Create `file` with `size` bytes of a non-zero pattern, synced.
pub fn fill(file: &Path, size: u64) -> Result<()> {
    use std::io::Write;
    let mut f =
        std::fs::File::create(file).with_context(|| format!("creating {}", file.display()))?;
    let chunk: Vec<u8> = (0..(1usize << 20)).map(|i| (i * 7 + 13) as u8).collect();
    for _ in 0..size / (1 << 20) {
        f.write_all(&chunk).context("filling the backing file")?;
    }
    f.sync_all().context("syncing the backing file")?;
    Ok(())
}

/// Start every run from the same state: the file's dirty pages written back and (unless
/// `warm`) its page cache dropped, so no run inherits another's cache or writeback debt.
pub fn settle(file: &Path, warm: bool) -> Result<()> {
    use std::os::unix::io::AsRawFd;
    let f = std::fs::File::open(file)
        .with_context(|| format!("opening {} to settle it", file.display()))?;
    f.sync_all().context("syncing the backing file")?;
    if warm {
        return Ok(());
    }
    // SAFETY: posix_fadvise only reads its integer arguments; the descriptor is open.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        bail!(
            "posix_fadvise(DONTNEED) failed: {}",
            std::io::Error::from_raw_os_error(rc)
        );
    }
    Ok(())
}

/// qemu-nbd serving `file` as `export` (`--cache=none --aio=native`, as the reference
/// recipe runs it) as a child process; killed on drop.
pub struct QemuNbd(Child);

impl QemuNbd {
    pub fn start(sock: &Path, file: &Path, export: &str) -> Result<QemuNbd> {
        let child = Command::new("qemu-nbd")
            .args([
                "-t",
                "--shared=16",
                "-f",
                "raw",
                "--cache=none",
                "--aio=native",
                "-k",
            ])
            .arg(sock)
            .args(["-x", export])
            .arg(file)
            .stdout(Stdio::null())
            .spawn()
            .context("starting qemu-nbd (install qemu-utils)")?;
        let q = QemuNbd(child);
        let start = Instant::now();
        while !sock.exists() {
            if start.elapsed() > Duration::from_secs(10) {
                bail!("qemu-nbd did not create {}", sock.display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(q)
    }
}

impl QemuNbd {
    /// The qemu-nbd process id (for [`cpu_time`]).
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Pin the calling thread to `cpu`.
fn pin_current_thread(cpu: usize) -> Result<()> {
    // SAFETY: cpu_set_t is plain data, all zeroes is the empty set; CPU_SET writes within it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: the set is initialised and its size is passed along; 0 is this thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
    if rc != 0 {
        bail!(
            "sched_setaffinity(cpu {cpu}): {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// What it costs to wake a sleeping thread on another CPU: the median over `rounds` of
/// half a round trip between a thread on CPU 0 and one on CPU 1 that block reading a pipe
/// each and answer through the other. Every hop between processes or threads that sleep
/// pays this once; it is the machine's part of a request's latency.
pub fn cross_cpu_wake_up(rounds: usize) -> Result<Duration> {
    use std::io::{Read, Write};
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        bail!("measuring a cross-CPU wake-up needs two CPUs");
    }
    let (mut to_echo_rx, mut to_echo_tx) = std::io::pipe().context("pipe")?;
    let (mut back_rx, mut back_tx) = std::io::pipe().context("pipe")?;
    let echo = std::thread::spawn(move || -> Result<()> {
        pin_current_thread(1)?;
        let mut b = [0u8; 1];
        while to_echo_rx.read_exact(&mut b).is_ok() {
            back_tx.write_all(&b)?;
        }
        Ok(())
    });
    let measure = std::thread::spawn(move || -> Result<Vec<Duration>> {
        pin_current_thread(0)?;
        let mut b = [0u8; 1];
        let mut times = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            let start = Instant::now();
            to_echo_tx.write_all(&b)?;
            back_rx.read_exact(&mut b)?;
            times.push(start.elapsed() / 2);
        }
        Ok(times)
    });
    let mut times = measure
        .join()
        .map_err(|_| anyhow::anyhow!("wake-up measurement panicked"))??;
    echo.join()
        .map_err(|_| anyhow::anyhow!("wake-up echo thread panicked"))??;
    times.sort_unstable();
    times
        .get(times.len() / 2)
        .copied()
        .context("no wake-ups measured")
}
