//! Tandem's NBD server vs `qemu-nbd` on the same backing file, measured with fio's nbd
//! engine in one run: 4 KiB random read/write IOPS at queue depth 1 and 32, 1 MiB
//! sequential write/read MiB/s. Prints both values and the ratio ours/qemu-nbd per row.
//!
//! Our server runs in-process over a `LocalExport` (a `FileDevice`: buffered positional
//! I/O, so the page cache is in play); qemu-nbd runs as the reference recipe says
//! (`--cache=none --aio=native`, O_DIRECT). Run with
//! `cargo run --release -p tandem-bench --bin nbd_vs_qemu_nbd`.
//!
//! Before every fio run the backing file is synced and dropped from the page cache, and
//! each row is measured `--repeat` times per server, alternating, keeping the best.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use async_trait::async_trait;
use clap::Parser;
use replication::device::FileDevice;
use volume_driver::frontend::{ExportHandle, Exports, OpenError};
use volume_driver::local_export::LocalExport;

/// Compare Tandem's NBD server with qemu-nbd using fio (nbd engine) on one backing file.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Directory for the backing file and sockets; must be on a real disk, not tmpfs.
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// Size of the backing file in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Seconds per fio run.
    #[arg(long, default_value_t = 5)]
    runtime: u32,
    /// Only run rows whose name contains this text.
    #[arg(long)]
    only: Option<String>,
    /// Runs per row and server (alternating); the best run counts, to damp noise from
    /// other work on the machine.
    #[arg(long, default_value_t = 2)]
    repeat: u32,
    /// Tokio worker threads for our server.
    #[arg(long, default_value_t = 2)]
    workers: usize,
}

const EXPORT: &str = "bench";

struct OneExport {
    device: Arc<FileDevice>,
}

#[async_trait]
impl Exports for OneExport {
    fn list(&self) -> Vec<String> {
        vec![EXPORT.to_string()]
    }
    async fn open(&self, name: &str, _writable: bool) -> Result<Arc<dyn ExportHandle>, OpenError> {
        if name != EXPORT {
            return Err(OpenError::NotFound(name.to_string()));
        }
        Ok(Arc::new(LocalExport::new(name, self.device.clone(), false)))
    }
}

/// Our server on its own runtime thread; stops on drop.
struct OurServer {
    shutdown: tokio::sync::watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl OurServer {
    fn start(sock: &Path, file: &Path, workers: usize) -> Result<OurServer> {
        let device = Arc::new(FileDevice::open(file).context("opening the backing file")?);
        let exports: Arc<dyn Exports> = Arc::new(OneExport { device });
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
            .context("building the tokio runtime")?;
        let listener = rt
            .block_on(async { volume_driver::nbd::bind_unix(sock) })
            .context("binding our NBD socket")?;
        let (shutdown, rx) = tokio::sync::watch::channel(false);
        let thread = std::thread::spawn(move || {
            rt.block_on(volume_driver::nbd::serve_unix(listener, exports, rx));
        });
        Ok(OurServer {
            shutdown,
            thread: Some(thread),
        })
    }
}

impl Drop for OurServer {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// qemu-nbd as a child process; killed on drop.
struct QemuNbd(Child);

impl QemuNbd {
    fn start(sock: &Path, file: &Path) -> Result<QemuNbd> {
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
            .args(["-x", EXPORT])
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

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Row {
    name: &'static str,
    rw: &'static str,
    bs: &'static str,
    iodepth: u32,
    /// IOPS for small blocks, MiB/s for large ones.
    unit: &'static str,
}

const ROWS: &[Row] = &[
    Row {
        name: "4k randread  qd1",
        rw: "randread",
        bs: "4k",
        iodepth: 1,
        unit: "IOPS",
    },
    Row {
        name: "4k randread  qd32",
        rw: "randread",
        bs: "4k",
        iodepth: 32,
        unit: "IOPS",
    },
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
    Row {
        name: "1M seqread   qd8",
        rw: "read",
        bs: "1M",
        iodepth: 8,
        unit: "MiB/s",
    },
];

fn fio(uri: &str, row: &Row, runtime: u32) -> Result<f64> {
    let out = Command::new("fio")
        .args([
            "--name=b",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            &format!("--rw={}", row.rw),
            &format!("--bs={}", row.bs),
            &format!("--iodepth={}", row.iodepth),
            "--time_based",
            &format!("--runtime={runtime}"),
            "--ramp_time=1",
            "--output-format=json",
        ])
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
    value.context("fio JSON lacks the measured value")
}

fn fill(file: &Path, size: u64) -> Result<()> {
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

/// Start every run from the same state: the file's dirty pages written back and its page
/// cache dropped (our server does buffered I/O, qemu-nbd O_DIRECT; neither inherits the
/// other's cache or writeback debt).
fn settle(file: &Path) -> Result<()> {
    use std::os::unix::io::AsRawFd;
    let f = std::fs::File::open(file).context("opening the backing file to settle it")?;
    f.sync_all().context("syncing the backing file")?;
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

fn main() -> Result<()> {
    let args = Args::parse();
    let dir = tempfile::Builder::new()
        .prefix("tandem-nbd-bench")
        .tempdir_in(&args.dir)
        .with_context(|| format!("creating a temp dir in {}", args.dir.display()))?;
    let file = dir.path().join("backing.img");
    eprintln!(
        "filling {} MiB backing file {}",
        args.size_mib,
        file.display()
    );
    fill(&file, args.size_mib << 20)?;

    let our_sock = dir.path().join("tandem.sock");
    let qemu_sock = dir.path().join("qemu.sock");
    let _ours = OurServer::start(&our_sock, &file, args.workers)?;
    let _qemu = QemuNbd::start(&qemu_sock, &file)?;
    let uri = |sock: &Path| format!("nbd+unix:///{EXPORT}?socket={}", sock.display());

    println!(
        "{:<20} {:>12} {:>12} {:>8}  unit",
        "row", "tandem", "qemu-nbd", "ratio"
    );
    for row in ROWS {
        if let Some(only) = &args.only {
            if !row.name.contains(only.as_str()) {
                continue;
            }
        }
        let (mut ours, mut theirs) = (0f64, 0f64);
        for _ in 0..args.repeat.max(1) {
            settle(&file)?;
            theirs = theirs.max(fio(&uri(&qemu_sock), row, args.runtime)?);
            settle(&file)?;
            ours = ours.max(fio(&uri(&our_sock), row, args.runtime)?);
        }
        println!(
            "{:<20} {:>12.0} {:>12.0} {:>7.2}x  {}",
            row.name,
            ours,
            theirs,
            ours / theirs,
            row.unit
        );
    }
    Ok(())
}
