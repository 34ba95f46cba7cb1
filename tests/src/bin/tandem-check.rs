//! `tandem-check`: the acknowledged-write workload and checker, for tests and operators.
//!
//! Exit status: 0 = ran / verified clean, 1 = a violation was found (lost, stale or garbage
//! blocks; replicas differ), 2 = the check could not run (bad arguments, unreachable
//! export, the workload found no Primary in time).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use tandem_tests::checker::block::BLOCK_SIZE;
use tandem_tests::checker::compare::{compare, FileSource, NbdSource, ReplicaSource};
use tandem_tests::checker::log::read_history;
use tandem_tests::checker::verify::verify;
use tandem_tests::checker::workload::{error_chain, run_workload, Limit, WorkloadSpec};
use tandem_tests::nbd_client::NbdClient;

/// Write self-describing blocks to an NBD export, log every acknowledged write, and later
/// prove that none was lost: every block must hold its last acknowledged version or a later
/// attempted one, never an older one, never garbage.
///
/// Typical use against a Tandem volume:
///
///   tandem-check write --socket /run/tandem/nbd.sock --export vol1 --blocks 4096 \
///       --log /tmp/vol1.log --duration 60
///   tandem-check verify --log /tmp/vol1.log --socket /run/tandem/nbd.sock --export vol1
///   tandem-check compare /var/lib/tandem/images/vol1.img /mnt/peer/vol1.img
///
/// Exit status: 0 = ran / verified clean, 1 = a violation was found (lost, stale or
/// garbage blocks; replicas differ), 2 = the check could not run (bad arguments,
/// unreachable export, no Primary found within --reconnect-timeout).
#[derive(Debug, Parser)]
#[command(name = "tandem-check", version, verbatim_doc_comment)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write random 4 KiB blocks and log each attempt and acknowledgement.
    ///
    /// The log (one line per event, written before/after each request) is what `verify`
    /// judges the export by. On a lost connection or an I/O error other than ENOSPC, the
    /// writer reconnects to the first of --socket and --reconnect-to that accepts a
    /// writable open (the Primary). SIGINT/SIGTERM end the run cleanly (final flush,
    /// summary). Prints a summary; exits 2 if no Primary was found within
    /// --reconnect-timeout.
    Write {
        /// NBD unix socket of the initial Primary.
        #[arg(long)]
        socket: PathBuf,
        /// Further sockets to try after a fault (comma-separated), e.g. the other hosts'.
        #[arg(long, value_delimiter = ',')]
        reconnect_to: Vec<PathBuf>,
        /// Export (volume) name.
        #[arg(long)]
        export: String,
        /// Number of 4 KiB blocks (from offset 0) the workload writes to.
        #[arg(long)]
        blocks: u64,
        /// Log file to create.
        #[arg(long)]
        log: PathBuf,
        /// Stop after this many seconds.
        #[arg(long, conflicts_with = "writes")]
        duration: Option<f64>,
        /// Stop after this many write attempts.
        #[arg(long)]
        writes: Option<u64>,
        /// Seed for the block choices (default: from the clock; printed).
        #[arg(long)]
        seed: Option<u64>,
        /// FLUSH after this many acknowledged writes (0: only at the end).
        #[arg(long, default_value_t = 64)]
        flush_every: u64,
        /// Send every N-th write with FUA (0: never).
        #[arg(long, default_value_t = 0)]
        fua_every: u64,
        /// Give up when no socket accepts a writable open for this many seconds.
        #[arg(long, default_value_t = 60.0)]
        reconnect_timeout: f64,
        /// Consider a connection lost when a request gets no reply for this many seconds.
        #[arg(long, default_value_t = 30.0)]
        io_timeout: f64,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check an export (or a replica's backing file) against a workload log.
    ///
    /// Counts: blocks checked, writes acknowledged, lost (zeroes or foreign data where a
    /// write was acknowledged), stale (an older version than the last acknowledged one),
    /// garbage (bad checksum, wrong block, never-written version), torn-tolerated (bad
    /// checksum where an unacknowledged write came after the last acknowledged one).
    /// Exits 1 on any lost, stale or garbage block.
    Verify {
        /// The log written by `tandem-check write`.
        #[arg(long)]
        log: PathBuf,
        /// NBD unix socket to read through.
        #[arg(long, required_unless_present = "image", conflicts_with = "image")]
        socket: Option<PathBuf>,
        /// Export name (default: the one in the log).
        #[arg(long)]
        export: Option<String>,
        /// Read a backing file (raw image) directly instead of NBD.
        #[arg(long)]
        image: Option<PathBuf>,
        /// Require only writes made durable (FUA, or acknowledged before a FLUSH): the
        /// guarantee after a host crash, as opposed to a daemon crash.
        #[arg(long)]
        durable_only: bool,
        /// The writer died with its host (power cut), so the log may lack its last lines:
        /// accept versions newer than the log knows of a block (counted as unlogged).
        #[arg(long)]
        writer_crashed: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check that replicas hold identical bytes; prints a crc32c per replica.
    ///
    /// Sources are raw image files and/or NBD exports given as SOCKET:EXPORT with --nbd.
    /// Exits 1 if sizes or contents differ.
    Compare {
        /// Raw image files (replica backing files).
        images: Vec<PathBuf>,
        /// NBD exports as SOCKET_PATH:EXPORT (repeatable).
        #[arg(long)]
        nbd: Vec<String>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Copy a file to the start of an export (1 MiB writes, then a flush), e.g. a disk
    /// image onto a volume. Prints the number of bytes written.
    Put {
        /// NBD unix socket of the export's server (the Primary, or a node that may become it).
        #[arg(long)]
        socket: PathBuf,
        /// Export (volume) name.
        #[arg(long)]
        export: String,
        /// The file to copy; it must fit in the export.
        file: PathBuf,
    },
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn install_stop_handlers() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tandem-check: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn seconds(value: f64, what: &str) -> Result<Duration> {
    Duration::try_from_secs_f64(value).with_context(|| format!("{what}: {value} is not a duration"))
}

/// `tandem-check put` (see [`Command::Put`]).
fn put(socket: &std::path::Path, export: &str, file: &std::path::Path) -> Result<u64> {
    let data = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let mut client = NbdClient::connect(socket, export, Some(Duration::from_secs(60)))
        .with_context(|| format!("opening export '{export}'"))?;
    if data.len() as u64 > client.size() {
        bail!(
            "{} ({} bytes) does not fit in export '{export}' ({} bytes)",
            file.display(),
            data.len(),
            client.size()
        );
    }
    let mut offset = 0u64;
    for chunk in data.chunks(1 << 20) {
        client
            .write(offset, chunk, false)
            .with_context(|| format!("writing at offset {offset}"))?;
        offset += chunk.len() as u64;
    }
    client.flush().context("flushing")?;
    client.disconnect().context("disconnecting")?;
    Ok(offset)
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Put {
            socket,
            export,
            file,
        } => {
            let written = put(&socket, &export, &file)?;
            println!("{written} bytes written to export '{export}'");
            Ok(ExitCode::SUCCESS)
        }
        Command::Write {
            socket,
            reconnect_to,
            export,
            blocks,
            log,
            duration,
            writes,
            seed,
            flush_every,
            fua_every,
            reconnect_timeout,
            io_timeout,
            json,
        } => {
            if blocks == 0 {
                bail!("--blocks must be at least 1");
            }
            let limit = match (duration, writes) {
                (Some(d), _) => Limit::Duration(seconds(d, "--duration")?),
                (None, Some(n)) => Limit::Writes(n),
                (None, None) => bail!("give --duration SECONDS or --writes N"),
            };
            let seed = seed.unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            });
            let mut sockets = vec![socket];
            sockets.extend(reconnect_to);
            let spec = WorkloadSpec {
                sockets,
                export,
                blocks,
                log: log.clone(),
                limit,
                seed,
                flush_every,
                fua_every,
                reconnect_timeout: seconds(reconnect_timeout, "--reconnect-timeout")?,
                io_timeout: seconds(io_timeout, "--io-timeout")?,
            };
            install_stop_handlers();
            let summary = run_workload(&spec, &STOP)
                .with_context(|| format!("workload on export '{}'", spec.export))?;
            if json {
                println!("{}", summary.to_json());
            } else {
                println!(
                    "seed {} run {:016x}: {} writes attempted, {} acknowledged, {} failed ({} ENOSPC), {} unknown outcome, {} flushes, {} reconnects in {:.1} s; log {}",
                    summary.seed,
                    summary.run_id,
                    summary.attempted,
                    summary.acknowledged,
                    summary.failed,
                    summary.enospc,
                    summary.unknown_outcome,
                    summary.flushes,
                    summary.reconnects,
                    summary.elapsed.as_secs_f64(),
                    log.display()
                );
            }
            if let Some(reason) = summary.aborted {
                eprintln!("tandem-check: workload aborted: {reason}");
                return Ok(ExitCode::from(2));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify {
            log,
            socket,
            export,
            image,
            durable_only,
            writer_crashed,
            json,
        } => {
            let mut history = read_history(&log).with_context(|| "reading the workload log")?;
            history.writer_crashed = writer_crashed;
            let report = if let Some(image) = image {
                let mut source = FileSource::open(&image).map_err(anyhow::Error::msg)?;
                verify(&history, durable_only, |block| {
                    source.read_at(block * BLOCK_SIZE as u64, BLOCK_SIZE)
                })
            } else {
                let socket = socket.context("--socket or --image is required")?;
                let export = export.unwrap_or_else(|| history.header.export.clone());
                let mut client =
                    NbdClient::connect(&socket, &export, Some(Duration::from_secs(60)))
                        .map_err(|e| anyhow::anyhow!(error_chain(&e)))
                        .with_context(|| {
                            format!("opening export '{export}' on {}", socket.display())
                        })?;
                let report = verify(&history, durable_only, |block| {
                    client
                        .read(block * BLOCK_SIZE as u64, BLOCK_SIZE as u32)
                        .map_err(|e| error_chain(&e))
                });
                let _ = client.disconnect();
                report
            }
            .map_err(anyhow::Error::msg)?;
            if json {
                println!("{}", report.to_json());
            } else {
                for violation in &report.violations {
                    println!("{violation}");
                }
                println!(
                    "{}: {} blocks checked, {} writes acknowledged ({} attempted, {} failed), {} lost, {} stale, {} garbage, {} torn (tolerated), {} unlogged",
                    if report.passed() { "PASS" } else { "FAIL" },
                    report.blocks_checked,
                    report.writes_acknowledged,
                    report.writes_attempted,
                    report.writes_failed,
                    report.lost,
                    report.stale,
                    report.garbage,
                    report.torn_tolerated,
                    report.unlogged
                );
            }
            Ok(if report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Compare { images, nbd, json } => {
            let mut sources: Vec<Box<dyn ReplicaSource>> = Vec::new();
            for image in &images {
                sources.push(Box::new(
                    FileSource::open(image).map_err(anyhow::Error::msg)?,
                ));
            }
            for spec in &nbd {
                let (socket, export) = spec
                    .rsplit_once(':')
                    .with_context(|| format!("--nbd {spec}: expected SOCKET_PATH:EXPORT"))?;
                let client =
                    NbdClient::connect(socket.as_ref(), export, Some(Duration::from_secs(60)))
                        .map_err(|e| anyhow::anyhow!(error_chain(&e)))
                        .with_context(|| format!("opening {spec}"))?;
                sources.push(Box::new(NbdSource {
                    label: spec.clone(),
                    client,
                }));
            }
            if sources.len() < 2 {
                bail!("give at least two replicas to compare");
            }
            let report = compare(&mut sources).map_err(anyhow::Error::msg)?;
            if json {
                println!("{}", report.to_json());
            } else {
                for ((name, size), sum) in report
                    .names
                    .iter()
                    .zip(&report.sizes)
                    .zip(&report.checksums)
                {
                    println!("{sum:08x}  {size:>14}  {name}");
                }
                match report.first_difference {
                    _ if report.identical() => {
                        println!("PASS: {} replicas identical", report.names.len())
                    }
                    Some(offset) => println!(
                        "FAIL: {} blocks of 4 KiB differ, the first at offset {offset}",
                        report.differing_blocks
                    ),
                    None => println!("FAIL: sizes differ"),
                }
            }
            Ok(if report.identical() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}
