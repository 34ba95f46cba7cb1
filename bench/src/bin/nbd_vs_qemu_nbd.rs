//! Tandem's NBD server vs `qemu-nbd` on the same backing file, measured with fio's nbd
//! engine in one run: 4 KiB random read/write IOPS at queue depth 1 and 32, 1 MiB
//! sequential write/read MiB/s. Prints both values and the ratio ours/qemu-nbd per row.
//!
//! Our server runs in-process over a `LocalExport` (a `FileDevice`: buffered positional
//! I/O, so the page cache is in play); qemu-nbd runs as the reference recipe says
//! (`--cache=none --aio=native`, O_DIRECT). Run with
//! `cargo run --release -p tandem-bench --bin nbd_vs_qemu_nbd`.
//!
//! The column `O_DIRECT*` is our server over an experimental O_DIRECT handle defined here
//! (same I/O mode as qemu-nbd), which separates the server's own overhead from the
//! buffered-I/O backend.
//!
//! What we saw on the 2-vCPU dev VM (noisy, other builds running): with a cold cache the
//! buffered backend loses on 1 MiB sequential rows, because every write copies into freshly
//! allocated page-cache pages (`copy_folio_from_iter_atomic` dominates the profile) while
//! qemu-nbd DMAs with O_DIRECT; with `--warm`, and in the O_DIRECT column, we lead.
//!
//! Before every fio run the backing file is synced and dropped from the page cache, and
//! each row is measured `--repeat` times per server, alternating, keeping the best.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use async_trait::async_trait;
use bytes::Bytes;
use clap::Parser;
use replication::device::FileDevice;
use tandem_bench::{fill, fio, settle, QemuNbd, Row};
use volume_driver::frontend::{
    ExportHandle, ExportInfo, ExportIoError, Exports, IoErrorKind, OpenError,
};
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
    /// Keep the backing file in the page cache between runs (only sync it): favours our
    /// buffered backend on reads.
    #[arg(long)]
    warm: bool,
    /// Skip the experimental O_DIRECT column.
    #[arg(long)]
    no_direct: bool,
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
    async fn describe(&self, name: &str) -> Result<ExportInfo, OpenError> {
        let handle = self.open(name, false).await?;
        Ok(ExportInfo {
            size: handle.size(),
            read_only: handle.read_only(),
        })
    }
    async fn open(&self, name: &str, _writable: bool) -> Result<Arc<dyn ExportHandle>, OpenError> {
        if name != EXPORT {
            return Err(OpenError::NotFound(name.to_string()));
        }
        Ok(Arc::new(LocalExport::new(
            name,
            self.device.clone(),
            false,
            Arc::default(),
        )))
    }
}

/// An experimental handle doing O_DIRECT I/O on the backing file (same I/O mode as
/// `qemu-nbd --cache=none`), to separate the server's overhead from the backend's buffered
/// I/O. Not the product path: shown as an extra column.
struct DirectExport {
    file: Arc<std::fs::File>,
    size: u64,
}

const ALIGN: usize = 4096;

fn io_err(e: std::io::Error) -> ExportIoError {
    ExportIoError::new(IoErrorKind::Io, e.to_string())
}

impl DirectExport {
    fn open(path: &Path) -> Result<DirectExport> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .with_context(|| format!("opening {} with O_DIRECT", path.display()))?;
        let size = file.metadata().context("stat of the backing file")?.len();
        Ok(DirectExport {
            file: Arc::new(file),
            size,
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        op: impl FnOnce(&std::fs::File) -> std::io::Result<T> + Send + 'static,
    ) -> Result<T, ExportIoError> {
        let file = Arc::clone(&self.file);
        tokio::task::spawn_blocking(move || op(&file))
            .await
            .map_err(|e| ExportIoError::new(IoErrorKind::Io, e.to_string()))?
            .map_err(io_err)
    }
}

/// A `len`-byte buffer aligned for O_DIRECT: an over-allocated Vec and the aligned offset.
fn aligned(len: usize) -> (Vec<u8>, usize) {
    let v = vec![0u8; len + ALIGN];
    let off = (ALIGN - (v.as_ptr() as usize % ALIGN)) % ALIGN;
    (v, off)
}

#[async_trait]
impl ExportHandle for DirectExport {
    fn name(&self) -> &str {
        EXPORT
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        false
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, ExportIoError> {
        self.blocking(move |f| {
            use std::os::unix::fs::FileExt;
            let len = len as usize;
            let (mut v, off) = aligned(len);
            f.read_exact_at(&mut v[off..off + len], offset)?;
            Ok(Bytes::from(v).slice(off..off + len))
        })
        .await
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), ExportIoError> {
        self.blocking(move |f| {
            use std::os::unix::fs::FileExt;
            let (mut v, off) = aligned(data.len());
            v[off..off + data.len()].copy_from_slice(&data);
            f.write_all_at(&v[off..off + data.len()], offset)?;
            if fua {
                f.sync_data()?;
            }
            Ok(())
        })
        .await
    }
    async fn flush(&self) -> Result<(), ExportIoError> {
        self.blocking(|f| f.sync_data()).await
    }
    async fn trim(&self, _offset: u64, _len: u64) -> Result<(), ExportIoError> {
        Ok(())
    }
    async fn write_zeroes(&self, offset: u64, len: u64, _: bool) -> Result<(), ExportIoError> {
        self.write(offset, Bytes::from(vec![0u8; len as usize]), false)
            .await
    }
}

struct DirectExports(Arc<DirectExport>);

#[async_trait]
impl Exports for DirectExports {
    fn list(&self) -> Vec<String> {
        vec![EXPORT.to_string()]
    }
    async fn describe(&self, name: &str) -> Result<ExportInfo, OpenError> {
        let handle = self.open(name, false).await?;
        Ok(ExportInfo {
            size: handle.size(),
            read_only: handle.read_only(),
        })
    }
    async fn open(&self, name: &str, _writable: bool) -> Result<Arc<dyn ExportHandle>, OpenError> {
        if name != EXPORT {
            return Err(OpenError::NotFound(name.to_string()));
        }
        Ok(self.0.clone())
    }
}

/// Our server on its own runtime thread; stops on drop.
struct OurServer {
    shutdown: tokio::sync::watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl OurServer {
    fn start(sock: &Path, exports: Arc<dyn Exports>, workers: usize) -> Result<OurServer> {
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
    let direct_sock = dir.path().join("direct.sock");
    let device = Arc::new(FileDevice::open(&file).context("opening the backing file")?);
    let _ours = OurServer::start(&our_sock, Arc::new(OneExport { device }), args.workers)?;
    let direct = Arc::new(DirectExport::open(&file)?);
    let _direct = OurServer::start(&direct_sock, Arc::new(DirectExports(direct)), args.workers)?;
    let _qemu = QemuNbd::start(&qemu_sock, &file, EXPORT)?;
    let uri = |sock: &Path| format!("nbd+unix:///{EXPORT}?socket={}", sock.display());

    println!(
        "{:<20} {:>12} {:>12} {:>8}  {:>12} {:>8}  unit",
        "row", "tandem", "qemu-nbd", "ratio", "O_DIRECT*", "ratio*"
    );
    for row in ROWS {
        if let Some(only) = &args.only {
            if !row.name.contains(only.as_str()) {
                continue;
            }
        }
        let (mut ours, mut theirs, mut direct) = (0f64, 0f64, 0f64);
        for _ in 0..args.repeat.max(1) {
            settle(&file, args.warm)?;
            theirs = theirs.max(fio(&uri(&qemu_sock), row, args.runtime)?);
            settle(&file, args.warm)?;
            ours = ours.max(fio(&uri(&our_sock), row, args.runtime)?);
            if !args.no_direct {
                settle(&file, args.warm)?;
                direct = direct.max(fio(&uri(&direct_sock), row, args.runtime)?);
            }
        }
        println!(
            "{:<20} {:>12.0} {:>12.0} {:>7.2}x  {:>12.0} {:>7.2}x  {}",
            row.name,
            ours,
            theirs,
            ours / theirs,
            direct,
            direct / theirs,
            row.unit
        );
    }
    Ok(())
}
