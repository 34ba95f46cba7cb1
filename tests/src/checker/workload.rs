//! The writer: random 4 KiB block writes over NBD, each logged before it is sent and after
//! it is acknowledged, continuing through faults by reconnecting to whichever of the given
//! sockets accepts a writable open (the Primary).
//!
//! Fault handling, per reply:
//!
//! * acknowledged: `K` logged; every `flush_every` acknowledgements a FLUSH (`F` logged).
//! * `ENOSPC`: `E` logged, the connection is kept, the writer goes on (the server is fine,
//!   the pool is full).
//! * any other errno (EIO, ESHUTDOWN from a demoted or frozen volume, EPERM): `E` logged,
//!   the connection dropped, and the writer looks for a Primary again.
//! * connection lost (EOF, reset, timeout): the write's outcome is unknown (only its `A`
//!   line stays); the writer looks for a Primary again.
//!
//! Looking for a Primary cycles through the sockets every 100 ms, starting after the one
//! that just failed, until one accepts a writable `NBD_OPT_GO`, or `reconnect_timeout`
//! passes (then the run ends with `aborted` set).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

use super::block::{encode, BlockTag, SplitMix64, BLOCK_SIZE};
use super::log::{LogHeader, LogWriter};
use crate::nbd_client::{errno_name, NbdClient, NbdClientError, NBD_ENOSPC};

/// When the workload stops.
#[derive(Debug, Clone, Copy)]
pub enum Limit {
    Duration(Duration),
    Writes(u64),
}

/// Everything the writer needs.
#[derive(Debug, Clone)]
pub struct WorkloadSpec {
    /// Candidate sockets, tried in order (the first is the initial Primary).
    pub sockets: Vec<PathBuf>,
    pub export: String,
    pub blocks: u64,
    pub log: PathBuf,
    pub limit: Limit,
    pub seed: u64,
    /// Send a FLUSH after this many acknowledged writes (0: never, except at the end).
    pub flush_every: u64,
    /// Send every n-th write with FUA (0: never).
    pub fua_every: u64,
    /// Give up when no socket accepts a writable open for this long.
    pub reconnect_timeout: Duration,
    /// Bound on every socket read/write (a frozen server counts as a lost connection).
    pub io_timeout: Duration,
}

/// What the writer did.
#[derive(Debug, Clone, Default)]
pub struct WorkloadSummary {
    pub run_id: u64,
    pub seed: u64,
    pub attempted: u64,
    pub acknowledged: u64,
    pub failed: u64,
    pub enospc: u64,
    pub unknown_outcome: u64,
    pub flushes: u64,
    pub reconnects: u64,
    pub elapsed: Duration,
    /// Why the run ended early, if it did.
    pub aborted: Option<String>,
}

impl WorkloadSummary {
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "run_id": format!("{:016x}", self.run_id),
            "seed": self.seed,
            "writes_attempted": self.attempted,
            "writes_acknowledged": self.acknowledged,
            "writes_failed": self.failed,
            "writes_enospc": self.enospc,
            "writes_unknown_outcome": self.unknown_outcome,
            "flushes": self.flushes,
            "reconnects": self.reconnects,
            "elapsed_seconds": self.elapsed.as_secs_f64(),
            "aborted": self.aborted,
        })
    }
}

/// Why the workload could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("workload log")]
    Log(#[from] super::log::LogError),
    #[error("export '{export}' is {size} bytes, too small for {blocks} blocks of 4 KiB")]
    TooSmall {
        export: String,
        size: u64,
        blocks: u64,
    },
    #[error("no sockets given")]
    NoSockets,
}

struct Connection {
    client: NbdClient,
    socket: PathBuf,
}

/// Try every socket once, starting at index `first`; the first writable open wins.
/// Returns the errors otherwise.
fn connect_round(spec: &WorkloadSpec, first: usize) -> Result<Connection, Vec<String>> {
    let mut errors = Vec::new();
    let count = spec.sockets.len();
    for socket in (0..count).map(|i| &spec.sockets[(first + i) % count]) {
        match NbdClient::connect(socket, &spec.export, Some(spec.io_timeout)) {
            Ok(client) if client.read_only() => {
                errors.push(format!("{}: export is read-only", socket.display()));
                let _ = client.disconnect();
            }
            Ok(client) => {
                return Ok(Connection {
                    client,
                    socket: socket.clone(),
                })
            }
            Err(e) => errors.push(format!("{}: {}", socket.display(), error_chain(&e))),
        }
    }
    Err(errors)
}

fn socket_index(spec: &WorkloadSpec, socket: &std::path::Path) -> usize {
    spec.sockets.iter().position(|s| s == socket).unwrap_or(0)
}

/// An error and its causes on one line.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Run the workload until its limit, `stop` is set, or no Primary can be found.
pub fn run_workload(
    spec: &WorkloadSpec,
    stop: &AtomicBool,
) -> Result<WorkloadSummary, WorkloadError> {
    if spec.sockets.is_empty() {
        return Err(WorkloadError::NoSockets);
    }
    let started = Instant::now();
    let mut rng = SplitMix64::new(spec.seed);
    let run_id = rng.next_u64()
        ^ (u64::from(std::process::id()) << 32)
        ^ started.elapsed().as_nanos() as u64;
    let run_id = if run_id == 0 { 1 } else { run_id };
    let mut log = LogWriter::create(
        &spec.log,
        &LogHeader {
            run_id,
            export: spec.export.clone(),
            blocks: spec.blocks,
            seed: spec.seed,
        },
    )?;
    let mut summary = WorkloadSummary {
        run_id,
        seed: spec.seed,
        ..WorkloadSummary::default()
    };
    let mut versions = vec![0u64; spec.blocks as usize];
    let mut connection: Option<Connection> = None;
    let mut acked_since_flush = 0u64;
    // Where the next search for a Primary starts: after a socket that failed us, the next
    // one (so a Secondary that accepts opens but fails writes is not retried first).
    let mut next_first = 0usize;
    let done = |summary: &WorkloadSummary| match spec.limit {
        Limit::Duration(d) => started.elapsed() >= d,
        Limit::Writes(n) => summary.attempted >= n,
    };

    while !done(&summary) && !stop.load(Ordering::Relaxed) {
        let conn = match connection.as_mut() {
            Some(conn) => conn,
            None => {
                let deadline = Instant::now() + spec.reconnect_timeout;
                let found = loop {
                    match connect_round(spec, next_first) {
                        Ok(conn) => break Ok(conn),
                        Err(errors)
                            if Instant::now() >= deadline || stop.load(Ordering::Relaxed) =>
                        {
                            break Err(errors)
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(100)),
                    }
                };
                match found {
                    Ok(conn) => {
                        let size = conn.client.size();
                        if size < spec.blocks * BLOCK_SIZE as u64 {
                            return Err(WorkloadError::TooSmall {
                                export: spec.export.clone(),
                                size,
                                blocks: spec.blocks,
                            });
                        }
                        if summary.attempted > 0 {
                            summary.reconnects += 1;
                        }
                        log.connected(&conn.socket)?;
                        connection.insert(conn)
                    }
                    Err(errors) => {
                        let reason = format!(
                            "no socket accepted a writable open within {:?}: {}",
                            spec.reconnect_timeout,
                            errors.join("; ")
                        );
                        log.comment(&reason)?;
                        summary.aborted = Some(reason);
                        break;
                    }
                }
            }
        };

        let block = rng.below(spec.blocks);
        let version = versions[block as usize] + 1;
        versions[block as usize] = version;
        let fua = spec.fua_every > 0 && (summary.attempted + 1).is_multiple_of(spec.fua_every);
        let data = encode(&BlockTag {
            run_id,
            block,
            version,
        });
        log.attempt(block, version, fua)?;
        summary.attempted += 1;
        match conn.client.write(block * BLOCK_SIZE as u64, &data, fua) {
            Ok(()) => {
                log.acknowledged(block, version, fua)?;
                summary.acknowledged += 1;
                acked_since_flush += 1;
            }
            Err(NbdClientError::Command { errno, .. }) => {
                log.failed(block, version, errno_name(errno))?;
                summary.failed += 1;
                if errno == NBD_ENOSPC {
                    summary.enospc += 1;
                    std::thread::sleep(Duration::from_millis(5));
                } else {
                    next_first = socket_index(spec, &conn.socket) + 1;
                    log.comment(&format!(
                        "{} failed a write with {}: looking for a Primary",
                        conn.socket.display(),
                        errno_name(errno)
                    ))?;
                    connection = None;
                }
                continue;
            }
            Err(e) => {
                next_first = socket_index(spec, &conn.socket) + 1;
                summary.unknown_outcome += 1;
                log.comment(&format!("{}: {}", conn.socket.display(), error_chain(&e)))?;
                connection = None;
                continue;
            }
        }
        if spec.flush_every > 0 && acked_since_flush >= spec.flush_every {
            match conn.client.flush() {
                Ok(()) => {
                    log.flushed()?;
                    summary.flushes += 1;
                    acked_since_flush = 0;
                }
                Err(e) => {
                    log.comment(&format!(
                        "flush on {}: {}",
                        conn.socket.display(),
                        error_chain(&e)
                    ))?;
                    if e.errno() != Some(NBD_ENOSPC) {
                        next_first = socket_index(spec, &conn.socket) + 1;
                        connection = None;
                    }
                }
            }
        }
    }
    if let Some(mut conn) = connection.take() {
        match conn.client.flush() {
            Ok(()) => {
                log.flushed()?;
                summary.flushes += 1;
            }
            Err(e) => log.comment(&format!("final flush: {}", error_chain(&e)))?,
        }
        let _ = conn.client.disconnect();
    }
    log.sync()?;
    summary.elapsed = started.elapsed();
    Ok(summary)
}
